//! The host side: running tasks for peers and serving them blob chunks.
//!
//! A task request is refused (the requester then tries elsewhere) when it is
//! malformed, asks for more than this host grants, arrives while the queue
//! is full, or would give one requester more than half of this host.
//! Otherwise the host fetches the blobs it lacks from the requester
//! (refusing the task as busy if that requester's fetches in progress
//! would hold more than half of the disk budget for blobs,
//! [`crate::blobs::PEER_SHARE`]), runs the job in a worker, signs a
//! receipt and answers with the outcome. A hosted task is cancelled when
//! its requester cancels it, disconnects, or closes (or writes on) the
//! task's stream before the answer.
//!
//! While the owner needs the machine the governor pauses the workers and
//! the offer says so; a task that arrives anyway (pinned to this host)
//! waits like a queued one. A task still paused `hand_back_after` into a
//! pause is handed back: the host answers `HandedBack`, and the
//! requester tries another peer.
//!
//! Blob chunks are served only to peers granted the blob, and within a
//! node-wide bound on the bytes held in memory for it
//! ([`crate::blobs::MAX_SERVING_BYTES`], a share of it per peer): a request
//! beyond it is answered `Busy` at once, and the fetcher asks again.

use libp2p::PeerId;
use spare_core::outcome::{Failure, Status};
use spare_core::wire::{BlobRequest, BlobResponse, Refusal, Report, TaskRequest, TaskResponse};
use spare_core::{LogBudget, Outcome, Receipt, SignedReceipt, Stdin, TaskSpec};
use spare_ledger::{Ending, Hosted};
use spare_net::{AnswerRoom, BlobResponder, Reserved, TaskResponder};
use spare_policy::TokenBucket;
use spare_runtime::{Job, JobStdin};
use tokio_util::sync::CancellationToken;

use crate::blobs::{BlobError, BlobPin, BlobStore, ServingPermit};
use crate::node::{HostedEntry, Node};

/// Serves one inbound task request, start to answer.
pub(crate) async fn serve_task(
    node: Node,
    peer: PeerId,
    request: TaskRequest,
    mut reply: TaskResponder,
) {
    let (response, reserved) = match request {
        // Cancelled when the requester disconnects (it could no longer
        // receive the result), when it sends a cancel, when it closes this
        // request's stream before the answer (it gave up waiting: the peer
        // cannot keep more tasks here than it has streams), or when this
        // node shuts down.
        TaskRequest::Run(spec) => match node.net().connection_token(&peer) {
            None => (
                TaskResponse::Refused(Refusal::Unavailable(
                    "the requester is not connected".into(),
                )),
                None,
            ),
            Some(connection) => {
                let token = connection.child_token();
                let (task, stop) = (spec.id, token.clone());
                let run = run_for_peer(&node, peer, spec, token, reply.room());
                tokio::pin!(run);
                tokio::select! {
                    response = &mut run => response,
                    () = reply.abandoned() => {
                        tracing::debug!(%peer, %task, "cancelled: its requester stopped waiting");
                        stop.cancel();
                        run.await
                    }
                }
            }
        },
        TaskRequest::Cancel(task) => {
            let found = cancel(&node, peer, task);
            if found {
                tracing::debug!(%peer, %task, "cancelled by its requester");
            }
            (TaskResponse::Cancelled(found), None)
        }
    };
    reply.send_reserved(response, reserved).await;
}

/// Cancels `peer`'s hosted `task`, if it is here.
fn cancel(node: &Node, peer: PeerId, task: spare_core::TaskId) -> bool {
    let token = node
        .lock(&node.inner.hosted)
        .get(&(peer, task))
        .map(|entry| entry.token.clone());
    token.inspect(CancellationToken::cancel).is_some()
}

