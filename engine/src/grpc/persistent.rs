//! `event_store.client.persistent_subscriptions.PersistentSubscriptions` over Refract's consumer
//! groups: a subscription group is a group, a connection is a push consumer, and acks and nacks
//! name the events delivered on that connection.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status, Streaming};

use super::convert::{self, TICKS_PER_MILLISECOND, event_fields, original_id, recorded_event};
use super::proto::event_store::client::Empty;
use super::proto::event_store::client::persistent_subscriptions::{
    self as ps, persistent_subscriptions_server, read_req, read_resp,
};
use super::{Context, channel_stream};
use crate::groups::settings::{Settings, StartFrom, StartName, Strategy};
use crate::groups::{ALL, GroupError, Groups, Info, MAX_PULL, NackAction};
use crate::http::Role;

/// Messages a connection holds unacked when the client asks for none.
const DEFAULT_BUFFER: usize = 10;
/// Deliveries a connection remembers for acks, per message it may hold unacked: one it gave up
/// on (timed out and delivered to another consumer) is forgotten in time.
const REMEMBERED_PER_BUFFERED: usize = 8;

pub struct PersistentSubscriptions {
    context: Arc<Context>,
}

impl PersistentSubscriptions {
    pub fn new(context: Arc<Context>) -> Self {
        PersistentSubscriptions { context }
    }

    fn groups(&self) -> Result<Groups, Status> {
        Ok(self.context.processing()?.groups)
    }
}

type Deliveries = Pin<Box<dyn Stream<Item = Result<ps::ReadResp, Status>> + Send>>;

/// A group's error as EventStoreDB answers it.
fn group_status(error: GroupError, stream: &str, group: &str) -> Status {
    match error {
        GroupError::NotFound { .. } => does_not_exist(stream, group),
        GroupError::Exists { .. } => convert::persistent_status(
            Code::AlreadyExists,
            format!("Subscription group '{group}' on stream '{stream}' already exists."),
            "persistent-subscription-exists",
        ),
        GroupError::Full(_) => convert::persistent_status(
            Code::FailedPrecondition,
            "Maximum subscriptions reached.".into(),
            "maximum-subscribers-reached",
        ),
        GroupError::Invalid(message) | GroupError::NotDelivered(message) => {
            Status::invalid_argument(message)
        }
        error @ (GroupError::InUse(_)
        | GroupError::NoSharder(_)
        | GroupError::StaleGeneration(_)
        | GroupError::NotOwner(_)) => Status::failed_precondition(error.to_string()),
        GroupError::Store(error) => convert::store_status(error, stream),
        GroupError::Stopped => convert::shutting_down(),
    }
}

fn does_not_exist(stream: &str, group: &str) -> Status {
    convert::persistent_status(
        Code::NotFound,
        format!("Subscription group '{group}' on stream '{stream}' does not exist."),
        "persistent-subscription-does-not-exist",
    )
}

/// The stream a request's `stream_option` names, or `$all`; each message declares its own.
macro_rules! named_source {
    ($option:expr, $($oneof:ident)::+) => {
        match $option {
            Some($($oneof)::+::StreamIdentifier(identifier)) => {
                convert::stream_name(Some(identifier))
            }
            Some($($oneof)::+::All(_)) => Ok(ALL.to_owned()),
            None => Err(Status::invalid_argument("name a stream or $all")),
        }
    };
}

/// Where a group begins, from a `oneof` of a revision (or position), start and end; each
/// message declares its own. `$at` takes the revision or position out of its variant.
macro_rules! start_from {
    ($option:expr, $($oneof:ident)::+, $variant:ident, $at:expr) => {
        match $option {
            Some($($oneof)::+::$variant(at)) => StartFrom::At(($at)(at)),
            Some($($oneof)::+::Start(_)) => StartFrom::Named(StartName::Start),
            Some($($oneof)::+::End(_)) | None => StartFrom::Named(StartName::End),
        }
    };
}

fn group_name(name: &str) -> Result<String, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "a subscription group needs a name",
        ));
    }
    Ok(name.to_owned())
}

/// The settings both `Create` and `Update` carry, field for field.
struct SettingsFields {
    resolve_links: bool,
    max_retry_count: i32,
    min_checkpoint_count: i32,
    max_checkpoint_count: i32,
    max_subscriber_count: i32,
    live_buffer_size: i32,
    read_batch_size: i32,
    history_buffer_size: i32,
    message_timeout_ms: i64,
    checkpoint_after_ms: i64,
    strategy: String,
}

