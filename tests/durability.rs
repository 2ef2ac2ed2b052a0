//! Crash safety and optimistic concurrency against the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

/// A batch a writer sent: its stream, its event ids, and whether the server acknowledged it.
type SentBatch = (String, Vec<String>, bool);

/// Many writers, `kill -9` mid-load, restart: every acknowledged event is there, positions have no
/// gaps, and every batch is either wholly present or wholly absent. Twice, on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_acknowledged_event_and_shows_no_partial_batch() {
    crash_and_check(&[]).await;
}

/// The same without redb's quick repair, which changes how a crashed file is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_without_quick_repair_loses_nothing_either() {
    crash_and_check(&["--quick-repair=false"]).await;
}

async fn crash_and_check(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let batches: Arc<Mutex<Vec<SentBatch>>> = Arc::default();
    for round in 0..2 {
        let mut server = Server::start_in(dir.path(), args);
        let mut writers = Vec::new();
        for writer in 0..24 {
            let base = server.base.clone();
            let batches = batches.clone();
            writers.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for sequence in 0.. {
                    let stream = if writer % 3 == 0 { "shared-1".to_owned() } else { format!("crash-{writer}") };
                    let size = 1 + (writer + sequence) % 7;
                    let ids: Vec<String> = (0..size)
                        .map(|n| format!("{round:08}-{writer:04}-4000-8000-{sequence:06}{n:06}"))
                        .collect();
                    let events: Vec<Value> =
                        ids.iter().map(|id| json!({"id": id, "type": "Crash", "data": {"pad": "x".repeat(300)}})).collect();
                    let index = {
                        let mut batches = batches.lock().unwrap();
                        batches.push((stream.clone(), ids, false));
                        batches.len() - 1
                    };
                    let response =
                        client.post(format!("{base}/streams/{stream}")).json(&events).send().await;
                    match response {
                        Ok(response) if response.status() == 200 => {
                            batches.lock().unwrap()[index].2 = true;
                        }
                        Ok(response) => panic!("unexpected status {}", response.status()),
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.kill();
        for writer in writers {
            writer.await.unwrap();
        }
    }

    let server = Server::start_in(dir.path(), args);
    let all = server.read_everything("$all").await;
    let positions: Vec<u64> = all
        .iter()
        .map(|event| event["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "positions have gaps"
    );
    let stored: HashMap<String, (String, u64)> = all
        .iter()
        .map(|event| {
            let id = event["id"].as_str().unwrap().to_owned();
            (
                id,
                (
                    event["stream"].as_str().unwrap().to_owned(),
                    event["revision"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(stored.len(), all.len(), "an event is stored twice");

    let batches = std::mem::take(&mut *batches.lock().unwrap());
    let acknowledged = batches.iter().filter(|batch| batch.2).count();
    assert!(
        acknowledged > 50,
        "only {acknowledged} batches were acknowledged before the kills"
    );
    for (stream, ids, was_acknowledged) in batches.iter() {
        let present = ids.iter().filter(|id| stored.contains_key(*id)).count();
        if *was_acknowledged {
            assert_eq!(
                present,
                ids.len(),
                "an acknowledged batch of {stream} is missing events"
            );
        } else {
            assert!(
                present == 0 || present == ids.len(),
                "a partial batch of {stream} is visible"
            );
        }
        if present == ids.len() {
            // A batch sits at consecutive revisions of its stream.
            let revisions: Vec<u64> = ids.iter().map(|id| stored[id].1).collect();
            let first = revisions[0];
            assert_eq!(
                revisions,
                (first..first + ids.len() as u64).collect::<Vec<_>>()
            );
            assert!(ids.iter().all(|id| &stored[id].0 == stream));
        }
    }
    // Streams read back exactly as $all says.
    let crash_3 = server.read_everything("crash-1").await;
    let revisions: Vec<u64> = crash_3
        .iter()
        .map(|event| event["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, (0..crash_3.len() as u64).collect::<Vec<_>>());
}

/// Clients race on one stream with exact expected revisions: each revision has exactly one
/// winner; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_writer_wins_each_revision() {
    let server = Arc::new(Server::start());
    const CLIENTS: usize = 12;
    const WINS_EACH: usize = 15;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0;
            let mut expected = "no_stream".to_owned();
            while won.len() < WINS_EACH {
                let id = format!("00000000-0000-4000-8000-{client:06}{:06}", won.len());
                let request = server
                    .http
                    .post(server.url("/streams/race-1"))
                    .header("Expected-Revision", &expected)
                    .json(&json!({"id": id, "type": "Won", "data": {"client": client}}));
                let (status, body) = common::status_and_json(request.send().await.unwrap()).await;
                match status {
                    200 => {
                        let revision = body["first_revision"].as_u64().unwrap();
                        won.push((id, revision));
                        expected = revision.to_string();
                    }
                    409 => {
                        conflicts += 1;
                        expected = body["actual"]
                            .as_u64()
                            .map_or("no_stream".into(), |r| r.to_string());
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            (won, conflicts)
        }));
    }
    let mut claimed = HashMap::new();
    let mut conflicts = 0;
    for client in clients {
        let (won, client_conflicts) = client.await.unwrap();
        conflicts += client_conflicts;
        for (id, revision) in won {
            assert!(
                claimed.insert(revision, id).is_none(),
                "revision {revision} won twice"
            );
        }
    }
    assert!(conflicts > 0, "the clients never raced");
    let events = server.read_everything("race-1").await;
    assert_eq!(events.len(), CLIENTS * WINS_EACH);
    let ids: HashSet<&str> = events
        .iter()
        .map(|event| event["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len());
    for event in &events {
        let revision = event["revision"].as_u64().unwrap();
        assert_eq!(claimed[&revision], event["id"].as_str().unwrap());
    }
}
