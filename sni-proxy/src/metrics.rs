//! Every metric of sni-proxy, declared once, registered in the registry the caller passes in.
//! Names follow `sni_proxy_<name>_<unit>[_total]`; the list with help texts is in
//! `docs/metrics.md`. Labels are bounded: listener and route names come from the config, and
//! every `reason` (and `leg`) is a variant of a closed enum here ([`Refusal`],
//! [`HandshakeFailure`], [`CloseReason`]), whose `as_str` is the label value.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::datapath::{End, Leg};
use crate::protocol::{client_hello::HelloError, http_connect::ConnectError};

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Open connections per listener and route.
    pub connections_active: IntGaugeVec,
    /// Routed connections per listener and route.
    pub connections_total: IntCounterVec,
    /// Connections refused before routing or by a cap, per listener and reason.
    pub connections_refused: IntCounterVec,
    /// Closed connections per route, reason and failing leg ([`CloseReason::labels`]).
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
                "Proxied connections closed, by reason (done, idle, lifetime, route_changed, shutdown, reset, error) and, for reset and error, the leg that failed (client, backend; empty otherwise).",
                &["route", "reason", "leg"],
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
        for reason in CloseReason::ALL {
            let (reason, leg) = reason.labels();
            let _ = self
                .connections_closed
                .remove_label_values(&[route, reason, leg]);
        }
        for dir in ["upstream", "downstream"] {
            let _ = self.bytes.remove_label_values(&[route, dir]);
        }
        let _ = self.backend_connect_failures.remove_label_values(&[route]);
        let _ = self.backend_ejections.remove_label_values(&[route]);
        let _ = self.connection_duration.remove_label_values(&[route]);
    }

    /// Counts a connection refused by a cap.
    pub fn refused(&self, listener: &str, reason: Refusal) {
        self.connections_refused
            .with_label_values(&[listener, reason.as_str()])
            .inc();
    }

    /// Counts a connection closed before relaying.
    pub fn handshake_failed(&self, listener: &str, reason: HandshakeFailure) {
        self.handshake_failures
            .with_label_values(&[listener, reason.as_str()])
            .inc();
    }

    /// Counts a relayed connection that closed.
    pub fn closed(&self, route: &str, reason: CloseReason) {
        let (reason, leg) = reason.labels();
        self.connections_closed
            .with_label_values(&[route, reason, leg])
            .inc();
    }
}

/// The `reason` of `sni_proxy_connections_refused_total`: which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `max_connections`, over all listeners, checked at accept.
    GlobalCap,
    /// `max_connections_per_source`.
    SourceCap,
    /// The route's `max_connections`.
    RouteCap,
}

impl Refusal {
    /// Every value.
    pub const ALL: [Refusal; 3] = [Refusal::GlobalCap, Refusal::SourceCap, Refusal::RouteCap];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::GlobalCap => "global_cap",
            Refusal::SourceCap => "source_cap",
            Refusal::RouteCap => "route_cap",
        }
    }
}

/// The `reason` of `sni_proxy_handshake_failures_total`: why a connection closed before its
/// relay began. The client's head failed (read, parse, route), or no backend took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// No complete head within `timeouts.handshake`.
    Timeout,
    /// The client closed before its head was complete.
    Eof,
    /// Reading the client failed (a reset, mostly).
    ReadError,
    /// The head is larger than the cap (ClientHello, CONNECT request, or the buffer).
    TooLarge,
    /// The first record is not TLS handshake ([`HelloError::NotTls`]).
    NotTls,
    /// The first handshake message is not a ClientHello ([`HelloError::NotClientHello`]).
    NotClientHello,
    /// A malformed ClientHello or CONNECT request.
    Malformed,
    /// No route for the SNI (`unknown_sni: close` or `reject`).
    UnknownSni,
    /// `proxy_protocol: required` and the peer is not a trusted proxy.
    UntrustedProxy,
    /// `proxy_protocol: required` and the trusted peer sent no PROXY header.
    ProxyProtocolMissing,
    /// A malformed PROXY header.
    ProxyProtocolMalformed,
    /// A CONNECT request without `X-Gardener-Destination`.
    MissingDestination,
    /// A CONNECT destination that matches no route.
    UnknownDestination,
    /// A request method other than CONNECT.
    NotConnect,
    /// No backend of the route could be connected.
    BackendUnavailable,
    /// The backend did not take the forwarded head within `timeouts.connect`.
    BackendWrite,
    /// The connection drew the route's share of an invalid backend (a Gateway API backendRef
    /// that does not resolve) and was refused without trying another.
    InvalidBackend,
}

