//! The `Packet` message of apiserver-network-proxy (`konnectivity-client/proto/client/
//! client.proto`, no proto package), encoded and decoded by hand from the protobuf wire format
//! (<https://protobuf.dev/programming-guides/encoding/>).
//!
//! ```text
//! Packet      { PacketType type = 1; oneof payload { DialRequest dialRequest = 2;
//!               DialResponse dialResponse = 3; Data data = 4; CloseRequest closeRequest = 5;
//!               CloseResponse closeResponse = 6; CloseDial closeDial = 7; Drain drain = 8; } }
//! DialRequest { string protocol = 1; string address = 2; int64 random = 3; }
//! DialResponse{ string error = 1; int64 connectID = 2; int64 random = 3; }
//! Data        { int64 connectID = 1; string error = 2; bytes data = 3; }
//! CloseRequest{ int64 connectID = 1; }   CloseResponse { string error = 1; int64 connectID = 2; }
//! CloseDial   { int64 random = 1; }      Drain {}
//! ```
//!
//! Like the Go code, the packet's meaning comes from `type` (unset is `DIAL_REQ`, the enum's
//! zero) and a payload of another kind reads as an empty one. Unknown fields are skipped and
//! unknown types decode as [`Packet::Unknown`], which every receiver ignores: that is how
//! upstream peers stay compatible with newer packets, and how this project's two extensions
//! ([`Packet::Window`], [`Packet::HalfClose`], sent only to a peer that announced them) ride
//! on the same stream.

use agentkit::protobuf::{put_key, put_varint, varint_len, I32, I64, LEN, VARINT};
use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// `PacketType` values of the upstream enum, and this project's extensions.
pub mod kind {
    pub const DIAL_REQ: i32 = 0;
    pub const DIAL_RSP: i32 = 1;
    pub const CLOSE_REQ: i32 = 2;
    pub const CLOSE_RSP: i32 = 3;
    pub const DATA: i32 = 4;
    pub const DIAL_CLS: i32 = 5;
    pub const DRAIN: i32 = 6;
    /// Extension: the receiver of a tunnel's DATA grants the sender more bytes.
    pub const WINDOW: i32 = 64;
    /// Extension: the sender will send no more DATA on this tunnel (TCP FIN), but reads on.
    pub const HALF_CLOSE: i32 = 65;
}

/// Field numbers of the payload oneof in `Packet` (the extensions use their type's number).
mod field {
    pub const TYPE: u32 = 1;
    pub const DIAL_REQUEST: u32 = 2;
    pub const DIAL_RESPONSE: u32 = 3;
    pub const DATA: u32 = 4;
    pub const CLOSE_REQUEST: u32 = 5;
    pub const CLOSE_RESPONSE: u32 = 6;
    pub const CLOSE_DIAL: u32 = 7;
    pub const DRAIN: u32 = 8;
    pub const WINDOW: u32 = 64;
    pub const HALF_CLOSE: u32 = 65;
}

/// One packet on an `AgentService/Connect` or `ProxyService/Proxy` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Open a tunnel to `address` (`host:port`); `random` names the pending dial.
    DialRequest {
        protocol: String,
        address: String,
        random: i64,
    },
    /// The dial's outcome: a `connect_id` (assigned by the agent), or an `error`.
    DialResponse {
        error: String,
        connect_id: i64,
        random: i64,
    },
    /// Close the tunnel (client or server to agent).
    CloseRequest { connect_id: i64 },
    /// The tunnel is closed (agent to server; unsolicited when the destination ended it).
    CloseResponse { error: String, connect_id: i64 },
    /// Tunnel payload.
    Data {
        connect_id: i64,
        error: String,
        data: Bytes,
    },
    /// Cancel the pending dial `random`.
    DialClose { random: i64 },
    /// The agent is going away: prefer other agents for new dials.
    Drain,
    /// Extension: `bytes` more of `connect_id`'s DATA may be sent.
    Window { connect_id: i64, bytes: u32 },
    /// Extension: no more DATA from the sender on `connect_id`.
    HalfClose { connect_id: i64 },
    /// A type this code does not know (a newer peer's); ignored.
    Unknown { kind: i32 },
}

/// Why bytes are not a `Packet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("varint longer than 10 bytes")]
    VarintTooLong,
    #[error("wire type {wire} is invalid for field {field}")]
    WireType { field: u32, wire: u8 },
    #[error("field number 0")]
    FieldZero,
    #[error("a string field is not UTF-8")]
    Utf8,
}

