//! The host of projection components: one `Linker` over the sandbox's engine
//! ([`crate::sandbox`]), and instances whose imports write into a batch that commits atomically.
//! A trap, the deadline or the memory limit fails the call, which faults that projection only.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use wasmtime::bail as trap;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::names::Name;
use crate::sandbox::Sandbox;
use crate::sandbox::{GuestEngine, GuestLog, GuestOutput, Limits, context, explain_failure};
use crate::sandbox::{HeldLine, MAX_LINE_CHARS, sha256_hex};
use crate::store::{IndexConfig, ProjectionView, RowChange};
use crate::store::{MAX_EVENT_BYTES, MAX_EVENT_TYPE_BYTES, NewEvent};

wasmtime::component::bindgen!({
    path: "../guest-sdk/macros/wit",
    world: "projection",
    imports: { default: trappable },
});

pub use self::refract::projection::types::{Partitioning, Source};

/// Most bytes one batch may hold in pending state, rows and emitted events; a guest writing more
/// is stopped rather than allowed to exhaust the server's memory.
pub const MAX_BATCH_WRITE_BYTES: usize = 256 * 1024 * 1024;

/// The engine and linker of projections. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: GuestEngine,
    linker: Arc<Linker<HostState>>,
    /// Instances (and threads) that run the partitions of a batch side by side; 1 runs every
    /// batch in log order on one instance.
    partition_workers: usize,
}

/// A validated, compiled projection component, ready to instantiate.
#[derive(Clone)]
pub struct Compiled {
    pub sha256: String,
    pre: ProjectionPre<HostState>,
    pub info: Info,
}

impl Compiled {
    pub fn pre(&self) -> &ProjectionPre<HostState> {
        &self.pre
    }
}

impl Runtime {
    /// Creates the engine; compiled components are cached in `cache_dir`.
    pub fn new(cache_dir: PathBuf, sandbox: Sandbox) -> anyhow::Result<Runtime> {
        let engine = GuestEngine::new(Some(cache_dir), sandbox)?;
        let mut linker = Linker::new(engine.engine());
        context(
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker),
            "cannot link WASI",
        )?;
        context(
            Projection::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state),
            "cannot link the host interface",
        )?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            partition_workers: 1,
        })
    }

    /// Runs the partitions of partitioned projections on `workers` instances and threads (1: in
    /// log order on the runner's).
    pub fn with_partition_workers(mut self, workers: usize) -> Runtime {
        self.partition_workers = workers.max(1);
        self
    }

    pub fn partition_workers(&self) -> usize {
        self.partition_workers
    }

    pub fn sandbox(&self) -> Sandbox {
        self.engine.sandbox()
    }

    /// The engine, which sharders share.
    pub fn guest_engine(&self) -> &GuestEngine {
        &self.engine
    }

    /// Validates bytes as a projection component and compiles them (or loads the cached
    /// artifact). The error says why the bytes are not a usable projection.
    pub fn compile(&self, bytes: &[u8]) -> anyhow::Result<Compiled> {
        let sha256 = sha256_hex(bytes);
        let (pre, info) = self
            .engine
            .load_accepted(&sha256, bytes, |component| self.check(component))?;
        Ok(Compiled { sha256, pre, info })
    }

    /// Links a compiled component as a projection and asks it to describe itself.
    fn check(&self, component: &Component) -> anyhow::Result<(ProjectionPre<HostState>, Info)> {
        let pre = self.linker.instantiate_pre(component);
        let pre = context(pre, "the component needs imports Refract does not provide")?;
        let pre = context(
            ProjectionPre::new(pre),
            "the component does not implement the refract:projection/projection world",
        )?;
        let mut instance = Instance::new(self, &pre, InstanceSetup::default())?;
        let info = instance.describe()?;
        validate_info(&info)?;
        Ok((pre, info))
    }
}

fn validate_info(info: &Info) -> anyhow::Result<()> {
    let names = match &info.source {
        Source::All => return Ok(()),
        Source::Streams(names) | Source::Categories(names) => names,
    };
    if names.is_empty() {
        bail!("describe() names an empty list of streams or categories as the source");
    }
    if let Some(name) = names.iter().find(|name| name.is_empty()) {
        bail!("describe() names an empty stream or category ({name:?}) as the source");
    }
    Ok(())
}

