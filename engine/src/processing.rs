//! The stateful processing: Wasm projections, consumer groups, and the sharders they use.
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
use crate::groups::Groups;
use crate::projections::Projections;
use crate::projections::component::Runtime;
use crate::sharding::Sharders;
use crate::store::{Store, StoreError};

/// The processing of one node while it runs it.
#[derive(Clone)]
pub struct Processing {
    pub projections: Projections,
    pub sharders: Sharders,
    pub groups: Groups,
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
        let groups = Groups::open(store.clone(), sharders.clone())
            .await
            .context("cannot load the consumer groups")?;
        Ok(Processing {
            projections,
            sharders,
            groups,
        })
    }

    async fn shutdown(&self) {
        self.groups.shutdown().await;
        self.projections.shutdown().await;
    }
}

/// Where the processing runs, if on this node.
#[derive(Clone)]
pub struct ProcessingHost {
    current: Arc<RwLock<Option<Processing>>>,
    node: Option<Arc<Node>>,
    stop: CancellationToken,
}

impl ProcessingHost {
    /// A single node's processing, started now.
    pub async fn single(store: &Store, runtime: &Runtime) -> anyhow::Result<ProcessingHost> {
        let processing = Processing::open(store, runtime).await?;
        Ok(ProcessingHost {
            current: Arc::new(RwLock::new(Some(processing))),
            node: None,
            stop: CancellationToken::new(),
        })
    }

    /// A cluster node's processing: started whenever the node becomes leader, stopped when it
    /// stops being one.
    pub fn on_leader(node: Arc<Node>, runtime: Runtime) -> ProcessingHost {
        let host = ProcessingHost {
            current: Arc::new(RwLock::new(None)),
            node: Some(node),
            stop: CancellationToken::new(),
        };
        tokio::spawn(host.clone().follow_leadership(runtime));
        host
    }

    /// The running processing, or `NotLeader` naming the node that runs it (`Unavailable`
    /// while this node, just elected, starts it).
    pub fn get(&self) -> Result<Processing, StoreError> {
        if let Some(processing) = &*self.current.read().expect("processing") {
            return Ok(processing.clone());
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

    /// Stops the processing for good (the server is stopping).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let running = self.current.write().expect("processing").take();
        if let Some(processing) = running {
            processing.shutdown().await;
        }
    }

    async fn follow_leadership(self, runtime: Runtime) {
        let node = self.node.clone().expect("a cluster node");
        let mut metrics = node.raft.metrics();
        loop {
            let leading = node.is_leader();
            let running = self.current.read().expect("processing").is_some();
            if leading && !running {
                // Confirmed by a majority, and everything committed before is applied: the
                // store holds every checkpoint and ack anyone was answered for.
                if node.linearize().await.is_ok() && !self.stop.is_cancelled() {
                    match Processing::open(&node.store, &runtime).await {
                        Ok(processing) if self.stop.is_cancelled() => processing.shutdown().await,
                        Ok(processing) => {
                            tracing::info!("leading: projections and groups run here");
                            *self.current.write().expect("processing") = Some(processing);
                        }
                        Err(error) => {
                            tracing::error!(
                                error = format!("{error:#}"),
                                "cannot start the processing"
                            )
                        }
                    }
                }
            } else if !leading && running {
                tracing::info!("no longer leading: projections and groups stop here");
                let stopped = self.current.write().expect("processing").take();
                if let Some(processing) = stopped {
                    // A runner waiting on a write this node can no longer commit must not hold up
                    // following the leadership.
                    tokio::spawn(async move { processing.shutdown().await });
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                changed = metrics.changed() => if changed.is_err() { return },
                // Tries again after a failed start.
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
