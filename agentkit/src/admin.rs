//! The admin HTTP server every agent runs. What an address serves is an [`Endpoints`] table:
//! the usual `/metrics` (Prometheus text from the agent's registry, after an optional
//! before-scrape hook that brings gauges and kernel counters up to date), a liveness and a
//! readiness path, and any path an agent adds. [`Endpoints::standard`] is `/metrics`,
//! `/healthz` (the process is alive) and `/readyz` (the agent serves traffic: false until the
//! listeners are bound and again once shutdown starts, so load balancers stop sending before
//! connections drain). An agent that must answer a drop-in's paths (node-local-dns: `/health`,
//! `/ready`, Go's 404 text) builds its own table.
//!
//! Handlers answer from memory and never block: anything slow belongs in the agent, which
//! publishes its result for the handler to read.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::debug;

use crate::Shutdown;

/// How long a client may take to send a request head before its connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one admin connection may stay open, at most.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long the accept loop pauses after a failed accept (EMFILE and friends) instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Readiness shared between the agent and the admin server.
#[derive(Debug, Default, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the agent ready (or not) to serve.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the readiness path answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// One answer of an admin handler.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: StatusCode,
    /// The `Content-Type`, if any.
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// A plain text answer.
    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            body: body.into(),
        }
    }
}

/// A handler: called for every GET or HEAD of its path.
pub type Handler = Arc<dyn Fn() -> Reply + Send + Sync>;

/// What one admin address serves, path by path.
#[derive(Clone)]
pub struct Endpoints {
    routes: Vec<(String, Handler)>,
    not_found: Option<Bytes>,
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<&str> = self.routes.iter().map(|(p, _)| p.as_str()).collect();
        f.debug_struct("Endpoints").field("paths", &paths).finish()
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Self::new()
    }
}

impl Endpoints {
    /// Serves nothing yet; an unknown path gets a 404 listing the known ones.
    pub fn new() -> Self {
        Endpoints {
            routes: Vec::new(),
            not_found: None,
        }
    }

    /// `/metrics` from `registry`, `/healthz`, and `/readyz` from `health`.
    pub fn standard(registry: Registry, health: Health) -> Self {
        Endpoints::new()
            .metrics("/metrics", registry, || {})
            .route("/healthz", || Reply::text(StatusCode::OK, "ok\n"))
            .readiness("/readyz", health, "ready\n", "not ready\n")
    }

    /// Serves `path` with `handler`; a later route for the same path replaces it.
    pub fn route(
        mut self,
        path: impl Into<String>,
        handler: impl Fn() -> Reply + Send + Sync + 'static,
    ) -> Self {
        let path = path.into();
        self.routes.retain(|(p, _)| *p != path);
        self.routes.push((path, Arc::new(handler)));
        self
    }

    /// Serves `registry` in the Prometheus text format at `path`, calling `before_scrape`
    /// first on every scrape (to bring scrape-time gauges and counters read from elsewhere up
    /// to date; it must not block).
    pub fn metrics(
        self,
        path: impl Into<String>,
        registry: Registry,
        before_scrape: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        self.route(path, move || {
            before_scrape();
            let encoder = TextEncoder::new();
            let mut body = Vec::with_capacity(16 * 1024);
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => Reply {
                    status: StatusCode::OK,
                    content_type: Some(prometheus::TEXT_FORMAT),
                    body: body.into(),
                },
                Err(error) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
            }
        })
    }

    /// Answers 200 with `ready` while `health` is ready, else 503 with `not_ready`.
    pub fn readiness(
        self,
        path: impl Into<String>,
        health: Health,
        ready: &'static str,
        not_ready: &'static str,
    ) -> Self {
        self.route(path, move || {
            if health.is_ready() {
                Reply::text(StatusCode::OK, ready)
            } else {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, not_ready)
            }
        })
    }

    /// The body of a 404 (default: a list of the paths served).
    pub fn not_found(mut self, body: &'static str) -> Self {
        self.not_found = Some(Bytes::from_static(body.as_bytes()));
        self
    }

    /// The paths served, in the order they were added.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(p, _)| p.as_str())
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let reply = if req.method() != Method::GET && req.method() != Method::HEAD {
            Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n")
        } else if let Some((_, handler)) = self.routes.iter().find(|(p, _)| p == req.uri().path()) {
            handler()
        } else {
            let body = self.not_found.clone().unwrap_or_else(|| {
                let paths: Vec<&str> = self.paths().collect();
                format!("not found: try {}\n", paths.join(", ")).into()
            });
            Reply::text(StatusCode::NOT_FOUND, body)
        };
        let mut resp = Response::new(Full::new(reply.body));
        *resp.status_mut() = reply.status;
        if let Some(v) = reply.content_type.and_then(|t| t.parse().ok()) {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// A bound admin server; [`AdminServer::serve`] runs it until shutdown.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    endpoints: Arc<Endpoints>,
}

