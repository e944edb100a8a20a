//! Incremental parser for the TLS ClientHello (RFC 8446 §4.1.2, extensions per §4.2), reading
//! only what a passthrough proxy needs to route: the `server_name` (RFC 6066 §3), the ALPN
//! protocol list (RFC 7301) and whether Encrypted Client Hello is offered.
//!
//! The handshake message may be fragmented over any number of plaintext handshake records
//! (RFC 8446 §5.1) and the caller may hand over any prefix of the stream: [`parse`] answers
//! `Ok(None)` until the whole message is there. Fragments are read in place, never copied
//! into a reassembly buffer; the only allocations are the strings of the result.

use thiserror::Error;

/// Hard cap for a ClientHello handshake message across all its records (like Envoy).
pub const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;

/// The 7-byte plaintext fatal alert record `unrecognized_name(112)` (RFC 6066 §3): content
/// type alert(21), record version 0x0301, length 2, level fatal(2), description 112.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112];

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// TLSPlaintext.length must not exceed 2^14 (RFC 8446 §5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What a proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// server_name (host_name type) lowercased, with one trailing dot removed; None if absent.
    pub server_name: Option<String>,
    /// ALPN protocol names in order, lossy UTF-8.
    pub alpn: Vec<String>,
    /// true if the encrypted_client_hello extension (0xfe0d) is present.
    pub ech: bool,
    /// Bytes of the TLS records that carried the ClientHello (header + payload of every record read).
    pub record_bytes: usize,
}

/// Why the first bytes of a connection are not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HelloError {
    /// The first byte is not a handshake record (0x16), or the record version's major byte is
    /// not 3 (this includes SSLv2-compatible hellos).
    #[error("not a TLS handshake record")]
    NotTls,
    /// The first handshake message has a type other than client_hello(1).
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    /// The declared handshake message length is above the cap.
    #[error("ClientHello larger than the cap")]
    TooLarge,
    /// The records or the message break the TLS encoding rules.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

impl HelloError {
    /// Bounded metric label: "not_tls" | "not_client_hello" | "too_large" | "malformed".
    pub fn kind(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::NotClientHello => "not_client_hello",
            HelloError::TooLarge => "too_large",
            HelloError::Malformed(_) => "malformed",
        }
    }
}

/// Parses the ClientHello at the start of `buf` (the bytes the client sent so far).
///
/// `Ok(None)`: need more bytes. The handshake message may be split over any number of TLS
/// records (each at most 2^14 payload bytes; records of type 0x16 only: a record of another
/// content type before the hello is complete is `Malformed`) and `buf` may end anywhere. The
/// ClientHello must end with its last record (RFC 8446 §5.1: it precedes a key change), so
/// bytes after it in the same record are `Malformed`; bytes after that record are ignored.
///
/// `max` (clamped to [`MAX_CLIENT_HELLO_BYTES`]) caps the handshake message length: a declared
/// length above it is `TooLarge` as soon as the 4-byte handshake header is seen.
///
/// Errors are decided from the earliest bytes that prove them, so once a prefix of the stream
/// yields a result (value or error), every longer prefix yields the same one.
pub fn parse(buf: &[u8], max: usize) -> Result<Option<ClientHello>, HelloError> {
    match frame(buf, max.min(MAX_CLIENT_HELLO_BYTES))? {
        None => Ok(None),
        Some(framing) => parse_message(buf, framing).map(Some),
    }
}

/// Where the complete handshake message lies in the record stream.
#[derive(Debug, Clone, Copy)]
struct Framing {
    /// Handshake header + body length.
    message_len: usize,
    /// Bytes of the records that carry the message.
    record_bytes: usize,
}

