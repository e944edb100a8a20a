//! node-cache's packet-filter rules and the `iptables` binaries that install them. Separate
//! from [`super`] so the rule list (what node-cache installs, byte for byte in meaning) and the
//! backend choice can be unit-tested without privileges.
//!
//! The rules are driven through the `iptables`/`ip6tables` binaries (like node-cache's
//! `utiliptables`): `-w` waits for `/run/xtables.lock`, which kube-proxy and the CNI share,
//! `-C` checks, `-I` prepends, `-D` deletes. Which binaries: see [`Backend::detect`].

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Comment on the `NOTRACK` rules (node-cache's `iptablesCommentSkipConntrack`); Gardener's
/// cleanup finds rules by the common prefix [`COMMENT_PREFIX`].
pub const COMMENT_SKIP_CONNTRACK: &str = "NodeLocal DNS Cache: skip conntrack";
/// Comment on the `ACCEPT` rules (node-cache's `iptablesCommentAllowTraffic`).
pub const COMMENT_ALLOW_TRAFFIC: &str = "NodeLocal DNS Cache: allow DNS traffic";
/// What every rule's comment starts with.
pub const COMMENT_PREFIX: &str = "NodeLocal DNS Cache:";
/// Seconds `iptables -w` waits for the xtables lock before giving up (the value
/// Kubernetes' `utiliptables` passes).
pub const LOCK_WAIT_SECONDS: u32 = 5;
/// `iptables` exit status for a resource problem; with `-w` that is the lock not being free.
const EXIT_RESOURCE_PROBLEM: i32 = 4;
/// `iptables -C`/`-D` exit status when the rule (or its chain) does not exist.
const EXIT_NOT_FOUND: i32 = 1;
/// Upper bound on `-D` repetitions for one rule (a rule added many times by a flaky `-C`, as
/// in kubernetes/dns#568, is removed up to this many times per teardown).
pub const MAX_DELETE_REPEATS: usize = 1000;
/// Directories searched for the binaries besides `$PATH` (container images often lack sbin in
/// `$PATH`).
const SBIN_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// IP family of a rule: which binary runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// One rule: table, chain and the rule specification (match, comment, target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which binary.
    pub family: Family,
    /// `raw` or `filter`.
    pub table: &'static str,
    /// `PREROUTING`, `INPUT` or `OUTPUT`.
    pub chain: &'static str,
    /// The specification after the chain, e.g. `-p udp -d IP --dport 53 -m comment --comment
    /// "..." -j NOTRACK`, one argument per element.
    pub spec: Vec<String>,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "-t {} {}", self.table, self.chain)?;
        for arg in &self.spec {
            if arg.contains(' ') {
                write!(f, " \"{arg}\"")?;
            } else {
                write!(f, " {arg}")?;
            }
        }
        Ok(())
    }
}

/// Which side of the packet a rule matches the listen IP and port on.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// `-d IP --dport PORT`: traffic to the listener.
    To,
    /// `-s IP --sport PORT`: the listener's replies.
    From,
}

/// Which port a rule covers.
#[derive(Debug, Clone, Copy)]
enum Port {
    Dns,
    Health,
}

/// One line of node-cache's rule table (`initIptables`).
#[derive(Debug)]
struct Template {
    table: &'static str,
    chain: &'static str,
    proto: &'static str,
    side: Side,
    port: Port,
    target: &'static str,
    comment: &'static str,
}

const fn notrack(chain: &'static str, proto: &'static str, side: Side, port: Port) -> Template {
    Template {
        table: "raw",
        chain,
        proto,
        side,
        port,
        target: "NOTRACK",
        comment: COMMENT_SKIP_CONNTRACK,
    }
}

const fn accept(chain: &'static str, proto: &'static str, side: Side) -> Template {
    Template {
        table: "filter",
        chain,
        proto,
        side,
        port: Port::Dns,
        target: "ACCEPT",
        comment: COMMENT_ALLOW_TRAFFIC,
    }
}

/// node-cache's rules per listen IP, in its order.
const TEMPLATES: [Template; 12] = [
    notrack("PREROUTING", "tcp", Side::To, Port::Dns),
    notrack("PREROUTING", "udp", Side::To, Port::Dns),
    accept("INPUT", "tcp", Side::To),
    accept("INPUT", "udp", Side::To),
    notrack("OUTPUT", "tcp", Side::From, Port::Dns),
    notrack("OUTPUT", "udp", Side::From, Port::Dns),
    accept("OUTPUT", "tcp", Side::From),
    accept("OUTPUT", "udp", Side::From),
    // Locally generated queries (hostNetwork pods, kubernetes/dns PR #319).
    notrack("OUTPUT", "tcp", Side::To, Port::Dns),
    notrack("OUTPUT", "udp", Side::To, Port::Dns),
    // The liveness probe on the health port (kubernetes/dns PR #352).
    notrack("OUTPUT", "tcp", Side::To, Port::Health),
    notrack("OUTPUT", "tcp", Side::From, Port::Health),
];

