//! Connection lifecycle with real sockets: reloads under load, route change policies, caps,
//! the handshake deadline, idle timeout, maximum lifetime, backend failover and ejection, and
//! which leg a reset is counted and logged on.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::testing::{client_hello, EchoServer};
use common::*;
use sni_proxy::datapath::Leg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn listener(extra: &str) -> String {
    format!("listeners: [{{name: l, address: '127.0.0.1:0', mode: tls{extra}}}]\n")
}

/// Connects and sends a ClientHello for `sni`; returns the stream after the echo of the hello.
async fn open(proxy: &TestProxy, sni: &str) -> TcpStream {
    let hello = client_hello(sni, &[]).unwrap();
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_n(&mut s, hello.len()).await, hello);
    s
}

/// A local address nothing listens on (a backend that refuses connections).
fn unused_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Whether the stream still relays: write a few bytes, expect the echo.
async fn alive(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_survive_twenty_reloads() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = |i: usize| {
        let mut y = listener("");
        y.push_str(&format!(
            "routes:\n- {{name: stream, hosts: [stream.test], backends: ['{}']}}\n",
            echo.addr
        ));
        // Other routes come and go, and the streaming route's neighbours change.
        for j in 0..(i % 5) * 50 {
            y.push_str(&format!(
                "- {{name: r{j}, hosts: [r{j}-{i}.test], backends: ['127.0.0.1:{}']}}\n",
                1000 + j
            ));
        }
        y
    };
    let proxy = Arc::new(start(&base(0)).await);
    const CONNS: usize = 1000;
    const CHUNKS: usize = 20;
    const CHUNK: usize = 4096;
    let hello = Arc::new(client_hello("stream.test", &[]).unwrap());
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let (proxy, hello) = (Arc::clone(&proxy), Arc::clone(&hello));
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
            s.write_all(&hello).await.unwrap();
            assert_eq!(read_n(&mut s, hello.len()).await, *hello);
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                for k in 0..CHUNKS {
                    w.write_all(&pattern((c * CHUNKS + k) as u32, CHUNK))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(CHUNKS * CHUNK);
            tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            writer.await.unwrap();
            let want: Vec<u8> = (0..CHUNKS)
                .flat_map(|k| pattern((c * CHUNKS + k) as u32, CHUNK))
                .collect();
            assert_eq!(got.len(), want.len(), "connection {c}: bytes lost");
            assert!(got == want, "connection {c}: bytes corrupted");
        }));
    }
    for i in 1..=20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.reload(&base(i));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        proxy
            .metric("sni_proxy_config_reloads_total{result=\"ok\"}")
            .await,
        20.0
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_closed_total{reason=\"done\",route=\"stream\"}")
            .await,
        CONNS as f64
    );
}

#[tokio::test]
async fn route_change_policies() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let e = echo.addr;
    let l = listener("");
    let routes = |v: u32| {
        format!(
            "{l}routes:\n\
             - {{name: keep, hosts: [keep.test, keep{v}.test], backends: ['{e}']}}\n\
             - {{name: drain, hosts: [drain.test, drain{v}.test], backends: ['{e}'], on_change: drain, drain_delay: 300ms}}\n\
             - {{name: close, hosts: [close.test, close{v}.test], backends: ['{e}'], on_change: close}}\n\
             - {{name: untouched, hosts: [untouched.test], backends: ['{e}'], on_change: close}}\n"
        )
    };
    let proxy = start(&routes(1)).await;
    let mut keep = open(&proxy, "keep.test").await;
    let mut drain = open(&proxy, "drain.test").await;
    let mut close = open(&proxy, "close.test").await;
    let mut untouched = open(&proxy, "untouched.test").await;
    // Change three routes (another host each); leave `untouched` as it is.
    proxy.reload(&routes(2));
    let changed_at = Instant::now();
    assert!(
        read_until_close(&mut close).await.unwrap().is_empty(),
        "close: closed at once"
    );
    assert!(changed_at.elapsed() < Duration::from_millis(250));
    assert!(
        alive(&mut drain).await,
        "drain: still open before the delay"
    );
    assert!(
        read_until_close(&mut drain).await.unwrap().is_empty(),
        "drain: closed after the delay"
    );
    assert!(changed_at.elapsed() >= Duration::from_millis(300));
    assert!(alive(&mut keep).await, "keep: still open");
    assert!(alive(&mut untouched).await, "unchanged route: untouched");
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_closed_total{reason=\"route_changed\",route=\"close\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn removed_route_with_close_policy_cuts_its_streams() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let one = format!(
        "{}routes: [{{name: gone, hosts: [gone.test], backends: ['{}'], on_change: close}}]\n",
        listener(""),
        echo.addr
    );
    let proxy = start(&one).await;
    let mut s = open(&proxy, "gone.test").await;
    proxy.reload(&format!("{}routes: []\n", listener("")));
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
    // A deleted shoot's series disappear once its last connection is gone.
    eventually("route series forgotten", || async {
        proxy
            .metric("sni_proxy_connections_total{listener=\"l\",route=\"gone\"}")
            .await
            == 0.0
    })
    .await;
}

