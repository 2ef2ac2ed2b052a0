//! `event_store.client.streams.Streams`: append, batch append, read, catch-up subscriptions,
//! delete and tombstone, over Refract's store. Positions in `$all` are Refract's positions, as
//! both the commit and the prepare position.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    self, event_fields, identifier, recorded_event, store_status, writable_stream,
};
use super::filter::EventFilter;
use super::proto::event_store::client::streams::{
    AppendReq, AppendResp, BatchAppendReq, BatchAppendResp, DeleteReq, DeleteResp, ReadReq,
    ReadResp, TombstoneReq, TombstoneResp, append_req, append_resp, batch_append_req,
    batch_append_resp, delete_req, delete_resp, read_req, read_resp, streams_server, tombstone_req,
    tombstone_resp,
};
use super::proto::event_store::client::{self as shared, AllStreamPosition};
use super::proto::google::rpc;
use super::{Context, MAX_APPEND_BYTES, channel_stream, send_or_stop};
use crate::http::Role;
use crate::store::{
    AllFilter, AppendOutcome, Direction, ExpectedRevision, NewEvent, RecordedEvent, StoreError,
};
use crate::subscribe::{Item, Source, Start, Subscription};

/// Events read from the store per page of a read.
const PAGE: usize = 2048;
/// Responses queued for a slow reader before the read waits for it.
const QUEUE: usize = 256;
/// Batches one `BatchAppend` call may have open at once (the clients send one at a time).
const MAX_OPEN_BATCHES: usize = 16;

/// The expected revision of a request, from the `oneof` each message declares anew.
macro_rules! expected_revision {
    ($option:expr, $($oneof:ident)::+, $revision:ident) => {
        match $option {
            Some($($oneof)::+::$revision(revision)) => ExpectedRevision::Exact(revision),
            Some($($oneof)::+::NoStream(_)) => ExpectedRevision::NoStream,
            Some($($oneof)::+::StreamExists(_)) => ExpectedRevision::StreamExists,
            Some($($oneof)::+::Any(_)) | None => ExpectedRevision::Any,
        }
    };
}

pub struct Streams(pub Arc<Context>);

type Responses = Pin<Box<dyn Stream<Item = Result<ReadResp, Status>> + Send>>;
type BatchResponses = Pin<Box<dyn Stream<Item = Result<BatchAppendResp, Status>> + Send>>;

/// Where a read of a stream begins.
#[derive(Clone, Copy)]
enum From {
    Start,
    End,
    At(u64),
}

/// A read's or subscription's request, checked.
struct ReadPlan {
    /// `None`: `$all`.
    stream: Option<String>,
    from: From,
    direction: Direction,
    resolve_links: bool,
    /// `None`: a subscription.
    count: Option<u64>,
    filter: Option<EventFilter>,
    structured: bool,
}

impl ReadPlan {
    fn new(options: read_req::Options) -> Result<ReadPlan, Status> {
        use read_req::options::{
            self as o, CountOption, FilterOption, StreamOption, all_options, stream_options,
            uuid_option,
        };
        let (stream, from) = match options.stream_option {
            Some(StreamOption::Stream(stream)) => {
                let name = convert::stream_name(stream.stream_identifier.as_ref())?;
                let from = match stream.revision_option {
                    Some(stream_options::RevisionOption::Revision(revision)) => From::At(revision),
                    Some(stream_options::RevisionOption::End(_)) => From::End,
                    Some(stream_options::RevisionOption::Start(_)) | None => From::Start,
                };
                (Some(name), from)
            }
            Some(StreamOption::All(all)) => {
                let from = match all.all_option {
                    Some(all_options::AllOption::Position(position)) => {
                        From::At(position.commit_position)
                    }
                    Some(all_options::AllOption::End(_)) => From::End,
                    Some(all_options::AllOption::Start(_)) | None => From::Start,
                };
                (None, from)
            }
            None => return Err(Status::invalid_argument("a read names a stream or $all")),
        };
        let direction = match o::ReadDirection::try_from(options.read_direction) {
            Ok(o::ReadDirection::Backwards) => Direction::Backward,
            _ => Direction::Forward,
        };
        let count = match options.count_option {
            Some(CountOption::Count(count)) => Some(count),
            Some(CountOption::Subscription(_)) => None,
            None => Some(u64::MAX),
        };
        let filter = match options.filter_option {
            Some(FilterOption::Filter(filter)) if stream.is_none() => {
                Some(EventFilter::new(filter)?)
            }
            Some(FilterOption::Filter(_)) => {
                return Err(Status::invalid_argument("filters apply to reads of $all"));
            }
            _ => None,
        };
        if count.is_none() && matches!(direction, Direction::Backward) {
            return Err(Status::invalid_argument("subscriptions read forwards"));
        }
        let structured = matches!(
            options.uuid_option.and_then(|option| option.content),
            Some(uuid_option::Content::Structured(_))
        );
        Ok(ReadPlan {
            stream,
            from,
            direction,
            resolve_links: options.resolve_links,
            count,
            filter,
            structured,
        })
    }

