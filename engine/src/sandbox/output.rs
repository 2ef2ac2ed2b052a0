//! What guests write to stdout and stderr, and through the `log` import: one server log line per
//! line, tagged with the guest, rate-limited per guest so a guest printing in a loop cannot
//! flood the log.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line kept; the rest of a longer line is cut.
pub const MAX_LINE_CHARS: usize = 4096;
/// Lines a guest may log at once before the rate applies.
const BURST_LINES: f64 = 200.0;
/// Lines per second a guest may log over time.
const LINES_PER_SECOND: f64 = 20.0;
/// Most lines an instance holds for its batch; more would be dropped by the rate anyway.
const MAX_HELD_LINES: usize = 1000;

/// What kind of guest a log line comes from; it names the field the guest's name goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Projection,
    Sharder,
}

/// The log of one guest (every instance of a projection shares it, and its rate).
#[derive(Clone)]
pub struct GuestLog {
    shared: Arc<Shared>,
}

struct Shared {
    kind: GuestKind,
    name: String,
    rate: Mutex<Rate>,
}

/// A token bucket of lines, and how many were dropped since the last one logged.
struct Rate {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl std::fmt::Debug for GuestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLog")
            .field("kind", &self.shared.kind)
            .field("name", &self.shared.name)
            .finish()
    }
}

impl Default for GuestLog {
    fn default() -> Self {
        GuestLog::new(GuestKind::Projection, "")
    }
}

impl GuestLog {
    pub fn new(kind: GuestKind, name: &str) -> GuestLog {
        GuestLog {
            shared: Arc::new(Shared {
                kind,
                name: name.to_owned(),
                rate: Mutex::new(Rate {
                    tokens: BURST_LINES,
                    refilled: Instant::now(),
                    dropped: 0,
                }),
            }),
        }
    }

    /// The output of one instance: its stdout and stderr, which can be silenced while the
    /// instance replays events whose lines were logged already.
    pub fn output(&self) -> GuestOutput {
        GuestOutput {
            log: self.clone(),
            quiet: Arc::new(AtomicBool::new(false)),
            held: Arc::new(Mutex::new(None)),
        }
    }

    /// Logs lines that were held until their batch committed.
    pub fn write(&self, lines: Vec<HeldLine>) {
        for held in lines {
            self.line(held.source, &held.line);
        }
    }

    /// Counts lines dropped before they reached the rate; the next line logged reports them.
    fn dropped(&self, lines: u64) {
        self.shared.rate.lock().expect("guest log rate").dropped += lines;
    }

    /// Logs one line from `source` (`stdout`, `stderr` or `log`), unless over the rate.
    pub fn line(&self, source: &'static str, line: &str) {
        let dropped = {
            let mut rate = self.shared.rate.lock().expect("guest log rate");
            let now = Instant::now();
            let elapsed = now.duration_since(rate.refilled).as_secs_f64();
            rate.tokens = (rate.tokens + elapsed * LINES_PER_SECOND).min(BURST_LINES);
            rate.refilled = now;
            if rate.tokens < 1.0 {
                rate.dropped += 1;
                return;
            }
            rate.tokens -= 1.0;
            std::mem::take(&mut rate.dropped)
        };
        let name = &self.shared.name;
        if dropped > 0 {
            match self.shared.kind {
                GuestKind::Projection => {
                    tracing::warn!(projection = %name, dropped, "guest output over {LINES_PER_SECOND} lines/s: lines dropped")
                }
                GuestKind::Sharder => {
                    tracing::warn!(sharder = %name, dropped, "guest output over {LINES_PER_SECOND} lines/s: lines dropped")
                }
            }
        }
        let line = cut(line);
        match self.shared.kind {
            GuestKind::Projection => tracing::info!(projection = %name, source, "{line}"),
            GuestKind::Sharder => tracing::info!(sharder = %name, source, "{line}"),
        }
    }
}

fn cut(line: &str) -> &str {
    match line.char_indices().nth(MAX_LINE_CHARS) {
        Some((end, _)) => &line[..end],
        None => line,
    }
}

/// A line a guest wrote, held until the outcome of its batch is known.
#[derive(Debug)]
pub struct HeldLine {
    source: &'static str,
    line: String,
}

