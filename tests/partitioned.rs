//! Kafka's processing model over Refract's streams: shard subscriptions and reads, and
//! partitioned consumer groups with generations and committed offsets. Where an event belongs is
//! computed here from the rule of `projections/shard-by-customer`, never by asking a sharder.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Random, Server, fnv1a_64, guest, next_message};
use serde_json::{Value, json};

/// The shard of an event as read (`GET /streams/…`): metadata `customer_id` if a string, else
/// data `customer_id` if a string, else the stream.
fn expected_shard(event: &Value, shards: u64) -> u32 {
    let customer = |json: &Value| {
        json.get("customer_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let stream = event["link"]["stream"]
        .as_str()
        .map(|_| event["stream"].as_str().unwrap())
        .unwrap_or_else(|| event["stream"].as_str().unwrap());
    let key = customer(&event["metadata"])
        .or_else(|| customer(&event["data"]))
        .unwrap_or_else(|| stream.to_owned());
    (fnv1a_64(key.as_bytes()) % shards) as u32
}

/// Appends `count` events over `streams` streams of category `order`, customers at random.
async fn write_orders(server: &Server, random: &mut Random, count: usize, streams: u64) {
    for chunk in 0..count.div_ceil(50) {
        let events: Vec<Value> = (0..50.min(count - chunk * 50))
            .map(|_| {
                let customer = format!("customer-{}", random.below(40));
                match random.below(3) {
                    0 => json!({"type": "OrderPlaced", "data": {"customer_id": customer}}),
                    1 => json!({"type": "OrderPaid", "data": {"total": 3},
                                "metadata": {"customer_id": customer}}),
                    _ => json!({"type": "OrderNoted", "data": {"note": "no customer"}}),
                }
            })
            .collect();
        let stream = format!("order-{}", random.below(streams));
        let (code, body) = server
            .post(&format!("/streams/{stream}"), json!(events))
            .await;
        assert_eq!(code, 200, "{body}");
    }
}

async fn with_sharder() -> Server {
    let server = Server::start();
    let (code, body) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 201, "{body}");
    server
}

/// Every page of a read, following `next`.
async fn read_pages(server: &Server, path: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let separator = if path.contains('?') { '&' } else { '?' };
        let (code, page) = server
            .get(&format!("{path}{separator}from={from}&limit=37"))
            .await;
        assert_eq!(code, 200, "{page}");
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => return events,
        }
    }
}

