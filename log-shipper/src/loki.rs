//! The body of a Loki push request (`POST /loki/api/v1/push`, and Vali's
//! `/vali/api/v1/push`): the `logproto.PushRequest` protobuf of grafana/loki's
//! `pkg/push/push.proto`, encoded by hand (four small messages do not justify protoc and a
//! prost pin), then compressed with raw (block, not framed) Snappy, as Loki decodes it.
//!
//! ```text
//! PushRequest   { repeated StreamAdapter streams = 1; }
//! StreamAdapter { string labels = 1; repeated EntryAdapter entries = 2; }
//! EntryAdapter  { google.protobuf.Timestamp timestamp = 1; string line = 2; }
//! Timestamp     { int64 seconds = 1; int32 nanos = 2; }
//! ```
//!
//! The fields this client never sets (`PushRequest.format`, `StreamAdapter.hash`, structured
//! metadata) are left out. A stream's `labels` is a selector string, `{name="value", ...}`;
//! [`format_labels`] writes it. Nothing here does IO.

use agentkit::protobuf::{put_key, put_len_key, put_string, put_varint, varint_len, VARINT};
use thiserror::Error;

/// The request's `Content-Type`.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// The header naming the tenant when Loki runs multi-tenant.
pub const TENANT_HEADER: &str = "X-Scope-OrgID";

/// Field numbers (grafana/loki `pkg/push/push.proto`, `google/protobuf/timestamp.proto`).
mod field {
    pub const PUSH_REQUEST_STREAMS: u32 = 1;
    pub const STREAM_LABELS: u32 = 1;
    pub const STREAM_ENTRIES: u32 = 2;
    pub const ENTRY_TIMESTAMP: u32 = 1;
    pub const ENTRY_LINE: u32 = 2;
    pub const TIMESTAMP_SECONDS: u32 = 1;
    pub const TIMESTAMP_NANOS: u32 = 2;
}

/// One log line of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Unix nanoseconds, sent exactly (Timestamp's `seconds` and non-negative `nanos`).
    pub timestamp: i64,
    /// The line, without a trailing newline.
    pub line: &'a str,
}

/// The entries of one stream, in the order the store should see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream<'a> {
    /// The stream's labels as [`format_labels`] writes them.
    pub labels: &'a str,
    /// Its entries.
    pub entries: &'a [Entry<'a>],
}

/// Why a push body could not be built.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// Snappy refused the input (it is over Snappy's 4 GiB block limit).
    #[error("cannot compress a push request of {len} bytes")]
    Compress {
        /// The encoded size.
        len: usize,
        /// Snappy's error.
        #[source]
        source: snap::Error,
    },
}

/// The compressed body of a push request: the protobuf [`encode`]s, then raw Snappy.
///
/// The protobuf, the compressed block and Snappy's hash table are kept per thread from one
/// body to the next: a body is built without zeroing or faulting in a megabyte of fresh
/// pages each time, and the memory kept is per thread, not per store.
pub fn push_body(streams: &[Stream<'_>]) -> Result<Vec<u8>, EncodeError> {
    thread_local!(static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default()));
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.raw.clear();
        encode(streams, &mut scratch.raw);
        let raw = &scratch.raw;
        let max = snap::raw::max_compress_len(raw.len());
        if scratch.compressed.len() < max {
            scratch.compressed.resize(max, 0);
        }
        let n = scratch
            .encoder
            .compress(raw, &mut scratch.compressed)
            .map_err(|source| EncodeError::Compress {
                len: raw.len(),
                source,
            })?;
        let body = scratch.compressed[..n].to_vec();
        // A rare huge body does not pin its buffers for good.
        if scratch.raw.capacity() > SCRATCH_KEPT {
            *scratch = Scratch::default();
        }
        Ok(body)
    })
}

/// The most a thread's [`push_body`] buffers keep between bodies (a batch is at most
/// `delivery.batch_bytes`, 1 MiB by default).
const SCRATCH_KEPT: usize = 8 << 20;

