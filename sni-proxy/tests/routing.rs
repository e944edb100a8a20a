//! Routing with real sockets: SNI (exact, wildcard, unknown, split and post-quantum-sized
//! ClientHellos), HTTP CONNECT, and PROXY protocol in both directions.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use agentkit::testing::{client_hello, get_version, padding_alpn, EchoServer, Pki, VersionServer};
use common::*;
use rustls::pki_types::ServerName;
use sni_proxy::protocol::{client_hello::ALERT_UNRECOGNIZED_NAME, proxy_protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Shoots {
    pki: Pki,
    _servers: Vec<VersionServer>,
    proxy: TestProxy,
}

/// Two shoots: s1 (one backend, exact + wildcard hosts), s2 (two backends).
async fn shoots(extra_listener: &str) -> Shoots {
    let pki = Pki::new().unwrap();
    let names = ["api.s1.test", "*.s1.test", "api.s2.test"];
    let s1 = VersionServer::start(
        "127.0.0.1:0".parse().unwrap(),
        "shoot--dev--s1",
        pki.server_config(&names).unwrap(),
    )
    .await
    .unwrap();
    let s2a = VersionServer::start(
        "127.0.0.1:0".parse().unwrap(),
        "shoot--dev--s2",
        pki.server_config(&names).unwrap(),
    )
    .await
    .unwrap();
    let s2b = VersionServer::start(
        "127.0.0.1:0".parse().unwrap(),
        "shoot--dev--s2",
        pki.server_config(&names).unwrap(),
    )
    .await
    .unwrap();
    let yaml = format!(
        "listeners:\n- {{name: sni, address: '127.0.0.1:0', mode: tls}}\n- {{name: connect, address: '127.0.0.1:0', mode: http-connect}}\n{extra_listener}\
         routes:\n\
         - {{name: shoot--dev--s1, hosts: [api.s1.test, '*.s1.test'], destination: 'outbound|443||kube-apiserver.shoot--dev--s1.svc.cluster.local', backends: ['{}']}}\n\
         - {{name: shoot--dev--s2, hosts: [api.s2.test], proxy_destinations: ['240.0.0.2:443'], backends: ['{}', '{}']}}\n",
        s1.addr, s2a.addr, s2b.addr
    );
    let proxy = start(&yaml).await;
    Shoots {
        pki,
        _servers: vec![s1, s2a, s2b],
        proxy,
    }
}

#[tokio::test]
async fn routes_by_sni_exact_and_wildcard() {
    let t = shoots("").await;
    let config = t.pki.client_config(&[]).unwrap();
    for (sni, shoot) in [
        ("api.s1.test", "shoot--dev--s1"),
        ("anything.s1.test", "shoot--dev--s1"),
        ("api.s2.test", "shoot--dev--s2"),
    ] {
        let body = get_version(t.proxy.addrs[0], sni, config.clone())
            .await
            .unwrap();
        assert!(
            body.contains(&format!("\"shoot\":\"{shoot}\"")),
            "{sni}: {body}"
        );
    }
    // Both backends of s2 get connections (least connections with rotation).
    assert_eq!(
        t.proxy
            .metric("sni_proxy_connections_total{listener=\"sni\",route=\"shoot--dev--s2\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn unknown_sni_gets_unrecognized_name_alert() {
    let t = shoots("").await;
    let mut s = TcpStream::connect(t.proxy.addrs[0]).await.unwrap();
    s.write_all(&client_hello("nobody.test", &[]).unwrap())
        .await
        .unwrap();
    let got = read_until_close(&mut s).await.unwrap();
    assert_eq!(got, ALERT_UNRECOGNIZED_NAME);
    assert_eq!(
        t.proxy
            .metric("sni_proxy_handshake_failures_total{listener=\"sni\",reason=\"unknown_sni\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn post_quantum_sized_and_multi_record_hellos_complete_real_handshakes() {
    let t = shoots("").await;
    // ~1.6 KB (X25519MLKEM768-sized) and ~20 KB (several TLS records) ClientHellos.
    for pad in [1300, 20_000] {
        let alpn = padding_alpn(pad);
        let hello = client_hello("api.s1.test", &alpn).unwrap();
        assert!(hello.len() > pad, "hello of {} bytes", hello.len());
        let body = get_version(
            t.proxy.addrs[0],
            "api.s1.test",
            t.pki.client_config(&alpn).unwrap(),
        )
        .await
        .unwrap();
        assert!(body.contains("shoot--dev--s1"), "{body}");
    }
}

#[tokio::test]
async fn hello_split_into_tiny_segments_is_routed() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: sni, address: '127.0.0.1:0', mode: tls}}]\nroutes: [{{name: e, hosts: [echo.test], backends: ['{}']}}]\n",
        echo.addr
    ))
    .await;
    let hello = client_hello("echo.test", &padding_alpn(1300)).unwrap();
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    s.set_nodelay(true).unwrap();
    for chunk in hello.chunks(97) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every byte, including the ones read while peeking, reaches the backend in order.
    assert_eq!(read_n(&mut s, hello.len()).await, hello);
}

