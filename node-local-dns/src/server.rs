//! Serving DNS: UDP and TCP listeners in front of the zones' caches. A hit is answered on the
//! receiving task without an allocation beyond the reply; a miss joins the single flight for
//! its key: N concurrent identical misses cause one upstream query, whose answer every waiter
//! renders with its own ID and question bytes.
//!
//! Everything a query can make the server hold is bounded: upstream queries by the
//! forwarder's `max_concurrent`, waiters per key by [`MAX_WAITERS_PER_KEY`], UDP misses being
//! answered per listener by [`MAX_PENDING_MISSES`], TCP connections per listener by
//! [`MAX_TCP_CONNECTIONS`], each with one query in flight and a deadline on every read
//! ([`TCP_IDLE`]) and every write ([`TCP_WRITE_TIMEOUT`]). Past a bound the answer is
//! immediate (REFUSED, SERVFAIL, or a closed connection), never a queue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tracing::debug;

use crate::cache::{Cache, Key, KeyBuf, Kind, Lookup, Policy};
use crate::forward::{self, ForwardError, Forwarder};
use crate::metrics::{CacheOutcome, Metrics, Plugin, ZoneMetrics};
use crate::wire::{self, Query, WireImage};
use agentkit::sync::lock;
use agentkit::Shutdown;

/// Waiters on one in-flight key, at most; more get SERVFAIL instead of queueing forever.
pub const MAX_WAITERS_PER_KEY: usize = 4096;

/// UDP queries of one listener being answered off the hit path at once (each is a task
/// waiting for its upstream query or the one it joined), at most; past it a query is
/// answered REFUSED on the spot, from the receiving thread. It bounds what the forwarder's
/// cap does not: waiters on queries already in flight (up to [`MAX_WAITERS_PER_KEY`] per key),
/// and blocks whose `forward` has `max_concurrent 0`. Four times the default
/// `max_concurrent` ([`crate::config::DEFAULT_MAX_CONCURRENT`]), so a full forwarder still
/// leaves room for coalesced waiters. `tests/flood.rs` measured 10 to 12 KiB of memory per
/// upstream query in flight (its two tasks and buffers); a waiter is one task and two small
/// buffers.
pub const MAX_PENDING_MISSES: usize = 4096;

/// Open DNS TCP connections per listener, at most. DNS over TCP from pods is the exception
/// (truncated answers, `use-vc`): one connection per retried query, closed by the client after
/// its answer. Past the cap a new connection is accepted and closed at once (counted in
/// `node_local_dns_tcp_connections_refused_total`) rather than left in the kernel's accept
/// queue: the client learns at once and retries or falls back, instead of waiting out a
/// connect timeout behind connections that may never send anything.
pub const MAX_TCP_CONNECTIONS: usize = 256;

/// TCP connections without a query for this long are closed; also the bound on reading the
/// rest of a query once its length came.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Writing one reply on a TCP connection takes at most this long; a client that does not read
/// its replies loses the connection. 5 s is the default timeout of stub resolvers
/// (`resolv.conf` `timeout:5`): a client that has not taken its answer by then has given up.
pub const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One zone of a server block: a cache and the upstreams behind it.
#[derive(Debug)]
pub struct Zone {
    /// The zone in lower-case wire form (`[0]` for the root).
    name: Vec<u8>,
    cache: Arc<Mutex<Cache>>,
    forwarder: Forwarder,
    inflight: Mutex<HashMap<Key, Vec<oneshot::Sender<Outcome>>>>,
    /// Where upstream exchanges are counted.
    metrics: Option<Metrics>,
    /// Where its upstream fetches run.
    tasks: Shutdown,
}

/// The result of one upstream exchange, shared by every waiter of the single flight.
#[derive(Debug, Clone)]
enum Outcome {
    /// Cached: render from the image with this TTL.
    Cached(Arc<WireImage>, u32),
    /// An answer that may not be cached (for example REFUSED): passed on as it came.
    Uncached(Arc<Vec<u8>>),
    /// No upstream answered.
    Failed,
    /// `max_concurrent` upstream queries are in flight: answered REFUSED at once.
    Overloaded,
}

impl Zone {
    /// A zone (`"."` or `"cluster.local."`) with its cache policy and upstreams.
    pub fn new(zone: &str, policy: Policy, forwarder: Forwarder) -> Self {
        Zone::with_cache(zone, Arc::new(Mutex::new(Cache::new(policy))), forwarder)
    }

