//! The flags checked and turned into what to ask, without IO: the store (from `--store`, or
//! the agent's config with `--shoot`), the query text for its API with the shoot's namespace,
//! the range in nanoseconds, and the request targets. `now` is passed in.

use crate::config::Config;
use crate::route::{self, Target};

use super::selector::{self, Selector};
use super::store::{self, QueryBase};
use super::time::{format_rfc3339, parse_duration, parse_instant};
use super::{Api, Args, Output, QueryError, DEFAULT_SINCE};

/// The label that holds a line's namespace (Gardener's, as the agent sends it).
pub const NAMESPACE_LABEL: &str = "namespace_name";

/// What the command asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The store's API and query base.
    pub store: QueryBase,
    /// Loki's `X-Scope-OrgID`, from the config's store.
    pub tenant: Option<String>,
    /// The query as sent: LogQL for Loki, LogsQL for VictoriaLogs.
    pub query: String,
    /// The shoot namespace VictoriaLogs is restricted to (its `extra_filters`); for Loki it is
    /// in the query's selector.
    pub namespace: Option<String>,
    /// The range's start, Unix nanoseconds, inclusive.
    pub start: i64,
    /// The range's end, exclusive.
    pub end: i64,
    /// The most lines of the range.
    pub limit: usize,
    /// Whether new lines are followed.
    pub follow: bool,
    /// The output form.
    pub output: Output,
}

/// The plan of `args`, with the agent's `config` if `--config` was given (already loaded).
pub fn plan(args: &Args, config: Option<&Config>, now: i64) -> Result<Plan, QueryError> {
    let usage = |text: &str| Err(QueryError::Usage(text.to_owned()));
    if args.since.is_some() && (args.from.is_some() || args.to.is_some()) {
        return usage("--since and --from/--to do not go together");
    }
    if args.to.is_some() && args.from.is_none() {
        return usage("--to needs --from");
    }
    if args.follow && args.to.is_some() {
        return usage("--follow reads on from now: not with --to");
    }
    if args.limit == 0 {
        return usage("--limit must be at least 1");
    }
    let bad_time =
        |flag: &str, e: super::time::TimeError| QueryError::Usage(format!("{flag}: {e}"));
    let (start, end) = match (&args.from, &args.to) {
        (Some(from), to) => {
            let start = parse_instant(from).map_err(|e| bad_time("--from", e))?;
            let end = match to {
                Some(to) => parse_instant(to).map_err(|e| bad_time("--to", e))?,
                None => now,
            };
            if start >= end {
                return Err(QueryError::Usage(format!(
                    "--from {} is not before --to {}",
                    format_rfc3339(start),
                    format_rfc3339(end)
                )));
            }
            (start, end)
        }
        (None, _) => {
            let since = args.since.as_deref().unwrap_or(DEFAULT_SINCE);
            let since = parse_duration(since).map_err(|e| bad_time("--since", e))?;
            (now.saturating_sub(since), now)
        }
    };

    let namespace = match &args.shoot {
        None => None,
        Some(shoot) => {
            let namespace = shoot
                .split_once('/')
                .map(|(project, name)| format!("{}{project}--{name}", route::SHOOT_PREFIX));
            match namespace {
                Some(ns) if route::is_shoot_namespace(&ns) => Some(ns),
                _ => {
                    return Err(QueryError::Usage(format!(
                    "--shoot `{shoot}` is not project/name (of a namespace shoot--project--name)"
                )))
                }
            }
        }
    };

    let (url, tenant) = match (&args.store, config) {
        (Some(_), Some(_)) => return usage("--store and --config both name the store: give one"),
        (None, None) => return usage("the store is needed: --store URL, or --config FILE"),
        (Some(url), None) => (url.clone(), None),
        (None, Some(config)) => {
            let target = namespace
                .as_deref()
                .map_or(Target::Seed, |ns| Target::Shoot(ns.into()));
            let endpoint = route::endpoint(&target, &config.seed, &config.shoot);
            (endpoint.url, endpoint.tenant)
        }
    };
    let store = store::resolve(&url, args.api)?;

    let text = args.query.as_deref().unwrap_or("").trim();
    let query = match store.api {
        Api::Loki => match &namespace {
            Some(ns) => selector::add_matcher(text, NAMESPACE_LABEL, ns).ok_or_else(|| {
                QueryError::Usage(
                    "with --shoot a LogQL query starts with a stream selector `{...}`".into(),
                )
            })?,
            None if text.is_empty() => {
                return usage(
                    "Loki needs a query: a stream selector like {namespace_name=\"garden\"}",
                )
            }
            None => text.to_owned(),
        },
        Api::Vlogs if text.is_empty() => "*".to_owned(),
        // The LogQL subset is translated; anything else is LogsQL already.
        Api::Vlogs => Selector::parse(text).map_or_else(|_| text.to_owned(), |s| s.to_logsql()),
    };
    Ok(Plan {
        tenant: if store.api == Api::Loki { tenant } else { None },
        store,
        query,
        namespace,
        start,
        end,
        limit: args.limit,
        follow: args.follow,
        output: args.output,
    })
}

