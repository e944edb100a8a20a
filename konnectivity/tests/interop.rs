//! Interop with the real upstream, built from the Go module proxy by `scripts/anp-bin` at
//! two pinned tags (test/anp: v0.36.0, current; v0.0.30, 2022): our server with upstream
//! agents, upstream servers with our agents, and upstream `konnectivity-client` (anp-client,
//! playing kube-apiserver) against our server in gRPC/UDS, HTTP-CONNECT/UDS and
//! HTTP-CONNECT/TCP+mTLS. Every tunnel carries 1 MiB through an echo server and checks it.
//!
//! Without Go, a loud SKIP; `REQUIRE_PRIVILEGED=1` (CI) makes that a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentkit::testing::EchoServer;
use common::*;

/// The directory of upstream's binaries for `name`, building them on first use.
fn anp(name: &str, test: &str) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/anp-bin");
    let result = Command::new(&script)
        .arg(name)
        .stderr(Stdio::inherit())
        .output();
    let error = match result {
        Ok(out) if out.status.success() => {
            return Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()));
        }
        Ok(out) => format!("{} {name}: {}", script.display(), out.status),
        Err(e) => format!("{}: {e}", script.display()),
    };
    assert!(
        std::env::var("REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test}: upstream apiserver-network-proxy could not be built and REQUIRE_PRIVILEGED=1 forbids skipping: {error}"
    );
    eprintln!(
        "\n*** SKIP {test}: upstream apiserver-network-proxy could not be built: {error} ***\n"
    );
    None
}

/// A port in 1024..49151 (upstream refuses others, and 0) that is free now.
fn free_port() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 25_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
}

/// An upstream process, killed on drop; its output is kept for failure messages.
struct Upstream {
    child: Child,
    log: PathBuf,
}

