//! What every WebAssembly guest runs in, projection or sharder: one wasmtime `Engine` with a
//! deadline clock, compiled components cached on disk by hash, WASI without any authority, and a
//! memory limit per instance.
//!
//! Guests get WASI without files, network, environment or arguments; clocks stand still and
//! randomness is a fixed sequence, so a guest cannot tell two runs apart. Every call has a
//! deadline (epoch interruption) and every instance a memory limit; hitting either traps the
//! call, which fails that guest only.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, ResourceLimiter};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx};

mod output;

pub use output::{GuestKind, GuestLog, GuestOutput, HeldLine, MAX_LINE_CHARS};

/// How often the deadline clock ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits every guest instance runs under.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Longest a single call into a guest may run.
    pub call_timeout: Duration,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            memory_bytes: 256 << 20,
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl Sandbox {
    /// The call timeout in ticks of the deadline clock.
    pub fn deadline_ticks(&self) -> u64 {
        (self.call_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    pub fn call_timeout_ms(&self) -> u64 {
        self.deadline_ticks() * EPOCH_TICK.as_millis() as u64
    }
}

/// The engine guests run on, with its deadline clock. Cheap to clone.
#[derive(Clone)]
pub struct GuestEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    /// Where compiled artifacts are cached; `None` compiles every time.
    cache_dir: Option<PathBuf>,
    compatibility: String,
    sandbox: Sandbox,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        // Wakes guests still running so nothing waits on a dropped engine.
        self.engine.increment_epoch();
    }
}

impl GuestEngine {
    pub fn new(cache_dir: Option<PathBuf>, sandbox: Sandbox) -> anyhow::Result<GuestEngine> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Calls are synchronous; without this a call costs about four times as much.
        config.concurrency_support(false);
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compatibility = format!("{:016x}", hasher.finish());
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let inner = Arc::new(EngineInner {
            engine,
            cache_dir,
            compatibility,
            sandbox,
        });
        // The ticker holds only a weak reference: it ends with the engine.
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("refract-wasm-epoch".into())
            .spawn(move || {
                while let Some(inner) = weak.upgrade() {
                    inner.engine.increment_epoch();
                    drop(inner);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(GuestEngine { inner })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn sandbox(&self) -> Sandbox {
        self.inner.sandbox
    }

    /// A store for one guest instance, with its memory limit and deadline set.
    pub fn store<T: AsMut<Limits> + 'static>(&self, data: T) -> wasmtime::Store<T> {
        let mut store = wasmtime::Store::new(&self.inner.engine, data);
        store.limiter(|data| data.as_mut());
        store.set_epoch_deadline(self.inner.sandbox.deadline_ticks());
        store
    }

    /// Limits for a new instance.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.inner.sandbox.memory_bytes,
            exceeded: false,
        }
    }

    /// The cached artifact of the component `sha256`, if the engine caches.
    fn artifact(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.inner.cache_dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.inner.compatibility)))
    }

    /// Drops the cached artifact of a component the host refused after compiling it.
    fn forget(&self, sha256: &str) {
        if let Some(artifact) = self.artifact(sha256)
            && let Err(error) = std::fs::remove_file(&artifact)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %artifact.display(), "cannot remove a refused component's artifact");
        }
    }

    /// Loads a component (see [`GuestEngine::load`]) and makes it into what the caller runs
    /// with `accept`; a component `accept` refuses leaves no compiled artifact behind.
    pub fn load_accepted<T>(
        &self,
        sha256: &str,
        bytes: &[u8],
        accept: impl FnOnce(&Component) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let accepted = accept(&self.load(sha256, bytes)?);
        if accepted.is_err() {
            self.forget(sha256);
        }
        accepted
    }

    /// Loads a component's cached artifact, or compiles it (and caches the artifact). The
    /// error says why the bytes are not a component, or which of its imports the host does
    /// not provide (checked before compiling, which can take seconds).
    pub fn load(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<Component> {
        let started = Instant::now();
        let artifact = self.artifact(sha256);
        // Only an accepted component has an artifact: refused ones are forgotten.
        let cached = artifact
            .as_deref()
            .filter(|path| path.exists())
            .and_then(|path| self.deserialize(path));
        let (component, cache) = match cached {
            Some(component) => (component, "hit"),
            None => (self.compile(bytes, artifact.as_deref())?, "miss"),
        };
        tracing::info!(
            sha256,
            bytes = bytes.len(),
            took_ms = started.elapsed().as_millis() as u64,
            cache,
            "component ready"
        );
        Ok(component)
    }

    /// The component a cached artifact holds, or `None` (logged) when it is unusable.
    fn deserialize(&self, artifact: &Path) -> Option<Component> {
        // SAFETY: the file is an artifact this engine configuration serialized (its name
        // carries the engine's compatibility hash) into a directory only Refract writes;
        // wasmtime still checks its header and rejects an incompatible one.
        match unsafe { Component::deserialize_file(&self.inner.engine, artifact) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(%error, path = %artifact.display(), "cached artifact unusable; recompiling");
                None
            }
        }
    }

    /// Checks and compiles a component, saving its artifact at `artifact` when given.
    fn compile(&self, bytes: &[u8], artifact: Option<&Path>) -> anyhow::Result<Component> {
        if !bytes.starts_with(b"\0asm") {
            bail!("the body is not WebAssembly: it does not start with the \\0asm magic bytes");
        }
        if is_core_module(bytes) {
            bail!(
                "this is a core WebAssembly module, not a component; build for wasm32-wasip2 \
                 (or convert it with wasm-tools component new)"
            );
        }
        let missing = context(missing_imports(bytes), "not a valid WebAssembly component")?;
        if !missing.is_empty() {
            bail!(
                "the component imports what Refract does not provide: {}. Guests get WASI \
                 without files, network, clocks or randomness (and no wasi:http); build without \
                 these imports (componentize-js: -d http fetch-event)",
                missing.join(", ")
            );
        }
        let component = context(
            Component::new(&self.inner.engine, bytes),
            "not a valid WebAssembly component",
        )?;
        if let Some(artifact) = artifact {
            match component.serialize() {
                Ok(serialized) => {
                    if let Err(error) = write_atomically(artifact, &serialized) {
                        tracing::warn!(%error, "cannot cache the compiled component");
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot serialize the compiled component"),
            }
        }
        Ok(component)
    }
}

/// WASI for a guest: no files, network, environment or arguments; frozen clocks and fixed
/// randomness; stdout and stderr go to the server's log.
pub fn wasi(output: &GuestOutput) -> WasiCtx {
    WasiCtx::builder()
        .stdout(output.stdout())
        .stderr(output.stderr())
        .wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock)
        .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a]))
        .insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5]))
        .insecure_random_seed(0)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

