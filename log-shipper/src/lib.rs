//! log-shipper: container logs from every node of a Gardener seed to each shoot's log store,
//! at least once. It tails the CRI log files under `/var/log/pods`, joins partial lines,
//! routes each `shoot--*` namespace's lines to that shoot's store (the rest to the seed's) and
//! pushes them with the Loki push API or OTLP, advancing a file's checkpoint only past what a
//! store acknowledged.
//!
//! It is its own crate, like every agent: a DaemonSet with its own config, metrics and
//! release cycle, sharing only plumbing (`agentkit`). The sans-IO parts: the CRI reader
//! ([`cri`]), the routing per shoot ([`route`]), the request encodings, Loki push ([`loki`]) and
//! OTLP/HTTP logs ([`otlp`]), and the delivery policy of one store ([`deliver`]). The IO parts: the tailer that follows the
//! kubelet's files and rotation ([`tail`]) with its crash-safe per-file checkpoints
//! ([`checkpoint`]), the HTTP client ([`push`]), and the agent that wires them ([`run`]), with
//! its [`metrics`] and [`config`]: with the shoot lifecycle from `Cluster` resources
//! ([`lifecycle`]) and the joining of two stores' acknowledgements ([`fanout`]). The operators'
//! `log-shipper query` command is [`query`].

pub mod checkpoint;
pub mod config;
pub mod cri;
pub mod deliver;
pub mod fanout;
pub mod lifecycle;
pub mod loki;
pub mod metrics;
pub mod otlp;
pub mod push;
pub mod query;
pub mod route;
pub mod run;
pub mod tail;

pub use config::Config;

/// The hash map of the paths taken once per line (files in flight, stores, routes, streams of
/// a batch): foldhash, several times faster than SipHash on such short keys. Its keys are
/// file identities, namespaces and label sets, which no client of the agent chooses.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
