//! The agent's life: the tailer on the blocking pool, one task per store, the admin server.
//!
//! - **The tailer thread** ([`Shutdown::spawn_blocking`]) polls the [`Tailer`], routes each
//!   record ([`route`](crate::route)) and hands it to its stores' queues (bounded,
//!   [`QUEUE_CAPACITY`] messages, handed over in chunks of at most [`CHUNK`]: one per store
//!   and poll, or more for a large poll) without waiting: one store, or two or none by the shoot's
//!   lifecycle state, whose acknowledgements meet in the [`Fanout`] before a checkpoint
//!   moves. With `kubernetes:` set, shoot namespaces are not read until the `Cluster`
//!   resources were listed ([`watch`]), at most `kubernetes.sync_timeout`. When a store's queue is full, the records
//!   that did not fit are held, in order, and the files routed to that store are not read
//!   ([`Tailer::poll_except`]) until the held records went in: the files are the buffer, and
//!   the files of every other store go on being read. Memory per store is its queue, its
//!   policy's two batches and what one poll read from its files. It applies the
//!   acknowledgements the store tasks send back and persists checkpoints by the tailer's own
//!   rule (every second, and at the end).
//! - **A store task** per target (the seed, and each shoot namespace as its first line
//!   appears) owns its [`Policy`] and [`Client`]: a dead or slow store delays only its own
//!   lines. A store's queue is closed after [`STORE_IDLE`] without a line, or after a reload
//!   changed the config, unless lines wait in front of it; its task then sends what it holds
//!   and ends. One task per store at a time: a new queue's task starts once the retired one
//!   ended (the fan-out relies on a store acknowledging a file's lines in order), so a store
//!   that cannot deliver keeps its successor waiting, and its files with it.
//! - **Shutdown**: on SIGTERM readiness goes false and the tailer stops reading; each store
//!   task sends what it holds (batches as they come due) and ends once idle, or when the
//!   grace ([`SHUTDOWN_GRACE`]) is over; the tailer applies the last acknowledgements and
//!   persists the checkpoints. What was not acknowledged is read again after the restart.

use std::collections::hash_map::Entry;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::admin::{AdminServer, Endpoints, Health};
use agentkit::reload::{Options as ReloadOptions, Reloader};
use agentkit::Shutdown;
use prometheus::{IntCounter, Registry};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Config, Delivery, Store};
use crate::deliver::{Ack, Full, Item, Outcome, Policy};
use crate::fanout::Fanout;
use crate::lifecycle::watch::{self, Snapshot};
use crate::lifecycle::Stores;
use crate::metrics::Metrics;
use crate::push::{send_due, Client};
use crate::route::{self, Lifecycle, Router, Target};
use crate::tail::{Record, TailError, Tailer};
use crate::FastMap;

