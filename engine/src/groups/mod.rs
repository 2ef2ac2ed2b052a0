//! Consumer groups (persistent subscriptions): the server keeps each group's position, delivers
//! every event at least once to one of the group's consumers, retries what is not acked in time,
//! parks what keeps failing, and, with the pinned and sharded strategies, keeps every key's
//! events on one consumer in order.
//!
//! Each group is a task ([`group`]) that owns its state; the [`Groups`] handle sends it commands.
//! The store keeps the settings and checkpoints ([`settings::Record`]) and the parked messages.

mod group;
mod partitioned;
pub mod settings;
mod strategy;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::names::Name;
use crate::sharding::{ShardError, Sharder, Sharders};
use crate::store::{AllFilter, IndexConfig, RecordedEvent, Store, StoreError};
use crate::subscribe::Source;
use group::{Command, Group};
use settings::{Done, Offsets, Record, Settings, StartFrom, StartName, Strategy};

/// The stream name that means every stream.
pub const ALL: &str = "$all";
/// Most messages one pull may ask for.
pub const MAX_PULL: usize = 10_000;
/// Longest a pull may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The stream a group's parked messages are linked from.
pub fn parked_stream_name(stream: &str, group: &str) -> String {
    format!("$persistentsubscription-{stream}::{group}-parked")
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("no group {group:?} on {stream:?}")]
    NotFound { stream: String, group: String },
    #[error("{0}")]
    Invalid(String),
    /// An ack or nack of a message the group has not delivered.
    #[error("{0}")]
    NotDelivered(String),
    /// `max_subscriber_count` reached.
    #[error("{0}")]
    Full(String),
    /// A sharder is still used by a group.
    #[error("{0}")]
    InUse(String),
    /// A create found the group there already.
    #[error("the group {group:?} on {stream:?} exists already")]
    Exists { stream: String, group: String },
    #[error("no sharder is named {0:?}")]
    NoSharder(String),
    /// A commit made in a generation that is over.
    #[error("{0}")]
    StaleGeneration(String),
    /// A commit for a partition the consumer does not own.
    #[error("{0}")]
    NotOwner(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the server is shutting down")]
    Stopped,
}

impl From<ShardError> for GroupError {
    fn from(error: ShardError) -> Self {
        match error {
            ShardError::NotFound(name) => GroupError::NoSharder(name),
            ShardError::Invalid(message) => GroupError::Invalid(message),
            ShardError::Store(error) => GroupError::Store(error),
        }
    }
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Acks or nacks this message.
    pub ack_id: String,
    /// How many times it was delivered before.
    pub retry_count: u32,
    pub event: Arc<RecordedEvent>,
}

/// A consumer's partitions in a generation of a partitioned group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub generation: u64,
    pub partitions: Vec<u32>,
}

/// A message of a partitioned group.
#[derive(Debug, Clone)]
pub struct PartitionMessage {
    pub partition: u32,
    /// The revision (or position) the consumer commits once it has processed the message.
    pub id: u64,
    pub event: Arc<RecordedEvent>,
}

/// A pull's answer from a partitioned group: the caller's assignment and its messages.
#[derive(Debug, Clone)]
pub struct Partitioned {
    pub assignment: Assignment,
    pub messages: Vec<PartitionMessage>,
}

/// A pull's answer.
#[derive(Debug, Clone)]
pub enum Pulled {
    Messages(Vec<Delivery>),
    Partitioned(Partitioned),
}

impl Pulled {
    /// The messages of a group that acks (none from a partitioned one).
    pub fn into_deliveries(self) -> Vec<Delivery> {
        match self {
            Pulled::Messages(deliveries) => deliveries,
            Pulled::Partitioned(_) => Vec::new(),
        }
    }
}

/// A partition of a partitioned group, as its info shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionInfo {
    pub partition: u32,
    /// The consumer that owns it in the current generation.
    pub owner: Option<String>,
    /// The offset committed last (a revision or position); `null` before the first commit.
    pub committed: Option<u64>,
    /// Events of the partition the group has read and that are not committed.
    pub lag: u64,
}

/// A change of sharder or partition count waiting for every partition to commit what comes
/// before `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Repartitioning {
    /// Events from this revision/position on are placed by the settings' strategy.
    pub at: u64,
    /// The placement events before `at` keep.
    pub from_sharder: String,
    pub from_partitions: u32,
}

