//! The Gateway API (gateway.networking.k8s.io) turned into routes and into the status the
//! spec asks of its implementation: our `GatewayClass` (its `controllerName` is ours), the
//! `Gateway`s of that class, their listeners that pass TLS through (`protocol: TLS`,
//! `tls.mode: Passthrough`), and the `TLSRoute`s attached to them, resolved through Services
//! and EndpointSlices. Pure: objects in; routes, reasons and the desired status out (the
//! status writer adds times and generations, [`super::gateway_watch`]).
//!
//! The spec's rules kept here: a parentRef's group and kind default to the Gateway's, its
//! namespace to the route's; `sectionName` names a listener and `port` its port, and a route
//! attaches to every listener they select that admits its namespace (`allowedRoutes`, `Same`
//! by default) and kind, and whose hostname meets one of the route's (a listener hostname
//! `*.example.com` and a route hostname `foo.example.com` give `foo.example.com`; the other
//! way round too; no listener hostname gives the route's). A backendRef is a core Service
//! (group `""`, kind `Service`) with a port; one in another namespace needs a ReferenceGrant
//! there. An invalid backendRef, or one whose Service has no ready endpoint, keeps its weight
//! and its share of connections is refused (`config::Route::refused_weight`). When two
//! TLSRoutes claim one host, the oldest keeps it, as with Istio.
//!
//! What is not implemented, each reported rather than half-served: listeners of other
//! protocols or terminating TLS (not accepted), `allowedRoutes.namespaces.from: Selector` (the
//! listener is not accepted, reason `UnsupportedValue`: the proxy would need to watch every
//! Namespace), conflicting listeners on one port (not served).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::services::{Services, Unresolved};
use super::{Conflict, Kind, KindOf, Object, ObjectKey, Reason, Skip};
use crate::config::{self, BackendAddr, OnChange, SendProxyProtocol};

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The one route kind served.
pub const TLS_ROUTE: &str = "TLSRoute";
/// The largest backendRef weight the API allows.
pub const MAX_WEIGHT: i64 = 1_000_000;
/// A backendRef's weight when it names none.
pub const DEFAULT_WEIGHT: i64 = 1;
/// A backendRef's weight is spread over its endpoints in units of 1/`WEIGHT_SCALE`: 16
/// backendRefs of the largest weight still fit a `u32`.
const WEIGHT_SCALE: u64 = 256;

/// What the proxy serves of the Gateway API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Gateways of the GatewayClass of this name are ours ...
    pub gateway_class: String,
    /// ... when the class names this controller.
    pub controller_name: String,
}

/// `GatewayClass.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayClassSpec {
    /// The controller that serves the class.
    pub controller_name: String,
    /// Parameters for the controller (sni-proxy takes none: a class with them is not
    /// accepted).
    pub parameters_ref: Option<serde_json::Value>,
}

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    /// The GatewayClass.
    pub gateway_class_name: String,
    /// Its listeners.
    pub listeners: Vec<Listener>,
}

/// `Gateway.spec.listeners[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Listener {
    /// Unique in the Gateway; a parentRef's `sectionName`.
    pub name: String,
    /// The SNI hostname it serves (exact or `*.`); every hostname when absent.
    pub hostname: Option<String>,
    /// The port.
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP`, `UDP`, or a domain-prefixed protocol.
    pub protocol: String,
    /// TLS settings.
    pub tls: Option<ListenerTls>,
    /// Which routes may attach.
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `listeners[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerTls {
    /// `Terminate` (the default) or `Passthrough`.
    pub mode: Option<String>,
}

/// `listeners[].allowedRoutes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from.
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds; by the listener's protocol when empty.
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    pub from: Option<String>,
}

/// A route group and kind (`allowedRoutes.kinds[]`, `status.listeners[].supportedKinds[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteGroupKind {
    /// The group; the Gateway API's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The kind.
    pub kind: String,
}

/// `TLSRoute.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRouteSpec {
    /// The Gateways (and listeners) it attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// SNI hostnames, exact or with a leading `*.`.
    pub hostnames: Vec<String>,
    /// Exactly one rule (the CRD holds it to that).
    pub rules: Vec<TlsRouteRule>,
}

/// `spec.parentRefs[]`, written back as it is in `status.parents[].parentRef`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentRef {
    /// The group; the Gateway API's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The kind; `Gateway` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The namespace; the route's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Gateway's name.
    pub name: String,
    /// A listener name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A listener port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

/// `spec.rules[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRouteRule {
    /// Where connections go, by weight.
    pub backend_refs: Vec<BackendRef>,
}

/// `rules[].backendRefs[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendRef {
    /// The group; core (`""`) when absent.
    pub group: Option<String>,
    /// The kind; `Service` when absent.
    pub kind: Option<String>,
    /// The name.
    pub name: String,
    /// The namespace; the route's when absent.
    pub namespace: Option<String>,
    /// The Service port (required for a Service).
    pub port: Option<u32>,
    /// The share of connections; 1 when absent, 0 is none.
    pub weight: Option<i64>,
}

/// `ReferenceGrant.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReferenceGrantSpec {
    /// Who may refer.
    pub from: Vec<GrantFrom>,
    /// To what in the grant's namespace.
    pub to: Vec<GrantTo>,
}

/// `ReferenceGrant.spec.from[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GrantFrom {
    /// The referring group.
    pub group: String,
    /// The referring kind.
    pub kind: String,
    /// The referring namespace.
    pub namespace: String,
}

/// `ReferenceGrant.spec.to[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GrantTo {
    /// The referred group (`""` is core).
    pub group: String,
    /// The referred kind.
    pub kind: String,
    /// One object; every object of the kind when absent.
    pub name: Option<String>,
}

