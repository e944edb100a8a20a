//! Hostile input on real sockets: malformed and abusive UDP datagrams each get exactly their
//! verdict (FORMERR, NOTIMP or silence) while a well-formed client on the same server keeps
//! getting every answer; abusive TCP clients (stalled, zero and oversized lengths) do not stop
//! other TCP clients; and a property test feeds arbitrary bytes to `Server::answer`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use node_local_dns::cache::Policy;
use node_local_dns::config::Forward;
use node_local_dns::forward::Forwarder;
use node_local_dns::server::{bind, Server, Zone};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, parse_response, rcode, rtype, Edns};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The forwarder's per-upstream attempt timeout in these tests.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for a reply it expects.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a hostile client listens to be sure that no reply comes.
const SILENCE: Duration = Duration::from_millis(300);
/// The largest UDP payload over IPv4 (65535 − 8 UDP − 20 IP header bytes).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// A stub resolver's retry interval and attempts (glibc: `timeout:5 attempts:2`; shorter here).
const STUB_RETRY: Duration = Duration::from_secs(1);
const STUB_ATTEMPTS: u32 = 5;

/// The one place a forwarder is built (its constructor is about to take `&config::Forward`).
/// One upstream, no health checks (so the upstream's query count is the cache's doing).
fn forwarder(upstream: SocketAddr) -> Forwarder {
    Forwarder::new(&Forward {
        attempt_timeout: ATTEMPT_TIMEOUT,
        max_fails: 0,
        ..Forward::new(".".to_owned(), vec![upstream])
    })
}

/// What the upstream says to any query: an A record for A queries, NXDOMAIN with an SOA
/// otherwise.
fn upstream_answer(q: &[u8]) -> Vec<u8> {
    let parsed = parse_query(q).unwrap();
    if parsed.qtype == rtype::A {
        ResponseBuilder::new(q)
            .answer(&parsed.qname_text(), rtype::A, 60, &[10, 0, 0, 1])
            .compress(true)
            .opt(1232)
            .build()
    } else {
        ResponseBuilder::new(q)
            .rcode(rcode::NXDOMAIN)
            .authority(
                "test.",
                rtype::SOA,
                60,
                &ResponseBuilder::soa_rdata("ns.test.", "h.test.", 60),
            )
            .opt(1232)
            .build()
    }
}

/// An upstream on UDP (the forwarder's first choice) and TCP, answering every query with
/// [`upstream_answer`] after `delay`; counts the queries.
async fn upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let (udp, tcp) = agentkit::testing::tokio_udp_and_tcp([127, 0, 0, 1].into());
    let udp = Arc::new(udp);
    let addr = udp.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let q = Arc::clone(&queries);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            let (udp, packet) = (Arc::clone(&udp), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = udp.send_to(&upstream_answer(&packet), peer).await;
            });
        }
    });
    let q = Arc::clone(&queries);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            q.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let len = stream.read_u16().await.unwrap() as usize;
                let mut packet = vec![0u8; len];
                stream.read_exact(&mut packet).await.unwrap();
                let resp = upstream_answer(&packet);
                let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&resp);
                let _ = stream.write_all(&framed).await;
            });
        }
    });
    (addr, queries)
}

fn server(upstream: SocketAddr) -> Server {
    let zone = Arc::new(Zone::new(".", Policy::default(), forwarder(upstream)));
    Server::new(vec![zone])
}

/// The server on real sockets: (UDP address, TCP address).
async fn serve(upstream: SocketAddr) -> (SocketAddr, SocketAddr) {
    let server = server(upstream);
    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addrs = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    tokio::spawn(server.clone().serve_udp(udp));
    tokio::spawn(server.serve_tcp(tcp));
    addrs
}

fn query(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, qtype, edns, &mut q);
    q
}

fn be16(m: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([m[at], m[at + 1]])
}

/// What the server must do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A 12-byte FORMERR reply: ID, RD and CD echoed, QR and RA set, all counts 0.
    FormErr,
    /// A 12-byte NOTIMP reply, the opcode echoed as well.
    NotImp,
    /// No reply at all: no complete header, or a response (answering invites loops).
    Dropped,
}

/// A valid query's header bytes with the given flags and counts, then `rest`.
fn packet(id: u16, flags: u16, counts: [u16; 4], rest: &[u8]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        p.extend_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(rest);
    p
}

/// "a.test" A IN, as a question.
fn question() -> Vec<u8> {
    query(0, "a.test", rtype::A, None)[12..].to_vec()
}

