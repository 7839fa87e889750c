//! The requester side: placing a task on the best peer, retrying elsewhere
//! when a host fails, and reporting progress as [`TaskEvent`]s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use spare_core::limits::LimitError;
use spare_core::wire::{Pause, Refusal, Report, TaskRequest, TaskResponse};
use spare_core::{
    BlobId, BlobRef, Failure, Limit, LimitRequest, Limits, Outcome, Receipt, SignedReceipt, Stdin,
    TaskId, TaskSpec,
};
use spare_ledger::Ending;
use spare_scheduler::{AttemptError, Candidate, RetryPolicy, grants_more, place};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::types::{Placement, Submission, SubmitStdin, TaskEvent, TaskResult};
use crate::blobs::BlobPin;
use crate::host::job_for;
use crate::node::{InFlight, Node};

/// How long to wait for a first peer with an offer before giving up, when
/// the node has just started or the swarm is just forming.
const PEER_WAIT: Duration = Duration::from_secs(5);
/// A host that keeps its connection and answers pings but never answers a
/// task is given this long on top of the task's wall-time limit: blob
/// transfer and compilation are not on the guest's clock, and the task may
/// wait in the host's queue. Hosts that vanish are noticed much sooner, by
/// their connection or their pings.
const ATTEMPT_GRACE: Duration = Duration::from_secs(10 * 60);
/// How long a cancel request to a host may take, and how often it is sent.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);
const CANCEL_TRIES: u32 = 3;
/// The pause before a cancel is sent again after an answer that was not
/// its acknowledgement (a host too loaded to read it, say), doubled each
/// time.
const CANCEL_PAUSE: Duration = Duration::from_millis(100);
/// How long a cancelled task's host has, once it confirmed the cancel, to
/// answer the run with what the guest used until then (and its receipt):
/// longer than the host's own grace for its worker.
const CANCEL_REPORT_GRACE: Duration = Duration::from_secs(5);
/// Offers older than this are not trusted for placement: their node stopped
/// publishing (offers are refreshed every 5 s).
const OFFER_MAX_AGE: Duration = Duration::from_secs(15);
/// How often a requester looks at the offer of a host that holds one of its
/// tasks, to tell its user when that host pauses.
const PAUSE_WATCH: Duration = Duration::from_millis(250);
/// How long a host may hold a task before refusing it for want of room,
/// besides the time the task's blobs and request take at the slowest rate
/// a fetch may go (`MIN_FETCH_RATE`): an honest host says so on arrival,
/// or while it fetches the task's blobs. A host that holds a task longer,
/// then calls itself busy, has kept it from running elsewhere, and that
/// counts as its failure.
const LATE_REFUSAL: Duration = Duration::from_secs(60);
/// How long a task waits for a peer to give when every connected peer gives
/// nothing right now (paused, outside its time windows).
const GIVING_WAIT: Duration = Duration::from_secs(10 * 60);
/// How long a task waits for room when the hosts it is sent to are busy
/// (their queues, or this node's share of them, full): as long as for a
/// peer to give. The host is asked again after a pause that doubles from
/// [`BUSY_PAUSE_FIRST`] up to [`BUSY_PAUSE_MAX`], or another is chosen.
const BUSY_WAIT: Duration = GIVING_WAIT;
const BUSY_PAUSE_FIRST: Duration = Duration::from_millis(100);
const BUSY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Why a submission was refused before it ran anywhere.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("the module {0} has not been uploaded (PUT /v1/blobs/{0})")]
    MissingModule(BlobId),
    #[error("the stdin blob {0} has not been uploaded")]
    MissingStdin(BlobId),
}

/// A checked submission, ready to [`start`].
#[derive(Debug)]
pub struct Prepared {
    /// The task, with the limits wanted (defaults where none were set).
    pub spec: TaskSpec,
    pub placement: Placement,
    /// What the user set; the defaults in `spec` may be lowered to fit the
    /// chosen host.
    pub limits: LimitRequest,
    /// The task's own blobs stay in the store, whatever room fetches for
    /// other requesters need, from the check that they are there until the
    /// task ends.
    pins: Vec<BlobPin>,
}

/// Checks a submission and turns it into a task spec.
pub async fn prepare(node: &Node, submission: &Submission) -> Result<Prepared, SubmitError> {
    // Pinned before they are checked, so they are still there when the
    // task starts.
    let mut pins = vec![node.blobs().pin(&submission.module.id)];
    if let SubmitStdin::Blob(blob) = &submission.stdin {
        pins.push(node.blobs().pin(&blob.id));
    }
    let stdin = match &submission.stdin {
        SubmitStdin::None => Stdin::Empty,
        SubmitStdin::Inline(text) => {
            let bytes = crate::api::types::decode_b64(text).map_err(SubmitError::Invalid)?;
            let stdin = Stdin::for_bytes(&bytes);
            // Inline input above the inline bound travels as a blob.
            if let Stdin::Blob(blob) = stdin {
                pins.push(node.blobs().pin(&blob.id));
                let store = node.clone();
                tokio::task::spawn_blocking(move || store.blobs().put_verified(&blob.id, &bytes))
                    .await
                    .map_err(|e| SubmitError::Invalid(e.to_string()))?
                    .map_err(|e| SubmitError::Invalid(e.to_string()))?;
            }
            stdin
        }
        SubmitStdin::Blob(blob) => {
            check_size(node, "stdin", blob, SubmitError::MissingStdin)?;
            Stdin::Blob(*blob)
        }
    };
    check_size(
        node,
        "module",
        &submission.module,
        SubmitError::MissingModule,
    )?;
    node.blobs().mark_used(submission.module.id).await;
    let spec = TaskSpec {
        id: TaskId::random(),
        name: submission.name.clone(),
        module: submission.module,
        args: submission.args.clone(),
        env: submission.env.clone(),
        stdin,
        limits: submission.limits.wanted(),
    };
    spec.validate()
        .map_err(|e| SubmitError::Invalid(e.to_string()))?;
    if let Placement::On(peer) = &submission.placement {
        peer.parse::<PeerId>()
            .map_err(|_| SubmitError::Invalid(format!("`{peer}` is not a peer id")))?;
    }
    Ok(Prepared {
        spec,
        placement: submission.placement.clone(),
        limits: submission.limits,
        pins,
    })
}

