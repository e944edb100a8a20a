//! The agent's life, node-cache's sequence with the gaps closed: render the Corefile from its
//! template, create the interface, bind every listener (SO_REUSEPORT everywhere), only then
//! install the iptables rules and write the pidfile; check and repair interface and rules every
//! `-syncinterval`; reload the Corefile without closing a socket; on SIGTERM hand the port
//! over to a surge instance without dropping a queued query, then remove the rules unless
//! `-skipteardown`.
//!
//! Its parts: [`load`](load()) reads and renders the Corefile; `plan` turns a config into zones
//! per address (pure, unit-tested); `listeners` binds and serves them; `kernel` loads the
//! fast path and owns it in a task; `probe` is the readiness self-test and loop detection;
//! `handover` leaves without dropping a query. This module is the loop that ties them:
//! blocking work (files, netlink, iptables, BPF) on the blocking pool, the loop itself
//! selecting on shutdown, loop-check results and reloads only.

mod handover;
mod kernel;
mod listeners;
mod load;
mod plan;
mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkit::admin::{Endpoints, Reply};
use agentkit::reload::{Attempt, Fingerprint, Reloader};
use agentkit::sync::lock;
use agentkit::{Health, Shutdown};
use anyhow::Context as _;
use hyper::StatusCode;
use prometheus::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cache::{self, Cache};
use crate::flags::Flags;
use crate::intercept::{self, Interception};
use crate::metrics::{Metrics, SetupMetrics};
use crate::{config, fast_path};
use kernel::FastPath;
use listeners::{serve_http, DnsListener};
use plan::{plan, LoopCheck, Spawn};

pub use load::{load, Loaded, RESOLV_CONF};

