//! The `refract` command line: the server, client commands for a running server, and benchmarks.

mod cluster;
mod connectors;
mod groups;
mod rebuild;
mod sharding;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use axum::http::HeaderValue;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;

use crate::client::{
    self, AppendResult, Client, DeployOptions, Emitted, Event, Mode, NewEvent, OnError,
    ReadOptions, RowsQuery, ShardSelector, SubscribeFrom, SubscriptionMessage,
};
use crate::http::tls::TlsFiles;
use crate::http::{ServeConfig, Tokens};
use crate::sandbox::Sandbox;
use crate::store::{CategoryPosition, IndexConfig};
use crate::store::{ExpectedRevision, StoreOptions, default_cache_bytes};

#[derive(Debug, Parser)]
#[command(
    name = "refract",
    version,
    about = "An event store with durable streams, projections and consumer groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Append events to a stream: one from the flags, or JSON lines (one event each) on stdin.
    Append(AppendArgs),
    /// Read a stream or `$all`; with --follow, keep printing live events.
    Read(ReadArgs),
    /// Delete a stream (soft by default; --hard tombstones it for good).
    Delete(DeleteArgs),
    /// List, inspect and control projections.
    #[command(subcommand)]
    Projection(ProjectionCommand),
    /// Upload, evaluate and delete sharding functions.
    #[command(subcommand)]
    Sharder(sharding::SharderCommand),
    /// Consumer groups: create, inspect, replay parked messages, consume.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// Kafka sinks and sources: define, inspect, start, stop, reset, delete.
    #[command(subcommand)]
    Connector(connectors::ConnectorCommand),
    /// A cluster's members: status, add a learner, set the voters, remove a node.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Run the benchmarks: the `refract-bench` binary beside this one or on the PATH (build it
    /// with `cargo build --release -p refract-bench`); `refract bench --help` lists its options.
    #[command(disable_help_flag = true)]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Data directory (created when missing).
    #[arg(long, env = "REFRACT_DATA", default_value = "./refract-data")]
    data: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "REFRACT_LISTEN", default_value = "127.0.0.1:2113")]
    listen: SocketAddr,
    /// A bearer token as ROLE:TOKEN (roles: reader, writer, admin); repeatable.
    #[arg(long = "token", value_name = "ROLE:TOKEN")]
    tokens: Vec<String>,
    /// A file of ROLE:TOKEN lines.
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// Answer writes before the log is synced (faster; a power failure loses the writes since
    /// the last checkpoint, at most half a second; the store stays consistent).
    #[arg(long)]
    no_fsync: bool,
    /// Keep restarts after a crash fast (milliseconds instead of a walk over the whole
    /// database file) at the cost of a second fsync per checkpoint; `--quick-repair=false`
    /// turns it off.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    quick_repair: bool,
    /// Memory for the database's page cache, in MiB (default: a quarter of the machine's).
    #[arg(long)]
    cache_mib: Option<usize>,
    /// System projections: the separator between a stream's category and the rest of its name.
    /// Giving any of the three index options sets all three (defaults for the others); a change
    /// resets the projections it affects.
    #[arg(long, value_name = "TEXT")]
    category_separator: Option<String>,
    /// System projections: cut the category at the first or the last separator.
    #[arg(long, value_name = "first|last")]
    category_position: Option<CategoryPosition>,
    /// System projections: the metadata property holding the correlation id.
    #[arg(long, value_name = "NAME")]
    correlation_property: Option<String>,
    /// Most events a system projection catches up on per commit.
    #[arg(long, default_value_t = 100_000, hide = true)]
    index_batch: u64,
    /// Seconds between the comment lines that keep idle subscriptions alive through proxies.
    #[arg(long, default_value_t = 15)]
    sse_heartbeat_seconds: u64,
    /// Memory limit of each Wasm projection instance, in MiB.
    #[arg(long, default_value_t = 256)]
    guest_memory_mib: usize,
    /// Longest a Wasm projection may run on one call (a batch of up to 2048 events), in
    /// milliseconds; past it the projection faults.
    #[arg(long, default_value_t = 10_000)]
    guest_timeout_ms: u64,
    /// Instances (each on a thread) that run the partitions of a partitioned Wasm projection side
    /// by side while it catches up or rebuilds; 1 runs every batch in log order. Default: half
    /// the cores, as reading ahead and committing keep the other half busy.
    #[arg(long, value_name = "N")]
    projection_workers: Option<usize>,
    /// A web origin (`https://app.example.com`) whose pages may call the API from a browser:
    /// CORS on every route, Server-Sent Events included; repeatable. None by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN", value_parser = parse_origin)]
    cors_origins: Vec<HeaderValue>,
    /// Serve HTTPS, and EventStoreDB's gRPC API over TLS, with this certificate chain (PEM);
    /// needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "node_id"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Run as a node of a cluster, with this id (unique in the cluster, never reused). Without
    /// it the server is a single node.
    #[arg(long, value_name = "ID")]
    node_id: Option<u64>,
    /// Another voter of the cluster, as ID=HOST:PORT (the address its --listen gives);
    /// repeatable. Nodes started with the same voters form the cluster by themselves.
    #[arg(long = "peer", value_name = "ID=HOST:PORT", value_parser = parse_peer, requires = "node_id")]
    peers: Vec<(u64, String)>,
    /// Reach another node through this address (a proxy or tunnel in between) instead of the
    /// URL the cluster knows it by, as ID=HOST:PORT; repeatable. Its members stay as they are.
    #[arg(long = "peer-via", value_name = "ID=HOST:PORT", value_parser = parse_peer, requires = "node_id")]
    peer_via: Vec<(u64, String)>,
    /// Join an existing cluster as a learner (a read replica): any of its nodes' URLs. Promote
    /// it to a voter with `refract cluster voters`.
    #[arg(
        long,
        value_name = "URL",
        requires = "node_id",
        conflicts_with = "peers"
    )]
    join: Option<String>,
    /// The URL the other nodes (and clients sent here) reach this node at; what the others give
    /// in --peer. Default: http:// and the --listen address.
    #[arg(long, value_name = "URL", requires = "node_id")]
    advertise_url: Option<String>,
    /// Raft log entries between snapshots (after one, the log before it can go).
    #[arg(long, default_value_t = 20_000, hide = true)]
    snapshot_every: u64,
    /// Raft log entries kept behind a snapshot, for followers a little behind.
    #[arg(long, default_value_t = 2_000, hide = true)]
    log_keep: u64,
    /// A secret every node of the cluster is started with: Raft's messages without it are
    /// refused. Without one, nodes take messages from loopback only.
    #[arg(
        long,
        env = "REFRACT_CLUSTER_SECRET",
        value_name = "SECRET",
        requires = "node_id"
    )]
    cluster_secret: Option<String>,
    /// On a follower, pass writes (and whatever else only the leader answers) on to the leader
    /// and relay its answer, instead of answering 421 with the leader's URL.
    #[arg(long, requires = "node_id")]
    forward_writes: bool,
}

