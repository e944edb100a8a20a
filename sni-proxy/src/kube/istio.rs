//! Istio's objects, as gardenlet writes them, turned into routes: the `Gateway` servers whose
//! selector is ours and that pass TLS through; the `VirtualService`s bound to them, whose
//! `tls` routes name SNI hosts and destinations; each destination resolved through its Service
//! and EndpointSlices; the `DestinationRule` of the destination's host applied (connection
//! cap, upstream keepalive, connection lifetime). Pure: objects in, routes and reasons out.
//!
//! Istio's rules kept here: a Gateway server's hosts may be `namespace/host` (`*/`, `./`); a
//! VirtualService binds to `name` (its own namespace) or `namespace/name`, or per match; its
//! `exportTo` hides it from gateway workloads of other namespaces; a short destination host is
//! a Service of the VirtualService's namespace; when two VirtualServices claim one SNI host, the
//! oldest wins (creation time, then namespace and name).

use std::collections::{BTreeMap, HashMap};

use super::objects::{self, DestinationRuleSpec, GatewaySpec, VirtualServiceSpec};
use super::services::{service_of_host, Services, Unresolved};
use super::{Conflict, Object, ObjectKey, Reason, Skip};
use crate::config::{self, BackendAddr, Keepalive, OnChange, SendProxyProtocol};

/// What the proxy serves of Istio's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Gateways whose `spec.selector` equals this are ours.
    pub selector: BTreeMap<String, String>,
    /// The namespace the proxy runs in (for `exportTo`); None sees every VirtualService.
    pub namespace: Option<String>,
}

/// Istio's objects at one moment.
#[derive(Debug, Default)]
pub struct Objects {
    /// `Gateway`s (any served version).
    pub gateways: Vec<Object<GatewaySpec>>,
    /// `VirtualService`s.
    pub virtual_services: Vec<Object<VirtualServiceSpec>>,
    /// `DestinationRule`s.
    pub destination_rules: Vec<Object<DestinationRuleSpec>>,
}

/// Routes from Istio's objects, with what was skipped and the conflicts.
#[derive(Debug, Default)]
pub struct Translation {
    /// The routes, named `istio:<namespace>/<virtualservice>` (`…/<i>` past the first `tls`
    /// entry), sorted by name.
    pub routes: Vec<config::Route>,
    /// What was not served, and why.
    pub skips: Vec<Skip>,
    /// SNI hosts claimed twice.
    pub conflicts: Vec<Conflict>,
}

/// A server of one of our Gateways that passes TLS through.
#[derive(Debug)]
struct OpenServer<'a> {
    gateway: &'a ObjectKey,
    port: u32,
    hosts: &'a [String],
}

