//! kube-apiserver dials the gRPC frontend with the socket's path as its gRPC target, so the
//! `:authority` of its requests is that path (grpc-go percent-encodes it, older versions send
//! it raw: `tmp%2Fkonnectivity-server.socket`, `/etc/kubernetes/...`). That is not a valid
//! URI authority, and the `http` types under the `h2` server refuse the request with
//! PROTOCOL_ERROR. Upstream's Go server never looks at it.
//!
//! [`AuthorityFix`] sits between the client's bytes and the HTTP/2 server: it passes every
//! frame through unchanged except header blocks, which it decodes (HPACK, keeping the client's
//! dynamic table), gives a `localhost` authority when theirs is not valid, and re-encodes for
//! the server with an HPACK encoder of its own (so both dynamic tables stay consistent). The
//! server's direction is untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BufMut as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame passed through (the frontend's HTTP/2 server allows 64 KiB).
const MAX_FRAME: usize = 1 << 20;
/// Largest header block re-emitted in one frame (HTTP/2's default frame size).
const OUT_FRAME: usize = 16_384;

/// The client's stream, with header blocks' `:authority` made valid.
pub struct AuthorityFix<S> {
    inner: S,
    input: BytesMut,
    output: BytesMut,
    preface_left: usize,
    /// A header block being collected: stream, flags of the HEADERS frame, fragments.
    block: Option<(u32, u8, BytesMut)>,
    decoder: hpack::Decoder<'static>,
    encoder: hpack::Encoder<'static>,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix").finish_non_exhaustive()
    }
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            input: BytesMut::with_capacity(16 << 10),
            output: BytesMut::new(),
            preface_left: PREFACE.len(),
            block: None,
            decoder: hpack::Decoder::new(),
            encoder: hpack::Encoder::new(),
            eof: false,
        }
    }

    /// Moves whole frames from `input` to `output`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.input.len());
            self.output.extend_from_slice(&self.input.split_to(n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.input.len() >= 9 {
            let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
            if len > MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 frame too large",
                ));
            }
            if self.input.len() < 9 + len {
                self.input.reserve(9 + len - self.input.len());
                return Ok(());
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream =
                u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]])
                    & 0x7fff_ffff;
            match kind {
                HEADERS | CONTINUATION => {
                    let mut frame = self.input.split_to(9 + len);
                    frame.advance(9);
                    self.header_fragment(kind, flags, stream, frame)?;
                }
                _ => {
                    if self.block.is_some() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "frame inside a header block",
                        ));
                    }
                    let frame = self.input.split_to(9 + len);
                    self.output.extend_from_slice(&frame);
                }
            }
        }
        Ok(())
    }

    fn header_fragment(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        mut payload: BytesMut,
    ) -> io::Result<()> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP/2 HEADERS: {what}"),
            )
        };
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(bad("a new block inside a block"));
            }
            let mut pad = 0;
            if flags & PADDED != 0 {
                if payload.is_empty() {
                    return Err(bad("padding length missing"));
                }
                pad = payload.get_u8() as usize;
            }
            if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(bad("priority missing"));
                }
                payload.advance(5);
            }
            if pad > payload.len() {
                return Err(bad("padding longer than the frame"));
            }
            payload.truncate(payload.len() - pad);
            self.block = Some((stream, flags, payload));
        } else {
            match &mut self.block {
                Some((s, _, block)) if *s == stream => block.extend_from_slice(&payload),
                _ => return Err(bad("CONTINUATION without HEADERS")),
            }
        }
        let end = flags & END_HEADERS != 0;
        if !end {
            return Ok(());
        }
        let Some((stream, first_flags, block)) = self.block.take() else {
            return Ok(());
        };
        let headers = self
            .decoder
            .decode(&block)
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        let fixed: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(name, value)| {
                if name == b":authority"
                    && http::uri::Authority::try_from(value.as_slice()).is_err()
                {
                    (name, b"localhost".to_vec())
                } else {
                    (name, value)
                }
            })
            .collect();
        let encoded = self
            .encoder
            .encode(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        // One HEADERS (END_STREAM kept), then CONTINUATIONs if the block is large.
        let mut chunks = encoded.chunks(OUT_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let (kind, mut flags) = if first {
                (HEADERS, first_flags & END_STREAM)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            self.output.put_uint(chunk.len() as u64, 3);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(stream);
            self.output.extend_from_slice(chunk);
            first = false;
        }
        if encoded.is_empty() {
            self.output.put_uint(0, 3);
            self.output.put_u8(HEADERS);
            self.output.put_u8((first_flags & END_STREAM) | END_HEADERS);
            self.output.put_u32(stream);
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 << 10];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                        continue;
                    }
                    this.input.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_uint(payload.len() as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// What comes out decodes, with a fresh decoder, to the same headers with a valid
    /// authority; other frames are unchanged; padding, priority and CONTINUATION are undone;
    /// a second request's indexed references still resolve. Fed in every chunking.
    #[tokio::test]
    async fn header_blocks_get_a_valid_authority_and_everything_else_passes() {
        let mut client = hpack::Encoder::new();
        let req = |authority: &[u8]| {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (b":path".to_vec(), b"/ProxyService/Proxy".to_vec()),
                (b":authority".to_vec(), authority.to_vec()),
                (b"content-type".to_vec(), b"application/grpc".to_vec()),
            ]
        };
        let first = client.encode(
            req(b"tmp%2Fkonn.sock")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        let second = client.encode(
            req(b"tmp%2Fkonn.sock")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
                                                              // HEADERS, padded and with priority, split into a CONTINUATION.
        let (a, b) = first.split_at(first.len() / 2);
        let mut padded = vec![2u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0]);
        wire.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(0x0, 0, 1, b"data"));
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        for split in [1, 7, 9, 30, wire.len()] {
            let (mut near, far) = tokio::io::duplex(1 << 20);
            let chunks: Vec<Vec<u8>> = wire.chunks(split).map(<[u8]>::to_vec).collect();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                for c in chunks {
                    near.write_all(&c).await.unwrap();
                }
            });
            let mut fixed = AuthorityFix::new(far);
            let mut out = Vec::new();
            fixed.read_to_end(&mut out).await.unwrap();
            writer.await.unwrap();
            assert!(out.starts_with(PREFACE));
            let mut rest = &out[PREFACE.len()..];
            let mut server = hpack::Decoder::new();
            let mut seen = Vec::new();
            while rest.len() >= 9 {
                let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
                let (kind, flags) = (rest[3], rest[4]);
                let payload = &rest[9..9 + len];
                if kind == HEADERS {
                    assert_eq!(flags & (PADDED | PRIORITY), 0);
                    assert_ne!(flags & END_HEADERS, 0);
                    let headers = server.decode(payload).unwrap();
                    let authority = headers.iter().find(|(n, _)| n == b":authority").unwrap();
                    assert_eq!(authority.1, b"localhost");
                    seen.push((kind, flags & END_STREAM));
                } else {
                    seen.push((kind, flags));
                }
                rest = &rest[9 + len..];
            }
            assert_eq!(
                seen,
                [(0x4, 0), (HEADERS, 0), (0x0, 0), (HEADERS, END_STREAM)],
                "split {split}"
            );
        }
    }
}