/// node-cache's 12 rules for one local IP, in node-cache's order (`initIptables`; each is
/// prepended, so the last one ends up first in its chain).
pub fn rules_for(ip: IpAddr, dns_port: u16, health_port: u16) -> Vec<Rule> {
    let family = Family::of(ip);
    let ip = ip.to_string();
    TEMPLATES
        .iter()
        .map(|t| {
            let (addr_flag, port_flag) = match t.side {
                Side::To => ("-d", "--dport"),
                Side::From => ("-s", "--sport"),
            };
            let port = match t.port {
                Port::Dns => dns_port,
                Port::Health => health_port,
            };
            Rule {
                family,
                table: t.table,
                chain: t.chain,
                spec: vec![
                    "-p".to_owned(),
                    t.proto.to_owned(),
                    addr_flag.to_owned(),
                    ip.clone(),
                    port_flag.to_owned(),
                    port.to_string(),
                    "-m".to_owned(),
                    "comment".to_owned(),
                    "--comment".to_owned(),
                    t.comment.to_owned(),
                    "-j".to_owned(),
                    t.target.to_owned(),
                ],
            }
        })
        .collect()
}

/// Which iptables backend the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The x_tables kernel interface (`iptables-legacy`).
    Legacy,
    /// nf_tables through the xtables compatibility layer (`iptables-nft`).
    Nft,
}

impl Mode {
    /// `"legacy"` or `"nft"`, for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Legacy => "legacy",
            Mode::Nft => "nft",
        }
    }
}

/// The binaries of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Which backend.
    pub mode: Mode,
    /// `iptables` (rule changes) and `iptables-save` (inspection) for IPv4.
    pub v4: PathBuf,
    /// The IPv4 save binary.
    pub v4_save: PathBuf,
    /// `ip6tables` for IPv6.
    pub v6: PathBuf,
    /// The IPv6 save binary.
    pub v6_save: PathBuf,
}

/// Why a backend could not be chosen or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No usable `iptables` binary was found.
    #[error("no iptables binary found (looked for {looked_for} in $PATH and sbin directories)")]
    NotFound {
        /// The names looked for.
        looked_for: String,
    },
    /// The binary could not be started.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process held `/run/xtables.lock` for longer than [`LOCK_WAIT_SECONDS`].
    #[error("{command}: xtables lock: {stderr}")]
    Lock {
        /// The command line.
        command: String,
        /// What iptables printed.
        stderr: String,
    },
    /// The command failed otherwise.
    #[error("{command}: exit {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status (-1 when killed by a signal).
        status: i32,
        /// What iptables printed.
        stderr: String,
    },
}

