//! The single writer: group commit of queued requests, one redb write transaction and one fsync
//! per batch.
//!
//! Every request in a batch is validated against the state the transaction sees so far (so two
//! appends to one stream in one batch see each other) before it writes anything, which keeps a
//! rejected request from leaving a partial write. A storage failure aborts the whole transaction
//! and fails every request of the batch: nothing of it is visible, nothing is acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use super::group_data::{GroupTables, Parking};
use super::indexes::{
    CursorTable, IndexConfig, IndexProgress, IndexTables, Indexer, Outputs, SystemIndex,
};
use super::projection_data::{
    BuildChange, Building, DataChange, ProjectionCommit, ProjectionTables, StoredProjection,
};
use super::record::{EventRecord, StreamState};
use super::{
    AppendOutcome, CLIENT_STREAMS, ExpectedRevision, INDEX_CONFIG, INDEX_CURSORS, LINKS, LOG, META,
    NEXT_STREAM_ID, NewEvent, SETTINGS, STREAM_INDEX, STREAMS, StoreError, StoreOptions,
    StreamMetadata, load_stream, validate_stream_name,
};
use crate::metrics::Metrics;

/// Requests waiting for the writer; senders wait when it is full, which is the backpressure.
pub(super) const QUEUE_CAPACITY: usize = 8192;
/// A batch stops taking queued requests once it holds this many payload bytes.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// With fsync turned off, still make the database durable this often.
const NON_DURABLE_SYNC_INTERVAL: Duration = Duration::from_secs(1);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Request {
    Append {
        stream: String,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
        reply: Reply<AppendOutcome>,
    },
    SetMetadata {
        stream: String,
        metadata: StreamMetadata,
        reply: Reply<()>,
    },
    Delete {
        stream: String,
        expected: ExpectedRevision,
        hard: bool,
        reply: Reply<()>,
    },
    SetIndexRunning {
        index: SystemIndex,
        running: bool,
        reply: Reply<()>,
    },
    ResetIndex {
        index: SystemIndex,
        reply: Reply<()>,
    },
    SetIndexConfig {
        config: IndexConfig,
        reply: Reply<()>,
    },
    SaveProjection {
        name: String,
        component: String,
        definition: serde_json::Value,
        /// The component's bytes, when it may not be stored yet.
        component_bytes: Option<Vec<u8>>,
        data: DataChange,
        reply: Reply<u64>,
    },
    RemoveProjection {
        name: String,
        delete_outputs: bool,
        reply: Reply<()>,
    },
    CommitProjection {
        commit: ProjectionCommit,
        reply: Reply<()>,
    },
    BuildProjection {
        name: String,
        change: BuildChange,
        reply: Reply<u64>,
    },
    SaveSharder {
        name: String,
        component: String,
        component_bytes: Vec<u8>,
        reply: Reply<()>,
    },
    RemoveSharder {
        name: String,
        reply: Reply<()>,
    },
    SaveGroup {
        stream: String,
        group: String,
        record: Vec<u8>,
        reply: Reply<()>,
    },
    RemoveGroup {
        stream: String,
        group: String,
        parked_stream: String,
        reply: Reply<()>,
    },
    ParkMessages {
        parking: Parking,
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

impl Request {
    fn payload_bytes(&self) -> usize {
        match self {
            Request::Append { events, .. } => events.iter().map(NewEvent::size).sum(),
            Request::SaveProjection {
                component_bytes, ..
            } => component_bytes.as_ref().map_or(0, Vec::len),
            Request::CommitProjection { commit, .. } => commit.payload_bytes(),
            Request::BuildProjection {
                change:
                    BuildChange::Start {
                        component_bytes: Some(bytes),
                        ..
                    },
                ..
            } => bytes.len(),
            Request::SaveSharder {
                component_bytes, ..
            } => component_bytes.len(),
            _ => 0,
        }
    }

    /// Whether the commit holding this request must reach the disk before it is answered.
    /// A projection's batch without emitted events needs no fsync of its own: its effects and
    /// checkpoint commit together, so a crash merely rewinds it and it replays to the same result.
    fn needs_fsync(&self) -> bool {
        match self {
            // A rebuild's emits wait in the shadow tables, which replay as the state does.
            Request::CommitProjection { commit, .. } => !commit.shadow && !commit.emits.is_empty(),
            _ => true,
        }
    }

    fn answer(self, answer: Result<Answer, StoreError>) {
        // A caller that went away no longer needs its answer; the write stands regardless.
        match self {
            Request::Append { reply, .. } => {
                let _ = reply.send(answer.map(|answer| match answer {
                    Answer::Appended(outcome) => outcome,
                    _ => unreachable!("an append answers with its outcome"),
                }));
            }
            Request::SaveProjection { reply, .. } | Request::BuildProjection { reply, .. } => {
                let _ = reply.send(answer.map(|answer| match answer {
                    Answer::DataId(data) => data,
                    _ => unreachable!("a saved projection answers with its data id"),
                }));
            }
            Request::SetMetadata { reply, .. }
            | Request::Delete { reply, .. }
            | Request::SetIndexRunning { reply, .. }
            | Request::ResetIndex { reply, .. }
            | Request::SetIndexConfig { reply, .. }
            | Request::RemoveProjection { reply, .. }
            | Request::CommitProjection { reply, .. }
            | Request::SaveSharder { reply, .. }
            | Request::RemoveSharder { reply, .. }
            | Request::SaveGroup { reply, .. }
            | Request::RemoveGroup { reply, .. }
            | Request::ParkMessages { reply, .. }
            | Request::Shutdown { reply } => {
                let _ = reply.send(answer.map(|_| ()));
            }
        }
    }
}

enum Answer {
    Appended(AppendOutcome),
    DataId(u64),
    Done,
}

/// One answer per request of a batch: rejected requests wrote nothing.
type Answers = Vec<Result<Answer, StoreError>>;

/// What the writer continues from when a store opens.
pub(super) struct Recovered {
    pub next_position: u64,
    pub next_stream_id: u64,
    pub indexer: Indexer,
}

/// Creates the tables of a new store and reads what the writer continues from. A `config` that
/// differs from the stored one replaces it and resets the indexes it changes.
pub(super) fn initialize(db: &Database, options: &StoreOptions) -> Result<Recovered, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(options.quick_repair);
    let recovered = {
        let mut tables = Tables::open(&txn)?;
        let next_position = tables
            .log
            .last()?
            .map_or(0, |(position, _)| position.value() + 1);
        let next_stream_id = tables.meta.get(NEXT_STREAM_ID)?.map_or(0, |id| id.value());
        let stored_config = match tables.settings.get(INDEX_CONFIG)? {
            Some(json) => serde_json::from_slice(json.value()).map_err(StoreError::storage)?,
            None => IndexConfig::default(),
        };
        let cursors = Indexer::load_cursors(&tables.indexes)?;
        let mut indexer = Indexer::new(stored_config, cursors);
        if let Some(config) = &options.index_config {
            set_index_config(&mut indexer, &mut tables, config)?;
        }
        // Created here so readers can open them before the first projection or group exists.
        ProjectionTables::open(&txn)?;
        GroupTables::open(&txn)?;
        Recovered {
            next_position,
            next_stream_id,
            indexer,
        }
    };
    txn.commit()?;
    Ok(recovered)
}

fn set_index_config(
    indexer: &mut Indexer,
    tables: &mut Tables,
    config: &IndexConfig,
) -> Result<(), StoreError> {
    config.validate().map_err(StoreError::InvalidRequest)?;
    let affected = indexer.config.affected_by(config);
    indexer.config = config.clone();
    let json = serde_json::to_vec(config).map_err(StoreError::storage)?;
    tables.settings.insert(INDEX_CONFIG, json.as_slice())?;
    for index in affected {
        indexer.reset(index, &mut tables.for_indexes())?;
    }
    Ok(())
}

struct Tables<'txn> {
    log: Table<'txn, u64, &'static [u8]>,
    streams: Table<'txn, &'static str, &'static [u8]>,
    stream_index: Table<'txn, (u64, u64), u64>,
    links: Table<'txn, (u64, u64), &'static [u8]>,
    meta: Table<'txn, &'static str, u64>,
    indexes: CursorTable<'txn>,
    settings: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            log: txn.open_table(LOG)?,
            streams: txn.open_table(STREAMS)?,
            stream_index: txn.open_table(STREAM_INDEX)?,
            links: txn.open_table(LINKS)?,
            meta: txn.open_table(META)?,
            indexes: txn.open_table(INDEX_CURSORS)?,
            settings: txn.open_table(SETTINGS)?,
        })
    }

    fn for_indexes(&mut self) -> IndexTables<'_, 'txn> {
        IndexTables {
            log: &self.log,
            streams: &mut self.streams,
            stream_index: &self.stream_index,
            links: &mut self.links,
            cursors: &mut self.indexes,
        }
    }

    fn stream_state(&self, stream: &str) -> Result<Option<StreamState>, StoreError> {
        load_stream(&self.streams, &self.stream_index, &self.links, stream)
    }
}

