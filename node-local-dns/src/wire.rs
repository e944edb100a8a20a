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

use std::fmt::Write as _;

use thiserror::Error;

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

// Types with names in their RDATA that RFC 3597 §4 allows to be compressed, besides the
// public ones above.
const MD: u16 = 3;
const MF: u16 = 4;
const MB: u16 = 7;
const MG: u16 = 8;
const MR: u16 = 9;
const MINFO: u16 = 14;

const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;
/// A name is at most 255 octets in wire form, root label included (RFC 1035 §3.1).
const MAX_NAME: usize = 255;
/// Bound on compression pointers followed for one name (a name has at most 127 labels).
const MAX_POINTER_HOPS: usize = 128;
/// Bound on CNAME links followed when deciding whether the answer answers the question.
const MAX_CNAME_CHAIN: usize = 16;
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
/// DO bit in the OPT TTL field (RFC 3225).
const EDNS_DO: u32 = 0x8000;

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
/// The header of `bytes` is the upstream's (ARCOUNT less the OPT): [`render`] takes the
/// rcode and AD bit from it and sets everything else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireImage {
    /// Header + question + records (OPT removed, ARCOUNT adjusted).
    bytes: Vec<u8>,
    /// Offset of every RR's 4-byte TTL field in `bytes`, ascending.
    ttl_offsets: Vec<u16>,
    /// Length of the question (qname + qtype + qclass) at offset 12.
    question_len: usize,
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

    fn flags(&self) -> u16 {
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

/// How a rendered reply came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendered {
    /// The whole answer fit.
    Full,
    /// It did not: a TC=1 reply with the question (and OPT) only.
    Truncated,
}

/// Renders a reply to `query` from `image` into `out` (cleared first): header ID from the
/// query, QR=1, OPCODE 0, AA=1 (CoreDNS sets AA on cache hits for old glibc; kept for drop-in
/// parity), TC per result, RD and CD copied from the query, RA=1, AD only if the image had AD
/// and the query had DO or AD (RFC 6840 §5.7-5.8), rcode from the image; the client's
/// question bytes copied over the stored question; every TTL set to `ttl` (capped at 2^31-1);
/// if the query had EDNS, an OPT record appended (owner root, type 41, class = OUR_UDP_SIZE,
/// ttl = ext-rcode 0 / version 0 / DO copied from the query, rdlength 0) and ARCOUNT
/// incremented.
///
/// If the result exceeds `limit` bytes, a truncated reply is rendered instead: header with
/// TC=1 and ANCOUNT=NSCOUNT=0 (ARCOUNT 1 if OPT else 0), the question, the OPT if any.
///
/// If the image was not made for this question (the stored question differs beyond ASCII
/// case: a caller bug), a SERVFAIL is rendered rather than another name's answer. Never
/// allocates beyond `out`'s growth.
pub fn render(
    query: &Query<'_>,
    image: &WireImage,
    ttl: u32,
    limit: usize,
    out: &mut Vec<u8>,
) -> Rendered {
    out.clear();
    let stored = image.bytes.get(HEADER_LEN..HEADER_LEN + image.question_len);
    if !stored.is_some_and(|stored| same_question(stored, query.question)) {
        render_error(query, u16::from(rcode::SERVFAIL), out);
        return Rendered::Full;
    }
    let image_flags = image.flags();
    let mut flags = reply_flags(query) | FLAG_AA | (image_flags & FLAG_RCODE);
    if image_flags & FLAG_AD != 0
        && (query.authentic_data || query.edns.is_some_and(|e| e.dnssec_ok))
    {
        flags |= FLAG_AD;
    }
    let opt_len = if query.edns.is_some() { OPT_RR_LEN } else { 0 };
    if image.bytes.len() + opt_len > limit {
        let arcount = u16::from(query.edns.is_some());
        push_header(out, query.id, flags | FLAG_TC, [1, 0, 0, arcount]);
        out.extend_from_slice(query.question);
        push_opt(query, 0, out);
        return Rendered::Truncated;
    }
    out.extend_from_slice(&image.bytes);
    put16(out, 0, query.id);
    put16(out, 2, flags);
    if let Some(question) = out.get_mut(HEADER_LEN..HEADER_LEN + image.question_len) {
        question.copy_from_slice(query.question);
    }
    let ttl = ttl.min(MAX_TTL).to_be_bytes();
    for &at in &image.ttl_offsets {
        let at = usize::from(at);
        if let Some(field) = out.get_mut(at..at + 4) {
            field.copy_from_slice(&ttl);
        }
    }
    if query.edns.is_some() {
        let arcount = be16(out, 10).unwrap_or(0).saturating_add(1);
        put16(out, 10, arcount);
        push_opt(query, 0, out);
    }
    Rendered::Full
}

