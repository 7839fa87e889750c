//! The JSON shapes of the control API, shared by the daemon and the CLI.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use spare_core::{BlobRef, Failure, LimitRequest, Outcome};

/// `GET /v1/node`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub version: String,
    pub data_dir: String,
    pub uptime_ms: u64,
    /// Tasks run at once for the swarm.
    pub cores: u16,
    pub running: usize,
    pub queued: usize,
    pub workers: Vec<WorkerInfo>,
    /// What the workers obtained when lowering their priority.
    pub worker_policy: Option<String>,
    pub worker_nice: Option<i32>,
    pub worker_idle_io: Option<bool>,
}

/// `GET /v1/status`: what this node gives right now, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub peer_id: String,
    /// `giving`, `throttled` or `paused`.
    pub state: String,
    /// One line for humans, e.g. `paused: owner active 3 s ago`.
    pub reason: String,
    /// Cores the guests may use now.
    pub giving_cores: f64,
    /// The owner's and spare's own CPU use over the last sampling window,
    /// in cores.
    pub owner_cores: f64,
    pub spare_cores: f64,
    /// Shares of time stalled, from /proc/pressure (absent where the
    /// kernel has none).
    pub cpu_pressure: Option<f64>,
    pub memory_pressure: Option<f64>,
    pub owner_active_ms_ago: Option<u64>,
    pub paused_ms: Option<u64>,
    /// Pauses since the daemon started.
    pub pauses: u64,
    pub slots: u16,
    pub running: usize,
    pub queued: usize,
    pub settings: SettingsView,
    pub enforcement: EnforcementView,
    /// Bytes moved for the swarm since start.
    pub uploaded: u64,
    pub downloaded: u64,
    /// Bytes the blob store holds (or has reserved for fetches), and its
    /// part of the disk budget.
    pub blobs_used: u64,
    /// The bytes the blobs and the node's state may take together.
    pub blobs_budget: u64,
    /// The node's state (its database), which takes part of that budget.
    pub state_bytes: u64,
    /// Where the machine's power comes from now: `on battery`, `on AC
    /// power` or `no battery`; absent when unknown.
    pub power: Option<String>,
}

/// The policy in force.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SettingsView {
    pub cores: u16,
    pub cpu_percent: f64,
    pub memory: u64,
    pub guest_memory: u64,
    pub disk: u64,
    /// Bytes per second; absent means unlimited.
    pub upload: Option<u64>,
    pub download: Option<u64>,
    pub idle_only: bool,
    /// Of one core.
    pub owner_threshold_percent: f64,
    pub cool_down_ms: u64,
    pub windows: Vec<String>,
    pub on_battery: bool,
    pub hand_back_after_ms: u64,
}

/// How the limits are enforced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnforcementView {
    pub mechanism: String,
    pub cpu: String,
    pub memory: String,
    /// What a worker could reach if a guest broke out of wasmtime, e.g.
    /// `confined: files, TCP, signals, sockets`.
    #[serde(default)]
    pub workers: String,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub pid: u32,
}

/// One entry of `GET /v1/peers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerView {
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub agent: Option<String>,
    pub rtt_ms: Option<f64>,
    pub connected_ms: u64,
    pub offer: Option<OfferView>,
    /// This node's tasks the peer failed lately, which rank it after the
    /// peers with fewer; absent when none is remembered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<FailuresView>,
}

/// A peer's recent failures of this node's tasks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailuresView {
    pub count: u32,
    /// When they are forgotten, unless the peer fails again.
    pub forgotten_in_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OfferView {
    pub cores: u16,
    pub idle: u16,
    pub queued: u32,
    pub memory: u64,
    pub runtimes: Vec<String>,
    pub age_ms: u64,
    /// Why the peer gives nothing now, e.g. `owner active`; absent while
    /// it gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// Where a task should run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The best remote peer.
    #[default]
    Auto,
    /// This peer only.
    On(String),
    /// This node.
    Local,
}

/// The guest's stdin in a submission.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmitStdin {
    #[default]
    None,
    /// Base64 of small input.
    Inline(String),
    /// Input uploaded as a blob.
    Blob(BlobRef),
}

