//! Sharding functions: WebAssembly components of the `sharder` world that place events on
//! shards. The server runs them for `/sharders/{name}/shard` (and consumer groups); clients run
//! the very same component to route streams to nodes, so both always agree.

mod registry;

use std::borrow::Borrow;
use std::sync::Mutex;

use anyhow::bail;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use registry::{ShardError, Sharders};

use crate::sandbox::{GuestEngine, GuestKind, GuestLog, Limits, Sandbox};
use crate::sandbox::{context, explain_failure, sha256_hex};
use crate::store::RecordedEvent;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/macros/wit",
        world: "sharder",
    });
}

use bindings::refract::projection::types::Event;
use bindings::{Sharder as SharderBindings, SharderPre};

/// Most shards a call may ask for.
pub const MAX_SHARDS: u32 = 1 << 20;

/// An event as written, with its stream: what a sharder decides on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardInput {
    pub stream: String,
    pub event_type: String,
    /// The event's id, when it has one.
    pub id: String,
    /// JSON text, or the bytes of a binary payload.
    pub data: Vec<u8>,
    /// A JSON object's text, or empty.
    pub metadata: Vec<u8>,
}

impl ShardInput {
    /// An item of `POST /sharders/{name}/shard` (or a line of `refract sharder eval`):
    /// `{"stream", "type", "data" | "data_base64", "metadata", "id"}`, the way the event is
    /// written. Data and metadata become the same bytes the store keeps.
    pub fn from_json(item: &Value) -> Result<ShardInput, String> {
        let object = item.as_object().ok_or("each event must be a JSON object")?;
        let text = |field: &str| match object.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(format!("\"{field}\" must be a string")),
        };
        let stream = text("stream")?;
        if stream.is_empty() {
            return Err("each event needs its \"stream\"".into());
        }
        let data = match (object.get("data"), object.get("data_base64")) {
            (Some(_), Some(_)) => return Err("give \"data\" or \"data_base64\", not both".into()),
            (_, Some(Value::String(encoded))) => BASE64
                .decode(encoded)
                .map_err(|error| format!("\"data_base64\" is not base64: {error}"))?,
            (_, Some(_)) => return Err("\"data_base64\" must be a string".into()),
            (Some(data), None) => serde_json::to_vec(data).map_err(|error| error.to_string())?,
            (None, None) => b"null".to_vec(),
        };
        let metadata = match object.get("metadata") {
            None | Some(Value::Null) => Vec::new(),
            Some(metadata @ Value::Object(_)) => {
                serde_json::to_vec(metadata).map_err(|error| error.to_string())?
            }
            Some(_) => return Err("\"metadata\" must be a JSON object".into()),
        };
        Ok(ShardInput {
            stream,
            event_type: text("type")?,
            id: text("id")?,
            data,
            metadata,
        })
    }

    fn to_guest(&self) -> Event {
        Event {
            stream: self.stream.clone(),
            revision: 0,
            position: 0,
            id: self.id.clone(),
            event_type: self.event_type.clone(),
            data: self.data.clone(),
            metadata: self.metadata.clone(),
            created_ms: 0,
        }
    }
}

struct SharderState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
}

impl AsMut<Limits> for SharderState {
    fn as_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }
}