/// Checks that a blob is stored and that its announced size is the size
/// of the stored blob (one look at the file).
fn check_size(
    node: &Node,
    what: &str,
    blob: &BlobRef,
    missing: fn(BlobId) -> SubmitError,
) -> Result<(), SubmitError> {
    let size = match node.blobs().size(&blob.id) {
        Ok(size) => size,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(blob.id)),
        Err(e) => return Err(SubmitError::Invalid(format!("cannot read the {what}: {e}"))),
    };
    if size != blob.size {
        return Err(SubmitError::Invalid(format!(
            "{what} size {} does not match the uploaded blob ({size} bytes)",
            blob.size
        )));
    }
    Ok(())
}

/// Events buffered per task before the task waits for its client to read.
const EVENT_BUFFER: usize = 16;

/// Starts a prepared task and returns its events, the first of them
/// [`TaskEvent::Accepted`], already queued: the task can be cancelled by
/// its id as soon as the client can know it, and the API answers with the
/// response head and that first event together. The task runs until it
/// ends, its client stops reading, or it is cancelled.
pub fn start(node: &Node, task: Prepared) -> mpsc::Receiver<TaskEvent> {
    let (events, rx) = mpsc::channel(EVENT_BUFFER);
    let token = CancellationToken::new();
    node.lock(&node.inner.requested)
        .insert(task.spec.id, token.clone());
    // The channel is new and has room.
    let _ = events.try_send(TaskEvent::Accepted {
        task: task.spec.id.to_string(),
    });
    tokio::spawn(run(node.clone(), task, token, events));
    rx
}

/// Runs a started task to the end, sending events to `events`. Stops early
/// when `events` is closed (the client went away) or the task is cancelled.
async fn run(
    node: Node,
    task: Prepared,
    token: CancellationToken,
    events: mpsc::Sender<TaskEvent>,
) {
    let Prepared {
        spec,
        placement,
        limits,
        pins: _pins,
    } = task;
    // Not awaited: later writes of this task commit after it in any case.
    node.ledger()
        .task_submitted(&spec.id, &spec.name, &spec.module.id.to_string())
        .detach();
    let closed = events.clone();
    let watch = token.clone();
    // The client closing its stream cancels the task, as Ctrl-C would.
    let watcher = tokio::spawn(async move {
        tokio::select! {
            () = closed.closed() => watch.cancel(),
            () = watch.cancelled() => {}
        }
    });
    let ended = match placement {
        Placement::Local => run_local(&node, &spec, &token).await,
        Placement::On(peer) => match peer.parse::<PeerId>() {
            Ok(peer) => run_remote(&node, &spec, &limits, Some(peer), &token, &events).await,
            Err(_) => Ended::failed(format!("`{peer}` is not a peer id")),
        },
        Placement::Auto => run_remote(&node, &spec, &limits, None, &token, &events).await,
    };
    // Durable before the client hears of it.
    if let Err(e) = node
        .ledger()
        .task_finished(&spec.id, &ended.ending, ended.receipt)
        .await
    {
        tracing::error!("ledger: {e}");
    }
    node.lock(&node.inner.requested).remove(&spec.id);
    watcher.abort();
    let _ = events.send(ended.event).await;
}

/// Cancels a task this node requested. Returns whether it was running.
pub fn cancel(node: &Node, task: &TaskId) -> bool {
    match node.lock(&node.inner.requested).get(task) {
        Some(token) => {
            token.cancel();
            true
        }
        None => false,
    }
}

async fn run_local(node: &Node, spec: &TaskSpec, token: &CancellationToken) -> Ended {
    node.ledger()
        .task_attempt(&spec.id, &node.peer_id())
        .detach();
    // The owner's own task: the policy that keeps the swarm out of the
    // owner's way does not apply to it.
    let outcome = node
        .pool()
        .run_for_owner(job_for(spec.clone(), node.blobs()), token.clone())
        .await;
    Ended::finished(spec, node.peer_id(), 1, &outcome, None)
}

/// How a task ended: the event for the client and the record for the ledger.
struct Ended {
    event: TaskEvent,
    ending: Ending,
    /// The host's verified receipt.
    receipt: Option<(Receipt, SignedReceipt)>,
}

