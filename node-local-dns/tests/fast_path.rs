//! The kernel fast path under `BPF_PROG_TEST_RUN`: crafted frames through `dns_xdp` and
//! `dns_tc`, every verdict checked, and every kernel reply compared byte for byte with the
//! reply the userspace cache renders for the same query and entry (the TTL taken from the
//! kernel's reply). Needs root (loading programs); skips loudly without it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ebpf::dns::{DnsFastPath, Mode, Stats};
use ebpf::frame;
use node_local_dns::cache::Key;
use node_local_dns::fast_path::{kernel_entry, kernel_key};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{self, build_query, parse_query, parse_response, rcode, rtype, Edns};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL4: &str = "169.254.20.10:53";
const CLIENT4: &str = "10.0.0.7:41000";
const LOCAL6: &str = "[fd00::a]:53";
const CLIENT6: &str = "[fd00::7]:41000";

fn privileged(test: &str) -> bool {
    agentkit::testing::require_privileges(test)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A loaded fast path answering for both local addresses.
fn fast_path() -> DnsFastPath {
    let mut path = DnsFastPath::load(1024).expect("load the DNS fast path");
    for local in [LOCAL4, LOCAL6] {
        let local = addr(local);
        path.add_local(local.ip(), local.port()).unwrap();
    }
    path
}

fn query(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, qtype, edns, &mut q);
    q
}

fn edns(udp_size: u16, dnssec_ok: bool) -> Option<Edns> {
    Some(Edns {
        udp_size,
        version: 0,
        dnssec_ok,
    })
}

/// Caches `response` (to `query`) in the kernel as node-local-dns's mirror does, valid for
/// `ttl`; returns the image for rendering the userspace reply.
fn cache(path: &mut DnsFastPath, query: &[u8], response: &[u8], ttl: Duration) -> wire::WireImage {
    let q = parse_query(query).unwrap();
    let (_, image) = parse_response(&q, response).expect("a valid response");
    let image = image.expect("a cacheable response");
    let now = Instant::now();
    let entry = kernel_entry(&image, now + ttl, None, now, 0).expect("mirrorable");
    path.insert(&kernel_key(&Key::of(&q)).expect("a short name"), &entry)
        .unwrap();
    image
}

fn a_response(query: &[u8], owner: &str, addrs: &[[u8; 4]]) -> Vec<u8> {
    let mut b = ResponseBuilder::new(query).compress(true);
    for a in addrs {
        b = b.answer(owner, rtype::A, 30, a);
    }
    b.build()
}

/// Runs `frame` through the program of `mode`; returns (verdict, packet).
fn run(path: &DnsFastPath, mode: Mode, frame: &[u8]) -> (u32, Vec<u8>) {
    let out = path.test_run(mode, frame).expect("BPF_PROG_TEST_RUN");
    (out.retval, out.packet)
}

fn answered(mode: Mode) -> u32 {
    match mode {
        Mode::Xdp => XDP_TX,
        Mode::Tc => TC_ACT_REDIRECT,
    }
}

fn passed(mode: Mode) -> u32 {
    match mode {
        Mode::Xdp => XDP_PASS,
        Mode::Tc => TC_ACT_OK,
    }
}

/// The TTL of the first record after the question of `reply`.
fn first_ttl(reply: &[u8], image: &wire::WireImage) -> u32 {
    let at = usize::from(image.ttl_offsets()[0]);
    u32::from_be_bytes(reply[at..at + 4].try_into().unwrap())
}

/// Asserts that the kernel answered `query` from `client` to `local` exactly as userspace
/// renders it from `image`, and that the frame is turned around with valid checksums.
fn assert_kernel_reply(
    path: &DnsFastPath,
    mode: Mode,
    client: &str,
    local: &str,
    query: &[u8],
    image: &wire::WireImage,
) -> Vec<u8> {
    let (client, local) = (addr(client), addr(local));
    let (verdict, packet) = run(path, mode, &frame::udp(client, local, query, None));
    assert_eq!(
        verdict,
        answered(mode),
        "{mode:?}: the query must be answered in the kernel"
    );
    let reply =
        frame::parse_udp(&packet).unwrap_or_else(|e| panic!("{mode:?}: bad reply frame: {e}"));
    assert_eq!(
        (reply.src, reply.dst),
        (local, client),
        "addresses and ports swapped"
    );
    assert_eq!(
        (reply.dst_mac, reply.src_mac),
        (frame::MACS.1, frame::MACS.0),
        "MACs swapped"
    );
    let q = parse_query(query).unwrap();
    let ttl = first_ttl(&reply.payload, image);
    let mut expected = Vec::new();
    wire::render(&q, image, ttl, q.udp_limit(), &mut expected);
    assert_eq!(
        reply.payload, expected,
        "{mode:?}: kernel reply differs from the userspace reply"
    );
    reply.payload
}

