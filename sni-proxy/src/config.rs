//! The configuration file: raw serde types (every field documented in `docs/sni-proxy.md`),
//! validated into [`Config`], a runtime type with no optional-but-required fields. Every
//! validation error names the field, like `routes[1].hosts[0]: ...`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentkit::config::{duration, opt_duration, ConfigError};
use ipnet::IpNet;
use serde::Deserialize;

use crate::protocol::client_hello::MAX_CLIENT_HELLO_BYTES;

/// Default cap on concurrent connections over all listeners.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default time a client has to send its ClientHello / CONNECT / PROXY header.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of one backend connect attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout (no bytes either way).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default grace period for open connections on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default TCP keepalive idle time before the first probe.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Default interval between TCP keepalive probes.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default number of unanswered keepalive probes before the kernel drops the connection.
pub const DEFAULT_KEEPALIVE_RETRIES: u32 = 5;
/// Default consecutive connect failures that eject a backend.
pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 3;
/// Default probe interval of an ejected backend.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Default delay before the connections of a removed `on_change: drain` route are closed.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(300);
/// Default interval at which the config file is checked for changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Smallest accepted `max_client_hello_bytes`.
pub const MIN_CLIENT_HELLO_BYTES: usize = 512;

// === raw file types ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: RawAdmin,
    listeners: Vec<RawListener>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default = "default_unknown_sni")]
    unknown_sni: String,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    keepalive: RawKeepalive,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    access_log: bool,
    #[serde(default = "default_reload_interval", with = "duration")]
    reload_interval: Duration,
    #[serde(default)]
    allow_sockmap_on_untrusted_kernel: bool,
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    istio: Option<RawIstio>,
    #[serde(default)]
    gateway_api: Option<RawGatewayApi>,
    #[serde(default)]
    connect_allow: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIstio {
    selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayApi {
    gateway_class: String,
    controller_name: String,
}

fn default_unknown_sni() -> String {
    "reject".into()
}
fn default_reload_interval() -> Duration {
    DEFAULT_RELOAD_INTERVAL
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    address: SocketAddr,
    mode: Mode,
    #[serde(default)]
    proxy_protocol: ProxyProtocolMode,
    #[serde(default)]
    trusted_proxies: Vec<IpNet>,
    #[serde(default)]
    data_path: DataPathChoice,
    #[serde(default = "default_max_hello")]
    max_client_hello_bytes: usize,
}

fn default_max_hello() -> usize {
    MAX_CLIENT_HELLO_BYTES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    proxy_destinations: Vec<SocketAddr>,
    backends: Vec<String>,
    #[serde(default)]
    send_proxy_protocol: SendProxyProtocol,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default, with = "opt_duration")]
    max_connection_lifetime: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    max_connection_lifetime_jitter: Option<Duration>,
    #[serde(default)]
    on_change: OnChange,
    #[serde(default, with = "opt_duration")]
    drain_delay: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_connections: usize,
    max_connections_per_source: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    #[serde(with = "duration")]
    handshake: Duration,
    #[serde(with = "duration")]
    connect: Duration,
    #[serde(with = "duration")]
    idle: Duration,
    #[serde(with = "duration")]
    shutdown_grace: Duration,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKeepalive {
    #[serde(with = "duration")]
    time: Duration,
    #[serde(with = "duration")]
    interval: Duration,
    retries: u32,
}

impl Default for RawKeepalive {
    fn default() -> Self {
        RawKeepalive {
            time: DEFAULT_KEEPALIVE_TIME,
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            retries: DEFAULT_KEEPALIVE_RETRIES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    eject_after_failures: u32,
    #[serde(with = "duration")]
    probe_interval: Duration,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

// === runtime types ===

/// How a listener picks the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// By the SNI of the TLS ClientHello.
    Tls,
    /// By the `X-Gardener-Destination` header of an HTTP CONNECT request.
    HttpConnect,
}

/// Whether a listener reads a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocolMode {
    /// Never: the stream starts with the payload.
    #[default]
    Off,
    /// If the stream starts with one (from a trusted source).
    Optional,
    /// Always: connections without one are closed.
    Required,
}

/// Which data path relays the bytes after routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPathChoice {
    /// Userspace copy through a 32 KiB buffer per direction.
    Copy,
    /// splice(2) through a pipe per direction: no copy into userspace.
    Splice,
    /// An eBPF sockmap redirects each socket's bytes to its peer inside the kernel; falls back
    /// to splice, then copy, where the kernel is too old or not trusted (see
    /// `allow_sockmap_on_untrusted_kernel`), the program cannot be loaded, or the start-up
    /// self-test fails.
    Sockmap,
    /// What this kernel does best (see `datapath::AUTO`).
    #[default]
    Auto,
}