pub(super) struct Writer {
    db: Arc<Database>,
    options: StoreOptions,
    metrics: Arc<Metrics>,
    head: watch::Sender<u64>,
    next_position: u64,
    next_stream_id: u64,
    indexer: Indexer,
    /// Where status queries read the indexes' progress.
    index_progress: Arc<Mutex<[IndexProgress; 4]>>,
    last_durable_commit: Instant,
    record_buffer: Vec<u8>,
}

impl Writer {
    pub(super) fn new(
        db: Arc<Database>,
        options: StoreOptions,
        metrics: Arc<Metrics>,
        head: watch::Sender<u64>,
        recovered: Recovered,
        index_progress: Arc<Mutex<[IndexProgress; 4]>>,
    ) -> Self {
        let mut writer = Writer {
            db,
            options,
            metrics,
            head,
            next_position: recovered.next_position,
            next_stream_id: recovered.next_stream_id,
            indexer: recovered.indexer,
            index_progress,
            last_durable_commit: Instant::now(),
            record_buffer: Vec::new(),
        };
        writer.publish_index_progress();
        writer
    }

    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        loop {
            // While an index is behind, catching up is work to do between requests.
            let first = if self.indexer.behind(self.next_position) {
                match queue.try_recv() {
                    Ok(request) => Some(request),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match queue.blocking_recv() {
                    Some(request) => Some(request),
                    None => return,
                }
            };
            let mut shutdown = None;
            let mut bytes = first.as_ref().map_or(0, Request::payload_bytes);
            let mut next = first;
            while let Some(request) = next.take() {
                if let Request::Shutdown { .. } = request {
                    shutdown = Some(request);
                    break;
                }
                batch.push(request);
                if bytes < MAX_BATCH_BYTES {
                    next = queue.try_recv().ok();
                    bytes += next.as_ref().map_or(0, Request::payload_bytes);
                }
            }
            if shutdown.is_none() || !batch.is_empty() {
                self.commit(&mut batch, shutdown.is_some());
            }
            if let Some(shutdown) = shutdown {
                if !self.options.durable || self.indexer.behind(self.next_position) {
                    // Non-durable commits only reach the disk with a later durable one.
                    let result =
                        self.db
                            .begin_write()
                            .map_err(StoreError::from)
                            .and_then(|mut txn| {
                                txn.set_quick_repair(self.options.quick_repair);
                                txn.commit().map_err(StoreError::from)
                            });
                    if let Err(error) = &result {
                        tracing::error!(%error, "final durable commit failed");
                    }
                }
                shutdown.answer(Ok(Answer::Done));
                return;
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Request>, force_durable: bool) {
        let started = Instant::now();
        let (position_before, stream_id_before) = (self.next_position, self.next_stream_id);
        let (cursors_before, config_before) = (self.indexer.cursors, self.indexer.config.clone());
        // A bug must cost one batch, not the writer: a panic aborts the transaction like an error.
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.write(batch, force_durable)
        }))
        .unwrap_or_else(|_| {
            Err(StoreError::Storage(
                "the writer panicked on this batch".into(),
            ))
        });
        match written {
            Ok(answers) => {
                let appends = answers
                    .iter()
                    .filter(|answer| matches!(answer, Ok(Answer::Appended(_))))
                    .count();
                let events = self.next_position - position_before;
                if !batch.is_empty() {
                    self.metrics
                        .record_commit(appends as u64, events, started.elapsed());
                }
                let head = self.next_position;
                // Subscribers wake for new events only, not for index-only commits.
                self.head
                    .send_if_modified(|published| std::mem::replace(published, head) != head);
                self.publish_index_progress();
                for (request, answer) in batch.drain(..).zip(answers) {
                    request.answer(answer);
                }
            }
            Err(error) => {
                tracing::error!(%error, requests = batch.len(), "commit failed; the batch is rejected");
                let index_only = batch.is_empty();
                self.next_position = position_before;
                self.next_stream_id = stream_id_before;
                self.indexer.cursors = cursors_before;
                self.indexer.config = config_before;
                for request in batch.drain(..) {
                    request.answer(Err(StoreError::Storage(error.to_string())));
                }
                if index_only {
                    // An index-only commit failed: do not spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn publish_index_progress(&mut self) {
        let progress = self.indexer.progress();
        *self.index_progress.lock().expect("index progress lock") = progress;
    }

    /// Writes the batch in one transaction, then lets the indexes catch up in the same one.
    /// The outer error aborts everything; inner errors are individual requests that were
    /// rejected without writing.
    fn write(&mut self, batch: &[Request], force_durable: bool) -> Result<Answers, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(self.options.quick_repair);
        // Index-only commits need no fsync of their own: links and checkpoints commit together,
        // so a crash merely rewinds an index to its last durable checkpoint.
        let durable = (self.options.durable && batch.iter().any(Request::needs_fsync))
            || force_durable
            || self.last_durable_commit.elapsed() >= NON_DURABLE_SYNC_INTERVAL;
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(StoreError::storage)?;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        let (position_before, stream_id_before) = (self.next_position, self.next_stream_id);
        let mut answers = Vec::with_capacity(batch.len());
        let mut bytes_written = 0u64;
        {
            let mut tables = Tables::open(&txn)?;
            for request in batch {
                let answer = match request {
                    Request::Append {
                        stream,
                        expected,
                        events,
                        ..
                    } => {
                        bytes_written += request.payload_bytes() as u64;
                        self.append(&mut tables, stream, *expected, events, now_ms)
                            .map(Answer::Appended)
                    }
                    Request::SetMetadata {
                        stream, metadata, ..
                    } => self
                        .set_metadata(&mut tables, stream, metadata)
                        .map(|()| Answer::Done),
                    Request::Delete {
                        stream,
                        expected,
                        hard,
                        ..
                    } => self
                        .delete(&mut tables, stream, *expected, *hard)
                        .map(|()| Answer::Done),
                    Request::SetIndexRunning { index, running, .. } => {
                        let cursor = self.indexer.cursor_mut(*index);
                        cursor.running = *running;
                        let stored = (cursor.running, cursor.checkpoint);
                        tables.indexes.insert(index.name(), stored)?;
                        Ok(Answer::Done)
                    }
                    Request::ResetIndex { index, .. } => self
                        .indexer
                        .reset(*index, &mut tables.for_indexes())
                        .map(|()| Answer::Done),
                    Request::SetIndexConfig { config, .. } => {
                        set_index_config(&mut self.indexer, &mut tables, config)
                            .map(|()| Answer::Done)
                    }
                    Request::SaveProjection {
                        name,
                        component,
                        definition,
                        component_bytes,
                        data,
                        ..
                    } => self
                        .save_projection(
                            &mut tables,
                            &txn,
                            name,
                            component,
                            definition,
                            component_bytes.as_deref(),
                            *data,
                        )
                        .map(Answer::DataId),
                    Request::RemoveProjection {
                        name,
                        delete_outputs,
                        ..
                    } => self
                        .remove_projection(&mut tables, &txn, name, *delete_outputs)
                        .map(|()| Answer::Done),
                    Request::CommitProjection { commit, .. } => self
                        .commit_projection(&mut tables, &txn, commit, now_ms)
                        .map(|()| Answer::Done),
                    Request::BuildProjection { name, change, .. } => self
                        .build_projection(&mut tables, &txn, name, change, now_ms)
                        .map(Answer::DataId),
                    Request::SaveSharder {
                        name,
                        component,
                        component_bytes,
                        ..
                    } => {
                        save_sharder(&txn, name, component, component_bytes).map(|()| Answer::Done)
                    }
                    Request::RemoveSharder { name, .. } => {
                        remove_sharder(&txn, name).map(|()| Answer::Done)
                    }
                    Request::SaveGroup {
                        stream,
                        group,
                        record,
                        ..
                    } => save_group(&txn, stream, group, record).map(|()| Answer::Done),
                    Request::RemoveGroup {
                        stream,
                        group,
                        parked_stream,
                        ..
                    } => self
                        .remove_group(&mut tables, &txn, stream, group, parked_stream)
                        .map(|()| Answer::Done),
                    Request::ParkMessages { parking, .. } => self
                        .park_messages(&mut tables, &txn, parking)
                        .map(|()| Answer::Done),
                    Request::Shutdown { .. } => unreachable!("shutdown ends a batch"),
                };
                if let Err(StoreError::Storage(_)) = answer {
                    return Err(answer.err().expect("an error"));
                }
                answers.push(answer);
            }
            // A caught-up index links all of this batch in its own commit; beyond that, a busy
            // commit takes a smaller bite of any backlog than an idle one.
            let appended = self.next_position - position_before;
            let backlog = if batch.is_empty() {
                self.options.index_batch
            } else {
                (self.options.index_batch / 10).max(1)
            };
            let limit = appended + backlog;
            self.indexer.advance(
                &mut tables.for_indexes(),
                &mut self.next_stream_id,
                self.next_position,
                limit,
            )?;
            if self.next_stream_id != stream_id_before {
                tables.meta.insert(NEXT_STREAM_ID, self.next_stream_id)?;
            }
        }
        txn.commit()?;
        if durable {
            self.last_durable_commit = Instant::now();
        }
        self.metrics.record_bytes_written(bytes_written);
        Ok(answers)
    }

    /// A stream created by a client (system output streams are created by the indexes).
    fn new_stream(&mut self, tables: &mut Tables) -> Result<StreamState, StoreError> {
        let created = tables
            .meta
            .get(CLIENT_STREAMS)?
            .map_or(0, |count| count.value());
        tables.meta.insert(CLIENT_STREAMS, created + 1)?;
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        Ok(StreamState {
            id,
            ..StreamState::default()
        })
    }

    fn append(
        &mut self,
        tables: &mut Tables,
        stream: &str,
        expected: ExpectedRevision,
        events: &[NewEvent],
        now_ms: i64,
    ) -> Result<AppendOutcome, StoreError> {
        if events.is_empty() {
            return Err(StoreError::InvalidRequest(
                "an append needs at least one event".into(),
            ));
        }
        reject_repeated_ids(events)?;
        let state = tables.stream_state(stream)?;
        if let Some(state) = &state {
            if state.tombstoned {
                return Err(StoreError::StreamDeleted(stream.to_owned()));
            }
            if state.links {
                return Err(StoreError::InvalidRequest(format!(
                    "{stream} is a stream of links a projection writes; it takes no events"
                )));
            }
            if let Some(outcome) = replayed(tables, state, expected, events)? {
                return Ok(outcome);
            }
        }
        let current = state.as_ref().and_then(StreamState::current_revision);
        if !expected.admits(current) {
            return Err(StoreError::WrongExpectedRevision {
                expected,
                actual: current,
            });
        }
        // The state row changes only for a new stream or one coming back from a soft delete.
        let (state, rewrite_state) = match state {
            Some(state) if state.soft_deleted => (
                StreamState {
                    soft_deleted: false,
                    ..state
                },
                true,
            ),
            Some(state) => (state, false),
            None => (self.new_stream(tables)?, true),
        };
        let first_revision = state.next_revision;
        let first_position = self.next_position;
        for (offset, event) in (0u64..).zip(events) {
            let revision = first_revision + offset;
            let position = first_position + offset;
            self.record_buffer.clear();
            EventRecord {
                stream,
                revision,
                created_ms: now_ms,
                id: event.id,
                event_type: &event.event_type,
                metadata: &event.metadata,
                data: &event.data,
                binary: event.binary,
            }
            .encode_into(&mut self.record_buffer);
            tables.log.insert(position, self.record_buffer.as_slice())?;
            tables.stream_index.insert((state.id, revision), position)?;
        }
        let count = events.len() as u64;
        if rewrite_state {
            tables.streams.insert(stream, state.encode().as_slice())?;
        }
        self.next_position += count;
        Ok(AppendOutcome {
            first_revision,
            last_revision: first_revision + count - 1,
            first_position,
            last_position: first_position + count - 1,
        })
    }

    fn set_metadata(
        &mut self,
        tables: &mut Tables,
        stream: &str,
        metadata: &StreamMetadata,
    ) -> Result<(), StoreError> {
        let mut state = match tables.stream_state(stream)? {
            Some(state) if state.tombstoned => {
                return Err(StoreError::StreamDeleted(stream.to_owned()));
            }
            Some(state) => state,
            None => self.new_stream(tables)?,
        };
        state.metadata = serde_json::to_vec(metadata).map_err(StoreError::storage)?;
        tables.streams.insert(stream, state.encode().as_slice())?;
        Ok(())
    }

    fn delete(
        &mut self,
        tables: &mut Tables,
        stream: &str,
        expected: ExpectedRevision,
        hard: bool,
    ) -> Result<(), StoreError> {
        let state = tables.stream_state(stream)?;
        if state.as_ref().is_some_and(|state| state.tombstoned) {
            return Err(StoreError::StreamDeleted(stream.to_owned()));
        }
        let current = state.as_ref().and_then(StreamState::current_revision);
        if !expected.admits(current) {
            return Err(StoreError::WrongExpectedRevision {
                expected,
                actual: current,
            });
        }
        let mut state = match state {
            Some(state) => state,
            None if hard => self.new_stream(tables)?,
            None => return Err(StoreError::StreamNotFound(stream.to_owned())),
        };
        if hard {
            state.tombstoned = true;
        } else {
            if current.is_none() {
                return Err(StoreError::StreamNotFound(stream.to_owned()));
            }
            state.soft_deleted = true;
            state.deleted_before = state.next_revision;
        }
        tables.streams.insert(stream, state.encode().as_slice())?;
        Ok(())
    }
}

fn save_sharder(
    txn: &WriteTransaction,
    name: &str,
    component: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let mut tables = ProjectionTables::open(txn)?;
    if tables.components.get(component)?.is_none() {
        tables.components.insert(component, bytes)?;
    }
    tables.sharders.insert(name, component)?;
    tables.collect_components()
}

fn remove_sharder(txn: &WriteTransaction, name: &str) -> Result<(), StoreError> {
    let mut tables = ProjectionTables::open(txn)?;
    if tables.sharders.remove(name)?.is_none() {
        return Err(StoreError::InvalidRequest(format!(
            "no sharder is named {name:?}"
        )));
    }
    tables.collect_components()
}

fn reject_repeated_ids(events: &[NewEvent]) -> Result<(), StoreError> {
    if events.len() < 2 {
        return Ok(());
    }
    let mut ids: Vec<u128> = events.iter().map(|event| event.id.as_u128()).collect();
    ids.sort_unstable();
    match ids.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(StoreError::InvalidRequest(format!(
            "event id {} appears twice in one append",
            uuid::Uuid::from_u128(pair[0])
        ))),
        None => Ok(()),
    }
}

