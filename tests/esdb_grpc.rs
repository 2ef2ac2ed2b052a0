//! EventStoreDB's own clients against Refract's gRPC API: the Rust `kurrentdb` crate here, the
//! Python `kurrentdbclient` from PyPI in `tests/esdb/python_client.py`. Events written over gRPC
//! read back identically over HTTP and the other way round, and projections see them.

mod common;

use std::time::Duration;

use common::{Server, virtualenv};
use kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, CurrentRevision, DeleteStreamOptions, Error,
    EventData, NakAction, PersistentSubscriptionOptions, PersistentSubscriptionToAllOptions,
    ReadAllOptions, ReadStreamOptions, ReplayParkedMessagesOptions, ResolvedEvent, StreamPosition,
    StreamState, SubscribeToAllOptions, SubscribeToPersistentSubscriptionOptions,
    SubscribeToStreamOptions, SubscriptionEvent, SubscriptionFilter, TombstoneStreamOptions,
};
use serde_json::{Value, json};

fn port(server: &Server) -> u16 {
    server.base.rsplit(':').next().unwrap().parse().unwrap()
}

fn client(server: &Server, scheme: &str) -> Client {
    let url = format!("{scheme}://127.0.0.1:{}?tls=false", port(server));
    Client::new(url.parse::<ClientSettings>().unwrap()).unwrap()
}

async fn read_all_of(
    client: &Client,
    stream: &str,
    options: &ReadStreamOptions,
) -> Vec<ResolvedEvent> {
    let mut read = client.read_stream(stream, options).await.unwrap();
    let mut events = Vec::new();
    while let Some(event) = read.next().await.unwrap() {
        events.push(event);
    }
    events
}

/// The next event of a subscription, within 10 s.
async fn next_event(subscription: &mut kurrentdb::Subscription) -> ResolvedEvent {
    loop {
        let next = tokio::time::timeout(
            Duration::from_secs(10),
            subscription.next_subscription_event(),
        )
        .await
        .expect("an event within 10 s")
        .unwrap();
        if let SubscriptionEvent::EventAppeared(event) = next {
            return event;
        }
    }
}

fn order(n: u64) -> EventData {
    EventData::json("OrderPlaced", &json!({"order": n}))
        .unwrap()
        .id(uuid::Uuid::new_v4())
        .metadata_as_json(&json!({"$correlationId": format!("c-{n}")}))
        .unwrap()
}

