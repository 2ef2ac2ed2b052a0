//! Connectors: define, inspect, start, stop, reset and delete Kafka sinks and sources.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::{ApiError, ApiPath, ErrorBody, LimitedBody};
use super::openapi::name_schema;
use super::streams::check_content_type;
use crate::connectors::definition::{BOOTSTRAP_PATTERN, TOPIC_PATTERN};
use crate::connectors::{ConnectorError, Definition, Info};
use crate::names::{MAX_STREAM_NAME_BYTES, Name};
use crate::store::MAX_EVENT_TYPE_BYTES;

impl From<ConnectorError> for ApiError {
    fn from(error: ConnectorError) -> Self {
        match error {
            ConnectorError::NotFound(_) => ApiError::not_found(error.to_string()),
            ConnectorError::Invalid(message) => ApiError::invalid(message),
            ConnectorError::NoSharder(_) | ConnectorError::NoProjection(_) => {
                ApiError::not_found(error.to_string())
            }
            ConnectorError::Store(error) => error.into(),
        }
    }
}

/// Every connector, with its status.
#[utoipa::path(get, path = "/connectors", tag = "connectors",
    responses((status = 200, body = Vec<Info>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Info>>, ApiError> {
    Ok(Json(state.processing()?.connectors.list().await))
}

/// A connector's definition and status: `running|stopped|faulted`, its position (sink) or
/// offsets (source), lag, rate and last error.
#[utoipa::path(get, path = "/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = Info), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Info>, ApiError> {
    Ok(Json(state.processing()?.connectors.get(&name).await?))
}

/// Create a connector (201; it starts at once) or replace its definition (200; it keeps
/// running or stopped, and keeps its checkpoint while kind, topic and source stay).
#[utoipa::path(put, path = "/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    request_body(content = Definition, content_type = "application/json"),
    responses((status = 201, body = Info), (status = 200, body = Info),
        (status = 400, body = ErrorBody),
        (status = 404, description = "The sharder or projection it names does not exist",
            body = ErrorBody),
        (status = 415, body = ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    check_content_type(&headers)?;
    let definition = Definition::parse(&body).map_err(ApiError::invalid)?;
    let (created, info) = state
        .processing()?
        .connectors
        .put(&name, definition)
        .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(info)).into_response())
}

/// Delete a connector and its checkpoint (what it wrote stays).
#[utoipa::path(delete, path = "/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.processing()?.connectors.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a stopped or faulted connector from its checkpoint.
#[utoipa::path(post, path = "/connectors/{name}/start", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = Info), (status = 404, body = ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Info>, ApiError> {
    Ok(Json(state.processing()?.connectors.start(&name).await?))
}

/// Stop a connector; its checkpoint is kept.
#[utoipa::path(post, path = "/connectors/{name}/stop", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = Info), (status = 404, body = ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Info>, ApiError> {
    Ok(Json(state.processing()?.connectors.stop(&name).await?))
}

