//! DNS cache hits answered in the kernel: typed handles to the `dns_xdp` and `dns_tc`
//! programs of `ebpf/bpf/dns.bpf.c` and to their maps.
//!
//! The owner (node-local-dns) mirrors its cache into [`DnsFastPath::insert`] and
//! [`DnsFastPath::remove`], names its listen addresses with [`DnsFastPath::add_local`], and
//! attaches to interfaces with [`DnsFastPath::attach`]. The structs here are the C structs of
//! `ebpf/bpf/dns.h`, field for field; `ebpf/tests/layout.rs` checks that against the object's
//! BTF.
//!
//! Consistency: a map update replaces the whole element (the kernel allocates a new one and
//! swaps it in), so the program sees either the old entry or the new one, never a mix.
//! Bounded size: `dns_cache` is an LRU hash, so when it is full the kernel drops the entry
//! least recently answered, and hot entries stay.

use std::{fmt, net::IpAddr, os::fd::BorrowedFd, sync::Arc, time::Duration};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
        Program, SchedClassifier, TcAttachType, Xdp, XdpFlags,
    },
    Ebpf, EbpfLoader, Pod,
};

use crate::{link, test_run, Error, Result};

/// Longest qname mirrored, in wire form with the root label (`DNS_NAME_MAX`).
pub const NAME_MAX: usize = 128;
/// Largest response body mirrored: everything after the question, OPT excluded
/// (`DNS_BODY_MAX`).
pub const BODY_MAX: usize = 512;
/// Most records per mirrored response (`DNS_TTLS_MAX`).
pub const TTLS_MAX: usize = 32;
/// Zones whose hits are counted apart (`DNS_ZONES_MAX`).
pub const ZONES_MAX: usize = 64;
/// Entries of `dns_cache` unless the owner asks for another size.
pub const DEFAULT_CAPACITY: u32 = 10_240;

const HEADER_LEN: usize = 12;
/// `DNS_KEY_DO` / `DNS_KEY_CD`: the flags byte of a key.
const KEY_DO: u8 = 0x01;
const KEY_CD: u8 = 0x02;

static OBJECT: &[u8] = aya::include_bytes_aligned!("../obj/dns.bpf.o");

/// `struct dns_key`: the lower-cased qname in wire form (zero padded), qtype and qclass in
/// network byte order, and the DO (bit 0) and CD (bit 1) bits. node-local-dns's cache key
/// bytes are the same fields back to back, see [`DnsKey::from_cache_key`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DnsKey {
    /// Lower-cased qname, wire form, zero padded.
    pub name: [u8; NAME_MAX],
    /// QTYPE, network byte order.
    pub qtype: [u8; 2],
    /// QCLASS, network byte order.
    pub qclass: [u8; 2],
    /// Bit 0: DO; bit 1: CD.
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 3],
}

// SAFETY: plain old data (byte arrays only, no padding the compiler adds: 136 bytes), the
// same layout as the C struct.
unsafe impl Pod for DnsKey {}

impl DnsKey {
    /// The key for `name` (wire form, lower-cased), `qtype`, `qclass`, DO and CD; None if the
    /// name is longer than the kernel mirrors.
    pub fn new(
        name: &[u8],
        qtype: u16,
        qclass: u16,
        dnssec_ok: bool,
        checking_disabled: bool,
    ) -> Option<DnsKey> {
        if name.is_empty() || name.len() > NAME_MAX {
            return None;
        }
        let mut key = DnsKey {
            name: [0; NAME_MAX],
            qtype: qtype.to_be_bytes(),
            qclass: qclass.to_be_bytes(),
            flags: (if dnssec_ok { KEY_DO } else { 0 })
                | (if checking_disabled { KEY_CD } else { 0 }),
            pad: [0; 3],
        };
        key.name[..name.len()].copy_from_slice(name);
        Some(key)
    }

