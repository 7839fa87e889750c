//! Printing: errors, exit codes, tables.

use std::io::Write;
use std::process::ExitCode;

/// `spare` itself failed (no daemon, no peer, bad input, a host error).
pub(crate) const EXIT_SPARE: u8 = 125;
/// The file cannot be run (not WebAssembly, invalid, missing import).
pub(crate) const EXIT_UNRUNNABLE: u8 = 126;
/// The guest hit its wall-time limit (as `timeout(1)`).
pub(crate) const EXIT_TIMEOUT: u8 = 124;
/// The guest trapped.
pub(crate) const EXIT_TRAP: u8 = 134;
/// A resource limit stopped the guest (fuel, memory, stack, output).
pub(crate) const EXIT_LIMIT: u8 = 137;
/// Cancelled with Ctrl-C.
pub(crate) const EXIT_CANCELLED: u8 = 130;

/// An error that ends `spare` with an exit code of its own instead of
/// [`EXIT_SPARE`].
#[derive(Debug)]
pub(crate) struct Exit {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Prints `err` as one line and returns the exit code for it.
pub(crate) fn fail(err: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "spare: error: {}", one_line(err));
    ExitCode::from(err.downcast_ref::<Exit>().map_or(EXIT_SPARE, |e| e.code))
}

/// An error and its causes on one line.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

/// Prints one line on stdout (a reader that went away is not an error).
pub(crate) fn line(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Prints rows as aligned columns; the first row is the header.
pub(crate) fn table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Shortens a peer id for tables: its last 8 characters.
pub(crate) fn short_peer(peer: &str) -> String {
    let n = peer.chars().count();
    if n <= 10 {
        peer.to_owned()
    } else {
        format!("…{}", peer.chars().skip(n - 8).collect::<String>())
    }
}

/// How long ago `ms` (Unix epoch milliseconds) was.
pub(crate) fn ago(ms: u64) -> String {
    let now = spare_core::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}
