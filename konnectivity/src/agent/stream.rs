//! One agent-to-server stream: the connection (TLS, HTTP/2, metadata, the server's
//! `serverid`/`servercount` answer), the reader that routes the server's packets without ever
//! waiting on a tunnel, and one task per tunnel that carries its destination socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkit::sync::lock;
use anyhow::{anyhow, bail, Context as _};
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Agent, Transport};
use crate::metrics::Segment;
use crate::proto::packet::Packet;
use crate::server::frontend::Grants;
use crate::transport::{self, Agreed, Extensions, PacketReceiver, PacketSender};
use crate::tunnel::{self, Credit, Event, Queue, CHUNK};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// With `--transport=auto`, how long QUIC may take before gRPC is tried: UDP that is
/// blocked gives no error, only silence.
const AUTO_QUIC_TIMEOUT: Duration = Duration::from_secs(3);
const DATA_QUEUE: usize = 64;

struct Conn {
    queue: Queue,
    credit: Credit,
}

/// A connected stream to one server replica.
pub struct ServerStream {
    pub server_id: String,
    pub server_count: u32,
    pub agreed: Agreed,
    control: mpsc::UnboundedSender<Packet>,
    data: mpsc::Sender<Packet>,
    /// The QUIC connection, if this stream is QUIC's control stream: tunnels are streams of it.
    quic: Option<quinn::Connection>,
    io: Mutex<Option<StreamIo>>,
    conns: Mutex<HashMap<i64, Conn>>,
    /// Tunnels on QUIC streams.
    quic_tunnels: AtomicUsize,
    pending: Mutex<HashMap<i64, CancellationToken>>,
    next_id: AtomicI64,
    draining: AtomicBool,
    closed: CancellationToken,
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("server_id", &self.server_id)
            .field("agreed", &self.agreed)
            .finish_non_exhaustive()
    }
}

struct StreamIo {
    sender: PacketSender,
    receiver: PacketReceiver,
    control_rx: mpsc::UnboundedReceiver<Packet>,
    data_rx: mpsc::Receiver<Packet>,
    ping: Option<h2::PingPong>,
    _keep: Keep,
}

/// What a server answered to our `Connect` (either transport).
struct Accepted {
    server_id: String,
    server_count: u32,
    agreed: Agreed,
    sender: PacketSender,
    receiver: PacketReceiver,
    ping: Option<h2::PingPong>,
    keep: Keep,
}

/// Keeps the connection under a stream open (dropping every handle closes it).
enum Keep {
    H2(#[allow(dead_code)] h2::client::SendRequest<Bytes>),
    Quic(quinn::Connection),
}

impl ServerStream {
    /// Dials the server (through whatever load balancer is in front) and opens `Connect`, on
    /// the transport `--transport` asks for: with `auto`, QUIC first and gRPC if QUIC fails.
    pub async fn connect(agent: &Agent) -> anyhow::Result<Arc<ServerStream>> {
        let config = &agent.config;
        let metadata = metadata(config)?;
        let opened = match config.transport {
            Transport::Grpc => timed(config, open_h2(agent, metadata)).await,
            Transport::Quic => timed(config, open_quic(agent, metadata)).await,
            Transport::Auto => {
                match tokio::time::timeout(AUTO_QUIC_TIMEOUT, open_quic(agent, metadata.clone()))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no QUIC answer within {AUTO_QUIC_TIMEOUT:?}")))
                {
                    Ok(accepted) => Ok(accepted),
                    Err(error) => {
                        debug!(
                            error = format!("{error:#}"),
                            "QUIC failed: falling back to gRPC over TCP"
                        );
                        agent.metrics.quic_fallbacks.inc();
                        timed(config, open_h2(agent, metadata)).await
                    }
                }
            }
        };
        let accepted = opened?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        let quic = match &accepted.keep {
            Keep::Quic(connection) => Some(connection.clone()),
            Keep::H2(_) => None,
        };
        Ok(Arc::new(ServerStream {
            server_id: accepted.server_id,
            server_count: accepted.server_count,
            agreed: accepted.agreed,
            control,
            data,
            quic,
            io: Mutex::new(Some(StreamIo {
                sender: accepted.sender,
                receiver: accepted.receiver,
                control_rx,
                data_rx,
                ping: accepted.ping,
                _keep: accepted.keep,
            })),
            conns: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            quic_tunnels: AtomicUsize::new(0),
            next_id: AtomicI64::new(1),
            draining: AtomicBool::new(false),
            closed: CancellationToken::new(),
        }))
    }

