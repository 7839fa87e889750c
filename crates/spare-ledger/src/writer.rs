//! The writer thread: one connection, group commit.
//!
//! It takes the first queued write, drains whatever else is already
//! queued (up to [`MAX_BATCH`]), applies them all in one transaction,
//! commits, and answers every caller. A lone caller on a quiet node is
//! never kept waiting; writes nobody waits for linger up to [`LINGER`] for
//! company. Under load (the last commit served several waiting callers,
//! and the next write came within the linger) the writer lingers before
//! each commit, the longer the more callers the last one served
//! ([`linger_for`]): a commit costs a few dozen system calls whatever it
//! holds, and under load it, not the rows, is the ledger's cost. A failed
//! statement fails only its own write; a failed commit fails the whole
//! batch.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use spare_core::{Receipt, SignedReceipt};
use tokio::sync::oneshot;

use crate::{Ending, LedgerError, ReceiptRole};

/// Writes committed together at most.
const MAX_BATCH: usize = 512;
/// How long a writer with only detached writes waits for more before
/// committing.
const LINGER: Duration = Duration::from_micros(500);
/// A busy writer lingers this long for each caller its last commit
/// served...
const LINGER_PER_CALLER: Duration = Duration::from_millis(1);
/// ...and at most this long.
const MAX_LINGER: Duration = Duration::from_millis(5);

/// How long to gather writes before a commit, when the last one served
/// `callers` waiting callers: nothing for one (a quiet node answers at
/// once), a millisecond each for more, up to [`MAX_LINGER`]. Two callers
/// in step wait two milliseconds; dozens of tasks in flight share commits
/// five milliseconds apart, each waiting at most that long. (Under steady
/// load the batches grow until the linger reaches its cap.)
fn linger_for(callers: usize) -> Duration {
    if callers < 2 {
        return Duration::ZERO;
    }
    LINGER_PER_CALLER
        .saturating_mul(u32::try_from(callers).unwrap_or(u32::MAX))
        .min(MAX_LINGER)
}

/// One write and the caller waiting for it.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) write: Write,
    pub(crate) done: oneshot::Sender<Result<(), LedgerError>>,
}

/// Every kind of write. Fields are owned so the op can cross threads.
#[derive(Debug)]
pub(crate) enum Write {
    TaskSubmitted {
        task: String,
        name: String,
        module: String,
        at_ms: u64,
    },
    TaskAttempt {
        task: String,
        host: String,
    },
    TaskFinished {
        task: String,
        ending: Ending,
        receipt: Option<Box<(Receipt, SignedReceipt)>>,
        at_ms: u64,
    },
    /// A hosted task is recorded once, when it ends: until then it lives in
    /// the daemon's memory, and a task cut short by a crash produced nothing
    /// worth recording.
    HostedFinished {
        task: String,
        requester: String,
        module: String,
        started_ms: u64,
        ending: Ending,
        receipt: Option<Box<(Receipt, SignedReceipt)>>,
        at_ms: u64,
    },
}

/// Starts the writer thread on `conn`; it stops when every sender is gone.
pub(crate) fn spawn(conn: Connection, queue: usize) -> Result<mpsc::SyncSender<Op>, LedgerError> {
    let (tx, rx) = mpsc::sync_channel(queue);
    std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || run(&conn, &rx))
        .map_err(|e| LedgerError::Write(format!("cannot start the writer thread: {e}")))?;
    Ok(tx)
}

fn run(conn: &Connection, rx: &mpsc::Receiver<Op>) {
    // How long to gather writes before the next commit: none unless the
    // last one served several callers (the node is busy).
    let mut linger = Duration::ZERO;
    let mut idle_since = Instant::now();
    while let Ok(first) = rx.recv() {
        // Idle for longer than it would linger: the rush is over.
        if idle_since.elapsed() > linger {
            linger = Duration::ZERO;
        }
        let mut batch = vec![first];
        drain(rx, &mut batch);
        if !linger.is_zero() {
            // Company is coming. Sleeping, rather than waiting on the queue,
            // lets senders queue without waking this thread for each write.
            std::thread::sleep(linger);
            drain(rx, &mut batch);
        } else if waiting(&batch) != 1 {
            // A lone caller on a quiet node is never kept waiting; writes
            // that nobody waits for can wait for company.
            let deadline = Instant::now() + LINGER;
            while batch.len() < MAX_BATCH {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
                if waiting(&batch) == 1 {
                    break;
                }
            }
        }
        linger = linger_for(waiting(&batch));
        let committed = commit(conn, &batch);
        for (op, result) in batch.into_iter().zip(committed) {
            // The caller may have stopped waiting; the write stands anyway.
            let _ = op.done.send(result);
        }
        idle_since = Instant::now();
    }
}

