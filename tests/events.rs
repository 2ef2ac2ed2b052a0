//! The Events section of the HTTP contract, against the real binary.

mod common;

use common::Server;
use serde_json::{Value, json};

#[tokio::test]
async fn append_and_read_back_as_the_contract_shows() {
    let server = Server::start();
    let event = json!([{"id": "8c7f0c3e-3f4d-4a8e-9a0b-1f2e3d4c5b6a", "type": "OrderPlaced",
        "data": {"order_id": "123", "total": 42}, "metadata": {"$correlationId": "c-1"}}]);
    let (status, body) = server.post("/streams/order-123", event).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"stream": "order-123", "first_revision": 0, "last_revision": 0,
               "first_position": 0, "last_position": 0})
    );

    let (status, page) = server.get("/streams/order-123").await;
    assert_eq!(status, 200);
    assert_eq!(page["stream"], "order-123");
    assert_eq!(page["last_revision"], 0);
    assert_eq!(page["next"], Value::Null);
    let read = &page["events"][0];
    assert_eq!(read["stream"], "order-123");
    assert_eq!(read["revision"], 0);
    assert_eq!(read["position"], 0);
    assert_eq!(read["id"], "8c7f0c3e-3f4d-4a8e-9a0b-1f2e3d4c5b6a");
    assert_eq!(read["type"], "OrderPlaced");
    assert_eq!(read["data"], json!({"order_id": "123", "total": 42}));
    assert_eq!(read["metadata"], json!({"$correlationId": "c-1"}));
    assert!(read.get("link").is_none());
    let created = read["created"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.len() == "2026-11-26T03:00:00.123Z".len(),
        "{created}"
    );

    // One object instead of an array; a generated id.
    let (status, body) = server
        .post("/streams/order-123", json!({"type": "OrderShipped"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            body["first_revision"].as_u64(),
            body["first_position"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let (_, page) = server.get("/streams/order-123?from=1").await;
    let id = page["events"][0]["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(page["events"][0]["data"], Value::Null);
}

#[tokio::test]
async fn batches_are_atomic_and_positions_gap_free() {
    let server = Server::start();
    server.append_n("a-1", 3).await;
    let body = server.append_n("b-1", 2).await;
    assert_eq!(
        body,
        json!({"stream": "b-1", "first_revision": 0, "last_revision": 1, "first_position": 3, "last_position": 4})
    );
    // One bad event rejects the whole batch: nothing of it is written.
    let (status, _) = server
        .post(
            "/streams/a-1",
            json!([{"type": "Good"}, {"type": ""}, {"type": "AlsoGood"}]),
        )
        .await;
    assert_eq!(status, 400);
    let positions: Vec<u64> = server
        .read_everything("$all")
        .await
        .iter()
        .map(|event| event["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn binary_payloads_round_trip() {
    let server = Server::start();
    let (status, _) = server
        .post(
            "/streams/blob-1",
            json!({"type": "Blob", "data_base64": "AAEC/w=="}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, page) = server.get("/streams/blob-1").await;
    let event = &page["events"][0];
    assert_eq!(event["data_base64"], "AAEC/w==");
    assert_eq!(event["content_type"], "application/octet-stream");
    assert!(event.get("data").is_none());
    let (status, body) = server
        .post(
            "/streams/blob-1",
            json!({"type": "Blob", "data_base64": "!!"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _) = server
        .post(
            "/streams/blob-1",
            json!({"type": "Blob", "data": 1, "data_base64": "AA=="}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn expected_revision_from_header_or_query() {
    let server = Server::start();
    let post = |path: &str, header: Option<&str>| {
        let mut request = server
            .http
            .post(server.url(path))
            .json(&json!({"type": "T"}));
        if let Some(header) = header {
            request = request.header("Expected-Revision", header);
        }
        async move { common::status_and_json(request.send().await.unwrap()).await }
    };
    let (status, body) = post("/streams/s-1", Some("stream_exists")).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "wrong_expected_revision");
    assert_eq!(body["expected"], "stream_exists");
    assert_eq!(body["actual"], Value::Null);
    assert!(body["message"].as_str().is_some());

    assert_eq!(post("/streams/s-1", Some("no_stream")).await.0, 200);
    let (status, body) = post("/streams/s-1", Some("no_stream")).await;
    assert_eq!((status, body["actual"].clone()), (409, json!(0)));
    assert_eq!(post("/streams/s-1?expected_revision=0", None).await.0, 200);
    let (status, body) = post("/streams/s-1?expected_revision=0", None).await;
    assert_eq!(
        (status, body["expected"].clone(), body["actual"].clone()),
        (409, json!(0), json!(1))
    );
    assert_eq!(post("/streams/s-1", Some("1")).await.0, 200);
    assert_eq!(post("/streams/s-1", Some("stream_exists")).await.0, 200);
    assert_eq!(post("/streams/s-1", Some("any")).await.0, 200);
    let (status, body) = post("/streams/s-1", Some("latest")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn resending_the_same_ids_is_idempotent() {
    let server = Server::start();
    server.append_n("other", 1).await;
    let batch = json!([
        {"id": "0b4c9b43-9f65-4e0e-8f32-6a0c4cfe0001", "type": "A"},
        {"id": "0b4c9b43-9f65-4e0e-8f32-6a0c4cfe0002", "type": "B"},
    ]);
    let (status, first) = server
        .post("/streams/idem?expected_revision=no_stream", batch.clone())
        .await;
    assert_eq!(status, 200);
    let (status, again) = server
        .post("/streams/idem?expected_revision=no_stream", batch.clone())
        .await;
    assert_eq!((status, &again), (200, &first));
    let (status, again) = server.post("/streams/idem", batch).await;
    assert_eq!((status, &again), (200, &first));
    assert_eq!(server.read_everything("idem").await.len(), 2);
    assert_eq!(server.read_everything("$all").await.len(), 3);
}

#[tokio::test]
async fn reads_page_forward_and_backward() {
    let server = Server::start();
    server.append_n("p-1", 10).await;
    let revisions = |page: &Value| -> Vec<u64> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["revision"].as_u64().unwrap())
            .collect()
    };
    let (_, page) = server.get("/streams/p-1?from=2&limit=3").await;
    assert_eq!(
        (revisions(&page), page["next"].clone()),
        (vec![2, 3, 4], json!(5))
    );
    let (_, page) = server.get("/streams/p-1?direction=backward&limit=3").await;
    assert_eq!(
        (revisions(&page), page["next"].clone()),
        (vec![9, 8, 7], json!(6))
    );
    let (_, page) = server.get("/streams/p-1?direction=backward&from=1").await;
    assert_eq!(
        (revisions(&page), page["next"].clone()),
        (vec![1, 0], Value::Null)
    );
    let (_, page) = server.get("/streams/p-1").await;
    assert_eq!(revisions(&page).len(), 10);
    assert_eq!(page["last_revision"], 9);

    let (_, page) = server.get("/streams/$all?direction=backward&limit=2").await;
    let positions: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!((positions, page["next"].clone()), (vec![9, 8], json!(7)));

    for bad in [
        "limit=0",
        "limit=4097",
        "direction=sideways",
        "from=-1",
        "resolve_links=maybe",
    ] {
        let (status, body) = server.get(&format!("/streams/p-1?{bad}")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    assert_eq!(server.get("/streams/p-1?limit=4096").await.0, 200);
}

#[tokio::test]
async fn all_filters_by_stream_and_type_prefix() {
    let server = Server::start();
    for (stream, event_type) in [
        ("order-1", "OrderPlaced"),
        ("cart-1", "ItemAdded"),
        ("user-1", "OrderNoted"),
        ("order-2", "Paid"),
    ] {
        let (status, _) = server
            .post(&format!("/streams/{stream}"), json!({"type": event_type}))
            .await;
        assert_eq!(status, 200);
    }
    let streams = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["stream"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, page) = server.get("/streams/$all?stream_prefix=order").await;
    assert_eq!(streams(&page), ["order-1", "order-2"]);
    let (_, page) = server.get("/streams/$all?stream_prefix=cart,user").await;
    assert_eq!(streams(&page), ["cart-1", "user-1"]);
    let (_, page) = server.get("/streams/$all?type_prefix=Order").await;
    assert_eq!(streams(&page), ["order-1", "user-1"]);
    let (_, page) = server
        .get("/streams/$all?type_prefix=Order&stream_prefix=user")
        .await;
    assert_eq!(streams(&page), ["user-1"]);
    // `$all` percent-encoded reads the same.
    let (_, page) = server.get("/streams/%24all?stream_prefix=order").await;
    assert_eq!(streams(&page), ["order-1", "order-2"]);
    let (_, page) = server.get("/streams/$all?include_system=true").await;
    assert_eq!(streams(&page).len(), 4);
}

#[tokio::test]
async fn metadata_limits_hide_events() {
    let server = Server::start();
    server.append_n("m-1", 6).await;
    let (status, body) = server.get("/streams/m-1/metadata").await;
    assert_eq!(status, 200);
    assert_eq!(body["max_count"], Value::Null);

    let metadata = json!({"max_count": 2, "custom": {"owner": "billing"}});
    let (status, body) = server.put("/streams/m-1/metadata", metadata.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = server.get("/streams/m-1/metadata").await;
    assert_eq!(body["max_count"], 2);
    assert_eq!(body["custom"], json!({"owner": "billing"}));
    let revisions: Vec<u64> = server
        .read_everything("m-1")
        .await
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [4, 5]);

    server
        .put("/streams/m-1/metadata", json!({"truncate_before": 3}))
        .await;
    let revisions: Vec<u64> = server
        .read_everything("m-1")
        .await
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [3, 4, 5]);
    server
        .put("/streams/m-1/metadata", json!({"max_age_seconds": 3600}))
        .await;
    assert_eq!(server.read_everything("m-1").await.len(), 6);
    // Hidden events stay in $all: metadata limits apply to reads of the stream.
    assert_eq!(server.read_everything("$all").await.len(), 6);

    for bad in [
        json!({"max_count": -1}),
        json!({"max_count": "two"}),
        json!({"colour": "red"}),
        json!([1]),
    ] {
        let (status, body) = server.put("/streams/m-1/metadata", bad.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn soft_delete_keeps_numbering_and_hard_delete_is_forever() {
    let server = Server::start();
    server.append_n("d-1", 3).await;
    let (status, _) = server.delete("/streams/d-1").await;
    assert_eq!(status, 204);
    let (status, body) = server.get("/streams/d-1").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("stream_not_found"))
    );
    let (status, body) = server.delete("/streams/d-1").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("stream_not_found"))
    );
    let body = server.append_n("d-1", 1).await;
    assert_eq!(body["first_revision"], 3);
    let events = server.read_everything("d-1").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["revision"], 3);

    let (status, _) = server.delete("/streams/d-1?hard=true").await;
    assert_eq!(status, 204);
    for (status, body) in [
        server.get("/streams/d-1").await,
        server.post("/streams/d-1", json!({"type": "T"})).await,
        server.delete("/streams/d-1").await,
        server.delete("/streams/d-1?hard=true").await,
        server.get("/streams/d-1/metadata").await,
    ] {
        assert_eq!(
            (status, body["error"].as_str()),
            (410, Some("stream_deleted"))
        );
    }
    // Tombstoning a stream that never existed also holds.
    assert_eq!(server.delete("/streams/never-1?hard=true").await.0, 204);
    assert_eq!(
        server
            .post("/streams/never-1", json!({"type": "T"}))
            .await
            .0,
        410
    );

    // Delete honours the expected revision.
    server.append_n("d-2", 2).await;
    let request = server
        .http
        .delete(server.url("/streams/d-2"))
        .header("Expected-Revision", "0");
    let (status, body) = common::status_and_json(request.send().await.unwrap()).await;
    assert_eq!((status, body["actual"].clone()), (409, json!(1)));
}

#[tokio::test]
async fn malformed_requests_are_clear_400s() {
    let server = Server::start();
    let cases = [
        ("/streams/x", json!([{"data": {}}])),
        ("/streams/x", json!([{"type": ""}])),
        ("/streams/x", json!([{"type": 7}])),
        ("/streams/x", json!([{"type": "T", "id": "not-a-uuid"}])),
        ("/streams/x", json!([{"type": "T", "metadata": [1, 2]}])),
        ("/streams/x", json!([{"type": "T", "metadata": "text"}])),
        ("/streams/x", json!([{"type": "T", "unknown_field": 1}])),
        ("/streams/x", json!([])),
        ("/streams/x", json!("just a string")),
        ("/streams/$ce-order", json!({"type": "T"})),
        ("/streams/$system", json!({"type": "T"})),
        (
            "/streams/x",
            json!([{"id": "0b4c9b43-9f65-4e0e-8f32-6a0c4cfe0001", "type": "T"},
                   {"id": "0b4c9b43-9f65-4e0e-8f32-6a0c4cfe0001", "type": "T"}]),
        ),
    ];
    for (path, body) in cases {
        let (status, answer) = server.post(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body} -> {answer}");
        assert_eq!(answer["error"], "invalid_request");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    for raw in ["[{\"type\": \"T\"", "not json", ""] {
        let request = server
            .http
            .post(server.url("/streams/x"))
            .header("content-type", "application/json")
            .body(raw);
        let (status, answer) = common::status_and_json(request.send().await.unwrap()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_request")),
            "{raw:?}"
        );
    }
    let request = server
        .http
        .post(server.url("/streams/x"))
        .header("content-type", "text/plain")
        .body("{}");
    let (status, answer) = common::status_and_json(request.send().await.unwrap()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // Nothing of the above was written.
    assert!(server.read_everything("$all").await.is_empty());
}

#[tokio::test]
async fn stream_names_are_checked() {
    let server = Server::start();
    let longest = "n".repeat(1024);
    assert_eq!(
        server
            .post(&format!("/streams/{longest}"), json!({"type": "T"}))
            .await
            .0,
        200
    );
    let too_long = "n".repeat(1025);
    let (status, body) = server
        .post(&format!("/streams/{too_long}"), json!({"type": "T"}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _) = server
        .post("/streams/bad%0Aname", json!({"type": "T"}))
        .await;
    assert_eq!(status, 400);
    // Percent-decoded names: spaces, slashes and non-ASCII are fine.
    assert_eq!(
        server
            .post("/streams/z%C3%BCrich%2F1%20a", json!({"type": "T"}))
            .await
            .0,
        200
    );
    let (_, page) = server.get("/streams/z%C3%BCrich%2F1%20a").await;
    assert_eq!(page["stream"], "zürich/1 a");
    assert_eq!(page["events"][0]["stream"], "zürich/1 a");
}

#[tokio::test]
async fn oversized_events_and_requests_are_413() {
    let server = Server::start();
    let big = "x".repeat(16 * 1024 * 1024 + 1);
    let (status, body) = server
        .post("/streams/big", json!({"type": "T", "data": big}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    // Five events of 15 MiB are each allowed but together exceed the 64 MiB request limit.
    let chunk = "y".repeat(15 * 1024 * 1024);
    let events: Vec<Value> = (0..5)
        .map(|_| json!({"type": "T", "data": chunk}))
        .collect();
    let (status, body) = server.post("/streams/big", json!(events)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (status, _) = server
        .post(
            "/streams/big",
            json!({"type": "T", "data": "x".repeat(15 * 1024 * 1024)}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(server.read_everything("big").await.len(), 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let server = Server::start();
    let (status, body) = server.get("/nothing/here").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let response = server
        .http
        .patch(server.url("/streams/x"))
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_and_json(response).await;
    assert_eq!(status, 405);
    assert!(body["message"].as_str().is_some());
}

/// A request refused before its handler reads the body (here a bad query) still has its body
/// read, so the connection stays usable: the next request on it is answered.
#[tokio::test]
async fn a_refused_request_keeps_its_connection_usable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::start();
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut connection = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body = "x".repeat(200_000);
    let refused = format!(
        "PUT /projections/p?mode=sometimes HTTP/1.1\r\nhost: {address}\r\n\
         content-type: application/wasm\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let answered = format!("GET /health HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    connection
        .write_all(format!("{refused}{answered}").as_bytes())
        .await
        .unwrap();
    let mut responses = String::new();
    connection.read_to_string(&mut responses).await.unwrap();
    assert!(responses.starts_with("HTTP/1.1 400"), "{responses}");
    assert_eq!(responses.matches("HTTP/1.1 ").count(), 2, "{responses}");
    assert!(responses.contains("HTTP/1.1 200"), "{responses}");
}