impl Packet {
    /// The `PacketType` value.
    pub fn kind(&self) -> i32 {
        match self {
            Packet::DialRequest { .. } => kind::DIAL_REQ,
            Packet::DialResponse { .. } => kind::DIAL_RSP,
            Packet::CloseRequest { .. } => kind::CLOSE_REQ,
            Packet::CloseResponse { .. } => kind::CLOSE_RSP,
            Packet::Data { .. } => kind::DATA,
            Packet::DialClose { .. } => kind::DIAL_CLS,
            Packet::Drain => kind::DRAIN,
            Packet::Window { .. } => kind::WINDOW,
            Packet::HalfClose { .. } => kind::HALF_CLOSE,
            Packet::Unknown { kind } => *kind,
        }
    }

    /// The bounded metric label of a packet type (upstream's `packet_type` values).
    pub fn kind_label(&self) -> &'static str {
        match self {
            Packet::DialRequest { .. } => "DIAL_REQ",
            Packet::DialResponse { .. } => "DIAL_RSP",
            Packet::CloseRequest { .. } => "CLOSE_REQ",
            Packet::CloseResponse { .. } => "CLOSE_RSP",
            Packet::Data { .. } => "DATA",
            Packet::DialClose { .. } => "DIAL_CLS",
            Packet::Drain => "DRAIN",
            Packet::Window { .. } => "WINDOW",
            Packet::HalfClose { .. } => "HALF_CLOSE",
            Packet::Unknown { .. } => "UNKNOWN",
        }
    }

    /// Appends the protobuf encoding to `out` (proto3: default values are left out, the
    /// oneof member always written, as Go's marshaller does).
    pub fn encode(&self, out: &mut BytesMut) {
        let kind = self.kind();
        if kind != 0 {
            put_key(out, field::TYPE, VARINT);
            put_varint(out, kind as i64 as u64);
        }
        let mut body = Message::default();
        let number = match self {
            Packet::DialRequest {
                protocol,
                address,
                random,
            } => {
                body.string(1, protocol).string(2, address).int(3, *random);
                field::DIAL_REQUEST
            }
            Packet::DialResponse {
                error,
                connect_id,
                random,
            } => {
                body.string(1, error).int(2, *connect_id).int(3, *random);
                field::DIAL_RESPONSE
            }
            Packet::Data {
                connect_id,
                error,
                data,
            } => {
                body.int(1, *connect_id).string(2, error);
                // The payload is copied once, straight into the frame.
                let head = body.len()
                    + if data.is_empty() {
                        0
                    } else {
                        1 + varint_len(data.len() as u64)
                    };
                put_key(out, field::DATA, LEN);
                put_varint(out, (head + data.len()) as u64);
                out.extend_from_slice(&body.buf);
                if !data.is_empty() {
                    put_key(out, 3, LEN);
                    put_varint(out, data.len() as u64);
                    out.extend_from_slice(data);
                }
                return;
            }
            Packet::CloseRequest { connect_id } => {
                body.int(1, *connect_id);
                field::CLOSE_REQUEST
            }
            Packet::CloseResponse { error, connect_id } => {
                body.string(1, error).int(2, *connect_id);
                field::CLOSE_RESPONSE
            }
            Packet::DialClose { random } => {
                body.int(1, *random);
                field::CLOSE_DIAL
            }
            Packet::Drain => field::DRAIN,
            Packet::Window { connect_id, bytes } => {
                body.int(1, *connect_id).int(2, i64::from(*bytes));
                field::WINDOW
            }
            Packet::HalfClose { connect_id } => {
                body.int(1, *connect_id);
                field::HALF_CLOSE
            }
            Packet::Unknown { .. } => return,
        };
        put_key(out, number, LEN);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(&body.buf);
    }

    /// The encoding as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        self.encode(&mut out);
        out.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        match self {
            Packet::Data { data, error, .. } => data.len() + error.len() + 32,
            Packet::DialRequest { address, .. } => address.len() + 40,
            _ => 48,
        }
    }

    /// Decodes one packet; `DATA`'s payload is a slice of `bytes` (no copy).
    pub fn decode(bytes: &Bytes) -> Result<Packet, DecodeError> {
        let mut kind: i64 = 0;
        // The last occurrence of each oneof member wins, as in every protobuf decoder.
        let mut payloads: [Option<Bytes>; 10] = Default::default();
        let mut reader = Reader::new(bytes.clone());
        while let Some((number, wire)) = reader.key()? {
            match (number, wire) {
                (field::TYPE, VARINT) => kind = reader.varint()? as i64,
                (field::TYPE, _) => {
                    return Err(DecodeError::WireType {
                        field: number,
                        wire,
                    })
                }
                (2..=8, LEN) => payloads[number as usize] = Some(reader.bytes()?),
                (field::WINDOW, LEN) => payloads[0] = Some(reader.bytes()?),
                (field::HALF_CLOSE, LEN) => payloads[9] = Some(reader.bytes()?),
                (2..=8 | field::WINDOW | field::HALF_CLOSE, _) => {
                    return Err(DecodeError::WireType {
                        field: number,
                        wire,
                    })
                }
                _ => reader.skip(number, wire)?,
            }
        }
        // An enum value outside int32 is truncated as Go does; no known type is affected.
        let kind = kind as i32;
        let body = |i: usize| Fields::parse(payloads[i].clone().unwrap_or_default());
        Ok(match kind {
            kind::DIAL_REQ => {
                let f = body(field::DIAL_REQUEST as usize)?;
                Packet::DialRequest {
                    protocol: f.string(1)?,
                    address: f.string(2)?,
                    random: f.int(3),
                }
            }
            kind::DIAL_RSP => {
                let f = body(field::DIAL_RESPONSE as usize)?;
                Packet::DialResponse {
                    error: f.string(1)?,
                    connect_id: f.int(2),
                    random: f.int(3),
                }
            }
            kind::CLOSE_REQ => Packet::CloseRequest {
                connect_id: body(field::CLOSE_REQUEST as usize)?.int(1),
            },
            kind::CLOSE_RSP => {
                let f = body(field::CLOSE_RESPONSE as usize)?;
                Packet::CloseResponse {
                    error: f.string(1)?,
                    connect_id: f.int(2),
                }
            }
            kind::DATA => {
                let f = body(field::DATA as usize)?;
                Packet::Data {
                    connect_id: f.int(1),
                    error: f.string(2)?,
                    data: f.bytes(3),
                }
            }
            kind::DIAL_CLS => Packet::DialClose {
                random: body(field::CLOSE_DIAL as usize)?.int(1),
            },
            kind::DRAIN => Packet::Drain,
            kind::WINDOW => {
                let f = body(0)?;
                Packet::Window {
                    connect_id: f.int(1),
                    bytes: u32::try_from(f.int(2)).unwrap_or(0),
                }
            }
            kind::HALF_CLOSE => Packet::HalfClose {
                connect_id: body(9)?.int(1),
            },
            kind => Packet::Unknown { kind },
        })
    }
}

