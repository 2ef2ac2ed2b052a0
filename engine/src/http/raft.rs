//! The routes other nodes of a cluster send Raft's messages to. They are not part of the API
//! clients use (nor of its OpenAPI document); with a cluster secret they take only messages that
//! carry it, and without one only messages from loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;

use super::auth::constant_time_eq;
use crate::cluster::network::{
    APPEND_PATH, PRE_VOTE_PATH, READ_INDEX_PATH, SECRET_HEADER, SNAPSHOT_PATH, VOTE_PATH,
};
use crate::cluster::node::Node;

/// The Raft routes of `node`.
pub fn routes<S: Clone + Send + Sync + 'static>(
    node: Arc<Node>,
    secret: Option<String>,
) -> Router<S> {
    Router::new()
        .route(
            APPEND_PATH,
            post(|State(node): State<Arc<Node>>, body: Bytes| async move {
                reply(node.handle_append(&body).await)
            }),
        )
        .route(
            VOTE_PATH,
            post(|State(node): State<Arc<Node>>, body: Bytes| async move {
                reply(node.handle_vote(&body).await)
            }),
        )
        .route(
            PRE_VOTE_PATH,
            post(|State(node): State<Arc<Node>>, body: Bytes| async move {
                reply(node.handle_pre_vote(&body).await)
            }),
        )
        .route(
            READ_INDEX_PATH,
            post(|State(node): State<Arc<Node>>| async move {
                reply(node.handle_read_index().await)
            }),
        )
        .route(
            SNAPSHOT_PATH,
            post(|State(node): State<Arc<Node>>, body: Body| async move {
                let chunks = body
                    .into_data_stream()
                    .map(|chunk| chunk.map_err(|error| error.to_string()));
                reply(node.handle_snapshot(chunks).await)
            }),
        )
        // Entries of up to a batch's size travel together; the peer is known (secret or loopback).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(Arc::new(secret), admit))
        .with_state(node)
}

/// Lets a message in when it carries the cluster's secret, or, without one, comes from loopback.
async fn admit(
    State(secret): State<Arc<Option<String>>>,
    request: Request,
    next: Next,
) -> Response {
    let admitted = match secret.as_deref() {
        Some(secret) => request
            .headers()
            .get(SECRET_HEADER)
            .is_some_and(|sent| constant_time_eq(sent.as_bytes(), secret.as_bytes())),
        None => request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .is_none_or(|peer| peer.0.ip().to_canonical().is_loopback()),
    };
    if admitted {
        next.run(request).await
    } else {
        (StatusCode::FORBIDDEN, "not a node of this cluster").into_response()
    }
}

fn reply(result: Result<Vec<u8>, String>) -> Response {
    match result {
        Ok(answer) => answer.into_response(),
        Err(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
    }
}
