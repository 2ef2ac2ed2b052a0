//! `refract-bench` (also run as `refract bench`): throughput, latency, disk and memory figures on
//! a fresh data directory.
//!
//! The server runs in this process (the clients too, sharing the same cores), except for the
//! startup measurement, which starts the real `refract` binary on the many-streams store.

mod cluster;
mod connectors;
mod esdb;
mod footprint;
mod groups;
mod languages;
mod partitioned;
mod rebuild;
mod sharding;
mod wasm_projections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::oneshot;

use refract::client::{Client, NewEvent, ReadOptions};
use refract::http::{ServeConfig, Tokens};
use refract::metrics::Metrics;
use refract::sandbox::Sandbox;
use refract::store::SystemIndex;
use refract::store::{AllFilter, DATABASE_FILE, Direction, ExpectedRevision, Store, StoreOptions};

// The server's allocator, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure appends, reads, projections, rebuilds, sharding and consumer groups on a fresh data
/// directory and print the figures.
#[derive(Debug, Parser)]
#[command(name = "refract-bench", version)]
struct BenchArgs {
    /// Directory for the benchmark's stores (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds each append scenario runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Streams written in the many-streams scenario (3 events each).
    #[arg(long, default_value_t = 1_000_000)]
    streams: u64,
    /// Many-streams scenario: write and restart with `--quick-repair` on (the default) or off.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    quick_repair: bool,
    /// Events written with the system projections stopped before they catch up on them.
    #[arg(long, default_value_t = 10_000_000)]
    catchup_events: u64,
    /// Events written for the Wasm projections scenario.
    #[arg(long, default_value_t = 1_000_000)]
    wasm_events: u64,
    /// Events the connectors scenario sends to Kafka and lands from it.
    #[arg(long, default_value_t = 200_000)]
    connector_events: u64,
    /// Events written for the languages scenario (Python and JavaScript are slower).
    #[arg(long, default_value_t = 200_000)]
    language_events: u64,
    /// Where the built guests are (`cargo build --profile guest --target wasm32-wasip2 -p
    /// event-counter -p order-summary`).
    #[arg(long, default_value = "target/wasm32-wasip2/guest")]
    guests: PathBuf,
    /// Log sizes of the rebuild scenario (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    rebuild_events: Vec<u64>,
    /// Footprint scenario: single events to new streams, then batches of 1,000 (the PostgreSQL
    /// peer's events).
    #[arg(long, value_delimiter = ',', default_value = "200000,300")]
    footprint: Vec<u64>,
    /// Events a stopped follower catches up on, from the log and from a snapshot (cluster).
    #[arg(long, default_value_t = 1_000_000)]
    cluster_events: u64,
    /// Run only these scenarios (comma-separated): single, batch, footprint, read, streams,
    /// projections, wasm, languages, rebuild, sharding, groups, partitioned, cluster, connectors,
    /// esdb.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl BenchArgs {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only == scenario)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(BenchArgs::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let temporary;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
            temporary.path().to_path_buf()
        }
    };
    println!(
        "refract bench: {} cores, data in {}",
        num_cpus(),
        dir.display()
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10} {:>12} {:>10}",
        "scenario", "events/s", "p50", "p99", "disk B/ev", "peak RSS"
    );
    if args.wants("single") || args.wants("batch") {
        let ceiling = dir.join("ceiling");
        let seconds = args.seconds;
        tokio::task::block_in_place(|| disk_ceiling(&ceiling, seconds))?;
    }
    let server = BenchServer::start(&dir.join("appends")).await?;
    if args.wants("single") {
        for clients in [1, 16, 64] {
            let label = format!("append 1 event/request, {clients} clients");
            appends(&server, &label, clients, 1, args.seconds).await?;
        }
    }
    if args.wants("batch") {
        for batch in [100, 1000] {
            let label = format!("append {batch} events/request, 4 clients");
            appends(&server, &label, 4, batch, args.seconds).await?;
        }
    }
    if args.wants("read") {
        reads(&server).await?;
    }
    let data_dir = server.data_dir.clone();
    server.stop().await?;
    if args.wants("read") {
        // In-process: the same store opened directly once the server has let go of it.
        let store = Store::open(&data_dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
        for (label, stream) in [
            ("read one stream in-process", Some(READ_STREAM)),
            ("read $all in-process", None),
        ] {
            let started = Instant::now();
            let (events, mut latencies) =
                tokio::task::block_in_place(|| read_in_process(&store, stream))?;
            report(label, events, started.elapsed(), &mut latencies, None);
        }
        store.shutdown().await;
    }
    if args.wants("footprint") {
        println!("footprint of the PostgreSQL peer's events:");
        let (singles, batches) = match args.footprint[..] {
            [singles, batches] => (singles, batches),
            _ => anyhow::bail!("--footprint takes two numbers: SINGLES,BATCHES"),
        };
        footprint::run(&dir.join("footprint"), singles, batches).await?;
    }
    if args.wants("streams") {
        many_streams(&dir.join("streams"), args.streams, args.quick_repair).await?;
    }
    if args.wants("projections") {
        system_projections(&dir.join("projections"), args.seconds).await?;
        catch_up(&dir.join("catch-up"), args.catchup_events).await?;
    }
    if args.wants("wasm") {
        println!("wasm projections, {} events:", args.wasm_events);
        wasm_projections::run(&dir.join("wasm"), &args.guests, args.wasm_events).await?;
    }
    if args.wants("languages") {
        println!("projections by language, {} events:", args.language_events);
        languages::run(&dir.join("languages"), &args.guests, args.language_events).await?;
    }
    if args.wants("rebuild") {
        println!("rebuilds:");
        rebuild::run(&dir.join("rebuild"), &args.guests, &args.rebuild_events).await?;
    }
    if args.wants("sharding") {
        println!("sharding:");
        sharding::run(&dir.join("sharding"), &args.guests, args.seconds).await?;
    }
    if args.wants("groups") {
        println!("consumer groups (delivered + acked messages/s):");
        groups::run(&dir.join("groups"), args.seconds).await?;
    }
    if args.wants("partitioned") {
        println!(
            "partitioned groups (delivered + committed messages/s), per-message groups and Redis Streams on the same messages:"
        );
        partitioned::run(&dir.join("partitioned"), &args.guests, args.seconds).await?;
    }
    if args.wants("connectors") {
        println!("kafka connectors, against the broker's own produce rate in the same sitting:");
        connectors::run(&dir.join("connectors"), args.connector_events).await?;
    }
    if args.wants("esdb") {
        println!("EventStoreDB's gRPC API (its Rust client) against the HTTP API, same server:");
        esdb::run(&dir.join("esdb"), args.seconds).await?;
    }
    if args.wants("cluster") {
        println!("three-node cluster on loopback, against one node in the same sitting:");
        cluster::run(&dir.join("cluster"), args.seconds, args.cluster_events).await?;
    }
    Ok(())
}

