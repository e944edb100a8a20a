//! Hot reload, one mechanism for every agent. A [`Reloader`] is a source of events: on a
//! signal (SIGHUP, and whatever else the agent asks for) or a poll tick it runs the agent's
//! *load* closure on the blocking pool (files, globs, templates: never on a runtime worker),
//! and hands the result to the agent's own loop, which applies it between its other events.
//! Polling the contents also catches Kubernetes ConfigMap updates, which swap a symlink and
//! leave no inotify event on the file itself.
//!
//! The load closure decides what "unchanged" means and returns `Ok(None)` for it;
//! [`Fingerprint`] is the usual way (the bytes last seen). A load that fails is handed on as
//! an error, so the agent counts and logs it and keeps its running config.

use std::time::Duration;

use tokio::signal::unix::SignalKind;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::Shutdown;

/// The shortest poll interval accepted (a smaller one is raised to it).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why a reload was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A reload signal arrived.
    Signal,
    /// The poll interval passed.
    Poll,
}

/// One load that produced something to apply, or failed.
#[derive(Debug)]
pub struct Attempt<T> {
    /// What started it.
    pub trigger: Trigger,
    /// The loaded config, or why it could not be loaded.
    pub loaded: anyhow::Result<T>,
}

/// The bytes a config was last loaded from, to tell a change from a poll that found none.
#[derive(Debug, Clone, Default)]
pub struct Fingerprint {
    last: Option<Vec<u8>>,
}

impl Fingerprint {
    /// Starts from the bytes the agent started with (`None`: anything counts as a change).
    pub fn new(initial: Option<Vec<u8>>) -> Self {
        Fingerprint { last: initial }
    }

    /// Records `bytes`; true if they differ from the last ones.
    pub fn update(&mut self, bytes: &[u8]) -> bool {
        if self.last.as_deref() == Some(bytes) {
            return false;
        }
        self.last = Some(bytes.to_vec());
        true
    }
}

/// The usual *load* closure of a config file: reads `path`, and on a signal, or on a poll
/// that finds other bytes than last time (`initial` at first), hands its text to `parse`.
pub fn file_loader<T, P>(
    path: std::path::PathBuf,
    initial: Option<Vec<u8>>,
    mut parse: P,
) -> impl FnMut(Trigger) -> anyhow::Result<Option<T>> + Send + 'static
where
    P: FnMut(&str) -> anyhow::Result<T> + Send + 'static,
{
    let mut seen = Fingerprint::new(initial);
    move |trigger| {
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if !seen.update(&bytes) && trigger == Trigger::Poll {
            return Ok(None);
        }
        parse(&String::from_utf8_lossy(&bytes)).map(Some)
    }
}

/// Signals and poll interval.
#[derive(Debug, Clone)]
pub struct Options {
    /// Signals that trigger a reload (default: SIGHUP).
    pub signals: Vec<SignalKind>,
    /// How often to poll; `None`: on signals only. [`Reloader::set_interval`] changes it.
    pub interval: Option<Duration>,
}

impl Options {
    /// SIGHUP, and a poll every `interval` if given.
    pub fn new(interval: Option<Duration>) -> Self {
        Options {
            signals: vec![SignalKind::hangup()],
            interval,
        }
    }
}

/// The agent's end of a running reloader.
#[derive(Debug)]
pub struct Reloader<T> {
    attempts: mpsc::Receiver<Attempt<T>>,
    interval: watch::Sender<Option<Duration>>,
}

impl<T: Send + 'static> Reloader<T> {
    /// Starts watching, on `shutdown`'s tracker, until it stops. `load` runs on the blocking
    /// pool, one call at a time.
    pub fn spawn<L>(shutdown: &Shutdown, options: Options, load: L) -> std::io::Result<Self>
    where
        L: FnMut(Trigger) -> anyhow::Result<Option<T>> + Send + 'static,
    {
        let mut signals = Vec::with_capacity(options.signals.len());
        for kind in &options.signals {
            signals.push(tokio::signal::unix::signal(*kind)?);
        }
        let (tx, attempts) = mpsc::channel(1);
        let (interval, interval_rx) = watch::channel(options.interval);
        shutdown.spawn(watch_loop(shutdown.clone(), signals, interval_rx, tx, load));
        Ok(Reloader { attempts, interval })
    }

    /// The next load to apply; `None` once the reloader stopped. Cancel-safe: use it in a
    /// `select!` loop.
    pub async fn next(&mut self) -> Option<Attempt<T>> {
        self.attempts.recv().await
    }

    /// Changes the poll interval (`None`: signals only), for configs that set their own.
    pub fn set_interval(&self, interval: Option<Duration>) {
        self.interval.send_if_modified(|current| {
            let changed = *current != interval;
            *current = interval;
            changed
        });
    }

    /// For an agent with no loop of its own: hands every attempt to `apply` (which counts
    /// it, and applies what loaded) until shutdown, and logs each outcome.
    pub async fn apply_each<A>(mut self, mut apply: A)
    where
        A: FnMut(anyhow::Result<T>) -> Result<(), String>,
    {
        while let Some(Attempt { trigger, loaded }) = self.next().await {
            match apply(loaded) {
                Ok(()) => info!(?trigger, "config reloaded"),
                Err(error) => {
                    warn!(%error, ?trigger, "config reload rejected; keeping the running config")
                }
            }
        }
    }
}

