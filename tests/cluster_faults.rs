//! Three nodes with a proxy on every link between them, under faults: `kill -9` of the leader,
//! the leader paused (`SIGSTOP`) for several election timeouts, the leader cut off from the
//! others, a follower's answers to the leader dropped, `kill -9` of all three, and a node killed
//! again while it installs a snapshot. Meanwhile writers race on a few streams with exact
//! expected revisions and unique ids, a reader on each node makes linearizable reads, an SSE
//! subscriber follows `$all` from node to node, a Wasm projection counts events and a consumer
//! group's consumer pulls and acks. After healing, every node holds the same `$all`; every acknowledged
//! event is in it once, where it was acknowledged; at most one write succeeded per stream and
//! expected revision; no write refused as never logged is there; no linearizable read missed an
//! acknowledged write; the subscriber saw `$all` once, in order; the projection counted every
//! event once; the group delivered every event and none again after its ack was answered.
//!
//! One round of faults in the suite; `REFRACT_FAULT_ROUNDS=N` runs N (with a whole-cluster kill
//! every fifth), for the long runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::proxy::Fault;
use futures::StreamExt;
use serde_json::{Value, json};

/// The streams the writers race on.
const STREAMS: [&str; 3] = ["account-1", "account-2", "account-3"];
const WRITERS: usize = 4;
/// The consumer group, on the first stream.
const GROUP: &str = "account-1/g";

/// A write the cluster acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    stream: String,
    expected: String,
    id: String,
    revision: u64,
    position: u64,
}

/// What the workload saw, checked against the nodes at the end.
#[derive(Default)]
struct Ledger {
    acked: Vec<Acked>,
    /// Writes whose outcome is unknown (no answer, or 503): they may be there or not.
    maybe: BTreeSet<String>,
    /// Writes refused before they were logged (409, 421): they must not be there.
    refused: BTreeSet<String>,
    /// The highest acknowledged revision of each stream.
    acked_high: BTreeMap<String, u64>,
    /// Linearizable reads answered, by node.
    linearizable_reads: [u64; 3],
    stale_reads: Vec<String>,
    /// `$all` as the subscriber received it: (position, id).
    subscribed: Vec<(u64, String)>,
    subscriber_faults: Vec<String>,
    /// Event ids the group delivered, and those whose ack it answered.
    group_delivered: BTreeSet<String>,
    group_acked: BTreeSet<String>,
    /// Messages delivered again after their ack was answered.
    group_faults: Vec<String>,
}

struct Workload {
    nodes: Vec<String>,
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    /// The group's consumer stops at its first empty pull once this is set.
    drain: AtomicBool,
}

impl Workload {
    fn acked(&self) -> usize {
        self.ledger.lock().unwrap().acked.len()
    }

