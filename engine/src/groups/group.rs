//! One consumer group: a task that owns everything about the group in memory. It reads its
//! source ahead into a bounded buffer, hands messages to consumers by the group's strategy, keeps
//! what is in flight with its deadline, and writes checkpoints and parked messages to the store.
//!
//! Messages are keyed by where they come from (replayed parked messages first, then the source)
//! and their revision or position, so "the lowest unfinished key" is the checkpoint and a retry
//! goes out before later messages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::settings::{Done, Record, Settings};
use super::strategy::{Keying, Spread};
use super::{ConsumerInfo, Delivery, GroupError, Info, NackAction, parked_stream_name};
use crate::sharding::Sharder;
use crate::store::Parking;
use crate::store::{Direction, IndexConfig, RecordedEvent, Store, StoreError, parse_revision};
use crate::subscribe::{Item, Start, Subscription};
/// How often the task looks for closed push consumers when nothing else wakes it.
const IDLE_WAKE: Duration = Duration::from_secs(1);

pub(super) enum Command {
    Pull {
        consumer: String,
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Vec<Delivery>, GroupError>>,
    },
    Subscribe {
        consumer: String,
        buffer: usize,
        reply: oneshot::Sender<Result<mpsc::Receiver<Delivery>, GroupError>>,
    },
    Ack {
        ids: Vec<String>,
        reply: oneshot::Sender<Result<(), GroupError>>,
    },
    Nack {
        ids: Vec<String>,
        action: NackAction,
        reason: String,
        reply: oneshot::Sender<Result<(), GroupError>>,
    },
    Update {
        settings: Settings,
        sharder: Option<Arc<Sharder>>,
        reply: oneshot::Sender<Result<(), GroupError>>,
    },
    ReplayParked {
        stop_at: Option<u64>,
        reply: oneshot::Sender<Result<u64, GroupError>>,
    },
    Info {
        reply: oneshot::Sender<Info>,
    },
    /// Ends the task; with `checkpoint` it first writes where the group is.
    Stop {
        checkpoint: bool,
        reply: oneshot::Sender<()>,
    },
}

/// Replayed parked messages sort before the source's, so they go out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Origin {
    Parked,
    Source,
}

type Key = (Origin, u64);

fn ack_id((origin, sequence): Key) -> String {
    match origin {
        Origin::Source => sequence.to_string(),
        Origin::Parked => format!("p{sequence}"),
    }
}

fn parse_ack_id(id: &str) -> Option<Key> {
    match id.strip_prefix('p') {
        Some(revision) => parse_revision(revision).map(|r| (Origin::Parked, r)),
        None => parse_revision(id).map(|s| (Origin::Source, s)),
    }
}

struct Message {
    event: Arc<RecordedEvent>,
    retry_count: u32,
    bucket: u32,
    /// The consumer holding it and its deadline; `None` while it waits to be delivered.
    holder: Option<(String, Instant)>,
}

enum Kind {
    Pull,
    Push {
        sender: mpsc::Sender<Delivery>,
        buffer: usize,
    },
}

struct Consumer {
    name: String,
    kind: Kind,
    last_seen: Instant,
    in_flight: usize,
    acked: u64,
    nacked: u64,
}

struct Waiter {
    consumer: String,
    max: usize,
    deadline: Instant,
    batch: Vec<Delivery>,
    reply: oneshot::Sender<Result<Vec<Delivery>, GroupError>>,
}

enum Read {
    /// An event with its id in the source and its bucket (or why it has none).
    Event(u64, Arc<RecordedEvent>, Result<u32, String>),
    CaughtUp,
    Failed(String),
}

