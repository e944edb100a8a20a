//! Privileged: `data_path: sockmap` through the proxy, every byte checked. Concurrent large
//! transfers (one way per connection, both ways across them), half-close in each direction,
//! close with bytes still in flight, a client that half-closes before its sockets can be
//! spliced, a reset mid-stream on either leg (counted and logged on that leg), and the
//! fallbacks to splice: on a kernel not trusted with the path, and where the program cannot
//! be loaded (the binary run without capabilities).
//!
//! On 6.18.44 the kernel's redirect is not exact, whatever the proxy does (docs/sni-proxy.md,
//! "Data paths"): it repeats skbs under concurrent two-way load (`ebpf/tests/sockmap.rs`, the
//! ignored reproducer), and when a FIN arrives while the target's send buffer is full it
//! drops the bytes still queued (the proxy sees the shortfall and resets, so the peer gets a
//! reset, not a clean short stream). Here that fails the transfer, half-close and in-flight
//! tests in about one run in seven, so on a kernel not in `TRUSTED_KERNELS` they run only
//! with `SOCKMAP_TEST_UNTRUSTED=1`; concurrent two-way bulk on one connection is left to the
//! reproducer.
//!
//! Streams are made of 64 KiB blocks, each headed by its index and the connection's id, so
//! that a lost, repeated, reordered or crossed block fails the comparison, not just a sum.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use agentkit::testing::{client_hello, require_privileges};
use common::*;

const HOST: &str = "api.splice.test";
const BLOCK: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

/// The transfer test's size per connection and its connection count: four connections at
/// once, two sending 1 GiB up and two 1 GiB down (4 GiB through the proxy), takes about 5 s
/// (debug build) on the 2-core CI machine; `SOCKMAP_TEST_MIB` makes it smaller.
const TRANSFER_MIB: u64 = 1024;
const TRANSFER_CONNS: u64 = 4;

fn transfer_bytes() -> u64 {
    std::env::var("SOCKMAP_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TRANSFER_MIB)
        * MIB
}

/// The tests of this file run one at a time: the kernel's redirect misbehaves more under
/// concurrent load (see the file's doc), and a neighbour's load must not fail the start-up
/// self-test or a test of one edge case.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether these tests can run (root); under REQUIRE_PRIVILEGED=1 a skip is a failure, and so
/// is a kernel where the sockmap path does not work.
fn sockmap_here(test: &str) -> bool {
    if !require_privileges(test) {
        return false;
    }
    if let Err(why) = sni_proxy::datapath::sockmap_splicer() {
        panic!("{test}: the sockmap path does not work on this kernel: {why}");
    }
    true
}

/// Whether a test that moves bulk through the kernel's redirect may run: on a kernel not in
/// `TRUSTED_KERNELS` the kernel itself loses or repeats bytes now and then (see the file's
/// doc), so such tests run there only with `SOCKMAP_TEST_UNTRUSTED=1` and skip loudly
/// otherwise.
fn kernel_exact_or_asked(test: &str) -> bool {
    let Err(why) = ebpf::sockmap::kernel_trusted() else {
        return true;
    };
    if std::env::var("SOCKMAP_TEST_UNTRUSTED").as_deref() == Ok("1") {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: {why}; SOCKMAP_TEST_UNTRUSTED=1 runs it anyway ***\n"
    );
    false
}

/// The block pattern every stream shares (random-looking, fixed).
fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| common::pattern(0x5eed, BLOCK))
}

/// Block `index` of stream `id`: the pattern with the index and id in its first 16 bytes.
fn block(id: u64, index: u64, out: &mut [u8]) {
    out.copy_from_slice(&pattern()[..out.len()]);
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&index.to_be_bytes());
    head[8..].copy_from_slice(&id.to_be_bytes());
    let n = out.len().min(16);
    out[..n].copy_from_slice(&head[..n]);
}

