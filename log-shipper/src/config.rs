//! The configuration file: raw serde types (`deny_unknown_fields`), validated into [`Config`],
//! a runtime type with no optional-but-required fields. Every error names the field, like
//! `stores.shoot.url: ...`; loading and the field paths come from `agentkit::config`.
//!
//! ```yaml
//! admin:
//!   address: 127.0.0.1:15093
//! input:
//!   path: /var/log/pods
//!   checkpoint_dir: /var/lib/log-shipper
//! stores:
//!   seed:  {url: "http://logging.garden.svc:3100/vali/api/v1/push", protocol: loki}
//!   shoot: {url: "http://logging.{namespace}.svc:3100/vali/api/v1/push", protocol: loki}
//! kubernetes: {}
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::HashMap;

use agentkit::config::{duration, ConfigError};
use serde::Deserialize;

use crate::lifecycle::{Routing, State, Stores};

/// Default maximum size of one log entry (partial lines joined); a longer one is split. Loki's
/// default `max_line_size` (256 KiB), so a default Loki never refuses a line as too long.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 256 * 1024;
/// Smallest accepted `input.max_entry_bytes`.
pub const MIN_ENTRY_BYTES: usize = 1024;
/// Default wait for the `F` line of a trailing partial line before it is shipped as it is
/// (a container that exited mid-line never writes one).
pub const DEFAULT_PARTIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval of the directory rescan that backs up inotify: new pods and containers
/// are picked up within it.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Default cap on log files held open at once.
pub const DEFAULT_MAX_OPEN_FILES: usize = 1024;
/// Default uncompressed size at which a batch is sent (Promtail's and Alloy's default).
pub const DEFAULT_BATCH_BYTES: usize = 1024 * 1024;
/// Largest accepted `delivery.batch_bytes`: below the proxies' and stores' request limits.
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Default age at which a batch is sent however small.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_secs(1);
/// Default deadline of one push request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first retry delay after a 429, a 5xx or a transport error (then doubled, jittered).
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Default longest retry delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default outage length after which `delivery.outage_policy` applies.
pub const DEFAULT_MAX_OUTAGE: Duration = Duration::from_secs(3600);
/// Default wait of shoot namespaces for the first list of `Cluster` resources (Gardener's
/// `ControllerSyncTimeout`).
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest tenant ID Loki accepts.
pub const MAX_TENANT_LEN: usize = 150;
/// The placeholder a shoot store's `url` (or `tenant`) holds, filled per shoot namespace.
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";

// === raw file types ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: RawAdmin,
    input: RawInput,
    stores: RawStores,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    path: PathBuf,
    checkpoint_dir: PathBuf,
    #[serde(default = "default_max_entry_bytes")]
    max_entry_bytes: usize,
    #[serde(default = "default_partial_timeout", with = "duration")]
    partial_timeout: Duration,
    #[serde(default = "default_rescan_interval", with = "duration")]
    rescan_interval: Duration,
    #[serde(default = "default_max_open_files")]
    max_open_files: usize,
    #[serde(default)]
    node_name: Option<String>,
}

fn default_max_entry_bytes() -> usize {
    DEFAULT_MAX_ENTRY_BYTES
}
fn default_partial_timeout() -> Duration {
    DEFAULT_PARTIAL_TIMEOUT
}
fn default_rescan_interval() -> Duration {
    DEFAULT_RESCAN_INTERVAL
}
fn default_max_open_files() -> usize {
    DEFAULT_MAX_OPEN_FILES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStores {
    seed: RawStore,
    shoot: RawStore,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: String,
    protocol: Protocol,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDelivery {
    batch_bytes: usize,
    #[serde(with = "duration")]
    batch_wait: Duration,
    #[serde(with = "duration")]
    request_timeout: Duration,
    #[serde(with = "duration")]
    min_backoff: Duration,
    #[serde(with = "duration")]
    max_backoff: Duration,
    #[serde(with = "duration")]
    max_outage: Duration,
    outage_policy: OutagePolicy,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            batch_bytes: DEFAULT_BATCH_BYTES,
            batch_wait: DEFAULT_BATCH_WAIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_outage: DEFAULT_MAX_OUTAGE,
            outage_policy: OutagePolicy::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default = "default_sync_timeout", with = "duration")]
    sync_timeout: Duration,
    #[serde(default)]
    routing: HashMap<State, Vec<StoreName>>,
}

fn default_sync_timeout() -> Duration {
    DEFAULT_SYNC_TIMEOUT
}

