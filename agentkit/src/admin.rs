//! The admin HTTP server every agent runs: `/metrics` (Prometheus text format from the agent's
//! registry), `/healthz` (the process is alive) and `/readyz` (the agent serves traffic; false
//! until the listeners are bound and again once shutdown starts, so load balancers stop
//! sending before connections drain).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::debug;

use crate::Shutdown;

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

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// A bound admin server; [`AdminServer::serve`] runs it until shutdown.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    registry: Registry,
    health: Health,
}

impl AdminServer {
    /// Binds the admin address (fails early, before the agent starts serving).
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        health: Health,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(AdminServer {
            listener,
            registry,
            health,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` stops accepting. Each request is answered from memory; an
    /// admin connection never outlives the shutdown's hard deadline.
    pub async fn serve(self, shutdown: Shutdown) {
        let state = Arc::new((self.registry, self.health));
        loop {
            let (stream, _) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        debug!(%error, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = shutdown.stopping() => return,
            };
            let state = Arc::clone(&state);
            let force = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(respond(&req, &state.0, &state.1)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    result = conn => if let Err(error) = result { debug!(%error, "admin connection failed") },
                    () = force.forced() => {}
                }
            });
        }
    }
}

fn respond<B>(req: &Request<B>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = Vec::with_capacity(16 * 1024);
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
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
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
    async fn endpoints() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("agent_test_total", "a test counter").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(7);
        let health = Health::default();
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), registry, health.clone())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(server.serve(shutdown.clone()));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("agent_test_total 7"), "{metrics}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        shutdown.stop_accepting();
    }
}