impl KindOf for GatewayClassSpec {
    const KIND: Kind = Kind::GatewayClass;
}
impl KindOf for GatewaySpec {
    const KIND: Kind = Kind::ApiGateway;
}
impl KindOf for TlsRouteSpec {
    const KIND: Kind = Kind::TlsRoute;
}
impl KindOf for ReferenceGrantSpec {
    const KIND: Kind = Kind::ReferenceGrant;
}

/// The Gateway API's objects at one moment (a GatewayClass's key has an empty namespace).
#[derive(Debug, Default)]
pub struct Objects {
    /// `GatewayClass`es.
    pub classes: Vec<Object<GatewayClassSpec>>,
    /// `Gateway`s.
    pub gateways: Vec<Object<GatewaySpec>>,
    /// `TLSRoute`s.
    pub routes: Vec<Object<TlsRouteSpec>>,
    /// `ReferenceGrant`s.
    pub grants: Vec<Object<ReferenceGrantSpec>>,
}

/// One status condition as the spec names it (`metav1.Condition` without the times and the
/// generation, which the writer adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted`, `Programmed`, `ResolvedRefs`, `Conflicted`.
    pub kind: &'static str,
    /// True or False.
    pub status: bool,
    /// The spec's reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl Condition {
    fn new(
        kind: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Condition {
            kind,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// A listener's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    /// The listener's name.
    pub name: String,
    /// The route kinds it takes.
    pub supported_kinds: Vec<RouteGroupKind>,
    /// Accepted routes attached to it.
    pub attached_routes: i32,
    /// `Accepted`, `Programmed`, `ResolvedRefs`, `Conflicted`.
    pub conditions: Vec<Condition>,
}

/// A Gateway's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    /// `Accepted`, `Programmed`.
    pub conditions: Vec<Condition>,
    /// One per listener, in spec order.
    pub listeners: Vec<ListenerStatus>,
}

/// A TLSRoute's status for one of its parentRefs that is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    /// The parentRef, as in the spec.
    pub parent_ref: ParentRef,
    /// `Accepted`, `ResolvedRefs`.
    pub conditions: Vec<Condition>,
}

/// The status the spec asks for, of every object that is ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Our GatewayClass: its name and conditions.
    pub classes: BTreeMap<String, Vec<Condition>>,
    /// The Gateways of our class.
    pub gateways: BTreeMap<ObjectKey, GatewayStatus>,
    /// The TLSRoutes with a parentRef to one of them: our entries of `status.parents`, in
    /// parentRef order (an empty list: none of ours any more).
    pub routes: BTreeMap<ObjectKey, Vec<ParentStatus>>,
}

/// Routes from the Gateway API, what was skipped, the conflicts, and the status to write.
#[derive(Debug, Default)]
pub struct Translation {
    /// The routes, named `gateway:<namespace>/<tlsroute>`, sorted by name.
    pub routes: Vec<config::Route>,
    /// What was not served, and why.
    pub skips: Vec<Skip>,
    /// SNI hosts claimed twice.
    pub conflicts: Vec<Conflict>,
    /// The status of our objects.
    pub status: Status,
}

/// A listener of one of our Gateways, as translated.
#[derive(Debug)]
struct OurListener<'a> {
    spec: &'a Listener,
    /// It takes TLSRoutes: accepted, TLS passthrough, not conflicted.
    served: bool,
    /// `allowedRoutes.namespaces.from` is `All`.
    from_all: bool,
    /// TLSRoute is among its kinds.
    takes_tls_routes: bool,
    attached: i32,
}

