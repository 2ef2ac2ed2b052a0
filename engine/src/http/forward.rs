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

use super::error::LEADER_HEADER;

/// Marks a request a node forwarded, with that node's id.
pub const FORWARDED_HEADER: &str = "refract-forwarded-by";

/// Sends requests on to the leader.
pub struct Forwarder {
    node_id: u64,
    client: reqwest::Client,
}

impl Forwarder {
    pub fn new(node_id: u64) -> Forwarder {
        Forwarder {
            node_id,
            // No overall timeout: a forwarded subscription streams for as long as it is read.
            client: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }
    }

    async fn send(
        &self,
        leader: &str,
        method: axum::http::Method,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> reqwest::Result<Response> {
        let path = uri.path_and_query().map_or("/", |path| path.as_str());
        let url = format!("{}{path}", leader.trim_end_matches('/'));
        let mut request = self.client.request(method, url).body(body);
        for (name, value) in headers {
            if !is_hop_by_hop(name) && name != header::HOST && name != header::CONTENT_LENGTH {
                request = request.header(name, value);
            }
        }
        let answer = request
            .header(FORWARDED_HEADER, self.node_id.to_string())
            .send()
            .await?;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
                response = response.header(name, value);
            }
        }
        let body = Body::from_stream(answer.bytes_stream().map_err(std::io::Error::other));
        Ok(response.body(body).expect("a response of valid parts"))
    }
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
            return super::error::ApiError::invalid(message).into_response();
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
    let Some(leader) = response
        .headers()
        .get(LEADER_HEADER)
        .and_then(|leader| leader.to_str().ok())
        .map(str::to_owned)
    else {
        return response;
    };
    match forwarder.send(&leader, method, &uri, &headers, body).await {
        Ok(answer) => answer,
        Err(error) => {
            // The caller can still go to the leader itself.
            tracing::warn!(%leader, %error, "cannot forward a request to the leader");
            response
        }
    }
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
