//! Delivery end to end: the [`Policy`] and the push [`Client`] against a real VictoriaLogs
//! (its Loki endpoint): two streams read back exactly; a store that is down at first, retried
//! with backoff, gets everything once it is up; a 400 it answers is counted, not retried,
//! and when it stored part of the batch (partial acceptance) that part is not sent again. And
//! against a scripted HTTP server on loopback, what VictoriaLogs cannot be made to answer:
//! the request's head (path, content type, no content encoding, tenant), 429 and 503 retried
//! with the same body, a timeout.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{now_nanos, Server};
use log_shipper::checkpoint::FileKey;
use log_shipper::config::{Delivery, OutagePolicy};
use log_shipper::cri::parse_timestamp;
use log_shipper::deliver::{
    Ack, Full, Item, Outcome, Policy, RejectReason, RetryKind, TransportKind,
};
use log_shipper::loki;
use log_shipper::push::{send_due, Answer, Client};
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

fn file(ino: u64) -> FileRef {
    FileRef {
        key: FileKey { dev: 1, ino },
        epoch: 0,
    }
}

/// Drives the policy once: a finished checkpoint-only batch, or the due push, or a sleep
/// until the next wake-up (bounded). Returns the outcome, if any.
async fn step(policy: &mut Policy, client: &mut Client) -> Option<Outcome> {
    if let Some(done) = policy.poll_done(Instant::now()) {
        return Some(Outcome::Accepted(done));
    }
    if let Some(outcome) = send_due(policy, client).await {
        return Some(outcome);
    }
    let now = Instant::now();
    let wake = policy
        .next_wakeup(now)
        .unwrap_or(now + Duration::from_millis(10))
        .min(now + Duration::from_millis(200));
    tokio::time::sleep_until(wake.into()).await;
    None
}

/// Feeds every item (holding back while the policy is full) and drives until it is idle,
/// within 60 s; every outcome in order.
async fn ship(policy: &mut Policy, client: &mut Client, items: Vec<Item>) -> Vec<Outcome> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut outcomes = Vec::new();
    for mut item in items {
        while let Err(Full(back)) = policy.push(item, Instant::now()) {
            item = back;
            assert!(Instant::now() < deadline, "held back too long");
            outcomes.extend(step(policy, client).await);
        }
    }
    while !policy.is_idle() {
        assert!(Instant::now() < deadline, "not delivered: {outcomes:?}");
        outcomes.extend(step(policy, client).await);
    }
    outcomes
}

/// A stored line: (time, namespace, container, line).
type Record = (i64, String, String, String);

/// Two streams of `n` lines each, timestamps of a minute ago with nanoseconds; in each stream
/// every pair of neighbours is swapped, so a batch holds entries out of timestamp order.
fn two_streams(n: usize, tag: &str) -> (Vec<Item>, Vec<Record>) {
    let base = common::a_minute_ago(123_456_789);
    let mut items = Vec::new();
    let mut want = Vec::new();
    for (s, (ns, container)) in [("shoot--p--a", "kube-apiserver"), ("shoot--p--b", "etcd")]
        .into_iter()
        .enumerate()
    {
        let labels =
            loki::format_labels(&[("namespace", ns), ("container", container)]).expect("labels");
        for i in 0..n {
            let j = i ^ 1; // neighbours swapped
            let timestamp = base + (j as i64) * 1_000_003 + s as i64;
            let line = format!("{tag} line {j} of {container}, ünïcödé");
            want.push((timestamp, ns.to_owned(), container.to_owned(), line.clone()));
            items.push(Item {
                labels: labels.as_str().into(),
                timestamp,
                line,
                ack: Some(Ack {
                    file: file(s as u64 + 1),
                    offset: i as u64 + 1,
                }),
            });
        }
    }
    // Interleave the two streams as two files read side by side would.
    let (a, b) = items.split_at(n);
    let items = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect();
    want.sort();
    (items, want)
}

