//! What projections keep in the store: their definitions, components, checkpoints, per-partition
//! state, read-model rows and the streams they wrote to.
//!
//! A projection's data lives under a *data id*, not its name: a reset (and later a rebuild)
//! starts a fresh id and drops the old one in the same transaction, so readers see either the
//! old model or the new one, never a mix. A batch's state, rows, emitted events, links and
//! checkpoint are one writer request: they commit together or not at all, which is what makes a
//! projection's effects exactly once.
//!
//! Tables:
//! - `projections`: name → [`StoredProjection`] (JSON).
//! - `components`: sha256 → WebAssembly component bytes, shared by every definition using them.
//! - `projection_checkpoints`: data id → (position, events processed, events emitted).
//! - `projection_states`: (data id, partition) → state bytes.
//! - `projection_rows`: (data id, table, key) → row bytes.
//! - `projection_outputs`: (data id, stream) → whether it is a stream of links (else of events).
//! - `sharders`: name → sha256 of its component (in `components` too).
//! - `projection_shadow_events`, `projection_shadow_links`: (data id, sequence) → what a
//!   version being rebuilt emitted or linked, held back from the real streams until it takes
//!   over from the live version.
//! - `stream_owners`: stream → the projection that owns it, and `owned_streams`: (projection,
//!   stream) → whether it is a stream of links. A projection owns the streams it first wrote to;
//!   no other projection may write to them, and resets, deletes and switches touch only the
//!   streams a projection owns.
//! - `projection_parked`: (data id, position) → why the event was set aside (JSON), for the
//!   links in `$projection-{name}-parked`; `projection_held`: (data id, partition) → the
//!   position of the parked event that holds the partition (`on_error: park`).

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::{NewEvent, StoreError};

mod rebuild;
mod writes;

pub(super) use rebuild::{BuildProjection, extends, new_event};
pub(super) use writes::{CommitProjection, RemoveProjection, SaveProjection, SkipEvent};

pub(crate) const PROJECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("projections");
pub(crate) const COMPONENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("components");
pub(crate) const CHECKPOINTS: TableDefinition<u64, (u64, u64, u64)> =
    TableDefinition::new("projection_checkpoints");
pub(crate) const STATES: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("projection_states");
pub(crate) const ROWS: TableDefinition<(u64, &str, &str), &[u8]> =
    TableDefinition::new("projection_rows");
pub(crate) const OUTPUTS: TableDefinition<(u64, &str), bool> =
    TableDefinition::new("projection_outputs");
pub(crate) const SHARDERS: TableDefinition<&str, &str> = TableDefinition::new("sharders");
pub(crate) const SHADOW_EVENTS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("projection_shadow_events");
pub(crate) const SHADOW_LINKS: TableDefinition<(u64, u64), (&str, u64)> =
    TableDefinition::new("projection_shadow_links");
pub(crate) const STREAM_OWNERS: TableDefinition<&str, &str> = TableDefinition::new("stream_owners");
pub(crate) const OWNED_STREAMS: TableDefinition<(&str, &str), bool> =
    TableDefinition::new("owned_streams");
pub(crate) const PARKED: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("projection_parked");
pub(crate) const HELD: TableDefinition<(u64, &str), u64> = TableDefinition::new("projection_held");
/// `meta` key: the next projection data id.
pub(crate) const NEXT_DATA_ID: &str = "next_projection_data_id";

/// A projection as stored: where its data is, which component it runs, and its settings, which
/// the store keeps without interpreting them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProjection {
    pub data: u64,
    pub component: String,
    pub definition: serde_json::Value,
    /// A version being rebuilt beside the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<Building>,
}

/// A version of a projection built beside the live one, from position 0, in its own data id;
/// it replaces the live version once it has caught up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Building {
    pub data: u64,
    pub component: String,
    pub definition: serde_json::Value,
}

/// The stream of links to the events a projection set aside.
pub fn parked_stream(projection: &str) -> String {
    format!("$projection-{projection}-parked")
}

/// An event a projection set aside instead of faulting (`on_error: skip` or `park`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParkedEvent {
    pub position: u64,
    /// Why, as JSON: the store keeps it without reading it.
    pub reason: Vec<u8>,
    /// The partition the event holds from now on (`park`), if any.
    pub holds: Option<String>,
}

/// What happens to a projection's rebuild.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum BuildChange {
    /// Starts building this version from position 0 (dropping a build in progress).
    Start {
        component: String,
        #[serde(with = "crate::store::logged::as_json")]
        definition: serde_json::Value,
        component_bytes: Option<Vec<u8>>,
    },
    /// Drops the build in progress; the live version carries on.
    Cancel,
    /// The build with this data id becomes the live version and the old version's data is
    /// dropped. With `keep_emitted` the streams the old version emitted to and linked into stay
    /// as they are (and the build's own emits and links are dropped); otherwise they become what
    /// the build emitted and linked.
    Switch { data: u64, keep_emitted: bool },
}

