//! Writes to streams: appends (with expected revisions and idempotent re-sends), metadata and
//! deletes, as writer operations, plus the same appends and deletes for the other domains
//! (projections emit, rebuilds reconcile) to call once they write.

use redb::ReadableTable;

use super::indexes::Outputs;
use super::record::{EventRecord, StreamState};
use super::writer::{Operation, Tables, Txn, Writes};
use super::{
    AppendOutcome, CLIENT_STREAMS, ExpectedRevision, NewEvent, StoreError, StreamMetadata,
};

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Append {
    pub stream: String,
    pub expected: ExpectedRevision,
    pub events: Vec<NewEvent>,
}

impl Operation for Append {
    type Output = AppendOutcome;

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<AppendOutcome, StoreError> {
        match check_append(txn.tables(), &self.stream, self.expected, &self.events)? {
            Checked::Resent(outcome) => Ok(outcome),
            Checked::New(target) => txn
                .write()
                .append_checked(&self.stream, &self.events, target),
        }
    }

    fn payload_bytes(&self) -> usize {
        self.events.iter().map(NewEvent::size).sum()
    }

    fn is_append(&self) -> bool {
        true
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SetMetadata {
    pub stream: String,
    #[serde(with = "super::logged::as_json")]
    pub metadata: StreamMetadata,
}

impl Operation for SetMetadata {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let state = txn.tables().stream_state(&self.stream)?;
        if state.as_ref().is_some_and(|state| state.tombstoned) {
            return Err(StoreError::StreamDeleted(self.stream.clone()));
        }
        let metadata = serde_json::to_vec(&self.metadata).map_err(StoreError::storage)?;
        let mut writes = txn.write();
        let mut state = match state {
            Some(state) => state,
            None => writes.new_stream()?,
        };
        state.metadata = metadata;
        writes
            .tables
            .streams
            .insert(self.stream.as_str(), state.encode().as_slice())?;
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Delete {
    pub stream: String,
    pub expected: ExpectedRevision,
    pub hard: bool,
}

impl Operation for Delete {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let state = check_delete(txn.tables(), &self.stream, self.expected, self.hard)?;
        txn.write().delete_checked(&self.stream, state, self.hard)
    }
}

/// Where a checked append goes.
pub(super) enum Checked {
    /// The same events were appended there before: the original outcome, nothing to write.
    Resent(AppendOutcome),
    /// New events for this stream (`None`: a stream that does not exist yet).
    New(Option<StreamState>),
}

/// Everything that can refuse an append, without writing.
pub(super) fn check_append(
    tables: &Tables,
    stream: &str,
    expected: ExpectedRevision,
    events: &[NewEvent],
) -> Result<Checked, StoreError> {
    if events.is_empty() {
        return Err(StoreError::InvalidRequest(
            "an append needs at least one event".into(),
        ));
    }
    reject_repeated_ids(events)?;
    let state = tables.stream_state(stream)?;
    if let Some(state) = &state {
        if state.tombstoned {
            return Err(StoreError::StreamDeleted(stream.to_owned()));
        }
        if state.links {
            return Err(StoreError::InvalidRequest(format!(
                "{stream} is a stream of links a projection writes; it takes no events"
            )));
        }
        if let Some(outcome) = resent(tables, state, expected, events)? {
            return Ok(Checked::Resent(outcome));
        }
    }
    let current = state.as_ref().and_then(StreamState::current_revision);
    if !expected.admits(current) {
        return Err(StoreError::WrongExpectedRevision {
            expected,
            actual: current,
        });
    }
    Ok(Checked::New(state))
}

/// Everything that can refuse a delete, without writing; the stream's state when it exists.
pub(super) fn check_delete(
    tables: &Tables,
    stream: &str,
    expected: ExpectedRevision,
    hard: bool,
) -> Result<Option<StreamState>, StoreError> {
    let state = tables.stream_state(stream)?;
    if state.as_ref().is_some_and(|state| state.tombstoned) {
        return Err(StoreError::StreamDeleted(stream.to_owned()));
    }
    let current = state.as_ref().and_then(StreamState::current_revision);
    if !expected.admits(current) {
        return Err(StoreError::WrongExpectedRevision {
            expected,
            actual: current,
        });
    }
    if !hard && current.is_none() {
        return Err(StoreError::StreamNotFound(stream.to_owned()));
    }
    Ok(state)
}

impl Writes<'_, '_> {
    /// Checks and writes an append, for an operation that is already writing.
    pub fn append(
        &mut self,
        stream: &str,
        expected: ExpectedRevision,
        events: &[NewEvent],
    ) -> Result<AppendOutcome, StoreError> {
        match check_append(self.tables, stream, expected, events)? {
            Checked::Resent(outcome) => Ok(outcome),
            Checked::New(target) => self.append_checked(stream, events, target),
        }
    }

    /// Writes an append that [`check_append`] admitted.
    fn append_checked(
        &mut self,
        stream: &str,
        events: &[NewEvent],
        target: Option<StreamState>,
    ) -> Result<AppendOutcome, StoreError> {
        // The state row changes only for a new stream or one coming back from a soft delete.
        let (state, rewrite_state) = match target {
            Some(state) if state.soft_deleted => (
                StreamState {
                    soft_deleted: false,
                    ..state
                },
                true,
            ),
            Some(state) => (state, false),
            None => (self.new_stream()?, true),
        };
        let first_revision = state.next_revision;
        let first_position = self.log.next_position;
        let now_ms = self.log.now_ms;
        for (offset, event) in (0u64..).zip(events) {
            let revision = first_revision + offset;
            let position = first_position + offset;
            let buffer = &mut self.log.record_buffer;
            buffer.clear();
            EventRecord {
                stream,
                revision,
                created_ms: now_ms,
                id: event.id,
                event_type: &event.event_type,
                metadata: &event.metadata,
                data: &event.data,
                binary: event.binary,
            }
            .encode_into(buffer);
            self.tables.log.insert(position, buffer.as_slice())?;
            self.tables
                .stream_index
                .insert((state.id, revision), position)?;
        }
        let count = events.len() as u64;
        if rewrite_state {
            self.tables
                .streams
                .insert(stream, state.encode().as_slice())?;
        }
        self.log.next_position += count;
        Ok(AppendOutcome {
            first_revision,
            last_revision: first_revision + count - 1,
            first_position,
            last_position: first_position + count - 1,
        })
    }

    /// Checks and writes a delete, for an operation that is already writing.
    pub fn delete(
        &mut self,
        stream: &str,
        expected: ExpectedRevision,
        hard: bool,
    ) -> Result<(), StoreError> {
        let state = check_delete(self.tables, stream, expected, hard)?;
        self.delete_checked(stream, state, hard)
    }

    fn delete_checked(
        &mut self,
        stream: &str,
        state: Option<StreamState>,
        hard: bool,
    ) -> Result<(), StoreError> {
        let mut state = match state {
            Some(state) => state,
            None => self.new_stream()?,
        };
        if hard {
            state.tombstoned = true;
        } else {
            state.soft_deleted = true;
            state.deleted_before = state.next_revision;
        }
        self.tables
            .streams
            .insert(stream, state.encode().as_slice())?;
        Ok(())
    }

    /// Appends links (stream of links, linked position), in order.
    pub fn write_links<'s>(
        &mut self,
        links: impl IntoIterator<Item = (&'s str, u64)>,
    ) -> Result<(), StoreError> {
        let mut outputs = Outputs::default();
        let mut tables = self.tables.for_indexes();
        for (stream, position) in links {
            outputs.add(&mut tables, &mut self.log.next_stream_id, stream, position)?;
        }
        outputs.flush(&mut tables)
    }

    /// Removes a stream of links and every link in it; a stream of events is left alone.
    pub fn remove_links_stream(&mut self, stream: &str) -> Result<(), StoreError> {
        if let Some(state) = self.tables.stream_state(stream)?
            && state.links
        {
            let id = state.id;
            self.tables
                .links
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            self.tables.streams.remove(stream)?;
        }
        Ok(())
    }

    /// A stream created by a client's write (the indexes create their output streams).
    fn new_stream(&mut self) -> Result<StreamState, StoreError> {
        let created = self
            .tables
            .meta
            .get(CLIENT_STREAMS)?
            .map_or(0, |count| count.value());
        self.tables.meta.insert(CLIENT_STREAMS, created + 1)?;
        let id = self.log.next_stream_id;
        self.log.next_stream_id += 1;
        Ok(StreamState {
            id,
            ..StreamState::default()
        })
    }
}

fn reject_repeated_ids(events: &[NewEvent]) -> Result<(), StoreError> {
    if events.len() < 2 {
        return Ok(());
    }
    let mut ids: Vec<u128> = events.iter().map(|event| event.id.as_u128()).collect();
    ids.sort_unstable();
    match ids.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(StoreError::InvalidRequest(format!(
            "event id {} appears twice in one append",
            uuid::Uuid::from_u128(pair[0])
        ))),
        None => Ok(()),
    }
}

/// Recognises a re-sent append: the same event ids already stored, in order, at the place this
/// append targets: right after the expected revision, or for `any` and `stream_exists` at the
/// end of the stream. Returns the original outcome; `None` means "not a re-send".
fn resent(
    tables: &Tables,
    state: &StreamState,
    expected: ExpectedRevision,
    events: &[NewEvent],
) -> Result<Option<AppendOutcome>, StoreError> {
    let count = events.len() as u64;
    let first_revision = match expected {
        ExpectedRevision::Exact(revision) => revision.checked_add(1),
        ExpectedRevision::NoStream => Some(state.deleted_before),
        ExpectedRevision::Any | ExpectedRevision::StreamExists => {
            state.next_revision.checked_sub(count)
        }
    };
    // Deleted events are gone: sending their ids again appends anew.
    let Some(first_revision) = first_revision.filter(|first| *first >= state.deleted_before) else {
        return Ok(None);
    };
    let last_revision = first_revision.saturating_add(count - 1);
    if last_revision >= state.next_revision {
        return Ok(None);
    }
    // The last event first: for an ordinary append that is the only lookup.
    let mut positions = vec![0; events.len()];
    for (index, event) in events.iter().enumerate().rev() {
        let revision = first_revision + index as u64;
        let Some(position) = tables.stream_index.get((state.id, revision))? else {
            return Ok(None);
        };
        let position = position.value();
        let stored = tables
            .log
            .get(position)?
            .ok_or_else(|| StoreError::Storage(format!("log entry {position} is missing")))?;
        if EventRecord::decode(stored.value())?.id != event.id {
            return Ok(None);
        }
        positions[index] = position;
    }
    Ok(Some(AppendOutcome {
        first_revision,
        last_revision,
        first_position: positions[0],
        last_position: positions[events.len() - 1],
    }))
}
