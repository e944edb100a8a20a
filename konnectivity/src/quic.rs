//! The QUIC transport between our agent and our server, an option beside gRPC over TCP (which
//! stays the default: a seed's load balancer is TCP). One QUIC connection per agent and
//! server replica, with mTLS from the same certificates as the gRPC plane:
//!
//! - The agent opens the first bidirectional stream, the **control stream**. It starts with a
//!   head each way ([`write_head`]: `name: value` lines in one gRPC-style frame), carrying the
//!   same metadata as `Connect`'s HTTP/2 headers (`agentid`, `agentidentifiers`,
//!   `authorization`; `serverid`, `servercount`, or `grpc-status` and `grpc-message` on
//!   refusal). Then both sides send the same [`Packet`]s as on gRPC, framed the same way:
//!   DIAL_REQ, DIAL_CLS, DRAIN, and DIAL_RSP for failed dials.
//! - **Every tunnel is its own stream**, opened by the agent once its dial succeeded, starting
//!   with the DIAL_RSP (`random` echoed, the agent's connect ID), then the tunnel's bytes as
//!   they are. A FIN is a half-close; a reset or STOP_SENDING ends the tunnel.
//!
//! So QUIC's own flow control does what the window extension does on gRPC: a stream's receive
//! window bounds what a stalled tunnel holds, and the connection window (sized for many
//! stalled tunnels at once) never runs out for the others. Packet loss on one stream delays
//! only that stream, which no TCP transport can offer.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::proto::grpc;
use crate::proto::packet::Packet;
use crate::tunnel::{Socket, CHUNK};

/// ALPN of this transport (not gRPC: only our agent and server speak it).
pub const ALPN: &[u8] = b"konnectivity-rs-quic/1";
/// Largest head on the control stream.
const MAX_HEAD: usize = 16 << 10;
/// How long a peer may take to send its head or a tunnel stream's DIAL_RSP.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections are closed after this long without a packet; keep-alives (from the
/// agent's `--keepalive-time`) keep a healthy one open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's keep-alive at most this far apart (well inside the idle timeout).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Tunnels (streams) one connection may hold open at once, each way.
const MAX_STREAMS: u32 = 100_000;

/// The transport parameters of both sides: `window` per stream (what one stalled tunnel may
/// hold), a connection window of 64 windows (at least 16 MiB), so dozens of stalled tunnels
/// leave the rest of the connection flowing.
fn transport(window: u32, keepalive: Option<Duration>) -> quinn::TransportConfig {
    let window = window.max(64 << 10);
    let connection = u64::from(window).saturating_mul(64).max(16 << 20);
    // Path MTU discovery up to jumbo frames (9000-byte links, less the IPv6 and UDP headers):
    // where the path carries them, fewer packets per byte; where it does not, probing stops at
    // what passes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(8952);
    let mut config = quinn::TransportConfig::default();
    config.mtu_discovery_config(Some(mtu));
    config
        .stream_receive_window(VarInt::from_u32(window))
        .receive_window(VarInt::from_u64(connection).unwrap_or(VarInt::MAX))
        .send_window(connection)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(keepalive)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .unwrap_or(quinn::IdleTimeout::from(VarInt::from_u32(60_000))),
        ));
    config
}

