//! The loop that runs one Wasm projection: read a batch of the log past its checkpoint, hand the
//! events its source and types select to the guest, and commit the guest's writes with the new
//! checkpoint in one writer request. Then again, or wait for the head to move.
//!
//! A failing batch (error result, trap, deadline, memory limit, or a commit the store refuses) is
//! run again one event at a time on a fresh instance to find the event that fails; the events
//! before it are committed. Then, by the projection's `on_error`: it faults at that event's
//! position (`stop`), or sets the event aside in its parked stream and goes on (`skip`), or does
//! that and holds the event's partition (`park`): the partition's later events are set aside
//! too, in log order, before the guest sees a batch, so nothing of a held partition is applied
//! out of order while the other partitions go on.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

mod parallel;

use super::component::{
    Compiled, Event, Instance, InstanceSetup, Partitioning, Runtime, Source, Writes,
};
use super::{Emitted, Fault, Mode, OnError};
use crate::metrics::RateMeter;
use crate::sandbox::{GuestKind, GuestLog};
use crate::store::EventRecord;
use crate::store::IndexConfig;
use crate::store::{Checkpoint, DataChange, ParkedEvent, ProjectionCommit};
use crate::store::{Store, StoreError};
pub(crate) use parallel::ParallelCounts;
use parallel::{NotParallel, WINDOW_EVENTS, Workers};

/// Most events one commit covers.
const BATCH_EVENTS: usize = 4096;
/// Most payload bytes one commit covers.
const BATCH_BYTES: usize = 16 << 20;
/// Most log positions one batch scans, so a sparse source still checkpoints as it goes.
const BATCH_SCAN: u64 = 100_000;
/// Events per guest call.
const CALL_EVENTS: usize = 2048;

/// What the projection's definition says about running it, persisted with the projection.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Definition {
    pub version: u64,
    pub mode: Mode,
    pub emit: bool,
    pub enabled: bool,
    pub fault: Option<Fault>,
    pub completed: bool,
    /// What the switch to this version does with the live version's emitted streams.
    #[serde(default)]
    pub emitted: Emitted,
    #[serde(default)]
    pub on_error: OnError,
}

/// A projection's state shared between its runner and the API.
pub(super) struct Live {
    pub name: String,
    pub state: Mutex<LiveState>,
}

impl Live {
    pub fn new(
        name: String,
        definition: Definition,
        component: String,
        data: u64,
        checkpoint: Checkpoint,
    ) -> Arc<Live> {
        Arc::new(Live {
            name,
            state: Mutex::new(LiveState {
                definition,
                component,
                data,
                checkpoint,
                running: false,
                rate: RateMeter::new(0),
                parallel: ParallelCounts::default(),
            }),
        })
    }
}

pub(super) struct LiveState {
    pub definition: Definition,
    pub component: String,
    pub data: u64,
    pub checkpoint: Checkpoint,
    /// A runner is working on it.
    pub running: bool,
    pub rate: RateMeter,
    /// How the runner's batches ran on the partition workers.
    pub parallel: ParallelCounts,
}

/// What a runner works on.
pub(super) enum Role {
    /// The version queries read.
    Live,
    /// A version rebuilt beside the live one: its emits and links wait in the shadow tables,
    /// its fault stays with the build, and once caught up it asks (on `switch`, with its data
    /// id) to replace the live version.
    Build {
        switch: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
    },
}

/// Everything a runner needs; it owns nothing else.
pub(super) struct Runner {
    pub role: Role,
    pub live: Arc<Live>,
    pub store: Store,
    pub runtime: Runtime,
    pub compiled: Compiled,
    pub index_config: IndexConfig,
    pub cancel: CancellationToken,
    pub handle: Handle,
    /// Partitions held behind a parked event (`on_error: park`): partition → its position.
    pub held: Mutex<BTreeMap<String, u64>>,
}

/// Which events the guest is handed.
struct Filter {
    source: Source,
    types: HashSet<String>,
    config: IndexConfig,
}

impl Filter {
    fn selects(&self, event: &EventRecord) -> bool {
        if event.stream.starts_with('$') {
            return false;
        }
        if !self.types.is_empty() && !self.types.contains(event.event_type) {
            return false;
        }
        match &self.source {
            Source::All => true,
            Source::Streams(streams) => streams.iter().any(|stream| stream == event.stream),
            Source::Categories(categories) => self
                .config
                .category(event.stream)
                .is_some_and(|category| categories.iter().any(|wanted| wanted == category)),
        }
    }
}

