//! What the owner decided to give, already validated.

use std::time::Duration;

use serde::Serialize;

use crate::window::Window;

/// How much of the machine the swarm may use, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Tasks run at once.
    pub cores: u16,
    /// Share of the whole machine's CPU all guests together may use, in
    /// tenths of a percent (1..=1000).
    pub cpu_permille: u32,
    /// Memory all guests together may use, in bytes.
    pub memory: u64,
    /// Disk for the blob store (three quarters) and compiled modules (a
    /// quarter), in bytes.
    pub disk: u64,
    /// Bytes per second sent to peers; `None` is unlimited.
    pub upload: Option<u64>,
    /// Bytes per second received from peers; `None` is unlimited.
    pub download: Option<u64>,
    pub when: When,
    pub enforcement: Enforcement,
}

/// When the machine gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct When {
    /// Give only while the owner leaves the machine idle.
    pub idle_only: bool,
    /// The owner counts as active above this much CPU, in thousandths of
    /// one core.
    pub owner_threshold: u32,
    /// How long the owner must have been quiet before guests resume.
    pub cool_down: Duration,
    /// Local times of day when the machine gives; empty means all day.
    pub windows: Vec<Window>,
    /// Whether to give while running on battery.
    pub on_battery: bool,
    /// A host paused this long hands its tasks back to their requesters.
    pub hand_back_after: Duration,
}

impl Default for When {
    fn default() -> Self {
        Self {
            idle_only: true,
            owner_threshold: DEFAULT_OWNER_THRESHOLD,
            cool_down: DEFAULT_COOL_DOWN,
            windows: Vec::new(),
            on_battery: false,
            hand_back_after: DEFAULT_HAND_BACK_AFTER,
        }
    }
}

/// A quarter of a core: more than an idle desktop's background noise, less
/// than any program the owner is actually waiting for.
pub const DEFAULT_OWNER_THRESHOLD: u32 = 250;
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(10);
pub const DEFAULT_HAND_BACK_AFTER: Duration = Duration::from_secs(60);
/// Lowest rate a bandwidth limit may be set to: slower transfers would miss
/// the blob fetch deadlines of every peer.
pub const MIN_RATE: u64 = 128 << 10;

/// How CPU and memory limits are enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// A cgroup where one is usable, the fallback otherwise.
    Auto,
    /// A cgroup, or refuse to start.
    Cgroup,
    /// `SCHED_IDLE`, rlimits, the sandbox's memory limit per guest and a
    /// CPU duty cycle driven by signals.
    Fallback,
}

impl Enforcement {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "cgroup" => Ok(Self::Cgroup),
            "fallback" => Ok(Self::Fallback),
            other => Err(format!(
                "enforcement = \"{other}\" is not one of \"auto\", \"cgroup\", \"fallback\""
            )),
        }
    }
}

impl Policy {
    /// The CPU all guests together may use, in thousandths of a core.
    pub fn cpu_millicores(&self, machine_cores: u16) -> u64 {
        let share = u64::from(self.cpu_permille) * u64::from(machine_cores);
        share.min(u64::from(self.cores) * 1000)
    }

    /// Tasks that run at once: the configured cores, fewer when the CPU
    /// share would not give each of them some of a core.
    pub fn slots(&self, machine_cores: u16) -> u16 {
        let whole = self.cpu_millicores(machine_cores).div_ceil(1000);
        u16::try_from(whole)
            .unwrap_or(u16::MAX)
            .clamp(1, self.cores.max(1))
    }

    /// Whether the CPU share is below what the slots would use unthrottled.
    pub fn throttled(&self, machine_cores: u16) -> bool {
        self.cpu_millicores(machine_cores) < u64::from(self.slots(machine_cores)) * 1000
    }
}

/// A policy of `cores` slots and a CPU share of `cpu_permille`, everything
/// else the default, for tests.
#[cfg(test)]
pub(crate) fn policy(cores: u16, cpu_permille: u32) -> Policy {
    Policy {
        cores,
        cpu_permille,
        memory: 1 << 30,
        disk: 1 << 30,
        upload: None,
        download: None,
        when: When::default(),
        enforcement: Enforcement::Auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share_sets_slots_and_throttle() {
        // A quarter of two cores is half a core: one slot, throttled.
        let p = policy(2, 250);
        assert_eq!(p.cpu_millicores(2), 500);
        assert_eq!(p.slots(2), 1);
        assert!(p.throttled(2));
        // All of two cores: two slots, no throttle.
        let p = policy(2, 1000);
        assert_eq!(p.slots(2), 2);
        assert!(!p.throttled(2));
        // Cores cap the share.
        let p = policy(1, 1000);
        assert_eq!(p.cpu_millicores(8), 1000);
        assert_eq!(p.slots(8), 1);
        assert!(!p.throttled(8));
        // 75% of two cores: two slots sharing 1.5 cores.
        let p = policy(2, 750);
        assert_eq!(p.slots(2), 2);
        assert!(p.throttled(2));
    }
}
