//! Three `refract serve` nodes on loopback form a cluster: the leader takes writes, followers
//! refuse them with the leader's URL and serve reads, and the cluster survives `kill -9` of its
//! leader without losing an acknowledged write.

mod common;

use std::time::Duration;

use common::Server;
use common::cluster::Cluster;
use common::proxy::Fault;
use serde_json::{Value, json};

/// Waits until `node` holds `count` events in `stream`, and answers their ids.
async fn events_on(node: &Server, stream: &str, count: usize) -> Vec<Value> {
    for _ in 0..400 {
        let (status, page) = node.get(&format!("/streams/{stream}")).await;
        if status == 200 && page["events"].as_array().unwrap().len() >= count {
            return page["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|event| event["id"].clone())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} did not catch up on {stream}", node.base);
}

async fn append(node: &Server, stream: &str, expected: &str, id: &str) -> reqwest::Response {
    node.http
        .post(node.url(&format!("/streams/{stream}")))
        .header("Expected-Revision", expected)
        .json(&json!([{"id": id, "type": "Placed", "data": {"n": 1}}]))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_takes_writes_on_its_leader_and_survives_its_kill() {
    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    let (status, status_body) = cluster.node(follower).get("/cluster").await;
    assert_eq!(status, 200);
    assert_eq!(status_body["node_id"], follower);
    assert_eq!(status_body["leader_url"], cluster.node(leader).base);
    let roles = member_roles(&status_body);
    assert_eq!(roles.len(), 3);
    for (id, role) in roles {
        assert_eq!(role, if id == leader { "leader" } else { "follower" });
    }
    // The admin UI's cluster page shows the same members and roles.
    let page = cluster.node(follower).text("/ui/cluster").await;
    assert!(page.contains(&cluster.node(leader).base), "{page}");
    assert_eq!(page.matches("<td>follower</td>").count(), 2, "{page}");
    assert_eq!(page.matches("<td>leader</td>").count(), 1, "{page}");

    let first = "5b5f4a6e-0000-4000-8000-000000000001";
    let response = append(cluster.node(leader), "order-1", "no_stream", first).await;
    assert_eq!(response.status(), 200);

    // A follower refuses the write and names the leader, in a header and in the body.
    let refused = append(cluster.node(follower), "order-1", "any", first).await;
    assert_eq!(refused.status(), 421);
    assert_eq!(
        refused.headers()["refract-leader"].to_str().unwrap(),
        cluster.node(leader).base
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "not_leader");
    assert_eq!(body["leader_url"], cluster.node(leader).base);

    for (_, node) in cluster.running() {
        assert_eq!(events_on(node, "order-1", 1).await, vec![json!(first)]);
    }

    // A linearizable read: the leader confirms its leadership and answers with every
    // acknowledged write; a follower does the same once it has applied up to the read index
    // the leader gives it.
    let (status, page) = cluster
        .node(leader)
        .get("/streams/order-1?consistency=linearizable")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["id"], first);
    let (status, all) = cluster
        .node(leader)
        .get("/streams/$all?consistency=linearizable")
        .await;
    assert_eq!(status, 200, "{all}");
    let (status, body) = cluster
        .node(follower)
        .get("/streams/order-1?consistency=linearizable")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["id"], first);

    // /metrics says the same as /cluster: the term, the members' roles, how far each got.
    let metrics = cluster.node(leader).text("/metrics").await;
    let role = format!(r#"refract_cluster_member_role{{member="{follower}",role="follower"}} 1"#);
    assert!(metrics.contains(&role), "{metrics}");
    assert!(metrics.contains(&format!(
        r#"refract_cluster_member_lag_entries{{member="{follower}"}}"#
    )));
    assert!(metrics.contains(&format!(r#"refract_cluster_term{{member="{leader}"}}"#)));

    // kill -9 of the leader: the others elect a new one, which has the acknowledged write.
    cluster.nodes[(leader - 1) as usize]
        .as_mut()
        .unwrap()
        .kill();
    cluster.nodes[(leader - 1) as usize] = None;
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let second = "5b5f4a6e-0000-4000-8000-000000000002";
    let response = append(cluster.node(new_leader), "order-1", "0", second).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // The same write again (a client retrying after a failover): idempotent.
    let again = append(cluster.node(new_leader), "order-1", "0", second).await;
    assert_eq!(again.status(), 200);

    // The killed node comes back as a follower and catches up.
    let restarted = cluster.start_node(leader);
    cluster.nodes[(leader - 1) as usize] = Some(restarted);
    assert_eq!(cluster.leader().await, new_leader);
    for (_, node) in cluster.running() {
        assert_eq!(
            events_on(node, "order-1", 2).await,
            vec![json!(first), json!(second)]
        );
        let (status, all) = node.get("/streams/$all").await;
        assert_eq!(status, 200);
        assert_eq!(all["events"].as_array().unwrap().len(), 2, "{all}");
    }
}

/// The client and the CLI, given every node, find the leader whichever they ask first, and an
/// append made while the leader is killed lands once on the new one.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_and_the_cli_follow_the_leader_through_a_failover() {
    use refract::client::{Client, NewEvent, ReadOptions};
    use refract::store::ExpectedRevision;

    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    // The leader last, so the first request goes to a follower.
    let mut order: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    order.push(leader);
    let servers = order
        .iter()
        .map(|id| cluster.node(*id).base.clone())
        .collect::<Vec<_>>()
        .join(",");
    let client = Client::new(&servers, None).unwrap();
    let placed = NewEvent::json("Placed", json!({"n": 1}));
    client
        .append("order-7", ExpectedRevision::NoStream, &[placed])
        .await
        .unwrap();
    assert_eq!(
        client.base().as_str().trim_end_matches('/'),
        cluster.node(leader).base
    );

    let output = std::process::Command::new(common::BINARY)
        .args(["append", "order-7", "--type", "Paid", "--data", "{}"])
        .args(["--expected-revision", "0", "--server", &servers])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    cluster.nodes[(leader - 1) as usize]
        .as_mut()
        .unwrap()
        .kill();
    cluster.nodes[(leader - 1) as usize] = None;
    let shipped = NewEvent::json("Shipped", json!({}));
    client
        .append("order-7", ExpectedRevision::Exact(1), &[shipped])
        .await
        .unwrap();
    let page = client
        .read("order-7", &ReadOptions::default())
        .await
        .unwrap();
    let types: Vec<&str> = page
        .events
        .iter()
        .map(|event| event.event_type.as_str())
        .collect();
    assert_eq!(types, ["Placed", "Paid", "Shipped"]);
}

/// A fourth node joins as a learner and catches up, becomes a voter, and a node is removed;
/// the CLI shows and changes the members through any node.
#[tokio::test(flavor = "multi_thread")]
async fn members_join_as_learners_become_voters_and_leave() {
    let cluster = Cluster::start();
    let leader = cluster.leader().await;
    cluster.node(leader).append_n("before-join", 3).await;

    let fourth_dir = cluster.dir.path().join("4");
    let any_node = cluster.node(1).base.clone();
    let fourth = Server::start_listening(
        &fourth_dir,
        "127.0.0.1:0",
        &["--node-id", "4", "--join", &any_node],
    );
    let mut roles = Vec::new();
    for _ in 0..400 {
        let (_, status) = cluster.node(leader).get("/cluster").await;
        roles = member_roles(&status);
        if roles.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(roles.iter().find(|(id, _)| *id == 4).unwrap().1, "learner");
    assert_eq!(events_on(&fourth, "before-join", 3).await.len(), 3);
    cluster.node(leader).append_n("after-join", 1).await;
    assert_eq!(events_on(&fourth, "after-join", 1).await.len(), 1);
    // A learner takes no writes either.
    let (status, _) = fourth
        .post("/streams/x", json!([{"type": "T", "data": {}}]))
        .await;
    assert_eq!(status, 421);

    let servers: Vec<String> = cluster
        .running()
        .map(|(_, node)| node.base.clone())
        .collect();
    let servers = servers.join(",");
    let cli = |args: &[&str], servers: &str| {
        let output = std::process::Command::new(common::BINARY)
            .args(["cluster"])
            .args(args)
            .args(["--json", "--server", servers])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let status = cli(&["voters", "1", "2", "3", "4"], &servers);
    let roles = member_roles(&status);
    assert_eq!(
        roles.iter().filter(|(_, role)| role != "learner").count(),
        4,
        "{status}"
    );

    let leaving = (1..=3).find(|id| *id != leader).unwrap();
    cli(&["remove", &leaving.to_string()], &servers);
    // The node taken out no longer hears of the cluster: ask the leader.
    let status = cli(&["status"], &cluster.node(leader).base);
    let ids: Vec<u64> = member_roles(&status).iter().map(|(id, _)| *id).collect();
    assert!(!ids.contains(&leaving), "{status}");
    assert_eq!(ids.len(), 3, "{status}");
    cluster.node(leader).append_n("after-leave", 1).await;
    assert_eq!(events_on(&fourth, "after-leave", 1).await.len(), 1);
}

/// A node that joins after the log was purged gets the leader's database as a snapshot, and
/// goes on from it with the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_joins_after_the_log_was_purged_gets_a_snapshot() {
    let tuning = ["--snapshot-every", "5", "--log-keep", "0"];
    let cluster = Cluster::start_with(&tuning);
    let leader = cluster.leader().await;
    for n in 0..30 {
        cluster
            .node(leader)
            .append_n(&format!("order-{n}"), 2)
            .await;
    }
    let leader_dir = cluster.dir.path().join(leader.to_string());
    let mut purged = false;
    for _ in 0..400 {
        if leader_dir.join("raft-log").join("purged").exists() {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(purged, "the leader never purged its log");

    let fourth_dir = cluster.dir.path().join("4");
    let mut args = vec!["--node-id", "4", "--join", &cluster.node(leader).base];
    args.extend(tuning);
    let fourth = Server::start_listening(&fourth_dir, "127.0.0.1:0", &args);
    assert_eq!(events_on(&fourth, "order-29", 2).await.len(), 2);
    let installed = std::fs::read_dir(fourth_dir.join("snapshots"))
        .unwrap()
        .filter(|item| item.as_ref().unwrap().file_type().unwrap().is_dir())
        .count();
    assert!(installed > 0, "the new node did not get a snapshot");
    cluster.node(leader).append_n("after-snapshot", 1).await;
    assert_eq!(events_on(&fourth, "after-snapshot", 1).await.len(), 1);
    let everything = |server: &Server| {
        let server = server.base.clone();
        async move {
            let client = reqwest::Client::new();
            let page: Value = client
                .get(format!("{server}/streams/$all?limit=4096"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            page["events"].clone()
        }
    };
    assert_eq!(
        everything(&fourth).await,
        everything(cluster.node(leader)).await
    );
}

fn member_roles(status: &Value) -> Vec<(u64, String)> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|member| {
            let role = member["role"].as_str().unwrap().to_owned();
            (member["id"].as_u64().unwrap(), role)
        })
        .collect()
}

/// Entries larger than a request's usual size limit replicate: a 5 MiB event reaches every node.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_event_replicates() {
    let cluster = Cluster::start();
    let leader = cluster.leader().await;
    let text = "x".repeat(5 << 20);
    let (status, body) = cluster
        .node(leader)
        .post(
            "/streams/big",
            json!([{"type": "Large", "data": {"text": text}}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (_, node) in cluster.running() {
        events_on(node, "big", 1).await;
        let (status, page) = node.get("/streams/big").await;
        assert_eq!(status, 200);
        assert_eq!(
            page["events"][0]["data"]["text"].as_str().unwrap().len(),
            5 << 20
        );
    }
}

/// A data directory stays what it was made: a single node's store does not start as a cluster
/// node, nor a cluster node's as a single node.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_does_not_switch_between_single_node_and_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let mut server = Server::start_in(&single, &[]);
    server.append_n("s", 1).await;
    assert!(server.terminate());
    let output = std::process::Command::new(common::BINARY)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "1",
            "--data",
        ])
        .arg(&single)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds a single node's store"));

    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    cluster.node(leader).append_n("c", 1).await;
    let node_dir = cluster.node(leader).dir.clone();
    for node in cluster.nodes.iter_mut().flatten() {
        node.kill();
    }
    let output = std::process::Command::new(common::BINARY)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&node_dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds a cluster node's store"));
}

/// A single node has no cluster to show.
#[tokio::test]
async fn a_single_node_is_not_a_cluster() {
    let server = Server::start();
    let (status, body) = server.get("/cluster").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    // Everything a single node acknowledged is applied: any read is linearizable.
    server.append_n("s", 1).await;
    let (status, page) = server.get("/streams/s?consistency=linearizable").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    let (status, _) = server.get("/streams/s?consistency=strong").await;
    assert_eq!(status, 400);
}

/// Pulls up to `max` messages of group `g` on `orders` for `consumer`.
async fn pull(node: &Server, consumer: &str, max: usize) -> Vec<Value> {
    let (status, body) = node
        .post(
            &format!("/groups/orders/g/pull?consumer={consumer}&max={max}&wait_ms=2000"),
            json!(null),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

/// A follower that was down catches up from the log on large batches.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_catches_up_on_large_batches() {
    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill(follower);
    let data = "x".repeat(1_000);
    let batch: Vec<Value> = (0..200)
        .map(|n| json!({"type": "Filled", "data": {"n": n, "padding": data}}))
        .collect();
    for _ in 0..40 {
        let (status, body) = cluster
            .node(leader)
            .post("/streams/fill", json!(batch))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    cluster.restart(follower);
    let node = cluster.node(follower);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = node.get("/streams/fill?direction=backward&limit=1").await;
        if status == 200 && page["events"][0]["revision"] == 7_999 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower did not catch up on 8,000 events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A follower the leader cannot reach answers no stale linearizable read: it waits to apply what
/// the leader had committed, and answers 503 when that does not come; healed, it answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_cut_off_from_the_leader_gives_no_stale_linearizable_read() {
    let cluster = Cluster::start_proxied(&[]).await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.fault(leader, follower, Fault::Cut);
    let id = "5b5f4a6e-0000-4000-8000-000000000021";
    let response = append(cluster.node(leader), "cut-1", "no_stream", id).await;
    assert_eq!(response.status(), 200);

    let (status, body) = cluster.node(follower).get("/streams/cut-1").await;
    assert_eq!(status, 404, "its applied state is behind: {body}");
    let linearizable = "/streams/cut-1?consistency=linearizable";
    let (status, body) = cluster.node(follower).get(linearizable).await;
    assert_eq!(status, 503, "{body}");

    cluster.fault(leader, follower, Fault::None);
    let (status, body) = cluster.node(follower).get(linearizable).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["id"], id);
}

/// A follower started with `--forward-writes` passes on what only the leader answers, and relays
/// its answers: appends (checked at the leader), the group's operations, its subscription.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_forwards_writes_with_forward_writes() {
    let cluster = Cluster::start_with(&["--forward-writes"]);
    let leader = cluster.leader().await;
    let follower = cluster.node((1..=3).find(|id| *id != leader).unwrap());
    cluster.processing_on(leader).await;

    let first = "5b5f4a6e-0000-4000-8000-000000000011";
    let response = append(follower, "order-1", "no_stream", first).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["first_revision"], 0, "{body}");
    // Expected revisions are checked where the write is decided, and the answer relayed.
    let other = "5b5f4a6e-0000-4000-8000-000000000012";
    let response = append(follower, "order-1", "no_stream", other).await;
    assert_eq!(response.status(), 409);
    assert_eq!(
        events_on(cluster.node(leader), "order-1", 1).await,
        vec![json!(first)]
    );

    let (status, body) = follower
        .put("/groups/order-1/g", json!({"start_from": "start"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, info) = follower.get("/groups/order-1/g").await;
    assert_eq!(status, 200, "{info}");
    // The subscription streams through the follower.
    let mut messages = follower
        .subscribe("/groups/order-1/g/subscribe?consumer=c&buffer=10", &[])
        .await;
    let message = common::next_message(&mut messages).await.json();
    assert_eq!(message["event"]["id"], first);
    let (status, body) = follower
        .post(
            "/groups/order-1/g/ack",
            json!({ "ack_ids": [message["ack_id"]] }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, info) = cluster.node(leader).get("/groups/order-1/g").await;
    assert_eq!(info["consumers"][0]["name"], "c", "{info}");
    assert_eq!(info["consumers"][0]["acked"], 1, "{info}");
    drop(messages);
}

/// Wasm projections, sharders and consumer groups run on the leader, and a follower sends their
/// callers there, but answers reads of the projections from the data it applied; when the leader
/// dies, the new one carries on from what the log holds: the projection counts every event once,
/// and no acked message comes again.
#[tokio::test(flavor = "multi_thread")]
async fn projections_and_groups_run_on_the_leader_and_move_with_it() {
    let mut cluster = Cluster::start();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let leader_url = cluster.node(leader).base.clone();
    for path in ["/groups", "/sharders"] {
        let (status, body) = cluster.node(follower).get(path).await;
        assert_eq!(status, 421, "{path}: {body}");
        assert_eq!(body["leader_url"], leader_url.as_str());
    }

    cluster.counter_and_group(leader, "orders/g").await;
    cluster.node(leader).append_n("orders", 10).await;
    cluster.node(leader).caught_up("counter").await;
    let first = pull(cluster.node(leader), "a", 6).await;
    assert_eq!(first.len(), 6);
    let (acked, unacked) = first.split_at(4);
    let ids: Vec<&Value> = acked.iter().map(|message| &message["ack_id"]).collect();
    let (status, body) = cluster
        .node(leader)
        .post("/groups/orders/g/ack", json!({ "ack_ids": ids }))
        .await;
    assert_eq!(status, 204, "{body}");

    cluster.kill(leader);
    let new_leader = cluster.leader().await;
    let node = cluster.node(new_leader);
    // The new leader starts them once it has applied everything committed before its term.
    cluster.processing_on(new_leader).await;
    node.append_n("orders", 5).await;
    let counted = node.caught_up("counter").await;
    let (status, counts) = node.get("/projections/counter/state").await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["count"], 15, "{counts}");
    // The other node has the same model: its state, and its digest once it applied as far.
    let other = (1..=3)
        .find(|id| *id != leader && *id != new_leader)
        .unwrap();
    let replica = cluster.node(other);
    let (status, list) = replica.get("/projections").await;
    assert_eq!(status, 200, "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "counter"),
        "{list}"
    );
    // Linearizable: it has applied everything the leader had committed, the count included.
    let (status, replicated) = replica
        .get("/projections/counter?consistency=linearizable")
        .await;
    assert_eq!(status, 200, "{replicated}");
    assert_eq!(replicated["digest"], counted["digest"], "{replicated}");
    let (status, replicated) = replica.get("/projections/counter/state").await;
    assert_eq!(status, 200, "{replicated}");
    assert_eq!(replicated, counts);

    // The unacked messages and the new ones come; the acked ones never again.
    let mut revisions = Vec::new();
    loop {
        let batch = pull(node, "b", 100).await;
        if batch.is_empty() {
            break;
        }
        let ids: Vec<&Value> = batch.iter().map(|message| &message["ack_id"]).collect();
        let (status, body) = node
            .post("/groups/orders/g/ack", json!({ "ack_ids": ids }))
            .await;
        assert_eq!(status, 204, "{body}");
        revisions.extend(
            batch
                .iter()
                .map(|message| message["event"]["revision"].as_u64().unwrap()),
        );
    }
    revisions.sort();
    let expected: Vec<u64> = unacked
        .iter()
        .map(|message| message["event"]["revision"].as_u64().unwrap())
        .chain(6..15)
        .collect();
    assert_eq!(revisions, expected);

    // The old leader comes back as a follower: it sends the group's callers on, and answers
    // for the projection from what it applied.
    cluster.restart(leader);
    assert_eq!(cluster.leader().await, new_leader);
    let (status, body) = cluster.node(leader).get("/groups/orders/g").await;
    assert_eq!(status, 421, "{body}");
    let (status, body) = cluster
        .node(leader)
        .get("/projections/counter?consistency=linearizable")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["digest"], counted["digest"], "{body}");
}

/// A sharded client whose shards are a cluster and a single node: the cluster's shard keeps
/// taking its streams' appends when its leader is killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_sharded_client_takes_a_cluster_per_shard() {
    use refract::client::{NewEvent, ReadOptions, ShardedClient, SharderSource};
    use refract::store::ExpectedRevision;

    let mut cluster = Cluster::start();
    let single = Server::start();
    let sharder = cluster.dir.path().join("by-customer.wasm");
    std::fs::write(&sharder, common::guest("shard-by-customer")).unwrap();
    let nodes: Vec<String> = cluster
        .running()
        .map(|(_, node)| node.base.clone())
        .collect();
    let shards = [nodes.join("+"), single.base.clone()];
    let sharded = ShardedClient::connect(&shards, None, &SharderSource::File(sharder))
        .await
        .unwrap();
    let placed = |n: usize| NewEvent::json("Placed", json!({"customer_id": format!("c{n}")}));
    let mut on_cluster = 0;
    for n in 0..12 {
        let (shard, _) = sharded
            .append(
                &format!("order-{n}"),
                ExpectedRevision::NoStream,
                &[placed(n)],
            )
            .await
            .unwrap();
        on_cluster += usize::from(shard == 0);
    }
    assert!((1..12).contains(&on_cluster), "both shards hold streams");

    let leader = cluster.leader().await;
    cluster.kill(leader);
    for n in 0..12 {
        sharded
            .append(
                &format!("order-{n}"),
                ExpectedRevision::Exact(0),
                &[placed(n)],
            )
            .await
            .unwrap();
    }
    for n in 0..12 {
        let (_, page) = sharded
            .read(&format!("order-{n}"), &ReadOptions::default())
            .await
            .unwrap();
        assert_eq!(page.events.len(), 2, "order-{n}");
    }
}
