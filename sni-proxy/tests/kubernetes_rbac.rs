//! The chart's ClusterRole (charts/sni-proxy/files/kubernetes-rules.yaml) is enough and no
//! more: against a real kube-apiserver, a proxy holding a ServiceAccount token bound to a role
//! made from that file syncs and turns ready; with any one resource taken out of the role it
//! never does, and the watch of that kind fails. Skips loudly when the control plane cannot
//! start; fails under `REQUIRE_PRIVILEGED=1`.
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

fn chart_rules() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/sni-proxy/files/kubernetes-rules.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// The rules without `resource`.
fn without(rules: &[Value], resource: &str) -> Vec<Value> {
    rules
        .iter()
        .filter_map(|r| {
            let mut r = r.clone();
            let kept: Vec<Value> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| *x != resource)
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
    let api_version = object["apiVersion"].as_str().unwrap();
    let kind = object["kind"].as_str().unwrap();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let plural = format!("{}s", kind.to_ascii_lowercase());
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let obj: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("{object}: {e}"));
}

/// A ServiceAccount bound to a ClusterRole with `rules`, and a kubeconfig with its token.
async fn account(
    control: &ControlPlane,
    client: &Client,
    name: &str,
    rules: Vec<Value>,
    dir: &Path,
) -> PathBuf {
    create(client, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": NAMESPACE, "name": name}})).await;
    create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules})).await;
    create(client, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]})).await;
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
    let full = proxy(&account(control, &admin, "sni-proxy", rules.clone(), &dir).await).await;
    eventually("ready with the chart's rules", || async {
        ready(&full).await
    })
    .await;
    assert_eq!(full.metric("sni_proxy_kubernetes_synced").await, 1.0);

    // One resource fewer: never ready, and that kind's watch fails.
    let cases = [
        ("services", "Service"),
        ("endpointslices", "EndpointSlice"),
        ("gateways", "Gateway"),
        ("virtualservices", "VirtualService"),
        ("destinationrules", "DestinationRule"),
    ];
    let mut proxies = Vec::new();
    for (resource, kind) in cases {
        let kubeconfig = account(
            control,
            &admin,
            &format!("sni-proxy-no-{resource}"),
            without(&rules, resource),
            &dir,
        )
        .await;
        proxies.push((resource, kind, proxy(&kubeconfig).await));
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
    full.shutdown.stop_accepting();
    let _ = std::fs::remove_dir_all(&dir);
}
