//! A store whose log is replicated: a cluster orders the writer's batches, and every node
//! applies them in that order.
//!
//! - On the node a write reaches, the writer encodes its batch as a single node logs it and
//!   hands it to the [`Proposer`], keeping the operations. When the entry comes back committed
//!   it applies those operations and answers them; a batch the cluster does not take fails them.
//! - Every node applies the committed entries in log order ([`Store::apply_replicated`]).
//!   Expected revisions and idempotency are checked there, against the same state on every node,
//!   so two conditional writes can never both succeed.
//! - The last applied entry and the cluster's membership are written in the transaction of the
//!   entry's effects, so the database always says how far it got.
//! - A snapshot is the whole database at a durable checkpoint ([`super::snapshot`]).

use std::collections::HashMap;
use std::io::{BufReader, Write};

use redb::{ReadTransaction, ReadableDatabase};
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::writer::{self, Job, Queued, Tables, Writer};
use super::{SETTINGS, Store, StoreError, logged, snapshot};

/// Proposals waiting for their entry at once; operations queued meanwhile wait for a slot and
/// go together as the next one. One gave the most appends/s on 2 cores (3 nodes, 64 clients:
/// 4 in flight 7,900/s, 2 10,600/s, 1 12,500/s): fewer, larger entries cost every node less.
const MAX_IN_FLIGHT: usize = 1;
/// The last entry applied: its term and index.
const APPLIED: &str = "replicated_applied";
/// The last membership applied: its entry's term and index, then its bytes.
const MEMBERSHIP: &str = "replicated_membership";

/// A committed entry of a replicated log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedEntry {
    pub term: u64,
    pub index: u64,
    pub payload: ReplicatedPayload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicatedPayload {
    /// An entry that changes nothing (a new leader's first).
    Blank,
    /// A writer's batch, as [`Proposer::propose`] was given it.
    Batch {
        proposer: u64,
        sequence: u64,
        batch: Vec<u8>,
    },
    /// The cluster's members, in the cluster's own encoding: the store only keeps it.
    Membership(Vec<u8>),
}

/// Hands the writer's batches to the cluster.
pub trait Proposer: Send + 'static {
    /// Proposes a batch; a batch the cluster does not take is reported back through
    /// [`Store::proposal_failed`] with the same `sequence`.
    fn propose(&self, sequence: u64, batch: Vec<u8>);
}

/// How far a replicated store got, as its database holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicatedState {
    /// The term and index of the last entry applied.
    pub applied: Option<(u64, u64)>,
    /// The last membership applied: its entry's term and index, and its bytes.
    pub membership: Option<((u64, u64), Vec<u8>)>,
}

/// A read of the database at a durable checkpoint, to send as a snapshot.
pub struct StoreSnapshot {
    txn: ReadTransaction,
    pub state: ReplicatedState,
}

impl StoreSnapshot {
    /// Writes the whole database as of the checkpoint. Blocking.
    pub fn write_to(&self, out: &mut dyn Write) -> Result<(), StoreError> {
        snapshot::write(&self.txn, out)
    }
}

/// What the writer of a replicated store keeps.
pub(super) struct Replica {
    node_id: u64,
    proposer: Box<dyn Proposer>,
    /// Numbers this node's proposals; starts at random, so a proposal from before a restart is
    /// never taken for one made after it.
    next_sequence: u64,
    /// Proposed batches waiting for their entry: the time they were stamped with, and the
    /// operations to answer.
    awaiting: HashMap<u64, (i64, Vec<Box<dyn Job>>)>,
    /// Operations waiting for a proposal to end: they go together as the next batch.
    held: Vec<Box<dyn Job>>,
    state: ReplicatedState,
    /// What the database holds of `state`.
    written: ReplicatedState,
}

