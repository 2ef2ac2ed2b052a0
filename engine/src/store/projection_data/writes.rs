//! Projections' writer operations: definitions, removal, and batches whose effects commit with
//! their checkpoint.

use std::collections::HashSet;

use redb::ReadableTable;

use super::{DataChange, ProjectionCommit, ProjectionTables, StoredProjection, parked_stream};
use crate::names::Name;
use crate::store::record::EventRecord;
use crate::store::writer::{Operation, Tables, Txn, Writes};
use crate::store::{ExpectedRevision, NewEvent, StoreError};

/// Creates or replaces a projection's definition; answers the id its data lives under.
#[derive(serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct SaveProjection {
    pub name: String,
    pub component: String,
    #[serde(with = "crate::store::logged::as_json")]
    pub definition: serde_json::Value,
    /// The component's bytes, when it may not be stored yet.
    pub component_bytes: Option<Vec<u8>>,
    pub data: DataChange,
}

impl Operation for SaveProjection {
    type Output = u64;

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<u64, StoreError> {
        let projections = txn.tables().projections()?;
        let stored_component = projections
            .components
            .get(self.component.as_str())?
            .is_some();
        if !stored_component && self.component_bytes.is_none() {
            return Err(StoreError::InvalidRequest(format!(
                "component {} is not stored",
                self.component
            )));
        }
        let existing = projections.load(&self.name)?;
        let mut writes = txn.write();
        let data = match (self.data, &existing) {
            (DataChange::Keep, Some(existing)) => existing.data,
            (DataChange::Keep, None) | (DataChange::Fresh { .. }, _) => {
                if let Some(existing) = &existing {
                    let outputs = writes.tables.projections_mut()?.drop_data(existing.data)?;
                    if self.data
                        == (DataChange::Fresh {
                            delete_outputs: true,
                        })
                    {
                        writes.delete_outputs(&self.name, outputs)?;
                    }
                    // The parked events' reasons went with the data.
                    writes.remove_links_stream(&parked_stream(&self.name))?;
                }
                writes.new_data()?
            }
        };
        let projections = writes.tables.projections_mut()?;
        if let (false, Some(bytes)) = (stored_component, &self.component_bytes) {
            projections
                .components
                .insert(self.component.as_str(), bytes.as_slice())?;
        }
        let stored = StoredProjection {
            data,
            component: self.component.clone(),
            definition: self.definition.clone(),
            building: existing.and_then(|existing| existing.building),
        };
        projections.save(&self.name, &stored)?;
        projections.collect_components()?;
        Ok(data)
    }

    fn payload_bytes(&self) -> usize {
        self.component_bytes.as_ref().map_or(0, Vec::len)
    }
}

/// Removes a projection and its data; with `delete_outputs` also the streams it wrote.
#[derive(serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct RemoveProjection {
    pub name: String,
    pub delete_outputs: bool,
}

impl Operation for RemoveProjection {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let Some(existing) = txn.tables().projections()?.load(&self.name)? else {
            return Err(StoreError::InvalidRequest(format!(
                "no projection is named {:?}",
                self.name
            )));
        };
        let mut writes = txn.write();
        let projections = writes.tables.projections_mut()?;
        let outputs = projections.drop_data(existing.data)?;
        if let Some(building) = existing.building {
            projections.drop_data(building.data)?;
        }
        projections.projections.remove(self.name.as_str())?;
        projections.collect_components()?;
        if self.delete_outputs {
            writes.delete_outputs(&self.name, outputs)?;
        }
        writes.remove_links_stream(&parked_stream(&self.name))?;
        // The streams it kept stay (unless deleted above), owned by nobody.
        writes.tables.projections_mut()?.release_all(&self.name)?;
        Ok(())
    }
}

/// A projection's batch: its effects and checkpoint, all or nothing.
#[derive(serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct CommitProjection {
    pub commit: ProjectionCommit,
}

