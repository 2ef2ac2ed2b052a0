//! Connectors: a Kafka sink that sends Refract's events to a topic and a Kafka source that
//! lands a topic's records in streams, both exactly once, run by the server itself.
//!
//! A connector's definition and checkpoint live in the store ([`crate::store::StoredConnector`]),
//! so they survive restarts and, in a cluster, move with the leader, which runs them with the
//! rest of the processing. Each running connector is a task that runs sessions: a session
//! connects, recovers its place from the broker and the checkpoint, and works until it fails
//! or is stopped. A failure talking to Kafka (a broker down, a topic missing) shows in the
//! status and the next session starts after a backoff; a failure that retrying cannot fix (a
//! sharder that is gone or traps, a stream that refuses events) faults the connector until it is
//! started again.

pub mod definition;
pub mod kafka;
mod progress;
pub mod sink;
pub mod source;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

pub use definition::Definition;
use progress::Progress;
pub use progress::State;

use crate::names::Name;
use crate::projections::component::{Partitioning, Runtime};
use crate::sharding::Sharders;
use crate::store::{NewEvent, Store, StoreError};

/// The first wait after a failed session; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("no connector is named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no sharder is named {0:?}")]
    NoSharder(String),
    #[error("no projection is named {0:?}")]
    NoProjection(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A connector as the API shows it: its definition and how it is doing.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ConnectorInfo)]
pub struct Info {
    pub name: String,
    #[serde(flatten)]
    pub definition: Definition,
    pub status: State,
    /// Whether the last session reached the broker and is working.
    pub connected: bool,
    /// Sink: the position of the last event it has sent or passed over (`null` before the
    /// first).
    pub position: Option<u64>,
    /// Source: the next offset of each partition.
    pub offsets: BTreeMap<String, i64>,
    /// Sink: events in `$all` after `position`. Source: records after the offsets, as of the
    /// last fetch.
    pub lag: u64,
    /// Events sent (sink) or landed (source) since the connector started on this server.
    pub events: u64,
    pub events_per_second: f64,
    /// The last failure, kept after recovering from it.
    pub last_error: Option<String>,
}

/// What the store keeps as a connector's definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    definition: Definition,
    /// Whether it should run (`stop` clears it).
    enabled: bool,
}

struct Entry {
    stored: Stored,
    generation: u64,
    progress: Progress,
    task: Option<Task>,
}

struct Task {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// The server's connectors.
#[derive(Clone)]
pub struct Connectors {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sharders: Sharders,
    runtime: Runtime,
    connectors: Mutex<BTreeMap<String, Entry>>,
}

impl Connectors {
    /// Loads the stored connectors and starts those that were running.
    pub async fn open(
        store: Store,
        sharders: Sharders,
        runtime: Runtime,
    ) -> anyhow::Result<Connectors> {
        let stored = store.blocking(|store| store.stored_connectors()).await?;
        let connectors = Connectors {
            inner: Arc::new(Inner {
                store,
                sharders,
                runtime,
                connectors: Mutex::new(BTreeMap::new()),
            }),
        };
        {
            let mut entries = connectors.inner.connectors.lock().await;
            for connector in stored {
                let stored: Stored = match serde_json::from_slice(&connector.definition) {
                    Ok(stored) => stored,
                    Err(error) => {
                        tracing::error!(connector = %connector.name, %error, "cannot read connector");
                        continue;
                    }
                };
                let mut entry = Entry {
                    stored,
                    generation: connector.generation,
                    progress: Progress::default(),
                    task: None,
                };
                if entry.stored.enabled {
                    connectors.spawn(&connector.name, &mut entry);
                }
                entries.insert(connector.name, entry);
            }
        }
        Ok(connectors)
    }

