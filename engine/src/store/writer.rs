//! The single writer: group commit of queued operations, one redb write transaction and one
//! fsync per batch.
//!
//! Each domain of the store (streams, indexes, projections and their rebuilds, groups,
//! sharders) defines its changes as [`Operation`]s beside its tables; this file only queues,
//! batches and commits them. An operation runs in two phases inside the batch's transaction:
//! it reads and checks through `&Tables`, then calls [`Txn::write`] for `&mut Tables` and writes.
//!
//! - An error before `write` rejects that operation alone: it could not have written anything,
//!   and the batch commits without it.
//! - An error after `write`, a storage error or a panic *poisons* the transaction, as redb
//!   poisons one that half-failed: the transaction is dropped, the batch runs again without that
//!   operation, and then the operation runs alone in a transaction of its own, where a second
//!   failure is its answer and nothing of it commits.
//!
//! So "a rejected request writes nothing" holds by construction, not by each operation's care.
//!
//! Durability comes from the write-ahead log, not from redb: a batch is first written to the log
//! as one entry (its operations and the time it is stamped with) and synced, then applied to redb
//! in a non-durable commit, which readers see at once, then answered. Applying overlaps the
//! sync, and so does logging the operations that arrived meanwhile as the next entry, whose sync
//! then follows at once; commits and answers stay in log order. Every checkpoint interval
//! an empty durable redb commit makes everything applied so far durable
//! (each commit records the last entry it applied), and the log's segments before it are
//! dropped. Opening replays the entries past that record; applying is deterministic, so they
//! give the same state and answers as the first time. A failure to write the log or to apply an
//! entry already in it stops the writer: the outcome of what it held is whatever the log holds
//! when the store is opened again.
//!
//! A replicated store has no log of its own: its batches are proposed to the cluster and applied
//! once committed, on every node ([`super::replicated`]).

use std::cell::OnceCell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use super::connector_data::ConnectorTables;
use super::group_data::GroupTables;
use super::indexes::{
    CursorTable, IndexConfig, IndexProgress, IndexTables, Indexer, set_index_config,
};
use super::logged::{self, CommandRef, Logged};
use super::projection_data::ProjectionTables;
use super::record::StreamState;
use super::{
    INDEX_CONFIG, INDEX_CURSORS, LINKS, LOG, META, NEXT_STREAM_ID, SETTINGS, STREAM_INDEX, STREAMS,
    StoreError, StoreOptions, WAL_APPLIED, load_stream,
};
use crate::metrics::Metrics;
use crate::wal::{PendingSync, Wal};

/// Operations waiting for the writer; senders wait when it is full, which is the backpressure.
pub(super) const QUEUE_CAPACITY: usize = 8192;
/// A batch stops taking queued operations once it holds this many payload bytes.
pub(super) const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Log bytes that make a checkpoint due before its interval is over.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// The term entries are written in, until the log is replicated.
const TERM: u64 = 1;

/// A change the writer makes inside a batch's transaction.
pub(super) trait Operation: Logged + Send + 'static {
    type Output: Send + 'static;

    /// Reads and checks through `txn.tables()`, then writes after `txn.write()`.
    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<Self::Output, StoreError>;

    /// Payload bytes; they bound the size of a batch.
    fn payload_bytes(&self) -> usize {
        0
    }

    /// Whether the commit holding this operation must reach the disk before it is answered.
    fn needs_fsync(&self) -> bool {
        true
    }

    /// Whether this is a client's append (the append metrics count those).
    fn is_append(&self) -> bool {
        false
    }
}

/// What waits in the writer's queue.
pub(super) enum Queued {
    Operation(Box<dyn Job>),
    /// Commit what came before, make it durable, and stop.
    Shutdown(oneshot::Sender<()>),
    /// Wakes an idle writer, so that a checkpoint falls due without a write to carry it: with
    /// `--no-fsync`, it is what makes the last writes of a burst durable.
    Tick,
    /// A replicated log's committed entries, to apply in order.
    Apply(
        Vec<super::replicated::ReplicatedEntry>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// A proposed batch the replicated log did not take: its operations get `error`.
    ProposalFailed(u64, StoreError),
    /// Make everything applied durable and answer a read of that state, for a snapshot.
    Snapshot(oneshot::Sender<Result<super::replicated::StoreSnapshot, StoreError>>),
    /// Replace the whole state with a snapshot's.
    Install(std::fs::File, oneshot::Sender<Result<(), StoreError>>),
}

/// An operation queued with the channel its typed answer goes back on.
pub(super) fn queue<O: Operation>(
    operation: O,
) -> (Queued, oneshot::Receiver<Result<O::Output, StoreError>>) {
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        operation,
        result: None,
        reply,
    };
    (Queued::Operation(Box::new(pending)), answer)
}