macro_rules! settings_fields {
    ($settings:expr, $module:ident, $strategy:expr) => {{
        use ps::$module::settings::{CheckpointAfter, MessageTimeout};
        let settings = $settings;
        SettingsFields {
            resolve_links: settings.resolve_links,
            max_retry_count: settings.max_retry_count,
            min_checkpoint_count: settings.min_checkpoint_count,
            max_checkpoint_count: settings.max_checkpoint_count,
            max_subscriber_count: settings.max_subscriber_count,
            live_buffer_size: settings.live_buffer_size,
            read_batch_size: settings.read_batch_size,
            history_buffer_size: settings.history_buffer_size,
            message_timeout_ms: match settings.message_timeout {
                Some(MessageTimeout::MessageTimeoutMs(ms)) => i64::from(ms),
                Some(MessageTimeout::MessageTimeoutTicks(ticks)) => ticks / TICKS_PER_MILLISECOND,
                None => Settings::default().message_timeout_ms as i64,
            },
            checkpoint_after_ms: match settings.checkpoint_after {
                Some(CheckpointAfter::CheckpointAfterMs(ms)) => i64::from(ms),
                Some(CheckpointAfter::CheckpointAfterTicks(ticks)) => ticks / TICKS_PER_MILLISECOND,
                None => Settings::default().checkpoint_after_ms as i64,
            },
            strategy: $strategy(&settings),
        }
    }};
}

#[allow(deprecated)]
fn create_strategy(settings: &ps::create_req::Settings) -> String {
    if settings.consumer_strategy.is_empty() {
        enum_strategy(settings.named_consumer_strategy)
    } else {
        settings.consumer_strategy.clone()
    }
}

fn update_strategy(settings: &ps::update_req::Settings) -> String {
    enum_strategy(settings.named_consumer_strategy)
}

fn enum_strategy(value: i32) -> String {
    match ps::create_req::ConsumerStrategy::try_from(value) {
        Ok(ps::create_req::ConsumerStrategy::RoundRobin) => "RoundRobin",
        Ok(ps::create_req::ConsumerStrategy::Pinned) => "Pinned",
        _ => "DispatchToSingle",
    }
    .to_owned()
}

impl SettingsFields {
    /// Refract's settings with these values, starting at `start_from` and filtered by
    /// `prefixes` (stream, type) on `$all`.
    fn into_settings(
        self,
        start_from: StartFrom,
        prefixes: (Option<String>, Option<String>),
    ) -> Result<Settings, Status> {
        let count = |name: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| Status::invalid_argument(format!("{name} must not be negative")))
        };
        let strategy = match self.strategy.as_str() {
            "RoundRobin" => Strategy::RoundRobin,
            "DispatchToSingle" => Strategy::DispatchToSingle,
            "Pinned" => Strategy::Pinned,
            "PinnedByCorrelation" => Strategy::PinnedByCorrelation,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown consumer strategy {other:?}: RoundRobin, DispatchToSingle, Pinned \
                     or PinnedByCorrelation (Refract's sharded and partitioned strategies are \
                     set over its HTTP API)"
                )));
            }
        };
        Ok(Settings {
            start_from,
            resolve_links: self.resolve_links,
            message_timeout_ms: count("message timeout", self.message_timeout_ms)?,
            max_retry_count: count("max_retry_count", self.max_retry_count.into())?
                .try_into()
                .unwrap_or(u32::MAX),
            live_buffer_size: count("live_buffer_size", self.live_buffer_size.into())? as usize,
            read_batch_size: count("read_batch_size", self.read_batch_size.into())? as usize,
            history_buffer_size: count("history_buffer_size", self.history_buffer_size.into())?
                as usize,
            checkpoint_after_ms: count("checkpoint after", self.checkpoint_after_ms)?,
            min_checkpoint_count: count("min_checkpoint_count", self.min_checkpoint_count.into())?,
            max_checkpoint_count: count("max_checkpoint_count", self.max_checkpoint_count.into())?,
            max_subscriber_count: count("max_subscriber_count", self.max_subscriber_count.into())?
                as usize,
            strategy,
            stream_prefix: prefixes.0,
            type_prefix: prefixes.1,
        })
    }
}

