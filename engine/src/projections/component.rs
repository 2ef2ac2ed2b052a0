//! The WebAssembly host: one wasmtime `Engine` and `Linker`, compiled components cached on disk
//! by hash, and sandboxed instances whose imports write into a batch that commits atomically.
//!
//! Sandbox: guests get WASI without files, network, environment or arguments; clocks stand still
//! and randomness is a fixed sequence, so a guest cannot tell two runs apart. Memory is limited
//! per instance and every call has a deadline (epoch interruption); hitting either traps the
//! call, which faults that projection only.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use wasmtime::bail as trap;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use crate::store::projection_data::{ProjectionView, RowChange};
use crate::store::{MAX_EVENT_BYTES, MAX_EVENT_TYPE_BYTES, NewEvent, validate_stream_name};

wasmtime::component::bindgen!({
    path: "../guest-sdk/wit",
    world: "projection",
    imports: { default: trappable },
});

pub use self::refract::projection::types::{Partitioning, Source};

/// How often the deadline clock ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Most bytes one batch may hold in pending state, rows and emitted events; a guest writing more
/// is stopped rather than allowed to exhaust the server's memory.
const MAX_BATCH_WRITE_BYTES: usize = 256 * 1024 * 1024;

/// Limits every guest instance runs under.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Longest a single call into a guest may run.
    pub call_timeout: Duration,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            memory_bytes: 256 << 20,
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// The shared engine. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    compatibility: String,
    sandbox: Sandbox,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        // Ends the ticker thread, which holds only a weak reference.
        self.engine.increment_epoch();
    }
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
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Calls are synchronous; without this a call costs about four times as much.
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Projection::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compatibility = format!("{:016x}", hasher.finish());
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("cannot create {}", cache_dir.display()))?;
        let inner = Arc::new(RuntimeInner {
            engine,
            linker,
            cache_dir,
            compatibility,
            sandbox,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("refract-wasm-epoch".into())
            .spawn(move || {
                while let Some(inner) = weak.upgrade() {
                    inner.engine.increment_epoch();
                    drop(inner);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Runtime { inner })
    }

    pub fn sandbox(&self) -> Sandbox {
        self.inner.sandbox
    }

    /// Validates bytes as a projection component and compiles them (or loads the cached
    /// artifact). The error says why the bytes are not a usable projection.
    pub fn compile(&self, bytes: &[u8]) -> anyhow::Result<Compiled> {
        let sha256 = sha256_hex(bytes);
        let component = self.load_or_compile(&sha256, bytes)?;
        let pre = self.inner.linker.instantiate_pre(&component);
        let pre = context(pre, "the component needs imports Refract does not provide")?;
        let pre = context(
            ProjectionPre::new(pre),
            "the component does not implement the refract:projection/projection world",
        )?;
        let mut instance = Instance::new(self, &pre, InstanceSetup::default())?;
        let info = instance.describe()?;
        validate_info(&info)?;
        Ok(Compiled { sha256, pre, info })
    }

    fn load_or_compile(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<Component> {
        let engine = &self.inner.engine;
        let cached = self
            .inner
            .cache_dir
            .join(format!("{sha256}-{}.cwasm", self.inner.compatibility));
        if cached.exists() {
            // SAFETY: the file is an artifact this engine configuration serialized (its name
            // carries the engine's compatibility hash) into a directory only Refract writes;
            // wasmtime still checks its header and rejects an incompatible one.
            match unsafe { Component::deserialize_file(engine, &cached) } {
                Ok(component) => return Ok(component),
                Err(error) => {
                    tracing::warn!(%error, path = %cached.display(), "cached artifact unusable; recompiling");
                }
            }
        }
        if !bytes.starts_with(b"\0asm") {
            bail!("the body is not WebAssembly: it does not start with the \\0asm magic bytes");
        }
        if is_core_module(bytes) {
            bail!(
                "this is a core WebAssembly module, not a component; build for wasm32-wasip2 \
                 (or convert it with wasm-tools component new)"
            );
        }
        let component = context(
            Component::new(engine, bytes),
            "not a valid WebAssembly component",
        )?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(error) = write_atomically(&cached, &artifact) {
                    tracing::warn!(%error, "cannot cache the compiled component");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot serialize the compiled component"),
        }
        Ok(component)
    }
}

/// Adds a sentence to a wasmtime error.
fn context<T>(result: wasmtime::Result<T>, message: &'static str) -> anyhow::Result<T> {
    result.map_err(|error| anyhow::Error::from(error).context(message))
}

/// The component binary's preamble differs from a core module's in its layer field.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [0, 0]
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a directory");
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
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
}

/// One sandboxed instance of a projection with its pending batch.
pub struct Instance {
    store: wasmtime::Store<HostState>,
    bindings: Projection,
    timeout_ticks: u64,
}

impl Instance {
    pub fn new(
        runtime: &Runtime,
        pre: &ProjectionPre<HostState>,
        setup: InstanceSetup,
    ) -> anyhow::Result<Instance> {
        let sandbox = runtime.inner.sandbox;
        let wasi = WasiCtx::builder()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5]))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits: Limits {
                memory_bytes: sandbox.memory_bytes,
                exceeded: false,
            },
            batch: Batch::new(setup),
        };
        let mut store = wasmtime::Store::new(&runtime.inner.engine, state);
        store.limiter(|state| &mut state.limits);
        let timeout_ticks =
            (sandbox.call_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(timeout_ticks);
        let bindings = context(
            pre.instantiate(&mut store),
            "cannot instantiate the component",
        )?;
        Ok(Instance {
            store,
            bindings,
            timeout_ticks,
        })
    }

    pub fn describe(&mut self) -> anyhow::Result<Info> {
        self.store.set_epoch_deadline(self.timeout_ticks);
        match self.bindings.call_describe(&mut self.store) {
            Ok(info) => Ok(info),
            Err(error) => Err(self.describe_trap(error)),
        }
    }

    /// Hands events to the guest; its writes collect in the pending batch.
    pub fn handle(&mut self, events: &[Event]) -> anyhow::Result<()> {
        self.store.set_epoch_deadline(self.timeout_ticks);
        match self.bindings.call_handle(&mut self.store, events) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(anyhow!("the projection failed: {message}")),
            Err(error) => Err(self.describe_trap(error)),
        }
    }

    /// A trap's message, with the sandbox's reasons and the guest's panic message spelled out.
    fn describe_trap(&mut self, error: wasmtime::Error) -> anyhow::Error {
        let state = self.store.data_mut();
        if state.limits.exceeded {
            return anyhow!(
                "the projection exceeded its memory limit of {} MiB",
                state.limits.memory_bytes >> 20
            );
        }
        let panic = state
            .batch
            .panic
            .take()
            .map(|message| format!(" ({})", message.replace('\n', " ")))
            .unwrap_or_default();
        match error.downcast_ref::<wasmtime::Trap>().copied() {
            Some(wasmtime::Trap::Interrupt) => anyhow!(
                "the projection ran longer than its limit of {} ms for one call",
                self.timeout_ticks * EPOCH_TICK.as_millis() as u64
            ),
            Some(trap) => anyhow!("the projection trapped: {trap}{panic}"),
            None => anyhow!(
                "the projection failed: {}{panic}",
                anyhow::Error::from(error)
            ),
        }
    }

    /// Starts a new batch that reads through `view` where it has not written.
    pub fn begin(&mut self, view: ProjectionView, emitted_before: u64) {
        let batch = &mut self.store.data_mut().batch;
        batch.clear();
        batch.view = Some(view);
        batch.emitted_before = emitted_before;
    }

    /// Takes the batch's writes, leaving it empty.
    pub fn take(&mut self) -> Writes {
        let batch = &mut self.store.data_mut().batch;
        let writes = Writes {
            states: batch.states.drain().collect(),
            rows: batch.rows.drain().collect(),
            emits: std::mem::take(&mut batch.emits),
            links: std::mem::take(&mut batch.links),
        };
        batch.clear();
        writes
    }
}

