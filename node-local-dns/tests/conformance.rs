//! Protocol conformance of the server on real sockets against a scripted upstream, one test per
//! rule, each named by the RFC section it checks: negative caching (RFC 2308), serve-stale
//! (RFC 8767), UDP truncation (RFC 1035 §4.2.1, RFC 6891 §6.2.5), EDNS (RFC 6891), header
//! echo (RFC 1035 §4.1.1), DNS 0x20 case echo, single flight and the cache key.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_local_dns::cache::{Policy, ServeStale, StaleMode};
use node_local_dns::config::Forward;
use node_local_dns::forward::{Forwarder, ATTEMPTS_PER_UPSTREAM};
use node_local_dns::server::{bind, Server, Zone};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, rcode, rtype, Edns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The forwarder's per-upstream attempt timeout in these tests.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for any reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A little more than one second: a stored TTL has lost one full second.
const ONE_SECOND_AND_A_BIT: Duration = Duration::from_millis(1100);

/// The one place a forwarder is built (its constructor is about to take `&config::Forward`).
/// One upstream, no health checks (so the upstream's query count is the cache's doing).
fn forwarder(upstream: SocketAddr) -> Forwarder {
    Forwarder::new(&Forward {
        attempt_timeout: ATTEMPT_TIMEOUT,
        max_fails: 0,
        ..Forward::new(".".to_owned(), vec![upstream])
    })
}

type Script = dyn Fn(&[u8], bool) -> Vec<Vec<u8>> + Send + Sync;

/// A scripted upstream on UDP and TCP (same port): answers each query with `script(query,
/// tcp)` (nothing for an empty list: a dead upstream), counts and keeps the queries.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Upstream {
    fn count(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

async fn upstream(delay: Duration, script: Arc<Script>) -> Upstream {
    let (udp, tcp) = agentkit::testing::tokio_udp_and_tcp([127, 0, 0, 1].into());
    let udp = Arc::new(udp);
    let addr = udp.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (q, s, log) = (Arc::clone(&queries), Arc::clone(&script), Arc::clone(&seen));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            log.lock().unwrap().push(buf[..n].to_vec());
            let (udp, s, packet) = (Arc::clone(&udp), Arc::clone(&s), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for resp in s(&packet, false) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            });
        }
    });
    let (q, s, log) = (Arc::clone(&queries), script, Arc::clone(&seen));
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            let (s, log) = (Arc::clone(&s), Arc::clone(&log));
            tokio::spawn(async move {
                let len = stream.read_u16().await.unwrap() as usize;
                let mut packet = vec![0u8; len];
                stream.read_exact(&mut packet).await.unwrap();
                log.lock().unwrap().push(packet.clone());
                if let Some(resp) = s(&packet, true).into_iter().next() {
                    let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&resp);
                    let _ = stream.write_all(&framed).await;
                }
            });
        }
    });
    Upstream {
        addr,
        queries,
        seen,
    }
}

/// An upstream that answers every A query with `ttl` and 10.0.0.1, owner compressed.
async fn a_upstream(ttl: u32) -> Upstream {
    let script = move |q: &[u8], _| {
        let name = parse_query(q).unwrap().qname_text();
        vec![ResponseBuilder::new(q)
            .answer(&name, rtype::A, ttl, &[10, 0, 0, 1])
            .compress(true)
            .opt(1232)
            .build()]
    };
    upstream(Duration::ZERO, Arc::new(script)).await
}

struct Dns {
    udp: SocketAddr,
    tcp: SocketAddr,
}

async fn serve(upstream: SocketAddr, policy: Policy) -> Dns {
    let zone = Arc::new(Zone::new(".", policy, forwarder(upstream)));
    let server = Server::new(vec![zone]);
    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    tokio::spawn(server.clone().serve_udp(udp));
    tokio::spawn(server.serve_tcp(tcp));
    Dns {
        udp: udp_addr,
        tcp: tcp_addr,
    }
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(query, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.recv(&mut buf))
        .await
        .expect("a reply in time")
        .unwrap();
    buf.truncate(n);
    buf
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).await.unwrap();
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    s.write_all(&framed).await.unwrap();
    let exchange = async {
        let len = s.read_u16().await.unwrap() as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.unwrap();
        buf
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .expect("a reply in time")
}

fn query(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, qtype, edns, &mut q);
    q
}

fn edns(udp_size: u16, dnssec_ok: bool) -> Option<Edns> {
    Some(Edns {
        udp_size,
        version: 0,
        dnssec_ok,
    })
}