/// An operation as a job whose answer nobody waits for: an entry replayed from the log.
pub(super) fn unanswered<O: Operation>(operation: O) -> Box<dyn Job> {
    match queue(operation).0 {
        Queued::Operation(job) => job,
        _ => unreachable!("queue makes operations"),
    }
}

/// An operation of any output type, as the batch loop handles it.
pub(super) trait Job: Send {
    /// The operation as the log holds it.
    fn command(&self) -> CommandRef<'_>;
    fn payload_bytes(&self) -> usize;
    fn needs_fsync(&self) -> bool;
    fn is_append(&self) -> bool;
    /// Runs the operation in the transaction and keeps its result; returns whether it
    /// poisoned the transaction.
    fn run(&mut self, tables: &mut Tables<'_>, log: &mut LogState) -> bool;
    /// Whether the kept result is a success.
    fn succeeded(&self) -> bool;
    /// Sends the kept result.
    fn answer(self: Box<Self>);
    /// Sends `error` instead: the commit holding the operation failed.
    fn fail(self: Box<Self>, error: StoreError);
}

struct Pending<O: Operation> {
    operation: O,
    result: Option<Result<O::Output, StoreError>>,
    reply: oneshot::Sender<Result<O::Output, StoreError>>,
}

impl<O: Operation> Job for Pending<O> {
    fn command(&self) -> CommandRef<'_> {
        self.operation.command()
    }

    fn payload_bytes(&self) -> usize {
        self.operation.payload_bytes()
    }

    fn needs_fsync(&self) -> bool {
        self.operation.needs_fsync()
    }

    fn is_append(&self) -> bool {
        self.operation.is_append()
    }

    fn run(&mut self, tables: &mut Tables<'_>, log: &mut LogState) -> bool {
        let mut txn = Txn {
            tables,
            log,
            wrote: false,
        };
        // A bug must cost one operation, not the writer: a panic poisons like a failed write.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.operation.apply(&mut txn)
        }))
        .unwrap_or_else(|_| {
            Err(StoreError::Storage(
                "the writer panicked on this request".into(),
            ))
        });
        let poisoned = match &result {
            Ok(_) => false,
            Err(StoreError::Storage(_)) => true,
            Err(_) => txn.wrote,
        };
        self.result = Some(result);
        poisoned
    }

    fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn answer(self: Box<Self>) {
        let result = self
            .result
            .unwrap_or_else(|| Err(StoreError::Storage("the request did not run".into())));
        // A caller that went away no longer needs its answer; the write stands regardless.
        let _ = self.reply.send(result);
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

/// One operation's view of the batch's transaction.
pub(super) struct Txn<'a, 't> {
    tables: &'a mut Tables<'t>,
    log: &'a mut LogState,
    wrote: bool,
}

impl<'t> Txn<'_, 't> {
    /// Everything the transaction sees so far, earlier operations of the batch included.
    pub fn tables(&self) -> &Tables<'t> {
        self.tables
    }

    pub fn log(&self) -> &LogState {
        self.log
    }

    /// Ends the checking: from here on the operation writes, and an error it returns poisons
    /// the transaction.
    pub fn write(&mut self) -> Writes<'_, 't> {
        self.wrote = true;
        Writes {
            tables: self.tables,
            log: self.log,
        }
    }
}

/// Write access to the transaction, for an operation that has done its checks.
pub(super) struct Writes<'a, 't> {
    pub tables: &'a mut Tables<'t>,
    pub log: &'a mut LogState,
}

/// What the writer assigns as it writes, kept between transactions.
pub(super) struct LogState {
    /// The position the next event gets.
    pub next_position: u64,
    pub next_stream_id: u64,
    pub indexer: Indexer,
    /// The time every event of the batch is stamped with.
    pub now_ms: i64,
    /// Reused to encode records.
    pub record_buffer: Vec<u8>,
}

/// What the log state was before a transaction, to go back to when it does not commit.
struct Rewind {
    next_position: u64,
    next_stream_id: u64,
    cursors: [super::indexes::Cursor; 4],
    config: IndexConfig,
}

impl LogState {
    fn rewind_point(&self) -> Rewind {
        Rewind {
            next_position: self.next_position,
            next_stream_id: self.next_stream_id,
            cursors: self.indexer.cursors,
            config: self.indexer.config.clone(),
        }
    }

    fn rewind(&mut self, to: Rewind) {
        self.next_position = to.next_position;
        self.next_stream_id = to.next_stream_id;
        self.indexer.cursors = to.cursors;
        self.indexer.config = to.config;
    }
}

