//! `spare run`: run a WebAssembly program on the swarm as if it ran here.
//!
//! The guest's stdout goes to stdout, its stderr to stderr, stdin is sent
//! along (when it is not a terminal), and `spare` exits with the guest's
//! exit code. Ctrl-C cancels the task on its host.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use serde::Serialize;
use spare_core::limits::{MAX_MODULE_BYTES, MAX_STDIN_BYTES, WASM_PAGE_BYTES};
use spare_core::task::MAX_INLINE_STDIN;
use spare_core::units::{format_bytes, format_duration, parse_bytes, parse_count, parse_duration};
use spare_core::{BlobRef, LimitRequest, Limits, PeerId};
use spare_node::api::types::{
    CancelReply, FailureKind, NodeInfo, PeerView, Placement, Submission, SubmitStdin, TaskEvent,
    TaskResult, encode_b64,
};

use crate::output::{
    EXIT_CANCELLED, EXIT_LIMIT, EXIT_SPARE, EXIT_TIMEOUT, EXIT_TRAP, EXIT_UNRUNNABLE, short_peer,
};
use crate::{Context, output};
use spare_node::api::client::Client;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The program (a WASI preview 1 module or preview 2 component), then
    /// its arguments: everything after the program is the program's, so
    /// spare's own options go before it (a `--` right after the program is
    /// dropped: `primes.wasm -- 100000`).
    #[arg(
        value_name = "PROGRAM [ARGS]",
        required = true,
        num_args = 1..,
        trailing_var_arg = true
    )]
    argv: Vec<std::ffi::OsString>,
    /// Set an environment variable for the program (repeatable). `NAME`
    /// alone passes this shell's value. The program sees nothing else.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Run on this peer only: its id, an address ending in `/p2p/<id>` (as
    /// `spare id` prints; only the id is used, the peer must be connected),
    /// or the end of a connected peer's id (as `spare tasks` shows it,
    /// `…9sVv1Lpy`).
    #[arg(long, value_name = "PEER", conflicts_with = "local")]
    on: Option<String>,
    /// Run on this node instead of a remote peer.
    #[arg(long)]
    local: bool,
    // The limits' help shows their defaults, read from `Limits::DEFAULT`.
    // Values may start with `-`, so that `--timeout -5s` is refused as a
    // negative value rather than as an unknown flag.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, help = limit_help("Wall-time limit, e.g. 5s, 2m", Limit::Timeout))]
    timeout: Option<String>,
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, help = limit_help("Memory limit, e.g. 64MiB (a bare number is bytes)", Limit::Memory))]
    memory: Option<String>,
    #[arg(long, value_name = "COUNT", allow_hyphen_values = true, help = limit_help("Fuel limit (about one unit per instruction), e.g. 1e9", Limit::Fuel))]
    fuel: Option<String>,
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, help = limit_help("Limit on each of stdout and stderr, e.g. 1MiB", Limit::Output))]
    output: Option<String>,
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, help = limit_help("Native stack limit, e.g. 512KiB", Limit::Stack))]
    stack: Option<String>,
    /// Print the result as JSON instead of the program's output.
    #[arg(long)]
    json: bool,
}

/// The `--json` result.
#[derive(Debug, Serialize)]
struct JsonResult {
    task: String,
    host: String,
    attempts: u32,
    exit_code: Option<i32>,
    error: Option<String>,
    /// The output as text (invalid UTF-8 replaced by U+FFFD)…
    stdout: String,
    stderr: String,
    /// …and, where it was not UTF-8, exactly, in base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_base64: Option<String>,
    fuel: u64,
    wall_ms: u64,
}

/// The `--json` answer when no task result came back.
#[derive(Debug, Serialize)]
struct JsonError {
    exit_code: Option<i32>,
    error: String,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let json = args.json;
    match submit(context, args).await {
        Err(e) if json => {
            output::json(&JsonError {
                exit_code: None,
                error: output::one_line(&e),
            })?;
            Ok(output::fail(&e))
        }
        done => done,
    }
}

