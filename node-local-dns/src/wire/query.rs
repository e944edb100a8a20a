//! Client queries: [`parse_query`] reads one strictly (RFC 1035 §4.1, EDNS per RFC 6891), and
//! [`build_query`] writes the queries the forwarder's health checks and the agent's probe
//! send.

use std::fmt::Write as _;

use super::name::{encode_name, skip_plain_name};
use super::render::push_header;
use super::{
    be16, be32, rtype, WireError, CLASSIC_UDP_SIZE, CLASS_IN, FLAG_AD, FLAG_CD, FLAG_OPCODE,
    FLAG_QR, FLAG_RD, FLAG_TC, HEADER_LEN, MAX_MESSAGE, OPT_RR_LEN, OUR_UDP_SIZE,
};

/// DO bit in the OPT TTL field (RFC 3225).
const EDNS_DO: u32 = 0x8000;

/// EDNS(0) from a query's OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size (the OPT CLASS field), as sent.
    pub udp_size: u16,
    /// EDNS version; anything above 0 is answered with BADVERS by the caller.
    pub version: u8,
    /// The DO bit (RFC 3225).
    pub dnssec_ok: bool,
}

/// A parsed client query (borrowing the packet).
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// Message ID.
    pub id: u16,
    /// RD as sent.
    pub recursion_desired: bool,
    /// CD as sent.
    pub checking_disabled: bool,
    /// AD bit of the query (RFC 6840 §5.7: a client may set it to ask for AD).
    pub authentic_data: bool,
    /// The question exactly as received: qname labels (uncompressed; a compression pointer in
    /// a query's question is Malformed) + qtype + qclass.
    pub question: &'a [u8],
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
    /// EDNS from the OPT record, if the query had one.
    pub edns: Option<Edns>,
}

impl<'a> Query<'a> {
    /// The qname in wire form (labels incl. the root 0), the part of `question` before qtype.
    pub fn qname(&self) -> &'a [u8] {
        let question: &'a [u8] = self.question;
        question
            .get(..question.len().saturating_sub(4))
            .unwrap_or_default()
    }

    /// The largest UDP reply this client accepts: EDNS size clamped to [512, OUR_UDP_SIZE],
    /// or 512 without EDNS.
    pub fn udp_limit(&self) -> usize {
        let size = self.edns.map_or(CLASSIC_UDP_SIZE, |e| {
            e.udp_size.clamp(CLASSIC_UDP_SIZE, OUR_UDP_SIZE)
        });
        usize::from(size)
    }

    /// Human-readable qname ("api.s1.test."), for logs only: `.` and `\` inside a label are
    /// escaped with `\`, other bytes outside printable ASCII as `\DDD`.
    pub fn qname_text(&self) -> String {
        let name = self.qname();
        let mut text = String::with_capacity(name.len() + 1);
        let mut pos = 0;
        while let Some(&len) = name.get(pos) {
            if len == 0 {
                break;
            }
            let label = name
                .get(pos + 1..pos + 1 + usize::from(len))
                .unwrap_or_default();
            for &b in label {
                match b {
                    b'.' | b'\\' => {
                        text.push('\\');
                        text.push(char::from(b));
                    }
                    0x21..=0x7E => text.push(char::from(b)),
                    _ => {
                        let _ = write!(text, "\\{b:03}");
                    }
                }
            }
            text.push('.');
            pos += 1 + usize::from(len);
        }
        if text.is_empty() {
            text.push('.');
        }
        text
    }
}

