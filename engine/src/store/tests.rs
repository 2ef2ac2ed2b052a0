use std::sync::Arc;

use super::*;

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default(), Arc::new(Metrics::new())).unwrap()
}

fn event(event_type: &str) -> NewEvent {
    NewEvent {
        id: Uuid::new_v4(),
        event_type: event_type.into(),
        data: br#"{"n":1}"#.to_vec(),
        binary: false,
        metadata: Vec::new(),
    }
}

fn events(count: usize) -> Vec<NewEvent> {
    (0..count).map(|n| event(&format!("Type{n}"))).collect()
}

fn read(store: &Store, stream: &str) -> Result<Slice, StoreError> {
    store.read_stream(stream, None, Direction::Forward, 4096, true)
}

fn revisions(slice: &Slice) -> Vec<u64> {
    slice.events.iter().map(|event| event.revision).collect()
}

#[test]
fn revisions_in_text_are_one_to_nineteen_digits() {
    assert_eq!(parse_revision("0"), Some(0));
    assert_eq!(
        parse_revision("9999999999999999999"),
        Some(9_999_999_999_999_999_999)
    );
    for refused in ["10000000000000000000", "+5", " 5", "", "5 ", "x"] {
        assert_eq!(parse_revision(refused), None, "{refused:?}");
    }
    assert_eq!("7".parse(), Ok(ExpectedRevision::Exact(7)));
    assert!("+7".parse::<ExpectedRevision>().is_err());
}

#[tokio::test]
async fn appends_get_gap_free_positions_and_per_stream_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store
        .append("a-1".into(), ExpectedRevision::Any, events(2))
        .await
        .unwrap();
    let b = store
        .append("b-1".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let c = store
        .append("a-1".into(), ExpectedRevision::Any, events(3))
        .await
        .unwrap();
    assert_eq!(
        (
            a.first_revision,
            a.last_revision,
            a.first_position,
            a.last_position
        ),
        (0, 1, 0, 1)
    );
    assert_eq!((b.first_revision, b.first_position), (0, 2));
    assert_eq!(
        (
            c.first_revision,
            c.last_revision,
            c.first_position,
            c.last_position
        ),
        (2, 4, 3, 5)
    );
    assert_eq!(store.head(), 6);

    let slice = read(&store, "a-1").unwrap();
    assert_eq!(revisions(&slice), vec![0, 1, 2, 3, 4]);
    let positions: Vec<u64> = slice.events.iter().map(|event| event.position).collect();
    assert_eq!(positions, vec![0, 1, 3, 4, 5]);
    assert_eq!(slice.last_revision, Some(4));
    assert_eq!(slice.next, None);

    let all = store
        .read_all(None, Direction::Forward, 100, &AllFilter::default())
        .unwrap();
    let positions: Vec<u64> = all.events.iter().map(|event| event.position).collect();
    assert_eq!(positions, (0..6).collect::<Vec<_>>());
    store.shutdown().await;
}

#[tokio::test]
async fn expected_revisions_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let wrong = |result: Result<AppendOutcome, StoreError>| match result {
        Err(StoreError::WrongExpectedRevision { actual, .. }) => actual,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(
        wrong(
            store
                .append("s".into(), ExpectedRevision::StreamExists, events(1))
                .await
        ),
        None
    );
    assert_eq!(
        wrong(
            store
                .append("s".into(), ExpectedRevision::Exact(0), events(1))
                .await
        ),
        None
    );
    store
        .append("s".into(), ExpectedRevision::NoStream, events(1))
        .await
        .unwrap();
    assert_eq!(
        wrong(
            store
                .append("s".into(), ExpectedRevision::NoStream, events(1))
                .await
        ),
        Some(0)
    );
    assert_eq!(
        wrong(
            store
                .append("s".into(), ExpectedRevision::Exact(1), events(1))
                .await
        ),
        Some(0)
    );
    store
        .append("s".into(), ExpectedRevision::Exact(0), events(2))
        .await
        .unwrap();
    store
        .append("s".into(), ExpectedRevision::StreamExists, events(1))
        .await
        .unwrap();
    assert_eq!(read(&store, "s").unwrap().last_revision, Some(3));
    // Rejected appends wrote nothing: positions stayed gap-free.
    assert_eq!(store.head(), 4);
    store.shutdown().await;
}