/// The disk's rate of sequential 4 KiB writes each followed by `fdatasync`: the most durable
/// appends a second one client can have, whatever the store.
fn disk_ceiling(dir: &Path, seconds: u64) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("ceiling");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0x5a_u8; 4096];
    let mut latencies = Latencies::default();
    let mut writes = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let write_started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        latencies.0.push(write_started.elapsed().as_micros() as u64);
        writes += 1;
    }
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    report(
        "ceiling: 4 KiB write + fdatasync",
        writes,
        elapsed,
        &mut latencies,
        None,
    );
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A server in this process on a free port.
struct BenchServer {
    address: SocketAddr,
    data_dir: PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchServer {
    async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        BenchServer::start_with(BenchServer::config(data_dir)).await
    }

    /// A single node's configuration, on a free port.
    fn config(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("valid address"),
            tokens: Tokens::default(),
            store: StoreOptions::default(),
            sse_heartbeat: Duration::from_secs(15),
            sandbox: Sandbox::default(),
            partition_workers: refract::cli::default_partition_workers(),
            cors_origins: Vec::new(),
            cluster: None,
            tls: None,
        }
    }

    async fn start_with(config: ServeConfig) -> anyhow::Result<Self> {
        let data_dir = config.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, address) = oneshot::channel();
        let task = tokio::spawn(refract::http::serve_until(
            config,
            async move {
                let _ = stopped.await;
            },
            move |address| {
                let _ = ready.send(address);
            },
        ));
        let address = address
            .await
            .context("the benchmark server did not start")?;
        Ok(BenchServer {
            address,
            data_dir,
            stop,
            task,
        })
    }

    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&format!("http://{}", self.address), None)
    }

    fn disk_bytes(&self) -> u64 {
        file_size(&self.data_dir.join(DATABASE_FILE))
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the benchmark server panicked")?
    }
}

