//! One interpreter per supported directive (`errors`, `cache`, `reload`, `loop`, `bind`,
//! `forward`, `prometheus`, `health`, `log`, `fastpath`), with CoreDNS's argument rules and
//! defaults, filling in the server block.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::parse::{normalize_zone, zone_within, Item};
use super::values::{parse_go_duration, parse_host_port, resolv_conf_nameservers};
use super::{read, CorefileError};
use crate::cache::{self, Limits, Prefetch, ServeStale, StaleMode};
use crate::config::{self, Forward, Reload, ServerBlock, DEFAULT_PORT};

/// CoreDNS's `forward` accepts at most this many upstreams.
pub const MAX_UPSTREAMS: usize = 15;
/// `prometheus` without an address: CoreDNS's `localhost:9153`.
pub const DEFAULT_PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9153);
/// `health` without an address: CoreDNS's `:8080`.
pub const DEFAULT_HEALTH_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
/// `reload` default check interval (CoreDNS).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// `reload` default jitter (CoreDNS).
pub const DEFAULT_RELOAD_JITTER: Duration = Duration::from_secs(15);
/// `reload`: the smallest interval CoreDNS accepts.
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// `reload`: the smallest jitter CoreDNS accepts, other than zero (no jitter).
pub const MIN_RELOAD_JITTER: Duration = Duration::from_secs(1);
/// `cache { prefetch AMOUNT }` default window (CoreDNS: 1 minute).
pub const DEFAULT_PREFETCH_WINDOW: Duration = Duration::from_secs(60);
/// `cache { prefetch AMOUNT DURATION }` default percentage (CoreDNS: 10 %).
pub const DEFAULT_PREFETCH_PERCENTAGE: u8 = 10;
/// `cache { prefetch … PERCENTAGE% }` range CoreDNS accepts.
pub const PREFETCH_PERCENTAGE_RANGE: std::ops::RangeInclusive<u8> = 10..=90;
/// `cache { serve_stale }` default maximum staleness (CoreDNS: 1 hour).
pub const DEFAULT_SERVE_STALE: Duration = Duration::from_secs(3600);
/// `cache { servfail DURATION }` maximum (CoreDNS: 5 minutes).
pub const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(300);

/// Directives CoreDNS allows at most once per server block, and which of ours are such.
const ONCE: &[&str] = &[
    "errors",
    "cache",
    "reload",
    "loop",
    "forward",
    "prometheus",
    "health",
    "fastpath",
];

