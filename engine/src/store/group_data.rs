//! What consumer groups keep in the store: one record per group (settings and checkpoints, JSON
//! the store keeps without interpreting it) and why each parked message was parked. The parked
//! messages themselves are links in the group's parked stream, so they read like any stream.
//!
//! Tables:
//! - `groups`: (stream, group) → record (JSON).
//! - `group_parked_reasons`: (stream, group, position of the parked event) → reason.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::StoreError;

pub(crate) const GROUPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("groups");
pub(crate) const PARKED_REASONS: TableDefinition<(&str, &str, u64), &str> =
    TableDefinition::new("group_parked_reasons");

/// Messages to park: (position of the event, reason), each linked from the parked stream.
#[derive(Debug, Clone, Default)]
pub struct Parking {
    pub stream: String,
    pub group: String,
    pub parked_stream: String,
    pub messages: Vec<(u64, String)>,
}

pub(super) struct GroupTables<'txn> {
    pub groups: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    pub reasons: Table<'txn, (&'static str, &'static str, u64), &'static str>,
}

impl<'txn> GroupTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(GroupTables {
            groups: txn.open_table(GROUPS)?,
            reasons: txn.open_table(PARKED_REASONS)?,
        })
    }

    /// Refuses a request for a group that is not stored.
    pub fn require(&self, stream: &str, group: &str) -> Result<(), StoreError> {
        match self.groups.get((stream, group))? {
            Some(_) => Ok(()),
            None => Err(StoreError::InvalidRequest(format!(
                "no group {group:?} on {stream:?}"
            ))),
        }
    }

    /// Removes a group's record and reasons.
    pub fn remove(&mut self, stream: &str, group: &str) -> Result<(), StoreError> {
        self.groups.remove((stream, group))?;
        self.reasons
            .retain_in((stream, group, 0)..=(stream, group, u64::MAX), |_, _| false)?;
        Ok(())
    }
}