/// Parses a query. Accepts only: QR=0, OPCODE=0 (QUERY), TC=0, QDCOUNT=1, ANCOUNT=0,
/// NSCOUNT=0, ARCOUNT<=1 where the additional record, if any, is an OPT with owner root
/// (another record: Malformed). QR=1 or another opcode: NotQuery (the caller drops or answers
/// NOTIMP). A QUERY with TC set or other counts: Malformed, so FORMERR (RFC 9619: QDCOUNT must
/// be 1; RFC 6891 §6.1.1: a second OPT is FORMERR). Anything else unreadable: Malformed/Short. Trailing bytes after the last record: Malformed. EDNS version > 0 is
/// parsed (the caller answers BADVERS); options are skipped (cookies, padding are fine) but
/// must fill the OPT RDATA exactly.
pub fn parse_query(packet: &[u8]) -> Result<Query<'_>, WireError> {
    if packet.len() < HEADER_LEN {
        return Err(WireError::Short);
    }
    let id = be16(packet, 0)?;
    let flags = be16(packet, 2)?;
    let counts = [
        be16(packet, 4)?,
        be16(packet, 6)?,
        be16(packet, 8)?,
        be16(packet, 10)?,
    ];
    if flags & (FLAG_QR | FLAG_OPCODE) != 0 {
        return Err(WireError::NotQuery);
    }
    if flags & FLAG_TC != 0 {
        return Err(WireError::Malformed("TC set in a query"));
    }
    if counts[..3] != [1, 0, 0] || counts[3] > 1 {
        return Err(WireError::Malformed("query counts are not 1/0/0/0-1"));
    }
    if packet.len() > MAX_MESSAGE {
        return Err(WireError::Malformed("message too long"));
    }
    let qname_end = skip_plain_name(packet, HEADER_LEN)?;
    let qtype = be16(packet, qname_end)?;
    let qclass = be16(packet, qname_end + 2)?;
    let question_end = qname_end + 4;
    let (edns, end) = if counts[3] == 1 {
        let (edns, end) = parse_query_opt(packet, question_end)?;
        (Some(edns), end)
    } else {
        (None, question_end)
    };
    if end != packet.len() {
        return Err(WireError::Malformed("trailing bytes after the last record"));
    }
    Ok(Query {
        id,
        recursion_desired: flags & FLAG_RD != 0,
        checking_disabled: flags & FLAG_CD != 0,
        authentic_data: flags & FLAG_AD != 0,
        question: packet
            .get(HEADER_LEN..question_end)
            .ok_or(WireError::Short)?,
        qtype,
        qclass,
        edns,
    })
}

/// Reads the OPT record of a query at `pos`; returns it and the offset after it.
fn parse_query_opt(packet: &[u8], pos: usize) -> Result<(Edns, usize), WireError> {
    let owner = *packet.get(pos).ok_or(WireError::Short)?;
    if owner != 0 {
        return Err(WireError::Malformed(
            "additional record is not an OPT with root owner",
        ));
    }
    if be16(packet, pos + 1)? != rtype::OPT {
        return Err(WireError::Malformed(
            "additional record is not an OPT with root owner",
        ));
    }
    let udp_size = be16(packet, pos + 3)?;
    let ttl = be32(packet, pos + 5)?;
    let rdlen = usize::from(be16(packet, pos + 9)?);
    let rdata = pos + OPT_RR_LEN;
    let end = rdata + rdlen;
    if end > packet.len() {
        return Err(WireError::Short);
    }
    // Options are {code, length, data}; we use none of them but they must fit.
    let mut at = rdata;
    while at < end {
        if at + 4 > end {
            return Err(WireError::Malformed("bad EDNS option"));
        }
        at += 4 + usize::from(be16(packet, at + 2)?);
    }
    if at != end {
        return Err(WireError::Malformed("bad EDNS option"));
    }
    let edns = Edns {
        udp_size,
        version: ttl.to_be_bytes()[1],
        dnssec_ok: ttl & EDNS_DO != 0,
    };
    Ok((edns, end))
}

/// Appends the lower-cased qname (wire form) to `out`: the cache key's name part. Length
/// octets are at most 63 and so never change under ASCII lower-casing.
pub fn lowercase_qname(qname: &[u8], out: &mut Vec<u8>) {
    out.extend(qname.iter().map(u8::to_ascii_lowercase));
}