fn to_guest(position: u64, record: &EventRecord) -> Event {
    Event {
        stream: record.stream.to_owned(),
        revision: record.revision,
        position,
        id: record.id.hyphenated().to_string(),
        event_type: record.event_type.to_owned(),
        data: record.data.to_vec(),
        metadata: record.metadata.to_vec(),
        created_ms: record.created_ms,
    }
}

/// Why a batch did not commit.
enum Failure {
    /// The projection's fault: it stops at this event.
    Fault(Fault),
    /// The store is shutting down; the batch will be replayed after the restart.
    ShuttingDown,
}

impl Runner {
    /// Runs until cancelled, faulted, or (one-time mode) caught up.
    pub fn run(self) {
        let name = self.live.name.clone();
        let (data, may_emit, mode, mut checkpoint) = {
            let state = self.live.state.lock().expect("projection state");
            (
                state.data,
                state.definition.emit,
                state.definition.mode,
                state.checkpoint,
            )
        };
        let setup = InstanceSetup {
            log: GuestLog::new(GuestKind::Projection, &name),
            projection: name,
            data,
            may_emit,
            index_config: self.index_config.clone(),
        };
        match self
            .store
            .projection_view(data)
            .and_then(|view| view.held_partitions())
        {
            Ok(held) => *self.held.lock().expect("held partitions") = held.into_iter().collect(),
            Err(error) => {
                return self.fault(Fault {
                    message: format!("cannot read the held partitions: {error}"),
                    position: checkpoint.position,
                });
            }
        }
        let mut instance = match Instance::new(&self.runtime, self.compiled.pre(), setup.clone()) {
            Ok(instance) => instance,
            Err(error) => {
                return self.fault(Fault {
                    message: format!("{error:#}"),
                    position: checkpoint.position,
                });
            }
        };
        // The log is read one batch ahead on another thread, so the guest never waits for it.
        let reading = self.cancel.child_token();
        let _stop_reading = reading.clone().drop_guard();
        let (batches, feed) = std::sync::mpsc::sync_channel(1);
        // Emptied batches go back to the reader, whose next batch reuses their memory instead
        // of having fresh pages zeroed for it.
        let (recycle, recycled) = std::sync::mpsc::channel();
        let reader = ReadAhead {
            store: self.store.clone(),
            filter: Filter {
                source: self.compiled.info.source.clone(),
                types: self.compiled.info.event_types.iter().cloned().collect(),
                config: self.index_config.clone(),
            },
            from: checkpoint.position,
            cancel: reading,
            handle: self.handle.clone(),
            recycled,
        };
        let reader = std::thread::Builder::new()
            .name("refract-projection-read".into())
            .spawn(move || reader.run(batches));
        if let Err(error) = reader {
            return self.fault(Fault {
                message: format!("cannot start reading: {error}"),
                position: checkpoint.position,
            });
        }
        // Partitioned projections run large batches on several instances, created when first
        // needed and again after a batch failed on them.
        let partitioned = !matches!(self.compiled.info.partitioning, Partitioning::None);
        let in_parallel = partitioned && self.runtime.partition_workers() > 1;
        let mut workers: Option<Workers> = None;
        for batch in feed {
            if self.cancel.is_cancelled() {
                return;
            }
            match batch {
                Feed::CaughtUp => match &self.role {
                    // Keeps going until the switch stops it, so it stays caught up.
                    Role::Build { switch } => {
                        let _ = switch.send((self.live.name.clone(), self.data()));
                    }
                    Role::Live if mode == Mode::OneTime => return self.complete(),
                    Role::Live => {}
                },
                Feed::Failed(message) => {
                    return self.fault(Fault {
                        message,
                        position: checkpoint.position,
                    });
                }
                Feed::Batch { mut events, to } => {
                    let outcome = self.run_batch(
                        &mut instance,
                        &setup,
                        in_parallel.then_some(&mut workers),
                        checkpoint,
                        &mut events,
                        to,
                    );
                    events.clear();
                    let _ = recycle.send(events);
                    match outcome {
                        Ok(next) => {
                            checkpoint = next;
                            let mut state = self.live.state.lock().expect("projection state");
                            state.checkpoint = next;
                            state.rate.record(next.events_processed);
                        }
                        Err(Failure::ShuttingDown) => return,
                        Err(Failure::Fault(fault)) => return self.fault(fault),
                    }
                }
            }
        }
    }

