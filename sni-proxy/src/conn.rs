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

use crate::config::{Listener, Mode, OnChange, ProxyProtocolMode, SendProxyProtocol};
use crate::datapath::{self, Activity, DataPath, End};
use crate::protocol::{client_hello, http_connect, proxy_protocol};
use crate::routes::{self, Route, SniMatch};
use crate::{Runtime, Shared};

/// Extra buffer room beyond the ClientHello cap: TLS record headers and a PROXY header.
const HEAD_SLACK: usize = 8 * 1024;

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

/// Why a connection ended before routing: a bounded metric label, and for http-connect the
/// status to answer with.
#[derive(Debug, Clone, Copy)]
struct Failure {
    reason: &'static str,
    status: Option<u16>,
}

impl Failure {
    fn new(reason: &'static str) -> Self {
        Failure {
            reason,
            status: None,
        }
    }
    fn http(reason: &'static str, status: u16) -> Self {
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
    let runtime = shared.state.load_full();
    let listener = &runtime.config.listeners[index];
    let _ = client.set_nodelay(true);
    set_keepalive(&client, &runtime);
    let head = tokio::select! {
        head = tokio::time::timeout(runtime.config.handshake_timeout, read_head(&client, listener, peer)) => match head {
            Ok(head) => head,
            Err(_) => Err(Failure::http("timeout", 408)),
        },
        () = shutdown.forced() => return,
    };
    let head = match head {
        Ok(head) => head,
        Err(failure) => return fail(&shared, listener, client, failure).await,
    };
    if let Err(failure) = serve(&shared, &runtime, index, client, peer, head, &shutdown).await {
        // `serve` consumed the client only on success paths that cannot fail; failures before
        // that are handled inside. Nothing left to do here.
        debug!(reason = failure.reason, "connection ended before relaying");
    }
}

async fn fail(shared: &Shared, listener: &Listener, mut client: TcpStream, failure: Failure) {
    shared
        .metrics
        .handshake_failures
        .with_label_values(&[&listener.name, failure.reason])
        .inc();
    debug!(listener = %listener.name, reason = failure.reason, "closing before routing");
    if listener.mode == Mode::HttpConnect {
        if let Some(status) = failure.status {
            let _ = respond(&mut client, status).await;
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
    client.write_all(msg.as_bytes()).await?;
    if status != 200 {
        client.shutdown().await?;
    }
    Ok(())
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
        ProxyProtocolMode::Required => return Err(Failure::new("untrusted_proxy")),
        ProxyProtocolMode::Optional => false,
    };
    let cap = listener.max_client_hello_bytes + HEAD_SLACK;
    let mut buf = Vec::with_capacity(2048);
    let mut start = 0;
    let mut proxy = None;
    loop {
        if buf.len() >= cap {
            return Err(Failure::http("too_large", 431));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(cap - buf.len()).max(1024));
        }
        loop {
            if client.readable().await.is_err() {
                return Err(Failure::new("read_error"));
            }
            match client.try_read_buf(&mut buf) {
                Ok(0) => return Err(Failure::new("eof")),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Failure::new("read_error")),
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
                    return Err(Failure::new("proxy_protocol_missing"))
                }
                Err(_) => return Err(Failure::http("proxy_protocol_malformed", 400)),
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
                Err(e) => return Err(Failure::new(e.kind())),
            },
            Mode::HttpConnect => match http_connect::parse(payload) {
                Ok(None) => continue,
                Ok(Some(req)) => HeadKind::Connect(req),
                Err(e) => return Err(Failure::http(e.kind(), e.status())),
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

fn set_keepalive(stream: &TcpStream, runtime: &Runtime) {
    let k = &runtime.config.keepalive;
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

async fn serve(
    shared: &Shared,
    runtime: &Runtime,
    index: usize,
    mut client: TcpStream,
    peer: SocketAddr,
    head: Head,
    shutdown: &Shutdown,
) -> Result<(), Failure> {
    let config = &runtime.config;
    let listener = &config.listeners[index];
    let proxy_addrs = head.proxy.as_ref().and_then(|h| h.addresses);
    let client_addr = proxy_addrs.map_or(peer, |a| a.source);

    // Route.
    let (route, sni, forward_from) = match &head.kind {
        HeadKind::Tls(hello) => {
            shared
                .metrics
                .client_hello_bytes
                .with_label_values(&[&listener.name])
                .observe(hello.record_bytes as f64);
            match runtime.table.route_tls(
                hello.server_name.as_deref(),
                proxy_addrs.map(|a| a.destination),
            ) {
                SniMatch::Route(r) => (Arc::clone(r), hello.server_name.clone(), head.start),
                SniMatch::Reject => {
                    let _ = client
                        .write_all(&client_hello::ALERT_UNRECOGNIZED_NAME)
                        .await;
                    fail(shared, listener, client, Failure::new("unknown_sni")).await;
                    return Ok(());
                }
                SniMatch::Close => {
                    fail(shared, listener, client, Failure::new("unknown_sni")).await;
                    return Ok(());
                }
            }
        }
        HeadKind::Connect(req) => {
            let Some(destination) = req.destination.as_deref() else {
                fail(
                    shared,
                    listener,
                    client,
                    Failure::http("missing_destination", 400),
                )
                .await;
                return Ok(());
            };
            match runtime.table.lookup_destination(destination) {
                Some(r) => (Arc::clone(r), None, head.start + req.head_len),
                None => {
                    fail(
                        shared,
                        listener,
                        client,
                        Failure::http("unknown_destination", 403),
                    )
                    .await;
                    return Ok(());
                }
            }
        }
    };

    // Caps.
    let refuse = |reason: &'static str| {
        shared
            .metrics
            .connections_refused
            .with_label_values(&[&listener.name, reason])
            .inc();
    };
    let Some(_source_slot) =
        acquire_source(shared, client_addr.ip().to_canonical(), config.max_connections_per_source)
    else {
        refuse("source_cap");
        if listener.mode == Mode::HttpConnect {
            let _ = respond(&mut client, 503).await;
        }
        return Ok(());
    };
    let Some(mut slot) = route.try_acquire() else {
        refuse("route_cap");
        if listener.mode == Mode::HttpConnect {
            let _ = respond(&mut client, 503).await;
        }
        return Ok(());
    };

    // Backend.
    let connected = tokio::select! {
        c = connect_backend(&route, runtime) => c,
        () = shutdown.forced() => return Ok(()),
    };
    let Some((backend, backend_addr)) = connected else {
        fail(
            shared,
            listener,
            client,
            Failure::http("backend_unavailable", 502),
        )
        .await;
        return Ok(());
    };
    slot.set_backend(Arc::clone(&backend_addr));
    let _ = backend.set_nodelay(true);
    set_keepalive(&backend, runtime);

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
    drop(head);
    let mut backend = backend;
    if !first.is_empty() && backend.write_all(&first).await.is_err() {
        fail(
            shared,
            listener,
            client,
            Failure::http("backend_write", 502),
        )
        .await;
        return Ok(());
    }
    drop(first);
    if listener.mode == Mode::HttpConnect && respond(&mut client, 200).await.is_err() {
        return Ok(());
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
    let path = runtime.data_paths[index];
    metrics.data_path.with_label_values(&[path.as_str()]).inc();
    let started = Instant::now();
    let activity =
        Activity::with_metrics(route.stats.bytes_up.clone(), route.stats.bytes_down.clone());
    let lifetime = route.config.max_connection_lifetime.map(|base| {
        let jitter = route.config.max_connection_lifetime_jitter;
        base + jitter.mul_f64(rand::rng().random::<f64>())
    });
    let reason = tokio::select! {
        end = datapath::relay(path, &client, &backend, &activity) => match end {
            End::Done => "done",
            End::Reset => "reset",
            End::Error => "error",
        },
        () = idle_watch(&activity, config.idle_timeout) => "idle",
        () = sleep_opt(lifetime) => "lifetime",
        () = retired(&route) => "route_changed",
        () = shutdown.forced() => "shutdown",
    };
    // Account before closing, so whoever sees the close also sees the counters.
    active.dec();
    let elapsed = started.elapsed();
    route.stats.duration.observe(elapsed.as_secs_f64());
    metrics
        .connections_closed
        .with_label_values(&[route_name, reason])
        .inc();
    if reason == "shutdown" {
        metrics.shutdown_forced.inc();
    }
    if config.access_log {
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
            reason,
            "connection closed"
        );
    }
    drop((client, backend));
    Ok(())
}

/// Tries the route's backends in order until one connects.
async fn connect_backend(
    route: &Route,
    runtime: &Runtime,
) -> Option<(TcpStream, Arc<routes::Backend>)> {
    let config = &runtime.config;
    for backend in route.backend_order() {
        match routes::connect(&backend.addr, config.connect_timeout).await {
            Ok(stream) => {
                backend.record_success();
                return Some((stream, backend));
            }
            Err(error) => {
                route.stats.connect_failures.inc();
                debug!(%error, backend = %backend.addr, route = %route.config.name, "backend connect failed");
                if backend.record_failure(config.eject_after_failures) {
                    route.stats.ejections.inc();
                    info!(backend = %backend.addr, route = %route.config.name, "backend ejected after consecutive connect failures");
                    backend.spawn_probe(config.probe_interval, config.connect_timeout);
                }
            }
        }
    }
    None
}

async fn idle_watch(activity: &Activity, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
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

/// Resolves `data_path: auto` and checks that splice works where it was asked for.
pub(crate) fn resolve_data_path(choice: crate::config::DataPathChoice) -> DataPath {
    use crate::config::DataPathChoice;
    match choice {
        DataPathChoice::Copy => DataPath::Copy,
        DataPathChoice::Splice | DataPathChoice::Auto if datapath::splice_supported() => {
            match choice {
                DataPathChoice::Splice => DataPath::Splice,
                _ => datapath::AUTO,
            }
        }
        _ => DataPath::Copy,
    }
}
