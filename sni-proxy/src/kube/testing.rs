//! For tests, benchmarks and the demo (feature `test-support`): the objects gardenlet writes for
//! a shoot, as JSON, and an API for any object given as JSON. Not used by the proxy.

use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

/// The Istio API version gardenlet writes.
pub const ISTIO: &str = "networking.istio.io/v1beta1";

/// The objects gardenlet writes for a shoot's kube-apiserver in namespace `ns` (the Namespace
/// too), in the order it creates them: Namespace, Service, its EndpointSlice (`endpoints`, the
/// pods' addresses, on `port`; gardenlet's is 443 on 6443), Gateway (`istio: <gateway>` among its selector's labels),
/// VirtualService and DestinationRule, for the API host `host`.
pub fn shoot(ns: &str, host: &str, gateway: &str, endpoints: &[String], port: u16) -> Vec<Value> {
    let labels = json!({"app": "kubernetes", "role": "apiserver"});
    let service = format!("kube-apiserver.{ns}.svc.cluster.local");
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels,
            "annotations": {"networking.istio.io/exportTo": "*"}},
            "spec": {"type": "ClusterIP", "ipFamilyPolicy": "PreferDualStack", "selector": labels,
                     "ports": [{"name": "kube-apiserver", "port": 443, "protocol": "TCP", "targetPort": port}]}}),
        endpoint_slice(ns, endpoints, port),
        json!({"apiVersion": ISTIO, "kind": "Gateway", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"selector": {"app": "istio-ingressgateway", "istio": gateway},
                     "servers": [{"hosts": [host], "port": {"name": "tls", "number": 443, "protocol": "TLS"}, "tls": {"mode": "PASSTHROUGH"}}]}}),
        json!({"apiVersion": ISTIO, "kind": "VirtualService", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"exportTo": ["istio-ingress"], "gateways": ["kube-apiserver"], "hosts": [host],
                     "tls": [{"match": [{"port": 443, "sniHosts": [host]}],
                              "route": [{"destination": {"host": service, "port": {"number": 443}}}]}]}}),
        json!({"apiVersion": ISTIO, "kind": "DestinationRule", "metadata": {"namespace": ns, "name": "kube-apiserver", "labels": labels},
            "spec": {"host": service, "exportTo": ["*"],
                     "trafficPolicy": {"connectionPool": {"tcp": {"maxConnectionDuration": "86400s", "tcpKeepalive": {"interval": "75s", "time": "7200s"}}},
                                       "loadBalancer": {"localityLbSetting": {"enabled": true, "failoverPriority": ["topology.kubernetes.io/zone"]}},
                                       "tls": {"mode": "DISABLE"}}}}),
    ]
}

/// The kube-apiserver Service's EndpointSlice as the EndpointSlice controller writes it, with
/// the pods' addresses `endpoints` on `port`.
pub fn endpoint_slice(ns: &str, endpoints: &[String], port: u16) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": "kube-apiserver-x1", "labels": {"kubernetes.io/service-name": "kube-apiserver",
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "ports": [{"name": "kube-apiserver", "port": port, "protocol": "TCP"}], "endpoints": endpoints})
}

/// The API of `object`'s kind (from its `apiVersion` and `kind`; the plural is the lower-case
/// kind with `s`, or `es` after an `s`) and the object.
pub fn api(client: &Client, object: &Value) -> anyhow::Result<(Api<DynamicObject>, DynamicObject)> {
    let api_version = object["apiVersion"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("object without apiVersion: {object}"))?;
    let kind = object["kind"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("object without kind: {object}"))?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let lower = kind.to_ascii_lowercase();
    let plural = if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    };
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let obj: DynamicObject = serde_json::from_value(object.clone())?;
    let api = match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    Ok((api, obj))
}

/// Creates `object`.
pub async fn create(client: &Client, object: &Value) -> anyhow::Result<()> {
    let (api, obj) = api(client, object)?;
    api.create(&kube::api::PostParams::default(), &obj)
        .await
        .map_err(|e| anyhow::anyhow!("creating {} {:?}: {e}", object["kind"], obj.metadata.name))?;
    Ok(())
}