pub(super) struct Group {
    store: Store,
    stream: String,
    name: String,
    parked_stream: String,
    record: Record,
    /// The indexes' rules, for the correlation ids of `pinned_by_correlation`.
    config: IndexConfig,
    /// How messages get their bucket; an error when the strategy's sharder is not loaded.
    keying: Result<Keying, String>,
    spread: Spread,
    messages: BTreeMap<Key, Message>,
    ready: BTreeSet<Key>,
    deadlines: BTreeSet<(Instant, Key)>,
    consumers: Vec<Consumer>,
    waiters: Vec<Waiter>,
    /// Bucket → (consumer, messages of the bucket it holds).
    bucket_holders: HashMap<u32, (String, usize)>,
    reader: Option<(mpsc::Receiver<Read>, JoinHandle<()>)>,
    /// The next source revision/position the reader hands over.
    next_read: u64,
    parked_read: u64,
    parked_count: u64,
    caught_up: bool,
    fault: Option<String>,
    delivered: u64,
    /// What the stored record says was finished after its checkpoints, as of the last start:
    /// the reader skips those messages.
    source_done: Done,
    parked_done: Done,
    /// Past the highest message delivered or finished, per origin: a record lists the
    /// unfinished messages below it only, not everything read ahead.
    handled_to: [u64; 2],
    finished_since_checkpoint: u64,
    last_checkpoint: Instant,
    /// When to look for closed push consumers next, whatever else keeps the task busy.
    next_sweep: Instant,
    /// Answers to acks and nacks, sent once the next write has made them durable.
    unwritten: Vec<oneshot::Sender<Result<(), GroupError>>>,
    /// The write in progress: what it stores and whom it answers.
    writing: Option<Writing>,
}

struct Writing {
    task: JoinHandle<Result<(), StoreError>>,
    record: Record,
    replies: Vec<oneshot::Sender<Result<(), GroupError>>>,
    checkpoint_moved: bool,
}

