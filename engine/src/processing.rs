//! The stateful processing: Wasm projections, consumer groups, the sharders they use, and
//! connectors.
//!
//! Their batches, checkpoints, emits and acks all go through the store, so one node runs them
//! and every node replicates what they write. On a single node that node runs them all along.
//! In a cluster the leader runs them: from when it has applied everything committed before its
//! term (so it starts from the last checkpoints and acks anyone acknowledged) until it stops
//! leading; then the next leader starts them over from what the log holds. A projection's
//! batch is one log entry with its checkpoint, so it counts once whoever ran it; an ack answered
//! is committed, so the next leader never delivers that message again.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::cluster::node::Node;
use crate::connectors::Connectors;
use crate::groups::Groups;
use crate::projections::component::Runtime;
use crate::projections::{ProjectionReads, Projections};
use crate::sharding::Sharders;
use crate::store::{Store, StoreError};

/// The processing of one node while it runs it.
#[derive(Clone)]
pub struct Processing {
    pub projections: Projections,
    pub sharders: Sharders,
    pub groups: Groups,
    pub connectors: Connectors,
}

impl Processing {
    /// Loads the sharders, projections and groups from the store and starts them.
    async fn open(store: &Store, runtime: &Runtime) -> anyhow::Result<Processing> {
        let sharders = Sharders::open(store.clone(), runtime.guest_engine().clone())
            .await
            .context("cannot load the sharders")?;
        let projections = Projections::open(store.clone(), runtime.clone())
            .await
            .context("cannot load the projections")?;
        let groups = match Groups::open(store.clone(), sharders.clone()).await {
            Ok(groups) => groups,
            Err(error) => {
                projections.shutdown().await;
                return Err(error.context("cannot load the consumer groups"));
            }
        };
        let connectors =
            match Connectors::open(store.clone(), sharders.clone(), runtime.clone()).await {
                Ok(connectors) => connectors,
                Err(error) => {
                    groups.shutdown().await;
                    projections.shutdown().await;
                    return Err(error.context("cannot load the connectors"));
                }
            };
        Ok(Processing {
            projections,
            sharders,
            groups,
            connectors,
        })
    }

    async fn shutdown(&self) {
        self.connectors.shutdown().await;
        self.groups.shutdown().await;
        self.projections.shutdown().await;
    }
}

/// The processing running on this node, and the term it started in (0 on a single node).
struct Running {
    term: u64,
    processing: Processing,
}

/// Where the processing runs, if on this node.
#[derive(Clone)]
pub struct ProcessingHost {
    current: Arc<RwLock<Option<Running>>>,
    /// What every node answers about the projections from its own applied data.
    reads: ProjectionReads,
    node: Option<Arc<Node>>,
    stop: CancellationToken,
}

impl ProcessingHost {
    /// A single node's processing, started now.
    pub async fn single(store: &Store, runtime: &Runtime) -> anyhow::Result<ProcessingHost> {
        let reads = ProjectionReads::new(store.clone());
        let processing = Processing::open(store, runtime).await?;
        Ok(ProcessingHost {
            reads,
            current: Arc::new(RwLock::new(Some(Running {
                term: 0,
                processing,
            }))),
            node: None,
            stop: CancellationToken::new(),
        })
    }

    /// A cluster node's processing: started whenever the node becomes leader, stopped when it
    /// stops being one.
    pub fn on_leader(node: Arc<Node>, runtime: Runtime) -> ProcessingHost {
        let host = ProcessingHost {
            current: Arc::new(RwLock::new(None)),
            reads: ProjectionReads::new(node.store.clone()),
            node: Some(node),
            stop: CancellationToken::new(),
        };
        tokio::spawn(host.clone().follow_leadership(runtime));
        host
    }

    /// The running processing, or `NotLeader` naming the node that runs it (`Unavailable`
    /// while this node, just elected, starts it).
    pub fn get(&self) -> Result<Processing, StoreError> {
        // A node that stopped leading answers for the leader before its copy is stopped.
        let leading = self.node.as_ref().is_none_or(|node| node.is_leader());
        if let Some(running) = &*self.current.read().expect("processing")
            && leading
        {
            return Ok(running.processing.clone());
        }
        match &self.node {
            Some(node) if node.is_leader() => Err(StoreError::Unavailable(
                "this node has just become the leader: its projections and groups are starting"
                    .into(),
            )),
            Some(node) => Err(StoreError::NotLeader {
                leader_url: node.leader_url(),
            }),
            None => Err(StoreError::ShuttingDown),
        }
    }

    /// Queries of the projections' read models, answered on any node from its applied data.
    pub fn projection_reads(&self) -> &ProjectionReads {
        &self.reads
    }

    /// Stops the processing for good (the server is stopping).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let running = self.current.write().expect("processing").take();
        if let Some(running) = running {
            running.processing.shutdown().await;
        }
    }

    async fn follow_leadership(self, runtime: Runtime) {
        let node = self.node.clone().expect("a cluster node");
        // Wakes on changes of vote, role or leader only, not on every entry applied.
        let mut changes = node.raft.server_metrics();
        let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let term = node.term();
            let leading = node.is_leader();
            let running_term = self
                .current
                .read()
                .expect("processing")
                .as_ref()
                .map(|r| r.term);
            // A copy started in an earlier term stops even if this node leads again: it may
            // have missed what another leader committed in between.
            if running_term.is_some_and(|started| !leading || started != term) {
                tracing::info!("no longer leading: projections and groups stop here");
                let stopped = self.current.write().expect("processing").take();
                if let Some(running) = stopped {
                    // A runner waiting on a write this node can no longer commit must not hold
                    // up following the leadership.
                    stopping = Some(tokio::spawn(
                        async move { running.processing.shutdown().await },
                    ));
                }
            }
            let idle = self.current.read().expect("processing").is_none();
            if leading && idle {
                // The previous copy stops whole first, so two never run here at once.
                if let Some(previous) = stopping.take() {
                    let _ = previous.await;
                }
                // Confirmed by a majority, and everything committed before is applied: the
                // store holds every checkpoint and ack anyone was answered for.
                if node.confirm_leadership().await.is_ok() {
                    self.start(&node, &runtime, term).await;
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                // Tries again after a failed start.
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Opens the processing and installs it, unless the server is stopping or the node no
    /// longer leads in `term`.
    async fn start(&self, node: &Node, runtime: &Runtime, term: u64) {
        let processing = match Processing::open(&node.store, runtime).await {
            Ok(processing) => processing,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "cannot start the processing");
                return;
            }
        };
        let refused = {
            let mut current = self.current.write().expect("processing");
            if self.stop.is_cancelled() || !node.is_leader() || node.term() != term {
                Some(processing)
            } else {
                tracing::info!(term, "leading: projections and groups run here");
                *current = Some(Running { term, processing });
                None
            }
        };
        if let Some(processing) = refused {
            processing.shutdown().await;
        }
    }
}
