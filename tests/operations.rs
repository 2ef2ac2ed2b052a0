//! Operations: health, info, metrics, the OpenAPI document, auth, graceful shutdown.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

#[tokio::test]
async fn health_and_info() {
    let server = Server::start();
    assert_eq!(server.get("/health").await, (200, json!({"status": "ok"})));
    server.append_n("a-1", 2).await;
    server.append_n("b-1", 1).await;
    let (status, info) = server.get("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["head_position"], 3);
    assert_eq!(info["streams"], 2);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["data_dir"], server.dir.display().to_string());
}

/// `/metrics` passes `promtool check metrics` (Debian's `prometheus` package; `.ci/run` installs
/// it), and speaks OpenMetrics to a scraper that asks for it.
#[tokio::test]
async fn metrics_are_prometheus_text() {
    let server = Server::start();
    let (code, _) = server
        .put("/groups/a-1/workers", json!({"start_from": "start"}))
        .await;
    assert_eq!(code, 201);
    server.append_n("a-1", 3).await;
    server.get("/streams/a-1").await;
    // The group reads the three events; nobody pulls them.
    common::wait_until(|| async { server.get("/groups/a-1/workers").await.1["ready"] == 3 }).await;
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    for expected in [
        "# TYPE refract_appends_total counter",
        "refract_appends_total 1",
        "refract_events_written_total 3",
        "refract_bytes_written_total ",
        "refract_commit_batch_events_bucket{le=",
        "refract_commit_seconds_bucket{le=",
        "refract_head_position 3",
        "refract_writer_queue_depth 0",
        r#"refract_http_request_seconds_count{method="POST",route="/streams/{stream}",status="200"} 1"#,
        r#"refract_http_request_seconds_count{method="GET",route="/streams/{stream}",status="200"} 1"#,
        r#"refract_projection_position{projection="$by_category"} 3"#,
        r#"refract_projection_lag_events{projection="$by_event_type"} 0"#,
        r#"refract_projection_events_per_second{projection="$by_correlation_id"} "#,
        r#"refract_group_ready_messages{stream="a-1",group="workers"} 3"#,
        r#"refract_group_in_flight_messages{stream="a-1",group="workers"} 0"#,
        r#"refract_group_parked_messages{stream="a-1",group="workers"} 0"#,
        r#"refract_group_checkpoint_lag{stream="a-1",group="workers"} 3"#,
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let output = common::run_with_input(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    )
    .expect("promtool runs: install Debian's prometheus package (.ci/run does)");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let response = server
        .http
        .get(server.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let openmetrics = response.text().await.unwrap();
    assert!(openmetrics.contains("# TYPE refract_appends counter"));
    assert!(openmetrics.trim_end().ends_with("# EOF"));
}

/// The operations that read a request body.
const BODIES: &[(&str, &str)] = &[
    ("post", "/streams/{stream}"),
    ("put", "/streams/{stream}/metadata"),
    ("put", "/projections/{name}"),
    ("put", "/projections/{name}/config"),
    ("put", "/sharders/{name}"),
    ("post", "/sharders/{name}/shard"),
    ("put", "/groups/{stream}/{group}"),
    ("post", "/groups/{stream}/{group}/ack"),
    ("post", "/groups/{stream}/{group}/nack"),
    ("post", "/groups/{stream}/{group}/commit"),
    ("post", "/cluster/learners"),
    ("post", "/cluster/voters"),
    ("put", "/connectors/{name}"),
];

/// Every operation the document lists is routed (no 404 "no such route", no 405), and every
/// operation documents its responses; writes document their request bodies.
#[tokio::test]
async fn openapi_document_matches_the_router() {
    let server = Server::start();
    let (status, document) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    for expected in [
        "/streams/{stream}",
        "/streams/$all",
        "/streams/{stream}/metadata",
        "/streams/{stream}/subscribe",
        "/streams/$all/subscribe",
        "/health",
        "/info",
        "/metrics",
        "/cluster",
        "/openapi.json",
        "/projections",
        "/projections/{name}",
        "/projections/{name}/start",
        "/projections/{name}/stop",
        "/projections/{name}/reset",
        "/projections/{name}/config",
        "/groups",
        "/groups/{stream}/{group}",
        "/groups/{stream}/{group}/pull",
        "/groups/{stream}/{group}/ack",
        "/groups/{stream}/{group}/nack",
        "/groups/{stream}/{group}/commit",
        "/groups/{stream}/{group}/subscribe",
        "/groups/{stream}/{group}/replay-parked",
        "/connectors",
        "/connectors/{name}",
        "/connectors/{name}/start",
        "/connectors/{name}/stop",
        "/connectors/{name}/reset",
    ] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            operations += 1;
            // Without tokens the server takes none, and the document asks for none.
            assert!(
                operation.get("security").is_none(),
                "{method} {path} asks for a token the server does not take"
            );
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                !responses.is_empty(),
                "{method} {path} documents no responses"
            );
            let (success_status, success) = responses
                .iter()
                .find(|(status, _)| status.starts_with('2'))
                .unwrap();
            if method != "delete" && success_status != "204" {
                assert!(
                    success.get("content").is_some(),
                    "{method} {path}: no response schema"
                );
            }
            // The operations that read a body document it; the others take none.
            let takes_body = BODIES.contains(&(method.as_str(), path.as_str()));
            assert_eq!(
                operation["requestBody"]["content"].is_object(),
                takes_body,
                "{method} {path}: the request body is documented wrongly"
            );
            let concrete = path
                .replace("{stream}", "openapi-probe")
                .replace("{name}", "$by_category");
            let request = server
                .http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    server.url(&concrete),
                )
                .header("content-type", "application/json")
                .body("{}");
            let response = tokio::time::timeout(Duration::from_secs(5), request.send())
                .await
                .unwrap()
                .unwrap();
            let status = response.status().as_u16();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            if status == 404 && !path.ends_with("subscribe") {
                // A handler's 404 (no such sharder, …) names what is missing; the fallback
                // for unknown routes says just this.
                let body: Value = response.json().await.unwrap();
                assert_ne!(
                    body["message"], "no such route",
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }
    assert!(operations >= 10, "only {operations} operations documented");
    // Schemas for the shapes of the contract.
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in [
        "EventBody",
        "EventJson",
        "ReadResponse",
        "AppendResponse",
        "ErrorBody",
        "StreamMetadata",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema} missing");
    }
}

