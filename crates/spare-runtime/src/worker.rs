//! The worker process: `spare worker`, started by the daemon's pool.
//!
//! It lowers its own priority before creating any thread, then serves jobs
//! from its stdin one at a time and writes each outcome to its stdout. A
//! reader thread watches stdin so that the worker exits at once when the
//! daemon goes away, even in the middle of a guest.

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::sync::mpsc;

use spare_core::Limits;

use crate::ipc::{FromWorker, MAX_JOB_FRAME, ToWorker, read_frame, write_frame};
use crate::priority::lower_own_priority;
use crate::sandbox::Sandbox;

/// Native stack of the thread that runs guests: the largest guest stack a
/// host grants, plus room for wasmtime and WASI host calls.
const EXECUTOR_STACK: usize = Limits::MAX.stack as usize + (4 << 20);

/// Runs the worker until the daemon closes its stdin. Returns the process
/// exit code.
pub fn main(cache_dir: Option<PathBuf>) -> i32 {
    let priority = lower_own_priority();
    limit_core_dumps();

    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<ToWorker>(1);
    let executor = std::thread::Builder::new()
        .name("guest".into())
        .stack_size(EXECUTOR_STACK)
        .spawn(move || {
            let mut sandbox = Sandbox::new(cache_dir);
            let mut out = BufWriter::new(std::io::stdout().lock());
            if write_frame(&mut out, &FromWorker::Ready { priority }).is_err() {
                return;
            }
            while let Ok(ToWorker::Run(job)) = jobs_rx.recv() {
                let outcome = sandbox.run(&job);
                if write_frame(&mut out, &FromWorker::Done(Box::new(outcome))).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = executor {
        eprintln!("spare worker: cannot start the guest thread: {e}");
        return 1;
    }

    let mut input = BufReader::new(std::io::stdin().lock());
    loop {
        match read_frame::<ToWorker>(&mut input, MAX_JOB_FRAME) {
            Ok(Some(msg)) => {
                if jobs_tx.send(msg).is_err() {
                    return 1;
                }
            }
            // The daemon closed the pipe or went away: stop now, guest or not.
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("spare worker: bad frame from the daemon: {e}");
                return 1;
            }
        }
    }
}

/// A crashing guest must not fill the disk with core dumps of wasmtime.
fn limit_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `none` is a valid rlimit for the duration of the call.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
}
