//! The stream browser: `$all` and any stream, paged both ways, filtered, tailed live.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::{Nav, Session, Shared, count, encode, filled, page, pretty, removal};
use crate::http::Role;

const ALL: &str = "$all";
const DEFAULT_LIMIT: u32 = 20;

#[derive(Deserialize, Default, Clone)]
pub struct BrowseQuery {
    /// Revision (or position in `$all`) to read from.
    from: Option<String>,
    /// `forward` or `backward` (the default: newest first).
    direction: Option<String>,
    limit: Option<u32>,
    stream_prefix: Option<String>,
    type_prefix: Option<String>,
    include_system: Option<String>,
    /// Newest first, refreshed as events arrive.
    live: Option<String>,
    /// A stream to open, from the "open stream" form.
    open: Option<String>,
    /// `events`: the events region alone, for its live refresh.
    part: Option<String>,
}

impl BrowseQuery {
    fn forward(&self) -> bool {
        self.direction.as_deref() == Some("forward") && !self.live()
    }

    fn live(&self) -> bool {
        self.live.as_deref().is_some_and(|live| !live.is_empty())
    }

    fn limit(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, 1000)
    }

    /// This view's query string with `changes` applied (`None` drops a parameter).
    fn with(&self, changes: &[(&str, Option<String>)]) -> String {
        let mut pairs: Vec<(&str, Option<String>)> = vec![
            ("from", filled(&self.from).map(str::to_owned)),
            ("direction", self.direction.clone()),
            ("limit", self.limit.map(|limit| limit.to_string())),
            (
                "stream_prefix",
                filled(&self.stream_prefix).map(str::to_owned),
            ),
            ("type_prefix", filled(&self.type_prefix).map(str::to_owned)),
            (
                "include_system",
                filled(&self.include_system).map(str::to_owned),
            ),
            ("live", filled(&self.live).map(str::to_owned)),
        ];
        for (name, value) in changes {
            match pairs.iter_mut().find(|(existing, _)| existing == name) {
                Some(pair) => pair.1 = value.clone(),
                None => pairs.push((name, value.clone())),
            }
        }
        let query: Vec<String> = pairs
            .into_iter()
            .filter_map(|(name, value)| value.map(|value| format!("{name}={}", encode(&value))))
            .collect();
        if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        }
    }

    /// The API read for this view.
    fn api_path(&self, stream: &str) -> String {
        let from = filled(&self.from).filter(|_| !self.live());
        self.read_path(stream, self.forward(), from)
    }

    /// A read of `stream` with this view's filters, in a direction, from a place.
    fn read_path(&self, stream: &str, forward: bool, from: Option<&str>) -> String {
        let direction = if forward { "forward" } else { "backward" };
        let mut path = format!(
            "/streams/{}?limit={}&direction={direction}",
            encode(stream),
            self.limit(),
        );
        if let Some(from) = from {
            path.push_str(&format!("&from={}", encode(from)));
        }
        if stream == ALL {
            for (name, value) in [
                ("stream_prefix", &self.stream_prefix),
                ("type_prefix", &self.type_prefix),
            ] {
                if let Some(value) = filled(value) {
                    path.push_str(&format!("&{name}={}", encode(value)));
                }
            }
            if filled(&self.include_system).is_some() {
                path.push_str("&include_system=true");
            }
        }
        path
    }
}

pub async fn all(
    State(ui): Shared,
    session: Session,
    headers: HeaderMap,
    Query(query): Query<BrowseQuery>,
) -> Response {
    if let Some(stream) = filled(&query.open) {
        return Redirect::to(&stream_url(stream)).into_response();
    }
    browse(&ui, &session, &headers, ALL, query).await
}

pub async fn stream(
    State(ui): Shared,
    session: Session,
    headers: HeaderMap,
    Path(stream): Path<String>,
    Query(query): Query<BrowseQuery>,
) -> Response {
    browse(&ui, &session, &headers, &stream, query).await
}

/// The UI page of `stream`.
pub fn stream_url(stream: &str) -> String {
    if stream == ALL {
        "/ui/streams".to_owned()
    } else {
        format!("/ui/streams/{}", encode(stream))
    }
}

