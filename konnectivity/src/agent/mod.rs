//! The konnectivity agent, on every node: it dials out to the server replicas (TLS, HTTP/2,
//! `AgentService/Connect`) until it holds a stream to `servercount` distinct server IDs
//! ([`run`], with upstream's jittered backoff), and on each stream ([`stream`]) dials the
//! destinations the server asks for and carries their bytes.
//!
//! On SIGTERM it sends DRAIN on every stream (servers stop choosing it for new dials), lets
//! open tunnels finish for the grace period, then closes.

pub mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentkit::sync::lock;
use agentkit::{Health, Shutdown};
use anyhow::Context as _;
use rand::Rng as _;
use tracing::{info, warn};

use crate::metrics::AgentMetrics;
use stream::ServerStream;

/// How the agent reaches the server (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC over HTTP/2 over TLS over TCP, as upstream.
    Grpc,
    /// QUIC ([`crate::quic`]): our servers only.
    Quic,
    /// QUIC, falling back to gRPC when QUIC cannot connect (UDP blocked, or an upstream server).
    Auto,
}

impl Transport {
    pub fn parse(name: &str) -> Result<Transport, String> {
        match name {
            "grpc" => Ok(Transport::Grpc),
            "quic" => Ok(Transport::Quic),
            "auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport {other:?} (grpc, quic, auto)")),
        }
    }
}

/// Everything the agent needs, from its flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub transport: Transport,
    /// The server's QUIC (UDP) port.
    pub quic_port: u16,
    pub server_host: String,
    pub server_port: u16,
    /// TLS toward the server (ALPN `h2` first, then `--alpn-proto`).
    pub tls: Arc<rustls::ClientConfig>,
    pub token_path: Option<PathBuf>,
    pub agent_id: String,
    /// `agentidentifiers`, as given (URL-query encoded).
    pub identifiers: String,
    pub health_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub sync_interval: Duration,
    pub sync_interval_cap: Duration,
    pub sync_forever: bool,
    /// HTTP/2 PING interval on each server connection; a missing PONG ends the stream.
    pub keepalive: Duration,
    /// Bound of one dial to a destination.
    pub dial_timeout: Duration,
    /// Window granted to our servers per tunnel (0: no flow-control extension).
    pub window: u32,
    /// Queue bound per tunnel with a server that has no flow control.
    pub buffer: usize,
    /// How long open tunnels may finish after DRAIN.
    pub drain_timeout: Duration,
}

/// The running agent's shared state.
#[derive(Debug)]
pub struct Agent {
    pub config: Config,
    pub metrics: AgentMetrics,
    pub health: Health,
    pub shutdown: Shutdown,
    /// Streams by server ID.
    streams: Mutex<HashMap<String, Arc<ServerStream>>>,
    server_count: AtomicU32,
}

impl Agent {
    fn streams_changed(&self) {
        let n = lock(&self.streams).len();
        self.metrics.open_server_connections.set(n as i64);
        self.health.set_ready(n > 0);
    }

    /// Open tunnels over every stream.
    pub fn tunnels(&self) -> usize {
        lock(&self.streams).values().map(|s| s.tunnels()).sum()
    }
}

/// Addresses the agent listens on (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Bound {
    pub health: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Runs the agent until `shutdown`, then drains.
