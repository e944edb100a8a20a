//! Incremental parser and encoder for the HAProxy PROXY protocol header, version 1 (one text
//! line) and version 2 (binary, with TLVs), as specified in HAProxy's `proxy-protocol.txt`.
//!
//! [`parse`] takes the bytes received so far and says whether they are a complete header, the
//! prefix of one, or not a PROXY header at all; the latter is decided from the first byte that
//! differs from both signatures, so a listener where the header is optional can tell a TLS
//! ClientHello (0x16) or an HTTP request apart after one byte. [`encode_v2`] writes the header
//! sent to backends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// PROXY v2 TLV type for the authority (SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;

const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line including CRLF (the spec's worst case, an UNKNOWN line with two IPv6
/// addresses and two ports).
const V1_MAX_LEN: usize = 107;
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Signature, version/command, family/transport, 2-byte length.
const V2_FIXED_LEN: usize = 16;
/// Largest v2 address + TLV block accepted: the whole header fits in 65535 bytes.
const V2_MAX_BLOCK: usize = u16::MAX as usize - V2_FIXED_LEN;
const V2_VERSION: u8 = 0x2;
const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_AF_UNSPEC: u8 = 0x0;
const V2_AF_INET: u8 = 0x1;
const V2_AF_INET6: u8 = 0x2;
const V2_AF_UNIX: u8 = 0x3;
const V2_TRANSPORT_STREAM: u8 = 0x1;
const V2_TRANSPORT_DGRAM: u8 = 0x2;
const V2_INET_BLOCK: usize = 2 * 4 + 2 * 2;
const V2_INET6_BLOCK: usize = 2 * 16 + 2 * 2;
const V2_UNIX_BLOCK: usize = 2 * 108;
const TLV_HEADER_LEN: usize = 3;

/// A complete PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Which version of the protocol the header used.
    pub version: Version,
    /// None for LOCAL (v2) / UNKNOWN (v1) / unsupported families (AF_UNIX, UNSPEC)
    pub addresses: Option<Addresses>,
    /// v2 TLVs as (type, value), in order; empty for v1.
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// total header length in bytes (what to strip from the stream)
    pub len: usize,
}

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text format (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary format (12-byte signature).
    V2,
}

/// The original connection's endpoints as reported by the proxy in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client's address.
    pub source: std::net::SocketAddr,
    /// The address the client connected to.
    pub destination: std::net::SocketAddr,
}

/// Why the first bytes of a connection are not a usable PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProxyError {
    /// The bytes do not start with the v1 (`PROXY `) or the v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// The signature matched but the rest breaks the specification.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// A v1 line without CRLF within 107 bytes, or a v2 header over 65535 bytes.
    #[error("PROXY protocol header too large")]
    TooLarge,
}

impl ProxyError {
    /// Bounded metric label: "not_proxy" | "malformed" | "too_large".
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NotProxy => "not_proxy",
            ProxyError::Malformed(_) => "malformed",
            ProxyError::TooLarge => "too_large",
        }
    }
}

/// Parses the PROXY header at the start of `buf`.
///
/// `Ok(None)`: `buf` is a prefix of a possible PROXY header, need more bytes.
/// `Err(NotProxy)`: `buf` does not start like a v1 (`PROXY `) or v2 (12-byte signature)
/// header, decided at the first byte that differs (a TLS ClientHello is `NotProxy` after one
/// byte).
///
/// v1: at most 107 bytes including CRLF (`TooLarge` beyond that without CRLF); `TCP4`, `TCP6`
/// (addresses of that family, ports 0-65535 without leading zeroes, single spaces) or
/// `UNKNOWN` (the rest of the line is ignored); only printable ASCII before the CRLF.
///
/// v2: version 2, command LOCAL or PROXY. LOCAL ignores the whole block (no addresses, no
/// TLVs). PROXY: AF_INET/AF_INET6 with STREAM or DGRAM give addresses; AF_UNSPEC (empty
/// address part), AF_UNIX, and AF_INET/AF_INET6 with an unspecified transport give none, but
/// their block is consumed and the TLVs after the address part are parsed (a TLV overrunning
/// the block is `Malformed`). Blocks over 65535 - 16 bytes are `TooLarge`.
///
/// Once a prefix of the stream yields a result (value or error), every longer prefix yields
/// the same one.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(0x0D) => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Checks that `buf` and `signature` agree on their common length; true once `buf` holds all
/// of `signature`.
fn starts_with_signature(buf: &[u8], signature: &[u8]) -> Result<bool, ProxyError> {
    if buf.iter().zip(signature).any(|(a, b)| a != b) {
        return Err(ProxyError::NotProxy);
    }
    Ok(buf.len() >= signature.len())
}

