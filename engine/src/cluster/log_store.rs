//! openraft's log storage on the write-ahead log.
//!
//! An entry keeps its log id in the log's header (term and index) and its payload after a tag
//! byte: a blank entry (a new leader's first), a proposal (the proposer, its sequence number and
//! the writer's batch, as a single node logs it) or a membership change (JSON, as rare as it is
//! small). Appends return once written, so replication reads them at once; their sync runs on a
//! thread of its own, in order, and tells openraft when it is done.
//!
//! Beside the log, durably: the vote, and the last purged log id (purging drops whole segments,
//! so a log may still hold entries up to it; they are never read again).

use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::CommittedLeaderIdOf;
use openraft::{EntryPayload, OptionalSend, RaftLogReader};

use super::{Entry, LogId, Membership, Proposal, TypeConfig, Vote};
use crate::disk::LogStorage;
use crate::wal::{self, PendingSync, Wal};

const VOTE: &str = "vote";
const PURGED: &str = "purged";

const BLANK: u8 = 0;
const PROPOSAL: u8 = 1;
const MEMBERSHIP: u8 = 2;
/// Proposer and sequence number, before a proposal's batch.
const PROPOSAL_HEADER: usize = 1 + 8 + 8;

/// The Raft log of a node.
pub struct LogStore {
    shared: Arc<Mutex<Shared>>,
    syncs: std::sync::mpsc::Sender<(PendingSync, IOFlushed<TypeConfig>)>,
}

/// Reads the log while it is appended to.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    wal: Wal,
    purged: Option<LogId>,
    /// Reused to encode entries.
    buffer: Vec<u8>,
}

