//! A node of a cluster: openraft running on the node's log and store, the proposer that hands
//! the writer's batches to it, and the handlers of the messages other nodes send.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::raft::VoteRequest;
use openraft::type_config::alias::SnapshotOf;
use openraft::{ChangeMembers, Config, Raft, ReadPolicy, SnapshotPolicy};
use serde::Serialize;

use super::log_store::LogStore;
use super::network::{self, Network, SnapshotHeader};
use super::state_machine::{SnapshotFile, StateMachine};
use super::{Member, Proposal, TypeConfig};
use crate::disk::Directory;
use crate::metrics::Metrics;
use crate::store::replicated::Proposer;
use crate::store::{Store, StoreError, StoreOptions};

/// The Raft log's directory in a node's data directory.
pub const RAFT_LOG_DIR: &str = "raft-log";
/// The snapshots' directory in a node's data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";

pub type RaftHandle = Raft<TypeConfig, StateMachine>;

/// Who a node is and whom it forms a cluster with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Where this node's API listens, as the others reach it.
    pub url: String,
    /// The other voters of a new cluster, by id (none: a cluster of this node alone).
    pub peers: BTreeMap<u64, String>,
    /// Other nodes reached through another URL than their member URL (a proxy), by id.
    pub routes: BTreeMap<u64, String>,
    /// Sent with every message to the other nodes, which check it.
    pub secret: Option<String>,
    /// Whether the node joins an existing cluster (which adds it as a learner) instead of
    /// forming one.
    pub join: bool,
    /// When snapshots are made, and how much log stays behind one.
    pub snapshots: SnapshotTuning,
}

/// A snapshot every `every` entries lets the log before it go, but for the last `keep` entries
/// (so a follower a little behind catches up from the log instead of a whole snapshot).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotTuning {
    pub every: u64,
    pub keep: u64,
}

impl Default for SnapshotTuning {
    fn default() -> Self {
        SnapshotTuning {
            every: 20_000,
            keep: 2_000,
        }
    }
}

/// A running node.
pub struct Node {
    pub id: u64,
    /// Where the other nodes reach this one.
    pub url: String,
    pub raft: RaftHandle,
    pub store: Store,
    snapshots: PathBuf,
    /// Reaches the leader for followers' linearizable reads.
    network: Network,
}

/// How long a leader waits between heartbeats, and a follower without one before it stands
/// for election, in milliseconds: loopback and LAN clusters. A follower refuses votes until
/// the longest timeout has passed since it heard from the leader (its lease), so an election
/// mostly succeeds on a candidate's second try: failover takes one to two times the longest
/// timeout.
const HEARTBEAT_MS: u64 = 100;
const ELECTION_TIMEOUT_MS: (u64, u64) = (300, 600);
/// How long a follower waits to apply up to the leader's read index before the read fails.
const READ_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

fn raft_config(snapshots: SnapshotTuning) -> anyhow::Result<Config> {
    let config = Config {
        cluster_name: "refract".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MS.0,
        election_timeout_max: ELECTION_TIMEOUT_MS.1,
        // A node cut off and back must not depose a healthy leader with its higher term.
        enable_pre_vote: Some(true),
        // Out of the deadlock a partial partition can cause (openraft #2080).
        quorum_loss_probe_interval: Some(2 * ELECTION_TIMEOUT_MS.1),
        // The store's last commits before a crash may not be durable, and the committed index
        // is not kept: a restarted leader learns what is committed by an election.
        enable_leader_restore: Some(false),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshots.every),
        max_in_snapshot_log_to_keep: snapshots.keep,
        purge_batch_size: 512.min(snapshots.every),
        install_snapshot_timeout: 10_000,
        ..Config::default()
    };
    Ok(config.validate()?)
}

/// Hands the writer's batches to openraft, and reports back the ones it refuses.
#[derive(Clone)]
struct RaftProposer {
    id: u64,
    raft: Arc<OnceLock<RaftHandle>>,
    store: Arc<OnceLock<Store>>,
    runtime: tokio::runtime::Handle,
}

