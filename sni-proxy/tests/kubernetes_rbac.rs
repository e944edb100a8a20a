//! The chart's ClusterRole (charts/sni-proxy/files/kubernetes-rules.yaml) is enough and no
//! more: against a real kube-apiserver, a proxy holding a ServiceAccount token bound to a role
//! made from that file syncs and turns ready; with any one resource taken out of the role it
//! never does, and the watch of that kind fails. The same for a proxy with `gateway_api` and
//! the Gateway API's rules (files/gateway-api-rules.yaml) and the Lease's Role
//! (files/lease-rules.yaml): with all of them it writes the status of a GatewayClass, a Gateway
//! and a TLSRoute; without a read rule it never turns ready; without a status rule, or without
//! the Lease's Role, it routes but that status is never written. Skips loudly when the control
//! plane cannot start; fails under `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkit::testing::kube::ControlPlane;
use common::*;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

/// The namespace the proxies' ServiceAccounts live in (as the chart's release would).
const NAMESPACE: &str = "istio-ingress-rbac";
/// How long a proxy without a rule is given to become ready anyway.
const NOT_READY_WINDOW: Duration = Duration::from_secs(6);

fn chart_file(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/sni-proxy/files")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn chart_rules() -> Vec<Value> {
    chart_file("kubernetes-rules.yaml")
}

/// The rules without `resource` of API group `group`.
fn without(rules: &[Value], group: &str, resource: &str) -> Vec<Value> {
    rules
        .iter()
        .filter_map(|r| {
            let mut r = r.clone();
            let in_group = r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == group);
            let kept: Vec<Value> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| !in_group || *x != resource)
                .cloned()
                .collect();
            if kept.is_empty() {
                return None;
            }
            r["resources"] = Value::Array(kept);
            Some(r)
        })
        .collect()
}

async fn create(client: &Client, object: Value) {
    sni_proxy::kube::testing::create(client, &object)
        .await
        .unwrap();
}

/// A ServiceAccount bound to a ClusterRole with `rules` (and to a Role in [`NAMESPACE`] with
/// `namespaced` rules, if any), and a kubeconfig with its token.
async fn account(
    control: &ControlPlane,
    client: &Client,
    name: &str,
    rules: Vec<Value>,
    namespaced: Option<Vec<Value>>,
    dir: &Path,
) -> PathBuf {
    create(client, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": NAMESPACE, "name": name}})).await;
    create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules})).await;
    create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]})).await;
    if let Some(rules) = namespaced {
        create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"namespace": NAMESPACE, "name": name}, "rules": rules})).await;
        create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"namespace": NAMESPACE, "name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]})).await;
    }
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let token: Value = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap();
    let token = token["status"]["token"].as_str().unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, control.ca_pem()).unwrap();
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority: '{}'}}}}]\n\
             users: [{{name: u, user: {{token: '{token}'}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u, namespace: {NAMESPACE}}}}}]\ncurrent-context: x\n",
            control.server(),
            ca.display()
        ),
    )
    .unwrap();
    path
}

async fn proxy(kubeconfig: &Path) -> TestProxy {
    start(&format!(
        "listeners: [{{name: sni, address: '127.0.0.1:0', mode: tls}}]\n\
         kubernetes: {{kubeconfig: '{}', istio: {{selector: {{app: istio-ingressgateway, istio: rbac}}}}}}\n",
        kubeconfig.display()
    ))
    .await
}