/// Walks the record headers (and the 4-byte handshake header inside the payloads) until the
/// whole handshake message is present, checking every framing rule as soon as its bytes
/// arrive.
fn frame(buf: &[u8], max: usize) -> Result<Option<Framing>, HelloError> {
    let mut pos = 0usize; // start of the current record header
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut have = 0usize; // handshake message bytes seen so far
    let mut message_len: Option<usize> = None; // known once the handshake header is complete
    loop {
        let first = pos == 0;
        let record = buf.get(pos..).unwrap_or_default();
        let Some(&content_type) = record.first() else {
            return Ok(None);
        };
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(if first {
                HelloError::NotTls
            } else {
                HelloError::Malformed("non-handshake record before the end of the ClientHello")
            });
        }
        let Some(&major) = record.get(1) else {
            return Ok(None);
        };
        if major != 3 {
            return Err(if first {
                HelloError::NotTls
            } else {
                HelloError::Malformed("record version is not 3.x")
            });
        }
        let Some(&[len_hi, len_lo]) = record.get(3..RECORD_HEADER_LEN) else {
            return Ok(None);
        };
        let record_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if record_len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_PAYLOAD {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        let start_have = have;
        if let Some(total) = message_len {
            if start_have + record_len > total {
                return Err(HelloError::Malformed(
                    "data after the ClientHello in its record",
                ));
            }
        }
        let end = buf.len().min(pos + RECORD_HEADER_LEN + record_len);
        let payload = buf.get(pos + RECORD_HEADER_LEN..end).unwrap_or_default();
        let mut used = 0usize;
        while message_len.is_none() {
            let Some(&b) = payload.get(used) else { break };
            used += 1;
            header[have] = b;
            have += 1;
            if have == 1 && b != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello);
            }
            if have == HANDSHAKE_HEADER_LEN {
                let body_len = (usize::from(header[1]) << 16)
                    | (usize::from(header[2]) << 8)
                    | usize::from(header[3]);
                if body_len > max {
                    return Err(HelloError::TooLarge);
                }
                let total = HANDSHAKE_HEADER_LEN + body_len;
                if start_have + record_len > total {
                    return Err(HelloError::Malformed(
                        "data after the ClientHello in its record",
                    ));
                }
                message_len = Some(total);
            }
        }
        have += payload.len() - used;
        if payload.len() < record_len {
            return Ok(None);
        }
        pos += RECORD_HEADER_LEN + record_len;
        if let Some(total) = message_len {
            if have == total {
                return Ok(Some(Framing {
                    message_len: total,
                    record_bytes: pos,
                }));
            }
        }
    }
}

/// A cursor over the handshake message as it lies fragmented in the (already validated)
/// records of `buf`, with a movable limit for nested length-prefixed structures.
struct Reader<'a> {
    buf: &'a [u8],
    /// Next unread byte in `buf`.
    pos: usize,
    /// End of the current record's payload in `buf`.
    record_end: usize,
    /// Message bytes consumed so far.
    off: usize,
    /// Message offset that must not be read past (end of the innermost structure).
    limit: usize,
}

/// Internal framing inconsistency; `frame` makes it unreachable.
const FRAMING: HelloError = HelloError::Malformed("record framing");

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], message_len: usize) -> Self {
        Reader {
            buf,
            pos: 0,
            record_end: 0,
            off: 0,
            limit: message_len,
        }
    }

    fn remaining(&self) -> usize {
        self.limit - self.off
    }

    /// The unread message bytes of the current record (never empty), within the limit.
    fn chunk(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.off >= self.limit {
            return Err(HelloError::Malformed(what));
        }
        while self.pos >= self.record_end {
            let Some(&[len_hi, len_lo]) = self.buf.get(self.record_end + 3..self.record_end + 5)
            else {
                return Err(FRAMING);
            };
            self.pos = self.record_end + RECORD_HEADER_LEN;
            self.record_end = self.pos + usize::from(u16::from_be_bytes([len_hi, len_lo]));
        }
        let n = (self.record_end - self.pos).min(self.limit - self.off);
        self.buf.get(self.pos..self.pos + n).ok_or(FRAMING)
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        self.off += n;
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        let b = *self.chunk(what)?.first().ok_or(FRAMING)?;
        self.advance(1);
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        Ok(u16::from_be_bytes([self.u8(what)?, self.u8(what)?]))
    }

    fn skip(&mut self, mut n: usize, what: &'static str) -> Result<(), HelloError> {
        if n > self.remaining() {
            return Err(HelloError::Malformed(what));
        }
        while n > 0 {
            let k = self.chunk(what)?.len().min(n);
            self.advance(k);
            n -= k;
        }
        Ok(())
    }

    /// Restricts reading to the next `n` bytes; returns the previous limit for [`Self::leave`].
    fn enter(&mut self, n: usize, what: &'static str) -> Result<usize, HelloError> {
        if n > self.remaining() {
            return Err(HelloError::Malformed(what));
        }
        let outer = self.limit;
        self.limit = self.off + n;
        Ok(outer)
    }

    /// Checks the structure entered with [`Self::enter`] was consumed exactly, and leaves it.
    fn leave(&mut self, outer: usize, what: &'static str) -> Result<(), HelloError> {
        if self.off != self.limit {
            return Err(HelloError::Malformed(what));
        }
        self.limit = outer;
        Ok(())
    }
}

