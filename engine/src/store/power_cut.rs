//! Power cuts at random moments under concurrent writers, on a disk that keeps only what was
//! synced and loses or tears the rest. After each cut the store opens again and must hold every
//! acknowledged append exactly once, where it was answered; no append partly; nothing that was
//! lost at an earlier cut; positions and revisions without gaps; `$ce-…` streams equal to the
//! log. `REFRACT_POWER_CUTS` sets the number of cuts, `REFRACT_POWER_CUT_SEED` the seed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::*;
use crate::disk::simulated::{Seeded, SimulatedDisk};

const DEFAULT_CUTS: u64 = 120;
const WRITERS: u64 = 4;

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

/// Appends until the power goes, recording every request before it is sent.
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
        let stream = if seeded.below(2) == 0 {
            format!("order-{}", seeded.below(12))
        } else {
            created += 1;
            format!("item-{writer}-{seed}-{created}")
        };
        let events: Vec<NewEvent> = (0..1 + seeded.below(4))
            .map(|_| {
                // Mostly small events, some spanning many sectors.
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
    assert_eq!(known, log.len(), "cut {cut}: events nobody sent");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_power_cuts() {
    let cuts = env_number("REFRACT_POWER_CUTS", DEFAULT_CUTS);
    let seed = env_number("REFRACT_POWER_CUT_SEED", 0x5eed);
    let mut seeded = Seeded::new(seed);
    let disk = SimulatedDisk::new();
    let mut sent: Vec<Sent> = Vec::new();
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
        let store = open(&disk, options);
        check(&store, &mut sent, cut).await;

        let shared = Arc::new(Mutex::new(std::mem::take(&mut sent)));
        let power_off = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                tokio::spawn(write(
                    store.clone(),
                    writer,
                    seeded.number(),
                    shared.clone(),
                    power_off.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_micros(200 + seeded.below(30_000))).await;
        power_off.store(true, Ordering::SeqCst);
        disk.power_cut(&mut seeded);
        for writer in writers {
            writer.await.unwrap();
        }
        store.shutdown().await;
        drop(store);
        sent = Arc::into_inner(shared).unwrap().into_inner().unwrap();
        acknowledged = sent
            .iter()
            .filter(|append| append.answered.is_some())
            .count();
    }
    let store = open(
        &disk,
        StoreOptions {
            log_segment_bytes: 256 << 10,
            ..StoreOptions::default()
        },
    );
    check(&store, &mut sent, cuts).await;
    let kept = sent.iter().filter(|append| append.kept).count();
    let lost = sent.iter().filter(|append| append.lost).count();
    println!(
        "{cuts} power cuts: {} appends sent, {acknowledged} acknowledged, {kept} kept, {lost} \
         lost (none acknowledged)",
        sent.len()
    );
    // The test is only worth something if cuts did land between writes and syncs.
    assert!(acknowledged > 0 && kept > acknowledged && lost > 0);
}