async fn tls_over(stream: TcpStream, pki: &Pki, sni: &str) -> String {
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(&[]).unwrap());
    let mut tls = connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), stream)
        .await
        .unwrap();
    tls.write_all(
        format!("GET /version HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http_connect_routes_by_gardener_destination() {
    let t = shoots("").await;
    let mut s = TcpStream::connect(t.proxy.addrs[1]).await.unwrap();
    s.write_all(
        b"CONNECT api.s1.test:443 HTTP/1.1\r\nHost: api.s1.test:443\r\nX-Gardener-Destination: outbound|443||kube-apiserver.shoot--dev--s1.svc.cluster.local\r\n\r\n",
    )
    .await
    .unwrap();
    let status = read_n(&mut s, 39).await;
    assert_eq!(&status[..], b"HTTP/1.1 200 Connection Established\r\n\r\n");
    let resp = tls_over(s, &t.pki, "api.s1.test").await;
    assert!(resp.contains("shoot--dev--s1"), "{resp}");
}

#[tokio::test]
async fn http_connect_keeps_bytes_sent_with_the_request() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: c, address: '127.0.0.1:0', mode: http-connect}}]\nroutes: [{{name: e, destination: dst-e, backends: ['{}']}}]\n",
        echo.addr
    ))
    .await;
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    let payload = pattern(7, 5000);
    let mut req = b"CONNECT x:1 HTTP/1.1\r\nx-gardener-destination: dst-e\r\n\r\n".to_vec();
    req.extend_from_slice(&payload);
    s.write_all(&req).await.unwrap();
    assert_eq!(&read_n(&mut s, 39).await[..12], b"HTTP/1.1 200");
    assert_eq!(read_n(&mut s, payload.len()).await, payload);
}

#[tokio::test]
async fn http_connect_failures_get_clear_statuses() {
    // A port that refuses: bind, note, drop.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: c, address: '127.0.0.1:0', mode: http-connect}}]\nroutes: [{{name: dead, destination: dst-dead, backends: ['{dead}']}}]\n"
    ))
    .await;
    for (request, status) in [
        ("CONNECT x:1 HTTP/1.1\r\n\r\n", "400"),
        (
            "CONNECT x:1 HTTP/1.1\r\nX-Gardener-Destination: nowhere\r\n\r\n",
            "403",
        ),
        ("GET / HTTP/1.1\r\nhost: x\r\n\r\n", "405"),
        (
            "CONNECT x:1 HTTP/1.1\r\nX-Gardener-Destination: dst-dead\r\n\r\n",
            "502",
        ),
        ("\x16\x03\x01garbage\r\n\r\n", "400"),
    ] {
        let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let resp = String::from_utf8(read_until_close(&mut s).await.unwrap()).unwrap();
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?} -> {resp:?}"
        );
    }
    // It never dials the CONNECT authority: the only connect attempts were to the backend.
    assert_eq!(
        proxy
            .metric("sni_proxy_backend_connect_failures_total{route=\"dead\"}")
            .await,
        1.0
    );
}

fn v2_header(source: &str, destination: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let addrs = proxy_protocol::Addresses {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
    };
    proxy_protocol::encode_v2(&addrs, &[], &mut out);
    out
}

