//! Rebuilding Wasm projections beside their live version, against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::{Server, guest};
use serde_json::{Value, json};

/// Writes `orders` orders of `order-<n>` streams: placed, two items, shipped every other one.
/// Appends go in requests of many streams' events at once, as one request per stream would take
/// too long for the sizes these tests need.
async fn write_orders(server: &Server, orders: u64) {
    for order in 0..orders {
        let customer = format!("c{}", order % 50);
        let mut events = vec![
            json!({"type": "OrderPlaced", "data": {"customer_id": customer, "total_cents": 100}}),
            json!({"type": "ItemAdded", "data": {"sku": "a", "price_cents": 10}}),
            json!({"type": "ItemAdded", "data": {"sku": "b", "price_cents": 20}}),
        ];
        if order % 2 == 0 {
            events.push(json!({"type": "OrderShipped", "data": {}}));
        }
        let (code, body) = server
            .post(&format!("/streams/order-{order}"), json!(events))
            .await;
        assert_eq!(code, 200, "{body}");
    }
}

/// What a reader sees of the model: a few partitions' state and a few rows.
async fn snapshot(server: &Server, name: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    for order in [0, 1, 7, 42] {
        let (code, state) = server
            .get(&format!(
                "/projections/{name}/state?partition=order-{order}"
            ))
            .await;
        assert_eq!(code, 200, "order-{order}: {state}");
        seen.push(state);
    }
    for customer in ["c0", "c1", "c49"] {
        let (code, row) = server
            .get(&format!(
                "/projections/{name}/tables/by_customer/{customer}"
            ))
            .await;
        assert_eq!(code, 200, "{customer}: {row}");
        seen.push(row);
    }
    seen
}

async fn projection(server: &Server, name: &str) -> Value {
    let (code, status) = server.get(&format!("/projections/{name}")).await;
    assert_eq!(code, 200, "{status}");
    status
}

/// While a rebuild runs, every query answers from the complete live model; the switch comes
/// once the rebuilt version has caught up, and the same component over the same log gives the
/// same digest and the same emitted streams, without duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_see_a_half_built_model() {
    let server = Server::start();
    write_orders(&server, 2000).await;
    let (code, _) = server
        .deploy("orders", guest("order-summary"), "?emit=true")
        .await;
    assert_eq!(code, 201);
    let built = server.caught_up("orders").await;
    let model = snapshot(&server, "orders").await;
    let notified = server.read_everything("notify-c0").await;
    assert!(!notified.is_empty());

    for round in 0..2 {
        let (code, started) = server
            .post("/projections/orders/rebuild", json!(null))
            .await;
        assert_eq!(code, 200, "{started}");
        let mut saw_rebuilding = started["status"] == "rebuilding";
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert_eq!(snapshot(&server, "orders").await, model, "round {round}");
            let status = projection(&server, "orders").await;
            if status.get("rebuild").is_none() {
                assert_eq!(status["status"], "running", "{status}");
                break;
            }
            saw_rebuilding = true;
            let rebuild = &status["rebuild"];
            assert!(rebuild["progress"].as_f64().unwrap() <= 1.0);
            // The live version is complete while the rebuilt one is not yet.
            assert_eq!(status["position"], status["head_position"], "{status}");
            assert!(
                Instant::now() < deadline,
                "the rebuild did not finish: {status}"
            );
        }
        assert!(saw_rebuilding);
        let rebuilt = server.caught_up("orders").await;
        assert_eq!(rebuilt["digest"], built["digest"], "round {round}");
        assert_eq!(rebuilt["version"], built["version"]);
        assert_eq!(server.read_everything("notify-c0").await, notified);
    }
}

