//! What isolates one tunnel from the others on a shared stream, on both ends: the reader of
//! the shared stream pushes a tunnel's packets into that tunnel's [`Queue`] and never waits,
//! and the tunnel's own task drains it into its socket at whatever pace that socket allows.
//!
//! With the window extension the sender holds [`Credit`]: it never has more than a window of
//! a tunnel's bytes in flight, and the receiver grants more as it writes them out, so a queue
//! never holds more than one window and a slow destination only slows its own tunnel. With an
//! upstream peer (no window) a queue is bounded in bytes; a tunnel whose consumer falls that
//! far behind is closed alone ([`Overflow`]) instead of stalling the stream for everyone, as
//! upstream's blocking channel send does (ANP#180).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};

/// Default window a sender may have in flight per tunnel with the window extension.
pub const DEFAULT_WINDOW: u32 = 512 << 10;
/// Default bound of a tunnel's queue with a peer that has no window extension.
pub const DEFAULT_BUFFER: usize = 4 << 20;
/// Largest read from a socket into one DATA packet.
pub const CHUNK: usize = 32 << 10;

/// What the shared stream's reader hands a tunnel.
#[derive(Debug)]
pub enum Event {
    Data(Bytes),
    /// The peer sent its last byte (half-close extension).
    HalfClose,
    /// The tunnel is over; a non-empty string is the peer's error.
    Close(String),
}

/// The queue of a tunnel: pushed by the stream reader, without waiting. An idle tunnel's
/// queue allocates nothing (a channel would hold a block of slots per tunnel).
#[derive(Debug)]
pub struct Queue {
    shared: Arc<Shared>,
    limit: usize,
    gauge: Option<IntGauge>,
}

#[derive(Debug, Default)]
struct Shared {
    events: std::sync::Mutex<VecDeque<Event>>,
    /// One consumer: a stored permit covers a push between its check and its wait.
    notify: Notify,
    queued: AtomicUsize,
    /// The pushing end is gone.
    closed: AtomicBool,
    /// The consuming end is gone: pushes are dropped.
    abandoned: AtomicBool,
}

/// The tunnel's queue overflowed (only possible without the window extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// The consuming end of a [`Queue`].
#[derive(Debug)]
pub struct QueueRx {
    shared: Arc<Shared>,
    gauge: Option<IntGauge>,
}

/// A queue that holds at most `limit` bytes of data; `gauge` (summed over tunnels) follows
/// what it holds.
pub fn queue(limit: usize, gauge: Option<IntGauge>) -> (Queue, QueueRx) {
    let shared = Arc::new(Shared::default());
    (
        Queue {
            shared: Arc::clone(&shared),
            limit,
            gauge: gauge.clone(),
        },
        QueueRx { shared, gauge },
    )
}

impl Queue {
    /// Queues data; `Err(Overflow)` (and nothing queued) if it would exceed the bound.
    pub fn data(&self, data: Bytes) -> Result<(), Overflow> {
        let len = data.len();
        let before = self.shared.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.limit {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Overflow);
        }
        let mut events = crate::lock(&self.shared.events);
        // Checked under the lock the consumer's drop takes: nothing is pushed after it.
        if self.shared.abandoned.load(Ordering::Acquire) {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return Ok(());
        }
        if let Some(gauge) = &self.gauge {
            gauge.add(len as i64);
        }
        events.push_back(Event::Data(data));
        drop(events);
        self.shared.notify.notify_one();
        Ok(())
    }

    /// Queues a control event (never refused).
    pub fn event(&self, event: Event) {
        let mut events = crate::lock(&self.shared.events);
        if !self.shared.abandoned.load(Ordering::Acquire) {
            events.push_back(event);
        }
        drop(events);
        self.shared.notify.notify_one();
    }

    /// Bytes waiting.
    pub fn depth(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }
}

impl QueueRx {
    /// The next event; `None` once the [`Queue`] is gone and everything was taken.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            // Read before the pop: once the pushing end is gone, everything it pushed is in
            // the queue, so an empty pop after this says the end. (Read after, a last push
            // and the drop between the two would be lost.)
            let closed = self.shared.closed.load(Ordering::Acquire);
            let event = crate::lock(&self.shared.events).pop_front();
            if let Some(event) = event {
                if let Event::Data(data) = &event {
                    self.shared.queued.fetch_sub(data.len(), Ordering::AcqRel);
                    if let Some(gauge) = &self.gauge {
                        gauge.sub(data.len() as i64);
                    }
                }
                return Some(event);
            }
            if closed {
                return None;
            }
            self.shared.notify.notified().await;
        }
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        // What nobody will consume leaves the gauge now.
        let left: Vec<Event> = {
            let mut events = crate::lock(&self.shared.events);
            self.shared.abandoned.store(true, Ordering::Release);
            events.drain(..).collect()
        };
        for event in left {
            if let Event::Data(data) = event {
                self.shared.queued.fetch_sub(data.len(), Ordering::AcqRel);
                if let Some(gauge) = &self.gauge {
                    gauge.sub(data.len() as i64);
                }
            }
        }
    }
}

