//! The UDP hot path: one thread per listening socket reads queries in batches with
//! recvmmsg(2), answers cache hits on the spot and sends the replies in one sendmmsg(2); a
//! miss is handed to the tokio runtime, which answers it from the same socket when the
//! upstream has, as long as fewer than [`crate::server::MAX_PENDING_MISSES`] are in progress
//! and its forwarder has room (else the worker answers REFUSED itself). Batching pays the
//! syscall and wake-up costs once per batch, not once per query (bench/harness/dns.py
//! measures the result against unbound).
//!
//! Hand-over (a rolling update with `maxSurge`): both instances bind the same address with
//! SO_REUSEPORT. The leaving one calls [`steer_to_newest`], which attaches a classic BPF
//! program to the port's reuseport group that picks socket index 1, the newer member when
//! two instances share the port, then reads until its queue stays empty and only then closes,
//! so no query queued on the old socket is lost. Once the old socket is gone the index is out
//! of range and the kernel falls back to its hash; a starting instance removes any such
//! program with [`detach_steering`].

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentkit::net::Sharing;
use socket2::{SockAddr, Socket};
use tracing::debug;

use crate::server::Server;
use crate::wire;

/// Queries read per recvmmsg(2).
pub const BATCH: usize = 32;
/// Largest query accepted over UDP; longer datagrams are dropped (a query is a question and
/// an OPT record: far below this).
pub const MAX_QUERY: usize = 4096;
/// How long a worker blocks before it looks at its stop flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Binds a UDP socket for the workers: SO_REUSEPORT (for the hand-over), blocking with a
/// receive timeout.
pub fn bind(addr: SocketAddr) -> io::Result<Arc<Socket>> {
    let socket = agentkit::net::udp_socket(addr, Sharing::ReusePort)?;
    // Room for bursts: a few thousand queries.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    Ok(Arc::new(socket))
}

/// How a worker stops.
#[derive(Debug, Default)]
pub struct Control {
    /// Stop at the next poll interval.
    pub stop: AtomicBool,
    /// Stop once the queue is empty (after [`steer_to_newest`]).
    pub drain: AtomicBool,
}

/// Runs the worker for `socket` on a new thread until `control` says stop.
pub fn spawn(
    socket: Arc<Socket>,
    server: Server,
    runtime: tokio::runtime::Handle,
    control: Arc<Control>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let name = match socket.local_addr().ok().and_then(|a| a.as_socket()) {
        Some(addr) => format!("udp {addr}"),
        None => "udp".to_owned(),
    };
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || worker(&socket, &server, &runtime, &control))
}