#[tokio::test]
async fn appends_and_reads_through_the_rust_client() {
    let server = Server::start();
    let client = client(&server, "esdb");
    let written = client
        .append_to_stream(
            "order-1",
            &AppendToStreamOptions::default().stream_state(StreamState::NoStream),
            vec![order(0), order(1), order(2)],
        )
        .await
        .unwrap();
    assert_eq!(written.next_expected_version, 2);
    assert_eq!(written.position.commit, written.position.prepare);

    // A wrong expected revision says what the stream is at.
    let refused = client
        .append_to_stream(
            "order-1",
            &AppendToStreamOptions::default().stream_state(StreamState::StreamRevision(1)),
            vec![order(3)],
        )
        .await
        .unwrap_err();
    match refused {
        Error::WrongExpectedVersion { expected, current } => {
            assert_eq!(expected, StreamState::StreamRevision(1));
            assert_eq!(current, CurrentRevision::Current(2));
        }
        other => panic!("expected a wrong expected version, got {other:?}"),
    }
    let binary_id = uuid::Uuid::new_v4();
    let binary =
        EventData::binary("Blob", bytes::Bytes::from_static(b"\x00\x01binary")).id(binary_id);
    let written = client
        .append_to_stream(
            "order-1",
            &AppendToStreamOptions::default().stream_state(StreamState::StreamRevision(2)),
            vec![order(3), binary],
        )
        .await
        .unwrap();
    assert_eq!(written.next_expected_version, 4);

    // Forwards, backwards, and as HTTP reads them.
    let forwards = read_all_of(&client, "order-1", &ReadStreamOptions::default()).await;
    let revisions: Vec<u64> = forwards
        .iter()
        .map(|e| e.get_original_event().revision)
        .collect();
    assert_eq!(revisions, [0, 1, 2, 3, 4]);
    let backwards = read_all_of(
        &client,
        "order-1",
        &ReadStreamOptions::default()
            .backwards()
            .position(StreamPosition::End)
            .max_count(2),
    )
    .await;
    let revisions: Vec<u64> = backwards
        .iter()
        .map(|e| e.get_original_event().revision)
        .collect();
    assert_eq!(revisions, [4, 3]);
    let from_two = read_all_of(
        &client,
        "order-1",
        &ReadStreamOptions::default()
            .position(StreamPosition::Position(2))
            .max_count(2),
    )
    .await;
    assert_eq!(from_two[0].get_original_event().revision, 2);
    assert_eq!(from_two.len(), 2);

    let (status, page) = server.get("/streams/order-1").await;
    assert_eq!(status, 200, "{page}");
    let over_http = page["events"].as_array().unwrap();
    assert_eq!(over_http.len(), 5);
    for (grpc, http) in forwards.iter().zip(over_http) {
        let event = grpc.get_original_event();
        assert_eq!(http["id"], event.id.to_string());
        assert_eq!(http["type"], event.event_type);
        assert_eq!(http["revision"], event.revision);
        assert_eq!(http["position"], event.position.commit);
        assert_eq!(event.stream_id(), "order-1");
        if event.is_json {
            assert_eq!(
                http["data"],
                serde_json::from_slice::<Value>(&event.data).unwrap()
            );
            let metadata: Value = serde_json::from_slice(&event.custom_metadata).unwrap();
            assert_eq!(http["metadata"], metadata);
        } else {
            assert_eq!(event.id, binary_id);
            assert_eq!(&event.data[..], b"\x00\x01binary");
            assert_eq!(http["content_type"], "application/octet-stream");
        }
        let created = humantime::parse_rfc3339(http["created"].as_str().unwrap()).unwrap();
        let created_ms = created
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        // The client reads `created` to the second.
        assert_eq!(created_ms as i64 / 1000, event.created.timestamp());
    }

    // Written over HTTP, read over gRPC.
    let (status, body) = server
        .post(
            "/streams/invoice-9",
            json!({"id": "0b7e4bb1-3a4b-4f53-9f4f-7b8b3c2f7c01", "type": "InvoiceIssued",
                   "data": {"total": 12.5}, "metadata": {"by": "http"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let read = read_all_of(&client, "invoice-9", &ReadStreamOptions::default()).await;
    let event = read[0].get_original_event();
    assert_eq!(event.id.to_string(), "0b7e4bb1-3a4b-4f53-9f4f-7b8b3c2f7c01");
    assert_eq!(event.event_type, "InvoiceIssued");
    assert!(event.is_json);
    assert_eq!(event.as_json::<Value>().unwrap(), json!({"total": 12.5}));
    assert_eq!(
        serde_json::from_slice::<Value>(&event.custom_metadata).unwrap(),
        json!({"by": "http"})
    );
    assert_eq!(event.metadata["content-type"], "application/json");

    // A stream nobody wrote.
    let mut missing = client
        .read_stream("nothing-here", &Default::default())
        .await
        .unwrap();
    assert!(matches!(missing.next().await, Err(Error::ResourceNotFound)));

    // `$all` forwards from a position, and backwards from the end.
    let all = client
        .read_all(&ReadAllOptions::default().max_count(100))
        .await
        .unwrap();
    let all = collect(all).await;
    let ours: Vec<&ResolvedEvent> = all
        .iter()
        .filter(|event| !event.get_original_event().stream_id().starts_with('$'))
        .collect();
    assert_eq!(ours.len(), 6);
    let third = ours[2].get_original_event().position;
    let from_third = collect(
        client
            .read_all(
                &ReadAllOptions::default()
                    .position(StreamPosition::Position(third))
                    .max_count(1),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(from_third[0].get_original_event().position, third);
    let last = collect(
        client
            .read_all(
                &ReadAllOptions::default()
                    .backwards()
                    .position(StreamPosition::End)
                    .max_count(1),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        last[0].get_original_event().position,
        all.last().unwrap().get_original_event().position
    );

    // The built-in projections saw the gRPC appends: `$ce-order` links to them.
    common::wait_until(|| async {
        server.get("/streams/$ce-order").await.1["events"]
            .as_array()
            .is_some_and(|e| e.len() == 5)
    })
    .await;
    let category = read_all_of(
        &client,
        "$ce-order",
        &ReadStreamOptions::default().resolve_link_tos(),
    )
    .await;
    assert_eq!(category.len(), 5);
    assert!(category[0].is_resolved());
    assert_eq!(category[0].event.as_ref().unwrap().stream_id(), "order-1");
    assert_eq!(category[0].link.as_ref().unwrap().stream_id(), "$ce-order");
    // Not resolved, a link reads as EventStoreDB's: type `$>`, its target as text.
    let links = read_all_of(
        &client,
        "$ce-order",
        &ReadStreamOptions::default().max_count(1),
    )
    .await;
    let link = links[0].get_original_event();
    assert_eq!(link.event_type, "$>");
    assert_eq!(&link.data[..], b"0@order-1");
    assert_eq!(link.id, category[0].link.as_ref().unwrap().id);
    // Position 0 of `$all` is where clients start from: the first event is delivered.
    let mut from_zero = client
        .subscribe_to_all(
            &SubscribeToAllOptions::default().position(StreamPosition::Position(
                kurrentdb::Position {
                    commit: 0,
                    prepare: 0,
                },
            )),
        )
        .await;
    assert_eq!(
        next_event(&mut from_zero)
            .await
            .get_original_event()
            .position
            .commit,
        0
    );
    let (_, by_correlation) = server.get("/streams/$bc-c-1").await;
    assert_eq!(by_correlation["events"][0]["stream"], "order-1");

    // The other scheme of the same clients.
    let kurrent = client_for(&server, "kurrentdb");
    assert_eq!(
        read_all_of(&kurrent, "order-1", &Default::default())
            .await
            .len(),
        5
    );
}

fn client_for(server: &Server, scheme: &str) -> Client {
    client(server, scheme)
}

async fn collect(mut read: kurrentdb::ReadStream) -> Vec<ResolvedEvent> {
    let mut events = Vec::new();
    while let Some(event) = read.next().await.unwrap() {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn deletes_tombstones_and_subscriptions_through_the_rust_client() {
    let server = Server::start();
    let client = client(&server, "esdb");
    client
        .append_to_stream("cart-1", &Default::default(), vec![order(0), order(1)])
        .await
        .unwrap();

    // A catch-up subscription: history, caught up, then what is written after.
    let mut stream_subscription = client
        .subscribe_to_stream(
            "cart-1",
            &SubscribeToStreamOptions::default().start_from(StreamPosition::Start),
        )
        .await;
    let mut seen = Vec::new();
    let mut caught_up = false;
    while seen.len() < 2 || !caught_up {
        match tokio::time::timeout(
            Duration::from_secs(10),
            stream_subscription.next_subscription_event(),
        )
        .await
        .unwrap()
        .unwrap()
        {
            SubscriptionEvent::EventAppeared(event) => {
                seen.push(event.get_original_event().revision)
            }
            SubscriptionEvent::CaughtUp(_) => caught_up = true,
            _ => {}
        }
    }
    assert_eq!(seen, [0, 1]);
    // From a revision: what comes after it.
    let mut after_zero = client
        .subscribe_to_stream(
            "cart-1",
            &SubscribeToStreamOptions::default().start_from(StreamPosition::Position(0)),
        )
        .await;
    assert_eq!(
        next_event(&mut after_zero)
            .await
            .get_original_event()
            .revision,
        1
    );

    // `$all` filtered on event types by prefix, and by a regular expression with a look-ahead.
    let mut invoices = client
        .subscribe_to_all(
            &SubscribeToAllOptions::default()
                .position(StreamPosition::Start)
                .filter(SubscriptionFilter::on_event_type().add_prefix("Invoice")),
        )
        .await;
    let mut not_orders = client
        .subscribe_to_all(
            &SubscribeToAllOptions::default()
                .position(StreamPosition::Start)
                .filter(SubscriptionFilter::on_stream_name().regex("^(?!cart-|\\$).*")),
        )
        .await;
    client
        .append_to_stream("cart-1", &Default::default(), vec![order(2)])
        .await
        .unwrap();
    let invoice = EventData::json("InvoiceIssued", &json!({"n": 1})).unwrap();
    client
        .append_to_stream("invoice-1", &Default::default(), vec![invoice])
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream_subscription)
            .await
            .get_original_event()
            .revision,
        2
    );
    let event = next_event(&mut invoices).await;
    assert_eq!(event.get_original_event().event_type, "InvoiceIssued");
    let event = next_event(&mut not_orders).await;
    assert_eq!(event.get_original_event().stream_id(), "invoice-1");

    // Delete: a wrong expected revision is refused; then the stream reads as not found.
    let refused = client
        .delete_stream(
            "cart-1",
            &DeleteStreamOptions::default().stream_state(StreamState::StreamRevision(0)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            Error::Grpc {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ),
        "{refused:?}"
    );
    client
        .delete_stream(
            "cart-1",
            &DeleteStreamOptions::default().stream_state(StreamState::StreamRevision(2)),
        )
        .await
        .unwrap();
    let mut read = client
        .read_stream("cart-1", &Default::default())
        .await
        .unwrap();
    assert!(matches!(read.next().await, Err(Error::ResourceNotFound)));

    // A tombstone is for good.
    client
        .tombstone_stream("invoice-1", &TombstoneStreamOptions::default())
        .await
        .unwrap();
    let refused = client
        .append_to_stream("invoice-1", &Default::default(), vec![order(9)])
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::ResourceDeleted), "{refused:?}");
    let (status, _) = server.get("/streams/invoice-1").await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn persistent_subscriptions_through_the_rust_client() {
    let server = Server::start();
    let client = client(&server, "esdb");
    let events: Vec<EventData> = (0..6).map(order).collect();
    client
        .append_to_stream("job-1", &Default::default(), events)
        .await
        .unwrap();
    client
        .create_persistent_subscription(
            "job-1",
            "workers",
            &PersistentSubscriptionOptions::default()
                .start_from(StreamPosition::Start)
                .max_retry_count(3),
        )
        .await
        .unwrap();
    let again = client
        .create_persistent_subscription("job-1", "workers", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::ResourceAlreadyExists), "{again:?}");

    let mut subscription = client
        .subscribe_to_persistent_subscription(
            "job-1",
            "workers",
            &SubscribeToPersistentSubscriptionOptions::default().buffer_size(10),
        )
        .await
        .unwrap();
    let mut retried = false;
    let mut handled = Vec::new();
    while handled.len() < 6 {
        let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("a message within 10 s")
            .unwrap();
        let revision = event.get_original_event().revision;
        match revision {
            // Parked at once.
            1 => subscription
                .nack(&event, NakAction::Park, "poison")
                .await
                .unwrap(),
            // Retried once, then acked.
            3 if !retried => {
                retried = true;
                subscription
                    .nack(&event, NakAction::Retry, "later")
                    .await
                    .unwrap();
                continue;
            }
            // Skipped: done without being handled.
            5 => subscription
                .nack(&event, NakAction::Skip, "not needed")
                .await
                .unwrap(),
            _ => subscription.ack(&event).await.unwrap(),
        }
        handled.push(revision);
    }
    handled.sort();
    assert_eq!(handled, [0, 1, 2, 3, 4, 5]);

    let info = client
        .get_persistent_subscription_info("job-1", "workers", &Default::default())
        .await
        .unwrap();
    assert_eq!(info.group_name, "workers");
    assert_eq!(info.event_source, "job-1");
    assert_eq!(info.connections.len(), 1);
    common::wait_until(|| async {
        let (_, info) = server.get("/groups/job-1/workers").await;
        info["parked"] == 1
    })
    .await;
    let listed = client
        .list_all_persistent_subscriptions(&Default::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);

    // The parked message comes back on replay.
    client
        .replay_parked_messages("job-1", "workers", &ReplayParkedMessagesOptions::default())
        .await
        .unwrap();
    let replayed = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the parked message again")
        .unwrap();
    // As in EventStoreDB, a replayed message comes through its link in the parked stream.
    assert_eq!(replayed.event.as_ref().unwrap().revision, 1);
    assert_eq!(
        replayed.link.as_ref().unwrap().stream_id(),
        "$persistentsubscription-job-1::workers-parked"
    );
    subscription.ack(&replayed).await.unwrap();
    // Every ack and nack reached the group: nothing is in flight, and the checkpoint can pass
    // every message (the client sends acks in batches, so this waits).
    common::wait_until(|| async {
        let (_, info) = server.get("/groups/job-1/workers").await;
        info["in_flight"] == 0 && info["parked"] == 0
    })
    .await;

    // `$all`, filtered by a prefix of event types.
    client
        .create_persistent_subscription_to_all(
            "audit",
            &PersistentSubscriptionToAllOptions::default()
                .start_from(StreamPosition::Start)
                .filter(SubscriptionFilter::on_event_type().add_prefix("Order")),
        )
        .await
        .unwrap();
    let mut audit = client
        .subscribe_to_persistent_subscription_to_all("audit", &Default::default())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), audit.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.get_original_event().stream_id(), "job-1");
    audit.ack(&first).await.unwrap();
    let (_, info) = server.get("/groups/$all/audit").await;
    assert_eq!(info["settings"]["type_prefix"], "Order");

    // Deleting a group: gone for info, and its subscribers are dropped.
    client
        .delete_persistent_subscription("job-1", "workers", &Default::default())
        .await
        .unwrap();
    let gone = client
        .get_persistent_subscription_info("job-1", "workers", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(gone, Error::ResourceNotFound), "{gone:?}");
    let dropped = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap();
    assert!(dropped.is_err());
}

#[tokio::test]
async fn tokens_guard_the_grpc_api_as_the_http_api() {
    let server = Server::start_with(&[
        "--token",
        "reader:reader-secret",
        "--token",
        "writer:writer-secret",
    ]);
    let port = port(&server);
    let as_user = |token: &str| {
        let url = format!("esdb://any:{token}@127.0.0.1:{port}?tls=false");
        Client::new(url.parse::<ClientSettings>().unwrap()).unwrap()
    };
    let writer = as_user("writer-secret");
    writer
        .append_to_stream("note-1", &Default::default(), vec![order(0)])
        .await
        .unwrap();
    let reader = as_user("reader-secret");
    assert_eq!(
        read_all_of(&reader, "note-1", &Default::default())
            .await
            .len(),
        1
    );
    let refused = reader
        .append_to_stream("note-1", &Default::default(), vec![order(1)])
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::AccessDenied), "{refused:?}");
    let stranger = as_user("not-a-token");
    match stranger.read_stream("note-1", &Default::default()).await {
        Ok(mut read) => assert!(matches!(read.next().await, Err(Error::AccessDenied))),
        Err(refused) => assert!(matches!(refused, Error::AccessDenied), "{refused:?}"),
    }
    // Deleting needs the admin role, as `DELETE /streams/{stream}` does.
    let refused = writer
        .delete_stream("note-1", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::AccessDenied), "{refused:?}");
}

#[test]
fn the_python_client_from_pypi() {
    let server = Server::start();
    let bin = virtualenv("esdb-client", "tests/esdb/requirements.txt");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/esdb/python_client.py");
    let output = std::process::Command::new(bin.join("python"))
        .arg(script)
        .arg(format!("esdb://127.0.0.1:{}?tls=false", port(&server)))
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "the Python client's scenario failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // What Python appended (one event by Append, three by BatchAppend) reads back over HTTP.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, page) = runtime.block_on(server.get("/streams/py-order-1"));
    assert_eq!(status, 200, "{page}");
    let types: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["OrderPlaced", "ItemAdded", "ItemAdded", "OrderShipped"]
    );
    assert_eq!(page["events"][1]["data"], json!({"sku": "a", "n": 1}));
}

