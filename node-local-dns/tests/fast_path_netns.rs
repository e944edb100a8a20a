//! Privileged: the kernel fast path end to end. A "node" namespace runs the real binary with
//! `-fast-path-interfaces` on the host side of a veth; a "pod" namespace on the other side
//! asks 169.254.20.10 over the veth, as a pod does. Checked in both modes (tc, xdp): the
//! answers are right, the kernel-hit counter rises, and at the very next scrape kernel
//! answers are in `coredns_dns_requests_total`, `coredns_dns_responses_total` and the cache
//! counters, so that requests = hits + misses; answers stay right when an entry expires and
//! when the agent is restarted. In XDP mode with a plain pod end (no XDP program), the agent
//! attaches at tc instead, says why, and counts the fallback. Namespaces (and the veth) are
//! deleted on drop.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use agentkit::testing::{require_privileges, run_command as run, NetNs};
use common::{ancount, query, rcode_of, Agent, Authority};
use ebpf::dns::{DnsFastPath, Mode};
use ebpf::link;
use node_local_dns::wire::{rcode, rtype};

const LOCAL: &str = "169.254.20.10:53";
const METRICS: &str = "127.0.0.1:19253";
/// The upstream's TTL, and the cache's floor brought down to match: entries expire quickly.
const TTL: u32 = 2;
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The node and pod namespaces joined by a veth (`vh0` on the node, `vp0` in the pod).
struct Topology {
    node: NetNs,
    pod: NetNs,
    /// A program on the pod's end of the veth, so that XDP_TX into the veth reaches the pod
    /// (see docs/ebpf.md). It passes everything.
    _pod_napi: Option<DnsFastPath>,
}

impl Topology {
    /// With an XDP program on the pod's end in XDP mode, as XDP_TX needs.
    fn new(mode: Mode) -> Topology {
        Topology::with_pod_program(mode == Mode::Xdp)
    }

    /// The pod's end with an XDP program or plain (no program, GRO off).
    fn with_pod_program(pod_program: bool) -> Topology {
        let node = NetNs::create("nldfp-n");
        let pod = NetNs::create("nldfp-p");
        run(
            "ip",
            &[
                "-n",
                node.name(),
                "link",
                "add",
                "vh0",
                "type",
                "veth",
                "peer",
                "name",
                "vp0",
                "netns",
                pod.name(),
            ],
        );
        for args in [
            vec![
                "-n",
                node.name(),
                "addr",
                "add",
                "10.200.0.1/24",
                "dev",
                "vh0",
            ],
            vec![
                "-n",
                node.name(),
                "addr",
                "add",
                "169.254.20.10/32",
                "dev",
                "lo",
            ],
            vec!["-n", node.name(), "link", "set", "vh0", "up"],
            vec![
                "-n",
                pod.name(),
                "addr",
                "add",
                "10.200.0.2/24",
                "dev",
                "vp0",
            ],
            vec!["-n", pod.name(), "link", "set", "vp0", "up"],
            vec![
                "-n",
                pod.name(),
                "route",
                "add",
                "169.254.20.10/32",
                "via",
                "10.200.0.1",
            ],
        ] {
            run("ip", &args);
        }
        let pod_napi = pod_program.then(|| {
            pod.run(|| {
                let mut path = DnsFastPath::load(1).unwrap();
                path.attach("vp0", Mode::Xdp).unwrap();
                path
            })
        });
        if !pod_program {
            assert!(!pod.run(|| link::set_gro("vp0", false).unwrap()), "GRO off");
        }
        Topology {
            node,
            pod,
            _pod_napi: pod_napi,
        }
    }

