//! Packets over gRPC streams on HTTP/2 (the `h2` crate, no gRPC framework; or on a QUIC
//! control stream, framed the same way): the request and
//! response heads both services use, a sender that waits for HTTP/2 flow-control capacity
//! (so a slow peer pushes back instead of growing a buffer), and a receiver that hands
//! capacity back as soon as a packet is decoded (so the shared stream itself never stalls:
//! per-tunnel queues above it decide what waits).

use std::future::poll_fn;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue};
use thiserror::Error;

use crate::proto::grpc::{self, Deframer, FrameError};
use crate::proto::packet::{DecodeError, Packet};

/// `AgentService/Connect`: agents to the server.
pub const AGENT_PATH: &str = "/AgentService/Connect";
/// `ProxyService/Proxy`: kube-apiserver (konnectivity-client) to the server.
pub const PROXY_PATH: &str = "/ProxyService/Proxy";

/// Request metadata (lower case on the wire).
pub const AGENT_ID: &str = "agentid";
pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
pub const AUTHORIZATION: &str = "authorization";
/// Response headers of `Connect`, sent before any packet.
pub const SERVER_ID: &str = "serverid";
pub const SERVER_COUNT: &str = "servercount";
/// This project's extensions, offered by our agent and accepted by our server: a
/// comma-separated list. Upstream peers neither send nor read it.
pub const EXTENSIONS: &str = "konnectivity-rs-extensions";

/// HTTP/2 windows: large enough that one stream carries a tunnel at full speed over a
/// long-fat path; the shared `Connect` stream's receive window is handed back as packets are
/// decoded, so it never fills while per-tunnel queues have room.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept (the protocol's maximum is 16 MiB; 64 KiB keeps a DATA
/// packet in a few frames without huge allocations).
pub const MAX_FRAME: u32 = 64 << 10;

/// The extensions one side of a `Connect` stream announces (header [`EXTENSIONS`], e.g.
/// `window=524288,half-close`); an extension is on when both sides announce it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Per-tunnel credit ([`Packet::Window`]): the window, in bytes, this side grants the
    /// other per tunnel to start with (0: off). A sender never has more than the receiver's
    /// window of a tunnel in flight, so the receiver's queue never overflows and never
    /// blocks the shared stream.
    pub window: u32,
    /// [`Packet::HalfClose`]: TCP half-close carried through the tunnel.
    pub half_close: bool,
}

impl Extensions {
    /// Everything this build speaks, granting `window` bytes per tunnel.
    pub fn all(window: u32) -> Extensions {
        Extensions {
            window,
            half_close: true,
        }
    }

    /// The header value announcing these.
    pub fn header(self) -> Option<HeaderValue> {
        let mut names = Vec::new();
        if self.window > 0 {
            names.push(format!("window={}", self.window));
        }
        if self.half_close {
            names.push("half-close".to_owned());
        }
        (!names.is_empty()).then(|| HeaderValue::from_str(&names.join(",")).expect("ASCII"))
    }

    /// What the peer announced in `headers` (unknown names and bad values are ignored).
    pub fn from_headers(headers: &HeaderMap) -> Extensions {
        let mut ext = Extensions::default();
        for value in headers.get_all(EXTENSIONS) {
            for name in value.to_str().unwrap_or_default().split(',') {
                match name.trim().split_once('=') {
                    Some(("window", n)) => ext.window = n.parse().unwrap_or(0),
                    None if name.trim() == "half-close" => ext.half_close = true,
                    _ => {}
                }
            }
        }
        ext
    }

    /// What is on between `ours` and the peer's `theirs`: windows stay each side's own.
    pub fn agreed(ours: Extensions, theirs: Extensions) -> Agreed {
        let window = ours.window > 0 && theirs.window > 0;
        Agreed {
            send_window: if window { theirs.window } else { 0 },
            recv_window: if window { ours.window } else { 0 },
            half_close: ours.half_close && theirs.half_close,
        }
    }
}