/// Appends an EDNS option to the OPT record that ends `message` (fixing its RDLENGTH).
fn push_option(message: &mut Vec<u8>, code: u16, data: &[u8]) {
    let at = message.len() - 2; // RDLENGTH of the last record, which must have no RDATA yet
    assert_eq!(&message[at..], [0, 0], "the OPT must be last and empty");
    message.extend_from_slice(&code.to_be_bytes());
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    let rdlen = (4 + data.len()) as u16;
    message[at..at + 2].copy_from_slice(&rdlen.to_be_bytes());
}

fn be16(m: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([m[at], m[at + 1]])
}

fn id(m: &[u8]) -> u16 {
    be16(m, 0)
}

fn rcode_of(m: &[u8]) -> u8 {
    m[3] & 0x0f
}

fn counts(m: &[u8]) -> [u16; 4] {
    [be16(m, 4), be16(m, 6), be16(m, 8), be16(m, 10)]
}

const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const CD: u16 = 0x0010;

fn flags(m: &[u8]) -> u16 {
    be16(m, 2)
}

/// One resource record of a message, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rr {
    /// 0 answer, 1 authority, 2 additional.
    section: usize,
    rtype: u16,
    class: u16,
    /// The raw TTL field (for OPT: extended rcode, version, flags).
    ttl: u32,
    rdata: Vec<u8>,
}

fn skip_name(m: &[u8], mut pos: usize) -> usize {
    loop {
        let len = m[pos];
        if len & 0xC0 == 0xC0 {
            return pos + 2;
        }
        pos += 1;
        if len == 0 {
            return pos;
        }
        pos += usize::from(len);
    }
}

/// The question bytes (qname, qtype, qclass) of a one-question message.
fn question(m: &[u8]) -> &[u8] {
    assert_eq!(be16(m, 4), 1, "one question");
    &m[12..skip_name(m, 12) + 4]
}

/// Every record of a one-question message, checking that they fill it exactly.
fn records(m: &[u8]) -> Vec<Rr> {
    let [_, an, ns, ar] = counts(m);
    let mut pos = 12 + question(m).len();
    let mut out = Vec::new();
    for (section, count) in [an, ns, ar].into_iter().enumerate() {
        for _ in 0..count {
            pos = skip_name(m, pos);
            let rdlen = usize::from(be16(m, pos + 8));
            out.push(Rr {
                section,
                rtype: be16(m, pos),
                class: be16(m, pos + 2),
                ttl: u32::from_be_bytes(m[pos + 4..pos + 8].try_into().unwrap()),
                rdata: m[pos + 10..pos + 10 + rdlen].to_vec(),
            });
            pos += 10 + rdlen;
        }
    }
    assert_eq!(pos, m.len(), "records fill the message");
    out
}

fn opts(m: &[u8]) -> Vec<Rr> {
    records(m)
        .into_iter()
        .filter(|r| r.rtype == rtype::OPT)
        .collect()
}

/// The TTLs of every record except OPT.
fn ttls(m: &[u8]) -> Vec<u32> {
    records(m)
        .into_iter()
        .filter(|r| r.rtype != rtype::OPT)
        .map(|r| r.ttl)
        .collect()
}

fn soa_in_authority(m: &[u8]) -> Option<Rr> {
    records(m)
        .into_iter()
        .find(|r| r.section == 1 && r.rtype == rtype::SOA)
}

/// A negative answer to `q`: `rcode` and, if `soa` is (TTL, MINIMUM), an SOA for `test.`.
fn negative(q: &[u8], rcode: u8, soa: Option<(u32, u32)>) -> Vec<u8> {
    let mut b = ResponseBuilder::new(q).rcode(rcode);
    if let Some((ttl, minimum)) = soa {
        b = b.authority(
            "test.",
            rtype::SOA,
            ttl,
            &ResponseBuilder::soa_rdata("ns.test.", "hostmaster.test.", minimum),
        );
    }
    b.opt(1232).build()
}

fn short_ttl_policy() -> Policy {
    let mut policy = Policy::default();
    policy.success.min_ttl = Duration::from_secs(1);
    policy.denial.min_ttl = Duration::from_secs(1);
    policy
}

fn stale(mode: StaleMode, max_stale: Duration, ttl: u32, failure_recheck: Duration) -> Policy {
    Policy {
        serve_stale: Some(ServeStale {
            max_stale,
            ttl,
            mode,
            failure_recheck,
        }),
        ..short_ttl_policy()
    }
}

