//! Fuzzes the DNS wire codec with arbitrary bytes, read both as a client query and as an
//! upstream response to the question they carry. Nothing panics, and what is accepted renders
//! replies that keep the codec's promises: the client's ID and exact question bytes, a full
//! reply within the size limit or a TC=1 reply with only the question and OPT, and replies
//! that parse back as responses to the query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_local_dns::wire::{
    parse_query, parse_response, rcode, render, render_error, render_reject, render_uncached,
    Query, Rendered, WireError, MAX_MESSAGE, OUR_UDP_SIZE,
};

/// A name is at most 255 octets in wire form (RFC 1035 §3.1).
const MAX_NAME: usize = 255;
const HEADER_LEN: usize = 12;
/// An OPT record without options.
const OPT_RR_LEN: usize = 11;

fuzz_target!(|data: &[u8]| {
    as_query(data);
    as_response(data);
});

/// `data` as a client query: parsed, or rejected with the reply a server sends.
fn as_query(data: &[u8]) {
    let mut out = Vec::new();
    match parse_query(data) {
        Ok(q) => {
            assert!(q.qname().len() <= MAX_NAME);
            assert_eq!(
                data.get(HEADER_LEN..HEADER_LEN + q.question.len()),
                Some(q.question)
            );
            assert!((512..=usize::from(OUR_UDP_SIZE)).contains(&q.udp_limit()));
            let _ = q.qname_text();
            for code in [rcode::BADVERS, u16::from(rcode::SERVFAIL)] {
                render_error(&q, code, &mut out);
                check_reply_header(&q, &out);
                assert!(parse_response(&q, &out).is_ok());
            }
        }
        Err(error) => {
            let code = if error == WireError::NotQuery {
                rcode::NOTIMP
            } else {
                rcode::FORMERR
            };
            if render_reject(data, code, &mut out) {
                assert_eq!(out.len(), HEADER_LEN);
                assert_eq!(out[..2], data[..2]);
                assert_eq!(out[2] & 0x80, 0x80, "QR");
                assert_eq!(out[3] & 0x0F, code);
                assert_eq!(out[4..], [0; 8]);
            } else {
                assert!(data.len() < HEADER_LEN || data[2] & 0x80 != 0);
                assert!(out.is_empty());
            }
        }
    }
}

/// `data` as an upstream response to the question it carries (if that is a plain one).
fn as_response(data: &[u8]) {
    let Some(question) = plain_question(data) else {
        return;
    };
    // Our upstream query: the response's ID, RD, the question.
    let upstream = message(
        u16::from_be_bytes([data[0], data[1]]),
        0x0100,
        question,
        None,
    );
    let Ok(upstream_q) = parse_query(&upstream) else {
        return;
    };
    // A client asking the same question: re-cased, flags and EDNS picked by the last byte.
    let knobs = data.last().copied().unwrap_or(0);
    let recased: Vec<u8> = question
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if i + 4 < question.len() && b.is_ascii_alphabetic() && (knobs >> (i % 8)) & 1 == 1 {
                b ^ 0x20
            } else {
                b
            }
        })
        .collect();
    let flags = if knobs & 1 == 1 { 0x0110 } else { 0x0020 }; // RD+CD or AD
    let edns = match knobs % 3 {
        0 => None,
        1 => Some((512u16, false)),
        _ => Some((4096, true)),
    };
    let client = message(0xC11E, flags, &recased, edns);
    let Ok(q) = parse_query(&client) else {
        return;
    };
    let limit = match knobs % 4 {
        0 => q.udp_limit(),
        1 => MAX_MESSAGE,
        2 => usize::from(OUR_UDP_SIZE),
        _ => usize::from(knobs) * 4,
    };
    let ttl = u32::from_be_bytes([knobs, knobs, 0, knobs]);
    let mut out = Vec::new();
    if let Ok((info, image)) = parse_response(&upstream_q, data) {
        assert_eq!(info.id, upstream_q.id);
        if let Some(image) = image {
            assert!(image.bytes().len() <= data.len());
            assert_eq!(image.question_len(), question.len());
            let offsets = image.ttl_offsets();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]));
            assert!(offsets
                .iter()
                .all(|&at| usize::from(at) + 4 <= image.bytes().len()));
            let rendered = render(&q, &image, ttl, limit, &mut out);
            check_rendered(&q, &out, rendered, limit);
        }
    }
    let rendered = render_uncached(&q, data, limit, &mut out);
    check_rendered(&q, &out, rendered, limit);
}

/// What every reply to `q` shares.
fn check_reply_header(q: &Query<'_>, out: &[u8]) {
    assert!(out.len() >= HEADER_LEN + q.question.len());
    assert_eq!(out[..2], q.id.to_be_bytes());
    assert_eq!(out[2] & 0x80, 0x80, "QR");
    assert_eq!(out[2] & 0x01 == 1, q.recursion_desired, "RD copied");
    assert_eq!(out[3] & 0x10 != 0, q.checking_disabled, "CD copied");
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + q.question.len()], q.question);
}

fn check_rendered(q: &Query<'_>, out: &[u8], rendered: Rendered, limit: usize) {
    check_reply_header(q, out);
    let opt = usize::from(q.edns.is_some());
    match rendered {
        Rendered::Full => {
            assert!(out.len() <= limit.max(HEADER_LEN + q.question.len() + OPT_RR_LEN * opt));
            assert_eq!(out[2] & 0x02, 0, "TC");
        }
        Rendered::Truncated => {
            assert_eq!(out[2] & 0x02, 0x02, "TC");
            assert_eq!(out.len(), HEADER_LEN + q.question.len() + OPT_RR_LEN * opt);
            assert_eq!(out[4..12], [0, 1, 0, 0, 0, 0, 0, opt as u8]);
        }
    }
    let parsed = parse_response(q, out);
    assert!(parsed.is_ok(), "{parsed:?}");
    if let Some(edns) = q.edns {
        let tail = &out[out.len() - OPT_RR_LEN..];
        assert_eq!(
            tail[..5],
            [0, 0, 41, (OUR_UDP_SIZE >> 8) as u8, OUR_UDP_SIZE as u8]
        );
        assert_eq!(tail[7] & 0x80 != 0, edns.dnssec_ok, "DO echoed");
        assert_eq!(tail[9..], [0, 0], "no options");
    }
}

/// The question at offset 12 of `data` if its name is plain labels (no compression), within
/// 255 octets: qname, qtype, qclass.
fn plain_question(data: &[u8]) -> Option<&[u8]> {
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*data.get(pos)?);
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos - HEADER_LEN > MAX_NAME {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    data.get(HEADER_LEN..pos + 4)
}

/// A one-question message: header, `question`, and an OPT (UDP size, DO) if given.
fn message(id: u16, flags: u16, question: &[u8], edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + question.len() + OPT_RR_LEN);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    m.extend_from_slice(question);
    if let Some((udp_size, dnssec_ok)) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&udp_size.to_be_bytes());
        m.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}
