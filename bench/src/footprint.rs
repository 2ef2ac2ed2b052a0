//! Bytes on disk per event, for the PostgreSQL peer's own events (`../shared/peers/pg.sh`): single
//! events each to a new stream, and batches of 1,000 to one stream. Measured in database pages in
//! use, per table, once the system projections have indexed every event.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refract::metrics::Metrics;
use refract::store::{
    DATABASE_FILE, ExpectedRevision, NewEvent, Store, StoreOptions, SystemIndex, WAL_DIR,
};

/// Concurrent writers of the single-event workload, so that it runs at the store's group-commit
/// speed rather than one sync per event.
const SINGLE_WRITERS: u64 = 256;

pub async fn run(dir: &Path, singles: u64, batches: u64) -> anyhow::Result<()> {
    let store = Store::open(dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
    let mut tables = Tables::measure(&store).await?;

    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..SINGLE_WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut order = writer;
            while order < singles {
                let event = peer_event(
                    "OrderPlaced",
                    r#"{"customer_id":"c1","total_cents":1234}"#,
                    r#"{"$correlationId":"x"}"#,
                );
                store
                    .append(format!("order-{order}"), ExpectedRevision::Any, vec![event])
                    .await?;
                order += SINGLE_WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    indexed(&store).await;
    let after_singles = Tables::measure(&store).await?;
    println!(
        "  single events, each to a new stream: {singles} in {:.1?}",
        started.elapsed()
    );
    after_singles.report_growth(&tables, singles);
    tables = after_singles;

    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut batch = writer;
            while batch < batches {
                let events = (0..1000)
                    .map(|_| peer_event("Tick", r#"{"i":1,"customer_id":"c1"}"#, "{}"))
                    .collect();
                store
                    .append(format!("load-{batch}"), ExpectedRevision::Any, events)
                    .await?;
                batch += 4;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    indexed(&store).await;
    let after_batches = Tables::measure(&store).await?;
    println!(
        "  batches of 1,000 to one stream each: {} events in {:.1?}",
        batches * 1000,
        started.elapsed()
    );
    after_batches.report_growth(&tables, batches * 1000);

    let events = singles + batches * 1000;
    store.shutdown().await;
    drop(store);
    let file = std::fs::metadata(dir.join(DATABASE_FILE))?.len();
    let log: u64 = std::fs::read_dir(dir.join(WAL_DIR))?
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    println!(
        "  both: {:.0} B/event in pages in use; the database file {:.0} B/event ({} MiB), the log \
         {} MiB after the last checkpoint",
        after_batches.total() as f64 / events as f64,
        file as f64 / events as f64,
        file >> 20,
        log >> 20
    );
    Ok(())
}

/// The event the peer inserts; the store takes JSON as text, as PostgreSQL's `jsonb` input.
fn peer_event(event_type: &str, data: &str, metadata: &str) -> NewEvent {
    NewEvent {
        id: uuid::Uuid::new_v4(),
        event_type: event_type.to_owned(),
        data: data.as_bytes().to_vec(),
        binary: false,
        metadata: if metadata == "{}" {
            Vec::new()
        } else {
            metadata.as_bytes().to_vec()
        },
    }
}

/// Waits until every system projection has indexed every event.
async fn indexed(store: &Store) {
    while SystemIndex::ALL
        .iter()
        .any(|index| store.index_progress(*index).checkpoint < store.head())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pages in use per table.
struct Tables(Vec<(String, u64)>);

impl Tables {
    async fn measure(store: &Store) -> anyhow::Result<Tables> {
        Ok(Tables(store.blocking(|store| store.table_bytes()).await?))
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, bytes)| bytes).sum()
    }

    fn bytes(&self, table: &str) -> u64 {
        self.0
            .iter()
            .find(|(name, _)| name == table)
            .map_or(0, |(_, bytes)| *bytes)
    }

    fn report_growth(&self, before: &Tables, events: u64) {
        let per_event = |bytes: u64| bytes as f64 / events as f64;
        let growth = self.total().saturating_sub(before.total());
        let tables: Vec<String> = self
            .0
            .iter()
            .map(|(name, bytes)| (name, bytes.saturating_sub(before.bytes(name))))
            .filter(|(_, grown)| per_event(*grown) >= 0.5)
            .map(|(name, grown)| format!("{name} {:.0}", per_event(grown)))
            .collect();
        println!(
            "    {:.0} B/event in pages in use ({})",
            per_event(growth),
            tables.join(", ")
        );
    }
}