    /// An upstream on the node's loopback.
    fn authority(&self) -> Authority {
        let (udp, tcp) = self.node.run(|| {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).unwrap();
            (udp, tcp)
        });
        Authority::from_std(udp, tcp, TTL)
    }

    /// One query from the pod; the reply.
    fn ask(&self, name: &str, id: u16) -> Option<Vec<u8>> {
        let packet = query(id, name, rtype::A);
        self.pod.run(move || {
            let socket = UdpSocket::bind("10.200.0.2:0").unwrap();
            socket.set_read_timeout(Some(ASK_TIMEOUT)).unwrap();
            socket.send_to(&packet, LOCAL).unwrap();
            let mut buf = vec![0u8; 4096];
            let n = socket.recv(&mut buf).ok()?;
            buf.truncate(n);
            Some(buf)
        })
    }

    /// The node agent's metrics text.
    fn metrics(&self) -> String {
        self.node.run(|| {
            let mut s = TcpStream::connect_timeout(&METRICS.parse().unwrap(), ASK_TIMEOUT).unwrap();
            s.set_read_timeout(Some(ASK_TIMEOUT)).unwrap();
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    }
}

/// The sum of a metric's samples whose line contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A metric without labels.
fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name}:\n{text}")) as u64
}

/// Per zone (here the root zone): requests = hits + misses = cache requests = responses.
/// Returns (requests, kernel answers).
fn assert_identities(text: &str) -> (u64, u64) {
    let (z, zs) = ("zone=\".\"", "zones=\".\"");
    let requests = metric(text, "coredns_dns_requests_total", &[z]);
    let responses = metric(text, "coredns_dns_responses_total", &[z]);
    let hits = metric(text, "coredns_cache_hits_total", &[zs]);
    let misses = metric(text, "coredns_cache_misses_total", &[zs]);
    let cache_requests = metric(text, "coredns_cache_requests_total", &[zs]);
    assert_eq!(requests, hits + misses, "requests = hits + misses\n{text}");
    assert_eq!(
        cache_requests, requests,
        "cache requests = requests\n{text}"
    );
    assert_eq!(responses, requests, "a response per request\n{text}");
    let kernel = metric(text, "node_local_dns_fast_path_responses_total", &[z]);
    (requests, kernel)
}

/// Asserts a right answer for `name`: NOERROR, one A record, the upstream's address.
fn assert_answer(reply: Option<Vec<u8>>, name: &str, id: u16, context: &str) {
    let reply = reply.unwrap_or_else(|| panic!("{context}: no answer for {name}"));
    assert_eq!(&reply[..2], &id.to_be_bytes(), "{context}: ID");
    assert_eq!(rcode_of(&reply), rcode::NOERROR, "{context}");
    assert_eq!(ancount(&reply), 1, "{context}");
    let address = &reply[reply.len() - 4..];
    assert_eq!(
        address,
        &[10, 0, 0, name.trim_end_matches('.').len() as u8 + 1],
        "{context}: the upstream's A record"
    );
}

fn write_corefile(dir: &Path, upstream: SocketAddr) {
    std::fs::write(
        dir.join("Corefile"),
        format!(
            ".:53 {{\n    cache 30 {{\n        success 1000 30 1\n    }}\n    bind 169.254.20.10\n    forward . {upstream}\n    prometheus {METRICS}\n}}\n"
        ),
    )
    .unwrap();
}

fn start_agent(dir: &Path, t: &Topology, mode: Mode) -> Agent {
    Agent::start_in_netns(
        dir,
        t.node.name(),
        &[
            "-localip",
            "169.254.20.10",
            "-conf",
            "Corefile",
            "-setupinterface=false",
            "-setupiptables=false",
            "-health-port",
            "18097",
            "-metrics-listen-address",
            "127.0.0.1:19397",
            "-fast-path-interfaces",
            "vh0",
            "-fast-path-mode",
            mode.as_str(),
        ],
    )
}

