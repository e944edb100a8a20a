//! The HTTP client of a store, Loki push API or OTLP/HTTP: one store, one HTTP/1.1 connection
//! kept alive and opened again when it is gone, one request at a time (the
//! [`deliver`](crate::deliver) policy sends batches one by one, and encodes them for the
//! store's protocol). It POSTs the body with `Content-Type: application/x-protobuf` and no
//! `Content-Encoding` (for Loki the body is raw Snappy: Loki, Vali and VictoriaLogs read it
//! so from the content type alone, `Content-Encoding: snappy` would only be tolerated; for
//! OTLP it is plain protobuf), the tenant in `X-Scope-OrgID` when configured (the config
//! allows one for Loki stores only), and returns the status with the start of the body, or a
//! [`TransportKind`]. An OTLP store's 2xx answer is read for its `partial_success`
//! ([`otlp::partial_success`]). The whole exchange
//! (connect, TLS, request, answer) has one deadline, `delivery.request_timeout`. `https` URLs
//! need a rustls client config (from `agentkit::tls`, which re-reads a rotated CA).
//!
//! The connection is driven inline, within [`Client::push`] (no task of its own): between
//! pushes nothing polls it, and a connection the server closed meanwhile is noticed before
//! the next use and replaced.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::Protocol;
use crate::deliver::{TransportKind, MAX_REASON_TEXT};
use crate::{loki, otlp};

/// The body of an answer kept for its reason (and logs); the rest is not read.
const MAX_ANSWER_BYTES: usize = MAX_REASON_TEXT;

/// Why a client cannot be made.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The URL is not `http://` or `https://` with a host.
    #[error("`{0}` is not an http:// or https:// URL with a host")]
    Url(String),
    /// An `https://` URL without a TLS config.
    #[error("`{0}` is https but no TLS client config was given")]
    NoTls(String),
    /// The tenant is not a header value.
    #[error("tenant `{0}` is not a header value")]
    Tenant(String),
}

/// The answer of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A status and the start of the body (at most [`MAX_REASON_TEXT`] bytes, lossy UTF-8).
    Status(u16, String),
    /// An OTLP store's 2xx with a `partial_success` that says something.
    Partial(u16, otlp::PartialSuccess),
    /// No answer.
    Transport(TransportKind),
}

impl Answer {
    /// As the policy takes it.
    pub fn as_response(&self) -> crate::deliver::Response<'_> {
        match self {
            Answer::Status(code, body) => crate::deliver::Response::Status(*code, body),
            Answer::Partial(_, partial) => crate::deliver::Response::Partial {
                rejected: partial.rejected,
                message: &partial.message,
            },
            Answer::Transport(kind) => crate::deliver::Response::Transport(*kind),
        }
    }
}

pub(crate) type Connection = http1::Connection<TokioIo<Box<dyn Io>>, Full<Bytes>>;