#[tokio::test]
async fn shard_reads_and_subscriptions_equal_a_client_side_filter() {
    let server = with_sharder().await;
    let mut random = Random(7);
    write_orders(&server, &mut random, 1_200, 25).await;
    let all = server.read_everything("$all").await;
    let category = server.read_everything("$ce-order").await;
    assert_eq!(all.len(), 1_200);
    for (source, everything, id) in [("$all", &all, "position"), ("$ce-order", &category, "")] {
        let mut seen = BTreeSet::new();
        for shard in 0..5 {
            let wanted: Vec<&Value> = everything
                .iter()
                .filter(|event| expected_shard(event, 5) == shard)
                .collect();
            let query = format!("sharder=by-customer&shards=5&shard={shard}");
            let read = read_pages(&server, &format!("/streams/{source}?{query}")).await;
            assert_eq!(read.len(), wanted.len(), "{source} shard {shard}");
            for (got, want) in read.iter().zip(&wanted) {
                assert_eq!(got["id"], want["id"]);
                assert!(seen.insert(got["id"].as_str().unwrap().to_owned()));
            }
            // The subscription: history, caught_up, then a live event of this shard.
            let path = format!("/streams/{source}/subscribe?{query}");
            let mut subscription = server.subscribe(&path, &[]).await;
            let mut ids = Vec::new();
            let mut delivered = Vec::new();
            loop {
                let message = next_message(&mut subscription).await;
                if message.event == "caught_up" {
                    break;
                }
                ids.push(message.id.clone());
                delivered.push(message.json()["id"].clone());
            }
            let wanted_ids: Vec<&Value> = wanted.iter().map(|event| &event["id"]).collect();
            assert_eq!(delivered.iter().collect::<Vec<_>>(), wanted_ids);
            // The ids are the usual positions (for `$all`) or revisions of the category stream.
            for (sse_id, event) in ids.iter().zip(&wanted) {
                let expected = if id == "position" {
                    event["position"].as_u64().unwrap()
                } else {
                    event["link"]["revision"].as_u64().unwrap()
                };
                assert_eq!(sse_id.parse::<u64>().unwrap(), expected);
            }
            // Resuming after the middle one gives the rest.
            let middle = ids.len() / 2;
            let path = format!("/streams/{source}/subscribe?{query}");
            let mut resumed = server
                .subscribe(&path, &[("Last-Event-ID", ids[middle].as_str())])
                .await;
            for expected in &wanted_ids[middle + 1..] {
                let message = next_message(&mut resumed).await;
                assert_eq!(&&message.json()["id"], expected);
            }
            assert_eq!(next_message(&mut resumed).await.event, "caught_up");
        }
        assert_eq!(
            seen.len(),
            everything.len(),
            "the shards of {source} cover it"
        );
    }
    // Backward reads page the same events in reverse.
    let backward = {
        let mut events = Vec::new();
        let mut from = u64::MAX;
        loop {
            let (_, page) = server
                .get(&format!(
                    "/streams/$all?direction=backward&limit=50&from={from}&sharder=by-customer&shards=5&shard=2"
                ))
                .await;
            events.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next"].as_u64() {
                Some(next) => from = next,
                None => break events,
            }
        }
    };
    let mut forward: Vec<&Value> = all.iter().filter(|e| expected_shard(e, 5) == 2).collect();
    forward.reverse();
    assert_eq!(backward.iter().collect::<Vec<_>>(), forward);

    // Bad parameters are refused before anything is read.
    for query in [
        "sharder=by-customer&shards=5&shard=5",
        "sharder=by-customer&shards=0&shard=0",
        "sharder=nope&shards=5&shard=1",
        "sharder=by-customer&shard=1",
    ] {
        let (code, body) = server.get(&format!("/streams/$all?{query}")).await;
        assert_eq!(code, 400, "{query}: {body}");
        let response = reqwest::get(server.url(&format!("/streams/$all/subscribe?{query}")))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
    }
}

