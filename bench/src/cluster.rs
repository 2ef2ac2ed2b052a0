//! A three-node cluster on loopback, in this process (so the nodes and the clients share the
//! cores, as they would on one machine): appends at 1, 16 and 64 clients against the leader
//! beside a single node measured in the same sitting; how fast a follower that was stopped
//! catches up from the log; how long one that fell behind a snapshot takes to install it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{BenchServer, Connection, appends, sample_event};
use refract::client::NewEvent;
use refract::cluster::node::SnapshotTuning;
use refract::http::{ClusterOptions, ServeConfig};

const CLIENTS: [usize; 3] = [1, 16, 64];
/// Events per request when filling the log for a follower to catch up on.
const FILL_BATCH: u64 = 1_000;

pub async fn run(dir: &Path, seconds: u64, events: u64) -> anyhow::Result<()> {
    let single = BenchServer::start(&dir.join("single")).await?;
    let mut single_rates = Vec::new();
    for clients in CLIENTS {
        let label = format!("single node, 1 event/request, {clients} clients");
        single_rates.push(appends(&single, &label, clients, 1, seconds).await?);
    }
    single.stop().await?;

    let mut cluster = Cluster::start(&dir.join("log"), SnapshotTuning::default()).await?;
    let leader = cluster.leader().await?;
    let mut ratios = Vec::new();
    for (clients, single) in CLIENTS.into_iter().zip(single_rates) {
        let label = format!("3 nodes, 1 event/request, {clients} clients");
        let rate = appends(cluster.node(leader), &label, clients, 1, seconds).await?;
        ratios.push(format!("{:.2} at {clients}", rate / single));
    }
    println!("  3 nodes / single node: {}", ratios.join(", "));
    let seconds = cluster.catch_up(leader, events).await?;
    println!(
        "  a follower catches up on {events} events from the log: {seconds:.2} s, {:.0} events/s",
        events as f64 / seconds
    );
    cluster.stop().await?;

    // Snapshots every 50 entries and little log behind them: a follower down while the events
    // are written comes back to a purged log and gets a snapshot.
    let tuning = SnapshotTuning {
        every: 50,
        keep: 10,
    };
    let mut cluster = Cluster::start(&dir.join("snapshot"), tuning).await?;
    let leader = cluster.leader().await?;
    let seconds = cluster.catch_up(leader, events).await?;
    println!(
        "  a follower behind the purged log gets a snapshot of {events} events and catches up: \
         {seconds:.2} s"
    );
    cluster.stop().await
}

struct Cluster {
    configs: BTreeMap<u64, ServeConfig>,
    nodes: BTreeMap<u64, BenchServer>,
}

impl Cluster {
    async fn start(dir: &Path, snapshots: SnapshotTuning) -> anyhow::Result<Cluster> {
        let mut addresses = BTreeMap::new();
        for id in 1..=3 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            addresses.insert(id, listener.local_addr()?);
        }
        let mut cluster = Cluster {
            configs: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for (id, address) in &addresses {
            let mut config = BenchServer::config(&dir.join(id.to_string()));
            config.listen = *address;
            config.cluster = Some(ClusterOptions {
                node_id: *id,
                peers: addresses
                    .iter()
                    .filter(|(other, _)| *other != id)
                    .map(|(other, address)| (*other, address.to_string()))
                    .collect(),
                routes: BTreeMap::new(),
                join: None,
                advertise_url: None,
                snapshots,
                secret: None,
                forward_writes: false,
            });
            cluster.configs.insert(*id, config);
        }
        for id in 1..=3 {
            cluster.restart(id).await?;
        }
        Ok(cluster)
    }

    fn node(&self, id: u64) -> &BenchServer {
        &self.nodes[&id]
    }

    async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let node = BenchServer::start_with(self.configs[&id].clone()).await?;
        self.nodes.insert(id, node);
        Ok(())
    }

    /// The node every running node names as the leader.
    async fn leader(&self) -> anyhow::Result<u64> {
        let http = reqwest::Client::new();
        for _ in 0..400 {
            let mut seen = Vec::new();
            for node in self.nodes.values() {
                let url = format!("http://{}/cluster", node.address);
                let status: serde_json::Value = http.get(url).send().await?.json().await?;
                seen.push(status["leader"].as_u64());
            }
            if let Some(Some(leader)) = seen.first().copied()
                && seen.iter().all(|other| *other == Some(leader))
            {
                return Ok(leader);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the nodes did not agree on a leader")
    }

    /// Stops a follower, writes `events` through the leader, starts the follower again and
    /// answers the seconds until it has applied them all.
    async fn catch_up(&mut self, leader: u64, events: u64) -> anyhow::Result<f64> {
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        self.nodes
            .remove(&follower)
            .expect("running")
            .stop()
            .await?;
        fill(self.node(leader), events).await?;
        let head = head(self.node(leader)).await?;
        let started = Instant::now();
        self.restart(follower).await?;
        while head_or_zero(self.node(follower)).await < head {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the follower did not catch up in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    async fn stop(self) -> anyhow::Result<()> {
        for node in self.nodes.into_values() {
            node.stop().await?;
        }
        Ok(())
    }
}

/// Appends `events` in batches of [`FILL_BATCH`] from four connections.
async fn fill(server: &BenchServer, events: u64) -> anyhow::Result<()> {
    let requests = events.div_ceil(FILL_BATCH);
    let batch: Vec<NewEvent> = (0..FILL_BATCH).map(sample_event).collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&batch)?);
    let mut tasks = Vec::new();
    for client in 0..4 {
        let body = body.clone();
        let address = server.address;
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(address).await?;
            for request in (client..requests).step_by(4) {
                let path = format!("/streams/fill-{}", request % 100);
                connection.post(&path, body.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a filling client panicked")??;
    }
    Ok(())
}

/// The last position in a node's `$all`.
async fn head(server: &BenchServer) -> anyhow::Result<u64> {
    let url = format!(
        "http://{}/streams/$all?direction=backward&limit=1",
        server.address
    );
    let page: serde_json::Value = reqwest::get(url).await?.json().await?;
    page["events"][0]["position"]
        .as_u64()
        .context("the node has no events")
}

async fn head_or_zero(server: &BenchServer) -> u64 {
    head(server).await.unwrap_or(0)
}
