//! The agent's side of the kernel fast path ([`crate::fast_path`]): which listeners the
//! kernel answers for and which zones it mirrors, loading it, and the task that owns the
//! loaded [`Mirror`]. Every call into the kernel (map updates, attach retries, the XDP
//! recheck, the detach) runs on the blocking pool; the task only waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use agentkit::Shutdown;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::listeners::DnsListener;
use crate::config;
use crate::fast_path::{self, Mirror, ZonesToMirror};
use crate::flags::Flags;
use crate::metrics::Metrics;
use crate::server::Zone;

/// Map updates every [`fast_path::SYNC_INTERVAL`]; attach retries and the XDP recheck every
/// this many of them (once a second).
const RECHECK_EVERY: u32 = 10;

/// The fast path's options: the flags, else the Corefile's `fastpath`; None when off.
pub(super) fn options(
    flags: &Flags,
    corefile: Option<&config::FastPath>,
) -> Option<fast_path::Options> {
    let (interfaces, mode) = if !flags.fast_path_interfaces.is_empty() {
        (flags.fast_path_interfaces.clone(), flags.fast_path_mode)
    } else {
        let c = corefile?;
        (c.interfaces.clone(), c.mode)
    };
    Some(fast_path::Options {
        interfaces,
        mode,
        capacity: flags.fast_path_capacity,
    })
}

/// The addresses the kernel answers for and the zones it mirrors: the listeners on a
/// specific address (not a wildcard) that serve the most common set of zones, so that
/// whatever the kernel answers on any of them is what that listener would answer. Each zone
/// comes with the metrics of the first of those listeners, where its kernel answers are
/// counted.
pub(super) fn plan<'a>(
    listeners: impl Iterator<Item = (&'a SocketAddr, &'a DnsListener)>,
) -> (Vec<SocketAddr>, ZonesToMirror) {
    // Listeners grouped by the zones they serve (the same zone objects, in order).
    type Group<'l> = (Vec<Arc<Zone>>, Vec<(SocketAddr, &'l DnsListener)>);
    let mut groups: Vec<Group<'a>> = Vec::new();
    for (addr, listener) in listeners {
        if addr.ip().is_unspecified() {
            continue;
        }
        let zones: Vec<Arc<Zone>> = listener
            .server
            .zones()
            .iter()
            .map(|s| Arc::clone(&s.zone))
            .collect();
        let same = |g: &&mut Group<'a>| {
            g.0.len() == zones.len() && g.0.iter().zip(&zones).all(|(a, b)| Arc::ptr_eq(a, b))
        };
        match groups.iter_mut().find(|g| same(g)) {
            Some(g) => g.1.push((*addr, listener)),
            None => groups.push((zones, vec![(*addr, listener)])),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
    let Some((zones, mut members)) = groups.into_iter().next() else {
        return (Vec::new(), Vec::new());
    };
    members.sort_by_key(|(addr, _)| *addr);
    let served = members.first().map(|(_, l)| l.server.zones());
    let metrics_of = |zone: &Arc<Zone>| {
        served.as_ref().and_then(|s| {
            s.iter()
                .find(|s| Arc::ptr_eq(&s.zone, zone))
                .and_then(|s| s.metrics.clone())
        })
    };
    let zones = zones
        .into_iter()
        .map(|z| {
            let m = metrics_of(&z);
            (z, m)
        })
        .collect();
    (members.into_iter().map(|(a, _)| a).collect(), zones)
}