/// Who an instance works for: names the emitted events' ids and governs what it may do.
#[derive(Debug, Clone, Default)]
pub struct InstanceSetup {
    pub projection: String,
    pub data: u64,
    pub may_emit: bool,
    /// The rules that say where an event's correlation id is, for what it causes to be emitted.
    pub index_config: IndexConfig,
    /// Where the guest's output goes; every instance of the projection shares its rate.
    pub log: GuestLog,
}

/// One sandboxed instance of a projection with its pending batch.
pub struct Instance {
    store: wasmtime::Store<HostState>,
    bindings: Projection,
    sandbox: Sandbox,
}

impl Instance {
    pub fn new(
        runtime: &Runtime,
        pre: &ProjectionPre<HostState>,
        setup: InstanceSetup,
    ) -> anyhow::Result<Instance> {
        let output = setup.log.output();
        let state = HostState {
            wasi: crate::sandbox::wasi(&output),
            output,
            table: ResourceTable::new(),
            limits: runtime.engine.limits(),
            batch: Batch::new(setup),
        };
        let mut store = runtime.engine.store(state);
        let bindings = context(
            pre.instantiate(&mut store),
            "cannot instantiate the component",
        )?;
        Ok(Instance {
            store,
            bindings,
            sandbox: runtime.sandbox(),
        })
    }

    /// While quiet, the guest's output is dropped: it replays events whose lines were logged.
    pub fn set_quiet(&mut self, quiet: bool) {
        self.store.data().output.set_quiet(quiet);
    }

    pub fn describe(&mut self) -> anyhow::Result<Info> {
        self.store.set_epoch_deadline(self.sandbox.deadline_ticks());
        match self.bindings.call_describe(&mut self.store) {
            Ok(info) => Ok(info),
            Err(error) => Err(self.describe_trap(error)),
        }
    }

    /// Hands events to the guest; its writes collect in the pending batch.
    pub fn handle(&mut self, events: &[Event]) -> anyhow::Result<()> {
        self.store.set_epoch_deadline(self.sandbox.deadline_ticks());
        let batch = &mut self.store.data_mut().batch;
        batch.cause = None;
        batch.caused.clear();
        match self.bindings.call_handle(&mut self.store, events) {
            Ok(Ok(())) => {
                self.store.data_mut().batch.attribute_causes(events);
                Ok(())
            }
            Ok(Err(message)) => Err(anyhow!("the projection failed: {message}")),
            Err(error) => Err(self.describe_trap(error)),
        }
    }

    /// Handles one event; a trap's message names the event, as the SDK's errors do.
    pub fn handle_event(&mut self, event: &Event) -> anyhow::Result<()> {
        let failed = self.handle(std::slice::from_ref(event));
        match failed {
            Err(error) if !format!("{error}").starts_with("the projection failed: ") => Err(error
                .context(format!(
                    "{} at position {} ({}@{})",
                    event.event_type, event.position, event.revision, event.stream
                ))),
            other => other,
        }
    }

    /// The partition of an event of a custom-partitioned projection.
    pub fn partition_key(&mut self, event: &Event) -> anyhow::Result<Option<String>> {
        self.store.set_epoch_deadline(self.sandbox.deadline_ticks());
        self.bindings
            .call_partition_key(&mut self.store, event)
            .map_err(|error| self.describe_trap(error))
    }

    /// A trap's message, with the sandbox's reasons and the guest's panic message spelled out.
    fn describe_trap(&mut self, error: wasmtime::Error) -> anyhow::Error {
        let state = self.store.data_mut();
        let is_trap = error.downcast_ref::<wasmtime::Trap>().is_some();
        let explained = explain_failure(error, &state.limits, self.sandbox, "projection");
        match state.batch.panic.take() {
            Some(panic) if is_trap => anyhow!("{explained} ({})", panic.replace('\n', " ")),
            _ => explained,
        }
    }

    /// Starts a new batch that reads through `view` where it has not written.
    pub fn begin(&mut self, view: ProjectionView, emitted_before: u64) {
        let batch = &mut self.store.data_mut().batch;
        batch.clear();
        batch.view = Some(view);
        batch.emitted_before = emitted_before;
    }