/// Translates `objects` for `settings`, resolving destinations in `services`.
pub fn translate(settings: &Settings, objects: &Objects, services: &Services) -> Translation {
    let mut out = Translation::default();
    let servers = open_servers(settings, objects, &mut out.skips);
    let mut vss: Vec<&Object<VirtualServiceSpec>> = objects.virtual_services.iter().collect();
    vss.sort_by(|a, b| a.age_order(b));
    let mut claimed: HashMap<String, String> = HashMap::new();
    for vs in vss {
        let Ok(spec) = &vs.spec else {
            continue; // reported below, if bound to us
        };
        let bound = |gateways: &[String]| -> Vec<&OpenServer<'_>> {
            servers
                .iter()
                .filter(|s| {
                    gateways
                        .iter()
                        .any(|g| refers_to(g, &vs.key.namespace, s.gateway))
                })
                .collect()
        };
        let ours = !bound(&spec.gateways).is_empty()
            || spec
                .tls
                .iter()
                .flat_map(|t| &t.matches)
                .any(|m| !bound(&m.gateways).is_empty());
        if !ours {
            continue;
        }
        if !exported_to(
            &spec.export_to,
            &vs.key.namespace,
            settings.namespace.as_deref(),
        ) {
            out.skips.push(vs.skip(
                Reason::NotExported,
                "exportTo does not include the proxy's namespace",
            ));
            continue;
        }
        if !spec.http.is_empty() {
            out.skips.push(vs.skip(
                Reason::HttpRoutes,
                "http routes need TLS termination; a passthrough proxy serves only tls routes",
            ));
        }
        if !spec.tcp.is_empty() {
            out.skips
                .push(vs.skip(Reason::TcpRoutes, "tcp routes have no SNI to route by"));
        }
        let several = spec.tls.len() > 1;
        for (i, tls) in spec.tls.iter().enumerate() {
            let name = if several {
                format!("istio:{}/{}/{i}", vs.key.namespace, vs.key.name)
            } else {
                format!("istio:{}/{}", vs.key.namespace, vs.key.name)
            };
            let mut hosts: Vec<String> = Vec::new();
            for m in &tls.matches {
                if !m.destination_subnets.is_empty() || !m.source_labels.is_empty() {
                    out.skips.push(vs.skip(
                        Reason::UnsupportedMatch,
                        format!("tls[{i}]: destinationSubnets and sourceLabels are not served"),
                    ));
                    continue;
                }
                let gateways = if m.gateways.is_empty() {
                    &spec.gateways
                } else {
                    &m.gateways
                };
                let servers: Vec<&OpenServer<'_>> = bound(gateways)
                    .into_iter()
                    .filter(|s| m.port.is_none_or(|p| p == s.port))
                    .collect();
                for sni in &m.sni_hosts {
                    let sni = config::normalize_host(sni);
                    if config::check_host("", &sni).is_err() {
                        out.skips.push(vs.skip(
                            Reason::InvalidHost,
                            format!("tls[{i}]: `{sni}` is not a host name"),
                        ));
                        continue;
                    }
                    if !spec
                        .hosts
                        .iter()
                        .any(|h| host_covers(&config::normalize_host(h), &sni))
                    {
                        out.skips.push(vs.skip(Reason::HostNotInVirtualService, format!("tls[{i}]: sniHost `{sni}` is not one of the VirtualService's hosts")));
                        continue;
                    }
                    let allowed = servers.iter().any(|s| {
                        s.hosts.iter().any(|h| {
                            server_host_allows(h, &s.gateway.namespace, &vs.key.namespace, &sni)
                        })
                    });
                    if !allowed {
                        out.skips.push(vs.skip(
                            Reason::HostNotInGateway,
                            format!(
                                "tls[{i}]: sniHost `{sni}` is not served by a bound Gateway server"
                            ),
                        ));
                        continue;
                    }
                    if hosts.contains(&sni) {
                        continue;
                    }
                    match claimed.get(&sni) {
                        Some(winner) if *winner != name => out.conflicts.push(Conflict {
                            host: sni,
                            winner: winner.clone(),
                            loser: name.clone(),
                        }),
                        _ => {
                            claimed.insert(sni.clone(), name.clone());
                            hosts.push(sni);
                        }
                    }
                }
            }
            if hosts.is_empty() {
                continue;
            }
            let route = route_for(name, hosts, i, tls, vs, objects, services, &mut out.skips);
            out.routes.push(route);
        }
    }
    for vs in &objects.virtual_services {
        if let Err(e) = &vs.spec {
            out.skips.push(vs.skip(Reason::InvalidSpec, e.clone()));
        }
    }
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The servers of our Gateways that pass TLS through; the others are skipped with a reason.
fn open_servers<'a>(
    settings: &Settings,
    objects: &'a Objects,
    skips: &mut Vec<Skip>,
) -> Vec<OpenServer<'a>> {
    let mut open = Vec::new();
    for gw in &objects.gateways {
        let spec = match &gw.spec {
            Ok(spec) if spec.selector == settings.selector => spec,
            Ok(_) => continue,
            Err(e) => {
                skips.push(gw.skip(Reason::InvalidSpec, e.clone()));
                continue;
            }
        };
        for (i, server) in spec.servers.iter().enumerate() {
            let mode = server.tls.as_ref().map_or("", |t| t.mode.as_str());
            if server.port.protocol.eq_ignore_ascii_case("TLS") && mode == "PASSTHROUGH" {
                open.push(OpenServer {
                    gateway: &gw.key,
                    port: server.port.number,
                    hosts: &server.hosts,
                });
                continue;
            }
            let (reason, why) = if mode.is_empty() || mode == "PASSTHROUGH" {
                (
                    Reason::UnsupportedProtocol,
                    format!(
                        "servers[{i}]: protocol {} is not TLS passthrough",
                        server.port.protocol
                    ),
                )
            } else {
                (Reason::TlsTermination, format!("servers[{i}]: tls.mode {mode} terminates TLS; a passthrough proxy cannot serve it"))
            };
            skips.push(gw.skip(reason, why));
        }
    }
    open
}

