//! The HTTP CONNECT destinations from Kubernetes: `outbound|<port>||<service>.<namespace>.svc.cluster.local`,
//! the Envoy cluster names Gardener's `X-Gardener-Destination` header carries, for every
//! Service port whose name matches `connect_allow` (by default the regex of Gardener's
//! `http-proxy` EnvoyFilter: the shoots' kube-apiservers on 443 and their vpn-seed-servers on
//! 1194). A destination is a route to that Service's ready endpoints; any other header value
//! finds no route and is refused, so the proxy never dials an address a client chose.

use regex::Regex;

use super::services::Services;
use crate::config::{self, BackendAddr, OnChange, SendProxyProtocol};

/// The destinations Gardener's `http-proxy` EnvoyFilter lets through to a Service (its regex
/// without the alternative for the kube-apiserver's Unix socket, which is no Service).
pub const GARDENER_CONNECT_ALLOW: &str = r"^outbound\|(1194\|\|vpn-seed-server(-[0-4])?|443\|\|kube-apiserver)\..*\.svc\.cluster\.local$";

/// The CONNECT routes for the Services in `services` that `allow` matches, sorted by name.
pub fn routes(allow: &Regex, services: &Services) -> Vec<config::Route> {
    let mut routes: Vec<config::Route> = services
        .ports()
        .filter_map(|(ns, name, port)| {
            let destination = format!("outbound|{port}||{name}.{ns}.svc.cluster.local");
            if !allow.is_match(&destination) {
                return None;
            }
            let backends = services
                .resolve(ns, name, Some(u32::from(port)))
                .ok()?
                .into_iter()
                .map(BackendAddr::Ip)
                .collect();
            Some(config::Route {
                name: format!("connect:{ns}/{name}:{port}"),
                hosts: Vec::new(),
                destination: Some(destination),
                proxy_destinations: Vec::new(),
                backends,
                weights: Vec::new(),
                refused_weight: 0,
                send_proxy_protocol: SendProxyProtocol::default(),
                max_connections: None,
                max_connection_lifetime: None,
                max_connection_lifetime_jitter: std::time::Duration::ZERO,
                keepalive: None,
                on_change: OnChange::default(),
                drain_delay: config::DEFAULT_DRAIN_DELAY,
            })
        })
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    routes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kube::services::tests::{service, slice};

    #[test]
    fn gardeners_destinations_and_nothing_else() {
        let allow = Regex::new(GARDENER_CONNECT_ALLOW).unwrap();
        let services = Services::new(
            &[
                service(
                    "shoot--p--a",
                    "kube-apiserver",
                    &[("kube-apiserver", 443), ("metrics", 8080)],
                ),
                service("shoot--p--a", "vpn-seed-server-0", &[("openvpn", 1194)]),
                service("shoot--p--a", "etcd-main", &[("client", 2379)]),
                service("garden", "kube-apiserver", &[("https", 8443)]),
            ],
            &[slice(
                "shoot--p--a",
                "k",
                "kube-apiserver",
                &[("kube-apiserver", 443)],
                &[("10.1.0.1", None)],
            )],
        );
        let routes = routes(&allow, &services);
        let got: Vec<(&str, Option<&str>, usize)> = routes
            .iter()
            .map(|r| (r.name.as_str(), r.destination.as_deref(), r.backends.len()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "connect:shoot--p--a/kube-apiserver:443",
                    Some("outbound|443||kube-apiserver.shoot--p--a.svc.cluster.local"),
                    1
                ),
                (
                    "connect:shoot--p--a/vpn-seed-server-0:1194",
                    Some("outbound|1194||vpn-seed-server-0.shoot--p--a.svc.cluster.local"),
                    0
                ),
            ]
        );
        let own = Regex::new(r"^outbound\|2379\|\|etcd-main\..*$").unwrap();
        assert_eq!(super::routes(&own, &services).len(), 1);
    }
}
