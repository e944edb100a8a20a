//! Helpers for the integration tests: an in-process proxy on ephemeral ports, metric reading,
//! and raw-socket clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use agentkit::Shutdown;
use sni_proxy::datapath::Leg;
use sni_proxy::{Config, Handle, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct TestProxy {
    pub addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub handle: Handle,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<()>,
    /// The proxy's registry, readable after the admin server stopped.
    pub registry: prometheus::Registry,
}

/// `yaml` without the admin section; listeners should bind port 0.
pub async fn start(yaml: &str) -> TestProxy {
    let text = format!("admin: {{address: 127.0.0.1:0}}\n{yaml}");
    let config = Config::from_yaml(&text).unwrap();
    let registry = prometheus::Registry::new();
    let proxy = Proxy::bind(config, registry.clone()).await.unwrap();
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
        registry,
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
    /// Series are compared as Prometheus stores them: labels in any order, and a label with
    /// an empty value the same as no label (`leg=""` on a close reason without a leg).
    pub async fn metric(&self, sample: &str) -> f64 {
        find_sample(&http_get(self.admin, "/metrics").await, sample)
    }

    /// Like [`TestProxy::metric`], read from the registry instead of `/metrics`: for after
    /// shutdown, when the admin server is gone.
    pub fn registry_metric(&self, sample: &str) -> f64 {
        use prometheus::Encoder;
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .unwrap();
        find_sample(&String::from_utf8(text).unwrap(), sample)
    }
}

/// The value of `sample` in a Prometheus text exposition; 0 if absent.
fn find_sample(text: &str, sample: &str) -> f64 {
    let want = series(sample);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (s, value) = l.rsplit_once(' ')?;
            (series(s) == want).then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A sample's name and its labels with a value, from `name{a="x",b=""}`.
fn series(sample: &str) -> (String, BTreeMap<String, String>) {
    let Some((name, rest)) = sample.split_once('{') else {
        return (sample.trim().to_string(), BTreeMap::new());
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest
        .strip_suffix('}')
        .expect("a sample's labels end with }");
    while let Some((label, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("unterminated label value") {
                (_, '\\') => value.extend(chars.next().map(|(_, c)| c)),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        if !value.is_empty() {
            labels.insert(label.trim_start_matches(',').to_string(), value);
        }
        rest = &after[end + 1..];
    }
    (name.to_string(), labels)
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

/// The access log (target `access`) of this thread, captured while it lives: each line as
/// its fields. The proxy's tasks log on the test's thread under `#[tokio::test]`'s
/// single-threaded runtime, so tests running beside it do not mix in.
pub struct AccessLog {
    lines: std::sync::Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl AccessLog {
    pub fn capture() -> AccessLog {
        let lines = std::sync::Arc::default();
        let capture = Capture {
            lines: std::sync::Arc::clone(&lines),
        };
        AccessLog {
            lines,
            _guard: tracing::subscriber::set_default(capture),
        }
    }

    pub fn lines(&self) -> Vec<BTreeMap<String, String>> {
        self.lines.lock().unwrap().clone()
    }
}

struct Capture {
    lines: std::sync::Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>,
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "access"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        self.lines.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

/// One relayed connection on `data_path` (a listener on port 0, `extra` added to the config,
/// the access log on), bytes moved both ways, then the `reset` end resets it mid-stream. The
/// other end must see the reset passed on; `sni_proxy_connections_closed_total` must count
/// one reset on that leg and nothing else; the access log line must name the leg.
pub async fn reset_mid_stream(data_path: &str, extra: &str, reset: Leg) {
    let log = AccessLog::capture();
    let backends = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backends.local_addr().unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: l, address: '127.0.0.1:0', mode: tls, data_path: {data_path}}}]\n\
         routes: [{{name: r, hosts: [legs.test], backends: ['{backend_addr}']}}]\n\
         access_log: true\n{extra}"
    ))
    .await;
    let hello = agentkit::testing::client_hello("legs.test", &[]).unwrap();
    let mut client = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let (mut backend, _) = tokio::time::timeout(Duration::from_secs(5), backends.accept())
        .await
        .expect("the proxy did not connect the backend")
        .unwrap();
    assert_eq!(read_n(&mut backend, hello.len()).await, hello);
    // Mid-stream: an answer down, more up, each read whole.
    let (down, up) = (pattern(1, 200_000), pattern(2, 200_000));
    backend.write_all(&down).await.unwrap();
    assert!(read_n(&mut client, down.len()).await == down);
    client.write_all(&up).await.unwrap();
    assert!(read_n(&mut backend, up.len()).await == up);

    let (gone, mut survivor) = match reset {
        Leg::Client => (client, backend),
        Leg::Backend => (backend, client),
    };
    socket2::SockRef::from(&gone)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(gone); // RST
    let err = read_until_close(&mut survivor)
        .await
        .expect_err("the reset was not passed on");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{data_path}: {err}"
    );

    let sample = |reason: &str, leg: &str| {
        format!(
            "sni_proxy_connections_closed_total{{leg=\"{leg}\",reason=\"{reason}\",route=\"r\"}}"
        )
    };
    let counted = sample("reset", reset.as_str());
    eventually("the reset is counted on its leg", || async {
        proxy.metric(&counted).await == 1.0
    })
    .await;
    for leg in Leg::ALL {
        if leg != reset {
            assert_eq!(proxy.metric(&sample("reset", leg.as_str())).await, 0.0);
        }
        assert_eq!(proxy.metric(&sample("error", leg.as_str())).await, 0.0);
    }
    assert_eq!(proxy.metric(&sample("done", "")).await, 0.0);
    // An existing query on the reason alone still finds it, whichever the leg.
    let total: f64 = {
        let text = http_get(proxy.admin, "/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("sni_proxy_connections_closed_total{")
                    && l.contains("reason=\"reset\"")
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(total, 1.0);

    let lines = log.lines();
    assert_eq!(lines.len(), 1, "one access log line: {lines:?}");
    let line = &lines[0];
    let field = |name: &str| line.get(name).map(String::as_str);
    assert_eq!(field("route"), Some("r"), "{line:?}");
    assert_eq!(field("data_path"), Some(data_path), "{line:?}");
    assert_eq!(field("reason"), Some("reset"), "{line:?}");
    assert_eq!(field("leg"), Some(reset.as_str()), "{line:?}");
    assert_eq!(
        field("bytes_up"),
        Some(up.len().to_string().as_str()),
        "{line:?}"
    );
    assert_eq!(
        field("bytes_down"),
        Some(down.len().to_string().as_str()),
        "{line:?}"
    );
    proxy.shutdown.stop_accepting();
}