/// A byte stream: TCP or TLS over TCP.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Where an `http://` or `https://` URL connects to: host, port, the `Host` header and, for
/// `https`, the TLS connector. Shared by the push client and the query command.
pub(crate) struct Origin {
    host: String,
    port: u16,
    authority: HeaderValue,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// An HTTP/1.1 connection of an [`Origin`]: the request sender and the connection future,
/// which the caller drives (no task of its own).
pub(crate) type Conn = (http1::SendRequest<Full<Bytes>>, Connection);

impl Origin {
    /// The origin of `uri` (parsed from `url`, which errors name); `https` needs `tls`.
    pub(crate) fn new(
        uri: &Uri,
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Origin, ClientError> {
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(ClientError::Url(url.into())),
        };
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Url(url.into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let tls = match (https, tls) {
            (false, _) => None,
            (true, Some(config)) => Some(tokio_rustls::TlsConnector::from(config)),
            (true, None) => return Err(ClientError::NoTls(url.into())),
        };
        Ok(Origin {
            host,
            port,
            authority,
            tls,
        })
    }

    /// The `Host` header's value.
    pub(crate) fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    /// Opens a connection: TCP, TLS for `https`, the HTTP/1.1 handshake. The error says why
    /// (`connection refused`, a TLS alert, ...).
    pub(crate) async fn connect(&self) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        http1::handshake(TokioIo::new(io))
            .await
            .map_err(std::io::Error::other)
    }
}

/// A push client of one store URL.
pub struct Client {
    uri: Uri,
    origin: Origin,
    tenant: Option<HeaderValue>,
    timeout: Duration,
    protocol: Protocol,
    retry_after: Option<Duration>,
    conn: Option<(http1::SendRequest<Full<Bytes>>, Connection)>,
    connects: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.uri)
            .field("protocol", &self.protocol)
            .field("tenant", &self.tenant)
            .field("tls", &self.origin.tls.is_some())
            .field("timeout", &self.timeout)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Client {
    /// A client of `url` (a rendered store URL) speaking the Loki push API, with an optional
    /// tenant, the request deadline and, for `https`, a TLS config.
    pub fn new(
        url: &str,
        tenant: Option<&str>,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.into()))?;
        let origin = Origin::new(&uri, url, tls)?;
        let tenant = tenant
            .map(|t| HeaderValue::from_str(t).map_err(|_| ClientError::Tenant(t.into())))
            .transpose()?;
        Ok(Client {
            uri,
            origin,
            tenant,
            timeout,
            protocol: Protocol::Loki,
            retry_after: None,
            conn: None,
            connects: 0,
        })
    }

    /// The same client for a store of `protocol` (bodies as the policy of that protocol
    /// encodes them; an OTLP answer read for its `partial_success`).
    pub fn with_protocol(mut self, protocol: Protocol) -> Client {
        self.protocol = protocol;
        self
    }

    /// The `Retry-After` of the last push's answer, if it had one in seconds (an HTTP date is
    /// not read).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// POSTs one push body and returns what came back, within the deadline.
    pub async fn push(&mut self, body: Bytes) -> Answer {
        self.retry_after = None;
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.conn = None;
                Answer::Transport(TransportKind::Timeout)
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Answer {
        // A kept connection that the server closed (or that failed) is replaced first.
        if let Some((sender, conn)) = &mut self.conn {
            if sender.is_closed() || (&mut *conn).now_or_never().is_some() {
                self.conn = None;
            }
        }
        let (mut sender, mut conn) = match self.conn.take() {
            Some(pair) => pair,
            None => match self.connect().await {
                Ok(pair) => pair,
                Err(kind) => return Answer::Transport(kind),
            },
        };
        let request = match self.request(body) {
            Ok(r) => r,
            Err(_) => return Answer::Transport(TransportKind::Io),
        };
        let exchange = async {
            sender.ready().await.map_err(|_| TransportKind::Io)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|_| TransportKind::Io)?;
            let status = response.status().as_u16();
            let retry_after = response.headers().get(RETRY_AFTER).and_then(retry_after);
            let mut body = response.into_body();
            let mut text = Vec::new();
            let mut complete = true;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| TransportKind::Io)?;
                if let Some(data) = frame.data_ref() {
                    let room = MAX_ANSWER_BYTES - text.len();
                    text.extend_from_slice(&data[..data.len().min(room)]);
                    if text.len() == MAX_ANSWER_BYTES {
                        complete = false;
                        break;
                    }
                }
            }
            Ok::<_, TransportKind>((status, retry_after, text, complete))
        };
        let (result, closed) = {
            let mut exchange = std::pin::pin!(exchange);
            tokio::select! {
                biased;
                result = &mut exchange => (result, false),
                // The connection ended (closed by the server after its answer, or failed):
                // what it delivered before is still there for the exchange, which ends now
                // either way.
                _ = &mut conn => (exchange.await, true),
            }
        };
        match result {
            Ok((status, retry_after, text, complete)) => {
                self.retry_after = retry_after;
                if complete && !closed {
                    self.conn = Some((sender, conn));
                }
                if self.protocol == Protocol::Otlp && (200..300).contains(&status) {
                    if let Some(partial) = otlp::partial_success(&text) {
                        return Answer::Partial(status, partial);
                    }
                }
                Answer::Status(status, String::from_utf8_lossy(&text).into_owned())
            }
            Err(kind) => Answer::Transport(kind),
        }
    }

    /// Connections opened (attempts included): 1 for any number of pushes while the store
    /// keeps the connection alive.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    async fn connect(
        &mut self,
    ) -> Result<(http1::SendRequest<Full<Bytes>>, Connection), TransportKind> {
        self.connects += 1;
        self.origin
            .connect()
            .await
            .map_err(|_| TransportKind::Connect)
    }

    fn request(&self, body: Bytes) -> Result<http::Request<Full<Bytes>>, http::Error> {
        let target = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut builder = http::Request::builder()
            .method(Method::POST)
            .uri(target)
            .header(HOST, self.origin.authority.clone())
            .header(
                CONTENT_TYPE,
                match self.protocol {
                    Protocol::Loki => loki::CONTENT_TYPE,
                    Protocol::Otlp => otlp::CONTENT_TYPE,
                },
            )
            .header(CONTENT_LENGTH, body.len())
            .header(
                USER_AGENT,
                concat!("log-shipper/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(tenant) = &self.tenant {
            builder = builder.header(loki::TENANT_HEADER, tenant.clone());
        }
        builder.body(Full::new(body))
    }
}

