//! In-kernel fast paths for the agents: eBPF programs written in C (`ebpf/bpf/`), compiled by
//! `ebpf/build.sh` into objects kept in `ebpf/obj/` (so that building needs no clang; CI checks
//! that they match the sources), loaded and attached with aya.
//!
//! - [`dns`]: DNS cache hits answered at XDP or tc ingress, from a map node-local-dns fills.
//! - [`sockmap`]: two TCP sockets spliced in the kernel for sni-proxy (sk_skb stream verdict).
//! - [`test_run`]: `BPF_PROG_TEST_RUN`, for tests and the nanoseconds-per-packet benchmark.
//! - [`link`]: interfaces and veth peers over rtnetlink (may XDP_TX reach a pod?).
//! - [`frame`]: Ethernet/IP/UDP frames built and checked in userspace, for both.
//!
//! Attachments are bpf links owned by the handle that made them: dropping the handle detaches
//! them, and so does the kernel when the process dies, so a crash never leaves a program
//! answering from a map that nobody keeps up to date.

pub mod dns;
pub mod frame;
pub mod link;
pub mod sockmap;
pub mod test_run;

/// What can go wrong loading, attaching or feeding a program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be loaded (the verifier's log is in the message).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("{what}: {source}")]
    Program {
        /// What we were doing ("attaching dns_xdp to eth0").
        what: String,
        /// Why it failed.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// What we were doing.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: aya::maps::MapError,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Something about the input cannot be mirrored or used (too long, too many records).
    #[error("{0}")]
    Unsupported(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether this process may create eBPF maps and so load programs (root, or CAP_BPF with
/// CAP_NET_ADMIN): a cheap probe for tests and start-up messages.
pub fn can_load() -> bool {
    test_run::probe_map_create()
}
