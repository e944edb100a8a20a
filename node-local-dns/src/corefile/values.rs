//! Argument forms used beyond one plugin: Go durations (node-cache's flags take them too),
//! `IP[:port]` (the template too) and the nameservers of a resolv.conf.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::DEFAULT_PORT;

/// `IP`, `IP:port` or `[v6]:port` (port 53 when not written).
pub(crate) fn parse_host_port(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, DEFAULT_PORT));
    }
    text.parse::<SocketAddr>().ok()
}

/// The `nameserver` addresses of a resolv.conf (entries that are not plain IPs, such as
/// scoped `fe80::1%eth0`, are left out).
pub fn resolv_conf_nameservers(content: &str) -> Vec<IpAddr> {
    content
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// A Go `time.ParseDuration` string (`500ms`, `1m30s`, `1.5h`, `0`); negative is refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (like 500ms, 30s, 1m30s)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.starts_with('-') {
        return Err(format!("duration {text:?} can not be negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} is missing a unit (like s or ms)"))?;
        let number = &rest[..number_end];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(bad)?;
        let mut scale = unit_nanos;
        for digit in frac.chars().take(30) {
            scale /= 10;
            nanos += u128::from(digit.to_digit(10).unwrap_or(0)) * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(bad)?;
        if total_nanos > u128::from(u64::MAX) {
            return Err(bad());
        }
    }
    let nanos = u64::try_from(total_nanos).map_err(|_| bad())?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn go_durations() {
        for (text, ms) in [
            ("0", 0),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("1.5h", 5_400_000),
            ("2s", 2000),
            ("1000us", 1),
            ("+3s", 3000),
            (".5s", 500),
        ] {
            assert_eq!(
                parse_go_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for text in [
            "",
            "10",
            "1x",
            "-1s",
            "s",
            "1..2s",
            "1s2",
            "99999999999999999999h",
        ] {
            assert!(parse_go_duration(text).is_err(), "{text}");
        }
    }
}
