//! Routes from a real kube-apiserver (with etcd, built from the Go module proxy and shared by
//! this test binary): the objects exactly as gardenlet writes them for each shoot, created and
//! changed through the API, and connections through the proxy to backends in a network
//! namespace (the API server refuses loopback addresses in EndpointSlices). Skips loudly when
//! the control plane cannot start or the test is unprivileged; fails under
//! `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use agentkit::testing::kube::ControlPlane;
use agentkit::testing::{client_hello, require_privileges, run_command, NetNs};
use common::*;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The Istio API version gardenlet writes.
const ISTIO: &str = "networking.istio.io/v1beta1";

/// What a test needs: the control plane, a client, and a namespace of backends.
struct Setup {
    control: &'static ControlPlane,
    client: Client,
    backends: NetNs,
    /// The backends' /24: `<prefix>.<host>`.
    prefix: String,
}

static NEXT_SUBNET: AtomicU8 = AtomicU8::new(0);

async fn setup(test: &str) -> Option<Setup> {
    if !require_privileges(test) {
        return None;
    }
    let control = ControlPlane::shared(test)?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(control.kubeconfig()).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();
    // 198.18.0.0/15 is for benchmarking networks: our own test hosts only.
    let third =
        (std::process::id() % 64) as u8 * 4 + NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 4;
    let prefix = format!("198.19.{third}");
    let backends = NetNs::create("snik");
    let (host, peer) = (format!("snkh{third}"), format!("snkp{third}"));
    run_command(
        "ip",
        &["link", "add", &host, "type", "veth", "peer", "name", &peer],
    );
    run_command("ip", &["link", "set", &peer, "netns", backends.name()]);
    run_command(
        "ip",
        &["addr", "add", &format!("{prefix}.1/24"), "dev", &host],
    );
    run_command("ip", &["link", "set", &host, "up"]);
    for h in 2..=5 {
        run_command(
            "ip",
            &[
                "-n",
                backends.name(),
                "addr",
                "add",
                &format!("{prefix}.{h}/24"),
                "dev",
                &peer,
            ],
        );
    }
    run_command("ip", &["-n", backends.name(), "link", "set", &peer, "up"]);
    Some(Setup {
        control,
        client,
        backends,
        prefix,
    })
}

impl Setup {
    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    /// A backend at `<prefix>.<host>:6443` in the namespace that answers every read with
    /// `name` and a newline.
    fn backend(&self, host: u8, name: &'static str) -> SocketAddr {
        let addr: SocketAddr = format!("{}:6443", self.ip(host)).parse().unwrap();
        let listener = self
            .backends
            .run(move || std::net::TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
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
        let api_version = object["apiVersion"].as_str().unwrap();
        let kind = object["kind"].as_str().unwrap();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let plural = match kind {
            "EndpointSlice" => "endpointslices".to_owned(),
            other => format!("{}s", other.to_ascii_lowercase()),
        };
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &plural,
        );
        let obj: DynamicObject = serde_json::from_value(object.clone()).unwrap();
        let api = match obj.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        (api, obj)
    }

    /// The objects gardenlet writes for a shoot in `ns` with API host `host`, its
    /// kube-apiserver pods at `endpoints`, for the ingress gateway labelled `istio: <gateway>`.
    async fn shoot(&self, ns: &str, host: &str, gateway: &str, endpoints: &[String]) {
        let labels = json!({"app": "kubernetes", "role": "apiserver"});
        self.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .await;
        self.create(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels,
            "annotations": {"networking.istio.io/exportTo": "*"}},
            "spec": {"type": "ClusterIP", "ipFamilyPolicy": "PreferDualStack", "selector": labels,
                     "ports": [{"name": "kube-apiserver", "port": 443, "protocol": "TCP", "targetPort": 6443}]}})).await;
        self.slice(ns, endpoints).await;
        self.create(json!({"apiVersion": ISTIO, "kind": "Gateway", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"selector": {"app": "istio-ingressgateway", "istio": gateway},
                     "servers": [{"hosts": [host], "port": {"name": "tls", "number": 443, "protocol": "TLS"}, "tls": {"mode": "PASSTHROUGH"}}]}})).await;
        self.create(json!({"apiVersion": ISTIO, "kind": "VirtualService", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"exportTo": ["istio-ingress"], "gateways": ["kube-apiserver"], "hosts": [host],
                     "tls": [{"match": [{"port": 443, "sniHosts": [host]}],
                              "route": [{"destination": {"host": format!("kube-apiserver.{ns}.svc.cluster.local"), "port": {"number": 443}}}]}]}})).await;
        self.create(json!({"apiVersion": ISTIO, "kind": "DestinationRule", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"host": format!("kube-apiserver.{ns}.svc.cluster.local"), "exportTo": ["*"],
                     "trafficPolicy": {"connectionPool": {"tcp": {"maxConnectionDuration": "86400s", "tcpKeepalive": {"interval": "75s", "time": "7200s"}}},
                                       "loadBalancer": {"localityLbSetting": {"enabled": true, "failoverPriority": ["topology.kubernetes.io/zone"]}},
                                       "tls": {"mode": "DISABLE"}}}})).await;
    }

    /// The Service's EndpointSlice, as the EndpointSlice controller writes it (server-side
    /// apply: creates or replaces).
    async fn slice(&self, ns: &str, endpoints: &[String]) {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
            .collect();
        self.patch(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": "kube-apiserver-x1", "labels": {"kubernetes.io/service-name": "kube-apiserver", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4", "ports": [{"name": "kube-apiserver", "port": 6443, "protocol": "TCP"}], "endpoints": endpoints})).await;
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

/// Connects with a ClientHello for `sni`; the line the backend answers, or None when the proxy
/// refused (an alert, or closed).
async fn via_sni(proxy: SocketAddr, sni: &str) -> Option<(String, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&client_hello(sni, &[]).unwrap()).await.unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let name = line.strip_suffix('\n').filter(|_| n > 0)?.to_owned();
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-')
        .then(|| (name, reader.into_inner()))
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