/// A submessage being encoded.
#[derive(Default)]
struct Message {
    buf: BytesMut,
}

impl Message {
    fn string(&mut self, number: u32, value: &str) -> &mut Self {
        if !value.is_empty() {
            put_key(&mut self.buf, number, LEN);
            put_varint(&mut self.buf, value.len() as u64);
            self.buf.extend_from_slice(value.as_bytes());
        }
        self
    }

    fn int(&mut self, number: u32, value: i64) -> &mut Self {
        if value != 0 {
            put_key(&mut self.buf, number, VARINT);
            // int64 is a plain varint of the two's complement (10 bytes when negative).
            put_varint(&mut self.buf, value as u64);
        }
        self
    }

    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// The scalar fields of a submessage: the last value of each wins.
#[derive(Default)]
struct Fields {
    ints: [i64; 4],
    lens: [Option<Bytes>; 4],
}

impl Fields {
    fn parse(bytes: Bytes) -> Result<Fields, DecodeError> {
        let mut fields = Fields::default();
        let mut reader = Reader::new(bytes);
        while let Some((number, wire)) = reader.key()? {
            let slot = number as usize;
            match wire {
                VARINT if slot < 4 => fields.ints[slot] = reader.varint()? as i64,
                LEN if slot < 4 => fields.lens[slot] = Some(reader.bytes()?),
                _ => reader.skip(number, wire)?,
            }
        }
        Ok(fields)
    }

    fn int(&self, number: usize) -> i64 {
        self.ints[number]
    }

    fn bytes(&self, number: usize) -> Bytes {
        self.lens[number].clone().unwrap_or_default()
    }

    fn string(&self, number: usize) -> Result<String, DecodeError> {
        match &self.lens[number] {
            None => Ok(String::new()),
            Some(b) => std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| DecodeError::Utf8),
        }
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    fn key(&mut self) -> Result<Option<(u32, u8)>, DecodeError> {
        if !self.buf.has_remaining() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| DecodeError::FieldZero)?;
        if number == 0 {
            return Err(DecodeError::FieldZero);
        }
        Ok(Some((number, (key & 7) as u8)))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10 {
            if !self.buf.has_remaining() {
                return Err(DecodeError::Truncated("varint"));
            }
            let b = self.buf.get_u8();
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.varint()?;
        if len > self.buf.remaining() as u64 {
            return Err(DecodeError::Truncated("length-delimited field"));
        }
        Ok(self.buf.split_to(len as usize))
    }