#[tokio::test]
async fn resent_appends_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("s".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let batch = events(3);
    let first = store
        .append("s".into(), ExpectedRevision::Exact(0), batch.clone())
        .await
        .unwrap();
    let again = store
        .append("s".into(), ExpectedRevision::Exact(0), batch.clone())
        .await
        .unwrap();
    assert_eq!(first, again);
    let any = store
        .append("s".into(), ExpectedRevision::Any, batch.clone())
        .await
        .unwrap();
    assert_eq!(first, any);
    assert_eq!(store.head(), 4);

    // A re-send after other appends, still at its own place (expected revision 0), is recognised.
    store
        .append("s".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let late = store
        .append("s".into(), ExpectedRevision::Exact(0), batch.clone())
        .await
        .unwrap();
    assert_eq!(late, first);
    // But not at the end of the stream any more: with `any` these are new events there.
    let moved = store
        .append("s".into(), ExpectedRevision::Any, batch.clone())
        .await
        .unwrap();
    assert_eq!(moved.first_revision, 5);
    // The first events of a stored append, at their place, are a re-send of those.
    let prefix = store
        .append("s".into(), ExpectedRevision::Exact(0), batch[..2].to_vec())
        .await;
    let prefix = prefix.unwrap();
    assert_eq!((prefix.first_position, prefix.last_position), (1, 2));
    // Other ids at a stored place are a conflict.
    let other = store
        .append("s".into(), ExpectedRevision::Exact(0), events(1))
        .await;
    assert!(matches!(
        other,
        Err(StoreError::WrongExpectedRevision {
            actual: Some(7),
            ..
        })
    ));
    // The same ids in another stream are new events there.
    store
        .append("t".into(), ExpectedRevision::NoStream, batch.clone())
        .await
        .unwrap();
    let again = store
        .append("t".into(), ExpectedRevision::NoStream, batch)
        .await
        .unwrap();
    assert_eq!(again.first_position, 8);
    assert_eq!(store.head(), 11);

    let twice = [event("A"), event("B")];
    let twice = vec![twice[0].clone(), twice[1].clone(), twice[0].clone()];
    assert!(matches!(
        store.append("u".into(), ExpectedRevision::Any, twice).await,
        Err(StoreError::InvalidRequest(_))
    ));
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits_and_reject_only_the_losers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("contended".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for writer in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mine = store.append(
                format!("own-{writer}"),
                ExpectedRevision::NoStream,
                events(2),
            );
            let contended = store.append("contended".into(), ExpectedRevision::Exact(0), events(1));
            (mine.await, contended.await)
        }));
    }
    let mut winners = 0;
    for task in tasks {
        let (mine, contended) = task.await.unwrap();
        mine.unwrap();
        match contended {
            Ok(outcome) => {
                assert_eq!(outcome.first_revision, 1);
                winners += 1;
            }
            Err(StoreError::WrongExpectedRevision {
                actual: Some(1), ..
            }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(store.head(), 1 + 64 * 2 + 1);
    let all = store
        .read_all(None, Direction::Forward, 4096, &AllFilter::default())
        .unwrap();
    let positions: Vec<u64> = all.events.iter().map(|event| event.position).collect();
    assert_eq!(positions, (0..store.head()).collect::<Vec<_>>());
    for writer in 0..64 {
        assert_eq!(
            revisions(&read(&store, &format!("own-{writer}")).unwrap()),
            vec![0, 1]
        );
    }
    store.shutdown().await;
}

#[tokio::test]
async fn reads_page_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("s".into(), ExpectedRevision::Any, events(10))
        .await
        .unwrap();
    let page = store
        .read_stream("s", Some(3), Direction::Forward, 4, true)
        .unwrap();
    assert_eq!(revisions(&page), vec![3, 4, 5, 6]);
    assert_eq!(page.next, Some(7));
    let page = store
        .read_stream("s", Some(7), Direction::Forward, 4, true)
        .unwrap();
    assert_eq!(revisions(&page), vec![7, 8, 9]);
    assert_eq!(page.next, None);
    let page = store
        .read_stream("s", None, Direction::Backward, 4, true)
        .unwrap();
    assert_eq!(revisions(&page), vec![9, 8, 7, 6]);
    assert_eq!(page.next, Some(5));
    let page = store
        .read_stream("s", Some(2), Direction::Backward, 4, true)
        .unwrap();
    assert_eq!(revisions(&page), vec![2, 1, 0]);
    assert_eq!(page.next, None);
    let page = store
        .read_stream("s", Some(50), Direction::Forward, 4, true)
        .unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next, None);
    assert!(matches!(
        read(&store, "missing"),
        Err(StoreError::StreamNotFound(_))
    ));

    let page = store
        .read_all(None, Direction::Backward, 3, &AllFilter::default())
        .unwrap();
    let positions: Vec<u64> = page.events.iter().map(|event| event.position).collect();
    assert_eq!(positions, vec![9, 8, 7]);
    assert_eq!(page.next, Some(6));
    store.shutdown().await;
}

