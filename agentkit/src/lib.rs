//! Plumbing every agent of this workspace needs, and nothing agent-specific: the admin HTTP
//! server (`/metrics`, `/healthz`, `/readyz`), tracing setup, YAML config loading with errors
//! that name the bad field, graceful shutdown, hot reload, and rustls configuration.
//!
//! It is its own crate so that sni-proxy, konnectivity, node-local-dns and log-shipper behave
//! alike to an operator (same signals, same endpoints, same log format) without copying code.
//! With the `test-support` feature it also carries the test fixtures (a CA, TLS servers, the
//! privileged-test gate) that the agents' integration tests, the demo and the bench share.

pub mod admin;
pub mod config;
pub mod log;
pub mod reload;
pub mod rlimit;
pub mod shutdown;
pub mod tls;

#[cfg(feature = "test-support")]
pub mod testing;

pub use admin::Health;
pub use config::ConfigError;
pub use shutdown::Shutdown;
