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

use super::backends::{Backend, DialOutcome, Identifiers, Link, Orphan, TunnelEntry};
use super::Server;
use crate::metrics::Segment;
use crate::proto::packet::Packet;
use crate::quic;
use crate::transport::{
    self, status, Agreed, Extensions, PacketReceiver, PacketSender, StreamError,
};
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
            if let Some(tls) = handshake(&server, peer, acceptor.accept(tcp)).await {
                serve_connection(server, tls).await;
            }
        });
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An agent's TLS (or QUIC) handshake, bounded; a failed one is counted as a refusal.
async fn handshake<T, E: std::fmt::Display>(
    server: &Server,
    peer: std::net::SocketAddr,
    handshake: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(error)) => {
            server
                .metrics
                .agent_auth_failures
                .with_label_values(&["tls"])
                .inc();
            debug!(%peer, %error, "agent handshake failed");
            None
        }
        Err(_) => None,
    }
}

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
    let admitted = match admit(&server, request.headers(), false).await {
        Ok(admitted) => admitted,
        Err((status, message)) => {
            let _ = respond.send_response(transport::trailers_only(status, &message), true);
            return;
        }
    };
    let send = match respond.send_response(transport::response_head(admitted.response), false) {
        Ok(send) => send,
        Err(error) => {
            debug!(%error, "agent stream gone before the response");
            return;
        }
    };
    let backend = Backend::new(
        admitted.agent_id,
        admitted.identifiers,
        admitted.agreed,
        admitted.control_tx,
        admitted.data_tx,
    );
    serve_backend(
        server,
        Arc::new(backend),
        PacketSender::new(send),
        PacketReceiver::new(request.into_body()),
        admitted.control_rx,
        admitted.data_rx,
    )
    .await;
}

/// An agent whose `Connect` metadata passed: what it announced, the response head (sent
/// before any packet) and the channels of its stream's writer.
struct Admitted {
    agent_id: String,
    identifiers: Identifiers,
    agreed: Agreed,
    response: HeaderMap,
    control_tx: mpsc::UnboundedSender<Packet>,
    control_rx: mpsc::UnboundedReceiver<Packet>,
    data_tx: mpsc::Sender<Packet>,
    data_rx: mpsc::Receiver<Packet>,
}

/// Checks an agent's metadata (agent ID, identifiers, token) on either transport; a refusal
/// is a gRPC status and message. Over QUIC no extension is negotiated: QUIC's own streams do
/// what they do on gRPC.
async fn admit(
    server: &Server,
    headers: &HeaderMap,
    quic: bool,
) -> Result<Admitted, (u32, String)> {
    let (agent_id, identifiers) = match agent_metadata(headers) {
        Ok(v) => v,
        Err(message) => {
            server
                .metrics
                .agent_auth_failures
                .with_label_values(&["metadata"])
                .inc();
            warn!(%message, "agent stream refused");
            return Err((status::INVALID_ARGUMENT, message));
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
            return Err((status::UNAUTHENTICATED, reason.to_string()));
        }
    }
    let theirs = if quic {
        Extensions::default()
    } else {
        Extensions::from_headers(headers)
    };
    let ours = server.extensions();
    let mut response = HeaderMap::new();
    response.insert(
        transport::SERVER_ID,
        HeaderValue::from_str(&server.config.server_id)
            .unwrap_or(HeaderValue::from_static("invalid")),
    );
    response.insert(
        transport::SERVER_COUNT,
        HeaderValue::from(server.config.server_count),
    );
    if theirs != Extensions::default() {
        if let Some(value) = ours.header() {
            response.insert(transport::EXTENSIONS, value);
        }
    }
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    Ok(Admitted {
        agent_id,
        identifiers,
        agreed: Extensions::agreed(ours, theirs),
        response,
        control_tx,
        control_rx,
        data_tx,
        data_rx,
    })
}

/// Serves an admitted agent's stream until it ends: registered as a backend, a writer task,
/// and the reader here; then every pending dial and tunnel of it is ended.
async fn serve_backend(
    server: Arc<Server>,
    backend: Arc<Backend>,
    sender: PacketSender,
    mut receiver: PacketReceiver,
    control_rx: mpsc::UnboundedReceiver<Packet>,
    data_rx: mpsc::Receiver<Packet>,
) {
    server.backends.add(Arc::clone(&backend));
    server.backends_changed();
    let gauge = server
        .metrics
        .grpc_connections
        .with_label_values(&["/AgentService/Connect"]);
    gauge.inc();
    info!(agent_id = %backend.agent_id, agreed = ?backend.extensions, quic = backend.quic, "agent connected");

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

/// Accepts agents over QUIC until shutdown ([`crate::quic`]): each connection's first
/// stream is its control stream, admitted like a `Connect` stream; every later stream is a
/// tunnel the agent opened for a dial.
pub async fn serve_quic(server: Arc<Server>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            () = server.shutdown.stopping() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let server = Arc::clone(&server);
        server.shutdown.clone().spawn(async move {
            let peer = incoming.remote_address();
            if let Some(connection) = handshake(&server, peer, incoming).await {
                serve_quic_connection(server, connection).await;
            }
        });
    }
    // No new agents; the connected ones keep their tunnels through the graceful period.
    endpoint.set_server_config(None);
    server.shutdown.forced().await;
    endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
}