/// A peer as `ID=HOST:PORT`.
fn parse_peer(text: &str) -> Result<(u64, String), String> {
    let (id, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not a peer: give it as ID=HOST:PORT"))?;
    let id = id
        .parse::<u64>()
        .map_err(|_| format!("{id:?} is not a node id (a number)"))?;
    let port = address
        .rsplit_once(':')
        .map(|(_, port)| port.parse::<u16>());
    if !matches!(port, Some(Ok(_))) || address.contains('/') {
        return Err(format!(
            "{address:?} is not an address: give it as HOST:PORT"
        ));
    }
    Ok((id, address.to_owned()))
}

/// An origin as browsers send it: scheme, host and optional port, no path.
fn parse_origin(text: &str) -> Result<HeaderValue, String> {
    let uri: axum::http::Uri = text
        .parse()
        .map_err(|error| format!("{text:?} is not an origin: {error}"))?;
    let plain_path = uri.path_and_query().is_none_or(|path| path.as_str() == "/");
    if uri.scheme().is_none() || uri.host().is_none() || !plain_path || text.ends_with('/') {
        return Err(format!(
            "{text:?} is not an origin: give scheme and host (and port), as https://app.example.com"
        ));
    }
    HeaderValue::from_str(text).map_err(|error| error.to_string())
}

impl ServeArgs {
    fn index_config(&self) -> Option<IndexConfig> {
        if self.category_separator.is_none()
            && self.category_position.is_none()
            && self.correlation_property.is_none()
        {
            return None;
        }
        let defaults = IndexConfig::default();
        Some(IndexConfig {
            category_separator: self
                .category_separator
                .clone()
                .unwrap_or(defaults.category_separator),
            category_position: self.category_position.unwrap_or(defaults.category_position),
            correlation_property: self
                .correlation_property
                .clone()
                .unwrap_or(defaults.correlation_property),
        })
    }
}

/// Options of every client command.
#[derive(Debug, Args)]
struct ClientArgs {
    /// The server to talk to; for a cluster, any of its nodes, comma-separated (writes find
    /// the leader, and move to another node when one is down).
    #[arg(
        long,
        env = "REFRACT_SERVER",
        default_value = "http://127.0.0.1:2113",
        global = true
    )]
    server: String,
    /// Bearer token.
    #[arg(long, env = "REFRACT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
