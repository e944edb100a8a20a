//! sni-proxy: one TCP load balancer in front of every shoot kube-apiserver of a Gardener seed.
//! It routes each connection by the SNI of its TLS ClientHello (never terminating TLS), by the
//! `X-Gardener-Destination` header of an HTTP CONNECT, or by the destination in a PROXY
//! protocol header, and relays the stream to one of the route's backends.
//!
//! The crate is a library so that the binary, the integration tests and the demo all drive the
//! same [`Proxy`]. Protocol parsing lives in [`protocol`] and never touches a socket.

pub mod config;
mod conn;
pub mod datapath;
pub mod kube;
pub mod metrics;
pub mod protocol;
pub mod routes;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentkit::admin::AdminServer;
use agentkit::net::Sharing;
use agentkit::reload::{Reloader, Trigger};
use agentkit::{ConfigError, Endpoints, Health, Shutdown};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::Config;
use datapath::DataPath;
use metrics::Metrics;
use routes::{LiveRoutes, RouteTable};

/// Listen backlog of every listener.
const LISTEN_BACKLOG: i32 = 4096;

/// The running config: what a connection reads once, when it is accepted.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// The file's config (its `routes` are the static ones).
    config: Config,
    /// The static routes and those from Kubernetes, merged.
    table: RouteTable,
    data_paths: Vec<DataPath>,
}

/// State shared by every listener and connection.
#[derive(Debug)]
pub(crate) struct Shared {
    state: ArcSwap<Runtime>,
    metrics: Metrics,
    live: Arc<LiveRoutes>,
    active_total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    reload_lock: Mutex<()>,
    health: Health,
    /// The routes last taken from Kubernetes (merged into every table built).
    kube_routes: Mutex<Arc<Vec<config::Route>>>,
}

/// A proxy with its sockets bound; [`Proxy::run`] serves until shutdown.
#[derive(Debug)]
pub struct Proxy {
    listeners: Vec<TcpListener>,
    admin: AdminServer,
    shared: Arc<Shared>,
    /// The Kubernetes source, when the config has one, with its metrics.
    kube: Option<(kube::watch::Source, kube::watch::Metrics)>,
}

/// A handle to reload a running proxy (from tests, or the reloader).
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds the admin server and every listener (with SO_REUSEPORT, so a new instance can
    /// start beside an old one), and registers the metrics in `registry`.
    pub async fn bind(config: Config, registry: prometheus::Registry) -> anyhow::Result<Proxy> {
        let metrics = Metrics::new(&registry);
        let kube = match &config.kubernetes {
            Some(settings) => Some((
                kube::watch::Source::connect(settings).await?,
                kube::watch::Metrics::new(&registry)?,
            )),
            None => None,
        };
        let health = Health::default();
        let admin = AdminServer::bind(config.admin, Endpoints::standard(registry, health.clone()))
            .map_err(|e| anyhow::anyhow!("admin.address {}: {e}", config.admin))?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            let socket = agentkit::net::tcp_listener(l.address, Sharing::ReusePort, LISTEN_BACKLOG)
                .map_err(|e| anyhow::anyhow!("listeners[{i}].address {}: {e}", l.address))?;
            listeners.push(socket);
        }
        let live = LiveRoutes::new(
            metrics.clone(),
            config.listeners.iter().map(|l| l.name.clone()).collect(),
        );
        // The data-path probes (splice, the sockmap self-test) block: off the runtime's workers.
        let data_paths = tokio::task::spawn_blocking({
            let config = config.clone();
            move || data_paths(&config)
        })
        .await?;
        let (runtime, _) = build_runtime(config, data_paths, &[], None, &live);
        metrics.routes.set(runtime.table.len() as i64);
        metrics.config_last_reload_success.set(unix_now());
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(runtime),
            metrics,
            live,
            active_total: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            reload_lock: Mutex::new(()),
            health,
            kube_routes: Mutex::new(Arc::new(Vec::new())),
        });
        Ok(Proxy {
            listeners,
            admin,
            shared,
            kube,
        })
    }

    /// The bound listener addresses, in config order (useful with port 0).
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// A handle for reloading.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` stops accepting, then lets open connections finish within
    /// `timeouts.shutdown_grace` and closes the rest. With `config_path`, reloads the file on
    /// SIGHUP and when it changes.
    pub async fn run(self, shutdown: Shutdown, config_path: Option<PathBuf>) {
        let shared = self.shared;
        let initial = shared.state.load();
        let grace = initial.config.shutdown_grace;
        let reload_interval = initial.config.reload_interval;
        drop(initial);
        shutdown.spawn(self.admin.serve(shutdown.clone()));
        if let Some(path) = config_path {
            let handle = Handle {
                shared: Arc::clone(&shared),
            };
            let initial = tokio::fs::read(&path).await.ok();
            match Reloader::spawn(
                &shutdown,
                agentkit::reload::Options::new(Some(reload_interval)),
                config_loader(path, initial),
            ) {
                Ok(reloader) => {
                    shutdown.spawn(reloader.apply_each(move |loaded| {
                        handle.apply_loaded(loaded).map_err(|e| format!("{e:#}"))
                    }));
                }
                Err(error) => warn!(%error, "cannot watch for reloads"),
            }
        }
        let mut accepts = Vec::new();
        for (index, listener) in self.listeners.into_iter().enumerate() {
            accepts.push(shutdown.spawn(accept_loop(
                Arc::clone(&shared),
                index,
                listener,
                shutdown.clone(),
            )));
        }
        match self.kube {
            // Ready once the first full sync is in the table.
            Some((source, metrics)) => {
                let handle = Handle {
                    shared: Arc::clone(&shared),
                };
                let stop = shutdown.clone();
                shutdown.spawn(async move {
                    let apply = move |update: kube::watch::Update| {
                        handle.apply_kubernetes(update.routes);
                        handle.shared.health.set_ready(true);
                    };
                    if let Err(error) = source.run(stop.clone(), metrics, apply).await {
                        tracing::error!(error = %format!("{error:#}"), "kubernetes: routes are not followed; stopping");
                        stop.stop_accepting();
                    }
                });
            }
            None => shared.health.set_ready(true),
        }
        info!(listeners = accepts.len(), "serving");
        shutdown.stopping().await;
        shared.health.set_ready(false);
        for a in accepts {
            let _ = a.await;
        }
        let open = shutdown.drain(grace).await;
        info!(forced = open, "stopped");
    }
}

