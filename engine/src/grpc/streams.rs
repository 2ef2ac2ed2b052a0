//! `event_store.client.streams.Streams`: append, batch append, read, catch-up subscriptions,
//! delete and tombstone, over Refract's store. Positions in `$all` are Refract's positions, as
//! both the commit and the prepare position.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    self, Expected, event_fields, identifier, recorded_event, store_status, writable_stream,
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
use super::{Context, MAX_APPEND_BYTES};
use crate::http::Role;
use crate::store::{
    AllFilter, AppendOutcome, Direction, ExpectedRevision, NewEvent, RecordedEvent, StoreError,
};
use crate::subscribe::{Item, Source, Start, Subscription};

/// Events read from the store per page of a read.
const PAGE: usize = 2048;
/// Responses queued for a slow reader before the read waits for it.
const QUEUE: usize = 256;

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

    fn event(&self, event: &RecordedEvent) -> ReadResp {
        use read_resp::read_event::{Position, RecordedEvent as Recorded};
        let (fields, link) = event_fields(event, self.structured);
        ReadResp {
            content: Some(read_resp::Content::Event(read_resp::ReadEvent {
                event: Some(recorded_event!(Recorded, fields)),
                link: link.map(|link| recorded_event!(Recorded, link)),
                position: Some(Position::CommitPosition(event.position)),
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
    while remaining > 0 {
        let page = remaining.min(PAGE as u64) as usize;
        let stream = plan.stream.clone();
        let (direction, resolve_links) = (plan.direction, plan.resolve_links);
        let slice = store
            .blocking(move |store| match &stream {
                Some(name) => store.read_stream(name, from, direction, page, resolve_links),
                None => store.read_all(from, direction, page, &whole_log()),
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
        for event in &slice.events {
            if plan
                .filter
                .as_ref()
                .is_some_and(|filter| !filter.matches(event))
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
    // Subscriptions start after the revision or position they are given.
    let start = match plan.from {
        From::Start => Start::Beginning,
        From::End => Start::End,
        From::At(at) => Start::At(at.saturating_add(1)),
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
    if sender
        .send(Ok(ReadResp {
            content: Some(confirmation),
        }))
        .await
        .is_err()
    {
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
                        Some(plan.event(&event))
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
                        && sender.send(Ok(checkpoint(position))).await.is_err()
                    {
                        return;
                    }
                    Some(caught_up(&plan, last_position))
                }
            };
            if let Some(response) = response
                && sender.send(Ok(response)).await.is_err()
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

fn channel_stream<T: Send + 'static>(
    receiver: mpsc::Receiver<Result<T, Status>>,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

fn append_expected(option: Option<append_req::options::ExpectedStreamRevision>) -> Expected {
    use append_req::options::ExpectedStreamRevision as E;
    match option {
        Some(E::Revision(revision)) => Expected::Revision(revision),
        Some(E::NoStream(_)) => Expected::NoStream,
        Some(E::StreamExists(_)) => Expected::StreamExists,
        Some(E::Any(_)) | None => Expected::Any,
    }
}

/// Appends `events`; with none, only checks the expected revision, as EventStoreDB does.
async fn append_events(
    context: &Context,
    stream: &str,
    expected: ExpectedRevision,
    events: Vec<NewEvent>,
) -> Result<Option<AppendOutcome>, StoreError> {
    if events.is_empty() {
        let name = stream.to_owned();
        let current = context
            .store
            .blocking(move |store| store.last_revision(&name))
            .await?;
        let admitted = match expected {
            ExpectedRevision::Any => true,
            ExpectedRevision::NoStream => current.is_none(),
            ExpectedRevision::StreamExists => current.is_some(),
            ExpectedRevision::Exact(revision) => current == Some(revision),
        };
        if !admitted {
            return Err(StoreError::WrongExpectedRevision {
                expected,
                actual: current,
            });
        }
        return Ok(None);
    }
    context
        .store
        .append(stream.to_owned(), expected, events)
        .await
        .map(Some)
}

/// The stream's revision after an empty append (which wrote nothing).
async fn current_revision(context: &Context, stream: &str) -> Result<Option<u64>, StoreError> {
    let name = stream.to_owned();
    context
        .store
        .blocking(move |store| store.last_revision(&name))
        .await
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
    bytes: usize,
}

async fn batch_append(context: Arc<Context>, batch: PendingBatch) -> BatchAppendResp {
    use batch_append_req::options::ExpectedStreamPosition as P;
    let options = batch.options.unwrap_or_default();
    let expected = match options.expected_stream_position {
        Some(P::StreamPosition(revision)) => Expected::Revision(revision),
        Some(P::NoStream(_)) => Expected::NoStream,
        Some(P::StreamExists(_)) => Expected::StreamExists,
        Some(P::Any(_)) | None => Expected::Any,
    };
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
    let expected = ExpectedRevision::from(expected);
    let result = match writable_stream(options.stream_identifier.as_ref()) {
        Err(status) => batch_error(status.code(), status.message().to_owned(), None),
        Ok(stream) => match append_events(&context, &stream, expected, batch.events).await {
            Ok(Some(outcome)) => {
                batch_success(Some(outcome.last_revision), Some(outcome.last_position))
            }
            Ok(None) => match current_revision(&context, &stream).await {
                Ok(current) => batch_success(current, None),
                Err(error) => batch_store_error(error, &stream),
            },
            Err(error) => batch_store_error(error, &stream),
        },
    };
    BatchAppendResp {
        correlation_id: batch.correlation_id,
        result: Some(result),
        stream_identifier: options.stream_identifier,
        expected_stream_position: echoed_expected,
    }
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
        let expected = ExpectedRevision::from(append_expected(options.expected_stream_revision));
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
            Ok(Some(outcome)) => append_resp::Result::Success(success(
                Some(outcome.last_revision),
                Some((outcome.last_position, outcome.last_position)),
            )),
            Ok(None) => {
                let current = current_revision(&self.0, &stream)
                    .await
                    .map_err(|error| store_status(error, &stream))?;
                append_resp::Result::Success(success(current, None))
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
            let mut pending: HashMap<uuid::Uuid, PendingBatch> = HashMap::new();
            loop {
                let message = tokio::select! {
                    message = messages.message() => message,
                    () = sender.closed() => return,
                };
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                let key = match convert::uuid_of(message.correlation_id.as_ref()) {
                    Ok(key) => key,
                    Err(_) => {
                        let refusal = Status::invalid_argument("each batch needs a correlation id");
                        let _ = sender.send(Err(refusal)).await;
                        return;
                    }
                };
                let batch = pending.entry(key).or_insert_with(|| PendingBatch {
                    correlation_id: message.correlation_id.clone(),
                    options: None,
                    events: Vec::new(),
                    bytes: 0,
                });
                if message.options.is_some() {
                    batch.options = message.options;
                }
                let mut refused = None;
                for proposed in &message.proposed_messages {
                    let event = convert::new_event(
                        proposed.id.as_ref(),
                        &proposed.metadata,
                        &proposed.custom_metadata,
                        &proposed.data,
                    )
                    .and_then(|event| count_bytes(&mut batch.bytes, &event).map(|()| event));
                    match event {
                        Ok(event) => batch.events.push(event),
                        Err(status) => {
                            refused = Some(status);
                            break;
                        }
                    }
                }
                let response = match refused {
                    Some(status) => {
                        let batch = pending.remove(&key).expect("pending");
                        BatchAppendResp {
                            correlation_id: batch.correlation_id,
                            result: Some(batch_error(
                                status.code(),
                                status.message().to_owned(),
                                None,
                            )),
                            stream_identifier: batch
                                .options
                                .and_then(|options| options.stream_identifier),
                            expected_stream_position: None,
                        }
                    }
                    None if message.is_final => {
                        let batch = pending.remove(&key).expect("pending");
                        batch_append(context.clone(), batch).await
                    }
                    None => continue,
                };
                if sender.send(Ok(response)).await.is_err() {
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
        let expected = match options.expected_stream_revision {
            Some(E::Revision(revision)) => Expected::Revision(revision),
            Some(E::NoStream(_)) => Expected::NoStream,
            Some(E::StreamExists(_)) => Expected::StreamExists,
            Some(E::Any(_)) | None => Expected::Any,
        };
        let stream = writable_stream(options.stream_identifier.as_ref())?;
        delete(&self.0, &stream, expected.into(), false).await?;
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
        let expected = match options.expected_stream_revision {
            Some(E::Revision(revision)) => Expected::Revision(revision),
            Some(E::NoStream(_)) => Expected::NoStream,
            Some(E::StreamExists(_)) => Expected::StreamExists,
            Some(E::Any(_)) | None => Expected::Any,
        };
        let stream = writable_stream(options.stream_identifier.as_ref())?;
        delete(&self.0, &stream, expected.into(), true).await?;
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
