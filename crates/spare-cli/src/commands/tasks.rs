//! `spare tasks`

use std::process::ExitCode;

use anyhow::Result;
use spare_ledger::{HostedTask, RequestedTask};

use crate::{Context, output};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// List tasks this node ran for other peers instead.
    #[arg(long)]
    hosted: bool,
    /// How many tasks to list (the most recent first).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let client = context.client();
    if args.hosted {
        let tasks: Vec<HostedTask> = client
            .get(&format!("/v1/hosted?limit={}", args.limit))
            .await?;
        if args.json {
            output::json(&tasks)?;
            return Ok(ExitCode::SUCCESS);
        }
        if tasks.is_empty() {
            output::line("no task hosted for another peer yet")?;
            return Ok(ExitCode::SUCCESS);
        }
        // A host knows a task's module, not the name its requester gave it.
        let mut rows = vec![header("MODULE", "REQUESTER")];
        for t in &tasks {
            let module = t.module.to_string();
            rows.push(row(
                &t.task,
                &module[..module.len().min(12)],
                &t.requester,
                &t.state,
                t.exit_code,
                t.failure.as_deref(),
                t.fuel,
                t.wall_ms,
                t.started_ms,
            ));
        }
        output::table(&rows)?;
    } else {
        let tasks: Vec<RequestedTask> = client
            .get(&format!("/v1/tasks?limit={}", args.limit))
            .await?;
        if args.json {
            output::json(&tasks)?;
            return Ok(ExitCode::SUCCESS);
        }
        if tasks.is_empty() {
            output::line("no task run from this node yet (`spare run <program.wasm>` runs one)")?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut rows = vec![header("NAME", "HOST")];
        for t in &tasks {
            rows.push(row(
                &t.task,
                &t.name,
                t.host.as_deref().unwrap_or("-"),
                &t.state,
                t.exit_code,
                t.failure.as_deref(),
                t.fuel,
                t.wall_ms,
                t.submitted_ms,
            ));
        }
        output::table(&rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn header(what: &str, who: &str) -> Vec<String> {
    ["TASK", what, who, "ENDED", "FUEL", "WALL", "WHEN"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn row(
    task: &str,
    name: &str,
    peer: &str,
    state: &spare_ledger::TaskState,
    exit_code: Option<i32>,
    failure: Option<&str>,
    fuel: Option<u64>,
    wall_ms: Option<u64>,
    when_ms: u64,
) -> Vec<String> {
    let ended = match (state, exit_code, failure) {
        (spare_ledger::TaskState::Exited, Some(code), _) => format!("exit {code}"),
        // A trap's backtrace is left to `--json`.
        (_, _, Some(failure)) => clip(
            &output::short_peers(&output::without_backtrace(failure)),
            48,
        ),
        (state, _, _) => format!("{state:?}").to_lowercase(),
    };
    vec![
        task.chars().take(12).collect(),
        name.to_owned(),
        output::short_peer(peer),
        ended,
        fuel.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
        wall_ms
            .map(|w| format!("{w} ms"))
            .unwrap_or_else(|| "-".into()),
        output::ago(when_ms),
    ]
}

/// Cuts `text` to `max` characters for a table cell.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}
