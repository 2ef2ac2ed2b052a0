//! What a connector is told to do: the JSON definition `PUT /connectors/{name}` takes, checked
//! before anything is stored.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::Name;

/// A connector's definition: a sink sends Refract's events to a Kafka topic, a source lands a
/// topic's records in Refract's streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[schema(as = ConnectorDefinition)]
pub enum Definition {
    KafkaSink(SinkDefinition),
    KafkaSource(SourceDefinition),
}

/// Refract → Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkDefinition {
    /// `host:port` of one or more brokers, comma-separated.
    pub bootstrap_servers: String,
    pub topic: String,
    /// What to read: `$all` (the default), a stream, or a category's `$ce-<category>`.
    #[serde(default = "all_streams")]
    pub source: String,
    /// Only events of streams starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_prefix: Option<String>,
    /// Only events whose type starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_prefix: Option<String>,
    /// Where a new sink begins (default `start`).
    #[serde(default)]
    pub start_from: SinkStart,
    /// How events are placed on the topic's partitions (default `stream`).
    #[serde(default)]
    pub partitioning: Partitioning,
    /// Compression of the record batches (default `zstd`).
    #[serde(default)]
    pub compression: Compression,
    /// Wait for every in-sync replica (acks=all) before an event counts as sent. Always
    /// true: exactly-once delivery rests on it.
    #[serde(default = "yes")]
    pub wait_for_broker_ack: bool,
}

/// Where a sink without a checkpoint begins: the first event, the head when it is created, or
/// a position (the first event sent is the first at or after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SinkStart {
    Named(#[schema(inline)] StartName),
    Position(u64),
}