/// Why a call into a guest failed, in words: the memory limit, the deadline, or the trap.
pub fn explain_failure(
    error: wasmtime::Error,
    limits: &Limits,
    sandbox: Sandbox,
    what: &str,
) -> anyhow::Error {
    if limits.exceeded {
        return anyhow::anyhow!(
            "the {what} exceeded its memory limit of {} MiB",
            limits.memory_bytes >> 20
        );
    }
    match error.downcast_ref::<wasmtime::Trap>().copied() {
        Some(wasmtime::Trap::Interrupt) => anyhow::anyhow!(
            "the {what} ran longer than its limit of {} ms for one call",
            sandbox.call_timeout_ms()
        ),
        Some(trap) => anyhow::anyhow!("the {what} trapped: {trap}"),
        None => anyhow::anyhow!("the {what} failed: {}", anyhow::Error::from(error)),
    }
}

/// Adds a sentence to a wasmtime error.
pub fn context<T>(result: wasmtime::Result<T>, message: &'static str) -> anyhow::Result<T> {
    result.map_err(|error| anyhow::Error::from(error).context(message))
}

/// The interface packages a guest may import: WASI (every instance gets it without authority,
/// see [`wasi`]) and Refract's own. Anything else would fail to link after a compile that can
/// take seconds, so it is refused before.
const PROVIDED_PACKAGES: [&str; 7] = [
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
    "refract:",
];

/// The component's own interface imports (not those of components nested in it) from packages
/// the host does not provide, read without compiling.
pub fn missing_imports(bytes: &[u8]) -> wasmtime::Result<Vec<String>> {
    use wasmparser::Payload;
    let mut depth = 0usize;
    let mut missing = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(wasmtime::Error::msg)? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(imports) if depth == 0 => {
                for import in imports {
                    let name = import.map_err(wasmtime::Error::msg)?.name.name;
                    // A plain name (`event`) is the world's own, which linking checks; an
                    // interface (`wasi:http/types@0.2.0`) comes from a package.
                    let interface = name.contains(':');
                    if interface
                        && !PROVIDED_PACKAGES
                            .iter()
                            .any(|package| name.starts_with(package))
                    {
                        missing.push(name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(missing)
}

/// The component binary's preamble differs from a core module's in its layer field.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [0, 0]
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a directory");
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

/// The memory limit, remembering whether a guest hit it (it then usually traps while handling
/// the failed allocation, which would hide the cause).
pub struct Limits {
    memory_bytes: usize,
    exceeded: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes;
        self.exceeded |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What componentize-js builds by default: a component importing `wasi:http`.
    const IMPORTS_HTTP: &str = r#"(component
        (import "wasi:http/outgoing-handler@0.2.0" (instance))
        (import "wasi:http/types@0.2.0" (instance))
        (import "wasi:io/streams@0.2.0" (instance))
        (component (import "elsewhere:nested/only@1.0.0" (instance))))"#;

    #[test]
    fn imports_the_host_lacks_are_named_before_compiling() {
        let component = wat::parse_str(IMPORTS_HTTP).unwrap();
        assert_eq!(
            missing_imports(&component).unwrap(),
            ["wasi:http/outgoing-handler@0.2.0", "wasi:http/types@0.2.0"]
        );
        let cache = tempfile::tempdir().unwrap();
        let engine =
            GuestEngine::new(Some(cache.path().to_path_buf()), Sandbox::default()).unwrap();
        let Err(error) = engine.load(&sha256_hex(&component), &component) else {
            panic!("a component importing wasi:http was compiled");
        };
        let message = format!("{error:#}");
        assert!(
            message.contains("wasi:http/outgoing-handler@0.2.0, wasi:http/types@0.2.0")
                && message.contains("-d http fetch-event"),
            "{message}"
        );
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_component_of_provided_imports_passes() {
        let component = wat::parse_str(
            r#"(component
                (import "wasi:cli/stdout@0.2.3" (instance))
                (import "refract:projection/host@0.1.0" (instance))
                (import "event" (type (sub resource))))"#,
        )
        .unwrap();
        assert!(missing_imports(&component).unwrap().is_empty());
    }
}
