//! A real Kubernetes control plane for tests: etcd and kube-apiserver on 127.0.0.1, with the
//! Gateway API and Istio networking CRDs installed, started through `scripts/kube-up` (which
//! builds the binaries from `test/kube` on first use, outside the clone).
//!
//! [`ControlPlane::shared`] starts one per test binary, on first use, and hands every test the
//! same one. Teardown needs no help from the test binary, which never runs destructors of
//! statics: `kube-up --until-stdin-closes` leaves a watcher process (`kubecp linger`) reading one
//! end of a socket pair whose other end this process holds. When the test binary exits, however
//! it exits (SIGKILL and panics included), the kernel closes that end, the watcher reads end of
//! file and stops the servers and removes their directory. [`ControlPlane::start`] gives a
//! private one that stops the same way when it is dropped.
//!
//! [`ControlPlane::restart`] (a process crashes and comes back) and [`ControlPlane::compact`]
//! (etcd forgets old revisions) disturb every client of the control plane: a test that uses
//! them starts a private one, never the shared one, or it breaks the tests running beside it.

use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The longest `kube-up` may take: a first build from nothing downloads the modules and
/// compiles kube-apiserver (about ten minutes on two cores); a warm start takes seconds.
pub const START_BOUND: Duration = Duration::from_secs(40 * 60);

/// The longest one [`ControlPlane::request`] may take.
pub const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// The longest a [`ControlPlane::restart`] may take beyond its `down_for`: stopping, starting
/// and becoming ready again (kubecp bounds each step; this bounds them all).
pub const RESTART_BOUND: Duration = Duration::from_secs(180);

/// A running etcd + kube-apiserver and the admin credentials for it.
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    client_config: Arc<rustls::ClientConfig>,
    /// Our end of the lifetime socket: closing it stops the control plane.
    _lifetime: UnixStream,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The part of `DIR/kubecp.json` the fixture reads.
