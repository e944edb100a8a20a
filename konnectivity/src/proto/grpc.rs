//! gRPC's length-prefixed messages on an HTTP/2 stream (`doc/PROTOCOL-HTTP2.md` of grpc/grpc):
//! a compressed-flag byte, a 4-byte big-endian length, the message. Sans-IO: [`Deframer`]
//! takes DATA frames as they come and yields whole messages.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Largest message accepted: grpc-go's default receive limit, which every upstream peer has.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// A message that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("message of {0} bytes is over the 4 MiB limit")]
    TooLarge(usize),
    #[error("compressed message, but no compression was negotiated")]
    Compressed,
    #[error("stream ended inside a message")]
    Truncated,
}

/// Prefixes `message` for the wire.
pub fn frame(message: &[u8], out: &mut BytesMut) {
    out.reserve(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
}

/// Reassembles messages from DATA frames.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: BytesMut,
}

impl Deframer {
    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, `None` until one is complete.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let compressed = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if compressed != 0 {
            return Err(FrameError::Compressed);
        }
        if len > MAX_MESSAGE {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// At the end of the stream: an error if a message was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every split of a stream of three messages into two chunks yields the same messages.
    #[test]
    fn messages_at_every_split_point() {
        let messages: [&[u8]; 3] = [b"", b"hello", &[7u8; 300]];
        let mut wire = BytesMut::new();
        for m in messages {
            frame(m, &mut wire);
        }
        for split in 0..=wire.len() {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                d.push(chunk);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(
                got,
                messages.map(Bytes::copy_from_slice),
                "split at {split}"
            );
        }
    }

    #[test]
    fn oversized_compressed_and_truncated_are_errors() {
        let mut d = Deframer::default();
        d.push(&[0, 0, 0x40, 0, 1]);
        assert_eq!(d.next_message(), Err(FrameError::TooLarge(MAX_MESSAGE + 1)));
        let mut d = Deframer::default();
        d.push(&[1, 0, 0, 0, 1, 0]);
        assert_eq!(d.next_message(), Err(FrameError::Compressed));
        let mut d = Deframer::default();
        d.push(&[0, 0, 0, 0, 2, 0]);
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }
}
