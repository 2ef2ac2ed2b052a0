//! EventStoreDB's gRPC API through its own Rust client (`kurrentdb`) against the HTTP API, on the
//! same server in the same sitting: single-event appends at 1 and 16 clients, and reading a
//! stream and `$all` of 50,000 events.

use std::path::Path;
use std::time::{Duration, Instant};

use kurrentdb::{EventData, ReadAllOptions, ReadStreamOptions};

use crate::{BenchServer, Latencies, appends, gather, report, sample_event};
use refract::client::{NewEvent, ReadOptions};
use refract::store::ExpectedRevision;

const READ_EVENTS: u64 = 50_000;
const GRPC_READ_STREAM: &str = "bench-grpc-read";

pub async fn run(dir: &Path, seconds: u64) -> anyhow::Result<()> {
    let server = BenchServer::start(&dir.join("esdb")).await?;
    for clients in [1, 16] {
        let label = format!("HTTP append 1 event/request, {clients} clients");
        appends(&server, &label, clients, 1, seconds).await?;
        grpc_appends(&server, clients, seconds).await?;
    }
    read_both_ways(&server).await?;
    server.stop().await
}

fn grpc_client(server: &BenchServer) -> anyhow::Result<kurrentdb::Client> {
    let url = format!("esdb://{}?tls=false", server.address);
    kurrentdb::Client::new(url.parse()?).map_err(|error| anyhow::anyhow!("{error}"))
}

/// The benchmark's sample event as the gRPC client sends it.
fn grpc_event(index: u64) -> anyhow::Result<EventData> {
    let NewEvent {
        event_type,
        data,
        metadata,
        ..
    } = sample_event(index);
    Ok(EventData::json(event_type, &data)?
        .metadata_as_json(&metadata)?
        .id(uuid::Uuid::new_v4()))
}

/// Each client its own connection (a `kurrentdb::Client` multiplexes its calls over one), one
/// append at a time, as the HTTP clients do.
async fn grpc_appends(server: &BenchServer, clients: usize, seconds: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let client = grpc_client(server)?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let stream = format!("grpc-bench{clients}-{client_index}_{}", sent % 1000);
                let event = grpc_event(sent)?;
                let request_started = Instant::now();
                client
                    .append_to_stream(stream, &Default::default(), event)
                    .await?;
                latencies.push(request_started.elapsed().as_micros() as u64);
                sent += 1;
            }
            anyhow::Ok((sent, latencies))
        }));
    }
    let (events, mut latencies) = gather(tasks).await?;
    let label = format!("gRPC append 1 event/call, {clients} clients");
    report(&label, events, started.elapsed(), &mut latencies, None);
    Ok(())
}

async fn read_both_ways(server: &BenchServer) -> anyhow::Result<()> {
    let client = server.client()?;
    for chunk in 0..READ_EVENTS / 1000 {
        let events: Vec<NewEvent> = (chunk * 1000..(chunk + 1) * 1000)
            .map(sample_event)
            .collect();
        client
            .append(GRPC_READ_STREAM, ExpectedRevision::Any, &events)
            .await?;
    }
    let grpc = grpc_client(server)?;
    for stream in [GRPC_READ_STREAM, "$all"] {
        let started = Instant::now();
        let mut events = 0u64;
        let mut options = ReadOptions {
            limit: Some(4096),
            ..ReadOptions::default()
        };
        loop {
            let page = client.read(stream, &options).await?;
            events += page.events.len() as u64;
            match page.next {
                Some(next) => options.from = Some(next),
                None => break,
            }
        }
        let label = format!("HTTP read {stream} (4096/page)");
        report(
            &label,
            events,
            started.elapsed(),
            &mut Latencies::default(),
            None,
        );

        let started = Instant::now();
        let mut read = if stream == "$all" {
            grpc.read_all(&ReadAllOptions::default()).await?
        } else {
            grpc.read_stream(stream, &ReadStreamOptions::default())
                .await?
        };
        let mut events = 0u64;
        while read.next().await?.is_some() {
            events += 1;
        }
        let label = format!("gRPC read {stream} (one call)");
        report(
            &label,
            events,
            started.elapsed(),
            &mut Latencies::default(),
            None,
        );
    }
    Ok(())
}
