//! Privileged: the `nodelocaldns` link and node-cache's iptables rules, set up, repaired, adopted
//! and torn down for real, each test in a network namespace of its own (created with `ip netns
//! add`, entered by one thread with `setns`, deleted on drop; `iptables` children inherit the
//! thread's namespace). Needs `ip` (iproute2) and the `iptables` package; skips loudly without
//! root, fails under `REQUIRE_PRIVILEGED=1`.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use agentkit::testing::{require_privileges, run_command as run, NetNs};
use node_local_dns::intercept::iptables::COMMENT_PREFIX;
use node_local_dns::intercept::{
    InterceptError, Interception, Options, DEFAULT_INTERFACE, LINK_KINDS,
};

/// The link-local listen IP Gardener uses.
const LINK_LOCAL: &str = "169.254.20.10";
/// A stand-in for the kube-dns ClusterIP, from 198.18.0.0/15 (benchmark networks; this address
/// exists only inside the test's namespace).
const CLUSTER_IP: &str = "198.18.0.10";
/// Gardener's IPv6 listen IP.
const LINK_LOCAL_V6: &str = "fd30:1319:f1e:230b::1";
const DNS_PORT: u16 = 53;
const HEALTH_PORT: u16 = 8099;
const RULES_PER_IP: usize = 12;

fn ips() -> Vec<IpAddr> {
    [LINK_LOCAL, CLUSTER_IP, LINK_LOCAL_V6]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn options() -> Options {
    Options {
        interface: DEFAULT_INTERFACE.to_owned(),
        local_ips: ips(),
        dns_port: DNS_PORT,
        health_port: HEALTH_PORT,
        setup_interface: true,
        setup_iptables: true,
    }
}

/// Lines of `<family>tables-<backend>-save` that carry our comment prefix.
fn our_rules(family: &str, backend: &str) -> Vec<String> {
    let save = run(&format!("{family}tables-{backend}-save"), &[]);
    save.lines()
        .filter(|l| l.contains(&format!("--comment \"{COMMENT_PREFIX}")))
        .map(str::to_owned)
        .collect()
}

fn all_our_rules(backend: &str) -> (Vec<String>, Vec<String>) {
    (our_rules("ip", backend), our_rules("ip6", backend))
}

/// `ip -o addr show dev <link>` lines, one per address.
fn addresses() -> Vec<String> {
    run("ip", &["-o", "addr", "show", "dev", DEFAULT_INTERFACE])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn link_exists() -> bool {
    Command::new("ip")
        .args(["link", "show", DEFAULT_INTERFACE])
        .output()
        .unwrap()
        .status
        .success()
}

/// Asserts every listen IP is on the link as a host address, IPv6 not tentative.
fn assert_addresses_present() {
    let lines = addresses();
    for (ip, prefix) in [
        (LINK_LOCAL, "/32"),
        (CLUSTER_IP, "/32"),
        (LINK_LOCAL_V6, "/128"),
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!(" {ip}{prefix} ")))
            .unwrap_or_else(|| panic!("{ip}{prefix} missing from {lines:#?}"));
        assert!(!line.contains("tentative"), "{line}");
        assert!(!line.contains("dadfailed"), "{line}");
    }
}

/// Asserts 12 rules per IP of each family, each exactly once, with both comments.
fn assert_rules_present(backend: &str) {
    let (v4, v6) = all_our_rules(backend);
    assert_eq!(v4.len(), 2 * RULES_PER_IP, "{v4:#?}");
    assert_eq!(v6.len(), RULES_PER_IP, "{v6:#?}");
    for rules in [&v4, &v6] {
        let mut unique = rules.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), rules.len(), "duplicate rules: {rules:#?}");
        let skip = rules
            .iter()
            .filter(|l| l.contains("\"NodeLocal DNS Cache: skip conntrack\""))
            .count();
        let allow = rules
            .iter()
            .filter(|l| l.contains("\"NodeLocal DNS Cache: allow DNS traffic\""))
            .count();
        assert_eq!(skip + allow, rules.len());
        assert_eq!(allow * 2, skip, "4 ACCEPT and 8 NOTRACK per IP");
    }
    for ip in [
        format!("-d {LINK_LOCAL}/32"),
        format!("-d {CLUSTER_IP}/32"),
        format!("-d {LINK_LOCAL_V6}/128"),
    ] {
        let all: Vec<_> = v4.iter().chain(&v6).filter(|l| l.contains(&ip)).collect();
        // Per IP: 2 raw PREROUTING, 2 filter INPUT, 3 raw OUTPUT (-d): 7 with "-d".
        assert_eq!(all.len(), 7, "{ip}: {all:#?}");
        assert!(all.iter().any(|l| l.starts_with("-A PREROUTING")
            && l.contains("-p udp")
            && l.contains("--dport 53")
            && l.ends_with("-j NOTRACK")));
        assert!(all
            .iter()
            .any(|l| l.starts_with("-A OUTPUT") && l.contains("--dport 8099")));
    }
}

