//! Health, server information, Prometheus metrics and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::metrics::{Format, GroupSample, ProjectionSample, Scrape};

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ServerInfo)]
pub struct Info {
    pub version: &'static str,
    /// Position the next event will get: the number of events in `$all`.
    pub head_position: u64,
    /// Streams clients have created (system output streams such as `$ce-order` not counted).
    pub streams: u64,
    pub data_dir: String,
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Server version and store figures.
#[utoipa::path(get, path = "/info", tag = "operations",
    responses((status = 200, body = Info), (status = 500, body = ErrorBody)))]
pub async fn info(State(state): State<AppState>) -> Result<Json<Info>, ApiError> {
    let streams = state.store.blocking(|store| store.stream_count()).await?;
    Ok(Json(Info {
        version: env!("CARGO_PKG_VERSION"),
        head_position: state.store.head(),
        streams,
        data_dir: state.data_dir.display().to_string(),
    }))
}

/// Prometheus metrics: the text format (0.0.4), or OpenMetrics when the `Accept` header asks
/// for it.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format (or OpenMetrics)",
        content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::accepted(accept);
    let scrape = Scrape {
        head_position: state.store.head(),
        writer_queue: state.store.queue_depth() as u64,
        projections: projection_samples(&state),
        groups: group_samples(&state).await,
        cluster: state.node.as_deref().map(super::cluster::sample),
    };
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.encode(&scrape, format),
    )
}

fn projection_samples(state: &AppState) -> Vec<ProjectionSample> {
    // Where the projections run: a cluster's leader.
    let Ok(processing) = state.processing.get() else {
        return Vec::new();
    };
    let projections = processing.projections.list();
    projections
        .into_iter()
        .map(|status| ProjectionSample {
            name: status.name,
            position: status.position,
            head_position: status.head_position,
            events_per_second: status.events_per_second,
        })
        .collect()
}

async fn group_samples(state: &AppState) -> Vec<GroupSample> {
    let mut samples = Vec::new();
    let Ok(processing) = state.processing.get() else {
        return samples;
    };
    for info in processing.groups.list().await {
        // Where the source ends: the head for `$all`, the stream's next revision otherwise.
        let end = if info.stream == crate::groups::ALL {
            state.store.head()
        } else {
            let stream = info.stream.clone();
            state
                .store
                .blocking(move |store| store.last_revision(&stream))
                .await
                .ok()
                .flatten()
                .map_or(0, |last| last + 1)
        };
        samples.push(GroupSample {
            stream: info.stream,
            group: info.group,
            ready: info.ready as u64,
            in_flight: info.in_flight as u64,
            parked: info.parked,
            checkpoint_lag: end.saturating_sub(info.checkpoint_next),
        });
    }
    samples
}

/// This document: every route with its request and response schemas (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.as_str().to_owned(),
    )
}
