//! Relaying bytes between the client and the backend once a connection is routed.
//!
//! Three paths, chosen per listener: [`DataPath::Copy`] moves bytes through a userspace
//! buffer; [`DataPath::Splice`] moves them through a pipe with splice(2), so payload never
//! enters userspace; [`DataPath::Sockmap`] hands both sockets to an eBPF sockmap that
//! redirects each one's bytes to the other inside the kernel ([`sockmap`]), and only watches
//! for the ends. All propagate a half-close (FIN) in each direction as it happens, without
//! losing bytes still in flight, and turn a reset on one leg into a reset on the other.
//! Every error is tied to the [`Leg`] whose socket reported it, so the relay's [`End`] says
//! whether the client or the backend failed.
//!
//! [`relay`] receives both sockets after routing, with every byte already read from the client
//! forwarded, which is exactly the state a sockmap redirect needs.
//!
//! Idle connections hold no buffer: the copy path borrows a buffer from a small per-thread
//! pool only while a direction has bytes to move.

mod sockmap;

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes in flight per direction, at most.
pub const BUFFER_BYTES: usize = 32 * 1024;
/// Buffers each thread keeps for reuse.
const POOL_PER_THREAD: usize = 64;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// read(2)/write(2) through a pooled userspace buffer.
    Copy,
    /// splice(2) through a pipe per direction.
    Splice,
    /// An eBPF sockmap redirect in the kernel ([`sockmap_splicer`]).
    Sockmap,
}

impl DataPath {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::Splice => "splice",
            DataPath::Sockmap => "sockmap",
        }
    }
}

/// What `data_path: auto` picks, from the benchmark table of this kernel (docs/sni-proxy.md,
/// "Data paths"; bench/results/datapath/): copy and splice trade places within noise from run
/// to run, and copy wins the tie because it needs no extra descriptors and no permission for
/// splice(2). Sockmap is last on every figure there (the kernel's worker thread sends every
/// skb) and is not exact under concurrent load on any kernel measured, so auto never picks it.
pub const AUTO: DataPath = DataPath::Copy;

/// Whether splice(2) between TCP sockets works here (a seccomp profile may forbid it): one
/// byte is spliced over a loopback connection, once per process.
pub fn splice_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| probe_splice().is_ok())
}

/// The sockmap splicer of this process: loaded, attached and self-tested on first use, once
/// per process. The error says why the path is unavailable here (kernel too old, no
/// CAP_BPF/CAP_NET_ADMIN, the self-test failed).
pub fn sockmap_splicer() -> Result<&'static ebpf::sockmap::Splicer, &'static str> {
    static SPLICER: std::sync::OnceLock<Result<ebpf::sockmap::Splicer, String>> =
        std::sync::OnceLock::new();
    SPLICER
        .get_or_init(load_splicer)
        .as_ref()
        .map_err(String::as_str)
}

fn load_splicer() -> Result<ebpf::sockmap::Splicer, String> {
    use ebpf::sockmap::{self, Splicer};
    sockmap::kernel_supported()?;
    let splicer = Splicer::load(sockmap::DEFAULT_CAPACITY)
        .map_err(|e| format!("loading the sockmap program: {e}"))?;
    splicer.self_test().map_err(|e| e.to_string())?;
    Ok(splicer)
}

fn probe_splice() -> io::Result<()> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut a = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    a.write_all(b"x")?;
    let pipe = Pipe::new()?;
    b.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    // The byte is on loopback already; wait for it without blocking forever.
    let mut tries = 0;
    loop {
        match splice(b.as_raw_fd(), pipe.write.as_raw_fd(), 1) {
            Ok(1) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(_) => return Err(io::Error::other("splice moved nothing")),
            Err(e) => return Err(e),
        }
    }
}

/// One of the two sockets of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// The accepted socket: the client, or the load balancer or proxy in front of it.
    Client,
    /// The socket the proxy connected: the route's backend (a kube-apiserver).
    Backend,
}

