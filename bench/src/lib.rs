//! The demo of the workspace's agents and the Rust side of the benchmark harness. The
//! harness itself (the `bench.harness` Python package) drives the real binaries and the Debian peers;
//! this crate holds what is easier to write against the agents' libraries.
