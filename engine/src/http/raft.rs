//! The routes other nodes of a cluster send Raft's messages to. They are not part of the API
//! clients use (nor of its OpenAPI document).

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;

use crate::cluster::network::{APPEND_PATH, PRE_VOTE_PATH, SNAPSHOT_PATH, VOTE_PATH};
use crate::cluster::node::Node;

/// The Raft routes of `node`.
pub fn routes(node: Arc<Node>) -> Router {
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
            SNAPSHOT_PATH,
            post(|State(node): State<Arc<Node>>, body: Body| async move {
                let chunks = body
                    .into_data_stream()
                    .map(|chunk| chunk.map_err(|error| error.to_string()));
                reply(node.handle_snapshot(chunks).await)
            }),
        )
        .with_state(node)
}

fn reply(result: Result<Vec<u8>, String>) -> Response {
    match result {
        Ok(answer) => answer.into_response(),
        Err(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
    }
}