impl Ended {
    fn finished(
        spec: &TaskSpec,
        host: PeerId,
        attempts: u32,
        outcome: &Outcome,
        receipt: Option<(Receipt, SignedReceipt)>,
    ) -> Self {
        let result = TaskResult::new(
            spec.id.to_string(),
            spare_core::peer_text(&host),
            attempts,
            outcome,
            receipt.is_some(),
        );
        Self {
            event: TaskEvent::Finished { result },
            ending: Ending::of(outcome),
            receipt,
        }
    }

    fn failed(error: String) -> Self {
        Self {
            ending: Ending::failed(error.clone()),
            event: TaskEvent::Failed { error },
            receipt: None,
        }
    }

    /// A result kept from an earlier attempt, told after `attempts` in
    /// all.
    fn after(mut self, attempts: u32) -> Self {
        if let TaskEvent::Finished { result } = &mut self.event {
            result.attempts = attempts;
        }
        self
    }

    /// Cancelled before any host ran it.
    fn cancelled() -> Self {
        Self {
            ending: Ending::of(&Outcome::failed(Failure::Cancelled)),
            ..Self::failed("cancelled".into())
        }
    }
}

/// What became of one attempt.
enum Attempt {
    /// The host ran the task (whatever its exit).
    Ran(Box<Report>),
    /// The attempt failed; maybe another host can do better.
    Failed {
        error: AttemptError,
        reason: String,
    },
    Cancelled,
}

async fn run_remote(
    node: &Node,
    spec: &TaskSpec,
    limits: &LimitRequest,
    pinned: Option<PeerId>,
    token: &CancellationToken,
    events: &mpsc::Sender<TaskEvent>,
) -> Ended {
    let policy = RetryPolicy::default();
    let mut tried: Vec<PeerId> = Vec::new();
    // Attempts: placements a busy host refused use up none (see
    // `BUSY_WAIT`) and are not counted, here or in what the user sees.
    let mut attempt = 0u32;
    let mut placed = false;
    let mut room = RoomWait::default();
    // Hosts that were busy or handed the task back: asked again only when
    // no other host can take the task (else one that always says busy
    // would hold every task it attracts), after a pause.
    let mut resting: Vec<PeerId> = Vec::new();
    let mut last_failure = String::new();
    // After a guest hit a default limit lowered to fit its host: that
    // limit, the value it ran with, and how it ended, which stands if no
    // host that grants more can run it.
    let mut more: Option<(Limit, u64)> = None;
    let mut hit_lowered: Option<Ended> = None;
    loop {
        let (host, fitted) = match pinned {
            Some(peer) if peer == node.net().local_peer_id() => {
                return Ended::failed(format!(
                    "peer {peer} is this node; run here with --local instead of --on"
                ));
            }
            Some(peer) => {
                if !node.net().is_connected(&peer) && !wait_for_peer(node, peer, token).await {
                    if token.is_cancelled() {
                        return Ended::cancelled();
                    }
                    return Ended::failed(format!(
                        "peer {peer} is not connected (`spare peers` lists the connected ones)"
                    ));
                }
                // Its offer says what it grants; it may follow the
                // connection by a moment.
                let granted = wait_for_offer(node, peer, token)
                    .await
                    .map(|offer| offer.max_limits);
                (peer, granted.map_or(spec.limits, |max| limits.fitted(&max)))
            }
            None => match choose(node, limits, &tried, more, token, events).await {
                Choice::Host(peer, fitted) => (peer, fitted),
                Choice::Nowhere(why) if !placed => return Ended::failed(why),
                Choice::Nowhere(_) if !resting.is_empty() && !token.is_cancelled() => {
                    let why = format!("no peer can take it now (last: {last_failure})");
                    if !room.wait(token, events, &why).await {
                        return hit_lowered
                            .map(|e| e.after(attempt))
                            .unwrap_or_else(|| room.gave_up(&last_failure));
                    }
                    tried.retain(|peer| !resting.contains(peer));
                    resting.clear();
                    continue;
                }
                Choice::Nowhere(_) if token.is_cancelled() => {
                    return hit_lowered
                        .map(|e| e.after(attempt))
                        .unwrap_or_else(Ended::cancelled);
                }
                Choice::Nowhere(why) => {
                    return hit_lowered.map(|e| e.after(attempt)).unwrap_or_else(|| {
                        Ended::failed(if attempt == 0 {
                            // Every host asked was busy, and has gone.
                            format!("{why} (last: {last_failure})")
                        } else {
                            format!(
                                "gave up after {attempt} attempt(s): {why} \
                                 (last failure: {last_failure})"
                            )
                        })
                    });
                }
            },
        };
        // Cancelled while a host was chosen, or after a report that would
        // have been retried: it goes nowhere else.
        if token.is_cancelled() {
            return hit_lowered
                .map(|e| e.after(attempt))
                .unwrap_or_else(Ended::cancelled);
        }
        attempt += 1;
        placed = true;
        tried.push(host);
        node.ledger().task_attempt(&spec.id, &host).detach();
        let _ = events
            .send(TaskEvent::Placed {
                attempt,
                host: spare_core::peer_text(&host),
                lowered: limits.lowered(&fitted),
            })
            .await;
        // The defaults lowered to what this host grants, if they were.
        let wanted = spec.limits;
        let fitted_spec;
        let spec = if fitted == spec.limits {
            spec
        } else {
            fitted_spec = TaskSpec {
                limits: fitted,
                ..spec.clone()
            };
            &fitted_spec
        };
        let attempted = attempt_on(node, spec, host, token, events).await;
        let receipt = match &attempted {
            Attempt::Ran(report) => verify_receipt(node, spec, host, report)
                .map(|verified| (verified, report.receipt.clone())),
            _ => None,
        };
        judge(node, host, &attempted, receipt.is_some());
        match attempted {
            Attempt::Ran(report) => {
                let outcome = report.outcome;
                // A guest that hit a limit lowered to fit this host may
                // yet succeed on a host that grants more of it.
                let lowered_hit = outcome.failure().and_then(|failure| {
                    let limit = failure.limit()?;
                    let ran_with = limit.of(&fitted);
                    (ran_with < limit.of(&wanted)).then_some((failure, limit, ran_with))
                });
                if let Some((failure, limit, ran_with)) = lowered_hit
                    && pinned.is_none()
                    && policy.should_retry(attempt, AttemptError::Refused)
                    && grants_more(&candidates(node).0, limits, &tried, limit, ran_with)
                {
                    last_failure = format!("{host}: the program {failure}");
                    let reason = format!("the program {failure}, lowered to what that peer grants");
                    retrying(events, attempt, host, &reason).await;
                    more = Some((limit, ran_with));
                    hit_lowered = Some(Ended::finished(spec, host, attempt, &outcome, receipt));
                    continue;
                }
                let host_fault = outcome.failure().is_some_and(Failure::is_retryable);
                if host_fault
                    && pinned.is_none()
                    && policy.should_retry(attempt, AttemptError::HostFault)
                {
                    let failure = outcome
                        .failure()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    retrying(events, attempt, host, &failure).await;
                    last_failure = format!("{host}: {failure}");
                    continue;
                }
                return Ended::finished(spec, host, attempt, &outcome, receipt);
            }
            Attempt::Cancelled => {
                let cancelled = Outcome::failed(Failure::Cancelled);
                return Ended::finished(spec, host, attempt, &cancelled, None);
            }
            Attempt::Failed { error, reason } => {
                tracing::info!(task = %spec.id, %host, "attempt {attempt} failed: {reason}");
                last_failure = format!("{host}: {reason}");
                if error.host_stays_candidate() {
                    resting.push(host);
                }
                if error == AttemptError::Busy {
                    attempt -= 1;
                    node.ledger().task_busy(&spec.id).detach();
                    // A pinned host is the only one: it is waited for here.
                    let why = format!("peer {host} has no room for it now ({reason})");
                    if pinned.is_some() && !room.wait(token, events, &why).await {
                        return room.gave_up(&last_failure);
                    }
                    continue;
                }
                if pinned.is_some() || !policy.should_retry(attempt, error) {
                    if let Some(ended) = hit_lowered {
                        return ended.after(attempt);
                    }
                    return Ended::failed(format!(
                        "gave up after {attempt} attempt(s): {last_failure}"
                    ));
                }
                retrying(events, attempt, host, &reason).await;
            }
        }
    }
}