/// An upstream that answers A queries with TTL 1 and 10.0.0.N, N counting its answers, while
/// `alive`; silent otherwise.
async fn flaky_upstream(alive: Arc<AtomicBool>) -> (Upstream, Arc<AtomicU8>) {
    let answers = Arc::new(AtomicU8::new(0));
    let n = Arc::clone(&answers);
    let script = move |q: &[u8], _| {
        if !alive.load(Ordering::SeqCst) {
            return vec![];
        }
        let name = parse_query(q).unwrap().qname_text();
        let last = n.fetch_add(1, Ordering::SeqCst) + 1;
        vec![ResponseBuilder::new(q)
            .answer(&name, rtype::A, 1, &[10, 0, 0, last])
            .opt(1232)
            .build()]
    };
    (upstream(Duration::ZERO, Arc::new(script)).await, answers)
}

fn a_rdata(m: &[u8]) -> Vec<Vec<u8>> {
    records(m)
        .into_iter()
        .filter(|r| r.rtype == rtype::A)
        .map(|r| r.rdata)
        .collect()
}

// ---- RFC 2308: negative caching ----

#[tokio::test]
async fn rfc2308_s5_nxdomain_cached_with_soa_ttl_and_served_with_soa() {
    // SOA TTL 300, MINIMUM 60: the negative TTL is the smaller, 60.
    let script = |q: &[u8], _| vec![negative(q, rcode::NXDOMAIN, Some((300, 60)))];
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let miss = ask_udp(dns.udp, &query(1, "gone.test", rtype::A, None)).await;
    assert_eq!(rcode_of(&miss), rcode::NXDOMAIN);
    assert_eq!(soa_in_authority(&miss).unwrap().ttl, 60);
    let hit = ask_udp(dns.udp, &query(2, "gone.test", rtype::A, None)).await;
    assert_eq!(id(&hit), 2);
    assert_eq!(rcode_of(&hit), rcode::NXDOMAIN);
    let soa = soa_in_authority(&hit).expect("SOA in the authority section of a hit");
    assert!((59..=60).contains(&soa.ttl), "{}", soa.ttl);
    assert_eq!(up.count(), 1, "the second answer came from the cache");
}

#[tokio::test]
async fn rfc2308_s5_nodata_cached_with_soa_minimum() {
    // NOERROR, no answer, SOA TTL 40 and MINIMUM 900: the negative TTL is 40.
    let script = |q: &[u8], _| vec![negative(q, rcode::NOERROR, Some((40, 900)))];
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let miss = ask_udp(dns.udp, &query(1, "v4only.test", rtype::AAAA, None)).await;
    assert_eq!(rcode_of(&miss), rcode::NOERROR);
    assert_eq!(counts(&miss)[1], 0, "no answer");
    assert_eq!(soa_in_authority(&miss).unwrap().ttl, 40);
    let hit = ask_udp(dns.udp, &query(2, "v4only.test", rtype::AAAA, None)).await;
    assert_eq!(rcode_of(&hit), rcode::NOERROR);
    assert_eq!(counts(&hit)[1], 0);
    assert!(soa_in_authority(&hit).is_some());
    assert_eq!(up.count(), 1, "NODATA is cached");
}

