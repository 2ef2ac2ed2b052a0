//! Sharding: sharder evaluations per second in-process (batches and single events), and appends
//! through `ShardedClient` over one and three nodes in this process, next to the plain client.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{BenchServer, Latencies, report};
use refract::client::{Client, NewEvent, ShardedClient, shard_input};
use refract::sharding::Sharder;
use refract::store::ExpectedRevision;

/// Concurrent appending tasks.
const CLIENTS: usize = 64;

pub async fn run(dir: &Path, guests: &Path, seconds: u64) -> anyhow::Result<()> {
    let path = guests.join("shard_by_customer.wasm");
    let component = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; build it first: cargo build --profile guest --target \
             wasm32-wasip2 -p shard-by-customer",
            path.display()
        )
    })?;
    let sharder = tokio::task::block_in_place(|| Sharder::standalone(&component))?;
    let inputs = (0..1_000_000u64)
        .map(|n| shard_input(&format!("order-{n}"), &event(n)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        for batch in inputs.chunks(1000) {
            sharder.shard(batch, 16)?;
        }
        anyhow::Ok(())
    })?;
    let elapsed = started.elapsed();
    println!(
        "  shard-by-customer, batches of 1000: {:.0} evaluations/s ({:.0} ns each)",
        inputs.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / inputs.len() as f64
    );
    let singles = &inputs[..100_000];
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        for input in singles {
            sharder.shard(std::slice::from_ref(input), 16)?;
        }
        anyhow::Ok(())
    })?;
    let elapsed = started.elapsed();
    println!(
        "  shard-by-customer, one event per call (the routing cost of an append): {:.2} µs",
        elapsed.as_secs_f64() * 1e6 / singles.len() as f64
    );

    let mut servers = Vec::new();
    for node in 0..3 {
        servers.push(BenchServer::start(&dir.join(format!("node-{node}"))).await?);
    }
    let urls: Vec<String> = servers
        .iter()
        .map(|server| format!("http://{}", server.address))
        .collect();
    let file = dir.join("shard_by_customer.wasm");
    std::fs::write(&file, &component)?;
    let plain = Client::new(&urls[0], None)?;
    appends(
        "append 1 event, plain client, 1 node",
        Appender::Plain(plain),
        seconds,
    )
    .await?;
    for count in [1, 3] {
        let source = refract::client::SharderSource::File(file.clone());
        let client = ShardedClient::connect(&urls[..count], None, &source).await?;
        let label = format!("append 1 event, ShardedClient, {count} node(s)");
        appends(&label, Appender::Sharded(Arc::new(client)), seconds).await?;
    }
    for server in servers {
        server.stop().await?;
    }
    Ok(())
}

fn event(n: u64) -> NewEvent {
    NewEvent::json(
        "OrderPlaced",
        serde_json::json!({"customer_id": format!("customer-{}", n % 10_000), "total_cents": n % 5000}),
    )
}

#[derive(Clone)]
enum Appender {
    Plain(Client),
    Sharded(Arc<ShardedClient>),
}

async fn appends(label: &str, appender: Appender, seconds: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..CLIENTS as u64 {
        let appender = appender.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = task;
            while Instant::now() < deadline {
                let stream = format!("order-{n}");
                let events = [event(n)];
                let request_started = Instant::now();
                match &appender {
                    Appender::Plain(client) => {
                        client
                            .append(&stream, ExpectedRevision::Any, &events)
                            .await?;
                    }
                    Appender::Sharded(client) => {
                        client
                            .append(&stream, ExpectedRevision::Any, &events)
                            .await?;
                    }
                }
                latencies.push(request_started.elapsed().as_micros() as u64);
                n += CLIENTS as u64;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Latencies::default();
    for task in tasks {
        latencies.0.extend(task.await??);
    }
    let events = latencies.0.len() as u64;
    report(label, events, started.elapsed(), &mut latencies, None);
    Ok(())
}
