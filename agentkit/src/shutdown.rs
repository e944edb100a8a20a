//! Graceful shutdown, one pattern for every agent: SIGTERM or SIGINT stops the accept loops
//! (the `stopping` phase); in-flight connections, tracked by a `TaskTracker`, may finish until
//! a grace deadline; then the `forced` phase tells every remaining task to close now.

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
        tokio::spawn(async move {
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
    async fn drain_returns_early_when_all_finish() {
        let shutdown = Shutdown::new();
        shutdown
            .tracker()
            .spawn(tokio::time::sleep(Duration::from_millis(10)));
        shutdown.stop_accepting();
        assert_eq!(shutdown.drain(Duration::from_secs(60)).await, 0);
    }
}