/// Writes stream `id` of `len` bytes.
fn send_stream(mut s: &TcpStream, id: u64, len: u64) {
    let mut buf = vec![0u8; BLOCK];
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < len {
        let n = (len - sent).min(BLOCK as u64) as usize;
        block(id, index, &mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        sent += n as u64;
        index += 1;
    }
}

/// Reads stream `id` of `len` bytes, comparing every byte, then expects EOF. `pause` slows the
/// reader down (a sleep per block) to keep bytes queued in the proxy.
fn expect_stream(mut s: &TcpStream, id: u64, len: u64, pause: Option<Duration>) {
    let mut got = vec![0u8; BLOCK];
    let mut want = vec![0u8; BLOCK];
    let mut seen = 0u64;
    let mut index = 0u64;
    while seen < len {
        let n = (len - seen).min(BLOCK as u64) as usize;
        if let Err(e) = s.read_exact(&mut got[..n]) {
            panic!("stream {id}: {e} after {seen} of {len} bytes");
        }
        block(id, index, &mut want[..n]);
        if got[..n] != want[..n] {
            let first = got[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap();
            let at = |b: &[u8], o: usize| {
                b.get(o..o + 16).map(|h| {
                    (
                        u64::from_be_bytes(h[..8].try_into().unwrap()),
                        u64::from_be_bytes(h[8..].try_into().unwrap()),
                    )
                })
            };
            // Where in the pattern do the received bytes at `first` come from?
            let window = &got[first..(first + 32).min(n)];
            let pat = pattern();
            let offset = (0..BLOCK - window.len()).find(|&o| pat[o..o + window.len()] == *window);
            panic!(
                "stream {id}: block {index} (at byte {seen}) differs from byte {first}: \
                 header {:?}, bytes there match pattern offset {offset:?}",
                at(&got, 0)
            );
        }
        seen += n as u64;
        index += 1;
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
    let mut extra = [0u8; 1];
    match s.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => panic!("stream {id}: bytes after the {len} sent"),
        Err(e) => panic!("stream {id}: {e} instead of EOF after {len} bytes"),
    }
}

/// A backend that runs `serve` on a thread per accepted connection.
fn backend<F>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let serve = std::sync::Arc::clone(&serve);
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// Reads and checks the ClientHello the proxy forwards first; returns the connection's id,
/// which the client sent in its first 8 bytes after the hello.
fn accept_hello(mut s: &TcpStream) -> u64 {
    let hello = client_hello(HOST, &[]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = vec![0u8; hello.len() + 8];
    s.read_exact(&mut got).unwrap();
    // The hello's random differs per call: compare the record header and the length only.
    assert_eq!(got[..5], hello[..5], "not a ClientHello record");
    u64::from_be_bytes(got[hello.len()..].try_into().unwrap())
}

/// Connects through the proxy, sends a ClientHello for HOST and the connection's id.
fn connect(proxy: SocketAddr, id: u64) -> TcpStream {
    let s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut first = client_hello(HOST, &[]).unwrap();
    first.extend_from_slice(&id.to_be_bytes());
    (&s).write_all(&first).unwrap();
    s
}

/// The proxy with one sockmap listener; on this untrusted kernel only with the override.
async fn start_sockmap_proxy(backend: SocketAddr) -> TestProxy {
    start(&format!(
        "listeners: [{{name: l, address: '127.0.0.1:0', mode: tls, data_path: sockmap}}]\n\
         routes: [{{name: r, hosts: [{HOST}], backends: ['{backend}']}}]\n\
         allow_sockmap_on_untrusted_kernel: true\n"
    ))
    .await
}

async fn closed_done(proxy: &TestProxy, n: f64) {
    eventually("connections closed cleanly", || async {
        proxy
            .metric("sni_proxy_connections_closed_total{reason=\"done\",route=\"r\"}")
            .await
            == n
    })
    .await;
}

/// Even ids upload `len` then get a small answer; odd ids download `len` then send a small
/// request after the download: bulk in one direction at a time on each connection, in both
/// directions across them, all at once.
const SMALL: u64 = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_transfers_arrive_exactly() {
    let _serial = SERIAL.lock().await;
    let test = "concurrent_large_transfers_arrive_exactly";
    if !sockmap_here(test) || !kernel_exact_or_asked(test) {
        return;
    }
    let len = transfer_bytes();
    let sizes = move |id: u64| {
        if id % 2 == 0 {
            (len, SMALL)
        } else {
            (SMALL, len)
        }
    };
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        let (up, down) = sizes(id);
        if id % 2 == 0 {
            expect_stream(&s, id, up, None);
            send_stream(&s, id + 1000, down);
            s.shutdown(Shutdown::Write).unwrap();
        } else {
            send_stream(&s, id + 1000, down);
            s.shutdown(Shutdown::Write).unwrap();
            expect_stream(&s, id, up, None);
        }
    });
    let proxy = start_sockmap_proxy(addr).await;
    let target = proxy.addrs[0];
    let splicer = sni_proxy::datapath::sockmap_splicer().unwrap();
    let redirected_before = splicer.stat(ebpf::sockmap::Stat::RedirectedBytes).unwrap();
    let started = Instant::now();
    let clients: Vec<_> = (0..TRANSFER_CONNS)
        .map(|id| {
            std::thread::spawn(move || {
                let (up, down) = sizes(id);
                let s = connect(target, id);
                if id % 2 == 0 {
                    send_stream(&s, id, up);
                    s.shutdown(Shutdown::Write).unwrap();
                    expect_stream(&s, id + 1000, down, None);
                } else {
                    expect_stream(&s, id + 1000, down, None);
                    send_stream(&s, id, up);
                    s.shutdown(Shutdown::Write).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        tokio::task::spawn_blocking(move || c.join().unwrap())
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    let per_direction = TRANSFER_CONNS / 2 * (len + SMALL);
    let _ = writeln!(
        std::io::stderr(),
        "sockmap: {} MiB through the proxy in {:.1} s",
        2 * per_direction / MIB,
        elapsed.as_secs_f64()
    );
    closed_done(&proxy, TRANSFER_CONNS as f64).await;
    assert_eq!(
        proxy
            .metric("sni_proxy_data_path_connections_total{path=\"sockmap\"}")
            .await,
        TRANSFER_CONNS as f64
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_sockmap_unspliced_connections_total")
            .await,
        0.0
    );
    // The kernel moved the bytes (all but the few the proxy read with the hellos).
    let redirected =
        splicer.stat(ebpf::sockmap::Stat::RedirectedBytes).unwrap() - redirected_before;
    assert!(
        redirected >= 2 * per_direction - TRANSFER_CONNS * 64 * 1024,
        "{redirected}"
    );
    // The byte metrics count them; upstream less what the proxy read with the hellos.
    let metric = |direction: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric(&format!(
                    "sni_proxy_bytes_total{{direction=\"{direction}\",route=\"r\"}}"
                ))
                .await as u64
        }
    };
    let up = metric("upstream").await;
    assert!(
        up <= per_direction + 8 * TRANSFER_CONNS
            && up >= per_direction - TRANSFER_CONNS * 64 * 1024,
        "upstream {up}"
    );
    assert_eq!(metric("downstream").await, per_direction);
}

/// The client finishes first and the backend answers after the client's FIN; then the other
/// way round. Nothing may be lost or cut short either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways() {
    let _serial = SERIAL.lock().await;
    if !sockmap_here("half_close_both_ways") || !kernel_exact_or_asked("half_close_both_ways") {
        return;
    }
    const LEN: u64 = 8 * MIB;
    // id 0: client first. id 1: backend first.
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        if id == 0 {
            expect_stream(&s, id, LEN, None);
            // The client is gone for writing; answer late, through a half-open connection.
            std::thread::sleep(Duration::from_millis(100));
            send_stream(&s, id + 1000, LEN);
            s.shutdown(Shutdown::Write).unwrap();
        } else {
            send_stream(&s, id + 1000, LEN);
            s.shutdown(Shutdown::Write).unwrap();
            expect_stream(&s, id, LEN, None);
        }
    });
    let proxy = start_sockmap_proxy(addr).await;
    let target = proxy.addrs[0];
    tokio::task::spawn_blocking(move || {
        let s = connect(target, 0);
        send_stream(&s, 0, LEN);
        s.shutdown(Shutdown::Write).unwrap();
        expect_stream(&s, 1000, LEN, None);

        let s = connect(target, 1);
        expect_stream(&s, 1001, LEN, None);
        std::thread::sleep(Duration::from_millis(100));
        send_stream(&s, 1, LEN);
        s.shutdown(Shutdown::Write).unwrap();
        // The proxy closes once both directions ended.
        let mut rest = [0u8; 1];
        assert_eq!((&s).read(&mut rest).unwrap(), 0);
    })
    .await
    .unwrap();
    closed_done(&proxy, 2.0).await;
    assert_eq!(
        proxy
            .metric("sni_proxy_sockmap_unspliced_connections_total")
            .await,
        0.0
    );
}

/// Each side writes and closes at once while the other reads slowly: the bytes still queued
/// in the proxy's sockets when the FIN arrives must all arrive before the FIN is passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_bytes_in_flight_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !sockmap_here("close_with_bytes_in_flight_loses_nothing")
        || !kernel_exact_or_asked("close_with_bytes_in_flight_loses_nothing")
    {
        return;
    }
    const LEN: u64 = 32 * MIB;
    // A slow reader: ~2 ms per 64 KiB block keeps megabytes queued along the way.
    let slow = Some(Duration::from_millis(2));
    // id 0: the client writes and closes, the backend reads slowly.
    // id 1: the backend writes and closes, the client reads slowly.
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        if id == 0 {
            std::thread::sleep(Duration::from_millis(200));
            expect_stream(&s, id, LEN, slow);
        } else {
            send_stream(&s, id + 1000, LEN);
            drop(s);
        }
    });
    let proxy = start_sockmap_proxy(addr).await;
    let target = proxy.addrs[0];
    tokio::task::spawn_blocking(move || {
        let s = connect(target, 0);
        send_stream(&s, 0, LEN);
        drop(s);

        let s = connect(target, 1);
        std::thread::sleep(Duration::from_millis(200));
        expect_stream(&s, 1001, LEN, slow);
    })
    .await
    .unwrap();
    // The backend of id 0 checks its stream on its own thread: wait for the proxy to finish.
    eventually("both connections closed", || async {
        proxy
            .metric("sni_proxy_connections_active{listener=\"l\",route=\"r\"}")
            .await
            == 0.0
            && proxy
                .metric("sni_proxy_connections_total{listener=\"l\",route=\"r\"}")
                .await
                == 2.0
    })
    .await;
}

