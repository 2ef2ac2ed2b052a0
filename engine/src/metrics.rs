//! Prometheus metrics. Every part records into one [`Metrics`]; `/metrics` encodes it.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

fn request_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    appends: Counter,
    events_written: Counter,
    bytes_written: Counter,
    commit_batch_events: Histogram,
    commit_seconds: Histogram,
    head_position: Gauge,
    http_requests: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("refract");
        let appends = Counter::default();
        let events_written = Counter::default();
        let bytes_written = Counter::default();
        let commit_batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        // 100 µs .. ~1.6 s
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let head_position = Gauge::default();
        let http_requests = Family::new_with_constructor(request_histogram as fn() -> Histogram);
        registry.register("appends", "Append requests committed", appends.clone());
        registry.register(
            "events_written",
            "Events written to the log",
            events_written.clone(),
        );
        registry.register(
            "bytes_written",
            "Event payload bytes (type, data, metadata) written",
            bytes_written.clone(),
        );
        registry.register(
            "commit_batch_events",
            "Events per group commit",
            commit_batch_events.clone(),
        );
        registry.register(
            "commit_seconds",
            "Duration of a group commit including its fsync",
            commit_seconds.clone(),
        );
        registry.register(
            "head_position",
            "Position the next event will get (events in $all)",
            head_position.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP request latency by route",
            http_requests.clone(),
        );
        Metrics {
            registry,
            appends,
            events_written,
            bytes_written,
            commit_batch_events,
            commit_seconds,
            head_position,
            http_requests,
        }
    }

    pub fn record_commit(&self, appends: u64, events: u64, elapsed: Duration) {
        self.appends.inc_by(appends);
        self.events_written.inc_by(events);
        if events > 0 {
            self.commit_batch_events.observe(events as f64);
        }
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn record_bytes_written(&self, bytes: u64) {
        self.bytes_written.inc_by(bytes);
    }

    pub fn record_request(&self, labels: &RouteLabels, elapsed: Duration) {
        self.http_requests
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self, head_position: u64) -> String {
        self.head_position.set(head_position as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
