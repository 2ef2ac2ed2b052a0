//! What connectors keep in the store: each one's definition (JSON the store keeps without
//! interpreting it) and its checkpoint, tagged with the generation of the definition it belongs
//! to. A source's appends commit with its checkpoint in one operation, so a record lands once.
//!
//! Tables:
//! - `connectors`: name → definition (JSON).
//! - `connector_checkpoints`: name → (generation, checkpoint JSON). Every save of the definition
//!   starts a new generation; a commit made for an older one is refused, so a connector that
//!   was changed or stopped meanwhile never writes over what replaced it.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::writer::{Operation, Txn};
use super::{ExpectedRevision, NewEvent, StoreError};

pub(crate) const CONNECTORS: TableDefinition<&str, &[u8]> = TableDefinition::new("connectors");
pub(crate) const CONNECTOR_CHECKPOINTS: TableDefinition<&str, (u64, &[u8])> =
    TableDefinition::new("connector_checkpoints");

/// How a commit for a generation that is over is refused.
pub const CONNECTOR_CHANGED: &str = "was changed, stopped or deleted meanwhile";
/// The end of the refusal of a commit made from a checkpoint that is no longer the stored one
/// (an earlier commit whose answer was lost did land): the session reads it again.
pub const CONNECTOR_MOVED: &str = "moved on meanwhile";

/// A stored connector: its definition, the generation it is in and its checkpoint.
#[derive(Debug, Clone)]
pub struct StoredConnector {
    pub name: String,
    pub definition: Vec<u8>,
    pub generation: u64,
    pub checkpoint: Vec<u8>,
}

pub(super) struct ConnectorTables<'txn> {
    pub definitions: Table<'txn, &'static str, &'static [u8]>,
    pub checkpoints: Table<'txn, &'static str, (u64, &'static [u8])>,
}

impl<'txn> ConnectorTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(ConnectorTables {
            definitions: txn.open_table(CONNECTORS)?,
            checkpoints: txn.open_table(CONNECTOR_CHECKPOINTS)?,
        })
    }

    fn checkpoint(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.checkpoints.get(name)?.map(|entry| {
            let (generation, checkpoint) = entry.value();
            (generation, checkpoint.to_vec())
        }))
    }
}

/// Creates or replaces a connector's definition and starts a new generation; `checkpoint`
/// replaces the stored one when given. Answers the new generation.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SaveConnector {
    pub name: String,
    pub definition: Vec<u8>,
    pub checkpoint: Option<Vec<u8>>,
}

impl Operation for SaveConnector {
    type Output = u64;

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<u64, StoreError> {
        let stored = txn.tables().connectors()?.checkpoint(&self.name)?;
        let (generation, checkpoint) = match (stored, &self.checkpoint) {
            (Some((generation, _)), Some(checkpoint)) => (generation + 1, checkpoint.clone()),
            (Some((generation, kept)), None) => (generation + 1, kept),
            (None, checkpoint) => (1, checkpoint.clone().unwrap_or_default()),
        };
        let writes = txn.write();
        let tables = writes.tables.connectors_mut()?;
        tables
            .definitions
            .insert(self.name.as_str(), self.definition.as_slice())?;
        tables
            .checkpoints
            .insert(self.name.as_str(), (generation, checkpoint.as_slice()))?;
        Ok(generation)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct RemoveConnector {
    pub name: String,
}

impl Operation for RemoveConnector {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        if txn.tables().connectors()?.checkpoint(&self.name)?.is_none() {
            return Err(StoreError::InvalidRequest(format!(
                "no connector is named {:?}",
                self.name
            )));
        }
        let writes = txn.write();
        let tables = writes.tables.connectors_mut()?;
        tables.definitions.remove(self.name.as_str())?;
        tables.checkpoints.remove(self.name.as_str())?;
        Ok(())
    }
}

/// A connector's progress: its new checkpoint and, for a source, the events it lands, appended
/// in order (each entry to one stream, any revision) in the same commit. It applies only on top
/// of the checkpoint it was made from, so no records land twice even when a commit whose answer
/// was lost turns out to have landed.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CommitConnector {
    pub name: String,
    pub generation: u64,
    pub previous: Vec<u8>,
    pub checkpoint: Vec<u8>,
    pub appends: Vec<(String, Vec<NewEvent>)>,
}

impl Operation for CommitConnector {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        match txn.tables().connectors()?.checkpoint(&self.name)? {
            Some((generation, stored)) if generation == self.generation => {
                if stored != self.previous {
                    return Err(StoreError::InvalidRequest(format!(
                        "connector {:?} {CONNECTOR_MOVED}",
                        self.name
                    )));
                }
            }
            _ => {
                return Err(StoreError::InvalidRequest(format!(
                    "connector {:?} {CONNECTOR_CHANGED}",
                    self.name
                )));
            }
        }
        // Every append is checked before anything is written: a stream that refuses events
        // (deleted, or a projection's stream of links) refuses the whole commit.
        for (stream, events) in &self.appends {
            super::streams::check_append(txn.tables(), stream, ExpectedRevision::Any, events)?;
        }
        let mut writes = txn.write();
        for (stream, events) in &self.appends {
            writes.append(stream, ExpectedRevision::Any, events)?;
        }
        writes.tables.connectors_mut()?.checkpoints.insert(
            self.name.as_str(),
            (self.generation, self.checkpoint.as_slice()),
        )?;
        Ok(())
    }

    fn payload_bytes(&self) -> usize {
        let events = self.appends.iter().flat_map(|(_, events)| events);
        self.checkpoint.len() + events.map(NewEvent::size).sum::<usize>()
    }
}