struct AppendArgs {
    /// The stream to append to.
    stream: String,
    /// Event type; without it, events are read as JSON lines from stdin.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// Event data as JSON.
    #[arg(long, requires = "event_type")]
    data: Option<String>,
    /// Event metadata as a JSON object.
    #[arg(long, requires = "event_type")]
    metadata: Option<String>,
    /// Event id (a UUID); generated when absent.
    #[arg(long, requires = "event_type")]
    id: Option<String>,
    /// any, no_stream, stream_exists or a revision.
    #[arg(long, default_value = "any")]
    expected_revision: ExpectedRevision,
    #[command(flatten)]
    sharding: sharding::ShardingArgs,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct ReadArgs {
    /// A stream name, or `$all`.
    stream: String,
    /// First revision (position for `$all`) to read.
    #[arg(long)]
    from: Option<u64>,
    /// Read from the end towards the start.
    #[arg(long, conflicts_with = "follow")]
    backward: bool,
    /// Most events to print (default: all).
    #[arg(long)]
    limit: Option<usize>,
    /// After the history, keep printing events as they are written.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Print links as links instead of the events they point at.
    #[arg(long)]
    no_resolve_links: bool,
    /// `$all` only: comma-separated stream name prefixes.
    #[arg(long)]
    stream_prefix: Option<String>,
    /// `$all` only: comma-separated event type prefixes.
    #[arg(long)]
    type_prefix: Option<String>,
    /// `$all` only: include events of `$`-streams.
    #[arg(long)]
    include_system: bool,
    /// `K/N`: only the events the server's sharder (`--sharder NAME`) places on shard K of N,
    /// in order (Kafka's partition K of N, over any stream).
    #[arg(long, requires = "sharder", conflicts_with = "nodes", value_parser = parse_shard)]
    shard: Option<(u32, u32)>,
    #[command(flatten)]
    sharding: sharding::ShardingArgs,
    #[command(flatten)]
    client: ClientArgs,
}

/// `K/N` → (K, N).
fn parse_shard(text: &str) -> Result<(u32, u32), String> {
    let (shard, shards) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not K/N (shard K of N, such as 2/8)"))?;
    let shard: u32 = shard
        .parse()
        .map_err(|_| format!("{shard:?} is not a shard number"))?;
    let shards: u32 = shards
        .parse()
        .map_err(|_| format!("{shards:?} is not a shard count"))?;
    if shard >= shards {
        return Err(format!(
            "shard {shard} is not among 0 to {}",
            shards.max(1) - 1
        ));
    }
    Ok((shard, shards))
}

#[derive(Debug, Args)]
struct DeleteArgs {
    /// The stream to delete.
    stream: String,
    /// Tombstone: reads and appends fail for good.
    #[arg(long)]
    hard: bool,
    /// any, no_stream, stream_exists or a revision: delete only if the stream is there.
    #[arg(long, default_value = "any")]
    expected_revision: ExpectedRevision,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum ProjectionCommand {
    /// Every projection with its status and progress.
    List(ProjectionListArgs),
    /// One projection's status.
    Status(ProjectionArgs),
    /// Start a projection: it catches up from where it stopped.
    Start(ProjectionArgs),
    /// Stop a projection.
    Stop(ProjectionArgs),
    /// Drop a projection's output and reprocess from position 0.
    Reset(ProjectionArgs),
    /// Build a projection again beside its live version, which serves until the rebuilt one
    /// has caught up and takes over.
    Rebuild(RebuildArgs),
    /// Deploy a WebAssembly component (built for wasm32-wasip2) as a projection.
    Deploy(DeployArgs),
    /// Print a projection's state: one partition's with --partition, else its partitions (or the
    /// one state of an unpartitioned projection).
    State(StateArgs),
    /// Set aside the event a faulted projection stopped at, and run on past it.
    Skip(SkipArgs),
    /// List the events a projection set aside (`--on-error skip|park`, or `skip`), with why.
    Parked(ParkedArgs),
    /// Print rows of a projection's read-model table: one by key, or a page in key order.
    Table(TableArgs),
    /// Delete a projection with its state and tables.
    Delete(DeleteProjectionArgs),
}

#[derive(Debug, Args)]
struct DeployArgs {
    /// The projection's name.
    name: String,
    /// The component file (`.wasm`).
    file: PathBuf,
    /// Allow the projection to emit events.
    #[arg(long)]
    emit: bool,
    /// `continuous`, or `one_time` to stop as completed at the head.
    #[arg(long, value_enum, default_value = "continuous")]
    mode: Mode,
    /// Deploy without starting it.
    #[arg(long)]
    disabled: bool,
    /// For an existing projection: keep its data and continue from its checkpoint with the new
    /// code instead of rebuilding from position 0 beside the live version.
    #[arg(long)]
    keep_data: bool,
    /// Return once the rebuild an update starts is under way, instead of when it took over.
    #[arg(long)]
    no_wait: bool,
    /// What the switch to the new version does with the streams the live version emitted to:
    /// `keep` them (nothing sent is sent again; the new version emits past the switch) or
    /// `replace` them with what the new version emits from position 0.
    #[arg(long, value_enum, default_value = "keep")]
    emitted: Emitted,
    /// An event the projection cannot handle: `stop` at it, `skip` it, or `park` it and hold
    /// its partition (skipped and parked events are listed by `refract projection parked`).
    #[arg(long, value_enum, default_value = "stop")]
    on_error: OnError,
    /// Replace emitted streams without asking.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct RebuildArgs {
    /// The projection's name.
    name: String,
    /// Wait (with a progress bar) until the rebuilt version has taken over.
    #[arg(long)]
    wait: bool,
    /// Cancel the rebuild in progress instead.
    #[arg(long, conflicts_with = "wait")]
    cancel: bool,
    /// What the switch does with the streams the live version emitted to (see `deploy`).
    #[arg(long, value_enum, default_value = "keep")]
    emitted: Emitted,
    /// Replace emitted streams without asking.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct StateArgs {
    /// The projection's name.
    name: String,
    /// The partition (for a projection partitioned by stream: the stream name).
    #[arg(long)]
    partition: Option<String>,
    /// Without --partition: only partitions whose key starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Without --partition: start after this key.
    #[arg(long)]
    after: Option<String>,
    /// Without --partition: partitions per page.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct SkipArgs {
    /// The projection's name.
    name: String,
    /// The position it stopped at (its fault's).
    #[arg(long)]
    position: u64,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct ParkedArgs {
    /// The projection's name.
    name: String,
    /// First revision of the parked stream to list.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Events to list.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct TableArgs {
    /// The projection's name.
    name: String,
    /// The table's name.
    table: String,
    /// One row's key; without it, a page of rows.
    key: Option<String>,
    /// Only keys starting with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Start after this key.
    #[arg(long)]
    after: Option<String>,
    /// Rows per page.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct DeleteProjectionArgs {
    /// The projection's name.
    name: String,
    /// Also delete the streams it emitted to and its streams of links.
    #[arg(long)]
    delete_emitted: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct ProjectionListArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct ProjectionArgs {
    /// The projection's name, e.g. `$by_category`.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// Pretty JSON for people, one line with `--json`.
fn render_json(value: &serde_json::Value, one_line: bool) -> anyhow::Result<String> {
    Ok(if one_line {
        serde_json::to_string(value)?
    } else {
        serde_json::to_string_pretty(value)?
    })
}

/// Runs the command line and turns any error into a one-line message and a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Work still blocked on the runtime (a projection waiting for events when a command
    // failed) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn one_line(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Append(args) => append(args).await,
        Command::Read(args) => read(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Projection(command) => projection(command).await,
        Command::Sharder(command) => sharding::sharder(command).await,
        Command::Group(command) => groups::group(command).await,
        Command::Connector(command) => connectors::connector(command).await,
        Command::Cluster(command) => cluster::cluster(command).await,
        Command::Bench(args) => bench(args),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // openraft narrates every election and vote at info; its warnings are what matter.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    // Colours only for a person at a terminal, not in a log file.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let mut tokens = Tokens::default();
    for spec in &args.tokens {
        tokens
            .add(spec)
            .map_err(anyhow::Error::msg)
            .context("--token")?;
    }
    if let Some(file) = &args.tokens_file {
        tokens.add_file(file).map_err(anyhow::Error::msg)?;
    }
    let index_config = args.index_config();
    let config = ServeConfig {
        data_dir: args.data,
        listen: args.listen,
        tokens,
        store: StoreOptions {
            durable: !args.no_fsync,
            cache_bytes: args
                .cache_mib
                .map_or_else(default_cache_bytes, |mib| mib << 20),
            quick_repair: args.quick_repair,
            index_batch: args.index_batch,
            index_config,
            ..StoreOptions::default()
        },
        sse_heartbeat: std::time::Duration::from_secs(args.sse_heartbeat_seconds.max(1)),
        sandbox: Sandbox {
            memory_bytes: args.guest_memory_mib.max(1) << 20,
            call_timeout: std::time::Duration::from_millis(args.guest_timeout_ms.max(10)),
        },
        partition_workers: args
            .projection_workers
            .unwrap_or_else(default_partition_workers),
        cors_origins: args.cors_origins,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(certificate), Some(key)) => Some(TlsFiles { certificate, key }),
            _ => None,
        },
        cluster: match args.node_id {
            None => None,
            Some(node_id) => {
                let mut peers = std::collections::BTreeMap::new();
                for (id, address) in args.peers {
                    if id == node_id {
                        anyhow::bail!("--peer {id}={address} names this node (--node-id {id})");
                    }
                    if peers.insert(id, address).is_some() {
                        anyhow::bail!("--peer {id} is given twice");
                    }
                }
                let mut routes = std::collections::BTreeMap::new();
                for (id, address) in args.peer_via {
                    if routes.insert(id, address).is_some() {
                        anyhow::bail!("--peer-via {id} is given twice");
                    }
                }
                Some(crate::http::ClusterOptions {
                    node_id,
                    peers,
                    routes,
                    join: args.join,
                    advertise_url: args.advertise_url,
                    snapshots: crate::cluster::node::SnapshotTuning {
                        every: args.snapshot_every.max(1),
                        keep: args.log_keep,
                    },
                    secret: args.cluster_secret,
                    forward_writes: args.forward_writes,
                })
            }
        },
    };
    crate::http::serve(config).await
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Passed to `refract-bench`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Runs `refract-bench`, which is a binary of its own so the product does not carry the
/// benchmarks' dependencies.
fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let name = format!("refract-bench{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(&name))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(&name));
    let status = std::process::Command::new(&program)
        .args(&args.args)
        .status()
        .with_context(|| {
            format!(
                "cannot run {name}: build it with `cargo build --release -p refract-bench` \
                 (it is looked for beside refract, then on the PATH)"
            )
        })?;
    anyhow::ensure!(status.success(), "{name} failed ({status})");
    Ok(())
}

pub fn default_partition_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.token.clone())
    }
}

fn parse_json(flag: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{flag} is not valid JSON"))
}

async fn append(args: AppendArgs) -> anyhow::Result<()> {
    let events = match &args.event_type {
        Some(event_type) => vec![NewEvent {
            id: args.id.clone(),
            event_type: event_type.clone(),
            data: args
                .data
                .as_deref()
                .map(|data| parse_json("--data", data))
                .transpose()?,
            metadata: args
                .metadata
                .as_deref()
                .map(|metadata| parse_json("--metadata", metadata))
                .transpose()?,
            ..NewEvent::default()
        }],
        None => events_from_stdin()?,
    };
    if args.sharding.sharder.is_some() && !args.sharding.enabled() {
        anyhow::bail!("--sharder needs --nodes: the nodes to spread streams over");
    }
    let (node, result) = if args.sharding.enabled() {
        let (node, result) = sharding::append(
            &args.sharding,
            &args.client,
            &args.stream,
            args.expected_revision,
            &events,
        )
        .await?;
        (Some(node), result)
    } else {
        let client = args.client.client()?;
        let result = client
            .append(&args.stream, args.expected_revision, &events)
            .await?;
        (None, result)
    };
    if args.client.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let AppendResult {
            first_revision,
            last_revision,
            first_position,
            last_position,
        } = result;
        let on = node
            .map(|node| format!(" on node {node}"))
            .unwrap_or_default();
        println!(
            "appended {} event(s) to {}{on}: revisions {first_revision}..={last_revision}, positions {first_position}..={last_position}",
            last_revision - first_revision + 1,
            args.stream
        );
    }
    Ok(())
}