impl Replica {
    pub(super) fn new(
        db: &redb::Database,
        node_id: u64,
        proposer: Box<dyn Proposer>,
    ) -> Result<Replica, StoreError> {
        let state = read_state(&db.begin_read()?)?;
        Ok(Replica {
            node_id,
            proposer,
            next_sequence: uuid::Uuid::new_v4().as_u64_pair().0 >> 1,
            awaiting: HashMap::new(),
            held: Vec::new(),
            written: state.clone(),
            state,
        })
    }

    /// Writes what changed of the applied state into the transaction of the entry's effects.
    pub(super) fn write_state(&self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        if self.state.applied != self.written.applied
            && let Some((term, index)) = self.state.applied
        {
            tables
                .settings
                .insert(APPLIED, log_id_bytes(term, index).as_slice())?;
        }
        if self.state.membership != self.written.membership
            && let Some(((term, index), membership)) = &self.state.membership
        {
            let mut bytes = log_id_bytes(*term, *index).to_vec();
            bytes.extend_from_slice(membership);
            tables.settings.insert(MEMBERSHIP, bytes.as_slice())?;
        }
        Ok(())
    }

    /// The transaction that wrote the state committed.
    pub(super) fn state_written(&mut self) {
        self.written = self.state.clone();
    }
}

/// Answers a request only a replicated store takes.
pub(super) fn refuse(queued: Queued) {
    let not_replicated = || StoreError::Storage("this store is not replicated".into());
    match queued {
        Queued::Apply(_, reply) => {
            let _ = reply.send(Err(not_replicated()));
        }
        Queued::Snapshot(reply) => {
            let _ = reply.send(Err(not_replicated()));
        }
        Queued::Install(_, reply) => {
            let _ = reply.send(Err(not_replicated()));
        }
        Queued::ProposalFailed(..) | Queued::Operation(_) | Queued::Shutdown(_) | Queued::Tick => {}
    }
}

impl Writer {
    /// The writer's loop for a replicated store: proposes the operations queued, applies the
    /// entries committed, and checkpoints.
    pub(super) fn run_replicated(mut self, mut queue: mpsc::Receiver<Queued>) {
        loop {
            let behind = self.log.indexer.behind(self.log.next_position);
            let Some(next) = writer::next_queued(&mut queue, behind) else {
                return;
            };
            let Some(mut queued) = next else {
                self.commit_together(Vec::new());
                self.checkpoint(false);
                continue;
            };
            loop {
                queued = match queued {
                    Queued::Operation(job) => match self.hold(job, &mut queue) {
                        Some(after) => after,
                        None => break,
                    },
                    Queued::Apply(entries, reply) => {
                        let _ = reply.send(self.apply_replicated(entries));
                        break;
                    }
                    Queued::ProposalFailed(sequence, error) => {
                        let replica = self.replica.as_mut().expect("a replicated writer");
                        if let Some((_, jobs)) = replica.awaiting.remove(&sequence) {
                            for job in jobs {
                                job.fail(error.clone());
                            }
                        }
                        break;
                    }
                    Queued::Snapshot(reply) => {
                        let _ = reply.send(self.snapshot());
                        break;
                    }
                    Queued::Install(file, reply) => {
                        let _ = reply.send(self.install(file));
                        break;
                    }
                    Queued::Tick => break,
                    Queued::Shutdown(reply) => {
                        let replica = self.replica.as_mut().expect("a replicated writer");
                        let held = std::mem::take(&mut replica.held);
                        let awaiting = replica.awaiting.drain().flat_map(|(_, (_, jobs))| jobs);
                        for job in awaiting.chain(held) {
                            job.fail(StoreError::ShuttingDown);
                        }
                        self.checkpoint(true);
                        let _ = reply.send(());
                        return;
                    }
                };
            }
            self.propose_held();
            self.checkpoint(false);
        }
    }