/// A client that sends its hello, some bytes and its FIN at once is half-closed before its
/// socket can enter the map: the proxy copies that connection instead, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_before_the_splice_is_copied() {
    let _serial = SERIAL.lock().await;
    if !sockmap_here("half_closed_before_the_splice_is_copied") {
        return;
    }
    // Small enough to sit in the proxy's receive queue whole, with the FIN behind it.
    const UP: u64 = 16 * 1024;
    const LEN: u64 = 4 * MIB;
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        expect_stream(&s, id, UP, None);
        send_stream(&s, id + 1000, LEN);
        s.shutdown(Shutdown::Write).unwrap();
    });
    let proxy = start_sockmap_proxy(addr).await;
    let target = proxy.addrs[0];
    tokio::task::spawn_blocking(move || {
        let s = TcpStream::connect(target).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut first = client_hello(HOST, &[]).unwrap();
        first.extend_from_slice(&7u64.to_be_bytes());
        let mut payload = vec![0u8; UP as usize];
        for (index, chunk) in payload.chunks_mut(BLOCK).enumerate() {
            block(7, index as u64, chunk);
        }
        first.extend_from_slice(&payload);
        // Corked, the write waits for the FIN and leaves with it: the proxy's first read
        // finds the hello, the bytes and the FIN already queued.
        socket2::SockRef::from(&s).set_cork(true).unwrap();
        (&s).write_all(&first).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        expect_stream(&s, 1007, LEN, None);
    })
    .await
    .unwrap();
    closed_done(&proxy, 1.0).await;
    assert_eq!(
        proxy
            .metric("sni_proxy_sockmap_unspliced_connections_total")
            .await,
        1.0
    );
}

