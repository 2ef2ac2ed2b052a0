//! A partitioned group: Kafka's consumer-group model over a Refract source. A sharder places
//! every event in one of the group's partitions; each partition belongs to one consumer at a
//! time, which receives the partition's events in order and commits an offset per partition (the
//! revision or position of the last event it processed) instead of acking each message.
//!
//! Ownership changes only when a consumer joins, leaves or times out, and each change starts a
//! new generation: a commit names the generation it was made in, so a consumer that lost a
//! partition cannot commit for it. A partition that changes owner starts again after its
//! committed offset, so its new owner receives everything not committed (at least once, in
//! order).
//!
//! One reader reads the source for every partition and shards it in batches. Each partition
//! holds a bounded queue; a partition whose queue is full lets the reader go on for the others
//! and is read again from where it fell behind once its consumer catches up.
//!
//! A change of sharder or partition count waits at a switch position: events before it keep the
//! old placement, none after it is delivered until every partition has committed everything
//! before it, and then all partitions start at the switch position with the new placement.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::settings::{Offsets, Record, Settings, Strategy};
use super::{
    Assignment, ConsumerInfo, GroupError, Info, PartitionInfo, PartitionMessage, Partitioned,
    Repartitioning,
};
use crate::sharding::Sharder;
use crate::store::{RecordedEvent, Store, StoreError};
use crate::subscribe::{Item, Start, Subscription};

/// Generations are handed out in blocks whose end is stored first, so a restart never hands
/// out a generation a consumer may still hold.
const GENERATION_BLOCK: u64 = 1 << 20;
/// How often the task looks for silent consumers when nothing else wakes it.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How long a partition's owner may go without pulling before the reader stops waiting for it.
const OWNER_GRACE: Duration = Duration::from_secs(5);
/// How long a faulted reader waits before it tries again.
const RETRY: Duration = Duration::from_secs(1);
/// Sharded batches the reader may have ready ahead of the task.
const READ_AHEAD: usize = 4;