    /// Runs one batch, on the partition workers when there are several and the batch is worth
    /// it, and commits it; returns the new checkpoint.
    fn run_batch(
        &self,
        instance: &mut Instance,
        setup: &InstanceSetup,
        workers: Option<&mut Option<Workers>>,
        checkpoint: Checkpoint,
        events: &mut Vec<Event>,
        to: u64,
    ) -> Result<Checkpoint, Failure> {
        let holding = !self.held.lock().expect("held partitions").is_empty();
        if let Some(workers) = workers.filter(|_| events.len() > WINDOW_EVENTS && !holding) {
            if workers.is_none() {
                *workers = Workers::new(self, setup).ok();
            }
            if let Some(running) = workers {
                match self.process_in_parallel(running, checkpoint, events, to) {
                    Ok(next) => return Ok(next),
                    Err(NotParallel::ShuttingDown) => return Err(Failure::ShuttingDown),
                    // The batch runs again in log order, which finds the fault; the workers'
                    // instances are not trusted again.
                    Err(NotParallel::Failed) => *workers = None,
                }
            }
        }
        self.process(instance, setup, checkpoint, events, to, Vec::new())
    }

    /// Runs one batch in log order and commits it; returns the new checkpoint. `parked` are
    /// events of the batch already set aside (held behind an event parked earlier in it).
    fn process(
        &self,
        instance: &mut Instance,
        setup: &InstanceSetup,
        checkpoint: Checkpoint,
        events: &[Event],
        scanned_to: u64,
        mut parked: Vec<ParkedEvent>,
    ) -> Result<Checkpoint, Failure> {
        let runnable = self.set_aside_held(instance, checkpoint, events, &mut parked)?;
        let outcome = self
            .run_events(instance, checkpoint, &runnable)
            .and_then(|()| {
                let writes = instance.take();
                let processed = runnable.len() + parked.len();
                self.commit_writes(checkpoint, processed, scanned_to, writes, parked.clone())
            });
        match outcome {
            Ok(next) => Ok(next),
            Err(Failure::ShuttingDown) => Err(Failure::ShuttingDown),
            Err(Failure::Fault(fault)) => self.recover(
                instance, setup, checkpoint, &runnable, scanned_to, parked, fault,
            ),
        }
    }

