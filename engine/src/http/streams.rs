//! Events: append, read a stream, read `$all`, stream metadata, delete.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody, LimitedBody, check_media_type};
use super::openapi::{AnyJson, BASE64_PATTERN, exact_schema};
use crate::names::{Name, check_writable_stream};
use crate::sharding::{MAX_SHARDS, ShardError};
use crate::store::{
    AllFilter, AppendOutcome, Direction, ExpectedRevision, MAX_EVENT_BYTES, MAX_EVENT_TYPE_BYTES,
    NewEvent, RecordedEvent, Slice, StreamMetadata, check_event_type,
};
use crate::subscribe::ShardFilter;

/// The name under which the log of every event is read.
pub const ALL: &str = "$all";
/// Default and largest page size of a read.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 4096;

/// One event to append. Its schema ([`EventBody::schema`]) states every rule [`new_event`]
/// applies, the ones across fields included.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub data: Option<Box<RawValue>>,
    pub data_base64: Option<String>,
    pub content_type: Option<String>,
    pub metadata: Option<Box<RawValue>>,
}

impl EventBody {
    pub fn json_schema() -> serde_json::Value {
        let octets = "application/octet-stream";
        serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["type"],
            "properties": {
                "id": {"type": ["string", "null"], "format": "uuid",
                       "description": "Generated when absent; re-sending the same ids makes \
                                       the append idempotent"},
                "type": {"type": "string", "minLength": 1, "maxLength": MAX_EVENT_TYPE_BYTES,
                         "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
                         "description": "The event type; at most 1024 bytes of UTF-8"},
                "data": {"description": "Any JSON value (`null` when absent)"},
                "data_base64": {"type": ["string", "null"], "contentEncoding": "base64",
                                "pattern": BASE64_PATTERN,
                                "description": "Opaque bytes, base64-encoded, instead of `data`"},
                "content_type": {"enum": ["application/json", octets, null],
                                 "description": "`application/json` with `data`, \
                                                 `application/octet-stream` with `data_base64`"},
                "metadata": {"type": ["object", "null"],
                             "description": "`$correlationId` in it feeds `$by_correlation_id`"},
            },
            "allOf": [
                {"not": {"required": ["data", "data_base64"],
                         "properties": {"data": {"not": {"type": "null"}},
                                        "data_base64": {"type": "string"}}}},
                {"if": {"required": ["content_type"],
                        "properties": {"content_type": {"const": octets}}},
                 "then": {"required": ["data_base64"],
                          "properties": {"data_base64": {"type": "string"}}}},
                {"if": {"required": ["content_type"],
                        "properties": {"content_type": {"const": "application/json"}}},
                 "then": {"properties": {"data_base64": {"type": "null"}}}},
            ],
        })
    }
}

exact_schema!(EventBody);

/// What `POST /streams/{stream}` takes: an event, or a non-empty array of events.
pub struct AppendBody;

impl AppendBody {
    pub fn json_schema() -> serde_json::Value {
        let event = serde_json::json!({"$ref": "#/components/schemas/EventBody"});
        serde_json::json!({"oneOf": [event, {"type": "array", "minItems": 1, "items": event}]})
    }
}

exact_schema!(AppendBody);