/// What a batch wrote.
#[derive(Debug, Default)]
pub struct Writes {
    pub states: Vec<(String, Vec<u8>)>,
    pub rows: Vec<RowChange>,
    pub emits: Vec<(String, NewEvent)>,
    pub links: Vec<(String, u64)>,
}

/// The memory limit, remembering whether a guest hit it (it then usually traps while
/// handling the failed allocation, which would hide the cause).
struct Limits {
    memory_bytes: usize,
    exceeded: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes;
        self.exceeded |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
    batch: Batch,
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
    states: HashMap<String, Vec<u8>>,
    rows: HashMap<(String, String), Option<Vec<u8>>>,
    emits: Vec<(String, NewEvent)>,
    links: Vec<(String, u64)>,
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
            states: HashMap::new(),
            rows: HashMap::new(),
            emits: Vec::new(),
            links: Vec::new(),
            emitted_before: 0,
            bytes: 0,
            panic: None,
        }
    }

    fn clear(&mut self) {
        self.view = None;
        self.states.clear();
        self.rows.clear();
        self.emits.clear();
        self.links.clear();
        self.bytes = 0;
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
        if let Some(state) = self.batch.states.get(&partition) {
            return Ok(Some(state.clone()));
        }
        Ok(self.batch.view()?.state(&partition)?)
    }

    fn set_state(&mut self, partition: String, state: Vec<u8>) -> wasmtime::Result<()> {
        self.batch.account(partition.len() + state.len())?;
        self.batch.states.insert(partition, state);
        Ok(())
    }

    fn table_get(&mut self, table: String, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(row) = self.batch.rows.get(&(table.clone(), key.clone())) {
            return Ok(row.clone());
        }
        Ok(self.batch.view()?.row(&table, &key)?)
    }

    fn table_put(&mut self, table: String, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        validate_row_address(&table, &key)?;
        self.batch.account(table.len() + key.len() + value.len())?;
        self.batch.rows.insert((table, key), Some(value));
        Ok(())
    }

    fn table_delete(&mut self, table: String, key: String) -> wasmtime::Result<()> {
        self.batch.account(table.len() + key.len())?;
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
        self.batch.emits.push((stream, event));
        Ok(Ok(()))
    }

    fn link_to(&mut self, stream: String, position: u64) -> wasmtime::Result<Result<(), String>> {
        if let Err(reason) = validate_stream_name(&stream) {
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
        let message: String = message.chars().take(4096).collect();
        tracing::info!(projection = %self.batch.setup.projection, "{message}");
        if message.starts_with("panicked at") {
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
    validate_stream_name(stream)?;
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