fn parse_v1(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    if !starts_with_signature(buf, V1_PREFIX)? {
        return Ok(None);
    }
    let scanned = buf.len().min(V1_MAX_LEN);
    for (i, &b) in buf.iter().enumerate().take(scanned).skip(V1_PREFIX.len()) {
        match b {
            b'\r' => {
                if i + 2 > V1_MAX_LEN {
                    return Err(ProxyError::TooLarge);
                }
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => {
                        let line = buf.get(V1_PREFIX.len()..i).unwrap_or_default();
                        parse_v1_line(line, i + 2).map(Some)
                    }
                    Some(_) => Err(ProxyError::Malformed("v1 CR not followed by LF")),
                };
            }
            0x20..=0x7e => {}
            _ => {
                return Err(ProxyError::Malformed(
                    "v1 line has a byte outside printable ASCII",
                ))
            }
        }
    }
    if buf.len() >= V1_MAX_LEN {
        Err(ProxyError::TooLarge)
    } else {
        Ok(None)
    }
}

/// `line` is what follows `PROXY ` up to (not including) the CRLF; all printable ASCII.
fn parse_v1_line(line: &[u8], len: usize) -> Result<ProxyHeader, ProxyError> {
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 line"))?;
    let header = |addresses| ProxyHeader {
        version: Version::V1,
        addresses,
        tlvs: Vec::new(),
        len,
    };
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(header(None));
    }
    let mut fields = line.split(' ');
    let protocol = fields.next().unwrap_or_default();
    let mut field = || {
        fields
            .next()
            .ok_or(ProxyError::Malformed("v1 line has too few fields"))
    };
    let (src, dst, src_port, dst_port) = (field()?, field()?, field()?, field()?);
    if fields.next().is_some() {
        return Err(ProxyError::Malformed("v1 line has too many fields"));
    }
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match protocol {
        "TCP4" => (
            parse_ip::<Ipv4Addr>(src)?.into(),
            parse_ip::<Ipv4Addr>(dst)?.into(),
        ),
        "TCP6" => (
            parse_ip::<Ipv6Addr>(src)?.into(),
            parse_ip::<Ipv6Addr>(dst)?.into(),
        ),
        _ => {
            return Err(ProxyError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(header(Some(Addresses {
        source: SocketAddr::new(src_ip, parse_port(src_port)?),
        destination: SocketAddr::new(dst_ip, parse_port(dst_port)?),
    })))
}

/// An address of the family the line announced. std's IPv4 parser already rejects leading
/// zeroes, as the spec requires.
fn parse_ip<T: std::str::FromStr>(s: &str) -> Result<T, ProxyError> {
    s.parse()
        .map_err(|_| ProxyError::Malformed("v1 address invalid for its protocol"))
}

/// A decimal port in 0..=65535 without leading zeroes.
fn parse_port(s: &str) -> Result<u16, ProxyError> {
    const BAD: ProxyError = ProxyError::Malformed("v1 port");
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(BAD);
    }
    s.parse().map_err(|_| BAD)
}

fn parse_v2(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    if !starts_with_signature(buf, &V2_SIGNATURE)? {
        return Ok(None);
    }
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    if version_command >> 4 != V2_VERSION {
        return Err(ProxyError::Malformed("v2 version is not 2"));
    }
    let command = version_command & 0x0f;
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(ProxyError::Malformed("v2 command is not LOCAL or PROXY"));
    }
    let Some(&family_transport) = buf.get(13) else {
        return Ok(None);
    };
    let (family, transport) = (family_transport >> 4, family_transport & 0x0f);
    // With LOCAL the family is ignored altogether (spec §2.2).
    if command == V2_CMD_PROXY && (family > V2_AF_UNIX || transport > V2_TRANSPORT_DGRAM) {
        return Err(ProxyError::Malformed("v2 address family or transport"));
    }
    let Some(&[len_hi, len_lo]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(None);
    };
    let block_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if block_len > V2_MAX_BLOCK {
        return Err(ProxyError::TooLarge);
    }
    let len = V2_FIXED_LEN + block_len;
    let Some(block) = buf.get(V2_FIXED_LEN..len) else {
        return Ok(None);
    };
    let mut header = ProxyHeader {
        version: Version::V2,
        addresses: None,
        tlvs: Vec::new(),
        len,
    };
    if command == V2_CMD_LOCAL {
        return Ok(Some(header));
    }
    let address_len = match family {
        V2_AF_UNSPEC => 0,
        V2_AF_INET => V2_INET_BLOCK,
        V2_AF_INET6 => V2_INET6_BLOCK,
        _ => V2_UNIX_BLOCK, // V2_AF_UNIX, the only other family accepted above
    };
    let (address_block, mut tlvs) =
        block
            .split_at_checked(address_len)
            .ok_or(ProxyError::Malformed(
                "v2 block too short for its address family",
            ))?;
    if transport == V2_TRANSPORT_STREAM || transport == V2_TRANSPORT_DGRAM {
        header.addresses = match family {
            V2_AF_INET => Some(inet_addresses(address_block)),
            V2_AF_INET6 => Some(inet6_addresses(address_block)),
            _ => None,
        };
    }
    while !tlvs.is_empty() {
        let Some(&[tlv_type, len_hi, len_lo]) = tlvs.get(..TLV_HEADER_LEN) else {
            return Err(ProxyError::Malformed("v2 TLV header overruns the block"));
        };
        let value_end = TLV_HEADER_LEN + usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let Some(value) = tlvs.get(TLV_HEADER_LEN..value_end) else {
            return Err(ProxyError::Malformed("v2 TLV value overruns the block"));
        };
        header.tlvs.push((tlv_type, value.to_vec()));
        tlvs = tlvs.get(value_end..).unwrap_or_default();
    }
    Ok(Some(header))
}