/// Translates `objects` for `settings`, resolving backends in `services`.
pub fn translate(settings: &Settings, objects: &Objects, services: &Services) -> Translation {
    let mut out = Translation::default();
    let class = objects.classes.iter().find(|c| {
        c.key.name == settings.gateway_class
            && c.spec
                .as_ref()
                .is_ok_and(|s| s.controller_name == settings.controller_name)
    });
    let Some(class) = class else {
        return out;
    };
    if class
        .spec
        .as_ref()
        .is_ok_and(|s| s.parameters_ref.is_some())
    {
        let why = "sni-proxy takes no parameters: parametersRef must be empty";
        out.skips
            .push(class.skip(Reason::InvalidSpec, format!("spec.parametersRef: {why}")));
        out.status.classes.insert(
            settings.gateway_class.clone(),
            vec![Condition::new("Accepted", false, "InvalidParameters", why)],
        );
        return out;
    }
    out.status.classes.insert(
        settings.gateway_class.clone(),
        vec![Condition::new(
            "Accepted",
            true,
            "Accepted",
            "served by sni-proxy (TLS passthrough)",
        )],
    );
    let mut gateways: BTreeMap<&ObjectKey, Vec<OurListener<'_>>> = BTreeMap::new();
    for gw in &objects.gateways {
        match &gw.spec {
            Ok(spec) if spec.gateway_class_name == settings.gateway_class => {
                gateways.insert(&gw.key, listeners(gw, spec, &mut out.skips));
            }
            Ok(_) => {}
            Err(e) => out.skips.push(gw.skip(Reason::InvalidSpec, e.clone())),
        }
    }

    let mut routes: Vec<&Object<TlsRouteSpec>> = objects.routes.iter().collect();
    routes.sort_by(|a, b| a.age_order(b));
    let mut claimed: HashMap<String, String> = HashMap::new();
    for route in routes {
        let spec = match &route.spec {
            Ok(spec) => spec,
            Err(e) => {
                out.skips.push(route.skip(Reason::InvalidSpec, e.clone()));
                continue;
            }
        };
        let mut parents = Vec::new();
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        let mut accepted_any = false;
        // Resolved once per route, reported under each of our parents.
        let mut backends: Option<Backends> = None;
        for (i, pr) in spec.parent_refs.iter().enumerate() {
            if pr.group.as_deref().unwrap_or(GROUP) != GROUP
                || pr.kind.as_deref().unwrap_or("Gateway") != "Gateway"
            {
                continue;
            }
            let key = ObjectKey {
                namespace: pr
                    .namespace
                    .clone()
                    .unwrap_or_else(|| route.key.namespace.clone()),
                name: pr.name.clone(),
            };
            let Some(listeners) = gateways.get_mut(&key) else {
                continue; // not a Gateway of ours
            };
            let backends = backends.get_or_insert_with(|| {
                resolve_backends(route, spec, objects, services, &mut out.skips)
            });
            let accepted = attach(route, spec, pr, &key, listeners, &mut hosts);
            if let Err((reason, skip, message)) = &accepted {
                out.skips
                    .push(route.skip(*skip, format!("parentRefs[{i}]: {message}")));
                parents.push(ParentStatus {
                    parent_ref: pr.clone(),
                    conditions: vec![
                        Condition::new("Accepted", false, reason, message.clone()),
                        backends.condition.clone(),
                    ],
                });
                continue;
            }
            accepted_any = true;
            parents.push(ParentStatus {
                parent_ref: pr.clone(),
                conditions: vec![
                    Condition::new("Accepted", true, "Accepted", "attached"),
                    backends.condition.clone(),
                ],
            });
        }
        if parents.is_empty() {
            continue;
        }
        out.status.routes.insert(route.key.clone(), parents);
        let Some(backends) = backends.filter(|_| accepted_any) else {
            continue;
        };
        let name = format!("gateway:{}/{}", route.key.namespace, route.key.name);
        let mut mine = Vec::new();
        for host in hosts {
            match claimed.get(&host) {
                Some(winner) => out.conflicts.push(Conflict {
                    host,
                    winner: winner.clone(),
                    loser: name.clone(),
                }),
                None => {
                    claimed.insert(host.clone(), name.clone());
                    mine.push(host);
                }
            }
        }
        if !mine.is_empty() {
            out.routes.push(route_of(name, mine, backends));
        }
    }
    for (key, listeners) in gateways {
        let spec = objects
            .gateways
            .iter()
            .find(|g| g.key == *key)
            .and_then(|g| g.spec.as_ref().ok());
        let Some(spec) = spec else { continue };
        out.status
            .gateways
            .insert(key.clone(), gateway_status(spec, &listeners));
    }
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A Gateway's listeners, judged: what is served, and skips for what is not.
fn listeners<'a>(
    gw: &Object<GatewaySpec>,
    spec: &'a GatewaySpec,
    skips: &mut Vec<Skip>,
) -> Vec<OurListener<'a>> {
    let conflicts = listener_conflicts(spec);
    spec.listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let accepted = listener_accepted(l);
            let from = from_namespaces(l);
            let (kinds, _) = supported_kinds(l);
            let takes_tls_routes = !kinds.is_empty();
            let served = accepted.is_none() && conflicts[i].is_none() && from != "Selector";
            if let Some((_, reason, message)) = accepted {
                skips.push(gw.skip(reason, format!("listeners[{i}] {}: {message}", l.name)));
            } else if let Some((_, message)) = &conflicts[i] {
                skips.push(gw.skip(
                    Reason::ListenerConflict,
                    format!("listeners[{i}] {}: {message}", l.name),
                ));
            } else if from == "Selector" {
                skips.push(gw.skip(Reason::NamespaceSelector, format!("listeners[{i}] {}: allowedRoutes.namespaces.from: Selector is not served; no route attaches", l.name)));
            } else if !takes_tls_routes {
                skips.push(gw.skip(
                    Reason::InvalidRouteKinds,
                    format!("listeners[{i}] {}: allowedRoutes.kinds has no TLSRoute", l.name),
                ));
            }
            OurListener {
                spec: l,
                served,
                from_all: from == "All",
                takes_tls_routes,
                attached: 0,
            }
        })
        .collect()
}

/// Why a listener is not accepted: (condition reason, skip reason, message); None if it is.
fn listener_accepted(l: &Listener) -> Option<(&'static str, Reason, String)> {
    if !l.protocol.eq_ignore_ascii_case("TLS") {
        return Some((
            "UnsupportedProtocol",
            Reason::UnsupportedProtocol,
            format!(
                "protocol {} is not served: sni-proxy serves TLS passthrough only",
                l.protocol
            ),
        ));
    }
    let mode = l
        .tls
        .as_ref()
        .and_then(|t| t.mode.as_deref())
        .unwrap_or("Terminate");
    if mode != "Passthrough" {
        return Some((
            "UnsupportedValue",
            Reason::TlsTermination,
            format!(
                "tls.mode {mode} is not served: sni-proxy never terminates TLS (use Passthrough)"
            ),
        ));
    }
    None
}

/// `allowedRoutes.namespaces.from`, `Same` by default.
fn from_namespaces(l: &Listener) -> &str {
    l.allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.from.as_deref())
        .unwrap_or("Same")
}

/// The route kinds a listener takes, and whether its `allowedRoutes.kinds` named others.
fn supported_kinds(l: &Listener) -> (Vec<RouteGroupKind>, bool) {
    let tls_route = RouteGroupKind {
        group: Some(GROUP.to_owned()),
        kind: TLS_ROUTE.to_owned(),
    };
    if listener_accepted(l).is_some() {
        return (Vec::new(), false);
    }
    let kinds = l.allowed_routes.as_ref().map_or(&[][..], |a| &a.kinds[..]);
    if kinds.is_empty() {
        return (vec![tls_route], false);
    }
    let valid = kinds
        .iter()
        .any(|k| k.group.as_deref().unwrap_or(GROUP) == GROUP && k.kind == TLS_ROUTE);
    let invalid = kinds
        .iter()
        .any(|k| k.group.as_deref().unwrap_or(GROUP) != GROUP || k.kind != TLS_ROUTE);
    (if valid { vec![tls_route] } else { Vec::new() }, invalid)
}

