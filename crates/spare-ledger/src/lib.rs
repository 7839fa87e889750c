//! The SQLite state of a spare node: tasks it requested, tasks it hosted,
//! and receipts for work done.
//!
//! One database file per node, in WAL mode with `synchronous=NORMAL`: a
//! commit reaches the WAL before it returns, so a `kill -9` of the daemon
//! loses nothing that was committed (only an OS crash may lose the last few
//! transactions).
//!
//! Writes go to one writer thread (`writer.rs`) that commits whatever has
//! queued up in one transaction (group commit) and then answers each
//! caller; an `await`ed write is durable. Under load, hundreds of task
//! records share one commit, and SQLite never runs on the async runtime's
//! threads. Reads use a connection of their own: in WAL mode readers never
//! wait for the writer. A third connection checkpoints the WAL in the
//! background, so no writer ever waits for an `fsync`.
//!
//! Schema changes bump [`SCHEMA_VERSION`] and add a step to `migrate`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod writer;

use std::path::Path;
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use spare_core::{Outcome, PeerId, Receipt, SignedReceipt, TaskId};
use tokio::sync::oneshot;

use writer::{Op, Write};

/// The schema this code reads and writes.
pub const SCHEMA_VERSION: i64 = 2;

/// Rows of hosted tasks kept, the latest ones: peers decide how many tasks
/// a node hosts, so the table of them is bounded.
pub const MAX_HOSTED_ROWS: i64 = 10_000;

/// Receipts kept one by one, the latest ones (issued and received
/// together; about 30 MB). Older receipts are folded into totals per role,
/// so the sums that credit will be computed from lose nothing, while the
/// database stays within its share of the disk budget however many tasks
/// peers send.
pub const MAX_RECEIPT_ROWS: i64 = 50_000;

/// Rows of requested tasks kept, the latest ones; older finished tasks are
/// dropped. Tasks still waiting or running are never dropped.
pub const MAX_REQUESTED_ROWS: i64 = 100_000;

/// How many rows of each kind a ledger keeps: the constants above, smaller
/// in tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    pub(crate) hosted: i64,
    pub(crate) receipts: i64,
    pub(crate) requested: i64,
}

impl Caps {
    const DEFAULT: Caps = Caps {
        hosted: MAX_HOSTED_ROWS,
        receipts: MAX_RECEIPT_ROWS,
        requested: MAX_REQUESTED_ROWS,
    };
}

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "database schema version {found} is newer than this spare understands ({SCHEMA_VERSION}); upgrade spare"
    )]
    TooNew { found: i64 },
    #[error("database write failed: {0}")]
    Write(String),
    #[error("the ledger's writer has stopped")]
    Closed,
    #[error("the ledger's write queue is full; a record was dropped")]
    QueueFull,
}

/// A node's database.
#[derive(Debug)]
pub struct Ledger {
    /// The read connection.
    reader: Mutex<Connection>,
    /// Queue of the writer thread.
    writes: mpsc::SyncSender<Op>,
    /// Dropping this stops the checkpoint thread.
    _checkpointer: Option<mpsc::Sender<()>>,
}

/// Writes queued for the writer thread; beyond this, writes fail with
/// [`LedgerError::QueueFull`] rather than block the caller.
const WRITE_QUEUE: usize = 65_536;

/// A queued write. Await it to learn that the write is committed (and
/// durable); drop it to go on without waiting. Writes commit in the order
/// they were queued either way.
#[must_use = "await the write to know it is committed, or `detach` it"]
#[derive(Debug)]
pub struct Committed(Result<oneshot::Receiver<Result<(), LedgerError>>, Option<LedgerError>>);

impl Committed {
    /// Goes on without waiting for the commit; logs a write that could not
    /// even be queued.
    pub fn detach(self) {
        if let Err(Some(error)) = self.0 {
            tracing::error!("ledger: {error}");
        }
    }
}

impl std::future::Future for Committed {
    type Output = Result<(), LedgerError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            Ok(receiver) => std::pin::Pin::new(receiver)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(LedgerError::Closed))),
            Err(error) => std::task::Poll::Ready(Err(error.take().unwrap_or(LedgerError::Closed))),
        }
    }
}
/// How often the background thread moves the WAL into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Pages in the WAL before the writer checkpoints by itself: a safety net in
/// case the background thread falls behind.
const AUTOCHECKPOINT_PAGES: i64 = 20_000;
/// Bytes the WAL file is cut back to after a checkpoint has emptied it, so
/// that a burst does not leave it at its high-water mark for good.
const WAL_SIZE_LIMIT: i64 = 16 << 20;