/// Binds UDP on port 53 of every listen IP and gets the first datagram through to it (no
/// retry: `ensure_link` returns only once every address is routed `local`).
fn assert_local_delivery() {
    for ip in ips() {
        let server = UdpSocket::bind(SocketAddr::new(ip, DNS_PORT))
            .unwrap_or_else(|e| panic!("bind {ip}:{DNS_PORT}: {e}"));
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let client = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        client
            .send_to(b"ping", server.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{ip}: {e}; {:#?}\n{}",
                addresses(),
                run("ip", &["route", "show", "table", "all"])
                    + &run("ip", &["-6", "route", "show", "table", "all"])
            )
        });
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, client.local_addr().unwrap());
    }
}

fn assert_torn_down(backend: &str) {
    let (v4, v6) = all_our_rules(backend);
    assert!(v4.is_empty() && v6.is_empty(), "{v4:#?} {v6:#?}");
    assert!(!link_exists(), "link still exists");
}

#[test]
fn setup_creates_link_addresses_and_rules_and_teardown_removes_them() {
    if !require_privileges("setup_creates_link_addresses_and_rules_and_teardown_removes_them") {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        let i = Interception::new(options()).unwrap();
        let backend = i.backend().unwrap();
        assert!(backend == "legacy" || backend == "nft");

        let link = i.ensure_link().unwrap();
        assert!(link.created);
        assert!(LINK_KINDS.contains(&link.kind), "{link:?}");
        assert_eq!(link.addresses_added, 3);
        let details = run("ip", &["-d", "-o", "link", "show", DEFAULT_INTERFACE]);
        assert!(
            details.contains(&format!(" {} ", link.kind)),
            "kind {} not in {details}",
            link.kind
        );
        assert!(details.contains(",UP"), "{details}");
        assert_addresses_present();

        let rules = i.ensure_rules().unwrap();
        assert_eq!(rules.backend, backend);
        assert_eq!(rules.checked, 3 * RULES_PER_IP);
        assert_eq!(rules.added, 3 * RULES_PER_IP);
        assert_rules_present(backend);
        assert_local_delivery();

        i.teardown().unwrap();
        assert_torn_down(backend);
        // A second teardown finds nothing to do and is not an error.
        i.teardown().unwrap();
    });
}