/// Moves what is already queued into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Writes in `batch` whose caller waits for the commit (detached writes
/// dropped their receiver).
fn waiting(batch: &[Op]) -> usize {
    batch.iter().filter(|op| !op.done.is_closed()).count()
}

/// Applies `batch` in one transaction; returns each write's result.
fn commit(conn: &Connection, batch: &[Op]) -> Vec<Result<(), LedgerError>> {
    // Cached statements: `BEGIN` and `COMMIT` are parsed once, not per batch.
    let statement = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    if let Err(e) = statement("BEGIN") {
        return batch
            .iter()
            .map(|_| Err(LedgerError::Write(e.to_string())))
            .collect();
    }
    let mut results: Vec<Result<(), LedgerError>> = batch
        .iter()
        .map(|op| apply(conn, &op.write).map_err(|e| LedgerError::Write(e.to_string())))
        .collect();
    if let Err(e) = statement("COMMIT") {
        let _ = statement("ROLLBACK");
        let message = e.to_string();
        results = batch
            .iter()
            .map(|_| Err(LedgerError::Write(message.clone())))
            .collect();
    }
    results
}

fn apply(conn: &Connection, write: &Write) -> rusqlite::Result<()> {
    match write {
        Write::TaskSubmitted {
            task,
            name,
            module,
            at_ms,
        } => {
            conn.prepare_cached(
                "INSERT INTO requested (task, name, module, submitted_ms, state, attempts)
                 VALUES (?1, ?2, ?3, ?4, 'waiting', 0)",
            )?
            .execute(params![task, name, module, *at_ms as i64])?;
        }
        Write::TaskAttempt { task, host } => {
            conn.prepare_cached(
                "UPDATE requested SET attempts = attempts + 1, host = ?2, state = 'running'
                 WHERE task = ?1",
            )?
            .execute(params![task, host])?;
        }
        Write::TaskFinished {
            task,
            ending,
            receipt,
            at_ms,
        } => {
            conn.prepare_cached(
                "UPDATE requested SET state = ?2, exit_code = ?3, failure = ?4, fuel = ?5, wall_ms = ?6,
                        finished_ms = ?7
                 WHERE task = ?1",
            )?
            .execute(params![
                task,
                ending.state.as_str(),
                ending.exit_code,
                ending.failure,
                ending.fuel as i64,
                ending.wall_ms as i64,
                *at_ms as i64
            ])?;
            if let Some(receipt) = receipt {
                insert_receipt(conn, &receipt.0, &receipt.1, ReceiptRole::Received)?;
            }
        }
        Write::HostedFinished {
            task,
            requester,
            module,
            started_ms,
            ending,
            receipt,
            at_ms,
        } => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO hosted (task, requester, module, started_ms, finished_ms,
                        state, exit_code, failure, fuel, wall_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                task,
                requester,
                module,
                *started_ms as i64,
                *at_ms as i64,
                ending.state.as_str(),
                ending.exit_code,
                ending.failure,
                ending.fuel as i64,
                ending.wall_ms as i64
            ])?;
            if let Some(receipt) = receipt {
                insert_receipt(conn, &receipt.0, &receipt.1, ReceiptRole::Issued)?;
            }
            // Only the latest rows are kept (receipts are kept apart).
            conn.prepare_cached(
                "DELETE FROM hosted WHERE rowid <= (SELECT max(rowid) FROM hosted) - ?1",
            )?
            .execute(params![crate::MAX_HOSTED_ROWS])?;
        }
    }
    Ok(())
}

fn insert_receipt(
    conn: &Connection,
    receipt: &Receipt,
    signed: &SignedReceipt,
    role: ReceiptRole,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO receipts
            (task, host, requester, role, fuel, wall_ms, finished_ms, body, host_key, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        receipt.task.to_string(),
        spare_core::peer_text(&receipt.host),
        spare_core::peer_text(&receipt.requester),
        role.as_str(),
        receipt.fuel as i64,
        receipt.wall_ms as i64,
        receipt.finished_ms as i64,
        signed.body,
        signed.host_key,
        signed.signature
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linger_grows_with_the_callers_a_commit_served_up_to_a_cap() {
        assert_eq!(linger_for(0), Duration::ZERO);
        assert_eq!(linger_for(1), Duration::ZERO);
        assert_eq!(linger_for(2), Duration::from_millis(2));
        assert_eq!(linger_for(4), Duration::from_millis(4));
        assert_eq!(linger_for(6), MAX_LINGER);
        assert_eq!(linger_for(usize::MAX), MAX_LINGER);
    }
}
