//! Projections: list, status, start/stop/reset, configuration of the system projections.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::error::{ApiError, ApiPath, ErrorBody, LimitedBody};
use crate::projections::{ConfigChange, ProjectionError, ProjectionStatus};
use crate::store::indexes::IndexConfig;

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::NotFound(_) => ApiError::not_found(error.to_string()),
            ProjectionError::Invalid(message) => ApiError::invalid(message),
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

/// One projection's status.
#[utoipa::path(get, path = "/projections/{name}", tag = "projections",
    params(("name" = String, Path, description = "Projection name, e.g. $by_category")),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.status(&name)?))
}

/// Start a projection: it catches up from where it stopped.
#[utoipa::path(post, path = "/projections/{name}/start", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    request_body(content = Option<Object>, description = "Empty"),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.start(&name).await?))
}

/// Stop a projection: it processes nothing until started again.
#[utoipa::path(post, path = "/projections/{name}/stop", tag = "projections",
    params(("name" = String, Path, description = "Projection name")),
    request_body(content = Option<Object>, description = "Empty"),
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
    request_body(content = Option<Object>, description = "Empty"),
    responses((status = 200, body = ProjectionStatus), (status = 404, body = ErrorBody)))]
pub async fn reset(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.reset(&name).await?))
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
        (status = 404, body = ErrorBody)))]
pub async fn put_config(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<IndexConfig>, ApiError> {
    let change: ConfigChange = serde_json::from_slice(&body)
        .map_err(|error| ApiError::invalid(format!("invalid configuration: {error}")))?;
    Ok(Json(state.projections.configure(&name, change).await?))
}