/// The filter on event types EventStoreDB's Python client sends by default: everything but
/// system events (types beginning with `$`) and two kinds of EventStoreDB's own.
const SYSTEM_EVENTS_EXCLUDED: &str = r"^(?!(\$.+$|PersistentConfig\d+$|Result$))";

/// A `$all` group's filter: Refract's groups filter by prefixes of stream names or event types.
fn filter_prefixes(
    filter: Option<ps::create_req::all_options::FilterOptions>,
) -> Result<(Option<String>, Option<String>), Status> {
    use ps::create_req::all_options::filter_options::Filter;
    let Some(filter) = filter else {
        return Ok((None, None));
    };
    let (on_type, expression) = match filter.filter {
        Some(Filter::StreamIdentifier(expression)) => (false, expression),
        Some(Filter::EventType(expression)) => (true, expression),
        None => return Ok((None, None)),
    };
    // The clients' default (the Python client's, which sends it unless told otherwise)
    // excludes system events, as a group on `$all` does anyway.
    if on_type && expression.prefix.is_empty() && expression.regex == SYSTEM_EVENTS_EXCLUDED {
        return Ok((None, None));
    }
    if expression.prefix.is_empty() && !expression.regex.is_empty() {
        return Err(Status::invalid_argument(
            "a persistent subscription to $all filters by prefixes of stream names or event \
             types; regular expressions are for catch-up subscriptions",
        ));
    }
    if expression.prefix.iter().any(|prefix| prefix.contains(',')) {
        return Err(Status::invalid_argument(
            "a filter's prefixes must not contain commas",
        ));
    }
    let prefixes = (!expression.prefix.is_empty()).then(|| expression.prefix.join(","));
    Ok(if on_type {
        (None, prefixes)
    } else {
        (prefixes, None)
    })
}

/// How EventStoreDB writes a position: a revision, or `C:commit/P:prepare` on `$all`; -1 is
/// the end.
fn position_text(stream: &str, position: Option<i64>) -> String {
    match (stream == ALL, position) {
        (_, None) => String::new(),
        (true, Some(position)) => format!("C:{position}/P:{position}"),
        (false, Some(position)) => position.to_string(),
    }
}

fn saturate(value: impl TryInto<i32>) -> i32 {
    value.try_into().unwrap_or(i32::MAX)
}

fn subscription_info(info: Info) -> ps::SubscriptionInfo {
    let settings = &info.settings;
    let start_from = match settings.start_from {
        StartFrom::Named(StartName::Start) => Some(0),
        StartFrom::Named(StartName::End) => Some(-1),
        StartFrom::At(at) => Some(at as i64),
    };
    let strategy = match &settings.strategy {
        Strategy::RoundRobin => "RoundRobin".to_owned(),
        Strategy::DispatchToSingle => "DispatchToSingle".to_owned(),
        Strategy::Pinned => "Pinned".to_owned(),
        Strategy::PinnedByCorrelation => "PinnedByCorrelation".to_owned(),
        Strategy::Sharded(sharder) => format!("Sharded:{sharder}"),
        Strategy::Partitioned { sharder, .. } => format!("Partitioned:{sharder}"),
    };
    let status = match info.status.as_str() {
        "live" => "Live",
        "catching_up" => "CatchingUp",
        "faulted" => "Faulted",
        other => other,
    };
    ps::SubscriptionInfo {
        event_source: info.stream.clone(),
        group_name: info.group.clone(),
        status: status.to_owned(),
        connections: info
            .consumers
            .iter()
            .map(|consumer| ps::subscription_info::ConnectionInfo {
                from: consumer.name.clone(),
                username: String::new(),
                average_items_per_second: 0,
                total_items: consumer.acked as i64,
                count_since_last_measurement: 0,
                observed_measurements: Vec::new(),
                available_slots: 0,
                in_flight_messages: saturate(consumer.in_flight),
                connection_name: consumer.name.clone(),
            })
            .collect(),
        average_per_second: 0,
        total_items: info.delivered as i64,
        count_since_last_measurement: 0,
        last_checkpointed_event_position: position_text(
            &info.stream,
            info.checkpoint.map(|at| at as i64),
        ),
        last_known_event_position: position_text(&info.stream, info.last_known.map(|at| at as i64)),
        resolve_link_tos: settings.resolve_links,
        start_from: position_text(&info.stream, start_from),
        message_timeout_milliseconds: saturate(settings.message_timeout_ms),
        extra_statistics: false,
        max_retry_count: saturate(settings.max_retry_count),
        live_buffer_size: saturate(settings.live_buffer_size),
        buffer_size: saturate(settings.history_buffer_size),
        read_batch_size: saturate(settings.read_batch_size),
        check_point_after_milliseconds: saturate(settings.checkpoint_after_ms),
        min_check_point_count: saturate(settings.min_checkpoint_count),
        max_check_point_count: saturate(settings.max_checkpoint_count),
        read_buffer_count: saturate(info.ready),
        live_buffer_count: 0,
        retry_buffer_count: 0,
        total_in_flight_messages: saturate(info.in_flight),
        outstanding_messages_count: saturate(info.in_flight),
        named_consumer_strategy: strategy,
        max_subscriber_count: saturate(settings.max_subscriber_count),
        parked_message_count: info.parked as i64,
    }
}

