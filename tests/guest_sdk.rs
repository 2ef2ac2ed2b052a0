//! The SDK as a user outside this repository meets it: the complete projection of
//! `guest-sdk/README.md`, in a crate of its own that depends on `refract-guest` by path, built
//! with the README's command and deployed as the README says.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;
use serde_json::json;

/// The first fenced block of `language` in `markdown`.
fn fenced<'a>(markdown: &'a str, language: &str) -> &'a str {
    let opening = format!("```{language}\n");
    let start = markdown
        .find(&opening)
        .unwrap_or_else(|| panic!("no {language} block"))
        + opening.len();
    let length = markdown[start..].find("```").expect("a closed block");
    &markdown[start..start + length]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_projection_builds_outside_the_repository_and_runs() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sdk = workspace.join("guest-sdk").canonicalize().unwrap();
    let readme = std::fs::read_to_string(sdk.join("README.md")).unwrap();
    let manifest = fenced(&readme, "toml");
    assert!(manifest.contains(r#"refract-guest = { path = "../guest-sdk" }"#));
    let manifest = manifest.replace(
        r#"path = "../guest-sdk""#,
        &format!("path = {:?}", sdk.display().to_string()),
    );

    let outside = tempfile::tempdir().unwrap();
    let crate_dir = outside.path().join("order-totals");
    std::fs::create_dir_all(crate_dir.join("src")).unwrap();
    // Its own workspace, and this repository's lock file so the versions are the tested ones.
    std::fs::write(
        crate_dir.join("Cargo.toml"),
        format!("{manifest}\n[workspace]\n"),
    )
    .unwrap();
    std::fs::write(crate_dir.join("src/lib.rs"), fenced(&readme, "rust")).unwrap();
    std::fs::copy(workspace.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    let target_dir = workspace.join("target").join("outside-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The README's build command.
    let status = Command::new(cargo)
        .current_dir(&crate_dir)
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .unwrap();
    assert!(status.success(), "the README's projection does not build");
    let component =
        std::fs::read(target_dir.join("wasm32-wasip2/release/order_totals.wasm")).unwrap();

    let server = Server::start();
    let (code, deployed) = server.deploy("order-totals", component, "?emit=true").await;
    assert_eq!(code, 201, "{deployed}");
    for (stream, events) in [
        (
            "order-1",
            json!([{"type": "OrderPlaced", "data": {"customer_id": "c1", "total_cents": 150000}},
                   {"type": "OrderShipped"}]),
        ),
        (
            "order-2",
            json!([{"type": "OrderPlaced", "data": {"customer_id": "c1", "total_cents": 100}}]),
        ),
    ] {
        let (code, body) = server.post(&format!("/streams/{stream}"), events).await;
        assert_eq!(code, 200, "{body}");
    }
    server.caught_up("order-totals").await;
    let (_, order) = server
        .get("/projections/order-totals/state?partition=order-1")
        .await;
    assert_eq!(
        order,
        json!({"customer_id": "c1", "total_cents": 150000, "status": "shipped"})
    );
    let (_, customer) = server
        .get("/projections/order-totals/tables/by_customer/c1")
        .await;
    assert_eq!(customer, json!({"orders": 2, "total_cents": 150100}));
    let big = server.read_everything("big-orders").await;
    assert_eq!(big.len(), 1);
    assert_eq!(big[0]["stream"], "order-1");
    let notified = server.read_everything("notify-c1").await;
    assert_eq!(notified.len(), 1);
    assert_eq!(notified[0]["data"], json!({"order": "order-1"}));
}