#[tokio::test]
async fn all_filters_match_prefixes_and_hide_system_streams() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append(
            "order-1".into(),
            ExpectedRevision::Any,
            vec![event("OrderPlaced")],
        )
        .await
        .unwrap();
    store
        .append(
            "cart-1".into(),
            ExpectedRevision::Any,
            vec![event("ItemAdded")],
        )
        .await
        .unwrap();
    store
        .append(
            "$internal".into(),
            ExpectedRevision::Any,
            vec![event("Tick")],
        )
        .await
        .unwrap();
    store
        .append(
            "user-1".into(),
            ExpectedRevision::Any,
            vec![event("OrderNoted")],
        )
        .await
        .unwrap();
    let streams = |filter: AllFilter| -> Vec<String> {
        let slice = store
            .read_all(None, Direction::Forward, 100, &filter)
            .unwrap();
        slice.events.into_iter().map(|event| event.stream).collect()
    };
    assert_eq!(
        streams(AllFilter::default()),
        vec!["order-1", "cart-1", "user-1"]
    );
    assert_eq!(
        streams(AllFilter {
            include_system: true,
            ..AllFilter::default()
        }),
        vec!["order-1", "cart-1", "$internal", "user-1"]
    );
    let by_stream = AllFilter {
        stream_prefixes: vec!["order".into(), "user".into()],
        ..AllFilter::default()
    };
    assert_eq!(streams(by_stream), vec!["order-1", "user-1"]);
    let by_type = AllFilter {
        type_prefixes: vec!["Order".into()],
        ..AllFilter::default()
    };
    assert_eq!(streams(by_type), vec!["order-1", "user-1"]);
    store.shutdown().await;
}

#[tokio::test]
async fn metadata_hides_events_from_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("s".into(), ExpectedRevision::Any, events(10))
        .await
        .unwrap();
    let set = |metadata: StreamMetadata| store.set_metadata("s".into(), metadata);
    set(StreamMetadata {
        max_count: Some(3),
        ..StreamMetadata::default()
    })
    .await
    .unwrap();
    assert_eq!(revisions(&read(&store, "s").unwrap()), vec![7, 8, 9]);
    set(StreamMetadata {
        truncate_before: Some(5),
        ..StreamMetadata::default()
    })
    .await
    .unwrap();
    assert_eq!(revisions(&read(&store, "s").unwrap()), vec![5, 6, 7, 8, 9]);
    let backward = store
        .read_stream("s", None, Direction::Backward, 100, true)
        .unwrap();
    assert_eq!(revisions(&backward), vec![9, 8, 7, 6, 5]);
    assert_eq!(backward.next, None);
    set(StreamMetadata {
        max_age_seconds: Some(3600),
        ..StreamMetadata::default()
    })
    .await
    .unwrap();
    assert_eq!(read(&store, "s").unwrap().events.len(), 10);
    let custom = serde_json::json!({"owner": "team-a"}).as_object().cloned();
    set(StreamMetadata {
        custom: custom.clone(),
        ..StreamMetadata::default()
    })
    .await
    .unwrap();
    assert_eq!(store.metadata("s").unwrap().unwrap().custom, custom);
    // Metadata may precede the stream's first event.
    store
        .set_metadata("later".into(), StreamMetadata::default())
        .await
        .unwrap();
    assert!(matches!(
        read(&store, "later"),
        Err(StoreError::StreamNotFound(_))
    ));
    store
        .append("later".into(), ExpectedRevision::NoStream, events(1))
        .await
        .unwrap();
    store.shutdown().await;
}

