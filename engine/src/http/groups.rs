//! Consumer groups: settings, pull and push delivery, ack and nack, parked messages.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody, LimitedBody};
use super::openapi::{MessageStream, exact_schema};
use super::streams::{EventJson, check_content_type};
use crate::groups::settings::Settings;
use crate::groups::{
    Delivery, GroupError, Groups, Info, NackAction, PartitionMessage, Pulled, parked_stream_name,
};
use crate::store::Direction;

/// Messages a pull returns when `max` is not given.
const DEFAULT_PULL: usize = 10;
/// Unacked messages a push consumer holds when `buffer` is not given.
const DEFAULT_BUFFER: usize = 10;

impl From<GroupError> for ApiError {
    fn from(error: GroupError) -> Self {
        let message = error.to_string();
        match error {
            GroupError::NotFound { .. } => ApiError::not_found(message),
            GroupError::Invalid(_) => ApiError::invalid(message),
            GroupError::NotDelivered(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_delivered", message)
            }
            GroupError::Full(_) => {
                ApiError::new(StatusCode::CONFLICT, "max_subscribers_reached", message)
            }
            GroupError::InUse(_) => ApiError::new(StatusCode::CONFLICT, "in_use", message),
            GroupError::Exists { .. } => ApiError::new(StatusCode::CONFLICT, "exists", message),
            GroupError::NoSharder(_) => ApiError::not_found(message),
            GroupError::StaleGeneration(_) => {
                ApiError::new(StatusCode::CONFLICT, "stale_generation", message)
            }
            GroupError::NotOwner(_) => ApiError::new(StatusCode::CONFLICT, "not_owner", message),
            GroupError::Store(error) => error.into(),
            GroupError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        }
    }
}

/// A delivered message.
#[derive(Serialize, ToSchema)]
pub struct MessageJson<'a> {
    /// Acks or nacks this message (groups that ack: every strategy but `partitioned`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_id: Option<&'a str>,
    /// How many times it was delivered before (groups that ack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_count: Option<u32>,
    /// The message's partition (partitioned groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// What to commit for the partition once this message is processed: its revision (or
    /// position, on `$all`) in the group's stream (partitioned groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    pub event: EventJson<'a>,
}

impl<'a> MessageJson<'a> {
    fn new(delivery: &'a Delivery) -> Self {
        MessageJson {
            ack_id: Some(&delivery.ack_id),
            retry_count: Some(delivery.retry_count),
            partition: None,
            offset: None,
            event: EventJson::new(&delivery.event),
        }
    }

    fn partitioned(message: &'a PartitionMessage) -> Self {
        MessageJson {
            ack_id: None,
            retry_count: None,
            partition: Some(message.partition),
            offset: Some(message.id),
            event: EventJson::new(&message.event),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Messages<'a> {
    /// The caller's generation (partitioned groups): what its commits name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The caller's partitions in that generation (partitioned groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
    pub messages: Vec<MessageJson<'a>>,
}

impl<'a> Messages<'a> {
    fn new(pulled: &'a Pulled) -> Self {
        match pulled {
            Pulled::Messages(deliveries) => Messages {
                generation: None,
                partitions: None,
                messages: deliveries.iter().map(MessageJson::new).collect(),
            },
            Pulled::Partitioned(batch) => Messages {
                generation: Some(batch.assignment.generation),
                partitions: Some(batch.assignment.partitions.clone()),
                messages: batch
                    .messages
                    .iter()
                    .map(MessageJson::partitioned)
                    .collect(),
            },
        }
    }
}

/// A partitioned group's consumer's partitions, sent on a push subscription when it joins and
/// whenever they change.
#[derive(Serialize, ToSchema)]
pub struct AssignmentJson {
    pub generation: u64,
    pub partitions: Vec<u32>,
}

fn parse_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    check_content_type(headers)?;
    crate::json::from_slice(body)
        .map_err(|error| ApiError::invalid(format!("invalid body: {error}")))
}

/// Every group.
#[utoipa::path(get, path = "/groups", tag = "groups", responses((status = 200, body = Vec<Info>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Info>>, ApiError> {
    Ok(Json(state.processing()?.groups.list().await))
}

/// A group's settings and statistics.
#[utoipa::path(get, path = "/groups/{stream}/{group}", tag = "groups",
    params(("stream" = String, Path, description = "A stream, a system stream or $all"),
        ("group" = String, Path, description = "Group name")),
    responses((status = 200, body = Info), (status = 404, body = ErrorBody)))]
