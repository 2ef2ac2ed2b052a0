//! Wasm projections against the real binary: the example guests of `projections/`, built for
//! `wasm32-wasip2`, deployed over HTTP and checked against models computed here.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Server, guest, order_workload};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Debug, Default, Clone, PartialEq)]
struct Order {
    customer_id: String,
    lines: i64,
    total_cents: i64,
    status: String,
}

/// What `order-summary` must build from a workload.
#[derive(Debug, Default)]
struct Model {
    orders: BTreeMap<String, Order>,
    customers: BTreeMap<String, (i64, i64)>,
    shipped: BTreeMap<String, Vec<String>>,
}

impl Model {
    fn apply(&mut self, stream: &str, event_type: &str, data: &Value) {
        let order = self.orders.entry(stream.to_owned()).or_default();
        match event_type {
            "OrderPlaced" => {
                let customer = data["customer_id"].as_str().unwrap().to_owned();
                let total = data["total_cents"].as_i64().unwrap();
                *order = Order {
                    customer_id: customer.clone(),
                    lines: 0,
                    total_cents: total,
                    status: "placed".into(),
                };
                let row = self.customers.entry(customer).or_default();
                row.0 += 1;
                row.1 += total;
            }
            "ItemAdded" => {
                let price = data["price_cents"].as_i64().unwrap();
                order.lines += 1;
                order.total_cents += price;
                self.customers
                    .entry(order.customer_id.clone())
                    .or_default()
                    .1 += price;
            }
            "OrderShipped" => {
                order.status = "shipped".into();
                self.shipped
                    .entry(order.customer_id.clone())
                    .or_default()
                    .push(stream.to_owned());
            }
            "OrderCancelled" => {
                order.status = "cancelled".into();
                let row = self.customers.entry(order.customer_id.clone()).or_default();
                row.0 -= 1;
                row.1 -= order.total_cents;
            }
            _ => {}
        }
    }
}

/// How a workload is sent.
#[derive(Clone, Copy)]
enum Requests {
    /// One request per event.
    PerEvent,
    /// One request per stream with all its events, so a backlog builds up fast.
    PerStream,
}