#[tokio::test]
async fn rfc2308_s5_negative_ttl_capped_by_the_denial_max_ttl() {
    let script = |q: &[u8], _| vec![negative(q, rcode::NXDOMAIN, Some((3600, 3600)))];
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let mut policy = Policy::default();
    policy.denial.max_ttl = Duration::from_secs(20);
    let dns = serve(up.addr, policy).await;
    let miss = ask_udp(dns.udp, &query(1, "gone.test", rtype::A, None)).await;
    assert_eq!(soa_in_authority(&miss).unwrap().ttl, 20);
    let hit = ask_udp(dns.udp, &query(2, "gone.test", rtype::A, None)).await;
    assert!(soa_in_authority(&hit).unwrap().ttl <= 20);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn rfc2308_s5_nxdomain_without_soa_is_not_cached() {
    let script = |q: &[u8], _| vec![negative(q, rcode::NXDOMAIN, None)];
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    for i in 1..=3u16 {
        let reply = ask_udp(dns.udp, &query(i, "GoNe.test", rtype::A, None)).await;
        assert_eq!(id(&reply), i);
        assert_eq!(rcode_of(&reply), rcode::NXDOMAIN);
        assert_eq!(
            question(&reply),
            &query(i, "GoNe.test", rtype::A, None)[12..]
        );
        // The upstream's OPT is not passed on to a client that sent none (RFC 6891 §7).
        assert_eq!(counts(&reply), [1, 0, 0, 0], "no OPT to a non-EDNS client");
        assert_eq!(up.count(), usize::from(i), "asked again every time");
    }
}

#[tokio::test]
async fn rfc2308_s5_negative_ttl_decrements_on_hits() {
    let script = |q: &[u8], _| vec![negative(q, rcode::NXDOMAIN, Some((60, 60)))];
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let miss = ask_udp(dns.udp, &query(1, "gone.test", rtype::A, None)).await;
    assert_eq!(soa_in_authority(&miss).unwrap().ttl, 60);
    tokio::time::sleep(2 * ONE_SECOND_AND_A_BIT).await;
    let hit = ask_udp(dns.udp, &query(2, "gone.test", rtype::A, None)).await;
    let ttl = soa_in_authority(&hit).unwrap().ttl;
    assert!(
        (55..=57).contains(&ttl),
        "60 s less the 2.2 s it sat: {ttl}"
    );
    assert_eq!(up.count(), 1);
}

// ---- RFC 8767: serve-stale ----

#[tokio::test]
async fn rfc8767_s4_immediate_mode_answers_stale_with_the_stale_ttl_while_upstream_is_dead() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let policy = stale(
        StaleMode::Immediate,
        Duration::from_secs(3600),
        17,
        Duration::from_secs(30),
    );
    let dns = serve(up.addr, policy).await;
    let q = query(1, "stale.test", rtype::A, None);
    assert_eq!(ttls(&ask_udp(dns.udp, &q).await), [1]);
    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    let asked = Instant::now();
    let reply = ask_udp(dns.udp, &q).await;
    assert!(
        asked.elapsed() < ATTEMPT_TIMEOUT,
        "immediate: no wait for the upstream"
    );
    assert_eq!(rcode_of(&reply), rcode::NOERROR);
    assert_eq!(a_rdata(&reply), [vec![10, 0, 0, 1]]);
    assert_eq!(ttls(&reply), [17], "the configured stale TTL");
}

#[tokio::test]
async fn rfc8767_s4_default_stale_ttl_is_30() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let policy = stale(
        StaleMode::Immediate,
        Duration::from_secs(3600),
        node_local_dns::cache::DEFAULT_STALE_TTL,
        Duration::from_secs(30),
    );
    let dns = serve(up.addr, policy).await;
    let q = query(1, "stale.test", rtype::A, None);
    ask_udp(dns.udp, &q).await;
    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    assert_eq!(ttls(&ask_udp(dns.udp, &q).await), [30]);
}

#[tokio::test]
async fn rfc8767_s5_verify_mode_asks_the_upstream_first() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let policy = stale(
        StaleMode::Verify,
        Duration::from_secs(3600),
        30,
        Duration::from_secs(30),
    );
    let dns = serve(up.addr, policy).await;
    let q = query(1, "verify.test", rtype::A, None);
    assert_eq!(a_rdata(&ask_udp(dns.udp, &q).await), [vec![10, 0, 0, 1]]);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    // Expired, upstream alive: the fresh answer, not the stale one.
    let reply = ask_udp(dns.udp, &q).await;
    assert_eq!(a_rdata(&reply), [vec![10, 0, 0, 2]]);
    assert_eq!(ttls(&reply), [1]);
    assert_eq!(up.count(), 2);
    // Expired, upstream dead: stale, but only after the upstream had its chance.
    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    let asked = Instant::now();
    let reply = ask_udp(dns.udp, &q).await;
    assert!(
        asked.elapsed() >= ATTEMPT_TIMEOUT - Duration::from_millis(50),
        "verify: waited for the upstream ({:?})",
        asked.elapsed()
    );
    assert_eq!(up.count(), 2 + ATTEMPTS_PER_UPSTREAM);
    assert_eq!(a_rdata(&reply), [vec![10, 0, 0, 2]]);
    assert_eq!(ttls(&reply), [30]);
}

#[tokio::test]
async fn rfc8767_s4_beyond_max_stale_is_servfail() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let policy = stale(
        StaleMode::Immediate,
        Duration::from_secs(1),
        30,
        Duration::from_secs(30),
    );
    let dns = serve(up.addr, policy).await;
    let q = query(1, "old.test", rtype::A, None);
    ask_udp(dns.udp, &q).await;
    alive.store(false, Ordering::SeqCst);
    // TTL 1 s + max-stale 1 s are over.
    tokio::time::sleep(2 * ONE_SECOND_AND_A_BIT).await;
    let reply = ask_udp(dns.udp, &q).await;
    assert_eq!(rcode_of(&reply), rcode::SERVFAIL);
    assert_eq!(counts(&reply)[1], 0);
}

