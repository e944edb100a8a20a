//! The forwarder with real sockets against scripted upstreams: TCP pipelining and pooling,
//! broken and expiring connections, failover and health checks, policies, max_concurrent,
//! spoofed responses and the transport rules.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_local_dns::config::{Forward, Policy};
use node_local_dns::forward::{ForwardError, Forwarder};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, parse_response, rtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

type Script = dyn Fn(&[u8], bool) -> Vec<Vec<u8>> + Send + Sync;
type Delay = dyn Fn(&[u8]) -> Duration + Send + Sync;
/// Queries received: (packet, over TCP).
type Log = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

/// A scripted upstream on UDP and TCP (same port). TCP connections are pipelined: every
/// query is answered on its own task after `delay(query)`, so answers may come out of order.
struct Upstream {
    addr: SocketAddr,
    /// Every query received: (packet, over TCP).
    log: Log,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    /// When the upstream saw a TCP connection end.
    closed_at: Arc<Mutex<Vec<Instant>>>,
    /// False: read everything, answer nothing (a black hole).
    alive: Arc<AtomicBool>,
}

struct Options {
    script: Arc<Script>,
    delay: Arc<Delay>,
    /// The first TCP connection reads this many queries, answers none and closes.
    kill_first_conn_after: Option<usize>,
}

impl Options {
    fn answering() -> Self {
        Options {
            script: Arc::new(|q: &[u8], _| vec![a_answer(q)]),
            delay: Arc::new(|_: &[u8]| Duration::ZERO),
            kill_first_conn_after: None,
        }
    }
}

impl Upstream {
    /// Queries for `name` (any case) received, as (over TCP) flags in arrival order.
    fn asked(&self, name: &str) -> Vec<bool> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(q, _)| {
                parse_query(q)
                    .unwrap()
                    .qname_text()
                    .eq_ignore_ascii_case(name)
            })
            .map(|&(_, tcp)| tcp)
            .collect()
    }

    /// A queries received (health probes are NS).
    fn a_queries(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(q, _)| parse_query(q).unwrap().qtype == rtype::A)
            .count()
    }
}

async fn upstream(options: Options) -> Upstream {
    let (udp, tcp) = agentkit::testing::tokio_udp_and_tcp([127, 0, 0, 1].into());
    let udp = Arc::new(udp);
    let addr = udp.local_addr().unwrap();
    let up = Upstream {
        addr,
        log: Arc::default(),
        conns: Arc::default(),
        closed_at: Arc::default(),
        alive: Arc::new(AtomicBool::new(true)),
    };
    let (log, alive) = (Arc::clone(&up.log), Arc::clone(&up.alive));
    let (script, delay) = (Arc::clone(&options.script), Arc::clone(&options.delay));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            let packet = buf[..n].to_vec();
            log.lock().unwrap().push((packet.clone(), false));
            if !alive.load(Ordering::SeqCst) {
                continue;
            }
            let (udp, script, delay) = (Arc::clone(&udp), Arc::clone(&script), Arc::clone(&delay));
            tokio::spawn(async move {
                tokio::time::sleep(delay(&packet)).await;
                for resp in script(&packet, false) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            });
        }
    });
    let (log, alive, conns, closed_at) = (
        Arc::clone(&up.log),
        Arc::clone(&up.alive),
        Arc::clone(&up.conns),
        Arc::clone(&up.closed_at),
    );
    tokio::spawn(async move {
        loop {
            let (stream, _) = tcp.accept().await.unwrap();
            let number = conns.fetch_add(1, Ordering::SeqCst);
            let kill_after = options.kill_first_conn_after.filter(|_| number == 0);
            let (log, alive, closed_at) =
                (Arc::clone(&log), Arc::clone(&alive), Arc::clone(&closed_at));
            let (script, delay) = (Arc::clone(&options.script), Arc::clone(&options.delay));
            tokio::spawn(async move {
                let (mut read, write) = stream.into_split();
                let write = Arc::new(tokio::sync::Mutex::new(write));
                let mut seen = 0;
                while let Ok(len) = read.read_u16().await {
                    let mut packet = vec![0u8; usize::from(len)];
                    if read.read_exact(&mut packet).await.is_err() {
                        break;
                    }
                    log.lock().unwrap().push((packet.clone(), true));
                    seen += 1;
                    if kill_after == Some(seen) {
                        let _ = write.lock().await.shutdown().await;
                        break;
                    }
                    if kill_after.is_some() || !alive.load(Ordering::SeqCst) {
                        continue;
                    }
                    let (write, script, delay) =
                        (Arc::clone(&write), Arc::clone(&script), Arc::clone(&delay));
                    tokio::spawn(async move {
                        tokio::time::sleep(delay(&packet)).await;
                        for resp in script(&packet, true) {
                            let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&resp);
                            let _ = write.lock().await.write_all(&framed).await;
                        }
                    });
                }
                closed_at.lock().unwrap().push(Instant::now());
            });
        }
    });
    up
}

