//! The route table: exact and `*.` wildcard SNI names, CONNECT destinations and legacy PROXY
//! destinations, each looked up in a hash map (a wildcard lookup costs one probe per label of
//! the name, not per route). A table is immutable; a reload builds a new one and swaps it in
//! atomically, reusing the `Route` objects whose config did not change, so their connections,
//! counters and backend health carry over untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agentkit::Shutdown;
use prometheus::{Histogram, IntCounter};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, BackendAddr, Config, UnknownSni};
use crate::metrics::Metrics;

/// A route of the running config, shared by the table and its open connections.
#[derive(Debug)]
pub struct Route {
    /// The validated config of this route.
    pub config: config::Route,
    /// The backends, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Open connections under this route's name, shared with the objects that replace it on
    /// reload, so a route cap holds across config changes.
    active: Arc<AtomicUsize>,
    next: AtomicUsize,
    /// Cancelled when a reload removes or changes this route.
    pub retired: CancellationToken,
    /// Per-route metric handles, resolved once.
    pub stats: RouteStats,
    live: Arc<LiveRoutes>,
}

/// Metric handles of one route.
#[derive(Debug)]
pub struct RouteStats {
    /// Bytes client to backend.
    pub bytes_up: IntCounter,
    /// Bytes backend to client.
    pub bytes_down: IntCounter,
    /// Connection durations.
    pub duration: Histogram,
    /// Failed connect attempts.
    pub connect_failures: IntCounter,
    /// Ejections.
    pub ejections: IntCounter,
}

/// A backend address with its load and passive-health state. Shared between routes and
/// across reloads when the address stays.
#[derive(Debug)]
pub struct Backend {
    /// Where to connect.
    pub addr: BackendAddr,
    active: AtomicUsize,
    failures: AtomicU32,
    ejected: AtomicBool,
    probing: AtomicBool,
}

/// Counts the live `Route` objects per name, so a route's metric series are forgotten only
/// when the last object of that name is gone.
#[derive(Debug)]
pub struct LiveRoutes {
    counts: Mutex<HashMap<String, usize>>,
    metrics: Metrics,
    listeners: Vec<String>,
}

impl LiveRoutes {
    /// A registry for routes whose series live in `metrics`.
    pub fn new(metrics: Metrics, listeners: Vec<String>) -> Arc<Self> {
        Arc::new(LiveRoutes {
            counts: Mutex::new(HashMap::new()),
            metrics,
            listeners,
        })
    }
}

