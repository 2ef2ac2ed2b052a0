//! Power cuts at random moments under concurrent writers, an emitting Wasm projection and a
//! consumer group acking, on a disk that keeps only what was synced and loses or tears the rest.
//! After each cut everything opens again and must hold every acknowledged append exactly once,
//! where it was answered; no append partly; nothing that was lost at an earlier cut; positions
//! and revisions without gaps; `$ce-…` streams equal to the log; the projection's digest equal to
//! a fresh build's and each of its emits there once; no acked group message delivered again.
//! `REFRACT_POWER_CUTS` sets the number of cuts, `REFRACT_POWER_CUT_SEED` the seed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::disk::simulated::{Seeded, SimulatedDisk};
use crate::groups::{ALL, Groups, Pulled};
use crate::metrics::Metrics;
use crate::projections::component::Runtime;
use crate::projections::{DeployOptions, Projections, RunStatus};
use crate::sandbox::Sandbox;
use crate::sharding::Sharders;
use crate::store::{
    AllFilter, AppendOutcome, DATABASE_FILE, Direction, ExpectedRevision, NewEvent, RecordedEvent,
    Store, StoreError, StoreOptions, SystemIndex,
};

const DEFAULT_CUTS: u64 = 120;
const WRITERS: u64 = 4;
/// The Wasm projection (`projections/order-summary`, deployed with emits) and the fresh build
/// its digest is compared with.
const PROJECTION: &str = "orders";
/// Its emitted streams: not sent by the writers.
const EMITTED_PREFIX: &str = "notify-";
/// The consumer group, on `$all` for the `order-…` streams.
const GROUP: &str = "audit";

/// An append sent to the store, and what became of it.
struct Sent {
    stream: String,
    ids: Vec<Uuid>,
    /// The answer, when it came before the power went.
    answered: Option<AppendOutcome>,
    /// Found after a cut: it must stay.
    kept: bool,
    /// Missing after a cut: it must never appear.
    lost: bool,
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

fn open(disk: &Arc<SimulatedDisk>, options: StoreOptions) -> Store {
    let db = redb::Builder::new()
        .set_cache_size(8 << 20)
        .create_with_backend(disk.database(DATABASE_FILE))
        .expect("the database opens after a power cut");
    Store::open_on(
        db,
        PathBuf::from(DATABASE_FILE),
        Box::new(disk.directory("wal/")),
        options,
        Arc::new(Metrics::new()),
    )
    .expect("the store opens after a power cut")
}

/// Appends until the power goes, recording every request before it is sent. Orders are JSON the
/// projection reads; items are binary, some spanning many sectors.
async fn write(
    store: Store,
    writer: u64,
    seed: u64,
    sent: Arc<Mutex<Vec<Sent>>>,
    power_off: Arc<AtomicBool>,
) {
    let mut seeded = Seeded::new(seed);
    let mut created = 0;
    while !power_off.load(Ordering::SeqCst) {
        let (stream, events) = if seeded.below(2) == 0 {
            (
                format!("order-{}", seeded.below(12)),
                order_events(&mut seeded),
            )
        } else {
            created += 1;
            let events = (0..1 + seeded.below(4))
                .map(|_| {
                    let size = if seeded.below(8) == 0 { 3000 } else { 40 };
                    NewEvent {
                        id: Uuid::new_v4(),
                        event_type: "Happened".into(),
                        data: vec![b'x'; size + seeded.below(64) as usize],
                        binary: true,
                        metadata: Vec::new(),
                    }
                })
                .collect();
            (format!("item-{writer}-{seed}-{created}"), events)
        };
        let slot = {
            let mut sent = sent.lock().unwrap();
            sent.push(Sent {
                stream: stream.clone(),
                ids: events.iter().map(|event| event.id).collect(),
                answered: None,
                kept: false,
                lost: false,
            });
            sent.len() - 1
        };
        let result = store.append(stream, ExpectedRevision::Any, events).await;
        // An answer that arrives once the cut began may have been made by a dead machine.
        if let Ok(outcome) = result
            && !power_off.load(Ordering::SeqCst)
        {
            sent.lock().unwrap()[slot].answered = Some(outcome);
        }
    }
}

/// An order placed, then items and shipments (each shipment is emitted by the projection).
fn order_events(seeded: &mut Seeded) -> Vec<NewEvent> {
    let json = |event_type: &str, data: serde_json::Value| NewEvent {
        id: Uuid::new_v4(),
        event_type: event_type.into(),
        data: serde_json::to_vec(&data).unwrap(),
        binary: false,
        metadata: Vec::new(),
    };
    let mut events = vec![json(
        "OrderPlaced",
        json!({"customer_id": format!("c{}", seeded.below(5)), "total_cents": seeded.below(1000)}),
    )];
    for _ in 0..seeded.below(4) {
        events.push(if seeded.below(3) == 0 {
            json("OrderShipped", json!({}))
        } else {
            json(
                "ItemAdded",
                json!({"sku": "SKU-1", "price_cents": seeded.below(500)}),
            )
        });
    }
    events
}

/// Pulls and acks until the power goes, recording the acks answered before it went.
async fn consume(groups: Groups, acked: Arc<Mutex<HashSet<Uuid>>>, power_off: Arc<AtomicBool>) {
    while !power_off.load(Ordering::SeqCst) {
        let Ok(deliveries) = groups
            .pull(ALL, GROUP, "worker", None, 100, Duration::from_millis(20))
            .await
            .map(Pulled::into_deliveries)
        else {
            return;
        };
        let ids = deliveries.iter().map(|d| d.ack_id.clone()).collect();
        if groups.ack(ALL, GROUP, ids).await.is_ok() && !power_off.load(Ordering::SeqCst) {
            acked
                .lock()
                .unwrap()
                .extend(deliveries.iter().map(|d| d.event.id));
        }
    }
}

fn read_everything(store: &Store, stream: Option<&str>) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = Some(0);
    while let Some(start) = from {
        let slice = match stream {
            None => store.read_all(Some(start), Direction::Forward, 4096, &AllFilter::default()),
            Some(stream) => store.read_stream(stream, Some(start), Direction::Forward, 4096, true),
        };
        let slice = match slice {
            Err(StoreError::StreamNotFound(_)) => break,
            slice => slice.unwrap(),
        };
        events.extend(slice.events);
        from = slice.next;
    }
    events
}