/// Loads and attaches the fast path for `locals` and mirrors `zones`. Blocking (BPF
/// syscalls, netlink): call it on the blocking pool. A failure is logged, and DNS is served
/// from userspace alone.
pub(super) fn load(
    options: fast_path::Options,
    locals: &[SocketAddr],
    zones: ZonesToMirror,
    counters: fast_path::Counters,
    metrics: &Metrics,
) -> Option<Mirror> {
    if locals.is_empty() {
        error!(
            "fast path: no listener on a specific address (bind one); serving from userspace only"
        );
        return None;
    }
    let mut mirror = match Mirror::start(options.clone(), locals, counters) {
        Ok(mirror) => mirror,
        Err(e) => {
            error!(error = %e, "fast path not loaded; serving from userspace only");
            return None;
        }
    };
    let report = mirror.set_zones(zones);
    metrics.fast_path_skipped.inc_by(report.skipped as u64);
    report_attachments(&mirror, metrics);
    info!(
        mode = options.mode.as_str(),
        interfaces = ?options.interfaces,
        ?locals,
        mirrored = report.inserted,
        "fast path loaded"
    );
    Some(mirror)
}

fn report_attachments(mirror: &Mirror, metrics: &Metrics) {
    metrics
        .fast_path_attached
        .set(mirror.attached().len() as i64);
    metrics
        .fast_path_xdp_fallbacks
        .set(mirror.xdp_fallbacks().len() as i64);
}

/// The running fast path: a task that owns the [`Mirror`], keeps the kernel map in step with
/// the caches and takes new zones after a reload.
pub(super) struct FastPath {
    zones: mpsc::UnboundedSender<ZonesToMirror>,
    stop: Shutdown,
    task: JoinHandle<()>,
}

impl FastPath {
    /// Starts the task for `mirror` on a child of `tasks`.
    pub fn spawn(mirror: Mirror, tasks: &Shutdown, metrics: Metrics) -> FastPath {
        let (zones, rx) = mpsc::unbounded_channel();
        let stop = tasks.child();
        let task = tasks.spawn(keep_in_step(mirror, stop.clone(), rx, metrics));
        FastPath { zones, stop, task }
    }

    /// Mirrors `zones` from now on (a reload changed them).
    pub fn set_zones(&self, zones: ZonesToMirror) {
        let _ = self.zones.send(zones);
    }

    /// Detaches the programs; returns once the kernel no longer answers.
    pub async fn stop(self) {
        self.stop.stop_accepting();
        if let Err(e) = self.task.await {
            error!(error = %e, "fast path task failed");
        }
        info!("fast path detached");
    }
}

/// The fast path's task: every call into the kernel on the blocking pool, the mirror moved
/// there and back; detaches when `stop` stops.
async fn keep_in_step(
    mirror: Mirror,
    stop: Shutdown,
    mut zones: mpsc::UnboundedReceiver<ZonesToMirror>,
    metrics: Metrics,
) {
    let mut tick = tokio::time::interval(fast_path::SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    let mut mirror = Some(mirror);
    while let Some(mut current) = mirror.take() {
        let step: Box<dyn FnOnce(&mut Mirror) + Send> = tokio::select! {
            () = stop.stopping() => {
                // Dropping the mirror detaches the programs.
                let _ = stop.spawn_blocking(move || drop(current)).await;
                return;
            }
            Some(next) = zones.recv() => {
                let metrics = metrics.clone();
                Box::new(move |m: &mut Mirror| {
                    let report = m.set_zones(next);
                    metrics.fast_path_skipped.inc_by(report.skipped as u64);
                })
            }
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                let recheck = ticks % RECHECK_EVERY == 0;
                let metrics = metrics.clone();
                Box::new(move |m: &mut Mirror| {
                    let report = m.sync(Instant::now());
                    metrics.fast_path_skipped.inc_by(report.skipped as u64);
                    if recheck {
                        m.retry_attach();
                        m.recheck_xdp();
                        report_attachments(m, &metrics);
                    }
                })
            }
        };
        match stop
            .spawn_blocking(move || {
                step(&mut current);
                current
            })
            .await
        {
            Ok(back) => mirror = Some(back),
            // The mirror was dropped (and detached) with the panicking thread.
            Err(e) => error!(error = %e, "fast path update panicked; serving from userspace only"),
        }
    }
}
