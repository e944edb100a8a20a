//! The real binary with node-cache's command line: the issue's example as written, the
//! endpoints and metric names dashboards use, config errors, reloads and restarts under load
//! without a lost query, and loop detection.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ancount, ask, ask_tcp, http_get, query, rcode_of, Agent, Authority};
use node_local_dns::wire::{rcode, rtype};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issue_example_works_as_written() {
    let dir = common::temp_dir("example");
    let corefile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/example.Corefile")).unwrap();
    assert!(corefile.contains("forward . 127.0.1.1:5353"), "{corefile}");
    std::fs::write(dir.join("Corefile"), &corefile).unwrap();
    let upstream = Authority::start("127.0.1.1:5353".parse().unwrap(), 300).await;
    let mut agent = Agent::start(
        &dir,
        &[
            "-localip",
            "127.0.0.1",
            "-conf",
            "Corefile",
            "-setupinterface=false",
            "-setupiptables=false",
            "-health-port",
            "18080",
        ],
    );
    agent.wait_serving().await;
    let dns: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    for id in 1..=3u16 {
        let reply = ask(
            dns,
            &query(id, "www.Bench.Test", rtype::A),
            Duration::from_secs(3),
        )
        .await
        .expect("answer");
        assert_eq!(rcode_of(&reply), rcode::NOERROR);
        assert_eq!(ancount(&reply), 1);
    }
    assert_eq!(
        upstream.queries.load(Ordering::SeqCst),
        1,
        "a miss, then hits"
    );
    let reply = ask_tcp(dns, &query(4, "nxname.bench.test", rtype::A)).await;
    assert_eq!(rcode_of(&reply), rcode::NXDOMAIN);
    let outside = ask(
        dns,
        &query(5, "example.org", rtype::A),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(rcode_of(&outside), rcode::REFUSED, "not our zone");

    let health = http_get("127.0.0.1:18080".parse().unwrap(), "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("OK"), "{health}");
    let metrics = http_get("127.0.0.1:9253".parse().unwrap(), "/metrics").await;
    for needle in [
        r#"coredns_dns_requests_total{family="1",proto="udp",server="dns://127.0.0.1:5300",type="A",view="",zone="bench.test."} 3"#,
        r#"coredns_dns_requests_total{family="1",proto="tcp",server="dns://127.0.0.1:5300",type="A",view="",zone="bench.test."} 1"#,
        r#"coredns_dns_responses_total{plugin="cache",rcode="NOERROR",server="dns://127.0.0.1:5300",view="",zone="bench.test."} 2"#,
        r#"coredns_cache_hits_total{server="dns://127.0.0.1:5300",type="success",view="",zones="bench.test."} 2"#,
        r#"coredns_cache_misses_total{server="dns://127.0.0.1:5300",view="",zones="bench.test."} 2"#,
        r#"coredns_cache_entries{server="dns://127.0.0.1:5300",type="success",view="",zones="bench.test."} 1"#,
        r#"coredns_cache_entries{server="dns://127.0.0.1:5300",type="denial",view="",zones="bench.test."} 1"#,
        "coredns_dns_request_duration_seconds_bucket{",
        r#"coredns_proxy_request_duration_seconds_count{proxy_name="forward",rcode="NOERROR",to="127.0.1.1:5353"} 1"#,
        "process_open_fds ",
        "process_max_fds ",
    ] {
        assert!(metrics.contains(needle), "missing {needle}\n{metrics}");
    }
    let setup = http_get("127.0.0.1:9353".parse().unwrap(), "/metrics").await;
    assert!(
        setup.contains(r#"coredns_nodecache_setup_errors_total{errortype="iptables"} 0"#),
        "{setup}"
    );
    assert!(agent.terminate().await.success(), "{}", agent.log());
}

#[tokio::test]
async fn a_bad_corefile_stops_startup_naming_file_line_and_directive() {
    let dir = common::temp_dir("bad");
    std::fs::write(
        dir.join("Corefile"),
        "cluster.local:5399 {\n    errors\n    rewrite name a b\n}\n",
    )
    .unwrap();
    let mut agent = Agent::start(
        &dir,
        &common::loopback_args("Corefile", "18099", "127.0.0.1:0"),
    );
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("Corefile:3"), "{log}");
    assert!(log.contains("rewrite"), "{log}");
}

#[tokio::test]
async fn check_renders_the_template_and_reports_the_blocks() {
    let dir = common::temp_dir("check");
    std::fs::write(
        dir.join("Corefile.base"),
        "cluster.local:53 {\n    cache 30\n    bind __PILLAR__LOCAL__DNS__\n    forward . __PILLAR__CLUSTER__DNS__ {\n        force_tcp\n    }\n}\n\
         .:53 {\n    cache 30\n    bind __PILLAR__LOCAL__DNS__\n    forward . __PILLAR__UPSTREAM__SERVERS__\n}\n",
    )
    .unwrap();
    std::fs::write(dir.join("resolv.conf"), "nameserver 192.0.2.53\nsearch x\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node-local-dns"))
        .args([
            "-check",
            "-localip",
            "169.254.20.10,fd30:1319:f1e:230b::1",
            "-basecorefile",
            "Corefile.base",
            "-conf",
            "Corefile",
            "-upstreamsvc",
            "kube-dns-upstream",
            "-kubednscm",
            "nonexistent",
        ])
        .current_dir(&dir)
        .env("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.96.0.11")
        .env("NODE_LOCAL_DNS_RESOLV_CONF", dir.join("resolv.conf"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 server blocks"), "{stdout}");
    let rendered = std::fs::read_to_string(dir.join("Corefile")).unwrap();
    assert!(
        rendered.contains("bind 169.254.20.10 fd30:1319:f1e:230b::1"),
        "{rendered}"
    );
    assert!(rendered.contains("forward . 10.96.0.11"), "{rendered}");
    // As node-cache does: the resolv.conf path is written, and read when the file is parsed.
    assert!(
        rendered.contains(&format!("forward . {}", dir.join("resolv.conf").display())),
        "{rendered}"
    );
}

/// node-cache re-renders its template every 10 s (`DefaultConfigSyncPeriod`): a changed
/// ConfigMap reaches the Corefile and the listeners without a signal or a `reload` plugin.
#[tokio::test]
async fn a_changed_template_is_rendered_and_applied_within_the_sync_period() {
    let upstream = Authority::start("127.0.0.1:0".parse().unwrap(), 60).await;
    let dir = common::temp_dir("template-sync");
    let port = common::free_port();
    let write = |zone: &str| {
        std::fs::write(
            dir.join("Corefile.base"),
            format!(
                "{zone}:{port} {{\n    cache 30\n    bind __PILLAR__LOCAL__DNS__\n    forward . {}\n}}\n",
                upstream.addr
            ),
        )
        .unwrap();
    };
    write("first.test");
    let mut args = common::loopback_args("Corefile", "18082", "127.0.0.1:0");
    args.extend(["-basecorefile", "Corefile.base"]);
    let mut agent = Agent::start(&dir, &args);
    agent.wait_serving().await;
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rcode_for = |name: &'static str| async move {
        ask(server, &query(7, name, rtype::A), Duration::from_secs(1))
            .await
            .map(|r| rcode_of(&r))
    };
    assert_eq!(rcode_for("a.first.test").await, Some(rcode::NOERROR));
    write("second.test");
    let changed = tokio::time::Instant::now();
    let deadline = changed + TEMPLATE_SYNC_BOUND;
    while rcode_for("a.second.test").await != Some(rcode::NOERROR) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "template change not applied within {:?}\n{}",
            TEMPLATE_SYNC_BOUND,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rendered = std::fs::read_to_string(dir.join("Corefile")).unwrap();
    assert!(rendered.contains("second.test"), "{rendered}");
    assert_eq!(rcode_for("a.first.test").await, Some(rcode::REFUSED));
}

/// The template sync period (10 s) and slack for a loaded machine.
const TEMPLATE_SYNC_BOUND: Duration = Duration::from_secs(15);

/// `clients` clients that each send queries one after another (1 s timeout each, about one
/// per millisecond) over `names` names, from before `during` starts until it has finished;
/// returns (answered, lost).
async fn load<T>(
    server: SocketAddr,
    clients: usize,
    names: usize,
    during: impl std::future::Future<Output = T>,
) -> (usize, usize, T) {
    /// Bounds each client even if `during` never finishes.
    const MAX_PER_CLIENT: usize = 20_000;
    let answered = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (answered, lost, done) = (Arc::clone(&answered), Arc::clone(&lost), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            for i in 0..MAX_PER_CLIENT {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let name = format!("n{}.load.test", (c * 7919 + i) % names);
                let id = (i as u16).wrapping_mul(31).wrapping_add(c as u16);
                match ask(server, &query(id, &name, rtype::A), Duration::from_secs(1)).await {
                    Some(r) if rcode_of(&r) == rcode::NOERROR && ancount(&r) == 1 => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let result = during.await;
    done.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    (
        answered.load(Ordering::SeqCst),
        lost.load(Ordering::SeqCst),
        result,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_restart_under_load_loses_no_query() {
    let upstream = Authority::start("127.0.0.1:0".parse().unwrap(), 2).await;
    let dir = common::temp_dir("restart");
    let port = common::free_port();
    let (health, prometheus) = (common::free_port(), common::free_port());
    // Both instances bind the same DNS, health and metrics ports (SO_REUSEPORT).
    std::fs::write(
        dir.join("Corefile"),
        format!(
            "load.test:{port} {{\n    cache 30\n    bind 127.0.0.1\n    forward . {}\n    health 127.0.0.1:{health}\n    prometheus 127.0.0.1:{prometheus}\n}}\n",
            upstream.addr
        ),
    )
    .unwrap();
    let health_s = health.to_string();
    let args = common::loopback_args("Corefile", &health_s, "127.0.0.1:0");
    let mut old = Agent::start(&dir, &args);
    old.wait_serving().await;
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir2 = dir.clone();
    let args2: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let (answered, lost, _new) = load(server, 8, 400, async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let refs: Vec<&str> = args2.iter().map(String::as_str).collect();
        let mut new = Agent::start(&dir2, &refs);
        new.wait_serving().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = old.terminate().await;
        assert!(status.success(), "{}", old.log());
        tokio::time::sleep(Duration::from_millis(800)).await;
        new
    })
    .await;
    assert_eq!(lost, 0, "{answered} answered, {lost} lost");
    assert!(
        answered > 300,
        "{answered} answered: the load must span the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corefile_changes_apply_without_losing_queries() {
    let upstream = Authority::start("127.0.0.1:0".parse().unwrap(), 60).await;
    let dir = common::temp_dir("reload");
    let port = common::free_port();
    let write = |extra: &str| {
        std::fs::write(
            dir.join("Corefile"),
            format!(
                "load.test:{port} {{\n    cache 30\n    reload 2s\n    bind 127.0.0.1\n    forward . {}\n}}\n{extra}",
                upstream.addr
            ),
        )
        .unwrap();
    };
    write("");
    let mut agent = Agent::start(
        &dir,
        &common::loopback_args("Corefile", "18081", "127.0.0.1:0"),
    );
    agent.wait_serving().await;
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let other = ask(
        server,
        &query(1, "a.other.test", rtype::A),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(
        rcode_of(&other),
        rcode::REFUSED,
        "other.test is not served yet"
    );
    let (answered, lost, ()) = load(server, 4, 300, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        write(&format!(
            "other.test:{port} {{\n    cache 30\n    bind 127.0.0.1\n    forward . {}\n}}\n",
            upstream.addr
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        loop {
            let r = ask(
                server,
                &query(2, "a.other.test", rtype::A),
                Duration::from_secs(1),
            )
            .await;
            if r.is_some_and(|r| rcode_of(&r) == rcode::NOERROR) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "reload not applied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // And a while after it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    assert_eq!(lost, 0, "{answered} answered, {lost} lost");
    assert!(agent.log().contains("Corefile reloaded"), "{}", agent.log());
}

#[tokio::test]
async fn a_forwarding_loop_stops_the_agent() {
    let dir = common::temp_dir("loop");
    let port = common::free_port();
    std::fs::write(
        dir.join("Corefile"),
        format!("loop.test:{port} {{\n    loop\n    bind 127.0.0.1\n    forward . 127.0.0.1:{port}\n}}\n"),
    )
    .unwrap();
    let mut agent = Agent::start(
        &dir,
        &common::loopback_args("Corefile", "18082", "127.0.0.1:0"),
    );
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success());
    assert!(agent.log().contains("Loop"), "{}", agent.log());
}