/// Messages a store's queue holds at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Messages handed to a store's queue at once: one channel operation carries up to this many
/// lines instead of one each.
pub const CHUNK: usize = 256;
/// How long the tailer thread waits for an acknowledgement when a poll read nothing.
pub const IDLE_POLL: Duration = Duration::from_millis(50);
/// How often the config file is checked for a change (SIGHUP reloads at once).
pub const RELOAD_POLL: Duration = Duration::from_secs(10);
/// How long a shoot store may go without a line before its task is ended.
pub const STORE_IDLE: Duration = Duration::from_secs(600);
/// How often the lag and checkpoint-age gauges are set.
const GAUGES_INTERVAL: Duration = Duration::from_secs(1);
/// How often idle stores are looked for.
const RETIRE_CHECK: Duration = Duration::from_secs(10);
/// The environment variable whose value is the `nodename` label when `input.node_name` is
/// not set (the chart fills it from the pod's `spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";
/// How long the stores may take to send what they hold after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Why the agent could not start or stopped on its own.
#[derive(Debug, Error)]
pub enum RunError {
    /// The admin address could not be bound.
    #[error("admin address {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The tailer could not start (its checkpoint directory).
    #[error("tailer: {0}")]
    Tailer(#[from] TailError),
    /// The Kubernetes client could not be made (the kubeconfig).
    #[error("kubernetes: {0:#}")]
    Kubernetes(anyhow::Error),
    /// A task of the agent panicked.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a store's queue carries: an entry, or a malformed line's checkpoint.
#[derive(Debug, Clone)]
enum Message {
    Entry(Item),
    Ack(Ack),
}

/// A store's acknowledgement, back to the tailer thread.
#[derive(Debug, Clone, Copy)]
struct Acked {
    ack: Ack,
    from: Stores,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    admin: SocketAddr,
    reload: ReloadHandle,
    tailer: tokio::task::JoinHandle<Result<(), TailError>>,
    shutdown: Shutdown,
}

impl Agent {
    /// The admin server's address (useful with port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// A handle to reload the agent's config.
    pub fn reloader(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Waits for the shutdown (SIGTERM, or the caller's `stop_accepting`), drains within
    /// [`SHUTDOWN_GRACE`] and returns once the checkpoints are persisted.
    pub async fn wait(self, grace: Duration) -> Result<(), RunError> {
        let drain = {
            let shutdown = self.shutdown.clone();
            async move { shutdown.drain(grace).await }
        };
        let (tailed, _) = tokio::join!(self.tailer, drain);
        Ok(tailed??)
    }
}

/// Reloads a running agent's config.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    /// The running config's restart-only parts.
    running: Arc<Config>,
    reloads: std_mpsc::Sender<Arc<Config>>,
}

impl ReloadHandle {
    /// Applies a reloaded config: the stores and delivery settings (stores started from now
    /// on use them; running ones deliver what they hold with the old settings, then end; an
    /// equal config changes nothing). A change of `admin`, `input` or `kubernetes` needs a
    /// restart and is refused, naming the section.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        for (section, same) in [
            ("admin", config.admin == self.running.admin),
            ("input", config.input == self.running.input),
            ("kubernetes", config.kubernetes == self.running.kubernetes),
        ] {
            if !same {
                return Err(format!("{section} changed: it needs a restart"));
            }
        }
        self.reloads
            .send(Arc::new(config))
            .map_err(|_| "the agent is stopping".to_owned())
    }
}

/// Starts the agent of `config` on `shutdown`: binds the admin address, opens the
/// checkpoints, starts the tailer and the seed's store.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Agent, RunError> {
    let registry = Registry::new();
    let metrics = Metrics::new(&registry);
    let health = Health::default();
    let admin = AdminServer::bind(config.admin, Endpoints::standard(registry, health.clone()))
        .map_err(|source| RunError::Admin {
            addr: config.admin,
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(|source| RunError::Admin {
        addr: config.admin,
        source,
    })?;
    shutdown.spawn(admin.serve(shutdown.clone()));
    let input = config.input.clone();
    let tailer = shutdown
        .spawn_blocking(move || Tailer::new(&input))
        .await??;
    {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        shutdown.clone().spawn(async move {
            shutdown.stopping().await;
            health.set_ready(false);
        });
    }
    let node = config.input.node_name.clone().or_else(|| {
        std::env::var(NODE_NAME_ENV)
            .ok()
            .filter(|name| !name.is_empty())
    });
    let (lifecycle, sync_deadline, router) = match &config.kubernetes {
        None => (
            None,
            None,
            Router::new(Lifecycle::EveryShootReady, Default::default(), node),
        ),
        Some(k) => {
            let client = agentkit::kube::client(k.kubeconfig.as_deref(), "kubernetes.kubeconfig")
                .await
                .map_err(RunError::Kubernetes)?;
            let (tx, rx) = tokio::sync::watch::channel(None);
            shutdown.spawn(watch::run(client, tx, shutdown.clone(), metrics.clone()));
            (
                Some(rx),
                Some(Instant::now() + k.sync_timeout),
                Router::new(Lifecycle::Waiting, k.routing, node),
            )
        }
    };
    let config = Arc::new(config);
    let (reloads_tx, reloads) = std_mpsc::channel();
    let reload = ReloadHandle {
        running: config.clone(),
        reloads: reloads_tx,
    };
    let looper = TailLoop {
        tailer,
        router,
        reloads,
        generation: 0,
        lifecycle,
        sync_deadline,
        fanout: Fanout::new(),
        stores: FastMap::default(),
        draining: FastMap::default(),
        config,
        shutdown: shutdown.clone(),
        metrics,
    };
    health.set_ready(true);
    info!(admin = %admin_addr, "log-shipper started");
    let tailer = shutdown.spawn_blocking(move || looper.run());
    Ok(Agent {
        admin: admin_addr,
        reload,
        tailer,
        shutdown,
    })
}

/// Runs the agent until `shutdown` and its drain: what the binary does. With `config_path`,
/// reloads the file on SIGHUP and when it changes ([`RELOAD_POLL`]).
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let agent = start(config, shutdown.clone()).await?;
    if let Some(path) = config_path {
        let initial = tokio::fs::read(&path).await.ok();
        let loader =
            agentkit::reload::file_loader(path, initial, |text| Ok(Config::from_yaml(text)?));
        match Reloader::spawn(&shutdown, ReloadOptions::new(Some(RELOAD_POLL)), loader) {
            Ok(reloader) => {
                let handle = agent.reloader();
                shutdown.spawn(reloader.apply_each(move |loaded| {
                    handle.reload(loaded.map_err(|e| format!("{e:#}"))?)
                }));
            }
            Err(error) => warn!(%error, "cannot watch for reloads"),
        }
    }
    agent.wait(SHUTDOWN_GRACE).await
}

/// One store as the tailer thread sees it.
struct StoreQueue {
    /// Chunks of at most [`CHUNK`] messages, [`QUEUE_CAPACITY`] messages in all.
    tx: mpsc::Sender<Vec<Message>>,
    /// This poll's messages, not handed over yet ([`StoreQueue::hand_over`]).
    gathered: Vec<Message>,
    /// `log_shipper_entries_routed_total` and `log_shipper_malformed_lines_total` of its kind
    /// of store.
    routed: IntCounter,
    malformed: IntCounter,
    /// Messages that did not fit the queue, in order; while not empty the store's files are
    /// not read.
    held: VecDeque<Message>,
    /// When it was last given a line.
    last_used: Instant,
    /// The config generation it was started with.
    generation: u64,
    /// Set by its task when it ends.
    ended: Arc<AtomicBool>,
    /// Its task, until the retired task of the same store ended: two tasks of one store at
    /// once would acknowledge a file's lines out of order, which the fan-out relies on.
    unstarted: Option<StoreTask>,
}

impl StoreQueue {
    /// Moves held messages into the queue while it has room; true when none is left.
    fn flush_held(&mut self) -> bool {
        while !self.held.is_empty() {
            let n = self.held.len().min(CHUNK);
            let chunk: Vec<Message> = self.held.drain(..n).collect();
            if !self.try_send(chunk) {
                return false;
            }
        }
        true
    }