/// [`push_body`]'s buffers.
struct Scratch {
    raw: Vec<u8>,
    compressed: Vec<u8>,
    encoder: snap::raw::Encoder,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch {
            raw: Vec::new(),
            compressed: Vec::new(),
            encoder: snap::raw::Encoder::new(),
        }
    }
}

/// Appends the `PushRequest` protobuf of `streams` to `out` (proto3: empty strings and zero
/// numbers left out; every entry's timestamp written, as Loki's non-nullable field is).
pub fn encode(streams: &[Stream<'_>], out: &mut Vec<u8>) {
    let lens: Vec<usize> = streams.iter().map(stream_len).collect();
    out.reserve(lens.iter().map(|&len| nested_len(len)).sum());
    for (stream, len) in streams.iter().zip(lens) {
        put_len_key(out, field::PUSH_REQUEST_STREAMS, len);
        put_string(out, field::STREAM_LABELS, stream.labels);
        for entry in stream.entries {
            let (seconds, nanos) = split_timestamp(entry.timestamp);
            let timestamp = timestamp_len(seconds, nanos);
            put_len_key(
                out,
                field::STREAM_ENTRIES,
                nested_len(timestamp) + string_len(entry.line),
            );
            put_len_key(out, field::ENTRY_TIMESTAMP, timestamp);
            put_int(out, field::TIMESTAMP_SECONDS, seconds as u64);
            put_int(out, field::TIMESTAMP_NANOS, nanos);
            put_string(out, field::ENTRY_LINE, entry.line);
        }
    }
}

/// The length of [`encode`]'s output.
pub fn encoded_len(streams: &[Stream<'_>]) -> usize {
    streams.iter().map(|s| nested_len(stream_len(s))).sum()
}

/// `google.protobuf.Timestamp` of Unix nanoseconds: seconds rounded down, nanos in 0..1e9.
fn split_timestamp(nanos: i64) -> (i64, u64) {
    (
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000) as u64,
    )
}

fn stream_len(stream: &Stream<'_>) -> usize {
    string_len(stream.labels)
        + stream
            .entries
            .iter()
            .map(|e| nested_len(entry_len(e)))
            .sum::<usize>()
}

fn entry_len(entry: &Entry<'_>) -> usize {
    let (seconds, nanos) = split_timestamp(entry.timestamp);
    nested_len(timestamp_len(seconds, nanos)) + string_len(entry.line)
}

fn timestamp_len(seconds: i64, nanos: u64) -> usize {
    int_len(seconds as u64) + int_len(nanos)
}

/// A length-delimited field of `len` bytes, with its one-byte key (every field number here is
/// below 16).
fn nested_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn string_len(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        nested_len(value.len())
    }
}

fn int_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + varint_len(value)
    }
}

/// An int64/int32 field: a varint of the two's complement (ten bytes when negative).
fn put_int(out: &mut Vec<u8>, number: u32, value: u64) {
    if value != 0 {
        put_key(out, number, VARINT);
        put_varint(out, value);
    }
}

/// Why labels cannot name a Loki stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    /// No label with a value: Loki refuses a stream without labels (`missing_labels`).
    #[error("a stream needs at least one label with a value")]
    Empty,
    /// A name outside `[a-zA-Z_][a-zA-Z0-9_]*` (see [`sanitize_label_name`]).
    #[error("`{0}` is not a label name")]
    InvalidName(String),
    /// The same name twice (`duplicate_label_names`).
    #[error("label `{0}` appears twice")]
    Duplicate(String),
    /// Text that [`parse_labels`] cannot read: not `{name="value", ...}` as
    /// [`format_labels`] writes it.
    #[error("`{0}` is not a label string")]
    Syntax(String),
}

