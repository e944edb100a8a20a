//! Differential: the same queries go to node-local-dns (the real binary) and to unbound, both
//! plain forwarding caches in front of one authoritative upstream of the test's own; the
//! answers must agree apart from TTL values, on the first ask (a miss) and the second (a hit).
//!
//! What is compared, per query, after both replies are parsed:
//! - the ID (each against its query) and the question section, byte for byte (0x20 case kept);
//! - the header bits QR, OPCODE, TC, RD, RA, AD, CD and the RCODE. **AA is not compared**:
//!   unbound answers as a recursive resolver and never sets it, while CoreDNS sets AA on every
//!   cache hit (for old glibc) and passes the upstream's AA on a miss; Z is reserved;
//! - the answer, authority and additional sections (OPT aside) as sets of records: owner names
//!   and names inside RDATA decompressed and lower-cased (DNS names compare without case;
//!   unbound writes owners as pointers to the question, CoreDNS keeps the upstream's case),
//!   TTL left out, order ignored (unbound rotates RRsets, `rrset-roundrobin`). Every TTL must
//!   still be within the upstream's TTL for that record (the SOA of a negative answer: within
//!   its negative TTL);
//! - OPT: present exactly when the query had one, the DO bit, version and extended RCODE. The
//!   advertised UDP size is not compared (each server advertises its own).
//!
//! A UDP reply with TC set is compared by header, question and OPT only (what a truncated
//! message still carries differs by design: unbound keeps whole RRsets that fit, node-local-dns
//! none), then the question is asked again over TCP, as a stub would, and compared in full.
//!
//! unbound is configured to answer like a plain cache: iterator only (no validator, so no AD
//! and no DNSSEC-driven changes), no qname minimisation, minimal responses (no authority or
//! additional data added from its own cache), no prefetch, no serve-expired, `test.` not a
//! built-in local zone. One policy is aligned on purpose: node-local-dns never sends a UDP
//! reply larger than [`wire::OUR_UDP_SIZE`] (1232, DNS Flag Day 2020) whatever the client
//! advertises, while unbound's `max-udp-size` defaults to 4096, so unbound gets
//! `max-udp-size: 1232` (CoreDNS without `bufsize` would follow the client's size, as unbound
//! does). Queries all have RD=1: with RD=0 unbound answers from its cache only,
//! a forwarder forwards anyway; that difference is by design.
//!
//! Needs `/usr/sbin/unbound` (`bench/harness/install-deps.sh` installs it); without it the
//! test skips loudly, and fails instead under `REQUIRE_PRIVILEGED=1` or in CI (`CI` set).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ask, ask_tcp, Agent};
use node_local_dns::wire;
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, encode_name, parse_query, rcode, rtype, Edns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Where the distribution installs unbound.
const UNBOUND: &str = "/usr/sbin/unbound";
/// The upstream's zone.
const ZONE: &str = "diff.test.";
/// TTL of the zone's SOA record.
const SOA_TTL: u32 = 60;
/// The SOA MINIMUM, so the negative TTL (RFC 2308 §5: min(SOA TTL, MINIMUM)).
const NEGATIVE_TTL: u32 = 30;
/// How long one UDP ask waits for its reply.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long unbound may take to answer its first query.
const UNBOUND_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The EDNS UDP size the upstream advertises.
const UPSTREAM_UDP_SIZE: u16 = 1232;
/// Header bits compared: QR, OPCODE, TC, RD, RA, AD, CD and RCODE (AA 0x0400 and Z 0x0040
/// left out, see the module docs).
const COMPARED_FLAGS: u16 = 0x8000 | 0x7800 | 0x0200 | 0x0100 | 0x0080 | 0x0020 | 0x0010 | 0x000F;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_CD: u8 = 0x10;
const CLASS_CHAOS: u16 = 3;
/// TXT strings longer than this are shortened in reports.
const LONG_STRING: usize = 32;

// ---------------------------------------------------------------------------------------------
// The authoritative upstream.

/// One record of the zone.
struct ZoneRecord {
    owner: String,
    rtype: u16,
    ttl: u32,
    rdata: Vec<u8>,
}

fn name_in_zone(label: &str) -> String {
    if label.is_empty() {
        ZONE.to_owned()
    } else {
        format!("{label}.{ZONE}")
    }
}