impl Args {
    /// The program's path and its arguments (which a guest takes as text).
    /// A `--` right after the program is dropped, as most commands do:
    /// `spare run primes.wasm -- 100000`.
    fn program(&self) -> Result<(PathBuf, Vec<String>)> {
        let (program, rest) = self
            .argv
            .split_first()
            .ok_or_else(|| anyhow!("no program to run"))?;
        let rest = match rest.split_first() {
            Some((first, tail)) if first == "--" => tail,
            _ => rest,
        };
        let args = rest
            .iter()
            .map(|arg| {
                arg.clone()
                    .into_string()
                    .map_err(|arg| anyhow!("the program argument {arg:?} is not UTF-8"))
            })
            .collect::<Result<_>>()?;
        Ok((PathBuf::from(program), args))
    }
}

async fn submit(context: &Context, args: Args) -> Result<ExitCode> {
    let limits = limits(&args)?;
    let env = environment(&args.env, |name| std::env::var(name))?;
    let client = context.client();
    let placement = match (&args.on, args.local) {
        (Some(peer), _) => Placement::On(peer_named(&client, peer).await?),
        (None, true) => Placement::Local,
        (None, false) => Placement::Auto,
    };
    let (module_path, program_args) = args.program()?;
    let module = read_module(&module_path)?;
    let module_ref = BlobRef::of(&module);
    // Asked before stdin is read: without a daemon, the user hears so at
    // once, not after typing (or piping) all of the input. Uploaded after
    // it, so that a slow input does not leave the module unpinned, to be
    // evicted for peers' blobs, in between.
    let blob_path = format!("/v1/blobs/{}", module_ref.id);
    let stored = client.exists(&blob_path).await?;
    let stdin = read_stdin().await?;
    if !stored {
        client.put(&blob_path, Bytes::from(module)).await?;
    } else if !stdin.is_empty() {
        // Reading the input may have taken a while: asked again.
        upload(&client, &module_ref, module).await?;
    }
    let stdin = if stdin.is_empty() {
        SubmitStdin::None
    } else if stdin.len() <= MAX_INLINE_STDIN {
        SubmitStdin::Inline(encode_b64(&stdin))
    } else {
        let blob = BlobRef::of(&stdin);
        upload(&client, &blob, stdin).await?;
        SubmitStdin::Blob(blob)
    };
    let name = module_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "task.wasm".into());
    let submission = Submission {
        name,
        module: module_ref,
        args: program_args,
        env,
        stdin,
        limits,
        placement,
    };
    let mut events = client.post_stream("/v1/tasks", &submission).await?;
    let mut task_id: Option<String> = None;
    let mut cancelled = false;
    // What the user has been told: the latest attempt, the hosts that
    // lower the default limits.
    let mut told_attempt = 0;
    let mut told_lowered = std::collections::HashSet::new();
    loop {
        let event = tokio::select! {
            event = events.next::<TaskEvent>() => event?,
            _ = tokio::signal::ctrl_c() => {
                // A second Ctrl-C stops waiting for the host to confirm.
                if cancelled {
                    return unfinished(args.json, "cancelled; not waiting for the host to confirm");
                }
                cancelled = true;
                if let Some(task) = &task_id {
                    eprintln_quiet("spare: cancelling… (Ctrl-C again to stop waiting)");
                    let _: Result<CancelReply> = client.post(&format!("/v1/tasks/{task}/cancel"), &()).await;
                } else {
                    return unfinished(args.json, "cancelled before it ran");
                }
                continue;
            }
        };
        match event {
            None => bail!("the daemon ended the task stream without a result"),
            Some(TaskEvent::Accepted { task }) => task_id = Some(task),
            Some(TaskEvent::Placed {
                attempt,
                host,
                lowered,
            }) => {
                // A busy host's refusal is no attempt: the next placement
                // has the same number, and is not told again.
                if attempt > 1 && attempt > told_attempt {
                    eprintln_quiet(&format!("spare: attempt {attempt}: running on {host}"));
                }
                told_attempt = told_attempt.max(attempt);
                if let Some(lowered) = lowered.filter(|_| told_lowered.insert(host.clone())) {
                    eprintln_quiet(&format!(
                        "spare: peer {host} grants less than the default limits; \
                         running with {lowered} (a limit you set is never lowered)"
                    ));
                }
            }
            Some(TaskEvent::Retrying {
                attempt,
                host,
                reason,
            }) => {
                eprintln_quiet(&format!(
                    "spare: attempt {attempt} on {} failed ({reason}); retrying on another peer",
                    short_peer(&host)
                ));
            }
            Some(TaskEvent::Waiting { reason }) => {
                eprintln_quiet(&format!("spare: waiting: {reason} (Ctrl-C to give up)"));
            }
            Some(TaskEvent::Failed { .. }) if cancelled => {
                return unfinished(args.json, "cancelled before it ran");
            }
            Some(TaskEvent::Failed { error }) => bail!("{error}"),
            Some(TaskEvent::Finished { result }) => return finish(&result, args.json, cancelled),
        }
    }
}