    /// Queues `m` behind everything given before.
    fn send(&mut self, m: Message) {
        if !self.held.is_empty() {
            self.held.push_back(m);
            return;
        }
        self.gathered.push(m);
        if self.gathered.len() == CHUNK {
            self.hand_over();
        }
    }

    /// Hands the gathered messages to the queue, or holds them if it is full.
    fn hand_over(&mut self) {
        if !self.gathered.is_empty() {
            let chunk = std::mem::replace(&mut self.gathered, Vec::with_capacity(CHUNK));
            self.try_send(chunk);
        }
    }

    /// Sends a chunk, or holds it (in front of what is held) if the queue is full; false then.
    fn try_send(&mut self, chunk: Vec<Message>) -> bool {
        match self.tx.try_send(chunk) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(chunk)) => {
                for m in chunk.into_iter().rev() {
                    self.held.push_front(m);
                }
                false
            }
            // The task is gone (it panicked): what it did not take is read again after a
            // restart; until then the files' checkpoints wait for it.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.held.clear();
                true
            }
        }
    }
}

struct TailLoop {
    tailer: Tailer,
    router: Router,
    /// Reloaded configs.
    reloads: std_mpsc::Receiver<Arc<Config>>,
    /// The config's generation: stores of an older one end once they hold nothing.
    generation: u64,
    /// The latest snapshot of the shoots' states, when the lifecycle is followed.
    lifecycle: Option<tokio::sync::watch::Receiver<Option<Snapshot>>>,
    /// When shoot namespaces stop waiting for the first snapshot.
    sync_deadline: Option<Instant>,
    fanout: Fanout,
    stores: FastMap<Target, StoreQueue>,
    /// Tasks of retired stores still sending what they hold, by store.
    draining: FastMap<Target, Arc<AtomicBool>>,
    config: Arc<Config>,
    shutdown: Shutdown,
    metrics: Metrics,
}