/// A pull of a partitioned group.
/// Per server, group and consumer, the generation its last pull learned: what a consumer
/// names in its next pull, as the client library does.
static GENERATIONS: std::sync::Mutex<BTreeMap<String, u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// A pull of a partitioned group by a running consumer (naming its last generation).
async fn pull(server: &Server, path: &str, consumer: &str, max: usize) -> Value {
    let key = format!("{} {path} {consumer}", server.url(""));
    let known = GENERATIONS.lock().unwrap().get(&key).copied();
    let generation = known.map_or(String::new(), |g| format!("&generation={g}"));
    let (code, body) = server
        .post(
            &format!("/groups/{path}/pull?consumer={consumer}&max={max}&wait_ms=200{generation}"),
            json!(null),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let learned = body["generation"].as_u64().expect("a generation");
    GENERATIONS.lock().unwrap().insert(key, learned);
    body
}

/// A consumer's process starting again: its pull names no generation.
fn forget_generation(server: &Server, path: &str, consumer: &str) {
    let key = format!("{} {path} {consumer}", server.url(""));
    GENERATIONS.lock().unwrap().remove(&key);
}

/// Pulls until a pull comes back empty: the answers' messages together, with the last
/// answer's generation and partitions.
async fn pull_all(server: &Server, path: &str, consumer: &str) -> Value {
    let mut answer = pull(server, path, consumer, 10_000).await;
    let mut messages = answer["messages"].as_array().unwrap().clone();
    loop {
        let next = pull(server, path, consumer, 10_000).await;
        let more = next["messages"].as_array().unwrap();
        if more.is_empty() {
            break;
        }
        assert_eq!(
            next["generation"], answer["generation"],
            "a rebalance meanwhile"
        );
        messages.extend(more.iter().cloned());
    }
    answer["messages"] = json!(messages);
    answer
}

async fn commit(
    server: &Server,
    path: &str,
    consumer: &str,
    generation: u64,
    offsets: Value,
) -> (u16, Value) {
    server
        .post(
            &format!("/groups/{path}/commit?consumer={consumer}"),
            json!({"generation": generation, "offsets": offsets}),
        )
        .await
}

fn partitioned(partitions: u32) -> Value {
    json!({"start_from": "start", "message_timeout_ms": 60_000,
           "strategy": {"partitioned": {"sharder": "by-customer", "partitions": partitions}}})
}

#[tokio::test]
async fn partitions_belong_to_one_consumer_per_generation_and_commits_name_it() {
    let server = with_sharder().await;
    let mut random = Random(11);
    write_orders(&server, &mut random, 400, 10).await;
    let all = server.read_everything("$all").await;
    let (code, info) = server.put("/groups/$all/billing", partitioned(4)).await;
    assert_eq!(code, 201, "{info}");
    let path = "$all/billing";

    // Alone, `a` owns every partition and gets each one's events in order.
    let first = pull_all(&server, path, "a").await;
    let generation = first["generation"].as_u64().unwrap();
    assert_eq!(first["partitions"], json!([0, 1, 2, 3]));
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 400);
    let mut last_offset: BTreeMap<u32, u64> = BTreeMap::new();
    for message in messages {
        let partition = message["partition"].as_u64().unwrap() as u32;
        assert_eq!(partition, expected_shard(&message["event"], 4));
        assert!(message.get("ack_id").is_none());
        let offset = message["offset"].as_u64().unwrap();
        assert_eq!(offset, message["event"]["position"].as_u64().unwrap());
        if let Some(previous) = last_offset.insert(partition, offset) {
            assert!(previous < offset, "partition {partition} out of order");
        }
    }

    // Commit partitions 0 and 1 to their last offsets.
    let (code, body) = commit(
        &server,
        path,
        "a",
        generation,
        json!({"0": last_offset[&0], "1": last_offset[&1]}),
    )
    .await;
    assert_eq!(code, 204, "{body}");
    // An offset past what was delivered, a partition that does not exist, no generation.
    let (code, body) = commit(&server, path, "a", generation, json!({"2": 1_000_000})).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("not_delivered")),
        "{body}"
    );
    let (code, body) = commit(&server, path, "a", generation, json!({"9": 1})).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("not_owner")),
        "{body}"
    );
    let (code, _) = server
        .post(
            &format!("/groups/{path}/commit?consumer=a"),
            json!({"offsets": {}}),
        )
        .await;
    assert_eq!(code, 400);

    // `a` starts again under its name (a new process): its uncommitted partitions come again
    // from their committed offsets, the committed ones give nothing.
    forget_generation(&server, path, "a");
    let again = pull_all(&server, path, "a").await;
    assert_eq!(
        again["generation"].as_u64(),
        Some(generation),
        "nobody moved"
    );
    let mut again_by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for message in again["messages"].as_array().unwrap() {
        again_by_partition
            .entry(message["partition"].as_u64().unwrap() as u32)
            .or_default()
            .push(message["offset"].as_u64().unwrap());
    }
    assert!(!again_by_partition.contains_key(&0) && !again_by_partition.contains_key(&1));
    for partition in [2, 3] {
        let expected: Vec<u64> = messages
            .iter()
            .filter(|m| m["partition"] == partition)
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(
            again_by_partition[&partition], expected,
            "partition {partition} again"
        );
    }

    // `b` joins: a new generation; `a`'s old one is refused.
    let joined = pull_all(&server, path, "b").await;
    let second = joined["generation"].as_u64().unwrap();
    assert!(second > generation);
    let theirs: Vec<u32> = serde_json::from_value(joined["partitions"].clone()).unwrap();
    assert_eq!(theirs.len(), 2);
    let (code, body) = commit(
        &server,
        path,
        "a",
        generation,
        json!({"2": last_offset[&2]}),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("stale_generation")),
        "{body}"
    );
    let mine = pull(&server, path, "a", 10_000).await;
    assert_eq!(mine["generation"].as_u64(), Some(second));
    let ours: Vec<u32> = serde_json::from_value(mine["partitions"].clone()).unwrap();
    assert_eq!(ours.len(), 2);
    assert!(ours.iter().all(|p| !theirs.contains(p)));
    // A partition of the other consumer is not `a`'s to commit.
    let (code, body) = commit(
        &server,
        path,
        "a",
        second,
        json!({theirs[0].to_string(): 1}),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("not_owner")),
        "{body}"
    );

    // `b`'s partitions start again after their committed offsets: a committed partition gives
    // nothing, an uncommitted one everything.
    let per_partition = |partition: u32| -> Vec<u64> {
        all.iter()
            .filter(|e| expected_shard(e, 4) == partition)
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    };
    let mut received: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for message in joined["messages"].as_array().unwrap() {
        received
            .entry(message["partition"].as_u64().unwrap() as u32)
            .or_default()
            .push(message["offset"].as_u64().unwrap());
    }
    for partition in &theirs {
        let wanted = if *partition <= 1 {
            vec![]
        } else {
            per_partition(*partition)
        };
        assert_eq!(received.remove(partition).unwrap_or_default(), wanted);
    }
    assert!(received.is_empty(), "b got another consumer's partition");

    // Info shows owners, committed offsets and lag.
    let (_, info) = server.get(&format!("/groups/{path}")).await;
    assert_eq!(info["generation"].as_u64(), Some(second));
    let partitions = info["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 4);
    for entry in partitions {
        let partition = entry["partition"].as_u64().unwrap() as u32;
        let owner = if theirs.contains(&partition) {
            "b"
        } else {
            "a"
        };
        assert_eq!(entry["owner"], owner);
        let events = per_partition(partition);
        if partition <= 1 {
            assert_eq!(entry["committed"].as_u64(), events.last().copied());
            assert_eq!(entry["lag"], 0);
        } else {
            assert_eq!(entry["committed"], Value::Null);
            assert_eq!(entry["lag"].as_u64(), Some(events.len() as u64), "{entry}");
        }
    }
    // A per-message group's routes refuse a partitioned one, and the other way round.
    let (code, _) = server
        .post(&format!("/groups/{path}/ack"), json!({"ack_ids": ["1"]}))
        .await;
    assert_eq!(code, 400);
    let (code, body) = server
        .put("/groups/$all/billing", json!({"strategy": "round_robin"}))
        .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.delete("/sharders/by-customer").await;
    assert_eq!(code, 409, "the group uses it: {body}");
}

