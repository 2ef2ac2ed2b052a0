//! The OpenAPI document against the server it describes: schemathesis (pinned in
//! `tests/schemathesis/requirements.txt`, in a virtualenv under `target/` that `.ci/run` creates
//! and this test creates when it is missing) runs every check on every operation, seeded, with
//! an admin token. Zero failures.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

#[tokio::test]
async fn the_openapi_document_holds_for_every_generated_request() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let program = common::virtualenv("schemathesis", "tests/schemathesis/requirements.txt")
        .join("schemathesis");
    let server = Server::start_with(&[
        "--token",
        "admin:conformance-admin",
        "--token",
        "reader:conformance-reader",
    ]);
    let (_, document) = server.get("/openapi.json").await;
    // Every operation, the one serving the document included.
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    let config = workspace.join("tests/schemathesis");
    let output = Command::new(program)
        .current_dir(&config)
        .env("PYTHONPATH", &config)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .args(["--config-file", "schemathesis.toml", "run", "--no-color"])
        .arg(server.url("/openapi.json"))
        .args(["--header", "Authorization: Bearer conformance-admin"])
        .output()
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tested = format!("Tested: {operations}");
    assert!(
        report.lines().any(|line| line.trim() == tested),
        "not every operation was tested:\n{report}"
    );
}