impl TailLoop {
    fn run(mut self) -> Result<(), TailError> {
        let (ack_tx, ack_rx) = std_mpsc::channel::<Acked>();
        let mut out: Vec<Record> = Vec::new();
        let mut last = self.tailer.stats();
        let mut last_retire = Instant::now();
        let mut last_gauges = Instant::now();
        while !self.shutdown.is_stopping() {
            self.follow_lifecycle();
            let reloaded = self.follow_reloads();
            self.start_unstarted();
            while let Ok(acked) = ack_rx.try_recv() {
                self.apply(acked);
            }
            let mut seed_paused = false;
            let mut paused: HashSet<Arc<str>> = HashSet::new();
            for (target, q) in &mut self.stores {
                if !q.flush_held() {
                    match target {
                        Target::Seed => seed_paused = true,
                        Target::Shoot(ns) => {
                            paused.insert(ns.clone());
                        }
                    }
                }
            }
            self.metrics
                .paused_stores
                .with_label_values(&["seed"])
                .set(i64::from(seed_paused));
            self.metrics
                .paused_stores
                .with_label_values(&["shoot"])
                .set(paused.len() as i64);
            let router = &self.router;
            let is_paused = |c: &crate::tail::path::Container| {
                if router.waits(&c.namespace) {
                    return true;
                }
                let stores = router.stores(&c.namespace);
                (stores.contains(Stores::SEED) && seed_paused)
                    || (stores.contains(Stores::SHOOT) && paused.contains(c.namespace.as_str()))
            };
            if let Err(error) = self
                .tailer
                .poll_except(Instant::now(), &mut out, &is_paused)
            {
                warn!(%error, kind = error.kind(), "tailer poll failed");
            }
            let read = out.len();
            let polled = Instant::now();
            for record in out.drain(..) {
                self.dispatch(record, polled, &ack_tx);
            }
            for q in self.stores.values_mut() {
                q.hand_over();
            }
            let now = self.tailer.stats();
            self.metrics.tail(&last, &now);
            last = now;
            self.metrics.open_files.set(self.tailer.open_files() as i64);
            self.metrics.files.set(self.tailer.files() as i64);
            if last_gauges.elapsed() >= GAUGES_INTERVAL {
                last_gauges = Instant::now();
                self.metrics.lag(
                    &self.fanout.lag(last_gauges),
                    self.tailer.persisted().map(|t| last_gauges - t),
                );
            }
            if reloaded || last_retire.elapsed() >= RETIRE_CHECK {
                last_retire = Instant::now();
                self.retire_idle();
            }
            if read == 0 {
                if let Ok(acked) = ack_rx.recv_timeout(IDLE_POLL) {
                    self.apply(acked);
                }
            }
        }
        // Stop reading: the queues close, each store task sends what it holds and ends (at
        // the latest when the grace is over), dropping its acknowledgement sender.
        let held: usize = self.stores.values().map(|q| q.held.len()).sum();
        info!(
            stores = self.stores.len(),
            held, "stopped reading; flushing the stores"
        );
        self.stores.clear();
        drop(ack_tx);
        loop {
            match ack_rx.recv_timeout(IDLE_POLL) {
                Ok(acked) => self.apply(acked),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.tailer.persist()?;
        info!("checkpoints persisted");
        Ok(())
    }

    /// Starts the tasks whose store's retired task has ended.
    fn start_unstarted(&mut self) {
        for (target, q) in &mut self.stores {
            if q.unstarted.is_none() {
                continue;
            }
            if self
                .draining
                .get(target)
                .is_none_or(|ended| ended.load(Ordering::Acquire))
            {
                self.draining.remove(target);
                q.start(&self.shutdown);
            }
        }
        self.draining
            .retain(|_, ended| !ended.load(Ordering::Acquire));
    }

    /// Takes a reloaded config, if any (one equal to the running one changes nothing): stores
    /// started from now on use it. True if one came.
    fn follow_reloads(&mut self) -> bool {
        let mut reloaded = false;
        while let Ok(config) = self.reloads.try_recv() {
            if *config == *self.config {
                continue;
            }
            self.config = config;
            self.generation += 1;
            reloaded = true;
        }
        if reloaded {
            info!(
                generation = self.generation,
                "config reloaded; stores restart as they empty"
            );
        }
        reloaded
    }

    /// Takes the latest snapshot of the shoots' states, or gives up waiting for the first.
    fn follow_lifecycle(&mut self) {
        let Some(rx) = &mut self.lifecycle else {
            return;
        };
        // An error: the watch ended (shutdown), and the last states stay in force.
        let latest = match rx.has_changed() {
            Ok(true) => rx.borrow_and_update().clone(),
            Ok(false) | Err(_) => None,
        };
        if let Some(snapshot) = latest {
            self.sync_deadline = None;
            self.router.set_lifecycle(Lifecycle::Known(snapshot));
        } else if self
            .sync_deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.sync_deadline = None;
            warn!(
                "Cluster resources not listed in time; every shoot counts as ready until they are"
            );
            self.router.set_lifecycle(Lifecycle::EveryShootReady);
        }
    }

    /// Hands a record read at `now` to each of its stores (none, one or two) and tells the
    /// fan-out.
    fn dispatch(&mut self, record: Record, now: Instant, acks: &std_mpsc::Sender<Acked>) {
        let route = self.router.route(&record.container);
        let ack = Ack {
            file: record.file,
            offset: record.checkpoint(),
        };
        if let Some(offset) = self.fanout.sent(ack.file, ack.offset, route.stores, now) {
            self.tailer.ack(ack.file, offset);
        }
        if route.stores.is_empty() {
            self.metrics.muted_entries.inc();
            return;
        }
        let message = match record.event {
            Ok(entry) => Message::Entry(Item {
                labels: route.labels,
                timestamp: entry.timestamp,
                // Valid UTF-8 (nearly always) keeps its buffer.
                line: String::from_utf8(entry.content).unwrap_or_else(|invalid| {
                    String::from_utf8_lossy(invalid.as_bytes()).into_owned()
                }),
                ack: Some(ack),
            }),
            Err(_) => Message::Ack(ack),
        };
        let shoot = route.shoot.filter(|_| route.stores.contains(Stores::SHOOT));
        let seed = route.stores.contains(Stores::SEED).then_some(Target::Seed);
        match (shoot, seed) {
            (Some(shoot), Some(seed)) => {
                self.send(shoot, message.clone(), now, acks);
                self.send(seed, message, now, acks);
            }
            (Some(target), None) | (None, Some(target)) => self.send(target, message, now, acks),
            // Only a shoot namespace has a shoot store: the router never routes otherwise.
            (None, None) => {}
        }
    }

    /// Hands a message to `target`'s queue, starting the store on its first line.
    fn send(
        &mut self,
        target: Target,
        message: Message,
        now: Instant,
        acks: &std_mpsc::Sender<Acked>,
    ) {
        let queue = match self.stores.entry(target) {
            Entry::Occupied(q) => q.into_mut(),
            Entry::Vacant(slot) => {
                let mut q = new_store(
                    slot.key(),
                    self.generation,
                    &self.config,
                    &self.metrics,
                    acks.clone(),
                );
                let retired = self.draining.get(slot.key());
                if retired.is_none_or(|ended| ended.load(Ordering::Acquire)) {
                    self.draining.remove(slot.key());
                    q.start(&self.shutdown);
                }
                slot.insert(q)
            }
        };
        match message {
            Message::Entry(_) => queue.routed.inc(),
            Message::Ack(_) => queue.malformed.inc(),
        }
        queue.last_used = now;
        queue.send(message);
    }

    /// Applies a store's acknowledgement through the fan-out.
    fn apply(&mut self, acked: Acked) {
        if let Some(offset) = self
            .fanout
            .acked(acked.ack.file, acked.ack.offset, acked.from)
        {
            self.tailer.ack(acked.ack.file, offset);
        }
    }

    /// Closes the queues of shoot stores that got no line for [`STORE_IDLE`] (a deleted
    /// shoot's store, a shoot that hibernated) and of stores of an older config, unless lines
    /// wait in front of them (`held`): their tasks send what the queue and their batches hold
    /// and end. A store's next line opens a new queue, whose task starts once the old one
    /// ended ([`TailLoop::start_unstarted`]; meanwhile the queue fills, then its files wait).
    fn retire_idle(&mut self) {
        let before = self.stores.len();
        let metrics = &self.metrics;
        let generation = self.generation;
        let draining = &mut self.draining;
        self.stores.retain(|target, q| {
            let stale = q.generation != generation;
            let keep = !q.held.is_empty()
                || q.unstarted.is_some()
                || (!stale
                    && (matches!(target, Target::Seed) || q.last_used.elapsed() < STORE_IDLE));
            if !keep {
                info!(store = ?target, stale, "store retired (idle, or its config reloaded)");
                metrics.stores.with_label_values(&[target.kind()]).dec();
                draining.insert(target.clone(), q.ended.clone());
            }
            keep
        });
        if self.stores.len() != before {
            metrics
                .retired_stores
                .inc_by((before - self.stores.len()) as u64);
        }
    }
}

/// The queue of `target`'s store and its task, not started yet ([`StoreQueue::start`]).
fn new_store(
    target: &Target,
    generation: u64,
    config: &Config,
    metrics: &Metrics,
    acks: std_mpsc::Sender<Acked>,
) -> StoreQueue {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY / CHUNK);
    let endpoint = route::endpoint(target, &config.seed, &config.shoot);
    info!(store = %endpoint.url, "new store");
    metrics.stores.with_label_values(&[target.kind()]).inc();
    let (store, from) = match target {
        Target::Seed => (config.seed.clone(), Stores::SEED),
        Target::Shoot(_) => (config.shoot.clone(), Stores::SHOOT),
    };
    let ended = Arc::new(AtomicBool::new(false));
    let task = StoreTask {
        kind: target.kind(),
        from,
        store,
        endpoint,
        delivery: config.delivery.clone(),
        rx,
        acks,
        metrics: metrics.clone(),
        ended: ended.clone(),
    };
    StoreQueue {
        tx,
        gathered: Vec::with_capacity(CHUNK),
        routed: metrics.entries_routed.with_label_values(&[target.kind()]),
        malformed: metrics.malformed_lines.with_label_values(&[target.kind()]),
        held: VecDeque::new(),
        last_used: Instant::now(),
        generation,
        ended,
        unstarted: Some(task),
    }
}