#[tonic::async_trait]
impl persistent_subscriptions_server::PersistentSubscriptions for PersistentSubscriptions {
    #[allow(deprecated)]
    async fn create(
        &self,
        request: Request<ps::CreateReq>,
    ) -> Result<Response<ps::CreateResp>, Status> {
        use ps::create_req::{
            Position, all_options::AllOption, options::StreamOption, stream_options,
        };
        self.context.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        let group = group_name(&options.group_name)?;
        let settings = options.settings.unwrap_or_default();
        let (stream, start_from, prefixes) = match options.stream_option {
            Some(StreamOption::Stream(stream)) => {
                let start = start_from!(
                    stream.revision_option,
                    stream_options::RevisionOption,
                    Revision,
                    |revision| revision
                );
                let name = convert::stream_name(stream.stream_identifier.as_ref())?;
                (name, start, (None, None))
            }
            Some(StreamOption::All(all)) => {
                let start =
                    start_from!(all.all_option, AllOption, Position, |position: Position| {
                        position.commit_position
                    });
                let filter = match all.filter_option {
                    Some(ps::create_req::all_options::FilterOption::Filter(filter)) => Some(filter),
                    _ => None,
                };
                (ALL.to_owned(), start, filter_prefixes(filter)?)
            }
            // Clients before 21.10 name the stream here and its start in the settings.
            None => {
                let name = convert::stream_name(options.stream_identifier.as_ref())?;
                (name, StartFrom::At(settings.revision), (None, None))
            }
        };
        let settings = settings_fields!(settings, create_req, create_strategy)
            .into_settings(start_from, prefixes)?;
        self.groups()?
            .create(&stream, &group, settings)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        Ok(Response::new(ps::CreateResp {}))
    }

    #[allow(deprecated)]
    async fn update(
        &self,
        request: Request<ps::UpdateReq>,
    ) -> Result<Response<ps::UpdateResp>, Status> {
        use ps::update_req::{
            Position, all_options::AllOption, options::StreamOption, stream_options,
        };
        self.context.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        let group = group_name(&options.group_name)?;
        let settings = options.settings.unwrap_or_default();
        let (stream, start_from) = match options.stream_option {
            Some(StreamOption::Stream(stream)) => {
                let start = start_from!(
                    stream.revision_option,
                    stream_options::RevisionOption,
                    Revision,
                    |revision| revision
                );
                (
                    convert::stream_name(stream.stream_identifier.as_ref())?,
                    start,
                )
            }
            Some(StreamOption::All(all)) => {
                let start =
                    start_from!(all.all_option, AllOption, Position, |position: Position| {
                        position.commit_position
                    });
                (ALL.to_owned(), start)
            }
            None => (
                convert::stream_name(options.stream_identifier.as_ref())?,
                StartFrom::At(settings.revision),
            ),
        };
        let groups = self.groups()?;
        // An update keeps the group's filter, which the message cannot carry.
        let current = groups
            .info(&stream, &group)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        let prefixes = (
            current.settings.stream_prefix.clone(),
            current.settings.type_prefix.clone(),
        );
        let mut settings = settings_fields!(settings, update_req, update_strategy)
            .into_settings(start_from, prefixes)?;
        // The message's strategy is an enum of three; a group with another keeps it.
        if !matches!(
            current.settings.strategy,
            Strategy::RoundRobin | Strategy::DispatchToSingle | Strategy::Pinned
        ) {
            settings.strategy = current.settings.strategy.clone();
        }
        groups
            .put(&stream, &group, settings)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        Ok(Response::new(ps::UpdateResp {}))
    }