/// Ends a task cancelled before its host told how it ended: `why` on
/// stderr, or with `--json` as the one JSON object `spare run` prints.
fn unfinished(json: bool, why: &str) -> Result<ExitCode> {
    if json {
        let printed = output::json(&JsonError {
            exit_code: None,
            error: why.to_owned(),
        });
        if let Err(e) = printed
            && !output::is_broken_pipe(&e)
        {
            return Err(e);
        }
    } else {
        eprintln_quiet(&format!("spare: {why}"));
    }
    Ok(ExitCode::from(EXIT_CANCELLED))
}

/// Prints the result and picks the exit code.
fn finish(result: &TaskResult, json: bool, cancelled: bool) -> Result<ExitCode> {
    if json {
        let (stdout, stdout_base64) = text_or_base64(&result.stdout_bytes(), &result.stdout);
        let (stderr, stderr_base64) = text_or_base64(&result.stderr_bytes(), &result.stderr);
        // As below, a reader that went away does not change the exit code.
        let printed = output::json(&JsonResult {
            task: result.task.clone(),
            host: result.host.clone(),
            attempts: result.attempts,
            exit_code: result.exit_code,
            error: result.failure.clone(),
            stdout,
            stderr,
            stdout_base64,
            stderr_base64,
            fuel: result.fuel,
            wall_ms: result.wall_ms,
        });
        if let Err(e) = printed
            && !output::is_broken_pipe(&e)
        {
            return Err(e);
        }
    } else {
        // A reader that went away (`spare run … | head`) is not an error of
        // the task: the rest of the output is dropped, as a local program's
        // would be.
        let quiet_pipe = |written: std::io::Result<()>| match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        };
        quiet_pipe(std::io::stdout().lock().write_all(&result.stdout_bytes()))
            .context("cannot write the program's output to stdout")?;
        quiet_pipe(std::io::stderr().lock().write_all(&result.stderr_bytes()))
            .context("cannot write the program's errors to stderr")?;
    }
    let code = match (result.exit_code, result.failure_kind) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, kind) => {
            if !json {
                // A trap's backtrace is left to `--json` and `spare tasks
                // --json`: the line says what happened.
                let failure =
                    output::without_backtrace(result.failure.as_deref().unwrap_or("failed"));
                eprintln_quiet(&format!(
                    "spare: error: the program {failure} (on {})",
                    short_peer(&result.host)
                ));
            }
            match kind {
                Some(FailureKind::Unrunnable) => EXIT_UNRUNNABLE,
                Some(FailureKind::Limit) => EXIT_LIMIT,
                Some(FailureKind::Timeout) => EXIT_TIMEOUT,
                Some(FailureKind::Trap) => EXIT_TRAP,
                Some(FailureKind::Cancelled) => EXIT_CANCELLED,
                Some(FailureKind::Host) | None => EXIT_SPARE,
            }
        }
    };
    if cancelled && result.exit_code.is_none() {
        return Ok(ExitCode::from(EXIT_CANCELLED));
    }
    Ok(ExitCode::from(code))
}

/// Output as text, and its base64 form too when it is not UTF-8.
fn text_or_base64(bytes: &[u8], base64: &str) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64.to_owned()),
        ),
    }
}

/// Prints a line of spare's own on stderr; hosts write parts of some
/// (reasons, failures), so control characters are not passed through.
fn eprintln_quiet(line: &str) {
    let _ = writeln!(std::io::stderr(), "{}", output::printable(line));
}

