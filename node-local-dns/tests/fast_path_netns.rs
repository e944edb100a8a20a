//! Privileged: the kernel fast path end to end. A "node" namespace runs the real binary with
//! `-fast-path-interfaces` on the host side of a veth; a "pod" namespace on the other side
//! asks 169.254.20.10 over the veth, as a pod does. Checked in both modes (tc, xdp): the
//! answers are right, the kernel-hit counter rises and kernel hits show in
//! `coredns_cache_hits_total`, answers stay right when an entry expires and when the agent is
//! restarted. Namespaces (and the veth) are deleted on drop.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use agentkit::testing::{require_privileges, run_command as run, NetNs};
use common::{ancount, query, rcode_of, Agent, Authority};
use ebpf::dns::{DnsFastPath, Mode};
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
    /// In XDP mode: a program on the pod's end of the veth, so that it has the NAPI context
    /// XDP_TX into a veth needs (see docs/ebpf.md). It passes everything.
    _pod_napi: Option<DnsFastPath>,
}

impl Topology {
    fn new(mode: Mode) -> Topology {
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
        let pod_napi = (mode == Mode::Xdp).then(|| {
            pod.run(|| {
                let mut path = DnsFastPath::load(1).unwrap();
                path.attach("vp0", Mode::Xdp).unwrap();
                path
            })
        });
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
        .filter(|l| l.starts_with(name) && labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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
        // The agent publishes the kernel's counters once a second.
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
    std::thread::sleep(Duration::from_millis(1200));
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
