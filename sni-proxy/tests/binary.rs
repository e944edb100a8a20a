//! The real binary: `--check`, SIGHUP reload, SIGTERM drain.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use agentkit::testing::{client_hello, EchoServer};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_sni-proxy");

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sni-proxy-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_accepts_the_example_and_names_the_bad_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/example.yaml");
    let out = Command::new(BIN)
        .args(["--config", example, "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 listeners, 2 routes)"));

    let bad = std::fs::read_to_string(example)
        .unwrap()
        .replace("127.0.2.2:9443", "127.0.2.2:99999");
    let path = tmp("bad.yaml", &bad);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[1].backends[0]: `127.0.2.2:99999` is not an address"),
        "{err}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_drains() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = |hosts: &str| {
        format!(
            "admin: {{address: '127.0.0.1:{admin}'}}\nlisteners: [{{name: l, address: '127.0.0.1:{port}', mode: tls}}]\n\
             routes: [{{name: a, hosts: [{hosts}], backends: ['{}']}}]\nreload_interval: 1h\ntimeouts: {{shutdown_grace: 10s}}\n",
            echo.addr
        )
    };
    let path = tmp("run.yaml", &config("a.test"));
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("ready", || async {
        match TcpStream::connect(admin_addr).await {
            Ok(_) => http_get(admin_addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200"),
            Err(_) => false,
        }
    })
    .await;
    let hello = client_hello("a.test", &[]).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(read_n(&mut s, hello.len()).await, hello);

    // SIGHUP picks up the new host at once (the poll interval is an hour).
    std::fs::write(&path, config("b.test")).unwrap();
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let hello_b = client_hello("b.test", &[]).unwrap();
    eventually("reloaded", || async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&hello_b).await.unwrap();
        let mut buf = vec![0u8; hello_b.len()];
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::io::AsyncReadExt::read_exact(&mut c, &mut buf)
            )
            .await,
            Ok(Ok(_))
        )
    })
    .await;

    // SIGTERM: not ready, no new connections, the open one still relays, then exit 0.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    eventually("stopped accepting", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    s.write_all(b"still here").await.unwrap();
    assert_eq!(read_n(&mut s, 10).await, b"still here");
    s.shutdown().await.unwrap();
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