    /// Starts a window of a batch run on several instances: the instance's own writes start
    /// empty, reads fall through to `earlier` (the windows before, merged) and then the view,
    /// and the keys it reads and writes are recorded for [`Instance::take_window`].
    pub fn begin_window(&mut self, earlier: Arc<Pending>, emitted_before: u64) {
        let batch = &mut self.store.data_mut().batch;
        batch.clear_writes();
        batch.bytes = earlier.bytes;
        batch.earlier = Some(earlier);
        batch.emitted_before = emitted_before;
        batch.access = Some(Access::default());
    }

    /// Takes a window's writes and the keys it touched; the view stays for the next window.
    pub fn take_window(&mut self) -> (Writes, Access) {
        let state = self.store.data_mut();
        let access = state.batch.access.take().unwrap_or_default();
        let mut writes = state.batch.take_writes();
        writes.lines = state.output.take_held();
        (writes, access)
    }

    /// Holds the guest's output with the writes of each window (`take_window`) instead of
    /// logging it, for an instance whose windows may be thrown away and run again.
    pub fn hold_output(&mut self) {
        self.store.data().output.hold();
    }

    /// Takes the batch's writes, leaving it empty.
    pub fn take(&mut self) -> Writes {
        let batch = &mut self.store.data_mut().batch;
        let writes = batch.take_writes();
        batch.clear();
        writes
    }
}

/// The merged writes of the earlier windows of a batch run on several instances.
#[derive(Debug, Default)]
pub struct Pending {
    pub states: HashMap<String, Vec<u8>>,
    pub rows: HashMap<(String, String), Option<Vec<u8>>>,
    /// What the writes were accounted as, against the batch's limit.
    pub bytes: usize,
}

impl Pending {
    /// Adds a window's state and row writes (emits and links are the caller's to order).
    pub fn merge(&mut self, writes: &mut Writes) {
        self.states.extend(writes.states.drain(..));
        self.rows.extend(writes.rows.drain(..));
        self.bytes += writes.bytes;
    }

    pub fn into_writes(self) -> (Vec<(String, Vec<u8>)>, Vec<RowChange>) {
        (
            self.states.into_iter().collect(),
            self.rows.into_iter().collect(),
        )
    }
}

/// The state partitions and rows a window read and wrote, as hashes of their addresses: two
/// different addresses with the same hash only make a window look like it conflicts.
#[derive(Debug, Default)]
pub struct Access {
    pub reads: HashSet<u64>,
    pub writes: HashSet<u64>,
}

fn state_address(partition: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (0u8, partition).hash(&mut hasher);
    hasher.finish()
}

fn row_address(table: &str, key: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (1u8, table, key).hash(&mut hasher);
    hasher.finish()
}

/// What a batch wrote.
#[derive(Debug, Default)]
pub struct Writes {
    pub states: Vec<(String, Vec<u8>)>,
    pub rows: Vec<RowChange>,
    pub emits: Vec<(String, NewEvent)>,
    pub links: Vec<(String, u64)>,
    /// What the writes were accounted as, against the batch's limit.
    pub bytes: usize,
    /// The guest's output while it made them, when held (`Instance::hold_output`).
    pub lines: Vec<HeldLine>,
}

pub struct HostState {
    wasi: WasiCtx,
    output: GuestOutput,
    table: ResourceTable,
    limits: Limits,
    batch: Batch,
}

impl AsMut<Limits> for HostState {
    fn as_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Writes pending in the current batch, read back by later calls of the same batch.
struct Batch {
    setup: InstanceSetup,
    view: Option<ProjectionView>,
    /// In a window of a batch run on several instances: the earlier windows' writes.
    earlier: Option<Arc<Pending>>,
    /// In such a window: what this instance read and wrote.
    access: Option<Access>,
    states: HashMap<String, Vec<u8>>,
    rows: HashMap<(String, String), Option<Vec<u8>>>,
    emits: Vec<(String, NewEvent)>,
    links: Vec<(String, u64)>,
    /// The event the guest said it handles now (`caused-by`).
    cause: Option<u64>,
    /// Emits of the current call, by index in `emits`, with the position of their cause.
    caused: Vec<(usize, u64)>,
    emitted_before: u64,
    bytes: usize,
    /// The guest's last panic message, logged by the SDK just before the panic traps.
    panic: Option<String>,
}

impl Batch {
    fn new(setup: InstanceSetup) -> Self {
        Batch {
            setup,
            view: None,
            earlier: None,
            access: None,
            states: HashMap::new(),
            rows: HashMap::new(),
            emits: Vec::new(),
            links: Vec::new(),
            cause: None,
            caused: Vec::new(),
            emitted_before: 0,
            bytes: 0,
            panic: None,
        }
    }

