//! Rebuilds as writer operations: a version built beside the live one, then switched in or
//! dropped.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::writes::{check_emit_target, check_link_target};
use super::{BuildChange, Building};
use crate::store::record::EventRecord;
use crate::store::writer::{Operation, Tables, Txn, Writes};
use crate::store::{ExpectedRevision, NewEvent, StoreError};

/// Starts, cancels or switches in a projection's rebuild; answers the data id it concerns.
pub(in crate::store) struct BuildProjection {
    pub name: String,
    pub change: BuildChange,
}

impl Operation for BuildProjection {
    type Output = u64;

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<u64, StoreError> {
        let name = &self.name;
        let Some(mut stored) = txn.tables().projections()?.load(name)? else {
            return Err(StoreError::InvalidRequest(format!(
                "no projection is named {name:?}"
            )));
        };
        let data = match &self.change {
            BuildChange::Start {
                component,
                definition,
                component_bytes,
            } => {
                let stored_component = txn
                    .tables()
                    .projections()?
                    .components
                    .get(component.as_str())?
                    .is_some();
                if !stored_component && component_bytes.is_none() {
                    return Err(StoreError::InvalidRequest(format!(
                        "component {component} is not stored"
                    )));
                }
                let mut writes = txn.write();
                if let (false, Some(bytes)) = (stored_component, component_bytes) {
                    writes
                        .tables
                        .projections_mut()?
                        .components
                        .insert(component.as_str(), bytes.as_slice())?;
                }
                if let Some(previous) = stored.building.take() {
                    writes.tables.projections_mut()?.drop_data(previous.data)?;
                }
                let data = writes.new_data()?;
                stored.building = Some(Building {
                    data,
                    component: component.clone(),
                    definition: definition.clone(),
                });
                data
            }
            BuildChange::Cancel => {
                let Some(building) = stored.building.take() else {
                    return Err(StoreError::InvalidRequest(format!(
                        "{name} is not being rebuilt"
                    )));
                };
                txn.write()
                    .tables
                    .projections_mut()?
                    .drop_data(building.data)?;
                stored.data
            }
            BuildChange::Switch { data } => {
                let Some(building) = stored.building.take_if(|b| b.data == *data) else {
                    return Err(StoreError::InvalidRequest(format!(
                        "the rebuild of {name} was cancelled or replaced"
                    )));
                };
                let built = Built::load(txn.tables(), building.data)?;
                built.check_targets(txn.tables())?;
                let mut writes = txn.write();
                let old_outputs = writes.tables.projections_mut()?.drop_data(stored.data)?;
                writes.take_over_outputs(building.data, built, old_outputs)?;
                stored.data = building.data;
                stored.component = building.component;
                stored.definition = building.definition;
                building.data
            }
        };
        let writes = txn.write();
        let projections = writes.tables.projections_mut()?;
        projections.save(name, &stored)?;
        projections.collect_components()?;
        Ok(data)
    }

    fn payload_bytes(&self) -> usize {
        match &self.change {
            BuildChange::Start {
                component_bytes: Some(bytes),
                ..
            } => bytes.len(),
            _ => 0,
        }
    }
}

/// What a rebuilt version emitted and linked, by stream, from its shadow tables.
struct Built {
    events: BTreeMap<String, Vec<NewEvent>>,
    links: BTreeMap<String, Vec<u64>>,
}

impl Built {
    fn load(tables: &Tables, data: u64) -> Result<Built, StoreError> {
        let projections = tables.projections()?;
        let mut events: BTreeMap<String, Vec<NewEvent>> = BTreeMap::new();
        for entry in projections.shadow_events.range((data, 0)..(data + 1, 0))? {
            let (_, bytes) = entry?;
            let record = EventRecord::decode(bytes.value()).map_err(StoreError::storage)?;
            events
                .entry(record.stream.to_owned())
                .or_default()
                .push(new_event(&record));
        }
        let mut links: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for entry in projections.shadow_links.range((data, 0)..(data + 1, 0))? {
            let (_, link) = entry?;
            let (stream, position) = link.value();
            links.entry(stream.to_owned()).or_default().push(position);
        }
        Ok(Built { events, links })
    }

