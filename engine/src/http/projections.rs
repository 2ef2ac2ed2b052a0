//! Projections: list, status, deploy and delete, start/stop/reset, state and table queries,
//! configuration of the system projections.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::cluster::linearize;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody, LimitedBody, check_media_type};
use super::openapi::{AnyJson, Component};
use super::streams::{Consistency, EventJson};
use crate::projections::{
    ConfigChange, DeployOptions, Emitted, Mode, OnError, ProjectionError, ProjectionStatus,
};
use crate::store::IndexConfig;

/// Most rows, partitions or parked events one page returns.
const MAX_PAGE: usize = 4096;

/// A page's `limit`: 100 by default, 1 to [`MAX_PAGE`].
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(100) {
        limit @ 1..=MAX_PAGE => Ok(limit),
        _ => Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_PAGE}"
        ))),
    }
}

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::NotFound(_) | ProjectionError::Missing(_) => {
                ApiError::not_found(error.to_string())
            }
            ProjectionError::Invalid(message) => ApiError::invalid(message),
            ProjectionError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            ProjectionError::Store(error) => error.into(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// `applied` (default) or `linearizable`: see every write acknowledged before the read.
    consistency: Option<Consistency>,
}

/// Every projection, system and user.
#[utoipa::path(get, path = "/projections", tag = "projections",
    params(ReadQuery), responses((status = 200, body = Vec<ProjectionStatus>)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<Vec<ProjectionStatus>>, ApiError> {
    linearize(&state, query.consistency).await?;
    match state.processing.get() {
        Ok(processing) => Ok(Json(processing.projections.list())),
        // A node that does not run them answers from the definitions it applied.
        Err(_) if state.node.is_some() => Ok(Json(
            state.processing.projection_reads().stored_list().await?,
        )),
        Err(error) => Err(error.into()),
    }
}

/// One projection's status; for a Wasm projection with the `digest` of its state and tables.
#[utoipa::path(get, path = "/projections/{name}", tag = "projections",
    params(("name" = String, Path, description = "Projection name, e.g. $by_category"), ReadQuery),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    linearize(&state, query.consistency).await?;
    let status = match state.processing.get() {
        Ok(processing) => processing.projections.status_with_digest(&name).await?,
        // A node that does not run it answers from the definition and data it applied.
        Err(_) if state.node.is_some() => {
            let reads = state.processing.projection_reads();
            reads.stored_status(&name).await?
        }
        Err(error) => return Err(error.into()),
    };
    Ok(Json(status))
}

/// Start a projection: it catches up from where it stopped.
#[utoipa::path(post, path = "/projections/{name}/start", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody),
        (status = 409, description = "A projection without a usable component",
            body = ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.processing()?.projections.start(&name).await?))
}

/// Stop a projection: it processes nothing until started again.
#[utoipa::path(post, path = "/projections/{name}/stop", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.processing()?.projections.stop(&name).await?))
}

/// Reset a projection: drop its output and reprocess from position 0.
#[utoipa::path(post, path = "/projections/{name}/reset", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn reset(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.processing()?.projections.reset(&name).await?))
}

/// Rebuild a projection beside its live version: queries keep reading the live version until
/// the rebuilt one has caught up, then it takes over in one step.
#[utoipa::path(post, path = "/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody),
        (status = 409, description = "A system projection (rebuilt by reset), or one without a \
            usable component", body = ErrorBody)))]