impl Proposer for RaftProposer {
    fn propose(&self, sequence: u64, batch: Vec<u8>) {
        let proposer = self.clone();
        self.runtime.spawn(async move {
            // The store is opened before Raft, which it hands its batches to: a batch proposed
            // while the node starts waits for both (the node fails to start, or sets them).
            let (raft, store) = loop {
                if let (Some(raft), Some(store)) = (proposer.raft.get(), proposer.store.get()) {
                    break (raft, store);
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            };
            let proposal = Proposal {
                proposer: proposer.id,
                sequence,
                batch,
            };
            if let Err(error) = raft.client_write(proposal).await {
                store.proposal_failed(sequence, refused(&error)).await;
            }
        });
    }
}

/// What the writer's callers get for a batch openraft did not take.
fn refused(error: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> StoreError {
    match error {
        // Refused before it entered the log: sending it again (to the leader) is safe.
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => not_leader(forward),
        // In the log, but the leader changed before it was committed: a later leader may
        // still commit it, so it is not 421 (which clients send again).
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => StoreError::Unavailable(
            "the leader changed before this write was committed: it may or may not have been \
             applied (an append sent again with the same event ids is taken once)"
                .into(),
        ),
        RaftError::APIError(error) => StoreError::InvalidRequest(error.to_string()),
        RaftError::Fatal(_) => StoreError::ShuttingDown,
    }
}

fn not_leader(forward: &ForwardToLeader<TypeConfig>) -> StoreError {
    StoreError::NotLeader {
        leader_url: forward.leader_node.as_ref().map(|node| node.url.clone()),
    }
}

impl Node {
    /// Opens the node's store and log in `data_dir` and starts Raft. A node whose log is empty
    /// forms the cluster with its peers (every one of them does the same, with the same members,
    /// so they agree on its first entry).
    pub async fn start(
        config: &NodeConfig,
        data_dir: &Path,
        options: StoreOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Node> {
        let log_dir = data_dir.join(RAFT_LOG_DIR);
        let log = LogStore::open(Box::new(Directory::open(log_dir.clone())?))
            .with_context(|| format!("cannot open the Raft log in {}", log_dir.display()))?;
        let proposer = RaftProposer {
            id: config.id,
            raft: Arc::new(OnceLock::new()),
            store: Arc::new(OnceLock::new()),
            runtime: tokio::runtime::Handle::current(),
        };
        let store = Store::open_replicated(
            data_dir,
            options,
            metrics,
            config.id,
            Box::new(proposer.clone()),
        )?;
        let snapshots = data_dir.join(SNAPSHOT_DIR);
        let state_machine = StateMachine::new(store.clone(), snapshots.clone())?;
        let network = Network::new(config.secret.clone(), config.routes.clone());
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config(config.snapshots)?),
            network.clone(),
            log,
            state_machine,
        )
        .await?;
        let _ = proposer.raft.set(raft.clone());
        let _ = proposer.store.set(store.clone());
        if !config.join && !raft.is_initialized().await? {
            let mut members: BTreeMap<u64, Member> = config
                .peers
                .iter()
                .map(|(id, url)| (*id, Member { url: url.clone() }))
                .collect();
            members.insert(
                config.id,
                Member {
                    url: config.url.clone(),
                },
            );
            if let Err(error) = raft.initialize(members).await {
                // Another member's log reached this one first: the cluster is formed.
                tracing::info!(%error, "the cluster was already formed");
            }
        }
        Ok(Node {
            id: config.id,
            url: config.url.clone(),
            raft,
            store,
            snapshots,
            network,
        })
    }

    /// Whether this node leads the cluster, as far as it knows.
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        metrics.current_leader == Some(self.id) && metrics.state.is_leader()
    }

    /// The term this node is in.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// The node this one knows as the leader, with its member URL.
    fn known_leader(&self) -> Option<(u64, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let leader = metrics.current_leader?;
        let member = metrics.membership_config.membership().get_node(&leader)?;
        Some((leader, member.url.clone()))
    }

    /// The URL of the node this one knows as the leader.
    pub fn leader_url(&self) -> Option<String> {
        self.known_leader().map(|(_, url)| url)
    }

    /// The URL this node reaches the leader it knows of at (its member URL, or the route
    /// `--peer-via` gives).
    pub fn leader_route(&self) -> Option<String> {
        let (leader, url) = self.known_leader()?;
        Some(self.network.route(leader, &url).to_owned())
    }

