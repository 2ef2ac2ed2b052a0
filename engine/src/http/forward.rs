//! `--forward-writes`: a follower passes the requests only the leader answers (those it would
//! answer `421` to) on to the leader, and relays the leader's answer, streams included.
//!
//! A request is forwarded only after this node answered it `421`: nothing was done here, so
//! the leader is the first to act on it. A forwarded request carries a header, and is never
//! forwarded again: a node that lost the leadership in between answers `421` itself.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

use super::error::{ApiError, LEADER_HEADER};
use crate::cluster::node::Node;

/// Marks a request a node forwarded, with that node's id.
pub const FORWARDED_HEADER: &str = "refract-forwarded-by";
/// How long the leader has to start answering a forwarded request (a stream's body may then
/// take as long as it is read).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends requests on to the leader.
pub struct Forwarder {
    node: Arc<Node>,
    client: reqwest::Client,
}

impl Forwarder {
    pub fn new(node: Arc<Node>) -> Forwarder {
        Forwarder {
            node,
            // No overall timeout: a forwarded subscription streams for as long as it is read.
            client: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// The leader's answer; `None` when the leader could not be reached, so nothing was sent.
    async fn send(
        &self,
        leader: &str,
        method: axum::http::Method,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Option<Response> {
        let path = uri.path_and_query().map_or("/", |path| path.as_str());
        let url = format!("{}{path}", leader.trim_end_matches('/'));
        let mut request = self.client.request(method, url).body(body);
        for (name, value) in headers {
            if !is_hop_by_hop(name) && name != header::HOST && name != header::CONTENT_LENGTH {
                request = request.header(name, value);
            }
        }
        let sent = request
            .header(FORWARDED_HEADER, self.node.id.to_string())
            .send();
        let answer = match tokio::time::timeout(ANSWER_TIMEOUT, sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) if error.is_connect() => {
                tracing::warn!(%leader, %error, "cannot forward a request to the leader");
                return None;
            }
            // The leader may have acted on it.
            Ok(Err(error)) => return Some(no_answer(&error.to_string())),
            Err(_) => return Some(no_answer("no answer in time")),
        };
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
                response = response.header(name, value);
            }
        }
        let body = Body::from_stream(answer.bytes_stream().map_err(std::io::Error::other));
        Some(response.body(body).expect("a response of valid parts"))
    }
}

/// A request the leader got but did not answer: like a write whose answer was lost.
fn no_answer(why: &str) -> Response {
    let message = format!(
        "forwarded to the leader, which did not answer ({why}): the request may or may not have \
         been carried out (an append sent again with the same event ids is taken once)"
    );
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).into_response()
}

/// Runs the request here; when this node answers that only the leader can, asks the leader.
pub async fn forward_to_leader(
    State(forwarder): State<Arc<Forwarder>>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(FORWARDED_HEADER) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    // The body is whole already (`read_whole_body` runs first): this only takes it.
    let body = match axum::body::to_bytes(body, super::MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(error) => {
            let message = format!("cannot read the request body: {error}");
            return ApiError::invalid(message).into_response();
        }
    };
    let (method, uri, headers) = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.headers.clone(),
    );
    let response = next
        .run(Request::from_parts(parts, Body::from(body.clone())))
        .await;
    if response.status() != StatusCode::MISDIRECTED_REQUEST {
        return response;
    }
    // The leader as this node reaches it (through `--peer-via`, if given), else as named.
    let named = response
        .headers()
        .get(LEADER_HEADER)
        .and_then(|leader| leader.to_str().ok())
        .map(str::to_owned);
    let Some(leader) = forwarder.node.leader_route().or(named) else {
        return response;
    };
    let answer = forwarder.send(&leader, method, &uri, &headers, body).await;
    // Not reached: the caller can still try the leader itself.
    answer.unwrap_or(response)
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}