    /// Holds `first` and the operations queued behind it for the next proposal; answers what
    /// it took from the queue that is not an operation.
    fn hold(&mut self, first: Box<dyn Job>, queue: &mut mpsc::Receiver<Queued>) -> Option<Queued> {
        let held = &mut self.replica.as_mut().expect("a replicated writer").held;
        held.push(first);
        loop {
            match queue.try_recv() {
                Ok(Queued::Operation(job)) => held.push(job),
                Ok(other) => return Some(other),
                Err(_) => return None,
            }
        }
    }

    /// Proposes the held operations, in batches of at most [`writer::MAX_BATCH_BYTES`], while
    /// fewer than [`MAX_IN_FLIGHT`] proposals wait for their entry. Holding the rest meanwhile
    /// is the group commit of a replicated store: under load, batches grow instead of the
    /// number of entries.
    fn propose_held(&mut self) {
        loop {
            let replica = self.replica.as_mut().expect("a replicated writer");
            if replica.held.is_empty() || replica.awaiting.len() >= MAX_IN_FLIGHT {
                return;
            }
            let mut bytes = 0;
            let count = replica
                .held
                .iter()
                .take_while(|job| {
                    let fits = bytes == 0 || bytes < writer::MAX_BATCH_BYTES;
                    bytes += job.payload_bytes();
                    fits
                })
                .count();
            let batch: Vec<_> = replica.held.drain(..count).collect();
            self.propose(batch);
        }
    }

    /// Proposes one batch.
    fn propose(&mut self, batch: Vec<Box<dyn Job>>) {
        if let Some(reason) = &self.stopped {
            writer::fail_all(reason, batch);
            return;
        }
        let now_ms = writer::now_ms();
        let mut encoded = Vec::new();
        if let Err(error) = logged::encode(now_ms, &batch, &mut encoded) {
            writer::fail_all(&error.to_string(), batch);
            return;
        }
        let replica = self.replica.as_mut().expect("a replicated writer");
        let sequence = replica.next_sequence;
        replica.next_sequence = replica.next_sequence.wrapping_add(1);
        replica.awaiting.insert(sequence, (now_ms, batch));
        replica.proposer.propose(sequence, encoded);
    }

    /// Applies committed entries in order; an error means the store can apply no more.
    fn apply_replicated(&mut self, entries: Vec<ReplicatedEntry>) -> Result<(), StoreError> {
        for entry in entries {
            if let Some(reason) = &self.stopped {
                return Err(StoreError::Storage(reason.clone()));
            }
            let replica = self.replica.as_mut().expect("a replicated writer");
            match entry.payload {
                ReplicatedPayload::Batch {
                    proposer,
                    sequence,
                    batch,
                } => {
                    let own = if proposer == replica.node_id {
                        replica.awaiting.remove(&sequence)
                    } else {
                        None
                    };
                    let (now_ms, jobs) = match own {
                        Some(own) => own,
                        None => match logged::decode(&batch) {
                            Ok(decoded) => decoded,
                            Err(error) => {
                                // Nothing of it may be recorded as applied: it is not.
                                let cause =
                                    format!("log entry {} cannot be read ({error})", entry.index);
                                self.stop(cause, []);
                                break;
                            }
                        },
                    };
                    replica.state.applied = Some((entry.term, entry.index));
                    self.apply(entry.index, now_ms, jobs);
                }
                ReplicatedPayload::Membership(membership) => {
                    replica.state.applied = Some((entry.term, entry.index));
                    replica.state.membership = Some(((entry.term, entry.index), membership));
                }
                ReplicatedPayload::Blank => {
                    replica.state.applied = Some((entry.term, entry.index));
                }
            }
            let replica = self.replica.as_ref().expect("a replicated writer");
            if replica.written != replica.state && self.stopped.is_none() {
                // Nothing of the entry committed (it changes nothing, or every operation in it
                // was refused): a commit of its own records it as applied.
                self.commit_together(Vec::new());
                let replica = self.replica.as_ref().expect("a replicated writer");
                if replica.written != replica.state {
                    let cause = format!("recording log entry {} as applied failed", entry.index);
                    self.stop(cause, []);
                }
            }
        }
        match &self.stopped {
            Some(reason) => Err(StoreError::Storage(reason.clone())),
            None => Ok(()),
        }
    }