impl Operation for CommitProjection {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let commit = &self.commit;
        match txn.tables().projections()?.checkpoints.get(commit.data)? {
            Some(stored) if stored.value().0 == commit.from => {}
            Some(_) => {
                return Err(StoreError::InvalidRequest(
                    "the projection's checkpoint moved on; the batch is discarded".into(),
                ));
            }
            None => {
                return Err(StoreError::InvalidRequest(
                    "the projection was reset or deleted; the batch is discarded".into(),
                ));
            }
        }
        check_outputs(txn.tables(), txn.log().next_position, commit)?;
        if let Some(parked) = commit
            .parked
            .iter()
            .find(|parked| parked.position >= commit.checkpoint.position)
        {
            return Err(StoreError::InvalidRequest(format!(
                "cannot park position {}: the batch ends before it",
                parked.position
            )));
        }
        let mut writes = txn.write();
        if commit.shadow {
            write_shadow(writes.tables.projections_mut()?, commit)?;
        } else {
            writes.write_outputs(commit)?;
            writes.write_parked(commit)?;
        }
        let projections = writes.tables.projections_mut()?;
        let data = commit.data;
        for parked in &commit.parked {
            projections
                .parked
                .insert((data, parked.position), parked.reason.as_slice())?;
            if let Some(partition) = &parked.holds {
                projections
                    .held
                    .insert((data, partition.as_str()), parked.position)?;
            }
        }
        for (partition, state) in &commit.states {
            projections
                .states
                .insert((data, partition.as_str()), state.as_slice())?;
        }
        for ((table, key), row) in &commit.rows {
            match row {
                Some(row) => {
                    projections
                        .rows
                        .insert((data, table.as_str(), key.as_str()), row.as_slice())?;
                }
                None => {
                    projections
                        .rows
                        .remove((data, table.as_str(), key.as_str()))?;
                }
            }
        }
        let checkpoint = commit.checkpoint;
        projections.checkpoints.insert(
            data,
            (
                checkpoint.position,
                checkpoint.events_processed,
                checkpoint.events_emitted,
            ),
        )?;
        Ok(())
    }

    fn payload_bytes(&self) -> usize {
        self.commit.payload_bytes()
    }

    /// A batch without emitted events needs no fsync of its own: its effects and checkpoint
    /// commit together, so a crash merely rewinds it and it replays to the same result. A
    /// rebuild's emits wait in the shadow tables, which replay as the state does.
    fn needs_fsync(&self) -> bool {
        !self.commit.shadow && !self.commit.emits.is_empty()
    }
}

/// Sets aside the event a projection faulted at, by hand: it is linked from the parked stream
/// with `reason`, and the checkpoint moves past it. Answers the new checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
pub(in crate::store) struct SkipEvent {
    pub projection: String,
    pub data: u64,
    pub position: u64,
    pub reason: Vec<u8>,
}

impl Operation for SkipEvent {
    type Output = super::Checkpoint;

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<super::Checkpoint, StoreError> {
        let stored = txn.tables().projections()?.checkpoints.get(self.data)?;
        let Some((position, events_processed, events_emitted)) =
            stored.map(|stored| stored.value())
        else {
            return Err(StoreError::InvalidRequest(
                "the projection was reset or deleted".into(),
            ));
        };
        if position != self.position {
            return Err(StoreError::InvalidRequest(format!(
                "the projection is at position {position}, not {}: only the event it stopped at \
                 can be skipped",
                self.position
            )));
        }
        let next = super::Checkpoint {
            position: position + 1,
            events_processed,
            events_emitted,
        };
        let stream = parked_stream(&self.projection);
        let mut writes = txn.write();
        writes.write_links([(stream.as_str(), self.position)])?;
        let projections = writes.tables.projections_mut()?;
        projections
            .outputs
            .insert((self.data, stream.as_str()), true)?;
        projections
            .parked
            .insert((self.data, self.position), self.reason.as_slice())?;
        projections
            .checkpoints
            .insert(self.data, (next.position, events_processed, events_emitted))?;
        Ok(next)
    }
}

