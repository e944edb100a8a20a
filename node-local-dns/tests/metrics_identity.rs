//! The request metrics add up, as an operator reads them from `/metrics`: per zone,
//! `coredns_dns_requests_total` = `coredns_cache_hits_total` + `coredns_cache_misses_total`,
//! and `coredns_dns_requests_total` = `coredns_dns_responses_total`, after a burst of hits
//! and misses (success and denial) in two zones. The real binary, without the kernel fast
//! path (unprivileged); `fast_path_netns.rs` checks the same identities with it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{ask, http_get, query, Agent, Authority};
use node_local_dns::wire::rtype;

/// The sum of a metric's samples whose line contains every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Asserts the identities for `zone` in `text`; returns its requests.
pub fn assert_identities(text: &str, zone: &str) -> u64 {
    let z = format!("zone=\"{zone}\"");
    let zs = format!("zones=\"{zone}\"");
    let requests = metric(text, "coredns_dns_requests_total", &[&z]);
    let responses = metric(text, "coredns_dns_responses_total", &[&z]);
    let hits = metric(text, "coredns_cache_hits_total", &[&zs]);
    let misses = metric(text, "coredns_cache_misses_total", &[&zs]);
    let cache_requests = metric(text, "coredns_cache_requests_total", &[&zs]);
    assert_eq!(
        requests,
        hits + misses,
        "{zone}: requests = hits + misses\n{text}"
    );
    assert_eq!(
        cache_requests, requests,
        "{zone}: cache requests = requests"
    );
    assert_eq!(responses, requests, "{zone}: one response per request");
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_hits_plus_misses_per_zone() {
    let dir = common::temp_dir("identity");
    let upstream_addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let _upstream = Authority::start(upstream_addr, 300).await;
    let port = common::free_port();
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let health = common::free_port().to_string();
    let setup = format!("127.0.0.1:{}", common::free_port());
    let mut corefile = String::new();
    for zone in ["a.test", "b.test"] {
        corefile.push_str(&format!(
            "{zone}:{port} {{\n    cache 30\n    bind 127.0.0.1\n    forward . {upstream_addr}\n    prometheus {metrics}\n}}\n"
        ));
    }
    std::fs::write(dir.join("Corefile"), corefile).unwrap();
    let mut agent = Agent::start(&dir, &common::loopback_args("Corefile", &health, &setup));
    agent.wait_serving().await;
    let dns: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut id = 0u16;
    for (zone, names) in [("a.test", 5), ("b.test", 3)] {
        for n in 0..names {
            for name in [format!("n{n}.{zone}"), format!("nx{n}.{zone}")] {
                for _ in 0..4 {
                    id += 1;
                    ask(dns, &query(id, &name, rtype::A), Duration::from_secs(3))
                        .await
                        .expect("answer");
                }
            }
        }
    }
    let text = http_get(metrics.parse().unwrap(), "/metrics").await;
    assert_eq!(assert_identities(&text, "a.test."), 5 * 2 * 4);
    assert_eq!(assert_identities(&text, "b.test."), 3 * 2 * 4);
    let misses = metric(&text, "coredns_cache_misses_total", &["zones=\"a.test.\""]);
    assert_eq!(misses, 5 * 2, "one miss per name, then hits");
    let status = agent.terminate().await;
    assert!(status.success(), "{status}: {}", agent.log());
}