impl LogStore {
    /// Opens the log kept in `storage` (its first entry is number 0).
    pub fn open(storage: Box<dyn LogStorage>) -> io::Result<LogStore> {
        let mut wal = Wal::open(storage, 0, wal::SEGMENT_BYTES)?;
        let purged = match wal.state(PURGED)? {
            Some(bytes) => Some(serde_json::from_slice::<LogId>(&bytes).map_err(invalid_data)?),
            None => None,
        };
        if let Some(purged) = &purged
            && wal.next_index() <= purged.index + 1
        {
            // Everything up to the purge point went, or a crash came between recording it and
            // dropping the segments: numbering goes on after it.
            wal.reset(purged.index + 1)?;
        }
        let (syncs, pending) = std::sync::mpsc::channel::<(PendingSync, IOFlushed<TypeConfig>)>();
        std::thread::Builder::new()
            .name("refract-raft-log-sync".into())
            .spawn(move || {
                // Ends when the store is dropped.
                for (sync, flushed) in pending {
                    flushed.io_completed(sync.run());
                }
            })?;
        Ok(LogStore {
            shared: Arc::new(Mutex::new(Shared {
                wal,
                purged,
                buffer: Vec::new(),
            })),
            syncs,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let shared = self.lock();
        let last_index = shared.wal.next_index().checked_sub(1);
        let last_log_id = match (last_index, &shared.purged) {
            (Some(last), purged) if purged.as_ref().is_none_or(|purged| last > purged.index) => {
                Some(log_id(shared.wal.last_term(), last))
            }
            _ => shared.purged,
        };
        Ok(LogState {
            last_purged_log_id: shared.purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // Write IO is ordered: entries appended before the vote must be durable before it is,
        // or a vote could count an entry as held that a power cut then takes away.
        let (flushed, synced) = TypeConfig::oneshot();
        let pending = self.lock().wal.take_sync();
        self.syncs
            .send((pending, IOFlushed::signal(flushed)))
            .map_err(|_| io::Error::other("the log sync thread is gone"))?;
        synced
            .await
            .map_err(|_| io::Error::other("the log sync thread is gone"))??;
        let bytes = serde_json::to_vec(vote).map_err(invalid_data)?;
        self.lock().wal.save_state(VOTE, &bytes)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let sync = {
            let mut shared = self.lock();
            let Shared { wal, buffer, .. } = &mut *shared;
            for entry in entries {
                let expected = wal.next_index();
                if entry.log_id.index != expected && wal.first_index().is_none() {
                    // An empty log may start anywhere: it leaves no hole.
                    wal.reset(entry.log_id.index)?;
                } else if entry.log_id.index != expected {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "log entry {} does not follow the log, whose next entry is {expected}",
                            entry.log_id.index
                        ),
                    ));
                }
                encode_entry(&entry, buffer)?;
                wal.append(entry.log_id.leader_id.term, buffer)?;
            }
            wal.take_sync()
        };
        self.syncs
            .send((sync, callback))
            .map_err(|_| io::Error::other("the log sync thread is gone"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let mut shared = self.lock();
        match last_log_id {
            Some(last) => shared.wal.truncate_after(last.index),
            None => {
                let next = shared.purged.map_or(0, |purged| purged.index + 1);
                shared.wal.reset(next)
            }
        }
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut shared = self.lock();
        // Recorded first: a crash before the segments go leaves entries nobody reads again.
        let bytes = serde_json::to_vec(&log_id).map_err(invalid_data)?;
        shared.wal.save_state(PURGED, &bytes)?;
        shared.purged = Some(log_id);
        if shared.wal.next_index() <= log_id.index + 1 {
            // Purged past its end (a snapshot was installed): the next entry follows the purge.
            shared.wal.reset(log_id.index + 1)
        } else {
            shared.wal.purge_before(log_id.index + 1)
        }
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> Result<Vec<Entry>, io::Error>
    where
        RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend,
    {
        let from = match range.start_bound() {
            Bound::Included(&from) => from,
            Bound::Excluded(&after) => after.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let until = match range.end_bound() {
            Bound::Included(&last) => last.saturating_add(1),
            Bound::Excluded(&until) => until,
            Bound::Unbounded => u64::MAX,
        };
        let shared = lock(&self.shared);
        let from = from.max(shared.purged.map_or(0, |purged| purged.index + 1));
        if from >= until {
            return Ok(Vec::new());
        }
        shared
            .wal
            .read_range(from, until)?
            .into_iter()
            .map(|entry| decode_entry(entry.term, entry.index, &entry.payload))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match lock(&self.shared).wal.state(VOTE)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(invalid_data)?)),
            None => Ok(None),
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding it left the log as the last complete operation did.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderIdOf::<TypeConfig>::from(term), index)
}

/// An entry's payload as the log keeps it (`out` is cleared first).
pub(crate) fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    match &entry.payload {
        EntryPayload::Blank => out.push(BLANK),
        EntryPayload::Normal(proposal) => {
            out.reserve(PROPOSAL_HEADER + proposal.batch.len());
            out.push(PROPOSAL);
            out.extend_from_slice(&proposal.proposer.to_le_bytes());
            out.extend_from_slice(&proposal.sequence.to_le_bytes());
            out.extend_from_slice(&proposal.batch);
        }
        EntryPayload::Membership(membership) => {
            out.push(MEMBERSHIP);
            serde_json::to_writer(&mut *out, &membership).map_err(invalid_data)?;
        }
    }
    Ok(())
}

/// An entry from its log id and its payload as the log keeps it.
pub(crate) fn decode_entry(term: u64, index: u64, payload: &[u8]) -> io::Result<Entry> {
    let damaged = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("log entry {index} has a payload of an unknown shape"),
        )
    };
    let payload = match payload.first() {
        Some(&BLANK) => EntryPayload::Blank,
        Some(&PROPOSAL) if payload.len() >= PROPOSAL_HEADER => {
            let number = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().unwrap());
            EntryPayload::Normal(Proposal {
                proposer: number(1),
                sequence: number(9),
                batch: payload[PROPOSAL_HEADER..].to_vec(),
            })
        }
        Some(&MEMBERSHIP) => EntryPayload::Membership(
            serde_json::from_slice::<Membership>(&payload[1..]).map_err(invalid_data)?,
        ),
        _ => return Err(damaged()),
    };
    Ok(Entry {
        log_id: log_id(term, index),
        payload,
    })
}

