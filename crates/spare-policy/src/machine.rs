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

/// Where the machine's power comes from now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// Some battery is discharging and no mains supply is online.
    Battery,
    /// A battery is present, but mains power is online or no battery is
    /// discharging.
    Mains,
    /// The kernel lists no battery.
    NoBattery,
}

impl Power {
    /// `on battery`, `on AC power` or `no battery`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Battery => "on battery",
            Self::Mains => "on AC power",
            Self::NoBattery => "no battery",
        }
    }
}

/// Where the machine's power comes from now, as the power-supply directory
/// `root` lists it; `None` when the directory cannot be read.
pub fn power(root: &Path) -> Option<Power> {
    let mut battery = None;
    let mut mains = false;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        // A wireless mouse's or keyboard's battery (scope `Device`) says
        // nothing of the machine's power; nor does one not present.
        if read("scope") == "Device" || read("present") == "0" {
            continue;
        }
        match read("type").as_str() {
            "Battery" => {
                let discharging = read("status") == "Discharging";
                battery = Some(battery.unwrap_or(false) || discharging);
            }
            // USB-C supplies say `2` when online with a negotiated voltage.
            "Mains" | "USB" => mains |= matches!(read("online").as_str(), "1" | "2"),
            _ => {}
        }
    }
    Some(match battery {
        None => Power::NoBattery,
        Some(discharging) if discharging && !mains => Power::Battery,
        Some(_) => Power::Mains,
    })
}

/// Whether the machine runs on battery now: some battery is discharging and
/// no mains supply is online. `None` when the machine has no battery (or
/// the directory cannot be read), which counts as mains power.
pub fn on_battery(root: &Path) -> Option<bool> {
    match power(root)? {
        Power::Battery => Some(true),
        Power::Mains => Some(false),
        Power::NoBattery => None,
    }
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
    fn a_mouse_battery_is_not_the_machines() {
        let root = tempfile::tempdir().unwrap();
        supply(
            root.path(),
            "hidpp_battery_0",
            &[
                ("type", "Battery"),
                ("scope", "Device"),
                ("status", "Discharging"),
            ],
        );
        assert_eq!(
            on_battery(root.path()),
            None,
            "a desktop with a wireless mouse"
        );
        supply(
            root.path(),
            "BAT1",
            &[
                ("type", "Battery"),
                ("present", "0"),
                ("status", "Discharging"),
            ],
        );
        assert_eq!(on_battery(root.path()), None, "an empty battery bay");
        supply(
            root.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Discharging")],
        );
        assert_eq!(on_battery(root.path()), Some(true));
        supply(
            root.path(),
            "ucsi-source-psy",
            &[("type", "USB"), ("online", "2")],
        );
        assert_eq!(on_battery(root.path()), Some(false), "USB-C power");
    }

    #[test]
    fn power_says_where_it_comes_from() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(power(&root.path().join("missing")), None, "unreadable");
        // A desktop: mains only, or nothing listed at all.
        assert_eq!(power(root.path()), Some(Power::NoBattery));
        supply(root.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        assert_eq!(power(root.path()), Some(Power::NoBattery));
        supply(
            root.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Discharging")],
        );
        assert_eq!(power(root.path()), Some(Power::Mains));
        supply(root.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        assert_eq!(power(root.path()), Some(Power::Battery));
        assert_eq!(Power::Battery.describe(), "on battery");
        assert_eq!(Power::Mains.describe(), "on AC power");
        assert_eq!(Power::NoBattery.describe(), "no battery");
    }

    #[test]
    fn this_machine_has_cores_and_memory() {
        let m = Machine::detect();
        assert!(m.cores >= 1);
        assert!(m.memory >= 64 << 20);
    }
}