    /// A zone using an existing cache: a reload that keeps a block's cache policy keeps its
    /// entries.
    pub fn with_cache(zone: &str, cache: Arc<Mutex<Cache>>, forwarder: Forwarder) -> Self {
        let mut name = Vec::new();
        wire::encode_name(&zone.to_ascii_lowercase(), &mut name);
        Zone {
            name,
            cache,
            forwarder,
            inflight: Mutex::new(HashMap::new()),
            metrics: None,
            tasks: Shutdown::new(),
        }
    }

    /// Runs this zone's upstream fetches on `tasks` (a leaving agent waits for them).
    pub fn with_tasks(mut self, tasks: &Shutdown) -> Self {
        self.tasks = tasks.clone();
        self
    }

    /// Counts this zone's upstream exchanges in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The cache (for metrics, reloads and the kernel mirror).
    pub fn cache(&self) -> &Arc<Mutex<Cache>> {
        &self.cache
    }

    /// The forwarder (for its counters).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
}

/// A zone as one listener serves it: the zone and the metric children of this listener.
#[derive(Debug, Clone)]
pub struct Served {
    /// The zone (shared by every listener of its server block).
    pub zone: Arc<Zone>,
    /// Its metrics on this listener, if metrics are kept.
    pub metrics: Option<ZoneMetrics>,
}

/// The zones served on one set of sockets; a query goes to the most specific zone. Cheap to
/// clone; [`Server::replace`] swaps the zones for every clone at once (a reload).
#[derive(Debug, Clone)]
pub struct Server {
    zones: Arc<ArcSwap<Vec<Served>>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    metrics: Option<Metrics>,
    /// The listener is IPv6 (the `family` label).
    v6: bool,
    /// Set while a loop-detection probe is out: its lower-case wire qname and how often it
    /// came back.
    loop_probe: Mutex<Option<(Vec<u8>, usize)>>,
    loop_armed: AtomicBool,
    /// Open TCP client connections.
    tcp_open: AtomicUsize,
    /// UDP queries being answered off the hit path ([`MAX_PENDING_MISSES`]).
    pending_misses: AtomicUsize,
    /// Where misses and TCP connections are served.
    tasks: Shutdown,
}

/// One UDP query's claim on its listener's [`MAX_PENDING_MISSES`]; given back when dropped.
#[derive(Debug)]
pub struct MissPermit(Arc<Shared>);

impl Drop for MissPermit {
    fn drop(&mut self) {
        self.0.pending_misses.fetch_sub(1, Ordering::AcqRel);
    }
}

/// CoreDNS's `loop`: the probe seen this often means the query came back to us.
pub const LOOP_THRESHOLD: usize = 2;

impl Server {
    /// Serves `zones` (any order), without metrics, its tasks on a tracker of its own.
    pub fn new(zones: Vec<Arc<Zone>>) -> Self {
        let served = zones
            .into_iter()
            .map(|zone| Served {
                zone,
                metrics: None,
            })
            .collect();
        Server::with_metrics(served, None, false, &Shutdown::new())
    }

    /// Serves `zones` with their metrics; `v6` says whether the listener is IPv6. Misses and
    /// TCP connections are served on `tasks`; TCP connections end when it is forced.
    pub fn with_metrics(
        zones: Vec<Served>,
        metrics: Option<Metrics>,
        v6: bool,
        tasks: &Shutdown,
    ) -> Self {
        Server {
            zones: Arc::new(ArcSwap::from_pointee(sorted(zones))),
            shared: Arc::new(Shared {
                metrics,
                v6,
                tasks: tasks.clone(),
                ..Shared::default()
            }),
        }
    }

