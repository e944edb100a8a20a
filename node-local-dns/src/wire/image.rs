//! Upstream responses: [`parse_response`] walks every record of a response to a query, says
//! what it means for the cache ([`ResponseInfo`]) and, when it can be cached, cuts it into a
//! [`WireImage`]: the message without its OPT record and the offsets of its TTL fields.

use super::name::{read_name, same_question, NameBuf};
use super::query::Query;
use super::{
    be16, be32, clamp_ttl, put16, rtype, WireError, CLASS_IN, FLAG_AD, FLAG_OPCODE, FLAG_QR,
    FLAG_RA, FLAG_RCODE, FLAG_TC, HEADER_LEN, MAX_MESSAGE, OPT_RR_LEN, SECTION_ADDITIONAL,
    SECTION_ANSWER, SECTION_AUTHORITY,
};

// Types with names in their RDATA that RFC 3597 §4 allows to be compressed, besides the
// public ones above.
const MD: u16 = 3;
const MF: u16 = 4;
const MB: u16 = 7;
const MG: u16 = 8;
const MR: u16 = 9;
const MINFO: u16 = 14;

/// Bound on CNAME links followed when deciding whether the answer answers the question.
const MAX_CNAME_CHAIN: usize = 16;

/// What an upstream response says, for the cache policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseInfo {
    /// Message ID (equal to the query's).
    pub id: u16,
    /// Header rcode (low 4 bits; an extended rcode from OPT is ignored).
    pub rcode: u8,
    /// TC bit.
    pub truncated: bool,
    /// AD bit.
    pub authentic_data: bool,
    /// RA bit.
    pub recursion_available: bool,
    /// ANCOUNT.
    pub answer_count: u16,
    /// Whether the answer section answers the question: an RR of qtype (or any type for
    /// ANY=255) whose owner is the qname, or reached by following the CNAME chain from the
    /// qname (RFC 2308 §5 "no answer" detection). A CNAME query is answered by the CNAME
    /// itself.
    pub answers_question: bool,
    /// Minimum TTL over all RRs of all sections except OPT (TTLs above 2^31-1 count as 0,
    /// RFC 2181 §8); None if there are none.
    pub min_ttl: Option<u32>,
    /// For negative answers: min(SOA TTL, SOA MINIMUM) of the first SOA in the authority
    /// section (RFC 2308 §5); None without one.
    pub negative_ttl: Option<u32>,
}

/// A cacheable response: the upstream message without its OPT record, TTL offsets
/// pre-scanned.
///
/// The header of `bytes` is the upstream's (ARCOUNT less the OPT):
/// [`render`](fn@crate::wire::render) takes the rcode and AD bit from it and sets everything
/// else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireImage {
    /// Header + question + records (OPT removed, ARCOUNT adjusted).
    pub(super) bytes: Vec<u8>,
    /// Offset of every RR's 4-byte TTL field in `bytes`, ascending.
    pub(super) ttl_offsets: Vec<u16>,
    /// Length of the question (qname + qtype + qclass) at offset 12.
    pub(super) question_len: usize,
}

impl WireImage {
    /// Size in bytes of the stored image (for memory accounting): the message bytes plus the
    /// TTL offsets (2 bytes each).
    pub fn len(&self) -> usize {
        self.bytes.len() + 2 * self.ttl_offsets.len()
    }

    /// Whether the image holds nothing (never true for an image from [`parse_response`]).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The stored bytes (what a kernel mirror copies).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The offsets of the TTL fields in [`WireImage::bytes`] (what a kernel mirror copies).
    pub fn ttl_offsets(&self) -> &[u16] {
        &self.ttl_offsets
    }

    /// Length of the stored question at offset 12 (qname + qtype + qclass).
    pub fn question_len(&self) -> usize {
        self.question_len
    }

    /// The rcode (low 4 bits) of the stored response.
    pub fn rcode(&self) -> u8 {
        self.bytes.get(3).map_or(0, |b| b & 0x0F)
    }

    /// Whether the upstream set AD.
    pub fn authentic_data(&self) -> bool {
        self.flags() & FLAG_AD != 0
    }

    pub(super) fn flags(&self) -> u16 {
        be16(&self.bytes, 2).unwrap_or(0)
    }
}

