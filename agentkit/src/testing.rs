//! Test fixtures shared by the agents' integration tests, the demo and the bench (feature
//! `test-support`): a generated CA with leaf certificates, TLS servers that answer like a
//! kube-apiserver's `/version`, a plain echo server, real ClientHello bytes, the gate for
//! tests that need root, a real Kubernetes control plane ([`kube`]) and a real log store
//! ([`victoria_logs`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod kube;
pub mod victoria_logs;

/// A throwaway CA that signs leaf certificates for test names.
pub struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A leaf certificate with its key.
#[derive(Debug)]
pub struct Leaf {
    /// The certificate chain (leaf, CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// PEM of the leaf certificate.
    pub cert_pem: String,
    /// PEM of the key.
    pub key_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// Generates a CA.
    pub fn new() -> anyhow::Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agentkit test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(Pki { ca_cert, ca_key })
    }

    /// PEM of the CA certificate (for `curl --cacert`).
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> anyhow::Result<Leaf> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.ca_cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server config presenting a leaf for `names`.
    pub fn server_config(&self, names: &[&str]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let leaf = self.leaf(names)?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(leaf.chain, PrivateKeyDer::Pkcs8(leaf.key))?;
        Ok(Arc::new(config))
    }

    /// A client config trusting this CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[Vec<u8>]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.to_vec();
        Ok(Arc::new(config))
    }

    /// Writes `ca.pem` into `dir` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca_pem())?;
        Ok(path)
    }
}

/// ALPN protocol names that inflate a ClientHello to about `bytes` bytes, the way a
/// post-quantum key share (X25519MLKEM768: 1,216 bytes) does: a real handshake still works
/// because servers ignore ALPN names they do not know.
pub fn padding_alpn(bytes: usize) -> Vec<Vec<u8>> {
    let mut out = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut n = 0;
    while n * 61 < bytes {
        out.push(format!("x-pad-{n:055}").into_bytes());
        n += 1;
    }
    out
}

/// The ClientHello a rustls client sends for `sni` with `alpn`, as raw TLS records.
pub fn client_hello(sni: &str, alpn: &[Vec<u8>]) -> anyhow::Result<Vec<u8>> {
    let pki = Pki::new()?;
    let name = ServerName::try_from(sni.to_owned())?;
    let mut conn = rustls::ClientConnection::new(pki.client_config(alpn)?, name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Connects to `addr`, performs a TLS handshake for `sni` and asks `GET /version`.
/// Returns the response body.
pub async fn get_version(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::try_from(sni.to_owned())?, tcp)
        .await
        .context("TLS handshake")?;
    tls.write_all(
        format!("GET /version HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.or_else(|e| {
        // Some servers close without close_notify; what was read is still the answer.
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(0)
        } else {
            Err(e)
        }
    })?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    anyhow::ensure!(
        resp.starts_with("HTTP/1.1 200"),
        "unexpected response: {resp}"
    );
    Ok(body)
}

/// A TLS server answering `GET /version` with `{"shoot": NAME, ...}` on keep-alive HTTP/1.1,
/// like a shoot's kube-apiserver. Stops when the token is cancelled.
#[derive(Debug)]
pub struct VersionServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl VersionServer {
    /// Starts on `bind` (port 0 for any).
    pub async fn start(
        bind: SocketAddr,
        name: &str,
        config: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let name: Arc<str> = Arc::from(name);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let (acceptor, name, token) = (acceptor.clone(), Arc::clone(&name), token.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve_version(acceptor, tcp, &name) => {},
                        () = token.cancelled() => {},
                    }
                });
            }
        });
        Ok(VersionServer { addr, stop })
    }
}