/// Reads `N` bytes at `at`; the caller guarantees `block` is long enough (zeros otherwise).
fn array<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(bytes) = block.get(at..at + N) {
        out.copy_from_slice(bytes);
    }
    out
}

/// src addr (4), dst addr (4), src port, dst port.
fn inet_addresses(block: &[u8]) -> Addresses {
    let port = |at| u16::from_be_bytes(array(block, at));
    Addresses {
        source: SocketAddr::new(Ipv4Addr::from(array::<4>(block, 0)).into(), port(8)),
        destination: SocketAddr::new(Ipv4Addr::from(array::<4>(block, 4)).into(), port(10)),
    }
}

/// src addr (16), dst addr (16), src port, dst port.
fn inet6_addresses(block: &[u8]) -> Addresses {
    let port = |at| u16::from_be_bytes(array(block, at));
    Addresses {
        source: SocketAddr::new(Ipv6Addr::from(array::<16>(block, 0)).into(), port(32)),
        destination: SocketAddr::new(Ipv6Addr::from(array::<16>(block, 16)).into(), port(34)),
    }
}

/// Appends a v2 PROXY (command PROXY, STREAM) header for `addrs` with the given TLVs to `out`.
///
/// Mixed families (v4 source, v6 destination) are encoded as IPv6 using v4-mapped addresses.
/// A TLV that cannot be encoded — value longer than 65535 bytes, or one that would push the
/// header past the 65535 bytes [`parse`] accepts — is left out rather than panicking.
pub fn encode_v2(addrs: &Addresses, tlvs: &[(u8, &[u8])], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&V2_SIGNATURE);
    out.push((V2_VERSION << 4) | V2_CMD_PROXY);
    let (source, destination) = (addrs.source, addrs.destination);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push((V2_AF_INET << 4) | V2_TRANSPORT_STREAM);
            out.extend_from_slice(&[0, 0]); // block length, patched below
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push((V2_AF_INET6 << 4) | V2_TRANSPORT_STREAM);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&as_ipv6(src).octets());
            out.extend_from_slice(&as_ipv6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    for &(tlv_type, value) in tlvs {
        let Ok(value_len) = u16::try_from(value.len()) else {
            continue;
        };
        if out.len() - start + TLV_HEADER_LEN + value.len() > V2_FIXED_LEN + V2_MAX_BLOCK {
            continue;
        }
        out.push(tlv_type);
        out.extend_from_slice(&value_len.to_be_bytes());
        out.extend_from_slice(value);
    }
    // At most V2_MAX_BLOCK by construction.
    let block_len = u16::try_from(out.len() - start - V2_FIXED_LEN).unwrap_or(u16::MAX);
    if let Some(len_field) = out.get_mut(start + 14..start + V2_FIXED_LEN) {
        len_field.copy_from_slice(&block_len.to_be_bytes());
    }
}

