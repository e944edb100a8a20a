//! Two TCP sockets spliced in the kernel with a sockmap: the bytes that arrive on one leave on
//! the other, without waking the process that owns them (`ebpf/bpf/splice.bpf.c`).
//!
//! The kernel program only redirects. What makes the splice exactly right lives here and in the
//! caller, because sockmap has a history of losing bytes at the edges
//! (`../shared/reference/sni-proxy.md` §3.3):
//!
//! - **Bytes read before the splice.** The caller forwards what it read itself and writes it
//!   to the peer before calling [`Splicer::splice`]; it reads a socket until `EAGAIN` first,
//!   so that no skb is left half read (the verdict would be handed the whole skb again).
//!   Bytes that arrive after that stay queued on the socket; the splice runs the verdict over
//!   them once the socket is in the map (setting `SO_RCVLOWAT` makes TCP call the socket's
//!   data-ready hook, which is the verdict's).
//! - **Peer first.** Both sockets enter the target map (`splice_peer`, no program) before
//!   either enters the verdict map (`splice_src`), so a verdict always finds its peer.
//! - **End of stream.** The kernel moves redirected skbs into the peer's send queue from a
//!   worker, later. A FIN passed on too early (`shutdown(SHUT_WR)` on the peer) makes that
//!   worker fail and drop the bytes still queued, which TCP has already acknowledged to the
//!   sender. So after the source's EOF, [`Pair::flushed`] compares what TCP received on the
//!   source with what was written into the peer (`TCP_INFO` and `SIOCOUTQ`) and says when it
//!   is safe; only then may the caller shut the peer down.
//! - **Half-closed sockets** cannot enter a sockmap (only `ESTABLISHED` ones can): a direction
//!   whose socket could not be inserted stays with the caller, who copies it in userspace
//!   ([`Pair::redirected`]); the other direction may still be spliced.
//! - **Close.** Dropping the [`Pair`] removes both sockets from the maps; the kernel also
//!   removes a socket when it is closed or reset.
//!
//! The path is used only on kernels of at least [`MIN_KERNEL`] and where [`Splicer::self_test`]
//! (a spliced loopback connection with bytes queued before the splice, a megabyte each way,
//! half-closes, every byte checked) passes.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use aya::programs::SkSkb;

use crate::{Error, Result};

/// The oldest kernel the splice is used on. The verdict-only stream program exists since 5.10
/// and reads skbs off the receive queue directly since 6.0; the fixes for redirected bytes lost
/// or accounted twice at close landed through the 6.1–6.6 stable series. We test on 6.18, and
/// 6.6 is the oldest long-term kernel carrying all of them: older kernels get splice(2) or copy.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// Kernel releases (prefixes of `/proc/sys/kernel/osrelease`) on which the splice was seen
/// exact, run after run: the ignored stress test in `ebpf/tests/sockmap.rs` and the bulk tests
/// of `sni-proxy/tests/sockmap.rs`. Empty: on the only kernel measured, 6.18.44, the kernel
/// sends whole skbs twice (65,483 bytes on loopback, sometimes two) under concurrent two-way
/// load, in about half the runs of four connections × 512 MiB each way, and drops bytes queued
/// for a slow receiver when the source's FIN arrives, in about one run in ten
/// (docs/sni-proxy.md, "Data paths"). The self-test cannot catch that in bounded time, so the
/// caller treats an untrusted kernel as unsafe for production traffic.
pub const TRUSTED_KERNELS: &[&str] = &[];

/// Sockets per map when the caller has no better figure (two per spliced connection).
pub const DEFAULT_CAPACITY: u32 = 65_536;

/// How long [`Splicer::self_test`] may take before it counts as failed.
const SELF_TEST_DEADLINE: Duration = Duration::from_secs(5);

/// The compiled program (`ebpf/build.sh` makes it from `ebpf/bpf/splice.bpf.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../obj/splice.bpf.o");