/// How long a task has waited for room on busy hosts (see [`BUSY_WAIT`]),
/// and the pause before the next try.
struct RoomWait {
    waited: Duration,
    pause: Duration,
    /// Whether the user has been told that the task waits.
    told: bool,
}

impl Default for RoomWait {
    fn default() -> Self {
        Self {
            waited: Duration::ZERO,
            pause: BUSY_PAUSE_FIRST,
            told: false,
        }
    }
}

impl RoomWait {
    /// Pauses before busy hosts are asked again (or until `token` is
    /// cancelled); false, at once, once the task has waited [`BUSY_WAIT`].
    /// The user hears `why` the first time, not at every pause.
    async fn wait(
        &mut self,
        token: &CancellationToken,
        events: &mpsc::Sender<TaskEvent>,
        why: &str,
    ) -> bool {
        if self.waited >= BUSY_WAIT {
            return false;
        }
        if !self.told {
            self.told = true;
            let reason = format!(
                "{why}; asking again for up to {}",
                spare_core::units::format_duration(BUSY_WAIT - self.waited)
            );
            let _ = events.send(TaskEvent::Waiting { reason }).await;
        }
        tokio::select! {
            () = token.cancelled() => {}
            () = tokio::time::sleep(self.pause) => {}
        }
        self.waited += self.pause;
        self.pause = (self.pause * 2).min(BUSY_PAUSE_MAX);
        true
    }

    fn gave_up(&self, last_failure: &str) -> Ended {
        Ended::failed(format!(
            "no host had room for it within {}: {last_failure}",
            spare_core::units::format_duration(BUSY_WAIT)
        ))
    }
}

async fn retrying(events: &mpsc::Sender<TaskEvent>, attempt: u32, host: PeerId, reason: &str) {
    let _ = events
        .send(TaskEvent::Retrying {
            attempt,
            host: host.to_string(),
            reason: reason.to_owned(),
        })
        .await;
}

