//! `spare status`: what this node gives the swarm right now, and why.

use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
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
    std::io::stdout()
        .write_all(render(&status).as_bytes())
        .context(output::CANNOT_WRITE)?;
    Ok(ExitCode::SUCCESS)
}

/// `1 core`, `2 cores`.
fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
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
        "  guests     {:.2} cores in use; {} since start",
        s.spare_cores,
        count(s.pauses, "pause", "pauses")
    );
    let _ = writeln!(
        out,
        "  settings   {}, cpu {}%, memory {} ({} per guest), disk {}",
        count(set.cores, "core", "cores"),
        set.cpu_percent,
        format_bytes(set.memory),
        format_bytes(set.guest_memory),
        format_bytes(set.disk)
    );
    let _ = writeln!(
        out,
        "  disk       blobs {} and state {} of {} (3/4 of the disk budget; compiled modules \
         get the rest)",
        format_bytes(s.blobs_used),
        format_bytes(s.state_bytes),
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
        "  battery    {}{}; hand tasks back after {} paused",
        match s.power.as_deref() {
            Some(p @ "no battery") => format!("{p}; "),
            Some(p) => format!("{p} now; "),
            None => String::new(),
        },
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
    let _ = writeln!(out, "  workers    {}", e.workers);
    for note in &e.notes {
        let _ = writeln!(out, "  note       {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use spare_node::api::types::{EnforcementView, SettingsView};

    fn status(state: &str, reason: &str) -> StatusView {
        StatusView {
            peer_id: "12D3KooW".into(),
            state: state.into(),
            reason: reason.into(),
            giving_cores: 1.0,
            owner_cores: 0.0,
            spare_cores: 0.0,
            cpu_pressure: None,
            memory_pressure: None,
            owner_active_ms_ago: None,
            paused_ms: None,
            pauses: 1,
            slots: 1,
            running: 0,
            queued: 0,
            settings: SettingsView {
                cores: 1,
                cpu_percent: 100.0,
                memory: 1 << 30,
                guest_memory: 1 << 30,
                disk: 1 << 30,
                upload: None,
                download: None,
                idle_only: true,
                owner_threshold_percent: 25.0,
                cool_down_ms: 10_000,
                windows: Vec::new(),
                on_battery: false,
                hand_back_after_ms: 60_000,
            },
            enforcement: EnforcementView {
                mechanism: "fallback".into(),
                cpu: "duty cycle".into(),
                memory: "the sandbox".into(),
                workers: "confined: files, TCP, signals, sockets".into(),
                notes: Vec::new(),
            },
            uploaded: 0,
            downloaded: 0,
            blobs_used: 0,
            blobs_budget: 1 << 30,
            state_bytes: 0,
            power: None,
        }
    }

    #[test]
    fn status_shows_the_power_source_now() {
        let mut paused = status("paused", "paused: on battery");
        paused.power = Some("on battery".into());
        let shown = render(&paused);
        assert!(shown.starts_with("paused: on battery\n"), "{shown}");
        assert!(
            shown.contains("  battery    on battery now; pauses on battery; hand tasks back after 60 s paused\n"),
            "{shown}"
        );
        let mut giving = status("giving", "giving 1 core (the whole machine)");
        giving.power = Some("on AC power".into());
        let shown = render(&giving);
        assert!(
            shown.contains("  battery    on AC power now; pauses on battery;"),
            "{shown}"
        );
        giving.power = Some("no battery".into());
        let shown = render(&giving);
        assert!(
            shown.contains("  battery    no battery; pauses on battery;"),
            "{shown}"
        );
        giving.power = None;
        let shown = render(&giving);
        assert!(shown.contains("  battery    pauses on battery;"), "{shown}");
    }

    #[test]
    fn status_counts_read_naturally() {
        let mut s = status(
            "giving",
            "giving 1 core of 2 (limited by its settings: cores = 1)",
        );
        let shown = render(&s);
        assert!(shown.contains("  settings   1 core, cpu 100%"), "{shown}");
        assert!(shown.contains("; 1 pause since start"), "{shown}");
        s.settings.cores = 2;
        s.pauses = 0;
        let shown = render(&s);
        assert!(shown.contains("  settings   2 cores, cpu 100%"), "{shown}");
        assert!(shown.contains("; 0 pauses since start"), "{shown}");
    }
}