impl WasiView for SharderState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled sharder with one instance kept for reuse (instantiating costs more than a small
/// batch). Safe to share; calls take turns.
pub struct Sharder {
    sha256: String,
    engine: GuestEngine,
    pre: SharderPre<SharderState>,
    instance: Mutex<Option<(wasmtime::Store<SharderState>, SharderBindings)>>,
    /// Where its output goes, named by its hash (one component may be deployed under several
    /// names); its instances share the rate.
    log: GuestLog,
}

impl Sharder {
    /// Validates bytes as a sharder component and compiles them.
    pub fn new(engine: &GuestEngine, bytes: &[u8]) -> anyhow::Result<Sharder> {
        let sha256 = sha256_hex(bytes);
        engine.load_accepted(&sha256, bytes, |component| {
            Sharder::link(engine, sha256.clone(), component)
        })
    }

    /// Links a compiled sharder, and runs it once on nothing.
    fn link(
        engine: &GuestEngine,
        sha256: String,
        component: &Component,
    ) -> anyhow::Result<Sharder> {
        let mut linker = wasmtime::component::Linker::new(engine.engine());
        context(
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker),
            "cannot link WASI",
        )?;
        let pre = context(
            linker.instantiate_pre(component),
            "the component needs imports Refract does not provide",
        )?;
        let pre = context(
            SharderPre::new(pre),
            "the component does not implement the refract:projection/sharder world",
        )?;
        let sharder = Sharder {
            log: GuestLog::new(GuestKind::Sharder, &sha256[..12]),
            sha256,
            engine: engine.clone(),
            pre,
            instance: Mutex::new(None),
        };
        sharder.shard(&[], 1)?;
        Ok(sharder)
    }

    /// A sharder on an engine of its own (for clients).
    pub fn standalone(bytes: &[u8]) -> anyhow::Result<Sharder> {
        Sharder::new(&GuestEngine::new(None, Sandbox::default())?, bytes)
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The shard of each input, in order, each in `0..shards`.
    pub fn shard(&self, inputs: &[ShardInput], shards: u32) -> anyhow::Result<Vec<u32>> {
        self.call(inputs.iter().map(ShardInput::to_guest).collect(), shards)
    }

    /// The shard of each stored event, in order, each in `0..shards`: what a stored event
    /// would be given as a [`ShardInput`], copied once.
    pub fn shard_recorded<E: Borrow<RecordedEvent>>(
        &self,
        events: &[E],
        shards: u32,
    ) -> anyhow::Result<Vec<u32>> {
        let events = events
            .iter()
            .map(Borrow::borrow)
            .map(|event: &RecordedEvent| Event {
                stream: event.stream.clone(),
                revision: 0,
                position: 0,
                id: event.id.to_string(),
                event_type: event.event_type.clone(),
                data: event.data.clone(),
                metadata: event.metadata.clone(),
                created_ms: 0,
            })
            .collect();
        self.call(events, shards)
    }

    fn call(&self, events: Vec<Event>, shards: u32) -> anyhow::Result<Vec<u32>> {
        if shards == 0 || shards > MAX_SHARDS {
            bail!("the shard count must be between 1 and {MAX_SHARDS}");
        }
        let count = events.len();
        let mut slot = self.instance.lock().expect("sharder instance");
        let (store, bindings) = match &mut *slot {
            Some(instance) => instance,
            None => {
                let output = self.log.output();
                let state = SharderState {
                    wasi: crate::sandbox::wasi(&output),
                    table: ResourceTable::new(),
                    limits: self.engine.limits(),
                };
                let mut store = self.engine.store(state);
                let bindings = context(
                    self.pre.instantiate(&mut store),
                    "cannot instantiate the sharder",
                )?;
                slot.insert((store, bindings))
            }
        };
        store.set_epoch_deadline(self.engine.sandbox().deadline_ticks());
        let result = bindings.call_shard(&mut *store, &events, shards);
        let shards_of = match result {
            Ok(shards_of) => shards_of,
            Err(error) => {
                let explained = explain_failure(
                    error,
                    &store.data().limits,
                    self.engine.sandbox(),
                    "sharder",
                );
                // A trapped instance is not used again.
                *slot = None;
                return Err(explained);
            }
        };
        if shards_of.len() != count {
            bail!(
                "the sharder returned {} shards for {count} events",
                shards_of.len(),
            );
        }
        if let Some(out_of_range) = shards_of.iter().find(|shard| **shard >= shards) {
            bail!("the sharder returned shard {out_of_range} of {shards}");
        }
        Ok(shards_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_read_the_written_shape() {
        let input = ShardInput::from_json(&serde_json::json!({
            "stream": "order-1", "type": "OrderPlaced",
            "data": {"customer_id": "c1"}, "metadata": {"tenant": "t"}
        }))
        .unwrap();
        assert_eq!(input.stream, "order-1");
        assert_eq!(input.data, br#"{"customer_id":"c1"}"#);
        assert_eq!(input.metadata, br#"{"tenant":"t"}"#);
        let binary =
            ShardInput::from_json(&serde_json::json!({"stream": "s", "data_base64": "AAE="}))
                .unwrap();
        assert_eq!(binary.data, [0, 1]);
        for bad in [
            serde_json::json!({"type": "x"}),
            serde_json::json!({"stream": 1}),
            serde_json::json!({"stream": "s", "metadata": [1]}),
            serde_json::json!({"stream": "s", "data": 1, "data_base64": ""}),
            serde_json::json!("s"),
        ] {
            assert!(ShardInput::from_json(&bad).is_err(), "{bad}");
        }
    }
}