fn txt_rdata(strings: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in strings {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    out
}

fn mx_rdata(preference: u16, exchange: &str) -> Vec<u8> {
    let mut out = preference.to_be_bytes().to_vec();
    encode_name(exchange, &mut out);
    out
}

/// A zone with the shapes a cache has to get right: several RRs per RRset, both address
/// families, CNAME chains (one ending in NXDOMAIN), TXT with several strings, MX, an empty
/// non-terminal, an answer too big for 512 bytes, and one too big for any UDP size here.
fn zone() -> Vec<ZoneRecord> {
    let mut z = Vec::new();
    let mut add = |label: &str, rtype: u16, ttl: u32, rdata: Vec<u8>| {
        z.push(ZoneRecord {
            owner: name_in_zone(label),
            rtype,
            ttl,
            rdata,
        });
    };
    add(
        "",
        rtype::SOA,
        SOA_TTL,
        ResponseBuilder::soa_rdata("ns.diff.test.", "admin.diff.test.", NEGATIVE_TTL),
    );
    add(
        "",
        rtype::NS,
        3600,
        ResponseBuilder::name_rdata("ns.diff.test."),
    );
    add("ns", rtype::A, 3600, vec![192, 0, 2, 53]);
    add("www", rtype::A, 300, vec![192, 0, 2, 1]);
    add("www", rtype::A, 300, vec![192, 0, 2, 2]);
    add(
        "v6",
        rtype::AAAA,
        300,
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
            .octets()
            .to_vec(),
    );
    add(
        "v6",
        rtype::AAAA,
        300,
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)
            .octets()
            .to_vec(),
    );
    add("dual", rtype::A, 120, vec![192, 0, 2, 3]);
    add(
        "dual",
        rtype::AAAA,
        120,
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3)
            .octets()
            .to_vec(),
    );
    add(
        "c1",
        rtype::CNAME,
        600,
        ResponseBuilder::name_rdata("c2.diff.test."),
    );
    add(
        "c2",
        rtype::CNAME,
        100,
        ResponseBuilder::name_rdata("www.diff.test."),
    );
    add(
        "dangling",
        rtype::CNAME,
        200,
        ResponseBuilder::name_rdata("gone.diff.test."),
    );
    add(
        "txt",
        rtype::TXT,
        200,
        txt_rdata(&["hello world", "v=spf1 -all"]),
    );
    add("txt", rtype::TXT, 200, txt_rdata(&["second"]));
    add("mx", rtype::MX, 300, mx_rdata(10, "mail1.diff.test."));
    add("mx", rtype::MX, 300, mx_rdata(20, "mail2.diff.test."));
    add("mail1", rtype::A, 300, vec![192, 0, 2, 25]);
    add("mail2", rtype::A, 300, vec![192, 0, 2, 26]);
    add("leaf.ent", rtype::A, 300, vec![192, 0, 2, 80]);
    // 60 A records: about 1,000 bytes, more than 512 and less than 1232.
    for i in 0..60u8 {
        add("many", rtype::A, 300, vec![198, 51, 100, i]);
    }
    // 10 TXT records of 255 bytes: about 2,700 bytes, TCP only.
    for i in 0..10u8 {
        let text = format!("{i}{}", "x".repeat(254));
        add("huge", rtype::TXT, 300, txt_rdata(&[&text]));
    }
    z
}

/// The TTL the upstream gives `(owner, rtype)` (lower-case owner), for the TTL bound checks.
fn upstream_ttls(zone: &[ZoneRecord]) -> HashMap<(String, u16), u32> {
    zone.iter()
        .map(|r| ((r.owner.clone(), r.rtype), r.ttl))
        .collect()
}

