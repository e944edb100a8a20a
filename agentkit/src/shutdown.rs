//! Graceful shutdown, one pattern for every agent: SIGTERM or SIGINT stops the accept loops
//! (the `stopping` phase); in-flight connections, tracked by a `TaskTracker`, may finish until
//! a grace deadline; then the `forced` phase tells every remaining task to close now.
//!
//! Every task an agent starts is spawned on the tracker ([`Shutdown::spawn`]), so that the
//! drain knows about it; a part of the agent that stops on its own (a listener a reload
//! removed) takes a [`Shutdown::child`], and a part whose work must be waited for alone (a
//! DNS listener handing its port over) takes a [`Shutdown::group`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Cheap to clone; every clone sees the same phases.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
    /// The trackers of the groups this one is in ([`Shutdown::group`]), innermost first: a
    /// task spawned here counts in each of them too.
    outer: Vec<TaskTracker>,
}

impl Shutdown {
    /// A shutdown that nothing has triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that calls [`Shutdown::stop_accepting`] on SIGTERM or SIGINT.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        self.tracker.spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                () = this.stopping() => return,
            };
            info!(signal = name, "shutdown requested: no new connections");
            this.stop_accepting();
        });
        Ok(())
    }

    /// A shutdown for one part of the agent: it stops when this one does, or alone by its own
    /// [`Shutdown::stop_accepting`]; it shares the tracker and the forced phase, so its
    /// tasks are drained with everyone else's.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            stop: self.stop.child_token(),
            force: self.force.clone(),
            tracker: self.tracker.clone(),
            outer: self.outer.clone(),
        }
    }

    /// A [`Shutdown::child`] with a tracker of its own: its tasks still count in this one's
    /// drain, and [`Shutdown::settle`] waits for the group's tasks alone.
    pub fn group(&self) -> Shutdown {
        let mut outer = Vec::with_capacity(self.outer.len() + 1);
        outer.push(self.tracker.clone());
        outer.extend(self.outer.iter().cloned());
        Shutdown {
            stop: self.stop.child_token(),
            force: self.force.clone(),
            tracker: TaskTracker::new(),
            outer,
        }
    }

    /// Spawns `task` on the tracker (and on those of the groups this one is in).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.outer.is_empty() {
            return self.tracker.spawn(task);
        }
        let tokens = self.outer_tokens();
        self.tracker.spawn(async move {
            let _tokens = tokens;
            task.await
        })
    }

    /// Runs blocking `work` on tokio's blocking pool, tracked like a task.
    pub fn spawn_blocking<F, T>(&self, work: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if self.outer.is_empty() {
            return self.tracker.spawn_blocking(work);
        }
        let tokens = self.outer_tokens();
        self.tracker.spawn_blocking(move || {
            let _tokens = tokens;
            work()
        })
    }

    fn outer_tokens(&self) -> Vec<tokio_util::task::task_tracker::TaskTrackerToken> {
        self.outer.iter().map(TaskTracker::token).collect()
    }

    /// Starts the graceful phase: accept loops return.
    pub fn stop_accepting(&self) {
        self.stop.cancel();
    }

    /// Starts the forced phase: remaining connections close now.
    pub fn force_close(&self) {
        self.stop.cancel();
        self.force.cancel();
    }

    /// Resolves once the graceful phase has begun.
    pub async fn stopping(&self) {
        self.stop.cancelled().await;
    }

    /// Resolves once the forced phase has begun.
    pub async fn forced(&self) {
        self.force.cancelled().await;
    }

    /// Whether the graceful phase has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The tracker in-flight work registers with (`tracker().spawn(..)`).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Waits until every task on this tracker (for a [`Shutdown::group`]: the group's) has
    /// finished, or until `deadline`; true if they all finished. Spawning goes on after it.
    pub async fn settle(&self, deadline: tokio::time::Instant) -> bool {
        self.tracker.close();
        let done = tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok();
        self.tracker.reopen();
        done
    }

    /// Waits for the graceful phase, then for tracked tasks up to `grace`, then forces the rest
    /// closed and waits for them to notice. Returns how many tasks were still open at the
    /// deadline.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.stopping().await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            info!("all connections finished");
            return 0;
        }
        let open = self.tracker.len();
        warn!(open, grace = ?grace, "grace period over: closing the remaining connections");
        self.force_close();
        self.tracker.wait().await;
        open
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_then_forces() {
        let shutdown = Shutdown::new();
        // Finishes by itself after 1 s.
        shutdown
            .tracker()
            .spawn(tokio::time::sleep(Duration::from_secs(1)));
        // Runs until forced.
        let s = shutdown.clone();
        shutdown.tracker().spawn(async move { s.forced().await });
        shutdown.stop_accepting();
        let open = shutdown.drain(Duration::from_secs(5)).await;
        assert_eq!(open, 1);
        assert!(shutdown.is_stopping());
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_stops_alone_or_with_its_parent() {
        let parent = Shutdown::new();
        let first = parent.child();
        let second = parent.child();
        first.stop_accepting();
        assert!(first.is_stopping());
        assert!(!parent.is_stopping() && !second.is_stopping());
        // A child's task is drained with the parent's.
        let s = second.clone();
        second.spawn(async move { s.stopping().await });
        parent.stop_accepting();
        assert!(second.is_stopping());
        assert_eq!(parent.drain(Duration::from_secs(1)).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_settles_alone_and_drains_with_its_parent() {
        let parent = Shutdown::new();
        let group = parent.group();
        let inner = group.group();
        // The parent's own task runs until forced; it does not hold up the group.
        let p = parent.clone();
        parent.spawn(async move { p.forced().await });
        group.spawn(tokio::time::sleep(Duration::from_secs(1)));
        let blocking = inner.spawn_blocking(|| std::thread::sleep(Duration::from_millis(20)));
        let start = tokio::time::Instant::now();
        assert!(!group.settle(start + Duration::from_millis(500)).await);
        assert!(group.settle(start + Duration::from_secs(2)).await);
        assert!(start.elapsed() >= Duration::from_secs(1));
        blocking.await.unwrap();
        // Its tasks count in the parent's drain too: two open at the deadline.
        let i = inner.clone();
        inner.spawn(async move { i.forced().await });
        assert_eq!(parent.tracker().len(), 2);
        parent.stop_accepting();
        assert!(group.is_stopping() && inner.is_stopping());
        assert_eq!(parent.drain(Duration::from_secs(1)).await, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_returns_early_when_all_finish() {
        let shutdown = Shutdown::new();
        shutdown
            .tracker()
            .spawn(tokio::time::sleep(Duration::from_millis(10)));
        shutdown.stop_accepting();
        assert_eq!(shutdown.drain(Duration::from_secs(60)).await, 0);
    }
}