/// Renders a reply to `query` from an upstream `response` that the cache did not keep
/// (REFUSED, a negative answer without SOA, SERVFAIL when those are not cached): as
/// [`render`] does from a cache entry, with every TTL set to the response's smallest. The
/// client so gets its own ID, RD and CD, question bytes and OPT (none if it sent none,
/// RFC 6891 §7), never the upstream's. A response that cannot be imaged (truncated, signed, a
/// record after its OPT) or that is not for this question gets SERVFAIL.
pub fn render_uncached(
    query: &Query<'_>,
    response: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Rendered {
    // The upstream answered our own query, with its own ID: check it against that.
    let as_sent = Query {
        id: be16(response, 0).unwrap_or(!query.id),
        ..*query
    };
    match parse_response(&as_sent, response) {
        Ok((info, Some(image))) => render(query, &image, info.min_ttl.unwrap_or(0), limit, out),
        _ => {
            render_error(query, u16::from(rcode::SERVFAIL), out);
            Rendered::Full
        }
    }
}

/// Renders a header-only reply (question echoed, OPT iff the query had one) with `rcode`:
/// for SERVFAIL/REFUSED/FORMERR answers the proxy makes itself. AA=0, AD=0, RA=1, RD and CD
/// copied. An rcode above 15 (BADVERS=16 for an EDNS version > 0 query) keeps its low 4 bits
/// in the header and puts the upper 8 bits in the OPT's extended rcode (RFC 6891 §6.1.3);
/// without an OPT, or above 12 bits, it cannot be encoded and SERVFAIL is sent instead.
pub fn render_error(query: &Query<'_>, rcode: u16, out: &mut Vec<u8>) {
    out.clear();
    let has_opt = query.edns.is_some();
    let rcode = if rcode > 0xFFF || (rcode > 0xF && !has_opt) {
        u16::from(rcode::SERVFAIL)
    } else {
        rcode
    };
    let flags = reply_flags(query) | (rcode & FLAG_RCODE);
    push_header(out, query.id, flags, [1, 0, 0, u16::from(has_opt)]);
    out.extend_from_slice(query.question);
    push_opt(query, (rcode >> 4) as u8, out);
}

/// Renders a header-only reply with `rcode` to a packet that [`parse_query`] rejected, so a
/// client gets FORMERR (malformed) or NOTIMP (other opcode) instead of a timeout: ID, OPCODE,
/// RD and CD echoed, QR=1, RA=1, all counts 0. Returns false and leaves `out` empty when
/// nothing should be sent: the packet has no complete header or is itself a response (QR=1;
/// answering those invites loops).
pub fn render_reject(packet: &[u8], rcode: u8, out: &mut Vec<u8>) -> bool {
    out.clear();
    let (Ok(id), Ok(flags)) = (be16(packet, 0), be16(packet, 2)) else {
        return false;
    };
    if packet.len() < HEADER_LEN || flags & FLAG_QR != 0 {
        return false;
    }
    let flags =
        FLAG_QR | FLAG_RA | (flags & (FLAG_OPCODE | FLAG_RD | FLAG_CD)) | u16::from(rcode & 0xF);
    push_header(out, id, flags, [0, 0, 0, 0]);
    true
}

/// Header flags every reply to `query` shares: QR, RA, and RD/CD echoed.
fn reply_flags(query: &Query<'_>) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA;
    if query.recursion_desired {
        flags |= FLAG_RD;
    }
    if query.checking_disabled {
        flags |= FLAG_CD;
    }
    flags
}

fn push_header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for count in counts {
        out.extend_from_slice(&count.to_be_bytes());
    }
}

/// Appends our OPT record if the query had EDNS: UDP size OUR_UDP_SIZE, version 0, DO
/// mirrored (RFC 3225), no options.
fn push_opt(query: &Query<'_>, extended_rcode: u8, out: &mut Vec<u8>) {
    let Some(edns) = query.edns else {
        return;
    };
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_SIZE.to_be_bytes());
    let do_bit = if edns.dnssec_ok { 0x80 } else { 0 };
    out.extend_from_slice(&[extended_rcode, 0, do_bit, 0, 0, 0]);
}

/// Appends `name` ("api.s1.test." or without the final dot; "." or "" is the root) in wire
/// form. No escapes are interpreted; for tests and the forwarder, so a label longer than 63
/// bytes is cut to 63 and labels that would take the name past 255 bytes are dropped.
pub fn encode_name(name: &str, out: &mut Vec<u8>) {
    let mut written = 0;
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let label = label.as_bytes();
        let label = label.get(..label.len().min(63)).unwrap_or_default();
        if written + 1 + label.len() + 1 > MAX_NAME {
            break;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label);
        written += 1 + label.len();
    }
    out.push(0);
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

/// A record queued in a [`ResponseBuilder`].
#[derive(Debug, Clone)]
enum BuiltRecord {
    Rr {
        name: Vec<u8>,
        rtype: u16,
        ttl: u32,
        rdata: Vec<u8>,
    },
    Opt {
        udp_size: u16,
    },
}

/// Makes upstream responses, for tests and the forwarder. Records are written per section in
/// the order added, class IN; an OPT goes where [`ResponseBuilder::opt`] was called among the
/// additional records (so "OPT not last" can be built too).
#[derive(Debug, Clone)]
pub struct ResponseBuilder {
    id: u16,
    query_flags: u16,
    question: Vec<u8>,
    rcode: u8,
    truncated: bool,
    authentic_data: bool,
    compress: bool,
    sections: [Vec<BuiltRecord>; 3],
}

