//! The command line's client commands against a running server.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::Server;
use serde_json::{Value, json};

fn refract(server: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(common::BINARY)
        .args(args)
        .args(["--server", &server.base])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(stdin) = stdin {
        input.write_all(stdin.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn append_read_and_delete() {
    let server = Server::start();
    let output = refract(
        &server,
        &[
            "append",
            "order-1",
            "--type",
            "OrderPlaced",
            "--data",
            r#"{"total": 42}"#,
            "--metadata",
            r#"{"$correlationId": "c-1"}"#,
            "--expected-revision",
            "no_stream",
        ],
        None,
    );
    assert!(stdout(&output).contains("revisions 0..=0"));
    let lines =
        "{\"type\": \"ItemAdded\", \"data\": {\"sku\": \"a\"}}\n\n{\"type\": \"OrderShipped\"}\n";
    let output = refract(&server, &["append", "order-1", "--json"], Some(lines));
    let result: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        result,
        json!({"first_revision": 1, "last_revision": 2, "first_position": 1, "last_position": 2})
    );

    let output = refract(&server, &["read", "order-1"], None);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 3);
    assert!(
        text.lines().next().unwrap().starts_with("0@order-1"),
        "{text}"
    );
    assert!(text.contains(r#"{"total":42}"#));

    let output = refract(
        &server,
        &["read", "order-1", "--backward", "--limit", "1", "--json"],
        None,
    );
    let event: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(
        (event["revision"].clone(), event["type"].clone()),
        (json!(2), json!("OrderShipped"))
    );

    let output = refract(&server, &["read", "$all", "--from", "1", "--json"], None);
    assert_eq!(stdout(&output).lines().count(), 2);

    let output = refract(
        &server,
        &["read", "order-1", "--follow", "--limit", "3"],
        None,
    );
    assert_eq!(stdout(&output).lines().count(), 3);

    assert!(stdout(&refract(&server, &["delete", "order-1"], None)).contains("deleted order-1"));
    let output = refract(&server, &["read", "order-1"], None);
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_with_a_non_zero_exit() {
    let server = Server::start();
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (
            vec!["append", "s-1", "--type", "T", "--data", "{not json"],
            None,
            "--data is not valid JSON",
        ),
        (
            vec!["append", "s-1", "--type", "T", "--expected-revision", "5"],
            None,
            "wrong_expected_revision",
        ),
        (vec!["append", "$ce-x", "--type", "T"], None, "reserved"),
        (vec!["append", "s-1"], Some("not json\n"), "stdin line 1"),
        (vec!["append", "s-1"], Some(""), "no events"),
        (vec!["read", "missing-1"], None, "stream_not_found"),
    ];
    for (args, stdin, expected) in cases {
        let output = refract(&server, &args, stdin);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    let output = Command::new(common::BINARY)
        .args(["read", "s-1", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_commands() {
    let server = Server::start();
    server.append_n("order-1", 3).await;
    let text = stdout(&refract(&server, &["projection", "list"], None));
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(
        text.lines().nth(1).unwrap().starts_with("$by_category"),
        "{text}"
    );
    let output = refract(
        &server,
        &["projection", "stop", "$by_event_type", "--json"],
        None,
    );
    let status: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(
        (status["name"].clone(), status["status"].clone()),
        (json!("$by_event_type"), json!("stopped"))
    );
    let output = refract(
        &server,
        &["projection", "start", "$by_event_type", "--json"],
        None,
    );
    let status: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(status["status"], "running");
    let output = refract(&server, &["projection", "reset", "$by_category"], None);
    assert!(stdout(&output).contains("$by_category"));
    let output = refract(&server, &["projection", "status", "$by_nothing"], None);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_projection_commands() {
    let server = Server::start();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), common::guest("order-summary")).unwrap();
    let path = file.path().to_str().unwrap();
    let output = refract(
        &server,
        &[
            "projection",
            "deploy",
            "orders",
            path,
            "--emit",
            "--mode",
            "one_time",
        ],
        None,
    );
    assert!(stdout(&output).contains("deployed orders version 1"));
    let output = refract(
        &server,
        &["projection", "deploy", "orders", path, "--emit", "--json"],
        None,
    );
    let status: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(status["version"], 2);
    assert_eq!(status["mode"], "continuous");
    refract(
        &server,
        &[
            "append",
            "order-7",
            "--type",
            "OrderPlaced",
            "--data",
            r#"{"customer_id": "c9", "total_cents": 250}"#,
        ],
        None,
    );
    server.caught_up("orders").await;
    let output = refract(
        &server,
        &[
            "projection",
            "state",
            "orders",
            "--partition",
            "order-7",
            "--json",
        ],
        None,
    );
    let state: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        state,
        json!({"customer_id": "c9", "lines": 0, "total_cents": 250, "status": "placed"})
    );
    // A rebuild beside the live version, waited for; then one cancelled while stopped.
    let output = refract(
        &server,
        &["projection", "rebuild", "orders", "--wait", "--json"],
        None,
    );
    let status: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(status.get("rebuild").is_none(), "{status}");
    assert_eq!(status["position"], status["head_position"]);
    stdout(&refract(&server, &["projection", "stop", "orders"], None));
    let output = refract(&server, &["projection", "rebuild", "orders"], None);
    assert!(stdout(&output).contains("rebuilding version 2 (stopped)"));
    let output = refract(
        &server,
        &["projection", "rebuild", "orders", "--cancel", "--json"],
        None,
    );
    let status: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(status.get("rebuild").is_none(), "{status}");
    let again = refract(
        &server,
        &["projection", "rebuild", "orders", "--cancel"],
        None,
    );
    assert!(!again.status.success());
    stdout(&refract(&server, &["projection", "start", "orders"], None));
    let output = refract(
        &server,
        &[
            "projection",
            "table",
            "orders",
            "by_customer",
            "c9",
            "--json",
        ],
        None,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&output)).unwrap(),
        json!({"orders": 1, "total_cents": 250})
    );
    let output = refract(
        &server,
        &["projection", "table", "orders", "by_customer"],
        None,
    );
    assert_eq!(stdout(&output), "c9\t{\"orders\":1,\"total_cents\":250}\n");
    let output = refract(&server, &["projection", "list"], None);
    assert!(stdout(&output).contains("orders"));
    // Without --partition: the partitions that have a state.
    let output = refract(&server, &["projection", "state", "orders"], None);
    assert_eq!(stdout(&output), "order-7\n");
    let output = refract(
        &server,
        &["projection", "deploy", "bad", "/nonexistent.wasm"],
        None,
    );
    assert!(!output.status.success());
    let output = refract(&server, &["projection", "delete", "orders"], None);
    assert!(stdout(&output).contains("deleted orders"));
    let (code, _) = server.get("/projections/orders").await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn group_commands() {
    let server = Server::start();
    let created = stdout(&refract(
        &server,
        &[
            "group",
            "create",
            "jobs",
            "workers",
            "--start-from",
            "start",
            "--settings",
            r#"{"min_checkpoint_count": 1, "checkpoint_after_ms": 0}"#,
            "--max-retry-count",
            "3",
        ],
        None,
    ));
    assert_eq!(created.trim(), "created workers on jobs");
    let again = refract(&server, &["group", "create", "jobs", "workers"], None);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let bad = refract(
        &server,
        &["group", "create", "jobs", "x", "--strategy", "random"],
        None,
    );
    assert!(!bad.status.success());

    server.append_n("jobs", 3).await;
    let consumed = stdout(&refract(
        &server,
        &[
            "group", "consume", "jobs", "workers", "--ack", "--count", "3", "--json",
        ],
        None,
    ));
    let messages: Vec<Value> = consumed
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let numbers: Vec<&Value> = messages.iter().map(|m| &m["event"]["data"]["n"]).collect();
    assert_eq!(numbers, vec![&json!(0), &json!(1), &json!(2)]);

    let info: Value = serde_json::from_str(&stdout(&refract(
        &server,
        &["group", "info", "jobs", "workers", "--json"],
        None,
    )))
    .unwrap();
    assert_eq!(info["settings"]["max_retry_count"], 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.get("/groups/jobs/workers").await.1["checkpoint"] != 2 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let list = stdout(&refract(&server, &["group", "list"], None));
    assert!(
        list.contains("workers") && list.contains("round_robin"),
        "{list}"
    );
    let updated = stdout(&refract(
        &server,
        &["group", "update", "jobs", "workers", "--strategy", "pinned"],
        None,
    ));
    assert_eq!(updated.trim(), "updated workers on jobs");
    assert_eq!(server.get("/groups/jobs/workers").await.1["checkpoint"], 2);
    let replay = stdout(&refract(
        &server,
        &["group", "replay-parked", "jobs", "workers"],
        None,
    ));
    assert_eq!(replay.trim(), "replaying 0 parked messages");
    stdout(&refract(
        &server,
        &["group", "delete", "jobs", "workers"],
        None,
    ));
    let gone = refract(&server, &["group", "info", "jobs", "workers"], None);
    assert!(!gone.status.success());
}

/// `projection status` exits non-zero for a faulted projection; a replacing upgrade asks first
/// and, without a terminal to ask on, refuses unless `--yes`.
#[tokio::test(flavor = "multi_thread")]
async fn projection_status_and_replacing_upgrades() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let trap = dir.path().join("trap.wasm");
    std::fs::write(&trap, common::guest("fixture-trap")).unwrap();
    let summary = dir.path().join("summary.wasm");
    std::fs::write(&summary, common::guest("order-summary")).unwrap();
    let trap = trap.to_str().unwrap();
    let summary = summary.to_str().unwrap();

    stdout(&refract(
        &server,
        &["projection", "deploy", "t", trap],
        None,
    ));
    server
        .post("/streams/work-1", json!({"type": "Poison"}))
        .await;
    server.wait_status("t", "faulted").await;
    let output = refract(&server, &["projection", "status", "t"], None);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("faulted"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("t is faulted"));

    server
        .post(
            "/streams/order-1",
            json!([{"type": "OrderPlaced", "data": {"customer_id": "c1", "total_cents": 1}},
                   {"type": "OrderShipped"}]),
        )
        .await;
    let deploy = ["projection", "deploy", "orders", summary, "--emit"];
    stdout(&refract(&server, &deploy, None));
    server.caught_up("orders").await;
    let replace = [&deploy[..], &["--emitted", "replace"]].concat();
    let output = refract(&server, &replace, None);
    assert!(!output.status.success(), "no terminal, no --yes");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("emitted to 1 streams holding 1 events"),
        "{stderr}"
    );
    assert_eq!(server.get("/projections/orders").await.1["version"], 1);
    let yes = [&replace[..], &["--yes"]].concat();
    stdout(&refract(&server, &yes, None));
    assert_eq!(server.caught_up("orders").await["version"], 2);
}

/// Logs written to a file (or any non-terminal) carry no colour codes.
#[test]
fn logs_off_a_terminal_have_no_colours() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::BINARY)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("refract is listening") {
        let mut line = String::new();
        assert_ne!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap(),
            0
        );
        log.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!log.contains('\u{1b}'), "{log:?}");
}