    async fn delete(
        &self,
        request: Request<ps::DeleteReq>,
    ) -> Result<Response<ps::DeleteResp>, Status> {
        use ps::delete_req::options::StreamOption;
        self.context.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        let group = group_name(&options.group_name)?;
        let stream = named_source!(&options.stream_option, StreamOption)?;
        self.groups()?
            .delete(&stream, &group)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        Ok(Response::new(ps::DeleteResp {}))
    }

    type ReadStream = Deliveries;

    async fn read(
        &self,
        request: Request<Streaming<ps::ReadReq>>,
    ) -> Result<Response<Deliveries>, Status> {
        use read_req::options::{StreamOption, uuid_option};
        self.context.authorize(&request, Role::Writer)?;
        let connection = request
            .metadata()
            .get("connection-name")
            .and_then(|value| value.to_str().ok())
            .filter(|name| {
                !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
            })
            .unwrap_or("grpc")
            .to_owned();
        let mut inbound = request.into_inner();
        let options = match inbound.message().await? {
            Some(ps::ReadReq {
                content: Some(read_req::Content::Options(options)),
            }) => options,
            _ => {
                return Err(Status::invalid_argument(
                    "a subscription begins with its options",
                ));
            }
        };
        let group = group_name(&options.group_name)?;
        let stream = named_source!(&options.stream_option, StreamOption)?;
        let buffer = usize::try_from(options.buffer_size)
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or(DEFAULT_BUFFER)
            .min(MAX_PULL);
        let structured = matches!(
            options.uuid_option.and_then(|option| option.content),
            Some(uuid_option::Content::Structured(_))
        );
        let groups = self.groups()?;
        let fail = |error| group_status(error, &stream, &group);
        if groups.is_partitioned(&stream, &group).map_err(fail)? {
            return Err(Status::failed_precondition(
                "a partitioned group is consumed over Refract's HTTP API (it commits offsets \
                 instead of acking)",
            ));
        }
        let consumer = format!("{connection}-{}", uuid::Uuid::new_v4().simple());
        let deliveries = groups
            .subscribe(&stream, &group, &consumer, buffer)
            .await
            .map_err(fail)?;
        let (sender, receiver) = mpsc::channel(buffer + 1);
        let connection = Connection {
            remembered: buffer * REMEMBERED_PER_BUFFERED,
            groups,
            stream,
            group,
            structured,
            shutdown: self.context.shutdown.clone(),
            sender,
        };
        tokio::spawn(connection.run(deliveries, inbound));
        Ok(Response::new(channel_stream(receiver)))
    }

    async fn get_info(
        &self,
        request: Request<ps::GetInfoReq>,
    ) -> Result<Response<ps::GetInfoResp>, Status> {
        use ps::get_info_req::options::StreamOption;
        self.context.authorize(&request, Role::Reader)?;
        let options = request.into_inner().options.unwrap_or_default();
        let group = group_name(&options.group_name)?;
        let stream = named_source!(&options.stream_option, StreamOption)?;
        let info = self
            .groups()?
            .info(&stream, &group)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        Ok(Response::new(ps::GetInfoResp {
            subscription_info: Some(subscription_info(info)),
        }))
    }

    async fn replay_parked(
        &self,
        request: Request<ps::ReplayParkedReq>,
    ) -> Result<Response<ps::ReplayParkedResp>, Status> {
        use ps::replay_parked_req::options::{StopAtOption, StreamOption};
        self.context.authorize(&request, Role::Admin)?;
        let options = request.into_inner().options.unwrap_or_default();
        let group = group_name(&options.group_name)?;
        let stream = named_source!(&options.stream_option, StreamOption)?;
        let stop_at = match options.stop_at_option {
            Some(StopAtOption::StopAt(stop_at)) => Some(
                u64::try_from(stop_at)
                    .map_err(|_| Status::invalid_argument("stop_at must not be negative"))?,
            ),
            Some(StopAtOption::NoLimit(_)) | None => None,
        };
        self.groups()?
            .replay_parked(&stream, &group, stop_at)
            .await
            .map_err(|error| group_status(error, &stream, &group))?;
        Ok(Response::new(ps::ReplayParkedResp {}))
    }