#[tokio::test]
async fn bearer_tokens_and_roles() {
    let tokens_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tokens_file.path(), "# team tokens\nadmin:admin-token-1\n\n").unwrap();
    let server = Server::start_with(&[
        "--token",
        "reader:reader-token-1",
        "--token",
        "writer:writer-token-1",
        "--tokens-file",
        tokens_file.path().to_str().unwrap(),
    ]);
    let call = |method: &str, path: &str, token: Option<&str>| {
        let mut request = server
            .http
            .request(method.parse().unwrap(), server.url(path))
            .header("content-type", "application/json")
            .body(r#"{"type": "T"}"#);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { common::status_and_json(request.send().await.unwrap()).await }
    };
    assert_eq!(call("GET", "/health", None).await.0, 200);
    assert_eq!(call("GET", "/openapi.json", None).await.0, 200);
    let (status, body) = call("GET", "/streams/a-1", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = call("GET", "/streams/a-1", Some("wrong-token-1")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(call("GET", "/info", Some("reader-token-1")).await.0, 200);
    let (status, body) = call("POST", "/streams/a-1", Some("reader-token-1")).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        call("POST", "/streams/a-1", Some("writer-token-1")).await.0,
        200
    );
    assert_eq!(
        call("GET", "/streams/a-1", Some("reader-token-1")).await.0,
        200
    );
    assert_eq!(
        call("DELETE", "/streams/a-1", Some("writer-token-1"))
            .await
            .0,
        403
    );
    assert_eq!(
        call("DELETE", "/streams/a-1", Some("admin-token-1"))
            .await
            .0,
        204
    );
}

/// The role each operation needs, as the contract gives it: `reader` reads, subscribes and
/// queries; `writer` also appends and consumes from groups; `admin` also deletes and manages
/// projections, sharders, groups and connectors. `None`: public.
const ROLES: &[(&str, &str, Option<&str>)] = &[
    ("get", "/health", None),
    ("get", "/openapi.json", None),
    ("get", "/info", Some("reader")),
    ("get", "/metrics", Some("reader")),
    ("get", "/cluster", Some("reader")),
    ("post", "/cluster/learners", Some("admin")),
    ("post", "/cluster/voters", Some("admin")),
    ("delete", "/cluster/members/{id}", Some("admin")),
    ("get", "/streams/$all", Some("reader")),
    ("get", "/streams/$all/subscribe", Some("reader")),
    ("get", "/streams/{stream}", Some("reader")),
    ("post", "/streams/{stream}", Some("writer")),
    ("delete", "/streams/{stream}", Some("admin")),
    ("get", "/streams/{stream}/metadata", Some("reader")),
    ("put", "/streams/{stream}/metadata", Some("writer")),
    ("get", "/streams/{stream}/subscribe", Some("reader")),
    ("get", "/projections", Some("reader")),
    ("get", "/projections/{name}", Some("reader")),
    ("put", "/projections/{name}", Some("admin")),
    ("delete", "/projections/{name}", Some("admin")),
    ("get", "/projections/{name}/state", Some("reader")),
    ("get", "/projections/{name}/tables/{table}", Some("reader")),
    (
        "get",
        "/projections/{name}/tables/{table}/{key}",
        Some("reader"),
    ),
    ("post", "/projections/{name}/start", Some("admin")),
    ("post", "/projections/{name}/stop", Some("admin")),
    ("post", "/projections/{name}/reset", Some("admin")),
    ("post", "/projections/{name}/rebuild", Some("admin")),
    ("delete", "/projections/{name}/rebuild", Some("admin")),
    ("get", "/projections/{name}/config", Some("reader")),
    ("get", "/projections/{name}/partitions", Some("reader")),
    ("get", "/projections/{name}/parked", Some("reader")),
    ("post", "/projections/{name}/skip", Some("admin")),
    ("put", "/projections/{name}/config", Some("admin")),
    ("get", "/sharders", Some("reader")),
    ("get", "/sharders/{name}", Some("reader")),
    ("put", "/sharders/{name}", Some("admin")),
    ("delete", "/sharders/{name}", Some("admin")),
    ("post", "/sharders/{name}/shard", Some("reader")),
    ("get", "/groups", Some("reader")),
    ("get", "/groups/{stream}/{group}", Some("reader")),
    ("put", "/groups/{stream}/{group}", Some("admin")),
    ("delete", "/groups/{stream}/{group}", Some("admin")),
    ("post", "/groups/{stream}/{group}/pull", Some("writer")),
    ("get", "/groups/{stream}/{group}/subscribe", Some("writer")),
    ("post", "/groups/{stream}/{group}/ack", Some("writer")),
    ("post", "/groups/{stream}/{group}/nack", Some("writer")),
    ("post", "/groups/{stream}/{group}/commit", Some("writer")),
    (
        "post",
        "/groups/{stream}/{group}/replay-parked",
        Some("admin"),
    ),
    ("get", "/groups/{stream}/{group}/parked", Some("reader")),
    ("get", "/connectors", Some("reader")),
    ("get", "/connectors/{name}", Some("reader")),
    ("put", "/connectors/{name}", Some("admin")),
    ("delete", "/connectors/{name}", Some("admin")),
    ("post", "/connectors/{name}/start", Some("admin")),
    ("post", "/connectors/{name}/stop", Some("admin")),
    ("post", "/connectors/{name}/reset", Some("admin")),
];

/// Walks every operation of the OpenAPI document with no token and with each role's token: the
/// role the server enforces, and the one the document declares, are the table's.
#[tokio::test]
async fn every_operation_needs_the_role_the_contract_gives_it() {
    let server = Server::start_with(&[
        "--token",
        "reader:reader-token-1",
        "--token",
        "writer:writer-token-1",
        "--token",
        "admin:admin-token-1",
    ]);
    let (status, document) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let ranks = ["reader", "writer", "admin"];
    let rank = |role: &str| ranks.iter().position(|r| *r == role).unwrap();
    let mut walked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Some(&(_, _, needed)) = ROLES.iter().find(|(m, p, _)| m == method && p == path)
            else {
                panic!("{method} {path} is not in the table of roles");
            };
            walked += 1;
            let declared: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|requirement| requirement["bearer"].as_array().unwrap().iter())
                .map(|role| role.as_str().unwrap())
                .collect();
            assert_eq!(
                declared,
                needed.into_iter().collect::<Vec<_>>(),
                "{method} {path}: the document declares another role"
            );
            let concrete = path
                .replace("{stream}", "role-probe")
                .replace("{group}", "g")
                .replace("{name}", "p")
                .replace("{table}", "t")
                .replace("{key}", "k");
            for token in [None, Some("reader"), Some("writer"), Some("admin")] {
                let mut request = server
                    .http
                    .request(
                        method.to_uppercase().parse().unwrap(),
                        server.url(&concrete),
                    )
                    .header("content-type", "application/json")
                    .body("{}");
                if let Some(role) = token {
                    request = request.bearer_auth(format!("{role}-token-1"));
                }
                let response = tokio::time::timeout(Duration::from_secs(5), request.send())
                    .await
                    .unwrap()
                    .unwrap();
                let status = response.status().as_u16();
                let expected = match (needed, token) {
                    (None, _) => None,
                    (Some(_), None) => Some(401),
                    (Some(needed), Some(role)) if rank(role) < rank(needed) => Some(403),
                    (Some(_), Some(_)) => None,
                };
                match expected {
                    Some(expected) => {
                        assert_eq!(status, expected, "{method} {path} with {token:?}")
                    }
                    None => assert!(
                        status != 401 && status != 403,
                        "{method} {path} with {token:?}: {status}"
                    ),
                }
            }
        }
    }
    assert_eq!(
        walked,
        ROLES.len(),
        "the table lists operations the document does not"
    );
}

