//! Starts the real `refract` binary on a temporary data directory and a free port.
#![allow(dead_code)] // Each test file uses a different part of this harness.

pub mod browser;
pub mod cluster;
pub mod kafka;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_json::{Value, json};

pub const BINARY: &str = env!("CARGO_BIN_EXE_refract");

pub struct Server {
    child: Child,
    pub base: String,
    pub dir: PathBuf,
    _temporary: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

impl Server {
    /// A server on a fresh temporary data directory.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Server {
        let temporary = tempfile::tempdir().expect("temporary directory");
        let dir = temporary.path().to_path_buf();
        let mut server = Server::start_in(&dir, args);
        server._temporary = Some(temporary);
        server
    }

    /// A server on `dir`, which the caller keeps (for restarts).
    pub fn start_in(dir: &Path, args: &[&str]) -> Server {
        Server::start_listening(dir, "127.0.0.1:0", args)
    }

    /// A server on a fresh temporary data directory that writes its log, at `info`, to `log`.
    pub fn start_logging_to(log: &Path, args: &[&str]) -> Server {
        let temporary = tempfile::tempdir().expect("temporary directory");
        let file = std::fs::File::create(log).expect("create the log file");
        let mut server = Server::spawn(temporary.path(), "127.0.0.1:0", args, Some(file));
        server._temporary = Some(temporary);
        server
    }

    /// A server on `dir` at the address `listen` (to come back at the same one after a kill).
    pub fn start_listening(dir: &Path, listen: &str, args: &[&str]) -> Server {
        Server::spawn(dir, listen, args, None)
    }