/// A store named in `kubernetes.routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreName {
    Shoot,
    Seed,
}

// === runtime types ===

/// The wire protocol of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The Loki push API: protobuf, raw Snappy (Loki, Vali, VictoriaLogs' Loki endpoint).
    Loki,
    /// OTLP/HTTP logs, protobuf (OpenTelemetry collectors, VictoriaLogs).
    Otlp,
}

impl Protocol {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Loki => "loki",
            Protocol::Otlp => "otlp",
        }
    }
}

/// What happens to a store's lines once it has been unreachable for `delivery.max_outage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Keep waiting at the acknowledged position, the files being the buffer: the shipper
    /// drops nothing, but lines the kubelet rotates away meanwhile (it deletes the second
    /// rotated file) are lost, and counted.
    #[default]
    Wait,
    /// Skip the store's backlog older than `max_outage` (counted as dropped) and go on with
    /// newer lines, so the store gets recent logs first when it comes back.
    Skip,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The admin server address (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
    /// What is read.
    pub input: Input,
    /// The store of lines from namespaces that are not a shoot's control plane.
    pub seed: Store,
    /// The store of each shoot namespace's lines, a template filled per namespace.
    pub shoot: Store,
    /// Batching, retries, outages.
    pub delivery: Delivery,
    /// Shoot lifecycle from `Cluster` resources; `None`: every shoot counts as ready.
    pub kubernetes: Option<Kubernetes>,
}

/// The `input:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The CRI log root, `/var/log/pods` on a node.
    pub path: PathBuf,
    /// Where the per-file checkpoints are kept.
    pub checkpoint_dir: PathBuf,
    /// Largest log entry (partial lines joined); longer ones are split.
    pub max_entry_bytes: usize,
    /// How long a trailing partial line waits for its `F` line.
    pub partial_timeout: Duration,
    /// Interval of the directory rescan.
    pub rescan_interval: Duration,
    /// Cap on open log files.
    pub max_open_files: usize,
    /// The `nodename` label of every stream; without it, the `NODE_NAME` environment
    /// variable's (the chart sets it from the pod's `spec.nodeName`), else no such label.
    pub node_name: Option<String>,
}

/// A log store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// The push URL; for the shoot store it holds `{namespace}`, or the tenant does.
    pub url: Template,
    /// The wire protocol.
    pub protocol: Protocol,
    /// The `X-Scope-OrgID` tenant (Loki only), a template as the URL.
    pub tenant: Option<Template>,
    /// The CA bundle (PEM) an `https` store's certificate is checked against; re-read when it
    /// changes.
    pub ca: Option<PathBuf>,
    /// The client certificate chain and key (PEM) presented to an `https` store behind mTLS;
    /// re-read when they change.
    pub client_cert: Option<ClientCert>,
}

/// A client certificate chain and its key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A string that may hold `{namespace}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

impl Template {
    /// The text with `{namespace}` replaced by `namespace`.
    pub fn render(&self, namespace: &str) -> String {
        self.0.replace(NAMESPACE_PLACEHOLDER, namespace)
    }

