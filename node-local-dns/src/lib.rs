//! node-local-dns: the DNS cache that runs on every shoot node, a drop-in for
//! k8s-dns-node-cache. This crate is being built bottom-up. Its sans-IO core:
//! [`wire`], which reads queries and turns upstream responses into cacheable wire images and
//! back into replies, and [`cache`], the cache policy (RFC 2308 negative caching, RFC 8767
//! serve-stale, prefetch, bounded memory) that takes `now` as an argument and never does I/O.
//! On top: [`forward`] (upstream queries with random IDs and ports, response validation, TCP
//! fallback) and [`server`] (UDP/TCP listeners, hits answered inline, single flight for misses).

pub mod cache;
pub mod config;
pub mod forward;
pub mod intercept;
pub mod server;
pub mod wire;