/// Reads the counter a case must raise.
type Counter = fn(&Stats) -> u64;

fn stats(path: &DnsFastPath) -> Stats {
    path.stats().unwrap()
}

#[test]
fn hit_ipv4_matches_userspace_in_both_modes() {
    if !privileged("hit_ipv4_matches_userspace_in_both_modes") {
        return;
    }
    let mut path = fast_path();
    let q = query(
        0x1234,
        "kubernetes.default.svc.cluster.local.",
        rtype::A,
        None,
    );
    let image = cache(
        &mut path,
        &q,
        &a_response(
            &q,
            "kubernetes.default.svc.cluster.local.",
            &[[10, 0, 0, 1]],
        ),
        Duration::from_secs(30),
    );
    for mode in [Mode::Xdp, Mode::Tc] {
        let reply = assert_kernel_reply(&path, mode, CLIENT4, LOCAL4, &q, &image);
        let ttl = first_ttl(&reply, &image);
        assert!((28..=30).contains(&ttl), "TTL counts down from 30: {ttl}");
        assert_eq!(&reply[..2], &[0x12, 0x34], "ID echoed");
    }
    let s = stats(&path);
    assert_eq!((s.hit, s.miss, s.error), (2, 0, 0), "{s:?}");
    assert_eq!(
        path.zone_hits(0).unwrap(),
        (2, 0),
        "both hits counted for zone 0's success cache"
    );
}

#[test]
fn mixed_case_query_hits_the_lower_case_entry_and_echoes_its_case() {
    if !privileged("mixed_case_query_hits_the_lower_case_entry_and_echoes_its_case") {
        return;
    }
    let mut path = fast_path();
    let lower = query(1, "api.example.test.", rtype::A, None);
    let image = cache(
        &mut path,
        &lower,
        &a_response(
            &lower,
            "api.example.test.",
            &[[192, 0, 2, 1], [192, 0, 2, 2]],
        ),
        Duration::from_secs(60),
    );
    let mixed = query(2, "ApI.eXaMpLe.TeSt.", rtype::A, None);
    for mode in [Mode::Xdp, Mode::Tc] {
        let reply = assert_kernel_reply(&path, mode, CLIENT4, LOCAL4, &mixed, &image);
        assert_eq!(
            &reply[12..12 + 18],
            &mixed[12..12 + 18],
            "question bytes echoed with their case"
        );
    }
}

#[test]
fn edns_with_and_without_do_and_the_ad_bit() {
    if !privileged("edns_with_and_without_do_and_the_ad_bit") {
        return;
    }
    let mut path = fast_path();
    for (do_bit, id) in [(false, 10u16), (true, 11)] {
        let q = query(id, "secure.example.test.", rtype::A, edns(4096, do_bit));
        let response = ResponseBuilder::new(&q)
            .compress(true)
            .authentic_data(true)
            .answer("secure.example.test.", rtype::A, 300, &[198, 51, 100, 9])
            .opt(1232)
            .build();
        let image = cache(&mut path, &q, &response, Duration::from_secs(300));
        for mode in [Mode::Xdp, Mode::Tc] {
            let reply = assert_kernel_reply(&path, mode, CLIENT4, LOCAL4, &q, &image);
            let ad = u16::from_be_bytes([reply[2], reply[3]]) & 0x0020 != 0;
            assert_eq!(ad, do_bit, "AD only for a DO query");
            let opt = &reply[reply.len() - 11..];
            assert_eq!(
                &opt[..5],
                &[0, 0, 41, 0x04, 0xd0],
                "OPT with our UDP size 1232"
            );
            assert_eq!(opt[7] & 0x80 != 0, do_bit, "DO mirrored");
        }
    }
    // An EDNS query does not hit the entry of the same name without EDNS DO (DO is keyed).
    let q = query(12, "secure.example.test.", rtype::A, edns(1232, true));
    let plain = query(13, "secure.example.test.", rtype::A, None);
    let (verdict, _) = run(
        &path,
        Mode::Xdp,
        &frame::udp(addr(CLIENT4), addr(LOCAL4), &q, None),
    );
    assert_eq!(verdict, XDP_TX, "the DO entry exists");
    let (verdict, _) = run(
        &path,
        Mode::Xdp,
        &frame::udp(addr(CLIENT4), addr(LOCAL4), &plain, None),
    );
    assert_eq!(verdict, XDP_TX, "the plain query hits the no-DO entry");
}