/// Every hostile datagram with its verdict and a name for messages.
fn hostile_cases() -> Vec<(String, Vec<u8>, Verdict)> {
    const RD: u16 = 0x0100;
    let valid = query(0x1111, "a.test", rtype::A, None);
    let mut cases = Vec::new();
    for len in 0..12 {
        cases.push((
            format!("{len}-byte header"),
            valid[..len].to_vec(),
            Verdict::Dropped,
        ));
    }
    cases.push((
        "huge counts".into(),
        packet(0x2001, RD, [0xFFFF; 4], &question()),
        Verdict::FormErr,
    ));
    cases.push((
        "huge counts, header only".into(),
        packet(0x2002, RD, [0xFFFF, 0xFFFF, 0, 0], &[]),
        Verdict::FormErr,
    ));
    cases.push((
        "pointer loop in the question".into(),
        packet(0x2003, RD, [1, 0, 0, 0], &[0xC0, 12, 0, 1, 0, 1]),
        Verdict::FormErr,
    ));
    cases.push((
        "label then a pointer back to it".into(),
        packet(0x2004, RD, [1, 0, 0, 0], &[1, b'a', 0xC0, 12, 0, 1, 0, 1]),
        Verdict::FormErr,
    ));
    cases.push((
        "forward pointer in the question".into(),
        packet(
            0x2005,
            RD,
            [1, 0, 0, 0],
            &[0xC0, 20, 0, 1, 0, 1, 0, 0, 1, b'a', 0],
        ),
        Verdict::FormErr,
    ));
    let mut long_label = vec![64];
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push((
        "64-byte label".into(),
        packet(0x2006, RD, [1, 0, 0, 0], &long_label),
        Verdict::FormErr,
    ));
    cases.push((
        "extended label type 0x80".into(),
        packet(0x2007, RD, [1, 0, 0, 0], &[0x81, b'a', 0, 0, 1, 0, 1]),
        Verdict::FormErr,
    ));
    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'x'; 63]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push((
        "320-byte name".into(),
        packet(0x2008, RD, [1, 0, 0, 0], &long_name),
        Verdict::FormErr,
    ));
    cases.push((
        "unterminated name".into(),
        packet(0x2009, RD, [1, 0, 0, 0], &[3, b'a', b'b']),
        Verdict::FormErr,
    ));
    cases.push((
        "response (QR=1)".into(),
        packet(0x200A, 0x8000 | RD, [1, 0, 0, 0], &question()),
        Verdict::Dropped,
    ));
    cases.push((
        "response (QR=1) with an opcode and junk".into(),
        packet(0x200B, 0xA000, [9, 9, 9, 9], &[0xFF; 40]),
        Verdict::Dropped,
    ));
    for opcode in [1u16, 2, 4, 5, 6, 15] {
        cases.push((
            format!("opcode {opcode}"),
            packet(
                0x2100 + opcode,
                RD | (opcode << 11),
                [1, 0, 0, 0],
                &question(),
            ),
            Verdict::NotImp,
        ));
    }
    cases.push((
        "qdcount 0".into(),
        packet(0x2201, RD, [0, 0, 0, 0], &[]),
        Verdict::FormErr,
    ));
    cases.push((
        "qdcount 0 with a question".into(),
        packet(0x2202, RD, [0, 0, 0, 0], &question()),
        Verdict::FormErr,
    ));
    let mut two = question();
    two.extend_from_slice(&question());
    cases.push((
        "qdcount 2".into(),
        packet(0x2203, RD, [2, 0, 0, 0], &two),
        Verdict::FormErr,
    ));
    cases.push((
        "an answer record in a query".into(),
        packet(0x2204, RD, [1, 1, 0, 0], &question()),
        Verdict::FormErr,
    ));
    cases.push((
        "TC set in a query".into(),
        packet(0x2205, RD | 0x0200, [1, 0, 0, 0], &question()),
        Verdict::FormErr,
    ));
    let mut garbage = query(0x2206, "a.test", rtype::A, None);
    garbage.extend_from_slice(b"garbage");
    cases.push((
        "garbage after the question".into(),
        garbage,
        Verdict::FormErr,
    ));
    let mut not_opt = query(0x2207, "a.test", rtype::A, None);
    not_opt[11] = 1;
    not_opt.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    cases.push((
        "additional A record instead of an OPT".into(),
        not_opt,
        Verdict::FormErr,
    ));
    let mut bad_option = query(0x2208, "a.test", rtype::A, Some(edns()));
    let at = bad_option.len() - 2;
    bad_option[at + 1] = 4;
    bad_option.extend_from_slice(&[0, 10, 0, 200]); // option longer than the RDATA
    cases.push((
        "EDNS option overrunning the OPT".into(),
        bad_option,
        Verdict::FormErr,
    ));
    let mut jumbo = query(0x2209, "a.test", rtype::A, None);
    jumbo.resize(MAX_UDP_PAYLOAD, 0xAB);
    cases.push((
        "64 KiB datagram: a query and garbage".into(),
        jumbo,
        Verdict::FormErr,
    ));
    cases.push((
        "64 KiB datagram: all ones (QR=1)".into(),
        vec![0xFF; MAX_UDP_PAYLOAD],
        Verdict::Dropped,
    ));
    let mut jumbo_header = packet(0x220A, RD, [0xFFFF; 4], &[]);
    jumbo_header.extend((0..MAX_UDP_PAYLOAD - 12).map(|i| (i * 7 % 251) as u8));
    cases.push((
        "64 KiB datagram: huge counts and noise".into(),
        jumbo_header,
        Verdict::FormErr,
    ));
    cases
}

