//! The tunnel's test harness: certificates on disk, our server and agents started in-process
//! from the same command lines a manifest would give them, and clients that play
//! kube-apiserver (HTTP CONNECT on a UDS or TCP+mTLS, gRPC `Proxy` streams).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentkit::testing::Pki;
use agentkit::Shutdown;
use bytes::Bytes;
use clap::Parser as _;
use konnectivity::agent::Agent;
use konnectivity::flags::{AgentFlags, ServerFlags};
use konnectivity::proto::packet::Packet;
use konnectivity::transport::{self, PacketReceiver, PacketSender};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("konn-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, a server certificate for localhost, and client certificates, as files.
pub struct Certs {
    pub dir: TempDir,
    pub pki: Pki,
}

impl Certs {
    pub fn new(name: &str) -> Certs {
        let dir = TempDir::new(name);
        let pki = Pki::new().unwrap();
        pki.write_ca(&dir.0).unwrap();
        for (file, names) in [
            ("server", &["localhost", "127.0.0.1"][..]),
            ("client", &["client"][..]),
        ] {
            let leaf = pki.leaf(names).unwrap();
            std::fs::write(dir.0.join(format!("{file}.pem")), &leaf.cert_pem).unwrap();
            std::fs::write(dir.0.join(format!("{file}-key.pem")), &leaf.key_pem).unwrap();
        }
        // A second CA whose client certificate the servers must refuse.
        let other = Pki::new().unwrap();
        let leaf = other.leaf(&["intruder"]).unwrap();
        std::fs::write(dir.0.join("intruder.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.0.join("intruder-key.pem"), &leaf.key_pem).unwrap();
        Certs { dir, pki }
    }

    pub fn ca(&self) -> String {
        self.dir.path("ca.pem")
    }
    pub fn file(&self, name: &str) -> String {
        self.dir.path(name)
    }
}

/// Our server, running in this process.
pub struct Server {
    pub shutdown: Shutdown,
    pub agent_addr: SocketAddr,
    /// The QUIC listener for agents, if started with [`Server::start_quic`].
    pub agent_quic: Option<SocketAddr>,
    pub frontend_tcp: Option<SocketAddr>,
    pub health: SocketAddr,
    pub uds: Option<PathBuf>,
    pub registry: prometheus::Registry,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts with upstream-style flags (`--agent-port=0` etc. are added); `extra` wins.
    pub async fn start(certs: &Certs, extra: &[impl AsRef<str>]) -> Server {
        Server::start_with(certs, extra, |_| {}).await
    }

    /// [`Server::start`], with `tweak` applied to the config the flags gave.
    pub async fn start_with(
        certs: &Certs,
        extra: &[impl AsRef<str>],
        tweak: impl FnOnce(&mut konnectivity::server::Config),
    ) -> Server {
        agentkit::testing::capture_logs();
        let mut args: Vec<String> = vec![
            "konnectivity-server".into(),
            "--agent-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--cluster-cert={}", certs.file("server.pem")),
            format!("--cluster-key={}", certs.file("server-key.pem")),
            "--health-port=0".into(),
            "--admin-port=0".into(),
        ];
        args.extend(extra.iter().map(|s| s.as_ref().to_owned()));
        let flags = ServerFlags::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let mut config = flags.config().unwrap();
        config.health_addr = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let uds = config.uds.clone();
        let shutdown = Shutdown::new();
        let registry = prometheus::Registry::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(konnectivity::server::run(
            config,
            registry.clone(),
            shutdown.clone(),
            move |bound| {
                let _ = tx.send(bound);
            },
        ));
        let bound = rx.await.expect("server started");
        Server {
            shutdown,
            agent_addr: bound.agent,
            agent_quic: bound.agent_quic,
            frontend_tcp: bound.frontend_tcp,
            health: bound.health.unwrap(),
            uds,
            registry,
            task,
        }
    }

    /// A server with kube-apiserver's usual frontend: HTTP CONNECT on a UDS in `certs`'
    /// directory; `extra` flags follow.
    pub async fn start_connect(certs: &Certs, extra: &[&str]) -> Server {
        Server::start(certs, &connect_flags(certs, extra)).await
    }

    /// [`Server::start_connect`], also accepting agents over QUIC.
    pub async fn start_connect_quic(certs: &Certs, extra: &[&str]) -> Server {
        Server::start_quic(certs, &connect_flags(certs, extra)).await
    }

    /// [`Server::start`], also accepting agents over QUIC (an ephemeral UDP port).
    pub async fn start_quic(certs: &Certs, extra: &[impl AsRef<str>]) -> Server {
        Server::start_with(certs, extra, |config| {
            config.agent_quic_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await
    }

    /// A metric's value (summed over label sets), 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.registry, name)
    }

    /// Stops it: graceful phase, then forced.
    pub async fn stop(self) {
        self.shutdown.stop_accepting();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    /// Waits until `n` agents are connected and ready.
    pub async fn wait_agents(&self, n: usize) {
        let name = "konnectivity_network_proxy_server_ready_backend_connections";
        wait_for(&format!("{n} agents"), || self.metric(name) as usize == n).await;
    }
}

pub fn metric(registry: &prometheus::Registry, name: &str) -> f64 {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    String::from_utf8(text)
        .unwrap()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `done` every 20 ms for up to 20 s.
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// `--mode=http-connect` on a UDS in `certs`' directory, then `extra`.
fn connect_flags(certs: &Certs, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--mode=http-connect".to_owned(),
        "--server-port=0".to_owned(),
        format!("--uds-name={}", certs.file("konn.sock")),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// Our agent, running in this process.
pub struct AgentHandle {
    pub shutdown: Shutdown,
    pub agent: Arc<Agent>,
    pub registry: prometheus::Registry,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl AgentHandle {
    pub async fn start(certs: &Certs, server: SocketAddr, extra: &[&str]) -> AgentHandle {
        agentkit::testing::capture_logs();
        let mut args: Vec<String> = vec![
            "konnectivity-agent".into(),
            "--proxy-server-host=localhost".into(),
            format!("--proxy-server-port={}", server.port()),
            format!("--ca-cert={}", certs.ca()),
            "--health-server-port=0".into(),
            "--admin-server-port=0".into(),
            "--sync-interval=100ms".into(),
            "--sync-interval-cap=500ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let flags = AgentFlags::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let config = flags.config().unwrap();
        let shutdown = Shutdown::new();
        let registry = prometheus::Registry::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(konnectivity::agent::run(
            config,
            registry.clone(),
            shutdown.clone(),
            move |_, agent| {
                let _ = tx.send(agent);
            },
        ));
        let agent = rx.await.expect("agent started");
        AgentHandle {
            shutdown,
            agent,
            registry,
            task,
        }
    }

    /// An agent with `--transport=quic` toward `server`'s QUIC listener.
    pub async fn start_quic(certs: &Certs, server: &Server, extra: &[&str]) -> AgentHandle {
        let quic = server.agent_quic.expect("a server with QUIC");
        let mut args = vec![
            "--transport=quic".to_owned(),
            format!("--proxy-server-quic-port={}", quic.port()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        AgentHandle::start(certs, server.agent_addr, &args).await
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.registry, name)
    }

    pub async fn stop(self) {
        self.shutdown.stop_accepting();
        let _ = tokio::time::timeout(Duration::from_secs(40), self.task).await;
    }
}

/// Sends `CONNECT address` the way kube-apiserver does and reads the answer head: the status
/// and the body of a failure (for a 200, exactly the head, nothing after it).
pub async fn connect_uds(path: &Path, address: &str) -> (u16, String, UnixStream) {
    let mut stream = UnixStream::connect(path).await.unwrap();
    let (status, body) = connect_on(&mut stream, address).await;
    (status, body, stream)
}

pub async fn connect_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    address: &str,
) -> (u16, String) {
    stream
        .write_all(format!("CONNECT {address} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Byte by byte, so nothing after the head is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = String::new();
    if status != 200 {
        let _ = stream.read_to_string(&mut body).await;
    }
    (status, body)
}

/// A round trip with half-close through a CONNECT tunnel: everything written comes back, then
/// EOF.
pub async fn half_closed_echo(path: &std::path::Path, echo: &str, n: usize, seed: u64) {
    let (status, body, stream) = connect_uds(path, echo).await;
    assert_eq!(status, 200, "{body}");
    let data = payload(n, seed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes changed in the tunnel");
}

/// `n` pseudo-random bytes (a fixed xorshift stream, so failures reproduce).
pub fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` and reads back as many bytes (through an echo server), concurrently.
pub async fn echo_round_trip<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        wr.write_all(data).await.unwrap();
        wr
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        rd.read_exact(&mut got).await.unwrap();
        got
    };
    let (_wr, got) = tokio::join!(write, read);
    got
}

/// konnectivity-client's side of a `Proxy` stream, over an HTTP/2 connection on a UDS.
pub struct GrpcClient {
    requests: h2::client::SendRequest<Bytes>,
}

impl GrpcClient {
    pub async fn connect(path: &Path) -> GrpcClient {
        let io = UnixStream::connect(path).await.unwrap();
        // Like grpc-go, a stream that is not read holds only its own window, not the whole
        // connection's (grpc-go hands connection window back as data arrives).
        let (requests, connection) = h2::client::Builder::new()
            .initial_window_size(64 << 10)
            .initial_connection_window_size(64 << 20)
            .handshake(io)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        GrpcClient { requests }
    }

    /// Opens a `Proxy` stream.
    pub async fn stream(&self) -> (PacketSender, PacketReceiver) {
        let mut requests = self.requests.clone().ready().await.unwrap();
        let head = transport::request_head("localhost", transport::PROXY_PATH, false);
        let (response, send) = requests.send_request(head, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        (
            PacketSender::new(send),
            PacketReceiver::new(response.into_body()),
        )
    }

    /// Opens a stream and dials `address`: the DIAL_RSP.
    pub async fn dial(&self, address: &str, random: i64) -> (PacketSender, PacketReceiver, Packet) {
        let (mut send, mut recv) = self.stream().await;
        send.send(&Packet::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        })
        .await
        .unwrap();
        let rsp = recv.recv().await.unwrap().expect("a DIAL_RSP");
        (send, recv, rsp)
    }
}

impl GrpcClient {
    /// One whole tunnel the way konnectivity-client uses it: dial `echo` (an echo server), check
    /// the DIAL_RSP (no error, `random` echoed), send `data` in `piece`-sized DATA packets, read
    /// it all back unchanged on the same connect ID, send CLOSE_REQ and get the CLOSE_RSP.
    pub async fn echo_tunnel(&self, echo: &str, random: i64, data: &[u8], piece: usize) {
        let (mut send, mut recv, rsp) = self.dial(echo, random).await;
        let Packet::DialResponse {
            error,
            connect_id,
            random: echoed,
        } = rsp
        else {
            panic!("expected DIAL_RSP, got {rsp:?}");
        };
        assert_eq!((error.as_str(), echoed), ("", random));
        assert!(connect_id > 0);
        for chunk in data.chunks(piece) {
            send.send(&Packet::Data {
                connect_id,
                error: String::new(),
                data: Bytes::copy_from_slice(chunk),
            })
            .await
            .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < data.len() {
            match recv.recv().await.unwrap().expect("stream open") {
                Packet::Data {
                    connect_id: id,
                    data,
                    ..
                } => {
                    assert_eq!(id, connect_id);
                    got.extend_from_slice(&data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got == data, "bytes changed in the tunnel");
        send.send(&Packet::CloseRequest { connect_id })
            .await
            .unwrap();
        // The echo server closes when it reads EOF: CLOSE_RSP follows.
        loop {
            match recv.recv().await.unwrap() {
                Some(Packet::CloseResponse { connect_id: id, .. }) => {
                    assert_eq!(id, connect_id);
                    break;
                }
                Some(Packet::Data { .. }) => {}
                other => panic!("expected CLOSE_RSP, got {other:?}"),
            }
        }
    }
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A TCP listener whose accept queue is full: connects to it hang (for dial timeouts).
pub fn black_hole() -> (
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    socket2::Socket,
) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue (backlog 0 still admits one or two); later SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(std::net::TcpStream::from(s));
    }
    std::thread::sleep(Duration::from_millis(50));
    (addr, fillers, socket)
}