pub(super) fn apply_directive(
    block: &mut ServerBlock,
    item: &Item<'_>,
    seen: &mut Vec<(String, usize)>,
) -> Result<(), CorefileError> {
    let name = item.name.text.as_str();
    if item.name.quoted {
        return Err(CorefileError::UnknownDirective {
            location: item.name.location(),
            name: name.to_owned(),
            hint: " (a directive is not quoted)".to_owned(),
        });
    }
    if ONCE.contains(&name) {
        if let Some((_, line)) = seen.iter().find(|(n, _)| *n == name) {
            return Err(item.error(format!(
                "given twice in one server block (first at line {line})"
            )));
        }
        seen.push((name.to_owned(), item.name.line));
    }
    match name {
        "errors" => {
            if item.args.len() > 1 {
                return Err(item.error("takes at most one argument"));
            }
            for option in item.block_items() {
                match option.name.text.as_str() {
                    "consolidate" | "stacktrace" => {}
                    other => {
                        return Err(option.error(format!(
                            "unknown option {other:?} of errors (want consolidate or stacktrace)"
                        )))
                    }
                }
            }
            block.errors = true;
        }
        "log" => block.log = true,
        "loop" => {
            if !item.args.is_empty() {
                return Err(item.error("takes no arguments"));
            }
            item.no_block()?;
            block.loop_detect = true;
        }
        "reload" => block.reload = Some(parse_reload(item)?),
        "fastpath" => {
            item.no_block()?;
            let (mode, interfaces) = match item.args.split_first() {
                Some((mode, interfaces)) if !interfaces.is_empty() => (mode, interfaces),
                _ => return Err(item.error("want a mode (tc or xdp) and at least one interface")),
            };
            let mode = mode.text.parse().map_err(|m: String| item.error(m))?;
            let interfaces = interfaces
                .iter()
                .map(|i| {
                    if i.text.is_empty() || i.text.len() > 15 || i.text.contains('/') {
                        Err(item.error(format!("{:?} is not an interface name", i.text)))
                    } else {
                        Ok(i.text.clone())
                    }
                })
                .collect::<Result<_, _>>()?;
            block.fast_path = Some(crate::config::FastPath { mode, interfaces });
        }
        "bind" => {
            item.no_block()?;
            if item.args.is_empty() {
                return Err(item.error("want at least one address"));
            }
            for arg in &item.args {
                let ip: IpAddr = arg.text.parse().map_err(|_| {
                    item.error(format!(
                        "{:?} is not an IP address (interface names are not supported)",
                        arg.text
                    ))
                })?;
                if !block.bind.contains(&ip) {
                    block.bind.push(ip);
                }
            }
        }
        "cache" => block.cache = Some(parse_cache(item, &block.zones)?),
        "forward" => block.forward = Some(parse_forward(item)?),
        "prometheus" => {
            item.no_block()?;
            block.prometheus = Some(match item.args.as_slice() {
                [] => DEFAULT_PROMETHEUS_ADDR,
                [addr] => parse_listen_addr(&addr.text).map_err(|m| item.error(m))?,
                _ => return Err(item.error("takes at most one address")),
            });
        }
        "health" => {
            block.health = Some(match item.args.as_slice() {
                [] => DEFAULT_HEALTH_ADDR,
                [addr] => parse_listen_addr(&addr.text).map_err(|m| item.error(m))?,
                _ => return Err(item.error("takes at most one address")),
            });
            for option in item.block_items() {
                match (option.name.text.as_str(), option.arg_texts().as_slice()) {
                    ("lameduck", [duration]) => {
                        parse_go_duration(duration).map_err(|m| option.error(m))?;
                    }
                    ("lameduck", _) => return Err(option.error("want one duration")),
                    (other, _) => {
                        return Err(option.error(format!(
                            "unknown option {other:?} of health (want lameduck)"
                        )))
                    }
                }
            }
        }
        _ => {
            let hint = if name.ends_with(';') || item.args.iter().any(|a| a.text.ends_with(';')) {
                " (';' does not separate directives in a Corefile: put each on its own line)"
            } else {
                " (node-local-dns supports errors, cache, reload, loop, bind, forward, prometheus, health, log, import, fastpath)"
            };
            return Err(CorefileError::UnknownDirective {
                location: item.name.location(),
                name: name.to_owned(),
                hint: hint.to_owned(),
            });
        }
    }
    Ok(())
}

/// A listen address: `IP:port`, `[v6]:port`, `:port` (every address), `localhost:port`.
fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not a listen address (want [IP]:port)");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

fn parse_reload(item: &Item<'_>) -> Result<Reload, CorefileError> {
    item.no_block()?;
    let args = item.arg_texts();
    if args.len() > 2 {
        return Err(item.error("takes at most INTERVAL and JITTER"));
    }
    let mut interval = DEFAULT_RELOAD_INTERVAL;
    let mut jitter = DEFAULT_RELOAD_JITTER;
    if let Some(text) = args.first() {
        interval = parse_go_duration(text).map_err(|m| item.error(m))?;
        if interval < MIN_RELOAD_INTERVAL {
            return Err(item.error(format!(
                "interval {text} is below the minimum of {}s",
                MIN_RELOAD_INTERVAL.as_secs()
            )));
        }
    }
    if let Some(text) = args.get(1) {
        jitter = parse_go_duration(text).map_err(|m| item.error(m))?;
        // Zero turns jitter off; otherwise CoreDNS wants at least a second.
        if jitter != Duration::ZERO && jitter < MIN_RELOAD_JITTER {
            return Err(item.error(format!(
                "jitter {text} is below the minimum of {}s",
                MIN_RELOAD_JITTER.as_secs()
            )));
        }
    }
    // CoreDNS lowers a jitter above half the interval to half the interval.
    jitter = jitter.min(interval / 2);
    Ok(Reload { interval, jitter })
}

