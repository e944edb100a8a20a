//! Traffic interception the way k8s-dns-node-cache does it: a link named `nodelocaldns` that
//! holds the listen IPs (169.254.20.10 and, in kube-proxy iptables mode, the kube-dns
//! ClusterIP), and 12 `iptables` rules per listen IP that take DNS traffic to and from those
//! IPs out of conntrack (`NOTRACK`, so kube-proxy's DNAT never sees it and the kernel delivers
//! it to the local socket) and let it past a default-DROP filter (`ACCEPT`).
//!
//! Compatible with node-cache and Gardener's cleanup: same link name, same rules and comments
//! (`NodeLocal DNS Cache: ...`), teardown removes the rules first and the link second.
//! Differences, each on purpose:
//! - **Both IP families in one process.** node-cache takes the family from the first IP; here
//!   IPv4 IPs get `iptables` rules and IPv6 IPs `ip6tables` rules side by side.
//! - **Link kind fallback.** `dummy` first (what node-cache creates); kernels without
//!   `CONFIG_DUMMY` get `ifb`, then `bridge`, then a `veth` pair (peer `<name>-p`). Any kind
//!   holds local addresses; an existing link of any kind is reused as it is.
//! - **The link is brought up** and IPv6 addresses are added with `IFA_F_NODAD`, so a bind
//!   never waits for duplicate address detection (node-cache never sets the link up).
//! - **Backend detection** in-process, the way the distroless-iptables wrapper does it
//!   ([`iptables::Backend::detect`]).
//!
//! Everything here blocks (netlink round trips, `iptables` processes, up to
//! [`iptables::LOCK_WAIT_SECONDS`] per command while the xtables lock is held elsewhere):
//! async callers use `spawn_blocking`. Netlink sockets and child processes live in the network
//! namespace of the calling thread.
//!
//! Lifecycle (the caller's part): [`Interception::ensure_link`] before binding the DNS
//! sockets; [`Interception::ensure_rules`] only once they are bound (rules without a listener
//! black-hole DNS), then both again every sync interval; [`Interception::teardown`] on exit
//! unless `-skipteardown`. A new process adopts whatever an old one left: `ensure_*` only add
//! what is missing.

pub mod iptables;
pub mod link;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use tracing::{info, warn};

use self::iptables::{Backend, CommandError, Rule};
use self::link::{LinkInfo, Netlink, MAX_IFNAME_LEN};

/// node-cache's default `-interfacename`.
pub const DEFAULT_INTERFACE: &str = "nodelocaldns";
/// Link kinds tried in order when the link has to be created. `dummy` is node-cache's; the
/// others need no peer device and hold local addresses just as well, for kernels built
/// without `CONFIG_DUMMY`. `veth` comes last because it creates a second device.
pub const LINK_KINDS: [&str; 4] = ["dummy", "ifb", "bridge", "veth"];
/// How long [`Interception::ensure_link`] waits for a link it set up to become operational
/// (carrier reported) before adding addresses.
pub const LINK_READY_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll interval of that wait.
const LINK_READY_POLL: Duration = Duration::from_millis(10);
/// Suffix of the veth peer's name (`nodelocaldns-p`).
const VETH_PEER_SUFFIX: &str = "-p";

/// What to set up; node-cache's `-interfacename`, `-localip`, `-dns.port`, `-health-port`,
/// `-setupinterface` and `-setupiptables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Name of the link that holds the listen IPs (`nodelocaldns`).
    pub interface: String,
    /// The listen IPs; IPv4 and IPv6 may be mixed.
    pub local_ips: Vec<IpAddr>,
    /// The DNS port the rules cover (53).
    pub dns_port: u16,
    /// The health port whose probe traffic skips conntrack (node-cache 8080, Gardener 8099).
    pub health_port: u16,
    /// Create and repair the link (`-setupinterface`).
    pub setup_interface: bool,
    /// Install and repair the rules (`-setupiptables`).
    pub setup_iptables: bool,
}

