//! Rotated certificates, keys and CA bundles are used by the next handshake, without a
//! restart: the server's certificate, the client's certificate, and the CA bundles on both
//! sides, through a real rotation (trust both CAs, switch the leaves, drop the old CA).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentkit::testing::Pki;
use agentkit::tls;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A full handshake over an in-memory pipe, then one byte each way (a TLS 1.3 server refuses
/// a client certificate only after the client thinks it is done): each side's outcome.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Result<(), String>, Result<(), String>) {
    let (c, s) = tokio::io::duplex(64 << 10);
    let accept = async {
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.write_all(&b)
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.flush().await.map_err(|e| format!("server: {e}"))?;
        Ok::<_, String>(tls)
    };
    let connect = async {
        let name = rustls::pki_types::ServerName::try_from("server.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, c)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"x")
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.flush().await.map_err(|e| format!("client: {e}"))?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b)
            .await
            .map_err(|e| format!("client: {e}"))?;
        Ok::<_, String>(tls)
    };
    let (a, c) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("the handshake hung");
    (a.map(drop), c.map(drop))
}

/// Both sides completed.
async fn works(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) -> bool {
    let (a, c) = handshake(server.clone(), client.clone()).await;
    a.is_ok() && c.is_ok()
}

fn write_leaf(pki: &Pki, name: &str, cert: &Path, key: &Path) {
    let leaf = pki.leaf(&[name]).unwrap();
    std::fs::write(cert, &leaf.cert_pem).unwrap();
    std::fs::write(key, &leaf.key_pem).unwrap();
}

/// Past the reload check, and past the file systems' modification-time granularity.
fn later() {
    std::thread::sleep(tls::RELOAD_CHECK + Duration::from_millis(50));
}

#[tokio::test]
async fn a_rotation_of_every_file_is_used_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("agentkit-tls-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| -> PathBuf { dir.join(name) };
    let (old, new) = (Pki::new().unwrap(), Pki::new().unwrap());
    std::fs::write(file("ca.pem"), old.ca_pem()).unwrap();
    write_leaf(
        &old,
        "server.test",
        &file("server.pem"),
        &file("server.key"),
    );
    write_leaf(&old, "client", &file("client.pem"), &file("client.key"));
    // A client of the old CA only, kept as it is, to show what the rotation changed.
    std::fs::write(file("old-ca.pem"), old.ca_pem()).unwrap();
    write_leaf(
        &old,
        "client",
        &file("old-client.pem"),
        &file("old-client.key"),
    );
    let old_client = tls::client_config_with_cert(
        &file("old-ca.pem"),
        &file("old-client.pem"),
        &file("old-client.key"),
    )
    .unwrap();

    let server = tls::server_config(
        &file("server.pem"),
        &file("server.key"),
        Some(&file("ca.pem")),
    )
    .unwrap();
    let client =
        tls::client_config_with_cert(&file("ca.pem"), &file("client.pem"), &file("client.key"))
            .unwrap();
    assert!(works(&server, &client).await);

    // Step 1: both sides trust both CAs; step 2: both present leaves of the new CA.
    later();
    std::fs::write(file("ca.pem"), old.ca_pem() + &new.ca_pem()).unwrap();
    write_leaf(
        &new,
        "server.test",
        &file("server.pem"),
        &file("server.key"),
    );
    write_leaf(&new, "client", &file("client.pem"), &file("client.key"));
    assert!(
        works(&server, &client).await,
        "the rotated bundle, server and client certificates are in use"
    );
    // The server really presents the new CA's certificate: a client of the old CA refuses it.
    let (_, refused) = handshake(server.clone(), old_client.clone()).await;
    let refused = refused.unwrap_err();
    assert!(refused.contains("invalid peer certificate"), "{refused}");

    // Step 3: the old CA goes; its clients are refused from now on.
    later();
    std::fs::write(file("ca.pem"), new.ca_pem()).unwrap();
    assert!(works(&server, &client).await);
    let other = tls::client_config_with_cert(
        &file("ca.pem"),
        &file("old-client.pem"),
        &file("old-client.key"),
    )
    .unwrap();
    let (refused, _) = handshake(server.clone(), other).await;
    let refused = refused.unwrap_err();
    assert!(refused.contains("invalid peer certificate"), "{refused}");

    // A broken bundle keeps the last good one.
    later();
    std::fs::write(file("ca.pem"), "not a certificate").unwrap();
    assert!(works(&server, &client).await);
    std::fs::remove_dir_all(&dir).unwrap();
}