/// Recognises a re-sent append: the same event ids already stored, in order, at the place this
/// append targets: right after the expected revision, or for `any` and `stream_exists` at the
/// end of the stream. Returns the original outcome; `None` means "not a re-send".
fn replayed(
    tables: &Tables,
    state: &StreamState,
    expected: ExpectedRevision,
    events: &[NewEvent],
) -> Result<Option<AppendOutcome>, StoreError> {
    let count = events.len() as u64;
    let first_revision = match expected {
        ExpectedRevision::Exact(revision) => revision.checked_add(1),
        ExpectedRevision::NoStream => Some(state.deleted_before),
        ExpectedRevision::Any | ExpectedRevision::StreamExists => {
            state.next_revision.checked_sub(count)
        }
    };
    // Deleted events are gone: sending their ids again appends anew.
    let Some(first_revision) = first_revision.filter(|first| *first >= state.deleted_before) else {
        return Ok(None);
    };
    let last_revision = first_revision.saturating_add(count - 1);
    if last_revision >= state.next_revision {
        return Ok(None);
    }
    // The last event first: for an ordinary append that is the only lookup.
    let mut positions = vec![0; events.len()];
    for (index, event) in events.iter().enumerate().rev() {
        let revision = first_revision + index as u64;
        let Some(position) = tables.stream_index.get((state.id, revision))? else {
            return Ok(None);
        };
        let position = position.value();
        let stored = tables
            .log
            .get(position)?
            .ok_or_else(|| StoreError::Storage(format!("log entry {position} is missing")))?;
        if EventRecord::decode(stored.value())?.id != event.id {
            return Ok(None);
        }
        positions[index] = position;
    }
    Ok(Some(AppendOutcome {
        first_revision,
        last_revision,
        first_position: positions[0],
        last_position: positions[events.len() - 1],
    }))
}