pub async fn info(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
) -> Result<Json<Info>, ApiError> {
    Ok(Json(
        state.processing()?.groups.info(&stream, &group).await?,
    ))
}

/// Create a group (201) or replace its settings (200); the checkpoint is kept.
#[utoipa::path(put, path = "/groups/{stream}/{group}", tag = "groups",
    params(("stream" = String, Path, description = "A stream, a system stream or $all"),
        ("group" = String, Path, description = "Group name")),
    request_body(content = Option<Settings>, content_type = "application/json",
        description = "Every field optional (and the body too); EventStoreDB's defaults"),
    responses((status = 201, body = Info), (status = 200, body = Info),
        (status = 400, body = ErrorBody),
        (status = 404, description = "The sharder the strategy names does not exist",
            body = ErrorBody),
        (status = 410, description = "The stream was deleted permanently", body = ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    check_content_type(&headers)?;
    let settings = Settings::parse(&body).map_err(ApiError::invalid)?;
    let (created, info) = state
        .processing()?
        .groups
        .put(&stream, &group, settings)
        .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(info)).into_response())
}

/// Delete a group, its checkpoint and its parked messages.
#[utoipa::path(delete, path = "/groups/{stream}/{group}", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.processing()?.groups.delete(&stream, &group).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PullQuery {
    /// Who pulls; a new name joins the group.
    consumer: String,
    /// Most messages to return (default 10).
    #[param(minimum = 1, maximum = 10000)]
    max: Option<usize>,
    /// How long to wait when no message is ready (default 0; longer waits end at 60,000).
    wait_ms: Option<u64>,
    /// Partitioned groups: the generation the consumer last learned. A consumer's first pull
    /// leaves it out; a known consumer that leaves it out (a new process under its name, or one
    /// that lost an answer) gets its partitions again from their committed offsets.
    generation: Option<u64>,
}

/// Up to `max` messages for a consumer, waiting up to `wait_ms` when none is ready.
#[utoipa::path(post, path = "/groups/{stream}/{group}/pull", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path), PullQuery),
    responses((status = 200, body = Messages), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pull(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<PullQuery>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0));
    let max = query.max.unwrap_or(DEFAULT_PULL);
    // A long poll ends empty when the server shuts down, so it does not hold the shutdown up.
    let groups = state.processing()?.groups;
    let pulled = groups.pull(
        &stream,
        &group,
        &query.consumer,
        query.generation,
        max,
        wait,
    );
    let pulled = tokio::select! {
        pulled = pulled => pulled?,
        () = state.shutdown.cancelled() => {
            if groups.is_partitioned(&stream, &group).unwrap_or(false) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the server is shutting down",
                ));
            }
            Pulled::Messages(Vec::new())
        }
    };
    Ok(Json(Messages::new(&pulled)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubscribeQuery {
    consumer: String,
    /// Unacked messages the consumer holds at most (default 10).
    #[param(minimum = 1, maximum = 10000)]
    buffer: Option<usize>,
}

/// Push delivery: the group's messages for this consumer as Server-Sent Events. Closing the
/// connection leaves the group.
#[utoipa::path(get, path = "/groups/{stream}/{group}/subscribe", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path), SubscribeQuery),
    responses((status = 200, description = "`event: message` with `id:` the ack id (the offset \
        for a partitioned group) and `data:` a message as `pull` returns them; a partitioned \
        group sends `event: assignment` with the consumer's generation and partitions first and \
        whenever they change", content_type = "text/event-stream", body = MessageStream),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn subscribe(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<SubscribeQuery>,
) -> Result<Response, ApiError> {
    let buffer = query.buffer.unwrap_or(DEFAULT_BUFFER);
    let groups = state.processing()?.groups;
    if groups.is_partitioned(&stream, &group)? {
        return partitioned_push(state, groups, stream, group, query.consumer, buffer).await;
    }
    let receiver = groups
        .subscribe(&stream, &group, &query.consumer, buffer)
        .await?;
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        let delivery = receiver.recv().await?;
        let json = serde_json::to_string(&MessageJson::new(&delivery)).expect("serialisable");
        let event = Event::default()
            .id(delivery.ack_id.clone())
            .event("message")
            .data(json);
        Some((Ok::<_, Infallible>(event), receiver))
    })
    .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.heartbeat).text("heartbeat"))
        .into_response())
}

