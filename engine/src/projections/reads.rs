//! What any node can answer about the projections from the data it has applied: the Wasm
//! projections' states, tables, partitions and parked events, their digests, and their status
//! as the stored definitions give it. The node that runs them (a single node, or a cluster's
//! leader) adds what only it knows, such as the rate of each runner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::runner::{Definition, Live};
use super::wasm::status_of_versions;
use super::{
    Emitted, ProjectionError, ProjectionKind, ProjectionStatus, Rewrites, RunStatus, fraction,
    is_system, system,
};
use crate::store::{Direction, IndexConfig, KeyPage, ProjectionView, RecordedEvent};
use crate::store::{RowPage, Store, StoreError, SystemIndex, parked_stream};

/// The last digest of each projection, with the data id and position it is of.
type Digests = BTreeMap<String, (u64, u64, String)>;

/// Queries of the projections that need only the store.
#[derive(Clone)]
pub struct ProjectionReads {
    store: Store,
    /// A model that has not moved is not hashed again (progress bars ask for the status often).
    digests: Arc<Mutex<Digests>>,
}

impl ProjectionReads {
    pub fn new(store: Store) -> ProjectionReads {
        ProjectionReads {
            store,
            digests: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Every projection's status as the stored definitions give it: an enabled projection
    /// that has not stopped on its own is reported running (the node that runs the projections
    /// runs it), without a rate.
    pub async fn stored_list(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let mut list: Vec<ProjectionStatus> = SystemIndex::ALL
            .into_iter()
            .map(|index| self.system_status(index))
            .collect();
        list.extend(self.stored_wasm(None).await?);
        Ok(list)
    }

    /// One projection's status as the stored definition gives it, with its digest.
    pub async fn stored_status(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        if is_system(name) {
            return Ok(self.system_status(system(name)?));
        }
        let status = self
            .stored_wasm(Some(name.to_owned()))
            .await?
            .pop()
            .ok_or_else(|| ProjectionError::NotFound(name.to_owned()))?;
        self.with_digest(name, status).await
    }

    /// The status of the stored Wasm projections (only `only`, when given).
    async fn stored_wasm(
        &self,
        only: Option<String>,
    ) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let versions = self
            .store
            .blocking(move |store| {
                // A version as its runner would hold it, running when the definition says so;
                // `None` for a definition this version cannot read (the runner skips it too).
                let version = |name: &str, definition, component, data| {
                    let Ok(definition) = serde_json::from_value::<Definition>(definition) else {
                        return Ok(None);
                    };
                    let checkpoint = store.projection_view(data)?.checkpoint()?;
                    let running =
                        definition.enabled && definition.fault.is_none() && !definition.completed;
                    let checkpoint = checkpoint.unwrap_or_default();
                    let live = Live::new(name.to_owned(), definition, component, data, checkpoint);
                    live.state.lock().expect("projection state").running = running;
                    Ok::<_, StoreError>(Some(live))
                };
                let mut versions = Vec::new();
                for (name, stored) in store.stored_projections()? {
                    if only.as_ref().is_some_and(|only| *only != name) {
                        continue;
                    }
                    let live = version(&name, stored.definition, stored.component, stored.data)?;
                    let Some(live) = live else { continue };
                    let building = match stored.building {
                        Some(b) => version(&name, b.definition, b.component, b.data)?,
                        None => None,
                    };
                    versions.push((live, building));
                }
                Ok(versions)
            })
            .await?;
        let head = self.store.head();
        Ok(versions
            .iter()
            .map(|(live, building)| status_of_versions(head, 0, live, building.as_deref()))
            .collect())
    }

    /// `status` with the digest of the model and the position of the same snapshot of it.
    pub async fn with_digest(
        &self,
        name: &str,
        mut status: ProjectionStatus,
    ) -> Result<ProjectionStatus, ProjectionError> {
        let cached = self.digests.lock().expect("digests").get(name).cloned();
        let (data, checkpoint, digest) = self
            .view(name, move |view| {
                let checkpoint = view.checkpoint()?;
                let position = checkpoint.map(|checkpoint| checkpoint.position);
                let digest = match cached {
                    Some((data, at, digest)) if data == view.data() && Some(at) == position => {
                        digest
                    }
                    _ => view.digest()?,
                };
                Ok((view.data(), checkpoint, digest))
            })
            .await?;
        if let Some(checkpoint) = checkpoint {
            self.digests
                .lock()
                .expect("digests")
                .insert(name.to_owned(), (data, checkpoint.position, digest.clone()));
            // The data may have moved on (or been reset) since the status was taken: report
            // the snapshot's position.
            status.position = checkpoint.position;
            status.events_processed = checkpoint.events_processed;
            status.progress = fraction(checkpoint.position, status.head_position);
        }
        status.digest = Some(digest);
        let owned = name.to_owned();
        let footprint = self
            .store
            .blocking(move |store| store.emitted_footprint(&owned))
            .await?;
        status.emitted = footprint.map(|(streams, events)| Rewrites { streams, events });
        if let Some(rebuild) = &mut status.rebuild
            && rebuild.emitted == Emitted::Replace
        {
            let name = name.to_owned();
            let preview = self
                .store
                .blocking(move |store| store.rewrite_preview(&name))
                .await?;
            rebuild.rewrites = preview.map(|(streams, events)| Rewrites { streams, events });
        }
        Ok(status)
    }

    /// Drops what is cached about a removed projection.
    pub fn forget(&self, name: &str) {
        self.digests.lock().expect("digests").remove(name);
    }

    pub fn system_status(&self, index: SystemIndex) -> ProjectionStatus {
        let progress = self.store.index_progress(index);
        let head_position = self.store.head();
        ProjectionStatus {
            name: index.name().to_owned(),
            kind: ProjectionKind::System,
            status: if progress.running {
                RunStatus::Running
            } else {
                RunStatus::Stopped
            },
            mode: super::Mode::Continuous,
            version: 1,
            wasm_sha256: None,
            position: progress.checkpoint,
            head_position,
            events_processed: progress.checkpoint,
            events_per_second: progress.events_per_second(),
            eta_seconds: None,
            progress: fraction(progress.checkpoint, head_position),
            fault: None,
            rebuild: None,
            digest: None,
            parallel: None,
            on_error: None,
            emitted: None,
        }
    }

    /// The system projections' configuration (`name` one of them).
    pub async fn config(&self, name: &str) -> Result<IndexConfig, ProjectionError> {
        system(name)?;
        Ok(self.store.blocking(|store| store.index_config()).await?)
    }

    /// A partition's state (`""` for an unpartitioned projection).
    pub async fn state(
        &self,
        name: &str,
        partition: String,
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        reject_system(name)?;
        self.view(name, move |view| view.state(&partition)).await
    }

    pub async fn row(
        &self,
        name: &str,
        table: String,
        key: String,
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        reject_system(name)?;
        let read = self
            .view(name, move |view| match view.row(&table, &key)? {
                Some(row) => Ok(Ok(Some(row))),
                None => known_table(view, table).map(|known| known.map(|()| None)),
            })
            .await?;
        read.map_err(|missing| missing.of(name))
    }

    pub async fn rows(
        &self,
        name: &str,
        table: String,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<RowPage, ProjectionError> {
        reject_system(name)?;
        let read = self
            .view(name, move |view| {
                let page = view.rows(&table, &prefix, after.as_deref(), limit)?;
                if !page.rows.is_empty() {
                    return Ok(Ok(page));
                }
                known_table(view, table).map(|known| known.map(|()| page))
            })
            .await?;
        read.map_err(|missing| missing.of(name))
    }

    /// Partitions with a state, paged by key.
    pub async fn partitions(
        &self,
        name: &str,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<KeyPage, ProjectionError> {
        reject_system(name)?;
        self.view(name, move |view| {
            view.partitions(&prefix, after.as_deref(), limit)
        })
        .await
    }

    /// The events the projection set aside, from revision `from` of its parked stream, each
    /// with why (JSON).
    pub async fn parked(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(RecordedEvent, Option<Vec<u8>>)>, ProjectionError> {
        reject_system(name)?;
        let owned = name.to_owned();
        let parked = self
            .store
            .blocking(move |store| {
                let name = owned;
                let Some(view) = store.served_projection_view(&name)? else {
                    return Ok(None);
                };
                let stream = parked_stream(&name);
                let read = store.read_stream(&stream, Some(from), Direction::Forward, limit, true);
                let slice = match read {
                    Err(StoreError::StreamNotFound(_)) => return Ok(Some(Vec::new())),
                    other => other?,
                };
                slice
                    .events
                    .into_iter()
                    .map(|event| {
                        let reason = view.parked_reason(event.position)?;
                        Ok((event, reason))
                    })
                    .collect::<Result<_, StoreError>>()
                    .map(Some)
            })
            .await?;
        parked.ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
    }

    /// Reads the data the projection serves, on the blocking pool.
    async fn view<T: Send + 'static>(
        &self,
        name: &str,
        read: impl FnOnce(&ProjectionView) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ProjectionError> {
        let owned = name.to_owned();
        let read = self
            .store
            .blocking(move |store| match store.served_projection_view(&owned)? {
                Some(view) => read(&view).map(Some),
                None => Ok(None),
            })
            .await?;
        read.ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
    }
}

pub(super) fn reject_system(name: &str) -> Result<(), ProjectionError> {
    if is_system(name) {
        system(name)?;
        return Err(ProjectionError::Missing(format!(
            "{name} is a system projection: it has no state or tables; read its output streams"
        )));
    }
    Ok(())
}

/// A table the projection never wrote to, with those it did.
struct UnknownTable {
    table: String,
    known: Vec<String>,
}

impl UnknownTable {
    fn of(self, projection: &str) -> ProjectionError {
        let known = if self.known.is_empty() {
            "it has none".to_owned()
        } else {
            format!("its tables are {}", self.known.join(", "))
        };
        ProjectionError::Missing(format!(
            "{projection} has no table {:?}: {known}",
            self.table
        ))
    }
}

/// Whether `table` holds rows; when not, what the projection's tables are.
fn known_table(
    view: &ProjectionView,
    table: String,
) -> Result<Result<(), UnknownTable>, StoreError> {
    let known = view.tables()?;
    Ok(if known.contains(&table) {
        Ok(())
    } else {
        Err(UnknownTable { table, known })
    })
}