/// The extensions in force on one stream, from this side's point of view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agreed {
    /// Credit per tunnel for what we send (the peer's window); 0: no flow control.
    pub send_window: u32,
    /// Credit we grant per tunnel for what we receive (our window); 0: none.
    pub recv_window: u32,
    pub half_close: bool,
}

/// Why a packet stream failed.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("QUIC: {0}")]
    Quic(#[from] quinn::ReadError),
    #[error("gRPC framing: {0}")]
    Frame(#[from] FrameError),
    #[error("packet: {0}")]
    Decode(#[from] DecodeError),
    #[error("the peer stopped accepting data")]
    Closed,
}

/// Sends packets, each a gRPC message, waiting for flow-control capacity: on an HTTP/2
/// stream, or on the control stream of a QUIC connection ([`crate::quic`]).
#[derive(Debug)]
pub struct PacketSender {
    stream: Tx,
    scratch: BytesMut,
}

#[derive(Debug)]
enum Tx {
    H2(SendStream<Bytes>),
    Quic(quinn::SendStream),
}

impl PacketSender {
    pub fn new(stream: SendStream<Bytes>) -> Self {
        PacketSender {
            stream: Tx::H2(stream),
            scratch: BytesMut::new(),
        }
    }

    pub fn quic(stream: quinn::SendStream) -> Self {
        PacketSender {
            stream: Tx::Quic(stream),
            scratch: BytesMut::new(),
        }
    }

    /// Sends one packet; returns once the transport took all of it.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), StreamError> {
        self.scratch.clear();
        let message = packet.to_bytes();
        grpc::frame(&message, &mut self.scratch);
        let bytes = self.scratch.split().freeze();
        match &mut self.stream {
            Tx::H2(stream) => send_h2(stream, bytes).await,
            Tx::Quic(stream) => stream
                .write_chunk(bytes)
                .await
                .map_err(|_| StreamError::Closed),
        }
    }

    /// Ends a server's response with `grpc-status` (0 is OK) and an optional message.
    pub fn finish_response(&mut self, status: u32, message: &str) {
        match &mut self.stream {
            Tx::H2(stream) => {
                let _ = stream.send_trailers(grpc_trailers(status, message));
            }
            Tx::Quic(stream) => {
                let _ = stream.finish();
            }
        }
    }

    /// Ends a client's request stream (half-close).
    pub fn finish_request(&mut self) {
        match &mut self.stream {
            Tx::H2(stream) => {
                let _ = stream.send_data(Bytes::new(), true);
            }
            Tx::Quic(stream) => {
                let _ = stream.finish();
            }
        }
    }

    /// Resets the stream (the peer sees an error at once).
    pub fn reset(&mut self) {
        match &mut self.stream {
            Tx::H2(stream) => stream.send_reset(h2::Reason::CANCEL),
            Tx::Quic(stream) => {
                let _ = stream.reset(quinn::VarInt::from_u32(0));
            }
        }
    }
}

async fn send_h2(stream: &mut SendStream<Bytes>, mut bytes: Bytes) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        stream.reserve_capacity(bytes.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(StreamError::Closed),
        };
        if granted == 0 {
            continue;
        }
        let chunk = bytes.split_to(granted.min(bytes.len()));
        stream.send_data(chunk, false)?;
    }
    Ok(())
}

/// Receives packets, releasing flow-control capacity as each is decoded.
#[derive(Debug)]
pub struct PacketReceiver {
    body: Rx,
    deframer: Deframer,
}

#[derive(Debug)]
enum Rx {
    H2(RecvStream),
    Quic(quinn::RecvStream),
}

impl PacketReceiver {
    pub fn new(body: RecvStream) -> Self {
        PacketReceiver {
            body: Rx::H2(body),
            deframer: Deframer::default(),
        }
    }

    pub fn quic(body: quinn::RecvStream) -> Self {
        PacketReceiver {
            body: Rx::Quic(body),
            deframer: Deframer::default(),
        }
    }