impl AdminServer {
    /// Serves `endpoints` on a listener bound by the caller (see [`crate::net`]).
    pub fn new(listener: TcpListener, endpoints: Endpoints) -> Self {
        AdminServer {
            listener,
            endpoints: Arc::new(endpoints),
        }
    }

    /// Binds `addr` exclusively (fails early, before the agent starts serving).
    pub fn bind(addr: SocketAddr, endpoints: Endpoints) -> std::io::Result<Self> {
        let listener = crate::net::tcp_listener(addr, crate::net::Sharing::Exclusive, 128)?;
        Ok(Self::new(listener, endpoints))
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` stops accepting. Connections are tracked by the shutdown: at
    /// the graceful phase each finishes its request in progress and closes (idle keep-alive
    /// connections at once), at the forced phase it is dropped. A connection that sends no
    /// request head within [`HEADER_READ_TIMEOUT`], or lives past [`CONNECTION_LIFETIME`], is
    /// closed.
    pub async fn serve(self, shutdown: Shutdown) {
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        debug!(%error, "admin accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = shutdown.stopping() => return,
            };
            let endpoints = Arc::clone(&self.endpoints);
            let sd = shutdown.clone();
            shutdown.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let endpoints = Arc::clone(&endpoints);
                    async move { Ok::<_, Infallible>(endpoints.respond(&req)) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
                tokio::pin!(lifetime);
                let mut graceful = false;
                loop {
                    tokio::select! {
                        result = conn.as_mut() => {
                            if let Err(error) = result {
                                debug!(%error, "admin connection failed");
                            }
                            return;
                        }
                        () = sd.stopping(), if !graceful => {
                            graceful = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        () = sd.forced() => return,
                        () = &mut lifetime => return,
                    }
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn standard_endpoints() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("agent_test_total", "a test counter").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(7);
        let health = Health::default();
        let server = AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Endpoints::standard(registry, health.clone()),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = Shutdown::new();
        shutdown.spawn(server.serve(shutdown.clone()));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("agent_test_total 7"), "{metrics}");
        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(missing.contains("/metrics, /healthz, /readyz"), "{missing}");
        shutdown.stop_accepting();
        assert_eq!(shutdown.drain(Duration::from_secs(5)).await, 0);
    }

    #[tokio::test]
    async fn before_scrape_runs_on_every_scrape_and_routes_are_pluggable() {
        let registry = Registry::new();
        let gauge = prometheus::IntGauge::new("agent_scrapes", "scrapes so far").unwrap();
        registry.register(Box::new(gauge.clone())).unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hits);
        let endpoints = Endpoints::new()
            .metrics("/metrics", registry, move || gauge.inc())
            .route("/health", move || {
                h.fetch_add(1, Ordering::Relaxed);
                Reply::text(StatusCode::OK, "OK")
            })
            .not_found("404 page not found\n");
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), endpoints).unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = Shutdown::new();
        shutdown.spawn(server.serve(shutdown.clone()));
        assert!(get(addr, "/metrics").await.contains("agent_scrapes 1"));
        assert!(get(addr, "/metrics").await.contains("agent_scrapes 2"));
        assert!(get(addr, "/health").await.ends_with("\r\n\r\nOK"));
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        assert!(get(addr, "/x").await.ends_with("404 page not found\n"));
        shutdown.stop_accepting();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_does_not_hold_the_drain() {
        let server = AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Endpoints::standard(Registry::new(), Health::default()),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = Shutdown::new();
        shutdown.spawn(server.serve(shutdown.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // The connection is idle and kept alive; a graceful stop closes it at once.
        shutdown.stop_accepting();
        let open = tokio::time::timeout(
            Duration::from_secs(5),
            shutdown.drain(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        assert_eq!(open, 0);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }
}
