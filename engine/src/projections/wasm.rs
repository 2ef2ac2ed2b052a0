//! The user's Wasm projections: deploy, lifecycle, and queries of their state and tables.
//!
//! Management operations take one lock and stop a projection's runner before they change its
//! definition or data, so a runner never commits into data that was reset or removed under it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::component::{Compiled, Runtime};
use super::runner::{Definition, Live, LiveState, Rate, Runner, restart_rate};
use super::{Fault, Mode, ProjectionError, ProjectionKind, ProjectionStatus, RunStatus, fraction};
use crate::store::Store;
use crate::store::projection_data::{Checkpoint, DataChange, RowPage};

/// Longest projection name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// How an upload is to be deployed.
#[derive(Debug, Clone, Copy)]
pub struct DeployOptions {
    pub mode: Mode,
    pub emit: bool,
    pub enabled: bool,
    /// For an existing projection: start its data afresh (`true`) or continue from its
    /// checkpoint with the new code (`false`).
    pub rebuild: bool,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            mode: Mode::Continuous,
            emit: false,
            enabled: true,
            rebuild: true,
        }
    }
}

struct Entry {
    live: Arc<Live>,
    /// `None` when the stored component could not be compiled (the projection is faulted).
    compiled: Option<Compiled>,
    runner: Option<RunnerHandle>,
}

struct RunnerHandle {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

pub(super) struct WasmProjections {
    store: Store,
    runtime: Runtime,
    entries: tokio::sync::Mutex<BTreeMap<String, Entry>>,
    /// The same `Live`s, readable without waiting for a management operation.
    lives: Mutex<BTreeMap<String, Arc<Live>>>,
}

pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "a projection name must be 1 to {MAX_NAME_BYTES} bytes long"
        ));
    }
    if name.starts_with('$') {
        return Err("names starting with $ belong to the system projections".into());
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err("a projection name must not contain control characters or /".into());
    }
    Ok(())
}

impl WasmProjections {
    /// Loads the stored projections and starts the enabled ones from their checkpoints.
    pub async fn load(store: Store, runtime: Runtime) -> anyhow::Result<WasmProjections> {
        let stored = store.blocking(|store| store.stored_projections()).await?;
        let projections = WasmProjections {
            store,
            runtime,
            entries: tokio::sync::Mutex::new(BTreeMap::new()),
            lives: Mutex::new(BTreeMap::new()),
        };
        let mut entries = projections.entries.lock().await;
        for (name, stored) in stored {
            let mut definition: Definition = match serde_json::from_value(stored.definition) {
                Ok(definition) => definition,
                Err(error) => {
                    tracing::error!(projection = %name, %error, "unreadable definition; skipped");
                    continue;
                }
            };
            let data = stored.data;
            let checkpoint = projections.checkpoint(data).await?;
            let compiled = projections.compile_stored(&stored.component).await;
            let compiled = match compiled {
                Ok(compiled) => Some(compiled),
                Err(error) => {
                    definition.fault = Some(Fault {
                        message: format!("cannot load the component: {error:#}"),
                        position: checkpoint.position,
                    });
                    None
                }
            };
            let live = Arc::new(Live {
                name: name.clone(),
                state: Mutex::new(LiveState {
                    definition,
                    component: stored.component,
                    data,
                    checkpoint,
                    running: false,
                    rate: Rate::default(),
                }),
            });
            let mut entry = Entry {
                live: live.clone(),
                compiled,
                runner: None,
            };
            projections.start_if_runnable(&mut entry).await;
            projections
                .lives
                .lock()
                .expect("projections")
                .insert(name.clone(), live);
            entries.insert(name, entry);
        }
        drop(entries);
        Ok(projections)
    }

    async fn compile_stored(&self, sha256: &str) -> anyhow::Result<Compiled> {
        let sha256 = sha256.to_owned();
        let bytes = self
            .store
            .blocking(move |store| store.component(&sha256))
            .await?
            .ok_or_else(|| anyhow::anyhow!("the component is missing"))?;
        let runtime = self.runtime.clone();
        // Loading a cached artifact takes under a millisecond; compiling is CPU work.
        tokio::task::spawn_blocking(move || runtime.compile(&bytes)).await?
    }

