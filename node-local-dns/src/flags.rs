//! The command line of k8s-dns-node-cache, parsed the way Go's `flag` package does: one or two
//! dashes, `-name value` or `-name=value`, booleans as `-name` or `-name=false` (never
//! `-name false`), parsing stops at the first non-flag or at `--`. The upstream manifest's
//! `args:` therefore work unchanged.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// node-cache's default interface name.
pub const DEFAULT_INTERFACE: &str = "nodelocaldns";
/// node-cache's default health port (only used for the NOTRACK rules of the probe traffic).
pub const DEFAULT_HEALTH_PORT: u16 = 8080;
/// node-cache's default rule and interface check interval.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// node-cache's default address of its own metrics (`coredns_nodecache_setup_errors_total`).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9353";
/// node-cache's default Corefile template.
pub const DEFAULT_BASE_COREFILE: &str = "/etc/coredns/Corefile.base";
/// CoreDNS's default Corefile path as node-cache uses it.
pub const DEFAULT_COREFILE: &str = "/etc/Corefile";
/// Where the kube-dns ConfigMap is mounted when `-kubednscm` is not given.
pub const DEFAULT_KUBE_DNS_DIR: &str = "/etc/kube-dns";
/// node-cache's default upstream service (the manifest passes `kube-dns-upstream`).
pub const DEFAULT_UPSTREAM_SERVICE: &str = "kube-dns";

/// Everything the command line sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Flags {
    /// `-localip`: the addresses to hold on the interface and intercept (both families may mix).
    pub local_ips: Vec<IpAddr>,
    /// `-conf`: the Corefile to serve (rendered from `-basecorefile` when that exists).
    pub conf: PathBuf,
    /// `-basecorefile`: the template with `__PILLAR__` variables.
    pub base_corefile: PathBuf,
    /// `-upstreamsvc`: the service whose ClusterIP fills `__PILLAR__CLUSTER__DNS__`.
    pub upstream_service: String,
    /// `-setupinterface`.
    pub setup_interface: bool,
    /// `-interfacename`.
    pub interface: String,
    /// `-setupiptables`.
    pub setup_iptables: bool,
    /// `-skipteardown`: leave interface and rules in place on exit.
    pub skip_teardown: bool,
    /// `-syncinterval`: how often rules and interface are checked and repaired.
    pub sync_interval: Duration,
    /// `-health-port`: the port of the probe traffic the rules let through.
    pub health_port: u16,
    /// `-metrics-listen-address`: node-cache's own metrics.
    pub metrics_listen: SocketAddr,
    /// `-kubednscm`: the kube-dns ConfigMap directory (`stubDomains`, `upstreamNameservers`).
    pub kube_dns_dir: Option<PathBuf>,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `-dns.port`: CoreDNS's default port for blocks that do not name one.
    pub dns_port: u16,
    /// `-fast-path-interfaces`: interfaces to attach the kernel fast path to (ours; empty:
    /// off unless the Corefile's `fastpath` names some).
    pub fast_path_interfaces: Vec<String>,
    /// `-fast-path-mode`: `xdp` or `tc` (ours).
    pub fast_path_mode: ebpf::dns::Mode,
    /// `-fast-path-capacity`: entries of the kernel map (ours).
    pub fast_path_capacity: u32,
    /// `-check`: render and parse the Corefile, print a summary and exit (ours).
    pub check: bool,
    /// `-version`.
    pub version: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            local_ips: Vec::new(),
            conf: PathBuf::from(DEFAULT_COREFILE),
            base_corefile: PathBuf::from(DEFAULT_BASE_COREFILE),
            upstream_service: DEFAULT_UPSTREAM_SERVICE.to_owned(),
            setup_interface: true,
            interface: DEFAULT_INTERFACE.to_owned(),
            setup_iptables: true,
            skip_teardown: false,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            health_port: DEFAULT_HEALTH_PORT,
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9353)),
            kube_dns_dir: None,
            pidfile: None,
            dns_port: crate::config::DEFAULT_PORT,
            fast_path_interfaces: Vec::new(),
            fast_path_mode: ebpf::dns::Mode::Tc,
            fast_path_capacity: ebpf::dns::DEFAULT_CAPACITY,
            check: false,
            version: false,
        }
    }
}