/// What a nack asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NackAction {
    /// Into the parked stream at once.
    Park,
    /// Deliver again (parked once out of retries).
    Retry,
    /// Treat as done.
    Skip,
    /// The consumer leaves the group; its messages go to others.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsumerInfo {
    pub name: String,
    pub in_flight: usize,
    pub acked: u64,
    pub nacked: u64,
}

/// A group's settings and statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = GroupInfo)]
pub struct Info {
    pub stream: String,
    pub group: String,
    pub settings: Settings,
    /// `catching_up`, `live` or `faulted`.
    pub status: String,
    /// Why the group is faulted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub consumers: Vec<ConsumerInfo>,
    /// The last revision (or position) below which every message was acked, as stored; `null`
    /// before the first checkpoint.
    pub checkpoint: Option<u64>,
    /// The last revision (or position) the group has read.
    pub last_known: Option<u64>,
    /// Messages delivered and not yet acked.
    pub in_flight: usize,
    /// Messages read and waiting for a consumer.
    pub ready: usize,
    /// Messages in the parked stream not yet replayed.
    pub parked: u64,
    /// Deliveries since the group started on this server, retries included.
    pub delivered: u64,
    /// The first revision (or position) the stored checkpoint does not cover.
    #[serde(skip)]
    pub checkpoint_next: u64,
    /// A partitioned group's generation: it changes whenever partitions change owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// A partitioned group's partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<PartitionInfo>>,
    /// A partitioned group's change of sharder or partition count, while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repartitioning: Option<Repartitioning>,
}

/// What a group reads: the stream, or `$all` through the settings' filters.
fn source(stream: &str, settings: &Settings) -> Source {
    if stream != ALL {
        return Source::Stream {
            name: stream.to_owned(),
            resolve_links: settings.resolve_links,
        };
    }
    let prefixes = |list: &Option<String>| -> Vec<String> {
        list.iter()
            .flat_map(|list| list.split(','))
            .filter(|prefix| !prefix.is_empty())
            .map(str::to_owned)
            .collect()
    };
    Source::All {
        filter: AllFilter {
            stream_prefixes: prefixes(&settings.stream_prefix),
            type_prefixes: prefixes(&settings.type_prefix),
            include_system: false,
        },
    }
}

type Key = (String, String);

/// A group's task.
#[derive(Clone)]
enum Handle {
    PerMessage(mpsc::Sender<Command>),
    Partitioned(mpsc::Sender<partitioned::Command>),
}

#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sharders: Sharders,
    groups: RwLock<BTreeMap<Key, Handle>>,
    /// Serialises creates, updates and deletes.
    changes: tokio::sync::Mutex<()>,
}