impl Leg {
    /// Every leg.
    pub const ALL: [Leg; 2] = [Leg::Client, Leg::Backend];

    /// The metric label and access log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Backend => "backend",
        }
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions saw EOF and were shut down.
    Done,
    /// This leg was reset, or closed while the proxy still wrote into it; the proxy reset the
    /// other too.
    Reset(Leg),
    /// Another I/O error on this leg (a keepalive timeout, an unreachable peer).
    Error(Leg),
}

impl End {
    /// The leg that failed; None for a clean end.
    pub fn leg(self) -> Option<Leg> {
        match self {
            End::Done => None,
            End::Reset(leg) | End::Error(leg) => Some(leg),
        }
    }
}

/// An I/O error and the leg whose socket reported it: a failed read names the socket read
/// from, a failed write the socket written to.
#[derive(Debug)]
struct Failed {
    leg: Leg,
    error: io::Error,
}

impl Failed {
    fn new(leg: Leg, error: io::Error) -> Self {
        Failed { leg, error }
    }

    /// How the relay ends for this failure.
    fn end(&self) -> End {
        if is_reset(&self.error) {
            End::Reset(self.leg)
        } else {
            End::Error(self.leg)
        }
    }
}

/// Ties an I/O result to the leg it came from.
trait OnLeg<T> {
    fn on(self, leg: Leg) -> Result<T, Failed>;
}