/// Whether a route sends a PROXY header to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SendProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// A PROXY v2 header with the SNI as `PP2_TYPE_AUTHORITY`.
    V2,
}

/// What happens to a route's open connections when a reload removes or changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnChange {
    /// They stay until they end by themselves.
    #[default]
    Keep,
    /// They are closed after the route's drain delay.
    Drain,
    /// They are closed at once.
    Close,
}

/// What a ClientHello with an unknown (or no) SNI gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownSni {
    /// A fatal TLS alert `unrecognized_name`, then close.
    Reject,
    /// Close without a word.
    Close,
    /// The named route.
    Route(String),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The admin server address.
    pub admin: SocketAddr,
    /// The listeners, in file order.
    pub listeners: Vec<Listener>,
    /// The routes, in file order.
    pub routes: Vec<Route>,
    /// What unknown SNIs get.
    pub unknown_sni: UnknownSni,
    /// Global connection cap.
    pub max_connections: usize,
    /// Per-source-IP cap; `None` means no cap.
    pub max_connections_per_source: Option<usize>,
    /// Deadline for the first bytes (ClientHello, CONNECT, PROXY header).
    pub handshake_timeout: Duration,
    /// Per-attempt backend connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout; `None` means off.
    pub idle_timeout: Option<Duration>,
    /// Grace period on SIGTERM.
    pub shutdown_grace: Duration,
    /// TCP keepalive on both legs.
    pub keepalive: Keepalive,
    /// Passive health settings.
    pub eject_after_failures: u32,
    /// Probe interval of ejected backends.
    pub probe_interval: Duration,
    /// Whether to log a line per finished connection.
    pub access_log: bool,
    /// How often the file is checked for changes.
    pub reload_interval: Duration,
    /// Whether `data_path: sockmap` may run on a kernel not in
    /// `ebpf::sockmap::TRUSTED_KERNELS` (for measurement and kernel testing only).
    pub allow_sockmap_on_untrusted_kernel: bool,
    /// Routes from the Kubernetes API server, merged with `routes`.
    pub kubernetes: Option<Kubernetes>,
}

/// Where routes from Kubernetes come from (`kubernetes:` in the file).
#[derive(Debug, Clone)]
pub struct Kubernetes {
    /// The kubeconfig; None is the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    /// The proxy's namespace, for `exportTo`; None is the kubeconfig's or the pod's.
    pub namespace: Option<String>,
    /// Istio's objects: Gateways whose `spec.selector` equals this are served.
    pub istio_selector: Option<BTreeMap<String, String>>,
    /// The Gateway API: the GatewayClass served and the controller name its status is
    /// written as.
    pub gateway_api: Option<crate::kube::gateway_api::Settings>,
    /// The `X-Gardener-Destination` values that may name a Service.
    pub connect_allow: regex::Regex,
}

impl PartialEq for Kubernetes {
    fn eq(&self, other: &Self) -> bool {
        self.kubeconfig == other.kubeconfig
            && self.namespace == other.namespace
            && self.istio_selector == other.istio_selector
            && self.gateway_api == other.gateway_api
            && self.connect_allow.as_str() == other.connect_allow.as_str()
    }
}

/// TCP keepalive settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Probes before the connection is dropped.
    pub retries: u32,
}

/// A validated listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Bind address.
    pub address: SocketAddr,
    /// Routing mode.
    pub mode: Mode,
    /// PROXY protocol receive mode.
    pub proxy_protocol: ProxyProtocolMode,
    /// Sources whose PROXY headers are honoured.
    pub trusted_proxies: Vec<IpNet>,
    /// Data path choice.
    pub data_path: DataPathChoice,
    /// ClientHello size cap.
    pub max_client_hello_bytes: usize,
}