    /// Creates (`true`) or replaces a connector. A new one starts at once; a replaced one keeps
    /// running or stopped, and keeps its checkpoint while its kind, topic and source stay.
    pub async fn put(
        &self,
        name: &str,
        definition: Definition,
    ) -> Result<(bool, Info), ConnectorError> {
        Name::Connector
            .check(name)
            .map_err(ConnectorError::Invalid)?;
        definition.check().map_err(ConnectorError::Invalid)?;
        if let Some(sharder) = definition.sharder()
            && self.inner.sharders.get(sharder).is_err()
        {
            return Err(ConnectorError::NoSharder(sharder.to_owned()));
        }
        if let Some(projection) = definition.mapping_projection() {
            self.check_mapping_projection(projection).await?;
        }
        let mut entries = self.inner.connectors.lock().await;
        let existing = entries.get_mut(name);
        let created = existing.is_none();
        let (enabled, keep, same_topic) = match &existing {
            Some(entry) => (
                entry.stored.enabled,
                entry.stored.definition.same_progress(&definition),
                entry.stored.definition.topic() == definition.topic(),
            ),
            None => (true, false, false),
        };
        if let Some(entry) = existing {
            stop_task(entry).await;
        }
        let checkpoint = if keep {
            None
        } else {
            // A sink on the same topic goes on knowing how the topic's records were placed.
            let stored = if same_topic {
                self.stored_checkpoint(name).await?
            } else {
                Vec::new()
            };
            Some(self.first_checkpoint(&definition, &stored))
        };
        let stored = Stored {
            definition,
            enabled,
        };
        let generation = self
            .inner
            .store
            .save_connector(name.to_owned(), to_json(&stored), checkpoint.clone())
            .await?;
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            stored: stored.clone(),
            generation,
            progress: Progress::default(),
            task: None,
        });
        entry.stored = stored;
        entry.generation = generation;
        if checkpoint.is_some() {
            entry.progress = Progress::default();
        }
        if enabled {
            self.spawn(name, entry);
        }
        Ok((created, info(name, entry)))
    }

    pub async fn list(&self) -> Vec<Info> {
        let entries = self.inner.connectors.lock().await;
        entries
            .iter()
            .map(|(name, entry)| info(name, entry))
            .collect()
    }

    pub async fn get(&self, name: &str) -> Result<Info, ConnectorError> {
        let entries = self.inner.connectors.lock().await;
        let entry = entries
            .get(name)
            .ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        Ok(info(name, entry))
    }

    pub async fn delete(&self, name: &str) -> Result<(), ConnectorError> {
        let mut entries = self.inner.connectors.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        stop_task(entry).await;
        self.inner.store.remove_connector(name.to_owned()).await?;
        entries.remove(name);
        Ok(())
    }

    /// Starts a stopped or faulted connector (a running one is left as it is).
    pub async fn start(&self, name: &str) -> Result<Info, ConnectorError> {
        self.change(name, |entry| {
            let running = entry
                .task
                .as_ref()
                .is_some_and(|task| !task.handle.is_finished());
            (!running).then_some((true, false))
        })
        .await
    }

    pub async fn stop(&self, name: &str) -> Result<Info, ConnectorError> {
        self.change(name, |_| Some((false, false))).await
    }

    /// Forgets the checkpoint: the connector begins again from `start_from` (a running one
    /// restarts at once). A sink still sends only what the topic does not hold.
    pub async fn reset(&self, name: &str) -> Result<Info, ConnectorError> {
        self.change(name, |entry| Some((entry.stored.enabled, true)))
            .await
    }

    /// The checkpoint stored for `name` (empty when there is none).
    async fn stored_checkpoint(&self, name: &str) -> Result<Vec<u8>, ConnectorError> {
        let name = name.to_owned();
        let stored = self
            .inner
            .store
            .blocking(move |store| store.connector_checkpoint(&name))
            .await?;
        Ok(stored.map(|(_, checkpoint)| checkpoint).unwrap_or_default())
    }

    /// A source maps records with a deployed projection that partitions by a key of its own.
    async fn check_mapping_projection(&self, name: &str) -> Result<(), ConnectorError> {
        let (store, runtime) = (self.inner.store.clone(), self.inner.runtime.clone());
        let loaded = source::load_projection(store, runtime, name.to_owned()).await?;
        let compiled = loaded.map_err(|error| ConnectorError::Invalid(format!("{error:#}")))?;
        match compiled.map(|compiled| compiled.info.partitioning) {
            None => Err(ConnectorError::NoProjection(name.to_owned())),
            Some(Partitioning::Custom) => Ok(()),
            Some(_) => Err(ConnectorError::Invalid(format!(
                "the projection {name:?} has no partition key of its own (partition_by) to name \
                 streams with"
            ))),
        }
    }

    /// The checkpoint a connector (re)starts from: for a sink, where `start_from` says as of
    /// now (and, after a reset, how the topic's records were placed, from `stored`).
    fn first_checkpoint(&self, definition: &Definition, stored: &[u8]) -> Vec<u8> {
        match definition {
            Definition::KafkaSink(sink) => to_json(&sink::reset_checkpoint(
                sink,
                self.inner.store.head(),
                stored,
            )),
            Definition::KafkaSource(_) => Vec::new(),
        }
    }

    /// Applies `decide`'s (enabled, reset) to a connector, stopping its task first and
    /// starting it again when enabled; `None` changes nothing.
    async fn change(
        &self,
        name: &str,
        decide: impl FnOnce(&Entry) -> Option<(bool, bool)>,
    ) -> Result<Info, ConnectorError> {
        let mut entries = self.inner.connectors.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        let Some((enabled, reset)) = decide(entry) else {
            return Ok(info(name, entry));
        };
        stop_task(entry).await;
        // Read once the task stopped: what it stored last is what the reset builds on.
        let checkpoint = if reset {
            let stored = self.stored_checkpoint(name).await?;
            Some(self.first_checkpoint(&entry.stored.definition, &stored))
        } else {
            None
        };
        let stored = Stored {
            definition: entry.stored.definition.clone(),
            enabled,
        };
        entry.generation = self
            .inner
            .store
            .save_connector(name.to_owned(), to_json(&stored), checkpoint.clone())
            .await?;
        entry.stored = stored;
        if checkpoint.is_some() {
            entry.progress = Progress::default();
        }
        if enabled {
            self.spawn(name, entry);
        }
        Ok(info(name, entry))
    }

    /// The connectors that map records with the projection `name`.
    pub async fn using_projection(&self, name: &str) -> Vec<String> {
        self.users(|definition| definition.mapping_projection() == Some(name))
            .await
    }

    /// The connectors that place their records with the sharder `name`.
    pub async fn using_sharder(&self, name: &str) -> Vec<String> {
        self.users(|definition| definition.sharder() == Some(name))
            .await
    }

    async fn users(&self, uses: impl Fn(&Definition) -> bool) -> Vec<String> {
        let entries = self.inner.connectors.lock().await;
        entries
            .iter()
            .filter(|(_, entry)| uses(&entry.stored.definition))
            .map(|(connector, _)| connector.clone())
            .collect()
    }

    /// Stops every connector (the server is stopping, or this node stopped leading).
    pub async fn shutdown(&self) {
        let mut entries = self.inner.connectors.lock().await;
        for entry in entries.values_mut() {
            stop_task(entry).await;
        }
    }

    fn spawn(&self, name: &str, entry: &mut Entry) {
        let cancel = CancellationToken::new();
        // Running from now on: a fault or error from before is history (kept in `last_error`).
        entry.progress.restart();
        let session = Session {
            name: name.to_owned(),
            generation: entry.generation,
            checkpoint: Vec::new(),
            store: self.inner.store.clone(),
            sharders: self.inner.sharders.clone(),
            runtime: self.inner.runtime.clone(),
            progress: entry.progress.clone(),
            cancel: cancel.clone(),
        };
        let definition = entry.stored.definition.clone();
        let handle = tokio::spawn(run(session, definition));
        entry.task = Some(Task { cancel, handle });
    }
}