/// Sends the task to `host` and waits for its answer, the deadline, or a
/// cancellation, telling the user meanwhile when the host gives nothing.
async fn attempt_on(
    node: &Node,
    spec: &TaskSpec,
    host: PeerId,
    token: &CancellationToken,
    events: &mpsc::Sender<TaskEvent>,
) -> Attempt {
    // Cancelled on the way here: a Run sent now could reach the host after
    // its Cancel, which would find nothing to cancel.
    if token.is_cancelled() {
        return Attempt::Cancelled;
    }
    let blobs = blobs_of(spec);
    node.grant(host, &blobs);
    let _in_flight = InFlight::start(node, host);
    let sent = Instant::now();
    let saw_pause = std::sync::atomic::AtomicBool::new(false);
    let deadline = Duration::from_millis(spec.limits.wall_ms) + ATTEMPT_GRACE;
    let request = node.net().send_task(host, TaskRequest::Run(spec.clone()));
    tokio::pin!(request);
    let result = tokio::select! {
        biased;
        () = token.cancelled() => {
            cancel_on(node, host, spec.id).await;
            // The host answers the run with the fuel and time the guest used
            // until it stopped, and signs for them.
            let answer = tokio::time::timeout(CANCEL_REPORT_GRACE, &mut request).await;
            node.revoke(host, &blobs);
            return match answer {
                Ok(Ok(TaskResponse::Done(report))) => match ran(spec, report) {
                    ran @ Attempt::Ran(_) => ran,
                    _ => Attempt::Cancelled,
                },
                _ => Attempt::Cancelled,
            };
        }
        result = tokio::time::timeout(deadline, &mut request) => result,
        never = tell_while_paused(node, host, events, &saw_pause) => match never {},
    };
    node.revoke(host, &blobs);
    match result {
        Err(_) => {
            // The host holds the task past any reasonable time: treat it as
            // gone, and tell it to stop in case it is merely slow.
            cancel_on(node, host, spec.id).await;
            Attempt::Failed {
                error: AttemptError::HostLost,
                reason: format!(
                    "no answer within {}",
                    spare_core::units::format_duration(deadline)
                ),
            }
        }
        // The host never saw the request: as good as a refusal for want
        // of room.
        Ok(Err(e @ spare_net::RequestError::NotAccepted(_))) => Attempt::Failed {
            error: AttemptError::Busy,
            reason: e.to_string(),
        },
        Ok(Err(e)) => Attempt::Failed {
            error: AttemptError::HostLost,
            reason: e.to_string(),
        },
        Ok(Ok(TaskResponse::Done(report))) => ran(spec, report),
        // Every refusal is worth another host, `Invalid` too: the spec
        // passed this node's own checks before it was sent, so a host that
        // calls it invalid runs another version of spare, or lies (and
        // would otherwise fail every task it attracts).
        Ok(Ok(TaskResponse::Refused(refusal))) => {
            let bytes = blobs.iter().map(|b| b.size).sum::<u64>() + spec.held_bytes() as u64;
            let moving = Duration::from_secs(bytes / crate::blobs::MIN_FETCH_RATE);
            refused(
                &refusal,
                sent.elapsed(),
                LATE_REFUSAL + moving,
                saw_pause.load(std::sync::atomic::Ordering::Relaxed),
            )
        }
        Ok(Ok(TaskResponse::Cancelled(_))) => Attempt::Failed {
            error: AttemptError::HostFault,
            reason: "the host answered out of turn".into(),
        },
    }
}

/// What a host's refusal makes of an attempt, the host having held the
/// task for `held` where a busy answer was due within `due` (see
/// [`LATE_REFUSAL`]), its offers having said it paused meanwhile, or not
/// been known, or not.
fn refused(refusal: &Refusal, held: Duration, due: Duration, paused: bool) -> Attempt {
    let (error, reason) = match refusal {
        // Excuses that are not believed: the host kept the task from
        // running elsewhere, or gave it back though its offers never said
        // it paused.
        Refusal::Busy { .. } | Refusal::Overloaded if held > due => (
            AttemptError::HostFault,
            format!(
                "{refusal}, after holding the task for {}",
                spare_core::units::format_duration(held)
            ),
        ),
        Refusal::HandedBack(_) if !paused => (
            AttemptError::HostFault,
            format!("{refusal}, though its offers never said it paused"),
        ),
        Refusal::Busy { .. } | Refusal::Overloaded => (AttemptError::Busy, refusal.to_string()),
        Refusal::HandedBack(_) => (AttemptError::HandedBack, refusal.to_string()),
        _ => (AttemptError::Refused, refusal.to_string()),
    };
    Attempt::Failed { error, reason }
}

/// Counts how an attempt went in the host's standing (see
/// [`spare_scheduler::Standing`]): a run its host's own fault ended, a
/// failure that does not excuse the host, or a report with a bad receipt
/// is a failure; any other run is a clean one. A host that was busy or
/// handed the task back, and a cancelled attempt, count for nothing.
fn judge(node: &Node, host: PeerId, attempt: &Attempt, receipt_good: bool) {
    let served = match attempt {
        Attempt::Ran(report) => {
            receipt_good && !report.outcome.failure().is_some_and(Failure::is_retryable)
        }
        Attempt::Failed { error, .. } if error.host_stays_candidate() => return,
        Attempt::Failed { .. } => false,
        Attempt::Cancelled => return,
    };
    node.judge(host, served);
}