/// A reset mid-stream on the sockmap path is counted and logged on the leg that reset: the
/// backend's seen by the proxy's watch of the backend socket or by the kernel failing to
/// deliver into it, the client's likewise. Small transfers only: this is not a bulk test.
/// (Single-threaded, so that the access log of this test's proxy can be captured.)
#[tokio::test]
async fn a_reset_mid_stream_is_counted_on_its_leg() {
    let _serial = SERIAL.lock().await;
    if !sockmap_here("a_reset_mid_stream_is_counted_on_its_leg") {
        return;
    }
    for leg in sni_proxy::datapath::Leg::ALL {
        reset_mid_stream("sockmap", "allow_sockmap_on_untrusted_kernel: true\n", leg).await;
    }
}

/// Without the override, this kernel (not in `TRUSTED_KERNELS`) gets splice, and the bytes
/// still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_kernel_falls_back_to_splice() {
    let _serial = SERIAL.lock().await;
    if !require_privileges("untrusted_kernel_falls_back_to_splice") {
        return;
    }
    assert!(
        ebpf::sockmap::kernel_trusted().is_err(),
        "this kernel is trusted now: the test needs an untrusted one"
    );
    const LEN: u64 = 4 * MIB;
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        expect_stream(&s, id, LEN, None);
        send_stream(&s, id + 1000, LEN);
        s.shutdown(Shutdown::Write).unwrap();
    });
    let proxy = start(&format!(
        "listeners: [{{name: l, address: '127.0.0.1:0', mode: tls, data_path: sockmap}}]\n\
         routes: [{{name: r, hosts: [{HOST}], backends: ['{addr}']}}]\n"
    ))
    .await;
    let target = proxy.addrs[0];
    tokio::task::spawn_blocking(move || {
        let s = connect(target, 5);
        send_stream(&s, 5, LEN);
        s.shutdown(Shutdown::Write).unwrap();
        expect_stream(&s, 1005, LEN, None);
    })
    .await
    .unwrap();
    closed_done(&proxy, 1.0).await;
    assert_eq!(
        proxy
            .metric("sni_proxy_data_path_connections_total{path=\"splice\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("sni_proxy_data_path_connections_total{path=\"sockmap\"}")
            .await,
        0.0
    );
}

