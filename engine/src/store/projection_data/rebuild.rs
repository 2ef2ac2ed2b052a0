//! Rebuilds as writer operations: a version built beside the live one, then switched in or
//! dropped.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::writes::{check_emit_target, check_link_target, check_owner};
use super::{BuildChange, Building, parked_stream};
use crate::store::record::EventRecord;
use crate::store::writer::{Operation, Tables, Txn, Writes};
use crate::store::{ExpectedRevision, NewEvent, StoreError, visible_events};

/// Starts, cancels or switches in a projection's rebuild; answers the data id it concerns.
#[derive(serde::Serialize, serde::Deserialize)]
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
            BuildChange::Switch { data, keep_emitted } => {
                let Some(building) = stored.building.take_if(|b| b.data == *data) else {
                    return Err(StoreError::InvalidRequest(format!(
                        "the rebuild of {name} was cancelled or replaced"
                    )));
                };
                let mut built = Built::load(txn.tables(), building.data, name)?;
                if *keep_emitted {
                    built.events.clear();
                    built.links.clear();
                }
                built.check_targets(txn.tables(), name)?;
                let mut writes = txn.write();
                let old_outputs = writes.tables.projections_mut()?.drop_data(stored.data)?;
                if *keep_emitted {
                    writes.keep_outputs(name, building.data, built, old_outputs)?;
                } else {
                    writes.take_over_outputs(name, building.data, built, old_outputs)?;
                }
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

/// What a rebuilt version emitted and linked, by stream, from its shadow tables; the events it
/// parked apart.
struct Built {
    events: BTreeMap<String, Vec<NewEvent>>,
    links: BTreeMap<String, Vec<u64>>,
    parked: Vec<u64>,
}

impl Built {
    fn load(tables: &Tables, data: u64, projection: &str) -> Result<Built, StoreError> {
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
        let parked = links.remove(&parked_stream(projection)).unwrap_or_default();
        Ok(Built {
            events,
            links,
            parked,
        })
    }

    /// Refuses the switch, before anything is dropped, when a stream the rebuilt version wrote
    /// to cannot take what it wrote any more (a client tombstoned it, or wrote events to a
    /// stream it links into).
    fn check_targets(&self, tables: &Tables, projection: &str) -> Result<(), StoreError> {
        let refuse = |error: StoreError| {
            StoreError::InvalidRequest(format!("cannot switch to the rebuilt version: {error}"))
        };
        for stream in self.events.keys() {
            check_emit_target(tables, stream).map_err(refuse)?;
            check_owner(tables, projection, stream).map_err(refuse)?;
        }
        for stream in self.links.keys() {
            check_link_target(tables, stream).map_err(refuse)?;
            check_owner(tables, projection, stream).map_err(refuse)?;
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
        projection: &str,
        data: u64,
        built: Built,
        old_outputs: Vec<(String, bool)>,
    ) -> Result<(), StoreError> {
        let Built {
            mut events,
            links,
            parked,
        } = built;
        self.drop_shadow(data)?;
        self.replace_parked(projection, data, &parked)?;
        let parked_stream = parked_stream(projection);
        let old_outputs: Vec<(String, bool)> = old_outputs
            .into_iter()
            .filter(|(stream, _)| *stream != parked_stream)
            .collect();

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
            let tables = &*self.tables;
            let visible = visible_events(
                &tables.streams,
                &tables.stream_index,
                &tables.links,
                &tables.log,
                &stream,
            )?;
            let rest = match extends(&visible, &new) {
                Some(rest) => rest,
                None => {
                    self.delete(&stream, ExpectedRevision::Any, false)?;
                    &new[..]
                }
            };
            if !rest.is_empty() {
                self.append(&stream, ExpectedRevision::Any, rest)?;
            }
            if !new.is_empty() {
                let projections = self.tables.projections_mut()?;
                projections.outputs.insert((data, stream.as_str()), false)?;
                projections.claim(projection, &stream, false)?;
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
            let projections = self.tables.projections_mut()?;
            projections.outputs.insert((data, stream.as_str()), true)?;
            projections.claim(projection, stream, true)?;
        }
        Ok(())
    }

    /// Leaves the streams the old version emitted to and linked into as they are, now the new
    /// version's outputs; only the parked stream follows the new version.
    fn keep_outputs(
        &mut self,
        projection: &str,
        data: u64,
        built: Built,
        old_outputs: Vec<(String, bool)>,
    ) -> Result<(), StoreError> {
        self.drop_shadow(data)?;
        self.replace_parked(projection, data, &built.parked)?;
        let parked_stream = parked_stream(projection);
        let outputs = &mut self.tables.projections_mut()?.outputs;
        for (stream, is_link) in old_outputs {
            if stream != parked_stream {
                outputs.insert((data, stream.as_str()), is_link)?;
            }
        }
        Ok(())
    }

    fn drop_shadow(&mut self, data: u64) -> Result<(), StoreError> {
        let projections = self.tables.projections_mut()?;
        projections
            .shadow_events
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        projections
            .shadow_links
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        Ok(())
    }

    /// The parked stream becomes the links to what the new version parked.
    fn replace_parked(
        &mut self,
        projection: &str,
        data: u64,
        parked: &[u64],
    ) -> Result<(), StoreError> {
        let stream = parked_stream(projection);
        self.remove_links_stream(&stream)?;
        if !parked.is_empty() {
            self.write_links(parked.iter().map(|position| (stream.as_str(), *position)))?;
            self.tables
                .projections_mut()?
                .outputs
                .insert((data, stream.as_str()), true)?;
        }
        Ok(())
    }
}

/// What `new` adds to `visible` when it starts with the same events (type, data, metadata):
/// `None` when the stream holds other events and must be written anew.
pub(in crate::store) fn extends<'n>(
    visible: &[NewEvent],
    new: &'n [NewEvent],
) -> Option<&'n [NewEvent]> {
    let same = |(old, new): &(&NewEvent, &NewEvent)| {
        (&old.event_type, &old.data, &old.metadata, old.binary)
            == (&new.event_type, &new.data, &new.metadata, new.binary)
    };
    let common = visible.iter().zip(new).take_while(same).count();
    (common == visible.len()).then(|| &new[common..])
}

pub(in crate::store) fn new_event(record: &EventRecord) -> NewEvent {
    NewEvent {
        id: record.id,
        event_type: record.event_type.to_owned(),
        data: record.data.to_vec(),
        binary: record.binary,
        metadata: record.metadata.to_vec(),
    }
}
