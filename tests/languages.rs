//! Projections in Python and JavaScript, written with `guest-sdk/python` and `guest-sdk/js` and
//! built by the examples' own `build` scripts (which install the pinned componentize-py and
//! componentize-js when missing), run beside their Rust twins over one random workload: the same
//! states and rows byte for byte (the same digest), emits and links as their logic says, printed
//! lines in the server's log once each, and an exception's message and traceback in the fault.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, guest, order_workload};
use serde_json::{Value, json};

/// Runs `projections/<example>/build` and reads the component whose path it prints last.
fn build(example: &str) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../projections")
        .join(example)
        .join("build");
    let output = Command::new(&script)
        .output()
        .expect("run the build script");
    assert!(
        output.status.success(),
        "{example} does not build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("the path is text");
    let path = stdout.lines().last().expect("the build prints the path");
    assert!(path.ends_with(&format!("{example}.wasm")), "{stdout}");
    std::fs::read(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Builds the examples side by side.
fn build_all<const N: usize>(examples: [&str; N]) -> [Vec<u8>; N] {
    std::thread::scope(|scope| {
        let builds = examples.map(|example| scope.spawn(move || build(example)));
        builds.map(|build| build.join().expect("the build thread"))
    })
}

/// Event types whose byte order differs from JavaScript's default (UTF-16) string order.
const AWKWARD_TYPES: [&str; 8] = [
    "10",
    "2",
    "Zeta",
    "alpha",
    "é",
    "\u{fb01}x",
    "😀",
    "\u{ff5e}",
];

/// Appends the orders (one request per stream, in order) and a stream of awkward event types.
async fn write(server: &Server, orders: &[(String, Vec<(String, Value)>)]) {
    for (stream, events) in orders {
        let body: Vec<Value> = events
            .iter()
            .map(|(kind, data)| json!({"type": kind, "data": data}))
            .collect();
        let (code, body) = server
            .post(&format!("/streams/{stream}"), Value::Array(body))
            .await;
        assert_eq!(code, 200, "{body}");
    }
    let awkward: Vec<Value> = AWKWARD_TYPES
        .iter()
        .map(|kind| json!({"type": kind, "data": {}}))
        .collect();
    let (code, body) = server.post("/streams/misc-1", Value::Array(awkward)).await;
    assert_eq!(code, 200, "{body}");
}

/// What `customer-tiers` keeps for one customer, and the tiers it reached, with the order.
#[derive(Default)]
struct Customer {
    orders: u64,
    total_cents: u64,
    tier: &'static str,
    reached: Vec<(&'static str, String)>,
}

fn tiers_model(orders: &[(String, Vec<(String, Value)>)]) -> BTreeMap<String, Customer> {
    let mut customers: BTreeMap<String, Customer> = BTreeMap::new();
    for (stream, events) in orders {
        for (kind, data) in events {
            if kind != "OrderPlaced" {
                continue;
            }
            let customer = customers
                .entry(data["customer_id"].as_str().unwrap().to_owned())
                .or_default();
            customer.orders += 1;
            customer.total_cents += data["total_cents"].as_u64().unwrap();
            let tier = match customer.total_cents {
                25_000.. => "gold",
                10_000.. => "silver",
                _ => "bronze",
            };
            if tier != customer.tier {
                customer.tier = tier;
                customer.reached.push((tier, stream.clone()));
            }
        }
    }
    customers
}

/// Checks a `customer-tiers` projection (deployed with emit) against the model, and that each
/// line it printed is in the server's log once.
async fn assert_tiers(server: &Server, name: &str, model: &BTreeMap<String, Customer>, log: &Path) {
    let mut per_tier: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, customer) in model {
        let (code, state) = server
            .get(&format!("/projections/{name}/state?partition={id}"))
            .await;
        assert_eq!(code, 200, "{id}: {state}");
        assert_eq!(
            state,
            json!({"orders": customer.orders, "total_cents": customer.total_cents,
                   "tier": customer.tier}),
            "{id}"
        );
        *per_tier.entry(customer.tier).or_default() += 1;

        let emitted = server.read_everything(&format!("tier-{id}")).await;
        let data: Vec<Value> = emitted.iter().map(|event| event["data"].clone()).collect();
        let expected: Vec<Value> = customer
            .reached
            .iter()
            .map(|(tier, order)| json!({"customer_id": id, "order": order, "tier": tier}))
            .collect();
        assert_eq!(data, expected, "tier-{id}");
        assert!(emitted.iter().all(|event| event["type"] == "TierReached"));

        let links = server.read_everything(&format!("orders-of-{id}")).await;
        assert_eq!(links.len() as u64, customer.orders, "orders-of-{id}");
    }
    for tier in ["bronze", "silver", "gold"] {
        let (code, row) = server
            .get(&format!(
                "/projections/{name}/tables/customers_by_tier/{tier}"
            ))
            .await;
        // A tier someone reached keeps its row, at zero when all moved up.
        let reached = model
            .values()
            .any(|customer| customer.reached.iter().any(|(reached, _)| *reached == tier));
        if reached {
            assert_eq!(code, 200, "{tier}: {row}");
            let count = per_tier.get(tier).copied().unwrap_or(0);
            assert_eq!(row, json!({"customers": count}), "{tier}");
        } else {
            assert_eq!(code, 404, "{tier}: {row}");
        }
    }

    let log = std::fs::read_to_string(log).expect("the server's log");
    let printed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&format!("projection={name} ")) && line.contains("reached"))
        .collect();
    let expected: usize = model.values().map(|customer| customer.reached.len()).sum();
    assert_eq!(printed.len(), expected, "{}", printed.join("\n"));
    for (id, customer) in model {
        for (tier, order) in &customer.reached {
            let line = format!("customer {id} reached {tier} with order {order} ");
            assert_eq!(
                printed
                    .iter()
                    .filter(|printed| printed.contains(&line))
                    .count(),
                1,
                "{line}"
            );
        }
    }
    assert!(
        printed
            .iter()
            .all(|line| line.contains("source=\"stdout\"")),
        "{printed:?}"
    );
}