    fn event(&self, event: RecordedEvent) -> ReadResp {
        use read_resp::read_event::{Position, RecordedEvent as Recorded};
        let (fields, link) = event_fields(event, self.structured);
        let position = fields.position;
        ReadResp {
            content: Some(read_resp::Content::Event(read_resp::ReadEvent {
                event: Some(recorded_event!(Recorded, fields)),
                link: link.map(|link| recorded_event!(Recorded, link)),
                position: Some(Position::CommitPosition(position)),
            })),
        }
    }

    fn name(&self) -> &str {
        self.stream.as_deref().unwrap_or("$all")
    }
}

/// Every record of `$all`, `$`-streams included, as EventStoreDB reads it; filters apply here.
fn whole_log() -> AllFilter {
    AllFilter {
        include_system: true,
        ..AllFilter::default()
    }
}

/// Sends what a read returns, page by page, until `count` events were sent or the end.
async fn read(
    context: Arc<Context>,
    plan: ReadPlan,
    sender: mpsc::Sender<Result<ReadResp, Status>>,
) {
    let store = context.store.clone();
    let mut remaining = plan.count.unwrap_or(u64::MAX);
    let backward = matches!(plan.direction, Direction::Backward);
    // Backwards from a position of `$all` reads what comes before it, as EventStoreDB does.
    let mut from = match (plan.from, &plan.stream, backward) {
        (From::Start, _, false) => Some(0),
        (From::End, _, true) => None,
        (From::Start, None, true) | (From::End, _, false) => return,
        (From::Start, Some(_), true) => Some(0),
        (From::At(position), None, true) => match position.checked_sub(1) {
            Some(before) => Some(before),
            None => return,
        },
        (From::At(at), _, _) => Some(at),
    };
    // Prefixes are applied by the store as it scans; expressions here, on whole pages.
    let log_filter = plan
        .filter
        .as_ref()
        .map_or_else(whole_log, |filter| filter.store_filter().clone());
    while remaining > 0 && !sender.is_closed() {
        let page = match plan.filter {
            Some(_) => PAGE,
            None => remaining.min(PAGE as u64) as usize,
        };
        let stream = plan.stream.clone();
        let (direction, resolve_links) = (plan.direction, plan.resolve_links);
        let log_filter = log_filter.clone();
        let slice = store
            .blocking(move |store| match &stream {
                Some(name) => store.read_stream(name, from, direction, page, resolve_links),
                None => store.read_all(from, direction, page, &log_filter),
            })
            .await;
        let slice = match slice {
            Ok(slice) => slice,
            Err(StoreError::StreamNotFound(name)) => {
                let not_found = read_resp::Content::StreamNotFound(read_resp::StreamNotFound {
                    stream_identifier: Some(identifier(&name)),
                });
                let _ = sender
                    .send(Ok(ReadResp {
                        content: Some(not_found),
                    }))
                    .await;
                return;
            }
            Err(error) => {
                let _ = sender.send(Err(store_status(error, plan.name()))).await;
                return;
            }
        };
        for event in slice.events {
            if plan
                .filter
                .as_ref()
                .is_some_and(|filter| !filter.matches_expression(&event))
            {
                continue;
            }
            if sender.send(Ok(plan.event(event))).await.is_err() {
                return;
            }
            remaining -= 1;
            if remaining == 0 {
                return;
            }
        }
        match slice.next {
            Some(next) => from = Some(next),
            None => return,
        }
    }
}