/// Answers `query` authoritatively from `zone`: AA and RA set (as kube-dns, a CoreDNS, does),
/// owners equal to the qname compressed to the question (so they take its case), CNAMEs
/// followed inside the zone, NXDOMAIN and NODATA with the SOA (TTL = negative TTL), names
/// outside the zone REFUSED; an OPT (DO echoed) when the query had one. Over UDP a reply
/// larger than the query allows is cut to the question with TC.
fn authoritative_answer(zone: &[ZoneRecord], query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let parsed = parse_query(query).ok()?;
    let qname = parsed.qname_text().to_ascii_lowercase();
    let mut builder = ResponseBuilder::new(query).compress(true);
    if parsed.qclass != 1 || !(qname == ZONE || qname.ends_with(&format!(".{ZONE}"))) {
        builder = builder.rcode(rcode::REFUSED);
    } else {
        let mut name = qname;
        let mut followed = 0;
        loop {
            let here: Vec<&ZoneRecord> = zone.iter().filter(|r| r.owner == name).collect();
            let exists =
                !here.is_empty() || zone.iter().any(|r| r.owner.ends_with(&format!(".{name}")));
            let matching: Vec<&&ZoneRecord> = here
                .iter()
                .filter(|r| r.rtype == parsed.qtype || parsed.qtype == rtype::ANY)
                .collect();
            let cname = here.iter().find(|r| r.rtype == rtype::CNAME);
            if !matching.is_empty() {
                for r in matching {
                    builder = builder.answer(&r.owner, r.rtype, r.ttl, &r.rdata);
                }
                break;
            }
            if let (Some(c), true) = (cname, followed < 8) {
                builder = builder.answer(&c.owner, c.rtype, c.ttl, &c.rdata);
                name = rdata_name(&c.rdata);
                followed += 1;
                continue;
            }
            if !exists {
                builder = builder.rcode(rcode::NXDOMAIN);
            }
            let soa = zone.iter().find(|r| r.rtype == rtype::SOA)?;
            builder = builder.authority(&soa.owner, soa.rtype, NEGATIVE_TTL, &soa.rdata);
            break;
        }
    }
    let mut reply = builder.build();
    let limit = match parsed.edns {
        Some(e) => usize::from(e.udp_size.max(512)),
        None => 512,
    };
    if udp && reply.len() + if parsed.edns.is_some() { 11 } else { 0 } > limit {
        reply = ResponseBuilder::new(query)
            .truncated(true)
            .rcode(reply[3] & 0x0f)
            .build();
    }
    reply[2] |= (FLAG_AA >> 8) as u8;
    if let Some(edns) = parsed.edns {
        reply.push(0);
        reply.extend_from_slice(&rtype::OPT.to_be_bytes());
        reply.extend_from_slice(&UPSTREAM_UDP_SIZE.to_be_bytes());
        let do_bit = if edns.dnssec_ok { 0x80 } else { 0 };
        reply.extend_from_slice(&[0, 0, do_bit, 0, 0, 0]);
        let arcount = u16::from_be_bytes([reply[10], reply[11]]) + 1;
        reply[10..12].copy_from_slice(&arcount.to_be_bytes());
    }
    Some(reply)
}

/// The (uncompressed) name an RDATA starts with, as text.
fn rdata_name(rdata: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&len) = rdata.get(pos) {
        if len == 0 {
            break;
        }
        let label = &rdata[pos + 1..pos + 1 + usize::from(len)];
        out.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        out.push('.');
        pos += 1 + usize::from(len);
    }
    out
}

/// The upstream on real sockets (UDP and TCP on one port); counts the queries it gets.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let zone = Arc::new(zone());
        let (udp, tcp) = agentkit::testing::tokio_udp_and_tcp([127, 0, 0, 1].into());
        let udp = Arc::new(udp);
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let (q, z) = (Arc::clone(&queries), Arc::clone(&zone));
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = authoritative_answer(&z, &buf[..n], true) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        let (q, z) = (Arc::clone(&queries), Arc::clone(&zone));
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    continue;
                };
                let (q, z) = (Arc::clone(&q), Arc::clone(&z));
                tokio::spawn(async move {
                    while let Ok(len) = stream.read_u16().await {
                        let mut packet = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut packet).await.is_err() {
                            return;
                        }
                        q.fetch_add(1, Ordering::SeqCst);
                        if let Some(reply) = authoritative_answer(&z, &packet, false) {
                            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&reply);
                            if stream.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// unbound.

/// Is unbound there? If not: false after a loud skip, or a panic when CI or
/// `REQUIRE_PRIVILEGED=1` says the test must run.
fn require_unbound(test: &str) -> bool {
    if Path::new(UNBOUND).is_file() {
        return true;
    }
    let must = std::env::var("REQUIRE_PRIVILEGED").as_deref() == Ok("1")
        || std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !must,
        "{test}: {UNBOUND} is missing (bench/harness/install-deps.sh installs it) and REQUIRE_PRIVILEGED=1 or CI forbids skipping"
    );
    // Straight to the stderr descriptor: the harness captures `eprintln!` of passing tests.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: {UNBOUND} is missing; install unbound (bench/harness/install-deps.sh) or set REQUIRE_PRIVILEGED=1 to make this a failure ***\n"
    );
    false
}