fn edns() -> Edns {
    Edns {
        udp_size: 1232,
        version: 0,
        dnssec_ok: false,
    }
}

/// Checks `reply` (None: nothing came) against `verdict` for `sent`.
fn check_verdict(name: &str, sent: &[u8], reply: Option<&[u8]>, verdict: Verdict) {
    let reply = match (verdict, reply) {
        (Verdict::Dropped, None) => return,
        (Verdict::Dropped, Some(r)) => panic!("{name}: expected silence, got {r:?}"),
        (_, None) => panic!("{name}: expected {verdict:?}, got nothing"),
        (_, Some(r)) => r,
    };
    assert_eq!(reply.len(), 12, "{name}: header only");
    assert_eq!(&reply[..2], &sent[..2], "{name}: ID echoed");
    let flags = be16(reply, 2);
    let sent_flags = be16(sent, 2);
    assert_eq!(flags & 0x8080, 0x8080, "{name}: QR and RA");
    assert_eq!(
        flags & 0x0110,
        sent_flags & 0x0110,
        "{name}: RD and CD echoed"
    );
    assert_eq!(flags & 0x7800, sent_flags & 0x7800, "{name}: opcode echoed");
    let expect = match verdict {
        Verdict::FormErr => rcode::FORMERR,
        Verdict::NotImp => rcode::NOTIMP,
        Verdict::Dropped => unreachable!(),
    };
    assert_eq!(reply[3] & 0x0F, expect, "{name}");
    assert_eq!(&reply[4..], [0; 8], "{name}: all counts 0");
}

