//! One batch of a partitioned projection run on several instances at once.
//!
//! The batch is cut into windows of a few hundred events. In a window each worker takes the
//! events of the partitions (streams) hashed to it, in log order, and runs them on its own
//! instance over the merged writes of the earlier windows. A window is kept when no worker read
//! or wrote a state or row that another worker wrote, and at most one worker emitted or linked:
//! then running its events in log order on one instance reads and writes exactly the same, so
//! the result is byte for byte the sequential one. Otherwise the window runs again in log order,
//! and so do the next windows for a while (longer after each conflict in a row), so a projection
//! whose partitions share rows loses little to the attempt.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

use super::{CALL_EVENTS, Failure, Runner};
use crate::projections::component::{
    Access, Event, Instance, InstanceSetup, MAX_BATCH_WRITE_BYTES, Pending, Writes,
};
use crate::sandbox::{GuestLog, HeldLine};
use crate::store::NewEvent;
use crate::store::{Checkpoint, ProjectionView};

/// Events per window: small enough that partitions sharing a row rarely meet in one window,
/// large enough that handing the workers their events costs little next to running them.
pub(super) const WINDOW_EVENTS: usize = 256;
/// Most windows run in log order after conflicts in a row, before trying in parallel again.
const MAX_ORDERED_WINDOWS: usize = 64;

/// The instances a runner runs windows on: the first on the runner's thread, each other one on
/// a thread of its own that lives as long as the workers (a thread started per batch would
/// start its allocations on fresh pages every time).
pub(super) struct Workers {
    first: Instance,
    lanes: Vec<Lane>,
    /// The previous batch's buffer, refilled in log order by the next one: a buffer this large
    /// allocated per batch would be fresh, zeroed pages every time.
    spare: Vec<Event>,
    /// Where the output of kept windows goes once their batch commits.
    log: GuestLog,
}

/// A worker on a thread of its own.
struct Lane {
    orders: Arc<Mailbox<Order>>,
    ran: Arc<Mailbox<Ran>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the runner asks of a worker on its own thread.
enum Order {
    /// Start a batch reading through the view.
    Begin(Box<ProjectionView>, u64),
    /// Run a share of a window; answered with [`Ran`].
    Run(Job),
    /// The batch is over: let go of its view and writes.
    End,
    /// The workers are dropped: end the thread.
    Stop,
}

/// Events run per outcome, since the runner started.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ParallelCounts {
    /// Kept as the workers ran them.
    pub parallel_events: u64,
    /// Run by the workers in a window that conflicted, then again in log order.
    pub rerun_events: u64,
}

/// Why a batch goes back to the sequential path.
pub(super) enum NotParallel {
    /// A guest call failed, or the batch wrote past its limit: the sequential path finds the
    /// event and the fault.
    Failed,
    ShuttingDown,
}

impl Workers {
    pub fn new(runner: &Runner, setup: &InstanceSetup) -> anyhow::Result<Workers> {
        // Output is logged only for windows that are kept, once their batch commits: a window
        // that conflicts runs again in log order, and a failed batch runs again on its own.
        let instance = || {
            Instance::new(&runner.runtime, runner.compiled.pre(), setup.clone()).map(
                |mut instance| {
                    instance.hold_output();
                    instance
                },
            )
        };
        let first = instance()?;
        let mut lanes = Vec::new();
        for index in 1..runner.runtime.partition_workers() {
            let mut instance = instance()?;
            let orders = Arc::new(Mailbox::default());
            let ran = Arc::new(Mailbox::default());
            let (order_queue, done) = (orders.clone(), ran.clone());
            let thread = std::thread::Builder::new()
                .name(format!("refract-partition-{index}"))
                .spawn(move || {
                    loop {
                        match order_queue.take() {
                            Order::Begin(view, emitted_before) => {
                                instance.begin(*view, emitted_before);
                            }
                            Order::Run(job) => {
                                done.put(run_job(&mut instance, job));
                            }
                            Order::End => {
                                instance.take();
                            }
                            Order::Stop => return,
                        }
                    }
                })?;
            lanes.push(Lane {
                orders,
                ran,
                thread: Some(thread),
            });
        }
        Ok(Workers {
            first,
            lanes,
            spare: Vec::new(),
            log: setup.log.clone(),
        })
    }

    fn count(&self) -> usize {
        1 + self.lanes.len()
    }

    /// Asks every worker on its own thread to do `order`.
    fn tell(&self, order: impl Fn() -> Order) {
        for lane in &self.lanes {
            lane.orders.put(order());
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for mut lane in self.lanes.drain(..) {
            lane.orders.put(Order::Stop);
            if let Some(thread) = lane.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A worker's share of a window.
struct Job {
    events: Vec<Event>,
    earlier: Arc<Pending>,
    emitted_before: u64,
}

/// The share handed back, with its writes and the keys it touched (`None`: a call failed).
struct Ran {
    events: Vec<Event>,
    outcome: Option<(Writes, Access)>,
}

/// Runs a job; the events always come back, even from a panic, so the batch stays whole.
fn run_job(instance: &mut Instance, job: Job) -> Ran {
    let Job {
        events,
        earlier,
        emitted_before,
    } = job;
    let outcome = if events.is_empty() {
        Some((Writes::default(), Access::default()))
    } else {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_window(instance, &earlier, emitted_before, &events)
        }))
        .ok()
        .flatten()
    };
    Ran { events, outcome }
}

/// Messages from one thread to another, in order. A waiting thread sleeps at once (a channel
/// that spins and yields first kept a worker on the runner's CPU, taking turns with it).
struct Mailbox<T> {
    queue: Mutex<VecDeque<T>>,
    filled: Condvar,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            filled: Condvar::new(),
        }
    }
}