/// How far a projection's data has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Every event below this position has been processed.
    pub position: u64,
    pub events_processed: u64,
    /// Events the projection has emitted so far; numbers its emitted events' ids.
    pub events_emitted: u64,
}

/// What happens to a projection's data when its definition is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataChange {
    /// The data stays (a settings change, or new code continuing from the checkpoint).
    Keep,
    /// Fresh, empty data from position 0; the old data is dropped, and with `delete_outputs` the
    /// streams it emitted (soft-deleted) and linked (removed).
    Fresh { delete_outputs: bool },
}

/// A row write: ((table, key), the new row or `None` to delete it).
pub type RowChange = ((String, String), Option<Vec<u8>>);

/// A batch's effects, committed atomically with its checkpoint.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ProjectionCommit {
    /// The projection's name: it owns the streams it writes to.
    pub projection: String,
    pub data: u64,
    /// The checkpoint the batch started from; the commit is refused if the data moved since
    /// (a reset, a delete, or another runner).
    pub from: u64,
    pub checkpoint: Checkpoint,
    /// Partition → new state.
    pub states: Vec<(String, Vec<u8>)>,
    pub rows: Vec<RowChange>,
    /// Events to append, in order, each to its stream at the end.
    pub emits: Vec<(String, NewEvent)>,
    /// (stream of links, position of the linked event), in order.
    pub links: Vec<(String, u64)>,
    /// Events set aside instead of faulting, in order.
    pub parked: Vec<ParkedEvent>,
    /// A rebuild's batch: emits and links are held in the shadow tables.
    pub shadow: bool,
}

impl ProjectionCommit {
    pub fn payload_bytes(&self) -> usize {
        let states: usize = self
            .states
            .iter()
            .map(|(key, state)| key.len() + state.len())
            .sum();
        let rows: usize = self
            .rows
            .iter()
            .map(|((table, key), row)| table.len() + key.len() + row.as_ref().map_or(0, Vec::len))
            .sum();
        let emits: usize = self.emits.iter().map(|(_, event)| event.size()).sum();
        let parked: usize = self
            .parked
            .iter()
            .map(|parked| parked.reason.len() + 8)
            .sum();
        states + rows + emits + parked + self.links.len() * 16
    }
}

/// The projection tables of a write transaction.
pub(super) struct ProjectionTables<'txn> {
    pub projections: Table<'txn, &'static str, &'static [u8]>,
    pub components: Table<'txn, &'static str, &'static [u8]>,
    pub checkpoints: Table<'txn, u64, (u64, u64, u64)>,
    pub states: Table<'txn, (u64, &'static str), &'static [u8]>,
    pub rows: Table<'txn, (u64, &'static str, &'static str), &'static [u8]>,
    pub outputs: Table<'txn, (u64, &'static str), bool>,
    pub sharders: Table<'txn, &'static str, &'static str>,
    pub shadow_events: Table<'txn, (u64, u64), &'static [u8]>,
    pub shadow_links: Table<'txn, (u64, u64), (&'static str, u64)>,
    pub stream_owners: Table<'txn, &'static str, &'static str>,
    pub owned_streams: Table<'txn, (&'static str, &'static str), bool>,
    pub parked: Table<'txn, (u64, u64), &'static [u8]>,
    pub held: Table<'txn, (u64, &'static str), u64>,
}

