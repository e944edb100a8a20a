//! Helpers for the integration tests: an in-process proxy on ephemeral ports, metric reading,
//! and raw-socket clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use agentkit::Shutdown;
use sni_proxy::{Config, Handle, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct TestProxy {
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub handle: Handle,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<()>,
}

/// `yaml` without the admin section; listeners should bind port 0.
pub async fn start(yaml: &str) -> TestProxy {
    let text = format!("admin: {{address: 127.0.0.1:0}}\n{yaml}");
    let config = Config::from_yaml(&text).unwrap();
    let proxy = Proxy::bind(config, prometheus::Registry::new())
        .await
        .unwrap();
    let addrs = proxy.listener_addrs();
    let admin = proxy.admin_addr().unwrap();
    let handle = proxy.handle();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(proxy.run(shutdown.clone(), None));
    TestProxy {
        addrs,
        admin,
        handle,
        shutdown,
        task,
    }
}

impl TestProxy {
    /// Reloads with `yaml` (admin section added like `start`).
    pub fn reload(&self, yaml: &str) {
        self.handle
            .reload(&format!("admin: {{address: 127.0.0.1:0}}\n{yaml}"))
            .unwrap();
    }

    /// The value of one sample of `/metrics`, e.g. `sni_proxy_routes` or
    /// `sni_proxy_handshake_failures_total{listener="l",reason="timeout"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = http_get(self.admin, "/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads until EOF or `limit`; Err if the peer did not close within 5 s.
pub async fn read_until_close(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer did not close"))??;
    Ok(out)
}

/// Reads exactly `n` bytes within 5 s.
pub async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("timed out reading")
        .unwrap();
    buf
}

/// Polls `cond` every 20 ms for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A deterministic payload.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}
