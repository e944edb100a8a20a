//! The agent's life, node-cache's sequence with the gaps closed: render the Corefile from its
//! template, create the interface, bind every listener (SO_REUSEPORT everywhere), only then
//! install the iptables rules and write the pidfile; check and repair interface and rules every
//! `-syncinterval`; reload the Corefile without closing a socket; on SIGTERM hand the port
//! over to a surge instance without dropping a queued query, then remove the rules unless
//! `-skipteardown`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentkit::admin::{AdminServer, Endpoints, Reply};
use agentkit::net::Sharing;
use agentkit::reload::{Attempt, Fingerprint, Reloader};
use agentkit::sync::lock;
use agentkit::{Health, Shutdown};
use anyhow::Context as _;
use hyper::StatusCode;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::cache::{self, Cache};
use crate::config::{Config, ServerBlock};
use crate::flags::{Flags, DEFAULT_KUBE_DNS_DIR};
use crate::forward::Forwarder;
use crate::intercept::{self, Interception};
use crate::metrics::{Metrics, SetupMetrics};
use crate::server::{Served, Server, Zone, LOOP_THRESHOLD};
use crate::{corefile, fast_path, template, udp, wire};

/// How often node-cache re-renders the Corefile from its template and the kube-dns ConfigMap.
pub const TEMPLATE_SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How long a leaving instance serves what it already has (queued queries, misses in flight,
/// open TCP connections) before it closes.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How often the readiness self-test runs.
pub const READY_INTERVAL: Duration = Duration::from_secs(2);
/// The node's resolver file, read for `__PILLAR__UPSTREAM__SERVERS__`. The environment
/// variable `NODE_LOCAL_DNS_RESOLV_CONF` points elsewhere (for tests).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Listen backlog of the DNS TCP sockets.
const TCP_BACKLOG: i32 = 1024;
/// Listen backlog of the HTTP (metrics, health) sockets.
const HTTP_BACKLOG: i32 = 128;
/// Go's `net/http` 404 body, which node-cache's endpoints answer.
const NOT_FOUND: &str = "404 page not found\n";

/// A Corefile read (and rendered from the template, if there is one) and parsed.
#[derive(Debug)]
pub struct Loaded {
    /// The parsed config.
    pub config: Config,
    /// The Corefile text it came from.
    pub text: String,
}

/// Reads the Corefile the way node-cache does: if `-basecorefile` exists, fill its
/// `__PILLAR__` variables and write the result to `-conf`; then parse `-conf`.
pub fn load(flags: &Flags) -> anyhow::Result<Loaded> {
    if flags.base_corefile.exists() {
        let base = std::fs::read_to_string(&flags.base_corefile)
            .with_context(|| format!("{}", flags.base_corefile.display()))?;
        let kube_dns_dir = flags.kube_dns_dir.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_KUBE_DNS_DIR);
            default.is_dir().then_some(default)
        });
        let resolv_conf = std::env::var_os("NODE_LOCAL_DNS_RESOLV_CONF")
            .map_or_else(|| PathBuf::from(RESOLV_CONF), PathBuf::from);
        let pillars = template::pillars(
            &flags.local_ips,
            &flags.upstream_service,
            |name| std::env::var(name).ok(),
            kube_dns_dir.as_deref(),
            &resolv_conf,
        )
        .context("filling the Corefile template")?;
        let text = template::render(&base, &pillars);
        let current = std::fs::read_to_string(&flags.conf).unwrap_or_default();
        if current != text {
            std::fs::write(&flags.conf, &text)
                .with_context(|| format!("writing {}", flags.conf.display()))?;
        }
        let config = corefile::parse(&text, &flags.conf)?;
        return Ok(Loaded { config, text });
    }
    let text = std::fs::read_to_string(&flags.conf)
        .with_context(|| format!("reading {}", flags.conf.display()))?;
    let config = corefile::parse(&text, &flags.conf)?;
    Ok(Loaded { config, text })
}

/// What one listening address serves and the handles to stop it.
struct DnsListener {
    server: Server,
    udp: Arc<socket2::Socket>,
    udp_control: Arc<udp::Control>,
    udp_thread: Option<std::thread::JoinHandle<()>>,
    tcp: Arc<TcpListener>,
    tcp_task: JoinHandle<()>,
}

