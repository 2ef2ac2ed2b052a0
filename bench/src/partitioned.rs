//! Partitioned consumer groups (Kafka's model): delivered and committed messages/s by consumers
//! and pull batch, with each partition's order checked as messages arrive, against the
//! per-message-ack groups and Redis Streams (`XREADGROUP` + one `XACK` per batch) on the same
//! messages in the same run.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::groups::{RedisPlan, payload_event, redis_baselines, refract_consume};
use crate::{BenchServer, Latencies, report};
use refract::client::{
    Client, GroupSettings, NewEvent, PartitionConsumer, StartFrom, StartName, Strategy,
};
use refract::store::ExpectedRevision;

const CONSUMERS: [usize; 3] = [1, 4, 16];
const BATCHES: [usize; 2] = [100, 1_000];
/// Messages written before the runs: more than the fastest run takes in its time.
const PREFILL: u64 = 3_000_000;
/// Partitions of the groups: one per consumer at 16.
const PARTITIONS: u32 = 16;
/// Streams the messages are spread over (the sharder keys by customer, one per stream).
const STREAMS: u64 = 1_000;

pub async fn run(dir: &Path, guests: &Path, seconds: u64) -> anyhow::Result<()> {
    let run_for = Duration::from_secs(seconds.clamp(1, 3));
    let server = BenchServer::start(&dir.join("refract")).await?;
    let client = server.client()?;
    let sharder = std::fs::read(guests.join("shard_by_customer.wasm"))
        .context("build the guests first: cargo build --profile guest --target wasm32-wasip2")?;
    client.deploy_sharder("by-customer", sharder).await?;
    prefill(&client).await?;
    let mut run = 0;
    for consumers in CONSUMERS {
        for batch in BATCHES {
            run += 1;
            let group = format!("p{run}");
            let settings = GroupSettings {
                start_from: StartFrom::Named(StartName::Start),
                message_timeout_ms: 60_000,
                history_buffer_size: 10_000,
                strategy: Strategy::Partitioned {
                    sharder: "by-customer".into(),
                    partitions: PARTITIONS,
                },
                ..GroupSettings::default()
            };
            client.put_group("$all", &group, &settings).await?;
            let (committed, elapsed) = consume(&client, &group, consumers, batch, run_for).await?;
            client.delete_group("$all", &group).await?;
            let label = format!("partitioned: {consumers} consumers, pull {batch}, commit each");
            report(&label, committed, elapsed, &mut Latencies::default(), None);
        }
    }
    for consumers in CONSUMERS {
        for batch in BATCHES {
            run += 1;
            let group = format!("g{run}");
            let settings = GroupSettings {
                start_from: StartFrom::Named(StartName::Start),
                message_timeout_ms: 60_000,
                ..GroupSettings::default()
            };
            client.put_group("$all", &group, &settings).await?;
            let (acked, elapsed) =
                refract_consume(&client, "$all", &group, consumers, batch, run_for).await?;
            client.delete_group("$all", &group).await?;
            let label = format!("per-message acks: {consumers} consumers, pull {batch}");
            report(&label, acked, elapsed, &mut Latencies::default(), None);
        }
    }
    server.stop().await?;
    let plan = RedisPlan {
        consumers: &CONSUMERS,
        batches: &BATCHES,
        prefill: PREFILL,
        latency: false,
    };
    redis_baselines(dir, run_for, &plan).await
}

async fn prefill(client: &Client) -> anyhow::Result<()> {
    let started = Instant::now();
    for chunk in 0..PREFILL / 1000 {
        let events: Vec<NewEvent> = (0..1000).map(|i| payload_event(chunk * 1000 + i)).collect();
        client
            .append(
                &format!("job-{}", chunk % STREAMS),
                ExpectedRevision::Any,
                &events,
            )
            .await?;
    }
    println!(
        "  prefilled {PREFILL} messages over {STREAMS} streams in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Consumers poll, note each message processed and commit after every poll, for `run_for`.
/// Returns the messages whose commit was answered, and the time taken. Fails when a partition's
/// messages come out of order within a generation.
async fn consume(
    client: &Client,
    group: &str,
    consumers: usize,
    batch: usize,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let committed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + run_for;
    let tasks: Vec<_> = (0..consumers)
        .map(|index| {
            let (client, group, committed) = (client.clone(), group.to_owned(), committed.clone());
            tokio::spawn(async move {
                let mut consumer =
                    PartitionConsumer::new(client, "$all", &group, &format!("c{index}"));
                // Per partition, the generation and offset of the last message.
                let mut last: HashMap<u32, (u64, u64)> = HashMap::new();
                while Instant::now() < deadline {
                    let messages = consumer.poll(batch, Duration::from_millis(500)).await?;
                    let generation = consumer.assignment().map_or(0, |(g, _)| g);
                    for message in &messages {
                        let previous = last.insert(message.partition, (generation, message.offset));
                        if let Some((seen_in, offset)) = previous
                            && seen_in == generation
                            && offset >= message.offset
                        {
                            anyhow::bail!(
                                "partition {} went from offset {offset} to {} in generation {generation}",
                                message.partition,
                                message.offset
                            );
                        }
                        consumer.processed(message);
                    }
                    if consumer.commit().await? {
                        committed.fetch_add(messages.len() as u64, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("a consumer panicked")??;
    }
    Ok((committed.load(Ordering::Relaxed), started.elapsed()))
}