impl<T> Mailbox<T> {
    fn put(&self, message: T) {
        self.queue.lock().expect("mailbox").push_back(message);
        self.filled.notify_one();
    }

    fn take(&self) -> T {
        let mut queue = self.queue.lock().expect("mailbox");
        loop {
            if let Some(message) = queue.pop_front() {
                return message;
            }
            queue = self.filled.wait(queue).expect("mailbox");
        }
    }
}

/// The worker whose instance runs `stream`'s events.
fn worker_of(stream: &str, workers: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    stream.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

/// Whether the windows the workers ran could differ from running them in log order.
fn conflicts(accesses: &[Access], writes: &[Writes]) -> bool {
    let emitters = writes
        .iter()
        .filter(|writes| !writes.emits.is_empty() || !writes.links.is_empty())
        .count();
    if emitters > 1 {
        return true;
    }
    let mut writers: HashMap<u64, usize> = HashMap::new();
    for (worker, access) in accesses.iter().enumerate() {
        for address in &access.writes {
            if writers.insert(*address, worker).is_some() {
                return true;
            }
        }
    }
    accesses.iter().enumerate().any(|(worker, access)| {
        access
            .reads
            .iter()
            .any(|address| writers.get(address).is_some_and(|writer| *writer != worker))
    })
}

/// Runs `events` on `instance` over `earlier`; its writes and the keys it touched.
fn run_window(
    instance: &mut Instance,
    earlier: &Arc<Pending>,
    emitted_before: u64,
    events: &[Event],
) -> Option<(Writes, Access)> {
    instance.begin_window(earlier.clone(), emitted_before);
    let ran = events
        .chunks(CALL_EVENTS)
        .try_for_each(|chunk| instance.handle(chunk));
    let taken = instance.take_window();
    ran.ok().map(|()| taken)
}

/// What the windows of a batch wrote, merged.
struct Merged {
    earlier: Arc<Pending>,
    emits: Vec<(String, NewEvent)>,
    links: Vec<(String, u64)>,
    lines: Vec<HeldLine>,
    counts: ParallelCounts,
}

impl Runner {
    /// Runs a batch window by window on the workers and commits it. `events` are in log order
    /// again when it returns.
    pub(super) fn process_in_parallel(
        &self,
        workers: &mut Workers,
        checkpoint: Checkpoint,
        events: &mut Vec<Event>,
        scanned_to: u64,
    ) -> Result<Checkpoint, NotParallel> {
        let view = || {
            self.store
                .projection_view(self.data())
                .map_err(|_| NotParallel::Failed)
        };
        workers.first.begin(view()?, checkpoint.events_emitted);
        for lane in &workers.lanes {
            let order = Order::Begin(Box::new(view()?), checkpoint.events_emitted);
            lane.orders.put(order);
        }
        let mut batch = std::mem::take(events);
        let processed = batch.len();
        let mut in_order = std::mem::take(&mut workers.spare);
        let merged = run_windows(workers, checkpoint, &mut batch, &mut in_order);
        *events = in_order;
        workers.spare = batch;
        workers.first.take();
        workers.tell(|| Order::End);
        let merged = merged.ok_or(NotParallel::Failed)?;
        let (states, rows) = Arc::into_inner(merged.earlier)
            .expect("the workers let go of the batch")
            .into_writes();
        let writes = Writes {
            states,
            rows,
            emits: merged.emits,
            links: merged.links,
            bytes: 0,
            lines: Vec::new(),
        };
        match self.commit_writes(checkpoint, processed, scanned_to, writes, Vec::new()) {
            Ok(next) => {
                workers.log.write(merged.lines);
                let mut state = self.live.state.lock().expect("projection state");
                state.parallel.parallel_events += merged.counts.parallel_events;
                state.parallel.rerun_events += merged.counts.rerun_events;
                Ok(next)
            }
            Err(Failure::ShuttingDown) => Err(NotParallel::ShuttingDown),
            Err(Failure::Fault(_)) => Err(NotParallel::Failed),
        }
    }
}

/// Runs `batch` window by window, moving its events to `in_order` as it goes (and all of them,
/// in log order, whatever happens); `None` when a call failed or the writes grew too large.
fn run_windows(
    workers: &mut Workers,
    checkpoint: Checkpoint,
    batch: &mut Vec<Event>,
    in_order: &mut Vec<Event>,
) -> Option<Merged> {
    let count = workers.count();
    let mut rest = batch.drain(..);
    let mut merged = Merged {
        earlier: Arc::new(Pending::default()),
        emits: Vec::new(),
        links: Vec::new(),
        lines: Vec::new(),
        counts: ParallelCounts::default(),
    };
    let mut shares: Vec<Vec<Event>> = (0..count).map(|_| Vec::new()).collect();
    let mut window = Vec::with_capacity(WINDOW_EVENTS);
    let mut ordered_windows_left = 0;
    let mut ordered_after_conflict = 1;
    let outcome = loop {
        window.extend(rest.by_ref().take(WINDOW_EVENTS));
        if window.is_empty() {
            break Some(merged);
        }
        let emitted_before = checkpoint.events_emitted + merged.emits.len() as u64;
        let mut kept = None;
        if ordered_windows_left == 0 {
            for event in window.drain(..) {
                shares[worker_of(&event.stream, count)].push(event);
            }
            let job = |share: &mut Vec<Event>| Job {
                events: std::mem::take(share),
                earlier: merged.earlier.clone(),
                emitted_before,
            };
            let (own, others) = shares.split_first_mut().expect("at least one worker");
            for (lane, share) in workers.lanes.iter().zip(others) {
                let order = Order::Run(job(share));
                lane.orders.put(order);
            }
            let mut ran = vec![run_job(&mut workers.first, job(own))];
            for lane in &workers.lanes {
                ran.push(lane.ran.take());
            }
            let mut outcomes = Vec::with_capacity(count);
            for (share, mut worker) in shares.iter_mut().zip(ran) {
                window.append(&mut worker.events);
                *share = worker.events;
                outcomes.push(worker.outcome);
            }
            window.sort_unstable_by_key(|event| event.position);
            let Some(outcomes) = outcomes.into_iter().collect::<Option<Vec<_>>>() else {
                break None;
            };
            let (writes, accesses): (Vec<Writes>, Vec<Access>) = outcomes.into_iter().unzip();
            if conflicts(&accesses, &writes) {
                merged.counts.rerun_events += window.len() as u64;
                ordered_windows_left = ordered_after_conflict;
                ordered_after_conflict = (ordered_after_conflict * 2).min(MAX_ORDERED_WINDOWS);
            } else {
                merged.counts.parallel_events += window.len() as u64;
                ordered_after_conflict = 1;
                kept = Some(writes);
            }
        } else {
            ordered_windows_left -= 1;
        }
        let kept = match kept {
            Some(writes) => writes,
            None => {
                match run_window(&mut workers.first, &merged.earlier, emitted_before, &window) {
                    Some((writes, _)) => vec![writes],
                    None => break None,
                }
            }
        };
        in_order.append(&mut window);
        let pending = Arc::get_mut(&mut merged.earlier).expect("the workers let go of the window");
        for mut writes in kept {
            pending.merge(&mut writes);
            merged.emits.append(&mut writes.emits);
            merged.links.append(&mut writes.links);
            merged.lines.append(&mut writes.lines);
        }
        if pending.bytes > MAX_BATCH_WRITE_BYTES {
            break None;
        }
    };
    in_order.append(&mut window);
    in_order.extend(rest);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(reads: &[u64], writes: &[u64]) -> Access {
        Access {
            reads: reads.iter().copied().collect(),
            writes: writes.iter().copied().collect(),
        }
    }

    fn quiet(workers: usize) -> Vec<Writes> {
        (0..workers).map(|_| Writes::default()).collect()
    }

    #[test]
    fn windows_conflict_when_one_worker_touches_what_another_wrote() {
        let apart = [access(&[1, 2], &[1]), access(&[3], &[3, 4])];
        assert!(!conflicts(&apart, &quiet(2)));
        let both_read = [access(&[7, 1], &[1]), access(&[7], &[2])];
        assert!(!conflicts(&both_read, &quiet(2)), "shared reads are fine");
        let read_written = [access(&[1], &[]), access(&[], &[1])];
        assert!(conflicts(&read_written, &quiet(2)));
        let both_write = [access(&[], &[5]), access(&[], &[5])];
        assert!(conflicts(&both_write, &quiet(2)));
    }

    #[test]
    fn windows_conflict_when_two_workers_emit() {
        let accesses = [access(&[], &[]), access(&[], &[]), access(&[], &[])];
        let mut writes = quiet(3);
        writes[1].links.push(("a".into(), 1));
        assert!(
            !conflicts(&accesses, &writes),
            "one emitter keeps its order"
        );
        writes[2].links.push(("b".into(), 2));
        assert!(conflicts(&accesses, &writes));
    }

    #[test]
    fn a_stream_always_goes_to_the_same_worker() {
        for workers in 1..5 {
            let first = worker_of("order-17", workers);
            assert!(first < workers);
            assert_eq!(worker_of("order-17", workers), first);
        }
        let spread: std::collections::HashSet<usize> = (0..100)
            .map(|n| worker_of(&format!("order-{n}"), 4))
            .collect();
        assert_eq!(spread.len(), 4, "streams spread over the workers");
    }
}