/// Where an append landed.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppendResponse {
    pub stream: String,
    pub first_revision: u64,
    pub last_revision: u64,
    pub first_position: u64,
    pub last_position: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AppendQuery {
    /// `any` (default), `no_stream`, `stream_exists` or the revision of the stream's last event.
    /// The `Expected-Revision` header has the same meaning.
    pub expected_revision: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DirectionParam {
    Forward,
    Backward,
}

/// How current a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// What this node has applied (on a follower, possibly behind the leader).
    #[default]
    Applied,
    /// Everything acknowledged before the read began: in a cluster the leader confirms it is
    /// still the leader with a majority (ReadIndex) and waits until it has applied that far; a
    /// follower asks the leader for that index and waits until it has applied that far itself.
    Linearizable,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadAllQuery {
    /// First position to read; default 0 forward, the last position backward.
    pub from: Option<u64>,
    pub direction: Option<DirectionParam>,
    /// Events per page: default 100, at most 4096.
    pub limit: Option<usize>,
    /// Comma-separated stream name prefixes; an event matching any is returned.
    pub stream_prefix: Option<String>,
    /// Comma-separated event type prefixes; an event matching any is returned.
    pub type_prefix: Option<String>,
    /// Also return events of `$`-streams.
    pub include_system: Option<bool>,
    /// `applied` (default) or `linearizable`.
    pub consistency: Option<Consistency>,
    /// With `shards` and `shard`: only the events this stored sharder places on shard `shard`
    /// of `shards`.
    pub sharder: Option<String>,
    #[param(minimum = 1)]
    pub shards: Option<u32>,
    pub shard: Option<u32>,
}

/// What `GET /streams/{stream}` accepts: the stream parameters, or for `$all` reached through a
/// percent-encoded name, the `$all` ones.
#[derive(Debug, Deserialize)]
pub struct AnyReadQuery {
    from: Option<u64>,
    direction: Option<DirectionParam>,
    limit: Option<usize>,
    resolve_links: Option<bool>,
    stream_prefix: Option<String>,
    type_prefix: Option<String>,
    include_system: Option<bool>,
    consistency: Option<Consistency>,
    sharder: Option<String>,
    shards: Option<u32>,
    shard: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Tombstone the stream: reads and appends answer 410 forever.
    pub hard: Option<bool>,
    /// As for appends; the `Expected-Revision` header has the same meaning.
    pub expected_revision: Option<String>,
}

/// Where an event read through a link was reached.
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkJson<'a> {
    pub stream: &'a str,
    pub revision: u64,
}

/// An event as read.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventJson<'a> {
    pub stream: &'a str,
    pub revision: u64,
    pub position: u64,
    #[schema(value_type = String, format = Uuid)]
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// The JSON data; absent for binary events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = AnyJson, required = false)]
    pub data: Option<&'a RawValue>,
    /// Binary data, base64-encoded; present instead of `data` for binary events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// `application/octet-stream` for binary events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'static str>,
    #[schema(value_type = Object)]
    pub metadata: &'a RawValue,
    /// When the event was written, RFC 3339 in UTC with milliseconds.
    pub created: String,
    /// Present when the event was reached through a link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkJson<'a>>,
}

const EMPTY_OBJECT: &str = "{}";

impl<'a> EventJson<'a> {
    pub fn new(event: &'a RecordedEvent) -> Self {
        let empty: &RawValue = serde_json::from_str(EMPTY_OBJECT).expect("valid JSON");
        let metadata = serde_json::from_slice(&event.metadata).unwrap_or(empty);
        // Data is stored as the JSON it arrived as; anything else reads back as bytes.
        let json = (!event.binary)
            .then(|| serde_json::from_slice(&event.data).ok())
            .flatten();
        let (data, data_base64, content_type) = match json {
            Some(data) => (Some(data), None, None),
            None => (
                None,
                Some(BASE64.encode(&event.data)),
                Some("application/octet-stream"),
            ),
        };
        EventJson {
            stream: &event.stream,
            revision: event.revision,
            position: event.position,
            id: event.id,
            event_type: &event.event_type,
            data,
            data_base64,
            content_type,
            metadata,
            created: format_timestamp(event.created_ms),
            link: event.link.as_ref().map(|link| LinkJson {
                stream: &link.stream,
                revision: link.revision,
            }),
        }
    }
}

fn format_timestamp(created_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(created_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadResponse<'a> {
    /// The stream read, or `$all`.
    pub stream: &'a str,
    pub events: Vec<EventJson<'a>>,
    /// The stream's last revision (for `$all`, the last position); `null` when empty.
    pub last_revision: Option<u64>,
    /// The revision (position for `$all`) to read next in the same direction; `null` at the end.
    pub next: Option<u64>,
}

fn page(stream: &str, slice: &Slice) -> Response {
    Json(ReadResponse {
        stream,
        events: slice.events.iter().map(EventJson::new).collect(),
        last_revision: slice.last_revision,
        next: slice.next,
    })
    .into_response()
}

fn expected_revision(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<ExpectedRevision, ApiError> {
    let header = headers
        .get("expected-revision")
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ApiError::invalid("Expected-Revision must be ASCII text"))
        })
        .transpose()?;
    // Both are checked; the header wins when both are given.
    let parse = |text: Option<&str>| text.map(str::parse).transpose().map_err(ApiError::invalid);
    let (header, query) = (parse(header)?, parse(query)?);
    Ok(header.or(query).unwrap_or_default())
}

fn check_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::invalid("limit must be at least 1")),
        limit if limit > MAX_LIMIT => Err(ApiError::invalid(format!(
            "limit must be at most {MAX_LIMIT}"
        ))),
        limit => Ok(limit),
    }
}

