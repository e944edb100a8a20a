//! The sockmap data path: after routing, both sockets are handed to the kernel, which moves
//! each one's bytes to the other (`ebpf::sockmap`); the proxy only watches for the ends.
//!
//! The steps, each for a way bytes were lost elsewhere (`../shared/reference/sni-proxy.md`
//! §3.3):
//!
//! 1. Read the client until a read comes back short (or `EAGAIN`) and forward it: a short
//!    read took every queued skb whole, while the kernel would hand a half-read skb to the
//!    redirect whole, sending its first part twice.
//! 2. Splice. Bytes that arrived meanwhile are pushed through the redirect by the splice.
//!    A socket that was half-closed by then cannot be spliced: its direction is copied here.
//! 3. Per redirected direction, wait for the source's EOF (a peek, so nothing is consumed),
//!    then until every byte the source received is in the target's send queue, and only then
//!    pass the FIN on: a FIN sent earlier makes the kernel drop the bytes still queued.
//! 4. After its own direction ends, keep watching each socket until the other direction
//!    ends too: the kernel may still be writing into it, and a reset there must reset the
//!    other leg, not leave the kernel dropping bytes into a dead socket.
//!
//! Each error names its leg: a socket that fails a read, a peek or the guard is that socket's
//! leg; bytes that stayed with their source because the kernel found no peer, a flush that
//! broke, or a peer that received more than its source sent, are the target's.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ebpf::sockmap::{self, Flush, Pair, Peek, Side, Splicer};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{
    copy_one_way, shutdown_write, write_all, Activity, Direction, Failed, Leg, OnLeg, PooledBuf,
};

/// Full reads of the client before giving up on splicing it (it kept sending faster than it
/// could be forwarded; the connection is then copied in userspace, correct either way).
const MAX_DRAIN_READS: usize = 1024;
/// Bounds of the pause between flush checks after an EOF: the kernel usually finishes within
/// the first, a slow receiver on the target can take long.
const FLUSH_POLL_MIN: Duration = Duration::from_micros(50);
const FLUSH_POLL_MAX: Duration = Duration::from_millis(10);

/// Relays through the sockmap until both directions are done or a leg fails.
pub(super) async fn relay(
    splicer: &Splicer,
    client: &TcpStream,
    backend: &TcpStream,
    activity: &Activity,
    client_read: u64,
) -> Result<(), Failed> {
    let (drained, client_eof) = drain(client, backend, activity).await?;
    if client_eof {
        // Half-closed already: not spliceable; the backend's answer is copied.
        shutdown_write(backend);
        activity.unspliced.store(true, Ordering::Relaxed);
        return copy_one_way(backend, client, activity, Direction::Down).await;
    }
    let Some(drained) = drained else {
        activity.unspliced.store(true, Ordering::Relaxed);
        return super::copy_both(client, backend, activity).await;
    };
    // Side A is the client, side B the backend (see `leg_of`).
    let pair = match splicer.splice(
        sockmap::Leg {
            fd: client.as_fd(),
            read_before: client_read + drained,
        },
        sockmap::Leg {
            fd: backend.as_fd(),
            read_before: 0,
        },
    ) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "sockets not spliced; copying");
            activity.unspliced.store(true, Ordering::Relaxed);
            return super::copy_both(client, backend, activity).await;
        }
    };
    if !pair.redirected(Side::A) || !pair.redirected(Side::B) {
        activity.unspliced.store(true, Ordering::Relaxed);
    }
    let ends = Ends::default();
    let result = tokio::select! {
        r = leg(&pair, Side::A, client, backend, activity, &ends) => r,
        r = leg(&pair, Side::B, backend, client, activity, &ends) => r,
        () = sync_forever(&pair, activity, &ends) => Ok(()),
    };
    for from in [Side::A, Side::B] {
        ends.sync(&pair, activity, from);
    }
    result
}

/// Reads the client until a read comes back short, forwarding everything to the backend.
/// Returns the bytes read (None if every read was full up to the bound) and whether it saw
/// EOF.
async fn drain(
    client: &TcpStream,
    backend: &TcpStream,
    activity: &Activity,
) -> Result<(Option<u64>, bool), Failed> {
    let mut total = 0u64;
    let mut buf: Option<PooledBuf> = None;
    for _ in 0..MAX_DRAIN_READS {
        let b = buf.get_or_insert_with(PooledBuf::take);
        match client.try_read(b) {
            Ok(0) => return Ok((Some(total), true)),
            Ok(n) => {
                write_all(backend, &b[..n]).await.on(Leg::Backend)?;
                activity.add(Direction::Up, n);
                total += n as u64;
                if n < b.len() {
                    // Short: the receive queue was empty, no skb left half read.
                    return Ok((Some(total), false));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Some(total), false)),
            Err(e) => return Err(Failed::new(Leg::Client, e)),
        }
    }
    Ok((None, false))
}

/// Which directions have ended (their FIN passed on), and the kernel's byte counts so far.
#[derive(Default)]
struct Ends {
    done: [AtomicBool; 2],
    notify: Notify,
    synced: [AtomicU64; 2],
}

impl Ends {
    /// Counts the bytes of a redirected direction moved since the last call into `activity`.
    /// Not after the direction ended: the peer's byte count then includes our FIN.
    fn sync(&self, pair: &Pair<'_>, activity: &Activity, from: Side) {
        if !pair.redirected(from) || self.done[index(from)].load(Ordering::Acquire) {
            return;
        }
        if let Ok(moved) = pair.moved(from) {
            self.count(activity, from, moved);
        }
    }