/// A certificate authority, and a certificate it signed for 127.0.0.1: (CA, chain, key) files.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let mut authority = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    authority.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let authority =
        rcgen::CertifiedIssuer::self_signed(authority, rcgen::KeyPair::generate().unwrap())
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &authority)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    (
        write("ca.pem", authority.pem()),
        write("server.pem", certificate.pem()),
        write("server.key", key.serialize_pem()),
    )
}

#[tokio::test]
async fn grpc_and_http_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (authority, certificate, key) = certificates(dir.path());
    let server = Server::start_with(&["--tls-cert", &certificate, "--tls-key", &key]);
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let port = port(&server);

    let url = format!("esdb://127.0.0.1:{port}?tls=true&tlsCAFile={authority}");
    let client = Client::new(url.parse::<ClientSettings>().unwrap()).unwrap();
    client
        .append_to_stream("secure-1", &Default::default(), vec![order(0)])
        .await
        .unwrap();
    assert_eq!(
        read_all_of(&client, "secure-1", &Default::default())
            .await
            .len(),
        1
    );

    // Without TLS nothing gets through.
    let plain = client_for(&server, "esdb");
    let refused = plain
        .append_to_stream("secure-1", &Default::default(), vec![order(1)])
        .await;
    assert!(refused.is_err(), "a plain connection was served");

    // HTTP/1.1 over the same TLS port.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let pem = std::fs::read(&authority).unwrap();
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    for certificate in tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"GET /streams/secure-1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"stream\":\"secure-1\""), "{response}");
}

