//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`; `.ci/run`
//! installs them), for tests of what a browser sees.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Browser {
        let port = free_port();
        // In a process group of its own, with the Chromium it starts, so a failing test that
        // never closes the session still leaves no browser behind.
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver runs: install Debian's chromium-driver (.ci/run does)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(response) = ready
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut options = json!({"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions",
        ]});
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options,
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("a WebDriver session")
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        self.answer(path, self.http.post(url).json(&body)).await
    }

    async fn query(&self, path: &str) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        self.answer(path, self.http.get(url)).await
    }

    /// The `value` of WebDriver's answer to `request`; a WebDriver error fails the test.
    async fn answer(&self, path: &str, request: reqwest::RequestBuilder) -> Value {
        let answer: Value = request
            .send()
            .await
            .expect("WebDriver answers")
            .json()
            .await
            .unwrap();
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command("url", json!({"url": url})).await;
    }

    /// The value of `script`, a function body (`return …`) run in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// The value `script` (an async function body) resolves to.
    pub async fn eval_async(&self, script: &str) -> Value {
        let wrapped = format!(
            "const done = arguments[arguments.length - 1];
             (async () => {{ {script} }})().then(done, error => done({{error: String(error)}}));"
        );
        self.command("execute/async", json!({"script": wrapped, "args": []}))
            .await
    }

    /// Waits until `condition` (an expression) is true in the page; its last value on timeout.
    pub async fn wait_for(&self, condition: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(&format!("return {condition};")).await;
            if value == true {
                return value;
            }
            assert!(Instant::now() < deadline, "the page never had {condition}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sizes the window's viewport to `width` × `height` CSS pixels.
    pub async fn viewport(&self, width: u32, height: u32) {
        // The window's frame takes some of the window: grow it by what is missing.
        self.command("window/rect", json!({"width": width, "height": height}))
            .await;
        let inner = self
            .eval("return [window.innerWidth, window.innerHeight];")
            .await;
        let (inner_width, inner_height) = (
            inner[0].as_u64().unwrap() as u32,
            inner[1].as_u64().unwrap() as u32,
        );
        self.command(
            "window/rect",
            json!({"width": 2 * width - inner_width, "height": 2 * height - inner_height}),
        )
        .await;
    }

    /// Saves a PNG of the viewport as `target/ui-screenshots/{name}.png`; its path.
    pub async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        use base64::Engine;
        let png = self.query("screenshot").await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a screenshot"))
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        println!("screenshot: {}", path.display());
        path
    }

    /// Types `text` into the element `selector` finds (for a file input: a file's path).
    pub async fn type_into(&self, selector: &str, text: &str) {
        let found = self
            .command(
                "element",
                json!({"using": "css selector", "value": selector}),
            )
            .await;
        let element = found
            .as_object()
            .and_then(|found| found.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {selector}"))
            .to_owned();
        self.command(&format!("element/{element}/value"), json!({"text": text}))
            .await;
    }

    /// Presses keys (WebDriver key codes, e.g. `\u{E004}` for Tab) one after another.
    pub async fn press(&self, keys: &str) {
        let mut actions = Vec::new();
        for key in keys.chars() {
            actions.push(json!({"type": "keyDown", "value": key.to_string()}));
            actions.push(json!({"type": "keyUp", "value": key.to_string()}));
        }
        self.command(
            "actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await;
    }

    /// Ends the session (closing Chromium), then chromedriver (on drop).
    pub async fn close(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}
