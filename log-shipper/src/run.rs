//! The agent's life: the tailer on the blocking pool, one task per store, the admin server.
//!
//! - **The tailer thread** ([`Shutdown::spawn_blocking`]) polls the [`Tailer`], routes each
//!   record ([`route`](crate::route)) and hands it to its store's queue (bounded,
//!   [`QUEUE_CAPACITY`] messages) without waiting. When a store's queue is full, the records
//!   that did not fit are held, in order, and the files routed to that store are not read
//!   ([`Tailer::poll_except`]) until the held records went in: the files are the buffer, and
//!   the files of every other store go on being read. Memory per store is its queue, its
//!   policy's two batches and what one poll read from its files. It applies the
//!   acknowledgements the store tasks send back and persists checkpoints by the tailer's own
//!   rule (every second, and at the end).
//! - **A store task** per target (the seed, and each shoot namespace as its first line
//!   appears; never retired yet) owns its [`Policy`] and [`Client`]: a dead or slow store
//!   delays only its own lines.
//! - **Shutdown**: on SIGTERM readiness goes false and the tailer stops reading; each store
//!   task sends what it holds (batches as they come due) and ends once idle, or when the
//!   grace ([`SHUTDOWN_GRACE`]) is over; the tailer applies the last acknowledgements and
//!   persists the checkpoints. What was not acknowledged is read again after the restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::admin::{AdminServer, Endpoints, Health};
use agentkit::Shutdown;
use prometheus::Registry;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Config, Delivery, Store};
use crate::deliver::{Ack, Full, Item, Outcome, Policy};
use crate::metrics::Metrics;
use crate::push::{send_due, Client};
use crate::route::{self, Router, Target};
use crate::tail::{Record, TailError, Tailer};

/// Messages a store's queue holds at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// How long the tailer thread waits for an acknowledgement when a poll read nothing.
pub const IDLE_POLL: Duration = Duration::from_millis(50);
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
    /// A task of the agent panicked.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a store's queue carries: an entry, or a malformed line's checkpoint.
#[derive(Debug)]
enum Message {
    Entry(Item),
    Ack(Ack),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    admin: SocketAddr,
    tailer: tokio::task::JoinHandle<Result<(), TailError>>,
    shutdown: Shutdown,
}

impl Agent {
    /// The admin server's address (useful with port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
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
    let looper = TailLoop {
        tailer,
        router: Router::new(),
        stores: HashMap::new(),
        config: Arc::new(config),
        shutdown: shutdown.clone(),
        metrics,
    };
    health.set_ready(true);
    info!(admin = %admin_addr, "log-shipper started");
    let tailer = shutdown.spawn_blocking(move || looper.run());
    Ok(Agent {
        admin: admin_addr,
        tailer,
        shutdown,
    })
}

/// Runs the agent until `shutdown` and its drain: what the binary does.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    start(config, shutdown).await?.wait(SHUTDOWN_GRACE).await
}

/// One store as the tailer thread sees it.
struct StoreQueue {
    tx: mpsc::Sender<Message>,
    /// Messages that did not fit the queue, in order; while not empty the store's files are
    /// not read.
    held: VecDeque<Message>,
}

impl StoreQueue {
    /// Moves held messages into the queue while it has room; true when none is left.
    fn flush_held(&mut self) -> bool {
        while let Some(m) = self.held.pop_front() {
            match self.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.held.push_front(m);
                    return false;
                }
                // The task is gone (shutdown): what it did not take is read again later.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.held.clear();
                    return true;
                }
            }
        }
        true
    }

    fn send(&mut self, m: Message) {
        if !self.held.is_empty() {
            self.held.push_back(m);
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(m)) = self.tx.try_send(m) {
            self.held.push_back(m);
        }
    }
}

struct TailLoop {
    tailer: Tailer,
    router: Router,
    stores: HashMap<Target, StoreQueue>,
    config: Arc<Config>,
    shutdown: Shutdown,
    metrics: Metrics,
}

