//! A typed async client for Refract's HTTP API.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use refract::client::{Client, NewEvent, ReadOptions};
//! use refract::store::ExpectedRevision;
//!
//! let client = Client::new("http://127.0.0.1:2113", None)?;
//! let event = NewEvent::json("OrderPlaced", serde_json::json!({"total": 42}));
//! client.append("order-1", ExpectedRevision::NoStream, &[event]).await?;
//! let page = client.read("order-1", &ReadOptions::default()).await?;
//! assert_eq!(page.events[0].event_type, "OrderPlaced");
//! # Ok(()) }
//! ```
//!
//! Given the nodes of a cluster (`"http://a:2113,http://b:2113,http://c:2113"`), the client
//! sends to one of them, follows a follower's `421` to the leader it names, and moves on to the
//! next node when one cannot be reached, for up to ten seconds (a failover). An append gets
//! event ids before it is sent, so sending it again after a lost answer appends it once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod partitioned;
mod sharded;

pub use crate::groups::settings::{Settings as GroupSettings, StartFrom, StartName, Strategy};
pub use crate::groups::{ConsumerInfo, Info as GroupInfo, NackAction};
pub use crate::projections::{DeployOptions, Emitted, Mode, OnError, ProjectionStatus};
use crate::store::ExpectedRevision;
pub use partitioned::PartitionConsumer;
pub use sharded::{
    Checkpoints, FanIn, FanInSubscription, ShardedClient, SharderSource, shard_input,
};

/// An error answer from the server, with the contract's code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// The whole error body, for fields such as `actual` on `wrong_expected_revision`.
    pub body: Value,
}

/// An event to append.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NewEvent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl NewEvent {
    pub fn json(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            event_type: event_type.into(),
            data: Some(data),
            ..NewEvent::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppendResult {
    pub first_revision: u64,
    pub last_revision: u64,
    pub first_position: u64,
    pub last_position: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Link {
    pub stream: String,
    pub revision: u64,
}

/// An event as read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub stream: String,
    pub revision: u64,
    pub position: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub data_base64: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    pub metadata: Value,
    pub created: String,
    #[serde(default)]
    pub link: Option<Link>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadPage {
    pub stream: String,
    pub events: Vec<Event>,
    pub last_revision: Option<u64>,
    pub next: Option<u64>,
}

/// Options of a read; `None` leaves the server's default.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub from: Option<u64>,
    pub backward: bool,
    pub limit: Option<usize>,
    pub resolve_links: Option<bool>,
    /// `$all` only: comma-separated prefixes.
    pub stream_prefix: Option<String>,
    pub type_prefix: Option<String>,
    pub include_system: bool,
    /// Only the events a stored sharder places on one shard.
    pub shard: Option<ShardSelector>,
}

/// Shard `shard` of `shards` as the stored sharder `sharder` places events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSelector {
    pub sharder: String,
    pub shards: u32,
    pub shard: u32,
}

impl ReadOptions {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(from) = self.from {
            query.push(("from", from.to_string()));
        }
        if self.backward {
            query.push(("direction", "backward".into()));
        }
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(resolve) = self.resolve_links {
            query.push(("resolve_links", resolve.to_string()));
        }
        if let Some(prefix) = &self.stream_prefix {
            query.push(("stream_prefix", prefix.clone()));
        }
        if let Some(prefix) = &self.type_prefix {
            query.push(("type_prefix", prefix.clone()));
        }
        if self.include_system {
            query.push(("include_system", "true".into()));
        }
        if let Some(shard) = &self.shard {
            query.push(("sharder", shard.sharder.clone()));
            query.push(("shards", shard.shards.to_string()));
            query.push(("shard", shard.shard.to_string()));
        }
        query
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeFrom {
    Start,
    End,
    /// This revision (or position for `$all`), inclusive.
    At(u64),
}

/// One message of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionMessage {
    /// An event and its id: the revision in the subscribed stream, or the position in `$all`.
    Event {
        id: u64,
        event: Box<Event>,
    },
    CaughtUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionCommand {
    Start,
    Stop,
    Reset,
    /// Build again beside the live version and switch when caught up.
    Rebuild,
}

/// Which rows of a table to list.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RowsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A page of keys (a projection's partitions).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KeysPage {
    pub partitions: Vec<String>,
    pub next: Option<String>,
}

