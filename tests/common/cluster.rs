//! Three `refract serve` nodes on loopback forming a cluster, optionally with a TCP proxy on
//! every link from one node to another.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::Server;
use super::browser::free_port;
use super::proxy::{Fault, LinkProxy};

pub struct Cluster {
    /// By id less one; `None` while a node is down.
    pub nodes: Vec<Option<Server>>,
    pub addresses: Vec<String>,
    /// Given to every node.
    extra: Vec<String>,
    /// The proxy each node reaches another through, by (from, to); empty without proxies.
    links: BTreeMap<(u64, u64), LinkProxy>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(extra);
        cluster.start_all();
        cluster
    }

    /// A cluster whose nodes reach each other through proxies a test can fault.
    pub async fn start_proxied(extra: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(extra);
        for from in 1..=3 {
            for to in (1..=3).filter(|to| *to != from) {
                let target = cluster.addresses[(to - 1) as usize].clone();
                cluster
                    .links
                    .insert((from, to), LinkProxy::start(target).await);
            }
        }
        cluster.start_all();
        cluster
    }

    fn new(extra: &[&str]) -> Cluster {
        Cluster {
            nodes: Vec::new(),
            addresses: (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            extra: extra.iter().map(|arg| arg.to_string()).collect(),
            links: BTreeMap::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn start_all(&mut self) {
        for id in 1..=3 {
            let node = self.start_node(id);
            self.nodes.push(Some(node));
        }
    }

    pub fn start_node(&self, id: u64) -> Server {
        let mut args = vec!["--node-id".to_owned(), id.to_string()];
        args.extend(self.extra.iter().cloned());
        for (other, address) in (1..=3).zip(&self.addresses) {
            if other != id {
                args.push("--peer".into());
                args.push(format!("{other}={address}"));
            }
            if let Some(proxy) = self.links.get(&(id, other)) {
                args.push("--peer-via".into());
                args.push(format!("{other}={}", proxy.address));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = self.dir.path().join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        Server::start_listening(Path::new(&dir), &self.addresses[(id - 1) as usize], &args)
    }

    pub fn node(&self, id: u64) -> &Server {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("a running node")
    }

    pub fn running(&self) -> impl Iterator<Item = (u64, &Server)> {
        (1..)
            .zip(&self.nodes)
            .filter_map(|(id, node)| Some((id, node.as_ref()?)))
    }

    /// `kill -9` of a node.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut node) = self.nodes[(id - 1) as usize].take() {
            node.kill();
        }
    }

    /// Starts a node that was killed, on its data directory and address.
    pub fn restart(&mut self, id: u64) {
        let node = self.start_node(id);
        self.nodes[(id - 1) as usize] = Some(node);
    }

    /// Puts `fault` on the links from `from` to `to`.
    pub fn fault(&self, from: u64, to: u64, fault: Fault) {
        self.links[&(from, to)].set(fault);
    }

    /// Cuts every link to and from `id`, or heals them with `Fault::None`.
    pub fn isolate(&self, id: u64, fault: Fault) {
        for ((from, to), proxy) in &self.links {
            if *from == id || *to == id {
                proxy.set(fault);
            }
        }
    }

    /// Waits until the leader `id` runs the projections and groups: it starts them once it has
    /// applied everything committed before its term, and answers 503 until then.
    pub async fn processing_on(&self, id: u64) {
        let node = self.node(id);
        for _ in 0..400 {
            let (status, body) = node.get("/groups").await;
            if status == 200 {
                return;
            }
            assert_eq!(status, 503, "{body}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {id} did not start its projections and groups");
    }

    /// On the leader `id`, once it runs its processing: deploys `event-counter` as `counter`
    /// and creates the group `path` (`stream/group`) reading from the start.
    pub async fn counter_and_group(&self, id: u64, path: &str) {
        self.processing_on(id).await;
        let node = self.node(id);
        let (status, body) = node
            .deploy("counter", super::guest("event-counter"), "")
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = node
            .put(&format!("/groups/{path}"), json!({"start_from": "start"}))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Waits until every running node names the same leader, one of them.
    pub async fn leader(&self) -> u64 {
        for _ in 0..400 {
            let mut seen = Vec::new();
            for (_, node) in self.running() {
                let (status, body) = node.get("/cluster").await;
                assert_eq!(status, 200, "{body}");
                seen.push(body["leader"].as_u64());
            }
            if let Some(Some(leader)) = seen.first().copied()
                && seen.iter().all(|other| *other == Some(leader))
                && self.running().any(|(id, _)| id == leader)
            {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the nodes did not agree on a leader");
    }
}