    /// Runs `task` where this listener's misses run (for the batched UDP workers).
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.shared.tasks.spawn(task);
    }

    /// Replaces the zones (a reload): queries already in flight finish with the zones they
    /// started with, the next query sees the new ones.
    pub fn replace(&self, zones: Vec<Served>) {
        self.zones.store(Arc::new(sorted(zones)));
    }

    /// The zones now served.
    pub fn zones(&self) -> Arc<Vec<Served>> {
        self.zones.load_full()
    }

    /// Arms loop detection for the probe name `qname` (any case).
    pub fn arm_loop_probe(&self, qname: &str) {
        let mut wire_name = Vec::new();
        wire::encode_name(&qname.to_ascii_lowercase(), &mut wire_name);
        *lock(&self.shared.loop_probe) = Some((wire_name, 0));
        self.shared.loop_armed.store(true, Ordering::Release);
    }

    /// Disarms loop detection; returns how often the probe came back.
    pub fn disarm_loop_probe(&self) -> usize {
        self.shared.loop_armed.store(false, Ordering::Release);
        lock(&self.shared.loop_probe)
            .take()
            .map_or(0, |(_, seen)| seen)
    }

    fn note_loop_probe(&self, key: &Key, name_len: usize) {
        if !self.shared.loop_armed.load(Ordering::Acquire) {
            return;
        }
        if let Some((probe, seen)) = lock(&self.shared.loop_probe).as_mut() {
            if key.as_bytes()[..name_len] == probe[..] {
                *seen += 1;
                if let Some(m) = &self.shared.metrics {
                    m.loop_probes.inc();
                }
            }
        }
    }

    /// Answers one query packet into `out` (cleared); over UDP the reply fits what the client
    /// accepts (else TC=1), over TCP up to 65535 bytes. Returns false when nothing should be
    /// sent (the packet was not even a DNS header).
    pub async fn answer(&self, packet: &[u8], udp: bool, out: &mut Vec<u8>) -> bool {
        let start = Instant::now();
        let query = match wire::parse_query(packet) {
            Ok(q) => q,
            Err(wire::WireError::NotQuery) => {
                return wire::render_reject(packet, wire::rcode::NOTIMP, out)
            }
            Err(_) => return wire::render_reject(packet, wire::rcode::FORMERR, out),
        };
        let limit = if udp {
            query.udp_limit()
        } else {
            wire::MAX_MESSAGE
        };
        if query.edns.is_some_and(|e| e.version > 0) {
            wire::render_error(&query, wire::rcode::BADVERS, out);
            return true;
        }
        if query.qclass == CLASS_CHAOS {
            answer_chaos(&query, out);
            return true;
        }
        let key = Key::of(&query);
        let name_len = query.qname().len();
        let zones = self.zones.load();
        let Some(served) = zone_for(&zones, &key.as_bytes()[..name_len]).cloned() else {
            wire::render_error(&query, u16::from(wire::rcode::REFUSED), out);
            return true;
        };
        drop(zones);
        let metrics = served.metrics.as_ref();
        if let Some(m) = metrics {
            let edns = query.edns;
            m.request(
                !udp,
                self.shared.v6,
                query.qtype,
                edns.map_or(wire::CLASSIC_UDP_SIZE, |e| e.udp_size),
                edns.is_some_and(|e| e.dnssec_ok),
            );
        }
        self.note_loop_probe(&key, name_len);
        let zone = &served.zone;
        let plugin = match cached(zone, packet, key.as_bytes(), metrics) {
            Some((image, ttl)) => {
                wire::render(&query, &image, ttl, limit, out);
                Plugin::Cache
            }
            None => {
                if let Some(m) = metrics {
                    m.cache(CacheOutcome::Miss);
                }
                let outcome = resolve(zone, packet, key.clone(), !udp, &self.shared).await;
                deliver(zone, &query, &key, outcome, limit, out)
            }
        };
        if let Some(m) = metrics {
            let rcode = out.get(3).map_or(0, |b| b & 0x0F);
            m.response(!udp, query.qtype, rcode, plugin, out.len(), start.elapsed());
        }
        true
    }

    /// Serves UDP on `socket` until the task is dropped (the tokio path; the agent's own
    /// listeners use the batched [`crate::udp`] workers).
    pub async fn serve_udp(self, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let mut out = Vec::with_capacity(1232);
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let packet = &buf[..n];
            // Hits are answered right here; a miss gets its own task so one slow upstream
            // does not hold up the socket.
            if self.try_cached(packet, &mut out) {
                let _ = socket.send_to(&out, peer).await;
                continue;
            }
            if self.try_refuse_overloaded(packet, &mut out) {
                let _ = socket.send_to(&out, peer).await;
                continue;
            }
            let Some(permit) = self.admit_miss() else {
                if self.refuse_busy(packet, &mut out) {
                    let _ = socket.send_to(&out, peer).await;
                }
                continue;
            };
            let (server, socket, packet) = (self.clone(), Arc::clone(&socket), packet.to_vec());
            self.spawn(async move {
                let _permit = permit;
                let mut out = Vec::with_capacity(512);
                if server.answer(&packet, true, &mut out).await {
                    let _ = socket.send_to(&out, peer).await;
                }
            });
        }
    }

    /// A claim on one of the listener's [`MAX_PENDING_MISSES`], to be held by the task that
    /// answers a UDP query off the hit path; None when all are taken (then
    /// [`Server::refuse_busy`] answers).
    pub fn admit_miss(&self) -> Option<MissPermit> {
        let before = self.shared.pending_misses.fetch_add(1, Ordering::AcqRel);
        let permit = MissPermit(Arc::clone(&self.shared));
        (before < MAX_PENDING_MISSES).then_some(permit)
    }

    /// Answers a UDP query that [`Server::admit_miss`] turned away: REFUSED at once (or
    /// FORMERR/NOTIMP, as [`Server::answer`] would), counted in
    /// `node_local_dns_misses_refused_total`. Returns false when nothing should be sent.
    pub fn refuse_busy(&self, packet: &[u8], out: &mut Vec<u8>) -> bool {
        let start = Instant::now();
        if let Some(m) = &self.shared.metrics {
            m.misses_refused.inc();
        }
        let query = match wire::parse_query(packet) {
            Ok(q) => q,
            Err(wire::WireError::NotQuery) => {
                return wire::render_reject(packet, wire::rcode::NOTIMP, out)
            }
            Err(_) => return wire::render_reject(packet, wire::rcode::FORMERR, out),
        };
        wire::render_error(&query, u16::from(wire::rcode::REFUSED), out);
        let key = Key::of(&query);
        let zones = self.zones.load();
        if let Some(m) = zone_for(&zones, &key.as_bytes()[..query.qname().len()])
            .and_then(|served| served.metrics.as_ref())
        {
            self.count_refused(m, &query, false, out.len(), start);
        }
        true
    }

    /// Answers a UDP query REFUSED on the spot, without a task, when it would have to start
    /// an upstream query its zone's forwarder has no room for: `max_concurrent` queries in
    /// flight, none for its key to join, and no serve-stale to fall back on. That is what
    /// [`Server::answer`] would reply a moment later; answered here, a flood of new names
    /// past the cap costs the receiving thread a parse per query and the runtime nothing.
    /// Counted like the forwarder's own refusals. Returns false for everything else.
    pub fn try_refuse_overloaded(&self, packet: &[u8], out: &mut Vec<u8>) -> bool {
        let start = Instant::now();
        let Ok(query) = wire::parse_query(packet) else {
            return false;
        };
        if query.edns.is_some_and(|e| e.version > 0) || query.qclass == CLASS_CHAOS {
            return false;
        }
        let key = Key::of(&query);
        let name_len = query.qname().len();
        let zones = self.zones.load();
        let Some(served) = zone_for(&zones, &key.as_bytes()[..name_len]) else {
            return false;
        };
        let zone = &served.zone;
        if lock(&zone.cache).policy().serve_stale.is_some()
            || lock(&zone.inflight).contains_key(&key)
            || !zone.forwarder.reject_if_full()
        {
            return false;
        }
        self.note_loop_probe(&key, name_len);
        if let Some(m) = &zone.metrics {
            m.overloaded.inc();
        }
        wire::render_error(&query, u16::from(wire::rcode::REFUSED), out);
        if let Some(m) = &served.metrics {
            self.count_refused(m, &query, true, out.len(), start);
        }
        true
    }

    /// Counts a UDP query answered REFUSED by the server itself (`miss`: after a cache miss).
    fn count_refused(
        &self,
        m: &ZoneMetrics,
        query: &Query<'_>,
        miss: bool,
        len: usize,
        start: Instant,
    ) {
        let edns = query.edns;
        m.request(
            false,
            self.shared.v6,
            query.qtype,
            edns.map_or(wire::CLASSIC_UDP_SIZE, |e| e.udp_size),
            edns.is_some_and(|e| e.dnssec_ok),
        );
        if miss {
            m.cache(CacheOutcome::Miss);
        }
        m.response(
            false,
            query.qtype,
            wire::rcode::REFUSED,
            Plugin::Server,
            len,
            start.elapsed(),
        );
    }

    /// Answers a UDP query into `out` if no upstream is needed (a live or stale hit) and
    /// returns true; false for everything else, which [`Server::answer`] handles.
    pub fn try_cached(&self, packet: &[u8], out: &mut Vec<u8>) -> bool {
        let start = Instant::now();
        let Ok(query) = wire::parse_query(packet) else {
            return false; // the full path answers FORMERR/NOTIMP
        };
        if query.edns.is_some_and(|e| e.version > 0) {
            return false;
        }
        // On the stack: a hit allocates nothing (tests/hit_alloc.rs).
        let key = KeyBuf::of(&query);
        let zones = self.zones.load();
        let Some(served) = zone_for(&zones, &key.as_bytes()[..query.qname().len()]) else {
            return false;
        };
        let Some((image, ttl)) = cached(
            &served.zone,
            packet,
            key.as_bytes(),
            served.metrics.as_ref(),
        ) else {
            return false;
        };
        wire::render(&query, &image, ttl, query.udp_limit(), out);
        if let Some(m) = &served.metrics {
            let edns = query.edns;
            m.request(
                false,
                self.shared.v6,
                query.qtype,
                edns.map_or(wire::CLASSIC_UDP_SIZE, |e| e.udp_size),
                edns.is_some_and(|e| e.dnssec_ok),
            );
            let rcode = out.get(3).map_or(0, |b| b & 0x0F);
            m.response(
                false,
                query.qtype,
                rcode,
                Plugin::Cache,
                out.len(),
                start.elapsed(),
            );
        }
        true
    }

    /// Serves TCP on `listener` until the task is dropped: length-prefixed messages, answered
    /// in order (one query in flight per connection), the connection closed after
    /// [`TCP_IDLE`] without a query or when a reply cannot be written within
    /// [`TCP_WRITE_TIMEOUT`]; at most [`MAX_TCP_CONNECTIONS`] open, more are closed at once.
    pub async fn serve_tcp(self, listener: TcpListener) {
        self.serve_tcp_shared(Arc::new(listener)).await;
    }

    /// [`Server::serve_tcp`] on a listener the caller keeps too (to steer and drain it).
    pub async fn serve_tcp_shared(self, listener: Arc<TcpListener>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: give connections in progress a moment.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            self.spawn_tcp(stream);
        }
    }

    /// Serves the connections already in `listener`'s accept queue (a leaving instance must
    /// not reset them) and returns once it is empty.
    pub fn drain_tcp_backlog(self, listener: &TcpListener) {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        while let std::task::Poll::Ready(Ok((stream, _))) = listener.poll_accept(&mut cx) {
            self.spawn_tcp(stream);
        }
    }

    /// Serves one accepted connection on its own task, or closes it at once when
    /// [`MAX_TCP_CONNECTIONS`] are open.
    fn spawn_tcp(&self, stream: TcpStream) {
        let server = self.clone();
        let open = server.shared.tcp_open.fetch_add(1, Ordering::AcqRel);
        if open >= MAX_TCP_CONNECTIONS {
            server.shared.tcp_open.fetch_sub(1, Ordering::AcqRel);
            if let Some(m) = &server.shared.metrics {
                m.tcp_refused.inc();
            }
            debug!(open, "dns tcp connection refused: too many open");
            drop(stream);
            return;
        }
        let tasks = self.shared.tasks.clone();
        tasks.clone().spawn(async move {
            let peer = stream.peer_addr().ok();
            tokio::select! {
                result = server.tcp_connection(stream) => if let Err(error) = result {
                    debug!(%error, ?peer, "dns tcp connection ended");
                },
                () = tasks.forced() => {}
            }
            server.shared.tcp_open.fetch_sub(1, Ordering::AcqRel);
        });
    }

    async fn tcp_connection(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut out = Vec::new();
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                _ => return Ok(()),
            };
            let mut packet = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if self.answer(&packet, false, &mut out).await {
                let mut framed = Vec::with_capacity(out.len() + 2);
                framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
                framed.extend_from_slice(&out);
                tokio::time::timeout(TCP_WRITE_TIMEOUT, stream.write_all(&framed))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            }
        }
    }
}

