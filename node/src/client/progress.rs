//! Transfer progress: the [`Progress`] callbacks blob transfers make, and [`ProgressReporter`],
//! which shows bytes, rate and ETA on stderr.

use std::io::{self, IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// Receives transfer progress. `done` counts bytes of the blob held so far.
pub trait Progress: Send {
    /// The transfer (re)starts: `total` bytes, of which `done` are already held.
    fn start(&mut self, total: u64, done: u64);
    /// `done` bytes are now held.
    fn update(&mut self, done: u64);
    /// The transfer ended (successfully or not).
    fn finish(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _total: u64, _done: u64) {}
    fn update(&mut self, _done: u64) {}
}

/// Prints bytes, rate and ETA to stderr: one redrawn line on a terminal (every 100 ms), plain
/// lines every 2 s otherwise.
#[derive(Debug)]
pub struct ProgressReporter {
    label: String,
    terminal: bool,
    total: u64,
    done: u64,
    /// Bytes held when the current attempt started (the rate counts only new bytes).
    base: u64,
    started: Instant,
    last_draw: Option<Instant>,
}

impl ProgressReporter {
    /// A reporter whose lines start with `label`; detects whether stderr is a terminal.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            terminal: io::stderr().is_terminal(),
            total: 0,
            done: 0,
            base: 0,
            started: Instant::now(),
            last_draw: None,
        }
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.done - self.base.min(self.done)) as f64 / elapsed;
        let percent = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        let eta = if rate > 0.0 {
            format_duration((self.total.saturating_sub(self.done)) as f64 / rate)
        } else {
            "?".to_owned()
        };
        format!(
            "{} {} / {} ({percent:.1}%) {}/s ETA {eta}",
            self.label,
            format_bytes(self.done as f64),
            format_bytes(self.total as f64),
            format_bytes(rate),
        )
    }

    fn draw(&mut self, force: bool) {
        let interval = if self.terminal {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        };
        let now = Instant::now();
        if !force && self.last_draw.is_some_and(|last| now - last < interval) {
            return;
        }
        self.last_draw = Some(now);
        let line = self.line();
        let mut stderr = io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r\x1b[2K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }
}

impl Progress for ProgressReporter {
    fn start(&mut self, total: u64, done: u64) {
        self.total = total;
        self.done = done;
        self.base = done;
        self.started = Instant::now();
        self.draw(true);
    }

    fn update(&mut self, done: u64) {
        self.done = done;
        self.draw(false);
    }

    fn finish(&mut self) {
        if self.last_draw.is_none() {
            // Never started (the node was never reached): there is no transfer to report.
            return;
        }
        self.draw(true);
        if self.terminal {
            let _ = writeln!(io::stderr());
        }
    }
}

fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn format_duration(seconds: f64) -> String {
    let seconds = seconds.round() as u64;
    if seconds >= 3600 {
        format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60)
    } else {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_rate_and_eta() {
        let mut reporter = ProgressReporter::new("get");
        reporter.total = 2 << 20;
        reporter.done = 1 << 20;
        let line = reporter.line();
        assert!(line.contains("1.0 MiB / 2.0 MiB (50.0%)"), "{line}");
        assert!(line.contains("ETA"), "{line}");
        assert_eq!(format_duration(3725.0), "1h02m");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        // A transfer that never started (node unreachable) leaves no 0 B / 0 B line behind.
        let mut never_started = ProgressReporter::new("put");
        never_started.finish();
        assert!(never_started.last_draw.is_none());
    }
}
