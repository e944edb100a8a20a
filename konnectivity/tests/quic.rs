//! The QUIC transport between our agent and our server: every tunnel a stream of its own,
//! through both kube-apiserver frontends, half-close, dial failures, mTLS on the QUIC plane,
//! and `--transport=auto` falling back to gRPC where QUIC cannot connect. Isolation and leaks
//! over QUIC are in `isolation.rs` and `tunnel.rs`, beside their gRPC twins.

#![allow(clippy::unwrap_used)]

mod common;

use agentkit::testing::EchoServer;
use common::*;

const ESTABLISHED: &str = "konnectivity_network_proxy_server_established_connections";
const FALLBACKS: &str = "konnectivity_network_proxy_agent_quic_fallback_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_tunnels_carry_bytes_both_ways_with_half_close_and_failures_map_to_statuses() {
    let certs = Certs::new("quic-connect");
    let server = Server::start_connect_quic(&certs, &[]).await;
    let agent = AgentHandle::start_quic(&certs, &server, &["--dial-timeout=300ms"]).await;
    server.wait_agents(1).await;
    assert_eq!(agent.metric(FALLBACKS), 0.0);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let path = server.uds.clone().unwrap();
    let echo_addr = echo.addr.to_string();

    half_closed_echo(&path, &echo_addr, 3 << 20, 1).await;
    // Many at once, each on its own stream.
    let many = (0..64).map(|i| half_closed_echo(&path, &echo_addr, 100_000, 10 + i));
    futures_util::future::join_all(many).await;

    // The agent's dial refused: 502 with its error; timed out: 504.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = closed.local_addr().unwrap();
    drop(closed);
    let (status, body, _) = connect_uds(&path, &refused.to_string()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("refused"), "{body}");
    let (hole, _fillers, _listener) = black_hole();
    let (status, body, _) = connect_uds(&path, &hole.to_string()).await;
    assert_eq!(status, 504, "{body}");

    // A client that closes without half-close: the agent's side of the stream ends too.
    let (status, _, stream) = connect_uds(&path, &echo_addr).await;
    assert_eq!(status, 200);
    let data = payload(10_000, 3);
    assert!(echo_round_trip(stream, &data).await == data);

    wait_for("every tunnel closed", || server.metric(ESTABLISHED) == 0.0).await;
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;
    // The agent goes: the server notices (its QUIC connection closes).
    agent.stop().await;
    server.wait_agents(0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frontend_streams_go_over_quic_tunnels() {
    let certs = Certs::new("quic-grpc");
    let uds = certs.file("konn.sock");
    let server = Server::start_quic(
        &certs,
        &[
            "--mode=grpc",
            "--server-port=0",
            &format!("--uds-name={uds}"),
        ],
    )
    .await;
    let agent = AgentHandle::start_quic(&certs, &server, &[]).await;
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = GrpcClient::connect(server.uds.as_ref().unwrap()).await;

    let streams = (0..16i64).map(|i| {
        let client = &client;
        let echo = echo.addr.to_string();
        async move {
            let data = payload(300_000, i as u64);
            client.echo_tunnel(&echo, 1000 + i, &data, 16 << 10).await;
        }
    });
    futures_util::future::join_all(streams).await;
    wait_for("every tunnel closed", || server.metric(ESTABLISHED) == 0.0).await;
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_grpc_where_quic_cannot_connect() {
    let certs = Certs::new("quic-auto");
    // A server without QUIC: nothing answers on UDP.
    let server = Server::start_connect(&certs, &[]).await;
    let agent = AgentHandle::start(&certs, server.agent_addr, &["--transport=auto"]).await;
    server.wait_agents(1).await;
    assert!(agent.metric(FALLBACKS) >= 1.0);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    half_closed_echo(
        server.uds.as_ref().unwrap(),
        &echo.addr.to_string(),
        1 << 20,
        4,
    )
    .await;
    agent.stop().await;
    server.stop().await;

    // With QUIC on the server, auto takes QUIC.
    let server = Server::start_connect_quic(&certs, &[]).await;
    let quic_port = format!(
        "--proxy-server-quic-port={}",
        server.agent_quic.unwrap().port()
    );
    let agent =
        AgentHandle::start(&certs, server.agent_addr, &["--transport=auto", &quic_port]).await;
    server.wait_agents(1).await;
    assert_eq!(agent.metric(FALLBACKS), 0.0);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_plane_requires_the_agents_client_certificate() {
    let certs = Certs::new("quic-mtls");
    let server =
        Server::start_connect_quic(&certs, &[&format!("--cluster-ca-cert={}", certs.ca())]).await;
    // Without a certificate, and with one from another CA: refused in the handshake.
    let intruder = [
        format!("--agent-cert={}", certs.file("intruder.pem")),
        format!("--agent-key={}", certs.file("intruder-key.pem")),
    ];
    for extra in [&[][..], &intruder[..]] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let agent = AgentHandle::start_quic(&certs, &server, &extra).await;
        wait_for("a refused handshake", || {
            agent.metric("konnectivity_network_proxy_agent_server_connection_failure_count") >= 1.0
        })
        .await;
        assert_eq!(
            server.metric("konnectivity_network_proxy_server_ready_backend_connections"),
            0.0
        );
        agent.stop().await;
    }
    wait_for("both refusals counted by the server", || {
        server.metric("konnectivity_network_proxy_server_agent_auth_failures_total") >= 2.0
    })
    .await;
    // With its certificate: connected.
    let agent = AgentHandle::start_quic(
        &certs,
        &server,
        &[
            &format!("--agent-cert={}", certs.file("client.pem")),
            &format!("--agent-key={}", certs.file("client-key.pem")),
        ],
    )
    .await;
    server.wait_agents(1).await;
    agent.stop().await;
    server.stop().await;
}