/// Finds `name` in `$PATH` or the usual sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Counts rule lines (`-A ...`) in `*-save` output.
pub fn count_rules(save_output: &str) -> usize {
    save_output.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Whether `*-save` output has kube-proxy's/kubelet's hint chain, which marks the backend the
/// node's components chose (kube-proxy's own detection looks for it).
fn has_hint_chain(save_output: &str) -> bool {
    save_output
        .lines()
        .any(|l| l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY "))
}

/// The backend choice from what each backend already holds: the hint chain first
/// (kube-proxy style), then whichever backend has more rules; `None` when neither says
/// anything (no rules anywhere), so the caller falls back to the default `iptables`.
pub fn choose_mode(legacy_save: &str, nft_save: &str) -> Option<Mode> {
    match (has_hint_chain(legacy_save), has_hint_chain(nft_save)) {
        (true, false) => return Some(Mode::Legacy),
        (false, true) => return Some(Mode::Nft),
        _ => {}
    }
    let (legacy, nft) = (count_rules(legacy_save), count_rules(nft_save));
    if legacy > nft {
        Some(Mode::Legacy)
    } else if nft > legacy {
        Some(Mode::Nft)
    } else {
        None
    }
}

/// The mode `iptables --version` reports (`iptables v1.8.9 (nf_tables)` or `(legacy)`);
/// versions before 1.8 only had legacy.
pub fn mode_from_version(version: &str) -> Mode {
    if version.contains("nf_tables") {
        Mode::Nft
    } else {
        Mode::Legacy
    }
}

fn save_output(binary: Option<PathBuf>) -> String {
    let Some(binary) = binary else {
        return String::new();
    };
    match Command::new(&binary).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => String::new(),
    }
}

impl Backend {
    /// Chooses the backend the way the distroless-iptables wrapper does: when both
    /// `iptables-legacy*` and `iptables-nft*` exist, the one that already holds rules (or
    /// kube-proxy's hint chain) in either family wins; otherwise (a fresh node, or an image with
    /// only one `iptables`) the default `iptables` binary and the mode it reports.
    pub fn detect() -> Result<Backend, CommandError> {
        let legacy = Backend::named(Mode::Legacy, "-legacy");
        let nft = Backend::named(Mode::Nft, "-nft");
        if let (Some(legacy), Some(nft)) = (&legacy, &nft) {
            let legacy_save = save_output(Some(legacy.v4_save.clone()))
                + &save_output(Some(legacy.v6_save.clone()));
            let nft_save =
                save_output(Some(nft.v4_save.clone())) + &save_output(Some(nft.v6_save.clone()));
            match choose_mode(&legacy_save, &nft_save) {
                Some(Mode::Legacy) => return Ok(legacy.clone()),
                Some(Mode::Nft) => return Ok(nft.clone()),
                None => {}
            }
        }
        // Fall back to whatever `iptables` is.
        let default = find_binary("iptables").ok_or_else(|| CommandError::NotFound {
            looked_for: "iptables, iptables-legacy, iptables-nft".to_owned(),
        })?;
        let version = Command::new(&default)
            .arg("--version")
            .output()
            .map_err(|source| CommandError::Spawn {
                command: format!("{} --version", default.display()),
                source,
            })?;
        let mode = mode_from_version(&String::from_utf8_lossy(&version.stdout));
        let named = match mode {
            Mode::Legacy => legacy,
            Mode::Nft => nft,
        };
        Ok(named.unwrap_or_else(|| Backend {
            mode,
            v4: default.clone(),
            v4_save: find_binary("iptables-save").unwrap_or_else(|| "iptables-save".into()),
            v6: find_binary("ip6tables").unwrap_or_else(|| "ip6tables".into()),
            v6_save: find_binary("ip6tables-save").unwrap_or_else(|| "ip6tables-save".into()),
        }))
    }

    /// The backend whose four binaries carry `suffix` (`-legacy`, `-nft`), if all exist.
    fn named(mode: Mode, suffix: &str) -> Option<Backend> {
        Some(Backend {
            mode,
            v4: find_binary(&format!("iptables{suffix}"))?,
            v4_save: find_binary(&format!("iptables{suffix}-save"))?,
            v6: find_binary(&format!("ip6tables{suffix}"))?,
            v6_save: find_binary(&format!("ip6tables{suffix}-save"))?,
        })
    }

    fn binary(&self, family: Family) -> &Path {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// The save binary of `family`.
    pub fn save_binary(&self, family: Family) -> &Path {
        match family {
            Family::V4 => &self.v4_save,
            Family::V6 => &self.v6_save,
        }
    }

    /// Runs `<binary> -w 5 -t TABLE <op> CHAIN SPEC...` for `rule`.
    fn run(&self, op: &[&str], rule: &Rule) -> Result<Output, CommandError> {
        let binary = self.binary(rule.family);
        let mut cmd = Command::new(binary);
        cmd.arg("-w")
            .arg(LOCK_WAIT_SECONDS.to_string())
            .args(["-t", rule.table])
            .args(op)
            .arg(rule.chain)
            .args(&rule.spec);
        cmd.output().map_err(|source| CommandError::Spawn {
            command: format!("{} {rule}", binary.display()),
            source,
        })
    }

    fn failure(&self, op: &str, rule: &Rule, out: &Output) -> CommandError {
        let command = format!(
            "{} {op} {rule}",
            self.binary(rule.family)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let status = out.status.code().unwrap_or(-1);
        if status == EXIT_RESOURCE_PROBLEM || stderr.contains("holding the xtables lock") {
            CommandError::Lock { command, stderr }
        } else {
            CommandError::Failed {
                command,
                status,
                stderr,
            }
        }
    }

    /// Whether `rule` exists (`-C`).
    pub fn exists(&self, rule: &Rule) -> Result<bool, CommandError> {
        let out = self.run(&["-C"], rule)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(EXIT_NOT_FOUND) => Ok(false),
            _ => Err(self.failure("-C", rule, &out)),
        }
    }

    /// Prepends `rule` to its chain (`-I CHAIN 1`, which is what `-I` without a position does).
    pub fn prepend(&self, rule: &Rule) -> Result<(), CommandError> {
        let out = self.run(&["-I"], rule)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.failure("-I", rule, &out))
        }
    }

    /// Deletes `rule` until it is gone (it may have been added more than once); returns how
    /// many copies were deleted. At most [`MAX_DELETE_REPEATS`].
    pub fn delete_all(&self, rule: &Rule) -> Result<usize, CommandError> {
        for deleted in 0..MAX_DELETE_REPEATS {
            let out = self.run(&["-D"], rule)?;
            match out.status.code() {
                Some(0) => continue,
                Some(EXIT_NOT_FOUND) => return Ok(deleted),
                _ => return Err(self.failure("-D", rule, &out)),
            }
        }
        Ok(MAX_DELETE_REPEATS)
    }

    /// The `*-save` output of `family` (all tables).
    pub fn save(&self, family: Family) -> Result<String, CommandError> {
        let binary = self.save_binary(family);
        let out = Command::new(binary)
            .output()
            .map_err(|source| CommandError::Spawn {
                command: binary.display().to_string(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(CommandError::Failed {
                command: binary.display().to_string(),
                status: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn twelve_rules_per_ip_in_node_cache_order() {
        let rules = rules_for("169.254.20.10".parse().unwrap(), 53, 8080);
        assert_eq!(rules.len(), 12);
        let shown: Vec<String> = rules.iter().map(ToString::to_string).collect();
        let c = "-m comment --comment";
        let skip = "\"NodeLocal DNS Cache: skip conntrack\"";
        let allow = "\"NodeLocal DNS Cache: allow DNS traffic\"";
        let ip = "169.254.20.10";
        let expected = [
            format!("-t raw PREROUTING -p tcp -d {ip} --dport 53 {c} {skip} -j NOTRACK"),
            format!("-t raw PREROUTING -p udp -d {ip} --dport 53 {c} {skip} -j NOTRACK"),
            format!("-t filter INPUT -p tcp -d {ip} --dport 53 {c} {allow} -j ACCEPT"),
            format!("-t filter INPUT -p udp -d {ip} --dport 53 {c} {allow} -j ACCEPT"),
            format!("-t raw OUTPUT -p tcp -s {ip} --sport 53 {c} {skip} -j NOTRACK"),
            format!("-t raw OUTPUT -p udp -s {ip} --sport 53 {c} {skip} -j NOTRACK"),
            format!("-t filter OUTPUT -p tcp -s {ip} --sport 53 {c} {allow} -j ACCEPT"),
            format!("-t filter OUTPUT -p udp -s {ip} --sport 53 {c} {allow} -j ACCEPT"),
            format!("-t raw OUTPUT -p tcp -d {ip} --dport 53 {c} {skip} -j NOTRACK"),
            format!("-t raw OUTPUT -p udp -d {ip} --dport 53 {c} {skip} -j NOTRACK"),
            format!("-t raw OUTPUT -p tcp -d {ip} --dport 8080 {c} {skip} -j NOTRACK"),
            format!("-t raw OUTPUT -p tcp -s {ip} --sport 8080 {c} {skip} -j NOTRACK"),
        ];
        assert_eq!(shown, expected);
        assert!(rules.iter().all(|r| r.family == Family::V4));
    }

    #[test]
    fn ipv6_rules_go_to_ip6tables() {
        let rules = rules_for("fd30:1319:f1e:230b::1".parse().unwrap(), 5353, 8099);
        assert!(rules.iter().all(|r| r.family == Family::V6));
        assert!(rules[0].spec.contains(&"fd30:1319:f1e:230b::1".to_owned()));
        assert!(rules[0].spec.contains(&"5353".to_owned()));
        assert!(rules[11].spec.contains(&"8099".to_owned()));
    }

    #[test]
    fn backend_with_more_rules_or_the_hint_chain_wins() {
        let empty = "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        let some = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n";
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        assert_eq!(choose_mode(empty, empty), None);
        assert_eq!(choose_mode(some, empty), Some(Mode::Legacy));
        assert_eq!(choose_mode(empty, some), Some(Mode::Nft));
        // kube-proxy's hint beats a rule count (e.g. stale legacy rules from an old image).
        assert_eq!(choose_mode(some, hint), Some(Mode::Nft));
        assert_eq!(choose_mode(hint, hint), None);
    }

    #[test]
    fn version_string_names_the_mode() {
        assert_eq!(
            mode_from_version("iptables v1.8.9 (nf_tables)\n"),
            Mode::Nft
        );
        assert_eq!(
            mode_from_version("iptables v1.8.9 (legacy)\n"),
            Mode::Legacy
        );
        assert_eq!(mode_from_version("iptables v1.6.1\n"), Mode::Legacy);
    }
}