fn as_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(source: &str, destination: &str) -> Addresses {
        Addresses {
            source: sa(source),
            destination: sa(destination),
        }
    }

    /// v2 header with a raw version/command byte, family byte and block.
    fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn inet_block() -> Vec<u8> {
        vec![10, 0, 0, 1, 192, 0, 2, 7, 0xdc, 0x04, 0x01, 0xbb]
    }

    /// Every strict prefix is `Ok(None)`; the whole input gives the header, returned.
    fn assert_every_split(input: &[u8]) -> ProxyHeader {
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        parse(input).unwrap().unwrap()
    }

    /// Once a prefix is decided, every longer prefix gives the same answer.
    fn assert_prefix_consistent(input: &[u8]) {
        let whole = parse(input);
        for cut in 0..input.len() {
            match parse(&input[..cut]) {
                Ok(None) => {}
                decided => assert_eq!(decided, whole, "prefix of {cut} bytes"),
            }
        }
    }

    fn malformed(input: &[u8]) -> bool {
        matches!(parse(input), Err(ProxyError::Malformed(_)))
    }

    #[test]
    fn v1_tcp4_with_payload() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        let mut input = line.to_vec();
        input.extend_from_slice(b"\x16\x03\x01");
        let header = parse(&input).unwrap().unwrap();
        assert_eq!(
            header,
            ProxyHeader {
                version: Version::V1,
                addresses: Some(addrs("192.168.0.1:56324", "192.168.0.11:443")),
                tlvs: vec![],
                len: line.len(),
            }
        );
        assert_eq!(assert_every_split(line), header);
    }

    #[test]
    fn v1_tcp6() {
        let line = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\n";
        let header = assert_every_split(line);
        assert_eq!(
            header.addresses,
            Some(addrs("[2001:db8::1]:0", "[::ffff:10.0.0.1]:65535"))
        );
        assert_eq!(header.len, line.len());
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
            ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), 104);
        assert_eq!(assert_every_split(longest).len, 104);
    }

    #[test]
    fn v1_unknown() {
        let short = b"PROXY UNKNOWN\r\n";
        let header = assert_every_split(short);
        assert_eq!(header.addresses, None);
        assert_eq!(header.len, 15);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN - 2, b'f');
        long.extend_from_slice(b"\r\n");
        assert_eq!(assert_every_split(&long).len, V1_MAX_LEN);
        assert!(malformed(b"PROXY UNKNOWNX\r\n"));
    }

    #[test]
    fn v1_too_large() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN - 1, b'f');
        assert_eq!(parse(&long), Ok(None));
        long.push(b'\r'); // CR at byte 107: the LF would be the 108th byte
        assert_eq!(parse(&long), Err(ProxyError::TooLarge));
        long.push(b'\n');
        assert_eq!(parse(&long), Err(ProxyError::TooLarge));
        let mut no_crlf = b"PROXY TCP4 ".to_vec();
        no_crlf.resize(V1_MAX_LEN, b'1');
        assert_eq!(parse(&no_crlf), Err(ProxyError::TooLarge));
        assert_eq!(parse(&no_crlf[..V1_MAX_LEN - 1]), Ok(None));
    }

    #[test]
    fn v1_strict_syntax() {
        for line in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 1\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 80 443\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 80 443\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 80 443\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX",
            b"PROXY TCP4 1.2.3.4\t5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\xc3\xa9\r\n",
        ] {
            assert!(malformed(line), "{:?}", String::from_utf8_lossy(line));
            assert_prefix_consistent(line);
        }
        let ok = parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 1\r\n").unwrap();
        assert!(ok.is_some());
    }

    #[test]
    fn not_proxy_as_early_as_possible() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[0x16]), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"C"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"PROXY"), Ok(None));
        assert_eq!(parse(b"POST"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXY\t"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\r\n\r\n"), Ok(None));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\r\nGET"), Err(ProxyError::NotProxy));
        let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        hello.resize(100, 0);
        assert_eq!(parse(&hello), Err(ProxyError::NotProxy));
    }

    #[test]
    fn v2_inet_with_payload() {
        let mut input = v2(0x21, 0x11, &inet_block());
        let header_len = input.len();
        let header = assert_every_split(&input);
        input.extend_from_slice(b"payload");
        assert_eq!(parse(&input).unwrap().unwrap(), header);
        assert_eq!(
            header,
            ProxyHeader {
                version: Version::V2,
                addresses: Some(addrs("10.0.0.1:56324", "192.0.2.7:443")),
                tlvs: vec![],
                len: header_len,
            }
        );
        assert_eq!(header_len, 28);
    }

    #[test]
    fn v2_inet6_and_dgram() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0x00, 0x01, 0x01, 0xbb]);
        let header = assert_every_split(&v2(0x21, 0x21, &block));
        assert_eq!(
            header.addresses,
            Some(addrs("[2001:db8::1]:1", "[2001:db8::2]:443"))
        );
        assert_eq!(header.len, 16 + 36);
        let dgram = parse(&v2(0x21, 0x12, &inet_block())).unwrap().unwrap();
        assert_eq!(
            dgram.addresses,
            Some(addrs("10.0.0.1:56324", "192.0.2.7:443"))
        );
    }

    #[test]
    fn v2_local_ignores_the_block() {
        let header = assert_every_split(&v2(0x20, 0x00, &[]));
        assert_eq!(
            header,
            ProxyHeader {
                version: Version::V2,
                addresses: None,
                tlvs: vec![],
                len: 16,
            }
        );
        // LOCAL with a family and a nonsense block is still accepted.
        let header = parse(&v2(0x20, 0x11, &[1, 2, 3])).unwrap().unwrap();
        assert_eq!((header.addresses, header.len), (None, 19));
        let header = parse(&v2(0x20, 0xff, &[])).unwrap().unwrap();
        assert_eq!(header.addresses, None);
    }

    #[test]
    fn v2_with_tlvs() {
        let mut block = inet_block();
        block.extend_from_slice(&[PP2_TYPE_AUTHORITY, 0, 11]);
        block.extend_from_slice(b"api.s1.test");
        block.extend_from_slice(&[0x04, 0, 0]); // NOOP, empty
        block.extend_from_slice(&[0xea, 0, 2, 0xbe, 0xef]);
        let header = assert_every_split(&v2(0x21, 0x11, &block));
        assert_eq!(
            header.tlvs,
            vec![
                (PP2_TYPE_AUTHORITY, b"api.s1.test".to_vec()),
                (0x04, vec![]),
                (0xea, vec![0xbe, 0xef]),
            ]
        );
    }

    #[test]
    fn v2_families_without_addresses() {
        // UNSPEC family: no address part, the block is TLVs.
        let header = parse(&v2(0x21, 0x00, &[0x02, 0, 1, b'a']))
            .unwrap()
            .unwrap();
        assert_eq!(header.addresses, None);
        assert_eq!(header.tlvs, vec![(0x02, b"a".to_vec())]);
        // AF_UNIX: 216 address bytes consumed, then TLVs.
        let mut block = vec![0u8; V2_UNIX_BLOCK];
        block.extend_from_slice(&[0x05, 0, 1, 9]);
        let header = parse(&v2(0x21, 0x31, &block)).unwrap().unwrap();
        assert_eq!(header.addresses, None);
        assert_eq!(header.tlvs, vec![(0x05, vec![9])]);
        assert_eq!(header.len, 16 + V2_UNIX_BLOCK + 4);
        // AF_INET with an unspecified transport.
        let header = parse(&v2(0x21, 0x10, &inet_block())).unwrap().unwrap();
        assert_eq!(header.addresses, None);
        assert_eq!(header.len, 28);
    }

    #[test]
    fn v2_errors() {
        let block = inet_block();
        for (input, want) in [
            (v2(0x11, 0x11, &block), "version 1"),
            (v2(0x31, 0x11, &block), "version 3"),
            (v2(0x22, 0x11, &block), "command 2"),
            (v2(0x2f, 0x11, &block), "command 15"),
            (v2(0x21, 0x41, &block), "family 4"),
            (v2(0x21, 0x13, &block), "transport 3"),
            (v2(0x21, 0x11, &block[..11]), "short inet block"),
            (v2(0x21, 0x21, &[0; 35]), "short inet6 block"),
            (v2(0x21, 0x31, &[0; 215]), "short unix block"),
            (
                v2(0x21, 0x11, &[&block[..], &[1, 0]].concat()),
                "tlv header cut",
            ),
            (
                v2(0x21, 0x11, &[&block[..], &[1, 0, 2, 7]].concat()),
                "tlv overrun",
            ),
        ] {
            assert!(malformed(&input), "{want}: {:?}", parse(&input));
            assert_prefix_consistent(&input);
        }
        // Decided at the 13th byte.
        assert!(malformed(&v2(0x11, 0x11, &block)[..13]));
    }

    #[test]
    fn v2_too_large() {
        let mut input = V2_SIGNATURE.to_vec();
        input.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&input), Err(ProxyError::TooLarge));
        assert_eq!(parse(&input[..15]), Ok(None));
        let mut at_cap = V2_SIGNATURE.to_vec();
        at_cap.extend_from_slice(&[0x21, 0x11]);
        at_cap.extend_from_slice(&u16::try_from(V2_MAX_BLOCK).unwrap().to_be_bytes());
        assert_eq!(parse(&at_cap), Ok(None));
    }

    #[test]
    fn garbage_does_not_panic() {
        let samples: [&[u8]; 6] = [
            b"PROXY TCP4 \xff\xfe",
            b"PROXY TCP6 :::::::: :: 1 1\r\n",
            b"PROXY TCP4 999.1.1.1 1.1.1.1 1 1\r\n",
            b"PROXY \r\r\n",
            &[0x0d; 40],
            b"PROXY UNKNOWN \x00\r\n",
        ];
        for sample in samples {
            let _ = parse(sample);
            assert_prefix_consistent(sample);
        }
    }

    #[test]
    fn encode_round_trips() {
        let authority: &[u8] = b"api.s1.test";
        for (source, destination, family) in [
            ("10.0.0.1:1234", "10.0.0.2:443", 0x11),
            ("[2001:db8::1]:1234", "[2001:db8::2]:443", 0x21),
            ("10.0.0.1:1234", "[2001:db8::2]:443", 0x21),
            ("[2001:db8::1]:1234", "10.0.0.2:443", 0x21),
        ] {
            let a = addrs(source, destination);
            let mut out = b"prefix".to_vec();
            encode_v2(
                &a,
                &[(PP2_TYPE_AUTHORITY, authority), (0xe0, &[])],
                &mut out,
            );
            assert_eq!(&out[..6], b"prefix");
            let encoded = &out[6..];
            assert_eq!(encoded[13], family);
            let header = assert_every_split(encoded);
            assert_eq!(header.len, encoded.len());
            assert_eq!(
                header.tlvs,
                vec![(PP2_TYPE_AUTHORITY, authority.to_vec()), (0xe0, vec![])]
            );
            assert_eq!(header.addresses, Some(mapped(a)));
        }
    }

    #[test]
    fn encode_leaves_out_tlvs_that_do_not_fit() {
        let a = addrs("10.0.0.1:1", "10.0.0.2:2");
        let huge = vec![7u8; 70_000];
        let big = vec![8u8; 40_000];
        let mut out = Vec::new();
        encode_v2(&a, &[(1, &huge), (2, &big), (3, &big), (4, b"x")], &mut out);
        let header = parse(&out).unwrap().unwrap();
        let kept: Vec<u8> = header.tlvs.iter().map(|(t, _)| *t).collect();
        assert_eq!(kept, [2, 4]);
        assert_eq!(header.len, out.len());
    }

    #[test]
    fn kinds() {
        assert_eq!(ProxyError::NotProxy.kind(), "not_proxy");
        assert_eq!(ProxyError::Malformed("x").kind(), "malformed");
        assert_eq!(ProxyError::TooLarge.kind(), "too_large");
    }

    /// What `encode_v2` makes of mixed families.
    fn mapped(a: Addresses) -> Addresses {
        match (a.source, a.destination) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => a,
            (s, d) => Addresses {
                source: SocketAddr::new(as_ipv6(s.ip()).into(), s.port()),
                destination: SocketAddr::new(as_ipv6(d.ip()).into(), d.port()),
            },
        }
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_after_signatures_never_panic(
            v2_header in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut input = if v2_header { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            input.extend_from_slice(&tail);
            let _ = parse(&input);
            assert_prefix_consistent(&input);
        }

        #[test]
        fn v1_random_addresses_round_trip(src in socket_addr(), dst in socket_addr()) {
            let (src, dst) = match (src, dst) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (src, dst),
                _ => (src, SocketAddr::new(src.ip(), dst.port())),
            };
            let protocol = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let line = format!("PROXY {protocol} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port());
            let header = parse(line.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(header.addresses, Some(Addresses { source: src, destination: dst }));
            prop_assert_eq!(header.len, line.len());
        }

        #[test]
        fn v2_random_addresses_and_tlvs_round_trip(
            source in socket_addr(),
            destination in socket_addr(),
            tlvs in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..6),
            payload in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let a = Addresses { source, destination };
            let borrowed: Vec<(u8, &[u8])> = tlvs.iter().map(|(t, v)| (*t, v.as_slice())).collect();
            let mut out = Vec::new();
            encode_v2(&a, &borrowed, &mut out);
            let header_len = out.len();
            out.extend_from_slice(&payload);
            let header = parse(&out).unwrap().unwrap();
            prop_assert_eq!(header.version, Version::V2);
            prop_assert_eq!(header.addresses, Some(mapped(a)));
            prop_assert_eq!(header.tlvs, tlvs);
            prop_assert_eq!(header.len, header_len);
            for cut in 0..header_len {
                prop_assert_eq!(parse(&out[..cut]), Ok(None));
            }
        }
    }
}
