//! The agent end to end, in-process, against a real VictoriaLogs: a pod log root with two
//! shoot namespaces and one other, every line arrives in its own store (the store's URL tells
//! them apart: VictoriaLogs' `extra_fields` query argument adds a `store` field, `{namespace}`
//! filled in for shoots) with Gardener's labels and its original timestamp; a dead shoot store
//! does not hold up the seed's, and after a restart with that store up its lines arrive while
//! the seed's are not sent again.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use common::{now_nanos, rfc3339, Server};
use log_shipper::cri::parse_timestamp;
use log_shipper::run::{start, Agent};
use log_shipper::Config;

const SHOOT_A: &str = "shoot--core--one";
const SHOOT_B: &str = "shoot--dev--two";
const SEED_NS: &str = "garden";

struct Dirs {
    root: PathBuf,
    logs: PathBuf,
    checkpoints: PathBuf,
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn dirs(name: &str) -> Dirs {
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let d = Dirs {
        logs: root.join("pods"),
        checkpoints: root.join("checkpoints"),
        root,
    };
    fs::create_dir_all(&d.logs).expect("log root");
    d
}

/// The pod and container of each namespace.
fn pod(ns: &str) -> (&'static str, &'static str) {
    match ns {
        SHOOT_A => ("kube-apiserver-6d4f9", "kube-apiserver"),
        SHOOT_B => ("etcd-main-0", "etcd"),
        _ => ("vali-0", "vali"),
    }
}

/// Appends `n` CRI lines to the container's `0.log` (a partial line joined into one entry
/// each fifth line, stderr every third); returns (timestamp, line) of each entry.
fn write_lines(logs: &Path, ns: &str, tag: &str, n: usize, base: i64) -> Vec<(i64, String)> {
    let (pod, container) = pod(ns);
    let dir = logs.join(format!("{ns}_{pod}_uid-{pod}")).join(container);
    fs::create_dir_all(&dir).expect("container dir");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("0.log"))
        .expect("log file");
    let mut want = Vec::new();
    let mut text = String::new();
    for i in 0..n {
        let ts = base + i as i64 * 1_000_003;
        let stream = if i % 3 == 0 { "stderr" } else { "stdout" };
        let line = format!("{tag} {ns} line {i} \"quoted\" ünïcödé");
        if i % 5 == 0 {
            let (a, b) = line.split_at(4);
            text.push_str(&format!("{} {stream} P {a}\n", rfc3339(ts)));
            text.push_str(&format!("{} {stream} F {b}\n", rfc3339(ts + 1)));
        } else {
            text.push_str(&format!("{} {stream} F {line}\n", rfc3339(ts)));
        }
        want.push((ts, line));
    }
    file.write_all(text.as_bytes()).expect("write");
    want
}

fn config(d: &Dirs, seed_port: u16, shoot_port: u16) -> Config {
    let yaml = format!(
        r#"
admin: {{address: "127.0.0.1:0"}}
input:
  path: {logs}
  checkpoint_dir: {checkpoints}
  rescan_interval: 100ms
stores:
  seed:  {{url: "http://127.0.0.1:{seed_port}/insert/loki/api/v1/push?extra_fields=store=seed", protocol: loki}}
  shoot: {{url: "http://127.0.0.1:{shoot_port}/insert/loki/api/v1/push?extra_fields=store={{namespace}}", protocol: loki}}
delivery:
  batch_wait: 100ms
  min_backoff: 50ms
  max_backoff: 200ms
  request_timeout: 2s
"#,
        logs = d.logs.display(),
        checkpoints = d.checkpoints.display(),
    );
    Config::from_yaml(&yaml).expect("the test config is valid")
}

/// A stored record: (store, namespace_name, pod_name, container_name, origin, time, line).
type Stored = (String, String, String, String, String, i64, String);

fn stored(found: &[serde_json::Value]) -> BTreeSet<Stored> {
    found
        .iter()
        .map(|v| {
            let f = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            (
                f("store"),
                f("namespace_name"),
                f("pod_name"),
                f("container_name"),
                f("origin"),
                parse_timestamp(f("_time").as_bytes()).expect("an RFC 3339 _time"),
                f("_msg"),
            )
        })
        .collect()
}

fn expect(ns: &str, store: &str, lines: &[(i64, String)]) -> BTreeSet<Stored> {
    let (pod, container) = pod(ns);
    lines
        .iter()
        .map(|(ts, line)| {
            (
                store.to_owned(),
                ns.to_owned(),
                pod.to_owned(),
                container.to_owned(),
                "seed".to_owned(),
                *ts,
                line.clone(),
            )
        })
        .collect()
}