#[tokio::test]
async fn gossip_checkpoints_updates_and_what_refract_does_its_own_way() {
    let server = Server::start();
    let port = port(&server);
    // Two seeds put the client in cluster mode: it asks Gossip for the leader and connects there.
    let url = format!("esdb://127.0.0.1:{port},127.0.0.1:{port}?tls=false");
    let client = Client::new(url.parse::<ClientSettings>().unwrap()).unwrap();
    client
        .append_to_stream(
            "gossip-1",
            &Default::default(),
            vec![order(0), order(1), order(2)],
        )
        .await
        .unwrap();

    // A Wasm projection sees what gRPC wrote.
    let (code, status) = server
        .deploy("counter", common::guest("event-counter"), "")
        .await;
    assert_eq!(code, 201, "{status}");
    server.caught_up("counter").await;
    let (_, counts) = server.get("/projections/counter/state").await;
    assert_eq!(counts["by_type"]["OrderPlaced"], 3, "{counts}");

    // A filter that matches nothing still moves the subscriber on, by checkpoints.
    let events: Vec<EventData> = (3..40).map(order).collect();
    client
        .append_to_stream("gossip-1", &Default::default(), events)
        .await
        .unwrap();
    let mut nothing = client
        .subscribe_to_all(
            &SubscribeToAllOptions::default()
                .position(StreamPosition::Start)
                .filter(
                    SubscriptionFilter::on_event_type()
                        .add_prefix("Never")
                        .max(10),
                ),
        )
        .await;
    let mut checkpoints = Vec::new();
    while checkpoints.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), nothing.next_subscription_event())
            .await
            .expect("checkpoints within 10 s")
            .unwrap()
        {
            SubscriptionEvent::Checkpoint(position) => checkpoints.push(position.commit),
            SubscriptionEvent::EventAppeared(event) => panic!("filtered out: {event:?}"),
            _ => {}
        }
    }
    assert!(
        checkpoints.windows(2).all(|pair| pair[0] < pair[1]),
        "{checkpoints:?}"
    );

    // Updating a group changes its settings and keeps its place.
    client
        .create_persistent_subscription("gossip-1", "readers", &Default::default())
        .await
        .unwrap();
    client
        .update_persistent_subscription(
            "gossip-1",
            "readers",
            &PersistentSubscriptionOptions::default()
                .max_retry_count(7)
                .start_from(StreamPosition::Start),
        )
        .await
        .unwrap();
    let (_, group) = server.get("/groups/gossip-1/readers").await;
    assert_eq!(group["settings"]["max_retry_count"], 7, "{group}");
    let missing = client
        .update_persistent_subscription("gossip-1", "nobody", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::ResourceNotFound), "{missing:?}");

    // EventStoreDB's JavaScript projections are not Refract's: the call says so.
    let projections = kurrentdb::ProjectionClient::new(
        format!("esdb://127.0.0.1:{port}?tls=false")
            .parse()
            .unwrap(),
    )
    .unwrap();
    let refused = projections
        .create("totals", "fromAll()".into(), &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::UnsupportedFeature), "{refused:?}");
}

