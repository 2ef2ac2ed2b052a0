//! Client-side sharding: one logical store over several independent nodes, placed by a Wasm
//! sharder that runs in this process, the same component the servers run.
//!
//! An append goes to the node the sharder picks for its first event (with as many shards as
//! nodes); a read of a stream goes to the node this client appended it to, or else to the node
//! that has it. Subscriptions to `$all` or a system stream fan in from every node, with one
//! checkpoint per node that can be stored and resumed from.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiFailure, AppendResult, Client, Event, NewEvent, ReadOptions, ReadPage, SubscribeFrom,
    SubscriptionMessage,
};
use crate::sharding::{ShardInput, Sharder};
use crate::store::ExpectedRevision;

/// Where the sharder comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharderSource {
    /// A component file on this machine.
    File(PathBuf),
    /// A sharder uploaded to the nodes under this name, downloaded from the first node that
    /// answers.
    Named(String),
}

pub struct ShardedClient {
    nodes: Vec<Client>,
    sharder: Arc<Sharder>,
    /// Streams this client appended, by node: reads go straight there.
    placed: Mutex<HashMap<String, usize>>,
}

/// The last event id delivered from each node (a position for `$all`, a revision for a
/// stream); `None` for a node nothing was delivered from yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    pub nodes: Vec<Option<u64>>,
}

/// A message of a fan-in subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum FanIn {
    Event {
        node: usize,
        /// Its id on its node; [`Checkpoints`] keeps the last one per node.
        id: u64,
        event: Box<Event>,
    },
    /// This node has delivered its history; live events follow.
    CaughtUp { node: usize },
    /// This node cannot be reached or its subscription broke; it is retried from its checkpoint
    /// while the other nodes carry on.
    NodeFailed { node: usize, error: String },
}

impl ShardedClient {
    pub fn new(nodes: Vec<Client>, sharder: Sharder) -> anyhow::Result<ShardedClient> {
        anyhow::ensure!(
            !nodes.is_empty(),
            "a sharded client needs at least one node"
        );
        Ok(ShardedClient {
            nodes,
            sharder: Arc::new(sharder),
            placed: Mutex::new(HashMap::new()),
        })
    }

    /// Clients for `shards`, with the sharder from `source`. A shard is a node's URL, or the
    /// URLs of a cluster's nodes joined with `+` (its client follows the cluster's leader).
    pub async fn connect(
        shards: &[String],
        token: Option<String>,
        source: &SharderSource,
    ) -> anyhow::Result<ShardedClient> {
        let nodes = shards
            .iter()
            .map(|shard| Client::new(&shard.replace('+', ","), token.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bytes = match source {
            SharderSource::File(path) => std::fs::read(path)
                .with_context(|| format!("cannot read the sharder {}", path.display()))?,
            SharderSource::Named(name) => {
                let mut failures = Vec::new();
                let mut found = None;
                for node in &nodes {
                    match node.sharder_component(name).await {
                        Ok(bytes) => {
                            found = Some(bytes);
                            break;
                        }
                        Err(error) => failures.push(format!("{}: {error}", node.base())),
                    }
                }
                found.ok_or_else(|| {
                    anyhow::anyhow!(
                        "cannot download sharder {name:?} from any node ({})",
                        failures.join("; ")
                    )
                })?
            }
        };
        let sharder = tokio::task::spawn_blocking(move || Sharder::standalone(&bytes)).await??;
        ShardedClient::new(nodes, sharder)
    }

    pub fn nodes(&self) -> &[Client] {
        &self.nodes
    }

    pub fn sharder(&self) -> &Sharder {
        &self.sharder
    }

    /// The node the sharder places `event` of `stream` on. Blocking: it runs the sharder (from
    /// async code, [`ShardedClient::append`] does this on the blocking pool).
    pub fn node_for(&self, stream: &str, event: &NewEvent) -> anyhow::Result<usize> {
        let input = shard_input(stream, event)?;
        place(&self.sharder, input, self.nodes.len())
    }

    /// Appends to the node the first event is placed on; returns that node and the result.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: &[NewEvent],
    ) -> anyhow::Result<(usize, AppendResult)> {
        let first = events
            .first()
            .ok_or_else(|| anyhow::anyhow!("an append needs at least one event"))?;
        let (sharder, input) = (self.sharder.clone(), shard_input(stream, first)?);
        let nodes = self.nodes.len();
        // A guest call may take up to its time limit: not on an async worker.
        let node = tokio::task::spawn_blocking(move || place(&sharder, input, nodes)).await??;
        let result = self.nodes[node]
            .append(stream, expected, events)
            .await
            .with_context(|| self.describe(node))?;
        self.placed
            .lock()
            .expect("placed streams")
            .insert(stream.to_owned(), node);
        Ok((node, result))
    }

    /// Reads a stream from its node: the one this client appended it to, else the one that has
    /// it (every node is asked).
    pub async fn read(
        &self,
        stream: &str,
        options: &ReadOptions,
    ) -> anyhow::Result<(usize, ReadPage)> {
        let known = self
            .placed
            .lock()
            .expect("placed streams")
            .get(stream)
            .copied();
        if let Some(node) = known {
            let page = self.nodes[node]
                .read(stream, options)
                .await
                .with_context(|| self.describe(node))?;
            return Ok((node, page));
        }
        let reads = self.nodes.iter().map(|node| node.read(stream, options));
        let answers = futures::future::join_all(reads).await;
        let mut failures = Vec::new();
        let mut missing = None;
        for (node, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(page) => return Ok((node, page)),
                Err(error) if is_not_found(&error) => missing = Some(error),
                Err(error) => failures.push(format!("{}: {error:#}", self.describe(node))),
            }
        }
        if !failures.is_empty() {
            anyhow::bail!(
                "{stream} is on none of the nodes that answered; {}",
                failures.join("; ")
            );
        }
        Err(missing.unwrap_or_else(|| anyhow::anyhow!("stream {stream:?} does not exist")))
    }