impl Drop for VersionServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_version(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    name: &str,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
    let mut stream = BufReader::new(tls);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut close = false;
        loop {
            let mut header = String::new();
            if stream.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            if header.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        let (status, body) = if path == "/version" {
            (
                "200 OK",
                format!("{{\"shoot\":\"{name}\",\"sni\":\"{sni}\",\"gitVersion\":\"v1.33.0\"}}\n"),
            )
        } else {
            (
                "404 Not Found",
                "{\"kind\":\"Status\",\"code\":404}\n".to_owned(),
            )
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        stream.get_mut().write_all(head.as_bytes()).await?;
        stream.get_mut().write_all(body.as_bytes()).await?;
        if close {
            stream.get_mut().shutdown().await?;
            return Ok(());
        }
    }
}

/// A plain TCP server that echoes every byte back and half-closes its side once the client
/// has half-closed and everything was echoed: the backend for integrity and half-close tests.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl EchoServer {
    /// Starts on `bind` (port 0 for any).
    pub async fn start(bind: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    () = token.cancelled() => return,
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    tokio::select! {
                        _ = async {
                            tokio::io::copy(&mut r, &mut w).await?;
                            w.shutdown().await
                        } => {},
                        () = token.cancelled() => {},
                    }
                });
            }
        });
        Ok(EchoServer { addr, stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends logs (level from `RUST_LOG`, default `warn`) to the test harness's captured output:
/// a failing test shows what the agent said before it failed, a passing one stays quiet. Every
/// test may call it; the first call installs the subscriber.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Whether this process may create network namespaces and load eBPF (CAP_NET_ADMIN and
/// CAP_SYS_ADMIN in the effective set).
pub fn has_privileges() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(caps) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    caps & (CAP_NET_ADMIN | CAP_SYS_ADMIN) == CAP_NET_ADMIN | CAP_SYS_ADMIN
}

/// Gate for tests that need root. Returns true when the test may run. Without privileges it
/// prints a loud SKIP line and returns false, or panics when `REQUIRE_PRIVILEGED=1` (CI).
pub fn require_privileges(test: &str) -> bool {
    if has_privileges() {
        return true;
    }
    assert!(
        std::env::var("REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test}: needs CAP_NET_ADMIN+CAP_SYS_ADMIN and REQUIRE_PRIVILEGED=1 forbids skipping"
    );
    // Written to the stderr descriptor directly: the test harness captures `eprintln!` of
    // passing tests, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); set REQUIRE_PRIVILEGED=1 to make this a failure ***\n"
    );
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn version_server_answers_with_its_name() {
        let pki = Pki::new().unwrap();
        let server = VersionServer::start(
            "127.0.0.1:0".parse().unwrap(),
            "shoot--a--b",
            pki.server_config(&["api.a.test"]).unwrap(),
        )
        .await
        .unwrap();
        let body = get_version(server.addr, "api.a.test", pki.client_config(&[]).unwrap())
            .await
            .unwrap();
        assert!(body.contains("\"shoot\":\"shoot--a--b\""), "{body}");
        assert!(body.contains("\"sni\":\"api.a.test\""), "{body}");
    }

    #[test]
    fn padded_client_hello_is_post_quantum_sized() {
        let small = client_hello("api.a.test", &[]).unwrap();
        let big = client_hello("api.a.test", &padding_alpn(1300)).unwrap();
        assert_eq!(small[0], 0x16);
        assert!(big.len() > 1500, "{}", big.len());
    }
}

/// Runs `program` in the calling thread's network namespace and returns its stdout; panics
/// (naming the command and its stderr) if it is missing or fails.
pub fn run_command(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A UDP socket and a TCP listener on one port of `ip` (a DNS server's pair). The kernel picks
/// the UDP port; the TCP side of it may be held by someone else (an outgoing connection's
/// ephemeral port, another test), so a few fresh ports are tried before giving up.
pub fn udp_and_tcp(ip: std::net::IpAddr) -> (std::net::UdpSocket, std::net::TcpListener) {
    let mut last = None;
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind((ip, 0)).expect("bind a UDP port");
        let addr = udp.local_addr().expect("a bound socket has an address");
        match std::net::TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last = Some(e),
        }
    }
    panic!("no port of {ip} free for both UDP and TCP: {last:?}")
}

/// [`udp_and_tcp`] as tokio sockets (needs a runtime).
pub fn tokio_udp_and_tcp(ip: std::net::IpAddr) -> (tokio::net::UdpSocket, TcpListener) {
    let (udp, tcp) = udp_and_tcp(ip);
    udp.set_nonblocking(true).expect("nonblocking");
    tcp.set_nonblocking(true).expect("nonblocking");
    (
        tokio::net::UdpSocket::from_std(udp).expect("register with the runtime"),
        TcpListener::from_std(tcp).expect("register with the runtime"),
    )
}

/// A network namespace created for one test (`ip netns add`, loopback up), deleted with every
/// link and rule in it on drop. Privileged tests only.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static NEXT_NETNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl NetNs {
    /// A fresh namespace named `<prefix><pid>-<n>`.
    pub fn create(prefix: &str) -> NetNs {
        let n = NEXT_NETNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}{}-{n}", std::process::id());
        run_command("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        run_command("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Its name (for `ip -n NAME` and `ip netns exec NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has entered the namespace; processes it spawns start there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd as _;
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

static NEXT_SUBNET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Test hosts off loopback: a network namespace with addresses `<prefix>.2` to `.9` on a veth
/// whose host end is `<prefix>.1`, in its own /24 of 198.18.0.0/15 (the benchmarking range:
/// our own test hosts only). For what refuses loopback (the API server's Endpoints and node
/// proxy) and for "a node behind NAT". Deleted with the namespace on drop.
#[derive(Debug)]
pub struct Hosts {
    pub netns: NetNs,
    pub prefix: String,
}

impl Hosts {
    /// A fresh namespace named after `tag`; None (after a loud SKIP) when unprivileged.
    pub fn create(test: &str, tag: &str) -> Option<Hosts> {
        if !require_privileges(test) {
            return None;
        }
        let third = (std::process::id() % 50) as u8 * 5
            + NEXT_SUBNET.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5;
        let prefix = format!("198.18.{third}");
        let netns = NetNs::create(tag);
        let tag4: String = tag.chars().take(4).collect();
        let (host, peer) = (format!("{tag4}h{third}"), format!("{tag4}p{third}"));
        run_command(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        run_command("ip", &["link", "set", &peer, "netns", netns.name()]);
        run_command(
            "ip",
            &["addr", "add", &format!("{prefix}.1/24"), "dev", &host],
        );
        run_command("ip", &["link", "set", &host, "up"]);
        for h in 2..=9 {
            let addr = format!("{prefix}.{h}/24");
            run_command(
                "ip",
                &["-n", netns.name(), "addr", "add", &addr, "dev", &peer],
            );
        }
        run_command("ip", &["-n", netns.name(), "link", "set", &peer, "up"]);
        Some(Hosts { netns, prefix })
    }

    /// `<prefix>.<host>`.
    pub fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }
}
