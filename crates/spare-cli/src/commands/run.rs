//! `spare run`: run a WebAssembly program on the swarm as if it ran here.
//!
//! The guest's stdout goes to stdout, its stderr to stderr, stdin is sent
//! along (when it is not a terminal), and `spare` exits with the guest's
//! exit code. Ctrl-C cancels the task on its host.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use serde::Serialize;
use spare_core::limits::{MAX_MODULE_BYTES, MAX_STDIN_BYTES};
use spare_core::task::MAX_INLINE_STDIN;
use spare_core::units::{parse_bytes, parse_count, parse_duration};
use spare_core::{BlobRef, Limits, PeerId};
use spare_node::api::types::{
    CancelReply, FailureKind, Placement, Submission, SubmitStdin, TaskEvent, TaskResult, encode_b64,
};

use crate::output::{
    EXIT_CANCELLED, EXIT_LIMIT, EXIT_SPARE, EXIT_TIMEOUT, EXIT_TRAP, EXIT_UNRUNNABLE, short_peer,
};
use crate::{Context, output};
use spare_node::api::client::Client;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The program: a WASI preview 1 module or preview 2 component.
    module: PathBuf,
    /// Arguments for the program (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
    /// Set an environment variable for the program (repeatable). `NAME`
    /// alone passes this shell's value. The program sees nothing else.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Run on this peer only.
    #[arg(long, value_name = "PEER_ID", conflicts_with = "local")]
    on: Option<String>,
    /// Run on this node instead of a remote peer.
    #[arg(long)]
    local: bool,
    /// Wall-time limit, e.g. 5s, 2m.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Memory limit, e.g. 64MiB.
    #[arg(long, value_name = "BYTES")]
    memory: Option<String>,
    /// Fuel limit (about one unit per instruction), e.g. 1e9.
    #[arg(long, value_name = "COUNT")]
    fuel: Option<String>,
    /// Limit on each of stdout and stderr, e.g. 1MiB.
    #[arg(long, value_name = "BYTES")]
    output: Option<String>,
    /// Native stack limit, e.g. 512KiB.
    #[arg(long, value_name = "BYTES")]
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

async fn submit(context: &Context, args: Args) -> Result<ExitCode> {
    let limits = limits(&args)?;
    let env = environment(&args.env)?;
    let placement = match (&args.on, args.local) {
        (Some(peer), _) => {
            peer.parse::<PeerId>().map_err(|_| {
                anyhow!("--on `{peer}` is not a peer id (`spare peers` lists them)")
            })?;
            Placement::On(peer.clone())
        }
        (None, true) => Placement::Local,
        (None, false) => Placement::Auto,
    };
    let module = read_module(&args.module)?;
    let stdin = read_stdin().await?;
    let client = context.client();

    let module_ref = BlobRef::of(&module);
    upload(&client, &module_ref, module).await?;
    let stdin = if stdin.is_empty() {
        SubmitStdin::None
    } else if stdin.len() <= MAX_INLINE_STDIN {
        SubmitStdin::Inline(encode_b64(&stdin))
    } else {
        let blob = BlobRef::of(&stdin);
        upload(&client, &blob, stdin).await?;
        SubmitStdin::Blob(blob)
    };
    let name = args
        .module
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "task.wasm".into());
    let submission = Submission {
        name,
        module: module_ref,
        args: args.args.clone(),
        env,
        stdin,
        limits,
        placement,
    };
    let mut events = client.post_stream("/v1/tasks", &submission).await?;
    let mut task_id: Option<String> = None;
    let mut cancelled = false;
    loop {
        let event = tokio::select! {
            event = events.next::<TaskEvent>() => event?,
            _ = tokio::signal::ctrl_c() => {
                // A second Ctrl-C stops waiting for the host to confirm.
                if cancelled {
                    eprintln_quiet("spare: cancelled; not waiting for the host to confirm");
                    return Ok(ExitCode::from(EXIT_CANCELLED));
                }
                cancelled = true;
                if let Some(task) = &task_id {
                    eprintln_quiet("spare: cancelling… (Ctrl-C again to stop waiting)");
                    let _: Result<CancelReply> = client.post(&format!("/v1/tasks/{task}/cancel"), &()).await;
                } else {
                    return Ok(ExitCode::from(EXIT_CANCELLED));
                }
                continue;
            }
        };
        match event {
            None => bail!("the daemon ended the task stream without a result"),
            Some(TaskEvent::Accepted { task }) => task_id = Some(task),
            Some(TaskEvent::Placed { attempt, host }) => {
                if attempt > 1 {
                    eprintln_quiet(&format!("spare: attempt {attempt}: running on {host}"));
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
                eprintln_quiet("spare: cancelled before it ran");
                return Ok(ExitCode::from(EXIT_CANCELLED));
            }
            Some(TaskEvent::Failed { error }) => bail!("{error}"),
            Some(TaskEvent::Finished { result }) => return finish(&result, args.json, cancelled),
        }
    }
}

/// Prints the result and picks the exit code.
fn finish(result: &TaskResult, json: bool, cancelled: bool) -> Result<ExitCode> {
    if json {
        let (stdout, stdout_base64) = text_or_base64(&result.stdout_bytes(), &result.stdout);
        let (stderr, stderr_base64) = text_or_base64(&result.stderr_bytes(), &result.stderr);
        output::json(&JsonResult {
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
        })?;
    } else {
        // A reader that went away (`spare run … | head`) is not an error of
        // the task: the rest of the output is dropped, as a local program's
        // would be.
        let quiet_pipe = |written: std::io::Result<()>| match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        };
        quiet_pipe(std::io::stdout().lock().write_all(&result.stdout_bytes()))?;
        quiet_pipe(std::io::stderr().lock().write_all(&result.stderr_bytes()))?;
    }
    let code = match (result.exit_code, result.failure_kind) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, kind) => {
            if !json {
                let failure = result.failure.as_deref().unwrap_or("failed");
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

fn eprintln_quiet(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn limits(args: &Args) -> Result<Limits> {
    let mut limits = Limits::DEFAULT;
    if let Some(t) = &args.timeout {
        let d = parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?;
        limits.wall_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    }
    if let Some(m) = &args.memory {
        limits.memory = parse_bytes(m).map_err(|e| anyhow!("--memory: {e}"))?;
    }
    if let Some(f) = &args.fuel {
        limits.fuel = parse_count(f).map_err(|e| anyhow!("--fuel: {e}"))?;
    }
    if let Some(o) = &args.output {
        limits.output = parse_bytes(o).map_err(|e| anyhow!("--output: {e}"))?;
    }
    if let Some(s) = &args.stack {
        limits.stack = parse_bytes(s).map_err(|e| anyhow!("--stack: {e}"))?;
    }
    limits.validate().map_err(|e| {
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

fn environment(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some(("", _)) => bail!("--env `{pair}` has an empty name"),
            Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
            None => std::env::var(pair)
                .map(|value| (pair.clone(), value))
                .map_err(|_| anyhow!("--env `{pair}`: no `=` and no such variable in this shell")),
        })
        .collect()
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
    if meta.len() > MAX_MODULE_BYTES {
        bail!(
            "{shown} is {} bytes; the largest module spare runs is {MAX_MODULE_BYTES}",
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
    if let Err(why) = spare_core::wasm::sniff(&bytes) {
        return Err(output::Exit {
            code: EXIT_UNRUNNABLE,
            message: format!("{shown} is not WebAssembly: {why}"),
        }
        .into());
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
            bail!("stdin is larger than {MAX_STDIN_BYTES} bytes, the most a task takes");
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
