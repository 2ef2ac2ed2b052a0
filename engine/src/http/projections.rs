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
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody, LimitedBody, check_media_type};
use super::openapi::{AnyJson, Component};
use crate::projections::{ConfigChange, DeployOptions, Mode, ProjectionError, ProjectionStatus};
use crate::store::IndexConfig;

/// Most rows one table page returns.
const MAX_ROWS: usize = 4096;

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

/// Every projection, system and user.
#[utoipa::path(get, path = "/projections", tag = "projections",
    responses((status = 200, body = Vec<ProjectionStatus>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<ProjectionStatus>> {
    Json(state.projections.list())
}

/// One projection's status; for a Wasm projection with the `digest` of its state and tables.
#[utoipa::path(get, path = "/projections/{name}", tag = "projections",
    params(("name" = String, Path, description = "Projection name, e.g. $by_category")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.status_with_digest(&name).await?))
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
    Ok(Json(state.projections.start(&name).await?))
}

/// Stop a projection: it processes nothing until started again.
#[utoipa::path(post, path = "/projections/{name}/stop", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn stop(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.stop(&name).await?))
}

/// Reset a projection: drop its output and reprocess from position 0.
#[utoipa::path(post, path = "/projections/{name}/reset", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn reset(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.reset(&name).await?))
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
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.rebuild(&name).await?))
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
    Ok(Json(state.projections.cancel_rebuild(&name).await?))
}

/// The system projections' configuration.
#[utoipa::path(get, path = "/projections/{name}/config", tag = "projections",
    params(("name" = String, Path, description = "A system projection")),
    responses((status = 200, body = IndexConfig), (status = 404, body = ErrorBody)))]
pub async fn get_config(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<IndexConfig>, ApiError> {
    Ok(Json(state.projections.config(&name).await?))
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
    Ok(Json(state.projections.configure(&name, change).await?))
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
    /// For an existing projection: start its data afresh from position 0 (default true), or
    /// continue from its checkpoint with the new code (false).
    rebuild: Option<bool>,
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
    };
    let (created, status) = state
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
        (status = 409, description = "A system projection: stop it instead", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    state
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
    let partition = query.partition.unwrap_or_default();
    match state.projections.state(&name, partition.clone()).await? {
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
        ("key" = String, Path, description = "Row key")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get_row(
    State(state): State<AppState>,
    ApiPath((name, table, key)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    match state
        .projections
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
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_ROWS {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_ROWS}"
        )));
    }
    let page = state
        .projections
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