/// What [`Interception::ensure_link`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReport {
    /// The link's kind (one of [`LINK_KINDS`]; `"other"` for a reused link of another kind;
    /// `"none"` when `setup_interface` is off and nothing was done).
    pub kind: &'static str,
    /// Whether the link was created by this call.
    pub created: bool,
    /// Whether this call set the link up.
    pub brought_up: bool,
    /// How many listen IPs were missing and added.
    pub addresses_added: usize,
}

/// What [`Interception::ensure_rules`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesReport {
    /// The backend (`"legacy"` or `"nft"`; `"none"` when `setup_iptables` is off).
    pub backend: &'static str,
    /// How many rules were checked (12 per listen IP).
    pub checked: usize,
    /// How many were missing and prepended.
    pub added: usize,
}

/// Why setting up or tearing down interception failed. [`InterceptError::kind`] is the
/// `errortype` label of `coredns_nodecache_setup_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The options cannot work (bad interface name, no listen IP). Only from
    /// [`Interception::new`].
    #[error("invalid interception options: {0}")]
    InvalidOptions(String),
    /// Reading the link or its addresses failed.
    #[error("checking link {interface}: {source}")]
    InterfaceCheck {
        /// The link name.
        interface: String,
        /// The netlink error.
        #[source]
        source: io::Error,
    },
    /// Creating, raising, addressing or deleting the link failed.
    #[error("link {interface}: {action}: {source}")]
    InterfaceAdd {
        /// The link name.
        interface: String,
        /// What was being done (`create dummy`, `set up`, `add 169.254.20.10`, `delete`).
        action: String,
        /// The netlink error.
        #[source]
        source: io::Error,
    },
    /// An `iptables` command failed (lock timeouts included; see [`InterceptError::kind`]).
    #[error(transparent)]
    Iptables(#[from] CommandError),
}

impl InterceptError {
    /// `config`, `interface_check`, `interface_add`, `iptables` or `iptables_lock` (the last
    /// four are node-cache's labels; `config` only comes from [`Interception::new`]).
    pub fn kind(&self) -> &'static str {
        match self {
            InterceptError::InvalidOptions(_) => "config",
            InterceptError::InterfaceCheck { .. } => "interface_check",
            InterceptError::InterfaceAdd { .. } => "interface_add",
            InterceptError::Iptables(CommandError::Lock { .. }) => "iptables_lock",
            InterceptError::Iptables(_) => "iptables",
        }
    }
}

/// The link and rules for one set of [`Options`]. Holds no kernel state itself: every call
/// reads the current state and adds what is missing, so a new instance (a restarted process)
/// adopts what an old one left.
#[derive(Debug)]
pub struct Interception {
    options: Options,
    backend: Option<Backend>,
    rules: Vec<Rule>,
    link_kinds: Vec<&'static str>,
}

/// Maps a kernel link kind to a static name for reports.
fn static_kind(kind: Option<&str>) -> &'static str {
    match kind {
        Some(k) => LINK_KINDS
            .iter()
            .copied()
            .find(|known| *known == k)
            .unwrap_or("other"),
        None => "other",
    }
}

/// The veth peer's name: `<name>-p`, with `name` shortened to fit `IFNAMSIZ`.
pub fn veth_peer_name(name: &str) -> String {
    let keep = MAX_IFNAME_LEN - VETH_PEER_SUFFIX.len();
    let base: String = name.chars().take(keep).collect();
    format!("{base}{VETH_PEER_SUFFIX}")
}