    /// The transport of this stream, for logs.
    pub fn transport(&self) -> &'static str {
        if self.quic.is_some() {
            "quic"
        } else {
            "grpc"
        }
    }

    /// Open tunnels on this stream.
    pub fn tunnels(&self) -> usize {
        lock(&self.conns).len()
            + lock(&self.pending).len()
            + self.quic_tunnels.load(Ordering::Relaxed)
    }

    /// Tells the server we are going away (DRAIN, once).
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            let _ = self.control.send(Packet::Drain);
        }
    }

    /// Ends the stream and every tunnel on it.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Serves the stream until it ends.
    pub async fn serve(self: Arc<Self>, agent: Arc<Agent>) -> anyhow::Result<()> {
        let Some(io) = lock(&self.io).take() else {
            bail!("stream served twice");
        };
        let StreamIo {
            mut sender,
            mut receiver,
            control_rx,
            data_rx,
            ping,
            _keep,
        } = io;
        let writer = {
            let this = Arc::clone(&self);
            let agent = Arc::clone(&agent);
            agent.shutdown.clone().spawn(async move {
                let mut outbox = Outbox {
                    control: control_rx,
                    data: data_rx,
                    held: None,
                };
                loop {
                    let packet = tokio::select! {
                        biased;
                        () = this.closed.cancelled() => break,
                        packet = outbox.next() => match packet {
                            Some(packet) => packet,
                            None => break,
                        },
                    };
                    let sent = tokio::select! {
                        sent = sender.send(&packet) => sent,
                        () = this.closed.cancelled() => break,
                    };
                    if sent.is_err() {
                        agent
                            .metrics
                            .common
                            .error(Segment::ToServer, "send", packet.kind_label());
                        this.closed.cancel();
                        return;
                    }
                    agent.metrics.common.packet(Segment::ToServer, &packet);
                }
                sender.finish_request();
            })
        };
        let keepalive = keepalive(ping, agent.config.keepalive, self.closed.clone());
        let end = tokio::select! {
            end = self.read_loop(&agent, &mut receiver) => end,
            () = keepalive => Err(anyhow!("the server stopped answering HTTP/2 PINGs")),
            () = self.closed.cancelled() => Ok(()),
            () = agent.shutdown.forced() => Ok(()),
        };
        self.closed.cancel();
        for (_, token) in lock(&self.pending).drain() {
            token.cancel();
        }
        let conns: Vec<Conn> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for conn in conns {
            conn.queue.event(Event::Close("server stream ended".into()));
            conn.credit.close();
        }
        let _ = writer.await;
        if let Some(connection) = &self.quic {
            connection.close(quinn::VarInt::from_u32(0), b"stream ended");
        }
        end
    }

    async fn read_loop(
        self: &Arc<Self>,
        agent: &Arc<Agent>,
        receiver: &mut PacketReceiver,
    ) -> anyhow::Result<()> {
        let common = &agent.metrics.common;
        while let Some(packet) = receiver.recv().await? {
            common.packet(Segment::FromServer, &packet);
            match packet {
                Packet::DialRequest {
                    protocol,
                    address,
                    random,
                } => {
                    let token = CancellationToken::new();
                    lock(&self.pending).insert(random, token.clone());
                    let this = Arc::clone(self);
                    let agent2 = Arc::clone(agent);
                    agent.shutdown.spawn(async move {
                        this.dial(agent2, protocol, address, random, token).await;
                    });
                }
                Packet::Data {
                    connect_id, data, ..
                } => {
                    let conns = lock(&self.conns);
                    match conns.get(&connect_id) {
                        Some(conn) => {
                            if conn.queue.data(data).is_err() {
                                drop(conns);
                                common.tunnel_overflows.inc();
                                self.end_conn(
                                    connect_id,
                                    "tunnel buffer overflow: destination too slow",
                                );
                            }
                        }
                        None => {
                            drop(conns);
                            self.send(Packet::CloseResponse {
                                error: "unrecognized connectID".into(),
                                connect_id,
                            });
                        }
                    }
                }
                Packet::CloseRequest { connect_id } => {
                    let conn = lock(&self.conns).remove(&connect_id);
                    match conn {
                        Some(conn) => {
                            conn.queue.event(Event::Close(String::new()));
                            conn.credit.close();
                            self.send(Packet::CloseResponse {
                                error: String::new(),
                                connect_id,
                            });
                        }
                        None => self.send(Packet::CloseResponse {
                            error: "Unknown connectID".into(),
                            connect_id,
                        }),
                    }
                }
                Packet::DialClose { random } => {
                    if let Some(token) = lock(&self.pending).remove(&random) {
                        token.cancel();
                    }
                }
                Packet::Window { connect_id, bytes } => {
                    if let Some(conn) = lock(&self.conns).get(&connect_id) {
                        conn.credit.grant(bytes);
                    }
                }
                Packet::HalfClose { connect_id } => {
                    if let Some(conn) = lock(&self.conns).get(&connect_id) {
                        conn.queue.event(Event::HalfClose);
                    }
                }
                other => debug!(packet = other.kind_label(), "ignored packet from server"),
            }
        }
        Ok(())
    }

    fn send(&self, packet: Packet) {
        let _ = self.control.send(packet);
    }

    /// Removes a tunnel and tells the server (unsolicited CLOSE_RSP), once.
    fn end_conn(&self, connect_id: i64, error: &str) {
        if let Some(conn) = lock(&self.conns).remove(&connect_id) {
            conn.queue.event(Event::Close(error.to_owned()));
            conn.credit.close();
            self.send(Packet::CloseResponse {
                error: error.to_owned(),
                connect_id,
            });
        }
    }

    async fn dial(
        self: Arc<Self>,
        agent: Arc<Agent>,
        protocol: String,
        address: String,
        random: i64,
        cancel: CancellationToken,
    ) {
        let started = Instant::now();
        let result = if protocol != "tcp" {
            Err(format!("protocol {protocol:?} is not supported (only tcp)"))
        } else {
            tokio::select! {
                () = cancel.cancelled() => {
                    debug!(random, address, "dial cancelled by the server (DIAL_CLS)");
                    return;
                }
                dialed = tokio::time::timeout(agent.config.dial_timeout, TcpStream::connect(&address)) => match dialed {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(error)) => {
                        agent.metrics.endpoint_dial_failures.with_label_values(&["unknown"]).inc();
                        Err(format!("dial tcp {address}: {error}"))
                    }
                    Err(_) => {
                        agent.metrics.endpoint_dial_failures.with_label_values(&["timeout"]).inc();
                        Err(format!("dial tcp {address}: i/o timeout"))
                    }
                },
            }
        };
        // Cancelled after the dial completed: the server no longer waits for it.
        if lock(&self.pending).remove(&random).is_none() {
            return;
        }
        let stream = match result {
            Ok(stream) => stream,
            Err(error) => {
                self.send(Packet::DialResponse {
                    error,
                    connect_id: 0,
                    random,
                });
                return;
            }
        };
        agent
            .metrics
            .dial_duration
            .observe(started.elapsed().as_secs_f64());
        let _ = stream.set_nodelay(true);
        let connect_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(connection) = &self.quic {
            // The tunnel is a stream of its own, opened with the DIAL_RSP.
            let mut tunnel = match crate::quic::open_tunnel(connection, connect_id, random).await {
                Ok(tunnel) => tunnel,
                Err(error) => {
                    self.send(Packet::DialResponse {
                        error: format!("{error:#}"),
                        connect_id: 0,
                        random,
                    });
                    return;
                }
            };
            self.quic_tunnels.fetch_add(1, Ordering::Relaxed);
            agent.metrics.open_endpoint_connections.inc();
            crate::quic::splice_socket(&mut tunnel, stream, Bytes::new(), self.closed.cancelled())
                .await;
            agent.metrics.open_endpoint_connections.dec();
            self.quic_tunnels.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let (queue, rx) = tunnel::queue(
            agent.config.buffer.max(self.agreed.recv_window as usize),
            Some(agent.metrics.common.tunnel_queued_bytes.clone()),
        );
        let credit = match self.agreed.send_window {
            0 => Credit::unlimited(),
            window => Credit::window(window),
        };
        lock(&self.conns).insert(
            connect_id,
            Conn {
                queue,
                credit: credit.clone(),
            },
        );
        self.send(Packet::DialResponse {
            error: String::new(),
            connect_id,
            random,
        });
        agent.metrics.open_endpoint_connections.inc();
        self.carry(&agent, connect_id, stream, rx, credit).await;
        agent.metrics.open_endpoint_connections.dec();
        // Unless the server closed it, tell it the tunnel is over: on the data queue, behind
        // the last DATA, so the end never overtakes the bytes.
        let conn = lock(&self.conns).remove(&connect_id);
        if let Some(conn) = conn {
            conn.credit.close();
            let close = Packet::CloseResponse {
                error: String::new(),
                connect_id,
            };
            if self.data.send(close).await.is_err() {
                debug!(connect_id, "stream gone before the tunnel's close");
            }
        }
    }

    /// Moves bytes between the destination and the stream until the tunnel ends.
    async fn carry(
        &self,
        agent: &Agent,
        connect_id: i64,
        stream: TcpStream,
        mut rx: tunnel::QueueRx,
        credit: Credit,
    ) {
        let (rd, mut wr) = stream.into_split();
        let half_close = self.agreed.half_close;
        let up = async {
            let mut size = 4096;
            loop {
                // No buffer is held while the destination is quiet: an idle tunnel costs its
                // task and its table entry, not a read buffer.
                if rd.readable().await.is_err() {
                    return false;
                }
                let blocked = credit.exhausted().then(Instant::now);
                let Some(budget) = credit.take(size).await else {
                    return false;
                };
                if let Some(since) = blocked {
                    agent
                        .metrics
                        .common
                        .tunnel_blocked_seconds
                        .inc_by(since.elapsed().as_secs_f64());
                }
                let mut buf = BytesMut::with_capacity(budget);
                let n = match rd.try_read_buf(&mut (&mut buf).limit(budget)) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        credit.give_back(budget);
                        continue;
                    }
                    Err(_) => return false,
                };
                credit.give_back(budget - n);
                if n == 0 {
                    return true;
                }
                size = if n == budget {
                    (size * 2).min(CHUNK)
                } else {
                    4096
                };
                if self
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
            let mut grants = Grants::new(self.agreed.recv_window);
            while let Some(event) = rx.next().await {
                match event {
                    Event::Data(data) => {
                        let n = data.len();
                        if wr.write_all(&data).await.is_err() {
                            return false;
                        }
                        if let Some(bytes) = grants.wrote(n) {
                            self.send(Packet::Window { connect_id, bytes });
                        }
                    }
                    Event::HalfClose => {
                        let _ = wr.shutdown().await;
                        return true;
                    }
                    Event::Close(_) => return false,
                }
            }
            false
        };
        tokio::pin!(up, down);
        tokio::select! {
            // The server half-closed (its side sent FIN): reading goes on until ours ends.
            half = &mut down => if half {
                tokio::select! {
                    _ = &mut up => {}
                    () = self.closed.cancelled() => {}
                }
            },
            eof = &mut up => if eof && half_close {
                // Behind the last DATA, on the data queue.
                let _ = self.data.send(Packet::HalfClose { connect_id }).await;
                tokio::select! {
                    _ = &mut down => {}
                    () = self.closed.cancelled() => {}
                }
            },
            () = self.closed.cancelled() => {}
        }
    }
}

