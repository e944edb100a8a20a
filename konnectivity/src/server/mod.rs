//! The konnectivity server, next to kube-apiserver: agents connect to it
//! (`AgentService/Connect`, gRPC over TLS, [`agents`]), kube-apiserver's egress dialer sends
//! it dials (`ProxyService/Proxy` over gRPC, or HTTP CONNECT, on a UDS or TCP+mTLS,
//! [`frontend`]), and each dial goes to an agent chosen by the proxy strategies ([`dial`],
//! [`backends`]).
//!
//! Every tunnel has its own task and queue ([`crate::tunnel`]); the per-agent stream reader
//! only routes packets and never waits on a tunnel, so one slow frontend or destination
//! stalls nothing but its own tunnel.

pub mod agents;
pub mod auth;
pub mod authority;
pub mod backends;
pub mod dial;
pub mod frontend;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentkit::{Health, Shutdown};
use anyhow::Context as _;
use tracing::{info, warn};

use crate::metrics::ServerMetrics;
use crate::transport::Extensions;
use backends::{Backends, Strategy};

/// The frontend protocol kube-apiserver speaks to us (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Grpc,
    HttpConnect,
}

/// Token authentication of agents (TokenReview).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
    /// How long a review's answer is reused for the same token (reconnect storms).
    pub cache_ttl: Duration,
}

/// Everything the server needs, from its flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// Frontend on a Unix socket (`--uds-name`).
    pub uds: Option<PathBuf>,
    pub delete_existing_uds_file: bool,
    /// Frontend on TCP with mTLS (`--server-port`): address and TLS.
    pub frontend_tcp: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// The agent listener and its TLS (ALPN `h2` is added).
    pub agent_addr: SocketAddr,
    /// Where our agents may connect over QUIC ([`crate::quic`]), with the same TLS.
    pub agent_quic_addr: Option<SocketAddr>,
    pub agent_tls: Arc<rustls::ServerConfig>,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub server_id: String,
    pub server_count: u32,
    pub strategies: Vec<Strategy>,
    /// Longest wait for an agent's DIAL_RSP, over every attempt.
    pub backend_dial_timeout: Duration,
    /// Agents tried per dial (the first and up to this many minus one others).
    pub dial_attempts: usize,
    /// Window granted to our agents per tunnel (0: no flow-control extension).
    pub window: u32,
    /// Queue bound per tunnel for agents without the extension.
    pub buffer: usize,
    pub graceful_shutdown_timeout: Duration,
    pub auth: Option<AuthConfig>,
}

/// The running server's shared state.
#[derive(Debug)]
pub struct Server {
    pub config: Config,
    pub backends: Backends,
    pub metrics: ServerMetrics,
    pub health: Health,
    pub shutdown: Shutdown,
    auth: Option<auth::Authenticator>,
}

/// Addresses the server listens on (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Bound {
    pub agent: SocketAddr,
    pub agent_quic: Option<SocketAddr>,
    pub frontend_tcp: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl Server {
    pub fn extensions(&self) -> Extensions {
        Extensions {
            window: self.config.window,
            half_close: true,
        }
    }

    /// Marks readiness and the backend gauges after an agent came or went.
    fn backends_changed(&self) {
        self.metrics
            .ready_backend_connections
            .set(self.backends.streams() as i64);
        let mut any = false;
        for strategy in self.backends.strategies() {
            let ready = self.backends.ready(*strategy);
            any |= ready > 0;
            self.metrics
                .ready_backends
                .with_label_values(&[strategy.label()])
                .set(ready as i64);
        }
        self.health.set_ready(any);
    }
}

/// Binds every listener, then serves until `shutdown`; then stops accepting, sends nothing
/// new to agents, lets tunnels finish for `--graceful-shutdown-timeout` and closes the rest.
/// `on_bound` learns the addresses once bound (tests bind port 0).
pub async fn run(
    config: Config,
    registry: prometheus::Registry,
    shutdown: Shutdown,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let metrics = ServerMetrics::new(&registry).context("registering metrics")?;
    let auth = match &config.auth {
        Some(auth) => Some(auth::Authenticator::new(auth.clone()).await?),
        None => None,
    };
    let health = Health::default();
    let server = Arc::new(Server {
        backends: Backends::new(config.strategies.clone()),
        metrics,
        health: health.clone(),
        shutdown: shutdown.clone(),
        auth,
        config,
    });
    server.backends_changed();

    let agent_listener = agentkit::net::tcp_listener(
        server.config.agent_addr,
        agentkit::net::Sharing::Exclusive,
        1024,
    )
    .with_context(|| format!("agent listener {}", server.config.agent_addr))?;
    let mut bound = Bound {
        agent: agent_listener.local_addr()?,
        agent_quic: None,
        frontend_tcp: None,
        health: None,
        admin: None,
    };
    if let Some(path) = &server.config.uds {
        let listener = frontend::bind_uds(path, server.config.delete_existing_uds_file)?;
        shutdown.spawn(frontend::serve_uds(Arc::clone(&server), listener));
    }
    if let Some((addr, tls)) = &server.config.frontend_tcp {
        let listener = agentkit::net::tcp_listener(*addr, agentkit::net::Sharing::Exclusive, 1024)
            .with_context(|| format!("frontend listener {addr}"))?;
        bound.frontend_tcp = Some(listener.local_addr()?);
        shutdown.spawn(frontend::serve_tcp(
            Arc::clone(&server),
            listener,
            Arc::clone(tls),
        ));
    }
    let endpoints = agentkit::Endpoints::standard(registry.clone(), health.clone())
        // upstream's deprecated readiness path, still probed by older manifests
        .readiness(
            "/ready",
            health.clone(),
            "ready\n",
            "no connection to any proxy agent\n",
        )
        .readiness(
            "/readyz",
            health,
            "ready\n",
            "no connection to any proxy agent\n",
        );
    if let Some(addr) = server.config.health_addr {
        let admin = agentkit::admin::AdminServer::bind(addr, endpoints.clone())
            .with_context(|| format!("health listener {addr}"))?;
        bound.health = Some(admin.local_addr()?);
        shutdown.spawn(admin.serve(shutdown.clone()));
    }
    if let Some(addr) = server.config.admin_addr {
        let admin = agentkit::admin::AdminServer::bind(addr, endpoints)
            .with_context(|| format!("admin listener {addr}"))?;
        bound.admin = Some(admin.local_addr()?);
        shutdown.spawn(admin.serve(shutdown.clone()));
    }
    shutdown.spawn(agents::serve(Arc::clone(&server), agent_listener));
    if let Some(addr) = server.config.agent_quic_addr {
        let quic = crate::quic::server_config(&server.config.agent_tls, server.config.window)?;
        let endpoint = quinn::Endpoint::server(quic, addr)
            .with_context(|| format!("agent QUIC listener {addr}"))?;
        bound.agent_quic = Some(endpoint.local_addr()?);
        shutdown.spawn(agents::serve_quic(Arc::clone(&server), endpoint));
    }
    info!(
        server_id = %server.config.server_id,
        agent = %bound.agent,
        agent_quic = ?bound.agent_quic,
        mode = ?server.config.mode,
        uds = ?server.config.uds,
        frontend = ?bound.frontend_tcp,
        "konnectivity server ready for agents"
    );
    on_bound(bound);

    shutdown.stopping().await;
    let open = shutdown
        .drain(server.config.graceful_shutdown_timeout)
        .await;
    if open > 0 {
        warn!(
            open,
            "closed tunnels still open at the end of the graceful shutdown"
        );
    }
    if let Some(path) = &server.config.uds {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