impl Group {
    pub(super) async fn start(
        store: Store,
        stream: String,
        name: String,
        record: Record,
        config: IndexConfig,
        sharder: Option<Arc<Sharder>>,
    ) -> Group {
        let parked_stream = parked_stream_name(&stream, &name);
        let parked_count = {
            let parked = parked_stream.clone();
            store
                .blocking(move |store| store.last_revision(&parked))
                .await
                .ok()
                .flatten()
                .map_or(0, |last| last + 1)
        };
        let record_done = (record.source_done.clone(), record.parked_done.clone());
        let keying = Keying::of(&record.settings.strategy, &config, sharder);
        let spread = Spread::new(&record.settings.strategy);
        let mut group = Group {
            store,
            next_read: record.next,
            parked_read: record.parked_next,
            parked_count,
            stream,
            name,
            parked_stream,
            record,
            config,
            keying,
            spread,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            consumers: Vec::new(),
            waiters: Vec::new(),
            bucket_holders: HashMap::new(),
            reader: None,
            caught_up: false,
            fault: None,
            delivered: 0,
            source_done: record_done.0,
            parked_done: record_done.1,
            handled_to: [0, 0],
            finished_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            unwritten: Vec::new(),
            writing: None,
            next_sweep: Instant::now() + IDLE_WAKE,
        };
        group.start_reader().await;
        group
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            self.read_parked().await;
            self.deliver();
            self.answer_waiters();
            self.start_write(false);
            let wake = self.next_wake();
            let room = self.ready.len() < self.buffer_limit();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Stop { checkpoint, reply }) => {
                        self.finish_write().await;
                        if checkpoint {
                            self.start_write(true);
                            self.finish_write().await;
                        }
                        self.stop_reader();
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.handle(command).await,
                    None => {
                        self.stop_reader();
                        return;
                    }
                },
                read = super::next_read(&mut self.reader), if room && self.reader.is_some() => {
                    self.receive(read).await;
                    // Take what else is already read, so a pull gets a full batch at once.
                    while self.ready.len() < self.buffer_limit() {
                        let Some(read) = self.reader.as_mut().and_then(|(r, _)| r.try_recv().ok())
                        else {
                            break;
                        };
                        self.receive(Some(read)).await;
                    }
                }
                written = super::write_finished(&mut self.writing, |writing| &mut writing.task) => self.written(written),
                () = tokio::time::sleep_until(wake) => self.expire().await,
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Pull {
                consumer,
                max,
                wait,
                reply,
            } => {
                if let Err(error) = self.join(&consumer, Kind::Pull) {
                    let _ = reply.send(Err(error));
                    return;
                }
                self.waiters.push(Waiter {
                    consumer,
                    max,
                    deadline: Instant::now() + wait,
                    batch: Vec::new(),
                    reply,
                });
                self.deliver();
                self.answer_waiters();
            }
            Command::Subscribe {
                consumer,
                buffer,
                reply,
            } => {
                let (sender, receiver) = mpsc::channel(buffer);
                let kind = Kind::Push { sender, buffer };
                let _ = reply.send(self.join(&consumer, kind).map(|()| receiver));
            }
            Command::Ack { ids, reply } => {
                let acked = self.ack(&ids);
                self.answer_when_written(acked, reply);
            }
            Command::Nack {
                ids,
                action,
                reason,
                reply,
            } => {
                let nacked = self.nack(&ids, action, &reason).await;
                self.answer_when_written(nacked, reply);
            }
            Command::Update {
                settings,
                sharder,
                reply,
            } => {
                let _ = reply.send(self.update(settings, sharder).await);
            }
            Command::ReplayParked { stop_at, reply } => {
                let _ = reply.send(self.replay_parked(stop_at).await);
            }
            Command::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Command::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    /// A refused ack or nack is answered at once; an accepted one once the next write of the
    /// record has made it durable.
    fn answer_when_written(
        &mut self,
        result: Result<(), GroupError>,
        reply: oneshot::Sender<Result<(), GroupError>>,
    ) {
        match result {
            Ok(()) => self.unwritten.push(reply),
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    fn settings(&self) -> &Settings {
        &self.record.settings
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings().message_timeout_ms)
    }

    fn buffer_limit(&self) -> usize {
        if self.caught_up {
            self.settings().live_buffer_size
        } else {
            self.settings().history_buffer_size
        }
    }

    // ---- reading --------------------------------------------------------------------------

    async fn start_reader(&mut self) {
        self.stop_reader();
        self.caught_up = false;
        let keying = match &self.keying {
            Ok(keying) => keying.clone(),
            Err(error) => {
                self.fault = Some(error.clone());
                return;
            }
        };
        let settings = self.settings().clone();
        let source = super::source(&self.stream, &settings);
        let subscription = match Subscription::start(
            self.store.clone(),
            source,
            Start::At(self.next_read),
        )
        .await
        {
            Ok(subscription) => subscription,
            Err(error) => {
                self.fault = Some(format!("cannot read {}: {error}", self.stream));
                return;
            }
        };
        self.fault = None;
        let (sender, receiver) = mpsc::channel(settings.read_batch_size);
        let task = tokio::spawn(read_ahead(subscription, keying, sender));
        self.reader = Some((receiver, task));
    }

    fn stop_reader(&mut self) {
        if let Some((_, task)) = self.reader.take() {
            task.abort();
        }
    }

    async fn receive(&mut self, read: Option<Read>) {
        match read {
            Some(Read::Event(id, event, bucket)) => {
                self.next_read = id + 1;
                // After a settings change the reader may pass messages consumers still hold.
                if !self.messages.contains_key(&(Origin::Source, id)) {
                    self.admit((Origin::Source, id), event, bucket).await;
                }
            }
            Some(Read::CaughtUp) => self.caught_up = true,
            Some(Read::Failed(message)) => {
                self.fault = Some(message);
                self.stop_reader();
            }
            None => self.stop_reader(),
        }
    }

    /// Reads replayed parked messages while a replay runs and the buffer has room.
    async fn read_parked(&mut self) {
        let until = self.record.replay_until;
        let room = self.buffer_limit().saturating_sub(self.ready.len());
        if self.parked_read >= until || room == 0 {
            return;
        }
        let (stream, from) = (self.parked_stream.clone(), self.parked_read);
        let limit = room.min((until - from) as usize);
        let slice = self
            .store
            .blocking(move |store| {
                store.read_stream(&stream, Some(from), Direction::Forward, limit, true)
            })
            .await;
        match slice {
            Ok(slice) => {
                let events: Vec<Arc<RecordedEvent>> =
                    slice.events.into_iter().map(Arc::new).collect();
                let buckets = match &self.keying {
                    Ok(keying) => keying.buckets(&events).await,
                    Err(error) => vec![Err(error.clone()); events.len()],
                };
                for (event, bucket) in events.into_iter().zip(buckets) {
                    let revision = event.link.as_ref().map_or(event.revision, |l| l.revision);
                    if revision >= until {
                        break;
                    }
                    self.parked_read = revision + 1;
                    self.admit((Origin::Parked, revision), event, bucket).await;
                }
                // Links whose events are gone are skipped: nothing to replay for them.
                self.parked_read = self.parked_read.max(slice.cursor.min(until));
                if slice.next.is_none() {
                    self.parked_read = until;
                }
            }
            Err(error) => {
                tracing::warn!(group = %self.name, %error, "cannot read parked messages");
                self.parked_read = until;
            }
        }
    }

    /// Takes a read message into the buffer, with its bucket; one without a bucket (its
    /// sharder failed on it) is parked with the reason.
    async fn admit(&mut self, key: Key, event: Arc<RecordedEvent>, bucket: Result<u32, String>) {
        let done = match key.0 {
            Origin::Source => &self.source_done,
            Origin::Parked => &self.parked_done,
        };
        if done.contains(key.1) {
            return;
        }
        let message = Message {
            event,
            retry_count: 0,
            bucket: *bucket.as_ref().unwrap_or(&0),
            holder: None,
        };
        self.messages.insert(key, message);
        match bucket {
            Ok(_) => {
                self.ready.insert(key);
            }
            Err(reason) => self.park(vec![(key, reason)]).await,
        }
    }

    // ---- consumers ------------------------------------------------------------------------

    fn join(&mut self, name: &str, kind: Kind) -> Result<(), GroupError> {
        let now = Instant::now();
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.name == name) {
            consumer.last_seen = now;
            if let Kind::Push { .. } = kind {
                consumer.kind = kind;
            }
            return Ok(());
        }
        super::check_room(
            self.settings(),
            self.consumers.len(),
            &self.name,
            &self.stream,
        )?;
        self.consumers.push(Consumer {
            name: name.to_owned(),
            kind,
            last_seen: now,
            in_flight: 0,
            acked: 0,
            nacked: 0,
        });
        self.assign_buckets();
        Ok(())
    }