impl TailLoop {
    fn run(mut self) -> Result<(), TailError> {
        let (ack_tx, ack_rx) = std_mpsc::channel::<Ack>();
        let mut out: Vec<Record> = Vec::new();
        let mut last = self.tailer.stats();
        while !self.shutdown.is_stopping() {
            while let Ok(ack) = ack_rx.try_recv() {
                self.tailer.ack(ack.file, ack.offset);
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
            let is_paused = |c: &crate::tail::path::Container| {
                if route::is_shoot_namespace(&c.namespace) {
                    paused.contains(c.namespace.as_str())
                } else {
                    seed_paused
                }
            };
            if let Err(error) = self
                .tailer
                .poll_except(Instant::now(), &mut out, &is_paused)
            {
                warn!(%error, kind = error.kind(), "tailer poll failed");
            }
            let read = out.len();
            for record in out.drain(..) {
                let (target, labels) = self.router.route(&record.container);
                let ack = Ack {
                    file: record.file,
                    offset: record.checkpoint(),
                };
                let message = match record.event {
                    Ok(entry) => {
                        self.metrics
                            .entries_routed
                            .with_label_values(&[target.kind()])
                            .inc();
                        Message::Entry(Item {
                            labels,
                            timestamp: entry.timestamp,
                            line: String::from_utf8_lossy(&entry.content).into_owned(),
                            ack: Some(ack),
                        })
                    }
                    Err(_) => {
                        self.metrics
                            .malformed_lines
                            .with_label_values(&[target.kind()])
                            .inc();
                        Message::Ack(ack)
                    }
                };
                let queue = match self.stores.get_mut(&target) {
                    Some(q) => q,
                    None => {
                        let q = self.start_store(&target, ack_tx.clone());
                        self.stores.entry(target).or_insert(q)
                    }
                };
                queue.send(message);
            }
            let now = self.tailer.stats();
            self.metrics.tail(&last, &now);
            last = now;
            self.metrics.open_files.set(self.tailer.open_files() as i64);
            self.metrics.files.set(self.tailer.files() as i64);
            if read == 0 {
                if let Ok(ack) = ack_rx.recv_timeout(IDLE_POLL) {
                    self.tailer.ack(ack.file, ack.offset);
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
                Ok(ack) => self.tailer.ack(ack.file, ack.offset),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.tailer.persist()?;
        info!("checkpoints persisted");
        Ok(())
    }

    fn start_store(&self, target: &Target, acks: std_mpsc::Sender<Ack>) -> StoreQueue {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let endpoint = route::endpoint(target, &self.config.seed, &self.config.shoot);
        info!(store = %endpoint.url, "new store");
        self.metrics
            .stores
            .with_label_values(&[target.kind()])
            .inc();
        let task = StoreTask {
            kind: target.kind(),
            store: if matches!(target, Target::Seed) {
                self.config.seed.clone()
            } else {
                self.config.shoot.clone()
            },
            endpoint,
            delivery: self.config.delivery.clone(),
            rx,
            acks,
            shutdown: self.shutdown.clone(),
            metrics: self.metrics.clone(),
        };
        self.shutdown.spawn(task.run());
        StoreQueue {
            tx,
            held: VecDeque::new(),
        }
    }
}

struct StoreTask {
    kind: &'static str,
    store: Store,
    endpoint: route::Endpoint,
    delivery: Delivery,
    rx: mpsc::Receiver<Message>,
    acks: std_mpsc::Sender<Ack>,
    shutdown: Shutdown,
    metrics: Metrics,
}

impl StoreTask {
    async fn run(mut self) {
        let url = self.endpoint.url.clone();
        let mut client = match Client::new(
            &url,
            self.endpoint.tenant.as_deref(),
            self.delivery.request_timeout,
            None,
        ) {
            Ok(c) => c.with_protocol(self.store.protocol),
            Err(error) => {
                // Nothing is read for this store: its queue fills and its files wait.
                error!(%error, store = %url, "cannot make a client for this store; its lines wait");
                self.shutdown.stopping().await;
                return;
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
        let mut pending: Option<Item> = None;
        let mut closed = false;
        loop {
            let now = Instant::now();
            while let Some(done) = policy.poll_done(now) {
                self.ack(&done.acks);
            }
            if let Some(item) = pending.take() {
                if let Err(Full(item)) = policy.push(item, now) {
                    pending = Some(item);
                }
            }
            while pending.is_none() && !closed {
                match self.rx.try_recv() {
                    Ok(m) => pending = take(&mut policy, m, now),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && pending.is_none() && policy.is_idle() {
                return;
            }
            let sent = tokio::select! {
                outcome = send_due(&mut policy, &mut client) => outcome,
                () = self.shutdown.forced() => return,
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
                m = self.rx.recv(), if pending.is_none() && !closed => match m {
                    Some(m) => pending = take(&mut policy, m, Instant::now()),
                    None => closed = true,
                },
                () = sleep => {}
                () = self.shutdown.forced() => return,
            }
        }
    }

    fn ack(&self, acks: &[Ack]) {
        for a in acks {
            // The tailer thread is gone only after every store task ended.
            let _ = self.acks.send(*a);
        }
    }
}

/// Gives a message to the policy; an entry it refuses comes back.
fn take(policy: &mut Policy, m: Message, now: Instant) -> Option<Item> {
    match m {
        Message::Entry(item) => policy.push(item, now).err().map(|Full(item)| item),
        Message::Ack(ack) => {
            policy.push_ack(ack, now);
            None
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
            held: VecDeque::new(),
        };
        for i in 0..5 {
            q.send(ack(i));
        }
        assert_eq!(q.held.len(), 3);
        assert!(!q.flush_held());
        assert_eq!(offset(rx.try_recv().unwrap()), 0);
        assert!(!q.flush_held());
        assert_eq!(q.held.len(), 2);
        assert_eq!(offset(rx.try_recv().unwrap()), 1);
        assert_eq!(offset(rx.try_recv().unwrap()), 2);
        assert!(q.flush_held());
        q.send(ack(5));
        assert_eq!(q.held.len(), 1, "the queue is full again");
        let mut got: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(offset)
            .collect();
        assert!(q.flush_held());
        got.extend(std::iter::from_fn(|| rx.try_recv().ok()).map(offset));
        assert_eq!(got, [3, 4, 5]);
        drop(rx);
        q.send(ack(6));
        q.send(ack(7));
        assert!(q.flush_held(), "a closed queue holds nothing");
        assert!(q.held.is_empty());
    }
}
