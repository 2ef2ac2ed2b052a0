//! Kafka connectors against a real Kafka-protocol broker (nisshi), checked with an independent
//! client (confluent-kafka): every event arrives once, in order, on the partition the sharder
//! chose, and every record lands once, across `kill -9` of Refract and restarts of the broker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::kafka::Broker;
use common::{Server, guest};
use serde_json::{Value, json};

/// Waits until `done` holds, failing after `seconds`.
async fn wait_for<F: Future<Output = bool>>(seconds: u64, what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done().await {
        assert!(Instant::now() < deadline, "not within {seconds} s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connector(server: &Server, name: &str) -> Value {
    let (status, info) = server.get(&format!("/connectors/{name}")).await;
    assert_eq!(status, 200, "{info}");
    info
}

/// Appends orders `range` for 12 customers: each order's one to five events in one append,
/// every event carrying its customer in the metadata.
async fn append_orders(server: &Server, range: std::ops::Range<u64>) {
    for order in range {
        let customer = format!("c{}", order * 7 % 12);
        let events: Vec<Value> = (0..=order % 5)
            .map(|n| {
                json!({"type": if n == 0 { "OrderPlaced" } else { "ItemAdded" },
                       "data": {"order": order, "n": n},
                       "metadata": {"customer_id": customer}})
            })
            .collect();
        let (status, body) = server
            .post(&format!("/streams/order-{order}"), json!(events))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Something else the sink's filter leaves out.
    server.append_n("audit-1", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_sends_every_event_once_in_order_on_the_sharders_partition() {
    let mut broker = Broker::start();
    broker.create_topic("orders", 3);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let (status, body) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(status, 201, "{body}");
    append_orders(&server, 0..1500).await;

    let definition = json!({
        "kind": "kafka-sink", "bootstrap_servers": broker.bootstrap, "topic": "orders",
        "source": "$all", "stream_prefix": "order-", "start_from": "start",
        "partitioning": {"sharder": "by-customer"}, "compression": "lz4",
        "wait_for_broker_ack": true,
    });
    let (status, info) = server.put("/connectors/to-kafka", definition.clone()).await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["status"], "running");
    assert_eq!(info["kind"], "kafka-sink");

    // Killed as soon as it has sent something.
    wait_for(30, "the sink's first events", || async {
        connector(&server, "to-kafka").await["events"].as_u64() > Some(0)
    })
    .await;
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    append_orders(&server, 1500..2000).await;

    // The broker restarts while the sink works.
    wait_for(30, "the sink resumed after the crash", || async {
        connector(&server, "to-kafka").await["events"].as_u64() > Some(0)
    })
    .await;
    broker.restart();
    append_orders(&server, 2000..2300).await;

    // A broker that is down shows in the status, and the sink carries on once it is back.
    broker.kill();
    append_orders(&server, 2300..2400).await;
    wait_for(60, "the broker's absence in the status", || async {
        let info = connector(&server, "to-kafka").await;
        info["connected"] == false && info["last_error"].is_string()
    })
    .await;
    let info = connector(&server, "to-kafka").await;
    assert_eq!(info["status"], "running", "{info}");
    broker.resume();

    let (_, head) = server.get("/info").await;
    let last = head["head_position"].as_u64().unwrap() - 1;
    wait_for(120, "the sink caught up", || async {
        let info = connector(&server, "to-kafka").await;
        info["position"].as_u64() == Some(last) && info["connected"] == true
    })
    .await;
    let info = connector(&server, "to-kafka").await;
    assert_eq!(info["lag"], 0, "{info}");

    // What the topic holds, read by another client.
    let records = broker.consume("orders");
    let events: Vec<Value> = server
        .read_everything("$all")
        .await
        .into_iter()
        .filter(|event| event["stream"].as_str().unwrap().starts_with("order-"))
        .collect();
    let by_position: BTreeMap<u64, &Value> = events
        .iter()
        .map(|event| (event["position"].as_u64().unwrap(), event))
        .collect();
    let mut seen = BTreeSet::new();
    for record in &records {
        let position: u64 = record["headers"]["refract-position"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(seen.insert(position), "position {position} arrived twice");
        let event = by_position
            .get(&position)
            .unwrap_or_else(|| panic!("{record} is no order event"));
        assert_eq!(record["key"], event["stream"]);
        assert_eq!(record["headers"]["refract-stream"], event["stream"]);
        assert_eq!(record["headers"]["refract-event-type"], event["type"]);
        assert_eq!(record["headers"]["refract-event-id"], event["id"]);
        assert_eq!(
            serde_json::from_str::<Value>(record["value"].as_str().unwrap()).unwrap(),
            event["data"]
        );
    }
    assert_eq!(seen.len(), events.len(), "every order event arrived");

    // Each stream's events in order, all on the partition the sharder picks for them.
    let mut next_revision: BTreeMap<String, u64> = BTreeMap::new();
    let mut partition_of: BTreeMap<String, u64> = BTreeMap::new();
    let mut ordered = records.clone();
    ordered.sort_by_key(|record| (record["partition"].as_u64(), record["offset"].as_u64()));
    for record in &ordered {
        let stream = record["key"].as_str().unwrap().to_owned();
        let revision: u64 = record["headers"]["refract-revision"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let expected = next_revision.entry(stream.clone()).or_default();
        assert_eq!(revision, *expected, "{stream} out of order");
        *expected += 1;
        let partition = record["partition"].as_u64().unwrap();
        assert_eq!(
            *partition_of.entry(stream.clone()).or_insert(partition),
            partition,
            "{stream} on two partitions"
        );
    }
    let inputs: Vec<Value> = events
        .iter()
        .map(|event| {
            json!({"stream": event["stream"], "type": event["type"], "data": event["data"],
                   "metadata": event["metadata"]})
        })
        .collect();
    let (status, shards) = server
        .post("/sharders/by-customer/shard?shards=3", json!(inputs))
        .await;
    assert_eq!(status, 200, "{shards}");
    for (event, shard) in events.iter().zip(shards.as_array().unwrap()) {
        let stream = event["stream"].as_str().unwrap();
        assert_eq!(partition_of[stream], shard.as_u64().unwrap(), "{stream}");
    }
    let used: BTreeSet<u64> = partition_of.values().copied().collect();
    assert!(used.len() > 1, "the sharder spread the streams");

    // A sink defined anew on the same topic with `start_from: end` sends only what comes after,
    // although the topic's last records are older than that.
    let (status, _) = server.delete("/connectors/to-kafka").await;
    assert_eq!(status, 204);
    append_orders(&server, 2400..2450).await;
    let mut from_end = definition;
    from_end["start_from"] = json!("end");
    let (status, info) = server.put("/connectors/from-end", from_end).await;
    assert_eq!(status, 201, "{info}");
    append_orders(&server, 2450..2460).await;
    let (_, head) = server.get("/info").await;
    let last = head["head_position"].as_u64().unwrap() - 1;
    wait_for(60, "the new sink caught up", || async {
        connector(&server, "from-end").await["position"].as_u64() == Some(last)
    })
    .await;
    let sent_before = *seen.last().unwrap();
    let orders: BTreeSet<String> = broker
        .consume("orders")
        .iter()
        .filter(|record| {
            let position = record["headers"]["refract-position"].as_str().unwrap();
            position.parse::<u64>().unwrap() > sent_before
        })
        .map(|record| record["key"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = (2450..2460).map(|order| format!("order-{order}")).collect();
    assert_eq!(orders, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_lands_every_record_once_across_crashes_and_a_broker_restart() {
    let mut broker = Broker::start();
    broker.create_topic("payments", 3);
    let record = |n: u64| {
        let kind = if n % 4 == 3 {
            "PaymentRefunded"
        } else {
            "PaymentMade"
        };
        json!({"key": format!("p{}", n % 20), "value": json!({"n": n, "cents": n * 10}).to_string(),
               "headers": {"type": kind}})
    };
    let produce = |range: std::ops::Range<u64>| range.map(record).collect::<Vec<_>>();
    broker.produce("payments", &produce(0..1500));

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let definition = json!({
        "kind": "kafka-source", "bootstrap_servers": broker.bootstrap, "topic": "payments",
        "stream": {"strategy": "key", "value": "payment-"},
        "event_type": {"header": "type"}, "start_from": "earliest",
    });
    let (status, info) = server.put("/connectors/from-kafka", definition).await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["kind"], "kafka-source");

    wait_for(30, "the source's first records", || async {
        connector(&server, "from-kafka").await["events"].as_u64() > Some(0)
    })
    .await;
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    broker.produce("payments", &produce(1500..2000));
    wait_for(30, "the source resumed after the crash", || async {
        connector(&server, "from-kafka").await["events"].as_u64() > Some(0)
    })
    .await;
    broker.restart();
    broker.produce("payments", &produce(2000..2500));

    let landed = || async {
        let (_, info) = server.get("/connectors/from-kafka").await;
        info["offsets"].as_object().map(|offsets| {
            offsets
                .values()
                .map(|offset| offset.as_i64().unwrap())
                .sum::<i64>()
        })
    };
    wait_for(120, "every record landed", || async {
        landed().await == Some(2500)
    })
    .await;
    let info = connector(&server, "from-kafka").await;
    assert_eq!(info["status"], "running", "{info}");
    assert_eq!(info["lag"], 0, "{info}");

    let events: Vec<Value> = server
        .read_everything("$all")
        .await
        .into_iter()
        .filter(|event| event["stream"].as_str().unwrap().starts_with("payment-"))
        .collect();
    let mut seen = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut last_n: BTreeMap<String, u64> = BTreeMap::new();
    for event in &events {
        let kafka = &event["metadata"]["kafka"];
        let at = (
            kafka["partition"].as_u64().unwrap(),
            kafka["offset"].as_u64().unwrap(),
        );
        assert!(seen.insert(at), "record {at:?} landed twice");
        assert!(ids.insert(event["id"].as_str().unwrap().to_owned()));
        let n = event["data"]["n"].as_u64().unwrap();
        let stream = event["stream"].as_str().unwrap();
        assert_eq!(stream, format!("payment-p{}", n % 20));
        assert_eq!(kafka["key"], format!("p{}", n % 20));
        let kind = if n % 4 == 3 {
            "PaymentRefunded"
        } else {
            "PaymentMade"
        };
        assert_eq!(event["type"], kind);
        // A key's records keep their order (one partition each).
        if let Some(previous) = last_n.insert(stream.to_owned(), n) {
            assert!(previous < n, "{stream}: {n} after {previous}");
        }
    }
    let numbers: BTreeSet<u64> = events
        .iter()
        .map(|event| event["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..2500).collect(), "every record landed once");
}

#[tokio::test]
async fn definitions_are_checked_and_connectors_are_managed() {
    let server = Server::start();
    // No broker listens on this port: the connector runs, retries and says why.
    let definition = json!({"kind": "kafka-sink", "bootstrap_servers": "127.0.0.1:1",
                            "topic": "t"});
    for bad in [
        json!({"kind": "kafka-sink", "topic": "t"}),
        json!({"kind": "kafka-sink", "bootstrap_servers": "localhost", "topic": "t"}),
        json!({"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "compression": "x"}),
        json!({"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t",
               "wait_for_broker_ack": false}),
        json!({"kind": "kafka-source", "bootstrap_servers": "h:1", "topic": "t",
               "stream": {"strategy": "fixed"}}),
        json!({"kind": "other", "bootstrap_servers": "h:1", "topic": "t"}),
    ] {
        let (status, body) = server.put("/connectors/c", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    let (status, body) = server.put("/connectors/$c", definition.clone()).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = server.get("/connectors/missing").await;
    assert_eq!(status, 404);
    let (status, _) = server.post("/connectors/missing/start", json!(null)).await;
    assert_eq!(status, 404);

    let (status, info) = server.put("/connectors/c", definition.clone()).await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["source"], "$all");
    assert_eq!(info["compression"], "zstd");
    assert_eq!(info["partitioning"], "stream");
    wait_for(30, "the failure in the status", || async {
        let info = connector(&server, "c").await;
        info["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("127.0.0.1:1"))
    })
    .await;
    let info = connector(&server, "c").await;
    assert_eq!(
        (info["status"].clone(), info["connected"].clone()),
        (json!("running"), json!(false))
    );

    let (status, info) = server.post("/connectors/c/stop", json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(info["status"], "stopped");
    let (status, info) = server.put("/connectors/c", definition.clone()).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        info["status"], "stopped",
        "a replaced definition keeps its state"
    );
    let (status, info) = server.post("/connectors/c/reset", json!(null)).await;
    assert_eq!((status, info["status"].clone()), (200, json!("stopped")));
    let (status, info) = server.post("/connectors/c/start", json!(null)).await;
    assert_eq!((status, info["status"].clone()), (200, json!("running")));
    let (_, list) = server.get("/connectors").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, _) = server.delete("/connectors/c").await;
    assert_eq!(status, 204);
    let (_, list) = server.get("/connectors").await;
    assert_eq!(list, json!([]));

    // A sink names a sharder that exists, and keeps it: neither deleted nor given other code
    // while the sink places records with it.
    let sharded = json!({"kind": "kafka-sink", "bootstrap_servers": "127.0.0.1:1", "topic": "t",
                         "partitioning": {"sharder": "by-customer"}});
    let (status, body) = server.put("/connectors/sharded", sharded.clone()).await;
    assert_eq!(
        (status, body["error"].clone()),
        (404, json!("not_found")),
        "{body}"
    );
    let sharder = common::guest("shard-by-customer");
    let (status, _) = server.deploy_sharder("by-customer", sharder.clone()).await;
    assert_eq!(status, 201);
    let (status, _) = server.put("/connectors/sharded", sharded).await;
    assert_eq!(status, 201);
    let (status, body) = server.delete("/sharders/by-customer").await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("in_use")),
        "{body}"
    );
    let (status, body) = server
        .deploy_sharder("by-customer", common::guest("event-counter"))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("in_use")),
        "{body}"
    );
    let (status, _) = server.deploy_sharder("by-customer", sharder).await;
    assert_eq!(status, 200, "the same code again is no change");
    let (status, _) = server.delete("/connectors/sharded").await;
    assert_eq!(status, 204);
    let (status, _) = server.delete("/sharders/by-customer").await;
    assert_eq!(status, 204);

    // The topic strategy has no use for a value, and takes one.
    let (status, body) = server
        .put(
            "/connectors/in",
            json!({"kind": "kafka-source", "bootstrap_servers": "127.0.0.1:1", "topic": "t",
                   "stream": {"strategy": "topic", "value": "ignored"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// A projection's partition key names each record's stream: the guest code that partitions
/// the `order-…` streams by customer also files the order records that come from Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_names_the_stream_each_record_lands_in() {
    let broker = Broker::start();
    broker.create_topic("orders", 2);
    let records: Vec<Value> = (0..30u64)
        .map(|n| {
            json!({"key": format!("o{n}"),
                   "value": json!({"customer_id": format!("c{}", n % 3), "n": n}).to_string()})
        })
        .chain([json!({"value": "not an order"})])
        .collect();
    broker.produce("orders", &records);
    let server = Server::start();
    let definition = json!({
        "kind": "kafka-source", "bootstrap_servers": broker.bootstrap, "topic": "orders",
        "stream": {"strategy": "projection", "value": "customer-orders"},
        "event_type": "OrderPlaced",
    });
    let (status, body) = server
        .put("/connectors/orders-in", definition.clone())
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (404, json!("not_found")),
        "{body}"
    );
    let (status, body) = server
        .deploy("customer-orders", guest("customer-orders"), "")
        .await;
    assert_eq!(status, 201, "{body}");
    // A projection without a key of its own names no streams.
    let (status, body) = server.deploy("summary", guest("order-summary"), "").await;
    assert_eq!(status, 201, "{body}");
    let mut by_stream = definition.clone();
    by_stream["stream"]["value"] = json!("summary");
    let (status, body) = server.put("/connectors/orders-in", by_stream).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("invalid_request")),
        "{body}"
    );
    let (status, info) = server.put("/connectors/orders-in", definition).await;
    assert_eq!(status, 201, "{info}");
    wait_for(60, "every record landed", || async {
        let info = connector(&server, "orders-in").await;
        let landed = info["offsets"].as_object().map(|offsets| {
            offsets
                .values()
                .map(|offset| offset.as_i64().unwrap())
                .sum::<i64>()
        });
        landed == Some(31)
    })
    .await;
    for customer in 0..3 {
        let events = server
            .read_everything(&format!("customer-c{customer}"))
            .await;
        let orders: BTreeSet<u64> = events
            .iter()
            .map(|event| event["data"]["n"].as_u64().unwrap())
            .collect();
        let expected: BTreeSet<u64> = (0..30).filter(|n| n % 3 == customer).collect();
        assert_eq!(orders, expected, "customer-c{customer}");
        assert!(events.iter().all(|event| event["type"] == "OrderPlaced"));
    }
    // A record the projection gives no key lands in the topic's stream.
    let rest = server.read_everything("orders").await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    // The projection stays while the source uses it.
    let (status, body) = server.delete("/projections/customer-orders").await;
    assert_eq!(
        (status, body["error"].clone()),
        (409, json!("in_use")),
        "{body}"
    );
    let (status, _) = server.delete("/connectors/orders-in").await;
    assert_eq!(status, 204);
    let (status, _) = server.delete("/projections/customer-orders").await;
    assert_eq!(status, 204);
}

/// Runs the `refract` CLI against `server`.
fn cli(server: &Server, args: &[&str], stdin: &str) -> std::process::Output {
    let mut command = std::process::Command::new(common::BINARY);
    command.args(args).args(["--server", &server.base]);
    common::run_with_input(&mut command, stdin.as_bytes()).expect("run refract")
}

#[tokio::test]
async fn the_cli_manages_connectors() {
    let server = Server::start();
    let definition = r#"{"kind": "kafka-source", "bootstrap_servers": "127.0.0.1:1",
                         "topic": "payments", "stream": {"strategy": "fixed", "value": "inbox"}}"#;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), definition).unwrap();
    let path = format!("@{}", file.path().display());
    let put = cli(&server, &["connector", "put", "in", &path], "");
    assert!(put.status.success(), "{put:?}");
    assert!(String::from_utf8_lossy(&put.stdout).starts_with("created in\n"));
    let again = cli(&server, &["connector", "put", "in", "-"], definition);
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("updated in\n"),
        "{again:?}"
    );
    let list = cli(&server, &["connector", "list"], "");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("in  kafka-source  payments  running"),
        "{text}"
    );
    let stop = cli(&server, &["connector", "stop", "in", "--json"], "");
    let info: Value = serde_json::from_slice(&stop.stdout).unwrap();
    assert_eq!(info["status"], "stopped");
    assert_eq!(
        info["stream"],
        json!({"strategy": "fixed", "value": "inbox"})
    );
    let bad = cli(
        &server,
        &["connector", "put", "in", r#"{"kind": "kafka-source"}"#],
        "",
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bootstrap_servers"),
        "{bad:?}"
    );
    let missing = cli(&server, &["connector", "info", "nobody"], "");
    assert!(!missing.status.success());
    let delete = cli(&server, &["connector", "delete", "in"], "");
    assert!(delete.status.success());
    assert_eq!(server.get("/connectors").await.1, json!([]));
}