/// A partitioned group's push consumer: pulls of up to `buffer` messages, one after the other,
/// each sent before the next is asked for, so a slow reader holds the pulls back. Closing the
/// connection leaves the group at once.
async fn partitioned_push(
    state: AppState,
    groups: Groups,
    stream: String,
    group: String,
    consumer: String,
    buffer: usize,
) -> Result<Response, ApiError> {
    // The first pull joins, and reports an unknown group or a full one as an HTTP error.
    let first = groups
        .pull(&stream, &group, &consumer, None, buffer, Duration::ZERO)
        .await?;
    struct Push {
        groups: Groups,
        stream: String,
        group: String,
        consumer: String,
        buffer: usize,
        generation: Option<u64>,
        ready: std::collections::VecDeque<Event>,
        /// An error was sent: the stream ends.
        done: bool,
    }
    impl Drop for Push {
        fn drop(&mut self) {
            let (groups, stream, group, consumer) = (
                self.groups.clone(),
                std::mem::take(&mut self.stream),
                std::mem::take(&mut self.group),
                std::mem::take(&mut self.consumer),
            );
            // A server shutting down has no runtime left to leave with, nor a group to leave.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { groups.leave(&stream, &group, &consumer).await });
            }
        }
    }
    impl Push {
        fn take(&mut self, pulled: Pulled) {
            let Pulled::Partitioned(batch) = pulled else {
                return;
            };
            if self.generation != Some(batch.assignment.generation) {
                self.generation = Some(batch.assignment.generation);
                let assignment = AssignmentJson {
                    generation: batch.assignment.generation,
                    partitions: batch.assignment.partitions,
                };
                let json = serde_json::to_string(&assignment).expect("serialisable");
                self.ready
                    .push_back(Event::default().event("assignment").data(json));
            }
            for message in &batch.messages {
                let json = serde_json::to_string(&MessageJson::partitioned(message))
                    .expect("serialisable");
                self.ready.push_back(
                    Event::default()
                        .id(message.id.to_string())
                        .event("message")
                        .data(json),
                );
            }
        }
    }
    let mut push = Push {
        groups,
        stream,
        group,
        consumer,
        buffer,
        generation: None,
        ready: Default::default(),
        done: false,
    };
    push.take(first);
    let events = futures::stream::unfold(push, |mut push| async move {
        loop {
            if let Some(event) = push.ready.pop_front() {
                return Some((Ok::<_, Infallible>(event), push));
            }
            if push.done {
                return None;
            }
            let pulled = push
                .groups
                .pull(
                    &push.stream,
                    &push.group,
                    &push.consumer,
                    push.generation,
                    push.buffer,
                    crate::groups::MAX_WAIT,
                )
                .await;
            match pulled {
                Ok(pulled) => push.take(pulled),
                Err(error) => {
                    let error = ApiError::from(error);
                    let body =
                        serde_json::json!({"error": error.code(), "message": error.message()});
                    push.done = true;
                    let event = Event::default().event("error").data(body.to_string());
                    return Some((Ok(event), push));
                }
            }
        }
    })
    .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.heartbeat).text("heartbeat"))
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommitQuery {
    /// The consumer committing.
    consumer: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    /// The generation the consumer's pulls named.
    pub generation: u64,
    /// Per partition (`"3"`), the offset of the last message processed: everything of the
    /// partition up to it is done.
    #[schema(value_type = PartitionOffsets)]
    pub offsets: BTreeMap<String, u64>,
}

/// Offsets by partition number.
pub struct PartitionOffsets;

exact_schema!(PartitionOffsets);

/// Commit offsets of a partitioned group: per partition, everything up to the offset is
/// processed. Answered once durable.
#[utoipa::path(post, path = "/groups/{stream}/{group}/commit", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path), CommitQuery),
    request_body = CommitBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A generation that is over (`stale_generation`), a \
            partition the consumer does not own (`not_owner`), or an offset past what was \
            delivered (`not_delivered`)", body = ErrorBody)))]