/// A command line that cannot be used; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// `-h` or `-help`: print [`USAGE`].
    #[error("help requested")]
    Help,
    /// Not one of ours.
    #[error("flag provided but not defined: -{0}")]
    Unknown(String),
    /// A flag that takes a value came last.
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    /// The value does not parse.
    #[error("invalid value {value:?} for flag -{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: String,
        /// What was given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// Arguments after the flags.
    #[error("unexpected argument {0:?}")]
    Positional(String),
}

/// The help text.
pub const USAGE: &str = "\
Usage of node-local-dns (flags of k8s-dns-node-cache; one or two dashes):
  -localip IPS               comma-separated IPs to listen on and intercept (IPv4 and IPv6 may mix)
  -conf FILE                 the Corefile to serve (default /etc/Corefile)
  -basecorefile FILE         the Corefile template with __PILLAR__ variables (default /etc/coredns/Corefile.base)
  -upstreamsvc NAME          service whose <NAME>_SERVICE_HOST fills __PILLAR__CLUSTER__DNS__ (default kube-dns)
  -kubednscm DIR             kube-dns ConfigMap directory (default /etc/kube-dns if it exists)
  -setupinterface[=BOOL]     create the interface holding the local IPs (default true)
  -interfacename NAME        its name (default nodelocaldns)
  -setupiptables[=BOOL]      install the NOTRACK/ACCEPT rules (default true)
  -skipteardown[=BOOL]       keep interface and rules on exit (default false)
  -syncinterval N            seconds (or a duration like 30s) between rule checks (default 60)
  -health-port PORT          health port the rules let through (default 8080)
  -metrics-listen-address A  address of coredns_nodecache_setup_errors_total (default 0.0.0.0:9353)
  -pidfile FILE              write the process ID here once serving
  -dns.port PORT             port of server blocks that name none (default 53)
  -fast-path-interfaces IFS  comma-separated interfaces to answer cache hits on in the kernel (ours)
  -fast-path-mode MODE       tc (default; works on pod veths) or xdp (ours)
  -fast-path-capacity N      entries of the kernel's cache map (default 10240; ours)
  -check                     render and parse the Corefile, then exit
  -version                   print the version and exit
";

#[derive(Clone, Copy)]
enum Kind {
    Bool,
    Value,
}

fn kind(name: &str) -> Option<Kind> {
    Some(match name {
        "setupinterface" | "setupiptables" | "skipteardown" | "check" | "version"
        | "reloadwithsignal" => Kind::Bool,
        "localip"
        | "conf"
        | "basecorefile"
        | "corefile"
        | "upstreamsvc"
        | "interfacename"
        | "syncinterval"
        | "health-port"
        | "metrics-listen-address"
        | "prometheus-listen-address"
        | "kubednscm"
        | "pidfile"
        | "dns.port"
        | "fast-path-interfaces"
        | "fast-path-mode"
        | "fast-path-capacity" => Kind::Value,
        _ => return None,
    })
}

/// Parses `args` (without the program name).
pub fn parse<I, S>(args: I) -> Result<Flags, FlagError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut flags = Flags::default();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty())
        else {
            return Err(FlagError::Positional(arg));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (body.to_owned(), None),
        };
        if name == "h" || name == "help" {
            return Err(FlagError::Help);
        }
        let value = match kind(&name) {
            None => return Err(FlagError::Unknown(name)),
            Some(Kind::Bool) => inline.unwrap_or_else(|| "true".to_owned()),
            Some(Kind::Value) => match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| FlagError::MissingValue(name.clone()))?,
            },
        };
        set(&mut flags, &name, &value)?;
    }
    if let Some(extra) = args.next() {
        return Err(FlagError::Positional(extra));
    }
    Ok(flags)
}