/// The records as (time, namespace, container, line), sorted.
fn records(found: &[serde_json::Value]) -> Vec<Record> {
    let mut got: Vec<_> = found
        .iter()
        .map(|v| {
            let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            let time = parse_timestamp(field("_time").as_bytes()).expect("an RFC 3339 _time");
            (time, field("namespace"), field("container"), field("_msg"))
        })
        .collect();
    got.sort();
    got
}

/// The last acknowledged offset per file.
fn acked(outcomes: &[Outcome]) -> HashMap<FileRef, u64> {
    let mut acks = HashMap::new();
    for o in outcomes {
        let done = match o {
            Outcome::Accepted(d) | Outcome::Skipped(d) => d,
            Outcome::Rejected { done, .. } => done,
            Outcome::Retry { .. } => continue,
        };
        for a in &done.acks {
            let last = acks.entry(a.file).or_insert(0);
            assert!(
                a.offset > *last,
                "acknowledgements of a file only move forward"
            );
            *last = a.offset;
        }
    }
    acks
}

#[tokio::test]
async fn two_streams_arrive_exactly() {
    let Some(binary) = common::victoria_logs("two_streams_arrive_exactly") else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "deliver-two");
    let url = format!("http://127.0.0.1:{}/insert/loki/api/v1/push", server.port);
    let mut client = Client::new(&url, None, Duration::from_secs(5), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 1);
    let (items, want) = two_streams(300, "two");
    let outcomes = ship(&mut policy, &mut client, items).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Accepted(_))),
        "{outcomes:?}"
    );
    assert!(
        outcomes.len() >= 10,
        "batches of at most 4 KiB: {}",
        outcomes.len()
    );
    assert_eq!(
        acked(&outcomes),
        HashMap::from([(file(1), 300), (file(2), 300)])
    );
    assert_eq!(policy.stats().accepted_entries, 600);
    assert_eq!(client.connects(), 1, "one connection, kept alive");
    let got = records(&server.read_all(600));
    assert_eq!(got.len(), 600);
    assert_eq!(
        got, want,
        "every line, its labels and its timestamp to the nanosecond"
    );
}

#[tokio::test]
async fn a_store_down_at_first_gets_everything_once_it_is_up() {
    let Some(binary) = common::victoria_logs("a_store_down_at_first_gets_everything_once_it_is_up")
    else {
        return;
    };
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}/insert/loki/api/v1/push");
    let mut client = Client::new(&url, None, Duration::from_secs(5), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 2);
    let (items, want) = two_streams(100, "late");
    let started = Instant::now();
    let mut outcomes = Vec::new();
    // Nothing listens: pushes fail to connect and are retried, backing off.
    let mut pending = items.into_iter();
    while policy.stats().retries.values().sum::<u64>() < 5 {
        assert!(started.elapsed() < Duration::from_secs(30));
        if let Some(item) = pending.next() {
            if let Err(Full(back)) = policy.push(item, Instant::now()) {
                pending = std::iter::once(back)
                    .chain(pending)
                    .collect::<Vec<_>>()
                    .into_iter();
            }
        }
        outcomes.extend(step(&mut policy, &mut client).await);
    }
    assert!(outcomes.iter().all(|o| matches!(
        o,
        Outcome::Retry {
            kind: RetryKind::Transport(TransportKind::Connect),
            ..
        }
    )));
    // 50, 100, 200, 400 ms ceilings, at least half of each and at least 50 ms: >= 400 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "backed off: {:?}",
        started.elapsed()
    );
    assert!(
        policy.stats().requests <= 6,
        "no retry storm: {:?}",
        policy.stats()
    );
    // The store comes up on that port: everything arrives.
    let server = Server::start(&binary, port, "deliver-late");
    outcomes.extend(ship(&mut policy, &mut client, pending.collect()).await);
    assert_eq!(
        acked(&outcomes),
        HashMap::from([(file(1), 100), (file(2), 100)])
    );
    let got = records(&server.read_all(200));
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_400_from_the_store_is_counted_not_retried() {
    let Some(binary) = common::victoria_logs("a_400_from_the_store_is_counted_not_retried") else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "deliver-400");
    let url = format!("http://127.0.0.1:{}/insert/loki/api/v1/push", server.port);
    let mut client = Client::new(&url, None, Duration::from_secs(5), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 3);
    // Labels that are not a selector (format_labels never writes this).
    let item = Item {
        labels: "{ab\"".into(),
        timestamp: now_nanos(),
        line: "refused".into(),
        ack: Some(Ack {
            file: file(9),
            offset: 42,
        }),
    };
    let outcomes = ship(&mut policy, &mut client, vec![item]).await;
    let [Outcome::Rejected { reason, done, .. }] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(
        *reason,
        RejectReason::Other,
        "VictoriaLogs' text is not Loki's"
    );
    assert_eq!(
        done.acks,
        vec![Ack {
            file: file(9),
            offset: 42
        }]
    );
    assert_eq!(policy.stats().requests, 1, "not retried");
    assert_eq!(
        policy.stats().rejected_entries.get(&RejectReason::Other),
        Some(&1)
    );
    // A body that is not raw Snappy is a 400 too, with VictoriaLogs' reason.
    let answer = client.push(bytes::Bytes::from_static(b"not snappy")).await;
    let Answer::Status(400, text) = &answer else {
        panic!("{answer:?}")
    };
    assert!(text.contains("snappy"), "{text}");
    assert_eq!(RejectReason::parse(text), RejectReason::Other);
}