#[test]
fn ensure_repairs_a_deleted_rule_and_address() {
    if !require_privileges("ensure_repairs_a_deleted_rule_and_address") {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        let i = Interception::new(options()).unwrap();
        let backend = i.backend().unwrap();
        i.ensure_link().unwrap();
        i.ensure_rules().unwrap();

        // By hand: one IPv4 rule, one IPv6 rule, one address.
        let ipt = format!("iptables-{backend}");
        let ip6t = format!("ip6tables-{backend}");
        let udp_notrack = |ip: &str| {
            vec![
                "-t".to_owned(),
                "raw".into(),
                "-D".into(),
                "PREROUTING".into(),
                "-p".into(),
                "udp".into(),
                "-d".into(),
                ip.into(),
                "--dport".into(),
                "53".into(),
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                "NodeLocal DNS Cache: skip conntrack".into(),
                "-j".into(),
                "NOTRACK".into(),
            ]
        };
        let args = udp_notrack(CLUSTER_IP);
        run(&ipt, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let args = udp_notrack(LINK_LOCAL_V6);
        run(&ip6t, &args.iter().map(String::as_str).collect::<Vec<_>>());
        run(
            "ip",
            &[
                "addr",
                "del",
                "fd30:1319:f1e:230b::1/128",
                "dev",
                DEFAULT_INTERFACE,
            ],
        );
        let (v4, v6) = all_our_rules(backend);
        assert_eq!(v4.len() + v6.len(), 3 * RULES_PER_IP - 2);

        let link = i.ensure_link().unwrap();
        assert!(!link.created);
        assert_eq!(link.addresses_added, 1);
        assert_addresses_present();
        let rules = i.ensure_rules().unwrap();
        assert_eq!(rules.added, 2);
        assert_rules_present(backend);
        // The re-added rule is prepended: first in raw PREROUTING.
        let save = run(&format!("iptables-{backend}-save"), &["-t", "raw"]);
        let first = save
            .lines()
            .find(|l| l.starts_with("-A PREROUTING"))
            .unwrap();
        assert!(
            first.contains(CLUSTER_IP) && first.contains("-p udp"),
            "{first}"
        );

        // A link that was set down is set up again.
        run("ip", &["link", "set", DEFAULT_INTERFACE, "down"]);
        // The kernel drops IPv6 addresses of a link that goes down (keep_addr_on_down=0) and
        // keeps IPv4 ones: whatever went is added back.
        let before = addresses()
            .iter()
            .filter(|l| {
                [LINK_LOCAL, CLUSTER_IP, LINK_LOCAL_V6]
                    .iter()
                    .any(|ip| l.contains(&format!(" {ip}/")))
            })
            .count();
        let link = i.ensure_link().unwrap();
        assert!(link.brought_up);
        assert_eq!(link.addresses_added, 3 - before);
        assert_addresses_present();
        assert_local_delivery();

        i.teardown().unwrap();
        assert_torn_down(backend);
    });
}

#[test]
fn second_ensure_and_a_new_instance_add_nothing() {
    if !require_privileges("second_ensure_and_a_new_instance_add_nothing") {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        let first = Interception::new(options()).unwrap();
        let backend = first.backend().unwrap();
        first.ensure_link().unwrap();
        first.ensure_rules().unwrap();

        let link = first.ensure_link().unwrap();
        assert_eq!(
            (link.created, link.brought_up, link.addresses_added),
            (false, false, 0)
        );
        assert_eq!(first.ensure_rules().unwrap().added, 0);
        assert_rules_present(backend);

        // The restarted process (no teardown by the old one, e.g. -skipteardown or a kill):
        // a new instance detects the same backend and adopts link and rules.
        drop(first);
        let second = Interception::new(options()).unwrap();
        assert_eq!(second.backend(), Some(backend));
        let link = second.ensure_link().unwrap();
        assert_eq!((link.created, link.addresses_added), (false, 0));
        let rules = second.ensure_rules().unwrap();
        assert_eq!(rules.added, 0);
        assert_eq!(rules.checked, 3 * RULES_PER_IP);
        assert_rules_present(backend);

        second.teardown().unwrap();
        assert_torn_down(backend);
    });
}

#[test]
fn an_existing_link_of_another_kind_is_reused_and_set_up() {
    if !require_privileges("an_existing_link_of_another_kind_is_reused_and_set_up") {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        run("ip", &["link", "add", DEFAULT_INTERFACE, "type", "bridge"]);
        let i = Interception::new(Options {
            setup_iptables: false,
            ..options()
        })
        .unwrap();
        let link = i.ensure_link().unwrap();
        assert_eq!(link.kind, "bridge");
        assert!(!link.created);
        assert!(link.brought_up);
        assert_eq!(link.addresses_added, 3);
        assert_addresses_present();
        assert_local_delivery();
        i.teardown().unwrap();
        assert!(!link_exists());
    });
}