/// Writes a stream's labels as Loki reads them: `{name="value", ...}`, sorted by name (so one
/// set of labels always gives the same string), values quoted with Go's escapes (`\\`, `\"`,
/// `\n`, `\r`, `\t`, `\xNN` for other control characters). A label with an empty value is left
/// out: Loki, as Prometheus, treats it as absent.
pub fn format_labels(pairs: &[(&str, &str)]) -> Result<String, LabelError> {
    let mut sorted: Vec<&(&str, &str)> = pairs.iter().filter(|(_, v)| !v.is_empty()).collect();
    sorted.sort_by_key(|(name, _)| *name);
    if sorted.is_empty() {
        return Err(LabelError::Empty);
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(LabelError::Duplicate(w[0].0.to_owned()));
    }
    let mut out = String::with_capacity(
        2 + sorted
            .iter()
            .map(|(n, v)| n.len() + v.len() + 5)
            .sum::<usize>(),
    );
    out.push('{');
    for (i, (name, value)) in sorted.into_iter().enumerate() {
        if !is_label_name(name) {
            return Err(LabelError::InvalidName((*name).to_owned()));
        }
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    Ok(out)
}

/// Reads back what [`format_labels`] writes: the pairs in their order, values unquoted (the
/// escapes it uses: `\\`, `\"`, `\n`, `\r`, `\t`, `\xNN`). The OTLP encoder takes a stream's
/// labels apart with it ([`crate::otlp`]).
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, LabelError> {
    let syntax = || LabelError::Syntax(text.to_owned());
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(syntax)?;
    let mut pairs = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let mut name = String::new();
        loop {
            match chars.next().ok_or_else(syntax)? {
                '=' => break,
                c => name.push(c),
            }
        }
        if !is_label_name(&name) {
            return Err(LabelError::InvalidName(name));
        }
        if chars.next() != Some('"') {
            return Err(syntax());
        }
        let mut value = String::new();
        loop {
            match chars.next().ok_or_else(syntax)? {
                '"' => break,
                '\\' => match chars.next().ok_or_else(syntax)? {
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    't' => value.push('\t'),
                    'x' => {
                        let hex: String = chars.by_ref().take(2).collect();
                        let byte = u8::from_str_radix(&hex, 16).map_err(|_| syntax())?;
                        value.push(char::from(byte));
                    }
                    c @ ('\\' | '"') => value.push(c),
                    _ => return Err(syntax()),
                },
                c => value.push(c),
            }
        }
        pairs.push((name, value));
        if chars.peek().is_some() && (chars.next(), chars.next()) != (Some(','), Some(' ')) {
            return Err(syntax());
        }
    }
    Ok(pairs)
}