fn parse_message(buf: &[u8], framing: Framing) -> Result<ClientHello, HelloError> {
    let mut r = Reader::new(buf, framing.message_len);
    r.skip(HANDSHAKE_HEADER_LEN, "handshake header")?;
    let version_major = r.u8("legacy_version")?;
    r.u8("legacy_version")?;
    if version_major != 3 {
        return Err(HelloError::Malformed("legacy_version is not 3.x"));
    }
    r.skip(32, "random")?;
    let session_id_len = usize::from(r.u8("legacy_session_id")?);
    if session_id_len > 32 {
        return Err(HelloError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    r.skip(session_id_len, "legacy_session_id")?;
    let suites_len = usize::from(r.u16("cipher_suites")?);
    if suites_len < 2 || suites_len % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites length"));
    }
    r.skip(suites_len, "cipher_suites")?;
    let compression_len = usize::from(r.u8("legacy_compression_methods")?);
    if compression_len == 0 {
        return Err(HelloError::Malformed("empty legacy_compression_methods"));
    }
    r.skip(compression_len, "legacy_compression_methods")?;

    let mut hello = ClientHello {
        server_name: None,
        alpn: Vec::new(),
        ech: false,
        record_bytes: framing.record_bytes,
    };
    // Before TLS 1.3 the extensions block may be absent altogether (RFC 5246 §7.4.1.2).
    if r.remaining() == 0 {
        return Ok(hello);
    }
    let extensions_len = usize::from(r.u16("extensions length")?);
    if extensions_len != r.remaining() {
        return Err(HelloError::Malformed(
            "extensions length does not match the message",
        ));
    }
    let (mut seen_server_name, mut seen_alpn) = (false, false);
    while r.remaining() > 0 {
        let extension_type = r.u16("extension header")?;
        let len = usize::from(r.u16("extension header")?);
        let outer = r.enter(len, "extension longer than the extensions block")?;
        match extension_type {
            EXT_SERVER_NAME => {
                if seen_server_name {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                seen_server_name = true;
                hello.server_name = parse_server_name(&mut r)?;
            }
            EXT_ALPN => {
                if seen_alpn {
                    return Err(HelloError::Malformed("duplicate ALPN extension"));
                }
                seen_alpn = true;
                parse_alpn(&mut r, &mut hello.alpn)?;
            }
            EXT_ENCRYPTED_CLIENT_HELLO => {
                if hello.ech {
                    return Err(HelloError::Malformed(
                        "duplicate encrypted_client_hello extension",
                    ));
                }
                hello.ech = true;
                r.skip(len, "encrypted_client_hello")?;
            }
            _ => r.skip(len, "extension")?,
        }
        r.leave(outer, "extension has trailing bytes")?;
    }
    Ok(hello)
}

/// `ServerNameList` (RFC 6066 §3): returns the normalised host_name, if any.
fn parse_server_name(r: &mut Reader<'_>) -> Result<Option<String>, HelloError> {
    let list_len = usize::from(r.u16("server_name list length")?);
    if list_len == 0 || list_len != r.remaining() {
        return Err(HelloError::Malformed("server_name list length"));
    }
    let mut host_name: Option<String> = None;
    while r.remaining() > 0 {
        let name_type = r.u8("server_name entry")?;
        let len = usize::from(r.u16("server_name entry")?);
        if len > r.remaining() {
            return Err(HelloError::Malformed(
                "server_name entry longer than the list",
            ));
        }
        if name_type != NAME_TYPE_HOST_NAME {
            r.skip(len, "server_name entry")?;
            continue;
        }
        if host_name.is_some() {
            return Err(HelloError::Malformed("more than one host_name"));
        }
        if len == 0 {
            return Err(HelloError::Malformed("empty host_name"));
        }
        let mut name = String::with_capacity(len);
        for _ in 0..len {
            let b = r.u8("host_name")?;
            if !(0x21..=0x7e).contains(&b) {
                return Err(HelloError::Malformed(
                    "host_name byte outside visible ASCII",
                ));
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        if name.ends_with('.') {
            name.pop();
        }
        if name.is_empty() {
            return Err(HelloError::Malformed("host_name is a lone dot"));
        }
        host_name = Some(name);
    }
    Ok(host_name)
}

/// `ProtocolNameList` (RFC 7301 §3.1).
fn parse_alpn(r: &mut Reader<'_>, out: &mut Vec<String>) -> Result<(), HelloError> {
    let list_len = usize::from(r.u16("ALPN list length")?);
    if list_len < 2 || list_len != r.remaining() {
        return Err(HelloError::Malformed("ALPN list length"));
    }
    while r.remaining() > 0 {
        let len = usize::from(r.u8("ALPN protocol name")?);
        if len == 0 {
            return Err(HelloError::Malformed("empty ALPN protocol name"));
        }
        if len > r.remaining() {
            return Err(HelloError::Malformed(
                "ALPN protocol name longer than the list",
            ));
        }
        let mut name = Vec::with_capacity(len);
        for _ in 0..len {
            name.push(r.u8("ALPN protocol name")?);
        }
        out.push(match String::from_utf8(name) {
            Ok(name) => name,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real ClientHello: Python 3 `ssl` (OpenSSL 3.0.19) client, produced with
    /// `ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.set_alpn_protocols(["h2", "http/1.1"]);
    /// o = ssl.MemoryBIO(); s = ctx.wrap_bio(ssl.MemoryBIO(), o, server_hostname="api.s1.test");`
    /// then `s.do_handshake()` (raises SSLWantReadError) and `o.read().hex()`.
    const OPENSSL_HELLO_HEX: &str = concat!(
        "1603010200010001fc0303211b51acade219ca31fdf9360f7a4c934afa72ee3b06fa9359b225c58d628d5720",
        "1c99337e9837f8c67b8296312dc1fab3910466a62eb50cfa0cfc9ddf48ce2db60024130213031301c02cc030",
        "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f00000010000e00000b6170692e73",
        "312e74657374000b000403000102000a00160014001d0017001e001900180100010101020103010400230000",
        "0010000e000c02683208687474702f312e310016000000170000000d002a0028040305030603080708080809",
        "080a080b080408050806040105010601030303010302040205020602002b00050403040303002d0002010100",
        "3300260024001d0020f66c1373db4cdb061afd84c50e0a19d802370c844ff4fdaa0570755753cf7b46001500",
        "d000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn openssl_hello() -> Vec<u8> {
        unhex(OPENSSL_HELLO_HEX)
    }

    /// The handshake message inside a single-record hello.
    fn message_of(records: &[u8]) -> Vec<u8> {
        records[RECORD_HEADER_LEN..].to_vec()
    }

    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    fn ext(ty: u16, data: &[u8]) -> (u16, Vec<u8>) {
        (ty, data.to_vec())
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend_from_slice(&u16be(name.len()));
        entry.extend_from_slice(name);
        let mut data = u16be(entry.len()).to_vec();
        data.extend_from_slice(&entry);
        (EXT_SERVER_NAME, data)
    }

    fn alpn_ext(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(u8::try_from(n.len()).unwrap());
            list.extend_from_slice(n.as_bytes());
        }
        let mut data = u16be(list.len()).to_vec();
        data.extend_from_slice(&list);
        (EXT_ALPN, data)
    }

    /// key_share (51) with an X25519MLKEM768-sized (1216 bytes) and an X25519 share.
    fn pq_key_share_ext() -> (u16, Vec<u8>) {
        let mut shares = Vec::new();
        for (group, len) in [(0x11ecu16, 1216usize), (0x001d, 32)] {
            shares.extend_from_slice(&group.to_be_bytes());
            shares.extend_from_slice(&u16be(len));
            shares.extend((0..len).map(|i| (i % 251) as u8));
        }
        let mut data = u16be(shares.len()).to_vec();
        data.extend_from_slice(&shares);
        (51, data)
    }

    /// A TLS 1.3-shaped ClientHello handshake message (header included) with `extensions`.
    fn message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend((0..32).map(|i| i as u8)); // random
        body.push(32);
        body.extend([0xab; 32]); // legacy_session_id
        body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
        body.extend_from_slice(&[0x01, 0x00]);
        let mut exts = Vec::new();
        for (ty, data) in extensions {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&u16be(data.len()));
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&u16be(exts.len()));
        body.extend_from_slice(&exts);
        with_handshake_header(HANDSHAKE_CLIENT_HELLO, &body)
    }

    fn with_handshake_header(ty: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut msg = vec![ty, len[1], len[2], len[3]];
        msg.extend_from_slice(body);
        msg
    }

    /// Frames `msg` into handshake records of the given payload sizes (cycled; zero sizes are
    /// taken as one byte), the last record taking what is left.
    fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = msg;
        let mut i = 0;
        while !rest.is_empty() {
            let size = sizes[i % sizes.len()]
                .clamp(1, MAX_RECORD_PAYLOAD)
                .min(rest.len());
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&u16be(size));
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size..];
            i += 1;
        }
        out
    }

    fn one_record(msg: &[u8]) -> Vec<u8> {
        records(msg, &[MAX_RECORD_PAYLOAD])
    }

    fn parse_max(buf: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        parse(buf, MAX_CLIENT_HELLO_BYTES)
    }

    /// Every strict prefix is `Ok(None)`; the whole input gives the result, returned.
    fn assert_every_split(input: &[u8], max: usize) -> ClientHello {
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut], max), Ok(None), "prefix of {cut} bytes");
        }
        let hello = parse(input, max).unwrap().unwrap();
        assert_eq!(hello.record_bytes, input.len());
        hello
    }

    /// Once a prefix is decided, every longer prefix gives the same answer.
    fn assert_prefix_consistent(input: &[u8]) {
        let whole = parse_max(input);
        for cut in 0..input.len() {
            match parse_max(&input[..cut]) {
                Ok(None) => {}
                decided => assert_eq!(decided, whole, "prefix of {cut} bytes"),
            }
        }
    }

    #[test]
    fn real_openssl_hello() {
        let hello = parse_max(&openssl_hello()).unwrap().unwrap();
        assert_eq!(
            hello,
            ClientHello {
                server_name: Some("api.s1.test".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
                ech: false,
                record_bytes: 517,
            }
        );
    }

    #[test]
    fn real_openssl_hello_every_split() {
        let hello = assert_every_split(&openssl_hello(), MAX_CLIENT_HELLO_BYTES);
        assert_eq!(hello.server_name.as_deref(), Some("api.s1.test"));
    }

    #[test]
    fn real_openssl_hello_over_many_records_every_split() {
        let msg = message_of(&openssl_hello());
        for sizes in [&[200usize][..], &[1], &[3, 1, 100], &[4], &[5, 300]] {
            let input = records(&msg, sizes);
            assert!(input.len() >= msg.len() + 3 * RECORD_HEADER_LEN);
            let hello = assert_every_split(&input, MAX_CLIENT_HELLO_BYTES);
            assert_eq!(hello.server_name.as_deref(), Some("api.s1.test"));
            assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        }
    }

    #[test]
    fn trailing_bytes_after_the_records_are_ignored() {
        let mut input = openssl_hello();
        input.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03]);
        let hello = parse_max(&input).unwrap().unwrap();
        assert_eq!(hello.record_bytes, 517);
    }

    #[test]
    fn post_quantum_sized_hello() {
        let msg = message(&[
            sni_ext(b"api.s1.test"),
            alpn_ext(&["h2"]),
            pq_key_share_ext(),
            ext(43, &[0x02, 0x03, 0x04]),
            ext(21, &[0; 200]), // padding, as browsers add
        ]);
        assert!(msg.len() > 1500);
        let single = one_record(&msg);
        let hello = parse_max(&single).unwrap().unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("api.s1.test"));
        assert_eq!(hello.record_bytes, msg.len() + RECORD_HEADER_LEN);
        assert_every_split(&single, MAX_CLIENT_HELLO_BYTES);

        // Split over 3+ records (like a client with a small record size limit), every cut.
        let split = records(&msg, &[700, 500]);
        assert!(split.len() >= msg.len() + 3 * RECORD_HEADER_LEN);
        let hello = assert_every_split(&split, MAX_CLIENT_HELLO_BYTES);
        assert_eq!(hello.server_name.as_deref(), Some("api.s1.test"));
        assert_eq!(hello.alpn, ["h2"]);
    }

    #[test]
    fn too_large_as_soon_as_the_handshake_header_is_seen() {
        let msg = message(&[sni_ext(b"api.s1.test"), pq_key_share_ext()]);
        let input = records(&msg, &[2, 100]);
        let body_len = msg.len() - HANDSHAKE_HEADER_LEN;
        assert!(parse(&input, body_len).unwrap().is_some());
        // Header split 2+2 over two records: decided after 5+2+5+2 bytes.
        let decided = 2 * RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN;
        assert_eq!(parse(&input[..decided - 1], body_len - 1), Ok(None));
        for cut in decided..=input.len() {
            assert_eq!(
                parse(&input[..cut], body_len - 1),
                Err(HelloError::TooLarge)
            );
        }
        assert_eq!(parse(&input, 512), Err(HelloError::TooLarge));
    }

    #[test]
    fn max_is_clamped_to_the_hard_cap() {
        // Declared body length 64 KiB + 1: too large even when the caller allows more.
        let input = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x00, 0x01];
        assert_eq!(parse(&input, usize::MAX), Err(HelloError::TooLarge));
        let at_cap = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x00, 0x00];
        assert_eq!(parse(&at_cap, usize::MAX), Ok(None));
    }

    #[test]
    fn hello_at_the_hard_cap_over_five_records() {
        let small = message(&[sni_ext(b"big.example"), ext(21, &[])]);
        let padding = MAX_CLIENT_HELLO_BYTES - (small.len() - HANDSHAKE_HEADER_LEN);
        let msg = message(&[sni_ext(b"big.example"), ext(21, &vec![0; padding])]);
        assert_eq!(msg.len() - HANDSHAKE_HEADER_LEN, MAX_CLIENT_HELLO_BYTES);
        let input = records(&msg, &[MAX_RECORD_PAYLOAD]);
        let hello = parse_max(&input).unwrap().unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("big.example"));
        assert_eq!(hello.record_bytes, msg.len() + 5 * RECORD_HEADER_LEN);
        assert_eq!(parse_max(&input[..input.len() - 1]), Ok(None));
    }

    #[test]
    fn no_server_name() {
        let input = one_record(&message(&[alpn_ext(&["http/1.1"])]));
        let hello = parse_max(&input).unwrap().unwrap();
        assert_eq!(hello.server_name, None);
        assert_eq!(hello.alpn, ["http/1.1"]);
        assert!(!hello.ech);
    }

    #[test]
    fn server_name_list_without_host_name() {
        let data = [0x00, 0x04, 0x07, 0x00, 0x01, b'x'];
        let input = one_record(&message(&[ext(EXT_SERVER_NAME, &data)]));
        assert_eq!(parse_max(&input).unwrap().unwrap().server_name, None);
    }

    #[test]
    fn legacy_hello_without_extensions() {
        let mut body = vec![0x03, 0x01];
        body.extend([7; 32]);
        body.extend_from_slice(&[0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
        let input = one_record(&with_handshake_header(HANDSHAKE_CLIENT_HELLO, &body));
        let hello = parse_max(&input).unwrap().unwrap();
        assert_eq!(hello.server_name, None);
        assert!(hello.alpn.is_empty());
    }

    #[test]
    fn server_name_is_normalised() {
        for (sent, want) in [
            (&b"API.S1.Test."[..], "api.s1.test"),
            (b"Api.S1.TEST", "api.s1.test"),
            (b"a..", "a."),
            (b"x", "x"),
        ] {
            let input = one_record(&message(&[sni_ext(sent)]));
            let hello = parse_max(&input).unwrap().unwrap();
            assert_eq!(hello.server_name.as_deref(), Some(want));
        }
    }

    #[test]
    fn bad_server_names_are_malformed() {
        for name in [
            &b""[..],
            b".",
            b"a\0b",
            b"a b",
            b"caf\xc3\xa9",
            b"tab\t",
            b"\x7f",
        ] {
            let input = one_record(&message(&[sni_ext(name)]));
            assert!(
                matches!(parse_max(&input), Err(HelloError::Malformed(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn ech_is_reported() {
        let input = one_record(&message(&[
            sni_ext(b"public.example"),
            ext(EXT_ENCRYPTED_CLIENT_HELLO, &[0, 1, 2, 3]),
        ]));
        let hello = parse_max(&input).unwrap().unwrap();
        assert!(hello.ech);
        assert_eq!(hello.server_name.as_deref(), Some("public.example"));
    }

    #[test]
    fn alpn_names_are_lossy_utf8() {
        let data = [0x00, 0x04, 0x01, b'a', 0x01, 0xff];
        let input = one_record(&message(&[ext(EXT_ALPN, &data)]));
        assert_eq!(parse_max(&input).unwrap().unwrap().alpn, ["a", "\u{fffd}"]);
    }

    #[test]
    fn not_tls_after_one_byte() {
        assert_eq!(parse_max(b"G"), Err(HelloError::NotTls));
        assert_eq!(
            parse_max(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HelloError::NotTls)
        );
        assert_eq!(parse_max(b"PROXY TCP4 "), Err(HelloError::NotTls));
        assert_eq!(parse_max(&[0x16, 0x02]), Err(HelloError::NotTls));
        assert_eq!(parse_max(&[0x16]), Ok(None));
        assert_eq!(parse_max(&[]), Ok(None));
        // SSLv2-compatible CLIENT-HELLO: 2-byte header with the high bit set, msg type 1.
        let sslv2 = [
            0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
        ];
        assert_eq!(parse_max(&sslv2), Err(HelloError::NotTls));
    }

    #[test]
    fn not_client_hello() {
        let server_hello = one_record(&with_handshake_header(2, &[0x03, 0x03]));
        assert_eq!(
            parse_max(&server_hello[..6]),
            Err(HelloError::NotClientHello)
        );
        assert_eq!(parse_max(&server_hello), Err(HelloError::NotClientHello));
        assert_eq!(parse_max(&server_hello[..5]), Ok(None));
    }

    #[test]
    fn record_framing_errors() {
        let msg = message(&[sni_ext(b"api.s1.test")]);
        // A non-handshake record before the hello is complete.
        let mut input = records(&msg[..10], &[10]);
        input.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert!(matches!(parse_max(&input), Err(HelloError::Malformed(_))));
        assert!(matches!(
            parse_max(&input[..16]),
            Err(HelloError::Malformed(_))
        ));
        // Second record with a bad version.
        let mut input = records(&msg[..10], &[10]);
        input.extend_from_slice(&[0x16, 0x02]);
        assert!(matches!(parse_max(&input), Err(HelloError::Malformed(_))));
        // Empty record.
        assert!(matches!(
            parse_max(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            Err(HelloError::Malformed(_))
        ));
        // Record longer than 2^14.
        assert!(matches!(
            parse_max(&[0x16, 0x03, 0x01, 0x40, 0x01]),
            Err(HelloError::Malformed(_))
        ));
        // Record extending past the hello, decided at the handshake header.
        let mut data = msg.clone();
        data.push(0x0e);
        let input = one_record(&data);
        assert!(matches!(
            parse_max(&input[..9]),
            Err(HelloError::Malformed(_))
        ));
        // ... or at the header of a later record.
        let mut input = records(&msg[..msg.len() - 3], &[msg.len()]);
        input.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x04]);
        assert!(matches!(parse_max(&input), Err(HelloError::Malformed(_))));
    }

    #[test]
    fn structure_errors() {
        let good = message(&[sni_ext(b"a.example")]);
        let check = |msg: &[u8], why: &str| {
            let input = one_record(msg);
            assert!(
                matches!(parse_max(&input), Err(HelloError::Malformed(_))),
                "{why}: {:?}",
                parse_max(&input)
            );
            assert_prefix_consistent(&input);
        };
        let body = &good[HANDSHAKE_HEADER_LEN..];
        let rebuild = |body: &[u8]| with_handshake_header(HANDSHAKE_CLIENT_HELLO, body);

        let mut b = body.to_vec();
        b[0] = 2;
        check(&rebuild(&b), "legacy_version");
        let mut b = body.to_vec();
        b[34] = 33;
        check(&rebuild(&b), "session id > 32");
        let mut b = body.to_vec();
        b[34 + 33 + 1] = 5;
        check(&rebuild(&b), "odd cipher_suites");
        check(&rebuild(&body[..40]), "truncated session id");
        check(&rebuild(&[]), "empty body");
        let mut b = body.to_vec();
        b.push(0);
        check(&rebuild(&b), "extensions length mismatch");
        check(
            &message(&[sni_ext(b"a.example"), sni_ext(b"b.example")]),
            "duplicate server_name",
        );
        check(
            &message(&[alpn_ext(&["h2"]), alpn_ext(&["h2"])]),
            "duplicate alpn",
        );
        check(&message(&[alpn_ext(&["h2", ""])]), "empty alpn name");
        check(&message(&[ext(EXT_ALPN, &[0, 0])]), "empty alpn list");
        check(&message(&[ext(EXT_SERVER_NAME, &[])]), "empty sni ext");
        check(
            &message(&[ext(EXT_SERVER_NAME, &[0, 3, 0, 0, 5])]),
            "host_name overruns the list",
        );
        let two_names = [0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b'];
        check(
            &message(&[ext(EXT_SERVER_NAME, &two_names)]),
            "two host_names",
        );
        check(
            &message(&[ext(EXT_SERVER_NAME, &[0, 4, 0, 0, 1, b'a', 0xff])]),
            "trailing byte in sni ext",
        );
        let mut no_compression = body[..34 + 33 + 8].to_vec();
        no_compression.push(0);
        check(&rebuild(&no_compression), "no compression methods");
    }

    #[test]
    fn every_single_byte_corruption_is_handled() {
        let original = records(&message_of(&openssl_hello()), &[100, 7]);
        for i in 0..original.len() {
            for v in [0x00, 0x01, 0x16, 0x7f, 0x80, 0xff] {
                let mut input = original.clone();
                input[i] = v;
                let _ = parse_max(&input);
                let _ = parse(&input, 512);
            }
        }
    }

    #[test]
    fn truncated_inputs_do_not_panic() {
        let input = one_record(&message(&[
            sni_ext(b"api.s1.test"),
            pq_key_share_ext(),
            ext(EXT_ENCRYPTED_CLIENT_HELLO, &[1]),
        ]));
        // Shrink the declared handshake body length: the structures overrun it.
        for shrink in 1..200 {
            let mut bad = input.clone();
            let body_len = input.len() - RECORD_HEADER_LEN - HANDSHAKE_HEADER_LEN - shrink;
            bad[3..5].copy_from_slice(&u16be(body_len + HANDSHAKE_HEADER_LEN));
            bad[6..9].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
            bad.truncate(input.len() - shrink);
            assert!(matches!(parse_max(&bad), Err(HelloError::Malformed(_))));
        }
    }

    #[test]
    fn alert_and_kinds() {
        assert_eq!(ALERT_UNRECOGNIZED_NAME, [21, 3, 1, 0, 2, 2, 112]);
        assert_eq!(HelloError::NotTls.kind(), "not_tls");
        assert_eq!(HelloError::NotClientHello.kind(), "not_client_hello");
        assert_eq!(HelloError::TooLarge.kind(), "too_large");
        assert_eq!(HelloError::Malformed("x").kind(), "malformed");
        assert_eq!(
            HelloError::Malformed("empty host_name").to_string(),
            "malformed ClientHello: empty host_name"
        );
    }

    fn host_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9-]{1,20}(\\.[a-zA-Z0-9-]{1,20}){0,4}\\.?"
    }

    fn extra_extensions() -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
        proptest::collection::btree_map(
            any::<u16>().prop_filter("interpreted extension", |t| {
                ![EXT_SERVER_NAME, EXT_ALPN, EXT_ENCRYPTED_CLIENT_HELLO].contains(t)
            }),
            proptest::collection::vec(any::<u8>(), 0..300),
            0..8,
        )
        .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_max(&bytes);
        }

        #[test]
        fn random_record_payloads_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..1024),
            sizes in proptest::collection::vec(1usize..64, 1..8),
            max in 0usize..2048,
        ) {
            let mut msg = vec![HANDSHAKE_CLIENT_HELLO, 0, 0, 0];
            msg[2..4].copy_from_slice(&u16be(payload.len()));
            msg.extend_from_slice(&payload);
            let input = records(&msg, &sizes);
            let _ = parse(&input, max);
            assert_prefix_consistent(&input);
        }

        #[test]
        fn random_valid_hellos_round_trip(
            name in host_name(),
            extras in extra_extensions(),
            sni_position in 0usize..8,
            ech in any::<bool>(),
            sizes in proptest::collection::vec(1usize..600, 1..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 8),
        ) {
            let mut exts = extras;
            exts.insert(sni_position.min(exts.len()), sni_ext(name.as_bytes()));
            if ech {
                exts.push(ext(EXT_ENCRYPTED_CLIENT_HELLO, &[0; 40]));
            }
            let input = records(&message(&exts), &sizes);
            let hello = parse_max(&input).unwrap().unwrap();
            let mut want = name.to_ascii_lowercase();
            if want.ends_with('.') {
                want.pop();
            }
            prop_assert_eq!(hello.server_name, Some(want));
            prop_assert_eq!(hello.ech, ech);
            prop_assert_eq!(hello.record_bytes, input.len());
            for cut in cuts {
                let cut = cut.index(input.len());
                prop_assert_eq!(parse_max(&input[..cut]), Ok(None));
            }
        }
    }
}
