//! openraft's state machine on the store: applying an entry is the writer applying its batch,
//! and a snapshot is the whole database at a durable checkpoint.
//!
//! Snapshots live in a directory of their own, one directory per snapshot named by its last
//! log id, holding the database's rows (`rows`) and what they cover (`meta`, JSON). A snapshot
//! is made under a temporary name and renamed once complete, so a crash never leaves half of
//! one under its real name; the newest complete one is the current snapshot, older ones go.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{
    CommittedLeaderIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};

use super::{Applied, LogId, Membership, TypeConfig};
use crate::store::Store;
use crate::store::replicated::{ReplicatedEntry, ReplicatedPayload, ReplicatedState};

const ROWS: &str = "rows";
const META: &str = "meta";
const UNFINISHED: &str = ".unfinished";
const INCOMING: &str = "incoming-";

/// A snapshot's rows, in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// The state machine of a node: its store, and where its snapshots are kept.
pub struct StateMachine {
    store: Store,
    snapshots: PathBuf,
}

/// Builds a snapshot of the store while the writer goes on.
pub struct SnapshotBuilder {
    store: Store,
    snapshots: PathBuf,
}

impl StateMachine {
    /// The state machine of `store`, keeping snapshots in the directory `snapshots`.
    pub fn new(store: Store, snapshots: PathBuf) -> io::Result<StateMachine> {
        fs::create_dir_all(&snapshots)?;
        // What a crash left half made.
        for item in fs::read_dir(&snapshots)? {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(UNFINISHED) {
                fs::remove_dir_all(item.path())?;
            } else if name.starts_with(INCOMING) {
                fs::remove_file(item.path())?;
            }
        }
        Ok(StateMachine { store, snapshots })
    }