const PROGRAM: &str = "splice_verdict";
const PEER_MAP: &str = "splice_peer";
const SRC_MAP: &str = "splice_src";
const STATS_MAP: &str = "splice_stats";

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_NOEXIST: u64 = 1;
/// `SO_COOKIE` (asm-generic/socket.h; the same on every architecture we build for).
const SO_COOKIE: libc::c_int = 57;
/// `TCP_CLOSE` in `tcp_info.tcpi_state`.
const TCP_CLOSE: u8 = 7;

/// The kernel program's counters, summed over CPUs (`enum splice_stat` in `splice.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    /// skbs sent on to the peer socket.
    RedirectedSkbs = 0,
    /// Payload bytes sent on to the peer socket.
    RedirectedBytes = 1,
    /// skbs whose socket had no peer: left in the socket's own receive queue.
    NoPeerSkbs = 2,
    /// Payload bytes of those.
    NoPeerBytes = 3,
}

/// How many counters `splice_stats` holds (`SPLICE_STAT_COUNT`).
pub const STAT_COUNT: u32 = 4;

/// Whether the running kernel is at least [`MIN_KERNEL`]; the error says what it is instead.
pub fn kernel_supported() -> std::result::Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("reading /proc/sys/kernel/osrelease: {e}"))?;
    let release = release.trim();
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => Err(format!(
            "kernel {release} is older than {}.{}",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        None => Err(format!("cannot parse kernel release {release:?}")),
    }
}

/// Whether the running kernel is one of [`TRUSTED_KERNELS`]; the error says why not.
pub fn kernel_trusted() -> std::result::Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("reading /proc/sys/kernel/osrelease: {e}"))?;
    let release = release.trim();
    if TRUSTED_KERNELS.iter().any(|k| release.starts_with(k)) {
        return Ok(());
    }
    Err(format!(
        "kernel {release} is not known to splice concurrent two-way traffic exactly \
         (6.18.44 repeats and drops bytes under load)"
    ))
}

/// `6.18.0-1-amd64` → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The loaded program and its maps. Shared by every connection: splicing and unsplicing are
/// map updates through the `bpf(2)` system call on `&self`, without a lock.
#[derive(Clone)]
pub struct Splicer {
    inner: Arc<Inner>,
}

struct Inner {
    peer: OwnedFd,
    src: OwnedFd,
    stats: PerCpuArray<MapData, u64>,
    /// Owns the program and its attachment to `splice_src`: dropped last, it detaches.
    _ebpf: std::sync::Mutex<aya::Ebpf>,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer").finish_non_exhaustive()
    }
}