/// The tables of a write transaction. The log's tables are opened with every transaction; a
/// domain's tables when an operation first asks for them.
pub(super) struct Tables<'t> {
    txn: &'t WriteTransaction,
    pub log: Table<'t, u64, &'static [u8]>,
    pub streams: Table<'t, &'static str, &'static [u8]>,
    pub stream_index: Table<'t, (u64, u64), u64>,
    pub links: Table<'t, (u64, u64), &'static [u8]>,
    pub meta: Table<'t, &'static str, u64>,
    pub index_cursors: CursorTable<'t>,
    pub settings: Table<'t, &'static str, &'static [u8]>,
    projections: OnceCell<ProjectionTables<'t>>,
    groups: OnceCell<GroupTables<'t>>,
    connectors: OnceCell<ConnectorTables<'t>>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            txn,
            log: txn.open_table(LOG)?,
            streams: txn.open_table(STREAMS)?,
            stream_index: txn.open_table(STREAM_INDEX)?,
            links: txn.open_table(LINKS)?,
            meta: txn.open_table(META)?,
            index_cursors: txn.open_table(INDEX_CURSORS)?,
            settings: txn.open_table(SETTINGS)?,
            projections: OnceCell::new(),
            groups: OnceCell::new(),
            connectors: OnceCell::new(),
        })
    }

    /// A stream's state as this transaction sees it.
    pub fn stream_state(&self, stream: &str) -> Result<Option<StreamState>, StoreError> {
        load_stream(&self.streams, &self.stream_index, &self.links, stream)
    }

    pub fn projections(&self) -> Result<&ProjectionTables<'t>, StoreError> {
        opened(&self.projections, || ProjectionTables::open(self.txn))
    }

    pub fn projections_mut(&mut self) -> Result<&mut ProjectionTables<'t>, StoreError> {
        self.projections()?;
        Ok(self.projections.get_mut().expect("opened above"))
    }

    pub fn groups(&self) -> Result<&GroupTables<'t>, StoreError> {
        opened(&self.groups, || GroupTables::open(self.txn))
    }

    pub fn groups_mut(&mut self) -> Result<&mut GroupTables<'t>, StoreError> {
        self.groups()?;
        Ok(self.groups.get_mut().expect("opened above"))
    }

    pub fn connectors(&self) -> Result<&ConnectorTables<'t>, StoreError> {
        opened(&self.connectors, || ConnectorTables::open(self.txn))
    }

    pub fn connectors_mut(&mut self) -> Result<&mut ConnectorTables<'t>, StoreError> {
        self.connectors()?;
        Ok(self.connectors.get_mut().expect("opened above"))
    }

    /// The tables the built-in indexes write links with.
    pub fn for_indexes(&mut self) -> IndexTables<'_, 't> {
        IndexTables {
            log: &self.log,
            streams: &mut self.streams,
            stream_index: &self.stream_index,
            links: &mut self.links,
            cursors: &mut self.index_cursors,
        }
    }
}

fn opened<T>(
    cell: &OnceCell<T>,
    open: impl FnOnce() -> Result<T, StoreError>,
) -> Result<&T, StoreError> {
    if let Some(tables) = cell.get() {
        return Ok(tables);
    }
    let tables = open()?;
    Ok(cell.get_or_init(|| tables))
}

/// What the writer continues from when a store opens.
pub(super) struct Recovered {
    pub next_position: u64,
    pub next_stream_id: u64,
    pub indexer: Indexer,
    /// The last log entry the database holds.
    pub wal_applied: u64,
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
        let wal_applied = tables
            .meta
            .get(WAL_APPLIED)?
            .map_or(0, |index| index.value());
        let stored_config = match tables.settings.get(INDEX_CONFIG)? {
            Some(json) => serde_json::from_slice(json.value()).map_err(StoreError::storage)?,
            None => IndexConfig::default(),
        };
        let cursors = Indexer::load_cursors(&tables.index_cursors)?;
        let mut indexer = Indexer::new(stored_config, cursors);
        if let Some(config) = &options.index_config {
            set_index_config(&mut indexer, &mut tables, config)?;
        }
        // Created here so readers can open them before the first projection or group exists.
        tables.projections_mut()?.claim_earlier_outputs()?;
        tables.groups()?;
        tables.connectors()?;
        Recovered {
            next_position,
            next_stream_id,
            indexer,
            wal_applied,
        }
    };
    txn.commit()?;
    Ok(recovered)
}

pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) options: StoreOptions,
    metrics: Arc<Metrics>,
    head: watch::Sender<u64>,
    pub(super) log: LogState,
    /// Where status queries read the indexes' progress.
    index_progress: Arc<Mutex<[IndexProgress; 4]>>,
    /// The log of a single node; a replicated store's log belongs to the cluster.
    wal: Option<Wal>,
    /// Syncs the log while the batch it holds is applied.
    syncer: Syncer,
    /// The last log entry applied to redb, and the one being applied.
    applied_index: u64,
    /// What a replicated store tracks of its log and its proposals.
    pub(super) replica: Option<super::replicated::Replica>,
    last_checkpoint: Instant,
    /// Whether anything was committed since the last checkpoint.
    committed_since_checkpoint: bool,
    /// Log bytes written since the last checkpoint.
    bytes_since_checkpoint: u64,
    /// Why the writer stopped taking operations: the log or redb failed with an entry in flight.
    pub(super) stopped: Option<String>,
    /// Reused to encode entries.
    entry_buffer: Vec<u8>,
    /// Where operations wait; absent while the log is replayed.
    queue: Option<mpsc::Receiver<Queued>>,
    /// The next batch, logged (and its sync begun) while the entry before it was syncing.
    prepared: Option<Prepared>,
    /// A shutdown taken from the queue: everything queued before it is committed first.
    shutdown: Option<oneshot::Sender<()>>,
}

/// A batch in the log, not yet applied.
struct Prepared {
    index: u64,
    now_ms: i64,
    batch: Vec<Box<dyn Job>>,
}

/// Why a transaction did not commit.
enum Failure {
    /// The operation at this index of the batch poisoned it.
    Poisoned(usize),
    /// The transaction failed as a whole (opening, indexing or committing it).
    Storage(StoreError),
}

impl Writer {
    /// A writer for `wal` (a single node's log), or for a replicated log when `wal` is `None`.
    pub(super) fn new(
        db: Arc<Database>,
        options: StoreOptions,
        metrics: Arc<Metrics>,
        head: watch::Sender<u64>,
        recovered: Recovered,
        index_progress: Arc<Mutex<[IndexProgress; 4]>>,
        wal: Option<Wal>,
    ) -> Self {
        let mut writer = Writer {
            db,
            options,
            metrics,
            head,
            log: LogState {
                next_position: recovered.next_position,
                next_stream_id: recovered.next_stream_id,
                indexer: recovered.indexer,
                now_ms: 0,
                record_buffer: Vec::new(),
            },
            index_progress,
            wal,
            syncer: Syncer::start(),
            applied_index: recovered.wal_applied,
            replica: None,
            last_checkpoint: Instant::now(),
            committed_since_checkpoint: false,
            bytes_since_checkpoint: 0,
            stopped: None,
            entry_buffer: Vec::new(),
            queue: None,
            prepared: None,
            shutdown: None,
        };
        writer.publish_index_progress();
        writer
    }

    /// Applies the log's entries that redb does not hold yet, then makes them durable.
    pub(super) fn replay(&mut self) -> Result<u64, StoreError> {
        let Some(wal) = self.wal.as_mut() else {
            return Ok(0);
        };
        if wal.next_index() <= self.applied_index {
            // The log ends before what redb holds: a checkpoint syncs the log first, so it was
            // removed or damaged. Numbering goes on after what redb holds.
            wal.reset(self.applied_index + 1)
                .map_err(|error| StoreError::Storage(format!("cannot reset the log: {error}")))?;
        }
        if let Some(first) = wal.first_index()
            && first > self.applied_index + 1
        {
            return Err(StoreError::Storage(format!(
                "the write-ahead log starts at entry {first}, but the database holds entries up \
                 to {} only: entries in between are missing",
                self.applied_index
            )));
        }
        let entries = wal
            .read_from(self.applied_index + 1)
            .map_err(|error| StoreError::Storage(format!("cannot read the log: {error}")))?;
        let replayed = entries.len() as u64;
        for entry in entries {
            let (now_ms, batch) = logged::decode(&entry.payload).map_err(|error| {
                StoreError::Storage(format!("log entry {} cannot be read: {error}", entry.index))
            })?;
            self.apply(entry.index, now_ms, batch);
            if let Some(reason) = &self.stopped {
                return Err(StoreError::Storage(reason.clone()));
            }
        }
        self.checkpoint(true);
        match &self.stopped {
            Some(reason) => Err(StoreError::Storage(reason.clone())),
            None => Ok(replayed),
        }
    }

    /// Continues from the state a database was (re)initialized to.
    pub(super) fn continue_from(&mut self, recovered: Recovered) {
        self.log.next_position = recovered.next_position;
        self.log.next_stream_id = recovered.next_stream_id;
        self.log.indexer = recovered.indexer;
        self.applied_index = recovered.wal_applied;
        self.head.send_replace(recovered.next_position);
        self.publish_index_progress();
    }

