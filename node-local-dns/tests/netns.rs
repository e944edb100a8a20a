//! Privileged: the real binary with interception on (`nodelocaldns` link and node-cache's 12
//! iptables rules per listen IP), dual-stack in one process, each test in a network namespace
//! of its own. The agent runs under `ip netns exec`; the upstream's sockets and the test's
//! clients are made by threads that entered the namespace with `setns` (a socket stays in the
//! namespace it was created in); `iptables-save` and `ip` run from such threads too. The
//! namespace, and every link and rule in it, is deleted on drop, so also when a test fails.
//! Needs `ip` (iproute2) and `iptables`; skips loudly without root, fails under
//! `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agentkit::testing::{require_privileges, run_command as run, NetNs};
use common::{query, rcode_of, Agent, Authority};
use node_local_dns::intercept::iptables::COMMENT_PREFIX;
use node_local_dns::intercept::{DEFAULT_INTERFACE, LINK_KINDS};
use node_local_dns::wire::{rcode, rtype};

/// Gardener's IPv4 and IPv6 listen IPs.
const LINK_LOCAL: &str = "169.254.20.10";
const LINK_LOCAL_V6: &str = "fd30:1319:f1e:230b::1";
const LOCAL_IPS: &str = "169.254.20.10,fd30:1319:f1e:230b::1";
/// Gardener's health port.
const HEALTH_PORT: &str = "18099";
/// node-cache's setup-error metrics, inside the namespace.
const SETUP_METRICS: &str = "127.0.0.1:19353";
const RULES_PER_IP: usize = 12;
/// With `-syncinterval 1` a deleted rule must be back within this.
const REPAIR_LIMIT: Duration = Duration::from_secs(3);
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// The upstream's TTL.
const TTL: u32 = 300;

/// A test's network namespace with the helpers these tests use inside it.
struct Ns(NetNs);

impl std::ops::Deref for Ns {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.0
    }
}

impl Ns {
    fn create() -> Ns {
        Ns(NetNs::create("nld-"))
    }

    /// An upstream on 127.0.0.1 inside the namespace.
    fn authority(&self) -> Authority {
        let (udp, tcp) = self.run(|| {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).unwrap();
            (udp, tcp)
        });
        Authority::from_std(udp, tcp, TTL)
    }

    /// One UDP query from inside the namespace.
    fn ask(&self, server: SocketAddr, packet: Vec<u8>) -> Option<Vec<u8>> {
        self.run(move || {
            let local: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let socket = UdpSocket::bind(local).unwrap();
            socket.set_read_timeout(Some(ASK_TIMEOUT)).unwrap();
            socket.send_to(&packet, server).unwrap();
            let mut buf = vec![0u8; 65535];
            let deadline = Instant::now() + ASK_TIMEOUT;
            while Instant::now() < deadline {
                let Ok(n) = socket.recv(&mut buf) else {
                    return None;
                };
                if n >= 2 && buf[..2] == packet[..2] {
                    buf.truncate(n);
                    return Some(buf);
                }
            }
            None
        })
    }

    /// One TCP query from inside the namespace.
    fn ask_tcp(&self, server: SocketAddr, packet: Vec<u8>) -> Vec<u8> {
        self.run(move || {
            let mut s = TcpStream::connect_timeout(&server, ASK_TIMEOUT).unwrap();
            s.set_read_timeout(Some(ASK_TIMEOUT)).unwrap();
            s.write_all(&(packet.len() as u16).to_be_bytes()).unwrap();
            s.write_all(&packet).unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).unwrap();
            buf
        })
    }

    /// A plain HTTP GET from inside the namespace; the whole response.
    fn http_get(&self, addr: &str, path: &str) -> String {
        let (addr, path) = (addr.parse::<SocketAddr>().unwrap(), path.to_owned());
        self.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, ASK_TIMEOUT).unwrap();
            s.set_read_timeout(Some(ASK_TIMEOUT)).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    }

    /// `program args` run inside the namespace.
    fn cmd(&self, program: &str, args: &[&str]) -> String {
        let (program, args): (String, Vec<String>) = (
            program.to_owned(),
            args.iter().map(|s| (*s).to_owned()).collect(),
        );
        self.run(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&program, &refs)
        })
    }

    /// Our rules in `<family>tables-<backend>-save`, as (table, rule line).
    fn rules(&self, family: &str, backend: &str) -> Vec<(String, String)> {
        let save = self.cmd(&format!("{family}tables-{backend}-save"), &[]);
        let mut table = String::new();
        let mut out = Vec::new();
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_owned();
            } else if line.contains(&format!("--comment \"{COMMENT_PREFIX}")) {
                out.push((table.clone(), line.to_owned()));
            }
        }
        out
    }

    /// Our rules of both families, in both backends (for "nothing left behind").
    fn rules_anywhere(&self) -> Vec<(String, String)> {
        let mut all = Vec::new();
        for backend in ["legacy", "nft"] {
            for family in ["ip", "ip6"] {
                all.extend(self.rules(family, backend));
            }
        }
        all
    }

    fn link_details(&self) -> Option<String> {
        self.run(|| {
            let out = Command::new("ip")
                .args(["-d", "-o", "link", "show", DEFAULT_INTERFACE])
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
    }
}

/// The value of `field=` in the first log line containing `message` (quotes stripped).
fn log_field(log: &str, message: &str, field: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(message))?;
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    let value = line[start..].split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}