    fn clear(&mut self) {
        self.view = None;
        self.clear_writes();
    }

    fn clear_writes(&mut self) {
        self.earlier = None;
        self.access = None;
        self.states.clear();
        self.rows.clear();
        self.emits.clear();
        self.links.clear();
        self.cause = None;
        self.caused.clear();
        self.bytes = 0;
    }

    /// The writes so far; the bytes are those accounted since the window's earlier writes.
    fn take_writes(&mut self) -> Writes {
        let earlier = self.earlier.take().map_or(0, |earlier| earlier.bytes);
        Writes {
            states: self.states.drain().collect(),
            rows: self.rows.drain().collect(),
            emits: std::mem::take(&mut self.emits),
            links: std::mem::take(&mut self.links),
            bytes: std::mem::take(&mut self.bytes) - earlier,
            lines: Vec::new(),
        }
    }

    fn read(&mut self, address: impl FnOnce() -> u64) {
        if let Some(access) = &mut self.access {
            access.reads.insert(address());
        }
    }

    fn wrote(&mut self, address: impl FnOnce() -> u64) {
        if let Some(access) = &mut self.access {
            access.writes.insert(address());
        }
    }

    fn account(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.bytes += bytes;
        if self.bytes > MAX_BATCH_WRITE_BYTES {
            trap!(
                "the projection wrote more than {} MiB in one batch",
                MAX_BATCH_WRITE_BYTES >> 20
            );
        }
        Ok(())
    }

    fn view(&self) -> wasmtime::Result<&ProjectionView> {
        match &self.view {
            Some(view) => Ok(view),
            None => trap!("state was used outside of handle()"),
        }
    }

    /// Gives the events emitted during a call the id of their cause (one of `events`, which the
    /// call handled) as `$causationId`, and its correlation id when it has one and they do not.
    fn attribute_causes(&mut self, events: &[Event]) {
        let config = &self.setup.index_config;
        for (index, position) in self.caused.drain(..) {
            let Ok(found) = events.binary_search_by_key(&position, |event| event.position) else {
                continue;
            };
            let cause = &events[found];
            let metadata = &mut self.emits[index].1.metadata;
            let mut object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(metadata).unwrap_or_default();
            object.insert("$causationId".into(), cause.id.clone().into());
            let property = &config.correlation_property;
            if !object.contains_key(property)
                && let Some(correlation) = config.correlation_id(&cause.metadata)
            {
                object.insert(property.clone(), correlation.into_owned().into());
            }
            *metadata = serde_json::to_vec(&object).expect("a JSON object");
        }
    }

    /// The id of the batch's next emitted event: the same for the same projection data and
    /// the same place in its output, so a replayed batch is recognised.
    fn next_emit_id(&self) -> Uuid {
        let number = self.emitted_before + self.emits.len() as u64;
        let digest = Sha256::new()
            .chain_update(b"refract-emit\0")
            .chain_update(self.setup.projection.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.setup.data.to_le_bytes())
            .chain_update(number.to_le_bytes())
            .finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Uuid::new_v8(bytes)
    }
}

impl self::refract::projection::types::Host for HostState {}

impl self::refract::projection::host::Host for HostState {
    fn get_state(&mut self, partition: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.batch.read(|| state_address(&partition));
        if let Some(state) = self.batch.states.get(&partition) {
            return Ok(Some(state.clone()));
        }
        if let Some(state) = self
            .batch
            .earlier
            .as_ref()
            .and_then(|e| e.states.get(&partition))
        {
            return Ok(Some(state.clone()));
        }
        Ok(self.batch.view()?.state(&partition)?)
    }