/// How often node-cache re-renders the Corefile from its template and the kube-dns ConfigMap.
pub const TEMPLATE_SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How long a leaving instance serves what it already has (queued queries, misses in flight,
/// open TCP connections) before it closes.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How often the readiness self-test runs.
pub const READY_INTERVAL: Duration = Duration::from_secs(2);
/// Go's `net/http` 404 body, which node-cache's endpoints answer.
const NOT_FOUND: &str = "404 page not found\n";

/// A zone and its metric children on every listener serving it (for scrape-time gauges).
type ZoneGauges = (Arc<crate::server::Zone>, Vec<crate::metrics::ZoneMetrics>);

/// The running agent.
struct Agent {
    flags: Flags,
    metrics: Metrics,
    registry: Registry,
    setup: SetupMetrics,
    ready: Health,
    /// The agent's own tasks (HTTP servers, self-test, repair, the fast path, upstream
    /// connections); stopped first when it leaves.
    tasks: Shutdown,
    /// The DNS work in progress (misses, upstream fetches, TCP connections): a group of
    /// `tasks`, waited for alone by the hand-over.
    work: Shutdown,
    dns: HashMap<SocketAddr, DnsListener>,
    /// The DNS addresses now served, for the readiness self-test.
    dns_addrs: watch::Sender<Vec<SocketAddr>>,
    /// Each HTTP address, what it serves (metrics, health), and the shutdown of its server.
    http: HashMap<SocketAddr, ((bool, bool), Shutdown)>,
    /// Every zone now served, for the scrape-time gauges.
    zones: Arc<Mutex<Vec<ZoneGauges>>>,
    caches: HashMap<String, Arc<Mutex<Cache>>>,
    interception: Option<Arc<Interception>>,
    /// How often the reloader looks at the Corefile (and its template).
    reload_interval: Option<Duration>,
    /// The kernel fast path, when asked for and loaded.
    fast_path: Option<FastPath>,
    /// Its options from the Corefile's `fastpath` (the flags win).
    fast_path_config: Option<config::FastPath>,
    /// The kernel's counters, reported at each scrape.
    fast_path_counters: fast_path::Counters,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("listeners", &self.dns.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts everything but the iptables rules ([`Agent::ensure_interception`] installs
    /// them once the sockets are bound) and the fast path ([`Agent::load_fast_path`]).
    /// Blocking (netlink, binds): call it on the blocking pool, inside the runtime. Its tasks
    /// run on `shutdown`'s tracker.
    fn start(
        flags: Flags,
        loaded: Loaded,
        registry: Registry,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Agent> {
        let metrics = Metrics::new(&registry)?;
        let process = prometheus::process_collector::ProcessCollector::for_self();
        let _ = registry.register(Box::new(process));
        let setup_registry = Registry::new();
        let setup = SetupMetrics::new(&setup_registry)?;
        let tasks = shutdown.child();
        let setup_endpoints = Endpoints::new()
            .metrics("/metrics", setup_registry, || {})
            .not_found(NOT_FOUND);
        if let Err(e) = serve_http(flags.metrics_listen, setup_endpoints, &tasks) {
            warn!(error = %e, addr = %flags.metrics_listen, "cannot serve the setup-error metrics");
        }
        let interception = match prepare_interception(&flags, &setup) {
            Ok(i) => i,
            Err(e) => {
                tasks.stop_accepting();
                return Err(e);
            }
        };
        let work = tasks.group();
        let mut agent = Agent {
            flags,
            metrics,
            registry,
            setup,
            ready: Health::default(),
            tasks,
            work,
            dns: HashMap::new(),
            dns_addrs: watch::Sender::new(Vec::new()),
            http: HashMap::new(),
            zones: Arc::new(Mutex::new(Vec::new())),
            caches: HashMap::new(),
            interception,
            reload_interval: None,
            fast_path: None,
            fast_path_config: None,
            fast_path_counters: fast_path::Counters::default(),
        };
        if let Err(e) = agent.apply(loaded, true) {
            // Nothing of a failed start keeps serving.
            agent.tasks.stop_accepting();
            return Err(e);
        }
        Ok(agent)
    }

    /// The addresses DNS is served on.
    fn dns_addresses(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self.dns.keys().copied().collect();
        addrs.sort();
        addrs
    }

    /// Binds, swaps and stops listeners to match `loaded`. At start-up any bind failure is
    /// fatal; on a reload a listener that cannot be bound is logged and skipped, and the
    /// others still change.
    fn apply(&mut self, loaded: Loaded, starting: bool) -> anyhow::Result<()> {
        let spawn = Spawn {
            work: &self.work,
            background: &self.tasks,
        };
        let plan = plan(&loaded.config, &self.metrics, &self.caches, &spawn);
        let gone: Vec<SocketAddr> = self
            .dns
            .keys()
            .filter(|a| !plan.listeners.contains_key(a))
            .copied()
            .collect();
        for (addr, zones) in plan.listeners {
            if let Some(listener) = self.dns.get(&addr) {
                listener.server.replace(zones);
                continue;
            }
            match DnsListener::bind(addr, zones, &self.metrics, &self.tasks, &self.work) {
                Ok(listener) => {
                    info!(%addr, "serving DNS");
                    self.dns.insert(addr, listener);
                }
                Err(e) if starting => return Err(e.context(format!("binding {addr}"))),
                Err(e) => {
                    error!(%addr, error = %format!("{e:#}"), "cannot serve DNS on a new address")
                }
            }
        }
        for addr in gone {
            if let Some(listener) = self.dns.remove(&addr) {
                info!(%addr, "no longer serving DNS");
                listener.stop();
            }
        }
        self.apply_http(plan.http, starting)?;
        let mut gauges: Vec<ZoneGauges> = plan
            .zones
            .iter()
            .map(|z| (Arc::clone(z), Vec::new()))
            .collect();
        for listener in self.dns.values() {
            for served in listener.server.zones().iter() {
                if let (Some(slot), Some(m)) = (
                    gauges
                        .iter_mut()
                        .find(|(z, _)| Arc::ptr_eq(z, &served.zone)),
                    &served.metrics,
                ) {
                    slot.1.push(m.clone());
                }
            }
        }
        *lock(&self.zones) = gauges;
        self.caches = plan.caches;
        self.fast_path_config = loaded
            .config
            .blocks
            .iter()
            .find_map(|b| b.fast_path.clone());
        if let Some(fast_path) = &self.fast_path {
            fast_path.set_zones(kernel::plan(self.dns.iter()).1);
        }
        let corefile_reload = loaded
            .config
            .blocks
            .iter()
            .filter_map(|b| b.reload.map(|r| r.interval))
            .min();
        // node-cache re-renders a template every 10 s, whatever the Corefile says.
        self.reload_interval = if self.flags.base_corefile.exists() {
            Some(corefile_reload.map_or(TEMPLATE_SYNC_INTERVAL, |r| r.min(TEMPLATE_SYNC_INTERVAL)))
        } else {
            corefile_reload
        };
        self.dns_addrs.send_replace(self.dns_addresses());
        Ok(())
    }

    /// Starts, restarts (new roles) and stops the HTTP servers to match `http`.
    fn apply_http(
        &mut self,
        http: HashMap<SocketAddr, (bool, bool)>,
        starting: bool,
    ) -> anyhow::Result<()> {
        self.http.retain(|addr, (_, server)| {
            let keep = http.contains_key(addr);
            if !keep {
                server.stop_accepting();
            }
            keep
        });
        for (addr, roles) in http {
            if let Some((old_roles, server)) = self.http.get(&addr) {
                if *old_roles == roles {
                    continue;
                }
                server.stop_accepting();
                self.http.remove(&addr);
            }
            let endpoints = self.endpoints(roles);
            match serve_http(addr, endpoints, &self.tasks) {
                Ok(server) => {
                    self.http.insert(addr, (roles, server));
                }
                Err(e) if starting => {
                    return Err(anyhow::anyhow!(e).context(format!("binding {addr} (http)")))
                }
                Err(e) => error!(%addr, error = %e, "cannot serve HTTP on a new address"),
            }
        }
        Ok(())
    }

    fn endpoints(&self, (metrics, health): (bool, bool)) -> Endpoints {
        let zones = Arc::clone(&self.zones);
        let m = self.metrics.clone();
        let fast_path = self.fast_path_counters.clone();
        let before_scrape = move || {
            fast_path.report(&m);
            let mut broken = 0;
            let mut rejects = 0;
            let mut dropped = 0;
            let mut upstreams = Vec::new();
            for (zone, children) in lock(&zones).iter() {
                let (success, denial) = {
                    let cache = lock(zone.cache());
                    (
                        cache.len(cache::Kind::Success),
                        cache.len(cache::Kind::Denial),
                    )
                };
                for child in children {
                    child.set_entries(success, denial);
                }
                let stats = zone.forwarder().stats();
                broken += stats.healthcheck_broken;
                rejects += stats.max_concurrent_rejects;
                dropped += stats.dropped;
                for u in stats.upstreams {
                    upstreams.push((u.addr.to_string(), u.healthcheck_failures));
                }
            }
            m.set_forward_totals(broken, rejects, dropped, &upstreams);
        };
        let mut endpoints = Endpoints::new().not_found(NOT_FOUND);
        if metrics {
            endpoints = endpoints.metrics("/metrics", self.registry.clone(), before_scrape);
        }
        if health {
            // CoreDNS's `health`: 200 `OK` while the process runs, with its request duration.
            let duration = self.metrics.health_duration.clone();
            endpoints = endpoints
                .route("/health", move || {
                    let start = Instant::now();
                    let reply = Reply::text(StatusCode::OK, "OK");
                    duration.observe(start.elapsed().as_secs_f64());
                    reply
                })
                .readiness("/ready", self.ready.clone(), "OK", "not ready");
        }
        endpoints
    }

    /// Installs or repairs the interface and the rules; failures are logged and counted by
    /// node-cache's error types. Blocking (netlink round trips, iptables processes): call it
    /// on the blocking pool.
    fn ensure_interception(&self) {
        if let Some(interception) = &self.interception {
            repair(interception, &self.flags, &self.setup);
        }
    }

    /// Loads and attaches the kernel fast path if the flags or the Corefile ask for it.
    /// Blocking (BPF syscalls, netlink): call it on the blocking pool, then
    /// [`Agent::serve_fast_path`]. A failure is logged and DNS is served from userspace alone.
    fn load_fast_path(&self) -> Option<fast_path::Mirror> {
        let options = kernel::options(&self.flags, self.fast_path_config.as_ref())?;
        let (locals, zones) = kernel::plan(self.dns.iter());
        kernel::load(
            options,
            &locals,
            zones,
            self.fast_path_counters.clone(),
            &self.metrics,
        )
    }

    /// Keeps a loaded fast path in step with the caches from now on.
    fn serve_fast_path(&mut self, mirror: fast_path::Mirror) {
        self.fast_path = Some(FastPath::spawn(mirror, &self.tasks, self.metrics.clone()));
    }

    /// Repairs the interface and the rules every `-syncinterval`, on the blocking pool.
    fn spawn_repair(&self) {
        let Some(interception) = self.interception.clone() else {
            return;
        };
        let (flags, setup, tasks) = (self.flags.clone(), self.setup.clone(), self.tasks.clone());
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(flags.sync_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = tasks.stopping() => return,
                    _ = tick.tick() => {}
                }
                let (i, f, s) = (Arc::clone(&interception), flags.clone(), setup.clone());
                let _ = tasks.spawn_blocking(move || repair(&i, &f, &s)).await;
            }
        });
    }

    /// Runs the readiness self-test every [`READY_INTERVAL`]: every DNS listener answers
    /// `id.server. CH TXT` itself. Ready only while all do.
    fn spawn_self_test(&self) {
        let (health, tasks) = (self.ready.clone(), self.tasks.clone());
        let mut addrs = self.dns_addrs.subscribe();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(READY_INTERVAL);
            loop {
                tokio::select! {
                    () = tasks.stopping() => return,
                    _ = tick.tick() => {}
                }
                let current = addrs.borrow_and_update().clone();
                let ok = probe::self_test(&current).await;
                if !tasks.is_stopping() {
                    health.set_ready(ok);
                }
            }
        });
    }

    /// The loop checks `config` asks for, through the listeners now served.
    fn loop_checks(&self, config: &config::Config) -> Vec<LoopCheck> {
        plan::loop_checks(config, |addr| self.dns.get(&addr).map(|l| l.server.clone()))
    }

    /// Applies a Corefile the reloader loaded, or counts the failure to load one.
    fn reload(&mut self, attempt: Attempt<Loaded>) {
        let result = attempt.loaded.and_then(|loaded| self.apply(loaded, false));
        match result {
            Ok(()) => {
                self.metrics.reloads.with_label_values(&["applied"]).inc();
                info!(trigger = ?attempt.trigger, "Corefile reloaded");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["rejected"]).inc();
                error!(error = %format!("{e:#}"), "Corefile not reloaded; keeping the running config");
            }
        }
    }

    /// Leaves: readiness off; the kernel fast path detached; the rules and interface removed
    /// unless `-skipteardown` (node-cache's order: traffic falls back to kube-dns before the
    /// sockets close); every port handed over to a surge instance, with queued queries,
    /// misses in flight and open TCP connections served for up to [`DRAIN_GRACE`].
    async fn stop(mut self) {
        self.tasks.stop_accepting();
        self.ready.set_ready(false);
        // Detach first: from here on every query reaches the sockets, which drain below.
        if let Some(fast_path) = self.fast_path.take() {
            fast_path.stop().await;
        }
        if !self.flags.skip_teardown {
            if let Some(i) = self.interception.clone() {
                match self.tasks.spawn_blocking(move || i.teardown()).await {
                    Ok(Ok(())) => info!("interception removed"),
                    Ok(Err(e)) => error!(error = %e, "teardown failed"),
                    Err(e) => error!(error = %e, "teardown panicked"),
                }
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        let listeners: Vec<(SocketAddr, DnsListener)> = self.dns.drain().collect();
        handover::hand_over(listeners, &self.work, &self.tasks, deadline).await;
        // What is left (idle upstream connections, a TCP client past the deadline) ends now.
        self.tasks.force_close();
        if let Some(pidfile) = &self.flags.pidfile {
            let _ = tokio::fs::remove_file(pidfile).await;
        }
    }
}

/// Prepares the interception the flags ask for and creates the interface; None when
/// neither `-setupinterface` nor `-setupiptables` is set.
fn prepare_interception(
    flags: &Flags,
    setup: &SetupMetrics,
) -> anyhow::Result<Option<Arc<Interception>>> {
    if !flags.setup_interface && !flags.setup_iptables {
        return Ok(None);
    }
    let options = intercept::Options {
        interface: flags.interface.clone(),
        local_ips: flags.local_ips.clone(),
        dns_port: flags.dns_port,
        health_port: flags.health_port,
        setup_interface: flags.setup_interface,
        setup_iptables: flags.setup_iptables,
    };
    let interception = Interception::new(options).map_err(|e| {
        setup.error(e.kind());
        anyhow::anyhow!(e).context("preparing interception")
    })?;
    if flags.setup_interface {
        match interception.ensure_link() {
            Ok(report) => info!(interface = %flags.interface, ?report, "interface ready"),
            Err(e) => {
                setup.error(e.kind());
                return Err(anyhow::anyhow!(e).context("creating the interface"));
            }
        }
    }
    Ok(Some(Arc::new(interception)))
}

/// One check and repair of the interface and the rules.
fn repair(interception: &Interception, flags: &Flags, setup: &SetupMetrics) {
    if flags.setup_interface {
        match interception.ensure_link() {
            Ok(report) if report.addresses_added > 0 || report.created => {
                info!(?report, "interface repaired");
            }
            Ok(_) => {}
            Err(e) => {
                setup.error(e.kind());
                error!(error = %e, "interface check failed");
            }
        }
    }
    if flags.setup_iptables {
        match interception.ensure_rules() {
            Ok(report) if report.added > 0 => info!(?report, "Added back nodelocaldns rules"),
            Ok(_) => {}
            Err(e) => {
                setup.error(e.kind());
                error!(error = %e, "iptables check failed");
            }
        }
    }
}

/// Runs the agent until `shutdown`: load, start, intercept, serve, reload, repair, hand over.
pub async fn run(flags: Flags, shutdown: Shutdown) -> anyhow::Result<()> {
    // Files, netlink, iptables and BPF: on the blocking pool, before anything is served.
    let (mut agent, checks, initial, mirror) = shutdown
        .spawn_blocking({
            let (flags, shutdown) = (flags.clone(), shutdown.clone());
            move || -> anyhow::Result<_> {
                let loaded = load(&flags)?;
                let config = loaded.config.clone();
                let initial = loaded.text.clone().into_bytes();
                let agent = Agent::start(flags.clone(), loaded, Registry::new(), &shutdown)?;
                let checks = agent.loop_checks(&config);
                if let Some(pidfile) = &flags.pidfile {
                    std::fs::write(pidfile, format!("{}\n", std::process::id()))
                        .with_context(|| format!("writing {}", pidfile.display()))?;
                }
                agent.ensure_interception();
                let mirror = agent.load_fast_path();
                Ok((agent, checks, initial, mirror))
            }
        })
        .await??;
    if let Some(mirror) = mirror {
        agent.serve_fast_path(mirror);
    }
    agent.spawn_repair();
    agent.spawn_self_test();
    info!(addresses = ?agent.dns_addresses(), "node-local-dns serving");

    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    if !checks.is_empty() {
        let tx = fatal_tx.clone();
        agent.tasks.spawn(async move {
            if let Some(message) = probe::detect_loops(checks).await {
                let _ = tx.send(message).await;
            }
        });
    }
    drop(fatal_tx);

    use tokio::signal::unix::SignalKind;
    let options = agentkit::reload::Options {
        signals: vec![SignalKind::hangup(), SignalKind::user_defined1()],
        interval: agent.reload_interval,
    };
    let mut seen = Fingerprint::new(Some(initial));
    let loader_flags = flags.clone();
    let mut reloader = Reloader::spawn(&agent.tasks, options, move |_| {
        let loaded = load(&loader_flags)?;
        Ok(seen.update(loaded.text.as_bytes()).then_some(loaded))
    })?;
    let mut fatal = None;
    let mut checks_running = true;
    loop {
        tokio::select! {
            () = shutdown.stopping() => break,
            message = fatal_rx.recv(), if checks_running => match message {
                Some(message) => {
                    error!("{message}");
                    fatal = Some(message);
                    break;
                }
                // The loop checks are done and found nothing.
                None => checks_running = false,
            },
            Some(attempt) = reloader.next() => {
                agent.reload(attempt);
                reloader.set_interval(agent.reload_interval);
            }
        }
    }
    info!("shutting down");
    agent.stop().await;
    match fatal {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => Ok(()),
    }
}