/// Whether wire name `name` equals `zone` or lies below it (both lower-case).
fn is_subdomain(name: &[u8], zone: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        if name[i..] == *zone {
            return true;
        }
        i += usize::from(name[i]) + 1;
    }
    false
}

/// The most specific zone containing the lower-case wire qname.
fn zone_for<'a>(zones: &'a [Served], qname: &[u8]) -> Option<&'a Served> {
    zones.iter().find(|z| is_subdomain(qname, &z.zone.name))
}

/// Most specific zone first.
fn sorted(mut zones: Vec<Served>) -> Vec<Served> {
    zones.sort_by_key(|z| std::cmp::Reverse(z.zone.name.len()));
    zones
}

/// QCLASS CH (RFC 1035 §3.2.4).
const CLASS_CHAOS: u16 = 3;

/// Answers `id.server.` and `version.server.` in class CH (RFC 4892) with who we are, which
/// the readiness self-test uses to prove the listener answers without asking any upstream;
/// other CH names are REFUSED.
fn answer_chaos(query: &Query<'_>, out: &mut Vec<u8>) {
    let name = query.qname_text().to_ascii_lowercase();
    let text: &str = match name.as_str() {
        "id.server." | "hostname.bind." => "node-local-dns",
        "version.server." | "version.bind." => env!("CARGO_PKG_VERSION"),
        _ => {
            wire::render_error(query, u16::from(wire::rcode::REFUSED), out);
            return;
        }
    };
    if query.qtype != wire::rtype::TXT && query.qtype != wire::rtype::ANY {
        wire::render_error(query, 0, out);
        return;
    }
    // The header of an empty NOERROR reply, then one TXT record whose owner points at the
    // question's name (offset 12).
    wire::render_error(query, 0, out);
    let at = usize::from(12 + query.question.len() as u16);
    let mut record = Vec::with_capacity(16 + text.len());
    record.extend_from_slice(&[0xC0, 12]);
    record.extend_from_slice(&wire::rtype::TXT.to_be_bytes());
    record.extend_from_slice(&CLASS_CHAOS.to_be_bytes());
    record.extend_from_slice(&0u32.to_be_bytes());
    record.extend_from_slice(&(text.len() as u16 + 1).to_be_bytes());
    record.push(text.len() as u8);
    record.extend_from_slice(text.as_bytes());
    out.splice(at..at, record);
    out[7] = 1; // ANCOUNT
}

