//! The body of an OTLP/HTTP logs export (`POST .../v1/logs`, `Content-Type:
//! application/x-protobuf`): the `ExportLogsServiceRequest` of opentelemetry-proto
//! (`collector/logs/v1/logs_service.proto`, `logs/v1/logs.proto`, `common/v1/common.proto`,
//! `resource/v1/resource.proto`), encoded by hand as the Loki request is ([`crate::loki`]),
//! and the `partial_success` of its answer. Nothing here does IO.
//!
//! ```text
//! ExportLogsServiceRequest { repeated ResourceLogs resource_logs = 1; }
//! ResourceLogs  { Resource resource = 1; repeated ScopeLogs scope_logs = 2; }
//! Resource      { repeated KeyValue attributes = 1; }
//! ScopeLogs     { repeated LogRecord log_records = 2; }
//! LogRecord     { fixed64 time_unix_nano = 1; fixed64 observed_time_unix_nano = 11;
//!                 AnyValue body = 5; }
//! KeyValue      { string key = 1; AnyValue value = 2; }
//! AnyValue      { oneof value { string string_value = 1; ... } }
//! ExportLogsServiceResponse { ExportLogsPartialSuccess partial_success = 1; }
//! ExportLogsPartialSuccess  { int64 rejected_log_records = 1; string error_message = 2; }
//! ```
//!
//! One `ResourceLogs` per stream, that is per container: its resource attributes are the
//! stream's labels under OpenTelemetry's Kubernetes names ([`attribute_name`]:
//! `k8s.namespace.name`, `k8s.pod.name`, `k8s.container.name`; `origin` as it is), one
//! `ScopeLogs` without a scope, and a `LogRecord` per line: the CRI timestamp as
//! `time_unix_nano`, the time the batch was sealed as `observed_time_unix_nano`, the line as
//! a string `body`. Severity, attributes and trace context are not set: the shipper does not
//! read the lines' content.

use agentkit::protobuf::{put_key, put_len_key, put_string, varint_len, I64, LEN, VARINT};

use crate::loki;

/// The request's `Content-Type` (OTLP/HTTP's binary protobuf encoding).
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Field numbers (opentelemetry-proto v1).
mod field {
    pub const REQUEST_RESOURCE_LOGS: u32 = 1;
    pub const RESOURCE_LOGS_RESOURCE: u32 = 1;
    pub const RESOURCE_LOGS_SCOPE_LOGS: u32 = 2;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_LOGS_LOG_RECORDS: u32 = 2;
    pub const RECORD_TIME: u32 = 1;
    pub const RECORD_BODY: u32 = 5;
    pub const RECORD_OBSERVED_TIME: u32 = 11;
    pub const KEY_VALUE_KEY: u32 = 1;
    pub const KEY_VALUE_VALUE: u32 = 2;
    pub const ANY_VALUE_STRING: u32 = 1;
    pub const RESPONSE_PARTIAL_SUCCESS: u32 = 1;
    pub const PARTIAL_REJECTED: u32 = 1;
    pub const PARTIAL_MESSAGE: u32 = 2;
}

/// The log records of one resource (one stream: a container of a pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    /// Its attributes, (key, string value), in order.
    pub attributes: &'a [(String, String)],
    /// Its lines, in the order the store should see them; a timestamp before 1970 is sent as
    /// 0 (unknown: the store takes the observed time), `time_unix_nano` being unsigned.
    pub entries: &'a [loki::Entry<'a>],
}

/// The OpenTelemetry name of a Gardener label: the Kubernetes resource semantic conventions
/// for the three the path gives and the node's name, any other (`origin`) unchanged.
pub fn attribute_name(label: &str) -> &str {
    match label {
        "namespace_name" => "k8s.namespace.name",
        "pod_name" => "k8s.pod.name",
        "container_name" => "k8s.container.name",
        "nodename" => "k8s.node.name",
        other => other,
    }
}

/// The resource attributes of a stream whose labels are `labels` (as
/// [`loki::format_labels`] writes them), renamed by [`attribute_name`]. Text that is not a
/// label string (never the case for the router's) becomes one attribute, `labels`, so the
/// lines still go out and say where they came from.
pub fn resource_attributes(labels: &str) -> Vec<(String, String)> {
    match loki::parse_labels(labels) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(name, value)| (attribute_name(&name).to_owned(), value))
            .collect(),
        Err(_) => vec![("labels".to_owned(), labels.to_owned())],
    }
}

