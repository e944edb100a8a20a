//! The metrics of the server and the agent, under upstream's names
//! (`konnectivity_network_proxy_{server,agent}_*`, `pkg/server/metrics`, `pkg/agent/metrics`)
//! so existing dashboards and alerts keep working, plus this project's per-tunnel ones
//! (`tunnel_*`). Labels are bounded: `segment`, `packet_type` and `reason` are closed sets.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::proto::packet::Packet;

const NAMESPACE: &str = "konnectivity_network_proxy";

/// Where a packet was seen (upstream's `segment` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    FromClient,
    ToClient,
    FromAgent,
    ToAgent,
    FromServer,
    ToServer,
}

impl Segment {
    pub fn as_str(self) -> &'static str {
        match self {
            Segment::FromClient => "from_client",
            Segment::ToClient => "to_client",
            Segment::FromAgent => "from_agent",
            Segment::ToAgent => "to_agent",
            Segment::FromServer => "from_server",
            Segment::ToServer => "to_server",
        }
    }
}

/// Why a server-side dial failed (upstream's `dial_failure_count` reasons, plus ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    NoAgent,
    ErrorResponse,
    BackendClose,
    BackendDialTimeout,
    FrontendClose,
}

impl DialFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            DialFailure::NoAgent => "no_agent",
            DialFailure::ErrorResponse => "error_response",
            DialFailure::BackendClose => "backend_close",
            DialFailure::BackendDialTimeout => "backend_dial_timeout",
            DialFailure::FrontendClose => "frontend_close",
        }
    }
}

/// Counters both roles have: packets per segment and type, per-tunnel queue and credit.
#[derive(Debug, Clone)]
pub struct Common {
    pub stream_packets: IntCounterVec,
    pub stream_errors: IntCounterVec,
    /// Tunnels closed because their consumer fell a whole buffer behind (upstream peers only).
    pub tunnel_overflows: IntCounter,
    /// Bytes queued for tunnels' consumers, summed over tunnels.
    pub tunnel_queued_bytes: IntGauge,
    /// Time tunnels spent waiting for their peer's window (the slow side's pushback).
    pub tunnel_blocked_seconds: prometheus::Counter,
}

impl Common {
    fn new(subsystem: &str, registry: &Registry) -> prometheus::Result<Common> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace(NAMESPACE)
                .subsystem(subsystem)
        };
        let common = Common {
            stream_packets: IntCounterVec::new(
                opts("stream_packets_total", "Packets on gRPC streams by segment and type."),
                &["segment", "packet_type"],
            )?,
            stream_errors: IntCounterVec::new(
                opts("stream_errors_total", "Failed stream sends and receives by segment, code and type."),
                &["segment", "code", "packet_type"],
            )?,
            tunnel_overflows: IntCounter::with_opts(opts(
                "tunnel_overflows_total",
                "Tunnels closed because their consumer fell a whole buffer behind a peer without flow control.",
            ))?,
            tunnel_queued_bytes: IntGauge::with_opts(opts(
                "tunnel_queued_bytes",
                "Bytes waiting in tunnels' queues for their consumer.",
            ))?,
            tunnel_blocked_seconds: prometheus::Counter::with_opts(opts(
                "tunnel_blocked_seconds_total",
                "Seconds tunnels waited for their peer's window (per-tunnel backpressure).",
            ))?,
        };
        registry.register(Box::new(common.stream_packets.clone()))?;
        registry.register(Box::new(common.stream_errors.clone()))?;
        registry.register(Box::new(common.tunnel_overflows.clone()))?;
        registry.register(Box::new(common.tunnel_queued_bytes.clone()))?;
        registry.register(Box::new(common.tunnel_blocked_seconds.clone()))?;
        Ok(common)
    }

    pub fn packet(&self, segment: Segment, packet: &Packet) {
        self.stream_packets
            .with_label_values(&[segment.as_str(), packet.kind_label()])
            .inc();
    }

    pub fn error(&self, segment: Segment, code: &str, packet: &str) {
        self.stream_errors
            .with_label_values(&[segment.as_str(), code, packet])
            .inc();
    }
}

/// The server's metrics.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    pub common: Common,
    pub dial_duration: Histogram,
    pub connection_duration: Histogram,
    pub grpc_connections: IntGaugeVec,
    pub http_connections: IntGauge,
    pub ready_backend_connections: IntGauge,
    pub ready_backends: IntGaugeVec,
    pub pending_backend_dials: IntGauge,
    pub established_connections: IntGauge,
    pub dial_failures: IntCounterVec,
    /// Agent streams refused at authentication, by reason.
    pub agent_auth_failures: IntCounterVec,
}

