//! Consumer groups: delivered + acked messages/s by consumers and pull batch, on a plain stream
//! and on `$ce-…`, append → delivery latency, and the same against Redis Streams
//! (`XREADGROUP`/`XACK`) when `redis-server` is installed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::{BenchServer, Latencies, report};
use refract::client::{Client, GroupSettings, NewEvent, StartFrom, StartName};
use refract::store::ExpectedRevision;

const CONSUMERS: [usize; 3] = [1, 4, 16];
const BATCHES: [usize; 3] = [1, 10, 100];
/// Messages written before the throughput runs, per source.
const PREFILL: u64 = 400_000;
/// A payload of about 100 bytes, the same for Refract and Redis.
const PAYLOAD: &str =
    "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789";

pub async fn run(dir: &Path, seconds: u64) -> anyhow::Result<()> {
    let run_for = Duration::from_secs(seconds.clamp(1, 3));
    let server = BenchServer::start(&dir.join("refract")).await?;
    let client = server.client()?;
    prefill_refract(&client).await?;
    let mut run = 0;
    for (label, stream) in [("stream", "bench-jobs"), ("$ce-work", "$ce-work")] {
        for consumers in CONSUMERS {
            for batch in BATCHES {
                run += 1;
                let group = format!("g{run}");
                let settings = GroupSettings {
                    start_from: StartFrom::Named(StartName::Start),
                    message_timeout_ms: 60_000,
                    ..GroupSettings::default()
                };
                client.put_group(stream, &group, &settings).await?;
                let (acked, elapsed) =
                    refract_consume(&client, stream, &group, consumers, batch, run_for).await?;
                client.delete_group(stream, &group).await?;
                let label = format!("refract {label}: {consumers} consumers, pull {batch}");
                report(&label, acked, elapsed, &mut Latencies::default(), None);
            }
        }
    }
    for (label, stream) in [("stream", "bench-live"), ("$ce-live", "$ce-live")] {
        let (count, elapsed, mut latencies) = refract_latency(&client, stream, run_for).await?;
        let label = format!("refract {label}: append → delivery, 4 consumers");
        report(&label, count, elapsed, &mut latencies, None);
    }
    server.stop().await?;
    let plan = RedisPlan {
        consumers: &CONSUMERS,
        batches: &BATCHES,
        prefill: PREFILL,
        latency: true,
    };
    redis_baselines(dir, run_for, &plan).await
}

/// What the Redis Streams baseline runs.
pub struct RedisPlan<'a> {
    pub consumers: &'a [usize],
    pub batches: &'a [usize],
    /// Messages written first.
    pub prefill: u64,
    /// Also measure `XADD` → delivery.
    pub latency: bool,
}

/// Redis Streams with its defaults and with every command fsynced, when `redis-server` is
/// installed.
pub async fn redis_baselines(
    dir: &Path,
    run_for: Duration,
    plan: &RedisPlan<'_>,
) -> anyhow::Result<()> {
    let Some(binary) = which_redis() else {
        println!("redis-server is not installed: no Redis Streams baseline");
        return Ok(());
    };
    // Redis's defaults keep acks in memory only; `appendfsync always` makes each command
    // durable before its answer, as Refract's acks are.
    redis_runs(&binary, &dir.join("redis"), run_for, "redis", &[], plan).await?;
    let durable = ["--appendonly", "yes", "--appendfsync", "always"];
    redis_runs(
        &binary,
        &dir.join("redis-fsync"),
        run_for,
        "redis fsync",
        &durable,
        plan,
    )
    .await
}

pub fn payload_event(index: u64) -> NewEvent {
    let sent = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    NewEvent::json(
        "Job",
        serde_json::json!({ "n": index, "sent_us": sent, "payload": PAYLOAD }),
    )
}

