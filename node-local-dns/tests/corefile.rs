//! Real Corefiles through the template and the parser: the upstream default ConfigMap,
//! Gardener's variant with `import custom/*.override`, the shipped example, error messages,
//! and a property test that no input makes the parser panic.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use node_local_dns::cache::{self, Limits};
use node_local_dns::config::{Config, Reload, ServerBlock};
use node_local_dns::corefile::{self, CorefileError};
use node_local_dns::template::{self, Upstreams};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("nld-corefile-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const LOCAL_IPS: [&str; 2] = ["169.254.20.10", "10.96.0.10"];

fn upstream_env(name: &str) -> Option<String> {
    (name == "KUBE_DNS_UPSTREAM_SERVICE_HOST").then(|| "10.96.0.11".to_owned())
}

fn cache_30() -> cache::Policy {
    let mut policy = cache::Policy::default();
    policy.success.max_ttl = Duration::from_secs(30);
    policy.denial.max_ttl = Duration::from_secs(30);
    policy
}

fn cluster_cache() -> cache::Policy {
    cache::Policy {
        success: Limits {
            capacity: 9984,
            max_ttl: Duration::from_secs(30),
            min_ttl: cache::DEFAULT_MIN_TTL,
        },
        denial: Limits {
            capacity: 9984,
            max_ttl: Duration::from_secs(5),
            min_ttl: cache::DEFAULT_MIN_TTL,
        },
        ..cache::Policy::default()
    }
}

fn zones(config: &Config) -> Vec<&str> {
    config
        .blocks
        .iter()
        .map(|b| {
            assert_eq!(b.zones.len(), 1);
            b.zones[0].as_str()
        })
        .collect()
}

fn check_common(block: &ServerBlock) {
    assert_eq!(block.port, 53, "{:?}", block.zones);
    assert_eq!(block.bind, ips(&LOCAL_IPS));
    assert_eq!(block.prometheus, Some("0.0.0.0:9253".parse().unwrap()));
    assert!(block.errors && block.loop_detect && !block.log);
    assert_eq!(
        block.reload,
        Some(Reload {
            interval: Duration::from_secs(30),
            jitter: Duration::from_secs(15)
        })
    );
}

#[test]
fn upstream_default_corefile_rendered_and_parsed() {
    let base = std::fs::read_to_string(fixtures().join("upstream.Corefile.base")).unwrap();
    let resolv = fixtures().join("resolv.conf");
    let pillars = template::pillars(
        &ips(&LOCAL_IPS),
        "kube-dns-upstream",
        upstream_env,
        None,
        &resolv,
    )
    .unwrap();
    assert_eq!(pillars.cluster_dns, Some("10.96.0.11".parse().unwrap()));
    assert_eq!(pillars.upstreams, Upstreams::ResolvConf(resolv.clone()));
    let rendered = template::render(&base, &pillars);
    assert!(!rendered.contains("__PILLAR__"), "{rendered}");
    // The resolv.conf path is written, as node-cache writes /etc/resolv.conf.
    assert!(rendered.contains(&format!("forward . {}\n", resolv.display())));

    let config = corefile::parse(&rendered, &fixtures().join("Corefile")).unwrap();
    assert_eq!(
        zones(&config),
        ["cluster.local.", "in-addr.arpa.", "ip6.arpa.", "."]
    );
    for block in &config.blocks {
        check_common(block);
    }
    let [cluster, in_addr, ip6, root] = &config.blocks[..] else {
        panic!("four blocks")
    };
    assert_eq!(cluster.location.line, 1);
    assert_eq!(in_addr.location.line, 16);
    assert_eq!(cluster.cache, Some(cluster_cache()));
    assert_eq!(cluster.health, Some("169.254.20.10:8080".parse().unwrap()));
    for block in [in_addr, ip6, root] {
        assert_eq!(block.cache, Some(cache_30()));
        assert_eq!(block.health, None);
    }
    for block in [cluster, in_addr, ip6] {
        let forward = block.forward.as_ref().unwrap();
        assert_eq!(forward.from, ".");
        assert_eq!(forward.to, addrs(&["10.96.0.11:53"]));
        assert!(forward.force_tcp && !forward.prefer_udp);
    }
    let forward = root.forward.as_ref().unwrap();
    assert_eq!(forward.to, addrs(&["192.0.2.53:53", "198.51.100.53:53"]));
    assert!(!forward.force_tcp && !forward.prefer_udp);
}

#[test]
fn upstream_corefile_with_kube_dns_configmap() {
    let base = std::fs::read_to_string(fixtures().join("upstream.Corefile.base"))
        .unwrap()
        // An older manifest's `.` block: TCP to the upstreams, rewritten to UDP for custom ones.
        .replace(
            "forward . __PILLAR__UPSTREAM__SERVERS__\n",
            "forward . __PILLAR__UPSTREAM__SERVERS__ {\n            force_tcp\n    }\n",
        );
    let pillars = template::pillars(
        &ips(&LOCAL_IPS),
        "kube-dns-upstream",
        upstream_env,
        Some(&fixtures().join("kube-dns")),
        Path::new("/etc/resolv.conf"),
    )
    .unwrap();
    let rendered = template::render(&base, &pillars);
    let config = corefile::parse(&rendered, &fixtures().join("Corefile")).unwrap();
    assert_eq!(
        zones(&config),
        [
            "cluster.local.",
            "in-addr.arpa.",
            "ip6.arpa.",
            ".",
            "acme.local.",
            "corp.example."
        ]
    );
    let root = &config.blocks[3].forward.as_ref().unwrap();
    assert_eq!(root.to, addrs(&["203.0.113.1:53", "203.0.113.2:5353"]));
    assert!(!root.force_tcp, "custom upstreams are asked over UDP");
    assert!(config.blocks[0].forward.as_ref().unwrap().force_tcp);
    let corp = &config.blocks[5];
    assert_eq!(corp.port, 53);
    assert_eq!(corp.bind, ips(&LOCAL_IPS));
    assert_eq!(corp.cache, Some(cache_30()));
    assert!(corp.errors && !corp.loop_detect && corp.prometheus.is_none());
    assert_eq!(
        corp.forward.as_ref().unwrap().to,
        addrs(&["10.150.0.2:5353", "10.150.0.3:53"])
    );
}

fn gardener_rendered(dir: &TempDir) -> PathBuf {
    let base = std::fs::read_to_string(fixtures().join("gardener/Corefile.base")).unwrap();
    let resolv = fixtures().join("resolv.conf");
    let pillars = template::pillars(
        &ips(&LOCAL_IPS),
        "kube-dns-upstream",
        upstream_env,
        None,
        &resolv,
    )
    .unwrap();
    dir.write("Corefile", &template::render(&base, &pillars))
}

fn check_gardener(config: &Config, log: bool) {
    assert_eq!(
        zones(config),
        ["cluster.local.", "in-addr.arpa.", "ip6.arpa.", "."]
    );
    for block in &config.blocks {
        check_common_gardener(block);
    }
    let cluster = &config.blocks[0];
    assert_eq!(cluster.health, Some("169.254.20.10:8099".parse().unwrap()));
    assert_eq!(cluster.cache, Some(cluster_cache()));
    assert!(cluster.forward.as_ref().unwrap().force_tcp);
    assert_eq!(
        cluster.forward.as_ref().unwrap().to,
        addrs(&["10.96.0.10:53"])
    );
    assert_eq!(cluster.log, log);
    let root = &config.blocks[3];
    assert_eq!(root.log, log);
    assert!(!config.blocks[1].log && !config.blocks[2].log);
    let forward = root.forward.as_ref().unwrap();
    assert!(forward.prefer_udp && !forward.force_tcp);
    assert_eq!(forward.to, addrs(&["192.0.2.53:53", "198.51.100.53:53"]));
}

fn check_common_gardener(block: &ServerBlock) {
    assert_eq!(block.port, 53);
    assert_eq!(block.bind, ips(&LOCAL_IPS));
    assert_eq!(block.prometheus, Some("0.0.0.0:9253".parse().unwrap()));
    assert!(block.errors && block.loop_detect && block.reload.is_some());
}

#[test]
fn gardener_corefile_without_custom_files() {
    let dir = TempDir::new("gardener-bare");
    let config = corefile::load(&gardener_rendered(&dir)).unwrap();
    check_gardener(&config, false);
}

#[test]
fn gardener_corefile_with_custom_overrides() {
    let dir = TempDir::new("gardener-custom");
    for name in ["changeme.override", "query-log.override", "changeme.server"] {
        let text = std::fs::read_to_string(fixtures().join("gardener/custom").join(name)).unwrap();
        dir.write(&format!("custom/{name}"), &text);
    }
    let config = corefile::load(&gardener_rendered(&dir)).unwrap();
    check_gardener(&config, true);

    // A custom override with a plugin node-local-dns lacks names the imported file.
    dir.write(
        "custom/rewrite.override",
        "rewrite name a.example b.example\n",
    );
    let e = corefile::load(&dir.0.join("Corefile"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rewrite.override:1: unknown directive \"rewrite\""),
        "{e}"
    );
}

#[test]
fn shipped_example_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("example.Corefile");
    let config = corefile::load(&path).unwrap();
    let [block] = &config.blocks[..] else {
        panic!("one block")
    };
    assert_eq!(block.zones, ["bench.test."]);
    assert_eq!(block.port, 5300);
    assert_eq!(block.bind, ips(&["127.0.0.1"]));
    assert_eq!(block.cache, Some(cache_30()));
    assert_eq!(
        block.forward.as_ref().unwrap().to,
        addrs(&["127.0.1.1:5353"])
    );
    assert_eq!(block.prometheus, Some("127.0.0.1:9253".parse().unwrap()));
    assert_eq!(block.health, Some("127.0.0.1:18080".parse().unwrap()));
    assert!(block.errors && !block.loop_detect && block.reload.is_none());
    assert_eq!(block.location.file, path);
}