/// An A answer whose address encodes the first label when it is `q<N>` (else 10.0.0.1).
fn a_answer(query: &[u8]) -> Vec<u8> {
    let name = parse_query(query).unwrap().qname_text();
    ResponseBuilder::new(query)
        .answer(&name, rtype::A, 60, &address_for(&name))
        .build()
}

fn address_for(name: &str) -> [u8; 4] {
    let n: u16 = name
        .strip_prefix('q')
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let [hi, lo] = n.to_be_bytes();
    [10, 0, hi, lo]
}

fn client_query(name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(rand::random(), name, rtype::A, None, &mut q);
    q
}

/// Forwards a query for `name`; on success checks that the response answers it.
async fn ask(
    fwd: &Forwarder,
    name: &str,
    tcp: bool,
) -> Result<(SocketAddr, Vec<u8>), ForwardError> {
    let packet = client_query(name);
    let query = parse_query(&packet).unwrap();
    let exchange = fwd.forward(&query, tcp).await?;
    let sent = parse_query(&exchange.query).unwrap();
    assert!(parse_response(&sent, &exchange.response).is_ok());
    Ok((exchange.upstream, exchange.response))
}

fn config(to: Vec<SocketAddr>) -> Forward {
    Forward {
        attempt_timeout: Duration::from_millis(300),
        health_check: Duration::from_millis(100),
        ..Forward::new(".".into(), to)
    }
}

