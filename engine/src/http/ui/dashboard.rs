//! The dashboard: the store's figures, projections with their lag, groups with their queues.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;

use super::{Nav, Session, Shared, Ui, bytes, count, encode, figure, page};

/// The counters the rates come from, as of one scrape of `/metrics`.
#[derive(Clone, Copy, Default)]
struct Counters {
    events_written: f64,
    reads: f64,
    commit_seconds: f64,
    commits: f64,
}

impl Counters {
    /// Reads the counters out of the Prometheus text format.
    fn parse(text: &str) -> Counters {
        let mut counters = Counters::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            match name {
                "refract_events_written_total" => counters.events_written = value,
                "refract_commit_seconds_sum" => counters.commit_seconds = value,
                "refract_commit_seconds_count" => counters.commits = value,
                // Reads and subscriptions of streams, whatever their answer.
                "refract_http_request_seconds_count"
                    if labels.contains(r#"method="GET""#)
                        && labels.contains(r#"route="/streams/"#) =>
                {
                    counters.reads += value
                }
                _ => {}
            }
        }
        counters
    }
}

#[derive(Clone, Copy, Default)]
struct Rates {
    appends: f64,
    reads: f64,
    /// Mean commit time over the interval, when there were commits.
    commit_ms: Option<f64>,
}

/// Rates between two scrapes, shared by every open dashboard.
#[derive(Default)]
pub struct Sampler {
    last: Option<(Instant, Counters)>,
    rates: Rates,
}

/// Rates over less than this would be noise; the previous ones are shown instead.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

impl Sampler {
    fn update(&mut self, now: Instant, counters: Counters) -> Rates {
        match self.last {
            Some((at, _)) if now.duration_since(at) < MIN_INTERVAL => return self.rates,
            Some((at, before)) => {
                let elapsed = now.duration_since(at).as_secs_f64();
                let commits = counters.commits - before.commits;
                self.rates = Rates {
                    appends: (counters.events_written - before.events_written) / elapsed,
                    reads: (counters.reads - before.reads) / elapsed,
                    commit_ms: (commits > 0.0).then(|| {
                        (counters.commit_seconds - before.commit_seconds) / commits * 1000.0
                    }),
                };
            }
            None => {}
        }
        self.last = Some((now, counters));
        self.rates
    }
}

/// The data directory's size, measured at most every few seconds however many pages ask.
#[derive(Default)]
pub struct DiskUse {
    measured: Option<(Instant, u64)>,
}

const DISK_USE_INTERVAL: Duration = Duration::from_secs(10);

impl DiskUse {
    /// The last measure if recent, else `None` (then measure and [`DiskUse::record`] it).
    fn recent(&self, now: Instant) -> Option<u64> {
        self.measured
            .filter(|(at, _)| now.duration_since(*at) < DISK_USE_INTERVAL)
            .map(|(_, bytes)| bytes)
    }