    fn set_state(&mut self, partition: String, state: Vec<u8>) -> wasmtime::Result<()> {
        self.batch.account(partition.len() + state.len())?;
        self.batch.wrote(|| state_address(&partition));
        self.batch.states.insert(partition, state);
        Ok(())
    }

    fn table_get(&mut self, table: String, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.batch.read(|| row_address(&table, &key));
        let address = (table, key);
        if let Some(row) = self.batch.rows.get(&address) {
            return Ok(row.clone());
        }
        if let Some(row) = self
            .batch
            .earlier
            .as_ref()
            .and_then(|e| e.rows.get(&address))
        {
            return Ok(row.clone());
        }
        Ok(self.batch.view()?.row(&address.0, &address.1)?)
    }

    fn table_put(&mut self, table: String, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        validate_row_address(&table, &key)?;
        self.batch.account(table.len() + key.len() + value.len())?;
        self.batch.wrote(|| row_address(&table, &key));
        self.batch.rows.insert((table, key), Some(value));
        Ok(())
    }

    fn table_delete(&mut self, table: String, key: String) -> wasmtime::Result<()> {
        self.batch.account(table.len() + key.len())?;
        self.batch.wrote(|| row_address(&table, &key));
        self.batch.rows.insert((table, key), None);
        Ok(())
    }

    fn may_emit(&mut self) -> wasmtime::Result<bool> {
        Ok(self.batch.setup.may_emit)
    }

    fn emit(
        &mut self,
        stream: String,
        event_type: String,
        data: Vec<u8>,
        metadata: Vec<u8>,
    ) -> wasmtime::Result<Result<(), String>> {
        if !self.batch.setup.may_emit {
            return Ok(Err(
                "the projection was deployed without permission to emit (emit=true)".into(),
            ));
        }
        if let Err(reason) = validate_emit(&stream, &event_type, &data, &metadata) {
            return Ok(Err(reason));
        }
        self.batch
            .account(stream.len() + event_type.len() + data.len() + metadata.len())?;
        let binary = serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_err();
        let event = NewEvent {
            id: self.batch.next_emit_id(),
            event_type,
            data,
            binary,
            metadata,
        };
        if let Some(cause) = self.batch.cause {
            self.batch.caused.push((self.batch.emits.len(), cause));
        }
        self.batch.emits.push((stream, event));
        Ok(Ok(()))
    }

    fn caused_by(&mut self, position: u64) -> wasmtime::Result<()> {
        self.batch.cause = Some(position);
        Ok(())
    }

    fn link_to(&mut self, stream: String, position: u64) -> wasmtime::Result<Result<(), String>> {
        if let Err(reason) = Name::Stream.check(&stream) {
            return Ok(Err(reason));
        }
        if stream.starts_with('$') {
            return Ok(Err("streams starting with $ belong to the system".into()));
        }
        self.batch.account(stream.len() + 8)?;
        self.batch.links.push((stream, position));
        Ok(Ok(()))
    }

    fn log(&mut self, message: String) -> wasmtime::Result<()> {
        for line in message.lines() {
            self.output.log(line);
        }
        if message.starts_with("panicked at") {
            let message: String = message.chars().take(MAX_LINE_CHARS).collect();
            self.batch.panic = Some(message);
        }
        Ok(())
    }
}

fn validate_row_address(table: &str, key: &str) -> wasmtime::Result<()> {
    if table.is_empty() || table.len() > 256 {
        trap!("a table name must be 1 to 256 bytes long, not {:?}", table);
    }
    if key.len() > 4096 {
        trap!("a row key must be at most 4096 bytes long");
    }
    Ok(())
}

fn validate_emit(
    stream: &str,
    event_type: &str,
    data: &[u8],
    metadata: &[u8],
) -> Result<(), String> {
    Name::Stream.check(stream)?;
    if stream.starts_with('$') {
        return Err("streams starting with $ belong to the system".into());
    }
    if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES {
        return Err(format!(
            "an event type must be 1 to {MAX_EVENT_TYPE_BYTES} bytes long"
        ));
    }
    if event_type.len() + data.len() + metadata.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "an event may hold at most {} MiB",
            MAX_EVENT_BYTES >> 20
        ));
    }
    if !metadata.is_empty()
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(metadata).is_err()
    {
        return Err("metadata must be a JSON object".into());
    }
    Ok(())
}