/// Asks until the kernel answers (the mirror syncs every 100 ms); returns the hit count.
fn wait_kernel_hits(t: &Topology, name: &str, above: u64, context: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut id = 1000;
    loop {
        id += 1;
        assert_answer(t.ask(name, id), name, id, context);
        // The agent reads the kernel's counters at each scrape.
        let hits = metric(
            &t.metrics(),
            "node_local_dns_fast_path_packets_total",
            &["result=\"hit\""],
        );
        if hits > above {
            return hits;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: no kernel hit in 5 s:\n{}",
            t.metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn fast_path_end_to_end(mode: Mode) {
    let t = Topology::new(mode);
    let authority = t.authority();
    let dir = common::temp_dir(&format!("fast-path-{}", mode.as_str()));
    write_corefile(&dir, authority.addr);
    let mut agent = start_agent(&dir, &t, mode);
    agent.wait_serving().await;
    let log = agent.log();
    assert!(log.contains("fast path attached"), "{log}");
    if mode == Mode::Xdp {
        // The self-test: the program read back on vh0, the pod's end able to take XDP_TX.
        assert!(log.contains("XDP_TX replies can reach the pod"), "{log}");
        assert!(!log.contains("attaching at tc instead"), "{log}");
        let link = run("ip", &["-n", t.node.name(), "link", "show", "vh0"]);
        assert!(link.contains(" xdp"), "XDP on vh0: {link}");
    }
    assert_eq!(
        gauge(
            &t.metrics(),
            "node_local_dns_fast_path_xdp_fallback_interfaces"
        ),
        0
    );

    let name = "api.fast.test.";
    assert_answer(
        t.ask(name, 1),
        name,
        1,
        "first query (a miss, from userspace)",
    );
    let hits = wait_kernel_hits(&t, name, 0, "cached");
    let upstream_before = authority.queries.load(std::sync::atomic::Ordering::SeqCst);
    for id in 2..22 {
        assert_answer(t.ask(name, id), name, id, "kernel hits");
    }
    assert_eq!(
        authority.queries.load(std::sync::atomic::Ordering::SeqCst),
        upstream_before,
        "hits never reach the upstream"
    );
    // A burst of misses too (each a new name, then cached).
    for n in 0..5u16 {
        let other = format!("miss{n}.fast.test.");
        assert_answer(t.ask(&other, 300 + n), &other, 300 + n, "misses");
    }
    // No waiting: the scrape reads the kernel's counters itself.
    let text = t.metrics();
    let now = metric(
        &text,
        "node_local_dns_fast_path_packets_total",
        &["result=\"hit\""],
    );
    assert!(
        now >= hits + 20,
        "{mode:?}: 20 more kernel hits: {hits} -> {now}"
    );
    let cache_hits = metric(&text, "coredns_cache_hits_total", &["type=\"success\""]);
    assert!(
        cache_hits >= now,
        "kernel hits are in coredns_cache_hits_total: {cache_hits} < {now}"
    );
    let (requests, kernel) = assert_identities(&text);
    assert_eq!(
        kernel, now,
        "every kernel hit is counted as a kernel answer\n{text}"
    );
    assert!(
        requests >= kernel + 6,
        "kernel answers are in coredns_dns_requests_total: {requests}, {kernel} from the kernel"
    );
    assert!(
        text.contains(r#"node_local_dns_fast_path_responses_total{rcode="NOERROR",server="dns://169.254.20.10:53",type="A",zone="."}"#),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "coredns_dns_responses_total",
            &["plugin=\"cache\"", "rcode=\"NOERROR\""]
        ) >= kernel,
        "kernel answers are cache responses"
    );

    // Past the TTL the kernel passes the query on and userspace refreshes it.
    std::thread::sleep(Duration::from_secs(u64::from(TTL) + 1));
    assert_answer(t.ask(name, 100), name, 100, "after expiry");
    wait_kernel_hits(&t, name, now, "after expiry, cached again");
    let expired = metric(
        &t.metrics(),
        "node_local_dns_fast_path_packets_total",
        &["result=\"expired\""],
    );
    assert!(expired >= 1, "the expired entry was passed to userspace");

    // A restart: the old instance detaches; the new one answers and mirrors afresh.
    let status = agent.terminate().await;
    assert!(status.success(), "{status}: {}", agent.log());
    assert!(agent.log().contains("fast path detached"));
    let mut agent = start_agent(&dir, &t, mode);
    agent.wait_serving().await;
    assert_answer(t.ask(name, 200), name, 200, "after restart");
    wait_kernel_hits(&t, name, 0, "after restart, cached again");
    let status = agent.terminate().await;
    assert!(status.success(), "{status}: {}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tc_fast_path_answers_pods_across_expiry_and_restart() {
    if !require_privileges("tc_fast_path_answers_pods_across_expiry_and_restart") {
        return;
    }
    fast_path_end_to_end(Mode::Tc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_fast_path_answers_pods_across_expiry_and_restart() {
    if !require_privileges("xdp_fast_path_answers_pods_across_expiry_and_restart") {
        return;
    }
    fast_path_end_to_end(Mode::Xdp).await;
}

/// A surge rollout in XDP mode: the new instance cannot attach while the old one's XDP link
/// holds the interface, serves from its sockets meanwhile, and takes the interface over within
/// a couple of seconds of the old one leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_interface_is_taken_over_by_a_surge_instance() {
    if !require_privileges("xdp_interface_is_taken_over_by_a_surge_instance") {
        return;
    }
    let t = Topology::new(Mode::Xdp);
    let authority = t.authority();
    let dir = common::temp_dir("fast-path-surge");
    write_corefile(&dir, authority.addr);
    let mut old = start_agent(&dir, &t, Mode::Xdp);
    old.wait_serving().await;
    let name = "surge.fast.test.";
    assert_answer(t.ask(name, 1), name, 1, "old instance");
    wait_kernel_hits(&t, name, 0, "old instance's kernel");

    let mut new = start_agent(&dir, &t, Mode::Xdp);
    new.wait_serving().await;
    assert!(
        new.log().contains("fast path not attached (retrying)"),
        "{}",
        new.log()
    );
    let status = old.terminate().await;
    assert!(status.success(), "{status}: {}", old.log());
    for id in 2..12 {
        assert_answer(t.ask(name, id), name, id, "during the hand-over");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !new.log().contains("fast path attached") {
        assert!(
            Instant::now() < deadline,
            "the new instance never attached: {}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_kernel_hits(&t, name, 0, "new instance's kernel");
    let status = new.terminate().await;
    assert!(status.success(), "{status}: {}", new.log());
}

/// XDP mode on a veth whose pod end has no XDP program (GRO off): XDP_TX replies would be
/// lost, so the agent attaches at tc instead, logs the interface, the reason and the fix,
/// and counts the fallback; the pod's cached lookups are answered by the kernel at tc, and
/// the metrics still add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_mode_falls_back_to_tc_where_xdp_tx_cannot_reach_the_pod() {
    if !require_privileges("xdp_mode_falls_back_to_tc_where_xdp_tx_cannot_reach_the_pod") {
        return;
    }
    let t = Topology::with_pod_program(false);
    let authority = t.authority();
    let dir = common::temp_dir("fast-path-xdp-fallback");
    write_corefile(&dir, authority.addr);
    let mut agent = start_agent(&dir, &t, Mode::Xdp);
    agent.wait_serving().await;
    let log = agent.log();
    for needle in [
        "XDP_TX replies would not reach the pod",
        "vh0",
        "vp0",
        "no native XDP program",
        "-fast-path-mode tc",
    ] {
        assert!(log.contains(needle), "the warning names {needle:?}:\n{log}");
    }
    assert!(log.contains("fast path attached"), "{log}");
    assert!(
        log.contains("mode=\"tc\"") || log.contains("mode=tc"),
        "{log}"
    );
    let link = run("ip", &["-n", t.node.name(), "link", "show", "vh0"]);
    assert!(!link.contains(" xdp"), "no XDP program on vh0: {link}");

    let name = "fallback.fast.test.";
    assert_answer(t.ask(name, 1), name, 1, "first query (a miss)");
    let hits = wait_kernel_hits(&t, name, 0, "answered at tc");
    for id in 2..12 {
        assert_answer(t.ask(name, id), name, id, "kernel hits at tc");
    }
    let text = t.metrics();
    assert_eq!(
        gauge(&text, "node_local_dns_fast_path_xdp_fallback_interfaces"),
        1
    );
    assert_eq!(
        gauge(&text, "node_local_dns_fast_path_attached_interfaces"),
        1
    );
    let (_, kernel) = assert_identities(&text);
    assert!(kernel >= hits + 10, "{kernel} kernel answers\n{text}");
    let status = agent.terminate().await;
    assert!(status.success(), "{status}: {}", agent.log());
}