impl HandshakeFailure {
    /// Every value.
    pub const ALL: [HandshakeFailure; 17] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Eof,
        HandshakeFailure::ReadError,
        HandshakeFailure::TooLarge,
        HandshakeFailure::NotTls,
        HandshakeFailure::NotClientHello,
        HandshakeFailure::Malformed,
        HandshakeFailure::UnknownSni,
        HandshakeFailure::UntrustedProxy,
        HandshakeFailure::ProxyProtocolMissing,
        HandshakeFailure::ProxyProtocolMalformed,
        HandshakeFailure::MissingDestination,
        HandshakeFailure::UnknownDestination,
        HandshakeFailure::NotConnect,
        HandshakeFailure::BackendUnavailable,
        HandshakeFailure::BackendWrite,
        HandshakeFailure::InvalidBackend,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Eof => "eof",
            HandshakeFailure::ReadError => "read_error",
            HandshakeFailure::TooLarge => "too_large",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::NotClientHello => "not_client_hello",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::UnknownSni => "unknown_sni",
            HandshakeFailure::UntrustedProxy => "untrusted_proxy",
            HandshakeFailure::ProxyProtocolMissing => "proxy_protocol_missing",
            HandshakeFailure::ProxyProtocolMalformed => "proxy_protocol_malformed",
            HandshakeFailure::MissingDestination => "missing_destination",
            HandshakeFailure::UnknownDestination => "unknown_destination",
            HandshakeFailure::NotConnect => "not_connect",
            HandshakeFailure::BackendUnavailable => "backend_unavailable",
            HandshakeFailure::BackendWrite => "backend_write",
            HandshakeFailure::InvalidBackend => "invalid_backend",
        }
    }
}

impl From<HelloError> for HandshakeFailure {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::NotTls => HandshakeFailure::NotTls,
            HelloError::NotClientHello => HandshakeFailure::NotClientHello,
            HelloError::TooLarge => HandshakeFailure::TooLarge,
            HelloError::Malformed(_) => HandshakeFailure::Malformed,
        }
    }
}

impl From<ConnectError> for HandshakeFailure {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::NotConnect => HandshakeFailure::NotConnect,
            ConnectError::Malformed(_) => HandshakeFailure::Malformed,
            ConnectError::TooLarge => HandshakeFailure::TooLarge,
        }
    }
}

/// Why a relayed connection closed: the `reason` of `sni_proxy_connections_closed_total`,
/// and for a failed relay the `leg` that failed.
///
/// The leg is a label of its own rather than part of the reason, so that `reason="reset"`
/// and `reason="error"` keep counting every reset and error as before; the leg is empty for
/// the other reasons, which Prometheus stores as no label at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions ended with a FIN.
    Done,
    /// No byte moved for `timeouts.idle`.
    Idle,
    /// The route's `max_connection_lifetime` (with jitter) ran out.
    Lifetime,
    /// The route was changed or removed and its `on_change` policy closed the connection.
    RouteChanged,
    /// Still open when the shutdown grace period ended.
    Shutdown,
    /// This leg was reset; the proxy reset the other.
    Reset(Leg),
    /// Another I/O error on this leg (a keepalive timeout, an unreachable peer).
    Error(Leg),
}

impl CloseReason {
    /// Every value: every (`reason`, `leg`) pair the metric can carry.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Done,
        CloseReason::Idle,
        CloseReason::Lifetime,
        CloseReason::RouteChanged,
        CloseReason::Shutdown,
        CloseReason::Reset(Leg::Client),
        CloseReason::Reset(Leg::Backend),
        CloseReason::Error(Leg::Client),
        CloseReason::Error(Leg::Backend),
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::Idle => "idle",
            CloseReason::Lifetime => "lifetime",
            CloseReason::RouteChanged => "route_changed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Reset(_) => "reset",
            CloseReason::Error(_) => "error",
        }
    }

    /// The leg that failed, for `reset` and `error`.
    pub fn leg(self) -> Option<Leg> {
        match self {
            CloseReason::Reset(leg) | CloseReason::Error(leg) => Some(leg),
            _ => None,
        }
    }

    /// The (`reason`, `leg`) label values; `leg` is empty when no leg failed.
    pub fn labels(self) -> (&'static str, &'static str) {
        (self.as_str(), self.leg().map_or("", Leg::as_str))
    }
}

