//! Printing: errors, exit codes, tables.

use std::io::Write;
use std::process::ExitCode;

/// `spare` itself failed (no daemon, no peer, bad input, a host error).
pub(crate) const EXIT_SPARE: u8 = 125;
/// The program file cannot be read or run: missing, not a regular file,
/// too large, not WebAssembly, invalid, or importing what the sandbox does
/// not provide (as a shell answers for a file it cannot execute).
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
///
/// This is the one place errors are reported: an error caused by a reader
/// of stdout that went away (`spare id | head -1`) is not one, as for
/// [`line`](fn@line): `spare` ends quietly, with success.
pub(crate) fn fail(err: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(err) && stdout_is_closed() {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(
        std::io::stderr(),
        "spare: error: {}",
        printable(&one_line(err))
    );
    ExitCode::from(err.downcast_ref::<Exit>().map_or(EXIT_SPARE, |e| e.code))
}

/// Whether a broken pipe is anywhere in the chain of `err` (a JSON writer's
/// error holds the I/O error it met without naming it as its source).
pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .is_some_and(|e| e.io_error_kind() == Some(BrokenPipe))
    })
}

/// Whether stdout is a pipe or socket whose reader has gone away (so that
/// a broken connection to the daemon is still reported).
fn stdout_is_closed() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its length, and a zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready == 1 && fd.revents & libc::POLLERR != 0
}

/// An error and its causes on one line.
///
/// A cause is left out when the text so far already ends with it: error
/// types that print their source themselves (`{what}: {source}`) would
/// otherwise show it twice.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.is_empty() {
            if text.ends_with(&part) {
                continue;
            }
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text.replace('\n', " ")
}

/// A guest failure as the one line a user reads: without the wasm
/// backtrace wasmtime puts before the cause of a trap (`spare tasks
/// --json` and `spare run --json` keep it whole).
///
/// The failure text comes flattened to one line: `trapped: error while
/// executing at wasm backtrace:   0: 0x50d - m!f   1: …: <cause>`. Frames
/// hold no `: ` except after their index, so the first `: ` that does not
/// follow an index (or the hint about `WASMTIME_BACKTRACE_DETAILS`) starts
/// the cause.
pub(crate) fn without_backtrace(text: &str) -> String {
    const MARK: &str = "error while executing at wasm backtrace:";
    const NOTE: &str = "environment variable may show more debugging information";
    let Some(start) = text.find(MARK) else {
        return text.to_owned();
    };
    let head = &text[..start];
    let mut pos = start + MARK.len();
    let cause = loop {
        let Some(found) = text[pos..].find(": ") else {
            break None;
        };
        let colon = pos + found;
        let before = text[..colon].trim_end_matches(|c: char| c.is_ascii_digit());
        let is_index = before.len() < colon && before.ends_with(char::is_whitespace);
        if is_index {
            pos = colon + 2;
        } else if text[colon..].starts_with(": using the `WASMTIME_BACKTRACE_DETAILS") {
            match text[colon..].find(NOTE) {
                Some(at) => pos = colon + at + NOTE.len(),
                None => break None,
            }
        } else {
            break Some(text[colon + 2..].trim());
        }
    };
    match cause {
        Some(cause) if !cause.is_empty() => format!("{head}{cause}"),
        _ => format!("{head}error while executing (its backtrace is in `spare tasks --json`)"),
    }
}

pub(crate) use spare_core::text::printable;

/// The context of every failed write to stdout: a full disk or a closed
/// file is an error (a reader that went away is not, see [`fail`]).
pub(crate) const CANNOT_WRITE: &str = "cannot write to stdout";

/// Prints one line on stdout.
pub(crate) fn line(text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    writeln!(std::io::stdout(), "{text}").context(CANNOT_WRITE)
}

/// Prints rows as aligned columns; the first row is the header.
pub(crate) fn table(rows: &[Vec<String>]) -> anyhow::Result<()> {
    use anyhow::Context as _;
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
            let cell = printable(cell);
            if i + 1 == row.len() {
                line.push_str(&cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        writeln!(out, "{}", line.trim_end()).context(CANNOT_WRITE)?;
    }
    Ok(())
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).context(CANNOT_WRITE)?;
    writeln!(out).context(CANNOT_WRITE)
}