impl Default for SinkStart {
    fn default() -> Self {
        SinkStart::Named(StartName::Start)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartName {
    #[default]
    Start,
    End,
}

/// `"stream"`: Kafka's default partitioner on the stream name (murmur2, as a Java producer
/// places keyed records), so a stream's events stay in order on one partition.
/// `{"sharder": name}`: the uploaded Wasm sharder, asked with as many shards as the topic has
/// partitions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Partitioning {
    #[default]
    Stream,
    Sharder(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Lz4,
    Snappy,
    #[default]
    Zstd,
}

/// Kafka → Refract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceDefinition {
    /// `host:port` of one or more brokers, comma-separated.
    pub bootstrap_servers: String,
    pub topic: String,
    /// Which stream a record lands in (default: the stream named after the topic).
    #[serde(default)]
    pub stream: StreamMapping,
    /// The events' type (default: the topic's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<EventTypeMapping>,
    /// Where a partition without a stored offset begins (default `earliest`).
    #[serde(default)]
    pub start_from: SourceStart,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamMapping {
    pub strategy: StreamStrategy,
    /// `fixed`: the stream's name; `header`: the header's name; `key`: a prefix put before
    /// the key (optional); `projection`: the deployed projection's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `topic`: the stream named after the topic; `key`: the record's key (UTF-8); `header`: a
/// header's value; `fixed`: one stream; `projection`: the partition key a deployed projection
/// gives the record, seen as an event of the topic's stream (its `partition_by` function). A
/// record without a usable key, header or partition key lands in the topic's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamStrategy {
    #[default]
    Topic,
    Key,
    Header,
    Fixed,
    Projection,
}

/// A fixed event type, or one read from a header (with a default for records without it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EventTypeMapping {
    Fixed(String),
    Header(HeaderType),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderType {
    pub header: String,
    /// The type of records without the header (default: the topic's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceStart {
    #[default]
    Earliest,
    Latest,
}

fn all_streams() -> String {
    "$all".to_owned()
}

fn yes() -> bool {
    true
}

impl Definition {
    /// Reads and checks a definition.
    pub fn parse(body: &[u8]) -> Result<Definition, String> {
        let definition: Definition = crate::json::from_slice(body)
            .map_err(|error| format!("invalid connector definition: {error}"))?;
        definition.check()?;
        Ok(definition)
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            Definition::KafkaSink(sink) => {
                check_kafka(&sink.bootstrap_servers, &sink.topic)?;
                Name::Stream
                    .check(&sink.source)
                    .map_err(|error| format!("source: {error}"))?;
                if sink.source.starts_with('$')
                    && sink.source != "$all"
                    && !sink.source.starts_with("$ce-")
                {
                    return Err(format!(
                        "source must be $all, a stream or $ce-<category>, not {:?}",
                        sink.source
                    ));
                }
                if let Partitioning::Sharder(name) = &sink.partitioning {
                    Name::Sharder.check(name)?;
                }
                if !sink.wait_for_broker_ack {
                    return Err(
                        "wait_for_broker_ack cannot be false: the sink counts an event as \
                                sent once every in-sync replica has it, which exactly-once \
                                delivery rests on"
                            .into(),
                    );
                }
                Ok(())
            }
            Definition::KafkaSource(source) => {
                check_kafka(&source.bootstrap_servers, &source.topic)?;
                let needs_value = matches!(
                    source.stream.strategy,
                    StreamStrategy::Fixed | StreamStrategy::Header | StreamStrategy::Projection
                );
                if needs_value && source.stream.value.is_none() {
                    return Err(
                        "stream.value is required for the fixed, header and projection strategies"
                            .into(),
                    );
                }
                if let (StreamStrategy::Projection, Some(projection)) =
                    (source.stream.strategy, &source.stream.value)
                {
                    Name::Projection
                        .check(projection)
                        .map_err(|error| format!("stream.value: {error}"))?;
                }
                if let (StreamStrategy::Fixed, Some(stream)) =
                    (source.stream.strategy, &source.stream.value)
                {
                    check_target_stream(stream)
                        .map_err(|error| format!("stream.value: {error}"))?;
                }
                match &source.event_type {
                    Some(EventTypeMapping::Fixed(event_type)) => check_event_type(event_type)?,
                    Some(EventTypeMapping::Header(header)) => {
                        if header.header.is_empty() {
                            return Err("event_type.header must not be empty".into());
                        }
                        if let Some(default) = &header.default {
                            check_event_type(default)?;
                        }
                    }
                    None => {}
                }
                Ok(())
            }
        }
    }

    /// The projection a source maps its records to streams with.
    pub fn mapping_projection(&self) -> Option<&str> {
        match self {
            Definition::KafkaSource(SourceDefinition {
                stream:
                    StreamMapping {
                        strategy: StreamStrategy::Projection,
                        value,
                    },
                ..
            }) => value.as_deref(),
            _ => None,
        }
    }

    /// The sharder a sink places its records with.
    pub fn sharder(&self) -> Option<&str> {
        match self {
            Definition::KafkaSink(SinkDefinition {
                partitioning: Partitioning::Sharder(name),
                ..
            }) => Some(name),
            _ => None,
        }
    }

    pub fn topic(&self) -> &str {
        match self {
            Definition::KafkaSink(sink) => &sink.topic,
            Definition::KafkaSource(source) => &source.topic,
        }
    }

    /// Whether a checkpoint made under `self` still means the same under `other`: the same
    /// kind, topic and (for a sink) source.
    pub fn same_progress(&self, other: &Definition) -> bool {
        match (self, other) {
            (Definition::KafkaSink(a), Definition::KafkaSink(b)) => {
                a.topic == b.topic && a.source == b.source
            }
            (Definition::KafkaSource(a), Definition::KafkaSource(b)) => a.topic == b.topic,
            _ => false,
        }
    }
}

/// What `bootstrap_servers` takes: `host:port` pairs, comma-separated, where a host is a name
/// or IPv4 address, or an IPv6 address in brackets.
pub const BOOTSTRAP_PATTERN: &str = r"^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])(,([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))*$";
/// Kafka's rule for topic names.
pub const TOPIC_PATTERN: &str = "^[A-Za-z0-9._-]{1,249}$";

fn check_kafka(bootstrap_servers: &str, topic: &str) -> Result<(), String> {
    let name = |host: &str| {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let address = |host: &str| {
        host.strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| {
                !inner.is_empty()
                    && inner
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
            })
    };
    let port = |port: &str| {
        (1..=5).contains(&port.len())
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|port| port <= 65535)
    };
    let valid = bootstrap_servers.split(',').all(|server| {
        server
            .rsplit_once(':')
            .is_some_and(|(host, number)| (name(host) || address(host)) && port(number))
    });
    if !valid {
        return Err(format!(
            "bootstrap_servers must be host:port[,host:port…], not {bootstrap_servers:?}"
        ));
    }
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) {
        return Err(format!(
            "topic must be 1 to 249 ASCII letters, digits, '.', '_' and '-', not {topic:?}"
        ));
    }
    Ok(())
}

