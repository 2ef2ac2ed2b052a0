//! The built-in projections: `$by_category`, `$by_correlation_id`, `$by_event_type`,
//! `$stream_by_category`, against the real binary.

mod common;

use std::time::Duration;

use common::{Server, next_message};
use serde_json::{Value, json};

const SYSTEM: [&str; 4] = [
    "$by_category",
    "$by_correlation_id",
    "$by_event_type",
    "$stream_by_category",
];

async fn post(server: &Server, stream: &str, body: Value) {
    let (status, answer) = server.post(&format!("/streams/{stream}"), body).await;
    assert_eq!(status, 200, "{answer}");
}

/// The `stream@revision` each entry of an output stream links to (read unresolved).
async fn links(server: &Server, stream: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut from = 0;
    loop {
        let path = format!(
            "/streams/{}?resolve_links=false&from={from}&limit=4096",
            encode(stream)
        );
        let (status, page) = server.get(&path).await;
        if status == 404 {
            return links;
        }
        assert_eq!(status, 200, "{page}");
        for event in page["events"].as_array().unwrap() {
            assert_eq!(event["type"], "$>");
            let target = event["data"].as_str().unwrap();
            let (revision, stream) = target.split_once('@').unwrap();
            links.push(format!("{stream}@{revision}"));
        }
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => return links,
        }
    }
}

fn encode(stream: &str) -> String {
    stream
        .replace('%', "%25")
        .replace('$', "%24")
        .replace('/', "%2F")
}