impl<T> OnLeg<T> for io::Result<T> {
    fn on(self, leg: Leg) -> Result<T, Failed> {
        self.map_err(|error| Failed::new(leg, error))
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

impl Direction {
    /// The leg read from.
    fn source(self) -> Leg {
        match self {
            Direction::Up => Leg::Client,
            Direction::Down => Leg::Backend,
        }
    }

    /// The leg written to.
    fn target(self) -> Leg {
        match self {
            Direction::Up => Leg::Backend,
            Direction::Down => Leg::Client,
        }
    }
}

/// How often the sockmap path reads the kernel's byte counts into an [`Activity`] when nothing
/// asks for more (metrics of long-lived connections lag by at most this).
pub const KERNEL_SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Byte counters of one connection and the time of its last byte (for the idle watchdog);
/// optionally also feeds the route's byte metrics as bytes move, so long-lived watches show
/// up in the metrics before they end.
#[derive(Debug)]
pub struct Activity {
    touched: AtomicBool,
    /// Bytes client to backend.
    pub up: AtomicU64,
    /// Bytes backend to client.
    pub down: AtomicU64,
    metrics: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
    /// How often bytes moved by the kernel are counted in (sockmap path).
    kernel_sync: Duration,
    /// The sockmap path copied at least one direction in userspace (see [`Activity::unspliced`]).
    unspliced: AtomicBool,
}

impl Activity {
    /// Starts counting now.
    pub fn new() -> Self {
        Activity {
            touched: AtomicBool::new(false),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            metrics: None,
            kernel_sync: KERNEL_SYNC_INTERVAL,
            unspliced: AtomicBool::new(false),
        }
    }

    /// Counts bytes the kernel moved (sockmap path) at least this often, so that an idle
    /// watchdog sampling every `4 × interval` sees them.
    pub fn with_kernel_sync(self, interval: Duration) -> Self {
        Activity {
            kernel_sync: interval.clamp(Duration::from_millis(100), KERNEL_SYNC_INTERVAL),
            ..self
        }
    }

    /// Whether the sockmap path had to move a direction in userspace, because a socket could
    /// not enter the map (half-closed before the splice, or the map full).
    pub fn unspliced(&self) -> bool {
        self.unspliced.load(Ordering::Relaxed)
    }

    /// Also counts into these (upstream, downstream) metrics.
    pub fn with_metrics(up: prometheus::IntCounter, down: prometheus::IntCounter) -> Self {
        Activity {
            metrics: Some((up, down)),
            ..Activity::new()
        }
    }

    fn add(&self, direction: Direction, n: usize) {
        let n = n as u64;
        match direction {
            Direction::Up => self.up.fetch_add(n, Ordering::Relaxed),
            Direction::Down => self.down.fetch_add(n, Ordering::Relaxed),
        };
        if let Some((up, down)) = &self.metrics {
            match direction {
                Direction::Up => up.inc_by(n),
                Direction::Down => down.inc_by(n),
            }
        }
        self.touched.store(true, Ordering::Relaxed);
    }

    /// Whether bytes moved since the last call (which resets it). Cheaper than a clock read
    /// per chunk: the idle watchdog samples it.
    pub fn take_touched(&self) -> bool {
        self.touched.swap(false, Ordering::Relaxed)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Relays until both directions are done or a leg fails, and says which. The caller owns the
/// sockets and closes them after; on a reset both legs have already been set to reset on
/// close.
/// `client_read` is how many bytes the caller read from the client before (the head), which
/// the sockmap path needs for its accounting.
pub async fn relay(
    path: DataPath,
    client: &TcpStream,
    backend: &TcpStream,
    activity: &Activity,
    client_read: u64,
) -> End {
    // The first error ends both directions: a direction waiting on a healthy leg must not
    // outlive a dead one.
    let result = match path {
        DataPath::Copy => copy_both(client, backend, activity).await,
        DataPath::Splice => tokio::try_join!(
            splice_one_way(client, backend, activity, Direction::Up),
            splice_one_way(backend, client, activity, Direction::Down)
        )
        .map(|_| ()),
        DataPath::Sockmap => match sockmap_splicer() {
            Ok(splicer) => sockmap::relay(splicer, client, backend, activity, client_read).await,
            Err(_) => copy_both(client, backend, activity).await,
        },
    };
    let end = match result {
        Ok(()) => End::Done,
        Err(failed) => failed.end(),
    };
    if let End::Reset(_) = end {
        // A reset on one leg becomes a reset on the other: close both with linger 0.
        // Linger 0 makes close send RST; it never blocks with a zero timeout.
        for s in [client, backend] {
            let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    end
}

async fn copy_both(
    client: &TcpStream,
    backend: &TcpStream,
    activity: &Activity,
) -> Result<(), Failed> {
    tokio::try_join!(
        copy_one_way(client, backend, activity, Direction::Up),
        copy_one_way(backend, client, activity, Direction::Down)
    )
    .map(|_| ())
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn shutdown_write(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer borrowed from the thread's pool, returned on drop (to whichever thread drops it).
struct PooledBuf(Option<Box<[u8]>>);

impl PooledBuf {
    fn take() -> Self {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_BYTES].into_boxed_slice());
        PooledBuf(Some(buf))
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            give_back(&POOL, buf);
        }
    }
}

/// Returns an item to a per-thread pool, or drops it when the pool is full.
fn give_back<T: 'static>(pool: &'static std::thread::LocalKey<RefCell<Vec<T>>>, item: T) {
    pool.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_PER_THREAD {
            p.push(item);
        }
    });
}

async fn copy_one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    direction: Direction,
) -> Result<(), Failed> {
    let (source, target) = (direction.source(), direction.target());
    loop {
        from.readable().await.on(source)?;
        // Holds a buffer only while bytes flow; idle connections give it back.
        let mut buf = PooledBuf::take();
        loop {
            let (n, drained) = match read_draining(from, |fd| recv(fd, &mut buf)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failed::new(source, e)),
            };
            if n == 0 {
                shutdown_write(to);
                return Ok(());
            }
            write_all(to, &buf[..n]).await.on(target)?;
            activity.add(direction, n);
            // Readiness waits do not spend tokio's cooperative budget; a busy stream must
            // still yield, or its other direction and its watchdogs would starve.
            tokio::task::consume_budget().await;
            if drained {
                break;
            }
        }
    }
}