/// A stream a source may append to: a valid name, not a system stream.
pub fn check_target_stream(stream: &str) -> Result<(), String> {
    Name::Stream.check(stream)?;
    if stream.starts_with('$') {
        return Err(format!("{stream:?} is a system stream"));
    }
    Ok(())
}

pub fn check_event_type(event_type: &str) -> Result<(), String> {
    if event_type.is_empty() || event_type.len() > crate::store::MAX_EVENT_TYPE_BYTES {
        return Err(format!(
            "an event type must be 1 to {} bytes long",
            crate::store::MAX_EVENT_TYPE_BYTES
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_read_with_their_defaults() {
        let sink = Definition::parse(
            br#"{"kind": "kafka-sink", "bootstrap_servers": "127.0.0.1:9092", "topic": "orders"}"#,
        )
        .unwrap();
        let Definition::KafkaSink(sink) = sink else {
            panic!("a sink")
        };
        assert_eq!(sink.source, "$all");
        assert_eq!(sink.start_from, SinkStart::Named(StartName::Start));
        assert_eq!(sink.partitioning, Partitioning::Stream);
        assert_eq!(sink.compression, Compression::Zstd);
        let sink = Definition::parse(
            br#"{"kind": "kafka-sink", "bootstrap_servers": "a:1,[::1]:65535", "topic": "t",
                 "source": "$ce-order", "start_from": 42, "partitioning": {"sharder": "s"},
                 "compression": "lz4", "wait_for_broker_ack": true}"#,
        )
        .unwrap();
        let Definition::KafkaSink(sink) = sink else {
            panic!("a sink")
        };
        assert_eq!(sink.start_from, SinkStart::Position(42));
        assert_eq!(sink.partitioning, Partitioning::Sharder("s".into()));
        let source = Definition::parse(
            br#"{"kind": "kafka-source", "bootstrap_servers": "h:9", "topic": "t",
                 "stream": {"strategy": "key", "value": "order-"},
                 "event_type": {"header": "type"}, "start_from": "latest"}"#,
        )
        .unwrap();
        let Definition::KafkaSource(source) = source else {
            panic!("a source")
        };
        assert_eq!(source.stream.strategy, StreamStrategy::Key);
        assert_eq!(
            source.event_type,
            Some(EventTypeMapping::Header(HeaderType {
                header: "type".into(),
                default: None
            }))
        );
        assert_eq!(
            serde_json::to_value(Definition::KafkaSource(source)).unwrap()["kind"],
            "kafka-source"
        );
    }

    #[test]
    fn bad_definitions_are_refused() {
        for bad in [
            r#"{"kind": "kafka-sink", "topic": "t"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "nohost", "topic": "t"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "a b"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "extra": 1}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "wait_for_broker_ack": false}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "source": "$et-x"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:123456", "topic": "t"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1,", "topic": "t"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h h:1", "topic": "t"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "start_from": "middle"}"#,
            r#"{"kind": "kafka-sink", "bootstrap_servers": "h:1", "topic": "t", "compression": "brotli"}"#,
            r#"{"kind": "kafka-source", "bootstrap_servers": "h:1", "topic": "t", "stream": {"strategy": "fixed"}}"#,
            r#"{"kind": "kafka-source", "bootstrap_servers": "h:1", "topic": "t", "stream": {"strategy": "fixed", "value": "$x"}}"#,
            r#"{"kind": "kafka-source", "bootstrap_servers": "h:1", "topic": "t", "event_type": ""}"#,
            r#"{"kind": "kafka-mirror", "bootstrap_servers": "h:1", "topic": "t"}"#,
            r#"[]"#,
        ] {
            assert!(Definition::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