impl<'txn> ProjectionTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(ProjectionTables {
            projections: txn.open_table(PROJECTIONS)?,
            components: txn.open_table(COMPONENTS)?,
            checkpoints: txn.open_table(CHECKPOINTS)?,
            states: txn.open_table(STATES)?,
            rows: txn.open_table(ROWS)?,
            outputs: txn.open_table(OUTPUTS)?,
            sharders: txn.open_table(SHARDERS)?,
            shadow_events: txn.open_table(SHADOW_EVENTS)?,
            shadow_links: txn.open_table(SHADOW_LINKS)?,
            stream_owners: txn.open_table(STREAM_OWNERS)?,
            owned_streams: txn.open_table(OWNED_STREAMS)?,
            parked: txn.open_table(PARKED)?,
            held: txn.open_table(HELD)?,
        })
    }

    /// The projection that owns `stream`, if one does.
    pub fn owner(&self, stream: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .stream_owners
            .get(stream)?
            .map(|owner| owner.value().to_owned()))
    }

    /// Makes `projection` the owner of `stream` (which no other projection owns).
    pub fn claim(&mut self, projection: &str, stream: &str, links: bool) -> Result<(), StoreError> {
        if self.stream_owners.get(stream)?.is_none() {
            self.stream_owners.insert(stream, projection)?;
            self.owned_streams.insert((projection, stream), links)?;
        }
        Ok(())
    }

    /// Gives each stored projection the streams its live data wrote to and no projection owns:
    /// stores from before streams had owners.
    pub fn claim_earlier_outputs(&mut self) -> Result<(), StoreError> {
        if !self.owned_streams.is_empty()? {
            return Ok(());
        }
        let mut claims = Vec::new();
        for entry in self.projections.iter()? {
            let (name, json) = entry?;
            let stored: StoredProjection =
                serde_json::from_slice(json.value()).map_err(StoreError::storage)?;
            let parked = parked_stream(name.value());
            for output in self
                .outputs
                .range((stored.data, "")..(stored.data + 1, ""))?
            {
                let (key, is_link) = output?;
                let stream = key.value().1;
                if stream != parked {
                    claims.push((name.value().to_owned(), stream.to_owned(), is_link.value()));
                }
            }
        }
        for (projection, stream, is_link) in claims {
            self.claim(&projection, &stream, is_link)?;
        }
        Ok(())
    }

    /// Gives up every stream `projection` owns.
    pub fn release_all(&mut self, projection: &str) -> Result<(), StoreError> {
        let mut owned = Vec::new();
        for entry in self.owned_streams.range((projection, "")..)? {
            let (key, _) = entry?;
            let (owner, stream) = key.value();
            if owner != projection {
                break;
            }
            owned.push(stream.to_owned());
        }
        for stream in &owned {
            self.stream_owners.remove(stream.as_str())?;
            self.owned_streams.remove((projection, stream.as_str()))?;
        }
        Ok(())
    }

    pub fn save(&mut self, name: &str, stored: &StoredProjection) -> Result<(), StoreError> {
        let json = serde_json::to_vec(stored).map_err(StoreError::storage)?;
        self.projections.insert(name, json.as_slice())?;
        Ok(())
    }

    pub fn load(&self, name: &str) -> Result<Option<StoredProjection>, StoreError> {
        match self.projections.get(name)? {
            Some(json) => serde_json::from_slice(json.value())
                .map(Some)
                .map_err(StoreError::storage),
            None => Ok(None),
        }
    }

    /// Removes a data id's checkpoint, state and rows, and returns its output streams
    /// (name, is a stream of links) so the caller can delete them.
    pub fn drop_data(&mut self, data: u64) -> Result<Vec<(String, bool)>, StoreError> {
        self.checkpoints.remove(data)?;
        self.states
            .retain_in((data, "")..(data + 1, ""), |_, _| false)?;
        self.rows
            .retain_in((data, "", "")..(data + 1, "", ""), |_, _| false)?;
        let mut outputs = Vec::new();
        for entry in self.outputs.range((data, "")..(data + 1, ""))? {
            let (key, is_link) = entry?;
            outputs.push((key.value().1.to_owned(), is_link.value()));
        }
        self.outputs
            .retain_in((data, "")..(data + 1, ""), |_, _| false)?;
        self.shadow_events
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        self.shadow_links
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        self.parked
            .retain_in((data, 0)..(data + 1, 0), |_, _| false)?;
        self.held
            .retain_in((data, "")..(data + 1, ""), |_, _| false)?;
        Ok(outputs)
    }

    /// Deletes components no definition refers to any more.
    pub fn collect_components(&mut self) -> Result<(), StoreError> {
        let mut used = std::collections::HashSet::new();
        for entry in self.projections.iter()? {
            let stored: StoredProjection =
                serde_json::from_slice(entry?.1.value()).map_err(StoreError::storage)?;
            used.insert(stored.component);
            if let Some(building) = stored.building {
                used.insert(building.component);
            }
        }
        for entry in self.sharders.iter()? {
            used.insert(entry?.1.value().to_owned());
        }
        self.components.retain(|sha256, _| used.contains(sha256))?;
        Ok(())
    }
}

/// A snapshot of one projection's data, for queries and for the runner's reads.
pub struct ProjectionView {
    data: u64,
    checkpoints: ReadOnlyTable<u64, (u64, u64, u64)>,
    states: ReadOnlyTable<(u64, &'static str), &'static [u8]>,
    rows: ReadOnlyTable<(u64, &'static str, &'static str), &'static [u8]>,
    parked: ReadOnlyTable<(u64, u64), &'static [u8]>,
    held: ReadOnlyTable<(u64, &'static str), u64>,
}

/// One page of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    pub keys: Vec<String>,
    /// The key to continue after, when there may be more.
    pub next: Option<String>,
}

/// One page of a table scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPage {
    pub rows: Vec<(String, Vec<u8>)>,
    /// The key to continue after, when there may be more.
    pub next: Option<String>,
}

