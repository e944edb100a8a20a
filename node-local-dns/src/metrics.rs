//! Every metric, with CoreDNS's names and labels so the dashboards and alerts written for
//! node-cache keep working (reference: CoreDNS `plugin/metrics`, `plugin/cache`,
//! `plugin/forward` READMEs; Gardener's DNS dashboard). Our additions carry the
//! `node_local_dns_` prefix.
//!
//! The query path never looks a label up: [`ZoneMetrics`] holds the children for one
//! (server, zone) resolved once, so counting a query is a handful of atomic adds.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::wire::rtype;

/// CoreDNS's `plugin.TimeBuckets`: 0.25 ms doubling 16 times.
fn time_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00025, 2.0, 16).unwrap_or_default()
}

/// CoreDNS's size buckets (bytes).
const SIZE_BUCKETS: &[f64] = &[
    0.0, 100.0, 200.0, 300.0, 400.0, 511.0, 1023.0, 2047.0, 4095.0, 8291.0, 16e3, 32e3, 48e3, 64e3,
];

/// Query types CoreDNS reports by name; everything else is `other`.
const TYPES: &[(u16, &str)] = &[
    (rtype::A, "A"),
    (rtype::AAAA, "AAAA"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (33, "SRV"),
    (35, "NAPTR"),
    (43, "DS"),
    (48, "DNSKEY"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (252, "AXFR"),
    (251, "IXFR"),
    (255, "ANY"),
    (257, "CAA"),
];
const OTHER_TYPE: usize = TYPES.len();
const N_TYPES: usize = TYPES.len() + 1;

fn type_index(qtype: u16) -> usize {
    TYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(OTHER_TYPE)
}

/// The `type` label of query type `qtype` (`A`, ..., else `other`).
pub fn type_label(qtype: u16) -> &'static str {
    type_name(type_index(qtype))
}

fn type_name(index: usize) -> &'static str {
    TYPES.get(index).map_or("other", |(_, n)| n)
}

/// Response codes with their own child; others are counted under their number.
const RCODES: &[&str] = &[
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];

/// The name of a response code as CoreDNS's labels spell it.
pub fn rcode_name(rcode: u8) -> &'static str {
    const MORE: &[&str] = &[
        "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13",
        "RCODE14", "RCODE15",
    ];
    match RCODES.get(usize::from(rcode)) {
        Some(name) => name,
        None => MORE
            .get(usize::from(rcode) - RCODES.len())
            .unwrap_or(&"RCODE"),
    }
}

/// Which part of the agent wrote a response (CoreDNS's `plugin` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    /// Answered from the cache.
    Cache,
    /// Answered by an upstream.
    Forward,
    /// Written by the server itself (errors, refusals, malformed queries).
    Server,
}

impl Plugin {
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            Plugin::Cache => "cache",
            Plugin::Forward => "forward",
            Plugin::Server => "",
        }
    }
}

