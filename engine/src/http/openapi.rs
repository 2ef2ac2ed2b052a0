//! The OpenAPI document: what every operation says of itself (its `#[utoipa::path]`), plus what
//! is the same everywhere, stated once here from the rules the handlers apply:
//!
//! - parameters with the same name mean the same thing on every route (a stream name, a group
//!   name, a page limit, an expected revision…), so their schemas come from [`crate::names`] and
//!   the parsers below rather than from forty annotations;
//! - the answers every operation can give besides its own: `400` when it takes parameters or a
//!   body, `413`/`415` when it takes a body, `401`/`403` when it needs a role.

use serde_json::{Value, json};
use utoipa::openapi::path::{Operation, Parameter, ParameterIn};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, ResponseBuilder};

use super::sharders::ShardRequest;
use super::streams::{AppendBody, EventBody};
use crate::names::{MAX_NAME_BYTES, MAX_STREAM_NAME_BYTES, Name};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Refract", description = "An event store with durable streams, projections and \
        consumer groups. Errors are `{\"error\": code, \"message\": sentence}`. Names are limited \
        in bytes of UTF-8; the schemas' `maxLength` counts characters, so a name of non-ASCII \
        characters meets the byte limit first."),
    tags(
        (name = "events", description = "Append, read, metadata, delete"),
        (name = "subscriptions", description = "Catch-up then live, as Server-Sent Events"),
        (name = "projections", description = "System and user projections"),
        (name = "sharders", description = "Sharding functions"),
        (name = "groups", description = "Consumer groups (persistent subscriptions)"),
        (name = "connectors", description = "Kafka sinks and sources, exactly once"),
        (name = "operations", description = "Health, info, metrics, this document"),
    ),
    components(schemas(
        super::error::ErrorBody,
        super::groups::AssignmentJson,
        super::streams::Consistency
    ))
)]
pub struct ApiDoc;

/// The grammar of an expected revision, in headers and queries alike.
pub const EXPECTED_REVISION_PATTERN: &str = "^(any|no_stream|stream_exists|[0-9]{1,19})$";
/// A revision or position in text, as [`crate::store::parse_revision`] reads it.
pub const REVISION_PATTERN: &str = "^[0-9]{1,19}$";
/// Where a subscription starts.
pub const FROM_PATTERN: &str = "^(start|end|[0-9]{1,19})$";
/// Standard base64 with padding and no stray bits, as `data_base64` is decoded.
pub const BASE64_PATTERN: &str =
    "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";
/// Events per page of a read.
pub const MAX_LIMIT: usize = 4096;

/// Completes the document built from the routes.
fn complete(document: &mut OpenApi) {
    let system_projections: Vec<Value> = crate::store::SystemIndex::ALL
        .iter()
        .map(|index| json!(index.name()))
        .collect();
    for (path, item) in document.paths.paths.iter_mut() {
        for (method, operation) in [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
        ] {
            let Some(operation) = operation else { continue };
            for parameter in operation.parameters.iter_mut().flatten() {
                if let Some(schema) = parameter_schema(path, method, parameter, &system_projections)
                {
                    parameter.schema = Some(RefOr::T(schema));
                }
            }
            // Every node answers reads of the projections from the data it applied.
            let on_leader = ["/projections", "/groups", "/sharders", "/connectors"]
                .iter()
                .any(|prefix| path.starts_with(prefix))
                && !(method == "get" && path.starts_with("/projections"));
            add_common_responses(operation, on_leader);
        }
    }
}

/// The schema of a parameter that means the same on every route; `None` keeps its own.
fn parameter_schema(
    path: &str,
    method: &str,
    parameter: &Parameter,
    system_projections: &[Value],
) -> Option<Schema> {
    let in_path = matches!(parameter.parameter_in, ParameterIn::Path);
    let schema = match (parameter.name.as_str(), in_path) {
        ("stream", true) => {
            // Clients write only to names outside the system's `$`.
            let written = path == "/streams/{stream}" && method != "get";
            name_schema(Name::Stream, written)
        }
        ("group", true) => name_schema(Name::Group, false),
        ("name", true) if path.starts_with("/sharders/") => name_schema(Name::Sharder, true),
        ("name", true) if path.starts_with("/connectors/") => {
            name_schema(Name::Connector, method == "put")
        }
        ("name", true) if path == "/projections/{name}/config" => {
            json!({"type": "string", "enum": system_projections})
        }
        ("name", true) => name_schema(Name::Projection, method == "put"),
        ("consumer", false) => name_schema(Name::Consumer, false),
        ("limit", false) => json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
        ("partition" | "prefix" | "after" | "key", _) => return None,
        ("direction", false) => json!({"type": "string", "enum": ["forward", "backward"]}),
        ("from", false) if path.ends_with("/subscribe") => {
            json!({"type": "string", "pattern": FROM_PATTERN})
        }
        ("expected_revision" | "Expected-Revision", false) => {
            json!({"type": "string", "pattern": EXPECTED_REVISION_PATTERN})
        }
        ("Last-Event-ID", false) => json!({"type": "string", "pattern": REVISION_PATTERN}),
        _ => return None,
    };
    Some(serde_json::from_value(schema).expect("a valid schema"))
}

