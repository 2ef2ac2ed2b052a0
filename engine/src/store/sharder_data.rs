//! What the store keeps of sharders: name → sha256 of the component (`sharders`, in
//! [`super::projection_data`] beside the components it shares with projections), as writer
//! operations.

use redb::ReadableTable;

use super::StoreError;
use super::writer::{Operation, Txn};

/// Stores a sharder's component under its name, replacing the one it had.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SaveSharder {
    pub name: String,
    pub component: String,
    pub component_bytes: Vec<u8>,
}

impl Operation for SaveSharder {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        let writes = txn.write();
        let projections = writes.tables.projections_mut()?;
        if projections
            .components
            .get(self.component.as_str())?
            .is_none()
        {
            projections
                .components
                .insert(self.component.as_str(), self.component_bytes.as_slice())?;
        }
        projections
            .sharders
            .insert(self.name.as_str(), self.component.as_str())?;
        projections.collect_components()
    }

    fn payload_bytes(&self) -> usize {
        self.component_bytes.len()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct RemoveSharder {
    pub name: String,
}

impl Operation for RemoveSharder {
    type Output = ();

    fn apply(&self, txn: &mut Txn<'_, '_>) -> Result<(), StoreError> {
        if txn
            .tables()
            .projections()?
            .sharders
            .get(self.name.as_str())?
            .is_none()
        {
            return Err(StoreError::InvalidRequest(format!(
                "no sharder is named {:?}",
                self.name
            )));
        }
        let writes = txn.write();
        let projections = writes.tables.projections_mut()?;
        projections.sharders.remove(self.name.as_str())?;
        projections.collect_components()
    }
}