    pub(super) fn checkpoint_interval(&self) -> Duration {
        self.options.checkpoint_interval
    }

    pub(super) fn run(mut self, queue: mpsc::Receiver<Queued>) {
        self.queue = Some(queue);
        loop {
            if let Some(Prepared {
                index,
                now_ms,
                batch,
            }) = self.prepared.take()
            {
                match &self.stopped {
                    Some(reason) => fail_all(reason, batch),
                    None => self.apply(index, now_ms, batch),
                }
                self.checkpoint(false);
                continue;
            }
            if let Some(reply) = self.shutdown.take() {
                self.checkpoint(true);
                let _ = reply.send(());
                return;
            }
            let behind = self.log.indexer.behind(self.log.next_position);
            let queue = self.queue.as_mut().expect("the queue while running");
            let Some(first) = next_queued(queue, behind) else {
                return;
            };
            let indexing = first.is_none();
            let batch = self.take_queued(first);
            if !batch.is_empty() || (indexing && self.shutdown.is_none()) {
                self.commit(batch);
            } else {
                self.checkpoint(false);
            }
        }
    }

    /// `first` and the operations queued after it, up to a batch's size or a shutdown.
    fn take_queued(&mut self, first: Option<Queued>) -> Vec<Box<dyn Job>> {
        let mut batch = Vec::new();
        let Some(queue) = self.queue.as_mut() else {
            return batch;
        };
        let mut bytes = 0;
        let mut next = first;
        while let Some(queued) = next.take() {
            match queued {
                Queued::Shutdown(reply) => {
                    self.shutdown = Some(reply);
                    break;
                }
                Queued::Operation(job) => {
                    bytes += job.payload_bytes();
                    batch.push(job);
                }
                Queued::Tick => {}
                replicated => super::replicated::refuse(replicated),
            }
            if bytes < MAX_BATCH_BYTES {
                next = queue.try_recv().ok();
            }
        }
        batch
    }

    /// While the entry being applied still syncs, logs the operations queued since as the next
    /// entry and begins its sync, which then follows this one without waiting for this commit,
    /// its answers and the next batch's taking. Applying stays in log order, as replay does.
    fn prepare_next(&mut self) {
        if self.prepared.is_some()
            || self.shutdown.is_some()
            || self.stopped.is_some()
            || !self.syncer.is_pending(self.applied_index)
        {
            return;
        }
        let first = self.queue.as_mut().and_then(|queue| queue.try_recv().ok());
        let batch = self.take_queued(first);
        if batch.is_empty() {
            return;
        }
        let now_ms = now_ms();
        match self.log_entry(now_ms, &batch) {
            Ok(index) => {
                self.prepared = Some(Prepared {
                    index,
                    now_ms,
                    batch,
                })
            }
            Err(error) => self.stop(format!("the write-ahead log failed ({error})"), batch),
        }
    }

    /// Logs a batch as one entry, syncs it (unless fsync is off or nothing in it asks), applies
    /// it, answers it, and checkpoints when one is due. An empty batch lets the indexes catch up.
    pub(super) fn commit(&mut self, batch: Vec<Box<dyn Job>>) {
        if let Some(reason) = &self.stopped {
            fail_all(reason, batch);
            return;
        }
        let now_ms = now_ms();
        if batch.is_empty() {
            self.log.now_ms = now_ms;
            self.commit_together(batch);
        } else {
            match self.log_entry(now_ms, &batch) {
                Ok(index) => self.apply(index, now_ms, batch),
                Err(error) => {
                    self.stop(format!("the write-ahead log failed ({error})"), batch);
                    return;
                }
            }
        }
        self.checkpoint(false);
    }

    /// Writes the batch to the log, synced when its answers need it; answers the entry's index.
    fn log_entry(&mut self, now_ms: i64, batch: &[Box<dyn Job>]) -> Result<u64, StoreError> {
        logged::encode(now_ms, batch, &mut self.entry_buffer)?;
        #[cfg(test)]
        logged::assert_round_trip(&self.entry_buffer);
        let wal = self.wal.as_mut().ok_or_else(|| {
            StoreError::Storage("a replicated store has no log of its own".into())
        })?;
        let index = wal
            .append(TERM, &self.entry_buffer)
            .map_err(StoreError::storage)?;
        self.bytes_since_checkpoint += self.entry_buffer.len() as u64;
        if self.options.durable && batch.iter().any(|job| job.needs_fsync()) {
            // Applying the batch overlaps the sync; it commits once the sync is done.
            self.syncer.begin(index, wal.take_sync());
        }
        Ok(index)
    }

