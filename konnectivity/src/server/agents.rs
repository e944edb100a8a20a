//! The agent plane: TLS (ALPN `h2`), HTTP/2, `AgentService/Connect` streams. Each stream is
//! checked (agent ID, identifiers, token), answered with `serverid` and `servercount` before
//! any packet, registered as a [`Backend`], then served by two tasks: a writer that sends
//! control packets before data, and a reader that routes each packet to its dial or tunnel
//! without ever waiting on one.

use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::backends::{Backend, DialOutcome, Identifiers, Orphan, TunnelEntry};
use super::Server;
use crate::metrics::Segment;
use crate::proto::packet::Packet;
use crate::transport::{self, status, Extensions, PacketReceiver, PacketSender, StreamError};
use crate::tunnel::{self, Credit, Event};

/// DATA packets waiting for one agent's stream, across its tunnels.
const DATA_QUEUE: usize = 64;

/// Accepts agents until shutdown.
pub async fn serve(server: Arc<Server>, listener: TcpListener) {
    let mut tls = (*server.config.agent_tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = tokio::select! {
            () = server.shutdown.stopping() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    warn!(%error, "accepting an agent connection");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let server = Arc::clone(&server);
        let acceptor = acceptor.clone();
        server.shutdown.clone().spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    server
                        .metrics
                        .agent_auth_failures
                        .with_label_values(&["tls"])
                        .inc();
                    debug!(%peer, %error, "agent TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_connection(server, tls).await;
        });
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_connection<T>(server: Arc<Server>, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = match h2_server().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(error) => {
            debug!(%error, "agent HTTP/2 handshake failed");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = server.shutdown.forced() => return,
        };
        let Some(Ok((request, respond))) = next else {
            return;
        };
        let server = Arc::clone(&server);
        server.shutdown.clone().spawn(async move {
            serve_stream(server, request, respond).await;
        });
    }
}

/// The HTTP/2 settings of both planes.
pub fn h2_server() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(transport::STREAM_WINDOW)
        .initial_connection_window_size(transport::CONNECTION_WINDOW)
        .max_frame_size(transport::MAX_FRAME)
        .max_concurrent_streams(10_000);
    builder
}

