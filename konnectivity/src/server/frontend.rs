//! kube-apiserver's side: the egress dialer's two protocols on a UDS or on TCP with mTLS.
//!
//! - **HTTP CONNECT** (`--mode http-connect`): one connection per dial. The destination is
//!   the request-target (kube-apiserver always sends `Host: 127.0.0.1`); `200 Connection
//!   Established` is written only once the agent's dial succeeded, a failure gets upstream's
//!   status with the error as a plain-text body, and nothing is added after the headers.
//! - **gRPC** (`--mode grpc`): `ProxyService/Proxy`, one stream per dial, many streams per
//!   connection (konnectivity-client's reusable tunnel), DIAL_CLS honoured while pending.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use super::backends::Link;
use super::dial::{self, DialError, Tunnel};
use super::{Mode, Server};
use crate::metrics::Segment;
use crate::proto::packet::Packet;
use crate::quic::QuicTunnel;
use crate::transport::{self, status, PacketReceiver, PacketSender};
use crate::tunnel::{Event, Socket, CHUNK};

/// How long a client has to send its CONNECT request head (upstream's `ReadHeaderTimeout`).
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing tunnel waits for the agent's CLOSE_RSP (konnectivity-client's
/// `CloseTimeout`).
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Binds the frontend socket (removing a stale one first if asked), mode 0660 like upstream's
/// umask 0007.
pub fn bind_uds(path: &Path, delete_existing: bool) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if delete_existing && path.exists() {
        std::fs::remove_file(path).map_err(|e| {
            anyhow::anyhow!(
                "--uds-name {}: removing the old socket: {e}",
                path.display()
            )
        })?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("--uds-name {}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(listener)
}

pub async fn serve_uds(server: Arc<Server>, listener: UnixListener) {
    loop {
        let stream = tokio::select! {
            () = server.shutdown.stopping() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "accepting a frontend connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let server2 = Arc::clone(&server);
        server.shutdown.spawn(serve_connection(server2, stream));
    }
}

pub async fn serve_tcp(server: Arc<Server>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let mut tls = (*tls).clone();
    if server.config.mode == Mode::Grpc {
        tls.alpn_protocols = vec![b"h2".to_vec()];
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = tokio::select! {
            () = server.shutdown.stopping() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    warn!(%error, "accepting a frontend connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let server2 = Arc::clone(&server);
        let acceptor = acceptor.clone();
        server.shutdown.spawn(async move {
            match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve_connection(server2, tls).await,
                Ok(Err(error)) => debug!(%peer, %error, "frontend TLS handshake failed"),
                Err(_) => debug!(%peer, "frontend TLS handshake timed out"),
            }
        });
    }
}

async fn serve_connection<S: Socket>(server: Arc<Server>, io: S) {
    match server.config.mode {
        Mode::HttpConnect => {
            server.metrics.http_connections.inc();
            serve_connect(&server, io).await;
            server.metrics.http_connections.dec();
        }
        Mode::Grpc => serve_grpc(server, io).await,
    }
}

// ---------------------------------------------------------------------------------------
// HTTP CONNECT

async fn serve_connect<S: Socket>(server: &Arc<Server>, mut io: S) {
    let mut buf = BytesMut::with_capacity(1024);
    let request = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut io, &mut buf)).await {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            let _ = respond(
                &mut io,
                error.status(),
                reason(error.status()),
                &error.to_string(),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = respond(
                &mut io,
                408,
                "Request Timeout",
                "request head not received in time",
            )
            .await;
            return;
        }
    };
    buf.advance(request.head_len);
    let address = request.authority;
    // Dial, watching the client: if it goes away, the dial is cancelled (DIAL_CLS).
    let random = dial::random_id();
    let dialing = dial::dial(server, "tcp", &address, random);
    tokio::pin!(dialing);
    let result = loop {
        tokio::select! {
            result = &mut dialing => break result,
            read = io.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    server.metrics.dial_failed(crate::metrics::DialFailure::FrontendClose);
                    return;
                }
                // Bytes sent before the answer belong to the tunnel; kept, bounded.
                Ok(_) if buf.len() > CHUNK => {
                    let _ = respond(&mut io, 400, "Bad Request", "too many bytes before the dial completed").await;
                    return;
                }
                Ok(_) => {}
            },
        }
    };
    let tunnel = match result {
        Ok(tunnel) => tunnel,
        Err(error) => {
            let (code, text) = error.http_status();
            let message = match &error {
                DialError::NoAgent => {
                    format!("currently no tunnels available: {}", error.message())
                }
                _ => error.message(),
            };
            let _ = respond(&mut io, code, text, &message).await;
            return;
        }
    };
    if io
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    splice_socket(server, tunnel, io, buf.freeze()).await;
}