/// The server's QUIC configuration from its agent-plane TLS (TLS 1.3 only, as QUIC requires).
pub fn server_config(
    tls: &rustls::ServerConfig,
    window: u32,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| anyhow!("the agent-plane TLS configuration cannot serve QUIC: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(window, None)));
    Ok(config)
}

/// The agent's QUIC configuration from its TLS toward the server.
pub fn client_config(
    tls: &rustls::ClientConfig,
    window: u32,
    keepalive: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow!("the TLS configuration toward the server cannot do QUIC: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Upstream's --keepalive-time defaults to an hour; QUIC's idle timeout needs more.
    let keepalive = keepalive.min(KEEPALIVE);
    config.transport_config(Arc::new(transport(window, Some(keepalive))));
    Ok(config)
}

/// Writes a head: `name: value` lines in one frame.
pub async fn write_head(send: &mut SendStream, headers: &HeaderMap) -> anyhow::Result<()> {
    let mut text = String::new();
    for (name, value) in headers {
        let value = value.to_str().context("a head value is not ASCII")?;
        text.push_str(name.as_str());
        text.push_str(": ");
        text.push_str(value);
        text.push('\n');
    }
    let mut framed = BytesMut::new();
    grpc::frame(text.as_bytes(), &mut framed);
    send.write_all(&framed).await.context("writing the head")?;
    Ok(())
}

/// Reads a head written by [`write_head`].
pub async fn read_head(recv: &mut RecvStream) -> anyhow::Result<HeaderMap> {
    let message = read_frame(recv, MAX_HEAD).await?;
    parse_head(&message)
}

fn parse_head(message: &[u8]) -> anyhow::Result<HeaderMap> {
    let text = std::str::from_utf8(message).context("the head is not UTF-8")?;
    let mut headers = HeaderMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(": ")
            .ok_or_else(|| anyhow!("head line {line:?} is not `name: value`"))?;
        headers.append(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| anyhow!("head name {name:?} is not valid"))?,
            HeaderValue::from_str(value)
                .map_err(|_| anyhow!("head value of {name} is not valid"))?,
        );
    }
    Ok(headers)
}

/// Reads exactly one frame of at most `limit` bytes (nothing past it).
async fn read_frame(recv: &mut RecvStream, limit: usize) -> anyhow::Result<Bytes> {
    let mut prefix = [0u8; 5];
    recv.read_exact(&mut prefix)
        .await
        .context("reading a frame prefix")?;
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if prefix[0] != 0 {
        return Err(anyhow!("compressed frame"));
    }
    if len > limit {
        return Err(anyhow!(
            "frame of {len} bytes is over the {limit}-byte limit"
        ));
    }
    let mut message = vec![0; len];
    recv.read_exact(&mut message)
        .await
        .context("reading a frame")?;
    Ok(message.into())
}

/// Opens a tunnel stream: its first frame is the DIAL_RSP of the dial it answers.
pub async fn open_tunnel(
    connection: &quinn::Connection,
    connect_id: i64,
    random: i64,
) -> anyhow::Result<QuicTunnel> {
    let (mut send, recv) = connection
        .open_bi()
        .await
        .context("opening a tunnel stream")?;
    let mut framed = BytesMut::new();
    let response = Packet::DialResponse {
        error: String::new(),
        connect_id,
        random,
    };
    grpc::frame(&response.to_bytes(), &mut framed);
    send.write_chunk(framed.freeze())
        .await
        .context("writing the tunnel's DIAL_RSP")?;
    Ok(QuicTunnel::new(send, recv))
}

/// Accepts a tunnel stream's DIAL_RSP: the agent's connect ID and the dial's `random`.
pub async fn accept_tunnel(
    mut send: SendStream,
    mut recv: RecvStream,
) -> anyhow::Result<(i64, i64, QuicTunnel)> {
    let message = read_frame(&mut recv, 1024).await;
    let packet = message.and_then(|m| Packet::decode(&m).map_err(anyhow::Error::from));
    match packet {
        Ok(Packet::DialResponse {
            connect_id, random, ..
        }) if connect_id != 0 => Ok((connect_id, random, QuicTunnel::new(send, recv))),
        Ok(other) => {
            let _ = send.reset(VarInt::from_u32(1));
            let _ = recv.stop(VarInt::from_u32(1));
            Err(anyhow!(
                "a tunnel stream began with {} instead of a successful DIAL_RSP",
                other.kind_label()
            ))
        }
        Err(error) => {
            let _ = send.reset(VarInt::from_u32(1));
            let _ = recv.stop(VarInt::from_u32(1));
            Err(error)
        }
    }
}

/// A tunnel's stream. Dropped before both directions ended cleanly, it resets the stream, so
/// the peer learns at once that the tunnel is over.
#[derive(Debug)]
pub struct QuicTunnel {
    tx: QuicTx,
    rx: QuicRx,
}

/// What we send on a tunnel's stream.
#[derive(Debug)]
pub struct QuicTx {
    send: SendStream,
    sent_fin: bool,
}

