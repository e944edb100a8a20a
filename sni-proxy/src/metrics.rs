//! Every metric of sni-proxy, declared once, registered in the registry the caller passes in.
//! Names follow `sni_proxy_<name>_<unit>[_total]`; the list with help texts is in
//! `docs/metrics.md`. Labels are bounded: listener and route names come from the config, and
//! `reason` labels are fixed strings.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Open connections per listener and route.
    pub connections_active: IntGaugeVec,
    /// Routed connections per listener and route.
    pub connections_total: IntCounterVec,
    /// Connections refused before routing or by a cap, per listener and reason.
    pub connections_refused: IntCounterVec,
    /// Closed connections per route and reason.
    pub connections_closed: IntCounterVec,
    /// Bytes per route and direction (`upstream`: client to backend, `downstream`: back).
    pub bytes: IntCounterVec,
    /// Handshake (ClientHello / CONNECT / PROXY header) failures per listener and reason.
    pub handshake_failures: IntCounterVec,
    /// Failed backend connect attempts per route.
    pub backend_connect_failures: IntCounterVec,
    /// Backends ejected by passive health per route.
    pub backend_ejections: IntCounterVec,
    /// Connection duration per route.
    pub connection_duration: HistogramVec,
    /// ClientHello size in bytes, per listener.
    pub client_hello_bytes: HistogramVec,
    /// Config reloads by result (`ok`, `error`).
    pub config_reloads: IntCounterVec,
    /// Routes in the running config.
    pub routes: IntGauge,
    /// Connections on the data path chosen, by path (`copy`, `splice`).
    pub data_path: IntCounterVec,
    /// Unix time of the last successful config load.
    pub config_last_reload_success: IntGauge,
    /// Connections closed by the shutdown deadline.
    pub shutdown_forced: IntCounter,
    /// sockmap-path connections with a direction copied in userspace.
    pub sockmap_unspliced: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are unique by construction; a clash is a programming error worth a panic in tests,
    // but the proxy must not die for it, so it keeps the unregistered collector.
    if let Err(error) = registry.register(Box::new(c.clone())) {
        tracing::error!(%error, "metric registration failed");
    }
    c
}

impl Metrics {
    /// Creates and registers every metric.
    #[allow(clippy::unwrap_used)] // constant, valid metric definitions
    pub fn new(registry: &Registry) -> Metrics {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                registry,
                IntGaugeVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        Metrics {
            connections_active: gauge("sni_proxy_connections_active", "Open proxied connections.", &["listener", "route"]),
            connections_total: counter("sni_proxy_connections_total", "Connections routed to a backend route.", &["listener", "route"]),
            connections_refused: counter(
                "sni_proxy_connections_refused_total",
                "Connections refused by a cap or a policy, by reason.",
                &["listener", "reason"],
            ),
            connections_closed: counter(
                "sni_proxy_connections_closed_total",
                "Proxied connections closed, by reason (done, idle, lifetime, route_changed, shutdown, reset, error).",
                &["route", "reason"],
            ),
            bytes: counter("sni_proxy_bytes_total", "Bytes relayed; upstream is client to backend.", &["route", "direction"]),
            handshake_failures: counter(
                "sni_proxy_handshake_failures_total",
                "Connections closed before routing, by reason.",
                &["listener", "reason"],
            ),
            backend_connect_failures: counter(
                "sni_proxy_backend_connect_failures_total",
                "Failed backend connect attempts.",
                &["route"],
            ),
            backend_ejections: counter(
                "sni_proxy_backend_ejections_total",
                "Backends ejected after consecutive connect failures.",
                &["route"],
            ),
            connection_duration: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("sni_proxy_connection_duration_seconds", "Lifetime of proxied connections.")
                        .buckets(vec![0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0]),
                    &["route"],
                )
                .unwrap(),
            ),
            client_hello_bytes: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("sni_proxy_client_hello_bytes", "Size of parsed ClientHellos (all records).")
                        .buckets(vec![256.0, 512.0, 1024.0, 1536.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0]),
                    &["listener"],
                )
                .unwrap(),
            ),
            config_reloads: counter("sni_proxy_config_reloads_total", "Config reload attempts by result.", &["result"]),
            routes: reg(registry, IntGauge::new("sni_proxy_routes", "Routes in the running config.").unwrap()),
            data_path: counter("sni_proxy_data_path_connections_total", "Connections per data path.", &["path"]),
            config_last_reload_success: reg(
                registry,
                IntGauge::new(
                    "sni_proxy_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful config load.",
                )
                .unwrap(),
            ),
            shutdown_forced: reg(
                registry,
                IntCounter::new(
                    "sni_proxy_shutdown_forced_connections_total",
                    "Connections still open when the shutdown grace period ended.",
                )
                .unwrap(),
            ),
            sockmap_unspliced: reg(
                registry,
                IntCounter::new(
                    "sni_proxy_sockmap_unspliced_connections_total",
                    "Connections on the sockmap data path with a direction copied in userspace: a socket was half-closed before the splice, or the map was full.",
                )
                .unwrap(),
            ),
        }
    }

    /// Forgets the per-route series of a route that is gone from the config and has no open
    /// connection left, so shoot churn does not grow the scrape forever.
    pub fn forget_route(&self, route: &str, listeners: &[String]) {
        for l in listeners {
            let _ = self.connections_active.remove_label_values(&[l, route]);
            let _ = self.connections_total.remove_label_values(&[l, route]);
        }
        for reason in CLOSE_REASONS {
            let _ = self
                .connections_closed
                .remove_label_values(&[route, reason]);
        }
        for dir in ["upstream", "downstream"] {
            let _ = self.bytes.remove_label_values(&[route, dir]);
        }
        let _ = self.backend_connect_failures.remove_label_values(&[route]);
        let _ = self.backend_ejections.remove_label_values(&[route]);
        let _ = self.connection_duration.remove_label_values(&[route]);
    }
}

/// Every `reason` of `sni_proxy_connections_closed_total`.
pub const CLOSE_REASONS: [&str; 7] = [
    "done",
    "idle",
    "lifetime",
    "route_changed",
    "shutdown",
    "reset",
    "error",
];