/// unbound in the foreground on `127.0.0.1:port`, all its files in `dir`; killed on drop.
struct Unbound {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

impl Unbound {
    fn start(dir: &Path, port: u16, upstream: SocketAddr) -> Unbound {
        let conf = dir.join("unbound.conf");
        let log = dir.join("unbound.log");
        let text = format!(
            r#"server:
    interface: 127.0.0.1
    port: {port}
    access-control: 127.0.0.0/8 allow
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
    do-ip6: no
    module-config: "iterator"
    qname-minimisation: no
    do-not-query-localhost: no
    minimal-responses: yes
    max-udp-size: {max_udp}
    prefetch: no
    serve-expired: no
    aggressive-nsec: no
    cache-min-ttl: 0
    use-caps-for-id: no
    local-zone: "test." nodefault
remote-control:
    control-enable: no
forward-zone:
    name: "{ZONE}"
    forward-addr: {ip}@{uport}
"#,
            dir = dir.display(),
            max_udp = wire::OUR_UDP_SIZE,
            ip = upstream.ip(),
            uport = upstream.port(),
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new(UNBOUND)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Unbound {
            child,
            log,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until unbound answers `version.server CH TXT` (answered locally).
    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + UNBOUND_START_TIMEOUT;
        let mut probe = Vec::new();
        build_query(7, "version.server.", rtype::TXT, None, &mut probe);
        let at = probe.len() - 2;
        probe[at..].copy_from_slice(&CLASS_CHAOS.to_be_bytes());
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("unbound exited with {status}:\n{}", self.log());
            }
            if ask(self.addr, &probe, Duration::from_millis(200))
                .await
                .is_some()
            {
                return;
            }
        }
        panic!(
            "unbound not answering after {UNBOUND_START_TIMEOUT:?}:\n{}",
            self.log()
        );
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Reading replies.

/// One resource record, normalised for comparison.
#[derive(Debug, Clone)]
struct Record {
    /// Lower-cased owner.
    name: String,
    rtype: u16,
    class: u16,
    ttl: u32,
    /// Presentation-like RDATA, names lower-cased.
    rdata: String,
}

impl Record {
    /// Everything but the TTL.
    fn key(&self) -> String {
        format!(
            "{} {} {} {}",
            self.name,
            self.class,
            type_name(self.rtype),
            self.rdata
        )
    }
}

/// The OPT record's fields that are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opt {
    udp_size: u16,
    extended_rcode: u8,
    version: u8,
    dnssec_ok: bool,
}

/// A parsed reply.
#[derive(Debug)]
struct Message {
    id: u16,
    flags: u16,
    question: Vec<u8>,
    sections: [Vec<Record>; 3],
    opt: Option<Opt>,
}

const SECTION_NAMES: [&str; 3] = ["answer", "authority", "additional"];

fn type_name(t: u16) -> String {
    match t {
        rtype::A => "A".into(),
        rtype::NS => "NS".into(),
        rtype::CNAME => "CNAME".into(),
        rtype::SOA => "SOA".into(),
        rtype::MX => "MX".into(),
        rtype::TXT => "TXT".into(),
        rtype::AAAA => "AAAA".into(),
        other => format!("TYPE{other}"),
    }
}

fn be16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("short at {at}"))
}

fn be32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("short at {at}"))
}

/// Reads a possibly compressed name at `pos`: (lower-case text, position after it).
fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), String> {
    let mut out = String::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(pos).ok_or("name runs past the end")?;
        match len {
            0 => {
                if out.is_empty() {
                    out.push('.');
                }
                return Ok((out, end.unwrap_or(pos + 1)));
            }
            l if l & 0xC0 == 0xC0 => {
                let target = usize::from(be16(msg, pos)? & 0x3FFF);
                end.get_or_insert(pos + 2);
                pos = target;
            }
            l if l & 0xC0 == 0 => {
                let label = msg
                    .get(pos + 1..pos + 1 + usize::from(l))
                    .ok_or("label runs past the end")?;
                out.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
                out.push('.');
                pos += 1 + usize::from(l);
            }
            _ => return Err(format!("bad label byte {len:#x}")),
        }
    }
    Err("name pointer loop".into())
}