    /// Makes everything applied durable and opens a read of it.
    fn snapshot(&mut self) -> Result<StoreSnapshot, StoreError> {
        if let Some(reason) = &self.stopped {
            return Err(StoreError::Storage(reason.clone()));
        }
        self.checkpoint(true);
        let txn = self.db.begin_read()?;
        let state = read_state(&txn)?;
        Ok(StoreSnapshot { txn, state })
    }

    /// Replaces the database with a snapshot's, durably, and continues from it.
    fn install(&mut self, file: std::fs::File) -> Result<(), StoreError> {
        if let Some(reason) = &self.stopped {
            return Err(StoreError::Storage(reason.clone()));
        }
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(self.options.quick_repair);
        snapshot::read(&txn, &mut BufReader::new(file))?;
        txn.commit()?;
        let recovered = writer::initialize(&self.db, &self.options)?;
        let state = read_state(&self.db.begin_read()?)?;
        self.continue_from(recovered);
        let replica = self.replica.as_mut().expect("a replicated writer");
        replica.written = state.clone();
        replica.state = state;
        Ok(())
    }
}

impl Store {
    /// Applies a replicated log's committed entries, in order. An error means this store can
    /// apply no more (its storage failed); it is reopened to go on.
    pub async fn apply_replicated(&self, entries: Vec<ReplicatedEntry>) -> Result<(), StoreError> {
        let (reply, applied) = oneshot::channel();
        self.send(Queued::Apply(entries, reply)).await?;
        applied.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Fails the operations of a proposed batch the cluster did not take.
    pub async fn proposal_failed(&self, sequence: u64, error: StoreError) {
        let _ = self.send(Queued::ProposalFailed(sequence, error)).await;
    }

    /// Makes everything applied durable and answers a read of it, to send as a snapshot.
    pub async fn snapshot(&self) -> Result<StoreSnapshot, StoreError> {
        let (reply, snapshot) = oneshot::channel();
        self.send(Queued::Snapshot(reply)).await?;
        snapshot.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Replaces the whole state with a snapshot's (read from `file`), durably.
    pub async fn install_snapshot(&self, file: std::fs::File) -> Result<(), StoreError> {
        let (reply, installed) = oneshot::channel();
        self.send(Queued::Install(file, reply)).await?;
        installed.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// How far the store got in its replicated log. Blocking.
    pub fn replicated_state(&self) -> Result<ReplicatedState, StoreError> {
        read_state(&self.inner.db.begin_read()?)
    }
}

pub(super) fn read_state(txn: &ReadTransaction) -> Result<ReplicatedState, StoreError> {
    let settings = match txn.open_table(SETTINGS) {
        Ok(settings) => settings,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ReplicatedState::default()),
        Err(error) => return Err(error.into()),
    };
    let applied = match settings.get(APPLIED)? {
        Some(bytes) => Some(parse_log_id(bytes.value())?),
        None => None,
    };
    let membership = match settings.get(MEMBERSHIP)? {
        Some(bytes) => {
            let bytes = bytes.value();
            let log_id = parse_log_id(bytes)?;
            Some((log_id, bytes[16..].to_vec()))
        }
        None => None,
    };
    Ok(ReplicatedState {
        applied,
        membership,
    })
}

fn log_id_bytes(term: u64, index: u64) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&term.to_le_bytes());
    bytes[8..].copy_from_slice(&index.to_le_bytes());
    bytes
}

