//! Catch-up then live subscriptions over SSE.

mod common;

use std::collections::BTreeSet;

use common::{Server, next_message};
use serde_json::json;

#[tokio::test]
async fn stream_history_then_caught_up_then_live() {
    let server = Server::start();
    server.append_n("order-1", 3).await;
    server.append_n("order-2", 1).await;
    let mut messages = server.subscribe("/streams/order-1/subscribe", &[]).await;
    for revision in 0..3 {
        let message = next_message(&mut messages).await;
        assert_eq!(
            (message.event.as_str(), message.id.clone()),
            ("event", revision.to_string())
        );
        let event = message.json();
        assert_eq!(
            (event["stream"].clone(), event["revision"].clone()),
            (json!("order-1"), json!(revision))
        );
    }
    assert_eq!(next_message(&mut messages).await.event, "caught_up");
    server.append_n("order-2", 1).await;
    server.append_n("order-1", 2).await;
    for revision in 3..5 {
        let message = next_message(&mut messages).await;
        assert_eq!(
            (message.event.as_str(), message.id.clone()),
            ("event", revision.to_string())
        );
        assert_eq!(message.json()["data"], json!({"n": revision - 3}));
    }
}

#[tokio::test]
async fn from_end_and_last_event_id_resume() {
    let server = Server::start();
    server.append_n("s-1", 5).await;
    let mut live = server
        .subscribe("/streams/s-1/subscribe?from=end", &[])
        .await;
    assert_eq!(next_message(&mut live).await.event, "caught_up");
    let mut resumed = server
        .subscribe("/streams/s-1/subscribe", &[("Last-Event-ID", "2")])
        .await;
    let mut from_three = server.subscribe("/streams/s-1/subscribe?from=3", &[]).await;
    server.append_n("s-1", 1).await;
    assert_eq!(next_message(&mut live).await.id, "5");
    for expected in ["3", "4"] {
        assert_eq!(next_message(&mut resumed).await.id, expected);
        assert_eq!(next_message(&mut from_three).await.id, expected);
    }

    let mut all = server
        .subscribe("/streams/$all/subscribe", &[("Last-Event-ID", "4")])
        .await;
    assert_eq!(next_message(&mut all).await.id, "5");
    assert_eq!(next_message(&mut all).await.event, "caught_up");
}

#[tokio::test]
async fn a_stream_that_does_not_exist_yet_can_be_subscribed() {
    let server = Server::start();
    let mut messages = server.subscribe("/streams/later-1/subscribe", &[]).await;
    assert_eq!(next_message(&mut messages).await.event, "caught_up");
    server.append_n("later-1", 1).await;
    assert_eq!(next_message(&mut messages).await.id, "0");
}

#[tokio::test]
async fn all_subscription_filters_and_uses_positions() {
    let server = Server::start();
    server
        .post("/streams/order-1", json!({"type": "OrderPlaced"}))
        .await;
    server
        .post("/streams/cart-1", json!({"type": "ItemAdded"}))
        .await;
    let mut orders = server
        .subscribe("/streams/$all/subscribe?stream_prefix=order", &[])
        .await;
    let mut by_type = server
        .subscribe("/streams/%24all/subscribe?type_prefix=Item", &[])
        .await;
    assert_eq!(next_message(&mut orders).await.id, "0");
    assert_eq!(next_message(&mut orders).await.event, "caught_up");
    assert_eq!(next_message(&mut by_type).await.id, "1");
    assert_eq!(next_message(&mut by_type).await.event, "caught_up");
    server
        .post("/streams/cart-2", json!({"type": "ItemAdded"}))
        .await;
    server
        .post("/streams/order-2", json!({"type": "OrderPlaced"}))
        .await;
    let message = next_message(&mut orders).await;
    assert_eq!(
        (message.id.as_str(), message.json()["stream"].clone()),
        ("3", json!("order-2"))
    );
    assert_eq!(next_message(&mut by_type).await.id, "2");
}

#[tokio::test]
async fn bad_subscription_requests_are_4xx() {
    let server = Server::start();
    let (status, body) = server.get("/streams/s-1/subscribe?from=yesterday").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    server.append_n("gone-1", 1).await;
    server.delete("/streams/gone-1?hard=true").await;
    let (status, body) = server.get("/streams/gone-1/subscribe").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("stream_deleted"))
    );
    let response = server
        .http
        .get(server.url("/streams/s-1/subscribe"))
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// Writers append while subscribers start at random moments: every subscriber must see every
/// event exactly once, in order, with exactly one caught_up marker somewhere in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_to_live_switch_under_concurrent_appends_skips_and_repeats_nothing() {
    let server = std::sync::Arc::new(Server::start());
    const WRITERS: usize = 4;
    const BATCHES: usize = 40;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let server = server.clone();
        writers.push(tokio::spawn(async move {
            for batch in 0..BATCHES {
                let events: Vec<_> = (0..3)
                    .map(|n| json!({"type": "Tick", "data": {"writer": writer, "batch": batch, "n": n}}))
                    .collect();
                let (status, _) = server.post("/streams/busy-1", json!(events)).await;
                assert_eq!(status, 200);
                let (status, _) = server.post(&format!("/streams/side-{writer}"), json!({"type": "Side"})).await;
                assert_eq!(status, 200);
            }
        }));
    }
    let total_busy = WRITERS * BATCHES * 3;
    let total_all = WRITERS * BATCHES * 4;
    let mut subscribers = Vec::new();
    for index in 0..6 {
        let server = server.clone();
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(index as u64 * 15)).await;
            let (path, total) = if index % 2 == 0 {
                ("/streams/busy-1/subscribe", total_busy)
            } else {
                ("/streams/$all/subscribe", total_all)
            };
            let mut messages = server.subscribe(path, &[]).await;
            let mut ids = Vec::new();
            let mut caught_up = 0;
            while ids.len() < total {
                let message = next_message(&mut messages).await;
                match message.event.as_str() {
                    "event" => ids.push(message.id.parse::<u64>().unwrap()),
                    "caught_up" => caught_up += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            (ids, caught_up, total)
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for subscriber in subscribers {
        let (ids, caught_up, total) = subscriber.await.unwrap();
        assert_eq!(ids, (0..total as u64).collect::<Vec<_>>());
        assert!(caught_up <= 1, "caught_up {caught_up} times");
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), total);
    }
}

#[tokio::test]
async fn idle_subscriptions_get_comment_heartbeats() {
    use futures::StreamExt;
    let server = Server::start_with(&["--sse-heartbeat-seconds", "1"]);
    let response = server
        .http
        .get(server.url("/streams/quiet-1/subscribe"))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let heartbeat = |text: &str| {
        text.lines()
            .any(|line| line.starts_with(':') && line.contains("heartbeat"))
    };
    while !heartbeat(&received) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("a heartbeat within 10 s")
            .expect("the subscription stays open")
            .unwrap();
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(received.starts_with("event: caught_up"), "{received}");
}
