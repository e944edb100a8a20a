//! Serving DNS: UDP and TCP listeners in front of the zones' caches. A hit is answered on the
//! receiving task without an allocation beyond the reply; a miss joins the single flight for
//! its key: N concurrent identical misses cause one upstream query, whose answer every waiter
//! renders with its own ID and question bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tracing::debug;

use crate::cache::{Cache, Key, Lookup, Policy};
use crate::forward::Forwarder;
use crate::wire::{self, Query, WireImage};

/// Waiters on one in-flight key, at most; more get SERVFAIL instead of queueing forever.
pub const MAX_WAITERS_PER_KEY: usize = 4096;

/// One zone of a server block: a cache and the upstreams behind it.
#[derive(Debug)]
pub struct Zone {
    /// The zone in lower-case wire form (`[0]` for the root).
    name: Vec<u8>,
    cache: Mutex<Cache>,
    forwarder: Forwarder,
    inflight: Mutex<HashMap<Key, Vec<oneshot::Sender<Outcome>>>>,
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
}

impl Zone {
    /// A zone (`"."` or `"cluster.local."`) with its cache policy and upstreams.
    pub fn new(zone: &str, policy: Policy, forwarder: Forwarder) -> Self {
        let mut name = Vec::new();
        wire::encode_name(&zone.to_ascii_lowercase(), &mut name);
        Zone {
            name,
            cache: Mutex::new(Cache::new(policy)),
            forwarder,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The cache (for metrics and the kernel mirror).
    pub fn cache(&self) -> &Mutex<Cache> {
        &self.cache
    }

    /// The forwarder (for its counters).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
}

/// The zones served on one set of sockets; a query goes to the most specific zone.
#[derive(Debug, Clone)]
pub struct Server {
    zones: Arc<Vec<Arc<Zone>>>,
}

impl Server {
    /// Serves `zones` (any order).
    pub fn new(mut zones: Vec<Arc<Zone>>) -> Self {
        zones.sort_by_key(|z| std::cmp::Reverse(z.name.len()));
        Server {
            zones: Arc::new(zones),
        }
    }

    /// The most specific zone containing the lower-case wire qname.
    fn zone_for(&self, qname: &[u8]) -> Option<&Arc<Zone>> {
        self.zones.iter().find(|z| is_subdomain(qname, &z.name))
    }

    /// Answers one query packet into `out` (cleared); over UDP the reply fits what the client
    /// accepts (else TC=1), over TCP up to 65535 bytes. Returns false when nothing should be
    /// sent (the packet was not even a DNS header).
    pub async fn answer(&self, packet: &[u8], udp: bool, out: &mut Vec<u8>) -> bool {
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
        let key = Key::of(&query);
        let name_len = query.qname().len();
        let Some(zone) = self.zone_for(&key.as_bytes()[..name_len]).cloned() else {
            wire::render_error(&query, u16::from(wire::rcode::REFUSED), out);
            return true;
        };
        match cached(&zone, packet, &key) {
            Some((image, ttl)) => {
                wire::render(&query, &image, ttl, limit, out);
            }
            None => {
                let outcome = resolve(&zone, packet, key.clone()).await;
                deliver(&zone, &query, &key, outcome, limit, out);
            }
        }
        true
    }

    /// Serves UDP on `socket` until the task is dropped.
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
            if let Some(done) = self.try_cached(packet, &mut out) {
                if done {
                    let _ = socket.send_to(&out, peer).await;
                }
                continue;
            }
            let (server, socket, packet) = (self.clone(), Arc::clone(&socket), packet.to_vec());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(512);
                if server.answer(&packet, true, &mut out).await {
                    let _ = socket.send_to(&out, peer).await;
                }
            });
        }
    }

    /// Answers synchronously if no upstream is needed: Some(send?) or None for a miss.
    fn try_cached(&self, packet: &[u8], out: &mut Vec<u8>) -> Option<bool> {
        let Ok(query) = wire::parse_query(packet) else {
            return None; // the full path answers FORMERR/NOTIMP
        };
        if query.edns.is_some_and(|e| e.version > 0) {
            return None;
        }
        let key = Key::of(&query);
        let zone = self.zone_for(&key.as_bytes()[..query.qname().len()])?;
        let (image, ttl) = cached(zone, packet, &key)?;
        wire::render(&query, &image, ttl, query.udp_limit(), out);
        Some(true)
    }

    /// Serves TCP on `listener` until the task is dropped: length-prefixed messages, answered
    /// in order, the connection closed after 10 s without a query.
    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(error) = server.tcp_connection(stream).await {
                    debug!(%error, %peer, "dns tcp connection ended");
                }
            });
        }
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
                stream.write_all(&framed).await?;
            }
        }
    }
}

