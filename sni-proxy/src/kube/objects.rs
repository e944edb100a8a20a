//! The fields of Istio's `networking.istio.io` objects that a passthrough proxy reads, as
//! serde types (JSON field names as the CRDs spell them). Lenient by design: fields this proxy
//! does not read are ignored, so a newer Istio API does not break parsing; what it reads and
//! cannot serve is reported by the translation ([`super::istio`]), not here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    /// The labels of the gateway workloads this Gateway configures.
    pub selector: BTreeMap<String, String>,
    /// Its servers.
    pub servers: Vec<Server>,
}

/// One `Gateway.spec.servers[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Server {
    /// The port it listens on.
    pub port: Port,
    /// Host names, each optionally `namespace/host` (`*/`, `./`).
    pub hosts: Vec<String>,
    /// TLS settings.
    pub tls: Option<ServerTls>,
    /// The server's name.
    pub name: Option<String>,
}

/// `servers[].port`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Port {
    /// The port number.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `GRPC`, `HTTP2`, `MONGO`, `TCP` or `TLS`.
    pub protocol: String,
    /// The port's name.
    pub name: String,
}

/// `servers[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerTls {
    /// `PASSTHROUGH`, `SIMPLE`, `MUTUAL`, `AUTO_PASSTHROUGH`, `ISTIO_MUTUAL` or
    /// `OPTIONAL_MUTUAL`.
    pub mode: String,
}

/// `VirtualService.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    /// The hosts it applies to.
    pub hosts: Vec<String>,
    /// Gateways it is bound to: `name`, `namespace/name`, or `mesh`.
    pub gateways: Vec<String>,
    /// Namespaces it is visible to (`*`, `.`, names); empty is everywhere.
    pub export_to: Vec<String>,
    /// TLS routes.
    pub tls: Vec<TlsRoute>,
    /// HTTP routes (counted and skipped: not served by a passthrough proxy).
    pub http: Vec<serde_json::Value>,
    /// TCP routes (counted and skipped).
    pub tcp: Vec<serde_json::Value>,
}

/// `VirtualService.spec.tls[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRoute {
    /// Conditions, any of which selects this route.
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    /// Where the connection goes, with weights.
    pub route: Vec<RouteDestination>,
}

/// `tls[].match[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsMatch {
    /// SNI names (exact or `*.` wildcard).
    pub sni_hosts: Vec<String>,
    /// The gateway port this applies to; any when absent.
    pub port: Option<u32>,
    /// Gateways for this match alone (instead of the VirtualService's).
    pub gateways: Vec<String>,
    /// Destination subnets (not supported: a match with them is skipped).
    pub destination_subnets: Vec<String>,
    /// Source labels (sidecars only; a match with them never applies to a gateway).
    pub source_labels: BTreeMap<String, String>,
}

/// `tls[].route[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteDestination {
    /// The destination.
    pub destination: Destination,
    /// Share of connections, in percent; absent for a single destination.
    pub weight: Option<i64>,
}

/// `route[].destination`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    /// A Service: `name`, `name.namespace`, or `name.namespace.svc.cluster.local`.
    pub host: String,
    /// The Service port.
    pub port: Option<PortSelector>,
    /// A DestinationRule subset (not supported: such a destination is unresolved).
    pub subset: Option<String>,
}

/// `destination.port`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortSelector {
    /// The port number.
    pub number: u32,
}

/// `DestinationRule.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    /// The Service it applies to.
    pub host: String,
    /// Namespaces it is visible to.
    pub export_to: Vec<String>,
    /// Its traffic policy.
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `DestinationRule.spec.trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    /// Connection pool settings.
    pub connection_pool: Option<ConnectionPool>,
}

/// `trafficPolicy.connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionPool {
    /// TCP settings.
    pub tcp: Option<TcpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpSettings {
    /// Most connections to the destination.
    pub max_connections: Option<i64>,
    /// Keepalive on the upstream connections.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// The most a connection may live (protobuf duration, `86400s`).
    pub max_connection_duration: Option<String>,
}

/// `tcp.tcpKeepalive`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dropped.
    pub probes: Option<u32>,
    /// Idle time before the first probe (`7200s`).
    pub time: Option<String>,
    /// Between probes (`75s`).
    pub interval: Option<String>,
}

/// Parses a protobuf JSON duration: decimal seconds with an `s` suffix (`7200s`, `1.5s`).
pub fn proto_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && (0.0..=315_576_000_000.0).contains(&seconds))
        .then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_protobuf_json() {
        assert_eq!(proto_duration("7200s"), Some(Duration::from_secs(7200)));
        assert_eq!(proto_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(proto_duration("0s"), Some(Duration::ZERO));
        for bad in ["7200", "-1s", "s", "1h", "NaNs", "infs", ""] {
            assert_eq!(proto_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_specs_gardenlet_writes_parse() {
        let gw: GatewaySpec = serde_json::from_value(serde_json::json!({
            "selector": {"app": "istio-ingressgateway", "istio": "ingressgateway"},
            "servers": [{"hosts": ["api.s1.internal.test"], "port": {"name": "tls", "number": 443, "protocol": "TLS"}, "tls": {"mode": "PASSTHROUGH"}}]
        }))
        .unwrap();
        assert_eq!(gw.servers[0].port.number, 443);
        assert_eq!(gw.servers[0].tls.as_ref().unwrap().mode, "PASSTHROUGH");
        let vs: VirtualServiceSpec = serde_json::from_value(serde_json::json!({
            "exportTo": ["istio-ingress"], "gateways": ["kube-apiserver"], "hosts": ["api.s1.internal.test"],
            "tls": [{"match": [{"port": 443, "sniHosts": ["api.s1.internal.test"]}],
                     "route": [{"destination": {"host": "kube-apiserver.shoot--p--s1.svc.cluster.local", "port": {"number": 443}}}]}]
        }))
        .unwrap();
        assert_eq!(vs.tls[0].matches[0].sni_hosts, ["api.s1.internal.test"]);
        assert_eq!(
            vs.tls[0].route[0].destination.port.as_ref().unwrap().number,
            443
        );
        let dr: DestinationRuleSpec = serde_json::from_value(serde_json::json!({
            "host": "kube-apiserver.shoot--p--s1.svc.cluster.local",
            "trafficPolicy": {"connectionPool": {"tcp": {"maxConnectionDuration": "86400s", "tcpKeepalive": {"interval": "75s", "time": "7200s"}}},
                              "loadBalancer": {"localityLbSetting": {"enabled": true}}, "tls": {"mode": "DISABLE"}}
        }))
        .unwrap();
        let tcp = dr
            .traffic_policy
            .unwrap()
            .connection_pool
            .unwrap()
            .tcp
            .unwrap();
        assert_eq!(tcp.max_connection_duration.as_deref(), Some("86400s"));
        assert_eq!(tcp.tcp_keepalive.unwrap().time.as_deref(), Some("7200s"));
    }
}