fn events_from_stdin() -> anyhow::Result<Vec<NewEvent>> {
    let mut events = Vec::new();
    for (number, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line)
            .with_context(|| format!("stdin line {}: not an event object", number + 1))?;
        events.push(event);
    }
    if events.is_empty() {
        anyhow::bail!("no events: give --type (and --data), or JSON lines on stdin");
    }
    Ok(events)
}

async fn read(args: ReadArgs) -> anyhow::Result<()> {
    let client = args.client.client()?;
    let mut options = ReadOptions {
        from: args.from,
        backward: args.backward,
        limit: None,
        resolve_links: args.no_resolve_links.then_some(false),
        stream_prefix: args.stream_prefix.clone(),
        type_prefix: args.type_prefix.clone(),
        include_system: args.include_system,
        shard: args.shard.map(|(shard, shards)| ShardSelector {
            sharder: args.sharding.sharder.clone().unwrap_or_default(),
            shards,
            shard,
        }),
    };
    if args.sharding.sharder.is_some() && !args.sharding.enabled() && args.shard.is_none() {
        anyhow::bail!("--sharder needs --nodes (client-side sharding) or --shard K/N");
    }
    if args.sharding.enabled() {
        return sharding::read(
            &args.sharding,
            &args.client,
            &args.stream,
            options,
            args.follow,
            args.limit,
        )
        .await;
    }
    let mut output = std::io::stdout().lock();
    let mut remaining = args.limit.unwrap_or(usize::MAX);
    if args.follow {
        let from = args.from.map_or(SubscribeFrom::Start, SubscribeFrom::At);
        let mut messages = Box::pin(client.subscribe(&args.stream, from, &options).await?);
        while remaining > 0 {
            match messages.next().await {
                Some(Ok(SubscriptionMessage::Event { event, .. })) => {
                    print_event(&mut output, &event, args.client.json)?;
                    remaining -= 1;
                }
                Some(Ok(SubscriptionMessage::CaughtUp)) => {
                    if !args.client.json {
                        eprintln!("-- caught up; following live events (Ctrl-C to stop)");
                    }
                }
                Some(Err(error)) => return Err(error),
                None => anyhow::bail!("the server closed the subscription"),
            }
        }
        return Ok(());
    }
    while remaining > 0 {
        options.limit = Some(remaining.min(4096));
        let page = client.read(&args.stream, &options).await?;
        for event in &page.events {
            print_event(&mut output, event, args.client.json)?;
        }
        remaining -= page.events.len().min(remaining);
        match page.next {
            Some(next) => options.from = Some(next),
            None => break,
        }
    }
    Ok(())
}