pub async fn commit(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<CommitQuery>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<StatusCode, ApiError> {
    let body: CommitBody = parse_json(&headers, &body)?;
    let offsets = body
        .offsets
        .into_iter()
        .map(|(partition, offset)| {
            let partition = partition.parse::<u32>().map_err(|_| {
                ApiError::invalid(format!(
                    "offsets are keyed by partition number, not {partition:?}"
                ))
            })?;
            Ok((partition, offset))
        })
        .collect::<Result<BTreeMap<u32, u64>, ApiError>>()?;
    state
        .processing()?
        .groups
        .commit(&stream, &group, &query.consumer, body.generation, offsets)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    #[schema(value_type = Vec<AckId>)]
    pub ack_ids: Vec<String>,
}

/// A message's ack id: its revision or position, `p` and a revision for a replayed parked one.
pub struct AckId;

exact_schema!(AckId);

/// Acknowledge messages: done, never delivered again.
#[utoipa::path(post, path = "/groups/{stream}/{group}/ack", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path)),
    request_body = AckBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "An ack id of a message the group has not delivered",
            body = ErrorBody)))]
pub async fn ack(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<StatusCode, ApiError> {
    let body: AckBody = parse_json(&headers, &body)?;
    state
        .processing()?
        .groups
        .ack(&stream, &group, body.ack_ids)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NackBody {
    #[schema(value_type = Vec<AckId>)]
    pub ack_ids: Vec<String>,
    /// `park`, `retry` (default), `skip` or `stop`.
    pub action: Option<NackAction>,
    /// Why; kept with a parked message.
    #[serde(default)]
    pub reason: String,
}

/// Refuse messages: park, retry, skip them, or stop the consumer holding them.
#[utoipa::path(post, path = "/groups/{stream}/{group}/nack", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path)),
    request_body = NackBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "An ack id of a message the group has not delivered",
            body = ErrorBody)))]
pub async fn nack(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<StatusCode, ApiError> {
    let body: NackBody = parse_json(&headers, &body)?;
    let action = body.action.unwrap_or(NackAction::Retry);
    state
        .processing()?
        .groups
        .nack(&stream, &group, body.ack_ids, action, body.reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReplayQuery {
    /// Replay only this many parked messages (default all).
    stop_at: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct Replaying {
    /// Parked messages queued for delivery by this request.
    pub replaying: u64,
}

/// Deliver the parked messages again, before new ones.
#[utoipa::path(post, path = "/groups/{stream}/{group}/replay-parked", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path), ReplayQuery),
    responses((status = 200, body = Replaying), (status = 404, body = ErrorBody)))]
pub async fn replay_parked(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ReplayQuery>,
) -> Result<Json<Replaying>, ApiError> {
    let replaying = state
        .processing()?
        .groups
        .replay_parked(&stream, &group, query.stop_at)
        .await?;
    Ok(Json(Replaying { replaying }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ParkedQuery {
    /// First revision of the parked stream to return (default 0).
    from: Option<u64>,
    /// Most messages to return (default 100, at most 4,096).
    #[param(minimum = 1, maximum = 4096)]
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct ParkedMessage<'a> {
    /// The revision in the parked stream.
    pub revision: u64,
    /// Why it was parked.
    pub reason: Option<String>,
    pub event: EventJson<'a>,
}

/// The group's parked stream with the reason of each message.
#[utoipa::path(get, path = "/groups/{stream}/{group}/parked", tag = "groups",
    params(("stream" = String, Path), ("group" = String, Path), ParkedQuery),
    responses((status = 200, body = Vec<ParkedMessage>), (status = 404, body = ErrorBody)))]
pub async fn parked(
    State(state): State<AppState>,
    ApiPath((stream, group)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ParkedQuery>,
) -> Result<Response, ApiError> {
    state.processing()?.groups.info(&stream, &group).await?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > 4096 {
        return Err(ApiError::invalid("limit must be between 1 and 4096"));
    }
    let from = query.from.unwrap_or(0);
    let parked = state
        .store
        .blocking(move |store| {
            let name = parked_stream_name(&stream, &group);
            let slice = match store.read_stream(&name, Some(from), Direction::Forward, limit, true)
            {
                Ok(slice) => slice,
                Err(crate::store::StoreError::StreamNotFound(_)) => return Ok(Vec::new()),
                Err(error) => return Err(error),
            };
            slice
                .events
                .into_iter()
                .map(|event| {
                    let reason = store.parked_reason(&stream, &group, event.position)?;
                    let revision = event.link.as_ref().map_or(event.revision, |l| l.revision);
                    Ok((revision, reason, event))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let body: Vec<ParkedMessage> = parked
        .iter()
        .map(|(revision, reason, event)| ParkedMessage {
            revision: *revision,
            reason: reason.clone(),
            event: EventJson::new(event),
        })
        .collect();
    Ok(Json(body).into_response())
}