/// Bounds a connection attempt.
async fn timed(
    config: &super::Config,
    open: impl std::future::Future<Output = anyhow::Result<Accepted>>,
) -> anyhow::Result<Accepted> {
    let authority = format!("{}:{}", config.server_host, config.server_port);
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| anyhow!("no answer from {authority} within {CONNECT_TIMEOUT:?}"))?
}

/// The metadata of `Connect`: agent ID, identifiers, token, our extensions.
fn metadata(config: &super::Config) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(
        transport::AGENT_ID,
        HeaderValue::from_str(&config.agent_id)
            .context("--agent-id is not a valid header value")?,
    );
    if !config.identifiers.is_empty() {
        headers.insert(
            transport::AGENT_IDENTIFIERS,
            HeaderValue::from_str(&config.identifiers)
                .context("--agent-identifiers is not a valid header value")?,
        );
    }
    if let Some(path) = &config.token_path {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("--service-account-token-path {}", path.display()))?;
        headers.insert(
            transport::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .context("the token is not a valid header value")?,
        );
    }
    if let Some(value) = Extensions::all(config.window).header() {
        headers.insert(transport::EXTENSIONS, value);
    }
    Ok(headers)
}

/// The server's answer head: refused (`grpc-status` not 0), or its `serverid` and
/// `servercount`.
fn answer(headers: &HeaderMap) -> anyhow::Result<(String, u32)> {
    if let Some(status) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        if status != "0" {
            let message = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            bail!("the server refused Connect: grpc-status {status}: {message}");
        }
    }
    let server_id = transport::single(headers, transport::SERVER_ID)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("the server sent no serverid"))?
        .to_owned();
    let server_count: u32 = transport::single(headers, transport::SERVER_COUNT)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("the server sent no servercount"))?
        .parse()
        .context("servercount is not a number")?;
    Ok((server_id, server_count))
}