    /// The key for node-local-dns's cache key bytes (lower-cased wire qname, qtype, qclass,
    /// flags byte); None if they are not that shape or the name is too long to mirror.
    pub fn from_cache_key(bytes: &[u8]) -> Option<DnsKey> {
        let (name, rest) = bytes.split_at_checked(bytes.len().checked_sub(5)?)?;
        let qtype = u16::from_be_bytes([rest[0], rest[1]]);
        let qclass = u16::from_be_bytes([rest[2], rest[3]]);
        let flags = rest[4];
        DnsKey::new(
            name,
            qtype,
            qclass,
            flags & KEY_DO != 0,
            flags & KEY_CD != 0,
        )
    }
}

impl fmt::Debug for DnsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .map_or(NAME_MAX, |root| root + 1);
        f.debug_struct("DnsKey")
            .field("name", &String::from_utf8_lossy(&self.name[..end]))
            .field("qtype", &u16::from_be_bytes(self.qtype))
            .field("qclass", &u16::from_be_bytes(self.qclass))
            .field("flags", &self.flags)
            .finish()
    }
}

/// `struct dns_entry`: a cached response without the header's ID and flags, its question and
/// its OPT. The kernel's reply is the query's header and question followed by `body`, every
/// TTL set to the whole seconds left until `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEntry {
    /// CLOCK_MONOTONIC nanoseconds ([`monotonic_ns`]) from which it is no longer answered.
    pub expires_ns: u64,
    /// The stored header's flags (host order); the rcode and AD are used.
    pub flags: u16,
    /// ANCOUNT, NSCOUNT, ARCOUNT as the bytes of the header (network byte order).
    pub counts: [u16; 3],
    /// Length of the question (qname + qtype + qclass).
    pub question_len: u16,
    /// Bytes of `body` in use.
    pub body_len: u16,
    /// Entries of `ttl_offsets` in use.
    pub ttl_count: u16,
    /// The owner's zone index (below [`ZONES_MAX`]): where hits are counted.
    pub zone: u8,
    /// 1 for an NXDOMAIN/NODATA answer (counted as a `denial` cache hit), else 0.
    pub denial: u8,
    /// Offset of every TTL field in `body`.
    pub ttl_offsets: [u16; TTLS_MAX],
    /// The records after the question.
    pub body: [u8; BODY_MAX],
}

// SAFETY: integers and byte arrays laid out without implicit padding (600 bytes), as the C
// struct.
unsafe impl Pod for DnsEntry {}

impl DnsEntry {
    /// The entry for a cached response `image` (header, question and records, OPT removed:
    /// node-local-dns's `WireImage`), the length of its question, the offsets of its TTL
    /// fields in `image`, answered until `expires_ns` ([`monotonic_ns`] time). Hits are
    /// counted for `zone` (below [`ZONES_MAX`]); `denial` says which cache.
    pub fn from_image(
        image: &[u8],
        question_len: usize,
        ttl_offsets: &[u16],
        expires_ns: u64,
        zone: u8,
        denial: bool,
    ) -> Result<DnsEntry> {
        if usize::from(zone) >= ZONES_MAX {
            return Err(Error::Unsupported(format!(
                "zone index {zone} (the kernel counts {ZONES_MAX} zones)"
            )));
        }
        let body_start = HEADER_LEN + question_len;
        let body = image
            .get(body_start..)
            .filter(|body| !body.is_empty())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "a response of {} bytes has no records after its question",
                    image.len()
                ))
            })?;
        if body.len() > BODY_MAX {
            return Err(Error::Unsupported(format!(
                "records of {} bytes (the kernel mirrors up to {BODY_MAX})",
                body.len()
            )));
        }
        if ttl_offsets.len() > TTLS_MAX {
            return Err(Error::Unsupported(format!(
                "{} records (the kernel mirrors up to {TTLS_MAX})",
                ttl_offsets.len()
            )));
        }
        let header = &image[..HEADER_LEN];
        let word = |at: usize| u16::from_ne_bytes([header[at], header[at + 1]]);
        let mut entry = DnsEntry {
            expires_ns,
            flags: u16::from_be_bytes([header[2], header[3]]),
            counts: [word(6), word(8), word(10)],
            question_len: question_len as u16,
            body_len: body.len() as u16,
            ttl_count: ttl_offsets.len() as u16,
            zone,
            denial: u8::from(denial),
            ttl_offsets: [0; TTLS_MAX],
            body: [0; BODY_MAX],
        };
        for (slot, &at) in entry.ttl_offsets.iter_mut().zip(ttl_offsets) {
            let at = usize::from(at)
                .checked_sub(body_start)
                .filter(|at| at + 4 <= body.len())
                .ok_or_else(|| {
                    Error::Unsupported(format!("TTL offset {at} is not inside the records"))
                })?;
            *slot = at as u16;
        }
        entry.body[..body.len()].copy_from_slice(body);
        Ok(entry)
    }
}