/// Projections' requests: definitions, and batches whose effects commit with their checkpoint.
impl Writer {
    #[allow(clippy::too_many_arguments)]
    fn save_projection(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        name: &str,
        component: &str,
        definition: &serde_json::Value,
        component_bytes: Option<&[u8]>,
        data: DataChange,
    ) -> Result<u64, StoreError> {
        let mut projection = ProjectionTables::open(txn)?;
        let stored_component = projection.components.get(component)?.is_some();
        if !stored_component && component_bytes.is_none() {
            return Err(StoreError::InvalidRequest(format!(
                "component {component} is not stored"
            )));
        }
        let existing = projection.load(name)?;
        let data = match (data, &existing) {
            (DataChange::Keep, Some(existing)) => existing.data,
            (DataChange::Keep, None) | (DataChange::Fresh { .. }, _) => {
                if let Some(existing) = &existing {
                    let outputs = projection.drop_data(existing.data)?;
                    if data
                        == (DataChange::Fresh {
                            delete_outputs: true,
                        })
                    {
                        self.delete_outputs(tables, outputs)?;
                    }
                }
                projection.new_data(&mut tables.meta)?
            }
        };
        if let (false, Some(bytes)) = (stored_component, component_bytes) {
            projection.components.insert(component, bytes)?;
        }
        let stored = StoredProjection {
            data,
            component: component.to_owned(),
            definition: definition.clone(),
            building: existing.and_then(|existing| existing.building),
        };
        projection.save(name, &stored)?;
        projection.collect_components()?;
        Ok(data)
    }

