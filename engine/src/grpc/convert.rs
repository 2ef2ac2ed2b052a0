//! Between EventStoreDB's messages and Refract's: ids, stream names, events, expected
//! revisions, and errors with the status codes and `exception` metadata the clients read.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use uuid::Uuid;

use super::proto::event_store::client::{self as shared, StreamIdentifier};
use crate::names::{Name, check_writable_stream};
use crate::store::{ExpectedRevision, NewEvent, RecordedEvent, StoreError, check_event_type};

/// .NET ticks (100 ns), EventStoreDB's unit of time, per millisecond.
pub const TICKS_PER_MILLISECOND: i64 = 10_000;
/// The event type EventStoreDB gives links.
const LINK_TYPE: &str = "$>";

/// An id as the client sent it: structured (two 64-bit halves) or a string.
pub fn uuid_of(id: Option<&shared::Uuid>) -> Result<Uuid, Status> {
    match id.and_then(|id| id.value.as_ref()) {
        Some(shared::uuid::Value::Structured(halves)) => Ok(Uuid::from_u64_pair(
            halves.most_significant_bits as u64,
            halves.least_significant_bits as u64,
        )),
        Some(shared::uuid::Value::String(text)) => Uuid::parse_str(text)
            .map_err(|_| Status::invalid_argument(format!("{text:?} is not a UUID"))),
        None => Err(Status::invalid_argument("an event needs an id")),
    }
}

/// An id in the form the client asked for.
pub fn uuid_message(id: Uuid, structured: bool) -> shared::Uuid {
    let value = if structured {
        let (most, least) = id.as_u64_pair();
        shared::uuid::Value::Structured(shared::uuid::Structured {
            most_significant_bits: most as i64,
            least_significant_bits: least as i64,
        })
    } else {
        shared::uuid::Value::String(id.hyphenated().to_string())
    };
    shared::Uuid { value: Some(value) }
}

pub fn identifier(stream: &str) -> StreamIdentifier {
    StreamIdentifier {
        stream_name: stream.as_bytes().to_vec().into(),
    }
}

/// The stream a request names; `$all` is not a stream here.
pub fn stream_name(identifier: Option<&StreamIdentifier>) -> Result<String, Status> {
    let bytes = identifier
        .map(|identifier| &identifier.stream_name[..])
        .unwrap_or_default();
    let name = std::str::from_utf8(bytes)
        .map_err(|_| Status::invalid_argument("a stream name must be UTF-8"))?;
    Name::Stream.check(name).map_err(Status::invalid_argument)?;
    Ok(name.to_owned())
}

/// A stream a client may write to or delete: `$`-streams belong to the system.
pub fn writable_stream(identifier: Option<&StreamIdentifier>) -> Result<String, Status> {
    let name = stream_name(identifier)?;
    if let Some(stream) = name.strip_prefix("$$") {
        return Err(Status::invalid_argument(format!(
            "stream metadata is not kept in a stream here: set it with PUT \
             /streams/{stream}/metadata (max_count, max_age_seconds, truncate_before, custom)"
        )));
    }
    check_writable_stream(&name).map_err(Status::invalid_argument)?;
    Ok(name)
}

/// An event to append, from an id, the `type` and `content-type` metadata, custom metadata
/// (empty or a JSON object, which the built-in projections read `$correlationId` from) and data.
/// Data declared JSON is stored as JSON when it is; anything else is stored as bytes.
pub fn new_event(
    id: Option<&shared::Uuid>,
    metadata: &std::collections::HashMap<String, String>,
    custom_metadata: &[u8],
    data: &[u8],
) -> Result<NewEvent, Status> {
    let id = uuid_of(id)?;
    let event_type = metadata.get("type").cloned().unwrap_or_default();
    check_event_type(&event_type).map_err(|reason| {
        Status::invalid_argument(format!("event {id}: the metadata's {reason}"))
    })?;
    let json = metadata.get("content-type").map(String::as_str) == Some("application/json")
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
    let custom_metadata = custom_metadata.trim_ascii();
    let object = custom_metadata.is_empty()
        || (custom_metadata.starts_with(b"{")
            && serde_json::from_slice::<serde::de::IgnoredAny>(custom_metadata).is_ok());
    if !object {
        return Err(Status::invalid_argument(format!(
            "event {id}: custom metadata must be empty or a JSON object"
        )));
    }
    Ok(NewEvent {
        id,
        event_type,
        data: data.to_vec(),
        binary: !json,
        metadata: custom_metadata.to_vec(),
    })
}

/// The fields of EventStoreDB's `RecordedEvent`, which the streams and persistent-subscription
/// protocols each declare; [`recorded_event!`] builds either from them.
pub struct EventFields {
    pub id: shared::Uuid,
    pub stream_identifier: StreamIdentifier,
    pub stream_revision: u64,
    pub position: u64,
    pub metadata: std::collections::HashMap<String, String>,
    pub custom_metadata: bytes::Bytes,
    pub data: bytes::Bytes,
}

