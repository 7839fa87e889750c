//! The control API: HTTP/JSON on a Unix socket, mode 0600.
//!
//! The CLI uses nothing else. [`router`] is a plain axum `Router`, tested
//! in-process with `oneshot`; [`serve`] binds it to the node's socket.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/node` | this node: peer id, addresses, workers ([`types::NodeInfo`]) |
//! | `GET /v1/status` | what this node gives now and why ([`types::StatusView`]) |
//! | `GET /v1/peers` | connected peers and their offers |
//! | `HEAD /v1/blobs/<hash>` | 200 if the blob is stored, else 404 |
//! | `PUT /v1/blobs/<hash>` | stores a blob; refused if the body does not hash to `<hash>` |
//! | `POST /v1/tasks` | runs a task ([`types::Submission`]); answers with an NDJSON stream of [`types::TaskEvent`] |
//! | `POST /v1/tasks/<id>/cancel` | cancels a running task |
//! | `GET /v1/tasks?limit=N` | recent tasks this node requested |
//! | `GET /v1/hosted?limit=N` | recent tasks this node ran for others |

pub mod client;
pub mod types;

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use spare_core::limits::{MAX_MODULE_BYTES, MAX_STDIN_BYTES};
use spare_core::{BlobId, TaskId};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::requester;
use types::{
    CancelReply, EnforcementView, ErrorBody, FailuresView, NodeInfo, OfferView, PeerView,
    SettingsView, StatusView, Submission, WorkerInfo,
};

/// Largest request body: a module or stdin blob.
const MAX_BODY: usize = (if MAX_MODULE_BYTES > MAX_STDIN_BYTES {
    MAX_MODULE_BYTES
} else {
    MAX_STDIN_BYTES
}) as usize;
/// Default and largest `limit` of listings.
const DEFAULT_LIST: u32 = 20;
const MAX_LIST: u32 = 10_000;

/// An error the client can act on; the cause is logged here.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!("API: {message}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// The API's routes over `node`.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/v1/node", get(node_info))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/blobs/{id}", put(put_blob).head(head_blob))
        .route("/v1/tasks", post(submit).get(tasks))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/hosted", get(hosted))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

/// Serves the API on `socket` until `shutdown` fires.
pub async fn serve(node: Node, socket: &Path, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = bind(socket)?;
    let app = router(node);
    tokio::select! {
        result = axum::serve(listener, app) => result,
        () = shutdown.cancelled() => Ok(()),
    }
}

/// Binds the socket, replacing a stale one left by a daemon that died, and
/// makes it private to the user.
pub fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon is serving {}", socket.display()),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn node_info(State(node): State<Node>) -> Json<NodeInfo> {
    let stats = node.pool().stats();
    let priority = node.pool().priority();
    Json(NodeInfo {
        peer_id: node.peer_id().to_string(),
        listen_addrs: node
            .net()
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        data_dir: node.paths().data_dir.display().to_string(),
        uptime_ms: u64::try_from(node.uptime().as_millis()).unwrap_or(u64::MAX),
        cores: node.config().slots(),
        running: stats.running,
        queued: stats.queued,
        workers: node
            .pool()
            .worker_pids()
            .into_iter()
            .map(|pid| WorkerInfo { pid })
            .collect(),
        worker_policy: priority.map(|p| format!("{:?}", p.policy).to_lowercase()),
        worker_nice: priority.map(|p| p.nice),
        worker_idle_io: priority.map(|p| p.idle_io),
    })
}

async fn status(State(node): State<Node>) -> Json<StatusView> {
    let config = node.config();
    let policy = &config.policy;
    let governor = node.governor().status();
    let stats = node.pool().stats();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Json(StatusView {
        peer_id: node.peer_id().to_string(),
        state: governor.state.to_owned(),
        reason: governor.reason,
        giving_cores: governor.giving_millicores as f64 / 1000.0,
        owner_cores: governor.owner_cores,
        spare_cores: governor.spare_cores,
        cpu_pressure: governor.cpu_pressure,
        memory_pressure: governor.memory_pressure,
        owner_active_ms_ago: governor.owner_active_ms_ago,
        paused_ms: governor.paused_ms,
        pauses: governor.pauses,
        slots: config.slots(),
        running: stats.running,
        queued: stats.queued,
        settings: SettingsView {
            cores: policy.cores,
            cpu_percent: f64::from(policy.cpu_permille) / 10.0,
            memory: policy.memory,
            guest_memory: config.max_limits.memory,
            disk: policy.disk,
            upload: policy.upload,
            download: policy.download,
            idle_only: policy.when.idle_only,
            owner_threshold_percent: f64::from(policy.when.owner_threshold) / 10.0,
            cool_down_ms: ms(policy.when.cool_down),
            windows: policy
                .when
                .windows
                .iter()
                .map(ToString::to_string)
                .collect(),
            on_battery: policy.when.on_battery,
            hand_back_after_ms: ms(policy.when.hand_back_after),
        },
        enforcement: EnforcementView {
            mechanism: governor.enforcement.mechanism,
            cpu: governor.enforcement.cpu,
            memory: governor.enforcement.memory,
            workers: node
                .pool()
                .confinement()
                .map_or_else(|| "unknown".into(), |c| c.describe()),
            notes: governor.enforcement.notes,
        },
        uploaded: node.upload().moved(),
        downloaded: node.download().moved(),
        blobs_used: node.blobs().used(),
        blobs_budget: node.blobs().budget(),
        state_bytes: node.blobs().state_bytes(),
        power: governor.power.map(str::to_owned),
    })
}