fn invalid_data(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::cluster::Member;
    use crate::disk::Directory;

    fn open(dir: &std::path::Path) -> LogStore {
        LogStore::open(Box::new(Directory::open(dir.to_path_buf()).unwrap())).unwrap()
    }

    fn proposal(index: u64, term: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Proposal {
                proposer: 2,
                sequence: index * 10,
                batch: format!("batch {index}").into_bytes(),
            }),
        }
    }

    /// Appends and waits until openraft would be told the entries are durable.
    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (flushed, done) = TypeConfig::oneshot();
        store
            .append(entries, IOFlushed::signal(flushed))
            .await
            .unwrap();
        done.await.unwrap().unwrap();
    }

    async fn indexes(store: &mut LogStore, range: std::ops::Range<u64>) -> Vec<u64> {
        let mut reader = store.get_log_reader().await;
        let entries = reader.try_get_log_entries(range).await.unwrap();
        entries.iter().map(|entry| entry.log_id.index).collect()
    }

    #[tokio::test]
    async fn every_kind_of_entry_reads_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let member = |id: u64| Member {
            url: format!("http://127.0.0.1:{id}"),
        };
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from_iter((1..=4).map(|id| (id, member(id)))),
        )
        .unwrap();
        let written = vec![
            Entry {
                log_id: log_id(0, 0),
                payload: EntryPayload::Membership(membership),
            },
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            proposal(2, 1),
        ];
        let mut store = open(dir.path());
        append(&mut store, written.clone()).await;
        drop(store);
        let mut store = open(dir.path());
        let mut reader = store.get_log_reader().await;
        assert_eq!(reader.try_get_log_entries(0..3).await.unwrap(), written);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 2)));
        assert_eq!(state.last_purged_log_id, None);
    }

    #[tokio::test]
    async fn an_entry_that_leaves_a_hole_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        append(&mut store, vec![proposal(0, 1)]).await;
        let error = store
            .append(vec![proposal(2, 1)], IOFlushed::noop())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("log entry 2 does not follow"));
        assert_eq!(indexes(&mut store, 0..10).await, vec![0]);
    }

    #[tokio::test]
    async fn a_conflicting_tail_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        append(&mut store, (0..5).map(|index| proposal(index, 1)).collect()).await;
        store.truncate_after(Some(log_id(1, 2))).await.unwrap();
        append(&mut store, vec![proposal(3, 2)]).await;
        drop(store);
        let mut store = open(dir.path());
        assert_eq!(indexes(&mut store, 0..10).await, vec![0, 1, 2, 3]);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 3)));
        store.truncate_after(None).await.unwrap();
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, None);
        append(&mut store, vec![proposal(0, 3)]).await;
        assert_eq!(indexes(&mut store, 0..10).await, vec![0]);
    }

    #[tokio::test]
    async fn purged_entries_are_gone_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        append(&mut store, (0..5).map(|index| proposal(index, 1)).collect()).await;
        store.purge(log_id(1, 2)).await.unwrap();
        assert_eq!(indexes(&mut store, 0..10).await, vec![3, 4]);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(1, 4)));

        // A snapshot installed past the log's end purges everything; the next entry follows it.
        store.purge(log_id(3, 9)).await.unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(3, 9)));
        drop(store);
        let mut store = open(dir.path());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 9)));
        assert_eq!(state.last_log_id, Some(log_id(3, 9)));
        append(&mut store, vec![proposal(10, 3)]).await;
        assert_eq!(indexes(&mut store, 0..20).await, vec![10]);
        store.truncate_after(None).await.unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap().last_log_id,
            Some(log_id(3, 9))
        );
    }

    #[tokio::test]
    async fn the_vote_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        assert_eq!(
            store.get_log_reader().await.read_vote().await.unwrap(),
            None
        );
        let vote = Vote::new_committed(4, 2);
        store.save_vote(&vote).await.unwrap();
        drop(store);
        let mut store = open(dir.path());
        let read = store.get_log_reader().await.read_vote().await.unwrap();
        assert_eq!(read, Some(vote));
    }
}
