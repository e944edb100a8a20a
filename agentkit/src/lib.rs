//! Plumbing every agent of this workspace needs, and nothing agent-specific: the admin HTTP
//! server with pluggable endpoints ([`admin`]), the binary's `main` ([`process`]: logging,
//! descriptor limit, runtime, signals, exit codes), the socket binder ([`net`]), hot reload
//! ([`reload`]), graceful shutdown and the task tracker every task is spawned on
//! ([`shutdown`]), poison-free locking ([`sync`]), YAML config loading with errors that name
//! the bad field ([`config`]), tracing setup ([`log`]), rustls configuration ([`tls`]), the sans-IO HTTP CONNECT request parser of the proxies'
//! CONNECT frontends ([`http_connect`]), rtnetlink requests and replies ([`netlink`]) and,
//! with the `kube` feature, the Kubernetes API client ([`kube`](crate::kube)).
//!
//! It is its own crate so that sni-proxy, konnectivity, node-local-dns and log-shipper behave
//! alike to an operator (same signals, same endpoints, same log format) without copying code.
//! With the `test-support` feature it also carries the test fixtures (a CA, TLS servers, the
//! privileged-test gate) that the agents' integration tests, the demo and the bench share.

pub mod admin;
pub mod config;
pub mod http_connect;
#[cfg(feature = "kube")]
pub mod kube;
pub mod log;
pub mod net;
pub mod netlink;
pub mod process;
pub mod protobuf;
pub mod reload;
pub mod shutdown;
pub mod sync;
pub mod tls;

#[cfg(feature = "test-support")]
pub mod testing;

pub use admin::{Endpoints, Health};
pub use config::ConfigError;
pub use shutdown::Shutdown;