    fn skip(&mut self, number: u32, wire: u8) -> Result<(), DecodeError> {
        let n = match wire {
            VARINT => return self.varint().map(drop),
            LEN => return self.bytes().map(drop),
            I64 => 8,
            I32 => 4,
            _ => {
                return Err(DecodeError::WireType {
                    field: number,
                    wire,
                })
            }
        };
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated("fixed-width field"));
        }
        self.buf.advance(n);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<_>>()
            .into()
    }

    /// Bytes as Go's proto.Marshal writes them (worked out from the encoding spec: type is
    /// omitted when 0, defaults are omitted, the oneof member is always written).
    #[test]
    fn known_encodings() {
        let dial = Packet::DialRequest {
            protocol: "tcp".into(),
            address: "10.0.0.1:10250".into(),
            random: 300,
        };
        // 12 len: 0a 03 "tcp" 12 0e "10.0.0.1:10250" 18 ac 02
        assert_eq!(
            dial.to_bytes(),
            hex("12 18 0a03 746370 120e 31302e302e302e313a3130323530 18 ac02")
        );
        assert_eq!(
            Packet::Data {
                connect_id: 1,
                error: String::new(),
                data: Bytes::from_static(b"hi")
            }
            .to_bytes(),
            hex("0804 2206 0801 1a02 6869")
        );
        assert_eq!(Packet::Drain.to_bytes(), hex("0806 4200"));
        assert_eq!(
            Packet::CloseRequest { connect_id: -1 }.to_bytes(),
            hex("0802 2a0b 08 ffffffffffffffffff01")
        );
    }

    #[test]
    fn unset_type_is_a_dial_request_and_foreign_payload_reads_empty() {
        assert_eq!(
            Packet::decode(&Bytes::new()).unwrap(),
            Packet::DialRequest {
                protocol: String::new(),
                address: String::new(),
                random: 0
            }
        );
        // type DATA with a CloseRequest payload: DATA with defaults, as Go's GetData() gives.
        let p = Packet::decode(&hex("0804 2a02 0807")).unwrap();
        assert_eq!(
            p,
            Packet::Data {
                connect_id: 0,
                error: String::new(),
                data: Bytes::new()
            }
        );
    }

    #[test]
    fn unknown_types_and_fields_are_skipped() {
        // type 99, an unknown fixed64 field 20, an unknown fixed32 field 21, an unknown varint 22.
        let p = Packet::decode(&hex("0863 a101 0102030405060708 ad01 01020304 b00101")).unwrap();
        assert_eq!(p, Packet::Unknown { kind: 99 });
    }

    #[test]
    fn malformed_input_is_an_error() {
        for (bytes, want) in [
            ("08", DecodeError::Truncated("varint")),
            ("22 05 08", DecodeError::Truncated("length-delimited field")),
            ("0b", DecodeError::WireType { field: 1, wire: 3 }),
            ("20 01", DecodeError::WireType { field: 4, wire: 0 }),
            ("00", DecodeError::FieldZero),
            ("08 ffffffffffffffffffff01", DecodeError::VarintTooLong),
            ("0804 2203 1201 ff", DecodeError::Utf8),
        ] {
            assert_eq!(Packet::decode(&hex(bytes)), Err(want), "{bytes}");
        }
    }

    fn any_string() -> impl Strategy<Value = String> {
        "[a-z0-9.:\\[\\]-]{0,40}"
    }

    fn any_packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            (any_string(), any_string(), any::<i64>()).prop_map(|(protocol, address, random)| {
                Packet::DialRequest {
                    protocol,
                    address,
                    random,
                }
            }),
            (any_string(), any::<i64>(), any::<i64>()).prop_map(|(error, connect_id, random)| {
                Packet::DialResponse {
                    error,
                    connect_id,
                    random,
                }
            }),
            any::<i64>().prop_map(|connect_id| Packet::CloseRequest { connect_id }),
            (any_string(), any::<i64>())
                .prop_map(|(error, connect_id)| Packet::CloseResponse { error, connect_id }),
            (
                any::<i64>(),
                any_string(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(connect_id, error, data)| Packet::Data {
                    connect_id,
                    error,
                    data: data.into()
                }),
            any::<i64>().prop_map(|random| Packet::DialClose { random }),
            Just(Packet::Drain),
            (any::<i64>(), any::<u32>())
                .prop_map(|(connect_id, bytes)| Packet::Window { connect_id, bytes }),
            any::<i64>().prop_map(|connect_id| Packet::HalfClose { connect_id }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(packet in any_packet()) {
            let bytes = packet.to_bytes();
            prop_assert_eq!(Packet::decode(&bytes).unwrap(), packet);
        }

        /// Whatever the bytes, decoding returns (never panics), and what decodes re-encodes to
        /// something that decodes to the same packet.
        #[test]
        fn decode_never_panics_and_is_stable(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(packet) = Packet::decode(&Bytes::from(bytes)) {
                if !matches!(packet, Packet::Unknown { .. }) {
                    prop_assert_eq!(Packet::decode(&packet.to_bytes()).unwrap(), packet);
                }
            }
        }
    }
}
