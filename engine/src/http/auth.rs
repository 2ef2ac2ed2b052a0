//! Bearer-token authorisation with three roles, or loopback-only access when no token is set.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads, subscriptions, projection state.
    Reader,
    /// + appends and consuming from groups.
    Writer,
    /// + deletes and managing projections, sharders and groups.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: use reader, writer or admin"
            )),
        }
    }
}

/// The configured tokens. Empty means: no tokens, loopback clients only.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<(String, Role)>);

impl Tokens {
    /// Parses `ROLE:TOKEN` (from `--token`).
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (role, token) = spec
            .split_once(':')
            .ok_or_else(|| format!("a token is given as ROLE:TOKEN, not {spec:?}"))?;
        let token = token.trim();
        if token.len() < 8 {
            return Err("a token must be at least 8 characters long".into());
        }
        self.0.push((token.to_owned(), role.trim().parse()?));
        Ok(())
    }

    /// Reads a file of `ROLE:TOKEN` lines; blank lines and `#` comments are skipped.
    pub fn add_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.add(line)
                .map_err(|error| format!("{}:{}: {error}", path.display(), number + 1))?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn role_of(&self, presented: &str) -> Option<Role> {
        // Compare every token in full so the answer's timing says nothing about the tokens.
        self.0.iter().fold(None, |found, (token, role)| {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                Some(*role)
            } else {
                found
            }
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The role a request needs, `None` for public routes.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/health" || path == "/openapi.json" {
        return None;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Reader);
    }
    let role = match (method, segments.as_slice()) {
        (&Method::POST, ["streams", _]) => Role::Writer,
        (&Method::PUT, ["streams", _, "metadata"]) => Role::Writer,
        (&Method::POST, ["groups", _, _, "pull" | "ack" | "nack"]) => Role::Writer,
        (&Method::POST, ["sharders", _, "shard"]) => Role::Reader,
        _ => Role::Admin,
    };
    Some(role)
}

pub async fn authorize(
    State(tokens): State<Arc<Tokens>>,
    request: Request,
    next: Next,
) -> Response {
    match check(&tokens, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

fn check(tokens: &Tokens, request: &Request) -> Result<(), ApiError> {
    if tokens.is_empty() {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0);
        return match peer {
            Some(peer) if !peer.ip().is_loopback() && !peer.ip().to_canonical().is_loopback() => {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "no tokens are configured, so only loopback clients are accepted",
                ))
            }
            _ => Ok(()),
        };
    }
    let Some(needed) = required_role(request.method(), request.uri().path()) else {
        return Ok(());
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized = |message| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let presented =
        presented.ok_or_else(|| unauthorized("an Authorization: Bearer token is required"))?;
    let role = tokens
        .role_of(presented)
        .ok_or_else(|| unauthorized("the token is not valid"))?;
    if role < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the {needed:?} role; the token has {role:?}").to_lowercase(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_contract() {
        assert_eq!(required_role(&Method::GET, "/health"), None);
        assert_eq!(
            required_role(&Method::GET, "/streams/order-1"),
            Some(Role::Reader)
        );
        assert_eq!(
            required_role(&Method::POST, "/streams/order-1"),
            Some(Role::Writer)
        );
        assert_eq!(
            required_role(&Method::PUT, "/streams/order-1/metadata"),
            Some(Role::Writer)
        );
        assert_eq!(
            required_role(&Method::DELETE, "/streams/order-1"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::PUT, "/projections/p"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::POST, "/groups/s/g/ack"),
            Some(Role::Writer)
        );
    }

    fn request_from(peer: &str, token: Option<&str>) -> Request {
        let mut request = Request::builder().method(Method::GET).uri("/streams/a");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut request = request.body(axum::body::Body::empty()).unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        request
    }

    #[test]
    fn without_tokens_only_loopback_clients_pass() {
        let none = Tokens::default();
        assert!(check(&none, &request_from("127.0.0.1:5000", None)).is_ok());
        assert!(check(&none, &request_from("[::1]:5000", None)).is_ok());
        assert!(check(&none, &request_from("[::ffff:127.0.0.1]:5000", None)).is_ok());
        let refused = check(&none, &request_from("192.0.2.7:5000", None)).unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        let mut tokens = Tokens::default();
        tokens.add("reader:reader-token").unwrap();
        assert!(
            check(
                &tokens,
                &request_from("192.0.2.7:5000", Some("reader-token"))
            )
            .is_ok()
        );
        let refused = check(&tokens, &request_from("127.0.0.1:5000", None)).unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn tokens_parse_and_match() {
        let mut tokens = Tokens::default();
        tokens.add("writer:secret-writer").unwrap();
        tokens.add("admin:secret-admin").unwrap();
        assert!(tokens.add("owner:secret-owner").is_err());
        assert!(tokens.add("reader:short").is_err());
        assert!(tokens.add("no-colon").is_err());
        assert_eq!(tokens.role_of("secret-writer"), Some(Role::Writer));
        assert_eq!(tokens.role_of("secret-admin"), Some(Role::Admin));
        assert_eq!(tokens.role_of("secret-admi"), None);
    }
}