async fn serve_quic_connection(server: Arc<Server>, connection: quinn::Connection) {
    let control = tokio::time::timeout(quic::HEAD_TIMEOUT, async {
        let (send, mut recv) = connection.accept_bi().await?;
        let head = quic::read_head(&mut recv).await?;
        anyhow::Ok((send, recv, head))
    })
    .await;
    let (mut send, recv, head) = match control {
        Ok(Ok(control)) => control,
        Ok(Err(error)) => {
            debug!(%error, "agent QUIC connection without a control stream");
            return;
        }
        Err(_) => {
            connection.close(quinn::VarInt::from_u32(1), b"no control stream in time");
            return;
        }
    };
    let admitted = match admit(&server, &head, true).await {
        Ok(admitted) => admitted,
        Err((status, message)) => {
            let mut refusal = HeaderMap::new();
            refusal.insert("grpc-status", HeaderValue::from(status));
            if let Ok(value) = HeaderValue::from_str(&message) {
                refusal.insert("grpc-message", value);
            }
            if quic::write_head(&mut send, &refusal).await.is_ok() {
                let _ = send.finish();
                // The agent reads the refusal, then closes.
                let _ = tokio::time::timeout(quic::HEAD_TIMEOUT, connection.closed()).await;
            }
            return;
        }
    };
    if quic::write_head(&mut send, &admitted.response)
        .await
        .is_err()
    {
        return;
    }
    let backend = Arc::new(
        Backend::new(
            admitted.agent_id,
            admitted.identifiers,
            admitted.agreed,
            admitted.control_tx,
            admitted.data_tx,
        )
        .over_quic(),
    );
    let tunnels = server.shutdown.clone().spawn(accept_tunnels(
        Arc::clone(&server),
        Arc::clone(&backend),
        connection.clone(),
    ));
    serve_backend(
        server,
        backend,
        PacketSender::quic(send),
        PacketReceiver::quic(recv),
        admitted.control_rx,
        admitted.data_rx,
    )
    .await;
    connection.close(quinn::VarInt::from_u32(0), b"stream ended");
    tunnels.abort();
}

/// Hands each tunnel stream to the dial waiting for it; a stream nobody waits for (the dial
/// was given up) is reset, which ends the agent's side of it.
async fn accept_tunnels(server: Arc<Server>, backend: Arc<Backend>, connection: quinn::Connection) {
    loop {
        let (send, recv) = tokio::select! {
            () = backend.closed.cancelled() => return,
            accepted = connection.accept_bi() => match accepted {
                Ok(streams) => streams,
                Err(_) => {
                    backend.closed.cancel();
                    return;
                }
            },
        };
        let backend = Arc::clone(&backend);
        server.shutdown.spawn(async move {
            let opened =
                tokio::time::timeout(quic::HEAD_TIMEOUT, quic::accept_tunnel(send, recv)).await;
            let (connect_id, random, tunnel) = match opened {
                Ok(Ok(opened)) => opened,
                Ok(Err(error)) => {
                    debug!(agent_id = %backend.agent_id, %error, "bad tunnel stream");
                    return;
                }
                Err(_) => return,
            };
            let waiter = agentkit::sync::lock(&backend.pending).remove(&random);
            if let Some(waiter) = waiter {
                let orphan = Orphan::new(Arc::clone(&backend), connect_id);
                let _ = waiter.send(DialOutcome::Connected {
                    connect_id,
                    link: Link::Quic(tunnel),
                    orphan,
                });
            }
        });
    }
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
                if backend.quic && error.is_empty() {
                    // Over QUIC a tunnel arrives as a stream of its own, never as this.
                    let _ = waiter.send(DialOutcome::Refused(
                        "the agent answered a QUIC dial on the control stream".into(),
                    ));
                    backend.send_control(Packet::CloseRequest { connect_id });
                    continue;
                }
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
                    link: Link::Stream { rx, credit },
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
            StreamError::H2(_) | StreamError::Quic(_) => "transport",
            StreamError::Frame(_) => "framing",
            StreamError::Decode(_) => "decode",
            StreamError::Closed => "closed",
        }
    }
}
