//! The built-in indexes behind the system projections: `$ce-<category>`, `$et-<type>`,
//! `$bc-<correlation id>` and `$category-<category>`.
//!
//! They are maintained by the writer, inside the same transactions as appends. Each index has a
//! checkpoint (the position it has indexed up to) stored with its links, so links and checkpoint
//! commit together: after a crash an index resumes exactly where its last commit left it, with no
//! link missing or repeated. A caught-up index links a batch's events in the batch's own commit,
//! so an acknowledged event is already visible in the output streams. An index that is behind
//! (started after a stop, reset, or on an existing store) catches up in chunks, in commits of
//! their own when no appends are waiting.
//!
//! A link is the 8-byte position of the linked event, packed 64 to a row of the `links` table
//! under the output stream's id: no copy of the event, no per-link row.

use std::collections::HashMap;

use redb::{ReadableTable, Table};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::record::{EventRecord, StreamState};
use super::writer::{Operation, Tables, Txn};
use super::{INDEX_CONFIG, LINKS_PER_CHUNK, StoreError, load_stream};
use crate::metrics::RateMeter;

/// A built-in index and the system projection that presents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SystemIndex {
    ByCategory,
    ByCorrelationId,
    ByEventType,
    StreamByCategory,
}

impl SystemIndex {
    pub const ALL: [SystemIndex; 4] = [
        SystemIndex::ByCategory,
        SystemIndex::ByCorrelationId,
        SystemIndex::ByEventType,
        SystemIndex::StreamByCategory,
    ];

    /// The projection's name.
    pub fn name(self) -> &'static str {
        match self {
            SystemIndex::ByCategory => "$by_category",
            SystemIndex::ByCorrelationId => "$by_correlation_id",
            SystemIndex::ByEventType => "$by_event_type",
            SystemIndex::StreamByCategory => "$stream_by_category",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        SystemIndex::ALL
            .into_iter()
            .find(|index| index.name() == name)
    }

    /// Every output stream of the index starts with this.
    pub fn output_prefix(self) -> &'static str {
        match self {
            SystemIndex::ByCategory => "$ce-",
            SystemIndex::ByCorrelationId => "$bc-",
            SystemIndex::ByEventType => "$et-",
            SystemIndex::StreamByCategory => "$category-",
        }
    }

    /// Where this index sits in per-index arrays.
    pub(crate) fn slot(self) -> usize {
        self as usize
    }

    /// Writes into `out` the output stream `event` is linked into, if any.
    fn output_stream(self, event: &EventRecord, config: &IndexConfig, out: &mut String) -> bool {
        out.clear();
        let key = match self {
            SystemIndex::ByCategory => config.category(event.stream),
            SystemIndex::StreamByCategory if event.revision == 0 => config.category(event.stream),
            SystemIndex::StreamByCategory => None,
            SystemIndex::ByEventType => Some(event.event_type),
            SystemIndex::ByCorrelationId => {
                return match correlation_id(event.metadata, &config.correlation_property) {
                    Some(id) if !id.is_empty() => {
                        out.push_str(self.output_prefix());
                        out.push_str(&id);
                        true
                    }
                    _ => false,
                };
            }
        };
        match key {
            Some(key) => {
                out.push_str(self.output_prefix());
                out.push_str(key);
                true
            }
            None => false,
        }
    }
}

/// Which end of the stream name the category is cut from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum CategoryPosition {
    /// The part before the first separator (`order-1-a` → `order`).
    First,
    /// The part before the last separator (`order-1-a` → `order-1`).
    Last,
}

/// How the indexes read streams and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// Separates the category from the rest of a stream name. Default `-`.
    pub category_separator: String,
    /// Default `first`.
    pub category_position: CategoryPosition,
    /// The metadata property holding the correlation id. Default `$correlationId`.
    pub correlation_property: String,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            category_separator: "-".into(),
            category_position: CategoryPosition::First,
            correlation_property: "$correlationId".into(),
        }
    }
}