fn direction(param: Option<DirectionParam>) -> Direction {
    match param {
        Some(DirectionParam::Backward) => Direction::Backward,
        _ => Direction::Forward,
    }
}

/// A name a client may write to: valid, and not reserved for the system.
fn writable_stream(name: &str) -> Result<(), ApiError> {
    check_writable_stream(name).map_err(ApiError::invalid)
}

pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    check_media_type(headers, "application/json", |media_type| {
        media_type == "application/json" || media_type.ends_with("+json")
    })
}

/// Turns the request body into events, checking every rule before anything is written.
fn parse_events(body: &[u8]) -> Result<Vec<NewEvent>, ApiError> {
    // Raw JSON values cannot pass through serde's untagged enums, so pick the shape by hand.
    let first = body.iter().find(|byte| !byte.is_ascii_whitespace());
    let events = match first {
        Some(b'[') => serde_json::from_slice::<Vec<EventBody>>(body),
        _ => serde_json::from_slice::<EventBody>(body).map(|event| vec![event]),
    }
    .map_err(|error| {
        ApiError::invalid(format!(
            "the body must be an event or an array of events: {error}"
        ))
    })?;
    if events.is_empty() {
        return Err(ApiError::invalid(
            "the body must contain at least one event",
        ));
    }
    events
        .into_iter()
        .enumerate()
        .map(|(index, event)| new_event(index, event))
        .collect()
}

fn new_event(index: usize, body: EventBody) -> Result<NewEvent, ApiError> {
    let invalid = |reason: String| ApiError::invalid(format!("event {index}: {reason}"));
    let id = match body.id {
        // The hyphenated form only, as the schema's `uuid` format says.
        Some(id) => Some(&id)
            .filter(|id| id.len() == 36)
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| invalid(format!("id {id:?} is not a UUID")))?,
        None => Uuid::new_v4(),
    };
    let event_type = body.event_type.unwrap_or_default();
    check_event_type(&event_type).map_err(invalid)?;
    let content_type = body.content_type.as_deref();
    let (data, binary) = match (body.data, body.data_base64) {
        (Some(_), Some(_)) => {
            return Err(invalid("give either data or data_base64, not both".into()));
        }
        (Some(data), None) => (data.get().as_bytes().to_vec(), false),
        (None, Some(encoded)) => {
            let bytes = BASE64
                .decode(encoded.as_bytes())
                .map_err(|error| invalid(format!("data_base64 is not valid base64: {error}")))?;
            (bytes, true)
        }
        (None, None) => (b"null".to_vec(), false),
    };
    match (content_type, binary) {
        (None | Some("application/json"), false)
        | (None | Some("application/octet-stream"), true) => {}
        (Some(content_type), _) => {
            let field = if binary { "data_base64" } else { "data" };
            return Err(invalid(format!(
                "content_type {content_type:?} does not fit {field}"
            )));
        }
    }
    let metadata = match body.metadata {
        Some(metadata) if metadata.get().trim_start().starts_with('{') => {
            metadata.get().as_bytes().to_vec()
        }
        Some(metadata) if metadata.get() == "null" => Vec::new(),
        Some(_) => return Err(invalid("metadata must be a JSON object".into())),
        None => Vec::new(),
    };
    let event = NewEvent {
        id,
        event_type,
        data,
        binary,
        metadata,
    };
    if event.size() > MAX_EVENT_BYTES {
        return Err(ApiError::too_large(format!(
            "event {index} is {} bytes; the limit is {MAX_EVENT_BYTES} bytes (16 MiB)",
            event.size()
        )));
    }
    Ok(event)
}

