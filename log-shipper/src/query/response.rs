//! The stores' answers, without IO: Loki's `query_range` JSON (`resultType: streams`) and
//! VictoriaLogs' JSON lines turned into [`Entry`]s; the two output forms; and the
//! de-duplication of a follow, where a new window overlaps what was printed already.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use thiserror::Error;

use super::time::{format_rfc3339, parse_instant};

/// One log line with its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Unix nanoseconds.
    pub time: i64,
    /// The stream's labels (Loki), or every field not starting with `_` (VictoriaLogs).
    pub labels: BTreeMap<String, String>,
    /// The line (VictoriaLogs' `_msg`).
    pub line: String,
}

/// An answer the command cannot read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResponseError {
    /// Not the JSON shape the API documents.
    #[error("the store's answer is not a query result: {0}")]
    Shape(String),
    /// Loki answered with another `status` than `success`.
    #[error("the store answered status `{0}`")]
    Status(String),
    /// A metric query: Loki's `matrix` or `vector` result.
    #[error("the query is a metric query (result type `{0}`); log queries only")]
    NotStreams(String),
    /// A VictoriaLogs row without `_time` (a `stats` pipe, say).
    #[error("the store's row has no `_time`: log queries only (no stats pipe)")]
    NoTime,
    /// A line that is not JSON in a VictoriaLogs stream: the error it wrote after its status.
    #[error("the store failed: {0}")]
    Store(String),
}

#[derive(Deserialize)]
struct LokiResponse {
    status: String,
    data: Option<LokiData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LokiData {
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct LokiStream {
    stream: BTreeMap<String, String>,
    // `[ns, line]`, or `[ns, line, {metadata}]` with categorized labels: extra items ignored.
    values: Vec<Vec<serde_json::Value>>,
}

/// The entries of a Loki (or Vali) `query_range` answer, per stream in the order given:
/// `{"status":"success","data":{"resultType":"streams","result":[{"stream":{...},
/// "values":[["<ns>","<line>"],...]}]}}`.
pub fn parse_loki(body: &[u8]) -> Result<Vec<Entry>, ResponseError> {
    let shape = |e: &dyn std::fmt::Display| ResponseError::Shape(e.to_string());
    let response: LokiResponse = serde_json::from_slice(body).map_err(|e| shape(&e))?;
    if response.status != "success" {
        return Err(ResponseError::Status(response.status));
    }
    let data = response.data.ok_or_else(|| shape(&"no `data`"))?;
    if data.result_type != "streams" {
        return Err(ResponseError::NotStreams(data.result_type));
    }
    let streams: Vec<LokiStream> = serde_json::from_value(data.result).map_err(|e| shape(&e))?;
    let mut entries = Vec::new();
    for stream in streams {
        for value in stream.values {
            let (Some(ns), Some(line)) = (
                value.first().and_then(|v| v.as_str()),
                value.get(1).and_then(|v| v.as_str()),
            ) else {
                return Err(shape(&"a value is not [\"<ns>\", \"<line>\"]"));
            };
            let time = ns
                .parse::<i64>()
                .map_err(|_| shape(&format!("timestamp `{ns}` is not nanoseconds")))?;
            entries.push(Entry {
                time,
                labels: stream.stream.clone(),
                line: line.to_owned(),
            });
        }
    }
    Ok(entries)
}

/// One line of a VictoriaLogs answer (`/select/logsql/query` or `tail`): a JSON object with
/// `_time` (RFC 3339), `_msg` and the fields. An empty line is `None`.
pub fn parse_vlogs_line(line: &[u8]) -> Result<Option<Entry>, ResponseError> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let row: BTreeMap<String, serde_json::Value> = match serde_json::from_slice(line) {
        Ok(row) => row,
        // After the status line VictoriaLogs can only report an error in the body, as text.
        Err(_) => {
            return Err(ResponseError::Store(
                String::from_utf8_lossy(line).into_owned(),
            ))
        }
    };
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let time = row.get("_time").map(text).ok_or(ResponseError::NoTime)?;
    let time = parse_instant(&time)
        .map_err(|_| ResponseError::Shape(format!("`_time` {time} is not RFC 3339")))?;
    let fields = row.iter().filter(|(k, _)| !k.starts_with('_'));
    match row.get("_msg").map(text) {
        Some(line) if !line.starts_with(VLOGS_NO_MSG) => Ok(Some(Entry {
            time,
            labels: fields.map(|(k, v)| (k.clone(), text(v))).collect(),
            line,
        })),
        // VictoriaLogs took a JSON line apart into fields (its default for Loki pushes): the
        // stream's fields are the labels, the others are the line, as a JSON object again.
        _ => {
            let stream = row.get("_stream").map(text).unwrap_or_default();
            let stream = stream_keys(&stream);
            let (labels, message): (Vec<_>, Vec<_>) =
                fields.partition(|(k, _)| stream.contains(&k.as_str()));
            let message: serde_json::Map<String, serde_json::Value> = message
                .into_iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(Some(Entry {
                time,
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.clone(), text(v)))
                    .collect(),
                line: if message.is_empty() {
                    String::new()
                } else {
                    serde_json::Value::Object(message).to_string()
                },
            }))
        }
    }
}