/// Checks that every emitted event and link of a batch can be written.
fn check_outputs(
    tables: &Tables,
    next_position: u64,
    commit: &ProjectionCommit,
) -> Result<(), StoreError> {
    let linked: HashSet<&str> = commit
        .links
        .iter()
        .map(|(stream, _)| stream.as_str())
        .collect();
    let invalid = |message: String| Err(StoreError::InvalidRequest(message));
    for (stream, _) in &commit.emits {
        Name::Stream
            .check(stream)
            .map_err(StoreError::InvalidRequest)?;
        if stream.starts_with('$') {
            return invalid(format!(
                "cannot emit to {stream}: $-streams belong to the system"
            ));
        }
        if linked.contains(stream.as_str()) {
            return invalid(format!("cannot both emit and link to {stream}"));
        }
        check_emit_target(tables, stream)?;
        check_owner(tables, &commit.projection, stream)?;
    }
    for (stream, position) in &commit.links {
        Name::Stream
            .check(stream)
            .map_err(StoreError::InvalidRequest)?;
        if stream.starts_with('$') {
            return invalid(format!(
                "cannot link to {stream}: $-streams belong to the system"
            ));
        }
        if *position >= next_position {
            return invalid(format!(
                "cannot link to position {position}: there is no such event"
            ));
        }
        check_link_target(tables, stream)?;
        check_owner(tables, &commit.projection, stream)?;
    }
    Ok(())
}

/// A projection writes only to streams no other projection owns.
pub(super) fn check_owner(
    tables: &Tables,
    projection: &str,
    stream: &str,
) -> Result<(), StoreError> {
    match tables.projections()?.owner(stream)? {
        Some(owner) if owner != projection => Err(StoreError::InvalidRequest(format!(
            "cannot write to {stream}: it belongs to projection {owner}"
        ))),
        _ => Ok(()),
    }
}

/// A stream can take emitted events unless it was tombstoned or holds links.
pub(super) fn check_emit_target(tables: &Tables, stream: &str) -> Result<(), StoreError> {
    if let Some(state) = tables.stream_state(stream)? {
        if state.tombstoned {
            return Err(StoreError::InvalidRequest(format!(
                "cannot emit to {stream}: it was deleted permanently"
            )));
        }
        if state.links {
            return Err(StoreError::InvalidRequest(format!(
                "cannot emit to {stream}: it is a stream of links"
            )));
        }
    }
    Ok(())
}

/// A stream can take links unless it holds events of its own (or held them: a tombstone).
pub(super) fn check_link_target(tables: &Tables, stream: &str) -> Result<(), StoreError> {
    if let Some(state) = tables.stream_state(stream)?
        && !state.links
        && (state.next_revision > 0 || state.tombstoned)
    {
        return Err(StoreError::InvalidRequest(format!(
            "cannot link to {stream}: it holds events of its own"
        )));
    }
    Ok(())
}

/// A rebuild's emitted events and links, held until the switch.
fn write_shadow(
    projections: &mut ProjectionTables,
    commit: &ProjectionCommit,
) -> Result<(), StoreError> {
    let data = commit.data;
    let first = commit.checkpoint.events_emitted - commit.emits.len() as u64;
    let mut encoded = Vec::new();
    for (sequence, (stream, event)) in (first..).zip(&commit.emits) {
        encoded.clear();
        shadow_record(stream, event).encode_into(&mut encoded);
        projections
            .shadow_events
            .insert((data, sequence), encoded.as_slice())?;
    }
    let next = projections
        .shadow_links
        .range((data, 0)..(data + 1, 0))?
        .next_back()
        .transpose()?
        .map_or(0, |(key, _)| key.value().1 + 1);
    let parked = parked_stream(&commit.projection);
    let links = commit
        .links
        .iter()
        .map(|(stream, position)| (stream.as_str(), *position))
        .chain(
            commit
                .parked
                .iter()
                .map(|event| (parked.as_str(), event.position)),
        );
    for (sequence, (stream, position)) in (next..).zip(links) {
        projections
            .shadow_links
            .insert((data, sequence), (stream, position))?;
    }
    Ok(())
}