impl Splicer {
    /// Loads the program with room for `capacity` sockets per map and attaches its verdict to
    /// `splice_src`. Needs CAP_BPF and CAP_NET_ADMIN (or root).
    pub fn load(capacity: u32) -> Result<Splicer> {
        let mut ebpf = aya::EbpfLoader::new()
            .set_max_entries(PEER_MAP, capacity)
            .set_max_entries(SRC_MAP, capacity)
            .load(OBJECT)?;
        let src_map = ebpf.take_map(SRC_MAP).ok_or_else(|| missing(SRC_MAP))?;
        let peer_map = ebpf.take_map(PEER_MAP).ok_or_else(|| missing(PEER_MAP))?;
        let stats_map = ebpf.take_map(STATS_MAP).ok_or_else(|| missing(STATS_MAP))?;
        let src: aya::maps::SockHash<MapData, u64> =
            src_map.try_into().map_err(|source| Error::Map {
                what: "splice_src is not a sockhash",
                source,
            })?;
        let peer: aya::maps::SockHash<MapData, u64> =
            peer_map.try_into().map_err(|source| Error::Map {
                what: "splice_peer is not a sockhash",
                source,
            })?;
        let stats: PerCpuArray<MapData, u64> =
            stats_map.try_into().map_err(|source| Error::Map {
                what: "splice_stats is not a per-CPU array",
                source,
            })?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| missing(PROGRAM))?
            .try_into()
            .map_err(|source| program_error("splice_verdict is not an sk_skb program", source))?;
        program
            .load()
            .map_err(|source| program_error("loading splice_verdict", source))?;
        program
            .attach(src.fd())
            .map_err(|source| program_error("attaching splice_verdict to splice_src", source))?;
        let dup = |fd: BorrowedFd<'_>, what: &str| {
            fd.try_clone_to_owned().map_err(|source| Error::Io {
                what: format!("duplicating the {what} descriptor"),
                source,
            })
        };
        let inner = Inner {
            peer: dup(peer.fd().as_fd(), PEER_MAP)?,
            src: dup(src.fd().as_fd(), SRC_MAP)?,
            stats,
            _ebpf: std::sync::Mutex::new(ebpf),
        };
        Ok(Splicer {
            inner: Arc::new(inner),
        })
    }

    /// Splices `a` and `b`: from now on the kernel carries each socket's incoming bytes to the
    /// other, for every direction whose sockets could enter the maps ([`Pair::redirected`]).
    ///
    /// Before calling, the caller must have written everything it read itself to the peer, and
    /// must have read each socket until `EAGAIN` or not at all (`read_before` counts the bytes
    /// it read from each, for [`Pair::flushed`]). Errors only if neither direction could be
    /// spliced; nothing is left in the maps then.
    pub fn splice<'a>(&self, a: Leg<'a>, b: Leg<'a>) -> Result<Pair<'a>> {
        let mut pair = Pair {
            inner: Arc::clone(&self.inner),
            legs: [
                LegState::new(a.fd, a.read_before)?,
                LegState::new(b.fd, b.read_before)?,
            ],
        };
        // Targets first: a verdict must never run without its peer in place. A socket whose
        // cookie keys an entry is a source; the entry's value is where its bytes go.
        for (from, to) in [(0, 1), (1, 0)] {
            let key = pair.legs[from].cookie;
            match update(&self.inner.peer, key, pair.legs[to].fd.as_raw_fd()) {
                Ok(()) => pair.legs[from].in_peer = true,
                Err(e) => {
                    tracing::debug!(error = %e, "socket cannot be a splice target");
                }
            }
        }
        // Then the sources: inserting a socket here starts its verdict; queued bytes are then
        // pushed through it by a data-ready kick.
        for from in 0..2 {
            if !pair.legs[from].in_peer {
                continue;
            }
            let leg = &mut pair.legs[from];
            match update(&self.inner.src, leg.cookie, leg.fd.as_raw_fd()) {
                Ok(()) => {
                    leg.in_src = true;
                    kick(leg.fd).map_err(|source| Error::Io {
                        what: "setting SO_RCVLOWAT to run the splice over queued bytes".into(),
                        source,
                    })?;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "socket cannot be a splice source");
                }
            }
        }
        if !pair.legs[0].in_src && !pair.legs[1].in_src {
            // Drop removes the peer entries.
            return Err(Error::Unsupported(
                "neither socket could enter the sockmap (half-closed, or the map is full)".into(),
            ));
        }
        Ok(pair)
    }

    /// The kernel program's counters, summed over CPUs.
    pub fn stat(&self, stat: Stat) -> Result<u64> {
        let values = self
            .inner
            .stats
            .get(&(stat as u32), 0)
            .map_err(|source| Error::Map {
                what: "reading splice_stats",
                source,
            })?;
        Ok(values.iter().sum())
    }

    /// Splices a loopback connection and checks every byte: bytes read before the splice and
    /// forwarded by hand, bytes queued before the splice, a megabyte each way, a half-close each
    /// way with the flush accounting of [`Pair::flushed`]. Bounded by a few seconds.
    pub fn self_test(&self) -> Result<()> {
        self_test::run(self).map_err(|e| Error::Io {
            what: "sockmap self-test".into(),
            source: e,
        })
    }
}