impl StoreQueue {
    /// Starts its task, if not started yet.
    fn start(&mut self, shutdown: &Shutdown) {
        if let Some(task) = self.unstarted.take() {
            shutdown.spawn(task.run(shutdown.clone()));
        }
    }
}

/// Sets its flag when dropped: a task's end, however it ends.
struct EndFlag(Arc<AtomicBool>);

impl Drop for EndFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

struct StoreTask {
    kind: &'static str,
    /// Which of a line's stores this is, for the fan-out.
    from: Stores,
    store: Store,
    endpoint: route::Endpoint,
    delivery: Delivery,
    rx: mpsc::Receiver<Vec<Message>>,
    acks: std_mpsc::Sender<Acked>,
    metrics: Metrics,
    ended: Arc<AtomicBool>,
}

impl std::fmt::Debug for StoreTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTask")
            .field("url", &self.endpoint.url)
            .finish_non_exhaustive()
    }
}

impl StoreTask {
    /// The store's client; `Err` logged.
    fn client(&self) -> Result<Client, ()> {
        let url = &self.endpoint.url;
        let tls = self
            .store
            .ca
            .as_deref()
            .map(|ca| match &self.store.client_cert {
                None => agentkit::tls::client_config(ca),
                Some(c) => agentkit::tls::client_config_with_cert(ca, &c.cert, &c.key),
            });
        let tls = match tls {
            None => None,
            Some(Ok(tls)) => Some(tls),
            Some(Err(error)) => {
                error!(%error, store = %url, "cannot read this store's CA bundle or client certificate; its lines wait");
                return Err(());
            }
        };
        match Client::new(
            url,
            self.endpoint.tenant.as_deref(),
            self.delivery.request_timeout,
            tls,
        ) {
            Ok(c) => Ok(c.with_protocol(self.store.protocol)),
            Err(error) => {
                error!(%error, store = %url, "cannot make a client for this store; its lines wait");
                Err(())
            }
        }
    }

