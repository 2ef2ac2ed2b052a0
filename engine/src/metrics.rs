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
pub struct GroupLabels {
    pub stream: String,
    pub group: String,
}

/// A consumer group's figures at scrape time.
pub struct GroupSample {
    pub stream: String,
    pub group: String,
    pub ready: u64,
    pub in_flight: u64,
    pub parked: u64,
    /// Revisions (positions for `$all`) of the source past the stored checkpoint.
    pub checkpoint_lag: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub member: String,
    pub role: String,
}

/// A cluster as one of its nodes sees it (`GET /cluster`).
pub struct ClusterSample {
    pub node_id: u64,
    pub term: u64,
    pub members: Vec<MemberSample>,
}

pub struct MemberSample {
    pub id: u64,
    /// `leader`, `follower` or `learner`.
    pub role: &'static str,
    pub applied: Option<u64>,
    pub lag: Option<u64>,
}

/// What a scrape reports beside the counters kept as things happen.
pub struct Scrape {
    pub head_position: u64,
    pub writer_queue: u64,
    pub projections: Vec<ProjectionSample>,
    pub groups: Vec<GroupSample>,
    /// On a node of a cluster.
    pub cluster: Option<ClusterSample>,
}

/// The two exposition formats Prometheus reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, what `promtool` and older scrapers read.
    Text,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header prefers.
    pub fn accepted(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
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
    writer_queue: Gauge,
    http_requests: Family<RouteLabels, Histogram, fn() -> Histogram>,
    projection_position: Family<ProjectionLabels, Gauge>,
    projection_lag: Family<ProjectionLabels, Gauge>,
    projection_rate: Family<ProjectionLabels, Gauge<f64, AtomicU64>>,
    group_ready: Family<GroupLabels, Gauge>,
    group_in_flight: Family<GroupLabels, Gauge>,
    group_parked: Family<GroupLabels, Gauge>,
    group_checkpoint_lag: Family<GroupLabels, Gauge>,
    cluster_term: Family<MemberLabels, Gauge>,
    cluster_role: Family<RoleLabels, Gauge>,
    cluster_applied: Family<MemberLabels, Gauge>,
    cluster_lag: Family<MemberLabels, Gauge>,
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
        let writer_queue = Gauge::default();
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
            "writer_queue_depth",
            "Requests waiting for the writer",
            writer_queue.clone(),
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
        let group_ready = Family::default();
        let group_in_flight = Family::default();
        let group_parked = Family::default();
        let group_checkpoint_lag = Family::default();
        registry.register(
            "group_ready_messages",
            "Messages a consumer group has read and not yet delivered",
            group_ready.clone(),
        );
        registry.register(
            "group_in_flight_messages",
            "Messages delivered to a group's consumers and not yet acked",
            group_in_flight.clone(),
        );
        registry.register(
            "group_parked_messages",
            "Messages in a group's parked stream not yet replayed",
            group_parked.clone(),
        );
        registry.register(
            "group_checkpoint_lag",
            "Revisions (positions for $all) of a group's source past its stored checkpoint",
            group_checkpoint_lag.clone(),
        );
        let cluster_term = Family::default();
        let cluster_role = Family::default();
        let cluster_applied = Family::default();
        let cluster_lag = Family::default();
        registry.register(
            "cluster_term",
            "The Raft term this node (member) is in",
            cluster_term.clone(),
        );
        registry.register(
            "cluster_member_role",
            "1 for each member of the cluster, labelled with its role as this node sees it",
            cluster_role.clone(),
        );
        registry.register(
            "cluster_member_applied_index",
            "The last log index a member holds (this node's own: applied), as far as this node knows",
            cluster_applied.clone(),
        );
        registry.register(
            "cluster_member_lag_entries",
            "Log entries a member is behind the leader's log (reported by the leader)",
            cluster_lag.clone(),
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
            writer_queue,
            http_requests,
            projection_position,
            projection_lag,
            projection_rate,
            group_ready,
            group_in_flight,
            group_parked,
            group_checkpoint_lag,
            cluster_term,
            cluster_role,
            cluster_applied,
            cluster_lag,
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

    /// The registry in `format`, with the figures of `scrape`.
    pub fn encode(&self, scrape: &Scrape, format: Format) -> String {
        // One scrape at a time: the per-projection and per-group series are rebuilt from the
        // current lists, so a deleted projection's or group's series go away.
        let _scrape = self.scrape.lock().expect("scrape lock");
        self.head_position.set(scrape.head_position as i64);
        self.writer_queue.set(scrape.writer_queue as i64);
        self.projection_position.clear();
        self.projection_lag.clear();
        self.projection_rate.clear();
        for sample in &scrape.projections {
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
        for family in [
            &self.group_ready,
            &self.group_in_flight,
            &self.group_parked,
            &self.group_checkpoint_lag,
        ] {
            family.clear();
        }
        for sample in &scrape.groups {
            let labels = GroupLabels {
                stream: sample.stream.clone(),
                group: sample.group.clone(),
            };
            for (family, value) in [
                (&self.group_ready, sample.ready),
                (&self.group_in_flight, sample.in_flight),
                (&self.group_parked, sample.parked),
                (&self.group_checkpoint_lag, sample.checkpoint_lag),
            ] {
                family.get_or_create(&labels).set(value as i64);
            }
        }
        self.cluster_term.clear();
        self.cluster_role.clear();
        self.cluster_applied.clear();
        self.cluster_lag.clear();
        if let Some(cluster) = &scrape.cluster {
            let node = MemberLabels {
                member: cluster.node_id.to_string(),
            };
            self.cluster_term
                .get_or_create(&node)
                .set(cluster.term as i64);
            for member in &cluster.members {
                let labels = MemberLabels {
                    member: member.id.to_string(),
                };
                let role = RoleLabels {
                    member: member.id.to_string(),
                    role: member.role.to_owned(),
                };
                self.cluster_role.get_or_create(&role).set(1);
                if let Some(applied) = member.applied {
                    self.cluster_applied
                        .get_or_create(&labels)
                        .set(applied as i64);
                }
                if let Some(lag) = member.lag {
                    self.cluster_lag.get_or_create(&labels).set(lag as i64);
                }
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => text,
            Format::Text => openmetrics_to_text(&text),
        }
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's family takes the
/// `_total` name its samples have, and there is no `# EOF` or `# UNIT`.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match comment {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                text.push_str(&format!("{prefix}{name}{total} {tail}\n"));
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
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
    fn the_text_format_names_counters_as_their_samples() {
        let metrics = Metrics::new();
        metrics.record_commit(1, 1, Duration::from_millis(1));
        let scrape = Scrape {
            head_position: 1,
            writer_queue: 0,
            projections: Vec::new(),
            groups: vec![GroupSample {
                stream: "$all".into(),
                group: "g".into(),
                ready: 1,
                in_flight: 2,
                parked: 3,
                checkpoint_lag: 4,
            }],
            cluster: Some(ClusterSample {
                node_id: 2,
                term: 7,
                members: vec![MemberSample {
                    id: 3,
                    role: "follower",
                    applied: Some(40),
                    lag: Some(2),
                }],
            }),
        };
        let text = metrics.encode(&scrape, Format::Text);
        assert!(
            text.contains("# TYPE refract_appends_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP refract_appends_total Append requests committed.\n"));
        assert!(text.contains("refract_appends_total 1\n"));
        assert!(text.contains(r#"refract_group_parked_messages{stream="$all",group="g"} 3"#));
        assert!(text.contains(r#"refract_cluster_term{member="2"} 7"#));
        assert!(text.contains(r#"refract_cluster_member_role{member="3",role="follower"} 1"#));
        assert!(text.contains(r#"refract_cluster_member_applied_index{member="3"} 40"#));
        assert!(text.contains(r#"refract_cluster_member_lag_entries{member="3"} 2"#));
        assert!(!text.contains("# EOF"));
        let openmetrics = metrics.encode(&scrape, Format::OpenMetrics);
        assert!(openmetrics.contains("# TYPE refract_appends counter\n"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }

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