impl From<End> for CloseReason {
    fn from(end: End) -> Self {
        match end {
            End::Done => CloseReason::Done,
            End::Reset(leg) => CloseReason::Reset(leg),
            End::Error(leg) => CloseReason::Error(leg),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A label value that stays bounded and readable: lowercase snake case, short.
    fn check_values<'a>(
        what: &str,
        values: impl IntoIterator<Item = &'a str>,
    ) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        for v in values {
            assert!(
                !v.is_empty()
                    && v.len() <= 32
                    && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{what}: {v:?} is not a plain snake_case label value"
            );
            assert!(seen.insert(v), "{what}: {v:?} appears twice");
        }
        seen
    }

    #[test]
    fn label_values_are_unique_and_bounded() {
        check_values("refusal", Refusal::ALL.map(Refusal::as_str));
        check_values(
            "handshake failure",
            HandshakeFailure::ALL.map(HandshakeFailure::as_str),
        );
        check_values("leg", Leg::ALL.map(Leg::as_str));
        // Close reasons: unique as (reason, leg) pairs; reason values plain.
        let pairs: BTreeSet<_> = CloseReason::ALL.iter().map(|r| r.labels()).collect();
        assert_eq!(
            pairs.len(),
            CloseReason::ALL.len(),
            "a (reason, leg) pair twice"
        );
        let reasons: BTreeSet<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        check_values("close reason", reasons.iter().copied());
    }