fn print_event(output: &mut impl Write, event: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(output, "{}", serde_json::to_string(event)?)?;
        return Ok(());
    }
    let data = match (&event.data, &event.data_base64) {
        (Some(data), _) => data.to_string(),
        (None, Some(base64)) => format!("base64:{base64}"),
        (None, None) => String::new(),
    };
    let via = event
        .link
        .as_ref()
        .map(|link| format!(" (via {}@{})", link.revision, link.stream))
        .unwrap_or_default();
    writeln!(
        output,
        "{}@{}  #{}  {}  {}  {data}{via}",
        event.revision, event.stream, event.position, event.created, event.event_type
    )?;
    Ok(())
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let client = args.client.client()?;
    client
        .delete(&args.stream, args.expected_revision, args.hard)
        .await?;
    if args.client.json {
        println!(
            "{}",
            serde_json::json!({"stream": args.stream, "deleted": true, "hard": args.hard})
        );
    } else {
        let how = if args.hard { "tombstoned" } else { "deleted" };
        println!("{how} {}", args.stream);
    }
    Ok(())
}

/// Says what replacing the emitted streams of `name` may rewrite, and asks to go on.
async fn confirm_replace(client: &Client, name: &str) -> anyhow::Result<()> {
    let status = match client.projection(name).await {
        Ok(status) => status,
        // Nothing emitted yet: a new projection replaces nothing.
        Err(_) => return Ok(()),
    };
    let Some(emitted) = status.emitted.filter(|emitted| emitted.streams > 0) else {
        return Ok(());
    };
    eprintln!(
        "{name} emitted to {} streams holding {} events. With --emitted replace, the new version \
         replaces them at the switch: each stream whose events differ is soft-deleted and written \
         again, with new event ids (consumers see those events again).",
        emitted.streams, emitted.events
    );
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("not replacing emitted streams without --yes (no terminal to ask on)");
    }
    eprint!("Replace them? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        anyhow::bail!("not replacing the emitted streams of {name}");
    }
    Ok(())
}