/// A reader cannot take messages from a consumer group, by pull or by push.
#[tokio::test]
async fn a_reader_takes_no_group_messages() {
    let server = Server::start_with(&[
        "--token",
        "reader:reader-token-1",
        "--token",
        "admin:admin-token-1",
    ]);
    let admin = |request: reqwest::RequestBuilder| request.bearer_auth("admin-token-1");
    let response = admin(server.http.put(server.url("/groups/jobs-1/workers")))
        .json(&json!({"start_from": "start"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = admin(server.http.post(server.url("/streams/jobs-1")))
        .json(&json!([{"type": "Job"}, {"type": "Job"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for request in [
        server
            .http
            .get(server.url("/groups/jobs-1/workers/subscribe?consumer=r")),
        server
            .http
            .post(server.url("/groups/jobs-1/workers/pull?consumer=r")),
    ] {
        let response = request.bearer_auth("reader-token-1").send().await.unwrap();
        assert_eq!(response.status(), 403);
    }
    let info: Value = admin(server.http.get(server.url("/groups/jobs-1/workers")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["delivered"], 0, "{info}");
    assert_eq!(info["in_flight"], 0, "{info}");
}

#[test]
fn bad_token_configuration_fails_at_start() {
    for args in [
        vec!["--token", "owner:some-token-1"],
        vec!["--token", "reader:short"],
        vec!["--tokens-file", "/nonexistent/tokens"],
    ] {
        let output = std::process::Command::new(common::BINARY)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(tempfile::tempdir().unwrap().path())
            .args(&args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}

/// SIGTERM while appends are in flight: the server exits cleanly and every acknowledged event is
/// there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_keeps_every_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let base = server.base.clone();
    let mut writers = Vec::new();
    for writer in 0..16 {
        let base = base.clone();
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acknowledged = Vec::new();
            for n in 0..10_000 {
                let id = format!("00000000-0000-4000-8000-{:06}{:06}", writer, n);
                let result = client
                    .post(format!("{base}/streams/shutdown-{writer}"))
                    .json(&json!({"id": id, "type": "T"}))
                    .send()
                    .await;
                match result {
                    Ok(response) if response.status() == 200 => acknowledged.push(id),
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.terminate(), "the server did not exit cleanly");
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.push(writer.await.unwrap());
    }
    assert!(
        acknowledged.iter().any(|ids| !ids.is_empty()),
        "nothing was appended before SIGTERM"
    );
    drop(server);

    let server = Server::start_in(dir.path(), &[]);
    for (writer, ids) in acknowledged.iter().enumerate() {
        let stored: Vec<String> = if ids.is_empty() {
            Vec::new()
        } else {
            server
                .read_everything(&format!("shutdown-{writer}"))
                .await
                .iter()
                .map(|event| event["id"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            &stored[..ids.len()],
            &ids[..],
            "writer {writer} lost acknowledged events"
        );
    }
}
