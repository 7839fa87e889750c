//! `spare status`: what this node gives the swarm right now, and why.

use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use spare_core::units::{format_bytes, format_duration};
use spare_node::api::types::StatusView;

use crate::{Context, output};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let status: StatusView = context.client().get("/v1/status").await?;
    if args.json {
        output::json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    std::io::stdout().write_all(render(&status).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn render(s: &StatusView) -> String {
    let ms = |ms: u64| format_duration(std::time::Duration::from_millis(ms));
    let rate = |r: Option<u64>| {
        r.map_or_else(
            || "unlimited".to_owned(),
            |r| format!("{}/s", format_bytes(r)),
        )
    };
    let pressure =
        |p: Option<f64>| p.map_or_else(|| "n/a".to_owned(), |p| format!("{:.0}%", p * 100.0));
    let set = &s.settings;
    let mut out = String::new();
    let _ = writeln!(out, "{}", s.reason);
    let _ = writeln!(
        out,
        "  tasks      {} running, {} queued, {} at once",
        s.running, s.queued, s.slots
    );
    let _ = writeln!(
        out,
        "  owner      {:.2} cores in use; CPU pressure {}, memory pressure {}{}",
        s.owner_cores,
        pressure(s.cpu_pressure),
        pressure(s.memory_pressure),
        s.owner_active_ms_ago
            .map(|a| format!("; last active {} ago", ms(a)))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  guests     {:.2} cores in use; {} pauses since start",
        s.spare_cores, s.pauses
    );
    let _ = writeln!(
        out,
        "  gives      {} cores, cpu {}%, memory {} ({} per guest), disk {}",
        set.cores,
        set.cpu_percent,
        format_bytes(set.memory),
        format_bytes(set.guest_memory),
        format_bytes(set.disk)
    );
    let _ = writeln!(
        out,
        "  disk       blobs {} of {}",
        format_bytes(s.blobs_used),
        format_bytes(s.blobs_budget)
    );
    let _ = writeln!(
        out,
        "  bandwidth  up {} ({} sent), down {} ({} received)",
        rate(set.upload),
        format_bytes(s.uploaded),
        rate(set.download),
        format_bytes(s.downloaded)
    );
    let when = if set.idle_only {
        format!(
            "while the owner is idle (above {}% of a core counts as active; resume after {} quiet)",
            set.owner_threshold_percent,
            ms(set.cool_down_ms)
        )
    } else {
        "always".to_owned()
    };
    let _ = writeln!(out, "  when       {when}");
    if !set.windows.is_empty() {
        let _ = writeln!(out, "  windows    {}", set.windows.join(", "));
    }
    let _ = writeln!(
        out,
        "  battery    {}; hand tasks back after {} paused",
        if set.on_battery {
            "gives on battery"
        } else {
            "pauses on battery"
        },
        ms(set.hand_back_after_ms)
    );
    let e = &s.enforcement;
    let _ = writeln!(
        out,
        "  enforced   by {}: CPU by {}; memory by {}",
        e.mechanism, e.cpu, e.memory
    );
    for note in &e.notes {
        let _ = writeln!(out, "  note       {note}");
    }
    out
}