fn server_name(config: &super::Config) -> anyhow::Result<rustls::pki_types::ServerName<'static>> {
    rustls::pki_types::ServerName::try_from(config.server_host.clone()).map_err(|_| {
        anyhow!(
            "--proxy-server-host {:?} is not a valid TLS name",
            config.server_host
        )
    })
}

/// gRPC over TLS over TCP, as upstream.
async fn open_h2(agent: &Agent, metadata: HeaderMap) -> anyhow::Result<Accepted> {
    let config = &agent.config;
    let authority = format!("{}:{}", config.server_host, config.server_port);
    let tcp = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config.tls))
        .connect(server_name(config)?, tcp)
        .await
        .context("TLS handshake with the proxy server")?;
    let (requests, mut connection) = h2::client::Builder::new()
        .initial_window_size(transport::STREAM_WINDOW)
        .initial_connection_window_size(transport::CONNECTION_WINDOW)
        .max_frame_size(transport::MAX_FRAME)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake with the proxy server")?;
    let ping = connection.ping_pong();
    agent.shutdown.spawn(async move {
        let _ = connection.await;
    });
    let mut requests = requests
        .ready()
        .await
        .context("HTTP/2 connection not ready")?;
    let mut head = transport::request_head(&authority, transport::AGENT_PATH, true);
    head.headers_mut().extend(metadata);
    let (response, send) = requests
        .send_request(head, false)
        .context("opening Connect")?;
    let response = response.await.context("the server refused Connect")?;
    let headers = response.headers();
    let (server_id, server_count) = answer(headers)?;
    if response.status() != http::StatusCode::OK || !transport::is_grpc(headers) {
        bail!(
            "the server answered Connect with HTTP {} and no gRPC",
            response.status()
        );
    }
    let agreed = Extensions::agreed(
        Extensions::all(config.window),
        Extensions::from_headers(headers),
    );
    Ok(Accepted {
        server_id,
        server_count,
        agreed,
        sender: PacketSender::new(send),
        receiver: PacketReceiver::new(response.into_body()),
        ping,
        keep: Keep::H2(requests),
    })
}