/// One answer-section record, remembered for the CNAME-chain walk.
#[derive(Debug, Clone, Copy)]
struct AnswerRef {
    owner: usize,
    rtype: u16,
    rdata: usize,
}

/// Parses an upstream response to `query`. It must match: QR=1, same ID, OPCODE 0,
/// QDCOUNT=1, and a question equal to the query's case-insensitively (qname) and exactly in
/// qtype/qclass; otherwise `Malformed("not a response" | "id mismatch" | "opcode mismatch" |
/// "question mismatch")`, which the forwarder drops and counts. Returns the info and, when
/// the message can be cached (not truncated, OPT either absent or the last record of the
/// message so it can be cut off, no TSIG or SIG(0)), the image (else None).
///
/// Every RR is walked: owner name (compression allowed; pointers must point backwards, past
/// the header, never into a TTL field, and are bounded), type, class, ttl, rdlength, RDATA
/// within bounds. RDATA of A/AAAA (class IN) and of the types whose names may be compressed
/// (RFC 3597 §4: NS, CNAME, SOA, PTR, MX, MD, MF, MB, MG, MR, MINFO; plus SRV and TXT) is
/// checked for shape; other types are opaque. A second OPT, an OPT outside the additional
/// section or with a non-root owner, and trailing bytes are Malformed.
pub fn parse_response(
    query: &Query<'_>,
    packet: &[u8],
) -> Result<(ResponseInfo, Option<WireImage>), WireError> {
    if packet.len() < HEADER_LEN {
        return Err(WireError::Short);
    }
    if packet.len() > MAX_MESSAGE {
        return Err(WireError::Malformed("message too long"));
    }
    let id = be16(packet, 0)?;
    let flags = be16(packet, 2)?;
    let [qdcount, ancount, nscount, arcount] = [
        be16(packet, 4)?,
        be16(packet, 6)?,
        be16(packet, 8)?,
        be16(packet, 10)?,
    ];
    if flags & FLAG_QR == 0 {
        return Err(WireError::Malformed("not a response"));
    }
    if id != query.id {
        return Err(WireError::Malformed("id mismatch"));
    }
    if flags & FLAG_OPCODE != 0 {
        return Err(WireError::Malformed("opcode mismatch"));
    }
    if qdcount != 1 {
        return Err(WireError::Malformed("question mismatch"));
    }
    let question_len = query.question.len();
    let question = packet
        .get(HEADER_LEN..HEADER_LEN + question_len)
        .ok_or(WireError::Short)?;
    if !same_question(question, query.question) {
        return Err(WireError::Malformed("question mismatch"));
    }

    let mut pos = HEADER_LEN + question_len;
    // Every RR takes at least 11 bytes: never trust the counts for allocation sizes.
    let max_records = packet.len() / OPT_RR_LEN;
    let total = usize::from(ancount) + usize::from(nscount) + usize::from(arcount);
    let mut ttl_offsets: Vec<u16> = Vec::with_capacity(total.min(max_records));
    let mut answers: Vec<AnswerRef> = Vec::with_capacity(usize::from(ancount).min(max_records));
    let mut opt_start: Option<usize> = None;
    let mut record_after_opt = false;
    let mut signed = false;
    let mut min_ttl: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    let mut owner = NameBuf::new();

    for (section, count) in [ancount, nscount, arcount].into_iter().enumerate() {
        for _ in 0..count {
            let start = pos;
            let fixed = read_name(packet, pos, packet.len(), &ttl_offsets, Some(&mut owner))?;
            let rr_type = be16(packet, fixed)?;
            let class = be16(packet, fixed + 2)?;
            let ttl_at = fixed + 4;
            let raw_ttl = be32(packet, ttl_at)?;
            let rdata = fixed + 10;
            let end = rdata + usize::from(be16(packet, fixed + 8)?);
            if end > packet.len() {
                return Err(WireError::Short);
            }
            if rr_type == rtype::OPT {
                if section != SECTION_ADDITIONAL {
                    return Err(WireError::Malformed("OPT outside the additional section"));
                }
                if opt_start.is_some() {
                    return Err(WireError::Malformed("second OPT record"));
                }
                if owner.as_slice() != [0] {
                    return Err(WireError::Malformed("OPT owner is not the root"));
                }
                opt_start = Some(start);
            } else {
                record_after_opt |= opt_start.is_some();
                let ttl_at =
                    u16::try_from(ttl_at).map_err(|_| WireError::Malformed("message too long"))?;
                ttl_offsets.push(ttl_at);
                check_rdata(packet, rr_type, class, rdata, end, &ttl_offsets)?;
                let ttl = clamp_ttl(raw_ttl);
                min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
                signed |= rr_type == rtype::TSIG
                    || (rr_type == rtype::SIG && section == SECTION_ADDITIONAL);
                if section == SECTION_ANSWER {
                    answers.push(AnswerRef {
                        owner: start,
                        rtype: rr_type,
                        rdata,
                    });
                }
                if section == SECTION_AUTHORITY && rr_type == rtype::SOA && negative_ttl.is_none() {
                    // check_rdata made sure the SOA RDATA ends with its five 32-bit fields.
                    let minimum = clamp_ttl(be32(packet, end - 4)?);
                    negative_ttl = Some(ttl.min(minimum));
                }
            }
            pos = end;
        }
    }
    if pos != packet.len() {
        return Err(WireError::Malformed("trailing bytes after the last record"));
    }

    let answers_question = answers_question(query, packet, &answers, &ttl_offsets)?;
    let truncated = flags & FLAG_TC != 0;
    let info = ResponseInfo {
        id,
        rcode: (flags & FLAG_RCODE) as u8,
        truncated,
        authentic_data: flags & FLAG_AD != 0,
        recursion_available: flags & FLAG_RA != 0,
        answer_count: ancount,
        answers_question,
        min_ttl,
        negative_ttl,
    };
    let image = if truncated || record_after_opt || signed {
        None
    } else {
        let cut = opt_start.unwrap_or(packet.len());
        let mut bytes = packet.get(..cut).unwrap_or_default().to_vec();
        if opt_start.is_some() {
            put16(&mut bytes, 10, arcount.saturating_sub(1));
        }
        Some(WireImage {
            bytes,
            ttl_offsets,
            question_len,
        })
    };
    Ok((info, image))
}