/// Writes a query into `out` (cleared first), for tests and the forwarder: RD=1, one
/// question `qname` (see [`encode_name`]) / `qtype` / class IN, and an OPT record (no
/// options) when `edns` is given.
pub fn build_query(id: u16, qname: &str, qtype: u16, edns: Option<Edns>, out: &mut Vec<u8>) {
    out.clear();
    push_header(out, id, FLAG_RD, [1, 0, 0, u16::from(edns.is_some())]);
    encode_name(qname, out);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if let Some(edns) = edns {
        out.push(0);
        out.extend_from_slice(&rtype::OPT.to_be_bytes());
        out.extend_from_slice(&edns.udp_size.to_be_bytes());
        let do_bit = if edns.dnssec_ok { 0x80 } else { 0 };
        out.extend_from_slice(&[0, edns.version, do_bit, 0, 0, 0]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    // The test query option (an `Edns`), not the DO bit that `super::*` brings.
    use crate::wire::test_util::EDNS_DO;
    use crate::wire::test_util::*;
    use crate::wire::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1035_query_minimal_parses() {
        let bytes = query_bytes(0xBEEF, "Api.S1.test.", rtype::AAAA, None);
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.id, 0xBEEF);
        assert!(q.recursion_desired);
        assert!(!q.checking_disabled);
        assert!(!q.authentic_data);
        assert_eq!(q.qtype, rtype::AAAA);
        assert_eq!(q.qclass, 1);
        assert_eq!(q.edns, None);
        assert_eq!(q.question, &bytes[12..]);
        assert_eq!(q.qname(), b"\x03Api\x02S1\x04test\x00");
        assert_eq!(q.qname_text(), "Api.S1.test.");
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn rfc1035_query_flags_copied() {
        let mut bytes = query_bytes(1, "a.test", rtype::A, None);
        bytes[2] &= !0x01; // RD off
        bytes[3] |= 0x30; // AD, CD
        let q = parse_query(&bytes).unwrap();
        assert!(!q.recursion_desired);
        assert!(q.checking_disabled);
        assert!(q.authentic_data);
    }

    #[test]
    fn rfc1035_query_root_name() {
        let bytes = query_bytes(1, ".", rtype::NS, None);
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.qname(), [0]);
        assert_eq!(q.qname_text(), ".");
    }

    #[test]
    fn rfc1035_query_rejects_response_bit() {
        let mut bytes = query_bytes(1, "a.test", rtype::A, None);
        bytes[2] |= 0x80;
        assert_eq!(parse_query(&bytes).unwrap_err(), WireError::NotQuery);
    }

    #[test]
    fn rfc1035_query_rejects_other_opcodes() {
        for opcode in [1u8, 2, 4, 5, 15] {
            let mut bytes = query_bytes(1, "a.test", rtype::A, None);
            bytes[2] |= opcode << 3;
            assert_eq!(parse_query(&bytes).unwrap_err(), WireError::NotQuery);
        }
    }

    #[test]
    fn rfc1035_query_rejects_truncated_flag() {
        let mut bytes = query_bytes(1, "a.test", rtype::A, None);
        bytes[2] |= 0x02;
        assert_eq!(
            parse_query(&bytes).unwrap_err(),
            WireError::Malformed("TC set in a query")
        );
    }

    #[test]
    fn rfc1035_query_rejects_counts() {
        for (at, value) in [(5, 0u8), (5, 2), (7, 1), (9, 1), (11, 2)] {
            let mut bytes = query_bytes(1, "a.test", rtype::A, None);
            bytes[at] = value;
            assert_eq!(
                parse_query(&bytes).unwrap_err(),
                WireError::Malformed("query counts are not 1/0/0/0-1"),
                "count byte {at} = {value}"
            );
        }
    }

    #[test]
    fn rfc1035_query_rejects_compression_in_question() {
        let mut bytes = query_bytes(1, "a.test", rtype::A, None);
        // Replace the qname with a pointer to the header.
        bytes.splice(12..20, [0xC0, 0x0C]);
        assert_eq!(
            parse_query(&bytes).unwrap_err(),
            WireError::Malformed("compression pointer in the question")
        );
    }

    #[test]
    fn rfc1035_query_rejects_bad_label_types_and_long_names() {
        for kind in [0x40u8, 0x80] {
            let mut bytes = query_bytes(1, "a.test", rtype::A, None);
            bytes[12] = kind | 1;
            assert!(matches!(
                parse_query(&bytes).unwrap_err(),
                WireError::Malformed(_)
            ));
        }
        // 5 labels of 63 bytes: 320 bytes of name.
        let mut bytes = query_bytes(1, "x", rtype::A, None);
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.push(0);
        bytes.splice(12..15, name);
        assert_eq!(
            parse_query(&bytes).unwrap_err(),
            WireError::Malformed("name too long")
        );
    }

    #[test]
    fn rfc1035_query_rejects_trailing_bytes() {
        for edns in [None, Some(EDNS0)] {
            let mut bytes = query_bytes(1, "a.test", rtype::A, edns);
            bytes.push(0);
            assert_eq!(
                parse_query(&bytes).unwrap_err(),
                WireError::Malformed("trailing bytes after the last record")
            );
        }
    }

    #[test]
    fn rfc1035_query_every_prefix_is_short() {
        for edns in [None, Some(EDNS_DO)] {
            let bytes = query_bytes(7, "www.example.test", rtype::A, edns);
            assert!(parse_query(&bytes).is_ok());
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse_query(&bytes[..cut]).unwrap_err(),
                    WireError::Short,
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn rfc6891_query_opt_parsed() {
        let bytes = query_bytes(1, "a.test", rtype::A, Some(EDNS_DO));
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.edns, Some(EDNS_DO));
        assert_eq!(q.question.len(), 8 + 4);
        assert_eq!(q.udp_limit(), 1232);

        let bytes = query_bytes(1, "a.test", rtype::A, Some(EDNS0));
        assert!(!parse_query(&bytes).unwrap().edns.unwrap().dnssec_ok);
    }

    #[test]
    fn rfc6891_query_udp_limit_clamped() {
        for (size, limit) in [
            (0u16, 512usize),
            (100, 512),
            (512, 512),
            (1000, 1000),
            (4096, 1232),
        ] {
            let edns = Edns {
                udp_size: size,
                ..EDNS0
            };
            let bytes = query_bytes(1, "a.test", rtype::A, Some(edns));
            assert_eq!(parse_query(&bytes).unwrap().udp_limit(), limit);
        }
    }

    #[test]
    fn rfc6891_query_version_1_parsed() {
        let edns = Edns {
            version: 1,
            ..EDNS_DO
        };
        let bytes = query_bytes(1, "a.test", rtype::A, Some(edns));
        assert_eq!(parse_query(&bytes).unwrap().edns, Some(edns));
    }

    /// The query with its OPT RDATA replaced by `rdata`.
    fn with_opt_rdata(rdata: &[u8]) -> Vec<u8> {
        let mut bytes = query_bytes(1, "a.test", rtype::A, Some(EDNS0));
        let len = bytes.len();
        bytes[len - 2..].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
        bytes.extend_from_slice(rdata);
        bytes
    }

    #[test]
    fn rfc6891_query_options_skipped() {
        // COOKIE (10) with an 8-byte client cookie, then PADDING (12) of 5 bytes.
        let mut rdata = vec![0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        rdata.extend_from_slice(&[0, 12, 0, 5, 0, 0, 0, 0, 0]);
        let bytes = with_opt_rdata(&rdata);
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.edns, Some(EDNS0));
    }

    #[test]
    fn rfc6891_query_bad_option_lengths() {
        for rdata in [&[0u8, 10, 0][..], &[0, 10, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8]] {
            let bytes = with_opt_rdata(rdata);
            assert_eq!(
                parse_query(&bytes).unwrap_err(),
                WireError::Malformed("bad EDNS option")
            );
        }
    }

    #[test]
    fn rfc6891_query_additional_must_be_root_opt() {
        // An A record in the additional section.
        let mut bytes = query_bytes(1, "a.test", rtype::A, Some(EDNS0));
        let opt = bytes.len() - OPT_RR_LEN;
        bytes[opt + 2] = rtype::A as u8;
        assert!(matches!(
            parse_query(&bytes).unwrap_err(),
            WireError::Malformed(_)
        ));
        // An OPT whose owner is not the root.
        let mut bytes = query_bytes(1, "a.test", rtype::A, Some(EDNS0));
        bytes.splice(opt..opt + 1, [1, b'x', 0]);
        assert!(matches!(
            parse_query(&bytes).unwrap_err(),
            WireError::Malformed(_)
        ));
    }

    #[test]
    fn dns_0x20_lowercase_qname_is_the_key() {
        let bytes = query_bytes(1, "ApI.S1.TeSt", rtype::A, None);
        let q = parse_query(&bytes).unwrap();
        let mut key = vec![9];
        lowercase_qname(q.qname(), &mut key);
        assert_eq!(key, b"\x09\x03api\x02s1\x04test\x00");
    }

    #[test]
    fn qname_text_escapes() {
        let mut bytes = query_bytes(1, "x", rtype::A, None);
        bytes.splice(12..15, *b"\x04a.\\\x07\x00");
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.qname_text(), "a\\.\\\\\\007.");
    }

    #[test]
    fn build_query_shapes() {
        let bytes = query_bytes(1, "a.test.", rtype::A, Some(EDNS_DO));
        assert_eq!(counts(&bytes), [1, 0, 0, 1]);
        assert_eq!(flags(&bytes), 0x0100);
        let mut long = String::new();
        for _ in 0..10 {
            long.push_str(&"x".repeat(70));
            long.push('.');
        }
        let bytes = query_bytes(1, &long, rtype::A, None);
        let q = parse_query(&bytes).unwrap();
        assert!(q.qname().len() <= MAX_NAME);
        assert_eq!(q.qname()[0], 63);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn parse_query_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_query(&bytes);
        }

        #[test]
        fn parse_query_never_panics_on_mutations(
            name in qname(),
            edns in edns(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = query_bytes(1, &name, rtype::A, edns);
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            if let Ok(q) = parse_query(&bytes) {
                let _ = q.qname_text();
                let mut out = Vec::new();
                render_error(&q, rcode::BADVERS, &mut out);
                prop_assert!(parse_response(&q, &out).is_ok());
            }
        }
    }
}