    async fn list(&self, request: Request<ps::ListReq>) -> Result<Response<ps::ListResp>, Status> {
        use ps::list_req::{options::ListOption, stream_option::StreamOption};
        self.context.authorize(&request, Role::Reader)?;
        let options = request.into_inner().options.unwrap_or_default();
        let only = match options.list_option {
            Some(ListOption::ListForStream(stream)) => match stream.stream_option {
                Some(StreamOption::Stream(identifier)) => {
                    Some(convert::stream_name(Some(&identifier))?)
                }
                Some(StreamOption::All(_)) => Some(ALL.to_owned()),
                None => None,
            },
            Some(ListOption::ListAllSubscriptions(_)) | None => None,
        };
        let subscriptions = self
            .groups()?
            .list()
            .await
            .into_iter()
            .filter(|info| only.as_ref().is_none_or(|stream| &info.stream == stream))
            .map(subscription_info)
            .collect();
        Ok(Response::new(ps::ListResp { subscriptions }))
    }

    async fn restart_subsystem(&self, request: Request<Empty>) -> Result<Response<Empty>, Status> {
        // Groups run as tasks that pick up changes as they come: there is nothing to restart.
        self.context.authorize(&request, Role::Admin)?;
        Ok(Response::new(Empty {}))
    }
}

/// What a connection delivered and not yet heard back about: the id the client acks by (the
/// event's, or its link's) and the group's ack id, the oldest forgotten past `capacity`.
struct Delivered {
    ack_ids: HashMap<uuid::Uuid, (u64, String)>,
    /// Ids in the order delivered, each with its delivery's number: a later delivery of the
    /// same id is not forgotten with an earlier one.
    order: VecDeque<(uuid::Uuid, u64)>,
    next: u64,
    capacity: usize,
}

impl Delivered {
    fn new(capacity: usize) -> Self {
        Delivered {
            ack_ids: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity,
        }
    }

    fn remember(&mut self, id: uuid::Uuid, ack_id: String) {
        self.ack_ids.insert(id, (self.next, ack_id));
        self.order.push_back((id, self.next));
        self.next += 1;
        while self.order.len() > self.capacity {
            let Some((oldest, number)) = self.order.pop_front() else {
                break;
            };
            if self
                .ack_ids
                .get(&oldest)
                .is_some_and(|(at, _)| *at == number)
            {
                self.ack_ids.remove(&oldest);
            }
        }
    }

    fn take(&mut self, id: uuid::Uuid) -> Option<String> {
        self.ack_ids.remove(&id).map(|(_, ack_id)| ack_id)
    }
}

/// One client connection to a group: deliveries out, acks and nacks in.
struct Connection {
    /// Most deliveries remembered for acks.
    remembered: usize,
    groups: Groups,
    stream: String,
    group: String,
    structured: bool,
    shutdown: tokio_util::sync::CancellationToken,
    sender: mpsc::Sender<Result<ps::ReadResp, Status>>,
}