#[tokio::test]
async fn a_400_with_partial_acceptance_is_not_resent() {
    let Some(binary) = common::victoria_logs("a_400_with_partial_acceptance_is_not_resent") else {
        return;
    };
    let server = Server::start(&binary, common::free_port(), "deliver-400-partial");
    let url = format!("http://127.0.0.1:{}/insert/loki/api/v1/push", server.port);
    let mut client = Client::new(&url, None, Duration::from_secs(5), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 6);
    let base = common::a_minute_ago(17);
    let item = |labels: &str, i: usize, offset: u64| Item {
        labels: labels.into(),
        timestamp: base + i as i64,
        line: format!("line {i}"),
        ack: Some(Ack {
            file: file(7),
            offset,
        }),
    };
    let stored_ns = |ns: &str| loki::format_labels(&[("namespace", ns)]).expect("labels");
    let (good, after) = (stored_ns("shoot--p--good"), stored_ns("shoot--p--after"));
    // One batch of three streams in this order: VictoriaLogs decodes and stores stream by
    // stream, so the first is stored, the second's labels are refused with a 400, and the
    // third is not read (Loki would store it: either way a partial acceptance).
    let mut items: Vec<Item> = (0..5).map(|i| item(&good, i, i as u64 + 1)).collect();
    items.push(item("{ab\"", 5, 6));
    items.extend((6..10).map(|i| item(&after, i, i as u64 + 1)));
    let outcomes = ship(&mut policy, &mut client, items).await;
    let [Outcome::Rejected { done, .. }] = &outcomes[..] else {
        panic!("one batch, rejected: {outcomes:?}")
    };
    assert_eq!(done.acks.last().map(|a| a.offset), Some(10), "acknowledged");
    assert_eq!(policy.stats().requests, 1, "not retried");
    // The policy moves on: the next batch is accepted.
    let outcomes = ship(
        &mut policy,
        &mut client,
        (10..15).map(|i| item(&good, i, i as u64 + 1)).collect(),
    )
    .await;
    assert!(
        matches!(&outcomes[..], [Outcome::Accepted(_)]),
        "{outcomes:?}"
    );
    let want: Vec<Record> = (0..5)
        .chain(10..15)
        .map(|i| {
            (
                base + i as i64,
                "shoot--p--good".to_owned(),
                String::new(),
                format!("line {i}"),
            )
        })
        .collect();
    let got = records(&server.read_all(want.len()));
    assert_eq!(
        got, want,
        "what the store accepted of the refused batch, once, and the next batch"
    );
}