/// QUIC ([`crate::quic`]): a connection of its own (its own UDP port, so a load balancer may
/// hash it to another replica), the control stream and its heads.
async fn open_quic(agent: &Agent, metadata: HeaderMap) -> anyhow::Result<Accepted> {
    let config = &agent.config;
    let target = format!("{}:{}", config.server_host, config.quic_port);
    // One address: the first IPv4 one if any (a QUIC attempt to a silent address costs a
    // timeout, not an error, so addresses are not tried in turn as TCP's are).
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&target)
        .await
        .with_context(|| format!("resolving {target}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| anyhow!("{target} resolves to no address"))?;
    let local: std::net::SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(local).context("binding a UDP socket for QUIC")?;
    endpoint.set_default_client_config(crate::quic::client_config(
        &config.tls,
        config.window,
        config.keepalive,
    )?);
    let connection = endpoint
        .connect(addr, &config.server_host)
        .context("starting QUIC")?
        .await
        .with_context(|| format!("QUIC handshake with {target}"))?;
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .context("opening the control stream")?;
    crate::quic::write_head(&mut send, &metadata).await?;
    let head = crate::quic::read_head(&mut recv)
        .await
        .context("reading the server's answer")?;
    let (server_id, server_count) = answer(&head)?;
    Ok(Accepted {
        server_id,
        server_count,
        agreed: Agreed {
            half_close: true,
            ..Agreed::default()
        },
        sender: PacketSender::quic(send),
        receiver: PacketReceiver::quic(recv),
        ping: None,
        keep: Keep::Quic(connection),
    })
}

/// The stream's two send queues merged in the order the server needs: control packets first,
/// and never a DATA ahead of a control packet queued before it. A tunnel's DIAL_RSP goes on
/// the control queue before its first DATA goes on the data queue, but a select that finds
/// control empty may see both arrive before it looks at data; a DATA that overtook its
/// DIAL_RSP would make the server close a tunnel it does not know yet. So a DATA is held
/// until control is found empty after it was taken.
struct Outbox {
    control: mpsc::UnboundedReceiver<Packet>,
    data: mpsc::Receiver<Packet>,
    held: Option<Packet>,
}

impl Outbox {
    /// The next packet to send; `None` once both queues are closed and empty. Cancel-safe.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Ok(packet) = self.control.try_recv() {
                return Some(packet);
            }
            if let Some(packet) = self.held.take() {
                return Some(packet);
            }
            tokio::select! {
                biased;
                Some(packet) = self.control.recv() => return Some(packet),
                Some(packet) = self.data.recv() => self.held = Some(packet),
                else => return None,
            }
        }
    }
}