impl Connection {
    async fn run(
        self,
        mut deliveries: mpsc::Receiver<crate::groups::Delivery>,
        mut inbound: Streaming<ps::ReadReq>,
    ) {
        let confirmation =
            read_resp::Content::SubscriptionConfirmation(read_resp::SubscriptionConfirmation {
                subscription_id: format!("{}::{}", self.stream, self.group),
            });
        if self
            .sender
            .send(Ok(ps::ReadResp {
                content: Some(confirmation),
            }))
            .await
            .is_err()
        {
            return;
        }
        let mut delivered = Delivered::new(self.remembered);
        loop {
            tokio::select! {
                delivery = deliveries.recv() => {
                    let Some(delivery) = delivery else {
                        let ended = self.ended().await;
                        let _ = self.sender.send(Err(ended)).await;
                        return;
                    };
                    delivered.remember(original_id(&delivery.event), delivery.ack_id.clone());
                    if self.sender.send(Ok(self.message(delivery))).await.is_err() {
                        return;
                    }
                }
                message = inbound.message() => {
                    // A stream that ends cleanly is taken by EventStoreDB's clients for a
                    // protocol error, so the subscription always ends with a status.
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => {
                            let ended = Status::cancelled("the client ended the subscription");
                            let _ = self.sender.try_send(Err(ended));
                            return;
                        }
                        Err(status) => {
                            let _ = self.sender.try_send(Err(status));
                            return;
                        }
                    };
                    if let Err(status) = self.answer(message, &mut delivered).await {
                        let _ = self.sender.send(Err(status)).await;
                        return;
                    }
                }
                () = self.shutdown.cancelled() => {
                    let _ = self.sender.send(Err(convert::shutting_down())).await;
                    return;
                }
                () = self.sender.closed() => return,
            }
        }
    }

    fn message(&self, delivery: crate::groups::Delivery) -> ps::ReadResp {
        use read_resp::read_event::{Count, Position, RecordedEvent};
        let (fields, link) = event_fields(Arc::unwrap_or_clone(delivery.event), self.structured);
        let position = fields.position;
        ps::ReadResp {
            content: Some(read_resp::Content::Event(read_resp::ReadEvent {
                event: Some(recorded_event!(RecordedEvent, fields)),
                link: link.map(|link| recorded_event!(RecordedEvent, link)),
                position: Some(Position::CommitPosition(position)),
                count: Some(Count::RetryCount(saturate(delivery.retry_count))),
            })),
        }
    }

    /// Acks or nacks what the client names; ids this connection did not deliver (acked
    /// already, or given to another) are ignored, as EventStoreDB does.
    async fn answer(&self, message: ps::ReadReq, delivered: &mut Delivered) -> Result<(), Status> {
        let mut ack_ids = |ids: &[super::proto::event_store::client::Uuid]| {
            ids.iter()
                .filter_map(|id| convert::uuid_of(Some(id)).ok())
                .filter_map(|id| delivered.take(id))
                .collect::<Vec<_>>()
        };
        let result = match message.content {
            Some(read_req::Content::Ack(ack)) => {
                let ids = ack_ids(&ack.ids);
                if ids.is_empty() {
                    return Ok(());
                }
                self.groups.ack(&self.stream, &self.group, ids).await
            }
            Some(read_req::Content::Nack(nack)) => {
                use read_req::nack::Action;
                let ids = ack_ids(&nack.ids);
                if ids.is_empty() {
                    return Ok(());
                }
                let action = match Action::try_from(nack.action) {
                    Ok(Action::Park) => NackAction::Park,
                    Ok(Action::Skip) => NackAction::Skip,
                    Ok(Action::Stop) => NackAction::Stop,
                    Ok(Action::Retry | Action::Unknown) | Err(_) => NackAction::Retry,
                };
                self.groups
                    .nack(&self.stream, &self.group, ids, action, nack.reason)
                    .await
            }
            _ => {
                return Err(Status::invalid_argument(
                    "after its options, a subscription takes acks and nacks",
                ));
            }
        };
        match result {
            Ok(()) | Err(GroupError::NotDelivered(_)) => Ok(()),
            Err(error) => Err(group_status(error, &self.stream, &self.group)),
        }
    }

    /// Why the group stopped delivering: it was deleted, or the server is stopping.
    async fn ended(&self) -> Status {
        match self.groups.info(&self.stream, &self.group).await {
            Err(GroupError::NotFound { .. }) => convert::persistent_status(
                Code::NotFound,
                format!(
                    "Subscription group '{}' on stream '{}' was deleted.",
                    self.group, self.stream
                ),
                "persistent-subscription-dropped",
            ),
            _ => Status::unavailable("the subscription group stopped; connect again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_written_as_the_clients_parse_them() {
        assert_eq!(position_text("order-1", Some(-1)), "-1");
        assert_eq!(position_text("$all", Some(12)), "C:12/P:12");
        assert_eq!(position_text("$all", None), "");
    }

    #[test]
    fn all_filters_become_prefixes() {
        use ps::create_req::all_options::{FilterOptions, filter_options};
        let filter = |regex: &str, prefix: &[&str]| FilterOptions {
            filter: Some(filter_options::Filter::EventType(
                filter_options::Expression {
                    regex: regex.into(),
                    prefix: prefix.iter().map(|p| p.to_string()).collect(),
                },
            )),
            window: None,
            checkpoint_interval_multiplier: 1,
        };
        assert_eq!(
            filter_prefixes(Some(filter("", &["Order", "Invoice"]))).unwrap(),
            (None, Some("Order,Invoice".into()))
        );
        assert!(filter_prefixes(Some(filter("^Order", &[]))).is_err());
        assert_eq!(filter_prefixes(None).unwrap(), (None, None));
    }
}
