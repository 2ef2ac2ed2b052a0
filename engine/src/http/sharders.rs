//! Sharding functions: upload, download, evaluate, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody, LimitedBody};
use super::openapi::{BASE64_PATTERN, Component, exact_schema};
use super::projections::check_wasm_content_type;
use crate::connectors::Connectors;
use crate::sharding::{ShardError, ShardInput};

/// Most events one shard request may carry.
const MAX_SHARD_EVENTS: usize = 100_000;

impl From<ShardError> for ApiError {
    fn from(error: ShardError) -> Self {
        match error {
            ShardError::NotFound(_) => ApiError::not_found(error.to_string()),
            ShardError::Invalid(message) => ApiError::invalid(message),
            ShardError::Store(error) => error.into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SharderInfo {
    pub name: String,
    pub wasm_sha256: String,
}

/// Every sharder.
#[utoipa::path(get, path = "/sharders", tag = "sharders",
    responses((status = 200, body = Vec<SharderInfo>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<SharderInfo>>, ApiError> {
    let sharders = state.processing()?.sharders.list();
    Ok(Json(
        sharders
            .into_iter()
            .map(|(name, wasm_sha256)| SharderInfo { name, wasm_sha256 })
            .collect(),
    ))
}

/// Upload a sharder: a component of the refract:projection/sharder world.
#[utoipa::path(put, path = "/sharders/{name}", tag = "sharders",
    params(("name" = String, Path, description = "Sharder name")),
    request_body(content = Component, content_type = "application/wasm"),
    responses((status = 201, body = SharderInfo), (status = 200, body = SharderInfo),
        (status = 400, body = ErrorBody),
        (status = 409, description = "Other code under the name of a sharder a partitioned \
            group or a Kafka sink places its events with", body = ErrorBody),
        (status = 415, body = ErrorBody)))]
pub async fn deploy(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    check_wasm_content_type(&headers)?;
    let processing = state.processing()?;
    // A sink's topic holds its events where this code put them: other code would move them.
    if let Ok(current) = processing.sharders.get(&name)
        && current.sha256() != crate::sandbox::sha256_hex(&body)
    {
        refuse_if_sinks_use(&processing.connectors, &name).await?;
    }
    let (created, wasm_sha256) = processing
        .groups
        .deploy_sharder(&name, body.to_vec())
        .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(SharderInfo { name, wasm_sha256 })).into_response())
}

/// Download a sharder's component, to run the same function elsewhere.
#[utoipa::path(get, path = "/sharders/{name}", tag = "sharders",
    params(("name" = String, Path, description = "Sharder name")),
    responses((status = 200, body = Component, content_type = "application/wasm"),
        (status = 404, body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let bytes = state.processing()?.sharders.component(&name).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/wasm")],
        Body::from(bytes),
    )
        .into_response())
}

/// Answers 409 while a connector places records with the sharder `name`.
async fn refuse_if_sinks_use(connectors: &Connectors, name: &str) -> Result<(), ApiError> {
    match connectors.using_sharder(name).await.first() {
        Some(connector) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("the connector {connector:?} places its records with the sharder {name:?}"),
        )),
        None => Ok(()),
    }
}

/// Delete a sharder; refused while a consumer group's strategy or a connector uses it.
#[utoipa::path(delete, path = "/sharders/{name}", tag = "sharders",
    params(("name" = String, Path, description = "Sharder name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let processing = state.processing()?;
    refuse_if_sinks_use(&processing.connectors, &name).await?;
    processing.groups.delete_sharder(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShardQuery {
    /// How many shards to place the events on (1 to 1,048,576).
    #[param(minimum = 1, maximum = 1048576)]
    shards: u32,
}

/// What `POST /sharders/{name}/shard` takes: events as written, each with its stream.
pub struct ShardRequest;

impl ShardRequest {
    pub fn json_schema() -> serde_json::Value {
        let event = serde_json::json!({
            "type": "object",
            "required": ["stream"],
            "properties": {
                "stream": {"type": "string", "minLength": 1},
                "type": {"type": ["string", "null"]},
                "id": {"type": ["string", "null"]},
                "data": {"description": "Any JSON value"},
                "data_base64": {"type": "string", "pattern": BASE64_PATTERN},
                "metadata": {"type": ["object", "null"]},
            },
            "not": {"required": ["data", "data_base64"]},
        });
        serde_json::json!({"type": "array", "maxItems": MAX_SHARD_EVENTS, "items": event})
    }
}

exact_schema!(ShardRequest);

/// The shard of each event, in order: `[{"stream", "type", "data", "metadata"}, …]` →
/// `[shard, …]`.
#[utoipa::path(post, path = "/sharders/{name}/shard", tag = "sharders",
    params(("name" = String, Path, description = "Sharder name"), ShardQuery),
    request_body(content = ShardRequest, content_type = "application/json",
        description = "Events as written, each with its stream"),
    responses((status = 200, body = Vec<u32>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn shard(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ShardQuery>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Vec<u32>>, ApiError> {
    let items: Vec<serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|error| ApiError::invalid(format!("the body must be a JSON array: {error}")))?;
    if items.len() > MAX_SHARD_EVENTS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_SHARD_EVENTS} events per request"
        )));
    }
    let inputs = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            ShardInput::from_json(item)
                .map_err(|reason| ApiError::invalid(format!("event {index}: {reason}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(
        state
            .processing()?
            .sharders
            .shard(&name, inputs, query.shards)
            .await?,
    ))
}
