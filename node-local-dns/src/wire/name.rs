//! Domain names in wire form: the bounded walk over (possibly compressed) names that parsing
//! shares, question comparison ignoring ASCII case, and [`encode_name`].

use super::{WireError, HEADER_LEN, MAX_NAME};

/// Bound on compression pointers followed for one name (a name has at most 127 labels).
const MAX_POINTER_HOPS: usize = 128;

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

/// A decoded name: wire form, lower-cased, pointers followed.
pub(super) struct NameBuf {
    buf: [u8; MAX_NAME],
    len: usize,
}

impl NameBuf {
    pub(super) fn new() -> Self {
        Self {
            buf: [0; MAX_NAME],
            len: 0,
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Appends lower-cased bytes; anything past MAX_NAME is dropped (callers check lengths).
    pub(super) fn push_lower(&mut self, bytes: &[u8]) {
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
pub(super) fn same_question(a: &[u8], b: &[u8]) -> bool {
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
pub(super) fn skip_plain_name(packet: &[u8], start: usize) -> Result<usize, WireError> {
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
pub(super) fn read_name(
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
