//! The host side: running tasks for peers and serving them blob chunks.
//!
//! A task request is refused (the requester then tries elsewhere) when it is
//! malformed, asks for more than this host grants, or arrives while the queue
//! is full. Otherwise the host fetches the blobs it lacks from the requester,
//! runs the job in a worker, signs a receipt and answers with the outcome.

use libp2p::PeerId;
use spare_core::wire::{BlobRequest, BlobResponse, Refusal, Report, TaskRequest, TaskResponse};
use spare_core::{Receipt, SignedReceipt, Stdin, TaskSpec};
use spare_ledger::Ending;
use spare_net::Responder;
use spare_runtime::{Job, JobStdin};
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobStore;
use crate::node::Node;

/// Serves one inbound task request, start to answer.
pub(crate) async fn serve_task(
    node: Node,
    peer: PeerId,
    request: TaskRequest,
    reply: Responder<TaskResponse>,
) {
    let response = match request {
        TaskRequest::Run(spec) => run_for_peer(&node, peer, spec).await,
        TaskRequest::Cancel(task) => {
            let token = node.lock(&node.inner.hosted).get(&(peer, task)).cloned();
            if let Some(token) = &token {
                tracing::info!(%peer, %task, "cancelled by its requester");
                token.cancel();
            }
            TaskResponse::Cancelled(token.is_some())
        }
    };
    reply.send(response).await;
}

async fn run_for_peer(node: &Node, peer: PeerId, spec: TaskSpec) -> TaskResponse {
    if let Err(e) = spec.validate() {
        return TaskResponse::Refused(Refusal::invalid(&e));
    }
    if let Err(e) = spec.limits.check_within(&node.config().max_limits) {
        return TaskResponse::Refused(Refusal::Unavailable(format!(
            "above this host's maximum: {e}"
        )));
    }
    let token = CancellationToken::new();
    {
        let stats = node.pool().stats();
        let mut hosted = node.lock(&node.inner.hosted);
        let waiting = hosted.len().saturating_sub(stats.slots);
        if waiting >= node.config().queue as usize {
            return TaskResponse::Refused(Refusal::Busy {
                queued: u32::try_from(waiting).unwrap_or(u32::MAX),
            });
        }
        if node.inner.shutdown.is_cancelled() {
            return TaskResponse::Refused(Refusal::ShuttingDown);
        }
        if hosted.insert((peer, spec.id), token.clone()).is_some() {
            return TaskResponse::Refused(Refusal::Invalid(format!(
                "task {} is already running here",
                spec.id
            )));
        }
    }
    let _registered = Registered {
        node,
        key: (peer, spec),
    };
    let spec = &_registered.key.1;
    let module = spec.module.id.to_string();
    // Not awaited: the finish below commits after it in any case.
    node.ledger()
        .hosted_started(&spec.id, &peer, &module)
        .detach();

    let outcome = match prepare(node, peer, spec).await {
        Ok(job) => {
            tracing::debug!(%peer, task = %spec.id, "running");
            tokio::select! {
                outcome = node.pool().run(job, token.clone()) => outcome,
                () = node.inner.shutdown.cancelled() => {
                    token.cancel();
                    return TaskResponse::Refused(Refusal::ShuttingDown);
                }
            }
        }
        Err(refusal) => {
            log_err(
                node.ledger()
                    .hosted_finished(&spec.id, &peer, &Ending::failed(refusal.to_string()), None)
                    .await,
            );
            return TaskResponse::Refused(refusal);
        }
    };
    let receipt = Receipt {
        task: spec.id,
        requester: peer,
        host: node.peer_id(),
        module: spec.module.id,
        fuel: outcome.fuel,
        wall_ms: outcome.wall_ms,
        exit_code: outcome.exit_code(),
        finished_ms: spare_core::now_ms(),
    };
    let signed = match SignedReceipt::sign(&receipt, &node.inner.key) {
        Ok(signed) => signed,
        Err(e) => return TaskResponse::Refused(Refusal::Unavailable(e.to_string())),
    };
    // Durable before the requester hears of it.
    log_err(
        node.ledger()
            .hosted_finished(
                &spec.id,
                &peer,
                &Ending::of(&outcome),
                Some((receipt, signed.clone())),
            )
            .await,
    );
    tracing::debug!(%peer, task = %spec.id, status = ?outcome.status, fuel = outcome.fuel, "hosted task finished");
    TaskResponse::Done(Report {
        task: spec.id,
        outcome,
        receipt: signed,
    })
}

/// Removes a hosted task from the registry however serving it ends.
struct Registered<'a> {
    node: &'a Node,
    key: (PeerId, TaskSpec),
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let key = (self.key.0, self.key.1.id);
        self.node.lock(&self.node.inner.hosted).remove(&key);
    }
}

/// Fetches what the task needs from its requester and builds the job.
async fn prepare(node: &Node, peer: PeerId, spec: &TaskSpec) -> Result<Job, Refusal> {
    let unavailable = |e: crate::blobs::BlobError| {
        Refusal::BlobUnavailable(spare_core::outcome::clip_detail(e.to_string()))
    };
    node.blobs()
        .fetch(node.net(), peer, spec.module)
        .await
        .map_err(unavailable)?;
    if let Stdin::Blob(blob) = &spec.stdin {
        node.blobs()
            .fetch(node.net(), peer, *blob)
            .await
            .map_err(unavailable)?;
    }
    Ok(job_for(spec, node.blobs()))
}

/// The job that runs `spec` with blobs from `blobs` (which must hold them).
pub(crate) fn job_for(spec: &TaskSpec, blobs: &BlobStore) -> Job {
    Job {
        task: spec.id,
        module: spec.module.id,
        module_path: blobs.path(&spec.module.id),
        name: spec.name.clone(),
        args: spec.args.clone(),
        env: spec.env.clone(),
        stdin: match &spec.stdin {
            Stdin::Empty => JobStdin::Bytes(Vec::new()),
            Stdin::Inline(bytes) => JobStdin::Bytes(bytes.clone()),
            Stdin::Blob(blob) => JobStdin::File(blobs.path(&blob.id)),
        },
        limits: spec.limits,
    }
}

/// Serves a chunk of a blob to a peer that was granted it.
pub(crate) async fn serve_blob(
    node: Node,
    peer: PeerId,
    request: BlobRequest,
    reply: Responder<BlobResponse>,
) {
    let response = if node.may_fetch(&peer, &request.id) {
        let blobs = node.clone();
        let read = tokio::task::spawn_blocking(move || {
            blobs
                .blobs()
                .read_chunk(&request.id, request.offset, request.len)
        })
        .await;
        match read {
            Ok(Ok((total, data))) => BlobResponse::Chunk { total, data },
            _ => BlobResponse::NotFound,
        }
    } else {
        tracing::debug!(%peer, blob = %request.id, "refused a blob the peer was not granted");
        BlobResponse::NotFound
    };
    reply.send(response).await;
}

fn log_err<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(e) = result {
        tracing::error!("ledger: {e}");
    }
}
