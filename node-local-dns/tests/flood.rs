//! The miss path is bounded by default. A flood of random names against an upstream that
//! never answers them (the random-subdomain attack, or an `ndots:5` storm from a broken
//! workload) next to hundreds of DNS TCP connections that never send: cached names are still
//! answered within their usual latency, new names past `max_concurrent` are REFUSED at once,
//! surplus TCP connections are closed at once and idle ones after their deadline, and the
//! process's descriptors, tasks and memory stay within what the caps allow, then come back
//! down. Also: a TCP client that never reads its replies loses the connection after the
//! write deadline, and waiters joining a query in flight do not count against the cap.
//!
//! The server is the agent's own listener (the recvmmsg worker thread, TCP on the runtime)
//! on loopback; clients, flood and upstream are plain threads, so the runtime's task count is
//! the server's. Every loop is bounded; timing is used only as bounds on behaviour.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use node_local_dns::cache::Policy;
use node_local_dns::config::{Forward, DEFAULT_MAX_CONCURRENT};
use node_local_dns::corefile;
use node_local_dns::forward::{Forwarder, OVERALL_TIMEOUT};
use node_local_dns::metrics::Metrics;
use node_local_dns::server::{
    Served, Server, Zone, MAX_PENDING_MISSES, MAX_TCP_CONNECTIONS, TCP_IDLE, TCP_WRITE_TIMEOUT,
};
use node_local_dns::udp;
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, rcode, rtype};
use prometheus::Registry;
use tokio::runtime::Runtime;

