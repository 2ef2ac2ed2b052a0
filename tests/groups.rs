//! The Consumer groups section of the HTTP contract, against the real binary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Server, guest};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Settings that write a checkpoint after every ack, so tests can watch it.
fn eager(mut settings: Value) -> Value {
    settings["min_checkpoint_count"] = json!(1);
    settings["checkpoint_after_ms"] = json!(0);
    settings
}

async fn create(server: &Server, stream: &str, group: &str, settings: Value) -> Value {
    let (code, info) = server
        .put(&format!("/groups/{stream}/{group}"), settings)
        .await;
    assert_eq!(code, 201, "{info}");
    info
}

async fn pull(server: &Server, path: &str, consumer: &str, max: usize, wait_ms: u64) -> Vec<Value> {
    let (code, body) = server
        .post(
            &format!("/groups/{path}/pull?consumer={consumer}&max={max}&wait_ms={wait_ms}"),
            json!(null),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    body["messages"].as_array().expect("messages").clone()
}

/// Pulls until `count` messages came (a pull returns as soon as some are ready).
async fn pull_exactly(server: &Server, path: &str, consumer: &str, count: usize) -> Vec<Value> {
    let mut messages = Vec::new();
    while messages.len() < count {
        let batch = pull(server, path, consumer, count - messages.len(), 2000).await;
        assert!(!batch.is_empty(), "only {} of {count} came", messages.len());
        messages.extend(batch);
    }
    messages
}

async fn ack(server: &Server, path: &str, messages: &[Value]) {
    let ids: Vec<&Value> = messages.iter().map(|m| &m["ack_id"]).collect();
    let (code, body) = server
        .post(&format!("/groups/{path}/ack"), json!({ "ack_ids": ids }))
        .await;
    assert_eq!(code, 204, "{body}");
}

async fn info(server: &Server, path: &str) -> Value {
    let (code, info) = server.get(&format!("/groups/{path}")).await;
    assert_eq!(code, 200, "{info}");
    info
}

/// Waits until the group's info satisfies `done`.
async fn wait_info(server: &Server, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = info(server, path).await;
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn numbers(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["event"]["data"]["n"].as_u64().expect("n"))
        .collect()
}

#[tokio::test]
async fn settings_defaults_and_bad_input() {
    let server = Server::start();
    let info = create(&server, "orders", "g", json!({})).await;
    assert_eq!(
        info["settings"],
        json!({
            "start_from": "end", "resolve_links": true, "message_timeout_ms": 30000,
            "max_retry_count": 10, "live_buffer_size": 500, "read_batch_size": 20,
            "history_buffer_size": 500, "checkpoint_after_ms": 2000, "min_checkpoint_count": 10,
            "max_checkpoint_count": 1000, "max_subscriber_count": 0, "strategy": "round_robin"
        })
    );
    assert_eq!(info["stream"], "orders");
    assert_eq!(info["group"], "g");
    assert_eq!(info["checkpoint"], Value::Null);
    assert_eq!(info["consumers"], json!([]));

    let (code, info) = server
        .put("/groups/orders/g", json!({"max_subscriber_count": 1}))
        .await;
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["settings"]["max_subscriber_count"], 1);
    let (_, list) = server.get("/groups").await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    for bad in [
        json!({"strategy": "random"}),
        json!({"message_timout_ms": 5}),
        json!({"start_from": "middle"}),
        json!({"message_timeout_ms": 0}),
        json!({"stream_prefix": "order-"}),
        json!({"min_checkpoint_count": 10, "max_checkpoint_count": 5}),
        json!([1, 2]),
    ] {
        let (code, body) = server.put("/groups/orders/bad", bad.clone()).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request", "{body}");
    }
    let (code, body) = server
        .put(
            "/groups/orders/bad",
            json!({"strategy": {"sharded": "nobody"}}),
        )
        .await;
    assert_eq!((code, body["error"].as_str()), (404, Some("not_found")));
    let (code, _) = server.get("/groups/orders/bad").await;
    assert_eq!(code, 404);

    // Unknown groups, missing consumers, unknown ack ids, a full group.
    let (code, body) = server
        .post("/groups/orders/nope/pull?consumer=a", json!(null))
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = server.post("/groups/orders/g/pull", json!(null)).await;
    assert_eq!(code, 400);
    let (code, _) = server
        .post("/groups/orders/g/pull?consumer=a&max=0", json!(null))
        .await;
    assert_eq!(code, 400);
    for (ids, code, error) in [
        (json!(["12"]), 409, "not_delivered"),
        (json!(["not-an-id"]), 400, "invalid_request"),
    ] {
        let (status, body) = server
            .post("/groups/orders/g/ack", json!({ "ack_ids": ids }))
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (code, Some(error)),
            "{body}"
        );
    }
    let (code, _) = server
        .post(
            "/groups/orders/g/nack",
            json!({"ack_ids": [], "action": "explode"}),
        )
        .await;
    assert_eq!(code, 400);
    let (code, _) = server
        .post("/groups/orders/g/ack", json!({"ids": []}))
        .await;
    assert_eq!(code, 400);
    assert!(pull(&server, "orders/g", "a", 10, 0).await.is_empty());
    let (code, body) = server
        .post("/groups/orders/g/pull?consumer=b", json!(null))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "max_subscribers_reached");

    let (code, _) = server.delete("/groups/orders/g").await;
    assert_eq!(code, 204);
    let (code, _) = server.get("/groups/orders/g").await;
    assert_eq!(code, 404);
    let (code, _) = server.delete("/groups/orders/g").await;
    assert_eq!(code, 404);
}