impl fmt::Debug for DnsEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsEntry")
            .field("expires_ns", &self.expires_ns)
            .field("flags", &self.flags)
            .field("question_len", &self.question_len)
            .field("body_len", &self.body_len)
            .field("ttl_count", &self.ttl_count)
            .finish_non_exhaustive()
    }
}

/// `struct dns_local`: an address and port the fast path answers for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsLocal {
    /// IPv6 address, or IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

// SAFETY: byte arrays only (20 bytes), as the C struct.
unsafe impl Pod for DnsLocal {}

impl DnsLocal {
    /// The entry for `addr`:`port`.
    pub fn new(addr: IpAddr, port: u16) -> DnsLocal {
        let mut local = DnsLocal {
            addr: [0; 16],
            port: port.to_be_bytes(),
            family: 4,
            pad: 0,
        };
        match addr {
            IpAddr::V4(v4) => local.addr[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => {
                local.addr = v6.octets();
                local.family = 6;
            }
        }
        local
    }
}

/// Where the program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// XDP, natively where the driver supports it (veth does), generic otherwise. Replies
    /// leave with XDP_TX, which into a veth needs NAPI on the peer (GRO or an XDP program in
    /// the pod's namespace); see docs/ebpf.md.
    Xdp,
    /// tc ingress (tcx on Linux 6.6 and later, clsact before), replying with a redirect out of
    /// the same interface: works into any veth.
    Tc,
}

impl Mode {
    /// The flag value (`xdp`, `tc`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Xdp => "xdp",
            Mode::Tc => "tc",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Mode::Xdp => "dns_xdp",
            Mode::Tc => "dns_tc",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(Mode::Xdp),
            "tc" => Ok(Mode::Tc),
            other => Err(format!("unknown fast path mode {other:?} (want xdp or tc)")),
        }
    }
}

/// How an XDP program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): `XDP_TX` hands the frame to the driver's own
    /// transmit, which for a veth is the peer's NAPI queue.
    Native,
    /// Generic (`XDP_FLAGS_SKB_MODE`): `XDP_TX` transmits the skb through the device's normal
    /// xmit, which delivers into a veth's peer with or without NAPI.
    Generic,
}

/// Whether an `XDP_TX` reply from an XDP program attached (natively) to an interface reaches
/// the other end: see [`xdp_tx_delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdpTx {
    /// It does; the reason says how we know.
    Delivers(String),
    /// It does not, or we cannot tell: the reason says which, for the operator.
    Cannot(String),
}

