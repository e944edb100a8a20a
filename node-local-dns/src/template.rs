//! node-cache's Corefile rendering: the `__PILLAR__*__` placeholders of the node-local-dns
//! ConfigMap (`Corefile.base`) filled in from the flags, the environment and the kube-dns
//! ConfigMap, plus one server block per kube-dns stub domain. Separate from [`crate::corefile`]
//! because it is plain text in, text out, exactly as node-cache writes `/etc/Corefile`, so a
//! rendered file can be diffed against the original's.
//!
//! The rules (kubernetes/dns `cmd/node-cache/app/configmap.go`):
//! * `__PILLAR__LOCAL__DNS__`: the `-localip` addresses, separated by spaces.
//! * `__PILLAR__DNS__SERVER__`: removed if the installer left it in.
//! * `__PILLAR__CLUSTER__DNS__`: the ClusterIP of `-upstreamsvc`, from the service environment
//!   variable `<NAME>_SERVICE_HOST` (left as is when unset, as in IPVS mode the installer fills
//!   it in; a leftover placeholder then fails parsing with a clear `forward` error).
//! * `__PILLAR__UPSTREAM__SERVERS__`: the kube-dns ConfigMap's `upstreamNameservers`, else the
//!   path of the node's resolv.conf (which `forward` reads). With custom upstreams, a
//!   `forward . __PILLAR__UPSTREAM__SERVERS__ { force_tcp }` block becomes plain
//!   `forward . <servers>` (UDP), because custom upstreams are often reachable over UDP only.
//! * per stub domain: `D:53 { errors / cache 30 / bind <local ips> / forward . <servers> }`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::DEFAULT_PORT;
use crate::corefile::parse_host_port;

/// Replaced by the listen addresses.
pub const LOCAL_DNS: &str = "__PILLAR__LOCAL__DNS__";
/// Removed (the installer substitutes it in iptables mode).
pub const DNS_SERVER: &str = "__PILLAR__DNS__SERVER__";
/// Replaced by the upstream service's ClusterIP.
pub const CLUSTER_DNS: &str = "__PILLAR__CLUSTER__DNS__";
/// Replaced by the custom upstreams or the resolv.conf path.
pub const UPSTREAM_SERVERS: &str = "__PILLAR__UPSTREAM__SERVERS__";
/// The cache TTL of stub domain blocks, in seconds (node-cache's `defaultTTL`).
pub const STUB_DOMAIN_CACHE_TTL_SECS: u32 = 30;
/// Where node-cache looks for the kube-dns ConfigMap when `-kubednscm` is not given.
pub const DEFAULT_KUBEDNS_DIR: &str = "/etc/kube-dns";
/// The kube-dns ConfigMap key with the upstream list (JSON list of strings).
pub const UPSTREAM_NAMESERVERS_KEY: &str = "upstreamNameservers";
/// The kube-dns ConfigMap key with the stub domains (JSON map of domain to list).
pub const STUB_DOMAINS_KEY: &str = "stubDomains";

/// Why the placeholders could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No `-localip` addresses.
    #[error("no local IP addresses to listen on")]
    NoLocalIps,
    /// A kube-dns ConfigMap file exists but could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A kube-dns ConfigMap file is not the JSON it should be.
    #[error("{}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A nameserver node-local-dns cannot forward to.
    #[error("{context}: nameserver {server:?}: {reason}")]
    Nameserver {
        /// `upstreamNameservers` or `stubDomains[D]`.
        context: String,
        /// The entry as written.
        server: String,
        /// What is wrong.
        reason: String,
    },
    /// A stub domain that is not a domain name.
    #[error("stubDomains: {domain:?}: {reason}")]
    StubDomain {
        /// The key as written.
        domain: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where `__PILLAR__UPSTREAM__SERVERS__` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstreams {
    /// No custom upstreams: the node's resolv.conf, whose nameservers `forward` reads.
    ResolvConf(PathBuf),
    /// The kube-dns ConfigMap's `upstreamNameservers` (`IP` or `IP:port`), forwarded over UDP.
    Custom(Vec<String>),
}

/// The values of the placeholders, and the stub domains to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pillars {
    /// `__PILLAR__LOCAL__DNS__` and the stub blocks' `bind`: the `-localip` addresses.
    pub local_ips: Vec<IpAddr>,
    /// `__PILLAR__CLUSTER__DNS__`: the upstream service's ClusterIP, if the environment
    /// had it.
    pub cluster_dns: Option<IpAddr>,
    /// `__PILLAR__UPSTREAM__SERVERS__`.
    pub upstreams: Upstreams,
    /// Stub domains (lower-case, without trailing dot) and their nameservers, sorted by domain.
    pub stub_domains: Vec<(String, Vec<String>)>,
    /// The port of the stub domain blocks (node-cache's `-dns.port`, 53).
    pub port: u16,
}

