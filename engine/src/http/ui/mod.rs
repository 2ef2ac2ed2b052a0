//! The admin UI at `/ui`: pages rendered on the server (maud) and refreshed in place by htmx,
//! with every asset inside the binary.
//!
//! Pages read through the API itself, called in-process with the visitor's token, so a page
//! shows exactly what the API answers and its role checks apply unchanged. Actions run in the
//! browser as `fetch` calls to `/ui/api/…`: the same API, with the token taken from the session
//! cookie. A page offers only the actions the token's role may take.

mod cluster;
mod connectors;
mod dashboard;
mod groups;
mod projections;
mod sharders;
mod streams;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::Stream;
use maud::{DOCTYPE, Markup, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt;

use super::AppState;
use super::auth::{Role, Tokens};

/// The cookie that keeps the visitor's token for the browser session (no expiry: it ends when
/// the browser closes).
const SESSION_COOKIE: &str = "refract_session";
/// The header every UI action carries: a page of another site cannot set it without a CORS
/// preflight, which this route never grants, so a forged form post cannot act.
const ACTION_HEADER: &str = "x-refract-ui";
/// Largest API answer a page reads.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// What the UI's handlers share.
pub struct Ui {
    /// The API router, without the UI: pages and actions call it in-process.
    api: Router,
    state: AppState,
    tokens: Arc<Tokens>,
    rates: Mutex<dashboard::Sampler>,
    disk: Mutex<dashboard::DiskUse>,
}

type Shared = State<Arc<Ui>>;

/// The UI's routes, given the finished API router they call.
///
/// Roles: the sign-in page and the assets are public; every page needs a session of any role
/// (reader and up: pages only read); `/ui/api/…` is the API, whose routes check their own roles
/// against the session's token.
pub fn routes(api: Router, state: AppState, tokens: Arc<Tokens>) -> Router {
    let ui = Arc::new(Ui {
        api,
        state,
        tokens: tokens.clone(),
        rates: Mutex::new(dashboard::Sampler::default()),
        disk: Mutex::new(dashboard::DiskUse::default()),
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route("/ui", get(dashboard::show))
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/live", get(live))
        .route("/ui/assets/{file}", get(asset))
        .route("/ui/api/{*path}", any(proxy))
        .route("/ui/streams", get(streams::all))
        .route("/ui/streams/{stream}", get(streams::stream))
        .route("/ui/projections", get(projections::list))
        .route("/ui/projections/{name}", get(projections::detail))
        .route("/ui/groups", get(groups::list))
        .route("/ui/groups/{stream}/{group}", get(groups::detail))
        .route("/ui/sharders", get(sharders::show))
        .route("/ui/connectors", get(connectors::show))
        .route("/ui/cluster", get(cluster::show))
        .layer(axum::middleware::from_fn(protect))
        .layer(axum::middleware::from_fn_with_state(
            tokens,
            super::auth::admit,
        ))
        .with_state(ui)
}

/// What every UI answer carries: no framing by other sites (clickjacking), nothing loaded or
/// run from elsewhere; and what every change needs: a request from the UI's own pages.
async fn protect(request: Request, next: axum::middleware::Next) -> Response {
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads && !same_origin(request.headers()) {
        let body = serde_json::json!({
            "error": "forbidden",
            "message": "changes through the UI come from the UI's own pages",
        });
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Whether a request comes from a page of this server: the browser's `Sec-Fetch-Site`, or
/// where a browser sends none, an `Origin` naming this host. Clients other than browsers send
/// neither and are not pages of another site.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => origin
            .to_str()
            .ok()
            .and_then(|origin| origin.split_once("://"))
            .is_some_and(|(_, origin_host)| host.to_str().is_ok_and(|host| host == origin_host)),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// The visitor: the token from the session cookie and its role. Without configured tokens
/// every (loopback) visitor is an admin, as on the API.
pub struct Session {
    token: Option<String>,
    role: Role,
}

impl Session {
    pub fn can(&self, role: Role) -> bool {
        self.role >= role
    }
}

impl FromRequestParts<Arc<Ui>> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Response> {
        if ui.tokens.is_empty() {
            return Ok(Session {
                token: None,
                role: Role::Admin,
            });
        }
        let token = session_token(&parts.headers);
        if let Some(token) = token
            && let Some(role) = ui.tokens.role_of(&token)
        {
            return Ok(Session {
                token: Some(token),
                role,
            });
        }
        // For a fragment (htmx) return to the page it is part of.
        let page = parts
            .headers
            .get("hx-current-url")
            .and_then(|url| url.to_str().ok())
            .and_then(|url| url.split_once("://"))
            .and_then(|(_, rest)| rest.find('/').map(|slash| rest[slash..].to_owned()));
        let here = page.unwrap_or_else(|| {
            parts
                .uri
                .path_and_query()
                .map_or("/ui".to_owned(), |path| path.to_string())
        });
        let login = format!("/ui/login?next={}", encode(&here));
        if parts.headers.contains_key("hx-request") {
            // htmx follows a redirect inside the fragment; this sends the whole page there.
            return Err(([("hx-redirect", login)], StatusCode::UNAUTHORIZED).into_response());
        }
        Err(Redirect::to(&login).into_response())
    }
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get_all(header::COOKIE);
    let value = cookies
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)?
        .1;
    let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
    String::from_utf8(bytes).ok()
}

/// An API answer that was not a success, as a page shows it.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
    }

    pub fn render(&self) -> Markup {
        html! {
            p.failure role="alert" { (self.status.as_u16()) ": " (self.message) }
        }
    }
}

impl Ui {
    /// `GET path` (with its query) on the API as the visitor, the answer as JSON.
    pub async fn get(&self, session: &Session, path: &str) -> Result<Value, Failure> {
        let (status, body) = self.call(session, path).await?;
        serde_json::from_slice(&body).map_err(|error| Failure {
            status,
            message: format!("the answer is not JSON: {error}"),
        })
    }

    /// `GET path` on the API as the visitor, the answer as text.
    pub async fn get_text(&self, session: &Session, path: &str) -> Result<String, Failure> {
        let (_, body) = self.call(session, path).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    async fn call(
        &self,
        session: &Session,
        path: &str,
    ) -> Result<(StatusCode, bytes::Bytes), Failure> {
        let mut request = Request::builder().method(Method::GET).uri(path);
        if let Some(token) = &session.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Body::empty()).map_err(|error| Failure {
            status: StatusCode::BAD_REQUEST,
            message: error.to_string(),
        })?;
        let response = self.api.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
            .await
            .map_err(|error| Failure {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: error.to_string(),
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|body| body["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(Failure { status, message });
        }
        Ok((status, body))
    }
}

/// The API behind the session cookie, for the pages' actions and live views.
async fn proxy(State(ui): Shared, request: Request) -> Response {
    let refuse = |status: StatusCode, error: &str, message: &str| {
        let body = serde_json::json!({"error": error, "message": message});
        (status, axum::Json(body)).into_response()
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads && !request.headers().contains_key(ACTION_HEADER) {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "actions through /ui/api come from the UI's pages (X-Refract-UI header)",
        );
    }
    let token = session_token(request.headers());
    if !ui.tokens.is_empty() && token.is_none() {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in at /ui/login first",
        );
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().strip_prefix("/ui/api").unwrap_or("/");
    let uri = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut forwarded = Request::builder().method(parts.method).uri(uri);
    for name in [
        header::CONTENT_TYPE,
        header::ACCEPT,
        HeaderName::from_static("last-event-id"),
        HeaderName::from_static("expected-revision"),
    ] {
        if let Some(value) = parts.headers.get(&name) {
            forwarded = forwarded.header(name, value);
        }
    }
    if let Some(token) = token {
        forwarded = forwarded.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    match forwarded.body(body) {
        Ok(forwarded) => ui.api.clone().oneshot(forwarded).await.expect("infallible"),
        Err(error) => refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &error.to_string(),
        ),
    }
}

/// Server-sent notices for the pages' live parts: `head` when the log grows (at most four a
/// second) and at least every two seconds, so rates and progress move while nothing is written.
async fn live(
    State(ui): Shared,
    _session: Session,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let head = ui.state.store.watch_head();
    let shutdown = ui.state.shutdown.clone();
    let notices = futures::stream::unfold((head, shutdown), |(mut head, shutdown)| async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            changed = head.changed() => changed.ok()?,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let position = *head.borrow_and_update();
        let notice = Event::default().event("head").data(position.to_string());
        Some((Ok(notice), (head, shutdown)))
    });
    Sse::new(notices).keep_alive(KeepAlive::default())
}

const HTMX: &[u8] = include_bytes!("assets/htmx.min.js");
const SCRIPT: &[u8] = include_bytes!("assets/ui.js");
const STYLE: &[u8] = include_bytes!("assets/ui.css");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript"),
        "ui.js" => (SCRIPT, "text/javascript"),
        "ui.css" => (STYLE, "text/css"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Where to go after signing in: a UI page, never another site (nor a malformed address).
fn after_login(next: Option<&str>) -> &str {
    next.filter(|next| {
        next.starts_with("/ui")
            && !next.starts_with("/ui/login")
            && next.bytes().all(|byte| byte.is_ascii_graphic())
    })
    .unwrap_or("/ui")
}

async fn login_page(State(ui): Shared, Query(query): Query<LoginQuery>) -> Response {
    if ui.tokens.is_empty() {
        return Redirect::to(after_login(query.next.as_deref())).into_response();
    }
    Html(login_markup(query.next.as_deref(), None).into_string()).into_response()
}

async fn login(State(ui): Shared, axum::Form(form): axum::Form<LoginForm>) -> Response {
    let next = after_login(form.next.as_deref()).to_owned();
    let token = form.token.trim();
    if ui.tokens.role_of(token).is_none() {
        let page = login_markup(Some(&next), Some("That token is not valid."));
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict",
        URL_SAFE_NO_PAD.encode(token)
    );
    (
        [(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("ASCII"),
        )],
        Redirect::to(&next),
    )
        .into_response()
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response()
}

fn login_markup(next: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main #main .login {
                    h1 { "Refract" }
                    form method="post" action="/ui/login" {
                        @if let Some(error) = error { p.failure role="alert" { (error) } }
                        label for="token" { "Token" }
                        input #token type="password" name="token" required autocomplete="current-password" autofocus;
                        input type="hidden" name="next" value=(after_login(next));
                        button type="submit" { "Sign in" }
                        p.hint { "The token stays in this browser session only." }
                    }
                }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            // The page's policy allows no inline style, which htmx would add for its indicators.
            meta name="htmx-config" content=r#"{"includeIndicatorStyles": false}"#;
            title { (title) " · Refract" }
            link rel="stylesheet" href="/ui/assets/ui.css";
            script src="/ui/assets/htmx.min.js" defer {}
            script src="/ui/assets/ui.js" defer {}
        }
    }
}

