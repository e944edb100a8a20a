//! The scale benchmark of sni-proxy's Kubernetes source, against a real kube-apiserver and etcd
//! (the test fixture's, built from the Go module proxy): `--shoots` shoots' objects exactly as
//! gardenlet writes them (Namespace, Service, EndpointSlice, Istio Gateway, VirtualService,
//! DestinationRule), then
//!
//! - the proxy's memory per shoot: the RSS of a proxy that was started before any shoot
//!   existed, before and after it has every shoot's route (its reflector stores included);
//! - the initial sync: a second proxy started once every object exists, from exec to `/readyz`;
//! - the time from creating a shoot's objects to its first routed connection, for `--added`
//!   shoots added one after another while connections to an existing shoot keep flowing (p50,
//!   p99, max; and how many of those connections failed).
//!
//! Needs root (the backends live in a network namespace: the API server refuses loopback
//! addresses in EndpointSlices) and release binaries:
//!
//! ```text
//! cargo build --release -p sni-proxy -p bench && sudo target/release/kube-scale
//! ```
//!
//! It writes bench/results/kube-scale-latest.{md,json}.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::testing::kube::ControlPlane;
use agentkit::testing::{client_hello, run_command, NetNs};
use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use kube::Client;
use sni_proxy::kube::testing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The backends' network: 198.18.0.0/15 is for benchmarking networks.
const HOST_IP: &str = "198.19.250.1";
const BACKEND_IP: &str = "198.19.250.2";
/// Objects created at once.
const CONCURRENCY: usize = 16;
/// The most the proxy may take to route one added shoot before the run gives up on it.
const ROUTE_BOUND: Duration = Duration::from_secs(30);
/// The most a proxy may take to become ready.
const READY_BOUND: Duration = Duration::from_secs(300);

#[derive(Debug, Parser)]
#[command(about = "sni-proxy's Kubernetes source at scale, against a real kube-apiserver")]
struct Args {
    /// Shoots created before the measurements.
    #[arg(long, default_value_t = 1000)]
    shoots: usize,
    /// Shoots added one by one while traffic flows, for the time to the first routed connection.
    #[arg(long, default_value_t = 100)]
    added: usize,
    /// Where the report goes (`.md` and `.json`).
    #[arg(long, default_value = "bench/results/kube-scale-latest")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !agentkit::testing::has_privileges() {
        bail!("kube-scale needs root (network namespaces for the backends)");
    }
    let proxy_bin = std::env::current_exe()?.with_file_name("sni-proxy");
    if !proxy_bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p sni-proxy -p bench",
            proxy_bin.display()
        );
    }
    eprintln!("starting the control plane (scripts/kube-up; the first build takes minutes)");
    let control = ControlPlane::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, &control, &proxy_bin))
}