/// The environment variable holding `service`'s ClusterIP (`kube-dns-upstream` →
/// `KUBE_DNS_UPSTREAM_SERVICE_HOST`).
pub fn service_host_env(service: &str) -> String {
    format!("{}_SERVICE_HOST", service.replace('-', "_").to_uppercase())
}

/// Computes the placeholders as node-cache does: the upstream service's IP from `env`,
/// upstreams and stub domains from the kube-dns ConfigMap directory (files that do not exist
/// count as empty), the resolv.conf path when there are no custom upstreams.
pub fn pillars(
    local_ips: &[IpAddr],
    upstreamsvc: &str,
    env: impl Fn(&str) -> Option<String>,
    kubedns_dir: Option<&Path>,
    resolv_conf: &Path,
) -> Result<Pillars, TemplateError> {
    if local_ips.is_empty() {
        return Err(TemplateError::NoLocalIps);
    }
    let env_name = service_host_env(upstreamsvc);
    let cluster_dns = match env(&env_name) {
        Some(value) => match value.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                warn!(env = %env_name, %value, service = upstreamsvc, "upstream service address is not an IP; __PILLAR__CLUSTER__DNS__ stays unfilled");
                None
            }
        },
        None => {
            warn!(env = %env_name, service = upstreamsvc, "upstream service address not in the environment; __PILLAR__CLUSTER__DNS__ stays unfilled");
            None
        }
    };

    let mut custom = Vec::new();
    let mut stub_domains = Vec::new();
    if let Some(dir) = kubedns_dir {
        let path = dir.join(UPSTREAM_NAMESERVERS_KEY);
        if let Some(value) = read_json(&path)? {
            custom = string_list(&value).ok_or_else(|| TemplateError::Json {
                path: path.clone(),
                message: "want a JSON list of strings".to_owned(),
            })?;
            for server in &custom {
                validate_nameserver(UPSTREAM_NAMESERVERS_KEY, server)?;
            }
        }
        let path = dir.join(STUB_DOMAINS_KEY);
        if let Some(value) = read_json(&path)? {
            let map = value.as_object().ok_or_else(|| TemplateError::Json {
                path: path.clone(),
                message: "want a JSON object of domain to list of nameservers".to_owned(),
            })?;
            for (domain, servers) in map {
                let servers = string_list(servers).ok_or_else(|| TemplateError::Json {
                    path: path.clone(),
                    message: format!("{domain:?}: want a list of strings"),
                })?;
                let name = validate_domain(domain)?;
                if servers.is_empty() {
                    return Err(TemplateError::StubDomain {
                        domain: domain.clone(),
                        reason: "no nameservers".to_owned(),
                    });
                }
                let context = format!("{STUB_DOMAINS_KEY}[{domain}]");
                for server in &servers {
                    validate_nameserver(&context, server)?;
                }
                stub_domains.push((name, servers));
            }
            stub_domains.sort();
        }
    }
    let upstreams = if custom.is_empty() {
        Upstreams::ResolvConf(resolv_conf.to_path_buf())
    } else {
        Upstreams::Custom(custom)
    };
    Ok(Pillars {
        local_ips: local_ips.to_vec(),
        cluster_dns,
        upstreams,
        stub_domains,
        port: DEFAULT_PORT,
    })
}