impl ResponseBuilder {
    /// A NOERROR response to `query` (ID, RD, CD and question copied). If `query` does not
    /// parse, the ID is taken from its first two bytes and the response has no question.
    pub fn new(query: &[u8]) -> Self {
        let (id, query_flags, question) = match parse_query(query) {
            Ok(q) => (
                q.id,
                reply_flags(&q) & (FLAG_RD | FLAG_CD),
                q.question.to_vec(),
            ),
            Err(_) => (be16(query, 0).unwrap_or(0), 0, Vec::new()),
        };
        Self {
            id,
            query_flags,
            question,
            rcode: rcode::NOERROR,
            truncated: false,
            authentic_data: false,
            compress: false,
            sections: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    /// Sets the header rcode (low 4 bits).
    pub fn rcode(mut self, rcode: u8) -> Self {
        self.rcode = rcode & 0xF;
        self
    }

    /// Adds an answer record (`rdata` as it goes on the wire).
    pub fn answer(self, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(SECTION_ANSWER, name, rtype, ttl, rdata)
    }

    /// Adds an authority record.
    pub fn authority(self, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(SECTION_AUTHORITY, name, rtype, ttl, rdata)
    }

    /// Adds an additional record.
    pub fn additional(self, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(SECTION_ADDITIONAL, name, rtype, ttl, rdata)
    }

    /// Adds an OPT record (version 0, no options) at this point of the additional section.
    pub fn opt(mut self, udp_size: u16) -> Self {
        self.sections[SECTION_ADDITIONAL].push(BuiltRecord::Opt { udp_size });
        self
    }

    /// Sets the TC bit.
    pub fn truncated(mut self, truncated: bool) -> Self {
        self.truncated = truncated;
        self
    }

    /// Sets the AD bit.
    pub fn authentic_data(mut self, authentic_data: bool) -> Self {
        self.authentic_data = authentic_data;
        self
    }

    /// With `true`, owner names equal to the qname (ignoring case) are written as a pointer to
    /// offset 12, as real servers compress.
    pub fn compress(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// The response bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut flags = FLAG_QR | FLAG_RA | self.query_flags | u16::from(self.rcode);
        if self.truncated {
            flags |= FLAG_TC;
        }
        if self.authentic_data {
            flags |= FLAG_AD;
        }
        let count = |s: usize| u16::try_from(self.sections[s].len()).unwrap_or(u16::MAX);
        let mut out = Vec::new();
        push_header(
            &mut out,
            self.id,
            flags,
            [
                u16::from(!self.question.is_empty()),
                count(SECTION_ANSWER),
                count(SECTION_AUTHORITY),
                count(SECTION_ADDITIONAL),
            ],
        );
        out.extend_from_slice(&self.question);
        let qname = self
            .question
            .get(..self.question.len().saturating_sub(4))
            .unwrap_or_default();
        for record in self.sections.iter().flatten() {
            match record {
                BuiltRecord::Rr {
                    name,
                    rtype,
                    ttl,
                    rdata,
                } => {
                    if self.compress && !qname.is_empty() && name.eq_ignore_ascii_case(qname) {
                        out.extend_from_slice(&[0xC0, 0x0C]);
                    } else {
                        out.extend_from_slice(name);
                    }
                    out.extend_from_slice(&rtype.to_be_bytes());
                    out.extend_from_slice(&CLASS_IN.to_be_bytes());
                    out.extend_from_slice(&ttl.to_be_bytes());
                    let rdlen = u16::try_from(rdata.len()).unwrap_or(u16::MAX);
                    out.extend_from_slice(&rdlen.to_be_bytes());
                    out.extend_from_slice(rdata);
                }
                BuiltRecord::Opt { udp_size } => {
                    out.push(0);
                    out.extend_from_slice(&rtype::OPT.to_be_bytes());
                    out.extend_from_slice(&udp_size.to_be_bytes());
                    out.extend_from_slice(&[0; 6]);
                }
            }
        }
        out
    }

    /// RDATA that is one name (CNAME, NS, PTR), uncompressed.
    pub fn name_rdata(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_name(name, &mut out);
        out
    }

    /// SOA RDATA with the given MNAME, RNAME and MINIMUM (serial 1, refresh 3600, retry 600,
    /// expire 86400).
    pub fn soa_rdata(mname: &str, rname: &str, minimum: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_name(mname, &mut out);
        encode_name(rname, &mut out);
        for field in [1u32, 3600, 600, 86_400, minimum] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out
    }

    fn record(mut self, section: usize, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) -> Self {
        let mut wire = Vec::new();
        encode_name(name, &mut wire);
        self.sections[section].push(BuiltRecord::Rr {
            name: wire,
            rtype,
            ttl,
            rdata: rdata.to_vec(),
        });
        self
    }
}

/// A decoded name: wire form, lower-cased, pointers followed.
struct NameBuf {
    buf: [u8; MAX_NAME],
    len: usize,
}

impl NameBuf {
    fn new() -> Self {
        Self {
            buf: [0; MAX_NAME],
            len: 0,
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Appends lower-cased bytes; anything past MAX_NAME is dropped (callers check lengths).
    fn push_lower(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b.to_ascii_lowercase();
                self.len += 1;
            }
        }
    }
}

/// Whether two questions (qname + qtype + qclass) are equal: qname ignoring ASCII case,
/// qtype and qclass exactly.
fn same_question(a: &[u8], b: &[u8]) -> bool {
    let split = a.len().saturating_sub(4);
    a.len() == b.len()
        && a.len() >= 5
        && a.get(..split)
            .zip(b.get(..split))
            .is_some_and(|(x, y)| x.eq_ignore_ascii_case(y))
        && a.get(split..) == b.get(split..)
}

/// Walks an uncompressed name at `start` (a question's qname); returns the offset after its
/// root label.
fn skip_plain_name(packet: &[u8], start: usize) -> Result<usize, WireError> {
    let mut pos = start;
    loop {
        let len = *packet.get(pos).ok_or(WireError::Short)?;
        match len & 0xC0 {
            0x00 => {}
            0xC0 => return Err(WireError::Malformed("compression pointer in the question")),
            _ => return Err(WireError::Malformed("bad label type")),
        }
        pos += 1 + usize::from(len);
        if pos - start > MAX_NAME {
            return Err(WireError::Malformed("name too long"));
        }
        if len == 0 {
            return Ok(pos);
        }
    }
}

/// Reads the (possibly compressed) name at `start`, whose in-place part must end by `stop`,
/// into `out` (cleared first) if given. Returns the offset after the in-place part.
///
/// A pointer must target an offset past the header and before itself, and everything read
/// after a jump must lie before that pointer, so each jump moves strictly backwards; the
/// jumps are also counted. Bytes reached through a pointer must not overlap a TTL field in
/// `ttls` (ascending): rendering rewrites those, which would change the name.
fn read_name(
    packet: &[u8],
    start: usize,
    stop: usize,
    ttls: &[u16],
    mut out: Option<&mut NameBuf>,
) -> Result<usize, WireError> {
    if let Some(out) = out.as_deref_mut() {
        out.len = 0;
    }
    let mut pos = start;
    let mut limit = stop.min(packet.len());
    let mut in_place_end: Option<usize> = None;
    let mut hops = 0;
    let mut name_len = 0;
    // Running past `limit`: the end of the field in place, else a bad pointer.
    let overrun = |jumped: bool| {
        if jumped {
            WireError::Malformed("compression pointer target runs forward")
        } else {
            WireError::Short
        }
    };
    loop {
        let jumped = in_place_end.is_some();
        if pos >= limit {
            return Err(overrun(jumped));
        }
        let len = *packet.get(pos).ok_or(WireError::Short)?;
        match len & 0xC0 {
            0x00 => {
                let label_end = pos + 1 + usize::from(len);
                if label_end > limit {
                    return Err(overrun(jumped));
                }
                name_len += 1 + usize::from(len);
                if name_len > MAX_NAME {
                    return Err(WireError::Malformed("name too long"));
                }
                if jumped && touches_ttl(ttls, pos, label_end) {
                    return Err(WireError::Malformed("compression pointer into a TTL"));
                }
                if let Some(out) = out.as_deref_mut() {
                    out.push_lower(packet.get(pos..label_end).unwrap_or_default());
                }
                pos = label_end;
                if len == 0 {
                    return Ok(in_place_end.unwrap_or(pos));
                }
            }
            0xC0 => {
                if pos + 2 > limit {
                    return Err(overrun(jumped));
                }
                if jumped && touches_ttl(ttls, pos, pos + 2) {
                    return Err(WireError::Malformed("compression pointer into a TTL"));
                }
                let low = *packet.get(pos + 1).ok_or(WireError::Short)?;
                let target = usize::from(len & 0x3F) << 8 | usize::from(low);
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    return Err(WireError::Malformed("too many compression pointers"));
                }
                if target < HEADER_LEN || target >= pos {
                    return Err(WireError::Malformed("compression pointer not backwards"));
                }
                in_place_end.get_or_insert(pos + 2);
                limit = pos;
                pos = target;
            }
            _ => return Err(WireError::Malformed("bad label type")),
        }
    }
}

/// Whether `[from, to)` overlaps any 4-byte TTL field at the ascending offsets `ttls`.
fn touches_ttl(ttls: &[u16], from: usize, to: usize) -> bool {
    let first = ttls.partition_point(|&at| usize::from(at) + 4 <= from);
    ttls.get(first).is_some_and(|&at| usize::from(at) < to)
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
    use proptest::prelude::*;

    const EDNS0: Edns = Edns {
        udp_size: 1232,
        version: 0,
        dnssec_ok: false,
    };
    const EDNS_DO: Edns = Edns {
        udp_size: 1232,
        version: 0,
        dnssec_ok: true,
    };

    fn query_bytes(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
        let mut out = Vec::new();
        build_query(id, name, qtype, edns, &mut out);
        out
    }

    fn a(ip: [u8; 4]) -> Vec<u8> {
        ip.to_vec()
    }

    /// Every record after the question: (lower-cased owner, type, ttl, rdata), OPT included.
    fn records(p: &[u8]) -> Vec<(Vec<u8>, u16, u32, Vec<u8>)> {
        let count: usize = (6..12)
            .step_by(2)
            .map(|at| usize::from(be16(p, at).unwrap()))
            .sum();
        let mut pos = skip_plain_name(p, HEADER_LEN).unwrap() + 4;
        let mut owner = NameBuf::new();
        let mut out = Vec::new();
        for _ in 0..count {
            let fixed = read_name(p, pos, p.len(), &[], Some(&mut owner)).unwrap();
            let rdlen = usize::from(be16(p, fixed + 8).unwrap());
            let rdata = p[fixed + 10..fixed + 10 + rdlen].to_vec();
            out.push((
                owner.as_slice().to_vec(),
                be16(p, fixed).unwrap(),
                be32(p, fixed + 4).unwrap(),
                rdata,
            ));
            pos = fixed + 10 + rdlen;
        }
        assert_eq!(pos, p.len());
        out
    }

    /// The name at `at` with pointers followed and case kept.
    fn raw_name(p: &[u8], mut at: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let len = p[at];
            if len & 0xC0 == 0xC0 {
                at = usize::from(len & 0x3F) << 8 | usize::from(p[at + 1]);
                continue;
            }
            out.extend_from_slice(&p[at..at + 1 + usize::from(len)]);
            if len == 0 {
                return out;
            }
            at += 1 + usize::from(len);
        }
    }