#[test]
fn edns_options_are_accepted_and_not_echoed() {
    if !privileged("edns_options_are_accepted_and_not_echoed") {
        return;
    }
    let mut path = fast_path();
    let mut q = query(21, "cookie.example.test.", rtype::A, edns(1232, false));
    // A client cookie (option 10, 8 bytes), as dig sends: OPT RDLENGTH 12.
    let len = q.len();
    q[len - 2..].copy_from_slice(&12u16.to_be_bytes());
    q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let image = cache(
        &mut path,
        &q,
        &a_response(&q, "cookie.example.test.", &[[203, 0, 113, 5]]),
        Duration::from_secs(30),
    );
    for mode in [Mode::Xdp, Mode::Tc] {
        assert_kernel_reply(&path, mode, CLIENT4, LOCAL4, &q, &image);
    }
}

#[test]
fn ipv6_hit_has_a_valid_udp_checksum() {
    if !privileged("ipv6_hit_has_a_valid_udp_checksum") {
        return;
    }
    let mut path = fast_path();
    let q = query(0x0606, "v6.example.test.", rtype::AAAA, edns(1232, false));
    let response = ResponseBuilder::new(&q)
        .compress(true)
        .answer(
            "v6.example.test.",
            rtype::AAAA,
            120,
            &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42],
        )
        .build();
    let image = cache(&mut path, &q, &response, Duration::from_secs(120));
    for mode in [Mode::Xdp, Mode::Tc] {
        // parse_udp rejects a zero or wrong IPv6 UDP checksum.
        assert_kernel_reply(&path, mode, CLIENT6, LOCAL6, &q, &image);
    }
}

#[test]
fn negative_answer_is_a_denial_hit() {
    if !privileged("negative_answer_is_a_denial_hit") {
        return;
    }
    let mut path = fast_path();
    let q = query(31, "missing.example.test.", rtype::A, None);
    let mut soa = Vec::new();
    wire::encode_name("ns.example.test.", &mut soa);
    wire::encode_name("hostmaster.example.test.", &mut soa);
    for v in [1u32, 3600, 600, 86400, 5] {
        soa.extend_from_slice(&v.to_be_bytes());
    }
    let response = ResponseBuilder::new(&q)
        .rcode(rcode::NXDOMAIN)
        .authority("example.test.", rtype::SOA, 5, &soa)
        .build();
    let image = cache(&mut path, &q, &response, Duration::from_secs(5));
    let reply = assert_kernel_reply(&path, Mode::Xdp, CLIENT4, LOCAL4, &q, &image);
    assert_eq!(reply[3] & 0x0f, rcode::NXDOMAIN);
    assert_eq!(
        path.zone_hits(0).unwrap(),
        (0, 1),
        "counted as a denial hit"
    );
}

