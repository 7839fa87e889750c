//! A worker's stderr, relayed into the daemon's log within bounds.
//!
//! A worker writes there only a few diagnostics of its own, but one that a
//! guest took over writes whatever it likes, as fast as it likes, and the
//! daemon's stderr may be the owner's terminal or a file on the owner's
//! disk. So it is a pipe to the daemon, not the daemon's own stderr: the
//! daemon reads it at most [`READ_RATE`] bytes a second after the first
//! [`READ_BURST`] (a worker that writes faster waits on its own full pipe,
//! and the daemon spends no more time on it), keeps [`MAX_LINE`] bytes of a
//! line, shows control characters as U+FFFD, and logs at `warn` at most
//! [`LINES_PER_MINUTE`] lines a minute for all workers together, the rest at
//! `debug`.

use std::time::Duration;

use spare_core::LogBudget;
use spare_core::text::printable;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes a second the daemon reads from one worker's stderr, once the
/// first [`READ_BURST`] are read.
pub const READ_RATE: u64 = 4 << 10;
/// Bytes read from one worker's stderr without waiting: what it says when
/// it starts and ends, many times over.
pub const READ_BURST: u64 = 16 << 10;
/// Bytes of one line kept; the rest of it is cut.
pub const MAX_LINE: usize = 512;
/// Lines a minute that workers' stderr may log at `warn`, together.
pub const LINES_PER_MINUTE: u32 = 20;

static BUDGET: LogBudget = LogBudget::new(LINES_PER_MINUTE);

/// Relays the stderr of worker `pid` into the daemon's log until it ends.
pub(crate) fn spawn(pid: u32, stderr: tokio::process::ChildStderr) {
    tokio::spawn(relay(stderr, move |line| {
        if BUDGET.allow() {
            tracing::warn!(worker = pid, "{line}");
        } else {
            tracing::debug!(worker = pid, "{line}");
        }
    }));
}

/// Reads `from` to its end, paced to [`READ_RATE`] after [`READ_BURST`],
/// and gives `line` each line, cut to [`MAX_LINE`] bytes and made
/// printable. Returns the bytes read.
pub(crate) async fn relay(mut from: impl AsyncRead + Unpin, mut line: impl FnMut(&str)) -> u64 {
    let start = tokio::time::Instant::now();
    let mut chunk = [0u8; 1024];
    let mut current = Vec::with_capacity(MAX_LINE);
    let mut cut = false;
    let mut read = 0u64;
    let mut emit = |current: &mut Vec<u8>, cut: &mut bool| {
        let text = String::from_utf8_lossy(current);
        let ellipsis = if *cut { "…" } else { "" };
        line(&format!("{}{ellipsis}", printable(&text)));
        current.clear();
        *cut = false;
    };
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        read = read.saturating_add(n as u64);
        for &byte in &chunk[..n] {
            if byte == b'\n' {
                emit(&mut current, &mut cut);
            } else if current.len() < MAX_LINE {
                current.push(byte);
            } else {
                cut = true;
            }
        }
        let due = read.saturating_sub(READ_BURST) as f64 / READ_RATE as f64;
        tokio::time::sleep_until(start + Duration::from_secs_f64(due)).await;
    }
    if !current.is_empty() || cut {
        emit(&mut current, &mut cut);
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        relay(input, |line| lines.push(line.to_owned())).await;
        lines
    }

    #[tokio::test]
    async fn lines_are_cut_and_made_printable() {
        let long = "x".repeat(MAX_LINE + 100);
        let input = format!("spare worker: fine\n\u{1b}[2Jcleared\r\n{long}\nlast words");
        let lines = lines_of(input.as_bytes()).await;
        assert_eq!(
            lines,
            [
                "spare worker: fine".to_owned(),
                "\u{fffd}[2Jcleared\u{fffd}".to_owned(),
                format!("{}…", "x".repeat(MAX_LINE)),
                "last words".to_owned(),
            ]
        );
        assert_eq!(
            lines_of(b"\xff\xfe not utf-8\n").await,
            ["\u{fffd}\u{fffd} not utf-8"]
        );
    }

    /// With the clock paused, time moves only by the relay's waits: those
    /// must add up to what its rate allows for everything past the burst.
    #[tokio::test(start_paused = true)]
    async fn a_flood_is_read_no_faster_than_the_rate() {
        let flood = vec![b'y'; (READ_BURST + 8 * READ_RATE) as usize];
        let start = tokio::time::Instant::now();
        let read = relay(flood.as_slice(), |_| {}).await;
        assert_eq!(read, flood.len() as u64);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(8) && waited < Duration::from_secs(9),
            "{waited:?}"
        );
        // What fits in the burst is read at once.
        let start = tokio::time::Instant::now();
        relay(&flood[..READ_BURST as usize], |_| {}).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A real process that floods its stderr: the relay reads only so
    /// much of it in a second, however fast the machine.
    #[tokio::test]
    async fn a_flooding_process_is_held_to_the_rate() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "yes flood >&2"])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = 0u64;
        let relayed = tokio::time::timeout(
            Duration::from_secs(1),
            relay(stderr, |line| {
                assert_eq!(line, "flood");
                lines += 1;
            }),
        )
        .await;
        assert!(relayed.is_err(), "the flood never ends");
        // Six bytes a line; the second may overrun by a chunk.
        let most = (READ_BURST + READ_RATE + 1024) / 6;
        assert!(lines > 0 && lines <= most, "{lines} lines, at most {most}");
    }
}