    /// Returns once this node has applied everything acknowledged before the call: the leader
    /// confirms with a majority that it still leads (ReadIndex, never a lease: a paused
    /// leader's lease proves nothing), and a follower asks the leader for that index and waits
    /// until it has applied up to it.
    pub async fn linearize(&self) -> Result<(), StoreError> {
        match self.confirm_leadership().await {
            Err(StoreError::NotLeader { .. }) => {}
            other => return other,
        }
        let unavailable = |why: String| StoreError::Unavailable(why);
        let (leader, url) = self
            .known_leader()
            .ok_or_else(|| unavailable("no leader is known: a read cannot be linearized".into()))?;
        let index = self
            .network
            .read_index(leader, &url)
            .await
            .map_err(|error| {
                unavailable(format!("the leader did not give a read index: {error}"))
            })?;
        self.raft
            .wait(Some(READ_CATCH_UP))
            .applied_index_at_least(Some(index), "a linearizable read")
            .await
            .map_err(|error| {
                unavailable(format!(
                    "this node did not apply up to the leader's read index {index}: {error}"
                ))
            })?;
        Ok(())
    }

    /// Returns once this node is the leader, confirmed by a majority after the call began,
    /// and has applied everything committed before it.
    pub async fn confirm_leadership(&self) -> Result<(), StoreError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(error) => match error.forward_to_leader() {
                Some(forward) => Err(not_leader(forward)),
                None => Err(StoreError::Unavailable(format!(
                    "cannot confirm the leadership with a majority: {error}"
                ))),
            },
        }
    }

    /// Answers a follower's request for a read index: the index of what was committed when
    /// this node confirmed it still leads.
    pub async fn handle_read_index(&self) -> Result<Vec<u8>, String> {
        let linearizer = self.raft.get_read_linearizer(ReadPolicy::ReadIndex).await;
        Ok(answer(
            linearizer.map(|linearizer| linearizer.read_log_id().log_id().index),
        ))
    }

    /// Adds a node as a learner (a replica that does not vote) and waits until it has caught
    /// up with the log.
    pub async fn add_learner(&self, id: u64, url: String) -> Result<(), StoreError> {
        let result = self.raft.add_learner(id, Member { url }, true).await;
        result.map(|_| ()).map_err(|error| refused(&error))
    }

    /// Makes `voters` the cluster's voters: each must be a member already (add it as a learner
    /// first); voters left out stay on as learners.
    pub async fn set_voters(&self, voters: BTreeSet<u64>) -> Result<(), StoreError> {
        let change = ChangeMembers::ReplaceAllVoters(voters);
        let result = self.raft.change_membership(change, true).await;
        result.map(|_| ()).map_err(|error| refused(&error))
    }

    /// Takes a node out of the cluster: out of the voters first if it is one, then out of the
    /// members.
    pub async fn remove_member(&self, id: u64) -> Result<(), StoreError> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(StoreError::InvalidRequest(format!(
                "node {id} is not a member of the cluster"
            )));
        }
        let change = if membership.voter_ids().any(|voter| voter == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let result = self.raft.change_membership(change, false).await;
        result.map(|_| ()).map_err(|error| refused(&error))
    }

    /// Stops Raft, then the store.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not stop cleanly");
        }
        self.store.shutdown().await;
    }

    /// Answers another node's append (the body as [`network::encode_append`] made it).
    pub async fn handle_append(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let rpc = network::decode_append(body).map_err(|error| error.to_string())?;
        Ok(answer(self.raft.append_entries(rpc).await))
    }

    pub async fn handle_vote(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let rpc: VoteRequest<TypeConfig> =
            serde_json::from_slice(body).map_err(|error| error.to_string())?;
        Ok(answer(self.raft.vote(rpc).await))
    }

    pub async fn handle_pre_vote(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let rpc: VoteRequest<TypeConfig> =
            serde_json::from_slice(body).map_err(|error| error.to_string())?;
        Ok(answer(self.raft.pre_vote(rpc).await))
    }

    /// Installs a snapshot another node streams: `body` yields its header and rows.
    pub async fn handle_snapshot(
        &self,
        mut body: impl futures::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
    ) -> Result<Vec<u8>, String> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;

        // The header first: its length, then the JSON.
        let mut start = Vec::new();
        let mut rows_start = None;
        while rows_start.is_none() {
            let chunk = body
                .next()
                .await
                .ok_or("a snapshot cut short in its header")??;
            start.extend_from_slice(&chunk);
            if start.len() >= 4 {
                let length = u32::from_le_bytes(start[..4].try_into().expect("4")) as usize;
                if start.len() >= 4 + length {
                    rows_start = Some(4 + length);
                }
            }
        }
        let (header, first_rows) =
            network::unframe::<SnapshotHeader>(&start).map_err(|error| error.to_string())?;
        let path = self
            .snapshots
            .join(format!("incoming-{}", uuid::Uuid::new_v4().simple()));
        let write = async {
            let mut file = tokio::fs::File::create(&path).await?;
            file.write_all(first_rows).await?;
            while let Some(chunk) = body.next().await {
                file.write_all(&chunk.map_err(std::io::Error::other)?)
                    .await?;
            }
            file.sync_all().await
        };
        if let Err(error) = write.await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(format!("cannot keep the snapshot: {error}"));
        }
        let incoming = path.clone();
        let snapshot = SnapshotOf::<TypeConfig, SnapshotFile> {
            meta: header.meta,
            snapshot: SnapshotFile { path },
        };
        let installed = self.raft.install_full_snapshot(header.vote, snapshot).await;
        // Kept snapshots were moved into place; one refused or skipped is not needed.
        let _ = tokio::fs::remove_file(&incoming).await;
        Ok(answer(installed))
    }
}