async fn browse(
    ui: &super::Ui,
    session: &Session,
    headers: &HeaderMap,
    stream: &str,
    query: BrowseQuery,
) -> Response {
    let events = events_region(ui, session, stream, &query).await;
    if query.part.as_deref() == Some("events") {
        return page(headers, stream, Nav::Streams, session, ui, events);
    }
    let metadata = if stream == ALL {
        None
    } else {
        let path = format!("/streams/{}/metadata", encode(stream));
        Some(ui.get(session, &path).await)
    };
    let here = stream_url(stream);
    let body = html! {
        h1 { @if stream == ALL { "All events " code { "$all" } } @else { "Stream " code { (stream) } } }
        form.toolbar method="get" action="/ui/streams" {
            label for="open-stream" { "Open stream" }
            input #open-stream name="open" type="text" placeholder="order-123" required;
            button type="submit" { "Open" }
        }
        form.toolbar method="get" action=(here) {
            @if stream == ALL {
                label for="stream-prefix" { "Stream prefix" }
                input #stream-prefix name="stream_prefix" type="text" value=[filled(&query.stream_prefix)];
                label for="type-prefix" { "Event type prefix" }
                input #type-prefix name="type_prefix" type="text" value=[filled(&query.type_prefix)];
                label.check {
                    input name="include_system" type="checkbox" value="true" checked[filled(&query.include_system).is_some()];
                    " System records"
                }
            }
            label for="from" { @if stream == ALL { "From position" } @else { "From revision" } }
            input #from name="from" type="number" min="0" value=[filled(&query.from)];
            label for="direction" { "Direction" }
            select #direction name="direction" {
                option value="backward" selected[!query.forward()] { "Newest first" }
                option value="forward" selected[query.forward()] { "Oldest first" }
            }
            label for="limit" { "Page size" }
            select #limit name="limit" {
                @for size in [20, 50, 100, 500] {
                    option value=(size) selected[query.limit() == size] { (size) }
                }
            }
            button type="submit" { "Show" }
        }
        nav.paging aria-label="Pages" {
            a href={ (here) (query.with(&[("from", None), ("direction", Some("backward".into())), ("live", None)])) } { "Newest" }
            a href={ (here) (query.with(&[("from", Some("0".into())), ("direction", Some("forward".into())), ("live", None)])) } { "Oldest" }
            @if query.live() {
                a.toggle href={ (here) (query.with(&[("live", None)])) } { "Live tail: on" }
            } @else {
                a.toggle href={ (here) (query.with(&[("live", Some("1".into())), ("from", None)])) } { "Live tail: off" }
            }
            button type="button" data-expand-all aria-pressed="false" { "Expand all" }
        }
        (events)
        @if let Some(metadata) = metadata {
            (metadata_section(session, stream, metadata))
        }
    };
    page(headers, stream, Nav::Streams, session, ui, body)
}

async fn events_region(
    ui: &super::Ui,
    session: &Session,
    stream: &str,
    query: &BrowseQuery,
) -> Markup {
    let answer = ui.get(session, &query.api_path(stream)).await;
    let first = answer
        .as_ref()
        .ok()
        .and_then(|answer| answer["events"].get(0));
    let previous = match first.and_then(|event| place(stream, event)) {
        Some(first) if !query.live() => previous_page(ui, session, stream, query, first).await,
        _ => None,
    };
    let here = stream_url(stream);
    let live_url = format!("{here}{}", query.with(&[("part", Some("events".into()))]));
    let position_heading = if stream == ALL {
        "Position"
    } else {
        "Revision"
    };
    html! {
        @if query.live() {
            div #events data-live hx-get=(live_url) hx-trigger="live" hx-swap="outerHTML" {
                (events_table(stream, &answer, position_heading, &here, query, previous))
            }
        } @else {
            div #events { (events_table(stream, &answer, position_heading, &here, query, previous)) }
        }
    }
}

/// Where the page before this one starts: the far end of a read the other way from just
/// before `first`, so filtered views page back exactly.
async fn previous_page(
    ui: &super::Ui,
    session: &Session,
    stream: &str,
    query: &BrowseQuery,
    first: u64,
) -> Option<u64> {
    let start = if query.forward() {
        first.checked_sub(1)?
    } else {
        first + 1
    };
    let path = query.read_path(stream, !query.forward(), Some(&start.to_string()));
    let answer = ui.get(session, &path).await.ok()?;
    let events = answer["events"].as_array()?;
    place(stream, events.last()?)
}

/// Where `event` sits in what is browsed: the position in `$all`, else the revision in the
/// stream read (a link's own revision for a stream of links).
fn place(browsed: &str, event: &Value) -> Option<u64> {
    if browsed == ALL {
        event["position"].as_u64()
    } else if event["link"].is_object() {
        event["link"]["revision"].as_u64()
    } else {
        event["revision"].as_u64()
    }
}

fn events_table(
    stream: &str,
    answer: &Result<Value, super::Failure>,
    position_heading: &str,
    here: &str,
    query: &BrowseQuery,
    previous: Option<u64>,
) -> Markup {
    let answer = match answer {
        Ok(answer) => answer,
        Err(failure) if failure.not_found() => {
            return html! { p.empty { "The stream " code { (stream) } " has no events." } };
        }
        Err(failure) => return failure.render(),
    };
    let empty = Vec::new();
    let events = answer["events"].as_array().unwrap_or(&empty);
    let next = answer["next"].as_u64();
    html! {
        @if events.is_empty() {
            p.empty { "No events here." }
        } @else {
            div.scroll {
                table.events {
                    caption.visually-hidden { "Events of " (stream) }
                    thead { tr {
                        th scope="col" .num { (position_heading) }
                        th scope="col" { "Stream" } th scope="col" { "Type" } th scope="col" { "Created" }
                        th scope="col" { "Event" }
                    } }
                    tbody {
                        @for event in events { (event_row(stream, event)) }
                    }
                }
            }
        }
        p.paging {
            @if let Some(previous) = previous {
                a href={ (here) (query.with(&[("from", Some(previous.to_string()))])) } rel="prev" { "Previous page" }
            }
            @if let Some(next) = next.filter(|_| !query.live()) {
                a href={ (here) (query.with(&[("from", Some(next.to_string()))])) } rel="next" { "Next page" }
            }
        }
    }
}