/// Whether `XDP_TX` from a native XDP program on `interface` can deliver, as far as this
/// namespace can see.
///
/// Linux (`drivers/net/veth.c`): a veth in native XDP mode transmits an `XDP_TX` frame by
/// putting it on the *peer's* XDP ring (`veth_xdp_xmit`), which only the peer's NAPI drains,
/// and it wakes that NAPI only if the peer has an XDP program (`veth_xdp_flush` checks the
/// peer queue's `xdp_prog`). Without NAPI the frame is dropped (counted only as tx drops on
/// the host end); with NAPI from GRO but no program it waits in the ring until something
/// else wakes the peer: `ebpf/tests/xdp_tx.rs` shows both on this kernel (6.18). So a veth
/// delivers only if its peer, read over rtnetlink (`IFLA_LINK`, `IFLA_LINK_NETNSID`,
/// `IFLA_TARGET_NETNSID`, no need to enter the pod's namespace), is up and has a native XDP
/// program. Anything that cannot be read counts as "cannot" (the safe side). Other drivers
/// (NICs) transmit `XDP_TX` themselves and are not checked.
pub fn xdp_tx_delivery(interface: &str) -> XdpTx {
    let link = match link::by_name(interface) {
        Ok(l) => l,
        Err(e) => return XdpTx::Cannot(format!("{interface} cannot be read over rtnetlink: {e}")),
    };
    if link.kind.as_deref() != Some("veth") {
        return XdpTx::Delivers(format!(
            "{interface} is not a veth (kind {}): XDP_TX goes to its driver's transmit",
            link.kind.as_deref().unwrap_or("none")
        ));
    }
    let Some(peer_index) = link.link.filter(|&i| i != 0) else {
        return XdpTx::Cannot(format!("{interface} is a veth whose peer is unknown"));
    };
    let nsid = link.link_netnsid;
    let place = match nsid {
        Some(id) => format!("ifindex {peer_index} in the namespace with id {id}"),
        None => format!("ifindex {peer_index} in this namespace"),
    };
    let peer = match link::by_index(peer_index, nsid) {
        Ok(p) => p,
        Err(e) => {
            return XdpTx::Cannot(format!(
                "the peer of veth {interface} ({place}) cannot be read: {e}"
            ))
        }
    };
    let name = &peer.name;
    if !peer.up {
        return XdpTx::Cannot(format!(
            "the peer of veth {interface} ({name}, {place}) is down"
        ));
    }
    if peer.xdp_drv_prog.is_some() {
        return XdpTx::Delivers(format!(
            "the peer of veth {interface} ({name}, {place}) has a native XDP program, which gives it NAPI and wakes it"
        ));
    }
    XdpTx::Cannot(format!(
        "the peer of veth {interface} ({name}, {place}) has no native XDP program, so XDP_TX replies are dropped or left in its ring (GRO alone does not wake it)"
    ))
}

/// What the programs did with packets, summed over CPUs (the `dns_stats` counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Answered in the kernel.
    pub hit: u64,
    /// A query we could answer, but no entry: passed.
    pub miss: u64,
    /// An entry past its lifetime: passed.
    pub expired: u64,
    /// Not UDP to a local address and port: passed.
    pub not_local: u64,
    /// For us but left to userspace (flags, counts, EDNS version, long names): passed.
    pub unsupported: u64,
    /// For us but truncated or inconsistent: passed.
    pub malformed: u64,
    /// The reply would exceed the client's UDP size: passed.
    pub too_big: u64,
    /// A helper failed: passed before the rewrite started, dropped after.
    pub error: u64,
}

impl Stats {
    /// Every counter with its name (the `result` label of the fast-path metric), in the
    /// order of `enum dns_stat`.
    pub fn by_result(&self) -> [(&'static str, u64); 8] {
        [
            ("hit", self.hit),
            ("miss", self.miss),
            ("expired", self.expired),
            ("not_local", self.not_local),
            ("unsupported", self.unsupported),
            ("malformed", self.malformed),
            ("too_big", self.too_big),
            ("error", self.error),
        ]
    }
}

/// The programs' per-CPU counters (`dns_stats`, `dns_zone_hits`), readable from any thread
/// while the owner keeps changing the cache map: [`DnsFastPath::counters`] hands out a shared
/// handle, so that a metrics scrape reads the kernel's counts itself (one bpf syscall per
/// counter) instead of waiting for the owner.
pub struct DnsCounters {
    stats: PerCpuArray<MapData, u64>,
    zone_hits: PerCpuArray<MapData, u64>,
}

impl fmt::Debug for DnsCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsCounters").finish_non_exhaustive()
    }
}