fn missing(what: &str) -> Error {
    Error::Unsupported(format!("{what} is missing from splice.bpf.o"))
}

fn program_error(what: &str, source: aya::programs::ProgramError) -> Error {
    Error::Program {
        what: what.to_string(),
        source,
    }
}

/// One socket handed to [`Splicer::splice`].
#[derive(Debug, Clone, Copy)]
pub struct Leg<'a> {
    /// The socket (an established TCP socket).
    pub fd: BorrowedFd<'a>,
    /// Bytes the caller read from it before the splice (and forwarded itself).
    pub read_before: u64,
}

/// Which socket of a [`Pair`]: the first or second given to [`Splicer::splice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first socket (`a`).
    A,
    /// The second socket (`b`).
    B,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// Where a direction stands after its source's EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Every byte the source received is in the peer's send queue: its FIN may follow. The
    /// exact number of bytes the kernel moved that way since the splice.
    Done(u64),
    /// Bytes are still on their way through the kernel.
    Pending,
    /// The peer is closed or failed: the bytes still on their way are lost.
    Broken,
    /// The kernel wrote more bytes into the peer than the source received: it repeated some
    /// (seen on 6.18.44 under concurrent load, see [`TRUSTED_KERNELS`]). The stream is corrupt.
    Excess(u64),
}

/// Two spliced sockets. Borrowing them keeps them open while spliced; dropping it removes them
/// from the maps.
pub struct Pair<'a> {
    inner: Arc<Inner>,
    legs: [LegState<'a>; 2],
}

struct LegState<'a> {
    fd: BorrowedFd<'a>,
    cookie: u64,
    read_before: u64,
    /// Bytes written into this socket (acked + queued) when the splice began.
    written_before: u64,
    /// Its cookie keys a `splice_peer` entry (this socket's bytes have a target).
    in_peer: bool,
    /// It is in `splice_src`: the kernel redirects its incoming bytes.
    in_src: bool,
}

impl<'a> LegState<'a> {
    fn new(fd: BorrowedFd<'a>, read_before: u64) -> Result<Self> {
        let io = |what: &str, source| Error::Io {
            what: what.to_string(),
            source,
        };
        Ok(LegState {
            fd,
            cookie: cookie(fd).map_err(|e| io("reading SO_COOKIE", e))?,
            read_before,
            written_before: written(fd).map_err(|e| io("reading TCP_INFO", e))?,
            in_peer: false,
            in_src: false,
        })
    }
}

impl std::fmt::Debug for Pair<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("a", &self.legs[0].cookie)
            .field("b", &self.legs[1].cookie)
            .field("a_to_b", &self.legs[0].in_src)
            .field("b_to_a", &self.legs[1].in_src)
            .finish()
    }
}

