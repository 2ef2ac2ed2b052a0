//! The stream store: an append-only log of events in an embedded redb database, indexed by stream.
//!
//! Why it looks like this:
//! - One writer thread owns every write transaction ([`writer`]). Appends queue up while a commit
//!   is in flight and the next commit takes all of them at once (group commit), so a single fsync
//!   acknowledges many requests. Positions are assigned there, in order, so `$all` has no gaps.
//! - Readers ([`read`]) open redb read transactions: they see a committed snapshot and never wait
//!   for the writer, and the writer never waits for them.
//! - A stream costs one row in `streams` plus one index entry per event; nothing per stream stays
//!   in memory, so millions of streams are cheap.
//!
//! Tables (all keys big-endian-ordered by redb's tuple encoding):
//! - `log`: position → [`record::EventRecord`] bytes.
//! - `streams`: name → [`record::StreamState`] bytes.
//! - `stream_index`: (stream id, revision) → position, for streams clients write.
//! - `links`: (stream id, chunk) → up to 64 positions, for the output streams of the built-in
//!   indexes (`$ce-…`, `$et-…`): a link is 8 bytes pointing at the original event, no copy of it.
//! - `meta`: counters that must survive restarts (the next stream id).
//! - `index_cursors`: per built-in index ([`indexes`]), whether it runs and its checkpoint.
//! - `settings`: the indexes' configuration.
//! - projections' definitions, components, checkpoints, state and rows ([`projection_data`]).
//! - consumer groups' records and parking reasons ([`group_data`]).
//! - connectors' definitions and checkpoints ([`connector_data`]).

pub(crate) mod connector_data;
pub(crate) mod group_data;
pub(crate) mod indexes;
mod logged;
pub(crate) mod projection_data;
mod read;
pub(crate) mod record;
pub mod replicated;
mod sharder_data;
pub(crate) mod snapshot;
mod streams;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::disk::{Directory, LogStorage};
use crate::metrics::Metrics;
use crate::wal::Wal;
use group_data::{GROUPS, PARKED_REASONS};
use projection_data::{COMPONENTS, PROJECTIONS, SHARDERS};
// The types the `Store` handle's methods take and give.
pub use connector_data::{CONNECTOR_CHANGED, CONNECTOR_MOVED, StoredConnector};
pub use group_data::Parking;
pub use indexes::{CategoryPosition, IndexConfig, IndexProgress, SystemIndex};
pub use projection_data::{
    BuildChange, Building, Checkpoint, DataChange, KeyPage, ParkedEvent, ProjectionCommit,
    ProjectionView, RowChange, RowPage, StoredProjection, parked_stream,
};
pub use read::{AllFilter, Slice};
pub use record::EventRecord;
use record::StreamState;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
pub(crate) const STREAM_INDEX: TableDefinition<(u64, u64), u64> =
    TableDefinition::new("stream_index");
pub(crate) const LINKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("links");
/// redb's page size: table statistics count pages.
const PAGE_BYTES: u64 = 4096;
/// Links per `links` row: the positions of revisions `chunk * 64 .. chunk * 64 + 63`.
pub(crate) const LINKS_PER_CHUNK: u64 = 64;
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const NEXT_STREAM_ID: &str = "next_stream_id";
/// The last write-ahead log entry the database holds.
pub(crate) const WAL_APPLIED: &str = "wal_applied";
/// Streams created by clients' writes, as opposed to the indexes' output streams.
pub(crate) const CLIENT_STREAMS: &str = "client_streams";
pub(crate) const INDEX_CURSORS: TableDefinition<&str, (bool, u64)> =
    TableDefinition::new("index_cursors");
pub(crate) const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
pub(crate) const INDEX_CONFIG: &str = "index_config";

/// The name of the database file inside the data directory.
pub const DATABASE_FILE: &str = "refract.redb";
/// How often a store makes its database durable unless told otherwise.
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// The write-ahead log's directory in the data directory.
pub const WAL_DIR: &str = "wal";

/// Largest event (type, data and metadata together) the store accepts.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// Longest event type, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 1024;

/// How a write states what it expects the stream to look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ExpectedRevision {
    #[default]
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
}

impl ExpectedRevision {
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            ExpectedRevision::Any => true,
            ExpectedRevision::NoStream => current.is_none(),
            ExpectedRevision::StreamExists => current.is_some(),
            ExpectedRevision::Exact(revision) => current == Some(revision),
        }
    }
}