#[allow(clippy::too_many_arguments)]
fn route_for(
    name: String,
    hosts: Vec<String>,
    i: usize,
    tls: &objects::TlsRoute,
    vs: &Object<VirtualServiceSpec>,
    objects: &Objects,
    services: &Services,
    skips: &mut Vec<Skip>,
) -> config::Route {
    let mut backends = Vec::new();
    let mut weights = Vec::new();
    let mut first_service: Option<(String, String)> = None;
    let several = tls.route.len() > 1;
    for (j, r) in tls.route.iter().enumerate() {
        let d = &r.destination;
        if d.subset.is_some() {
            skips.push(vs.skip(
                Reason::Subset,
                format!("tls[{i}].route[{j}]: subsets are not served"),
            ));
            continue;
        }
        let Some((ns, svc)) = service_of_host(&d.host, &vs.key.namespace) else {
            skips.push(vs.skip(
                Reason::ExternalHost,
                format!(
                    "tls[{i}].route[{j}]: `{}` is not a Service of this cluster",
                    d.host
                ),
            ));
            continue;
        };
        first_service.get_or_insert_with(|| (ns.to_owned(), svc.to_owned()));
        let addrs = match services.resolve(ns, svc, d.port.as_ref().map(|p| p.number)) {
            Ok(addrs) => addrs,
            Err(e) => {
                let reason = match e {
                    Unresolved::ServiceNotFound => Reason::ServiceNotFound,
                    Unresolved::PortNotFound => Reason::ServicePortNotFound,
                };
                skips.push(vs.skip(
                    reason,
                    format!("tls[{i}].route[{j}]: {ns}/{svc}: {}", e.as_str()),
                ));
                continue;
            }
        };
        let weight = if several {
            r.weight.unwrap_or(0).clamp(0, 100) as u32
        } else {
            100
        };
        let n = addrs.len().max(1) as u32;
        for addr in addrs {
            backends.push(BackendAddr::Ip(addr));
            weights.push(if weight == 0 {
                0
            } else {
                (weight * 1000 / n).max(1)
            });
        }
    }
    if !several {
        weights.clear();
    }
    let policy = first_service
        .as_ref()
        .and_then(|(ns, svc)| destination_rule(objects, ns, svc))
        .and_then(|dr| dr.traffic_policy.as_ref())
        .and_then(|t| t.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref());
    let max_connections = policy
        .and_then(|t| t.max_connections)
        .filter(|n| *n > 0)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let max_connection_lifetime = policy
        .and_then(|t| t.max_connection_duration.as_deref())
        .and_then(objects::proto_duration)
        .filter(|d| !d.is_zero());
    let keepalive = policy
        .and_then(|t| t.tcp_keepalive.as_ref())
        .map(|k| Keepalive {
            time: k
                .time
                .as_deref()
                .and_then(objects::proto_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(ISTIO_KEEPALIVE_TIME),
            interval: k
                .interval
                .as_deref()
                .and_then(objects::proto_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(ISTIO_KEEPALIVE_INTERVAL),
            retries: k
                .probes
                .filter(|p| *p > 0)
                .unwrap_or(ISTIO_KEEPALIVE_PROBES),
        });
    config::Route {
        name,
        hosts,
        destination: None,
        proxy_destinations: Vec::new(),
        backends,
        weights,
        refused_weight: 0,
        send_proxy_protocol: SendProxyProtocol::default(),
        max_connections,
        max_connection_lifetime,
        max_connection_lifetime_jitter: std::time::Duration::ZERO,
        keepalive,
        on_change: OnChange::default(),
        drain_delay: config::DEFAULT_DRAIN_DELAY,
    }
}

/// Linux's defaults, which Envoy keeps for a field a `tcpKeepalive` leaves out.
const ISTIO_KEEPALIVE_TIME: std::time::Duration = std::time::Duration::from_secs(7200);
const ISTIO_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(75);
const ISTIO_KEEPALIVE_PROBES: u32 = 9;

/// The DestinationRule for Service `ns/svc`: one in the Service's namespace first, then any;
/// the oldest of those.
fn destination_rule<'a>(
    objects: &'a Objects,
    ns: &str,
    svc: &str,
) -> Option<&'a DestinationRuleSpec> {
    let mut rules: Vec<&Object<DestinationRuleSpec>> = objects
        .destination_rules
        .iter()
        .filter(|dr| {
            dr.spec
                .as_ref()
                .is_ok_and(|spec| service_of_host(&spec.host, &dr.key.namespace) == Some((ns, svc)))
        })
        .collect();
    rules.sort_by(|a, b| {
        (a.key.namespace != ns)
            .cmp(&(b.key.namespace != ns))
            .then_with(|| a.age_order(b))
    });
    rules.first().and_then(|dr| dr.spec.as_ref().ok())
}