/// Consumers join, leave (time out), and the server is killed twice; every partition's events
/// reach one consumer at a time, in order from the last committed offset, and the committed
/// offsets cover every event at the end.
#[tokio::test]
async fn joins_leaves_and_kill_9_deliver_every_partition_in_order_from_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let (code, _) = server
        .deploy_sharder("by-customer", guest("shard-by-customer"))
        .await;
    assert_eq!(code, 201);
    let mut settings = partitioned(6);
    settings["message_timeout_ms"] = json!(400);
    let (code, _) = server.put("/groups/$ce-order/jobs", settings).await;
    assert_eq!(code, 201);
    let path = "$ce-order/jobs";
    let mut random = Random(5);
    write_orders(&server, &mut random, 300, 12).await;

    // Per partition: the offsets committed so far, and what each consumer holds uncommitted.
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    let mut processed: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let names = ["c0", "c1", "c2"];
    let mut active: Vec<&str> = vec!["c0", "c1"];
    for round in 0..12 {
        match round {
            3 => active.push("c2"),
            5 => {
                // c0 stops pulling: it times out and its partitions move.
                active.retain(|name| *name != "c0");
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            6 | 9 => {
                server.kill();
                server = Server::start_in(dir.path(), &[]);
            }
            7 => active.push("c0"),
            _ => {}
        }
        write_orders(&server, &mut random, 60, 12).await;
        for name in names.iter().filter(|name| active.contains(name)) {
            let batch = pull(&server, path, name, 40).await;
            let generation = batch["generation"].as_u64().unwrap();
            let owned: Vec<u32> = serde_json::from_value(batch["partitions"].clone()).unwrap();
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            for message in batch["messages"].as_array().unwrap() {
                let partition = message["partition"].as_u64().unwrap() as u32;
                let offset = message["offset"].as_u64().unwrap();
                assert!(
                    owned.contains(&partition),
                    "{name} got partition {partition}"
                );
                assert_eq!(partition, expected_shard(&message["event"], 6));
                // In order, and never something already committed.
                assert!(committed.get(&partition).is_none_or(|c| offset > *c));
                if let Some(previous) = last.insert(partition, offset) {
                    assert!(previous < offset);
                }
                processed.entry(partition).or_default().insert(offset);
            }
            // Commit every other round (what is not committed comes again after a move).
            if round % 2 == 0 && !last.is_empty() {
                let offsets: BTreeMap<String, u64> =
                    last.iter().map(|(p, o)| (p.to_string(), *o)).collect();
                let (code, body) = commit(&server, path, name, generation, json!(offsets)).await;
                if code == 204 {
                    committed.extend(last);
                } else {
                    assert_eq!(body["error"], "stale_generation", "{body}");
                }
            }
        }
    }
    // Drain with one consumer left, committing everything.
    tokio::time::sleep(Duration::from_millis(900)).await;
    loop {
        let batch = pull(&server, path, "last", 1_000).await;
        let generation = batch["generation"].as_u64().unwrap();
        let messages = batch["messages"].as_array().unwrap();
        if messages.is_empty() {
            break;
        }
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for message in messages {
            let partition = message["partition"].as_u64().unwrap() as u32;
            let offset = message["offset"].as_u64().unwrap();
            assert!(committed.get(&partition).is_none_or(|c| offset > *c));
            processed.entry(partition).or_default().insert(offset);
            last.insert(partition.to_string(), offset);
        }
        let (code, body) = commit(&server, path, "last", generation, json!(last)).await;
        assert_eq!(code, 204, "{body}");
    }
    // Every event of the category was processed, on its partition.
    let category = server.read_everything("$ce-order").await;
    assert_eq!(category.len(), 300 + 12 * 60);
    for event in &category {
        let partition = expected_shard(event, 6);
        let revision = event["link"]["revision"].as_u64().unwrap();
        assert!(
            processed[&partition].contains(&revision),
            "revision {revision} never came"
        );
    }
    let (_, info) = server.get(&format!("/groups/{path}")).await;
    for partition in info["partitions"].as_array().unwrap() {
        assert_eq!(partition["lag"], 0, "{info}");
    }
    // After one more restart nothing comes again: the offsets are durable.
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    let batch = pull(&server, path, "after", 1_000).await;
    assert_eq!(batch["messages"], json!([]), "committed events came again");
}