#[tokio::test]
async fn rfc8767_s5_failure_recheck_no_upstream_storm_while_down() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let policy = stale(
        StaleMode::Immediate,
        Duration::from_secs(3600),
        30,
        Duration::from_secs(30),
    );
    let dns = serve(up.addr, policy).await;
    let q = query(1, "down.test", rtype::A, None);
    ask_udp(dns.udp, &q).await;
    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    // 30 queries over 3 s: past the first refresh's failure, inside the recheck time.
    for i in 0..30u16 {
        let reply = ask_udp(dns.udp, &query(i, "down.test", rtype::A, None)).await;
        assert_eq!(ttls(&reply), [30]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        up.count(),
        1 + ATTEMPTS_PER_UPSTREAM,
        "one fill, one failed refresh (its attempts), then quiet"
    );
}

#[tokio::test]
async fn rfc8767_s5_refresh_is_retried_after_the_failure_recheck_time() {
    let alive = Arc::new(AtomicBool::new(true));
    let (up, _) = flaky_upstream(Arc::clone(&alive)).await;
    let recheck = Duration::from_secs(1);
    let policy = stale(StaleMode::Immediate, Duration::from_secs(3600), 30, recheck);
    let dns = serve(up.addr, policy).await;
    let q = query(1, "back.test", rtype::A, None);
    ask_udp(dns.udp, &q).await;
    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(ONE_SECOND_AND_A_BIT).await;
    // Stale; its refresh times out after ATTEMPT_TIMEOUT.
    assert_eq!(ttls(&ask_udp(dns.udp, &q).await), [30]);
    tokio::time::sleep(ATTEMPT_TIMEOUT * ATTEMPTS_PER_UPSTREAM as u32 + Duration::from_millis(200))
        .await;
    assert_eq!(up.count(), 1 + ATTEMPTS_PER_UPSTREAM);
    alive.store(true, Ordering::SeqCst);
    // Past the recheck time: the next stale answer starts a refresh, which now succeeds.
    tokio::time::sleep(recheck).await;
    assert_eq!(ttls(&ask_udp(dns.udp, &q).await), [30]);
    let mut fresh = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reply = ask_udp(dns.udp, &q).await;
        if ttls(&reply) != [30] {
            fresh = Some(reply);
            break;
        }
    }
    let fresh = fresh.expect("the refresh after the recheck time replaced the stale entry");
    assert_eq!(a_rdata(&fresh), [vec![10, 0, 0, 2]]);
    assert_eq!(up.count(), 2 + ATTEMPTS_PER_UPSTREAM);
}

// ---- RFC 1035 §4.2.1 and RFC 6891 §6.2.5: truncation ----

/// An upstream answering A queries with `n` records; over UDP it says TC when that would
/// exceed the requestor's size, as a real server does.
async fn big_upstream(n: u8) -> Upstream {
    let script = move |q: &[u8], tcp: bool| {
        let parsed = parse_query(q).unwrap();
        let name = parsed.qname_text();
        let mut b = ResponseBuilder::new(q).compress(true);
        for i in 0..n {
            b = b.answer(&name, rtype::A, 300, &[10, 0, 1, i]);
        }
        let full = b.opt(1232).build();
        if !tcp && full.len() > parsed.udp_limit() {
            return vec![ResponseBuilder::new(q).truncated(true).opt(1232).build()];
        }
        vec![full]
    };
    upstream(Duration::ZERO, Arc::new(script)).await
}

#[tokio::test]
async fn rfc1035_s4_2_1_udp_reply_over_512_without_edns_is_truncated_and_tcp_gets_it_all() {
    let up = big_upstream(40).await; // 12 + 14 + 40 × 16 + 11 ≈ 680 bytes
    let dns = serve(up.addr, Policy::default()).await;
    let q = query(7, "big.test", rtype::A, None);
    let udp = ask_udp(dns.udp, &q).await;
    assert!(udp.len() <= 512, "{} bytes", udp.len());
    assert_eq!(flags(&udp) & TC, TC);
    assert_eq!(id(&udp), 7);
    assert_eq!(counts(&udp), [1, 0, 0, 0]);
    assert_eq!(question(&udp), question(&q));
    let tcp = ask_tcp(dns.tcp, &q).await;
    assert_eq!(flags(&tcp) & TC, 0);
    assert_eq!(counts(&tcp), [1, 40, 0, 0]);
    assert_eq!(up.count(), 1, "TCP answered from the cache");
    // The same answer fits a client with EDNS 1232.
    let udp = ask_udp(dns.udp, &query(8, "big.test", rtype::A, edns(1232, false))).await;
    assert_eq!(flags(&udp) & TC, 0);
    assert_eq!(counts(&udp), [1, 40, 0, 1]);
}