/// Appends a workload from four concurrent writers (each owns some streams) and returns the model.
async fn write_workload(
    server: &Server,
    orders: &[(String, Vec<(String, Value)>)],
    requests: Requests,
) -> Model {
    let mut writers = Vec::new();
    for writer in 0..4 {
        let base = server.base.clone();
        let mine: Vec<_> = orders.iter().skip(writer).step_by(4).cloned().collect();
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for (stream, events) in mine {
                let bodies: Vec<Value> = match requests {
                    Requests::PerEvent => events
                        .iter()
                        .map(|(event_type, data)| json!([{"type": event_type, "data": data}]))
                        .collect(),
                    Requests::PerStream => vec![Value::Array(
                        events
                            .iter()
                            .map(|(event_type, data)| json!({"type": event_type, "data": data}))
                            .collect(),
                    )],
                };
                for body in bodies {
                    let response = client
                        .post(format!("{base}/streams/{stream}"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut model = Model::default();
    for (stream, events) in orders {
        for (event_type, data) in events {
            model.apply(stream, event_type, data);
        }
    }
    model
}

async fn assert_matches_model(server: &Server, name: &str, model: &Model) {
    for (stream, order) in &model.orders {
        let (code, state) = server
            .get(&format!("/projections/{name}/state?partition={stream}"))
            .await;
        assert_eq!(code, 200, "{stream}: {state}");
        assert_eq!(
            state,
            json!({"customer_id": order.customer_id, "lines": order.lines,
                   "total_cents": order.total_cents, "status": order.status}),
            "{stream}"
        );
    }
    for (customer, (orders, total)) in &model.customers {
        let (code, row) = server
            .get(&format!(
                "/projections/{name}/tables/by_customer/{customer}"
            ))
            .await;
        assert_eq!(code, 200, "{customer}: {row}");
        assert_eq!(
            row,
            json!({"orders": orders, "total_cents": total}),
            "{customer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_uploads_are_refused_with_the_reason() {
    let server = Server::start();
    let put = |name: &'static str, body: Vec<u8>| {
        let server = &server;
        async move { server.deploy(name, body, "").await }
    };
    let (code, body) = put("junk", b"not wasm at all".to_vec()).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not WebAssembly"),
        "{body}"
    );

    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let (code, body) = put("core", core_module).await;
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("core WebAssembly module"),
        "{body}"
    );

    let (code, body) = put("sharder", guest("shard-by-customer")).await;
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("refract:projection/projection"),
        "{body}"
    );

    // Refused after compiling: its compiled artifact is not kept.
    let sharder_sha256 = format!("{:x}", Sha256::digest(guest("shard-by-customer")));
    let compiled: Vec<String> = std::fs::read_dir(server.dir.join("compiled"))
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !compiled
            .iter()
            .any(|file| file.starts_with(&sharder_sha256)),
        "{compiled:?}"
    );

    // Importing what the host lacks (componentize-js's default wasi:http) is refused before
    // compiling, naming the imports, for projections and sharders alike.
    let fetcher = wat::parse_str(
        r#"(component
            (import "wasi:http/outgoing-handler@0.2.0" (instance))
            (import "wasi:io/streams@0.2.0" (instance)))"#,
    )
    .unwrap();
    let (code, body) = put("fetcher", fetcher.clone()).await;
    assert_eq!(code, 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("wasi:http/outgoing-handler@0.2.0")
            && message.contains("-d http fetch-event"),
        "{body}"
    );
    assert!(!message.contains("wasi:io"), "{body}");
    let (code, body) = server.deploy_sharder("fetcher", fetcher).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("wasi:http/outgoing-handler@0.2.0"),
        "{body}"
    );

    let (code, _) = put("empty", Vec::new()).await;
    assert_eq!(code, 400);
    let (code, body) = server.deploy("%24mine", guest("event-counter"), "").await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = server
        .deploy("x", guest("event-counter"), "?mode=sometimes")
        .await;
    assert_eq!(code, 400);

    let response = server
        .http
        .put(server.url("/projections/json"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);

    // Nothing of the refused uploads exists.
    let (_, list) = server.get("/projections").await;
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|p| p["kind"] == "system"),
        "{list}"
    );
    let (code, _) = server.get("/projections/junk").await;
    assert_eq!(code, 404);

    // A good one: 201, then 200 with the next version.
    let (code, status) = put("counter", guest("event-counter")).await;
    assert_eq!(code, 201, "{status}");
    assert_eq!(status["kind"], "wasm");
    assert_eq!(status["version"], 1);
    assert_eq!(status["wasm_sha256"].as_str().unwrap().len(), 64);
    // An update builds version 2 beside version 1 and switches when it has caught up.
    let (code, status) = put("counter", guest("event-counter")).await;
    assert_eq!(code, 200);
    assert!(
        status["version"] == 2 || status["rebuild"]["version"] == 2,
        "{status}"
    );
    assert_eq!(server.caught_up("counter").await["version"], 2);

    // Queries of what does not exist.
    let (code, _) = server.get("/projections/nope/state").await;
    assert_eq!(code, 404);
    let (code, _) = server.get("/projections/counter/tables/t/k").await;
    assert_eq!(code, 404);
    let (code, body) = server.get("/projections/$by_category/state").await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("read its output streams")
    );
    let (code, _) = server.get("/projections/counter/tables/t?limit=0").await;
    assert_eq!(code, 400);
}