pub(super) enum Command {
    Pull {
        consumer: String,
        /// The generation the consumer last learned; `None` from a consumer starting (again).
        generation: Option<u64>,
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Partitioned, GroupError>>,
    },
    Commit {
        consumer: String,
        generation: u64,
        offsets: BTreeMap<u32, u64>,
        reply: oneshot::Sender<Result<(), GroupError>>,
    },
    Leave {
        consumer: String,
    },
    Update {
        settings: Settings,
        sharder: Arc<Sharder>,
        reply: oneshot::Sender<Result<(), GroupError>>,
    },
    Info {
        reply: oneshot::Sender<Info>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// Where events are placed: a sharder and a partition count.
#[derive(Clone)]
struct Layout {
    sharder_name: String,
    sharder: Arc<Sharder>,
    partitions: u32,
}

struct Partition {
    owner: Option<String>,
    /// The first revision/position not committed.
    committed_next: u64,
    /// Read and waiting for the owner.
    queue: VecDeque<(u64, Arc<RecordedEvent>)>,
    /// Delivered to the owner and not committed, in order.
    delivered: VecDeque<u64>,
    /// Every event of the partition before this is queued, delivered or committed.
    read_next: u64,
    /// Events from `read_next` on were passed over (a full queue, a new owner): they are read
    /// again before this partition gets anything newer.
    behind: bool,
}

impl Partition {
    fn new(committed_next: u64) -> Partition {
        Partition {
            owner: None,
            committed_next,
            queue: VecDeque::new(),
            delivered: VecDeque::new(),
            read_next: committed_next,
            behind: false,
        }
    }

    /// Forgets what was read or delivered and not committed: the partition starts again after
    /// its committed offset.
    fn restart(&mut self) {
        self.queue.clear();
        self.delivered.clear();
        self.read_next = self.committed_next;
        self.behind = true;
    }

    fn lag(&self) -> u64 {
        (self.queue.len() + self.delivered.len()) as u64
    }
}

struct Consumer {
    name: String,
    last_seen: Instant,
    delivered: u64,
    committed: u64,
}

struct Waiter {
    consumer: String,
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<Partitioned, GroupError>>,
}

enum Read {
    /// Events with their id in the source and their partition.
    Events(Vec<(u64, Arc<RecordedEvent>, u32)>),
    /// Everything written so far was read; live events follow.
    CaughtUp,
    /// Everything before the switch position was read.
    ReachedSwitch,
    Failed(String),
}

struct Writing {
    task: JoinHandle<Result<(), StoreError>>,
    replies: Vec<oneshot::Sender<Result<(), GroupError>>>,
}

pub(super) struct Group {
    store: Store,
    stream: String,
    name: String,
    record: Record,
    layout: Layout,
    /// The layout a pending switch moves to.
    next_layout: Option<Layout>,
    partitions: Vec<Partition>,
    consumers: Vec<Consumer>,
    waiters: Vec<Waiter>,
    generation: u64,
    reader: Option<(mpsc::Receiver<Read>, JoinHandle<()>)>,
    /// The first id the reader has not handed over.
    reader_next: u64,
    reached_switch: bool,
    caught_up: bool,
    fault: Option<String>,
    /// When a faulted reader tries again.
    retry_at: Instant,
    /// When offsets whose write failed are written again.
    write_retry_at: Instant,
    delivered: u64,
    /// Where the next partition of a pull starts, so every owned partition gets its turn.
    turn: usize,
    unwritten: Vec<oneshot::Sender<Result<(), GroupError>>>,
    /// Commits changed the offsets since the last write started.
    dirty: bool,
    writing: Option<Writing>,
}

impl Group {
    /// Opens the group. `sharder` is the one its settings name; `current_sharder` the one its
    /// events are placed with now (another while a switch waits).
    pub(super) async fn start(
        store: Store,
        stream: String,
        name: String,
        mut record: Record,
        sharder: Arc<Sharder>,
        current_sharder: Arc<Sharder>,
    ) -> Result<Group, GroupError> {
        let (target_name, target_count) = target(&record.settings)?;
        let offsets = record.offsets.clone().ok_or_else(|| {
            GroupError::Invalid("a partitioned group's record has no offsets".into())
        })?;
        let layout = Layout {
            sharder_name: offsets.sharder.clone(),
            sharder: current_sharder,
            partitions: offsets.partitions,
        };
        let next_layout = offsets.switch_at.map(|_| Layout {
            sharder_name: target_name,
            sharder,
            partitions: target_count,
        });
        // A block of generations nobody was given yet.
        let generation = offsets.generation_floor;
        let stored = Offsets {
            generation_floor: generation + GENERATION_BLOCK,
            ..offsets.clone()
        };
        record.offsets = Some(stored);
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        store
            .save_group(stream.clone(), name.clone(), bytes)
            .await?;
        let partitions = offsets
            .next
            .iter()
            .map(|&next| Partition::new(next))
            .collect();
        let reader_next = offsets.next.iter().copied().min().unwrap_or(record.start);
        let mut group = Group {
            store,
            stream,
            name,
            record,
            layout,
            next_layout,
            partitions,
            consumers: Vec::new(),
            waiters: Vec::new(),
            generation,
            reader: None,
            reader_next,
            reached_switch: false,
            caught_up: false,
            fault: None,
            retry_at: Instant::now(),
            write_retry_at: Instant::now(),
            delivered: 0,
            turn: 0,
            unwritten: Vec::new(),
            dirty: false,
            writing: None,
        };
        group.start_reader(reader_next).await;
        Ok(group)
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            self.read_again().await;
            self.switch_when_ready().await;
            self.answer_waiters(false);
            self.start_write();
            let wake = self.next_wake();
            let room = self.has_room();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Stop { reply }) => {
                        self.finish_write().await;
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
                read = super::next_read(&mut self.reader), if room => {
                    self.receive(read);
                    // Take what else is already read, so a pull gets a full batch at once.
                    while self.has_room() {
                        let Some(read) = self.reader.as_mut().and_then(|(r, _)| r.try_recv().ok())
                        else {
                            break;
                        };
                        self.receive(Some(read));
                    }
                }
                written = super::write_finished(&mut self.writing, |writing| &mut writing.task) => self.written(written),
                () = tokio::time::sleep_until(wake) => self.expire(),
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Pull {
                consumer,
                generation,
                max,
                wait,
                reply,
            } => {
                if let Err(error) = self.join(&consumer, generation.is_none()) {
                    let _ = reply.send(Err(error));
                    return;
                }
                self.waiters.push(Waiter {
                    consumer,
                    max,
                    deadline: Instant::now() + wait,
                    reply,
                });
                self.answer_waiters(false);
            }
            Command::Commit {
                consumer,
                generation,
                offsets,
                reply,
            } => match self.commit(&consumer, generation, &offsets) {
                Ok(()) => self.unwritten.push(reply),
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Command::Leave { consumer } => self.leave(&consumer),
            Command::Update {
                settings,
                sharder,
                reply,
            } => {
                let _ = reply.send(self.update(settings, sharder).await);
            }
            Command::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Command::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    fn settings(&self) -> &Settings {
        &self.record.settings
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings().message_timeout_ms)
    }

    /// Events a partition holds ready for its owner.
    fn queue_limit(&self) -> usize {
        self.settings()
            .history_buffer_size
            .max(self.settings().live_buffer_size)
    }

    fn offsets(&self) -> &Offsets {
        self.record.offsets.as_ref().expect("a partitioned record")
    }

    // ---- reading --------------------------------------------------------------------------

    /// Whether some partition takes what the reader reads next.
    fn has_room(&self) -> bool {
        let limit = self.queue_limit();
        // Past a partition that fell behind, the reader goes on for the others only so far:
        // reading again for it re-reads at most this much.
        let window = (limit * self.partitions.len()).saturating_mul(4) as u64;
        let too_far = self
            .partitions
            .iter()
            .filter(|p| p.behind && self.owner_alive(p))
            .any(|p| self.reader_next > p.read_next.saturating_add(window));
        self.reader.is_some()
            && !too_far
            && self
                .partitions
                .iter()
                .any(|p| !p.behind && p.queue.len() < limit)
    }

    /// Whether a partition's owner pulls: it waits on a pull, or pulled within a few seconds.
    /// A consumer that died holds the others back for that long, not its whole timeout.
    fn owner_alive(&self, partition: &Partition) -> bool {
        let Some(owner) = partition.owner.as_deref() else {
            return false;
        };
        let grace = self.timeout().min(OWNER_GRACE);
        self.waiters.iter().any(|w| w.consumer == owner)
            || self
                .consumers
                .iter()
                .any(|c| c.name == owner && c.last_seen.elapsed() < grace)
    }

    async fn start_reader(&mut self, from: u64) {
        self.stop_reader();
        self.caught_up = false;
        self.reached_switch = false;
        self.reader_next = from;
        let source = super::source(&self.stream, self.settings());
        let subscription =
            match Subscription::start(self.store.clone(), source, Start::At(from)).await {
                Ok(subscription) => subscription,
                Err(error) => {
                    self.fault = Some(format!("cannot read {}: {error}", self.stream));
                    return;
                }
            };
        self.fault = None;
        let until = self.offsets().switch_at;
        let (sender, receiver) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(read_ahead(subscription, self.layout.clone(), until, sender));
        self.reader = Some((receiver, task));
    }

    fn stop_reader(&mut self) {
        if let Some((_, task)) = self.reader.take() {
            task.abort();
        }
    }

    fn receive(&mut self, read: Option<Read>) {
        let limit = self.queue_limit();
        match read {
            Some(Read::Events(events)) => {
                for (id, event, partition) in events {
                    self.reader_next = id + 1;
                    let partition = &mut self.partitions[partition as usize];
                    if id < partition.read_next || partition.behind {
                        continue;
                    }
                    if partition.queue.len() >= limit {
                        partition.behind = true;
                        continue;
                    }
                    partition.queue.push_back((id, event));
                    partition.read_next = id + 1;
                }
            }
            Some(Read::ReachedSwitch) => {
                self.reached_switch = true;
                self.caught_up = true;
                self.stop_reader();
            }
            Some(Read::Failed(message)) => {
                self.fault = Some(message);
                self.stop_reader();
            }
            Some(Read::CaughtUp) => self.caught_up = true,
            None => self.stop_reader(),
        }
    }

    /// Where a new reader starts so that no partition misses an event: a partition that is not
    /// behind has everything before the reader's position.
    fn read_again_from(&self) -> u64 {
        self.partitions
            .iter()
            .filter(|p| p.behind)
            .map(|p| p.read_next)
            .chain([self.reader_next])
            .min()
            .expect("the reader's position")
    }

    /// Reads again for partitions that fell behind, once one of them has room for half a
    /// queue (so a slow consumer does not make the reader go back for every few events).
    async fn read_again(&mut self) {
        let limit = self.queue_limit();
        let reader_next = self.reader_next;
        // A partition that fell behind where the reader has not been yet is not behind.
        for partition in &mut self.partitions {
            if partition.behind && partition.read_next >= reader_next {
                partition.behind = false;
            }
        }
        if self.fault.is_some() {
            if self.reader.is_none() && Instant::now() >= self.retry_at {
                // A store that failed may answer now; a sharder that failed fails again.
                self.retry_at = Instant::now() + RETRY;
                let from = self.read_again_from();
                for partition in &mut self.partitions {
                    partition.behind = false;
                }
                self.start_reader(from).await;
            }
            return;
        }
        let wanted = self
            .partitions
            .iter()
            .any(|p| p.behind && p.queue.len() <= limit / 2);
        if !wanted {
            return;
        }
        let from = self
            .partitions
            .iter()
            .filter(|p| p.behind)
            .map(|p| p.read_next)
            .min()
            .expect("a partition behind");
        for partition in &mut self.partitions {
            partition.behind = false;
        }
        self.start_reader(from).await;
    }

    // ---- consumers ------------------------------------------------------------------------

    /// A pull's consumer joins, or is seen again. One that is `starting` (its pull names no
    /// generation: a new process under a known name, or a client that lost an answer) gets its
    /// partitions from their committed offsets again, as nothing it was sent is known to have
    /// arrived.
    fn join(&mut self, name: &str, starting: bool) -> Result<(), GroupError> {
        let now = Instant::now();
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.name == name) {
            consumer.last_seen = now;
            if starting {
                // A pull the earlier process left waiting gets nothing: what it would take
                // could be lost with its connection.
                let generation = self.generation;
                for waiter in std::mem::take(&mut self.waiters) {
                    if waiter.consumer == name {
                        let _ = waiter.reply.send(Ok(Partitioned {
                            assignment: Assignment {
                                generation,
                                partitions: Vec::new(),
                            },
                            messages: Vec::new(),
                        }));
                    } else {
                        self.waiters.push(waiter);
                    }
                }
                for partition in &mut self.partitions {
                    if partition.owner.as_deref() == Some(name) {
                        partition.restart();
                    }
                }
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
            last_seen: now,
            delivered: 0,
            committed: 0,
        });
        self.rebalance();
        Ok(())
    }

    fn leave(&mut self, name: &str) {
        let Some(index) = self.consumers.iter().position(|c| c.name == name) else {
            return;
        };
        self.consumers.remove(index);
        for waiter in std::mem::take(&mut self.waiters) {
            if waiter.consumer == name {
                let answer = Partitioned {
                    assignment: Assignment {
                        generation: self.generation,
                        partitions: Vec::new(),
                    },
                    messages: Vec::new(),
                };
                let _ = waiter.reply.send(Ok(answer));
            } else {
                self.waiters.push(waiter);
            }
        }
        self.rebalance();
    }

    /// A new generation: owners by [`assign`]; a partition that changes owner starts again
    /// after its committed offset. Every waiting pull is answered at once so its consumer
    /// learns the new assignment.
    fn rebalance(&mut self) {
        let mut names: Vec<&str> = self.consumers.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        let current: Vec<Option<&str>> =
            self.partitions.iter().map(|p| p.owner.as_deref()).collect();
        let owners: Vec<Option<String>> = assign(&current, &names)
            .into_iter()
            .map(|owner| owner.map(str::to_owned))
            .collect();
        let moved = self
            .partitions
            .iter()
            .zip(&owners)
            .any(|(partition, owner)| partition.owner != *owner);
        if !moved {
            // A consumer with no partition joined or left: nobody's commits go stale.
            return;
        }
        self.generation += 1;
        // Half a block before the stored end, store the next end: the write has long been made
        // when generations get there.
        let floor = self.offsets().generation_floor;
        if self.generation + GENERATION_BLOCK / 2 >= floor {
            let mut offsets = self.offsets().clone();
            offsets.generation_floor = floor + GENERATION_BLOCK;
            self.record.offsets = Some(offsets);
            self.dirty = true;
        }
        for (partition, owner) in self.partitions.iter_mut().zip(owners) {
            if partition.owner != owner {
                partition.owner = owner;
                partition.restart();
            }
        }
        self.answer_waiters(true);
    }

    fn assignment(&self, consumer: &str) -> Assignment {
        Assignment {
            generation: self.generation,
            partitions: self
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.owner.as_deref() == Some(consumer))
                .map(|(index, _)| index as u32)
                .collect(),
        }
    }

    /// Up to `max` messages from the consumer's partitions, each partition's in order.
    fn take(&mut self, consumer: &str, max: usize) -> Vec<PartitionMessage> {
        let owned = self.assignment(consumer).partitions;
        let mut messages = Vec::new();
        if owned.is_empty() {
            return messages;
        }
        let start = self.turn % owned.len();
        self.turn = self.turn.wrapping_add(1);
        // Shares per partition, so one busy partition does not starve the others of a pull.
        let share = max.div_ceil(owned.len());
        for round in 0..2 {
            for offset in 0..owned.len() {
                let index = owned[(start + offset) % owned.len()];
                let partition = &mut self.partitions[index as usize];
                let room = max - messages.len();
                let count = if round == 0 { share.min(room) } else { room };
                for _ in 0..count {
                    let Some((id, event)) = partition.queue.pop_front() else {
                        break;
                    };
                    partition.delivered.push_back(id);
                    messages.push(PartitionMessage {
                        partition: index,
                        id,
                        event,
                    });
                }
                if messages.len() == max {
                    break;
                }
            }
            if messages.len() == max {
                break;
            }
        }
        self.delivered += messages.len() as u64;
        if let Some(c) = self.consumers.iter_mut().find(|c| c.name == consumer) {
            c.delivered += messages.len() as u64;
        }
        messages
    }

    /// Answers pulls that have messages, whose wait is over or whose caller went away; with
    /// `all`, every pull (the assignment changed).
    fn answer_waiters(&mut self, all: bool) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            if waiter.reply.is_closed() {
                continue;
            }
            let messages = self.take(&waiter.consumer, waiter.max);
            if messages.is_empty() && !all && waiter.deadline > now {
                self.waiters.push(waiter);
                continue;
            }
            if let Some(consumer) = self
                .consumers
                .iter_mut()
                .find(|c| c.name == waiter.consumer)
            {
                consumer.last_seen = now;
            }
            let answer = Partitioned {
                assignment: self.assignment(&waiter.consumer),
                messages,
            };
            if let Err(Ok(answer)) = waiter.reply.send(Ok(answer)) {
                // The caller went away meanwhile: its messages go out again.
                self.undeliver(&answer.messages);
            }
        }
    }

    /// Puts messages a consumer never received back at the front of their partitions.
    fn undeliver(&mut self, messages: &[PartitionMessage]) {
        for message in messages.iter().rev() {
            let partition = &mut self.partitions[message.partition as usize];
            if partition.delivered.back() == Some(&message.id) {
                partition.delivered.pop_back();
                partition
                    .queue
                    .push_front((message.id, message.event.clone()));
            }
        }
        self.delivered = self.delivered.saturating_sub(messages.len() as u64);
    }

    /// Checks a commit whole, then applies it.
    fn commit(
        &mut self,
        consumer: &str,
        generation: u64,
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<(), GroupError> {
        if generation != self.generation {
            return Err(GroupError::StaleGeneration(format!(
                "generation {generation} is over; the group is at generation {} (pull to learn \
                 your partitions)",
                self.generation
            )));
        }
        if !self.consumers.iter().any(|c| c.name == consumer) {
            return Err(GroupError::NotOwner(format!(
                "{consumer:?} is not a consumer of the group (pull to join)"
            )));
        }
        let count = self.partitions.len() as u32;
        for (&index, &offset) in offsets {
            let Some(partition) = self.partitions.get(index as usize) else {
                return Err(GroupError::NotOwner(format!(
                    "the group has {count} partitions; partition {index} is nobody's"
                )));
            };
            if partition.owner.as_deref() != Some(consumer) {
                return Err(GroupError::NotOwner(format!(
                    "partition {index} is not {consumer:?}'s in generation {generation}"
                )));
            }
            let last = partition.delivered.back().copied();
            if offset >= partition.committed_next && last.is_none_or(|last| offset > last) {
                return Err(GroupError::NotDelivered(format!(
                    "offset {offset} of partition {index} is past what was delivered{}",
                    last.map_or(String::new(), |last| format!(" (up to {last})"))
                )));
            }
        }
        let mut committed = 0;
        for (&index, &offset) in offsets {
            let partition = &mut self.partitions[index as usize];
            if offset < partition.committed_next {
                continue;
            }
            while partition.delivered.front().is_some_and(|&id| id <= offset) {
                partition.delivered.pop_front();
                committed += 1;
            }
            partition.committed_next = offset + 1;
            self.dirty = true;
        }
        if let Some(c) = self.consumers.iter_mut().find(|c| c.name == consumer) {
            c.last_seen = Instant::now();
            c.committed += committed;
        }
        Ok(())
    }

    /// Drops consumers silent for the message timeout (one waiting on a pull is not silent),
    /// ends waits.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.timeout();
        let gone: Vec<String> = self
            .consumers
            .iter()
            .filter(|c| {
                c.last_seen + timeout <= now && !self.waiters.iter().any(|w| w.consumer == c.name)
            })
            .map(|c| c.name.clone())
            .collect();
        for name in gone {
            tracing::info!(group = %self.name, stream = %self.stream, consumer = %name,
                "a silent consumer left the group");
            self.leave(&name);
        }
        self.answer_waiters(false);
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + IDLE_WAKE;
        if self.fault.is_some() && self.reader.is_none() {
            wake = wake.min(self.retry_at);
        }
        for waiter in &self.waiters {
            wake = wake.min(waiter.deadline);
        }
        let timeout = self.timeout();
        for consumer in &self.consumers {
            if !self.waiters.iter().any(|w| w.consumer == consumer.name) {
                wake = wake.min(consumer.last_seen + timeout);
            }
        }
        wake.max(now)
    }

    // ---- offsets, settings ----------------------------------------------------------------

    fn stored_offsets(&self) -> Offsets {
        Offsets {
            next: self.partitions.iter().map(|p| p.committed_next).collect(),
            ..self.offsets().clone()
        }
    }

    /// Starts a write of the offsets when commits wait for one. One write at a time: commits
    /// that arrive meanwhile share the next one.
    fn start_write(&mut self) {
        if self.writing.is_some() || (self.unwritten.is_empty() && !self.dirty) {
            return;
        }
        // After a failed write, offsets alone wait a moment; a commit waiting writes at once.
        if self.unwritten.is_empty() && Instant::now() < self.write_retry_at {
            return;
        }
        self.dirty = false;
        self.record.offsets = Some(self.stored_offsets());
        let bytes = serde_json::to_vec(&self.record).expect("a record serialises");
        let (store, stream, group) = (self.store.clone(), self.stream.clone(), self.name.clone());
        let task = tokio::spawn(async move { store.save_group(stream, group, bytes).await });
        self.writing = Some(Writing {
            task,
            replies: std::mem::take(&mut self.unwritten),
        });
    }

    fn written(&mut self, (writing, result): (Writing, Result<(), StoreError>)) {
        let result = result.map_err(|error| {
            tracing::warn!(group = %self.name, %error, "cannot write the group's offsets");
            // The offsets in memory are ahead of the stored ones: written again in a moment.
            self.dirty = true;
            self.write_retry_at = Instant::now() + RETRY;
            error.to_string()
        });
        for reply in writing.replies {
            let _ = reply.send(
                result
                    .clone()
                    .map_err(|message| GroupError::Store(StoreError::Storage(message))),
            );
        }
    }

    async fn finish_write(&mut self) {
        if self.writing.is_some() {
            let done = super::write_finished(&mut self.writing, |writing| &mut writing.task).await;
            self.written(done);
        }
        if !self.unwritten.is_empty() || self.dirty {
            self.start_write();
            let done = super::write_finished(&mut self.writing, |writing| &mut writing.task).await;
            self.written(done);
        }
    }

    /// Stores the record now (settings, a switch), after any write in progress.
    async fn write_record(&mut self) -> Result<(), GroupError> {
        self.finish_write().await;
        self.record.offsets = Some(self.stored_offsets());
        let bytes = serde_json::to_vec(&self.record).expect("a record serialises");
        self.store
            .save_group(self.stream.clone(), self.name.clone(), bytes)
            .await?;
        Ok(())
    }

    async fn update(
        &mut self,
        settings: Settings,
        sharder: Arc<Sharder>,
    ) -> Result<(), GroupError> {
        let (sharder_name, partitions) = target(&settings)?;
        let old = self.record.settings.clone();
        let source_changed = settings.resolve_links != old.resolve_links
            || settings.stream_prefix != old.stream_prefix
            || settings.type_prefix != old.type_prefix;
        if source_changed {
            return Err(GroupError::Invalid(
                "a partitioned group's source (resolve_links, stream_prefix, type_prefix) cannot \
                 change: partitions' offsets would skip or repeat events; create another group"
                    .into(),
            ));
        }
        let same_layout = sharder_name == self.layout.sharder_name
            && partitions == self.layout.partitions
            && sharder.sha256() == self.layout.sharder.sha256();
        // Everything is decided and stored first, and applied only once stored.
        let switch_at = match (same_layout, self.offsets().switch_at) {
            (true, _) => None,
            (false, Some(at)) => Some(at),
            (false, None) => Some(self.end_of_source().await?),
        };
        // A switch that starts or ends changes where the reader stops.
        let restart = switch_at != self.offsets().switch_at;
        self.finish_write().await;
        let record = Record {
            settings,
            offsets: Some(Offsets {
                switch_at,
                ..self.stored_offsets()
            }),
            ..self.record.clone()
        };
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        self.store
            .save_group(self.stream.clone(), self.name.clone(), bytes)
            .await?;
        self.record = record;
        self.next_layout = (!same_layout).then_some(Layout {
            sharder_name,
            sharder,
            partitions,
        });
        if restart {
            let from = self.read_again_from();
            for partition in &mut self.partitions {
                partition.behind = false;
            }
            self.start_reader(from).await;
        }
        self.answer_waiters(true);
        Ok(())
    }

    /// The id the next event of the source will have.
    async fn end_of_source(&self) -> Result<u64, GroupError> {
        if self.stream == super::ALL {
            return Ok(self.store.head());
        }
        let name = self.stream.clone();
        Ok(self
            .store
            .blocking(move |store| store.last_revision(&name))
            .await?
            .map_or(0, |last| last + 1))
    }

    /// Switches to the new layout once everything before the switch position was read and
    /// committed.
    async fn switch_when_ready(&mut self) {
        let Some(at) = self.offsets().switch_at else {
            return;
        };
        let ready = self.reached_switch
            && self
                .partitions
                .iter()
                .all(|p| p.queue.is_empty() && p.delivered.is_empty() && !p.behind);
        if !ready {
            return;
        }
        let Some(layout) = self.next_layout.take() else {
            return;
        };
        let previous = std::mem::replace(
            &mut self.partitions,
            (0..layout.partitions).map(|_| Partition::new(at)).collect(),
        );
        let offsets = Offsets {
            sharder: layout.sharder_name.clone(),
            partitions: layout.partitions,
            next: vec![at; layout.partitions as usize],
            switch_at: None,
            ..self.offsets().clone()
        };
        self.record.offsets = Some(offsets);
        if let Err(error) = self.write_record().await {
            tracing::warn!(group = %self.name, %error, "cannot store the group's new partitions");
            // Tried again on the next turn of the loop.
            self.partitions = previous;
            self.next_layout = Some(layout);
            let mut offsets = self.offsets().clone();
            offsets.switch_at = Some(at);
            self.record.offsets = Some(offsets);
            return;
        }
        tracing::info!(group = %self.name, stream = %self.stream, partitions = layout.partitions,
            sharder = %layout.sharder_name, at, "the group switched to its new partitions");
        self.layout = layout;
        self.rebalance();
        self.start_reader(at).await;
    }

    fn info(&self) -> Info {
        let start = self.record.start;
        let committed_next = self.partitions.iter().map(|p| p.committed_next).min();
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
                    in_flight: self
                        .partitions
                        .iter()
                        .filter(|p| p.owner.as_deref() == Some(&c.name))
                        .map(|p| p.delivered.len())
                        .sum(),
                    acked: c.committed,
                    nacked: 0,
                })
                .collect(),
            checkpoint: committed_next
                .filter(|&next| next > start)
                .map(|next| next - 1),
            checkpoint_next: committed_next.unwrap_or(start),
            last_known: self
                .reader_next
                .checked_sub(1)
                .filter(|_| self.reader_next > start),
            in_flight: self.partitions.iter().map(|p| p.delivered.len()).sum(),
            ready: self.partitions.iter().map(|p| p.queue.len()).sum(),
            parked: 0,
            delivered: self.delivered,
            generation: Some(self.generation),
            partitions: Some(
                self.partitions
                    .iter()
                    .enumerate()
                    .map(|(index, p)| PartitionInfo {
                        partition: index as u32,
                        owner: p.owner.clone(),
                        committed: (p.committed_next > start).then(|| p.committed_next - 1),
                        lag: p.lag(),
                    })
                    .collect(),
            ),
            repartitioning: self.offsets().switch_at.map(|at| Repartitioning {
                at,
                from_sharder: self.layout.sharder_name.clone(),
                from_partitions: self.layout.partitions,
            }),
        }
    }
}

