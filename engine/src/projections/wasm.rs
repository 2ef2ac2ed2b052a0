//! The user's Wasm projections: deploy, lifecycle, and queries of their state and tables.
//!
//! Management operations take one lock and stop a projection's runner before they change its
//! definition or data, so a runner never commits into data that was reset or removed under it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::component::{Compiled, Runtime};
use super::reads::ProjectionReads;
use super::runner::{Definition, Live, Role, Runner, restart_rate};
use super::{
    Emitted, Fault, Mode, OnError, ParallelStatus, ProjectionError, ProjectionKind,
    ProjectionStatus, RebuildStatus, RunStatus, fraction,
};
use crate::names::Name;
use crate::store::{BuildChange, Checkpoint, DataChange, Store};

/// How an upload is to be deployed.
#[derive(Debug, Clone, Copy)]
pub struct DeployOptions {
    pub mode: Mode,
    pub emit: bool,
    pub enabled: bool,
    /// For an existing projection: build the new version beside the live one and switch when
    /// it has caught up (`true`), or continue from the checkpoint with the new code (`false`).
    pub rebuild: bool,
    /// What that switch does with the live version's emitted streams.
    pub emitted: Emitted,
    pub on_error: OnError,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            mode: Mode::Continuous,
            emit: false,
            enabled: true,
            rebuild: true,
            emitted: Emitted::default(),
            on_error: OnError::default(),
        }
    }
}

struct Entry {
    live: Arc<Live>,
    /// `None` when the stored component could not be compiled (the projection is faulted).
    compiled: Option<Compiled>,
    runner: Option<RunnerHandle>,
    building: Option<Build>,
}

/// A projection's live version and the version being rebuilt, if any.
type Lives = (Arc<Live>, Option<Arc<Live>>);

/// A version being rebuilt beside the live one.
struct Build {
    live: Arc<Live>,
    compiled: Compiled,
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
    /// The same `Live`s, readable without waiting for a management operation, with the build's.
    lives: Mutex<BTreeMap<String, Lives>>,
    /// Builds that caught up ask here to replace their live version: (name, data id).
    switches: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
    /// Queries of the read models, and their digests.
    reads: ProjectionReads,
}