/// The event as read and, when it was reached through a link, the link: EventStoreDB's clients
/// ack and resume by the link's id and revision.
pub fn event_fields(event: RecordedEvent, structured: bool) -> (EventFields, Option<EventFields>) {
    let content_type = if event.binary {
        "application/octet-stream"
    } else {
        "application/json"
    };
    // A link read as itself (links not resolved) reads as EventStoreDB's: its own id and its
    // target as bare text, as when it comes beside the event it points at.
    if event.event_type == LINK_TYPE && event.link.is_none() {
        let target = match serde_json::from_slice::<String>(&event.data) {
            Ok(target) => target.into_bytes(),
            Err(_) => event.data,
        };
        let fields = EventFields {
            id: uuid_message(link_id(&event.stream, event.revision), structured),
            stream_identifier: identifier(&event.stream),
            stream_revision: event.revision,
            position: event.position,
            metadata: system_metadata(LINK_TYPE, "application/octet-stream", event.created_ms),
            custom_metadata: event.metadata.into(),
            data: target.into(),
        };
        return (fields, None);
    }
    let fields = EventFields {
        id: uuid_message(event.id, structured),
        stream_identifier: identifier(&event.stream),
        stream_revision: event.revision,
        position: event.position,
        metadata: system_metadata(&event.event_type, content_type, event.created_ms),
        custom_metadata: event.metadata.into(),
        data: event.data.into(),
    };
    let link = event.link.as_ref().map(|link| EventFields {
        id: uuid_message(link_id(&link.stream, link.revision), structured),
        stream_identifier: identifier(&link.stream),
        stream_revision: link.revision,
        position: event.position,
        metadata: system_metadata(LINK_TYPE, "application/octet-stream", event.created_ms),
        custom_metadata: Default::default(),
        data: format!("{}@{}", event.revision, event.stream)
            .into_bytes()
            .into(),
    });
    (fields, link)
}

/// The id of the link at `revision` of `stream`: links in Refract have no id of their own, and
/// this one is the same whenever the link is read.
pub fn link_id(stream: &str, revision: u64) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("refract:link/{stream}/{revision}").as_bytes(),
    )
}

/// The id a client acks a delivery with: the link's when the event came through one.
pub fn original_id(event: &RecordedEvent) -> Uuid {
    match &event.link {
        Some(link) => link_id(&link.stream, link.revision),
        None => event.id,
    }
}

fn system_metadata(
    event_type: &str,
    content_type: &str,
    created_ms: i64,
) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        ("type".to_owned(), event_type.to_owned()),
        ("content-type".to_owned(), content_type.to_owned()),
        (
            "created".to_owned(),
            (created_ms.max(0) * TICKS_PER_MILLISECOND).to_string(),
        ),
    ])
}

/// Builds a protocol's `RecordedEvent` from [`EventFields`].
macro_rules! recorded_event {
    ($type:path, $fields:expr) => {{
        let fields: $crate::grpc::convert::EventFields = $fields;
        $type {
            id: Some(fields.id),
            stream_identifier: Some(fields.stream_identifier),
            stream_revision: fields.stream_revision,
            prepare_position: fields.position,
            commit_position: fields.position,
            metadata: fields.metadata,
            custom_metadata: fields.custom_metadata,
            data: fields.data,
        }
    }};
}
pub(crate) use recorded_event;

/// EventStoreDB's number for an expected version: -2 any, -1 no stream, -4 stream exists.
pub fn version_number(expected: ExpectedRevision) -> i64 {
    match expected {
        ExpectedRevision::Any => -2,
        ExpectedRevision::NoStream => -1,
        ExpectedRevision::StreamExists => -4,
        ExpectedRevision::Exact(revision) => revision as i64,
    }
}