/// A backend address: an IP literal, or a DNS name resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A host name and port (a Kubernetes Service name, say).
    Name(String, u16),
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Ip(a) => a.fmt(f),
            BackendAddr::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Normalised hosts: lowercase, no trailing dot; wildcards keep their `*.`.
    pub hosts: Vec<String>,
    /// `X-Gardener-Destination` value routed here.
    pub destination: Option<String>,
    /// PROXY destinations routed here.
    pub proxy_destinations: Vec<SocketAddr>,
    /// Backends.
    pub backends: Vec<BackendAddr>,
    /// Each backend's share of new connections (parallel to `backends`; 0 is none); empty
    /// when all are equal.
    pub weights: Vec<u32>,
    /// The share of new connections (in the unit of `weights`; with no weights, each backend
    /// counts 1) refused without trying any backend: a Gateway API backendRef that is invalid
    /// takes its weight's share of connections and refuses them. 0 in the file's routes.
    pub refused_weight: u32,
    /// PROXY header to backends.
    pub send_proxy_protocol: SendProxyProtocol,
    /// Route connection cap.
    pub max_connections: Option<usize>,
    /// Maximum connection lifetime.
    pub max_connection_lifetime: Option<Duration>,
    /// Random extra lifetime, up to this.
    pub max_connection_lifetime_jitter: Duration,
    /// TCP keepalive on the backend leg, instead of the global one (a DestinationRule's).
    pub keepalive: Option<Keepalive>,
    /// Policy for open connections when the route is removed or changed.
    pub on_change: OnChange,
    /// Delay of `OnChange::Drain`.
    pub drain_delay: Duration,
}

impl Config {
    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        validate(agentkit::config::parse(text)?)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        validate(agentkit::config::load(path)?)
    }
}

/// Lowercases a host name and strips one trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

pub(crate) fn check_host(field: &str, host: &str) -> Result<(), ConfigError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("`{host}` is not a host name (exact, or `*.` followed by a name)"),
        ))
    }
}