#[tokio::test]
async fn the_request_head_and_429_and_503_retried_with_the_same_body() {
    let (port, requests) = common::scripted(vec![
        (429, "Ingestion rate limit exceeded for user x"),
        (503, "circuit breaker open"),
        (204, ""),
    ]);
    let url = format!("http://127.0.0.1:{port}/vali/api/v1/push");
    let mut client =
        Client::new(&url, Some("shoot--p--a"), Duration::from_secs(5), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 4);
    let (items, _) = two_streams(5, "scripted");
    let outcomes = ship(&mut policy, &mut client, items).await;
    let kinds: Vec<_> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Retry { kind, .. } => kind.as_str(),
            Outcome::Accepted(_) => "accepted",
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["rate_limited", "server_error", "accepted"]);
    assert_eq!(
        client.connects(),
        3,
        "a kept connection the server closed is replaced before it is used"
    );
    let got: Vec<(String, Vec<u8>)> = requests.try_iter().collect();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|(_, body)| *body == got[0].1),
        "the same body each time"
    );
    let head = got[0].0.to_ascii_lowercase();
    assert!(
        head.starts_with("post /vali/api/v1/push http/1.1\r\n"),
        "{head}"
    );
    for header in [
        "content-type: application/x-protobuf\r\n",
        "x-scope-orgid: shoot--p--a\r\n",
        &format!("host: 127.0.0.1:{port}\r\n"),
    ] {
        assert!(head.contains(header), "{header} missing from {head}");
    }
    assert!(!head.contains("content-encoding"), "{head}");
    // The body is raw Snappy of the protobuf (it decompresses as a block).
    snap::raw::Decoder::new()
        .decompress_vec(&got[0].1)
        .expect("raw snappy");
}

#[tokio::test]
async fn a_store_that_does_not_answer_times_out() {
    let (port, _requests) = common::scripted(vec![(0, "")]);
    let url = format!("http://127.0.0.1:{port}/loki/api/v1/push");
    let mut client = Client::new(&url, None, Duration::from_millis(300), None).expect("client");
    let mut policy = Policy::new(&delivery(4096), 5);
    let (items, _) = two_streams(1, "timeout");
    for item in items {
        policy.push(item, Instant::now()).expect("room");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let outcome = send_due(&mut policy, &mut client).await.expect("a push");
    assert!(
        matches!(
            outcome,
            Outcome::Retry {
                kind: RetryKind::Transport(TransportKind::Timeout),
                ..
            }
        ),
        "{outcome:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn https_with_a_ca_from_agentkit_tls_keeps_its_connection() {
    let pki = agentkit::testing::Pki::new().expect("a CA");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deliver-tls-{}", std::process::id()));
    let ca = pki.write_ca(&dir).expect("ca.pem");
    let acceptor =
        tokio_rustls::TlsAcceptor::from(pki.server_config(&["localhost"]).expect("server"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(tcp).await.expect("handshake");
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let tx = tx.clone();
            async move {
                let tenant = request.headers().get("x-scope-orgid").cloned();
                let body = http_body_util::BodyExt::collect(request.into_body())
                    .await?
                    .to_bytes();
                let _ = tx.send((tenant, body.len()));
                let mut response =
                    hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                *response.status_mut() = hyper::StatusCode::NO_CONTENT;
                Ok::<_, hyper::Error>(response)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .await;
    });
    let tls = agentkit::tls::client_config(&ca).expect("client config");
    let url = format!("https://localhost:{port}/loki/api/v1/push");
    let mut client =
        Client::new(&url, Some("garden"), Duration::from_secs(5), Some(tls)).expect("client");
    let mut policy = Policy::new(&delivery(512), 6);
    let (items, _) = two_streams(10, "tls");
    let outcomes = ship(&mut policy, &mut client, items).await;
    assert!(outcomes.len() >= 2, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Accepted(_))),
        "{outcomes:?}"
    );
    assert_eq!(client.connects(), 1, "one TLS connection for every push");
    for _ in 0..outcomes.len() {
        let (tenant, len) = rx.recv().await.expect("a request");
        assert_eq!(
            tenant.as_ref().and_then(|t| t.to_str().ok()),
            Some("garden")
        );
        assert!(len > 0);
    }
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    // Without a TLS config an https store is refused up front.
    assert!(Client::new(&url, None, Duration::from_secs(5), None).is_err());
}