    /// Validates, compiles and deploys a component. Returns whether the projection is new.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        options: DeployOptions,
    ) -> Result<(bool, ProjectionStatus), ProjectionError> {
        validate_name(name).map_err(ProjectionError::Invalid)?;
        let runtime = self.runtime.clone();
        let (compiled, bytes) = tokio::task::spawn_blocking(move || {
            let compiled = runtime.compile(&bytes);
            (compiled, bytes)
        })
        .await
        .map_err(|error| ProjectionError::Invalid(format!("compilation failed: {error}")))?;
        let compiled = compiled.map_err(|error| ProjectionError::Invalid(format!("{error:#}")))?;

        let mut entries = self.entries.lock().await;
        let existing = entries.get_mut(name);
        let created = existing.is_none();
        let (version, data_change) = match &existing {
            Some(entry) => {
                let state = entry.live.state.lock().expect("projection state");
                let change = if options.rebuild {
                    DataChange::Fresh {
                        delete_outputs: true,
                    }
                } else {
                    DataChange::Keep
                };
                (state.definition.version + 1, change)
            }
            None => (
                1,
                DataChange::Fresh {
                    delete_outputs: false,
                },
            ),
        };
        if let Some(entry) = existing {
            stop_runner(entry).await;
        }
        let definition = Definition {
            version,
            mode: options.mode,
            emit: options.emit,
            enabled: options.enabled,
            fault: None,
            completed: false,
        };
        let data = self
            .store
            .save_projection(
                name.to_owned(),
                compiled.sha256.clone(),
                serde_json::to_value(&definition).expect("a definition is JSON"),
                Some(bytes),
                data_change,
            )
            .await?;
        let checkpoint = self.checkpoint(data).await?;
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            live: Arc::new(Live {
                name: name.to_owned(),
                state: Mutex::new(LiveState {
                    definition: definition.clone(),
                    component: compiled.sha256.clone(),
                    data,
                    checkpoint,
                    running: false,
                    rate: Rate::default(),
                }),
            }),
            compiled: None,
            runner: None,
        });
        {
            let mut state = entry.live.state.lock().expect("projection state");
            state.definition = definition;
            state.component = compiled.sha256.clone();
            state.data = data;
            state.checkpoint = checkpoint;
        }
        entry.compiled = Some(compiled);
        self.start_if_runnable(entry).await;
        self.lives
            .lock()
            .expect("projections")
            .insert(name.to_owned(), entry.live.clone());
        let status = self.status_of(&entry.live);
        Ok((created, status))
    }

    async fn checkpoint(&self, data: u64) -> Result<Checkpoint, ProjectionError> {
        Ok(self
            .store
            .blocking(move |store| store.projection_view(data)?.checkpoint())
            .await?
            .unwrap_or_default())
    }

    pub fn list(&self) -> Vec<ProjectionStatus> {
        let lives: Vec<Arc<Live>> = self
            .lives
            .lock()
            .expect("projections")
            .values()
            .cloned()
            .collect();
        lives.iter().map(|live| self.status_of(live)).collect()
    }

    pub fn status(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        Ok(self.status_of(self.live(name)?.as_ref()))
    }

    /// The status with the digest of the model, consistent with each other: both come from one
    /// snapshot of the data.
    pub async fn status_with_digest(
        &self,
        name: &str,
    ) -> Result<ProjectionStatus, ProjectionError> {
        let live = self.live(name)?;
        let data = live.state.lock().expect("projection state").data;
        let (checkpoint, digest) = self
            .store
            .blocking(move |store| {
                let view = store.projection_view(data)?;
                Ok((view.checkpoint()?, view.digest()?))
            })
            .await?;
        let mut status = self.status_of(&live);
        // The data may have moved on (or been reset) since: report the snapshot's position.
        if let Some(checkpoint) = checkpoint {
            status.position = checkpoint.position;
            status.events_processed = checkpoint.events_processed;
            status.progress = fraction(checkpoint.position, status.head_position);
        }
        status.digest = Some(digest);
        Ok(status)
    }

    fn live(&self, name: &str) -> Result<Arc<Live>, ProjectionError> {
        self.lives
            .lock()
            .expect("projections")
            .get(name)
            .cloned()
            .ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
    }

    /// Runs it again: from its checkpoint, after a stop, a fault or completion.
    pub async fn start(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        if entry.compiled.is_none() {
            return Err(ProjectionError::Invalid(format!(
                "{name} has no usable component; upload it again"
            )));
        }
        stop_runner(entry).await;
        self.save_definition(entry, DataChange::Keep, |definition| {
            definition.enabled = true;
            definition.fault = None;
            definition.completed = false;
        })
        .await?;
        self.start_if_runnable(entry).await;
        Ok(self.status_of(&entry.live))
    }

    pub async fn stop(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        stop_runner(entry).await;
        self.save_definition(entry, DataChange::Keep, |definition| {
            definition.enabled = false;
        })
        .await?;
        Ok(self.status_of(&entry.live))
    }

    /// Drops state, tables and emitted streams, then reprocesses from position 0.
    pub async fn reset(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        stop_runner(entry).await;
        self.save_definition(
            entry,
            DataChange::Fresh {
                delete_outputs: true,
            },
            |definition| {
                definition.fault = None;
                definition.completed = false;
            },
        )
        .await?;
        self.start_if_runnable(entry).await;
        Ok(self.status_of(&entry.live))
    }

    pub async fn delete(&self, name: &str, delete_emitted: bool) -> Result<(), ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        stop_runner(entry).await;
        self.store
            .remove_projection(name.to_owned(), delete_emitted)
            .await?;
        entries.remove(name);
        self.lives.lock().expect("projections").remove(name);
        Ok(())
    }

    /// A partition's state (`""` for an unpartitioned projection).
    pub async fn state(
        &self,
        name: &str,
        partition: String,
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        let data = self.data(name)?;
        Ok(self
            .store
            .blocking(move |store| store.projection_view(data)?.state(&partition))
            .await?)
    }

    pub async fn row(
        &self,
        name: &str,
        table: String,
        key: String,
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        let data = self.data(name)?;
        Ok(self
            .store
            .blocking(move |store| store.projection_view(data)?.row(&table, &key))
            .await?)
    }

    pub async fn rows(
        &self,
        name: &str,
        table: String,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<RowPage, ProjectionError> {
        let data = self.data(name)?;
        Ok(self
            .store
            .blocking(move |store| {
                store
                    .projection_view(data)?
                    .rows(&table, &prefix, after.as_deref(), limit)
            })
            .await?)
    }

    fn data(&self, name: &str) -> Result<u64, ProjectionError> {
        let live = self.live(name)?;
        let data = live.state.lock().expect("projection state").data;
        Ok(data)
    }

    /// Stops every runner; their last batches commit or are replayed after a restart.
    pub async fn shutdown(&self) {
        let mut entries = self.entries.lock().await;
        for entry in entries.values_mut() {
            stop_runner(entry).await;
        }
    }

    /// Changes the definition and persists it; with fresh data the projection starts over from
    /// position 0. The live copy changes only once the store has the new one.
    async fn save_definition(
        &self,
        entry: &mut Entry,
        data: DataChange,
        change: impl FnOnce(&mut Definition),
    ) -> Result<(), ProjectionError> {
        let (mut definition, component) = {
            let state = entry.live.state.lock().expect("projection state");
            (state.definition.clone(), state.component.clone())
        };
        change(&mut definition);
        let data_id = self
            .store
            .save_projection(
                entry.live.name.clone(),
                component,
                serde_json::to_value(&definition).expect("a definition is JSON"),
                None,
                data,
            )
            .await?;
        let mut state = entry.live.state.lock().expect("projection state");
        state.definition = definition;
        if data != DataChange::Keep {
            state.data = data_id;
            state.checkpoint = Checkpoint::default();
        }
        Ok(())
    }

    async fn start_if_runnable(&self, entry: &mut Entry) {
        let Some(compiled) = entry.compiled.clone() else {
            return;
        };
        {
            let state = entry.live.state.lock().expect("projection state");
            let definition = &state.definition;
            if !definition.enabled || definition.fault.is_some() || definition.completed {
                return;
            }
        }
        let index_config = match self.store.blocking(|store| store.index_config()).await {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "cannot read the category configuration");
                return;
            }
        };
        restart_rate(&entry.live);
        entry.live.state.lock().expect("projection state").running = true;
        let cancel = CancellationToken::new();
        let runner = Runner {
            live: entry.live.clone(),
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            compiled,
            index_config,
            cancel: cancel.clone(),
            handle: tokio::runtime::Handle::current(),
        };
        let live = entry.live.clone();
        let task = tokio::task::spawn_blocking(move || {
            runner.run();
            live.state.lock().expect("projection state").running = false;
        });
        entry.runner = Some(RunnerHandle { cancel, task });
    }

    fn status_of(&self, live: &Live) -> ProjectionStatus {
        let head_position = self.store.head();
        let state = live.state.lock().expect("projection state");
        let definition = &state.definition;
        let status = if definition.fault.is_some() {
            RunStatus::Faulted
        } else if definition.completed {
            RunStatus::Completed
        } else if state.running {
            RunStatus::Running
        } else {
            RunStatus::Stopped
        };
        let position = state.checkpoint.position;
        ProjectionStatus {
            name: live.name.clone(),
            kind: ProjectionKind::Wasm,
            status,
            mode: definition.mode,
            version: definition.version,
            wasm_sha256: Some(state.component.clone()),
            position,
            head_position,
            events_processed: state.checkpoint.events_processed,
            events_per_second: if state.running {
                state.rate.per_second()
            } else {
                0.0
            },
            progress: fraction(position, head_position),
            fault: definition.fault.clone(),
            digest: None,
        }
    }
}

fn entry_mut<'a>(
    entries: &'a mut BTreeMap<String, Entry>,
    name: &str,
) -> Result<&'a mut Entry, ProjectionError> {
    entries
        .get_mut(name)
        .ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
}

async fn stop_runner(entry: &mut Entry) {
    if let Some(runner) = entry.runner.take() {
        runner.cancel.cancel();
        if let Err(error) = runner.task.await {
            tracing::error!(projection = %entry.live.name, %error, "projection runner failed");
        }
    }
}