/// Runs `peer`'s task unless it is refused; `token` stops it. The answer
/// comes with the room reserved for it in `room`, the requester's share of
/// the node's answer budget.
async fn run_for_peer(
    node: &Node,
    peer: PeerId,
    spec: TaskSpec,
    token: CancellationToken,
    room: AnswerRoom,
) -> (TaskResponse, Option<Reserved>) {
    // `wire::decode` validated the spec; the host's own maximum is checked
    // here.
    if let Err(e) = spec.limits.check_within(&node.config().max_limits) {
        let refusal = Refusal::Unavailable(format!("it grants less: {e}"));
        return (TaskResponse::Refused(refusal), None);
    }
    // Inline stdin came with the request: counted in the download bucket
    // like the blobs this node fetches, which make up for it. Nothing waits
    // for it, since it is here already.
    if let Stdin::Inline(bytes) = &spec.stdin {
        node.download().arrived(bytes.len() as u64);
    }
    let record = Hosted {
        task: spec.id,
        requester: peer,
        module: spec.module.id,
        started_ms: spare_core::now_ms(),
    };
    if let Err(refusal) = admit(node, &record, spec.held_bytes(), &token) {
        return (TaskResponse::Refused(refusal), None);
    }
    let _registered = Registered {
        node,
        key: (peer, spec.id),
    };

    // The job takes the spec's args, env and stdin; the rest is kept.
    let (id, module, limits) = (spec.id, spec.module.id, spec.limits);
    let prepared = tokio::select! {
        prepared = prepare(node, peer, spec) => prepared,
        () = token.cancelled() => Err(Refusal::Unavailable("cancelled".into())),
    };
    // The pins keep the task's blobs from eviction until it ends.
    let (job, _pins) = match prepared {
        Ok(prepared) => prepared,
        // Not recorded: the task never ran here, and a peer could make
        // the node write rows (and log lines) for as long as it liked by
        // asking for tasks it then will not give the module of.
        Err(refusal) => {
            if REFUSALS_LOGGED.allow() {
                tracing::info!(%peer, task = %id, "refused: {refusal}");
            } else {
                tracing::debug!(%peer, task = %id, "refused: {refusal}");
            }
            return (TaskResponse::Refused(refusal), None);
        }
    };
    let (hand_back, arrived) = (
        node.config().policy.when.hand_back_after,
        std::time::Instant::now(),
    );
    let run = async {
        // Room for the task's largest answer first, so that the answers
        // this node holds for requesters that do not read them, and the
        // outputs of the tasks it runs, stay within its answer budget. A
        // requester's tasks wait here while its share is held.
        let reserved = tokio::select! {
            reserved = room.reserve(TaskResponse::bound_for(&limits)) => reserved,
            () = token.cancelled() => return (Outcome::failed(Failure::Cancelled), None),
        };
        tracing::debug!(%peer, task = %id, "running");
        (
            node.pool().run(job, peer.to_string(), token.clone()).await,
            Some(reserved),
        )
    };
    tokio::pin!(run);
    let (outcome, mut reserved) = tokio::select! {
        ran = &mut run => ran,
        () = node.inner.shutdown.cancelled() => {
            token.cancel();
            return (TaskResponse::Refused(Refusal::ShuttingDown), None);
        }
        // The owner has needed the machine for long enough: the requester
        // is better served elsewhere.
        () = node.governor().paused_for(hand_back, arrived) => {
            token.cancel();
            // What it did before the pause, if it reached a worker: the
            // cancel takes it from the worker (or kills it) within
            // seconds.
            let (outcome, _) = run.await;
            let why = format!(
                "it waited {} while the host was paused ({})",
                spare_core::units::format_duration(hand_back),
                node.governor().status().reason
            );
            if ran(&outcome) {
                tracing::info!(%peer, task = %id, "handed back: {why}");
                let ending = Ending {
                    fuel: outcome.fuel,
                    wall_ms: outcome.wall_ms,
                    ..Ending::failed(format!("handed back: {why}"))
                };
                log_err(node.ledger().hosted_finished(&record, &ending, None).await);
            } else if REFUSALS_LOGGED.allow() {
                // Never run, like a refusal: not recorded (see above).
                tracing::info!(%peer, task = %id, "handed back before it ran: {why}");
            }
            return (TaskResponse::Refused(Refusal::HandedBack(why)), None);
        }
    };
    // The answer needs room for this output, not for the most it could be.
    let output = outcome.stdout.len().saturating_add(outcome.stderr.len());
    if let Some(reserved) = &mut reserved {
        reserved.keep(output.saturating_add(TaskResponse::SMALL_BYTES));
    }
    let receipt = Receipt {
        task: id,
        requester: peer,
        host: node.peer_id(),
        module,
        fuel: outcome.fuel,
        wall_ms: outcome.wall_ms,
        exit_code: outcome.exit_code(),
        finished_ms: spare_core::now_ms(),
    };
    let signed = match SignedReceipt::sign(&receipt, &node.inner.key) {
        Ok(signed) => signed,
        Err(e) => {
            let refusal = Refusal::Unavailable(e.to_string());
            return (TaskResponse::Refused(refusal), None);
        }
    };
    // Durable before the requester hears of it; a task cancelled before
    // it reached a worker ran nothing, and is not recorded (see above).
    if ran(&outcome) {
        log_err(
            node.ledger()
                .hosted_finished(
                    &record,
                    &Ending::of(&outcome),
                    Some((receipt, signed.clone())),
                )
                .await,
        );
    }
    tracing::debug!(%peer, task = %id, status = ?outcome.status, fuel = outcome.fuel, "hosted task finished");
    // The output goes back to the requester: bytes moved for the swarm,
    // paced by the upload bucket like the blob chunks this node serves.
    // A requester that has gone gets no answer: its bytes are not paced,
    // and not counted.
    node.upload()
        .take_until(output as u64, token.cancelled())
        .await;
    let report = Report {
        task: id,
        outcome,
        receipt: signed,
    };
    (TaskResponse::Done(report), reserved)
}