impl Plan {
    /// The URL of the range query: the newest `limit` lines of `[start, end)`.
    pub fn range_url(&self) -> String {
        match self.store.api {
            Api::Loki => self.loki_url(self.start, self.end, "backward"),
            Api::Vlogs => format!(
                "{}/select/logsql/query?{}",
                self.store.base,
                form(&[
                    ("query", &self.query),
                    ("start", &format_rfc3339(self.start)),
                    ("end", &format_rfc3339(self.end)),
                    ("limit", &self.limit.to_string()),
                    ("extra_filters", &self.extra_filters()),
                ])
            ),
        }
    }

    /// Loki's follow: the oldest `limit` lines of `[start, end)`.
    pub fn poll_url(&self, start: i64, end: i64) -> String {
        self.loki_url(start, end, "forward")
    }

    /// VictoriaLogs' live tail.
    pub fn tail_url(&self) -> String {
        format!(
            "{}/select/logsql/tail?{}",
            self.store.base,
            form(&[
                ("query", &self.query),
                ("extra_filters", &self.extra_filters())
            ])
        )
    }

    fn loki_url(&self, start: i64, end: i64, direction: &str) -> String {
        format!(
            "{}/api/v1/query_range?{}",
            self.store.base,
            form(&[
                ("query", &self.query),
                ("start", &start.to_string()),
                ("end", &end.to_string()),
                ("limit", &self.limit.to_string()),
                ("direction", direction),
            ])
        )
    }

    fn extra_filters(&self) -> String {
        // A namespace is DNS-label characters only: nothing to escape in JSON.
        self.namespace
            .as_ref()
            .map(|ns| format!("{{\"{NAMESPACE_LABEL}\":\"{ns}\"}}"))
            .unwrap_or_default()
    }
}

