//! Privileged: a client in its own network namespace reaches the proxy over a veth pair with a
//! 1500-byte MTU and a small MSS, so its post-quantum-sized ClientHello crosses a real link in
//! several TCP segments. Skips loudly without root; fails under `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use agentkit::testing::{
    client_hello, padding_alpn, require_privileges, run_command, EchoServer, NetNs,
};
use common::*;

/// A network namespace joined to the host by a veth pair (deleted with the namespace).
fn veth_namespace(id: u32, host_cidr: &str, ns_cidr: &str) -> NetNs {
    let ns = NetNs::create("snip");
    let (host, peer) = (format!("snh{id}"), format!("snp{id}"));
    let ip = |args: &[&str]| {
        run_command("ip", args);
    };
    ip(&[
        "link", "add", &host, "mtu", "1500", "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["link", "set", &peer, "netns", ns.name()]);
    ip(&["addr", "add", host_cidr, "dev", &host]);
    ip(&["link", "set", &host, "up"]);
    ip(&["-n", ns.name(), "addr", "add", ns_cidr, "dev", &peer]);
    ip(&["-n", ns.name(), "link", "set", &peer, "up"]);
    ns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_quantum_hello_from_another_namespace_over_a_veth() {
    if !require_privileges("post_quantum_hello_from_another_namespace_over_a_veth") {
        return;
    }
    let id = std::process::id() % 100_000;
    // 198.18.0.0/15 is reserved for benchmarking networks: our own test hosts only.
    let third = (id % 250) as u8;
    let (host_ip, ns_ip) = (format!("198.18.{third}.1"), format!("198.18.{third}.2"));
    let ns = veth_namespace(id, &format!("{host_ip}/24"), &format!("{ns_ip}/24"));
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: veth, address: '{host_ip}:0', mode: tls}}]\nroutes: [{{name: e, hosts: [api.pq.test], backends: ['{}']}}]\n",
        echo.addr
    ))
    .await;
    let target = proxy.addrs[0];
    let hello = client_hello("api.pq.test", &padding_alpn(1300)).unwrap();
    assert!(hello.len() > 1500);
    let sent = hello.clone();
    let echoed = tokio::task::spawn_blocking(move || {
        ns.run(move || {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // A small MSS: the hello leaves in four or more segments.
            socket.set_mss(536).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            socket.connect(&target.into()).unwrap();
            let mut stream: std::net::TcpStream = socket.into();
            stream.write_all(&sent).unwrap();
            let mut back = vec![0u8; sent.len()];
            stream.read_exact(&mut back).unwrap();
            back
        })
    })
    .await
    .unwrap();
    assert_eq!(echoed, hello);
    assert_eq!(
        proxy
            .metric("sni_proxy_connections_total{listener=\"veth\",route=\"e\"}")
            .await,
        1.0
    );
}
