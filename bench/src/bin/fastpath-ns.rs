//! Nanoseconds per query of the kernel DNS fast path (`ebpf/bpf/dns.bpf.c`), measured with
//! `BPF_PROG_TEST_RUN` for both programs (`dns_xdp`, `dns_tc`). Prints one JSON document on
//! stdout; `bench/harness/dns_fastpath.py` runs it and puts the numbers in its report.
//!
//! What is timed, per program:
//! - **hit**: `kubernetes.default.svc.cluster.local.` A, one answer, cached the way
//!   node-local-dns mirrors its cache (`node_local_dns::fast_path::kernel_entry`), asked
//!   without EDNS and with EDNS. The program rewrites the packet in place and the kernel does
//!   not restore it between repeats, so every hit is its own syscall with `repeat = 1`; the
//!   figure is the mean of the kernel's `duration` fields (its own timer around the program),
//!   with the median and p99 beside it. The first reply is checked byte for byte against the
//!   userspace cache's reply, and every verdict is checked.
//! - **miss** (a name not in the map) and **not local** (a packet to another port: the
//!   program's earliest exit): passes leave the packet as it was, so one syscall repeats them
//!   (`repeat = N`, the kernel's average); they are also timed with `repeat = 1` per syscall,
//!   like the hit. The difference between the two for the not-local path is the timer's own
//!   per-call overhead, which is inside every `repeat = 1` figure, the hit's included.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use ebpf::dns::{DnsFastPath, Mode, Stats};
use ebpf::{frame, test_run};
use node_local_dns::cache::Key;
use node_local_dns::fast_path::{kernel_entry, kernel_key};
use node_local_dns::wire::{self, build_query, parse_query, parse_response, rtype, Edns};

/// The query every hit asks: the name every pod's client libraries resolve.
const QNAME: &str = "kubernetes.default.svc.cluster.local.";
/// A name never cached: the miss path.
const MISS_QNAME: &str = "nothing-here.default.svc.cluster.local.";
/// node-local-dns's link-local listen address, and a pod.
const LOCAL: &str = "169.254.20.10:53";
const CLIENT: &str = "10.201.0.2:41000";
/// Another port on the local address: the program's not-local early exit.
const NOT_LOCAL: &str = "169.254.20.10:5353";
/// The advertised UDP size of the EDNS query (the DNS flag day's default).
const EDNS_UDP_SIZE: u16 = 1232;
/// How long the benchmark's entry stays valid: far beyond any run.
const ENTRY_TTL: Duration = Duration::from_secs(3600);
/// Unmeasured calls before each timed series (code and data caches, branch predictors).
const WARMUP_CALLS: u32 = 10_000;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// Times the kernel DNS fast path with BPF_PROG_TEST_RUN and prints JSON.
#[derive(Debug, Parser)]
struct Args {
    /// Syscalls (each `repeat = 1`) per hit series.
    #[arg(long, default_value_t = 1_000_000)]
    hits: u32,
    /// Repeats of the one syscall per pass series (miss, not local).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Syscalls (each `repeat = 1`) per pass series timed like the hit.
    #[arg(long, default_value_t = 200_000)]
    pass_calls: u32,
}

