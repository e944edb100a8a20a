//! The real control plane of `agentkit::testing::kube`: the API server is ready, authenticates
//! the admin certificate and nobody without one, stores and returns objects, serves the Gateway
//! API and Istio CRDs as published (with their validation), streams lists (etcd's watch
//! progress), and stops when its owner goes away.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use agentkit::testing::kube::{self, ControlPlane};

/// The body with `"key": value` written as `"key":value`, whichever way the server printed it.
fn compact(body: &str) -> String {
    body.replace("\": ", "\":")
}

async fn shared(test: &'static str) -> Option<&'static ControlPlane> {
    tokio::task::spawn_blocking(move || ControlPlane::shared(test))
        .await
        .unwrap()
}

#[tokio::test]
async fn api_server_is_ready_and_authenticates_the_admin() {
    let Some(cp) = shared("api_server_is_ready_and_authenticates_the_admin").await else {
        return;
    };
    let (status, body) = cp.request("GET", "/readyz", None).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (status, body) = cp.request("GET", "/version", None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(compact(&body).contains("\"gitVersion\":\"v1.37."), "{body}");

    // Without a client certificate the same server refuses the request: the admin certificate
    // is what authorizes the fixture.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut cp.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (status, body) = kube::request(
        cp.addr(),
        std::sync::Arc::new(anonymous),
        "GET",
        "/api/v1/namespaces",
        None,
    )
    .await
    .unwrap();
    assert!(status == 401 || status == 403, "{status} {body}");

    let kubeconfig = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    assert!(
        kubeconfig.contains(&format!("server: {}", cp.server())),
        "{kubeconfig}"
    );
    assert!(cp.client_cert_pem().contains("BEGIN CERTIFICATE"));
    assert!(cp.client_key_pem().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn namespace_is_stored_and_read_back() {
    let Some(cp) = shared("namespace_is_stored_and_read_back").await else {
        return;
    };
    let name = format!("kube-fixture-{}", std::process::id());
    let (status, body) = cp
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(&format!(
                r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#
            )),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .request("GET", &format!("/api/v1/namespaces/{name}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        compact(&body).contains(&format!("\"name\":\"{name}\"")),
        "{body}"
    );
    assert!(compact(&body).contains("\"phase\":\"Active\""), "{body}");
    let (status, body) = cp
        .request("GET", "/api/v1/namespaces/no-such-namespace", None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
}

/// A streaming list (watch with `sendInitialEvents`, what kube-rs's `streaming_lists()` asks
/// for) needs etcd's watch progress requests: the initial events end with a bookmark.
#[tokio::test]
async fn watch_list_ends_its_initial_events_with_a_bookmark() {
    let Some(cp) = shared("watch_list_ends_its_initial_events_with_a_bookmark").await else {
        return;
    };
    let (status, body) = cp
        .request(
            "GET",
            "/api/v1/namespaces?watch=1&sendInitialEvents=true&allowWatchBookmarks=true\
             &resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body.lines().collect();
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""type":"ADDED""#) && e.contains(r#""name":"kube-system""#)),
        "{body}"
    );
    let last = events.last().copied().unwrap_or_default();
    assert!(
        last.contains(r#""type":"BOOKMARK""#)
            && last.contains(r#""k8s.io/initial-events-end":"true""#),
        "{body}"
    );
}

#[tokio::test]
async fn gateway_api_and_istio_crds_are_served() {
    let Some(cp) = shared("gateway_api_and_istio_crds_are_served").await else {
        return;
    };
    for (path, list) in [
        (
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/tlsroutes",
            "TLSRouteList",
        ),
        (
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways",
            "GatewayList",
        ),
        (
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
            "GatewayClassList",
        ),
        (
            "/apis/networking.istio.io/v1/namespaces/default/gateways",
            "GatewayList",
        ),
        (
            "/apis/networking.istio.io/v1/namespaces/default/virtualservices",
            "VirtualServiceList",
        ),
        (
            "/apis/networking.istio.io/v1/namespaces/default/destinationrules",
            "DestinationRuleList",
        ),
        (
            "/apis/networking.istio.io/v1beta1/namespaces/default/virtualservices",
            "VirtualServiceList",
        ),
    ] {
        let (status, body) = cp.request("GET", path, None).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            compact(&body).contains(&format!("\"kind\":\"{list}\"")),
            "{path}: {body}"
        );
    }
    // Only what the standard channel serves: its TLSRoute CRD lists v1alpha2 as not served.
    let (status, _) = cp
        .request(
            "GET",
            "/apis/gateway.networking.k8s.io/v1alpha2/namespaces/default/tlsroutes",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tls_route_is_validated_by_the_published_schema() {
    let Some(cp) = shared("tls_route_is_validated_by_the_published_schema").await else {
        return;
    };
    let route = |name: &str, hostname: &str| {
        format!(
            r#"{{"apiVersion":"gateway.networking.k8s.io/v1","kind":"TLSRoute",
               "metadata":{{"name":"{name}","namespace":"default"}},
               "spec":{{"parentRefs":[{{"name":"sni-proxy"}}],"hostnames":["{hostname}"],
                        "rules":[{{"backendRefs":[{{"name":"kube-apiserver","port":443}}]}}]}}}}"#
        )
    };
    let collection = "/apis/gateway.networking.k8s.io/v1/namespaces/default/tlsroutes";
    let (status, body) = cp
        .request("POST", collection, Some(&route("good", "api.a.test")))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .request("GET", &format!("{collection}/good"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"api.a.test\""), "{body}");
    // The published CRD forbids IP addresses as hostnames; a retyped one might not.
    let (status, body) = cp
        .request("POST", collection, Some(&route("ip", "10.1.2.3")))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
}

#[test]
fn a_private_control_plane_stops_when_dropped() {
    // Skips (or fails under REQUIRE_PRIVILEGED=1) the same way when nothing can start.
    if ControlPlane::shared("a_private_control_plane_stops_when_dropped").is_none() {
        return;
    }
    let cp = ControlPlane::start().unwrap();
    let dir = cp.dir().to_owned();
    let pids = pids(&cp);
    assert_eq!(pids.len(), 3, "linger, etcd, kube-apiserver: {pids:?}");
    for pid in &pids {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    drop(cp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() || pids.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "still there 30 s after drop: dir {} exists: {}, pids {pids:?}",
            dir.display(),
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether pid runs (a zombie waiting for its reaper does not count).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
        })
        .unwrap_or(false)
}

/// `compact` makes etcd forget older revisions; `restart` kills the API server and brings it
/// back with its objects, recording the new process (so dropping the control plane stops it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forgets_old_revisions_and_a_restarted_api_server_keeps_its_objects() {
    let test = "compaction_forgets_old_revisions_and_a_restarted_api_server_keeps_its_objects";
    if shared(test).await.is_none() {
        return;
    }
    // Private: a restart disturbs every client of the control plane.
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .unwrap()
        .unwrap();
    let (status, body) = cp
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"before-restart"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let created: u64 = resource_version(&body);
    // A list at exactly that revision, which only etcd (or the API server's cache of it) has.
    let exact = format!("/api/v1/namespaces?resourceVersion={created}&resourceVersionMatch=Exact");
    let (status, body) = cp.request("GET", &exact, None).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // Compaction keeps the revision it is made at: write once more so that `created` is older.
    let (status, body) = cp
        .request(
            "POST",
            "/api/v1/namespaces",
            Some(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"later"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");

    let cp = std::sync::Arc::new(cp);
    let compacting = cp.clone();
    let revision = tokio::task::spawn_blocking(move || compacting.compact())
        .await
        .unwrap()
        .unwrap();
    assert!(revision > created, "{revision} > {created}");

    let before = pids(&cp);
    let started = Instant::now();
    let restarting = cp.clone();
    tokio::task::spawn_blocking(move || {
        restarting.restart("kube-apiserver", Duration::from_secs(1))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let after = pids(&cp);
    assert_eq!(after.len(), before.len());
    assert_eq!(after[..2], before[..2], "linger and etcd untouched");
    assert_ne!(after[2], before[2], "a new kube-apiserver");
    assert!(alive(after[2]) && !alive(before[2]));
    let (status, body) = cp.request("GET", "/readyz", None).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = cp
        .request("GET", "/api/v1/namespaces/before-restart", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // The restarted API server's cache starts after the compaction, so the old revision is
    // asked of etcd, which has forgotten it. (Before the restart, the running server's cache
    // could still answer it.)
    let (status, body) = cp.request("GET", &exact, None).await.unwrap();
    assert_eq!(status, 410, "{body}");

    let cp = std::sync::Arc::into_inner(cp).unwrap();
    drop(cp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while after.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "{after:?} still running 30 s after drop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pids `DIR/kubecp.json` records, in start order.
fn pids(cp: &ControlPlane) -> Vec<i32> {
    let state = std::fs::read_to_string(cp.dir().join("kubecp.json")).unwrap();
    state
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"pid\": "))
        .map(|p| p.trim_end_matches(',').parse().unwrap())
        .collect()
}

/// `metadata.resourceVersion` of an object in JSON.
fn resource_version(body: &str) -> u64 {
    let object: serde_yaml::Value = serde_yaml::from_str(body).unwrap();
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {body}"))
}