    /// A consumer leaves: its messages go back to be delivered to others.
    async fn leave(&mut self, name: &str, reason: &str) {
        let Some(index) = self.consumers.iter().position(|c| c.name == name) else {
            return;
        };
        let held: Vec<Key> = self
            .messages
            .iter()
            .filter(|(_, m)| m.holder.as_ref().is_some_and(|(holder, _)| holder == name))
            .map(|(key, _)| *key)
            .collect();
        self.retry(held, reason).await;
        self.consumers.remove(index);
        for waiter in std::mem::take(&mut self.waiters) {
            if waiter.consumer == name {
                let _ = waiter.reply.send(Ok(waiter.batch));
            } else {
                self.waiters.push(waiter);
            }
        }
        self.assign_buckets();
    }

    fn assign_buckets(&mut self) {
        let names: Vec<&str> = self.consumers.iter().map(|c| c.name.as_str()).collect();
        self.spread.assign(&names);
    }

    /// How many more messages a consumer takes now.
    fn room(&self, index: usize) -> usize {
        let consumer = &self.consumers[index];
        match &consumer.kind {
            Kind::Push { buffer, sender } => {
                if sender.is_closed() {
                    0
                } else {
                    buffer.saturating_sub(consumer.in_flight)
                }
            }
            Kind::Pull => self
                .waiters
                .iter()
                .filter(|w| w.consumer == consumer.name)
                .map(|w| w.max - w.batch.len())
                .sum(),
        }
    }

    // ---- delivery -------------------------------------------------------------------------

    fn deliver(&mut self) {
        if self.ready.is_empty() || self.consumers.is_empty() {
            return;
        }
        let mut rooms: Vec<usize> = (0..self.consumers.len()).map(|i| self.room(i)).collect();
        let mut left: usize = rooms.iter().sum();
        if left == 0 {
            return;
        }
        // Without buckets any consumer with room takes any message: the first `left` will do.
        let wanted = if self.spread.bucketed() {
            usize::MAX
        } else {
            left
        };
        let keys: Vec<Key> = self.ready.iter().copied().take(wanted).collect();
        for key in keys {
            if left == 0 {
                break;
            }
            let bucket = self.messages[&key].bucket;
            let holder = self.bucket_holders.get(&bucket);
            let consumers = &self.consumers;
            let held_elsewhere = |owner: usize| {
                holder.is_some_and(|(holder, count)| *count > 0 && *holder != consumers[owner].name)
            };
            let Some(index) = self.spread.pick(bucket, &rooms, held_elsewhere) else {
                continue;
            };
            rooms[index] -= 1;
            left -= 1;
            self.hand_over(key, index);
        }
    }