    /// Where an incoming snapshot's rows may be written before it is installed (a file in the
    /// snapshot directory is moved into place instead of copied).
    pub fn incoming_path(&self) -> PathBuf {
        self.snapshots
            .join(format!("{INCOMING}{}", uuid::Uuid::new_v4().simple()))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembershipOf<TypeConfig>), io::Error> {
        let store = self.store.clone();
        let state = tokio::task::spawn_blocking(move || store.replicated_state())
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        Ok((state.applied.map(log_id), stored_membership(&state)?))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let payload = match entry.payload {
                EntryPayload::Blank => ReplicatedPayload::Blank,
                EntryPayload::Normal(proposal) => ReplicatedPayload::Batch {
                    proposer: proposal.proposer,
                    sequence: proposal.sequence,
                    batch: proposal.batch,
                },
                EntryPayload::Membership(membership) => ReplicatedPayload::Membership(
                    serde_json::to_vec(&membership).map_err(io::Error::other)?,
                ),
            };
            batch.push(ReplicatedEntry {
                term: entry.log_id.leader_id.term,
                index: entry.log_id.index,
                payload,
            });
            responders.extend(responder);
        }
        self.store
            .apply_replicated(batch)
            .await
            .map_err(io::Error::other)?;
        for responder in responders {
            responder.send(Applied);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let snapshots = self.snapshots.clone();
        let meta = meta.clone();
        let rows = tokio::task::spawn_blocking(move || keep(&snapshots, &meta, &snapshot.path))
            .await
            .map_err(io::Error::other)??;
        self.store
            .install_snapshot(File::open(rows)?)
            .await
            .map_err(io::Error::other)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || current(&snapshots))
            .await
            .map_err(io::Error::other)?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let snapshot = self.store.snapshot().await.map_err(io::Error::other)?;
        let meta = SnapshotMeta {
            last_log_id: snapshot.state.applied.map(log_id),
            last_membership: stored_membership(&snapshot.state)?,
        };
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || {
            let unfinished = unfinished_directory(&snapshots, &meta)?;
            let mut rows = BufWriter::new(File::create(unfinished.join(ROWS))?);
            snapshot.write_to(&mut rows).map_err(io::Error::other)?;
            rows.into_inner()
                .map_err(|error| error.into_error())?
                .sync_all()?;
            let path = finish(&snapshots, &unfinished, &meta)?;
            Ok(SnapshotOf::<TypeConfig, SnapshotFile> {
                meta,
                snapshot: SnapshotFile { path },
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

fn log_id((term, index): (u64, u64)) -> LogId {
    LogId::new(CommittedLeaderIdOf::<TypeConfig>::from(term), index)
}

fn stored_membership(state: &ReplicatedState) -> io::Result<StoredMembershipOf<TypeConfig>> {
    Ok(match &state.membership {
        Some((id, bytes)) => StoredMembership::new(
            Some(log_id(*id)),
            serde_json::from_slice::<Membership>(bytes).map_err(io::Error::other)?,
        ),
        None => StoredMembership::default(),
    })
}

/// The name of a snapshot's directory: ordered by index, then term.
fn directory_name(meta: &SnapshotMetaOf<TypeConfig>) -> String {
    match &meta.last_log_id {
        Some(id) => format!("{:020}-{:020}", id.index, id.leader_id.term),
        // Sorts before every snapshot that holds an entry.
        None => "0-none".to_owned(),
    }
}

fn unfinished_directory(
    snapshots: &Path,
    meta: &SnapshotMetaOf<TypeConfig>,
) -> io::Result<PathBuf> {
    let unfinished = snapshots.join(format!(
        "{}-{}{UNFINISHED}",
        directory_name(meta),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir(&unfinished)?;
    Ok(unfinished)
}

/// Writes the meta beside the rows and gives the snapshot its real name; drops the snapshots
/// before it. Answers the rows' path.
fn finish(
    snapshots: &Path,
    unfinished: &Path,
    meta: &SnapshotMetaOf<TypeConfig>,
) -> io::Result<PathBuf> {
    let file = File::create(unfinished.join(META))?;
    serde_json::to_writer(&file, meta).map_err(io::Error::other)?;
    file.sync_all()?;
    File::open(unfinished)?.sync_all()?;
    let name = directory_name(meta);
    let finished = snapshots.join(&name);
    if finished.exists() {
        // The same state again (nothing was applied since): the one kept is as good.
        fs::remove_dir_all(unfinished)?;
    } else {
        fs::rename(unfinished, &finished)?;
    }
    File::open(snapshots)?.sync_all()?;
    for item in fs::read_dir(snapshots)? {
        let item = item?;
        let other = item.file_name().to_string_lossy().into_owned();
        if item.file_type()?.is_dir() && !other.ends_with(UNFINISHED) && other < name {
            fs::remove_dir_all(item.path())?;
        }
    }
    Ok(finished.join(ROWS))
}

/// Keeps a snapshot received from the leader as the current one; answers its rows' path.
fn keep(snapshots: &Path, meta: &SnapshotMetaOf<TypeConfig>, rows: &Path) -> io::Result<PathBuf> {
    let unfinished = unfinished_directory(snapshots, meta)?;
    let target = unfinished.join(ROWS);
    if rows.parent() == Some(snapshots) {
        fs::rename(rows, &target)?;
    } else {
        fs::copy(rows, &target)?;
    }
    File::open(&target)?.sync_all()?;
    finish(snapshots, &unfinished, meta)
}

/// The newest complete snapshot.
fn current(snapshots: &Path) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>> {
    let mut newest = None;
    for item in fs::read_dir(snapshots)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if item.file_type()?.is_dir()
            && !name.ends_with(UNFINISHED)
            && newest.as_ref().is_none_or(|newest| &name > newest)
        {
            newest = Some(name);
        }
    }
    let Some(name) = newest else {
        return Ok(None);
    };
    let directory = snapshots.join(name);
    let meta: SnapshotMetaOf<TypeConfig> =
        serde_json::from_slice(&fs::read(directory.join(META))?).map_err(io::Error::other)?;
    Ok(Some(SnapshotOf::<TypeConfig, SnapshotFile> {
        meta,
        snapshot: SnapshotFile {
            path: directory.join(ROWS),
        },
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::cluster::log_store::LogStore;
    use crate::disk::Directory;
    use crate::metrics::Metrics;
    use crate::store::StoreOptions;
    use crate::store::replicated::Proposer;

    /// The suite drives the storage directly; nothing is proposed through the writer.
    struct NoProposals;

    impl Proposer for NoProposals {
        fn propose(&self, _sequence: u64, _batch: Vec<u8>) {
            unreachable!("the storage suite proposes nothing");
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().unwrap();
            let log = Directory::open(dir.path().join("log")).unwrap();
            let log = LogStore::open(Box::new(log)).unwrap();
            let options = StoreOptions {
                cache_bytes: 16 << 20,
                ..StoreOptions::default()
            };
            let store = Store::open_replicated(
                &dir.path().join("data"),
                options,
                Arc::new(Metrics::new()),
                1,
                Box::new(NoProposals),
            )
            .unwrap();
            let state_machine = StateMachine::new(store, dir.path().join("snapshots")).unwrap();
            Ok((dir, log, state_machine))
        }
    }

    /// openraft's own checks of a log store and a state machine: logs, votes, purging,
    /// truncation, the state recovered on start, applying, and snapshots built and installed.
    #[test]
    fn openraft_storage_suite() {
        TypeConfig::run(async {
            Suite::test_all(Builder).await.unwrap();
        });
    }
}
