//! Routes from a real kube-apiserver (with etcd, built from the Go module proxy and shared by
//! this test binary): the objects exactly as gardenlet writes them for each shoot, created and
//! changed through the API, and connections through the proxy to backends in a network
//! namespace (the API server refuses loopback addresses in EndpointSlices). The tests that kill
//! the API server or compact etcd start a control plane of their own, so the tests beside them
//! never see it. Skips loudly when the control plane cannot start or the test is unprivileged;
//! fails under `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/kube.rs"]
mod kube_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkit::testing::kube::ControlPlane;
use agentkit::testing::{client_hello, require_privileges};
use common::*;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use sni_proxy::kube::testing::{self, ISTIO};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What a test needs: the control plane, a client, and a namespace of backends.
struct Setup {
    control: Control,
    client: Client,
    backends: kube_common::Backends,
}

/// The test binary's shared control plane, or a private one that stops when the test ends.
enum Control {
    Shared(&'static ControlPlane),
    Private(Arc<ControlPlane>),
}

impl std::ops::Deref for Control {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        match self {
            Control::Shared(cp) => cp,
            Control::Private(cp) => cp,
        }
    }
}

/// The shared control plane, when the test can run (privileged, a control plane starts);
/// None after a loud SKIP.
async fn shared(test: &'static str) -> Option<&'static ControlPlane> {
    if !require_privileges(test) {
        return None;
    }
    tokio::task::spawn_blocking(move || ControlPlane::shared(test))
        .await
        .unwrap()
}

/// A test on the shared control plane.
async fn setup(test: &'static str) -> Option<Setup> {
    let control = shared(test).await?;
    setup_with(Control::Shared(control)).await
}

/// A test on a control plane of its own: for tests that restart it or compact its etcd, which
/// would disturb every test on the shared one.
async fn setup_private(test: &'static str) -> Option<Setup> {
    // The shared one decides whether a control plane can start here (skip or fail, loudly).
    shared(test).await?;
    let control = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .unwrap()
        .unwrap();
    setup_with(Control::Private(Arc::new(control))).await
}

async fn setup_with(control: Control) -> Option<Setup> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(control.kubeconfig()).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();
    // Privileges were checked before the control plane started.
    let backends = kube_common::Backends::create("kubernetes tests")?;
    Some(Setup {
        control,
        client,
        backends,
    })
}

impl Setup {
    fn ip(&self, host: u8) -> String {
        self.backends.ip(host)
    }

    /// A backend at `<prefix>.<host>:6443` in the namespace that answers every read with
    /// `name` and a newline.
    fn backend(&self, host: u8, name: &'static str) -> SocketAddr {
        self.backends.serve(host, name)
    }

    async fn create(&self, object: serde_json::Value) {
        let (api, obj) = self.api(&object);
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{object}: {e}"));
    }

    async fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        let (api, _) = self.api(&json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": ns, "name": name}}));
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }

    async fn patch(&self, object: serde_json::Value) {
        let (api, obj) = self.api(&object);
        let name = obj.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply("sni-proxy-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
    }

    fn api(&self, object: &serde_json::Value) -> (Api<DynamicObject>, DynamicObject) {
        testing::api(&self.client, object).unwrap()
    }

    /// The objects gardenlet writes for a shoot in `ns` with API host `host`, its
    /// kube-apiserver pods at `endpoints`, for the ingress gateway labelled `istio: <gateway>`.
    async fn shoot(&self, ns: &str, host: &str, gateway: &str, endpoints: &[String]) {
        for object in testing::shoot(ns, host, gateway, endpoints, 6443) {
            self.create(object).await;
        }
    }

    /// The Service's EndpointSlice, as the EndpointSlice controller writes it (server-side
    /// apply: creates or replaces).
    async fn slice(&self, ns: &str, endpoints: &[String]) {
        self.patch(testing::endpoint_slice(ns, endpoints, 6443))
            .await;
    }

    /// A proxy following the API server for the gateway `istio: <gateway>`.
    async fn proxy(&self, gateway: &str) -> TestProxy {
        let proxy = start(&format!(
            "listeners: [{{name: sni, address: '127.0.0.1:0', mode: tls}}, {{name: connect, address: '127.0.0.1:0', mode: http-connect}}]\n\
             kubernetes: {{kubeconfig: '{}', namespace: istio-ingress, istio: {{selector: {{app: istio-ingressgateway, istio: {gateway}}}}}}}\n",
            self.control.kubeconfig().display()
        ))
        .await;
        eventually("the first sync", || async {
            http_get(proxy.admin, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
        })
        .await;
        proxy
    }
}

impl Setup {
    /// The private control plane; restarting or compacting the shared one would disturb the
    /// tests beside this one.
    fn private(&self) -> Arc<ControlPlane> {
        match &self.control {
            Control::Private(cp) => Arc::clone(cp),
            Control::Shared(_) => panic!("not on the shared control plane: use setup_private"),
        }
    }

    /// Kills the API server, leaves it down for `down_for`, starts it again and returns once
    /// it is ready; how long it was away.
    async fn restart_api_server(&self, down_for: Duration) -> Duration {
        let cp = self.private();
        let killed = Instant::now();
        tokio::task::spawn_blocking(move || cp.restart("kube-apiserver", down_for))
            .await
            .unwrap()
            .unwrap();
        killed.elapsed()
    }

    /// Compacts etcd at its current revision, which it returns.
    async fn compact(&self) -> u64 {
        let cp = self.private();
        tokio::task::spawn_blocking(move || cp.compact())
            .await
            .unwrap()
            .unwrap()
    }

    /// A GET as admin that must answer 200; the body as JSON.
    async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.control.request("GET", path, None).await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The LIST requests the API server has answered since it started, per Istio resource the
    /// proxy watches (nobody else lists them): a LIST after a restart is a relist.
    async fn istio_lists(&self) -> Vec<(&'static str, f64)> {
        let (status, metrics) = self.control.request("GET", "/metrics", None).await.unwrap();
        assert_eq!(status, 200, "{metrics}");
        ["gateways", "virtualservices", "destinationrules"]
            .into_iter()
            .map(|resource| {
                let n = metrics
                    .lines()
                    .filter(|l| {
                        l.starts_with("apiserver_request_total{")
                            && l.contains(&format!("resource=\"{resource}\""))
                            && l.contains("verb=\"LIST\"")
                    })
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .fold(0.0, |sum, n| sum + n);
                (resource, n)
            })
            .collect()
    }
}

/// Polls `cond` every 100 ms until it holds, panicking after `bound`; how long it took.
async fn within<F, Fut>(bound: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < bound,
            "timed out after {bound:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Every watch error the proxy counted, over all kinds.
async fn watch_errors(proxy: &TestProxy) -> f64 {
    let mut sum = 0.0;
    for kind in sni_proxy::kube::Kind::ALL {
        sum += proxy
            .metric(&format!(
                "sni_proxy_kubernetes_watch_errors_total{{kind=\"{}\"}}",
                kind.as_str()
            ))
            .await;
    }
    sum
}

/// The longest a [`Load`] runs if nobody stops it.
const LOAD_BOUND: Duration = Duration::from_secs(180);

/// Clients through the proxy while something happens: one connection after another, every
/// 5 ms, each to the next of `targets` (SNI, the backend that must answer), counted answered
/// or failed; beside them the proxy's `/readyz`, every 50 ms.
struct Load {
    targets: Arc<Mutex<Vec<(String, String)>>>,
    answered: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    readiness: Arc<Mutex<(u64, Vec<String>)>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: &TestProxy, targets: &[(&str, &str)]) -> Load {
        let load = Load {
            targets: Arc::new(Mutex::new(
                targets
                    .iter()
                    .map(|(sni, name)| (sni.to_string(), name.to_string()))
                    .collect(),
            )),
            answered: Arc::default(),
            failures: Arc::default(),
            readiness: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        let started = Instant::now();
        let running = {
            let stop = Arc::clone(&load.stop);
            move || !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_BOUND
        };
        let (sni, targets, answered, failures) = (
            proxy.addrs[0],
            Arc::clone(&load.targets),
            Arc::clone(&load.answered),
            Arc::clone(&load.failures),
        );
        let clients_running = running.clone();
        let clients = tokio::spawn(async move {
            let mut i = 0;
            while clients_running() {
                let (host, want) = {
                    let targets = targets.lock().unwrap();
                    targets[i % targets.len()].clone()
                };
                i += 1;
                match exchange(sni, &host).await {
                    Ok(Some((name, _))) if name == want => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome => failures.lock().unwrap().push(format!(
                        "{host} at {:?}: {:?}",
                        started.elapsed(),
                        outcome.map(|o| o.map(|(name, _)| name))
                    )),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let (admin, readiness) = (proxy.admin, Arc::clone(&load.readiness));
        let probes = tokio::spawn(async move {
            while running() {
                let answer = http_get(admin, "/readyz").await;
                {
                    let mut r = readiness.lock().unwrap();
                    r.0 += 1;
                    if !answer.starts_with("HTTP/1.1 200") {
                        r.1.push(format!("at {:?}: {answer}", started.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Load {
            tasks: vec![clients, probes],
            ..load
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops sending to `host` (before a change that removes its route).
    fn drop_target(&self, host: &str) {
        self.targets.lock().unwrap().retain(|(h, _)| h != host);
    }

    /// Stops the clients: (answered, failures, /readyz probes, not-ready answers).
    async fn finish(self) -> (u64, Vec<String>, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        let (probes, not_ready) = std::mem::take(&mut *self.readiness.lock().unwrap());
        (
            self.answered.load(Ordering::Relaxed),
            failures,
            probes,
            not_ready,
        )
    }
}

/// Connects with a ClientHello for `sni`; the line the backend answers, or None when the proxy
/// refused (an alert, or closed).
async fn via_sni(proxy: SocketAddr, sni: &str) -> Option<(String, TcpStream)> {
    exchange(proxy, sni).await.unwrap()
}

/// [`via_sni`], with failing to connect to the proxy or to send the ClientHello an error.
async fn exchange(proxy: SocketAddr, sni: &str) -> std::io::Result<Option<(String, TcpStream)>> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&client_hello(sni, &[]).unwrap()).await?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await
    else {
        return Ok(None);
    };
    let Some(name) = line.strip_suffix('\n').filter(|_| n > 0) else {
        return Ok(None);
    };
    let name = name.to_owned();
    Ok(name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-')
        .then(|| (name, reader.into_inner())))
}

/// Asks the backend behind an open connection again.
async fn ask(s: &mut TcpStream) -> String {
    s.write_all(b"again").await.unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    line.trim_end().to_owned()
}

async fn routed_to(proxy: SocketAddr, sni: &str) -> Option<String> {
    via_sni(proxy, sni).await.map(|(name, _)| name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gardenlets_objects_route_two_shoots_connect_and_deletion() {
    let Some(t) = setup("gardenlets_objects_route_two_shoots_connect_and_deletion").await else {
        return;
    };
    t.backend(2, "a");
    t.backend(3, "b");
    t.shoot("shoot--k1--a", "api.a.k1.test", "k1", &[t.ip(2)])
        .await;
    t.shoot("shoot--k1--b", "api.b.k1.test", "k1", &[t.ip(3)])
        .await;
    let proxy = t.proxy("k1").await;
    let sni = proxy.addrs[0];
    assert_eq!(routed_to(sni, "api.a.k1.test").await.as_deref(), Some("a"));
    assert_eq!(routed_to(sni, "api.b.k1.test").await.as_deref(), Some("b"));
    assert_eq!(routed_to(sni, "api.c.k1.test").await, None, "unknown SNI");
    assert_eq!(proxy.metric("sni_proxy_kubernetes_synced").await, 1.0);
    assert_eq!(proxy.metric("sni_proxy_connections_total{listener=\"sni\",route=\"istio:shoot--k1--a/kube-apiserver\"}").await, 1.0);

    // CONNECT by Gardener's header: the shoot's kube-apiserver Service, and nothing else.
    for (destination, status) in [
        (
            "outbound|443||kube-apiserver.shoot--k1--b.svc.cluster.local",
            "200",
        ),
        (
            "outbound|443||kube-apiserver.shoot--k1--zz.svc.cluster.local",
            "403",
        ),
        (
            "outbound|6443||kube-apiserver.shoot--k1--b.svc.cluster.local",
            "403",
        ),
        (&format!("{}:6443", t.ip(3)), "403"),
    ] {
        let mut s = TcpStream::connect(proxy.addrs[1]).await.unwrap();
        s.write_all(
            format!("CONNECT x:443 HTTP/1.1\r\nX-Gardener-Destination: {destination}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&head[9..12]),
            status,
            "{destination}"
        );
        if status == "200" {
            let mut rest = vec![0u8; "HTTP/1.1 200 Connection Established\r\n\r\n".len() - 12];
            s.read_exact(&mut rest).await.unwrap();
            assert_eq!(ask(&mut s).await, "b");
        }
    }

    // Deleting a shoot's Gateway and VirtualService removes its route; the other stays.
    t.delete(ISTIO, "VirtualService", "shoot--k1--b", "kube-apiserver")
        .await;
    t.delete(ISTIO, "Gateway", "shoot--k1--b", "kube-apiserver")
        .await;
    eventually("shoot b's route removed", || async {
        routed_to(sni, "api.b.k1.test").await.is_none()
    })
    .await;
    assert_eq!(routed_to(sni, "api.a.k1.test").await.as_deref(), Some("a"));
    proxy.shutdown.stop_accepting();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_an_endpoint_slice_keeps_established_connections() {
    let Some(t) = setup("scaling_an_endpoint_slice_keeps_established_connections").await else {
        return;
    };
    t.backend(2, "old");
    t.backend(4, "new");
    t.shoot("shoot--k2--a", "api.a.k2.test", "k2", &[t.ip(2)])
        .await;
    let proxy = t.proxy("k2").await;
    let sni = proxy.addrs[0];
    let (name, mut established) = via_sni(sni, "api.a.k2.test").await.unwrap();
    assert_eq!(name, "old");
    // The kube-apiserver pod moves: the slice now lists only the new address.
    t.slice("shoot--k2--a", &[t.ip(4)]).await;
    eventually("new connections reach the new pod", || async {
        routed_to(sni, "api.a.k2.test").await.as_deref() == Some("new")
    })
    .await;
    assert_eq!(
        ask(&mut established).await,
        "old",
        "the established connection is untouched"
    );
    proxy.shutdown.stop_accepting();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_tls_termination_are_reported_not_served_half() {
    let Some(t) = setup("conflicts_and_tls_termination_are_reported_not_served_half").await else {
        return;
    };
    t.backend(2, "first");
    t.backend(3, "second");
    t.shoot("shoot--k3--a", "api.k3.test", "k3", &[t.ip(2)])
        .await;
    // Created later, claiming the same host: the older keeps it.
    t.shoot("shoot--k3--b", "api.k3.test", "k3", &[t.ip(3)])
        .await;
    // A TLS-terminating Gateway (the IstioTLSTermination variant) for a third shoot.
    t.create(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shoot--k3--c"}}),
    )
    .await;
    t.create(json!({"apiVersion": ISTIO, "kind": "Gateway", "metadata": {"namespace": "shoot--k3--c", "name": "kube-apiserver"},
        "spec": {"selector": {"app": "istio-ingressgateway", "istio": "k3"},
                 "servers": [{"hosts": ["api.c.k3.test"], "port": {"name": "tls", "number": 443, "protocol": "HTTPS"},
                              "tls": {"mode": "OPTIONAL_MUTUAL", "credentialName": "shoot--k3--c-kube-apiserver-tls"}}]}})).await;
    let proxy = t.proxy("k3").await;
    let sni = proxy.addrs[0];
    assert_eq!(
        routed_to(sni, "api.k3.test").await.as_deref(),
        Some("first")
    );
    assert_eq!(proxy.metric("sni_proxy_kubernetes_conflicts").await, 1.0);
    assert_eq!(
        proxy
            .metric("sni_proxy_kubernetes_skipped{kind=\"Gateway\",reason=\"tls_termination\"}")
            .await,
        1.0
    );
    assert_eq!(routed_to(sni, "api.c.k3.test").await, None);
    // The older shoot goes away: the newer one gets the host.
    t.delete(ISTIO, "VirtualService", "shoot--k3--a", "kube-apiserver")
        .await;
    eventually("the host passes to the other shoot", || async {
        routed_to(sni, "api.k3.test").await.as_deref() == Some("second")
    })
    .await;
    assert_eq!(proxy.metric("sni_proxy_kubernetes_conflicts").await, 0.0);
    proxy.shutdown.stop_accepting();
}

/// The API server crashes (SIGKILL) under traffic, stays away for 3 s and comes back. The proxy
/// routes from what it has: not one connection fails, an established one is untouched, and
/// `/readyz` stays 200 throughout: readiness says the route table is good, which it is while
/// the API server is away, so an outage of the API server never takes the proxies out of their
/// Service. The outage is seen (watch errors), and the watches resume: a change made after the
/// restart converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_restarting_under_traffic_drops_nothing() {
    let Some(t) = setup_private("the_api_server_restarting_under_traffic_drops_nothing").await
    else {
        return;
    };
    t.backend(2, "a");
    t.backend(3, "b");
    t.shoot("shoot--r1--a", "api.a.r1.test", "r1", &[t.ip(2)])
        .await;
    t.shoot("shoot--r1--b", "api.b.r1.test", "r1", &[t.ip(3)])
        .await;
    let proxy = t.proxy("r1").await;
    let sni = proxy.addrs[0];
    let (name, mut established) = via_sni(sni, "api.a.r1.test").await.unwrap();
    assert_eq!(name, "a");
    assert_eq!(watch_errors(&proxy).await, 0.0);

    let load = Load::start(&proxy, &[("api.a.r1.test", "a"), ("api.b.r1.test", "b")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = load.answered();
    let outage = t.restart_api_server(Duration::from_secs(3)).await;
    let during_outage = load.answered() - before_kill;
    assert!(
        watch_errors(&proxy).await > 0.0,
        "the proxy did not notice the API server was gone"
    );

    // The watches resume: shoot b's route goes away once its VirtualService is deleted.
    load.drop_target("api.b.r1.test");
    t.delete(ISTIO, "VirtualService", "shoot--r1--b", "kube-apiserver")
        .await;
    let converged = within(
        Duration::from_secs(60),
        "shoot b's route removed after the restart",
        || async { routed_to(sni, "api.b.r1.test").await.is_none() },
    )
    .await;
    let (answered, failures, probes, not_ready) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:#?}",
        failures.len(),
        answered + failures.len() as u64
    );
    assert!(
        during_outage > 100,
        "only {during_outage} connections while the API server was away for {outage:?}"
    );
    assert!(
        not_ready.is_empty(),
        "/readyz not 200 in {} of {probes}: {not_ready:#?}",
        not_ready.len()
    );
    assert_eq!(
        ask(&mut established).await,
        "a",
        "the connection opened before the crash"
    );
    assert_eq!(routed_to(sni, "api.a.r1.test").await.as_deref(), Some("a"));
    eprintln!(
        "API server away {outage:?}: {during_outage} connections answered meanwhile, {answered} in all, \
         none failed; /readyz 200 in {probes} of {probes}; {} watch errors; the change after it \
         converged in {converged:?}; LISTs since the restart: {:?}",
        watch_errors(&proxy).await,
        t.istio_lists().await
    );
    proxy.shutdown.stop_accepting();
}

/// A watch that resumes from a compacted resourceVersion is answered `410 Gone` and relists:
/// while the proxy watches, etcd moves on (objects the proxy does not watch) and is compacted,
/// then the API server restarts, so every watch reconnects from a revision etcd has forgotten
/// (and that the restarted API server's watch cache never had). The LISTs the restarted API
/// server counts for the Istio kinds are the proxy's relists (kube-rs's watcher lists only at
/// its start and after a 410). The routes stay throughout, and a change made afterwards
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_relists_and_converges() {
    let Some(t) = setup_private("a_compacted_watch_relists_and_converges").await else {
        return;
    };
    t.backend(2, "a");
    t.backend(3, "b");
    t.shoot("shoot--r2--a", "api.a.r2.test", "r2", &[t.ip(2)])
        .await;
    t.shoot("shoot--r2--b", "api.b.r2.test", "r2", &[t.ip(3)])
        .await;
    let proxy = t.proxy("r2").await;
    let sni = proxy.addrs[0];
    // The proxy has listed and watches; whatever revision it holds is at most this one (no
    // Istio object changes from here on, and a watch's periodic bookmark comes a minute in).
    let seen: u64 = t
        .get("/apis/networking.istio.io/v1beta1/virtualservices")
        .await["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let load = Load::start(&proxy, &[("api.a.r2.test", "a"), ("api.b.r2.test", "b")]);
    t.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "churn"}}))
        .await;
    const CHURN: u64 = 50;
    for i in 0..CHURN {
        let name = format!("c{i}");
        t.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "churn", "name": name}, "data": {"k": "v"}}))
            .await;
        t.delete("v1", "ConfigMap", "churn", &name).await;
    }
    let compacted = t.compact().await;
    assert!(
        compacted > seen + 2 * CHURN,
        "compacted at {compacted}, the proxy's revision is at most {seen}"
    );
    let outage = t.restart_api_server(Duration::from_secs(1)).await;
    // etcd has forgotten the revision the proxy resumes from: a list at exactly that revision
    // (of Namespaces: a list of an Istio kind would count as a relist below) reaches etcd,
    // since the restarted API server's cache starts later, and is refused. Asked once that
    // cache is initialized (429 before).
    let exact = format!("/api/v1/namespaces?resourceVersion={seen}&resourceVersionMatch=Exact");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let answer = t.control.request("GET", &exact, None).await.unwrap();
        if answer.0 != 429 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 410, "{body}");
    let relisted = within(
        Duration::from_secs(60),
        "the proxy relists every Istio kind from the restarted API server",
        || async { t.istio_lists().await.iter().all(|(_, n)| *n > 0.0) },
    )
    .await;

    load.drop_target("api.b.r2.test");
    t.delete(ISTIO, "VirtualService", "shoot--r2--b", "kube-apiserver")
        .await;
    let converged = within(
        Duration::from_secs(60),
        "shoot b's route removed after the relist",
        || async { routed_to(sni, "api.b.r2.test").await.is_none() },
    )
    .await;
    let (answered, failures, probes, not_ready) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:#?}",
        failures.len(),
        answered + failures.len() as u64
    );
    assert!(
        not_ready.is_empty(),
        "/readyz not 200 in {} of {probes}: {not_ready:#?}",
        not_ready.len()
    );
    assert_eq!(routed_to(sni, "api.a.r2.test").await.as_deref(), Some("a"));
    eprintln!(
        "proxy at revision <= {seen}, etcd compacted at {compacted}, API server away {outage:?}; \
         relisted {relisted:?} after it returned ({:?}); the change after it converged in \
         {converged:?}; {answered} connections answered, none failed; /readyz 200 in {probes} \
         of {probes}; {} watch errors",
        t.istio_lists().await,
        watch_errors(&proxy).await
    );
    proxy.shutdown.stop_accepting();
}
