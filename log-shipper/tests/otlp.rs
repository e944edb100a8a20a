//! OTLP delivery end to end: the [`Policy`] and [`Client`] of a `protocol: otlp` store against
//! a real VictoriaLogs (its OpenTelemetry endpoint, `/insert/opentelemetry/v1/logs`): the
//! lines of two namespaces read back with their Kubernetes resource attributes and their
//! original timestamps to the nanosecond, and a body it cannot decode answered 400. Against a
//! scripted server, what VictoriaLogs never answers: the request's head (plain protobuf, no
//! content encoding, no tenant), a 503 retried with the same body, and a 200 whose
//! `partial_success` refuses records, counted as rejected by their reason.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{now_nanos, Server};
use log_shipper::checkpoint::FileKey;
use log_shipper::config::{Delivery, OutagePolicy, Protocol};
use log_shipper::cri::parse_timestamp;
use log_shipper::deliver::{Ack, Full, Item, Outcome, Policy, RejectReason};
use log_shipper::push::{send_due, Answer, Client};
use log_shipper::route;
use log_shipper::tail::path::Container;
use log_shipper::tail::FileRef;

fn delivery(batch_bytes: usize) -> Delivery {
    Delivery {
        batch_bytes,
        batch_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        max_outage: Duration::from_secs(3600),
        outage_policy: OutagePolicy::Wait,
    }
}

/// An OTLP policy and client of `url`.
fn otlp(url: &str, batch_bytes: usize, seed: u64) -> (Policy, Client) {
    let policy = Policy::new(&delivery(batch_bytes), seed).with_protocol(
        Protocol::Otlp,
        Instant::now(),
        now_nanos(),
    );
    let client = Client::new(url, None, Duration::from_secs(5), None)
        .expect("client")
        .with_protocol(Protocol::Otlp);
    (policy, client)
}

/// Feeds every item (holding back while the policy is full) and drives until it is idle,
/// within 60 s; every outcome in order.
async fn ship(policy: &mut Policy, client: &mut Client, items: Vec<Item>) -> Vec<Outcome> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut outcomes = Vec::new();
    let mut items = items.into_iter();
    let mut next = items.next();
    loop {
        while let Some(item) = next.take() {
            match policy.push(item, Instant::now()) {
                Ok(()) => next = items.next(),
                Err(Full(back)) => {
                    next = Some(back);
                    break;
                }
            }
        }
        if next.is_none() && policy.is_idle() {
            return outcomes;
        }
        assert!(Instant::now() < deadline, "not delivered: {outcomes:?}");
        while let Some(done) = policy.poll_done(Instant::now()) {
            outcomes.push(Outcome::Accepted(done));
        }
        if let Some(outcome) = send_due(policy, client).await {
            outcomes.push(outcome);
            continue;
        }
        let now = Instant::now();
        let wake = policy
            .next_wakeup(now)
            .unwrap_or(now + Duration::from_millis(10))
            .min(now + Duration::from_millis(200));
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// A stored line: (time, namespace, pod, container, origin, line).
type Record = (i64, String, String, String, String, String);

/// `n` lines of each of two containers (a shoot's and a seed namespace's) with Gardener's
/// labels as the router makes them, timestamps of a minute ago with nanoseconds; in each
/// stream every pair of neighbours swapped, so a batch holds entries out of timestamp order.
fn two_namespaces(n: usize, tag: &str) -> (Vec<Item>, Vec<Record>) {
    let base = common::a_minute_ago(123_456_789);
    let mut streams = Vec::new();
    let mut want = Vec::new();
    for (s, (ns, pod, container)) in [
        ("shoot--p--a", "kube-apiserver-6d4f9", "kube-apiserver"),
        ("garden", "vali-0", "vali"),
    ]
    .into_iter()
    .enumerate()
    {
        let labels: std::sync::Arc<str> = route::labels(
            &Container {
                namespace: ns.into(),
                pod: pod.into(),
                uid: "uid".into(),
                container: container.into(),
            },
            Some("node-a"),
        )
        .into();
        let mut items = Vec::new();
        for i in 0..n {
            let j = i ^ 1;
            let timestamp = base + (j as i64) * 1_000_003 + s as i64;
            let line = format!("{tag} line {j} of {container} \"quoted\", ünïcödé");
            want.push((
                timestamp,
                ns.to_owned(),
                pod.to_owned(),
                container.to_owned(),
                "seed".to_owned(),
                line.clone(),
            ));
            items.push(Item {
                labels: labels.clone(),
                timestamp,
                line,
                ack: Some(Ack {
                    file: FileRef {
                        key: FileKey {
                            dev: 1,
                            ino: s as u64 + 1,
                        },
                        epoch: 0,
                    },
                    offset: i as u64 + 1,
                }),
            });
        }
        streams.push(items);
    }
    let b = streams.pop().expect("two");
    let a = streams.pop().expect("two");
    let items = a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
    want.sort();
    (items, want)
}

/// The records as [`Record`]s, sorted; every one's stream is its resource attributes.
fn records(found: &[serde_json::Value]) -> Vec<Record> {
    let mut got: Vec<_> = found
        .iter()
        .map(|v| {
            let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            let stream = field("_stream");
            for name in [
                "k8s.namespace.name",
                "k8s.pod.name",
                "k8s.container.name",
                "k8s.node.name",
                "origin",
            ] {
                assert!(
                    stream.contains(&format!("{name}=")),
                    "{name} is a stream field: {v}"
                );
            }
            assert_eq!(field("k8s.node.name"), "node-a", "{v}");
            let time = parse_timestamp(field("_time").as_bytes()).expect("an RFC 3339 _time");
            (
                time,
                field("k8s.namespace.name"),
                field("k8s.pod.name"),
                field("k8s.container.name"),
                field("origin"),
                field("_msg"),
            )
        })
        .collect();
    got.sort();
    got
}

#[tokio::test]
async fn two_namespaces_arrive_with_kubernetes_attributes_and_their_timestamps() {
    let Some(binary) = common::victoria_logs("two_namespaces_arrive_with_kubernetes_attributes")
    else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "otlp-two");
    let url = format!(
        "http://127.0.0.1:{}/insert/opentelemetry/v1/logs",
        server.port
    );
    let (mut policy, mut client) = otlp(&url, 4096, 1);
    let (items, want) = two_namespaces(200, "two");
    let outcomes = ship(&mut policy, &mut client, items).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Accepted(_))),
        "{outcomes:?}"
    );
    assert!(
        outcomes.len() >= 5,
        "batches of at most 4 KiB: {}",
        outcomes.len()
    );
    assert_eq!(policy.stats().accepted_entries, 400);
    assert_eq!(client.connects(), 1, "one connection, kept alive");
    let found = server.read_all(400);
    assert_eq!(found.len(), 400, "each line once");
    assert_eq!(
        records(&found),
        want,
        "every line, its attributes and its timestamp to the nanosecond"
    );
}

