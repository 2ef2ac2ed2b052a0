//! A group's settings, with EventStoreDB's defaults, and the record the store keeps per group.

use serde::{Deserialize, Serialize};

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StartFrom {
    /// `"start"` or `"end"`.
    Named(StartName),
    /// A revision (of a stream) or a position (of `$all`).
    At(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartName {
    Start,
    End,
}

/// How messages are spread over the group's consumers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each message to the next consumer with room.
    RoundRobin,
    /// Every message to one consumer while it has room; others take the overflow.
    DispatchToSingle,
    /// The original stream's name, hashed into buckets owned by consumers.
    Pinned,
    /// As `pinned`, keyed by the correlation id (the metadata property `$by_correlation_id`
    /// reads, `$correlationId` by default; the stream name when an event has none).
    PinnedByCorrelation,
    /// A stored sharder picks the bucket of each event.
    Sharded(String),
    /// Kafka's model: a stored sharder places each event in one of `partitions` partitions;
    /// each partition belongs to one consumer at a time, which commits offsets instead of acking.
    Partitioned {
        sharder: String,
        #[schema(minimum = 1, maximum = 1024)]
        partitions: u32,
    },
}

/// Most partitions a partitioned group may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// A group's settings. Every field is optional in a request; the defaults are EventStoreDB's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `start`, `end` (default) or a revision/position: where a new group begins. An update
    /// keeps the group's checkpoint whatever this says.
    pub start_from: StartFrom,
    /// Deliver the events links point at (default true) rather than the links.
    pub resolve_links: bool,
    /// A delivered message not acked within this time is retried; a consumer silent this long
    /// leaves the group.
    pub message_timeout_ms: u64,
    /// Retries before a message is parked.
    pub max_retry_count: u32,
    /// Messages held ready for delivery once the group has caught up.
    pub live_buffer_size: usize,
    /// Events read from the store at a time.
    pub read_batch_size: usize,
    /// Messages held ready for delivery while the group catches up.
    pub history_buffer_size: usize,
    /// A checkpoint is written at most this often once `min_checkpoint_count` messages were acked.
    pub checkpoint_after_ms: u64,
    pub min_checkpoint_count: u64,
    /// After this many acked messages a checkpoint is written at once.
    pub max_checkpoint_count: u64,
    /// 0 = unlimited.
    pub max_subscriber_count: usize,
    pub strategy: Strategy,
    /// `$all` only: deliver events of streams starting with one of these (comma-separated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_prefix: Option<String>,
    /// `$all` only: deliver events whose type starts with one of these (comma-separated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_prefix: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            start_from: StartFrom::Named(StartName::End),
            resolve_links: true,
            message_timeout_ms: 30_000,
            max_retry_count: 10,
            live_buffer_size: 500,
            read_batch_size: 20,
            history_buffer_size: 500,
            checkpoint_after_ms: 2_000,
            min_checkpoint_count: 10,
            max_checkpoint_count: 1_000,
            max_subscriber_count: 0,
            strategy: Strategy::RoundRobin,
            stream_prefix: None,
            type_prefix: None,
        }
    }
}

/// Most messages a buffer may hold.
const MAX_BUFFER: usize = 100_000;

impl Settings {
    /// Checks the values; `on_all` says whether the group reads `$all`.
    pub fn validate(&self, on_all: bool) -> Result<(), String> {
        if self.message_timeout_ms == 0 {
            return Err("message_timeout_ms must be at least 1".into());
        }
        for (name, size) in [
            ("live_buffer_size", self.live_buffer_size),
            ("read_batch_size", self.read_batch_size),
            ("history_buffer_size", self.history_buffer_size),
        ] {
            if size == 0 || size > MAX_BUFFER {
                return Err(format!("{name} must be between 1 and {MAX_BUFFER}"));
            }
        }
        if self.min_checkpoint_count > self.max_checkpoint_count {
            return Err("min_checkpoint_count must not exceed max_checkpoint_count".into());
        }
        if self.max_checkpoint_count == 0 {
            return Err("max_checkpoint_count must be at least 1".into());
        }
        if !on_all && (self.stream_prefix.is_some() || self.type_prefix.is_some()) {
            return Err("stream_prefix and type_prefix apply to groups on $all only".into());
        }
        if let Strategy::Sharded(name) = &self.strategy
            && name.is_empty()
        {
            return Err("a sharded strategy needs the sharder's name".into());
        }
        if let Strategy::Partitioned {
            sharder,
            partitions,
        } = &self.strategy
        {
            if sharder.is_empty() {
                return Err("a partitioned strategy needs the sharder's name".into());
            }
            if !(1..=MAX_PARTITIONS).contains(partitions) {
                return Err(format!("partitions must be between 1 and {MAX_PARTITIONS}"));
            }
        }
        Ok(())
    }