/// An answer to another node, as [`network`] reads it.
fn answer<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> Vec<u8> {
    let result = result.map_err(|error| error.to_string());
    serde_json::to_vec(&result).expect("answers are JSON")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{Direction, ExpectedRevision, NewEvent};

    struct Running {
        node: Arc<Node>,
        url: String,
        server: tokio::task::JoinHandle<()>,
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

    /// Starts three nodes on loopback that form a cluster.
    async fn three_nodes(dir: &Path) -> Vec<Running> {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            listeners.push((listener, url));
        }
        let urls: BTreeMap<u64, String> = (1..=3)
            .zip(listeners.iter().map(|(_, url)| url.clone()))
            .collect();
        let mut running = Vec::new();
        for ((listener, url), id) in listeners.into_iter().zip(1..) {
            let config = NodeConfig {
                id,
                url: url.clone(),
                peers: urls
                    .iter()
                    .filter(|(other, _)| **other != id)
                    .map(|(other, url)| (*other, url.clone()))
                    .collect(),
                routes: BTreeMap::new(),
                secret: None,
                join: false,
                snapshots: SnapshotTuning::default(),
            };
            let options = StoreOptions {
                cache_bytes: 16 << 20,
                ..StoreOptions::default()
            };
            let node = Node::start(
                &config,
                &dir.join(id.to_string()),
                options,
                Arc::new(Metrics::new()),
            )
            .await
            .unwrap();
            let node = Arc::new(node);
            let routes: axum::Router = crate::http::raft::routes(node.clone(), None);
            let server = tokio::spawn(async move {
                axum::serve(listener, routes).await.unwrap();
            });
            running.push(Running { node, url, server });
        }
        running
    }

    /// Waits until every node in `nodes` sees the same leader, and answers its id.
    async fn agreed_leader(nodes: &[&Running]) -> u64 {
        for _ in 0..300 {
            let mut seen = Vec::new();
            for running in nodes {
                seen.push(running.node.raft.current_leader().await);
            }
            if let Some(Some(leader)) = seen.first()
                && seen.iter().all(|other| *other == Some(*leader))
                && nodes.iter().any(|running| running.node.id == *leader)
            {
                return *leader;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader agreed on");
    }

    /// Runs `work` on the agreed leader, again on the next one while it answers `NotLeader`:
    /// a loaded machine can miss heartbeats and elect again at any time, as clients know.
    async fn on_leader<'a, T, F, W>(nodes: &[&'a Running], work: W) -> Result<T, StoreError>
    where
        W: Fn(&'a Running) -> F,
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        for _ in 0..10 {
            let leader_id = agreed_leader(nodes).await;
            let leader = nodes
                .iter()
                .find(|running| running.node.id == leader_id)
                .unwrap();
            match work(leader).await {
                Err(StoreError::NotLeader { .. }) => continue,
                other => return other,
            }
        }
        panic!("the leader kept changing");
    }

    /// Waits until a node has applied `events` events.
    async fn caught_up(node: &Node, events: u64) {
        for _ in 0..300 {
            if node.store.head() >= events {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node {} did not catch up", node.id);
    }

    fn ids(node: &Node, stream: &str) -> Vec<uuid::Uuid> {
        let slice = node
            .store
            .read_stream(stream, None, Direction::Forward, 100, false)
            .unwrap();
        slice.events.into_iter().map(|event| event.id).collect()
    }

    /// Three nodes elect a leader and replicate its writes; a follower refuses writes and names
    /// the leader; two conditional writes racing on the leader give one success; when the leader
    /// stops, the other two elect a new one that has every acknowledged write and takes more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_nodes_replicate_and_survive_the_loss_of_their_leader() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_nodes(dir.path()).await;
        let all: Vec<&Running> = nodes.iter().collect();

        let placed = event("Placed");
        let placed_id = placed.id;
        let outcome = on_leader(&all, |leader| {
            let placed = placed.clone();
            async move {
                leader
                    .node
                    .store
                    .append("order-1".into(), ExpectedRevision::NoStream, vec![placed])
                    .await
            }
        })
        .await
        .unwrap();
        assert_eq!(outcome.first_position, 0);

        // A follower refuses and names the leader (asked again if the leader changed between).
        let mut named = false;
        for _ in 0..10 {
            let leader_id = agreed_leader(&all).await;
            let leader = &nodes[(leader_id - 1) as usize];
            let follower = nodes
                .iter()
                .find(|running| running.node.id != leader_id)
                .unwrap();
            let refused = follower
                .node
                .store
                .append("order-1".into(), ExpectedRevision::Any, vec![event("Paid")])
                .await;
            match refused {
                Err(StoreError::NotLeader { leader_url }) => {
                    if leader_url.as_deref() == Some(leader.url.as_str()) {
                        named = true;
                        break;
                    }
                }
                other => panic!("a follower took a write: {other:?}"),
            }
        }
        assert!(named, "no follower named the leader");

        let results = on_leader(&all, |leader| {
            let race = |kind: &'static str| {
                let store = leader.node.store.clone();
                tokio::spawn(async move {
                    store
                        .append(
                            "order-2".into(),
                            ExpectedRevision::NoStream,
                            vec![event(kind)],
                        )
                        .await
                })
            };
            async move {
                let (first, second) = (race("A"), race("B"));
                let results = [first.await.unwrap(), second.await.unwrap()];
                // A leader change refuses both before either is logged: race again.
                match results
                    .iter()
                    .find(|result| matches!(result, Err(StoreError::NotLeader { .. })))
                {
                    Some(Err(not_leader)) if results.iter().all(Result::is_err) => {
                        Err(not_leader.clone())
                    }
                    _ => Ok(results),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(results.iter().filter(|result| result.is_ok()).count(), 1);
        assert!(
            results
                .iter()
                .any(|result| matches!(result, Err(StoreError::WrongExpectedRevision { .. })))
        );
        let leader_id = agreed_leader(&all).await;
        let leader = &nodes[(leader_id - 1) as usize];

        for running in &nodes {
            caught_up(&running.node, 2).await;
            assert_eq!(ids(&running.node, "order-1"), vec![placed_id]);
            assert_eq!(ids(&running.node, "order-2"), ids(&leader.node, "order-2"));
        }

        leader.node.shutdown().await;
        leader.server.abort();
        let survivors: Vec<&Running> = nodes
            .iter()
            .filter(|running| running.node.id != leader_id)
            .collect();
        let paid = event("Paid");
        let paid_id = paid.id;
        let outcome = on_leader(&survivors, |leader| {
            let paid = paid.clone();
            async move {
                leader
                    .node
                    .store
                    .append("order-1".into(), ExpectedRevision::Exact(0), vec![paid])
                    .await
            }
        })
        .await
        .unwrap();
        assert_eq!(outcome.first_position, 2);
        for running in &survivors {
            caught_up(&running.node, 3).await;
            assert_eq!(ids(&running.node, "order-1"), vec![placed_id, paid_id]);
        }
        for running in survivors {
            running.node.shutdown().await;
            running.server.abort();
        }
    }
}