fn set(flags: &mut Flags, name: &str, value: &str) -> Result<(), FlagError> {
    let invalid = |reason: &str| FlagError::Invalid {
        flag: name.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    match name {
        "localip" => {
            flags.local_ips = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<IpAddr>()
                        .map_err(|_| invalid(&format!("{s:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?;
        }
        "conf" | "corefile" => flags.conf = PathBuf::from(value),
        "basecorefile" => flags.base_corefile = PathBuf::from(value),
        "upstreamsvc" => flags.upstream_service = value.to_owned(),
        "interfacename" => {
            if value.is_empty() || value.len() > 15 || value.contains(['/', ' ']) {
                return Err(invalid("not a valid interface name (1-15 characters)"));
            }
            flags.interface = value.to_owned();
        }
        "syncinterval" => flags.sync_interval = parse_interval(value).map_err(|r| invalid(&r))?,
        "health-port" => {
            flags.health_port = value.parse().map_err(|_| invalid("not a port number"))?;
        }
        "dns.port" => {
            flags.dns_port = value.parse().map_err(|_| invalid("not a port number"))?;
        }
        "metrics-listen-address" => {
            flags.metrics_listen = parse_listen(value).map_err(|r| invalid(&r))?;
        }
        // Newer node-cache's address of the CoreDNS metrics: the Corefile's `prometheus`
        // decides here, so it is accepted and ignored.
        "prometheus-listen-address" | "reloadwithsignal" => {}
        "kubednscm" => flags.kube_dns_dir = Some(PathBuf::from(value)),
        "fast-path-interfaces" => {
            flags.fast_path_interfaces = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.len() > 15 || s.contains(['/', ' ']) {
                        Err(invalid(&format!("{s:?} is not an interface name")))
                    } else {
                        Ok(s.to_owned())
                    }
                })
                .collect::<Result<_, _>>()?;
        }
        "fast-path-mode" => {
            flags.fast_path_mode = value.parse().map_err(|r: String| invalid(&r))?
        }
        "fast-path-capacity" => {
            flags.fast_path_capacity = value
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid("not a positive number of entries"))?;
        }
        "pidfile" => flags.pidfile = Some(PathBuf::from(value)),
        "setupinterface" => flags.setup_interface = parse_bool(value).map_err(|r| invalid(&r))?,
        "setupiptables" => flags.setup_iptables = parse_bool(value).map_err(|r| invalid(&r))?,
        "skipteardown" => flags.skip_teardown = parse_bool(value).map_err(|r| invalid(&r))?,
        "check" => flags.check = parse_bool(value).map_err(|r| invalid(&r))?,
        "version" => flags.version = parse_bool(value).map_err(|r| invalid(&r))?,
        _ => return Err(FlagError::Unknown(name.to_owned())),
    }
    Ok(())
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("not a boolean".to_owned()),
    }
}

/// node-cache multiplies the flag by a second, so `60` means 60 s; a Go duration (`30s`,
/// `1m30s`, `500ms`) is taken as written rather than multiplied again.
fn parse_interval(value: &str) -> Result<Duration, String> {
    let d = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        crate::corefile::parse_go_duration(value)?
    };
    if d.is_zero() {
        return Err("must be above zero".to_owned());
    }
    Ok(d)
}

