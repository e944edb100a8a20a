//! The typed model of a Corefile, after `__PILLAR__` substitution and parsing
//! ([`crate::corefile`]). Everything the runtime needs and nothing about the text it came from,
//! except [`Location`]s for messages.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cache;

/// CoreDNS's default DNS port.
pub const DEFAULT_PORT: u16 = 53;

/// Upstream queries in flight per `forward` at most when the Corefile does not say
/// (`max_concurrent`); more are answered REFUSED at once. CoreDNS has no default (unlimited):
/// this is a deliberate deviation, because without a bound a random-subdomain flood or an
/// `ndots:5` storm grows tasks and sockets until the process runs out of descriptors, and then
/// cached names fail too.
///
/// Why 1000: CoreDNS's sizing rule is "more than the upstream query rate times its latency";
/// 1000 covers 10 000 misses/s at 100 ms, or 2 000/s at 500 ms, far beyond what one node's
/// pods cause when nothing is wrong. Each query in flight holds one UDP socket (or a share of
/// a pooled TCP connection), a task and its buffers, so the cap is a descriptor and memory
/// budget too: node-cache's Corefile has four `forward` blocks, 4000 sockets at most, which is
/// more than the soft limit of 1024 many runtimes start a process with (hence
/// `agentkit::process::raise_nofile`) and far below the hard limit (524288 or more under
/// systemd and the common container runtimes). It is the value of the stock kube-system
/// CoreDNS Corefile and of AKS LocalDNS. `max_concurrent 0` in the Corefile opts out
/// (unlimited, CoreDNS's behaviour).
pub const DEFAULT_MAX_CONCURRENT: usize = 1000;

/// A whole Corefile: its server blocks in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The server blocks.
    pub blocks: Vec<ServerBlock>,
}

/// Where something was written: for error messages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (the Corefile or an imported file).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One server block, such as `cluster.local:53 { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerBlock {
    /// Its zones, lower-case, absolute with a trailing dot (`"cluster.local."`, `"."`).
    pub zones: Vec<String>,
    /// The port of the block's keys (all keys of one block share it).
    pub port: u16,
    /// `bind`: the addresses to listen on; empty means the wildcard addresses of both families.
    pub bind: Vec<IpAddr>,
    /// `cache`; None: answers are not cached.
    pub cache: Option<cache::Policy>,
    /// `forward`; None: queries are answered SERVFAIL (nothing to ask).
    pub forward: Option<Forward>,
    /// `prometheus`: where to serve metrics (CoreDNS's default `localhost:9153` when given
    /// without an address; `:9253` means every address, port 9253).
    pub prometheus: Option<SocketAddr>,
    /// `health`: where `/health` is served (CoreDNS's default `:8080` when given bare).
    pub health: Option<SocketAddr>,
    /// `errors`: log errors.
    pub errors: bool,
    /// `log`: log every query.
    pub log: bool,
    /// `loop`: probe for a forwarding loop at start-up and stop if there is one.
    pub loop_detect: bool,
    /// `reload`: re-read the Corefile every `interval` (± `jitter`).
    pub reload: Option<Reload>,
    /// `fastpath MODE IFACE...` (ours): answer cache hits in the kernel on these interfaces.
    pub fast_path: Option<FastPath>,
    /// Where the block starts.
    pub location: Location,
}

/// The `fastpath` directive (ours, not CoreDNS's): `fastpath tc|xdp IFACE...`. It switches
/// the kernel fast path on for the whole process, like `-fast-path-interfaces` and
/// `-fast-path-mode` (the flags win when both are given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastPath {
    /// XDP or tc.
    pub mode: ebpf::dns::Mode,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
}

/// The `reload` plugin's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// Check interval (CoreDNS default 30 s).
    pub interval: Duration,
    /// Random jitter (CoreDNS default 15 s).
    pub jitter: Duration,
}

/// How `forward` picks among its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// A random order per query (CoreDNS's default).
    #[default]
    Random,
    /// Rotate the first upstream per query.
    RoundRobin,
    /// Always in the written order.
    Sequential,
}

/// The `forward` plugin's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// The `FROM` zone, lower-case with a trailing dot.
    pub from: String,
    /// The upstreams (port 53 unless written), at most 15.
    pub to: Vec<SocketAddr>,
    /// Zones not forwarded (`except`), lower-case with a trailing dot.
    pub except: Vec<String>,
    /// `force_tcp`: always TCP.
    pub force_tcp: bool,
    /// `prefer_udp`: UDP even when the client asked over TCP (TCP only after truncation).
    pub prefer_udp: bool,
    /// `expire`: idle pooled connections older than this are closed (default 10 s).
    pub expire: Duration,
    /// `max_fails`: consecutive failures that mark an upstream down (default 2; 0: never).
    pub max_fails: u32,
    /// `health_check`: probe interval of a down upstream (default 0.5 s).
    pub health_check: Duration,
    /// `health_check ... no_rec`: probes without RD.
    pub health_check_no_rec: bool,
    /// `health_check ... domain NAME`: the probe's name (default `.`).
    pub health_check_domain: String,
    /// `policy`.
    pub policy: Policy,
    /// `max_concurrent`: in-flight upstream queries at most; more are answered REFUSED.
    /// [`DEFAULT_MAX_CONCURRENT`] unless the Corefile says; None (`max_concurrent 0`):
    /// unlimited.
    pub max_concurrent: Option<usize>,
    /// `read_timeout`-like per-attempt timeout (CoreDNS 2 s).
    pub attempt_timeout: Duration,
}

impl Forward {
    /// CoreDNS's defaults for `forward FROM TO...`, except `max_concurrent`, which is
    /// [`DEFAULT_MAX_CONCURRENT`] (CoreDNS: unlimited). The Corefile parser starts from this.
    pub fn new(from: String, to: Vec<SocketAddr>) -> Self {
        Forward {
            from,
            to,
            except: Vec::new(),
            force_tcp: false,
            prefer_udp: false,
            expire: Duration::from_secs(10),
            max_fails: 2,
            health_check: Duration::from_millis(500),
            health_check_no_rec: false,
            health_check_domain: ".".to_owned(),
            policy: Policy::Random,
            max_concurrent: Some(DEFAULT_MAX_CONCURRENT),
            attempt_timeout: Duration::from_secs(2),
        }
    }
}