/// Whether `name` is a Prometheus/Loki label name, `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A label name from any text (a Kubernetes label key, say): every character outside
/// `[a-zA-Z0-9_]` becomes `_`, and a leading digit (or nothing at all) gets a `_` before it.
pub fn sanitize_label_name(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    if !text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.push('_');
    }
    out.extend(text.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use agentkit::protobuf::LEN;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A decoded `PushRequest`: (labels, [(seconds, nanos, line)]).
    pub(crate) type Decoded = Vec<(String, Vec<(i64, i32, String)>)>;

    /// A strict decoder of exactly the fields above: any other field number or wire type
    /// fails the test, so a wrong number in the encoder cannot go unnoticed.
    pub(crate) fn decode(mut bytes: &[u8]) -> Decoded {
        let mut streams = Vec::new();
        while !bytes.is_empty() {
            let body = expect_len(&mut bytes, 1, "PushRequest.streams");
            streams.push(decode_stream(body));
        }
        streams
    }

    fn decode_stream(mut bytes: &[u8]) -> (String, Vec<(i64, i32, String)>) {
        let (mut labels, mut entries) = (String::new(), Vec::new());
        while !bytes.is_empty() {
            let (number, wire) = key(&mut bytes);
            assert_eq!(wire, LEN, "StreamAdapter field {number}");
            let body = take_len(&mut bytes);
            match number {
                1 => labels = String::from_utf8(body.to_vec()).unwrap(),
                2 => entries.push(decode_entry(body)),
                n => panic!("StreamAdapter has no field {n}"),
            }
        }
        (labels, entries)
    }

    fn decode_entry(mut bytes: &[u8]) -> (i64, i32, String) {
        let (mut seconds, mut nanos, mut line) = (0, 0, String::new());
        while !bytes.is_empty() {
            let (number, wire) = key(&mut bytes);
            assert_eq!(wire, LEN, "EntryAdapter field {number}");
            let mut body = take_len(&mut bytes);
            match number {
                1 => {
                    while !body.is_empty() {
                        let (number, wire) = key(&mut body);
                        assert_eq!(wire, VARINT, "Timestamp field {number}");
                        let value = varint(&mut body);
                        match number {
                            1 => seconds = value as i64,
                            2 => nanos = i32::try_from(value).unwrap(),
                            n => panic!("Timestamp has no field {n}"),
                        }
                    }
                }
                2 => line = String::from_utf8(body.to_vec()).unwrap(),
                n => panic!("EntryAdapter has no field {n}"),
            }
        }
        (seconds, nanos, line)
    }

    fn expect_len<'a>(bytes: &mut &'a [u8], number: u32, what: &str) -> &'a [u8] {
        assert_eq!(key(bytes), (number, LEN), "{what}");
        take_len(bytes)
    }

    fn key(bytes: &mut &[u8]) -> (u32, u8) {
        let key = varint(bytes);
        (u32::try_from(key >> 3).unwrap(), (key & 7) as u8)
    }

    fn take_len<'a>(bytes: &mut &'a [u8]) -> &'a [u8] {
        let len = usize::try_from(varint(bytes)).unwrap();
        let (body, rest) = bytes.split_at(len);
        *bytes = rest;
        body
    }

    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for i in 0..10 {
            let b = bytes[0];
            *bytes = &bytes[1..];
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return value;
            }
        }
        panic!("varint longer than 10 bytes")
    }

    fn encoded(streams: &[Stream<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(streams, &mut out);
        assert_eq!(out.len(), encoded_len(streams));
        out
    }

    /// The bytes worked out by hand from the encoding spec and push.proto's field numbers.
    #[test]
    fn known_encoding() {
        let entries = [Entry {
            timestamp: 1_000_000_002,
            line: "x",
        }];
        let streams = [Stream {
            labels: "{a=\"b\"}",
            entries: &entries,
        }];
        // streams(1) { labels(1) "{a="b"}", entries(2) { timestamp(1) { seconds(1) 1,
        // nanos(2) 2 }, line(2) "x" } }
        assert_eq!(
            encoded(&streams),
            hex("0a14 0a07 7b613d2262227d 1209 0a04 0801 1002 1201 78")
        );
        // The epoch: an empty Timestamp, still written; an empty line left out.
        let entries = [Entry {
            timestamp: 0,
            line: "",
        }];
        let streams = [Stream {
            labels: "{a=\"b\"}",
            entries: &entries,
        }];
        assert_eq!(encoded(&streams), hex("0a0d 0a07 7b613d2262227d 1202 0a00"));
    }

    #[test]
    fn timestamps_before_the_epoch_have_positive_nanos() {
        let entries = [Entry {
            timestamp: -1,
            line: "x",
        }];
        let streams = [Stream {
            labels: "{a=\"b\"}",
            entries: &entries,
        }];
        let bytes = encoded(&streams);
        assert_eq!(
            decode(&bytes),
            vec![(
                "{a=\"b\"}".to_owned(),
                vec![(-1, 999_999_999, "x".to_owned())]
            )]
        );
        // seconds -1 is ten bytes of varint.
        let seconds = hex("08 ffffffffffffffffff01");
        assert!(bytes.windows(seconds.len()).any(|w| w == seconds));
    }

    #[test]
    fn body_is_raw_snappy() {
        let lines: Vec<String> = (0..100)
            .map(|i| format!("line {i} of a repetitive log"))
            .collect();
        let entries: Vec<Entry<'_>> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| Entry {
                timestamp: 1_700_000_000_000_000_000 + i as i64,
                line,
            })
            .collect();
        let streams = [Stream {
            labels: "{namespace=\"shoot--p--n\"}",
            entries: &entries,
        }];
        let raw = encoded(&streams);
        let body = push_body(&streams).unwrap();
        assert!(
            body.len() < raw.len() / 2,
            "{} of {}",
            body.len(),
            raw.len()
        );
        // The block format starts with the uncompressed length; the framed format would start
        // with its stream identifier chunk, ff 06 00 00 "sNaPpY".
        let mut head = body.as_slice();
        assert_eq!(varint(&mut head), raw.len() as u64);
        assert_ne!(body[0], 0xff);
        assert_eq!(
            snap::raw::Decoder::new().decompress_vec(&body).unwrap(),
            raw
        );
        assert_eq!(decode(&raw)[0].1.len(), 100);
    }

    #[test]
    fn labels_as_loki_reads_them() {
        assert_eq!(
            format_labels(&[("pod", "kube-apiserver-0"), ("namespace", "shoot--p--n")]).unwrap(),
            "{namespace=\"shoot--p--n\", pod=\"kube-apiserver-0\"}"
        );
        assert_eq!(
            format_labels(&[("a", "q\"uo\\te\nnew\tline\u{1}é")]).unwrap(),
            "{a=\"q\\\"uo\\\\te\\nnew\\tline\\x01é\"}"
        );
        assert_eq!(
            format_labels(&[("a", "x"), ("b", "")]).unwrap(),
            "{a=\"x\"}"
        );
        assert_eq!(format_labels(&[]), Err(LabelError::Empty));
        assert_eq!(format_labels(&[("a", "")]), Err(LabelError::Empty));
        assert_eq!(
            format_labels(&[("a", "1"), ("a", "2")]),
            Err(LabelError::Duplicate("a".into()))
        );
        assert_eq!(
            format_labels(&[("app.kubernetes.io/name", "x")]),
            Err(LabelError::InvalidName("app.kubernetes.io/name".into()))
        );
    }

    #[test]
    fn sanitized_names_are_names() {
        for (text, want) in [
            ("app.kubernetes.io/name", "app_kubernetes_io_name"),
            ("9lives", "_9lives"),
            ("", "_"),
            ("ok_Name1", "ok_Name1"),
            ("é", "__"),
        ] {
            assert_eq!(sanitize_label_name(text), want);
            assert!(is_label_name(want));
        }
        assert!(!is_label_name("a-b"));
        assert!(!is_label_name("1a"));
        assert!(!is_label_name(""));
    }

    proptest! {
        #[test]
        fn requests_round_trip(
            streams in proptest::collection::vec(
                (".{0,20}", proptest::collection::vec((any::<i64>(), ".{0,40}"), 0..5)),
                0..5,
            ),
        ) {
            let entries: Vec<Vec<Entry<'_>>> = streams
                .iter()
                .map(|(_, es)| es.iter().map(|(t, l)| Entry { timestamp: *t, line: l }).collect())
                .collect();
            let request: Vec<Stream<'_>> = streams
                .iter()
                .zip(&entries)
                .map(|((labels, _), entries)| Stream { labels, entries })
                .collect();
            let raw = encoded(&request);
            let want: Decoded = streams
                .iter()
                .map(|(labels, es)| {
                    let es = es
                        .iter()
                        .map(|(t, l)| (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000) as i32, l.clone()))
                        .collect();
                    (labels.clone(), es)
                })
                .collect();
            prop_assert_eq!(decode(&raw), want);
            let body = push_body(&request).unwrap();
            prop_assert_eq!(snap::raw::Decoder::new().decompress_vec(&body).unwrap(), raw);
        }

        #[test]
        fn labels_round_trip(pairs in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,8}", ".{0,12}", 1..6)) {
            let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let want: Vec<(String, String)> = pairs
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            match format_labels(&borrowed) {
                Ok(text) => prop_assert_eq!(parse_labels(&text).unwrap(), want),
                Err(e) => {
                    prop_assert_eq!(e, LabelError::Empty);
                    prop_assert!(want.is_empty());
                }
            }
        }
    }
}