/// History and live events from concurrent writers give exactly the model's read model;
/// table scans page through every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_summary_builds_the_read_model_of_a_random_workload() {
    let server = Server::start();
    let orders = order_workload(0x5eed_1234_abcd, 120, 9);
    let (history, live) = orders.split_at(60);
    let mut model = write_workload(&server, history, Requests::PerEvent).await;
    let (code, status) = server.deploy("orders", guest("order-summary"), "").await;
    assert_eq!(code, 201, "{status}");
    let live_model = write_workload(&server, live, Requests::PerEvent).await;
    model.orders.extend(live_model.orders);
    for (customer, (orders, total)) in live_model.customers {
        let row = model.customers.entry(customer).or_default();
        row.0 += orders;
        row.1 += total;
    }
    server.append_n("unrelated-1", 5).await;
    let status = server.caught_up("orders").await;
    let events: usize = orders.iter().map(|(_, events)| events.len()).sum();
    assert_eq!(
        status["events_processed"], events as u64,
        "only order-… events are handled"
    );
    assert_matches_model(&server, "orders", &model).await;

    // Page through the table three rows at a time.
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(after) => format!("?limit=3&after={after}"),
            None => "?limit=3".into(),
        };
        let (code, page) = server
            .get(&format!("/projections/orders/tables/by_customer{query}"))
            .await;
        assert_eq!(code, 200, "{page}");
        for row in page["rows"].as_array().unwrap() {
            keys.push(row["key"].as_str().unwrap().to_owned());
            let (orders, total) = model.customers[row["key"].as_str().unwrap()];
            assert_eq!(
                row["value"],
                json!({"orders": orders, "total_cents": total})
            );
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(keys, model.customers.keys().cloned().collect::<Vec<_>>());
    let (_, page) = server
        .get("/projections/orders/tables/by_customer?prefix=c1")
        .await;
    assert!(
        page["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|row| row["key"].as_str().unwrap().starts_with("c1"))
    );
    let (code, _) = server
        .get("/projections/orders/state?partition=order-none")
        .await;
    assert_eq!(code, 404);
}

/// With `emit=true` a shipped order notifies its customer; event-counter counts the emitted
/// events too. Without it nothing is emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emitted_events_and_links() {
    let server = Server::start();
    let orders = order_workload(77, 40, 4);
    let model = write_workload(&server, &orders, Requests::PerEvent).await;
    let (code, _) = server.deploy("quiet", guest("order-summary"), "").await;
    assert_eq!(code, 201);
    let (code, _) = server
        .deploy("notifier", guest("order-summary"), "?emit=true")
        .await;
    assert_eq!(code, 201);
    let (code, _) = server.deploy("linker", guest("fixture-linker"), "").await;
    assert_eq!(code, 201);
    server.caught_up("notifier").await;
    server.caught_up("quiet").await;
    server.caught_up("linker").await;
    assert_matches_model(&server, "quiet", &model).await;
    assert_matches_model(&server, "notifier", &model).await;

    let mut emitted = 0;
    for (customer, shipped) in &model.shipped {
        let events = server.read_everything(&format!("notify-{customer}")).await;
        let orders: Vec<&str> = events
            .iter()
            .map(|event| {
                assert_eq!(event["type"], "CustomerNotified");
                event["data"]["order"].as_str().unwrap()
            })
            .collect();
        let mut expected: Vec<&str> = shipped.iter().map(String::as_str).collect();
        let mut got = orders.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "notify-{customer}");
        emitted += events.len();
    }
    assert!(emitted > 0, "the workload ships some orders");

    // The counter sees user events and emitted ones alike.
    let (code, _) = server.deploy("counter", guest("event-counter"), "").await;
    assert_eq!(code, 201);
    server.caught_up("counter").await;
    let (_, counts) = server.get("/projections/counter/state").await;
    let written: usize = orders.iter().map(|(_, events)| events.len()).sum();
    assert_eq!(counts["count"], (written + emitted) as u64, "{counts}");
    assert_eq!(counts["by_type"]["CustomerNotified"], emitted as u64);

    // Links: the big orders, in log order, resolved to the original events.
    let big: Vec<Value> = server
        .read_everything("$all")
        .await
        .into_iter()
        .filter(|event| {
            event["type"] == "OrderPlaced" && event["data"]["total_cents"].as_i64().unwrap() >= 1000
        })
        .collect();
    assert!(!big.is_empty());
    let linked = server.read_everything("big-orders").await;
    assert_eq!(linked.len(), big.len());
    for (link, original) in linked.iter().zip(&big) {
        assert_eq!(link["position"], original["position"]);
        assert_eq!(link["link"]["stream"], "big-orders");
    }
    let (_, row) = server.get("/projections/linker/tables/counts/linked").await;
    assert_eq!(row, json!(big.len()));
    let (code, body) = server
        .post("/streams/big-orders", json!([{"type": "X", "data": {}}]))
        .await;
    assert_eq!(
        code, 400,
        "clients cannot append to a stream of links: {body}"
    );

    // Deleting with its outputs removes the emitted streams (and its metrics); the others stay.
    let metrics = scrape(&server).await;
    assert!(metrics.contains(r#"projection="notifier""#), "{metrics}");
    let (code, _) = server
        .delete("/projections/notifier?delete_emitted=true")
        .await;
    assert_eq!(code, 204);
    let (code, _) = server.get("/projections/notifier").await;
    assert_eq!(code, 404);
    let metrics = scrape(&server).await;
    assert!(metrics.contains(r#"projection="quiet""#), "{metrics}");
    assert!(!metrics.contains(r#"projection="notifier""#), "{metrics}");
    let customer = model.shipped.keys().next().unwrap();
    let (code, _) = server.get(&format!("/streams/notify-{customer}")).await;
    assert_eq!(code, 404);
    let (code, _) = server.delete("/projections/linker").await;
    assert_eq!(code, 204);
    assert_eq!(server.read_everything("big-orders").await.len(), big.len());
}

async fn scrape(server: &Server) -> String {
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    response.text().await.unwrap()
}

/// A trap, an endless loop and a memory bomb each fault their own projection at the poisoned
/// event; the rest keep running, and a new upload or a reset runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_guests_fault_only_themselves() {
    let server = Server::start_with(&["--guest-timeout-ms", "200", "--guest-memory-mib", "64"]);
    for name in ["trap", "spin", "balloon"] {
        let (code, body) = server
            .deploy(name, guest(&format!("fixture-{name}")), "")
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, _) = server.deploy("counter", guest("event-counter"), "").await;
    assert_eq!(code, 201);
    server.append_n("work-1", 10).await;
    let (code, poisoned) = server
        .post("/streams/work-2", json!([{"type": "Poison", "data": {}}]))
        .await;
    assert_eq!(code, 200);
    let poison = poisoned["first_position"].as_u64().unwrap();
    server.append_n("work-3", 10).await;

    let expectations = [
        ("trap", "poisoned by event"),
        ("spin", "longer than its limit of 200 ms"),
        ("balloon", "memory limit of 64 MiB"),
    ];
    for (name, message) in expectations {
        let status = server.wait_status(name, "faulted").await;
        let fault = &status["fault"];
        assert_eq!(fault["position"], poison, "{name}: {status}");
        let text = fault["message"].as_str().unwrap();
        assert!(text.contains(message), "{name}: {status}");
        // The event is named, as the SDK's error results name it, on one line.
        assert!(
            text.contains(&format!("Poison at position {poison} (0@work-2)")),
            "{name}: {text}"
        );
        assert!(!text.contains('\n'), "{name}: {text}");
        assert_eq!(
            status["position"], poison,
            "{name}: the events before it are kept"
        );
        let (_, state) = server.get(&format!("/projections/{name}/state")).await;
        assert_eq!(state, json!(10), "{name}");
    }
    server.caught_up("counter").await;
    let (_, counts) = server.get("/projections/counter/state").await;
    assert_eq!(counts["count"], 21);
    let (code, _) = server.get("/health").await;
    assert_eq!(code, 200);

    // Reset clears the fault and the state (stopped first, so the check is not a race); started
    // again it faults again on the same event. A new upload replaces it.
    server.post("/projections/trap/stop", json!({})).await;
    let (code, status) = server.post("/projections/trap/reset", json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(status["fault"], Value::Null);
    assert_eq!(status["status"], "stopped");
    let (code, _) = server.get("/projections/trap/state").await;
    assert_eq!(code, 404);
    server.post("/projections/trap/start", json!({})).await;
    let status = server.wait_status("trap", "faulted").await;
    assert_eq!(status["fault"]["position"], poison);
    assert_eq!(status["events_processed"], 10);
    let (code, _) = server.deploy("trap", guest("event-counter"), "").await;
    assert_eq!(code, 200);
    server.caught_up("trap").await;
    let (_, counts) = server.get("/projections/trap/state").await;
    assert_eq!(counts["count"], 21);
}

/// Stop, start, a restart of the server, and one-time mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    server.append_n("a-1", 30).await;
    let (code, _) = server.deploy("counter", guest("event-counter"), "").await;
    assert_eq!(code, 201);
    let (code, status) = server
        .deploy("once", guest("event-counter"), "?mode=one_time")
        .await;
    assert_eq!(code, 201);
    assert_eq!(status["mode"], "one_time");
    let status = server.wait_status("once", "completed").await;
    assert_eq!(status["position"], 30);
    server.caught_up("counter").await;

    let (_, status) = server.post("/projections/counter/stop", json!({})).await;
    assert_eq!(status["status"], "stopped");
    server.append_n("a-1", 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, counts) = server.get("/projections/counter/state").await;
    assert_eq!(
        counts["count"], 30,
        "a stopped projection processes nothing"
    );
    let (_, status) = server.post("/projections/counter/start", json!({})).await;
    assert_eq!(status["status"], "running");
    server.caught_up("counter").await;

    assert!(server.terminate());
    let server = Server::start_in(dir.path(), &[]);
    let (_, status) = server.get("/projections/counter").await;
    assert_eq!(
        status["position"], 35,
        "resumes from its checkpoint: {status}"
    );
    assert_eq!(status["version"], 1);
    server.append_n("a-2", 7).await;
    server.caught_up("counter").await;
    let (_, counts) = server.get("/projections/counter/state").await;
    assert_eq!(counts["count"], 42);
    let (_, once) = server.get("/projections/once").await;
    assert_eq!(once["status"], "completed");
    assert_eq!(once["position"], 30);
    let (_, counts) = server.get("/projections/once/state").await;
    assert_eq!(
        counts["count"], 30,
        "a completed one-time projection stays put"
    );

    // Reset (stopped first, so nothing runs in between): the state is gone, then the same
    // model is built again from position 0.
    let before_reset = server.caught_up("counter").await;
    server.post("/projections/counter/stop", json!({})).await;
    let (_, status) = server.post("/projections/counter/reset", json!({})).await;
    assert_eq!(status["events_processed"], 0);
    assert_eq!(status["position"], 0);
    assert_eq!(status["status"], "stopped");
    let (code, _) = server.get("/projections/counter/state").await;
    assert_eq!(code, 404);
    server.post("/projections/counter/start", json!({})).await;
    let rebuilt = server.caught_up("counter").await;
    let (_, counts) = server.get("/projections/counter/state").await;
    assert_eq!(counts["count"], 42);
    // The digest of the model: the same after a reset over the same log, different once the
    // log has grown.
    assert_eq!(rebuilt["digest"], before_reset["digest"]);
    server.append_n("a-3", 1).await;
    let grown = server.caught_up("counter").await;
    assert_ne!(grown["digest"], rebuilt["digest"]);
    let (_, listed) = server.get("/projections").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.get("digest").is_none())
    );
}

/// `kill -9` while a projection works through a backlog, twice: after each restart it resumes
/// from its last committed batch, and the read model equals the model (no event counted twice or
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_processing_gives_an_exactly_once_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let orders = order_workload(0xdead_beef, 3000, 25);
    let model = write_workload(&server, &orders, Requests::PerStream).await;
    let (code, _) = server
        .deploy("orders", guest("order-summary"), "?emit=true")
        .await;
    assert_eq!(code, 201);
    for _ in 0..2 {
        // Wait until it has started, then kill it wherever it is.
        loop {
            let (_, status) = server.get("/projections/orders").await;
            if status["events_processed"].as_u64().unwrap() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill();
        server = Server::start_in(dir.path(), &[]);
    }
    server.caught_up("orders").await;
    assert_matches_model(&server, "orders", &model).await;
    for (customer, shipped) in &model.shipped {
        let events = server.read_everything(&format!("notify-{customer}")).await;
        assert_eq!(
            events.len(),
            shipped.len(),
            "notify-{customer}: no duplicates"
        );
    }
    // The same component over the same log without interruptions: byte for byte the same model.
    let interrupted = server.caught_up("orders").await;
    let (code, _) = server.deploy("again", guest("order-summary"), "").await;
    assert_eq!(code, 201);
    let uninterrupted = server.caught_up("again").await;
    let digest = interrupted["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64);
    assert_eq!(uninterrupted["digest"], digest);
}
