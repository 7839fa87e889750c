//! A bound on the lines a minute an event others cause may log at a level
//! the owner sees: peers (and hosts on the LAN) cause some events at will.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a minute an event may log where the owner reads; the rest go to
/// `debug`. One per kind of event, usually a `static`.
#[derive(Debug)]
pub struct LogBudget {
    per_minute: u32,
    minute: Mutex<Option<(Instant, u32)>>,
}

impl LogBudget {
    pub const fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            minute: Mutex::new(None),
        }
    }

    /// Whether one more line fits this minute.
    pub fn allow(&self) -> bool {
        let mut minute = self.minute.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match &mut *minute {
            Some((start, lines)) if now.duration_since(*start) < Duration::from_secs(60) => {
                *lines = lines.saturating_add(1);
                *lines <= self.per_minute
            }
            _ => {
                *minute = Some((now, 1));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_holds_its_lines_and_no_more() {
        let budget = LogBudget::new(3);
        let allowed = (0..10).filter(|_| budget.allow()).count();
        assert_eq!(allowed, 3);
    }
}