/// Whether the answer section answers the question, following CNAMEs from the qname.
fn answers_question(
    query: &Query<'_>,
    packet: &[u8],
    answers: &[AnswerRef],
    ttls: &[u16],
) -> Result<bool, WireError> {
    let mut current = NameBuf::new();
    current.push_lower(query.qname());
    let mut owner = NameBuf::new();
    for _ in 0..=MAX_CNAME_CHAIN {
        let mut next = None;
        for answer in answers {
            read_name(packet, answer.owner, packet.len(), ttls, Some(&mut owner))?;
            if owner.as_slice() != current.as_slice() {
                continue;
            }
            if query.qtype == rtype::ANY || answer.rtype == query.qtype {
                return Ok(true);
            }
            if answer.rtype == rtype::CNAME && next.is_none() {
                next = Some(answer.rdata);
            }
        }
        match next {
            Some(target) => {
                read_name(packet, target, packet.len(), ttls, Some(&mut current))?;
            }
            None => return Ok(false),
        }
    }
    Ok(false)
}

/// Checks the RDATA shape of the types whose layout we know; others are opaque (RFC 3597).
fn check_rdata(
    packet: &[u8],
    rr_type: u16,
    class: u16,
    rdata: usize,
    end: usize,
    ttls: &[u16],
) -> Result<(), WireError> {
    // The RDATA is within the message, so running out of it is a bad RDATA, not a short
    // message.
    let name = |at: usize| {
        read_name(packet, at, end, ttls, None).map_err(|e| match e {
            WireError::Short => WireError::Malformed("name overruns its rdata"),
            other => other,
        })
    };
    let fits = match rr_type {
        rtype::A if class == CLASS_IN => end - rdata == 4,
        rtype::AAAA if class == CLASS_IN => end - rdata == 16,
        rtype::NS | rtype::CNAME | rtype::PTR | MD | MF | MB | MG | MR => name(rdata)? == end,
        rtype::MX => rdata + 2 < end && name(rdata + 2)? == end,
        rtype::SRV => rdata + 6 < end && name(rdata + 6)? == end,
        rtype::SOA => name(name(rdata)?)? + 20 == end,
        MINFO => name(name(rdata)?)? == end,
        rtype::TXT => {
            let mut at = rdata;
            while at < end {
                at += 1 + usize::from(*packet.get(at).ok_or(WireError::Short)?);
            }
            at == end
        }
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(WireError::Malformed("bad rdata"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::test_util::*;
    use crate::wire::testing::ResponseBuilder;
    use crate::wire::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1035_response_basic() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .answer("a.test", rtype::A, 60, &a([10, 0, 0, 2]))
            .build();
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert_eq!(
            info,
            ResponseInfo {
                id: 5,
                rcode: rcode::NOERROR,
                truncated: false,
                authentic_data: false,
                recursion_available: true,
                answer_count: 2,
                answers_question: true,
                min_ttl: Some(60),
                negative_ttl: None,
            }
        );
        let image = image.unwrap();
        assert_eq!(image.bytes(), &resp[..]);
        assert_eq!(image.question_len(), q.question.len());
        assert_eq!(image.len(), resp.len() + 4);
        assert!(!image.is_empty());
        let ttls: Vec<u32> = image
            .ttl_offsets()
            .iter()
            .map(|&at| be32(&resp, usize::from(at)).unwrap())
            .collect();
        assert_eq!(ttls, [300, 60]);
    }

    #[test]
    fn rfc1035_response_rejects_mismatches() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let good = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .build();
        assert!(parse_response(&q, &good).is_ok());

        let mut bad = good.clone();
        bad[1] ^= 1;
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("id mismatch")
        );

        let mut bad = good.clone();
        bad[2] &= !0x80;
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("not a response")
        );

        let mut bad = good.clone();
        bad[2] |= 2 << 3;
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("opcode mismatch")
        );

        for (name, qtype) in [("b.test", rtype::A), ("a.test", rtype::AAAA)] {
            let other = query_bytes(5, name, qtype, None);
            let resp = ResponseBuilder::new(&other)
                .answer(name, qtype, 300, &a([10, 0, 0, 1]))
                .build();
            assert_eq!(
                parse_response(&q, &resp).unwrap_err(),
                WireError::Malformed("question mismatch")
            );
        }
        // qclass CH
        let mut bad = good.clone();
        bad[12 + 8 + 3] = 3;
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("question mismatch")
        );
        // QDCOUNT 0
        let mut bad = good.clone();
        bad[5] = 0;
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("question mismatch")
        );
        // A qtype that differs only in bit 0x20 (A=1 vs 0x21) is a different qtype.
        let mut bad = good;
        bad[12 + 8 + 1] |= 0x20;
        assert!(parse_response(&q, &bad).is_err());
    }

    #[test]
    fn dns_0x20_response_question_matches_case_insensitively() {
        let qb = query_bytes(5, "ApI.s1.TEST", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let lower = query_bytes(5, "api.s1.test", rtype::A, None);
        let resp = ResponseBuilder::new(&lower)
            .answer("api.s1.test", rtype::A, 30, &a([1, 2, 3, 4]))
            .build();
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert!(info.answers_question);
        assert!(image.is_some());
    }

    #[test]
    fn rfc1035_response_every_prefix_fails() {
        let qb = query_bytes(5, "a.test", rtype::A, Some(EDNS0));
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .compress(true)
            .answer(
                "a.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("b.test"),
            )
            .answer("b.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .authority(
                "test",
                rtype::NS,
                300,
                &ResponseBuilder::name_rdata("ns.test"),
            )
            .opt(1232)
            .build();
        assert!(parse_response(&q, &resp).is_ok());
        for cut in 0..resp.len() {
            assert!(parse_response(&q, &resp[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn rfc1035_response_rdata_checks() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let bad_a = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &[1, 2, 3])
            .build();
        assert_eq!(
            parse_response(&q, &bad_a).unwrap_err(),
            WireError::Malformed("bad rdata")
        );
        let bad_cname = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::CNAME, 300, b"\x01b\x00\x00")
            .build();
        assert_eq!(
            parse_response(&q, &bad_cname).unwrap_err(),
            WireError::Malformed("bad rdata")
        );
        let overrun = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::CNAME, 300, b"\x05b")
            .build();
        assert!(matches!(
            parse_response(&q, &overrun).unwrap_err(),
            WireError::Malformed(_)
        ));
        let bad_txt = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::TXT, 300, b"\x05abc")
            .build();
        assert_eq!(
            parse_response(&q, &bad_txt).unwrap_err(),
            WireError::Malformed("bad rdata")
        );
        // RFC 3597: an unknown type's RDATA is opaque.
        let unknown = ResponseBuilder::new(&qb)
            .answer("a.test", 65_280, 300, &[0xC0, 0xFF, 0x40])
            .build();
        assert!(parse_response(&q, &unknown).is_ok());
        let mut trailing = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        trailing.push(0);
        assert_eq!(
            parse_response(&q, &trailing).unwrap_err(),
            WireError::Malformed("trailing bytes after the last record")
        );
    }

    #[test]
    fn rfc1035_response_compression_pointer_rules() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let base = ResponseBuilder::new(&qb)
            .compress(true)
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        let owner = 12 + q.question.len();
        assert_eq!(&base[owner..owner + 2], [0xC0, 0x0C]);
        assert!(parse_response(&q, &base).is_ok());

        // A suffix pointer ("test." at offset 14) is fine.
        let mut suffix = base.clone();
        suffix[owner + 1] = 14;
        assert!(parse_response(&q, &suffix).is_ok());

        let cases: [(u8, u8, &str); 3] = [
            (0xC0, 0x02, "compression pointer not backwards"),
            (0xC0, owner as u8, "compression pointer not backwards"),
            (0xC0, owner as u8 + 8, "compression pointer not backwards"),
        ];
        for (hi, lo, why) in cases {
            let mut bad = base.clone();
            bad[owner] = hi;
            bad[owner + 1] = lo;
            assert_eq!(
                parse_response(&q, &bad).unwrap_err(),
                WireError::Malformed(why)
            );
        }
    }

    #[test]
    fn rfc1035_response_pointer_into_ttl_rejected() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        // Second record's owner points at the first record's TTL field.
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 0x0161_0000, &a([1, 2, 3, 4]))
            .answer("b.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        let first_ttl = 12 + q.question.len() + 8 + 4;
        let second = first_ttl + 4 + 2 + 4;
        let mut bad = resp;
        bad.splice(second..second + 8, [0xC0, first_ttl as u8]);
        assert_eq!(
            parse_response(&q, &bad).unwrap_err(),
            WireError::Malformed("compression pointer into a TTL")
        );
    }

    #[test]
    fn rfc1035_response_pointer_loop_rejected() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let owner = 12 + q.question.len();
        // Owner: label "b", then a pointer back to that label: a loop.
        let mut resp = ResponseBuilder::new(&qb)
            .answer("b", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        resp.splice(owner + 2..owner + 3, [0xC0, owner as u8]);
        assert!(matches!(
            parse_response(&q, &resp).unwrap_err(),
            WireError::Malformed(_)
        ));
    }

    #[test]
    fn rfc2308_cname_chain_answers_question() {
        let qb = query_bytes(5, "www.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let chain = ResponseBuilder::new(&qb)
            .compress(true)
            .answer(
                "www.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("Mid.test"),
            )
            .answer(
                "mid.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("end.test"),
            )
            .answer("END.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        assert!(parse_response(&q, &chain).unwrap().0.answers_question);

        // Records out of order still answer.
        let shuffled = ResponseBuilder::new(&qb)
            .answer("end.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .answer(
                "www.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("end.test"),
            )
            .build();
        assert!(parse_response(&q, &shuffled).unwrap().0.answers_question);

        // A chain ending without an A is "no answer" (RFC 2308 §5 NODATA after CNAME).
        let dangling = ResponseBuilder::new(&qb)
            .answer(
                "www.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("end.test"),
            )
            .authority(
                "test",
                rtype::SOA,
                600,
                &ResponseBuilder::soa_rdata("ns.test", "h.test", 60),
            )
            .build();
        let (info, _) = parse_response(&q, &dangling).unwrap();
        assert!(!info.answers_question);
        assert_eq!(info.answer_count, 1);
        assert_eq!(info.negative_ttl, Some(60));

        // An A for an unrelated name does not answer.
        let unrelated = ResponseBuilder::new(&qb)
            .answer("other.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .build();
        assert!(!parse_response(&q, &unrelated).unwrap().0.answers_question);

        // A CNAME loop terminates.
        let looped = ResponseBuilder::new(&qb)
            .answer(
                "www.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("x.test"),
            )
            .answer(
                "x.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("www.test"),
            )
            .build();
        assert!(!parse_response(&q, &looped).unwrap().0.answers_question);
    }

    #[test]
    fn rfc2308_cname_and_any_queries_answered() {
        let qb = query_bytes(5, "www.test", rtype::CNAME, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer(
                "www.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("end.test"),
            )
            .build();
        assert!(parse_response(&q, &resp).unwrap().0.answers_question);

        let qb = query_bytes(5, "www.test", rtype::ANY, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer("www.test", 13, 300, b"\x03x86\x05linux")
            .build();
        assert!(parse_response(&q, &resp).unwrap().0.answers_question);
    }

    #[test]
    fn rfc2308_nxdomain_negative_ttl() {
        let qb = query_bytes(5, "nope.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        for (soa_ttl, minimum, expect) in [(3600u32, 30u32, 30u32), (20, 900, 20)] {
            let resp = ResponseBuilder::new(&qb)
                .rcode(rcode::NXDOMAIN)
                .authority(
                    "test",
                    rtype::SOA,
                    soa_ttl,
                    &ResponseBuilder::soa_rdata("ns.test", "hostmaster.test", minimum),
                )
                .build();
            let (info, image) = parse_response(&q, &resp).unwrap();
            assert_eq!(info.rcode, rcode::NXDOMAIN);
            assert!(!info.answers_question);
            assert_eq!(info.answer_count, 0);
            assert_eq!(info.negative_ttl, Some(expect));
            assert_eq!(info.min_ttl, Some(soa_ttl));
            assert_eq!(image.unwrap().rcode(), rcode::NXDOMAIN);
        }
    }

    #[test]
    fn rfc2308_nodata_and_first_soa() {
        let qb = query_bytes(5, "a.test", rtype::AAAA, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .authority(
                "test",
                rtype::SOA,
                100,
                &ResponseBuilder::soa_rdata("ns.test", "h.test", 50),
            )
            .authority(
                "other",
                rtype::SOA,
                5,
                &ResponseBuilder::soa_rdata("ns.other", "h.other", 5),
            )
            .build();
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert_eq!(info.rcode, rcode::NOERROR);
        assert!(!info.answers_question);
        assert_eq!(info.negative_ttl, Some(50));
        assert_eq!(info.min_ttl, Some(5));
        assert!(image.is_some());

        // Without a SOA there is no negative TTL; without records no min TTL.
        let bare = ResponseBuilder::new(&qb).build();
        let (info, _) = parse_response(&q, &bare).unwrap();
        assert_eq!(info.negative_ttl, None);
        assert_eq!(info.min_ttl, None);

        // A SOA in the answer section is not the negative-caching SOA.
        let in_answer = ResponseBuilder::new(&qb)
            .answer(
                "test",
                rtype::SOA,
                100,
                &ResponseBuilder::soa_rdata("ns.test", "h.test", 50),
            )
            .build();
        assert_eq!(parse_response(&q, &in_answer).unwrap().0.negative_ttl, None);
    }

    #[test]
    fn rfc2181_ttl_with_top_bit_counts_as_zero() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 0x8000_0001, &a([1, 2, 3, 4]))
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 5]))
            .build();
        assert_eq!(parse_response(&q, &resp).unwrap().0.min_ttl, Some(0));
    }

    #[test]
    fn rfc6891_response_opt_removed_and_arcount_adjusted() {
        let qb = query_bytes(5, "a.test", rtype::A, Some(EDNS0));
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .additional("ns.test", rtype::A, 200, &a([5, 6, 7, 8]))
            .opt(4096)
            .build();
        assert_eq!(counts(&resp), [1, 1, 0, 2]);
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert_eq!(info.min_ttl, Some(200));
        let image = image.unwrap();
        assert_eq!(image.bytes().len(), resp.len() - OPT_RR_LEN);
        assert_eq!(counts(image.bytes()), [1, 1, 0, 1]);
        assert_eq!(image.bytes()[12..], resp[12..resp.len() - OPT_RR_LEN]);
        assert_eq!(image.ttl_offsets().len(), 2);
        assert!(records(image.bytes()).iter().all(|r| r.1 != rtype::OPT));
    }

    #[test]
    fn rfc6891_response_opt_not_last_has_no_image() {
        let qb = query_bytes(5, "a.test", rtype::A, Some(EDNS0));
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .opt(4096)
            .additional("ns.test", rtype::A, 200, &a([5, 6, 7, 8]))
            .build();
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert!(info.answers_question);
        assert_eq!(image, None);
    }

    #[test]
    fn rfc6891_response_bad_opt_placement() {
        let qb = query_bytes(5, "a.test", rtype::A, Some(EDNS0));
        let q = parse_query(&qb).unwrap();
        let two = ResponseBuilder::new(&qb).opt(4096).opt(4096).build();
        assert_eq!(
            parse_response(&q, &two).unwrap_err(),
            WireError::Malformed("second OPT record")
        );
        let in_answer = ResponseBuilder::new(&qb)
            .answer(".", rtype::OPT, 0, &[])
            .build();
        assert_eq!(
            parse_response(&q, &in_answer).unwrap_err(),
            WireError::Malformed("OPT outside the additional section")
        );
        let named = ResponseBuilder::new(&qb)
            .additional("x.test", rtype::OPT, 0, &[])
            .build();
        assert_eq!(
            parse_response(&q, &named).unwrap_err(),
            WireError::Malformed("OPT owner is not the root")
        );
    }

    #[test]
    fn rfc1035_truncated_response_has_no_image() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        let resp = ResponseBuilder::new(&qb).truncated(true).build();
        let (info, image) = parse_response(&q, &resp).unwrap();
        assert!(info.truncated);
        assert_eq!(image, None);
    }

    #[test]
    fn rfc8945_signed_response_has_no_image() {
        let qb = query_bytes(5, "a.test", rtype::A, None);
        let q = parse_query(&qb).unwrap();
        for signature in [rtype::TSIG, rtype::SIG] {
            let resp = ResponseBuilder::new(&qb)
                .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
                .additional("key.test", signature, 0, &[0; 8])
                .build();
            let (info, image) = parse_response(&q, &resp).unwrap();
            assert!(info.answers_question);
            assert_eq!(image, None);
        }
        // A SIG in the answer section is data (old DNSSEC), not a message signature.
        let resp = ResponseBuilder::new(&qb)
            .answer("a.test", rtype::A, 300, &a([1, 2, 3, 4]))
            .answer("a.test", rtype::SIG, 300, &[0; 8])
            .build();
        assert!(parse_response(&q, &resp).unwrap().1.is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn parse_response_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let qb = query_bytes(u16::from_be_bytes([bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)]), "a.test", rtype::A, None);
            let q = parse_query(&qb).unwrap();
            let _ = parse_response(&q, &bytes);
            let mut with_header = qb.clone();
            with_header[2] |= 0x80;
            with_header.extend_from_slice(&bytes);
            let _ = parse_response(&q, &with_header);
        }

        #[test]
        fn parse_response_mutations_never_panic_and_images_render(
            name in qname(),
            qtype in prop_oneof![Just(rtype::A), Just(rtype::AAAA), Just(rtype::CNAME)],
            upstream_edns in edns(),
            recs in proptest::collection::vec((any::<bool>(), any::<u32>(), kind()), 0..6),
            compress in any::<bool>(),
            nxdomain in any::<bool>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            client_edns in edns(),
        ) {
            let (upstream_q, mut resp) =
                build_scenario(&name, qtype, upstream_edns, &recs, compress, nxdomain);
            for (at, value) in flips {
                let len = resp.len();
                resp[at % len] = value;
            }
            let q = parse_query(&upstream_q).unwrap();
            if let Ok((_, Some(image))) = parse_response(&q, &resp) {
                let client = query_bytes(7, &name, qtype, client_edns);
                let cq = parse_query(&client).unwrap();
                let mut out = Vec::new();
                let rendered = render(&cq, &image, 1, MAX_MESSAGE, &mut out);
                prop_assert_eq!(rendered, Rendered::Full);
                let parsed = parse_response(&cq, &out);
                prop_assert!(parsed.is_ok(), "{:?}", parsed);
            }
        }
    }
}
