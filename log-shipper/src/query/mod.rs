//! `log-shipper query`: the operators' command that reads a shoot's (or the seed's) logs back
//! from its store, Loki or Vali (LogQL over `/api/v1/query_range`) or VictoriaLogs (LogsQL over
//! `/select/logsql/query` and `/select/logsql/tail`).
//!
//! The sans-IO parts: [`time`] (durations, instants, RFC 3339), [`selector`] (the LogQL subset,
//! its LogsQL translation, the shoot's matcher), [`store`] (a URL to its query API and base),
//! [`response`] (answers to entries, output lines, the follow's de-duplication) and [`plan`]
//! (the flags checked and turned into what to ask). The IO part is [`client`]: HTTP GETs on
//! [`push`](crate::push)'s connection code, the range query, and the follow (VictoriaLogs'
//! streaming tail; for Loki a poll of `query_range` from the newest line printed, since Loki's
//! tail is a WebSocket and no WebSocket client is among the workspace's crates).

pub mod client;
pub mod plan;
pub mod response;
pub mod selector;
pub mod store;
pub mod time;

use std::path::PathBuf;
use std::process::ExitCode;

use thiserror::Error;

pub use plan::{plan, Plan};

/// The default `--limit`: Loki's default.
pub const DEFAULT_LIMIT: usize = 100;
/// The default range when neither `--since` nor `--from` is given.
pub const DEFAULT_SINCE: &str = "1h";

/// The store's query API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// Loki or Vali: LogQL over `/api/v1/query_range`.
    Loki,
    /// VictoriaLogs: LogsQL over `/select/logsql/query` and `tail`.
    Vlogs,
}

impl Api {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Loki => "loki",
            Api::Vlogs => "vlogs",
        }
    }
}

/// How lines are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// `<RFC 3339 time> <namespace>/<pod>/<container> <line>`.
    #[default]
    Text,
    /// One JSON object per line: `{"time", "labels", "line"}`.
    Json,
}

/// The flags of `log-shipper query`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// A LogQL stream selector with line filters, like `{container_name="etcd"} |= "error"`
    /// (for VictoriaLogs translated to LogsQL); with --api vlogs any other text is sent as
    /// LogsQL. Empty: every line (of the shoot, with --shoot).
    #[arg(value_name = "QUERY")]
    pub query: Option<String>,
    /// The store: its push URL or query base (`http://host:9428` needs --api).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The shoot `project/name`: its namespace `shoot--project--name` is added to the query,
    /// and with --config its store is the one queried.
    #[arg(long, value_name = "PROJECT/NAME")]
    pub shoot: Option<String>,
    /// The agent's config: the store is the shoot store's URL (with --shoot) or the seed's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The query API, when the URL does not tell.
    #[arg(long, value_enum)]
    pub api: Option<Api>,
    /// The range: this long until now (`15m`, `1h`, `2d`); 1h if no --from.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// The range's start (RFC 3339 or Unix seconds), inclusive.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// The range's end (RFC 3339 or Unix seconds), exclusive; now if absent.
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// The most lines printed: the newest of the range, oldest first.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    pub limit: usize,
    /// After the range, print new lines as they arrive, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// `text` or `json` (one object per line).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// A CA bundle (PEM) for an https store.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// Why a query failed; each is one line.
#[derive(Debug, Error)]
pub enum QueryError {
    /// Flags that do not go together, or a bad value.
    #[error("{0}")]
    Usage(String),
    /// The agent's config could not be read.
    #[error("{path}: {error}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        error: agentkit::config::ConfigError,
    },
    /// The CA bundle could not be read.
    #[error("--ca: {0}")]
    Tls(#[from] agentkit::tls::TlsError),
    /// No connection to the store.
    #[error("cannot reach the store at {url}: {error}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// Why (connection refused, ...).
        error: std::io::Error,
    },
    /// The store did not answer in time.
    #[error("the store at {url} did not answer within {seconds} s")]
    Timeout {
        /// The request's URL.
        url: String,
        /// The deadline.
        seconds: u64,
    },
    /// The connection failed during the exchange.
    #[error("the connection to {url} failed: {error}")]
    Io {
        /// The request's URL.
        url: String,
        /// Why.
        error: String,
    },
    /// The store refused the request (a bad query, a time range it does not allow): its status
    /// and its message.
    #[error("the store refused the query ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The store's message, on one line.
        message: String,
    },
    /// The answer could not be read.
    #[error(transparent)]
    Response(#[from] response::ResponseError),
    /// The follow's stream ended.
    #[error("the store at {0} ended the tail")]
    TailEnded(String),
}

/// Runs the command: prints to stdout, and an error as one line on stderr with exit code 1.
pub fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("log-shipper query: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client::run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("log-shipper query: {error}");
            ExitCode::FAILURE
        }
    }
}
