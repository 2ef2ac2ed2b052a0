//! Reads of streams and of `$all` from a committed snapshot (a redb read transaction).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{AccessGuard, ReadOnlyTable, ReadTransaction, ReadableTable};

use super::record::{EventRecord, StreamState};
use super::{
    Direction, LINKS, LINKS_PER_CHUNK, LOG, LinkInfo, RecordedEvent, STREAM_INDEX, STREAMS,
    StoreError, StreamMetadata, load_stream,
};

/// Most log records one `$all` read looks at, so a filter that matches little cannot make one
/// request scan the whole log; the caller continues from `next`.
const MAX_SCAN: usize = 100_000;

/// One page of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slice {
    pub events: Vec<RecordedEvent>,
    /// The stream's last revision (for `$all`, the last position), `None` when empty.
    pub last_revision: Option<u64>,
    /// Where to continue reading in the same direction, `None` at the end.
    pub next: Option<u64>,
    /// For forward reads: the revision (or position) after everything this read looked at,
    /// including hidden entries. A live reader continues from here.
    pub cursor: u64,
}

/// Which `$all` records a read returns. Prefix lists are alternatives; empty lists match all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllFilter {
    pub stream_prefixes: Vec<String>,
    pub type_prefixes: Vec<String>,
    /// Also return records of `$`-streams.
    pub include_system: bool,
}

impl AllFilter {
    pub fn matches(&self, stream: &str, event_type: &str) -> bool {
        (self.include_system || !stream.starts_with('$'))
            && (self.stream_prefixes.is_empty()
                || self
                    .stream_prefixes
                    .iter()
                    .any(|prefix| stream.starts_with(prefix.as_str())))
            && (self.type_prefixes.is_empty()
                || self
                    .type_prefixes
                    .iter()
                    .any(|prefix| event_type.starts_with(prefix.as_str())))
    }
}

/// The tables a stream read uses, opened once per read.
pub(super) struct ReadTables {
    log: ReadOnlyTable<u64, &'static [u8]>,
    streams: ReadOnlyTable<&'static str, &'static [u8]>,
    index: ReadOnlyTable<(u64, u64), u64>,
    links: ReadOnlyTable<(u64, u64), &'static [u8]>,
}

impl ReadTables {
    pub(super) fn open(txn: &ReadTransaction) -> Result<Self, StoreError> {
        Ok(ReadTables {
            log: txn.open_table(LOG)?,
            streams: txn.open_table(STREAMS)?,
            index: txn.open_table(STREAM_INDEX)?,
            links: txn.open_table(LINKS)?,
        })
    }

    pub(super) fn stream_state(&self, stream: &str) -> Result<Option<StreamState>, StoreError> {
        load_stream(&self.streams, &self.index, &self.links, stream)
    }
}