/// One timed series.
#[derive(Debug)]
struct Series {
    mode: Mode,
    path: &'static str,
    variant: &'static str,
    packet_bytes: usize,
    reply_bytes: usize,
    calls: u32,
    repeat: u32,
    /// Mean of the kernel's per-call `duration` (itself the per-repeat average), ns.
    mean_ns: f64,
    /// Median and p99 of the per-call durations (None for a single call).
    p50_ns: Option<u32>,
    p99_ns: Option<u32>,
    /// Wall-clock per syscall as seen from userspace (syscall entry, copies, the run).
    wall_ns_per_call: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        ebpf::can_load(),
        "cannot create eBPF maps: run as root (or with CAP_BPF and CAP_NET_ADMIN)"
    );
    ensure!(
        args.hits > 0 && args.repeat > 0 && args.pass_calls > 0,
        "--hits, --repeat and --pass-calls must be at least 1"
    );
    let (local, client, not_local) = (addr(LOCAL)?, addr(CLIENT)?, addr(NOT_LOCAL)?);
    let mut path = DnsFastPath::load(1024).context("loading the DNS fast path")?;
    path.add_local(local.ip(), local.port())?;

    let plain = query(0x1234, QNAME, None);
    let edns = query(
        0x1235,
        QNAME,
        Some(Edns {
            udp_size: EDNS_UDP_SIZE,
            version: 0,
            dnssec_ok: false,
        }),
    );
    let image = cache(&mut path, &plain)?;
    let miss = query(0x1236, MISS_QNAME, None);

    let mut series = Vec::new();
    for mode in [Mode::Xdp, Mode::Tc] {
        let program = path.program_fd(mode)?;
        for (variant, q) in [("no EDNS", &plain), ("EDNS 1232", &edns)] {
            let packet = frame::udp(client, local, q, None);
            let reply = check_hit(&path, mode, &packet, q, &image)?;
            let mut s = per_call(program, mode, &packet, args.hits, answered(mode))?;
            (s.path, s.variant, s.reply_bytes) = ("hit", variant, reply);
            series.push(s);
        }
        for (name, packet) in [
            ("miss", frame::udp(client, local, &miss, None)),
            ("not local", frame::udp(client, not_local, &plain, None)),
        ] {
            let mut s = per_call(program, mode, &packet, args.pass_calls, passed(mode))?;
            (s.path, s.variant, s.reply_bytes) = (name, "repeat = 1", 0);
            series.push(s);
            let mut s = repeated(program, mode, &packet, args.repeat)?;
            (s.path, s.variant) = (name, "repeat = N");
            series.push(s);
        }
    }
    check_counters(&path, &args)?;
    println!("{}", to_json(&args, &series));
    Ok(())
}

fn addr(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("address {s}"))
}

fn query(id: u16, name: &str, edns: Option<Edns>) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, rtype::A, edns, &mut q);
    q
}

