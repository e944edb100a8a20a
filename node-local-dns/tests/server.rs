//! The server with real sockets against a scripted upstream: miss then hit, 0x20 echo,
//! single flight, truncation and TCP fallback, spoofed responses, dead upstreams, serve-stale.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use node_local_dns::cache::{Policy, ServeStale, StaleMode};
use node_local_dns::config::Forward;
use node_local_dns::forward::Forwarder;
use node_local_dns::server::{bind, Server, Zone};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, rcode, rtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

type Script = dyn Fn(&[u8], bool) -> Vec<Vec<u8>> + Send + Sync;

/// An upstream on UDP and TCP (same port) that answers by `script(query, tcp)` after `delay`.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
}

async fn upstream(delay: Duration, script: Arc<Script>) -> Upstream {
    let (udp, tcp) = agentkit::testing::tokio_udp_and_tcp([127, 0, 0, 1].into());
    let udp = Arc::new(udp);
    let addr = udp.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let (q, s) = (Arc::clone(&queries), Arc::clone(&script));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            let (udp, s, packet) = (Arc::clone(&udp), Arc::clone(&s), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for resp in s(&packet, false) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            });
        }
    });
    let (q, s) = (Arc::clone(&queries), script);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let len = stream.read_u16().await.unwrap() as usize;
                let mut packet = vec![0u8; len];
                stream.read_exact(&mut packet).await.unwrap();
                if let Some(resp) = s(&packet, true).into_iter().next() {
                    stream
                        .write_all(&(resp.len() as u16).to_be_bytes())
                        .await
                        .unwrap();
                    stream.write_all(&resp).await.unwrap();
                }
            });
        }
    });
    Upstream { addr, queries }
}

fn a_answer(query: &[u8]) -> Vec<u8> {
    let name = parse_query(query).unwrap().qname_text();
    ResponseBuilder::new(query)
        .answer(&name, rtype::A, 60, &[10, 0, 0, 1])
        .compress(true)
        .build()
}

struct Dns {
    udp: SocketAddr,
    tcp: SocketAddr,
    zone: Arc<Zone>,
}