/// A consumer takes a batch, acks part of it and disappears: the rest goes to another consumer,
/// with its retry count, and nothing is lost.
#[tokio::test]
async fn a_vanished_consumers_messages_go_to_others() {
    let server = Server::start();
    create(
        &server,
        "jobs",
        "workers",
        eager(json!({"start_from": "start", "message_timeout_ms": 400})),
    )
    .await;
    server.append_n("jobs", 10).await;
    let batch = pull_exactly(&server, "jobs/workers", "a", 10).await;
    assert_eq!(numbers(&batch), (0..10).collect::<Vec<_>>());
    assert!(batch.iter().all(|m| m["retry_count"] == 0));
    ack(&server, "jobs/workers", &batch[..3]).await;
    // `a` is gone; `b` long-polls until the timeout hands it the rest.
    let mut redelivered = Vec::new();
    while redelivered.len() < 7 {
        let messages = pull(&server, "jobs/workers", "b", 10, 3000).await;
        assert!(!messages.is_empty(), "nothing redelivered");
        redelivered.extend(messages);
    }
    assert_eq!(numbers(&redelivered), (3..10).collect::<Vec<_>>());
    assert!(redelivered.iter().all(|m| m["retry_count"] == 1));
    ack(&server, "jobs/workers", &redelivered).await;
    let info = wait_info(&server, "jobs/workers", |info| info["checkpoint"] == 9).await;
    assert_eq!(info["in_flight"], 0);
    // `a` is dropped once silent for the message timeout since its last request (its ack), which
    // can come after `b` took and acked the rest.
    let consumer_a = |info: &Value| {
        info["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "a")
    };
    wait_info(&server, "jobs/workers", |info| !consumer_a(info)).await;
}

#[tokio::test]
async fn the_checkpoint_never_passes_an_unacked_message() {
    let server = Server::start();
    create(&server, "jobs", "g", eager(json!({"start_from": "start"}))).await;
    server.append_n("jobs", 20).await;
    let batch = pull_exactly(&server, "jobs/g", "a", 20).await;
    assert_eq!(batch.len(), 20);
    let (held, rest): (Vec<Value>, Vec<Value>) = batch
        .into_iter()
        .partition(|m| m["event"]["data"]["n"] == 5);
    ack(&server, "jobs/g", &rest).await;
    let info = wait_info(&server, "jobs/g", |info| info["checkpoint"] == 4).await;
    assert_eq!(info["in_flight"], 1);
    // Still 4 after the writes settle: 6..19 are acked but 5 is not.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(info_checkpoint(&server, "jobs/g").await, json!(4));
    ack(&server, "jobs/g", &held).await;
    wait_info(&server, "jobs/g", |info| info["checkpoint"] == 19).await;
    // Acking again is harmless.
    ack(&server, "jobs/g", &held).await;
}

async fn info_checkpoint(server: &Server, path: &str) -> Value {
    info(server, path).await["checkpoint"].clone()
}

#[tokio::test]
async fn retries_end_in_the_parked_stream_and_replay_brings_them_back() {
    let server = Server::start();
    create(
        &server,
        "jobs",
        "g",
        eager(json!({"start_from": "start", "max_retry_count": 2})),
    )
    .await;
    server.append_n("jobs", 3).await;
    let path = "jobs/g";
    // Event 0 fails three times: the third nack exceeds two retries and parks it.
    let mut retries = Vec::new();
    for attempt in 0..3 {
        let messages = pull(&server, path, "a", 1, 2000).await;
        assert_eq!(numbers(&messages), vec![0], "attempt {attempt}");
        retries.push(messages[0]["retry_count"].as_u64().unwrap());
        let (code, body) = server
            .post(
                &format!("/groups/{path}/nack"),
                json!({"ack_ids": [messages[0]["ack_id"]], "action": "retry", "reason": "db down"}),
            )
            .await;
        assert_eq!(code, 204, "{body}");
    }
    assert_eq!(retries, vec![0, 1, 2]);
    // Event 1 is parked at once; event 2 is acked.
    let messages = pull_exactly(&server, path, "a", 2).await;
    assert_eq!(numbers(&messages), vec![1, 2]);
    let (code, _) = server
        .post(
            &format!("/groups/{path}/nack"),
            json!({"ack_ids": [messages[0]["ack_id"]], "action": "park", "reason": "bad data"}),
        )
        .await;
    assert_eq!(code, 204);
    ack(&server, path, &messages[1..]).await;
    let info = wait_info(&server, path, |info| info["checkpoint"] == 2).await;
    assert_eq!(info["parked"], 2);

    let parked_stream = "$persistentsubscription-jobs::g-parked";
    let parked = server.read_everything(parked_stream).await;
    let parked_numbers: Vec<u64> = parked
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(parked_numbers, vec![0, 1]);
    let (code, reasons) = server.get(&format!("/groups/{path}/parked")).await;
    assert_eq!(code, 200, "{reasons}");
    let reasons: Vec<&str> = reasons
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].contains("db down"), "{reasons:?}");
    assert_eq!(reasons[1], "bad data");

    // Replay only the first, then the rest.
    let (code, body) = server
        .post(
            &format!("/groups/{path}/replay-parked?stop_at=1"),
            json!(null),
        )
        .await;
    assert_eq!((code, &body["replaying"]), (200, &json!(1)), "{body}");
    let replayed = pull(&server, path, "a", 10, 2000).await;
    assert_eq!(numbers(&replayed), vec![0]);
    assert_eq!(replayed[0]["retry_count"], 0);
    ack(&server, path, &replayed).await;
    let (_, body) = server
        .post(&format!("/groups/{path}/replay-parked"), json!(null))
        .await;
    assert_eq!(body["replaying"], 1);
    let replayed = pull(&server, path, "a", 10, 2000).await;
    assert_eq!(numbers(&replayed), vec![1]);
    ack(&server, path, &replayed).await;
    wait_info(&server, path, |info| info["parked"] == 0).await;
    // New messages still flow after the replay.
    server.append_n("jobs", 1).await;
    let fresh = pull(&server, path, "a", 10, 2000).await;
    assert_eq!(numbers(&fresh), vec![0]);
    assert_eq!(fresh[0]["event"]["revision"], 3);
}