/// TCP connections without a query for this long are closed.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the cache inconsistent in a way that matters
    // more than answering; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// A usable cache entry for `key` (live, or stale in immediate mode) with its TTL; starts the
/// background refresh the cache asks for. None on a miss.
fn cached(zone: &Arc<Zone>, packet: &[u8], key: &Key) -> Option<(Arc<WireImage>, u32)> {
    let lookup = lock(&zone.cache).lookup(key, Instant::now());
    let (image, ttl, refresh_now) = match lookup {
        Lookup::Hit {
            image,
            ttl,
            prefetch,
            ..
        } => (image, ttl, prefetch),
        Lookup::Stale {
            image,
            ttl,
            refresh,
        } => (image, ttl, refresh),
        Lookup::Miss => return None,
    };
    if refresh_now {
        refresh(zone, packet, key.clone());
    }
    Some((image, ttl))
}

/// Joins (or starts) the single flight for `key`.
async fn resolve(zone: &Arc<Zone>, packet: &[u8], key: Key) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut inflight = lock(&zone.inflight);
        match inflight.get_mut(&key) {
            Some(waiters) if waiters.len() >= MAX_WAITERS_PER_KEY => return Outcome::Failed,
            Some(waiters) => {
                waiters.push(tx);
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
        tokio::spawn(fetch(Arc::clone(zone), packet.to_vec(), key));
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
    tokio::spawn(fetch(Arc::clone(zone), packet.to_vec(), key));
}

async fn fetch(zone: Arc<Zone>, packet: Vec<u8>, key: Key) {
    let outcome = match wire::parse_query(&packet) {
        Ok(query) => exchange(&zone, &query, &key).await,
        Err(_) => Outcome::Failed,
    };
    if matches!(outcome, Outcome::Failed) {
        // Tell the entry, also when nobody waits (a prefetch or stale refresh): else it stays
        // "refreshing" and is never refreshed again (RFC 8767 failure recheck).
        lock(&zone.cache).stale_on_failure(&key, Instant::now());
    }
    let waiters = lock(&zone.inflight).remove(&key).unwrap_or_default();
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

async fn exchange(zone: &Zone, query: &Query<'_>, key: &Key) -> Outcome {
    let Ok((response, upstream_query)) = zone.forwarder.forward(query).await else {
        return Outcome::Failed;
    };
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
) {
    match outcome {
        Outcome::Cached(image, ttl) => {
            wire::render(query, &image, ttl, limit, out);
        }
        Outcome::Uncached(response) => {
            // Rendered like a cache entry: the client's header bits and OPT, not the upstream's.
            wire::render_uncached(query, &response, limit, out);
        }
        Outcome::Failed => match lock(&zone.cache).stale_on_failure(key, Instant::now()) {
            Some((image, ttl)) => {
                wire::render(query, &image, ttl, limit, out);
            }
            None => wire::render_error(query, u16::from(wire::rcode::SERVFAIL), out),
        },
    }
}

/// Binds UDP and TCP on `addr` with SO_REUSEPORT, so a second instance can start beside this
/// one during a rolling update.
pub fn bind(addr: SocketAddr) -> std::io::Result<(Arc<UdpSocket>, TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_reuse_port(true)?;
    udp.set_nonblocking(true)?;
    udp.bind(&addr.into())?;
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.set_nonblocking(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(1024)?;
    Ok((
        Arc::new(UdpSocket::from_std(udp.into())?),
        TcpListener::from_std(tcp.into())?,
    ))
}