fn parse_seconds(item: &Item<'_>, text: &str, what: &str) -> Result<u64, CorefileError> {
    text.parse::<u64>()
        .map_err(|_| item.error(format!("{what} {text:?} is not a number of seconds")))
}

fn parse_cache(item: &Item<'_>, block_zones: &[String]) -> Result<cache::Policy, CorefileError> {
    let mut policy = cache::Policy::default();
    let mut args = item.arg_texts();
    if let Some(first) = args.first() {
        // As in CoreDNS: a first argument that is an integer is the TTL, anything else a zone.
        if let Ok(ttl) = first.parse::<i64>() {
            if ttl <= 0 {
                return Err(item.error(format!("TTL {ttl} can not be zero or negative")));
            }
            let ttl = Duration::from_secs(ttl.unsigned_abs());
            policy.success.max_ttl = ttl;
            policy.denial.max_ttl = ttl;
            args.remove(0);
        }
    }
    for text in &args {
        let zone = normalize_zone(text).map_err(|m| item.error(m))?;
        if let Some(uncovered) = block_zones.iter().find(|z| !zone_within(z, &zone)) {
            return Err(item.error(format!(
                "{text:?} is neither a TTL in seconds nor a zone covering the block's {uncovered} (caching part of a block is not supported)"            )));
        }
    }
    for option in item.block_items() {
        let oargs = option.arg_texts();
        match option.name.text.as_str() {
            kind @ ("success" | "denial") => {
                let limits = if kind == "success" {
                    &mut policy.success
                } else {
                    &mut policy.denial
                };
                parse_limits(option, &oargs, limits)?;
            }
            "prefetch" => {
                if oargs.is_empty() || oargs.len() > 3 {
                    return Err(option.error("want AMOUNT [DURATION [PERCENTAGE%]]"));
                }
                let amount: u32 = oargs[0].parse().map_err(|_| {
                    option.error(format!("amount {:?} is not a number", oargs[0]))
                })?;
                if amount == 0 {
                    return Err(option.error("amount must be at least 1"));
                }
                let mut prefetch = Prefetch {
                    amount,
                    window: DEFAULT_PREFETCH_WINDOW,
                    percentage: DEFAULT_PREFETCH_PERCENTAGE,
                };
                if let Some(text) = oargs.get(1) {
                    prefetch.window = parse_go_duration(text).map_err(|m| option.error(m))?;
                }
                if let Some(text) = oargs.get(2) {
                    let number = text.strip_suffix('%').ok_or_else(|| {
                        option.error(format!("percentage {text:?} must end with '%'"))
                    })?;
                    let pct: u8 = number
                        .parse()
                        .ok()
                        .filter(|p| PREFETCH_PERCENTAGE_RANGE.contains(p))
                        .ok_or_else(|| {
                            option.error(format!(
                                "percentage {text:?} is not in [{}%, {}%]",
                                PREFETCH_PERCENTAGE_RANGE.start(),
                                PREFETCH_PERCENTAGE_RANGE.end()
                            ))
                        })?;
                    prefetch.percentage = pct;
                }
                policy.prefetch = Some(prefetch);
            }
            "serve_stale" => {
                if oargs.len() > 2 {
                    return Err(option.error("want [DURATION] [immediate|verify]"));
                }
                let mut stale = ServeStale {
                    max_stale: DEFAULT_SERVE_STALE,
                    ttl: cache::DEFAULT_STALE_TTL,
                    mode: StaleMode::Immediate,
                    failure_recheck: cache::DEFAULT_FAILURE_RECHECK,
                };
                if let Some(text) = oargs.first() {
                    stale.max_stale = parse_go_duration(text).map_err(|m| option.error(m))?;
                }
                match oargs.get(1).copied() {
                    None | Some("immediate") => {}
                    Some("verify") => stale.mode = StaleMode::Verify,
                    Some(other) => {
                        return Err(option.error(format!(
                            "refresh mode {other:?} is neither immediate nor verify"
                        )))
                    }
                }
                policy.serve_stale = Some(stale);
            }
            "servfail" => {
                let [text] = oargs.as_slice() else {
                    return Err(option.error("want one duration"));
                };
                let ttl = parse_go_duration(text).map_err(|m| option.error(m))?;
                if ttl > MAX_SERVFAIL_TTL {
                    return Err(option.error(format!(
                        "{text} is above the maximum of {}m",
                        MAX_SERVFAIL_TTL.as_secs() / 60
                    )));
                }
                policy.servfail_ttl = ttl;
            }
            other @ ("disable" | "keepttl") => {
                return Err(option.error(format!(
                    "option {other:?} of cache is not supported by node-local-dns"
                )))
            }
            other => {
                return Err(option.error(format!(
                    "unknown option {other:?} of cache (want success, denial, prefetch, serve_stale or servfail)"
                )))
            }
        }
    }
    Ok(policy)
}

