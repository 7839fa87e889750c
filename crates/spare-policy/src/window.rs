//! Time windows: `"22:00-07:00"`, in the machine's local time.

use std::fmt;

use serde::Serialize;

/// A daily span of local time, from `start` up to (not including) `end`, in
/// minutes after midnight. A window whose end is before its start wraps
/// past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Window {
    start: u16,
    end: u16,
}

const DAY: u16 = 24 * 60;

impl Window {
    /// Parses `HH:MM-HH:MM`; `24:00` is allowed as an end.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("time window `{text}` {why} (expected e.g. \"22:00-07:00\")");
        let (start, end) = text.split_once('-').ok_or_else(|| bad("has no `-`"))?;
        let minute = |part: &str| -> Result<u16, String> {
            let (h, m) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| bad("has a time without `:`"))?;
            let h: u16 = h
                .parse()
                .map_err(|_| bad("has an hour that is not a number"))?;
            let m: u16 = m
                .parse()
                .map_err(|_| bad("has a minute that is not a number"))?;
            if m >= 60 || h > 24 || (h == 24 && m > 0) {
                return Err(bad("has a time past 24:00"));
            }
            Ok(h * 60 + m)
        };
        let (start, end) = (minute(start)?, minute(end)?);
        if start == end {
            return Err(bad("is empty"));
        }
        if start == DAY {
            return Err(bad("starts at 24:00"));
        }
        Ok(Self { start, end })
    }

    /// Whether `minute` (after local midnight) falls in the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Minutes after local midnight when the window opens.
    pub fn start(&self) -> u16 {
        self.start
    }
}

/// When the next of `windows` opens after `minute` (after local midnight):
/// today, or tomorrow if every start has passed. Windows repeat daily, so
/// the next start is never further away. `None` without windows.
pub fn next_start(windows: &[Window], minute: u16) -> Option<Start> {
    let minute = minute % DAY;
    windows
        .iter()
        .map(|w| (w.start + DAY - minute) % DAY)
        .min()
        .map(|ahead| {
            let at = (minute + ahead) % DAY;
            Start {
                minute: at,
                tomorrow: minute + ahead >= DAY,
            }
        })
}

/// The start of a window, as [`next_start`] finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    /// Minutes after local midnight.
    pub minute: u16,
    /// Whether it is tomorrow rather than today.
    pub tomorrow: bool,
}

impl fmt::Display for Start {
    /// `at 10:00`, `tomorrow at 07:30`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tomorrow {
            f.write_str("tomorrow ")?;
        }
        write!(f, "at {:02}:{:02}", self.minute / 60, self.minute % 60)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

/// Minutes since local midnight now, by the C library's idea of the local
/// time zone (`TZ`, else `/etc/localtime`).
pub fn local_minute_now() -> u16 {
    // SAFETY: time(NULL) only returns the time; localtime_r writes into the
    // tm we own and reads the time_t we pass.
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        tm
    };
    u16::try_from(tm.tm_hour * 60 + tm.tm_min).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_parse_and_wrap() {
        let night = Window::parse("22:00-07:00").unwrap();
        assert!(night.contains(23 * 60));
        assert!(night.contains(0));
        assert!(night.contains(6 * 60 + 59));
        assert!(!night.contains(7 * 60));
        assert!(!night.contains(12 * 60));
        let day = Window::parse("09:30-17:00").unwrap();
        assert!(day.contains(9 * 60 + 30));
        assert!(!day.contains(9 * 60 + 29));
        assert_eq!(day.to_string(), "09:30-17:00");
        assert!(Window::parse("00:00-24:00").unwrap().contains(DAY - 1));
    }

    #[test]
    fn bad_windows_say_why() {
        for (text, why) in [
            ("22:00", "no `-`"),
            ("25:00-07:00", "past 24:00"),
            ("10:60-11:00", "past 24:00"),
            ("ten-eleven", "without `:`"),
            ("aa:00-07:00", "not a number"),
            ("08:00-08:00", "empty"),
        ] {
            let err = Window::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn the_next_start_is_today_or_tomorrow() {
        let at = |h: u16, m: u16| h * 60 + m;
        let windows = [
            Window::parse("10:00-11:00").unwrap(),
            Window::parse("22:30-07:00").unwrap(),
        ];
        let next = |minute| next_start(&windows, minute).unwrap().to_string();
        assert_eq!(next(at(8, 0)), "at 10:00");
        assert_eq!(next(at(11, 0)), "at 22:30");
        assert_eq!(next(at(0, 0)), "at 10:00");
        let one = [Window::parse("10:00-11:00").unwrap()];
        let start = next_start(&one, at(11, 0)).unwrap();
        assert_eq!(
            start,
            Start {
                minute: at(10, 0),
                tomorrow: true
            }
        );
        assert_eq!(start.to_string(), "tomorrow at 10:00");
        assert_eq!(
            next_start(&[Window::parse("00:00-01:00").unwrap()], at(23, 59))
                .unwrap()
                .to_string(),
            "tomorrow at 00:00"
        );
        assert_eq!(next_start(&[], at(8, 0)), None);
    }

    proptest! {
        #[test]
        fn the_next_start_is_outside_until_then(
            start in 0u16..DAY, end in 0u16..=DAY, minute in 0u16..DAY
        ) {
            prop_assume!(start % DAY != end % DAY);
            let w = Window { start, end };
            prop_assume!(!w.contains(minute));
            let next = next_start(&[w], minute).unwrap();
            prop_assert_eq!(next.minute, start);
            prop_assert_eq!(next.tomorrow, start < minute);
            prop_assert!(w.contains(next.minute));
        }

        #[test]
        fn a_window_and_its_complement_cover_the_day_once(
            start in 0u16..DAY, end in 0u16..=DAY, minute in 0u16..DAY
        ) {
            prop_assume!(start % DAY != end % DAY);
            let w = Window { start, end };
            let complement = Window { start: end % DAY, end: start };
            prop_assert!(w.contains(minute) != complement.contains(minute));
        }
    }
}