pub async fn rebuild(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<RebuildQuery>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    let emitted = query.emitted.unwrap_or_default();
    Ok(Json(
        state
            .processing()?
            .projections
            .rebuild(&name, emitted)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RebuildQuery {
    /// What the switch does with the streams the live version emitted to and linked into:
    /// `keep` (default) or `replace`, as for an update.
    emitted: Option<Emitted>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SkipQuery {
    /// The position the projection stopped at (its fault's).
    position: u64,
}

/// Set aside the event a faulted projection stopped at (linked from its parked stream with
/// the fault as the reason) and run on past it.
#[utoipa::path(post, path = "/projections/{name}/skip", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), SkipQuery),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody),
        (status = 409, description = "The projection did not stop at that position",
            body = ErrorBody)))]
pub async fn skip(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<SkipQuery>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(
        state
            .processing()?
            .projections
            .skip(&name, query.position)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PartitionsQuery {
    /// Only partitions whose key starts with this.
    prefix: Option<String>,
    /// Continue after this key (the `next` of the previous page).
    after: Option<String>,
    /// Partitions per page, default 100, at most 4096.
    limit: Option<usize>,
    /// `applied` (default) or `linearizable`: see every write acknowledged before the read.
    consistency: Option<Consistency>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionsPage {
    /// Keys of partitions that have a state (`""` for an unpartitioned projection's).
    partitions: Vec<String>,
    /// The `after` of the next page; `null` at the end.
    next: Option<String>,
}

/// The partitions of a projection that have a state, in key order.
#[utoipa::path(get, path = "/projections/{name}/partitions", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), PartitionsQuery),
    responses((status = 200, body = PartitionsPage), (status = 404, body = ErrorBody)))]
pub async fn partitions(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<PartitionsQuery>,
) -> Result<Json<PartitionsPage>, ApiError> {
    linearize(&state, query.consistency).await?;
    let limit = page_limit(query.limit)?;
    let page = state
        .processing
        .projection_reads()
        .partitions(&name, query.prefix.unwrap_or_default(), query.after, limit)
        .await?;
    Ok(Json(PartitionsPage {
        partitions: page.keys,
        next: page.next,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ParkedQuery {
    /// First revision of the parked stream to return (default 0).
    from: Option<u64>,
    /// Most events to return (default 100, at most 4,096).
    limit: Option<usize>,
    /// `applied` (default) or `linearizable`: see every write acknowledged before the read.
    consistency: Option<Consistency>,
}

#[derive(Serialize, ToSchema)]
pub struct ParkedEventJson<'a> {
    /// The revision in `$projection-{name}-parked`.
    pub revision: u64,
    /// Why it was set aside: `{"stream", "revision", "type", "on_error", "error",
    /// "partition"}` (`"by_hand": true` for `skip` requests).
    #[schema(value_type = AnyJson)]
    pub reason: Option<Box<RawValue>>,
    pub event: EventJson<'a>,
}

/// The events a projection set aside (`on_error: skip|park`, or `skip` by hand), with why.
#[utoipa::path(get, path = "/projections/{name}/parked", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), ParkedQuery),
    responses((status = 200, body = Vec<ParkedEventJson>), (status = 404, body = ErrorBody)))]
pub async fn parked(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ParkedQuery>,
) -> Result<Response, ApiError> {
    linearize(&state, query.consistency).await?;
    let parked = state
        .processing
        .projection_reads()
        .parked(&name, query.from.unwrap_or(0), page_limit(query.limit)?)
        .await?;
    let json: Vec<ParkedEventJson> = parked
        .iter()
        .map(|(event, reason)| ParkedEventJson {
            revision: event
                .link
                .as_ref()
                .map_or(event.revision, |link| link.revision),
            reason: reason
                .as_ref()
                .and_then(|reason| serde_json::from_slice(reason).ok()),
            event: EventJson::new(event),
        })
        .collect();
    Ok(Json(json).into_response())
}

/// Cancel a rebuild: the partial build is dropped, the live version carries on.
#[utoipa::path(delete, path = "/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404,
        description = "No such projection, or no rebuild in progress", body = ErrorBody)))]
pub async fn cancel_rebuild(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(
        state
            .processing()?
            .projections
            .cancel_rebuild(&name)
            .await?,
    ))
}

/// The system projections' configuration.
#[utoipa::path(get, path = "/projections/{name}/config", tag = "projections",
    params(("name" = String, Path, description = "A system projection")),
    responses((status = 200, body = IndexConfig), (status = 404, body = ErrorBody)))]