impl DnsCounters {
    /// The packet counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let mut sums = [0u64; 8];
        for (index, sum) in sums.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(index as u32), 0)
                .map_err(|source| Error::Map {
                    what: "reading dns_stats",
                    source,
                })?;
            *sum = values.iter().sum();
        }
        let [hit, miss, expired, not_local, unsupported, malformed, too_big, error] = sums;
        Ok(Stats {
            hit,
            miss,
            expired,
            not_local,
            unsupported,
            malformed,
            too_big,
            error,
        })
    }

    /// Kernel hits counted under `zone` (below [`ZONES_MAX`]: the entry's `zone` byte, which
    /// the owner chooses), summed over CPUs: (success, denial).
    pub fn zone_hits(&self, zone: u8) -> Result<(u64, u64)> {
        let read = |slot: u32| -> Result<u64> {
            let values = self.zone_hits.get(&slot, 0).map_err(|source| Error::Map {
                what: "reading dns_zone_hits",
                source,
            })?;
            Ok(values.iter().sum())
        };
        let slot = 2 * u32::from(zone);
        Ok((read(slot)?, read(slot + 1)?))
    }
}

/// The loaded programs and their maps. Dropping it detaches every attachment.
pub struct DnsFastPath {
    ebpf: Ebpf,
    cache: HashMap<MapData, DnsKey, DnsEntry>,
    locals: HashMap<MapData, DnsLocal, u32>,
    counters: Arc<DnsCounters>,
    capacity: u32,
    xdp_links: Vec<(String, XdpLinkId)>,
    tc_links: Vec<(String, SchedClassifierLinkId)>,
}

impl fmt::Debug for DnsFastPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsFastPath")
            .field("capacity", &self.capacity)
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

impl DnsFastPath {
    /// Loads both programs (verified, not attached) with room for `capacity` cache entries.
    pub fn load(capacity: u32) -> Result<DnsFastPath> {
        DnsFastPath::load_object(OBJECT, capacity)
    }

