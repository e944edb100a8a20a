//! Routes from the Kubernetes API server: the objects gardenlet writes for each shoot (Istio's
//! `Gateway`, `VirtualService` and `DestinationRule`, resolved through `Service`s and their
//! `EndpointSlice`s), the Gateway API's `TLSRoute`s on our `Gateway`s, and the CONNECT
//! destinations of Gardener's `X-Gardener-Destination` header. The translation is pure
//! ([`istio`], [`gateway_api`], [`connect`], [`services`]); [`watch`] keeps
//! reflectors of the objects and hands each new translation to the proxy, which merges it with
//! the static routes of its file (static names and hosts win).

pub mod connect;
pub mod gateway_api;
pub mod gateway_watch;
pub mod istio;
pub mod lease;
pub mod objects;
pub mod services;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod watch;

use std::cmp::Ordering;

/// A namespaced object's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object with its spec parsed (or why it could not be).
#[derive(Debug, Clone)]
pub struct Object<S> {
    /// Its name.
    pub key: ObjectKey,
    /// Its creation time (Unix seconds), for "the oldest wins".
    pub created: Option<i64>,
    /// The spec, or the parse error.
    pub spec: Result<S, String>,
}

impl<S> Object<S> {
    /// Oldest first; ties (and unknown times) by namespace and name.
    pub fn age_order(&self, other: &Self) -> Ordering {
        let time = |o: &Self| o.created.unwrap_or(i64::MAX);
        time(self)
            .cmp(&time(other))
            .then_with(|| self.key.cmp(&other.key))
    }
}

/// The kinds the proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// networking.istio.io `Gateway`.
    Gateway,
    /// networking.istio.io `VirtualService`.
    VirtualService,
    /// networking.istio.io `DestinationRule`.
    DestinationRule,
    /// core `Service`.
    Service,
    /// discovery.k8s.io `EndpointSlice`.
    EndpointSlice,
    /// gateway.networking.k8s.io `GatewayClass`.
    GatewayClass,
    /// gateway.networking.k8s.io `Gateway` (labelled with its group: Istio's is `Gateway`).
    ApiGateway,
    /// gateway.networking.k8s.io `TLSRoute`.
    TlsRoute,
    /// gateway.networking.k8s.io `ReferenceGrant`.
    ReferenceGrant,
}