impl Pair<'_> {
    /// Whether the kernel carries the bytes arriving on `from` to the other socket. If not,
    /// the caller moves them itself (the socket was half-closed before it could be spliced).
    pub fn redirected(&self, from: Side) -> bool {
        self.legs[from.index()].in_src
    }

    /// Bytes written into the other socket since the splice (for metrics and idle checks), at
    /// most a few skbs low: an acknowledgement between the two reads it takes makes it smaller.
    /// Only meaningful for a redirected direction; [`Flush::Done`] has the exact count.
    pub fn moved(&self, from: Side) -> io::Result<u64> {
        let to = &self.legs[1 - from.index()];
        Ok(written(to.fd)?.saturating_sub(to.written_before))
    }

    /// After EOF on `from` (a peek returned 0): whether all of its bytes have reached the
    /// other socket's send queue, so that the caller may pass the FIN on.
    pub fn flushed(&self, from: Side) -> io::Result<Flush> {
        let (src, dst) = (&self.legs[from.index()], &self.legs[1 - from.index()]);
        // Read the target first: it only grows, so a stale value can only say Pending.
        let dst_info = TcpInfo::read(dst.fd)?;
        let dst_written = dst_info.bytes_acked + outq(dst.fd)?;
        let src_info = TcpInfo::read(src.fd)?;
        // bytes_received counts the FIN as one byte.
        let expected = src_info
            .bytes_received
            .saturating_sub(1)
            .saturating_sub(src.read_before);
        let moved = dst_written.saturating_sub(dst.written_before);
        if moved == expected {
            return Ok(Flush::Done(moved));
        }
        if moved > expected {
            return Ok(Flush::Excess(moved - expected));
        }
        // Pending, the source's FIN has not passed the verdict yet (it follows its bytes), so
        // any error on the target, EPIPE included, is real: the kernel dropped bytes.
        if dst_info.state == TCP_CLOSE || socket_error(dst.fd)? != 0 {
            return Ok(Flush::Broken);
        }
        Ok(Flush::Pending)
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        // Stop the verdicts before removing their targets. ENOENT is fine: the kernel removes
        // a socket from every map when it closes or is reset.
        for leg in &self.legs {
            if leg.in_src {
                let _ = delete(&self.inner.src, leg.cookie);
            }
        }
        for leg in &self.legs {
            if leg.in_peer {
                let _ = delete(&self.inner.peer, leg.cookie);
            }
        }
    }
}

/// What a non-consuming look at a spliced socket's receive side found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The peer sent FIN and nothing is left to read.
    Eof,
    /// Nothing to read now.
    Empty,
    /// Bytes are readable by the process: the kernel did not redirect them (no peer).
    Data,
}

/// Looks at `fd`'s receive side without consuming anything (`MSG_PEEK | MSG_DONTWAIT`). An
/// `EPIPE` left by the kernel when the other direction's FIN passed (see [`broken`]) is
/// consumed and reported as [`Peek::Empty`].
pub fn peek(fd: BorrowedFd<'_>) -> io::Result<Peek> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer valid for writes, on a descriptor the caller keeps open.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(Peek::Eof),
        n if n > 0 => Ok(Peek::Data),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EPIPE) {
                Ok(Peek::Empty)
            } else {
                Err(e)
            }
        }
    }
}

/// Whether a spliced socket was reset or failed while one direction still runs: it is closed
/// (a connection still half open only closes that way), or has a pending error other than
/// `EPIPE`. After EOF a peek no longer reports a reset, so the caller watching a half-closed
/// socket asks this instead. Reading the error clears it.
///
/// `EPIPE` is no failure: when a source's FIN passes the verdict, the kernel redirects it as
/// an empty skb, and the peer's sender reports "sent nothing" as `EPIPE` on the peer (and
/// stops sending to it, which is right: that source has nothing more).
pub fn broken(fd: BorrowedFd<'_>) -> io::Result<bool> {
    if TcpInfo::read(fd)?.state == TCP_CLOSE {
        return Ok(true);
    }
    let error = socket_error(fd)?;
    Ok(error != 0 && error != libc::EPIPE)
}

/// The fields of `struct tcp_info` the flush accounting needs.
struct TcpInfo {
    state: u8,
    /// Bytes the peer acknowledged (plus one for our SYN on the connecting side).
    bytes_acked: u64,
    /// Bytes received in order (plus one for the peer's FIN).
    bytes_received: u64,
}

impl TcpInfo {
    /// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h, stable since 4.1).
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    const MIN_LEN: usize = 136;

    fn read(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is valid for writes of len bytes; the kernel writes at most len.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if (len as usize) < Self::MIN_LEN {
            return Err(io::Error::other(format!(
                "TCP_INFO returned {len} bytes, fewer than {}",
                Self::MIN_LEN
            )));
        }
        let u64_at = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[off..off + 8]);
            u64::from_ne_bytes(b)
        };
        Ok(TcpInfo {
            state: buf[0],
            bytes_acked: u64_at(Self::BYTES_ACKED),
            bytes_received: u64_at(Self::BYTES_RECEIVED),
        })
    }
}