#[derive(serde::Deserialize)]
struct State {
    server: String,
    kubeconfig: PathBuf,
    ca_cert: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// `scripts/kube-up` of this checkout.
fn kube_up() -> PathBuf {
    scripts().join("kube-up")
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Runs `kubecp ARGS` (from `scripts/kube-bin`, which kube-up already built) to completion
/// within `bound`; its standard output, or an error with all it printed.
fn kubecp(args: &[&std::ffi::OsStr], bound: Duration) -> anyhow::Result<String> {
    let bin = output(
        Command::new(scripts().join("kube-bin")),
        Duration::from_secs(60),
    )
    .context("scripts/kube-bin")?;
    let mut command = Command::new(Path::new(bin.trim_end()).join("kubecp"));
    command.args(args);
    output(command, bound).with_context(|| format!("kubecp {args:?}"))
}

/// Runs `command` to completion within `bound`, killing it past that; its standard output if
/// it succeeded, else an error with both outputs.
fn output(mut command: Command, bound: Duration) -> anyhow::Result<String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read both pipes while it runs, so that a chatty child never blocks on a full pipe.
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut s) = stream {
                let _ = s.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let stderr = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => bail!("failed ({status}):\n{stdout}{stderr}"),
        None => bail!("did not finish within {bound:?}:\n{stdout}{stderr}"),
    }
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use (blocking: call it from
    /// `spawn_blocking` or before a runtime). Returns `None` after a loud SKIP line when it
    /// cannot start; panics instead when `REQUIRE_PRIVILEGED=1` (CI), like
    /// [`super::require_privileges`].
    pub fn shared(test: &str) -> Option<&'static ControlPlane> {
        let result = SHARED.get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}")));
        match result {
            Ok(cp) => Some(cp),
            Err(error) => {
                assert!(
                    std::env::var("REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                    "{test}: the Kubernetes control plane did not start and REQUIRE_PRIVILEGED=1 forbids skipping: {error}"
                );
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIP {test}: the Kubernetes control plane did not start (scripts/kube-up); set REQUIRE_PRIVILEGED=1 to make this a failure: {error} ***\n"
                );
                None
            }
        }
    }

    /// Starts a control plane of its own in a fresh temporary directory (blocking). It stops,
    /// and the directory is removed, when the value is dropped or this process exits.
    pub fn start() -> anyhow::Result<ControlPlane> {
        Self::start_with(&[])
    }

    /// [`ControlPlane::start`] with more kube-apiserver flags (for example
    /// `--egress-selector-config-file=...`).
    pub fn start_with(apiserver_args: &[String]) -> anyhow::Result<ControlPlane> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "agentkit-kube-{}-{n}-{nanos:x}",
            std::process::id()
        ));
        Self::start_in(&dir, apiserver_args)
    }

    fn start_in(dir: &Path, apiserver_args: &[String]) -> anyhow::Result<ControlPlane> {
        // Both ends are close-on-exec: only kube-up's stdin (a dup made in the child) carries
        // the watcher's end into the processes it starts.
        let (ours, theirs) = UnixStream::pair().context("socket pair")?;
        let script = kube_up();
        let mut child = Command::new(&script)
            .arg(dir)
            .arg("--until-stdin-closes")
            .args(
                apiserver_args
                    .iter()
                    .map(|a| format!("--apiserver-arg={a}")),
            )
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{}", script.display()))?;
        // Forward kube-up's progress as it comes (a first build takes minutes) and keep it for
        // the error message.
        let output = Arc::new(Mutex::new(String::new()));
        let forwarders: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stderr(), "kube-up: {line}");
                    let mut out = crate::sync::lock(&output);
                    out.push_str(&line);
                    out.push('\n');
                }
            })
        })
        .collect();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > START_BOUND {
                let _ = child.kill();
                let _ = child.wait();
                bail!("scripts/kube-up did not finish within {START_BOUND:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for forwarder in forwarders {
            let _ = forwarder.join();
        }
        if !status.success() {
            bail!(
                "scripts/kube-up {} failed ({status}):\n{}",
                dir.display(),
                crate::sync::lock(&output)
            );
        }
        Self::read(dir, ours)
    }

    fn read(dir: &Path, lifetime: UnixStream) -> anyhow::Result<ControlPlane> {
        let state_path = dir.join("kubecp.json");
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("{}", state_path.display()))?;
        let state: State =
            serde_yaml::from_str(&text).with_context(|| format!("{}", state_path.display()))?;
        if !state.kubeconfig.exists() {
            bail!(
                "kube-up succeeded but {} is missing",
                state.kubeconfig.display()
            );
        }
        let read =
            |p: &Path| std::fs::read_to_string(p).with_context(|| format!("{}", p.display()));
        let authority = state
            .server
            .strip_prefix("https://")
            .with_context(|| format!("server {:?} is not https", state.server))?;
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("server {:?}", state.server))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certs(&state.ca_cert)? {
            roots.add(cert)?;
        }
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            crate::tls::load_certs(&state.admin_cert)?,
            crate::tls::load_key(&state.admin_key)?,
        )?;
        Ok(ControlPlane {
            dir: dir.to_owned(),
            addr,
            kubeconfig: state.kubeconfig,
            ca_pem: read(&state.ca_cert)?,
            client_cert_pem: read(&state.admin_cert)?,
            client_key_pem: read(&state.admin_key)?,
            server: state.server,
            client_config: Arc::new(client_config),
            _lifetime: lifetime,
        })
    }

    /// Kills `name` (`"kube-apiserver"` or `"etcd"`) with SIGKILL, like a crash, leaves it down
    /// for `down_for`, starts it again with the same command line and returns once it is ready
    /// again (blocking, bounded by `down_for` + [`RESTART_BOUND`]). Every client of this control
    /// plane sees the outage: use it on a private one ([`ControlPlane::start`]).
    pub fn restart(&self, name: &str, down_for: Duration) -> anyhow::Result<()> {
        let down_for_arg = format!("{}ms", down_for.as_millis());
        kubecp(
            &[
                "restart".as_ref(),
                self.dir.as_os_str(),
                name.as_ref(),
                "--down-for".as_ref(),
                down_for_arg.as_ref(),
            ],
            down_for + RESTART_BOUND,
        )?;
        Ok(())
    }

    /// Compacts etcd at its current revision (blocking, bounded by [`REQUEST_BOUND`] and a
    /// minute for finding kubecp) and returns that revision: a list or watch at an older
    /// `resourceVersion` that reaches etcd is answered `410 Gone` from now on. Like
    /// [`ControlPlane::restart`], for a private control plane.
    pub fn compact(&self) -> anyhow::Result<u64> {
        let out = kubecp(
            &["compact".as_ref(), self.dir.as_os_str()],
            REQUEST_BOUND + Duration::from_secs(60),
        )?;
        out.trim()
            .strip_prefix("compacted etcd at revision ")
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("kubecp compact printed {out:?}"))
    }

    /// The directory holding its state, logs (`etcd.log`, `kube-apiserver.log`) and
    /// certificates; removed when the control plane stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (client certificate, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The API server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the serving and client certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// PEM of the admin client certificate.
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }

    /// PEM of the admin client key.
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// A rustls client config that trusts the CA and presents the admin certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config.clone()
    }

    /// One HTTPS request as admin (HTTP/1.0, so the body is never chunked), bounded by
    /// [`REQUEST_BOUND`]. `body` is sent as JSON. Returns the status code and the body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        request(self.addr, self.client_config(), method, path, body).await
    }
}

/// One HTTP/1.0 request over TLS to `addr` (name `localhost`), bounded by [`REQUEST_BOUND`].
pub async fn request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake")?;
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.flush().await?;
        let mut response = Vec::new();
        match tls.read_to_end(&mut response).await {
            Ok(_) => {}
            // A peer that closes without close_notify: the response is still complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(REQUEST_BOUND, exchange)
        .await
        .with_context(|| format!("{method} {path}: no response within {REQUEST_BOUND:?}"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no end of headers in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: bad status line in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("{method} {path}: chunked response to an HTTP/1.0 request");
    }
    Ok((status, body.to_owned()))
}