/// Ends when a PING goes unanswered for `interval` (never without a ping handle).
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, closed: CancellationToken) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = closed.cancelled() => return std::future::pending().await,
        }
        match tokio::time::timeout(interval, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Each tunnel's DIAL_RSP is queued on control just before its first DATA, from another
    /// thread, while the outbox is drained: it never yields a DATA before its DIAL_RSP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_data_never_overtakes_the_dial_response_queued_before_it() {
        const TUNNELS: i64 = 50_000;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        let producer = tokio::spawn(async move {
            for id in 1..=TUNNELS {
                control
                    .send(Packet::DialResponse {
                        error: String::new(),
                        connect_id: id,
                        random: id,
                    })
                    .unwrap();
                data.send(Packet::Data {
                    connect_id: id,
                    error: String::new(),
                    data: Bytes::from_static(b"x"),
                })
                .await
                .unwrap();
            }
        });
        let mut outbox = Outbox {
            control: control_rx,
            data: data_rx,
            held: None,
        };
        let mut answered = std::collections::HashSet::new();
        while let Some(packet) = outbox.next().await {
            match packet {
                Packet::DialResponse { connect_id, .. } => {
                    answered.insert(connect_id);
                }
                Packet::Data { connect_id, .. } => assert!(
                    answered.contains(&connect_id),
                    "the DATA of tunnel {connect_id} before its DIAL_RSP"
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        producer.await.unwrap();
        assert_eq!(answered.len(), TUNNELS as usize);
    }
}