/// Whether a gateway reference (`name`, `namespace/name`) made in `namespace` names `gateway`.
fn refers_to(reference: &str, namespace: &str, gateway: &ObjectKey) -> bool {
    match reference.split_once('/') {
        Some((ns, name)) => ns == gateway.namespace && name == gateway.name,
        None => namespace == gateway.namespace && reference == gateway.name,
    }
}

/// Istio's `exportTo`: empty or `*` is everywhere, `.` the object's own namespace, else names.
fn exported_to(export_to: &[String], own: &str, proxy: Option<&str>) -> bool {
    let Some(proxy) = proxy else {
        return true;
    };
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == proxy || (e == "." && own == proxy))
}

/// Whether a Gateway server host (`host`, or `namespace/host` with `*` and `.`) lets a
/// VirtualService of `vs_namespace` route `sni`.
fn server_host_allows(
    server_host: &str,
    gateway_namespace: &str,
    vs_namespace: &str,
    sni: &str,
) -> bool {
    let (ns, host) = server_host.split_once('/').unwrap_or(("*", server_host));
    let ns_ok = ns == "*" || (ns == "." && vs_namespace == gateway_namespace) || ns == vs_namespace;
    ns_ok && host_covers(&config::normalize_host(host), sni)
}

/// Whether `pattern` (`*`, `*.suffix` or a name) covers `host` (a name or a `*.` wildcard).
fn host_covers(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::kube::services::tests::{service, slice};
    use crate::kube::Kind;

    const INGRESS: &str = "istio-ingress";

    fn settings() -> Settings {
        Settings {
            selector: [("app", "istio-ingressgateway"), ("istio", "ingressgateway")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            namespace: Some(INGRESS.to_owned()),
        }
    }

    fn object<S: serde::de::DeserializeOwned>(
        ns: &str,
        name: &str,
        created: i64,
        spec: serde_json::Value,
    ) -> Object<S> {
        Object {
            key: ObjectKey {
                namespace: ns.into(),
                name: name.into(),
            },
            created: Some(created),
            spec: serde_json::from_value(spec).map_err(|e| e.to_string()),
        }
    }

    /// The objects gardenlet writes for shoot `ns` with API host `host`.
    fn shoot(objects: &mut Objects, ns: &str, host: &str, created: i64) {
        objects.gateways.push(object(ns, "kube-apiserver", created, serde_json::json!({
            "selector": {"app": "istio-ingressgateway", "istio": "ingressgateway"},
            "servers": [{"hosts": [host], "port": {"name": "tls", "number": 443, "protocol": "TLS"}, "tls": {"mode": "PASSTHROUGH"}}]
        })));
        objects.virtual_services.push(object(ns, "kube-apiserver", created, serde_json::json!({
            "exportTo": [INGRESS], "gateways": ["kube-apiserver"], "hosts": [host],
            "tls": [{"match": [{"port": 443, "sniHosts": [host]}],
                     "route": [{"destination": {"host": format!("kube-apiserver.{ns}.svc.cluster.local"), "port": {"number": 443}}}]}]
        })));
        objects.destination_rules.push(object(ns, "kube-apiserver", created, serde_json::json!({
            "host": format!("kube-apiserver.{ns}.svc.cluster.local"),
            "trafficPolicy": {"connectionPool": {"tcp": {"maxConnectionDuration": "86400s", "tcpKeepalive": {"interval": "75s", "time": "7200s"}}},
                              "tls": {"mode": "DISABLE"}}
        })));
    }

    fn cluster(shoots: &[(&str, &str)]) -> (Objects, Services) {
        let mut objects = Objects::default();
        let mut svcs = Vec::new();
        let mut slices = Vec::new();
        for (i, (ns, host)) in shoots.iter().enumerate() {
            shoot(&mut objects, ns, host, i as i64);
            svcs.push(service(ns, "kube-apiserver", &[("kube-apiserver", 443)]));
            slices.push(slice(
                ns,
                "kube-apiserver-x",
                "kube-apiserver",
                &[("kube-apiserver", 443)],
                &[(&format!("10.1.{i}.1"), None)],
            ));
        }
        (objects, Services::new(&svcs, &slices))
    }

    #[test]
    fn gardenlets_objects_become_one_route_per_shoot() {
        let (objects, services) = cluster(&[
            ("shoot--p--a", "api.a.internal.test"),
            ("shoot--p--b", "api.b.internal.test"),
        ]);
        let t = translate(&settings(), &objects, &services);
        assert!(t.skips.is_empty(), "{:?}", t.skips);
        assert_eq!(t.routes.len(), 2);
        let a = &t.routes[0];
        assert_eq!(a.name, "istio:shoot--p--a/kube-apiserver");
        assert_eq!(a.hosts, ["api.a.internal.test"]);
        assert_eq!(
            a.backends,
            [BackendAddr::Ip(
                "10.1.0.1:443".parse::<SocketAddr>().unwrap()
            )]
        );
        assert!(a.weights.is_empty());
        assert_eq!(a.max_connection_lifetime, Some(Duration::from_secs(86400)));
        let k = a.keepalive.unwrap();
        assert_eq!(
            (k.time, k.interval, k.retries),
            (Duration::from_secs(7200), Duration::from_secs(75), 9)
        );
        assert_eq!(a.max_connections, None);
    }

    #[test]
    fn another_selector_is_not_ours() {
        let (objects, services) = cluster(&[("shoot--p--a", "api.a.test")]);
        let mut other = settings();
        other
            .selector
            .insert("istio".into(), "ingressgateway--zone--a".into());
        let t = translate(&other, &objects, &services);
        assert!(t.routes.is_empty() && t.skips.is_empty());
    }

    #[test]
    fn tls_termination_is_skipped_with_its_reason() {
        let (mut objects, services) = cluster(&[("shoot--p--a", "api.a.test")]);
        objects.gateways[0] = object(
            "shoot--p--a",
            "kube-apiserver",
            0,
            serde_json::json!({
                "selector": {"app": "istio-ingressgateway", "istio": "ingressgateway"},
                "servers": [{"hosts": ["api.a.test"], "port": {"name": "tls", "number": 443, "protocol": "HTTPS"}, "tls": {"mode": "OPTIONAL_MUTUAL", "credentialName": "x"}}]
            }),
        );
        let t = translate(&settings(), &objects, &services);
        assert!(t.routes.is_empty());
        assert_eq!(t.skips.len(), 1, "{:?}", t.skips);
        assert_eq!(
            (t.skips[0].kind, t.skips[0].reason),
            (Kind::Gateway, Reason::TlsTermination)
        );
        assert!(
            t.skips[0].detail.contains("OPTIONAL_MUTUAL"),
            "{}",
            t.skips[0].detail
        );
    }

    #[test]
    fn the_oldest_virtual_service_wins_a_host() {
        let (mut objects, services) =
            cluster(&[("shoot--p--a", "api.a.test"), ("shoot--p--b", "api.b.test")]);
        // b's VirtualService (newer) also claims a's host; its Gateway server allows it.
        let vs = &mut objects.virtual_services[1];
        vs.spec.as_mut().unwrap().hosts.push("api.a.test".into());
        vs.spec.as_mut().unwrap().tls[0].matches[0]
            .sni_hosts
            .push("api.a.test".into());
        objects.gateways[1].spec.as_mut().unwrap().servers[0]
            .hosts
            .push("api.a.test".into());
        let t = translate(&settings(), &objects, &services);
        assert_eq!(
            t.conflicts,
            [Conflict {
                host: "api.a.test".into(),
                winner: "istio:shoot--p--a/kube-apiserver".into(),
                loser: "istio:shoot--p--b/kube-apiserver".into(),
            }]
        );
        assert_eq!(t.routes[0].hosts, ["api.a.test"]);
        assert_eq!(t.routes[1].hosts, ["api.b.test"]);
    }

    #[test]
    fn export_to_and_gateway_host_namespaces_are_honoured() {
        let (mut objects, services) = cluster(&[("shoot--p--a", "api.a.test")]);
        objects.virtual_services[0].spec.as_mut().unwrap().export_to = vec!["garden".into()];
        let t = translate(&settings(), &objects, &services);
        assert!(t.routes.is_empty());
        assert_eq!(t.skips[0].reason, Reason::NotExported);
        // A server host restricted to another namespace does not admit the VirtualService.
        let (mut objects, services) = cluster(&[("shoot--p--a", "api.a.test")]);
        objects.gateways[0].spec.as_mut().unwrap().servers[0].hosts =
            vec!["garden/api.a.test".into()];
        let t = translate(&settings(), &objects, &services);
        assert!(t.routes.is_empty());
        assert_eq!(t.skips[0].reason, Reason::HostNotInGateway);
        // `./host`: the Gateway's own namespace, which is the VirtualService's.
        objects.gateways[0].spec.as_mut().unwrap().servers[0].hosts = vec!["./*.test".into()];
        let t = translate(&settings(), &objects, &services);
        assert_eq!(t.routes.len(), 1, "{:?}", t.skips);
    }

    #[test]
    fn weights_split_over_endpoints_and_missing_services_are_reported() {
        let (mut objects, _) = cluster(&[("shoot--p--a", "api.a.test")]);
        objects.virtual_services[0].spec.as_mut().unwrap().tls[0].route =
            serde_json::from_value(serde_json::json!([
                {"destination": {"host": "kube-apiserver", "port": {"number": 443}}, "weight": 75},
                {"destination": {"host": "canary", "port": {"number": 443}}, "weight": 25},
                {"destination": {"host": "gone", "port": {"number": 443}}, "weight": 0}
            ]))
            .unwrap();
        let services = Services::new(
            &[
                service("shoot--p--a", "kube-apiserver", &[("", 443)]),
                service("shoot--p--a", "canary", &[("", 443)]),
            ],
            &[
                slice(
                    "shoot--p--a",
                    "k",
                    "kube-apiserver",
                    &[("", 443)],
                    &[
                        ("10.1.0.1", None),
                        ("10.1.0.2", None),
                        ("10.1.0.3", Some(false)),
                    ],
                ),
                slice(
                    "shoot--p--a",
                    "c",
                    "canary",
                    &[("", 443)],
                    &[("10.2.0.1", None)],
                ),
            ],
        );
        let t = translate(&settings(), &objects, &services);
        assert_eq!(t.routes[0].backends.len(), 3);
        assert_eq!(t.routes[0].weights, [37_500, 37_500, 25_000]);
        assert_eq!(t.skips.len(), 1);
        assert_eq!(t.skips[0].reason, Reason::ServiceNotFound);
    }

    #[test]
    fn hosts_cover_as_istio_matches_them() {
        assert!(host_covers("*", "a.b"));
        assert!(host_covers("*.b.test", "a.b.test"));
        assert!(host_covers("*.b.test", "x.a.b.test"));
        assert!(host_covers("*.b.test", "*.a.b.test"));
        assert!(!host_covers("*.b.test", "b.test"));
        assert!(!host_covers("*.b.test", "ab.test"));
        assert!(!host_covers("a.b.test", "*.b.test"));
        assert!(refers_to(
            "kube-apiserver",
            "ns",
            &ObjectKey {
                namespace: "ns".into(),
                name: "kube-apiserver".into()
            }
        ));
        assert!(refers_to(
            "ns/kube-apiserver",
            "other",
            &ObjectKey {
                namespace: "ns".into(),
                name: "kube-apiserver".into()
            }
        ));
        assert!(!refers_to(
            "kube-apiserver",
            "other",
            &ObjectKey {
                namespace: "ns".into(),
                name: "kube-apiserver".into()
            }
        ));
        assert!(!refers_to(
            "mesh",
            "ns",
            &ObjectKey {
                namespace: "ns".into(),
                name: "kube-apiserver".into()
            }
        ));
    }
}