/// `success|denial CAPACITY [TTL [MINTTL]]`.
fn parse_limits(
    option: &Item<'_>,
    args: &[&str],
    limits: &mut Limits,
) -> Result<(), CorefileError> {
    if args.is_empty() || args.len() > 3 {
        return Err(option.error("want CAPACITY [TTL [MINTTL]]"));
    }
    let capacity: usize = args[0]
        .parse()
        .map_err(|_| option.error(format!("capacity {:?} is not a number", args[0])))?;
    if capacity == 0 {
        return Err(option.error("capacity must be at least 1"));
    }
    limits.capacity = capacity;
    if let Some(text) = args.get(1) {
        let ttl = parse_seconds(option, text, "TTL")?;
        if ttl == 0 {
            return Err(option.error("TTL can not be zero"));
        }
        limits.max_ttl = Duration::from_secs(ttl);
    }
    if let Some(text) = args.get(2) {
        limits.min_ttl = Duration::from_secs(parse_seconds(option, text, "minimum TTL")?);
    }
    Ok(())
}

fn parse_forward(item: &Item<'_>) -> Result<Forward, CorefileError> {
    let args = item.arg_texts();
    if args.len() < 2 {
        return Err(item.error("want FROM TO..."));
    }
    let from = normalize_zone(args[0]).map_err(|m| item.error(m))?;
    let mut to = Vec::new();
    let base = item.name.file.parent().unwrap_or(Path::new(""));
    for text in &args[1..] {
        to.extend(parse_upstream(item, text, base)?);
    }
    if to.len() > MAX_UPSTREAMS {
        return Err(item.error(format!(
            "{} upstreams, at most {MAX_UPSTREAMS} are allowed",
            to.len()
        )));
    }
    let mut forward = Forward::new(from, to);
    for option in item.block_items() {
        let oargs = option.arg_texts();
        let name = option.name.text.as_str();
        let no_args = || {
            if oargs.is_empty() {
                Ok(())
            } else {
                Err(option.error("takes no arguments"))
            }
        };
        let one_arg = || match oargs.as_slice() {
            [one] => Ok(*one),
            _ => Err(option.error("want one argument")),
        };
        match name {
            "force_tcp" => {
                no_args()?;
                forward.force_tcp = true;
            }
            "prefer_udp" => {
                no_args()?;
                forward.prefer_udp = true;
            }
            "expire" => {
                forward.expire = parse_go_duration(one_arg()?).map_err(|m| option.error(m))?
            }
            "read_timeout" => {
                forward.attempt_timeout =
                    parse_go_duration(one_arg()?).map_err(|m| option.error(m))?
            }
            "max_fails" => {
                let text = one_arg()?;
                forward.max_fails = text
                    .parse()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
            }
            "max_idle_conns" => {
                let text = one_arg()?;
                text.parse::<u32>()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
            }
            "health_check" => {
                let Some(text) = oargs.first() else {
                    return Err(option.error("want DURATION [no_rec] [domain NAME]"));
                };
                forward.health_check = parse_go_duration(text).map_err(|m| option.error(m))?;
                let mut rest = oargs[1..].iter();
                while let Some(word) = rest.next() {
                    match *word {
                        "no_rec" => forward.health_check_no_rec = true,
                        "domain" => {
                            let name = rest
                                .next()
                                .ok_or_else(|| option.error("domain wants a name"))?;
                            forward.health_check_domain =
                                normalize_zone(name).map_err(|m| option.error(m))?;
                        }
                        other => {
                            return Err(option.error(format!(
                                "unknown argument {other:?} (want no_rec or domain NAME)"
                            )))
                        }
                    }
                }
            }
            "policy" => {
                forward.policy = match one_arg()? {
                    "random" => config::Policy::Random,
                    "round_robin" => config::Policy::RoundRobin,
                    "sequential" => config::Policy::Sequential,
                    other => {
                        return Err(option.error(format!(
                            "unknown policy {other:?} (want random, round_robin or sequential)"
                        )))
                    }
                }
            }
            "max_concurrent" => {
                let text = one_arg()?;
                let n: usize = text
                    .parse()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
                forward.max_concurrent = (n > 0).then_some(n);
            }
            "except" => {
                if oargs.is_empty() {
                    return Err(option.error("want at least one zone"));
                }
                for zone in oargs {
                    let zone = normalize_zone(zone).map_err(|m| option.error(m))?;
                    if !forward.except.contains(&zone) {
                        forward.except.push(zone);
                    }
                }
            }
            "tls"
            | "tls_servername"
            | "next"
            | "failover"
            | "failfast_all_unhealthy_upstreams"
            | "source_address"
            | "max_connect_attempts" => {
                return Err(option.error(format!(
                    "option {name:?} of forward is not supported by node-local-dns"
                )))
            }
            other => return Err(option.error(format!("unknown option {other:?} of forward"))),
        }
    }
    if forward.force_tcp && forward.prefer_udp {
        return Err(item.error("force_tcp and prefer_udp can not both be set"));
    }
    Ok(forward)
}