/// Stops the projection, appends an order that takes a new customer to gold and then an
/// `OrderPlaced` without its total, and starts it again: one batch in which the second event
/// fails. Returns the fault, once the customer's line is in the log once, though the host replays
/// the batch to find the failing event and again to keep what came before it.
async fn fault_of_bad_order(server: &Server, name: &str, log: &Path) -> String {
    let (code, body) = server
        .post(&format!("/projections/{name}/stop"), json!({}))
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = server
        .post(
            "/streams/order-late",
            json!([{"type": "OrderPlaced", "data": {"customer_id": "c-late", "total_cents": 30000}}]),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, bad) = server
        .post(
            "/streams/order-bad",
            json!([{"type": "OrderPlaced", "data": {"customer_id": "c1"}}]),
        )
        .await;
    assert_eq!(code, 200, "{bad}");
    let (code, body) = server
        .post(&format!("/projections/{name}/start"), json!({}))
        .await;
    assert_eq!(code, 200, "{body}");

    let status = server.wait_status(name, "faulted").await;
    assert_eq!(
        status["fault"]["position"], bad["first_position"],
        "{status}"
    );
    assert_eq!(status["position"], bad["first_position"], "{status}");
    let (code, late) = server
        .get(&format!("/projections/{name}/state?partition=c-late"))
        .await;
    assert_eq!(
        code, 200,
        "what came before the failing event is kept: {late}"
    );
    assert_eq!(late["tier"], "gold");
    let line = format!("projection={name} ");
    let log = std::fs::read_to_string(log).expect("the server's log");
    let printed = log
        .lines()
        .filter(|printed| {
            printed.contains("customer c-late reached gold") && printed.contains(&line)
        })
        .count();
    assert_eq!(printed, 1, "{log}");
    status["fault"]["message"].as_str().unwrap().to_owned()
}