/// The tests here measure the whole process (descriptors, tasks, memory): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Random names in the flood.
const FLOOD_QUERIES: usize = 30_000;
/// The flood sends this many queries per millisecond at most (about 15 000 per second).
const FLOOD_PER_MS: usize = 16;
/// TCP connections opened beyond the cap (each must be refused).
const EXTRA_TCP: usize = 64;
/// Names cached before the flood and asked throughout it.
const WARM: &[&str] = &[
    "api.warm.test.",
    "db.warm.test.",
    "kube-dns.warm.test.",
    "metrics.warm.test.",
];
/// A cached name whose reply is about 6 KB (TCP only, in full).
const BIG: &str = "big.warm.test.";
/// Cached names are answered within this at the 99th percentile during the flood: generous
/// for a loopback hit (well under a millisecond unloaded) on a shared CI machine, and far
/// below what a hit stuck behind the flood's misses would take.
const HIT_P99: Duration = Duration::from_millis(50);
/// What the process may hold beyond the caps' own items: runtime and test bookkeeping.
const SLACK_FDS: usize = 64;
const SLACK_TASKS: usize = 64;
/// Memory budget of one upstream query in flight: the miss's task and the flight's task,
/// the query copies, and the receive buffer (64 KiB of capacity, of which only what arrives
/// is touched). Measured at 10 to 12 KiB per query (RSS growth over queries in flight).
const BYTES_PER_UPSTREAM_QUERY: u64 = 16 << 10;
/// Memory budget of a miss waiting on a query already in flight, or of a TCP connection.
const BYTES_PER_WAITER: u64 = 2 << 10;
const BYTES_PER_TCP_CONNECTION: u64 = 8 << 10;
/// Allocator and runtime growth not tied to any one item.
const SLACK_BYTES: u64 = 8 << 20;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An upstream on loopback UDP that answers names under `warm.test.` at once and nothing
/// else, ever: the slowest upstream there is (every flood query holds its slot until the
/// forwarder's deadlines).
struct SlowUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowUpstream {
    fn start() -> SlowUpstream {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while !flag.load(Ordering::Acquire) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = warm_answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        SlowUpstream {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn warm_answer(query: &[u8]) -> Option<Vec<u8>> {
    let name = parse_query(query).ok()?.qname_text();
    if !name.ends_with(".warm.test.") {
        return None;
    }
    let parsed = parse_query(query).ok()?;
    let mut reply = ResponseBuilder::new(query);
    if name == BIG && parsed.qtype == rtype::TXT {
        for i in 0..24u8 {
            let mut text = vec![250u8];
            text.extend(std::iter::repeat_n(b'a' + i, 250));
            reply = reply.answer(&name, rtype::TXT, 3600, &text);
        }
    } else {
        reply = reply.answer(&name, rtype::A, 3600, &[10, 0, 0, 1]);
    }
    Some(reply.compress(true).build())
}

/// One listener as the agent runs it: the UDP worker thread and TCP on the runtime.
struct Listener {
    addr: SocketAddr,
    zone: Arc<Zone>,
    registry: Registry,
    control: Arc<udp::Control>,
    thread: Option<JoinHandle<()>>,
    tcp: tokio::task::JoinHandle<()>,
    /// Where its misses, fetches and TCP connections run, as in the agent.
    work: agentkit::Shutdown,
}

impl Listener {
    /// Whether misses, fetches or TCP connections are in progress.
    fn busy(&self) -> bool {
        !self.work.tracker().is_empty()
    }

    fn start(rt: &Runtime, forward: &Forward) -> Listener {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let work = agentkit::Shutdown::new();
        let zone = Arc::new(
            Zone::new(".", Policy::default(), Forwarder::new(forward))
                .with_metrics(metrics.clone())
                .with_tasks(&work),
        );
        // A port free for both UDP and TCP (bounded retries: another process may hold the
        // TCP side of the port the kernel gave us for UDP).
        let (socket, addr, tcp) = (0..32)
            .find_map(|_| {
                let socket = udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = socket.local_addr().unwrap().as_socket().unwrap();
                let tcp = std::net::TcpListener::bind(addr).ok()?;
                Some((socket, addr, tcp))
            })
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let served = Served {
            zone: Arc::clone(&zone),
            metrics: Some(metrics.zone(&format!("dns://{addr}"), ".")),
        };
        let server = Server::with_metrics(vec![served], Some(metrics), false, &work);
        let control = Arc::new(udp::Control::default());
        let thread = udp::spawn(
            socket,
            server.clone(),
            rt.handle().clone(),
            Arc::clone(&control),
        )
        .unwrap();
        let tcp = {
            let _runtime = rt.enter();
            tokio::net::TcpListener::from_std(tcp).unwrap()
        };
        let tcp = rt.spawn(server.clone().serve_tcp(tcp));
        Listener {
            addr,
            zone,
            registry,
            control,
            thread: Some(thread),
            tcp,
            work,
        }
    }

    /// The sum of a metric's samples, read from the text an operator scrapes.
    fn metric(&self, name: &str) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap();
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.tcp.abort();
        self.control.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, qtype, None, &mut q);
    q
}

fn rcode_of(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

fn ancount(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[6], reply[7]])
}

/// Asks `name` (type A) over UDP from `socket` and waits for the reply with our ID; None on
/// timeout.
fn ask(socket: &UdpSocket, server: SocketAddr, id: u16, name: &str) -> Option<Vec<u8>> {
    ask_type(socket, server, id, name, rtype::A)
}

fn ask_type(
    socket: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
    qtype: u16,
) -> Option<Vec<u8>> {
    socket.send_to(&query(id, name, qtype), server).unwrap();
    let mut buf = vec![0u8; 65535];
    // Bounded: stray replies (to an earlier, timed-out probe) are skipped a few times at most.
    for _ in 0..16 {
        let n = socket.recv(&mut buf).ok()?;
        if n >= 12 && buf[..2] == id.to_be_bytes() {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

/// What the process holds.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    fds: usize,
    tasks: usize,
    rss: u64,
}

impl Usage {
    fn now(rt: &Runtime) -> Usage {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf(3) only reads a configuration value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        Usage {
            fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
            tasks: rt.metrics().num_alive_tasks(),
            rss: pages * page,
        }
    }

    fn max(self, other: Usage) -> Usage {
        Usage {
            fds: self.fds.max(other.fds),
            tasks: self.tasks.max(other.tasks),
            rss: self.rss.max(other.rss),
        }
    }
}

/// The cached names, asked in turn every 2 ms until `stop`: each latency, and how many got
/// no correct answer within 1 s.
fn probe_hits(server: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<(Vec<Duration>, usize)> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let (mut latencies, mut failures) = (Vec::new(), 0);
        for i in 0..20_000u16 {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let name = WARM[usize::from(i) % WARM.len()];
            let start = Instant::now();
            match ask(&socket, server, i, name) {
                Some(reply) if rcode_of(&reply) == rcode::NOERROR && ancount(&reply) == 1 => {
                    latencies.push(start.elapsed());
                }
                _ => failures += 1,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (latencies, failures)
    })
}

/// The flood's replies.
#[derive(Default)]
struct FloodReport {
    refused: usize,
    servfail: usize,
    other: usize,
    /// How long each REFUSED took from its query.
    refused_latencies: Vec<Duration>,
}

/// Sends `FLOOD_QUERIES` random names (ID = index) and collects the replies until `stop`.
fn flood(
    server: SocketAddr,
    sent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<FloodReport> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let epoch = Instant::now();
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..FLOOD_QUERIES).map(|_| AtomicU64::new(0)).collect());
        let reader = {
            let (socket, sent_at) = (socket.try_clone().unwrap(), Arc::clone(&sent_at));
            std::thread::spawn(move || {
                let mut report = FloodReport::default();
                let mut buf = vec![0u8; 65535];
                // Bounded by `stop`, and by one reply per query plus a timeout per poll.
                for _ in 0..FLOOD_QUERIES * 2 {
                    let n = match socket.recv(&mut buf) {
                        Ok(n) => n,
                        Err(_) if stop.load(Ordering::Acquire) => break,
                        Err(_) => continue,
                    };
                    if n < 12 {
                        continue;
                    }
                    match rcode_of(&buf[..n]) {
                        rcode::REFUSED => {
                            report.refused += 1;
                            let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                            let at = sent_at[id].load(Ordering::Acquire);
                            let now = epoch.elapsed().as_nanos() as u64;
                            report
                                .refused_latencies
                                .push(Duration::from_nanos(now.saturating_sub(at)));
                        }
                        rcode::SERVFAIL => report.servfail += 1,
                        _ => report.other += 1,
                    }
                }
                report
            })
        };
        for i in 0..FLOOD_QUERIES {
            let name = format!("{:016x}.flood.test.", rand::random::<u64>());
            sent_at[i].store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
            let _ = socket.send_to(&query(i as u16, &name, rtype::A), server);
            if i % FLOOD_PER_MS == FLOOD_PER_MS - 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent.store(true, Ordering::Release);
        reader.join().unwrap()
    })
}