async fn serve_stream(
    server: Arc<Server>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.uri().path() != transport::AGENT_PATH || !transport::is_grpc(request.headers()) {
        let _ = respond.send_response(
            transport::trailers_only(
                status::UNIMPLEMENTED,
                "only /AgentService/Connect is served here",
            ),
            true,
        );
        return;
    }
    let headers = request.headers();
    let (agent_id, identifiers) = match agent_metadata(headers) {
        Ok(v) => v,
        Err(message) => {
            server
                .metrics
                .agent_auth_failures
                .with_label_values(&["metadata"])
                .inc();
            warn!(%message, "agent stream refused");
            let _ = respond.send_response(
                transport::trailers_only(status::INVALID_ARGUMENT, &message),
                true,
            );
            return;
        }
    };
    if let Some(auth) = &server.auth {
        let token = headers
            .get(transport::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if let Err(reason) = auth.check(token).await {
            server
                .metrics
                .agent_auth_failures
                .with_label_values(&[reason.label()])
                .inc();
            warn!(agent_id, %reason, "agent stream refused");
            let _ = respond.send_response(
                transport::trailers_only(status::UNAUTHENTICATED, &reason.to_string()),
                true,
            );
            return;
        }
    }
    let theirs = Extensions::from_headers(headers);
    let ours = server.extensions();
    let agreed = Extensions::agreed(ours, theirs);
    let mut response_headers = HeaderMap::new();
    response_headers.insert(
        transport::SERVER_ID,
        HeaderValue::from_str(&server.config.server_id)
            .unwrap_or(HeaderValue::from_static("invalid")),
    );
    response_headers.insert(
        transport::SERVER_COUNT,
        HeaderValue::from(server.config.server_count),
    );
    if theirs != Extensions::default() {
        if let Some(value) = ours.header() {
            response_headers.insert(transport::EXTENSIONS, value);
        }
    }
    let send = match respond.send_response(transport::response_head(response_headers), false) {
        Ok(send) => send,
        Err(error) => {
            debug!(%error, "agent stream gone before the response");
            return;
        }
    };
    let mut receiver = PacketReceiver::new(request.into_body());
    let sender = PacketSender::new(send);

    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let backend = Arc::new(Backend::new(
        agent_id,
        identifiers,
        agreed,
        control_tx,
        data_tx,
    ));
    server.backends.add(Arc::clone(&backend));
    server.backends_changed();
    let gauge = server
        .metrics
        .grpc_connections
        .with_label_values(&["/AgentService/Connect"]);
    gauge.inc();
    info!(agent_id = %backend.agent_id, ?agreed, "agent connected");

    let writer = server.shutdown.clone().spawn(write_loop(
        Arc::clone(&server),
        Arc::clone(&backend),
        sender,
        control_rx,
        data_rx,
    ));
    let end = tokio::select! {
        end = read_loop(&server, &backend, &mut receiver) => end,
        () = backend.closed.cancelled() => Ok(()),
        () = server.shutdown.forced() => Ok(()),
    };
    match &end {
        Ok(()) => info!(agent_id = %backend.agent_id, "agent disconnected"),
        Err(error) => warn!(agent_id = %backend.agent_id, %error, "agent stream failed"),
    }
    backend.closed.cancel();
    server.backends.remove(&backend);
    server.backends_changed();
    // Pending dials learn that the agent is gone (their senders are dropped); tunnels close.
    agentkit::sync::lock(&backend.pending).clear();
    let tunnels: Vec<TunnelEntry> = agentkit::sync::lock(&backend.tunnels)
        .drain()
        .map(|(_, t)| t)
        .collect();
    for tunnel in tunnels {
        tunnel
            .queue
            .event(Event::Close("agent disconnected".into()));
        tunnel.credit.close();
    }
    let _ = writer.await;
    gauge.dec();
}

fn agent_metadata(headers: &HeaderMap) -> Result<(String, Identifiers), String> {
    let agent_id = transport::single(headers, transport::AGENT_ID)?
        .filter(|id| !id.is_empty())
        .ok_or("metadata agentid is missing")?
        .to_owned();
    let identifiers = match transport::single(headers, transport::AGENT_IDENTIFIERS)? {
        Some(query) => {
            Identifiers::parse(query).map_err(|e| format!("metadata agentidentifiers: {e}"))?
        }
        None => Identifiers::default(),
    };
    Ok((agent_id, identifiers))
}

async fn write_loop(
    server: Arc<Server>,
    backend: Arc<Backend>,
    mut sender: PacketSender,
    mut control: mpsc::UnboundedReceiver<Packet>,
    mut data: mpsc::Receiver<Packet>,
) {
    loop {
        let packet = tokio::select! {
            biased;
            () = backend.closed.cancelled() => break,
            Some(packet) = control.recv() => packet,
            Some(packet) = data.recv() => packet,
            else => break,
        };
        let sent = tokio::select! {
            sent = sender.send(&packet) => sent,
            () = backend.closed.cancelled() => break,
        };
        match sent {
            Ok(()) => server.metrics.common.packet(Segment::ToAgent, &packet),
            Err(error) => {
                server
                    .metrics
                    .common
                    .error(Segment::ToAgent, "send", packet.kind_label());
                debug!(agent_id = %backend.agent_id, %error, "sending to the agent failed");
                backend.closed.cancel();
                return;
            }
        }
    }
    sender.finish_response(status::OK, "");
}

/// Routes the agent's packets until its stream ends. Never waits on a tunnel or a dial.
async fn read_loop(
    server: &Server,
    backend: &Arc<Backend>,
    receiver: &mut PacketReceiver,
) -> Result<(), StreamError> {
    let common = &server.metrics.common;
    while let Some(packet) = receiver.recv().await.inspect_err(|e| {
        common.error(Segment::FromAgent, e.code(), "UNKNOWN");
    })? {
        common.packet(Segment::FromAgent, &packet);
        match packet {
            Packet::DialResponse {
                error,
                connect_id,
                random,
            } => {
                let waiter = agentkit::sync::lock(&backend.pending).remove(&random);
                let Some(waiter) = waiter else {
                    // A dial we gave up on (timeout, DIAL_CLS) that the agent completed anyway.
                    if connect_id != 0 && error.is_empty() {
                        backend.send_control(Packet::CloseRequest { connect_id });
                    }
                    continue;
                };
                if !error.is_empty() || connect_id == 0 {
                    let error = if error.is_empty() {
                        "agent answered without a connection ID".into()
                    } else {
                        error
                    };
                    let _ = waiter.send(DialOutcome::Refused(error));
                    continue;
                }
                let (queue, rx) = tunnel::queue(
                    server
                        .config
                        .buffer
                        .max(backend.extensions.recv_window as usize),
                    Some(common.tunnel_queued_bytes.clone()),
                );
                let credit = match backend.extensions.send_window {
                    0 => Credit::unlimited(),
                    window => Credit::window(window),
                };
                agentkit::sync::lock(&backend.tunnels).insert(
                    connect_id,
                    TunnelEntry {
                        queue,
                        credit: credit.clone(),
                    },
                );
                // If the frontend is gone (now, or before it reads this), the orphan guard closes
                // the tunnel.
                let orphan = Orphan::new(Arc::clone(backend), connect_id);
                let _ = waiter.send(DialOutcome::Connected {
                    connect_id,
                    rx,
                    credit,
                    orphan,
                });
            }
            Packet::Data {
                connect_id, data, ..
            } => {
                let tunnels = agentkit::sync::lock(&backend.tunnels);
                let Some(tunnel) = tunnels.get(&connect_id) else {
                    drop(tunnels);
                    if connect_id != 0 {
                        backend.send_control(Packet::CloseRequest { connect_id });
                    }
                    continue;
                };
                if tunnel.queue.data(data).is_err() {
                    drop(tunnels);
                    overflow(server, backend, connect_id);
                }
            }
            Packet::CloseResponse { connect_id, error } => {
                if let Some(tunnel) = agentkit::sync::lock(&backend.tunnels).remove(&connect_id) {
                    tunnel.queue.event(Event::Close(error));
                    tunnel.credit.close();
                }
            }
            Packet::Window { connect_id, bytes } => {
                if let Some(tunnel) = agentkit::sync::lock(&backend.tunnels).get(&connect_id) {
                    tunnel.credit.grant(bytes);
                }
            }
            Packet::HalfClose { connect_id } => {
                if let Some(tunnel) = agentkit::sync::lock(&backend.tunnels).get(&connect_id) {
                    tunnel.queue.event(Event::HalfClose);
                }
            }
            Packet::Drain => {
                info!(agent_id = %backend.agent_id, "agent is draining: new dials prefer other agents");
                backend
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                server.backends_changed();
            }
            // Not meant for a server (DIAL_REQ, CLOSE_REQ, DIAL_CLS) or unknown: ignored.
            other => {
                debug!(agent_id = %backend.agent_id, packet = other.kind_label(), "ignored packet from agent")
            }
        }
    }
    Ok(())
}

/// A tunnel whose consumer fell a whole buffer behind an agent without flow control: closed
/// alone, so the agent's stream keeps flowing for the others.
fn overflow(server: &Server, backend: &Backend, connect_id: i64) {
    server.metrics.common.tunnel_overflows.inc();
    warn!(agent_id = %backend.agent_id, connect_id, "tunnel closed: its frontend fell a whole buffer behind");
    if let Some(tunnel) = agentkit::sync::lock(&backend.tunnels).remove(&connect_id) {
        tunnel.queue.event(Event::Close(
            "tunnel buffer overflow: frontend too slow".into(),
        ));
        tunnel.credit.close();
    }
    backend.send_control(Packet::CloseRequest { connect_id });
}

impl StreamError {
    /// A bounded label for `stream_errors_total{code}`.
    pub fn code(&self) -> &'static str {
        match self {
            StreamError::H2(_) => "transport",
            StreamError::Frame(_) => "framing",
            StreamError::Decode(_) => "decode",
            StreamError::Closed => "closed",
        }
    }
}
