//! A dial through an agent, and the established tunnel it yields. The dial is bounded (one
//! deadline over every attempt), retried on the next candidate agent when one fails, and
//! cancelled with DIAL_CLS when abandoned (deadline, frontend gone); the [`Tunnel`] closes
//! itself toward the agent when dropped on any path, and the gauges follow both.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::debug;

use super::backends::{Backend, DialOutcome, Link};
use super::Server;
use crate::metrics::DialFailure;
use crate::proto::packet::Packet;

/// Why a dial failed, and how an HTTP-CONNECT frontend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    NoAgent,
    /// The agent's own error (its dial to the destination failed).
    Refused(String),
    /// The agent's stream ended while the dial was pending.
    BackendClosed,
    Timeout,
}

impl DialError {
    /// The text kube-apiserver gets (a DIAL_RSP error, or a CONNECT response body).
    pub fn message(&self) -> String {
        match self {
            DialError::NoAgent => "No agent available".into(),
            DialError::Refused(error) => error.clone(),
            DialError::BackendClosed => "Backend context error".into(),
            DialError::Timeout => "Backend dial timeout".into(),
        }
    }

    /// The HTTP status an HTTP-CONNECT client gets (upstream's mapping since v0.34).
    pub fn http_status(&self) -> (u16, &'static str) {
        match self {
            DialError::NoAgent => (500, "Internal Server Error"),
            DialError::Timeout => (504, "Gateway Timeout"),
            DialError::BackendClosed => (502, "Bad Gateway"),
            DialError::Refused(error) => {
                let error = error.to_ascii_lowercase();
                if error.contains("timeout") || error.contains("deadline exceeded") {
                    (504, "Gateway Timeout")
                } else if error.contains("too many open files") {
                    (503, "Service Unavailable")
                } else {
                    (502, "Bad Gateway")
                }
            }
        }
    }

    fn metric(&self) -> DialFailure {
        match self {
            DialError::NoAgent => DialFailure::NoAgent,
            DialError::Refused(_) => DialFailure::ErrorResponse,
            DialError::BackendClosed => DialFailure::BackendClose,
            DialError::Timeout => DialFailure::BackendDialTimeout,
        }
    }
}

/// An established tunnel. Dropping it closes it toward the agent (CLOSE_REQ) unless the agent
/// closed it first.
#[derive(Debug)]
pub struct Tunnel {
    pub backend: Arc<Backend>,
    pub connect_id: i64,
    pub link: Link,
    server: Arc<Server>,
    since: Instant,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let still_open = agentkit::sync::lock(&self.backend.tunnels)
            .remove(&self.connect_id)
            .is_some();
        if still_open {
            self.backend.send_control(Packet::CloseRequest {
                connect_id: self.connect_id,
            });
        }
        if let Link::Stream { credit, .. } = &self.link {
            credit.close();
        }
        let metrics = &self.server.metrics;
        metrics.established_connections.dec();
        metrics
            .connection_duration
            .observe(self.since.elapsed().as_secs_f64());
    }
}

/// A dial sent to one agent; dropping it before the answer cancels it (DIAL_CLS).
struct Pending {
    backend: Arc<Backend>,
    random: i64,
    server: Arc<Server>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let abandoned = agentkit::sync::lock(&self.backend.pending)
            .remove(&self.random)
            .is_some();
        if abandoned && !self.backend.closed.is_cancelled() {
            self.backend.send_control(Packet::DialClose {
                random: self.random,
            });
        }
        self.server.metrics.pending_backend_dials.dec();
    }
}

/// Dials `address` through an agent. Cancel-safe: dropping the future cancels the dial.
pub async fn dial(
    server: &Arc<Server>,
    protocol: &str,
    address: &str,
    random: i64,
) -> Result<Tunnel, DialError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + server.config.backend_dial_timeout;
    let candidates = server.backends.candidates(address);
    let mut last = DialError::NoAgent;
    for backend in candidates
        .into_iter()
        .take(server.config.dial_attempts.max(1))
    {
        match attempt(server, &backend, protocol, address, random, deadline).await {
            Ok((connect_id, link)) => {
                server
                    .metrics
                    .dial_duration
                    .observe(started.elapsed().as_secs_f64());
                server.metrics.established_connections.inc();
                return Ok(Tunnel {
                    backend,
                    connect_id,
                    link,
                    server: Arc::clone(server),
                    since: Instant::now(),
                });
            }
            Err(error) => {
                debug!(agent_id = %backend.agent_id, address, ?error, "dial through agent failed");
                server.metrics.dial_failed(error.metric());
                let out_of_time = error == DialError::Timeout;
                last = error;
                if out_of_time {
                    break;
                }
            }
        }
    }
    if last == DialError::NoAgent {
        server.metrics.dial_failed(DialFailure::NoAgent);
    }
    Err(last)
}

async fn attempt(
    server: &Arc<Server>,
    backend: &Arc<Backend>,
    protocol: &str,
    address: &str,
    random: i64,
    deadline: tokio::time::Instant,
) -> Result<(i64, Link), DialError> {
    let (tx, rx) = oneshot::channel();
    agentkit::sync::lock(&backend.pending).insert(random, tx);
    server.metrics.pending_backend_dials.inc();
    let _pending = Pending {
        backend: Arc::clone(backend),
        random,
        server: Arc::clone(server),
    };
    backend.send_control(Packet::DialRequest {
        protocol: protocol.to_owned(),
        address: address.to_owned(),
        random,
    });
    tokio::select! {
        outcome = rx => match outcome {
            Ok(DialOutcome::Connected { connect_id, link, orphan }) => {
                orphan.defuse();
                Ok((connect_id, link))
            }
            Ok(DialOutcome::Refused(error)) => Err(DialError::Refused(error)),
            Err(_) => Err(DialError::BackendClosed),
        },
        () = backend.closed.cancelled() => Err(DialError::BackendClosed),
        () = tokio::time::sleep_until(deadline) => Err(DialError::Timeout),
    }
}

/// A dial ID for dials the server opens itself (HTTP CONNECT): non-negative, 63 bits, like
/// Go's `rand.Int63()`.
pub fn random_id() -> i64 {
    (rand::random::<u64>() >> 1) as i64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dial_errors_map_to_upstreams_statuses() {
        assert_eq!(DialError::NoAgent.http_status().0, 500);
        assert_eq!(DialError::Timeout.http_status().0, 504);
        assert_eq!(DialError::BackendClosed.http_status().0, 502);
        for (error, status) in [
            ("dial tcp 10.0.0.1:10250: i/o timeout", 504),
            ("context deadline exceeded", 504),
            ("socket: too many open files", 503),
            ("dial tcp 10.0.0.1:10250: connect: connection refused", 502),
            ("lookup x: no such host", 502),
        ] {
            assert_eq!(
                DialError::Refused(error.into()).http_status().0,
                status,
                "{error}"
            );
        }
        assert!(random_id() >= 0);
    }
}