fn log_file(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.log"));
    (dir, path)
}

/// Deploys a Rust example and its twin under the same names plus `-rust` and `-twin`, and
/// `customer-tiers` (with emit) as `tiers`; waits until all three are caught up and checks that
/// the twins have the same digest. Returns the status of `tiers`.
async fn deploy_beside_rust(
    server: &Server,
    name: &str,
    rust: &str,
    twin: Vec<u8>,
    tiers: Vec<u8>,
) -> Value {
    let (rust_name, twin_name) = (format!("{name}-rust"), format!("{name}-twin"));
    let (rust, twin, tiers) = tokio::join!(
        server.deploy(&rust_name, guest(rust), ""),
        server.deploy(&twin_name, twin, ""),
        server.deploy("tiers", tiers, "?emit=true"),
    );
    for (code, body) in [rust, twin, tiers] {
        assert_eq!(code, 201, "{body}");
    }
    // An event counter counts what the tiers emit: the twins compare once that is done.
    let tiers = server.caught_up("tiers").await;
    let rust = server.caught_up(&rust_name).await;
    let twin = server.caught_up(&twin_name).await;
    assert_eq!(twin["events_processed"], rust["events_processed"]);
    assert_eq!(twin["digest"], rust["digest"], "{twin}\n{rust}");
    tiers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_projections_write_what_rust_writes() {
    let [order_summary_py, tiers_py] = build_all(["order-summary-py", "customer-tiers-py"]);
    let (_dir, log) = log_file("python");
    // Batches run in log order on one instance.
    let server = Server::start_logging_to(&log, &["--projection-workers", "1"]);
    let orders = order_workload(0x5eed_0018, 150, 6);
    write(&server, &orders).await;

    deploy_beside_rust(
        &server,
        "orders",
        "order-summary",
        order_summary_py,
        tiers_py,
    )
    .await;
    let (_, state) = server
        .get("/projections/orders-twin/state?partition=order-0")
        .await;
    let (_, rust_state) = server
        .get("/projections/orders-rust/state?partition=order-0")
        .await;
    assert_eq!(state, rust_state);

    assert_tiers(&server, "tiers", &tiers_model(&orders), &log).await;

    let fault = fault_of_bad_order(&server, "tiers", &log).await;
    assert!(
        fault.contains("OrderPlaced at position") && fault.contains("(0@order-bad)"),
        "{fault}"
    );
    assert!(fault.contains("KeyError: 'total_cents'"), "{fault}");
    assert!(
        fault.contains("Traceback") && fault.contains("app.py\", line"),
        "{fault}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_projections_write_what_rust_writes() {
    let [event_counter_js, tiers_js] = build_all(["event-counter-js", "customer-tiers-js"]);
    let (_dir, log) = log_file("javascript");
    // Partitions run on two instances side by side: windows whose links meet run again in log
    // order, and only the output of the windows kept reaches the log.
    let server = Server::start_logging_to(&log, &["--projection-workers", "2"]);
    let orders = order_workload(0x5eed_0019, 800, 6);
    write(&server, &orders).await;

    let status = deploy_beside_rust(
        &server,
        "counter",
        "event-counter",
        event_counter_js,
        tiers_js,
    )
    .await;
    assert!(
        status["parallel"]["rerun_events"].as_u64().unwrap_or(0) > 0,
        "windows ran side by side, and ran again: {status}"
    );
    let (_, state) = server.get("/projections/counter-twin/state").await;
    let (_, rust_state) = server.get("/projections/counter-rust/state").await;
    assert_eq!(state, rust_state);

    assert_tiers(&server, "tiers", &tiers_model(&orders), &log).await;

    let fault = fault_of_bad_order(&server, "tiers", &log).await;
    assert!(
        fault.contains("OrderPlaced at position") && fault.contains("(0@order-bad)"),
        "{fault}"
    );
    assert!(
        fault.contains("TypeError: OrderPlaced without total_cents"),
        "{fault}"
    );
    assert!(fault.contains("app.js"), "{fault}");
}
