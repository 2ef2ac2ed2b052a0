//! Refract: an event store with durable streams, built-in and WebAssembly projections, and
//! consumer groups.
//!
//! # Layout
//!
//! - [`store`]: the log and its stream index in redb; one writer with group commit, lock-free
//!   readers. Knows nothing of HTTP.
//! - [`projections`]: projections as users see them: list, status, start/stop/reset. The system
//!   projections present the store's built-in indexes (`$ce-`, `$et-`, `$bc-`, `$category-`).
//! - [`groups`]: consumer groups (persistent subscriptions): at-least-once delivery to competing
//!   consumers with acks, retries, parking and server-side checkpoints.
//! - [`connectors`]: the Kafka sink and source, exactly once each way.
//! - [`processing`]: the Wasm projections, groups, sharders and connectors of a node, run on a
//!   cluster's leader only.
//! - [`subscribe`]: catch-up then live reading of a stream or `$all`, built on store reads and
//!   the head position.
//! - [`http`]: the HTTP API (axum on hyper): routes, errors, auth, SSE, OpenAPI, metrics.
//! - [`client`]: a typed async client for that API, used by the CLI and the benchmarks.
//! - [`cli`]: the `refract` command line: `serve`, client commands and `bench`.
//! - [`metrics`]: the Prometheus registry every part records into.
//! - [`json`]: JSON bodies read as JSON Schema reads them (`1.0` is an integer).
//! - [`wal`]: the write-ahead log the store's writer logs each batch to; [`disk`]: the storage
//!   it and the database sit on.
//! - [`names`]: the one rule for names of streams, projections, sharders, groups, consumers.
//!
//! Dependencies point one way: `cli` → `http`/`client` → `projections`/`subscribe` → `store`.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod connectors;
pub mod disk;
pub mod groups;
pub mod grpc;
pub mod http;
pub mod json;
pub mod metrics;
pub mod names;
#[cfg(test)]
mod power_cut;
pub mod processing;
pub mod projections;
pub mod sandbox;
pub mod sharding;
pub mod store;
pub mod subscribe;
pub mod wal;