    /// Waits until `count` more writes are acknowledged: the cluster is available.
    async fn progress(&self, count: usize, during: &str) {
        let start = self.acked();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < start + count {
            assert!(
                Instant::now() < deadline,
                "no write acknowledged for 30 s {during}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node a 421 names, or the next one when it names none.
    fn follow(&self, response: &reqwest::Response, current: usize) -> usize {
        let leader = response
            .headers()
            .get("refract-leader")
            .and_then(|value| value.to_str().ok());
        leader
            .and_then(|url| self.nodes.iter().position(|node| node == url))
            .unwrap_or((current + 1) % self.nodes.len())
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// The last revision of `stream` as the leader confirms it: `None` if it has no events, `Err`
/// with the node to ask next when this one could not answer.
async fn last_revision(
    workload: &Workload,
    http: &reqwest::Client,
    target: usize,
    stream: &str,
) -> Result<Option<u64>, usize> {
    let url = format!(
        "{}/streams/{stream}?direction=backward&limit=1&consistency=linearizable",
        workload.nodes[target]
    );
    let next = (target + 1) % workload.nodes.len();
    let response = http.get(url).send().await.map_err(|_| next)?;
    match response.status().as_u16() {
        200 => {
            let page: Value = response.json().await.map_err(|_| next)?;
            Ok(page["events"][0]["revision"].as_u64())
        }
        404 => Ok(None),
        421 => Err(workload.follow(&response, target)),
        503 => Err(next),
        status => panic!(
            "a linearizable read answered {status}: {}",
            response.text().await.unwrap_or_default()
        ),
    }
}

/// Appends one event at a time with the stream's expected revision, racing the other writers.
async fn writer(workload: Arc<Workload>, number: usize) {
    let http = http_client();
    let mut target = number % workload.nodes.len();
    let mut turn = number;
    while !workload.stop.load(Ordering::Relaxed) {
        turn += 1;
        let stream = STREAMS[turn % STREAMS.len()];
        let expected = match last_revision(&workload, &http, target, stream).await {
            Ok(revision) => revision.map_or("no_stream".to_owned(), |last| last.to_string()),
            Err(next) => {
                target = next;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let sent = http
            .post(format!("{}/streams/{stream}", workload.nodes[target]))
            .header("Expected-Revision", &expected)
            .json(&json!([{"id": id, "type": "Deposited", "data": {"writer": number}}]))
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(_) => {
                workload.ledger.lock().unwrap().maybe.insert(id);
                target = (target + 1) % workload.nodes.len();
                continue;
            }
        };
        match response.status().as_u16() {
            200 => match response.json::<Value>().await {
                Ok(body) => {
                    let revision = body["first_revision"].as_u64().unwrap();
                    let mut ledger = workload.ledger.lock().unwrap();
                    let high = ledger.acked_high.entry(stream.to_owned()).or_default();
                    *high = (*high).max(revision);
                    ledger.acked.push(Acked {
                        stream: stream.to_owned(),
                        expected,
                        id,
                        revision,
                        position: body["first_position"].as_u64().unwrap(),
                    });
                }
                Err(_) => {
                    workload.ledger.lock().unwrap().maybe.insert(id);
                }
            },
            409 => {
                workload.ledger.lock().unwrap().refused.insert(id);
            }
            421 => {
                workload.ledger.lock().unwrap().refused.insert(id);
                target = workload.follow(&response, target);
            }
            503 => {
                workload.ledger.lock().unwrap().maybe.insert(id);
                target = (target + 1) % workload.nodes.len();
            }
            status => panic!(
                "an append answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
}

/// Linearizable reads on one node (followers ask the leader for a read index): each must show
/// every write acknowledged before it began.
async fn reader(workload: Arc<Workload>, home: usize) {
    let http = http_client();
    let mut turn = 0;
    while !workload.stop.load(Ordering::Relaxed) {
        turn += 1;
        let stream = STREAMS[turn % STREAMS.len()];
        let before = workload
            .ledger
            .lock()
            .unwrap()
            .acked_high
            .get(stream)
            .copied();
        match last_revision(&workload, &http, home, stream).await {
            Ok(seen) => {
                let mut ledger = workload.ledger.lock().unwrap();
                ledger.linearizable_reads[home] += 1;
                if seen < before {
                    ledger.stale_reads.push(format!(
                        "{stream}: read {seen:?} after {before:?} was acknowledged"
                    ));
                }
            }
            // Down, cut off, or without a leader: the same node again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The group's one consumer: pulls from the leader and acks what it got.
async fn consumer(workload: Arc<Workload>) {
    let http = http_client();
    let mut target = 0;
    loop {
        let node = &workload.nodes[target];
        let pull = format!("{node}/groups/{GROUP}/pull?consumer=c&max=100&wait_ms=500");
        let Ok(response) = http.post(pull).send().await else {
            target = (target + 1) % workload.nodes.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match response.status().as_u16() {
            200 => {}
            421 => {
                target = workload.follow(&response, target);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            503 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            status => panic!(
                "a pull answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
        let Ok(body) = response.json::<Value>().await else {
            continue;
        };
        let messages = body["messages"].as_array().unwrap();
        if messages.is_empty() {
            if workload.drain.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        let mut ids = Vec::new();
        {
            let mut ledger = workload.ledger.lock().unwrap();
            for message in messages {
                let id = message["event"]["id"].as_str().unwrap().to_owned();
                if ledger.group_acked.contains(&id) {
                    ledger
                        .group_faults
                        .push(format!("{id} came again after its ack"));
                }
                ledger.group_delivered.insert(id.clone());
                ids.push(id);
            }
        }
        let acks: Vec<&Value> = messages.iter().map(|message| &message["ack_id"]).collect();
        let acked = http
            .post(format!("{node}/groups/{GROUP}/ack"))
            .json(&json!({ "ack_ids": acks }))
            .send()
            .await;
        if acked.is_ok_and(|response| response.status() == 204) {
            workload.ledger.lock().unwrap().group_acked.extend(ids);
        }
    }
}

/// Follows `$all` over SSE, moving to the next node (with `Last-Event-ID`) when its node dies or
/// goes quiet, until stopped and caught up with `head`.
async fn subscriber(workload: Arc<Workload>, head: Arc<Mutex<Option<u64>>>) {
    use eventsource_stream::Eventsource;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut target = 2;
    let mut last: Option<u64> = None;
    loop {
        if let (Some(head), Some(last)) = (*head.lock().unwrap(), last)
            && last >= head
        {
            return;
        }
        let mut request = http.get(format!("{}/streams/$all/subscribe", workload.nodes[target]));
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let Ok(response) = request.send().await else {
            target = (target + 1) % workload.nodes.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if response.status() != 200 {
            target = (target + 1) % workload.nodes.len();
            continue;
        }
        let mut messages = response.bytes_stream().eventsource();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(3), messages.next()).await;
            let Ok(Some(Ok(message))) = message else {
                break;
            };
            if message.event != "event" {
                continue;
            }
            let event: Value = serde_json::from_str(&message.data).unwrap();
            let position = event["position"].as_u64().unwrap();
            let mut ledger = workload.ledger.lock().unwrap();
            if last.is_some_and(|last| position <= last) {
                ledger
                    .subscriber_faults
                    .push(format!("position {position} after {last:?}"));
            }
            ledger
                .subscribed
                .push((position, event["id"].as_str().unwrap().to_owned()));
            last = Some(position);
        }
        if let (Some(head), Some(last)) = (*head.lock().unwrap(), last)
            && last >= head
        {
            return;
        }
        // Quiet for 3 s, or the node went away: carry on from another one.
        target = (target + 1) % workload.nodes.len();
    }
}

/// One round of every fault, each with the workload running and the cluster acknowledging writes
/// during or right after it.
/// Answers how long the cluster took to acknowledge a write after its leader was killed.
async fn faults(
    cluster: &mut Cluster,
    workload: &Workload,
    round: usize,
    kill_all: bool,
) -> Duration {
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let killed = Instant::now();
    let elected = async {
        let elected = cluster.leader().await;
        (elected, killed.elapsed())
    };
    let ((elected, election), ()) =
        tokio::join!(elected, workload.progress(1, "after the leader was killed"));
    let failover = killed.elapsed();
    eprintln!(
        "leader {leader} killed: node {elected} elected after {election:?}, a write acknowledged after {failover:?}"
    );
    workload.progress(5, "after the leader was killed").await;
    cluster.restart(leader);

    let leader = cluster.leader().await;
    cluster.node(leader).signal("STOP");
    workload.progress(5, "while the leader was paused").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.node(leader).signal("CONT");

    let leader = cluster.leader().await;
    cluster.isolate(leader, Fault::Cut);
    workload.progress(5, "while the leader was cut off").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.isolate(leader, Fault::None);

    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.fault(leader, follower, Fault::DropReplies);
    workload
        .progress(5, "while a follower's answers were dropped")
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.fault(leader, follower, Fault::None);

    if kill_all {
        for id in 1..=3 {
            cluster.kill(id);
        }
        for id in 1..=3 {
            cluster.restart(id);
        }
        workload
            .progress(5, "after the whole cluster was killed")
            .await;
    }

    // A follower falls behind the log the others keep, so it restarts into a snapshot, and is
    // killed again a moment later, while installing it (or about then: the delay varies).
    let leader = cluster.leader().await;
    let follower = (1..=3).rev().find(|id| *id != leader).unwrap();
    cluster.kill(follower);
    workload.progress(60, "with a follower down").await;
    cluster.restart(follower);
    let delay = 50 + (round as u64 * 70) % 400;
    tokio::time::sleep(Duration::from_millis(delay)).await;
    cluster.kill(follower);
    cluster.restart(follower);
    workload
        .progress(5, "after a restart during a snapshot")
        .await;
    failover
}

/// Every node's `$all`, once they all hold the same number of events.
async fn converged(cluster: &Cluster) -> Vec<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut heads = Vec::new();
        for (_, node) in cluster.running() {
            let (status, page) = node.get("/streams/$all?direction=backward&limit=1").await;
            assert_eq!(status, 200, "{page}");
            heads.push(page["events"][0]["position"].as_u64());
        }
        if heads.iter().all(|head| *head == heads[0]) {
            let mut everything = Vec::new();
            for (_, node) in cluster.running() {
                everything.push(node.read_everything("$all").await);
            }
            return everything;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes did not converge: heads {heads:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fault_loses_or_duplicates_an_acknowledged_write() {
    let rounds: usize = std::env::var("REFRACT_FAULT_ROUNDS")
        .ok()
        .map(|rounds| rounds.parse().expect("REFRACT_FAULT_ROUNDS is a number"))
        .unwrap_or(1);
    // Snapshots often, and little log behind them, so a node down for a while needs one.
    let mut cluster = Cluster::start_proxied(&["--snapshot-every", "40", "--log-keep", "10"]).await;
    let leader = cluster.leader().await;
    cluster.counter_and_group(leader, GROUP).await;
    let workload = Arc::new(Workload {
        nodes: cluster
            .addresses
            .iter()
            .map(|address| format!("http://{address}"))
            .collect(),
        ledger: Mutex::default(),
        stop: AtomicBool::new(false),
        drain: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    for number in 0..WRITERS {
        tasks.push(tokio::spawn(writer(workload.clone(), number)));
    }
    for home in 0..3 {
        tasks.push(tokio::spawn(reader(workload.clone(), home)));
    }
    let consuming = tokio::spawn(consumer(workload.clone()));
    let head = Arc::new(Mutex::new(None));
    let subscription = tokio::spawn(subscriber(workload.clone(), head.clone()));
    workload.progress(20, "before any fault").await;

    let mut failovers = Vec::new();
    for round in 0..rounds {
        let kill_all = rounds == 1 || round % 5 == 4;
        failovers.push(faults(&mut cluster, &workload, round, kill_all).await);
        eprintln!(
            "round {} of {rounds}: {} writes acknowledged",
            round + 1,
            workload.acked()
        );
    }
    workload.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let everything = converged(&cluster).await;
    let all = &everything[0];
    for (other, node) in everything.iter().zip(1..).skip(1) {
        assert!(other == all, "node {node}'s $all differs from node 1's");
    }
    *head.lock().unwrap() = all.last().and_then(|event| event["position"].as_u64());
    tokio::time::timeout(Duration::from_secs(60), subscription)
        .await
        .expect("the subscriber caught up")
        .unwrap();
    workload.drain.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), consuming)
        .await
        .expect("the consumer drained the group")
        .unwrap();
    let leader = cluster.leader().await;
    let node = cluster.node(leader);
    cluster.processing_on(leader).await;
    let counted = node.caught_up("counter").await;
    let (status, counts) = node.get("/projections/counter/state").await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["count"], all.len(), "{counted}");
    // Every node holds the same model: the same digest, once each applied as far.
    for (id, node) in cluster.running() {
        let (status, body) = node
            .get("/projections/counter?consistency=linearizable")
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["digest"], counted["digest"],
            "node {id}'s counter: {body}"
        );
    }

    // Every task has stopped: the ledger is final.
    let ledger = std::mem::take(&mut *workload.ledger.lock().unwrap());
    let by_id: BTreeMap<&str, &Value> = all
        .iter()
        .map(|event| (event["id"].as_str().unwrap(), event))
        .collect();
    assert_eq!(by_id.len(), all.len(), "an event is in $all twice");
    for acked in &ledger.acked {
        let event = by_id
            .get(acked.id.as_str())
            .unwrap_or_else(|| panic!("acknowledged {acked:?} is missing"));
        assert_eq!(event["position"], acked.position, "{acked:?}");
        assert_eq!(event["stream"], acked.stream.as_str(), "{acked:?}");
        assert_eq!(event["revision"], acked.revision, "{acked:?}");
    }
    let mut successes = BTreeSet::new();
    for acked in &ledger.acked {
        assert!(
            successes.insert((&acked.stream, &acked.expected)),
            "two writes to {} at expected revision {} succeeded",
            acked.stream,
            acked.expected
        );
    }
    let acked_ids: BTreeSet<&str> = ledger.acked.iter().map(|acked| acked.id.as_str()).collect();
    for event in all {
        let id = event["id"].as_str().unwrap();
        assert!(!ledger.refused.contains(id), "refused write {id} is there");
        assert!(
            acked_ids.contains(id) || ledger.maybe.contains(id),
            "{id} was never written"
        );
    }
    for stream in STREAMS {
        let events = cluster.node(1).read_everything(stream).await;
        let revisions: Vec<u64> = events
            .iter()
            .map(|event| event["revision"].as_u64().unwrap())
            .collect();
        assert_eq!(revisions, (0..events.len() as u64).collect::<Vec<_>>());
    }
    assert!(ledger.stale_reads.is_empty(), "{:?}", ledger.stale_reads);
    assert!(
        ledger.linearizable_reads.iter().all(|reads| *reads > 0),
        "a node answered no linearizable read: {:?}",
        ledger.linearizable_reads
    );
    assert!(
        ledger.subscriber_faults.is_empty(),
        "{:?}",
        ledger.subscriber_faults
    );
    let subscribed: Vec<(u64, String)> = all
        .iter()
        .map(|event| {
            let position = event["position"].as_u64().unwrap();
            (position, event["id"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(ledger.subscribed, subscribed, "the subscriber's $all");
    assert!(ledger.group_faults.is_empty(), "{:?}", ledger.group_faults);
    assert!(
        !ledger.group_acked.is_empty(),
        "the group's consumer never had an ack answered"
    );
    for event in cluster.node(1).read_everything(STREAMS[0]).await {
        let id = event["id"].as_str().unwrap();
        assert!(
            ledger.group_delivered.contains(id),
            "the group never delivered {id}"
        );
    }
    failovers.sort();
    let percentile = |p: usize| failovers[(failovers.len() * p / 100).min(failovers.len() - 1)];
    eprintln!(
        "failover (leader killed -> next acknowledged write) over {} kills: p50 {:?}, p99 {:?}, \
         max {:?}",
        failovers.len(),
        percentile(50),
        percentile(99),
        failovers.last().unwrap()
    );
    eprintln!(
        "{} acknowledged, {} unknown, {} refused, {:?} linearizable reads by node, {} events in $all, \
         {} delivered and {} acked by the group",
        ledger.acked.len(),
        ledger.maybe.len(),
        ledger.refused.len(),
        ledger.linearizable_reads,
        all.len(),
        ledger.group_delivered.len(),
        ledger.group_acked.len()
    );
}