    /// Subscribes to `stream` (`$all` or a system stream such as `$ce-order`) on every node and
    /// merges the messages. Each node starts after its entry in `from` (from the start where it
    /// has none). Retries a failed node every second; drop the stream to stop.
    pub fn subscribe(
        &self,
        stream: &str,
        from: &Checkpoints,
        options: &ReadOptions,
    ) -> FanInSubscription {
        let (sender, receiver) = mpsc::channel(1024);
        let tasks = self
            .nodes
            .iter()
            .enumerate()
            .map(|(node, client)| {
                let start = from.nodes.get(node).copied().flatten();
                tokio::spawn(follow(
                    node,
                    client.clone(),
                    stream.to_owned(),
                    start,
                    options.clone(),
                    sender.clone(),
                ))
            })
            .collect();
        FanInSubscription {
            receiver,
            tasks,
            checkpoints: Checkpoints {
                nodes: (0..self.nodes.len())
                    .map(|node| from.nodes.get(node).copied().flatten())
                    .collect(),
            },
        }
    }

    fn describe(&self, node: usize) -> String {
        format!("node {node} ({})", self.nodes[node].base())
    }
}

/// What the sharder sees of an event to append: the same shape the server's
/// The node of `nodes` the sharder places `input` on.
fn place(sharder: &Sharder, input: ShardInput, nodes: usize) -> anyhow::Result<usize> {
    let shards = u32::try_from(nodes).context("too many nodes")?;
    Ok(sharder.shard(&[input], shards)?[0] as usize)
}

/// `/sharders/{name}/shard` takes, so both compute the same shard.
pub fn shard_input(stream: &str, event: &NewEvent) -> anyhow::Result<ShardInput> {
    let mut item = serde_json::to_value(event)?;
    item["stream"] = Value::String(stream.to_owned());
    ShardInput::from_json(&item).map_err(anyhow::Error::msg)
}

fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<ApiFailure>()
        .is_some_and(|failure| failure.status == 404)
}

/// One node's part of a fan-in: subscribe, forward, and on failure retry from the last id.
async fn follow(
    node: usize,
    client: Client,
    stream: String,
    mut last: Option<u64>,
    options: ReadOptions,
    mut sender: mpsc::Sender<FanIn>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let from = last.map_or(SubscribeFrom::Start, |id| SubscribeFrom::At(id + 1));
        let error = match client.subscribe(&stream, from, &options).await {
            Ok(messages) => {
                let mut messages = std::pin::pin!(messages);
                loop {
                    let message = match messages.next().await {
                        Some(Ok(SubscriptionMessage::Event { id, event })) => {
                            last = Some(id);
                            backoff = Duration::from_millis(200);
                            FanIn::Event { node, id, event }
                        }
                        Some(Ok(SubscriptionMessage::CaughtUp)) => FanIn::CaughtUp { node },
                        Some(Err(error)) => break format!("{error:#}"),
                        None => break "the subscription ended".to_owned(),
                    };
                    if sender.send(message).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => format!("{error:#}"),
        };
        let failed = FanIn::NodeFailed {
            node,
            error: format!("node {node} ({}): {error}", client.base()),
        };
        if sender.send(failed).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The merged messages of every node. Keeps [`Checkpoints`] up to date as events are taken.
pub struct FanInSubscription {
    receiver: mpsc::Receiver<FanIn>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    checkpoints: Checkpoints,
}

impl FanInSubscription {
    /// Where each node is: store it to resume later with [`ShardedClient::subscribe`].
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }
}

impl Stream for FanInSubscription {
    type Item = FanIn;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<FanIn>> {
        let polled = self.receiver.poll_next_unpin(context);
        if let Poll::Ready(Some(FanIn::Event { node, id, .. })) = &polled {
            self.checkpoints.nodes[*node] = Some(*id);
        }
        polled
    }
}

impl Drop for FanInSubscription {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