/// What [`Name::check`] accepts: characters other than controls, and for projections and
/// sharders (and streams clients write to) no leading `$`; projection and sharder names are
/// one path segment, so no `/` either.
pub(super) fn name_schema(kind: Name, reserved: bool) -> Value {
    let max = match kind {
        Name::Stream => MAX_STREAM_NAME_BYTES,
        _ => MAX_NAME_BYTES,
    };
    let controls = r"\u0000-\u001f\u007f-\u009f";
    let pattern = match (kind, reserved) {
        (Name::Projection | Name::Sharder | Name::Connector, true) => {
            format!("^[^${controls}/][^{controls}/]*$")
        }
        (_, true) => format!("^[^${controls}][^{controls}]*$"),
        (_, false) => format!("^[^{controls}]+$"),
    };
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": pattern})
}

/// The error answers many operations share; `on_leader`: the operation is answered by a
/// cluster's leader only ([`crate::processing`]).
fn add_common_responses(operation: &mut Operation, on_leader: bool) {
    let takes_input = operation
        .parameters
        .as_ref()
        .is_some_and(|parameters| !parameters.is_empty())
        || operation.request_body.is_some();
    let mut common = Vec::new();
    if takes_input {
        common.push((
            "400",
            "A parameter, header or body breaks the rules; the message says which",
        ));
    }
    if operation.request_body.is_some() {
        common.push((
            "413",
            "The body, or an event in it, is larger than the limit",
        ));
        common.push(("415", "The body is not of the documented media type"));
    }
    if operation.security.is_some() {
        common.push(("401", "No bearer token, or one the server does not know"));
        common.push(("403", "The token's role may not do this"));
    }
    let linearizable = operation
        .parameters
        .iter()
        .flatten()
        .any(|parameter| parameter.name == "consistency");
    if linearizable {
        common.push((
            "503",
            "A linearizable read could not be confirmed: no leader answered, or this node did not \
             apply as far in time",
        ));
    }
    if on_leader {
        common.push((
            "421",
            "This node of a cluster is not its leader, which runs the projections, groups and \
             sharders: `leader_url` and the `Refract-Leader` header name it",
        ));
        common.push((
            "503",
            "This node has just become a cluster's leader and is starting the projections, \
             groups and sharders; ask again",
        ));
    }
    for (status, description) in common {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(error_response(description)));
    }
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build()
}

/// Gives a type a placeholder schema that [`document`] replaces with the exact JSON Schema from
/// [`exact_schemas`]: utoipa's model has no `const`, `if`/`then`, untyped values and the like.
macro_rules! exact_schema {
    ($type:ty) => {
        impl utoipa::PartialSchema for $type {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new().into()
            }
        }

        impl utoipa::ToSchema for $type {}
    };
}
pub(crate) use exact_schema;