/// A usable cache entry for `key` (live, or stale in immediate mode) with its TTL; starts the
/// background refresh the cache asks for. None on a miss. Counts the hit.
fn cached(
    zone: &Arc<Zone>,
    packet: &[u8],
    key: &[u8],
    metrics: Option<&ZoneMetrics>,
) -> Option<(Arc<WireImage>, u32)> {
    let lookup = lock(&zone.cache).lookup(key, Instant::now());
    let (image, ttl, refresh_now, outcome) = match lookup {
        Lookup::Hit {
            image,
            ttl,
            prefetch,
            kind,
        } => (
            image,
            ttl,
            prefetch,
            CacheOutcome::Hit {
                denial: kind == Kind::Denial,
            },
        ),
        Lookup::Stale {
            image,
            ttl,
            refresh,
        } => (image, ttl, refresh, CacheOutcome::Stale),
        Lookup::Miss => return None,
    };
    if let Some(m) = metrics {
        m.cache(outcome);
        if refresh_now && matches!(outcome, CacheOutcome::Hit { .. }) {
            m.prefetched();
        }
    }
    if refresh_now {
        refresh(zone, packet, Key::from_bytes(key));
    }
    Some((image, ttl))
}

/// Joins (or starts) the single flight for `key`.
async fn resolve(
    zone: &Arc<Zone>,
    packet: &[u8],
    key: Key,
    client_tcp: bool,
    shared: &Shared,
) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut inflight = lock(&zone.inflight);
        match inflight.get_mut(&key) {
            Some(waiters) if waiters.len() >= MAX_WAITERS_PER_KEY => return Outcome::Failed,
            Some(waiters) => {
                waiters.push(tx);
                if let Some(m) = &shared.metrics {
                    m.coalesced.inc();
                }
                false
            }
            None => {
                inflight.insert(key.clone(), vec![tx]);
                true
            }
        }
    };
    if start {
        // The fetch runs on its own task: a waiter that goes away cannot strand the others.
        zone.tasks
            .spawn(fetch(Arc::clone(zone), packet.to_vec(), key, client_tcp));
    }
    rx.await.unwrap_or(Outcome::Failed)
}