/// Stops a connector's task and waits for it. Every wait in a task gives way to the
/// cancellation, so this is quick even while a broker does not answer.
async fn stop_task(entry: &mut Entry) {
    if let Some(task) = entry.task.take() {
        task.cancel.cancel();
        let _ = task.handle.await;
    }
}

fn info(name: &str, entry: &Entry) -> Info {
    let progress = entry.progress.snapshot();
    let running = entry
        .task
        .as_ref()
        .is_some_and(|task| !task.handle.is_finished());
    let status = if !entry.stored.enabled {
        State::Stopped
    } else if progress.faulted {
        State::Faulted
    } else if running {
        State::Running
    } else {
        State::Stopped
    };
    Info {
        name: name.to_owned(),
        definition: entry.stored.definition.clone(),
        status,
        connected: running && progress.connected,
        position: progress.position,
        offsets: progress
            .offsets
            .iter()
            .map(|(partition, offset)| (partition.to_string(), *offset))
            .collect(),
        lag: progress.lag,
        events: progress.events,
        events_per_second: progress.events_per_second,
        last_error: progress.last_error,
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("connector records serialise")
}

/// One connector's work: what its sessions share.
pub(crate) struct Session {
    name: String,
    generation: u64,
    /// The checkpoint as stored, read again when a session starts.
    checkpoint: Vec<u8>,
    store: Store,
    sharders: Sharders,
    runtime: Runtime,
    progress: Progress,
    cancel: CancellationToken,
}

/// Why a session ended early.
pub(crate) enum SessionEnd {
    /// Try again after a backoff.
    Retry(String),
    /// Stop until started again.
    Fault(String),
    /// The connector was changed or stopped meanwhile: end quietly.
    Superseded,
}

impl From<kafka::Failure> for SessionEnd {
    fn from(failure: kafka::Failure) -> Self {
        SessionEnd::Retry(failure.0)
    }
}

impl Session {
    /// Reads the stored checkpoint: what the store holds decides, whatever became of the
    /// commits of earlier sessions.
    async fn load(&mut self) -> Result<(), SessionEnd> {
        let name = self.name.clone();
        let stored = self
            .store
            .blocking(move |store| store.connector_checkpoint(&name))
            .await
            .map_err(|error| SessionEnd::Retry(format!("cannot read the checkpoint: {error}")))?;
        match stored {
            Some((generation, checkpoint)) if generation == self.generation => {
                self.checkpoint = checkpoint;
                Ok(())
            }
            _ => Err(SessionEnd::Superseded),
        }
    }

    /// The checkpoint (the default when there is none).
    fn checkpoint<T: DeserializeOwned + Default>(&self) -> Result<T, SessionEnd> {
        if self.checkpoint.is_empty() {
            return Ok(T::default());
        }
        serde_json::from_slice(&self.checkpoint)
            .map_err(|error| SessionEnd::Fault(format!("cannot read the checkpoint: {error}")))
    }

    /// Stores the checkpoint, with a source's events, in one commit.
    async fn commit<T: Serialize>(
        &mut self,
        checkpoint: &T,
        appends: Vec<(String, Vec<NewEvent>)>,
    ) -> Result<(), SessionEnd> {
        let bytes = to_json(checkpoint);
        let committed = self
            .store
            .commit_connector(
                self.name.clone(),
                self.generation,
                self.checkpoint.clone(),
                bytes.clone(),
                appends,
            )
            .await;
        match committed {
            Ok(()) => {
                self.checkpoint = bytes;
                Ok(())
            }
            Err(StoreError::InvalidRequest(message))
                if message.ends_with(crate::store::CONNECTOR_CHANGED) =>
            {
                Err(SessionEnd::Superseded)
            }
            Err(StoreError::InvalidRequest(message))
                if message.ends_with(crate::store::CONNECTOR_MOVED) =>
            {
                Err(SessionEnd::Retry(message))
            }
            Err(
                error @ (StoreError::StreamDeleted(_)
                | StoreError::InvalidRequest(_)
                | StoreError::WrongExpectedRevision { .. }),
            ) => Err(SessionEnd::Fault(format!(
                "cannot land the records: {error}"
            ))),
            Err(StoreError::ShuttingDown) | Err(StoreError::NotLeader { .. }) => {
                Err(SessionEnd::Superseded)
            }
            Err(error) => Err(SessionEnd::Retry(format!("cannot store progress: {error}"))),
        }
    }
}

/// A connector's task: sessions until it is stopped or faults. A panic faults it.
async fn run(mut session: Session, definition: Definition) {
    let progress = session.progress.clone();
    let sessions = AssertUnwindSafe(run_sessions(&mut session, &definition));
    if let Err(panic) = sessions.catch_unwind().await {
        let why = panic
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(connector = %session.name, %why, "connector panicked");
        progress.fault(format!("the connector failed: {why}"));
    }
}

async fn run_sessions(session: &mut Session, definition: &Definition) {
    let mut backoff = FIRST_BACKOFF;
    let cancel = session.cancel.clone();
    loop {
        session.progress.restart();
        let events_before = session.progress.snapshot().events;
        // Stopping drops a session wherever it waits: the next one reads what the store holds.
        let work = async {
            session.load().await?;
            match &definition {
                Definition::KafkaSink(sink) => sink::run(session, sink).await,
                Definition::KafkaSource(source) => source::run(session, source).await,
            }
        };
        let ended = tokio::select! {
            ended = work => ended,
            () = cancel.cancelled() => return,
        };
        if cancel.is_cancelled() {
            return;
        }
        match ended {
            Ok(()) | Err(SessionEnd::Superseded) => return,
            Err(SessionEnd::Fault(error)) => {
                tracing::error!(connector = %session.name, %error, "connector faulted");
                session.progress.fault(error);
                return;
            }
            Err(SessionEnd::Retry(error)) => {
                tracing::warn!(connector = %session.name, %error, retry_in = ?backoff, "connector session failed");
                session.progress.failed(error);
            }
        }
        // A session that got work done starts the backoff over.
        if session.progress.snapshot().events > events_before {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