impl std::str::FromStr for ExpectedRevision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "any" => Ok(ExpectedRevision::Any),
            "no_stream" => Ok(ExpectedRevision::NoStream),
            "stream_exists" => Ok(ExpectedRevision::StreamExists),
            number => parse_revision(number).map(ExpectedRevision::Exact).ok_or_else(|| {
                format!(
                    "expected revision must be any, no_stream, stream_exists or a revision number, not {number:?}"
                )
            }),
        }
    }
}

/// Why `event_type` cannot be stored, if it cannot: it must be 1 to 1024 bytes without control
/// characters.
pub fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.is_empty() {
        return Err("type is required and must not be empty".into());
    }
    if event_type.len() > MAX_EVENT_TYPE_BYTES {
        return Err(format!("type is longer than {MAX_EVENT_TYPE_BYTES} bytes"));
    }
    if event_type.chars().any(char::is_control) {
        return Err("type must not contain control characters".into());
    }
    Ok(())
}

/// A revision or position in text: 1 to 19 ASCII digits (every real one fits), nothing else.
pub fn parse_revision(text: &str) -> Option<u64> {
    let digits = (1..=19).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

impl std::fmt::Display for ExpectedRevision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedRevision::Any => f.write_str("any"),
            ExpectedRevision::NoStream => f.write_str("no_stream"),
            ExpectedRevision::StreamExists => f.write_str("stream_exists"),
            ExpectedRevision::Exact(revision) => write!(f, "{revision}"),
        }
    }
}

/// An event to append. `data` is JSON text unless `binary`; `metadata` is a JSON object's text
/// or empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: String,
    pub data: Vec<u8>,
    pub binary: bool,
    pub metadata: Vec<u8>,
}

impl NewEvent {
    pub fn size(&self) -> usize {
        self.event_type.len() + self.data.len() + self.metadata.len()
    }
}

/// Where an append landed: revisions in the stream and positions in `$all`, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendOutcome {
    pub first_revision: u64,
    pub last_revision: u64,
    pub first_position: u64,
    pub last_position: u64,
}

/// A stream's metadata. Unset limits are `None`; `custom` is the user's own JSON object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamMetadata {
    /// Only the last `max_count` events are readable.
    pub max_count: Option<u64>,
    /// Events older than this many seconds are not readable.
    pub max_age_seconds: Option<u64>,
    /// Events with a revision below this are not readable.
    pub truncate_before: Option<u64>,
    /// Free-form JSON object for the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub custom: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// An event as read. When reached through a link (a system stream's entry), `stream` and
/// `revision` are the original event's and `link` says where the link lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub stream: String,
    pub revision: u64,
    pub position: u64,
    pub id: Uuid,
    pub event_type: String,
    pub data: Vec<u8>,
    pub binary: bool,
    pub metadata: Vec<u8>,
    pub created_ms: i64,
    pub link: Option<LinkInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub stream: String,
    pub revision: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("expected revision {expected} but the stream is at {}", describe_revision(*.actual))]
    WrongExpectedRevision {
        expected: ExpectedRevision,
        actual: Option<u64>,
    },
    #[error("stream {0:?} does not exist")]
    StreamNotFound(String),
    #[error("stream {0:?} has been deleted permanently")]
    StreamDeleted(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the store is shutting down")]
    ShuttingDown,
    /// A write reached a node of a cluster that is not its leader (or stopped being it before
    /// the write was committed).
    #[error("this node is not the cluster's leader")]
    NotLeader { leader_url: Option<String> },
    /// The cluster cannot answer now (no majority reachable).
    #[error("{0}")]
    Unavailable(String),
    #[error("storage failure: {0}")]
    Storage(String),
}

fn describe_revision(revision: Option<u64>) -> String {
    revision.map_or_else(|| "no stream".to_owned(), |r| format!("revision {r}"))
}

impl StoreError {
    fn storage(error: impl std::fmt::Display) -> Self {
        StoreError::Storage(error.to_string())
    }
}

