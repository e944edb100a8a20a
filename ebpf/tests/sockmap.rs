//! Privileged: the socket splice on this kernel (needs root to load the program).
#![allow(clippy::unwrap_used)]

use agentkit::testing::require_privileges;
use ebpf::sockmap::{self, Splicer};

#[test]
fn self_test_passes_on_this_kernel() {
    if !require_privileges("self_test_passes_on_this_kernel") {
        return;
    }
    sockmap::kernel_supported().unwrap();
    let splicer = Splicer::load(1024).unwrap();
    splicer.self_test().unwrap();
    assert!(splicer.stat(sockmap::Stat::RedirectedBytes).unwrap() >= 2 << 20);
}