/// Parses `text` as the file `Corefile` and returns the error message.
fn error_of(text: &str) -> String {
    corefile::parse(text, Path::new("Corefile"))
        .unwrap_err()
        .to_string()
}

#[test]
fn error_unknown_plugin() {
    let e = error_of(".:53 {\n    errors\n    cache 30\n    rewrite name foo bar\n}\n");
    assert!(
        e.starts_with("Corefile:4: unknown directive \"rewrite\""),
        "{e}"
    );
}

#[test]
fn error_bad_forward_address() {
    let e = error_of(".:53 {\n    errors\n    cache 30\n    reload\n    loop\n    bind 127.0.0.1\n    forward . x.y\n}\n");
    assert_eq!(
        e,
        "Corefile:7: forward: \"x.y\" is not an upstream address (want IP[:port])"
    );
}

#[test]
fn error_bad_cache_number() {
    let e = error_of(".:53 {\n    cache thirty\n}\n");
    // `thirty` is not a TTL, so CoreDNS reads it as a zone, which here is narrower than `.`.
    assert!(
        e.starts_with("Corefile:2: cache: \"thirty\" is neither a TTL"),
        "{e}"
    );
    let e = error_of(".:53 {\n    cache {\n        success 9984x 30\n    }\n}\n");
    assert_eq!(
        e,
        "Corefile:3: cache: success: capacity \"9984x\" is not a number"
    );
    let e = error_of(".:53 {\n    cache 3O\n}\n");
    assert_eq!(
        e,
        "Corefile:2: cache: \"3O\" is neither a TTL in seconds nor a zone covering the block's . (caching part of a block is not supported)"
    );
}

