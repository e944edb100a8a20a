//! Replies: [`render`] patches a wire image for one client (ID, flags, its exact question
//! bytes, TTLs, a fresh OPT, truncation), [`render_uncached`] does the same from a response
//! the cache did not keep, and [`render_error`] / [`render_reject`] write the header-only
//! answers the proxy makes itself.

use super::image::{parse_response, WireImage};
use super::name::same_question;
use super::query::Query;
use super::{
    be16, put16, rcode, rtype, FLAG_AA, FLAG_AD, FLAG_CD, FLAG_OPCODE, FLAG_QR, FLAG_RA,
    FLAG_RCODE, FLAG_RD, FLAG_TC, HEADER_LEN, MAX_TTL, OPT_RR_LEN, OUR_UDP_SIZE,
};

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

/// Renders a header-only reply with `rcode` to a packet that
/// [`parse_query`](crate::wire::parse_query) rejected, so a client gets FORMERR (malformed) or
/// NOTIMP (other opcode) instead of a timeout: ID, OPCODE, RD and CD echoed, QR=1, RA=1, all
/// counts 0. Returns false and leaves `out` empty when nothing should be sent: the packet has
/// no complete header or is itself a response (QR=1; answering those invites loops).
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
pub(super) fn reply_flags(query: &Query<'_>) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA;
    if query.recursion_desired {
        flags |= FLAG_RD;
    }
    if query.checking_disabled {
        flags |= FLAG_CD;
    }
    flags
}

pub(super) fn push_header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for count in counts {
        out.extend_from_slice(&count.to_be_bytes());
    }
}

/// Appends our OPT record if the query had EDNS: UDP size OUR_UDP_SIZE, version 0, DO
/// mirrored (RFC 3225), no options.
pub(super) fn push_opt(query: &Query<'_>, extended_rcode: u8, out: &mut Vec<u8>) {
    let Some(edns) = query.edns else {
        return;
    };
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_SIZE.to_be_bytes());
    let do_bit = if edns.dnssec_ok { 0x80 } else { 0 };
    out.extend_from_slice(&[extended_rcode, 0, do_bit, 0, 0, 0]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::test_util::*;
    use crate::wire::testing::ResponseBuilder;
    use crate::wire::*;
    use proptest::prelude::*;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

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
