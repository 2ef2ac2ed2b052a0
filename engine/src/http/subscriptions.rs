//! Catch-up then live subscriptions over Server-Sent Events.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::openapi::EventStream;
use super::streams::{ALL, EventJson, all_filter, shard_filter};
use crate::names::Name;
use crate::store::parse_revision;
use crate::subscribe::{Item, ShardFilter, Source, Start, Subscription};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscribeAllQuery {
    /// `start` (default), `end`, or the first position to deliver.
    /// A `Last-Event-ID` header resumes after that id instead.
    pub from: Option<String>,
    /// Comma-separated stream name prefixes; an event matching any is delivered.
    pub stream_prefix: Option<String>,
    /// Comma-separated event type prefixes; an event matching any is delivered.
    pub type_prefix: Option<String>,
    /// Also deliver events of `$`-streams.
    pub include_system: Option<bool>,
    /// With `shards` and `shard`: only the events this stored sharder places on shard `shard`
    /// of `shards`.
    pub sharder: Option<String>,
    #[param(minimum = 1)]
    pub shards: Option<u32>,
    pub shard: Option<u32>,
}

/// Both query shapes, for `$all` reached through a percent-encoded stream name.
#[derive(Debug, Deserialize)]
pub struct AnySubscribeQuery {
    from: Option<String>,
    resolve_links: Option<bool>,
    stream_prefix: Option<String>,
    type_prefix: Option<String>,
    include_system: Option<bool>,
    sharder: Option<String>,
    shards: Option<u32>,
    shard: Option<u32>,
}

fn start(from: Option<&str>, headers: &HeaderMap) -> Result<Start, ApiError> {
    let from = match from {
        None | Some("start") => Start::Beginning,
        Some("end") => Start::End,
        Some(number) => parse_revision(number).map(Start::At).ok_or_else(|| {
            ApiError::invalid(format!(
                "from must be start, end or a number, not {number:?}"
            ))
        })?,
    };
    // Both are checked; a Last-Event-ID resumes where the client was, whatever `from` says.
    if let Some(last) = headers.get("last-event-id") {
        let next = last
            .to_str()
            .ok()
            .and_then(parse_revision)
            .and_then(|last| last.checked_add(1))
            .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a revision or position"))?;
        return Ok(Start::At(next));
    }
    Ok(from)
}

/// Subscribe to a stream: its history, a `caught_up` event, then live events.
#[utoipa::path(
    get,
    path = "/streams/{stream}/subscribe",
    tag = "subscriptions",
    params(("stream" = String, Path, description = "Stream name"),
           ("from" = Option<String>, Query,
               description = "start (default), end, or the first revision to deliver"),
           ("resolve_links" = Option<bool>, Query,
               description = "Deliver the events links point at (default true) instead of the links"),
           ("sharder" = Option<String>, Query, description = "With `shards` and `shard`: only \
               the events this stored sharder places on shard `shard` of `shards`"),
           ("shards" = Option<u32>, Query, minimum = 1),
           ("shard" = Option<u32>, Query),
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this revision")),
    responses(
        (status = 200, description = "Server-Sent Events: `event: event` with `id:` the revision \
            and `data:` the event JSON; one `event: caught_up`; comment heartbeats every 15 s",
            content_type = "text/event-stream", body = EventStream),
        (status = 400, body = ErrorBody), (status = 410, body = ErrorBody),
    )
)]
pub async fn subscribe_stream(
    State(state): State<AppState>,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<AnySubscribeQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if stream == ALL {
        let AnySubscribeQuery {
            from,
            stream_prefix,
            type_prefix,
            include_system,
            sharder,
            shards,
            shard,
            ..
        } = query;
        let query = SubscribeAllQuery {
            from,
            stream_prefix,
            type_prefix,
            include_system,
            sharder,
            shards,
            shard,
        };
        return subscribe_all_events(state, query, &headers).await;
    }
    Name::Stream.check(&stream).map_err(ApiError::invalid)?;
    let start = start(query.from.as_deref(), &headers)?;
    let shard = shard_filter(&state, query.sharder, query.shards, query.shard)?;
    let source = Source::Stream {
        name: stream,
        resolve_links: query.resolve_links.unwrap_or(true),
    };
    let subscription = Subscription::start(state.store.clone(), source, start).await?;
    Ok(sse(on_shard(subscription, shard), &state))
}

/// Subscribe to `$all`, with optional prefix filters; ids are positions.
#[utoipa::path(
    get,
    path = "/streams/$all/subscribe",
    tag = "subscriptions",
    params(SubscribeAllQuery,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "Server-Sent Events as for a stream, with positions as ids",
            content_type = "text/event-stream", body = EventStream),
        (status = 400, body = ErrorBody),
    )
)]
pub async fn subscribe_all(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SubscribeAllQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    subscribe_all_events(state, query, &headers).await
}

async fn subscribe_all_events(
    state: AppState,
    query: SubscribeAllQuery,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let start = start(query.from.as_deref(), headers)?;
    let filter = all_filter(
        query.stream_prefix.as_deref(),
        query.type_prefix.as_deref(),
        query.include_system,
    );
    let shard = shard_filter(&state, query.sharder, query.shards, query.shard)?;
    let subscription =
        Subscription::start(state.store.clone(), Source::All { filter }, start).await?;
    Ok(sse(on_shard(subscription, shard), &state))
}

fn on_shard(subscription: Subscription, shard: Option<ShardFilter>) -> Subscription {
    match shard {
        Some(shard) => subscription.on_shard(shard),
        None => subscription,
    }
}

fn sse(subscription: Subscription, state: &AppState) -> Response {
    let events = futures::stream::unfold(Some(subscription), |subscription| async move {
        let mut subscription = subscription?;
        let message = match subscription.next().await {
            Ok(Item::Event { id, event }) => {
                let json = serde_json::to_string(&EventJson::new(&event)).expect("serialisable");
                Event::default()
                    .id(id.to_string())
                    .event("event")
                    .data(json)
            }
            Ok(Item::CaughtUp) => Event::default().event("caught_up").data("{}"),
            Err(error) => {
                // The stream ends after telling the client why.
                let error = ApiError::from(error);
                let body = serde_json::json!({"error": error.code(), "message": error.message()});
                return Some((
                    Ok::<_, Infallible>(Event::default().event("error").data(body.to_string())),
                    None,
                ));
            }
        };
        Some((Ok(message), Some(subscription)))
    })
    .take_until(state.shutdown.clone().cancelled_owned());
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.heartbeat).text("heartbeat"))
        .into_response()
}