/// One `forward` TO: `IP`, `IP:port`, `[v6]:port`, `dns://…`, or a resolv.conf-style file.
fn parse_upstream(
    item: &Item<'_>,
    text: &str,
    base: &Path,
) -> Result<Vec<SocketAddr>, CorefileError> {
    let mut rest = text;
    if let Some(index) = rest.find("://") {
        let scheme = rest[..index].to_ascii_lowercase();
        if scheme != "dns" {
            return Err(item.error(format!(
                "{text:?}: transport {scheme}:// is not supported (only plain DNS)"
            )));
        }
        rest = &rest[index + 3..];
    }
    if let Some(addr) = parse_host_port(rest) {
        return Ok(vec![addr]);
    }
    let path = if Path::new(rest).is_absolute() {
        PathBuf::from(rest)
    } else {
        base.join(rest)
    };
    if !text.contains("://") && path.is_file() {
        let content = read(&path)?;
        let servers = resolv_conf_nameservers(&content);
        if servers.is_empty() {
            return Err(item.error(format!("no nameservers found in {}", path.display())));
        }
        return Ok(servers
            .into_iter()
            .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
            .collect());
    }
    Err(item.error(format!(
        "{text:?} is not an upstream address (want IP[:port])"
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::corefile::parse;
    use crate::corefile::test_util::*;

    #[test]
    fn cache_forms() {
        let block = one(".:53 {\n cache\n}");
        assert_eq!(block.cache, Some(cache::Policy::default()));
        let policy = one(".:53 {\n cache 30\n}").cache.unwrap();
        assert_eq!(policy.success.max_ttl, Duration::from_secs(30));
        assert_eq!(policy.denial.max_ttl, Duration::from_secs(30));
        assert_eq!(policy.success.capacity, cache::DEFAULT_CAPACITY);
        assert_eq!(policy.success.min_ttl, cache::DEFAULT_MIN_TTL);
        // The first option on the brace line, the closing brace after the last one.
        let policy = one(".:53 {\n cache 60 { success 5000 30 2\n denial 100 5 }\n}")
            .cache
            .unwrap();
        assert_eq!(
            policy.success,
            Limits {
                capacity: 5000,
                max_ttl: Duration::from_secs(30),
                min_ttl: Duration::from_secs(2)
            }
        );
        assert_eq!(
            policy.denial,
            Limits {
                capacity: 100,
                max_ttl: Duration::from_secs(5),
                min_ttl: cache::DEFAULT_MIN_TTL
            }
        );
        let policy = one(
            ".:53 {\n cache {\n prefetch 3 30s 20%\n serve_stale 2h verify\n servfail 2s\n }\n}",
        )
        .cache
        .unwrap();
        assert_eq!(
            policy.prefetch,
            Some(Prefetch {
                amount: 3,
                window: Duration::from_secs(30),
                percentage: 20
            })
        );
        let stale = policy.serve_stale.unwrap();
        assert_eq!(
            (stale.max_stale, stale.mode),
            (Duration::from_secs(7200), StaleMode::Verify)
        );
        assert_eq!(policy.servfail_ttl, Duration::from_secs(2));
        let policy = one(".:53 {\n cache {\n prefetch 2\n serve_stale\n }\n}")
            .cache
            .unwrap();
        assert_eq!(policy.prefetch.unwrap().window, DEFAULT_PREFETCH_WINDOW);
        assert_eq!(policy.serve_stale.unwrap().mode, StaleMode::Immediate);
        // Zones that cover the block are fine; narrower ones are not representable.
        one("cluster.local:53 {\n cache 30 cluster.local .\n}");
        assert!(err("cluster.local:53 {\n cache 30 svc.cluster.local\n}")
            .contains("caching part of a block"));
    }

    #[test]
    fn cache_errors() {
        for (text, want) in [
            ("cache 0", "zero or negative"),
            ("cache -5", "zero or negative"),
            ("cache 3x", "neither a TTL"),
            ("cache {\n success\n}", "CAPACITY"),
            ("cache {\n success abc\n}", "capacity \"abc\""),
            ("cache {\n success 0\n}", "at least 1"),
            ("cache {\n denial 10 0\n}", "zero"),
            ("cache {\n prefetch 1 1m 5%\n}", "[10%, 90%]"),
            ("cache {\n prefetch 1 1m 50\n}", "'%'"),
            ("cache {\n serve_stale 1h later\n}", "immediate nor verify"),
            ("cache {\n servfail 10m\n}", "maximum"),
            ("cache {\n keepttl\n}", "not supported"),
            ("cache {\n bogus\n}", "unknown option"),
            ("cache\n cache", "given twice"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains("cache: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn forward_forms() {
        let f =
            one(".:53 {\n forward . 1.1.1.1 8.8.8.8:5353 [2001:db8::1]:53 dns://9.9.9.9 ::1\n}")
                .forward
                .unwrap();
        let want: Vec<SocketAddr> = [
            "1.1.1.1:53",
            "8.8.8.8:5353",
            "[2001:db8::1]:53",
            "9.9.9.9:53",
            "[::1]:53",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(f.to, want);
        assert_eq!(f.from, ".");
        assert_eq!(f, Forward::new(".".to_owned(), want));
        let f = one(
            "a:53 {\n forward A.example 10.0.0.1 {\n  force_tcp\n  expire 1m30s\n  max_fails 0\n  health_check 250ms no_rec domain Probe.Example\n  policy sequential\n  max_concurrent 1000\n  except B.example c.example\n  read_timeout 1s\n  max_idle_conns 4\n }\n}",
        )
        .forward
        .unwrap();
        assert_eq!(f.from, "a.example.");
        assert!(f.force_tcp && !f.prefer_udp);
        assert_eq!(f.expire, Duration::from_secs(90));
        assert_eq!(f.max_fails, 0);
        assert_eq!(f.health_check, Duration::from_millis(250));
        assert!(f.health_check_no_rec);
        assert_eq!(f.health_check_domain, "probe.example.");
        assert_eq!(f.policy, config::Policy::Sequential);
        assert_eq!(f.max_concurrent, Some(1000));
        assert_eq!(f.except, vec!["b.example.", "c.example."]);
        assert_eq!(f.attempt_timeout, Duration::from_secs(1));
    }

    #[test]
    fn forward_errors() {
        let upstreams: Vec<String> = (1..=16).map(|i| format!("10.0.0.{i}")).collect();
        let too_many = format!("forward . {}", upstreams.join(" "));
        for (text, want) in [
            ("forward .", "want FROM TO"),
            (
                "forward . x.y",
                "\"x.y\" is not an upstream address (want IP[:port])",
            ),
            ("forward . tls://1.1.1.1", "tls://"),
            ("forward . 1.1.1.1:99999", "not an upstream address"),
            (too_many.as_str(), "at most 15"),
            (
                "forward . 1.1.1.1 {\n force_tcp\n prefer_udp\n}",
                "force_tcp and prefer_udp",
            ),
            ("forward . 1.1.1.1 {\n policy fastest\n}", "unknown policy"),
            ("forward . 1.1.1.1 {\n tls_servername x\n}", "not supported"),
            ("forward . 1.1.1.1 {\n expire 10\n}", "missing a unit"),
            ("forward . 1.1.1.1 {\n max_fails -1\n}", "not a number"),
            ("forward . 1.1.1.1 {\n force_tcp yes\n}", "no arguments"),
            ("forward . 1.1.1.1 {\n bogus\n}", "unknown option"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = err(".:53 {\n forward . 1.1.1.1 {\n force_tcp\n prefer_udp\n }\n}");
        assert_eq!(
            e,
            "Corefile:2: forward: force_tcp and prefer_udp can not both be set"
        );
        let e = err(".:53 {\n errors\n\n forward . x.y\n}");
        assert_eq!(
            e,
            "Corefile:4: forward: \"x.y\" is not an upstream address (want IP[:port])"
        );
    }

    #[test]
    fn forward_reads_a_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("nld-corefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            "# comment\nsearch example\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\noptions ndots:5\n",
        )
        .unwrap();
        std::fs::write(dir.join("empty.conf"), "search x\n").unwrap();
        let corefile = dir.join("Corefile");
        let config = parse(".:53 {\n forward . resolv.conf 10.0.0.1\n}", &corefile).unwrap();
        let to = &config.blocks[0].forward.as_ref().unwrap().to;
        let want: Vec<SocketAddr> = ["192.0.2.1:53", "[2001:db8::53]:53", "10.0.0.1:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(*to, want);
        let e = parse(".:53 {\n forward . empty.conf\n}", &corefile)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no nameservers"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_health_bind_reload() {
        let block = one(
            ".:53 {\n prometheus :9253\n health [fd00::1]:8080 {\n  lameduck 5s\n }\n bind 127.0.0.1 ::1 127.0.0.1\n bind 127.0.0.2\n reload 10s 2s\n loop\n errors {\n  consolidate 5m \".* timeout$\"\n }\n log . {\n  class error\n }\n}",
        );
        assert_eq!(block.prometheus, Some("0.0.0.0:9253".parse().unwrap()));
        assert_eq!(block.health, Some("[fd00::1]:8080".parse().unwrap()));
        let binds: Vec<IpAddr> = ["127.0.0.1", "::1", "127.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(block.bind, binds);
        assert_eq!(
            block.reload,
            Some(Reload {
                interval: Duration::from_secs(10),
                jitter: Duration::from_secs(2)
            })
        );
        assert!(block.loop_detect && block.errors && block.log);
        let block = one(".:53 {\n prometheus\n health\n reload\n}");
        assert_eq!(block.prometheus, Some(DEFAULT_PROMETHEUS_ADDR));
        assert_eq!(block.health, Some(DEFAULT_HEALTH_ADDR));
        assert_eq!(
            block.reload,
            Some(Reload {
                interval: DEFAULT_RELOAD_INTERVAL,
                jitter: DEFAULT_RELOAD_JITTER
            })
        );
        assert_eq!(
            one(".:53 {\n reload 2s 0\n}").reload.unwrap().jitter,
            Duration::ZERO
        );
        assert_eq!(
            one(".:53 {\n reload 10s\n}").reload.unwrap().jitter,
            Duration::from_secs(5)
        );
        let block = one(".:53 {\n prometheus localhost:9153\n reload 4s 10s\n}");
        assert_eq!(block.prometheus, Some(DEFAULT_PROMETHEUS_ADDR));
        assert_eq!(block.reload.unwrap().jitter, Duration::from_secs(2));
        let block = one(".:53 {\n}");
        assert!(block.cache.is_none() && block.forward.is_none() && !block.errors);
    }

    #[test]
    fn small_directive_errors() {
        for (text, want) in [
            ("bind eth0", "interface names are not supported"),
            ("bind", "at least one address"),
            ("bind 127.0.0.1 {\n}", "does not take a block"),
            ("prometheus 0.0.0.0", "not a listen address"),
            ("prometheus a b", "at most one"),
            ("health 1.2.3.4:x", "not a listen address"),
            ("health :8080 {\n lameduck\n}", "one duration"),
            ("reload 1s", "minimum"),
            ("reload 10s 500ms", "minimum"),
            ("reload 10", "missing a unit"),
            ("loop now", "no arguments"),
            ("errors {\n bogus\n}", "unknown option"),
            ("health\n health", "given twice"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_directives_are_errors() {
        assert_eq!(
            err(".:53 {\n errors\n cache 30\n rewrite name a b\n}"),
            "Corefile:4: unknown directive \"rewrite\" (node-local-dns supports errors, cache, reload, loop, bind, forward, prometheus, health, log, import, fastpath)"
        );
        let e = err(".:53 { errors; cache 30 }");
        assert!(e.contains("unknown directive \"errors;\""), "{e}");
        assert!(e.contains("';' does not separate directives"), "{e}");
    }

    #[test]
    fn fastpath_directive() {
        let fp = one(".:53 {\n fastpath tc veth1 eth0\n forward . 1.1.1.1\n}")
            .fast_path
            .unwrap();
        assert_eq!(fp.mode, ebpf::dns::Mode::Tc);
        assert_eq!(fp.interfaces, vec!["veth1", "eth0"]);
        let e = err(".:53 {\n fastpath xdp\n}");
        assert!(e.starts_with("Corefile:2: fastpath: want a mode"), "{e}");
        let e = err(".:53 {\n fastpath afxdp eth0\n}");
        assert!(
            e.starts_with("Corefile:2: fastpath: unknown fast path mode"),
            "{e}"
        );
    }
}