/// The pages of the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Dashboard,
    Streams,
    Projections,
    Groups,
    Sharders,
    Connectors,
    Cluster,
}

const NAVIGATION: [(Nav, &str, &str); 7] = [
    (Nav::Dashboard, "/ui", "Dashboard"),
    (Nav::Streams, "/ui/streams", "Streams"),
    (Nav::Projections, "/ui/projections", "Projections"),
    (Nav::Groups, "/ui/groups", "Groups"),
    (Nav::Sharders, "/ui/sharders", "Sharders"),
    (Nav::Connectors, "/ui/connectors", "Connectors"),
    (Nav::Cluster, "/ui/cluster", "Cluster"),
];

/// A whole page around `body`; an htmx request for a page gets `body` alone.
pub fn page(
    headers: &HeaderMap,
    title: &str,
    current: Nav,
    session: &Session,
    ui: &Ui,
    body: Markup,
) -> Response {
    if headers.contains_key("hx-request") && !headers.contains_key("hx-boosted") {
        return Html(body.into_string()).into_response();
    }
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui" { "Refract" }
                    nav aria-label="Main" {
                        ul {
                            @for (nav, href, label) in NAVIGATION {
                                li {
                                    @if nav == current {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    @if !ui.tokens.is_empty() {
                        form.signout method="post" action="/ui/logout" {
                            span.role { (session.role.name()) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                div #flash role="status" aria-live="polite" {}
                main #main tabindex="-1" { (body) }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// Characters left as they are in a path segment or query value.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `text` percent-encoded for a path segment or a query value (`.` and `..` too, which a
/// browser would otherwise resolve away).
pub fn encode(text: &str) -> String {
    match text {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => utf8_percent_encode(text, SEGMENT).to_string(),
    }
}

/// A form field's value, unless empty or blank.
pub fn filled(value: &Option<String>) -> Option<&str> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// `value` as indented JSON.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// `n` with thousands separators.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A rate or other figure, to three significant places.
pub fn figure(x: f64) -> String {
    if x >= 100.0 {
        count(x.round() as u64)
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Bytes in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration in seconds as `1h 2m`, `3m 4s` or `5.6 s`.
pub fn seconds(total: f64) -> String {
    if total < 60.0 {
        return format!("{total:.1} s");
    }
    let whole = total.round() as u64;
    let (hours, minutes, secs) = (whole / 3600, whole / 60 % 60, whole % 60);
    if hours > 0 {
        format!("{hours}h {minutes}m")
    } else {
        format!("{minutes}m {secs}s")
    }
}

/// An action button: `fetch(method, /ui/api + path)` from `ui.js`, asking `confirm` first when
/// given; the page's parts refresh after it.
pub fn action(label: &str, method: &str, path: &str, confirm: Option<&str>) -> Markup {
    html! {
        button type="button" data-method=(method) data-path=(path) data-confirm=[confirm] { (label) }
    }
}

/// A `DELETE` button asking `confirm` first, then going to `then` (the list the thing was in).
pub fn removal(label: &str, path: &str, confirm: &str, then: &str) -> Markup {
    html! {
        button type="button" data-method="DELETE" data-path=(path) data-confirm=(confirm) data-then=(then) { (label) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(figure(1234.4), "1,234");
        assert_eq!(figure(12.34), "12.3");
        assert_eq!(figure(0.5), "0.50");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(seconds(5.55), "5.5 s");
        assert_eq!(seconds(125.0), "2m 5s");
        assert_eq!(seconds(7260.0), "2h 1m");
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode("$all"), "%24all");
        assert_eq!(encode("order-1/a b"), "order-1%2Fa%20b");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("a.b"), "a.b");
    }

    #[test]
    fn sign_in_returns_only_to_ui_pages() {
        assert_eq!(after_login(Some("/ui/streams")), "/ui/streams");
        assert_eq!(after_login(Some("https://elsewhere")), "/ui");
        assert_eq!(after_login(Some("//elsewhere")), "/ui");
        assert_eq!(after_login(Some("/ui/login?next=/ui")), "/ui");
        assert_eq!(after_login(None), "/ui");
        assert_eq!(after_login(Some("/ui/streams/a\nb")), "/ui");
    }

    #[test]
    fn changes_come_from_the_same_site() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        let here = [
            ("host", "127.0.0.1:2113"),
            ("origin", "http://127.0.0.1:2113"),
        ];
        assert!(same_origin(&headers(&here)));
        let elsewhere = [
            ("host", "127.0.0.1:2113"),
            ("origin", "http://evil.example"),
        ];
        assert!(!same_origin(&headers(&elsewhere)));
        assert!(same_origin(&headers(&[("host", "127.0.0.1:2113")])));
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        let value = format!(
            "other=1; {SESSION_COOKIE}={}; last=2",
            URL_SAFE_NO_PAD.encode("tok;en")
        );
        headers.insert(header::COOKIE, value.parse().unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some("tok;en"));
        assert_eq!(session_token(&HeaderMap::new()), None);
    }
}
