//! The Gateway API against a real kube-apiserver (with etcd, built from the Go module proxy
//! and shared by this test binary, the Gateway API v1.6 standard CRDs installed): a
//! GatewayClass, a Gateway and TLSRoutes created through the API; TLS connections through
//! the proxy to backends in a network namespace, split by the backendRefs' weights; an
//! invalid backendRef's share refused; the status read back from the API server, written once
//! and not again while nothing changes, by one of two replicas. Skips loudly when the control
//! plane cannot start or the test is unprivileged; fails under `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/kube.rs"]
mod kube_common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use agentkit::testing::client_hello;
use common::*;
use kube_common::{Backends, Cluster};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const GW: &str = "gateway.networking.k8s.io/v1";
const CONTROLLER: &str = "gardener.cloud/sni-proxy-test";

/// Connects with a ClientHello for `sni`: the name the backend answers, or None when the proxy
/// closed the connection (refused).
async fn routed_to(proxy: SocketAddr, sni: &str) -> Option<String> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&client_hello(sni, &[]).unwrap()).await.unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .expect("the proxy answers or closes within 5 s")
        .ok()?;
    line.strip_suffix('\n').filter(|_| n > 0).map(str::to_owned)
}

/// Where `n` connections for `sni` went: backend name (or "refused") → count.
async fn spread(proxy: SocketAddr, sni: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let to = routed_to(proxy, sni)
            .await
            .unwrap_or_else(|| "refused".into());
        *counts.entry(to).or_insert(0) += 1;
    }
    counts
}

fn condition<'a>(conditions: &'a Value, kind: &str) -> &'a Value {
    conditions
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {conditions}"))
}

/// A Service with port 443 → 6443 and its EndpointSlice at `endpoints`.
async fn service(c: &Cluster, ns: &str, name: &str, endpoints: &[String]) {
    c.create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}))
        .await;
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    c.create(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}], "endpoints": endpoints}))
        .await;
}

fn tls_route(ns: &str, name: &str, hostnames: &[&str], backends: Value) -> Value {
    json!({"apiVersion": GW, "kind": "TLSRoute", "metadata": {"namespace": ns, "name": name},
        "spec": {"parentRefs": [{"name": "gw"}], "hostnames": hostnames, "rules": [{"backendRefs": backends}]}})
}