#[tokio::test]
async fn proxy_protocol_received_routes_by_destination_and_is_sent_with_sni() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: lb, address: '127.0.0.1:0', mode: tls, proxy_protocol: required, trusted_proxies: [127.0.0.0/8]}}]\n\
         routes:\n\
         - {{name: legacy, proxy_destinations: ['240.0.0.2:443'], backends: ['{0}'], send_proxy_protocol: v2}}\n\
         - {{name: named, hosts: [api.s1.test], backends: ['{0}'], send_proxy_protocol: v2}}\n",
        echo.addr
    ))
    .await;
    for (version, sni, header) in [
        (
            "v2",
            "kubernetes.default.svc",
            v2_header("10.1.2.3:40000", "240.0.0.2:443"),
        ),
        (
            "v1",
            "api.s1.test",
            b"PROXY TCP4 10.1.2.3 240.0.0.9 40000 443\r\n".to_vec(),
        ),
    ] {
        let hello = client_hello(sni, &[]).unwrap();
        let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
        let mut first = header.clone();
        first.extend_from_slice(&hello);
        s.write_all(&first).await.unwrap();
        // The echo returns what the backend received: our PROXY v2 header, then the hello.
        let mut got = Vec::new();
        let header = loop {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "{version}: closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(h) = proxy_protocol::parse(&got).unwrap() {
                break h;
            }
        };
        let addrs = header.addresses.unwrap();
        assert_eq!(addrs.source, "10.1.2.3:40000".parse().unwrap(), "{version}");
        assert_eq!(
            header.tlvs,
            vec![(proxy_protocol::PP2_TYPE_AUTHORITY, sni.as_bytes().to_vec())],
            "{version}"
        );
        let rest_len = header.len + hello.len() - got.len();
        got.extend_from_slice(&read_n(&mut s, rest_len).await);
        assert_eq!(&got[header.len..], &hello[..], "{version}");
    }
    // Without a header, `required` closes.
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    s.write_all(&client_hello("api.s1.test", &[]).unwrap())
        .await
        .unwrap();
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
}

#[tokio::test]
async fn proxy_protocol_from_untrusted_sources_is_not_honoured() {
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = start(&format!(
        "listeners: [{{name: lb, address: '127.0.0.1:0', mode: tls, proxy_protocol: optional, trusted_proxies: [10.0.0.0/8]}}]\n\
         routes: [{{name: legacy, proxy_destinations: ['240.0.0.2:443'], backends: ['{}']}}]\nunknown_sni: close\n",
        echo.addr
    ))
    .await;
    let mut first = v2_header("10.1.2.3:40000", "240.0.0.2:443");
    first.extend_from_slice(&client_hello("x.test", &[]).unwrap());
    let mut s = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    s.write_all(&first).await.unwrap();
    // 127.0.0.1 is not trusted: the header is not parsed, the stream is not TLS, closed.
    assert!(read_until_close(&mut s).await.unwrap().is_empty());
    assert_eq!(
        proxy
            .metric("sni_proxy_handshake_failures_total{listener=\"lb\",reason=\"not_tls\"}")
            .await,
        1.0
    );
}

/// HAProxy as a real PROXY v2 sender, where it is installed.
#[tokio::test]
async fn haproxy_send_proxy_v2_is_understood() {
    let Ok(haproxy) = which("haproxy") else {
        assert!(
            std::env::var("CI").is_err(),
            "haproxy must be installed in CI"
        );
        eprintln!("*** SKIP haproxy_send_proxy_v2_is_understood: haproxy not installed ***");
        return;
    };
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // HAProxy listens on 127.0.0.7:port; its v2 header's destination is that address.
    let port = std::net::TcpListener::bind("127.0.0.7:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start(&format!(
        "listeners: [{{name: lb, address: '127.0.0.1:0', mode: tls, proxy_protocol: required, trusted_proxies: [127.0.0.0/8]}}]\n\
         routes: [{{name: legacy, proxy_destinations: ['127.0.0.7:{port}'], backends: ['{}']}}]\n",
        echo.addr
    ))
    .await;
    let dir = std::env::temp_dir().join(format!("sni-proxy-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.7:{port}\n  default_backend b\nbackend b\n  server p {} send-proxy-v2\n",
            proxy.addrs[0]
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(haproxy)
        .args(["-db", "-f"])
        .arg(&cfg)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target: std::net::SocketAddr = format!("127.0.0.7:{port}").parse().unwrap();
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = TcpStream::connect(target).await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s.expect("haproxy did not start");
    let hello = client_hello("unknown.test", &[]).unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(
        read_n(&mut s, hello.len()).await,
        hello,
        "routed by the PROXY destination"
    );
    child.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}