/// The file's JSON, or None if it does not exist or is blank.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TemplateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TemplateError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TemplateError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn string_list(value: &serde_json::Value) -> Option<Vec<String>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// node-cache accepts `dns` (and `tls`, which node-local-dns does not implement) transports;
/// the address must be `IP`, `IP:port` or `[v6]:port`.
fn validate_nameserver(context: &str, server: &str) -> Result<(), TemplateError> {
    let bad = |reason: String| TemplateError::Nameserver {
        context: context.to_owned(),
        server: server.to_owned(),
        reason,
    };
    let mut rest = server;
    if let Some(index) = rest.find("://") {
        let scheme = rest[..index].to_ascii_lowercase();
        if scheme != "dns" {
            return Err(bad(format!(
                "transport {scheme}:// is not supported (only plain DNS)"
            )));
        }
        rest = &rest[index + 3..];
    }
    if parse_host_port(rest).is_none() {
        return Err(bad("not an IP address or IP:port".to_owned()));
    }
    Ok(())
}

/// A DNS-1123 subdomain (as kube-dns validates stub domains), lower-cased, without the
/// trailing dot.
fn validate_domain(domain: &str) -> Result<String, TemplateError> {
    let bad = |reason: &str| TemplateError::StubDomain {
        domain: domain.to_owned(),
        reason: reason.to_owned(),
    };
    let name = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(bad("not a domain name (1 to 253 characters)"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad(
                "not a domain name (labels of a-z, 0-9 and '-', not starting or ending with '-')",
            ));
        }
    }
    Ok(name)
}

/// Renders `base` (the ConfigMap's `Corefile.base`) with `pillars`, as node-cache writes
/// `/etc/Corefile`.
pub fn render(base: &str, pillars: &Pillars) -> String {
    let local = pillars
        .local_ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = match &pillars.upstreams {
        Upstreams::ResolvConf(path) => base.replace(UPSTREAM_SERVERS, &path.display().to_string()),
        Upstreams::Custom(servers) => {
            let servers = servers.join(" ");
            let udp = drop_force_tcp_blocks(base, &servers);
            udp.replace(UPSTREAM_SERVERS, &servers)
        }
    };
    if let Some(ip) = pillars.cluster_dns {
        out = out.replace(CLUSTER_DNS, &ip.to_string());
    }
    out = out.replace(LOCAL_DNS, &local);
    out = out.replace(DNS_SERVER, "");
    for (domain, servers) in &pillars.stub_domains {
        out.push_str(&format!(
            "\n{domain}:{port} {{\n    errors\n    cache {ttl}\n    bind {local}\n    forward . {servers}\n}}\n",
            port = pillars.port,
            ttl = STUB_DOMAIN_CACHE_TTL_SECS,
            servers = servers.join(" "),
        ));
    }
    out
}

