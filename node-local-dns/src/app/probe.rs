//! The agent's checks of itself through its own sockets: the readiness self-test (every
//! listener answers `id.server. CH TXT`) and CoreDNS's `loop` detection.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::plan::LoopCheck;
use crate::server::LOOP_THRESHOLD;
use crate::wire;

/// QCLASS CH.
const CLASS_CHAOS: u16 = 3;
/// QTYPE HINFO, what CoreDNS's `loop` probes with.
const HINFO: u16 = 13;

/// One readiness self-test: every listener answers `id.server. CH TXT` itself.
pub(super) async fn self_test(addrs: &[SocketAddr]) -> bool {
    for addr in addrs {
        let answered = probe(
            *addr,
            "id.server.",
            wire::rtype::TXT,
            CLASS_CHAOS,
            Duration::from_secs(1),
        )
        .await;
        if answered.is_none() {
            return false;
        }
    }
    !addrs.is_empty()
}

/// Sends one query to `addr` (the loopback address of its family if `addr` is a wildcard)
/// over UDP and waits up to `timeout` for a reply with its ID.
pub async fn probe(
    addr: SocketAddr,
    name: &str,
    qtype: u16,
    qclass: u16,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let (local, target): (SocketAddr, SocketAddr) = if addr.is_ipv4() {
        let ip = if addr.ip().is_unspecified() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            addr.ip()
        };
        (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::new(ip, addr.port()),
        )
    } else {
        let ip = if addr.ip().is_unspecified() {
            Ipv6Addr::LOCALHOST.into()
        } else {
            addr.ip()
        };
        (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            SocketAddr::new(ip, addr.port()),
        )
    };
    let socket = tokio::net::UdpSocket::bind(local).await.ok()?;
    let id: u16 = rand::random();
    let mut query = Vec::new();
    wire::build_query(id, name, qtype, None, &mut query);
    let at = query.len() - 2;
    query[at..].copy_from_slice(&qclass.to_be_bytes());
    socket.send_to(&query, target).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let (n, _) = tokio::time::timeout(left, socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// CoreDNS's `loop`: asks each zone for `<random>.<random>.<zone> HINFO` through our own
/// listener; if the probe comes back to us, queries for the zone would circle between us and
/// the upstream. Returns the first loop found.
pub(super) async fn detect_loops(checks: Vec<LoopCheck>) -> Option<String> {
    for (zone, server, addr) in checks {
        let name = format!(
            "{}.{}.{}",
            rand::random::<u32>(),
            rand::random::<u32>(),
            zone.trim_start_matches('.')
        );
        server.arm_loop_probe(&name);
        let _ = probe(addr, &name, HINFO, 1, Duration::from_secs(6)).await;
        let seen = server.disarm_loop_probe();
        if seen >= LOOP_THRESHOLD {
            return Some(format!(
                "Loop ({addr} -> forward upstream) detected for zone {zone:?}: the probe {name} came back {seen} times; point the upstream elsewhere (for example not at 127.0.0.53)"
            ));
        }
    }
    None
}