#[tokio::test]
async fn repartitioning_waits_for_every_partition_and_loses_or_reorders_nothing() {
    let server = with_sharder().await;
    let mut random = Random(3);
    write_orders(&server, &mut random, 200, 8).await;
    let (code, _) = server.put("/groups/$all/resize", partitioned(2)).await;
    assert_eq!(code, 201);
    let path = "$all/resize";
    let first = pull_all(&server, path, "a").await;
    let generation = first["generation"].as_u64().unwrap();
    let before: Vec<Value> = first["messages"].as_array().unwrap().clone();
    assert_eq!(before.len(), 200);
    // Partition 0 is committed, partition 1 only halfway.
    let of = |partition: u64| -> Vec<u64> {
        before
            .iter()
            .filter(|m| m["partition"] == partition)
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    };
    let (zero, one) = (of(0), of(1));
    let (code, _) = commit(
        &server,
        path,
        "a",
        generation,
        json!({"0": zero.last().unwrap(), "1": one[one.len() / 2]}),
    )
    .await;
    assert_eq!(code, 204);

    // Three partitions from here on: the switch waits at the head.
    let (code, info) = server.put("/groups/$all/resize", partitioned(3)).await;
    assert_eq!(code, 200, "{info}");
    let at = info["repartitioning"]["at"].as_u64().unwrap();
    assert_eq!(info["repartitioning"]["from_partitions"], 2);
    assert_eq!(info["partitions"].as_array().unwrap().len(), 2);
    write_orders(&server, &mut random, 100, 8).await;
    // Nothing past the switch is delivered while partition 1 is not committed.
    let waiting = pull(&server, path, "a", 10_000).await;
    let generation = waiting["generation"].as_u64().unwrap();
    assert_eq!(waiting["messages"], json!([]), "the switch did not wait");
    let (code, body) = commit(
        &server,
        path,
        "a",
        generation,
        json!({"1": one.last().unwrap()}),
    )
    .await;
    assert_eq!(code, 204, "{body}");
    // Now the group switches: three partitions, all at the switch position.
    let mut after = Vec::new();
    let mut generation_after = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while after.len() < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the switch did not happen"
        );
        let batch = pull(&server, path, "a", 10_000).await;
        generation_after = batch["generation"].as_u64().unwrap();
        after.extend(batch["messages"].as_array().unwrap().iter().cloned());
    }
    assert!(generation_after > generation);
    let (_, info) = server.get(&format!("/groups/{path}")).await;
    assert!(info.get("repartitioning").is_none(), "{info}");
    let partitions = info["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    for partition in partitions {
        assert_eq!(partition["committed"].as_u64(), Some(at - 1), "{info}");
    }
    // The events after the switch are exactly those written after it, on the new partitions,
    // each partition in order.
    let all = server.read_everything("$all").await;
    let written_after: Vec<&Value> = all
        .iter()
        .filter(|e| e["position"].as_u64().unwrap() >= at)
        .collect();
    assert_eq!(written_after.len(), 100);
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for message in &after {
        assert_eq!(
            message["partition"].as_u64().unwrap() as u32,
            expected_shard(&message["event"], 3)
        );
        let offset = message["offset"].as_u64().unwrap();
        assert!(offset >= at);
        if let Some(previous) = last.insert(message["partition"].as_u64().unwrap(), offset) {
            assert!(previous < offset);
        }
    }
    let mut ids: Vec<&Value> = after.iter().map(|m| &m["event"]["id"]).collect();
    let mut wanted: Vec<&Value> = written_after.iter().map(|e| &e["id"]).collect();
    ids.sort_by_key(|id| id.to_string());
    wanted.sort_by_key(|id| id.to_string());
    assert_eq!(ids, wanted);
}