#[tokio::test]
async fn rfc6891_s6_2_5_udp_reply_over_the_edns_size_is_truncated() {
    let up = big_upstream(60).await; // ≈ 1000 bytes
    let dns = serve(up.addr, Policy::default()).await;
    let small = query(1, "big.test", rtype::A, edns(800, true));
    let udp = ask_udp(dns.udp, &small).await;
    assert!(udp.len() <= 800, "{} bytes", udp.len());
    assert_eq!(flags(&udp) & TC, TC);
    assert_eq!(counts(&udp), [1, 0, 0, 1], "question and OPT only");
    let full = ask_udp(dns.udp, &query(2, "big.test", rtype::A, edns(1232, true))).await;
    assert_eq!(flags(&full) & TC, 0);
    assert_eq!(counts(&full)[1], 60);
    assert!(full.len() <= 1232);
    let tcp = ask_tcp(dns.tcp, &small).await;
    assert_eq!(flags(&tcp) & TC, 0);
    assert_eq!(counts(&tcp)[1], 60);
}

#[tokio::test]
async fn rfc6891_s6_2_5_udp_size_is_capped_at_ours() {
    let up = big_upstream(100).await; // ≈ 1640 bytes: TCP to the upstream
    let dns = serve(up.addr, Policy::default()).await;
    let q = query(1, "huge.test", rtype::A, edns(4096, false));
    let udp = ask_udp(dns.udp, &q).await;
    assert!(udp.len() <= 1232, "{} bytes", udp.len());
    assert_eq!(flags(&udp) & TC, TC);
    let tcp = ask_tcp(dns.tcp, &q).await;
    assert_eq!(counts(&tcp)[1], 100);
    assert_eq!(
        up.count(),
        2,
        "a UDP try, then TCP; the client's TCP retry hits the cache"
    );
}

// ---- RFC 6891: EDNS ----

#[tokio::test]
async fn rfc6891_s7_opt_is_rebuilt_per_reply_without_client_or_upstream_options() {
    let script = |q: &[u8], _| {
        let name = parse_query(q).unwrap().qname_text();
        let mut resp = ResponseBuilder::new(q)
            .answer(&name, rtype::A, 300, &[10, 0, 0, 1])
            .opt(4096)
            .build();
        push_option(&mut resp, 3, b"nsid"); // NSID from the upstream
        vec![resp]
    };
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    for (i, dnssec_ok) in [(1u16, true), (2, true), (3, false)] {
        let mut q = query(i, "opt.test", rtype::A, edns(4096, dnssec_ok));
        push_option(&mut q, 10, &[1, 2, 3, 4, 5, 6, 7, 8]); // a client cookie
        let reply = ask_udp(dns.udp, &q).await;
        let opt = opts(&reply);
        assert_eq!(opt.len(), 1, "exactly one OPT");
        assert_eq!(opt[0].class, 1232, "our UDP size");
        let do_bit = if dnssec_ok { 0x8000 } else { 0 };
        assert_eq!(opt[0].ttl, do_bit, "rcode 0, version 0, DO echoed");
        assert!(opt[0].rdata.is_empty(), "no options reflected");
        assert_eq!(records(&reply).last().unwrap().rtype, rtype::OPT);
    }
    // DO is part of the key: one fill with DO, one without.
    assert_eq!(up.count(), 2);
    for sent in up.seen.lock().unwrap().iter() {
        let sent_opt = opts(sent);
        assert_eq!(sent_opt.len(), 1);
        assert!(
            sent_opt[0].rdata.is_empty(),
            "the client's cookie stays here"
        );
    }
}

#[tokio::test]
async fn rfc6891_s7_no_opt_in_the_reply_when_the_query_had_none() {
    let script = |q: &[u8], _| {
        let parsed = parse_query(q).unwrap();
        let name = parsed.qname_text();
        let resp = match name.as_str() {
            "refused.test." => ResponseBuilder::new(q).rcode(rcode::REFUSED).opt(1232),
            "nodata.test." => ResponseBuilder::new(q).authority(
                "test.",
                rtype::SOA,
                60,
                &ResponseBuilder::soa_rdata("ns.test.", "h.test.", 60),
            ),
            _ => ResponseBuilder::new(q)
                .answer(&name, rtype::A, 60, &[10, 0, 0, 1])
                .opt(1232),
        };
        vec![resp.build()]
    };
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    for name in [
        "a.test",
        "a.test",
        "nodata.test",
        "nodata.test",
        "refused.test",
    ] {
        let reply = ask_udp(dns.udp, &query(1, name, rtype::A, None)).await;
        assert!(opts(&reply).is_empty(), "{name}: no OPT");
        let with = ask_udp(dns.udp, &query(1, name, rtype::A, edns(1232, false))).await;
        assert_eq!(opts(&with).len(), 1, "{name}: one OPT");
    }
    let refused = ask_udp(dns.udp, &query(1, "refused.test", rtype::A, None)).await;
    assert_eq!(rcode_of(&refused), rcode::REFUSED);
}

