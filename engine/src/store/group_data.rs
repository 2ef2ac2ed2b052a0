//! What consumer groups keep in the store: one record per group (settings and checkpoints, JSON
//! the store keeps without interpreting it) and why each parked message was parked. The parked
//! messages themselves are links in the group's parked stream, so they read like any stream.
//!
//! Tables:
//! - `groups`: (stream, group) → record (JSON).
//! - `group_parked_reasons`: (stream, group, position of the parked event) → reason.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::StoreError;
use super::writer::{Operation, Txn};

pub(crate) const GROUPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("groups");
pub(crate) const PARKED_REASONS: TableDefinition<(&str, &str, u64), &str> =
    TableDefinition::new("group_parked_reasons");

/// Messages to park: (position of the event, reason), each linked from the parked stream.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
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
}

/// Creates or replaces a group's record.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SaveGroup {
    pub stream: String,
    pub group: String,
    pub record: Vec<u8>,
}

impl Operation for SaveGroup {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        txn.write().tables.groups_mut()?.groups.insert(
            (self.stream.as_str(), self.group.as_str()),
            self.record.as_slice(),
        )?;
        Ok(())
    }
}

/// Removes a group's record, parking reasons and parked stream.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct RemoveGroup {
    pub stream: String,
    pub group: String,
    pub parked_stream: String,
}

impl Operation for RemoveGroup {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let (stream, group) = (self.stream.as_str(), self.group.as_str());
        txn.tables().groups()?.require(stream, group)?;
        let mut writes = txn.write();
        let groups = writes.tables.groups_mut()?;
        groups.groups.remove((stream, group))?;
        groups
            .reasons
            .retain_in((stream, group, 0)..=(stream, group, u64::MAX), |_, _| false)?;
        writes.remove_links_stream(&self.parked_stream)
    }
}

/// Links each message from the parked stream and records why it was parked; durable when
/// answered.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ParkMessages {
    pub parking: Parking,
}

impl Operation for ParkMessages {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let parking = &self.parking;
        let (stream, group) = (parking.stream.as_str(), parking.group.as_str());
        txn.tables().groups()?.require(stream, group)?;
        let head = txn.log().next_position;
        if let Some((position, _)) = parking
            .messages
            .iter()
            .find(|(position, _)| *position >= head)
        {
            return Err(StoreError::InvalidRequest(format!(
                "cannot park position {position}: there is no such event"
            )));
        }
        let mut writes = txn.write();
        writes.write_links(
            parking
                .messages
                .iter()
                .map(|(position, _)| (parking.parked_stream.as_str(), *position)),
        )?;
        let reasons = &mut writes.tables.groups_mut()?.reasons;
        for (position, reason) in &parking.messages {
            reasons.insert((stream, group, *position), reason.as_str())?;
        }
        Ok(())
    }
}
