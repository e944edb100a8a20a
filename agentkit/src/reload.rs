//! Hot reload: the config file is re-read on SIGHUP and whenever its contents change (checked
//! every `interval`; polling the contents also catches Kubernetes ConfigMap updates, which
//! swap a symlink and leave no inotify event on the file itself). The agent's `apply` closure
//! parses, validates and swaps its runtime state atomically; a config that fails is logged and
//! the running config stays.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use crate::Shutdown;

/// Why a reload was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP arrived.
    Signal,
    /// The file's contents changed.
    Changed,
}

/// Watches one config file.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    interval: Duration,
    last: Option<Vec<u8>>,
}

impl Reloader {
    /// `initial` is the text the agent started with, so an unchanged file is not re-applied.
    pub fn new(path: PathBuf, interval: Duration, initial: Option<Vec<u8>>) -> Self {
        Reloader {
            path,
            interval: interval.max(Duration::from_millis(50)),
            last: initial,
        }
    }

    /// Runs until shutdown. `apply` gets the new text and returns an error message to log.
    pub async fn run<F>(mut self, shutdown: Shutdown, mut apply: F)
    where
        F: FnMut(&str, Trigger) -> Result<(), String>,
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(error) => {
                warn!(%error, "cannot listen for SIGHUP; reloading on file change only");
                None
            }
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = tick.tick() => Trigger::Changed,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => Trigger::Signal,
                () = shutdown.stopping() => return,
            };
            let bytes = match tokio::fs::read(&self.path).await {
                Ok(b) => b,
                Err(error) => {
                    // A ConfigMap swap can briefly leave no file; try again next tick.
                    warn!(%error, path = %self.path.display(), "cannot read config for reload");
                    continue;
                }
            };
            if trigger == Trigger::Changed && self.last.as_deref() == Some(&bytes[..]) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            self.last = Some(bytes);
            match apply(&text, trigger) {
                Ok(()) => info!(?trigger, path = %self.path.display(), "config reloaded"),
                Err(error) => {
                    warn!(%error, ?trigger, path = %self.path.display(), "config reload rejected; keeping the running config")
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn applies_changes_once_each() {
        let dir = std::env::temp_dir().join(format!("agentkit-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(&path, "a").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shutdown = Shutdown::new();
        let r = Reloader::new(path.clone(), Duration::from_millis(50), Some(b"a".to_vec()));
        let s = Arc::clone(&seen);
        let task = tokio::spawn(r.run(shutdown.clone(), move |text, _| {
            s.lock().unwrap().push(text.to_owned());
            if text == "bad" {
                Err("bad config".into())
            } else {
                Ok(())
            }
        }));
        for content in ["b", "bad", "c"] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            // Atomic replace, like a ConfigMap update.
            let tmp = dir.join("tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        shutdown.stop_accepting();
        task.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["b", "bad", "c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
