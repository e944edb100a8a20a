//! The demo's konnectivity part: a server and an agent in-process, a "node" whose kubelet
//! streams logs (in a network namespace when root, on loopback otherwise), `kubectl logs -f`
//! through the tunnel as kube-apiserver dials it (HTTP CONNECT on a UDS), and beside it a
//! second tunnel whose reader has stopped: the log stream goes on at full pace while the stalled
//! tunnel holds no more than its window.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use anyhow::Context as _;
use clap::Parser as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, UnixStream};

/// What the part showed, for the demo's exit code.
pub struct Outcome {
    pub ok: bool,
}

/// The node's two endpoints: a log stream (a line every 20 ms) and a firehose.
async fn node(
    dir: &Path,
) -> anyhow::Result<(
    SocketAddr,
    SocketAddr,
    Arc<AtomicU64>,
    Option<agentkit::testing::Hosts>,
)> {
    let hosts = if agentkit::testing::has_privileges() {
        agentkit::testing::Hosts::create("demo", "konnd")
    } else {
        None
    };
    let _ = dir;
    let bind = |port: u16| -> anyhow::Result<TcpListener> {
        let listener = match &hosts {
            Some(h) => {
                let addr: SocketAddr = format!("{}:{port}", h.ip(2)).parse()?;
                h.netns.run(move || std::net::TcpListener::bind(addr))?
            }
            None => std::net::TcpListener::bind("127.0.0.1:0")?,
        };
        listener.set_nonblocking(true)?;
        Ok(TcpListener::from_std(listener)?)
    };
    let logs = bind(10250)?;
    let firehose = bind(10255)?;
    let (logs_addr, fire_addr) = (logs.local_addr()?, firehose.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = logs.accept().await {
            tokio::spawn(async move {
                for n in 1..=100_000u64 {
                    let line =
                        format!("2026-12-06T10:00:00Z stdout F kube-apiserver log line {n}\n");
                    if s.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = firehose.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..16_384 {
                    match s.write(&chunk).await {
                        Ok(n) => counter.fetch_add(n as u64, Ordering::Relaxed),
                        Err(_) => return,
                    };
                }
            });
        }
    });
    Ok((logs_addr, fire_addr, written, hosts))
}

async fn connect(uds: &Path, to: SocketAddr) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        anyhow::ensure!(
            s.read(&mut b).await? == 1,
            "tunnel closed before its answer"
        );
        head.push(b[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(s)
}

/// Runs the part and prints what it shows.
pub async fn run(dir: &Path, pki: &agentkit::testing::Pki) -> anyhow::Result<Outcome> {
    println!(
        "\n== konnectivity: kube-apiserver → server → agent (dialled out from the node) → kubelet"
    );
    let leaf = pki.leaf(&["localhost"])?;
    let (cert, key) = (dir.join("konn.pem"), dir.join("konn-key.pem"));
    std::fs::write(&cert, &leaf.cert_pem)?;
    std::fs::write(&key, &leaf.key_pem)?;
    let ca = dir.join("ca.pem");
    let uds = dir.join("konnectivity-server.socket");
    let server_flags = konnectivity::flags::ServerFlags::try_parse_from([
        "konnectivity-server".to_string(),
        "--mode=http-connect".into(),
        format!("--uds-name={}", uds.display()),
        "--server-port=0".into(),
        "--agent-port=0".into(),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--cluster-cert={}", cert.display()),
        format!("--cluster-key={}", key.display()),
        "--health-port=0".into(),
        "--admin-port=0".into(),
    ])?;
    let shutdown = Shutdown::new();
    let registry = prometheus::Registry::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(konnectivity::server::run(
        server_flags.config()?,
        registry.clone(),
        shutdown.clone(),
        move |bound| {
            let _ = tx.send(bound.agent);
        },
    ));
    let agent_port = rx.await.context("the server did not start")?;
    let agent_flags = konnectivity::flags::AgentFlags::try_parse_from([
        "konnectivity-agent".to_string(),
        "--proxy-server-host=localhost".into(),
        format!("--proxy-server-port={}", agent_port.port()),
        format!("--ca-cert={}", ca.display()),
        "--agent-id=node-1".into(),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
    ])?;
    let agent = tokio::spawn(konnectivity::agent::run(
        agent_flags.config()?,
        prometheus::Registry::new(),
        shutdown.clone(),
        |_, _| {},
    ));
    let (logs, firehose, fire_written, hosts) = node(dir).await?;
    let place = if hosts.is_some() {
        "in a network namespace"
    } else {
        "on loopback (root puts it in a network namespace)"
    };
    println!("  server on {} (HTTP CONNECT, as kube-apiserver's egress selector dials it); agent node-1 dialled out to {agent_port}; the node's kubelet {place}: logs on {logs}", uds.display());
    // Wait for the agent.
    let mut ready = false;
    for _ in 0..200 {
        if connect(&uds, logs).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(ready, "the agent never connected");

    // A tunnel whose reader stops: the firehose writes as fast as it can, nobody reads.
    let _stalled = connect(&uds, firehose).await?;
    // kubectl logs -f, beside it.
    let stream = connect(&uds, logs).await?;
    let mut lines = BufReader::new(stream).lines();
    let started = Instant::now();
    let mut count = 0u32;
    println!("  kubectl logs -f (through the tunnel), while another tunnel's reader has stopped:");
    while started.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                count += 1;
                if count <= 3 || count % 25 == 0 {
                    println!("    {line}");
                }
            }
            _ => break,
        }
    }
    let rate = f64::from(count) / started.elapsed().as_secs_f64();
    let queued = metric(
        &registry,
        "konnectivity_network_proxy_server_tunnel_queued_bytes",
    );
    let pushed = fire_written.load(Ordering::Relaxed);
    println!(
        "  {count} log lines in 2 s ({rate:.0}/s, the kubelet writes 50/s): not slowed by the stalled tunnel"
    );
    println!(
        "  the stalled tunnel: {:.0} KiB queued in the server (its window is 512 KiB), its source pushed back after {:.1} MiB",
        queued / 1024.0,
        pushed as f64 / (1 << 20) as f64
    );
    let ok = rate > 40.0 && queued <= f64::from(konnectivity::tunnel::DEFAULT_WINDOW);
    shutdown.stop_accepting();
    shutdown.force_close();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = server.await;
        let _ = agent.await;
    })
    .await;
    drop(hosts);
    Ok(Outcome { ok })
}

fn metric(registry: &prometheus::Registry, name: &str) -> f64 {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut text);
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