/// The stdout and stderr of one instance.
#[derive(Clone)]
pub struct GuestOutput {
    log: GuestLog,
    quiet: Arc<AtomicBool>,
    /// Lines kept back rather than logged, once `hold` was called.
    held: Arc<Mutex<Option<Vec<HeldLine>>>>,
}

impl GuestOutput {
    /// While quiet, what the instance writes is dropped.
    pub fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Relaxed);
    }

    /// From now on, lines are held for `take_held` instead of logged: for an instance whose
    /// work may be thrown away and done again elsewhere.
    pub fn hold(&self) {
        self.held
            .lock()
            .expect("held lines")
            .get_or_insert_with(Vec::new);
    }

    pub fn take_held(&self) -> Vec<HeldLine> {
        self.held
            .lock()
            .expect("held lines")
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn deliver(&self, source: &'static str, line: &str) {
        if self.quiet.load(Ordering::Relaxed) {
            return;
        }
        match self.held.lock().expect("held lines").as_mut() {
            Some(held) if held.len() >= MAX_HELD_LINES => self.log.dropped(1),
            Some(held) => held.push(HeldLine {
                source,
                line: cut(line).to_owned(),
            }),
            None => self.log.line(source, line),
        }
    }

    pub fn stdout(&self) -> GuestStream {
        GuestStream {
            output: self.clone(),
            source: "stdout",
        }
    }

    pub fn stderr(&self) -> GuestStream {
        GuestStream {
            output: self.clone(),
            source: "stderr",
        }
    }

    /// A line written through the `log` import.
    pub fn log(&self, line: &str) {
        self.deliver("log", line);
    }
}

/// stdout or stderr of an instance, as WASI hands it to the guest.
pub struct GuestStream {
    output: GuestOutput,
    source: &'static str,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.lines())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.lines())
    }
}

impl GuestStream {
    fn lines(&self) -> Lines {
        Lines {
            output: self.output.clone(),
            source: self.source,
            pending: Vec::new(),
        }
    }
}

/// Bytes written to a guest stream, cut into lines as they complete.
struct Lines {
    output: GuestOutput,
    source: &'static str,
    pending: Vec<u8>,
}

impl Lines {
    fn write_bytes(&mut self, mut bytes: &[u8]) {
        if self.output.quiet.load(Ordering::Relaxed) {
            self.pending.clear();
            return;
        }
        while let Some(end) = bytes.iter().position(|byte| *byte == b'\n') {
            self.pending.extend_from_slice(&bytes[..end]);
            self.emit();
            bytes = &bytes[end + 1..];
        }
        self.pending.extend_from_slice(bytes);
        // A line that never ends is logged in pieces rather than held without bound.
        if self.pending.len() >= 4 * MAX_LINE_CHARS {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.pending);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        self.output.deliver(self.source, line);
        self.pending.clear();
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if !self.pending.is_empty() && !self.output.quiet.load(Ordering::Relaxed) {
            self.emit();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Lines {
    async fn ready(&mut self) {}
}

impl OutputStream for Lines {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for Lines {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_bytes(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_newlines_and_quiet_drops_them() {
        let log = GuestLog::new(GuestKind::Projection, "p");
        let output = log.output();
        let mut lines = output.stdout().lines();
        lines.write_bytes(b"one\ntw");
        assert_eq!(lines.pending, b"tw");
        lines.write_bytes(b"o\r\nthree");
        assert_eq!(lines.pending, b"three");
        output.set_quiet(true);
        lines.write_bytes(b"\nfour\n");
        assert!(lines.pending.is_empty());
        output.set_quiet(false);
        output.hold();
        lines.write_bytes(b"five\nsix\n");
        output.log("seven");
        let held: Vec<_> = output
            .take_held()
            .into_iter()
            .map(|held| held.line)
            .collect();
        assert_eq!(held, ["five", "six", "seven"]);
        assert!(output.take_held().is_empty());
    }

    #[test]
    fn the_rate_drops_lines_past_the_burst() {
        let log = GuestLog::new(GuestKind::Projection, "p");
        for _ in 0..BURST_LINES as usize + 10 {
            log.line("stdout", "x");
        }
        let rate = log.shared.rate.lock().unwrap();
        assert!(rate.dropped >= 9, "{}", rate.dropped);
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "é".repeat(MAX_LINE_CHARS + 5);
        assert_eq!(cut(&long).chars().count(), MAX_LINE_CHARS);
        assert_eq!(cut("short"), "short");
    }
}