#[tokio::test]
async fn a_body_victoria_logs_cannot_decode_is_a_400() {
    let Some(binary) = common::victoria_logs("a_body_victoria_logs_cannot_decode_is_a_400") else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "otlp-400");
    let url = format!(
        "http://127.0.0.1:{}/insert/opentelemetry/v1/logs",
        server.port
    );
    let (_, mut client) = otlp(&url, 4096, 2);
    // A length past the end of the body.
    let answer = client.push(Bytes::from_static(b"\x0a\x7f\x0a")).await;
    let Answer::Status(400, text) = &answer else {
        panic!("{answer:?}")
    };
    assert!(text.contains("OpenTelemetry"), "{text}");
    assert_eq!(RejectReason::parse(text), RejectReason::Other);
}

#[tokio::test]
async fn the_request_head_a_503_retried_and_a_partial_success_counted() {
    // ExportLogsServiceResponse { partial_success { rejected_log_records: 3,
    // error_message: "timestamp too old" } }
    let partial = "\x0a\x15\x08\x03\x12\x11timestamp too old";
    let (port, requests) = common::scripted(vec![(503, "unavailable"), (200, partial), (200, "")]);
    let url = format!("http://127.0.0.1:{port}/v1/logs");
    let (mut policy, mut client) = otlp(&url, 1 << 20, 3);
    let (items, _) = two_namespaces(5, "scripted");
    let outcomes = ship(&mut policy, &mut client, items).await;
    let [Outcome::Retry { kind, .. }, Outcome::Rejected {
        reason,
        rejected,
        done,
    }] = &outcomes[..]
    else {
        panic!("{outcomes:?}")
    };
    assert_eq!(kind.as_str(), "server_error");
    assert_eq!(
        (*reason, *rejected, done.entries),
        (RejectReason::TooOld, 3, 10)
    );
    assert_eq!(done.acks.len(), 2, "the batch's checkpoints acknowledged");
    assert_eq!(policy.stats().accepted_entries, 7);
    assert_eq!(policy.stats().rejected_entries[&RejectReason::TooOld], 3);
    let got: Vec<(String, Vec<u8>)> = requests.try_iter().collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, got[1].1, "the same body again");
    let head = got[0].0.to_ascii_lowercase();
    assert!(head.starts_with("post /v1/logs http/1.1\r\n"), "{head}");
    assert!(
        head.contains("content-type: application/x-protobuf\r\n"),
        "{head}"
    );
    assert!(!head.contains("content-encoding"), "{head}");
    assert!(!head.contains("x-scope-orgid"), "{head}");
    // Plain protobuf: ExportLogsServiceRequest.resource_logs (field 1, length-delimited).
    assert_eq!(got[0].1[0], 0x0a);
    assert!(got[0]
        .1
        .windows(b"k8s.namespace.name".len())
        .any(|w| w == b"k8s.namespace.name"));
}
