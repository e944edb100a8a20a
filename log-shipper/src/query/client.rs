//! The IO of the query command: HTTP/1.1 GETs on [`push`](crate::push)'s connection code (one
//! connection per request, driven inline), the range query, and the follow.
//!
//! The follow of VictoriaLogs reads `/select/logsql/tail`, a stream of JSON lines that the
//! store writes as its lines arrive (it shows a line once its time is about 5 s old, its
//! `offset`). Loki's tail is a WebSocket and no WebSocket client is among the workspace's
//! crates, so the follow of Loki polls `query_range` every [`FOLLOW_POLL_INTERVAL`] forward from
//! the newest line printed (a line that reaches Loki later with an older time is not shown).
//! Both drop what was printed already ([`Dedup`]).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCEPT, HOST, USER_AGENT};
use http::{HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::Config;
use crate::loki::TENANT_HEADER;
use crate::push::{Connection, Origin};

use super::plan::{plan, Plan};
use super::response::{
    json_line, keep_newest, parse_loki, parse_vlogs_line, sort_oldest_first, text_line, Dedup,
    Entry,
};
use super::{Api, Args, Output, QueryError};

/// The deadline of a range query, connect to the last byte.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// The deadline of a tail's connect and answer head.
pub const TAIL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often Loki is asked for new lines in a follow.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The largest answer read (a range of `--limit` long lines).
pub const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;
/// The most of an error answer kept for the message.
const MAX_ERROR_BYTES: usize = 4096;

/// Runs the command for `args`: the range, then the follow if asked.
pub async fn run(args: &Args) -> Result<(), QueryError> {
    let config = match &args.config {
        Some(path) => {
            let path = path.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                Config::load(&path).map_err(|error| QueryError::Config { path, error })
            })
            .await
            .map_err(|e| QueryError::Usage(format!("loading the config: {e}")))??;
            Some(loaded)
        }
        None => None,
    };
    let tls = match &args.ca {
        Some(ca) => Some(agentkit::tls::client_config(ca)?),
        None => None,
    };
    let plan = plan(args, config.as_ref(), now())?;
    let origin_uri: Uri = plan
        .store
        .base
        .parse()
        .map_err(|_| QueryError::Usage(format!("`{}` is not a URL", plan.store.base)))?;
    let origin = Origin::new(&origin_uri, &plan.store.base, tls).map_err(|e| {
        QueryError::Usage(match e {
            crate::push::ClientError::NoTls(url) => {
                format!("`{url}` is https: give its CA bundle with --ca FILE")
            }
            other => other.to_string(),
        })
    })?;
    let tenant = plan
        .tenant
        .as_deref()
        .map(|t| {
            HeaderValue::from_str(t)
                .map_err(|_| QueryError::Usage(format!("tenant `{t}` is not a header value")))
        })
        .transpose()?;
    let client = Client {
        origin,
        tenant,
        base: plan.store.base.clone(),
    };
    let mut out = Printer::new(plan.output);

    let url = plan.range_url();
    let body = client.get_all(&url).await?;
    let mut entries = match plan.store.api {
        Api::Loki => {
            let mut entries = parse_loki(&body)?;
            // Backward: newest first in each stream; reversed, a stable sort keeps a stream's
            // lines of one time in their order.
            entries.reverse();
            entries
        }
        Api::Vlogs => {
            let mut entries = Vec::new();
            for line in body.split(|&b| b == b'\n') {
                entries.extend(parse_vlogs_line(line)?);
            }
            entries
        }
    };
    sort_oldest_first(&mut entries);
    keep_newest(&mut entries, plan.limit);
    if !out.print(&entries) || !plan.follow {
        return Ok(());
    }
    match plan.store.api {
        Api::Vlogs => follow_vlogs(&client, &plan, &entries, &mut out).await,
        Api::Loki => follow_loki(&client, &plan, &entries, &mut out).await,
    }
}

async fn follow_vlogs(
    client: &Client,
    plan: &Plan,
    printed: &[Entry],
    out: &mut Printer,
) -> Result<(), QueryError> {
    let mut dedup = Dedup::after(printed, false);
    let url = plan.tail_url();
    let mut answer = tokio::time::timeout(TAIL_CONNECT_TIMEOUT, client.get(&url))
        .await
        .map_err(|_| QueryError::Timeout {
            url: url.clone(),
            seconds: TAIL_CONNECT_TIMEOUT.as_secs(),
        })??;
    if answer.status != 200 {
        return Err(answer.refused().await);
    }
    let mut pending = Vec::new();
    loop {
        let Some(chunk) = answer.chunk().await.map_err(|error| QueryError::Io {
            url: url.clone(),
            error,
        })?
        else {
            return Err(QueryError::TailEnded(url));
        };
        pending.extend_from_slice(&chunk);
        let Some(last) = pending.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let mut entries = Vec::new();
        for line in pending[..last].split(|&b| b == b'\n') {
            if let Some(entry) = parse_vlogs_line(line)? {
                if dedup.admit(&entry) {
                    entries.push(entry);
                }
            }
        }
        pending.drain(..=last);
        if !out.print(&entries) {
            return Ok(());
        }
    }
}

