//! Sans-IO codecs: the `Packet` message of upstream's proto ([`packet`]) and gRPC's
//! length-prefixed messages ([`grpc`]). No sockets, no runtime, no clock: tested at every
//! split point, with property tests, and fuzzed (`fuzz/`).

pub mod grpc;
pub mod packet;