fn metrics(agent: &Agent) -> String {
    let (status, body) = common::http(agent.admin_addr().port(), "GET", "/metrics", "", b"");
    assert_eq!(status, 200);
    String::from_utf8(body).expect("utf-8 metrics")
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn stop(agent: Agent, shutdown: &Shutdown, grace: Duration) -> Duration {
    let began = Instant::now();
    shutdown.stop_accepting();
    tokio::time::timeout(Duration::from_secs(30), agent.wait(grace))
        .await
        .expect("the agent stops")
        .expect("a clean stop");
    began.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_reaches_its_own_store_with_labels_and_timestamps() {
    let Some(binary) = common::victoria_logs("every_line_reaches_its_own_store") else {
        return;
    };
    let vlogs = Server::start(&binary, common::free_port(), "agent-routing");
    let d = dirs("routing");
    let base = now_nanos() - 60_000_000_000 - now_nanos() % 1_000_000_000 + 123_456_789;
    let mut want = BTreeSet::new();
    for (k, ns) in [SHOOT_A, SHOOT_B, SEED_NS].into_iter().enumerate() {
        let store = if ns == SEED_NS { "seed" } else { ns };
        let lines = write_lines(&d.logs, ns, "before", 40, base + k as i64);
        want.extend(expect(ns, store, &lines));
    }
    let shutdown = Shutdown::new();
    let agent = start(config(&d, vlogs.port, vlogs.port), shutdown.clone())
        .await
        .expect("the agent starts");
    let (status, _) = common::http(agent.admin_addr().port(), "GET", "/readyz", "", b"");
    assert_eq!(status, 200);
    // Lines written while it runs arrive too.
    for (k, ns) in [SHOOT_A, SHOOT_B, SEED_NS].into_iter().enumerate() {
        let store = if ns == SEED_NS { "seed" } else { ns };
        let lines = write_lines(&d.logs, ns, "after", 25, base + 1_000_000_000 + k as i64);
        want.extend(expect(ns, store, &lines));
    }
    let found = tokio::task::spawn_blocking({
        let n = want.len();
        move || {
            let got = vlogs.read_all(n);
            (vlogs, got)
        }
    })
    .await
    .expect("read");
    let (vlogs, found) = found;
    assert_eq!(found.len(), want.len(), "each line once");
    assert_eq!(stored(&found), want);

    // The counters, as an operator sees them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(&agent);
        let seed = metric(&text, "log_shipper_entries_accepted_total{store=\"seed\"}");
        let shoot = metric(&text, "log_shipper_entries_accepted_total{store=\"shoot\"}");
        if seed == 65 && shoot == 130 {
            assert_eq!(metric(&text, "log_shipper_stores{store=\"shoot\"}"), 2);
            assert_eq!(
                metric(&text, "log_shipper_entries_routed_total{store=\"seed\"}"),
                65
            );
            assert!(metric(&text, "log_shipper_read_bytes_total") > 0);
            assert!(metric(&text, "log_shipper_files_opened_total") >= 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged counts: {seed} {shoot}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stop(agent, &shutdown, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(5),
        "idle stores stop at once: {took:?}"
    );
    drop(vlogs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shoot_store_does_not_stall_the_seed_and_resumes_after_a_restart() {
    let Some(binary) = common::victoria_logs("a_dead_shoot_store_does_not_stall_the_seed") else {
        return;
    };
    let seed_store = Server::start(&binary, common::free_port(), "agent-seed");
    let dead_port = common::free_port(); // nothing listens there yet
    let d = dirs("dead-shoot");
    let base = now_nanos() - 60_000_000_000 - now_nanos() % 1_000_000_000 + 7;
    let shoot_lines = write_lines(&d.logs, SHOOT_A, "early", 30, base);
    let seed_early = write_lines(&d.logs, SEED_NS, "early", 30, base + 1);

    let shutdown = Shutdown::new();
    let agent = start(config(&d, seed_store.port, dead_port), shutdown.clone())
        .await
        .expect("the agent starts");
    // Seed lines written while the shoot store is down arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seed_late = write_lines(&d.logs, SEED_NS, "late", 20, base + 2_000_000_000);
    let mut want = expect(SEED_NS, "seed", &seed_early);
    want.extend(expect(SEED_NS, "seed", &seed_late));
    let (seed_store, found) = tokio::task::spawn_blocking({
        let n = want.len();
        move || {
            let got = seed_store.read_all(n);
            (seed_store, got)
        }
    })
    .await
    .expect("read");
    assert_eq!(
        stored(&found),
        want,
        "the seed's lines, while the shoot store is dead"
    );
    let text = metrics(&agent);
    assert!(
        metric(
            &text,
            "log_shipper_retries_total{kind=\"connect\",store=\"shoot\"}"
        ) > 0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "log_shipper_entries_accepted_total{store=\"shoot\"}"),
        0
    );

    // SIGTERM: the dead store holds the stop up to the grace, no longer.
    let grace = Duration::from_millis(500);
    let took = stop(agent, &shutdown, grace).await;
    assert!(
        took >= grace && took < grace + Duration::from_secs(5),
        "{took:?}"
    );

    // The shoot store comes up; a restarted agent sends the shoot's lines from the persisted
    // checkpoint, and not the seed's again.
    let shoot_store = Server::start(&binary, dead_port, "agent-shoot");
    let shutdown = Shutdown::new();
    let agent = start(config(&d, seed_store.port, dead_port), shutdown.clone())
        .await
        .expect("the agent starts again");
    let want_shoot = expect(SHOOT_A, SHOOT_A, &shoot_lines);
    let (shoot_store, found) = tokio::task::spawn_blocking({
        let n = want_shoot.len();
        move || {
            let got = shoot_store.read_all(n);
            (shoot_store, got)
        }
    })
    .await
    .expect("read");
    assert_eq!(stored(&found), want_shoot);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics(&agent);
    assert_eq!(
        metric(&text, "log_shipper_entries_routed_total{store=\"seed\"}"),
        0,
        "{text}"
    );
    assert!(
        metric(&text, "log_shipper_files_resumed_total") >= 1,
        "{text}"
    );
    let (seed_store, got) = tokio::task::spawn_blocking({
        let n = want.len();
        move || {
            let got = seed_store.read_all(n);
            (seed_store, got)
        }
    })
    .await
    .expect("read");
    assert_eq!(got.len(), want.len(), "the seed's lines once");
    assert_eq!(stored(&got), want);
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    drop((seed_store, shoot_store));
}