    /// Refuses the switch, before anything is dropped, when a stream the rebuilt version wrote
    /// to cannot take what it wrote any more (a client tombstoned it, or wrote events to a
    /// stream it links into).
    fn check_targets(&self, tables: &Tables) -> Result<(), StoreError> {
        let refuse = |error: StoreError| {
            StoreError::InvalidRequest(format!("cannot switch to the rebuilt version: {error}"))
        };
        for stream in self.events.keys() {
            check_emit_target(tables, stream).map_err(refuse)?;
        }
        for stream in self.links.keys() {
            check_link_target(tables, stream).map_err(refuse)?;
        }
        Ok(())
    }
}

impl Writes<'_, '_> {
    /// Makes the streams the old version wrote hold what the new version produced: a stream
    /// whose events already are the new ones (or their beginning) keeps them and gets the rest;
    /// one that differs is soft-deleted and written anew; the old version's streams of links are
    /// replaced by the new version's.
    fn take_over_outputs(
        &mut self,
        data: u64,
        built: Built,
        old_outputs: Vec<(String, bool)>,
    ) -> Result<(), StoreError> {
        let Built { mut events, links } = built;
        let projections = self.tables.projections_mut()?;
        projections
            .shadow_events
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        projections
            .shadow_links
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;

        let mut event_streams: Vec<String> = events.keys().cloned().collect();
        let mut link_streams = Vec::new();
        for (stream, is_link) in old_outputs {
            if is_link {
                link_streams.push(stream);
            } else if !events.contains_key(&stream) {
                event_streams.push(stream);
            }
        }
        for stream in event_streams {
            let new = events.remove(&stream).unwrap_or_default();
            let visible = visible_events(self.tables, &stream)?;
            let same = |(old, new): &(&NewEvent, &NewEvent)| {
                (&old.event_type, &old.data, &old.metadata, old.binary)
                    == (&new.event_type, &new.data, &new.metadata, new.binary)
            };
            let common = visible.iter().zip(&new).take_while(same).count();
            let rest = if common == visible.len() {
                &new[common..]
            } else {
                self.delete(&stream, ExpectedRevision::Any, false)?;
                &new[..]
            };
            if !rest.is_empty() {
                self.append(&stream, ExpectedRevision::Any, rest)?;
            }
            if !new.is_empty() {
                self.tables
                    .projections_mut()?
                    .outputs
                    .insert((data, stream.as_str()), false)?;
            }
        }
        for stream in link_streams {
            self.remove_links_stream(&stream)?;
        }
        self.write_links(
            links
                .iter()
                .flat_map(|(stream, positions)| positions.iter().map(|p| (stream.as_str(), *p))),
        )?;
        for stream in links.keys() {
            self.tables
                .projections_mut()?
                .outputs
                .insert((data, stream.as_str()), true)?;
        }
        Ok(())
    }
}

fn new_event(record: &EventRecord) -> NewEvent {
    NewEvent {
        id: record.id,
        event_type: record.event_type.to_owned(),
        data: record.data.to_vec(),
        binary: record.binary,
        metadata: record.metadata.to_vec(),
    }
}

/// The events a read of the stream shows now (none for a stream of links or a deleted one).
fn visible_events(tables: &Tables, stream: &str) -> Result<Vec<NewEvent>, StoreError> {
    let Some(state) = tables.stream_state(stream)? else {
        return Ok(Vec::new());
    };
    if state.links || state.tombstoned || state.soft_deleted {
        return Ok(Vec::new());
    }
    let mut events = Vec::new();
    for revision in state.deleted_before..state.next_revision {
        let Some(position) = tables.stream_index.get((state.id, revision))? else {
            continue;
        };
        let Some(bytes) = tables.log.get(position.value())? else {
            continue;
        };
        let record = EventRecord::decode(bytes.value()).map_err(StoreError::storage)?;
        events.push(new_event(&record));
    }
    Ok(events)
}