#[test]
fn misses_expired_entries_and_unsupported_queries_pass_untouched() {
    if !privileged("misses_expired_entries_and_unsupported_queries_pass_untouched") {
        return;
    }
    let mut path = fast_path();
    let (client, local) = (addr(CLIENT4), addr(LOCAL4));
    let q = query(41, "short.example.test.", rtype::A, None);
    let image = cache(
        &mut path,
        &q,
        &a_response(&q, "short.example.test.", &[[10, 1, 1, 1]]),
        Duration::from_millis(300),
    );
    let _ = image;

    let mut cases: Vec<(&str, Vec<u8>, Counter)> = Vec::new();
    let miss = query(42, "unknown.example.test.", rtype::A, None);
    cases.push(("miss", frame::udp(client, local, &miss, None), |s| s.miss));
    let other_type = query(43, "short.example.test.", rtype::AAAA, None);
    cases.push((
        "other qtype",
        frame::udp(client, local, &other_type, None),
        |s| s.miss,
    ));
    cases.push((
        "VLAN tagged",
        frame::udp(client, local, &q, Some(42)),
        |s| s.not_local,
    ));
    cases.push((
        "other port",
        frame::udp(client, addr("169.254.20.10:5353"), &q, None),
        |s| s.not_local,
    ));
    cases.push((
        "other address",
        frame::udp(client, addr("169.254.20.11:53"), &q, None),
        |s| s.not_local,
    ));
    let mut two_questions = q.clone();
    two_questions[5] = 2;
    cases.push((
        "QDCOUNT 2",
        frame::udp(client, local, &two_questions, None),
        |s| s.unsupported,
    ));
    let mut response = q.clone();
    response[2] |= 0x80;
    cases.push(("QR set", frame::udp(client, local, &response, None), |s| {
        s.unsupported
    }));
    let mut notify = q.clone();
    notify[2] |= 4 << 3;
    cases.push((
        "opcode NOTIFY",
        frame::udp(client, local, &notify, None),
        |s| s.unsupported,
    ));
    let v1 = {
        let mut v = query(44, "short.example.test.", rtype::A, edns(1232, false));
        let at = v.len() - 5; // the OPT's version byte
        v[at] = 1;
        v
    };
    cases.push((
        "EDNS version 1",
        frame::udp(client, local, &v1, None),
        |s| s.unsupported,
    ));
    let long = format!(
        "{}.example.test.",
        ["a".repeat(60), "b".repeat(60)].join(".")
    );
    cases.push((
        "name longer than mirrored",
        frame::udp(client, local, &query(45, &long, rtype::A, None), None),
        |s| s.unsupported,
    ));
    let mut compressed = q[..12].to_vec();
    compressed.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    cases.push((
        "compression pointer in the question",
        frame::udp(client, local, &compressed, None),
        |s| s.unsupported,
    ));
    let truncated = frame::udp(client, local, &q, None);
    cases.push((
        "frame cut in the qname",
        truncated[..truncated.len() - 12].to_vec(),
        |s| s.malformed,
    ));
    cases.push((
        "header only",
        frame::udp(client, local, &q[..12], None),
        |s| s.malformed,
    ));
    cases.push((
        "short DNS header",
        frame::udp(client, local, &q[..7], None),
        |s| s.malformed,
    ));
    let mut trailing = q.clone();
    trailing.extend_from_slice(b"junk");
    cases.push((
        "trailing bytes",
        frame::udp(client, local, &trailing, None),
        |s| s.malformed,
    ));
    let oversized: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    cases.push((
        "3000-byte datagram",
        frame::udp(client, local, &oversized, None),
        |s| s.unsupported + s.malformed,
    ));
    let mut tcp = frame::udp(client, local, &q, None);
    tcp[14 + 9] = 6;
    cases.push(("TCP", tcp, |s| s.not_local));
    let mut arp = vec![0xff; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("ARP", arp, |s| s.not_local));
    cases.push((
        "IPv4 header without UDP",
        frame::udp(client, local, &q, None)[..34].to_vec(),
        |s| s.not_local,
    ));

    for mode in [Mode::Xdp, Mode::Tc] {
        for (what, frame, counter) in &cases {
            let before = stats(&path);
            let out = path
                .test_run(mode, frame)
                .unwrap_or_else(|e| panic!("{mode:?} {what}: {e}"));
            let (verdict, packet) = (out.retval, out.packet);
            assert_eq!(
                verdict,
                passed(mode),
                "{mode:?} {what}: must pass to the stack"
            );
            assert_eq!(&packet, frame, "{mode:?} {what}: must pass untouched");
            let after = stats(&path);
            assert_eq!(
                counter(&after),
                counter(&before) + 1,
                "{mode:?} {what}: counted: {before:?} -> {after:?}"
            );
            assert_eq!(after.hit, before.hit, "{mode:?} {what}: not a hit");
        }
    }

    // The entry itself: answered while live, passed once expired.
    let frame_q = frame::udp(client, local, &q, None);
    assert_eq!(run(&path, Mode::Xdp, &frame_q).0, XDP_TX);
    std::thread::sleep(Duration::from_millis(400));
    for mode in [Mode::Xdp, Mode::Tc] {
        let before = stats(&path).expired;
        let (verdict, packet) = run(&path, mode, &frame_q);
        assert_eq!(
            (verdict, &packet),
            (passed(mode), &frame_q),
            "{mode:?}: an expired entry is passed"
        );
        assert_eq!(stats(&path).expired, before + 1);
    }
}