async fn follow_loki(
    client: &Client,
    plan: &Plan,
    printed: &[Entry],
    out: &mut Printer,
) -> Result<(), QueryError> {
    let mut dedup = Dedup::after(printed, true);
    let mut start = dedup.mark().unwrap_or(plan.end);
    loop {
        tokio::time::sleep(FOLLOW_POLL_INTERVAL).await;
        loop {
            let end = now();
            let url = plan.poll_url(start, end.max(start + 1));
            let body = client.get_all(&url).await?;
            let mut entries = parse_loki(&body)?;
            let full = entries.len() >= plan.limit;
            sort_oldest_first(&mut entries);
            entries.retain(|e| dedup.admit(e));
            if !out.print(&entries) {
                return Ok(());
            }
            start = dedup.mark().unwrap_or(start);
            // A full page: more may be there at once.
            if !full || entries.is_empty() {
                break;
            }
        }
    }
}

/// Unix nanoseconds now.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Lines to stdout, flushed per batch; `false` once stdout is gone (a closed pipe), which ends
/// the command quietly.
struct Printer {
    output: Output,
    stdout: std::io::Stdout,
}

impl Printer {
    fn new(output: Output) -> Printer {
        Printer {
            output,
            stdout: std::io::stdout(),
        }
    }

    fn print(&mut self, entries: &[Entry]) -> bool {
        let mut text = String::new();
        for entry in entries {
            text.push_str(&match self.output {
                Output::Text => text_line(entry),
                Output::Json => json_line(entry),
            });
            text.push('\n');
        }
        let mut lock = self.stdout.lock();
        lock.write_all(text.as_bytes())
            .and_then(|()| lock.flush())
            .is_ok()
    }
}

struct Client {
    origin: Origin,
    tenant: Option<HeaderValue>,
    /// The store's query base, which a connection error names.
    base: String,
}

/// An answer whose body is read as it comes, the connection driven meanwhile.
struct Answer {
    status: u16,
    body: Incoming,
    conn: Option<Connection>,
}

impl Answer {
    /// The next piece of the body; `None` at its end.
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let frame = match &mut self.conn {
                Some(conn) => tokio::select! {
                    biased;
                    frame = self.body.frame() => frame,
                    // The connection ended: what it delivered is still in the body.
                    _ = conn => {
                        self.conn = None;
                        continue;
                    }
                },
                None => self.body.frame().await,
            };
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, at most `max` bytes.
    async fn all(&mut self, max: usize) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if body.len() + chunk.len() > max {
                body.extend_from_slice(&chunk[..max - body.len()]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A non-200 answer as the error it is: the store's message on one line.
    async fn refused(mut self) -> QueryError {
        let body = self.all(MAX_ERROR_BYTES).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let message = text.split_whitespace().collect::<Vec<_>>().join(" ");
        QueryError::Refused {
            status: self.status,
            message,
        }
    }
}

impl Client {
    /// Sends a GET of `url` (of this origin) and returns the answer once its head is there.
    async fn get(&self, url: &str) -> Result<Answer, QueryError> {
        let target = url
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.path_and_query().map(|p| p.as_str().to_owned()))
            .ok_or_else(|| QueryError::Usage(format!("`{url}` is not a URL")))?;
        let (mut sender, mut conn) =
            self.origin
                .connect()
                .await
                .map_err(|error| QueryError::Unreachable {
                    url: self.base.clone(),
                    error,
                })?;
        let mut request = http::Request::builder()
            .method(Method::GET)
            .uri(target)
            .header(HOST, self.origin.authority().clone())
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("log-shipper/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(tenant) = &self.tenant {
            request = request.header(TENANT_HEADER, tenant.clone());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| QueryError::Usage(format!("`{url}`: {e}")))?;
        let io = |error: &dyn std::fmt::Display| QueryError::Io {
            url: url.to_owned(),
            error: error.to_string(),
        };
        let exchange = async {
            sender.ready().await?;
            sender.send_request(request).await
        };
        let mut exchange = std::pin::pin!(exchange);
        let head = tokio::select! {
            biased;
            response = &mut exchange => Ok(response),
            ended = &mut conn => Err(ended),
        };
        let (response, conn) = match head {
            Ok(response) => (response.map_err(|e| io(&e))?, Some(conn)),
            // The connection ended before the head: whatever it delivered is there.
            Err(ended) => {
                let response = exchange.await.map_err(|e| match ended {
                    Err(ended) => io(&ended),
                    Ok(()) => io(&e),
                })?;
                (response, None)
            }
        };
        Ok(Answer {
            status: response.status().as_u16(),
            body: response.into_body(),
            conn,
        })
    }

    /// A GET whose answer must be 200: its whole body, within [`QUERY_TIMEOUT`].
    async fn get_all(&self, url: &str) -> Result<Vec<u8>, QueryError> {
        let get = async {
            let mut answer = self.get(url).await?;
            if answer.status != 200 {
                return Err(answer.refused().await);
            }
            answer
                .all(MAX_ANSWER_BYTES)
                .await
                .map_err(|error| QueryError::Io {
                    url: url.to_owned(),
                    error,
                })
        };
        tokio::time::timeout(QUERY_TIMEOUT, get)
            .await
            .map_err(|_| QueryError::Timeout {
                url: url.to_owned(),
                seconds: QUERY_TIMEOUT.as_secs(),
            })?
    }
}