/// A host's report of a run, unless it is for another task or impossible
/// under the task's limits.
fn ran(spec: &TaskSpec, report: Report) -> Attempt {
    if report.task != spec.id {
        return Attempt::Failed {
            error: AttemptError::HostFault,
            reason: "the host answered for another task".into(),
        };
    }
    if let Err(why) = plausible(spec, &report.outcome) {
        return Attempt::Failed {
            error: AttemptError::HostFault,
            reason: format!("the host reported an impossible outcome ({why})"),
        };
    }
    Attempt::Ran(Box::new(report))
}

/// Tells `host` to stop `task`, a few times if it does not answer. (A host
/// also stops our tasks when we disconnect.)
async fn cancel_on(node: &Node, host: PeerId, task: TaskId) {
    for attempt in 0..CANCEL_TRIES {
        let cancel = node.net().send_task(host, TaskRequest::Cancel(task));
        match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
            Ok(Ok(TaskResponse::Cancelled(_))) => return,
            Ok(Err(spare_net::RequestError::ConnectionClosed)) => return,
            // Not asked again at once: what kept it from the cancel may
            // pass in a moment.
            Ok(_) if attempt + 1 < CANCEL_TRIES => {
                tokio::time::sleep(CANCEL_PAUSE * 2u32.pow(attempt)).await;
            }
            _ => {}
        }
    }
    tracing::warn!(%host, %task, "the host did not confirm the cancel");
}

fn blobs_of(spec: &TaskSpec) -> Vec<BlobRef> {
    let mut blobs = vec![spec.module];
    if let Stdin::Blob(blob) = &spec.stdin {
        blobs.push(*blob);
    }
    blobs
}

/// Whether an outcome is possible under the limits the task ran with; a
/// host claiming more is lying or broken.
fn plausible(spec: &TaskSpec, outcome: &Outcome) -> Result<(), &'static str> {
    let limits = &spec.limits;
    // A host's watchdog kills a worker this long past the limit (time it
    // may spend compiling); its clock is the guest's, pauses not counted.
    let wall_allowance = limits
        .wall_ms
        .saturating_add(spare_runtime::WATCHDOG_GRACE.as_millis() as u64);
    if outcome.fuel > limits.fuel {
        Err("more fuel than the limit")
    } else if outcome.wall_ms > wall_allowance {
        Err("more wall time than the limit")
    } else if outcome.stdout.len() as u64 > limits.output
        || outcome.stderr.len() as u64 > limits.output
    {
        Err("more output than the limit")
    } else {
        Ok(())
    }
}

/// Verifies the host's receipt against the task it came with. A bad receipt
/// is logged and dropped; the outcome is still the host's.
fn verify_receipt(node: &Node, spec: &TaskSpec, host: PeerId, report: &Report) -> Option<Receipt> {
    let receipt = match report.receipt.verify() {
        Ok(receipt) => receipt,
        Err(e) => {
            tracing::warn!(%host, task = %spec.id, "bad receipt: {e}");
            return None;
        }
    };
    let outcome = &report.outcome;
    let matches = receipt.host == host
        && receipt.task == spec.id
        && receipt.requester == node.peer_id()
        && receipt.module == spec.module.id
        && receipt.fuel == outcome.fuel
        && receipt.wall_ms == outcome.wall_ms
        && receipt.exit_code == outcome.exit_code();
    if !matches {
        tracing::warn!(%host, task = %spec.id, "receipt does not match the task it came with");
        return None;
    }
    Some(receipt)
}

/// Where a task goes next, with the limits it runs with there, or why
/// nowhere.
enum Choice {
    Host(PeerId, Limits),
    Nowhere(String),
}