/// Everything a config turns into, before binding.
struct Plan {
    /// Zones per DNS listening address.
    listeners: HashMap<SocketAddr, Vec<Served>>,
    /// What each HTTP address serves: (metrics, health).
    http: HashMap<SocketAddr, (bool, bool)>,
    /// Every zone, once, for gauges and forwarder counters.
    zones: Vec<Arc<Zone>>,
    /// Caches by (block zones, cache policy), reused by the next reload.
    caches: HashMap<String, Arc<Mutex<Cache>>>,
}

/// The label CoreDNS gives a server: `dns://:53` for the wildcard, `dns://10.0.0.1:53`.
fn server_label(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("dns://:{}", addr.port())
    } else {
        format!("dns://{addr}")
    }
}

/// Where a block listens: its `bind` addresses, or both wildcards.
fn block_addresses(block: &ServerBlock) -> Vec<SocketAddr> {
    if block.bind.is_empty() {
        return vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), block.port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), block.port),
        ];
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for ip in &block.bind {
        let addr = SocketAddr::new(*ip, block.port);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    addrs
}

/// A policy that keeps nothing, for blocks without `cache`.
fn no_cache() -> cache::Policy {
    let none = cache::Limits {
        capacity: 1,
        max_ttl: Duration::ZERO,
        min_ttl: Duration::ZERO,
    };
    cache::Policy {
        success: none,
        denial: none,
        servfail_ttl: Duration::ZERO,
        prefetch: None,
        serve_stale: None,
    }
}

/// Turns a config into zones per listener; caches of blocks whose zones, port and cache
/// policy did not change are carried over from `old`.
fn plan(config: &Config, metrics: &Metrics, old: &HashMap<String, Arc<Mutex<Cache>>>) -> Plan {
    let mut plan = Plan {
        listeners: HashMap::new(),
        http: HashMap::new(),
        zones: Vec::new(),
        caches: HashMap::new(),
    };
    for block in &config.blocks {
        let policy = block.cache.unwrap_or_else(no_cache);
        let cache_key = format!("{:?}:{}:{:?}", block.zones, block.port, policy);
        let cache = old
            .get(&cache_key)
            .cloned()
            .unwrap_or_else(|| Arc::new(Mutex::new(Cache::new(policy))));
        plan.caches.insert(cache_key, Arc::clone(&cache));
        let addrs = block_addresses(block);
        for zone_name in &block.zones {
            let forwarder = match &block.forward {
                Some(forward) => Forwarder::new(forward),
                None => Forwarder::new(&crate::config::Forward::new(zone_name.clone(), Vec::new())),
            };
            let zone = Arc::new(
                Zone::with_cache(zone_name, Arc::clone(&cache), forwarder)
                    .with_metrics(metrics.clone()),
            );
            plan.zones.push(Arc::clone(&zone));
            for addr in &addrs {
                plan.listeners.entry(*addr).or_default().push(Served {
                    zone: Arc::clone(&zone),
                    metrics: Some(metrics.zone(&server_label(*addr), zone_name)),
                });
            }
        }
        if let Some(addr) = block.prometheus {
            plan.http.entry(addr).or_default().0 = true;
        }
        if let Some(addr) = block.health {
            plan.http.entry(addr).or_default().1 = true;
        }
    }
    plan
}

/// A zone and its metric children on every listener serving it (for scrape-time gauges).
type ZoneGauges = (Arc<Zone>, Vec<crate::metrics::ZoneMetrics>);