impl Handle {
    /// Validates `text` and swaps it in atomically. Connections keep the route object they
    /// were routed with; routes removed or changed follow their `on_change` policy.
    /// Listener names and addresses cannot change without a restart.
    pub fn reload(&self, text: &str) -> Result<(), ConfigError> {
        let config = Config::from_yaml(text);
        self.apply_loaded(config.map(|config| {
            let paths = data_paths(&config);
            (config, paths)
        }))
    }

    /// Replaces the routes from Kubernetes and swaps in a table with them merged into the
    /// file's routes (whose names and hosts win). Unchanged routes keep their connections.
    pub fn apply_kubernetes(&self, routes: Vec<config::Route>) {
        let _serialized = agentkit::sync::lock(&self.shared.reload_lock);
        let routes = Arc::new(routes);
        *agentkit::sync::lock(&self.shared.kube_routes) = Arc::clone(&routes);
        let current = self.shared.state.load_full();
        let (runtime, retired) = build_runtime(
            current.config.clone(),
            current.data_paths.clone(),
            &routes,
            Some(&current.table),
            &self.shared.live,
        );
        self.shared.metrics.routes.set(runtime.table.len() as i64);
        self.shared.state.store(Arc::new(runtime));
        for route in retired {
            route.retire();
        }
    }

    /// Applies a config the reloader loaded (with its data paths resolved off the runtime),
    /// or counts the failure to load one.
    fn apply_loaded<E>(&self, loaded: Result<(Config, Vec<DataPath>), E>) -> Result<(), E>
    where
        E: From<ConfigError>,
    {
        let result = loaded.and_then(|(config, paths)| Ok(self.try_apply(config, paths)?));
        let label = if result.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        result
    }