/// (when, key, consumer, the event's `seq`) of every delivery.
type Seen = Arc<Mutex<Vec<(u64, String, String, u64)>>>;

/// Consumers pull, note each message with a global sequence number, and ack; a key's messages
/// must reach one consumer at a time, in order.
async fn consume_keys(
    server: Arc<Server>,
    path: String,
    consumer: String,
    total: usize,
    seen: Seen,
    clock: Arc<AtomicU64>,
    key_of: fn(&Value) -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if seen.lock().await.len() >= total {
            return;
        }
        assert!(Instant::now() < deadline, "{consumer} gave up");
        let messages = pull(&server, &path, &consumer, 5, 100).await;
        {
            let mut seen = seen.lock().await;
            for message in &messages {
                let tick = clock.fetch_add(1, Ordering::SeqCst);
                let event = &message["event"];
                seen.push((
                    tick,
                    key_of(event),
                    consumer.clone(),
                    event["data"]["seq"].as_u64().unwrap(),
                ));
            }
        }
        if !messages.is_empty() {
            ack(&server, &path, &messages).await;
        }
    }
}

fn check_per_key_order(seen: &[(u64, String, String, u64)], stable: bool) {
    let mut by_key: BTreeMap<&str, Vec<(u64, &str, u64)>> = BTreeMap::new();
    for (tick, key, consumer, seq) in seen {
        by_key
            .entry(key)
            .or_default()
            .push((*tick, consumer.as_str(), *seq));
    }
    for (key, mut deliveries) in by_key {
        deliveries.sort();
        let seqs: Vec<u64> = deliveries.iter().map(|d| d.2).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "{key} out of order: {deliveries:?}");
        if stable {
            let consumers: BTreeSet<&str> = deliveries.iter().map(|d| d.1).collect();
            assert_eq!(consumers.len(), 1, "{key} went to {consumers:?}");
        }
    }
}