#[tokio::test]
async fn rfc6891_s6_1_3_edns_version_1_is_badvers_with_opt() {
    let up = a_upstream(60).await;
    let dns = serve(up.addr, Policy::default()).await;
    let q = query(
        0x4242,
        "a.test",
        rtype::A,
        Some(Edns {
            udp_size: 1232,
            version: 1,
            dnssec_ok: true,
        }),
    );
    for reply in [ask_udp(dns.udp, &q).await, ask_tcp(dns.tcp, &q).await] {
        assert_eq!(id(&reply), 0x4242);
        // BADVERS = 16: low 4 bits (0) in the header, the upper 8 bits (1) in the OPT.
        assert_eq!(rcode_of(&reply), 0);
        assert_eq!(counts(&reply), [1, 0, 0, 1]);
        let opt = &opts(&reply)[0];
        assert_eq!(opt.ttl >> 24, 1, "extended rcode 1");
        assert_eq!((opt.ttl >> 16) & 0xff, 0, "version 0: what we speak");
        assert_eq!(question(&reply), question(&q));
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn rfc6891_s6_1_1_two_opt_records_are_formerr() {
    let up = a_upstream(60).await;
    let dns = serve(up.addr, Policy::default()).await;
    let mut q = query(0x0B0B, "a.test", rtype::A, edns(1232, false));
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
    q[11] = 2;
    let reply = ask_udp(dns.udp, &q).await;
    assert_eq!(id(&reply), 0x0B0B);
    assert_eq!(flags(&reply) & QR, QR);
    assert_eq!(rcode_of(&reply), rcode::FORMERR);
    assert_eq!(up.count(), 0);
}

// ---- DNS 0x20 ----

#[tokio::test]
async fn dns0x20_mixed_case_is_echoed_exactly_and_one_entry_serves_all_spellings() {
    let up = a_upstream(60).await;
    let dns = serve(up.addr, Policy::default()).await;
    let spellings = ["wWw.ExAmPle.TeSt", "www.example.test", "WWW.EXAMPLE.TEST"];
    for (i, name) in spellings.into_iter().enumerate() {
        for edns in [None, edns(1232, false)] {
            let q = query(i as u16, name, rtype::A, edns);
            for reply in [ask_udp(dns.udp, &q).await, ask_tcp(dns.tcp, &q).await] {
                assert_eq!(
                    question(&reply),
                    question(&q),
                    "{name}: question bytes echoed"
                );
                assert_eq!(a_rdata(&reply), [vec![10, 0, 0, 1]]);
            }
        }
    }
    assert_eq!(up.count(), 1, "one entry for every spelling and transport");
    let sent = &up.seen.lock().unwrap()[0];
    assert_eq!(parse_query(sent).unwrap().qname_text(), "www.example.test.");
}

// ---- RFC 1035 §4.1.1: the header ----

#[tokio::test]
async fn rfc1035_s4_1_1_id_echoed_rd_and_cd_copied_qr_and_ra_set() {
    let up = a_upstream(60).await;
    let dns = serve(up.addr, Policy::default()).await;
    for (id_sent, rd, cd) in [
        (0xFFFF, true, false),
        (0x0000, false, false),
        (0x1234, false, false),
        (0xA5A5, true, true),
    ] {
        let mut q = query(id_sent, "hdr.test", rtype::A, None);
        if !rd {
            q[2] &= !0x01;
        }
        if cd {
            q[3] |= 0x10;
        }
        for reply in [ask_udp(dns.udp, &q).await, ask_tcp(dns.tcp, &q).await] {
            assert_eq!(id(&reply), id_sent);
            let f = flags(&reply);
            assert_eq!(f & QR, QR);
            assert_eq!(f & RA, RA);
            assert_eq!(f & 0x7800, 0, "opcode QUERY");
            assert_eq!(f & RD != 0, rd, "RD copied");
            assert_eq!(f & CD != 0, cd, "CD copied");
            assert_eq!(f & TC, 0);
            assert_eq!(f & 0x000F, 0);
        }
    }
    // The AA bit of a cache answer, as CoreDNS sets it for old glibc.
    let reply = ask_udp(dns.udp, &query(1, "hdr.test", rtype::A, None)).await;
    assert_eq!(flags(&reply) & AA, AA);
}

#[tokio::test]
async fn rfc1035_s4_1_3_ttls_of_every_section_decrease_together_but_not_the_opt() {
    let script = |q: &[u8], _| {
        let name = parse_query(q).unwrap().qname_text();
        vec![ResponseBuilder::new(q)
            .answer(&name, rtype::A, 100, &[10, 0, 0, 1])
            .answer(&name, rtype::A, 200, &[10, 0, 0, 2])
            .authority(
                "test.",
                rtype::NS,
                300,
                &ResponseBuilder::name_rdata("ns.test."),
            )
            .additional("ns.test.", rtype::A, 400, &[10, 0, 0, 53])
            .opt(1232)
            .build()]
    };
    let up = upstream(Duration::ZERO, Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let q = query(1, "ttl.test", rtype::A, edns(1232, true));
    let first = ask_udp(dns.udp, &q).await;
    assert_eq!(counts(&first), [1, 2, 1, 2]);
    assert_eq!(
        ttls(&first),
        [100; 4],
        "one TTL for the message: the smallest"
    );
    tokio::time::sleep(2 * ONE_SECOND_AND_A_BIT).await;
    let later = ask_udp(dns.udp, &q).await;
    let t = ttls(&later);
    assert_eq!(t.len(), 4);
    assert!(t.iter().all(|&x| x == t[0]), "{t:?}");
    assert!((95..=97).contains(&t[0]), "{t:?}");
    assert_eq!(opts(&later)[0].ttl, 0x8000, "OPT flags, not a TTL");
    assert_eq!(up.count(), 1);
}

// ---- single flight ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_100_concurrent_identical_misses_make_one_upstream_query() {
    let script = |q: &[u8], _| {
        let name = parse_query(q).unwrap().qname_text();
        vec![ResponseBuilder::new(q)
            .answer(&name, rtype::A, 60, &[10, 0, 0, 1])
            .build()]
    };
    let up = upstream(Duration::from_millis(500), Arc::new(script)).await;
    let dns = serve(up.addr, Policy::default()).await;
    let mut tasks = Vec::new();
    for i in 0..100u16 {
        // Every spelling and transport joins the same flight.
        let name = if i % 2 == 0 { "hot.test" } else { "HoT.TeSt" };
        let q = query(i, name, rtype::A, None);
        tasks.push(tokio::spawn(async move {
            let reply = if i % 10 == 0 {
                ask_tcp(dns.tcp, &q).await
            } else {
                ask_udp(dns.udp, &q).await
            };
            (q, reply)
        }));
    }
    for task in tasks {
        let (q, reply) = task.await.unwrap();
        assert_eq!(id(&reply), id(&q));
        assert_eq!(question(&reply), question(&q));
        assert_eq!(a_rdata(&reply), [vec![10, 0, 0, 1]]);
    }
    assert_eq!(up.count(), 1, "single flight");
}

// ---- the cache key ----

#[tokio::test]
async fn cache_key_separates_do_cd_and_qclass() {
    let up = a_upstream(60).await;
    let dns = serve(up.addr, Policy::default()).await;
    let plain = query(1, "key.test", rtype::A, None);
    let with_do = query(2, "key.test", rtype::A, edns(1232, true));
    let mut with_cd = plain.clone();
    with_cd[3] |= 0x10;
    let mut chaos = plain.clone();
    let class_at = chaos.len() - 2;
    // HS: CH is answered by the agent itself (id.server., RFC 4892), never forwarded.
    chaos[class_at..].copy_from_slice(&4u16.to_be_bytes());
    let variants = [plain, with_do, with_cd, chaos];
    for (n, q) in variants.iter().enumerate() {
        ask_udp(dns.udp, q).await;
        assert_eq!(up.count(), n + 1, "variant {n} is its own entry");
    }
    // Each is now cached: no more upstream queries.
    for q in &variants {
        let reply = ask_udp(dns.udp, q).await;
        assert_eq!(question(&reply), question(q));
    }
    assert_eq!(up.count(), variants.len());
    // What the upstream was asked carries the bits and class that keyed it.
    let seen = up.seen.lock().unwrap();
    let sent: Vec<_> = seen.iter().map(|p| parse_query(p).unwrap()).collect();
    assert!(sent[1].edns.unwrap().dnssec_ok);
    assert!(sent[2].checking_disabled);
    assert_eq!(sent[3].qclass, 4);
}