/// Writes a Corefile that serves `.` on port 53 of `binds` (and health on the link-local IP),
/// forwarding to `upstream`.
fn write_corefile(dir: &Path, binds: &str, upstream: SocketAddr) {
    std::fs::write(
        dir.join("Corefile"),
        format!(
            ".:53 {{\n    errors\n    cache 30\n    bind {binds}\n    forward . {upstream}\n    health {LINK_LOCAL}:{HEALTH_PORT}\n}}\n"
        ),
    )
    .unwrap();
}

/// node-cache's flags as Gardener passes them, interception on, plus `extra`.
fn agent_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-localip",
        LOCAL_IPS,
        "-conf",
        "Corefile",
        "-basecorefile",
        "no-template-here",
        "-health-port",
        HEALTH_PORT,
        "-syncinterval",
        "1",
        "-metrics-listen-address",
        SETUP_METRICS,
    ];
    args.extend_from_slice(extra);
    args
}

/// The backend the agent chose, from its log.
fn backend_of(agent: &Agent) -> String {
    let log = agent.log();
    let backend = log_field(&log, "chose the iptables backend", "backend")
        .unwrap_or_else(|| panic!("no backend in the log:\n{log}"));
    assert!(backend == "legacy" || backend == "nft", "{backend}");
    backend
}

/// Asserts 12 rules per listen IP in each family, each once, with node-cache's comments.
fn assert_rules(ns: &Ns, backend: &str, context: &str) {
    for (family, ip, prefix) in [("ip", LINK_LOCAL, "/32"), ("ip6", LINK_LOCAL_V6, "/128")] {
        let rules = ns.rules(family, backend);
        assert_eq!(rules.len(), RULES_PER_IP, "{context}: {family}: {rules:#?}");
        let mut unique: Vec<_> = rules.iter().map(|(t, l)| format!("{t} {l}")).collect();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            RULES_PER_IP,
            "{context}: duplicates: {rules:#?}"
        );
        let skip = rules
            .iter()
            .filter(|(t, l)| t == "raw" && l.contains("\"NodeLocal DNS Cache: skip conntrack\""))
            .count();
        let allow = rules
            .iter()
            .filter(|(t, l)| {
                t == "filter" && l.contains("\"NodeLocal DNS Cache: allow DNS traffic\"")
            })
            .count();
        assert_eq!((skip, allow), (8, 4), "{context}: {rules:#?}");
        assert!(
            rules
                .iter()
                .all(|(_, l)| l.contains(&format!("{ip}{prefix}"))),
            "{context}: {rules:#?}"
        );
        assert!(
            rules
                .iter()
                .any(|(_, l)| l.contains(&format!("--dport {HEALTH_PORT}"))),
            "{context}: no health-port rule: {rules:#?}"
        );
    }
}