/// One keep-alive HTTP/1.1 connection of a load-generating client.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl Connection {
    async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Connection { sender })
    }

    /// Posts `body` and returns the JSON answer.
    async fn post(&mut self, path: &str, body: bytes::Bytes) -> anyhow::Result<serde_json::Value> {
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, "bench")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        // Read the whole answer so the connection can carry the next request.
        let answer = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        anyhow::ensure!(status.is_success(), "append failed: {status}");
        Ok(serde_json::from_slice(&answer)?)
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

/// Latency samples in microseconds.
#[derive(Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn percentile(&mut self, percent: usize) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let index = (self.0.len() * percent / 100).min(self.0.len() - 1);
        Duration::from_micros(self.0[index])
    }
}

fn report(
    label: &str,
    events: u64,
    elapsed: Duration,
    latencies: &mut Latencies,
    disk: Option<u64>,
) {
    let disk = disk.map_or_else(
        || "-".to_owned(),
        |bytes| format!("{:.0}", bytes as f64 / events.max(1) as f64),
    );
    let percentile = |latencies: &mut Latencies, percent| {
        if latencies.0.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2?}", latencies.percentile(percent))
        }
    };
    println!(
        "{label:<44} {:>12.0} {:>10} {:>10} {:>12} {:>10}",
        events as f64 / elapsed.as_secs_f64(),
        percentile(latencies, 50),
        percentile(latencies, 99),
        disk,
        format!("{} MiB", peak_rss_kib() / 1024),
    );
    reset_peak_rss();
}

fn sample_event(index: u64) -> NewEvent {
    // ~200 bytes of data, the size the design's figures use, and a correlation id so that
    // `$by_correlation_id` has work too (1,000 events per id).
    let mut event = NewEvent::json(
        "OrderPlaced",
        serde_json::json!({
            "order_id": index,
            "customer_id": format!("customer-{}", index % 1000),
            "total_cents": index * 7 % 100_000,
            "lines": [{"sku": "SKU-0001", "qty": 2}, {"sku": "SKU-0042", "qty": 1}],
            "note": "benchmark event payload, padded to about two hundred bytes...",
        }),
    );
    event.metadata = Some(serde_json::json!({"$correlationId": format!("c-{}", index / 1000)}));
    event
}

/// The same event as the store takes it.
fn stored_sample(index: u64) -> refract::store::NewEvent {
    let event = sample_event(index);
    refract::store::NewEvent {
        id: uuid::Uuid::new_v4(),
        event_type: event.event_type,
        data: serde_json::to_vec(&event.data).expect("JSON"),
        binary: false,
        metadata: serde_json::to_vec(&event.metadata).expect("JSON"),
    }
}

async fn appends(
    server: &BenchServer,
    label: &str,
    clients: usize,
    batch: u64,
    seconds: u64,
) -> anyhow::Result<f64> {
    let disk_before = server.disk_bytes();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // The body is encoded once and each client keeps one HTTP/1.1 connection, so the figures are
    // the server's rather than a client library's. Without ids in it, every send appends anew.
    let events: Vec<NewEvent> = (0..batch).map(sample_event).collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&events)?);
    for client_index in 0..clients {
        let body = body.clone();
        let address = server.address;
        let stream_prefix = format!("bench{batch}x{clients}-{client_index}");
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(address).await?;
            let mut latencies = Vec::new();
            let mut sent = 0u64;
            while Instant::now() < deadline {
                // Single events spread over many streams; batches go to one stream per client.
                let path = if batch == 1 {
                    format!("/streams/{stream_prefix}_{}", sent % 1000)
                } else {
                    format!("/streams/{stream_prefix}")
                };
                let request_started = Instant::now();
                connection.post(&path, body.clone()).await?;
                latencies.push(request_started.elapsed().as_micros() as u64);
                sent += batch;
            }
            anyhow::Ok((sent, latencies))
        }));
    }
    let (events, mut latencies) = gather(tasks).await?;
    let elapsed = started.elapsed();
    let disk = server.disk_bytes().saturating_sub(disk_before);
    report(label, events, elapsed, &mut latencies, Some(disk));
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// A load client's task: the events it sent and each request's latency in microseconds.
type LoadClient = tokio::task::JoinHandle<anyhow::Result<(u64, Vec<u64>)>>;