    /// Applies a logged batch. Operations that poison it are taken out; the rest commit
    /// together, then each poisoning operation gets a transaction of its own.
    pub(super) fn apply(&mut self, index: u64, now_ms: i64, batch: Vec<Box<dyn Job>>) {
        self.applied_index = index;
        self.log.now_ms = now_ms;
        let poisoned = self.commit_together(batch);
        for job in poisoned {
            for again in self.commit_together(vec![job]) {
                // It failed alone too: nothing of it was committed, its error is the answer.
                again.answer();
            }
        }
        // Nothing committed when every operation was refused; the sync still must end.
        if let Err(error) = self.syncer.wait_for(index)
            && self.stopped.is_none()
        {
            self.stop(format!("syncing log entry {index} failed ({error})"), []);
        }
    }

    /// Makes redb durable up to the last applied entry, when due (or `force`d), and drops the
    /// log segments it no longer needs.
    pub(super) fn checkpoint(&mut self, force: bool) {
        let due = self.last_checkpoint.elapsed() >= self.options.checkpoint_interval
            || self.bytes_since_checkpoint >= CHECKPOINT_BYTES;
        if self.stopped.is_some() || !(force || (due && self.committed_since_checkpoint)) {
            return;
        }
        // The log first: after a power cut it must not end before what redb holds.
        let synced = match self.wal.as_mut() {
            Some(wal) => wal.sync().map_err(StoreError::storage),
            None => Ok(()),
        };
        let result = synced.and_then(|()| self.commit_empty_durably());
        self.last_checkpoint = Instant::now();
        if let Err(error) = result {
            tracing::error!(%error, "checkpoint failed; the log keeps what it holds");
            return;
        }
        self.committed_since_checkpoint = false;
        self.bytes_since_checkpoint = 0;
        // A replicated log is purged by the cluster, once a snapshot covers it.
        if let Some(wal) = self.wal.as_mut()
            && let Err(error) = wal.purge_before(self.applied_index + 1)
        {
            tracing::warn!(%error, "cannot drop old log segments");
        }
    }

    /// Stops taking writes, with an entry in the log that redb may not hold: `jobs`, and every
    /// request after them, fail until the store is opened again and replays the log.
    pub(super) fn stop(&mut self, cause: String, jobs: impl IntoIterator<Item = Box<dyn Job>>) {
        let reason = format!("{cause}; the store takes no writes until it is opened again");
        tracing::error!(%reason);
        fail_all(&reason, jobs);
        self.stopped = Some(reason);
    }

    fn commit_empty_durably(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(self.options.quick_repair);
        txn.commit()?;
        Ok(())
    }

    /// Commits the batch without the operations that poison it, which it returns unanswered.
    pub(super) fn commit_together(&mut self, mut batch: Vec<Box<dyn Job>>) -> Vec<Box<dyn Job>> {
        let mut poisoned = Vec::new();
        loop {
            let started = Instant::now();
            let rewind = self.log.rewind_point();
            match self.write(&mut batch) {
                Ok(()) => {
                    self.committed(&batch, rewind.next_position, started);
                    for job in batch {
                        job.answer();
                    }
                    return poisoned;
                }
                Err(Failure::Poisoned(index)) => {
                    self.log.rewind(rewind);
                    poisoned.push(batch.remove(index));
                    if batch.is_empty() {
                        return poisoned;
                    }
                }
                Err(Failure::Storage(error)) => {
                    self.log.rewind(rewind);
                    if batch.is_empty() {
                        // An index-only commit failed: nothing was logged; do not spin on it.
                        tracing::error!(%error, "index commit failed");
                        std::thread::sleep(Duration::from_millis(100));
                        return poisoned;
                    }
                    // The entry is in the log but not in redb: applying later entries would
                    // answer from a state that replay will not see.
                    let cause =
                        format!("applying log entry {} failed ({error})", self.applied_index);
                    self.stop(cause, batch.into_iter().chain(poisoned));
                    return Vec::new();
                }
            }
        }
    }

    fn committed(&mut self, batch: &[Box<dyn Job>], position_before: u64, started: Instant) {
        self.committed_since_checkpoint = true;
        let events = self.log.next_position - position_before;
        if !batch.is_empty() {
            let appends = batch
                .iter()
                .filter(|job| job.is_append() && job.succeeded())
                .count();
            self.metrics
                .record_commit(appends as u64, events, started.elapsed());
        }
        let head = self.log.next_position;
        // Subscribers wake for new events only, not for index-only commits.
        self.head
            .send_if_modified(|published| std::mem::replace(published, head) != head);
        self.publish_index_progress();
    }