/// Reads until the request head is complete; `None` if the client closed first.
async fn read_head<S>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<agentkit::http_connect::ConnectRequest>, agentkit::http_connect::ConnectError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(request) = agentkit::http_connect::parse(buf)? {
            return Ok(Some(request));
        }
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    reason: &str,
    body: &str,
) -> io::Result<()> {
    let body = format!("{body}\n");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    io.write_all(head.as_bytes()).await?;
    io.write_all(body.as_bytes()).await?;
    io.shutdown().await
}

/// Moves bytes between a frontend socket and its tunnel until both directions are done.
pub async fn splice_socket<S: Socket>(server: &Arc<Server>, tunnel: Tunnel, io: S, early: Bytes) {
    let mut tunnel = tunnel;
    let (rx, credit) = match &mut tunnel.link {
        Link::Stream { rx, credit } => (rx, credit.clone()),
        Link::Quic(quic) => {
            return crate::quic::splice_socket(quic, io, early, server.shutdown.forced()).await
        }
    };
    let (mut rd, mut wr) = io.halves();
    let half_close = tunnel.backend.extensions.half_close;
    let recv_window = tunnel.backend.extensions.recv_window;
    let connect_id = tunnel.connect_id;
    let backend = Arc::clone(&tunnel.backend);

    let up = async {
        if early.is_empty() {
            drop(early);
        } else if send_to_agent(server, &backend, &credit, connect_id, early)
            .await
            .is_err()
        {
            return false;
        }
        let mut size = 4096;
        loop {
            // No buffer is held while the frontend is quiet.
            if S::readable(&rd).await.is_err() {
                return false;
            }
            let Some(budget) = take_credit(server, &credit, size).await else {
                return false;
            };
            let mut buf = BytesMut::with_capacity(budget);
            let n = match rd.read_buf(&mut (&mut buf).limit(budget)).await {
                Ok(n) => n,
                Err(_) => return false,
            };
            credit.give_back(budget - n);
            if n == 0 {
                // The frontend sent its last byte.
                // On the data queue, behind the last DATA: the end never overtakes the bytes.
                let packet = if half_close {
                    Packet::HalfClose { connect_id }
                } else {
                    Packet::CloseRequest { connect_id }
                };
                return backend.data.send(packet).await.is_ok();
            }
            size = if n == budget {
                (size * 2).min(CHUNK)
            } else {
                4096
            };
            if backend
                .data
                .send(Packet::Data {
                    connect_id,
                    error: String::new(),
                    data: buf.freeze(),
                })
                .await
                .is_err()
            {
                return false;
            }
        }
    };
    let down = async {
        let mut grants = Grants::new(recv_window);
        while let Some(event) = rx.next().await {
            match event {
                Event::Data(data) => {
                    let n = data.len();
                    if wr.write_all(&data).await.is_err() {
                        return;
                    }
                    if let Some(bytes) = grants.wrote(n) {
                        backend.send_control(Packet::Window { connect_id, bytes });
                    }
                }
                Event::HalfClose => {
                    let _ = wr.shutdown().await;
                }
                Event::Close(_) => break,
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut down => {}
        clean = &mut up => if clean {
            // Our side is done sending; the agent's bytes still come until it closes (with
            // half-close, for as long as the destination keeps sending).
            if half_close {
                tokio::select! {
                    () = &mut down => {}
                    () = server.shutdown.forced() => {}
                }
            } else {
                let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
            }
        },
        () = server.shutdown.forced() => {}
    }
}

/// Waits for credit for up to `want` bytes, counting the time blocked.
async fn take_credit(
    server: &Server,
    credit: &crate::tunnel::Credit,
    want: usize,
) -> Option<usize> {
    if credit.exhausted() {
        let since = Instant::now();
        let got = credit.take(want).await;
        server
            .metrics
            .common
            .tunnel_blocked_seconds
            .inc_by(since.elapsed().as_secs_f64());
        got
    } else {
        credit.take(want).await
    }
}

/// Sends `data` on the tunnel in pieces the credit allows.
async fn send_to_agent(
    server: &Server,
    backend: &super::backends::Backend,
    credit: &crate::tunnel::Credit,
    connect_id: i64,
    mut data: Bytes,
) -> Result<(), ()> {
    while !data.is_empty() {
        let n = take_credit(server, credit, data.len()).await.ok_or(())?;
        let piece = data.split_to(n.min(data.len()));
        backend
            .data
            .send(Packet::Data {
                connect_id,
                error: String::new(),
                data: piece,
            })
            .await
            .map_err(drop)?;
    }
    Ok(())
}

/// When to grant a window back: once a quarter of it has been written out.
#[derive(Debug)]
pub struct Grants {
    window: u32,
    written: u32,
}

impl Grants {
    pub fn new(window: u32) -> Self {
        Grants { window, written: 0 }
    }

    /// `n` bytes were written to the destination; the grant to send, if any.
    pub fn wrote(&mut self, n: usize) -> Option<u32> {
        if self.window == 0 {
            return None;
        }
        self.written = self.written.saturating_add(n as u32);
        (self.written >= self.window / 4).then(|| std::mem::take(&mut self.written))
    }
}

// ---------------------------------------------------------------------------------------
// gRPC

async fn serve_grpc<S>(server: Arc<Server>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = super::authority::AuthorityFix::new(io);
    let mut conn = match super::agents::h2_server().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(error) => {
            debug!(%error, "frontend HTTP/2 handshake failed");
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
        let server2 = Arc::clone(&server);
        server.shutdown.spawn(async move {
            let gauge = server2
                .metrics
                .grpc_connections
                .with_label_values(&["/ProxyService/Proxy"]);
            gauge.inc();
            serve_proxy_stream(&server2, request, respond).await;
            gauge.dec();
        });
    }
}

async fn serve_proxy_stream(
    server: &Arc<Server>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.uri().path() != transport::PROXY_PATH || !transport::is_grpc(request.headers()) {
        let _ = respond.send_response(
            transport::trailers_only(
                status::UNIMPLEMENTED,
                "only /ProxyService/Proxy is served here",
            ),
            true,
        );
        return;
    }
    let Ok(send) = respond.send_response(transport::response_head(http::HeaderMap::new()), false)
    else {
        return;
    };
    let mut sender = PacketSender::new(send);
    let mut receiver = PacketReceiver::new(request.into_body());
    let common = &server.metrics.common;

    // The first packet must be the dial.
    let (protocol, address, random) = loop {
        match receiver.recv().await {
            Ok(Some(packet)) => {
                common.packet(Segment::FromClient, &packet);
                if let Packet::DialRequest {
                    protocol,
                    address,
                    random,
                } = packet
                {
                    break (protocol, address, random);
                }
                debug!(
                    packet = packet.kind_label(),
                    "frontend packet before the dial ignored"
                );
            }
            _ => return,
        }
    };
    let dialing = dial::dial(server, &protocol, &address, random);
    tokio::pin!(dialing);
    let result = loop {
        tokio::select! {
            result = &mut dialing => break result,
            packet = receiver.recv() => match packet {
                Ok(Some(Packet::DialClose { .. })) | Ok(None) | Err(_) => {
                    // Dropping the dial sends DIAL_CLS to the agent.
                    server.metrics.dial_failed(crate::metrics::DialFailure::FrontendClose);
                    sender.finish_response(status::OK, "");
                    return;
                }
                Ok(Some(_)) => {}
            },
        }
    };
    let tunnel = match result {
        Ok(tunnel) => tunnel,
        Err(error) => {
            let packet = Packet::DialResponse {
                error: error.message(),
                connect_id: 0,
                random,
            };
            if sender.send(&packet).await.is_ok() {
                common.packet(Segment::ToClient, &packet);
            }
            sender.finish_response(status::OK, "");
            return;
        }
    };
    let connect_id = tunnel.connect_id;
    let response = Packet::DialResponse {
        error: String::new(),
        connect_id,
        random,
    };
    if sender.send(&response).await.is_err() {
        return;
    }
    common.packet(Segment::ToClient, &response);
    splice_grpc(server, tunnel, sender, receiver).await;
}

async fn splice_grpc(
    server: &Arc<Server>,
    mut tunnel: Tunnel,
    mut sender: PacketSender,
    mut receiver: PacketReceiver,
) {
    let connect_id = tunnel.connect_id;
    let backend = Arc::clone(&tunnel.backend);
    let recv_window = backend.extensions.recv_window;
    let common = &server.metrics.common;
    let (rx, credit) = match &mut tunnel.link {
        Link::Stream { rx, credit } => (rx, credit.clone()),
        Link::Quic(quic) => {
            return splice_grpc_quic(server, quic, connect_id, sender, receiver).await
        }
    };
    let up = async {
        loop {
            match receiver.recv().await {
                Ok(Some(packet)) => {
                    common.packet(Segment::FromClient, &packet);
                    match packet {
                        Packet::Data { data, .. } => {
                            if send_to_agent(server, &backend, &credit, connect_id, data)
                                .await
                                .is_err()
                            {
                                return false;
                            }
                        }
                        Packet::CloseRequest { .. } => {
                            return backend
                                .data
                                .send(Packet::CloseRequest { connect_id })
                                .await
                                .is_ok();
                        }
                        other => debug!(packet = other.kind_label(), "frontend packet ignored"),
                    }
                }
                Ok(None) | Err(_) => return false,
            }
        }
    };
    let down = async {
        let mut grants = Grants::new(recv_window);
        let mut error = String::new();
        while let Some(event) = rx.next().await {
            match event {
                Event::Data(data) => {
                    let n = data.len();
                    let packet = Packet::Data {
                        connect_id,
                        error: String::new(),
                        data,
                    };
                    if sender.send(&packet).await.is_err() {
                        return;
                    }
                    common.packet(Segment::ToClient, &packet);
                    if let Some(bytes) = grants.wrote(n) {
                        backend.send_control(Packet::Window { connect_id, bytes });
                    }
                }
                // konnectivity-client has no half-close: the tunnel stays open until CLOSE.
                Event::HalfClose => {}
                Event::Close(e) => {
                    error = e;
                    break;
                }
            }
        }
        let packet = Packet::CloseResponse { error, connect_id };
        if sender.send(&packet).await.is_ok() {
            common.packet(Segment::ToClient, &packet);
        }
        sender.finish_response(status::OK, "");
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut down => {}
        clean = &mut up => if clean {
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
        },
        () = server.shutdown.forced() => {}
    }
}

/// [`splice_grpc`] for a tunnel on its own QUIC stream: the agent's FIN ends the tunnel
/// (konnectivity-client has no half-close), the client's CLOSE_REQ sends ours.
async fn splice_grpc_quic(
    server: &Arc<Server>,
    quic: &mut QuicTunnel,
    connect_id: i64,
    mut sender: PacketSender,
    mut receiver: PacketReceiver,
) {
    let common = &server.metrics.common;
    let (tx, rx) = quic.halves();
    let up = async {
        loop {
            match receiver.recv().await {
                Ok(Some(packet)) => {
                    common.packet(Segment::FromClient, &packet);
                    match packet {
                        Packet::Data { data, .. } => {
                            if !tx.send(data).await {
                                return false;
                            }
                        }
                        Packet::CloseRequest { .. } => return tx.finish(),
                        other => debug!(packet = other.kind_label(), "frontend packet ignored"),
                    }
                }
                Ok(None) | Err(_) => return false,
            }
        }
    };
    let down = async {
        let error = loop {
            match rx.recv().await {
                Ok(Some(data)) => {
                    let packet = Packet::Data {
                        connect_id,
                        error: String::new(),
                        data,
                    };
                    if sender.send(&packet).await.is_err() {
                        return;
                    }
                    common.packet(Segment::ToClient, &packet);
                }
                Ok(None) => break String::new(),
                Err(error) => break error,
            }
        };
        let packet = Packet::CloseResponse { error, connect_id };
        if sender.send(&packet).await.is_ok() {
            common.packet(Segment::ToClient, &packet);
        }
        sender.finish_response(status::OK, "");
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut down => {}
        clean = &mut up => if clean {
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
        },
        () = server.shutdown.forced() => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grants_go_back_a_quarter_window_at_a_time() {
        let mut grants = Grants::new(100);
        assert_eq!(grants.wrote(10), None);
        assert_eq!(grants.wrote(15), Some(25));
        assert_eq!(grants.wrote(100), Some(100));
        assert_eq!(Grants::new(0).wrote(1000), None);
    }
}