    /// The events of `events` the guest is to handle: those of held partitions are added to
    /// `parked` (in log order) instead.
    fn set_aside_held<'e>(
        &self,
        instance: &mut Instance,
        checkpoint: Checkpoint,
        events: &'e [Event],
        parked: &mut Vec<ParkedEvent>,
    ) -> Result<Cow<'e, [Event]>, Failure> {
        let held = self.held.lock().expect("held partitions").clone();
        if held.is_empty() {
            return Ok(Cow::Borrowed(events));
        }
        let mut runnable = Vec::with_capacity(events.len());
        for event in events {
            let partition = self.partition_of(instance, event, checkpoint)?;
            match partition.and_then(|partition| Some((held.get(&partition)?, partition))) {
                Some((&holder, partition)) => parked.push(ParkedEvent {
                    position: event.position,
                    reason: reason(
                        event,
                        OnError::Park,
                        &format!("held behind the event parked at position {holder}"),
                        Some(&partition),
                    ),
                    holds: None,
                }),
                None => runnable.push(event.clone()),
            }
        }
        parked.sort_by_key(|event| event.position);
        Ok(Cow::Owned(runnable))
    }

    /// The partition an event belongs to; `None` when a custom key gives it none.
    fn partition_of(
        &self,
        instance: &mut Instance,
        event: &Event,
        checkpoint: Checkpoint,
    ) -> Result<Option<String>, Failure> {
        Ok(match self.compiled.info.partitioning {
            Partitioning::None => Some(String::new()),
            Partitioning::ByStream => Some(event.stream.clone()),
            Partitioning::Custom => {
                // The guest computes the key again when it handles the event: what it prints
                // then is what is logged.
                instance.set_quiet(true);
                let key = instance.partition_key(event);
                instance.set_quiet(false);
                key.map_err(|error| {
                    Failure::Fault(Fault {
                        message: one_line(&format!("cannot compute a partition: {error:#}")),
                        position: event.position.max(checkpoint.position),
                    })
                })?
            }
        })
    }

    /// Starts a batch on `instance` that reads the data as committed now.
    fn begin(&self, instance: &mut Instance, checkpoint: Checkpoint) -> Result<(), Failure> {
        let view = self
            .store
            .projection_view(self.data())
            .map_err(|error| storage_failure(error, checkpoint.position))?;
        instance.begin(view, checkpoint.events_emitted);
        Ok(())
    }

    fn run_events(
        &self,
        instance: &mut Instance,
        checkpoint: Checkpoint,
        events: &[Event],
    ) -> Result<(), Failure> {
        self.begin(instance, checkpoint)?;
        for chunk in events.chunks(CALL_EVENTS) {
            instance.handle(chunk).map_err(|error| {
                Failure::Fault(Fault {
                    message: format!("{error:#}"),
                    position: chunk[0].position,
                })
            })?;
        }
        Ok(())
    }

    fn commit_writes(
        &self,
        checkpoint: Checkpoint,
        processed: usize,
        to: u64,
        mut writes: Writes,
        parked: Vec<ParkedEvent>,
    ) -> Result<Checkpoint, Failure> {
        let next = Checkpoint {
            position: to,
            events_processed: checkpoint.events_processed + processed as u64,
            events_emitted: checkpoint.events_emitted + writes.emits.len() as u64,
        };
        let shadow = matches!(self.role, Role::Build { .. });
        let keeps_emitted = self
            .live
            .state
            .lock()
            .expect("projection state")
            .definition
            .emitted
            == Emitted::Keep;
        if shadow && keeps_emitted {
            // The switch keeps the live version's emitted streams: what this version emitted
            // for the events before it is not kept (the ids stay numbered as if it were).
            writes.emits.clear();
            writes.links.clear();
        }
        let commit = ProjectionCommit {
            projection: self.live.name.clone(),
            data: self.data(),
            from: checkpoint.position,
            checkpoint: next,
            states: writes.states,
            rows: writes.rows,
            emits: writes.emits,
            links: writes.links,
            parked,
            shadow,
        };
        match self.handle.block_on(self.store.commit_projection(commit)) {
            Ok(()) => Ok(next),
            Err(StoreError::ShuttingDown) => Err(Failure::ShuttingDown),
            Err(error) => Err(Failure::Fault(Fault {
                message: format!("the store refused the projection's batch: {error}"),
                position: checkpoint.position,
            })),
        }
    }

    /// Finds the event a failed batch fails on and commits what comes before it; then faults at
    /// that event, or sets it aside and goes on with the rest of the batch, as `on_error` says.
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &self,
        instance: &mut Instance,
        setup: &InstanceSetup,
        checkpoint: Checkpoint,
        events: &[Event],
        scanned_to: u64,
        parked: Vec<ParkedEvent>,
        batch_fault: Fault,
    ) -> Result<Checkpoint, Failure> {
        let fresh = || {
            Instance::new(&self.runtime, self.compiled.pre(), setup.clone()).map_err(|error| {
                Failure::Fault(Fault {
                    message: format!("{error:#}"),
                    position: batch_fault.position,
                })
            })
        };
        // A trapped instance is not trusted again. The replays log nothing: the batch's run
        // logged the lines of these events already.
        *instance = fresh()?;
        instance.set_quiet(true);
        self.begin(instance, checkpoint)?;
        let mut failing = None;
        for (index, event) in events.iter().enumerate() {
            if let Err(error) = instance.handle_event(event) {
                failing = Some((index, error));
                break;
            }
        }
        *instance = fresh()?;
        let Some((index, error)) = failing else {
            // Every event passes on its own: the store refused the batch's writes.
            return Err(Failure::Fault(batch_fault));
        };
        let event = &events[index];
        let message = one_line(&format!("{error:#}"));
        let on_error = self
            .live
            .state
            .lock()
            .expect("projection state")
            .definition
            .on_error;
        let (mut before, after): (Vec<ParkedEvent>, Vec<ParkedEvent>) = parked
            .into_iter()
            .partition(|parked| parked.position < event.position);
        let upto = match on_error {
            OnError::Stop => event.position,
            OnError::Skip | OnError::Park => {
                let holds = match on_error {
                    OnError::Park => self.partition_of(instance, event, checkpoint)?,
                    _ => None,
                };
                tracing::warn!(projection = %self.live.name, position = event.position, ?on_error, %message, "projection set an event aside");
                before.push(ParkedEvent {
                    position: event.position,
                    reason: reason(event, on_error, &message, holds.as_deref()),
                    holds: holds.clone(),
                });
                if let Some(partition) = holds {
                    self.held
                        .lock()
                        .expect("held partitions")
                        .insert(partition, event.position);
                }
                event.position + 1
            }
        };
        let committed = &events[..index];
        let next = if committed.is_empty() && before.is_empty() {
            checkpoint
        } else {
            instance.set_quiet(true);
            let ran = self.run_events(instance, checkpoint, committed);
            instance.set_quiet(false);
            ran?;
            let writes = instance.take();
            let processed = committed.len() + before.len();
            let next = self.commit_writes(checkpoint, processed, upto, writes, before)?;
            let mut state = self.live.state.lock().expect("projection state");
            state.checkpoint = next;
            state.rate.record(next.events_processed);
            next
        };
        if on_error == OnError::Stop {
            return Err(Failure::Fault(Fault {
                message,
                position: event.position,
            }));
        }
        let rest = &events[index + 1..];
        if rest.is_empty() && after.is_empty() {
            // Nothing left but positions without selected events.
            if next.position == scanned_to {
                return Ok(next);
            }
            let writes = instance.take();
            return self.commit_writes(next, 0, scanned_to, writes, Vec::new());
        }
        self.process(instance, setup, next, rest, scanned_to, after)
    }

    fn data(&self) -> u64 {
        self.live.state.lock().expect("projection state").data
    }

    fn fault(&self, fault: Fault) {
        let fault = Fault {
            message: one_line(&fault.message),
            ..fault
        };
        tracing::warn!(projection = %self.live.name, position = fault.position, message = %fault.message, rebuild = matches!(self.role, Role::Build { .. }), "projection faulted");
        match self.role {
            Role::Live => self.save(|definition| definition.fault = Some(fault)),
            // The stored definition is the live version's; a build's fault is reported, and
            // found again if the build is resumed after a restart.
            Role::Build { .. } => {
                self.live
                    .state
                    .lock()
                    .expect("projection state")
                    .definition
                    .fault = Some(fault);
            }
        }
    }

    fn complete(&self) {
        tracing::info!(projection = %self.live.name, "one-time projection completed");
        self.save(|definition| definition.completed = true);
    }

    /// Changes the definition and persists it.
    fn save(&self, change: impl FnOnce(&mut Definition)) {
        let (definition, component) = {
            let mut state = self.live.state.lock().expect("projection state");
            change(&mut state.definition);
            (state.definition.clone(), state.component.clone())
        };
        let json = serde_json::to_value(&definition).expect("a definition is JSON");
        let saved = self.handle.block_on(self.store.save_projection(
            self.live.name.clone(),
            component,
            json,
            None,
            DataChange::Keep,
        ));
        if let Err(error) = saved {
            tracing::error!(projection = %self.live.name, %error, "cannot save the projection's status");
        }
    }
}