#[test]
fn reply_over_the_clients_udp_size_is_left_to_userspace() {
    if !privileged("reply_over_the_clients_udp_size_is_left_to_userspace") {
        return;
    }
    let mut path = fast_path();
    // 30 A records: 480 bytes of records, 515 bytes with the header and question.
    let addrs: Vec<[u8; 4]> = (0..30).map(|i| [10, 9, 0, i]).collect();
    let plain = query(51, "many.example.test.", rtype::A, None);
    cache(
        &mut path,
        &plain,
        &a_response(&plain, "many.example.test.", &addrs),
        Duration::from_secs(30),
    );
    let big = query(52, "many.example.test.", rtype::A, edns(1232, false));
    let image = cache(
        &mut path,
        &big,
        &a_response(&big, "many.example.test.", &addrs),
        Duration::from_secs(30),
    );
    for mode in [Mode::Xdp, Mode::Tc] {
        let f = frame::udp(addr(CLIENT4), addr(LOCAL4), &plain, None);
        let before = stats(&path).too_big;
        let (verdict, packet) = run(&path, mode, &f);
        assert_eq!(
            (verdict, &packet),
            (passed(mode), &f),
            "{mode:?}: a 512-byte client gets TC from userspace"
        );
        assert_eq!(stats(&path).too_big, before + 1);
        // With EDNS 1232 the same answer fits and is answered in the kernel.
        let reply = assert_kernel_reply(&path, mode, CLIENT4, LOCAL4, &big, &image);
        assert!(reply.len() > 512, "{}", reply.len());
    }
    // An EDNS size below 512 is treated as 512 (RFC 6891 §6.2.5), as userspace does.
    let tiny = query(53, "many.example.test.", rtype::A, edns(100, false));
    let (verdict, _) = run(
        &path,
        Mode::Xdp,
        &frame::udp(addr(CLIENT4), addr(LOCAL4), &tiny, None),
    );
    assert_eq!(verdict, XDP_PASS);
}

#[test]
fn replaced_and_removed_entries_take_effect() {
    if !privileged("replaced_and_removed_entries_take_effect") {
        return;
    }
    let mut path = fast_path();
    let q = query(61, "moving.example.test.", rtype::A, None);
    cache(
        &mut path,
        &q,
        &a_response(&q, "moving.example.test.", &[[10, 0, 0, 1]]),
        Duration::from_secs(30),
    );
    let image = cache(
        &mut path,
        &q,
        &a_response(&q, "moving.example.test.", &[[10, 0, 0, 2]]),
        Duration::from_secs(30),
    );
    let reply = assert_kernel_reply(&path, Mode::Xdp, CLIENT4, LOCAL4, &q, &image);
    assert_eq!(
        &reply[reply.len() - 4..],
        &[10, 0, 0, 2],
        "the replacement answers"
    );
    let key = kernel_key(&Key::of(&parse_query(&q).unwrap())).unwrap();
    assert!(path.remove(&key).unwrap());
    assert!(!path.remove(&key).unwrap(), "a second remove finds nothing");
    let (verdict, _) = run(
        &path,
        Mode::Xdp,
        &frame::udp(addr(CLIENT4), addr(LOCAL4), &q, None),
    );
    assert_eq!(verdict, XDP_PASS, "removed: passed");
    assert_ne!(verdict, XDP_DROP);
}

/// The checksum is summed four bytes at a time: replies of every length modulo 4, in both
/// families and modes, must carry a right UDP checksum.
#[test]
fn checksums_are_right_for_every_reply_length() {
    if !privileged("checksums_are_right_for_every_reply_length") {
        return;
    }
    let mut path = fast_path();
    let mut remainders = std::collections::HashSet::new();
    for (i, label) in ["a", "ab", "abc", "abcd", "abcde"].into_iter().enumerate() {
        let name = format!("{label}.len.test.");
        let q = query(70 + i as u16, &name, rtype::A, None);
        let image = cache(
            &mut path,
            &q,
            &a_response(&q, &name, &[[10, 0, 0, i as u8]]),
            Duration::from_secs(30),
        );
        for mode in [Mode::Xdp, Mode::Tc] {
            for (client, local) in [(CLIENT4, LOCAL4), (CLIENT6, LOCAL6)] {
                let reply = assert_kernel_reply(&path, mode, client, local, &q, &image);
                remainders.insert((8 + reply.len()) % 4);
            }
        }
    }
    assert_eq!(
        remainders.len(),
        4,
        "every UDP length modulo 4 was covered: {remainders:?}"
    );
}