#[tokio::test]
async fn deletes_soft_and_hard() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("s".into(), ExpectedRevision::Any, events(3))
        .await
        .unwrap();
    store
        .delete("s".into(), ExpectedRevision::Exact(2), false)
        .await
        .unwrap();
    assert!(matches!(
        read(&store, "s"),
        Err(StoreError::StreamNotFound(_))
    ));
    assert_eq!(store.last_revision("s").unwrap(), None);
    assert!(matches!(
        store.delete("s".into(), ExpectedRevision::Any, false).await,
        Err(StoreError::StreamNotFound(_))
    ));
    let outcome = store
        .append("s".into(), ExpectedRevision::NoStream, events(1))
        .await
        .unwrap();
    assert_eq!(
        outcome.first_revision, 3,
        "numbering continues after a soft delete"
    );
    assert_eq!(revisions(&read(&store, "s").unwrap()), vec![3]);

    store
        .delete("s".into(), ExpectedRevision::Any, true)
        .await
        .unwrap();
    assert!(matches!(
        read(&store, "s"),
        Err(StoreError::StreamDeleted(_))
    ));
    assert!(matches!(
        store
            .append("s".into(), ExpectedRevision::Any, events(1))
            .await,
        Err(StoreError::StreamDeleted(_))
    ));
    assert!(matches!(
        store.delete("s".into(), ExpectedRevision::Any, true).await,
        Err(StoreError::StreamDeleted(_))
    ));
    assert!(matches!(
        store
            .delete("never".into(), ExpectedRevision::Any, false)
            .await,
        Err(StoreError::StreamNotFound(_))
    ));
    store.shutdown().await;
}

#[tokio::test]
async fn reopening_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("a".into(), ExpectedRevision::Any, events(2))
        .await
        .unwrap();
    store
        .append("b".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    store.shutdown().await;
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.head(), 3);
    assert_eq!(store.stream_count().unwrap(), 2);
    let outcome = store
        .append("c".into(), ExpectedRevision::NoStream, events(1))
        .await
        .unwrap();
    assert_eq!(outcome.first_position, 3);
    assert_eq!(store.stream_count().unwrap(), 3);
    assert_eq!(revisions(&read(&store, "a").unwrap()), vec![0, 1]);
    // Stream ids are not reused: each stream still reads only its own events.
    assert_eq!(read(&store, "c").unwrap().events.len(), 1);
    store.shutdown().await;
    assert!(matches!(
        store
            .append("a".into(), ExpectedRevision::Any, events(1))
            .await,
        Err(StoreError::ShuttingDown)
    ));
}

#[tokio::test]
async fn link_streams_read_across_chunks_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Several commits, so chunks are reopened and extended; an unrelated stream interleaves.
    for round in 0..7 {
        store
            .append("order-1".into(), ExpectedRevision::Any, events(23))
            .await
            .unwrap();
        store
            .append(format!("cart-{round}"), ExpectedRevision::Any, events(1))
            .await
            .unwrap();
    }
    let all = store
        .read_all(None, Direction::Forward, 4096, &AllFilter::default())
        .unwrap();
    let expected: Vec<u64> = all
        .events
        .iter()
        .filter(|event| event.stream == "order-1")
        .map(|event| event.position)
        .collect();
    assert_eq!(expected.len(), 161);
    let positions =
        |slice: &Slice| -> Vec<u64> { slice.events.iter().map(|e| e.position).collect() };
    let links = |slice: &Slice| -> Vec<u64> {
        slice
            .events
            .iter()
            .map(|e| e.link.as_ref().unwrap().revision)
            .collect()
    };

    let whole = store
        .read_stream("$ce-order", None, Direction::Forward, 4096, true)
        .unwrap();
    assert_eq!(positions(&whole), expected);
    assert_eq!(links(&whole), (0..161).collect::<Vec<_>>());
    assert_eq!(whole.last_revision, Some(160));

    let page = store
        .read_stream("$ce-order", Some(60), Direction::Forward, 10, true)
        .unwrap();
    assert_eq!(links(&page), (60..70).collect::<Vec<_>>());
    assert_eq!(page.next, Some(70));
    let page = store
        .read_stream("$ce-order", Some(130), Direction::Backward, 70, true)
        .unwrap();
    assert_eq!(links(&page), (61..=130).rev().collect::<Vec<_>>());
    assert_eq!(page.next, Some(60));
    assert_eq!(
        positions(&page),
        expected[61..=130].iter().rev().copied().collect::<Vec<_>>()
    );
    let page = store
        .read_stream("$ce-order", None, Direction::Backward, 3, false)
        .unwrap();
    assert_eq!(page.events[0].event_type, "$>");
    assert_eq!(page.events[0].revision, 160);

    // Reopened, the next revision of a link stream comes from its last chunk.
    store.shutdown().await;
    drop(store);
    let store = open(dir.path());
    store
        .append("order-2".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let tail = store
        .read_stream("$ce-order", None, Direction::Backward, 1, true)
        .unwrap();
    assert_eq!(links(&tail), vec![161]);
    assert_eq!(tail.events[0].stream, "order-2");
    store.shutdown().await;
}