macro_rules! impl_from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> Self { StoreError::storage(error) }
        }
    )*};
}
impl_from_redb!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    record::CorruptRecord
);

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Sync the write-ahead log before acknowledging a write. Turning this off trades the last
    /// moments of writes on a power loss for throughput; the store stays consistent either way.
    pub durable: bool,
    /// How often the database is made durable (a checkpoint), which bounds the log replayed
    /// when the store opens.
    pub checkpoint_interval: std::time::Duration,
    /// Memory for redb's page cache.
    pub cache_bytes: usize,
    /// Bytes of each write-ahead log segment.
    pub log_segment_bytes: u64,
    /// Save redb's allocator state with every durable commit (and commit in two phases), so
    /// that opening after a crash takes milliseconds instead of a walk over the whole file.
    /// Costs a second fsync per checkpoint, not per append.
    pub quick_repair: bool,
    /// Most events an index catches up on in one commit without appends; a commit with appends
    /// takes a tenth of this beyond its own events.
    pub index_batch: u64,
    /// The indexes' configuration; `None` keeps the stored one. A change resets the indexes it
    /// affects.
    pub index_config: Option<IndexConfig>,
}

/// The page cache a store gets by default: a quarter of the machine's memory (1 GiB where that
/// cannot be read). It is a bound, not an allocation: it fills as pages are read and written.
pub fn default_cache_bytes() -> usize {
    const FALLBACK: usize = 1 << 30;
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<usize>().ok()
        });
    total_kib.map_or(FALLBACK, |kib| (kib * 1024 / 4).max(256 << 20))
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durable: true,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            cache_bytes: default_cache_bytes(),
            log_segment_bytes: crate::wal::SEGMENT_BYTES,
            quick_repair: true,
            index_batch: 100_000,
            index_config: None,
        }
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    requests: mpsc::Sender<writer::Queued>,
    head: watch::Receiver<u64>,
    index_progress: Arc<Mutex<[IndexProgress; 4]>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// Wakes the writer every checkpoint interval (within 10 ms to 1 s), so a checkpoint never
