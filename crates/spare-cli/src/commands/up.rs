//! `spare up`: the daemon, in the foreground.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use spare_node::Config;
use spare_node::config::Flags;
use spare_node::daemon::{DaemonOptions, run};
use spare_runtime::WorkerCommand;

use crate::Context;

/// Each flag overrides the same-named setting in the config file (see
/// `spare init`'s template) and is checked the same way; an error names the
/// flag.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (repeatable), e.g. /ip4/127.0.0.1/tcp/0.
    /// Default: TCP and QUIC on port 4117 of every interface.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Peer to connect to at start (repeatable), as printed by `spare id`.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Tasks to run at once for the swarm, 1 to the machine's cores
    /// (default: every core).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    cores: Option<i64>,
    /// Share of the whole machine's CPU all guests together may use, 0.1%
    /// to 100%, e.g. 50%.
    #[arg(long, value_name = "PERCENT", allow_hyphen_values = true)]
    cpu: Option<String>,
    /// Memory all guests together may use, up to the machine's, e.g. 4GiB
    /// (default: half the machine's).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    memory: Option<String>,
    /// Disk for tasks' modules, inputs and compiled code and this node's
    /// database, at least 256MiB, e.g. 10GiB.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    disk: Option<String>,
    /// Upload bandwidth for the swarm, at least 128KiB/s, e.g. 2MiB/s, or
    /// unlimited.
    #[arg(long, value_name = "RATE", allow_hyphen_values = true)]
    upload: Option<String>,
    /// Download bandwidth for the swarm, at least 128KiB/s, e.g. 2MiB/s,
    /// or unlimited.
    #[arg(long, value_name = "RATE", allow_hyphen_values = true)]
    download: Option<String>,
    /// How limits are enforced: auto, cgroup or fallback.
    #[arg(long, value_name = "HOW")]
    enforcement: Option<String>,
    /// Tasks waiting for a core before new ones are refused, 0 to 65536
    /// (default: 256).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    queue: Option<i64>,
    /// Give only while the owner leaves the machine idle (the default);
    /// --idle-only=false is --always.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        conflicts_with = "always"
    )]
    idle_only: Option<bool>,
    /// Give whatever the owner is doing (within the other limits).
    #[arg(long)]
    always: bool,
    /// The owner counts as active above this much CPU, of one core: 0.1%
    /// to 100% (default: 25%).
    #[arg(long, value_name = "PERCENT", allow_hyphen_values = true)]
    owner_threshold: Option<String>,
    /// How long the owner must be quiet before guests resume: 0s to 24h,
    /// e.g. 30s (default: 10s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    cool_down: Option<String>,
    /// Local times of day to give in, e.g. 22:00-07:00 (repeatable, or
    /// comma-separated); --windows= means all day (the default).
    #[arg(long, value_name = "HH:MM-HH:MM", value_delimiter = ',')]
    windows: Option<Vec<String>>,
    /// Give while running on battery; --on-battery false pauses on battery
    /// (the default).
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    on_battery: Option<bool>,
    /// A task kept waiting this long by a pause goes back to its
    /// requester: 1s to 24h (default: 60s).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    hand_back_after: Option<String>,
}