/// `text` with every peer id in it shortened as [`short_peer`] does, so a
/// message that names one fits a table's cell.
pub(crate) fn short_peers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.len() >= 40 && word.parse::<spare_core::PeerId>().is_ok() {
            out.push_str(&short_peer(word));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that prints its source itself, as `thiserror`'s
    /// `#[error("{what}: {source}")]` does.
    #[derive(Debug)]
    struct Wrapped {
        what: &'static str,
        source: std::io::Error,
    }

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.what, self.source)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_an_error_prints_itself_is_not_repeated() {
        let err = anyhow::Error::new(Wrapped {
            what: "cannot create /tmp/x",
            source: std::io::Error::from_raw_os_error(libc::EEXIST),
        });
        assert_eq!(
            one_line(&err),
            "cannot create /tmp/x: File exists (os error 17)"
        );
        // Causes that add something are all kept, outermost first.
        let err = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("cannot read a.wasm")
            .context("line\nbreak");
        assert_eq!(
            one_line(&err),
            "line break: cannot read a.wasm: No such file or directory (os error 2)"
        );
    }

    /// A writer whose reader went away.
    struct BrokenWriter;

    impl Write for BrokenWriter {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn peer_ids_in_a_message_are_shortened() {
        let peer = spare_core::PeerId::random().to_string();
        let text = format!("peer {peer} is not connected (`spare peers`)");
        assert_eq!(
            short_peers(&text),
            format!(
                "peer {} is not connected (`spare peers`)",
                short_peer(&peer)
            )
        );
        assert_eq!(short_peers("exit 12D3KooW"), "exit 12D3KooW");
    }

    #[test]
    fn a_broken_pipe_is_found_anywhere_in_the_chain() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe(&anyhow::Error::new(pipe())));
        assert!(is_broken_pipe(
            &anyhow::Error::new(pipe()).context("cannot print")
        ));
        assert!(is_broken_pipe(&anyhow::Error::new(Wrapped {
            what: "writing",
            source: pipe(),
        })));
        let json = serde_json::to_writer(BrokenWriter, &1).unwrap_err();
        assert!(is_broken_pipe(
            &anyhow::Error::new(json).context("printing")
        ));
        assert!(!is_broken_pipe(&anyhow::anyhow!("Broken pipe")));
    }

    #[test]
    fn a_trap_reads_as_its_cause_without_the_backtrace() {
        // As the host records it: wasmtime's error flattened to one line.
        let exit = "trapped: error while executing at wasm backtrace:     0:    0x50d - \
                    <unknown>!<wasm function 24>     1:   0x2869 - <unknown>!<wasm function 32>     \
                    4:   0x6c02 - <unknown>!<wasm function 81>: exit with invalid exit status \
                    outside of [0..126)";
        assert_eq!(
            without_backtrace(exit),
            "trapped: exit with invalid exit status outside of [0..126)"
        );
        // With symbols, source lines, inlined frames and the hint.
        let detailed = "trapped: error while executing at wasm backtrace:     0:    0x50d - \
                        echo.wasm!std::process::exit                     at /rustc/library/std/src/process.rs:2398:5 \
                                       - core::ops::function::FnOnce::call_once    \
                        1:   0x2869 - echo.wasm!__main_void note: using the \
                        `WASMTIME_BACKTRACE_DETAILS=1` environment variable may show more \
                        debugging information: host failed: cannot write: 12: odd";
        assert_eq!(
            without_backtrace(detailed),
            "trapped: host failed: cannot write: 12: odd"
        );
        // A text without a backtrace is kept; one clipped before its cause
        // says where the backtrace is.
        assert_eq!(
            without_backtrace("trapped: wasm trap: integer divide by zero"),
            "trapped: wasm trap: integer divide by zero"
        );
        assert_eq!(
            without_backtrace(
                "trapped: error while executing at wasm backtrace:     0:    0x50d - m!f..."
            ),
            "trapped: error while executing (its backtrace is in `spare tasks --json`)"
        );
    }
}