/// Events written while a rebuild runs are in the model after the switch: the rebuilt version
/// takes over only once it has caught up, and carries on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_switch_waits_for_the_rebuild_to_catch_up() {
    let server = Server::start();
    write_orders(&server, 500).await;
    server.deploy("orders", guest("order-summary"), "").await;
    server.caught_up("orders").await;
    server
        .post("/projections/orders/rebuild", json!(null))
        .await;
    // More orders while it rebuilds, and after.
    for order in 500..700 {
        let events =
            json!([{"type": "OrderPlaced", "data": {"customer_id": "late", "total_cents": 5}}]);
        server
            .post(&format!("/streams/order-{order}"), events)
            .await;
    }
    let status = server.caught_up("orders").await;
    assert!(status.get("rebuild").is_none(), "{status}");
    let (_, late) = server
        .get("/projections/orders/tables/by_customer/late")
        .await;
    assert_eq!(late, json!({"orders": 200, "total_cents": 1000}));
    // A projection built from scratch over the same log agrees.
    server.deploy("fresh", guest("order-summary"), "").await;
    let fresh = server.caught_up("fresh").await;
    assert_eq!(status["digest"], fresh["digest"]);
}

/// A stopped projection's rebuild waits; cancelling it drops it and the live version is as it
/// was. A new version that faults during its rebuild leaves the live version serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_and_faulted_rebuilds_leave_the_live_version_alone() {
    let server = Server::start();
    server.append_n("a-1", 10).await;
    server
        .post("/streams/a-1", json!({"type": "Poison", "data": {}}))
        .await;
    server.append_n("a-1", 19).await;
    server.deploy("p", guest("event-counter"), "").await;
    let before = server.caught_up("p").await;

    server.post("/projections/p/stop", json!(null)).await;
    let (code, status) = server.post("/projections/p/rebuild", json!(null)).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["rebuild"]["status"], "stopped", "{status}");
    assert_eq!(status["rebuild"]["position"], 0);
    let response = server
        .http
        .delete(server.url("/projections/p/rebuild"))
        .send()
        .await
        .unwrap();
    let (code, status) = common::status_and_json(response).await;
    assert_eq!(code, 200, "{status}");
    assert!(status.get("rebuild").is_none(), "{status}");
    let (code, _) = server.delete("/projections/p/rebuild").await;
    assert_eq!(code, 404, "nothing left to cancel");
    server.post("/projections/p/start", json!(null)).await;
    let after = server.caught_up("p").await;
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["version"], 1);

    // Version 2 traps on the Poison event while it rebuilds: version 1 keeps answering.
    let (code, deployed) = server.deploy("p", guest("fixture-trap"), "").await;
    assert_eq!(code, 200, "{deployed}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = projection(&server, "p").await;
        if !status["rebuild"]["fault"].is_null() {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["version"], 1);
    assert_eq!(status["rebuild"]["version"], 2);
    assert_eq!(status["rebuild"]["status"], "faulted");
    assert_eq!(status["rebuild"]["fault"]["position"], 10);
    let (_, counts) = server.get("/projections/p/state").await;
    assert_eq!(counts["count"], 30);
    server.delete("/projections/p/rebuild").await;
    assert!(status_of_p_has_no_rebuild(&server).await);
}

async fn status_of_p_has_no_rebuild(server: &Server) -> bool {
    projection(server, "p").await.get("rebuild").is_none()
}

/// `kill -9` in the middle of a rebuild: after the restart the rebuild resumes from its own
/// checkpoint, the live version is untouched meanwhile, and the result is the same model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_resumes_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    write_orders(&server, 6000).await;
    server
        .deploy("orders", guest("order-summary"), "?emit=true")
        .await;
    let built = server.caught_up("orders").await;
    let model = snapshot(&server, "orders").await;
    let notified = server.read_everything("notify-c2").await;
    server
        .post("/projections/orders/rebuild", json!(null))
        .await;
    // Kill it once the rebuild has committed a batch and before it is done.
    let head = built["head_position"].as_u64().unwrap();
    loop {
        let status = projection(&server, "orders").await;
        let position = status["rebuild"]["position"].as_u64().unwrap_or(head);
        assert!(
            position < head,
            "the rebuild finished before the kill: {status}"
        );
        if position > 0 {
            break;
        }
    }
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    // The rebuild is still there (from its last durable checkpoint) or has already switched.
    assert_eq!(snapshot(&server, "orders").await, model);
    let rebuilt = server.caught_up("orders").await;
    assert_eq!(rebuilt["digest"], built["digest"]);
    assert_eq!(server.read_everything("notify-c2").await, notified);
}