impl std::fmt::Debug for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} REFUSED, {} SERVFAIL, {} other",
            self.refused, self.servfail, self.other
        )
    }
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    values.sort();
    let index = ((values.len() as f64 * p).ceil() as usize).saturating_sub(1);
    values.get(index).copied().unwrap_or_default()
}

#[test]
fn a_forward_without_max_concurrent_gets_the_default_and_zero_opts_out() {
    let forward = |text: &str| {
        let config = corefile::parse(text, std::path::Path::new("Corefile")).unwrap();
        config.blocks[0].forward.clone().unwrap()
    };
    assert_eq!(
        Forward::new(".".into(), Vec::new()).max_concurrent,
        Some(DEFAULT_MAX_CONCURRENT)
    );
    let plain = forward(".:53 {\n forward . 10.0.0.1\n}\n");
    assert_eq!(plain.max_concurrent, Some(DEFAULT_MAX_CONCURRENT));
    let unlimited = forward(".:53 {\n forward . 10.0.0.1 {\n  max_concurrent 0\n }\n}\n");
    assert_eq!(unlimited.max_concurrent, None, "0 is the explicit opt-out");
    let set = forward(".:53 {\n forward . 10.0.0.1 {\n  max_concurrent 50\n }\n}\n");
    assert_eq!(set.max_concurrent, Some(50));
}