    fn flags(p: &[u8]) -> u16 {
        be16(p, 2).unwrap()
    }

    fn counts(p: &[u8]) -> [u16; 4] {
        [4, 6, 8, 10].map(|at| be16(p, at).unwrap())
    }

    // ---- parse_query ----

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
    fn error_kinds() {
        assert_eq!(WireError::Short.kind(), "short");
        assert_eq!(WireError::Malformed("x").kind(), "malformed");
        assert_eq!(WireError::NotQuery.kind(), "not_query");
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

    // ---- parse_response ----

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

    // ---- render ----

    /// The image of `resp` (made for `upstream_query`).
    fn image_of(upstream_query: &[u8], resp: &[u8]) -> WireImage {
        let q = parse_query(upstream_query).unwrap();
        parse_response(&q, resp).unwrap().1.unwrap()
    }

    #[test]
    fn dns_0x20_render_echoes_client_case_with_compressed_answers() {
        let upstream_q = query_bytes(1, "api.s1.test", rtype::A, None);
        let resp = ResponseBuilder::new(&upstream_q)
            .compress(true)
            .answer("api.s1.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .answer("api.s1.test", rtype::A, 300, &a([10, 0, 0, 2]))
            .build();
        let image = image_of(&upstream_q, &resp);

        let client = query_bytes(0x4242, "aPi.S1.tEsT", rtype::A, None);
        let q = parse_query(&client).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            render(&q, &image, 42, q.udp_limit(), &mut out),
            Rendered::Full
        );
        assert_eq!(&out[12..12 + q.question.len()], q.question);
        let first = 12 + q.question.len();
        assert_eq!(&out[first..first + 2], [0xC0, 0x0C]);
        assert_eq!(raw_name(&out, first), q.qname());
        assert_eq!(be16(&out, 0).unwrap(), 0x4242);
        let (info, _) = parse_response(&q, &out).unwrap();
        assert!(info.answers_question);
        assert_eq!(info.answer_count, 2);
    }

    #[test]
    fn rfc1035_render_header_and_ttls() {
        let upstream_q = query_bytes(1, "a.test", rtype::A, None);
        let resp = ResponseBuilder::new(&upstream_q)
            .rcode(rcode::NOERROR)
            .answer(
                "a.test",
                rtype::CNAME,
                300,
                &ResponseBuilder::name_rdata("b.test"),
            )
            .answer("b.test", rtype::A, 100, &a([10, 0, 0, 1]))
            .authority(
                "test",
                rtype::NS,
                900,
                &ResponseBuilder::name_rdata("ns.test"),
            )
            .additional("ns.test", rtype::A, 900, &a([10, 0, 0, 53]))
            .build();
        let image = image_of(&upstream_q, &resp);

        let mut client = query_bytes(7, "a.test", rtype::A, None);
        client[3] |= 0x10; // CD
        let q = parse_query(&client).unwrap();
        let mut out = vec![1, 2, 3];
        assert_eq!(render(&q, &image, 17, 512, &mut out), Rendered::Full);
        assert_eq!(out.len(), resp.len());
        // QR AA RD | RA CD, rcode 0
        assert_eq!(flags(&out), 0x8000 | 0x0400 | 0x0100 | 0x0080 | 0x0010);
        assert_eq!(counts(&out), [1, 2, 1, 1]);
        let recs = records(&out);
        assert_eq!(recs.len(), 4);
        assert!(recs.iter().all(|r| r.2 == 17));
        assert_eq!(recs, {
            let mut orig = records(&resp);
            orig.iter_mut().for_each(|r| r.2 = 17);
            orig
        });

        // RD off in the query: off in the reply; huge TTLs are capped at 2^31-1.
        client[2] &= !0x01;
        let q = parse_query(&client).unwrap();
        render(&q, &image, u32::MAX, 512, &mut out);
        assert_eq!(flags(&out) & 0x0100, 0);
        assert!(records(&out).iter().all(|r| r.2 == 0x7FFF_FFFF));
    }

    #[test]
    fn rfc2308_render_keeps_rcode() {
        let upstream_q = query_bytes(1, "nope.test", rtype::A, None);
        let resp = ResponseBuilder::new(&upstream_q)
            .rcode(rcode::NXDOMAIN)
            .authority(
                "test",
                rtype::SOA,
                60,
                &ResponseBuilder::soa_rdata("ns.test", "h.test", 60),
            )
            .build();
        let image = image_of(&upstream_q, &resp);
        let q = parse_query(&upstream_q).unwrap();
        let mut out = Vec::new();
        render(&q, &image, 9, 512, &mut out);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::NXDOMAIN));
        assert_eq!(records(&out)[0].2, 9);
    }

    #[test]
    fn rfc6891_render_opt_iff_query_had_edns() {
        let upstream_q = query_bytes(1, "a.test", rtype::A, Some(EDNS0));
        let resp = ResponseBuilder::new(&upstream_q)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .opt(4096)
            .build();
        let image = image_of(&upstream_q, &resp);
        let mut out = Vec::new();

        let plain = query_bytes(2, "a.test", rtype::A, None);
        let q = parse_query(&plain).unwrap();
        render(&q, &image, 5, 512, &mut out);
        assert_eq!(counts(&out), [1, 1, 0, 0]);
        assert!(records(&out).iter().all(|r| r.1 != rtype::OPT));

        for edns in [EDNS0, EDNS_DO] {
            let edns_q = query_bytes(
                3,
                "a.test",
                rtype::A,
                Some(Edns {
                    udp_size: 4096,
                    ..edns
                }),
            );
            let q = parse_query(&edns_q).unwrap();
            render(&q, &image, 5, q.udp_limit(), &mut out);
            assert_eq!(counts(&out), [1, 1, 0, 1]);
            let opt = &out[out.len() - OPT_RR_LEN..];
            let do_bit = if edns.dnssec_ok { 0x80 } else { 0 };
            assert_eq!(opt, [0, 0, 41, 0x04, 0xD0, 0, 0, do_bit, 0, 0, 0]);
            // The appended OPT is the last record, so the reply re-parses into an image.
            let (_, again) = parse_response(&q, &out).unwrap();
            assert_eq!(again.unwrap().ttl_offsets().len(), 1);
        }
    }

    #[test]
    fn rfc6840_render_ad_rules() {
        let upstream_q = query_bytes(1, "a.test", rtype::A, Some(EDNS_DO));
        let signed = ResponseBuilder::new(&upstream_q)
            .authentic_data(true)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .build();
        let unsigned = ResponseBuilder::new(&upstream_q)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .build();
        let signed = image_of(&upstream_q, &signed);
        let unsigned = image_of(&upstream_q, &unsigned);
        assert!(signed.authentic_data());

        let mut ad_query = query_bytes(2, "a.test", rtype::A, None);
        ad_query[3] |= 0x20;
        let cases = [
            (query_bytes(2, "a.test", rtype::A, Some(EDNS_DO)), true),
            (ad_query, true),
            (query_bytes(2, "a.test", rtype::A, Some(EDNS0)), false),
            (query_bytes(2, "a.test", rtype::A, None), false),
        ];
        let mut out = Vec::new();
        for (client, expect) in cases {
            let q = parse_query(&client).unwrap();
            render(&q, &signed, 5, 512, &mut out);
            assert_eq!(flags(&out) & 0x0020 != 0, expect, "{client:?}");
            render(&q, &unsigned, 5, 512, &mut out);
            assert_eq!(flags(&out) & 0x0020, 0);
        }
    }

    /// A response of `n` TXT records of 100 bytes each.
    fn big_response(query: &[u8], n: usize) -> Vec<u8> {
        let mut txt = vec![99];
        txt.extend_from_slice(&[b'x'; 99]);
        let mut builder = ResponseBuilder::new(query).compress(true);
        for _ in 0..n {
            builder = builder.answer("big.test", rtype::TXT, 300, &txt);
        }
        builder.build()
    }

    #[test]
    fn rfc1035_render_truncates_to_512_without_edns() {
        let upstream_q = query_bytes(1, "big.test", rtype::TXT, Some(EDNS0));
        let resp = big_response(&upstream_q, 6); // ~700 bytes
        let image = image_of(&upstream_q, &resp);
        assert!(image.bytes().len() > 512 && image.bytes().len() + OPT_RR_LEN <= 1232);

        let plain = query_bytes(9, "BIG.test", rtype::TXT, None);
        let q = parse_query(&plain).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            render(&q, &image, 5, q.udp_limit(), &mut out),
            Rendered::Truncated
        );
        assert_eq!(flags(&out) & 0x0200, 0x0200);
        assert_eq!(counts(&out), [1, 0, 0, 0]);
        assert_eq!(&out[12..], q.question);
        assert_eq!(be16(&out, 0).unwrap(), 9);
        // Over TCP the same image fits.
        assert_eq!(render(&q, &image, 5, MAX_MESSAGE, &mut out), Rendered::Full);
        assert_eq!(flags(&out) & 0x0200, 0);

        let edns = query_bytes(9, "big.test", rtype::TXT, Some(EDNS_DO));
        let q = parse_query(&edns).unwrap();
        assert_eq!(
            render(&q, &image, 5, q.udp_limit(), &mut out),
            Rendered::Full
        );
    }

    #[test]
    fn rfc6891_render_truncates_to_edns_size() {
        let upstream_q = query_bytes(1, "big.test", rtype::TXT, Some(EDNS0));
        let resp = big_response(&upstream_q, 14); // ~1.5 kB
        let image = image_of(&upstream_q, &resp);
        let client = query_bytes(
            9,
            "big.test",
            rtype::TXT,
            Some(Edns {
                udp_size: 4096,
                ..EDNS_DO
            }),
        );
        let q = parse_query(&client).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            render(&q, &image, 5, q.udp_limit(), &mut out),
            Rendered::Truncated
        );
        assert_eq!(flags(&out) & 0x0200, 0x0200);
        assert_eq!(counts(&out), [1, 0, 0, 1]);
        assert_eq!(out.len(), 12 + q.question.len() + OPT_RR_LEN);
        assert_eq!(out[out.len() - 4], 0x80); // DO mirrored
        let (info, image_again) = parse_response(&q, &out).unwrap();
        assert!(info.truncated);
        assert_eq!(image_again, None);
    }

    #[test]
    fn render_of_a_foreign_image_is_servfail() {
        let upstream_q = query_bytes(1, "a.test", rtype::A, None);
        let resp = ResponseBuilder::new(&upstream_q)
            .answer("a.test", rtype::A, 300, &a([10, 0, 0, 1]))
            .build();
        let image = image_of(&upstream_q, &resp);
        let other = query_bytes(2, "b.test", rtype::A, None);
        let q = parse_query(&other).unwrap();
        let mut out = Vec::new();
        assert_eq!(render(&q, &image, 5, 512, &mut out), Rendered::Full);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::SERVFAIL));
        assert_eq!(counts(&out), [1, 0, 0, 0]);
    }

    #[test]
    fn rfc6891_render_error_badvers() {
        let client = query_bytes(
            3,
            "a.test",
            rtype::A,
            Some(Edns {
                version: 1,
                ..EDNS_DO
            }),
        );
        let q = parse_query(&client).unwrap();
        let mut out = Vec::new();
        render_error(&q, rcode::BADVERS, &mut out);
        assert_eq!(be16(&out, 0).unwrap(), 3);
        assert_eq!(flags(&out), 0x8000 | 0x0100 | 0x0080);
        assert_eq!(counts(&out), [1, 0, 0, 1]);
        assert_eq!(&out[12..12 + q.question.len()], q.question);
        let opt = &out[out.len() - OPT_RR_LEN..];
        assert_eq!(opt, [0, 0, 41, 0x04, 0xD0, 1, 0, 0x80, 0, 0, 0]);
        assert!(parse_response(&q, &out).is_ok());
    }

    #[test]
    fn rfc1035_render_error_plain() {
        let client = query_bytes(3, "a.test", rtype::A, None);
        let q = parse_query(&client).unwrap();
        let mut out = Vec::new();
        render_error(&q, u16::from(rcode::REFUSED), &mut out);
        assert_eq!(flags(&out), 0x8000 | 0x0100 | 0x0080 | 5);
        assert_eq!(counts(&out), [1, 0, 0, 0]);
        assert_eq!(out.len(), 12 + q.question.len());
        // BADVERS cannot be said without an OPT.
        render_error(&q, rcode::BADVERS, &mut out);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::SERVFAIL));

        let client = query_bytes(3, "a.test", rtype::A, Some(EDNS0));
        let q = parse_query(&client).unwrap();
        render_error(&q, u16::from(rcode::SERVFAIL), &mut out);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::SERVFAIL));
        assert_eq!(out[out.len() - 6], 0);
    }

    #[test]
    fn rfc6891_render_uncached_rebuilds_header_and_opt_for_the_client() {
        let upstream_q = query_bytes(0x7777, "gone.test", rtype::A, Some(EDNS_DO));
        let resp = ResponseBuilder::new(&upstream_q)
            .rcode(rcode::NXDOMAIN)
            .answer(
                "gone.test",
                rtype::CNAME,
                90,
                &ResponseBuilder::name_rdata("x.test"),
            )
            .opt(4096)
            .build();
        let mut client = query_bytes(5, "GoNe.TeSt", rtype::A, None);
        client[2] &= !0x01; // RD=0
        let q = parse_query(&client).unwrap();
        let mut out = Vec::new();
        assert_eq!(render_uncached(&q, &resp, 512, &mut out), Rendered::Full);
        assert_eq!(be16(&out, 0).unwrap(), 5);
        assert_eq!(flags(&out) & 0x0100, 0, "RD copied from the client");
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::NXDOMAIN));
        assert_eq!(
            counts(&out),
            [1, 1, 0, 0],
            "no OPT for a client without one"
        );
        assert_eq!(&out[12..12 + q.question.len()], q.question);
        let ttls: Vec<_> = records(&out).into_iter().map(|r| r.2).collect();
        assert_eq!(ttls, [90]);

        let client = query_bytes(6, "gone.test", rtype::A, Some(EDNS0));
        let q = parse_query(&client).unwrap();
        render_uncached(&q, &resp, 512, &mut out);
        assert_eq!(counts(&out), [1, 1, 0, 1]);
        let opt = &out[out.len() - OPT_RR_LEN..];
        assert_eq!(opt, [0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);

        // Another question, or a truncated response: SERVFAIL.
        let other = query_bytes(7, "other.test", rtype::A, None);
        let q = parse_query(&other).unwrap();
        render_uncached(&q, &resp, 512, &mut out);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::SERVFAIL));
        let truncated = ResponseBuilder::new(&upstream_q).truncated(true).build();
        let q = parse_query(&client).unwrap();
        render_uncached(&q, &truncated, 512, &mut out);
        assert_eq!(flags(&out) & 0xF, u16::from(rcode::SERVFAIL));
        assert_eq!(counts(&out), [1, 0, 0, 1]);
    }

    #[test]
    fn rfc1035_render_reject() {
        let mut out = Vec::new();
        let mut notify = query_bytes(0x1234, "a.test", rtype::SOA, None);
        notify[2] |= 4 << 3;
        assert!(render_reject(&notify, rcode::NOTIMP, &mut out));
        assert_eq!(out.len(), 12);
        assert_eq!(be16(&out, 0).unwrap(), 0x1234);
        assert_eq!(flags(&out), 0x8000 | (4 << 11) | 0x0100 | 0x0080 | 4);
        assert_eq!(counts(&out), [0, 0, 0, 0]);

        assert!(!render_reject(&notify[..11], rcode::FORMERR, &mut out));
        assert!(out.is_empty());
        let mut response = notify;
        response[2] |= 0x80;
        assert!(!render_reject(&response, rcode::FORMERR, &mut out));
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

    // ---- properties ----

    /// A scenario for the render round trip.
    #[derive(Debug, Clone)]
    enum Kind {
        A([u8; 4]),
        Aaaa([u8; 16]),
        Cname,
        Txt(Vec<u8>),
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(Kind::A),
            any::<[u8; 16]>().prop_map(Kind::Aaaa),
            Just(Kind::Cname),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Kind::Txt),
        ]
    }

    fn qname() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9-]{1,12}", 1..5).prop_map(|l| l.join(".") + ".")
    }

    fn edns() -> impl Strategy<Value = Option<Edns>> {
        proptest::option::of(
            (any::<u16>(), any::<bool>()).prop_map(|(udp_size, dnssec_ok)| Edns {
                udp_size,
                version: 0,
                dnssec_ok,
            }),
        )
    }

    /// Flips the case of the letters where `mask` has a bit set.
    fn recase(name: &str, mask: u64) -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    if c.is_ascii_lowercase() {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                } else {
                    c
                }
            })
            .collect()
    }

    fn build_scenario(
        name: &str,
        qtype: u16,
        upstream_edns: Option<Edns>,
        recs: &[(bool, u32, Kind)],
        compress: bool,
        nxdomain: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let upstream_q = query_bytes(0x5555, &name.to_ascii_lowercase(), qtype, upstream_edns);
        let mut builder = ResponseBuilder::new(&upstream_q).compress(compress);
        for (at_qname, ttl, kind) in recs {
            let owner = if *at_qname { name } else { "other.example." };
            builder = match kind {
                Kind::A(ip) => builder.answer(owner, rtype::A, *ttl, ip),
                Kind::Aaaa(ip) => builder.answer(owner, rtype::AAAA, *ttl, ip),
                Kind::Cname => builder.answer(
                    owner,
                    rtype::CNAME,
                    *ttl,
                    &ResponseBuilder::name_rdata("other.example."),
                ),
                Kind::Txt(data) => {
                    let mut rdata = vec![data.len() as u8];
                    rdata.extend_from_slice(data);
                    builder.additional(owner, rtype::TXT, *ttl, &rdata)
                }
            };
        }
        if nxdomain {
            builder = builder.rcode(rcode::NXDOMAIN).authority(
                "example.",
                rtype::SOA,
                300,
                &ResponseBuilder::soa_rdata("ns.example.", "h.example.", 60),
            );
        }
        if upstream_edns.is_some() {
            builder = builder.opt(1232);
        }
        (upstream_q, builder.build())
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

        #[test]
        fn render_round_trips(
            name in qname(),
            case_mask in any::<u64>(),
            qtype in prop_oneof![Just(rtype::A), Just(rtype::AAAA), Just(rtype::CNAME), Just(rtype::TXT)],
            upstream_edns in edns(),
            recs in proptest::collection::vec((any::<bool>(), 0u32..100_000, kind()), 0..12),
            compress in any::<bool>(),
            nxdomain in any::<bool>(),
            client_edns in edns(),
            ttl in any::<u32>(),
            limit in prop_oneof![Just(512usize), Just(1232), Just(MAX_MESSAGE), 0usize..2000],
        ) {
            let (upstream_q, resp) =
                build_scenario(&name, qtype, upstream_edns, &recs, compress, nxdomain);
            let uq = parse_query(&upstream_q).unwrap();
            let (info, image) = parse_response(&uq, &resp).unwrap();
            let image = image.unwrap();

            let client = query_bytes(0xA0A0, &recase(&name, case_mask), qtype, client_edns);
            let cq = parse_query(&client).unwrap();
            let mut out = Vec::new();
            let rendered = render(&cq, &image, ttl, limit, &mut out);
            let (again, _) = parse_response(&cq, &out).unwrap();
            prop_assert_eq!(&out[12..12 + cq.question.len()], cq.question);
            prop_assert_eq!(again.rcode, info.rcode);
            prop_assert_eq!(flags(&out) & 0x0400, 0x0400);
            let opt_count = u16::from(cq.edns.is_some());
            match rendered {
                Rendered::Full => {
                    prop_assert!(out.len() <= limit);
                    prop_assert!(!again.truncated);
                    prop_assert_eq!(again.answer_count, info.answer_count);
                    prop_assert_eq!(again.answers_question, info.answers_question);
                    let ttl = ttl.min(MAX_TTL);
                    let expect: Vec<_> = records(&resp)
                        .into_iter()
                        .filter(|r| r.1 != rtype::OPT)
                        .map(|mut r| { r.2 = ttl; r })
                        .collect();
                    let got: Vec<_> = records(&out).into_iter().filter(|r| r.1 != rtype::OPT).collect();
                    prop_assert_eq!(&got, &expect);
                    let mut image_counts = counts(image.bytes());
                    image_counts[3] += opt_count;
                    prop_assert_eq!(counts(&out), image_counts);
                }
                Rendered::Truncated => {
                    prop_assert!(again.truncated);
                    prop_assert_eq!(counts(&out), [1, 0, 0, opt_count]);
                }
            }
            if let Some(edns) = cq.edns {
                let opt = &out[out.len() - OPT_RR_LEN..];
                prop_assert_eq!(&opt[..5], &[0, 0, 41, 0x04, 0xD0]);
                prop_assert_eq!(opt[7] & 0x80 != 0, edns.dnssec_ok);
            }
        }
    }
}