async fn serve(upstream: SocketAddr, policy: Policy) -> Dns {
    let zone = Arc::new(Zone::new(
        ".",
        policy,
        Forwarder::new(&Forward {
            attempt_timeout: Duration::from_secs(1),
            ..Forward::new(".".into(), vec![upstream])
        }),
    ));
    let server = Server::new(vec![Arc::clone(&zone)]);
    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    tokio::spawn(server.clone().serve_udp(udp));
    tokio::spawn(server.serve_tcp(tcp));
    Dns {
        udp: udp_addr,
        tcp: tcp_addr,
        zone,
    }
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(query, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf.truncate(n);
    buf
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&(query.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(query).await.unwrap();
    let len = s.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.unwrap();
    buf
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

#[tokio::test]
async fn miss_then_hit_with_the_question_echoed_as_sent() {
    let up = upstream(Duration::ZERO, Arc::new(|q: &[u8], _| vec![a_answer(q)])).await;
    let dns = serve(up.addr, Policy::default()).await;
    for (id, name) in [(1, "api.s1.test"), (2, "ApI.S1.tEsT"), (3, "API.S1.TEST")] {
        let q = query(id, name, rtype::A);
        let reply = ask_udp(dns.udp, &q).await;
        assert_eq!(&reply[..2], &id.to_be_bytes());
        assert_eq!(rcode_of(&reply), rcode::NOERROR);
        assert_eq!(ancount(&reply), 1);
        let qlen = parse_query(&q).unwrap().question.len();
        assert_eq!(
            &reply[12..12 + qlen],
            &q[12..12 + qlen],
            "0x20: question bytes echoed"
        );
    }
    assert_eq!(
        up.queries.load(Ordering::SeqCst),
        1,
        "one upstream query, then hits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_make_one_upstream_query() {
    let up = upstream(
        Duration::from_millis(300),
        Arc::new(|q: &[u8], _| vec![a_answer(q)]),
    )
    .await;
    let dns = serve(up.addr, Policy::default()).await;
    let mut tasks = Vec::new();
    for i in 0..50u16 {
        tasks.push(tokio::spawn(async move {
            ask_udp(dns.udp, &query(i, "hot.s1.test", rtype::A)).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let reply = t.await.unwrap();
        assert_eq!(&reply[..2], &(i as u16).to_be_bytes());
        assert_eq!(ancount(&reply), 1);
    }
    assert_eq!(up.queries.load(Ordering::SeqCst), 1, "single flight");
}

#[tokio::test]
async fn truncated_upstream_answers_are_fetched_over_tcp_and_clients_get_tc() {
    // 40 A records: too big for 512 bytes.
    let big = |q: &[u8], tcp: bool| {
        let name = parse_query(q).unwrap().qname_text();
        let mut b = ResponseBuilder::new(q).compress(true);
        if !tcp {
            return vec![b.truncated(true).build()];
        }
        for i in 0..40u8 {
            b = b.answer(&name, rtype::A, 60, &[10, 0, 1, i]);
        }
        vec![b.build()]
    };
    let up = upstream(Duration::ZERO, Arc::new(big)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let q = query(9, "big.s1.test", rtype::A);
    let udp_reply = ask_udp(dns.udp, &q).await;
    assert!(udp_reply[2] & 0x02 != 0, "TC=1 to a 512-byte client");
    assert_eq!(ancount(&udp_reply), 0);
    let tcp_reply = ask_tcp(dns.tcp, &q).await;
    assert_eq!(
        ancount(&tcp_reply),
        40,
        "TCP gets everything, from the cache"
    );
    assert_eq!(
        up.queries.load(Ordering::SeqCst),
        2,
        "one UDP try, one TCP fetch"
    );
}

#[tokio::test]
async fn spoofed_and_stray_responses_are_dropped() {
    let script = |q: &[u8], _| {
        let mut wrong_id = a_answer(q);
        wrong_id[0] ^= 0xff;
        let other_name = ResponseBuilder::new(&query(
            u16::from_be_bytes([q[0], q[1]]),
            "evil.test",
            rtype::A,
        ))
        .answer("evil.test", rtype::A, 60, &[6, 6, 6, 6])
        .build();
        vec![wrong_id, other_name, a_answer(q)]
    };
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let reply = ask_udp(dns.udp, &query(5, "api.s1.test", rtype::A)).await;
    assert_eq!(ancount(&reply), 1);
    assert!(
        reply.windows(4).any(|w| w == [10, 0, 0, 1]),
        "the genuine answer"
    );
    assert_eq!(dns.zone.forwarder().stats().dropped, 2);
}

#[tokio::test]
async fn dead_upstream_gives_servfail_and_serve_stale_covers_it() {
    let up_alive = Arc::new(AtomicBool::new(true));
    let alive = Arc::clone(&up_alive);
    let script = move |q: &[u8], _| {
        if !alive.load(Ordering::SeqCst) {
            return vec![];
        }
        let name = parse_query(q).unwrap().qname_text();
        vec![ResponseBuilder::new(q)
            .answer(&name, rtype::A, 1, &[10, 0, 0, 7])
            .build()]
    };
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let mut policy = Policy::default();
    policy.success.min_ttl = Duration::from_secs(1);
    policy.serve_stale = Some(ServeStale {
        max_stale: Duration::from_secs(3600),
        ttl: 30,
        mode: StaleMode::Immediate,
        failure_recheck: Duration::from_secs(30),
    });
    let dns = serve(up.addr, policy).await;
    let q = query(1, "stale.s1.test", rtype::A);
    assert_eq!(ancount(&ask_udp(dns.udp, &q).await), 1);
    up_alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = ask_udp(dns.udp, &q).await;
    assert_eq!(
        ancount(&reply),
        1,
        "stale answer while the upstream is down"
    );
    assert!(
        reply.windows(4).any(|w| w == [0, 0, 0, 30]),
        "stale TTL 30 (RFC 8767)"
    );
    // A name never seen: SERVFAIL after the upstream timeout.
    let reply = ask_udp(dns.udp, &query(2, "never.s1.test", rtype::A)).await;
    assert_eq!(rcode_of(&reply), rcode::SERVFAIL);
}

#[tokio::test]
async fn malformed_packets_get_formerr_and_garbage_is_ignored() {
    let up = upstream(Duration::ZERO, Arc::new(|q: &[u8], _| vec![a_answer(q)])).await;
    let dns = serve(up.addr, Policy::default()).await;
    let mut q = query(77, "api.s1.test", rtype::A);
    q.push(0); // trailing garbage
    let reply = ask_udp(dns.udp, &q).await;
    assert_eq!(&reply[..2], &77u16.to_be_bytes());
    assert_eq!(rcode_of(&reply), rcode::FORMERR);
    // Too short for a header: no answer; the server keeps serving.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&[1, 2, 3], dns.udp).await.unwrap();
    assert_eq!(
        ancount(&ask_udp(dns.udp, &query(78, "api.s1.test", rtype::A)).await),
        1
    );
    assert_eq!(up.queries.load(Ordering::SeqCst), 1);
}