/// One of the limits `spare run` sets.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Timeout,
    Memory,
    Fuel,
    Output,
    Stack,
}

/// A limit flag's help: `what`, and its default as it would be written on
/// the command line.
fn limit_help(what: &str, limit: Limit) -> String {
    let d = Limits::DEFAULT;
    let bytes = |b: u64| format_bytes(b).replace(' ', "");
    let default = match limit {
        Limit::Timeout => format_duration(Duration::from_millis(d.wall_ms)).replace(' ', ""),
        Limit::Memory => bytes(d.memory),
        Limit::Fuel => count_text(d.fuel),
        Limit::Output => bytes(d.output),
        Limit::Stack => bytes(d.stack),
    };
    format!("{what} [default: {default}]")
}

/// A count in the scientific notation `--fuel` takes when that is shorter:
/// `1e11`, `2.5e6`, `1000`.
fn count_text(n: u64) -> String {
    let digits = n.to_string();
    let significant = digits.trim_end_matches('0');
    let zeros = digits.len() - significant.len();
    if n == 0 || zeros < 3 {
        return digits;
    }
    let exponent = digits.len() - 1;
    match significant.split_at(1) {
        (first, "") => format!("{first}e{exponent}"),
        (first, rest) => format!("{first}.{rest}e{exponent}"),
    }
}

/// The peer id `--on` names: a peer id, an address that ends in one, or
/// the end of exactly one connected peer's id (with or without the `…`
/// that short forms start with).
async fn peer_named(client: &Client, text: &str) -> Result<String> {
    let text = text.trim();
    if let Ok(peer) = text.parse::<PeerId>() {
        return Ok(peer.to_string());
    }
    if let Some((_, last)) = text.rsplit_once("/p2p/")
        && let Ok(peer) = last.parse::<PeerId>()
    {
        return Ok(peer.to_string());
    }
    if text.contains('/') {
        bail!(
            "--on `{text}` is an address without a peer id: it must end in `/p2p/<peer id>` \
             (`spare peers` lists them)"
        );
    }
    let end = text.trim_start_matches('…').trim_start_matches("...");
    if end.len() < 4 {
        bail!(
            "--on `{text}` is not a peer id, nor 4 or more of its last characters \
             (`spare peers` lists them)"
        );
    }
    let peers: Vec<PeerView> = client.get("/v1/peers").await?;
    let matching: Vec<&PeerView> = peers.iter().filter(|p| p.peer_id.ends_with(end)).collect();
    match matching.as_slice() {
        [one] => Ok(one.peer_id.clone()),
        [] => {
            let node: NodeInfo = client.get("/v1/node").await?;
            if node.peer_id.ends_with(end) {
                bail!(
                    "--on `{text}` names peer {}, which is this node; run here with --local \
                     instead of --on",
                    node.peer_id
                );
            }
            bail!(
                "--on `{text}` is not a peer id, and no connected peer's id ends with `{end}` \
                 (`spare peers` lists them)"
            )
        }
        _ => bail!(
            "--on `{text}` could be any of {} connected peers; give more of its id",
            matching.len()
        ),
    }
}

/// The limits the flags set; the daemon fills the rest with the defaults,
/// lowered where a host grants less.
fn limits(args: &Args) -> Result<LimitRequest> {
    let mut limits = LimitRequest::default();
    if let Some(t) = &args.timeout {
        let d = parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?;
        limits.wall_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }
    if let Some(m) = &args.memory {
        let memory = parse_bytes(m).map_err(|e| anyhow!("--memory: {e}"))?;
        if memory < WASM_PAGE_BYTES {
            bail!("{}", memory_too_small(m, memory));
        }
        limits.memory = Some(memory);
    }
    if let Some(f) = &args.fuel {
        limits.fuel = Some(parse_count(f).map_err(|e| anyhow!("--fuel: {e}"))?);
    }
    if let Some(o) = &args.output {
        limits.output = Some(parse_bytes(o).map_err(|e| anyhow!("--output: {e}"))?);
    }
    if let Some(s) = &args.stack {
        limits.stack = Some(parse_bytes(s).map_err(|e| anyhow!("--stack: {e}"))?);
    }
    limits.wanted().validate().map_err(|e| {
        let flag = match e.name() {
            "wall time" => "--timeout",
            "fuel" => "--fuel",
            "memory" => "--memory",
            "output" => "--output",
            _ => "--stack",
        };
        anyhow!("{flag}: {e}")
    })?;
    Ok(limits)
}

