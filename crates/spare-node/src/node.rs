//! The node: the parts of a daemon wired together, and the tasks that keep
//! them talking.
//!
//! [`Node::start`] opens the ledger and blob store, starts the worker pool and
//! the network, and spawns two background tasks: one that dispatches network
//! events (`host` serves inbound tasks and blob chunks), one
//! that publishes this node's offer when its load changes. All of them stop
//! when the node's shutdown token fires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use spare_core::wire::{Offer, Runtime};
use spare_core::{BlobId, BlobRef, TaskId};
use spare_ledger::Ledger;
use spare_net::{NetConfig, NetEvent, NetHandle, Transport};
use spare_policy::cgroup::{self, Cgroups};
use spare_policy::{EnforcementReport, Governor, GovernorConfig, TokenBucket};
use spare_runtime::{PoolConfig, WorkerCommand, WorkerPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobStore;
use crate::config::Config;
use crate::paths::Paths;
use crate::{NodeError, host};

/// How often the offer loop looks at the pool's load, and so the most
/// often an offer is published: requesters correct offers between
/// publications with their own in-flight counts.
const OFFER_CHECK: Duration = Duration::from_millis(250);
/// An unchanged offer is re-published this often, so newcomers and peers
/// that missed one converge.
const OFFER_REFRESH: Duration = Duration::from_secs(5);

/// Everything needed to start a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub paths: Paths,
    pub config: Config,
    pub key: Keypair,
    /// How to start a worker process (normally `spare worker`).
    pub worker: WorkerCommand,
    pub transport: Transport,
}

/// A running node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) key: Keypair,
    pub(crate) peer_id: PeerId,
    pub(crate) paths: Paths,
    pub(crate) config: Config,
    pub(crate) net: NetHandle,
    pub(crate) pool: WorkerPool,
    pub(crate) ledger: Ledger,
    pub(crate) blobs: BlobStore,
    /// Decides when guests run; see `spare_policy::governor`.
    pub(crate) governor: Governor,
    /// The workers' control groups, when limits are enforced by them.
    pub(crate) cgroups: Option<Cgroups>,
    /// Paces the bytes sent to and received from peers for the swarm.
    pub(crate) upload: Arc<TokenBucket>,
    pub(crate) download: Arc<TokenBucket>,
    /// Tasks we host, by (requester, task), so only their requester can
    /// cancel them. They reach the ledger when they end.
    pub(crate) hosted: Mutex<HashMap<(PeerId, TaskId), HostedEntry>>,
    /// Tasks we requested and that are still running.
    pub(crate) requested: Mutex<HashMap<TaskId, CancellationToken>>,
    /// Blobs each peer may fetch from us: those of tasks we sent it, counted
    /// per task, with the bytes it may still fetch of each.
    pub(crate) grants: Mutex<Grants>,
    /// Task requests we sent to each peer and that are unanswered.
    pub(crate) in_flight: Mutex<HashMap<PeerId, u32>>,
    /// Hosts that failed our tasks lately, ranked after the others.
    pub(crate) standing: Mutex<spare_scheduler::Standing>,
    /// Cancelled first when the node stops: hosted tasks answer that the
    /// host is shutting down, and nothing new is taken.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled last, once those answers have left: the network and all.
    pub(crate) root: CancellationToken,
    pub(crate) started: Instant,
}

/// How long a stopping node waits for its hosted tasks to answer.
const DRAIN: Duration = Duration::from_secs(2);
/// How long it then gives the last answers to leave.
const ANSWER_FLUSH: Duration = Duration::from_millis(100);