pub(super) fn parse_metadata(bytes: &[u8]) -> Result<StreamMetadata, StoreError> {
    if bytes.is_empty() {
        return Ok(StreamMetadata::default());
    }
    serde_json::from_slice(bytes).map_err(StoreError::storage)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Which revisions of a stream a reader may see, after deletes, truncation and expiry.
#[derive(Debug, Clone, Copy)]
struct Visibility {
    first_revision: u64,
    /// `None` when the stream currently has nothing to show (deleted, never written).
    last_revision: Option<u64>,
    min_created_ms: Option<i64>,
}

impl Visibility {
    fn of(state: &StreamState, now_ms: i64) -> Result<Self, StoreError> {
        let metadata = parse_metadata(&state.metadata)?;
        let by_count = metadata
            .max_count
            .map_or(0, |count| state.next_revision.saturating_sub(count));
        let first_revision = state
            .deleted_before
            .max(metadata.truncate_before.unwrap_or(0))
            .max(by_count);
        let last_revision = if state.tombstoned || state.soft_deleted {
            None
        } else {
            state.last_revision()
        };
        let min_created_ms = metadata.max_age_seconds.map(|seconds| {
            let max_age_ms = i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
            now_ms.saturating_sub(max_age_ms)
        });
        Ok(Visibility {
            first_revision,
            last_revision,
            min_created_ms,
        })
    }

    fn shows(&self, revision: u64, created_ms: i64) -> bool {
        revision >= self.first_revision
            && self.last_revision.is_some_and(|last| revision <= last)
            && self.min_created_ms.is_none_or(|min| created_ms >= min)
    }
}

pub(super) fn read_stream(
    tables: &ReadTables,
    stream: &str,
    from: Option<u64>,
    direction: Direction,
    limit: usize,
    resolve_links: bool,
) -> Result<Slice, StoreError> {
    let state = tables
        .stream_state(stream)?
        .ok_or_else(|| StoreError::StreamNotFound(stream.to_owned()))?;
    if state.tombstoned {
        return Err(StoreError::StreamDeleted(stream.to_owned()));
    }
    let Some(last) = state.current_revision() else {
        return Err(StoreError::StreamNotFound(stream.to_owned()));
    };
    let now_ms = now_ms();
    let visibility = Visibility::of(&state, now_ms)?;
    let first = visibility.first_revision;
    let mut reader = EventReader::new(tables, resolve_links, now_ms);
    let mut slice = Slice {
        last_revision: Some(last),
        ..Slice::default()
    };
    let mut take = |revision: u64, position: u64, slice: &mut Slice| -> Result<bool, StoreError> {
        if let Some(event) = reader.load(stream, revision, position, &visibility)? {
            slice.events.push(event);
        }
        Ok(slice.events.len() < limit)
    };
    match direction {
        Direction::Forward => {
            let start = from.unwrap_or(0).max(first);
            slice.cursor = start;
            for_each_entry(
                tables,
                &state,
                start,
                last,
                direction,
                |revision, position| {
                    slice.cursor = revision + 1;
                    take(revision, position, &mut slice)
                },
            )?;
            slice.next = (slice.cursor <= last).then_some(slice.cursor);
        }
        Direction::Backward => {
            let start = from.unwrap_or(last).min(last);
            let mut lowest_scanned = None;
            for_each_entry(
                tables,
                &state,
                first,
                start,
                direction,
                |revision, position| {
                    lowest_scanned = Some(revision);
                    take(revision, position, &mut slice)
                },
            )?;
            slice.next = lowest_scanned
                .filter(|revision| *revision > first)
                .map(|r| r - 1);
            slice.cursor = last + 1;
        }
    }
    Ok(slice)
}

/// Calls `visit` with (revision, position) for each entry of a stream with a revision in
/// `first..=last`, in `direction` order, until it returns `false`.
fn for_each_entry(
    tables: &ReadTables,
    state: &StreamState,
    first: u64,
    last: u64,
    direction: Direction,
    mut visit: impl FnMut(u64, u64) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    if first > last {
        return Ok(());
    }
    if !state.links {
        let entries = tables.index.range((state.id, first)..=(state.id, last))?;
        type Entry<'a> = (AccessGuard<'a, (u64, u64)>, AccessGuard<'a, u64>);
        let mut visit_entry = |entry: Result<Entry, redb::StorageError>| {
            let (key, position) = entry?;
            visit(key.value().1, position.value())
        };
        match direction {
            Direction::Forward => {
                for entry in entries {
                    if !visit_entry(entry)? {
                        break;
                    }
                }
            }
            Direction::Backward => {
                for entry in entries.rev() {
                    if !visit_entry(entry)? {
                        break;
                    }
                }
            }
        }
        return Ok(());
    }
    let chunks = tables
        .links
        .range((state.id, first / LINKS_PER_CHUNK)..=(state.id, last / LINKS_PER_CHUNK))?;
    let mut visit_chunk = |chunk: u64, positions: &[u8]| -> Result<bool, StoreError> {
        let base = chunk * LINKS_PER_CHUNK;
        let mut entries = positions
            .chunks_exact(8)
            .enumerate()
            .map(|(offset, position)| (base + offset as u64, position));
        let mut visit_one = |(revision, position): (u64, &[u8])| -> Result<bool, StoreError> {
            if revision < first || revision > last {
                return Ok(true);
            }
            visit(
                revision,
                u64::from_le_bytes(position.try_into().expect("8 bytes")),
            )
        };
        match direction {
            Direction::Forward => {
                for entry in entries.by_ref() {
                    if !visit_one(entry)? {
                        return Ok(false);
                    }
                }
            }
            Direction::Backward => {
                for entry in entries.rev() {
                    if !visit_one(entry)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    };
    match direction {
        Direction::Forward => {
            for chunk in chunks {
                let (key, positions) = chunk?;
                if !visit_chunk(key.value().1, positions.value())? {
                    break;
                }
            }
        }
        Direction::Backward => {
            for chunk in chunks.rev() {
                let (key, positions) = chunk?;
                if !visit_chunk(key.value().1, positions.value())? {
                    break;
                }
            }
        }
    }
    Ok(())
}

pub(super) fn read_all(
    txn: &ReadTransaction,
    from: Option<u64>,
    direction: Direction,
    limit: usize,
    filter: &AllFilter,
) -> Result<Slice, StoreError> {
    let log = txn.open_table(LOG)?;
    let Some(last) = log.last()?.map(|(position, _)| position.value()) else {
        return Ok(Slice {
            cursor: from.unwrap_or(0),
            ..Slice::default()
        });
    };
    let mut slice = Slice {
        last_revision: Some(last),
        ..Slice::default()
    };
    let mut scanned = 0;
    let mut take = |position: u64, bytes: &[u8], slice: &mut Slice| -> Result<bool, StoreError> {
        scanned += 1;
        let record = EventRecord::decode(bytes)?;
        if filter.matches(record.stream, record.event_type) {
            slice.events.push(recorded(&record, position, None));
        }
        Ok(slice.events.len() < limit && scanned < MAX_SCAN)
    };
    match direction {
        Direction::Forward => {
            let start = from.unwrap_or(0);
            slice.cursor = start;
            if start <= last {
                for entry in log.range(start..=last)? {
                    let (position, bytes) = entry?;
                    slice.cursor = position.value() + 1;
                    if !take(position.value(), bytes.value(), &mut slice)? {
                        break;
                    }
                }
            }
            slice.next = (slice.cursor <= last).then_some(slice.cursor);
        }
        Direction::Backward => {
            let start = from.unwrap_or(last).min(last);
            let mut lowest_scanned = None;
            for entry in log.range(..=start)?.rev() {
                let (position, bytes) = entry?;
                lowest_scanned = Some(position.value());
                if !take(position.value(), bytes.value(), &mut slice)? {
                    break;
                }
            }
            slice.next = lowest_scanned
                .filter(|position| *position > 0)
                .map(|p| p - 1);
            slice.cursor = last + 1;
        }
    }
    Ok(slice)
}

fn recorded(record: &EventRecord, position: u64, link: Option<LinkInfo>) -> RecordedEvent {
    RecordedEvent {
        stream: record.stream.to_owned(),
        revision: record.revision,
        position,
        id: record.id,
        event_type: record.event_type.to_owned(),
        data: record.data.to_vec(),
        binary: record.binary,
        metadata: record.metadata.to_vec(),
        created_ms: record.created_ms,
        link,
    }
}

/// Loads the events a stream's index points at, resolving links into other streams.
struct EventReader<'a> {
    tables: &'a ReadTables,
    resolve_links: bool,
    now_ms: i64,
    /// Visibility of the streams that links of this read point into.
    linked_streams: HashMap<String, Visibility>,
}

impl<'a> EventReader<'a> {
    fn new(tables: &'a ReadTables, resolve_links: bool, now_ms: i64) -> Self {
        EventReader {
            tables,
            resolve_links,
            now_ms,
            linked_streams: HashMap::new(),
        }
    }

    /// The event at `revision` of `stream` (stored at `position`), or `None` when hidden.
    fn load(
        &mut self,
        stream: &str,
        revision: u64,
        position: u64,
        visibility: &Visibility,
    ) -> Result<Option<RecordedEvent>, StoreError> {
        let bytes = self
            .tables
            .log
            .get(position)?
            .ok_or_else(|| StoreError::Storage(format!("log entry {position} is missing")))?;
        let record = EventRecord::decode(bytes.value())?;
        if !visibility.shows(revision, record.created_ms) {
            return Ok(None);
        }
        if record.stream == stream {
            return Ok(Some(recorded(&record, position, None)));
        }
        if !self.resolve_links {
            return Ok(Some(RecordedEvent {
                stream: stream.to_owned(),
                revision,
                position,
                id: record.id,
                event_type: "$>".to_owned(),
                data: serde_json::to_vec(&format!("{}@{}", record.revision, record.stream))
                    .expect("a string serialises"),
                binary: false,
                metadata: Vec::new(),
                created_ms: record.created_ms,
                link: None,
            }));
        }
        // A link shows its target only while the target itself is readable in its own stream.
        if !self
            .linked_stream(record.stream)?
            .shows(record.revision, record.created_ms)
        {
            return Ok(None);
        }
        let link = LinkInfo {
            stream: stream.to_owned(),
            revision,
        };
        Ok(Some(recorded(&record, position, Some(link))))
    }

    fn linked_stream(&mut self, stream: &str) -> Result<Visibility, StoreError> {
        if let Some(visibility) = self.linked_streams.get(stream) {
            return Ok(*visibility);
        }
        let visibility = match self.tables.stream_state(stream)? {
            Some(state) => Visibility::of(&state, self.now_ms)?,
            None => Visibility {
                first_revision: 0,
                last_revision: None,
                min_created_ms: None,
            },
        };
        self.linked_streams.insert(stream.to_owned(), visibility);
        Ok(visibility)
    }
}