/// The sharder and partition count a partitioned strategy names.
pub(super) fn target(settings: &Settings) -> Result<(String, u32), GroupError> {
    match &settings.strategy {
        Strategy::Partitioned {
            sharder,
            partitions,
        } => Ok((sharder.clone(), *partitions)),
        _ => Err(GroupError::Invalid(
            "the group's strategy is not partitioned".into(),
        )),
    }
}

/// Owners for partitions whose owners are `current`, among `consumers` (sorted): each consumer
/// gets `n / c` or one more (the first in name order take the extra ones), and a partition keeps
/// its owner whenever that owner is still there and within its share, so a join or leave moves
/// as few partitions as it can.
fn assign<'a>(current: &[Option<&'a str>], consumers: &[&'a str]) -> Vec<Option<&'a str>> {
    if consumers.is_empty() {
        return vec![None; current.len()];
    }
    let (base, extra) = (
        current.len() / consumers.len(),
        current.len() % consumers.len(),
    );
    let share = |index: usize| base + usize::from(index < extra);
    let mut counts = vec![0usize; consumers.len()];
    let mut owners: Vec<Option<&str>> = current
        .iter()
        .map(|owner| {
            let index = consumers.iter().position(|c| Some(*c) == *owner)?;
            (counts[index] < share(index)).then(|| {
                counts[index] += 1;
                consumers[index]
            })
        })
        .collect();
    let mut next = 0;
    for owner in owners.iter_mut().filter(|owner| owner.is_none()) {
        while counts[next] >= share(next) {
            next += 1;
        }
        counts[next] += 1;
        *owner = Some(consumers[next]);
    }
    owners
}

/// Events the reader reads per round trip to the store.
const READ_BATCH: usize = 1024;

/// A batch read and not yet placed.
struct Unplaced {
    ids: Vec<u64>,
    events: Vec<Arc<RecordedEvent>>,
    caught_up: bool,
    /// The batch ends at the switch position.
    reached: bool,
}

/// Reads the source and places each event in its partition, a batch at a time (the sharder
/// runs once per batch, off the async workers). Reading the next batch overlaps with placing
/// this one. With `until`, it stops before that id.
async fn read_ahead(
    subscription: Subscription,
    layout: Layout,
    until: Option<u64>,
    sender: mpsc::Sender<Read>,
) {
    let (unplaced, mut to_place) = mpsc::channel(2);
    let _reading = AbortOnDrop(tokio::spawn(read_batches(
        subscription.with_batch(READ_BATCH),
        until,
        unplaced,
        sender.clone(),
    )));
    while let Some(batch) = to_place.recv().await {
        let Unplaced {
            ids,
            events,
            caught_up,
            reached,
        } = batch;
        if !events.is_empty() {
            let (sharder, count) = (layout.sharder.clone(), layout.partitions);
            let placed = tokio::task::spawn_blocking(move || {
                let placed = sharder.shard_recorded(&events, count);
                (events, placed)
            })
            .await;
            let (events, partitions) = match placed {
                Ok((events, Ok(partitions))) => (events, partitions),
                Ok((_, Err(error))) => {
                    let message = format!(
                        "the sharder {:?} failed on the events from {}: {error:#}",
                        layout.sharder_name, ids[0]
                    );
                    let _ = sender.send(Read::Failed(message)).await;
                    return;
                }
                Err(error) => {
                    let message = format!("the sharder {:?} failed: {error}", layout.sharder_name);
                    let _ = sender.send(Read::Failed(message)).await;
                    return;
                }
            };
            let batch = ids
                .into_iter()
                .zip(events)
                .zip(partitions)
                .map(|((id, event), partition)| (id, event, partition))
                .collect();
            if sender.send(Read::Events(batch)).await.is_err() {
                return;
            }
        }
        if reached {
            let _ = sender.send(Read::ReachedSwitch).await;
            return;
        }
        if caught_up && sender.send(Read::CaughtUp).await.is_err() {
            return;
        }
    }
}

/// The reading half of [`read_ahead`].
async fn read_batches(
    mut subscription: Subscription,
    until: Option<u64>,
    unplaced: mpsc::Sender<Unplaced>,
    failures: mpsc::Sender<Read>,
) {
    loop {
        let items = match subscription.next_batch().await {
            Ok(items) => items,
            Err(error) => {
                let _ = failures.send(Read::Failed(error.to_string())).await;
                return;
            }
        };
        let mut batch = Unplaced {
            ids: Vec::with_capacity(items.len()),
            events: Vec::with_capacity(items.len()),
            caught_up: false,
            reached: false,
        };
        for item in items {
            match item {
                Item::Event { id, event } => {
                    if until.is_some_and(|until| id >= until) {
                        batch.reached = true;
                        break;
                    }
                    batch.ids.push(id);
                    batch.events.push(Arc::from(event));
                }
                Item::CaughtUp => {
                    batch.reached |= until.is_some();
                    batch.caught_up = true;
                }
            }
        }
        let reached = batch.reached;
        if unplaced.send(batch).await.is_err() || reached {
            return;
        }
    }
}

/// Aborts a task when dropped, so a reader that is stopped stops its reading half too.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(assigned: Vec<Option<&str>>) -> Vec<&str> {
        assigned.into_iter().map(|o| o.unwrap_or("-")).collect()
    }

    #[test]
    fn partitions_are_shared_evenly_and_stay_with_their_owner() {
        let none = vec![None; 8];
        let first = assign(&none, &["a"]);
        assert_eq!(owners(first.clone()), ["a"; 8]);
        // b joins: a keeps its first four, b takes the rest.
        let second = assign(&first, &["a", "b"]);
        assert_eq!(
            owners(second.clone()),
            ["a", "a", "a", "a", "b", "b", "b", "b"]
        );
        // c joins: a and b each give up one partition (8 = 3 + 3 + 2).
        let third = assign(&second, &["a", "b", "c"]);
        assert_eq!(
            owners(third.clone()),
            ["a", "a", "a", "c", "b", "b", "b", "c"]
        );
        // a leaves: only a's partitions move.
        let fourth = assign(&third, &["b", "c"]);
        for (before, after) in third.iter().zip(&fourth) {
            if *before != Some("a") {
                assert_eq!(before, after);
            }
        }
        assert_eq!(fourth.iter().filter(|o| **o == Some("b")).count(), 4);
        assert_eq!(fourth.iter().filter(|o| **o == Some("c")).count(), 4);
        // Nobody left: no owners.
        assert_eq!(assign(&fourth, &[]), vec![None; 8]);
    }

    #[test]
    fn more_consumers_than_partitions_leave_some_idle() {
        let assigned = assign(&[None, None], &["a", "b", "c"]);
        assert_eq!(owners(assigned), ["a", "b"]);
    }
}