/// The schemas stated as JSON Schema, by name.
fn exact_schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("EventBody", EventBody::json_schema()),
        ("AppendBody", AppendBody::json_schema()),
        ("ShardRequest", ShardRequest::json_schema()),
        (
            "AckId",
            json!({"type": "string", "pattern": "^p?[0-9]{1,19}$"}),
        ),
        ("AnyJson", json!({"description": "Any JSON value"})),
        (
            "Strategy",
            json!({
                "description": "How messages are spread over the group's consumers",
                "oneOf": [
                    {"type": "string", "enum":
                        ["round_robin", "dispatch_to_single", "pinned", "pinned_by_correlation"]},
                    {"type": "object", "required": ["sharded"], "additionalProperties": false,
                     "properties": {"sharded": name_schema(Name::Sharder, true)}},
                    {"type": "object", "required": ["partitioned"], "additionalProperties": false,
                     "properties": {"partitioned": {
                        "type": "object", "required": ["sharder", "partitions"],
                        "additionalProperties": false,
                        "properties": {
                            "sharder": name_schema(Name::Sharder, true),
                            "partitions": {"type": "integer", "minimum": 1,
                                           "maximum": crate::groups::settings::MAX_PARTITIONS},
                        }}}},
                ],
            }),
        ),
        (
            "ErrorBody",
            json!({
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "description": "A stable code: \
                        `invalid_request`, `unauthorized`, `forbidden`, `not_found`, \
                        `stream_not_found`, `wrong_expected_revision`, `stream_deleted`, \
                        `conflict`, `not_delivered`, `max_subscribers_reached`, `in_use`, \
                        `stale_generation`, `not_owner`, \
                        `payload_too_large`, `unsupported_media_type`, `not_leader`, `internal`"},
                    "message": {"type": "string", "description": "What went wrong, for a person"},
                    "expected": {
                        "description": "With `wrong_expected_revision`: the expected revision",
                        "oneOf": [
                            {"type": "string", "enum": ["any", "no_stream", "stream_exists"]},
                            {"type": "integer", "minimum": 0, "maximum": u64::MAX},
                        ],
                    },
                    "actual": {
                        "description": "With `wrong_expected_revision`: the stream's last \
                            revision, `null` when it has none",
                        "type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX,
                    },
                    "leader_url": {
                        "description": "With `not_leader`: where the cluster's leader listens, \
                            `null` while there is none (the same URL is in the `Refract-Leader` \
                            header)",
                        "type": ["string", "null"],
                    },
                },
            }),
        ),
        (
            "Component",
            json!({"type": "string", "format": "binary", "contentMediaType": "application/wasm"}),
        ),
        (
            "EventStream",
            sse_schema(&[
                ("event", Some(REVISION_PATTERN), schema_ref("EventJson")),
                ("caught_up", None, json!({"type": "object"})),
            ]),
        ),
        (
            "MessageStream",
            sse_schema(&[
                (
                    "message",
                    Some("^p?[0-9]{1,19}$"),
                    schema_ref("MessageJson"),
                ),
                ("assignment", None, schema_ref("AssignmentJson")),
            ]),
        ),
        (
            "PartitionOffsets",
            json!({
                "description": "Per partition number, the offset of the last message processed",
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                "additionalProperties": {"type": "integer", "minimum": 0, "maximum": u64::MAX},
            }),
        ),
    ]
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// A Server-Sent Events response: each event an object of `event`, `id` and `data` (JSON text
/// of the schema given), as event-stream validators read them.
fn sse_schema(events: &[(&str, Option<&str>, Value)]) -> Value {
    let variants: Vec<Value> = events
        .iter()
        .map(|(name, id_pattern, data)| {
            let mut required = vec!["event", "data"];
            let mut properties = json!({
                "event": {"const": name},
                "data": {"type": "string", "contentMediaType": "application/json",
                         "contentSchema": data},
            });
            if let Some(pattern) = id_pattern {
                required.push("id");
                properties["id"] = json!({"type": "string", "pattern": pattern});
            }
            json!({"type": "object", "required": required, "properties": properties})
        })
        .collect();
    json!({"oneOf": variants})
}

/// Any JSON value.
pub struct AnyJson;
exact_schema!(AnyJson);

/// A WebAssembly component, as uploaded and downloaded.
pub struct Component;
exact_schema!(Component);

/// The events of a subscription: each event with its revision (or position) as id, and one
/// `caught_up`.
pub struct EventStream;
exact_schema!(EventStream);

/// The messages of a group's push delivery, each with its ack id as id.
pub struct MessageStream;
exact_schema!(MessageStream);

/// The finished document, as served.
pub fn document(mut document: OpenApi) -> Value {
    complete(&mut document);
    let mut json = serde_json::to_value(&document).expect("the document serialises");
    let schemas = &mut json["components"]["schemas"];
    for (name, schema) in exact_schemas()
        .into_iter()
        .chain(super::connectors::exact_schemas())
    {
        schemas[name] = schema;
    }
    bound_unsigned(&mut json);
    json
}

/// Gives every unsigned integer the range of its width, which JSON Schema does not read from
/// the format, and the format its registered name (utoipa writes `u-int64`).
fn bound_unsigned(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            let width = match fields.get("format").and_then(Value::as_str) {
                Some("u-int8" | "uint8") => Some(("uint8", json!(u8::MAX))),
                Some("u-int16" | "uint16") => Some(("uint16", json!(u16::MAX))),
                Some("u-int32" | "uint32") => Some(("uint32", json!(u32::MAX))),
                Some("u-int64" | "uint64") => Some(("uint64", json!(u64::MAX))),
                _ => None,
            };
            if let Some((format, maximum)) = width {
                fields.insert("format".into(), json!(format));
                fields.entry("maximum").or_insert(maximum);
                fields.entry("minimum").or_insert(json!(0));
            }
            fields.values_mut().for_each(bound_unsigned);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_unsigned),
        _ => {}
    }
}