    /// Whether the text holds `{namespace}`.
    pub fn has_namespace(&self) -> bool {
        self.0.contains(NAMESPACE_PLACEHOLDER)
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The `delivery:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Uncompressed size at which a batch is sent.
    pub batch_bytes: usize,
    /// Age at which a batch is sent however small.
    pub batch_wait: Duration,
    /// Deadline of one push request.
    pub request_timeout: Duration,
    /// First retry delay.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Outage length after which `outage_policy` applies.
    pub max_outage: Duration,
    /// What happens then.
    pub outage_policy: OutagePolicy,
}

/// The `kubernetes:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    /// The kubeconfig; `None` is the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    /// How long shoot namespaces wait for the first list of `Cluster` resources; then every
    /// shoot counts as ready until the list comes.
    pub sync_timeout: Duration,
    /// The stores of each lifecycle state (Gardener's defaults, overridden per state).
    pub routing: Routing,
}

impl Config {
    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        validate(agentkit::config::parse(text)?)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        validate(agentkit::config::load(path)?)
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let input = raw.input;
    for (field, path) in [
        ("input.path", &input.path),
        ("input.checkpoint_dir", &input.checkpoint_dir),
    ] {
        if !path.is_absolute() {
            return Err(ConfigError::invalid(field, "must be an absolute path"));
        }
    }
    if input.max_entry_bytes < MIN_ENTRY_BYTES {
        return Err(ConfigError::invalid(
            "input.max_entry_bytes",
            format!("must be at least {MIN_ENTRY_BYTES}"),
        ));
    }
    if input.max_open_files == 0 {
        return Err(ConfigError::invalid(
            "input.max_open_files",
            "must be positive",
        ));
    }
    if input.node_name.as_deref() == Some("") {
        return Err(ConfigError::invalid(
            "input.node_name",
            "must not be empty (leave it out for none)",
        ));
    }
    let delivery = raw.delivery;
    if delivery.batch_bytes < input.max_entry_bytes || delivery.batch_bytes > MAX_BATCH_BYTES {
        return Err(ConfigError::invalid(
            "delivery.batch_bytes",
            format!(
                "must be between input.max_entry_bytes ({}) and {MAX_BATCH_BYTES}",
                input.max_entry_bytes
            ),
        ));
    }
    for (field, d) in [
        ("input.partial_timeout", input.partial_timeout),
        ("input.rescan_interval", input.rescan_interval),
        ("delivery.batch_wait", delivery.batch_wait),
        ("delivery.request_timeout", delivery.request_timeout),
        ("delivery.min_backoff", delivery.min_backoff),
        ("delivery.max_outage", delivery.max_outage),
    ] {
        if d.is_zero() {
            return Err(ConfigError::invalid(field, "must be positive"));
        }
    }
    if delivery.max_backoff < delivery.min_backoff {
        return Err(ConfigError::invalid(
            "delivery.max_backoff",
            "must not be below delivery.min_backoff",
        ));
    }
    let seed = store("stores.seed", raw.stores.seed, false)?;
    let shoot = store("stores.shoot", raw.stores.shoot, true)?;
    Ok(Config {
        admin: raw.admin.address,
        input: Input {
            path: input.path,
            checkpoint_dir: input.checkpoint_dir,
            max_entry_bytes: input.max_entry_bytes,
            partial_timeout: input.partial_timeout,
            rescan_interval: input.rescan_interval,
            max_open_files: input.max_open_files,
            node_name: input.node_name,
        },
        seed,
        shoot,
        delivery: Delivery {
            batch_bytes: delivery.batch_bytes,
            batch_wait: delivery.batch_wait,
            request_timeout: delivery.request_timeout,
            min_backoff: delivery.min_backoff,
            max_backoff: delivery.max_backoff,
            max_outage: delivery.max_outage,
            outage_policy: delivery.outage_policy,
        },
        kubernetes: match raw.kubernetes {
            None => None,
            Some(k) => {
                if k.sync_timeout.is_zero() {
                    return Err(ConfigError::invalid(
                        "kubernetes.sync_timeout",
                        "must be positive",
                    ));
                }
                let mut routing = Routing::default();
                for (state, stores) in k.routing {
                    let stores = stores.iter().fold(Stores::NONE, |all, s| {
                        all | match s {
                            StoreName::Shoot => Stores::SHOOT,
                            StoreName::Seed => Stores::SEED,
                        }
                    });
                    routing.set(state, stores);
                }
                Some(Kubernetes {
                    kubeconfig: k.kubeconfig,
                    sync_timeout: k.sync_timeout,
                    routing,
                })
            }
        },
    })
}

/// A namespace as long as Kubernetes allows, to check rendered URLs and tenants.
const SAMPLE_NAMESPACE: &str = "shoot--project-name--a-shoot-name-of-maximal-length-at-63-chars";

/// Validates a store; `per_namespace`: the shoot store, whose URL or tenant must hold
/// `{namespace}` (else every shoot's lines would land in one place).
fn store(field: &str, raw: RawStore, per_namespace: bool) -> Result<Store, ConfigError> {
    let url = template(&format!("{field}.url"), raw.url, per_namespace)?;
    let rendered = url.render(SAMPLE_NAMESPACE);
    let uri: http::Uri = rendered.parse().map_err(|e| {
        ConfigError::invalid(format!("{field}.url"), format!("`{}`: {e}", url.as_str()))
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ConfigError::invalid(
            format!("{field}.url"),
            format!("`{}` is not an http:// or https:// URL", url.as_str()),
        ));
    }
    let tenant = match raw.tenant {
        None => None,
        Some(_) if raw.protocol != Protocol::Loki => {
            return Err(ConfigError::invalid(
                format!("{field}.tenant"),
                "is an X-Scope-OrgID for protocol loki only",
            ))
        }
        Some(text) => {
            let tenant = template(&format!("{field}.tenant"), text, per_namespace)?;
            let rendered = tenant.render(SAMPLE_NAMESPACE);
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b"!-_.*'()".contains(&b);
            if rendered.is_empty()
                || rendered.len() > MAX_TENANT_LEN
                || !rendered.bytes().all(allowed)
                || rendered == "."
                || rendered == ".."
            {
                return Err(ConfigError::invalid(
                    format!("{field}.tenant"),
                    format!(
                        "`{}` is not a Loki tenant ID (at most {MAX_TENANT_LEN} of a-z A-Z 0-9 ! - _ . * ' ( ))",
                        tenant.as_str()
                    ),
                ));
            }
            Some(tenant)
        }
    };
    if per_namespace
        && !url.has_namespace()
        && !tenant.as_ref().is_some_and(Template::has_namespace)
    {
        return Err(ConfigError::invalid(
            format!("{field}.url"),
            format!("must hold {NAMESPACE_PLACEHOLDER} (or the tenant must): each shoot namespace has its own store"),
        ));
    }
    let https = uri.scheme_str() == Some("https");
    match &raw.ca {
        None if https => {
            return Err(ConfigError::invalid(
                format!("{field}.ca"),
                "an https store needs the CA bundle (PEM) its certificate is checked against",
            ))
        }
        Some(_) if !https => {
            return Err(ConfigError::invalid(
                format!("{field}.ca"),
                "is for https stores only",
            ))
        }
        Some(path) if !path.is_absolute() => {
            return Err(ConfigError::invalid(
                format!("{field}.ca"),
                "must be an absolute path",
            ))
        }
        _ => {}
    }
    let client_cert = match (raw.cert, raw.key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                format!("{field}.key"),
                "a client certificate (cert) needs its key",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                format!("{field}.cert"),
                "a key needs its client certificate (cert)",
            ))
        }
        (Some(cert), Some(key)) => {
            for (name, path) in [("cert", &cert), ("key", &key)] {
                if !https {
                    return Err(ConfigError::invalid(
                        format!("{field}.{name}"),
                        "is for https stores only",
                    ));
                }
                if !path.is_absolute() {
                    return Err(ConfigError::invalid(
                        format!("{field}.{name}"),
                        "must be an absolute path",
                    ));
                }
            }
            Some(ClientCert { cert, key })
        }
    };
    Ok(Store {
        url,
        protocol: raw.protocol,
        tenant,
        ca: raw.ca,
        client_cert,
    })
}