impl IndexConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.category_separator.is_empty() {
            return Err("category_separator must not be empty".into());
        }
        if self.correlation_property.is_empty() {
            return Err("correlation_property must not be empty".into());
        }
        Ok(())
    }

    /// The category of a stream: none for `$`-streams, names without the separator, and names
    /// where the category would be empty.
    pub fn category<'a>(&self, stream: &'a str) -> Option<&'a str> {
        if stream.starts_with('$') {
            return None;
        }
        let at = match self.category_position {
            CategoryPosition::First => stream.find(self.category_separator.as_str()),
            CategoryPosition::Last => stream.rfind(self.category_separator.as_str()),
        }?;
        (at > 0).then(|| &stream[..at])
    }

    /// The correlation id in an event's metadata (its string at the configured property), if
    /// it has one: the rule of `$by_correlation_id`.
    pub fn correlation_id<'a>(&self, metadata: &'a [u8]) -> Option<std::borrow::Cow<'a, str>> {
        correlation_id(metadata, &self.correlation_property)
    }

    /// The indexes whose output depends on what changed between `self` and `other`.
    pub(super) fn affected_by(&self, other: &IndexConfig) -> Vec<SystemIndex> {
        let mut affected = Vec::new();
        if self.category_separator != other.category_separator
            || self.category_position != other.category_position
        {
            affected.extend([SystemIndex::ByCategory, SystemIndex::StreamByCategory]);
        }
        if self.correlation_property != other.correlation_property {
            affected.push(SystemIndex::ByCorrelationId);
        }
        affected
    }
}

/// The string at `property` of a metadata JSON object, read without building the whole object.
fn correlation_id<'a>(metadata: &'a [u8], property: &str) -> Option<std::borrow::Cow<'a, str>> {
    // Most metadata does not mention the property at all: skip parsing it.
    if metadata.is_empty() || !contains(metadata, property.as_bytes()) {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_slice(metadata);
    PropertySeed(property)
        .deserialize(&mut deserializer)
        .ok()
        .flatten()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

struct PropertySeed<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for PropertySeed<'_> {
    type Value = Option<std::borrow::Cow<'de, str>>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PropertySeed<'_> {
    type Value = Option<std::borrow::Cow<'de, str>>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a metadata object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 && found.is_none() {
                found = map
                    .next_value::<Option<StringOrOther<'de>>>()?
                    .and_then(|v| v.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A JSON value that is kept only when it is a string.
struct StringOrOther<'de>(Option<std::borrow::Cow<'de, str>>);

impl<'de> Deserialize<'de> for StringOrOther<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(StringOrOther(match value {
            serde_json::Value::String(text) => Some(std::borrow::Cow::Owned(text)),
            _ => None,
        }))
    }
}

/// An index's position as persisted: whether it runs, and how far it has indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cursor {
    pub running: bool,
    pub checkpoint: u64,
}

impl Default for Cursor {
    /// A new store, or one created before an index existed, indexes everything from the start.
    fn default() -> Self {
        Cursor {
            running: true,
            checkpoint: 0,
        }
    }
}

/// An index's state as reported to status queries.
#[derive(Debug, Clone, Copy)]
pub struct IndexProgress {
    pub running: bool,
    /// Every event below this position has been indexed.
    pub checkpoint: u64,
    rate: RateMeter,
}

impl Default for IndexProgress {
    fn default() -> Self {
        IndexProgress {
            running: false,
            checkpoint: 0,
            rate: RateMeter::new(0),
        }
    }
}

impl IndexProgress {
    /// Events indexed per second recently; 0 when nothing was indexed for a while.
    pub fn events_per_second(&self) -> f64 {
        self.rate.per_second()
    }
}

/// What the writer keeps for the indexes.
pub(super) struct Indexer {
    pub config: IndexConfig,
    pub cursors: [Cursor; 4],
    /// Per index: how fast its checkpoint moves.
    rates: [RateMeter; 4],
    output: String,
}