    /// `ALL` lists every variant. A new variant stops these matches from compiling: add it
    /// to the match and to `ALL` (and to docs/metrics.md).
    #[test]
    fn all_lists_every_variant() {
        use HandshakeFailure as H;
        let refusal = |r: Refusal| match r {
            Refusal::GlobalCap | Refusal::SourceCap | Refusal::RouteCap => r,
        };
        let handshake = |h: H| match h {
            H::Timeout
            | H::Eof
            | H::ReadError
            | H::TooLarge
            | H::NotTls
            | H::NotClientHello
            | H::Malformed
            | H::UnknownSni
            | H::UntrustedProxy
            | H::ProxyProtocolMissing
            | H::ProxyProtocolMalformed
            | H::MissingDestination
            | H::UnknownDestination
            | H::NotConnect
            | H::BackendUnavailable
            | H::BackendWrite
            | H::InvalidBackend => h,
        };
        let close = |c: CloseReason| match c {
            CloseReason::Done
            | CloseReason::Idle
            | CloseReason::Lifetime
            | CloseReason::RouteChanged
            | CloseReason::Shutdown
            | CloseReason::Reset(Leg::Client | Leg::Backend)
            | CloseReason::Error(Leg::Client | Leg::Backend) => c,
        };
        assert_eq!(Refusal::ALL.map(refusal), Refusal::ALL);
        assert_eq!(HandshakeFailure::ALL.map(handshake), HandshakeFailure::ALL);
        assert_eq!(CloseReason::ALL.map(close), CloseReason::ALL);
        // Fieldless enums: the variants are numbered in order, and ALL holds them in that
        // order, so none is left out before the last.
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} out of place in ALL");
        }
        for (i, h) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i, "{h:?} out of place in ALL");
        }
        for leg in Leg::ALL {
            assert!(CloseReason::ALL.contains(&CloseReason::Reset(leg)));
            assert!(CloseReason::ALL.contains(&CloseReason::Error(leg)));
        }
    }

    /// The labels are the strings dashboards already query.
    #[test]
    fn label_values_are_the_historical_strings() {
        assert_eq!(
            Refusal::ALL.map(Refusal::as_str),
            ["global_cap", "source_cap", "route_cap"]
        );
        assert_eq!(
            HandshakeFailure::ALL.map(HandshakeFailure::as_str),
            [
                "timeout",
                "eof",
                "read_error",
                "too_large",
                "not_tls",
                "not_client_hello",
                "malformed",
                "unknown_sni",
                "untrusted_proxy",
                "proxy_protocol_missing",
                "proxy_protocol_malformed",
                "missing_destination",
                "unknown_destination",
                "not_connect",
                "backend_unavailable",
                "backend_write",
                "invalid_backend",
            ]
        );
        assert_eq!(
            CloseReason::ALL.map(CloseReason::labels),
            [
                ("done", ""),
                ("idle", ""),
                ("lifetime", ""),
                ("route_changed", ""),
                ("shutdown", ""),
                ("reset", "client"),
                ("reset", "backend"),
                ("error", "client"),
                ("error", "backend"),
            ]
        );
    }

    /// A parser error counts under the label its own `kind` names.
    #[test]
    fn parser_errors_keep_their_kind() {
        for e in [
            HelloError::NotTls,
            HelloError::NotClientHello,
            HelloError::TooLarge,
            HelloError::Malformed("x"),
        ] {
            assert_eq!(HandshakeFailure::from(e).as_str(), e.kind(), "{e:?}");
        }
        for e in [
            ConnectError::NotConnect,
            ConnectError::Malformed("x"),
            ConnectError::TooLarge,
        ] {
            assert_eq!(HandshakeFailure::from(e).as_str(), e.kind(), "{e:?}");
        }
    }

    #[test]
    fn relay_ends_keep_their_leg() {
        assert_eq!(CloseReason::from(End::Done), CloseReason::Done);
        assert_eq!(CloseReason::Done.leg(), None);
        for leg in Leg::ALL {
            let reset = CloseReason::from(End::Reset(leg));
            assert_eq!(reset, CloseReason::Reset(leg));
            assert_eq!(reset.labels(), ("reset", leg.as_str()));
            assert_eq!(reset.leg(), End::Reset(leg).leg());
            let error = CloseReason::from(End::Error(leg));
            assert_eq!(error, CloseReason::Error(leg));
            assert_eq!(error.labels(), ("error", leg.as_str()));
            assert_eq!(error.leg(), End::Error(leg).leg());
        }
    }

    /// Every backticked value in a metric's row of docs/metrics.md.
    pub(crate) fn documented(metric: &str) -> BTreeSet<String> {
        let doc = include_str!("../../docs/metrics.md");
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{metric}` |")))
            .unwrap_or_else(|| panic!("{metric} is not in docs/metrics.md"));
        let meaning = row.rsplit('|').nth(1).unwrap();
        meaning
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    fn strings<'a>(values: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        values.into_iter().map(str::to_string).collect()
    }

    #[test]
    fn docs_list_exactly_the_label_values() {
        assert_eq!(
            documented("sni_proxy_connections_refused_total"),
            strings(Refusal::ALL.map(Refusal::as_str))
        );
        assert_eq!(
            documented("sni_proxy_handshake_failures_total"),
            strings(HandshakeFailure::ALL.map(HandshakeFailure::as_str))
        );
        let mut closed = strings(CloseReason::ALL.map(CloseReason::as_str));
        closed.extend(strings(Leg::ALL.map(Leg::as_str)));
        assert_eq!(documented("sni_proxy_connections_closed_total"), closed);
    }

    fn scrape(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn closed_counts_by_reason_and_leg_and_forgets_every_pair() {
        let registry = Registry::new();
        let m = Metrics::new(&registry);
        for reason in CloseReason::ALL {
            m.closed("r", reason);
        }
        m.closed("r", CloseReason::Reset(Leg::Backend));
        let text = scrape(&registry);
        for line in [
            "sni_proxy_connections_closed_total{leg=\"\",reason=\"done\",route=\"r\"} 1",
            "sni_proxy_connections_closed_total{leg=\"backend\",reason=\"reset\",route=\"r\"} 2",
            "sni_proxy_connections_closed_total{leg=\"client\",reason=\"reset\",route=\"r\"} 1",
            "sni_proxy_connections_closed_total{leg=\"client\",reason=\"error\",route=\"r\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        m.forget_route("r", &["l".to_string()]);
        assert!(
            !scrape(&registry).contains("sni_proxy_connections_closed_total{"),
            "a series survived forget_route"
        );
    }
}