async fn proxy(c: &Cluster, ns: &str, class: &str) -> TestProxy {
    let proxy = start(&format!(
        "listeners: [{{name: sni, address: '127.0.0.1:0', mode: tls}}]\n\
         kubernetes: {{kubeconfig: '{}', namespace: {ns}, gateway_api: {{gateway_class: {class}, controller_name: '{CONTROLLER}'}}}}\n",
        c.control.kubeconfig().display()
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

/// Polls `cond` every 100 ms for up to 20 s (status writes go through the Lease first).
async fn eventually_slow<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsroute_weights_an_invalid_backend_and_the_status() {
    let test = "tlsroute_weights_an_invalid_backend_and_the_status";
    let Some(backends) = Backends::create(test) else {
        return;
    };
    let Some(c) = Cluster::shared(test).await else {
        return;
    };
    let (ns, class) = ("gwapi-e2e", "sni-proxy-e2e");
    backends.serve(2, "a");
    backends.serve(3, "b");
    backends.serve(4, "zero");
    c.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .await;
    c.create(json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": class}, "spec": {"controllerName": CONTROLLER}}))
        .await;
    c.create(json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"namespace": ns, "name": "gw"},
        "spec": {"gatewayClassName": class, "listeners": [
            {"name": "tls", "port": 443, "protocol": "TLS", "hostname": "*.gw.test", "tls": {"mode": "Passthrough"}}]}}))
        .await;
    service(&c, ns, "a", &[backends.ip(2)]).await;
    service(&c, ns, "b", &[backends.ip(3)]).await;
    service(&c, ns, "zero", &[backends.ip(4)]).await;
    c.create(tls_route(
        ns,
        "r",
        &["api.gw.test"],
        json!([
            {"name": "a", "port": 443, "weight": 3},
            {"name": "b", "port": 443, "weight": 1},
            {"name": "zero", "port": 443, "weight": 0}
        ]),
    ))
    .await;
    // A route whose hostname the listener's *.gw.test does not cover.
    c.create(tls_route(
        ns,
        "elsewhere",
        &["api.other.test"],
        json!([{"name": "a", "port": 443}]),
    ))
    .await;

    // Two replicas: both route, one writes the status.
    let p1 = proxy(&c, ns, class).await;
    let p2 = proxy(&c, ns, class).await;
    let sni = p1.addrs[0];

    // 3:1, weight 0 nothing, nothing refused.
    let counts = spread(sni, "api.gw.test", 400).await;
    let (a, b) = (
        counts.get("a").copied().unwrap_or(0),
        counts.get("b").copied().unwrap_or(0),
    );
    assert_eq!(a + b, 400, "{counts:?}");
    let share = a as f64 / 400.0;
    assert!((0.65..=0.85).contains(&share), "3:1 expected: {counts:?}");
    assert!(
        routed_to(p2.addrs[0], "api.gw.test").await.is_some(),
        "the other replica routes too"
    );
    assert_eq!(
        routed_to(sni, "api.other.test").await,
        None,
        "not the listener's hostname"
    );

    // The status, read back from the API server.
    let class_obj = json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": class}});
    let gw_obj =
        json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"namespace": ns, "name": "gw"}});
    let route_obj = |name: &str| json!({"apiVersion": GW, "kind": "TLSRoute", "metadata": {"namespace": ns, "name": name}});
    eventually_slow("the status is written", || async {
        let r = c.get(route_obj("elsewhere")).await;
        let g = c.get(gw_obj.clone()).await;
        r["status"]["parents"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            && g["status"]["listeners"][0]["attachedRoutes"] == 1
    })
    .await;
    let got = c.get(class_obj.clone()).await;
    let accepted = condition(&got["status"]["conditions"], "Accepted");
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("True"), Some("Accepted"))
    );
    let got = c.get(gw_obj.clone()).await;
    for kind in ["Accepted", "Programmed"] {
        let cond = condition(&got["status"]["conditions"], kind);
        assert_eq!(cond["status"], "True", "Gateway {kind}: {cond}");
        assert_eq!(cond["observedGeneration"], got["metadata"]["generation"]);
    }
    let listener = &got["status"]["listeners"][0];
    assert_eq!(listener["name"], "tls");
    assert_eq!(
        listener["attachedRoutes"], 1,
        "r attaches, elsewhere does not"
    );
    assert_eq!(
        listener["supportedKinds"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "TLSRoute"}])
    );
    for (kind, status) in [
        ("Accepted", "True"),
        ("Programmed", "True"),
        ("ResolvedRefs", "True"),
        ("Conflicted", "False"),
    ] {
        assert_eq!(
            condition(&listener["conditions"], kind)["status"],
            status,
            "listener {kind}"
        );
    }
    let got = c.get(route_obj("elsewhere")).await;
    let parent = &got["status"]["parents"][0];
    assert_eq!(parent["controllerName"], CONTROLLER);
    let accepted = condition(&parent["conditions"], "Accepted");
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("False"), Some("NoMatchingListenerHostname"))
    );
    let got = c.get(route_obj("r")).await;
    let parent = &got["status"]["parents"][0];
    assert_eq!(parent["parentRef"]["name"], "gw");
    assert_eq!(
        condition(&parent["conditions"], "Accepted")["status"],
        "True"
    );
    assert_eq!(
        condition(&parent["conditions"], "ResolvedRefs")["status"],
        "True"
    );

    // A backendRef to a Service that does not exist, with weight 4 of 8: half the
    // connections are refused, none goes elsewhere; ResolvedRefs=False, BackendNotFound.
    c.apply(
        "test",
        tls_route(
            ns,
            "r",
            &["api.gw.test"],
            json!([
                {"name": "a", "port": 443, "weight": 3},
                {"name": "b", "port": 443, "weight": 1},
                {"name": "zero", "port": 443, "weight": 0},
                {"name": "missing", "port": 443, "weight": 4}
            ]),
        ),
    )
    .await;
    eventually_slow("ResolvedRefs=False", || async {
        let got = c.get(route_obj("r")).await;
        let parents = &got["status"]["parents"];
        parents.as_array().is_some_and(|p| !p.is_empty())
            && condition(&parents[0]["conditions"], "ResolvedRefs")["status"] == "False"
    })
    .await;
    let got = c.get(route_obj("r")).await;
    let parent = &got["status"]["parents"][0];
    let resolved = condition(&parent["conditions"], "ResolvedRefs");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert_eq!(
        resolved["observedGeneration"],
        got["metadata"]["generation"]
    );
    assert_eq!(
        condition(&parent["conditions"], "Accepted")["status"],
        "True",
        "still attached"
    );
    let before = p1
        .metric("sni_proxy_handshake_failures_total{listener=\"sni\",reason=\"invalid_backend\"}")
        .await;
    let counts = spread(sni, "api.gw.test", 400).await;
    let refused = counts.get("refused").copied().unwrap_or(0);
    let (a, b) = (
        counts.get("a").copied().unwrap_or(0),
        counts.get("b").copied().unwrap_or(0),
    );
    assert_eq!(a + b + refused, 400, "{counts:?}");
    assert!((140..=260).contains(&refused), "half refused: {counts:?}");
    assert!(a > b, "the others keep their 3:1: {counts:?}");
    let after = p1
        .metric("sni_proxy_handshake_failures_total{listener=\"sni\",reason=\"invalid_backend\"}")
        .await;
    assert_eq!(
        after - before,
        refused as f64,
        "every refusal is the invalid backend's, no backend was tried"
    );

    // Another controller's entry in status.parents stays as it is.
    let theirs = json!({"parentRef": {"name": "other-gw"}, "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    c.apply_status(
        "other-controller",
        json!({"apiVersion": GW, "kind": "TLSRoute", "metadata": {"namespace": ns, "name": "r"},
        "status": {"parents": [theirs.clone()]}}),
    )
    .await;
    eventually_slow("ours written again beside theirs", || async {
        let got = c.get(route_obj("r")).await;
        let parents = got["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        parents.len() == 2 && parents.iter().any(|p| p["controllerName"] == CONTROLLER)
    })
    .await;
    let got = c.get(route_obj("r")).await;
    let kept = got["status"]["parents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["controllerName"] == "example.com/other")
        .unwrap()
        .clone();
    assert_eq!(kept["conditions"][0]["message"], "theirs");
    assert_eq!(kept["parentRef"]["name"], "other-gw");
    assert_eq!(
        kept["conditions"][0]["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );

    // Nothing changes: nothing is written (the writer compares every 5 s).
    let versions = || async {
        let mut v = Vec::new();
        for o in [
            class_obj.clone(),
            gw_obj.clone(),
            route_obj("r"),
            route_obj("elsewhere"),
        ] {
            v.push(c.get(o).await["metadata"]["resourceVersion"].clone());
        }
        v
    };
    let writes = |p: &TestProxy| p.registry_metric("sni_proxy_kubernetes_status_writes_total");
    let (v0, w0) = (versions().await, writes(&p1) + writes(&p2));
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        versions().await,
        v0,
        "an unchanged status is not written again"
    );
    assert_eq!(writes(&p1) + writes(&p2), w0);
    // One writer: exactly one replica holds the Lease.
    let leaders = p1.metric("sni_proxy_kubernetes_status_leader").await
        + p2.metric("sni_proxy_kubernetes_status_leader").await;
    assert_eq!(leaders, 1.0);
    let lease = c
        .get(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"namespace": ns, "name": format!("sni-proxy-status-{class}")}}))
        .await;
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "{lease}"
    );

    // The writer stops: it hands the Lease over, the other replica takes it well before the
    // Lease would have expired (15 s), and finds nothing to write.
    let (leader, other) = if p1.metric("sni_proxy_kubernetes_status_leader").await == 1.0 {
        (&p1, &p2)
    } else {
        (&p2, &p1)
    };
    let stopped = std::time::Instant::now();
    leader.shutdown.stop_accepting();
    eventually_slow("the other replica takes the Lease", || async {
        other.metric("sni_proxy_kubernetes_status_leader").await == 1.0
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(11),
        "taken over after {:?}: the Lease was not released",
        stopped.elapsed()
    );
    let before = writes(other);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(versions().await, v0, "the new writer rewrites nothing");
    assert_eq!(writes(other), before);
    other.shutdown.stop_accepting();
}
