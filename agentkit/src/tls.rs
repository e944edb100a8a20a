//! rustls configuration from PEM files, for the agents that speak TLS themselves (the tunnel's
//! mTLS, the log shipper's HTTPS). Errors name the file and what was missing in it. Certificates,
//! keys and CA bundles are read again when their files change, so a rotated Secret is used
//! without a restart.

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
/// certificate signed by it (mTLS). The certificate and the CA bundle are read again when their
/// files change ([`Reloading`]).
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
        Some(ca) => builder.with_client_cert_verifier(Arc::new(ReloadingClientVerifier(
            Reloading::new(vec![ca.to_owned()], client_verifier)?,
        ))),
        None => builder.with_no_client_auth(),
    };
    let resolver = ReloadingCert::new(cert_chain, key)?;
    Ok(Arc::new(builder.with_cert_resolver(Arc::new(resolver))))
}

/// A client config trusting the CAs in `ca` (read again when the file changes).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(client_builder(ca)?.with_no_client_auth()))
}

/// A client config trusting the CAs in `ca` and presenting `cert`/`key` (mTLS); all three are
/// read again when their files change.
pub fn client_config_with_cert(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let resolver = ReloadingCert::new(cert, key)?;
    Ok(Arc::new(
        client_builder(ca)?.with_client_cert_resolver(Arc::new(resolver)),
    ))
}

fn client_builder(
    ca: &Path,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let verifier = ReloadingServerVerifier(Reloading::new(vec![ca.to_owned()], server_verifier)?);
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "client config",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// How often a handshake may look at the files' modification times.
pub const RELOAD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A value built from files and built again when they change (a rotated Secret), checked at
/// most once per [`RELOAD_CHECK`] during handshakes. Files that cannot be read or used keep
/// the last good value in use (and are logged).
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: fn(&[PathBuf]) -> Result<T, TlsError>,
    state: std::sync::Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    current: T,
    stamp: Option<Vec<std::time::SystemTime>>,
    checked: std::time::Instant,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Reloading<T> {
    /// Builds the value now (an error names the file).
    pub fn new(
        paths: Vec<PathBuf>,
        build: fn(&[PathBuf]) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let current = build(&paths)?;
        let stamp = stamp(&paths);
        Ok(Reloading {
            paths,
            build,
            state: std::sync::Mutex::new(ReloadState {
                current,
                stamp,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The value in use, built again first if the files changed.
    pub fn current(&self) -> T {
        let mut state = crate::sync::lock(&self.state);
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = std::time::Instant::now();
            let now = stamp(&self.paths);
            if now.is_some() && now != state.stamp {
                match (self.build)(&self.paths) {
                    Ok(fresh) => {
                        tracing::info!(files = ?self.paths, "reloaded");
                        state.current = fresh;
                        state.stamp = now;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "changed but cannot be used; keeping the previous one")
                    }
                }
            }
        }
        state.current.clone()
    }
}

fn stamp(paths: &[PathBuf]) -> Option<Vec<std::time::SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// A certificate and key presented by a server or a client, read again when their files change.
#[derive(Debug)]
pub struct ReloadingCert(Reloading<Arc<rustls::sign::CertifiedKey>>);

impl ReloadingCert {
    /// Loads the pair now (an error names the file).
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(ReloadingCert(Reloading::new(
            vec![cert.to_owned(), key.to_owned()],
            |paths| certified_key(&paths[0], &paths[1]),
        )?))
    }

    /// The pair in use, reloaded first if the files changed.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.current()
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

impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| TlsError::Rustls {
            context: "private key",
            source,
        })?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|source| TlsError::Rustls {
        context: "certificate and key",
        source,
    })?;
    Ok(Arc::new(certified))
}

fn client_verifier(
    paths: &[PathBuf],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = Arc::new(root_store(&paths[0])?);
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Rustls {
            context: "client verifier",
            source: rustls::Error::General(e.to_string()),
        })
}

fn server_verifier(
    paths: &[PathBuf],
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError> {
    let roots = Arc::new(root_store(&paths[0])?);
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Rustls {
            context: "server verifier",
            source: rustls::Error::General(e.to_string()),
        })
}

/// Verifies clients against a CA bundle read again when its file changes. It sends no CA
/// names in its certificate request (they would have to outlive a reload); clients then offer
/// their one certificate, as every agent here does.
#[derive(Debug)]
struct ReloadingClientVerifier(Reloading<Arc<dyn rustls::server::danger::ClientCertVerifier>>);

impl rustls::server::danger::ClientCertVerifier for ReloadingClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.current().supported_verify_schemes()
    }
}

/// Verifies servers against a CA bundle read again when its file changes.
#[derive(Debug)]
struct ReloadingServerVerifier(Reloading<Arc<rustls::client::WebPkiServerVerifier>>);

impl rustls::client::danger::ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.0.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.current().supported_verify_schemes()
    }
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