/// Runs one read-like syscall `op` (returning bytes moved; 0 is EOF) under `from`'s read
/// readiness. A short result means the socket was drained at that moment: it is reported to
/// tokio as `WouldBlock`, which clears the readiness (guarded by the event's tick, so an event
/// that arrived meanwhile is kept), saving the extra syscall that would only return EAGAIN.
/// Returns the bytes moved and whether the readiness was cleared.
fn read_draining(
    from: &TcpStream,
    mut op: impl FnMut(RawFd) -> io::Result<usize>,
) -> io::Result<(usize, bool)> {
    let mut moved = None;
    let result = from.try_io(Interest::READABLE, || {
        let n = op(from.as_raw_fd())?;
        moved = Some(n);
        if n > 0 && n < BUFFER_BYTES {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (result, moved) {
        (Ok(n), _) => Ok((n, false)),
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok((n, true)),
        (Err(e), _) => Err(e),
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length for the duration of the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // TCP's receive side never fails with EPIPE by itself. The sockmap path can leave one
        // on a socket whose peer's FIN the kernel passed on (see `ebpf::sockmap::broken`);
        // reporting it consumed it, and the socket simply had nothing to read.
        if e.raw_os_error() == Some(libc::EPIPE) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Err(e)
    } else {
        Ok(n as usize)
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A non-blocking pipe sized to [`BUFFER_BYTES`].
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves the default size, which is fine.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                BUFFER_BYTES as libc::c_int,
            )
        };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds that the callers keep open for its duration; null offsets
    // are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe borrowed from the thread's pool while a burst of bytes moves, so an idle
/// spliced connection holds no pipe (two descriptors, like the copy path, not six). Only
/// pipes known to be empty go back to the pool; one dropped on an error path may hold bytes
/// and is closed.
struct PooledPipe(Option<Pipe>);

impl PooledPipe {
    fn take() -> io::Result<Self> {
        match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(pipe) => Ok(PooledPipe(Some(pipe))),
            None => Pipe::new().map(|p| PooledPipe(Some(p))),
        }
    }

    fn fds(&self) -> (RawFd, RawFd) {
        self.0
            .as_ref()
            .map_or((-1, -1), |p| (p.read.as_raw_fd(), p.write.as_raw_fd()))
    }

    /// Returns the (empty) pipe to the pool.
    fn release(mut self) {
        if let Some(pipe) = self.0.take() {
            give_back(&PIPES, pipe);
        }
    }
}

async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    direction: Direction,
) -> Result<(), Failed> {
    let (source, target) = (direction.source(), direction.target());
    loop {
        from.readable().await.on(source)?;
        let pipe = match PooledPipe::take() {
            Ok(p) => p,
            // Out of descriptors for a pipe: move this burst through a buffer instead.
            Err(_) => return copy_one_way(from, to, activity, direction).await,
        };
        let (pipe_read, pipe_write) = pipe.fds();
        loop {
            // Socket → pipe (the pipe is empty here, so it takes up to BUFFER_BYTES). The pipe
            // is ours and empty: an error is the socket's.
            let (n, drained) = match read_draining(from, |fd| splice(fd, pipe_write, BUFFER_BYTES))
            {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failed::new(source, e)),
            };
            if n == 0 {
                pipe.release();
                shutdown_write(to);
                return Ok(());
            }
            // Pipe → socket, until the pipe is empty.
            let mut left = n;
            while left > 0 {
                to.writable().await.on(target)?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe_read, to.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(Failed::new(target, e)),
                }
            }
            activity.add(direction, n);
            tokio::task::consume_budget().await;
            if drained {
                break;
            }
        }
        pipe.release();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// client_end <-> [proxy_client | relay | proxy_backend] <-> backend_end
    async fn through(path: DataPath) {
        let (mut client_end, proxy_client) = pair().await;
        let (proxy_backend, mut backend_end) = pair().await;
        let activity = std::sync::Arc::new(Activity::new());
        let a = std::sync::Arc::clone(&activity);
        let relay =
            tokio::spawn(async move { relay(path, &proxy_client, &proxy_backend, &a, 0).await });

        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client_end.write_all(&sent).await.unwrap();
            client_end.shutdown().await.unwrap(); // half-close upstream
            let mut back = Vec::new();
            client_end.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.unwrap(); // sees the FIN
        assert_eq!(got.len(), data.len());
        assert!(got == data, "payload corrupted on {path:?}");
        // The backend can still answer after the client's half-close.
        backend_end.write_all(b"late answer").await.unwrap();
        backend_end.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"late answer");
        assert_eq!(relay.await.unwrap(), End::Done);
        assert_eq!(activity.up.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(activity.down.load(Ordering::Relaxed), 11);
    }

    #[tokio::test]
    async fn copy_relays_and_half_closes() {
        through(DataPath::Copy).await;
    }

    #[tokio::test]
    async fn splice_relays_and_half_closes() {
        assert!(splice_supported());
        through(DataPath::Splice).await;
    }

    /// The backend finishes first (FIN towards the client) while the client keeps sending.
    async fn backend_half_closes_first(path: DataPath) {
        let (mut client_end, proxy_client) = pair().await;
        let (proxy_backend, mut backend_end) = pair().await;
        let relay = tokio::spawn(async move {
            let a = Activity::new();
            relay(path, &proxy_client, &proxy_backend, &a, 0).await
        });
        backend_end.write_all(b"banner").await.unwrap();
        backend_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap(); // FIN arrives, connection still open
        assert_eq!(got, b"banner");
        let data = vec![7u8; 200_000];
        client_end.write_all(&data).await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut upstream = Vec::new();
        backend_end.read_to_end(&mut upstream).await.unwrap();
        assert_eq!(upstream, data);
        assert_eq!(relay.await.unwrap(), End::Done);
    }

    /// Whether the sockmap tests can run (root); they fail under REQUIRE_PRIVILEGED=1 if not.
    fn sockmap_here(test: &str) -> bool {
        if !agentkit::testing::require_privileges(test) {
            return false;
        }
        if let Err(why) = sockmap_splicer() {
            panic!("{test}: the sockmap path does not work on this kernel: {why}");
        }
        true
    }

    #[tokio::test]
    async fn sockmap_relays_and_half_closes() {
        if sockmap_here("sockmap_relays_and_half_closes") {
            through(DataPath::Sockmap).await;
        }
    }

    #[tokio::test]
    async fn sockmap_backend_half_closes_first() {
        if sockmap_here("sockmap_backend_half_closes_first") {
            backend_half_closes_first(DataPath::Sockmap).await;
        }
    }

    #[tokio::test]
    async fn sockmap_propagates_reset() {
        if sockmap_here("sockmap_propagates_reset") {
            for leg in Leg::ALL {
                reset_propagates(DataPath::Sockmap, leg).await;
            }
        }
    }

    #[tokio::test]
    async fn copy_backend_half_closes_first() {
        backend_half_closes_first(DataPath::Copy).await;
    }

    #[tokio::test]
    async fn splice_backend_half_closes_first() {
        backend_half_closes_first(DataPath::Splice).await;
    }

    /// `reset` resets its end; the relay names that leg, and the other end sees a reset.
    async fn reset_propagates(path: DataPath, reset: Leg) {
        let (client_end, proxy_client) = pair().await;
        let (proxy_backend, backend_end) = pair().await;
        let relay = tokio::spawn(async move {
            let a = Activity::new();
            let end = relay(path, &proxy_client, &proxy_backend, &a, 0).await;
            drop((proxy_client, proxy_backend));
            end
        });
        let (gone, mut other) = match reset {
            Leg::Client => (client_end, backend_end),
            Leg::Backend => (backend_end, client_end),
        };
        socket2::SockRef::from(&gone)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(gone); // RST
        assert_eq!(relay.await.unwrap(), End::Reset(reset), "{path:?}");
        let mut buf = [0u8; 16];
        let err = other.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A leg resets while bytes flow both ways: the relay still names that leg, whichever
    /// direction noticed first (a read from it, or a write to it).
    async fn reset_mid_stream(path: DataPath, reset: Leg) {
        let (mut client_end, proxy_client) = pair().await;
        let (proxy_backend, mut backend_end) = pair().await;
        let relay = tokio::spawn(async move {
            let a = Activity::new();
            let end = relay(path, &proxy_client, &proxy_backend, &a, 0).await;
            drop((proxy_client, proxy_backend));
            end
        });
        // Both ways carry bytes, and each end has read what it was sent so far.
        client_end.write_all(&[1u8; 100_000]).await.unwrap();
        let mut up = vec![0u8; 100_000];
        backend_end.read_exact(&mut up).await.unwrap();
        backend_end.write_all(&[2u8; 100_000]).await.unwrap();
        let mut down = vec![0u8; 100_000];
        client_end.read_exact(&mut down).await.unwrap();
        // The surviving end keeps sending, so the proxy is writing into it too.
        let (gone, mut other) = match reset {
            Leg::Client => (client_end, backend_end),
            Leg::Backend => (backend_end, client_end),
        };
        socket2::SockRef::from(&gone)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        let _ = other.write_all(&[3u8; 64 * 1024]).await;
        drop(gone); // RST
        let end = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, End::Reset(reset), "{path:?}");
    }

    #[tokio::test]
    async fn copy_propagates_reset() {
        for leg in Leg::ALL {
            reset_propagates(DataPath::Copy, leg).await;
            reset_mid_stream(DataPath::Copy, leg).await;
        }
    }

    #[tokio::test]
    async fn splice_propagates_reset() {
        for leg in Leg::ALL {
            reset_propagates(DataPath::Splice, leg).await;
            reset_mid_stream(DataPath::Splice, leg).await;
        }
    }

    #[tokio::test]
    async fn sockmap_reset_mid_stream_names_the_leg() {
        if sockmap_here("sockmap_reset_mid_stream_names_the_leg") {
            for leg in Leg::ALL {
                reset_mid_stream(DataPath::Sockmap, leg).await;
            }
        }
    }

    #[test]
    fn directions_read_one_leg_and_write_the_other() {
        assert_eq!(Direction::Up.source(), Leg::Client);
        assert_eq!(Direction::Up.target(), Leg::Backend);
        assert_eq!(Direction::Down.source(), Leg::Backend);
        assert_eq!(Direction::Down.target(), Leg::Client);
    }

    #[test]
    fn failures_end_as_reset_or_error_on_their_leg() {
        use io::ErrorKind::*;
        for leg in Leg::ALL {
            for kind in [ConnectionReset, ConnectionAborted, BrokenPipe] {
                let f = Err::<(), _>(io::Error::from(kind)).on(leg).unwrap_err();
                assert_eq!(f.end(), End::Reset(leg), "{kind:?}");
            }
            for kind in [TimedOut, HostUnreachable, Other] {
                let f = Err::<(), _>(io::Error::from(kind)).on(leg).unwrap_err();
                assert_eq!(f.end(), End::Error(leg), "{kind:?}");
            }
            assert_eq!(End::Reset(leg).leg(), Some(leg));
            assert_eq!(End::Error(leg).leg(), Some(leg));
        }
        assert_eq!(End::Done.leg(), None);
        // ETIMEDOUT is what a keepalive or user timeout gives.
        let timed_out = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(
            Failed::new(Leg::Backend, timed_out).end(),
            End::Error(Leg::Backend)
        );
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(
            Failed::new(Leg::Client, reset).end(),
            End::Reset(Leg::Client)
        );
    }
}