fn parse_backend(field: &str, text: &str) -> Result<BackendAddr, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(BackendAddr::Ip(addr));
    }
    let bad = || {
        ConfigError::invalid(
            field,
            format!("`{text}` is not an address: write ip:port, [ipv6]:port or host:port"),
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    check_host(field, host).map_err(|_| bad())?;
    if host.starts_with("*.") || port == 0 {
        return Err(bad());
    }
    Ok(BackendAddr::Name(normalize_host(host), port))
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    if raw.listeners.is_empty() {
        return Err(ConfigError::invalid(
            "listeners",
            "at least one listener is needed",
        ));
    }
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let f = |name: &str| format!("listeners[{i}].{name}");
        if l.name.is_empty() || !names.insert(l.name.clone()) {
            return Err(ConfigError::invalid(
                f("name"),
                format!("`{}` is empty or used twice", l.name),
            ));
        }
        // Port 0 (any free port, used by tests) cannot clash.
        if l.address.port() != 0 && !addresses.insert(l.address) {
            return Err(ConfigError::invalid(
                f("address"),
                format!("{} is used by another listener", l.address),
            ));
        }
        if l.proxy_protocol != ProxyProtocolMode::Off && l.trusted_proxies.is_empty() {
            return Err(ConfigError::invalid(
                f("trusted_proxies"),
                "must list the load balancers' source ranges when proxy_protocol is not off",
            ));
        }
        if !(MIN_CLIENT_HELLO_BYTES..=MAX_CLIENT_HELLO_BYTES).contains(&l.max_client_hello_bytes) {
            return Err(ConfigError::invalid(
                f("max_client_hello_bytes"),
                format!("must be between {MIN_CLIENT_HELLO_BYTES} and {MAX_CLIENT_HELLO_BYTES}"),
            ));
        }
        listeners.push(Listener {
            name: l.name,
            address: l.address,
            mode: l.mode,
            proxy_protocol: l.proxy_protocol,
            trusted_proxies: l.trusted_proxies,
            data_path: l.data_path,
            max_client_hello_bytes: l.max_client_hello_bytes,
        });
    }

    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut route_names = HashSet::new();
    let mut hosts_seen: HashMap<String, String> = HashMap::new();
    let mut destinations_seen: HashMap<String, String> = HashMap::new();
    let mut proxy_dst_seen: HashMap<SocketAddr, String> = HashMap::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let f = |name: &str| format!("routes[{i}].{name}");
        if r.name.is_empty() || !route_names.insert(r.name.clone()) {
            return Err(ConfigError::invalid(
                f("name"),
                format!("`{}` is empty or used twice", r.name),
            ));
        }
        let mut hosts = Vec::with_capacity(r.hosts.len());
        for (j, host) in r.hosts.iter().enumerate() {
            let field = format!("routes[{i}].hosts[{j}]");
            let host = normalize_host(host);
            check_host(&field, &host)?;
            if let Some(other) = hosts_seen.insert(host.clone(), r.name.clone()) {
                return Err(ConfigError::invalid(
                    field,
                    format!("`{host}` is already a host of route `{other}`"),
                ));
            }
            hosts.push(host);
        }
        // Header values are compared trimmed, so the configured value is trimmed too.
        let destination = r.destination.as_deref().map(|d| d.trim().to_owned());
        if let Some(d) = &destination {
            if d.is_empty() {
                return Err(ConfigError::invalid(f("destination"), "must not be empty"));
            }
            if let Some(other) = destinations_seen.insert(d.clone(), r.name.clone()) {
                return Err(ConfigError::invalid(
                    f("destination"),
                    format!("already the destination of route `{other}`"),
                ));
            }
        }
        for (j, d) in r.proxy_destinations.iter().enumerate() {
            if let Some(other) = proxy_dst_seen.insert(*d, r.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].proxy_destinations[{j}]"),
                    format!("{d} is already a destination of route `{other}`"),
                ));
            }
        }
        if r.backends.is_empty() {
            return Err(ConfigError::invalid(
                f("backends"),
                "at least one backend is needed",
            ));
        }
        let backends = r
            .backends
            .iter()
            .enumerate()
            .map(|(j, b)| parse_backend(&format!("routes[{i}].backends[{j}]"), b))
            .collect::<Result<Vec<_>, _>>()?;
        if r.max_connections == Some(0) {
            return Err(ConfigError::invalid(
                f("max_connections"),
                "0 would refuse everything; omit it for no cap",
            ));
        }
        if r.max_connection_lifetime == Some(Duration::ZERO) {
            return Err(ConfigError::invalid(
                f("max_connection_lifetime"),
                "must be positive; omit it for no limit",
            ));
        }
        if r.max_connection_lifetime_jitter.is_some() && r.max_connection_lifetime.is_none() {
            return Err(ConfigError::invalid(
                f("max_connection_lifetime_jitter"),
                "needs max_connection_lifetime",
            ));
        }
        if r.drain_delay.is_some() && r.on_change != OnChange::Drain {
            return Err(ConfigError::invalid(
                f("drain_delay"),
                "only applies with on_change: drain",
            ));
        }
        routes.push(Route {
            name: r.name,
            hosts,
            destination,
            proxy_destinations: r.proxy_destinations,
            backends,
            weights: Vec::new(),
            refused_weight: 0,
            send_proxy_protocol: r.send_proxy_protocol,
            max_connections: r.max_connections,
            max_connection_lifetime: r.max_connection_lifetime,
            max_connection_lifetime_jitter: r.max_connection_lifetime_jitter.unwrap_or_default(),
            keepalive: None,
            on_change: r.on_change,
            drain_delay: r.drain_delay.unwrap_or(DEFAULT_DRAIN_DELAY),
        });
    }

    let unknown_sni = match raw.unknown_sni.as_str() {
        "reject" => UnknownSni::Reject,
        "close" => UnknownSni::Close,
        name if route_names.contains(name) => UnknownSni::Route(name.to_owned()),
        other => {
            return Err(ConfigError::invalid(
                "unknown_sni",
                format!("`{other}` is neither reject, close nor a route name"),
            ))
        }
    };
    if raw.limits.max_connections == 0 {
        return Err(ConfigError::invalid(
            "limits.max_connections",
            "must be positive",
        ));
    }
    for (field, d) in [
        ("timeouts.handshake", raw.timeouts.handshake),
        ("timeouts.connect", raw.timeouts.connect),
        ("keepalive.time", raw.keepalive.time),
        ("keepalive.interval", raw.keepalive.interval),
        ("health.probe_interval", raw.health.probe_interval),
        ("reload_interval", raw.reload_interval),
    ] {
        if d.is_zero() {
            return Err(ConfigError::invalid(field, "must be positive"));
        }
    }
    if raw.keepalive.retries == 0 {
        return Err(ConfigError::invalid(
            "keepalive.retries",
            "must be positive",
        ));
    }
    if raw.health.eject_after_failures == 0 {
        return Err(ConfigError::invalid(
            "health.eject_after_failures",
            "must be positive",
        ));
    }
    Ok(Config {
        admin: raw.admin.address,
        listeners,
        routes,
        unknown_sni,
        max_connections: raw.limits.max_connections,
        max_connections_per_source: Some(raw.limits.max_connections_per_source).filter(|n| *n > 0),
        handshake_timeout: raw.timeouts.handshake,
        connect_timeout: raw.timeouts.connect,
        idle_timeout: Some(raw.timeouts.idle).filter(|d| !d.is_zero()),
        shutdown_grace: raw.timeouts.shutdown_grace,
        keepalive: Keepalive {
            time: raw.keepalive.time,
            interval: raw.keepalive.interval,
            retries: raw.keepalive.retries,
        },
        eject_after_failures: raw.health.eject_after_failures,
        probe_interval: raw.health.probe_interval,
        access_log: raw.access_log,
        reload_interval: raw.reload_interval,
        allow_sockmap_on_untrusted_kernel: raw.allow_sockmap_on_untrusted_kernel,
        kubernetes: raw.kubernetes.map(kubernetes).transpose()?,
    })
}