/// A rebuild's switch that cannot write the streams its version emitted to (a client
/// tombstoned one since) is refused whole: the live data, its checkpoint and the rebuild stay
/// as they were.
#[tokio::test]
async fn a_switch_that_cannot_write_its_streams_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("order-1".into(), ExpectedRevision::Any, events(2))
        .await
        .unwrap();
    let component = || ("c".repeat(64), serde_json::json!({}));
    let (sha, definition) = component();
    let live = store
        .save_projection(
            "p".into(),
            sha.clone(),
            definition.clone(),
            Some(b"component".to_vec()),
            DataChange::Fresh {
                delete_outputs: false,
            },
        )
        .await
        .unwrap();
    let batch = |data, shadow| ProjectionCommit {
        projection: "p".into(),
        data,
        from: 0,
        checkpoint: projection_data::Checkpoint {
            position: 2,
            events_processed: 2,
            events_emitted: 1,
        },
        states: vec![("order-1".into(), b"{\"n\":2}".to_vec())],
        rows: Vec::new(),
        emits: vec![("notify-1".into(), event("Notified"))],
        links: Vec::new(),
        parked: Vec::new(),
        shadow,
    };
    store.commit_projection(batch(live, false)).await.unwrap();
    let build = store
        .build_projection(
            "p".into(),
            BuildChange::Start {
                component: sha,
                definition,
                component_bytes: None,
            },
        )
        .await
        .unwrap();
    let mut rebuilt = batch(build, true);
    rebuilt.emits.push(("notify-2".into(), event("Notified")));
    rebuilt.checkpoint.events_emitted = 2;
    store.commit_projection(rebuilt).await.unwrap();
    store
        .delete("notify-2".into(), ExpectedRevision::Any, true)
        .await
        .unwrap();

    let refused = store
        .build_projection(
            "p".into(),
            BuildChange::Switch {
                data: build,
                keep_emitted: false,
            },
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("notify-2"), "{refused}");
    let served = store.served_projection_view("p").unwrap().unwrap();
    assert_eq!(served.data(), live);
    assert_eq!(served.checkpoint().unwrap().unwrap().position, 2);
    assert_eq!(served.state("order-1").unwrap().unwrap(), b"{\"n\":2}");
    let stored = store.stored_projections().unwrap();
    assert_eq!(stored[0].1.building.as_ref().unwrap().data, build);
    assert_eq!(revisions(&read(&store, "notify-1").unwrap()), vec![0]);
    assert!(matches!(
        read(&store, "notify-2"),
        Err(StoreError::StreamDeleted(_))
    ));
}