    fn hand_over(&mut self, key: Key, index: usize) {
        let deadline = Instant::now() + self.timeout();
        let consumer = &mut self.consumers[index];
        let message = self.messages.get_mut(&key).expect("a ready message");
        self.ready.remove(&key);
        message.holder = Some((consumer.name.clone(), deadline));
        self.deadlines.insert((deadline, key));
        let handled = &mut self.handled_to[key.0 as usize];
        *handled = (*handled).max(key.1 + 1);
        consumer.in_flight += 1;
        let holder = self
            .bucket_holders
            .entry(message.bucket)
            .or_insert_with(|| (consumer.name.clone(), 0));
        if holder.1 == 0 {
            holder.0 = consumer.name.clone();
        }
        holder.1 += 1;
        self.delivered += 1;
        let delivery = Delivery {
            ack_id: ack_id(key),
            retry_count: message.retry_count,
            event: message.event.clone(),
        };
        match &consumer.kind {
            // The channel holds `buffer` and in-flight messages never exceed it: no overflow.
            Kind::Push { sender, .. } => {
                let _ = sender.try_send(delivery);
            }
            Kind::Pull => {
                let name = consumer.name.clone();
                if let Some(waiter) = self
                    .waiters
                    .iter_mut()
                    .find(|w| w.consumer == name && w.batch.len() < w.max)
                {
                    waiter.batch.push(delivery);
                }
            }
        }
    }

