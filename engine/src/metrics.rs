//! Prometheus metrics. Every part records into one [`Metrics`]; `/metrics` encodes it.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

/// A projection's figures at scrape time.
pub struct ProjectionSample {
    pub name: String,
    pub position: u64,
    pub head_position: u64,
    pub events_per_second: f64,
}

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
    projection_position: Family<ProjectionLabels, Gauge>,
    projection_lag: Family<ProjectionLabels, Gauge>,
    projection_rate: Family<ProjectionLabels, Gauge<f64, AtomicU64>>,
    scrape: std::sync::Mutex<()>,
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
        let projection_position = Family::default();
        let projection_lag = Family::default();
        let projection_rate = Family::default();
        registry.register(
            "projection_position",
            "Position below which a projection has processed every event",
            projection_position.clone(),
        );
        registry.register(
            "projection_lag_events",
            "Events appended that a projection has not processed yet",
            projection_lag.clone(),
        );
        registry.register(
            "projection_events_per_second",
            "A projection's recent processing rate",
            projection_rate.clone(),
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
            projection_position,
            projection_lag,
            projection_rate,
            scrape: std::sync::Mutex::new(()),
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
    pub fn encode(&self, head_position: u64, projections: &[ProjectionSample]) -> String {
        // One scrape at a time: the projection series are rebuilt from the current list, so a
        // deleted projection's series go away.
        let _scrape = self.scrape.lock().expect("scrape lock");
        self.head_position.set(head_position as i64);
        self.projection_position.clear();
        self.projection_lag.clear();
        self.projection_rate.clear();
        for sample in projections {
            let labels = ProjectionLabels {
                projection: sample.name.clone(),
            };
            self.projection_position
                .get_or_create(&labels)
                .set(sample.position as i64);
            let lag = sample.head_position.saturating_sub(sample.position);
            self.projection_lag.get_or_create(&labels).set(lag as i64);
            self.projection_rate
                .get_or_create(&labels)
                .set(sample.events_per_second);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// A rate of progress (events per second) over windows of at least a second, as the status of
/// indexes and projections shows it.
#[derive(Debug, Clone, Copy)]
pub struct RateMeter {
    window_start: Instant,
    count_at_start: u64,
    last_count: u64,
    last_progress: Instant,
    per_second: f64,
}

impl RateMeter {
    /// A meter that starts counting from `count`.
    pub fn new(count: u64) -> Self {
        let now = Instant::now();
        RateMeter {
            window_start: now,
            count_at_start: count,
            last_count: count,
            last_progress: now,
            per_second: 0.0,
        }
    }

    /// Takes the running total; a window of a second or more closes and gives the rate.
    pub fn record(&mut self, count: u64) {
        let now = Instant::now();
        if count != self.last_count {
            self.last_count = count;
            self.last_progress = now;
        }
        let elapsed = now.duration_since(self.window_start).as_secs_f64();
        if elapsed >= 1.0 {
            self.per_second = count.saturating_sub(self.count_at_start) as f64 / elapsed;
            self.window_start = now;
            self.count_at_start = count;
        }
    }

    /// The last window's rate; 0 once nothing has moved for two seconds.
    pub fn per_second(&self) -> f64 {
        if self.last_progress.elapsed() > Duration::from_secs(2) {
            0.0
        } else {
            self.per_second
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_measured_over_a_closed_window() {
        let mut meter = RateMeter::new(100);
        meter.record(150);
        assert_eq!(meter.per_second(), 0.0, "the first window is still open");
        meter.window_start -= Duration::from_secs(2);
        meter.record(300);
        assert!(
            (meter.per_second() - 100.0).abs() < 1.0,
            "{}",
            meter.per_second()
        );
        meter.last_progress -= Duration::from_secs(3);
        assert_eq!(meter.per_second(), 0.0, "idle for more than two seconds");
    }
}