/// Bytes ever written into the socket's send queue, plus one for the SYN on the connecting
/// side: acknowledged bytes plus those still queued. Read in this order, a concurrent
/// acknowledgement can only make the sum smaller, never larger.
fn written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = TcpInfo::read(fd)?.bytes_acked;
    Ok(acked + outq(fd)?)
}

/// `SIOCOUTQ`: bytes in the send queue not yet acknowledged.
fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// `SO_ERROR`: the pending error, 0 if none; reading it clears it.
fn socket_error(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err is an int the kernel writes with len bytes at most.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
}

fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie is a u64 the kernel writes with len bytes at most.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Makes TCP call the socket's data-ready hook now if bytes are queued, so that the verdict runs
/// over bytes that arrived before the socket entered the map.
fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid int option value and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `union bpf_attr`, the map element member.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: attr is laid out as the element member of union bpf_attr; its key and value point
    // at live locals of the caller for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn update(map: &OwnedFd, key: u64, socket: RawFd) -> io::Result<()> {
    let value = socket as u32;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u64 as u64,
        value: &value as *const u32 as u64,
        flags: BPF_NOEXIST,
    };
    bpf_elem(BPF_MAP_UPDATE_ELEM, &mut attr)
}

fn delete(map: &OwnedFd, key: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u64 as u64,
        value: 0,
        flags: 0,
    };
    bpf_elem(BPF_MAP_DELETE_ELEM, &mut attr)
}

