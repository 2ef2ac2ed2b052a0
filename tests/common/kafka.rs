//! A Kafka-protocol broker for the connector tests (nisshi, on SQLite in a temporary
//! directory, so a restart keeps its records) and an independent client to check it with
//! (`tests/kafka/client.py`, confluent-kafka in a virtualenv under `target/`).

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The broker's version, as `.ci/run` installs it.
pub const NISSHI_VERSION: &str = "0.8.1";

/// Where `.ci/run` installs the broker: `$REFRACT_TOOLS_CACHE` (default `~/.cache/refract-tools`),
/// outside the clone, since it takes a quarter of an hour to build.
pub fn nisshi() -> PathBuf {
    let cache = std::env::var_os("REFRACT_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/refract-tools")
        });
    let binary = cache
        .join(format!("nisshi-{NISSHI_VERSION}-sqlite"))
        .join("bin/nisshi");
    assert!(
        binary.exists(),
        "{} is missing: .ci/run installs the broker (nisshi {NISSHI_VERSION} with SQLite storage)",
        binary.display()
    );
    binary
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub bootstrap: String,
    dir: tempfile::TempDir,
}

impl Broker {
    /// A broker on a free port, storing in a fresh directory.
    pub fn start() -> Broker {
        let port = free_port();
        let mut broker = Broker {
            child: None,
            port,
            bootstrap: format!("127.0.0.1:{port}"),
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("broker log");
        let child = Command::new(nisshi())
            .current_dir(self.dir.path())
            .args(["broker", "--storage-engine", "sqlite://nisshi.db"])
            .args([
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args(["--cluster-id", "refract-tests"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the broker");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the broker did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, then the same broker again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// The broker again after [`Broker::kill`].
    pub fn resume(&mut self) {
        self.run();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the broker a signal by name (`STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("a running broker");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        client(
            &[
                "create-topic",
                &self.bootstrap,
                topic,
                &partitions.to_string(),
            ],
            "",
        );
    }

    /// Produces records `{"partition"?, "key"?, "value", "headers"?}` with the independent
    /// client.
    pub fn produce(&self, topic: &str, records: &[Value]) {
        let lines: String = records.iter().map(|record| format!("{record}\n")).collect();
        client(&["produce", &self.bootstrap, topic], &lines);
    }

    /// Every record of the topic, read with the independent client.
    pub fn consume(&self, topic: &str) -> Vec<Value> {
        client(&["consume", &self.bootstrap, topic], "")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
}

/// The virtualenv's Python with confluent-kafka, created from the pinned requirements if
/// needed (`.ci/run` creates it first).
pub fn python() -> PathBuf {
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    READY.get_or_init(install_python).clone()
}

fn install_python() -> PathBuf {
    super::virtualenv("kafka-client", "tests/kafka/requirements.txt").join("python")
}

/// Runs `tests/kafka/client.py` with `args` and `input` on stdin; answers its stdout.
pub fn client(args: &[&str], input: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/kafka/client.py");
    let mut child = Command::new(python())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Kafka client");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("the Kafka client ends");
    writer.join().expect("stdin writer").expect("write stdin");
    assert!(
        output.status.success(),
        "kafka client {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}