impl WasmProjections {
    /// Loads the stored projections and starts the enabled ones from their checkpoints.
    pub async fn load(
        store: Store,
        runtime: Runtime,
        reads: ProjectionReads,
    ) -> anyhow::Result<Arc<WasmProjections>> {
        let stored = store.blocking(|store| store.stored_projections()).await?;
        let (switches, mut switch_requests) = tokio::sync::mpsc::unbounded_channel();
        let projections = Arc::new(WasmProjections {
            store,
            runtime,
            entries: tokio::sync::Mutex::new(BTreeMap::new()),
            lives: Mutex::new(BTreeMap::new()),
            switches,
            reads,
        });
        let weak: Weak<WasmProjections> = Arc::downgrade(&projections);
        tokio::spawn(async move {
            while let Some((name, data)) = switch_requests.recv().await {
                let Some(projections) = weak.upgrade() else {
                    return;
                };
                projections.switch(&name, data).await;
            }
        });
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
            let building = stored.building;
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
            let live = Live::new(name.clone(), definition, stored.component, data, checkpoint);
            let mut entry = Entry {
                live: live.clone(),
                compiled,
                runner: None,
                building: None,
            };
            if let Some(building) = building {
                let compiled = projections.compile_stored(&building.component).await;
                let definition = serde_json::from_value::<Definition>(building.definition);
                let loaded = match (compiled, definition) {
                    (Ok(compiled), Ok(definition)) => Ok((compiled, definition)),
                    (Err(error), _) => Err(format!("{error:#}")),
                    (_, Err(error)) => Err(error.to_string()),
                };
                match loaded {
                    Ok((compiled, definition)) => {
                        let checkpoint = projections.checkpoint(building.data).await?;
                        entry.building = Some(Build {
                            live: Live::new(
                                name.clone(),
                                definition,
                                building.component,
                                building.data,
                                checkpoint,
                            ),
                            compiled,
                            runner: None,
                        });
                    }
                    Err(error) => {
                        tracing::error!(projection = %name, %error, "cannot load the rebuild; it is dropped");
                        projections
                            .store
                            .build_projection(name.clone(), BuildChange::Cancel)
                            .await?;
                    }
                }
            }
            projections.start_if_runnable(&mut entry).await;
            projections.start_build(&mut entry);
            projections.publish(&name, &entry);
            entries.insert(name, entry);
        }
        drop(entries);
        Ok(projections)
    }

    /// Makes an entry's current `Live`s (and its build's) visible to status queries.
    fn publish(&self, name: &str, entry: &Entry) {
        let building = entry.building.as_ref().map(|build| build.live.clone());
        self.lives
            .lock()
            .expect("projections")
            .insert(name.to_owned(), (entry.live.clone(), building));
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
        Name::Projection
            .check(name)
            .map_err(ProjectionError::Invalid)?;
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
        let version = existing.as_ref().map_or(1, |entry| {
            let state = entry.live.state.lock().expect("projection state");
            let building = entry.building.as_ref().map_or(0, |build| {
                build
                    .live
                    .state
                    .lock()
                    .expect("projection state")
                    .definition
                    .version
            });
            state.definition.version.max(building) + 1
        });
        let definition = Definition {
            version,
            mode: options.mode,
            emit: options.emit,
            enabled: options.enabled,
            fault: None,
            completed: false,
            emitted: options.emitted,
            on_error: options.on_error,
        };
        if let (Some(entry), true) = (existing, options.rebuild) {
            // The new version builds beside the live one, which keeps serving.
            self.begin_build(entry, compiled, definition, Some(bytes))
                .await?;
            self.publish(name, entry);
            return Ok((false, self.status(name)?));
        }
        let data_change = if created {
            DataChange::Fresh {
                delete_outputs: false,
            }
        } else {
            DataChange::Keep
        };
        if let Some(entry) = entries.get_mut(name) {
            stop_runner(entry).await;
        }
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
            live: Live::new(
                name.to_owned(),
                definition.clone(),
                compiled.sha256.clone(),
                data,
                checkpoint,
            ),
            compiled: None,
            runner: None,
            building: None,
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
        self.publish(name, entry);
        Ok((created, self.status(name)?))
    }

    /// Rebuilds a projection with its current component beside the live version.
    pub async fn rebuild(
        &self,
        name: &str,
        emitted: Emitted,
    ) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        let Some(compiled) = entry.compiled.clone() else {
            return Err(ProjectionError::Conflict(format!(
                "{name} has no usable component; upload it again"
            )));
        };
        let mut definition = entry
            .live
            .state
            .lock()
            .expect("projection state")
            .definition
            .clone();
        definition.fault = None;
        definition.completed = false;
        definition.emitted = emitted;
        self.begin_build(entry, compiled, definition, None).await?;
        self.publish(name, entry);
        self.status(name)
    }

    /// Drops a rebuild in progress; the live version carries on.
    pub async fn cancel_rebuild(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        if entry.building.is_none() {
            return Err(ProjectionError::Missing(format!(
                "{name} is not being rebuilt"
            )));
        }
        self.drop_build(entry).await?;
        self.publish(name, entry);
        self.status(name)
    }

    /// Starts building `definition` with `compiled` from position 0 beside the live version,
    /// replacing a build in progress.
    async fn begin_build(
        &self,
        entry: &mut Entry,
        compiled: Compiled,
        definition: Definition,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), ProjectionError> {
        if let Some(build) = &mut entry.building {
            stop_build_runner(build).await;
        }
        let data = self
            .store
            .build_projection(
                entry.live.name.clone(),
                BuildChange::Start {
                    component: compiled.sha256.clone(),
                    definition: serde_json::to_value(&definition).expect("a definition is JSON"),
                    component_bytes: bytes,
                },
            )
            .await?;
        entry.building = Some(Build {
            live: Live::new(
                entry.live.name.clone(),
                definition,
                compiled.sha256.clone(),
                data,
                Checkpoint::default(),
            ),
            compiled,
            runner: None,
        });
        self.start_build(entry);
        Ok(())
    }

    async fn drop_build(&self, entry: &mut Entry) -> Result<(), ProjectionError> {
        if let Some(build) = &mut entry.building {
            stop_build_runner(build).await;
            self.store
                .build_projection(entry.live.name.clone(), BuildChange::Cancel)
                .await?;
            entry.building = None;
        }
        Ok(())
    }

    /// A build that caught up replaces the live version: both stop, the store switches the
    /// data in one transaction, and the new live version runs on from the build's checkpoint.
    async fn switch(&self, name: &str, data: u64) {
        let mut entries = self.entries.lock().await;
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        let current = entry.building.as_ref().map(|build| {
            let state = build.live.state.lock().expect("projection state");
            (state.data, state.definition.fault.is_some())
        });
        if current != Some((data, false)) {
            return;
        }
        let mut build = entry.building.take().expect("checked");
        stop_build_runner(&mut build).await;
        stop_runner(entry).await;
        let keep_emitted = build
            .live
            .state
            .lock()
            .expect("projection state")
            .definition
            .emitted
            == Emitted::Keep;
        let switched = self
            .store
            .build_projection(name.to_owned(), BuildChange::Switch { data, keep_emitted })
            .await;
        if let Err(error) = switched {
            // The store refused the switch whole: the live version carries on, and the build
            // stays, faulted with the reason, until it is cancelled, rebuilt or replaced.
            tracing::warn!(projection = %name, %error, "cannot switch to the rebuilt version");
            {
                let mut state = build.live.state.lock().expect("projection state");
                let position = state.checkpoint.position;
                state.definition.fault = Some(Fault {
                    message: error.to_string(),
                    position,
                });
            }
            entry.building = Some(build);
            self.start_if_runnable(entry).await;
            self.publish(name, entry);
            return;
        }
        let checkpoint = match self.checkpoint(data).await {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                tracing::error!(projection = %name, %error, "cannot read the rebuilt checkpoint");
                Checkpoint::default()
            }
        };
        {
            let built = build.live.state.lock().expect("projection state");
            let mut state = entry.live.state.lock().expect("projection state");
            state.definition = built.definition.clone();
            state.component = built.component.clone();
            state.data = data;
            state.checkpoint = checkpoint;
            state.parallel = built.parallel;
        }
        entry.compiled = Some(build.compiled);
        tracing::info!(projection = %name, position = checkpoint.position, "switched to the rebuilt version");
        self.start_if_runnable(entry).await;
        self.publish(name, entry);
    }

    async fn checkpoint(&self, data: u64) -> Result<Checkpoint, ProjectionError> {
        Ok(self
            .store
            .blocking(move |store| store.projection_view(data)?.checkpoint())
            .await?
            .unwrap_or_default())
    }

    pub fn list(&self) -> Vec<ProjectionStatus> {
        let names: Vec<String> = self
            .lives
            .lock()
            .expect("projections")
            .keys()
            .cloned()
            .collect();
        names
            .iter()
            .filter_map(|name| self.status(name).ok())
            .collect()
    }

    pub fn status(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let (live, building) = self.lives(name)?;
        Ok(status_of_versions(
            self.store.head(),
            self.runtime.partition_workers(),
            &live,
            building.as_deref(),
        ))
    }

    /// The status with the digest of the model, consistent with each other.
    pub async fn status_with_digest(
        &self,
        name: &str,
    ) -> Result<ProjectionStatus, ProjectionError> {
        self.reads.with_digest(name, self.status(name)?).await
    }

    fn lives(&self, name: &str) -> Result<Lives, ProjectionError> {
        self.lives
            .lock()
            .expect("projections")
            .get(name)
            .cloned()
            .ok_or_else(|| ProjectionError::NotFound(name.to_owned()))
    }

    /// Runs it again: from its checkpoint, after a stop, a fault or completion.
    /// Sets aside, by hand, the event a faulted projection stopped at, and runs on past it.
    pub async fn skip(
        &self,
        name: &str,
        position: u64,
    ) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        let (fault, data) = {
            let state = entry.live.state.lock().expect("projection state");
            (state.definition.fault.clone(), state.data)
        };
        let Some(fault) = fault.filter(|fault| fault.position == position) else {
            return Err(ProjectionError::Conflict(format!(
                "{name} did not stop at position {position}: only the event a faulted projection \
                 stopped at can be skipped"
            )));
        };
        stop_runner(entry).await;
        let read = self
            .store
            .blocking(move |store| {
                let mut found = None;
                store.scan_log(position, position + 1, |_, record| {
                    found = Some(serde_json::json!({
                        "stream": record.stream,
                        "revision": record.revision,
                        "type": record.event_type,
                    }));
                    false
                })?;
                Ok(found)
            })
            .await?;
        let mut reason = read.unwrap_or_else(|| serde_json::json!({}));
        reason["on_error"] = "skip".into();
        reason["error"] = fault.message.into();
        reason["by_hand"] = true.into();
        let reason = serde_json::to_vec(&reason).expect("a reason is JSON");
        let checkpoint = self
            .store
            .skip_projection_event(name.to_owned(), data, position, reason)
            .await?;
        entry
            .live
            .state
            .lock()
            .expect("projection state")
            .checkpoint = checkpoint;
        tracing::warn!(projection = %name, position, "an event was skipped by hand");
        self.save_definition(entry, DataChange::Keep, |definition| {
            definition.enabled = true;
            definition.fault = None;
        })
        .await?;
        self.start_if_runnable(entry).await;
        self.publish(name, entry);
        self.status(name)
    }

    pub async fn start(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        if entry.compiled.is_none() {
            return Err(ProjectionError::Conflict(format!(
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
        if let Some(build) = &mut entry.building {
            stop_build_runner(build).await;
            let mut state = build.live.state.lock().expect("projection state");
            state.definition.fault = None;
            state.definition.enabled = true;
        }
        self.start_build(entry);
        self.status(name)
    }

    /// Stops the live version and a rebuild in progress (`start` resumes both).
    pub async fn stop(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        stop_runner(entry).await;
        if let Some(build) = &mut entry.building {
            stop_build_runner(build).await;
            let mut state = build.live.state.lock().expect("projection state");
            state.definition.enabled = false;
        }
        self.save_definition(entry, DataChange::Keep, |definition| {
            definition.enabled = false;
        })
        .await?;
        self.status(name)
    }

    /// Drops state, tables and emitted streams (and a rebuild in progress), then reprocesses
    /// from position 0.
    pub async fn reset(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        self.drop_build(entry).await?;
        self.publish(name, entry);
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
        self.status(name)
    }

    pub async fn delete(&self, name: &str, delete_emitted: bool) -> Result<(), ProjectionError> {
        let mut entries = self.entries.lock().await;
        let entry = entry_mut(&mut entries, name)?;
        stop_runner(entry).await;
        if let Some(build) = &mut entry.building {
            stop_build_runner(build).await;
        }
        self.store
            .remove_projection(name.to_owned(), delete_emitted)
            .await?;
        entries.remove(name);
        self.lives.lock().expect("projections").remove(name);
        self.reads.forget(name);
        Ok(())
    }

    /// Stops every runner; their last batches commit or are replayed after a restart.
    pub async fn shutdown(&self) {
        let mut entries = self.entries.lock().await;
        for entry in entries.values_mut() {
            stop_runner(entry).await;
            if let Some(build) = &mut entry.building {
                stop_build_runner(build).await;
            }
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
        entry.runner = Some(self.spawn_runner(&entry.live, compiled, index_config, Role::Live));
    }

    /// Runs the entry's build, unless it faulted or is stopped.
    fn start_build(&self, entry: &mut Entry) {
        let Some(build) = &mut entry.building else {
            return;
        };
        {
            let definition = &build
                .live
                .state
                .lock()
                .expect("projection state")
                .definition;
            if build.runner.is_some() || definition.fault.is_some() || !definition.enabled {
                return;
            }
        }
        let index_config = match self.store.index_config() {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "cannot read the category configuration");
                return;
            }
        };
        let role = Role::Build {
            switch: self.switches.clone(),
        };
        build.runner =
            Some(self.spawn_runner(&build.live, build.compiled.clone(), index_config, role));
    }

    fn spawn_runner(
        &self,
        live: &Arc<Live>,
        compiled: Compiled,
        index_config: crate::store::IndexConfig,
        role: Role,
    ) -> RunnerHandle {
        restart_rate(live);
        live.state.lock().expect("projection state").running = true;
        let cancel = CancellationToken::new();
        let runner = Runner {
            role,
            live: live.clone(),
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            compiled,
            index_config,
            cancel: cancel.clone(),
            handle: tokio::runtime::Handle::current(),
            held: Mutex::new(BTreeMap::new()),
        };
        let live = live.clone();
        let task = tokio::task::spawn_blocking(move || {
            runner.run();
            live.state.lock().expect("projection state").running = false;
        });
        RunnerHandle { cancel, task }
    }
}

/// The status of a projection's live version, with the version being rebuilt beside it.
pub(super) fn status_of_versions(
    head_position: u64,
    workers: usize,
    live: &Live,
    building: Option<&Live>,
) -> ProjectionStatus {
    let mut status = status_of(head_position, workers, live);
    if let Some(building) = building {
        let build = status_of(head_position, workers, building);
        if build.fault.is_none() {
            status.status = RunStatus::Rebuilding;
        }
        status.rebuild = Some(RebuildStatus {
            version: build.version,
            wasm_sha256: build.wasm_sha256.unwrap_or_default(),
            status: build.status,
            position: build.position,
            events_processed: build.events_processed,
            events_per_second: build.events_per_second,
            progress: build.progress,
            eta_seconds: build.eta_seconds,
            fault: build.fault,
            parallel: build.parallel,
            emitted: building
                .state
                .lock()
                .expect("projection state")
                .definition
                .emitted,
            rewrites: None,
        });
    }
    status
}

/// A version's status as its `Live` has it.
fn status_of(head_position: u64, workers: usize, live: &Live) -> ProjectionStatus {
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
    let events_per_second = if state.running {
        state.rate.per_second()
    } else {
        0.0
    };
    let eta_seconds = (events_per_second > 0.0 && position < head_position)
        .then(|| head_position.saturating_sub(position) as f64 / events_per_second);
    let counts = state.parallel;
    let parallel = (counts.parallel_events + counts.rerun_events > 0).then_some(ParallelStatus {
        workers,
        parallel_events: counts.parallel_events,
        rerun_events: counts.rerun_events,
    });
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
        events_per_second,
        eta_seconds,
        progress: fraction(position, head_position),
        fault: definition.fault.clone(),
        rebuild: None,
        digest: None,
        parallel,
        on_error: Some(definition.on_error),
        emitted: None,
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
    stop(entry.runner.take(), &entry.live.name).await;
}

async fn stop_build_runner(build: &mut Build) {
    stop(build.runner.take(), &build.live.name).await;
}

async fn stop(runner: Option<RunnerHandle>, name: &str) {
    if let Some(runner) = runner {
        runner.cancel.cancel();
        if let Err(error) = runner.task.await {
            tracing::error!(projection = %name, %error, "projection runner failed");
        }
    }
}
