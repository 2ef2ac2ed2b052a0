//! Progress on the command line, on stderr when it is a terminal: a deploy's upload and compile
//! (a spinner), and a projection's rebuild (a progress bar).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{Client, ProjectionStatus};

/// How often the status is asked for while waiting.
const POLL: Duration = Duration::from_millis(100);

/// A spinner with the elapsed time while `name` (`bytes` long) is uploaded and compiled, which
/// takes seconds for a large component; finish it with `finish_and_clear`.
pub(super) fn compiling(name: &str, bytes: usize) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template(
            "{spinner} uploading and compiling {prefix} ({msg}), {elapsed}",
        )
        .expect("a valid template"),
    );
    spinner.set_prefix(name.to_owned());
    spinner.set_message(format!("{:.1} MB", bytes as f64 / 1e6));
    spinner.enable_steady_tick(POLL);
    spinner
}

/// Waits until the rebuild of `name` has switched in (or was cancelled), drawing its progress
/// on stderr when that is a terminal. A rebuild that faults is an error.
pub(super) async fn wait_for_rebuild(
    client: &Client,
    name: &str,
) -> anyhow::Result<ProjectionStatus> {
    let mut bar: Option<ProgressBar> = None;
    loop {
        let status = client.projection(name).await?;
        let Some(rebuild) = &status.rebuild else {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(status);
        };
        if let Some(fault) = &rebuild.fault {
            if let Some(bar) = bar {
                bar.abandon();
            }
            anyhow::bail!(
                "the rebuild of {name} (version {}) faulted at position {}: {}; version {} keeps serving",
                rebuild.version,
                fault.position,
                fault.message,
                status.version
            );
        }
        // Drawn from the first status on, so it starts at the real head and position.
        let bar = bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(status.head_position).with_style(
                ProgressStyle::with_template(
                    "{spinner} rebuilding {prefix} [{bar:40}] {pos}/{len} events, {msg}, ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_owned());
            bar.set_position(rebuild.position);
            bar
        });
        bar.set_length(status.head_position);
        bar.set_position(rebuild.position);
        bar.set_message(format!("{:.0} events/s", rebuild.events_per_second));
        tokio::time::sleep(POLL).await;
    }
}