/// Per listener: the conflict (reason, message) it is in, if any. Listeners on one port must
/// agree on the protocol and differ in hostname.
fn listener_conflicts(spec: &GatewaySpec) -> Vec<Option<(&'static str, String)>> {
    let ls = &spec.listeners;
    (0..ls.len())
        .map(|i| {
            let same_port = ls
                .iter()
                .enumerate()
                .filter(|(j, o)| *j != i && o.port == ls[i].port);
            let mut out = None;
            for (_, o) in same_port {
                if !o.protocol.eq_ignore_ascii_case(&ls[i].protocol) {
                    return Some((
                        "ProtocolConflict",
                        format!(
                            "port {} is also listener {} with protocol {}",
                            ls[i].port, o.name, o.protocol
                        ),
                    ));
                }
                if o.hostname.as_deref().map(config::normalize_host)
                    == ls[i].hostname.as_deref().map(config::normalize_host)
                {
                    out = Some((
                        "HostnameConflict",
                        format!("listener {} has the same port and hostname", o.name),
                    ));
                }
            }
            out
        })
        .collect()
}

/// Attaches `route` through parentRef `i` to the listeners of Gateway `key`: adds the hosts
/// it gets, counts it on each listener; Err with (condition reason, skip reason, message)
/// when it attaches to none.
fn attach(
    route: &Object<TlsRouteSpec>,
    spec: &TlsRouteSpec,
    pr: &ParentRef,
    key: &ObjectKey,
    listeners: &mut [OurListener<'_>],
    hosts: &mut BTreeSet<String>,
) -> Result<(), (&'static str, Reason, String)> {
    let selected: Vec<usize> = (0..listeners.len())
        .filter(|j| {
            let l = listeners[*j].spec;
            pr.section_name.as_ref().is_none_or(|s| *s == l.name)
                && pr.port.is_none_or(|p| p == l.port)
        })
        .collect();
    if selected.is_empty() {
        return Err((
            "NoMatchingParent",
            Reason::NoMatchingParent,
            format!(
                "Gateway {key} has no listener{}{}",
                pr.section_name
                    .as_ref()
                    .map(|s| format!(" named {s}"))
                    .unwrap_or_default(),
                pr.port.map(|p| format!(" on port {p}")).unwrap_or_default()
            ),
        ));
    }
    if !selected
        .iter()
        .any(|j| listeners[*j].spec.protocol.eq_ignore_ascii_case("TLS"))
    {
        return Err((
            "UnsupportedValue",
            Reason::UnsupportedProtocol,
            format!("the listeners of Gateway {key} it names are not TLS listeners"),
        ));
    }
    let allowed: Vec<usize> = selected
        .into_iter()
        .filter(|j| {
            let l = &listeners[*j];
            l.served && l.takes_tls_routes && (l.from_all || route.key.namespace == key.namespace)
        })
        .collect();
    if allowed.is_empty() {
        return Err((
            "NotAllowedByListeners",
            Reason::NotAllowedByListeners,
            format!(
                "no listener of Gateway {key} it names admits TLSRoutes from namespace {}",
                route.key.namespace
            ),
        ));
    }
    let route_hosts: Vec<String> = spec
        .hostnames
        .iter()
        .map(|h| config::normalize_host(h))
        .filter(|h| config::check_host("", h).is_ok())
        .collect();
    let mut attached = false;
    for j in allowed {
        let l = &mut listeners[j];
        let got = intersect(l.spec.hostname.as_deref(), &route_hosts);
        if got.is_empty() {
            continue;
        }
        attached = true;
        l.attached += 1;
        hosts.extend(got);
    }
    if !attached {
        return Err((
            "NoMatchingListenerHostname",
            Reason::NoMatchingListenerHostname,
            format!("no hostname of the route meets a hostname of the listeners of Gateway {key} that admit it"),
        ));
    }
    Ok(())
}

/// The SNI hostnames a route with `route` hostnames gets on a listener with hostname
/// `listener`: the more specific of each pair that meets. A route without hostnames gets the
/// listener's; with neither, nothing (the proxy has no catch-all).
pub fn intersect(listener: Option<&str>, route: &[String]) -> Vec<String> {
    let listener = listener.map(config::normalize_host);
    match (listener, route.is_empty()) {
        (None, _) => route.to_vec(),
        (Some(l), true) => vec![l],
        (Some(l), false) => {
            let mut out: Vec<String> = route.iter().filter_map(|r| meet(&l, r)).collect();
            out.sort();
            out.dedup();
            out
        }
    }
}

/// The more specific of two hostnames (exact or `*.`) when one covers the other.
fn meet(a: &str, b: &str) -> Option<String> {
    if a == b {
        return Some(a.to_owned());
    }
    match (a.strip_prefix("*."), b.strip_prefix("*.")) {
        (None, None) => None,
        (Some(suffix), None) => under(b, suffix).then(|| b.to_owned()),
        (None, Some(suffix)) => under(a, suffix).then(|| a.to_owned()),
        (Some(sa), Some(sb)) => {
            if under(sa, sb) {
                Some(a.to_owned())
            } else if under(sb, sa) {
                Some(b.to_owned())
            } else {
                None
            }
        }
    }
}

/// Whether `name` is one or more labels followed by `.suffix`.
fn under(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .and_then(|rest| rest.strip_suffix('.'))
        .is_some_and(|rest| !rest.is_empty())
}

/// A route's backends, resolved.
#[derive(Debug)]
struct Backends {
    addrs: Vec<BackendAddr>,
    weights: Vec<u32>,
    refused: u32,
    condition: Condition,
}

fn resolve_backends(
    route: &Object<TlsRouteSpec>,
    spec: &TlsRouteSpec,
    objects: &Objects,
    services: &Services,
    skips: &mut Vec<Skip>,
) -> Backends {
    let mut out = Backends {
        addrs: Vec::new(),
        weights: Vec::new(),
        refused: 0,
        condition: Condition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backendRef resolved",
        ),
    };
    let mut failures: Vec<(&'static str, String)> = Vec::new();
    let own = &route.key.namespace;
    let refs = spec.rules.first().map_or(&[][..], |r| &r.backend_refs[..]);
    for (j, br) in refs.iter().enumerate() {
        let weight = br.weight.unwrap_or(DEFAULT_WEIGHT).clamp(0, MAX_WEIGHT) as u64;
        let share = weight * WEIGHT_SCALE;
        let field = format!("rules[0].backendRefs[{j}]");
        let ns = br.namespace.as_deref().unwrap_or(own);
        let failure: Option<(&'static str, Reason, String)> = if !br
            .group
            .as_deref()
            .unwrap_or("")
            .is_empty()
            || br.kind.as_deref().unwrap_or("Service") != "Service"
        {
            Some((
                "InvalidKind",
                Reason::InvalidKind,
                format!(
                    "{field}: {}/{} is not a Service",
                    br.group.as_deref().unwrap_or(""),
                    br.kind.as_deref().unwrap_or("Service")
                ),
            ))
        } else if ns != own && !granted(objects, own, ns, &br.name) {
            Some((
                "RefNotPermitted",
                Reason::RefNotPermitted,
                format!("{field}: Service {ns}/{} is in another namespace and no ReferenceGrant there allows it", br.name),
            ))
        } else {
            match br.port {
                None => Some((
                    "BackendNotFound",
                    Reason::ServicePortNotFound,
                    format!("{field}: a Service backendRef needs a port"),
                )),
                Some(port) => match services.resolve(ns, &br.name, Some(port)) {
                    Ok(addrs) if addrs.is_empty() => {
                        // Valid, but nowhere to go: its share is refused (the spec's "a
                        // Service with no endpoints").
                        out.refused = out
                            .refused
                            .saturating_add(u32::try_from(share).unwrap_or(u32::MAX));
                        None
                    }
                    Ok(addrs) => {
                        let n = addrs.len() as u64;
                        for a in addrs {
                            out.addrs.push(BackendAddr::Ip(a));
                            let w = if weight == 0 { 0 } else { (share / n).max(1) };
                            out.weights.push(u32::try_from(w).unwrap_or(u32::MAX));
                        }
                        None
                    }
                    Err(Unresolved::ServiceNotFound) => Some((
                        "BackendNotFound",
                        Reason::ServiceNotFound,
                        format!("{field}: Service {ns}/{} not found", br.name),
                    )),
                    Err(Unresolved::PortNotFound) => Some((
                        "BackendNotFound",
                        Reason::ServicePortNotFound,
                        format!("{field}: Service {ns}/{} has no port {port}", br.name),
                    )),
                },
            }
        };
        if let Some((reason, skip, message)) = failure {
            skips.push(route.skip(skip, message.clone()));
            failures.push((reason, message));
            out.refused = out
                .refused
                .saturating_add(u32::try_from(share).unwrap_or(u32::MAX));
        }
    }
    if refs.is_empty() {
        out.refused = 1; // no backend: every connection is refused
    }
    if let Some((reason, _)) = failures.first() {
        let message: Vec<&str> = failures.iter().map(|(_, m)| m.as_str()).collect();
        out.condition = Condition::new("ResolvedRefs", false, reason, message.join("; "));
    }
    out
}

/// Whether a ReferenceGrant in `to_ns` lets TLSRoutes of `from_ns` refer to Service `name`.
fn granted(objects: &Objects, from_ns: &str, to_ns: &str, name: &str) -> bool {
    objects.grants.iter().any(|g| {
        g.key.namespace == to_ns
            && g.spec.as_ref().is_ok_and(|s| {
                s.from
                    .iter()
                    .any(|f| f.group == GROUP && f.kind == TLS_ROUTE && f.namespace == from_ns)
                    && s.to.iter().any(|t| {
                        t.group.is_empty()
                            && t.kind == "Service"
                            && t.name.as_deref().is_none_or(|n| n == name)
                    })
            })
    })
}

fn route_of(name: String, hosts: Vec<String>, b: Backends) -> config::Route {
    config::Route {
        name,
        hosts,
        destination: None,
        proxy_destinations: Vec::new(),
        backends: b.addrs,
        weights: b.weights,
        refused_weight: b.refused,
        send_proxy_protocol: SendProxyProtocol::default(),
        max_connections: None,
        max_connection_lifetime: None,
        max_connection_lifetime_jitter: std::time::Duration::ZERO,
        keepalive: None,
        on_change: OnChange::default(),
        drain_delay: config::DEFAULT_DRAIN_DELAY,
    }
}

/// A Gateway's status from its judged listeners.
fn gateway_status(spec: &GatewaySpec, listeners: &[OurListener<'_>]) -> GatewayStatus {
    let conflicts = listener_conflicts(spec);
    let mut out = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let accepted = listener_accepted(l.spec);
        let (kinds, invalid_kinds) = supported_kinds(l.spec);
        let selector = from_namespaces(l.spec) == "Selector";
        let mut conditions = Vec::new();
        conditions.push(match (&accepted, selector) {
            (Some((reason, _, message)), _) => {
                Condition::new("Accepted", false, reason, message.clone())
            }
            (None, true) => Condition::new(
                "Accepted",
                false,
                "UnsupportedValue",
                "allowedRoutes.namespaces.from: Selector is not served by sni-proxy",
            ),
            (None, false) => Condition::new("Accepted", true, "Accepted", "TLS passthrough"),
        });
        conditions.push(if l.served {
            Condition::new(
                "Programmed",
                true,
                "Programmed",
                "in the route table of every replica",
            )
        } else {
            Condition::new("Programmed", false, "Invalid", "not served")
        });
        conditions.push(if invalid_kinds {
            Condition::new(
                "ResolvedRefs",
                false,
                "InvalidRouteKinds",
                "allowedRoutes.kinds: only gateway.networking.k8s.io/TLSRoute is served",
            )
        } else {
            Condition::new("ResolvedRefs", true, "ResolvedRefs", "")
        });
        conditions.push(match &conflicts[i] {
            Some((reason, message)) => Condition::new("Conflicted", true, reason, message.clone()),
            None => Condition::new("Conflicted", false, "NoConflicts", ""),
        });
        out.push(ListenerStatus {
            name: l.spec.name.clone(),
            supported_kinds: kinds,
            attached_routes: l.attached,
            conditions,
        });
    }
    let served = listeners.iter().filter(|l| l.served).count();
    let all = listeners.len();
    let accepted = if served == all && all > 0 {
        Condition::new("Accepted", true, "Accepted", "every listener is served")
    } else if served > 0 {
        Condition::new(
            "Accepted",
            true,
            "ListenersNotValid",
            format!("{} of {all} listeners are not served", all - served),
        )
    } else {
        Condition::new(
            "Accepted",
            false,
            "ListenersNotValid",
            "no listener is served",
        )
    };
    let programmed = if served > 0 {
        Condition::new(
            "Programmed",
            true,
            "Programmed",
            "in the route table of every replica",
        )
    } else {
        Condition::new("Programmed", false, "Invalid", "no listener is served")
    };
    GatewayStatus {
        conditions: vec![accepted, programmed],
        listeners: out,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::kube::services::tests::{service, slice};

    fn settings() -> Settings {
        Settings {
            gateway_class: "sni-proxy".into(),
            controller_name: "gardener.cloud/sni-proxy".into(),
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

    /// Our class, a Gateway `gw/gw` with `listeners`, and Services `a` (10.0.0.1, .2) and `b`
    /// (10.0.1.1) in `apps`, port 443 → 6443.
    fn world(listeners: serde_json::Value) -> (Objects, Services) {
        let objects = Objects {
            classes: vec![
                object(
                    "",
                    "sni-proxy",
                    0,
                    serde_json::json!({"controllerName": "gardener.cloud/sni-proxy"}),
                ),
                object(
                    "",
                    "other",
                    0,
                    serde_json::json!({"controllerName": "example.com/other"}),
                ),
            ],
            gateways: vec![
                object(
                    "gw",
                    "gw",
                    0,
                    serde_json::json!({"gatewayClassName": "sni-proxy", "listeners": listeners}),
                ),
                object(
                    "gw",
                    "theirs",
                    0,
                    serde_json::json!({"gatewayClassName": "other", "listeners": [
                    {"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"}, "allowedRoutes": {"namespaces": {"from": "All"}}}]}),
                ),
            ],
            ..Objects::default()
        };
        let services = Services::new(
            &[
                service("apps", "a", &[("https", 443)]),
                service("apps", "b", &[("https", 443)]),
                service("apps", "empty", &[("https", 443)]),
            ],
            &[
                slice(
                    "apps",
                    "a-1",
                    "a",
                    &[("https", 6443)],
                    &[("10.0.0.1", None), ("10.0.0.2", None)],
                ),
                slice(
                    "apps",
                    "b-1",
                    "b",
                    &[("https", 6443)],
                    &[("10.0.1.1", None)],
                ),
            ],
        );
        (objects, services)
    }

    fn passthrough(name: &str, hostname: Option<&str>, from: &str) -> serde_json::Value {
        let mut l = serde_json::json!({"name": name, "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"},
            "allowedRoutes": {"namespaces": {"from": from}}});
        if let Some(h) = hostname {
            l["hostname"] = h.into();
        }
        l
    }

    fn tls_route(
        ns: &str,
        name: &str,
        created: i64,
        hostnames: &[&str],
        backends: serde_json::Value,
    ) -> Object<TlsRouteSpec> {
        object(
            ns,
            name,
            created,
            serde_json::json!({
                "parentRefs": [{"group": GROUP, "kind": "Gateway", "namespace": "gw", "name": "gw"}],
                "hostnames": hostnames, "rules": [{"backendRefs": backends}]
            }),
        )
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn condition<'a>(conditions: &'a [Condition], kind: &str) -> &'a Condition {
        conditions.iter().find(|c| c.kind == kind).unwrap()
    }

    #[test]
    fn weighted_backends_split_over_endpoints_and_an_invalid_one_keeps_its_share() {
        let (mut objects, services) = world(serde_json::json!([passthrough(
            "tls",
            Some("*.example.com"),
            "All"
        )]));
        objects.routes.push(tls_route(
            "apps",
            "r",
            0,
            &["foo.example.com", "foo.example.net"],
            serde_json::json!([
                {"name": "a", "port": 443, "weight": 3},
                {"name": "b", "port": 443},
                {"name": "gone", "port": 443, "weight": 2},
                {"name": "b", "port": 443, "weight": 0}
            ]),
        ));
        let t = translate(&settings(), &objects, &services);
        assert_eq!(t.routes.len(), 1);
        let r = &t.routes[0];
        assert_eq!(r.name, "gateway:apps/r");
        // The listener's *.example.com keeps foo.example.com only.
        assert_eq!(r.hosts, ["foo.example.com"]);
        let addrs: Vec<SocketAddr> = [
            "10.0.0.1:6443",
            "10.0.0.2:6443",
            "10.0.1.1:6443",
            "10.0.1.1:6443",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(
            r.backends,
            addrs.into_iter().map(BackendAddr::Ip).collect::<Vec<_>>()
        );
        // a: 3 over two endpoints; b: 1; the second b: weight 0; gone: 2, refused.
        assert_eq!(r.weights, [384, 384, 256, 0]);
        assert_eq!(r.refused_weight, 512);
        let parents = &t.status.routes[&key("apps", "r")];
        assert_eq!(parents.len(), 1);
        assert_eq!(
            condition(&parents[0].conditions, "Accepted").reason,
            "Accepted"
        );
        let resolved = condition(&parents[0].conditions, "ResolvedRefs");
        assert!(!resolved.status);
        assert_eq!(resolved.reason, "BackendNotFound");
        assert!(
            resolved.message.contains("backendRefs[2]"),
            "{}",
            resolved.message
        );
        assert_eq!(t.skips.len(), 1);
        assert_eq!(
            (t.skips[0].kind, t.skips[0].reason),
            (Kind::TlsRoute, Reason::ServiceNotFound)
        );
        let gw = &t.status.gateways[&key("gw", "gw")];
        assert_eq!(gw.listeners[0].attached_routes, 1);
        assert!(condition(&gw.conditions, "Accepted").status);
        assert!(condition(&gw.conditions, "Programmed").status);
        // Not ours: the other class's Gateway has no status from us.
        assert!(!t.status.gateways.contains_key(&key("gw", "theirs")));
        assert_eq!(t.status.classes.keys().collect::<Vec<_>>(), ["sni-proxy"]);
    }

    #[test]
    fn hostnames_intersect_as_the_spec_says() {
        let h = |l: Option<&str>, r: &[&str]| {
            intersect(l, &r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(
            h(Some("*.example.com"), &["foo.example.com"]),
            ["foo.example.com"]
        );
        assert_eq!(
            h(Some("foo.example.com"), &["*.example.com"]),
            ["foo.example.com"]
        );
        assert_eq!(h(None, &["a.test", "*.b.test"]), ["a.test", "*.b.test"]);
        assert_eq!(
            h(Some("*.example.com"), &["*.a.example.com"]),
            ["*.a.example.com"]
        );
        assert_eq!(
            h(Some("*.a.example.com"), &["*.example.com"]),
            ["*.a.example.com"]
        );
        assert_eq!(
            h(Some("*.example.com"), &["x.y.example.com"]),
            ["x.y.example.com"]
        );
        assert!(h(Some("*.example.com"), &["example.com", "test.example.net"]).is_empty());
        assert!(h(Some("foo.example.com"), &["bar.example.com"]).is_empty());
        assert_eq!(h(Some("foo.example.com"), &[]), ["foo.example.com"]);
    }

    #[test]
    fn route_rejections_carry_the_specs_reasons() {
        let (mut objects, services) = world(serde_json::json!([
            passthrough("same", Some("*.example.com"), "Same"),
            {"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}
        ]));
        let b = serde_json::json!([{"name": "a", "port": 443}]);
        // Another namespace, only a `Same` listener: not allowed.
        objects.routes.push(tls_route(
            "apps",
            "other-ns",
            0,
            &["x.example.com"],
            b.clone(),
        ));
        // Same namespace as the Gateway but no hostname in common.
        objects
            .routes
            .push(tls_route("gw", "no-host", 1, &["x.example.net"], b.clone()));
        // A listener name that does not exist.
        let mut r = tls_route("gw", "no-parent", 2, &["x.example.com"], b.clone());
        r.spec.as_mut().unwrap().parent_refs[0].section_name = Some("nope".into());
        objects.routes.push(r);
        // The HTTP listener by name: it takes no TLSRoute.
        let mut r = tls_route("gw", "http", 3, &["x.example.com"], b.clone());
        r.spec.as_mut().unwrap().parent_refs[0].section_name = Some("http".into());
        objects.routes.push(r);
        // Attached fine; its port selects the listener.
        let mut r = tls_route("gw", "ok", 4, &["x.example.com"], b);
        r.spec.as_mut().unwrap().parent_refs[0].port = Some(443);
        objects.routes.push(r);
        let t = translate(&settings(), &objects, &services);
        let reason = |name: &str| {
            let c = condition(
                &t.status.routes[&key(if name == "other-ns" { "apps" } else { "gw" }, name)][0]
                    .conditions,
                "Accepted",
            );
            (c.status, c.reason)
        };
        assert_eq!(reason("other-ns"), (false, "NotAllowedByListeners"));
        assert_eq!(reason("no-host"), (false, "NoMatchingListenerHostname"));
        assert_eq!(reason("no-parent"), (false, "NoMatchingParent"));
        assert_eq!(
            reason("http"),
            (false, "UnsupportedValue"),
            "not a TLS listener"
        );
        assert_eq!(reason("ok"), (true, "Accepted"));
        assert_eq!(
            t.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["gateway:gw/ok"]
        );
        let gw = &t.status.gateways[&key("gw", "gw")];
        assert_eq!(gw.listeners[0].attached_routes, 1);
        let http = &gw.listeners[1];
        assert_eq!(
            (
                condition(&http.conditions, "Accepted").status,
                condition(&http.conditions, "Accepted").reason
            ),
            (false, "UnsupportedProtocol")
        );
        assert!(http.supported_kinds.is_empty());
        assert_eq!(
            condition(&gw.conditions, "Accepted").reason,
            "ListenersNotValid"
        );
        assert!(
            condition(&gw.conditions, "Accepted").status,
            "one listener is served"
        );
        let skipped: BTreeSet<Reason> = t.skips.iter().map(|s| s.reason).collect();
        for r in [
            Reason::UnsupportedProtocol,
            Reason::NotAllowedByListeners,
            Reason::NoMatchingListenerHostname,
            Reason::NoMatchingParent,
        ] {
            assert!(skipped.contains(&r), "{r:?} in {skipped:?}");
        }
    }

    #[test]
    fn cross_namespace_backends_need_a_grant_and_kinds_must_be_services() {
        let (mut objects, services) = world(serde_json::json!([passthrough("tls", None, "All")]));
        objects.routes.push(tls_route(
            "gw",
            "r",
            0,
            &["r.test"],
            serde_json::json!([
                {"name": "a", "namespace": "apps", "port": 443},
                {"group": "example.com", "kind": "Bucket", "name": "x", "port": 443}
            ]),
        ));
        let t = translate(&settings(), &objects, &services);
        let c = condition(
            &t.status.routes[&key("gw", "r")][0].conditions,
            "ResolvedRefs",
        )
        .clone();
        assert_eq!((c.status, c.reason), (false, "RefNotPermitted"));
        assert!(
            c.message.contains("Bucket"),
            "every failure is in the message: {}",
            c.message
        );
        // Everything refused: no backend resolved.
        assert!(t.routes[0].backends.is_empty());
        assert_eq!(t.routes[0].refused_weight, 2 * 256);
        // A grant in `apps` for TLSRoutes of `gw`.
        objects.grants.push(object(
            "apps",
            "g",
            0,
            serde_json::json!({
                "from": [{"group": GROUP, "kind": TLS_ROUTE, "namespace": "gw"}],
                "to": [{"group": "", "kind": "Service", "name": "a"}]
            }),
        ));
        let t = translate(&settings(), &objects, &services);
        let c = condition(
            &t.status.routes[&key("gw", "r")][0].conditions,
            "ResolvedRefs",
        )
        .clone();
        assert_eq!((c.status, c.reason), (false, "InvalidKind"));
        assert_eq!(t.routes[0].backends.len(), 2);
    }

    #[test]
    fn the_oldest_route_keeps_a_host_and_only_our_class_is_served() {
        let (mut objects, services) = world(serde_json::json!([passthrough("tls", None, "All")]));
        let b = serde_json::json!([{"name": "a", "port": 443}]);
        objects.routes.push(tls_route(
            "apps",
            "new",
            5,
            &["x.test", "y.test"],
            b.clone(),
        ));
        objects
            .routes
            .push(tls_route("apps", "old", 1, &["x.test"], b.clone()));
        let t = translate(&settings(), &objects, &services);
        assert_eq!(
            t.conflicts,
            [Conflict {
                host: "x.test".into(),
                winner: "gateway:apps/old".into(),
                loser: "gateway:apps/new".into()
            }]
        );
        assert_eq!(t.routes[0].hosts, ["y.test"]);
        assert_eq!(t.routes[1].hosts, ["x.test"]);
        // The class names another controller: nothing is ours, nothing is written.
        let mut other = settings();
        other.controller_name = "example.com/else".into();
        let t = translate(&other, &objects, &services);
        assert!(t.routes.is_empty() && t.status == Status::default());
        // Parameters are not taken: the class is not accepted and nothing is served.
        let mut with_parameters = Objects {
            classes: vec![object(
                "",
                "sni-proxy",
                0,
                serde_json::json!({"controllerName": "gardener.cloud/sni-proxy",
                "parametersRef": {"group": "", "kind": "ConfigMap", "name": "x", "namespace": "gw"}}),
            )],
            ..Objects::default()
        };
        with_parameters.gateways = std::mem::take(&mut objects.gateways);
        with_parameters.routes = std::mem::take(&mut objects.routes);
        let t = translate(&settings(), &with_parameters, &services);
        assert!(t.routes.is_empty() && t.status.gateways.is_empty());
        let c = &t.status.classes["sni-proxy"][0];
        assert_eq!((c.status, c.reason), (false, "InvalidParameters"));
        objects.gateways = with_parameters.gateways;
        objects.routes = with_parameters.routes;
        // A route attached only to another class's Gateway gets no status from us.
        let mut r = tls_route("apps", "theirs", 0, &["t.test"], b);
        r.spec.as_mut().unwrap().parent_refs[0].name = "theirs".into();
        objects.routes.push(r);
        let t = translate(&settings(), &objects, &services);
        assert!(!t.status.routes.contains_key(&key("apps", "theirs")));
    }

    #[test]
    fn unsupported_listeners_are_reported_and_not_served() {
        let (mut objects, services) = world(serde_json::json!([
            {"name": "term", "port": 443, "protocol": "TLS", "tls": {"mode": "Terminate"}, "hostname": "t.test"},
            {"name": "sel", "port": 8443, "protocol": "TLS", "tls": {"mode": "Passthrough"}, "allowedRoutes": {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"a": "b"}}}}},
            {"name": "kinds", "port": 9443, "protocol": "TLS", "tls": {"mode": "Passthrough"}, "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}},
            passthrough("dup1", Some("d.test"), "Same"),
            {"name": "dup2", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"}, "hostname": "d.test"}
        ]));
        objects.routes.push(tls_route(
            "gw",
            "r",
            0,
            &["d.test", "t.test"],
            serde_json::json!([{"name": "a", "namespace": "apps", "port": 443}]),
        ));
        let t = translate(&settings(), &objects, &services);
        assert!(t.routes.is_empty());
        let gw = &t.status.gateways[&key("gw", "gw")];
        let get = |i: usize, kind: &str| {
            let c = condition(&gw.listeners[i].conditions, kind);
            (c.status, c.reason)
        };
        assert_eq!(get(0, "Accepted"), (false, "UnsupportedValue"));
        assert_eq!(get(1, "Accepted"), (false, "UnsupportedValue"));
        assert_eq!(get(2, "ResolvedRefs"), (false, "InvalidRouteKinds"));
        assert_eq!(get(3, "Conflicted"), (true, "HostnameConflict"));
        assert_eq!(get(0, "Conflicted"), (false, "NoConflicts"));
        assert_eq!(get(3, "Programmed"), (false, "Invalid"));
        // Only `kinds` is served (accepted, though it takes no TLSRoute).
        assert_eq!(
            condition(&gw.conditions, "Accepted"),
            &Condition::new(
                "Accepted",
                true,
                "ListenersNotValid",
                "4 of 5 listeners are not served"
            )
        );
        assert_eq!(get(2, "Programmed"), (true, "Programmed"));
        let reasons: BTreeSet<Reason> = t
            .skips
            .iter()
            .filter(|s| s.kind == Kind::ApiGateway)
            .map(|s| s.reason)
            .collect();
        assert_eq!(
            reasons,
            [
                Reason::TlsTermination,
                Reason::NamespaceSelector,
                Reason::InvalidRouteKinds,
                Reason::ListenerConflict
            ]
            .into_iter()
            .collect()
        );
    }
}