#[tokio::test]
async fn a_push_consumer_learns_its_partitions_and_commits_with_them() {
    let server = with_sharder().await;
    let mut random = Random(9);
    write_orders(&server, &mut random, 100, 5).await;
    let (code, _) = server.put("/groups/$all/push", partitioned(3)).await;
    assert_eq!(code, 201);
    let mut push = server
        .subscribe("/groups/$all/push/subscribe?consumer=p&buffer=16", &[])
        .await;
    let assignment = next_message(&mut push).await;
    assert_eq!(assignment.event, "assignment");
    let assignment = assignment.json();
    assert_eq!(assignment["partitions"], json!([0, 1, 2]));
    let generation = assignment["generation"].as_u64().unwrap();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..100 {
        let message = next_message(&mut push).await;
        assert_eq!(message.event, "message");
        let body = message.json();
        assert_eq!(message.id, body["offset"].to_string());
        last.insert(
            body["partition"].to_string(),
            body["offset"].as_u64().unwrap(),
        );
    }
    let (code, body) = commit(&server, "$all/push", "p", generation, json!(last)).await;
    assert_eq!(code, 204, "{body}");
    // A second consumer joins: the push consumer is told its new partitions.
    let other = pull(&server, "$all/push", "q", 10).await;
    let assignment = next_message(&mut push).await;
    assert_eq!(assignment.event, "assignment");
    assert_eq!(assignment.json()["generation"], other["generation"]);
    // Closing the connection leaves the group at once: q owns every partition.
    drop(push);
    common::wait_until(|| async {
        pull(&server, "$all/push", "q", 10).await["partitions"] == json!([0, 1, 2])
    })
    .await;
    // The committed offsets held: the stream of q's messages is empty.
    let (_, info) = server.get("/groups/$all/push").await;
    for partition in info["partitions"].as_array().unwrap() {
        assert_eq!(partition["lag"], 0, "{info}");
    }
}