/// What we receive on a tunnel's stream.
#[derive(Debug)]
pub struct QuicRx {
    recv: RecvStream,
    got_fin: bool,
}

impl QuicTunnel {
    fn new(send: SendStream, recv: RecvStream) -> QuicTunnel {
        QuicTunnel {
            tx: QuicTx {
                send,
                sent_fin: false,
            },
            rx: QuicRx {
                recv,
                got_fin: false,
            },
        }
    }

    /// Both directions, to drive at once.
    pub fn halves(&mut self) -> (&mut QuicTx, &mut QuicRx) {
        (&mut self.tx, &mut self.rx)
    }
}

impl QuicTx {
    /// Sends bytes, waiting while the peer's stream or connection window is full.
    pub async fn send(&mut self, data: Bytes) -> bool {
        self.send.write_chunk(data).await.is_ok()
    }

    /// Sends our last byte (FIN).
    pub fn finish(&mut self) -> bool {
        self.sent_fin = self.send.finish().is_ok();
        self.sent_fin
    }
}

impl QuicRx {
    /// The peer's next bytes: `Ok(None)` once it sent its last (FIN), `Err` if it ended the
    /// tunnel (or the connection died).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, String> {
        if self.got_fin {
            return Ok(None);
        }
        match self.recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
            Ok(None) => {
                self.got_fin = true;
                Ok(None)
            }
            Err(error) => Err(error.to_string()),
        }
    }
}

impl Drop for QuicTunnel {
    fn drop(&mut self) {
        if !self.tx.sent_fin {
            let _ = self.tx.send.reset(VarInt::from_u32(0));
        }
        if !self.rx.got_fin {
            let _ = self.rx.recv.stop(VarInt::from_u32(0));
        }
    }
}

/// Carries a tunnel between a socket (a frontend's, or a destination's) and its stream until
/// both directions ended, or either failed, or `stop` fires. `early` goes first (bytes the
/// frontend sent before the dial completed).
pub async fn splice_socket<S: Socket>(
    tunnel: &mut QuicTunnel,
    socket: S,
    early: Bytes,
    stop: impl std::future::Future<Output = ()>,
) {
    let (mut rd, mut wr) = socket.halves();
    let (tx, rx) = tunnel.halves();
    let up = async {
        if !early.is_empty() && !tx.send(early).await {
            return false;
        }
        // Buffers sized to what the socket gives: small for requests, up to CHUNK for bulk.
        let mut size = 4096;
        loop {
            // No buffer is held while the socket is quiet.
            if S::readable(&rd).await.is_err() {
                return false;
            }
            let mut buf = BytesMut::with_capacity(size);
            match rd.read_buf(&mut buf).await {
                Ok(0) => return tx.finish(),
                Ok(n) => {
                    size = if n >= size {
                        (size * 2).min(CHUNK)
                    } else {
                        4096
                    };
                    if !tx.send(buf.freeze()).await {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    let down = async {
        loop {
            match rx.recv().await {
                Ok(Some(data)) => {
                    if wr.write_all(&data).await.is_err() {
                        return false;
                    }
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return true;
                }
                Err(_) => return false,
            }
        }
    };
    tokio::pin!(up, down, stop);
    tokio::select! {
        clean = &mut up => if clean {
            tokio::select! {
                _ = &mut down => {}
                () = &mut stop => {}
            }
        },
        clean = &mut down => if clean {
            tokio::select! {
                _ = &mut up => {}
                () = &mut stop => {}
            }
        },
        () = &mut stop => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_bad_lines_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("agentid", HeaderValue::from_static("node-1"));
        headers.append(
            "agentidentifiers",
            HeaderValue::from_static("host=a&cidr=10.0.0.0%2F8"),
        );
        headers.append("x", HeaderValue::from_static("1"));
        headers.append("x", HeaderValue::from_static("2"));
        let mut text = String::new();
        for (name, value) in &headers {
            text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap()));
        }
        assert_eq!(parse_head(text.as_bytes()).unwrap(), headers);
        assert!(parse_head(b"no colon\n").is_err());
        assert!(parse_head(b"bad name: 1\n").is_err());
        assert!(parse_head(&[0xff]).is_err());
    }
}
