//! The life of one client connection: read the head (PROXY header, then ClientHello or
//! CONNECT request) under the handshake deadline, route it, take the caps' slots, connect a
//! backend (retrying the next one), forward the bytes already read, then relay until either
//! side ends, the idle timeout, the maximum lifetime, the route's change policy or the
//! shutdown deadline closes it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::config::{Keepalive, Listener, Mode, OnChange, ProxyProtocolMode, SendProxyProtocol};
use crate::datapath::{self, Activity, DataPath, Leg};
use crate::metrics::{CloseReason, HandshakeFailure, Refusal};
use crate::protocol::{client_hello, http_connect, proxy_protocol};
use crate::routes::{self, Route, SniMatch};
use crate::{Runtime, Shared};

/// Extra buffer room beyond the ClientHello cap: TLS record headers and a PROXY header.
const HEAD_SLACK: usize = 8 * 1024;
/// How long a client may keep sending after an error answer before the socket is closed.
const LINGER_ON_ERROR: Duration = Duration::from_secs(1);

/// What the client sent before the payload.
#[derive(Debug)]
struct Head {
    buf: Vec<u8>,
    /// Where the payload (ClientHello or CONNECT request) starts, after a PROXY header.
    start: usize,
    proxy: Option<proxy_protocol::ProxyHeader>,
    kind: HeadKind,
}

#[derive(Debug)]
enum HeadKind {
    Tls(client_hello::ClientHello),
    Connect(http_connect::ConnectRequest),
}

/// Why a connection ended before relaying (the metric's reason), and for http-connect the
/// status to answer with.
#[derive(Debug, Clone, Copy)]
struct Failure {
    reason: HandshakeFailure,
    status: Option<u16>,
}

impl Failure {
    fn new(reason: HandshakeFailure) -> Self {
        Failure {
            reason,
            status: None,
        }
    }
    fn http(reason: HandshakeFailure, status: u16) -> Self {
        Failure {
            reason,
            status: Some(status),
        }
    }
}

/// Handles one accepted connection to the end.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    index: usize,
    client: TcpStream,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    // The runtime as of accept serves the handshake only; routing loads it again.
    let runtime = shared.state.load_full();
    let listener = runtime.config.listeners[index].clone();
    let handshake_timeout = runtime.config.handshake_timeout;
    let max_per_source = runtime.config.max_connections_per_source;
    let _ = client.set_nodelay(true);
    set_keepalive(&client, &runtime.config.keepalive);
    drop(runtime);

    // Without an honoured PROXY header the source is the peer: cap it before the handshake,
    // so one address cannot hold every slot with slow handshakes.
    let proxied = listener.proxy_protocol != ProxyProtocolMode::Off && trusted(&listener, peer);
    let early_slot = if proxied {
        None
    } else {
        match acquire_source(&shared, peer.ip().to_canonical(), max_per_source) {
            Some(slot) => Some(slot),
            None => return refuse(&shared, &listener, client, Refusal::SourceCap).await,
        }
    };
    let head = tokio::select! {
        head = tokio::time::timeout(handshake_timeout, read_head(&client, &listener, peer)) => match head {
            Ok(head) => head,
            Err(_) => Err(Failure::http(HandshakeFailure::Timeout, 408)),
        },
        () = shutdown.forced() => return,
    };
    let head = match head {
        Ok(head) => head,
        Err(failure) => return fail(&shared, &listener, client, failure).await,
    };
    serve(&shared, index, client, peer, head, early_slot, &shutdown).await;
}

async fn refuse(shared: &Shared, listener: &Listener, mut client: TcpStream, reason: Refusal) {
    shared.metrics.refused(&listener.name, reason);
    if listener.mode == Mode::HttpConnect {
        let _ = respond(&mut client, 503).await;
        linger_close(client).await;
    }
}