impl Args {
    /// The flags given, for [`Config::load`].
    fn flags(self) -> Flags {
        let idle_only = if self.always {
            Some(false)
        } else {
            self.idle_only
        };
        Flags {
            listen: self.listen,
            bootstrap: self.bootstrap,
            no_mdns: self.no_mdns,
            cores: self.cores,
            cpu: self.cpu,
            memory: self.memory,
            disk: self.disk,
            upload: self.upload,
            download: self.download,
            enforcement: self.enforcement,
            queue: self.queue,
            idle_only,
            owner_threshold: self.owner_threshold,
            cool_down: self.cool_down,
            // `--windows=` (no window at all) is all day.
            windows: self
                .windows
                .map(|w| w.into_iter().filter(|w| !w.trim().is_empty()).collect()),
            on_battery: self.on_battery,
            hand_back_after: self.hand_back_after,
        }
    }
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let config = Config::load(&context.paths.config, args.flags())?;
    let program = std::env::current_exe().context("cannot find the spare executable")?;
    let worker = WorkerCommand {
        program,
        args: vec![
            "worker".into(),
            "--cache-dir".into(),
            context.paths.cache.clone().into_os_string(),
            "--blobs-dir".into(),
            context.paths.blobs.clone().into_os_string(),
        ],
    };
    run(DaemonOptions {
        paths: context.paths.clone(),
        config,
        worker,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;
    use spare_policy::{Machine, Window};

    use super::*;

    #[derive(Debug, Parser)]
    struct Up {
        #[command(flatten)]
        args: Args,
    }

    const MACHINE: Machine = Machine {
        cores: 2,
        memory: 8 << 30,
        disk: Some(100 << 30),
    };

    fn load(file: &str, flags: &[&str]) -> Result<Config, String> {
        let up = Up::try_parse_from(std::iter::once("up").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::parse_with(file, "c.toml", up.args.flags(), MACHINE).map_err(|e| e.to_string())
    }

    #[test]
    fn every_when_setting_has_a_flag_over_the_file() {
        let file = "queue = 3\n[when]\nidle_only = true\nowner_threshold = \"10%\"\ncool_down = \"1s\"\nwindows = [\"01:00-02:00\"]\non_battery = false\nhand_back_after = \"2s\"\n";
        let config = load(
            file,
            &[
                "--queue=7",
                "--idle-only=false",
                "--owner-threshold=50%",
                "--cool-down=1m",
                "--windows=22:00-07:00,12:00-13:00",
                "--on-battery",
                "--hand-back-after=1d",
            ],
        )
        .unwrap();
        let when = &config.policy.when;
        assert_eq!(config.queue, 7);
        assert!(!when.idle_only);
        assert_eq!(when.owner_threshold, 500);
        assert_eq!(when.cool_down, Duration::from_secs(60));
        assert_eq!(
            when.windows,
            [
                Window::parse("22:00-07:00").unwrap(),
                Window::parse("12:00-13:00").unwrap()
            ]
        );
        assert!(when.on_battery);
        assert_eq!(when.hand_back_after, Duration::from_secs(86_400));

        // Without flags, the file's values; --windows= is all day, and the
        // bare flags are true.
        let config = load(file, &[]).unwrap();
        assert_eq!(config.policy.when.cool_down, Duration::from_secs(1));
        assert_eq!(config.policy.when.windows.len(), 1);
        let config = load(file, &["--windows=", "--on-battery=false", "--always"]).unwrap();
        assert!(config.policy.when.windows.is_empty());
        assert!(!config.policy.when.on_battery);
        assert!(!config.policy.when.idle_only);
        let config = load("[when]\nidle_only = false\n", &["--idle-only"]).unwrap();
        assert!(config.policy.when.idle_only);
        let config = load(
            "",
            &["--windows", "22:00-07:00", "--windows", "12:00-13:00"],
        )
        .unwrap();
        assert_eq!(config.policy.when.windows.len(), 2);
        assert!(load("", &["--idle-only", "--always"]).is_err());
    }

    #[test]
    fn a_negative_value_is_refused_as_such_however_it_is_written() {
        for args in [
            ["--cool-down", "-1s"],
            ["--cpu", "-5%"],
            ["--upload", "-1MiB/s"],
        ] {
            let error = load("", &args).unwrap_err().to_string();
            assert!(error.contains("negative"), "{args:?}: {error}");
        }
    }

    #[test]
    fn a_yes_or_no_flag_takes_its_value_after_a_space_or_an_equals_sign() {
        for args in [&["--on-battery", "false"][..], &["--on-battery=false"]] {
            let config = load("", args).unwrap();
            assert!(!config.policy.when.on_battery, "{args:?}");
        }
        assert!(load("", &["--on-battery"]).unwrap().policy.when.on_battery);
        let err = load("", &["--on-battery", "maybe"]).unwrap_err();
        assert!(err.contains("invalid value 'maybe'"), "{err}");
    }

    #[test]
    fn a_wrong_line_in_the_file_is_named_though_a_flag_covers_it() {
        let err = load("mdns = false\ncpu = \"150%\"\n", &["--cpu", "50%"]).unwrap_err();
        assert!(
            err.starts_with("c.toml:2: cpu = 150% is over 100%"),
            "{err}"
        );
        assert!(load("cpu = \"25%\"\n", &["--cpu", "50%"]).is_ok());
    }

    #[test]
    fn a_bad_flag_value_names_the_flag() {
        for (flag, message) in [
            ("--cool-down=2x", "--cool-down: `2x` has an unknown unit"),
            (
                "--cool-down=25h",
                "--cool-down: 25h is not between 0s and 24h",
            ),
            (
                "--hand-back-after=0s",
                "--hand-back-after: 0s is not between 1s and 24h",
            ),
            (
                "--owner-threshold=0%",
                "--owner-threshold: 0% is not between",
            ),
            (
                "--windows=25:00-01:00",
                "--windows: time window `25:00-01:00` has a time past 24:00",
            ),
            ("--queue=70000", "--queue: 70000 is not in 0..=65536"),
            ("--upload=-1MiB/s", "--upload: `-1MiB/s` is negative"),
            ("--cpu=0.01%", "--cpu: 0.01% is below the minimum, 0.1%"),
        ] {
            // The file's value is fine; the flag's is not.
            let file = "queue = 1\n[when]\ncool_down = \"1s\"\nwindows = []\n";
            let err = load(file, &[flag]).unwrap_err();
            assert!(err.starts_with(message), "{flag}: {err}");
        }
        let err = load("", &["--on-battery=maybe"]).unwrap_err();
        assert!(err.contains("--on-battery"), "{err}");
        // A negative count after a space is a value, not a flag.
        for flag in ["--cores", "--queue"] {
            let err = load("", &[flag, "-1"]).unwrap_err();
            assert!(err.starts_with(&format!("{flag}:")), "{err}");
        }
    }
}
