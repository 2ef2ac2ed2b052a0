//! What a running connector reports: its state, how far it got, its rate and its last error.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

/// The window events per second are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Stopped,
    Faulted,
}

/// A connector's progress, shared between its task and the API.
#[derive(Clone, Default)]
pub struct Progress(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    faulted: bool,
    connected: bool,
    last_error: Option<String>,
    /// Sink: the position of the last event sent (or passed over).
    position: Option<u64>,
    /// Sink: events behind the head.
    sink_lag: u64,
    /// Source: the next offset of each partition, and its high watermark.
    offsets: BTreeMap<i32, i64>,
    high_watermarks: BTreeMap<i32, i64>,
    events: u64,
    samples: VecDeque<(Instant, u64)>,
}

/// A copy of the progress, for status answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub faulted: bool,
    pub connected: bool,
    pub last_error: Option<String>,
    pub position: Option<u64>,
    pub offsets: BTreeMap<i32, i64>,
    pub lag: u64,
    pub events: u64,
    pub events_per_second: f64,
}

impl Progress {
    fn with<T>(&self, change: impl FnOnce(&mut Inner) -> T) -> T {
        change(&mut self.0.lock().expect("connector progress"))
    }

    /// A session started: nothing is known about the broker yet.
    pub fn restart(&self) {
        self.with(|inner| {
            inner.faulted = false;
            inner.connected = false;
            inner.samples.clear();
            inner.samples.push_back((Instant::now(), inner.events));
        });
    }

    pub fn connected(&self) {
        self.with(|inner| inner.connected = true);
    }

    /// A failure the connector retries after.
    pub fn failed(&self, error: String) {
        self.with(|inner| {
            inner.connected = false;
            inner.last_error = Some(error);
        });
    }

    /// A failure that stops the connector until it is started again.
    pub fn fault(&self, error: String) {
        self.with(|inner| {
            inner.faulted = true;
            inner.connected = false;
            inner.last_error = Some(error);
        });
    }

    pub fn sink_at(&self, position: Option<u64>, head: u64) {
        self.with(|inner| {
            inner.position = position;
            inner.sink_lag = head.saturating_sub(position.map_or(0, |p| p + 1));
        });
    }

    pub fn source_at(&self, offsets: &BTreeMap<i32, i64>) {
        self.with(|inner| inner.offsets.clone_from(offsets));
    }

    pub fn high_watermark(&self, partition: i32, high_watermark: i64) {
        self.with(|inner| {
            inner.high_watermarks.insert(partition, high_watermark);
        });
    }

    /// `count` more events sent (sink) or landed (source).
    pub fn handled(&self, count: u64) {
        self.with(|inner| {
            inner.events += count;
            let now = Instant::now();
            inner.samples.push_back((now, inner.events));
            // Keeps one sample from before the window as its baseline.
            while inner
                .samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
            {
                inner.samples.pop_front();
            }
        });
    }

    pub fn snapshot(&self) -> Snapshot {
        self.with(|inner| {
            let now = Instant::now();
            // Over the window, from the last sample before it (the baseline), or over what
            // there is of it.
            let baseline = inner
                .samples
                .iter()
                .rev()
                .find(|(at, _)| now.duration_since(*at) >= RATE_WINDOW)
                .or(inner.samples.front());
            let events_per_second = match baseline {
                Some((since, events)) => {
                    let elapsed = now.duration_since(*since).max(Duration::from_secs(1));
                    (inner.events - events) as f64 / elapsed.as_secs_f64()
                }
                None => 0.0,
            };
            let source_lag = inner
                .offsets
                .iter()
                .map(|(partition, offset)| {
                    let end = inner
                        .high_watermarks
                        .get(partition)
                        .copied()
                        .unwrap_or(*offset);
                    (end - offset).max(0) as u64
                })
                .sum::<u64>();
            Snapshot {
                faulted: inner.faulted,
                connected: inner.connected,
                last_error: inner.last_error.clone(),
                position: inner.position,
                offsets: inner.offsets.clone(),
                lag: inner.sink_lag + source_lag,
                events: inner.events,
                events_per_second,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_and_rate_follow_the_progress() {
        let progress = Progress::default();
        progress.restart();
        progress.sink_at(Some(9), 25);
        progress.handled(10);
        let snapshot = progress.snapshot();
        assert_eq!(snapshot.lag, 15);
        assert_eq!(snapshot.events, 10);
        assert!(snapshot.events_per_second > 0.0);
        let source = Progress::default();
        source.source_at(&BTreeMap::from([(0, 5), (1, 7)]));
        source.high_watermark(0, 8);
        source.high_watermark(1, 7);
        assert_eq!(source.snapshot().lag, 3);
        source.fault("broken".into());
        assert!(source.snapshot().faulted);
    }
}