/// A `Retry-After` value in seconds (`delay-seconds`; an HTTP date is not read: `None`).
fn retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)))
}

/// One step of a store's sender, the IO half of [`Policy`](crate::deliver::Policy): makes
/// the push that is due now, if any, and returns its outcome (`None`: nothing was due; wait
/// until [`Policy::next_wakeup`](crate::deliver::Policy::next_wakeup) or new entries).
/// Rejections and skips are logged here, at `warn`: they are the lines a store will not have.
pub async fn send_due(
    policy: &mut crate::deliver::Policy,
    client: &mut Client,
) -> Option<crate::deliver::Outcome> {
    use crate::deliver::Outcome;
    let request = policy.poll_transmit(std::time::Instant::now())?;
    let answer = client.push(request.body.clone()).await;
    let outcome = policy.on_response_after(
        answer.as_response(),
        client.retry_after(),
        std::time::Instant::now(),
    );
    match (&outcome, &answer) {
        (Outcome::Rejected { reason, done, .. }, Answer::Status(_, text)) => tracing::warn!(
            reason = reason.as_str(),
            entries = done.entries,
            store = %client.uri,
            answer = %text,
            "store refused a batch (400), not retried"
        ),
        (
            Outcome::Rejected {
                reason,
                rejected,
                done,
            },
            Answer::Partial(_, partial),
        ) => {
            tracing::warn!(
                reason = reason.as_str(),
                rejected,
                entries = done.entries,
                store = %client.uri,
                answer = %partial.message,
                "store refused part of a batch (OTLP partial success), not retried"
            )
        }
        (Outcome::Accepted(_), Answer::Partial(_, partial)) => tracing::warn!(
            store = %client.uri,
            answer = %partial.message,
            "store accepted a batch with a warning (OTLP partial success)"
        ),
        (Outcome::Skipped(done), _) => tracing::warn!(
            entries = done.entries,
            store = %client.uri,
            "store down longer than delivery.max_outage: batch skipped"
        ),
        (Outcome::Retry { kind, .. }, _) => tracing::debug!(
            kind = kind.as_str(),
            attempt = request.attempt,
            store = %client.uri,
            "push failed, retrying"
        ),
        _ => {}
    }
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_only() {
        let parse = |text: &'static str| retry_after(&HeaderValue::from_static(text));
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        for text in ["", "-1", "1.5", "Wed, 21 Oct 2026 07:28:00 GMT"] {
            assert_eq!(parse(text), None, "{text}");
        }
    }
}