fn rdata_text(msg: &[u8], rtype: u16, start: usize, len: usize) -> Result<String, String> {
    let rdata = msg
        .get(start..start + len)
        .ok_or("RDATA runs past the end")?;
    Ok(match rtype {
        rtype::A if len == 4 => Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]).to_string(),
        rtype::AAAA if len == 16 => {
            Ipv6Addr::from(<[u8; 16]>::try_from(rdata).unwrap()).to_string()
        }
        rtype::CNAME | rtype::NS | rtype::PTR => read_name(msg, start)?.0,
        rtype::MX => format!("{} {}", be16(msg, start)?, read_name(msg, start + 2)?.0),
        rtype::SOA => {
            let (mname, at) = read_name(msg, start)?;
            let (rname, at) = read_name(msg, at)?;
            let fields: Vec<String> = (0..5)
                .map(|i| be32(msg, at + 4 * i).map(|v| v.to_string()))
                .collect::<Result<_, _>>()?;
            format!("{mname} {rname} {}", fields.join(" "))
        }
        rtype::TXT => {
            let mut out = String::new();
            let mut pos = 0;
            while pos < rdata.len() {
                let l = usize::from(rdata[pos]);
                let s = rdata
                    .get(pos + 1..pos + 1 + l)
                    .ok_or("TXT string runs past")?;
                if s.len() > LONG_STRING {
                    // Long strings shortened for the report, a checksum keeps them exact.
                    let sum = s
                        .iter()
                        .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
                    let _ = write!(
                        out,
                        "{:?}...({} bytes, sum {sum:08x}) ",
                        String::from_utf8_lossy(&s[..8]),
                        s.len()
                    );
                } else {
                    let _ = write!(out, "{:?} ", String::from_utf8_lossy(s));
                }
                pos += 1 + l;
            }
            out.trim_end().to_owned()
        }
        _ => rdata.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

fn parse_message(msg: &[u8]) -> Result<Message, String> {
    let id = be16(msg, 0)?;
    let flags = be16(msg, 2)?;
    let counts = [be16(msg, 4)?, be16(msg, 6)?, be16(msg, 8)?, be16(msg, 10)?];
    let mut pos = 12;
    for _ in 0..counts[0] {
        pos = read_name(msg, pos)?.1 + 4;
    }
    let question = msg
        .get(12..pos)
        .ok_or("question runs past the end")?
        .to_vec();
    let mut sections: [Vec<Record>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut opt = None;
    for (s, &count) in counts[1..].iter().enumerate() {
        for _ in 0..count {
            let (name, at) = read_name(msg, pos)?;
            let rt = be16(msg, at)?;
            let class = be16(msg, at + 2)?;
            let ttl = be32(msg, at + 4)?;
            let rdlen = usize::from(be16(msg, at + 8)?);
            let start = at + 10;
            if rt == rtype::OPT {
                if opt.is_some() {
                    return Err("two OPT records".into());
                }
                opt = Some(Opt {
                    udp_size: class,
                    extended_rcode: (ttl >> 24) as u8,
                    version: (ttl >> 16) as u8,
                    dnssec_ok: ttl & 0x8000 != 0,
                });
            } else {
                sections[s].push(Record {
                    name,
                    rtype: rt,
                    class,
                    ttl,
                    rdata: rdata_text(msg, rt, start, rdlen)?,
                });
            }
            pos = start + rdlen;
        }
    }
    if pos != msg.len() {
        return Err(format!("{} trailing bytes", msg.len() - pos));
    }
    Ok(Message {
        id,
        flags,
        question,
        sections,
        opt,
    })
}

// ---------------------------------------------------------------------------------------------
// The cases and the comparison.

/// One query of the matrix.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    qtype: u16,
    edns: Option<Edns>,
    cd: bool,
}

impl Case {
    fn describe(&self) -> String {
        let edns = match self.edns {
            None => "no EDNS".to_owned(),
            Some(e) => format!(
                "EDNS {}{}",
                e.udp_size,
                if e.dnssec_ok { " DO" } else { "" }
            ),
        };
        format!(
            "{} {} ({edns}{})",
            self.name,
            type_name(self.qtype),
            if self.cd { ", CD" } else { "" }
        )
    }

    fn wire(&self) -> Vec<u8> {
        let mut q = Vec::new();
        build_query(rand::random(), self.name, self.qtype, self.edns, &mut q);
        if self.cd {
            q[3] |= FLAG_CD;
        }
        q
    }
}

fn cases() -> Vec<Case> {
    let names: [(&str, u16); 19] = [
        ("www.diff.test.", rtype::A),
        ("WwW.DiFf.TeSt.", rtype::A),
        ("v6.diff.test.", rtype::AAAA),
        ("dual.diff.test.", rtype::A),
        ("DUAL.diff.test.", rtype::AAAA),
        ("c1.diff.test.", rtype::A),
        ("C1.Diff.Test.", rtype::AAAA),
        ("c2.diff.test.", rtype::CNAME),
        ("dangling.diff.test.", rtype::A),
        ("txt.diff.test.", rtype::TXT),
        ("mx.diff.test.", rtype::MX),
        ("diff.test.", rtype::SOA),
        ("many.diff.test.", rtype::A),
        ("huge.diff.test.", rtype::TXT),
        ("nope.diff.test.", rtype::A),
        ("NoPe.Diff.Test.", rtype::AAAA),
        ("www.diff.test.", rtype::AAAA),
        ("ent.diff.test.", rtype::A),
        ("mx.diff.test.", rtype::TXT),
    ];
    let edns = |udp_size: u16, dnssec_ok: bool| {
        Some(Edns {
            udp_size,
            version: 0,
            dnssec_ok,
        })
    };
    let variants = [
        (None, false),
        (edns(512, false), false),
        (edns(1232, true), false),
        (edns(4096, false), false),
        (edns(4096, true), true),
        (None, true),
    ];
    let mut out = Vec::new();
    for (name, qtype) in names {
        for (edns, cd) in variants {
            out.push(Case {
                name,
                qtype,
                edns,
                cd,
            });
        }
    }
    out
}

/// Differences between two replies to `query` (empty: they agree). `full`: compare the
/// sections too (not for truncated UDP replies).
fn differences(
    query: &[u8],
    ttls: &HashMap<(String, u16), u32>,
    ours: &Message,
    theirs: &Message,
    full: bool,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let id = u16::from_be_bytes([query[0], query[1]]);
    let question = &query[12..12 + parse_query(query).unwrap().question.len()];
    for (who, m) in [("node-local-dns", ours), ("unbound", theirs)] {
        if m.id != id {
            diffs.push(format!("{who}: ID {:#06x}, query had {id:#06x}", m.id));
        }
        if m.question != question {
            diffs.push(format!(
                "{who}: question bytes {:02x?} differ from the query's {question:02x?}",
                m.question
            ));
        }
    }
    let (a, b) = (ours.flags & COMPARED_FLAGS, theirs.flags & COMPARED_FLAGS);
    if a != b {
        diffs.push(format!(
            "header flags (AA, Z masked): node-local-dns {a:#06x} [{}], unbound {b:#06x} [{}]",
            flag_names(a),
            flag_names(b)
        ));
    }
    let query_edns = parse_query(query).unwrap().edns;
    for (who, m) in [("node-local-dns", ours), ("unbound", theirs)] {
        if m.opt.is_some() != query_edns.is_some() {
            diffs.push(format!(
                "{who}: OPT {} but the query {} one",
                if m.opt.is_some() {
                    "present"
                } else {
                    "missing"
                },
                if query_edns.is_some() {
                    "had"
                } else {
                    "had no"
                }
            ));
        }
    }
    for (who, m) in [("node-local-dns", ours), ("unbound", theirs)] {
        if let (Some(o), Some(q)) = (m.opt, query_edns) {
            if o.dnssec_ok != q.dnssec_ok {
                diffs.push(format!(
                    "{who}: DO={} in the reply, {} in the query (RFC 3225 §3: copied)",
                    o.dnssec_ok, q.dnssec_ok
                ));
            }
        }
    }
    // A missing or extra OPT is reported above; here the fields of two OPTs.
    if let (Some(a), Some(b)) = (ours.opt, theirs.opt) {
        if (a.dnssec_ok, a.version, a.extended_rcode) != (b.dnssec_ok, b.version, b.extended_rcode)
        {
            diffs.push(format!(
                "OPT: node-local-dns DO={} version={} ext-rcode={}, unbound DO={} version={} ext-rcode={}",
                a.dnssec_ok, a.version, a.extended_rcode, b.dnssec_ok, b.version, b.extended_rcode
            ));
        }
    }
    if !full {
        return diffs;
    }
    for (s, section) in SECTION_NAMES.iter().enumerate() {
        let ka: BTreeSet<String> = ours.sections[s].iter().map(Record::key).collect();
        let kb: BTreeSet<String> = theirs.sections[s].iter().map(Record::key).collect();
        if ka != kb {
            diffs.push(format!(
                "{section}: only node-local-dns has {:?}; only unbound has {:?}",
                ka.difference(&kb).collect::<Vec<_>>(),
                kb.difference(&ka).collect::<Vec<_>>()
            ));
        }
        for (who, m) in [("node-local-dns", ours), ("unbound", theirs)] {
            if m.sections[s].len() != ka.len().max(kb.len()) && ka == kb {
                diffs.push(format!(
                    "{who}: {section} has {} records for {} distinct ones (duplicates)",
                    m.sections[s].len(),
                    ka.len()
                ));
            }
            for r in &m.sections[s] {
                let bound = if r.rtype == rtype::SOA && s == 1 {
                    Some(NEGATIVE_TTL)
                } else {
                    ttls.get(&(r.name.clone(), r.rtype)).copied()
                };
                match bound {
                    Some(bound) if r.ttl <= bound => {}
                    Some(bound) => diffs.push(format!(
                        "{who}: {section} {} has TTL {} above the upstream's {bound}",
                        r.key(),
                        r.ttl
                    )),
                    None => diffs.push(format!(
                        "{who}: {section} {} is not in the upstream's zone",
                        r.key()
                    )),
                }
            }
        }
    }
    diffs
}

fn flag_names(flags: u16) -> String {
    let mut out = Vec::new();
    for (bit, name) in [
        (0x8000, "QR"),
        (0x0400, "AA"),
        (0x0200, "TC"),
        (0x0100, "RD"),
        (0x0080, "RA"),
        (0x0020, "AD"),
        (0x0010, "CD"),
    ] {
        if flags & bit != 0 {
            out.push(name.to_owned());
        }
    }
    let rc = flags & 0xF;
    out.push(
        match rc {
            0 => "NOERROR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            5 => "REFUSED",
            _ => "rcode?",
        }
        .to_owned(),
    );
    out.join(" ")
}

fn render(m: &Message) -> String {
    let mut out = format!("flags [{}]", flag_names(m.flags));
    if let Some(o) = m.opt {
        let _ = write!(out, " OPT(size {}, DO={})", o.udp_size, o.dnssec_ok);
    }
    for (s, name) in SECTION_NAMES.iter().enumerate() {
        for r in &m.sections[s] {
            let _ = write!(out, "\n    {name}: {} ttl={}", r.key(), r.ttl);
        }
    }
    out
}

/// What one comparison saw, so the test can show the matrix exercised what it claims to.
#[derive(Debug, Default)]
struct Seen {
    truncated: usize,
    nxdomain: usize,
    nodata: usize,
    answers: usize,
}

/// Differences in rcode and sections between a resolver's full reply and what the upstream
/// itself answers (computed in-process from the zone, without truncation): both resolvers
/// agreeing on a wrong answer (both SERVFAIL, say) must fail as well.
fn against_upstream(zone: &[ZoneRecord], query: &[u8], reply: &Message) -> Vec<String> {
    let truth = parse_message(&authoritative_answer(zone, query, false).unwrap()).unwrap();
    let mut diffs = Vec::new();
    if truth.flags & 0xF != reply.flags & 0xF {
        diffs.push(format!(
            "node-local-dns rcode {} but the upstream's is {}",
            reply.flags & 0xF,
            truth.flags & 0xF
        ));
    }
    for (s, section) in SECTION_NAMES.iter().enumerate() {
        let kt: BTreeSet<String> = truth.sections[s].iter().map(Record::key).collect();
        let kr: BTreeSet<String> = reply.sections[s].iter().map(Record::key).collect();
        if kt != kr {
            diffs.push(format!(
                "{section} differs from the upstream's: missing {:?}, extra {:?}",
                kt.difference(&kr).collect::<Vec<_>>(),
                kr.difference(&kt).collect::<Vec<_>>()
            ));
        }
    }
    diffs
}

/// Asks both servers `case` (over UDP; over TCP as well when either UDP reply is truncated)
/// and appends every difference, each prefixed with what was asked, to `diffs`.
async fn compare_case(
    case: &Case,
    round: &str,
    zone: &[ZoneRecord],
    ttls: &HashMap<(String, u16), u32>,
    (nld, unbound): (SocketAddr, SocketAddr),
    seen: &mut Seen,
    diffs: &mut Vec<String>,
) {
    let label = format!("[{round}] {}", case.describe());
    let mut query = case.wire();
    let mut transport = "udp";
    loop {
        let replies = if transport == "udp" {
            (
                ask(nld, &query, ASK_TIMEOUT).await,
                ask(unbound, &query, ASK_TIMEOUT).await,
            )
        } else {
            (
                Some(ask_tcp(nld, &query).await),
                Some(ask_tcp(unbound, &query).await),
            )
        };
        let (Some(a), Some(b)) = replies else {
            diffs.push(format!("{label} {transport}: no reply from one of them"));
            return;
        };
        let (ma, mb) = match (parse_message(&a), parse_message(&b)) {
            (Ok(x), Ok(y)) => (x, y),
            (x, y) => {
                diffs.push(format!(
                    "{label} {transport}: unparsable reply: {x:?} / {y:?}"
                ));
                return;
            }
        };
        let truncated = (ma.flags | mb.flags) & FLAG_TC != 0;
        let mut found = differences(&query, ttls, &ma, &mb, !truncated);
        if !truncated {
            found.extend(against_upstream(zone, &query, &ma));
        }
        diffs.extend(found.into_iter().map(|d| {
            format!(
                "{label} {transport}: {d}\n  node-local-dns: {}\n  unbound: {}",
                render(&ma),
                render(&mb)
            )
        }));
        if truncated && transport == "udp" {
            seen.truncated += 1;
            transport = "tcp";
            query = case.wire();
            continue;
        }
        if truncated {
            diffs.push(format!("{label} tcp: TC over TCP"));
            return;
        }
        match (ma.flags & 0xF, ma.sections[0].is_empty()) {
            (3, _) => seen.nxdomain += 1,
            (0, true) => seen.nodata += 1,
            (0, false) => seen.answers += 1,
            _ => {}
        }
        return;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_unbound_apart_from_ttls() {
    if !require_unbound("answers_match_unbound_apart_from_ttls") {
        return;
    }
    let upstream = Upstream::start().await;
    let ttls = upstream_ttls(&zone());
    let dir = common::temp_dir("differential");

    let unbound_port = common::free_port();
    let mut unbound = Unbound::start(&dir, unbound_port, upstream.addr);
    unbound.wait_serving().await;

    let nld_port = common::free_port();
    std::fs::write(
        dir.join("Corefile"),
        format!(
            "diff.test:{nld_port} {{\n    errors\n    cache 30\n    bind 127.0.0.1\n    forward . {}\n}}\n",
            upstream.addr
        ),
    )
    .unwrap();
    let mut agent = Agent::start(
        &dir,
        &common::loopback_args("Corefile", "18098", "127.0.0.1:0"),
    );
    agent.wait_serving().await;
    let nld = SocketAddr::from((Ipv4Addr::LOCALHOST, nld_port));

    let cases = cases();
    let zone = zone();
    let servers = (nld, unbound.addr);
    let mut diffs = Vec::new();
    let mut seen = Seen::default();
    for case in &cases {
        compare_case(case, "miss", &zone, &ttls, servers, &mut seen, &mut diffs).await;
    }
    let before_hits = upstream.queries.load(Ordering::SeqCst);
    for case in &cases {
        compare_case(case, "hit", &zone, &ttls, servers, &mut seen, &mut diffs).await;
    }
    let during_hits = upstream.queries.load(Ordering::SeqCst) - before_hits;
    if during_hits != 0 {
        diffs.push(format!(
            "the second round should be answered from the caches, but the upstream got {during_hits} queries"
        ));
    }
    assert!(
        diffs.is_empty(),
        "{} differences over {} cases × 2 rounds:\n{}\n--- node-local-dns log:\n{}\n--- unbound log:\n{}",
        diffs.len(),
        cases.len(),
        diffs.join("\n"),
        agent.log(),
        unbound.log()
    );
    // The matrix covers what it claims, in both rounds: truncation (`many` without EDNS or
    // at 512, `huge` always), NXDOMAIN (`nope`, `dangling`), NODATA (`www AAAA`, the empty
    // non-terminal `ent`, `mx TXT`) and positive answers.
    assert!(
        seen.truncated >= 2 * 9 && seen.nxdomain >= 2 * 18 && seen.nodata >= 2 * 18,
        "{seen:?}"
    );
    assert!(seen.answers >= 2 * 6 * 12, "{seen:?}");
    assert!(agent.terminate().await.success(), "{}", agent.log());
}
