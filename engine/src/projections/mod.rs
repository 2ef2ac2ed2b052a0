//! Projections as users see them: a list, a status each, start/stop/reset.
//!
//! Two kinds share the list. The system projections (`$by_category`, …) present the store's
//! built-in indexes ([`crate::store::indexes`]): the index does the work inside the writer's
//! commits, and this layer names it, reports it and steers it. Wasm projections are components
//! users upload ([`component`] hosts them, [`runner`] runs each, [`wasm`] manages them).

pub mod component;
mod reads;
mod runner;
mod wasm;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::{CategoryPosition, IndexConfig, SystemIndex};
use crate::store::{Store, StoreError};
use component::Runtime;
pub use reads::ProjectionReads;
pub use wasm::DeployOptions;
use wasm::WasmProjections;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionKind {
    System,
    Wasm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Stopped,
    Faulted,
    Completed,
    Rebuilding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Mode {
    Continuous,
    OneTime,
}

/// What a new version of a projection does, at the switch, with the streams the live version
/// emitted to and linked into.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Emitted {
    /// Left as they are: the new version emits only for events past the switch. What was sent
    /// downstream is not sent again.
    #[default]
    Keep,
    /// Made what the new version emitted from position 0: streams that differ are soft-deleted
    /// and written again, with new event ids.
    Replace,
}

/// What a projection does with an event it cannot handle.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum OnError {
    /// Fault at the event (the events before it are kept); `start` tries it again.
    #[default]
    Stop,
    /// Set the event aside, with the reason, in `$projection-{name}-parked`, and go on.
    Skip,
    /// As `skip`, and hold its partition: the partition's later events are set aside too, in
    /// order, while the other partitions go on.
    Park,
}

/// Why a projection stopped on an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Fault {
    pub message: String,
    pub position: u64,
}

/// A projection's status, as served by the API and read by the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectionStatus {
    pub name: String,
    pub kind: ProjectionKind,
    pub status: RunStatus,
    pub mode: Mode,
    pub version: u64,
    /// The uploaded component's hash; `null` for system projections.
    pub wasm_sha256: Option<String>,
    /// Every event below this position has been processed.
    pub position: u64,
    /// The position the next appended event will get.
    pub head_position: u64,
    pub events_processed: u64,
    /// Processing rate over the last measured second.
    pub events_per_second: f64,
    /// Seconds to reach the head at that rate; absent when caught up or idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// `position / head_position`, 1 when caught up.
    pub progress: f64,
    pub fault: Option<Fault>,
    /// The version being rebuilt beside this one, while a rebuild runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
    /// For a Wasm projection asked for by name: SHA-256 of its state and tables as of
    /// `position`. The same component over the same log gives the same digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For a partitioned projection whose batches ran on several workers since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStatus>,
    /// A Wasm projection's answer to an event it cannot handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// For a Wasm projection asked for by name: the streams of events it emitted to (and owns)
    /// and the events they hold, which a rebuild with `emitted=replace` may rewrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emitted: Option<Rewrites>,
}

/// How a partitioned projection's batches ran on the partition workers: in windows of a few
/// hundred events, each worker taking the partitions hashed to it. A window in which workers
/// touched the same state or row, or more than one emitted, runs again in log order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ParallelStatus {
    pub workers: usize,
    /// Events kept as the workers ran them.
    pub parallel_events: u64,
    /// Events of windows that ran again in log order after the workers conflicted.
    pub rerun_events: u64,
}

/// A version being rebuilt beside the live one; it replaces the live version once caught up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebuildStatus {
    pub version: u64,
    pub wasm_sha256: String,
    /// `running`, `stopped` or `faulted`.
    pub status: RunStatus,
    pub position: u64,
    pub events_processed: u64,
    pub events_per_second: f64,
    pub progress: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// A rebuild that faults stops there; the live version keeps serving.
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStatus>,
    /// What the switch does with the live version's emitted streams.
    pub emitted: Emitted,
    /// With `replace`, in `GET /projections/{name}`: what the switch would rewrite if it came
    /// now (streams that differ are soft-deleted and written again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrites: Option<Rewrites>,
}