    fn remove_projection(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        name: &str,
        delete_outputs: bool,
    ) -> Result<(), StoreError> {
        let mut projection = ProjectionTables::open(txn)?;
        let Some(existing) = projection.load(name)? else {
            return Err(StoreError::InvalidRequest(format!(
                "no projection is named {name:?}"
            )));
        };
        let outputs = projection.drop_data(existing.data)?;
        if let Some(building) = existing.building {
            projection.drop_data(building.data)?;
        }
        if delete_outputs {
            self.delete_outputs(tables, outputs)?;
        }
        projection.projections.remove(name)?;
        projection.collect_components()
    }

    /// Soft-deletes the streams a projection emitted to and removes its streams of links.
    fn delete_outputs(
        &mut self,
        tables: &mut Tables,
        outputs: Vec<(String, bool)>,
    ) -> Result<(), StoreError> {
        for (stream, is_link) in outputs {
            if is_link {
                remove_links_stream(tables, &stream)?;
            } else {
                match self.delete(tables, &stream, ExpectedRevision::Any, false) {
                    Ok(()) | Err(StoreError::StreamNotFound(_) | StoreError::StreamDeleted(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    fn commit_projection(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        commit: &ProjectionCommit,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut projection = ProjectionTables::open(txn)?;
        match projection.checkpoints.get(commit.data)? {
            Some(stored) if stored.value().0 == commit.from => {}
            Some(_) => {
                return Err(StoreError::InvalidRequest(
                    "the projection's checkpoint moved on; the batch is discarded".into(),
                ));
            }
            None => {
                return Err(StoreError::InvalidRequest(
                    "the projection was reset or deleted; the batch is discarded".into(),
                ));
            }
        }
        self.validate_outputs(tables, commit)?;
        // Validated: from here on only storage can fail, and a failure must not leave part of
        // the batch behind, so it fails the whole transaction.
        self.write_projection_batch(tables, &mut projection, commit, now_ms)
            .map_err(|error| match error {
                StoreError::Storage(_) => error,
                other => StoreError::Storage(format!(
                    "a projection's batch failed after validation: {other}"
                )),
            })
    }

    /// Checks that every emitted event and link can be written, before anything is.
    fn validate_outputs(
        &self,
        tables: &Tables,
        commit: &ProjectionCommit,
    ) -> Result<(), StoreError> {
        let linked: std::collections::HashSet<&str> = commit
            .links
            .iter()
            .map(|(stream, _)| stream.as_str())
            .collect();
        let invalid = |message: String| Err(StoreError::InvalidRequest(message));
        for (stream, _) in &commit.emits {
            validate_stream_name(stream).map_err(StoreError::InvalidRequest)?;
            if stream.starts_with('$') {
                return invalid(format!(
                    "cannot emit to {stream}: $-streams belong to the system"
                ));
            }
            if linked.contains(stream.as_str()) {
                return invalid(format!("cannot both emit and link to {stream}"));
            }
            if let Some(state) = tables.stream_state(stream)? {
                if state.tombstoned {
                    return invalid(format!(
                        "cannot emit to {stream}: it was deleted permanently"
                    ));
                }
                if state.links {
                    return invalid(format!("cannot emit to {stream}: it is a stream of links"));
                }
            }
        }
        for (stream, position) in &commit.links {
            validate_stream_name(stream).map_err(StoreError::InvalidRequest)?;
            if stream.starts_with('$') {
                return invalid(format!(
                    "cannot link to {stream}: $-streams belong to the system"
                ));
            }
            if *position >= self.next_position {
                return invalid(format!(
                    "cannot link to position {position}: there is no such event"
                ));
            }
            if let Some(state) = tables.stream_state(stream)?
                && !state.links
                && (state.next_revision > 0 || state.tombstoned)
            {
                return invalid(format!(
                    "cannot link to {stream}: it holds events of its own"
                ));
            }
        }
        Ok(())
    }

    fn write_projection_batch(
        &mut self,
        tables: &mut Tables,
        projection: &mut ProjectionTables,
        commit: &ProjectionCommit,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let data = commit.data;
        if commit.shadow {
            Self::write_shadow(projection, commit)?;
        } else {
            self.write_outputs(tables, projection, commit, now_ms)?;
        }
        for (partition, state) in &commit.states {
            projection
                .states
                .insert((data, partition.as_str()), state.as_slice())?;
        }
        for ((table, key), row) in &commit.rows {
            match row {
                Some(row) => {
                    projection
                        .rows
                        .insert((data, table.as_str(), key.as_str()), row.as_slice())?;
                }
                None => {
                    projection
                        .rows
                        .remove((data, table.as_str(), key.as_str()))?;
                }
            }
        }
        let checkpoint = commit.checkpoint;
        projection.checkpoints.insert(
            data,
            (
                checkpoint.position,
                checkpoint.events_processed,
                checkpoint.events_emitted,
            ),
        )?;
        Ok(())
    }
}

fn save_group(
    txn: &WriteTransaction,
    stream: &str,
    group: &str,
    record: &[u8],
) -> Result<(), StoreError> {
    GroupTables::open(txn)?
        .groups
        .insert((stream, group), record)?;
    Ok(())
}

/// A projection batch's emitted events and links, into their streams.
impl Writer {
    fn write_outputs(
        &mut self,
        tables: &mut Tables,
        projection: &mut ProjectionTables,
        commit: &ProjectionCommit,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let data = commit.data;
        // Consecutive events to one stream are one append.
        let mut rest = commit.emits.as_slice();
        while let Some((stream, _)) = rest.first() {
            let run = rest.iter().take_while(|(to, _)| to == stream).count();
            let events: Vec<NewEvent> =
                rest[..run].iter().map(|(_, event)| event.clone()).collect();
            self.append(tables, stream, ExpectedRevision::Any, &events, now_ms)?;
            projection.outputs.insert((data, stream.as_str()), false)?;
            rest = &rest[run..];
        }
        if !commit.links.is_empty() {
            let mut outputs = Outputs::default();
            let mut index_tables = tables.for_indexes();
            let mut recorded = std::collections::HashSet::new();
            for (stream, position) in &commit.links {
                outputs.add(
                    &mut index_tables,
                    &mut self.next_stream_id,
                    stream,
                    *position,
                )?;
                if recorded.insert(stream.as_str()) {
                    projection.outputs.insert((data, stream.as_str()), true)?;
                }
            }
            outputs.flush(&mut index_tables)?;
        }
        Ok(())
    }

    /// A rebuild's emitted events and links, held until the switch.
    fn write_shadow(
        projection: &mut ProjectionTables,
        commit: &ProjectionCommit,
    ) -> Result<(), StoreError> {
        let data = commit.data;
        let first = commit.checkpoint.events_emitted - commit.emits.len() as u64;
        let mut encoded = Vec::new();
        for (sequence, (stream, event)) in (first..).zip(&commit.emits) {
            encoded.clear();
            shadow_record(stream, event).encode_into(&mut encoded);
            projection
                .shadow_events
                .insert((data, sequence), encoded.as_slice())?;
        }
        let next = projection
            .shadow_links
            .range((data, 0)..(data + 1, 0))?
            .next_back()
            .transpose()?
            .map_or(0, |(key, _)| key.value().1 + 1);
        for (sequence, (stream, position)) in (next..).zip(&commit.links) {
            projection
                .shadow_links
                .insert((data, sequence), (stream.as_str(), *position))?;
        }
        Ok(())
    }
}

/// An emitted event as the shadow table keeps it: the log's record layout, with the target
/// stream and no revision or time yet.
fn shadow_record<'a>(stream: &'a str, event: &'a NewEvent) -> EventRecord<'a> {
    EventRecord {
        stream,
        revision: 0,
        created_ms: 0,
        id: event.id,
        event_type: &event.event_type,
        metadata: &event.metadata,
        data: &event.data,
        binary: event.binary,
    }
}

/// Removes a stream of links and every link in it; a stream of events is left alone.
fn remove_links_stream(tables: &mut Tables, stream: &str) -> Result<(), StoreError> {
    if let Some(state) = tables.stream_state(stream)?
        && state.links
    {
        let id = state.id;
        tables
            .links
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        tables.streams.remove(stream)?;
    }
    Ok(())
}

/// Consumer groups' requests.
impl Writer {
    fn remove_group(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        stream: &str,
        group: &str,
        parked_stream: &str,
    ) -> Result<(), StoreError> {
        let mut groups = GroupTables::open(txn)?;
        groups.require(stream, group)?;
        groups.remove(stream, group)?;
        remove_links_stream(tables, parked_stream)
    }

    /// Links each message from the parked stream and records why it was parked.
    fn park_messages(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        parking: &Parking,
    ) -> Result<(), StoreError> {
        let mut groups = GroupTables::open(txn)?;
        let (stream, group) = (parking.stream.as_str(), parking.group.as_str());
        groups.require(stream, group)?;
        if let Some((position, _)) = parking
            .messages
            .iter()
            .find(|(position, _)| *position >= self.next_position)
        {
            return Err(StoreError::InvalidRequest(format!(
                "cannot park position {position}: there is no such event"
            )));
        }
        let mut outputs = Outputs::default();
        let mut index_tables = tables.for_indexes();
        for (position, reason) in &parking.messages {
            outputs.add(
                &mut index_tables,
                &mut self.next_stream_id,
                &parking.parked_stream,
                *position,
            )?;
            groups
                .reasons
                .insert((stream, group, *position), reason.as_str())?;
        }
        outputs.flush(&mut index_tables)
    }
}

/// Rebuilds: a version built beside the live one, then switched in or dropped.
impl Writer {
    fn build_projection(
        &mut self,
        tables: &mut Tables,
        txn: &WriteTransaction,
        name: &str,
        change: &BuildChange,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut projection = ProjectionTables::open(txn)?;
        let Some(mut stored) = projection.load(name)? else {
            return Err(StoreError::InvalidRequest(format!(
                "no projection is named {name:?}"
            )));
        };
        let data = match change {
            BuildChange::Start {
                component,
                definition,
                component_bytes,
            } => {
                if projection.components.get(component.as_str())?.is_none() {
                    let Some(bytes) = component_bytes else {
                        return Err(StoreError::InvalidRequest(format!(
                            "component {component} is not stored"
                        )));
                    };
                    projection
                        .components
                        .insert(component.as_str(), bytes.as_slice())?;
                }
                if let Some(previous) = stored.building.take() {
                    projection.drop_data(previous.data)?;
                }
                let data = projection.new_data(&mut tables.meta)?;
                stored.building = Some(Building {
                    data,
                    component: component.clone(),
                    definition: definition.clone(),
                });
                data
            }
            BuildChange::Cancel => {
                let Some(building) = stored.building.take() else {
                    return Err(StoreError::InvalidRequest(format!(
                        "{name} is not being rebuilt"
                    )));
                };
                projection.drop_data(building.data)?;
                stored.data
            }
            BuildChange::Switch { data } => {
                let Some(building) = stored.building.take_if(|b| b.data == *data) else {
                    return Err(StoreError::InvalidRequest(format!(
                        "the rebuild of {name} was cancelled or replaced"
                    )));
                };
                let old_outputs = projection.drop_data(stored.data)?;
                self.take_over_outputs(
                    tables,
                    &mut projection,
                    building.data,
                    old_outputs,
                    now_ms,
                )?;
                stored.data = building.data;
                stored.component = building.component;
                stored.definition = building.definition;
                building.data
            }
        };
        projection.save(name, &stored)?;
        projection.collect_components()?;
        Ok(data)
    }

    /// Makes the streams the old version wrote hold what the new version produced: a stream
    /// whose events already are the new ones (or their beginning) keeps them and gets the rest;
    /// one that differs is soft-deleted and written anew; the old version's streams of links are
    /// replaced by the new version's.
    fn take_over_outputs(
        &mut self,
        tables: &mut Tables,
        projection: &mut ProjectionTables,
        data: u64,
        old_outputs: Vec<(String, bool)>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut events: BTreeMap<String, Vec<NewEvent>> = BTreeMap::new();
        for entry in projection.shadow_events.range((data, 0)..(data + 1, 0))? {
            let (_, bytes) = entry?;
            let record = EventRecord::decode(bytes.value()).map_err(StoreError::storage)?;
            events
                .entry(record.stream.to_owned())
                .or_default()
                .push(new_event(&record));
        }
        let mut links: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for entry in projection.shadow_links.range((data, 0)..(data + 1, 0))? {
            let (_, link) = entry?;
            let (stream, position) = link.value();
            links.entry(stream.to_owned()).or_default().push(position);
        }
        projection
            .shadow_events
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        projection
            .shadow_links
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;

        let mut event_streams: Vec<String> = events.keys().cloned().collect();
        let mut link_streams = Vec::new();
        for (stream, is_link) in old_outputs {
            if is_link {
                link_streams.push(stream);
            } else if !events.contains_key(&stream) {
                event_streams.push(stream);
            }
        }
        for stream in event_streams {
            let new = events.remove(&stream).unwrap_or_default();
            let visible = visible_events(tables, &stream)?;
            let same = |(old, new): &(&NewEvent, &NewEvent)| {
                (&old.event_type, &old.data, &old.metadata, old.binary)
                    == (&new.event_type, &new.data, &new.metadata, new.binary)
            };
            let common = visible.iter().zip(&new).take_while(same).count();
            let rest = if common == visible.len() {
                &new[common..]
            } else {
                match self.delete(tables, &stream, ExpectedRevision::Any, false) {
                    Ok(()) | Err(StoreError::StreamNotFound(_)) => {}
                    Err(error) => return Err(error),
                }
                &new[..]
            };
            if !rest.is_empty() {
                self.append(tables, &stream, ExpectedRevision::Any, rest, now_ms)?;
            }
            if !new.is_empty() {
                projection.outputs.insert((data, stream.as_str()), false)?;
            }
        }
        for stream in link_streams {
            remove_links_stream(tables, &stream)?;
        }
        if !links.is_empty() {
            let mut outputs = Outputs::default();
            let mut index_tables = tables.for_indexes();
            for (stream, positions) in &links {
                for position in positions {
                    outputs.add(
                        &mut index_tables,
                        &mut self.next_stream_id,
                        stream,
                        *position,
                    )?;
                }
            }
            outputs.flush(&mut index_tables)?;
            for stream in links.keys() {
                projection.outputs.insert((data, stream.as_str()), true)?;
            }
        }
        Ok(())
    }
}

fn new_event(record: &EventRecord) -> NewEvent {
    NewEvent {
        id: record.id,
        event_type: record.event_type.to_owned(),
        data: record.data.to_vec(),
        binary: record.binary,
        metadata: record.metadata.to_vec(),
    }
}

/// The events a read of the stream shows now (none for a stream of links or a deleted one).
fn visible_events(tables: &Tables, stream: &str) -> Result<Vec<NewEvent>, StoreError> {
    let Some(state) = tables.stream_state(stream)? else {
        return Ok(Vec::new());
    };
    if state.links || state.tombstoned || state.soft_deleted {
        return Ok(Vec::new());
    }
    let mut events = Vec::new();
    for revision in state.deleted_before..state.next_revision {
        let Some(position) = tables.stream_index.get((state.id, revision))? else {
            continue;
        };
        let Some(bytes) = tables.log.get(position.value())? else {
            continue;
        };
        let record = EventRecord::decode(bytes.value()).map_err(StoreError::storage)?;
        events.push(new_event(&record));
    }
    Ok(events)
}
