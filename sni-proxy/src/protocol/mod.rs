//! Sans-IO codecs for the first bytes of a client connection: the TLS ClientHello, the PROXY
//! protocol header (v1 and v2) and the HTTP CONNECT request head.
//!
//! Every parser here takes the bytes received so far and answers "need more bytes", a parsed
//! value, or an error. None of them ever touches a socket, tokio or a clock, so they can be
//! tested exhaustively (every split point, property tests) and fuzzed (see `fuzz/`).

pub mod client_hello;
/// The CONNECT head parser is shared with konnectivity's HTTP-CONNECT frontend.
pub use agentkit::http_connect;
pub mod proxy_protocol;
