//! Wasm projections: events/s from deploy to caught-up for `event-counter` and `order-summary`,
//! next to the same logic in native Rust over the same store and the same commit path (read the
//! log in batches, keep state and rows per batch, commit them with the checkpoint), plus the
//! cold compile and the warm restart of deployed projections.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use refract::metrics::Metrics;
use refract::projections::component::Runtime;
use refract::projections::{DeployOptions, Projections};
use refract::sandbox::Sandbox;
use refract::store::EventRecord;
use refract::store::IndexConfig;
use refract::store::{Checkpoint, DataChange, ProjectionCommit, RowChange};
use refract::store::{ExpectedRevision, NewEvent, Store, StoreOptions};

/// Events per commit, as the Wasm runner batches them.
const BATCH_EVENTS: usize = 4096;

pub async fn run(dir: &Path, guests: &Path, events: u64) -> anyhow::Result<()> {
    let counter = read_guest(guests, "event_counter")?;
    let orders = read_guest(guests, "order_summary")?;

    let store = Store::open(dir, StoreOptions::default(), Arc::new(Metrics::new()))?;
    let started = Instant::now();
    write_orders(&store, events).await?;
    let written = store.head();
    println!(
        "  wrote {written} order events in {:.2?}",
        started.elapsed()
    );

    let cache = dir.join("compiled");
    let started = Instant::now();
    let runtime = Runtime::new(cache.clone(), Sandbox::default())?;
    let compiled = tokio::task::block_in_place(|| runtime.compile(&orders))?;
    println!(
        "  cold compile of order-summary ({} KiB): {:.2?}",
        orders.len() >> 10,
        started.elapsed()
    );
    drop(compiled);

    let projections = Projections::open(store.clone(), runtime.clone()).await?;
    let mut wasm_rates = HashMap::new();
    for (name, component) in [("event-counter", &counter), ("order-summary", &orders)] {
        let started = Instant::now();
        projections
            .deploy(name, component.clone(), DeployOptions::default())
            .await?;
        caught_up(&projections, name, written).await?;
        let elapsed = started.elapsed();
        let rate = processed(&projections, name)? as f64 / elapsed.as_secs_f64();
        wasm_rates.insert(name, rate);
        println!(
            "  {name:<14} wasm:   {:>10.0} events/s ({} events handled, {written} scanned, {elapsed:.2?} from deploy to caught up)",
            rate,
            processed(&projections, name)?,
        );
    }

    for (name, logic) in [
        ("event-counter", Logic::Counter),
        ("order-summary", Logic::Orders),
    ] {
        let started = Instant::now();
        let handled = native(&store, name, logic).await?;
        let elapsed = started.elapsed();
        let rate = handled as f64 / elapsed.as_secs_f64();
        println!(
            "  {name:<14} native: {rate:>10.0} events/s ({elapsed:.2?}); wasm/native = {:.2}",
            wasm_rates[name] / rate
        );
    }

    projections.shutdown().await;
    let started = Instant::now();
    let runtime = Runtime::new(cache, Sandbox::default())?;
    let reopened = Projections::open(store.clone(), runtime).await?;
    let elapsed = started.elapsed();
    println!(
        "  warm restart of 2 deployed projections (cached artifacts): {elapsed:.2?} ({:.2?} per projection)",
        elapsed / 2
    );
    reopened.shutdown().await;
    store.shutdown().await;
    Ok(())
}

/// A built guest's component, e.g. `event_counter`.
pub(super) fn read_guest(guests: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = guests.join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; build the guests first: cargo build --profile guest \
             --target wasm32-wasip2 -p event-counter -p order-summary",
            path.display()
        )
    })
}