/// Table of cursors: index name → (running, checkpoint).
pub(super) type CursorTable<'txn> = Table<'txn, &'static str, (bool, u64)>;

impl Indexer {
    pub fn new(config: IndexConfig, cursors: [Cursor; 4]) -> Self {
        Indexer {
            config,
            cursors,
            rates: cursors.map(|cursor| RateMeter::new(cursor.checkpoint)),
            output: String::new(),
        }
    }

    pub fn load_cursors(table: &CursorTable) -> Result<[Cursor; 4], StoreError> {
        let mut cursors = [Cursor::default(); 4];
        for index in SystemIndex::ALL {
            if let Some(stored) = table.get(index.name())? {
                let (running, checkpoint) = stored.value();
                cursors[index.slot()] = Cursor {
                    running,
                    checkpoint,
                };
            }
        }
        Ok(cursors)
    }

    /// Whether some running index has events to catch up on.
    pub fn behind(&self, head: u64) -> bool {
        self.cursors
            .iter()
            .any(|cursor| cursor.running && cursor.checkpoint < head)
    }

    pub fn cursor_mut(&mut self, index: SystemIndex) -> &mut Cursor {
        &mut self.cursors[index.slot()]
    }

    pub fn progress(&mut self) -> [IndexProgress; 4] {
        for (rate, cursor) in self.rates.iter_mut().zip(&self.cursors) {
            rate.record(cursor.checkpoint);
        }
        std::array::from_fn(|slot| IndexProgress {
            running: self.cursors[slot].running,
            checkpoint: self.cursors[slot].checkpoint,
            rate: self.rates[slot],
        })
    }

    /// Indexes events from the lowest running checkpoint up to `head`, at most `limit` of them.
    pub fn advance(
        &mut self,
        tables: &mut IndexTables,
        next_stream_id: &mut u64,
        head: u64,
        limit: u64,
    ) -> Result<(), StoreError> {
        let Some(from) = self
            .cursors
            .iter()
            .filter(|cursor| cursor.running && cursor.checkpoint < head)
            .map(|cursor| cursor.checkpoint)
            .min()
        else {
            return Ok(());
        };
        let to = head.min(from.saturating_add(limit));
        let active: Vec<SystemIndex> = SystemIndex::ALL
            .into_iter()
            .filter(|index| self.cursors[index.slot()].running)
            .collect();
        let mut outputs = Outputs::default();
        let log = tables.log;
        for entry in log.range(from..to)? {
            let (position, bytes) = entry?;
            let position = position.value();
            let event = EventRecord::decode(bytes.value())?;
            if event.stream.starts_with('$') {
                continue;
            }
            for &index in &active {
                if self.cursors[index.slot()].checkpoint > position {
                    continue;
                }
                if index.output_stream(&event, &self.config, &mut self.output) {
                    outputs.add(tables, next_stream_id, &self.output, position)?;
                }
            }
        }
        outputs.flush(tables)?;
        for index in active {
            let cursor = &mut self.cursors[index.slot()];
            if cursor.checkpoint < to {
                cursor.checkpoint = to;
                tables
                    .cursors
                    .insert(index.name(), (cursor.running, cursor.checkpoint))?;
            }
        }
        Ok(())
    }

    /// Removes every output stream of `index` and rewinds it to position 0.
    pub fn reset(
        &mut self,
        index: SystemIndex,
        tables: &mut IndexTables,
    ) -> Result<(), StoreError> {
        let prefix = index.output_prefix();
        let mut outputs = Vec::new();
        for entry in tables.streams.range(prefix..)? {
            let (name, state) = entry?;
            if !name.value().starts_with(prefix) {
                break;
            }
            outputs.push((
                name.value().to_owned(),
                StreamState::decode(state.value())?.id,
            ));
        }
        for (name, id) in outputs {
            tables
                .links
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            tables.streams.remove(name.as_str())?;
        }
        let cursor = &mut self.cursors[index.slot()];
        cursor.checkpoint = 0;
        tables.cursors.insert(index.name(), (cursor.running, 0))?;
        self.rates[index.slot()] = RateMeter::new(0);
        Ok(())
    }
}

