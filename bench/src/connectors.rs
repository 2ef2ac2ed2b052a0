//! Kafka connectors against a local nisshi broker (in memory): the sink's and the source's
//! events/s, beside the broker's own produce rate as confluent-kafka (librdkafka) gets it in the
//! same sitting. The broker and the Python client are the ones the tests use (`.ci/run` installs
//! both).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use refract::metrics::Metrics;
use refract::store::{Store, StoreOptions};

use crate::BenchServer;
use crate::wasm_projections::write_orders;

const PARTITIONS: u32 = 3;

pub async fn run(dir: &Path, events: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let broker = Broker::start(dir)?;
    let bootstrap = broker.bootstrap.clone();

    // The broker's own rate, from librdkafka: records about the size of an order event.
    client(&[
        "create-topic",
        &bootstrap,
        "python",
        &PARTITIONS.to_string(),
    ])?;
    let produced: Value = serde_json::from_str(&client(&[
        "bench-produce",
        &bootstrap,
        "python",
        &events.to_string(),
        "120",
    ])?)?;
    let python_rate = events as f64 / produced["seconds"].as_f64().context("seconds")?;
    println!(
        "  {:<44} {python_rate:>12.0}",
        "confluent-kafka produce (acks=all, zstd)"
    );

    // The sink: order events written before it starts, sent until it has caught up.
    let data = dir.join("refract");
    let store = Store::open(&data, StoreOptions::default(), Arc::new(Metrics::new()))?;
    write_orders(&store, events).await?;
    let written = store.head();
    store.shutdown().await;
    drop(store);
    let server = BenchServer::start(&data).await?;
    let refract = server.client()?;
    client(&["create-topic", &bootstrap, "sink", &PARTITIONS.to_string()])?;
    let started = Instant::now();
    refract
        .put_connector(
            "sink",
            &json!({"kind": "kafka-sink", "bootstrap_servers": bootstrap, "topic": "sink",
                    "compression": "zstd"}),
        )
        .await?;
    wait(&refract, "sink", |info| {
        info["position"].as_u64() == Some(written - 1)
    })
    .await?;
    let sink_rate = written as f64 / started.elapsed().as_secs_f64();
    println!(
        "  {:<44} {sink_rate:>12.0}  ({:.2}x the Python producer)",
        format!("refract kafka-sink ({written} events, zstd)"),
        sink_rate / python_rate
    );

    // The source: the records the Python client produced, landed until none is left.
    let started = Instant::now();
    refract
        .put_connector(
            "source",
            &json!({"kind": "kafka-source", "bootstrap_servers": bootstrap, "topic": "python",
                    "stream": {"strategy": "key"}}),
        )
        .await?;
    wait(&refract, "source", |info| {
        info["offsets"].as_object().is_some_and(|offsets| {
            offsets.values().filter_map(Value::as_i64).sum::<i64>() == events as i64
        })
    })
    .await?;
    let source_rate = events as f64 / started.elapsed().as_secs_f64();
    println!(
        "  {:<44} {source_rate:>12.0}  ({:.2}x the Python producer)",
        format!("refract kafka-source ({events} records)"),
        source_rate / python_rate
    );
    server.stop().await
}

/// Polls a connector until `done` holds; fails if it faults or takes over ten minutes.
async fn wait(
    refract: &refract::client::Client,
    name: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = refract.connector(name).await?;
        if done(&info) {
            return Ok(());
        }
        if info["status"] == "faulted" || Instant::now() > deadline {
            bail!("connector {name} did not finish: {info}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `tests/kafka/client.py` in the tests' virtualenv; answers its output.
fn client(args: &[&str]) -> anyhow::Result<String> {
    let python = workspace().join("target/kafka-client/bin/python");
    if !python.exists() {
        bail!("{} is missing: .ci/run creates it", python.display());
    }
    let output = Command::new(python)
        .arg(workspace().join("tests/kafka/client.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        bail!(
            "kafka client {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

struct Broker {
    child: Child,
    bootstrap: String,
}

impl Broker {
    fn start(dir: &Path) -> anyhow::Result<Broker> {
        let cache = std::env::var_os("REFRACT_TOOLS_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/refract-tools"))
            })
            .context("HOME is not set")?;
        let nisshi = cache.join("nisshi-0.8.1-sqlite/bin/nisshi");
        if !nisshi.exists() {
            bail!("{} is missing: .ci/run installs it", nisshi.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(nisshi)
            .current_dir(dir)
            .args(["broker", "--storage-engine", "memory://nisshi/"])
            .args([
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args(["--cluster-id", "refract-bench"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the broker")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("the broker did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