async fn peers(State(node): State<Node>) -> Json<Vec<PeerView>> {
    let views = node
        .net()
        .peers()
        .into_iter()
        .map(|p| PeerView {
            peer_id: p.peer.to_string(),
            addrs: p.addrs.iter().map(ToString::to_string).collect(),
            agent: p.agent,
            rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
            connected_ms: u64::try_from(p.connected_since.elapsed().as_millis())
                .unwrap_or(u64::MAX),
            offer: p.offer.map(|(o, at)| OfferView {
                cores: o.cores,
                idle: o.idle,
                queued: o.queued,
                memory: o.memory,
                runtimes: o
                    .runtimes
                    .iter()
                    .map(|r| format!("{r:?}").to_lowercase())
                    .collect(),
                age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
                paused: o.paused.map(|p| p.describe().to_owned()),
            }),
            failures: node.standing(&p.peer).map(|(count, left)| FailuresView {
                count,
                forgotten_in_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            }),
        })
        .collect();
    Json(views)
}

fn parse_blob_id(text: &str) -> Result<BlobId, ApiError> {
    text.parse()
        .map_err(|e| ApiError::bad_request(format!("`{text}` is not a blob hash: {e}")))
}

async fn head_blob(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_blob_id(&id)?;
    // The owner asks before a task uses the blob: a module run again and
    // again is the store's most recently used, not its first evicted.
    if node.blobs().has(&id) {
        node.blobs().mark_used(id).await;
        Ok(StatusCode::OK)
    } else {
        Ok(StatusCode::NOT_FOUND)
    }
}

async fn put_blob(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = parse_blob_id(&id)?;
    let stored = tokio::task::spawn_blocking(move || node.blobs().put_verified(&id, &body))
        .await
        .map_err(ApiError::internal)?;
    match stored {
        Ok(()) => Ok(StatusCode::CREATED),
        Err(e @ crate::blobs::BlobError::Mismatch { .. }) => {
            Err(ApiError::bad_request(e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn submit(State(node): State<Node>, body: Bytes) -> Result<Response, ApiError> {
    let submission: Submission = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid task submission: {e}")))?;
    let task = requester::prepare(&node, &submission)
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rx = requester::start(&node, task);
    // The task usually reaches its placement without waiting: letting it
    // run first sends the response head, `accepted` and `placed` in one
    // write instead of two.
    tokio::task::yield_now().await;
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(line)), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<u32>,
}

impl ListQuery {
    fn limit(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST)
    }
}

async fn tasks(
    State(node): State<Node>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit();
    let tasks = tokio::task::spawn_blocking(move || node.ledger().recent_tasks(limit))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(Json(tasks).into_response())
}

async fn hosted(
    State(node): State<Node>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit();
    // Running tasks live in memory until they end; the ledger has the rest.
    let mut tasks = node.running_hosted();
    tasks.truncate(limit as usize);
    let rest = limit.saturating_sub(u32::try_from(tasks.len()).unwrap_or(u32::MAX));
    let reader = node.clone();
    let finished = tokio::task::spawn_blocking(move || reader.ledger().recent_hosted(rest))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    tasks.extend(finished);
    Ok(Json(tasks).into_response())
}

async fn cancel(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<CancelReply>, ApiError> {
    let task: TaskId = id
        .parse()
        .map_err(|e| ApiError::bad_request(format!("`{id}` is not a task id: {e}")))?;
    Ok(Json(CancelReply {
        cancelled: requester::cancel(&node, &task),
    }))
}