/// Closes after an error answer without losing it: unread client bytes would make the close
/// a reset that can destroy the answer in flight, so read (and discard) for a short, bounded
/// time first.
async fn linger_close(mut client: TcpStream) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut budget: usize = 64 * 1024;
    let _ = tokio::time::timeout(LINGER_ON_ERROR, async {
        while budget > 0 {
            match tokio::io::AsyncReadExt::read(&mut client, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn fail(shared: &Shared, listener: &Listener, mut client: TcpStream, failure: Failure) {
    shared
        .metrics
        .handshake_failed(&listener.name, failure.reason);
    debug!(listener = %listener.name, reason = failure.reason.as_str(), "closing before relaying");
    if listener.mode == Mode::HttpConnect {
        if let Some(status) = failure.status {
            let _ = respond(&mut client, status).await;
            linger_close(client).await;
        }
    }
}

async fn respond(client: &mut TcpStream, status: u16) -> std::io::Result<()> {
    let text = match status {
        200 => "Connection Established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let msg = if status == 200 {
        format!("HTTP/1.1 200 {text}\r\n\r\n")
    } else {
        format!("HTTP/1.1 {status} {text}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    };
    client.write_all(msg.as_bytes()).await
}

fn trusted(listener: &Listener, peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    listener.trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// Reads until the head is complete. Never reads past what the client sent in its first
/// flights: every byte read is kept and forwarded.
async fn read_head(
    client: &TcpStream,
    listener: &Listener,
    peer: SocketAddr,
) -> Result<Head, Failure> {
    let mut proxy_pending = match listener.proxy_protocol {
        ProxyProtocolMode::Off => false,
        _ if trusted(listener, peer) => true,
        ProxyProtocolMode::Required => return Err(Failure::new(HandshakeFailure::UntrustedProxy)),
        ProxyProtocolMode::Optional => false,
    };
    let cap = listener.max_client_hello_bytes + HEAD_SLACK;
    let mut buf = Vec::with_capacity(2048);
    let mut start = 0;
    let mut proxy = None;
    loop {
        if buf.len() >= cap {
            return Err(Failure::http(HandshakeFailure::TooLarge, 431));
        }
        if buf.capacity() == buf.len() {
            // Grow by at most what the cap still allows, never past it.
            buf.reserve_exact(buf.len().max(1024).min(cap - buf.len()));
        }
        loop {
            if client.readable().await.is_err() {
                return Err(Failure::new(HandshakeFailure::ReadError));
            }
            match client.try_read_buf(&mut buf) {
                Ok(0) => return Err(Failure::new(HandshakeFailure::Eof)),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Failure::new(HandshakeFailure::ReadError)),
            }
        }
        if proxy_pending {
            match proxy_protocol::parse(&buf) {
                Ok(None) => continue,
                Ok(Some(header)) => {
                    start = header.len;
                    proxy = Some(header);
                    proxy_pending = false;
                }
                Err(proxy_protocol::ProxyError::NotProxy)
                    if listener.proxy_protocol == ProxyProtocolMode::Optional =>
                {
                    proxy_pending = false;
                }
                Err(proxy_protocol::ProxyError::NotProxy) => {
                    return Err(Failure::new(HandshakeFailure::ProxyProtocolMissing))
                }
                Err(_) => return Err(Failure::http(HandshakeFailure::ProxyProtocolMalformed, 400)),
            }
        }
        let payload = &buf[start..];
        if payload.is_empty() {
            continue;
        }
        let kind = match listener.mode {
            Mode::Tls => match client_hello::parse(payload, listener.max_client_hello_bytes) {
                Ok(None) => continue,
                Ok(Some(hello)) => HeadKind::Tls(hello),
                Err(e) => return Err(Failure::new(e.into())),
            },
            Mode::HttpConnect => match http_connect::parse(payload) {
                Ok(None) => continue,
                Ok(Some(req)) => HeadKind::Connect(req),
                Err(e) => return Err(Failure::http(e.into(), e.status())),
            },
        };
        return Ok(Head {
            buf,
            start,
            proxy,
            kind,
        });
    }
}

fn set_keepalive(stream: &TcpStream, k: &Keepalive) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(k.time)
        .with_interval(k.interval)
        .with_retries(k.retries);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Per-source-IP slot, released on drop.
pub(crate) struct SourceSlot<'a> {
    shared: &'a Shared,
    ip: std::net::IpAddr,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.per_source.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

fn acquire_source<'a>(
    shared: &'a Shared,
    ip: std::net::IpAddr,
    max: Option<usize>,
) -> Option<Option<SourceSlot<'a>>> {
    let Some(max) = max else { return Some(None) };
    let mut map = shared.per_source.lock().ok()?;
    let n = map.entry(ip).or_insert(0);
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(Some(SourceSlot { shared, ip }))
}

/// What a routed connection needs from the runtime, copied so that the connection does not
/// keep a whole config and route table alive for its lifetime.
#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    keepalive: Keepalive,
    eject_after_failures: u32,
    probe_interval: Duration,
    access_log: bool,
    data_path: DataPath,
}

/// The route for a head, from the current runtime. A route retired by a reload racing this
/// lookup is looked up again in the new table.
fn route(shared: &Shared, index: usize, head: &Head) -> (Routed, Settings, Listener) {
    let mut runtime: Arc<Runtime> = shared.state.load_full();
    for _ in 0..2 {
        let routed = route_in(&runtime, head);
        if let Routed::Route(r, _) = &routed {
            if r.retired.is_cancelled() {
                runtime = shared.state.load_full();
                continue;
            }
        }
        return finish_route(routed, &runtime, index);
    }
    let routed = route_in(&runtime, head);
    finish_route(routed, &runtime, index)
}

fn finish_route(routed: Routed, runtime: &Runtime, index: usize) -> (Routed, Settings, Listener) {
    let c = &runtime.config;
    let settings = Settings {
        connect_timeout: c.connect_timeout,
        idle_timeout: c.idle_timeout,
        keepalive: c.keepalive,
        eject_after_failures: c.eject_after_failures,
        probe_interval: c.probe_interval,
        access_log: c.access_log,
        data_path: runtime.data_paths[index],
    };
    (routed, settings, c.listeners[index].clone())
}

/// The outcome of routing a head.
#[derive(Debug)]
enum Routed {
    /// This route; bytes from this offset of the head buffer are forwarded.
    Route(Arc<Route>, usize),
    /// Closed before relaying.
    Fail(Failure),
    /// Unknown SNI with `unknown_sni: reject`.
    Alert,
}

fn route_in(runtime: &Runtime, head: &Head) -> Routed {
    let proxy_addrs = head.proxy.as_ref().and_then(|h| h.addresses);
    match &head.kind {
        HeadKind::Tls(hello) => match runtime.table.route_tls(
            hello.server_name.as_deref(),
            proxy_addrs.map(|a| a.destination),
        ) {
            SniMatch::Route(r) => Routed::Route(Arc::clone(r), head.start),
            SniMatch::Reject => Routed::Alert,
            SniMatch::Close => Routed::Fail(Failure::new(HandshakeFailure::UnknownSni)),
        },
        HeadKind::Connect(req) => match req.destination.as_deref() {
            None => Routed::Fail(Failure::http(HandshakeFailure::MissingDestination, 400)),
            Some(d) => match runtime.table.lookup_destination(d) {
                Some(r) => Routed::Route(Arc::clone(r), head.start + req.head_len),
                None => Routed::Fail(Failure::http(HandshakeFailure::UnknownDestination, 403)),
            },
        },
    }
}

async fn serve(
    shared: &Shared,
    index: usize,
    mut client: TcpStream,
    peer: SocketAddr,
    head: Head,
    early_slot: Option<Option<SourceSlot<'_>>>,
    shutdown: &Shutdown,
) {
    let proxy_addrs = head.proxy.as_ref().and_then(|h| h.addresses);
    let client_addr = proxy_addrs.map_or(peer, |a| a.source);
    let sni = match &head.kind {
        HeadKind::Tls(hello) => hello.server_name.clone(),
        HeadKind::Connect(_) => None,
    };
    let (routed, settings, listener) = route(shared, index, &head);
    if let HeadKind::Tls(hello) = &head.kind {
        shared
            .metrics
            .client_hello_bytes
            .with_label_values(&[&listener.name])
            .observe(hello.record_bytes as f64);
    }
    let (route, forward_from) = match routed {
        Routed::Route(r, from) => (r, from),
        Routed::Alert => {
            let _ = client
                .write_all(&client_hello::ALERT_UNRECOGNIZED_NAME)
                .await;
            fail(
                shared,
                &listener,
                client,
                Failure::new(HandshakeFailure::UnknownSni),
            )
            .await;
            return;
        }
        Routed::Fail(failure) => return fail(shared, &listener, client, failure).await,
    };

    // Caps: the source (if not taken at accept), then the route.
    let max_per_source = shared.state.load().config.max_connections_per_source;
    let _source_slot = match early_slot {
        Some(slot) => slot,
        None => match acquire_source(shared, client_addr.ip().to_canonical(), max_per_source) {
            Some(slot) => slot,
            None => return refuse(shared, &listener, client, Refusal::SourceCap).await,
        },
    };
    let Some(mut slot) = route.try_acquire() else {
        return refuse(shared, &listener, client, Refusal::RouteCap).await;
    };

    // Backend. A route's refused share (invalid Gateway API backends) is refused here, and
    // never falls back to the other backends.
    if route.refuses() {
        return fail(
            shared,
            &listener,
            client,
            Failure::http(HandshakeFailure::InvalidBackend, 503),
        )
        .await;
    }
    let connected = tokio::select! {
        c = connect_backend(&route, &settings, &mut slot, shutdown) => c,
        () = shutdown.forced() => return,
    };
    let Some((backend, backend_addr)) = connected else {
        return fail(
            shared,
            &listener,
            client,
            Failure::http(HandshakeFailure::BackendUnavailable, 502),
        )
        .await;
    };
    let _ = backend.set_nodelay(true);
    // A route's own keepalive (a DestinationRule's `tcpKeepalive`) is for its backend leg.
    set_keepalive(
        &backend,
        route
            .config
            .keepalive
            .as_ref()
            .unwrap_or(&settings.keepalive),
    );

    // Forward what was read, PROXY header first if the route wants one.
    let mut first = Vec::new();
    if route.config.send_proxy_protocol == SendProxyProtocol::V2 {
        let destination = match proxy_addrs {
            Some(a) => a.destination,
            None => client.local_addr().unwrap_or(listener.address),
        };
        let addrs = proxy_protocol::Addresses {
            source: client_addr,
            destination,
        };
        let tlvs: Vec<(u8, &[u8])> = sni
            .as_deref()
            .map(|s| (proxy_protocol::PP2_TYPE_AUTHORITY, s.as_bytes()))
            .into_iter()
            .collect();
        proxy_protocol::encode_v2(&addrs, &tlvs, &mut first);
    }
    first.extend_from_slice(&head.buf[forward_from..]);
    let client_read = head.buf.len() as u64;
    drop(head);
    let mut backend = backend;
    // The backend accepted the connection but may never read: bound the first write too.
    let written = tokio::select! {
        w = tokio::time::timeout(settings.connect_timeout, backend.write_all(&first)) => matches!(w, Ok(Ok(()))),
        () = shutdown.forced() => return,
    };
    if !written {
        return fail(
            shared,
            &listener,
            client,
            Failure::http(HandshakeFailure::BackendWrite, 502),
        )
        .await;
    }
    drop(first);
    if listener.mode == Mode::HttpConnect && respond(&mut client, 200).await.is_err() {
        return;
    }

    // Relay.
    let route_name = route.config.name.as_str();
    let metrics = &shared.metrics;
    metrics
        .connections_total
        .with_label_values(&[&listener.name, route_name])
        .inc();
    let active = metrics
        .connections_active
        .with_label_values(&[&listener.name, route_name]);
    active.inc();
    let path = settings.data_path;
    metrics.data_path.with_label_values(&[path.as_str()]).inc();
    let started = Instant::now();
    let mut activity =
        Activity::with_metrics(route.stats.bytes_up.clone(), route.stats.bytes_down.clone());
    if let Some(idle) = settings.idle_timeout {
        // The idle watchdog samples every idle / 4: count the kernel's bytes twice as often.
        activity = activity.with_kernel_sync(idle / 8);
    }
    let lifetime = route.config.max_connection_lifetime.map(|base| {
        let jitter = route.config.max_connection_lifetime_jitter;
        base + jitter.mul_f64(rand::rng().random::<f64>())
    });
    let reason = tokio::select! {
        end = datapath::relay(path, &client, &backend, &activity, client_read) => CloseReason::from(end),
        () = idle_watch(&activity, settings.idle_timeout) => CloseReason::Idle,
        () = sleep_opt(lifetime) => CloseReason::Lifetime,
        () = retired(&route) => CloseReason::RouteChanged,
        () = shutdown.forced() => CloseReason::Shutdown,
    };
    // Account before closing, so whoever sees the close also sees the counters.
    active.dec();
    if path == DataPath::Sockmap && activity.unspliced() {
        metrics.sockmap_unspliced.inc();
    }
    let elapsed = started.elapsed();
    route.stats.duration.observe(elapsed.as_secs_f64());
    metrics.closed(route_name, reason);
    if reason == CloseReason::Shutdown {
        metrics.shutdown_forced.inc();
    }
    if settings.access_log {
        info!(
            target: "access",
            listener = %listener.name,
            route = route_name,
            client = %client_addr,
            sni = sni.as_deref().unwrap_or(""),
            backend = %backend_addr.addr,
            data_path = path.as_str(),
            bytes_up = activity.up.load(Ordering::Relaxed),
            bytes_down = activity.down.load(Ordering::Relaxed),
            duration_ms = elapsed.as_millis() as u64,
            reason = reason.as_str(),
            leg = reason.leg().map(Leg::as_str),
            "connection closed"
        );
    }
    drop((client, backend));
}

/// Tries the route's backends in order until one connects. The slot counts the backend being
/// tried, so a burst of connections spreads over the backends instead of piling onto the one
/// that looked least loaded.
async fn connect_backend(
    route: &Route,
    settings: &Settings,
    slot: &mut routes::Slot,
    shutdown: &Shutdown,
) -> Option<(TcpStream, Arc<routes::Backend>)> {
    for backend in route.backend_order() {
        slot.set_backend(Arc::clone(&backend));
        match routes::connect(&backend.addr, settings.connect_timeout).await {
            Ok(stream) => {
                backend.record_success();
                return Some((stream, backend));
            }
            Err(error) => {
                route.stats.connect_failures.inc();
                debug!(%error, backend = %backend.addr, route = %route.config.name, "backend connect failed");
                if backend.record_failure(settings.eject_after_failures) {
                    route.stats.ejections.inc();
                    info!(backend = %backend.addr, route = %route.config.name, "backend ejected after consecutive connect failures");
                    backend.spawn_probe(
                        settings.probe_interval,
                        settings.connect_timeout,
                        shutdown,
                    );
                }
            }
        }
    }
    slot.clear_backend();
    None
}

/// Resolves once no byte moved for `idle`, give or take: the activity flag is sampled every
/// quarter of `idle`, so the connection closes after between `idle` and 1.25 × `idle`.
async fn idle_watch(activity: &Activity, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let step = idle / 4;
    let mut quiet = 0;
    loop {
        tokio::time::sleep(step).await;
        if activity.take_touched() {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 4 {
                return;
            }
        }
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn retired(route: &Route) {
    route.retired.cancelled().await;
    match route.config.on_change {
        OnChange::Keep => std::future::pending().await,
        OnChange::Close => {}
        OnChange::Drain => tokio::time::sleep(route.config.drain_delay).await,
    }
}

/// Resolves `data_path: auto`, and falls back where a path does not work here: sockmap to
/// splice (the reason is logged once per process), splice to copy. Sockmap runs only on a
/// trusted kernel unless `allow_untrusted` (see `ebpf::sockmap::TRUSTED_KERNELS`).
pub(crate) fn resolve_data_path(
    choice: crate::config::DataPathChoice,
    allow_untrusted: bool,
) -> DataPath {
    use crate::config::DataPathChoice;
    let mut wanted = match choice {
        DataPathChoice::Copy => DataPath::Copy,
        DataPathChoice::Splice => DataPath::Splice,
        DataPathChoice::Sockmap => DataPath::Sockmap,
        DataPathChoice::Auto => datapath::AUTO,
    };
    if wanted == DataPath::Sockmap {
        let usable = if allow_untrusted {
            Ok(())
        } else {
            ebpf::sockmap::kernel_trusted()
                .map_err(|why| format!("{why}; allow_sockmap_on_untrusted_kernel is false"))
        }
        .and_then(|()| {
            datapath::sockmap_splicer()
                .map(|_| ())
                .map_err(str::to_string)
        });
        if let Err(why) = usable {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(reason = %why, "the sockmap data path is unavailable; using splice");
            });
            wanted = DataPath::Splice;
        }
    }
    if wanted == DataPath::Splice && !datapath::splice_supported() {
        tracing::warn!("splice(2) does not work here (seccomp?); using the copy data path");
        return DataPath::Copy;
    }
    wanted
}
