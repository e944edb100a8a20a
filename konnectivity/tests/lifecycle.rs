//! Rollouts and failures: an agent that drains (SIGTERM) is avoided for new dials while its
//! open tunnels finish; agents behind a load balancer reach every server replica; a replica
//! killed under load loses exactly its own tunnels, the others carry on, new dials succeed,
//! and the agent reconnects when the replica is back.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentkit::testing::EchoServer;
use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const DIALS: &str = "konnectivity_network_proxy_agent_dial_duration_seconds_count";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_gets_no_new_dials_and_finishes_its_open_tunnels() {
    let certs = Certs::new("drain");
    let server = Server::start_connect(&certs, &[]).await;
    let a = AgentHandle::start(
        &certs,
        server.agent_addr,
        &["--agent-id=a", "--drain-timeout=20s"],
    )
    .await;
    let b = AgentHandle::start(&certs, server.agent_addr, &["--agent-id=b"]).await;
    server.wait_agents(2).await;
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let path = server.uds.clone().unwrap();

    // Open tunnels until one goes through a (the strategy is random).
    let mut on_a = None;
    for _ in 0..64 {
        let (status, _, stream) = connect_uds(&path, &echo.addr.to_string()).await;
        assert_eq!(status, 200);
        if a.agent.tunnels() == 1 {
            on_a = Some(stream);
            break;
        }
        drop(stream);
        wait_for("b's tunnel closed", || b.agent.tunnels() == 0).await;
    }
    let mut on_a = on_a.expect("a tunnel through agent a");

    // SIGTERM to a: DRAIN, and it keeps running while its tunnel is open.
    let a_dials = a.metric(DIALS);
    a.shutdown.stop_accepting();
    wait_for("the server to see a draining", || {
        server.metric("konnectivity_network_proxy_server_ready_backends") == 1.0
    })
    .await;
    for _ in 0..20 {
        let (status, _, stream) = connect_uds(&path, &echo.addr.to_string()).await;
        assert_eq!(status, 200);
        assert!(echo_round_trip(stream, b"ping").await == b"ping");
    }
    assert_eq!(a.metric(DIALS), a_dials, "a draining agent got new dials");
    // The tunnel through a still works, and ends when its client does.
    on_a.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    on_a.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    drop(on_a);
    tokio::time::timeout(Duration::from_secs(10), a.stop())
        .await
        .expect("a exits once its tunnel is done");
    server.wait_agents(1).await;
    b.stop().await;
    server.stop().await;
}

/// A round-robin TCP load balancer in front of the server replicas' agent ports.
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let list = Arc::clone(&backends);
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = {
                    let list = list.lock().unwrap();
                    list[next.fetch_add(1, Ordering::Relaxed) % list.len()]
                };
                tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Balancer { addr, backends }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_only_its_tunnels_and_the_agent_reconnects() {
    let certs = Certs::new("replicas");
    let (uds1, uds2) = (certs.file("s1.sock"), certs.file("s2.sock"));
    let start = |id: &'static str, uds: String, port: u16| {
        let certs = &certs;
        async move {
            Server::start_with(
                certs,
                &[
                    "--mode=http-connect",
                    "--server-port=0",
                    &format!("--uds-name={uds}"),
                    &format!("--server-id={id}"),
                    "--server-count=2",
                ],
                move |config| config.agent_addr.set_port(port),
            )
            .await
        }
    };
    let s1 = start("s1", uds1.clone(), 0).await;
    let s2 = start("s2", uds2.clone(), 0).await;
    let s1_port = s1.agent_addr.port();
    let lb = Balancer::start(vec![s1.agent_addr, s2.agent_addr]).await;
    let agent = AgentHandle::start(&certs, lb.addr, &["--agent-id=node"]).await;
    s1.wait_agents(1).await;
    s2.wait_agents(1).await;
    assert_eq!(
        agent.metric("konnectivity_network_proxy_agent_known_server_count"),
        2.0
    );

    // Ten streaming tunnels through each replica.
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut tunnels = Vec::new();
    for (replica, uds) in [("s1", &uds1), ("s2", &uds2)] {
        for _ in 0..10 {
            let (status, _, stream) =
                connect_uds(std::path::Path::new(uds), &echo.addr.to_string()).await;
            assert_eq!(status, 200);
            tunnels.push((replica, stream));
        }
    }
    // Kill s1 (forced, no grace) while every tunnel is busy.
    s1.shutdown.stop_accepting();
    s1.shutdown.force_close();
    s1.stop().await;
    let mut lost = Vec::new();
    for (i, (replica, mut stream)) in tunnels.into_iter().enumerate() {
        let data = payload(64 << 10, i as u64);
        let exchange = async {
            stream.write_all(&data).await?;
            let mut back = vec![0u8; data.len()];
            stream.read_exact(&mut back).await?;
            anyhow::ensure!(back == data, "bytes changed");
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => lost.push((i, replica)),
            Err(_) => panic!("tunnel {i} via {replica} hung instead of failing or working"),
        }
    }
    assert!(
        lost.iter().all(|(_, r)| *r == "s1"),
        "tunnels lost: {lost:?}"
    );
    assert_eq!(
        lost.len(),
        10,
        "exactly s1's ten tunnels are lost: {lost:?}"
    );
    wait_for("the agent's books at zero", || agent.agent.tunnels() == 0).await;

    // New dials through the surviving replica work at once.
    for _ in 0..10 {
        let (status, _, stream) =
            connect_uds(std::path::Path::new(&uds2), &echo.addr.to_string()).await;
        assert_eq!(status, 200);
        assert!(echo_round_trip(stream, b"after").await == b"after");
    }
    // s1 comes back on its port: the agent reconnects to it.
    let s1 = start("s1", uds1.clone(), s1_port).await;
    tokio::time::timeout(Duration::from_secs(30), s1.wait_agents(1))
        .await
        .expect("the agent reconnected to s1");
    let (status, _, stream) =
        connect_uds(std::path::Path::new(&uds1), &echo.addr.to_string()).await;
    assert_eq!(status, 200);
    assert!(echo_round_trip(stream, b"back").await == b"back");
    drop(lb.backends);
    agent.stop().await;
    s1.stop().await;
    s2.stop().await;
}