fn worker(
    socket: &Arc<Socket>,
    server: &Server,
    runtime: &tokio::runtime::Handle,
    control: &Control,
) {
    // Cache hits answered here may start a background refresh (prefetch, serve-stale),
    // which spawns onto the runtime: this thread must be inside its context.
    let _runtime = runtime.enter();
    let mut batch = Batch::new();
    let mut out = Vec::with_capacity(usize::from(wire::OUR_UDP_SIZE));
    loop {
        if control.stop.load(Ordering::Acquire) {
            return;
        }
        let received = match batch.receive(socket) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if control.drain.load(Ordering::Acquire) {
                    return; // steered away and the queue is empty
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                debug!(%error, "udp receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut replies = 0;
        for i in 0..received {
            let Some((packet, peer)) = batch.query(i) else {
                continue;
            };
            if server.try_cached(packet, &mut out) {
                batch.set_reply(replies, i, &out);
                replies += 1;
                continue;
            }
            // A miss its forwarder has no room for is REFUSED from here, in this batch; any
            // other gets a task on the runtime, within the listener's bound of misses in
            // progress (past it: REFUSED from here too).
            if server.try_refuse_overloaded(packet, &mut out) {
                batch.set_reply(replies, i, &out);
                replies += 1;
                continue;
            }
            let Some(permit) = server.admit_miss() else {
                if server.refuse_busy(packet, &mut out) {
                    batch.set_reply(replies, i, &out);
                    replies += 1;
                }
                continue;
            };
            let (serving, socket, packet) = (server.clone(), Arc::clone(socket), packet.to_vec());
            server.spawn(async move {
                let _permit = permit;
                let mut out = Vec::with_capacity(512);
                if serving.answer(&packet, true, &mut out).await {
                    let _ = socket.send_to_with_flags(&out, &peer, libc::MSG_DONTWAIT);
                }
            });
        }
        batch.send(socket, replies);
    }
}

/// The buffers of one batch: queries in, replies out, addresses, and the mmsghdr arrays
/// pointing into them.
struct Batch {
    queries: Vec<[u8; MAX_QUERY]>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: [libc::socklen_t; BATCH],
    replies: Vec<Vec<u8>>,
    reply_to: [usize; BATCH],
}

impl Batch {
    fn new() -> Self {
        Batch {
            queries: vec![[0u8; MAX_QUERY]; BATCH],
            lens: [0; BATCH],
            truncated: [false; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            addr_lens: [0; BATCH],
            replies: (0..BATCH)
                .map(|_| Vec::with_capacity(usize::from(wire::OUR_UDP_SIZE)))
                .collect(),
            reply_to: [0; BATCH],
        }
    }

    /// One recvmmsg(2): blocks until at least one datagram (or the receive timeout).
    fn receive(&mut self, socket: &Socket) -> io::Result<usize> {
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.queries[i].as_mut_ptr().cast(),
            iov_len: MAX_QUERY,
        });
        // SAFETY: mmsghdr is plain old data; the pointers are filled in below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for (i, h) in headers.iter_mut().enumerate() {
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = std::ptr::from_mut(&mut iovecs[i]);
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers of the lengths given, owned by `self`
        // and `iovecs`, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in headers.iter().enumerate().take(n) {
            self.lens[i] = h.msg_len as usize;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.addr_lens[i] = h.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// The i-th datagram and its sender, unless it was cut off.
    fn query(&self, i: usize) -> Option<(&[u8], SockAddr)> {
        if self.truncated[i] {
            return None;
        }
        // SAFETY: the kernel filled addrs[i] with addr_lens[i] valid bytes.
        let peer = unsafe { SockAddr::new(self.addrs[i], self.addr_lens[i]) };
        Some((&self.queries[i][..self.lens[i]], peer))
    }

    fn set_reply(&mut self, slot: usize, query: usize, reply: &[u8]) {
        self.replies[slot].clear();
        self.replies[slot].extend_from_slice(reply);
        self.reply_to[slot] = query;
    }

    /// Sends the first `count` replies with sendmmsg(2); what the socket does not take at
    /// once is retried, and dropped only if sending fails outright.
    fn send(&mut self, socket: &Socket, count: usize) {
        if count == 0 {
            return;
        }
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.replies[i].as_mut_ptr().cast(),
            iov_len: self.replies[i].len(),
        });
        // SAFETY: plain old data, filled in below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for (slot, h) in headers.iter_mut().enumerate().take(count) {
            let to = self.reply_to[slot];
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut self.addrs[to]).cast();
            h.msg_hdr.msg_namelen = self.addr_lens[to];
            h.msg_hdr.msg_iov = std::ptr::from_mut(&mut iovecs[slot]);
            h.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers[sent..count] point at live buffers and addresses owned by
            // `self` and `iovecs`.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers[sent..].as_mut_ptr(),
                    (count - sent) as u32,
                    0,
                )
            };
            if n <= 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                debug!(%error, dropped = count - sent, "udp send failed");
                return;
            }
            sent += n as usize;
        }
    }
}

/// Classic BPF `ret #1`: pick the reuseport group's socket at index 1.
const STEER_PROGRAM: [libc::sock_filter; 1] = [libc::sock_filter {
    code: (libc::BPF_RET | libc::BPF_K) as u16,
    jt: 0,
    jf: 0,
    k: 1,
}];

/// Steers new packets (or connections) of `fd`'s reuseport group to the newer instance.
pub fn steer_to_newest(fd: &impl AsRawFd) -> io::Result<()> {
    let program = libc::sock_fprog {
        len: STEER_PROGRAM.len() as u16,
        filter: STEER_PROGRAM.as_ptr().cast_mut(),
    };
    // SAFETY: a valid sock_fprog pointing at a live program, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&program).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes a steering program a leaving instance attached (none attached is fine).
pub fn detach_steering(fd: &impl AsRawFd) {
    let zero: libc::c_int = 0;
    // SAFETY: SO_DETACH_REUSEPORT_BPF takes an int it does not read.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            std::ptr::from_ref(&zero).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}