/// What a replacing switch would rewrite: the streams whose events differ from the rebuilt
/// version's (a stream it extends or leaves alone is not rewritten), and the events they get.
#[tokio::test]
async fn a_rewrite_preview_counts_the_streams_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append("order-1".into(), ExpectedRevision::Any, events(1))
        .await
        .unwrap();
    let live = store
        .save_projection(
            "p".into(),
            "c".repeat(64),
            serde_json::json!({}),
            Some(b"component".to_vec()),
            DataChange::Fresh {
                delete_outputs: false,
            },
        )
        .await
        .unwrap();
    let commit = |data, shadow, emits: Vec<(&str, &str)>| ProjectionCommit {
        projection: "p".into(),
        data,
        from: 0,
        checkpoint: projection_data::Checkpoint {
            position: 1,
            events_processed: 1,
            events_emitted: emits.len() as u64,
        },
        emits: emits
            .into_iter()
            .map(|(stream, event_type)| (stream.to_owned(), event(event_type)))
            .collect(),
        shadow,
        ..ProjectionCommit::default()
    };
    store
        .commit_projection(commit(
            live,
            false,
            vec![("same", "A"), ("differs", "A"), ("longer", "A")],
        ))
        .await
        .unwrap();
    assert_eq!(store.emitted_footprint("p").unwrap(), Some((3, 3)));
    assert_eq!(store.rewrite_preview("p").unwrap(), None, "no rebuild");
    let build = store
        .build_projection(
            "p".into(),
            BuildChange::Start {
                component: "c".repeat(64),
                definition: serde_json::json!({}),
                component_bytes: None,
            },
        )
        .await
        .unwrap();
    let emits = vec![
        ("same", "A"),
        ("differs", "B"),
        ("longer", "A"),
        ("longer", "A"),
        ("new", "A"),
    ];
    store
        .commit_projection(commit(build, true, emits))
        .await
        .unwrap();
    assert_eq!(store.rewrite_preview("p").unwrap(), Some((1, 1)));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

fn all_events(store: &Store) -> Vec<(u64, String, u64, Uuid, i64)> {
    let filter = AllFilter {
        stream_prefixes: Vec::new(),
        type_prefixes: Vec::new(),
        include_system: true,
    };
    store
        .read_all(None, Direction::Forward, 4096, &filter)
        .unwrap()
        .events
        .into_iter()
        .map(|event| {
            (
                event.position,
                event.stream,
                event.revision,
                event.id,
                event.created_ms,
            )
        })
        .collect()
}

/// What `kill -9` leaves once the log is synced but before a checkpoint: the log holds every
/// acknowledged write, the database only its last durable commit. Opening replays the log, and
/// the writes come back with the positions, revisions, times and outcomes they were answered
/// with; rejected requests stay rejected, and numbering goes on where it left off.
#[tokio::test]
async fn opening_replays_the_log_past_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = StoreOptions {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let store = Store::open(&data, options, Arc::new(Metrics::new())).unwrap();
    for n in 0..20 {
        store
            .append(format!("order-{}", n % 4), ExpectedRevision::Any, events(3))
            .await
            .unwrap();
    }
    let conflict = store
        .append("order-0".into(), ExpectedRevision::Exact(2), events(1))
        .await;
    assert!(matches!(
        conflict,
        Err(StoreError::WrongExpectedRevision { .. })
    ));
    let metadata = StreamMetadata {
        max_count: Some(5),
        ..StreamMetadata::default()
    };
    store
        .set_metadata("order-1".into(), metadata.clone())
        .await
        .unwrap();
    store
        .delete("order-2".into(), ExpectedRevision::Any, false)
        .await
        .unwrap();
    store
        .delete("order-3".into(), ExpectedRevision::Any, true)
        .await
        .unwrap();
    let answered = all_events(&store);
    assert_eq!(answered.len(), 60);

    let crashed = dir.path().join("crashed");
    copy_dir(&data, &crashed);
    {
        // The database alone has none of it: without the log, all of it would be lost.
        let db = Database::open(crashed.join(DATABASE_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(LOG).unwrap().len().unwrap(), 0);
    }

    let reopened = open(&crashed);
    assert_eq!(all_events(&reopened), answered);
    assert_eq!(reopened.head(), 60);
    assert_eq!(reopened.metadata("order-1").unwrap(), Some(metadata));
    assert!(matches!(
        read(&reopened, "order-2"),
        Err(StoreError::StreamNotFound(_))
    ));
    assert!(matches!(
        read(&reopened, "order-3"),
        Err(StoreError::StreamDeleted(_))
    ));
    let next = reopened
        .append("order-0".into(), ExpectedRevision::Exact(14), events(1))
        .await
        .unwrap();
    assert_eq!((next.first_revision, next.first_position), (15, 60));
    reopened.shutdown().await;
    drop(reopened);

    // A clean shutdown checkpoints: the database alone holds everything.
    let db = Database::open(crashed.join(DATABASE_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    assert_eq!(txn.open_table(LOG).unwrap().len().unwrap(), 61);
    store.shutdown().await;
}
