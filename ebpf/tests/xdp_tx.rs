//! Privileged: whether an `XDP_TX` reply reaches the pod's end of a veth, on this kernel.
//!
//! First the kernel behaviour the check exists for: `dns_xdp` attached natively to the node's
//! end answers a cached query with `XDP_TX`, and the pod gets nothing while its end has no
//! XDP program, GRO off or on; it gets the answer once its end runs an XDP program. Then
//! [`ebpf::dns::xdp_tx_delivery`] against real veths: a plain peer (in another namespace, or
//! in the same one), GRO on, an XDP program on the peer, a peer that is down, and an
//! interface that is not a veth. Namespaces (and the veths in them) are deleted on drop.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::time::Duration;

use agentkit::testing::{require_privileges, run_command as run, NetNs};
use ebpf::dns::{expires_after, xdp_tx_delivery, DnsEntry, DnsFastPath, DnsKey, Mode, XdpTx};
use ebpf::link;

/// A node namespace and a pod namespace joined by a veth: `vh0` (node, 10.200.0.1) and `vp0`
/// (pod, 10.200.0.2, routing 169.254.20.10 via the node). Both ends up.
struct Pair {
    node: NetNs,
    pod: NetNs,
}

impl Pair {
    fn new() -> Pair {
        let node = NetNs::create("xdptx-n");
        let pod = NetNs::create("xdptx-p");
        let (n, p) = (node.name().to_string(), pod.name().to_string());
        run(
            "ip",
            &[
                "-n", &n, "link", "add", "vh0", "type", "veth", "peer", "name", "vp0", "netns", &p,
            ],
        );
        for args in [
            vec!["-n", &n, "addr", "add", "10.200.0.1/24", "dev", "vh0"],
            vec!["-n", &n, "addr", "add", "169.254.20.10/32", "dev", "lo"],
            vec!["-n", &n, "link", "set", "vh0", "up"],
            vec!["-n", &p, "addr", "add", "10.200.0.2/24", "dev", "vp0"],
            vec!["-n", &p, "link", "set", "vp0", "up"],
            vec![
                "-n",
                &p,
                "route",
                "add",
                "169.254.20.10/32",
                "via",
                "10.200.0.1",
            ],
        ] {
            run("ip", &args);
        }
        Pair { node, pod }
    }

    fn set_pod_gro(&self, on: bool) {
        let now = self.pod.run(move || link::set_gro("vp0", on).unwrap());
        assert_eq!(now, on, "GRO on vp0");
    }

    fn delivery(&self, interface: &'static str) -> XdpTx {
        self.node.run(move || xdp_tx_delivery(interface))
    }
}

/// `\x03api\x04test\x00` A IN.
const QNAME: &[u8] = b"\x03api\x04test\x00";