/// The events the load clients sent, and their latencies together.
async fn gather(tasks: Vec<LoadClient>) -> anyhow::Result<(u64, Latencies)> {
    let mut events = 0;
    let mut latencies = Latencies::default();
    for task in tasks {
        let (sent, samples) = task.await??;
        events += sent;
        latencies.0.extend(samples);
    }
    Ok((events, latencies))
}

/// The stream the read scenarios read: 50,000 events.
const READ_STREAM: &str = "bench-read";

async fn reads(server: &BenchServer) -> anyhow::Result<()> {
    let stream = READ_STREAM;
    let client = server.client()?;
    for chunk in 0..50u64 {
        let events: Vec<NewEvent> = (chunk * 1000..(chunk + 1) * 1000)
            .map(sample_event)
            .collect();
        client
            .append(stream, ExpectedRevision::Any, &events)
            .await?;
    }

    for (label, stream) in [
        ("read one stream over HTTP (4096/page)", stream),
        ("read $all over HTTP (4096/page)", "$all"),
    ] {
        let mut latencies = Latencies::default();
        let started = Instant::now();
        let mut events = 0u64;
        let mut options = ReadOptions {
            limit: Some(4096),
            ..ReadOptions::default()
        };
        loop {
            let request_started = Instant::now();
            let page = client.read(stream, &options).await?;
            latencies
                .0
                .push(request_started.elapsed().as_micros() as u64);
            events += page.events.len() as u64;
            match page.next {
                Some(next) => options.from = Some(next),
                None => break,
            }
        }
        report(label, events, started.elapsed(), &mut latencies, None);
    }
    Ok(())
}

/// Reads a whole store in-process, page by page, as a projection's catch-up would.
fn read_in_process(store: &Store, stream: Option<&str>) -> anyhow::Result<(u64, Latencies)> {
    let mut latencies = Latencies::default();
    let mut events = 0u64;
    let mut from = Some(0);
    let filter = AllFilter::default();
    while let Some(at) = from {
        let started = Instant::now();
        let slice = match stream {
            Some(stream) => store.read_stream(stream, Some(at), Direction::Forward, 4096, true)?,
            None => store.read_all(Some(at), Direction::Forward, 4096, &filter)?,
        };
        latencies.0.push(started.elapsed().as_micros() as u64);
        events += slice.events.len() as u64;
        from = slice.next;
    }
    Ok((events, latencies))
}

