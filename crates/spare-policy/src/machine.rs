//! What the machine has: cores, memory, power source.

use std::path::Path;

/// The facts a policy is validated against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: u16,
    /// Physical memory, in bytes.
    pub memory: u64,
    /// Size of the file system holding the node's data, when known.
    pub disk: Option<u64>,
}

impl Machine {
    /// Reads this machine's facts.
    pub fn detect() -> Self {
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
                .unwrap_or(1),
            memory: total_memory().unwrap_or(1 << 30),
            disk: None,
        }
    }
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    kib.split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// Where the kernel lists power supplies.
pub const POWER_SUPPLY: &str = "/sys/class/power_supply";

/// Whether the machine runs on battery now: some battery is discharging and
/// no mains supply is online. `None` when the machine has no battery (or
/// the directory cannot be read), which counts as mains power.
pub fn on_battery(root: &Path) -> Option<bool> {
    let mut battery = None;
    let mut mains = false;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        match read("type").as_str() {
            "Battery" => {
                let discharging = read("status") == "Discharging";
                battery = Some(battery.unwrap_or(false) || discharging);
            }
            "Mains" | "USB" => mains |= read("online") == "1",
            _ => {}
        }
    }
    battery.map(|discharging| discharging && !mains)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, files: &[(&str, &str)]) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
        }
    }

    #[test]
    fn reads_power_supplies_as_the_kernel_lists_them() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(on_battery(root.path()), None, "no battery");
        supply(root.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        supply(
            root.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Discharging")],
        );
        assert_eq!(on_battery(root.path()), Some(false), "plugged in");
        supply(root.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        assert_eq!(on_battery(root.path()), Some(true), "unplugged");
        supply(
            root.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Charging")],
        );
        assert_eq!(on_battery(root.path()), Some(false), "charging");
        assert_eq!(on_battery(&root.path().join("missing")), None);
    }

    #[test]
    fn this_machine_has_cores_and_memory() {
        let m = Machine::detect();
        assert!(m.cores >= 1);
        assert!(m.memory >= 64 << 20);
    }
}