/// Starts or stops an index.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SetRunning {
    pub index: SystemIndex,
    pub running: bool,
}

impl Operation for SetRunning {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let writes = txn.write();
        let cursor = writes.log.indexer.cursor_mut(self.index);
        cursor.running = self.running;
        let stored = (cursor.running, cursor.checkpoint);
        writes
            .tables
            .index_cursors
            .insert(self.index.name(), stored)?;
        Ok(())
    }
}

/// Drops an index's output streams; it then rebuilds them from position 0.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Reset {
    pub index: SystemIndex,
}

impl Operation for Reset {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let writes = txn.write();
        writes
            .log
            .indexer
            .reset(self.index, &mut writes.tables.for_indexes())
    }
}

/// Replaces the indexes' configuration.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SetConfig {
    #[serde(with = "super::logged::as_json")]
    pub config: IndexConfig,
}

impl Operation for SetConfig {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        self.config.validate().map_err(StoreError::InvalidRequest)?;
        let writes = txn.write();
        set_index_config(&mut writes.log.indexer, writes.tables, &self.config)
    }
}

/// Stores `config` and resets the indexes whose output it changes.
pub(super) fn set_index_config(
    indexer: &mut Indexer,
    tables: &mut Tables,
    config: &IndexConfig,
) -> Result<(), StoreError> {
    config.validate().map_err(StoreError::InvalidRequest)?;
    let affected = indexer.config.affected_by(config);
    indexer.config = config.clone();
    let json = serde_json::to_vec(config).map_err(StoreError::storage)?;
    tables.settings.insert(INDEX_CONFIG, json.as_slice())?;
    for index in affected {
        indexer.reset(index, &mut tables.for_indexes())?;
    }
    Ok(())
}

/// The tables the indexes work on, borrowed from the writer's transaction.
pub(super) struct IndexTables<'a, 'txn> {
    pub log: &'a Table<'txn, u64, &'static [u8]>,
    pub streams: &'a mut Table<'txn, &'static str, &'static [u8]>,
    pub stream_index: &'a Table<'txn, (u64, u64), u64>,
    pub links: &'a mut Table<'txn, (u64, u64), &'static [u8]>,
    pub cursors: &'a mut CursorTable<'txn>,
}

/// An output stream being appended to in this transaction.
struct Output {
    id: u64,
    next_revision: u64,
    /// The positions of the stream's last, unfinished chunk, as stored in `links`.
    chunk: Vec<u8>,
}

/// Appends links to output streams, creating them on first use. Links are packed 64 to a
/// `links` row, and a row is written once per transaction (or when it fills), not per link.
#[derive(Default)]
pub(super) struct Outputs {
    streams: HashMap<String, Output>,
}

impl Outputs {
    pub(super) fn add(
        &mut self,
        tables: &mut IndexTables,
        next_stream_id: &mut u64,
        stream: &str,
        position: u64,
    ) -> Result<(), StoreError> {
        let output = match self.streams.get_mut(stream) {
            Some(output) => output,
            None => {
                let output = Self::open(tables, next_stream_id, stream)?;
                self.streams.entry(stream.to_owned()).or_insert(output)
            }
        };
        output.chunk.extend_from_slice(&position.to_le_bytes());
        output.next_revision += 1;
        if output.next_revision % LINKS_PER_CHUNK == 0 {
            let chunk = (output.next_revision - 1) / LINKS_PER_CHUNK;
            tables
                .links
                .insert((output.id, chunk), output.chunk.as_slice())?;
            output.chunk.clear();
        }
        Ok(())
    }

