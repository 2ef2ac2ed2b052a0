//! Rebuilds: the time to rebuild `event-counter` and `order-summary` beside their live versions
//! until the switch, next to a raw scan of the same log in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wasm_projections::{read_guest, write_orders};
use refract::metrics::Metrics;
use refract::projections::component::Runtime;
use refract::projections::{DeployOptions, Emitted, Projections};
use refract::sandbox::Sandbox;
use refract::store::{Store, StoreOptions};

pub async fn run(dir: &Path, guests: &Path, sizes: &[u64]) -> anyhow::Result<()> {
    let guests = [
        ("event-counter", read_guest(guests, "event_counter")?),
        ("order-summary", read_guest(guests, "order_summary")?),
    ];
    for &events in sizes {
        let dir = dir.join(format!("rebuild-{events}"));
        let store = Store::open(&dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
        write_orders(&store, events).await?;
        let head = store.head();
        let started = Instant::now();
        let mut scanned = 0u64;
        tokio::task::block_in_place(|| {
            store.scan_log(0, head, |_, record| {
                std::hint::black_box(record);
                scanned += 1;
                true
            })
        })?;
        let scan = started.elapsed();
        let scan_rate = scanned as f64 / scan.as_secs_f64();
        println!("  {head} events: raw $all scan {scan:.2?} ({scan_rate:.0} events/s)");
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        let worker_counts = if cores > 1 { vec![1, cores] } else { vec![1] };
        // order-summary with one worker: the time and digest the parallel rebuild is held to.
        let mut sequential = None;
        for workers in worker_counts {
            let runtime = Runtime::new(dir.join("compiled"), Sandbox::default())?
                .with_partition_workers(workers);
            let projections = Projections::open(store.clone(), runtime).await?;
            for (name, component) in &guests {
                // event-counter has one partition: workers change nothing for it.
                if workers > 1 && *name == "event-counter" {
                    continue;
                }
                projections
                    .deploy(name, component.clone(), DeployOptions::default())
                    .await?;
                wait(&projections, name, head, false).await?;
                let started = Instant::now();
                projections.rebuild(name, Emitted::Keep).await?;
                wait(&projections, name, head, true).await?;
                let rebuild = started.elapsed();
                let rate = head as f64 / rebuild.as_secs_f64();
                println!(
                    "  {name:<14} {workers} worker(s), rebuild until the switch: {rebuild:.2?} ({rate:.0} events/s, {:.2} of the raw scan's rate)",
                    rate / scan_rate
                );
                let status = projections.status_with_digest(name).await?;
                let digest = status.digest.unwrap_or_default();
                println!("    digest {digest}");
                if *name == "order-summary" {
                    match (&sequential, status.parallel) {
                        (None, _) => sequential = Some((rebuild, digest)),
                        (Some((time, expected)), Some(parallel)) => {
                            anyhow::ensure!(
                                *expected == digest,
                                "{workers} workers built a model other than 1 worker's"
                            );
                            println!(
                                "    {:.2}x the 1-worker rebuild, same digest; {:.1}% of events kept as run in parallel, {:.1}% run again in order",
                                time.as_secs_f64() / rebuild.as_secs_f64(),
                                100.0 * parallel.parallel_events as f64 / head as f64,
                                100.0 * parallel.rerun_events as f64 / head as f64,
                            );
                        }
                        (Some(_), None) => {}
                    }
                }
                projections.delete(name, true).await?;
            }
            projections.shutdown().await;
        }
        store.shutdown().await;
    }
    Ok(())
}

/// Waits until `name` has processed the log up to `head` (and, with `rebuilt`, switched).
async fn wait(
    projections: &Projections,
    name: &str,
    head: u64,
    rebuilt: bool,
) -> anyhow::Result<()> {
    loop {
        let status = projections.status(name)?;
        if let Some(fault) = status.fault {
            anyhow::bail!("{name} faulted: {}", fault.message);
        }
        if let Some(fault) = status.rebuild.as_ref().and_then(|r| r.fault.as_ref()) {
            anyhow::bail!("the rebuild of {name} faulted: {}", fault.message);
        }
        if status.position >= head && (!rebuilt || status.rebuild.is_none()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