/// An emitted event as the shadow table keeps it: the log's record layout, with the target
/// stream and no revision or time yet.
fn shadow_record<'a>(stream: &'a str, event: &'a NewEvent) -> EventRecord<'a> {
    EventRecord {
        stream,
        revision: 0,
        created_ms: 0,
        id: event.id,
        event_type: &event.event_type,
        metadata: &event.metadata,
        data: &event.data,
        binary: event.binary,
    }
}

impl Writes<'_, '_> {
    /// A fresh data id with an empty checkpoint.
    pub(super) fn new_data(&mut self) -> Result<u64, StoreError> {
        let id = self
            .tables
            .meta
            .get(super::NEXT_DATA_ID)?
            .map_or(0, |id| id.value());
        self.tables.meta.insert(super::NEXT_DATA_ID, id + 1)?;
        self.tables
            .projections_mut()?
            .checkpoints
            .insert(id, (0, 0, 0))?;
        Ok(id)
    }

    /// A live batch's emitted events and links, into their streams.
    fn write_outputs(&mut self, commit: &ProjectionCommit) -> Result<(), StoreError> {
        let data = commit.data;
        // Consecutive events to one stream are one append.
        let mut rest = commit.emits.as_slice();
        while let Some((stream, _)) = rest.first() {
            let run = rest.iter().take_while(|(to, _)| to == stream).count();
            let events: Vec<NewEvent> =
                rest[..run].iter().map(|(_, event)| event.clone()).collect();
            self.append(stream, ExpectedRevision::Any, &events)?;
            let projections = self.tables.projections_mut()?;
            projections.outputs.insert((data, stream.as_str()), false)?;
            projections.claim(&commit.projection, stream, false)?;
            rest = &rest[run..];
        }
        if !commit.links.is_empty() {
            let mut recorded = HashSet::new();
            self.write_links(commit.links.iter().map(|(s, p)| (s.as_str(), *p)))?;
            for (stream, _) in &commit.links {
                if recorded.insert(stream.as_str()) {
                    let projections = self.tables.projections_mut()?;
                    projections.outputs.insert((data, stream.as_str()), true)?;
                    projections.claim(&commit.projection, stream, true)?;
                }
            }
        }
        Ok(())
    }

    /// Links a live batch's parked events from the projection's parked stream.
    fn write_parked(&mut self, commit: &ProjectionCommit) -> Result<(), StoreError> {
        if commit.parked.is_empty() {
            return Ok(());
        }
        let stream = parked_stream(&commit.projection);
        self.write_links(
            commit
                .parked
                .iter()
                .map(|event| (stream.as_str(), event.position)),
        )?;
        self.tables
            .projections_mut()?
            .outputs
            .insert((commit.data, stream.as_str()), true)?;
        Ok(())
    }

    /// Soft-deletes the streams `projection` emitted to and removes its streams of links: those
    /// of `outputs` it owns.
    pub(super) fn delete_outputs(
        &mut self,
        projection: &str,
        outputs: Vec<(String, bool)>,
    ) -> Result<(), StoreError> {
        for (stream, is_link) in outputs {
            if self.tables.projections()?.owner(&stream)?.as_deref() != Some(projection) {
                continue;
            }
            if is_link {
                self.remove_links_stream(&stream)?;
            } else {
                match self.delete(&stream, ExpectedRevision::Any, false) {
                    Ok(()) | Err(StoreError::StreamNotFound(_) | StoreError::StreamDeleted(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }
}