/// Appends the `ExportLogsServiceRequest` of `resources` to `out`; every record's
/// `observed_time_unix_nano` is `observed` (Unix nanoseconds). Proto3: zero times are left
/// out; a body is always written (an empty line is an empty string, not no body).
pub fn encode(resources: &[Resource<'_>], observed: i64, out: &mut Vec<u8>) {
    out.reserve(encoded_len(resources, observed));
    let observed = unsigned(observed);
    for resource in resources {
        put_len_key(
            out,
            field::REQUEST_RESOURCE_LOGS,
            resource_logs_len(resource, observed),
        );
        put_len_key(
            out,
            field::RESOURCE_LOGS_RESOURCE,
            attributes_len(resource.attributes),
        );
        for (key, value) in resource.attributes {
            put_len_key(out, field::RESOURCE_ATTRIBUTES, key_value_len(key, value));
            put_string(out, field::KEY_VALUE_KEY, key);
            put_len_key(out, field::KEY_VALUE_VALUE, any_string_len(value));
            put_len_key(out, field::ANY_VALUE_STRING, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        put_len_key(
            out,
            field::RESOURCE_LOGS_SCOPE_LOGS,
            scope_logs_len(resource.entries, observed),
        );
        for entry in resource.entries {
            put_len_key(
                out,
                field::SCOPE_LOGS_LOG_RECORDS,
                record_len(entry, observed),
            );
            put_fixed64(out, field::RECORD_TIME, unsigned(entry.timestamp));
            put_len_key(out, field::RECORD_BODY, any_string_len(entry.line));
            put_len_key(out, field::ANY_VALUE_STRING, entry.line.len());
            out.extend_from_slice(entry.line.as_bytes());
            put_fixed64(out, field::RECORD_OBSERVED_TIME, observed);
        }
    }
}

/// The length of [`encode`]'s output.
pub fn encoded_len(resources: &[Resource<'_>], observed: i64) -> usize {
    let observed = unsigned(observed);
    resources
        .iter()
        .map(|r| nested_len(field::REQUEST_RESOURCE_LOGS, resource_logs_len(r, observed)))
        .sum()
}

/// What an `ExportLogsServiceResponse` says about a request the store took only in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialSuccess {
    /// Records the store refused (`rejected_log_records`; 0 with a message is a warning).
    pub rejected: u64,
    /// Why (`error_message`), possibly cut short with the answer.
    pub message: String,
}

/// The `partial_success` of an answer's body, if it has one that says something (records
/// rejected, or a message). The body may be cut short (the client reads its start only):
/// what was read before the cut counts, as does a message cut at the end. A body that is not
/// protobuf, or an empty `partial_success`, says nothing: `None`.
pub fn partial_success(mut body: &[u8]) -> Option<PartialSuccess> {
    let mut found = None;
    while !body.is_empty() {
        let (number, wire) = read_key(&mut body)?;
        if number == field::RESPONSE_PARTIAL_SUCCESS && wire == LEN {
            let (inner, _) = read_len(&mut body)?;
            found = Some(read_partial(inner));
        } else {
            skip(&mut body, wire)?;
        }
    }
    found.filter(|p| p.rejected > 0 || !p.message.is_empty())
}

/// An `ExportLogsPartialSuccess`, as far as it goes.
fn read_partial(mut body: &[u8]) -> PartialSuccess {
    let mut partial = PartialSuccess {
        rejected: 0,
        message: String::new(),
    };
    while !body.is_empty() {
        let Some((number, wire)) = read_key(&mut body) else {
            break;
        };
        match (number, wire) {
            (field::PARTIAL_REJECTED, VARINT) => match read_varint(&mut body) {
                // An int64: a negative count is nonsense, taken as none.
                Some(value) => partial.rejected = u64::try_from(value as i64).unwrap_or(0),
                None => break,
            },
            (field::PARTIAL_MESSAGE, LEN) => {
                let Some((text, _)) = read_len(&mut body) else {
                    break;
                };
                partial.message = String::from_utf8_lossy(text).into_owned();
            }
            (_, wire) => {
                if skip(&mut body, wire).is_none() {
                    break;
                }
            }
        }
    }
    partial
}

fn read_varint(body: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = body.split_first()?;
        *body = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn read_key(body: &mut &[u8]) -> Option<(u32, u8)> {
    let key = read_varint(body)?;
    Some((u32::try_from(key >> 3).ok()?, (key & 7) as u8))
}

/// A length-delimited field's bytes, cut at the end of `body` (whether it was cut: the flag).
fn read_len<'a>(body: &mut &'a [u8]) -> Option<(&'a [u8], bool)> {
    let len = usize::try_from(read_varint(body)?).ok()?;
    let take = len.min(body.len());
    let (value, rest) = body.split_at(take);
    *body = rest;
    Some((value, take < len))
}

fn skip(body: &mut &[u8], wire: u8) -> Option<()> {
    let len = match wire {
        VARINT => return read_varint(body).map(|_| ()),
        I64 => 8,
        LEN => return read_len(body).map(|_| ()),
        agentkit::protobuf::I32 => 4,
        _ => return None,
    };
    *body = body.get(len..)?;
    Some(())
}

/// Unix nanoseconds as `fixed64`: before 1970 is 0, "unknown".
fn unsigned(nanos: i64) -> u64 {
    u64::try_from(nanos).unwrap_or(0)
}

fn resource_logs_len(resource: &Resource<'_>, observed: u64) -> usize {
    nested_len(
        field::RESOURCE_LOGS_RESOURCE,
        attributes_len(resource.attributes),
    ) + nested_len(
        field::RESOURCE_LOGS_SCOPE_LOGS,
        scope_logs_len(resource.entries, observed),
    )
}

fn attributes_len(attributes: &[(String, String)]) -> usize {
    attributes
        .iter()
        .map(|(k, v)| nested_len(field::RESOURCE_ATTRIBUTES, key_value_len(k, v)))
        .sum()
}

fn key_value_len(key: &str, value: &str) -> usize {
    string_len(field::KEY_VALUE_KEY, key)
        + nested_len(field::KEY_VALUE_VALUE, any_string_len(value))
}

fn any_string_len(value: &str) -> usize {
    nested_len(field::ANY_VALUE_STRING, value.len())
}

fn scope_logs_len(entries: &[loki::Entry<'_>], observed: u64) -> usize {
    entries
        .iter()
        .map(|e| nested_len(field::SCOPE_LOGS_LOG_RECORDS, record_len(e, observed)))
        .sum()
}

fn record_len(entry: &loki::Entry<'_>, observed: u64) -> usize {
    fixed64_len(field::RECORD_TIME, unsigned(entry.timestamp))
        + nested_len(field::RECORD_BODY, any_string_len(entry.line))
        + fixed64_len(field::RECORD_OBSERVED_TIME, observed)
}

fn key_len(number: u32) -> usize {
    varint_len(u64::from(number) << 3)
}

/// A length-delimited field of `len` bytes, with its key.
fn nested_len(number: u32, len: usize) -> usize {
    key_len(number) + varint_len(len as u64) + len
}

fn string_len(number: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        nested_len(number, value.len())
    }
}

fn fixed64_len(number: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(number) + 8
    }
}

fn put_fixed64(out: &mut Vec<u8>, number: u32, value: u64) {
    if value != 0 {
        put_key(out, number, I64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loki::Entry;
    use agentkit::protobuf::put_varint;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A decoded record: (time_unix_nano, observed_time_unix_nano, body).
    type Record = (u64, u64, String);
    /// A decoded request: per `ResourceLogs`, its attributes and its records.
    type Decoded = Vec<(Vec<(String, String)>, Vec<Record>)>;

    /// A strict decoder of exactly the fields above: any other field number or wire type
    /// fails the test, so a wrong number in the encoder cannot go unnoticed.
    fn decode(mut bytes: &[u8]) -> Decoded {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let body = expect_len(&mut bytes, 1, "ExportLogsServiceRequest.resource_logs");
            out.push(decode_resource_logs(body));
        }
        out
    }

    fn decode_resource_logs(mut bytes: &[u8]) -> (Vec<(String, String)>, Vec<Record>) {
        let (mut attributes, mut records) = (Vec::new(), Vec::new());
        let (mut resources, mut scopes) = (0, 0);
        while !bytes.is_empty() {
            let (number, wire) = key(&mut bytes);
            assert_eq!(wire, LEN, "ResourceLogs field {number}");
            let mut body = take_len(&mut bytes);
            match number {
                1 => {
                    resources += 1;
                    while !body.is_empty() {
                        let kv = expect_len(&mut body, 1, "Resource.attributes");
                        attributes.push(decode_key_value(kv));
                    }
                }
                2 => {
                    scopes += 1;
                    while !body.is_empty() {
                        let record = expect_len(&mut body, 2, "ScopeLogs.log_records");
                        records.push(decode_record(record));
                    }
                }
                n => panic!("ResourceLogs has no field {n} here"),
            }
        }
        assert_eq!((resources, scopes), (1, 1), "one resource, one scope");
        (attributes, records)
    }

    fn decode_key_value(mut bytes: &[u8]) -> (String, String) {
        let (mut k, mut v) = (String::new(), None);
        while !bytes.is_empty() {
            let (number, wire) = key(&mut bytes);
            assert_eq!(wire, LEN, "KeyValue field {number}");
            let body = take_len(&mut bytes);
            match number {
                1 => k = String::from_utf8(body.to_vec()).unwrap(),
                2 => v = Some(decode_any_string(body)),
                n => panic!("KeyValue has no field {n}"),
            }
        }
        (k, v.expect("a value"))
    }

    fn decode_any_string(mut bytes: &[u8]) -> String {
        let body = expect_len(&mut bytes, 1, "AnyValue.string_value");
        assert!(bytes.is_empty(), "one value");
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn decode_record(mut bytes: &[u8]) -> Record {
        let (mut time, mut observed, mut body) = (0, 0, None);
        while !bytes.is_empty() {
            let (number, wire) = key(&mut bytes);
            match (number, wire) {
                (1, I64) => time = fixed64(&mut bytes),
                (11, I64) => observed = fixed64(&mut bytes),
                (5, LEN) => body = Some(decode_any_string(take_len(&mut bytes))),
                (n, w) => panic!("LogRecord field {n} (wire type {w}) is not sent"),
            }
        }
        (time, observed, body.expect("a body"))
    }

    fn fixed64(bytes: &mut &[u8]) -> u64 {
        let (value, rest) = bytes.split_at(8);
        *bytes = rest;
        u64::from_le_bytes(value.try_into().unwrap())
    }

    fn expect_len<'a>(bytes: &mut &'a [u8], number: u32, what: &str) -> &'a [u8] {
        assert_eq!(key(bytes), (number, LEN), "{what}");
        take_len(bytes)
    }

    fn key(bytes: &mut &[u8]) -> (u32, u8) {
        read_key(bytes).unwrap()
    }

    fn take_len<'a>(bytes: &mut &'a [u8]) -> &'a [u8] {
        let (body, cut) = read_len(bytes).unwrap();
        assert!(!cut, "a length past the end");
        body
    }

    fn encoded(resources: &[Resource<'_>], observed: i64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(resources, observed, &mut out);
        assert_eq!(out.len(), encoded_len(resources, observed));
        out
    }

    fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The bytes worked out by hand from the encoding spec and opentelemetry-proto's numbers.
    #[test]
    fn known_encoding() {
        let attributes = attrs(&[("a", "b")]);
        let entries = [Entry {
            timestamp: 1,
            line: "x",
        }];
        let resources = [Resource {
            attributes: &attributes,
            entries: &entries,
        }];
        // resource_logs(1) {
        //   resource(1) { attributes(1) { key(1) "a", value(2) { string_value(1) "b" } } }
        //   scope_logs(2) { log_records(2) { time_unix_nano(1) fixed64 1,
        //     body(5) { string_value(1) "x" }, observed_time_unix_nano(11) fixed64 2 } }
        // }
        assert_eq!(
            encoded(&resources, 2),
            hex("0a27 0a0a 0a08 0a0161 1203 0a0162 \
                 1219 1217 09 0100000000000000 2a03 0a0178 59 0200000000000000")
        );
        // Before 1970 and an empty line: no time, an empty string body still there.
        let entries = [Entry {
            timestamp: -5,
            line: "",
        }];
        let resources = [Resource {
            attributes: &[],
            entries: &entries,
        }];
        assert_eq!(encoded(&resources, 0), hex("0a0a 0a00 1206 1204 2a02 0a00"));
    }

    #[test]
    fn gardener_labels_become_kubernetes_attributes() {
        let labels = crate::loki::format_labels(&[
            ("origin", "seed"),
            ("namespace_name", "shoot--core--aws-01"),
            ("pod_name", "kube-apiserver-7d9f"),
            ("container_name", "kube-apiserver"),
        ])
        .unwrap();
        assert_eq!(
            resource_attributes(&labels),
            attrs(&[
                ("k8s.container.name", "kube-apiserver"),
                ("k8s.namespace.name", "shoot--core--aws-01"),
                ("origin", "seed"),
                ("k8s.pod.name", "kube-apiserver-7d9f"),
            ])
        );
        assert_eq!(
            resource_attributes("not labels"),
            attrs(&[("labels", "not labels")])
        );
    }

    #[test]
    fn partial_success_is_read_as_far_as_it_goes() {
        // partial_success(1) { rejected_log_records(1) 3, error_message(2) "too old" }
        let body = hex("0a0b 0803 1207 746f6f206f6c64");
        let want = PartialSuccess {
            rejected: 3,
            message: "too old".into(),
        };
        assert_eq!(partial_success(&body), Some(want.clone()));
        // Unknown fields around it are skipped.
        let mut framed = hex("1801 21 0200000000000000");
        framed.extend_from_slice(&body);
        framed.extend_from_slice(&hex("2d 01000000"));
        assert_eq!(partial_success(&framed), Some(want));
        // Cut short inside the message: the count and what there is of the text.
        assert_eq!(
            partial_success(&body[..9]),
            Some(PartialSuccess {
                rejected: 3,
                message: "too".into()
            })
        );
        // A warning without rejections is still said.
        assert_eq!(
            partial_success(&hex("0a04 1202 6869")),
            Some(PartialSuccess {
                rejected: 0,
                message: "hi".into()
            })
        );
        // Nothing to say: empty body, empty partial_success, text.
        assert_eq!(partial_success(b""), None);
        assert_eq!(partial_success(&hex("0a00")), None);
        assert_eq!(partial_success(b"{\"partialSuccess\":{}}"), None);
    }

    proptest! {
        #[test]
        fn requests_round_trip(
            resources in proptest::collection::vec(
                (
                    proptest::collection::vec((".{0,12}", ".{0,20}"), 0..4),
                    proptest::collection::vec((any::<i64>(), ".{0,40}"), 0..5),
                ),
                0..5,
            ),
            observed in any::<i64>(),
        ) {
            let entries: Vec<Vec<Entry<'_>>> = resources
                .iter()
                .map(|(_, es)| es.iter().map(|(t, l)| Entry { timestamp: *t, line: l }).collect())
                .collect();
            let request: Vec<Resource<'_>> = resources
                .iter()
                .zip(&entries)
                .map(|((attributes, _), entries)| Resource { attributes, entries })
                .collect();
            let bytes = encoded(&request, observed);
            let want: Decoded = resources
                .iter()
                .map(|(attributes, es)| {
                    let records = es
                        .iter()
                        .map(|(t, l)| (unsigned(*t), unsigned(observed), l.clone()))
                        .collect();
                    (attributes.clone(), records)
                })
                .collect();
            prop_assert_eq!(decode(&bytes), want);
        }

        #[test]
        fn partial_success_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = partial_success(&body);
        }

        #[test]
        fn partial_success_round_trips(rejected in 1..i64::MAX, message in ".{0,40}") {
            let mut inner = Vec::new();
            put_key(&mut inner, 1, VARINT);
            put_varint(&mut inner, rejected as u64);
            put_string(&mut inner, 2, &message);
            let mut body = Vec::new();
            put_len_key(&mut body, 1, inner.len());
            body.extend_from_slice(&inner);
            prop_assert_eq!(
                partial_success(&body),
                Some(PartialSuccess { rejected: rejected as u64, message })
            );
        }
    }
}
