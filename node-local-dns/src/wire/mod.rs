//! The DNS wire codec (RFC 1035 §4.1), sans-IO: it reads client queries, turns upstream
//! responses into cacheable *wire images* and renders replies from them, and never touches a
//! socket or a clock.
//!
//! A wire image is the upstream message with its OPT record cut off (RFC 6891 §6.1.1), kept in
//! the upstream's own layout so every compression pointer stays valid, plus the byte offsets
//! of every TTL field. A reply is the image copied, its header patched, the client's exact
//! question bytes copied over the stored question (same length, since the two are equal
//! case-insensitively, which echoes DNS 0x20 mixed case exactly), every TTL rewritten to the
//! remaining lifetime and a fresh OPT appended when the query had one. The representation is
//! flat on purpose: an eBPF mirror of the cache answers hits the same way.
//!
//! Parsing is strict where a cache must be (every RR is walked, compression pointers must point
//! backwards, outside the header and never into a TTL field that rendering rewrites) and
//! treats unknown types and classes as opaque RDATA (RFC 3597).
//!
//! One file per layer: `query` reads client queries (and writes the ones the forwarder and the
//! agent send themselves), `image` checks upstream responses and turns them into wire images,
//! `render` makes replies from images and header-only answers, and `name` holds the name
//! walking they share. This module is their public surface. The `ResponseBuilder` that makes
//! upstream responses for tests, fuzzing and the demo is in `testing`, behind the
//! `test-support` feature.

use thiserror::Error;

mod image;
mod name;
mod query;
mod render;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod test_util;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use image::{parse_response, ResponseInfo, WireImage};
pub use name::encode_name;
pub use query::{build_query, lowercase_qname, parse_query, Edns, Query};
pub use render::{render, render_error, render_reject, render_uncached, Rendered};

/// Largest DNS message: the TCP length prefix is 16 bits (RFC 1035 §4.2.2).
pub const MAX_MESSAGE: usize = 65_535;
/// Our advertised EDNS UDP payload size, and the cap on what a client may ask for.
pub const OUR_UDP_SIZE: u16 = 1232;
/// UDP payload limit without EDNS (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_SIZE: u16 = 512;

/// Resource record types the codec and its callers name (RFC 1035 §3.2.2 and later RFCs).
pub mod rtype {
    /// IPv4 host address (RFC 1035).
    pub const A: u16 = 1;
    /// Authoritative name server (RFC 1035).
    pub const NS: u16 = 2;
    /// Canonical name (RFC 1035).
    pub const CNAME: u16 = 5;
    /// Start of a zone of authority (RFC 1035).
    pub const SOA: u16 = 6;
    /// Domain name pointer (RFC 1035).
    pub const PTR: u16 = 12;
    /// Mail exchange (RFC 1035).
    pub const MX: u16 = 15;
    /// Text strings (RFC 1035).
    pub const TXT: u16 = 16;
    /// Signature; in the additional section of a response it is SIG(0) (RFC 2931).
    pub const SIG: u16 = 24;
    /// IPv6 host address (RFC 3596).
    pub const AAAA: u16 = 28;
    /// Service location (RFC 2782).
    pub const SRV: u16 = 33;
    /// EDNS(0) pseudo-record (RFC 6891).
    pub const OPT: u16 = 41;
    /// Transaction signature (RFC 8945).
    pub const TSIG: u16 = 250;
    /// QTYPE `*`: any type (RFC 1035 §3.2.3).
    pub const ANY: u16 = 255;
}

/// Response codes (RFC 1035 §4.1.1, RFC 6891 §9).
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// The server could not interpret the query.
    pub const FORMERR: u8 = 1;
    /// The server failed to process the query.
    pub const SERVFAIL: u8 = 2;
    /// The queried name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// The kind of query is not implemented.
    pub const NOTIMP: u8 = 4;
    /// The server refuses to answer.
    pub const REFUSED: u8 = 5;
    /// Unsupported EDNS version (RFC 6891 §9): 12-bit extended, so only for
    /// [`render_error`](super::render_error) on a query with an OPT.
    pub const BADVERS: u16 = 16;
}

const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;
/// A name is at most 255 octets in wire form, root label included (RFC 1035 §3.1).
const MAX_NAME: usize = 255;

/// An OPT record without options: root owner, type, class, ttl, rdlength.
const OPT_RR_LEN: usize = 11;
/// TTLs are 31-bit; larger values are treated as zero (RFC 2181 §8).
const MAX_TTL: u32 = 0x7FFF_FFFF;

const SECTION_ANSWER: usize = 0;
const SECTION_AUTHORITY: usize = 1;
const SECTION_ADDITIONAL: usize = 2;

// Header flag bits in the second 16-bit word (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD/CD).
const FLAG_QR: u16 = 0x8000;
const FLAG_OPCODE: u16 = 0x7800;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
const FLAG_RCODE: u16 = 0x000F;

/// Why a message cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The message ends before a field it announces.
    #[error("message too short")]
    Short,
    /// The message is not valid DNS (or a response does not match its query).
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A message that is not a query we implement: a response (QR=1) or an opcode other than
    /// QUERY. (A QUERY with the wrong counts or TC set is Malformed: FORMERR, RFC 9619 and
    /// RFC 6891 §6.1.1.)
    #[error("not a standard query")]
    NotQuery,
}

impl WireError {
    /// A fixed label for metrics: "short", "malformed" or "not_query".
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Short => "short",
            WireError::Malformed(_) => "malformed",
            WireError::NotQuery => "not_query",
        }
    }
}

/// A TTL as a cache uses it: values with the top bit set count as 0 (RFC 2181 §8).
fn clamp_ttl(ttl: u32) -> u32 {
    if ttl > MAX_TTL {
        0
    } else {
        ttl
    }
}

fn be16(packet: &[u8], at: usize) -> Result<u16, WireError> {
    match packet.get(at..at + 2) {
        Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
        _ => Err(WireError::Short),
    }
}

fn be32(packet: &[u8], at: usize) -> Result<u32, WireError> {
    match packet.get(at..at + 4) {
        Some(&[a, b, c, d]) => Ok(u32::from_be_bytes([a, b, c, d])),
        _ => Err(WireError::Short),
    }
}

/// Overwrites a 16-bit field; a no-op if `bytes` is too short (never for our callers).
fn put16(bytes: &mut [u8], at: usize, value: u16) {
    if let Some(field) = bytes.get_mut(at..at + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        assert_eq!(WireError::Short.kind(), "short");
        assert_eq!(WireError::Malformed("x").kind(), "malformed");
        assert_eq!(WireError::NotQuery.kind(), "not_query");
    }
}
