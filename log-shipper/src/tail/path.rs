//! The kubelet's log layout, parsed from names alone:
//! `<root>/<namespace>_<pod>_<uid>/<container>/<restart count>.log`, rotated to
//! `<restart count>.log.<YYYYMMDD-hhmmss>`, then compressed to `….gz` (through `….gz.tmp`).

use std::sync::Arc;

/// The pod and container a log file belongs to, from its directory names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Container {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub uid: String,
    /// The container's name.
    pub container: String,
}

/// Parses a pod directory's name, `<namespace>_<pod>_<uid>`. Namespaces and pod names are DNS
/// labels and subdomains, so neither holds `_`; anything else is not a pod directory.
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if parts.next().is_some() || !valid(namespace) || !valid(pod) || !valid(uid) {
        return None;
    }
    Some((namespace, pod, uid))
}

/// A container directory's name: a DNS label.
pub fn valid_container_dir(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What a file name in a container directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogName {
    /// `<n>.log`: the file the runtime writes.
    Live(u32),
    /// `<n>.log.<YYYYMMDD-hhmmss>`: renamed by the kubelet's rotation, uncompressed; the
    /// runtime may still write to it until it reopens `<n>.log`.
    Rotated(u32),
}

impl LogName {
    /// Parses a file name; `None` for anything not read (`.gz`, `.tmp`, other files).
    pub fn parse(name: &str) -> Option<LogName> {
        let (n, rest) = name.split_once(".log")?;
        if n.is_empty() || n.len() > 9 || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u32 = n.parse().ok()?;
        match rest {
            "" => Some(LogName::Live(n)),
            _ => {
                let ts = rest.strip_prefix('.')?.as_bytes();
                let shape = ts.len() == 15
                    && ts[8] == b'-'
                    && ts
                        .iter()
                        .enumerate()
                        .all(|(i, b)| i == 8 || b.is_ascii_digit());
                shape.then_some(LogName::Rotated(n))
            }
        }
    }

    /// The restart count.
    pub fn restart(self) -> u32 {
        match self {
            LogName::Live(n) | LogName::Rotated(n) => n,
        }
    }
}

/// Where a log file was found: its container and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The container (shared by its files).
    pub container: Arc<Container>,
    /// The file's kind and restart count.
    pub name: LogName,
}

impl Location {
    /// Whether both are files of the same container's same restart (`0.log` and its rotated
    /// `0.log.<ts>`), the only renames the kubelet does.
    pub fn same_log(&self, other: &Location) -> bool {
        self.container == other.container && self.name.restart() == other.name.restart()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs() {
        assert_eq!(
            parse_pod_dir(
                "shoot--p--n_kube-apiserver-7d9f-x2_0b1c2d3e-aaaa-4bbb-8ccc-123456789abc"
            ),
            Some((
                "shoot--p--n",
                "kube-apiserver-7d9f-x2",
                "0b1c2d3e-aaaa-4bbb-8ccc-123456789abc"
            ))
        );
        for bad in [
            "",
            "ns_pod",
            "ns_pod_uid_extra",
            "_pod_uid",
            "ns__uid",
            "NS_pod_uid",
            "ns_pod_uid/",
            "ns pod_x_y",
            "0b1c2d3e-aaaa-4bbb-8ccc-123456789abc",
        ] {
            assert_eq!(parse_pod_dir(bad), None, "{bad:?}");
        }
        assert!(valid_container_dir("etcd"));
        assert!(!valid_container_dir("etcd_x"));
        assert!(!valid_container_dir(""));
    }

    #[test]
    fn log_names() {
        assert_eq!(LogName::parse("0.log"), Some(LogName::Live(0)));
        assert_eq!(LogName::parse("12.log"), Some(LogName::Live(12)));
        assert_eq!(
            LogName::parse("0.log.20261206-075012"),
            Some(LogName::Rotated(0))
        );
        for ignored in [
            "0.log.20261206-075012.gz",
            "0.log.20261206-075012.gz.tmp",
            "0.log.tmp",
            "0.log.2026",
            "x.log",
            ".log",
            "0.txt",
            "0.logx",
            "99999999999.log",
        ] {
            assert_eq!(LogName::parse(ignored), None, "{ignored}");
        }
    }
}