    /// Answers pulls that got messages, whose wait is over, or whose caller went away.
    /// A consumer is seen until its pull ends: its silence counts from then.
    fn answer_waiters(&mut self) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            if !waiter.batch.is_empty() || waiter.deadline <= now || waiter.reply.is_closed() {
                if let Some(consumer) = self
                    .consumers
                    .iter_mut()
                    .find(|c| c.name == waiter.consumer)
                {
                    consumer.last_seen = now;
                }
                let _ = waiter.reply.send(Ok(waiter.batch));
            } else {
                self.waiters.push(waiter);
            }
        }
    }

    /// Takes a message off its consumer (or the ready set), leaving it in `messages`.
    fn release(&mut self, key: Key) {
        let Some(message) = self.messages.get_mut(&key) else {
            return;
        };
        self.ready.remove(&key);
        if let Some((holder, deadline)) = message.holder.take() {
            self.deadlines.remove(&(deadline, key));
            if let Some(consumer) = self.consumers.iter_mut().find(|c| c.name == holder) {
                consumer.in_flight = consumer.in_flight.saturating_sub(1);
            }
            if let Some(entry) = self.bucket_holders.get_mut(&message.bucket) {
                entry.1 = entry.1.saturating_sub(1);
                if entry.1 == 0 {
                    self.bucket_holders.remove(&message.bucket);
                }
            }
        }
    }

    fn finish(&mut self, key: Key) {
        let handled = &mut self.handled_to[key.0 as usize];
        *handled = (*handled).max(key.1 + 1);
        self.release(key);
        if self.messages.remove(&key).is_some() {
            self.finished_since_checkpoint += 1;
        }
    }

    fn holder_of(&self, key: Key) -> Option<String> {
        self.messages
            .get(&key)
            .and_then(|m| m.holder.as_ref().map(|(holder, _)| holder.clone()))
    }

    fn touch(&mut self, name: &str, acked: u64, nacked: u64) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.name == name) {
            consumer.last_seen = Instant::now();
            consumer.acked += acked;
            consumer.nacked += nacked;
        }
    }

    /// Ack ids must name a message the group has read; acking one twice is harmless.
    fn parse_ids(&self, ids: &[String]) -> Result<Vec<Key>, GroupError> {
        let keys = ids
            .iter()
            .map(|id| {
                parse_ack_id(id).ok_or_else(|| {
                    GroupError::Invalid(format!(
                        "{id:?} is not an ack id: a revision or position, or p and a parked one"
                    ))
                })
            })
            .collect::<Result<Vec<Key>, GroupError>>()?;
        for (id, &(origin, sequence)) in ids.iter().zip(&keys) {
            let read = match origin {
                Origin::Source => sequence < self.next_read,
                Origin::Parked => sequence < self.parked_read,
            };
            if !read {
                return Err(GroupError::NotDelivered(format!(
                    "ack id {id:?}: the group has not delivered that message"
                )));
            }
        }
        Ok(keys)
    }

    fn ack(&mut self, ids: &[String]) -> Result<(), GroupError> {
        let keys = self.parse_ids(ids)?;
        for key in keys {
            if let Some(holder) = self.holder_of(key) {
                self.touch(&holder, 1, 0);
            }
            self.finish(key);
        }
        Ok(())
    }

    async fn nack(
        &mut self,
        ids: &[String],
        action: NackAction,
        reason: &str,
    ) -> Result<(), GroupError> {
        let keys: Vec<Key> = self
            .parse_ids(ids)?
            .into_iter()
            .filter(|key| self.messages.get(key).is_some_and(|m| m.holder.is_some()))
            .collect();
        let mut holders = Vec::new();
        for &key in &keys {
            if let Some(holder) = self.holder_of(key) {
                self.touch(&holder, 0, 1);
                holders.push(holder);
            }
        }
        let reason = if reason.is_empty() {
            "nacked".to_owned()
        } else {
            reason.to_owned()
        };
        match action {
            NackAction::Park => {
                self.park(keys.into_iter().map(|key| (key, reason.clone())).collect())
                    .await
            }
            NackAction::Retry => self.retry(keys, &reason).await,
            NackAction::Skip => keys.into_iter().for_each(|key| self.finish(key)),
            NackAction::Stop => {
                holders.dedup();
                for holder in holders {
                    self.leave(&holder, &reason).await;
                }
            }
        }
        Ok(())
    }

    /// Puts messages back to be delivered again, or parks those out of retries.
    async fn retry(&mut self, keys: Vec<Key>, reason: &str) {
        let max = self.settings().max_retry_count;
        let mut to_park = Vec::new();
        for key in keys {
            self.release(key);
            let Some(message) = self.messages.get_mut(&key) else {
                continue;
            };
            message.retry_count += 1;
            if message.retry_count > max {
                to_park.push((key, format!("{reason}; no retries left after {max}")));
            } else {
                self.ready.insert(key);
            }
        }
        if !to_park.is_empty() {
            self.park(to_park).await;
        }
    }

    /// Links messages from the parked stream; they are finished once that is durable.
    async fn park(&mut self, messages: Vec<(Key, String)>) {
        for (key, _) in &messages {
            self.release(*key);
        }
        let parking = Parking {
            stream: self.stream.clone(),
            group: self.name.clone(),
            parked_stream: self.parked_stream.clone(),
            messages: messages
                .iter()
                .filter_map(|(key, reason)| {
                    self.messages
                        .get(key)
                        .map(|m| (m.event.position, reason.clone()))
                })
                .collect(),
        };
        match self.store.park(parking).await {
            Ok(()) => {
                self.parked_count += messages.len() as u64;
                for (key, _) in messages {
                    self.finish(key);
                }
            }
            Err(error) => {
                tracing::warn!(group = %self.name, %error, "cannot park messages; retrying them");
                for (key, _) in messages {
                    self.ready.insert(key);
                }
            }
        }
    }

    /// Retries messages past their deadline, drops silent consumers, ends waits.
    async fn expire(&mut self) {
        let now = Instant::now();
        if now >= self.next_sweep {
            self.next_sweep = now + IDLE_WAKE;
        }
        let overdue: Vec<Key> = self
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, key)| *key)
            .collect();
        if !overdue.is_empty() {
            self.retry(overdue, "message timeout").await;
        }
        let timeout = self.timeout();
        let gone: Vec<String> = self
            .consumers
            .iter()
            .filter(|c| match &c.kind {
                Kind::Push { sender, .. } => sender.is_closed(),
                Kind::Pull => {
                    c.last_seen + timeout <= now
                        && !self.waiters.iter().any(|w| w.consumer == c.name)
                }
            })
            .map(|c| c.name.clone())
            .collect();
        for name in gone {
            self.leave(&name, "the consumer left").await;
        }
        self.answer_waiters();
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = self.next_sweep;
        if let Some((deadline, _)) = self.deadlines.first() {
            wake = wake.min(*deadline);
        }
        for waiter in &self.waiters {
            wake = wake.min(waiter.deadline);
        }
        let timeout = self.timeout();
        for consumer in &self.consumers {
            let waiting = self.waiters.iter().any(|w| w.consumer == consumer.name);
            if let (Kind::Pull, false) = (&consumer.kind, waiting) {
                wake = wake.min(consumer.last_seen + timeout);
            }
        }
        let moved = self.positions() != (self.record.next, self.record.parked_next);
        if moved && self.finished_since_checkpoint >= self.settings().min_checkpoint_count {
            let due =
                self.last_checkpoint + Duration::from_millis(self.settings().checkpoint_after_ms);
            wake = wake.min(due);
        }
        wake.max(now)
    }

    // ---- checkpoints, settings, parked replay ---------------------------------------------

    fn positions(&self) -> (u64, u64) {
        let first = |origin: Origin, frontier: u64| {
            self.messages
                .range((origin, 0)..=(origin, u64::MAX))
                .next()
                .map_or(frontier, |((_, sequence), _)| *sequence)
        };
        (
            first(Origin::Source, self.next_read),
            first(Origin::Parked, self.parked_read),
        )
    }

    /// Starts a write of the group's record when acks wait for one, or when the checkpoint is
    /// due by the settings' counts and interval (or with `force`). One write at a time: acks that
    /// arrive meanwhile share the next one.
    fn start_write(&mut self, force: bool) {
        if self.writing.is_some() {
            return;
        }
        let (next, parked_next) = self.positions();
        let moved = (next, parked_next) != (self.record.next, self.record.parked_next);
        let settings = self.settings();
        let finished = self.finished_since_checkpoint;
        let due = moved
            && (force
                || finished >= settings.max_checkpoint_count
                || (finished >= settings.min_checkpoint_count
                    && self.last_checkpoint.elapsed()
                        >= Duration::from_millis(settings.checkpoint_after_ms)));
        if !due && self.unwritten.is_empty() {
            return;
        }
        let (next, parked_next) = if due {
            (next, parked_next)
        } else {
            (self.record.next, self.record.parked_next)
        };
        let record = Record {
            next,
            parked_next,
            source_done: self.done(Origin::Source),
            parked_done: self.done(Origin::Parked),
            ..self.record.clone()
        };
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        let (store, stream, group) = (self.store.clone(), self.stream.clone(), self.name.clone());
        let task = tokio::spawn(async move { store.save_group(stream, group, bytes).await });
        self.writing = Some(Writing {
            task,
            record,
            replies: std::mem::take(&mut self.unwritten),
            checkpoint_moved: due,
        });
    }

    /// What is finished beyond the checkpoint now: everything up to the highest message handled,
    /// except the messages held or waiting, and except what the last start was told is
    /// unfinished and not read again yet.
    fn done(&self, origin: Origin) -> Done {
        let (frontier, stored) = match origin {
            Origin::Source => (self.next_read, &self.source_done),
            Origin::Parked => (self.parked_read, &self.parked_done),
        };
        let read_to = self.handled_to[origin as usize].max(stored.read_to);
        let mut unfinished: Vec<u64> = self
            .messages
            .range((origin, 0)..(origin, read_to))
            .map(|((_, sequence), _)| *sequence)
            .collect();
        unfinished.extend(
            stored
                .unfinished
                .iter()
                .copied()
                .filter(|&sequence| sequence >= frontier),
        );
        unfinished.sort_unstable();
        unfinished.dedup();
        Done {
            read_to,
            unfinished,
        }
    }

    fn written(&mut self, (writing, result): (Writing, Result<(), StoreError>)) {
        match result {
            Ok(()) => {
                if writing.checkpoint_moved {
                    self.finished_since_checkpoint = 0;
                    self.last_checkpoint = Instant::now();
                }
                self.record = writing.record;
                for reply in writing.replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(error) => {
                tracing::warn!(group = %self.name, %error, "cannot write the group's record");
                let message = error.to_string();
                for reply in writing.replies {
                    let _ =
                        reply.send(Err(GroupError::Store(StoreError::Storage(message.clone()))));
                }
            }
        }
    }

    /// Waits for the write in progress, if any.
    async fn finish_write(&mut self) {
        if self.writing.is_some() {
            let done = super::write_finished(&mut self.writing, |writing| &mut writing.task).await;
            self.written(done);
        }
    }

    /// Stores a changed record (settings, replay) now, keeping checkpoint and acks as they are.
    async fn write(&mut self, record: Record) -> Result<(), GroupError> {
        self.finish_write().await;
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        self.store
            .save_group(self.stream.clone(), self.name.clone(), bytes)
            .await?;
        self.record = record;
        Ok(())
    }

    async fn update(
        &mut self,
        settings: Settings,
        sharder: Option<Arc<Sharder>>,
    ) -> Result<(), GroupError> {
        let old = self.record.settings.clone();
        self.write(Record {
            settings,
            ..self.record.clone()
        })
        .await?;
        let new = self.settings().clone();
        self.keying = Keying::of(&new.strategy, &self.config, sharder);
        let strategy_changed = new.strategy != old.strategy;
        if strategy_changed {
            self.spread = Spread::new(&new.strategy);
            self.assign_buckets();
            // Held messages keep the bucket they were delivered under until they finish;
            // waiting ones take the new strategy's.
            if let Ok(keying) = &self.keying {
                let waiting: Vec<Key> = self.ready.iter().copied().collect();
                let events: Vec<Arc<RecordedEvent>> = waiting
                    .iter()
                    .map(|key| self.messages[key].event.clone())
                    .collect();
                let buckets = keying.buckets(&events).await;
                for (key, bucket) in waiting.into_iter().zip(buckets) {
                    if let Ok(bucket) = bucket {
                        self.messages.get_mut(&key).expect("a message").bucket = bucket;
                    }
                }
            }
        }
        let source_changed = new.resolve_links != old.resolve_links
            || new.stream_prefix != old.stream_prefix
            || new.type_prefix != old.type_prefix;
        if source_changed || strategy_changed || self.reader.is_none() {
            // Messages not yet delivered are read again in the new shape.
            let waiting: Vec<Key> = self
                .ready
                .iter()
                .filter(|(origin, _)| *origin == Origin::Source)
                .copied()
                .collect();
            // What was finished stays finished when the reader passes it again.
            self.source_done = self.done(Origin::Source);
            if let Some(&(_, first)) = waiting.first() {
                self.next_read = first;
            }
            for key in waiting {
                self.release(key);
                self.messages.remove(&key);
            }
            self.start_reader().await;
        }
        Ok(())
    }

    async fn replay_parked(&mut self, stop_at: Option<u64>) -> Result<u64, GroupError> {
        let parked = {
            let stream = self.parked_stream.clone();
            self.store
                .blocking(move |store| store.last_revision(&stream))
                .await?
                .map_or(0, |last| last + 1)
        };
        self.parked_count = parked;
        let from = self.record.replay_until.max(self.parked_read);
        let until = match stop_at {
            Some(count) => from.saturating_add(count).min(parked),
            None => parked,
        };
        let replaying = until.saturating_sub(from);
        if until > self.record.replay_until {
            let record = Record {
                replay_until: until,
                ..self.record.clone()
            };
            self.write(record).await?;
        }
        Ok(replaying)
    }

    fn info(&self) -> Info {
        let (_, parked_next) = self.positions();
        Info {
            stream: self.stream.clone(),
            group: self.name.clone(),
            settings: self.settings().clone(),
            status: super::status(&self.fault, self.caught_up).to_owned(),
            message: self.fault.clone(),
            consumers: self
                .consumers
                .iter()
                .map(|c| ConsumerInfo {
                    name: c.name.clone(),
                    in_flight: c.in_flight,
                    acked: c.acked,
                    nacked: c.nacked,
                })
                .collect(),
            checkpoint: self.record.checkpoint(),
            checkpoint_next: self.record.next,
            last_known: self
                .next_read
                .checked_sub(1)
                .filter(|_| self.next_read > self.record.start),
            in_flight: self.deadlines.len(),
            ready: self.ready.len(),
            parked: self.parked_count.saturating_sub(parked_next),
            delivered: self.delivered,
            generation: None,
            partitions: None,
            repartitioning: None,
        }
    }
}

/// Reads the source and gives each event its bucket, a batch at a time (a sharder runs once
/// per batch, off the async workers).
async fn read_ahead(mut subscription: Subscription, keying: Keying, sender: mpsc::Sender<Read>) {
    loop {
        let items = match subscription.next_batch().await {
            Ok(items) => items,
            Err(error) => {
                let _ = sender.send(Read::Failed(error.to_string())).await;
                return;
            }
        };
        let mut reads = Vec::with_capacity(items.len());
        let mut events = Vec::new();
        for item in items {
            match item {
                Item::Event { id, event } => {
                    let event: Arc<RecordedEvent> = Arc::from(event);
                    events.push(event.clone());
                    reads.push(Some((id, event)));
                }
                Item::CaughtUp => reads.push(None),
            }
        }
        let mut buckets = keying.buckets(&events).await.into_iter();
        for read in reads {
            let read = match read {
                Some((id, event)) => {
                    let bucket = buckets.next().expect("a bucket per event");
                    Read::Event(id, event, bucket)
                }
                None => Read::CaughtUp,
            };
            if sender.send(read).await.is_err() {
                return;
            }
        }
    }
}
