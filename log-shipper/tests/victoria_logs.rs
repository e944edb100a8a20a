//! The Loki push encoding against a real store: VictoriaLogs (built by `scripts/vlogs-bin`)
//! takes a push request of two streams, and a LogsQL query gives back every line with its
//! labels and its timestamp to the nanosecond. Without the binary the test says SKIP, or
//! fails under `REQUIRE_PRIVILEGED=1` (CI, where `scripts/test` builds it first).

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{http, Server};
use log_shipper::cri::parse_timestamp;
use log_shipper::loki::{self, Entry, Stream};

#[test]
fn victoria_logs_stores_what_we_push() {
    let Some(binary) = common::victoria_logs("victoria_logs_stores_what_we_push") else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "push");
    let port = server.port;

    // Timestamps of a minute ago, with nanoseconds that a rounding would lose.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64;
    let base = now - 60_000_000_000 - now % 1_000_000_000 + 123_456_789;
    let lines_a = ["first line of a", "zweite Zeile, ünïcödé", "third of a"];
    let lines_b = ["only line of b"];
    let entries_a: Vec<Entry<'_>> = lines_a
        .iter()
        .enumerate()
        .map(|(i, line)| Entry {
            timestamp: base + i as i64,
            line,
        })
        .collect();
    let entries_b = [Entry {
        timestamp: base + 7,
        line: lines_b[0],
    }];
    let labels_a = loki::format_labels(&[
        ("namespace", "shoot--p--a"),
        ("container", "kube-apiserver"),
    ])
    .expect("labels");
    let labels_b = loki::format_labels(&[("namespace", "shoot--p--b"), ("container", "etcd")])
        .expect("labels");
    let body = loki::push_body(&[
        Stream {
            labels: &labels_a,
            entries: &entries_a,
        },
        Stream {
            labels: &labels_b,
            entries: &entries_b,
        },
    ])
    .expect("a push body");
    let (status, answer) = http(
        port,
        "POST",
        "/insert/loki/api/v1/push",
        &format!("Content-Type: {}\r\n", loki::CONTENT_TYPE),
        &body,
    );
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&answer));

    let found = server.read_all(4);
    let mut got: Vec<(i64, String, String, String)> = found
        .iter()
        .map(|v| {
            let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            let time = parse_timestamp(field("_time").as_bytes()).expect("an RFC 3339 _time");
            (time, field("namespace"), field("container"), field("_msg"))
        })
        .collect();
    got.sort();
    let mut want: Vec<(i64, String, String, String)> = entries_a
        .iter()
        .map(|e| {
            (
                e.timestamp,
                "shoot--p--a".into(),
                "kube-apiserver".into(),
                e.line.into(),
            )
        })
        .chain([(
            base + 7,
            "shoot--p--b".into(),
            "etcd".into(),
            lines_b[0].into(),
        )])
        .collect();
    want.sort();
    assert_eq!(got, want);
}