/// Where a task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// No host has it yet: the requester waits for a peer that can take it.
    Waiting,
    /// Sent to its host, which runs it or queues it.
    Running,
    /// The guest exited (with any code).
    Exited,
    /// The guest did not finish: a limit, a trap, a host failure.
    Failed,
    Cancelled,
    /// The daemon stopped while the task was running.
    Interrupted,
}

impl TaskState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Running => "running",
            TaskState::Exited => "exited",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Interrupted => "interrupted",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "waiting" => TaskState::Waiting,
            "running" => TaskState::Running,
            "exited" => TaskState::Exited,
            "cancelled" => TaskState::Cancelled,
            "interrupted" => TaskState::Interrupted,
            _ => TaskState::Failed,
        }
    }
}

/// How a task ended, as the ledger keeps it (outputs are not kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ending {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    /// The one-line cause when the guest did not exit by itself.
    pub failure: Option<String>,
    pub fuel: u64,
    pub wall_ms: u64,
}

impl Ending {
    pub fn of(outcome: &Outcome) -> Self {
        let (state, failure) = match outcome.failure() {
            None => (TaskState::Exited, None),
            Some(spare_core::Failure::Cancelled) => {
                (TaskState::Cancelled, Some("cancelled".to_owned()))
            }
            Some(f) => (TaskState::Failed, Some(f.to_string())),
        };
        Self {
            state,
            exit_code: outcome.exit_code(),
            failure,
            fuel: outcome.fuel,
            wall_ms: outcome.wall_ms,
        }
    }

    /// An ending for a task that failed before any host reported on it.
    pub fn failed(cause: impl Into<String>) -> Self {
        Self {
            state: TaskState::Failed,
            exit_code: None,
            failure: Some(cause.into()),
            fuel: 0,
            wall_ms: 0,
        }
    }
}

/// A task this node requested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedTask {
    pub task: String,
    pub name: String,
    pub module: String,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    /// The peer that ran (or is running) the last attempt.
    pub host: Option<String>,
    pub attempts: u32,
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub failure: Option<String>,
    pub fuel: Option<u64>,
    pub wall_ms: Option<u64>,
}

/// A task this node ran for a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedTask {
    pub task: String,
    pub requester: String,
    pub module: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub failure: Option<String>,
    pub fuel: Option<u64>,
    pub wall_ms: Option<u64>,
}

/// A task this node is hosting: what its record is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosted {
    pub task: TaskId,
    pub requester: PeerId,
    pub module: spare_core::BlobId,
    pub started_ms: u64,
}

/// Whether we issued a receipt (as host) or received one (as requester).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptRole {
    Issued,
    Received,
}

impl ReceiptRole {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReceiptRole::Issued => "issued",
            ReceiptRole::Received => "received",
        }
    }
}

/// Totals of receipts, the input of the future credit system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReceiptTotals {
    pub count: u64,
    pub fuel: u64,
    pub wall_ms: u64,
}