fn emitted_name(emitted: Emitted) -> &'static str {
    match emitted {
        Emitted::Keep => "keep",
        Emitted::Replace => "replace",
    }
}

fn on_error_name(on_error: OnError) -> &'static str {
    match on_error {
        OnError::Stop => "stop",
        OnError::Skip => "skip",
        OnError::Park => "park",
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RowsPage {
    pub rows: Vec<Row>,
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Row {
    pub key: String,
    /// The row's JSON; `null` when it is not JSON (then see `value_base64`).
    #[serde(default)]
    pub value: Value,
    #[serde(default)]
    pub value_base64: Option<String>,
}

/// A message of a partitioned consumer group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionedMessage {
    pub partition: u32,
    /// What to commit for the partition once the message is processed.
    pub offset: u64,
    pub event: Event,
}

/// A pull's answer from a partitioned group: the consumer's generation and partitions, and its
/// messages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionedBatch {
    pub generation: u64,
    pub partitions: Vec<u32>,
    pub messages: Vec<PartitionedMessage>,
}

/// A message of a consumer group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupMessage {
    /// Acks or nacks this message.
    pub ack_id: String,
    /// How many times it was delivered before.
    pub retry_count: u32,
    pub event: Event,
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The nodes given, in order.
    nodes: Arc<Vec<Url>>,
    /// The node requests go to: the leader once a follower named it.
    current: Arc<Mutex<Url>>,
    token: Option<String>,
}