    pub(super) fn publish_index_progress(&mut self) {
        let progress = self.log.indexer.progress();
        *self.index_progress.lock().expect("index progress lock") = progress;
    }

    /// Runs the batch in one non-durable transaction (the log made it durable), then lets the
    /// indexes catch up in the same one.
    fn write(&mut self, batch: &mut [Box<dyn Job>]) -> Result<(), Failure> {
        let mut txn = self.db.begin_write().map_err(storage_failure)?;
        txn.set_quick_repair(self.options.quick_repair);
        txn.set_durability(Durability::None)
            .map_err(|error| Failure::Storage(StoreError::storage(error)))?;
        let position_before = self.log.next_position;
        let stream_id_before = self.log.next_stream_id;
        let mut bytes_written = 0u64;
        {
            let mut tables = Tables::open(&txn).map_err(Failure::Storage)?;
            for (index, job) in batch.iter_mut().enumerate() {
                if job.run(&mut tables, &mut self.log) {
                    return Err(Failure::Poisoned(index));
                }
                if job.is_append() && job.succeeded() {
                    bytes_written += job.payload_bytes() as u64;
                }
            }
            // A caught-up index links all of this batch in its own commit; beyond that, a busy
            // commit takes a smaller bite of any backlog than an idle one.
            let appended = self.log.next_position - position_before;
            let backlog = if batch.is_empty() {
                self.options.index_batch
            } else {
                (self.options.index_batch / 10).max(1)
            };
            let log = &mut self.log;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                log.indexer.advance(
                    &mut tables.for_indexes(),
                    &mut log.next_stream_id,
                    log.next_position,
                    appended + backlog,
                )
            }))
            .unwrap_or_else(|_| Err(StoreError::Storage("the indexes panicked".into())))
            .map_err(Failure::Storage)?;
            if self.log.next_stream_id != stream_id_before {
                tables
                    .meta
                    .insert(NEXT_STREAM_ID, self.log.next_stream_id)
                    .map_err(storage_failure)?;
            }
            if let Some(replica) = &self.replica {
                replica.write_state(&mut tables).map_err(Failure::Storage)?;
            } else if !batch.is_empty() {
                tables
                    .meta
                    .insert(WAL_APPLIED, self.applied_index)
                    .map_err(storage_failure)?;
            }
        }
        self.prepare_next();
        // Readers see the batch only once its log entry is durable.
        self.syncer.wait_for(self.applied_index).map_err(|error| {
            Failure::Storage(StoreError::Storage(format!(
                "syncing the log failed: {error}"
            )))
        })?;
        txn.commit().map_err(storage_failure)?;
        if let Some(replica) = &mut self.replica {
            replica.state_written();
        }
        self.metrics.record_bytes_written(bytes_written);
        Ok(())
    }
}

/// Runs the log's syncs on a thread of their own, in the order they are begun, so the writer
/// applies a batch while the entry holding it reaches the disk.
struct Syncer {
    requests: std::sync::mpsc::Sender<(u64, PendingSync)>,
    results: std::sync::mpsc::Receiver<(u64, std::io::Result<()>)>,
    /// The entry of the last sync begun.
    begun: u64,
    /// The entry of the last sync known to be done.
    done: u64,
    /// Why a sync failed: the log's durable end is unknown from then on, so every wait fails.
    failed: Option<String>,
}

impl Syncer {
    fn start() -> Syncer {
        let (requests, pending) = std::sync::mpsc::channel::<(u64, PendingSync)>();
        let (done, results) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("refract-log-sync".into())
            .spawn(move || {
                // Ends with the writer, which holds the other end.
                for (index, sync) in pending {
                    if done.send((index, sync.run())).is_err() {
                        return;
                    }
                }
            })
            .expect("cannot start the log sync thread");
        Syncer {
            requests,
            results,
            begun: 0,
            done: 0,
            failed: None,
        }
    }

    /// Begins the sync of every log entry up to `index`, after the syncs begun before it.
    fn begin(&mut self, index: u64, sync: PendingSync) {
        debug_assert!(index > self.begun, "syncs are begun in log order");
        self.requests
            .send((index, sync))
            .expect("the log sync thread runs as long as the writer");
        self.begun = index;
    }

    /// Whether a sync that entry `index` waits for is still running.
    fn is_pending(&mut self, index: u64) -> bool {
        while let Ok((done, result)) = self.results.try_recv() {
            self.finished(done, result);
        }
        self.failed.is_none() && self.done < index.min(self.begun)
    }