    /// [`DnsFastPath::load`] from another build of `dns.bpf.o` (for trying a change to the C
    /// program without rebuilding the Rust side).
    pub fn load_object(object: &[u8], capacity: u32) -> Result<DnsFastPath> {
        let mut ebpf = EbpfLoader::new()
            .set_max_entries("dns_cache", capacity.max(1))
            .load(object)?;
        for mode in [Mode::Xdp, Mode::Tc] {
            let name = mode.program();
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Unsupported(format!("the object has no program {name}")))?;
            let loaded = match program {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{name} is not an XDP or tc program"
                    )))
                }
            };
            loaded.map_err(|source| Error::Program {
                what: format!("loading {name}"),
                source,
            })?;
        }
        let cache = take_map(&mut ebpf, "dns_cache")?;
        let locals = take_map(&mut ebpf, "dns_locals")?;
        let stats = take_map(&mut ebpf, "dns_stats")?;
        let zone_hits = take_map(&mut ebpf, "dns_zone_hits")?;
        Ok(DnsFastPath {
            cache: HashMap::try_from(cache).map_err(|source| Error::Map {
                what: "dns_cache",
                source,
            })?,
            locals: HashMap::try_from(locals).map_err(|source| Error::Map {
                what: "dns_locals",
                source,
            })?,
            counters: Arc::new(DnsCounters {
                stats: PerCpuArray::try_from(stats).map_err(|source| Error::Map {
                    what: "dns_stats",
                    source,
                })?,
                zone_hits: PerCpuArray::try_from(zone_hits).map_err(|source| Error::Map {
                    what: "dns_zone_hits",
                    source,
                })?,
            }),
            ebpf,
            capacity: capacity.max(1),
            xdp_links: Vec::new(),
            tc_links: Vec::new(),
        })
    }

    /// Entries the cache map holds at most.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Answers queries to `addr`:`port` from now on.
    pub fn add_local(&mut self, addr: IpAddr, port: u16) -> Result<()> {
        self.locals
            .insert(DnsLocal::new(addr, port), 1, 0)
            .map_err(|source| Error::Map {
                what: "adding a local address",
                source,
            })
    }

    /// Attaches to `interface` in `mode` (ingress). Attaching the same interface twice in
    /// one mode is an error from the kernel (EEXIST/EBUSY), as is an interface that another
    /// program's XDP link holds.
    pub fn attach(&mut self, interface: &str, mode: Mode) -> Result<()> {
        let what = || format!("attaching {} to {interface}", mode.program());
        match mode {
            Mode::Xdp => {
                let program: &mut Xdp = self.program_mut(mode)?;
                let id = program
                    .attach(interface, XdpFlags::default())
                    .map_err(|source| Error::Program {
                        what: what(),
                        source,
                    })?;
                self.xdp_links.push((interface.to_string(), id));
            }
            Mode::Tc => {
                let program: &mut SchedClassifier = self.program_mut(mode)?;
                let id = match program.attach(interface, TcAttachType::Ingress) {
                    Ok(id) => id,
                    // Before tcx (Linux 6.6) the program hangs off a clsact qdisc.
                    Err(_) => {
                        let _ = tc::qdisc_add_clsact(interface);
                        program
                            .attach(interface, TcAttachType::Ingress)
                            .map_err(|source| Error::Program {
                                what: what(),
                                source,
                            })?
                    }
                };
                self.tc_links.push((interface.to_string(), id));
            }
        }
        Ok(())
    }

    /// The interfaces and modes attached to.
    pub fn attached(&self) -> Vec<(String, Mode)> {
        let xdp = self.xdp_links.iter().map(|(i, _)| (i.clone(), Mode::Xdp));
        let tc = self.tc_links.iter().map(|(i, _)| (i.clone(), Mode::Tc));
        xdp.chain(tc).collect()
    }

    /// Detaches from `interface` in `mode`; false if it was not attached so.
    pub fn detach(&mut self, interface: &str, mode: Mode) -> Result<bool> {
        let what = || format!("detaching {} from {interface}", mode.program());
        match mode {
            Mode::Xdp => {
                let Some(at) = self.xdp_links.iter().position(|(i, _)| i == interface) else {
                    return Ok(false);
                };
                let (_, id) = self.xdp_links.remove(at);
                let program: &mut Xdp = self.program_mut(mode)?;
                program.detach(id).map_err(|source| Error::Program {
                    what: what(),
                    source,
                })?;
            }
            Mode::Tc => {
                let Some(at) = self.tc_links.iter().position(|(i, _)| i == interface) else {
                    return Ok(false);
                };
                let (_, id) = self.tc_links.remove(at);
                let program: &mut SchedClassifier = self.program_mut(mode)?;
                program.detach(id).map_err(|source| Error::Program {
                    what: what(),
                    source,
                })?;
            }
        }
        Ok(true)
    }

    /// How the kernel reports `dns_xdp` attached to `interface` (read back over rtnetlink);
    /// None if the program there is not ours, or there is none.
    pub fn xdp_attach_mode(&self, interface: &str) -> Result<Option<XdpAttachMode>> {
        let program = self
            .ebpf
            .program(Mode::Xdp.program())
            .ok_or_else(|| Error::Unsupported("no program dns_xdp".into()))?;
        let id = program
            .info()
            .map_err(|source| Error::Program {
                what: "reading dns_xdp's id".into(),
                source,
            })?
            .id();
        let link = link::by_name(interface).map_err(|source| Error::Io {
            what: format!("reading {interface} over rtnetlink"),
            source,
        })?;
        Ok(if link.xdp_drv_prog == Some(id) {
            Some(XdpAttachMode::Native)
        } else if link.xdp_skb_prog == Some(id) {
            Some(XdpAttachMode::Generic)
        } else {
            None
        })
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        for (interface, id) in std::mem::take(&mut self.xdp_links) {
            if let Ok(p) = self.program_mut::<Xdp>(Mode::Xdp) {
                if let Err(e) = p.detach(id) {
                    tracing::warn!(interface, error = %e, "detaching dns_xdp");
                }
            }
        }
        for (interface, id) in std::mem::take(&mut self.tc_links) {
            if let Ok(p) = self.program_mut::<SchedClassifier>(Mode::Tc) {
                if let Err(e) = p.detach(id) {
                    tracing::warn!(interface, error = %e, "detaching dns_tc");
                }
            }
        }
    }

    /// Stores (or replaces) the entry for `key`.
    pub fn insert(&mut self, key: &DnsKey, entry: &DnsEntry) -> Result<()> {
        self.cache
            .insert(key, entry, 0)
            .map_err(|source| Error::Map {
                what: "inserting a cache entry",
                source,
            })
    }

    /// Removes the entry for `key`; false if there was none (the kernel may have evicted it).
    pub fn remove(&mut self, key: &DnsKey) -> Result<bool> {
        match self.cache.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(source) => Err(Error::Map {
                what: "removing a cache entry",
                source,
            }),
        }
    }

    /// Removes every entry; returns how many there were.
    pub fn clear(&mut self) -> Result<usize> {
        let keys: Vec<DnsKey> = self.cache.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for key in &keys {
            removed += usize::from(self.remove(key)?);
        }
        Ok(removed)
    }

    /// The entries in the map now (walks it: for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.cache.keys().filter(Result::is_ok).count()
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry for `key`, if the map holds one.
    pub fn get(&self, key: &DnsKey) -> Option<DnsEntry> {
        self.cache.get(key, 0).ok()
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        self.counters.stats()
    }

    /// Kernel hits of `zone` (below [`ZONES_MAX`]), summed over CPUs: (success, denial).
    pub fn zone_hits(&self, zone: u8) -> Result<(u64, u64)> {
        self.counters.zone_hits(zone)
    }

    /// A handle to the counters that other threads can read (the metrics scrape).
    pub fn counters(&self) -> Arc<DnsCounters> {
        Arc::clone(&self.counters)
    }

    /// Runs the program of `mode` once on `packet` (an Ethernet frame) with
    /// `BPF_PROG_TEST_RUN`, attached or not.
    pub fn test_run(&self, mode: Mode, packet: &[u8]) -> Result<test_run::Outcome> {
        test_run::run(self.program_fd(mode)?, packet, 1)
    }

    /// The loaded program of `mode`, for [`test_run::run`] with repeats (the benchmark).
    pub fn program_fd(&self, mode: Mode) -> Result<BorrowedFd<'_>> {
        let program = self
            .ebpf
            .program(mode.program())
            .ok_or_else(|| Error::Unsupported(format!("no program {}", mode.program())))?;
        test_run::program_fd(program)
    }

    fn program_mut<'a, P>(&'a mut self, mode: Mode) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
    {
        let name = mode.program();
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Unsupported(format!("no program {name}")))?;
        program.try_into().map_err(|source| Error::Program {
            what: format!("{name} has the wrong program type"),
            source,
        })
    }
}