/// Append events to a stream, atomically.
#[utoipa::path(
    post,
    path = "/streams/{stream}",
    tag = "events",
    params(("stream" = String, Path, description = "Stream name"), AppendQuery,
           ("Expected-Revision" = Option<String>, Header, description = "As expected_revision")),
    request_body(content = AppendBody, content_type = "application/json",
        description = "An event, or an array of events appended together"),
    responses(
        (status = 200, description = "Appended (or an idempotent re-send)", body = AppendResponse),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 410, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
    )
)]
pub async fn append(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<AppendQuery>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<AppendResponse>, ApiError> {
    writable_stream(&stream)?;
    let expected = expected_revision(&headers, query.expected_revision.as_deref())?;
    check_content_type(&headers)?;
    let events = parse_events(&body)?;
    let AppendOutcome {
        first_revision,
        last_revision,
        first_position,
        last_position,
    } = state.store.append(stream.clone(), expected, events).await?;
    Ok(Json(AppendResponse {
        stream,
        first_revision,
        last_revision,
        first_position,
        last_position,
    }))
}

/// Read a stream forward or backward. `$all` is read here too (see `GET /streams/$all`).
#[utoipa::path(
    get,
    path = "/streams/{stream}",
    tag = "events",
    params(
        ("stream" = String, Path, description = "Stream name"),
        ("from" = Option<u64>, Query,
            description = "First revision to read; default 0 forward, the last revision backward"),
        ("direction" = Option<DirectionParam>, Query, description = "forward (default) or backward"),
        ("limit" = Option<usize>, Query, description = "Events per page: default 100, at most 4096"),
        ("resolve_links" = Option<bool>, Query,
            description = "Return the events links point at (default true) instead of the links"),
        ("consistency" = Option<Consistency>, Query,
            description = "`applied` (default) or `linearizable`"),
        ("sharder" = Option<String>, Query, description = "With `shards` and `shard`: only the \
            events this stored sharder places on shard `shard` of `shards`"),
        ("shards" = Option<u32>, Query, minimum = 1),
        ("shard" = Option<u32>, Query),
    ),
    responses(
        (status = 200, description = "A page of events", body = ReadResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub async fn read_stream(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<AnyReadQuery>,
) -> Result<Response, ApiError> {
    if stream == ALL {
        // `$all` holds no links: `resolve_links` changes nothing there, as on `/streams/$all`.
        let AnyReadQuery {
            from,
            direction,
            limit,
            stream_prefix,
            type_prefix,
            include_system,
            consistency,
            sharder,
            shards,
            shard,
            ..
        } = query;
        let query = ReadAllQuery {
            from,
            direction,
            limit,
            stream_prefix,
            type_prefix,
            include_system,
            consistency,
            sharder,
            shards,
            shard,
        };
        return read_all_pages(state, query).await;
    }
    Name::Stream.check(&stream).map_err(ApiError::invalid)?;
    if query.stream_prefix.is_some()
        || query.type_prefix.is_some()
        || query.include_system.is_some()
    {
        return Err(ApiError::invalid(
            "stream_prefix, type_prefix and include_system apply to $all only",
        ));
    }
    let limit = check_limit(query.limit)?;
    let direction = direction(query.direction);
    let resolve_links = query.resolve_links.unwrap_or(true);
    let shard = shard_filter(&state, query.sharder, query.shards, query.shard)?;
    super::cluster::linearize(&state, query.consistency).await?;
    let name = stream.clone();
    let slice = state
        .store
        .blocking(move |store| {
            let read =
                |from, limit| store.read_stream(&name, from, direction, limit, resolve_links);
            match &shard {
                None => read(query.from, limit),
                Some(shard) => shard.read_page(query.from, direction, limit, read, |event| {
                    event
                        .link
                        .as_ref()
                        .map_or(event.revision, |link| link.revision)
                }),
            }
        })
        .await?;
    Ok(page(&stream, &slice))
}

/// Read the log of every event, with optional prefix filters.
#[utoipa::path(
    get,
    path = "/streams/$all",
    tag = "events",
    params(ReadAllQuery),
    responses(
        (status = 200, description = "A page of events; `next` is a position", body = ReadResponse),
        (status = 400, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub async fn read_all(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReadAllQuery>,
) -> Result<Response, ApiError> {
    read_all_pages(state, query).await
}

async fn read_all_pages(state: AppState, query: ReadAllQuery) -> Result<Response, ApiError> {
    let limit = check_limit(query.limit)?;
    let direction = direction(query.direction);
    let filter = all_filter(
        query.stream_prefix.as_deref(),
        query.type_prefix.as_deref(),
        query.include_system,
    );
    let shard = shard_filter(&state, query.sharder, query.shards, query.shard)?;
    super::cluster::linearize(&state, query.consistency).await?;
    let slice = state
        .store
        .blocking(move |store| {
            let read = |from, limit| store.read_all(from, direction, limit, &filter);
            match &shard {
                None => read(query.from, limit),
                Some(shard) => {
                    shard.read_page(query.from, direction, limit, read, |event| event.position)
                }
            }
        })
        .await?;
    Ok(page(ALL, &slice))
}

/// A read's or subscription's `sharder`, `shards` and `shard`: all three or none.
pub(super) fn shard_filter(
    state: &AppState,
    sharder: Option<String>,
    shards: Option<u32>,
    shard: Option<u32>,
) -> Result<Option<ShardFilter>, ApiError> {
    let (name, shards, shard) = match (sharder, shards, shard) {
        (None, None, None) => return Ok(None),
        (Some(name), Some(shards), Some(shard)) => (name, shards, shard),
        _ => {
            return Err(ApiError::invalid(
                "sharder, shards and shard go together: give all three or none",
            ));
        }
    };
    if shards == 0 || shards > MAX_SHARDS {
        return Err(ApiError::invalid(format!(
            "shards must be between 1 and {MAX_SHARDS}"
        )));
    }
    if shard >= shards {
        return Err(ApiError::invalid(format!(
            "shard {shard} is not among shards 0 to {}",
            shards - 1
        )));
    }
    let sharder = match state.processing()?.sharders.get(&name) {
        Ok(sharder) => sharder,
        Err(ShardError::NotFound(_)) => {
            return Err(ApiError::invalid(format!("no sharder is named {name:?}")));
        }
        Err(error) => return Err(ApiError::invalid(error.to_string())),
    };
    Ok(Some(ShardFilter {
        sharder,
        name,
        shards,
        shard,
    }))
}

pub fn all_filter(
    stream_prefix: Option<&str>,
    type_prefix: Option<&str>,
    include_system: Option<bool>,
) -> AllFilter {
    let prefixes = |list: Option<&str>| -> Vec<String> {
        list.map(|list| {
            list.split(',')
                .filter(|prefix| !prefix.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
    };
    AllFilter {
        stream_prefixes: prefixes(stream_prefix),
        type_prefixes: prefixes(type_prefix),
        include_system: include_system.unwrap_or(false),
    }
}

/// Delete a stream: soft (reads 404, a later append continues the numbering) or hard (410 forever).
#[utoipa::path(
    delete,
    path = "/streams/{stream}",
    tag = "events",
    params(("stream" = String, Path, description = "Stream name"), DeleteQuery,
           ("Expected-Revision" = Option<String>, Header, description = "As expected_revision")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 410, body = ErrorBody),
    )
)]
pub async fn delete_stream(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    writable_stream(&stream)?;
    let expected = expected_revision(&headers, query.expected_revision.as_deref())?;
    state
        .store
        .delete(stream, expected, query.hard.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn metadata_stream(name: &str) -> Result<(), ApiError> {
    Name::Stream.check(name).map_err(ApiError::invalid)?;
    if name == ALL {
        return Err(ApiError::not_found(
            "$all has no metadata: it is the log of every stream",
        ));
    }
    Ok(())
}

/// A stream's metadata (all fields `null` when none was set).
#[utoipa::path(
    get,
    path = "/streams/{stream}/metadata",
    tag = "events",
    params(("stream" = String, Path, description = "Stream name")),
    responses(
        (status = 200, body = StreamMetadata),
        (status = 400, body = ErrorBody), (status = 404, description = "`$all`, which has none",
            body = ErrorBody), (status = 410, body = ErrorBody),
    )
)]
pub async fn get_metadata(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<StreamMetadata>, ApiError> {
    metadata_stream(&stream)?;
    let metadata = state
        .store
        .blocking(move |store| store.metadata(&stream))
        .await?;
    Ok(Json(metadata.unwrap_or_default()))
}

/// Replace a stream's metadata: limits hide events from reads of the stream.
#[utoipa::path(
    put,
    path = "/streams/{stream}/metadata",
    tag = "events",
    params(("stream" = String, Path, description = "Stream name")),
    request_body(content = StreamMetadata, content_type = "application/json"),
    responses(
        (status = 200, body = StreamMetadata),
        (status = 400, body = ErrorBody), (status = 404, description = "`$all`, which has none",
            body = ErrorBody), (status = 410, body = ErrorBody),
        (status = 415, body = ErrorBody),
    )
)]
pub async fn put_metadata(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<StreamMetadata>, ApiError> {
    metadata_stream(&stream)?;
    check_content_type(&headers)?;
    let metadata: StreamMetadata = crate::json::from_slice(&body)
        .map_err(|error| ApiError::invalid(format!("invalid metadata: {error}")))?;
    state.store.set_metadata(stream, metadata.clone()).await?;
    Ok(Json(metadata))
}