/// Holds one connection slot of a route and of a backend; released on drop.
#[derive(Debug)]
pub struct Slot {
    route: Arc<Route>,
    backend: Option<Arc<Backend>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.route.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(b) = &self.backend {
            b.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Slot {
    /// Stops counting the connection on its backend.
    pub fn clear_backend(&mut self) {
        if let Some(old) = self.backend.take() {
            old.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts the connection on `backend` too.
    pub fn set_backend(&mut self, backend: Arc<Backend>) {
        backend.active.fetch_add(1, Ordering::AcqRel);
        if let Some(old) = self.backend.replace(backend) {
            old.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Route {
    /// Takes a connection slot unless the route's cap is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = self.config.max_connections {
            if prev >= max {
                self.active.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
        }
        Some(Slot {
            route: Arc::clone(self),
            backend: None,
        })
    }

    /// Tells this route's connections that a reload removed or changed it.
    pub fn retire(&self) {
        if self.active() > 0 {
            warn!(route = %self.config.name, open = self.active(), policy = ?self.config.on_change, "route removed or changed");
        }
        self.retired.cancel();
    }

    /// Open connections under this route's name.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The order to try backends in: healthy before ejected, fewest connections first, ties
    /// rotated so equal backends share the load. With weights, the first is drawn by weight
    /// among the healthy ones, and backends of weight 0 are never tried.
    pub fn backend_order(&self) -> Vec<Arc<Backend>> {
        if !self.config.weights.is_empty() {
            return self.weighted_order();
        }
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<(bool, usize, usize, &Arc<Backend>)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.is_ejected(), b.active(), (i + n - start % n) % n, b))
            .collect();
        order.sort_unstable_by_key(|(e, a, r, _)| (*e, *a, *r));
        order
            .into_iter()
            .map(|(_, _, _, b)| Arc::clone(b))
            .collect()
    }
}

impl Route {
    /// Whether a new connection draws the route's refused share (`refused_weight`: invalid
    /// Gateway API backends) and must be refused without trying any backend. The share is
    /// taken over the configured weights, whatever the backends' health.
    pub fn refuses(&self) -> bool {
        let refused = u64::from(self.config.refused_weight);
        if refused == 0 {
            return false;
        }
        let served: u64 = if self.config.weights.is_empty() {
            self.backends.len() as u64
        } else {
            self.config.weights.iter().map(|w| u64::from(*w)).sum()
        };
        rand::random_range(0..refused + served) < refused
    }

    fn weighted_order(&self) -> Vec<Arc<Backend>> {
        let weight = |i: usize| self.config.weights.get(i).copied().unwrap_or(0);
        let mut rest: Vec<(bool, usize, usize)> = (0..self.backends.len())
            .filter(|i| weight(*i) > 0)
            .map(|i| (self.backends[i].is_ejected(), self.backends[i].active(), i))
            .collect();
        let healthy: u64 = rest
            .iter()
            .filter(|(ejected, _, _)| !ejected)
            .map(|(_, _, i)| u64::from(weight(*i)))
            .sum();
        let mut order = Vec::with_capacity(rest.len());
        if healthy > 0 {
            let mut draw = rand::random_range(0..healthy);
            if let Some(pos) = rest.iter().position(|(ejected, _, i)| {
                if *ejected {
                    return false;
                }
                let w = u64::from(weight(*i));
                if draw < w {
                    return true;
                }
                draw -= w;
                false
            }) {
                order.push(Arc::clone(&self.backends[rest.remove(pos).2]));
            }
        }
        rest.sort_unstable();
        order.extend(
            rest.into_iter()
                .map(|(_, _, i)| Arc::clone(&self.backends[i])),
        );
        order
    }
}

/// The file's routes with `dynamic` ones (from Kubernetes) added: a dynamic route whose name a
/// static route has is left out, and it loses the hosts and the destination a static route
/// has; one left with neither is left out.
pub fn merge(static_routes: &[config::Route], dynamic: &[config::Route]) -> Vec<config::Route> {
    let names: std::collections::HashSet<&str> =
        static_routes.iter().map(|r| r.name.as_str()).collect();
    let hosts: std::collections::HashSet<&str> = static_routes
        .iter()
        .flat_map(|r| r.hosts.iter().map(String::as_str))
        .collect();
    let destinations: std::collections::HashSet<&str> = static_routes
        .iter()
        .filter_map(|r| r.destination.as_deref())
        .collect();
    let mut merged = static_routes.to_vec();
    for route in dynamic {
        if names.contains(route.name.as_str()) {
            continue;
        }
        let claims = !route.hosts.is_empty() || route.destination.is_some();
        let mut route = route.clone();
        route.hosts.retain(|h| !hosts.contains(h.as_str()));
        if route
            .destination
            .as_deref()
            .is_some_and(|d| destinations.contains(d))
        {
            route.destination = None;
        }
        if claims && route.hosts.is_empty() && route.destination.is_none() {
            continue;
        }
        merged.push(route);
    }
    merged
}

impl Drop for Route {
    fn drop(&mut self) {
        let Ok(mut counts) = self.live.counts.lock() else {
            return;
        };
        let name = &self.config.name;
        let last = match counts.get_mut(name) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if last {
            counts.remove(name);
            self.live.metrics.forget_route(name, &self.live.listeners);
        }
    }
}

impl Backend {
    fn new(addr: BackendAddr) -> Self {
        Backend {
            addr,
            active: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        }
    }

    /// Open connections to this backend.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Whether passive health has ejected it.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// A connect succeeded.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Release);
        self.ejected.store(false, Ordering::Release);
    }

    /// A connect failed; returns true when this failure ejected the backend (the caller
    /// then starts the probe).
    pub fn record_failure(&self, eject_after: u32) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        failures >= eject_after
            && self
                .ejected
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Probes an ejected backend every `interval` until a connect succeeds, the backend is
    /// dropped from every route, or `shutdown` stops accepting. The probe is spawned on the
    /// shutdown's tracker; it only serves new connections, so it ends when the shutdown
    /// begins instead of holding up the drain.
    pub fn spawn_probe(
        self: &Arc<Self>,
        interval: Duration,
        timeout: Duration,
        shutdown: &Shutdown,
    ) {
        // At most one probe per backend, however often it flaps.
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Backend> = Arc::downgrade(self);
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            tokio::select! {
                () = probe_until_back(&weak, interval, timeout) => {}
                () = stop.stopping() => {}
            }
            if let Some(backend) = weak.upgrade() {
                backend.probing.store(false, Ordering::Release);
            }
        });
    }
}

/// Returns once the backend answers (back in rotation), is no longer ejected, or is gone.
async fn probe_until_back(backend: &Weak<Backend>, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(backend) = backend.upgrade() else {
            return;
        };
        if !backend.is_ejected() {
            return;
        }
        if connect(&backend.addr, timeout).await.is_ok() {
            info!(backend = %backend.addr, "backend answers again; back in rotation");
            backend.record_success();
            return;
        }
    }
}

