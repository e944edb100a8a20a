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
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use common::{rfc3339, Server};
use log_shipper::cri::parse_timestamp;
use log_shipper::run::{start, Agent};
use log_shipper::Config;

const SHOOT_A: &str = "shoot--core--one";
const SHOOT_B: &str = "shoot--dev--two";
const SEED_NS: &str = "garden";

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

fn config(d: &common::Dirs, seed_port: u16, shoot_port: u16) -> Config {
    config_with(d, seed_port, shoot_port, "loki", "")
}

/// The config with the shoot store of `protocol` (`loki` or `otlp`, VictoriaLogs' endpoint of
/// each; the seed's is Loki) and `extra` YAML appended.
fn config_with(
    d: &common::Dirs,
    seed_port: u16,
    shoot_port: u16,
    protocol: &str,
    extra: &str,
) -> Config {
    let shoot_path = match protocol {
        "otlp" => "insert/opentelemetry/v1/logs",
        _ => "insert/loki/api/v1/push",
    };
    let yaml = format!(
        r#"
admin: {{address: "127.0.0.1:0"}}
input:
  path: {logs}
  checkpoint_dir: {checkpoints}
  rescan_interval: 100ms
stores:
  seed:  {{url: "http://127.0.0.1:{seed_port}/insert/loki/api/v1/push?extra_fields=store=seed", protocol: loki}}
  shoot: {{url: "http://127.0.0.1:{shoot_port}/{shoot_path}?extra_fields=store={{namespace}}", protocol: {protocol}}}
delivery:
  batch_wait: 100ms
  min_backoff: 50ms
  max_backoff: 200ms
  request_timeout: 2s
{extra}"#,
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

/// Stored records of an OTLP store as [`Stored`]: the Kubernetes resource attributes in the
/// place of Gardener's labels, none of which is there.
fn stored_otlp(found: &[serde_json::Value]) -> BTreeSet<Stored> {
    found
        .iter()
        .map(|v| {
            let f = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            assert!(v.get("namespace_name").is_none(), "{v}");
            (
                f("store"),
                f("k8s.namespace.name"),
                f("k8s.pod.name"),
                f("k8s.container.name"),
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
    let vlogs = Arc::new(Server::start(&binary, common::free_port(), "agent-routing"));
    let d = common::dirs("agent", "routing");
    let base = common::a_minute_ago(123_456_789);
    let mut want = BTreeSet::new();
    for (k, ns) in [SHOOT_A, SHOOT_B, SEED_NS].into_iter().enumerate() {
        let store = if ns == SEED_NS { "seed" } else { ns };
        let lines = write_lines(&d.logs, ns, "before", 40, base + k as i64);
        want.extend(expect(ns, store, &lines));
    }
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let mut config = config(&d, vlogs.port, vlogs.port);
    config.input.node_name = Some("node-a".into());
    let agent = start(config, shutdown.clone())
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
    let found = read_all(&vlogs, want.len()).await;
    assert_eq!(found.len(), want.len(), "each line once");
    assert_eq!(stored(&found), want);
    for record in &found {
        assert_eq!(record["nodename"], "node-a", "{record}");
    }

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
    let seed_store = Arc::new(Server::start(&binary, common::free_port(), "agent-seed"));
    let dead_port = common::free_port(); // nothing listens there yet
    let d = common::dirs("agent", "dead-shoot");
    let base = common::a_minute_ago(7);
    let shoot_lines = write_lines(&d.logs, SHOOT_A, "early", 30, base);
    let seed_early = write_lines(&d.logs, SEED_NS, "early", 30, base + 1);

    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(config(&d, seed_store.port, dead_port), shutdown.clone())
        .await
        .expect("the agent starts");
    // Seed lines written while the shoot store is down arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seed_late = write_lines(&d.logs, SEED_NS, "late", 20, base + 2_000_000_000);
    let mut want = expect(SEED_NS, "seed", &seed_early);
    want.extend(expect(SEED_NS, "seed", &seed_late));
    let found = read_all(&seed_store, want.len()).await;
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
    let shoot_store = Arc::new(Server::start(&binary, dead_port, "agent-shoot"));
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(config(&d, seed_store.port, dead_port), shutdown.clone())
        .await
        .expect("the agent starts again");
    let want_shoot = expect(SHOOT_A, SHOOT_A, &shoot_lines);
    let found = read_all(&shoot_store, want_shoot.len()).await;
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
    let got = read_all(&seed_store, want.len()).await;
    assert_eq!(got.len(), want.len(), "the seed's lines once");
    assert_eq!(stored(&got), want);
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    drop((seed_store, shoot_store));
}

/// The `Cluster` resource as Gardener's extension library defines it (cluster-scoped, the
/// shoot embedded in `spec.shoot`), with the schema trimmed to what routing reads.
const CLUSTER_CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
  "metadata": {"name": "clusters.extensions.gardener.cloud"},
  "spec": {
    "group": "extensions.gardener.cloud", "scope": "Cluster",
    "names": {"kind": "Cluster", "listKind": "ClusterList", "plural": "clusters", "singular": "cluster"},
    "versions": [{"name": "v1alpha1", "served": true, "storage": true,
      "schema": {"openAPIV3Schema": {"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
          "cloudProfile": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
          "seed": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
          "shoot": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}}}]
  }
}"#;

const CLUSTERS: &str = "/apis/extensions.gardener.cloud/v1alpha1/clusters";

/// A `Cluster` named `ns` whose shoot is in `shoot`'s state; `finalizer` keeps it while it is
/// being deleted.
fn cluster(ns: &str, shoot: serde_json::Value, finalizer: bool) -> String {
    let finalizers: Vec<&str> = if finalizer {
        vec!["test.gardener.cloud/keep"]
    } else {
        vec![]
    };
    serde_json::json!({
        "apiVersion": "extensions.gardener.cloud/v1alpha1", "kind": "Cluster",
        "metadata": {"name": ns, "finalizers": finalizers},
        "spec": {"cloudProfile": {}, "seed": {}, "shoot": shoot},
    })
    .to_string()
}

fn reconciled() -> serde_json::Value {
    serde_json::json!({"status": {"lastOperation": {"type": "Reconcile", "state": "Succeeded"}}})
}

/// The test config with the seed store on `seed_port` named `name` (its `store` field).
fn renamed_seed(
    d: &common::Dirs,
    admin: std::net::SocketAddr,
    seed_port: u16,
    shoot_port: u16,
    name: &str,
) -> Config {
    Config::from_yaml(&format!(
        "admin: {{address: \"{admin}\"}}\ninput: {{path: {logs}, checkpoint_dir: {ck}, rescan_interval: 100ms}}\n\
         stores:\n  seed: {{url: \"http://127.0.0.1:{seed_port}/insert/loki/api/v1/push?extra_fields=store={name}\", protocol: loki}}\n  \
         shoot: {{url: \"http://127.0.0.1:{shoot_port}/insert/loki/api/v1/push?extra_fields=store={{namespace}}\", protocol: loki}}\n\
         delivery: {{batch_wait: 100ms, min_backoff: 50ms, max_backoff: 200ms, request_timeout: 2s}}\n",
        logs = d.logs.display(),
        ck = d.checkpoints.display(),
    ))
    .expect("valid")
}

/// Forces the agent's shutdown when a test ends, also by a failed assertion: the tailer runs
/// on the blocking pool until told to stop, and the runtime waits for it when it is dropped,
/// so a failing test would otherwise hang instead of failing.
struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.force_close();
    }
}

/// [`Server::read_all`] off the runtime's workers.
async fn read_all(store: &Arc<Server>, want: usize) -> Vec<serde_json::Value> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.read_all(want))
        .await
        .expect("read")
}