fn kubernetes(raw: RawKubernetes) -> Result<Kubernetes, ConfigError> {
    let pattern = raw
        .connect_allow
        .unwrap_or_else(|| crate::kube::connect::GARDENER_CONNECT_ALLOW.to_owned());
    let connect_allow = regex::Regex::new(&pattern)
        .map_err(|e| ConfigError::invalid("kubernetes.connect_allow", e.to_string()))?;
    if let Some(ns) = &raw.namespace {
        if ns.is_empty() {
            return Err(ConfigError::invalid(
                "kubernetes.namespace",
                "must not be empty",
            ));
        }
    }
    let istio_selector = match raw.istio {
        Some(i) if i.selector.is_empty() => {
            return Err(ConfigError::invalid(
                "kubernetes.istio.selector",
                "must name at least one label (an empty selector would match no Gateway)",
            ))
        }
        Some(i) => Some(i.selector),
        None => None,
    };
    let gateway_api = raw.gateway_api.map(gateway_api).transpose()?;
    Ok(Kubernetes {
        kubeconfig: raw.kubeconfig,
        namespace: raw.namespace,
        istio_selector,
        gateway_api,
        connect_allow,
    })
}

/// A GatewayClass name (a DNS subdomain: it also names the status Lease) and a controller
/// name as the GatewayClass CRD spells them (`domain/path`).
fn gateway_api(raw: RawGatewayApi) -> Result<crate::kube::gateway_api::Settings, ConfigError> {
    let subdomain = |s: &str| {
        !s.is_empty()
            && s.len() <= 200
            && s.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    };
    if !subdomain(&raw.gateway_class) {
        return Err(ConfigError::invalid(
            "kubernetes.gateway_api.gateway_class",
            format!(
                "`{}` is not a GatewayClass name (lowercase DNS labels, at most 200 characters)",
                raw.gateway_class
            ),
        ));
    }
    let valid_controller = raw
        .controller_name
        .split_once('/')
        .is_some_and(|(domain, path)| {
            subdomain(domain) && !path.is_empty() && raw.controller_name.len() <= 253
        });
    if !valid_controller {
        return Err(ConfigError::invalid(
            "kubernetes.gateway_api.controller_name",
            format!(
                "`{}` is not a controller name: write domain/path, e.g. gardener.cloud/sni-proxy",
                raw.controller_name
            ),
        ));
    }
    Ok(crate::kube::gateway_api::Settings {
        gateway_class: raw.gateway_class,
        controller_name: raw.controller_name,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The example of the issue and of `docs/sni-proxy.md`, also shipped as `sni-proxy/example.yaml`.
    const EXAMPLE: &str = include_str!("../example.yaml");

    #[test]
    fn example_is_valid() {
        let c = Config::from_yaml(EXAMPLE).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].proxy_protocol, ProxyProtocolMode::Optional);
        assert_eq!(c.listeners[1].mode, Mode::HttpConnect);
        assert_eq!(c.routes[0].hosts, vec!["api.s1.test", "*.s1.test"]);
        assert_eq!(c.routes[1].backends.len(), 2);
        assert_eq!(c.unknown_sni, UnknownSni::Reject);
    }

    fn err(text: &str) -> String {
        Config::from_yaml(text).unwrap_err().to_string()
    }

    const BASE: &str =
        "admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls}]\n";

    #[test]
    fn errors_name_the_field() {
        let e = err(&format!(
            "{BASE}routes: [{{name: a, hosts: [x.test], backends: [nope]}}]"
        ));
        assert!(e.starts_with("routes[0].backends[0]:"), "{e}");
        let e = err(&format!(
            "{BASE}routes: [{{name: a, hosts: [x.test, 'bad host'], backends: [1.2.3.4:5]}}]"
        ));
        assert!(e.starts_with("routes[0].hosts[1]:"), "{e}");
        let e = err(&format!("{BASE}routes: [{{name: a, hosts: [X.test.], backends: [1.2.3.4:5]}}, {{name: b, hosts: [x.test], backends: [1.2.3.4:5]}}]"));
        assert!(
            e.starts_with("routes[1].hosts[0]:") && e.contains("route `a`"),
            "{e}"
        );
        let e = err("admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls, proxy_protocol: optional}]\n");
        assert!(e.starts_with("listeners[0].trusted_proxies:"), "{e}");
        let e = err("admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: udp}]\n");
        assert!(e.starts_with("listeners[0].mode:"), "{e}");
        let e = err(&format!("{BASE}unknown_sni: somewhere\n"));
        assert!(e.starts_with("unknown_sni:"), "{e}");
        let e = err(&format!("{BASE}timeouts: {{idle: forever}}\n"));
        assert!(e.starts_with("timeouts.idle:"), "{e}");
        let e = err(&format!(
            "{BASE}routes: [{{name: a, backends: [1.2.3.4:5], drain_delay: 1s}}]"
        ));
        assert!(e.starts_with("routes[0].drain_delay:"), "{e}");
        let e = err(&format!("{BASE}colour: blue\n"));
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn backend_names_are_allowed() {
        let c = Config::from_yaml(&format!(
            "{BASE}routes: [{{name: a, backends: ['kube-apiserver.shoot--a--b.svc.cluster.local:443', '[::1]:8443']}}]"
        ))
        .unwrap();
        assert_eq!(
            c.routes[0].backends[0],
            BackendAddr::Name("kube-apiserver.shoot--a--b.svc.cluster.local".into(), 443)
        );
        assert!(matches!(c.routes[0].backends[1], BackendAddr::Ip(_)));
    }

    /// The Kubernetes example, also shipped as `sni-proxy/example-kubernetes.yaml`.
    const EXAMPLE_KUBERNETES: &str = include_str!("../example-kubernetes.yaml");

    #[test]
    fn kubernetes_example_is_valid() {
        let c = Config::from_yaml(EXAMPLE_KUBERNETES).unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(
            k.kubeconfig.unwrap(),
            PathBuf::from("/etc/sni-proxy/kubeconfig")
        );
        assert_eq!(k.istio_selector.unwrap()["istio"], "ingressgateway");
        let g = k.gateway_api.unwrap();
        assert_eq!(
            (g.gateway_class.as_str(), g.controller_name.as_str()),
            ("sni-proxy", "gardener.cloud/sni-proxy")
        );
        assert!(k
            .connect_allow
            .is_match("outbound|443||kube-apiserver.shoot--a--b.svc.cluster.local"));
        assert!(!k
            .connect_allow
            .is_match("outbound|2379||etcd-main.shoot--a--b.svc.cluster.local"));
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn kubernetes_errors_name_the_field() {
        let e = err(&format!("{BASE}kubernetes: {{connect_allow: '(('}}\n"));
        assert!(e.starts_with("kubernetes.connect_allow:"), "{e}");
        let e = err(&format!(
            "{BASE}kubernetes: {{istio: {{selector: {{}}}}}}\n"
        ));
        assert!(e.starts_with("kubernetes.istio.selector:"), "{e}");
        let e = err(&format!(
            "{BASE}kubernetes: {{gateway_api: {{gateway_class: x}}}}\n"
        ));
        assert!(e.contains("controller_name"), "{e}");
        let e = err(&format!(
            "{BASE}kubernetes: {{gateway_api: {{gateway_class: Bad_Class, controller_name: a.b/c}}}}\n"
        ));
        assert!(
            e.starts_with("kubernetes.gateway_api.gateway_class:"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}kubernetes: {{gateway_api: {{gateway_class: sni-proxy, controller_name: sni-proxy}}}}\n"
        ));
        assert!(
            e.starts_with("kubernetes.gateway_api.controller_name:"),
            "{e}"
        );
        let e = err(&format!("{BASE}kubernetes: {{kubeconfg: x}}\n"));
        assert!(e.contains("unknown field `kubeconfg`"), "{e}");
        // The default is Gardener's regex.
        let c = Config::from_yaml(&format!("{BASE}kubernetes: {{}}\n")).unwrap();
        assert_eq!(
            c.kubernetes.unwrap().connect_allow.as_str(),
            crate::kube::connect::GARDENER_CONNECT_ALLOW
        );
    }
}