/// `host:port` as Go's net.Listen takes it: `:9353` means every address.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| "not a port number".to_owned())?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some((host, port)) = value.rsplit_once(':') {
        if host == "localhost" {
            let port: u16 = port.parse().map_err(|_| "not a port number".to_owned())?;
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    value
        .parse()
        .map_err(|_| "not an address like 0.0.0.0:9353, [::1]:9353 or :9353".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_manifest_args_parse() {
        let f = parse([
            "-localip",
            "169.254.20.10,10.96.0.10",
            "-conf",
            "/etc/Corefile",
            "-upstreamsvc",
            "kube-dns-upstream",
            "-pidfile",
            "/tmp/node-cache.pid",
        ])
        .unwrap();
        assert_eq!(
            f.local_ips,
            vec![
                "169.254.20.10".parse::<IpAddr>().unwrap(),
                "10.96.0.10".parse().unwrap()
            ]
        );
        assert_eq!(f.upstream_service, "kube-dns-upstream");
        assert_eq!(
            f.pidfile.as_deref(),
            Some(std::path::Path::new("/tmp/node-cache.pid"))
        );
        assert!(f.setup_interface && f.setup_iptables && !f.skip_teardown);
        assert_eq!(f.base_corefile, PathBuf::from(DEFAULT_BASE_COREFILE));
    }

    #[test]
    fn the_issue_example_parses_with_go_style_booleans() {
        let f = parse([
            "-localip",
            "127.0.0.1",
            "-conf",
            "Corefile",
            "-setupinterface=false",
            "-setupiptables=false",
            "-health-port",
            "18080",
        ])
        .unwrap();
        assert!(!f.setup_interface && !f.setup_iptables);
        assert_eq!(f.health_port, 18080);
        assert_eq!(f.conf, PathBuf::from("Corefile"));
    }

    #[test]
    fn double_dashes_and_equals_work_too() {
        let f = parse([
            "--localip=fd30:1319:f1e:230b::1,169.254.20.10",
            "--skipteardown",
            "--syncinterval=30s",
            "--metrics-listen-address",
            ":19353",
            "--health-port=8099",
        ])
        .unwrap();
        assert_eq!(f.local_ips.len(), 2);
        assert!(f.skip_teardown);
        assert_eq!(f.sync_interval, Duration::from_secs(30));
        assert_eq!(f.metrics_listen, "0.0.0.0:19353".parse().unwrap());
        assert_eq!(f.health_port, 8099);
    }

    #[test]
    fn fast_path_flags_parse_and_name_bad_values() {
        let f = parse([
            "--fast-path-interfaces=veth1, eth0",
            "-fast-path-mode",
            "xdp",
            "-fast-path-capacity=4096",
        ])
        .unwrap();
        assert_eq!(f.fast_path_interfaces, vec!["veth1", "eth0"]);
        assert_eq!(f.fast_path_mode, ebpf::dns::Mode::Xdp);
        assert_eq!(f.fast_path_capacity, 4096);
        assert_eq!(Flags::default().fast_path_mode, ebpf::dns::Mode::Tc);
        let e = parse(["-fast-path-mode", "afxdp"]).unwrap_err();
        assert!(
            e.to_string().contains("-fast-path-mode") && e.to_string().contains("xdp or tc"),
            "{e}"
        );
        let e = parse(["-fast-path-capacity", "0"]).unwrap_err();
        assert!(e.to_string().contains("-fast-path-capacity"), "{e}");
        let e = parse(["-fast-path-interfaces", "a-name-far-too-long-for-linux"]).unwrap_err();
        assert!(e.to_string().contains("not an interface name"), "{e}");
    }

    #[test]
    fn sync_interval_is_seconds_when_bare() {
        assert_eq!(
            parse(["-syncinterval", "5"]).unwrap().sync_interval,
            Duration::from_secs(5)
        );
        assert_eq!(
            parse(["-syncinterval=1m30s"]).unwrap().sync_interval,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn errors_name_the_flag() {
        let e = parse(["-localip", "169.254.20.300"]).unwrap_err();
        assert!(e.to_string().contains("-localip"), "{e}");
        assert!(e.to_string().contains("169.254.20.300"), "{e}");
        assert_eq!(
            parse(["-nosuch"]).unwrap_err(),
            FlagError::Unknown("nosuch".into())
        );
        assert_eq!(
            parse(["-conf"]).unwrap_err(),
            FlagError::MissingValue("conf".into())
        );
        let e = parse(["-setupiptables=maybe"]).unwrap_err();
        assert!(e.to_string().contains("-setupiptables"), "{e}");
        assert!(matches!(
            parse(["-health-port", "99999"]).unwrap_err(),
            FlagError::Invalid { .. }
        ));
        // Go's flag package: a bare boolean never consumes the next argument.
        assert_eq!(
            parse(["-skipteardown", "false"]).unwrap_err(),
            FlagError::Positional("false".into())
        );
        assert_eq!(parse(["-h"]).unwrap_err(), FlagError::Help);
    }
}
