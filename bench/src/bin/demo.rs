//! The demo: two fake shoot kube-apiservers behind sni-proxy, kubectl-like traffic through
//! both listeners; a shoot created as Kubernetes objects on a real kube-apiserver, routed, then
//! deleted (when the control plane's binaries are built; else a one-line hint); then
//! node-local-dns in front of a small `cluster.local` zone, with cache
//! hits, misses and a stale answer served while the zone's server is down; then konnectivity:
//! `kubectl logs -f` through the tunnel beside a stalled tunnel; then log-shipper: two shoots'
//! control-plane logs shipped to their own stores (VictoriaLogs), one shoot's read back and
//! followed with `log-shipper query`. Tables of what happened, and the commands to try by hand. Runs until Ctrl-C (or exits after the tables
//! with `--once`). Needs no root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentkit::testing::{client_hello, get_version, padding_alpn, Pki, VersionServer};
use agentkit::Shutdown;
use anyhow::Context as _;
use clap::Parser;
use rustls::pki_types::ServerName;
use sni_proxy::{Config, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs sni-proxy in front of two fake shoot kube-apiservers, and node-local-dns in front of
/// a small cluster.local zone.
#[derive(Debug, Parser)]
struct Args {
    /// Print the table and exit instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
}

const S1_DESTINATION: &str = "outbound|443||kube-apiserver.shoot--dev--s1.svc.cluster.local";

/// The example's port if it is free, else any free port.
fn port_or_any(preferred: u16) -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The Kubernetes part's control plane starts now, beside the rest (a few seconds).
    let control = kube_part::start_in_background();
    let dir = std::env::temp_dir().join(format!("gardener-agents-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::new()?;
    let ca = pki.write_ca(&dir)?;
    let names = ["api.s1.test", "*.s1.test", "api.s2.test"];
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let s1 = VersionServer::start(any, "shoot--dev--s1", pki.server_config(&names)?).await?;
    let s2a = VersionServer::start(any, "shoot--dev--s2", pki.server_config(&names)?).await?;
    let s2b = VersionServer::start(any, "shoot--dev--s2", pki.server_config(&names)?).await?;

    let (sni_port, connect_port, admin_port) =
        (port_or_any(9443), port_or_any(8443), port_or_any(15090));
    let config_path = dir.join("sni-proxy.yaml");
    std::fs::write(
        &config_path,
        format!(
            "admin:\n  address: 127.0.0.1:{admin_port}\nlisteners:\n\
             - {{name: apiserver-sni, address: '127.0.0.1:{sni_port}', mode: tls, proxy_protocol: optional, trusted_proxies: [127.0.0.0/8]}}\n\
             - {{name: http-proxy, address: '127.0.0.1:{connect_port}', mode: http-connect}}\n\
             routes:\n\
             - {{name: shoot--dev--s1, hosts: [api.s1.test, '*.s1.test'], destination: '{S1_DESTINATION}', backends: ['{}']}}\n\
             - {{name: shoot--dev--s2, hosts: [api.s2.test], proxy_destinations: ['240.0.0.2:443'], backends: ['{}', '{}']}}\n\
             unknown_sni: reject\naccess_log: true\nreload_interval: 1s\n",
            s1.addr, s2a.addr, s2b.addr
        ),
    )?;
    let config = Config::load(&config_path)?;
    let proxy = Proxy::bind(config, prometheus::Registry::new()).await?;
    let addrs = proxy.listener_addrs();
    let (sni_addr, connect_addr) = (addrs[0], addrs[1]);
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    let running = tokio::spawn(proxy.run(shutdown.clone(), Some(config_path.clone())));

    println!("sni-proxy demo: two shoot kube-apiservers behind one proxy\n");
    println!("  shoot--dev--s1  api.s1.test, *.s1.test   -> {}", s1.addr);
    println!(
        "  shoot--dev--s2  api.s2.test              -> {}, {}",
        s2a.addr, s2b.addr
    );
    println!(
        "  listeners: tls {sni_addr}, http-connect {connect_addr}, admin 127.0.0.1:{admin_port}\n"
    );

    let client = pki.client_config(&[])?;
    let mut rows: Vec<(String, String, usize, usize, Duration)> = Vec::new();
    let mut run = |what: &str, via: &str, ok: usize, total: usize, took: Duration| {
        rows.push((what.to_owned(), via.to_owned(), ok, total, took));
    };
    for sni in ["api.s1.test", "watch.s1.test", "api.s2.test"] {
        let t = Instant::now();
        let mut ok = 0;
        for _ in 0..50 {
            if get_version(sni_addr, sni, client.clone())
                .await
                .is_ok_and(|b| b.contains("shoot--dev--s"))
            {
                ok += 1;
            }
        }
        run(
            &format!("GET /version, SNI {sni}"),
            "tls",
            ok,
            50,
            t.elapsed(),
        );
    }
    let t = Instant::now();
    let pq = pki.client_config(&padding_alpn(1300))?;
    let pq_ok = get_version(sni_addr, "api.s1.test", pq).await.is_ok() as usize;
    let size = client_hello("api.s1.test", &padding_alpn(1300))?.len();
    run(
        &format!("{size}-byte ClientHello (post-quantum size)"),
        "tls",
        pq_ok,
        1,
        t.elapsed(),
    );
    let t = Instant::now();
    let mut ok = 0;
    for _ in 0..50 {
        if connect_version(connect_addr, S1_DESTINATION, &pki)
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    run(
        "CONNECT + X-Gardener-Destination (s1)",
        "http-connect",
        ok,
        50,
        t.elapsed(),
    );
    let t = Instant::now();
    let alert = unknown_sni(sni_addr).await.unwrap_or_default();
    run(
        &format!("unknown SNI -> {alert}"),
        "tls",
        usize::from(alert == "alert unrecognized_name"),
        1,
        t.elapsed(),
    );

    println!(
        "{:<44} {:<13} {:>9} {:>10}",
        "traffic", "listener", "ok/total", "time"
    );
    println!("{}", "-".repeat(80));
    for (what, via, ok, total, took) in &rows {
        println!(
            "{what:<44} {via:<13} {:>9} {:>8.0}ms",
            format!("{ok}/{total}"),
            took.as_secs_f64() * 1e3
        );
    }
    let metrics = fetch(format!("127.0.0.1:{admin_port}").parse()?, "/metrics").await?;
    println!("\nfrom /metrics:");
    for line in metrics.lines().filter(|l| {
        l.starts_with("sni_proxy_connections_total")
            || l.starts_with("sni_proxy_handshake_failures_total")
    }) {
        println!("  {line}");
    }
    let all_ok = rows.iter().all(|(_, _, ok, total, _)| ok == total);

    let control = tokio::task::spawn_blocking(move || control.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the control plane thread panicked"))?;
    let kube_ok = match &control {
        Ok(control) => match kube_part::run(control, &pki).await {
            Ok(ok) => ok,
            Err(e) => {
                println!(
                    "
Kubernetes part skipped: {e:#}"
                );
                true
            }
        },
        Err(e) => {
            println!(
                "
Kubernetes part skipped: {e:#}"
            );
            true
        }
    };

    let mut dns = dns::Demo::start(&dir, &shutdown).await?;
    let dns_ok = dns.script().await?;
    let tunnel = tunnel::run(&dir, &pki).await?;
    let logs = logs::run(&dir).await?;

    println!("\nTry it by hand:");
    println!(
        "  curl --cacert {} --resolve api.s1.test:{}:127.0.0.1 https://api.s1.test:{}/version",
        ca.display(),
        sni_addr.port(),
        sni_addr.port()
    );
    println!(
        "  curl --cacert {} --proxy http://{connect_addr} --proxy-header 'X-Gardener-Destination: {S1_DESTINATION}' https://api.s1.test/version",
        ca.display()
    );
    println!("  curl http://127.0.0.1:{admin_port}/metrics");
    println!(
        "  edit {} (routes reload on save, or kill -HUP {})",
        config_path.display(),
        std::process::id()
    );
    dns.print_commands();

    if args.once {
        shutdown.stop_accepting();
    } else {
        println!("\nserving until Ctrl-C");
    }
    running.await?;
    dns.finish().await?;
    let logs_ok = logs.ok;
    logs.finish().await?;
    std::fs::remove_dir_all(&dir).ok();
    drop((s1, s2a, s2b));
    anyhow::ensure!(all_ok, "some demo traffic failed");
    anyhow::ensure!(
        kube_ok,
        "the shoot created in Kubernetes was not routed and removed as shown"
    );
    anyhow::ensure!(dns_ok, "some DNS answers were not what the demo expected");
    anyhow::ensure!(
        tunnel.ok,
        "the log stream through the tunnel was slowed by the stalled tunnel"
    );
    anyhow::ensure!(logs_ok, "not every log line was acknowledged by its store");
    Ok(())
}

async fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// What a kubelet's apiserver-proxy does since GEP-30: CONNECT, then TLS through the tunnel.
async fn connect_version(
    proxy: SocketAddr,
    destination: &str,
    pki: &Pki,
) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(format!("CONNECT api.s1.test:443 HTTP/1.1\r\nHost: api.s1.test:443\r\nX-Gardener-Destination: {destination}\r\n\r\n").as_bytes())
        .await?;
    let mut status = [0u8; 39];
    s.read_exact(&mut status).await?;
    anyhow::ensure!(status.starts_with(b"HTTP/1.1 200"), "CONNECT refused");
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(&[])?);
    let mut tls = connector
        .connect(ServerName::try_from("api.s1.test")?, s)
        .await
        .context("TLS")?;
    tls.write_all(b"GET /version HTTP/1.1\r\nhost: api.s1.test\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    anyhow::ensure!(text.contains("shoot--dev--s1"), "wrong shoot: {text}");
    Ok(text)
}

async fn unknown_sni(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&client_hello("unknown.example", &[])?).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(match out.as_slice() {
        [0x15, _, _, 0, 2, 2, 112] => "alert unrecognized_name".into(),
        [] => "closed".into(),
        other => format!("{other:?}"),
    })
}

#[path = "../demo_logs.rs"]
mod logs;
#[path = "../demo_tunnel.rs"]
mod tunnel;

mod dns {
    //! The node-local-dns half of the demo: a small authoritative `cluster.local` zone on
    //! 127.0.0.1 (the stand-in for the cluster's CoreDNS, which can be stopped and started),
    //! node-local-dns run in-process in front of it with node-cache's flags, and a scripted
    //! sequence of queries whose table shows, for each answer, where it came from: derived
    //! from the zone server's query counter and the TTL, not assumed.

    use std::io;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use agentkit::Shutdown;
    use anyhow::Context as _;
    use node_local_dns::metrics::rcode_name;
    use node_local_dns::wire::testing::ResponseBuilder;
    use node_local_dns::wire::{self, rcode, rtype};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UdpSocket};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// The zone served.
    const ZONE: &str = "cluster.local.";
    /// TTL of every record and of the SOA (so also of negative answers), in seconds. Short,
    /// so that entries expire and staleness shows within the demo.
    const ZONE_TTL: u32 = 5;
    /// The TTL node-local-dns gives stale answers, in seconds (RFC 8767's recommendation).
    const STALE_TTL: u32 = node_local_dns::cache::DEFAULT_STALE_TTL;
    /// Deadline of one demo query (and of one read on the zone server's TCP connections).
    const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
    /// How long the agent gets to answer its first query after start.
    const START_TIMEOUT: Duration = Duration::from_secs(10);
    /// Between a miss and the hit after it, so that the TTL visibly counts down.
    const HIT_DELAY: Duration = Duration::from_millis(1500);
    /// Waited after stopping the zone server: one second past [`ZONE_TTL`].
    const EXPIRY_WAIT: Duration = Duration::from_secs(ZONE_TTL as u64 + 1);
    /// Waited after the stale answer before the zone server comes back.
    const REFRESH_SETTLE: Duration = Duration::from_millis(500);
    /// How long stopping the zone server waits for its tasks to end.
    const STOP_TIMEOUT: Duration = Duration::from_secs(2);
    /// Pause after a failed accept, so that a persistent error does not spin.
    const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
    /// EDNS UDP size the zone server advertises.
    const ZONE_UDP_SIZE: u16 = 1232;
    /// Bounded pointer hops when reading a compressed name.
    const MAX_POINTER_HOPS: usize = 32;

    /// RDATA of the zone's records.
    enum Data {
        A([u8; 4]),
        Srv {
            priority: u16,
            weight: u16,
            port: u16,
            target: &'static str,
        },
    }

    /// What the zone holds (names lowercase, absolute).
    const RECORDS: &[(&str, Data)] = &[
        (
            "kubernetes.default.svc.cluster.local.",
            Data::A([10, 96, 0, 1]),
        ),
        (
            "kube-dns.kube-system.svc.cluster.local.",
            Data::A([10, 96, 0, 10]),
        ),
        (
            "metrics-server.kube-system.svc.cluster.local.",
            Data::A([10, 96, 0, 20]),
        ),
        (
            "_https._tcp.kubernetes.default.svc.cluster.local.",
            Data::Srv {
                priority: 0,
                weight: 100,
                port: 443,
                target: "kubernetes.default.svc.cluster.local.",
            },
        ),
        (
            "_dns._udp.kube-dns.kube-system.svc.cluster.local.",
            Data::Srv {
                priority: 0,
                weight: 100,
                port: 53,
                target: "kube-dns.kube-system.svc.cluster.local.",
            },
        ),
        (
            "_dns-tcp._tcp.kube-dns.kube-system.svc.cluster.local.",
            Data::Srv {
                priority: 0,
                weight: 100,
                port: 53,
                target: "kube-dns.kube-system.svc.cluster.local.",
            },
        ),
    ];

    /// The zone server's answer to `packet`, and whether the question was in the zone (the
    /// forwarder's health probes, `. IN NS`, are not: they get REFUSED).
    fn answer(packet: &[u8]) -> Option<(Vec<u8>, bool)> {
        let query = wire::parse_query(packet).ok()?;
        let asked = query.qname_text();
        let name = asked.to_ascii_lowercase();
        let mut b = ResponseBuilder::new(packet).compress(true);
        if query.edns.is_some() {
            b = b.opt(ZONE_UDP_SIZE);
        }
        if name != ZONE && !name.ends_with(".cluster.local.") {
            return Some((b.rcode(rcode::REFUSED).build(), false));
        }
        let soa = ResponseBuilder::soa_rdata(
            "ns.dns.cluster.local.",
            "hostmaster.cluster.local.",
            ZONE_TTL,
        );
        let below = format!(".{name}");
        let mut exists = name == ZONE;
        let mut answered = false;
        if name == ZONE && matches!(query.qtype, rtype::SOA | rtype::ANY) {
            b = b.answer(&asked, rtype::SOA, ZONE_TTL, &soa);
            answered = true;
        }
        for (owner, data) in RECORDS {
            if owner.ends_with(&below) {
                exists = true; // an empty non-terminal: NODATA, not NXDOMAIN
            }
            if *owner != name {
                continue;
            }
            exists = true;
            let any = query.qtype == rtype::ANY;
            match data {
                Data::A(ip) if any || query.qtype == rtype::A => {
                    b = b.answer(&asked, rtype::A, ZONE_TTL, ip);
                    answered = true;
                }
                Data::Srv {
                    priority,
                    weight,
                    port,
                    target,
                } if any || query.qtype == rtype::SRV => {
                    let mut rdata = Vec::new();
                    for field in [priority, weight, port] {
                        rdata.extend_from_slice(&field.to_be_bytes());
                    }
                    wire::encode_name(target, &mut rdata);
                    b = b.answer(&asked, rtype::SRV, ZONE_TTL, &rdata);
                    answered = true;
                }
                _ => {}
            }
        }
        if !answered {
            b = b.authority(ZONE, rtype::SOA, ZONE_TTL, &soa);
            if !exists {
                b = b.rcode(rcode::NXDOMAIN);
            }
        }
        Some((b.build(), true))
    }

    /// Queries the zone server received.
    #[derive(Debug, Default)]
    struct Counters {
        /// Questions in `cluster.local`.
        zone: AtomicUsize,
        /// Anything else (the forwarder's health probes).
        other: AtomicUsize,
    }

    impl Counters {
        fn count(&self, in_zone: bool) {
            let c = if in_zone { &self.zone } else { &self.other };
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The authoritative `cluster.local` server (UDP and TCP on one port).
    #[derive(Debug)]
    struct Authority {
        addr: SocketAddr,
        counters: Arc<Counters>,
        running: Option<(CancellationToken, TaskTracker)>,
    }

    impl Authority {
        async fn start(addr: SocketAddr) -> io::Result<Authority> {
            let mut authority = Authority {
                addr,
                counters: Arc::default(),
                running: None,
            };
            authority.listen().await?;
            Ok(authority)
        }

        /// Binds `self.addr` (the port chosen the first time is kept) and serves.
        async fn listen(&mut self) -> io::Result<()> {
            let udp = UdpSocket::bind(self.addr).await?;
            self.addr = udp.local_addr()?;
            let tcp = TcpListener::bind(self.addr).await?;
            let token = CancellationToken::new();
            let tracker = TaskTracker::new();
            tracker.spawn(serve_udp(udp, token.clone(), Arc::clone(&self.counters)));
            tracker.spawn(serve_tcp(
                tcp,
                token.clone(),
                tracker.clone(),
                Arc::clone(&self.counters),
            ));
            self.running = Some((token, tracker));
            Ok(())
        }

        /// Closes the sockets, open TCP connections included, as a crashed server would.
        async fn stop(&mut self) {
            if let Some((token, tracker)) = self.running.take() {
                token.cancel();
                tracker.close();
                let _ = tokio::time::timeout(STOP_TIMEOUT, tracker.wait()).await;
            }
        }

        async fn restart(&mut self) -> io::Result<()> {
            self.stop().await;
            self.listen().await
        }

        /// Questions in the zone received so far.
        fn queries(&self) -> usize {
            self.counters.zone.load(Ordering::SeqCst)
        }

        /// Other questions (health probes) received so far.
        fn probes(&self) -> usize {
            self.counters.other.load(Ordering::SeqCst)
        }
    }

    impl Drop for Authority {
        fn drop(&mut self) {
            if let Some((token, _)) = self.running.take() {
                token.cancel();
            }
        }
    }

    async fn serve_udp(udp: UdpSocket, token: CancellationToken, counters: Arc<Counters>) {
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        loop {
            let (n, peer) = tokio::select! {
                () = token.cancelled() => return,
                r = udp.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(_) => continue,
                },
            };
            if let Some((reply, in_zone)) = buf.get(..n).and_then(answer) {
                counters.count(in_zone);
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    }

    async fn serve_tcp(
        tcp: TcpListener,
        token: CancellationToken,
        tracker: TaskTracker,
        counters: Arc<Counters>,
    ) {
        loop {
            let stream = tokio::select! {
                () = token.cancelled() => return,
                r = tcp.accept() => match r {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(ACCEPT_BACKOFF).await; // out of descriptors, say
                        continue;
                    }
                },
            };
            let token = token.clone();
            let counters = Arc::clone(&counters);
            tracker.spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = serve_connection(stream, &counters) => {}
                }
            });
        }
    }

    /// Answers length-prefixed queries until the peer closes (idle connections stay open
    /// until the peer's pool closes them or the server stops).
    async fn serve_connection(mut stream: TcpStream, counters: &Counters) {
        while let Ok(len) = stream.read_u16().await {
            let mut packet = vec![0u8; usize::from(len)];
            match tokio::time::timeout(QUERY_TIMEOUT, stream.read_exact(&mut packet)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some((reply, in_zone)) = answer(&packet) else {
                return;
            };
            counters.count(in_zone);
            let Ok(len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// A port free on 127.0.0.1 for both UDP and TCP: `preferred` if it is, else any.
    fn dns_port(preferred: u16) -> anyhow::Result<u16> {
        let both = |port: u16| -> io::Result<u16> {
            let udp = std::net::UdpSocket::bind(("127.0.0.1", port))?;
            let port = udp.local_addr()?.port();
            std::net::TcpListener::bind(("127.0.0.1", port))?;
            Ok(port)
        };
        if let Ok(port) = both(preferred) {
            return Ok(port);
        }
        for _ in 0..20 {
            if let Ok(port) = both(0) {
                return Ok(port);
            }
        }
        anyhow::bail!("no port free for both UDP and TCP on 127.0.0.1")
    }

    static NEXT_ID: AtomicU16 = AtomicU16::new(0x4a00);

    /// One query to `server`, over TCP or UDP, bounded by [`QUERY_TIMEOUT`].
    async fn ask(server: SocketAddr, query: &[u8], tcp: bool) -> anyhow::Result<Vec<u8>> {
        let exchange = async {
            if tcp {
                let mut s = TcpStream::connect(server).await?;
                let len = u16::try_from(query.len())?;
                let mut framed = len.to_be_bytes().to_vec();
                framed.extend_from_slice(query);
                s.write_all(&framed).await?;
                let len = s.read_u16().await?;
                let mut reply = vec![0u8; usize::from(len)];
                s.read_exact(&mut reply).await?;
                return Ok(reply);
            }
            let s = UdpSocket::bind("127.0.0.1:0").await?;
            s.send_to(query, server).await?;
            let mut buf = vec![0u8; wire::MAX_MESSAGE];
            loop {
                let n = s.recv(&mut buf).await?;
                if buf.get(..2) == query.get(..2) {
                    buf.truncate(n);
                    return Ok(buf);
                }
            }
        };
        tokio::time::timeout(QUERY_TIMEOUT, exchange)
            .await
            .context("no answer")?
    }

    /// A name at `pos` in `msg` (compression followed) and the position after it.
    fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
        let mut name = String::new();
        let mut end = None;
        for _ in 0..MAX_POINTER_HOPS {
            let len = *msg.get(pos)?;
            if len & 0xC0 == 0xC0 {
                let target = usize::from(u16::from_be_bytes([len & 0x3F, *msg.get(pos + 1)?]));
                end.get_or_insert(pos + 2);
                pos = target;
                continue;
            }
            if len == 0 {
                if name.is_empty() {
                    name.push('.');
                }
                return Some((name, end.unwrap_or(pos + 1)));
            }
            let label = msg.get(pos + 1..pos + 1 + usize::from(len))?;
            name.push_str(&String::from_utf8_lossy(label));
            name.push('.');
            pos += 1 + usize::from(len);
        }
        None
    }

    fn be16(msg: &[u8], pos: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
    }

    /// What a reply says, for the table.
    struct Reply {
        rcode: u8,
        /// The answer records' data, or what the authority section holds.
        answer: String,
        /// The first record's TTL (the SOA's for a negative answer).
        ttl: Option<u32>,
        /// The question came back byte for byte as sent (case included).
        echoed: bool,
    }

    fn read_reply(query: &[u8], reply: &[u8]) -> Option<Reply> {
        let question = wire::parse_query(query).ok()?.question;
        let echoed = reply.get(12..12 + question.len()) == Some(question);
        let (ancount, nscount) = (be16(reply, 6)?, be16(reply, 8)?);
        let (_, mut pos) = read_name(reply, 12)?;
        pos += 4;
        let mut answers = Vec::new();
        let mut ttl = None;
        for i in 0..(ancount + nscount) {
            let (_, after) = read_name(reply, pos)?;
            let rtype = be16(reply, after)?;
            let rr_ttl = u32::from_be_bytes(reply.get(after + 4..after + 8)?.try_into().ok()?);
            let rdlen = usize::from(be16(reply, after + 8)?);
            let rdata = after + 10;
            ttl.get_or_insert(rr_ttl);
            let text = match rtype {
                rtype::A => {
                    let ip: [u8; 4] = reply.get(rdata..rdata + 4)?.try_into().ok()?;
                    std::net::Ipv4Addr::from(ip).to_string()
                }
                rtype::SRV => format!(
                    "SRV {} {} {} {}",
                    be16(reply, rdata)?,
                    be16(reply, rdata + 2)?,
                    be16(reply, rdata + 4)?,
                    read_name(reply, rdata + 6)?.0
                ),
                rtype::SOA => format!("SOA {}", read_name(reply, rdata)?.0),
                other => format!("type {other}"),
            };
            if i < ancount || answers.is_empty() {
                answers.push(if i < ancount {
                    text
                } else {
                    format!("(authority) {text}")
                });
            }
            pos = rdata + rdlen;
        }
        Some(Reply {
            rcode: *reply.get(3)? & 0x0F,
            answer: answers.join(", "),
            ttl,
            echoed,
        })
    }

    /// Where an answer came from, judged from what was observed: the zone server saw the
    /// question (upstream); it did not and the TTL is above anything the zone hands out
    /// (stale); it did not and the TTL is within the zone's (cache).
    fn served_from(upstream_delta: usize, ttl: Option<u32>) -> &'static str {
        match (upstream_delta, ttl) {
            (1.., _) => "upstream",
            (0, Some(ttl)) if ttl > ZONE_TTL => "stale",
            (0, _) => "cache",
        }
    }

    /// node-local-dns in front of the zone, and the scripted queries.
    #[derive(Debug)]
    pub struct Demo {
        authority: Authority,
        agent: JoinHandle<anyhow::Result<()>>,
        dns: SocketAddr,
        metrics: SocketAddr,
        health: SocketAddr,
        corefile: PathBuf,
        ok: bool,
    }

    impl Demo {
        /// Starts the zone server and node-local-dns (in-process, node-cache's flags, no
        /// interface or iptables), and waits until the agent answers.
        pub async fn start(dir: &Path, shutdown: &Shutdown) -> anyhow::Result<Demo> {
            let authority = Authority::start("127.0.0.1:0".parse()?).await?;
            let dns_port = dns_port(5300)?;
            let metrics_port = super::port_or_any(9253);
            let health_port = super::port_or_any(18080);
            let setup_metrics_port = super::port_or_any(9353);
            let corefile = dir.join("Corefile");
            std::fs::write(
                &corefile,
                format!(
                    "cluster.local:{dns_port} {{\n    errors\n    cache {{\n        success 9984 {ZONE_TTL}\n        denial 9984 {ZONE_TTL}\n        serve_stale 1h immediate\n    }}\n    bind 127.0.0.1\n    forward . {} {{\n        force_tcp\n    }}\n    prometheus 127.0.0.1:{metrics_port}\n    health 127.0.0.1:{health_port}\n}}\n",
                    authority.addr
                ),
            )?;
            let conf = corefile.display().to_string();
            let base = dir.join("Corefile.base").display().to_string();
            let health = health_port.to_string();
            let setup_metrics = format!("127.0.0.1:{setup_metrics_port}");
            let flags = node_local_dns::flags::parse([
                "-localip",
                "127.0.0.1",
                "-conf",
                &conf,
                "-basecorefile",
                &base,
                "-setupinterface=false",
                "-setupiptables=false",
                "-health-port",
                &health,
                "-metrics-listen-address",
                &setup_metrics,
            ])?;
            let agent = tokio::spawn(node_local_dns::app::run(flags, shutdown.clone()));
            let dns = SocketAddr::from(([127, 0, 0, 1], dns_port));
            let deadline = Instant::now() + START_TIMEOUT;
            let mut probe = Vec::new();
            loop {
                if agent.is_finished() {
                    let end = agent.await;
                    anyhow::bail!("node-local-dns exited at start: {end:?}");
                }
                wire::build_query(0, "id.server.", rtype::TXT, None, &mut probe);
                let at = probe.len() - 2;
                probe[at..].copy_from_slice(&3u16.to_be_bytes()); // class CH
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                probe[..2].copy_from_slice(&id.to_be_bytes());
                if ask(dns, &probe, false).await.is_ok() {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "node-local-dns not answering after {START_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Demo {
                authority,
                agent,
                dns,
                metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                health: SocketAddr::from(([127, 0, 0, 1], health_port)),
                corefile,
                ok: true,
            })
        }

        /// Runs the scripted sequence, printing a row per query as it happens, then the
        /// agent's cache metrics. Returns whether every row went as expected.
        pub async fn script(&mut self) -> anyhow::Result<bool> {
            println!("\nnode-local-dns demo: a node-local cache in front of cluster.local\n");
            println!(
                "  zone server (the cluster's DNS)  {}  TTL {ZONE_TTL} s, UDP and TCP",
                self.authority.addr
            );
            println!(
                "  node-local-dns                   {}  cache success/denial {ZONE_TTL} s, serve_stale 1h immediate, forward force_tcp",
                self.dns
            );
            println!(
                "  metrics http://{}/metrics, health http://{}/health\n",
                self.metrics, self.health
            );
            println!(
                "{:<3} {:<56} {:<4} {:<9} {:>4}  {:<9} {:>8} {:>8}  answer",
                "#", "query", "via", "rcode", "ttl", "from", "upstream", "latency"
            );
            println!("{}", "-".repeat(130));
            let kubernetes = "kubernetes.default.svc.cluster.local";
            self.row(1, rtype::A, kubernetes, false, "upstream").await;
            tokio::time::sleep(HIT_DELAY).await;
            self.row(2, rtype::A, kubernetes, false, "cache").await;
            self.row(
                3,
                rtype::A,
                "KuBeRnEtEs.Default.SVC.cluster.local",
                false,
                "cache",
            )
            .await;
            self.row(
                4,
                rtype::SRV,
                "_https._tcp.kubernetes.default.svc.cluster.local",
                false,
                "upstream",
            )
            .await;
            self.row(
                5,
                rtype::A,
                "kube-dns.kube-system.svc.cluster.local",
                true,
                "upstream",
            )
            .await;
            self.row(
                6,
                rtype::A,
                "nosuch.default.svc.cluster.local",
                false,
                "upstream",
            )
            .await;
            self.row(
                7,
                rtype::A,
                "nosuch.default.svc.cluster.local",
                false,
                "cache",
            )
            .await;
            self.authority.stop().await;
            println!(
                "    -- zone server stopped; waiting {} s, past the {ZONE_TTL} s TTL --",
                EXPIRY_WAIT.as_secs()
            );
            tokio::time::sleep(EXPIRY_WAIT).await;
            self.row(8, rtype::A, kubernetes, false, "stale").await;
            // Let the background refresh the stale answer started fail first, so that the
            // next row counts only its own question.
            tokio::time::sleep(REFRESH_SETTLE).await;
            self.authority.restart().await?;
            println!(
                "    -- zone server started again on {} --",
                self.authority.addr
            );
            self.row(
                9,
                rtype::SRV,
                "_dns._udp.kube-dns.kube-system.svc.cluster.local",
                false,
                "upstream",
            )
            .await;
            println!(
                "\n  from: upstream = the zone server saw the question; stale = it did not and the TTL is above its {ZONE_TTL} s; cache = neither."
            );
            let probes = self.authority.probes();
            if probes > 0 {
                println!("  The zone server also answered {probes} health probe(s) (`. NS`, REFUSED) from the forwarder.");
            }

            let metrics = super::fetch(self.metrics, "/metrics").await?;
            println!("\nfrom node-local-dns /metrics (non-zero):");
            for line in metrics.lines().filter(|l| {
                [
                    "coredns_cache_hits_total",
                    "coredns_cache_misses_total",
                    "coredns_cache_served_stale_total",
                    "coredns_dns_requests_total",
                ]
                .iter()
                .any(|m| l.starts_with(m))
                    && !l.ends_with(" 0")
            }) {
                println!("  {line}");
            }
            Ok(self.ok)
        }

        /// One query through node-local-dns and its table row; `expected` is where the
        /// answer should come from (a mismatch is marked and fails the demo).
        async fn row(&mut self, step: usize, qtype: u16, name: &str, tcp: bool, expected: &str) {
            let mut query = Vec::new();
            wire::build_query(
                NEXT_ID.fetch_add(1, Ordering::Relaxed),
                name,
                qtype,
                None,
                &mut query,
            );
            let before = self.authority.queries();
            let t = Instant::now();
            let result = ask(self.dns, &query, tcp).await;
            let latency = t.elapsed();
            let delta = self.authority.queries() - before;
            let type_name = match qtype {
                rtype::A => "A",
                rtype::SRV => "SRV",
                _ => "?",
            };
            let via = if tcp { "tcp" } else { "udp" };
            let what = format!("{type_name} {name}");
            let Some(reply) = result.ok().and_then(|r| read_reply(&query, &r)) else {
                self.ok = false;
                println!("{step:<3} {what:<56} {via:<4} no answer  (expected {expected})");
                return;
            };
            let from = served_from(delta, reply.ttl);
            let mut notes = String::new();
            if from != expected {
                self.ok = false;
                notes.push_str(&format!("  << expected {expected}"));
            }
            if !reply.echoed {
                self.ok = false;
                notes.push_str("  << question not echoed as sent");
            } else if name.chars().any(|c| c.is_ascii_uppercase()) {
                notes.push_str("  (question echoed as sent)");
            }
            if from == "stale" && reply.ttl != Some(STALE_TTL) {
                self.ok = false;
                notes.push_str(&format!("  << stale TTL should be {STALE_TTL}"));
            }
            println!(
                "{step:<3} {what:<56} {via:<4} {:<9} {:>4}  {from:<9} {:>8} {:>6.1}ms  {}{notes}",
                rcode_name(reply.rcode),
                reply.ttl.map_or("-".to_owned(), |t| t.to_string()),
                format!("{} (+{delta})", before + delta),
                latency.as_secs_f64() * 1e3,
                reply.answer,
            );
        }

        /// The commands to try by hand.
        pub fn print_commands(&self) {
            let (ip, port) = (self.dns.ip(), self.dns.port());
            println!("  dig @{ip} -p {port} kubernetes.default.svc.cluster.local   # past its TTL: stale (TTL 30) while a refresh runs");
            println!(
                "  dig @{ip} -p {port} +tcp SRV _https._tcp.kubernetes.default.svc.cluster.local"
            );
            println!("  dig @{ip} -p {port} nosuch.default.svc.cluster.local   # NXDOMAIN, then a denial hit");
            println!(
                "  curl -s http://{}/metrics | grep coredns_cache",
                self.metrics
            );
            println!(
                "  edit {} (node-local-dns reloads it on kill -HUP {})",
                self.corefile.display(),
                std::process::id()
            );
        }

        /// Waits for node-local-dns to stop (after the shutdown fired) and stops the zone.
        pub async fn finish(mut self) -> anyhow::Result<()> {
            let result = (&mut self.agent).await;
            self.authority.stop().await;
            result.context("node-local-dns task")?
        }
    }
}

mod kube_part {
    //! The Kubernetes half of sni-proxy's demo: a real kube-apiserver and etcd (the test
    //! fixture's, started in the background while the rest of the demo runs, and only when
    //! their binaries are already built), a shoot created as the objects gardenlet writes,
    //! shown routed by a proxy that follows the API server, then deleted and shown gone.

    use std::net::{IpAddr, SocketAddr};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use agentkit::testing::kube::ControlPlane;
    use agentkit::testing::{get_version, Pki, VersionServer};
    use agentkit::Shutdown;
    use anyhow::Context as _;
    use sni_proxy::kube::testing;
    use sni_proxy::{Config, Proxy};

    /// How long a routing change may take before the demo says it did not happen.
    const CHANGE_BOUND: Duration = Duration::from_secs(15);
    const HOST: &str = "api.k1.test";
    const NAMESPACE: &str = "shoot--demo--k1";

    /// The hint printed when the control plane's binaries are not built.
    pub const BUILD_HINT: &str = "run `scripts/kube-up /tmp/kube && scripts/kube-down /tmp/kube` once (it builds kube-apiserver and etcd from the Go module proxy: about 6 minutes from nothing), then the demo again";

    /// Starts the control plane on a thread if its binaries are built; the thread's result
    /// says why not otherwise.
    pub fn start_in_background() -> std::thread::JoinHandle<anyhow::Result<ControlPlane>> {
        std::thread::spawn(|| {
            let kube_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-bin");
            let built = std::process::Command::new(&kube_bin)
                .arg("--built")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            anyhow::ensure!(built, "the control plane is not built yet: {BUILD_HINT}");
            ControlPlane::start()
        })
    }

    /// An address of this machine that is not loopback (the API server refuses loopback
    /// addresses in EndpointSlices): the source address of the default route. Sends nothing.
    fn local_address() -> anyhow::Result<IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect("192.0.2.1:9")?;
        let ip = socket.local_addr()?.ip();
        anyhow::ensure!(
            !ip.is_loopback() && !ip.is_unspecified(),
            "no address other than loopback"
        );
        Ok(ip)
    }

    /// Runs the part; returns whether everything happened as shown.
    pub async fn run(control: &ControlPlane, pki: &Pki) -> anyhow::Result<bool> {
        let ip = local_address().context("a non-loopback address for the shoot's endpoint")?;
        let apiserver = VersionServer::start(
            SocketAddr::new(ip, 0),
            NAMESPACE,
            pki.server_config(&[HOST])?,
        )
        .await?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(control.kubeconfig())?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = kube::Client::try_from(config)?;
        let proxy_config = Config::from_yaml(&format!(
            "admin: {{address: '127.0.0.1:0'}}\nlisteners: [{{name: apiserver-sni, address: '127.0.0.1:0', mode: tls}}]\n\
             kubernetes: {{kubeconfig: '{}', namespace: istio-ingress, istio: {{selector: {{app: istio-ingressgateway, istio: ingressgateway}}}}}}\n",
            control.kubeconfig().display()
        ))?;
        let proxy = Proxy::bind(proxy_config, prometheus::Registry::new()).await?;
        let sni = proxy.listener_addrs()[0];
        let admin = proxy.admin_addr()?;
        // A shutdown of its own: the proxy's drain at the end waits for and then forces what is
        // on its tracker, which for a child would be every task of the demo (node-local-dns
        // next among them).
        let stop = Shutdown::new();
        let running = tokio::spawn(proxy.run(stop.clone(), None));
        // Ready once the proxy has listed everything from the API server.
        let synced = Instant::now();
        while !super::fetch(admin, "/readyz")
            .await
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            anyhow::ensure!(
                synced.elapsed() < CHANGE_BOUND,
                "the proxy did not sync within {CHANGE_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tls = pki.client_config(&[])?;
        let routed = || {
            let tls = tls.clone();
            async move {
                get_version(sni, HOST, tls)
                    .await
                    .is_ok_and(|b| b.contains(NAMESPACE))
            }
        };

        println!(
            "\nsni-proxy following a real kube-apiserver ({}): synced {:.0} ms after it started",
            control.server(),
            synced.elapsed().as_secs_f64() * 1e3
        );
        println!(
            "  shoot {NAMESPACE}: kube-apiserver pod at {} (a Service and its EndpointSlice)",
            apiserver.addr
        );
        let before = routed().await;
        let created = Instant::now();
        let objects = testing::shoot(
            NAMESPACE,
            HOST,
            "ingressgateway",
            &[ip.to_string()],
            apiserver.addr.port(),
        );
        for object in &objects {
            testing::create(&client, object).await?;
        }
        let took = created.elapsed();
        let created = Instant::now();
        println!(
            "  created as gardenlet does, in {:.0} ms: {}",
            took.as_secs_f64() * 1e3,
            objects
                .iter()
                .filter_map(|o| o["kind"].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let appeared = wait(&routed, true).await.then(|| created.elapsed());
        match appeared {
            Some(t) => println!("  GET https://{HOST}/version through the proxy: routed {:.0} ms after the last object was created", t.as_secs_f64() * 1e3),
            None => println!("  GET https://{HOST}/version: NOT routed within {CHANGE_BOUND:?}"),
        }
        let deleted = Instant::now();
        for (kind, api_version) in [
            ("VirtualService", testing::ISTIO),
            ("Gateway", testing::ISTIO),
        ] {
            let object = serde_json::json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": NAMESPACE, "name": "kube-apiserver"}});
            let (api, _) = testing::api(&client, &object)?;
            api.delete("kube-apiserver", &Default::default()).await?;
        }
        let gone = wait(&routed, false).await.then(|| deleted.elapsed());
        match gone {
            Some(t) => println!(
                "  Gateway and VirtualService deleted: refused (unknown SNI) {:.0} ms later",
                t.as_secs_f64() * 1e3
            ),
            None => println!(
                "  Gateway and VirtualService deleted: still routed after {CHANGE_BOUND:?}"
            ),
        }
        stop.stop_accepting();
        let _ = running.await;
        Ok(!before && appeared.is_some() && gone.is_some())
    }

    /// Polls `routed` until it says `want`, within [`CHANGE_BOUND`].
    async fn wait<F, Fut>(routed: &F, want: bool) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + CHANGE_BOUND;
        while Instant::now() < deadline {
            if routed().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}