    /// Parses a request body: empty means every default.
    pub fn parse(body: &[u8]) -> Result<Settings, String> {
        // No body, or `null`: every setting takes its default.
        if let Ok(text) = std::str::from_utf8(body)
            && matches!(text.trim(), "" | "null")
        {
            return Ok(Settings::default());
        }
        crate::json::from_slice(body).map_err(|error| format!("invalid settings: {error}"))
    }
}

/// What the store keeps per group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub settings: Settings,
    /// Where the group began: a checkpoint exists once `next` has moved past it.
    pub start: u64,
    /// Every message before this revision/position has been acked (or skipped, or parked).
    pub next: u64,
    /// Parked messages before this revision of the parked stream have been replayed and acked.
    pub parked_next: u64,
    /// A replay of parked messages runs up to this revision of the parked stream.
    pub replay_until: u64,
    /// What had been read and finished when the record was written, beyond `next`: an ack is
    /// durable before it is answered, while `next` moves as the checkpoint settings say.
    #[serde(default)]
    pub source_done: Done,
    /// The same for the parked stream, beyond `parked_next`.
    #[serde(default)]
    pub parked_done: Done,
    /// A partitioned group's offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Offsets>,
}

/// Where a partitioned group's partitions are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offsets {
    /// The sharder events are placed with now (the settings name another while a switch waits).
    pub sharder: String,
    /// The partition count events are placed in now.
    pub partitions: u32,
    /// Per partition, the first revision/position not committed.
    pub next: Vec<u64>,
    /// Generations from this one on were never handed out.
    pub generation_floor: u64,
    /// A change of sharder or count waits here: events before it keep the placement above, and
    /// once every partition has committed them all, every partition starts here with the
    /// settings' placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_at: Option<u64>,
}

/// Messages read up to `read_to` are finished except `unfinished`: a few numbers however many
/// were acked since the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub read_to: u64,
    pub unfinished: Vec<u64>,
}

impl Done {
    /// Whether the message at `sequence` was finished.
    pub fn contains(&self, sequence: u64) -> bool {
        sequence < self.read_to && self.unfinished.binary_search(&sequence).is_err()
    }
}

impl Record {
    /// The last revision/position below which everything was acked; `None` before any ack.
    pub fn checkpoint(&self) -> Option<u64> {
        (self.next > self.start).then(|| self.next - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknowns() {
        let settings =
            Settings::parse(br#"{"strategy": {"sharded": "by-customer"}, "start_from": 7}"#)
                .unwrap();
        assert_eq!(settings.strategy, Strategy::Sharded("by-customer".into()));
        assert_eq!(settings.start_from, StartFrom::At(7));
        assert_eq!(settings.message_timeout_ms, 30_000);
        assert_eq!(Settings::parse(b"").unwrap(), Settings::default());
        let json = serde_json::to_value(Settings::default()).unwrap();
        assert_eq!(json["start_from"], "end");
        assert_eq!(json["strategy"], "round_robin");
        assert!(Settings::parse(br#"{"strategy": "random"}"#).is_err());
        assert!(Settings::parse(br#"{"message_timout_ms": 1}"#).is_err());
        assert!(Settings::parse(br#"{"start_from": "middle"}"#).is_err());
        let prefixed = Settings::parse(br#"{"stream_prefix": "order-"}"#).unwrap();
        assert!(prefixed.validate(true).is_ok());
        assert!(prefixed.validate(false).is_err());
        let bad = Settings {
            min_checkpoint_count: 5,
            max_checkpoint_count: 4,
            ..Settings::default()
        };
        assert!(bad.validate(false).is_err());
    }

    #[test]
    fn done_is_everything_read_but_the_unfinished() {
        let done = Done {
            read_to: 10,
            unfinished: vec![3, 7],
        };
        let finished: Vec<u64> = (0..12).filter(|&s| done.contains(s)).collect();
        assert_eq!(finished, vec![0, 1, 2, 4, 5, 6, 8, 9]);
        assert!(!Done::default().contains(0));
    }
}