    fn try_apply(&self, config: Config, data_paths: Vec<DataPath>) -> Result<(), ConfigError> {
        let _serialized = agentkit::sync::lock(&self.shared.reload_lock);
        let current = self.shared.state.load_full();
        let same_listeners = config.listeners.len() == current.config.listeners.len()
            && config
                .listeners
                .iter()
                .zip(&current.config.listeners)
                .all(|(a, b)| a.name == b.name && a.address == b.address);
        if !same_listeners {
            return Err(ConfigError::invalid(
                "listeners",
                "names and addresses cannot change on reload; restart the proxy",
            ));
        }
        if config.admin != current.config.admin {
            return Err(ConfigError::invalid(
                "admin.address",
                "cannot change on reload; restart the proxy",
            ));
        }
        if config.kubernetes != current.config.kubernetes {
            return Err(ConfigError::invalid(
                "kubernetes",
                "cannot change on reload; restart the proxy",
            ));
        }
        let kube_routes = Arc::clone(&agentkit::sync::lock(&self.shared.kube_routes));
        let (runtime, retired) = build_runtime(
            config,
            data_paths,
            &kube_routes,
            Some(&current.table),
            &self.shared.live,
        );
        self.shared.metrics.routes.set(runtime.table.len() as i64);
        self.shared.state.store(Arc::new(runtime));
        // Only now: a connection routed after this point can no longer pick a retired route.
        for route in retired {
            route.retire();
        }
        self.shared
            .metrics
            .config_last_reload_success
            .set(unix_now());
        Ok(())
    }

    /// Open connections over all listeners.
    pub fn active_connections(&self) -> usize {
        self.shared.active_total.load(Ordering::Acquire)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Loads the config file for the reloader (on the blocking pool): read, parse, validate, and
/// resolve the data paths, whose probes block. Unchanged bytes on a poll load nothing; a
/// SIGHUP always reloads.
fn config_loader(
    path: PathBuf,
    initial: Option<Vec<u8>>,
) -> impl FnMut(Trigger) -> anyhow::Result<Option<(Config, Vec<DataPath>)>> + Send + 'static {
    agentkit::reload::file_loader(path, initial, |text| {
        let config = Config::from_yaml(text)?;
        let paths = data_paths(&config);
        Ok((config, paths))
    })
}

/// Each listener's data path, resolved (may block on the first probe of a path).
fn data_paths(config: &Config) -> Vec<DataPath> {
    config
        .listeners
        .iter()
        .map(|l| conn::resolve_data_path(l.data_path, config.allow_sockmap_on_untrusted_kernel))
        .collect()
}

/// The runtime for the file's `config` with the routes from Kubernetes merged in.
fn build_runtime(
    config: Config,
    data_paths: Vec<DataPath>,
    kube_routes: &[config::Route],
    previous: Option<&RouteTable>,
    live: &Arc<LiveRoutes>,
) -> (Runtime, Vec<Arc<routes::Route>>) {
    let (table, retired) = if kube_routes.is_empty() {
        RouteTable::build(&config, previous, live)
    } else {
        let mut merged = config.clone();
        merged.routes = routes::merge(&config.routes, kube_routes);
        RouteTable::build(&merged, previous, live)
    };
    (
        Runtime {
            config,
            table,
            data_paths,
        },
        retired,
    )
}

/// Releases a slot of the global connection cap on drop.
struct GlobalSlot(Arc<Shared>);

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.0.active_total.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(shared: Arc<Shared>, index: usize, listener: TcpListener, shutdown: Shutdown) {
    let name = shared.state.load().config.listeners[index].name.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.stopping() => break,
        };
        match accepted {
            Ok((stream, peer)) => admit(&shared, index, &name, stream, peer, &shutdown),
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(%error, listener = %name, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Stopping. Connections the kernel has already accepted would be reset when the listening
    // socket closes: take them from the queue and serve them like the others.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    for _ in 0..LISTEN_BACKLOG {
        let Ok((stream, peer)) = listener.accept() else {
            break; // WouldBlock: the queue is empty
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
            admit(&shared, index, &name, stream, peer, &shutdown);
        }
    }
}

/// Applies the global cap and spawns the connection on the shutdown's tracker.
fn admit(
    shared: &Arc<Shared>,
    index: usize,
    name: &str,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: &Shutdown,
) {
    let max = shared.state.load().config.max_connections;
    if shared.active_total.fetch_add(1, Ordering::AcqRel) >= max {
        shared.active_total.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.refused(name, metrics::Refusal::GlobalCap);
        return;
    }
    let slot = GlobalSlot(Arc::clone(shared));
    let (s, sd) = (Arc::clone(shared), shutdown.clone());
    shutdown.spawn(async move {
        let _slot = slot;
        conn::handle(s, index, stream, peer, sd).await;
    });
}