#[test]
fn random_name_flood_leaves_hits_fast_and_the_process_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    // Both ends of every socket live in this process: more than a soft limit of 1024 allows.
    let nofile = agentkit::process::raise_nofile().unwrap();
    let needed = DEFAULT_MAX_CONCURRENT + 2 * (MAX_TCP_CONNECTIONS + EXTRA_TCP) + 2 * SLACK_FDS;
    assert!(
        nofile >= needed as u64,
        "open-file limit {nofile}, the test needs {needed}"
    );
    let rt = runtime();
    let upstream = SlowUpstream::start();
    let listener = Listener::start(&rt, &Forward::new(".".into(), vec![upstream.addr]));
    let server = listener.addr;

    // Warm the cache, then take the baseline.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for (i, name) in WARM.iter().enumerate() {
        let reply = ask(&client, server, i as u16, name).unwrap();
        assert_eq!(rcode_of(&reply), rcode::NOERROR, "{name}");
        assert_eq!(ancount(&reply), 1, "{name}");
    }
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let base = Usage::now(&rt);

    // TCP connections that never send: the cap's worth, and more that must be refused.
    let opened = Instant::now();
    let idle: Vec<TcpStream> = (0..MAX_TCP_CONNECTIONS + EXTRA_TCP)
        .map(|_| TcpStream::connect(server).unwrap())
        .collect();

    // The flood, with the cached names asked throughout; the process sampled meanwhile.
    let sent = Arc::new(AtomicBool::new(false));
    let (stop_probing, stop_reading) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let prober = probe_hits(server, Arc::clone(&stop_probing));
    let flooder = flood(server, Arc::clone(&sent), Arc::clone(&stop_reading));
    let mut peak = base;
    let sample_until = |peak: &mut Usage, until: &dyn Fn() -> bool, limit: Duration| {
        let start = Instant::now();
        while !until() && start.elapsed() < limit {
            *peak = peak.max(Usage::now(&rt));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    sample_until(
        &mut peak,
        &|| sent.load(Ordering::Acquire),
        Duration::from_secs(60),
    );
    assert!(
        sent.load(Ordering::Acquire),
        "the flood was sent within 60 s"
    );
    // Hits keep being asked a little longer, while the admitted queries still hold slots.
    sample_until(&mut peak, &|| false, Duration::from_millis(500));
    stop_probing.store(true, Ordering::Release);
    let (latencies, failures) = prober.join().unwrap();
    // The admitted queries run into their deadlines, the idle TCP connections into theirs.
    let settled =
        (opened + TCP_IDLE).max(Instant::now() + OVERALL_TIMEOUT) + Duration::from_secs(1);
    sample_until(
        &mut peak,
        &|| Instant::now() >= settled,
        Duration::from_secs(30),
    );
    stop_reading.store(true, Ordering::Release);
    let report = flooder.join().unwrap();
    let stats = listener.zone.forwarder().stats();
    let hits_p99 = percentile(latencies.clone(), 0.99);
    let refused_p99 = percentile(report.refused_latencies.clone(), 0.99);

    // While it lasted, the process held no more than the caps allow: descriptors for the
    // upstream queries in flight and both ends of the TCP connections (ours only of the
    // refused ones); tasks for the misses in progress, their upstream queries and the TCP
    // connections; memory for all of those.
    let tcp_fds = 2 * MAX_TCP_CONNECTIONS + EXTRA_TCP;
    let fd_bound = base.fds + DEFAULT_MAX_CONCURRENT + tcp_fds + SLACK_FDS;
    let task_bound = base.tasks
        + MAX_PENDING_MISSES
        + DEFAULT_MAX_CONCURRENT
        + MAX_TCP_CONNECTIONS
        + SLACK_TASKS;
    let rss_bound = base.rss
        + DEFAULT_MAX_CONCURRENT as u64 * BYTES_PER_UPSTREAM_QUERY
        + MAX_PENDING_MISSES as u64 * BYTES_PER_WAITER
        + MAX_TCP_CONNECTIONS as u64 * BYTES_PER_TCP_CONNECTION
        + SLACK_BYTES;
    eprintln!(
        "baseline {base:?}\npeak {peak:?}\nbounds: fds {fd_bound}, tasks {task_bound}, rss {rss_bound}\n\
         {} hits, p99 {hits_p99:?}, {failures} failed; flood: {report:?} (REFUSED p99 {refused_p99:?}); \
         forwarder rejects {}",
        latencies.len(),
        stats.max_concurrent_rejects,
    );
    assert!(
        peak.fds <= fd_bound,
        "descriptors: peak {} > {fd_bound}",
        peak.fds
    );
    assert!(
        peak.tasks <= task_bound,
        "tasks: peak {} > {task_bound}",
        peak.tasks
    );
    assert!(
        peak.rss <= rss_bound,
        "memory: peak {} > {rss_bound}",
        peak.rss
    );

    // Cached names: every one answered, at their usual latency.
    assert_eq!(failures, 0, "cached names unanswered during the flood");
    assert!(
        latencies.len() >= 100,
        "only {} hits measured",
        latencies.len()
    );
    assert!(hits_p99 < HIT_P99, "hit p99 {hits_p99:?} during the flood");

    // New names past the cap: REFUSED at once, and counted; the admitted ones SERVFAIL at
    // their deadline. (UDP on loopback may still lose a few replies under load.)
    assert!(report.refused > 0, "{report:?}");
    assert!(refused_p99 < HIT_P99, "REFUSED p99 {refused_p99:?}");
    assert_eq!(report.other, 0, "{report:?}");
    assert!(
        report.refused + report.servfail >= FLOOD_QUERIES * 99 / 100,
        "{report:?}"
    );
    assert!(stats.max_concurrent_rejects > 0);
    assert_eq!(
        listener.metric("node_local_dns_overloaded_total") as u64,
        stats.max_concurrent_rejects
    );

    // TCP: the surplus was closed at once and counted; the rest closed by the idle deadline.
    assert_eq!(
        listener.metric("node_local_dns_tcp_connections_refused_total") as usize,
        EXTRA_TCP
    );
    let mut closed = 0;
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match stream.read(&mut [0u8; 16]) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert_eq!(
        closed,
        MAX_TCP_CONNECTIONS + EXTRA_TCP,
        "closed by the server"
    );

    // And afterwards it is back where it started (the upstream is down: one probe task).
    let after = Usage::now(&rt);
    eprintln!("after {after:?}");
    assert!(
        after.fds <= base.fds + 8,
        "descriptors after: {after:?} vs {base:?}"
    );
    assert!(
        after.tasks <= base.tasks + 8,
        "tasks after: {after:?} vs {base:?}"
    );
    assert!(after.rss <= rss_bound, "memory after: {after:?}");
    assert!(!listener.busy(), "nothing in flight any more");
    drop(listener);
    drop(upstream);
}

#[test]
fn tcp_client_that_never_reads_loses_the_connection_after_the_write_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let upstream = SlowUpstream::start();
    let listener = Listener::start(&rt, &Forward::new(".".into(), vec![upstream.addr]));
    let server = listener.addr;
    // Cache the big answer (over UDP it comes truncated; the cache holds it whole).
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let reply = ask_type(&client, server, 1, BIG, rtype::TXT).unwrap();
    assert_eq!(rcode_of(&reply), rcode::NOERROR);

    // A client with a small receive buffer sends many queries for it and never reads: the
    // replies (about 6 KB each, 30 MB in all) fill both socket buffers and the server's write
    // stalls.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let start = Instant::now();
    let mut queries = Vec::new();
    for id in 0..5000u16 {
        let q = query(id, BIG, rtype::TXT);
        queries.extend_from_slice(&(q.len() as u16).to_be_bytes());
        queries.extend_from_slice(&q);
    }
    // Best effort: the server reads queries only as it answers them.
    let _ = stream.write_all(&queries);
    std::thread::sleep(Duration::from_secs(2).saturating_sub(start.elapsed()));
    assert!(
        listener.busy(),
        "the connection is held while the write is pending"
    );
    let limit = start + TCP_WRITE_TIMEOUT + Duration::from_secs(5);
    while listener.busy() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed_after = start.elapsed();
    assert!(
        !listener.busy(),
        "still open {closed_after:?} after the client stopped reading"
    );
    assert!(
        closed_after >= TCP_WRITE_TIMEOUT,
        "closed after {closed_after:?}, before the write deadline"
    );
    drop(stream);
    drop(listener);
    drop(upstream);
}

