//! Write [Refract](https://github.com/refract-db/refract) projections and sharders in Rust.
//!
//! A projection is a plain function over a typed state; an attribute names what it reads and how
//! its state is divided. The crate compiles to a WebAssembly component (`wasm32-wasip2`) that the
//! server runs sandboxed, in batches, with its effects committed atomically with its checkpoint.
//!
//! ```no_run
//! use refract_guest::{Ctx, Event};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Order {
//!     lines: u32,
//!     total_cents: u64,
//!     status: String,
//! }
//!
//! #[derive(Deserialize)]
//! struct ItemAdded {
//!     price_cents: u64,
//! }
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Revenue {
//!     total_cents: u64,
//! }
//!
//! /// One state per `order-…` stream, and a table of revenue per day.
//! #[refract_guest::projection(category = "order", partition = "stream")]
//! fn apply(order: &mut Order, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()> {
//!     match event.event_type() {
//!         "OrderPlaced" => order.status = "placed".into(),
//!         "ItemAdded" => {
//!             let item: ItemAdded = event.json()?;
//!             order.lines += 1;
//!             order.total_cents += item.price_cents;
//!             let day = (event.created_ms() / 86_400_000).to_string();
//!             let mut revenue: Revenue = ctx.table("revenue_by_day").get(&day)?.unwrap_or_default();
//!             revenue.total_cents += item.price_cents;
//!             ctx.table("revenue_by_day").put(&day, &revenue)?;
//!         }
//!         "OrderShipped" if ctx.may_emit() => {
//!             ctx.emit("shipments", "Shipped", &serde_json::json!({"order": event.stream()}))?;
//!         }
//!         _ => {}
//!     }
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! The attribute takes:
//! - the source: nothing or `all` for every event, `category = "…"`, `categories = ["…", …]`,
//!   `stream = "…"` or `streams = ["…", …]`;
//! - `event_types = ["…", …]`: the host hands over only events of these types;
//! - the partitioning: `partition = "none"` (the default: one state), `partition = "stream"`,
//!   or `partition_by = function` with `fn(&Event) -> Option<String>` (`None` skips the event).
//!
//! The state type needs `Default + Serialize + DeserializeOwned`; it is stored as JSON, and only
//! when an event changed it. Use `()` for a projection that keeps only tables. An error from the
//! function faults the projection at that event: what the events before it did is kept, nothing
//! of the failing event is.
//!
//! A sharder is a function of an event and a shard count:
//!
//! ```no_run
//! #[refract_guest::sharder]
//! fn shard(event: &refract_guest::Event, shards: u32) -> u32 {
//!     refract_guest::fnv1a_64(event.stream().as_bytes()) as u32 % shards
//! }
//! # fn main() {}
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2` in a `cdylib` crate, then deploy the
//! `.wasm` file with `refract projection deploy NAME FILE` or `refract sharder deploy NAME FILE`.

use std::collections::HashMap;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use refract_guest_macros::{projection, sharder};

/// An event of the log, as a projection or sharder sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub stream: String,
    pub revision: u64,
    pub position: u64,
    pub id: String,
    pub event_type: String,
    pub data: Vec<u8>,
    pub metadata: Vec<u8>,
    pub created_ms: i64,
}

impl Event {
    /// The stream it was appended to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Its number in its stream, from 0.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Its position in the log, from 0.
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload's bytes: JSON text unless it was written as binary.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The metadata's bytes: a JSON object's text, or empty.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// When it was appended, in milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// The payload, parsed from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.data).with_context(|| {
            format!(
                "the data of {} {}@{} is not the JSON expected",
                self.event_type, self.revision, self.stream
            )
        })
    }

    /// The metadata, parsed from JSON; `None` when the event has none.
    pub fn metadata_json<T: DeserializeOwned>(&self) -> anyhow::Result<Option<T>> {
        if self.metadata.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&self.metadata)
            .map(Some)
            .with_context(|| {
                format!(
                    "the metadata of {} {}@{} is not the JSON expected",
                    self.event_type, self.revision, self.stream
                )
            })
    }
}

/// FNV-1a, 64 bits: a simple, well-known hash that anyone can recompute by hand, which makes
/// shard assignments easy to check.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// What a projection can do besides changing its state: tables, emitted events, links, logs.
pub struct Ctx<'a> {
    host: &'a dyn __private::HostApi,
    /// The position of the event being handled.
    current: u64,
    /// The event the host was last told emits come from.
    told: Option<u64>,
}

impl Ctx<'_> {
    /// A read-model table of this projection.
    pub fn table<'t>(&'t mut self, name: &'t str) -> Table<'t> {
        Table {
            host: self.host,
            name,
        }
    }

    /// Whether the projection was deployed with permission to emit events (`--emit`).
    pub fn may_emit(&self) -> bool {
        self.host.may_emit()
    }

    /// Appends an event with `data` as its JSON payload to `stream`. Fails when the projection
    /// may not emit.
    pub fn emit(
        &mut self,
        stream: &str,
        event_type: &str,
        data: &impl Serialize,
    ) -> anyhow::Result<()> {
        self.emit_with_metadata(stream, event_type, data, &serde_json::Map::new())
    }

    /// Like [`Ctx::emit`], with a metadata object.
    pub fn emit_with_metadata(
        &mut self,
        stream: &str,
        event_type: &str,
        data: &impl Serialize,
        metadata: &impl Serialize,
    ) -> anyhow::Result<()> {
        let data = serde_json::to_vec(data).context("cannot encode the emitted data")?;
        let mut metadata =
            serde_json::to_vec(metadata).context("cannot encode the emitted metadata")?;
        if metadata == b"{}" {
            metadata.clear();
        }
        self.tell_cause();
        self.host
            .emit(stream, event_type, &data, &metadata)
            .map_err(|reason| anyhow::anyhow!("cannot emit {event_type} to {stream}: {reason}"))
    }

    /// Adds a link to `event` to `stream` (a stream that holds only links).
    pub fn link_to(&mut self, stream: &str, event: &Event) -> anyhow::Result<()> {
        self.host
            .link_to(stream, event.position)
            .map_err(|reason| anyhow::anyhow!("cannot link to {stream}: {reason}"))
    }

    /// Writes a line to the server's log.
    pub fn log(&self, message: &str) {
        self.host.log(message);
    }

    /// Tells the host which event what is emitted now comes from (once per event that emits),
    /// so the host gives emitted events their `$causationId` and `$correlationId`.
    fn tell_cause(&mut self) {
        if self.told != Some(self.current) {
            self.host.caused_by(self.current);
            self.told = Some(self.current);
        }
    }
}

/// One read-model table: rows of JSON by key.
pub struct Table<'a> {
    host: &'a dyn __private::HostApi,
    name: &'a str,
}

impl Table<'_> {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        match self.host.table_get(self.name, key) {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
                format!(
                    "row {key:?} of table {} is not the JSON expected",
                    self.name
                )
            }),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, key: &str, value: &impl Serialize) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)
            .with_context(|| format!("cannot encode row {key:?} of table {}", self.name))?;
        self.host.table_put(self.name, key, &bytes);
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> anyhow::Result<()> {
        self.host.table_delete(self.name, key);
        Ok(())
    }
}

/// The glue the attribute macros expand to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub use wit_bindgen;

    /// The host's imports, as the generated bindings provide them.
    pub trait HostApi {
        fn get_state(&self, partition: &str) -> Option<Vec<u8>>;
        fn set_state(&self, partition: &str, state: &[u8]);
        fn table_get(&self, table: &str, key: &str) -> Option<Vec<u8>>;
        fn table_put(&self, table: &str, key: &str, value: &[u8]);
        fn table_delete(&self, table: &str, key: &str);
        fn may_emit(&self) -> bool;
        fn emit(
            &self,
            stream: &str,
            event_type: &str,
            data: &[u8],
            metadata: &[u8],
        ) -> Result<(), String>;
        fn link_to(&self, stream: &str, position: u64) -> Result<(), String>;
        fn caused_by(&self, position: u64);
        fn log(&self, message: &str);
    }

    #[derive(Debug, Clone, Copy)]
    pub enum Partitioning {
        None,
        ByStream,
        Custom(fn(&Event) -> Option<String>),
    }

    impl Partitioning {
        pub fn key(self, event: &Event) -> Option<String> {
            match self {
                Partitioning::None => Some(String::new()),
                Partitioning::ByStream => Some(event.stream.clone()),
                Partitioning::Custom(key) => key(event),
            }
        }
    }

    pub type Apply<S> = fn(&mut S, &Event, &mut Ctx) -> anyhow::Result<()>;

    /// Sends panic messages to the host's log before the panic traps, so a fault can say why.
    pub fn forward_panics(log: fn(&str)) {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            std::panic::set_hook(Box::new(move |info| log(&info.to_string())));
        });
    }

    struct Loaded<S> {
        state: S,
        stored: Option<Vec<u8>>,
    }

    /// Applies a batch in order. States are loaded once per batch and written back only when
    /// they changed, so a batch costs one state read and at most one write per partition.
    pub fn handle<S: Default + Serialize + DeserializeOwned>(
        host: &dyn HostApi,
        events: impl IntoIterator<Item = Event>,
        partitioning: Partitioning,
        apply: Apply<S>,
    ) -> Result<(), String> {
        let mut ctx = Ctx {
            host,
            current: 0,
            told: None,
        };
        let mut states: HashMap<String, Loaded<S>> = HashMap::new();
        // The partition of the previous event, whose state is `current`: consecutive events of
        // one partition (every event, when unpartitioned) skip the map.
        let mut current: Option<(String, Loaded<S>)> = None;
        for event in events {
            let custom;
            let partition: &str = match partitioning {
                Partitioning::None => "",
                Partitioning::ByStream => &event.stream,
                Partitioning::Custom(key) => match key(&event) {
                    Some(key) => {
                        custom = key;
                        &custom
                    }
                    None => continue,
                },
            };
            if current.as_ref().is_none_or(|(key, _)| key != partition) {
                if let Some((key, loaded)) = current.take() {
                    states.insert(key, loaded);
                }
                let loaded = match states.remove(partition) {
                    Some(loaded) => loaded,
                    None => load(host, partition)?,
                };
                current = Some((partition.to_owned(), loaded));
            }
            let (_, loaded) = current.as_mut().expect("loaded above");
            ctx.current = event.position;
            apply(&mut loaded.state, &event, &mut ctx).map_err(|error| {
                format!(
                    "{} at position {} ({}@{}): {error:#}",
                    event.event_type, event.position, event.revision, event.stream
                )
            })?;
        }
        if let Some((key, loaded)) = current {
            states.insert(key, loaded);
        }
        let untouched = serde_json::to_vec(&S::default()).map_err(|error| error.to_string())?;
        for (partition, loaded) in states {
            let bytes = serde_json::to_vec(&loaded.state)
                .map_err(|error| format!("cannot encode the state of {partition:?}: {error}"))?;
            let changed = match &loaded.stored {
                Some(stored) => *stored != bytes,
                None => bytes != untouched,
            };
            if changed {
                host.set_state(&partition, &bytes);
            }
        }
        Ok(())
    }

    fn load<S: Default + DeserializeOwned>(
        host: &dyn HostApi,
        partition: &str,
    ) -> Result<Loaded<S>, String> {
        let stored = host.get_state(partition);
        let state = match &stored {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|error| {
                format!("the stored state of partition {partition:?} does not parse: {error}")
            })?,
            None => S::default(),
        };
        Ok(Loaded { state, stored })
    }

    /// Shards a batch with a per-event function; a result out of range is folded into it.
    pub fn shard(
        events: impl IntoIterator<Item = Event>,
        shards: u32,
        shard: fn(&Event, u32) -> u32,
    ) -> Vec<u32> {
        events
            .into_iter()
            .map(|event| match shards {
                0 => 0,
                shards => shard(&event, shards) % shards,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::__private::{HostApi, Partitioning, handle};
    use super::*;

    #[derive(Default)]
    struct MemoryHost {
        states: RefCell<BTreeMap<String, Vec<u8>>>,
        rows: RefCell<BTreeMap<(String, String), Vec<u8>>>,
        emitted: RefCell<Vec<(String, String)>>,
        causes: RefCell<Vec<u64>>,
        state_reads: RefCell<u32>,
    }

    impl HostApi for MemoryHost {
        fn get_state(&self, partition: &str) -> Option<Vec<u8>> {
            *self.state_reads.borrow_mut() += 1;
            self.states.borrow().get(partition).cloned()
        }
        fn set_state(&self, partition: &str, state: &[u8]) {
            self.states
                .borrow_mut()
                .insert(partition.into(), state.to_vec());
        }
        fn table_get(&self, table: &str, key: &str) -> Option<Vec<u8>> {
            self.rows.borrow().get(&(table.into(), key.into())).cloned()
        }
        fn table_put(&self, table: &str, key: &str, value: &[u8]) {
            self.rows
                .borrow_mut()
                .insert((table.into(), key.into()), value.to_vec());
        }
        fn table_delete(&self, table: &str, key: &str) {
            self.rows.borrow_mut().remove(&(table.into(), key.into()));
        }
        fn may_emit(&self) -> bool {
            true
        }
        fn emit(&self, stream: &str, event_type: &str, _: &[u8], _: &[u8]) -> Result<(), String> {
            self.emitted
                .borrow_mut()
                .push((stream.into(), event_type.into()));
            Ok(())
        }
        fn link_to(&self, _: &str, _: u64) -> Result<(), String> {
            Ok(())
        }
        fn caused_by(&self, position: u64) {
            self.causes.borrow_mut().push(position);
        }
        fn log(&self, _: &str) {}
    }

    #[derive(Default, Serialize, Deserialize)]
    struct Count {
        n: u64,
    }

    fn event(stream: &str, event_type: &str, data: &str) -> Event {
        Event {
            stream: stream.into(),
            event_type: event_type.into(),
            data: data.as_bytes().to_vec(),
            ..Event::default()
        }
    }

    fn count_added(count: &mut Count, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()> {
        #[derive(Deserialize)]
        struct Added {
            by: u64,
        }
        if event.event_type() == "Added" {
            count.n += event.json::<Added>()?.by;
            let mut table = ctx.table("totals");
            let total: u64 = table.get("all")?.unwrap_or(0);
            table.put("all", &(total + 1))?;
        }
        Ok(())
    }

    #[test]
    fn states_are_loaded_once_and_written_only_when_changed() {
        let host = MemoryHost::default();
        let events = vec![
            event("a", "Added", r#"{"by": 2}"#),
            event("b", "Ignored", "{}"),
            event("a", "Added", r#"{"by": 3}"#),
        ];
        handle(&host, events, Partitioning::ByStream, count_added).unwrap();
        assert_eq!(*host.state_reads.borrow(), 2);
        let states = host.states.borrow();
        assert_eq!(states.get("a").unwrap(), br#"{"n":5}"#);
        assert!(
            !states.contains_key("b"),
            "an untouched state is not written"
        );
        assert_eq!(
            host.rows
                .borrow()
                .get(&("totals".into(), "all".into()))
                .unwrap(),
            b"2"
        );
    }

    #[test]
    fn an_error_names_the_event_and_writes_nothing() {
        let host = MemoryHost::default();
        let events = vec![
            event("a", "Added", r#"{"by": 2}"#),
            event("a", "Added", "not json"),
        ];
        let error = handle(&host, events, Partitioning::None, count_added).unwrap_err();
        assert!(error.contains("Added at position 0 (0@a)"), "{error}");
        assert!(error.contains("not the JSON expected"), "{error}");
        assert!(host.states.borrow().is_empty());
    }

    #[test]
    fn the_host_hears_once_per_emitting_event_which_event_it_is() {
        fn notify(count: &mut Count, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()> {
            count.n += 1;
            if event.event_type() == "Twice" {
                ctx.emit("out", "A", &1)?;
                ctx.emit("out", "B", &2)?;
            }
            Ok(())
        }
        let host = MemoryHost::default();
        let mut events = vec![
            event("a", "Twice", "{}"),
            event("a", "Quiet", "{}"),
            event("a", "Twice", "{}"),
        ];
        for (position, event) in (10..).zip(&mut events) {
            event.position = position;
        }
        handle(&host, events, Partitioning::None, notify).unwrap();
        assert_eq!(*host.causes.borrow(), [10, 12]);
        assert_eq!(host.emitted.borrow().len(), 4);
    }

    #[test]
    fn custom_partitions_skip_events_without_a_key() {
        let host = MemoryHost::default();
        fn by_tenant(event: &Event) -> Option<String> {
            event
                .stream
                .split_once('/')
                .map(|(tenant, _)| tenant.to_owned())
        }
        let events = vec![
            event("t1/x", "Added", r#"{"by": 1}"#),
            event("t1/y", "Added", r#"{"by": 1}"#),
            event("loose", "Added", r#"{"by": 1}"#),
        ];
        handle(&host, events, Partitioning::Custom(by_tenant), count_added).unwrap();
        let states = host.states.borrow();
        assert_eq!(states.len(), 1);
        assert_eq!(states.get("t1").unwrap(), br#"{"n":2}"#);
    }

    #[test]
    fn emitting_reaches_the_host_and_fnv_matches_its_reference_values() {
        let host = MemoryHost::default();
        let mut ctx = Ctx {
            host: &host,
            current: 0,
            told: None,
        };
        ctx.emit("out", "Seen", &serde_json::json!({"x": 1}))
            .unwrap();
        assert_eq!(host.emitted.borrow()[0], ("out".into(), "Seen".into()));
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }
}