/// The running agent.
pub struct Agent {
    flags: Flags,
    metrics: Metrics,
    registry: Registry,
    setup: SetupMetrics,
    ready: Health,
    /// The agent's own tasks (HTTP servers, self-test, repair); stopped first when it leaves.
    tasks: Shutdown,
    dns: HashMap<SocketAddr, DnsListener>,
    /// The DNS addresses now served, for the readiness self-test.
    dns_addrs: watch::Sender<Vec<SocketAddr>>,
    /// Each HTTP address, what it serves (metrics, health), and the shutdown of its server.
    http: HashMap<SocketAddr, ((bool, bool), Shutdown)>,
    /// Every zone now served, for the scrape-time gauges.
    zones: Arc<Mutex<Vec<ZoneGauges>>>,
    caches: HashMap<String, Arc<Mutex<Cache>>>,
    interception: Option<Arc<Interception>>,
    reload_interval: Option<Duration>,
    runtime: tokio::runtime::Handle,
    /// The kernel fast path, when asked for and loaded.
    fast_path: Option<fast_path::Mirror>,
    /// Its options from the Corefile's `fastpath` (the flags win).
    fast_path_config: Option<crate::config::FastPath>,
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
    /// them once the sockets are bound). Blocking (netlink, binds): call it on the blocking
    /// pool, inside the runtime. Its tasks run on `shutdown`'s tracker.
    pub fn start(
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

        let interception = if flags.setup_interface || flags.setup_iptables {
            let options = intercept::Options {
                interface: flags.interface.clone(),
                local_ips: flags.local_ips.clone(),
                dns_port: flags.dns_port,
                health_port: flags.health_port,
                setup_interface: flags.setup_interface,
                setup_iptables: flags.setup_iptables,
            };
            match Interception::new(options) {
                Ok(i) => Some(Arc::new(i)),
                Err(e) => {
                    setup.error(e.kind());
                    tasks.stop_accepting();
                    return Err(anyhow::anyhow!(e).context("preparing interception"));
                }
            }
        } else {
            None
        };
        if let (true, Some(i)) = (flags.setup_interface, &interception) {
            match i.ensure_link() {
                Ok(report) => info!(interface = %flags.interface, ?report, "interface ready"),
                Err(e) => {
                    setup.error(e.kind());
                    tasks.stop_accepting();
                    return Err(anyhow::anyhow!(e).context("creating the interface"));
                }
            }
        }

        let mut agent = Agent {
            flags,
            metrics,
            registry,
            setup,
            ready: Health::default(),
            tasks,
            dns: HashMap::new(),
            dns_addrs: watch::Sender::new(Vec::new()),
            http: HashMap::new(),
            zones: Arc::new(Mutex::new(Vec::new())),
            caches: HashMap::new(),
            interception,
            reload_interval: None,
            runtime: tokio::runtime::Handle::current(),
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
    pub fn dns_addresses(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self.dns.keys().copied().collect();
        addrs.sort();
        addrs
    }

    /// Binds, swaps and stops listeners to match `loaded`. At start-up any bind failure is
    /// fatal; on a reload a listener that cannot be bound is logged and skipped, and the
    /// others still change.
    fn apply(&mut self, loaded: Loaded, starting: bool) -> anyhow::Result<()> {
        let plan = plan(&loaded.config, &self.metrics, &self.caches);
        let mut gone: Vec<SocketAddr> = self
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
            match self.bind_dns(addr, zones) {
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
        for addr in gone.drain(..) {
            if let Some(listener) = self.dns.remove(&addr) {
                info!(%addr, "no longer serving DNS");
                listener.stop();
            }
        }
        let http_gone: Vec<SocketAddr> = self
            .http
            .keys()
            .filter(|a| !plan.http.contains_key(a))
            .copied()
            .collect();
        for addr in http_gone {
            if let Some((_, server)) = self.http.remove(&addr) {
                server.stop_accepting();
            }
        }
        for (addr, roles) in plan.http {
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
        if self.fast_path.is_some() {
            let (_, zones) = self.fast_path_plan();
            if let Some(mirror) = &mut self.fast_path {
                let report = mirror.set_zones(zones);
                self.metrics.fast_path_skipped.inc_by(report.skipped as u64);
            }
        }
        self.reload_interval = loaded
            .config
            .blocks
            .iter()
            .filter_map(|b| b.reload.map(|r| r.interval))
            .min();
        self.dns_addrs.send_replace(self.dns_addresses());
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

    fn bind_dns(&self, addr: SocketAddr, zones: Vec<Served>) -> anyhow::Result<DnsListener> {
        let server = Server::with_metrics(zones, Some(self.metrics.clone()), addr.is_ipv6());
        let udp_socket = udp::bind(addr)?;
        udp::detach_steering(&*udp_socket);
        let tcp = Arc::new(agentkit::net::tcp_listener(
            addr,
            Sharing::ReusePort,
            TCP_BACKLOG,
        )?);
        udp::detach_steering(&*tcp);
        let control = Arc::new(udp::Control::default());
        let thread = udp::spawn(
            Arc::clone(&udp_socket),
            server.clone(),
            self.runtime.clone(),
            Arc::clone(&control),
        )?;
        let tcp_task = self
            .tasks
            .spawn(server.clone().serve_tcp_shared(Arc::clone(&tcp)));
        Ok(DnsListener {
            server,
            udp: udp_socket,
            udp_control: control,
            udp_thread: Some(thread),
            tcp,
            tcp_task,
        })
    }

    /// Installs or repairs the interface and the rules; failures are logged and counted by
    /// node-cache's error types. Blocking (netlink round trips, iptables processes): call it
    /// on the blocking pool.
    pub fn ensure_interception(&self) {
        if let Some(interception) = &self.interception {
            repair(interception, &self.flags, &self.setup);
        }
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
                let ok = self_test(&current).await;
                if !tasks.is_stopping() {
                    health.set_ready(ok);
                }
            }
        });
    }
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

impl Agent {
    /// The fast path's options: the flags, else the Corefile's `fastpath`; None when off.
    fn fast_path_options(&self) -> Option<fast_path::Options> {
        let (interfaces, mode) = if !self.flags.fast_path_interfaces.is_empty() {
            (
                self.flags.fast_path_interfaces.clone(),
                self.flags.fast_path_mode,
            )
        } else {
            let c = self.fast_path_config.as_ref()?;
            (c.interfaces.clone(), c.mode)
        };
        Some(fast_path::Options {
            interfaces,
            mode,
            capacity: self.flags.fast_path_capacity,
        })
    }

    /// The addresses the kernel answers for and the zones it mirrors: the listeners on a
    /// specific address (not a wildcard) that serve the most common set of zones, so that
    /// whatever the kernel answers on any of them is what that listener would answer. Each
    /// zone comes with the metrics of the first of those listeners, where its kernel answers
    /// are counted.
    fn fast_path_plan(&self) -> (Vec<SocketAddr>, fast_path::ZonesToMirror) {
        let mut groups: Vec<(Vec<Arc<Zone>>, Vec<SocketAddr>)> = Vec::new();
        for (addr, listener) in &self.dns {
            if addr.ip().is_unspecified() {
                continue;
            }
            let zones: Vec<Arc<Zone>> = listener
                .server
                .zones()
                .iter()
                .map(|s| Arc::clone(&s.zone))
                .collect();
            let same = |g: &&mut (Vec<Arc<Zone>>, Vec<SocketAddr>)| {
                g.0.len() == zones.len() && g.0.iter().zip(&zones).all(|(a, b)| Arc::ptr_eq(a, b))
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.1.push(*addr),
                None => groups.push((zones, vec![*addr])),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
        match groups.into_iter().next() {
            Some((zones, mut addrs)) => {
                addrs.sort();
                let served = addrs
                    .first()
                    .and_then(|a| self.dns.get(a))
                    .map(|l| l.server.zones());
                let metrics_of = |zone: &Arc<Zone>| {
                    served.as_ref().and_then(|s| {
                        s.iter()
                            .find(|s| Arc::ptr_eq(&s.zone, zone))
                            .and_then(|s| s.metrics.clone())
                    })
                };
                let zones = zones
                    .into_iter()
                    .map(|z| {
                        let m = metrics_of(&z);
                        (z, m)
                    })
                    .collect();
                (addrs, zones)
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Loads and attaches the kernel fast path if the flags or the Corefile ask for it. A
    /// failure is logged and DNS is served from userspace alone.
    pub fn start_fast_path(&mut self) {
        let Some(options) = self.fast_path_options() else {
            return;
        };
        let (locals, zones) = self.fast_path_plan();
        if locals.is_empty() {
            error!("fast path: no listener on a specific address (bind one); serving from userspace only");
            return;
        }
        let counters = self.fast_path_counters.clone();
        let started = tokio::task::block_in_place(|| {
            fast_path::Mirror::start(options.clone(), &locals, counters)
        });
        match started {
            Ok(mut mirror) => {
                let report = mirror.set_zones(zones);
                self.metrics.fast_path_skipped.inc_by(report.skipped as u64);
                self.metrics
                    .fast_path_attached
                    .set(mirror.attached().len() as i64);
                self.metrics
                    .fast_path_xdp_fallbacks
                    .set(mirror.xdp_fallbacks().len() as i64);
                info!(
                    mode = options.mode.as_str(),
                    interfaces = ?options.interfaces,
                    ?locals,
                    mirrored = report.inserted,
                    "fast path loaded"
                );
                self.fast_path = Some(mirror);
            }
            Err(e) => error!(error = %e, "fast path not loaded; serving from userspace only"),
        }
    }

    /// Applies the caches' changes to the kernel map; with `report` (once a second), also
    /// retries pending attachments, checks the XDP ones' pods can still take XDP_TX, and
    /// updates the attachment gauges. The kernel's counters are read at each scrape
    /// ([`fast_path::Counters::report`]), not here.
    pub fn sync_fast_path(&mut self, report: bool) {
        let Some(mirror) = &mut self.fast_path else {
            return;
        };
        let sync = mirror.sync(Instant::now());
        self.metrics.fast_path_skipped.inc_by(sync.skipped as u64);
        if !report {
            return;
        }
        mirror.retry_attach();
        mirror.recheck_xdp();
        self.metrics
            .fast_path_attached
            .set(mirror.attached().len() as i64);
        self.metrics
            .fast_path_xdp_fallbacks
            .set(mirror.xdp_fallbacks().len() as i64);
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

    /// Leaves: readiness off; the rules and interface removed unless `-skipteardown`
    /// (node-cache's order: traffic falls back to kube-dns before the sockets close); every
    /// port steered to a surge instance; queued queries, misses in flight and open TCP
    /// connections served for up to [`DRAIN_GRACE`].
    pub async fn stop(mut self) {
        self.tasks.stop_accepting();
        self.ready.set_ready(false);
        // Detach first: from here on every query reaches the sockets, which drain below.
        if let Some(mirror) = self.fast_path.take() {
            tokio::task::block_in_place(|| drop(mirror));
            info!("fast path detached");
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
        let mut threads = Vec::new();
        let mut servers = Vec::new();
        for (addr, mut listener) in self.dns.drain() {
            if let Err(e) = udp::steer_to_newest(&*listener.udp) {
                warn!(%addr, error = %e, "cannot steer UDP to a newer instance");
            }
            if let Err(e) = udp::steer_to_newest(&*listener.tcp) {
                warn!(%addr, error = %e, "cannot steer TCP to a newer instance");
            }
            listener.udp_control.drain.store(true, Ordering::Release);
            listener.tcp_task.abort();
            listener.server.clone().drain_tcp_backlog(&listener.tcp);
            if let Some(t) = listener.udp_thread.take() {
                threads.push(t);
            }
            servers.push((listener.server.clone(), listener.udp_control));
        }
        let joined = self.tasks.spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = tokio::time::timeout_at(deadline, joined).await;
        while tokio::time::Instant::now() < deadline && servers.iter().any(|(s, _)| s.busy()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (_, control) in &servers {
            control.stop.store(true, Ordering::Release);
        }
        if let Some(pidfile) = &self.flags.pidfile {
            let _ = tokio::fs::remove_file(pidfile).await;
        }
    }
}

impl DnsListener {
    fn stop(mut self) {
        self.udp_control.stop.store(true, Ordering::Release);
        self.tcp_task.abort();
        drop(self.udp_thread.take());
    }
}

/// QCLASS CH.
const CLASS_CHAOS: u16 = 3;
/// QTYPE HINFO, what CoreDNS's `loop` probes with.
const HINFO: u16 = 13;

/// Binds `addr` (SO_REUSEPORT, for the surge hand-over) and serves `endpoints` on it, on a
/// child of `tasks`; stopping the returned shutdown stops this server alone.
fn serve_http(
    addr: SocketAddr,
    endpoints: Endpoints,
    tasks: &Shutdown,
) -> std::io::Result<Shutdown> {
    let listener = agentkit::net::tcp_listener(addr, Sharing::ReusePort, HTTP_BACKLOG)?;
    let server = tasks.child();
    tasks.spawn(AdminServer::new(listener, endpoints).serve(server.clone()));
    Ok(server)
}

/// One readiness self-test: every listener answers `id.server. CH TXT` itself.
async fn self_test(addrs: &[SocketAddr]) -> bool {
    for addr in addrs {
        let answered = probe(
            *addr,
            "id.server.",
            wire::rtype::TXT,
            CLASS_CHAOS,
            Duration::from_secs(1),
        )
        .await;
        if answered.is_none() {
            return false;
        }
    }
    !addrs.is_empty()
}

/// Sends one query to `addr` (the loopback address of its family if `addr` is a wildcard)
/// over UDP and waits up to `timeout` for a reply with its ID.
pub async fn probe(
    addr: SocketAddr,
    name: &str,
    qtype: u16,
    qclass: u16,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let (local, target): (SocketAddr, SocketAddr) = if addr.is_ipv4() {
        let ip = if addr.ip().is_unspecified() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            addr.ip()
        };
        (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::new(ip, addr.port()),
        )
    } else {
        let ip = if addr.ip().is_unspecified() {
            Ipv6Addr::LOCALHOST.into()
        } else {
            addr.ip()
        };
        (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            SocketAddr::new(ip, addr.port()),
        )
    };
    let socket = tokio::net::UdpSocket::bind(local).await.ok()?;
    let id: u16 = rand::random();
    let mut query = Vec::new();
    wire::build_query(id, name, qtype, None, &mut query);
    let at = query.len() - 2;
    query[at..].copy_from_slice(&qclass.to_be_bytes());
    socket.send_to(&query, target).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let (n, _) = tokio::time::timeout(left, socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// CoreDNS's `loop`: asks each zone for `<random>.<random>.<zone> HINFO` through our own
/// listener; if the probe comes back to us, queries for the zone would circle between us and
/// the upstream. Returns the first loop found.
async fn detect_loops(checks: Vec<(String, Server, SocketAddr)>) -> Option<String> {
    for (zone, server, addr) in checks {
        let name = format!(
            "{}.{}.{}",
            rand::random::<u32>(),
            rand::random::<u32>(),
            zone.trim_start_matches('.')
        );
        server.arm_loop_probe(&name);
        let _ = probe(addr, &name, HINFO, 1, Duration::from_secs(6)).await;
        let seen = server.disarm_loop_probe();
        if seen >= LOOP_THRESHOLD {
            return Some(format!(
                "Loop ({addr} -> forward upstream) detected for zone {zone:?}: the probe {name} came back {seen} times; point the upstream elsewhere (for example not at 127.0.0.53)"
            ));
        }
    }
    None
}

/// Runs the agent until `shutdown`: load, start, intercept, serve, reload, repair, hand over.
pub async fn run(flags: Flags, shutdown: Shutdown) -> anyhow::Result<()> {
    // Files, netlink and iptables: on the blocking pool, before anything is served.
    let (mut agent, checks, initial) = shutdown
        .spawn_blocking({
            let (flags, shutdown) = (flags.clone(), shutdown.clone());
            move || -> anyhow::Result<_> {
                let loaded = load(&flags)?;
                let checks_config = loaded.config.clone();
                let initial = loaded.text.clone().into_bytes();
                let agent = Agent::start(flags.clone(), loaded, Registry::new(), &shutdown)?;
                let checks = plan_loop_checks(&checks_config, &agent);
                if let Some(pidfile) = &flags.pidfile {
                    std::fs::write(pidfile, format!("{}\n", std::process::id()))
                        .with_context(|| format!("writing {}", pidfile.display()))?;
                }
                agent.ensure_interception();
                Ok((agent, checks, initial))
            }
        })
        .await??;
    agent.start_fast_path();
    agent.spawn_repair();
    agent.spawn_self_test();
    info!(addresses = ?agent.dns_addresses(), "node-local-dns serving");

    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    if !checks.is_empty() {
        let tx = fatal_tx.clone();
        agent.tasks.spawn(async move {
            if let Some(message) = detect_loops(checks).await {
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
    let mut mirror_tick = tokio::time::interval(fast_path::SYNC_INTERVAL);
    mirror_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mirror_ticks: u32 = 0;
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
            _ = mirror_tick.tick(), if agent.fast_path.is_some() => {
                mirror_ticks = mirror_ticks.wrapping_add(1);
                // Re-attach attempts and XDP rechecks once a second; map updates every tick.
                tokio::task::block_in_place(|| agent.sync_fast_path(mirror_ticks % 10 == 0));
            }
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

fn plan_loop_checks(config: &Config, agent: &Agent) -> Vec<(String, Server, SocketAddr)> {
    let mut checks = Vec::new();
    for block in &config.blocks {
        if !block.loop_detect || block.forward.is_none() {
            continue;
        }
        let Some(addr) = block_addresses(block)
            .into_iter()
            .find(|a| agent.dns.contains_key(a))
        else {
            continue;
        };
        if let Some(listener) = agent.dns.get(&addr) {
            for zone in &block.zones {
                checks.push((zone.clone(), listener.server.clone(), addr));
            }
        }
    }
    checks
}
