//! The hit path allocates nothing (ARCHITECTURE.md's invariant): `Server::try_cached`, the
//! call the UDP workers make for every query, is counted by a global allocator while it
//! answers cached names in every spelling, with and without EDNS, metrics on.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use node_local_dns::cache::{Key, Policy};
use node_local_dns::config::Forward;
use node_local_dns::forward::Forwarder;
use node_local_dns::metrics::Metrics;
use node_local_dns::server::{Served, Server, Zone};
use node_local_dns::wire::testing::ResponseBuilder;
use node_local_dns::wire::{build_query, parse_query, parse_response, rtype, Edns};

/// Counts the allocations of the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread being torn down has no counter left, and needs none.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const ZONE: &str = "cluster.local.";
const NAME: &str = "kubernetes.default.svc.cluster.local.";

fn query(id: u16, name: &str, edns: Option<Edns>) -> Vec<u8> {
    let mut q = Vec::new();
    build_query(id, name, rtype::A, edns, &mut q);
    q
}

#[test]
fn a_cache_hit_allocates_nothing() {
    let zone = Arc::new(Zone::new(
        ZONE,
        Policy::default(),
        Forwarder::new(&Forward::new(ZONE.to_owned(), Vec::new())),
    ));
    let stored = query(1, NAME, None);
    let parsed = parse_query(&stored).unwrap();
    let response = ResponseBuilder::new(&stored)
        .answer(NAME, rtype::A, 300, &[10, 0, 0, 1])
        .build();
    let (info, image) = parse_response(&parsed, &response).unwrap();
    zone.cache()
        .lock()
        .unwrap()
        .insert(Key::of(&parsed), &info, image, Instant::now())
        .unwrap();
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let served = Served {
        zone: Arc::clone(&zone),
        metrics: Some(metrics.zone("dns://127.0.0.1:53", ZONE)),
    };
    let server = Server::with_metrics(
        vec![served],
        Some(metrics),
        false,
        &agentkit::Shutdown::new(),
    );

    let edns = Edns {
        udp_size: 1232,
        version: 0,
        dnssec_ok: false,
    };
    let queries: Vec<Vec<u8>> = (0..64u16)
        .map(|i| {
            let spelling = if i % 2 == 0 {
                NAME.to_owned()
            } else {
                NAME.to_uppercase()
            };
            query(i, &spelling, (i % 4 < 2).then_some(edns))
        })
        .collect();
    // The reply buffer is the worker's, sized once.
    let mut out = Vec::with_capacity(4096);
    assert!(server.try_cached(&queries[0], &mut out), "not a hit");

    let before = allocations();
    for q in queries.iter().cycle().take(10_000) {
        out.clear();
        assert!(server.try_cached(q, &mut out));
    }
    let hits = allocations() - before;
    assert_eq!(hits, 0, "{hits} allocations in 10,000 cache hits");
    // The answers are real: the ID is the query's, the name is echoed as asked.
    out.clear();
    assert!(server.try_cached(&queries[1], &mut out));
    assert_eq!(out[..2], queries[1][..2]);
    assert!(out.windows(10).any(|w| w == b"KUBERNETES"));
}