async fn ready(proxy: &TestProxy) -> bool {
    http_get(proxy.admin, "/readyz")
        .await
        .starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rules_are_enough_and_each_is_needed() {
    let test = "the_charts_rules_are_enough_and_each_is_needed";
    let Some(control) = tokio::task::spawn_blocking(move || ControlPlane::shared(test))
        .await
        .unwrap()
    else {
        return;
    };
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(control.kubeconfig()).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let admin = Client::try_from(config).unwrap();
    create(
        &admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    .await;
    let dir = std::env::temp_dir().join(format!("sni-proxy-rbac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = chart_rules();

    // Every rule of the chart: syncs.
    let full = proxy(&account(control, &admin, "sni-proxy", rules.clone(), None, &dir).await).await;
    eventually("ready with the chart's rules", || async {
        ready(&full).await
    })
    .await;
    assert_eq!(full.metric("sni_proxy_kubernetes_synced").await, 1.0);

    // One resource fewer: never ready, and that kind's watch fails.
    let cases = [
        ("", "services", "Service"),
        ("discovery.k8s.io", "endpointslices", "EndpointSlice"),
        ("networking.istio.io", "gateways", "Gateway"),
        ("networking.istio.io", "virtualservices", "VirtualService"),
        ("networking.istio.io", "destinationrules", "DestinationRule"),
    ];
    let mut proxies = Vec::new();
    for (group, resource, kind) in cases {
        let kubeconfig = account(
            control,
            &admin,
            &format!("sni-proxy-no-{resource}"),
            without(&rules, group, resource),
            None,
            &dir,
        )
        .await;
        proxies.push((resource, kind, proxy(&kubeconfig).await));
    }

    // The Gateway API, at the same time: each variant has its own GatewayClass (and so its own
    // Lease), Gateway and TLSRoute.
    let gateway_rules: Vec<Value> = rules
        .iter()
        .chain(&chart_file("gateway-api-rules.yaml"))
        .cloned()
        .collect();
    let lease_rules = chart_file("lease-rules.yaml");
    // (variant, ClusterRole rules, the Lease's Role rules, what it shows)
    let gateway_cases: Vec<GatewayCase> = vec![
        (
            "all",
            gateway_rules.clone(),
            Some(lease_rules.clone()),
            Expect::Written,
        ),
        (
            "no-gatewayclasses",
            without(&gateway_rules, GW_GROUP, "gatewayclasses"),
            Some(lease_rules.clone()),
            Expect::NotReady("GatewayClass"),
        ),
        (
            "no-gateways",
            without(&gateway_rules, GW_GROUP, "gateways"),
            Some(lease_rules.clone()),
            Expect::NotReady("Gateway.gateway.networking.k8s.io"),
        ),
        (
            "no-tlsroutes",
            without(&gateway_rules, GW_GROUP, "tlsroutes"),
            Some(lease_rules.clone()),
            Expect::NotReady("TLSRoute"),
        ),
        (
            "no-referencegrants",
            without(&gateway_rules, GW_GROUP, "referencegrants"),
            Some(lease_rules.clone()),
            Expect::NotReady("ReferenceGrant"),
        ),
        (
            "no-class-status",
            without(&gateway_rules, GW_GROUP, "gatewayclasses/status"),
            Some(lease_rules.clone()),
            Expect::Unwritten("GatewayClass"),
        ),
        (
            "no-gateway-status",
            without(&gateway_rules, GW_GROUP, "gateways/status"),
            Some(lease_rules.clone()),
            Expect::Unwritten("Gateway"),
        ),
        (
            "no-route-status",
            without(&gateway_rules, GW_GROUP, "tlsroutes/status"),
            Some(lease_rules.clone()),
            Expect::Unwritten("TLSRoute"),
        ),
        (
            "no-lease",
            gateway_rules.clone(),
            None,
            Expect::Unwritten("Lease"),
        ),
    ];
    let mut gateway_proxies = Vec::new();
    for (variant, cluster_rules, lease, expect) in gateway_cases {
        let class = format!("rbac-{variant}");
        create(&admin, json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": class}, "spec": {"controllerName": CONTROLLER}})).await;
        create(&admin, json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"namespace": NAMESPACE, "name": format!("gw-{variant}")},
            "spec": {"gatewayClassName": class, "listeners": [{"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"}}]}})).await;
        create(&admin, json!({"apiVersion": GW, "kind": "TLSRoute", "metadata": {"namespace": NAMESPACE, "name": format!("r-{variant}")},
            "spec": {"parentRefs": [{"name": format!("gw-{variant}")}], "hostnames": [format!("{variant}.rbac.test")],
                     "rules": [{"backendRefs": [{"name": "none", "port": 443}]}]}})).await;
        let kubeconfig = account(
            control,
            &admin,
            &format!("sni-proxy-gw-{variant}"),
            cluster_rules,
            lease,
            &dir,
        )
        .await;
        let p = start(&format!(
            "listeners: [{{name: sni, address: '127.0.0.1:0', mode: tls}}]\n\
             kubernetes: {{kubeconfig: '{}', istio: {{selector: {{app: istio-ingressgateway, istio: rbac}}}}, gateway_api: {{gateway_class: {class}, controller_name: '{CONTROLLER}'}}}}\n",
            kubeconfig.display()
        ))
        .await;
        gateway_proxies.push((variant, expect, p));
    }

    tokio::time::sleep(NOT_READY_WINDOW).await;
    for (resource, kind, p) in &proxies {
        assert!(!ready(p).await, "ready without {resource}");
        assert_eq!(
            p.metric("sni_proxy_kubernetes_synced").await,
            0.0,
            "{resource}"
        );
        let errors = p
            .metric(&format!(
                "sni_proxy_kubernetes_watch_errors_total{{kind=\"{kind}\"}}"
            ))
            .await;
        assert!(
            errors >= 1.0,
            "without {resource}: {errors} watch errors of {kind}"
        );
        p.shutdown.stop_accepting();
    }
    for (variant, expect, p) in &gateway_proxies {
        let status = Statuses::read(&admin, variant).await;
        match expect {
            Expect::Written => {
                assert!(ready(p).await, "{variant}: ready");
                until("every status written", || async {
                    Statuses::read(&admin, variant).await.all_ours()
                })
                .await;
                assert_eq!(p.metric("sni_proxy_kubernetes_status_leader").await, 1.0);
            }
            Expect::NotReady(kind) => {
                assert!(!ready(p).await, "ready without {variant}");
                let errors = p
                    .metric(&format!(
                        "sni_proxy_kubernetes_watch_errors_total{{kind=\"{kind}\"}}"
                    ))
                    .await;
                assert!(errors >= 1.0, "{variant}: {errors} watch errors of {kind}");
                assert!(
                    !status.class,
                    "{variant}: nothing written before the first sync"
                );
            }
            Expect::Unwritten(what) => {
                assert!(ready(p).await, "{variant}: routes without a status rule");
                until("a failed status write", || async {
                    p.metric("sni_proxy_kubernetes_status_errors_total").await >= 1.0
                })
                .await;
                let status = Statuses::read(&admin, variant).await;
                let written = match *what {
                    "GatewayClass" => status.class,
                    "Gateway" => status.gateway,
                    "TLSRoute" => status.route,
                    _ => status.class || status.gateway || status.route,
                };
                assert!(
                    !written,
                    "{variant}: {what} status written anyway: {status:?}"
                );
                if *what == "Lease" {
                    assert_eq!(p.metric("sni_proxy_kubernetes_status_leader").await, 0.0);
                }
            }
        }
        p.shutdown.stop_accepting();
    }
    full.shutdown.stop_accepting();
    let _ = std::fs::remove_dir_all(&dir);
}

const GW: &str = "gateway.networking.k8s.io/v1";
const GW_GROUP: &str = "gateway.networking.k8s.io";
const CONTROLLER: &str = "gardener.cloud/sni-proxy-rbac";

/// A Gateway API variant: its name, ClusterRole rules, Lease Role rules, what it shows.
type GatewayCase = (&'static str, Vec<Value>, Option<Vec<Value>>, Expect);

/// What a Gateway API variant of the test should show.
enum Expect {
    /// Ready, and every status written.
    Written,
    /// Never ready: the watch of this kind fails.
    NotReady(&'static str),
    /// Ready, but this status (or, for `Lease`, none) is never written.
    Unwritten(&'static str),
}

/// Whether the proxy's status is on a variant's GatewayClass, Gateway and TLSRoute.
#[derive(Debug)]
struct Statuses {
    class: bool,
    gateway: bool,
    route: bool,
}

impl Statuses {
    async fn read(admin: &Client, variant: &str) -> Statuses {
        let get = |kind: &str, plural: &str, namespaced: bool, name: String| {
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(GW_GROUP, "v1", kind),
                plural,
            );
            let api: Api<DynamicObject> = if namespaced {
                Api::namespaced_with(admin.clone(), NAMESPACE, &resource)
            } else {
                Api::all_with(admin.clone(), &resource)
            };
            async move { serde_json::to_value(api.get(&name).await.unwrap()).unwrap() }
        };
        // The CRDs default a Pending, Unknown condition: only True is ours.
        let accepted = |o: &Value| {
            o["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Accepted" && c["status"] == "True")
            })
        };
        let class = get(
            "GatewayClass",
            "gatewayclasses",
            false,
            format!("rbac-{variant}"),
        )
        .await;
        let gateway = get("Gateway", "gateways", true, format!("gw-{variant}")).await;
        let route = get("TLSRoute", "tlsroutes", true, format!("r-{variant}")).await;
        Statuses {
            class: accepted(&class),
            gateway: accepted(&gateway),
            route: route["status"]["parents"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == CONTROLLER)),
        }
    }

    fn all_ours(&self) -> bool {
        self.class && self.gateway && self.route
    }
}

/// Polls `cond` every 100 ms for up to 20 s.
async fn until<F, Fut>(what: &str, mut cond: F)
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