impl Kind {
    /// Every kind, for metrics.
    pub const ALL: [Kind; 9] = [
        Kind::Gateway,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::GatewayClass,
        Kind::ApiGateway,
        Kind::TlsRoute,
        Kind::ReferenceGrant,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "Gateway",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::GatewayClass => "GatewayClass",
            Kind::ApiGateway => "Gateway.gateway.networking.k8s.io",
            Kind::TlsRoute => "TLSRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }
}

/// Why (part of) an object is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The spec does not parse.
    InvalidSpec,
    /// A Gateway server that terminates TLS (HTTPS, `SIMPLE`, `MUTUAL`, ...).
    TlsTermination,
    /// A Gateway server with another protocol (HTTP, TCP, ...).
    UnsupportedProtocol,
    /// A VirtualService's `http` routes.
    HttpRoutes,
    /// A VirtualService's `tcp` routes.
    TcpRoutes,
    /// A match by `destinationSubnets` or `sourceLabels`.
    UnsupportedMatch,
    /// A VirtualService not exported to the proxy's namespace.
    NotExported,
    /// An SNI host that is not a host name.
    InvalidHost,
    /// An SNI host outside the VirtualService's `hosts`.
    HostNotInVirtualService,
    /// An SNI host no bound Gateway server admits.
    HostNotInGateway,
    /// A destination with a `subset`.
    Subset,
    /// A destination that is no Service of this cluster.
    ExternalHost,
    /// A destination Service that does not exist.
    ServiceNotFound,
    /// A destination port the Service does not have.
    ServicePortNotFound,
    /// A Gateway API listener whose `allowedRoutes.namespaces.from` is `Selector` (not served).
    NamespaceSelector,
    /// A Gateway API listener whose `allowedRoutes.kinds` names no kind but TLSRoute's.
    InvalidRouteKinds,
    /// Gateway API listeners on one port that conflict (hostname or protocol).
    ListenerConflict,
    /// A TLSRoute parentRef that names no listener of the Gateway (`sectionName`, `port`).
    NoMatchingParent,
    /// A TLSRoute whose namespace or kind no listener of its parent admits.
    NotAllowedByListeners,
    /// A TLSRoute whose hostnames do not meet any admitting listener's hostname.
    NoMatchingListenerHostname,
    /// A backendRef to a kind other than a core Service.
    InvalidKind,
    /// A cross-namespace backendRef without a ReferenceGrant in the target namespace.
    RefNotPermitted,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Reason; 22] = [
        Reason::InvalidSpec,
        Reason::TlsTermination,
        Reason::UnsupportedProtocol,
        Reason::HttpRoutes,
        Reason::TcpRoutes,
        Reason::UnsupportedMatch,
        Reason::NotExported,
        Reason::InvalidHost,
        Reason::HostNotInVirtualService,
        Reason::HostNotInGateway,
        Reason::Subset,
        Reason::ExternalHost,
        Reason::ServiceNotFound,
        Reason::ServicePortNotFound,
        Reason::NamespaceSelector,
        Reason::InvalidRouteKinds,
        Reason::ListenerConflict,
        Reason::NoMatchingParent,
        Reason::NotAllowedByListeners,
        Reason::NoMatchingListenerHostname,
        Reason::InvalidKind,
        Reason::RefNotPermitted,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidSpec => "invalid_spec",
            Reason::TlsTermination => "tls_termination",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::HttpRoutes => "http_routes",
            Reason::TcpRoutes => "tcp_routes",
            Reason::UnsupportedMatch => "unsupported_match",
            Reason::NotExported => "not_exported",
            Reason::InvalidHost => "invalid_host",
            Reason::HostNotInVirtualService => "host_not_in_virtualservice",
            Reason::HostNotInGateway => "host_not_in_gateway",
            Reason::Subset => "subset",
            Reason::ExternalHost => "external_host",
            Reason::ServiceNotFound => "service_not_found",
            Reason::ServicePortNotFound => "service_port_not_found",
            Reason::NamespaceSelector => "namespace_selector",
            Reason::InvalidRouteKinds => "invalid_route_kinds",
            Reason::ListenerConflict => "listener_conflict",
            Reason::NoMatchingParent => "no_matching_parent",
            Reason::NotAllowedByListeners => "not_allowed_by_listeners",
            Reason::NoMatchingListenerHostname => "no_matching_listener_hostname",
            Reason::InvalidKind => "invalid_kind",
            Reason::RefNotPermitted => "ref_not_permitted",
        }
    }
}

/// Something not served, with the object, the reason and the details for the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Skip {
    /// The object's kind.
    pub kind: Kind,
    /// The object.
    pub key: ObjectKey,
    /// Why.
    pub reason: Reason,
    /// The field and what is wrong with it.
    pub detail: String,
}

/// An SNI host claimed by two routes: the older keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conflict {
    /// The host.
    pub host: String,
    /// The route that has it.
    pub winner: String,
    /// The route that does not.
    pub loser: String,
}

/// Which kind a spec type is.
pub trait KindOf {
    /// Its kind.
    const KIND: Kind;
}

impl KindOf for objects::GatewaySpec {
    const KIND: Kind = Kind::Gateway;
}
impl KindOf for objects::VirtualServiceSpec {
    const KIND: Kind = Kind::VirtualService;
}
impl KindOf for objects::DestinationRuleSpec {
    const KIND: Kind = Kind::DestinationRule;
}

impl<S: KindOf> Object<S> {
    /// A skip of this object.
    pub fn skip(&self, reason: Reason, detail: impl Into<String>) -> Skip {
        Skip {
            kind: S::KIND,
            key: self.key.clone(),
            reason,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::metrics::tests::documented;

    #[test]
    fn docs_list_exactly_the_kinds_and_reasons() {
        let kinds: BTreeSet<String> = Kind::ALL.iter().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(documented("sni_proxy_kubernetes_objects"), kinds);
        let reasons: BTreeSet<String> = Reason::ALL.iter().map(|r| r.as_str().to_owned()).collect();
        assert_eq!(documented("sni_proxy_kubernetes_skipped"), reasons);
    }
}
