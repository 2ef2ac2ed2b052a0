//! Sharders and client-side sharding against real nodes. Where an event should go is computed
//! here from the rule of `projections/shard-by-customer`, never by asking a sharder.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::{Random, Server, fnv1a_64, guest};
use futures::StreamExt;
use refract::client::{
    Checkpoints, FanIn, FanInSubscription, NewEvent, ReadOptions, ShardedClient, SharderSource,
    shard_input,
};
use refract::store::ExpectedRevision;
use serde_json::{Value, json};

/// metadata `customer_id` if a string, else data `customer_id` if a string, else the stream.
fn expected_shard(stream: &str, event: &NewEvent, shards: u64) -> usize {
    let customer = |json: &Option<Value>| {
        json.as_ref()
            .and_then(|json| json.get("customer_id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let key = customer(&event.metadata)
        .or_else(|| customer(&event.data))
        .unwrap_or_else(|| stream.to_owned());
    (fnv1a_64(key.as_bytes()) % shards) as usize
}

/// An event whose customer id sits in the metadata, in the data, is not a string, or is absent.
fn random_event(random: &mut Random) -> NewEvent {
    let customer = format!("customer-{}", random.below(50));
    let (data, metadata) = match random.below(5) {
        0 => (
            json!({"customer_id": "ignored"}),
            Some(json!({"customer_id": customer})),
        ),
        1 => (
            json!({"customer_id": customer}),
            Some(json!({"customer_id": 7})),
        ),
        2 => (json!({"customer_id": customer}), None),
        3 => (json!({"customer_id": 12}), None),
        _ => (
            json!({"total": random.below(1000)}),
            Some(json!({"other": "x"})),
        ),
    };
    NewEvent {
        metadata,
        ..NewEvent::json("OrderPlaced", data)
    }
}

async fn nodes(count: usize) -> (Vec<Server>, Vec<String>) {
    let servers: Vec<Server> = (0..count).map(|_| Server::start()).collect();
    let urls = servers.iter().map(|server| server.base.clone()).collect();
    (servers, urls)
}

async fn sharded(urls: &[String]) -> ShardedClient {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), guest("shard-by-customer")).unwrap();
    ShardedClient::connect(urls, None, &SharderSource::File(file.path().to_path_buf()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_land_on_the_node_the_rule_predicts() {
    let (servers, urls) = nodes(3).await;
    // The sharder by name, downloaded from a node.
    let (code, _) = servers[0]
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 201);
    let client = ShardedClient::connect(&urls, None, &SharderSource::Named("by-customer".into()))
        .await
        .unwrap();
    let mut random = Random(0xfeed);
    let mut per_node = [0; 3];
    for n in 0..90 {
        let stream = format!("order-{n}");
        let event = random_event(&mut random);
        let predicted = expected_shard(&stream, &event, 3);
        let (node, result) = client
            .append(
                &stream,
                ExpectedRevision::NoStream,
                std::slice::from_ref(&event),
            )
            .await
            .unwrap();
        assert_eq!(node, predicted, "{stream}: {event:?}");
        assert_eq!(result.first_revision, 0);
        per_node[node] += 1;
        for (index, server) in servers.iter().enumerate() {
            let (code, _) = server.get(&format!("/streams/{stream}")).await;
            assert_eq!(code == 200, index == predicted, "{stream} on node {index}");
        }
    }
    assert!(per_node.iter().all(|count| *count > 10), "{per_node:?}");
    // Reads find each stream's node, also from a client that did not write it.
    let reader = sharded(&urls).await;
    for n in [0, 41, 89] {
        let stream = format!("order-{n}");
        let (node, page) = reader.read(&stream, &ReadOptions::default()).await.unwrap();
        assert_eq!(page.events.len(), 1);
        let (code, _) = servers[node].get(&format!("/streams/{stream}")).await;
        assert_eq!(code, 200);
    }
    let missing = reader.read("order-none", &ReadOptions::default()).await;
    assert!(format!("{:#}", missing.unwrap_err()).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_and_client_agree_on_ten_thousand_events() {
    let server = Server::start();
    let (code, body) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 201, "{body}");
    let client = sharded(std::slice::from_ref(&server.base)).await;
    let mut random = Random(42);
    let mut items = Vec::new();
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..10_000 {
        let stream = format!("stream-{}", random.below(100_000));
        let event = random_event(&mut random);
        expected.push(expected_shard(&stream, &event, 7) as u32);
        inputs.push(shard_input(&stream, &event).unwrap());
        let mut item = serde_json::to_value(&event).unwrap();
        item["stream"] = json!(stream);
        items.push(item);
    }
    let (code, from_server) = server
        .post("/sharders/by-customer/shard?shards=7", Value::Array(items))
        .await;
    assert_eq!(code, 200, "{from_server}");
    let from_server: Vec<u32> = serde_json::from_value(from_server).unwrap();
    let local = client.sharder().shard(&inputs, 7).unwrap();
    assert_eq!(from_server, local);
    assert_eq!(local, expected);
}

/// Appends `count` random events over `streams` streams, one per request, noting their ids.
async fn append_with_ids(
    client: &ShardedClient,
    random: &mut Random,
    count: usize,
    streams: usize,
    written: &mut Vec<String>,
) {
    for n in 0..count {
        let mut event = random_event(random);
        let id = uuid::Uuid::new_v4().to_string();
        event.id = Some(id.clone());
        written.push(id);
        client
            .append(
                &format!("fan-{}", n % streams),
                ExpectedRevision::Any,
                &[event],
            )
            .await
            .unwrap();
    }
}

async fn take_events(
    messages: &mut FanInSubscription,
    count: usize,
    seen: &mut Vec<String>,
    failed: &mut HashSet<usize>,
) {
    while seen.len() < count {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), messages.next())
            .await
            .expect("events keep coming")
            .expect("the subscription goes on");
        match message {
            FanIn::Event { event, .. } => seen.push(event.id.clone()),
            FanIn::CaughtUp { .. } => {}
            FanIn::NodeFailed { node, .. } => {
                failed.insert(node);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_delivers_every_event_once_and_resumes_from_stored_checkpoints() {
    let (_servers, urls) = nodes(3).await;
    let client = sharded(&urls).await;
    let mut random = Random(7);
    let mut written = Vec::new();
    append_with_ids(&client, &mut random, 90, 30, &mut written).await;
    let mut messages = client.subscribe("$all", &Checkpoints::default(), &ReadOptions::default());
    let mut seen = Vec::new();
    let mut failed = HashSet::new();
    take_events(&mut messages, 45, &mut seen, &mut failed).await;
    let stored = serde_json::to_string(messages.checkpoints()).unwrap();
    drop(messages);

    append_with_ids(&client, &mut random, 30, 7, &mut written).await;
    let resume: Checkpoints = serde_json::from_str(&stored).unwrap();
    let mut messages = client.subscribe("$all", &resume, &ReadOptions::default());
    take_events(&mut messages, written.len(), &mut seen, &mut failed).await;
    assert!(failed.is_empty(), "{failed:?}");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    assert_eq!(unique, written.iter().collect::<HashSet<_>>());
    // Nothing more than what was written arrives.
    let extra = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        loop {
            if let Some(FanIn::Event { event, .. }) = messages.next().await {
                return event;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "unexpected event {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_is_down_fails_its_shard_only() {
    let (mut servers, urls) = nodes(3).await;
    let client = sharded(&urls).await;
    servers[1].kill();
    let mut random = Random(99);
    let (mut failed, mut succeeded) = (0, 0);
    for n in 0..40 {
        let stream = format!("order-{n}");
        let event = random_event(&mut random);
        let node = expected_shard(&stream, &event, 3);
        let result = client
            .append(&stream, ExpectedRevision::Any, std::slice::from_ref(&event))
            .await;
        if node == 1 {
            let error = format!("{:#}", result.unwrap_err());
            assert!(
                error.contains("node 1") && error.contains(&urls[1]),
                "{error}"
            );
            assert!(error.contains("cannot reach"), "{error}");
            failed += 1;
        } else {
            assert_eq!(result.unwrap().0, node);
            succeeded += 1;
        }
    }
    assert!(failed > 0 && succeeded > 0);
    // The fan-in reports the missing node and delivers the others' events.
    let mut messages = client.subscribe("$all", &Checkpoints::default(), &ReadOptions::default());
    let mut seen = Vec::new();
    let mut down = HashSet::new();
    take_events(&mut messages, succeeded, &mut seen, &mut down).await;
    while !down.contains(&1) {
        if let Some(FanIn::NodeFailed { node, error }) = messages.next().await {
            assert!(error.contains("node 1"), "{error}");
            down.insert(node);
        }
    }
    assert_eq!(down, HashSet::from([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sharder_api_validates_and_round_trips() {
    let server = Server::start();
    let (code, body) = server.deploy_sharder("x", b"junk".to_vec()).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.deploy_sharder("x", guest("event-counter")).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server
        .deploy_sharder("%24x", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 201);
    let sha = body["wasm_sha256"].as_str().unwrap().to_owned();
    let (code, again) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(again["wasm_sha256"], sha);
    let bytes = server
        .http
        .get(server.url("/sharders/by-customer"))
        .send()
        .await
        .unwrap();
    assert_eq!(bytes.headers()["content-type"], "application/wasm");
    assert_eq!(
        bytes.bytes().await.unwrap().to_vec(),
        guest("shard-by-customer")
    );
    let (_, list) = server.get("/sharders").await;
    assert_eq!(list, json!([{"name": "by-customer", "wasm_sha256": sha}]));

    let one = json!([{"stream": "s", "type": "T", "data": {}}]);
    for (query, body) in [
        ("?shards=0", one.clone()),
        ("?shards=x", one.clone()),
        ("", one.clone()),
        ("?shards=3", json!({"stream": "s"})),
        ("?shards=3", json!([{"type": "T"}])),
        ("?shards=3", json!([{"stream": "s", "metadata": "m"}])),
    ] {
        let (code, answer) = server
            .post(&format!("/sharders/by-customer/shard{query}"), body.clone())
            .await;
        assert_eq!(code, 400, "{query} {body}: {answer}");
    }
    let (code, _) = server
        .post("/sharders/nope/shard?shards=3", one.clone())
        .await;
    assert_eq!(code, 404);
    let (code, answer) = server
        .post("/sharders/by-customer/shard?shards=3", json!([]))
        .await;
    assert_eq!((code, answer), (200, json!([])));

    // Survives a restart; then delete.
    let mut server = server;
    assert!(server.terminate());
    let server = Server::start_in(&server.dir.clone(), &[]);
    let (code, answer) = server
        .post("/sharders/by-customer/shard?shards=3", one)
        .await;
    assert_eq!(code, 200, "{answer}");
    let (code, _) = server.delete("/sharders/by-customer").await;
    assert_eq!(code, 204);
    let (code, _) = server.get("/sharders/by-customer").await;
    assert_eq!(code, 404);
    let (code, _) = server.delete("/sharders/by-customer").await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_evaluates_locally_and_appends_across_nodes() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), guest("shard-by-customer")).unwrap();
    let path = file.path().to_str().unwrap();
    let mut random = Random(5);
    let mut lines = String::new();
    let mut expected = String::new();
    for n in 0..500 {
        let stream = format!("s-{n}");
        let event = random_event(&mut random);
        let mut item = serde_json::to_value(&event).unwrap();
        item["stream"] = json!(stream);
        lines.push_str(&format!("{item}\n"));
        expected.push_str(&format!("{}\n", expected_shard(&stream, &event, 5)));
    }
    let mut child = Command::new(common::BINARY)
        .args(["sharder", "eval", path, "--shards", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);

    let (servers, urls) = nodes(2).await;
    let nodes = urls.join(",");
    let output = Command::new(common::BINARY)
        .args(["append", "order-9", "--type", "OrderPlaced"])
        .args(["--data", r#"{"customer_id": "c-42"}"#])
        .args(["--nodes", &nodes, "--sharder", path])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let node = (fnv1a_64(b"c-42") % 2) as usize;
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("on node {node}")));
    let (code, _) = servers[node].get("/streams/order-9").await;
    assert_eq!(code, 200);
    let output = Command::new(common::BINARY)
        .args([
            "read",
            "order-9",
            "--json",
            "--nodes",
            &nodes,
            "--sharder",
            path,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let event: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(event["data"]["customer_id"], "c-42");
    let output = Command::new(common::BINARY)
        .args(["sharder", "eval", "/nonexistent.wasm", "--shards", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}
