//! Projections in Rust, Python and JavaScript over the same order events: each example's build
//! time (its own `build` script), component size, cold compile, and events/s from deploy to
//! caught up, with the twins that write the same states side by side.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use refract::metrics::Metrics;
use refract::projections::component::Runtime;
use refract::projections::{DeployOptions, Projections};
use refract::sandbox::Sandbox;
use refract::store::{Store, StoreOptions};

use crate::wasm_projections::{caught_up, read_guest, write_orders};

/// A projection to measure: its name, and where its component comes from.
enum Source {
    /// A Rust guest built by cargo, by file name.
    Rust(&'static str),
    /// An example of `projections/` with a `build` script.
    Script(&'static str),
}

const PROJECTIONS: [(&str, Source); 6] = [
    ("order-summary", Source::Rust("order_summary")),
    ("order-summary-py", Source::Script("order-summary-py")),
    ("event-counter", Source::Rust("event_counter")),
    ("event-counter-js", Source::Script("event-counter-js")),
    ("customer-tiers-py", Source::Script("customer-tiers-py")),
    ("customer-tiers-js", Source::Script("customer-tiers-js")),
];

pub async fn run(dir: &Path, guests: &Path, events: u64) -> anyhow::Result<()> {
    let mut components = Vec::new();
    for (name, source) in PROJECTIONS {
        let component = match source {
            Source::Rust(file) => read_guest(guests, file)?,
            Source::Script(example) => {
                let started = Instant::now();
                let component = build(example)?;
                println!(
                    "  {name:<18} built by projections/{example}/build in {:.1?}",
                    started.elapsed()
                );
                component
            }
        };
        components.push((name, component));
    }

    let store = Store::open(dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
    write_orders(&store, events).await?;
    let written = store.head();
    println!("  wrote {written} order events");

    let runtime = Runtime::new(dir.join("compiled"), Sandbox::default())?;
    for (name, component) in &components {
        let started = Instant::now();
        tokio::task::block_in_place(|| runtime.compile(component))?;
        println!(
            "  {name:<18} {:>8.1} MiB, cold compile {:.2?}",
            component.len() as f64 / (1 << 20) as f64,
            started.elapsed()
        );
    }

    // One at a time, so each has the cores to itself; compiled artifacts are cached above.
    // Deleted after their run, with what they emitted and linked.
    let projections = Projections::open(store.clone(), runtime).await?;
    for (name, component) in components {
        let started = Instant::now();
        projections
            .deploy(name, component, DeployOptions::default())
            .await?;
        caught_up(&projections, name, written).await?;
        let elapsed = started.elapsed();
        let handled = projections.status(name)?.events_processed;
        println!(
            "  {name:<18} {:>10.0} events/s ({handled} events handled, {elapsed:.2?} from deploy to caught up)",
            handled as f64 / elapsed.as_secs_f64()
        );
        // The twins link into the same streams, which belong to one projection at a time.
        projections.delete(name, true).await?;
    }
    projections.shutdown().await;
    store.shutdown().await;
    Ok(())
}

/// Runs an example's build script and reads the component whose path it prints last.
fn build(example: &str) -> anyhow::Result<Vec<u8>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../projections")
        .join(example)
        .join("build");
    let output = Command::new(&script)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{example} does not build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    let path = stdout.lines().last().context("the build printed no path")?;
    std::fs::read(path).with_context(|| format!("cannot read {path}"))
}