/// The field names of a VictoriaLogs `_stream`, `{a="x",b="y"}` (values quoted and escaped).
fn stream_keys(stream: &str) -> Vec<&str> {
    let inner = stream.trim().trim_start_matches('{').trim_end_matches('}');
    let mut keys = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in inner.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '=' if !quoted => keys.push(inner[start..i].trim()),
            ',' if !quoted => start = i + 1,
            _ => {}
        }
    }
    keys
}

/// The start of the `_msg` VictoriaLogs shows for a record stored without one.
pub const VLOGS_NO_MSG: &str = "missing _msg field";

/// Oldest first; equal times keep their order.
pub fn sort_oldest_first(entries: &mut [Entry]) {
    entries.sort_by_key(|e| e.time);
}

/// The last `limit` of entries sorted oldest first (a store may give a few more).
pub fn keep_newest(entries: &mut Vec<Entry>, limit: usize) {
    if entries.len() > limit {
        entries.drain(..entries.len() - limit);
    }
}

/// The text form: `<RFC 3339 time> <namespace>/<pod>/<container> <line>`, Gardener's labels
/// (`namespace_name`, `pod_name`, `container_name`, else `namespace`, `pod`, `container`),
/// `-` for a missing one.
pub fn text_line(entry: &Entry) -> String {
    let label = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| entry.labels.get(*n))
            .map_or("-", String::as_str)
    };
    format!(
        "{} {}/{}/{} {}",
        format_rfc3339(entry.time),
        label(["namespace_name", "namespace"]),
        label(["pod_name", "pod"]),
        label(["container_name", "container"]),
        entry.line
    )
}

/// The JSON form: `{"time":"<RFC 3339>","labels":{...},"line":"..."}`.
pub fn json_line(entry: &Entry) -> String {
    serde_json::json!({
        "time": format_rfc3339(entry.time),
        "labels": entry.labels,
        "line": entry.line,
    })
    .to_string()
}

/// What a follow has printed at its newest time, so that an overlapping window prints nothing
/// twice. Entries older than the mark are dropped, entries at the mark are dropped if they were
/// printed, newer ones move the mark (when it moves).
#[derive(Debug, Default)]
pub struct Dedup {
    mark: Option<i64>,
    at_mark: HashSet<(BTreeMap<String, String>, String)>,
    moving: bool,
}