/// Whether a task reached a worker: one cancelled before it did reports
/// no time at all.
fn ran(outcome: &Outcome) -> bool {
    !(outcome.fuel == 0
        && outcome.wall_ms == 0
        && matches!(outcome.status, Status::Failed(Failure::Cancelled)))
}

/// How many refusals a minute are logged at `info`; more go to `debug`,
/// since peers cause them at will.
static REFUSALS_LOGGED: LogBudget = LogBudget::new(20);

/// The most memory the specs of the tasks a host has taken may hold at
/// once (args, env, inline stdin: up to about 1.1 MiB each); one requester
/// may hold half of it.
pub const MAX_ADMITTED_BYTES: usize = 64 << 20;

/// Registers a task to host, or says why not: the host's queue is full, the
/// requester already holds its share of it (in tasks, or in the memory
/// their specs take, `bytes` being this one's), or the task id is in use.
fn admit(
    node: &Node,
    record: &Hosted,
    bytes: usize,
    token: &CancellationToken,
) -> Result<(), Refusal> {
    let (peer, task) = (record.requester, record.task);
    let slots = node.pool().stats().slots;
    let queue = node.config().queue as usize;
    let mut hosted = node.lock(&node.inner.hosted);
    if node.inner.shutdown.is_cancelled() {
        return Err(Refusal::ShuttingDown);
    }
    // This task would wait if every slot is taken; it may if the queue has room.
    let waiting = (hosted.len() + 1).saturating_sub(slots);
    if waiting > queue {
        return Err(Refusal::Busy {
            queued: u32::try_from(waiting - 1).unwrap_or(u32::MAX),
        });
    }
    // One requester may hold at most half of what this host can take, so it
    // cannot crowd out everyone else.
    let share = ((slots + queue) / 2).max(slots);
    let (mut mine, mut held, mut held_mine) = (0, bytes, bytes);
    for ((requester, _), entry) in hosted.iter() {
        held += entry.bytes;
        if *requester == peer {
            mine += 1;
            held_mine += entry.bytes;
        }
    }
    if mine >= share || held > MAX_ADMITTED_BYTES || held_mine > MAX_ADMITTED_BYTES / 2 {
        return Err(Refusal::Busy {
            queued: u32::try_from(waiting.saturating_sub(1)).unwrap_or(u32::MAX),
        });
    }
    // Every task this node runs leaves a receipt in its database, which
    // the disk budget holds too: past its share, no more.
    let blobs = node.blobs();
    if blobs.state_bytes() > blobs.budget() / 2 {
        return Err(Refusal::Unavailable(
            "its database fills its share of the owner's disk budget".into(),
        ));
    }
    // Not the task's fault (a Run sent again over a new connection can
    // meet its first copy still ending here): the requester tries another
    // host.
    if hosted.contains_key(&(peer, task)) {
        return Err(Refusal::Unavailable(format!(
            "task {task} is already running here"
        )));
    }
    hosted.insert(
        (peer, task),
        HostedEntry {
            record: record.clone(),
            token: token.clone(),
            bytes,
        },
    );
    Ok(())
}

/// Removes a hosted task from the registry however serving it ends.
struct Registered<'a> {
    node: &'a Node,
    key: (PeerId, spare_core::TaskId),
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.node.lock(&self.node.inner.hosted).remove(&self.key);
    }
}