pub async fn run(
    config: Config,
    registry: prometheus::Registry,
    shutdown: Shutdown,
    on_bound: impl FnOnce(Bound, Arc<Agent>),
) -> anyhow::Result<()> {
    let metrics = AgentMetrics::new(&registry).context("registering metrics")?;
    let health = Health::default();
    let agent = Arc::new(Agent {
        config,
        metrics,
        health: health.clone(),
        shutdown: shutdown.clone(),
        streams: Mutex::new(HashMap::new()),
        server_count: AtomicU32::new(1),
    });
    let endpoints = agentkit::Endpoints::standard(registry, health.clone()).readiness(
        "/readyz",
        health,
        "ready\n",
        "not connected to any proxy server\n",
    );
    let mut bound = Bound {
        health: None,
        admin: None,
    };
    for (addr, slot) in [
        (agent.config.health_addr, &mut bound.health),
        (agent.config.admin_addr, &mut bound.admin),
    ] {
        if let Some(addr) = addr {
            let admin = agentkit::admin::AdminServer::bind(addr, endpoints.clone())
                .with_context(|| format!("listener {addr}"))?;
            *slot = Some(admin.local_addr()?);
            shutdown.spawn(admin.serve(shutdown.clone()));
        }
    }
    on_bound(bound, Arc::clone(&agent));
    info!(agent_id = %agent.config.agent_id, server = %format!("{}:{}", agent.config.server_host, agent.config.server_port), "konnectivity agent started");

    let sync = shutdown.spawn(sync_loop(Arc::clone(&agent)));
    shutdown.stopping().await;
    let _ = sync.await;
    // DRAIN: servers stop choosing us; open tunnels get the grace period to finish.
    let streams: Vec<Arc<ServerStream>> = lock(&agent.streams).values().cloned().collect();
    for stream in &streams {
        stream.drain();
    }
    let deadline = tokio::time::Instant::now() + agent.config.drain_timeout;
    while agent.tunnels() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = agent.tunnels();
    if open > 0 {
        warn!(open, "drain period over: closing the remaining tunnels");
    }
    shutdown.force_close();
    for stream in &streams {
        stream.close();
    }
    shutdown.drain(Duration::from_secs(1)).await;
    Ok(())
}

/// Keeps a stream to every server replica: dials (through the load balancer) until
/// `servercount` distinct server IDs are connected; duplicates are closed. Upstream's
/// backoff: the sync interval, ×1.5 per failure up to the cap, ±10 % jitter.
async fn sync_loop(agent: Arc<Agent>) {
    let mut backoff = agent.config.sync_interval;
    loop {
        let connected = lock(&agent.streams).len() as u32;
        let wanted = agent.server_count.load(Ordering::Relaxed).max(1);
        let mut wait = agent.config.sync_interval;
        if connected < wanted || agent.config.sync_forever {
            match ServerStream::connect(&agent).await {
                Ok(stream) => {
                    backoff = agent.config.sync_interval;
                    let count = stream.server_count.max(1);
                    agent.server_count.store(count, Ordering::Relaxed);
                    agent.metrics.known_server_count.set(i64::from(count));
                    let id = stream.server_id.clone();
                    let duplicate = {
                        let mut streams = lock(&agent.streams);
                        if streams.contains_key(&id) {
                            true
                        } else {
                            streams.insert(id.clone(), Arc::clone(&stream));
                            false
                        }
                    };
                    if duplicate {
                        stream.close();
                    } else {
                        agent.streams_changed();
                        info!(server_id = %id, server_count = count, transport = stream.transport(), "connected to a proxy server");
                        let agent2 = Arc::clone(&agent);
                        agent.shutdown.spawn(async move {
                            let end = Arc::clone(&stream).serve(Arc::clone(&agent2)).await;
                            lock(&agent2.streams).remove(&stream.server_id);
                            agent2.streams_changed();
                            match end {
                                Ok(()) => info!(server_id = %stream.server_id, "proxy server stream ended"),
                                Err(error) => warn!(server_id = %stream.server_id, %error, "proxy server stream failed"),
                            }
                        });
                        // Look for the next replica at once.
                        wait = Duration::ZERO;
                    }
                }
                Err(error) => {
                    agent.metrics.server_connection_failures.inc();
                    warn!(
                        error = format!("{error:#}"),
                        "cannot connect to the proxy server"
                    );
                    wait = backoff;
                    backoff = backoff.mul_f64(1.5).min(agent.config.sync_interval_cap);
                }
            }
        }
        let wait = jitter(wait);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = agent.shutdown.stopping() => return,
        }
    }
}

/// ±10 % (upstream's `wait.Backoff.Jitter: 0.1`).
fn jitter(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}