/// `POST /v1/tasks`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    /// The guest's `argv[0]`.
    pub name: String,
    /// The module, uploaded first with `PUT /v1/blobs/<hash>`.
    pub module: BlobRef,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub stdin: SubmitStdin,
    /// What the user set; unset limits are the defaults, lowered where
    /// the chosen host grants less.
    #[serde(default)]
    pub limits: LimitRequest,
    #[serde(default)]
    pub placement: Placement,
}

/// One line of the NDJSON stream `POST /v1/tasks` answers with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TaskEvent {
    /// The task has an id; cancel it with `POST /v1/tasks/<id>/cancel`.
    Accepted { task: String },
    /// Attempt number `attempt` was sent to `host`; `lowered` names the
    /// default limits lowered to what that host grants, if any were.
    Placed {
        attempt: u32,
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lowered: Option<String>,
    },
    /// That attempt failed for a reason another host may not have.
    Retrying {
        attempt: u32,
        host: String,
        reason: String,
    },
    /// No peer can take the task now, and the requester waits for one
    /// (e.g. every peer is paused by its owner).
    Waiting { reason: String },
    /// The task ran; this is how it ended.
    Finished { result: TaskResult },
    /// The task could not be run anywhere.
    Failed { error: String },
}

/// How a task ended, as the API reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    /// The peer that ran it (this node's id for `--local`).
    pub host: String,
    pub attempts: u32,
    pub exit_code: Option<i32>,
    /// The one-line cause when the guest did not exit by itself.
    pub failure: Option<String>,
    pub failure_kind: Option<FailureKind>,
    /// Base64.
    pub stdout: String,
    /// Base64.
    pub stderr: String,
    pub fuel: u64,
    pub wall_ms: u64,
    /// Whether the host's signed receipt verified and was stored.
    pub receipt: bool,
}

/// Broad classes of failure, for exit codes and scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The file could not be run at all (not Wasm, invalid, missing import).
    Unrunnable,
    /// A resource limit stopped the guest (fuel, memory, stack, output).
    Limit,
    /// The wall-time limit stopped the guest.
    Timeout,
    /// The guest trapped.
    Trap,
    Cancelled,
    /// The host or its worker failed.
    Host,
}

impl FailureKind {
    pub fn of(failure: &Failure) -> Self {
        match failure {
            Failure::NotWasm(_)
            | Failure::Invalid(_)
            | Failure::MissingImport { .. }
            | Failure::NoEntryPoint => FailureKind::Unrunnable,
            Failure::OutOfFuel { .. }
            | Failure::MemoryLimit { .. }
            | Failure::StackOverflow { .. }
            | Failure::OutputLimit { .. } => FailureKind::Limit,
            Failure::Timeout { .. } => FailureKind::Timeout,
            Failure::Trap(_) => FailureKind::Trap,
            Failure::Cancelled => FailureKind::Cancelled,
            Failure::WorkerCrashed(_) | Failure::Host(_) => FailureKind::Host,
        }
    }
}

impl TaskResult {
    pub fn new(
        task: String,
        host: String,
        attempts: u32,
        outcome: &Outcome,
        receipt: bool,
    ) -> Self {
        Self {
            task,
            host,
            attempts,
            exit_code: outcome.exit_code(),
            failure: outcome.failure().map(ToString::to_string),
            failure_kind: outcome.failure().map(FailureKind::of),
            stdout: B64.encode(&outcome.stdout),
            stderr: B64.encode(&outcome.stderr),
            fuel: outcome.fuel,
            wall_ms: outcome.wall_ms,
            receipt,
        }
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        B64.decode(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_bytes(&self) -> Vec<u8> {
        B64.decode(&self.stderr).unwrap_or_default()
    }
}

/// `POST /v1/tasks/<id>/cancel`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelReply {
    pub cancelled: bool,
}

/// Every error the API returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Encodes bytes for [`SubmitStdin::Inline`].
pub fn encode_b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes [`SubmitStdin::Inline`].
pub fn decode_b64(text: &str) -> Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|e| format!("stdin is not valid base64: {e}"))
}