/// Picks the best peer for `spec` that has not been `tried`. Right after
/// start-up peers may still be connecting, so an empty swarm is waited for
/// briefly; peers that give nothing right now (paused by their owners,
/// outside their time windows) are waited for up to [`GIVING_WAIT`], and
/// the requester is told.
async fn choose(
    node: &Node,
    limits: &LimitRequest,
    tried: &[PeerId],
    more: Option<(Limit, u64)>,
    token: &CancellationToken,
    events: &mpsc::Sender<TaskEvent>,
) -> Choice {
    let started = Instant::now();
    let mut told = false;
    loop {
        let (mut candidates, pauses) = candidates(node);
        // Only a host that grants more of a limit the guest already hit.
        if let Some((limit, than)) = more {
            candidates.retain(|c| limit.of(&limits.fitted(&c.max_limits)) > than);
        }
        if let Some((host, fitted)) = place(&candidates, limits, tried) {
            return Choice::Host(host, fitted);
        }
        let least = limits.least();
        if token.is_cancelled() {
            return Choice::Nowhere("cancelled".into());
        }
        let untried: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !tried.contains(&c.peer))
            .collect();
        // Why each untried peer would refuse the limits, if it would. `rank`
        // found no peer that is untried, gives now and grants them: so every
        // untried peer that grants them gives nothing now.
        let refusals: Vec<(PeerId, LimitError)> = untried
            .iter()
            .filter_map(|c| {
                let refused = least.check_within(&c.max_limits).err();
                refused.map(|e| (c.peer, e))
            })
            .collect();
        let granting: Vec<Option<Pause>> = untried
            .iter()
            .filter(|c| !refusals.iter().any(|(peer, _)| *peer == c.peer))
            .map(|c| pauses.get(&c.peer).copied().flatten())
            .collect();
        let waiting = if untried.is_empty() {
            // No peer at all: wait only for the swarm to come up.
            if !tried.is_empty() || started.elapsed() >= PEER_WAIT {
                return Choice::Nowhere(if tried.is_empty() {
                    "no peer offers to run tasks (`spare peers` shows who is connected; \
                     `spare up --bootstrap <addr>` joins a swarm), or run here with --local"
                        .into()
                } else {
                    "no other peer offers to run it".into()
                });
            }
            None
        } else if !granting.is_empty() {
            let mut reason = giving_nothing(&granting);
            // Those that give now but not these limits are worth naming:
            // lower limits would run at once.
            if let Some((peer, why)) = refusals.first() {
                let verb = if refusals.len() == 1 { "does" } else { "do" };
                reason.push_str(&format!(
                    "; {} more {verb} not grant these limits (peer {peer}: {why})",
                    refusals.len()
                ));
            }
            Some(reason)
        } else {
            return Choice::Nowhere(match refusals.first() {
                Some((peer, why)) => {
                    format!("no connected peer grants these limits (peer {peer}: {why})")
                }
                None => "no connected peer grants these limits".into(),
            });
        };
        if let Some(reason) = waiting {
            if started.elapsed() >= GIVING_WAIT {
                return Choice::Nowhere(format!(
                    "no peer gave within {}: {reason}",
                    spare_core::units::format_duration(GIVING_WAIT)
                ));
            }
            if !told {
                told = true;
                let _ = events.send(TaskEvent::Waiting { reason }).await;
            }
        }
        tokio::select! {
            () = token.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Tells the user each time `host`, which holds the task, starts giving
/// nothing (its owner took the machine back, or it is outside its time
/// windows): the task waits there rather than in silence. A task pinned to
/// a paused host is told at once; one placed on a host that pauses later,
/// when its offer says so. Notes in `saw_pause` that it did, or that its
/// offer was not known. Never returns: the answer ends the wait.
async fn tell_while_paused(
    node: &Node,
    host: PeerId,
    events: &mpsc::Sender<TaskEvent>,
    saw_pause: &std::sync::atomic::AtomicBool,
) -> std::convert::Infallible {
    let mut told = false;
    loop {
        match offer_of(node, &host) {
            Some(offer) if offer.cores > 0 => told = false,
            // No recent offer: it may have paused unseen.
            None => saw_pause.store(true, std::sync::atomic::Ordering::Relaxed),
            Some(offer) if !told => {
                told = true;
                saw_pause.store(true, std::sync::atomic::Ordering::Relaxed);
                let why = offer.paused.unwrap_or(Pause::Other).describe();
                let reason = format!(
                    "peer {host} gives nothing right now ({why}); the task waits there, \
                     and comes back if the peer stays paused"
                );
                let _ = events.send(TaskEvent::Waiting { reason }).await;
            }
            _ => {}
        }
        tokio::time::sleep(PAUSE_WATCH).await;
    }
}

/// The connected peers with a recent offer, as placement sees them, and
/// why each that gives nothing now does not.
fn candidates(node: &Node) -> (Vec<Candidate>, HashMap<PeerId, Option<Pause>>) {
    let in_flight = node.in_flight();
    let standing = |peer: &PeerId| node.standing(peer).map_or(0, |(strikes, _)| strikes);
    let mut pauses = HashMap::new();
    let candidates = node
        .net()
        .peers()
        .into_iter()
        .filter_map(|p| {
            let (offer, at) = p.offer?;
            if at.elapsed() > OFFER_MAX_AGE {
                return None;
            }
            pauses.insert(p.peer, offer.paused);
            Some(Candidate {
                peer: p.peer,
                cores: offer.cores,
                idle: offer.idle,
                queued: offer.queued,
                in_flight: in_flight.get(&p.peer).copied().unwrap_or(0),
                rtt: p.rtt,
                max_limits: offer.max_limits,
                strikes: standing(&p.peer),
            })
        })
        .collect();
    (candidates, pauses)
}

/// The latest offer of a connected `peer`, if it is recent enough to
/// trust.
fn offer_of(node: &Node, peer: &PeerId) -> Option<spare_core::wire::Offer> {
    let info = node.net().peer(peer)?;
    let (offer, at) = info.offer?;
    (at.elapsed() <= OFFER_MAX_AGE).then_some(offer)
}

/// Why the peers that would take a task give nothing now, from the causes
/// their offers state: `3 connected peers give nothing right now (2 owner
/// active, 1 on battery)`.
fn giving_nothing(pauses: &[Option<Pause>]) -> String {
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for pause in pauses {
        let why = pause.unwrap_or(Pause::Other).describe();
        match counts.iter_mut().find(|(seen, _)| *seen == why) {
            Some((_, n)) => *n += 1,
            None => counts.push((why, 1)),
        }
    }
    // One cause needs no count.
    let causes: Vec<String> = match counts.as_slice() {
        [(why, _)] => vec![(*why).to_owned()],
        _ => counts.iter().map(|(why, n)| format!("{n} {why}")).collect(),
    };
    let (peers, give) = if pauses.len() == 1 {
        ("peer", "gives")
    } else {
        ("peers", "give")
    };
    format!(
        "{} connected {peers} {give} nothing right now ({})",
        pauses.len(),
        causes.join(", ")
    )
}

/// Waits up to [`PEER_WAIT`] for a connected `peer`'s offer.
async fn wait_for_offer(
    node: &Node,
    peer: PeerId,
    token: &CancellationToken,
) -> Option<spare_core::wire::Offer> {
    let give_up = Instant::now() + PEER_WAIT;
    loop {
        let offer = offer_of(node, &peer);
        if offer.is_some() || Instant::now() >= give_up || token.is_cancelled() {
            return offer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits briefly for a pinned peer to connect.
async fn wait_for_peer(node: &Node, peer: PeerId, token: &CancellationToken) -> bool {
    let give_up = Instant::now() + PEER_WAIT;
    while Instant::now() < give_up && !token.is_cancelled() {
        if node.net().is_connected(&peer) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_says_why_each_peer_gives_nothing() {
        let cases: [(&[Option<Pause>], &str); 3] = [
            (
                &[Some(Pause::OutsideWindows)],
                "1 connected peer gives nothing right now (outside its time windows)",
            ),
            (
                &[Some(Pause::OwnerActive), Some(Pause::OwnerActive)],
                "2 connected peers give nothing right now (owner active)",
            ),
            (
                &[
                    Some(Pause::OwnerActive),
                    None,
                    Some(Pause::OnBattery),
                    Some(Pause::OwnerActive),
                ],
                "4 connected peers give nothing right now \
                 (2 owner active, 1 paused by its owner, 1 on battery)",
            ),
        ];
        for (pauses, said) in cases {
            assert_eq!(giving_nothing(pauses), said);
        }
    }

    #[test]
    fn outcomes_beyond_what_a_host_could_honestly_report_are_refused() {
        let mut spec = spare_core::TaskSpec {
            id: spare_core::TaskId::random(),
            name: "t".into(),
            module: spare_core::BlobRef::of(b"m"),
            args: vec![],
            env: vec![],
            stdin: Stdin::Empty,
            limits: spare_core::Limits::DEFAULT,
        };
        spec.limits.wall_ms = 5_000;
        spec.limits.fuel = 1_000;
        spec.limits.output = 10;
        let grace = spare_runtime::WATCHDOG_GRACE.as_millis() as u64;
        let honest = Outcome {
            fuel: 1_000,
            wall_ms: 5_000 + grace,
            stdout: vec![0; 10],
            ..Outcome::failed(spare_core::Failure::Cancelled)
        };
        assert_eq!(plausible(&spec, &honest), Ok(()));
        type Inflate = fn(&mut Outcome);
        let cases: [(Inflate, &str); 3] = [
            (|o| o.fuel += 1, "more fuel than the limit"),
            (|o| o.wall_ms += 1, "more wall time than the limit"),
            (|o| o.stderr = vec![0; 11], "more output than the limit"),
        ];
        for (inflate, why) in cases {
            let mut lying = honest.clone();
            inflate(&mut lying);
            assert_eq!(plausible(&spec, &lying), Err(why));
        }
    }

    /// A refusal for want of room or a hand-back excuses its host only
    /// when it is believable: soon after the task was sent, and after the
    /// host said it paused.
    #[test]
    fn late_busy_answers_and_unannounced_hand_backs_are_the_hosts_fault() {
        let error = |refusal: Refusal, held_s: u64, paused: bool| match refused(
            &refusal,
            Duration::from_secs(held_s),
            LATE_REFUSAL,
            paused,
        ) {
            Attempt::Failed { error, .. } => error,
            _ => unreachable!("a refusal is a failed attempt"),
        };
        let busy = || Refusal::Busy { queued: 3 };
        let back = || Refusal::HandedBack("paused".into());
        assert_eq!(error(busy(), 1, false), AttemptError::Busy);
        assert_eq!(error(Refusal::Overloaded, 59, false), AttemptError::Busy);
        assert_eq!(error(busy(), 61, true), AttemptError::HostFault);
        assert_eq!(
            error(Refusal::Overloaded, 600, false),
            AttemptError::HostFault
        );
        assert_eq!(error(back(), 600, true), AttemptError::HandedBack);
        assert_eq!(error(back(), 1, false), AttemptError::HostFault);
        assert_eq!(
            error(Refusal::ShuttingDown, 1, false),
            AttemptError::Refused
        );
        let due = LATE_REFUSAL;
        let Attempt::Failed { reason, .. } = refused(&busy(), Duration::from_secs(90), due, false)
        else {
            unreachable!()
        };
        // A task whose blobs take long to fetch gives its host longer.
        let due = LATE_REFUSAL + Duration::from_secs(600);
        assert!(matches!(
            refused(&busy(), Duration::from_secs(600), due, false),
            Attempt::Failed {
                error: AttemptError::Busy,
                ..
            }
        ));
        assert!(
            reason.ends_with("after holding the task for 90 s"),
            "{reason}"
        );
    }
}