/// Connects to a backend address (resolving a name), within `timeout` per attempt.
pub async fn connect(addr: &BackendAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let attempt = async {
        match addr {
            BackendAddr::Ip(a) => TcpStream::connect(a).await,
            BackendAddr::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// An immutable routing table.
#[derive(Debug)]
pub struct RouteTable {
    exact: HashMap<String, Arc<Route>>,
    wildcard: HashMap<String, Arc<Route>>,
    by_destination: HashMap<String, Arc<Route>>,
    by_proxy_destination: HashMap<SocketAddr, Arc<Route>>,
    by_name: HashMap<String, Arc<Route>>,
    unknown_sni: UnknownSni,
}

/// What the table says about an SNI.
#[derive(Debug)]
pub enum SniMatch<'a> {
    /// A route.
    Route(&'a Arc<Route>),
    /// Reject with a TLS alert.
    Reject,
    /// Close silently.
    Close,
}

impl RouteTable {
    /// Builds the table for `config`, reusing unchanged routes and known backends of
    /// `previous`. Returns the routes of `previous` that were not reused: the caller retires
    /// them ([`Route::retire`]) once the new table is in place, and their connections then
    /// follow the route's `on_change` policy.
    pub fn build(
        config: &Config,
        previous: Option<&RouteTable>,
        live: &Arc<LiveRoutes>,
    ) -> (RouteTable, Vec<Arc<Route>>) {
        let metrics = &live.metrics;
        let mut known_backends: HashMap<BackendAddr, Arc<Backend>> = HashMap::new();
        if let Some(prev) = previous {
            for r in prev.by_name.values() {
                for b in &r.backends {
                    known_backends.insert(b.addr.clone(), Arc::clone(b));
                }
            }
        }
        let mut by_name = HashMap::with_capacity(config.routes.len());
        for rc in &config.routes {
            let reused = previous
                .and_then(|p| p.by_name.get(&rc.name))
                .filter(|r| r.config == *rc)
                .cloned();
            let route = reused.unwrap_or_else(|| {
                let backends = rc
                    .backends
                    .iter()
                    .map(|a| {
                        known_backends
                            .entry(a.clone())
                            .or_insert_with(|| Arc::new(Backend::new(a.clone())))
                            .clone()
                    })
                    .collect();
                if let Ok(mut counts) = live.counts.lock() {
                    *counts.entry(rc.name.clone()).or_insert(0) += 1;
                }
                let name = rc.name.as_str();
                let active = previous.and_then(|p| p.by_name.get(&rc.name)).map_or_else(
                    || Arc::new(AtomicUsize::new(0)),
                    |old| Arc::clone(&old.active),
                );
                Arc::new(Route {
                    config: rc.clone(),
                    backends,
                    active,
                    next: AtomicUsize::new(0),
                    retired: CancellationToken::new(),
                    stats: RouteStats {
                        bytes_up: metrics.bytes.with_label_values(&[name, "upstream"]),
                        bytes_down: metrics.bytes.with_label_values(&[name, "downstream"]),
                        duration: metrics.connection_duration.with_label_values(&[name]),
                        connect_failures: metrics
                            .backend_connect_failures
                            .with_label_values(&[name]),
                        ejections: metrics.backend_ejections.with_label_values(&[name]),
                    },
                    live: Arc::clone(live),
                })
            });
            by_name.insert(rc.name.clone(), route);
        }
        let mut retired = Vec::new();
        if let Some(prev) = previous {
            for (name, old) in &prev.by_name {
                let kept = by_name.get(name).is_some_and(|new| Arc::ptr_eq(new, old));
                if !kept {
                    retired.push(Arc::clone(old));
                }
            }
        }
        let mut table = RouteTable {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            by_destination: HashMap::new(),
            by_proxy_destination: HashMap::new(),
            unknown_sni: config.unknown_sni.clone(),
            by_name: HashMap::new(),
        };
        for route in by_name.values() {
            for host in &route.config.hosts {
                match host.strip_prefix("*.") {
                    Some(suffix) => table.wildcard.insert(suffix.to_owned(), Arc::clone(route)),
                    None => table.exact.insert(host.clone(), Arc::clone(route)),
                };
            }
            if let Some(d) = &route.config.destination {
                table.by_destination.insert(d.clone(), Arc::clone(route));
            }
            for d in &route.config.proxy_destinations {
                table.by_proxy_destination.insert(*d, Arc::clone(route));
            }
        }
        table.by_name = by_name;
        (table, retired)
    }

    /// The route for a normalised (lowercase, no trailing dot) SNI: an exact name first, then
    /// the longest matching `*.` suffix. A wildcard matches one or more labels.
    pub fn lookup_host(&self, sni: &str) -> Option<&Arc<Route>> {
        if let Some(r) = self.exact.get(sni) {
            return Some(r);
        }
        let mut rest = sni;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(r) = self.wildcard.get(rest) {
                return Some(r);
            }
        }
        None
    }

    /// Routes a ClientHello: by SNI, then by the PROXY destination, then `unknown_sni`.
    pub fn route_tls(
        &self,
        sni: Option<&str>,
        proxy_destination: Option<SocketAddr>,
    ) -> SniMatch<'_> {
        if let Some(r) = sni.and_then(|s| self.lookup_host(s)) {
            return SniMatch::Route(r);
        }
        if let Some(r) = proxy_destination.and_then(|d| self.by_proxy_destination.get(&d)) {
            return SniMatch::Route(r);
        }
        match &self.unknown_sni {
            UnknownSni::Reject => SniMatch::Reject,
            UnknownSni::Close => SniMatch::Close,
            UnknownSni::Route(name) => match self.by_name.get(name) {
                Some(r) => SniMatch::Route(r),
                None => SniMatch::Reject,
            },
        }
    }

    /// The route for an `X-Gardener-Destination` value.
    pub fn lookup_destination(&self, destination: &str) -> Option<&Arc<Route>> {
        self.by_destination.get(destination)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the table has no route.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// A route by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.by_name.get(name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table(yaml_routes: &str) -> (RouteTable, Arc<LiveRoutes>) {
        let text = format!(
            "admin: {{address: 127.0.0.1:1}}\nlisteners: [{{name: l, address: 127.0.0.1:2, mode: tls}}]\n{yaml_routes}"
        );
        let config = Config::from_yaml(&text).unwrap();
        let live = LiveRoutes::new(Metrics::new(&prometheus::Registry::new()), vec!["l".into()]);
        (RouteTable::build(&config, None, &live).0, live)
    }

    fn name(m: Option<&Arc<Route>>) -> Option<&str> {
        m.map(|r| r.config.name.as_str())
    }

    #[test]
    fn most_specific_wins() {
        let (t, _l) = table(
            "routes:\n- {name: exact, hosts: [api.s1.test], backends: [1.1.1.1:1]}\n\
             - {name: wild, hosts: ['*.s1.test'], backends: [1.1.1.1:1]}\n\
             - {name: deep, hosts: ['*.x.s1.test'], backends: [1.1.1.1:1]}\n\
             - {name: top, hosts: ['*.test'], backends: [1.1.1.1:1]}\n",
        );
        assert_eq!(name(t.lookup_host("api.s1.test")), Some("exact"));
        assert_eq!(name(t.lookup_host("other.s1.test")), Some("wild"));
        assert_eq!(name(t.lookup_host("a.b.s1.test")), Some("wild"));
        assert_eq!(name(t.lookup_host("a.x.s1.test")), Some("deep"));
        assert_eq!(name(t.lookup_host("s1.test")), Some("top"));
        assert_eq!(name(t.lookup_host("test")), None);
        assert_eq!(name(t.lookup_host("api.s1.testx")), None);
    }

    #[test]
    fn ten_thousand_names() {
        let mut routes = String::from("routes:\n");
        for i in 0..10_000 {
            routes.push_str(&format!(
                "- {{name: r{i}, hosts: [api.s{i}.test, '*.s{i}.example'], backends: [127.0.0.1:{}]}}\n",
                1 + i % 60_000
            ));
        }
        let (t, _l) = table(&routes);
        assert_eq!(t.len(), 10_000);
        for i in (0..10_000).step_by(997) {
            assert_eq!(
                name(t.lookup_host(&format!("api.s{i}.test"))),
                Some(format!("r{i}").as_str())
            );
            assert_eq!(
                name(t.lookup_host(&format!("x.s{i}.example"))),
                Some(format!("r{i}").as_str())
            );
        }
    }

    #[test]
    fn unknown_sni_policies() {
        let (t, _l) = table("routes: [{name: a, hosts: [a.test], proxy_destinations: ['240.0.0.2:443'], backends: [1.1.1.1:1]}]\nunknown_sni: a\n");
        assert!(matches!(t.route_tls(Some("zzz"), None), SniMatch::Route(_)));
        let (t, _l) = table("routes: [{name: a, hosts: [a.test], proxy_destinations: ['240.0.0.2:443'], backends: [1.1.1.1:1]}]\nunknown_sni: close\n");
        assert!(matches!(t.route_tls(Some("zzz"), None), SniMatch::Close));
        assert!(matches!(
            t.route_tls(None, Some("240.0.0.2:443".parse().unwrap())),
            SniMatch::Route(_)
        ));
        let (t, _l) = table("routes: []\n");
        assert!(matches!(t.route_tls(None, None), SniMatch::Reject));
    }

    #[test]
    fn reload_reuses_unchanged_routes_and_retires_the_rest() {
        let (t1, live) = table(
            "routes:\n- {name: same, hosts: [a.test], backends: [1.1.1.1:1]}\n- {name: changed, hosts: [b.test], backends: [1.1.1.1:2]}\n- {name: gone, hosts: [c.test], backends: [1.1.1.1:3]}\n",
        );
        let text = "admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls}]\nroutes:\n- {name: same, hosts: [a.test], backends: [1.1.1.1:1]}\n- {name: changed, hosts: [b.test, bb.test], backends: [1.1.1.1:2]}\n";
        let (t2, retired) = RouteTable::build(&Config::from_yaml(text).unwrap(), Some(&t1), &live);
        assert_eq!(retired.len(), 2);
        retired.iter().for_each(|r| r.retire());
        assert!(Arc::ptr_eq(
            t1.get("same").unwrap(),
            t2.get("same").unwrap()
        ));
        assert!(!t1.get("same").unwrap().retired.is_cancelled());
        assert!(t1.get("changed").unwrap().retired.is_cancelled());
        assert!(t1.get("gone").unwrap().retired.is_cancelled());
        // The changed route keeps its backend object (load and health carry over).
        assert!(Arc::ptr_eq(
            &t1.get("changed").unwrap().backends[0],
            &t2.get("changed").unwrap().backends[0]
        ));
        assert!(t2.get("gone").is_none());
    }

    #[test]
    fn least_connections_and_ejection() {
        let (t, _l) = table("routes: [{name: a, hosts: [a.test], backends: ['1.1.1.1:1', '1.1.1.1:2', '1.1.1.1:3']}]\n");
        let r = t.get("a").unwrap();
        let mut slot = r.try_acquire().unwrap();
        slot.set_backend(Arc::clone(&r.backends[0]));
        let order = r.backend_order();
        assert_ne!(
            order[0].addr, r.backends[0].addr,
            "the busy backend is not first"
        );
        assert_eq!(order[2].addr, r.backends[0].addr);
        assert!(!r.backends[1].record_failure(2));
        assert!(r.backends[1].record_failure(2));
        assert!(!r.backends[1].record_failure(2), "ejected once");
        let order = r.backend_order();
        assert_eq!(
            order[2].addr, r.backends[1].addr,
            "ejected backends go last"
        );
        drop(slot);
        assert_eq!(r.backends[0].active(), 0);
        assert_eq!(r.active(), 0);
    }

    #[test]
    fn route_cap() {
        let (t, _l) = table(
            "routes: [{name: a, hosts: [a.test], backends: [1.1.1.1:1], max_connections: 2}]\n",
        );
        let r = t.get("a").unwrap();
        let s1 = r.try_acquire().unwrap();
        let _s2 = r.try_acquire().unwrap();
        assert!(r.try_acquire().is_none());
        drop(s1);
        assert!(r.try_acquire().is_some());
    }

    fn route(name: &str, hosts: &[&str], destination: Option<&str>) -> config::Route {
        let text = format!(
            "admin: {{address: 127.0.0.1:1}}\nlisteners: [{{name: l, address: 127.0.0.1:2, mode: tls}}]\nroutes: [{{name: {name}, backends: [10.0.0.1:1]}}]\n"
        );
        let mut r = Config::from_yaml(&text).unwrap().routes.remove(0);
        r.hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
        r.destination = destination.map(str::to_owned);
        r
    }

    #[test]
    fn static_routes_win_names_hosts_and_destinations() {
        let statics = [route("a", &["a.test"], Some("outbound|443||x"))];
        let dynamic = [
            route("a", &["other.test"], None),
            route("k1", &["a.test", "k1.test"], None),
            route("k2", &["a.test"], None),
            route("k3", &[], Some("outbound|443||x")),
            route("k4", &[], Some("outbound|443||y")),
        ];
        let merged = merge(&statics, &dynamic);
        let got: Vec<(&str, Vec<&str>, Option<&str>)> = merged
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.hosts.iter().map(String::as_str).collect(),
                    r.destination.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a", vec!["a.test"], Some("outbound|443||x")),
                ("k1", vec!["k1.test"], None),
                ("k4", vec![], Some("outbound|443||y")),
            ]
        );
    }

    #[test]
    fn weights_share_the_first_pick_and_zero_is_never_tried() {
        let mut config = route("w", &["w.test"], None);
        config.backends = (1..=3)
            .map(|i| BackendAddr::Ip(SocketAddr::from(([10, 0, 0, i], 1))))
            .collect();
        config.weights = vec![3, 1, 0];
        let mut c = Config::from_yaml("admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls}]\n").unwrap();
        c.routes = vec![config];
        let live = LiveRoutes::new(Metrics::new(&prometheus::Registry::new()), vec!["l".into()]);
        let (t, _) = RouteTable::build(&c, None, &live);
        let r = t.lookup_host("w.test").unwrap();
        let mut first = [0u32; 3];
        for _ in 0..4000 {
            let order = r.backend_order();
            assert_eq!(order.len(), 2, "weight 0 is never tried");
            let i = r
                .backends
                .iter()
                .position(|b| Arc::ptr_eq(b, &order[0]))
                .unwrap();
            first[i] += 1;
        }
        assert_eq!(first[2], 0);
        // 3:1, within a wide margin (binomial, n = 4000: sd of the share is under 1 %).
        let share = f64::from(first[0]) / 4000.0;
        assert!((0.70..0.80).contains(&share), "{first:?}");
        // An ejected backend is drawn no more: the other healthy one goes first.
        r.backends[0].ejected.store(true, Ordering::Release);
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&r.backend_order()[0], &r.backends[1]));
        }
    }

    #[test]
    fn a_refused_share_is_drawn_by_weight_and_nothing_else_refuses() {
        let mut config = route("r", &["r.test"], None);
        let live = LiveRoutes::new(Metrics::new(&prometheus::Registry::new()), vec!["l".into()]);
        let mut c = Config::from_yaml("admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls}]\n").unwrap();
        // The file's routes never refuse.
        c.routes = vec![config.clone()];
        let (t, _) = RouteTable::build(&c, None, &live);
        assert!((0..1000).all(|_| !t.get("r").unwrap().refuses()));
        // 1 served : 3 refused.
        config.weights = vec![1000];
        config.refused_weight = 3000;
        c.routes = vec![config.clone()];
        let (t, _) = RouteTable::build(&c, None, &live);
        let r = t.get("r").unwrap();
        let refused = (0..4000).filter(|_| r.refuses()).count();
        assert!((2800..3200).contains(&refused), "{refused} of 4000");
        // No backend left: every connection is refused.
        config.backends.clear();
        config.weights.clear();
        c.routes = vec![config];
        let (t, _) = RouteTable::build(&c, None, &live);
        assert!((0..100).all(|_| t.get("r").unwrap().refuses()));
    }
}
