//! The demo of the workspace's agents and the Rust side of the benchmark harness. The
//! harness itself (`bench/harness/run.py`) drives the real binaries and the Debian peers;
//! this crate holds what is easier to write against the agents' libraries.