/// Waits until projection `name` has read up to `position`; an error if it faults.
pub(super) async fn caught_up(
    projections: &Projections,
    name: &str,
    position: u64,
) -> anyhow::Result<()> {
    loop {
        let status = projections.status(name)?;
        if let Some(fault) = status.fault {
            anyhow::bail!("{name} faulted: {}", fault.message);
        }
        if status.position >= position {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn processed(projections: &Projections, name: &str) -> anyhow::Result<u64> {
    Ok(projections.status(name)?.events_processed)
}

/// Orders of seven events (placed, five items, shipped), each of one of 10,000 customers
/// picked at random (the same for every run).
/// A well-mixed hash (SplitMix64's finalizer) of the order number, modulo 10,000.
fn customer_of(order: u64) -> u64 {
    let mut z = order.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % 10_000
}

pub(super) async fn write_orders(store: &Store, events: u64) -> anyhow::Result<()> {
    let orders = events.div_ceil(7);
    let writers = 8;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut order = writer;
            while order < orders {
                let json = |event_type: &str, data: serde_json::Value| NewEvent {
                    id: uuid::Uuid::new_v4(),
                    event_type: event_type.to_owned(),
                    data: serde_json::to_vec(&data).expect("JSON"),
                    binary: false,
                    metadata: Vec::new(),
                };
                let mut batch = vec![json(
                    "OrderPlaced",
                    serde_json::json!({"customer_id": format!("customer-{}", customer_of(order)), "total_cents": 1000 + order % 5000}),
                )];
                for item in 0..5 {
                    batch.push(json(
                        "ItemAdded",
                        serde_json::json!({"sku": format!("SKU-{item:04}"), "price_cents": 100 + item * 10}),
                    ));
                }
                batch.push(json("OrderShipped", serde_json::json!({})));
                store
                    .append(format!("order-{order}"), ExpectedRevision::Any, batch)
                    .await?;
                order += writers;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Logic {
    Counter,
    Orders,
}

#[derive(Default, Serialize, Deserialize)]
struct Counts {
    count: u64,
    by_type: BTreeMap<String, u64>,
}

#[derive(Default, Serialize, Deserialize)]
struct Order {
    customer_id: String,
    lines: u64,
    total_cents: i64,
    status: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Customer {
    orders: i64,
    total_cents: i64,
}

#[derive(Deserialize)]
struct OrderPlaced {
    customer_id: String,
    total_cents: i64,
}

#[derive(Deserialize)]
struct ItemAdded {
    #[allow(dead_code)]
    sku: String,
    price_cents: i64,
}

/// One batch's state and rows, as the guest SDK and the Wasm host keep them: typed states
/// loaded once per partition and written back at the end, rows read and written as JSON.
struct NativeBatch<'a> {
    view: &'a refract::store::ProjectionView,
    counts: Option<Counts>,
    orders: HashMap<String, Order>,
    rows: HashMap<(String, String), Option<Vec<u8>>>,
}

impl NativeBatch<'_> {
    fn stored<T: Default + for<'de> Deserialize<'de>>(&self, partition: &str) -> anyhow::Result<T> {
        Ok(match self.view.state(partition)? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => T::default(),
        })
    }

    fn customer(&self, key: &str) -> anyhow::Result<Customer> {
        let bytes = match self.rows.get(&("by_customer".into(), key.into())) {
            Some(bytes) => bytes.clone(),
            None => self.view.row("by_customer", key)?,
        };
        Ok(match bytes {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Customer::default(),
        })
    }

    fn update_customer(&mut self, key: &str, orders: i64, cents: i64) -> anyhow::Result<()> {
        let mut customer = self.customer(key)?;
        customer.orders += orders;
        customer.total_cents += cents;
        self.rows.insert(
            ("by_customer".into(), key.to_owned()),
            Some(serde_json::to_vec(&customer)?),
        );
        Ok(())
    }

    fn states(self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut states = Vec::new();
        if let Some(counts) = &self.counts {
            states.push((String::new(), serde_json::to_vec(counts)?));
        }
        for (stream, order) in &self.orders {
            states.push((stream.clone(), serde_json::to_vec(order)?));
        }
        Ok(states)
    }
}

fn apply(batch: &mut NativeBatch, logic: Logic, event: &OwnedEvent) -> anyhow::Result<()> {
    match logic {
        Logic::Counter => {
            if batch.counts.is_none() {
                batch.counts = Some(batch.stored("")?);
            }
            let counts = batch.counts.as_mut().expect("loaded");
            counts.count += 1;
            match counts.by_type.get_mut(&event.event_type) {
                Some(count) => *count += 1,
                None => {
                    counts.by_type.insert(event.event_type.clone(), 1);
                }
            }
            Ok(())
        }
        Logic::Orders => {
            if !batch.orders.contains_key(&event.stream) {
                let order = batch.stored(&event.stream)?;
                batch.orders.insert(event.stream.clone(), order);
            }
            let mut order = batch.orders.remove(&event.stream).expect("loaded");
            match event.event_type.as_str() {
                "OrderPlaced" => {
                    let placed: OrderPlaced = serde_json::from_slice(&event.data)?;
                    order = Order {
                        customer_id: placed.customer_id,
                        lines: 0,
                        total_cents: placed.total_cents,
                        status: "placed".into(),
                    };
                    batch.update_customer(&order.customer_id, 1, placed.total_cents)?;
                }
                "ItemAdded" => {
                    let item: ItemAdded = serde_json::from_slice(&event.data)?;
                    order.lines += 1;
                    order.total_cents += item.price_cents;
                    batch.update_customer(&order.customer_id, 0, item.price_cents)?;
                }
                "OrderShipped" => order.status = "shipped".into(),
                _ => {}
            }
            batch.orders.insert(event.stream.clone(), order);
            Ok(())
        }
    }
}

/// What the native runner copies out of the log, as the Wasm host copies it for the guest.
struct OwnedEvent {
    stream: String,
    event_type: String,
    data: Vec<u8>,
}

fn selects(logic: Logic, config: &IndexConfig, record: &EventRecord) -> bool {
    match logic {
        Logic::Counter => !record.stream.starts_with('$'),
        Logic::Orders => config.category(record.stream) == Some("order"),
    }
}

/// The native projection from position 0 to the head; returns the events it handled.
async fn native(store: &Store, name: &str, logic: Logic) -> anyhow::Result<u64> {
    let data = store
        .save_projection(
            format!("native-{name}"),
            format!("native-{name}"),
            serde_json::json!({}),
            Some(b"native".to_vec()),
            DataChange::Fresh {
                delete_outputs: false,
            },
        )
        .await?;
    let config = store.index_config()?;
    let head = store.head();
    let mut checkpoint = Checkpoint::default();
    while checkpoint.position < head {
        let (events, to) = tokio::task::block_in_place(|| {
            let mut events = Vec::new();
            let mut to = head;
            store.scan_log(checkpoint.position, head, |position, record| {
                if selects(logic, &config, &record) {
                    events.push(OwnedEvent {
                        stream: record.stream.to_owned(),
                        event_type: record.event_type.to_owned(),
                        data: record.data.to_vec(),
                    });
                    if events.len() == BATCH_EVENTS {
                        to = position + 1;
                        return false;
                    }
                }
                true
            })?;
            anyhow::Ok((events, to))
        })?;
        let (states, rows) = tokio::task::block_in_place(|| {
            let view = store.projection_view(data)?;
            let mut batch = NativeBatch {
                view: &view,
                counts: None,
                orders: HashMap::new(),
                rows: HashMap::new(),
            };
            for event in &events {
                apply(&mut batch, logic, event)?;
            }
            let rows: Vec<RowChange> = batch.rows.drain().collect();
            anyhow::Ok((batch.states()?, rows))
        })?;
        let next = Checkpoint {
            position: to,
            events_processed: checkpoint.events_processed + events.len() as u64,
            events_emitted: 0,
        };
        store
            .commit_projection(ProjectionCommit {
                projection: format!("native-{name}"),
                shadow: false,
                data,
                from: checkpoint.position,
                checkpoint: next,
                states,
                rows,
                emits: Vec::new(),
                links: Vec::new(),
                parked: Vec::new(),
            })
            .await?;
        checkpoint = next;
    }
    store
        .remove_projection(format!("native-{name}"), false)
        .await?;
    Ok(checkpoint.events_processed)
}