    /// Waits until the syncs that cover entry `index` are done (those begun up to it).
    fn wait_for(&mut self, index: u64) -> std::io::Result<()> {
        while self.failed.is_none() && self.done < index.min(self.begun) {
            match self.results.recv() {
                Ok((done, result)) => self.finished(done, result),
                Err(_) => self.failed = Some("the log sync thread is gone".into()),
            }
        }
        match &self.failed {
            Some(reason) => Err(std::io::Error::other(reason.clone())),
            None => Ok(()),
        }
    }

    fn finished(&mut self, index: u64, result: std::io::Result<()>) {
        match result {
            Ok(()) => self.done = index,
            Err(error) => {
                self.failed.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// The next request queued: waited for, unless an index is behind (catching up is then work to
/// do between requests, and `Some(None)` says there is no request yet). `None` once the queue
/// is closed.
pub(super) fn next_queued(
    queue: &mut mpsc::Receiver<Queued>,
    behind: bool,
) -> Option<Option<Queued>> {
    if behind {
        match queue.try_recv() {
            Ok(queued) => Some(Some(queued)),
            Err(TryRecvError::Empty) => Some(None),
            Err(TryRecvError::Disconnected) => None,
        }
    } else {
        queue.blocking_recv().map(Some)
    }
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

pub(super) fn fail_all(reason: &str, jobs: impl IntoIterator<Item = Box<dyn Job>>) {
    for job in jobs {
        job.fail(StoreError::Storage(reason.to_owned()));
    }
}

fn storage_failure(error: impl Into<StoreError>) -> Failure {
    Failure::Storage(error.into())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    use crate::store::{ExpectedRevision, NewEvent};

    /// Writes a row, then fails: the kind of operation the poisoning exists for.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub(in crate::store) struct WritesThenFails;

    impl Operation for WritesThenFails {
        type Output = ();

        fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
            let writes = txn.write();
            writes
                .tables
                .meta
                .insert("half-written", 1)
                .map_err(StoreError::storage)?;
            Err(StoreError::InvalidRequest("failed after writing".into()))
        }
    }

    /// Fails before writing: a plain rejection.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub(in crate::store) struct Refused;

    impl Operation for Refused {
        type Output = ();

        fn apply(&self, _txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
            Err(StoreError::InvalidRequest("refused".into()))
        }
    }

    fn event() -> NewEvent {
        NewEvent {
            id: uuid::Uuid::new_v4(),
            event_type: "T".into(),
            data: b"{}".to_vec(),
            binary: false,
            metadata: Vec::new(),
        }
    }

    /// One batch: appends around an operation that fails after writing and one refused
    /// before writing. The refused one is just answered; the poisoning one is taken out, the
    /// rest commit together, and it fails again alone, leaving nothing behind.
    #[test]
    fn an_operation_that_fails_after_writing_leaves_nothing_and_spares_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("test.redb")).unwrap());
        let options = StoreOptions::default();
        let recovered = initialize(&db, &options).unwrap();
        let (head, _) = watch::channel(recovered.next_position);
        let mut writer = Writer::new(
            db.clone(),
            options,
            Arc::new(Metrics::new()),
            head,
            recovered,
            Arc::new(Mutex::new([IndexProgress::default(); 4])),
            Some(
                Wal::open(
                    Box::new(crate::disk::Directory::open(dir.path().join("wal")).unwrap()),
                    1,
                    crate::wal::SEGMENT_BYTES,
                )
                .unwrap(),
            ),
        );
        let append = |stream: &str| {
            queue(crate::store::streams::Append {
                stream: stream.into(),
                expected: ExpectedRevision::NoStream,
                events: vec![event()],
            })
        };
        let (first, first_answer) = append("s-1");
        let (failing, failing_answer) = queue(WritesThenFails);
        let (refused, refused_answer) = queue(Refused);
        let (last, last_answer) = append("s-2");
        let batch = [first, failing, refused, last]
            .into_iter()
            .map(|queued| match queued {
                Queued::Operation(job) => job,
                _ => unreachable!(),
            })
            .collect();
        writer.commit(batch);

        fn answer<T>(mut receiver: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, String> {
            receiver
                .try_recv()
                .unwrap()
                .map_err(|error| error.to_string())
        }
        assert_eq!(answer(first_answer).unwrap().first_position, 0);
        assert_eq!(answer(last_answer).unwrap().first_position, 1);
        assert_eq!(answer(failing_answer), Err("failed after writing".into()));
        assert_eq!(answer(refused_answer), Err("refused".into()));
        assert_eq!(writer.log.next_position, 2);
        let txn = redb::ReadableDatabase::begin_read(&*db).unwrap();
        let meta = txn.open_table(META).unwrap();
        assert!(meta.get("half-written").unwrap().is_none());
        assert_eq!(txn.open_table(LOG).unwrap().len().unwrap(), 2);
    }
}