impl Groups {
    /// Starts every stored group.
    pub async fn open(store: Store, sharders: Sharders) -> anyhow::Result<Groups> {
        let groups = Groups {
            inner: Arc::new(Inner {
                store: store.clone(),
                sharders,
                groups: RwLock::new(BTreeMap::new()),
                changes: tokio::sync::Mutex::new(()),
            }),
        };
        let stored = store.blocking(|store| store.stored_groups()).await?;
        for (stream, group, bytes) in stored {
            let record: Record = match serde_json::from_slice(&bytes) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%stream, %group, %error, "cannot read a group's record");
                    continue;
                }
            };
            if let Err(error) = groups.spawn(stream.clone(), group.clone(), record).await {
                tracing::error!(%stream, %group, %error, "cannot start a group");
            }
        }
        Ok(groups)
    }

    fn sharder_for(&self, settings: &Settings) -> Result<Option<Arc<Sharder>>, GroupError> {
        match &settings.strategy {
            Strategy::Sharded(name) | Strategy::Partitioned { sharder: name, .. } => {
                Ok(Some(self.inner.sharders.get(name)?))
            }
            _ => Ok(None),
        }
    }

    async fn spawn(&self, stream: String, group: String, record: Record) -> Result<(), GroupError> {
        let handle = if let Some(offsets) = &record.offsets {
            let sharder = self
                .sharder_for(&record.settings)?
                .ok_or_else(|| GroupError::Invalid("a partitioned group needs a sharder".into()))?;
            let current = self.inner.sharders.get(&offsets.sharder)?;
            let task = partitioned::Group::start(
                self.inner.store.clone(),
                stream.clone(),
                group.clone(),
                record,
                sharder,
                current,
            )
            .await?;
            let (commands, receiver) = mpsc::channel(1024);
            tokio::spawn(task.run(receiver));
            Handle::Partitioned(commands)
        } else {
            // A sharder that is gone leaves the group faulted rather than unstarted.
            let sharder = self.sharder_for(&record.settings).ok().flatten();
            // The correlation rule of `pinned_by_correlation` is the indexes' one as of the start.
            let config = match self
                .inner
                .store
                .blocking(|store| store.index_config())
                .await
            {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!(%error, "cannot read the indexes' configuration; using the defaults");
                    IndexConfig::default()
                }
            };
            let task = Group::start(
                self.inner.store.clone(),
                stream.clone(),
                group.clone(),
                record,
                config,
                sharder,
            )
            .await;
            let (commands, receiver) = mpsc::channel(1024);
            tokio::spawn(task.run(receiver));
            Handle::PerMessage(commands)
        };
        self.inner
            .groups
            .write()
            .expect("groups")
            .insert((stream, group), handle);
        Ok(())
    }

    fn handle(&self, stream: &str, group: &str) -> Result<Handle, GroupError> {
        self.inner
            .groups
            .read()
            .expect("groups")
            .get(&(stream.to_owned(), group.to_owned()))
            .cloned()
            .ok_or_else(|| GroupError::NotFound {
                stream: stream.to_owned(),
                group: group.to_owned(),
            })
    }

    /// Asks a per-message group; a partitioned one answers `refusal`.
    async fn ask<T>(
        &self,
        stream: &str,
        group: &str,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GroupError> {
        match self.handle(stream, group)? {
            Handle::PerMessage(handle) => request(&handle, command).await,
            Handle::Partitioned(_) => Err(GroupError::Invalid(format!(
                "the group {group:?} on {stream:?} is partitioned: its consumers commit offsets \
                 (POST /groups/{{stream}}/{{group}}/commit) instead of acking messages"
            ))),
        }
    }

    /// Asks a partitioned group; a per-message one answers that it is not partitioned.
    async fn ask_partitioned<T>(
        &self,
        stream: &str,
        group: &str,
        command: impl FnOnce(oneshot::Sender<T>) -> partitioned::Command,
    ) -> Result<T, GroupError> {
        match self.handle(stream, group)? {
            Handle::Partitioned(handle) => request(&handle, command).await,
            Handle::PerMessage(_) => Err(GroupError::Invalid(format!(
                "the group {group:?} on {stream:?} is not partitioned: its consumers ack messages"
            ))),
        }
    }

    /// Whether the group is partitioned (Kafka's model).
    pub fn is_partitioned(&self, stream: &str, group: &str) -> Result<bool, GroupError> {
        Ok(matches!(
            self.handle(stream, group)?,
            Handle::Partitioned(_)
        ))
    }

    /// Creates a group (true) or changes its settings, keeping its checkpoint (false).
    pub async fn put(
        &self,
        stream: &str,
        group: &str,
        settings: Settings,
    ) -> Result<(bool, Info), GroupError> {
        self.put_or_create(stream, group, settings, false).await
    }

    /// Creates a group; [`GroupError::Exists`] when it is there already.
    pub async fn create(
        &self,
        stream: &str,
        group: &str,
        settings: Settings,
    ) -> Result<Info, GroupError> {
        let (_, info) = self.put_or_create(stream, group, settings, true).await?;
        Ok(info)
    }

    async fn put_or_create(
        &self,
        stream: &str,
        group: &str,
        settings: Settings,
        only_create: bool,
    ) -> Result<(bool, Info), GroupError> {
        validate_names(stream, group)?;
        settings
            .validate(stream == ALL)
            .map_err(GroupError::Invalid)?;
        let _change = self.inner.changes.lock().await;
        let sharder = self.sharder_for(&settings)?;
        let partitioned = matches!(settings.strategy, Strategy::Partitioned { .. });
        let created = match self.handle(stream, group) {
            Ok(_) if only_create => {
                return Err(GroupError::Exists {
                    stream: stream.to_owned(),
                    group: group.to_owned(),
                });
            }
            Ok(Handle::PerMessage(_)) if partitioned => {
                return Err(kind_change(stream, group));
            }
            Ok(Handle::Partitioned(_)) if !partitioned => {
                return Err(kind_change(stream, group));
            }
            Ok(Handle::PerMessage(_)) => {
                self.ask(stream, group, |reply| Command::Update {
                    settings,
                    sharder,
                    reply,
                })
                .await??;
                false
            }
            Ok(Handle::Partitioned(_)) => {
                let sharder = sharder.expect("a partitioned strategy's sharder");
                self.ask_partitioned(stream, group, |reply| partitioned::Command::Update {
                    settings,
                    sharder,
                    reply,
                })
                .await??;
                false
            }
            Err(_) => {
                if self.is_stored(stream, group).await? {
                    return Err(GroupError::Invalid(format!(
                        "the group {group:?} on {stream:?} is stored but did not start (see the \
                         server's log: a sharder missing?); upload what it needs and restart, \
                         or delete it"
                    )));
                }
                let start = self.start_of(stream, settings.start_from).await?;
                let offsets = match &settings.strategy {
                    Strategy::Partitioned {
                        sharder,
                        partitions,
                    } => Some(Offsets {
                        sharder: sharder.clone(),
                        partitions: *partitions,
                        next: vec![start; *partitions as usize],
                        generation_floor: 0,
                        switch_at: None,
                    }),
                    _ => None,
                };
                let record = Record {
                    settings,
                    start,
                    next: start,
                    parked_next: 0,
                    replay_until: 0,
                    source_done: Done::default(),
                    parked_done: Done::default(),
                    offsets,
                };
                let bytes = serde_json::to_vec(&record).expect("a record serialises");
                self.inner
                    .store
                    .save_group(stream.to_owned(), group.to_owned(), bytes)
                    .await?;
                self.spawn(stream.to_owned(), group.to_owned(), record)
                    .await?;
                true
            }
        };
        Ok((created, self.info(stream, group).await?))
    }

    /// Where a new group starts: fixed at creation, so events written before the first
    /// consumer arrives are delivered even across a restart.
    async fn start_of(&self, stream: &str, start: StartFrom) -> Result<u64, GroupError> {
        Ok(match start {
            StartFrom::At(at) => at,
            StartFrom::Named(StartName::Start) => 0,
            StartFrom::Named(StartName::End) if stream == ALL => self.inner.store.head(),
            StartFrom::Named(StartName::End) => {
                let name = stream.to_owned();
                self.inner
                    .store
                    .blocking(move |store| store.last_revision(&name))
                    .await?
                    .map_or(0, |last| last + 1)
            }
        })
    }

    /// Whether the store keeps a record of the group (started or not).
    async fn is_stored(&self, stream: &str, group: &str) -> Result<bool, GroupError> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        Ok(self
            .inner
            .store
            .blocking(move |store| {
                Ok(store
                    .stored_groups()?
                    .into_iter()
                    .any(|(s, g, _)| s == stream && g == group))
            })
            .await?)
    }

    pub async fn delete(&self, stream: &str, group: &str) -> Result<(), GroupError> {
        let _change = self.inner.changes.lock().await;
        match self.handle(stream, group) {
            Ok(handle) => self.stop(handle, false).await,
            // A stored group that did not start can be deleted too.
            Err(error) if !self.is_stored(stream, group).await? => return Err(error),
            Err(_) => {}
        }
        self.inner
            .groups
            .write()
            .expect("groups")
            .remove(&(stream.to_owned(), group.to_owned()));
        self.inner
            .store
            .remove_group(
                stream.to_owned(),
                group.to_owned(),
                parked_stream_name(stream, group),
            )
            .await?;
        Ok(())
    }

    /// Ends a group's task; with `checkpoint` it first writes where the group is.
    async fn stop(&self, handle: Handle, checkpoint: bool) {
        // A task that is gone has stopped already.
        let _ = match handle {
            Handle::PerMessage(handle) => {
                request(&handle, |reply| Command::Stop { checkpoint, reply }).await
            }
            Handle::Partitioned(handle) => {
                request(&handle, |reply| partitioned::Command::Stop { reply }).await
            }
        };
    }

    pub async fn info(&self, stream: &str, group: &str) -> Result<Info, GroupError> {
        match self.handle(stream, group)? {
            Handle::PerMessage(_) => {
                self.ask(stream, group, |reply| Command::Info { reply })
                    .await
            }
            Handle::Partitioned(_) => {
                self.ask_partitioned(stream, group, |reply| partitioned::Command::Info { reply })
                    .await
            }
        }
    }

    pub async fn list(&self) -> Vec<Info> {
        let keys: Vec<Key> = self
            .inner
            .groups
            .read()
            .expect("groups")
            .keys()
            .cloned()
            .collect();
        let mut infos = Vec::with_capacity(keys.len());
        for (stream, group) in keys {
            if let Ok(info) = self.info(&stream, &group).await {
                infos.push(info);
            }
        }
        infos
    }

    /// Up to `max` messages for `consumer`, waiting up to `wait` when none is ready. For a
    /// partitioned group, `generation` is the one the consumer last learned: a known consumer
    /// that gives none starts again, its partitions from their committed offsets.
    pub async fn pull(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        generation: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> Result<Pulled, GroupError> {
        validate_consumer(consumer)?;
        if max == 0 || max > MAX_PULL {
            return Err(GroupError::Invalid(format!(
                "max must be between 1 and {MAX_PULL}"
            )));
        }
        let wait = wait.min(MAX_WAIT);
        let consumer = consumer.to_owned();
        match self.handle(stream, group)? {
            Handle::PerMessage(_) => self
                .ask(stream, group, |reply| Command::Pull {
                    consumer,
                    max,
                    wait,
                    reply,
                })
                .await?
                .map(Pulled::Messages),
            Handle::Partitioned(_) => self
                .ask_partitioned(stream, group, |reply| partitioned::Command::Pull {
                    consumer,
                    generation,
                    max,
                    wait,
                    reply,
                })
                .await?
                .map(Pulled::Partitioned),
        }
    }

    /// Commits a partitioned group's offsets (cumulative, per partition), durably.
    pub async fn commit(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        generation: u64,
        offsets: BTreeMap<u32, u64>,
    ) -> Result<(), GroupError> {
        validate_consumer(consumer)?;
        let consumer = consumer.to_owned();
        self.ask_partitioned(stream, group, |reply| partitioned::Command::Commit {
            consumer,
            generation,
            offsets,
            reply,
        })
        .await?
    }

    /// A consumer of a partitioned group leaves now; its partitions go to the others.
    pub async fn leave(&self, stream: &str, group: &str, consumer: &str) {
        if let Ok(Handle::Partitioned(handle)) = self.handle(stream, group) {
            let consumer = consumer.to_owned();
            let _ = handle.send(partitioned::Command::Leave { consumer }).await;
        }
    }

    /// A push consumer: messages arrive on the receiver, at most `buffer` unacked at a time.
    /// Dropping the receiver leaves the group.
    pub async fn subscribe(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        buffer: usize,
    ) -> Result<mpsc::Receiver<Delivery>, GroupError> {
        validate_consumer(consumer)?;
        if buffer == 0 || buffer > MAX_PULL {
            return Err(GroupError::Invalid(format!(
                "buffer must be between 1 and {MAX_PULL}"
            )));
        }
        self.ask(stream, group, |reply| Command::Subscribe {
            consumer: consumer.to_owned(),
            buffer,
            reply,
        })
        .await?
    }

    pub async fn ack(&self, stream: &str, group: &str, ids: Vec<String>) -> Result<(), GroupError> {
        self.ask(stream, group, |reply| Command::Ack { ids, reply })
            .await?
    }

    pub async fn nack(
        &self,
        stream: &str,
        group: &str,
        ids: Vec<String>,
        action: NackAction,
        reason: String,
    ) -> Result<(), GroupError> {
        self.ask(stream, group, |reply| Command::Nack {
            ids,
            action,
            reason,
            reply,
        })
        .await?
    }

    /// Delivers the parked messages again (the first `stop_at` of them), before new ones.
    /// Returns how many are queued for replay.
    pub async fn replay_parked(
        &self,
        stream: &str,
        group: &str,
        stop_at: Option<u64>,
    ) -> Result<u64, GroupError> {
        self.ask(stream, group, |reply| Command::ReplayParked {
            stop_at,
            reply,
        })
        .await?
    }

    /// Stores a sharder; other code under the name of one a partitioned group places events
    /// with is refused, as the group's offsets hold only for the placement they were made with
    /// (a new name and a change of the group's settings switch it over).
    pub async fn deploy_sharder(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(bool, String), GroupError> {
        let _change = self.inner.changes.lock().await;
        if let Ok(current) = self.inner.sharders.get(name)
            && current.sha256() != crate::sandbox::sha256_hex(&bytes)
        {
            let partitioned_by = |info: &Info| {
                matches!(&info.settings.strategy,
                    Strategy::Partitioned { sharder, .. } if sharder == name)
                    || info
                        .repartitioning
                        .as_ref()
                        .is_some_and(|r| r.from_sharder == name)
            };
            if let Some(info) = self.list().await.into_iter().find(partitioned_by) {
                return Err(GroupError::InUse(format!(
                    "the partitioned group {:?} on {:?} places its events with the sharder \
                     {name:?}: upload the new code under another name and change the group's \
                     sharder, which switches once its partitions caught up",
                    info.group, info.stream
                )));
            }
        }
        Ok(self.inner.sharders.deploy(name, bytes).await?)
    }

    /// Deletes the sharder `name` unless a group uses it.
    pub async fn delete_sharder(&self, name: &str) -> Result<(), GroupError> {
        let _change = self.inner.changes.lock().await;
        let uses = |info: &Info| match &info.settings.strategy {
            Strategy::Sharded(sharder) | Strategy::Partitioned { sharder, .. }
                if sharder == name =>
            {
                true
            }
            _ => info
                .repartitioning
                .as_ref()
                .is_some_and(|r| r.from_sharder == name),
        };
        let user = self.list().await.into_iter().find(uses);
        if let Some(info) = user {
            return Err(GroupError::InUse(format!(
                "the group {:?} on {:?} uses the sharder {name:?}",
                info.group, info.stream
            )));
        }
        self.inner
            .sharders
            .delete(name)
            .await
            .map_err(|error| match error {
                ShardError::NotFound(_) => GroupError::NoSharder(name.to_owned()),
                other => other.into(),
            })
    }

    /// Writes every group's checkpoint and stops the groups.
    pub async fn shutdown(&self) {
        let handles: Vec<Handle> = std::mem::take(&mut *self.inner.groups.write().expect("groups"))
            .into_values()
            .collect();
        for handle in handles {
            self.stop(handle, true).await;
        }
    }
}

/// Waits for a group's record write in progress (forever when there is none, so it can sit in a
/// `select!`) and takes it, with how it ended.
async fn write_finished<W>(
    writing: &mut Option<W>,
    task: fn(&mut W) -> &mut tokio::task::JoinHandle<Result<(), StoreError>>,
) -> (W, Result<(), StoreError>) {
    let Some(current) = writing.as_mut() else {
        return std::future::pending().await;
    };
    let result = match task(current).await {
        Ok(result) => result,
        Err(error) => Err(StoreError::Storage(format!("the write failed: {error}"))),
    };
    (writing.take().expect("a write in progress"), result)
}

/// A group's status in its info: `faulted`, else `live` once it has caught up with its source.
fn status(fault: &Option<String>, caught_up: bool) -> &'static str {
    match (fault, caught_up) {
        (Some(_), _) => "faulted",
        (None, true) => "live",
        (None, false) => "catching_up",
    }
}

