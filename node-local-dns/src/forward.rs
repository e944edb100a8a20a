//! Forwarding a query upstream, CoreDNS `forward` compatible.
//!
//! Every attempt asks one upstream with a fresh random ID: over UDP from a fresh socket (so a
//! random source port), over TCP on a pooled, pipelined connection (several queries in flight,
//! matched by ID, one reader task per connection, idle connections closed after `expire`).
//! Responses are checked against the question; anything else is dropped and counted. UDP is
//! the default, TCP when the UDP answer is truncated, when `force_tcp` is set, or when the
//! client asked over TCP (unless `prefer_udp`).
//!
//! Upstreams are tried in `policy` order, healthy ones only, each attempt bounded by
//! `attempt_timeout` and the whole query by [`OVERALL_TIMEOUT`]. Consecutive failures mark an
//! upstream down after `max_fails`; from the first failure on a probe (`<domain> IN NS`) runs
//! every `health_check` until the upstream answers anything at all. With every upstream down a
//! random one is asked anyway. `max_concurrent` bounds the queries in flight (by default
//! [`config::DEFAULT_MAX_CONCURRENT`], where CoreDNS has no bound); above it the caller gets
//! [`ForwardError::Overloaded`] at once (and answers REFUSED, as CoreDNS does). That cap is
//! also what bounds the sockets: every UDP attempt binds a fresh one (a random source port)
//! and holds it until its answer or its deadline, and a TCP query past the pool opens a
//! connection of its own.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, OnceCell};
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use crate::config::{self, Policy};
use crate::wire::{self, Query};
use agentkit::sync::lock;
use agentkit::Shutdown;

/// Per-upstream timeout of one attempt when nothing else is configured (CoreDNS's
/// `read_timeout` default is 2 s).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole query, all attempts together (CoreDNS's `defaultTimeout`).
pub const OVERALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts per query: this many per upstream (CoreDNS's `max_connect_attempts` default).
pub const ATTEMPTS_PER_UPSTREAM: usize = 2;

/// A health probe waits this long for its answer at most (also at most `attempt_timeout`).
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes are never sent more often than this, whatever `health_check` says.
pub const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Pooled TCP connections per upstream; past this, a query gets a connection of its own
/// that is closed after its answer.
pub const MAX_CONNS_PER_UPSTREAM: usize = 16;

/// Queries in flight on one pooled TCP connection at most. Small on purpose: servers that
/// work through a connection's queries one by one (miekg/dns, so CoreDNS) would otherwise
/// queue a fast answer behind a slow one.
pub const MAX_INFLIGHT_PER_CONN: usize = 16;

/// Random draws for an ID not in flight on a connection before the attempt gives up.
const ID_TRIES: usize = 64;

/// Bytes read from a TCP connection per read call (at least).
const TCP_READ_CHUNK: usize = 4096;

/// The reader looks at a connection's idleness at most this often.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(10);

/// A DNS header's size in bytes.
const HEADER_LEN: usize = 12;

/// The upstreams of one zone and how to reach them.
#[derive(Debug)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

/// One successful exchange with an upstream.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The upstream's response, checked against `query` ([`wire::parse_response`] accepts it).
    pub response: Vec<u8>,
    /// The query we sent (our ID and question).
    pub query: Vec<u8>,
    /// Who answered.
    pub upstream: SocketAddr,
    /// How long the successful attempt took (for `coredns_proxy_request_duration_seconds`).
    pub elapsed: Duration,
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Every attempt timed out or failed.
    #[error("no upstream answered")]
    NoAnswer,
    /// `max_concurrent` queries are in flight already; the caller answers REFUSED.
    #[error("too many concurrent upstream queries")]
    Overloaded,
}