/// Checks the placeholders of `text`: `{namespace}` where `allowed`, no other brace.
fn template(field: &str, text: String, allowed: bool) -> Result<Template, ConfigError> {
    let rest = text.replace(NAMESPACE_PLACEHOLDER, "");
    if rest.contains(['{', '}']) {
        return Err(ConfigError::invalid(
            field,
            format!("`{text}`: the only placeholder is {NAMESPACE_PLACEHOLDER}"),
        ));
    }
    if !allowed && rest.len() != text.len() {
        return Err(ConfigError::invalid(
            field,
            format!("`{text}`: {NAMESPACE_PLACEHOLDER} is for the shoot store only"),
        ));
    }
    Ok(Template(text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The example of the issue, shipped as `log-shipper/example.yaml`.
    const EXAMPLE: &str = include_str!("../example.yaml");

    #[test]
    fn example_is_valid() {
        let c = Config::from_yaml(EXAMPLE).unwrap();
        assert_eq!(c.admin, "127.0.0.1:15093".parse().unwrap());
        assert_eq!(c.input.path, PathBuf::from("/var/log/pods"));
        assert_eq!(
            c.input.checkpoint_dir,
            PathBuf::from("/var/lib/log-shipper")
        );
        assert_eq!(c.input.max_entry_bytes, DEFAULT_MAX_ENTRY_BYTES);
        assert_eq!(
            c.seed.url.render("ignored"),
            "http://logging.garden.svc:3100/vali/api/v1/push"
        );
        assert_eq!(
            c.shoot.url.render("shoot--p--n"),
            "http://logging.shoot--p--n.svc:3100/vali/api/v1/push"
        );
        assert_eq!(
            (c.seed.protocol, c.shoot.protocol),
            (Protocol::Loki, Protocol::Loki)
        );
        assert_eq!(
            c.kubernetes,
            Some(Kubernetes {
                kubeconfig: None,
                sync_timeout: DEFAULT_SYNC_TIMEOUT,
                routing: Routing::default(),
            })
        );
        assert_eq!(c.delivery.batch_bytes, DEFAULT_BATCH_BYTES);
        assert_eq!(c.delivery.outage_policy, OutagePolicy::Wait);
    }

    const BASE: &str = "admin: {address: 127.0.0.1:1}\n\
        input: {path: /var/log/pods, checkpoint_dir: /var/lib/x}\n";
    const STORES: &str =
        "stores:\n  seed: {url: 'http://seed:3100/loki/api/v1/push', protocol: loki}\n  \
        shoot: {url: 'http://logging.{namespace}.svc:3100/loki/api/v1/push', protocol: otlp}\n";

    fn err(text: &str) -> String {
        Config::from_yaml(text).unwrap_err().to_string()
    }

    #[test]
    fn knobs_and_defaults() {
        let c = Config::from_yaml(&format!("{BASE}{STORES}")).unwrap();
        assert_eq!(c.kubernetes, None);
        assert_eq!(c.shoot.protocol, Protocol::Otlp);
        assert_eq!(
            c.delivery,
            Delivery {
                batch_bytes: DEFAULT_BATCH_BYTES,
                batch_wait: DEFAULT_BATCH_WAIT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                min_backoff: DEFAULT_MIN_BACKOFF,
                max_backoff: DEFAULT_MAX_BACKOFF,
                max_outage: DEFAULT_MAX_OUTAGE,
                outage_policy: OutagePolicy::Wait,
            }
        );
        let c = Config::from_yaml(
            "admin: {address: '[::1]:9'}\n\
             input: {path: /logs, checkpoint_dir: /ck, max_entry_bytes: 16384, partial_timeout: 30s, \
             rescan_interval: 250ms, max_open_files: 10, node_name: node-a}\n\
             stores:\n  seed: {url: 'https://seed/push', protocol: loki, tenant: garden, ca: /etc/ca.pem, \
             cert: /etc/tls.crt, key: /etc/tls.key}\n  \
             shoot: {url: 'https://shared/push', protocol: loki, tenant: '{namespace}', ca: /etc/ca.pem}\n\
             delivery: {batch_bytes: 65536, batch_wait: 2s, request_timeout: 5s, min_backoff: 1s, \
             max_backoff: 1m, max_outage: 24h, outage_policy: skip}\n\
             kubernetes: {kubeconfig: /etc/kubeconfig, sync_timeout: 10s, \
             routing: {ready: [shoot, seed], hibernated: [seed], deletion: []}}\n",
        )
        .unwrap();
        assert_eq!(c.input.max_entry_bytes, 16384);
        assert_eq!(c.input.rescan_interval, Duration::from_millis(250));
        assert_eq!(c.input.node_name.as_deref(), Some("node-a"));
        assert_eq!(c.shoot.tenant.unwrap().render("shoot--a--b"), "shoot--a--b");
        assert_eq!(c.seed.tenant.unwrap().as_str(), "garden");
        assert_eq!(c.seed.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            c.seed.client_cert,
            Some(ClientCert {
                cert: PathBuf::from("/etc/tls.crt"),
                key: PathBuf::from("/etc/tls.key")
            })
        );
        assert_eq!(c.shoot.client_cert, None);
        assert_eq!(c.delivery.outage_policy, OutagePolicy::Skip);
        assert_eq!(c.delivery.max_outage, Duration::from_secs(86_400));
        let k = c.kubernetes.unwrap();
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/etc/kubeconfig")));
        assert_eq!(k.sync_timeout, Duration::from_secs(10));
        assert_eq!(k.routing.get(State::Ready), Stores::BOTH);
        assert_eq!(k.routing.get(State::Hibernated), Stores::SEED);
        assert_eq!(k.routing.get(State::Deletion), Stores::NONE);
        assert_eq!(k.routing.get(State::Creation), Stores::BOTH, "default kept");
    }

    #[test]
    fn errors_name_the_field() {
        let seed = "  seed: {url: 'http://seed/push', protocol: loki}\n";
        for (text, field) in [
            (format!("{BASE}{STORES}colour: blue\n"), "colour"),
            (format!("{BASE}stores:\n{seed}"), "stores"),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://{{namespace}}/p', protocol: vali}}\n"),
                "stores.shoot.protocol",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://shared/p', protocol: loki}}\n"),
                "stores.shoot.url",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://{{shoot}}/p', protocol: loki}}\n"),
                "stores.shoot.url",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'logging.{{namespace}}:3100', protocol: loki}}\n"),
                "stores.shoot.url",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://{{namespace}}/p', protocol: otlp, tenant: x}}\n"),
                "stores.shoot.tenant",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://x/p', protocol: loki, tenant: 'a|{{namespace}}'}}\n"),
                "stores.shoot.tenant",
            ),
            (
                format!("{BASE}stores:\n  seed: {{url: 'http://{{namespace}}/p', protocol: loki}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.url",
            ),
            (
                format!("admin: {{address: 127.0.0.1:1}}\ninput: {{path: var/log/pods, checkpoint_dir: /x}}\n{STORES}"),
                "input.path",
            ),
            (
                format!("admin: {{address: 127.0.0.1:1}}\ninput: {{path: /p, checkpoint_dir: /x, max_entry_bytes: 10}}\n{STORES}"),
                "input.max_entry_bytes",
            ),
            (
                format!("admin: {{address: 127.0.0.1:1}}\ninput: {{path: /p, checkpoint_dir: /x, partial_timeout: soon}}\n{STORES}"),
                "input.partial_timeout",
            ),
            (
                format!("admin: {{address: 127.0.0.1:1}}\ninput: {{path: /p, checkpoint_dir: /x, rescan_interval: 0}}\n{STORES}"),
                "input.rescan_interval",
            ),
            (
                format!("admin: {{address: 127.0.0.1:1}}\ninput: {{path: /p, checkpoint_dir: /x, node_name: ''}}\n{STORES}"),
                "input.node_name",
            ),
            (format!("{BASE}{STORES}delivery: {{batch_bytes: 1000}}\n"), "delivery.batch_bytes"),
            (
                format!("{BASE}stores:\n  seed: {{url: 'https://seed/push', protocol: loki}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.ca",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://{{namespace}}/p', protocol: loki, ca: /ca.pem}}\n"),
                "stores.shoot.ca",
            ),
            (
                format!("{BASE}stores:\n  seed: {{url: 'https://seed/push', protocol: loki, ca: ca.pem}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.ca",
            ),
            (
                format!("{BASE}stores:\n  seed: {{url: 'https://seed/push', protocol: loki, ca: /ca.pem, cert: /c.pem}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.key",
            ),
            (
                format!("{BASE}stores:\n  seed: {{url: 'https://seed/push', protocol: loki, ca: /ca.pem, key: /k.pem}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.cert",
            ),
            (
                format!("{BASE}stores:\n  seed: {{url: 'https://seed/push', protocol: loki, ca: /ca.pem, cert: c.pem, key: /k.pem}}\n  shoot: {{url: 'http://{{namespace}}/p', protocol: loki}}\n"),
                "stores.seed.cert",
            ),
            (
                format!("{BASE}stores:\n{seed}  shoot: {{url: 'http://{{namespace}}/p', protocol: loki, cert: /c.pem, key: /k.pem}}\n"),
                "stores.shoot.cert",
            ),
            (
                format!("{BASE}{STORES}delivery: {{min_backoff: 10s, max_backoff: 1s}}\n"),
                "delivery.max_backoff",
            ),
            (format!("{BASE}{STORES}delivery: {{outage_policy: drop}}\n"), "delivery.outage_policy"),
            (format!("{BASE}{STORES}kubernetes: {{namespace: x}}\n"), "kubernetes.namespace"),
            (
                format!("{BASE}{STORES}kubernetes: {{routing: {{asleep: [seed]}}}}\n"),
                // serde_path_to_error's name of a map key that is not one.
                "kubernetes.routing.?",
            ),
            (
                format!("{BASE}{STORES}kubernetes: {{routing: {{ready: [operator]}}}}\n"),
                "kubernetes.routing.?[0]",
            ),
            (
                format!("{BASE}{STORES}kubernetes: {{sync_timeout: 0s}}\n"),
                "kubernetes.sync_timeout",
            ),
            (
                format!("admin: {{address: localhost}}\ninput: {{path: /p, checkpoint_dir: /x}}\n{STORES}"),
                "admin.address",
            ),
        ] {
            let e = Config::from_yaml(&text).unwrap_err();
            assert_eq!(e.field(), Some(field), "{text}\n=> {e}");
        }
        assert!(err(&format!("{BASE}{STORES}colour: blue\n")).contains("unknown field `colour`"));
    }
}