/// The CoreDNS metrics of one process, served by every `prometheus` address.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    responses: IntCounterVec,
    duration: HistogramVec,
    request_size: HistogramVec,
    response_size: HistogramVec,
    do_requests: IntCounterVec,
    cache_entries: IntGaugeVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_prefetch: IntCounterVec,
    cache_served_stale: IntCounterVec,
    proxy_duration: HistogramVec,
    proxy_healthcheck_failures: IntCounterVec,
    healthcheck_broken: IntCounter,
    max_concurrent_rejects: IntCounter,
    /// Misses that joined an upstream query already in flight (single flight).
    pub coalesced: IntCounter,
    /// Upstream responses dropped: not matching the question, or malformed.
    pub upstream_dropped: IntCounter,
    /// Queries answered REFUSED because `max_concurrent` was reached.
    pub overloaded: IntCounter,
    /// UDP queries answered REFUSED at once because the listener had
    /// `server::MAX_PENDING_MISSES` misses waiting already.
    pub misses_refused: IntCounter,
    /// DNS TCP connections closed at once because the listener had
    /// `server::MAX_TCP_CONNECTIONS` open.
    pub tcp_refused: IntCounter,
    /// Config reloads by result.
    pub reloads: IntCounterVec,
    /// What the kernel fast path did with packets, by result (`hit`, `miss`, `expired`, ...).
    pub fast_path_packets: IntCounterVec,
    /// Interfaces the fast path is attached to.
    pub fast_path_attached: IntGauge,
    /// Interfaces asked for in XDP mode but attached at tc, because an XDP_TX reply could not
    /// reach the pod there.
    pub fast_path_xdp_fallbacks: IntGauge,
    /// Queries the kernel answered, by server, zone, type and rcode (already in the CoreDNS
    /// request, response and cache totals).
    fast_path_answers: IntCounterVec,
    /// Cache entries the kernel could not hold (name, records or size beyond its limits).
    pub fast_path_skipped: IntCounter,
    /// Loop-detection probes seen back (a forwarding loop).
    pub loop_probes: IntCounter,
    /// Liveness probe requests.
    pub health_duration: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Declares every metric in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let server_zone = &["server", "zone", "view"];
        let cache_labels = &["server", "zones", "view"];
        let cache_typed = &["server", "type", "zones", "view"];
        let build = IntGaugeVec::new(
            Opts::new(
                "coredns_build_info",
                "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
            ),
            &["version", "revision", "goversion"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "node-local-dns", "rust"])
            .set(1);
        let metrics = Metrics {
            requests: counter_vec(
                registry,
                "coredns_dns_requests_total",
                "Counter of DNS requests made per zone, protocol and family.",
                &["server", "zone", "view", "proto", "family", "type"],
            )?,
            responses: counter_vec(
                registry,
                "coredns_dns_responses_total",
                "Counter of response status codes.",
                &["server", "zone", "view", "rcode", "plugin"],
            )?,
            duration: histogram_vec(
                registry,
                "coredns_dns_request_duration_seconds",
                "Histogram of the time (in seconds) each request took per zone.",
                &["server", "zone", "view", "type"],
                time_buckets(),
            )?,
            request_size: histogram_vec(
                registry,
                "coredns_dns_request_size_bytes",
                "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.",
                &["server", "zone", "view", "proto"],
                SIZE_BUCKETS.to_vec(),
            )?,
            response_size: histogram_vec(
                registry,
                "coredns_dns_response_size_bytes",
                "Size of the returned response in bytes.",
                &["server", "zone", "view", "proto"],
                SIZE_BUCKETS.to_vec(),
            )?,
            do_requests: counter_vec(
                registry,
                "coredns_dns_do_requests_total",
                "Counter of DNS requests with DO bit set per zone.",
                server_zone,
            )?,
            cache_entries: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "coredns_cache_entries",
                        "The number of elements in the cache.",
                    ),
                    cache_typed,
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            cache_hits: counter_vec(
                registry,
                "coredns_cache_hits_total",
                "The count of cache hits.",
                cache_typed,
            )?,
            cache_misses: counter_vec(
                registry,
                "coredns_cache_misses_total",
                "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.",
                cache_labels,
            )?,
            cache_requests: counter_vec(
                registry,
                "coredns_cache_requests_total",
                "The count of cache requests.",
                cache_labels,
            )?,
            cache_prefetch: counter_vec(
                registry,
                "coredns_cache_prefetch_total",
                "The number of times the cache has prefetched a cached item.",
                cache_labels,
            )?,
            cache_served_stale: counter_vec(
                registry,
                "coredns_cache_served_stale_total",
                "The number of requests served from stale cache entries.",
                cache_labels,
            )?,
            proxy_duration: histogram_vec(
                registry,
                "coredns_proxy_request_duration_seconds",
                "Histogram of the time each request took.",
                &["proxy_name", "to", "rcode"],
                time_buckets(),
            )?,
            proxy_healthcheck_failures: counter_vec(
                registry,
                "coredns_proxy_healthcheck_failures_total",
                "Counter of the number of failed healthchecks.",
                &["proxy_name", "to"],
            )?,
            healthcheck_broken: counter(
                registry,
                "coredns_forward_healthcheck_broken_total",
                "Counter of the number of complete failures of the healthchecks.",
            )?,
            max_concurrent_rejects: counter(
                registry,
                "coredns_forward_max_concurrent_rejects_total",
                "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            )?,
            coalesced: counter(
                registry,
                "node_local_dns_coalesced_total",
                "Cache misses that joined an identical upstream query already in flight.",
            )?,
            upstream_dropped: counter(
                registry,
                "node_local_dns_upstream_dropped_total",
                "Upstream responses dropped because they did not answer the question sent or were malformed.",
            )?,
            overloaded: counter(
                registry,
                "node_local_dns_overloaded_total",
                "Queries answered REFUSED at once because max_concurrent upstream queries were in flight.",
            )?,
            misses_refused: counter(
                registry,
                "node_local_dns_misses_refused_total",
                "UDP queries answered REFUSED at once because the listener had too many misses waiting for upstreams.",
            )?,
            tcp_refused: counter(
                registry,
                "node_local_dns_tcp_connections_refused_total",
                "DNS TCP connections closed at once because the listener had too many open.",
            )?,
            reloads: counter_vec(
                registry,
                "node_local_dns_reloads_total",
                "Corefile reloads by result (applied, rejected).",
                &["result"],
            )?,
            fast_path_packets: counter_vec(
                registry,
                "node_local_dns_fast_path_packets_total",
                "Packets seen by the kernel fast path, by result (hit, miss, expired, not_local, unsupported, malformed, too_big, error).",
                &["result"],
            )?,
            fast_path_attached: {
                let g = IntGauge::new(
                    "node_local_dns_fast_path_attached_interfaces",
                    "Interfaces the kernel fast path is attached to.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            fast_path_xdp_fallbacks: {
                let g = IntGauge::new(
                    "node_local_dns_fast_path_xdp_fallback_interfaces",
                    "Interfaces asked for in XDP mode but attached at tc, because an XDP_TX reply would not reach the pod there (a veth whose peer has no NAPI).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            fast_path_answers: counter_vec(
                registry,
                "node_local_dns_fast_path_responses_total",
                "Queries answered by the kernel fast path, by type and rcode. They are included in coredns_dns_requests_total, coredns_dns_responses_total and the coredns_cache_* counters.",
                &["server", "zone", "type", "rcode"],
            )?,
            fast_path_skipped: counter(
                registry,
                "node_local_dns_fast_path_mirror_skipped_total",
                "Cache entries not mirrored into the kernel (name, records or size beyond its limits).",
            )?,
            loop_probes: counter(
                registry,
                "node_local_dns_loop_probes_seen_total",
                "Loop-detection probes that came back to this server (a forwarding loop).",
            )?,
            health_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "coredns_health_request_duration_seconds",
                        "Histogram of the time (in seconds) each request took.",
                    )
                    .buckets(time_buckets()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
        };
        Ok(metrics)
    }

    /// The children for queries of `zone` (`"cluster.local."`) on `server` (`"dns://:53"`).
    pub fn zone(&self, server: &str, zone: &str) -> ZoneMetrics {
        let requests = std::array::from_fn(|proto| {
            std::array::from_fn(|family| {
                std::array::from_fn(|t| {
                    self.requests.with_label_values(&[
                        server,
                        zone,
                        "",
                        ["udp", "tcp"][proto],
                        ["1", "2"][family],
                        type_name(t),
                    ])
                })
            })
        });
        let responses = std::array::from_fn(|p| {
            let plugin = [Plugin::Cache, Plugin::Forward, Plugin::Server][p].label();
            std::array::from_fn(|r| {
                self.responses
                    .with_label_values(&[server, zone, "", RCODES[r], plugin])
            })
        });
        ZoneMetrics {
            requests,
            responses,
            responses_vec: self.responses.clone(),
            fast_path_answers: self.fast_path_answers.clone(),
            server: server.to_owned(),
            zone: zone.to_owned(),
            duration: std::array::from_fn(|t| {
                self.duration
                    .with_label_values(&[server, zone, "", type_name(t)])
            }),
            request_size: std::array::from_fn(|p| {
                self.request_size
                    .with_label_values(&[server, zone, "", ["udp", "tcp"][p]])
            }),
            response_size: std::array::from_fn(|p| {
                self.response_size
                    .with_label_values(&[server, zone, "", ["udp", "tcp"][p]])
            }),
            do_requests: self.do_requests.with_label_values(&[server, zone, ""]),
            hits: [
                self.cache_hits
                    .with_label_values(&[server, "success", zone, ""]),
                self.cache_hits
                    .with_label_values(&[server, "denial", zone, ""]),
            ],
            entries: [
                self.cache_entries
                    .with_label_values(&[server, "success", zone, ""]),
                self.cache_entries
                    .with_label_values(&[server, "denial", zone, ""]),
            ],
            misses: self.cache_misses.with_label_values(&[server, zone, ""]),
            cache_requests: self.cache_requests.with_label_values(&[server, zone, ""]),
            prefetch: self.cache_prefetch.with_label_values(&[server, zone, ""]),
            served_stale: self
                .cache_served_stale
                .with_label_values(&[server, zone, ""]),
        }
    }

    /// One upstream exchange of `forward`.
    pub fn upstream(&self, to: &str, rcode: &str, elapsed: Duration) {
        self.proxy_duration
            .with_label_values(&["forward", to, rcode])
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the forward counters from the forwarders' own running totals (at scrape time):
    /// health-check failures per upstream address, and the forwarder-wide totals.
    pub fn set_forward_totals(
        &self,
        healthcheck_broken: u64,
        max_concurrent_rejects: u64,
        dropped: u64,
        healthcheck_failures: &[(String, u64)],
    ) {
        set_counter(&self.upstream_dropped, dropped);
        set_counter(&self.healthcheck_broken, healthcheck_broken);
        set_counter(&self.max_concurrent_rejects, max_concurrent_rejects);
        for (to, failures) in healthcheck_failures {
            set_counter(
                &self
                    .proxy_healthcheck_failures
                    .with_label_values(&["forward", to]),
                *failures,
            );
        }
    }
}

/// Raises a counter to `total` (counters fed from another component's running totals).
fn set_counter(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// The pre-resolved children of one (server, zone).
#[derive(Debug, Clone)]
pub struct ZoneMetrics {
    requests: [[[IntCounter; N_TYPES]; 2]; 2],
    responses: [[IntCounter; 6]; 3],
    responses_vec: IntCounterVec,
    fast_path_answers: IntCounterVec,
    server: String,
    zone: String,
    duration: [Histogram; N_TYPES],
    request_size: [Histogram; 2],
    response_size: [Histogram; 2],
    do_requests: IntCounter,
    hits: [IntCounter; 2],
    entries: [IntGauge; 2],
    misses: IntCounter,
    cache_requests: IntCounter,
    prefetch: IntCounter,
    served_stale: IntCounter,
}

/// What the cache did for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A live entry of the success (false) or denial (true) cache.
    Hit {
        /// From the denial cache.
        denial: bool,
    },
    /// An expired entry served stale.
    Stale,
    /// Not in the cache.
    Miss,
    /// The zone has no cache.
    Uncached,
}

impl ZoneMetrics {
    /// One query in: counts the request.
    pub fn request(&self, tcp: bool, v6: bool, qtype: u16, udp_size: u16, dnssec_ok: bool) {
        let t = type_index(qtype);
        self.requests[usize::from(tcp)][usize::from(v6)][t].inc();
        self.request_size[usize::from(tcp)].observe(if tcp {
            65535.0
        } else {
            f64::from(udp_size)
        });
        if dnssec_ok {
            self.do_requests.inc();
        }
    }

    /// The cache's part of one query.
    pub fn cache(&self, outcome: CacheOutcome) {
        match outcome {
            CacheOutcome::Uncached => return,
            CacheOutcome::Hit { denial } => self.hits[usize::from(denial)].inc(),
            CacheOutcome::Stale => {
                self.served_stale.inc();
                self.hits[0].inc();
            }
            CacheOutcome::Miss => self.misses.inc(),
        }
        self.cache_requests.inc();
    }

    /// Queries the kernel fast path answered from entries of type `qtype` and response code
    /// `rcode`, `success` from the success cache and `denial` from the denial cache, to a
    /// listener of family `v6`. They count as what they are for CoreDNS: UDP requests,
    /// responses of the `cache` plugin, cache hits and cache requests, so the totals and
    /// ratios stay right; `node_local_dns_fast_path_responses_total` counts them apart. Not
    /// in the latency and size histograms, nor in `coredns_dns_do_requests_total`: the kernel
    /// does not time or size them.
    pub fn kernel_answers(&self, v6: bool, qtype: u16, rcode: u8, success: u64, denial: u64) {
        let n = success + denial;
        if n == 0 {
            return;
        }
        let t = type_index(qtype);
        self.requests[0][usize::from(v6)][t].inc_by(n);
        match RCODES.get(usize::from(rcode)) {
            Some(_) => self.responses[Plugin::Cache.index()][usize::from(rcode)].inc_by(n),
            None => self
                .responses_vec
                .with_label_values(&[
                    &self.server,
                    &self.zone,
                    "",
                    rcode_name(rcode),
                    Plugin::Cache.label(),
                ])
                .inc_by(n),
        }
        self.hits[0].inc_by(success);
        self.hits[1].inc_by(denial);
        self.cache_requests.inc_by(n);
        self.fast_path_answers
            .with_label_values(&[&self.server, &self.zone, type_name(t), rcode_name(rcode)])
            .inc_by(n);
    }

    /// A prefetch started.
    pub fn prefetched(&self) {
        self.prefetch.inc();
    }

    /// One response out.
    pub fn response(
        &self,
        tcp: bool,
        qtype: u16,
        rcode: u8,
        plugin: Plugin,
        size: usize,
        elapsed: Duration,
    ) {
        match RCODES.get(usize::from(rcode)) {
            Some(_) => self.responses[plugin.index()][usize::from(rcode)].inc(),
            None => self
                .responses_vec
                .with_label_values(&[
                    &self.server,
                    &self.zone,
                    "",
                    rcode_name(rcode),
                    plugin.label(),
                ])
                .inc(),
        }
        self.duration[type_index(qtype)].observe(elapsed.as_secs_f64());
        self.response_size[usize::from(tcp)].observe(size as f64);
    }

    /// Sets the entry counts (at scrape time).
    pub fn set_entries(&self, success: usize, denial: usize) {
        self.entries[0].set(i64::try_from(success).unwrap_or(i64::MAX));
        self.entries[1].set(i64::try_from(denial).unwrap_or(i64::MAX));
    }
}

/// node-cache's own metric on `-metrics-listen-address` (9353).
#[derive(Debug, Clone)]
pub struct SetupMetrics {
    errors: IntCounterVec,
}

/// The `errortype` labels node-cache uses.
pub const SETUP_ERROR_TYPES: &[&str] = &[
    "iptables",
    "iptables_lock",
    "interface_add",
    "interface_check",
    "configmap",
];

impl SetupMetrics {
    /// Declares `coredns_nodecache_setup_errors_total` with every label present at zero.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let errors = counter_vec(
            registry,
            "coredns_nodecache_setup_errors_total",
            "The number of errors during periodic network setup for node-cache",
            &["errortype"],
        )?;
        for kind in SETUP_ERROR_TYPES {
            errors.with_label_values(&[kind]);
        }
        Ok(SetupMetrics { errors })
    }

    /// One setup error of `kind` (one of [`SETUP_ERROR_TYPES`]).
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn zone_children_carry_coredns_labels() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let zone = metrics.zone("dns://169.254.20.10:53", "cluster.local.");
        zone.request(false, false, rtype::A, 1232, false);
        zone.request(true, true, 99, 0, true);
        zone.cache(CacheOutcome::Hit { denial: true });
        zone.cache(CacheOutcome::Miss);
        zone.response(
            false,
            rtype::A,
            3,
            Plugin::Cache,
            80,
            Duration::from_micros(50),
        );
        zone.response(
            false,
            rtype::A,
            9,
            Plugin::Forward,
            80,
            Duration::from_micros(50),
        );
        zone.set_entries(7, 2);
        let t = text(&registry);
        for line in [
            r#"coredns_dns_requests_total{family="1",proto="udp",server="dns://169.254.20.10:53",type="A",view="",zone="cluster.local."} 1"#,
            r#"coredns_dns_requests_total{family="2",proto="tcp",server="dns://169.254.20.10:53",type="other",view="",zone="cluster.local."} 1"#,
            r#"coredns_dns_responses_total{plugin="cache",rcode="NXDOMAIN",server="dns://169.254.20.10:53",view="",zone="cluster.local."} 1"#,
            r#"coredns_dns_responses_total{plugin="forward",rcode="NOTAUTH",server="dns://169.254.20.10:53",view="",zone="cluster.local."} 1"#,
            r#"coredns_cache_hits_total{server="dns://169.254.20.10:53",type="denial",view="",zones="cluster.local."} 1"#,
            r#"coredns_cache_misses_total{server="dns://169.254.20.10:53",view="",zones="cluster.local."} 1"#,
            r#"coredns_cache_entries{server="dns://169.254.20.10:53",type="success",view="",zones="cluster.local."} 7"#,
            r#"coredns_dns_do_requests_total{server="dns://169.254.20.10:53",view="",zone="cluster.local."} 1"#,
        ] {
            assert!(t.contains(line), "missing {line}\n{t}");
        }
        assert!(t.contains("coredns_dns_request_duration_seconds_bucket"));
        assert!(t.contains("coredns_build_info"));
    }

    #[test]
    fn kernel_answers_count_as_udp_requests_and_cache_responses() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let zone = metrics.zone("dns://169.254.20.10:53", "cluster.local.");
        zone.kernel_answers(false, rtype::A, 0, 5, 0);
        zone.kernel_answers(false, rtype::AAAA, 3, 0, 2);
        zone.kernel_answers(true, rtype::A, 9, 1, 0);
        let t = text(&registry);
        for line in [
            r#"coredns_dns_requests_total{family="1",proto="udp",server="dns://169.254.20.10:53",type="A",view="",zone="cluster.local."} 5"#,
            r#"coredns_dns_requests_total{family="1",proto="udp",server="dns://169.254.20.10:53",type="AAAA",view="",zone="cluster.local."} 2"#,
            r#"coredns_dns_requests_total{family="2",proto="udp",server="dns://169.254.20.10:53",type="A",view="",zone="cluster.local."} 1"#,
            r#"coredns_dns_responses_total{plugin="cache",rcode="NOERROR",server="dns://169.254.20.10:53",view="",zone="cluster.local."} 5"#,
            r#"coredns_dns_responses_total{plugin="cache",rcode="NXDOMAIN",server="dns://169.254.20.10:53",view="",zone="cluster.local."} 2"#,
            r#"coredns_dns_responses_total{plugin="cache",rcode="NOTAUTH",server="dns://169.254.20.10:53",view="",zone="cluster.local."} 1"#,
            r#"coredns_cache_hits_total{server="dns://169.254.20.10:53",type="success",view="",zones="cluster.local."} 6"#,
            r#"coredns_cache_hits_total{server="dns://169.254.20.10:53",type="denial",view="",zones="cluster.local."} 2"#,
            r#"coredns_cache_requests_total{server="dns://169.254.20.10:53",view="",zones="cluster.local."} 8"#,
            r#"node_local_dns_fast_path_responses_total{rcode="NXDOMAIN",server="dns://169.254.20.10:53",type="AAAA",zone="cluster.local."} 2"#,
        ] {
            assert!(t.contains(line), "missing {line}\n{t}");
        }
        assert!(
            t.lines()
                .filter(|l| l.starts_with("coredns_dns_request_duration_seconds_count{"))
                .all(|l| l.ends_with(" 0")),
            "the kernel does not time its answers"
        );
    }

    #[test]
    fn setup_errors_start_at_zero_for_every_type() {
        let registry = Registry::new();
        let setup = SetupMetrics::new(&registry).unwrap();
        setup.error("iptables_lock");
        let t = text(&registry);
        assert!(t.contains(r#"coredns_nodecache_setup_errors_total{errortype="interface_add"} 0"#));
        assert!(t.contains(r#"coredns_nodecache_setup_errors_total{errortype="iptables_lock"} 1"#));
    }
}