impl Dedup {
    /// A de-duplication after `printed` (sorted oldest first). `moving`: the mark follows what
    /// is admitted (Loki's polling, whose windows start at the mark); otherwise it stays at the
    /// end of `printed` (VictoriaLogs' tail, which keeps its own order per stream).
    pub fn after(printed: &[Entry], moving: bool) -> Dedup {
        let mut dedup = Dedup {
            moving: true,
            ..Dedup::default()
        };
        for entry in printed {
            dedup.admit(entry);
        }
        dedup.moving = moving;
        dedup
    }

    /// The newest time printed, if any.
    pub fn mark(&self) -> Option<i64> {
        self.mark
    }

    /// Whether `entry` is new; records it.
    pub fn admit(&mut self, entry: &Entry) -> bool {
        let key = || (entry.labels.clone(), entry.line.clone());
        match self.mark {
            Some(mark) if entry.time < mark => false,
            Some(mark) if entry.time == mark => self.at_mark.insert(key()),
            _ if !self.moving => true,
            _ => {
                self.mark = Some(entry.time);
                self.at_mark.clear();
                self.at_mark.insert(key());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn entry(time: i64, line: &str) -> Entry {
        Entry {
            time,
            labels: labels(&[("pod_name", "p")]),
            line: line.into(),
        }
    }

    // The shape of Loki's documentation (docs/sources/reference/loki-http-api.md, "Query logs
    // within a range of time"), backward: newest first per stream.
    const LOKI_STREAMS: &str = r#"{
      "status": "success",
      "data": {
        "resultType": "streams",
        "result": [
          {"stream": {"namespace_name": "shoot--p--a", "pod_name": "etcd-0", "container_name": "etcd"},
           "values": [["1796551200000000002", "second"], ["1796551200000000000", "first"]]},
          {"stream": {"namespace_name": "shoot--p--a", "pod_name": "kas", "container_name": "kube-apiserver"},
           "values": [["1796551200000000001", "between", {"structuredMetadata": {"trace_id": "x"}}]]}
        ],
        "stats": {"summary": {"bytesProcessedPerSecond": 1}}
      }
    }"#;

    #[test]
    fn loki_streams() {
        let mut entries = parse_loki(LOKI_STREAMS.as_bytes()).unwrap();
        assert_eq!(entries.len(), 3);
        sort_oldest_first(&mut entries);
        let lines: Vec<&str> = entries.iter().map(|e| e.line.as_str()).collect();
        assert_eq!(lines, ["first", "between", "second"]);
        assert_eq!(
            text_line(&entries[1]),
            "2026-12-06T10:00:00.000000001Z shoot--p--a/kas/kube-apiserver between"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&entries[0])).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2026-12-06T10:00:00.000000000Z",
                "labels": {"namespace_name": "shoot--p--a", "pod_name": "etcd-0", "container_name": "etcd"},
                "line": "first",
            })
        );
    }

    #[test]
    fn loki_other_answers() {
        assert_eq!(
            parse_loki(br#"{"status":"success","data":{"resultType":"streams","result":[]}}"#)
                .unwrap(),
            []
        );
        assert_eq!(
            parse_loki(br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#),
            Err(ResponseError::NotStreams("matrix".into()))
        );
        assert_eq!(
            parse_loki(br#"{"status":"error","errorType":"bad_data","error":"x"}"#),
            Err(ResponseError::Status("error".into()))
        );
        for bad in [
            &b"parse error at line 1"[..],
            br#"{"status":"success"}"#,
            br#"{"status":"success","data":{"resultType":"streams","result":[{"stream":{},"values":[[1,"x"]]}]}}"#,
            br#"{"status":"success","data":{"resultType":"streams","result":[{"stream":{},"values":[["x","y"]]}]}}"#,
        ] {
            assert!(
                matches!(parse_loki(bad), Err(ResponseError::Shape(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn vlogs_lines() {
        let line = br#"{"_msg":"a \"quoted\" thing","_stream":"{container_name=\"c\",namespace_name=\"shoot--p--a\",pod_name=\"p1\"}","_stream_id":"0000","_time":"2026-12-06T10:00:00.000000003Z","container_name":"c","namespace_name":"shoot--p--a","pod_name":"p1","store":"seed"}"#;
        let entry = parse_vlogs_line(line).unwrap().unwrap();
        assert_eq!(entry.time, 1_796_551_200_000_000_003);
        assert_eq!(entry.line, "a \"quoted\" thing");
        assert_eq!(
            entry.labels,
            labels(&[
                ("container_name", "c"),
                ("namespace_name", "shoot--p--a"),
                ("pod_name", "p1"),
                ("store", "seed")
            ])
        );
        assert_eq!(
            text_line(&entry),
            "2026-12-06T10:00:00.000000003Z shoot--p--a/p1/c a \"quoted\" thing"
        );
        assert_eq!(parse_vlogs_line(b"  \r").unwrap(), None);
        assert_eq!(
            parse_vlogs_line(br#"{"count(*)":"3"}"#),
            Err(ResponseError::NoTime)
        );
        assert_eq!(
            parse_vlogs_line(b"cannot execute query: out of memory"),
            Err(ResponseError::Store(
                "cannot execute query: out of memory".into()
            ))
        );
        // A JSON line VictoriaLogs took apart: the stream's fields are the labels, the rest
        // the line again.
        let parsed = parse_vlogs_line(br#"{"_msg":"missing _msg field; see https://docs.victoriametrics.com/victorialogs/keyconcepts/#message-field","_stream":"{container_name=\"etcd\",namespace_name=\"shoot--p--a\"}","_time":"2026-12-06T10:00:00Z","container_name":"etcd","level":"info","msg":"ready","namespace_name":"shoot--p--a","store":"x"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.line, r#"{"level":"info","msg":"ready","store":"x"}"#);
        assert_eq!(
            parsed.labels.keys().collect::<Vec<_>>(),
            ["container_name", "namespace_name"]
        );
        let bare = parse_vlogs_line(br#"{"_time":"2026-12-06T10:00:00Z"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(text_line(&bare), "2026-12-06T10:00:00.000000000Z -/-/- ");
    }

    #[test]
    fn newest_kept() {
        let mut entries: Vec<Entry> = (0..5).map(|i| entry(i, "x")).collect();
        keep_newest(&mut entries, 2);
        assert_eq!(entries.iter().map(|e| e.time).collect::<Vec<_>>(), [3, 4]);
        keep_newest(&mut entries, 10);
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn dedup_moving_mark() {
        let printed = [entry(1, "a"), entry(2, "b"), entry(2, "c")];
        let mut dedup = Dedup::after(&printed, true);
        assert_eq!(dedup.mark(), Some(2));
        assert!(!dedup.admit(&entry(1, "z")));
        assert!(!dedup.admit(&entry(2, "b")));
        assert!(!dedup.admit(&entry(2, "c")));
        assert!(dedup.admit(&entry(2, "d")));
        assert!(!dedup.admit(&entry(2, "d")));
        assert!(dedup.admit(&entry(3, "b")));
        assert_eq!(dedup.mark(), Some(3));
        assert!(!dedup.admit(&entry(2, "e")));
        assert_eq!(Dedup::after(&[], true).mark(), None);
    }

    #[test]
    fn dedup_fixed_mark() {
        let mut dedup = Dedup::after(&[entry(5, "a")], false);
        assert!(!dedup.admit(&entry(4, "old")));
        assert!(!dedup.admit(&entry(5, "a")));
        assert!(dedup.admit(&entry(7, "new")));
        // Another stream's later row with an older time than the last one is still new.
        assert!(dedup.admit(&entry(6, "late")));
        assert_eq!(dedup.mark(), Some(5));
        let mut nothing = Dedup::after(&[], false);
        assert!(nothing.admit(&entry(1, "x")));
        assert!(nothing.admit(&entry(0, "y")));
    }
}
