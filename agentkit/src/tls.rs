//! rustls configuration from PEM files, for the agents that speak TLS themselves (the tunnel's
//! mTLS, the log shipper's HTTPS). Errors name the file and what was missing in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no item of the expected kind.
    #[error("{path}: no {what} found in PEM")]
    Missing {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("{context}: {source}")]
    Rustls {
        /// Which config was being built.
        context: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// All certificates in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing {
            path: path.to_owned(),
            what: "private key",
        })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config presenting `cert_chain`/`key`; with `client_ca`, clients must present a
/// certificate signed by it (mTLS).
pub fn server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "server config",
            source,
        })?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Rustls {
                        context: "client verifier",
                        source: rustls::Error::General(e.to_string()),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let resolver = ReloadingCert::new(cert_chain, key)?;
    Ok(Arc::new(builder.with_cert_resolver(Arc::new(resolver))))
}

/// A server certificate read again from its files when they change (a rotated Secret), checked
/// at most once per [`RELOAD_CHECK`] during handshakes. A pair that cannot be read or does not
/// match keeps the last good one in use (and is logged).
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: std::sync::Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    current: Arc<rustls::sign::CertifiedKey>,
    stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    checked: std::time::Instant,
}

/// How often a handshake may look at the certificate files' modification times.
pub const RELOAD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl ReloadingCert {
    /// Loads the pair now (an error names the file).
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let current = certified_key(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: std::sync::Mutex::new(CertState {
                current,
                stamp: stamp(cert, key),
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The pair in use, reloaded first if the files changed.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        let mut state = crate::sync::lock(&self.state);
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = std::time::Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now.is_some() && now != state.stamp {
                match certified_key(&self.cert, &self.key) {
                    Ok(fresh) => {
                        tracing::info!(cert = %self.cert.display(), "certificate reloaded");
                        state.current = fresh;
                        state.stamp = now;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "certificate changed but cannot be used; keeping the previous one")
                    }
                }
            }
        }
        Arc::clone(&state.current)
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| TlsError::Rustls {
            context: "server private key",
            source,
        })?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|source| TlsError::Rustls {
        context: "server certificate and key",
        source,
    })?;
    Ok(Arc::new(certified))
}

/// A client config trusting the CAs in `ca`.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "client config",
            source,
        })?
        .with_root_certificates(root_store(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client config trusting the CAs in `ca` and presenting `cert`/`key` (mTLS).
pub fn client_config_with_cert(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "client config",
            source,
        })?
        .with_root_certificates(root_store(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            context: "client certificate",
            source,
        })?;
    Ok(Arc::new(config))
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            context: "CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loads_pem_and_names_bad_files() {
        let dir = std::env::temp_dir().join(format!("agentkit-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        server_config(&c, &k, Some(&c)).unwrap();
        client_config(&c).unwrap();
        let err = server_config(&k, &k, None).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err = load_key(&c).unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rotated_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("agentkit-tls-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |name: &str| {
            let pair = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            std::fs::write(&cert, pair.cert.pem()).unwrap();
            std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
            pair.cert.der().to_vec()
        };
        let first = write("one.test");
        let resolver = ReloadingCert::new(&cert, &key).unwrap();
        assert_eq!(resolver.current().cert[0].as_ref(), &first[..]);
        std::thread::sleep(RELOAD_CHECK + std::time::Duration::from_millis(50));
        let second = write("two.test");
        assert_eq!(resolver.current().cert[0].as_ref(), &second[..]);
        // A half-written pair (no key) keeps the last good one.
        std::thread::sleep(RELOAD_CHECK + std::time::Duration::from_millis(50));
        std::fs::write(&key, "").unwrap();
        assert_eq!(resolver.current().cert[0].as_ref(), &second[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
