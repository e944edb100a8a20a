//! Leaving without dropping a query (a rolling update with `maxSurge`, or a plain stop):
//! every port is steered to the newest member of its SO_REUSEPORT group, the UDP workers read
//! their queues until they stay empty, TCP connections already queued are accepted and
//! served, and the misses and connections in progress are given until a deadline.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use agentkit::Shutdown;
use tracing::{info, warn};

use super::listeners::DnsListener;
use crate::udp;

/// Hands `listeners` over and serves what they already have until it is done or `deadline`.
/// `work` is the group their misses, fetches and TCP connections run on; `tasks` runs the
/// blocking joins.
pub(super) async fn hand_over(
    listeners: Vec<(SocketAddr, DnsListener)>,
    work: &Shutdown,
    tasks: &Shutdown,
    deadline: tokio::time::Instant,
) {
    let mut threads = Vec::new();
    let mut controls = Vec::new();
    for (addr, mut listener) in listeners {
        if let Err(e) = udp::steer_to_newest(&*listener.udp) {
            warn!(%addr, error = %e, "cannot steer UDP to a newer instance");
        }
        if let Err(e) = udp::steer_to_newest(&*listener.tcp) {
            warn!(%addr, error = %e, "cannot steer TCP to a newer instance");
        }
        listener.udp_control.drain.store(true, Ordering::Release);
        listener.tcp_task.abort();
        listener.server.clone().drain_tcp_backlog(&listener.tcp);
        threads.extend(listener.udp_thread.take());
        controls.push(listener.udp_control);
    }
    // The workers return once their queues stay empty.
    let joined = tasks.spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = tokio::time::timeout_at(deadline, joined).await;
    if work.settle(deadline).await {
        info!("every query in progress answered");
    } else {
        warn!("hand-over deadline reached with queries or connections still open");
    }
    for control in &controls {
        control.stop.store(true, Ordering::Release);
    }
}
