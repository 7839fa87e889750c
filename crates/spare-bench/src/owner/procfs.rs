//! What `/proc` says about a process: the scheduler state of each of its
//! threads, and its CPU time.

use std::path::PathBuf;

/// The thread ids of `pid` (a worker runs its guest on a thread of its
/// own, so the process's own state is not the guest's).
pub(crate) fn threads(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The threads of some processes, for polling their states cheaply.
#[derive(Debug)]
pub(crate) struct Watch {
    files: Vec<PathBuf>,
}

impl Watch {
    pub(crate) fn new(pids: &[u32]) -> Self {
        let files = pids
            .iter()
            .flat_map(|&pid| {
                threads(pid)
                    .into_iter()
                    .map(move |tid| PathBuf::from(format!("/proc/{pid}/task/{tid}/stat")))
            })
            .collect();
        Self { files }
    }

    /// Whether every thread is stopped (`T`), as a whole process is once a
    /// stop signal has taken effect. A thread that is gone counts as
    /// stopped; no threads at all does not.
    pub(crate) fn all_stopped(&self) -> bool {
        !self.files.is_empty() && self.states().all(|s| matches!(s, None | Some('T' | 't')))
    }

    /// The scheduler state of each thread, `None` for a thread that is gone.
    fn states(&self) -> impl Iterator<Item = Option<char>> + '_ {
        self.files
            .iter()
            .map(|file| state(&std::fs::read_to_string(file).ok()?))
    }
}

/// Whether some thread of each of `pids` is running or runnable (`R`).
pub(crate) fn each_running(pids: &[u32]) -> bool {
    !pids.is_empty()
        && pids.iter().all(|&pid| {
            threads(pid).into_iter().any(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
                    .ok()
                    .and_then(|t| state(&t))
                    == Some('R')
            })
        })
}

/// The state field of a `stat` file.
fn state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(threads(me).contains(&me));
        assert!(each_running(&[me]), "this thread is running");
        assert!(!Watch::new(&[me]).all_stopped());
        assert_eq!(
            state("4242 (spare worker (x)) T 1 2 3 0 -1 4194304 97 0 0 0 31 9 0 0"),
            Some('T')
        );
    }
}