/// Runs `refract` with `--json`, expects success, and parses each line of its output.
fn cli_json_lines(args: &[&str]) -> Vec<Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_refract"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn cli_reads_a_shard_and_consumes_with_commits() {
    let server = with_sharder().await;
    let mut random = Random(13);
    write_orders(&server, &mut random, 150, 5).await;
    let all = server.read_everything("$all").await;
    let binary = env!("CARGO_BIN_EXE_refract");
    let read = cli_json_lines(&[
        "read",
        "$all",
        "--sharder",
        "by-customer",
        "--shard",
        "2/4",
        "--server",
        &server.url(""),
    ]);
    let wanted: Vec<&Value> = all.iter().filter(|e| expected_shard(e, 4) == 2).collect();
    assert_eq!(
        read.iter().map(|e| &e["id"]).collect::<Vec<_>>(),
        wanted.iter().map(|e| &e["id"]).collect::<Vec<_>>()
    );
    let output = std::process::Command::new(binary)
        .args(["read", "$all", "--shard", "2/4"])
        .args(["--server", &server.url("")])
        .output()
        .unwrap();
    assert!(!output.status.success(), "--shard without --sharder");

    let (code, _) = server.put("/groups/$all/cli", partitioned(4)).await;
    assert_eq!(code, 201);
    let consumed = cli_json_lines(&[
        "group",
        "consume",
        "$all",
        "cli",
        "--consumer",
        "cli-1",
        "--commit-every",
        "40",
        "--count",
        "150",
        "--max",
        "25",
        "--server",
        &server.url(""),
    ]);
    assert_eq!(consumed.len(), 150);
    let (_, info) = server.get("/groups/$all/cli").await;
    for partition in info["partitions"].as_array().unwrap() {
        assert_eq!(
            partition["lag"], 0,
            "every printed message was committed: {info}"
        );
    }
}

#[tokio::test]
async fn sse_of_a_shard_follows_live_appends() {
    let server = with_sharder().await;
    let mut subscription = server
        .subscribe(
            "/streams/$all/subscribe?sharder=by-customer&shards=2&shard=1",
            &[],
        )
        .await;
    assert_eq!(next_message(&mut subscription).await.event, "caught_up");
    let mut random = Random(21);
    write_orders(&server, &mut random, 100, 4).await;
    let all = server.read_everything("$all").await;
    for event in all.iter().filter(|e| expected_shard(e, 2) == 1) {
        let message = next_message(&mut subscription).await;
        assert_eq!(message.json()["id"], event["id"]);
    }
}
