//! Services and their EndpointSlices, joined: where a Service port's connections go. All
//! slices of a Service (label `kubernetes.io/service-name`) are joined, an endpoint counts
//! only while ready (an absent condition means ready, as the API documents), and the Service
//! port is mapped to the slices' port of the same name. Sorted and deduplicated, so the same
//! objects always give the same backends (and an unchanged route keeps its connections).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a destination did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    /// No such Service.
    ServiceNotFound,
    /// The Service has no such port (or, with no port given, more than one).
    PortNotFound,
}

impl Unresolved {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Unresolved::ServiceNotFound => "service_not_found",
            Unresolved::PortNotFound => "service_port_not_found",
        }
    }
}

#[derive(Debug, Clone)]
struct ServicePort {
    name: String,
    port: u16,
    protocol: String,
}

#[derive(Debug, Default)]
struct Entry {
    /// None until the Service itself is seen (slices may come first).
    ports: Option<Vec<ServicePort>>,
    /// (port name, port, address) of every ready TCP endpoint.
    endpoints: BTreeSet<(String, u16, IpAddr)>,
}

/// Services by namespace and name, with their ready endpoints.
#[derive(Debug, Default)]
pub struct Services {
    by_key: HashMap<(String, String), Entry>,
}

impl Services {
    /// Joins `services` and `slices`.
    pub fn new(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Services {
        let mut by_key: HashMap<(String, String), Entry> = HashMap::new();
        for s in services {
            let (Some(ns), Some(name)) = (&s.metadata.namespace, &s.metadata.name) else {
                continue;
            };
            let ports = s
                .spec
                .as_ref()
                .and_then(|spec| spec.ports.as_ref())
                .map(|ports| {
                    ports
                        .iter()
                        .filter_map(|p| {
                            Some(ServicePort {
                                name: p.name.clone().unwrap_or_default(),
                                port: u16::try_from(p.port).ok()?,
                                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            by_key.entry((ns.clone(), name.clone())).or_default().ports = Some(ports);
        }
        for slice in slices {
            let Some(ns) = &slice.metadata.namespace else {
                continue;
            };
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue; // FQDN slices name hosts, not addresses
            }
            let ports: Vec<(String, u16)> = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            let entry = by_key.entry((ns.clone(), service.clone())).or_default();
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                for address in &endpoint.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    for (name, port) in &ports {
                        entry.endpoints.insert((name.clone(), *port, ip));
                    }
                }
            }
        }
        Services { by_key }
    }

    /// Whether the Service exists.
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.by_key
            .get(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|e| e.ports.is_some())
    }

    /// The ready endpoints of Service `namespace/name` behind its `port` (with no port: its
    /// only port), sorted.
    pub fn resolve(
        &self,
        namespace: &str,
        name: &str,
        port: Option<u32>,
    ) -> Result<Vec<SocketAddr>, Unresolved> {
        let entry = self
            .by_key
            .get(&(namespace.to_owned(), name.to_owned()))
            .ok_or(Unresolved::ServiceNotFound)?;
        let ports = entry.ports.as_ref().ok_or(Unresolved::ServiceNotFound)?;
        let tcp: Vec<&ServicePort> = ports.iter().filter(|p| p.protocol == "TCP").collect();
        let port = match port {
            Some(n) => tcp.iter().find(|p| u32::from(p.port) == n),
            None if tcp.len() == 1 => tcp.first(),
            None => None,
        }
        .ok_or(Unresolved::PortNotFound)?;
        Ok(entry
            .endpoints
            .iter()
            .filter(|(n, _, _)| *n == port.name)
            .map(|(_, p, ip)| SocketAddr::new(*ip, *p))
            .collect())
    }

    /// Every (namespace, name, port) of a Service, for the CONNECT destinations.
    pub fn ports(&self) -> impl Iterator<Item = (&str, &str, u16)> {
        self.by_key.iter().flat_map(|((ns, name), e)| {
            e.ports
                .iter()
                .flatten()
                .filter(|p| p.protocol == "TCP")
                .map(move |p| (ns.as_str(), name.as_str(), p.port))
        })
    }
}

/// Splits a destination host into (namespace, name) as Istio resolves it: a short name (no
/// dot) is a Service in `default_namespace`; a name with dots is taken as a full name and
/// names a Service only as `name.namespace.svc.<cluster domain>`. None for anything else (an
/// external host).
pub fn service_of_host<'a>(
    host: &'a str,
    default_namespace: &'a str,
) -> Option<(&'a str, &'a str)> {
    if !host.contains('.') {
        return (!host.is_empty()).then_some((default_namespace, host));
    }
    let mut labels = host.splitn(4, '.');
    let (name, ns, svc, domain) = (
        labels.next()?,
        labels.next()?,
        labels.next()?,
        labels.next()?,
    );
    (!name.is_empty() && !ns.is_empty() && svc == "svc" && !domain.is_empty()).then_some((ns, name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A Service as `kubectl get -o json` shows it.
    pub(crate) fn service(ns: &str, name: &str, ports: &[(&str, i32)]) -> Arc<Service> {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP", "targetPort": p}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": {"type": "ClusterIP", "ports": ports}
            }))
            .unwrap(),
        )
    }