async fn run(args: Args, control: &ControlPlane, proxy_bin: &Path) -> anyhow::Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(control.kubeconfig())?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = Client::try_from(config)?;
    let _ns = backend_namespace()?;
    spawn_backend()?;
    let dir = std::env::temp_dir().join(format!("kube-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // A proxy that sees the shoots arrive, for the memory per shoot.
    let mut early = Proxy::start(proxy_bin, control.kubeconfig(), &dir, "early")?;
    early.wait_ready().await?;
    let rss_empty = early.rss_kib()?;
    eprintln!(
        "creating {} shoots ({} objects)",
        args.shoots,
        args.shoots * 6
    );
    let started = Instant::now();
    stream::iter(0..args.shoots)
        .map(|i| create_shoot(&client, i))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let create_time = started.elapsed();
    eprintln!("created in {create_time:.1?}");
    let want = args.shoots as f64;
    early
        .wait_metric("sni_proxy_kubernetes_routes", |v| v >= want * 2.0)
        .await?;
    // The last host resolves: every shoot is routed.
    early
        .wait_routed(&host(args.shoots - 1), ROUTE_BOUND)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_full = early.rss_kib()?;
    let per_shoot_kib = (rss_full.saturating_sub(rss_empty)) as f64 / args.shoots as f64;

    // A proxy started with everything there: the initial sync.
    let exec = Instant::now();
    let mut late = Proxy::start(proxy_bin, control.kubeconfig(), &dir, "late")?;
    late.wait_ready().await?;
    let initial_sync = exec.elapsed();
    late.wait_routed(&host(args.shoots / 2), ROUTE_BOUND)
        .await?;

    // Shoots added while connections to shoot 0 keep flowing.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = tokio::spawn({
        let (stop, ok, failed, addr) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            early.sni,
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                let counter = if routed(addr, &host(0)).await {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut from_first = Vec::with_capacity(args.added);
    let mut from_last = Vec::with_capacity(args.added);
    for i in args.shoots..args.shoots + args.added {
        let start = Instant::now();
        create_shoot(&client, i).await?;
        let created = Instant::now();
        early.wait_routed(&host(i), ROUTE_BOUND).await?;
        from_first.push(start.elapsed());
        from_last.push(created.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await?;
    let translations = early
        .metric("sni_proxy_kubernetes_translation_seconds_count")
        .await
        .unwrap_or(0.0);
    let translation_ms = early
        .metric("sni_proxy_kubernetes_translation_seconds_sum")
        .await
        .unwrap_or(0.0)
        * 1000.0
        / translations.max(1.0);
    let report = Report {
        shoots: args.shoots,
        added: args.added,
        create_seconds: create_time.as_secs_f64(),
        rss_empty_kib: rss_empty,
        rss_full_kib: rss_full,
        per_shoot_kib,
        initial_sync_seconds: initial_sync.as_secs_f64(),
        from_first: Percentiles::of(&mut from_first),
        from_last: Percentiles::of(&mut from_last),
        traffic_ok: ok.load(Ordering::Relaxed),
        traffic_failed: failed.load(Ordering::Relaxed),
        translations: translations as u64,
        translation_mean_ms: translation_ms,
        kube_apiserver: control.server().to_owned(),
    };
    report.write(&args.out)?;
    print!("{}", report.markdown());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn host(i: usize) -> String {
    format!("api.s{i}.scale.test")
}

/// The objects gardenlet writes for shoot `i`.
async fn create_shoot(client: &Client, i: usize) -> anyhow::Result<()> {
    let objects = testing::shoot(
        &format!("shoot--scale--s{i}"),
        &host(i),
        "ingressgateway",
        &[BACKEND_IP.to_owned()],
        6443,
    );
    for object in &objects {
        testing::create(client, object).await?;
    }
    Ok(())
}

/// The backends' namespace, joined to this one by a veth pair.
fn backend_namespace() -> anyhow::Result<NetNs> {
    let ns = NetNs::create("kscale");
    let (host, peer) = ("kscaleh0", "kscalep0");
    // A veth left by an interrupted run.
    let _ = Command::new("ip")
        .args(["link", "del", host])
        .stderr(Stdio::null())
        .status();
    run_command(
        "ip",
        &["link", "add", host, "type", "veth", "peer", "name", peer],
    );
    run_command("ip", &["link", "set", peer, "netns", ns.name()]);
    run_command(
        "ip",
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", host],
    );
    run_command("ip", &["link", "set", host, "up"]);
    run_command(
        "ip",
        &[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{BACKEND_IP}/24"),
            "dev",
            peer,
        ],
    );
    run_command("ip", &["-n", ns.name(), "link", "set", peer, "up"]);
    BACKEND_NS.set(ns.name().to_owned()).ok();
    Ok(ns)
}

static BACKEND_NS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Every shoot's kube-apiserver: one server in the namespace that answers any read with `k`.
fn spawn_backend() -> anyhow::Result<()> {
    let name = BACKEND_NS.get().context("no backend namespace")?.clone();
    let ns = NetNsRef(name);
    let addr: SocketAddr = format!("{BACKEND_IP}:6443").parse()?;
    let listener = ns.run(move || std::net::TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(b"k\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Enters a named network namespace on a thread of its own.
struct NetNsRef(String);

impl NetNsRef {
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd as _;
        let path = format!("/var/run/netns/{}", self.0);
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

/// Whether a ClientHello for `sni` reaches a backend through the proxy at `addr`.
async fn routed(addr: SocketAddr, sni: &str) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(&client_hello(sni, &[]).ok()?).await.ok()?;
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        (&b == b"k\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(()))
    )
}

/// An sni-proxy process following the API server.
struct Proxy {
    child: Child,
    sni: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(bin: &Path, kubeconfig: &Path, dir: &Path, name: &str) -> anyhow::Result<Proxy> {
        let (sni, admin) = (free_addr()?, free_addr()?);
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "admin: {{address: '{admin}'}}\nlisteners: [{{name: sni, address: '{sni}', mode: tls}}]\n\
                 kubernetes: {{kubeconfig: '{}', namespace: istio-ingress, istio: {{selector: {{app: istio-ingressgateway, istio: ingressgateway}}}}}}\n",
                kubeconfig.display()
            ),
        )?;
        let child = Command::new(bin)
            .args(["--config", &config.display().to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proxy { child, sni, admin })
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_BOUND;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("sni-proxy exited: {status}");
            }
            if get(self.admin, "/readyz")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("sni-proxy not ready within {READY_BOUND:?}")
    }

    /// The value of an unlabelled sample of `/metrics`.
    async fn metric(&self, name: &str) -> Option<f64> {
        get(self.admin, "/metrics").await.and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
    }

    async fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_BOUND;
        while Instant::now() < deadline {
            let value = self.metric(name).await;
            if value.is_some_and(&ok) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{name} did not reach its value within {READY_BOUND:?}")
    }

    async fn wait_routed(&self, sni: &str, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if routed(self.sni, sni).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bail!("{sni} not routed within {bound:?}")
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        String::from_utf8(out).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

#[derive(Debug, serde::Serialize)]
struct Percentiles {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(samples: &mut [Duration]) -> Percentiles {
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1000.0
        };
        Percentiles {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: samples.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    shoots: usize,
    added: usize,
    create_seconds: f64,
    rss_empty_kib: u64,
    rss_full_kib: u64,
    per_shoot_kib: f64,
    initial_sync_seconds: f64,
    from_first: Percentiles,
    from_last: Percentiles,
    traffic_ok: u64,
    traffic_failed: u64,
    translations: u64,
    translation_mean_ms: f64,
    kube_apiserver: String,
}

impl Report {
    fn markdown(&self) -> String {
        format!(
            "# sni-proxy: routes from Kubernetes at scale\n\n\
             `target/release/kube-scale --shoots {} --added {}` against a real kube-apiserver {} with etcd on loopback.\n\n\
             | measure | value | target |\n|---|---:|---:|\n\
             | objects created ({} shoots × 6, {} at once) | {:.1} s | |\n\
             | proxy RSS before the first shoot | {} KiB | |\n\
             | proxy RSS with every shoot routed | {} KiB | |\n\
             | memory per shoot route (stores included) | {:.1} KiB | ≤ 64 KiB |\n\
             | initial sync, exec to `/readyz` | {:.2} s | |\n\
             | shoot created → first routed connection, p50 / p99 / max ({} shoots added, from the first object) | {:.0} / {:.0} / {:.0} ms | p99 ≤ 500 ms |\n\
             | the same, from the last object created | {:.0} / {:.0} / {:.0} ms | |\n\
             | connections to an existing shoot meanwhile, failed / total | {} / {} | 0 |\n\
             | translations (table rebuilds) by the first proxy, and their mean time | {} × {:.1} ms | |\n",
            self.shoots, self.added, "v1.37.2", self.shoots, CONCURRENCY, self.create_seconds,
            self.rss_empty_kib, self.rss_full_kib, self.per_shoot_kib, self.initial_sync_seconds,
            self.added, self.from_first.p50_ms, self.from_first.p99_ms, self.from_first.max_ms,
            self.from_last.p50_ms, self.from_last.p99_ms, self.from_last.max_ms,
            self.traffic_failed, self.traffic_ok + self.traffic_failed,
            self.translations, self.translation_mean_ms,
        )
    }

    fn write(&self, out: &Path) -> anyhow::Result<()> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out.with_extension("md"), self.markdown())?;
        std::fs::write(
            out.with_extension("json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        Ok(())
    }
}