/// At the switch the emitted streams become what the new version emits: streams the old version
/// wrote and the new one does not are deleted, new ones appear, and none appear before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emitted_streams_follow_the_version_that_takes_over() {
    let server = Server::start();
    write_orders(&server, 200).await;
    server.deploy("orders", guest("order-summary"), "").await;
    server.caught_up("orders").await;
    let (code, _) = server.get("/streams/notify-c0").await;
    assert_eq!(code, 404, "version 1 may not emit");

    // Version 2 may emit and replaces what was emitted: its notifications appear with the
    // switch, once each.
    let (code, deployed) = server
        .deploy(
            "orders",
            guest("order-summary"),
            "?emit=true&emitted=replace",
        )
        .await;
    assert_eq!(code, 200, "{deployed}");
    let switched = server.caught_up("orders").await;
    assert_eq!(switched["version"], 2);
    let notified = server.read_everything("notify-c0").await;
    let orders: Vec<&str> = notified
        .iter()
        .map(|event| event["data"]["order"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..200)
        .step_by(50)
        .map(|order| format!("order-{order}"))
        .collect();
    assert_eq!(orders, expected);

    // Version 3 may not emit: the notifications go with version 2.
    server
        .deploy("orders", guest("order-summary"), "?emitted=replace")
        .await;
    let switched = server.caught_up("orders").await;
    assert_eq!(switched["version"], 3);
    let (code, _) = server.get("/streams/notify-c0").await;
    assert_eq!(code, 404);
}

/// Orders `from..to` of customers `customer(order)`: placed, an item, shipped.
async fn write_orders_of(
    server: &Server,
    orders: std::ops::Range<u64>,
    customer: impl Fn(u64) -> String,
) {
    let requests: Vec<_> = orders
        .map(|order| {
            let events = json!([
                {"type": "OrderPlaced", "data": {"customer_id": customer(order), "total_cents": order % 1000}},
                {"type": "ItemAdded", "data": {"sku": "a", "price_cents": 10 + order % 7}},
                {"type": "OrderShipped", "data": {}},
            ]);
            (format!("/streams/order-{order}"), events)
        })
        .collect();
    for chunk in requests.chunks(32) {
        let appends = chunk
            .iter()
            .map(|(path, events)| server.post(path, events.clone()));
        for (code, body) in futures::future::join_all(appends).await {
            assert_eq!(code, 200, "{body}");
        }
    }
}

/// Partitions run side by side on several workers give exactly the model and the emitted
/// streams that running the log in order gives: where orders have customers of their own (the
/// workers' windows are kept), where a few customers' rows are shared by every worker (windows
/// run again in order), and where every worker emits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parallel_rebuild_gives_the_same_digest_as_the_sequential_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &["--projection-workers", "1"]);
    write_orders_of(&server, 0..1500, |order| format!("own-{order}")).await;
    write_orders_of(&server, 1500..3000, |order| format!("c{}", order % 5)).await;
    server.deploy("orders", guest("order-summary"), "").await;
    server
        .deploy("notifying", guest("order-summary"), "?emit=true")
        .await;
    let in_order = [
        server.caught_up("orders").await,
        server.caught_up("notifying").await,
    ];
    for status in &in_order {
        assert!(status.get("parallel").is_none(), "{status}");
        assert!(status["digest"].is_string(), "{status}");
    }
    let notified = server.read_everything("notify-c2").await;
    assert_eq!(notified.len(), 300);
    assert!(server.terminate());

    let server = Server::start_in(dir.path(), &["--projection-workers", "4"]);
    for (name, in_order) in ["orders", "notifying"].into_iter().zip(&in_order) {
        let (code, started) = server
            .post(&format!("/projections/{name}/rebuild"), json!(null))
            .await;
        assert_eq!(code, 200, "{started}");
        let rebuilt = server.caught_up(name).await;
        assert_eq!(rebuilt["digest"], in_order["digest"], "{name}: {rebuilt}");
        let parallel = &rebuilt["parallel"];
        assert_eq!(parallel["workers"], 4, "{rebuilt}");
        let rerun = parallel["rerun_events"].as_u64().unwrap();
        assert!(
            rerun > 0,
            "shared rows and emits run again in order: {rebuilt}"
        );
        if name == "orders" {
            let kept = parallel["parallel_events"].as_u64().unwrap();
            assert!(
                kept > 0,
                "orders of their own customers stay parallel: {rebuilt}"
            );
        }
    }
    assert_eq!(server.read_everything("notify-c2").await, notified);
    assert_eq!(server.read_everything("notify-own-17").await.len(), 1);
}