impl ServerMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<ServerMetrics> {
        let sub = "server";
        let opts =
            |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE).subsystem(sub);
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .subsystem(sub)
                .buckets(buckets)
        };
        let m = ServerMetrics {
            common: Common::new(sub, registry)?,
            dial_duration: Histogram::with_opts(hist(
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds.",
                vec![
                    0.000001, 0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5,
                ],
            ))?,
            connection_duration: Histogram::with_opts(hist(
                "connection_duration_seconds",
                "Duration of established tunnels in seconds.",
                vec![1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0],
            ))?,
            grpc_connections: IntGaugeVec::new(
                opts("grpc_connections", "Open gRPC streams by service method."),
                &["service_method"],
            )?,
            http_connections: IntGauge::with_opts(opts(
                "http_connections",
                "Open HTTP CONNECT connections.",
            ))?,
            ready_backend_connections: IntGauge::with_opts(opts(
                "ready_backend_connections",
                "Connected agent streams (deprecated upstream; kept for dashboards).",
            ))?,
            ready_backends: IntGaugeVec::new(
                opts(
                    "ready_backends",
                    "Agents usable per proxy strategy, not draining.",
                ),
                &["proxy_strategy"],
            )?,
            pending_backend_dials: IntGauge::with_opts(opts(
                "pending_backend_dials",
                "Dials sent to an agent and not answered yet.",
            ))?,
            established_connections: IntGauge::with_opts(opts(
                "established_connections",
                "Tunnels established through agents.",
            ))?,
            dial_failures: IntCounterVec::new(
                opts("dial_failure_count", "Failed dials by reason."),
                &["reason"],
            )?,
            agent_auth_failures: IntCounterVec::new(
                opts(
                    "agent_auth_failures_total",
                    "Agent streams refused by reason.",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.dial_duration.clone()))?;
        registry.register(Box::new(m.connection_duration.clone()))?;
        registry.register(Box::new(m.grpc_connections.clone()))?;
        registry.register(Box::new(m.http_connections.clone()))?;
        registry.register(Box::new(m.ready_backend_connections.clone()))?;
        registry.register(Box::new(m.ready_backends.clone()))?;
        registry.register(Box::new(m.pending_backend_dials.clone()))?;
        registry.register(Box::new(m.established_connections.clone()))?;
        registry.register(Box::new(m.dial_failures.clone()))?;
        registry.register(Box::new(m.agent_auth_failures.clone()))?;
        Ok(m)
    }

    pub fn dial_failed(&self, reason: DialFailure) {
        self.dial_failures
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}

/// The agent's metrics.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub common: Common,
    pub dial_duration: Histogram,
    pub endpoint_dial_failures: IntCounterVec,
    pub open_server_connections: IntGauge,
    pub known_server_count: IntGauge,
    pub open_endpoint_connections: IntGauge,
    pub server_connection_failures: IntCounter,
    /// This build: `--transport=auto` connections that fell back from QUIC to gRPC.
    pub quic_fallbacks: IntCounter,
}

impl AgentMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<AgentMetrics> {
        let sub = "agent";
        let opts =
            |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE).subsystem(sub);
        let m = AgentMetrics {
            common: Common::new(sub, registry)?,
            dial_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "dial_duration_seconds",
                    "Latency of dials to endpoints in seconds.",
                )
                .namespace(NAMESPACE)
                .subsystem(sub)
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5,
                ]),
            )?,
            endpoint_dial_failures: IntCounterVec::new(
                opts(
                    "endpoint_dial_failure_total",
                    "Failed endpoint dials by reason.",
                ),
                &["reason"],
            )?,
            open_server_connections: IntGauge::with_opts(opts(
                "open_server_connections",
                "Open streams to proxy servers.",
            ))?,
            known_server_count: IntGauge::with_opts(opts(
                "known_server_count",
                "Server replicas the agent should be connected to.",
            ))?,
            open_endpoint_connections: IntGauge::with_opts(opts(
                "open_endpoint_connections",
                "Open connections to endpoints (tunnels).",
            ))?,
            server_connection_failures: IntCounter::with_opts(opts(
                "server_connection_failure_count",
                "Failed connections to proxy servers.",
            ))?,
            quic_fallbacks: IntCounter::with_opts(opts(
                "quic_fallback_total",
                "Connections to servers made over gRPC because QUIC failed (--transport=auto).",
            ))?,
        };
        registry.register(Box::new(m.dial_duration.clone()))?;
        registry.register(Box::new(m.endpoint_dial_failures.clone()))?;
        registry.register(Box::new(m.open_server_connections.clone()))?;
        registry.register(Box::new(m.known_server_count.clone()))?;
        registry.register(Box::new(m.open_endpoint_connections.clone()))?;
        registry.register(Box::new(m.server_connection_failures.clone()))?;
        registry.register(Box::new(m.quic_fallbacks.clone()))?;
        Ok(m)
    }
}