/// A catch-up subscription: the confirmation, the history, `caught_up`, then live events, until
/// the client leaves or the server stops. A filtered one sends checkpoints as it scans.
async fn subscribe(
    context: Arc<Context>,
    plan: ReadPlan,
    sender: mpsc::Sender<Result<ReadResp, Status>>,
) {
    // Subscriptions start after the revision or position they are given. Position 0 of `$all`
    // is where EventStoreDB's log begins (no event sits there) and what clients send for "from
    // the start", while Refract's first event is there: it is delivered, not skipped.
    let start = match (plan.from, &plan.stream) {
        (From::Start, _) | (From::At(0), None) => Start::Beginning,
        (From::End, _) => Start::End,
        (From::At(at), _) => Start::At(at.saturating_add(1)),
    };
    let source = match &plan.stream {
        Some(name) => Source::Stream {
            name: name.clone(),
            resolve_links: plan.resolve_links,
        },
        None => Source::All {
            filter: whole_log(),
        },
    };
    let mut subscription = match Subscription::start(context.store.clone(), source, start).await {
        Ok(subscription) => subscription,
        Err(error) => {
            let _ = sender.send(Err(store_status(error, plan.name()))).await;
            return;
        }
    };
    let confirmation = read_resp::Content::Confirmation(read_resp::SubscriptionConfirmation {
        subscription_id: uuid::Uuid::new_v4().to_string(),
    });
    let confirmation = Ok(ReadResp {
        content: Some(confirmation),
    });
    if !send_or_stop(&sender, confirmation, &context.shutdown).await {
        return;
    }
    let checkpoint_every = plan.filter.as_ref().map(EventFilter::checkpoint_interval);
    let mut scanned = 0u64;
    let mut last_position = None;
    loop {
        let items = tokio::select! {
            items = subscription.next_batch() => items,
            () = context.shutdown.cancelled() => {
                let _ = sender.send(Err(convert::shutting_down())).await;
                return;
            }
            () = sender.closed() => return,
        };
        let items = match items {
            Ok(items) => items,
            Err(error) => {
                let _ = sender.send(Err(store_status(error, plan.name()))).await;
                return;
            }
        };
        for item in items {
            let response = match item {
                Item::Event { event, .. } => {
                    last_position = Some(event.position);
                    scanned += 1;
                    let matches = plan
                        .filter
                        .as_ref()
                        .is_none_or(|filter| filter.matches(&event));
                    if matches {
                        Some(plan.event(*event))
                    } else if checkpoint_every.is_some_and(|every| scanned >= every) {
                        scanned = 0;
                        Some(checkpoint(event.position))
                    } else {
                        None
                    }
                }
                Item::CaughtUp => {
                    if checkpoint_every.is_some()
                        && let Some(position) = last_position
                        && !send_or_stop(&sender, Ok(checkpoint(position)), &context.shutdown).await
                    {
                        return;
                    }
                    Some(caught_up(&plan, last_position))
                }
            };
            if let Some(response) = response
                && !send_or_stop(&sender, Ok(response), &context.shutdown).await
            {
                return;
            }
        }
    }
}

fn checkpoint(position: u64) -> ReadResp {
    ReadResp {
        content: Some(read_resp::Content::Checkpoint(read_resp::Checkpoint {
            commit_position: position,
            prepare_position: position,
            timestamp: Some(now()),
        })),
    }
}

