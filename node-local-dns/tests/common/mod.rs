//! Shared by the integration tests: a small authoritative upstream on real sockets, a DNS
//! client, and the real binary started with node-cache's flags.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, rcode, rtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// An authoritative server for every name: `nx*` names are NXDOMAIN with an SOA (negative
/// TTL 5), everything else has one A record `10.0.0.<len>` with `ttl`.
pub struct Authority {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Authority {
    pub async fn start(addr: SocketAddr, ttl: u32) -> Authority {
        let (udp, tcp) = if addr.port() == 0 {
            agentkit::testing::udp_and_tcp(addr.ip())
        } else {
            let udp = std::net::UdpSocket::bind(addr).unwrap();
            (udp, std::net::TcpListener::bind(addr).unwrap())
        };
        Authority::from_std(udp, tcp, ttl)
    }

    /// Serves on sockets bound elsewhere (for example by a thread inside a network namespace:
    /// a socket stays in the namespace it was created in). Needs a tokio runtime.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener, ttl: u32) -> Authority {
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = Arc::new(UdpSocket::from_std(udp).unwrap());
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::from_std(tcp).unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let q = Arc::clone(&queries);
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                if let Some(resp) = answer(&buf[..n], ttl) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });
        let q = Arc::clone(&queries);
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    continue;
                };
                let q = Arc::clone(&q);
                tokio::spawn(async move {
                    while let Ok(len) = stream.read_u16().await {
                        let mut packet = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut packet).await.is_err() {
                            return;
                        }
                        q.fetch_add(1, Ordering::SeqCst);
                        if let Some(resp) = answer(&packet, ttl) {
                            let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&resp);
                            if stream.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Authority {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// Stops answering (the sockets close).
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(query: &[u8], ttl: u32) -> Option<Vec<u8>> {
    let parsed = parse_query(query).ok()?;
    let name = parsed.qname_text();
    let first = name
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if first.starts_with("nx") {
        let zone = name.split_once('.').map_or(".", |(_, z)| z).to_owned();
        return Some(
            ResponseBuilder::new(query)
                .rcode(rcode::NXDOMAIN)
                .authority(
                    &zone,
                    rtype::SOA,
                    5,
                    &ResponseBuilder::soa_rdata("ns.test.", "admin.test.", 5),
                )
                .build(),
        );
    }
    let mut b = ResponseBuilder::new(query);
    if parsed.qtype == rtype::A {
        b = b.answer(&name, rtype::A, ttl, &[10, 0, 0, name.len() as u8]);
    }
    Some(b.build())
}

pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, qtype, None, &mut q);
    q
}

pub fn rcode_of(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

pub fn ancount(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[6], reply[7]])
}

/// One UDP query; None on timeout.
pub async fn ask(server: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(query, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// One TCP query.
pub async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&(query.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(query).await.unwrap();
    let len = s.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

/// A free port on 127.0.0.1 for both UDP and TCP (best effort).
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A plain HTTP GET; returns the whole response text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A fresh temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nld-test-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary, started in `dir` with `args`; killed on drop.
pub struct Agent {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, args: &[&str]) -> Agent {
        let mut command = Command::new(binary());
        command.args(args);
        Agent::spawn(dir, command)
    }

    /// The binary with `args`, run in the network namespace `netns` (`ip netns exec`, which
    /// execs the binary itself, so the child's pid is the agent's).
    pub fn start_in_netns(dir: &Path, netns: &str, args: &[&str]) -> Agent {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(binary())
            .args(args);
        Agent::spawn(dir, command)
    }

    /// Runs `command` in `dir`, stderr to a log file there.
    pub fn spawn(dir: &Path, mut command: Command) -> Agent {
        let stderr = dir.join(format!("stderr-{}.log", rand::random::<u32>()));
        let child = command
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Agent { child, stderr }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the log says the agent serves (or it exits).
    pub async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains("node-local-dns serving") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("agent not serving after 10 s:\n{}", self.log());
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(15)).await
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_node-local-dns")
}

/// The flags of the example, with the listen IP and health port given.
pub fn loopback_args<'a>(conf: &'a str, health_port: &'a str, metrics: &'a str) -> Vec<&'a str> {
    vec![
        "-localip",
        "127.0.0.1",
        "-conf",
        conf,
        "-setupinterface=false",
        "-setupiptables=false",
        "-health-port",
        health_port,
        "-metrics-listen-address",
        metrics,
    ]
}