/// Sends `sent` from a fresh socket and returns the reply, or None after [`SILENCE`] (or
/// [`CLIENT_TIMEOUT`] when a reply is expected).
async fn send_hostile(server: SocketAddr, sent: &[u8], verdict: Verdict) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(sent, server).await.unwrap();
    let wait = if verdict == Verdict::Dropped {
        SILENCE
    } else {
        CLIENT_TIMEOUT
    };
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// A well-formed client: `rounds` queries over `names`, each answered with its ID, its
/// question and 10.0.0.1. Like a stub resolver it asks again after [`STUB_RETRY`], at most
/// [`STUB_ATTEMPTS`] times: a flood may fill the socket's receive buffer, and the kernel then
/// drops datagrams, good ones too, before the server sees them. Returns (answered, retries).
async fn good_udp_client(server: SocketAddr, rounds: u16, names: u16) -> (u16, u32) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (mut answered, mut retries) = (0, 0);
    for i in 0..rounds {
        let q = query(
            i,
            &format!("good{}.test", i % names),
            rtype::A,
            Some(edns()),
        );
        let mut n = None;
        for _ in 0..STUB_ATTEMPTS {
            s.send_to(&q, server).await.unwrap();
            if let Ok(got) = tokio::time::timeout(STUB_RETRY, s.recv(&mut buf)).await {
                n = Some(got.unwrap());
                break;
            }
            retries += 1;
        }
        let n = n.expect("the good client is answered");
        let reply = &buf[..n];
        assert_eq!(be16(reply, 0), i);
        assert_eq!(reply[3] & 0x0F, rcode::NOERROR);
        assert_eq!(&reply[12..12 + q.len() - 23], &q[12..q.len() - 11]);
        assert!(reply.windows(4).any(|w| w == [10, 0, 0, 1]));
        answered += 1;
    }
    (answered, retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_udp_datagrams_get_their_verdict_while_a_good_client_is_served() {
    let (up, queries) = upstream(Duration::from_millis(5)).await;
    let (udp, _) = serve(up).await;
    let good = tokio::spawn(good_udp_client(udp, 400, 40));
    const ROUNDS: usize = 5;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        let (jumbo, small): (Vec<_>, Vec<_>) = hostile_cases()
            .into_iter()
            .partition(|(_, sent, _)| sent.len() > 1500);
        // The small ones at once; the 64 KiB ones one after the other, as three of them at
        // once overflow the server socket's default receive buffer (the kernel drops them).
        for (name, sent, verdict) in small {
            tasks.push(tokio::spawn(async move {
                let reply = send_hostile(udp, &sent, verdict).await;
                check_verdict(
                    &format!("round {round}, {name}"),
                    &sent,
                    reply.as_deref(),
                    verdict,
                );
            }));
        }
        for (name, sent, verdict) in jumbo {
            let reply = send_hostile(udp, &sent, verdict).await;
            check_verdict(
                &format!("round {round}, {name}"),
                &sent,
                reply.as_deref(),
                verdict,
            );
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
    let (answered, retries) = good.await.unwrap();
    assert_eq!(answered, 400);
    assert!(retries <= 4, "{retries} retries of 400 queries");
    assert_eq!(
        queries.load(Ordering::SeqCst),
        40,
        "only the good names reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_datagrams_does_not_starve_a_good_client() {
    let (up, _) = upstream(Duration::ZERO).await;
    let (udp, _) = serve(up).await;
    let flood = tokio::spawn(async move {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cases = hostile_cases();
        for i in 0..5_000 {
            let (_, sent, _) = &cases[i % cases.len()];
            let _ = s.send_to(sent, udp).await;
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    // Every query answered, some perhaps only after a retry.
    assert_eq!(good_udp_client(udp, 200, 20).await.0, 200);
    flood.await.unwrap();
    // And afterwards the server answers at once.
    assert_eq!(good_udp_client(udp, 20, 20).await, (20, 0));
}

// ---- TCP ----

async fn ask_tcp_on(stream: &mut TcpStream, q: &[u8]) -> Vec<u8> {
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    stream.write_all(&framed).await.unwrap();
    let exchange = async {
        let len = stream.read_u16().await.unwrap() as usize;
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .expect("a TCP reply in time")
}

async fn good_tcp_clients(server: SocketAddr, connections: u16, per_connection: u16) {
    for c in 0..connections {
        let mut stream = TcpStream::connect(server).await.unwrap();
        for i in 0..per_connection {
            let id = c * per_connection + i;
            let q = query(id, &format!("tcp{}.test", id % 7), rtype::A, None);
            let reply = ask_tcp_on(&mut stream, &q).await;
            assert_eq!(be16(&reply, 0), id);
            assert_eq!(reply[3] & 0x0F, rcode::NOERROR);
            assert_eq!(be16(&reply, 6), 1);
        }
    }
}

/// Whether the server sends nothing on `stream` within [`SILENCE`] (a close counts as
/// nothing).
async fn silent(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(SILENCE, stream.read(&mut byte)).await {
        Err(_) => true,                 // nothing came
        Ok(Ok(0)) | Ok(Err(_)) => true, // closed
        Ok(Ok(_)) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_lying_tcp_clients_do_not_block_other_tcp_clients() {
    let (up, _) = upstream(Duration::ZERO).await;
    let (_, tcp) = serve(up).await;
    let mut abusers = Vec::new();
    // Length prefixes and nothing more, half a query, a zero length, 65535 with 100 bytes.
    for _ in 0..20 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        s.write_all(&[0, 40]).await.unwrap();
        abusers.push(s);
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        let q = query(1, "half.test", rtype::A, None);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q[..q.len() / 2]).await.unwrap();
        abusers.push(s);
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        s.write_all(&[0xFF, 0xFF]).await.unwrap();
        s.write_all(&[0x42; 100]).await.unwrap();
        abusers.push(s);
    }
    let mut zero = TcpStream::connect(tcp).await.unwrap();
    zero.write_all(&[0, 0]).await.unwrap();
    assert!(silent(&mut zero).await, "no reply to an empty message");
    // Meanwhile, everyone else is served.
    good_tcp_clients(tcp, 20, 5).await;
    assert_eq!(abusers.len(), 60);
}

#[tokio::test]
async fn a_stalled_tcp_connection_is_closed_by_the_server() {
    let (up, _) = upstream(Duration::ZERO).await;
    let (_, tcp) = serve(up).await;
    let mut stalled = TcpStream::connect(tcp).await.unwrap();
    stalled.write_all(&[0, 40, 0, 1]).await.unwrap();
    // Every await on a peer has a deadline; this one is the server's idle timeout (10 s).
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not left open: {closed:?}"
    );
}

#[tokio::test]
async fn hostile_messages_over_tcp_get_the_same_verdicts() {
    let (up, _) = upstream(Duration::ZERO).await;
    let (_, tcp) = serve(up).await;
    for (name, sent, verdict) in hostile_cases() {
        if sent.len() > usize::from(u16::MAX) {
            continue;
        }
        let mut s = TcpStream::connect(tcp).await.unwrap();
        let mut framed = (sent.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&sent);
        s.write_all(&framed).await.unwrap();
        let reply = if verdict == Verdict::Dropped {
            assert!(silent(&mut s).await, "{name}: expected silence");
            None
        } else {
            let len = tokio::time::timeout(CLIENT_TIMEOUT, s.read_u16())
                .await
                .unwrap()
                .unwrap();
            let mut buf = vec![0u8; usize::from(len)];
            s.read_exact(&mut buf).await.unwrap();
            Some(buf)
        };
        check_verdict(&format!("tcp, {name}"), &sent, reply.as_deref(), verdict);
    }
}

// ---- properties of Server::answer ----

/// A runtime and a server (with its upstream) shared by the property tests.
fn shared() -> &'static (tokio::runtime::Runtime, Server) {
    static SHARED: OnceLock<(tokio::runtime::Runtime, Server)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(async {
            let (up, _) = upstream(Duration::ZERO).await;
            server(up)
        });
        (runtime, server)
    })
}

/// `Server::answer` on `packet`: never panics; when it answers, the reply has the packet's
/// ID and QR=1; a query gets a reply that parses as a response to it and fits its transport;
/// anything else gets a 12-byte FORMERR or NOTIMP; silence only for no header or QR=1.
fn check_answer(packet: &[u8], udp: bool) -> Result<(), TestCaseError> {
    let (runtime, server) = shared();
    let mut out = Vec::new();
    let answered = runtime.block_on(server.answer(packet, udp, &mut out));
    if !answered {
        prop_assert!(
            packet.len() < 12 || packet[2] & 0x80 != 0,
            "silent on {packet:?}"
        );
        return Ok(());
    }
    prop_assert!(out.len() >= 12);
    prop_assert_eq!(&out[..2], &packet[..2]);
    prop_assert_eq!(out[2] & 0x80, 0x80);
    match parse_query(packet) {
        Ok(q) => {
            let parsed = parse_response(&q, &out);
            prop_assert!(parsed.is_ok(), "{:?} for {:?}", parsed, packet);
            prop_assert_eq!(&out[12..12 + q.question.len()], q.question);
            if udp {
                prop_assert!(out.len() <= q.udp_limit());
            }
        }
        Err(_) => {
            prop_assert_eq!(out.len(), 12);
            let opcode = packet[2] >> 3 & 0x0F;
            let expect = if opcode == 0 {
                rcode::FORMERR
            } else {
                rcode::NOTIMP
            };
            prop_assert_eq!(out[3] & 0x0F, expect);
        }
    }
    Ok(())
}

fn qname() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-zA-Z0-9-]{1,12}", 1..4).prop_map(|l| l.join(".") + ".")
}

fn any_edns() -> impl Strategy<Value = Option<Edns>> {
    proptest::option::of((any::<u16>(), 0u8..2, any::<bool>()).prop_map(
        |(udp_size, version, dnssec_ok)| Edns {
            udp_size,
            version,
            dnssec_ok,
        },
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn answer_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        udp in any::<bool>(),
    ) {
        check_answer(&bytes, udp)?;
    }

    #[test]
    fn answer_on_mutated_queries(
        name in qname(),
        qtype in prop_oneof![Just(rtype::A), Just(rtype::AAAA), any::<u16>()],
        edns in any_edns(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        udp in any::<bool>(),
    ) {
        let mut bytes = query(7, &name, qtype, edns);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        check_answer(&bytes, udp)?;
    }

    #[test]
    fn answer_on_queries_with_arbitrary_headers(
        header in any::<[u8; 12]>(),
        name in qname(),
        edns in any_edns(),
        udp in any::<bool>(),
    ) {
        let mut bytes = query(7, &name, rtype::A, edns);
        bytes[..12].copy_from_slice(&header);
        check_answer(&bytes, udp)?;
    }
}
