//! One tunnel whose reader stops must not stall the others on the same agent (ANP#180,
//! ANP#881). A hundred tunnels stream from a destination while one more tunnel's frontend
//! never reads: every fast tunnel completes, and what the stalled one holds is bounded:
//! by the window between our server and agent (the destination is pushed back), or, with a
//! peer without flow control, by the tunnel's buffer, after which that tunnel alone is closed.
//! Throughput ratios are measured by the benchmark (bench/), not here.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use konnectivity::proto::packet::Packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const FAST_TUNNELS: usize = 100;
const PER_TUNNEL: usize = 512 << 10;

/// A destination that writes without end to whoever connects, counting what it wrote.
async fn source() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                // Out of descriptors, say: dropping the listener would reset connections
                // the agent already took for open.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let chunk = vec![0x5a; 64 << 10];
                // Bounded: 512 MiB at most, far more than any test reads.
                for _ in 0..8192 {
                    match tcp.write(&chunk).await {
                        Ok(n) => counter.fetch_add(n as u64, Ordering::Relaxed),
                        Err(_) => return,
                    };
                }
            });
        }
    });
    (addr, written)
}

async fn fast_tunnels_over_connect(server: &Server, to: &str) {
    let path = server.uds.clone().unwrap();
    let tunnels = (0..FAST_TUNNELS).map(|_| {
        let path = path.clone();
        let to = to.to_owned();
        async move {
            let (status, body, mut stream) = connect_uds(&path, &to).await;
            assert_eq!(status, 200, "{body}");
            let mut buf = vec![0u8; PER_TUNNEL];
            stream.read_exact(&mut buf).await.unwrap();
        }
    });
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(tunnels),
    )
    .await
    .expect("the fast tunnels finished while one tunnel was stalled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http_connect_tunnel_stalls_only_itself_and_pushes_back_on_its_source() {
    stalled_connect_tunnel(false).await;
}

/// The same over QUIC: each tunnel is a stream of its own, and QUIC's stream window pushes
/// back on the stalled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_quic_tunnel_stalls_only_itself_and_pushes_back_on_its_source() {
    stalled_connect_tunnel(true).await;
}

async fn stalled_connect_tunnel(quic: bool) {
    let certs = Certs::new(if quic { "iso-quic" } else { "iso-window" });
    let uds = certs.file("konn.sock");
    let flags = [
        "--mode=http-connect",
        "--server-port=0",
        &format!("--uds-name={uds}"),
    ];
    let (server, agent) = if quic {
        let server = Server::start_quic(&certs, &flags).await;
        let agent = AgentHandle::start_quic(&certs, &server, &[]).await;
        (server, agent)
    } else {
        let server = Server::start(&certs, &flags).await;
        let agent = AgentHandle::start(&certs, server.agent_addr, &[]).await;
        (server, agent)
    };
    server.wait_agents(1).await;
    let (slow, slow_written) = source().await;
    let (fast, _) = source().await;

    // The stalled tunnel: its frontend never reads.
    let (status, _, stalled) = connect_uds(server.uds.as_ref().unwrap(), &slow.to_string()).await;
    assert_eq!(status, 200);
    fast_tunnels_over_connect(&server, &fast.to_string()).await;

    // The window (512 KiB, on gRPC our extension's, on QUIC the stream's) plus the kernel's
    // socket buffers is all the stalled tunnel took from its source; without flow control
    // the agent would have read it all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = slow_written.load(Ordering::Relaxed);
    assert!(
        taken < 24 << 20,
        "the stalled tunnel's source wrote {taken} bytes: no pushback"
    );
    let queued = server.metric("konnectivity_network_proxy_server_tunnel_queued_bytes");
    assert!(
        queued <= f64::from(konnectivity::tunnel::DEFAULT_WINDOW),
        "server queues hold {queued} bytes"
    );
    assert!(server.metric("konnectivity_network_proxy_server_tunnel_blocked_seconds_total") >= 0.0);
    assert_eq!(
        server.metric("konnectivity_network_proxy_server_tunnel_overflows_total"),
        0.0
    );
    // Closed first, so the agent's drain has no open tunnel to wait for.
    drop(stalled);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_flow_control_the_stalled_tunnel_alone_is_closed_at_its_buffer() {
    let certs = Certs::new("iso-nowindow");
    // The agent plays an upstream agent: no window extension.
    let server = Server::start_connect(&certs, &["--tunnel-buffer=1048576"]).await;
    let agent = AgentHandle::start(&certs, server.agent_addr, &["--tunnel-window=0"]).await;
    server.wait_agents(1).await;
    let (slow, _) = source().await;
    let (fast, _) = source().await;

    let (status, _, mut stalled) =
        connect_uds(server.uds.as_ref().unwrap(), &slow.to_string()).await;
    assert_eq!(status, 200);
    fast_tunnels_over_connect(&server, &fast.to_string()).await;
    wait_for("the stalled tunnel to overflow", || {
        server.metric("konnectivity_network_proxy_server_tunnel_overflows_total") >= 1.0
    })
    .await;
    // Its frontend gets what was queued, then EOF: closed, not hung.
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut sink))
        .await
        .expect("the overflowed tunnel was closed")
        .unwrap();
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_stream_stalls_only_itself() {
    let certs = Certs::new("iso-grpc");
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
    let (slow, slow_written) = source().await;
    let (fast, _) = source().await;
    let client = GrpcClient::connect(server.uds.as_ref().unwrap()).await;

    // The stalled stream: dialled, then never read (HTTP/2 stream flow control stops the
    // server's sends to it; its queue fills to the window; the agent stops reading).
    let (stalled_send, stalled_recv, rsp) = client.dial(&slow.to_string(), 1).await;
    assert!(matches!(rsp, Packet::DialResponse { connect_id, .. } if connect_id > 0));

    let streams = (0..FAST_TUNNELS as i64).map(|i| {
        let client = &client;
        let fast = fast.to_string();
        async move {
            let (_send, mut recv, rsp) = client.dial(&fast, 100 + i).await;
            assert!(
                matches!(rsp, Packet::DialResponse { connect_id, .. } if connect_id > 0),
                "{rsp:?}"
            );
            let mut got = 0;
            while got < PER_TUNNEL {
                match recv.recv().await.unwrap() {
                    Some(Packet::Data { data, .. }) => got += data.len(),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    });
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(streams),
    )
    .await
    .expect("the fast streams finished while one stream was stalled");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = slow_written.load(Ordering::Relaxed);
    assert!(
        taken < 24 << 20,
        "the stalled stream's source wrote {taken} bytes: no pushback"
    );
    // Closed first, so the agent's drain has no open tunnel to wait for.
    drop((stalled_send, stalled_recv));
    agent.stop().await;
    server.stop().await;
}