#[test]
fn legacy_backend_is_chosen_when_it_holds_rules_and_gardener_cleanup_finds_none_after_teardown() {
    if !require_privileges(
        "legacy_backend_is_chosen_when_it_holds_rules_and_gardener_cleanup_finds_none_after_teardown",
    ) {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        // Someone (kube-proxy in legacy mode) already has rules in the legacy backend.
        run(
            "iptables-legacy",
            &[
                "-t",
                "filter",
                "-A",
                "FORWARD",
                "-s",
                "198.18.1.0/24",
                "-j",
                "ACCEPT",
            ],
        );
        let i = Interception::new(options()).unwrap();
        assert_eq!(i.backend(), Some("legacy"));
        i.ensure_link().unwrap();
        assert_eq!(i.ensure_rules().unwrap().added, 3 * RULES_PER_IP);
        assert_rules_present("legacy");
        let (nft_v4, nft_v6) = all_our_rules("nft");
        assert!(nft_v4.is_empty() && nft_v6.is_empty(), "nothing in nft");

        // Gardener's cleanup query (resources/cleanup.sh) over both legacy save binaries,
        // with the prefix left open so that it matches the comments.
        let gardener_query = |cmd: &str| -> usize {
            let save = run(cmd, &[]);
            save.lines()
                .filter(|l| l.contains("--comment \"NodeLocal DNS Cache:"))
                .count()
        };
        assert_eq!(
            gardener_query("iptables-legacy-save") + gardener_query("ip6tables-legacy-save"),
            3 * RULES_PER_IP
        );
        i.teardown().unwrap();
        assert_eq!(gardener_query("iptables-legacy-save"), 0);
        assert_eq!(gardener_query("ip6tables-legacy-save"), 0);
        assert_torn_down("legacy");
        // Only ours went: the foreign rule stays.
        assert!(run("iptables-legacy-save", &[]).contains("-A FORWARD -s 198.18.1.0/24 -j ACCEPT"));
    });
}

#[test]
fn teardown_removes_rules_added_twice() {
    if !require_privileges("teardown_removes_rules_added_twice") {
        return;
    }
    let ns = NetNs::create("nldi");
    ns.run(|| {
        let i = Interception::new(options()).unwrap();
        let backend = i.backend().unwrap();
        i.ensure_link().unwrap();
        i.ensure_rules().unwrap();
        // A flaky `-C` (kubernetes/dns#568) once made node-cache add a rule again.
        run(
            &format!("iptables-{backend}"),
            &[
                "-t",
                "filter",
                "-I",
                "INPUT",
                "-p",
                "udp",
                "-d",
                LINK_LOCAL,
                "--dport",
                "53",
                "-m",
                "comment",
                "--comment",
                "NodeLocal DNS Cache: allow DNS traffic",
                "-j",
                "ACCEPT",
            ],
        );
        assert_eq!(our_rules("ip", backend).len(), 2 * RULES_PER_IP + 1);
        i.teardown().unwrap();
        assert_torn_down(backend);
    });
}

#[test]
fn every_fallback_kind_creates_a_working_link() {
    if !require_privileges("every_fallback_kind_creates_a_working_link") {
        return;
    }
    for kind in LINK_KINDS {
        let ns = NetNs::create("nldi");
        ns.run(move || {
            let i = Interception::new(Options {
                setup_iptables: false,
                ..options()
            })
            .unwrap()
            .with_link_kinds(&[kind])
            .unwrap();
            let link = match i.ensure_link() {
                Ok(link) => link,
                // This kernel lacks the kind (here: dummy without CONFIG_DUMMY).
                Err(InterceptError::InterfaceAdd { ref source, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    eprintln!("{kind}: not supported by this kernel: {source}");
                    return;
                }
                Err(e) => panic!("{kind}: {e}"),
            };
            assert_eq!(link.kind, kind);
            assert!(link.created);
            assert_addresses_present();
            assert_local_delivery();
            if kind == "veth" {
                let peer = run("ip", &["-o", "link", "show", "nodelocaldns-p"]);
                assert!(peer.contains(",UP"), "{peer}");
            }
            i.teardown().unwrap();
            assert!(!link_exists(), "{kind} link still exists");
            if kind == "veth" {
                let peer = Command::new("ip")
                    .args(["link", "show", "nodelocaldns-p"])
                    .output()
                    .unwrap();
                assert!(!peer.status.success(), "veth peer still exists");
            }
        });
    }
}
