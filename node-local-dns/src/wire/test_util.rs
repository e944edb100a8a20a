//! Helpers the unit tests of the wire layers share: query bytes, record and header readers,
//! and the proptest strategies for the render round trip.

use proptest::prelude::*;

use super::name::{read_name, skip_plain_name, NameBuf};
use super::testing::ResponseBuilder;
use super::{be16, be32, build_query, rcode, rtype, Edns, HEADER_LEN};

pub(super) const EDNS0: Edns = Edns {
    udp_size: 1232,
    version: 0,
    dnssec_ok: false,
};
pub(super) const EDNS_DO: Edns = Edns {
    udp_size: 1232,
    version: 0,
    dnssec_ok: true,
};

pub(super) fn query_bytes(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
    let mut out = Vec::new();
    build_query(id, name, qtype, edns, &mut out);
    out
}

pub(super) fn a(ip: [u8; 4]) -> Vec<u8> {
    ip.to_vec()
}

/// Every record after the question: (lower-cased owner, type, ttl, rdata), OPT included.
pub(super) fn records(p: &[u8]) -> Vec<(Vec<u8>, u16, u32, Vec<u8>)> {
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
pub(super) fn raw_name(p: &[u8], mut at: usize) -> Vec<u8> {
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

pub(super) fn flags(p: &[u8]) -> u16 {
    be16(p, 2).unwrap()
}

pub(super) fn counts(p: &[u8]) -> [u16; 4] {
    [4, 6, 8, 10].map(|at| be16(p, at).unwrap())
}

/// A scenario for the render round trip.
#[derive(Debug, Clone)]
pub(super) enum Kind {
    A([u8; 4]),
    Aaaa([u8; 16]),
    Cname,
    Txt(Vec<u8>),
}

pub(super) fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(Kind::A),
        any::<[u8; 16]>().prop_map(Kind::Aaaa),
        Just(Kind::Cname),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Kind::Txt),
    ]
}

pub(super) fn qname() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-zA-Z0-9-]{1,12}", 1..5).prop_map(|l| l.join(".") + ".")
}

pub(super) fn edns() -> impl Strategy<Value = Option<Edns>> {
    proptest::option::of(
        (any::<u16>(), any::<bool>()).prop_map(|(udp_size, dnssec_ok)| Edns {
            udp_size,
            version: 0,
            dnssec_ok,
        }),
    )
}

/// Flips the case of the letters where `mask` has a bit set.
pub(super) fn recase(name: &str, mask: u64) -> String {
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

pub(super) fn build_scenario(
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
