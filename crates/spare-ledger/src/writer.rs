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
//! write leaves nothing behind and fails alone (each runs in a savepoint);
//! a failed commit fails the whole batch.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use spare_core::{Receipt, SignedReceipt};
use tokio::sync::oneshot;

use crate::{Caps, Ending, LedgerError, ReceiptRole};

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
    TaskBusy {
        task: String,
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
pub(crate) fn spawn(
    conn: Connection,
    queue: usize,
    caps: Caps,
) -> Result<mpsc::SyncSender<Op>, LedgerError> {
    let (tx, rx) = mpsc::sync_channel(queue);
    std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || run(&conn, &rx, caps))
        .map_err(|e| LedgerError::Write(format!("cannot start the writer thread: {e}")))?;
    Ok(tx)
}

fn run(conn: &Connection, rx: &mpsc::Receiver<Op>, caps: Caps) {
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
        let committed = commit(conn, &batch, caps);
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
///
/// Each write runs in a savepoint of its own, so one that fails leaves
/// nothing behind and the others stand. Should SQLite roll back the whole
/// transaction instead (a full disk, an I/O error), the writes it held are
/// failed, and the rest go on in a new one.
fn commit(conn: &Connection, batch: &[Op], caps: Caps) -> Vec<Result<(), LedgerError>> {
    let failed = |e: &rusqlite::Error| Err(LedgerError::Write(e.to_string()));
    if let Err(e) = statement(conn, "BEGIN") {
        return batch.iter().map(|_| failed(&e)).collect();
    }
    let mut results: Vec<Result<(), LedgerError>> = Vec::with_capacity(batch.len());
    // The first write of the transaction open now.
    let mut open_from = 0;
    for op in batch {
        let result = apply_alone(conn, &op.write, caps);
        if let Err(e) = &result
            && conn.is_autocommit()
        {
            for earlier in &mut results[open_from..] {
                if earlier.is_ok() {
                    *earlier = failed(e);
                }
            }
            results.push(failed(e));
            open_from = results.len();
            if let Err(e) = statement(conn, "BEGIN") {
                results.resize_with(batch.len(), || failed(&e));
                return results;
            }
            continue;
        }
        results.push(result.map_err(|e| LedgerError::Write(e.to_string())));
    }
    if let Err(e) = statement(conn, "COMMIT") {
        let _ = statement(conn, "ROLLBACK");
        for result in &mut results[open_from..] {
            *result = failed(&e);
        }
    }
    results
}

/// Runs one statement without parameters, parsed once (`BEGIN`, `COMMIT`,
/// savepoints).
fn statement(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql).and_then(|mut s| s.execute([]))
}

/// Applies `write` in a savepoint: all of it, or none of it.
fn apply_alone(conn: &Connection, write: &Write, caps: Caps) -> rusqlite::Result<()> {
    statement(conn, "SAVEPOINT write")?;
    let applied = apply(conn, write, caps);
    // With the transaction gone (see `commit`) there is nothing to undo.
    if applied.is_err() && !conn.is_autocommit() {
        let _ = statement(conn, "ROLLBACK TO write");
    }
    if !conn.is_autocommit() {
        statement(conn, "RELEASE write")?;
    }
    applied
}

/// A value for an INTEGER column: SQLite's integers are signed.
fn integer(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn apply(conn: &Connection, write: &Write, caps: Caps) -> rusqlite::Result<()> {
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
            .execute(params![task, name, module, integer(*at_ms)])?;
            // Only the latest rows are kept, and every unfinished one.
            conn.prepare_cached(
                "DELETE FROM requested WHERE rowid <= (SELECT max(rowid) FROM requested) - ?1
                     AND state NOT IN ('waiting', 'running')",
            )?
            .execute(params![caps.requested])?;
        }
        Write::TaskAttempt { task, host } => {
            conn.prepare_cached(
                "UPDATE requested SET attempts = attempts + 1, host = ?2, state = 'running'
                 WHERE task = ?1",
            )?
            .execute(params![task, host])?;
        }
        Write::TaskBusy { task } => {
            conn.prepare_cached(
                "UPDATE requested SET attempts = max(attempts - 1, 0), state = 'waiting'
                 WHERE task = ?1 AND state = 'running'",
            )?
            .execute(params![task])?;
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
                integer(ending.fuel),
                integer(ending.wall_ms),
                integer(*at_ms)
            ])?;
            if let Some(receipt) = receipt {
                insert_receipt(conn, &receipt.0, &receipt.1, ReceiptRole::Received, caps)?;
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
                integer(*started_ms),
                integer(*at_ms),
                ending.state.as_str(),
                ending.exit_code,
                ending.failure,
                integer(ending.fuel),
                integer(ending.wall_ms)
            ])?;
            if let Some(receipt) = receipt {
                insert_receipt(conn, &receipt.0, &receipt.1, ReceiptRole::Issued, caps)?;
            }
            // Only the latest rows are kept (receipts are kept apart).
            conn.prepare_cached(
                "DELETE FROM hosted WHERE rowid <= (SELECT max(rowid) FROM hosted) - ?1",
            )?
            .execute(params![caps.hosted])?;
        }
    }
    Ok(())
}

/// Stores a receipt (once: the same one again is ignored), then folds the
/// oldest beyond the cap ([`crate::MAX_RECEIPT_ROWS`]) into their role's
/// totals.
fn insert_receipt(
    conn: &Connection,
    receipt: &Receipt,
    signed: &SignedReceipt,
    role: ReceiptRole,
    caps: Caps,
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
        integer(receipt.fuel),
        integer(receipt.wall_ms),
        integer(receipt.finished_ms),
        signed.body,
        signed.host_key,
        signed.signature
    ])?;
    // One row at a time, each sum saturating: no total can overflow and
    // fail the write.
    conn.prepare_cached(
        "INSERT INTO folded_receipts (role, count, fuel, wall_ms)
         SELECT role, 1, fuel, wall_ms FROM receipts
             WHERE rowid <= (SELECT max(rowid) FROM receipts) - ?1
         ON CONFLICT (role) DO UPDATE SET
             count = min(count, 9223372036854775806) + 1,
             fuel = min(fuel, 9223372036854775807 - excluded.fuel) + excluded.fuel,
             wall_ms = min(wall_ms, 9223372036854775807 - excluded.wall_ms) + excluded.wall_ms",
    )?
    .execute(params![caps.receipts])?;
    conn.prepare_cached(
        "DELETE FROM receipts WHERE rowid <= (SELECT max(rowid) FROM receipts) - ?1",
    )?
    .execute(params![caps.receipts])?;
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
