//! The one error type of the HTTP API: a status, a stable code and a sentence, as JSON.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::store::{ExpectedRevision, StoreError};

/// The body of every error response (its schema is stated in [`super::openapi`]).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// A stable code: `invalid_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `stream_not_found`, `wrong_expected_revision`, `stream_deleted`, `payload_too_large`,
    /// `unsupported_media_type`, `not_leader`, `internal`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    /// With `wrong_expected_revision`: the expected revision as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<Value>,
    /// With `wrong_expected_revision`: the stream's last revision, `null` when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<Value>,
}

super::openapi::exact_schema!(ErrorBody);

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

fn expected_json(expected: ExpectedRevision) -> Value {
    match expected {
        ExpectedRevision::Exact(revision) => Value::from(revision),
        other => Value::from(other.to_string()),
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let message = error.to_string();
        match error {
            StoreError::WrongExpectedRevision { expected, actual } => {
                let mut error =
                    ApiError::new(StatusCode::CONFLICT, "wrong_expected_revision", message);
                error
                    .details
                    .insert("expected".into(), expected_json(expected));
                error
                    .details
                    .insert("actual".into(), actual.map_or(Value::Null, Value::from));
                error
            }
            StoreError::StreamNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "stream_not_found", message)
            }
            StoreError::StreamDeleted(_) => {
                ApiError::new(StatusCode::GONE, "stream_deleted", message)
            }
            StoreError::InvalidRequest(_) => ApiError::invalid(message),
            StoreError::ShuttingDown | StoreError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            StoreError::NotLeader { leader_url } => {
                let mut error =
                    ApiError::new(StatusCode::MISDIRECTED_REQUEST, "not_leader", message);
                error.details.insert(
                    "leader_url".into(),
                    leader_url.map_or(Value::Null, Value::from),
                );
                error
            }
            StoreError::Storage(_) => {
                tracing::error!(%message, "storage failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let leader = match self.details.get("leader_url") {
            Some(Value::String(url)) => header::HeaderValue::from_str(url).ok(),
            _ => None,
        };
        let mut body = Map::new();
        body.insert("error".into(), Value::from(self.code));
        body.insert("message".into(), Value::from(self.message));
        body.extend(self.details);
        let mut response = (self.status, Json(Value::Object(body))).into_response();
        if let Some(leader) = leader {
            response.headers_mut().insert(LEADER_HEADER, leader);
        }
        response
    }
}

/// Where a node that is not the leader sends writes.
pub const LEADER_HEADER: &str = "refract-leader";

/// `Query` whose rejection is an [`ApiError`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection: QueryRejection| {
                ApiError::invalid(format!("invalid query: {}", rejection.body_text()))
            })
    }
}

/// `Path` whose rejection is an [`ApiError`].
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection: PathRejection| {
                ApiError::invalid(format!("invalid path: {}", rejection.body_text()))
            })
    }
}

/// The request body, already read in full by [`read_whole_body`].
pub struct LimitedBody(pub Bytes);

/// Beyond this much, an oversized body is no longer drained and the connection is dropped.
const DRAIN_LIMIT: usize = 1024 * 1024 * 1024;

impl<S: Send + Sync> FromRequest<S> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let body = axum::body::to_bytes(request.into_body(), super::MAX_REQUEST_BYTES)
            .await
            .map_err(|error| ApiError::invalid(format!("cannot read the request body: {error}")))?;
        Ok(LimitedBody(body))
    }
}

/// Reads every request body to its end before routing, up to [`super::MAX_REQUEST_BYTES`].
///
/// A request refused before its handler reads the body (bad query, unknown route, no token)
/// would otherwise leave the body on a kept-alive connection, which then closes under a client
/// that already pooled it. A larger body is still drained (up to [`DRAIN_LIMIT`]) before the
/// `413` goes out, so a client that sends its whole body first gets the answer, not a reset.
pub async fn read_whole_body(request: Request, next: axum::middleware::Next) -> Response {
    let limit = super::MAX_REQUEST_BYTES;
    let (parts, body) = request.into_parts();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let mut buffer = BytesMut::with_capacity(announced.unwrap_or(0).min(limit));
    let mut received = 0usize;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                return ApiError::invalid(format!("cannot read the request body: {error}"))
                    .into_response();
            }
        };
        received += chunk.len();
        if received <= limit {
            buffer.extend_from_slice(&chunk);
        } else if received > DRAIN_LIMIT {
            break;
        }
    }
    if received > limit {
        return ApiError::too_large("the request body exceeds the limit of 64 MiB").into_response();
    }
    let body = axum::body::Body::from(buffer.freeze());
    next.run(Request::from_parts(parts, body)).await
}

/// Answers routes that do not exist.
/// Checks a request's Content-Type (parameters ignored, any case) with `accepts`; a request
/// without one passes. `expected` names the type in the error.
pub fn check_media_type(
    headers: &axum::http::HeaderMap,
    expected: &str,
    accepts: impl Fn(&str) -> bool,
) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let media_type = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if accepts(&media_type) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type {expected}, got {media_type:?}"),
        ))
    }
}

pub async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

/// Answers known routes called with a method they do not have.
pub async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
