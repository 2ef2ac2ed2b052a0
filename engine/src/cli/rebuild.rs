//! Following a projection's rebuild from the command line, with a progress bar.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{Client, ProjectionStatus};

/// How often the status is asked for while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Waits until the rebuild of `name` has switched in (or was cancelled), drawing its progress
/// on stderr when that is a terminal. A rebuild that faults is an error.
pub(super) async fn wait_for_rebuild(
    client: &Client,
    name: &str,
) -> anyhow::Result<ProjectionStatus> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} rebuilding {msg} [{bar:40}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(name.to_owned());
    loop {
        let status = client.projection(name).await?;
        let Some(rebuild) = &status.rebuild else {
            bar.finish_and_clear();
            return Ok(status);
        };
        if let Some(fault) = &rebuild.fault {
            bar.abandon();
            anyhow::bail!(
                "the rebuild of {name} (version {}) faulted at position {}: {}; version {} keeps serving",
                rebuild.version,
                fault.position,
                fault.message,
                status.version
            );
        }
        bar.set_length(status.head_position);
        bar.set_position(rebuild.position);
        tokio::time::sleep(POLL).await;
    }
}