/// A socket a tunnel is spliced to (a frontend's connection, or an agent's destination): split
/// in two halves, with a way to wait for input before allocating a read buffer where the
/// transport can tell (TCP and UDS can; under TLS, rustls buffers records, so a read is simply
/// attempted).
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send;
    type Write: AsyncWrite + Unpin + Send;
    fn halves(self) -> (Self::Read, Self::Write);
    fn readable(read: &Self::Read) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl Socket for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn readable(read: &Self::Read) -> impl std::future::Future<Output = io::Result<()>> + Send {
        read.readable()
    }
}

impl Socket for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn readable(_: &Self::Read) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl Socket for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn readable(read: &Self::Read) -> impl std::future::Future<Output = io::Result<()>> + Send {
        read.readable()
    }
}

/// Bytes a sender may still send on a tunnel (window extension), or unlimited.
#[derive(Debug, Clone)]
pub struct Credit(Option<Arc<Semaphore>>);

impl Credit {
    /// No limit (the peer has no window extension).
    pub fn unlimited() -> Credit {
        Credit(None)
    }

    /// `window` bytes to start with.
    pub fn window(window: u32) -> Credit {
        Credit(Some(Arc::new(Semaphore::new(window as usize))))
    }

    /// Waits for at least one byte of credit and takes up to `want`; `None` once closed.
    pub async fn take(&self, want: usize) -> Option<usize> {
        let Some(sem) = &self.0 else {
            return Some(want);
        };
        sem.acquire().await.ok()?.forget();
        let more = sem.available_permits().min(want.saturating_sub(1));
        if more > 0 {
            if let Ok(permits) = sem.try_acquire_many(more as u32) {
                permits.forget();
                return Some(1 + more);
            }
        }
        Some(1)
    }

    /// Whether taking would wait now (for the blocked-time metric).
    pub fn exhausted(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.available_permits() == 0)
    }

    /// Returns unused credit (a read that got fewer bytes than it took).
    pub fn give_back(&self, bytes: usize) {
        if let Some(sem) = &self.0 {
            if bytes > 0 {
                sem.add_permits(bytes);
            }
        }
    }

    /// The peer granted `bytes` more.
    pub fn grant(&self, bytes: u32) {
        self.give_back(bytes as usize);
    }

    /// Wakes a waiting sender with `None`: the tunnel is over.
    pub fn close(&self) {
        if let Some(sem) = &self.0 {
            sem.close();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded_in_bytes_and_counts_down_as_consumed() {
        let gauge = IntGauge::new("q", "q").unwrap();
        let (q, mut rx) = queue(10, Some(gauge.clone()));
        q.data(Bytes::from_static(b"12345678")).unwrap();
        assert_eq!(q.data(Bytes::from_static(b"abc")), Err(Overflow));
        q.data(Bytes::from_static(b"ab")).unwrap();
        assert_eq!(q.depth(), 10);
        assert!(matches!(rx.next().await, Some(Event::Data(d)) if d.len() == 8));
        assert_eq!(q.depth(), 2);
        q.data(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(gauge.get(), 5);
        drop(rx);
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_single_chunk_larger_than_the_bound_is_accepted_into_an_empty_queue() {
        let (q, _rx) = queue(4, None);
        q.data(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(q.data(Bytes::from_static(b"1")), Err(Overflow));
    }

    #[tokio::test]
    async fn credit_waits_for_a_grant_and_close_wakes_the_waiter() {
        let credit = Credit::window(4);
        assert_eq!(credit.take(10).await, Some(4));
        assert!(credit.exhausted());
        let waiter = {
            let credit = credit.clone();
            tokio::spawn(async move { credit.take(10).await })
        };
        tokio::task::yield_now().await;
        credit.grant(3);
        assert_eq!(waiter.await.unwrap(), Some(3));
        let waiter = {
            let credit = credit.clone();
            tokio::spawn(async move { credit.take(10).await })
        };
        tokio::task::yield_now().await;
        credit.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(Credit::unlimited().take(7).await, Some(7));
    }
}