impl ProjectionView {
    pub(super) fn open(txn: &ReadTransaction, data: u64) -> Result<Self, StoreError> {
        Ok(ProjectionView {
            data,
            checkpoints: txn.open_table(CHECKPOINTS)?,
            states: txn.open_table(STATES)?,
            rows: txn.open_table(ROWS)?,
            parked: txn.open_table(PARKED)?,
            held: txn.open_table(HELD)?,
        })
    }

    /// Why the event at `position` was set aside (JSON), if it was.
    pub fn parked_reason(&self, position: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .parked
            .get((self.data, position))?
            .map(|reason| reason.value().to_vec()))
    }

    /// The partitions held behind a parked event: partition → that event's position.
    pub fn held_partitions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut held = Vec::new();
        for entry in self.held.range((self.data, "")..(self.data + 1, ""))? {
            let (key, position) = entry?;
            held.push((key.value().1.to_owned(), position.value()));
        }
        Ok(held)
    }

    /// Partitions that have a state, whose key starts with `prefix`, after `after`, in order.
    pub fn partitions(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut keys = Vec::new();
        for entry in self.states.range((self.data, start)..(self.data + 1, ""))? {
            let (key, _) = entry?;
            let key = key.value().1;
            if !key.starts_with(prefix) {
                break;
            }
            if Some(key) == after {
                continue;
            }
            if keys.len() == limit {
                let next = keys.last().cloned();
                return Ok(KeyPage { keys, next });
            }
            keys.push(key.to_owned());
        }
        Ok(KeyPage { keys, next: None })
    }

    /// The names of the tables that hold rows, in order.
    pub fn tables(&self) -> Result<Vec<String>, StoreError> {
        let mut tables: Vec<String> = Vec::new();
        loop {
            // The smallest name after the last one found is that name followed by a NUL.
            let from = tables.last().map(|last| format!("{last}\0"));
            let from = from.as_deref().unwrap_or("");
            let next = self
                .rows
                .range((self.data, from, "")..(self.data + 1, "", ""))?
                .next()
                .transpose()?;
            match next {
                Some((key, _)) => tables.push(key.value().1.to_owned()),
                None => return Ok(tables),
            }
        }
    }

    /// The data id this view reads.
    pub fn data(&self) -> u64 {
        self.data
    }

    /// `None` when the data id no longer exists (the projection was reset or deleted).
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self.checkpoints.get(self.data)?.map(|stored| {
            let (position, events_processed, events_emitted) = stored.value();
            Checkpoint {
                position,
                events_processed,
                events_emitted,
            }
        }))
    }

    pub fn state(&self, partition: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .states
            .get((self.data, partition))?
            .map(|state| state.value().to_vec()))
    }

    pub fn row(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .rows
            .get((self.data, table, key))?
            .map(|row| row.value().to_vec()))
    }

    /// SHA-256 over every partition's state and every row, in key order, each field
    /// length-prefixed: equal digests mean byte-identical read models.
    pub fn digest(&self) -> Result<String, StoreError> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        for entry in self.states.range((self.data, "")..(self.data + 1, ""))? {
            let (key, state) = entry?;
            field(b"state");
            field(key.value().1.as_bytes());
            field(state.value());
        }
        for entry in self
            .rows
            .range((self.data, "", "")..(self.data + 1, "", ""))?
        {
            let (key, row) = entry?;
            let (_, table, key) = key.value();
            field(b"row");
            field(table.as_bytes());
            field(key.as_bytes());
            field(row.value());
        }
        Ok(format!("{:x}", hash.finalize()))
    }

    /// Rows of `table` whose key starts with `prefix`, after the key `after`, in key order.
    pub fn rows(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RowPage, StoreError> {
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut rows = Vec::new();
        for entry in self.rows.range((self.data, table, start)..)? {
            let (key, value) = entry?;
            let (data, row_table, key) = key.value();
            if data != self.data || row_table != table || !key.starts_with(prefix) {
                break;
            }
            if Some(key) == after {
                continue;
            }
            if rows.len() == limit {
                let next = rows.last().map(|(key, _): &(String, Vec<u8>)| key.clone());
                return Ok(RowPage { rows, next });
            }
            rows.push((key.to_owned(), value.value().to_vec()));
        }
        Ok(RowPage { rows, next: None })
    }
}