async fn keyed_run(strategy: Value, stream: &str, key_of: fn(&Value) -> String) {
    let server = Arc::new(Server::start());
    if strategy.get("sharded").is_some() {
        let (code, body) = server
            .deploy_sharder("by-customer", guest("shard-by-customer"))
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let group = format!("{stream}/keyed");
    create(
        &server,
        stream,
        "keyed",
        json!({"start_from": "start", "strategy": strategy, "message_timeout_ms": 5000}),
    )
    .await;
    let append = |from: u64, count: u64| {
        let server = server.clone();
        async move {
            for seq in from..from + count {
                let customer = format!("c{}", seq % 7);
                let stream = format!("order-{}", seq % 11);
                let (code, body) = server
                    .post(
                        &format!("/streams/{stream}"),
                        json!({"type": "T", "data": {"seq": seq, "customer_id": customer}}),
                    )
                    .await;
                assert_eq!(code, 200, "{body}");
            }
        }
    };
    // Stable membership: three consumers join before the events come.
    for consumer in ["a", "b", "c"] {
        pull(&server, &group, consumer, 1, 0).await;
    }
    append(0, 120).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clock = Arc::new(AtomicU64::new(0));
    let run = |consumers: Vec<&str>, total: usize| {
        let tasks: Vec<_> = consumers
            .into_iter()
            .map(|consumer| {
                tokio::spawn(consume_keys(
                    server.clone(),
                    group.clone(),
                    consumer.to_owned(),
                    total,
                    seen.clone(),
                    clock.clone(),
                    key_of,
                ))
            })
            .collect();
        async move {
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    run(vec!["a", "b", "c"], 120).await;
    check_per_key_order(&seen.lock().await, true);
    let spread: BTreeSet<String> = seen.lock().await.iter().map(|s| s.2.clone()).collect();
    assert!(
        spread.len() > 1,
        "every key went to one consumer: {spread:?}"
    );

    // A fourth consumer joins while messages are in flight: buckets move, order holds.
    let consumers = run(vec!["a", "b", "c", "d"], 240);
    append(120, 120).await;
    consumers.await;
    let seen = seen.lock().await;
    check_per_key_order(&seen, false);
    let delivered: BTreeSet<u64> = seen.iter().map(|s| s.3).collect();
    assert_eq!(delivered.len(), 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_keeps_each_stream_on_one_consumer_in_order() {
    keyed_run(json!("pinned"), "$ce-order", |event| {
        event["stream"].as_str().unwrap().to_owned()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sharded_keeps_each_customer_on_one_consumer_in_order() {
    keyed_run(json!({"sharded": "by-customer"}), "$all", |event| {
        event["data"]["customer_id"].as_str().unwrap().to_owned()
    })
    .await;
}

#[tokio::test]
async fn a_sharder_in_use_cannot_be_deleted() {
    let server = Server::start();
    server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    create(
        &server,
        "$all",
        "g",
        json!({"strategy": {"sharded": "by-customer"}, "stream_prefix": "order-"}),
    )
    .await;
    let (code, body) = server.delete("/sharders/by-customer").await;
    assert_eq!(code, 409, "{body}");
    let (code, _) = server.delete("/groups/$all/g").await;
    assert_eq!(code, 204);
    let (code, _) = server.delete("/sharders/by-customer").await;
    assert_eq!(code, 204);
}

/// Push delivery over SSE keeps at most `buffer` messages unacked; closing it leaves the group
/// (noticed at the next heartbeat at the latest).
#[tokio::test]
async fn push_consumers_get_messages_as_they_have_room() {
    let server = Server::start_with(&["--sse-heartbeat-seconds", "1"]);
    create(
        &server,
        "$all",
        "push",
        eager(json!({"start_from": "start", "type_prefix": "Keep"})),
    )
    .await;
    for n in 0..6 {
        let kind = if n % 2 == 0 { "Keep" } else { "Drop" };
        server
            .post("/streams/s", json!({"type": kind, "data": {"n": n}}))
            .await;
    }
    let mut events = server
        .subscribe("/groups/$all/push/subscribe?consumer=p&buffer=2", &[])
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let message = common::next_message(&mut events).await;
        assert_eq!(message.event, "message");
        got.push(message.json());
    }
    assert_eq!(numbers(&got), vec![0, 2]);
    // Full: the third waits until one is acked.
    let waiting = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(waiting.is_err(), "a third message came: {waiting:?}");
    ack(&server, "$all/push", &got[..1]).await;
    let third = common::next_message(&mut events).await.json();
    assert_eq!(numbers(std::slice::from_ref(&third)), vec![4]);
    assert_eq!(third["ack_id"], third["event"]["position"].to_string());
    drop(events);
    let info = wait_info(&server, "$all/push", |info| {
        info["consumers"].as_array().unwrap().is_empty()
    })
    .await;
    // Position 1 was filtered out, 2 is unacked.
    assert_eq!(info["checkpoint"], 1);
}

/// Every event is acked exactly once across a kill -9: an ack answered is never delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_redelivered_after_acks_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    create(
        &server,
        "jobs",
        "g",
        json!({"start_from": "start", "message_timeout_ms": 1000}),
    )
    .await;
    server.append_n("jobs", 300).await;
    let mut acked: HashMap<u64, u32> = HashMap::new();
    let mut restarted = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 300 {
        assert!(Instant::now() < deadline, "only {} acked", acked.len());
        let messages = pull(&server, "jobs/g", "a", 7, 500).await;
        for message in &messages {
            let n = message["event"]["data"]["n"].as_u64().unwrap();
            assert!(!acked.contains_key(&n), "{n} was acked and came again");
        }
        // Ack all but the last of each batch, which is left to time out.
        let (to_ack, _) = messages.split_at(messages.len().saturating_sub(1));
        if !to_ack.is_empty() {
            ack(&server, "jobs/g", to_ack).await;
        }
        for message in to_ack {
            let n = message["event"]["data"]["n"].as_u64().unwrap();
            *acked.entry(n).or_default() += 1;
        }
        if messages.len() == 1 {
            ack(&server, "jobs/g", &messages).await;
            let n = messages[0]["event"]["data"]["n"].as_u64().unwrap();
            *acked.entry(n).or_default() += 1;
        }
        if !restarted && acked.len() >= 150 {
            server.kill();
            server = Server::start_in(dir.path(), &[]);
            restarted = true;
        }
    }
    assert!(restarted);
    assert!(acked.values().all(|&count| count == 1));
    // The settings came back with the group.
    assert_eq!(
        info(&server, "jobs/g").await["settings"]["message_timeout_ms"],
        1000
    );
}

/// Messages whose consumer never acks are retried on every timeout, then parked with the
/// reason; a long poll still waiting ends when the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_parked_after_their_retries() {
    let mut server = Server::start();
    create(
        &server,
        "jobs",
        "g",
        json!({"start_from": "start", "message_timeout_ms": 200, "max_retry_count": 2}),
    )
    .await;
    server.append_n("jobs", 1).await;
    let mut retries = Vec::new();
    while retries.len() < 3 {
        for message in pull(&server, "jobs/g", "forgetful", 1, 2000).await {
            retries.push(message["retry_count"].as_u64().unwrap());
        }
    }
    assert_eq!(retries, vec![0, 1, 2]);
    let info = wait_info(&server, "jobs/g", |info| info["parked"] == 1).await;
    assert_eq!(info["in_flight"], 0);
    let (_, parked) = server.get("/groups/jobs/g/parked").await;
    let reason = parked[0]["reason"].as_str().unwrap();
    assert!(reason.contains("message timeout"), "{reason}");

    let waiting = {
        let http = server.http.clone();
        let url = server.url("/groups/jobs/g/pull?consumer=patient&wait_ms=60000");
        tokio::spawn(async move { http.post(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert!(server.terminate(), "the server did not stop cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the long poll held the shutdown"
    );
    let answer = waiting.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
}

/// The client library's group calls: the same contract, typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_speaks_groups() {
    use refract::client::{Client, GroupSettings, NackAction, StartFrom, StartName, Strategy};

    let server = Server::start();
    let client = Client::new(&server.base, None).unwrap();
    let settings = GroupSettings {
        start_from: StartFrom::Named(StartName::Start),
        strategy: Strategy::Pinned,
        min_checkpoint_count: 1,
        checkpoint_after_ms: 0,
        ..GroupSettings::default()
    };
    let (created, info) = client.put_group("jobs", "g", &settings).await.unwrap();
    assert!(created);
    assert_eq!(info.settings, settings);
    server.append_n("jobs", 4).await;

    let mut messages = Vec::new();
    while messages.len() < 2 {
        messages.extend(
            client
                .pull(
                    "jobs",
                    "g",
                    "puller",
                    2 - messages.len(),
                    Duration::from_secs(2),
                )
                .await
                .unwrap(),
        );
    }
    assert_eq!(messages[0].event.revision, 0);
    client
        .ack("jobs", "g", &[messages[0].ack_id.clone()])
        .await
        .unwrap();
    client
        .nack(
            "jobs",
            "g",
            &[messages[1].ack_id.clone()],
            NackAction::Park,
            "broken",
        )
        .await
        .unwrap();
    let unknown = client.ack("jobs", "g", &["999".into()]).await.unwrap_err();
    assert!(
        unknown.to_string().contains("has not delivered"),
        "{unknown}"
    );
    let malformed = client.ack("jobs", "g", &["x9".into()]).await.unwrap_err();
    assert!(
        malformed.to_string().contains("is not an ack id"),
        "{malformed}"
    );

    // The puller stops on its next message and leaves; a push consumer takes the rest,
    // which with the pinned strategy waits for the puller's buckets to be free.
    let held = client
        .pull("jobs", "g", "puller", 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(held[0].event.revision, 2);
    client
        .nack(
            "jobs",
            "g",
            &[held[0].ack_id.clone()],
            NackAction::Stop,
            "shutting down",
        )
        .await
        .unwrap();
    let mut pushed = Box::pin(
        client
            .group_subscribe("jobs", "g", "pusher", 5)
            .await
            .unwrap(),
    );
    let mut revisions = Vec::new();
    while revisions.len() < 2 {
        let message = pushed.next().await.unwrap().unwrap();
        revisions.push((message.event.revision, message.retry_count));
        client.ack("jobs", "g", &[message.ack_id]).await.unwrap();
    }
    assert_eq!(revisions, vec![(2, 1), (3, 0)]);
    assert_eq!(client.replay_parked("jobs", "g", None).await.unwrap(), 1);
    let replayed = pushed.next().await.unwrap().unwrap();
    assert_eq!(replayed.event.revision, 1);
    client.ack("jobs", "g", &[replayed.ack_id]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client.group("jobs", "g").await.unwrap();
        if info.checkpoint == Some(3) && info.parked == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.groups().await.unwrap().len(), 1);
    client.delete_group("jobs", "g").await.unwrap();
    assert!(client.group("jobs", "g").await.is_err());
}

/// Two push consumers with room for three each, five messages: round robin alternates,
/// dispatch to single fills the first consumer, pinned by correlation keeps each correlation id
/// on one consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_spread_messages_as_named() {
    let server = Server::start();
    for (group, strategy) in [
        ("rr", "round_robin"),
        ("single", "dispatch_to_single"),
        ("corr", "pinned_by_correlation"),
    ] {
        create(&server, "work", group, json!({"strategy": strategy})).await;
    }
    let mut streams = Vec::new();
    for group in ["rr", "single", "corr"] {
        for consumer in ["a", "b"] {
            let path = format!("/groups/work/{group}/subscribe?consumer={consumer}&buffer=3");
            streams.push((group, consumer, server.subscribe(&path, &[]).await));
        }
    }
    // Both consumers of every group have joined before the events are written.
    for group in ["rr", "single", "corr"] {
        wait_info(&server, &format!("work/{group}"), |info| {
            info["consumers"].as_array().unwrap().len() == 2
        })
        .await;
    }
    for n in 0..5 {
        let correlation = if n % 2 == 0 { "even" } else { "odd" };
        let event =
            json!({"type": "T", "data": {"n": n}, "metadata": {"$correlationId": correlation}});
        server.post("/streams/work", event).await;
    }
    let mut got: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    for group in ["rr", "single"] {
        wait_info(&server, &format!("work/{group}"), |info| {
            info["in_flight"] == 5
        })
        .await;
    }
    // Both correlation ids may belong to one consumer: then two wait for its room.
    wait_info(&server, "work/corr", |info| {
        let (in_flight, ready) = (info["in_flight"].as_u64(), info["ready"].as_u64());
        in_flight.unwrap() + ready.unwrap() == 5 && in_flight.unwrap() >= 3
    })
    .await;
    for (group, consumer, stream) in &mut streams {
        let held = info(&server, &format!("work/{group}")).await["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == *consumer)
            .unwrap()["in_flight"]
            .as_u64()
            .unwrap();
        for _ in 0..held {
            let message = common::next_message(stream).await.json();
            got.entry((group, consumer))
                .or_default()
                .push(message["event"]["data"]["n"].as_u64().unwrap());
        }
    }
    assert_eq!(got[&("rr", "a")], vec![0, 2, 4]);
    assert_eq!(got[&("rr", "b")], vec![1, 3]);
    assert_eq!(got[&("single", "a")], vec![0, 1, 2]);
    assert_eq!(got[&("single", "b")], vec![3, 4]);
    let corr_a = got.get(&("corr", "a")).cloned().unwrap_or_default();
    let corr_b = got.get(&("corr", "b")).cloned().unwrap_or_default();
    assert!(corr_a.len() + corr_b.len() >= 3, "{corr_a:?} {corr_b:?}");
    // Each correlation id (even or odd numbers) went to one consumer only.
    for parity in [0, 1] {
        let on_a = corr_a.iter().any(|n| n % 2 == parity);
        let on_b = corr_b.iter().any(|n| n % 2 == parity);
        assert!(!(on_a && on_b), "{corr_a:?} {corr_b:?}");
    }
}
