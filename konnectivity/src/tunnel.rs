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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::sync::{mpsc, Semaphore};

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

/// The queue of a tunnel: pushed by the stream reader, without waiting.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Event>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    gauge: Option<IntGauge>,
}

/// The tunnel's queue overflowed (only possible without the window extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// The consuming end of a [`Queue`].
#[derive(Debug)]
pub struct QueueRx {
    rx: mpsc::UnboundedReceiver<Event>,
    queued: Arc<AtomicUsize>,
    gauge: Option<IntGauge>,
}

/// A queue that holds at most `limit` bytes of data; `gauge` (summed over tunnels) follows
/// what it holds.
pub fn queue(limit: usize, gauge: Option<IntGauge>) -> (Queue, QueueRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            tx,
            queued: Arc::clone(&queued),
            limit,
            gauge: gauge.clone(),
        },
        QueueRx { rx, queued, gauge },
    )
}

impl Queue {
    /// Queues data; `Err(Overflow)` (and nothing queued) if it would exceed the bound.
    pub fn data(&self, data: Bytes) -> Result<(), Overflow> {
        let len = data.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.limit {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Overflow);
        }
        if self.tx.send(Event::Data(data)).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        } else if let Some(gauge) = &self.gauge {
            gauge.add(len as i64);
        }
        Ok(())
    }

    /// Queues a control event (never refused).
    pub fn event(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// Bytes waiting.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl QueueRx {
    /// The next event; `None` once every [`Queue`] is gone.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        if let Event::Data(data) = &event {
            self.queued.fetch_sub(data.len(), Ordering::AcqRel);
            if let Some(gauge) = &self.gauge {
                gauge.sub(data.len() as i64);
            }
        }
        Some(event)
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        // What nobody will consume leaves the gauge now.
        self.rx.close();
        while let Ok(event) = self.rx.try_recv() {
            if let Event::Data(data) = event {
                self.queued.fetch_sub(data.len(), Ordering::AcqRel);
                if let Some(gauge) = &self.gauge {
                    gauge.sub(data.len() as i64);
                }
            }
        }
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