pub async fn get_config(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<IndexConfig>, ApiError> {
    let reads = state.processing.projection_reads();
    Ok(Json(reads.config(&name).await?))
}

/// Change a system projection's configuration; it is reset to apply the change to every event.
#[utoipa::path(put, path = "/projections/{name}/config", tag = "projections",
    params(("name" = String, Path, description = "A system projection")),
    request_body(content = ConfigChange, content_type = "application/json"),
    responses((status = 200, body = IndexConfig), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Fields that configure \
            other system projections", body = ErrorBody)))]
pub async fn put_config(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<IndexConfig>, ApiError> {
    let change: ConfigChange = crate::json::from_slice(&body)
        .map_err(|error| ApiError::invalid(format!("invalid configuration: {error}")))?;
    Ok(Json(
        state
            .processing()?
            .projections
            .configure(&name, change)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeployQuery {
    /// `continuous` (default) or `one_time`: stop as `completed` at the head.
    mode: Option<Mode>,
    /// Allow the projection to emit events (default false).
    emit: Option<bool>,
    /// Start it at once (default true).
    enabled: Option<bool>,
    /// For an existing projection: build the new version beside the live one from position 0
    /// and switch when it has caught up (default true), or continue from the checkpoint with
    /// the new code (false).
    rebuild: Option<bool>,
    /// What that switch does with the streams the live version emitted to and linked into:
    /// `keep` them as they are (default: nothing sent downstream is sent again; the new version
    /// emits for events past the switch) or `replace` them with what the new version emitted
    /// from position 0.
    emitted: Option<Emitted>,
    /// An event the projection cannot handle: `stop` at it (default), `skip` it, or `park` it
    /// and hold its partition; skipped and parked events are linked from
    /// `$projection-{name}-parked` with the reason.
    on_error: Option<OnError>,
}

/// Deploy a WebAssembly component as a projection: new (201) or a new version (200). It runs
/// from position 0 of its source.
#[utoipa::path(put, path = "/projections/{name}", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), DeployQuery),
    request_body(content = Component, content_type = "application/wasm",
        description = "A component of the refract:projection/projection world"),
    responses((status = 201, body = ProjectionStatus), (status = 200, body = ProjectionStatus),
        (status = 400, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn deploy(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeployQuery>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    check_wasm_content_type(&headers)?;
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the body must be a WebAssembly component; it is empty",
        ));
    }
    let defaults = DeployOptions::default();
    let options = DeployOptions {
        mode: query.mode.unwrap_or(defaults.mode),
        emit: query.emit.unwrap_or(defaults.emit),
        enabled: query.enabled.unwrap_or(defaults.enabled),
        rebuild: query.rebuild.unwrap_or(defaults.rebuild),
        emitted: query.emitted.unwrap_or(defaults.emitted),
        on_error: query.on_error.unwrap_or(defaults.on_error),
    };
    let (created, status) = state
        .processing()?
        .projections
        .deploy(&name, body.to_vec(), options)
        .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)).into_response())
}

pub(super) fn check_wasm_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    // curl's --data-binary says form-urlencoded unless told otherwise; the bytes decide.
    check_media_type(headers, "application/wasm", |media_type| {
        matches!(
            media_type,
            "application/wasm" | "application/octet-stream" | "application/x-www-form-urlencoded"
        )
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the streams it emitted to (soft delete) and its streams of links.
    delete_emitted: Option<bool>,
}

/// Delete a Wasm projection with its state and tables.
#[utoipa::path(delete, path = "/projections/{name}", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), DeleteQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A system projection (stop it instead), or one a Kafka \
            source names its streams with", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let processing = state.processing()?;
    if let Some(connector) = processing.connectors.using_projection(&name).await.first() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("the connector {connector:?} names its streams with the projection {name:?}"),
        ));
    }
    processing
        .projections
        .delete(&name, query.delete_emitted.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StateQuery {
    /// The partition (a stream name for projections partitioned by stream); absent for the
    /// state of an unpartitioned projection.
    partition: Option<String>,
    /// `applied` (default) or `linearizable`: see every write acknowledged before the read.
    consistency: Option<Consistency>,
}

/// A partition's state: its JSON, or `{"state_base64": …}` when it is not JSON.
#[utoipa::path(get, path = "/projections/{name}/state", tag = "projections",
    params(("name" = String, Path, description = "Projection name"), StateQuery),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get_state(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<StateQuery>,
) -> Result<Response, ApiError> {
    linearize(&state, query.consistency).await?;
    let partition = query.partition.unwrap_or_default();
    match state
        .processing
        .projection_reads()
        .state(&name, partition.clone())
        .await?
    {
        Some(bytes) => Ok(json_or_base64(bytes, "state_base64")),
        None if partition.is_empty() => Err(ApiError::not_found(format!(
            "{name} has no state yet (a partitioned projection needs ?partition=)"
        ))),
        None => Err(ApiError::not_found(format!(
            "{name} has no state for partition {partition:?}"
        ))),
    }
}

/// JSON bytes as they are; anything else as `{"<field>": base64}`.
fn json_or_base64(bytes: Vec<u8>, field: &str) -> Response {
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
        (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response()
    } else {
        Json(serde_json::json!({ field: BASE64.encode(bytes) })).into_response()
    }
}

/// One read-model row: its JSON, or `{"value_base64": …}` when it is not JSON.
#[utoipa::path(get, path = "/projections/{name}/tables/{table}/{key}", tag = "projections",
    params(("name" = String, Path, description = "Projection name"),
        ("table" = String, Path, description = "Table name"),
        ("key" = String, Path, description = "Row key"), ReadQuery),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get_row(
    State(state): State<AppState>,
    ApiPath((name, table, key)): ApiPath<(String, String, String)>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    linearize(&state, query.consistency).await?;
    match state
        .processing
        .projection_reads()
        .row(&name, table.clone(), key.clone())
        .await?
    {
        Some(bytes) => Ok(json_or_base64(bytes, "value_base64")),
        None => Err(ApiError::not_found(format!(
            "table {table:?} of {name} has no row {key:?}"
        ))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RowsQuery {
    /// Only keys starting with this.
    prefix: Option<String>,
    /// Continue after this key (the `next` of the previous page).
    after: Option<String>,
    /// Rows per page, default 100, at most 4096.
    limit: Option<usize>,
    /// `applied` (default) or `linearizable`: see every write acknowledged before the read.
    consistency: Option<Consistency>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RowsPage {
    rows: Vec<RowJson>,
    /// The `after` of the next page; `null` at the end.
    next: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RowJson {
    key: String,
    /// The row's JSON (absent when the row is not JSON).
    #[schema(value_type = AnyJson, required = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    /// The row's bytes when they are not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

/// Rows of a read-model table in key order, paged.
#[utoipa::path(get, path = "/projections/{name}/tables/{table}", tag = "projections",
    params(("name" = String, Path, description = "Projection name"),
        ("table" = String, Path, description = "Table name"), RowsQuery),
    responses((status = 200, body = RowsPage), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn get_rows(
    State(state): State<AppState>,
    ApiPath((name, table)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<RowsQuery>,
) -> Result<Json<RowsPage>, ApiError> {
    linearize(&state, query.consistency).await?;
    let limit = page_limit(query.limit)?;
    let page = state
        .processing
        .projection_reads()
        .rows(
            &name,
            table,
            query.prefix.unwrap_or_default(),
            query.after,
            limit,
        )
        .await?;
    let rows = page
        .rows
        .into_iter()
        .map(|(key, value)| row_json(key, value))
        .collect();
    Ok(Json(RowsPage {
        rows,
        next: page.next,
    }))
}

fn row_json(key: String, value: Vec<u8>) -> RowJson {
    let json = std::str::from_utf8(&value)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok());
    match json {
        Some(json) => RowJson {
            key,
            value: Some(json),
            value_base64: None,
        },
        None => RowJson {
            key,
            value: None,
            value_base64: Some(BASE64.encode(value)),
        },
    }
}