    fn open(
        tables: &mut IndexTables,
        next_stream_id: &mut u64,
        stream: &str,
    ) -> Result<Output, StoreError> {
        let state = load_stream(
            &*tables.streams,
            tables.stream_index,
            &*tables.links,
            stream,
        )?;
        let state = match state {
            Some(state) if state.links => state,
            // Metadata set before the first link made a plain stream: it becomes a links stream.
            Some(state) if state.next_revision == 0 => {
                let state = StreamState {
                    links: true,
                    ..state
                };
                tables.streams.insert(stream, state.encode().as_slice())?;
                state
            }
            Some(_) => {
                return Err(StoreError::Storage(format!(
                    "{stream} holds events of its own and cannot take links"
                )));
            }
            None => {
                let state = StreamState {
                    id: *next_stream_id,
                    links: true,
                    ..StreamState::default()
                };
                *next_stream_id += 1;
                tables.streams.insert(stream, state.encode().as_slice())?;
                state
            }
        };
        let mut chunk = Vec::with_capacity((LINKS_PER_CHUNK * 8) as usize);
        if state.next_revision % LINKS_PER_CHUNK != 0 {
            let key = (state.id, state.next_revision / LINKS_PER_CHUNK);
            if let Some(stored) = tables.links.get(key)? {
                chunk.extend_from_slice(stored.value());
            }
        }
        Ok(Output {
            id: state.id,
            next_revision: state.next_revision,
            chunk,
        })
    }

    /// Writes every unfinished chunk touched in this transaction.
    pub(super) fn flush(self, tables: &mut IndexTables) -> Result<(), StoreError> {
        for output in self.streams.values() {
            if !output.chunk.is_empty() {
                let chunk = output.next_revision / LINKS_PER_CHUNK;
                tables
                    .links
                    .insert((output.id, chunk), output.chunk.as_slice())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_eventstoredb() {
        let first = IndexConfig::default();
        assert_eq!(first.category("order-123"), Some("order"));
        assert_eq!(first.category("order-1-a"), Some("order"));
        assert_eq!(first.category("order"), None);
        assert_eq!(first.category("-order"), None);
        assert_eq!(first.category("$ce-order"), None);
        assert_eq!(first.category("order-"), Some("order"));
        let last = IndexConfig {
            category_position: CategoryPosition::Last,
            ..IndexConfig::default()
        };
        assert_eq!(last.category("order-1-a"), Some("order-1"));
        assert_eq!(last.category("order-123"), Some("order"));
        let underscore = IndexConfig {
            category_separator: "_".into(),
            ..IndexConfig::default()
        };
        assert_eq!(underscore.category("order_1-a"), Some("order"));
        assert_eq!(underscore.category("order-1"), None);
        let long = IndexConfig {
            category_separator: "::".into(),
            ..IndexConfig::default()
        };
        assert_eq!(long.category("billing::inv-7"), Some("billing"));
    }

    #[test]
    fn correlation_ids_are_read_from_the_configured_property() {
        let property = "$correlationId";
        assert_eq!(
            correlation_id(br#"{"$correlationId":"c-1"}"#, property).as_deref(),
            Some("c-1")
        );
        assert_eq!(
            correlation_id(
                br#"{"a":{"$correlationId":"nested"},"$correlationId":"top"}"#,
                property
            )
            .as_deref(),
            Some("top")
        );
        assert_eq!(
            correlation_id(br#"{"$correlationId":"with \"quote\""}"#, property).as_deref(),
            Some("with \"quote\"")
        );
        assert_eq!(correlation_id(br#"{"$correlationId":7}"#, property), None);
        assert_eq!(
            correlation_id(br#"{"$correlationId":null}"#, property),
            None
        );
        assert_eq!(correlation_id(br#"{"other":"c-1"}"#, property), None);
        assert_eq!(correlation_id(b"", property), None);
        assert_eq!(
            correlation_id(br#"{"corr":"x"}"#, "corr").as_deref(),
            Some("x")
        );
    }
}
