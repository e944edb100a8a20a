//! konnectivity: the reverse tunnel from the seed's control plane to the shoot's nodes,
//! wire-compatible with kubernetes-sigs/apiserver-network-proxy.
//!
//! kube-apiserver's egress dialer reaches the [`server`] (gRPC or HTTP CONNECT, on a UDS or
//! TCP+mTLS); [`agent`]s on the nodes dial out to the server and carry each tunnel to its
//! destination. Upstream's wire protocol ([`proto`], [`transport`]) is kept byte for byte, so
//! either side drops in beside upstream peers; what upstream lacks, per-tunnel isolation
//! ([`tunnel`]), is built in, and between our own server and agent a negotiated extension adds
//! per-tunnel flow control and half-close, or a QUIC transport ([`quic`]) with a stream per
//! tunnel.
//!
//! Code map: `proto/` sans-IO codecs (the `Packet` message, gRPC framing); `transport`
//! packets over HTTP/2 (or QUIC control) streams; `quic` the QUIC transport; `tunnel`
//! per-tunnel queues and credit; `server/` (agent plane, frontends, dial, backends and
//! strategies, TokenReview auth); `agent/` (server streams, sync loop, dials); `flags`
//! upstream's command lines; `metrics` upstream's names.

pub mod agent;
pub mod flags;
pub mod metrics;
pub mod proto;
pub mod quic;
pub mod server;
pub mod transport;
pub mod tunnel;

use agentkit::sync::lock;