impl Drop for DnsFastPath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::Unsupported(format!("the object has no map {name}")))
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of [`DnsEntry::expires_ns`] (the kernel's
/// `bpf_ktime_get_ns`, and Rust's `Instant` on Linux).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// [`monotonic_ns`] `after` from now.
pub fn expires_after(after: Duration) -> u64 {
    monotonic_ns().saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `\x03api\x04test\x00`, qtype A, class IN, and the flags byte.
    fn cache_key(flags: u8) -> Vec<u8> {
        let mut k = b"\x03api\x04test\x00".to_vec();
        k.extend_from_slice(&[0, 1, 0, 1, flags]);
        k
    }

    #[test]
    fn keys_come_from_node_local_dns_cache_keys() {
        let key = DnsKey::from_cache_key(&cache_key(KEY_DO | KEY_CD)).unwrap();
        assert_eq!(&key.name[..10], b"\x03api\x04test\x00");
        assert!(key.name[10..].iter().all(|&b| b == 0), "zero padded");
        assert_eq!((key.qtype, key.qclass, key.flags), ([0, 1], [0, 1], 3));
        assert_ne!(
            key,
            DnsKey::from_cache_key(&cache_key(0)).unwrap(),
            "DO/CD are keyed"
        );
        assert!(
            DnsKey::from_cache_key(&[1, 2, 3]).is_none(),
            "too short for a key"
        );
        let long = vec![1u8; NAME_MAX + 1];
        assert!(
            DnsKey::new(&long, 1, 1, false, false).is_none(),
            "longer than mirrored"
        );
        assert!(DnsKey::new(&long[..NAME_MAX], 1, 1, false, false).is_some());
    }

    /// Header (ID 7, QR RD RA AD, 1 question, 1 answer) + question `api.test. A IN` + one A
    /// record with a compressed owner.
    fn image() -> (Vec<u8>, usize, Vec<u16>) {
        let mut m = vec![0, 7, 0x81, 0xa0, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend_from_slice(b"\x03api\x04test\x00\x00\x01\x00\x01");
        let question_len = m.len() - 12;
        let ttl_at = m.len() + 6;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
        (m, question_len, vec![ttl_at as u16])
    }

    #[test]
    fn entries_keep_the_records_and_relative_ttl_offsets() {
        let (m, qlen, ttls) = image();
        let e = DnsEntry::from_image(&m, qlen, &ttls, 99, 3, false).unwrap();
        assert_eq!(usize::from(e.body_len), 16);
        assert_eq!(&e.body[..16], &m[12 + qlen..]);
        assert_eq!(e.ttl_offsets[0], 6, "relative to the records");
        assert_eq!((e.ttl_count, e.zone, e.denial, e.expires_ns), (1, 3, 0, 99));
        assert_eq!(e.flags, 0x81a0);
        assert_eq!(u16::from_be(e.counts[0]), 1, "ANCOUNT as on the wire");
    }

    #[test]
    fn entries_the_kernel_cannot_hold_are_refused_with_the_reason() {
        let (m, qlen, ttls) = image();
        let err = |r: Result<DnsEntry>| r.unwrap_err().to_string();
        assert!(err(DnsEntry::from_image(
            &m[..12 + qlen],
            qlen,
            &[],
            1,
            0,
            false
        ))
        .contains("no records"));
        let mut big = m.clone();
        big.extend(std::iter::repeat_n(0, BODY_MAX));
        assert!(err(DnsEntry::from_image(&big, qlen, &ttls, 1, 0, false))
            .contains("kernel mirrors up to 512"));
        let many = vec![ttls[0]; TTLS_MAX + 1];
        assert!(err(DnsEntry::from_image(&m, qlen, &many, 1, 0, false)).contains("33 records"));
        assert!(err(DnsEntry::from_image(&m, qlen, &[5], 1, 0, false)).contains("not inside"));
        assert!(err(DnsEntry::from_image(
            &m,
            qlen,
            &ttls,
            1,
            ZONES_MAX as u8,
            false
        ))
        .contains("zone index 64"));
    }

    #[test]
    fn modes_parse_from_their_flag_values() {
        assert_eq!("tc".parse::<Mode>(), Ok(Mode::Tc));
        assert_eq!("xdp".parse::<Mode>(), Ok(Mode::Xdp));
        assert!("afxdp".parse::<Mode>().unwrap_err().contains("xdp or tc"));
    }

    #[test]
    fn locals_of_both_families() {
        let v4 = DnsLocal::new("169.254.20.10".parse().unwrap(), 53);
        assert_eq!(
            (&v4.addr[..4], v4.port, v4.family),
            (&[169, 254, 20, 10][..], [0, 53], 4)
        );
        let v6 = DnsLocal::new("fd00::a".parse().unwrap(), 53);
        assert_eq!((v6.addr[15], v6.family), (0x0a, 6));
    }
}