/// A guest that fails in a batch run on several workers faults at the very event, with the
/// very model before it, that running the log in order gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fault_in_a_parallel_batch_is_found_where_the_sequential_run_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &["--projection-workers", "1"]);
    write_orders_of(&server, 0..400, |order| format!("c{}", order % 40)).await;
    // order-summary requires a sku on every item.
    let (code, appended) = server
        .post(
            "/streams/order-77",
            json!({"type": "ItemAdded", "data": {"price_cents": 5}}),
        )
        .await;
    assert_eq!(code, 200, "{appended}");
    let poisoned = appended["first_position"].clone();
    write_orders_of(&server, 400..800, |order| format!("own-{order}")).await;
    server.deploy("in-order", guest("order-summary"), "").await;
    let in_order = server.wait_status("in-order", "faulted").await;
    assert_eq!(in_order["fault"]["position"], poisoned, "{in_order}");
    assert!(server.terminate());

    let server = Server::start_in(dir.path(), &["--projection-workers", "3"]);
    server.deploy("parallel", guest("order-summary"), "").await;
    let parallel = server.wait_status("parallel", "faulted").await;
    assert_eq!(parallel["fault"], in_order["fault"], "{parallel}");
    assert_eq!(parallel["position"], in_order["position"]);
    assert_eq!(parallel["events_processed"], in_order["events_processed"]);
    let (_, in_order) = server.get("/projections/in-order").await;
    let (_, parallel) = server.get("/projections/parallel").await;
    assert_eq!(parallel["digest"], in_order["digest"]);
}

/// A client tombstones a stream the projection emits to while its rebuild waits: the switch
/// cannot give that stream the rebuilt events, so the rebuild faults and says why, and the live
/// version goes on serving its whole model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_that_cannot_write_its_streams_changes_nothing() {
    let server = Server::start();
    write_orders(&server, 200).await;
    server
        .deploy("orders", guest("order-summary"), "?emit=true")
        .await;
    let live = server.caught_up("orders").await;
    let model = snapshot(&server, "orders").await;
    assert!(!server.read_everything("notify-c2").await.is_empty());
    let notified = server.read_everything("notify-c0").await;

    server.post("/projections/orders/stop", json!(null)).await;
    let (code, status) = server
        .post("/projections/orders/rebuild?emitted=replace", json!(null))
        .await;
    assert_eq!(code, 200, "{status}");
    let (code, body) = server.delete("/streams/notify-c2?hard=true").await;
    assert_eq!(code, 204, "{body}");
    server.post("/projections/orders/start", json!(null)).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = projection(&server, "orders").await;
        if !status["rebuild"]["fault"].is_null() {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fault = status["rebuild"]["fault"]["message"].as_str().unwrap();
    assert!(fault.contains("notify-c2"), "{fault}");
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["version"], live["version"]);
    assert_eq!(status["digest"], live["digest"]);
    assert_eq!(snapshot(&server, "orders").await, model);
    let (code, _) = server.get("/streams/notify-c2").await;
    assert_eq!(code, 410);
    assert_eq!(server.read_everything("notify-c0").await, notified);
}
