//! Test support (feature `test-support`): [`ResponseBuilder`] makes the upstream responses that
//! the unit and integration tests, the benchmarks and the demo's fake upstream answer with.

use super::name::encode_name;
use super::query::parse_query;
use super::render::{push_header, reply_flags};
use super::{
    be16, rcode, rtype, CLASS_IN, FLAG_AD, FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD, FLAG_TC,
    SECTION_ADDITIONAL, SECTION_ANSWER, SECTION_AUTHORITY,
};

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