/// Fetches what the task needs from its requester, paced by this node's
/// download bucket, and builds the job; the returned pins keep its blobs in
/// the store for as long as they are held.
async fn prepare(
    node: &Node,
    peer: PeerId,
    spec: TaskSpec,
) -> Result<(Job, Vec<BlobPin>), Refusal> {
    let task = spec.id;
    let unavailable = |e: BlobError| match e {
        // The requester's own fetches in progress hold its share of the
        // disk budget: busy, not the task's fault, so the requester tries
        // another host (or this one later) without using up an attempt.
        //
        // So does a store filled by what running tasks and fetches hold
        // (the blob itself would fit): room comes back as they end.
        BlobError::ShareTaken { .. } => {
            tracing::debug!(%peer, %task, "busy: {e}");
            Refusal::Busy {
                queued: queued(node),
            }
        }
        BlobError::NoRoom { size, budget, .. }
            if size.saturating_add(node.blobs().state_bytes()) <= budget =>
        {
            tracing::debug!(%peer, %task, "busy: {e}");
            Refusal::Busy {
                queued: queued(node),
            }
        }
        e => Refusal::BlobUnavailable(spare_core::outcome::clip_detail(e.to_string())),
    };
    let (blobs, net, bucket) = (node.blobs(), node.net(), node.download());
    // The module stays pinned while room is made for the stdin.
    let mut pins = vec![
        blobs
            .fetch(net, peer, spec.module, bucket)
            .await
            .map_err(unavailable)?,
    ];
    if let Stdin::Blob(blob) = &spec.stdin {
        pins.push(
            blobs
                .fetch(net, peer, *blob, bucket)
                .await
                .map_err(unavailable)?,
        );
    }
    Ok((job_for(spec, blobs), pins))
}

/// How many of the tasks this host has taken wait for a slot, besides the
/// one asking: what a busy refusal tells its requester.
fn queued(node: &Node) -> u32 {
    let slots = node.pool().stats().slots;
    let hosted = node.lock(&node.inner.hosted).len();
    u32::try_from(hosted.saturating_sub(1).saturating_sub(slots)).unwrap_or(u32::MAX)
}