/// Without CAP_BPF the program cannot be loaded: the binary says why once and serves the
/// listener with splice(2) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_splice_without_the_capability() {
    let _serial = SERIAL.lock().await;
    if !require_privileges("falls_back_to_splice_without_the_capability") {
        return;
    }
    const LEN: u64 = 4 * MIB;
    let addr = backend(move |s| {
        let id = accept_hello(&s);
        expect_stream(&s, id, LEN, None);
        send_stream(&s, id + 1000, LEN);
        s.shutdown(Shutdown::Write).unwrap();
    });
    let port = |()| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (listen, admin) = (port(()), port(()));
    let dir = std::env::temp_dir().join(format!("sni-proxy-sockmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{address: '127.0.0.1:{admin}'}}\n\
             listeners: [{{name: l, address: '127.0.0.1:{listen}', mode: tls, data_path: sockmap}}]\n\
             routes: [{{name: r, hosts: [{HOST}], backends: ['{addr}']}}]\n\
             allow_sockmap_on_untrusted_kernel: true\n"
        ),
    )
    .unwrap();
    // As nobody, without capabilities: bpf(2) is refused.
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_sni-proxy"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(admin_addr).await.is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "sni-proxy exited ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    tokio::task::spawn_blocking(move || {
        let s = connect(target, 3);
        send_stream(&s, 3, LEN);
        s.shutdown(Shutdown::Write).unwrap();
        expect_stream(&s, 1003, LEN, None);
    })
    .await
    .unwrap();
    let metrics = http_get(admin_addr, "/metrics").await;
    assert!(
        metrics.contains("sni_proxy_data_path_connections_total{path=\"splice\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("path=\"sockmap\""), "{metrics}");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("the sockmap data path is unavailable").count(),
        1,
        "{log}"
    );
    assert!(log.contains("loading the sockmap program"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
