//! The HTTP endpoints: `/metrics` on every `prometheus` address, `/health` (and our `/ready`)
//! on every `health` address, node-cache's setup-error metrics on `-metrics-listen-address`.
//! Every listener is bound with SO_REUSEPORT, so a second instance can start beside this one
//! during a rolling update with `maxSurge` (node-cache's 9353 port blocks that, issue
//! kubernetes/dns#667).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::debug;

/// What one address serves.
#[derive(Clone)]
pub struct Endpoints {
    /// `/metrics` from this registry, after running `before_scrape` (which refreshes gauges).
    pub metrics: Option<(Registry, Arc<dyn Fn() + Send + Sync>)>,
    /// `/health` answers 200 `OK` while the process runs (CoreDNS's `health`); `/ready`
    /// answers 200 only while this flag is set.
    pub health: Option<Arc<AtomicBool>>,
    /// Observes `/health` request durations.
    pub health_duration: Option<prometheus::Histogram>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("metrics", &self.metrics.is_some())
            .field("health", &self.health.is_some())
            .finish()
    }
}

/// Binds a TCP listener with SO_REUSEADDR and SO_REUSEPORT.
pub fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    let endpoints = Arc::new(endpoints);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let endpoints = Arc::clone(&endpoints);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoints = Arc::clone(&endpoints);
                async move { Ok::<_, Infallible>(respond(&req, &endpoints)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            // A client that never finishes its request cannot hold the task for long.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn respond<B>(req: &Request<B>, endpoints: &Endpoints) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match (req.uri().path(), &endpoints.metrics, &endpoints.health) {
        ("/metrics", Some((registry, before_scrape)), _) => {
            before_scrape();
            let mut body = Vec::with_capacity(32 * 1024);
            let encoder = TextEncoder::new();
            if let Err(error) = encoder.encode(&registry.gather(), &mut body) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n"));
            }
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = encoder.format_type().parse() {
                resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            resp
        }
        ("/health", _, Some(_)) => {
            let start = Instant::now();
            let resp = text(StatusCode::OK, "OK");
            if let Some(h) = &endpoints.health_duration {
                h.observe(start.elapsed().as_secs_f64());
            }
            resp
        }
        ("/ready", _, Some(ready)) if ready.load(Ordering::Acquire) => text(StatusCode::OK, "OK"),
        ("/ready", _, Some(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
