//! Forwarding a query upstream: a fresh random ID and a fresh socket (so a random source port)
//! per attempt, the response checked against the question (anything else is dropped and
//! counted), TCP when the UDP answer is truncated or `force_tcp` is set, and the next upstream
//! on a timeout or error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::wire::{self, Query};

/// Per-upstream timeout of one attempt (CoreDNS's `read_timeout` default is 2 s).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The upstreams of one zone and how to reach them.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    force_tcp: bool,
    attempt_timeout: Duration,
    next: AtomicUsize,
    /// Responses dropped because they did not match the question or came malformed.
    pub dropped: AtomicU64,
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Every upstream timed out or failed.
    #[error("no upstream answered")]
    NoAnswer,
}

impl Forwarder {
    /// Forwards to `upstreams` (tried in rotation, each once per query).
    pub fn new(upstreams: Vec<SocketAddr>, force_tcp: bool, attempt_timeout: Duration) -> Self {
        Forwarder {
            upstreams,
            force_tcp,
            attempt_timeout,
            next: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Asks the upstreams about `query`'s question; returns the upstream's response packet
    /// and the upstream query it answers (for [`wire::parse_response`]).
    pub async fn forward(&self, query: &Query<'_>) -> Result<(Vec<u8>, Vec<u8>), ForwardError> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let upstream = self.upstreams[(start + i) % n];
            let mut packet = Vec::with_capacity(64);
            upstream_query(query, rand::random(), &mut packet);
            let answer = if self.force_tcp {
                self.tcp(upstream, &packet).await
            } else {
                match self.udp(upstream, &packet).await {
                    Some(resp) if is_truncated(&resp) => self.tcp(upstream, &packet).await,
                    other => other,
                }
            };
            if let Some(resp) = answer {
                return Ok((resp, packet));
            }
        }
        Err(ForwardError::NoAnswer)
    }

    async fn udp(&self, upstream: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .ok()?;
        let socket = UdpSocket::bind(bind).await.ok()?;
        socket.connect(upstream).await.ok()?;
        socket.send(packet).await.ok()?;
        let parsed = wire::parse_query(packet).ok()?;
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let deadline = tokio::time::Instant::now() + self.attempt_timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            // Only a response to this very question counts; spoofs and strays are dropped.
            if wire::parse_response(&parsed, &buf[..n]).is_ok() {
                buf.truncate(n);
                return Some(buf);
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn tcp(&self, upstream: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
        let parsed = wire::parse_query(packet).ok()?;
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await.ok()?;
            let mut framed = Vec::with_capacity(packet.len() + 2);
            framed.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            framed.extend_from_slice(packet);
            stream.write_all(&framed).await.ok()?;
            let len = stream.read_u16().await.ok()? as usize;
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        let buf = tokio::time::timeout(self.attempt_timeout, exchange)
            .await
            .ok()??;
        if wire::parse_response(&parsed, &buf).is_ok() {
            Some(buf)
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn is_truncated(packet: &[u8]) -> bool {
    packet.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// Builds our own query for `query`'s question: a new ID, RD=1, CD copied, the qname
/// lower-cased (one cache entry serves every spelling), and an OPT with our UDP size and the
/// client's DO bit (EDNS options of the client are hop-by-hop and not passed on).
pub fn upstream_query(query: &Query<'_>, id: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags: u16 = 0x0100 | if query.checking_disabled { 0x0010 } else { 0 };
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    wire::lowercase_qname(query.qname(), out);
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    let dnssec_ok = query.edns.is_some_and(|e| e.dnssec_ok);
    out.push(0); // root owner
    out.extend_from_slice(&wire::rtype::OPT.to_be_bytes());
    out.extend_from_slice(&wire::OUR_UDP_SIZE.to_be_bytes());
    out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::{build_query, parse_query, rtype, Edns};

    #[test]
    fn upstream_query_is_a_valid_lowercase_query_with_do_copied() {
        let mut q = Vec::new();
        build_query(
            7,
            "ApI.S1.Test",
            rtype::A,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: true,
            }),
            &mut q,
        );
        let client = parse_query(&q).unwrap();
        let mut up = Vec::new();
        upstream_query(&client, 0xbeef, &mut up);
        let parsed = parse_query(&up).unwrap();
        assert_eq!(parsed.id, 0xbeef);
        assert_eq!(parsed.qname_text(), "api.s1.test.");
        assert_eq!(parsed.edns.unwrap().udp_size, wire::OUR_UDP_SIZE);
        assert!(parsed.edns.unwrap().dnssec_ok);
        assert!(parsed.recursion_desired);
    }
}