/// A query for api.test. A from the pod to 169.254.20.10:53; the reply if one comes.
fn ask(pod: &NetNs, id: u16) -> Option<Vec<u8>> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(QNAME);
    q.extend_from_slice(&[0, 1, 0, 1]);
    pod.run(move || {
        let socket = UdpSocket::bind("10.200.0.2:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        socket.send_to(&q, "169.254.20.10:53").unwrap();
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
}

/// The fast path loaded in the node namespace with one entry (api.test. A 10.0.0.1) and
/// `dns_xdp` attached natively to `vh0`, without any check.
fn answering_at_xdp(pair: &Pair) -> DnsFastPath {
    pair.node.run(|| {
        let mut path = DnsFastPath::load(16).unwrap();
        path.add_local("169.254.20.10".parse().unwrap(), 53)
            .unwrap();
        let mut image = vec![0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        image.extend_from_slice(QNAME);
        image.extend_from_slice(&[0, 1, 0, 1]);
        let question_len = image.len() - 12;
        let ttl_at = image.len() + 6;
        image.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        let entry = DnsEntry::from_image(
            &image,
            question_len,
            &[ttl_at as u16],
            expires_after(Duration::from_secs(60)),
            0,
            false,
        )
        .unwrap();
        let key = DnsKey::new(QNAME, 1, 1, false, false).unwrap();
        path.insert(&key, &entry).unwrap();
        path.attach("vh0", Mode::Xdp).unwrap();
        assert_eq!(
            path.xdp_attach_mode("vh0").unwrap(),
            Some(ebpf::dns::XdpAttachMode::Native),
            "a veth takes XDP natively"
        );
        path
    })
}

/// Asks up to three times; whether the kernel's reply (ID and address checked) arrived.
fn answered(pod: &NetNs, first_id: u16) -> bool {
    (first_id..first_id + 3).any(|id| {
        ask(pod, id)
            .is_some_and(|r| r[..2] == id.to_be_bytes() && r[r.len() - 4..] == [10, 0, 0, 1])
    })
}

#[test]
fn xdp_tx_into_a_veth_reaches_only_a_peer_with_an_xdp_program() {
    if !require_privileges("xdp_tx_into_a_veth_reaches_only_a_peer_with_an_xdp_program") {
        return;
    }
    let pair = Pair::new();
    pair.set_pod_gro(false);
    let path = answering_at_xdp(&pair);
    assert!(
        !answered(&pair.pod, 1),
        "no reply reaches a peer without NAPI"
    );
    let hits = path.stats().unwrap().hit;
    assert!(
        hits >= 3,
        "and yet the kernel answered (counted {hits} hits): a silent black hole"
    );
    assert!(matches!(pair.delivery("vh0"), XdpTx::Cannot(_)));

    // GRO gives the peer NAPI, but the XDP_TX flush wakes the peer only if it runs an XDP
    // program (veth_xdp_flush), so the replies wait in its ring.
    pair.set_pod_gro(true);
    assert!(
        !answered(&pair.pod, 10),
        "GRO on the pod's end made XDP_TX deliver: this kernel wakes the peer's NAPI without \
         an XDP program, and xdp_tx_delivery may accept GRO"
    );
    assert!(matches!(pair.delivery("vh0"), XdpTx::Cannot(_)));

    let program = pair.pod.run(|| {
        let mut path = DnsFastPath::load(1).unwrap();
        path.attach("vp0", Mode::Xdp).unwrap();
        path
    });
    assert!(
        answered(&pair.pod, 20),
        "with an XDP program on the pod's end, the kernel's reply arrives"
    );
    assert!(matches!(pair.delivery("vh0"), XdpTx::Delivers(_)));
    drop(program);
    drop(path);
}

#[test]
fn the_peer_state_decides_delivery() {
    if !require_privileges("the_peer_state_decides_delivery") {
        return;
    }
    let pair = Pair::new();

    pair.set_pod_gro(false);
    let XdpTx::Cannot(reason) = pair.delivery("vh0") else {
        panic!("a plain peer cannot take XDP_TX");
    };
    assert!(
        reason.contains("vp0") && reason.contains("no native XDP program"),
        "{reason}"
    );
    pair.set_pod_gro(true);
    assert!(
        matches!(pair.delivery("vh0"), XdpTx::Cannot(_)),
        "GRO is not enough"
    );

    let program = pair.pod.run(|| {
        let mut path = DnsFastPath::load(1).unwrap();
        path.attach("vp0", Mode::Xdp).unwrap();
        path
    });
    let XdpTx::Delivers(why) = pair.delivery("vh0") else {
        panic!("an XDP program gives the peer NAPI");
    };
    assert!(why.contains("XDP program") && why.contains("vp0"), "{why}");

    run("ip", &["-n", pair.pod.name(), "link", "set", "vp0", "down"]);
    let XdpTx::Cannot(reason) = pair.delivery("vh0") else {
        panic!("a down peer takes nothing");
    };
    assert!(reason.contains("down"), "{reason}");
    drop(program);
    run("ip", &["-n", pair.pod.name(), "link", "set", "vp0", "up"]);
    assert!(matches!(pair.delivery("vh0"), XdpTx::Cannot(_)));

    let XdpTx::Delivers(why) = pair.delivery("lo") else {
        panic!("not a veth: not checked");
    };
    assert!(why.contains("not a veth"), "{why}");
    assert!(matches!(pair.delivery("nope0"), XdpTx::Cannot(_)));
}

#[test]
fn a_peer_in_the_same_namespace_is_read_there() {
    if !require_privileges("a_peer_in_the_same_namespace_is_read_there") {
        return;
    }
    let ns = NetNs::create("xdptx-s");
    let n = ns.name().to_string();
    run(
        "ip",
        &[
            "-n", &n, "link", "add", "va0", "type", "veth", "peer", "name", "vb0",
        ],
    );
    run("ip", &["-n", &n, "link", "set", "va0", "up"]);
    run("ip", &["-n", &n, "link", "set", "vb0", "up"]);
    let (plain, with_program) = ns.run(|| {
        let plain = xdp_tx_delivery("va0");
        let mut path = DnsFastPath::load(1).unwrap();
        path.attach("vb0", Mode::Xdp).unwrap();
        (plain, xdp_tx_delivery("va0"))
    });
    let XdpTx::Cannot(reason) = plain else {
        panic!("plain peer");
    };
    assert!(
        reason.contains("vb0") && reason.contains("in this namespace"),
        "{reason}"
    );
    assert!(
        matches!(with_program, XdpTx::Delivers(_)),
        "{with_program:?}"
    );
}