    fn record(&mut self, now: Instant, bytes: u64) {
        self.measured = Some((now, bytes));
    }
}

/// Bytes the files under `dir` take.
fn disk_use(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => disk_use(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

pub async fn show(
    axum::extract::State(ui): Shared,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let body = render(&ui, &session).await;
    page(&headers, "Dashboard", Nav::Dashboard, &session, &ui, body)
}

async fn render(ui: &Ui, session: &Session) -> Markup {
    let info = ui.get(session, "/info").await;
    let metrics = ui.get_text(session, "/metrics").await;
    let projections = ui.get(session, "/projections").await;
    let groups = ui.get(session, "/groups").await;
    let rates = metrics.as_ref().ok().map(|text| {
        let counters = Counters::parse(text);
        lock(&ui.rates).update(Instant::now(), counters)
    });
    let recent = lock(&ui.disk).recent(Instant::now());
    let disk = match recent {
        Some(bytes) => bytes,
        None => {
            let data_dir = ui.state.data_dir.clone();
            let bytes = tokio::task::spawn_blocking(move || disk_use(&data_dir))
                .await
                .unwrap_or(0);
            lock(&ui.disk).record(Instant::now(), bytes);
            bytes
        }
    };
    html! {
        div data-live hx-get="/ui" hx-trigger="live" hx-swap="outerHTML" {
            h1 { "Dashboard" }
            @match &info {
                Err(failure) => (failure.render()),
                Ok(info) => {
                    dl.cards aria-label="Store" {
                        div { dt { "Head position" } dd #head-position { (count(info["head_position"].as_u64().unwrap_or(0))) } }
                        div { dt { "Streams" } dd { (count(info["streams"].as_u64().unwrap_or(0))) } }
                        @if let Some(rates) = rates {
                            div { dt { "Appends" } dd { (figure(rates.appends)) " events/s" } }
                            div { dt { "Stream reads" } dd { (figure(rates.reads)) " requests/s" } }
                            div { dt { "Commit latency" } dd {
                                @match rates.commit_ms {
                                    Some(ms) => { (figure(ms)) " ms" }
                                    None => "idle",
                                }
                            } }
                        }
                        div { dt { "Disk use" } dd { (bytes(disk)) } }
                        div { dt { "Version" } dd { (info["version"].as_str().unwrap_or("")) } }
                    }
                }
            }
            section aria-labelledby="dashboard-projections" {
                h2 #dashboard-projections { "Projections" }
                @match &projections {
                    Err(failure) => (failure.render()),
                    Ok(list) => (projection_table(list)),
                }
            }
            section aria-labelledby="dashboard-groups" {
                h2 #dashboard-groups { "Consumer groups" }
                @match &groups {
                    Err(failure) => (failure.render()),
                    Ok(list) => (super::groups::table(list, session)),
                }
            }
        }
    }
}

/// The figures behind a lock stay usable if a page panicked while holding it.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn projection_table(list: &Value) -> Markup {
    let empty = Vec::new();
    let list = list.as_array().unwrap_or(&empty);
    html! {
        div.scroll {
            table {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Status" }
                    th scope="col" .num { "Position" } th scope="col" .num { "Lag" } th scope="col" .num { "Events/s" }
                } }
                tbody {
                    @for projection in list {
                        @let name = projection["name"].as_str().unwrap_or("");
                        @let position = projection["position"].as_u64().unwrap_or(0);
                        @let head = projection["head_position"].as_u64().unwrap_or(0);
                        tr {
                            td { a href={ "/ui/projections/" (encode(name)) } { (name) } }
                            td { (projection["kind"].as_str().unwrap_or("")) }
                            td { (super::projections::status_badge(projection)) }
                            td.num { (count(position)) }
                            td.num { (count(head.saturating_sub(position))) }
                            td.num { (figure(projection["events_per_second"].as_f64().unwrap_or(0.0))) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_metrics_text() {
        let text = "# HELP x\nrefract_events_written_total 120\n\
            refract_commit_seconds_sum 0.5\nrefract_commit_seconds_count 100\n\
            refract_http_request_seconds_count{method=\"GET\",route=\"/streams/{stream}\",status=\"200\"} 7\n\
            refract_http_request_seconds_count{method=\"GET\",route=\"/streams/$all/subscribe\",status=\"200\"} 3\n\
            refract_http_request_seconds_count{method=\"POST\",route=\"/streams/{stream}\",status=\"200\"} 9\n\
            refract_http_request_seconds_count{method=\"GET\",route=\"/groups\",status=\"200\"} 5\n";
        let counters = Counters::parse(text);
        assert_eq!(counters.events_written, 120.0);
        assert_eq!(counters.reads, 10.0);
        assert_eq!(counters.commits, 100.0);
        assert_eq!(counters.commit_seconds, 0.5);
    }

    #[test]
    fn rates_are_taken_over_the_interval() {
        let mut sampler = Sampler::default();
        let start = Instant::now();
        let first = Counters {
            events_written: 100.0,
            reads: 10.0,
            commit_seconds: 1.0,
            commits: 10.0,
        };
        let rates = sampler.update(start, first);
        assert_eq!(rates.appends, 0.0);
        let later = Counters {
            events_written: 300.0,
            reads: 14.0,
            commit_seconds: 1.02,
            commits: 20.0,
        };
        let rates = sampler.update(start + Duration::from_secs(2), later);
        assert_eq!(rates.appends, 100.0);
        assert_eq!(rates.reads, 2.0);
        assert!((rates.commit_ms.unwrap() - 2.0).abs() < 1e-9);
        // Too soon after: the same rates.
        let again = sampler.update(start + Duration::from_millis(2100), first);
        assert_eq!(again.appends, 100.0);
    }
}