/// A background refresh (prefetch or stale): a single flight nobody waits on.
fn refresh(zone: &Arc<Zone>, packet: &[u8], key: Key) {
    let mut inflight = lock(&zone.inflight);
    if inflight.contains_key(&key) {
        return;
    }
    inflight.insert(key.clone(), Vec::new());
    zone.tasks
        .spawn(fetch(Arc::clone(zone), packet.to_vec(), key, false));
}

async fn fetch(zone: Arc<Zone>, packet: Vec<u8>, key: Key, client_tcp: bool) {
    let outcome = match wire::parse_query(&packet) {
        Ok(query) => exchange(&zone, &query, &key, client_tcp).await,
        Err(_) => Outcome::Failed,
    };
    if matches!(outcome, Outcome::Failed | Outcome::Overloaded) {
        // Tell the entry, also when nobody waits (a prefetch or stale refresh): else it stays
        // "refreshing" and is never refreshed again (RFC 8767 failure recheck). A refresh
        // turned away by `max_concurrent` failed too, and waits for the recheck like one.
        lock(&zone.cache).stale_on_failure(&key, Instant::now());
    }
    let waiters = lock(&zone.inflight).remove(&key).unwrap_or_default();
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

async fn exchange(zone: &Zone, query: &Query<'_>, key: &Key, client_tcp: bool) -> Outcome {
    let exchange = match zone.forwarder.forward(query, client_tcp).await {
        Ok(exchange) => exchange,
        Err(ForwardError::Overloaded) => {
            if let Some(m) = &zone.metrics {
                m.overloaded.inc();
            }
            return Outcome::Overloaded;
        }
        Err(ForwardError::NoAnswer) => return Outcome::Failed,
    };
    let forward::Exchange {
        response,
        query: upstream_query,
        upstream,
        elapsed,
    } = exchange;
    if let Some(m) = &zone.metrics {
        let rcode = response.get(3).map_or(0, |b| b & 0x0F);
        m.upstream(
            &upstream.to_string(),
            crate::metrics::rcode_name(rcode),
            elapsed,
        );
    }
    let Ok(sent) = wire::parse_query(&upstream_query) else {
        return Outcome::Failed;
    };
    let Ok((info, image)) = wire::parse_response(&sent, &response) else {
        return Outcome::Failed;
    };
    match lock(&zone.cache).insert(key.clone(), &info, image, Instant::now()) {
        Some(stored) => Outcome::Cached(stored.image, stored.ttl),
        None => Outcome::Uncached(Arc::new(response)),
    }
}

fn deliver(
    zone: &Zone,
    query: &Query<'_>,
    key: &Key,
    outcome: Outcome,
    limit: usize,
    out: &mut Vec<u8>,
) -> Plugin {
    match outcome {
        Outcome::Cached(image, ttl) => {
            wire::render(query, &image, ttl, limit, out);
            Plugin::Forward
        }
        Outcome::Uncached(response) => {
            // Rendered like a cache entry: the client's header bits and OPT, not the upstream's.
            wire::render_uncached(query, &response, limit, out);
            Plugin::Forward
        }
        // Serve-stale answers overload like any upstream failure; else REFUSED (overload) or
        // SERVFAIL at once.
        Outcome::Overloaded | Outcome::Failed => {
            match lock(&zone.cache).stale_on_failure(key, Instant::now()) {
                Some((image, ttl)) => {
                    wire::render(query, &image, ttl, limit, out);
                    Plugin::Cache
                }
                None => {
                    let rcode = if matches!(outcome, Outcome::Overloaded) {
                        wire::rcode::REFUSED
                    } else {
                        wire::rcode::SERVFAIL
                    };
                    wire::render_error(query, u16::from(rcode), out);
                    Plugin::Server
                }
            }
        }
    }
}

/// Binds UDP and TCP on `addr` with SO_REUSEPORT, so a second instance can start beside this
/// one during a rolling update.
pub fn bind(addr: SocketAddr) -> std::io::Result<(Arc<UdpSocket>, TcpListener)> {
    use agentkit::net::{self, Sharing};
    let udp = net::udp_socket(addr, Sharing::ReusePort)?;
    udp.set_nonblocking(true)?;
    let tcp = net::tcp_listener(addr, Sharing::ReusePort, 1024)?;
    Ok((Arc::new(UdpSocket::from_std(udp.into())?), tcp))
}