impl Upstream {
    fn spawn(program: &Path, args: &[String], log: PathBuf) -> Upstream {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        Upstream { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for an upstream health port's `/readyz` to answer 200.
async fn ready(port: u16, who: &Upstream) {
    for _ in 0..300 {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = tcp.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await;
            let mut answer = String::new();
            let _ = tcp.read_to_string(&mut answer).await;
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("upstream never became ready:\n{}", who.output());
}

/// Runs anp-client (blocking, bounded by its own -timeout) and asserts it succeeded.
async fn client(bin: &Path, args: &[String]) -> serde_json::Value {
    let program = bin.join("anp-client");
    let args = args.to_vec();
    let out =
        tokio::task::spawn_blocking(move || Command::new(&program).args(&args).output().unwrap())
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "anp-client failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(summary["ok"], true, "{stdout}");
    summary
}

fn upstream_agent(bin: &Path, certs: &Certs, server: SocketAddr, id: &str) -> Upstream {
    let health = free_port();
    Upstream::spawn(
        &bin.join("proxy-agent"),
        &[
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={}", server.port()),
            format!("--ca-cert={}", certs.ca()),
            format!("--agent-id={id}"),
            format!("--health-server-port={health}"),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=200ms".into(),
        ],
        certs.dir.0.join(format!("agent-{id}.log")),
    )
}

/// Our server (both frontend modes on UDS) with an upstream agent; anp-client dials through.
async fn our_server_with_upstream_agent(version: &str) {
    let test = format!("our_server_with_upstream_agent_{version}");
    let Some(bin) = anp(version, &test) else {
        return;
    };
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for mode in ["grpc", "http-connect"] {
        let certs = Certs::new(&format!("interop-{version}-{mode}"));
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
        let agent = upstream_agent(&bin, &certs, server.agent_addr, "upstream-agent");
        tokio::time::timeout(Duration::from_secs(30), server.wait_agents(1))
            .await
            .unwrap_or_else(|_| panic!("the upstream agent never connected:\n{}", agent.output()));
        let summary = client(
            &bin,
            &[
                "-mode".into(),
                mode.into(),
                "-uds".into(),
                uds.clone(),
                "-address".into(),
                echo.addr.to_string(),
                "-bytes".into(),
                "1048576".into(),
                "-count".into(),
                "3".into(),
                "-parallel".into(),
                "4".into(),
            ],
        )
        .await;
        assert_eq!(summary["tunnels"], 12, "{summary}");
        wait_for("tunnels closed through the upstream agent", || {
            server.metric("konnectivity_network_proxy_server_established_connections") == 0.0
        })
        .await;
        drop(agent);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_with_upstream_agent_current() {
    our_server_with_upstream_agent("current").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_with_upstream_agent_v2022() {
    our_server_with_upstream_agent("v2022").await;
}

/// An upstream server with our agent; anp-client dials through.
async fn upstream_server_with_our_agent(version: &str, modes: &[&str]) {
    let test = format!("upstream_server_with_our_agent_{version}");
    let Some(bin) = anp(version, &test) else {
        return;
    };
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for mode in modes {
        let certs = Certs::new(&format!("up-{version}-{mode}"));
        let uds = certs.file("konn.sock");
        let (agent_port, health) = (free_port(), free_port());
        let server = Upstream::spawn(
            &bin.join("proxy-server"),
            &[
                format!("--mode={mode}"),
                format!("--uds-name={uds}"),
                "--delete-existing-uds-file=true".into(),
                "--server-port=0".into(),
                format!("--agent-port={agent_port}"),
                format!("--cluster-cert={}", certs.file("server.pem")),
                format!("--cluster-key={}", certs.file("server-key.pem")),
                format!("--health-port={health}"),
                format!("--admin-port={}", free_port()),
                "--server-id=upstream-server".into(),
                "--server-count=1".into(),
            ],
            certs.dir.0.join("server.log"),
        );
        let agent = AgentHandle::start(
            &certs,
            format!("127.0.0.1:{agent_port}").parse().unwrap(),
            &["--agent-id=ours"],
        )
        .await;
        ready(health, &server).await;
        wait_for("our agent connected to the upstream server", || {
            agent.metric("konnectivity_network_proxy_agent_open_server_connections") == 1.0
        })
        .await;
        let summary = client(
            &bin,
            &[
                "-mode".into(),
                mode.to_string(),
                "-uds".into(),
                uds.clone(),
                "-address".into(),
                echo.addr.to_string(),
                "-bytes".into(),
                "1048576".into(),
                "-count".into(),
                "3".into(),
                "-parallel".into(),
                "4".into(),
            ],
        )
        .await;
        assert_eq!(summary["tunnels"], 12, "{summary}");
        // Upstream's side gave us no extension: plain upstream protocol on this stream.
        wait_for("our agent's tunnels closed", || agent.agent.tunnels() == 0).await;
        agent.stop().await;
        drop(server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_server_with_our_agent_current() {
    upstream_server_with_our_agent("current", &["grpc", "http-connect"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_server_with_our_agent_v2022() {
    // v0.0.30's HTTP-CONNECT answers 200 before dialling; gRPC is the mode to compare.
    upstream_server_with_our_agent("v2022", &["grpc"]).await;
}

/// konnectivity-client against our server: reusable streams over one connection (gRPC), and
/// HTTP CONNECT over TCP with kube-apiserver's client certificate, and a refused dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_modes_against_our_server() {
    let Some(bin) = anp("current", "upstream_client_modes_against_our_server") else {
        return;
    };
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let certs = Certs::new("client-modes");
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
    let summary = client(
        &bin,
        &[
            "-mode".into(),
            "grpc".into(),
            "-uds".into(),
            uds.clone(),
            "-reusable".into(),
            "-address".into(),
            echo.addr.to_string(),
            "-bytes".into(),
            "262144".into(),
            "-count".into(),
            "5".into(),
            "-parallel".into(),
            "8".into(),
        ],
    )
    .await;
    assert_eq!(summary["tunnels"], 40, "{summary}");
    // A destination that refuses: the client gets the dial error, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = closed.local_addr().unwrap();
    drop(closed);
    let summary = client(
        &bin,
        &[
            "-mode".into(),
            "grpc".into(),
            "-uds".into(),
            uds,
            "-address".into(),
            refused.to_string(),
            "-expect-fail".into(),
        ],
    )
    .await;
    assert_eq!(summary["failed"], true, "{summary}");
    assert!(
        summary["error"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "{summary}"
    );
    agent.stop().await;
    server.stop().await;

    // HTTP CONNECT over TCP+mTLS, as Gardener's kube-apiserver ran it (port 9443).
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
    let agent = AgentHandle::start(&certs, server.agent_addr, &[]).await;
    server.wait_agents(1).await;
    let summary = client(
        &bin,
        &[
            "-mode".into(),
            "http-connect".into(),
            "-tcp".into(),
            server.frontend_tcp.unwrap().to_string(),
            "-ca".into(),
            certs.ca(),
            "-cert".into(),
            certs.file("client.pem"),
            "-key".into(),
            certs.file("client-key.pem"),
            "-address".into(),
            echo.addr.to_string(),
            "-bytes".into(),
            "1048576".into(),
            "-count".into(),
            "2".into(),
            "-parallel".into(),
            "4".into(),
        ],
    )
    .await;
    assert_eq!(summary["tunnels"], 8, "{summary}");
    agent.stop().await;
    server.stop().await;
}