async fn many_streams(dir: &Path, streams: u64, quick_repair: bool) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let options = StoreOptions {
        quick_repair,
        ..StoreOptions::default()
    };
    let store = Store::open(dir, options, metrics)?;
    let started = Instant::now();
    let writers = 512u64;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut index = writer;
            while index < streams {
                let events = (0..3).map(|n| stored_sample(index * 3 + n)).collect();
                let request_started = Instant::now();
                store
                    .append(format!("order-{index}"), ExpectedRevision::NoStream, events)
                    .await?;
                latencies.push(request_started.elapsed().as_micros() as u64);
                index += writers;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Latencies::default();
    for task in tasks {
        latencies.0.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let label = format!("{streams} streams x 3 events (in-process)");
    let disk = file_size(&dir.join(DATABASE_FILE));
    report(&label, streams * 3, elapsed, &mut latencies, Some(disk));
    let used = store.blocking(|store| store.used_bytes()).await?;
    store.shutdown().await;
    // Close the database: the server started below must be able to lock it.
    drop(store);

    println!(
        "  disk: {:.0} bytes per stream in pages in use ({} MiB), file {} MiB, {:.0} bytes per stream",
        used as f64 / streams as f64,
        used >> 20,
        disk >> 20,
        disk as f64 / streams as f64,
    );
    let server = RunningServer::start(dir, quick_repair).await?;
    println!(
        "  server start on this store: {:.2?} to answer /health; RSS then {} MiB",
        server.startup,
        server.rss_kib / 1024
    );
    server.stop().await?;
    RunningServer::start(dir, quick_repair)
        .await?
        .kill()
        .await?;
    // The server above was killed: this start recovers the database first.
    let server = RunningServer::start(dir, quick_repair).await?;
    println!(
        "  server start after a kill -9: {:.2?} to answer /health",
        server.startup
    );
    server.stop().await?;
    startup_after_kill_under_load(dir, quick_repair).await
}

/// The `refract` binary built beside this one (`cargo build --release -p refract -p
/// refract-bench` puts both in `target/release`).
fn refract_binary() -> anyhow::Result<PathBuf> {
    let here = std::env::current_exe().context("cannot find this executable")?;
    let binary = here.with_file_name(format!("refract{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        binary.is_file(),
        "the startup scenario runs the refract binary, which is not at {}: build it with \
         `cargo build --release -p refract`",
        binary.display()
    );
    Ok(binary)
}

/// A `refract serve` child process that answered `/health`.
struct RunningServer {
    child: tokio::process::Child,
    address: SocketAddr,
    /// From spawning the process to its first answer to `/health`.
    startup: Duration,
    rss_kib: u64,
}

impl RunningServer {
    /// Starts the real binary on `dir` and times it until it answers `/health`.
    async fn start(dir: &Path, quick_repair: bool) -> anyhow::Result<RunningServer> {
        let binary = refract_binary()?;
        let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let started = Instant::now();
        let mut child = tokio::process::Command::new(binary)
            .args(["serve", "--listen", &address.to_string(), "--data"])
            .arg(dir)
            .arg(format!("--quick-repair={quick_repair}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the server")?;
        let client = Client::new(&format!("http://{address}"), None)?;
        while !client.healthy().await {
            if child.try_wait()?.is_some() {
                let output = child.wait_with_output().await?;
                anyhow::bail!(
                    "the server exited: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("the server did not start within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let startup = started.elapsed();
        let rss_kib = child.id().map_or(0, |pid| {
            status_kib(&format!("/proc/{pid}/status"), "VmRSS:")
        });
        Ok(RunningServer {
            child,
            address,
            startup,
            rss_kib,
        })
    }

    /// `kill -9`.
    async fn kill(mut self) -> anyhow::Result<()> {
        Ok(self.child.kill().await?)
    }

    /// SIGTERM, then waits for the exit; returns what the server logged.
    async fn stop(self) -> anyhow::Result<String> {
        let pid = self
            .child
            .id()
            .context("the server has no pid")?
            .to_string();
        tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await?;
        let output = self.child.wait_with_output().await?;
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Appends batches of 1,000 from four clients, kills the server with `kill -9` in the middle,
/// and times the next start, which replays the log written since the last checkpoint.
async fn startup_after_kill_under_load(dir: &Path, quick_repair: bool) -> anyhow::Result<()> {
    let server = RunningServer::start(dir, quick_repair).await?;
    let events: Vec<NewEvent> = (0..1000).map(sample_event).collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&events)?);
    let mut loaders = Vec::new();
    for client in 0..4 {
        let (address, body) = (server.address, body.clone());
        loaders.push(tokio::spawn(async move {
            let path = format!("/streams/killed-{client}");
            let Ok(mut connection) = Connection::open(address).await else {
                return;
            };
            // Until the kill ends the connection.
            while connection.post(&path, body.clone()).await.is_ok() {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.kill().await?;
    for loader in loaders {
        loader.await?;
    }
    let restarted = RunningServer::start(dir, quick_repair).await?;
    let startup = restarted.startup;
    let log = restarted.stop().await?;
    let replayed = log
        .lines()
        .find(|line| line.contains("replayed the write-ahead log"))
        .and_then(|line| {
            let entries = line.split("entries=").nth(1)?;
            entries.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "no".to_owned());
    println!(
        "  server start after a kill -9 under load (batches of 1,000): {startup:.2?} to answer \
         /health, replaying {replayed} log entries"
    );
    Ok(())
}

fn status_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|kib| kib.parse().ok())
                })
        })
        .unwrap_or(0)
}

/// This process's peak resident memory since the last reset, in KiB (Linux; 0 elsewhere).
fn peak_rss_kib() -> u64 {
    status_kib("/proc/self/status", "VmHWM:")
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets the peak (Linux); elsewhere this does nothing.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Appends with the system projections running and stopped, and the lag from an append's
/// acknowledgement to its link being readable in `$ce-…`.
async fn system_projections(dir: &Path, seconds: u64) -> anyhow::Result<()> {
    let server = BenchServer::start(dir).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.address);
    lag(&server, seconds).await?;
    // On and off alternate twice: the machine's fsync times drift more than the difference.
    let mut totals = [[0.0; 2]; 2];
    for running in [true, false, true, false] {
        for index in SystemIndex::ALL {
            let action = if running { "start" } else { "stop" };
            let url = format!("{base}/projections/{}/{action}", index.name());
            anyhow::ensure!(
                http.post(url).send().await?.status().is_success(),
                "{action} failed"
            );
        }
        if running {
            // Measure with caught-up projections, not with the catch-up of the "off" run.
            for index in SystemIndex::ALL {
                let url = format!("{base}/projections/{}", index.name());
                loop {
                    let status: serde_json::Value = http.get(&url).send().await?.json().await?;
                    if status["position"] == status["head_position"] {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let state = if running { "on" } else { "off" };
        let label = format!("append 1 event/request, 64 clients, projections {state}");
        let single = appends(&server, &label, 64, 1, seconds).await?;
        let label = format!("append 1000 events/request, 4 clients, projections {state}");
        let batched = appends(&server, &label, 4, 1000, seconds).await?;
        let mode = usize::from(!running);
        totals[mode][0] += single;
        totals[mode][1] += batched;
    }
    println!(
        "  with the four system projections on, appends run at {:.0}% (single events) and {:.0}% (batches) of the rate with them off (means of two runs each)",
        100.0 * totals[0][0] / totals[1][0],
        100.0 * totals[0][1] / totals[1][1]
    );
    server.stop().await
}

/// From an append's acknowledgement until `$ce-lag` shows its link: 16 clients, single events.
async fn lag(server: &BenchServer, seconds: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..16 {
        let address = server.address;
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let body = bytes::Bytes::from(serde_json::to_vec(&sample_event(client))?);
            let mut connection = Connection::open(address).await?;
            let mut lags = Vec::new();
            while Instant::now() < deadline {
                let answer = connection.post(&format!("/streams/lag-{client}"), body.clone()).await?;
                let acknowledged = Instant::now();
                let position = answer["last_position"].as_u64().context("no position")?;
                let url = format!("http://{address}/streams/%24ce-lag?direction=backward&limit=100&resolve_links=false");
                loop {
                    let page: serde_json::Value = http.get(&url).send().await?.json().await?;
                    let linked = page["events"].as_array().is_some_and(|events| {
                        events.iter().any(|event| event["position"].as_u64() == Some(position))
                    });
                    if linked {
                        break;
                    }
                }
                lags.push(acknowledged.elapsed().as_micros() as u64);
            }
            anyhow::Ok(lags)
        }));
    }
    let mut latencies = Latencies::default();
    for task in tasks {
        latencies.0.extend(task.await??);
    }
    let events = latencies.0.len() as u64;
    report(
        "lag: append ack -> visible in $ce- (16 clients)",
        events,
        started.elapsed(),
        &mut latencies,
        None,
    );
    Ok(())
}

/// Writes `events` with the system projections stopped, then times their catch-up and measures
/// what their links cost on disk.
async fn catch_up(dir: &Path, events: u64) -> anyhow::Result<()> {
    let store = Store::open(dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
    for index in SystemIndex::ALL {
        store.set_index_running(index, false).await?;
    }
    let started = Instant::now();
    let writers = 8u64;
    let per_request = 1000u64;
    let requests = events.div_ceil(per_request);
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut request = writer;
            while request < requests {
                let events = (request * per_request..(request + 1) * per_request)
                    .map(stored_sample)
                    .collect();
                store
                    .append(
                        format!("order-{}", request % 10_000),
                        ExpectedRevision::Any,
                        events,
                    )
                    .await?;
                request += writers;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let written = store.head();
    let write_time = started.elapsed();
    println!(
        "  wrote {written} events with the system projections stopped in {write_time:.2?} ({:.0} events/s)",
        written as f64 / write_time.as_secs_f64()
    );
    let (entries_before, bytes_before) = store.blocking(|store| store.links_footprint()).await?;
    let started = Instant::now();
    for index in SystemIndex::ALL {
        store.set_index_running(index, true).await?;
    }
    while SystemIndex::ALL
        .iter()
        .any(|index| store.index_progress(*index).checkpoint < written)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let (entries_after, bytes_after) = store.blocking(|store| store.links_footprint()).await?;
    let links = entries_after - entries_before;
    println!(
        "  catch-up of all four system projections: {written} events in {elapsed:.2?} = {:.0} events/s, {links} links",
        written as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  disk per link: {:.1} bytes (links table: {} MiB before, {} MiB after)",
        (bytes_after - bytes_before) as f64 / links.max(1) as f64,
        bytes_before >> 20,
        bytes_after >> 20
    );
    store.shutdown().await;
    Ok(())
}