fn with_metadata(mut status: Status, entries: &[(&'static str, String)]) -> Status {
    for (key, value) in entries {
        if let Ok(value) = MetadataValue::try_from(value.as_str()) {
            status.metadata_mut().insert(*key, value);
        }
    }
    status
}

/// A store error as EventStoreDB answers it, about `stream` (`$all` where no stream is involved).
pub fn store_status(error: StoreError, stream: &str) -> Status {
    match error {
        StoreError::WrongExpectedRevision { expected, actual } => {
            let actual = actual.map_or(-1, |revision| revision as i64);
            let expected = version_number(expected);
            with_metadata(
                Status::failed_precondition(format!(
                    "WrongExpectedVersion. Stream: {stream}, Expected version: {expected}, \
                     Actual version: {actual}"
                )),
                &[
                    ("exception", "wrong-expected-version".into()),
                    ("stream-name", stream.to_owned()),
                    ("expected-version", expected.to_string()),
                    ("actual-version", actual.to_string()),
                ],
            )
        }
        StoreError::StreamNotFound(name) => with_metadata(
            Status::not_found(format!("Event stream '{name}' is not found.")),
            &[
                ("exception", "stream-not-found".into()),
                ("stream-name", name),
            ],
        ),
        StoreError::StreamDeleted(name) => stream_deleted(&name),
        StoreError::InvalidRequest(message) => Status::invalid_argument(message),
        StoreError::ShuttingDown => shutting_down(),
        StoreError::NotLeader { leader_url } => not_leader(leader_url.as_deref()),
        StoreError::Unavailable(message) => Status::unavailable(message),
        error @ StoreError::Storage(_) => Status::internal(error.to_string()),
    }
}

pub fn stream_deleted(stream: &str) -> Status {
    with_metadata(
        Status::failed_precondition(format!("Event stream '{stream}' is deleted.")),
        &[
            ("exception", "stream-deleted".into()),
            ("stream-name", stream.to_owned()),
        ],
    )
}

pub fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down")
}

/// EventStoreDB's answer on a follower: the clients reconnect to the leader it names.
fn not_leader(leader_url: Option<&str>) -> Status {
    let status = Status::not_found("Leader info available");
    let Some((host, port)) = leader_url.and_then(host_and_port) else {
        return with_metadata(
            Status::unavailable("this node is not the cluster's leader, and knows of none"),
            &[],
        );
    };
    with_metadata(
        status,
        &[
            ("exception", "not-leader".into()),
            ("leader-endpoint-host", host),
            ("leader-endpoint-port", port.to_string()),
        ],
    )
}

/// `host` and `port` of a node's URL (`http://host:port`).
pub fn host_and_port(url: &str) -> Option<(String, u16)> {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

pub fn access_denied(status: Status) -> Status {
    with_metadata(status, &[("exception", "access-denied".into())])
}

pub fn persistent_status(code: Code, message: String, exception: &'static str) -> Status {
    with_metadata(
        Status::new(code, message),
        &[("exception", exception.into())],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_in_both_forms() {
        let id = Uuid::parse_str("5f3b0b3e-8a7e-4d5c-9a0b-1c2d3e4f5a6b").unwrap();
        for structured in [true, false] {
            assert_eq!(uuid_of(Some(&uuid_message(id, structured))).unwrap(), id);
        }
        // The structured form is the UUID's two big-endian halves, as Java's UUID has them.
        let shared::uuid::Value::Structured(halves) = uuid_message(id, true).value.unwrap() else {
            panic!("structured")
        };
        assert_eq!(halves.most_significant_bits as u64, 0x5f3b_0b3e_8a7e_4d5c);
        assert!(uuid_of(None).is_err());
    }

    #[test]
    fn events_keep_json_only_when_declared_and_valid() {
        let metadata = |content_type: &str| {
            std::collections::HashMap::from([
                ("type".to_owned(), "OrderPlaced".to_owned()),
                ("content-type".to_owned(), content_type.to_owned()),
            ])
        };
        let id = uuid_message(Uuid::new_v4(), false);
        let json = new_event(Some(&id), &metadata("application/json"), b"", b"{\"a\":1}").unwrap();
        assert!(!json.binary);
        let bytes =
            new_event(Some(&id), &metadata("application/octet-stream"), b"", b"{}").unwrap();
        assert!(bytes.binary);
        let invalid = new_event(Some(&id), &metadata("application/json"), b"", b"{").unwrap();
        assert!(invalid.binary);
        let custom = new_event(Some(&id), &metadata("application/json"), b"not json", b"1");
        assert_eq!(custom.unwrap_err().code(), Code::InvalidArgument);
        let untyped = new_event(Some(&id), &Default::default(), b"", b"1");
        assert_eq!(untyped.unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn errors_carry_what_the_clients_read() {
        let status = store_status(
            StoreError::WrongExpectedRevision {
                expected: ExpectedRevision::Exact(3),
                actual: Some(5),
            },
            "order-1",
        );
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "WrongExpectedVersion. Stream: order-1, Expected version: 3, Actual version: 5"
        );
        assert_eq!(status.metadata().get("actual-version").unwrap(), "5");
        let deleted = store_status(StoreError::StreamDeleted("order-1".into()), "order-1");
        assert_eq!(
            deleted.metadata().get("exception").unwrap(),
            "stream-deleted"
        );
        let moved = store_status(
            StoreError::NotLeader {
                leader_url: Some("http://127.0.0.1:2113".into()),
            },
            "$all",
        );
        assert_eq!(
            moved.metadata().get("leader-endpoint-port").unwrap(),
            "2113"
        );
        assert_eq!(host_and_port("http://[::1]:80/x"), Some(("::1".into(), 80)));
    }
}
