//! What a browser sees, in headless Chromium: pages of another origin using the API.

mod common;

use std::time::Duration;

use common::Server;
use common::browser::{Browser, free_port};

/// A page of its own origin that calls the API at `?api=URL`.
const PAGE: &str = r#"<!doctype html>
<html><head><title>cross-origin client</title></head><body><script>
const api = new URLSearchParams(location.search).get("api");
window.seen = [];
window.caughtUp = 0;
window.append = async (events) => {
  const response = await fetch(api + "/streams/cors-1", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Expected-Revision": "any"},
    body: JSON.stringify(events),
  });
  return {status: response.status, body: await response.json()};
};
window.subscribe = () => {
  const source = new EventSource(api + "/streams/cors-1/subscribe?from=start");
  source.addEventListener("event", (message) => {
    window.seen.push({id: message.lastEventId, n: JSON.parse(message.data).data.n});
  });
  source.addEventListener("caught_up", () => { window.caughtUp += 1; });
  source.onerror = () => { window.errors = (window.errors || 0) + 1; };
};
</script></body></html>"#;

/// Serves [`PAGE`] on a free loopback port; the page's origin.
async fn serve_page() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::response::Html(PAGE) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    origin
}

/// A page of another origin appends (a preflighted request), subscribes with `EventSource`, and
/// when the server restarts under it, resumes with `Last-Event-ID`: every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_an_allowed_origin_appends_subscribes_and_resumes() {
    let origin = serve_page().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--cors-origin", origin.as_str()];
    let mut server = Server::start_listening(dir.path(), &listen, &args);
    let api = server.base.clone();

    let browser = Browser::start().await;
    browser.goto(&format!("{origin}/?api={api}")).await;
    let appended = browser
        .eval_async(r#"return await window.append([{type: "Tick", data: {n: 0}}, {type: "Tick", data: {n: 1}}, {type: "Tick", data: {n: 2}}]);"#)
        .await;
    assert_eq!(appended["status"], 200, "{appended}");
    assert_eq!(appended["body"]["last_revision"], 2);

    browser.eval("window.subscribe(); return true;").await;
    browser
        .wait_for(
            "window.caughtUp === 1 && window.seen.length === 3",
            Duration::from_secs(10),
        )
        .await;

    // The server goes away and comes back on the same address; the page's EventSource
    // reconnects by itself and says where it was.
    server.kill();
    let server = Server::start_listening(dir.path(), &listen, &args);
    server.append_n("cors-1", 2).await;
    browser
        .wait_for("window.seen.length === 5", Duration::from_secs(20))
        .await;
    let seen = browser.eval("return window.seen;").await;
    let ids: Vec<&str> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4"], "{seen}");
    assert!(browser.eval("return window.errors >= 1;").await == true);
    browser.close().await;
}

/// Preflights are answered for allowed origins only, and without `--cors-origin` for none.
#[tokio::test]
async fn preflights_answer_only_allowed_origins() {
    let allowed = "http://app.example.com";
    let server = Server::start_with(&["--cors-origin", allowed]);
    let preflight = |origin: &'static str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, server.url("/streams/a-1"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let response = preflight(allowed).await.unwrap();
    assert!(response.status().is_success());
    assert_eq!(response.headers()["access-control-allow-origin"], allowed);
    let methods = response.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let response = preflight("http://elsewhere.example.com").await.unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let plain = Server::start();
    let response = plain
        .http
        .get(plain.url("/health"))
        .header("origin", allowed)
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[test]
fn an_origin_with_a_path_is_refused_at_start() {
    let output = std::process::Command::new(common::BINARY)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cors-origin",
            "http://app.example.com/x",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not an origin"), "{stderr}");
}
