//! Consumer groups (persistent subscriptions): the server keeps each group's position, delivers
//! every event at least once to one of the group's consumers, retries what is not acked in time,
//! parks what keeps failing, and, with the pinned and sharded strategies, keeps every key's
//! events on one consumer in order.
//!
//! Each group is a task ([`group`]) that owns its state; the [`Groups`] handle sends it commands.
//! The store keeps the settings and checkpoints ([`settings::Record`]) and the parked messages.

mod group;
pub mod settings;
mod strategy;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::names::Name;
use crate::sharding::{ShardError, Sharder, Sharders};
use crate::store::{IndexConfig, RecordedEvent, Store, StoreError};
use group::{Command, Group};
use settings::{Done, Record, Settings, StartFrom, StartName, Strategy};

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
    #[error("no sharder is named {0:?}")]
    NoSharder(String),
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
}

type Key = (String, String);

#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sharders: Sharders,
    groups: RwLock<BTreeMap<Key, mpsc::Sender<Command>>>,
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
            let sharder = groups.sharder_for(&record.settings).ok().flatten();
            groups.spawn(stream, group, record, sharder).await;
        }
        Ok(groups)
    }

    fn sharder_for(&self, settings: &Settings) -> Result<Option<Arc<Sharder>>, GroupError> {
        match &settings.strategy {
            Strategy::Sharded(name) => Ok(Some(self.inner.sharders.get(name)?)),
            _ => Ok(None),
        }
    }

    async fn spawn(
        &self,
        stream: String,
        group: String,
        record: Record,
        sharder: Option<Arc<Sharder>>,
    ) {
        let (commands, receiver) = mpsc::channel(1024);
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
        tokio::spawn(task.run(receiver));
        self.inner
            .groups
            .write()
            .expect("groups")
            .insert((stream, group), commands);
    }

    fn handle(&self, stream: &str, group: &str) -> Result<mpsc::Sender<Command>, GroupError> {
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

    async fn ask<T>(
        &self,
        stream: &str,
        group: &str,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GroupError> {
        let handle = self.handle(stream, group)?;
        let (reply, answer) = oneshot::channel();
        handle
            .send(command(reply))
            .await
            .map_err(|_| GroupError::Stopped)?;
        answer.await.map_err(|_| GroupError::Stopped)
    }

    /// Creates a group (true) or changes its settings, keeping its checkpoint (false).
    pub async fn put(
        &self,
        stream: &str,
        group: &str,
        settings: Settings,
    ) -> Result<(bool, Info), GroupError> {
        validate_names(stream, group)?;
        settings
            .validate(stream == ALL)
            .map_err(GroupError::Invalid)?;
        let _change = self.inner.changes.lock().await;
        let sharder = self.sharder_for(&settings)?;
        let created = match self.handle(stream, group) {
            Ok(_) => {
                self.ask(stream, group, |reply| Command::Update {
                    settings,
                    sharder,
                    reply,
                })
                .await??;
                false
            }
            Err(_) => {
                let start = self.start_of(stream, settings.start_from).await?;
                let record = Record {
                    settings,
                    start,
                    next: start,
                    parked_next: 0,
                    replay_until: 0,
                    source_done: Done::default(),
                    parked_done: Done::default(),
                };
                let bytes = serde_json::to_vec(&record).expect("a record serialises");
                self.inner
                    .store
                    .save_group(stream.to_owned(), group.to_owned(), bytes)
                    .await?;
                self.spawn(stream.to_owned(), group.to_owned(), record, sharder)
                    .await;
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

    pub async fn delete(&self, stream: &str, group: &str) -> Result<(), GroupError> {
        let _change = self.inner.changes.lock().await;
        self.ask(stream, group, |reply| Command::Stop {
            checkpoint: false,
            reply,
        })
        .await?;
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

    pub async fn info(&self, stream: &str, group: &str) -> Result<Info, GroupError> {
        self.ask(stream, group, |reply| Command::Info { reply })
            .await
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

    /// Up to `max` messages for `consumer`, waiting up to `wait` when none is ready.
    pub async fn pull(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, GroupError> {
        validate_consumer(consumer)?;
        if max == 0 || max > MAX_PULL {
            return Err(GroupError::Invalid(format!(
                "max must be between 1 and {MAX_PULL}"
            )));
        }
        let wait = wait.min(MAX_WAIT);
        self.ask(stream, group, |reply| Command::Pull {
            consumer: consumer.to_owned(),
            max,
            wait,
            reply,
        })
        .await?
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

    /// Deletes the sharder `name` unless a group's strategy uses it.
    pub async fn delete_sharder(&self, name: &str) -> Result<(), GroupError> {
        let _change = self.inner.changes.lock().await;
        let user = self
            .list()
            .await
            .into_iter()
            .find(|info| info.settings.strategy == Strategy::Sharded(name.to_owned()));
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
        let handles: Vec<mpsc::Sender<Command>> =
            std::mem::take(&mut *self.inner.groups.write().expect("groups"))
                .into_values()
                .collect();
        for handle in handles {
            let (reply, done) = oneshot::channel();
            if handle
                .send(Command::Stop {
                    checkpoint: true,
                    reply,
                })
                .await
                .is_ok()
            {
                let _ = done.await;
            }
        }
    }
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