#[test]
fn waiters_on_a_query_in_flight_do_not_count_against_max_concurrent() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = runtime();
    let upstream = SlowUpstream::start();
    let listener = Listener::start(
        &rt,
        &Forward {
            max_concurrent: Some(1),
            attempt_timeout: Duration::from_millis(300),
            ..Forward::new(".".into(), vec![upstream.addr])
        },
    );
    let server = listener.addr;
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // 50 clients ask the same name the upstream never answers: one upstream query, held.
    let waiters = 50u16;
    for id in 0..waiters {
        client
            .send_to(&query(id, "slow.flood.test.", rtype::A), server)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    // Another name finds the only slot taken: REFUSED at once.
    let start = Instant::now();
    client
        .send_to(&query(1000, "other.flood.test.", rtype::A), server)
        .unwrap();
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + Duration::from_secs(5);
    while replies.len() < usize::from(waiters) + 1 && Instant::now() < deadline {
        if let Ok(n) = client.recv(&mut buf) {
            replies.push((
                u16::from_be_bytes([buf[0], buf[1]]),
                rcode_of(&buf[..n]),
                start.elapsed(),
            ));
        }
    }
    let other = replies.iter().find(|(id, ..)| *id == 1000).unwrap();
    assert_eq!(other.1, rcode::REFUSED);
    assert!(other.2 < HIT_P99, "REFUSED after {:?}", other.2);
    let waited: Vec<_> = replies.iter().filter(|(id, ..)| *id < waiters).collect();
    assert_eq!(waited.len(), usize::from(waiters));
    assert!(
        waited.iter().all(|(_, rcode, _)| *rcode == rcode::SERVFAIL),
        "{waited:?}"
    );
    assert_eq!(listener.zone.forwarder().stats().max_concurrent_rejects, 1);
    assert_eq!(
        listener.metric("node_local_dns_coalesced_total") as u16,
        waiters - 1
    );
    drop(listener);
    drop(upstream);
}