/// Checks the reopened store against everything sent so far, then settles each append's fate.
async fn check(store: &Store, sent: &mut [Sent], cut: u64) {
    let log = read_everything(store, None);
    let mut found: HashMap<Uuid, &RecordedEvent> = HashMap::new();
    let mut next_revision: HashMap<&str, u64> = HashMap::new();
    for (position, event) in log.iter().enumerate() {
        assert_eq!(event.position, position as u64, "cut {cut}: a gap in $all");
        let revision = next_revision.entry(&event.stream).or_default();
        assert_eq!(
            event.revision, *revision,
            "cut {cut}: a gap in {}",
            event.stream
        );
        *revision += 1;
        assert!(
            found.insert(event.id, event).is_none(),
            "cut {cut}: event {} twice",
            event.id
        );
    }
    let mut known = 0;
    for append in sent.iter_mut() {
        let present = append
            .ids
            .iter()
            .filter(|id| found.contains_key(id))
            .count();
        known += present;
        assert!(
            present == 0 || present == append.ids.len(),
            "cut {cut}: {present} of the {} events of an append to {} survived",
            append.ids.len(),
            append.stream
        );
        if let Some(outcome) = &append.answered {
            assert_eq!(
                present,
                append.ids.len(),
                "cut {cut}: an acknowledged append to {} at {outcome:?} is gone (head {}, \
                 there now: {:?})",
                append.stream,
                log.len(),
                log.get(outcome.first_position as usize)
                    .map(|event| (&event.stream, event.revision))
            );
            for (offset, id) in append.ids.iter().enumerate() {
                let event = found[id];
                assert_eq!(event.stream, append.stream);
                assert_eq!(event.position, outcome.first_position + offset as u64);
                assert_eq!(event.revision, outcome.first_revision + offset as u64);
            }
        }
        if present > 0 {
            assert!(
                !append.lost,
                "cut {cut}: an append lost at an earlier cut came back"
            );
            append.kept = true;
        } else {
            assert!(
                !append.kept,
                "cut {cut}: an append found after an earlier cut is gone"
            );
            append.lost = true;
        }
    }
    let written = log
        .iter()
        .filter(|event| !event.stream.starts_with(EMITTED_PREFIX))
        .count();
    assert_eq!(known, written, "cut {cut}: events nobody sent");

    // The category index catches up in the background; then `$ce-…` is the log, filtered.
    let head = store.head();
    for _ in 0..2000 {
        if store.index_progress(SystemIndex::ByCategory).checkpoint >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for category in ["order", "item"] {
        let linked: Vec<Uuid> = read_everything(store, Some(&format!("$ce-{category}")))
            .iter()
            .map(|event| event.id)
            .collect();
        let expected: Vec<Uuid> = log
            .iter()
            .filter(|event| event.stream.starts_with(&format!("{category}-")))
            .map(|event| event.id)
            .collect();
        assert_eq!(
            linked, expected,
            "cut {cut}: $ce-{category} differs from the log"
        );
    }
}

/// Waits until projection `name` has processed the whole log and returns its digest.
async fn caught_up_digest(projections: &Projections, name: &str, cut: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = projections.status(name).unwrap();
        assert_eq!(
            status.status,
            RunStatus::Running,
            "cut {cut}: {name} stopped: {:?}",
            status.fault
        );
        if status.position == status.head_position {
            let status = projections.status_with_digest(name).await.unwrap();
            if status.position == status.head_position {
                return status.digest.unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "cut {cut}: {name} did not catch up: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The projection resumed exactly once: its read model is a fresh build's, and each shipment in
/// the log was emitted once.
async fn check_projection(store: &Store, projections: &Projections, component: &[u8], cut: u64) {
    let digest = caught_up_digest(projections, PROJECTION, cut).await;
    let fresh = format!("fresh-{cut}");
    let options = DeployOptions {
        emit: false,
        ..DeployOptions::default()
    };
    projections
        .deploy(&fresh, component.to_vec(), options)
        .await
        .unwrap();
    let fresh_digest = caught_up_digest(projections, &fresh, cut).await;
    projections.delete(&fresh, false).await.unwrap();
    assert_eq!(
        digest, fresh_digest,
        "cut {cut}: the projection's read model differs from a fresh build's"
    );

    let mut shipped: HashMap<String, u64> = HashMap::new();
    let mut notified: HashMap<String, u64> = HashMap::new();
    for event in read_everything(store, None) {
        if event.event_type == "OrderShipped" {
            *shipped.entry(event.stream).or_default() += 1;
        } else if event.stream.starts_with(EMITTED_PREFIX) {
            let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
            let order = data["order"].as_str().unwrap().to_owned();
            *notified.entry(order).or_default() += 1;
        }
    }
    assert_eq!(
        shipped, notified,
        "cut {cut}: emits differ from the shipments (stream: count)"
    );
}

/// Drains the group, acking: nothing acked before may come again.
async fn check_group(groups: &Groups, acked: &Mutex<HashSet<Uuid>>, cut: u64) {
    let consumer = format!("check-{cut}");
    loop {
        let deliveries = groups
            .pull(ALL, GROUP, &consumer, None, 500, Duration::from_millis(100))
            .await
            .map(Pulled::into_deliveries)
            .unwrap();
        if deliveries.is_empty() {
            return;
        }
        {
            let mut acked = acked.lock().unwrap();
            for delivery in &deliveries {
                assert!(
                    !acked.contains(&delivery.event.id),
                    "cut {cut}: acked message {} at {} delivered again",
                    delivery.event.id,
                    delivery.event.position
                );
            }
            acked.extend(deliveries.iter().map(|delivery| delivery.event.id));
        }
        let ids = deliveries.into_iter().map(|d| d.ack_id).collect();
        groups.ack(ALL, GROUP, ids).await.unwrap();
    }
}

/// `projections/order-summary` built for `wasm32-wasip2` (into the target directory the
/// black-box tests build the guests in).
fn order_summary() -> Vec<u8> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = workspace.join("target").join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "--quiet", "--locked", "--profile", "guest"])
        .args(["--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target_dir)
        .args(["-p", "order-summary"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building order-summary failed");
    let file = target_dir.join("wasm32-wasip2/guest/order_summary.wasm");
    std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()))
}

/// The store, its projections and its groups, as a server runs them.
struct Node {
    store: Store,
    projections: Projections,
    groups: Groups,
}

impl Node {
    async fn open(disk: &Arc<SimulatedDisk>, options: StoreOptions, runtime: &Runtime) -> Node {
        let store = open(disk, options);
        let sharders = Sharders::open(store.clone(), runtime.guest_engine().clone())
            .await
            .unwrap();
        let projections = Projections::open(store.clone(), runtime.clone())
            .await
            .unwrap();
        let groups = Groups::open(store.clone(), sharders).await.unwrap();
        Node {
            store,
            projections,
            groups,
        }
    }

    /// Deploys the projection (emitting) and creates the group, on a new store.
    async fn set_up(&self, component: &[u8]) {
        let options = DeployOptions {
            emit: true,
            ..DeployOptions::default()
        };
        self.projections
            .deploy(PROJECTION, component.to_vec(), options)
            .await
            .unwrap();
        let settings = crate::groups::settings::Settings {
            start_from: crate::groups::settings::StartFrom::At(0),
            stream_prefix: Some("order-".into()),
            ..Default::default()
        };
        self.groups.put(ALL, GROUP, settings).await.unwrap();
    }

    async fn check(
        &self,
        sent: &mut [Sent],
        acked: &Mutex<HashSet<Uuid>>,
        component: &[u8],
        cut: u64,
    ) {
        check(&self.store, sent, cut).await;
        check_projection(&self.store, &self.projections, component, cut).await;
        check_group(&self.groups, acked, cut).await;
    }

    async fn shutdown(self) {
        self.groups.shutdown().await;
        self.projections.shutdown().await;
        self.store.shutdown().await;
    }
}

#[test]
fn acknowledged_writes_survive_power_cuts() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async { tokio::spawn(power_cuts()).await });
    // A failed check leaves the node's runners and threads waiting on each other: report the
    // failure rather than wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

async fn power_cuts() {
    let cuts = env_number("REFRACT_POWER_CUTS", DEFAULT_CUTS);
    let seed = env_number("REFRACT_POWER_CUT_SEED", 0x5eed);
    let mut seeded = Seeded::new(seed);
    let component = order_summary();
    let compiled = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(compiled.path().to_path_buf(), Sandbox::default()).unwrap();
    let disk = SimulatedDisk::new();
    let mut sent: Vec<Sent> = Vec::new();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut acknowledged = 0;
    for cut in 0..cuts {
        let options = StoreOptions {
            // Checkpoints from every commit to none before the cut.
            checkpoint_interval: Duration::from_millis(seeded.below(40)),
            cache_bytes: 8 << 20,
            // Small segments, so cuts land while segments roll over and are dropped.
            log_segment_bytes: 256 << 10,
            quick_repair: seeded.below(2) == 0,
            ..StoreOptions::default()
        };
        let node = Node::open(&disk, options, &runtime).await;
        if cut == 0 {
            node.set_up(&component).await;
        }
        node.check(&mut sent, &acked, &component, cut).await;

        let shared = Arc::new(Mutex::new(std::mem::take(&mut sent)));
        let power_off = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                tokio::spawn(write(
                    node.store.clone(),
                    writer,
                    seeded.number(),
                    shared.clone(),
                    power_off.clone(),
                ))
            })
            .collect();
        let consumer = tokio::spawn(consume(
            node.groups.clone(),
            acked.clone(),
            power_off.clone(),
        ));
        tokio::time::sleep(Duration::from_micros(200 + seeded.below(30_000))).await;
        power_off.store(true, Ordering::SeqCst);
        disk.power_cut(&mut seeded);
        for writer in writers {
            writer.await.unwrap();
        }
        consumer.await.unwrap();
        node.shutdown().await;
        sent = Arc::into_inner(shared).unwrap().into_inner().unwrap();
        acknowledged = sent
            .iter()
            .filter(|append| append.answered.is_some())
            .count();
    }
    let options = StoreOptions {
        log_segment_bytes: 256 << 10,
        ..StoreOptions::default()
    };
    let node = Node::open(&disk, options, &runtime).await;
    node.check(&mut sent, &acked, &component, cuts).await;
    let kept = sent.iter().filter(|append| append.kept).count();
    let lost = sent.iter().filter(|append| append.lost).count();
    let acks = acked.lock().unwrap().len();
    println!(
        "{cuts} power cuts: {} appends sent, {acknowledged} acknowledged, {kept} kept, {lost} \
         lost (none acknowledged); {acks} group messages acked, none delivered again",
        sent.len()
    );
    node.shutdown().await;
    // The test is only worth something if cuts did land between writes and syncs.
    assert!(acknowledged > 0 && kept > acknowledged && lost > 0 && acks > 0);
}

/// With fsync off, answers come before the log is synced; the checkpoint that makes the writes
/// durable must not wait for a next write. Twenty appends, then quiet, then a cut: all twenty
/// are there. Without a checkpoint after them, the cut would keep each unsynced log write
/// whole only by chance.
#[test]
fn without_fsync_a_quiet_store_still_checkpoints() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let disk = SimulatedDisk::new();
        let options = || StoreOptions {
            durable: false,
            checkpoint_interval: Duration::from_millis(20),
            cache_bytes: 8 << 20,
            ..StoreOptions::default()
        };
        let store = open(&disk, options());
        for number in 0..20 {
            let event = NewEvent {
                id: Uuid::new_v4(),
                event_type: "Happened".into(),
                data: format!("{{\"number\":{number}}}").into_bytes(),
                binary: false,
                metadata: Vec::new(),
            };
            store
                .append(
                    format!("quiet-{number}"),
                    ExpectedRevision::Any,
                    vec![event],
                )
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        disk.power_cut(&mut Seeded::new(7));
        drop(store);
        let store = open(&disk, options());
        assert_eq!(read_everything(&store, None).len(), 20);
    });
}
