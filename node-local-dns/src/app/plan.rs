//! What a config turns into before anything is bound: the zones each listening address serves
//! (with their caches, carried over a reload when a block's cache policy did not change), the
//! HTTP endpoints, and the loop checks. Pure: no sockets, no tasks started.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentkit::Shutdown;

use crate::cache::{self, Cache};
use crate::config::{Config, Forward, ServerBlock};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::server::{Served, Server, Zone};

/// Everything a config turns into, before binding.
pub(super) struct Plan {
    /// Zones per DNS listening address.
    pub listeners: HashMap<SocketAddr, Vec<Served>>,
    /// What each HTTP address serves: (metrics, health).
    pub http: HashMap<SocketAddr, (bool, bool)>,
    /// Every zone, once, for gauges and forwarder counters.
    pub zones: Vec<Arc<Zone>>,
    /// Caches by (block zones, port, cache policy), reused by the next reload.
    pub caches: HashMap<String, Arc<Mutex<Cache>>>,
}

/// Where the zones of a plan run their tasks.
pub(super) struct Spawn<'a> {
    /// Upstream fetches: a leaving agent waits for them.
    pub work: &'a Shutdown,
    /// Upstream connection readers and health probes: they end when forced.
    pub background: &'a Shutdown,
}

/// Turns a config into zones per listener; caches of blocks whose zones, port and cache
/// policy did not change are carried over from `old`.
pub(super) fn plan(
    config: &Config,
    metrics: &Metrics,
    old: &HashMap<String, Arc<Mutex<Cache>>>,
    spawn: &Spawn<'_>,
) -> Plan {
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
            let forward = match &block.forward {
                Some(forward) => forward.clone(),
                None => Forward::new(zone_name.clone(), Vec::new()),
            };
            let forwarder = Forwarder::with_tasks(&forward, spawn.background);
            let zone = Arc::new(
                Zone::with_cache(zone_name, Arc::clone(&cache), forwarder)
                    .with_metrics(metrics.clone())
                    .with_tasks(spawn.work),
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

/// The label CoreDNS gives a server: `dns://:53` for the wildcard, `dns://10.0.0.1:53`.
pub(super) fn server_label(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("dns://:{}", addr.port())
    } else {
        format!("dns://{addr}")
    }
}

/// Where a block listens: its `bind` addresses, or both wildcards.
pub(super) fn block_addresses(block: &ServerBlock) -> Vec<SocketAddr> {
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

/// One loop check: a zone, the listener that serves it and its address.
pub(super) type LoopCheck = (String, Server, SocketAddr);

/// CoreDNS's `loop` for every block that forwards and asks for it: each zone is probed
/// through the first of the block's addresses that is served (`served` finds its server).
pub(super) fn loop_checks(
    config: &Config,
    served: impl Fn(SocketAddr) -> Option<Server>,
) -> Vec<LoopCheck> {
    let mut checks = Vec::new();
    for block in &config.blocks {
        if !block.loop_detect || block.forward.is_none() {
            continue;
        }
        let Some((addr, server)) = block_addresses(block)
            .into_iter()
            .find_map(|a| served(a).map(|s| (a, s)))
        else {
            continue;
        };
        for zone in &block.zones {
            checks.push((zone.clone(), server.clone(), addr));
        }
    }
    checks
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::corefile;

    fn config(text: &str) -> Config {
        corefile::parse(text, Path::new("Corefile")).unwrap()
    }

    fn plan_of(config: &Config, old: &HashMap<String, Arc<Mutex<Cache>>>) -> Plan {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let tasks = Shutdown::new();
        let spawn = Spawn {
            work: &tasks,
            background: &tasks,
        };
        plan(config, &metrics, old, &spawn)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn labels_follow_coredns() {
        assert_eq!(server_label(addr("0.0.0.0:53")), "dns://:53");
        assert_eq!(server_label(addr("[::]:5353")), "dns://:5353");
        assert_eq!(
            server_label(addr("169.254.20.10:53")),
            "dns://169.254.20.10:53"
        );
    }

    #[test]
    fn blocks_share_listeners_by_address() {
        let config = config(
            "cluster.local:53 {\n bind 169.254.20.10 10.0.0.10 169.254.20.10\n cache 30\n forward . 10.0.0.1\n prometheus 127.0.0.1:9253\n}\n\
             .:53 {\n bind 169.254.20.10\n forward . 10.0.0.2\n health 127.0.0.1:8080\n prometheus 127.0.0.1:9253\n}\n\
             .:5353 {\n forward . 10.0.0.3\n}\n",
        );
        let plan = plan_of(&config, &HashMap::new());
        let zones_at = |a: &str| -> Vec<String> {
            let mut names: Vec<String> = plan.listeners[&addr(a)]
                .iter()
                .map(|s| format!("{:?}", s.zone.forwarder().stats().upstreams[0].addr))
                .collect();
            names.sort();
            names
        };
        // A repeated `bind` address is one listener; two blocks on one address share it.
        assert_eq!(zones_at("169.254.20.10:53"), ["10.0.0.1:53", "10.0.0.2:53"]);
        assert_eq!(zones_at("10.0.0.10:53"), ["10.0.0.1:53"]);
        // No `bind`: both wildcards.
        assert_eq!(zones_at("0.0.0.0:5353"), ["10.0.0.3:53"]);
        assert_eq!(zones_at("[::]:5353"), ["10.0.0.3:53"]);
        assert_eq!(plan.listeners.len(), 4);
        assert_eq!(plan.zones.len(), 3);
        // One HTTP address serving metrics for two blocks, another health.
        assert_eq!(plan.http[&addr("127.0.0.1:9253")], (true, false));
        assert_eq!(plan.http[&addr("127.0.0.1:8080")], (false, true));
    }

    #[test]
    fn a_reload_keeps_a_cache_only_when_its_block_did_not_change() {
        let before = config(".:53 {\n bind 127.0.0.1\n cache 30\n forward . 10.0.0.1\n}\n");
        let first = plan_of(&before, &HashMap::new());
        let cache_of = |p: &Plan| Arc::clone(p.zones[0].cache());
        // Same block, other upstream: the cache is carried over.
        let same = config(".:53 {\n bind 127.0.0.1\n cache 30\n forward . 10.0.0.9\n}\n");
        let second = plan_of(&same, &first.caches);
        assert!(Arc::ptr_eq(&cache_of(&first), &cache_of(&second)));
        // Another TTL cap is another policy: a fresh cache.
        let other = config(".:53 {\n bind 127.0.0.1\n cache 60\n forward . 10.0.0.1\n}\n");
        let third = plan_of(&other, &second.caches);
        assert!(!Arc::ptr_eq(&cache_of(&second), &cache_of(&third)));
        assert_eq!(third.caches.len(), 1, "the old cache is not kept");
    }

    #[test]
    fn loop_checks_probe_through_a_served_address() {
        let config = config(
            ".:53 {\n bind 10.9.9.9 127.0.0.1\n forward . 10.0.0.1\n loop\n}\n\
             cluster.local:53 {\n bind 127.0.0.1\n forward . 10.0.0.1\n}\n\
             example.org:53 {\n bind 10.9.9.9\n forward . 10.0.0.1\n loop\n}\n",
        );
        let server = Server::new(Vec::new());
        let checks = loop_checks(&config, |a| {
            (a == addr("127.0.0.1:53")).then(|| server.clone())
        });
        // `.` is probed through 127.0.0.1 (10.9.9.9 is not served); the block without
        // `loop` and the one with no served address are not probed.
        let probed: Vec<(String, SocketAddr)> =
            checks.into_iter().map(|(z, _, a)| (z, a)).collect();
        assert_eq!(probed, [(".".to_owned(), addr("127.0.0.1:53"))]);
    }
}