async fn watch_loop<T, L>(
    shutdown: Shutdown,
    mut signals: Vec<tokio::signal::unix::Signal>,
    mut interval: watch::Receiver<Option<Duration>>,
    tx: mpsc::Sender<Attempt<T>>,
    mut load: L,
) where
    T: Send + 'static,
    L: FnMut(Trigger) -> anyhow::Result<Option<T>> + Send + 'static,
{
    let mut period = *interval.borrow_and_update();
    let mut next_poll = period.map(|p| tokio::time::Instant::now() + p.max(MIN_POLL_INTERVAL));
    loop {
        // Any reload signal (a closed signal stream never fires).
        let signal = std::future::poll_fn(|cx| {
            for s in signals.iter_mut() {
                if let std::task::Poll::Ready(Some(())) = s.poll_recv(cx) {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        });
        let trigger = tokio::select! {
            () = shutdown.stopping() => return,
            () = signal => Trigger::Signal,
            () = sleep_until(next_poll) => Trigger::Poll,
            changed = interval.changed() => {
                if changed.is_err() {
                    return; // the agent dropped its end
                }
                period = *interval.borrow_and_update();
                next_poll = period.map(|p| tokio::time::Instant::now() + p.max(MIN_POLL_INTERVAL));
                continue;
            }
        };
        next_poll = period.map(|p| tokio::time::Instant::now() + p.max(MIN_POLL_INTERVAL));
        let work = tokio::task::spawn_blocking(move || {
            let loaded = load(trigger);
            (load, loaded)
        });
        let loaded = match work.await {
            Ok((l, loaded)) => {
                load = l;
                loaded
            }
            Err(error) => {
                warn!(%error, "config load panicked; reloading stops");
                return;
            }
        };
        let loaded = match loaded {
            Ok(None) => continue,
            Ok(Some(value)) => Ok(value),
            Err(error) => Err(error),
        };
        tokio::select! {
            () = shutdown.stopping() => return,
            sent = tx.send(Attempt { trigger, loaded }) => if sent.is_err() { return },
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Loads a file the way an agent does: its text if it changed.
    fn file_loader(
        path: std::path::PathBuf,
        initial: &[u8],
    ) -> impl FnMut(Trigger) -> anyhow::Result<Option<String>> + Send + 'static {
        let mut seen = Fingerprint::new(Some(initial.to_vec()));
        move |_| {
            let bytes = std::fs::read(&path)?;
            if !seen.update(&bytes) {
                return Ok(None);
            }
            let text = String::from_utf8(bytes)?;
            if text == "bad" {
                anyhow::bail!("bad config");
            }
            Ok(Some(text))
        }
    }

    #[tokio::test]
    async fn hands_each_change_to_the_agent_once() {
        let dir = std::env::temp_dir().join(format!("agentkit-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(&path, "a").unwrap();
        let shutdown = Shutdown::new();
        let options = Options {
            signals: Vec::new(),
            interval: Some(Duration::from_millis(50)),
        };
        let mut reloader =
            Reloader::spawn(&shutdown, options, file_loader(path.clone(), b"a")).unwrap();
        let mut seen = Vec::new();
        for content in ["b", "bad", "c"] {
            // Atomic replace, like a ConfigMap update.
            let tmp = dir.join("tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            let attempt = tokio::time::timeout(Duration::from_secs(5), reloader.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(attempt.trigger, Trigger::Poll);
            seen.push(attempt.loaded.map_err(|e| e.to_string()));
        }
        assert_eq!(
            seen,
            vec![
                Ok("b".to_owned()),
                Err("bad config".to_owned()),
                Ok("c".to_owned())
            ]
        );
        // Nothing changed: nothing more arrives.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), reloader.next())
                .await
                .is_err()
        );
        shutdown.stop_accepting();
        assert!(reloader.next().await.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_can_change_and_be_switched_off() {
        let shutdown = Shutdown::new();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = std::sync::Arc::clone(&calls);
        let options = Options {
            signals: Vec::new(),
            interval: None,
        };
        let mut reloader = Reloader::spawn(&shutdown, options, move |_| {
            Ok(Some(c.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))
        })
        .unwrap();
        // No interval: nothing happens, however long we wait.
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), reloader.next())
                .await
                .is_err()
        );
        reloader.set_interval(Some(Duration::from_secs(10)));
        let first = reloader.next().await.unwrap();
        assert_eq!(first.loaded.unwrap(), 0);
        reloader.set_interval(None);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), reloader.next())
                .await
                .is_err()
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        shutdown.stop_accepting();
    }
}