fn parse_log_id(bytes: &[u8]) -> Result<(u64, u64), StoreError> {
    if bytes.len() < 16 {
        return Err(StoreError::Storage(
            "the replicated log's applied state is damaged".into(),
        ));
    }
    let number = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    Ok((number(0), number(8)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::{Direction, ExpectedRevision, NewEvent, StoreOptions};

    /// Keeps what the writer proposes, for the test to commit.
    struct Kept(std::sync::Mutex<Sender<(u64, Vec<u8>)>>);

    impl Proposer for Kept {
        fn propose(&self, sequence: u64, batch: Vec<u8>) {
            let _ = self.0.lock().unwrap().send((sequence, batch));
        }
    }

    fn open(dir: &std::path::Path, node_id: u64) -> (Store, Receiver<(u64, Vec<u8>)>) {
        let (proposals, kept) = channel();
        let store = Store::open_replicated(
            dir,
            StoreOptions::default(),
            Arc::new(Metrics::new()),
            node_id,
            Box::new(Kept(std::sync::Mutex::new(proposals))),
        )
        .unwrap();
        (store, kept)
    }

    fn event(kind: &str) -> NewEvent {
        NewEvent {
            id: uuid::Uuid::new_v4(),
            event_type: kind.into(),
            data: b"{}".to_vec(),
            binary: false,
            metadata: Vec::new(),
        }
    }

    fn next_proposal(proposals: &Receiver<(u64, Vec<u8>)>) -> (u64, Vec<u8>) {
        proposals.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    fn batch_entry(
        index: u64,
        proposer: u64,
        (sequence, batch): (u64, Vec<u8>),
    ) -> ReplicatedEntry {
        ReplicatedEntry {
            term: 1,
            index,
            payload: ReplicatedPayload::Batch {
                proposer,
                sequence,
                batch,
            },
        }
    }

    fn types(store: &Store, stream: &str) -> Vec<String> {
        let slice = store
            .read_stream(stream, None, Direction::Forward, 100, false)
            .unwrap();
        slice
            .events
            .into_iter()
            .map(|event| event.event_type)
            .collect()
    }

    /// Two conditional writes proposed against the same state, before either was applied: the
    /// first in the log wins on every node, the second fails on every node.
    #[tokio::test(flavor = "multi_thread")]
    async fn conditional_writes_are_decided_at_apply_the_same_on_every_node() {
        let dir = tempfile::tempdir().unwrap();
        let (leader, proposals) = open(&dir.path().join("1"), 1);
        let (follower, follower_proposals) = open(&dir.path().join("2"), 2);
        let append = |store: &Store, kind: &'static str| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(
                        "order-1".into(),
                        ExpectedRevision::NoStream,
                        vec![event(kind)],
                    )
                    .await
            })
        };
        // Both proposed against the same state (the second by the next leader, say).
        let first = append(&leader, "Placed");
        let first_proposal = tokio::task::block_in_place(|| next_proposal(&proposals));
        let second = append(&follower, "PlacedAgain");
        let second_proposal = tokio::task::block_in_place(|| next_proposal(&follower_proposals));
        let entries = vec![
            ReplicatedEntry {
                term: 1,
                index: 0,
                payload: ReplicatedPayload::Membership(b"{\"voters\":[1,2]}".to_vec()),
            },
            ReplicatedEntry {
                term: 1,
                index: 1,
                payload: ReplicatedPayload::Blank,
            },
            batch_entry(2, 1, first_proposal),
            batch_entry(3, 2, second_proposal),
        ];
        follower.apply_replicated(entries.clone()).await.unwrap();
        leader.apply_replicated(entries).await.unwrap();

        assert_eq!(first.await.unwrap().unwrap().first_position, 0);
        assert!(matches!(
            second.await.unwrap(),
            Err(StoreError::WrongExpectedRevision {
                actual: Some(0),
                ..
            })
        ));
        for store in [&leader, &follower] {
            assert_eq!(types(store, "order-1"), vec!["Placed"]);
            assert_eq!(store.head(), 1);
            let state = store.replicated_state().unwrap();
            assert_eq!(state.applied, Some((1, 3)));
            assert_eq!(
                state.membership,
                Some(((1, 0), b"{\"voters\":[1,2]}".to_vec()))
            );
        }
        // The applied state survives a restart with the data.
        follower.shutdown().await;
        drop(follower);
        let (follower, _) = open(&dir.path().join("2"), 2);
        assert_eq!(follower.replicated_state().unwrap().applied, Some((1, 3)));
        assert_eq!(types(&follower, "order-1"), vec!["Placed"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_the_cluster_does_not_take_fails_its_callers() {
        let dir = tempfile::tempdir().unwrap();
        let (store, proposals) = open(dir.path(), 1);
        let writer = store.clone();
        let append = tokio::spawn(async move {
            writer
                .append("s".into(), ExpectedRevision::Any, vec![event("E")])
                .await
        });
        let (sequence, _) = tokio::task::block_in_place(|| next_proposal(&proposals));
        let leader_url = Some("http://127.0.0.1:2".to_owned());
        store
            .proposal_failed(
                sequence,
                StoreError::NotLeader {
                    leader_url: leader_url.clone(),
                },
            )
            .await;
        assert!(matches!(
            append.await.unwrap(),
            Err(StoreError::NotLeader { leader_url: url }) if url == leader_url
        ));
        assert_eq!(store.head(), 0);
    }

    /// A node that installs a snapshot holds exactly the snapshot's rows and goes on from them.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_snapshot_installed_replaces_everything_and_the_log_continues_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (leader, proposals) = open(&dir.path().join("1"), 1);
        let (follower, follower_proposals) = open(&dir.path().join("2"), 2);
        // The follower holds something the snapshot does not: it must go.
        let writer = follower.clone();
        let stale = tokio::spawn(async move {
            writer
                .append("stale".into(), ExpectedRevision::Any, vec![event("Old")])
                .await
        });
        let stale_proposal = tokio::task::block_in_place(|| next_proposal(&follower_proposals));
        follower
            .apply_replicated(vec![batch_entry(1, 2, stale_proposal)])
            .await
            .unwrap();
        stale.await.unwrap().unwrap();
        let mut index = 1;
        let mut commit = |proposal| {
            index += 1;
            batch_entry(index, 1, proposal)
        };
        for n in 0..3 {
            let writer = leader.clone();
            let append = tokio::spawn(async move {
                writer
                    .append(
                        format!("order-{n}"),
                        ExpectedRevision::NoStream,
                        vec![event("Placed")],
                    )
                    .await
            });
            let entry = commit(tokio::task::block_in_place(|| next_proposal(&proposals)));
            leader.apply_replicated(vec![entry]).await.unwrap();
            append.await.unwrap().unwrap();
        }
        let snapshot = leader.snapshot().await.unwrap();
        assert_eq!(snapshot.state.applied, Some((1, 4)));
        let path = dir.path().join("snapshot");
        snapshot
            .write_to(&mut std::fs::File::create(&path).unwrap())
            .unwrap();
        follower
            .install_snapshot(std::fs::File::open(&path).unwrap())
            .await
            .unwrap();
        assert_eq!(
            snapshot::rows(&follower.inner.db),
            std::fs::read(&path).unwrap()
        );
        assert_eq!(follower.head(), 3);
        assert_eq!(follower.replicated_state().unwrap().applied, Some((1, 4)));
        assert!(matches!(
            follower.read_stream("stale", None, Direction::Forward, 10, false),
            Err(StoreError::StreamNotFound(_))
        ));

        let writer = leader.clone();
        let next = tokio::spawn(async move {
            writer
                .append(
                    "order-0".into(),
                    ExpectedRevision::Exact(0),
                    vec![event("Paid")],
                )
                .await
        });
        let entry = commit(tokio::task::block_in_place(|| next_proposal(&proposals)));
        follower
            .apply_replicated(vec![entry.clone()])
            .await
            .unwrap();
        leader.apply_replicated(vec![entry]).await.unwrap();
        assert_eq!(next.await.unwrap().unwrap().first_position, 3);
        assert_eq!(types(&follower, "order-0"), vec!["Placed", "Paid"]);
    }
}
