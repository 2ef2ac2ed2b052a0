//! Bearer-token authorisation with three roles, or loopback-only access when no token is set.
//!
//! The role a route needs is declared where the route is: [`super::routes`] puts each one in
//! the router of its role, and [`guard`] gives that router the layer that checks it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use super::AppState;
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

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
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

    pub fn role_of(&self, presented: &str) -> Option<Role> {
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

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Puts every route of `router` behind `role`: its layer lets a request through only with a
/// token of that role or above. With tokens configured the document says so on each operation;
/// without, the server takes no tokens (loopback clients only) and the document asks for none.
pub fn guard(
    mut router: OpenApiRouter<AppState>,
    role: Role,
    tokens: &Arc<Tokens>,
) -> OpenApiRouter<AppState> {
    if !tokens.is_empty() {
        declare_role(&mut router, role);
    }
    router.route_layer(middleware::from_fn_with_state(
        (tokens.clone(), role),
        require_role,
    ))
}

/// States on every operation of `router` that it needs a bearer token of `role`.
fn declare_role(router: &mut OpenApiRouter<AppState>, role: Role) {
    let document = router.get_openapi_mut();
    let requirement = SecurityRequirement::new(SECURITY_SCHEME, [role.name()]);
    for item in document.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            operation.security = Some(vec![requirement.clone()]);
        }
    }
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
}

/// The name of the bearer-token scheme in the OpenAPI document.
const SECURITY_SCHEME: &str = "bearer";

async fn require_role(
    State((tokens, needed)): State<(Arc<Tokens>, Role)>,
    request: Request,
    next: Next,
) -> Response {
    match check_role(&tokens, needed, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Without configured tokens only loopback clients get in, whatever the route.
pub async fn admit(State(tokens): State<Arc<Tokens>>, request: Request, next: Next) -> Response {
    match check_peer(&tokens, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

fn check_peer(tokens: &Tokens, request: &Request) -> Result<(), ApiError> {
    if !tokens.is_empty() {
        return Ok(());
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    match peer {
        Some(peer) if !peer.ip().is_loopback() && !peer.ip().to_canonical().is_loopback() => {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no tokens are configured, so only loopback clients are accepted",
            ))
        }
        _ => Ok(()),
    }
}

fn check_role(tokens: &Tokens, needed: Role, request: &Request) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Ok(());
    }
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
            format!(
                "this needs the {} role; the token has {}",
                needed.name(),
                role.name()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_from(peer: &str, token: Option<&str>) -> Request {
        let mut request = Request::builder()
            .method(axum::http::Method::GET)
            .uri("/streams/a");
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
        assert!(check_peer(&none, &request_from("127.0.0.1:5000", None)).is_ok());
        assert!(check_peer(&none, &request_from("[::1]:5000", None)).is_ok());
        assert!(check_peer(&none, &request_from("[::ffff:127.0.0.1]:5000", None)).is_ok());
        let refused = check_peer(&none, &request_from("192.0.2.7:5000", None)).unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(check_role(&none, Role::Admin, &request_from("127.0.0.1:5000", None)).is_ok());

        let mut tokens = Tokens::default();
        tokens.add("reader:reader-token").unwrap();
        let reader = request_from("192.0.2.7:5000", Some("reader-token"));
        assert!(check_peer(&tokens, &reader).is_ok());
        assert!(check_role(&tokens, Role::Reader, &reader).is_ok());
        let refused = check_role(&tokens, Role::Writer, &reader).unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let refused =
            check_role(&tokens, Role::Reader, &request_from("127.0.0.1:5000", None)).unwrap_err();
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