    /// The next packet; `None` when the peer ended the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<Packet>, StreamError> {
        loop {
            if let Some(message) = self.deframer.next_message()? {
                return Ok(Some(Packet::decode(&message)?));
            }
            let chunk = match &mut self.body {
                Rx::H2(body) => match body.data().await {
                    Some(chunk) => {
                        let chunk = chunk?;
                        let _ = body.flow_control().release_capacity(chunk.len());
                        Some(chunk)
                    }
                    None => None,
                },
                Rx::Quic(body) => body
                    .read_chunk(MAX_FRAME as usize, true)
                    .await?
                    .map(|chunk| chunk.bytes),
            };
            match chunk {
                Some(chunk) => self.deframer.push(&chunk),
                None => {
                    self.deframer.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// The trailers after the last packet (the `grpc-status` of a response), if any.
    pub async fn trailers(&mut self) -> Option<HeaderMap> {
        match &mut self.body {
            Rx::H2(body) => body.trailers().await.ok().flatten(),
            Rx::Quic(_) => None,
        }
    }
}

/// The trailers that end a gRPC response.
pub fn grpc_trailers(status: u32, message: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    if !message.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
            trailers.insert("grpc-message", value);
        }
    }
    trailers
}

/// gRPC status codes used here.
pub mod status {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const NOT_FOUND: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
}

/// `grpc-message` is percent-encoded (outside printable ASCII and `%`).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response head for a gRPC call, with `headers` added.
pub fn response_head(headers: HeaderMap) -> http::Response<()> {
    let mut response = http::Response::new(());
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    response
}

/// A trailers-only response: the call failed before any message (`grpc-status` in the head).
pub fn trailers_only(status: u32, message: &str) -> http::Response<()> {
    let mut response = response_head(grpc_trailers(status, message));
    *response.status_mut() = http::StatusCode::OK;
    response
}

/// A gRPC request head for `path` at `authority`.
pub fn request_head(authority: &str, path: &str, tls: bool) -> http::Request<()> {
    let scheme = if tls { "https" } else { "http" };
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("{scheme}://{authority}{path}")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("http://localhost/"));
    let headers = request.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert(
        "user-agent",
        HeaderValue::from_static(concat!("konnectivity-rs/", env!("CARGO_PKG_VERSION"))),
    );
    request
}

/// Whether a request is a gRPC call (`application/grpc`, optionally `+proto`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The one value of metadata `key`: `Err` if it appears more than once.
pub fn single<'a>(headers: &'a HeaderMap, key: &str) -> Result<Option<&'a str>, String> {
    let mut values = headers.get_all(key).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("metadata {key} given more than once"));
    }
    first
        .map(|v| {
            v.to_str()
                .map_err(|_| format!("metadata {key} is not ASCII"))
        })
        .transpose()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extensions_round_trip_and_ignore_unknown_names() {
        let mut headers = HeaderMap::new();
        headers.insert(EXTENSIONS, Extensions::all(65536).header().unwrap());
        assert_eq!(headers[EXTENSIONS], "window=65536,half-close");
        assert_eq!(Extensions::from_headers(&headers), Extensions::all(65536));
        headers.insert(
            EXTENSIONS,
            HeaderValue::from_static("future, window=7, window=x"),
        );
        assert_eq!(
            Extensions::from_headers(&headers),
            Extensions {
                window: 0,
                half_close: false
            }
        );
        headers.insert(EXTENSIONS, HeaderValue::from_static("future, window=7"));
        assert_eq!(
            Extensions::from_headers(&headers),
            Extensions {
                window: 7,
                half_close: false
            }
        );
        assert_eq!(Extensions::default().header(), None);
    }

    #[test]
    fn extensions_are_on_only_when_both_sides_announce_them() {
        let agreed = Extensions::agreed(Extensions::all(100), Extensions::all(200));
        assert_eq!(
            agreed,
            Agreed {
                send_window: 200,
                recv_window: 100,
                half_close: true
            }
        );
        // An upstream peer announces nothing.
        assert_eq!(
            Extensions::agreed(Extensions::all(100), Extensions::default()),
            Agreed::default()
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("no agent: 100%\n"), "no agent: 100%25%0A");
    }
}