fn validate(options: &Options) -> Result<(), InterceptError> {
    let name = &options.interface;
    if options.setup_interface
        && (name.is_empty()
            || name.len() > MAX_IFNAME_LEN
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace()))
    {
        return Err(InterceptError::InvalidOptions(format!(
            "interface {name:?} is not a valid link name (1 to {MAX_IFNAME_LEN} bytes, no '/', ':' or spaces)"
        )));
    }
    if (options.setup_interface || options.setup_iptables) && options.local_ips.is_empty() {
        return Err(InterceptError::InvalidOptions(
            "no local IP to intercept".to_owned(),
        ));
    }
    if let Some(ip) = options
        .local_ips
        .iter()
        .find(|ip| ip.is_unspecified() || ip.is_multicast())
    {
        return Err(InterceptError::InvalidOptions(format!(
            "local IP {ip} cannot be a host address"
        )));
    }
    Ok(())
}

impl Interception {
    /// Validates `options` and, when `setup_iptables` is on, detects the iptables backend
    /// (see [`Backend::detect`]). Touches nothing.
    pub fn new(options: Options) -> Result<Interception, InterceptError> {
        validate(&options)?;
        let backend = if options.setup_iptables {
            let backend = Backend::detect()?;
            info!(
                backend = backend.mode.as_str(),
                iptables = %backend.v4.display(),
                ip6tables = %backend.v6.display(),
                "chose the iptables backend"
            );
            Some(backend)
        } else {
            None
        };
        let rules = options
            .local_ips
            .iter()
            .flat_map(|ip| iptables::rules_for(*ip, options.dns_port, options.health_port))
            .collect();
        Ok(Interception {
            options,
            backend,
            rules,
            link_kinds: LINK_KINDS.to_vec(),
        })
    }

    /// Restricts the kinds tried when the link has to be created to `kinds`, in that order
    /// (default: all of [`LINK_KINDS`]). Each must be one of [`LINK_KINDS`].
    pub fn with_link_kinds(mut self, kinds: &[&str]) -> Result<Interception, InterceptError> {
        let mut chosen = Vec::with_capacity(kinds.len());
        for kind in kinds {
            let known = LINK_KINDS
                .iter()
                .copied()
                .find(|k| k == kind)
                .ok_or_else(|| {
                    InterceptError::InvalidOptions(format!(
                        "link kind {kind:?} is not one of {}",
                        LINK_KINDS.join(", ")
                    ))
                })?;
            chosen.push(known);
        }
        if chosen.is_empty() {
            return Err(InterceptError::InvalidOptions(
                "no link kind to try".to_owned(),
            ));
        }
        self.link_kinds = chosen;
        Ok(self)
    }