/// Counters for metrics, a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardStats {
    /// Responses dropped: not matching the question or ID, malformed, or too late.
    pub dropped: u64,
    /// Queries sent to a random upstream because all were down
    /// (`coredns_forward_healthcheck_broken_total`).
    pub healthcheck_broken: u64,
    /// Queries refused because of `max_concurrent`
    /// (`coredns_forward_max_concurrent_rejects_total`).
    pub max_concurrent_rejects: u64,
    /// TCP exchanges on an existing pooled connection (`coredns_proxy_conn_cache_hits_total`).
    pub conn_cache_hits: u64,
    /// TCP exchanges that had to open a connection (`coredns_proxy_conn_cache_misses_total`).
    pub conn_cache_misses: u64,
    /// Per upstream, in configured order.
    pub upstreams: Vec<UpstreamStats>,
}

/// One upstream's state and counters, a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStats {
    /// The upstream.
    pub addr: SocketAddr,
    /// Not marked down.
    pub healthy: bool,
    /// Consecutive failures (attempts and probes).
    pub fails: u32,
    /// Failed probes (`coredns_proxy_healthcheck_failures_total`).
    pub healthcheck_failures: u64,
    /// Pooled TCP connections, open or opening.
    pub connections: usize,
}

#[derive(Debug)]
struct Inner {
    upstreams: Vec<Upstream>,
    policy: Policy,
    force_tcp: bool,
    prefer_udp: bool,
    expire: Duration,
    max_fails: u32,
    health_check: Duration,
    /// The probe query (ID 0; each probe sets its own).
    probe: Vec<u8>,
    max_concurrent: Option<usize>,
    attempt_timeout: Duration,
    /// Round-robin position.
    next: AtomicUsize,
    /// Queries in flight (for `max_concurrent`).
    inflight: AtomicUsize,
    counters: Arc<Counters>,
    /// Where connection readers and health probes run; both end when it is forced.
    tasks: Shutdown,
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    healthcheck_broken: AtomicU64,
    max_concurrent_rejects: AtomicU64,
    conn_cache_hits: AtomicU64,
    conn_cache_misses: AtomicU64,
}

#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    fails: AtomicU32,
    /// A probe task is running.
    probing: AtomicBool,
    healthcheck_failures: AtomicU64,
    pool: Mutex<Vec<Arc<Conn>>>,
}

/// Why one attempt failed (for logs and the retry decision).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Broken,
    #[error("no free query ID on the connection")]
    NoFreeId,
    #[error("query not parseable")]
    BadQuery,
}

impl Forwarder {
    /// A forwarder for `config`'s upstreams and options, its tasks on a tracker of its own.
    pub fn new(config: &config::Forward) -> Forwarder {
        Forwarder::with_tasks(config, &Shutdown::new())
    }

    /// A forwarder whose connection readers and health probes run on `tasks`, and end when it
    /// is forced. Starts no task until it connects or a query fails.
    pub fn with_tasks(config: &config::Forward, tasks: &Shutdown) -> Forwarder {
        let mut probe = Vec::with_capacity(32);
        wire::build_query(
            0,
            &config.health_check_domain,
            wire::rtype::NS,
            None,
            &mut probe,
        );
        if config.health_check_no_rec {
            probe[2] &= !0x01; // RD
        }
        let upstreams = config
            .to
            .iter()
            .map(|&addr| Upstream {
                addr,
                fails: AtomicU32::new(0),
                probing: AtomicBool::new(false),
                healthcheck_failures: AtomicU64::new(0),
                pool: Mutex::new(Vec::new()),
            })
            .collect();
        Forwarder {
            inner: Arc::new(Inner {
                upstreams,
                policy: config.policy,
                force_tcp: config.force_tcp,
                prefer_udp: config.prefer_udp,
                expire: config.expire,
                max_fails: config.max_fails,
                health_check: config.health_check.max(MIN_HEALTH_CHECK_INTERVAL),
                probe,
                max_concurrent: config.max_concurrent,
                attempt_timeout: config.attempt_timeout,
                next: AtomicUsize::new(0),
                inflight: AtomicUsize::new(0),
                counters: Arc::new(Counters::default()),
                tasks: tasks.clone(),
            }),
        }
    }