/// Caches one A record for `query`'s name as node-local-dns's mirror does (an upstream
/// response, parsed and imaged by the userspace cache, turned into the kernel entry).
fn cache(path: &mut DnsFastPath, query: &[u8]) -> anyhow::Result<wire::WireImage> {
    let q = parse_query(query).context("parsing our own query")?;
    let response = wire::testing::ResponseBuilder::new(query)
        .compress(true)
        .answer(QNAME, rtype::A, 30, &[10, 96, 0, 1])
        .build();
    let (_, image) = parse_response(&q, &response).context("parsing the response")?;
    let image = image.context("the response is not cacheable")?;
    let now = Instant::now();
    let entry = kernel_entry(&image, now + ENTRY_TTL, None, now, 0)?;
    let key = kernel_key(&Key::of(&q)).context("the name is too long for the kernel")?;
    path.insert(&key, &entry)?;
    Ok(image)
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

/// One hit through the program, checked: the verdict, a well-formed turned-around frame, and
/// the DNS payload byte for byte what the userspace cache renders. Returns the reply's size.
fn check_hit(
    path: &DnsFastPath,
    mode: Mode,
    packet: &[u8],
    query: &[u8],
    image: &wire::WireImage,
) -> anyhow::Result<usize> {
    let out = path.test_run(mode, packet)?;
    ensure!(
        out.retval == answered(mode),
        "{mode:?}: verdict {} for a cached name",
        out.retval
    );
    let reply = frame::parse_udp(&out.packet)
        .map_err(|e| anyhow::anyhow!("{mode:?}: the reply frame is bad: {e}"))?;
    let q = parse_query(query).context("parsing our own query")?;
    let at = usize::from(image.ttl_offsets()[0]);
    let ttl = reply
        .payload
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .context("the reply is shorter than its first TTL")?;
    let mut expected = Vec::new();
    wire::render(&q, image, ttl, q.udp_limit(), &mut expected);
    ensure!(
        reply.payload == expected,
        "{mode:?}: the kernel's reply differs from the userspace cache's"
    );
    Ok(out.packet.len())
}

/// `calls` syscalls of one run each; every verdict must be `want`.
fn per_call(
    program: BorrowedFd<'_>,
    mode: Mode,
    packet: &[u8],
    calls: u32,
    want: u32,
) -> anyhow::Result<Series> {
    for _ in 0..WARMUP_CALLS.min(calls) {
        test_run::run(program, packet, 1)?;
    }
    let mut durations = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for _ in 0..calls {
        let out = test_run::run(program, packet, 1)?;
        if out.retval != want {
            bail!("{mode:?}: verdict {} where {want} was expected", out.retval);
        }
        durations.push(out.duration_ns);
    }
    let wall = start.elapsed();
    let sum: u64 = durations.iter().map(|&d| u64::from(d)).sum();
    durations.sort_unstable();
    Ok(Series {
        mode,
        path: "",
        variant: "",
        packet_bytes: packet.len(),
        reply_bytes: 0,
        calls,
        repeat: 1,
        mean_ns: sum as f64 / f64::from(calls),
        p50_ns: Some(percentile(&durations, 50.0)),
        p99_ns: Some(percentile(&durations, 99.0)),
        wall_ns_per_call: wall.as_nanos() as f64 / f64::from(calls),
    })
}

/// One syscall repeating a pass `repeat` times; the packet must come back untouched.
fn repeated(
    program: BorrowedFd<'_>,
    mode: Mode,
    packet: &[u8],
    repeat: u32,
) -> anyhow::Result<Series> {
    test_run::run(program, packet, WARMUP_CALLS.min(repeat))?;
    let start = Instant::now();
    let out = test_run::run(program, packet, repeat)?;
    let wall = start.elapsed();
    ensure!(
        out.retval == passed(mode),
        "{mode:?}: verdict {} for a packet to pass",
        out.retval
    );
    ensure!(
        out.packet == packet,
        "{mode:?}: a passed packet came back changed"
    );
    Ok(Series {
        mode,
        path: "",
        variant: "",
        packet_bytes: packet.len(),
        reply_bytes: 0,
        calls: 1,
        repeat,
        mean_ns: f64::from(out.duration_ns),
        p50_ns: None,
        p99_ns: None,
        wall_ns_per_call: wall.as_nanos() as f64,
    })
}

/// Nearest-rank percentile of an ascending, non-empty slice.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The program's own counters must account for every run: a series that silently took
/// another path would time the wrong thing.
fn check_counters(path: &DnsFastPath, args: &Args) -> anyhow::Result<()> {
    let s: Stats = path.stats()?;
    let check_hits = 2; // check_hit, once per query variant and mode
    let per_mode_hits = 2 * (args.hits + WARMUP_CALLS.min(args.hits)) + check_hits;
    let per_mode_pass = args.pass_calls
        + WARMUP_CALLS.min(args.pass_calls)
        + args.repeat
        + WARMUP_CALLS.min(args.repeat);
    let want = (
        2 * u64::from(per_mode_hits),
        2 * u64::from(per_mode_pass),
        2 * u64::from(per_mode_pass),
    );
    ensure!(
        (s.hit, s.miss, s.not_local) == want && s.error == 0 && s.malformed == 0,
        "the program's counters {s:?} do not match the runs (hit, miss, not_local) = {want:?}"
    );
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "null".to_string(), |v| v.to_string())
}

/// The report, as JSON (written by hand: a flat document of numbers and fixed strings).
fn to_json(args: &Args, series: &[Series]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\n  \"kernel\": \"{}\",\n  \"query\": \"{QNAME} A IN, one A record\",\n  \
         \"hits\": {},\n  \"repeat\": {},\n  \"pass_calls\": {},\n  \"series\": [",
        kernel_release(),
        args.hits,
        args.repeat,
        args.pass_calls
    );
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            o,
            "{}\n    {{\"mode\": \"{}\", \"path\": \"{}\", \"variant\": \"{}\", \
             \"packet_bytes\": {}, \"reply_bytes\": {}, \"calls\": {}, \"repeat\": {}, \
             \"mean_ns\": {:.2}, \"p50_ns\": {}, \"p99_ns\": {}, \"wall_ns_per_call\": {:.1}}}",
            if i == 0 { "" } else { "," },
            s.mode.as_str(),
            s.path,
            s.variant,
            s.packet_bytes,
            s.reply_bytes,
            s.calls,
            s.repeat,
            s.mean_ns,
            opt(s.p50_ns),
            opt(s.p99_ns),
            s.wall_ns_per_call
        );
    }
    o.push_str("\n  ]\n}");
    o
}
