//! The tunnel with a real kube-apiserver (agentkit::testing::kube, built from the Go module
//! proxy): agents authenticated by TokenReview with projected-style tokens from the
//! TokenRequest API, and kube-apiserver's egress selector pointed at our server, reaching a
//! "node" in another network namespace through the node proxy.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use agentkit::testing::kube::ControlPlane;
use agentkit::testing::Hosts;
use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const AUDIENCE: &str = "system:konnectivity-server";

/// A token for `namespace/name` with `audience`, from the TokenRequest API (what a projected
/// service-account token volume holds).
async fn token(cp: &ControlPlane, namespace: &str, name: &str, audience: &str) -> String {
    let (status, body) = cp
        .request(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
            Some(&format!(
                r#"{{"apiVersion":"v1","kind":"ServiceAccount","metadata":{{"name":"{name}"}}}}"#
            )),
        )
        .await
        .unwrap();
    assert!(status == 201 || status == 409, "{status} {body}");
    let (status, body) = cp
        .request(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
            Some(&format!(
                r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{{"audiences":["{audience}"],"expirationSeconds":3600}}}}"#
            )),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["status"]["token"].as_str().unwrap().to_owned()
}

/// TokenReviews the API server has answered (its own counter).
async fn token_reviews(cp: &ControlPlane) -> f64 {
    let (_, metrics) = cp.request("GET", "/metrics", None).await.unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{") && l.contains(r#"resource="tokenreviews""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_admits_the_agents_service_account_once_and_refuses_the_rest() {
    let test = "token_review_admits_the_agents_service_account_once_and_refuses_the_rest";
    let Some(cp) = tokio::task::spawn_blocking(move || ControlPlane::shared(test))
        .await
        .unwrap()
    else {
        return;
    };
    let certs = Certs::new("tokenreview");
    let kubeconfig = cp.kubeconfig().to_string_lossy().into_owned();
    let server = Server::start_connect(
        &certs,
        &[
            "--agent-namespace=kube-system",
            "--agent-service-account=konnectivity-agent",
            &format!("--authentication-audience={AUDIENCE}"),
            &format!("--kubeconfig={kubeconfig}"),
        ],
    )
    .await;
    let write = |name: &str, token: &str| {
        let path = certs.file(name);
        std::fs::write(&path, token).unwrap();
        path
    };
    let good = write(
        "good",
        &token(cp, "kube-system", "konnectivity-agent", AUDIENCE).await,
    );

    // Five agents with the same token (a reconnect storm in miniature): one review.
    let before = token_reviews(cp).await;
    let mut agents = Vec::new();
    for i in 0..5 {
        agents.push(
            AgentHandle::start(
                &certs,
                server.agent_addr,
                &[
                    &format!("--service-account-token-path={good}"),
                    &format!("--agent-id=node-{i}"),
                ],
            )
            .await,
        );
        server.wait_agents(i + 1).await;
    }
    let reviews = token_reviews(cp).await - before;
    assert_eq!(
        reviews, 1.0,
        "TokenReviews for five connections with one token"
    );

    // Refused: another audience, another service account, garbage, none.
    let refused = [
        write(
            "audience",
            &token(cp, "kube-system", "konnectivity-agent", "other-audience").await,
        ),
        write(
            "account",
            &token(cp, "kube-system", "intruder", AUDIENCE).await,
        ),
        write("garbage", "not-a-token"),
    ];
    let mut bad_agents = Vec::new();
    for path in &refused {
        bad_agents.push(
            AgentHandle::start(
                &certs,
                server.agent_addr,
                &[&format!("--service-account-token-path={path}")],
            )
            .await,
        );
    }
    bad_agents.push(AgentHandle::start(&certs, server.agent_addr, &[]).await);
    let failures = "konnectivity_network_proxy_server_agent_auth_failures_total";
    wait_for("four refusals", || server.metric(failures) >= 4.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.metric("konnectivity_network_proxy_server_ready_backend_connections"),
        5.0
    );
    for agent in &bad_agents {
        assert_eq!(
            agent.metric("konnectivity_network_proxy_agent_open_server_connections"),
            0.0
        );
    }
    for agent in bad_agents.into_iter().chain(agents) {
        agent.stop().await;
    }
    server.stop().await;
}

/// A plain HTTP server in the namespace at `ip:port`, answering `hello from <ip>`.
fn node_http_server(hosts: &Hosts, host: u8, port: u16) {
    let ip = hosts.ip(host);
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let listener = hosts
        .netns
        .run(move || std::net::TcpListener::bind(addr).unwrap());
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let ip = ip.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {ip}\n");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
}

async fn create(cp: &ControlPlane, path: &str, body: &str) {
    let (status, reply) = cp.request("POST", path, Some(body)).await.unwrap();
    assert_eq!(status, 201, "POST {path}: {reply}");
}

/// kube-apiserver's egress selector (`cluster`, both protocols) sends node-proxy requests to
/// our server, which reaches the "node" in its network namespace through our agent. (The
/// service proxy takes the same egress dialer, but only to endpoints that are real pods with a
/// matching status, which need a kubelet here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_reaches_a_node_behind_the_agent_through_the_egress_selector() {
    let test = "kube_apiserver_reaches_a_node_behind_the_agent_through_the_egress_selector";
    let Some(hosts) = Hosts::create(test, "konn") else {
        return;
    };
    node_http_server(&hosts, 2, 8081);

    for (mode, protocol) in [("grpc", "GRPC"), ("http-connect", "HTTPConnect")] {
        let certs = Certs::new(&format!("egress-{mode}"));
        let uds = certs.file("konn.sock");
        let server = Server::start(
            &certs,
            &[
                &format!("--mode={mode}"),
                "--server-port=0",
                &format!("--uds-name={uds}"),
            ],
        )
        .await;
        let agent =
            AgentHandle::start(&certs, server.agent_addr, &["--agent-id=node-behind-nat"]).await;
        server.wait_agents(1).await;

        let egress = certs.file("egress.yaml");
        std::fs::write(
            &egress,
            format!(
                "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
                 - name: cluster\n  connection:\n    proxyProtocol: {protocol}\n    transport:\n      uds:\n        udsName: {uds}\n"
            ),
        )
        .unwrap();
        let args = vec![format!("--egress-selector-config-file={egress}")];
        let cp = match tokio::task::spawn_blocking(move || ControlPlane::start_with(&args))
            .await
            .unwrap()
        {
            Ok(cp) => cp,
            Err(error) => {
                assert!(
                    std::env::var("REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                    "{test}: the control plane did not start: {error:#}"
                );
                eprintln!("\n*** SKIP {test}: the control plane did not start: {error:#} ***\n");
                return;
            }
        };

        // A node at .2, as a kubelet registers it; the node proxy to a port other than the
        // kubelet's is plain HTTP through the egress dialer.
        let node_ip = hosts.ip(2);
        create(
            &cp,
            "/api/v1/nodes",
            &format!(
                r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"node-1"}},"status":{{"addresses":[{{"type":"InternalIP","address":"{node_ip}"}}],"daemonEndpoints":{{"kubeletEndpoint":{{"Port":10250}}}}}}}}"#
            ),
        )
        .await;
        let (status, body) = cp
            .request("GET", "/api/v1/nodes/http:node-1:8081/proxy/healthz", None)
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, format!("hello from {node_ip}\n").as_str()),
            "node proxy ({mode})"
        );

        let dials = server.metric("konnectivity_network_proxy_server_dial_duration_seconds_count");
        assert!(
            dials >= 1.0,
            "the request did not go through our server ({mode}): {dials} dials"
        );
        drop(cp);
        agent.stop().await;
        server.stop().await;
    }
}