/// waits for the next write. Holds the queue weakly: it ends once the store is gone.
fn start_ticks(
    queue: mpsc::WeakSender<writer::Queued>,
    interval: std::time::Duration,
) -> Result<(), StoreError> {
    let interval = interval.clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    std::thread::Builder::new()
        .name("refract-checkpoint-tick".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let Some(queue) = queue.upgrade() else {
                    return;
                };
                // A full queue has writes to carry the checkpoint already.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    queue.try_send(writer::Queued::Tick)
                {
                    return;
                }
            }
        })
        .map_err(StoreError::storage)?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `data_dir` and starts its writer.
    pub fn open(
        data_dir: &Path,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Storage(format!("cannot create {}: {error}", data_dir.display()))
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(&path)?;
        let wal_dir = data_dir.join(WAL_DIR);
        let log = Directory::open(wal_dir.clone()).map_err(|error| {
            StoreError::Storage(format!("cannot open {}: {error}", wal_dir.display()))
        })?;
        Store::open_on(db, path, Box::new(log), options, metrics)
    }

    /// Opens a store on a database and a log storage of the caller's (a simulated disk in
    /// tests); `path` names the database.
    pub(crate) fn open_on(
        db: Database,
        path: PathBuf,
        log: Box<dyn LogStorage>,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let db = Arc::new(db);
        if replicated::read_state(&db.begin_read()?)?.applied.is_some() {
            return Err(StoreError::Storage(format!(
                "{} holds a cluster node's store: start it with its --node-id",
                path.display()
            )));
        }
        let recovered = writer::initialize(&db, &options)?;
        let wal = Wal::open(log, recovered.wal_applied + 1, options.log_segment_bytes).map_err(
            |error| StoreError::Storage(format!("cannot open the write-ahead log: {error}")),
        )?;
        Store::start(db, path, recovered, Some(wal), None, options, metrics)
    }

    /// Opens (or creates) a store in `data_dir` whose log a cluster keeps: the writer hands its
    /// batches to `proposer`, and the cluster applies its committed entries with
    /// [`Store::apply_replicated`]. `node_id` tells this node's proposals from others'.
    pub fn open_replicated(
        data_dir: &Path,
        options: StoreOptions,
        metrics: Arc<Metrics>,
        node_id: u64,
        proposer: Box<dyn replicated::Proposer>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Storage(format!("cannot create {}: {error}", data_dir.display()))
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let single_log = data_dir.join(WAL_DIR);
        if std::fs::read_dir(&single_log).is_ok_and(|mut items| items.next().is_some()) {
            return Err(StoreError::Storage(format!(
                "{} holds a single node's store: a node of a cluster starts on a new data \
                 directory (and joins with --join to get the cluster's data)",
                data_dir.display()
            )));
        }
        let db = Arc::new(
            redb::Builder::new()
                .set_cache_size(options.cache_bytes)
                .create(&path)?,
        );
        let recovered = writer::initialize(&db, &options)?;
        let replica = replicated::Replica::new(&db, node_id, proposer)?;
        Store::start(db, path, recovered, None, Some(replica), options, metrics)
    }

    /// Starts the writer on a database, after replaying `wal` (a single node's log) into it.
    fn start(
        db: Arc<Database>,
        path: PathBuf,
        recovered: writer::Recovered,
        wal: Option<Wal>,
        replica: Option<replicated::Replica>,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let (head_sender, head) = watch::channel(recovered.next_position);
        let (requests, queue) = mpsc::channel(writer::QUEUE_CAPACITY);
        let index_progress = Arc::new(Mutex::new([IndexProgress::default(); 4]));
        let mut writer = writer::Writer::new(
            db.clone(),
            options,
            metrics,
            head_sender,
            recovered,
            index_progress.clone(),
            wal,
        );
        let started = std::time::Instant::now();
        let replayed = writer.replay()?;
        if replayed > 0 {
            tracing::info!(
                entries = replayed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the write-ahead log"
            );
        }
        let checkpoint_interval = writer.checkpoint_interval();
        let replicated = replica.is_some();
        writer.replica = replica;
        let writer_thread = std::thread::Builder::new()
            .name("refract-writer".into())
            .spawn(move || {
                if replicated {
                    writer.run_replicated(queue)
                } else {
                    writer.run(queue)
                }
            })
            .map_err(StoreError::storage)?;
        start_ticks(requests.downgrade(), checkpoint_interval)?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                path,
                requests,
                head,
                index_progress,
                writer_thread: Mutex::new(Some(writer_thread)),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The position the next event will get: the number of events in `$all`.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// Requests waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        let requests = &self.inner.requests;
        requests.max_capacity() - requests.capacity()
    }

    /// A receiver that changes whenever a commit makes new events visible.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.clone()
    }

    pub async fn append(
        &self,
        stream: String,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.submit(streams::Append {
            stream,
            expected,
            events,
        })
        .await
    }

    pub async fn set_metadata(
        &self,
        stream: String,
        metadata: StreamMetadata,
    ) -> Result<(), StoreError> {
        self.submit(streams::SetMetadata { stream, metadata }).await
    }

    /// Soft delete (`hard == false`): reads answer "not found" and a later append continues the
    /// numbering. Hard delete: the stream is tombstoned for good.
    pub async fn delete(
        &self,
        stream: String,
        expected: ExpectedRevision,
        hard: bool,
    ) -> Result<(), StoreError> {
        self.submit(streams::Delete {
            stream,
            expected,
            hard,
        })
        .await
    }

    /// How far each built-in index has got.
    pub fn index_progress(&self, index: SystemIndex) -> IndexProgress {
        self.inner
            .index_progress
            .lock()
            .expect("index progress lock")[index.slot()]
    }

    /// Starts or stops a built-in index. A started index catches up from its checkpoint.
    pub async fn set_index_running(
        &self,
        index: SystemIndex,
        running: bool,
    ) -> Result<(), StoreError> {
        self.submit(indexes::SetRunning { index, running }).await
    }

    /// Drops a built-in index's output streams; it then rebuilds them from position 0.
    pub async fn reset_index(&self, index: SystemIndex) -> Result<(), StoreError> {
        self.submit(indexes::Reset { index }).await
    }

    /// Replaces the indexes' configuration, resetting the indexes whose output it changes.
    pub async fn set_index_config(&self, config: IndexConfig) -> Result<(), StoreError> {
        self.submit(indexes::SetConfig { config }).await
    }

    /// The indexes' configuration. Blocking.
    pub fn index_config(&self) -> Result<IndexConfig, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let settings = txn.open_table(SETTINGS)?;
        match settings.get(INDEX_CONFIG)? {
            Some(json) => serde_json::from_slice(json.value()).map_err(StoreError::storage),
            None => Ok(IndexConfig::default()),
        }
    }

    /// Creates or replaces a projection's definition and returns the id its data lives under.
    /// `component_bytes` may be left out when the component is already stored.
    pub async fn save_projection(
        &self,
        name: String,
        component: String,
        definition: serde_json::Value,
        component_bytes: Option<Vec<u8>>,
        data: DataChange,
    ) -> Result<u64, StoreError> {
        self.submit(projection_data::SaveProjection {
            name,
            component,
            definition,
            component_bytes,
            data,
        })
        .await
    }

    /// Removes a projection and its data; with `delete_outputs` also the streams it wrote.
    pub async fn remove_projection(
        &self,
        name: String,
        delete_outputs: bool,
    ) -> Result<(), StoreError> {
        self.submit(projection_data::RemoveProjection {
            name,
            delete_outputs,
        })
        .await
    }

    /// Starts, cancels or switches in a projection's rebuild; returns the data id it concerns.
    pub async fn build_projection(
        &self,
        name: String,
        change: BuildChange,
    ) -> Result<u64, StoreError> {
        self.submit(projection_data::BuildProjection { name, change })
            .await
    }

    /// Sets aside the event projection `projection` (data `data`) stopped at, by hand: linked
    /// from its parked stream with `reason` (JSON); the checkpoint moves past it.
    pub async fn skip_projection_event(
        &self,
        projection: String,
        data: u64,
        position: u64,
        reason: Vec<u8>,
    ) -> Result<Checkpoint, StoreError> {
        self.submit(projection_data::SkipEvent {
            projection,
            data,
            position,
            reason,
        })
        .await
    }

    /// The streams of events the live version of `name` emitted to (and still owns), and the
    /// events a read of them shows: what a switch that replaces emitted streams may rewrite.
    /// Blocking; reads every such stream.
    pub fn emitted_footprint(&self, name: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let projections = txn.open_table(PROJECTIONS)?;
        let Some(json) = projections.get(name)? else {
            return Ok(None);
        };
        let stored: StoredProjection =
            serde_json::from_slice(json.value()).map_err(StoreError::storage)?;
        let outputs = txn.open_table(projection_data::OUTPUTS)?;
        let owners = txn.open_table(projection_data::STREAM_OWNERS)?;
        let (log, streams) = (txn.open_table(LOG)?, txn.open_table(STREAMS)?);
        let (index, links) = (txn.open_table(STREAM_INDEX)?, txn.open_table(LINKS)?);
        let (mut count, mut events) = (0, 0);
        for entry in outputs.range((stored.data, "")..(stored.data + 1, ""))? {
            let (key, is_link) = entry?;
            let stream = key.value().1;
            let owned = owners
                .get(stream)?
                .is_some_and(|owner| owner.value() == name);
            if is_link.value() || !owned {
                continue;
            }
            count += 1;
            events += visible_events(&streams, &index, &links, &log, stream)?.len() as u64;
        }
        Ok(Some((count, events)))
    }

    /// What a switch to the version of `name` being rebuilt would rewrite if it replaced the
    /// emitted streams now: (streams soft-deleted and written again, events they get).
    /// `None` without a rebuild. Blocking; reads every stream the versions emitted to.
    pub fn rewrite_preview(&self, name: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let projections = txn.open_table(PROJECTIONS)?;
        let Some(json) = projections.get(name)? else {
            return Ok(None);
        };
        let stored: StoredProjection =
            serde_json::from_slice(json.value()).map_err(StoreError::storage)?;
        let Some(building) = stored.building else {
            return Ok(None);
        };
        let shadow = txn.open_table(projection_data::SHADOW_EVENTS)?;
        let mut emitted: std::collections::BTreeMap<String, Vec<NewEvent>> = Default::default();
        for entry in shadow.range((building.data, 0)..(building.data + 1, 0))? {
            let (_, bytes) = entry?;
            let record = record::EventRecord::decode(bytes.value())?;
            emitted
                .entry(record.stream.to_owned())
                .or_default()
                .push(projection_data::new_event(&record));
        }
        let outputs = txn.open_table(projection_data::OUTPUTS)?;
        for entry in outputs.range((stored.data, "")..(stored.data + 1, ""))? {
            let (key, is_link) = entry?;
            if !is_link.value() {
                emitted.entry(key.value().1.to_owned()).or_default();
            }
        }
        let (log, streams) = (txn.open_table(LOG)?, txn.open_table(STREAMS)?);
        let (index, links) = (txn.open_table(STREAM_INDEX)?, txn.open_table(LINKS)?);
        let (mut rewritten, mut events) = (0, 0);
        for (stream, new) in &emitted {
            let visible = visible_events(&streams, &index, &links, &log, stream)?;
            if projection_data::extends(&visible, new).is_none() {
                rewritten += 1;
                events += new.len() as u64;
            }
        }
        Ok(Some((rewritten, events)))
    }

    /// Commits a projection's batch: its effects and checkpoint, all or nothing.
    pub async fn commit_projection(&self, commit: ProjectionCommit) -> Result<(), StoreError> {
        self.submit(projection_data::CommitProjection { commit })
            .await
    }

    /// Stores a sharder's component under `name`, replacing the one it had.
    pub async fn save_sharder(
        &self,
        name: String,
        component: String,
        component_bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.submit(sharder_data::SaveSharder {
            name,
            component,
            component_bytes,
        })
        .await
    }

    pub async fn remove_sharder(&self, name: String) -> Result<(), StoreError> {
        self.submit(sharder_data::RemoveSharder { name }).await
    }

    /// Every stored sharder: name and component sha256. Blocking.
    pub fn stored_sharders(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(SHARDERS)?;
        let mut sharders = Vec::new();
        for entry in table.iter()? {
            let (name, sha256) = entry?;
            sharders.push((name.value().to_owned(), sha256.value().to_owned()));
        }
        Ok(sharders)
    }

    /// Creates or replaces a consumer group's record.
    pub async fn save_group(
        &self,
        stream: String,
        group: String,
        record: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.submit(group_data::SaveGroup {
            stream,
            group,
            record,
        })
        .await
    }

    /// Removes a group's record, parking reasons and parked stream.
    pub async fn remove_group(
        &self,
        stream: String,
        group: String,
        parked_stream: String,
    ) -> Result<(), StoreError> {
        self.submit(group_data::RemoveGroup {
            stream,
            group,
            parked_stream,
        })
        .await
    }

    /// Links messages from a group's parked stream, with their reasons; durable when answered.
    pub async fn park(&self, parking: Parking) -> Result<(), StoreError> {
        self.submit(group_data::ParkMessages { parking }).await
    }

    /// Creates or replaces a connector's definition, keeping its checkpoint unless one is given;
    /// answers the connector's new generation.
    pub async fn save_connector(
        &self,
        name: String,
        definition: Vec<u8>,
        checkpoint: Option<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        self.submit(connector_data::SaveConnector {
            name,
            definition,
            checkpoint,
        })
        .await
    }

    pub async fn remove_connector(&self, name: String) -> Result<(), StoreError> {
        self.submit(connector_data::RemoveConnector { name }).await
    }

    /// Stores a connector's checkpoint with the events it lands, in one commit; refused when
    /// the connector is no longer in `generation` or its checkpoint is no longer `previous`.
    pub async fn commit_connector(
        &self,
        name: String,
        generation: u64,
        previous: Vec<u8>,
        checkpoint: Vec<u8>,
        appends: Vec<(String, Vec<NewEvent>)>,
    ) -> Result<(), StoreError> {
        self.submit(connector_data::CommitConnector {
            name,
            generation,
            previous,
            checkpoint,
            appends,
        })
        .await
    }

    /// A connector's generation and checkpoint, if it exists. Blocking.
    pub fn connector_checkpoint(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let checkpoints = txn.open_table(connector_data::CONNECTOR_CHECKPOINTS)?;
        Ok(checkpoints.get(name)?.map(|entry| {
            let (generation, checkpoint) = entry.value();
            (generation, checkpoint.to_vec())
        }))
    }

    /// Every stored connector. Blocking.
    pub fn stored_connectors(&self) -> Result<Vec<StoredConnector>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let definitions = txn.open_table(connector_data::CONNECTORS)?;
        let checkpoints = txn.open_table(connector_data::CONNECTOR_CHECKPOINTS)?;
        let mut connectors = Vec::new();
        for entry in definitions.iter()? {
            let (name, definition) = entry?;
            let (generation, checkpoint) = match checkpoints.get(name.value())? {
                Some(entry) => {
                    let (generation, checkpoint) = entry.value();
                    (generation, checkpoint.to_vec())
                }
                None => (0, Vec::new()),
            };
            connectors.push(StoredConnector {
                name: name.value().to_owned(),
                definition: definition.value().to_vec(),
                generation,
                checkpoint,
            });
        }
        Ok(connectors)
    }

    /// Every stored group: (stream, group, record). Blocking.
    pub fn stored_groups(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(GROUPS)?;
        let mut groups = Vec::new();
        for entry in table.iter()? {
            let (key, record) = entry?;
            let (stream, group) = key.value();
            groups.push((stream.to_owned(), group.to_owned(), record.value().to_vec()));
        }
        Ok(groups)
    }

    /// Why a group parked the event at `position`, if it did. Blocking.
    pub fn parked_reason(
        &self,
        stream: &str,
        group: &str,
        position: u64,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(PARKED_REASONS)?;
        Ok(table
            .get((stream, group, position))?
            .map(|reason| reason.value().to_owned()))
    }

    /// Every stored projection definition, by name. Blocking.
    pub fn stored_projections(&self) -> Result<Vec<(String, StoredProjection)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(PROJECTIONS)?;
        let mut projections = Vec::new();
        for entry in table.iter()? {
            let (name, json) = entry?;
            let stored = serde_json::from_slice(json.value()).map_err(StoreError::storage)?;
            projections.push((name.value().to_owned(), stored));
        }
        Ok(projections)
    }

    /// The component of the projection `name` (its live version), if it exists. Blocking.
    pub fn stored_projection_component(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let stored = {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(PROJECTIONS)?;
            match table.get(name)? {
                Some(json) => serde_json::from_slice::<StoredProjection>(json.value())
                    .map_err(StoreError::storage)?,
                None => return Ok(None),
            }
        };
        self.component(&stored.component)
    }

    /// A stored component's bytes. Blocking.
    pub fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(COMPONENTS)?;
        Ok(table.get(sha256)?.map(|bytes| bytes.value().to_vec()))
    }

    /// A snapshot of a projection's data. Blocking.
    pub fn projection_view(&self, data: u64) -> Result<ProjectionView, StoreError> {
        let txn = self.inner.db.begin_read()?;
        ProjectionView::open(&txn, data)
    }

    /// A snapshot of the data projection `name` serves now, found in the same read transaction
    /// as the data itself: a reset or a rebuild's switch is seen whole or not at all. `None`
    /// when there is no such projection. Blocking.
    pub fn served_projection_view(&self, name: &str) -> Result<Option<ProjectionView>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(PROJECTIONS)?;
        let Some(json) = table.get(name)? else {
            return Ok(None);
        };
        let stored: StoredProjection =
            serde_json::from_slice(json.value()).map_err(StoreError::storage)?;
        ProjectionView::open(&txn, stored.data).map(Some)
    }

    /// Visits the log's records in `from..to`, in order, until `visit` returns `false`.
    /// Blocking.
    pub fn scan_log(
        &self,
        from: u64,
        to: u64,
        mut visit: impl FnMut(u64, record::EventRecord<'_>) -> bool,
    ) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        for entry in log.range(from..to)? {
            let (position, bytes) = entry?;
            if !visit(
                position.value(),
                record::EventRecord::decode(bytes.value())?,
            ) {
                break;
            }
        }
        Ok(())
    }

    async fn submit<O: writer::Operation>(&self, operation: O) -> Result<O::Output, StoreError> {
        let (queued, answer) = writer::queue(operation);
        self.send(queued).await?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn send(&self, queued: writer::Queued) -> Result<(), StoreError> {
        self.inner
            .requests
            .send(queued)
            .await
            .map_err(|_| StoreError::ShuttingDown)
    }

    /// Reads a stream. Blocking: call from a blocking context.
    pub fn read_stream(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
        resolve_links: bool,
    ) -> Result<Slice, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let tables = read::ReadTables::open(&txn)?;
        read::read_stream(&tables, stream, from, direction, limit, resolve_links)
    }

    /// Reads `$all`. Blocking: call from a blocking context.
    pub fn read_all(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
        filter: &AllFilter,
    ) -> Result<Slice, StoreError> {
        let txn = self.inner.db.begin_read()?;
        read::read_all(&txn, from, direction, limit, filter)
    }

    /// The last revision of a stream as writers see it: `None` when it does not exist or was
    /// soft-deleted; an error when it was tombstoned. Blocking.
    pub fn last_revision(&self, stream: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        match read::ReadTables::open(&txn)?.stream_state(stream)? {
            Some(state) if state.tombstoned => Err(StoreError::StreamDeleted(stream.to_owned())),
            Some(state) => Ok(state.current_revision()),
            None => Ok(None),
        }
    }

    /// Runs blocking store work (the reads above) on the runtime's blocking pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|error| StoreError::Storage(format!("read task failed: {error}")))?
    }

    /// The metadata of a stream, or `None` when it has none. Blocking.
    pub fn metadata(&self, stream: &str) -> Result<Option<StreamMetadata>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let state = read::ReadTables::open(&txn)?.stream_state(stream)?;
        match state {
            Some(state) if state.tombstoned => Err(StoreError::StreamDeleted(stream.to_owned())),
            Some(state) => read::parse_metadata(&state.metadata).map(Some),
            None => Ok(None),
        }
    }

    /// How many links the built-in indexes hold and the bytes of the pages holding them.
    /// Blocking; reads every `links` row.
    pub fn links_footprint(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.inner.db.begin_read()?;
        let links = txn.open_table(LINKS)?;
        let mut count = 0;
        for chunk in links.iter()? {
            count += (chunk?.1.value().len() / 8) as u64;
        }
        let stats = links.stats()?;
        Ok((
            count,
            (stats.leaf_pages() + stats.branch_pages()) * PAGE_BYTES,
        ))
    }

    /// Bytes of the database pages in use by every table (the file itself grows in larger
    /// steps). Blocking.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.table_bytes()?.iter().map(|(_, bytes)| bytes).sum())
    }

    /// The bytes of database pages each table uses, largest first. Blocking.
    pub fn table_bytes(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let mut tables = Vec::new();
        for table in txn.list_tables()? {
            let name = redb::TableHandle::name(&table).to_owned();
            let stats = txn.open_untyped_table(table)?.stats()?;
            tables.push((
                name,
                (stats.leaf_pages() + stats.branch_pages()) * PAGE_BYTES,
            ));
        }
        tables.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
        Ok(tables)
    }

    /// The number of streams clients have created (not counting system output streams). Blocking.
    pub fn stream_count(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(CLIENT_STREAMS)?.map_or(0, |count| count.value()))
    }

    /// Stops the writer after it has committed and answered everything queued before this call.
    /// Appends submitted afterwards fail with [`StoreError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let (reply, stopped) = oneshot::channel();
        if self
            .inner
            .requests
            .send(writer::Queued::Shutdown(reply))
            .await
            .is_ok()
        {
            let _ = stopped.await;
        }
        let thread = self
            .inner
            .writer_thread
            .lock()
            .expect("writer handle")
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Loads a stream's state, with its next revision taken from its last index or links entry.
pub(crate) fn load_stream(
    streams: &impl ReadableTable<&'static str, &'static [u8]>,
    index: &impl ReadableTable<(u64, u64), u64>,
    links: &impl ReadableTable<(u64, u64), &'static [u8]>,
    name: &str,
) -> Result<Option<StreamState>, StoreError> {
    let Some(bytes) = streams.get(name)? else {
        return Ok(None);
    };
    let mut state = StreamState::decode(bytes.value())?;
    let after_last = if state.links {
        let last = links
            .range((state.id, 0)..=(state.id, u64::MAX))?
            .next_back()
            .transpose()?;
        last.map_or(0, |(key, chunk)| {
            key.value().1 * LINKS_PER_CHUNK + (chunk.value().len() / 8) as u64
        })
    } else {
        let last = index
            .range((state.id, 0)..=(state.id, u64::MAX))?
            .next_back()
            .transpose()?;
        last.map_or(0, |(key, _)| key.value().1 + 1)
    };
    state.next_revision = after_last.max(state.deleted_before);
    Ok(Some(state))
}

/// The events a read of the stream shows now, as they were written (none for a stream of links
/// or a deleted one).
pub(crate) fn visible_events(
    streams: &impl ReadableTable<&'static str, &'static [u8]>,
    index: &impl ReadableTable<(u64, u64), u64>,
    links: &impl ReadableTable<(u64, u64), &'static [u8]>,
    log: &impl ReadableTable<u64, &'static [u8]>,
    stream: &str,
) -> Result<Vec<NewEvent>, StoreError> {
    let Some(state) = load_stream(streams, index, links, stream)? else {
        return Ok(Vec::new());
    };
    if state.links || state.tombstoned || state.soft_deleted {
        return Ok(Vec::new());
    }
    let mut events = Vec::new();
    for entry in index.range((state.id, state.deleted_before)..(state.id, state.next_revision))? {
        let (_, position) = entry?;
        let Some(bytes) = log.get(position.value())? else {
            continue;
        };
        let record = record::EventRecord::decode(bytes.value())?;
        events.push(projection_data::new_event(&record));
    }
    Ok(events)
}

#[cfg(test)]
mod tests;