fn caught_up(plan: &ReadPlan, last_position: Option<u64>) -> ReadResp {
    let position = last_position
        .filter(|_| plan.stream.is_none())
        .map(|position| read_resp::Position {
            commit_position: position,
            prepare_position: position,
        });
    ReadResp {
        content: Some(read_resp::Content::CaughtUp(read_resp::CaughtUp {
            timestamp: Some(now()),
            stream_revision: None,
            position,
        })),
    }
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

/// What an append did.
enum Appended {
    Written(AppendOutcome),
    /// No events: the expected revision held, and the stream is at `current`.
    Nothing {
        current: Option<u64>,
    },
}

impl Appended {
    /// The stream's revision and the position of its last event written, if any.
    fn revision_and_position(&self) -> (Option<u64>, Option<u64>) {
        match self {
            Appended::Written(outcome) => {
                (Some(outcome.last_revision), Some(outcome.last_position))
            }
            Appended::Nothing { current } => (*current, None),
        }
    }
}

/// Appends `events`; with none, only checks the expected revision, as EventStoreDB does.
async fn append_events(
    context: &Context,
    stream: &str,
    expected: ExpectedRevision,
    events: Vec<NewEvent>,
) -> Result<Appended, StoreError> {
    if events.is_empty() {
        let name = stream.to_owned();
        let current = context
            .store
            .blocking(move |store| store.last_revision(&name))
            .await?;
        if !expected.admits(current) {
            return Err(StoreError::WrongExpectedRevision {
                expected,
                actual: current,
            });
        }
        return Ok(Appended::Nothing { current });
    }
    let outcome = context
        .store
        .append(stream.to_owned(), expected, events)
        .await?;
    Ok(Appended::Written(outcome))
}

fn wrong_expected_version(
    expected: ExpectedRevision,
    actual: Option<u64>,
) -> append_resp::WrongExpectedVersion {
    use append_resp::wrong_expected_version::{
        CurrentRevisionOption, CurrentRevisionOption2060, ExpectedRevisionOption,
        ExpectedRevisionOption2060,
    };
    let empty = shared::Empty {};
    let (current, current_old) = match actual {
        Some(revision) => (
            CurrentRevisionOption::CurrentRevision(revision),
            CurrentRevisionOption2060::CurrentRevision2060(revision),
        ),
        None => (
            CurrentRevisionOption::CurrentNoStream(empty),
            CurrentRevisionOption2060::NoStream2060(empty),
        ),
    };
    let (expected, expected_old) = match expected {
        ExpectedRevision::Exact(revision) => (
            ExpectedRevisionOption::ExpectedRevision(revision),
            Some(ExpectedRevisionOption2060::ExpectedRevision2060(revision)),
        ),
        ExpectedRevision::Any => (
            ExpectedRevisionOption::ExpectedAny(empty),
            Some(ExpectedRevisionOption2060::Any2060(empty)),
        ),
        ExpectedRevision::StreamExists => (
            ExpectedRevisionOption::ExpectedStreamExists(empty),
            Some(ExpectedRevisionOption2060::StreamExists2060(empty)),
        ),
        ExpectedRevision::NoStream => (ExpectedRevisionOption::ExpectedNoStream(empty), None),
    };
    append_resp::WrongExpectedVersion {
        current_revision_option_20_6_0: Some(current_old),
        expected_revision_option_20_6_0: expected_old,
        current_revision_option: Some(current),
        expected_revision_option: Some(expected),
    }
}

/// Adds `event`'s bytes to `total`, refusing an append larger than EventStoreDB's clients may
/// send in one.
fn count_bytes(total: &mut usize, event: &NewEvent) -> Result<(), Status> {
    *total += event.size();
    if *total > MAX_APPEND_BYTES {
        return Err(convert::persistent_status(
            tonic::Code::InvalidArgument,
            format!("an append may carry at most {MAX_APPEND_BYTES} bytes of events"),
            "maximum-append-size-exceeded",
        ));
    }
    Ok(())
}

/// One batch of a `BatchAppend` call, collected until its final message.
struct PendingBatch {
    correlation_id: Option<shared::Uuid>,
    options: Option<batch_append_req::Options>,
    events: Vec<NewEvent>,
}

/// What one `BatchAppend` message leads to.
enum Step {
    /// The batch goes on in a later message.
    Wait,
    /// The batch was refused before it was complete; its answer.
    Refused(BatchAppendResp),
    Complete(PendingBatch),
}

/// The batches of a `BatchAppend` call not complete yet, bounded in number and bytes.
#[derive(Default)]
struct OpenBatches {
    open: HashMap<uuid::Uuid, PendingBatch>,
    /// Batches refused before their final message: the rest of them is dropped.
    refused: HashSet<uuid::Uuid>,
    bytes: usize,
}

impl OpenBatches {
    /// Takes a message of the call; an error ends the call.
    fn take(&mut self, message: BatchAppendReq) -> Result<Step, Status> {
        let key = convert::uuid_of(message.correlation_id.as_ref())
            .map_err(|_| Status::invalid_argument("each batch needs a correlation id"))?;
        if self.refused.contains(&key) {
            if message.is_final {
                self.refused.remove(&key);
            }
            return Ok(Step::Wait);
        }
        if !self.open.contains_key(&key) && self.open.len() + self.refused.len() >= MAX_OPEN_BATCHES
        {
            return Err(Status::resource_exhausted(format!(
                "a BatchAppend call may have at most {MAX_OPEN_BATCHES} batches open at once"
            )));
        }
        let batch = self.open.entry(key).or_insert_with(|| PendingBatch {
            correlation_id: message.correlation_id.clone(),
            options: None,
            events: Vec::new(),
        });
        if message.options.is_some() {
            batch.options = message.options;
        }
        let mut refusal = None;
        for proposed in &message.proposed_messages {
            let event = convert::new_event(
                proposed.id.as_ref(),
                &proposed.metadata,
                &proposed.custom_metadata,
                &proposed.data,
            )
            .and_then(|event| count_bytes(&mut self.bytes, &event).map(|()| event));
            match event {
                Ok(event) => batch.events.push(event),
                Err(status) => {
                    refusal = Some(status);
                    break;
                }
            }
        }
        if let Some(status) = refusal {
            let batch = self.remove(&key);
            if !message.is_final {
                self.refused.insert(key);
            }
            return Ok(Step::Refused(BatchAppendResp {
                correlation_id: batch.correlation_id,
                result: Some(batch_error(
                    status.code(),
                    status.message().to_owned(),
                    None,
                )),
                stream_identifier: batch.options.and_then(|options| options.stream_identifier),
                expected_stream_position: None,
            }));
        }
        if message.is_final {
            return Ok(Step::Complete(self.remove(&key)));
        }
        Ok(Step::Wait)
    }

    fn remove(&mut self, key: &uuid::Uuid) -> PendingBatch {
        let batch = self.open.remove(key).expect("an open batch");
        let bytes: usize = batch.events.iter().map(NewEvent::size).sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        batch
    }
}

/// Appends a complete batch. What the batch could not do is its answer; what the server cannot
/// do now (not the leader, stopping, unavailable) ends the call with EventStoreDB's status, so
/// that clients reconnect where they should.
async fn batch_append(context: &Context, batch: PendingBatch) -> Result<BatchAppendResp, Status> {
    use batch_append_req::options::ExpectedStreamPosition as P;
    let options = batch.options.unwrap_or_default();
    let echoed_expected = options
        .expected_stream_position
        .map(|position| match position {
            P::StreamPosition(revision) => {
                batch_append_resp::ExpectedStreamPosition::StreamPosition(revision)
            }
            P::NoStream(empty) => batch_append_resp::ExpectedStreamPosition::NoStream(empty),
            P::Any(empty) => batch_append_resp::ExpectedStreamPosition::Any(empty),
            P::StreamExists(empty) => {
                batch_append_resp::ExpectedStreamPosition::StreamExists(empty)
            }
        });
    let expected = expected_revision!(options.expected_stream_position, P, StreamPosition);
    let result = match writable_stream(options.stream_identifier.as_ref()) {
        Err(status) => batch_error(status.code(), status.message().to_owned(), None),
        Ok(stream) => match append_events(context, &stream, expected, batch.events).await {
            Ok(appended) => {
                let (revision, position) = appended.revision_and_position();
                batch_success(revision, position)
            }
            Err(
                error @ (StoreError::NotLeader { .. }
                | StoreError::ShuttingDown
                | StoreError::Unavailable(_)
                | StoreError::Storage(_)),
            ) => return Err(store_status(error, &stream)),
            Err(error) => batch_store_error(error, &stream),
        },
    };
    Ok(BatchAppendResp {
        correlation_id: batch.correlation_id,
        result: Some(result),
        stream_identifier: options.stream_identifier,
        expected_stream_position: echoed_expected,
    })
}

fn batch_success(revision: Option<u64>, position: Option<u64>) -> batch_append_resp::Result {
    use batch_append_resp::success::{CurrentRevisionOption, PositionOption};
    batch_append_resp::Result::Success(batch_append_resp::Success {
        current_revision_option: Some(match revision {
            Some(revision) => CurrentRevisionOption::CurrentRevision(revision),
            None => CurrentRevisionOption::NoStream(()),
        }),
        position_option: Some(match position {
            Some(position) => PositionOption::Position(AllStreamPosition {
                commit_position: position,
                prepare_position: position,
            }),
            None => PositionOption::NoPosition(()),
        }),
    })
}

fn batch_error(
    code: tonic::Code,
    message: String,
    details: Option<prost_types::Any>,
) -> batch_append_resp::Result {
    batch_append_resp::Result::Error(rpc::Status {
        code: code as i32,
        message,
        details,
    })
}

/// A store error as a batch's result: the details are the message EventStoreDB puts there.
fn batch_store_error(error: StoreError, stream: &str) -> batch_append_resp::Result {
    let any = |name: &str, message: Vec<u8>| prost_types::Any {
        type_url: format!("type.googleapis.com/event_store.client.{name}"),
        value: message,
    };
    let details = match &error {
        StoreError::WrongExpectedRevision { expected, actual } => {
            use shared::wrong_expected_version::{
                CurrentStreamRevisionOption as Current, ExpectedStreamPositionOption as Wanted,
            };
            let message = shared::WrongExpectedVersion {
                current_stream_revision_option: Some(match actual {
                    Some(revision) => Current::CurrentStreamRevision(*revision),
                    None => Current::CurrentNoStream(()),
                }),
                expected_stream_position_option: Some(match expected {
                    ExpectedRevision::Exact(revision) => Wanted::ExpectedStreamPosition(*revision),
                    ExpectedRevision::Any => Wanted::ExpectedAny(()),
                    ExpectedRevision::StreamExists => Wanted::ExpectedStreamExists(()),
                    ExpectedRevision::NoStream => Wanted::ExpectedNoStream(()),
                }),
            };
            Some(any("WrongExpectedVersion", message.encode_to_vec()))
        }
        StoreError::StreamDeleted(name) => {
            let message = shared::StreamDeleted {
                stream_identifier: Some(identifier(name)),
            };
            Some(any("StreamDeleted", message.encode_to_vec()))
        }
        _ => None,
    };
    let status = store_status(error, stream);
    batch_error(status.code(), status.message().to_owned(), details)
}

#[tonic::async_trait]
impl streams_server::Streams for Streams {
    type ReadStream = Responses;

    async fn read(&self, request: Request<ReadReq>) -> Result<Response<Responses>, Status> {
        self.0.authorize(&request, Role::Reader)?;
        self.0.check_leader(&request)?;
        let options = request
            .into_inner()
            .options
            .ok_or_else(|| Status::invalid_argument("a read needs its options"))?;
        let plan = ReadPlan::new(options)?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let context = self.0.clone();
        match plan.count {
            Some(_) => tokio::spawn(read(context, plan, sender)),
            None => tokio::spawn(subscribe(context, plan, sender)),
        };
        Ok(Response::new(channel_stream(receiver)))
    }

    async fn append(
        &self,
        request: Request<Streaming<AppendReq>>,
    ) -> Result<Response<AppendResp>, Status> {
        self.0.authorize(&request, Role::Writer)?;
        let mut messages = request.into_inner();
        let options = match messages.message().await? {
            Some(AppendReq {
                content: Some(append_req::Content::Options(options)),
            }) => options,
            _ => {
                return Err(Status::invalid_argument(
                    "an append begins with its options",
                ));
            }
        };
        let stream = writable_stream(options.stream_identifier.as_ref())?;
        use append_req::options::ExpectedStreamRevision as E;
        let expected = expected_revision!(options.expected_stream_revision, E, Revision);
        let (mut events, mut bytes) = (Vec::new(), 0);
        while let Some(message) = messages.message().await? {
            let Some(append_req::Content::ProposedMessage(proposed)) = message.content else {
                return Err(Status::invalid_argument(
                    "an append's options come once, before its events",
                ));
            };
            let event = convert::new_event(
                proposed.id.as_ref(),
                &proposed.metadata,
                &proposed.custom_metadata,
                &proposed.data,
            )?;
            count_bytes(&mut bytes, &event)?;
            events.push(event);
        }
        use append_resp::success::{CurrentRevisionOption, PositionOption};
        let success = |revision: Option<u64>, position: Option<(u64, u64)>| append_resp::Success {
            current_revision_option: Some(match revision {
                Some(revision) => CurrentRevisionOption::CurrentRevision(revision),
                None => CurrentRevisionOption::NoStream(shared::Empty {}),
            }),
            position_option: Some(match position {
                Some((commit_position, prepare_position)) => {
                    PositionOption::Position(append_resp::Position {
                        commit_position,
                        prepare_position,
                    })
                }
                None => PositionOption::NoPosition(shared::Empty {}),
            }),
        };
        let result = match append_events(&self.0, &stream, expected, events).await {
            Ok(appended) => {
                let (revision, position) = appended.revision_and_position();
                append_resp::Result::Success(success(
                    revision,
                    position.map(|position| (position, position)),
                ))
            }
            Err(StoreError::WrongExpectedRevision { expected, actual }) => {
                append_resp::Result::WrongExpectedVersion(wrong_expected_version(expected, actual))
            }
            Err(error) => return Err(store_status(error, &stream)),
        };
        Ok(Response::new(AppendResp {
            result: Some(result),
        }))
    }

    type BatchAppendStream = BatchResponses;

    async fn batch_append(
        &self,
        request: Request<Streaming<BatchAppendReq>>,
    ) -> Result<Response<BatchResponses>, Status> {
        self.0.authorize(&request, Role::Writer)?;
        let mut messages = request.into_inner();
        let (sender, receiver) = mpsc::channel(QUEUE);
        let context = self.0.clone();
        tokio::spawn(async move {
            let mut batches = OpenBatches::default();
            loop {
                let message = tokio::select! {
                    message = messages.message() => message,
                    () = sender.closed() => return,
                    () = context.shutdown.cancelled() => {
                        let _ = sender.send(Err(convert::shutting_down())).await;
                        return;
                    }
                };
                let step = match message {
                    Ok(Some(message)) => batches.take(message),
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                let answer = match step {
                    Ok(Step::Wait) => continue,
                    Ok(Step::Refused(answer)) => Ok(answer),
                    Ok(Step::Complete(batch)) => batch_append(&context, batch).await,
                    Err(status) => Err(status),
                };
                let ends = answer.is_err();
                if !send_or_stop(&sender, answer, &context.shutdown).await || ends {
                    return;
                }
            }
        });
        Ok(Response::new(channel_stream(receiver)))
    }

    async fn delete(&self, request: Request<DeleteReq>) -> Result<Response<DeleteResp>, Status> {
        self.0.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        use delete_req::options::ExpectedStreamRevision as E;
        let expected = expected_revision!(options.expected_stream_revision, E, Revision);
        let stream = writable_stream(options.stream_identifier.as_ref())?;
        delete(&self.0, &stream, expected, false).await?;
        Ok(Response::new(DeleteResp {
            position_option: Some(delete_resp::PositionOption::NoPosition(shared::Empty {})),
        }))
    }

    async fn tombstone(
        &self,
        request: Request<TombstoneReq>,
    ) -> Result<Response<TombstoneResp>, Status> {
        self.0.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        use tombstone_req::options::ExpectedStreamRevision as E;
        let expected = expected_revision!(options.expected_stream_revision, E, Revision);
        let stream = writable_stream(options.stream_identifier.as_ref())?;
        delete(&self.0, &stream, expected, true).await?;
        Ok(Response::new(TombstoneResp {
            position_option: Some(tombstone_resp::PositionOption::NoPosition(shared::Empty {})),
        }))
    }
}

/// A delete, whose wrong expected revision EventStoreDB's clients read from the message.
async fn delete(
    context: &Context,
    stream: &str,
    expected: ExpectedRevision,
    hard: bool,
) -> Result<(), Status> {
    match context
        .store
        .delete(stream.to_owned(), expected, hard)
        .await
    {
        Ok(()) => Ok(()),
        Err(error @ StoreError::WrongExpectedRevision { .. }) => {
            let status = store_status(error, stream);
            let message = format!("Delete failed due to {}", status.message());
            let mut refused = Status::new(status.code(), message);
            *refused.metadata_mut() = status.metadata().clone();
            Err(refused)
        }
        Err(error) => Err(store_status(error, stream)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(
        correlation: uuid::Uuid,
        events: usize,
        is_final: bool,
        bad: bool,
    ) -> BatchAppendReq {
        let proposed = (0..events)
            .map(|_| batch_append_req::ProposedMessage {
                id: Some(convert::uuid_message(uuid::Uuid::new_v4(), false)),
                metadata: HashMap::from([
                    (
                        "type".to_owned(),
                        if bad {
                            String::new()
                        } else {
                            "Placed".to_owned()
                        },
                    ),
                    ("content-type".to_owned(), "application/json".to_owned()),
                ]),
                custom_metadata: Default::default(),
                data: bytes::Bytes::from_static(b"{}"),
            })
            .collect();
        BatchAppendReq {
            correlation_id: Some(convert::uuid_message(correlation, false)),
            options: Some(batch_append_req::Options {
                stream_identifier: Some(identifier("order-1")),
                ..Default::default()
            }),
            proposed_messages: proposed,
            is_final,
        }
    }

    #[test]
    fn batches_are_bounded_and_answered_once() {
        let mut batches = OpenBatches::default();
        // A batch in two messages completes with both parts.
        let one = uuid::Uuid::new_v4();
        assert!(matches!(
            batches.take(message(one, 2, false, false)),
            Ok(Step::Wait)
        ));
        let Ok(Step::Complete(batch)) = batches.take(message(one, 1, true, false)) else {
            panic!("complete")
        };
        assert_eq!(batch.events.len(), 3);
        assert_eq!(batches.bytes, 0);

        // A refused batch is answered once; what else comes of it is dropped.
        let refused = uuid::Uuid::new_v4();
        assert!(matches!(
            batches.take(message(refused, 1, false, true)),
            Ok(Step::Refused(_))
        ));
        assert!(matches!(
            batches.take(message(refused, 1, false, false)),
            Ok(Step::Wait)
        ));
        assert!(matches!(
            batches.take(message(refused, 1, true, false)),
            Ok(Step::Wait)
        ));
        assert!(batches.refused.is_empty());

        // Open batches are bounded.
        for _ in 0..MAX_OPEN_BATCHES {
            assert!(matches!(
                batches.take(message(uuid::Uuid::new_v4(), 1, false, false)),
                Ok(Step::Wait)
            ));
        }
        let refusal = batches.take(message(uuid::Uuid::new_v4(), 1, false, false));
        assert_eq!(
            refusal.err().unwrap().code(),
            tonic::Code::ResourceExhausted
        );
    }
}