    async fn run(mut self, shutdown: Shutdown) {
        let _ended = EndFlag(self.ended.clone());
        let url = self.endpoint.url.clone();
        // Nothing is taken from the queue meanwhile: it fills and the store's files wait. A
        // CA bundle that appears later (a Secret mounted late) is found on a later try.
        let mut client = loop {
            if let Ok(client) = self.client() {
                break client;
            }
            tokio::select! {
                () = tokio::time::sleep(self.delivery.max_backoff) => {}
                () = shutdown.stopping() => return,
            }
        };
        let seed = url.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let mut policy = Policy::new(&self.delivery, seed).with_protocol(
            self.store.protocol,
            Instant::now(),
            wall,
        );
        let mut last = policy.stats().clone();
        // What was taken from the queue and the policy has no room for yet, in order.
        let mut backlog: VecDeque<Message> = VecDeque::new();
        let mut closed = false;
        loop {
            let now = Instant::now();
            while let Some(done) = policy.poll_done(now) {
                self.ack(&done.acks);
            }
            feed(&mut policy, &mut backlog, now);
            while backlog.is_empty() && !closed {
                match self.rx.try_recv() {
                    Ok(chunk) => {
                        backlog.extend(chunk);
                        feed(&mut policy, &mut backlog, now);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && backlog.is_empty() && policy.is_idle() {
                return;
            }
            let sent = tokio::select! {
                outcome = send_due(&mut policy, &mut client) => outcome,
                () = shutdown.forced() => return,
            };
            if let Some(outcome) = sent {
                match outcome {
                    Outcome::Accepted(done)
                    | Outcome::Rejected { done, .. }
                    | Outcome::Skipped(done) => self.ack(&done.acks),
                    Outcome::Retry { .. } => {}
                }
                let stats = policy.stats().clone();
                self.metrics.deliver(self.kind, &last, &stats);
                last = stats;
                continue;
            }
            let now = Instant::now();
            let wake = policy.next_wakeup(now);
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                chunk = self.rx.recv(), if backlog.is_empty() && !closed => match chunk {
                    Some(chunk) => {
                        backlog.extend(chunk);
                        feed(&mut policy, &mut backlog, Instant::now());
                    }
                    None => closed = true,
                },
                () = sleep => {}
                () = shutdown.forced() => return,
            }
        }
    }

    fn ack(&self, acks: &[Ack]) {
        for a in acks {
            // The tailer thread is gone only after every store task ended.
            let _ = self.acks.send(Acked {
                ack: *a,
                from: self.from,
            });
        }
    }
}

/// Gives the backlog's messages to the policy, in order, until it refuses an entry (which
/// stays first in the backlog).
fn feed(policy: &mut Policy, backlog: &mut VecDeque<Message>, now: Instant) {
    while let Some(m) = backlog.pop_front() {
        match m {
            Message::Entry(item) => {
                if let Err(Full(item)) = policy.push(item, now) {
                    backlog.push_front(Message::Entry(item));
                    return;
                }
            }
            Message::Ack(ack) => policy.push_ack(ack, now),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::checkpoint::FileKey;
    use crate::tail::FileRef;

    fn ack(offset: u64) -> Message {
        Message::Ack(Ack {
            file: FileRef {
                key: FileKey { dev: 1, ino: 1 },
                epoch: 0,
            },
            offset,
        })
    }

    fn offset(m: Message) -> u64 {
        match m {
            Message::Ack(a) => a.offset,
            Message::Entry(_) => unreachable!(),
        }
    }

    #[test]
    fn a_full_queue_holds_in_order_and_refills() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut q = StoreQueue {
            tx,
            gathered: Vec::new(),
            routed: IntCounter::new("routed", "routed").unwrap(),
            malformed: IntCounter::new("malformed", "malformed").unwrap(),
            held: VecDeque::new(),
            last_used: Instant::now(),
            generation: 0,
            ended: Arc::new(AtomicBool::new(false)),
            unstarted: None,
        };
        let received = |rx: &mut mpsc::Receiver<Vec<Message>>| -> Vec<u64> {
            std::iter::from_fn(|| rx.try_recv().ok())
                .flatten()
                .map(offset)
                .collect()
        };
        // Three polls of three lines: two chunks fit, the third is held.
        for poll in 0..3 {
            for i in 0..3 {
                q.send(ack(poll * 3 + i));
            }
            q.hand_over();
        }
        assert_eq!(q.held.len(), 3);
        // While some are held, later ones wait behind them.
        q.send(ack(9));
        q.hand_over();
        assert_eq!(q.held.len(), 4);
        assert!(!q.flush_held(), "the queue is still full");
        let mut got = received(&mut rx);
        assert_eq!(got, [0, 1, 2, 3, 4, 5]);
        assert!(q.flush_held());
        got.extend(received(&mut rx));
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        // A full chunk goes at once, without waiting for the poll's end.
        for i in 10..10 + CHUNK as u64 {
            q.send(ack(i));
        }
        assert!(q.gathered.is_empty());
        assert_eq!(
            received(&mut rx),
            (10..10 + CHUNK as u64).collect::<Vec<_>>()
        );
        drop(rx);
        q.send(ack(1000));
        q.hand_over();
        q.send(ack(1001));
        assert!(q.flush_held(), "a closed queue holds nothing");
        assert!(q.held.is_empty());
    }
}