    /// Whether a new upstream query would be turned away now (`max_concurrent` queries in
    /// flight); if so, it is counted as a reject, as [`Forwarder::forward`] would have. Lets a
    /// caller answer REFUSED without starting anything.
    pub fn reject_if_full(&self) -> bool {
        let inner = &*self.inner;
        let full = !inner.upstreams.is_empty()
            && inner
                .max_concurrent
                .is_some_and(|max| inner.inflight.load(Ordering::Acquire) >= max);
        if full {
            inner
                .counters
                .max_concurrent_rejects
                .fetch_add(1, Ordering::Relaxed);
        }
        full
    }

    /// Asks the upstreams about `query`'s question. `client_tcp`: the client asked over TCP
    /// (then so do we, unless `prefer_udp`).
    pub async fn forward(
        &self,
        query: &Query<'_>,
        client_tcp: bool,
    ) -> Result<Exchange, ForwardError> {
        let inner = &*self.inner;
        let n = inner.upstreams.len();
        if n == 0 {
            // A block without `forward`: nothing to ask, and nothing to count against the cap.
            return Err(ForwardError::NoAnswer);
        }
        let Some(_slot) = inner.admit() else {
            return Err(ForwardError::Overloaded);
        };
        let tcp = inner.force_tcp || (client_tcp && !inner.prefer_udp);
        let deadline = Instant::now() + OVERALL_TIMEOUT;
        let order = inner.order();
        let mut cursor = 0;
        let mut packet = Vec::with_capacity(64);
        for _ in 0..ATTEMPTS_PER_UPSTREAM * n {
            let start = Instant::now();
            if start >= deadline {
                break;
            }
            let index = inner.pick(&order, &mut cursor);
            let upstream = &inner.upstreams[index];
            upstream_query(query, rand::random(), &mut packet);
            let result = if tcp {
                inner
                    .tcp(upstream, &mut packet, inner.attempt_deadline(deadline))
                    .await
            } else {
                match inner
                    .udp(upstream, &packet, inner.attempt_deadline(deadline))
                    .await
                {
                    Ok(response) if is_truncated(&response) => {
                        inner
                            .tcp(upstream, &mut packet, inner.attempt_deadline(deadline))
                            .await
                    }
                    other => other,
                }
            };
            match result {
                Ok(response) => {
                    upstream.fails.store(0, Ordering::Relaxed);
                    return Ok(Exchange {
                        response,
                        query: packet,
                        upstream: upstream.addr,
                        elapsed: start.elapsed(),
                    });
                }
                Err(error) => {
                    debug!(%error, upstream = %upstream.addr, tcp, "upstream attempt failed");
                    self.failed(index);
                }
            }
        }
        Err(ForwardError::NoAnswer)
    }

    /// Counters and upstream states, for metrics.
    pub fn stats(&self) -> ForwardStats {
        let inner = &*self.inner;
        let c = &inner.counters;
        ForwardStats {
            dropped: c.dropped.load(Ordering::Relaxed),
            healthcheck_broken: c.healthcheck_broken.load(Ordering::Relaxed),
            max_concurrent_rejects: c.max_concurrent_rejects.load(Ordering::Relaxed),
            conn_cache_hits: c.conn_cache_hits.load(Ordering::Relaxed),
            conn_cache_misses: c.conn_cache_misses.load(Ordering::Relaxed),
            upstreams: inner
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| UpstreamStats {
                    addr: u.addr,
                    healthy: !inner.is_down(i),
                    fails: u.fails.load(Ordering::Relaxed),
                    healthcheck_failures: u.healthcheck_failures.load(Ordering::Relaxed),
                    connections: lock(&u.pool).iter().filter(|c| !c.is_closed()).count(),
                })
                .collect(),
        }
    }

    /// One more failure of upstream `index`; starts its probe unless one runs.
    fn failed(&self, index: usize) {
        if self.inner.max_fails == 0 {
            return;
        }
        let upstream = &self.inner.upstreams[index];
        add_fail(&upstream.fails);
        if !upstream.probing.swap(true, Ordering::AcqRel) {
            let (inner, tasks) = (Arc::downgrade(&self.inner), self.inner.tasks.clone());
            self.inner.tasks.spawn(async move {
                tokio::select! {
                    () = probe_loop(inner, index) => {}
                    () = tasks.forced() => {}
                }
            });
        }
    }
}