async fn projection(command: ProjectionCommand) -> anyhow::Result<()> {
    let (client_args, statuses) = match &command {
        ProjectionCommand::Deploy(args) => {
            let component = std::fs::read(&args.file)
                .with_context(|| format!("cannot read {}", args.file.display()))?;
            let options = DeployOptions {
                mode: args.mode,
                emit: args.emit,
                enabled: !args.disabled,
                rebuild: !args.keep_data,
                emitted: args.emitted,
                on_error: args.on_error,
            };
            let client = args.client.client()?;
            if options.rebuild && args.emitted == Emitted::Replace && !args.yes {
                confirm_replace(&client, &args.name).await?;
            }
            let spinner = rebuild::compiling(&args.name, component.len());
            let deployed = client.deploy(&args.name, component, &options).await;
            spinner.finish_and_clear();
            let (created, mut status) = deployed?;
            if status.rebuild.is_some() && !args.no_wait {
                status = rebuild::wait_for_rebuild(&client, &args.name).await?;
            }
            if !args.client.json {
                let what = if created { "deployed" } else { "updated" };
                match &status.rebuild {
                    Some(rebuild) => println!(
                        "{what} {}: version {} is rebuilding beside version {}",
                        status.name, rebuild.version, status.version
                    ),
                    None => println!("{what} {} version {}", status.name, status.version),
                }
            }
            (&args.client, vec![status])
        }
        ProjectionCommand::Rebuild(args) => {
            let client = args.client.client()?;
            let status = if args.cancel {
                client.cancel_rebuild(&args.name).await?
            } else {
                if args.emitted == Emitted::Replace && !args.yes {
                    confirm_replace(&client, &args.name).await?;
                }
                let started = client.rebuild(&args.name, args.emitted).await?;
                if args.wait {
                    rebuild::wait_for_rebuild(&client, &args.name).await?
                } else {
                    started
                }
            };
            (&args.client, vec![status])
        }
        ProjectionCommand::State(args) => {
            let client = args.client.client()?;
            let partition = match &args.partition {
                Some(partition) => Some(partition.clone()),
                None => {
                    let query = RowsQuery {
                        prefix: args.prefix.clone(),
                        after: args.after.clone(),
                        limit: Some(args.limit),
                    };
                    let page = client.partitions(&args.name, &query).await?;
                    // An unpartitioned projection has its one state: show it.
                    let unpartitioned = page.partitions == [""] && args.after.is_none();
                    if !unpartitioned {
                        for key in &page.partitions {
                            println!("{key}");
                        }
                        if let Some(next) = page.next {
                            eprintln!("more partitions follow: --after {next:?}");
                        }
                        return Ok(());
                    }
                    None
                }
            };
            let state = client
                .projection_state(&args.name, partition.as_deref())
                .await?;
            println!("{}", render_json(&state, args.client.json)?);
            return Ok(());
        }
        ProjectionCommand::Skip(args) => {
            let status = args
                .client
                .client()?
                .skip(&args.name, args.position)
                .await?;
            (&args.client, vec![status])
        }
        ProjectionCommand::Parked(args) => {
            let parked = args
                .client
                .client()?
                .projection_parked(&args.name, args.from, args.limit)
                .await?;
            for event in &parked {
                if args.client.json {
                    println!("{}", serde_json::to_string(event)?);
                } else {
                    let reason = &event["reason"];
                    println!(
                        "{}\t{} {}@{}\t{}: {}",
                        event["revision"],
                        event["event"]["type"].as_str().unwrap_or_default(),
                        event["event"]["revision"],
                        event["event"]["stream"].as_str().unwrap_or_default(),
                        reason["on_error"].as_str().unwrap_or_default(),
                        reason["error"].as_str().unwrap_or_default(),
                    );
                }
            }
            return Ok(());
        }
        ProjectionCommand::Table(args) => {
            let client = args.client.client()?;
            if let Some(key) = &args.key {
                let row = client.table_row(&args.name, &args.table, key).await?;
                println!("{}", render_json(&row, args.client.json)?);
                return Ok(());
            }
            let query = RowsQuery {
                prefix: args.prefix.clone(),
                after: args.after.clone(),
                limit: Some(args.limit),
            };
            let page = client.table_rows(&args.name, &args.table, &query).await?;
            for row in &page.rows {
                let value = match &row.value_base64 {
                    Some(base64) => serde_json::json!({ "value_base64": base64 }),
                    None => row.value.clone(),
                };
                println!("{}\t{}", row.key, serde_json::to_string(&value)?);
            }
            if let Some(next) = page.next {
                eprintln!("more rows follow: --after {next:?}");
            }
            return Ok(());
        }
        ProjectionCommand::Delete(args) => {
            args.client
                .client()?
                .delete_projection(&args.name, args.delete_emitted)
                .await?;
            if !args.client.json {
                println!("deleted {}", args.name);
            }
            return Ok(());
        }
        ProjectionCommand::List(args) => (&args.client, args.client.client()?.projections().await?),
        ProjectionCommand::Status(args) => (
            &args.client,
            vec![args.client.client()?.projection(&args.name).await?],
        ),
        ProjectionCommand::Start(args)
        | ProjectionCommand::Stop(args)
        | ProjectionCommand::Reset(args) => {
            let action = match command {
                ProjectionCommand::Start(_) => client::ProjectionCommand::Start,
                ProjectionCommand::Stop(_) => client::ProjectionCommand::Stop,
                _ => client::ProjectionCommand::Reset,
            };
            let status = args
                .client
                .client()?
                .projection_command(&args.name, action)
                .await?;
            (&args.client, vec![status])
        }
    };
    if client_args.json {
        for status in &statuses {
            println!("{}", serde_json::to_string(status)?);
        }
        return Ok(());
    }
    if matches!(command, ProjectionCommand::Deploy(_)) {
        return Ok(());
    }
    let faulted: Vec<String> = statuses
        .iter()
        .filter(|status| status.fault.is_some())
        .map(|status| status.name.clone())
        .collect();
    println!(
        "{:<24} {:<7} {:<11} {:>12} {:>12} {:>9} {:>12}",
        "name", "kind", "status", "position", "head", "progress", "events/s"
    );
    for status in statuses {
        println!(
            "{:<24} {:<7} {:<11} {:>12} {:>12} {:>8.1}% {:>12.0}",
            status.name,
            status.kind,
            status.status,
            status.position,
            status.head_position,
            status.progress * 100.0,
            status.events_per_second
        );
        if let Some(fault) = status.fault {
            println!("  fault at position {}: {}", fault.position, fault.message);
        }
        if let Some(rebuild) = status.rebuild {
            let eta = rebuild
                .eta_seconds
                .map_or_else(|| "-".to_owned(), |eta| format!("{eta:.0} s"));
            println!(
                "  rebuilding version {} ({}): position {}, {:.1}%, {:.0} events/s, ETA {eta}",
                rebuild.version,
                rebuild.status,
                rebuild.position,
                rebuild.progress * 100.0,
                rebuild.events_per_second
            );
            if let Some(fault) = rebuild.fault {
                println!(
                    "    fault at position {}: {}",
                    fault.position, fault.message
                );
            }
        }
    }
    if matches!(command, ProjectionCommand::Status(_)) && !faulted.is_empty() {
        anyhow::bail!("{} is faulted", faulted.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument of every command says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if argument.get_help().is_none() && argument.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "refract", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}