    /// Counts `moved` (bytes so far) into `activity`, never counting a byte twice.
    fn count(&self, activity: &Activity, from: Side, moved: u64) {
        let last = self.synced[index(from)].fetch_max(moved, Ordering::AcqRel);
        if moved > last {
            activity.add(direction(from), (moved - last) as usize);
        }
    }

    /// Marks a direction ended; `moved` is the exact count of a redirected one, which ends just
    /// before its FIN is passed on.
    fn finish(&self, activity: &Activity, from: Side, moved: Option<u64>) {
        if let Some(moved) = moved {
            self.count(activity, from, moved);
        }
        self.done[index(from)].store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn all(&self) -> bool {
        self.done.iter().all(|d| d.load(Ordering::Acquire))
    }

    /// Resolves once both directions ended.
    async fn both(&self) {
        loop {
            if self.all() {
                return;
            }
            // notify_one keeps a permit if nobody waits yet: no wake-up is lost in between.
            self.notify.notified().await;
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

fn index(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

fn direction(from: Side) -> Direction {
    match from {
        Side::A => Direction::Up,
        Side::B => Direction::Down,
    }
}

/// The relay's leg of a spliced socket: the client is side A, the backend side B.
fn leg_of(side: Side) -> Leg {
    match side {
        Side::A => Leg::Client,
        Side::B => Leg::Backend,
    }
}

/// Moves (or watches the kernel move) the bytes of `src` to `dst` and passes the FIN on, then
/// guards `src` until the other direction ends too.
async fn leg(
    pair: &Pair<'_>,
    from: Side,
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    ends: &Ends,
) -> Result<(), Failed> {
    if pair.redirected(from) {
        let moved = watch_redirect(pair, from, src).await?;
        ends.finish(activity, from, Some(moved));
        shutdown_write(dst);
    } else {
        copy_one_way(src, dst, activity, direction(from)).await?;
        ends.finish(activity, from, None);
    }
    tokio::select! {
        () = ends.both() => Ok(()),
        e = guard(src, ends) => Err(Failed::new(leg_of(from), e)),
    }
}

/// Waits for `src`'s EOF without consuming anything, then for the kernel to have written all
/// of its bytes into the other socket; the caller then shuts that one down for writing.
/// Returns how many bytes the kernel moved. An error is `src`'s when `src` itself fails, the
/// other socket's when the kernel could not deliver into it.
async fn watch_redirect(pair: &Pair<'_>, from: Side, src: &TcpStream) -> Result<u64, Failed> {
    let (source, target) = (leg_of(from), leg_of(other(from)));
    loop {
        src.readable().await.on(source)?;
        let seen = src.try_io(Interest::READABLE, || match sockmap::peek(src.as_fd())? {
            // Clears tokio's readiness: the redirect consumed what woke us.
            Peek::Empty => Err(io::ErrorKind::WouldBlock.into()),
            other => Ok(other),
        });
        match seen {
            Ok(Peek::Eof) => break,
            Ok(_) => {
                // Bytes stayed with us: the verdict found no peer, which the kernel removes
                // only when it closed or was reset. The peer failed, not `src`.
                return Err(Failed::new(
                    target,
                    io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the spliced peer socket is gone",
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failed::new(source, e)),
        }
    }
    let mut pause = FLUSH_POLL_MIN;
    loop {
        // The check reads both sockets' TCP_INFO; the target's first and foremost.
        match pair.flushed(from).on(target)? {
            Flush::Done(moved) => return Ok(moved),
            Flush::Broken => {
                return Err(Failed::new(
                    target,
                    io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the spliced peer closed with bytes in flight",
                    ),
                ))
            }
            Flush::Excess(bytes) => {
                // Rare and serious: say so above debug. The reset keeps a corrupt stream from
                // ending like a clean one. It is the kernel's fault, not a peer's; it counts on
                // the target, whose stream is the corrupt one, and the warning tells them apart.
                tracing::warn!(
                    bytes,
                    leg = target.as_str(),
                    "the kernel repeated bytes on a sockmap splice; resetting"
                );
                return Err(Failed::new(
                    target,
                    io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the kernel repeated bytes on the splice",
                    ),
                ));
            }
            Flush::Pending => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FLUSH_POLL_MAX);
            }
        }
    }
}

/// After its own direction ended, a socket may still be the kernel's target: resolves with an
/// error once it is reset or fails while the other direction runs. (Once both ended, it
/// closes normally, and a late error from the kernel's writer, EPIPE after our FIN, means
/// nothing.) Waits for error readiness only: after EOF, tokio keeps the socket readable for
/// good (a closed state is final), which would make this spin.
async fn guard(sock: &TcpStream, ends: &Ends) -> io::Error {
    loop {
        if let Err(e) = sock.ready(Interest::ERROR).await {
            return e;
        }
        match sock.try_io(Interest::ERROR, || {
            if !ends.all() && sockmap::broken(sock.as_fd())? {
                Ok(())
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }) {
            Ok(()) => {
                return io::Error::new(io::ErrorKind::ConnectionReset, "spliced socket reset")
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return e,
        }
    }
}

async fn sync_forever(pair: &Pair<'_>, activity: &Activity, ends: &Ends) {
    loop {
        tokio::time::sleep(activity.kernel_sync).await;
        for from in [Side::A, Side::B] {
            ends.sync(pair, activity, from);
        }
    }
}