/// Waits until the agent's `series` reads `want`.
async fn metric_reaches(agent: &Agent, series: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics(agent);
        if metric(&text, series) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never {want}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lifecycle_state_routes_as_gardener_does() {
    const NEW: &str = "shoot--core--new";
    const GONE: &str = "shoot--core--gone";
    const TESTING: &str = "shoot--core--test";
    let Some(binary) = common::victoria_logs("each_lifecycle_state_routes") else {
        return;
    };
    let Some(control) =
        tokio::task::spawn_blocking(|| agentkit::testing::kube::ControlPlane::shared("lifecycle"))
            .await
            .expect("start")
    else {
        return;
    };
    let (status, body) = control
        .request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            Some(CLUSTER_CRD),
        )
        .await
        .expect("create the CRD");
    assert!(status == 201 || status == 409, "{status} {body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while control
        .request("GET", CLUSTERS, None)
        .await
        .expect("list")
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "the Cluster CRD is never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SHOOT_A ready (kept by a finalizer for its deletion later), SHOOT_B hibernated, NEW in
    // creation, TESTING a ready shoot of purpose testing; GONE has no Cluster (its shoot was
    // deleted).
    let hibernated = serde_json::json!({
        "spec": {"hibernation": {"enabled": true}},
        "status": {"isHibernated": true, "lastOperation": {"type": "Reconcile", "state": "Succeeded"}},
    });
    let creating =
        serde_json::json!({"status": {"lastOperation": {"type": "Create", "state": "Processing"}}});
    for (ns, shoot, keep) in [
        (SHOOT_A, reconciled(), true),
        (SHOOT_B, hibernated, false),
        (NEW, creating, false),
        (
            TESTING,
            {
                let mut shoot = reconciled();
                shoot["spec"] = serde_json::json!({"purpose": "testing"});
                shoot
            },
            false,
        ),
    ] {
        let (status, body) = control
            .request("POST", CLUSTERS, Some(&cluster(ns, shoot, keep)))
            .await
            .expect("create a Cluster");
        assert_eq!(status, 201, "{body}");
    }

    let vlogs = Arc::new(Server::start(
        &binary,
        common::free_port(),
        "agent-lifecycle",
    ));
    let d = common::dirs("agent", "lifecycle");
    let base = common::a_minute_ago(987_654_321);
    let mut want = BTreeSet::new();
    let lines = |ns: &str, tag: &str, n: usize, k: i64| write_lines(&d.logs, ns, tag, n, base + k);
    let a = lines(SHOOT_A, "ready", 10, 0);
    want.extend(expect(SHOOT_A, SHOOT_A, &a));
    let b = lines(SHOOT_B, "asleep", 7, 1);
    let n = lines(NEW, "creating", 5, 2);
    want.extend(expect(NEW, NEW, &n));
    want.extend(expect(NEW, "seed", &n));
    let t = lines(TESTING, "testing", 6, 5);
    let g = lines(GONE, "orphan", 4, 3);
    want.extend(expect(GONE, "seed", &g));
    let s = lines(SEED_NS, "seed", 3, 4);
    want.extend(expect(SEED_NS, "seed", &s));

    let extra = format!(
        "kubernetes: {{kubeconfig: {}}}\n",
        control.kubeconfig().display()
    );
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(
        config_with(&d, vlogs.port, vlogs.port, "loki", &extra),
        shutdown.clone(),
    )
    .await
    .expect("the agent starts");
    let read = |n: usize| read_all(&vlogs, n);
    let found = read(want.len()).await;
    assert_eq!(stored(&found), want, "routing by state");
    metric_reaches(
        &agent,
        "log_shipper_entries_muted_total",
        (b.len() + t.len()) as u64,
    )
    .await;
    metric_reaches(&agent, "log_shipper_clusters{state=\"hibernated\"}", 1).await;
    metric_reaches(&agent, "log_shipper_clusters{state=\"testing\"}", 1).await;
    metric_reaches(&agent, "log_shipper_clusters{state=\"creation\"}", 1).await;

    // SHOOT_A is being deleted: from now on its lines go to both stores.
    let (status, body) = control
        .request("DELETE", &format!("{CLUSTERS}/{SHOOT_A}"), None)
        .await
        .expect("delete");
    assert_eq!(status, 200, "{body}");
    metric_reaches(&agent, "log_shipper_clusters{state=\"deletion\"}", 1).await;
    let a2 = write_lines(&d.logs, SHOOT_A, "deleting", 6, base + 1_000_000_000);
    want.extend(expect(SHOOT_A, SHOOT_A, &a2));
    want.extend(expect(SHOOT_A, "seed", &a2));
    let found = read(want.len()).await;
    assert_eq!(stored(&found), want, "a state change reaches running files");
    assert_eq!(found.len(), want.len(), "each line once per store");
    // The hibernated and testing shoots' lines were acknowledged without being sent: nothing
    // is read again after a restart.
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(
        config_with(&d, vlogs.port, vlogs.port, "loki", &extra),
        shutdown.clone(),
    )
    .await
    .expect("the agent restarts");
    metric_reaches(&agent, "log_shipper_clusters{state=\"deletion\"}", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&metrics(&agent), "log_shipper_entries_muted_total"),
        0
    );
    assert_eq!(
        read(want.len()).await.len(),
        want.len(),
        "nothing sent twice"
    );
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    // Let the finalizer go so the Cluster does not outlive the test.
    let (status, body) = control
        .request(
            "PUT",
            &format!("{CLUSTERS}/{SHOOT_A}"),
            Some(&{
                let (_, current) = control
                    .request("GET", &format!("{CLUSTERS}/{SHOOT_A}"), None)
                    .await
                    .expect("get");
                let mut object: serde_json::Value = serde_json::from_str(&current).expect("json");
                object["metadata"]["finalizers"] = serde_json::json!([]);
                object.to_string()
            }),
        )
        .await
        .expect("drop the finalizer");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_new_lines_to_the_new_store_and_refuses_input_changes() {
    let Some(binary) = common::victoria_logs("a_reload_moves_new_lines") else {
        return;
    };
    let vlogs = Arc::new(Server::start(&binary, common::free_port(), "agent-reload"));
    let d = common::dirs("agent", "reload");
    let base = common::a_minute_ago(55_555_555);
    let before = write_lines(&d.logs, SEED_NS, "before", 12, base);
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(config(&d, vlogs.port, vlogs.port), shutdown.clone())
        .await
        .expect("the agent starts");
    let read = |n: usize| read_all(&vlogs, n);
    let mut want = expect(SEED_NS, "seed", &before);
    assert_eq!(stored(&read(want.len()).await), want);

    let reloaded = config(&d, vlogs.port, vlogs.port);
    let mut yaml_moved = config(&d, vlogs.port, vlogs.port);
    yaml_moved.input.path = d.root.join("elsewhere");
    assert_eq!(
        agent.reloader().reload(yaml_moved),
        Err("input changed: it needs a restart".to_owned())
    );
    let renamed = renamed_seed(&d, reloaded.admin, vlogs.port, vlogs.port, "seed-v2");
    agent
        .reloader()
        .reload(renamed)
        .expect("stores and delivery reload");
    // The old store holds nothing: it ends, and the next lines start the new one.
    metric_reaches(&agent, "log_shipper_stores_retired_total", 1).await;
    let after = write_lines(&d.logs, SEED_NS, "after", 9, base + 1_000_000_000);
    want.extend(expect(SEED_NS, "seed-v2", &after));
    let found = read(want.len()).await;
    assert_eq!(stored(&found), want);
    assert_eq!(found.len(), want.len(), "nothing sent twice");
    stop(agent, &shutdown, Duration::from_secs(5)).await;
}

/// A reload while the old store cannot deliver: the new store's task waits until the old one
/// delivered what it held, so that one store never has two tasks acknowledging a file's lines
/// out of order (a checkpoint would pass lines only the old task holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_store_starts_after_the_old_one_delivered_what_it_held() {
    let Some(binary) = common::victoria_logs("a_reloaded_store_starts_after") else {
        return;
    };
    let new_store = Arc::new(Server::start(
        &binary,
        common::free_port(),
        "agent-reload-new",
    ));
    let old_port = common::free_port();
    let d = common::dirs("agent", "reload-order");
    let base = common::a_minute_ago(77_777_777);
    let held = write_lines(&d.logs, SEED_NS, "held", 8, base);
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(config(&d, old_port, new_store.port), shutdown.clone())
        .await
        .expect("the agent starts");
    // The old store is down: its task holds the lines and retries.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let admin = config(&d, old_port, new_store.port).admin;
    agent
        .reloader()
        .reload(renamed_seed(
            &d,
            admin,
            new_store.port,
            new_store.port,
            "seed-v2",
        ))
        .expect("reload");
    metric_reaches(&agent, "log_shipper_stores_retired_total", 1).await;
    let later = write_lines(&d.logs, SEED_NS, "later", 6, base + 1_000_000_000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        read_all(&new_store, 0).await.len(),
        0,
        "the new task waits for the old one"
    );
    // The old store comes up: it gets what its task held, then the new one the rest.
    let old_store = Arc::new(Server::start(&binary, old_port, "agent-reload-old"));
    let want_old = expect(SEED_NS, "seed", &held);
    assert_eq!(
        stored(&read_all(&old_store, want_old.len()).await),
        want_old
    );
    let want_new = expect(SEED_NS, "seed-v2", &later);
    let found = read_all(&new_store, want_new.len()).await;
    assert_eq!(stored(&found), want_new);
    assert_eq!(found.len(), want_new.len(), "each line once");
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    drop((old_store, new_store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoot_stores_of_protocol_otlp_get_their_lines_with_kubernetes_attributes() {
    let Some(binary) = common::victoria_logs("shoot_stores_of_protocol_otlp") else {
        return;
    };
    let seed_store = Arc::new(Server::start(
        &binary,
        common::free_port(),
        "agent-otlp-seed",
    ));
    let shoot_store = Arc::new(Server::start(
        &binary,
        common::free_port(),
        "agent-otlp-shoot",
    ));
    let d = common::dirs("agent", "otlp");
    let base = common::a_minute_ago(987_654_321);
    let mut want_shoot = BTreeSet::new();
    let mut want_seed = BTreeSet::new();
    for (k, ns) in [SHOOT_A, SHOOT_B, SEED_NS].into_iter().enumerate() {
        let lines = write_lines(&d.logs, ns, "otlp", 30, base + k as i64);
        if ns == SEED_NS {
            want_seed.extend(expect(ns, "seed", &lines));
        } else {
            want_shoot.extend(expect(ns, ns, &lines));
        }
    }
    let shutdown = Shutdown::new();
    let _stop = StopOnDrop(shutdown.clone());
    let agent = start(
        config_with(&d, seed_store.port, shoot_store.port, "otlp", ""),
        shutdown.clone(),
    )
    .await
    .expect("the agent starts");
    let found = read_all(&shoot_store, want_shoot.len()).await;
    assert_eq!(found.len(), want_shoot.len(), "each line once");
    assert_eq!(stored_otlp(&found), want_shoot);
    let found = read_all(&seed_store, want_seed.len()).await;
    assert_eq!(stored(&found), want_seed, "the seed's store is still Loki");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(&agent);
        let shoot = metric(&text, "log_shipper_entries_accepted_total{store=\"shoot\"}");
        if shoot == 60 {
            break;
        }
        assert!(Instant::now() < deadline, "acknowledged: {shoot}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(agent, &shutdown, Duration::from_secs(5)).await;
    drop((seed_store, shoot_store));
}