/// Why `--memory <text>` (`bytes` parsed) is refused: below one page no
/// guest can start. A bare number is bytes; where it would make sense in
/// MiB, that is probably what was meant.
fn memory_too_small(text: &str, bytes: u64) -> String {
    let text = text.trim();
    let mut message = format!(
        "--memory: `{text}` is {}, less than one WebAssembly page ({}), the least a guest runs in",
        format_bytes(bytes),
        format_bytes(WASM_PAGE_BYTES)
    );
    let bare = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if bare && bytes >= 1 && bytes.saturating_mul(1 << 20) <= Limits::MAX.memory {
        message.push_str(&format!("; did you mean {bytes}MiB?"));
    }
    message
}

/// The guest's environment from `--env` values: `NAME=VALUE`, or `NAME`
/// for this shell's value (from `lookup`). A name given twice keeps its
/// last value, as with env(1).
fn environment(
    pairs: &[String],
    lookup: impl Fn(&str) -> Result<String, std::env::VarError>,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (name, value) = match pair.split_once('=') {
            Some(("", _)) => bail!("--env `{pair}` has an empty name"),
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => match lookup(pair) {
                Ok(value) => (pair.clone(), value),
                Err(std::env::VarError::NotUnicode(_)) => bail!(
                    "--env `{pair}`: {pair} is set in this shell, but its value is not UTF-8, \
                     which a task's environment cannot carry; give it as `--env {pair}=VALUE`"
                ),
                Err(std::env::VarError::NotPresent) => {
                    bail!("--env `{pair}`: no `=` and no such variable in this shell")
                }
            },
        };
        match env.iter_mut().find(|(known, _)| *known == name) {
            Some(slot) => slot.1 = value,
            None => env.push((name, value)),
        }
    }
    Ok(env)
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    read_module_within(path, MAX_MODULE_BYTES)
}