    /// The options this instance was built from.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// `"legacy"` or `"nft"`, or `None` when `setup_iptables` is off.
    pub fn backend(&self) -> Option<&'static str> {
        self.backend.as_ref().map(|b| b.mode.as_str())
    }

    /// Every rule this instance manages (12 per listen IP), in installation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Creates the link if it is missing (trying [`LINK_KINDS`] in order), sets it up, and adds
    /// every listen IP that is missing as a /32 or /128 (IPv6 with `IFA_F_NODAD`). Does nothing
    /// when `setup_interface` is off.
    pub fn ensure_link(&self) -> Result<LinkReport, InterceptError> {
        if !self.options.setup_interface {
            return Ok(LinkReport {
                kind: "none",
                created: false,
                brought_up: false,
                addresses_added: 0,
            });
        }
        let name = &self.options.interface;
        let check = |source: io::Error| InterceptError::InterfaceCheck {
            interface: name.clone(),
            source,
        };
        let add = |action: String| {
            move |source: io::Error| InterceptError::InterfaceAdd {
                interface: name.clone(),
                action,
                source,
            }
        };
        let mut nl = Netlink::open().map_err(check)?;
        let (link, kind, created) = match nl.link_by_name(name).map_err(check)? {
            Some(link) => {
                let kind = static_kind(link.kind.as_deref());
                (link, kind, false)
            }
            None => {
                let (link, kind) = self.create_link(&mut nl)?;
                info!(interface = %name, kind, "created the listen link");
                (link, kind, true)
            }
        };
        let mut brought_up = false;
        if !link.is_up() {
            nl.set_up(link.index).map_err(add("set up".to_owned()))?;
            brought_up = true;
            if !created {
                info!(interface = %name, kind, "set the listen link up");
            }
        }
        if kind == "veth" {
            // A veth has carrier only while both ends are up.
            let peer = veth_peer_name(name);
            if let Some(peer_link) = nl.link_by_name(&peer).map_err(check)? {
                if !peer_link.is_up() {
                    nl.set_up(peer_link.index)
                        .map_err(add(format!("set {peer} up")))?;
                }
            }
        }
        if brought_up {
            self.wait_running(&mut nl)?;
        }
        let present = nl.addresses(link.index).map_err(check)?;
        let mut addresses_added = 0;
        for ip in &self.options.local_ips {
            if let Some(existing) = present.iter().find(|a| a.addr == *ip) {
                if !existing.is_usable() {
                    warn!(interface = %name, address = %ip, flags = existing.flags, "listen address is tentative or failed DAD");
                }
                continue;
            }
            match nl.add_host_address(link.index, *ip) {
                Ok(()) => {
                    addresses_added += 1;
                    if !created {
                        info!(interface = %name, address = %ip, "added back a listen address");
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(add(format!("add {ip}"))(e)),
            }
        }
        if addresses_added > 0 || brought_up {
            self.wait_usable(&mut nl, link.index)?;
        }
        Ok(LinkReport {
            kind,
            created,
            brought_up,
            addresses_added,
        })
    }

    /// Waits (at most [`LINK_READY_TIMEOUT`]) until every listen IP is on the link, not
    /// tentative, and routed `local`. Even with `IFA_F_NODAD` the kernel finishes an IPv6
    /// address in a work queue: until then it is tentative and has no local route, and
    /// datagrams to it leave through the link instead of reaching the socket. On timeout this logs and returns; the next sync checks
    /// again.
    fn wait_usable(&self, nl: &mut Netlink, index: u32) -> Result<(), InterceptError> {
        let name = &self.options.interface;
        let deadline = std::time::Instant::now() + LINK_READY_TIMEOUT;
        loop {
            let present = nl
                .addresses(index)
                .map_err(|source| InterceptError::InterfaceCheck {
                    interface: name.clone(),
                    source,
                })?;
            let mut pending = Vec::new();
            for &ip in &self.options.local_ips {
                let usable = present.iter().any(|a| a.addr == ip && a.is_usable())
                    && nl
                        .routes_locally(ip)
                        .map_err(|source| InterceptError::InterfaceCheck {
                            interface: name.clone(),
                            source,
                        })?;
                if !usable {
                    pending.push(ip);
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                warn!(interface = %name, pending = ?pending, timeout = ?LINK_READY_TIMEOUT, "listen addresses not usable yet");
                return Ok(());
            }
            std::thread::sleep(LINK_READY_POLL);
        }
    }

    /// Waits (at most [`LINK_READY_TIMEOUT`]) until the link is operationally up. The kernel
    /// reports carrier asynchronously (linkwatch); an IPv6 address added before that moment
    /// was seen to drop local datagrams for a while, so addresses are added after it. A link
    /// that never gets there (a kind that keeps its carrier off) is logged and used anyway:
    /// IPv4 local delivery does not need it.
    fn wait_running(&self, nl: &mut Netlink) -> Result<(), InterceptError> {
        let name = &self.options.interface;
        let deadline = std::time::Instant::now() + LINK_READY_TIMEOUT;
        loop {
            let running = nl
                .link_by_name(name)
                .map_err(|source| InterceptError::InterfaceCheck {
                    interface: name.clone(),
                    source,
                })?
                .is_some_and(|l| l.is_running());
            if running {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                warn!(interface = %name, timeout = ?LINK_READY_TIMEOUT, "listen link is up but not running; adding addresses anyway");
                return Ok(());
            }
            std::thread::sleep(LINK_READY_POLL);
        }
    }

    /// Creates the link with the first kind the kernel supports.
    fn create_link(&self, nl: &mut Netlink) -> Result<(LinkInfo, &'static str), InterceptError> {
        let name = &self.options.interface;
        let mut last = None;
        for &kind in &self.link_kinds {
            let peer = (kind == "veth").then(|| veth_peer_name(name));
            match nl.create_link(name, kind, peer.as_deref()) {
                Ok(()) => {}
                // Kernel without this link type ("Unknown device type").
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(interface = %name, kind, "link kind not supported, trying the next");
                    last = Some(e);
                    continue;
                }
                // Someone else created it in the meantime: reuse it.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(InterceptError::InterfaceAdd {
                        interface: name.clone(),
                        action: format!("create {kind}"),
                        source: e,
                    })
                }
            }
            let link = nl
                .link_by_name(name)
                .map_err(|source| InterceptError::InterfaceCheck {
                    interface: name.clone(),
                    source,
                })?
                .ok_or_else(|| InterceptError::InterfaceAdd {
                    interface: name.clone(),
                    action: format!("create {kind}"),
                    source: io::Error::new(io::ErrorKind::NotFound, "link vanished after creation"),
                })?;
            let kind = static_kind(link.kind.as_deref());
            return Ok((link, kind));
        }
        Err(InterceptError::InterfaceAdd {
            interface: name.clone(),
            action: format!("create (tried {})", self.link_kinds.join(", ")),
            source: last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        })
    }

    /// Checks every rule (`-C`) and prepends the missing ones (`-I`), like node-cache's
    /// `EnsureRule(Prepend, ..)`. Cheap when all are present: one `-C` per rule. A failing
    /// rule does not stop the others (its error is returned at the end), except a lock timeout,
    /// which would only repeat. Does nothing when `setup_iptables` is off.
    pub fn ensure_rules(&self) -> Result<RulesReport, InterceptError> {
        let Some(backend) = &self.backend else {
            return Ok(RulesReport {
                backend: "none",
                checked: 0,
                added: 0,
            });
        };
        let mut added = 0;
        let mut first_error = None;
        for rule in &self.rules {
            let result = backend.exists(rule).and_then(|present| {
                if present {
                    Ok(false)
                } else {
                    backend.prepend(rule).map(|()| true)
                }
            });
            match result {
                Ok(true) => {
                    added += 1;
                    info!(backend = backend.mode.as_str(), rule = %rule, "added nodelocaldns rule");
                }
                Ok(false) => {}
                Err(e @ CommandError::Lock { .. }) => return Err(e.into()),
                Err(e) => {
                    warn!(error = %e, rule = %rule, "could not ensure nodelocaldns rule");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(RulesReport {
                backend: backend.mode.as_str(),
                checked: self.rules.len(),
                added,
            }),
        }
    }

    /// Removes every rule (each as often as it is present), then the link (node-cache's order
    /// since kubernetes/dns commit 307d5615: the other order can leave orphaned rules). Both
    /// steps are attempted even if the first fails; the first error is returned. A missing
    /// link or rule is not an error.
    pub fn teardown(&self) -> Result<(), InterceptError> {
        let mut first_error: Option<InterceptError> = None;
        if let Some(backend) = &self.backend {
            let mut deleted = 0;
            for rule in &self.rules {
                match backend.delete_all(rule) {
                    Ok(n) => deleted += n,
                    Err(e) => {
                        warn!(error = %e, rule = %rule, "could not delete nodelocaldns rule");
                        first_error.get_or_insert(e.into());
                    }
                }
            }
            info!(
                backend = backend.mode.as_str(),
                deleted, "removed nodelocaldns rules"
            );
        }
        if self.options.setup_interface {
            if let Err(e) = self.delete_link() {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn delete_link(&self) -> Result<(), InterceptError> {
        let name = &self.options.interface;
        let check = |source: io::Error| InterceptError::InterfaceCheck {
            interface: name.clone(),
            source,
        };
        let mut nl = Netlink::open().map_err(check)?;
        let Some(link) = nl.link_by_name(name).map_err(check)? else {
            return Ok(());
        };
        match nl.delete_link(link.index) {
            Ok(()) => {
                info!(interface = %name, "deleted the listen link");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            Err(source) => Err(InterceptError::InterfaceAdd {
                interface: name.clone(),
                action: "delete".to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            interface: DEFAULT_INTERFACE.to_owned(),
            local_ips: vec![
                "169.254.20.10".parse().unwrap(),
                "fd30:1319:f1e:230b::1".parse().unwrap(),
            ],
            dns_port: 53,
            health_port: 8099,
            setup_interface: true,
            setup_iptables: false,
        }
    }

    #[test]
    fn rules_cover_both_families() {
        let i = Interception::new(options()).unwrap();
        assert_eq!(i.rules().len(), 24);
        assert_eq!(i.backend(), None);
        let v6 = i
            .rules()
            .iter()
            .filter(|r| r.family == iptables::Family::V6)
            .count();
        assert_eq!(v6, 12);
    }

    #[test]
    fn bad_options_are_config_errors() {
        for name in ["", "a-name-longer-than-15", "a/b", "a b"] {
            let err = Interception::new(Options {
                interface: name.to_owned(),
                ..options()
            })
            .unwrap_err();
            assert_eq!(err.kind(), "config", "{name:?}");
        }
        let err = Interception::new(Options {
            local_ips: vec![],
            ..options()
        })
        .unwrap_err();
        assert_eq!(err.kind(), "config");
        let err = Interception::new(Options {
            local_ips: vec!["0.0.0.0".parse().unwrap()],
            ..options()
        })
        .unwrap_err();
        assert_eq!(err.kind(), "config");
    }

    #[test]
    fn error_kinds_are_node_cache_labels() {
        let io = || io::Error::from_raw_os_error(libc::EPERM);
        let lock = InterceptError::from(CommandError::Lock {
            command: "iptables -C".into(),
            stderr: "Another app is currently holding the xtables lock".into(),
        });
        let failed = InterceptError::from(CommandError::Failed {
            command: "iptables -I".into(),
            status: 2,
            stderr: String::new(),
        });
        let check = InterceptError::InterfaceCheck {
            interface: "x".into(),
            source: io(),
        };
        let add = InterceptError::InterfaceAdd {
            interface: "x".into(),
            action: "set up".into(),
            source: io(),
        };
        assert_eq!(lock.kind(), "iptables_lock");
        assert_eq!(failed.kind(), "iptables");
        assert_eq!(check.kind(), "interface_check");
        assert_eq!(add.kind(), "interface_add");
    }

    #[test]
    fn veth_peer_name_fits_ifnamsiz() {
        assert_eq!(veth_peer_name("nodelocaldns"), "nodelocaldns-p");
        let long = veth_peer_name("fifteen-chars-x");
        assert_eq!(long.len(), MAX_IFNAME_LEN);
        assert_ne!(long, "fifteen-chars-x");
    }

    #[test]
    fn kinds_map_to_static_names() {
        assert_eq!(static_kind(Some("ifb")), "ifb");
        assert_eq!(static_kind(Some("vxlan")), "other");
        assert_eq!(static_kind(None), "other");
    }

    #[test]
    fn disabled_parts_do_nothing() {
        let i = Interception::new(Options {
            setup_interface: false,
            setup_iptables: false,
            ..options()
        })
        .unwrap();
        assert_eq!(i.ensure_link().unwrap().kind, "none");
        assert_eq!(i.ensure_rules().unwrap().backend, "none");
        i.teardown().unwrap();
    }
}