async fn prefill_refract(client: &Client) -> anyhow::Result<()> {
    let started = Instant::now();
    for chunk in 0..PREFILL / 1000 {
        let events: Vec<NewEvent> = (0..1000).map(|i| payload_event(chunk * 1000 + i)).collect();
        client
            .append("bench-jobs", ExpectedRevision::Any, &events)
            .await?;
        // `$ce-work` gets the same number of messages, over 400 streams.
        client
            .append(&format!("work-{chunk}"), ExpectedRevision::Any, &events)
            .await?;
    }
    println!(
        "  prefilled 2 × {PREFILL} messages in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Consumers pull and ack for `run_for`; returns the acked messages and the time taken.
pub async fn refract_consume(
    client: &Client,
    stream: &str,
    group: &str,
    consumers: usize,
    batch: usize,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + run_for;
    let tasks: Vec<_> = (0..consumers)
        .map(|index| {
            let (client, stream, group, acked) = (
                client.clone(),
                stream.to_owned(),
                group.to_owned(),
                acked.clone(),
            );
            tokio::spawn(async move {
                let consumer = format!("c{index}");
                while Instant::now() < deadline {
                    let messages = client
                        .pull(
                            &stream,
                            &group,
                            &consumer,
                            batch,
                            Duration::from_millis(500),
                        )
                        .await?;
                    let ids: Vec<String> = messages.into_iter().map(|m| m.ack_id).collect();
                    if !ids.is_empty() {
                        client.ack(&stream, &group, &ids).await?;
                        acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("a consumer panicked")??;
    }
    Ok((acked.load(Ordering::Relaxed), started.elapsed()))
}

/// One writer appends one message per request at a steady pace while four consumers pull
/// (batches of up to 10, long-polling); latency is from before the append to the delivery.
async fn refract_latency(
    client: &Client,
    stream: &str,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration, Latencies)> {
    let settings = GroupSettings::default();
    client.put_group(stream, "latency", &settings).await?;
    let target = if stream.starts_with("$ce-") {
        "live-1".to_owned()
    } else {
        stream.to_owned()
    };
    let writing = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let consumers: Vec<_> = (0..4)
        .map(|index| {
            let (client, stream, writing) = (client.clone(), stream.to_owned(), writing.clone());
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let consumer = format!("c{index}");
                loop {
                    let messages = client
                        .pull(
                            &stream,
                            "latency",
                            &consumer,
                            10,
                            Duration::from_millis(200),
                        )
                        .await?;
                    if messages.is_empty() && !writing.load(Ordering::Relaxed) {
                        return anyhow::Ok(latencies);
                    }
                    let now = now_us();
                    let mut ids = Vec::with_capacity(messages.len());
                    for message in messages {
                        let sent = message
                            .event
                            .data
                            .as_ref()
                            .and_then(|d| d["sent_us"].as_u64());
                        latencies.0.push(now.saturating_sub(sent.unwrap_or(now)));
                        ids.push(message.ack_id);
                    }
                    if !ids.is_empty() {
                        client.ack(&stream, "latency", &ids).await?;
                    }
                }
            })
        })
        .collect();
    let latencies = paced(run_for, &writing, consumers, |index| {
        let (client, target) = (client.clone(), target.clone());
        async move {
            client
                .append(&target, ExpectedRevision::Any, &[payload_event(index)])
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    client.delete_group(stream, "latency").await?;
    Ok((latencies.0.len() as u64, started.elapsed(), latencies))
}

/// Writes one message every 0.5 ms for `run_for`, then lets the consumers drain and end, and
/// gathers their latencies.
async fn paced<Write, Written>(
    run_for: Duration,
    writing: &AtomicBool,
    consumers: Vec<tokio::task::JoinHandle<anyhow::Result<Latencies>>>,
    mut write: Write,
) -> anyhow::Result<Latencies>
where
    Write: FnMut(u64) -> Written,
    Written: Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let pace = Duration::from_micros(500);
    let mut next = started;
    let mut written = 0u64;
    while started.elapsed() < run_for {
        write(written).await?;
        written += 1;
        next += pace;
        tokio::time::sleep_until(next.into()).await;
    }
    writing.store(false, Ordering::Relaxed);
    let mut latencies = Latencies::default();
    for consumer in consumers {
        latencies
            .0
            .extend(consumer.await.context("a consumer panicked")??.0);
    }
    Ok(latencies)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

fn which_redis() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
    })
}

/// Redis Streams with the same messages, consumers and batches; `options` are added to the
/// `redis-server` command line.
async fn redis_runs(
    binary: &Path,
    data: &Path,
    run_for: Duration,
    name: &str,
    options: &[&str],
    plan: &RedisPlan<'_>,
) -> anyhow::Result<()> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    std::fs::create_dir_all(data)?;
    let mut child = std::process::Command::new(binary)
        .args(["--port", &port.to_string(), "--save", "", "--dir"])
        .arg(data)
        .args(options)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let result = async {
        let url = format!("redis://127.0.0.1:{port}/");
        let redis = redis::Client::open(url)?;
        let mut connection = None;
        for _ in 0..100 {
            match connect(&redis).await {
                Ok(c) => {
                    connection = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let mut connection = connection.context("redis-server did not answer")?;
        let started = Instant::now();
        let prefill = plan.prefill;
        for chunk in 0..prefill / 1000 {
            let mut pipe = redis::pipe();
            for i in 0..1000 {
                let event = payload_event(chunk * 1000 + i);
                let data = serde_json::to_string(&event.data)?;
                pipe.cmd("XADD")
                    .arg("jobs")
                    .arg("*")
                    .arg("data")
                    .arg(data)
                    .ignore();
            }
            pipe.query_async::<()>(&mut connection).await?;
        }
        println!(
            "  {name}: prefilled {prefill} messages in {:.1?}",
            started.elapsed()
        );
        let mut run = 0;
        for &consumers in plan.consumers {
            for &batch in plan.batches {
                run += 1;
                let group = format!("g{run}");
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg("jobs")
                    .arg(&group)
                    .arg("0")
                    .query_async::<()>(&mut connection)
                    .await?;
                let (acked, elapsed) =
                    redis_consume(&redis, &group, consumers, batch, run_for).await?;
                let label = format!("{name}: {consumers} consumers, XREADGROUP {batch}");
                report(&label, acked, elapsed, &mut Latencies::default(), None);
            }
        }
        if !plan.latency {
            return anyhow::Ok(());
        }
        let (count, elapsed, mut latencies) = redis_latency(&redis, run_for).await?;
        report(
            &format!("{name}: XADD → delivery, 4 consumers"),
            count,
            elapsed,
            &mut latencies,
            None,
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

type StreamReply = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;

async fn redis_consume(
    redis: &redis::Client,
    group: &str,
    consumers: usize,
    batch: usize,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + run_for;
    let mut tasks = Vec::new();
    for index in 0..consumers {
        // One connection per consumer, as separate client processes would have.
        let mut connection = connect(redis).await?;
        let (group, acked) = (group.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let consumer = format!("c{index}");
            while Instant::now() < deadline {
                let reply: Option<StreamReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&group)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(batch)
                    .arg("BLOCK")
                    .arg(500)
                    .arg("STREAMS")
                    .arg("jobs")
                    .arg(">")
                    .query_async(&mut connection)
                    .await?;
                let ids: Vec<String> = reply
                    .into_iter()
                    .flatten()
                    .flat_map(|(_, entries)| entries.into_iter().map(|(id, _)| id))
                    .collect();
                if !ids.is_empty() {
                    redis::cmd("XACK")
                        .arg("jobs")
                        .arg(&group)
                        .arg(&ids)
                        .query_async::<u64>(&mut connection)
                        .await?;
                    acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a consumer panicked")??;
    }
    Ok((acked.load(Ordering::Relaxed), started.elapsed()))
}

async fn redis_latency(
    redis: &redis::Client,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration, Latencies)> {
    let mut connection = connect(redis).await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("live")
        .arg("latency")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut connection)
        .await?;
    let writing = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let mut consumers = Vec::new();
    for index in 0..4 {
        let mut connection = connect(redis).await?;
        let writing = writing.clone();
        consumers.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let consumer = format!("c{index}");
            loop {
                let reply: Option<StreamReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("latency")
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(10)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg("live")
                    .arg(">")
                    .query_async(&mut connection)
                    .await?;
                let now = now_us();
                let mut ids = Vec::new();
                for (id, fields) in reply.into_iter().flatten().flat_map(|(_, entries)| entries) {
                    let sent = fields
                        .iter()
                        .find(|(name, _)| name == "data")
                        .and_then(|(_, data)| serde_json::from_str::<serde_json::Value>(data).ok())
                        .and_then(|data| data["sent_us"].as_u64());
                    latencies.0.push(now.saturating_sub(sent.unwrap_or(now)));
                    ids.push(id);
                }
                if ids.is_empty() {
                    if !writing.load(Ordering::Relaxed) {
                        return anyhow::Ok(latencies);
                    }
                    continue;
                }
                redis::cmd("XACK")
                    .arg("live")
                    .arg("latency")
                    .arg(&ids)
                    .query_async::<u64>(&mut connection)
                    .await?;
            }
        }));
    }
    let latencies = paced(run_for, &writing, consumers, |index| {
        let mut connection = connection.clone();
        async move {
            let data = serde_json::to_string(&payload_event(index).data)?;
            redis::cmd("XADD")
                .arg("live")
                .arg("*")
                .arg("data")
                .arg(data)
                .query_async::<String>(&mut connection)
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    Ok((latencies.0.len() as u64, started.elapsed(), latencies))
}

/// A connection without a response timeout: `XREADGROUP … BLOCK` answers late on purpose.
async fn connect(redis: &redis::Client) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
