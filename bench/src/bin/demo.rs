//! The demo: two fake shoot kube-apiservers behind sni-proxy, kubectl-like traffic through
//! both listeners, a table of what happened, and the commands to try by hand. Runs until
//! Ctrl-C (or exits after the table with `--once`). Needs no root.

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

/// Runs sni-proxy in front of two fake shoot kube-apiservers.
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

    if args.once {
        shutdown.stop_accepting();
    } else {
        println!("\nserving until Ctrl-C");
    }
    running.await?;
    std::fs::remove_dir_all(&dir).ok();
    drop((s1, s2a, s2b));
    anyhow::ensure!(all_ok, "some demo traffic failed");
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