#[test]
fn error_unclosed_brace() {
    let e =
        error_of("cluster.local:53 {\n    errors\n    forward . 10.96.0.10 {\n        force_tcp\n");
    assert!(e.starts_with("Corefile:3: forward: unclosed '{'"), "{e}");
    let e = error_of("cluster.local:53 {\n    errors\n");
    assert!(
        e.starts_with("Corefile:1: server block \"cluster.local:53\": unclosed '{'"),
        "{e}"
    );
}

#[test]
fn error_force_tcp_with_prefer_udp() {
    let e = error_of(
        ".:53 {\n    forward . 10.0.0.1 {\n        force_tcp\n        prefer_udp\n    }\n}\n",
    );
    assert_eq!(
        e,
        "Corefile:2: forward: force_tcp and prefer_udp can not both be set"
    );
}

#[test]
fn error_import_cycle() {
    let dir = TempDir::new("cycle");
    dir.write("a.conf", "errors\nimport b.conf\n");
    dir.write("b.conf", "\nimport a.conf\n");
    let corefile = dir.write("Corefile", ".:53 {\n    import a.conf\n}\n");
    let e = corefile::load(&corefile).unwrap_err();
    assert!(matches!(e, CorefileError::ImportCycle { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("b.conf:2: import: import cycle: "), "{e}");
    assert!(e.contains("a.conf -> "), "{e}");
    // A file importing itself at the top level.
    let corefile = dir.write("Self", "import Self\n");
    let e = corefile::load(&corefile).unwrap_err().to_string();
    assert!(e.contains("Self:1: import: import cycle"), "{e}");
}

#[test]
fn error_missing_file_names_the_path() {
    let e = corefile::load(Path::new("/nonexistent/Corefile")).unwrap_err();
    assert!(matches!(e, CorefileError::Io { .. }));
    assert!(e.to_string().starts_with("/nonexistent/Corefile: "), "{e}");
}

#[test]
fn imports_at_top_level_inline_server_blocks() {
    let dir = TempDir::new("toplevel");
    dir.write(
        "extra/one.server",
        "one.example:53 {\n    forward . 10.0.0.1\n}\n",
    );
    dir.write(
        "extra/two.server",
        "two.example:53 {\n    forward . 10.0.0.2\n}\n",
    );
    let corefile = dir.write(
        "Corefile",
        ".:53 {\n    forward . 10.0.0.9\n}\nimport extra/*.server\nimport missing/*.server\n",
    );
    let config = corefile::load(&corefile).unwrap();
    assert_eq!(zones(&config), [".", "one.example.", "two.example."]);
    assert!(config.blocks[1].location.file.ends_with("extra/one.server"));
}

/// Words a Corefile is made of, so that generated inputs reach deep into the parser.
fn vocabulary() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "{",
        "}",
        "\n",
        " ",
        "\"",
        "#",
        ";",
        ".",
        ".:53",
        "cluster.local:53",
        "dns://.:5300",
        "10.0.0.0/8",
        "errors",
        "cache",
        "30",
        "0",
        "-1",
        "success",
        "denial",
        "9984",
        "prefetch",
        "10%",
        "serve_stale",
        "verify",
        "servfail",
        "5s",
        "1m30s",
        "reload",
        "loop",
        "bind",
        "127.0.0.1",
        "::1",
        "eth0",
        "forward",
        "1.1.1.1:53",
        "[::1]:53",
        "x.y",
        "force_tcp",
        "prefer_udp",
        "policy",
        "sequential",
        "except",
        "max_fails",
        "health_check",
        "no_rec",
        "domain",
        "prometheus",
        ":9253",
        "health",
        "lameduck",
        "log",
        "import",
        "(snip)",
        "snip",
        "nothing/*.conf",
        "{$HOME}",
        "{%X%}",
        "rewrite",
    ])
    .prop_map(str::to_owned)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = corefile::parse_with_env(&text, Path::new("/nonexistent/Corefile"), &|_| None);
    }

    #[test]
    fn corefile_like_text_never_panics(words in prop::collection::vec(vocabulary(), 0..80)) {
        let text = words.join(" ");
        let _ = corefile::parse_with_env(&text, Path::new("/nonexistent/Corefile"), &|_| Some("x".to_owned()));
        let joined = words.concat();
        let _ = corefile::parse_with_env(&joined, Path::new("/nonexistent/Corefile"), &|_| None);
    }

    #[test]
    fn go_durations_never_panic(text in "[0-9.+-]{0,6}(ns|us|µs|ms|s|m|h|x)?[0-9.]{0,4}(s|m)?") {
        let _ = corefile::parse_go_duration(&text);
    }
}