/// Asserts a query for `name` to port 53 of `ip` is answered with the upstream's A record.
fn assert_answers(ns: &Ns, ip: &str, name: &str, id: u16) {
    let server = SocketAddr::new(ip.parse().unwrap(), 53);
    let reply = ns
        .ask(server, query(id, name, rtype::A))
        .unwrap_or_else(|| panic!("no answer from {server}"));
    assert_eq!(rcode_of(&reply), rcode::NOERROR, "{server}");
    assert_eq!(common::ancount(&reply), 1, "{server}");
}

fn dir_for(test: &str) -> std::path::PathBuf {
    common::temp_dir(test)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_interception_is_set_up_repaired_and_torn_down() {
    if !require_privileges("dual_stack_interception_is_set_up_repaired_and_torn_down") {
        return;
    }
    let ns = Ns::create();
    let upstream = ns.authority();
    let dir = dir_for("netns-lifecycle");
    write_corefile(
        &dir,
        &format!("{LINK_LOCAL} {LINK_LOCAL_V6}"),
        upstream.addr,
    );
    let mut agent = Agent::start_in_netns(&dir, ns.name(), &agent_args(&[]));
    agent.wait_serving().await;
    let log = agent.log();

    // The link, of the kind the log names, up, with both addresses (IPv6 not tentative).
    let kind = log_field(&log, "created the listen link", "kind")
        .unwrap_or_else(|| panic!("no link creation in the log:\n{log}"));
    assert!(LINK_KINDS.contains(&kind.as_str()), "{kind}");
    let details = ns.link_details().expect("the nodelocaldns link exists");
    assert!(details.contains(&format!(" {kind} ")), "{kind}: {details}");
    let addresses = ns.cmd("ip", &["-o", "addr", "show", "dev", DEFAULT_INTERFACE]);
    for (ip, prefix) in [(LINK_LOCAL, "/32"), (LINK_LOCAL_V6, "/128")] {
        let line = addresses
            .lines()
            .find(|l| l.contains(&format!(" {ip}{prefix} ")))
            .unwrap_or_else(|| panic!("{ip}{prefix} missing:\n{addresses}"));
        assert!(!line.contains("tentative"), "{line}");
    }

    let backend = backend_of(&agent);
    assert_rules(&ns, &backend, "after start");

    // Both families answered by the one process, over UDP and TCP.
    assert_answers(&ns, LINK_LOCAL, "v4.netns.test", 1);
    assert_answers(&ns, LINK_LOCAL_V6, "v6.netns.test", 2);
    let tcp = ns.ask_tcp(
        SocketAddr::new(LINK_LOCAL_V6.parse().unwrap(), 53),
        query(3, "tcp.netns.test", rtype::A),
    );
    assert_eq!(rcode_of(&tcp), rcode::NOERROR);
    let health = ns.http_get(&format!("{LINK_LOCAL}:{HEALTH_PORT}"), "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // Repair: a rule deleted by hand is back within a few sync intervals.
    let (table, line) = ns
        .rules("ip", &backend)
        .into_iter()
        .find(|(t, l)| t == "raw" && l.starts_with("-A PREROUTING") && l.contains("-p udp"))
        .unwrap();
    let delete = format!(
        "{}tables-{backend} -w -t {table} {}",
        "ip",
        line.replacen("-A ", "-D ", 1)
    );
    ns.cmd("sh", &["-c", &delete]);
    assert_eq!(ns.rules("ip", &backend).len(), RULES_PER_IP - 1, "deleted");
    let deleted_at = Instant::now();
    loop {
        if ns.rules("ip", &backend).len() == RULES_PER_IP {
            break;
        }
        assert!(
            deleted_at.elapsed() < REPAIR_LIMIT,
            "rule not back after {REPAIR_LIMIT:?}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_rules(&ns, &backend, "after repair");
    assert!(
        agent.log().contains("Added back nodelocaldns rules"),
        "{}",
        agent.log()
    );
    let metrics = ns.http_get(SETUP_METRICS, "/metrics");
    assert!(
        metrics.contains(r#"coredns_nodecache_setup_errors_total{errortype="iptables"} 0"#),
        "{metrics}"
    );

    // SIGTERM: exit 0, no rule with the comment prefix left, the link gone.
    let status = agent.terminate().await;
    assert!(status.success(), "{status}:\n{}", agent.log());
    let left = ns.rules_anywhere();
    assert!(left.is_empty(), "rules left: {left:#?}");
    assert_eq!(ns.link_details(), None, "the link is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipteardown_leaves_rules_that_the_next_instance_adopts() {
    if !require_privileges("skipteardown_leaves_rules_that_the_next_instance_adopts") {
        return;
    }
    let ns = Ns::create();
    let upstream = ns.authority();
    let dir = dir_for("netns-skipteardown");
    write_corefile(
        &dir,
        &format!("{LINK_LOCAL} {LINK_LOCAL_V6}"),
        upstream.addr,
    );

    let mut first = Agent::start_in_netns(&dir, ns.name(), &agent_args(&["-skipteardown"]));
    first.wait_serving().await;
    let backend = backend_of(&first);
    assert_rules(&ns, &backend, "first instance");
    let status = first.terminate().await;
    assert!(status.success(), "{status}:\n{}", first.log());
    assert_rules(&ns, &backend, "after -skipteardown exit");
    assert!(ns.link_details().is_some(), "the link is gone");

    let mut second = Agent::start_in_netns(&dir, ns.name(), &agent_args(&[]));
    second.wait_serving().await;
    assert_eq!(backend_of(&second), backend);
    assert_rules(&ns, &backend, "second instance adopted");
    let log = second.log();
    assert!(
        !log.contains("added nodelocaldns rule") && !log.contains("created the listen link"),
        "the second instance re-created what was there:\n{log}"
    );
    // Past a sync interval: still no duplicate.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_rules(&ns, &backend, "a sync later");
    assert_answers(&ns, LINK_LOCAL, "adopted.netns.test", 4);
    assert_answers(&ns, LINK_LOCAL_V6, "adopted.netns.test", 5);

    let status = second.terminate().await;
    assert!(status.success(), "{status}:\n{}", second.log());
    let left = ns.rules_anywhere();
    assert!(left.is_empty(), "rules left: {left:#?}");
    assert_eq!(ns.link_details(), None, "the link is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_stops_startup_before_any_rule() {
    if !require_privileges("a_listener_that_cannot_bind_stops_startup_before_any_rule") {
        return;
    }
    let ns = Ns::create();
    let upstream = ns.authority();
    // 127.0.0.1:53 in the namespace, held without SO_REUSEPORT (UDP and TCP): the block that
    // also binds it cannot start.
    let held = ns.run(|| {
        (
            UdpSocket::bind("127.0.0.1:53").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:53").unwrap(),
        )
    });
    let dir = dir_for("netns-bindfail");
    write_corefile(
        &dir,
        &format!("{LINK_LOCAL} {LINK_LOCAL_V6} 127.0.0.1"),
        upstream.addr,
    );
    let mut agent = Agent::start_in_netns(&dir, ns.name(), &agent_args(&[]));
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    let log = agent.log();
    assert!(!status.success(), "{status}:\n{log}");
    assert!(
        log.contains("127.0.0.1:53"),
        "the log names the address:\n{log}"
    );
    let left = ns.rules_anywhere();
    assert!(
        left.is_empty(),
        "rules installed without a listener: {left:#?}\n{log}"
    );
    drop(held);
}