/// The start-up self-test: a real spliced connection over loopback, blocking sockets, bounded.
mod self_test {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};

    /// One megabyte each way after the splice; a pattern that shows reordering and loss.
    const BULK: usize = 1 << 20;
    const EARLY: usize = 48 * 1024;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    fn connected(listener: &TcpListener) -> io::Result<(TcpStream, TcpStream)> {
        let a = TcpStream::connect(listener.local_addr()?)?;
        let (b, _) = listener.accept()?;
        for s in [&a, &b] {
            s.set_read_timeout(Some(SELF_TEST_DEADLINE))?;
            s.set_write_timeout(Some(SELF_TEST_DEADLINE))?;
        }
        Ok((a, b))
    }

    fn fail(what: impl Into<String>) -> io::Error {
        io::Error::other(what.into())
    }

    /// Waits until `from`'s EOF reached the proxy side and its bytes are flushed to the
    /// other socket, then passes the FIN on.
    fn pass_eof(
        pair: &Pair<'_>,
        from: Side,
        source: &TcpStream,
        target: &TcpStream,
        deadline: Instant,
    ) -> io::Result<()> {
        loop {
            if Instant::now() > deadline {
                return Err(fail(format!("no flushed EOF on side {from:?} in time")));
            }
            match peek(source.as_fd())? {
                Peek::Eof => match pair.flushed(from)? {
                    Flush::Done(_) => break,
                    Flush::Broken => return Err(fail("target socket broke")),
                    Flush::Excess(n) => return Err(fail(format!("the kernel repeated {n} bytes"))),
                    Flush::Pending => {}
                },
                Peek::Data => return Err(fail("bytes reached the proxy instead of the peer")),
                Peek::Empty => {}
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        target.shutdown(Shutdown::Write)
    }

    /// Reads exactly `len` bytes: the far end's whole stream, before its FIN.
    fn read_exact(mut s: &TcpStream, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        s.read_exact(&mut out)?;
        Ok(out)
    }

    /// The next read must see EOF: nothing more than was sent.
    fn expect_eof(mut s: &TcpStream) -> io::Result<()> {
        let mut one = [0u8; 1];
        match s.read(&mut one)? {
            0 => Ok(()),
            _ => Err(fail("more bytes than were sent")),
        }
    }

    pub(super) fn run(splicer: &Splicer) -> io::Result<()> {
        let deadline = Instant::now() + SELF_TEST_DEADLINE;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        // client <-> [proxy_client | splice | proxy_backend] <-> server
        let (client, proxy_client) = connected(&listener)?;
        let (proxy_backend, server) = connected(&listener)?;

        // The head, read and forwarded by hand; then bytes queued on both sides before the
        // splice (the client's next flight, the server's banner).
        let head = pattern(1, 517);
        (&client).write_all(&head)?;
        let mut got = vec![0u8; head.len()];
        (&proxy_client).read_exact(&mut got)?;
        (&proxy_backend).write_all(&got)?;
        let early_up = pattern(2, EARLY);
        let early_down = pattern(3, EARLY);
        (&client).write_all(&early_up)?;
        (&server).write_all(&early_down)?;
        std::thread::sleep(Duration::from_millis(5));

        let before = splicer.stat(Stat::NoPeerSkbs).map_err(io::Error::other)?;
        let pair = splicer
            .splice(
                Leg {
                    fd: proxy_client.as_fd(),
                    read_before: head.len() as u64,
                },
                Leg {
                    fd: proxy_backend.as_fd(),
                    read_before: 0,
                },
            )
            .map_err(io::Error::other)?;
        if !pair.redirected(Side::A) || !pair.redirected(Side::B) {
            return Err(fail("an established socket could not be spliced"));
        }

        // The queued bytes must arrive without anything arriving after them.
        let mut got = vec![0u8; head.len() + EARLY];
        (&server).read_exact(&mut got)?;
        if got != [&head[..], &early_up].concat() {
            return Err(fail(
                "bytes forwarded or queued before the splice arrived wrong",
            ));
        }
        let mut got = vec![0u8; EARLY];
        (&client).read_exact(&mut got)?;
        if got != early_down {
            return Err(fail("bytes queued before the splice arrived wrong"));
        }

        let up = pattern(4, BULK);
        let down = pattern(5, BULK);
        // Each FIN goes out only after its bytes arrived: the self-test checks that the path
        // works and that the flush accounting agrees, not the kernel's races at a FIN with
        // bytes still queued (TRUSTED_KERNELS is about those).
        let (server_got, client_got) = std::thread::scope(|scope| -> io::Result<_> {
            let server_side = scope.spawn(|| read_exact(&server, BULK));
            let client_side = scope.spawn(|| read_exact(&client, BULK));
            let server_writer = scope.spawn(|| (&server).write_all(&down));
            (&client).write_all(&up)?;
            server_writer
                .join()
                .map_err(|_| fail("writer panicked"))??;
            let (server_got, client_got) = (
                server_side.join().map_err(|_| fail("reader panicked"))?,
                client_side.join().map_err(|_| fail("reader panicked"))?,
            );
            let (server_got, client_got) = (server_got?, client_got?);
            client.shutdown(Shutdown::Write)?;
            pass_eof(&pair, Side::A, &proxy_client, &proxy_backend, deadline)?;
            expect_eof(&server)?;
            server.shutdown(Shutdown::Write)?;
            pass_eof(&pair, Side::B, &proxy_backend, &proxy_client, deadline)?;
            expect_eof(&client)?;
            Ok((server_got, client_got))
        })?;
        let (want_up, want_down) = (up, down);
        if server_got != want_up {
            return Err(fail(format!(
                "client to server: {} bytes arrived, {} sent, or they differ",
                server_got.len(),
                want_up.len()
            )));
        }
        if client_got != want_down {
            return Err(fail(format!(
                "server to client: {} bytes arrived, {} sent, or they differ",
                client_got.len(),
                want_down.len()
            )));
        }
        let after = splicer.stat(Stat::NoPeerSkbs).map_err(io::Error::other)?;
        if after != before {
            return Err(fail("the verdict found no peer for some skbs"));
        }
        drop(pair);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0"), Some((5, 10)));
        assert_eq!(parse_release("6.6"), Some((6, 6)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("5.15.0").unwrap() < MIN_KERNEL);
    }
}