/// Reads the program file, at most `max` bytes of it. A regular file's size
/// is checked first; anything else (`/dev/zero`, a FIFO, `<(producer)`) is
/// read until it ends or passes `max`. Whatever cannot be run ends `spare`
/// with [`EXIT_UNRUNNABLE`], as a shell does for a file it cannot execute.
fn read_module_within(path: &Path, max: u64) -> Result<Vec<u8>> {
    let shown = path.display();
    let unrunnable = |message: String| -> anyhow::Error {
        output::Exit {
            code: EXIT_UNRUNNABLE,
            message,
        }
        .into()
    };
    let too_large = |size: Option<u64>| {
        let mut message = format!(
            "{shown} is larger than {}, the largest module spare runs",
            format_bytes(max)
        );
        if let Some(size) = size {
            // Rounded, a size just past the limit would read as the limit.
            let shown = if size < max.saturating_add(max / 100) {
                format!("{size} bytes")
            } else {
                format_bytes(size)
            };
            message.push_str(&format!(" (it is {shown})"));
        }
        unrunnable(message)
    };
    let cannot_read = |e: std::io::Error| unrunnable(format!("cannot read {shown}: {e}"));
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let meta = file.metadata().map_err(cannot_read)?;
    if meta.is_dir() {
        return Err(unrunnable(format!(
            "{shown} is a directory, not a WebAssembly program"
        )));
    }
    if meta.is_file() && meta.len() > max {
        return Err(too_large(Some(meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > max {
        return Err(too_large(None));
    }
    if let Err(why) = spare_core::wasm::sniff(&bytes) {
        return Err(unrunnable(format!("{shown} is not WebAssembly: {why}")));
    }
    Ok(bytes)
}

/// Reads stdin to its end unless it is a terminal, within the stdin bound.
async fn read_stdin() -> Result<Vec<u8>> {
    if std::io::stdin().is_terminal() {
        return Ok(Vec::new());
    }
    tokio::task::spawn_blocking(|| {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_STDIN_BYTES + 1)
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
        if bytes.len() as u64 > MAX_STDIN_BYTES {
            bail!(
                "stdin is larger than {}, the most a task takes",
                format_bytes(MAX_STDIN_BYTES)
            );
        }
        Ok(bytes)
    })
    .await?
}

/// Uploads a blob unless the daemon has it already.
async fn upload(client: &Client, blob: &BlobRef, bytes: Vec<u8>) -> Result<()> {
    let path = format!("/v1/blobs/{}", blob.id);
    if !client.exists(&path).await? {
        client.put(&path, Bytes::from(bytes)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Args {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let argv = ["run"].iter().chain(flags).chain(&["task.wasm"]);
        <Cli as clap::Parser>::try_parse_from(argv)
            .expect("flags parse")
            .args
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once(&"run").chain(argv)).map(|c| c.args)
    }

    #[test]
    fn everything_after_the_program_is_the_programs() {
        let program = |argv: &[&str]| parse(argv).unwrap().program().unwrap();
        let run = parse(&["--json", "echo.wasm", "a", "-b", "--json", "--"]).unwrap();
        assert!(run.json);
        assert_eq!(
            run.program().unwrap(),
            (
                PathBuf::from("echo.wasm"),
                vec!["a".into(), "-b".into(), "--json".into(), "--".into()]
            )
        );
        // Even the program's first argument, when spare has an option of
        // that name.
        for first in ["--json", "-h", "--timeout", "-e"] {
            let (_, args) = program(&["grep.wasm", first, "x"]);
            assert_eq!(args, [first, "x"]);
        }
        assert!(!parse(&["echo.wasm", "--json"]).unwrap().json);
        assert_eq!(program(&["primes.wasm", "--", "100"]).1, ["100"]);
        assert_eq!(program(&["echo.wasm", "--", "--", "x"]).1, ["--", "x"]);
        assert_eq!(program(&["--", "echo.wasm", "x"]).1, ["x"]);
        assert!(parse(&["--json"]).is_err(), "no program");
        // A mistyped option before the program is not taken for it.
        assert!(parse(&["--jsn", "echo.wasm"]).is_err());
        // A negative value is the value's fault, not an unknown flag.
        let run = parse(&["--timeout", "-5s", "echo.wasm"]).unwrap();
        let err = limits(&run).unwrap_err().to_string();
        assert!(err.starts_with("--timeout: "), "{err}");
    }

    fn exit_code(err: &anyhow::Error) -> Option<u8> {
        err.downcast_ref::<output::Exit>().map(|e| e.code)
    }

    #[test]
    fn memory_below_one_page_is_refused_with_a_hint() {
        for (flag, hint) in [("0", false), ("1", true), ("64", true), ("4096", true)] {
            let err = limits(&args(&["--memory", flag])).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("--memory: `{flag}` is ")),
                "{flag}: {err}"
            );
            assert!(
                err.contains("less than one WebAssembly page (64 KiB)"),
                "{flag}: {err}"
            );
            assert_eq!(
                err.contains(&format!("did you mean {flag}MiB?")),
                hint,
                "{flag}: {err}"
            );
        }
        let err = limits(&args(&["--memory", "64KB"]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("did you mean"), "{err}");
        // One page is enough to start.
        assert_eq!(
            limits(&args(&["--memory", "64KiB"])).unwrap().memory,
            Some(65536)
        );
        assert_eq!(
            limits(&args(&["--memory", "64MiB"])).unwrap().memory,
            Some(64 << 20)
        );
        assert_eq!(
            limits(&args(&[])).unwrap(),
            LimitRequest::default(),
            "unset limits are left to the daemon to fit to the host"
        );
    }

    #[test]
    fn the_limits_help_shows_their_defaults() {
        let help = limit_help("Fuel limit", Limit::Fuel);
        assert_eq!(help, "Fuel limit [default: 1e11]");
        // Each default as shown reads back as the default itself.
        let shown = |limit| {
            let help = limit_help("x", limit);
            help["x [default: ".len()..help.len() - 1].to_owned()
        };
        let d = Limits::DEFAULT;
        assert_eq!(parse_count(&shown(Limit::Fuel)).unwrap(), d.fuel);
        assert_eq!(parse_bytes(&shown(Limit::Memory)).unwrap(), d.memory);
        assert_eq!(parse_bytes(&shown(Limit::Stack)).unwrap(), d.stack);
        assert_eq!(parse_bytes(&shown(Limit::Output)).unwrap(), d.output);
        assert_eq!(
            parse_duration(&shown(Limit::Timeout)).unwrap(),
            Duration::from_millis(d.wall_ms)
        );
        assert_eq!(count_text(2_500_000), "2.5e6");
        assert_eq!(count_text(1000), "1e3");
        assert_eq!(count_text(1234), "1234");
        assert_eq!(count_text(0), "0");
        // And `spare run --help` says them.
        use clap::CommandFactory;
        let help = crate::Cli::command()
            .find_subcommand_mut("run")
            .expect("run")
            .render_help()
            .to_string();
        for default in ["1e11", "256MiB", "1MiB", "8MiB", "2min"] {
            assert!(help.contains(&format!("[default: {default}]")), "{help}");
        }
    }

    #[test]
    fn the_last_env_value_of_a_name_wins() {
        let pairs: Vec<String> = ["K=1", "A=x", "K=2", "FROM_SHELL", "K=3=4"]
            .map(Into::into)
            .to_vec();
        let env = environment(&pairs, |name| {
            assert_eq!(name, "FROM_SHELL");
            Ok("shell".into())
        })
        .unwrap();
        assert_eq!(
            env,
            [
                ("K".to_owned(), "3=4".to_owned()),
                ("A".to_owned(), "x".to_owned()),
                ("FROM_SHELL".to_owned(), "shell".to_owned()),
            ]
        );
    }

    #[test]
    fn a_shell_variable_that_is_not_utf8_is_named_as_such() {
        use std::os::unix::ffi::OsStringExt;
        let not_utf8 = |_: &str| {
            Err(std::env::VarError::NotUnicode(
                std::ffi::OsString::from_vec(vec![0xff]),
            ))
        };
        let err = environment(&["X".into()], not_utf8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("X is set in this shell, but its value is not UTF-8"),
            "{err}"
        );
        let err = environment(&["X".into()], |_| Err(std::env::VarError::NotPresent))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such variable in this shell"), "{err}");
    }

    #[test]
    fn a_module_that_never_ends_is_read_only_up_to_the_maximum() {
        // /dev/zero would be read without end.
        let err = read_module_within(Path::new("/dev/zero"), 1 << 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/dev/zero is larger than 1 KiB, the largest module spare runs"
        );
        assert_eq!(exit_code(&err), Some(EXIT_UNRUNNABLE));

        // A FIFO whose writer does not stop.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let writer_path = fifo.clone();
        let writer = std::thread::spawn(move || {
            let mut pipe = std::fs::OpenOptions::new()
                .write(true)
                .open(writer_path)
                .unwrap();
            let chunk = [0u8; 4096];
            // Ends when the reader closes the FIFO.
            while pipe.write_all(&chunk).is_ok() {}
        });
        let err = read_module_within(&fifo, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("is larger than 1 MiB"), "{err}");
        writer.join().unwrap();

        // A regular file is refused by its size, before it is read.
        let big = dir.path().join("big.wasm");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_MODULE_BYTES + 1)
            .unwrap();
        let err = read_module(&big).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "big.wasm is larger than 64 MiB, the largest module spare runs \
                 (it is 67108865 bytes)"
            ),
            "{err}"
        );
        assert_eq!(exit_code(&err), Some(EXIT_UNRUNNABLE));

        // Missing files and directories cannot be run either.
        let err = read_module(&dir.path().join("missing.wasm")).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        assert_eq!(exit_code(&err), Some(EXIT_UNRUNNABLE));
        let err = read_module(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("is a directory, not a WebAssembly program"),
            "{err}"
        );
        assert_eq!(exit_code(&err), Some(EXIT_UNRUNNABLE));

        // A small module is read whole.
        let hello = std::fs::read(spare_testkit::example("hello.wasm")).unwrap();
        let got = read_module_within(
            Path::new(&spare_testkit::example("hello.wasm")),
            hello.len() as u64,
        )
        .unwrap();
        assert_eq!(got, hello);
    }
}
