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

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::{NewEvent, StoreError};

mod rebuild;
mod writes;

pub(super) use rebuild::BuildProjection;
pub(super) use writes::{CommitProjection, RemoveProjection, SaveProjection};

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

/// What happens to a projection's rebuild.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildChange {
    /// Starts building this version from position 0 (dropping a build in progress).
    Start {
        component: String,
        definition: serde_json::Value,
        component_bytes: Option<Vec<u8>>,
    },
    /// Drops the build in progress; the live version carries on.
    Cancel,
    /// The build with this data id becomes the live version; its emitted events and links go
    /// to the real streams, the old version's data is dropped.
    Switch { data: u64 },
}

/// How far a projection's data has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Every event below this position has been processed.
    pub position: u64,
    pub events_processed: u64,
    /// Events the projection has emitted so far; numbers its emitted events' ids.
    pub events_emitted: u64,
}

/// What happens to a projection's data when its definition is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default)]
pub struct ProjectionCommit {
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
        states + rows + emits + self.links.len() * 16
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
        })
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
        })
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