/// Forget a connector's checkpoint: it begins again from `start_from` (a sink still sends only
/// what the topic's partitions do not hold; a source lands the records again).
#[utoipa::path(post, path = "/connectors/{name}/reset", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = Info), (status = 404, body = ErrorBody)))]
pub async fn reset(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Info>, ApiError> {
    Ok(Json(state.processing()?.connectors.reset(&name).await?))
}

/// The connectors' schemas, stated exactly: a definition is one of two shapes told apart by
/// `kind`, and a connector's status is its definition's fields with the status beside them.
pub(super) fn exact_schemas() -> Vec<(&'static str, Value)> {
    let definition = |kind: &str| match kind {
        "kafka-sink" => sink_properties(),
        _ => source_properties(),
    };
    let variant = |kind: &str, with_status: bool| {
        let mut properties = definition(kind);
        let mut required = vec!["kind", "bootstrap_servers", "topic"];
        if with_status {
            properties.extend(status_properties());
            required.extend([
                "name",
                "status",
                "connected",
                "position",
                "offsets",
                "lag",
                "events",
                "events_per_second",
                "last_error",
            ]);
        }
        json!({"type": "object", "title": kind, "required": required,
               "additionalProperties": false, "properties": properties})
    };
    vec![
        (
            "ConnectorDefinition",
            json!({"description": "A connector's definition: `kafka-sink` sends Refract's events \
                to a Kafka topic, `kafka-source` lands a topic's records in streams",
                "oneOf": [variant("kafka-sink", false), variant("kafka-source", false)]}),
        ),
        (
            "ConnectorInfo",
            json!({"description": "A connector's definition and status",
                "oneOf": [variant("kafka-sink", true), variant("kafka-source", true)]}),
        ),
    ]
}

fn kafka_properties(kind: &str) -> Map<String, Value> {
    let mut properties = Map::new();
    properties.insert("kind".into(), json!({"const": kind}));
    properties.insert(
        "bootstrap_servers".into(),
        json!({"type": "string", "pattern": BOOTSTRAP_PATTERN,
               "description": "host:port of one or more brokers, comma-separated"}),
    );
    properties.insert(
        "topic".into(),
        json!({"type": "string", "pattern": TOPIC_PATTERN}),
    );
    properties
}

fn sink_properties() -> Map<String, Value> {
    let mut properties = kafka_properties("kafka-sink");
    let controls = r"\u0000-\u001f\u007f-\u009f";
    let optional_text = json!({"type": ["string", "null"]});
    properties.extend([
        (
            "source".into(),
            json!({"type": "string", "minLength": 1, "maxLength": MAX_STREAM_NAME_BYTES,
                   "pattern": format!(r"^(\$all|\$ce-[^{controls}]*|[^${controls}][^{controls}]*)$"),
                   "description": "`$all` (default), a stream, or `$ce-<category>`"}),
        ),
        ("stream_prefix".into(), optional_text.clone()),
        ("type_prefix".into(), optional_text),
        (
            "start_from".into(),
            json!({"description": "Where a sink without a checkpoint begins (default `start`)",
                   "oneOf": [{"type": "string", "enum": ["start", "end"]},
                             {"type": "integer", "minimum": 0, "maximum": u64::MAX}]}),
        ),
        (
            "partitioning".into(),
            json!({"description": "`stream` (default): Kafka's default partitioner on the stream \
                       name; or an uploaded sharder",
                   "oneOf": [{"const": "stream"},
                             {"type": "object", "required": ["sharder"],
                              "additionalProperties": false,
                              "properties": {"sharder": name_schema(Name::Sharder, true)}}]}),
        ),
        (
            "compression".into(),
            json!({"type": "string", "enum": ["none", "gzip", "lz4", "snappy", "zstd"]}),
        ),
        (
            "wait_for_broker_ack".into(),
            json!({"const": true, "description": "Always true: the sink waits for acks=all"}),
        ),
    ]);
    properties
}

fn source_properties() -> Map<String, Value> {
    let mut properties = kafka_properties("kafka-source");
    let strategy = |strategy: &str, value: Value, required: bool| {
        let required = if required {
            json!(["strategy", "value"])
        } else {
            json!(["strategy"])
        };
        json!({"type": "object", "additionalProperties": false, "required": required,
               "properties": {"strategy": {"const": strategy}, "value": value}})
    };
    let event_type = json!({"type": "string", "minLength": 1, "maxLength": MAX_EVENT_TYPE_BYTES});
    properties.extend([
        (
            "stream".into(),
            json!({"description": "The stream a record lands in: the topic's (default), the \
                key's (after the prefix `value`), a header's (named `value`), `value`, or the \
                partition key the projection `value` gives the record",
            "oneOf": [
                strategy("topic", json!({"type": ["string", "null"]}), false),
                strategy("key", json!({"type": ["string", "null"]}), false),
                strategy("header", json!({"type": "string"}), true),
                strategy("fixed", name_schema(Name::Stream, true), true),
                strategy("projection", name_schema(Name::Projection, true), true),
            ]}),
        ),
        (
            "event_type".into(),
            json!({"description": "A fixed type, or a header's value (default: the topic's name)",
            "oneOf": [
                {"type": "null"},
                event_type.clone(),
                {"type": "object", "additionalProperties": false, "required": ["header"],
                 "properties": {"header": {"type": "string", "minLength": 1},
                                "default": {"oneOf": [{"type": "null"}, event_type]}}},
            ]}),
        ),
        (
            "start_from".into(),
            json!({"type": "string", "enum": ["earliest", "latest"]}),
        ),
    ]);
    properties
}

fn status_properties() -> Map<String, Value> {
    let count = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX});
    Map::from_iter([
        ("name".into(), json!({"type": "string"})),
        (
            "status".into(),
            json!({"type": "string", "enum": ["running", "stopped", "faulted"]}),
        ),
        ("connected".into(), json!({"type": "boolean"})),
        (
            "position".into(),
            json!({"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX}),
        ),
        (
            "offsets".into(),
            json!({"type": "object", "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                   "additionalProperties": {"type": "integer"}}),
        ),
        ("lag".into(), count.clone()),
        ("events".into(), count),
        (
            "events_per_second".into(),
            json!({"type": "number", "minimum": 0}),
        ),
        ("last_error".into(), json!({"type": ["string", "null"]})),
    ])
}