/// Rewrites every `forward . __PILLAR__UPSTREAM__SERVERS__ { force_tcp }` (any whitespace)
/// to `forward . <servers>`. node-cache matches one exact indentation; this accepts any, and
/// leaves blocks with other options alone.
fn drop_force_tcp_blocks(base: &str, servers: &str) -> String {
    let head = format!("forward . {UPSTREAM_SERVERS}");
    let mut out = String::with_capacity(base.len());
    let mut rest = base;
    while let Some(start) = rest.find(&head) {
        let after = &rest[start + head.len()..];
        let tail = after.trim_start();
        let rewritten = tail
            .strip_prefix('{')
            .map(str::trim_start)
            .and_then(|t| t.strip_prefix("force_tcp"))
            .filter(|t| t.starts_with(char::is_whitespace))
            .map(str::trim_start)
            .and_then(|t| t.strip_prefix('}'));
        out.push_str(&rest[..start]);
        match rewritten {
            Some(remaining) => {
                out.push_str(&format!("forward . {servers}"));
                rest = remaining;
            }
            None => {
                out.push_str(&head);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn pillars_with(custom: Option<Vec<&str>>, stubs: Vec<(&str, Vec<&str>)>) -> Pillars {
        Pillars {
            local_ips: ips(&["169.254.20.10", "10.96.0.10"]),
            cluster_dns: Some("10.96.0.11".parse().unwrap()),
            upstreams: match custom {
                None => Upstreams::ResolvConf(PathBuf::from("/etc/resolv.conf")),
                Some(list) => Upstreams::Custom(list.into_iter().map(str::to_owned).collect()),
            },
            stub_domains: stubs
                .into_iter()
                .map(|(d, s)| (d.to_owned(), s.into_iter().map(str::to_owned).collect()))
                .collect(),
            port: 53,
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("nld-template-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn env_name_follows_the_service_convention() {
        assert_eq!(
            service_host_env("kube-dns-upstream"),
            "KUBE_DNS_UPSTREAM_SERVICE_HOST"
        );
        assert_eq!(service_host_env("kube-dns"), "KUBE_DNS_SERVICE_HOST");
    }

    #[test]
    fn local_dns_server_and_cluster_dns() {
        let base = "a:53 {\n    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__\n    forward . __PILLAR__CLUSTER__DNS__\n    health __PILLAR__LOCAL__DNS__:8080\n}\n";
        let out = render(base, &pillars_with(None, vec![]));
        assert_eq!(
            out,
            "a:53 {\n    bind 169.254.20.10 10.96.0.10 \n    forward . 10.96.0.11\n    health 169.254.20.10 10.96.0.10:8080\n}\n"
        );
        let mut p = pillars_with(None, vec![]);
        p.cluster_dns = None;
        assert!(render(base, &p).contains("forward . __PILLAR__CLUSTER__DNS__"));
    }

    #[test]
    fn resolv_conf_is_the_default_upstream_and_keeps_force_tcp() {
        let base = ".:53 {\n    forward . __PILLAR__UPSTREAM__SERVERS__ {\n            force_tcp\n    }\n}\n";
        let out = render(base, &pillars_with(None, vec![]));
        assert_eq!(
            out,
            ".:53 {\n    forward . /etc/resolv.conf {\n            force_tcp\n    }\n}\n"
        );
    }

    #[test]
    fn custom_upstreams_drop_force_tcp() {
        let base = ".:53 {\n    forward . __PILLAR__UPSTREAM__SERVERS__ {\n            force_tcp\n    }\n    cache 30\n}\n";
        let out = render(
            base,
            &pillars_with(Some(vec!["1.1.1.1", "8.8.8.8:53"]), vec![]),
        );
        assert_eq!(
            out,
            ".:53 {\n    forward . 1.1.1.1 8.8.8.8:53\n    cache 30\n}\n"
        );
        // Other indentation, on one line.
        let out = render(
            ".:53 {\n  forward . __PILLAR__UPSTREAM__SERVERS__ { force_tcp }\n}\n",
            &pillars_with(Some(vec!["1.1.1.1"]), vec![]),
        );
        assert_eq!(out, ".:53 {\n  forward . 1.1.1.1\n}\n");
        // A block with other options, and a plain line, only get the servers.
        let base = ".:53 {\n    forward . __PILLAR__UPSTREAM__SERVERS__ {\n        prefer_udp\n    }\n}\nx:53 {\n    forward . __PILLAR__UPSTREAM__SERVERS__\n}\n";
        let out = render(base, &pillars_with(Some(vec!["1.1.1.1"]), vec![]));
        assert_eq!(out, ".:53 {\n    forward . 1.1.1.1 {\n        prefer_udp\n    }\n}\nx:53 {\n    forward . 1.1.1.1\n}\n");
        // force_tcp followed by something else is not the pattern.
        let base = "forward . __PILLAR__UPSTREAM__SERVERS__ { force_tcpx }";
        assert_eq!(
            render(base, &pillars_with(Some(vec!["1.1.1.1"]), vec![])),
            "forward . 1.1.1.1 { force_tcpx }"
        );
    }

    #[test]
    fn stub_domains_are_appended() {
        let p = pillars_with(None, vec![("acme.local", vec!["1.2.3.4", "5.6.7.8:5353"])]);
        let out = render("", &p);
        assert_eq!(
            out,
            "\nacme.local:53 {\n    errors\n    cache 30\n    bind 169.254.20.10 10.96.0.10\n    forward . 1.2.3.4 5.6.7.8:5353\n}\n"
        );
    }

    #[test]
    fn pillars_from_env_and_kube_dns_configmap() {
        let dir = TempDir::new("cm");
        std::fs::write(
            dir.0.join(UPSTREAM_NAMESERVERS_KEY),
            r#"["1.1.1.1", "8.8.8.8:53"]"#,
        )
        .unwrap();
        std::fs::write(
            dir.0.join(STUB_DOMAINS_KEY),
            r#"{"Zeta.Example.": ["10.0.0.1"], "acme.local": ["dns://10.0.0.2:5353", "[2001:db8::1]:53"]}"#,
        )
        .unwrap();
        let env = |name: &str| {
            (name == "KUBE_DNS_UPSTREAM_SERVICE_HOST").then(|| "10.96.0.11".to_owned())
        };
        let p = pillars(
            &ips(&["169.254.20.10"]),
            "kube-dns-upstream",
            env,
            Some(&dir.0),
            Path::new("/etc/resolv.conf"),
        )
        .unwrap();
        assert_eq!(p.cluster_dns, Some("10.96.0.11".parse().unwrap()));
        assert_eq!(
            p.upstreams,
            Upstreams::Custom(vec!["1.1.1.1".into(), "8.8.8.8:53".into()])
        );
        assert_eq!(
            p.stub_domains,
            vec![
                (
                    "acme.local".to_owned(),
                    vec![
                        "dns://10.0.0.2:5353".to_owned(),
                        "[2001:db8::1]:53".to_owned()
                    ]
                ),
                ("zeta.example".to_owned(), vec!["10.0.0.1".to_owned()]),
            ]
        );
    }

    #[test]
    fn pillars_without_configmap_use_resolv_conf() {
        let dir = TempDir::new("empty");
        std::fs::write(dir.0.join(UPSTREAM_NAMESERVERS_KEY), "  \n").unwrap();
        for kubedns in [None, Some(dir.0.as_path())] {
            let p = pillars(
                &ips(&["::1"]),
                "kube-dns",
                |_| None,
                kubedns,
                Path::new("/r.conf"),
            )
            .unwrap();
            assert_eq!(p.upstreams, Upstreams::ResolvConf(PathBuf::from("/r.conf")));
            assert_eq!(p.cluster_dns, None);
            assert!(p.stub_domains.is_empty());
        }
        let p = pillars(
            &ips(&["::1"]),
            "kube-dns",
            |_| Some("not-an-ip".into()),
            None,
            Path::new("/r"),
        )
        .unwrap();
        assert_eq!(p.cluster_dns, None);
    }

    #[test]
    fn pillars_validation() {
        let check = |file: &str, content: &str, want: &str| {
            let dir = TempDir::new("bad");
            std::fs::write(dir.0.join(file), content).unwrap();
            let e = pillars(
                &ips(&["127.0.0.1"]),
                "kube-dns",
                |_| None,
                Some(&dir.0),
                Path::new("/r"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{content}: {e}");
        };
        check(
            UPSTREAM_NAMESERVERS_KEY,
            r#"["tls://1.1.1.1"]"#,
            "upstreamNameservers: nameserver \"tls://1.1.1.1\": transport tls://",
        );
        check(
            UPSTREAM_NAMESERVERS_KEY,
            r#"["dns.google"]"#,
            "not an IP address",
        );
        check(
            UPSTREAM_NAMESERVERS_KEY,
            r#"["1.1.1.1:99999"]"#,
            "not an IP address",
        );
        check(
            UPSTREAM_NAMESERVERS_KEY,
            r#"{"a": 1}"#,
            "JSON list of strings",
        );
        check(UPSTREAM_NAMESERVERS_KEY, "[1.1.1.1", "upstreamNameservers:");
        check(
            STUB_DOMAINS_KEY,
            r#"{"acme.local": ["https://1.1.1.1"]}"#,
            "stubDomains[acme.local]: nameserver",
        );
        check(STUB_DOMAINS_KEY, r#"{"acme.local": []}"#, "no nameservers");
        check(
            STUB_DOMAINS_KEY,
            r#"{"bad domain {": ["1.1.1.1"]}"#,
            "not a domain name",
        );
        check(
            STUB_DOMAINS_KEY,
            r#"{"acme.local": "1.1.1.1"}"#,
            "want a list of strings",
        );
        check(STUB_DOMAINS_KEY, r#"["acme.local"]"#, "JSON object");
        let e = pillars(&[], "kube-dns", |_| None, None, Path::new("/r")).unwrap_err();
        assert!(matches!(e, TemplateError::NoLocalIps));
    }
}