impl Ledger {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date. Tasks left running by a previous daemon are marked
    /// interrupted.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let writer = Connection::open(path)?;
        let reader = Connection::open(path)?;
        let mut ledger = Self::init(writer, reader, Caps::DEFAULT)?;
        ledger._checkpointer = Some(spawn_checkpointer(path)?);
        Ok(ledger)
    }

    /// A private database in memory, for tests.
    pub fn open_in_memory() -> Result<Self, LedgerError> {
        Self::open_in_memory_with(Caps::DEFAULT)
    }

    fn open_in_memory_with(caps: Caps) -> Result<Self, LedgerError> {
        // A shared-cache URI so the reader sees the writer's database.
        let uri = format!(
            "file:spare-ledger-{}?mode=memory&cache=shared",
            rand::random::<u64>()
        );
        let flags = rusqlite::OpenFlags::default() | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let writer = Connection::open_with_flags(&uri, flags)?;
        let reader = Connection::open_with_flags(&uri, flags)?;
        Self::init(writer, reader, caps)
    }

    fn init(writer: Connection, reader: Connection, caps: Caps) -> Result<Self, LedgerError> {
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        writer.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_PAGES)?;
        writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        writer.busy_timeout(Duration::from_secs(5))?;
        reader.busy_timeout(Duration::from_secs(5))?;
        migrate(&writer)?;
        let now = spare_core::now_ms() as i64;
        writer.execute(
            "UPDATE requested SET state = 'interrupted', finished_ms = ?1
             WHERE state IN ('waiting', 'running')",
            params![now],
        )?;
        Ok(Self {
            reader: Mutex::new(reader),
            writes: writer::spawn(writer, WRITE_QUEUE, caps)?,
            _checkpointer: None,
        })
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent.
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `write` for the writer thread.
    fn write(&self, write: Write) -> Committed {
        let (done, committed) = oneshot::channel();
        match self.writes.try_send(Op { write, done }) {
            Ok(()) => Committed(Ok(committed)),
            Err(mpsc_error) => {
                let error = match mpsc_error {
                    mpsc::TrySendError::Full(_) => LedgerError::QueueFull,
                    mpsc::TrySendError::Disconnected(_) => LedgerError::Closed,
                };
                Committed(Err(Some(error)))
            }
        }
    }

    /// Records a task this node is about to place.
    pub fn task_submitted(&self, task: &TaskId, name: &str, module: &str) -> Committed {
        self.write(Write::TaskSubmitted {
            task: task.to_string(),
            name: name.to_owned(),
            module: module.to_owned(),
            at_ms: spare_core::now_ms(),
        })
    }

    /// Records that an attempt of `task` went to `host`.
    pub fn task_attempt(&self, task: &TaskId, host: &PeerId) -> Committed {
        self.write(Write::TaskAttempt {
            task: task.to_string(),
            host: spare_core::peer_text(host),
        })
    }

    /// Records that the host of `task`'s latest attempt refused it for want
    /// of room: that was no attempt, and the task waits again.
    pub fn task_busy(&self, task: &TaskId) -> Committed {
        self.write(Write::TaskBusy {
            task: task.to_string(),
        })
    }

    /// Records how a requested task ended, with the host's verified receipt
    /// if there is one, in one transaction.
    pub fn task_finished(
        &self,
        task: &TaskId,
        ending: &Ending,
        receipt: Option<(Receipt, SignedReceipt)>,
    ) -> Committed {
        self.write(Write::TaskFinished {
            task: task.to_string(),
            ending: ending.clone(),
            receipt: receipt.map(Box::new),
            at_ms: spare_core::now_ms(),
        })
    }

    /// Records a hosted task when it ends, with the receipt this node issued
    /// for it if any, in one transaction.
    pub fn hosted_finished(
        &self,
        hosted: &Hosted,
        ending: &Ending,
        receipt: Option<(Receipt, SignedReceipt)>,
    ) -> Committed {
        self.write(Write::HostedFinished {
            task: hosted.task.to_string(),
            requester: spare_core::peer_text(&hosted.requester),
            module: hosted.module.to_string(),
            started_ms: hosted.started_ms,
            ending: ending.clone(),
            receipt: receipt.map(Box::new),
            at_ms: spare_core::now_ms(),
        })
    }

    /// The `limit` most recently submitted tasks, newest first.
    pub fn recent_tasks(&self, limit: u32) -> Result<Vec<RequestedTask>, LedgerError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached(&format!("{REQUESTED_COLUMNS} ORDER BY rowid DESC LIMIT ?1"))?;
        let rows = stmt.query_map(params![limit], requested_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One requested task by id.
    #[cfg(test)]
    pub fn requested_task(&self, task: &TaskId) -> Result<Option<RequestedTask>, LedgerError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!("{REQUESTED_COLUMNS} WHERE task = ?1"))?;
        Ok(stmt
            .query_row(params![task.to_string()], requested_row)
            .optional()?)
    }

    /// The `limit` hosted tasks that ended last, newest first (a hosted task is recorded when it ends).
    pub fn recent_hosted(&self, limit: u32) -> Result<Vec<HostedTask>, LedgerError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT task, requester, module, started_ms, finished_ms, state, exit_code, failure, fuel,
                    wall_ms
             FROM hosted ORDER BY rowid DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(HostedTask {
                task: r.get(0)?,
                requester: r.get(1)?,
                module: r.get(2)?,
                started_ms: r.get::<_, i64>(3)? as u64,
                finished_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                state: TaskState::parse(&r.get::<_, String>(5)?),
                exit_code: r.get(6)?,
                failure: r.get(7)?,
                fuel: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
                wall_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sums of the receipts in `role`: those kept one by one and those
    /// folded into totals (see [`MAX_RECEIPT_ROWS`]), read in one snapshot
    /// so that a fold between the two is not counted twice. Saturating.
    pub fn receipt_totals(&self, role: ReceiptRole) -> Result<ReceiptTotals, LedgerError> {
        let role = role.as_str();
        let reader = self.reader();
        let snapshot = reader.unchecked_transaction()?;
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut totals = snapshot
            .query_row(
                "SELECT count, fuel, wall_ms FROM folded_receipts WHERE role = ?1",
                params![role],
                |r| {
                    Ok(ReceiptTotals {
                        count: unsigned(r.get(0)?),
                        fuel: unsigned(r.get(1)?),
                        wall_ms: unsigned(r.get(2)?),
                    })
                },
            )
            .optional()?
            .unwrap_or_default();
        // Summed here, exactly and saturating: SQLite's SUM fails past
        // i64, and its TOTAL rounds past 2^53.
        let mut kept = snapshot.prepare("SELECT fuel, wall_ms FROM receipts WHERE role = ?1")?;
        let mut rows = kept.query(params![role])?;
        while let Some(row) = rows.next()? {
            totals.count = totals.count.saturating_add(1);
            totals.fuel = totals.fuel.saturating_add(unsigned(row.get(0)?));
            totals.wall_ms = totals.wall_ms.saturating_add(unsigned(row.get(1)?));
        }
        Ok(totals)
    }

    /// The signed receipt for `task` from `host`, if stored.
    #[cfg(test)]
    pub fn receipt(
        &self,
        task: &TaskId,
        host: &PeerId,
    ) -> Result<Option<SignedReceipt>, LedgerError> {
        Ok(self
            .reader()
            .query_row(
                "SELECT body, host_key, signature FROM receipts WHERE task = ?1 AND host = ?2",
                params![task.to_string(), host.to_string()],
                |r| {
                    Ok(SignedReceipt {
                        body: r.get(0)?,
                        host_key: r.get(1)?,
                        signature: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }
}

const REQUESTED_COLUMNS: &str =
    "SELECT task, name, module, submitted_ms, finished_ms, host, attempts,
        state, exit_code, failure, fuel, wall_ms FROM requested";

fn requested_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestedTask> {
    Ok(RequestedTask {
        task: r.get(0)?,
        name: r.get(1)?,
        module: r.get(2)?,
        submitted_ms: r.get::<_, i64>(3)? as u64,
        finished_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        host: r.get(5)?,
        attempts: r.get(6)?,
        state: TaskState::parse(&r.get::<_, String>(7)?),
        exit_code: r.get(8)?,
        failure: r.get(9)?,
        fuel: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        wall_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
    })
}

/// Starts the thread that checkpoints the WAL every [`CHECKPOINT_INTERVAL`]
/// on its own connection. Passive checkpoints never block the writer.
fn spawn_checkpointer(path: &Path) -> Result<mpsc::Sender<()>, LedgerError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("ledger-checkpoint".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_INTERVAL)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!("ledger checkpoint failed: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        // The writer still checkpoints by itself past AUTOCHECKPOINT_PAGES.
        tracing::warn!("no background ledger checkpoints: {e}");
    }
    Ok(stop)
}

/// Brings the schema from whatever version the file has to [`SCHEMA_VERSION`].
///
/// Rows are only ever appended, so rowid order is the order of insertion
/// (submission for `requested`, the end of the task for `hosted` and
/// `receipts`): the listings and the pruning of the oldest rows need no
/// time index, and every insert touches one b-tree less.
///
/// Version 2 keeps receipts in a rowid table, so that the oldest can be
/// folded into `folded_receipts` (version 1 kept every receipt, in a
/// `WITHOUT ROWID` table with no order to prune by, and stored fuel and
/// times past `i64` wrapped to negative: they become its largest).
fn migrate(conn: &Connection) -> Result<(), LedgerError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(LedgerError::TooNew { found: version });
    }
    for step in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        conn.execute_batch(step)?;
    }
    Ok(())
}

/// `MIGRATIONS[v]` takes a database from version `v` to `v + 1`, in one
/// transaction.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    "BEGIN;
     CREATE TABLE requested (
         task TEXT PRIMARY KEY,
         name TEXT NOT NULL,
         module TEXT NOT NULL,
         submitted_ms INTEGER NOT NULL,
         finished_ms INTEGER,
         host TEXT,
         attempts INTEGER NOT NULL DEFAULT 0,
         state TEXT NOT NULL,
         exit_code INTEGER,
         failure TEXT,
         fuel INTEGER,
         wall_ms INTEGER
     );
     CREATE TABLE hosted (
         task TEXT NOT NULL,
         requester TEXT NOT NULL,
         module TEXT NOT NULL,
         started_ms INTEGER NOT NULL,
         finished_ms INTEGER,
         state TEXT NOT NULL,
         exit_code INTEGER,
         failure TEXT,
         fuel INTEGER,
         wall_ms INTEGER,
         PRIMARY KEY (requester, task)
     );
     CREATE TABLE receipts (
         task TEXT NOT NULL,
         host TEXT NOT NULL,
         requester TEXT NOT NULL,
         role TEXT NOT NULL CHECK (role IN ('issued', 'received')),
         fuel INTEGER NOT NULL,
         wall_ms INTEGER NOT NULL,
         finished_ms INTEGER NOT NULL,
         body BLOB NOT NULL,
         host_key BLOB NOT NULL,
         signature BLOB NOT NULL,
         PRIMARY KEY (task, host, requester)
     ) WITHOUT ROWID;
     PRAGMA user_version = 1;
     COMMIT;",
    "BEGIN;
     CREATE TABLE receipts_by_age (
         task TEXT NOT NULL,
         host TEXT NOT NULL,
         requester TEXT NOT NULL,
         role TEXT NOT NULL CHECK (role IN ('issued', 'received')),
         fuel INTEGER NOT NULL,
         wall_ms INTEGER NOT NULL,
         finished_ms INTEGER NOT NULL,
         body BLOB NOT NULL,
         host_key BLOB NOT NULL,
         signature BLOB NOT NULL,
         UNIQUE (task, host, requester)
     );
     INSERT INTO receipts_by_age SELECT task, host, requester, role,
             CASE WHEN fuel < 0 THEN 9223372036854775807 ELSE fuel END,
             CASE WHEN wall_ms < 0 THEN 9223372036854775807 ELSE wall_ms END,
             finished_ms, body, host_key, signature
         FROM receipts ORDER BY finished_ms;
     DROP TABLE receipts;
     ALTER TABLE receipts_by_age RENAME TO receipts;
     CREATE TABLE folded_receipts (
         role TEXT PRIMARY KEY CHECK (role IN ('issued', 'received')),
         count INTEGER NOT NULL,
         fuel INTEGER NOT NULL,
         wall_ms INTEGER NOT NULL
     );
     PRAGMA user_version = 2;
     COMMIT;",
];

#[cfg(test)]
mod tests {
    use super::*;
    use spare_core::identity::Keypair;
    use spare_core::{BlobId, Failure};

    fn outcome(code: i32) -> Outcome {
        Outcome {
            status: spare_core::Status::Exited(code),
            stdout: vec![],
            stderr: vec![],
            fuel: 42,
            wall_ms: 7,
        }
    }

    /// A hosted task of a new requester, started at `started_ms`.
    fn some_hosted(started_ms: u64) -> Hosted {
        Hosted {
            task: TaskId::random(),
            requester: PeerId::random(),
            module: BlobId::of(b"m"),
            started_ms,
        }
    }

    fn signed_receipt(task: TaskId, requester: PeerId) -> (Receipt, SignedReceipt) {
        let key = Keypair::generate_ed25519();
        let receipt = Receipt {
            task,
            requester,
            host: key.public().to_peer_id(),
            module: BlobId::of(b"m"),
            fuel: 100,
            wall_ms: 3,
            exit_code: Some(0),
            finished_ms: 1,
        };
        let signed = SignedReceipt::sign(&receipt, &key).unwrap();
        (receipt, signed)
    }

    #[tokio::test]
    async fn requested_tasks_move_through_their_states() {
        let ledger = Ledger::open_in_memory().unwrap();
        let task = TaskId::random();
        let host = PeerId::random();
        ledger
            .task_submitted(&task, "primes.wasm", "abc")
            .await
            .unwrap();
        let state = |t: &TaskId| ledger.requested_task(t).unwrap().unwrap().state;
        assert_eq!(state(&task), TaskState::Waiting, "no host has it yet");
        ledger.task_attempt(&task, &host).await.unwrap();
        assert_eq!(state(&task), TaskState::Running);
        // A host that refused it for want of room: no attempt, waiting.
        ledger.task_busy(&task).await.unwrap();
        let row = ledger.requested_task(&task).unwrap().unwrap();
        assert_eq!((row.state, row.attempts), (TaskState::Waiting, 0));
        ledger.task_attempt(&task, &host).await.unwrap();
        assert_eq!(state(&task), TaskState::Running);
        ledger
            .task_finished(&task, &Ending::of(&outcome(3)), None)
            .await
            .unwrap();
        let rec = ledger.requested_task(&task).unwrap().unwrap();
        assert_eq!(rec.state, TaskState::Exited);
        assert_eq!(rec.exit_code, Some(3));
        assert_eq!(rec.attempts, 1);
        assert_eq!(rec.host, Some(host.to_string()));
        assert_eq!(rec.fuel, Some(42));

        let failed = Outcome::failed(Failure::OutOfFuel { limit: 10 });
        let other = TaskId::random();
        ledger
            .task_submitted(&other, "loop.wasm", "def")
            .await
            .unwrap();
        ledger
            .task_finished(&other, &Ending::of(&failed), None)
            .await
            .unwrap();
        let recent = ledger.recent_tasks(10).unwrap();
        assert_eq!(recent.len(), 2);
        let rec = recent.iter().find(|t| t.task == other.to_string()).unwrap();
        assert_eq!(rec.state, TaskState::Failed);
        assert_eq!(rec.failure.as_deref(), Some("ran out of fuel (limit 10)"));
    }

    #[tokio::test]
    async fn a_restart_marks_running_tasks_interrupted_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (running, waiting, done) = (TaskId::random(), TaskId::random(), TaskId::random());
        {
            let ledger = Ledger::open(&path).unwrap();
            ledger.task_submitted(&running, "a", "m").await.unwrap();
            ledger
                .task_attempt(&running, &PeerId::random())
                .await
                .unwrap();
            ledger.task_submitted(&waiting, "c", "m").await.unwrap();
            ledger.task_submitted(&done, "b", "m").await.unwrap();
            ledger
                .task_finished(&done, &Ending::of(&outcome(0)), None)
                .await
                .unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let state = |t: &TaskId| ledger.requested_task(t).unwrap().unwrap().state;
        assert_eq!(state(&running), TaskState::Interrupted);
        assert_eq!(state(&waiting), TaskState::Interrupted);
        assert_eq!(state(&done), TaskState::Exited);
    }

    #[tokio::test]
    async fn receipts_are_stored_once_and_summed() {
        let ledger = Ledger::open_in_memory().unwrap();
        let task = TaskId::random();
        let (receipt, signed) = signed_receipt(task, PeerId::random());
        ledger.task_submitted(&task, "t", "m").await.unwrap();
        for _ in 0..2 {
            ledger
                .task_finished(
                    &task,
                    &Ending::of(&outcome(0)),
                    Some((receipt.clone(), signed.clone())),
                )
                .await
                .unwrap();
        }
        let totals = ledger.receipt_totals(ReceiptRole::Received).unwrap();
        assert_eq!(
            totals,
            ReceiptTotals {
                count: 1,
                fuel: 100,
                wall_ms: 3
            }
        );
        assert_eq!(ledger.receipt_totals(ReceiptRole::Issued).unwrap().count, 0);
        let back = ledger
            .receipt(&receipt.task, &receipt.host)
            .unwrap()
            .unwrap();
        assert_eq!(back.verify().unwrap(), receipt);
    }

    #[tokio::test]
    async fn a_hosted_task_and_its_receipt_are_committed_together() {
        let ledger = Ledger::open_in_memory().unwrap();
        let hosted = some_hosted(5);
        let receipt = signed_receipt(hosted.task, hosted.requester);
        ledger
            .hosted_finished(&hosted, &Ending::of(&outcome(0)), Some(receipt))
            .await
            .unwrap();
        let record = &ledger.recent_hosted(1).unwrap()[0];
        assert_eq!(record.state, TaskState::Exited);
        assert_eq!(record.started_ms, 5);
        assert_eq!(record.requester, hosted.requester.to_string());
        assert_eq!(ledger.receipt_totals(ReceiptRole::Issued).unwrap().count, 1);
    }

    #[tokio::test]
    async fn only_the_latest_hosted_rows_are_kept_and_every_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("state.db")).unwrap();
        let requester = PeerId::random();
        let rows = MAX_HOSTED_ROWS as usize + 5;
        let mut writes = Vec::new();
        for i in 0..rows {
            let hosted = Hosted {
                task: TaskId::random(),
                requester,
                module: BlobId::of(b"m"),
                started_ms: i as u64,
            };
            let receipt = signed_receipt(hosted.task, requester);
            writes.push(ledger.hosted_finished(&hosted, &Ending::of(&outcome(0)), Some(receipt)));
        }
        for write in writes {
            write.await.unwrap();
        }
        let kept = ledger.recent_hosted(u32::MAX).unwrap();
        assert_eq!(kept.len(), MAX_HOSTED_ROWS as usize);
        assert_eq!(kept[0].started_ms, rows as u64 - 1, "the newest kept");
        assert_eq!(kept.last().unwrap().started_ms, 5, "the oldest gone");
        assert_eq!(
            ledger.receipt_totals(ReceiptRole::Issued).unwrap().count,
            rows as u64
        );
    }

    #[tokio::test]
    async fn concurrent_writes_are_grouped_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = std::sync::Arc::new(Ledger::open(&dir.path().join("state.db")).unwrap());
        let mut writers = Vec::new();
        for _ in 0..500 {
            let ledger = std::sync::Arc::clone(&ledger);
            writers.push(tokio::spawn(async move {
                let task = TaskId::random();
                ledger.task_submitted(&task, "t", "m").await.unwrap();
                ledger
                    .task_finished(&task, &Ending::of(&outcome(0)), None)
                    .await
                    .unwrap();
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let tasks = ledger.recent_tasks(1000).unwrap();
        assert_eq!(tasks.len(), 500);
        assert!(tasks.iter().all(|t| t.state == TaskState::Exited));
    }

    #[tokio::test]
    async fn a_failed_write_fails_alone() {
        let ledger = Ledger::open_in_memory().unwrap();
        let task = TaskId::random();
        ledger.task_submitted(&task, "t", "m").await.unwrap();
        // The same task id twice violates the primary key.
        let duplicate = ledger.task_submitted(&task, "t", "m");
        let other = TaskId::random();
        let fine = ledger.task_submitted(&other, "u", "m");
        let (duplicate, fine) = tokio::join!(duplicate, fine);
        assert!(matches!(duplicate, Err(LedgerError::Write(_))));
        assert!(fine.is_ok());
        assert!(ledger.requested_task(&other).unwrap().is_some());
    }

    /// Small caps, so that tests reach them.
    const SMALL: Caps = Caps {
        hosted: 4,
        receipts: 10,
        requested: 5,
    };

    /// A receipt from `host` for a new task; the signature is not checked
    /// by the ledger, so one serves them all.
    fn receipt_from(host: &Keypair, fuel: u64) -> (Receipt, SignedReceipt) {
        let receipt = Receipt {
            task: TaskId::random(),
            requester: PeerId::random(),
            host: host.public().to_peer_id(),
            module: BlobId::of(b"m"),
            fuel,
            wall_ms: 2,
            exit_code: Some(0),
            finished_ms: u64::MAX,
        };
        let signed = SignedReceipt::sign(&receipt, host).unwrap();
        (receipt, signed)
    }

    fn receipt_rows(ledger: &Ledger) -> i64 {
        ledger
            .reader()
            .query_row("SELECT COUNT(*) FROM receipts", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn receipts_beyond_the_cap_are_folded_into_totals_that_lose_nothing() {
        let ledger = Ledger::open_in_memory_with(SMALL).unwrap();
        let host = Keypair::generate_ed25519();
        let mut stored = Vec::new();
        for fuel in 1..=25 {
            let (receipt, signed) = receipt_from(&host, fuel);
            let task = receipt.task;
            ledger
                .task_finished(&task, &Ending::of(&outcome(0)), Some((receipt, signed)))
                .await
                .unwrap();
            stored.push(task);
        }
        let hosted = some_hosted(1);
        let issued = signed_receipt(hosted.task, hosted.requester);
        ledger
            .hosted_finished(&hosted, &Ending::of(&outcome(0)), Some(issued))
            .await
            .unwrap();

        assert_eq!(
            receipt_rows(&ledger),
            SMALL.receipts,
            "only the latest kept"
        );
        let host = host.public().to_peer_id();
        assert!(
            ledger.receipt(&stored[0], &host).unwrap().is_none(),
            "the oldest folded"
        );
        assert!(
            ledger.receipt(&stored[24], &host).unwrap().is_some(),
            "the newest kept"
        );
        assert_eq!(
            ledger.receipt_totals(ReceiptRole::Received).unwrap(),
            ReceiptTotals {
                count: 25,
                fuel: (1..=25).sum(),
                wall_ms: 50
            },
            "folded and kept together"
        );
        assert_eq!(
            ledger.receipt_totals(ReceiptRole::Issued).unwrap(),
            ReceiptTotals {
                count: 1,
                fuel: 100,
                wall_ms: 3
            }
        );
    }

    #[tokio::test]
    async fn totals_past_what_sqlite_holds_saturate_and_fail_no_write() {
        let ledger = Ledger::open_in_memory_with(SMALL).unwrap();
        let host = Keypair::generate_ed25519();
        for _ in 0..15 {
            let (receipt, signed) = receipt_from(&host, u64::MAX);
            let task = receipt.task;
            ledger
                .task_finished(&task, &Ending::of(&outcome(0)), Some((receipt, signed)))
                .await
                .unwrap();
        }
        let totals = ledger.receipt_totals(ReceiptRole::Received).unwrap();
        assert_eq!(totals.count, 15);
        assert_eq!(totals.fuel, u64::MAX);
    }

    #[tokio::test]
    async fn only_the_latest_requested_tasks_are_kept_and_every_unfinished_one() {
        let ledger = Ledger::open_in_memory_with(SMALL).unwrap();
        let running = TaskId::random();
        ledger.task_submitted(&running, "long", "m").await.unwrap();
        ledger
            .task_attempt(&running, &PeerId::random())
            .await
            .unwrap();
        let mut finished = Vec::new();
        for _ in 0..10 {
            let task = TaskId::random();
            ledger.task_submitted(&task, "short", "m").await.unwrap();
            ledger
                .task_finished(&task, &Ending::of(&outcome(0)), None)
                .await
                .unwrap();
            finished.push(task);
        }
        let kept = ledger.recent_tasks(u32::MAX).unwrap();
        assert!(
            kept.iter().any(|t| t.task == running.to_string()),
            "still running"
        );
        assert!(ledger.requested_task(&finished[9]).unwrap().is_some());
        assert!(ledger.requested_task(&finished[0]).unwrap().is_none());
        assert!(
            kept.len() <= SMALL.requested as usize + 1,
            "{} kept",
            kept.len()
        );
    }

    /// A ledger in which every insert into `table` fails, as SQLite's
    /// `RAISE(<raise>)` makes it.
    fn refusing_inserts(table: &str, raise: &str) -> Ledger {
        let ledger = Ledger::open_in_memory().unwrap();
        ledger
            .reader()
            .execute_batch(&format!(
                "CREATE TRIGGER refuse BEFORE INSERT ON {table} BEGIN SELECT RAISE({raise}); END;"
            ))
            .unwrap();
        ledger
    }

    #[tokio::test]
    async fn a_write_that_fails_halfway_leaves_nothing_behind() {
        // Receipts cannot be stored: the hosted row written before its
        // receipt must go with it.
        let ledger = refusing_inserts("receipts", "ABORT, 'no receipts today'");
        let hosted = some_hosted(1);
        let receipt = signed_receipt(hosted.task, hosted.requester);
        let failing = ledger.hosted_finished(&hosted, &Ending::of(&outcome(0)), Some(receipt));
        let other = TaskId::random();
        let fine = ledger.task_submitted(&other, "u", "m");
        let (failing, fine) = tokio::join!(failing, fine);
        let err = failing.unwrap_err();
        assert!(err.to_string().contains("no receipts today"), "{err}");
        assert!(ledger.recent_hosted(10).unwrap().is_empty(), "rolled back");
        fine.unwrap();
        assert!(ledger.requested_task(&other).unwrap().is_some());
    }

    /// A write that makes SQLite roll back the whole transaction takes the
    /// writes committed with it along: each is told so, and a write told
    /// it landed has.
    #[tokio::test]
    async fn a_transaction_rolled_back_whole_fails_every_write_it_held() {
        let ledger = refusing_inserts("hosted", "ROLLBACK, 'the disk is full'");
        for _ in 0..20 {
            let (before, after) = (TaskId::random(), TaskId::random());
            let hosted = some_hosted(1);
            let (first, failing, last) = tokio::join!(
                ledger.task_submitted(&before, "a", "m"),
                ledger.hosted_finished(&hosted, &Ending::of(&outcome(0)), None),
                ledger.task_submitted(&after, "b", "m"),
            );
            assert!(
                failing
                    .unwrap_err()
                    .to_string()
                    .contains("the disk is full")
            );
            for (task, result) in [(before, first), (after, last)] {
                let stored = ledger.requested_task(&task).unwrap().is_some();
                assert_eq!(stored, result.is_ok(), "{result:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_version_1_database_keeps_its_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (receipt, signed) = signed_receipt(TaskId::random(), PeerId::random());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO receipts VALUES (?1, ?2, ?3, 'issued', 100, 3, 1, ?4, ?5, ?6)",
                params![
                    receipt.task.to_string(),
                    receipt.host.to_string(),
                    receipt.requester.to_string(),
                    signed.body,
                    signed.host_key,
                    signed.signature
                ],
            )
            .unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let version: i64 = ledger
            .reader()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(ledger.receipt_totals(ReceiptRole::Issued).unwrap().count, 1);
        let back = ledger
            .receipt(&receipt.task, &receipt.host)
            .unwrap()
            .unwrap();
        assert_eq!(back.verify().unwrap(), receipt);
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Ledger::open(&path).unwrap_err();
        assert!(err.to_string().contains("upgrade spare"), "{err}");
    }
}