    /// An EndpointSlice of `service` with (address, ready) endpoints on `ports`.
    pub(crate) fn slice(
        ns: &str,
        name: &str,
        service: &str,
        ports: &[(&str, i32)],
        endpoints: &[(&str, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
            .collect();
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(a, ready)| match ready {
                Some(r) => serde_json::json!({"addresses": [a], "conditions": {"ready": r}}),
                None => serde_json::json!({"addresses": [a]}),
            })
            .collect();
        let family = if endpoints.iter().any(|e| e.to_string().contains(':')) {
            "IPv6"
        } else {
            "IPv4"
        };
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": ns, "name": name, "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": family, "ports": ports, "endpoints": endpoints
            }))
            .unwrap(),
        )
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn slices_are_joined_ready_only_and_mapped_by_port_name() {
        let services = [service("ns", "api", &[("https", 443), ("metrics", 8080)])];
        let slices = [
            slice(
                "ns",
                "api-a",
                "api",
                &[("https", 6443), ("metrics", 9090)],
                &[("10.0.0.2", Some(true)), ("10.0.0.3", Some(false))],
            ),
            slice(
                "ns",
                "api-b",
                "api",
                &[("https", 6443)],
                &[("10.0.0.1", None), ("10.0.0.2", Some(true))],
            ),
            slice(
                "other",
                "api-c",
                "api",
                &[("https", 6443)],
                &[("10.9.9.9", None)],
            ),
        ];
        let s = Services::new(&services, &slices);
        assert_eq!(
            s.resolve("ns", "api", Some(443)).unwrap(),
            addrs(&["10.0.0.1:6443", "10.0.0.2:6443"])
        );
        assert_eq!(
            s.resolve("ns", "api", Some(8080)).unwrap(),
            addrs(&["10.0.0.2:9090"])
        );
        assert_eq!(
            s.resolve("ns", "api", Some(1)),
            Err(Unresolved::PortNotFound)
        );
        assert_eq!(s.resolve("ns", "api", None), Err(Unresolved::PortNotFound));
        // Slices without their Service: not a Service.
        assert_eq!(
            s.resolve("other", "api", Some(443)),
            Err(Unresolved::ServiceNotFound)
        );
        assert!(!s.contains("other", "api"));
    }

    #[test]
    fn a_single_port_needs_no_number_and_no_endpoints_is_empty() {
        let s = Services::new(&[service("ns", "vpn", &[("", 1194)])], &[]);
        assert_eq!(
            s.resolve("ns", "vpn", None).unwrap(),
            Vec::<SocketAddr>::new()
        );
    }

    #[test]
    fn hosts_name_services() {
        assert_eq!(
            service_of_host("kube-apiserver", "ns"),
            Some(("ns", "kube-apiserver"))
        );
        assert_eq!(
            service_of_host("a.b.svc.cluster.local", "ns"),
            Some(("b", "a"))
        );
        assert_eq!(
            service_of_host("a.b.svc.seed.example", "ns"),
            Some(("b", "a"))
        );
        // Istio takes a name with dots as it is: not a Service unless it is the full name.
        assert_eq!(service_of_host("a.b", "ns"), None);
        assert_eq!(service_of_host("a.b.svc", "ns"), None);
        assert_eq!(service_of_host("api.example.com", "ns"), None);
        assert_eq!(service_of_host(".b.svc.cluster.local", "ns"), None);
        assert_eq!(service_of_host("", "ns"), None);
    }
}