fn event_row(browsed: &str, event: &Value) -> Markup {
    let event_stream = event["stream"].as_str().unwrap_or("");
    let kind = event["type"].as_str().unwrap_or("");
    let link = &event["link"];
    let place = place(browsed, event);
    // System streams (`$ce-…`, `$et-…`) belong to no category.
    let category = event_stream
        .split_once('-')
        .map(|(category, _)| category)
        .filter(|category| !category.starts_with('$'));
    let correlation = event["metadata"]["$correlationId"].as_str();
    let mut shown = serde_json::Map::new();
    for field in ["id", "data", "data_base64", "content_type", "metadata"] {
        if let Some(value) = event.get(field) {
            shown.insert(field.to_owned(), value.clone());
        }
    }
    html! {
        tr data-key=[place] {
            td.num { (place.map(count).unwrap_or_default()) }
            td {
                a href=(stream_url(event_stream)) { (event_stream) } " "
                span.sub { "#" (event["revision"].as_u64().unwrap_or(0)) }
                @if let Some(via) = link["stream"].as_str() {
                    br; span.sub { "via " a href=(stream_url(via)) { (via) } }
                }
                @if category.is_some() || correlation.is_some() {
                    br; span.sub {
                        @if let Some(category) = category {
                            a href=(stream_url(&format!("$ce-{category}"))) title="Category stream" { "$ce-" (category) }
                        }
                        @if category.is_some() && correlation.is_some() { " · " }
                        @if let Some(correlation) = correlation {
                            a href=(stream_url(&format!("$bc-{correlation}"))) title="Correlation stream" { "$bc-" (correlation) }
                        }
                    }
                }
            }
            td { a href=(stream_url(&format!("$et-{kind}"))) { (kind) } }
            td { time { (event["created"].as_str().unwrap_or("")) } }
            td {
                details {
                    summary { "JSON" }
                    pre { code { (pretty(&Value::Object(shown))) } }
                }
            }
        }
    }
}

fn metadata_section(
    session: &Session,
    stream: &str,
    metadata: Result<Value, super::Failure>,
) -> Markup {
    let path = format!("/streams/{}", encode(stream));
    let current = match &metadata {
        Ok(value) => pretty(value),
        Err(_) => "{}".to_owned(),
    };
    html! {
        section aria-labelledby="metadata-heading" {
            h2 #metadata-heading { "Metadata" }
            @match &metadata {
                Ok(value) => pre { code { (pretty(value)) } },
                Err(failure) if failure.not_found() => p { "None set." },
                Err(failure) => (failure.render()),
            }
            @if session.can(Role::Writer) && !stream.starts_with('$') {
                form data-api method="put" data-path={ (path) "/metadata" } {
                    label for="metadata-body" { "Metadata (JSON)" }
                    textarea #metadata-body name="body" data-in="body" rows="5" { (current) }
                    button type="submit" { "Save metadata" }
                    output {}
                }
            }
            @if session.can(Role::Admin) && !stream.starts_with('$') {
                h2 { "Delete" }
                p.actions {
                    (removal("Delete stream", &path, &format!("Delete {stream}? Reads answer 404 until it is written again."), "/ui/streams"))
                    (removal("Tombstone stream", &format!("{path}?hard=true"), &format!("Tombstone {stream}? It can never be read or written again."), "/ui/streams"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_keep_their_filters_when_paging() {
        let query = BrowseQuery {
            stream_prefix: Some("order".into()),
            direction: Some("forward".into()),
            ..Default::default()
        };
        assert_eq!(
            query.with(&[("from", Some("40".into()))]),
            "?from=40&direction=forward&stream_prefix=order"
        );
        assert_eq!(
            query.api_path(ALL),
            "/streams/%24all?limit=20&direction=forward&stream_prefix=order"
        );
        assert_eq!(
            query.api_path("a b"),
            "/streams/a%20b?limit=20&direction=forward"
        );
    }

    #[test]
    fn live_views_read_the_newest_events() {
        let query = BrowseQuery {
            from: Some("5".into()),
            direction: Some("forward".into()),
            live: Some("1".into()),
            ..Default::default()
        };
        assert_eq!(
            query.api_path("order-1"),
            "/streams/order-1?limit=20&direction=backward"
        );
    }
}