#[tokio::test]
async fn a_cluster_through_gossip_and_where_the_leader_is() {
    let cluster = common::cluster::Cluster::start();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let port_of = |id: u64| port(cluster.node(id));

    // All three as seeds: the client asks Gossip for the members and connects to the leader.
    let seeds: Vec<String> = (1..=3)
        .map(|id| format!("127.0.0.1:{}", port_of(id)))
        .collect();
    let url = format!("esdb://{}?tls=false", seeds.join(","));
    let client = Client::new(url.parse::<ClientSettings>().unwrap()).unwrap();
    client
        .append_to_stream("ha-1", &Default::default(), vec![order(0)])
        .await
        .unwrap();

    // Straight to a follower: the first call learns where the leader is, the next goes there.
    let url = format!("esdb://127.0.0.1:{}?tls=false", port_of(follower));
    let direct = Client::new(url.parse::<ClientSettings>().unwrap()).unwrap();
    match direct
        .append_to_stream("ha-1", &Default::default(), vec![order(1)])
        .await
    {
        Err(Error::NotLeaderException(endpoint)) => {
            assert_eq!(endpoint.port, u32::from(port_of(leader)));
            direct
                .append_to_stream("ha-1", &Default::default(), vec![order(1)])
                .await
                .unwrap();
        }
        other => panic!("a follower took a write: {other:?}"),
    }
    let on_leader = read_all_of(&direct, "ha-1", &Default::default()).await;
    assert_eq!(on_leader.len(), 2);
}