/// The job that runs `spec` with blobs from `blobs` (which must hold them).
pub(crate) fn job_for(spec: TaskSpec, blobs: &BlobStore) -> Job {
    Job {
        task: spec.id,
        module: spec.module.id,
        module_path: blobs.path(&spec.module.id),
        name: spec.name,
        args: spec.args,
        env: spec.env,
        stdin: match spec.stdin {
            Stdin::Empty => JobStdin::Bytes(Vec::new()),
            Stdin::Inline(bytes) => JobStdin::Bytes(bytes),
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
    reply: BlobResponder,
) {
    let id = request.id;
    let charged = node.may_fetch(&peer, &id, request.len);
    let granted = charged.is_some();
    let (response, held) = answer_blob(node.blobs(), node.upload(), peer, request, granted).await;
    // Only bytes sent count against the grant: a `Busy` answer, or a last
    // chunk shorter than asked, gives back the rest of what was counted.
    if let Some(charged) = charged {
        let sent = match &response {
            BlobResponse::Chunk { data, .. } => u64::try_from(data.len()).unwrap_or(u64::MAX),
            _ => 0,
        };
        node.unfetch(&peer, &id, charged.saturating_sub(sent));
    }
    // The chunk's bytes count against the serving budget until the peer
    // has taken them.
    let held = held.map(|permit| Box::new(permit) as spare_net::Held);
    reply.send_holding(response, held).await;
}

/// The answer to `peer`'s request for a chunk, and the room its bytes hold
/// in the node's serving budget ([`crate::blobs::MAX_SERVING_BYTES`]),
/// taken before the chunk is read and to be held until it is sent. With
/// the budget taken the peer is answered `Busy` at once, and asks again
/// later; a peer not `granted` the blob is answered `NotFound`.
async fn answer_blob(
    blobs: &BlobStore,
    upload: &TokenBucket,
    peer: PeerId,
    request: BlobRequest,
    granted: bool,
) -> (BlobResponse, Option<ServingPermit>) {
    if !granted {
        tracing::debug!(%peer, blob = %request.id, "refused a blob the peer was not granted");
        return (BlobResponse::NotFound, None);
    }
    let Some(permit) = blobs.serving_permit(peer, request.len) else {
        tracing::debug!(%peer, blob = %request.id, "busy: serving as many chunks as it may");
        return (BlobResponse::Busy, None);
    };
    let response = match blobs
        .load_chunk(request.id, request.offset, request.len)
        .await
    {
        Ok((total, data)) => {
            // Paced by this node's upload bucket, shared by every chunk it
            // sends.
            upload.take(data.len() as u64).await;
            BlobResponse::Chunk { total, data }
        }
        Err(e) => {
            tracing::warn!(%peer, blob = %request.id, "cannot read a granted blob: {e}");
            BlobResponse::NotFound
        }
    };
    (response, Some(permit))
}

fn log_err<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(e) = result {
        tracing::error!("ledger: {e}");
    }
}

#[cfg(test)]
mod tests {
    use spare_core::wire::MAX_BLOB_CHUNK;

    use super::*;
    use crate::blobs::{MAX_SERVING_BYTES, MAX_SERVING_BYTES_PER_PEER, MIN_SERVING_CHARGE};

    #[tokio::test]
    async fn chunks_are_served_within_the_serving_budget() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let id = blobs.put(b"hello world").unwrap();
        let upload = TokenBucket::new(None);
        let request = |offset, len| BlobRequest { id, offset, len };
        let peer = PeerId::random();

        // Served as asked, all of it when the blob has it; the room is held
        // until the answer is sent.
        let (response, held) = answer_blob(&blobs, &upload, peer, request(6, 3), true).await;
        assert_eq!(
            response,
            BlobResponse::Chunk {
                total: 11,
                data: b"wor".to_vec()
            }
        );
        assert!(held.is_some());
        drop(held);
        assert_eq!(upload.moved(), 3);

        // A peer not granted the blob takes none of the budget.
        let (response, held) =
            answer_blob(&blobs, &upload, PeerId::random(), request(0, 5), false).await;
        assert_eq!(response, BlobResponse::NotFound);
        assert!(held.is_none());

        // Asking for a byte at a time is charged as for more: a peer
        // cannot have millions of reads in flight within its share.
        let tiny: Vec<_> = (0..MAX_SERVING_BYTES_PER_PEER / MIN_SERVING_CHARGE)
            .map(|_| blobs.serving_permit(peer, 1).unwrap())
            .collect();
        assert!(blobs.serving_permit(peer, 1).is_none());
        drop(tiny);

        // A peer that holds its share (replies it does not read) is told
        // it is busy; others are still served.
        let hog: Vec<_> = (0..MAX_SERVING_BYTES_PER_PEER / u64::from(MAX_BLOB_CHUNK))
            .map(|_| blobs.serving_permit(peer, MAX_BLOB_CHUNK).unwrap())
            .collect();
        let (response, held) = answer_blob(&blobs, &upload, peer, request(0, 5), true).await;
        assert_eq!(response, BlobResponse::Busy);
        assert!(held.is_none());
        let (response, _) =
            answer_blob(&blobs, &upload, PeerId::random(), request(0, 5), true).await;
        assert!(matches!(response, BlobResponse::Chunk { .. }));

        // With the node's whole budget held, everyone is told so, without
        // a read or a wait on the upload bucket.
        let mut rest = Vec::new();
        while let Some(permit) = blobs.serving_permit(PeerId::random(), MAX_BLOB_CHUNK) {
            rest.push(permit);
        }
        assert_eq!(
            (hog.len() + rest.len()) as u64 * u64::from(MAX_BLOB_CHUNK),
            MAX_SERVING_BYTES
        );
        let moved = upload.moved();
        let (response, _) =
            answer_blob(&blobs, &upload, PeerId::random(), request(0, 5), true).await;
        assert_eq!(response, BlobResponse::Busy);
        assert_eq!(upload.moved(), moved);

        // Once chunks are sent, their room serves the next.
        drop(rest);
        let (response, _) = answer_blob(&blobs, &upload, peer, request(0, 5), true).await;
        assert_eq!(response, BlobResponse::Busy, "still its whole share");
        drop(hog);
        let (response, _) = answer_blob(&blobs, &upload, peer, request(0, 5), true).await;
        assert!(matches!(response, BlobResponse::Chunk { .. }));
    }
}