async fn wait_caught_up(server: &Server, projection: &str) -> Value {
    for _ in 0..500 {
        let (status, body) = server.get(&format!("/projections/{projection}")).await;
        assert_eq!(status, 200, "{body}");
        if body["position"] == body["head_position"] && body["status"] == "running" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{projection} did not catch up within 10 s");
}

#[tokio::test]
async fn all_four_are_listed_and_running() {
    let server = Server::start();
    server.append_n("order-1", 2).await;
    let (status, list) = server.get("/projections").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, SYSTEM);
    for projection in list.as_array().unwrap() {
        assert_eq!(projection["kind"], "system");
        assert_eq!(projection["status"], "running");
        assert_eq!(projection["mode"], "continuous");
        assert_eq!(projection["position"], 2);
        assert_eq!(projection["head_position"], 2);
        assert_eq!(projection["progress"], 1.0);
        assert_eq!(projection["fault"], Value::Null);
    }
    let (status, body) = server.get("/projections/$by_nothing").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = server
        .http
        .post(server.url("/projections/$by_nothing/start"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn categories_and_their_edge_cases() {
    let server = Server::start();
    for stream in [
        "order-1",
        "order",
        "-order",
        "order-2-a",
        "order-1",
        "cart-9",
        "x-",
    ] {
        post(&server, stream, json!({"type": "T"})).await;
    }
    // An acknowledged append is visible in the output streams at once: indexed in its commit.
    assert_eq!(
        links(&server, "$ce-order").await,
        ["order-1@0", "order-2-a@0", "order-1@1"]
    );
    assert_eq!(links(&server, "$ce-cart").await, ["cart-9@0"]);
    assert_eq!(links(&server, "$ce-x").await, ["x-@0"]);
    // Each stream once, at its first event.
    assert_eq!(
        links(&server, "$category-order").await,
        ["order-1@0", "order-2-a@0"]
    );
    // No separator, or the separator first: no category.
    let (status, _) = server.get("/streams/$ce-").await;
    assert_eq!(status, 404);
    let (status, body) = server.get("/streams/$ce-order").await;
    assert_eq!(status, 200);
    let first = &body["events"][0];
    assert_eq!(first["stream"], "order-1");
    assert_eq!(first["link"], json!({"stream": "$ce-order", "revision": 0}));
    // A soft-deleted stream that comes back is not recorded again.
    server.delete("/streams/cart-9").await;
    post(&server, "cart-9", json!({"type": "T"})).await;
    assert_eq!(links(&server, "$category-cart").await, ["cart-9@0"]);
    assert_eq!(links(&server, "$ce-cart").await, ["cart-9@0", "cart-9@1"]);
}

#[tokio::test]
async fn event_types_and_correlation_ids() {
    let server = Server::start();
    post(
        &server,
        "order-1",
        json!([
            {"type": "OrderPlaced", "metadata": {"$correlationId": "c-1"}},
            {"type": "OrderShipped", "metadata": {"$correlationId": 7}},
            {"type": "OrderPlaced"},
        ]),
    )
    .await;
    post(
        &server,
        "payment-1",
        json!({"type": "PaymentTaken", "metadata": {"other": 1, "$correlationId": "c-1"}}),
    )
    .await;
    assert_eq!(
        links(&server, "$et-OrderPlaced").await,
        ["order-1@0", "order-1@2"]
    );
    assert_eq!(links(&server, "$et-PaymentTaken").await, ["payment-1@0"]);
    assert_eq!(
        links(&server, "$bc-c-1").await,
        ["order-1@0", "payment-1@0"]
    );
    // A non-string correlation id is skipped.
    assert_eq!(server.get("/streams/$bc-7").await.0, 404);
    let (_, page) = server.get("/streams/%24bc-c-1").await;
    let types: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["OrderPlaced", "PaymentTaken"]);
}

#[tokio::test]
async fn links_to_hidden_events_are_skipped_when_resolved() {
    let server = Server::start();
    server.append_n("order-1", 3).await;
    server.append_n("order-2", 2).await;
    server
        .put("/streams/order-1/metadata", json!({"truncate_before": 2}))
        .await;
    server.delete("/streams/order-2?hard=true").await;
    let (_, page) = server.get("/streams/$ce-order").await;
    let events: Vec<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}@{}", e["stream"].as_str().unwrap(), e["revision"]))
        .collect();
    assert_eq!(events, ["order-1@2"]);
    // Unresolved, every link is still there.
    assert_eq!(links(&server, "$ce-order").await.len(), 5);
}

#[tokio::test]
async fn output_streams_can_be_subscribed() {
    let server = Server::start();
    server.append_n("order-1", 2).await;
    server.append_n("cart-1", 1).await;
    let mut messages = server.subscribe("/streams/$ce-order/subscribe", &[]).await;
    for revision in 0..2 {
        let message = next_message(&mut messages).await;
        assert_eq!(message.id, revision.to_string());
        assert_eq!(message.json()["link"]["stream"], "$ce-order");
    }
    assert_eq!(next_message(&mut messages).await.event, "caught_up");
    server.append_n("order-7", 1).await;
    let message = next_message(&mut messages).await;
    assert_eq!(message.id, "2");
    assert_eq!(message.json()["stream"], "order-7");
}

#[tokio::test]
async fn stop_start_and_reset_give_the_same_output() {
    let server = Server::start();
    for n in 0..30 {
        post(&server, &format!("order-{}", n % 4), json!({"type": format!("T{}", n % 3), "metadata": {"$correlationId": format!("c{}", n % 5)}})).await;
    }
    let outputs = ["$ce-order", "$et-T1", "$bc-c3", "$category-order"];
    let mut before = Vec::new();
    for output in outputs {
        before.push(links(&server, output).await);
    }

    for projection in SYSTEM {
        let (status, body) = server
            .post(&format!("/projections/{projection}/stop"), json!({}))
            .await;
        assert_eq!((status, body["status"].as_str()), (200, Some("stopped")));
    }
    for n in 30..40 {
        post(&server, &format!("order-{}", n % 4), json!({"type": format!("T{}", n % 3), "metadata": {"$correlationId": format!("c{}", n % 5)}})).await;
    }
    // Stopped: nothing new is indexed.
    for (output, links_before) in outputs.iter().zip(&before) {
        assert_eq!(
            &links(&server, output).await,
            links_before,
            "{output} changed while stopped"
        );
    }
    let (_, status) = server.get("/projections/$by_category").await;
    assert_eq!(
        (status["position"].clone(), status["head_position"].clone()),
        (json!(30), json!(40))
    );
    assert!(status["progress"].as_f64().unwrap() < 1.0);

    for projection in SYSTEM {
        let (status, _) = server
            .post(&format!("/projections/{projection}/start"), json!({}))
            .await;
        assert_eq!(status, 200);
        wait_caught_up(&server, projection).await;
    }
    let mut after_start = Vec::new();
    for output in outputs {
        after_start.push(links(&server, output).await);
    }
    for projection in SYSTEM {
        let (status, _) = server
            .post(&format!("/projections/{projection}/reset"), json!({}))
            .await;
        assert_eq!(status, 200);
        wait_caught_up(&server, projection).await;
    }
    for (output, expected) in outputs.iter().zip(&after_start) {
        assert_eq!(
            &links(&server, output).await,
            expected,
            "{output} differs after reset"
        );
    }
    // And both equal what an uninterrupted index holds: every matching event, in log order.
    let all = server.read_everything("$all").await;
    let expected: Vec<String> = all
        .iter()
        .filter(|e| e["stream"].as_str().unwrap().starts_with("order-"))
        .map(|e| format!("{}@{}", e["stream"].as_str().unwrap(), e["revision"]))
        .collect();
    assert_eq!(after_start[0], expected);
    assert_eq!(after_start[0].len(), 40);
}

#[tokio::test]
async fn configuration_by_api_and_by_flag() {
    let server = Server::start();
    post(
        &server,
        "order-1-a",
        json!({"type": "T", "metadata": {"corr": "k-1"}}),
    )
    .await;
    let (status, config) = server.get("/projections/$by_category/config").await;
    assert_eq!(status, 200);
    assert_eq!(
        config,
        json!({"category_separator": "-", "category_position": "first", "correlation_property": "$correlationId"})
    );
    assert_eq!(links(&server, "$ce-order").await, ["order-1-a@0"]);

    let (status, config) = server
        .put(
            "/projections/$by_category/config",
            json!({"category_position": "last"}),
        )
        .await;
    assert_eq!(
        (status, config["category_position"].as_str()),
        (200, Some("last"))
    );
    wait_caught_up(&server, "$by_category").await;
    wait_caught_up(&server, "$stream_by_category").await;
    assert_eq!(links(&server, "$ce-order").await, Vec::<String>::new());
    assert_eq!(links(&server, "$ce-order-1").await, ["order-1-a@0"]);
    assert_eq!(links(&server, "$category-order-1").await, ["order-1-a@0"]);

    let (status, _) = server
        .put(
            "/projections/$by_correlation_id/config",
            json!({"correlation_property": "corr"}),
        )
        .await;
    assert_eq!(status, 200);
    wait_caught_up(&server, "$by_correlation_id").await;
    assert_eq!(links(&server, "$bc-k-1").await, ["order-1-a@0"]);

    for (projection, body, expected) in [
        (
            "$by_category",
            json!({"category_separator": ""}),
            (400, "invalid_request"),
        ),
        (
            "$by_category",
            json!({"category_position": "middle"}),
            (400, "invalid_request"),
        ),
        (
            "$by_category",
            json!({"colour": "red"}),
            (400, "invalid_request"),
        ),
        // Valid settings, of another system projection.
        (
            "$by_category",
            json!({"correlation_property": "x"}),
            (409, "conflict"),
        ),
        (
            "$by_event_type",
            json!({"category_position": "first"}),
            (409, "conflict"),
        ),
    ] {
        let (status, answer) = server
            .put(&format!("/projections/{projection}/config"), body.clone())
            .await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (expected.0, Some(expected.1)),
            "{body}"
        );
    }

    // The short names work too.
    let (status, config) = server
        .put(
            "/projections/$by_category/config",
            json!({"separator": "_", "position": "first"}),
        )
        .await;
    assert_eq!(
        (status, config["category_separator"].as_str()),
        (200, Some("_"))
    );

    let flagged = Server::start_with(&["--category-separator", "_"]);
    post(&flagged, "billing_invoice-7", json!({"type": "T"})).await;
    assert_eq!(
        links(&flagged, "$ce-billing").await,
        ["billing_invoice-7@0"]
    );
}