/// How long a request keeps looking for a leader, or a node that answers.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(10);
/// The pause before asking again while no node answers or no leader is known.
const FAILOVER_PAUSE: Duration = Duration::from_millis(100);
/// The header a follower names the leader in.
const LEADER_HEADER: &str = "refract-leader";

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:2113`), or for the nodes of a
    /// cluster, comma-separated.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for text in base.split(',').map(str::trim) {
            let url = Url::parse(text).with_context(|| format!("invalid server URL {text:?}"))?;
            if url.cannot_be_a_base() {
                anyhow::bail!("invalid server URL {url}");
            }
            nodes.push(url);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            current: Arc::new(Mutex::new(nodes[0].clone())),
            nodes: Arc::new(nodes),
            token,
        })
    }

    /// The node requests go to.
    pub fn base(&self) -> Url {
        self.current.lock().expect("the current node").clone()
    }

    fn set_base(&self, url: Url) {
        *self.current.lock().expect("the current node") = url;
    }

    /// The URL of `segments` below the base, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let request = self.http.request(method, self.url(segments));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder) -> anyhow::Result<reqwest::Response> {
        self.send_to_leader(request, false).await
    }

    /// Sends a request to the current node; follows a follower's `421` to the leader it names,
    /// and moves to the next node when one cannot be reached (or, for a request that is safe to
    /// repeat, when its answer was lost), until [`FAILOVER_PATIENCE`] is over.
    async fn send_to_leader(
        &self,
        request: RequestBuilder,
        repeatable: bool,
    ) -> anyhow::Result<reqwest::Response> {
        let request = request.build().context("cannot build the request")?;
        let give_up = Instant::now() + FAILOVER_PATIENCE;
        let mut hops = 0;
        loop {
            let base = self.base();
            let Some(mut attempt) = request.try_clone() else {
                // A streamed body goes once.
                let mut request = request;
                point_at(request.url_mut(), &base);
                let response = self.http.execute(request).await.map_err(|error| {
                    anyhow::anyhow!("cannot reach {base}: {}", with_causes(&error))
                })?;
                return self.answer(response).await;
            };
            point_at(attempt.url_mut(), &base);
            let patient = Instant::now() < give_up;
            match self.http.execute(attempt).await {
                Ok(response) if response.status() == StatusCode::MISDIRECTED_REQUEST && patient => {
                    let leader = response
                        .headers()
                        .get(LEADER_HEADER)
                        .and_then(|leader| leader.to_str().ok())
                        .and_then(|leader| Url::parse(leader).ok());
                    hops += 1;
                    match leader {
                        // Nodes naming each other in turn are in the middle of a change.
                        Some(leader) if leader != base && hops <= self.nodes.len() => {
                            self.set_base(leader)
                        }
                        Some(leader) if leader != base => {
                            self.set_base(leader);
                            tokio::time::sleep(FAILOVER_PAUSE).await;
                        }
                        // An election is on: ask again shortly.
                        _ => tokio::time::sleep(FAILOVER_PAUSE).await,
                    }
                }
                Ok(response) => return self.answer(response).await,
                Err(error) if patient && (error.is_connect() || repeatable) => {
                    let next = self
                        .nodes
                        .iter()
                        .position(|node| *node == base)
                        .map_or(0, |at| (at + 1) % self.nodes.len());
                    self.set_base(self.nodes[next].clone());
                    tokio::time::sleep(FAILOVER_PAUSE).await;
                }
                Err(error) => {
                    return Err(anyhow::anyhow!(
                        "cannot reach {base}: {}",
                        with_causes(&error)
                    ));
                }
            }
        }
    }

    async fn answer(&self, response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let text = |field: &str| body.get(field).and_then(Value::as_str).map(str::to_owned);
        Err(ApiFailure {
            status: status.as_u16(),
            code: text("error").unwrap_or_else(|| "unknown".into()),
            message: text("message")
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned()),
            body,
        }
        .into())
    }

    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: &[NewEvent],
    ) -> anyhow::Result<AppendResult> {
        // Ids chosen here make sending again after a lost answer safe: the store takes an
        // event id once.
        let events: Vec<NewEvent> = events
            .iter()
            .map(|event| NewEvent {
                id: Some(
                    event
                        .id
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                ),
                ..event.clone()
            })
            .collect();
        let request = self
            .request(Method::POST, &["streams", stream])
            .header("expected-revision", expected.to_string())
            .json(&events);
        Ok(self.send_to_leader(request, true).await?.json().await?)
    }

    pub async fn read(&self, stream: &str, options: &ReadOptions) -> anyhow::Result<ReadPage> {
        let request = self
            .request(Method::GET, &["streams", stream])
            .query(&options.query());
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn delete(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        hard: bool,
    ) -> anyhow::Result<()> {
        let request = self
            .request(Method::DELETE, &["streams", stream])
            .header("expected-revision", expected.to_string())
            .query(&[("hard", hard)]);
        self.send(request).await?;
        Ok(())
    }

    /// Catch-up then live events of a stream or of `$all` (filters from `options`).
    pub async fn subscribe(
        &self,
        stream: &str,
        from: SubscribeFrom,
        options: &ReadOptions,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<SubscriptionMessage>> + use<>> {
        let from = match from {
            SubscribeFrom::Start => "start".to_owned(),
            SubscribeFrom::End => "end".to_owned(),
            SubscribeFrom::At(at) => at.to_string(),
        };
        let mut query = options.query();
        query.retain(|(name, _)| !matches!(*name, "from" | "direction" | "limit"));
        query.push(("from", from));
        let request = self
            .request(Method::GET, &["streams", stream, "subscribe"])
            .query(&query);
        let response = self.send(request).await?;
        Ok(response
            .bytes_stream()
            .eventsource()
            .filter_map(|message| async move {
                let message = match message {
                    Ok(message) => message,
                    Err(error) => return Some(Err(anyhow::anyhow!("subscription broke: {error}"))),
                };
                match message.event.as_str() {
                    "event" => Some(parse_event_message(&message.id, &message.data)),
                    "caught_up" => Some(Ok(SubscriptionMessage::CaughtUp)),
                    "error" => Some(Err(anyhow::anyhow!("subscription ended: {}", message.data))),
                    _ => None,
                }
            }))
    }

    /// Every projection's status.
    pub async fn projections(&self) -> anyhow::Result<Vec<ProjectionStatus>> {
        let request = self.request(Method::GET, &["projections"]);
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn projection(&self, name: &str) -> anyhow::Result<ProjectionStatus> {
        let request = self.request(Method::GET, &["projections", name]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Starts, stops or resets a projection.
    pub async fn projection_command(
        &self,
        name: &str,
        command: ProjectionCommand,
    ) -> anyhow::Result<ProjectionStatus> {
        let command = match command {
            ProjectionCommand::Start => "start",
            ProjectionCommand::Stop => "stop",
            ProjectionCommand::Reset => "reset",
            ProjectionCommand::Rebuild => "rebuild",
        };
        let request = self.request(Method::POST, &["projections", name, command]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Builds projection `name` again beside its live version; `emitted` says what the switch
    /// does with the streams the live version emitted to.
    pub async fn rebuild(&self, name: &str, emitted: Emitted) -> anyhow::Result<ProjectionStatus> {
        let request = self
            .request(Method::POST, &["projections", name, "rebuild"])
            .query(&[("emitted", emitted_name(emitted))]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Sets aside the event a faulted projection stopped at (`position`) and runs on past it.
    pub async fn skip(&self, name: &str, position: u64) -> anyhow::Result<ProjectionStatus> {
        let request = self
            .request(Method::POST, &["projections", name, "skip"])
            .query(&[("position", position)]);
        Ok(self.send(request).await?.json().await?)
    }

    /// A page of a projection's partitions that have a state, in key order.
    pub async fn partitions(&self, name: &str, query: &RowsQuery) -> anyhow::Result<KeysPage> {
        let request = self
            .request(Method::GET, &["projections", name, "partitions"])
            .query(query);
        Ok(self.send(request).await?.json().await?)
    }

    /// The events a projection set aside, with why, from revision `from` of its parked stream.
    pub async fn projection_parked(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let request = self
            .request(Method::GET, &["projections", name, "parked"])
            .query(&[("from", from), ("limit", limit as u64)]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Drops a rebuild in progress; the live version carries on.
    pub async fn cancel_rebuild(&self, name: &str) -> anyhow::Result<ProjectionStatus> {
        let request = self.request(Method::DELETE, &["projections", name, "rebuild"]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Deploys a WebAssembly component as projection `name`. Returns whether it is new.
    pub async fn deploy(
        &self,
        name: &str,
        component: Vec<u8>,
        options: &DeployOptions,
    ) -> anyhow::Result<(bool, ProjectionStatus)> {
        let mode = match options.mode {
            Mode::Continuous => "continuous",
            Mode::OneTime => "one_time",
        };
        let request = self
            .request(Method::PUT, &["projections", name])
            .query(&[
                ("mode", mode),
                ("emit", &options.emit.to_string()),
                ("enabled", &options.enabled.to_string()),
                ("rebuild", &options.rebuild.to_string()),
                ("emitted", emitted_name(options.emitted)),
                ("on_error", on_error_name(options.on_error)),
            ])
            .header("content-type", "application/wasm")
            .body(component);
        let response = self.send(request).await?;
        let created = response.status() == StatusCode::CREATED;
        Ok((created, response.json().await?))
    }

    /// Deletes a projection; with `delete_emitted` also the streams it emitted to.
    pub async fn delete_projection(&self, name: &str, delete_emitted: bool) -> anyhow::Result<()> {
        let request = self
            .request(Method::DELETE, &["projections", name])
            .query(&[("delete_emitted", delete_emitted)]);
        self.send(request).await?;
        Ok(())
    }

    /// A partition's state (`None`: the unpartitioned state).
    pub async fn projection_state(
        &self,
        name: &str,
        partition: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut request = self.request(Method::GET, &["projections", name, "state"]);
        if let Some(partition) = partition {
            request = request.query(&[("partition", partition)]);
        }
        Ok(self.send(request).await?.json().await?)
    }

    /// One row of a projection's table.
    pub async fn table_row(&self, name: &str, table: &str, key: &str) -> anyhow::Result<Value> {
        let request = self.request(Method::GET, &["projections", name, "tables", table, key]);
        Ok(self.send(request).await?.json().await?)
    }

    /// A page of a projection's table, in key order.
    pub async fn table_rows(
        &self,
        name: &str,
        table: &str,
        query: &RowsQuery,
    ) -> anyhow::Result<RowsPage> {
        let request = self
            .request(Method::GET, &["projections", name, "tables", table])
            .query(query);
        Ok(self.send(request).await?.json().await?)
    }

    /// Uploads a sharder component under `name`; returns its sha256.
    pub async fn deploy_sharder(&self, name: &str, component: Vec<u8>) -> anyhow::Result<String> {
        let request = self
            .request(Method::PUT, &["sharders", name])
            .header("content-type", "application/wasm")
            .body(component);
        let info: Value = self.send(request).await?.json().await?;
        Ok(info["wasm_sha256"].as_str().unwrap_or_default().to_owned())
    }

    /// A sharder's component bytes.
    pub async fn sharder_component(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let request = self.request(Method::GET, &["sharders", name]);
        Ok(self.send(request).await?.bytes().await?.to_vec())
    }

    /// The server's shard of each event (`{"stream", "type", "data", "metadata"}` items).
    pub async fn shard(
        &self,
        name: &str,
        events: &[Value],
        shards: u32,
    ) -> anyhow::Result<Vec<u32>> {
        let request = self
            .request(Method::POST, &["sharders", name, "shard"])
            .query(&[("shards", shards)])
            .json(events);
        Ok(self.send(request).await?.json().await?)
    }

    /// Every sharder: `{"name", "wasm_sha256"}`.
    pub async fn sharders(&self) -> anyhow::Result<Vec<Value>> {
        let request = self.request(Method::GET, &["sharders"]);
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn delete_sharder(&self, name: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, &["sharders", name]))
            .await?;
        Ok(())
    }

    /// Creates a consumer group (`true`) or replaces its settings, keeping its checkpoint.
    pub async fn put_group(
        &self,
        stream: &str,
        group: &str,
        settings: &GroupSettings,
    ) -> anyhow::Result<(bool, GroupInfo)> {
        let request = self
            .request(Method::PUT, &["groups", stream, group])
            .json(settings);
        let response = self.send(request).await?;
        let created = response.status() == StatusCode::CREATED;
        Ok((created, response.json().await?))
    }

    pub async fn delete_group(&self, stream: &str, group: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, &["groups", stream, group]))
            .await?;
        Ok(())
    }

    /// Creates (`true`) or replaces a connector from its JSON definition; answers its status.
    pub async fn put_connector(
        &self,
        name: &str,
        definition: &serde_json::Value,
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        let request = self
            .request(Method::PUT, &["connectors", name])
            .json(definition);
        let response = self.send(request).await?;
        let created = response.status() == StatusCode::CREATED;
        Ok((created, response.json().await?))
    }

    /// Every connector with its status.
    pub async fn connectors(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let request = self.request(Method::GET, &["connectors"]);
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn connector(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let request = self.request(Method::GET, &["connectors", name]);
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn delete_connector(&self, name: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, &["connectors", name]))
            .await?;
        Ok(())
    }

    /// `start`, `stop` or `reset` a connector; answers its status.
    pub async fn connector_action(
        &self,
        name: &str,
        action: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let request = self.request(Method::POST, &["connectors", name, action]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Every group with its statistics.
    pub async fn groups(&self) -> anyhow::Result<Vec<GroupInfo>> {
        let request = self.request(Method::GET, &["groups"]);
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn group(&self, stream: &str, group: &str) -> anyhow::Result<GroupInfo> {
        let request = self.request(Method::GET, &["groups", stream, group]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Up to `max` messages for `consumer`, waiting up to `wait` when none is ready.
    pub async fn pull(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<GroupMessage>> {
        #[derive(Deserialize)]
        struct Messages {
            messages: Vec<GroupMessage>,
        }
        let request = self
            .request(Method::POST, &["groups", stream, group, "pull"])
            .query(&[
                ("consumer", consumer.to_owned()),
                ("max", max.to_string()),
                ("wait_ms", wait.as_millis().to_string()),
            ]);
        let messages: Messages = self.send(request).await?.json().await?;
        Ok(messages.messages)
    }

    /// Up to `max` messages of a partitioned group for `consumer`, with its partitions.
    /// `generation` is the one the consumer last learned; without it, a consumer the group
    /// knows starts again from its partitions' committed offsets.
    pub async fn pull_partitioned(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        generation: Option<u64>,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<PartitionedBatch> {
        let mut query = vec![
            ("consumer", consumer.to_owned()),
            ("max", max.to_string()),
            ("wait_ms", wait.as_millis().to_string()),
        ];
        if let Some(generation) = generation {
            query.push(("generation", generation.to_string()));
        }
        let request = self
            .request(Method::POST, &["groups", stream, group, "pull"])
            .query(&query);
        let body = self.send(request).await?.bytes().await?;
        serde_json::from_slice(&body).context("not a partitioned group's answer")
    }

    /// Commits offsets of a partitioned group (cumulative per partition); answered once durable.
    /// A generation that is over is refused with `409 stale_generation`.
    pub async fn commit(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        generation: u64,
        offsets: &BTreeMap<u32, u64>,
    ) -> anyhow::Result<()> {
        let offsets: BTreeMap<String, u64> = offsets
            .iter()
            .map(|(partition, offset)| (partition.to_string(), *offset))
            .collect();
        let request = self
            .request(Method::POST, &["groups", stream, group, "commit"])
            .query(&[("consumer", consumer)])
            .json(&serde_json::json!({ "generation": generation, "offsets": offsets }));
        self.send(request).await?;
        Ok(())
    }

    pub async fn ack(&self, stream: &str, group: &str, ack_ids: &[String]) -> anyhow::Result<()> {
        let request = self
            .request(Method::POST, &["groups", stream, group, "ack"])
            .json(&serde_json::json!({ "ack_ids": ack_ids }));
        self.send(request).await?;
        Ok(())
    }

    pub async fn nack(
        &self,
        stream: &str,
        group: &str,
        ack_ids: &[String],
        action: NackAction,
        reason: &str,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({ "ack_ids": ack_ids, "action": action, "reason": reason });
        let request = self
            .request(Method::POST, &["groups", stream, group, "nack"])
            .json(&body);
        self.send(request).await?;
        Ok(())
    }

    /// Delivers parked messages again (the first `stop_at`); returns how many.
    pub async fn replay_parked(
        &self,
        stream: &str,
        group: &str,
        stop_at: Option<u64>,
    ) -> anyhow::Result<u64> {
        let mut request = self.request(Method::POST, &["groups", stream, group, "replay-parked"]);
        if let Some(stop_at) = stop_at {
            request = request.query(&[("stop_at", stop_at)]);
        }
        let body: Value = self.send(request).await?.json().await?;
        Ok(body["replaying"].as_u64().unwrap_or(0))
    }

    /// Push delivery: the group's messages for `consumer`, at most `buffer` unacked at a time.
    /// Dropping the stream leaves the group.
    pub async fn group_subscribe(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        buffer: usize,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<GroupMessage>> + use<>> {
        let request = self
            .request(Method::GET, &["groups", stream, group, "subscribe"])
            .query(&[
                ("consumer", consumer.to_owned()),
                ("buffer", buffer.to_string()),
            ]);
        let response = self.send(request).await?;
        Ok(response
            .bytes_stream()
            .eventsource()
            .filter_map(|message| async move {
                match message {
                    Ok(message) if message.event == "message" => {
                        Some(serde_json::from_str(&message.data).context("bad group message JSON"))
                    }
                    Ok(_) => None,
                    Err(error) => Some(Err(anyhow::anyhow!("subscription broke: {error}"))),
                }
            }))
    }

    /// The cluster as the node asked sees it (`GET /cluster`).
    pub async fn cluster(&self) -> anyhow::Result<Value> {
        let request = self.request(Method::GET, &["cluster"]);
        Ok(self.send(request).await?.json().await?)
    }

    /// Adds a node as a learner; answers once it caught up, with the cluster's status.
    pub async fn add_learner(&self, id: u64, url: &str) -> anyhow::Result<Value> {
        let request = self
            .request(Method::POST, &["cluster", "learners"])
            .json(&serde_json::json!({"id": id, "url": url}));
        Ok(self.send(request).await?.json().await?)
    }

    /// Sets the cluster's voters.
    pub async fn set_voters(&self, ids: &[u64]) -> anyhow::Result<Value> {
        let request = self
            .request(Method::POST, &["cluster", "voters"])
            .json(&serde_json::json!({"ids": ids}));
        Ok(self.send(request).await?.json().await?)
    }

    /// Takes a node out of the cluster.
    pub async fn remove_member(&self, id: u64) -> anyhow::Result<Value> {
        let request = self.request(Method::DELETE, &["cluster", "members", &id.to_string()]);
        Ok(self.send(request).await?.json().await?)
    }

    /// `true` when the server answers `/health`.
    pub async fn healthy(&self) -> bool {
        let request = self.request(Method::GET, &["health"]);
        matches!(request.send().await, Ok(response) if response.status() == StatusCode::OK)
    }
}

fn parse_event_message(id: &str, data: &str) -> anyhow::Result<SubscriptionMessage> {
    let id = id.parse().with_context(|| format!("bad event id {id:?}"))?;
    let event = serde_json::from_str(data).context("bad event JSON")?;
    Ok(SubscriptionMessage::Event {
        id,
        event: Box::new(event),
    })
}

/// Sends `url` to the node at `base`, keeping its path and query.
fn point_at(url: &mut Url, base: &Url) {
    let _ = url.set_scheme(base.scheme());
    let _ = url.set_host(base.host_str());
    let _ = url.set_port(base.port());
}

/// reqwest's own message hides the cause ("connection refused"); spell out the chain.
fn with_causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