    fn spawn(dir: &Path, listen: &str, args: &[&str], log: Option<std::fs::File>) -> Server {
        let (level, stderr) = match log {
            Some(file) => ("info", Stdio::from(file)),
            None => ("error", Stdio::inherit()),
        };
        let mut child = Command::new(BINARY)
            .args(["serve", "--listen", listen, "--data"])
            .arg(dir)
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start refract");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        let base = line
            .trim()
            .strip_prefix("refract listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Server {
            child,
            base,
            dir: dir.to_path_buf(),
            _temporary: None,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the process a signal by name (`STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// SIGTERM, then wait for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not stop within 10 s of SIGTERM");
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        status_and_json(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        status_and_json(response).await
    }

    /// The body of `GET path` as text (pages, metrics).
    pub async fn text(&self, path: &str) -> String {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        response.text().await.expect("a text body")
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        status_and_json(response).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .expect("DELETE");
        status_and_json(response).await
    }

    /// Appends `count` events of type `Test` with data `{"n": i}` and returns the response.
    pub async fn append_n(&self, stream: &str, count: usize) -> Value {
        let events: Vec<Value> = (0..count)
            .map(|n| json!({"type": "Test", "data": {"n": n}}))
            .collect();
        let (status, body) = self
            .post(&format!("/streams/{stream}"), json!(events))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Every event of a stream (or `$all`), following `next`.
    pub async fn read_everything(&self, stream: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut from = 0;
        loop {
            let (status, page) = self
                .get(&format!("/streams/{stream}?from={from}&limit=4096"))
                .await;
            assert_eq!(status, 200, "{page}");
            events.extend(page["events"].as_array().expect("events").iter().cloned());
            match page["next"].as_u64() {
                Some(next) => from = next,
                None => return events,
            }
        }
    }

    /// Opens an SSE subscription at `path` with optional extra headers.
    pub async fn subscribe(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> impl Stream<Item = Sse> + Unpin + use<> {
        let mut request = self.http.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("subscribe");
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        use eventsource_stream::Eventsource;
        Box::pin(response.bytes_stream().eventsource().map(|message| {
            let message = message.expect("SSE message");
            Sse {
                id: message.id,
                event: message.event,
                data: message.data,
            }
        }))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone)]
pub struct Sse {
    pub id: String,
    pub event: String,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("SSE data is JSON")
    }
}

pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"))
    };
    (status, body)
}

/// Waits for the next SSE message, failing the test after 10 s.
pub async fn next_message(stream: &mut (impl Stream<Item = Sse> + Unpin)) -> Sse {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an SSE message within 10 s")
        .expect("the subscription stays open")
}

/// A virtualenv in `target/<name>` with the pinned `requirements` (a path in the workspace),
/// created when missing (`.ci/run` creates the suite's first); answers its `bin` folder.
pub fn virtualenv(name: &str, requirements: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = workspace.join("target").join(name);
    let marker = venv.join(".installed");
    if !marker.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs: install Python 3 with venv (.ci/run does)");
        assert!(status.success(), "cannot create {}", venv.display());
        let status = Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--requirement"])
            .arg(workspace.join(requirements))
            .status()
            .expect("pip runs");
        assert!(status.success(), "cannot install {requirements}");
        std::fs::write(&marker, b"").expect("mark the virtualenv installed");
    }
    venv.join("bin")
}

/// The guest components of `projections/`, built for `wasm32-wasip2` once per test binary
/// (cargo makes the later builds no-ops). A separate target directory keeps this build from
/// waiting on the lock of the one running the tests.
pub fn guest(package: &str) -> Vec<u8> {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target_dir = workspace.join("target").join("guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .current_dir(&workspace)
            .args(["build", "--quiet", "--locked", "--profile", "guest"])
            .args(["--target", "wasm32-wasip2", "--target-dir"])
            .arg(&target_dir);
        for package in GUESTS {
            command.args(["-p", package]);
        }
        let status = command.status().expect("cargo runs");
        assert!(status.success(), "building the guests failed");
        target_dir.join("wasm32-wasip2").join("guest")
    });
    let file = dir.join(format!("{}.wasm", package.replace('-', "_")));
    std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()))
}

const GUESTS: [&str; 9] = [
    "order-summary",
    "event-counter",
    "shard-by-customer",
    "customer-orders",
    "fixture-trap",
    "fixture-spin",
    "fixture-balloon",
    "fixture-linker",
    "fixture-notifier",
];

impl Server {
    /// `PUT /projections/{name}` with a component and query.
    pub async fn deploy(&self, name: &str, component: Vec<u8>, query: &str) -> (u16, Value) {
        self.put_wasm(&format!("/projections/{name}{query}"), component)
            .await
    }

    /// `PUT /sharders/{name}` with a component.
    pub async fn deploy_sharder(&self, name: &str, component: Vec<u8>) -> (u16, Value) {
        self.put_wasm(&format!("/sharders/{name}"), component).await
    }

    async fn put_wasm(&self, path: &str, component: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .header("content-type", "application/wasm")
            .body(component)
            .send()
            .await
            .expect("request");
        status_and_json(response).await
    }

    /// Waits until projection `name` has processed everything written so far (and a rebuild
    /// in progress has switched in).
    pub async fn caught_up(&self, name: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (code, status) = self.get(&format!("/projections/{name}")).await;
            assert_eq!(code, 200, "{status}");
            // A rebuild in progress counts as not caught up: it switches in when it is.
            if status["position"] == status["head_position"] && status["status"] == "running" {
                return status;
            }
            assert!(
                status["status"] == "running" || status["status"] == "rebuilding",
                "{name} stopped before catching up: {status}"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{name} did not catch up: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until projection `name` reaches `status` (e.g. `faulted`).
    pub async fn wait_status(&self, name: &str, wanted: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, status) = self.get(&format!("/projections/{name}")).await;
            if status["status"] == wanted {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never became {wanted}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `command` with `input` on its standard input and collects its output.
pub fn run_with_input(
    command: &mut Command,
    input: &[u8],
) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(input)?;
    child.wait_with_output()
}

/// Waits until `done` holds, failing the test after 10 s.
pub async fn wait_until<F: Future<Output = bool>>(mut done: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "not done within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A random order workload: per order stream, its events in order.
pub fn order_workload(
    seed: u64,
    orders: usize,
    customers: u64,
) -> Vec<(String, Vec<(String, Value)>)> {
    let mut random = Random(seed);
    (0..orders)
        .map(|n| {
            let customer = format!("c{}", random.below(customers));
            let mut events = vec![(
                "OrderPlaced".to_owned(),
                json!({"customer_id": customer, "total_cents": 100 + random.below(5000)}),
            )];
            for item in 0..random.below(4) {
                events.push((
                    "ItemAdded".into(),
                    json!({"sku": format!("sku-{item}"), "price_cents": 1 + random.below(900)}),
                ));
            }
            if random.below(4) == 0 {
                events.push(("OrderNoted".into(), json!({"note": "ignored"})));
            }
            match random.below(3) {
                0 => events.push(("OrderShipped".into(), json!({}))),
                1 => events.push(("OrderCancelled".into(), json!({}))),
                _ => {}
            }
            (format!("order-{n}"), events)
        })
        .collect()
}

/// A small deterministic generator (xorshift), so a failing workload can be replayed.
pub struct Random(pub u64);

impl Random {
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// FNV-1a, 64 bits: the hash `projections/shard-by-customer` keys with.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash
}
