//! The structs shared with the C programs have the same layout on both sides: sizes and
//! member offsets read from the compiled object's BTF (what the C compiler laid out) against
//! `size_of`/`offset_of!` of the Rust definitions. Needs no privileges.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    mem::{offset_of, size_of},
};

use ebpf::dns::{DnsEntry, DnsKey, DnsLocal};
use object::{Object, ObjectSection};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// A struct as BTF describes it: size and member byte offsets by name.
#[derive(Debug)]
struct BtfStruct {
    size: usize,
    members: HashMap<String, usize>,
}

/// The structs of a `.BTF` section (format: Documentation/bpf/btf.rst, "Type encoding").
fn btf_structs(btf: &[u8]) -> HashMap<String, BtfStruct> {
    let u16_at = |at: usize| u16::from_le_bytes(btf[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(btf[at..at + 4].try_into().unwrap());
    assert_eq!(u16_at(0), BTF_MAGIC, "not little-endian BTF");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let strings = hdr_len + str_off;
    let name = |off: u32| {
        let start = strings + off as usize;
        let end = start + btf[start..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&btf[start..end]).into_owned()
    };
    let mut structs = HashMap::new();
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    while at < end {
        let (name_off, info, size) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
            3 => 12,              // ARRAY
            4 | 5 => 12 * vlen,   // STRUCT, UNION
            6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen, // DATASEC, ENUM64
            _ => 0,               // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == KIND_STRUCT && name_off != 0 {
            let members = (0..vlen)
                .map(|i| {
                    let m = at + 12 * i;
                    let offset = u32_at(m + 8);
                    let bits = if kind_flag == 1 {
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    (name(u32_at(m)), bits as usize / 8)
                })
                .collect();
            structs.insert(
                name(name_off),
                BtfStruct {
                    size: size as usize,
                    members,
                },
            );
        }
        at += extra;
    }
    structs
}

fn object_structs() -> HashMap<String, BtfStruct> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/obj/dns.bpf.o");
    let bytes = std::fs::read(path).expect("read ebpf/obj/dns.bpf.o");
    let file = object::File::parse(&*bytes).expect("parse the object");
    let btf = file.section_by_name(".BTF").expect("the object has BTF");
    btf_structs(btf.data().expect("BTF data"))
}

fn assert_layout(
    structs: &HashMap<String, BtfStruct>,
    name: &str,
    size: usize,
    members: &[(&str, usize)],
) {
    let c = structs
        .get(name)
        .unwrap_or_else(|| panic!("struct {name} is not in the object's BTF"));
    assert_eq!(
        c.size, size,
        "size of struct {name}: C {} vs Rust {size}",
        c.size
    );
    assert_eq!(
        c.members.len(),
        members.len(),
        "members of struct {name}: C {:?}",
        c.members
    );
    for &(member, offset) in members {
        let c_offset = c
            .members
            .get(member)
            .unwrap_or_else(|| panic!("{name}.{member} is not in C"));
        assert_eq!(
            *c_offset, offset,
            "offset of {name}.{member}: C {c_offset} vs Rust {offset}"
        );
    }
}

#[test]
fn dns_key_matches_c() {
    assert_layout(
        &object_structs(),
        "dns_key",
        size_of::<DnsKey>(),
        &[
            ("name", offset_of!(DnsKey, name)),
            ("qtype", offset_of!(DnsKey, qtype)),
            ("qclass", offset_of!(DnsKey, qclass)),
            ("flags", offset_of!(DnsKey, flags)),
            ("pad", offset_of!(DnsKey, pad)),
        ],
    );
}

#[test]
fn dns_entry_matches_c() {
    assert_layout(
        &object_structs(),
        "dns_entry",
        size_of::<DnsEntry>(),
        &[
            ("expires_ns", offset_of!(DnsEntry, expires_ns)),
            ("flags", offset_of!(DnsEntry, flags)),
            ("counts", offset_of!(DnsEntry, counts)),
            ("question_len", offset_of!(DnsEntry, question_len)),
            ("body_len", offset_of!(DnsEntry, body_len)),
            ("ttl_count", offset_of!(DnsEntry, ttl_count)),
            ("zone", offset_of!(DnsEntry, zone)),
            ("denial", offset_of!(DnsEntry, denial)),
            ("ttl_offsets", offset_of!(DnsEntry, ttl_offsets)),
            ("body", offset_of!(DnsEntry, body)),
        ],
    );
}

#[test]
fn dns_local_matches_c() {
    assert_layout(
        &object_structs(),
        "dns_local",
        size_of::<DnsLocal>(),
        &[
            ("addr", offset_of!(DnsLocal, addr)),
            ("port", offset_of!(DnsLocal, port)),
            ("family", offset_of!(DnsLocal, family)),
            ("pad", offset_of!(DnsLocal, pad)),
        ],
    );
}

/// The parser itself finds what it should: a struct the program uses internally has the
/// members the C source declares (guards against a parser that returns nothing).
#[test]
fn btf_parser_sees_internal_structs() {
    let structs = object_structs();
    let query = structs.get("query").expect("struct query in BTF");
    assert!(query.members.contains_key("question_len"), "{query:?}");
    assert!(structs.len() >= 5, "only {} structs found", structs.len());
}