/// `k=v&...`, percent-encoded, empty values left out.
fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NOW: i64 = 1_796_551_200_000_000_000;
    const HOUR: i64 = 3_600_000_000_000;

    fn args(store: &str) -> Args {
        Args {
            store: Some(store.into()),
            limit: super::super::DEFAULT_LIMIT,
            ..Args::default()
        }
    }

    fn usage(args: &Args) -> String {
        match plan(args, None, NOW) {
            Err(QueryError::Usage(text)) => text,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn victoria_logs_plan() {
        let mut a = args("http://127.0.0.1:9428/insert/loki/api/v1/push");
        a.query = Some(r#"{pod_name="etcd-0"} |= "leader""#.into());
        a.shoot = Some("core/aws-01".into());
        a.since = Some("15m".into());
        a.limit = 7;
        let p = plan(&a, None, NOW).unwrap();
        assert_eq!(p.store.api, Api::Vlogs);
        assert_eq!(p.query, r#""pod_name":="etcd-0" *"leader"*"#);
        assert_eq!(p.namespace.as_deref(), Some("shoot--core--aws-01"));
        assert_eq!((p.start, p.end), (NOW - HOUR / 4, NOW));
        assert_eq!(
            p.range_url(),
            "http://127.0.0.1:9428/select/logsql/query?query=%22pod_name%22%3A%3D%22etcd-0%22%20%2A%22leader%22%2A\
             &start=2026-12-06T09%3A45%3A00.000000000Z&end=2026-12-06T10%3A00%3A00.000000000Z&limit=7\
             &extra_filters=%7B%22namespace_name%22%3A%22shoot--core--aws-01%22%7D"
        );
        assert_eq!(
            p.tail_url(),
            "http://127.0.0.1:9428/select/logsql/tail?query=%22pod_name%22%3A%3D%22etcd-0%22%20%2A%22leader%22%2A\
             &extra_filters=%7B%22namespace_name%22%3A%22shoot--core--aws-01%22%7D"
        );
        // Raw LogsQL passes through; no query is every line; no shoot, no extra filter.
        let mut a = args("http://vl:9428");
        a.api = Some(Api::Vlogs);
        a.query = Some("error | fields _time, _msg".into());
        let p = plan(&a, None, NOW).unwrap();
        assert_eq!(p.query, "error | fields _time, _msg");
        assert!(!p.range_url().contains("extra_filters"));
        a.query = None;
        assert_eq!(plan(&a, None, NOW).unwrap().query, "*");
        assert_eq!((plan(&a, None, NOW).unwrap().start), NOW - HOUR);
    }

    #[test]
    fn loki_plan() {
        let mut a = args("http://logging.garden.svc:3100/vali/api/v1/push");
        a.query = Some(r#"{container_name="etcd"} | json"#.into());
        a.shoot = Some("p/n".into());
        a.from = Some("2026-12-06T08:00:00Z".into());
        a.to = Some("1796548800.5".into());
        let p = plan(&a, None, NOW).unwrap();
        assert_eq!(
            p.query,
            r#"{namespace_name="shoot--p--n", container_name="etcd"} | json"#
        );
        assert_eq!(p.namespace.as_deref(), Some("shoot--p--n"));
        assert_eq!(
            p.range_url(),
            "http://logging.garden.svc:3100/vali/api/v1/query_range?query=%7Bnamespace_name%3D%22shoot--p--n%22%2C%20container_name%3D%22etcd%22%7D%20%7C%20json\
             &start=1796544000000000000&end=1796548800500000000&limit=100&direction=backward"
        );
        assert!(p
            .poll_url(5, 9)
            .ends_with("&start=5&end=9&limit=100&direction=forward"));
        a.query = Some("rate({a=\"b\"}[1m])".into());
        assert!(usage(&a).contains("starts with a stream selector"));
        a.shoot = None;
        a.query = None;
        assert!(usage(&a).contains("Loki needs a query"));
    }

    #[test]
    fn the_agents_config_names_the_store() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/example.yaml")).unwrap();
        let config = Config::from_yaml(&text).unwrap();
        let a = Args {
            shoot: Some("core/aws-01".into()),
            limit: 10,
            ..Args::default()
        };
        let p = plan(&a, Some(&config), NOW).unwrap();
        assert_eq!(
            p.store,
            QueryBase {
                api: Api::Loki,
                base: "http://logging.shoot--core--aws-01.svc:3100/vali".into()
            }
        );
        assert_eq!(p.query, r#"{namespace_name="shoot--core--aws-01"}"#);
        // Without --shoot: the seed's store (and Loki needs a query then).
        let a = Args {
            query: Some(r#"{namespace_name="garden"}"#.into()),
            limit: 10,
            ..Args::default()
        };
        assert_eq!(
            plan(&a, Some(&config), NOW).unwrap().store.base,
            "http://logging.garden.svc:3100/vali"
        );
        let both = Args {
            store: Some("http://x".into()),
            ..a
        };
        assert!(
            matches!(plan(&both, Some(&config), NOW), Err(QueryError::Usage(t)) if t.contains("give one"))
        );
    }

    #[test]
    fn bad_flags() {
        let base = || {
            let mut a = args("http://vl:9428");
            a.api = Some(Api::Vlogs);
            a
        };
        let mut a = base();
        a.since = Some("1h".into());
        a.from = Some("1796540000".into());
        assert_eq!(usage(&a), "--since and --from/--to do not go together");
        let mut a = base();
        a.to = Some("1796540000".into());
        assert_eq!(usage(&a), "--to needs --from");
        let mut a = base();
        a.from = Some("1796540000".into());
        a.to = Some("1796550000".into());
        a.follow = true;
        assert_eq!(usage(&a), "--follow reads on from now: not with --to");
        let mut a = base();
        a.from = Some("1796560000".into());
        assert!(usage(&a).starts_with("--from 2026-12-06T12:26:40.000000000Z is not before --to"));
        let mut a = base();
        a.since = Some("yesterday".into());
        assert!(usage(&a).starts_with("--since: `yesterday` is not a duration"));
        let mut a = base();
        a.from = Some("noon".into());
        assert!(usage(&a).starts_with("--from: `noon` is neither"));
        let mut a = base();
        a.limit = 0;
        assert_eq!(usage(&a), "--limit must be at least 1");
        let mut a = base();
        a.shoot = Some("core".into());
        assert!(usage(&a).starts_with("--shoot `core` is not project/name"));
        a.shoot = Some("Core/x".into());
        assert!(usage(&a).starts_with("--shoot `Core/x`"));
        let a = Args {
            limit: 1,
            ..Args::default()
        };
        assert_eq!(
            usage(&a),
            "the store is needed: --store URL, or --config FILE"
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form(&[("q", "a b&c=é~"), ("empty", ""), ("n", "1")]),
            "q=a%20b%26c%3D%C3%A9~&n=1"
        );
    }
}