/// Catching up on a large backlog, killed with SIGKILL half-way: after a restart the index
/// resumes from its last commit and ends exactly right, without a repeated link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_catch_up_leaves_an_exact_index() {
    let dir = tempfile::tempdir().unwrap();
    // Small catch-up commits, so the kill lands in the middle of the backlog.
    let args = ["--index-batch", "200"];
    let mut server = Server::start_in(dir.path(), &args);
    server
        .post("/projections/$by_category/stop", json!({}))
        .await;
    for batch in 0..20 {
        let events: Vec<Value> = (0..500)
            .map(|n| json!({"type": "T", "data": {"n": n}}))
            .collect();
        post(&server, &format!("order-{}", batch % 7), json!(events)).await;
    }
    server
        .post("/projections/$by_category/start", json!({}))
        .await;
    let mut seen_midway = false;
    for _ in 0..1000 {
        let (_, status) = server.get("/projections/$by_category").await;
        let position = status["position"].as_u64().unwrap();
        if position > 0 && position < 10_000 {
            seen_midway = true;
            break;
        }
        if position == 10_000 {
            break;
        }
    }
    server.kill();
    drop(server);

    let server = Server::start_in(dir.path(), &args);
    let status = wait_caught_up(&server, "$by_category").await;
    assert_eq!(status["position"], 10_000);
    let expected: Vec<String> = server
        .read_everything("$all")
        .await
        .iter()
        .map(|e| format!("{}@{}", e["stream"].as_str().unwrap(), e["revision"]))
        .collect();
    assert_eq!(links(&server, "$ce-order").await, expected);
    assert!(seen_midway, "the kill did not land during the catch-up");
}