/// A message on one line, as logs and statuses show it.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Why an event was set aside, as the parked stream's reasons show it.
fn reason(event: &Event, on_error: OnError, error: &str, partition: Option<&str>) -> Vec<u8> {
    let reason = serde_json::json!({
        "stream": event.stream,
        "revision": event.revision,
        "type": event.event_type,
        "on_error": on_error,
        "error": error,
        "partition": partition,
    });
    serde_json::to_vec(&reason).expect("a reason is JSON")
}

fn storage_failure(error: StoreError, position: u64) -> Failure {
    match error {
        StoreError::ShuttingDown => Failure::ShuttingDown,
        error => Failure::Fault(Fault {
            message: format!("storage failure: {error}"),
            position,
        }),
    }
}

/// What the read-ahead thread hands the runner.
enum Feed {
    /// The selected events of the next stretch of the log, which ends before `to`.
    Batch {
        events: Vec<Event>,
        to: u64,
    },
    /// Everything up to the head at that moment has been handed over.
    CaughtUp,
    Failed(String),
}

/// Reads the log ahead of the runner: batches in order, contiguous, then waits for the head.
struct ReadAhead {
    store: Store,
    filter: Filter,
    from: u64,
    cancel: CancellationToken,
    handle: Handle,
    /// Batches the runner is done with, to fill again.
    recycled: std::sync::mpsc::Receiver<Vec<Event>>,
}

