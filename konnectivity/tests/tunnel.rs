//! Our server and our agents end to end, on loopback, through both kube-apiserver frontends:
//! bytes both ways, half-close, the documented failure statuses, mTLS, DIAL_CLS and dial
//! timeouts, and the books (pending and established gauges) back at zero afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use agentkit::testing::EchoServer;
use common::*;
use konnectivity::proto::packet::Packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ESTABLISHED: &str = "konnectivity_network_proxy_server_established_connections";
const PENDING: &str = "konnectivity_network_proxy_server_pending_backend_dials";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_over_uds_carries_bytes_both_ways_and_half_close() {
    let certs = Certs::new("connect-uds");
    let server = Server::start_connect(&certs, &[]).await;
    let agent = AgentHandle::start(&certs, server.agent_addr, &["--agent-id=node-1"]).await;
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    // Half-close: the echo server sends everything back, then its own FIN.
    half_closed_echo(
        server.uds.as_ref().unwrap(),
        &echo.addr.to_string(),
        3 << 20,
        1,
    )
    .await;

    wait_for("the tunnel to be closed", || {
        server.metric(ESTABLISHED) == 0.0
    })
    .await;
    wait_for("the agent to drop the tunnel", || {
        agent.agent.tunnels() == 0
    })
    .await;
    assert_eq!(server.metric(PENDING), 0.0);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failures_get_upstreams_statuses_and_nothing_leaks() {
    let certs = Certs::new("connect-fail");
    let server = Server::start_connect(&certs, &["--backend-dial-timeout=2s"]).await;
    let path = server.uds.clone().unwrap();

    // No agent yet: 500 with upstream's body.
    let (status, body, _) = connect_uds(&path, "127.0.0.1:9").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("currently no tunnels available"), "{body}");

    let agent = AgentHandle::start(&certs, server.agent_addr, &["--dial-timeout=300ms"]).await;
    server.wait_agents(1).await;
    // Refused by the destination: 502 with the agent's error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = closed.local_addr().unwrap();
    drop(closed);
    let (status, body, _) = connect_uds(&path, &refused.to_string()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("refused"), "{body}");
    // The agent's dial timed out: 504.
    let (hole, _fillers, _listener) = black_hole();
    let (status, body, _) = connect_uds(&path, &hole.to_string()).await;
    assert_eq!(status, 504, "{body}");
    // Not CONNECT: 405; garbage: 400.
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");

    wait_for("no pending dials", || server.metric(PENDING) == 0.0).await;
    assert_eq!(server.metric(ESTABLISHED), 0.0);
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_over_tcp_requires_a_client_certificate() {
    let certs = Certs::new("connect-tcp");
    // Any port on the command line; the test binds port 0 instead.
    let server = Server::start_with(
        &certs,
        &[
            "--mode=http-connect",
            "--server-port=9443",
            &format!("--server-cert={}", certs.file("server.pem")),
            &format!("--server-key={}", certs.file("server-key.pem")),
            &format!("--server-ca-cert={}", certs.ca()),
        ],
        |config| config.frontend_tcp.as_mut().unwrap().0 = "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let frontend = server.frontend_tcp.unwrap();
    let agent = AgentHandle::start(&certs, server.agent_addr, &[]).await;
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    let tls = |cert: Option<&str>| {
        let ca = std::path::PathBuf::from(certs.ca());
        match cert {
            Some(name) => agentkit::tls::client_config_with_cert(
                &ca,
                &certs.dir.0.join(format!("{name}.pem")),
                &certs.dir.0.join(format!("{name}-key.pem")),
            )
            .unwrap(),
            None => agentkit::tls::client_config(&ca).unwrap(),
        }
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // With kube-apiserver's client certificate: through.
    let tcp = tokio::net::TcpStream::connect(frontend).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls(Some("client")))
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let (status, _) = connect_on(&mut stream, &echo.addr.to_string()).await;
    assert_eq!(status, 200);
    let data = payload(200_000, 2);
    assert!(echo_round_trip(stream, &data).await == data);
    // Without a certificate, or with one from another CA: no tunnel.
    for cert in [None, Some("intruder")] {
        let tcp = tokio::net::TcpStream::connect(frontend).await.unwrap();
        let refused = match tokio_rustls::TlsConnector::from(tls(cert))
            .connect(name.clone(), tcp)
            .await
        {
            Err(_) => true,
            Ok(mut stream) => {
                // TLS 1.3: the server's refusal arrives with the first read.
                let _ = stream
                    .write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
                    .await;
                let mut buf = [0u8; 64];
                !matches!(stream.read(&mut buf).await, Ok(n) if n > 0)
            }
        };
        assert!(
            refused,
            "a client without kube-apiserver's certificate ({cert:?}) got through"
        );
    }
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frontend_serves_many_proxy_streams_on_one_connection() {
    let certs = Certs::new("grpc");
    let uds = certs.file("konn.sock");
    let server = Server::start(
        &certs,
        &[
            "--mode=grpc",
            "--server-port=0",
            &format!("--uds-name={uds}"),
        ],
    )
    .await;
    let agent = AgentHandle::start(&certs, server.agent_addr, &[]).await;
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = GrpcClient::connect(server.uds.as_ref().unwrap()).await;

    let mut streams = Vec::new();
    for i in 0..20i64 {
        let client = &client;
        let echo = echo.addr.to_string();
        streams.push(async move {
            let data = payload(100_000 + i as usize, i as u64);
            // konnectivity-client writes whatever slice it is given: here 10 kB pieces.
            client.echo_tunnel(&echo, 1000 + i, &data, 10_000).await;
        });
    }
    futures_util::future::join_all(streams).await;
    wait_for("every tunnel closed", || server.metric(ESTABLISHED) == 0.0).await;
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;

    // A dial the client cancels (DIAL_CLS) while the agent is still connecting: nothing
    // stays pending on either side.
    let (hole, _fillers, _listener) = black_hole();
    let (mut send, _recv) = client.stream().await;
    send.send(&Packet::DialRequest {
        protocol: "tcp".into(),
        address: hole.to_string(),
        random: 77,
    })
    .await
    .unwrap();
    wait_for("the dial to reach the agent", || agent.agent.tunnels() == 1).await;
    send.send(&Packet::DialClose { random: 77 }).await.unwrap();
    wait_for("the agent to drop the cancelled dial", || {
        agent.agent.tunnels() == 0
    })
    .await;
    wait_for("no pending dial on the server", || {
        server.metric(PENDING) == 0.0
    })
    .await;

    // A dial nobody can serve gets DIAL_RSP with upstream's error text.
    let (_send, _recv, rsp) = client.dial("127.0.0.1:1", 5).await;
    assert!(
        matches!(rsp, Packet::DialResponse { ref error, random: 5, .. } if error.contains("refused")),
        "{rsp:?}"
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_dial_and_close_cycles_leave_descriptors_and_books_flat() {
    dial_and_close_cycles(false, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_and_close_cycles_over_quic_leave_descriptors_and_books_flat() {
    dial_and_close_cycles(true, 2_000).await;
}

async fn dial_and_close_cycles(quic: bool, cycles: usize) {
    let certs = Certs::new(if quic { "leaks-quic" } else { "leaks" });
    let uds = certs.file("konn.sock");
    let flags = [
        "--mode=http-connect",
        "--server-port=0",
        &format!("--uds-name={uds}"),
        "--backend-dial-timeout=2s",
    ];
    let (server, agent) = if quic {
        let server = Server::start_quic(&certs, &flags).await;
        let agent = AgentHandle::start_quic(&certs, &server, &["--dial-timeout=200ms"]).await;
        (server, agent)
    } else {
        let server = Server::start(&certs, &flags).await;
        let agent = AgentHandle::start(&certs, server.agent_addr, &["--dial-timeout=200ms"]).await;
        (server, agent)
    };
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let path = server.uds.clone().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = closed.local_addr().unwrap().to_string();
    drop(closed);

    let cycle = |i: usize| {
        let path = path.clone();
        let echo = echo.addr.to_string();
        let refused = refused.clone();
        async move {
            match i % 4 {
                // Established, one round trip, closed by the client.
                0 | 1 => {
                    let (status, _, stream) = connect_uds(&path, &echo).await;
                    assert_eq!(status, 200);
                    let data = payload(1000, i as u64);
                    assert!(echo_round_trip(stream, &data).await == data);
                }
                // A failed dial.
                2 => assert_eq!(connect_uds(&path, &refused).await.0, 502),
                // A client that goes away while the dial is pending.
                _ => {
                    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
                    stream
                        .write_all(
                            format!("CONNECT {echo} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                                .as_bytes(),
                        )
                        .await
                        .unwrap();
                    drop(stream);
                }
            }
        }
    };
    // Warm up (lazy statics, pools), then measure.
    for i in 0..200 {
        cycle(i).await;
    }
    wait_for("warm-up tunnels closed", || {
        server.metric(ESTABLISHED) == 0.0 && agent.agent.tunnels() == 0
    })
    .await;
    let fds_before = open_fds();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss_before = rss_kib();
    let mut i = 0;
    while i < cycles {
        // 8 at a time.
        let batch: Vec<_> = (i..i + 8).map(cycle).collect();
        futures_util::future::join_all(batch).await;
        i += 8;
    }
    wait_for("every tunnel closed", || {
        server.metric(ESTABLISHED) == 0.0 && server.metric(PENDING) == 0.0
    })
    .await;
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;
    wait_for("descriptors back to where they were", || {
        open_fds() <= fds_before + 4
    })
    .await;
    // Every tunnel's tasks ended (the echo server's own connection tasks included).
    wait_for("tasks back to where they were", || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            <= tasks_before + 4
    })
    .await;
    // Memory: a leaked tunnel holds at least its table entries and buffers (kilobytes); what
    // the allocator keeps in its free lists after thousands of cycles stays far below that.
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 16 << 10,
        "RSS grew by {grown} KiB over {cycles} cycles"
    );
    agent.stop().await;
    server.stop().await;
}

/// This process's resident set, in KiB.
fn rss_kib() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// As Gardener ran it: agents reach the server through the seed's SNI passthrough (here our
/// sni-proxy, routing the agent's SNI `--proxy-server-host` to the server's agent port), with
/// TLS end to end between agent and server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reaches_the_server_through_sni_proxy_passthrough() {
    let certs = Certs::new("through-sni");
    let server =
        Server::start_connect(&certs, &[&format!("--cluster-ca-cert={}", certs.ca())]).await;
    let config = sni_proxy::Config::from_yaml(&format!(
        "admin: {{address: '127.0.0.1:0'}}\n\
         listeners: [{{name: apiserver-sni, address: '127.0.0.1:0', mode: tls}}]\n\
         routes: [{{name: konnectivity, hosts: [localhost], backends: ['{}']}}]\n\
         unknown_sni: reject\n",
        server.agent_addr
    ))
    .unwrap();
    let proxy = sni_proxy::Proxy::bind(config, prometheus::Registry::new())
        .await
        .unwrap();
    let sni = proxy.listener_addrs()[0];
    let stop = agentkit::Shutdown::new();
    let running = tokio::spawn(proxy.run(stop.clone(), None));

    let agent = AgentHandle::start(
        &certs,
        sni,
        &[
            &format!("--agent-cert={}", certs.file("client.pem")),
            &format!("--agent-key={}", certs.file("client-key.pem")),
        ],
    )
    .await;
    server.wait_agents(1).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (status, _, stream) =
        connect_uds(server.uds.as_ref().unwrap(), &echo.addr.to_string()).await;
    assert_eq!(status, 200);
    let data = payload(1 << 20, 5);
    assert!(echo_round_trip(stream, &data).await == data);
    agent.stop().await;
    server.stop().await;
    stop.stop_accepting();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), running).await;
}