/// Probes upstream `index` every `health_check` until it answers; ends early when the
/// forwarder is gone (only a weak reference is kept between probes).
async fn probe_loop(inner: Weak<Inner>, index: usize) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.health_check) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let upstream = &inner.upstreams[index];
        if inner.probe(upstream).await {
            debug!(upstream = %upstream.addr, "upstream healthy again");
            upstream.fails.store(0, Ordering::Relaxed);
            upstream.probing.store(false, Ordering::Release);
            return;
        }
        upstream
            .healthcheck_failures
            .fetch_add(1, Ordering::Relaxed);
        add_fail(&upstream.fails);
    }
}

fn add_fail(fails: &AtomicU32) {
    let _ = fails.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
        Some(f.saturating_add(1))
    });
}

/// Decrements the in-flight count when a query is done.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn admit(&self) -> Option<Slot<'_>> {
        let now = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = Slot(&self.inflight);
        if self.max_concurrent.is_some_and(|max| now > max) {
            self.counters
                .max_concurrent_rejects
                .fetch_add(1, Ordering::Relaxed);
            return None; // drops the slot
        }
        Some(slot)
    }

    fn attempt_deadline(&self, deadline: Instant) -> Instant {
        deadline.min(Instant::now() + self.attempt_timeout)
    }

    fn is_down(&self, index: usize) -> bool {
        self.max_fails != 0 && self.upstreams[index].fails.load(Ordering::Relaxed) >= self.max_fails
    }

    /// The upstream order of one query by `policy`.
    fn order(&self) -> Vec<usize> {
        let n = self.upstreams.len();
        let mut order: Vec<usize> = (0..n).collect();
        match self.policy {
            Policy::Random => order.shuffle(&mut rand::rng()),
            Policy::RoundRobin => order.rotate_left(self.next.fetch_add(1, Ordering::Relaxed) % n),
            Policy::Sequential => {}
        }
        order
    }

    /// The next healthy upstream in `order` from `cursor` on (cycling), or a random one when
    /// all are down.
    fn pick(&self, order: &[usize], cursor: &mut usize) -> usize {
        let n = order.len();
        for k in 0..n {
            let index = order[(*cursor + k) % n];
            if !self.is_down(index) {
                *cursor += k + 1;
                return index;
            }
        }
        self.counters
            .healthcheck_broken
            .fetch_add(1, Ordering::Relaxed);
        rand::random_range(0..n)
    }

    async fn udp(
        &self,
        upstream: &Upstream,
        packet: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, AttemptError> {
        let sent = wire::parse_query(packet).map_err(|_| AttemptError::BadQuery)?;
        let socket = udp_socket(upstream.addr).await?;
        socket.send(packet).await?;
        // Room for the largest datagram, but not zeroed: only the bytes received are written,
        // so an attempt waiting on a slow upstream does not first fill 64 KiB.
        let mut buf = Vec::with_capacity(wire::MAX_MESSAGE);
        loop {
            buf.clear();
            timeout_at(deadline, socket.recv_buf(&mut buf))
                .await
                .map_err(|_| AttemptError::Timeout)??;
            // Only a response to this very question counts; spoofs and strays are dropped.
            if wire::parse_response(&sent, &buf).is_ok() {
                return Ok(buf);
            }
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One TCP exchange on a pooled connection; when the connection breaks under it, once
    /// more on a fresh one (an upstream may close idle or busy connections at any time).
    async fn tcp(
        &self,
        upstream: &Upstream,
        packet: &mut [u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, AttemptError> {
        let mut fresh = false;
        loop {
            let lease = self.checkout(upstream, fresh);
            let result = lease
                .0
                .exchange(upstream.addr, packet, deadline, self)
                .await;
            match result {
                Err(AttemptError::Broken) if !fresh && Instant::now() < deadline => fresh = true,
                other => return other,
            }
        }
    }

    /// A pooled connection with room for one more query, or a new one (pooled while the pool
    /// has room).
    fn checkout(&self, upstream: &Upstream, fresh: bool) -> Lease {
        let mut pool = lock(&upstream.pool);
        pool.retain(|c| !c.is_closed());
        if !fresh {
            let reusable = pool
                .iter()
                .find(|c| c.shared.load.load(Ordering::Acquire) < MAX_INFLIGHT_PER_CONN);
            if let Some(conn) = reusable {
                conn.shared.load.fetch_add(1, Ordering::AcqRel);
                self.counters
                    .conn_cache_hits
                    .fetch_add(1, Ordering::Relaxed);
                return Lease(Arc::clone(conn));
            }
        }
        self.counters
            .conn_cache_misses
            .fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        conn.shared.load.fetch_add(1, Ordering::AcqRel);
        if pool.len() < MAX_CONNS_PER_UPSTREAM {
            pool.push(Arc::clone(&conn));
        }
        Lease(conn)
    }

    /// Sends the probe; true on any response with its ID (SERVFAIL and REFUSED count).
    async fn probe(&self, upstream: &Upstream) -> bool {
        let mut packet = self.probe.clone();
        let id: u16 = rand::random();
        packet[..2].copy_from_slice(&id.to_be_bytes());
        let deadline = Instant::now() + HEALTH_CHECK_TIMEOUT.min(self.attempt_timeout);
        let answered = if self.force_tcp {
            timeout_at(deadline, probe_tcp(upstream.addr, &packet)).await
        } else {
            timeout_at(deadline, probe_udp(upstream.addr, &packet)).await
        };
        let ok = matches!(answered, Ok(Ok(true)));
        if !ok {
            debug!(upstream = %upstream.addr, "health probe failed");
        }
        ok
    }
}

async fn udp_socket(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Whether `response` answers a query with ID `id` at all (QR set, same ID).
fn is_response_to(id: [u8; 2], response: &[u8]) -> bool {
    response.len() >= HEADER_LEN && response[..2] == id && response[2] & 0x80 != 0
}

async fn probe_udp(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<bool> {
    let socket = udp_socket(upstream).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; wire::MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        if is_response_to([packet[0], packet[1]], &buf[..n]) {
            return Ok(true);
        }
    }
}

async fn probe_tcp(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.write_all(&frame(packet)).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(is_response_to([packet[0], packet[1]], &buf))
}

/// `packet` with its two-byte length prefix (RFC 1035 §4.2.2).
fn frame(packet: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    framed.extend_from_slice(packet);
    framed
}

fn is_truncated(packet: &[u8]) -> bool {
    packet.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// A query's claim on a connection; gives it back when dropped.
struct Lease(Arc<Conn>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.shared.load.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One upstream TCP connection, connected by its first user; its reader task ends with it.
#[derive(Debug)]
struct Conn {
    shared: Arc<ConnShared>,
    /// The reader task, once connected.
    reader: OnceCell<AbortHandle>,
}

/// What a connection's users and its reader task share.
#[derive(Debug)]
struct ConnShared {
    state: Mutex<ConnState>,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    /// Queries holding a lease on the connection.
    load: AtomicUsize,
}

#[derive(Debug)]
struct ConnState {
    /// Queries sent and not answered, by ID.
    pending: HashMap<u16, Pending>,
    /// No more queries: the connection failed, expired or is being closed.
    closed: bool,
    /// The last query sent or answer received.
    last_used: Instant,
    /// Tells a query's own pending entry from a later one with the same ID.
    next_token: u64,
}

#[derive(Debug)]
struct Pending {
    sent: Vec<u8>,
    token: u64,
    reply: oneshot::Sender<Vec<u8>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
    }
}

impl Conn {
    fn new() -> Self {
        Conn {
            shared: Arc::new(ConnShared {
                state: Mutex::new(ConnState {
                    pending: HashMap::new(),
                    closed: false,
                    last_used: Instant::now(),
                    next_token: 0,
                }),
                writer: tokio::sync::Mutex::new(None),
                load: AtomicUsize::new(0),
            }),
            reader: OnceCell::new(),
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    /// Sends `packet` (its ID changed if another query on this connection has it) and waits
    /// for the matching response.
    async fn exchange(
        &self,
        addr: SocketAddr,
        packet: &mut [u8],
        deadline: Instant,
        inner: &Inner,
    ) -> Result<Vec<u8>, AttemptError> {
        let connect = self.reader.get_or_try_init(|| self.connect(addr, inner));
        match timeout_at(deadline, connect).await {
            Err(_) => return Err(AttemptError::Timeout),
            Ok(Err(error)) => {
                self.shared.close().await;
                return Err(error);
            }
            Ok(Ok(_)) => {}
        }
        let (tx, rx) = oneshot::channel();
        let registered = {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(AttemptError::Broken);
            }
            let mut id = u16::from_be_bytes([packet[0], packet[1]]);
            let mut tries = 0;
            while state.pending.contains_key(&id) {
                if tries == ID_TRIES {
                    return Err(AttemptError::NoFreeId);
                }
                id = rand::random();
                tries += 1;
            }
            packet[..2].copy_from_slice(&id.to_be_bytes());
            let token = state.next_token;
            state.next_token += 1;
            state.pending.insert(
                id,
                Pending {
                    sent: packet.to_vec(),
                    token,
                    reply: tx,
                },
            );
            state.last_used = Instant::now();
            Registered {
                shared: &self.shared,
                id,
                token,
            }
        };
        let framed = frame(packet);
        let written = timeout_at(deadline, async {
            match self.shared.writer.lock().await.as_mut() {
                Some(writer) => writer.write_all(&framed).await,
                None => Err(std::io::ErrorKind::NotConnected.into()),
            }
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            // A half-written frame garbles the stream for everyone: close it.
            self.close().await;
            return Err(AttemptError::Broken);
        }
        let answer = timeout_at(deadline, rx).await;
        drop(registered);
        match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(AttemptError::Broken),
            Err(_) => Err(AttemptError::Timeout),
        }
    }

    async fn connect(&self, addr: SocketAddr, inner: &Inner) -> Result<AbortHandle, AttemptError> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        *self.shared.writer.lock().await = Some(write);
        lock(&self.shared.state).last_used = Instant::now();
        let reader = read_loop(
            Arc::clone(&self.shared),
            read,
            inner.expire,
            Arc::clone(&inner.counters),
        );
        let tasks = inner.tasks.clone();
        let reader = inner.tasks.spawn(async move {
            tokio::select! {
                () = reader => {}
                () = tasks.forced() => {}
            }
        });
        Ok(reader.abort_handle())
    }

    async fn close(&self) {
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        self.shared.close().await;
    }
}

/// Removes a query's pending entry when it stops waiting (answered, timed out or dropped).
struct Registered<'a> {
    shared: &'a ConnShared,
    id: u16,
    token: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        if state
            .pending
            .get(&self.id)
            .is_some_and(|p| p.token == self.token)
        {
            state.pending.remove(&self.id);
        }
    }
}

impl ConnShared {
    /// Marks the connection closed, fails its pending queries at once and shuts the write
    /// side (so the socket closes once the reader is gone).
    async fn close(&self) {
        {
            let mut state = lock(&self.state);
            state.closed = true;
            state.pending.clear();
        }
        self.writer.lock().await.take();
    }

    /// Hands a response to the query it answers; anything else is dropped and counted.
    fn deliver(&self, response: Vec<u8>, counters: &Counters) {
        let mut state = lock(&self.state);
        let id = u16::from_be_bytes([response[0], response[1]]);
        let valid = state.pending.get(&id).is_some_and(|p| {
            wire::parse_query(&p.sent)
                .is_ok_and(|sent| wire::parse_response(&sent, &response).is_ok())
        });
        match state.pending.remove(&id) {
            Some(pending) if valid => {
                state.last_used = Instant::now();
                drop(state);
                let _ = pending.reply.send(response);
            }
            other => {
                if let Some(pending) = other {
                    state.pending.insert(id, pending); // keep waiting for the real one
                }
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Idle: nothing pending or leased, and unused for `expire`.
    fn expired(&self, expire: Duration) -> bool {
        let state = lock(&self.state);
        state.pending.is_empty()
            && self.load.load(Ordering::Acquire) == 0
            && state.last_used + expire <= Instant::now()
    }
}

/// Reads length-prefixed responses and delivers them until the connection fails or has
/// been idle for `expire`.
async fn read_loop(
    shared: Arc<ConnShared>,
    mut read: OwnedReadHalf,
    expire: Duration,
    counters: Arc<Counters>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(TCP_READ_CHUNK);
    loop {
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            if len >= HEADER_LEN {
                shared.deliver(buf[2..2 + len].to_vec(), &counters);
            } else {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            buf.drain(..2 + len);
        }
        let wake = {
            let state = lock(&shared.state);
            let now = Instant::now();
            let idle_at = if state.pending.is_empty() {
                state.last_used + expire
            } else {
                now + expire // busy: look again later
            };
            idle_at.max(now + MIN_IDLE_CHECK)
        };
        buf.reserve(TCP_READ_CHUNK);
        // read_buf is cancel safe: a timeout loses no bytes.
        match timeout_at(wake, read.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) if shared.expired(expire) => break,
            Err(_) => {}
        }
    }
    shared.close().await;
}

/// Builds our own query for `query`'s question: a new ID, RD=1, CD copied, the qname
/// lower-cased (one cache entry serves every spelling), and an OPT with our UDP size and the
/// client's DO bit (EDNS options of the client are hop-by-hop and not passed on).
pub fn upstream_query(query: &Query<'_>, id: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags: u16 = 0x0100 | if query.checking_disabled { 0x0010 } else { 0 };
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    wire::lowercase_qname(query.qname(), out);
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    let dnssec_ok = query.edns.is_some_and(|e| e.dnssec_ok);
    out.push(0); // root owner
    out.extend_from_slice(&wire::rtype::OPT.to_be_bytes());
    out.extend_from_slice(&wire::OUR_UDP_SIZE.to_be_bytes());
    out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::{build_query, parse_query, rtype, Edns};

    #[test]
    fn upstream_query_is_a_valid_lowercase_query_with_do_copied() {
        let mut q = Vec::new();
        build_query(
            7,
            "ApI.S1.Test",
            rtype::A,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: true,
            }),
            &mut q,
        );
        let client = parse_query(&q).unwrap();
        let mut up = Vec::new();
        upstream_query(&client, 0xbeef, &mut up);
        let parsed = parse_query(&up).unwrap();
        assert_eq!(parsed.id, 0xbeef);
        assert_eq!(parsed.qname_text(), "api.s1.test.");
        assert_eq!(parsed.edns.unwrap().udp_size, wire::OUR_UDP_SIZE);
        assert!(parsed.edns.unwrap().dnssec_ok);
        assert!(parsed.recursion_desired);
    }

    #[test]
    fn probe_query_honours_domain_and_no_rec() {
        let mut config = config::Forward::new(".".into(), vec![]);
        config.health_check_domain = "example.org.".into();
        config.health_check_no_rec = true;
        let forwarder = Forwarder::new(&config);
        let probe = parse_query(&forwarder.inner.probe).unwrap();
        assert_eq!(probe.qname_text(), "example.org.");
        assert_eq!(probe.qtype, rtype::NS);
        assert!(!probe.recursion_desired);
        let forwarder = Forwarder::new(&config::Forward::new(".".into(), vec![]));
        let probe = parse_query(&forwarder.inner.probe).unwrap();
        assert_eq!(probe.qname_text(), ".");
        assert!(probe.recursion_desired);
    }
}