impl ReadAhead {
    fn run(mut self, batches: std::sync::mpsc::SyncSender<Feed>) {
        let mut head = self.store.watch_head();
        while !self.cancel.is_cancelled() {
            let head_position = *head.borrow_and_update();
            if self.from >= head_position {
                if batches.send(Feed::CaughtUp).is_err() {
                    return;
                }
                self.handle.block_on(async {
                    tokio::select! {
                        _ = head.changed() => {}
                        _ = self.cancel.cancelled() => {}
                    }
                });
                continue;
            }
            let events = self
                .recycled
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(BATCH_EVENTS));
            let feed = match read_batch(&self.store, &self.filter, events, self.from, head_position)
            {
                Ok((events, to)) => {
                    self.from = to;
                    Feed::Batch { events, to }
                }
                Err(error) => Feed::Failed(format!("cannot read the log: {error}")),
            };
            let failed = matches!(feed, Feed::Failed(_));
            if batches.send(feed).is_err() || failed {
                return;
            }
        }
    }
}

/// The events past `from` that the filter selects, and the position the batch covers up to.
fn read_batch(
    store: &Store,
    filter: &Filter,
    mut events: Vec<Event>,
    from: u64,
    head: u64,
) -> Result<(Vec<Event>, u64), StoreError> {
    let to = head.min(from.saturating_add(BATCH_SCAN));
    let mut bytes = 0;
    let mut scanned_to = to;
    store.scan_log(from, to, |position, record| {
        if filter.selects(&record) {
            bytes += record.data.len() + record.metadata.len();
            events.push(to_guest(position, &record));
            if events.len() >= BATCH_EVENTS || bytes >= BATCH_BYTES {
                scanned_to = position + 1;
                return false;
            }
        }
        true
    })?;
    Ok((events, scanned_to))
}

pub(super) fn restart_rate(live: &Live) {
    let mut state = live.state.lock().expect("projection state");
    state.rate = RateMeter::new(state.checkpoint.events_processed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(stream: &'a str, event_type: &'a str) -> EventRecord<'a> {
        EventRecord {
            stream,
            revision: 0,
            created_ms: 0,
            id: uuid::Uuid::nil(),
            event_type,
            metadata: b"",
            data: b"{}",
            binary: false,
        }
    }

    fn filter(source: Source, types: &[&str]) -> Filter {
        Filter {
            source,
            types: types.iter().map(|name| (*name).to_owned()).collect(),
            config: IndexConfig::default(),
        }
    }

    #[test]
    fn sources_and_types_select_events_before_the_guest_sees_them() {
        let all = filter(Source::All, &[]);
        assert!(all.selects(&record("order-1", "A")));
        assert!(
            !all.selects(&record("$ce-order", "A")),
            "$-streams are not user events"
        );

        let streams = filter(Source::Streams(vec!["order-1".into(), "cart".into()]), &[]);
        assert!(streams.selects(&record("order-1", "A")));
        assert!(streams.selects(&record("cart", "A")));
        assert!(!streams.selects(&record("order-12", "A")));

        let categories = filter(
            Source::Categories(vec!["order".into()]),
            &["Placed", "Paid"],
        );
        assert!(categories.selects(&record("order-1", "Placed")));
        assert!(categories.selects(&record("order-1-x", "Paid")));
        assert!(
            !categories.selects(&record("order-1", "Shipped")),
            "type filter"
        );
        assert!(!categories.selects(&record("orders-1", "Placed")));
        assert!(
            !categories.selects(&record("order", "Placed")),
            "no category without a separator"
        );
    }
}