/// Polls `cond` every 20 ms for at most `limit`.
async fn eventually(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_tcp_queries_are_answered_out_of_order_over_few_connections() {
    let up = upstream(Options {
        // Later queries are answered first.
        delay: Arc::new(|q: &[u8]| {
            let name = parse_query(q).unwrap().qname_text();
            Duration::from_millis(u64::from(200 - 3 * address_for(&name)[3]))
        }),
        ..Options::answering()
    })
    .await;
    let fwd = Arc::new(Forwarder::new(&config(vec![up.addr])));
    let tasks: Vec<_> = (0..50u8)
        .map(|i| {
            let fwd = Arc::clone(&fwd);
            tokio::spawn(async move { ask(&fwd, &format!("q{i}.s1.test"), true).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (_, response) = task.await.unwrap().unwrap();
        assert!(
            response.windows(4).any(|w| w == [10, 0, 0, i as u8]),
            "query {i} got its own answer"
        );
    }
    let conns = up.conns.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&conns),
        "50 queries over {conns} connections"
    );
    assert_eq!(up.asked("q7.s1.test."), vec![true]);
    let stats = fwd.stats();
    assert_eq!(stats.conn_cache_misses as usize, conns);
    assert_eq!(stats.conn_cache_hits as usize, 50 - conns);
    assert_eq!(stats.dropped, 0);
}

#[tokio::test]
async fn a_connection_closed_mid_flight_fails_its_queries_over_to_a_fresh_one() {
    let up = upstream(Options {
        kill_first_conn_after: Some(3),
        delay: Arc::new(|_: &[u8]| Duration::from_millis(20)),
        ..Options::answering()
    })
    .await;
    let fwd = Arc::new(Forwarder::new(&Forward {
        attempt_timeout: Duration::from_secs(2),
        ..config(vec![up.addr])
    }));
    let start = Instant::now();
    let tasks: Vec<_> = (0..10u8)
        .map(|i| {
            let fwd = Arc::clone(&fwd);
            tokio::spawn(async move { ask(&fwd, &format!("q{i}.s1.test"), true).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (_, response) = task.await.unwrap().unwrap();
        assert!(response.windows(4).any(|w| w == [10, 0, 0, i as u8]));
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "failed fast, not after the attempt timeout: {:?}",
        start.elapsed()
    );
    assert!(up.conns.load(Ordering::SeqCst) >= 2);
    assert!(fwd.stats().upstreams[0].healthy);
}

#[tokio::test]
async fn an_idle_pooled_connection_is_reused_then_closed_after_expire() {
    let up = upstream(Options::answering()).await;
    let expire = Duration::from_millis(400);
    let fwd = Forwarder::new(&Forward {
        expire,
        ..config(vec![up.addr])
    });
    ask(&fwd, "a.s1.test", true).await.unwrap();
    ask(&fwd, "b.s1.test", true).await.unwrap();
    let answered = Instant::now();
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "reused");
    let stats = fwd.stats();
    assert_eq!((stats.conn_cache_hits, stats.conn_cache_misses), (1, 1));
    assert_eq!(stats.upstreams[0].connections, 1);
    assert!(
        eventually(Duration::from_secs(3), || !up
            .closed_at
            .lock()
            .unwrap()
            .is_empty())
        .await,
        "closed when idle"
    );
    let idle = up.closed_at.lock().unwrap()[0] - answered;
    assert!(
        idle >= expire - Duration::from_millis(20),
        "not before expire: {idle:?}"
    );
    assert!(
        idle < expire + Duration::from_secs(1),
        "soon after expire: {idle:?}"
    );
    assert_eq!(fwd.stats().upstreams[0].connections, 0);
    ask(&fwd, "c.s1.test", true).await.unwrap();
    assert_eq!(up.conns.load(Ordering::SeqCst), 2, "a new connection");
}

#[tokio::test]
async fn a_dead_upstream_is_failed_over_marked_down_and_revived_by_the_health_check() {
    let dead = upstream(Options::answering()).await;
    dead.alive.store(false, Ordering::SeqCst);
    let good = upstream(Options::answering()).await;
    let attempt_timeout = Duration::from_millis(600);
    let fwd = Forwarder::new(&Forward {
        policy: Policy::Sequential,
        attempt_timeout,
        ..config(vec![dead.addr, good.addr])
    });
    let start = Instant::now();
    let (from, _) = ask(&fwd, "a.s1.test", false).await.unwrap();
    assert_eq!(from, good.addr);
    assert!(start.elapsed() >= attempt_timeout, "waited for the first");
    // Probes fail too; the upstream goes down.
    assert!(eventually(Duration::from_secs(3), || !fwd.stats().upstreams[0].healthy).await);
    assert!(fwd.stats().upstreams[0].healthcheck_failures >= 1);
    let asked_dead = dead.a_queries();
    let start = Instant::now();
    let (from, _) = ask(&fwd, "b.s1.test", false).await.unwrap();
    assert_eq!(from, good.addr);
    assert!(
        start.elapsed() < attempt_timeout,
        "no timeout: {:?}",
        start.elapsed()
    );
    assert_eq!(dead.a_queries(), asked_dead, "a down upstream is skipped");
    // It answers again: the probe marks it up and sequential order prefers it.
    dead.alive.store(true, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(3), || fwd.stats().upstreams[0].healthy).await);
    let (from, _) = ask(&fwd, "c.s1.test", false).await.unwrap();
    assert_eq!(from, dead.addr);
    assert_eq!(fwd.stats().healthcheck_broken, 0);
}

#[tokio::test]
async fn a_closed_port_is_failed_over_at_once() {
    let closed = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    let good = upstream(Options::answering()).await;
    let fwd = Forwarder::new(&Forward {
        policy: Policy::Sequential,
        attempt_timeout: Duration::from_secs(2),
        ..config(vec![closed, good.addr])
    });
    let start = Instant::now();
    let (from, _) = ask(&fwd, "a.s1.test", false).await.unwrap();
    assert_eq!(from, good.addr);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "ICMP refused, no timeout"
    );
    let (from, _) = ask(&fwd, "b.s1.test", true).await.unwrap();
    assert_eq!(from, good.addr, "TCP: connection refused");
}

#[tokio::test]
async fn with_every_upstream_down_one_is_asked_anyway() {
    let up = upstream(Options::answering()).await;
    up.alive.store(false, Ordering::SeqCst);
    let fwd = Forwarder::new(&Forward {
        max_fails: 1,
        health_check: Duration::from_secs(60),
        ..config(vec![up.addr])
    });
    assert!(matches!(
        ask(&fwd, "a.s1.test", false).await,
        Err(ForwardError::NoAnswer)
    ));
    assert!(!fwd.stats().upstreams[0].healthy);
    up.alive.store(true, Ordering::SeqCst);
    let (from, _) = ask(&fwd, "b.s1.test", false).await.unwrap();
    assert_eq!(from, up.addr);
    let stats = fwd.stats();
    assert!(stats.healthcheck_broken >= 1);
    assert!(stats.upstreams[0].healthy, "an answer resets the failures");
}

#[tokio::test]
async fn sequential_sticks_to_the_first_and_round_robin_rotates() {
    let one = upstream(Options::answering()).await;
    let two = upstream(Options::answering()).await;
    let sequential = Forwarder::new(&Forward {
        policy: Policy::Sequential,
        ..config(vec![one.addr, two.addr])
    });
    for i in 0..6 {
        let (from, _) = ask(&sequential, &format!("s{i}.test"), false)
            .await
            .unwrap();
        assert_eq!(from, one.addr);
    }
    let round_robin = Forwarder::new(&Forward {
        policy: Policy::RoundRobin,
        ..config(vec![one.addr, two.addr])
    });
    let mut from = Vec::new();
    for i in 0..6 {
        from.push(
            ask(&round_robin, &format!("r{i}.test"), false)
                .await
                .unwrap()
                .0,
        );
    }
    assert_eq!(from.iter().filter(|&&a| a == one.addr).count(), 3);
    assert_ne!(from[0], from[1], "alternates");
    let random = Forwarder::new(&Forward {
        policy: Policy::Random,
        ..config(vec![one.addr, two.addr])
    });
    let mut to_one = 0;
    for i in 0..40 {
        if ask(&random, &format!("x{i}.test"), false).await.unwrap().0 == one.addr {
            to_one += 1;
        }
    }
    assert!((1..40).contains(&to_one), "random uses both: {to_one}/40");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_rejects_at_once_and_is_no_health_failure() {
    let up = upstream(Options {
        delay: Arc::new(|_: &[u8]| Duration::from_millis(500)),
        ..Options::answering()
    })
    .await;
    let fwd = Arc::new(Forwarder::new(&Forward {
        max_concurrent: Some(2),
        attempt_timeout: Duration::from_secs(2),
        ..config(vec![up.addr])
    }));
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let fwd = Arc::clone(&fwd);
            tokio::spawn(async move { ask(&fwd, &format!("slow{i}.test"), false).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(2), || up.a_queries() == 2).await);
    let start = Instant::now();
    assert!(matches!(
        ask(&fwd, "third.test", false).await,
        Err(ForwardError::Overloaded)
    ));
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "not after the slow ones"
    );
    for task in slow {
        task.await.unwrap().unwrap();
    }
    let stats = fwd.stats();
    assert_eq!(stats.max_concurrent_rejects, 1);
    assert_eq!(stats.upstreams[0].fails, 0);
    ask(&fwd, "fourth.test", false).await.unwrap();
}

#[tokio::test]
async fn spoofed_and_mismatched_responses_are_dropped_and_the_real_answer_wins() {
    let script = |q: &[u8], _| {
        let mut wrong_id = a_answer(q);
        wrong_id[0] ^= 0xff;
        let mut other = Vec::new();
        build_query(
            u16::from_be_bytes([q[0], q[1]]),
            "evil.test",
            rtype::A,
            None,
            &mut other,
        );
        let other_name = ResponseBuilder::new(&other)
            .answer("evil.test", rtype::A, 60, &[6, 6, 6, 6])
            .build();
        vec![wrong_id, other_name, a_answer(q)]
    };
    let up = upstream(Options {
        script: Arc::new(script),
        ..Options::answering()
    })
    .await;
    let fwd = Forwarder::new(&config(vec![up.addr]));
    for (i, tcp) in [false, true].into_iter().enumerate() {
        let (_, response) = ask(&fwd, "q9.s1.test", tcp).await.unwrap();
        assert!(
            response.windows(4).any(|w| w == [10, 0, 0, 9]),
            "genuine, tcp={tcp}"
        );
        assert!(!response.windows(4).any(|w| w == [6, 6, 6, 6]));
        assert_eq!(fwd.stats().dropped, 2 * (i as u64 + 1), "tcp={tcp}");
    }
}

#[tokio::test]
async fn transport_follows_the_client_force_tcp_prefer_udp_and_truncation() {
    let script = |q: &[u8], tcp: bool| {
        let name = parse_query(q).unwrap().qname_text();
        if name.starts_with("big") && !tcp {
            return vec![ResponseBuilder::new(q).truncated(true).build()];
        }
        vec![a_answer(q)]
    };
    let up = upstream(Options {
        script: Arc::new(script),
        ..Options::answering()
    })
    .await;
    let plain = Forwarder::new(&config(vec![up.addr]));
    ask(&plain, "udp.test", false).await.unwrap();
    assert_eq!(up.asked("udp.test."), vec![false]);
    ask(&plain, "tcp.test", true).await.unwrap();
    assert_eq!(
        up.asked("tcp.test."),
        vec![true],
        "a TCP client is forwarded over TCP"
    );
    let (_, response) = ask(&plain, "big.test", false).await.unwrap();
    assert_eq!(
        up.asked("big.test."),
        vec![false, true],
        "truncated: again over TCP"
    );
    assert_eq!(response[2] & 0x02, 0, "the full answer");
    let force_tcp = Forwarder::new(&Forward {
        force_tcp: true,
        ..config(vec![up.addr])
    });
    ask(&force_tcp, "force.test", false).await.unwrap();
    assert_eq!(up.asked("force.test."), vec![true]);
    let prefer_udp = Forwarder::new(&Forward {
        prefer_udp: true,
        ..config(vec![up.addr])
    });
    ask(&prefer_udp, "prefer.test", true).await.unwrap();
    assert_eq!(up.asked("prefer.test."), vec![false]);
    ask(&prefer_udp, "big2.test", true).await.unwrap();
    assert_eq!(up.asked("big2.test."), vec![false, true]);
}

#[tokio::test]
async fn probes_are_ns_queries_and_stop_when_the_forwarder_is_dropped() {
    let up = upstream(Options::answering()).await;
    up.alive.store(false, Ordering::SeqCst);
    let fwd = Forwarder::new(&Forward {
        health_check: Duration::from_millis(50),
        health_check_domain: "probe.example.".into(),
        health_check_no_rec: true,
        attempt_timeout: Duration::from_millis(100),
        ..config(vec![up.addr])
    });
    assert!(ask(&fwd, "a.s1.test", false).await.is_err());
    let probes = || up.asked("probe.example.").len();
    assert!(eventually(Duration::from_secs(2), || probes() >= 2).await);
    {
        let log = up.log.lock().unwrap();
        let (probe, tcp) = log
            .iter()
            .find(|(q, _)| parse_query(q).unwrap().qtype == rtype::NS)
            .unwrap();
        let probe = parse_query(probe).unwrap();
        assert!(!tcp);
        assert!(!probe.recursion_desired, "no_rec");
    }
    drop(fwd);
    // A probe in flight may still finish (one timeout), then nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_drop = probes();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        probes(),
        after_drop,
        "no probes after the forwarder is gone"
    );
}