/// Sends a group's task a command and waits for its answer.
async fn request<C, T>(
    task: &mpsc::Sender<C>,
    command: impl FnOnce(oneshot::Sender<T>) -> C,
) -> Result<T, GroupError> {
    let (reply, answer) = oneshot::channel();
    task.send(command(reply))
        .await
        .map_err(|_| GroupError::Stopped)?;
    answer.await.map_err(|_| GroupError::Stopped)
}

/// A consumer that would join a group already holding `consumers`: refused past the settings'
/// `max_subscriber_count`.
fn check_room(
    settings: &Settings,
    consumers: usize,
    group: &str,
    stream: &str,
) -> Result<(), GroupError> {
    let limit = settings.max_subscriber_count;
    if limit > 0 && consumers >= limit {
        return Err(GroupError::Full(format!(
            "the group {group} on {stream} already has its maximum of {limit} consumers"
        )));
    }
    Ok(())
}

/// What a group's reader sent next; pending while it has none.
async fn next_read<T>(
    reader: &mut Option<(mpsc::Receiver<T>, tokio::task::JoinHandle<()>)>,
) -> Option<T> {
    match reader {
        Some((receiver, _)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn kind_change(stream: &str, group: &str) -> GroupError {
    GroupError::Invalid(format!(
        "the group {group:?} on {stream:?} cannot change between a partitioned strategy and a \
         per-message one: delete it and create it again"
    ))
}

fn validate_names(stream: &str, group: &str) -> Result<(), GroupError> {
    if stream != ALL {
        Name::Stream.check(stream).map_err(GroupError::Invalid)?;
    }
    Name::Group.check(group).map_err(GroupError::Invalid)
}

fn validate_consumer(consumer: &str) -> Result<(), GroupError> {
    Name::Consumer.check(consumer).map_err(GroupError::Invalid)
}