/// Whether the proxy closed the connection (EOF, or a reset if our bytes were unread).
async fn refused(s: &mut TcpStream) -> bool {
    match read_until_close(s).await {
        Ok(bytes) => bytes.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[tokio::test]
async fn caps_refuse_with_a_counter() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (l, e) = (listener(""), echo.addr);
    let proxy = start(&format!(
        "{l}routes:\n- {{name: a, hosts: [a.test], backends: ['{e}'], max_connections: 2}}\n- {{name: b, hosts: [b.test], backends: ['{e}']}}\nlimits: {{max_connections_per_source: 4}}\n"
    ))
    .await;
    let _a1 = open(&proxy, "a.test").await;
    let _a2 = open(&proxy, "a.test").await;
    let mut a3 = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    a3.write_all(&client_hello("a.test", &[]).unwrap())
        .await
        .unwrap();
    assert!(refused(&mut a3).await, "route cap");
    drop(a3);
    let _b1 = open(&proxy, "b.test").await;
    let _b2 = open(&proxy, "b.test").await;
    // The per-source cap holds from accept on, before any byte: slow handshakes count too.
    let mut b3 = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    assert!(refused(&mut b3).await, "per-source cap");
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_refused_total{listener=\"l\",reason=\"route_cap\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_refused_total{listener=\"l\",reason=\"source_cap\"}")
            .await,
        1.0
    );

    // Global cap: 2 pending handshakes fill it; the third is refused at accept.
    let proxy = start(&format!("{l}limits: {{max_connections: 2}}\n")).await;
    let _p1 = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    let _p2 = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    eventually("pending counted", || async {
        proxy.handle.active_connections() == 2
    })
    .await;
    let mut over = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    assert!(refused(&mut over).await, "global cap");
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_refused_total{listener=\"l\",reason=\"global_cap\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn slow_client_is_closed_at_the_handshake_deadline() {
    let proxy = start(&format!("{}timeouts: {{handshake: 300ms}}\n", listener(""))).await;
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    let hello = client_hello("a.test", &[]).unwrap();
    s.write_all(&hello[..10]).await.unwrap();
    let t = Instant::now();
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_handshake_failures_total{listener=\"l\",reason=\"timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn idle_timeout_and_max_lifetime_close_connections() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (l, e) = (listener(""), echo.addr);
    let proxy = start(&format!(
        "{l}routes:\n- {{name: idle, hosts: [idle.test], backends: ['{e}']}}\n- {{name: life, hosts: [life.test], backends: ['{e}'], max_connection_lifetime: 400ms, max_connection_lifetime_jitter: 100ms}}\ntimeouts: {{idle: 300ms}}\n"
    ))
    .await;
    let mut idle = open(&proxy, "idle.test").await;
    let t = Instant::now();
    assert!(read_until_close(&mut idle).await.unwrap().is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250));
    // A busy connection is not idle, but its lifetime ends it (400-500 ms).
    let mut life = open(&proxy, "life.test").await;
    let t = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if !alive(&mut life).await {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(closed, "lifetime did not end the connection");
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_closed_total{reason=\"lifetime\",route=\"life\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_closed_total{reason=\"idle\",route=\"idle\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn dead_backend_fails_over_then_is_ejected_and_probed_back() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dead = unused_addr();
    let proxy = start(&format!(
        "{}routes: [{{name: a, hosts: [a.test], backends: ['{dead}', '{}']}}]\nhealth: {{eject_after_failures: 2, probe_interval: 100ms}}\n",
        listener(""),
        echo.addr
    ))
    .await;
    for _ in 0..6 {
        let mut s = open(&proxy, "a.test").await; // always succeeds via the live backend
        assert!(alive(&mut s).await);
    }
    assert_eq!(
        proxy
            .metric("sni_proxy_backend_ejections_total{route=\"a\"}")
            .await,
        1.0
    );
    let failures = proxy
        .metric("sni_proxy_backend_connect_failures_total{route=\"a\"}")
        .await;
    assert_eq!(
        failures, 2.0,
        "ejected backends are tried last, so no more failures"
    );
    // The dead backend comes back: the probe returns it to rotation.
    let revived = EchoServer::start(dead).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _held = open(&proxy, "a.test").await; // least connections: the next goes to the other one
    let _next = open(&proxy, "a.test").await;
    drop(revived);
    assert_eq!(
        proxy
            .metric("sni_proxy_backend_connect_failures_total{route=\"a\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn shutdown_lets_open_connections_finish() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "{}routes: [{{name: a, hosts: [a.test], backends: ['{}']}}]\ntimeouts: {{shutdown_grace: 10s}}\n",
        listener(""),
        echo.addr
    ))
    .await;
    let mut s = open(&proxy, "a.test").await;
    // This test's runtime has one thread: the blocking connect completes in the kernel while
    // the proxy's accept task cannot run, so the connection waits in the accept queue when
    // shutdown begins. It must be served, not reset.
    let queued = std::net::TcpStream::connect(proxy.addrs[0]).unwrap();
    proxy.shutdown.stop_accepting();
    let mut queued = TcpStream::from_std({
        queued.set_nonblocking(true).unwrap();
        queued
    })
    .unwrap();
    let hello = client_hello("a.test", &[]).unwrap();
    queued.write_all(&hello).await.unwrap();
    assert_eq!(
        read_n(&mut queued, hello.len()).await,
        hello,
        "queued connection served"
    );
    drop(queued);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(proxy.addrs[0]).await.is_err(),
        "stopped accepting"
    );
    assert!(alive(&mut s).await, "in-flight connection still relays");
    assert!(!proxy.task.is_finished());
    s.shutdown().await.unwrap();
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
    tokio::time::timeout(Duration::from_secs(5), proxy.task)
        .await
        .unwrap()
        .unwrap();
}

/// The drain counts every tracked task: a spliced connection still open at stop keeps the
/// proxy running until the grace deadline, and is then closed and counted as forced; the
/// probe of an ejected backend (due in an hour) is tracked too, and ends when the shutdown
/// begins instead of holding the drain forever.
#[tokio::test]
async fn shutdown_forces_open_connections_at_the_grace_deadline() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dead = unused_addr();
    let grace = Duration::from_millis(500);
    let mut proxy = start(&format!(
        "{}routes: [{{name: a, hosts: [a.test], backends: ['{dead}', '{}']}}]\n\
         health: {{eject_after_failures: 1, probe_interval: 1h}}\n\
         timeouts: {{shutdown_grace: 500ms}}\n",
        listener(", data_path: splice"),
        echo.addr
    ))
    .await;
    // Ties rotate, so a few connections are needed before one tries the dead backend first.
    let mut open_conns = Vec::new();
    for _ in 0..4 {
        open_conns.push(open(&proxy, "a.test").await);
        if proxy
            .metric("sni_proxy_backend_ejections_total{route=\"a\"}")
            .await
            == 1.0
        {
            break;
        }
    }
    assert_eq!(
        proxy
            .metric("sni_proxy_backend_ejections_total{route=\"a\"}")
            .await,
        1.0,
        "the dead backend was ejected, so its probe runs"
    );
    let mut s = open_conns.pop().unwrap();
    drop(open_conns);

    let stopped = Instant::now();
    proxy.shutdown.stop_accepting();
    tokio::time::sleep(grace / 2).await;
    assert!(alive(&mut s).await, "relays during the grace period");
    assert!(
        !proxy.task.is_finished(),
        "the drain waits for the connection"
    );
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("the drain ends at the grace deadline")
        .unwrap();
    assert!(stopped.elapsed() >= grace, "{:?}", stopped.elapsed());
    match read_until_close(&mut s).await {
        Ok(_) => {}
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "still open"),
    }
    assert_eq!(
        proxy.registry_metric("sni_proxy_shutdown_forced_connections_total"),
        1.0
    );
}

/// A kube-apiserver that resets mid-stream is counted and logged as the backend's reset, on
/// both userspace data paths.
#[tokio::test]
async fn a_backend_reset_mid_stream_is_the_backends() {
    reset_mid_stream("copy", "", Leg::Backend).await;
    reset_mid_stream("splice", "", Leg::Backend).await;
}

/// A client that resets mid-stream is counted and logged as the client's reset.
#[tokio::test]
async fn a_client_reset_mid_stream_is_the_clients() {
    reset_mid_stream("copy", "", Leg::Client).await;
    reset_mid_stream("splice", "", Leg::Client).await;
}
