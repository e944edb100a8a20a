//! Protocol Buffers' wire format (protobuf.dev, "Encoding"): the pieces the hand-written
//! encoders share (konnectivity's `Packet`, log-shipper's push requests): varints, field keys,
//! length-delimited fields and strings, and the varint sizes needed to write a nested
//! message's length before the message.

use bytes::BufMut;

/// Wire types, the low three bits of a field's key.
pub const VARINT: u8 = 0;
pub const I64: u8 = 1;
pub const LEN: u8 = 2;
pub const I32: u8 = 5;

/// A field's key: its number and wire type.
pub fn put_key(out: &mut impl BufMut, number: u32, wire: u8) {
    put_varint(out, u64::from(number) << 3 | u64::from(wire));
}

/// A base-128 varint, least significant group first.
pub fn put_varint(out: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8(value as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// The key and length of a length-delimited field (a string, bytes or a nested message)
/// whose `len` bytes the caller writes next.
pub fn put_len_key(out: &mut impl BufMut, number: u32, len: usize) {
    put_key(out, number, LEN);
    put_varint(out, len as u64);
}

/// A string field; nothing for the empty string (proto3's default is not written).
pub fn put_string(out: &mut impl BufMut, number: u32, value: &str) {
    if !value.is_empty() {
        put_len_key(out, number, value.len());
        out.put_slice(value.as_bytes());
    }
}

/// The bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: u64) -> usize {
    (64 - value.max(1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        for (value, bytes) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes, "{value}");
        }
        let mut out = Vec::new();
        put_key(&mut out, 2, LEN);
        assert_eq!(out, [0x12]);
    }

    proptest! {
        #[test]
        fn varint_len_matches_encoding(v in any::<u64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            prop_assert_eq!(out.len(), varint_len(v));
        }
    }
}