/// What a switch that replaces emitted streams would rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rewrites {
    pub streams: u64,
    pub events: u64,
}

/// Changes to the system projections' configuration; absent fields keep their value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigChange {
    /// `$by_category`, `$stream_by_category`: separator between category and the rest
    /// (also accepted as `separator`).
    #[serde(alias = "separator")]
    #[schema(min_length = 1)]
    pub category_separator: Option<String>,
    /// `$by_category`, `$stream_by_category`: cut at the `first` or `last` separator
    /// (also accepted as `position`).
    #[serde(alias = "position")]
    pub category_position: Option<CategoryPosition>,
    /// `$by_correlation_id`: the metadata property holding the correlation id (also accepted as
    /// `property`).
    #[serde(alias = "property")]
    #[schema(min_length = 1)]
    pub correlation_property: Option<String>,
}

impl std::fmt::Display for ProjectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProjectionKind::System => "system",
            ProjectionKind::Wasm => "wasm",
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunStatus::Running => "running",
            RunStatus::Stopped => "stopped",
            RunStatus::Faulted => "faulted",
            RunStatus::Completed => "completed",
            RunStatus::Rebuilding => "rebuilding",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("no projection is named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The projection exists but cannot do this now, or ever (a system projection).
    #[error("{0}")]
    Conflict(String),
    /// What was asked for is not there: a rebuild not in progress, the state of a system
    /// projection.
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The projections of one store.
#[derive(Clone)]
pub struct Projections {
    store: Store,
    wasm: Arc<WasmProjections>,
    reads: ProjectionReads,
}

impl Projections {
    /// Loads the Wasm projections and starts the enabled ones.
    pub async fn open(store: Store, runtime: Runtime) -> anyhow::Result<Self> {
        let reads = ProjectionReads::new(store.clone());
        let wasm = WasmProjections::load(store.clone(), runtime, reads.clone()).await?;
        Ok(Projections { store, wasm, reads })
    }

    pub fn list(&self) -> Vec<ProjectionStatus> {
        let mut list: Vec<ProjectionStatus> = SystemIndex::ALL
            .into_iter()
            .map(|index| self.reads.system_status(index))
            .collect();
        list.extend(self.wasm.list());
        list
    }

    pub fn status(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if is_system(name) {
            return Ok(self.reads.system_status(system(name)?));
        }
        self.wasm.status(name)
    }

    /// The status with the read model's digest (Wasm projections).
    pub async fn status_with_digest(
        &self,
        name: &str,
    ) -> Result<ProjectionStatus, ProjectionError> {
        if is_system(name) {
            return self.status(name);
        }
        self.wasm.status_with_digest(name).await
    }

    pub async fn start(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if !is_system(name) {
            return self.wasm.start(name).await;
        }
        let index = system(name)?;
        self.store.set_index_running(index, true).await?;
        Ok(self.reads.system_status(index))
    }

    pub async fn stop(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if !is_system(name) {
            return self.wasm.stop(name).await;
        }
        let index = system(name)?;
        self.store.set_index_running(index, false).await?;
        Ok(self.reads.system_status(index))
    }

    /// Builds the projection again beside the live version and switches when caught up.
    pub async fn rebuild(
        &self,
        name: &str,
        emitted: Emitted,
    ) -> Result<ProjectionStatus, ProjectionError> {
        if is_system(name) {
            system(name)?;
            return Err(ProjectionError::Conflict(format!(
                "{name} is a system projection: it is rebuilt with reset"
            )));
        }
        self.wasm.rebuild(name, emitted).await
    }

    /// Drops a rebuild in progress; the live version carries on.
    pub async fn cancel_rebuild(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if is_system(name) {
            system(name)?;
            return Err(ProjectionError::Missing(format!(
                "{name} is a system projection: it has no rebuild"
            )));
        }
        self.wasm.cancel_rebuild(name).await
    }

    /// Sets aside the event a faulted Wasm projection stopped at, and runs on past it.
    pub async fn skip(
        &self,
        name: &str,
        position: u64,
    ) -> Result<ProjectionStatus, ProjectionError> {
        reads::reject_system(name)?;
        self.wasm.skip(name, position).await
    }

    /// Drops the projection's output and reprocesses from position 0.
    pub async fn reset(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if !is_system(name) {
            return self.wasm.reset(name).await;
        }
        let index = system(name)?;
        self.store.reset_index(index).await?;
        Ok(self.reads.system_status(index))
    }

    /// Deploys a component under `name`; returns whether the projection is new, and its status.
    pub async fn deploy(
        &self,
        name: &str,
        component: Vec<u8>,
        options: DeployOptions,
    ) -> Result<(bool, ProjectionStatus), ProjectionError> {
        if is_system(name) {
            return Err(ProjectionError::Invalid(format!(
                "{name}: names starting with $ belong to the system projections"
            )));
        }
        self.wasm.deploy(name, component, options).await
    }

    /// Removes a Wasm projection with its state and tables; with `delete_emitted`, also the
    /// streams it emitted to and linked into.
    pub async fn delete(&self, name: &str, delete_emitted: bool) -> Result<(), ProjectionError> {
        if is_system(name) {
            system(name)?;
            return Err(ProjectionError::Conflict(format!(
                "{name} is a system projection; stop it instead"
            )));
        }
        self.wasm.delete(name, delete_emitted).await
    }

    /// Applies a configuration change; the projections whose output it changes are reset.
    pub async fn configure(
        &self,
        name: &str,
        change: ConfigChange,
    ) -> Result<IndexConfig, ProjectionError> {
        let index = system(name)?;
        let category = change.category_separator.is_some() || change.category_position.is_some();
        let correlation = change.correlation_property.is_some();
        let allowed = match index {
            SystemIndex::ByCategory | SystemIndex::StreamByCategory => !correlation,
            SystemIndex::ByCorrelationId => !category,
            SystemIndex::ByEventType => !category && !correlation,
        };
        if !allowed {
            // A valid change, of the configuration another system projection reads.
            return Err(ProjectionError::Conflict(format!(
                "{name} is not configured by these fields"
            )));
        }
        let mut config = self.store.blocking(|store| store.index_config()).await?;
        if let Some(separator) = change.category_separator {
            config.category_separator = separator;
        }
        if let Some(position) = change.category_position {
            config.category_position = position;
        }
        if let Some(property) = change.correlation_property {
            config.correlation_property = property;
        }
        config.validate().map_err(ProjectionError::Invalid)?;
        self.store.set_index_config(config.clone()).await?;
        Ok(config)
    }

    /// The queries of their read models.
    pub fn reads(&self) -> &ProjectionReads {
        &self.reads
    }

    /// Stops the Wasm projections' runners.
    pub async fn shutdown(&self) {
        self.wasm.shutdown().await;
    }
}

fn is_system(name: &str) -> bool {
    name.starts_with('$')
}

fn system(name: &str) -> Result<SystemIndex, ProjectionError> {
    SystemIndex::from_name(name).ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
}

/// How far `position` is towards `head`, truncated to a thousandth: 1 only once caught up.
fn fraction(position: u64, head: u64) -> f64 {
    if position >= head {
        return 1.0;
    }
    let thousandths = (u128::from(position) * 1000 / u128::from(head)).min(999);
    thousandths as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::fraction;

    #[test]
    fn progress_is_truncated_and_whole_only_at_the_head() {
        assert_eq!(fraction(0, 0), 1.0);
        assert_eq!(fraction(5, 5), 1.0);
        assert_eq!(
            fraction(999_999, 1_000_000),
            0.999,
            "not rounded up to 100%"
        );
        assert_eq!(fraction(1_234, 10_000), 0.123);
        assert_eq!(fraction(u64::MAX - 1, u64::MAX), 0.999);
    }
}