impl Node {
    /// Starts every part of the node.
    pub async fn start(
        options: NodeOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, NodeError> {
        let NodeOptions {
            paths,
            config,
            key,
            worker,
            transport,
        } = options;
        let ledger = Ledger::open(&paths.db).map_err(|source| NodeError::Database {
            path: paths.db.display().to_string(),
            source,
        })?;
        let blobs =
            BlobStore::open(&paths.blobs, blob_budget(config.policy.disk)).map_err(|e| {
                NodeError::Io {
                    what: format!("cannot open blob store {}", paths.blobs.display()),
                    source: e,
                }
            })?;
        let peer_id = key.public().to_peer_id();
        let (cgroups, mut enforcement, duty_cycle) = enforce(&config, &peer_id)?;
        // A start that fails from here on leaves no control group behind.
        let undo = |pool: Option<&WorkerPool>| {
            if let Some(pool) = pool {
                pool.close();
            }
            if let Some(groups) = &cgroups {
                groups.remove();
            }
        };
        let pool = match WorkerPool::start(PoolConfig {
            command: worker,
            slots: usize::from(config.slots()),
            join: cgroups.as_ref().map(|g| g.join.clone()).unwrap_or_default(),
        })
        .await
        {
            Ok(pool) => pool,
            Err(e) => {
                undo(None);
                return Err(e.into());
            }
        };
        if let Some(priority) = pool.priority() {
            // What the OS refused the workers, and what stands in for it.
            if priority.policy != spare_runtime::priority::CpuPolicy::Idle {
                enforcement.notes.push(format!(
                    "SCHED_IDLE was refused; workers run at nice {} instead",
                    priority.nice
                ));
            }
            if !priority.idle_io {
                enforcement
                    .notes
                    .push("the idle I/O class was refused; workers keep the default".into());
            }
        }
        if let Some(confinement) = pool.confinement() {
            // What the kernel did not allow: a guest that broke out of
            // wasmtime would have more than it should.
            for note in confinement.notes {
                enforcement.notes.push(format!("workers: {note}"));
            }
        }
        enforcement.notes.extend(config.warnings());
        if let Some(note) = disk_beyond_free(&config, &paths.blobs, blobs.used()) {
            enforcement.notes.push(note);
        }
        for note in &enforcement.notes {
            tracing::warn!("{note}");
        }
        let governor = Governor::start(
            pool.clone(),
            GovernorConfig {
                policy: config.policy.clone(),
                machine: config.machine,
                enforcement,
                duty_cycle,
                proc: "/proc".into(),
                power_supply: spare_policy::machine::POWER_SUPPLY.into(),
            },
        )
        .map_err(|e| {
            undo(Some(&pool));
            NodeError::Io {
                what: "cannot start the governor thread".into(),
                source: e,
            }
        })?;
        // The swarm is large; keep it off this future's stack frame.
        let (net, events) = Box::pin(spare_net::start(
            NetConfig {
                keypair: key.clone(),
                listen: config.listen.clone(),
                bootstrap: config.bootstrap.clone(),
                mdns: config.mdns,
                transport,
                answer_budget: spare_net::answer_budget(
                    pool.stats().slots,
                    spare_core::wire::TaskResponse::bound_for(&config.max_limits),
                ),
            },
            shutdown.child_token(),
        ))
        .await
        .inspect_err(|_| {
            governor.stop();
            undo(Some(&pool));
        })?;
        let (upload, download) = (config.policy.upload, config.policy.download);
        let node = Node {
            inner: Arc::new(Inner {
                peer_id,
                key,
                paths,
                config,
                net,
                pool,
                ledger,
                blobs,
                governor,
                cgroups,
                upload: Arc::new(TokenBucket::new(upload)),
                download: Arc::new(TokenBucket::new(download)),
                hosted: Mutex::default(),
                requested: Mutex::default(),
                grants: Mutex::default(),
                in_flight: Mutex::default(),
                standing: Mutex::default(),
                shutdown: shutdown.child_token(),
                root: shutdown,
                started: Instant::now(),
            }),
        };
        tokio::spawn(node.clone().dispatch_events(events));
        tokio::spawn(node.clone().publish_offers());
        tokio::spawn(node.clone().sweep_compiled_modules());
        Ok(node)
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    pub fn net(&self) -> &NetHandle {
        &self.inner.net
    }

    pub fn pool(&self) -> &WorkerPool {
        &self.inner.pool
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    pub fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn governor(&self) -> &Governor {
        &self.inner.governor
    }

    pub fn upload(&self) -> &TokenBucket {
        &self.inner.upload
    }

    pub fn download(&self) -> &TokenBucket {
        &self.inner.download
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Stops the node: hosted tasks first, which answer their requesters
    /// that this host is shutting down (so they go elsewhere at once rather
    /// than see a broken connection), then, once those answers have left or
    /// after `DRAIN`, the background tasks and the network.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.governor.stop();
        let deadline = Instant::now() + DRAIN;
        while !self.lock(&self.inner.hosted).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A hosted task leaves the table before its answer is written.
        tokio::time::sleep(ANSWER_FLUSH).await;
        self.inner.root.cancel();
    }

    /// After [`Node::shutdown`]: stops the workers and removes their control
    /// groups. Blocking; waits up to a second or two.
    pub fn release(&self) {
        self.inner.pool.close();
        if let Some(groups) = &self.inner.cgroups {
            groups.remove();
        }
    }

    /// Routes network events: inbound requests each get a task of their own.
    async fn dispatch_events(self, mut events: mpsc::Receiver<NetEvent>) {
        loop {
            let event = tokio::select! {
                biased;
                () = self.inner.shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            match event {
                NetEvent::TaskRequest {
                    peer,
                    request,
                    reply,
                } => {
                    tokio::spawn(host::serve_task(self.clone(), peer, request, reply));
                }
                NetEvent::BlobRequest {
                    peer,
                    request,
                    reply,
                } => {
                    tokio::spawn(host::serve_blob(self.clone(), peer, request, reply));
                }
            }
        }
    }

    /// Keeps the compiled-module cache within its share of the disk budget,
    /// and tells the blob store how much of its share the database takes.
    async fn sweep_compiled_modules(self) {
        let budget = self.inner.config.policy.disk - blob_budget(self.inner.config.policy.disk);
        let mut tick = tokio::time::interval(CACHE_SWEEP);
        loop {
            tokio::select! {
                biased;
                () = self.inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // The database is part of the disk budget too.
            let db = self.inner.paths.db.clone();
            let state = tokio::task::spawn_blocking(move || state_bytes(&db)).await;
            let state = state.unwrap_or(0);
            self.blobs().set_state_bytes(state);
            if state > self.blobs().budget() / 2 {
                tracing::warn!(
                    "the database takes {} of the disk budget's {}: this node hosts no \
                     more tasks until the budget (`disk`) is raised",
                    spare_core::units::format_bytes(state),
                    spare_core::units::format_bytes(self.blobs().budget()),
                );
            }
            let root = self.inner.paths.cache.clone();
            let swept =
                tokio::task::spawn_blocking(move || spare_runtime::cache::sweep(&root, budget))
                    .await;
            match swept {
                Ok(Ok((_, 0))) => {}
                Ok(Ok((left, removed))) => {
                    tracing::debug!(removed, left, "compiled-module cache swept");
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Ok(Err(e)) => tracing::warn!("cannot sweep the compiled-module cache: {e}"),
                Err(e) => tracing::error!("cache sweep failed: {e}"),
            }
        }
    }

    /// Publishes this node's offer when its load changes, and periodically.
    async fn publish_offers(self) {
        let mut seq = first_offer_seq(std::time::SystemTime::now());
        let mut last: Option<(Offer, Instant)> = None;
        let mut tick = tokio::time::interval(OFFER_CHECK);
        loop {
            tokio::select! {
                biased;
                () = self.inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A node that started paused (outside its time windows, on
            // battery) must not first offer to give.
            if !self.inner.governor.decided() {
                continue;
            }
            let offer = self.offer(seq + 1);
            let unchanged = last.as_ref().is_some_and(|(prev, at)| {
                prev.cores == offer.cores
                    && prev.idle == offer.idle
                    && prev.queued == offer.queued
                    && prev.paused == offer.paused
                    && at.elapsed() < OFFER_REFRESH
            });
            if unchanged {
                continue;
            }
            seq += 1;
            self.inner.net.publish_offer(offer.clone()).await;
            last = Some((offer, Instant::now()));
        }
    }

    /// What this node can give now: nothing while paused, and why, so no
    /// requester sends work here that would only wait.
    pub fn offer(&self, seq: u64) -> Offer {
        let stats = self.inner.pool.stats();
        let paused = self.inner.governor.pause();
        let cores = if paused.is_none() {
            u16::try_from(stats.slots).unwrap_or(u16::MAX)
        } else {
            0
        };
        let busy = u16::try_from(stats.running).unwrap_or(u16::MAX);
        Offer {
            cores,
            idle: cores.saturating_sub(busy),
            queued: u32::try_from(stats.queued).unwrap_or(u32::MAX),
            memory: self.inner.config.max_limits.memory,
            runtimes: vec![Runtime::Wasm],
            max_limits: self.inner.config.max_limits,
            seq,
            paused,
        }
    }

    /// Tasks hosted now, newest first, as the ledger will record them.
    pub fn running_hosted(&self) -> Vec<spare_ledger::HostedTask> {
        let mut running: Vec<spare_ledger::HostedTask> = self
            .lock(&self.inner.hosted)
            .values()
            .map(|entry| spare_ledger::HostedTask {
                task: entry.record.task.to_string(),
                requester: entry.record.requester.to_string(),
                module: entry.record.module.to_string(),
                started_ms: entry.record.started_ms,
                finished_ms: None,
                state: spare_ledger::TaskState::Running,
                exit_code: None,
                failure: None,
                fuel: None,
                wall_ms: None,
            })
            .collect();
        running.sort_by_key(|t| std::cmp::Reverse(t.started_ms));
        running
    }

    /// Lets `peer` fetch `blobs` until [`Node::revoke`] with the same list.
    pub(crate) fn grant(&self, peer: PeerId, blobs: &[BlobRef]) {
        self.lock(&self.inner.grants).grant(peer, blobs);
    }

    pub(crate) fn revoke(&self, peer: PeerId, blobs: &[BlobRef]) {
        self.lock(&self.inner.grants).revoke(peer, blobs);
    }

    /// Whether `peer` may fetch `len` bytes of `blob`, and what was
    /// counted for them; see [`Grants::may_fetch`].
    pub(crate) fn may_fetch(&self, peer: &PeerId, blob: &BlobId, len: u32) -> Option<u64> {
        self.lock(&self.inner.grants).may_fetch(peer, blob, len)
    }

    /// Gives back `bytes` of what [`Node::may_fetch`] counted, not sent.
    pub(crate) fn unfetch(&self, peer: &PeerId, blob: &BlobId, bytes: u64) {
        self.lock(&self.inner.grants).unfetch(peer, blob, bytes);
    }

    /// Peers we have unanswered task requests with, and how many.
    pub(crate) fn in_flight(&self) -> HashMap<PeerId, u32> {
        self.lock(&self.inner.in_flight).clone()
    }

    /// Counts an attempt on `host` in its standing: a clean run (`served`)
    /// forgives one of its failures; else it is a failure.
    pub(crate) fn judge(&self, host: PeerId, served: bool) {
        let mut standing = self.lock(&self.inner.standing);
        if served {
            standing.served(&host, Instant::now());
        } else {
            let strikes = standing.failed(host, Instant::now());
            tracing::debug!(%host, strikes, "host failed a task");
        }
    }

    /// The failures of `peer` remembered now, and for how much longer.
    pub fn standing(&self, peer: &PeerId) -> Option<(u32, Duration)> {
        let now = Instant::now();
        let (strikes, until) = self.lock(&self.inner.standing).of(peer, now)?;
        Some((strikes, until.duration_since(now)))
    }

    pub(crate) fn lock<'a, T>(&self, mutex: &'a Mutex<T>) -> MutexGuard<'a, T> {
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sequence number below this daemon's first offer: the wall clock in
/// microseconds. A node publishes a few offers a second at most, so a
/// daemon started later numbers its offers above any its predecessor
/// published, and peers do not take a replay of an old offer, which
/// gossip may deliver late or a peer may repeat, for its latest one.
fn first_offer_seq(now: std::time::SystemTime) -> u64 {
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX / 2)
        })
}

/// How many times over a peer may fetch each blob of a task we sent it,
/// while it holds the task: an honest host fetches each once, so a host
/// cannot make this node upload a blob without end.
pub(crate) const GRANT_FETCHES: u64 = 2;

/// The blobs each peer may fetch from us: those of tasks we sent it, while
/// it holds them, each at most [`GRANT_FETCHES`] times over.
#[derive(Debug, Default)]
pub(crate) struct Grants(HashMap<PeerId, HashMap<BlobId, Grant>>);

/// What a peer may fetch of one blob: granted by the tasks we sent it that
/// need the blob, and bytes it may still fetch.
#[derive(Debug, Default)]
struct Grant {
    tasks: u32,
    bytes: u64,
}

impl Grants {
    fn grant(&mut self, peer: PeerId, blobs: &[BlobRef]) {
        let entry = self.0.entry(peer).or_default();
        for blob in blobs {
            let grant = entry.entry(blob.id).or_default();
            grant.tasks += 1;
            grant.bytes = grant
                .bytes
                .saturating_add(blob.size.max(1).saturating_mul(GRANT_FETCHES));
        }
    }

    fn revoke(&mut self, peer: PeerId, blobs: &[BlobRef]) {
        if let Some(entry) = self.0.get_mut(&peer) {
            for blob in blobs {
                if let Some(grant) = entry.get_mut(&blob.id) {
                    grant.tasks -= 1;
                    if grant.tasks == 0 {
                        entry.remove(&blob.id);
                    }
                }
            }
            if entry.is_empty() {
                self.0.remove(&peer);
            }
        }
    }

    /// Whether `peer` may fetch `len` bytes of `blob`: if so, what its
    /// grant allows of them is counted, and returned, until
    /// [`Grants::unfetch`] gives back what was not sent. A chunk is allowed
    /// while any bytes are left (at most one chunk's excess).
    fn may_fetch(&mut self, peer: &PeerId, blob: &BlobId, len: u32) -> Option<u64> {
        let grant = self.0.get_mut(peer)?.get_mut(blob)?;
        if grant.bytes == 0 {
            return None;
        }
        let counted = grant.bytes.min(u64::from(len));
        grant.bytes -= counted;
        Some(counted)
    }

    /// Gives back `bytes` counted by [`Grants::may_fetch`] that were not
    /// sent (a busy answer, a last chunk shorter than asked), if the grant
    /// still stands.
    fn unfetch(&mut self, peer: &PeerId, blob: &BlobId, bytes: u64) {
        if let Some(grant) = self.0.get_mut(peer).and_then(|blobs| blobs.get_mut(blob)) {
            grant.bytes = grant.bytes.saturating_add(bytes);
        }
    }
}

/// How often the compiled-module cache is brought back within its budget.
const CACHE_SWEEP: Duration = Duration::from_secs(30);

/// The bytes the database at `db` takes on disk, with its WAL and index.
fn state_bytes(db: &std::path::Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let mut path = db.as_os_str().to_owned();
            path.push(suffix);
            std::fs::metadata(path).ok().map(|m| m.len())
        })
        .sum()
}

/// The blob store's part of the disk budget; the rest (a quarter) is for
/// compiled modules, which take about as much as their modules.
pub(crate) fn blob_budget(disk: u64) -> u64 {
    disk - disk / 4
}

/// Memory a worker needs beyond its guest's: wasmtime, compiled code,
/// buffers. A memory cgroup holds the guests' budget plus this per worker.
pub const WORKER_OVERHEAD: u64 = 64 << 20;

/// Sets up what enforces the CPU share and the memory budget: a cgroup
/// where one can be made (or must be, with `enforcement = "cgroup"`), the
/// fallback otherwise. Returns the groups, the report for `spare status`,
/// and whether the governor must run the CPU duty cycle.
fn enforce(
    config: &Config,
    peer: &PeerId,
) -> Result<(Option<Cgroups>, EnforcementReport, bool), NodeError> {
    use spare_core::units::format_bytes;
    use spare_policy::Enforcement;
    let policy = &config.policy;
    let (cores, slots) = (config.machine.cores, config.slots());
    let throttled = policy.throttled(cores);
    let millicores = policy.cpu_millicores(cores);
    // A cgroup holds the workers to what the owner gives whenever that is
    // less than the machine: not only a share below the slots (the
    // fallback's duty cycle), but also `cores` below the machine's, which
    // a worker's compiler threads would otherwise pass.
    let quota = millicores < u64::from(cores) * 1000;
    let share = format!("{:.2} cores", millicores as f64 / 1000.0);
    let per_guest = format!(
        "the sandbox's limit of {} per guest, {slots} at once",
        format_bytes(config.max_limits.memory)
    );
    let attempt = match policy.enforcement {
        Enforcement::Fallback => {
            Err("enforcement = \"fallback\" (config or --enforcement)".to_owned())
        }
        Enforcement::Auto | Enforcement::Cgroup => cgroup::setup(
            &peer.to_string(),
            cgroup::Limits {
                cpu_quota_us: quota.then_some(millicores * cgroup::CPU_PERIOD_US / 1000),
                memory: policy.memory + u64::from(slots) * WORKER_OVERHEAD,
            },
        ),
    };
    match attempt {
        Ok(groups) => {
            let dir = groups
                .dirs
                .first()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            let report = EnforcementReport {
                mechanism: format!("cgroup {}", groups.version),
                cpu: if quota {
                    format!("cgroup CPU quota of {share} and idle scheduling ({dir})")
                } else {
                    format!("cgroup idle scheduling ({dir})")
                },
                memory: if groups.memory_in_group {
                    format!(
                        "cgroup memory limit of {} for all workers, and {per_guest}",
                        format_bytes(policy.memory + u64::from(slots) * WORKER_OVERHEAD)
                    )
                } else {
                    per_guest
                },
                notes: groups.warnings.clone(),
            };
            Ok((Some(groups), report, false))
        }
        Err(why) if policy.enforcement == Enforcement::Cgroup => Err(NodeError::Enforcement(
            format!("enforcement = \"cgroup\", but no cgroup can be used: {why}"),
        )),
        Err(why) => Ok((
            None,
            EnforcementReport {
                mechanism: "fallback".into(),
                cpu: if throttled {
                    format!("SCHED_IDLE and a duty cycle of the workers to {share}")
                } else {
                    "SCHED_IDLE".into()
                },
                memory: per_guest,
                notes: vec![format!("no cgroup: {why}")],
            },
            throttled,
        )),
    }
}

/// A task this node is hosting now.
#[derive(Debug)]
pub(crate) struct HostedEntry {
    pub(crate) record: spare_ledger::Hosted,
    /// Cancels it.
    pub(crate) token: CancellationToken,
    /// What its spec holds in memory ([`TaskSpec::held_bytes`]).
    ///
    /// [`TaskSpec::held_bytes`]: spare_core::TaskSpec::held_bytes
    pub(crate) bytes: usize,
}

/// Counts a request to a peer for as long as it is outstanding.
pub(crate) struct InFlight {
    node: Node,
    peer: PeerId,
}

impl InFlight {
    pub(crate) fn start(node: &Node, peer: PeerId) -> Self {
        *node.lock(&node.inner.in_flight).entry(peer).or_insert(0) += 1;
        Self {
            node: node.clone(),
            peer,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.node.lock(&self.node.inner.in_flight);
        if let Some(count) = map.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// A warning when the owner's `disk` budget is more than the blobs hold now
/// and what is free on their file system together: that fills first, and
/// blobs are then refused before the budget is reached.
fn disk_beyond_free(config: &Config, blobs: &std::path::Path, held: u64) -> Option<String> {
    let (_, free) = crate::config::filesystem_space(blobs)?;
    let room = free.saturating_add(held);
    (config.policy.disk > room).then(|| {
        format!(
            "disk = {} is more than the blobs hold and the file system has free ({}): \
             when it fills, blobs are refused before the budget is reached",
            spare_core::units::format_bytes(config.policy.disk),
            spare_core::units::format_bytes(room)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host may fetch a blob of a task it holds twice over, and nothing
    /// once the task is back.
    #[test]
    fn a_host_fetches_a_granted_blob_a_bounded_number_of_times() {
        let mut grants = Grants::default();
        let (host, other) = (PeerId::random(), PeerId::random());
        let blob = BlobRef {
            id: BlobId::of(b"m"),
            size: 3 << 20,
        };
        let chunk = 1 << 20;
        assert_eq!(
            grants.may_fetch(&host, &blob.id, chunk),
            None,
            "not granted yet"
        );
        grants.grant(host, &[blob]);
        let fetched = std::iter::repeat_with(|| grants.may_fetch(&host, &blob.id, chunk))
            .take(10)
            .filter(Option::is_some)
            .count();
        assert_eq!(fetched, 6, "twice the blob's three chunks");
        assert_eq!(grants.may_fetch(&other, &blob.id, chunk), None);
        // What was counted but not sent (a busy answer) is given back, and
        // no more than was counted.
        grants.unfetch(&host, &blob.id, 100);
        assert_eq!(grants.may_fetch(&host, &blob.id, chunk), Some(100));
        grants.unfetch(&host, &blob.id, 100);
        assert_eq!(grants.may_fetch(&host, &blob.id, chunk), Some(100));
        assert_eq!(grants.may_fetch(&host, &blob.id, chunk), None);
        // A second task needing it allows as much again, and holds the
        // grant while the first is revoked.
        grants.grant(host, &[blob, blob]);
        grants.revoke(host, &[blob]);
        assert!(grants.may_fetch(&host, &blob.id, chunk).is_some());
        grants.revoke(host, &[blob, blob]);
        assert_eq!(grants.may_fetch(&host, &blob.id, chunk), None);
        assert!(grants.0.is_empty());
    }

    /// A daemon restarted after an hour of publishing ten offers a second
    /// still numbers its offers above its predecessor's.
    #[test]
    fn a_restarted_node_numbers_its_offers_above_its_last_run() {
        let start = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let last_of_first_run = first_offer_seq(start) + 3600 * 10;
        let restart = start + Duration::from_secs(3600);
        assert!(first_offer_seq(restart) + 1 > last_of_first_run);
        assert_eq!(
            first_offer_seq(std::time::UNIX_EPOCH - Duration::from_secs(1)),
            0
        );
    }

    #[test]
    fn a_disk_budget_beyond_the_free_space_and_the_blobs_is_warned_of() {
        let dir = tempfile::tempdir().unwrap();
        let (_, free) = crate::config::filesystem_space(dir.path()).unwrap();
        let mut config = Config::default();
        config.policy.disk = free + (10 << 30);
        let note = disk_beyond_free(&config, dir.path(), 0).unwrap();
        assert!(note.contains("more than the blobs hold and the file system has free"));
        // Blobs already held count: their room is the node's already.
        assert_eq!(disk_beyond_free(&config, dir.path(), 20 << 30), None);
    }
}
