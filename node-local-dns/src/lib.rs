//! node-local-dns: the DNS cache that runs on every shoot node, a drop-in for
//! k8s-dns-node-cache (NodeLocal DNSCache).
//!
//! The sans-IO core: [`wire`] reads queries and turns upstream responses into cacheable wire
//! images and back into replies; [`cache`] is the cache policy (RFC 2308 negative caching,
//! RFC 8767 serve-stale, prefetch, SIEVE eviction, bounded memory), which takes `now` as an
//! argument and never does I/O. Configuration: [`flags`] parses node-cache's command line,
//! [`template`] renders its `__PILLAR__` Corefile template, [`corefile`] parses Corefile text
//! into the typed [`config`] model. On the network: [`forward`] (pooled, pipelined, health
//! checked upstreams), [`server`] (zones, single flight for misses, TCP), [`udp`] (the
//! batched UDP hot path and the port hand-over), [`metrics`] (CoreDNS's metric names, served
//! by agentkit's admin server), [`intercept`] (the `nodelocaldns` link and the iptables
//! rules), [`fast_path`] (the kernel's cache, mirrored from ours). [`app`] ties them into the
//! agent's life: start, intercept, serve, reload, repair, hand over; its parts are private and
//! its surface is [`app::run`] and [`app::load`].
//!
//! The layers are public modules because the integration tests, benches and fuzz targets
//! drive each one directly.

pub mod app;
pub mod cache;
pub mod config;
pub mod corefile;
pub mod fast_path;
pub mod flags;
pub mod forward;
pub mod intercept;
pub mod metrics;
pub mod server;
pub mod template;
pub mod udp;
pub mod wire;
