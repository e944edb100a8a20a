//! Which query API a store URL speaks and where it is, without IO. A push URL from the agent's
//! config works as well as a query base:
//!
//! | URL path ends with | API | query base |
//! | --- | --- | --- |
//! | `/loki/api/v1/push`, `/vali/api/v1/push`, `.../api/v1/query_range` | Loki | the part before `/api/v1/` (`.../loki`, `.../vali`) |
//! | `/loki`, `/vali` | Loki | the URL |
//! | `/otlp/v1/logs` (Loki's OTLP) | Loki | the part before it, then `/loki` |
//! | `/insert/loki/api/v1/push`, `/insert/opentelemetry/v1/logs` (VictoriaLogs' push) | VictoriaLogs | the part before `/insert/` |
//! | `/select/logsql`, `/select/logsql/query`, `/select/logsql/tail` | VictoriaLogs | the part before `/select/` |
//! | anything else (`http://host:port`) | `--api` says | Loki: the URL then `/loki`; VictoriaLogs: the URL |
//!
//! The query string of a push URL (VictoriaLogs' `extra_fields=...`, say) is dropped.

use http::Uri;

use super::{Api, QueryError};

/// A store's query API and its base URL (no trailing `/`): Loki's and Vali's paths are
/// `<base>/api/v1/query_range`, VictoriaLogs' `<base>/select/logsql/query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryBase {
    /// The API.
    pub api: Api,
    /// The base URL.
    pub base: String,
}

const VLOGS_SUFFIXES: [&str; 5] = [
    "/insert/loki/api/v1/push",
    "/insert/opentelemetry/v1/logs",
    "/select/logsql",
    "/select/logsql/query",
    "/select/logsql/tail",
];
const LOKI_API_SUFFIXES: [&str; 2] = ["/api/v1/push", "/api/v1/query_range"];

/// The query base of `url` (a store's query base or push URL); `api` is needed only when the
/// path does not tell, and must agree with it when it does.
pub fn resolve(url: &str, api: Option<Api>) -> Result<QueryBase, QueryError> {
    let bad = || QueryError::Usage(format!("--store `{url}` is not an http:// or https:// URL"));
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let scheme = uri
        .scheme_str()
        .filter(|s| matches!(*s, "http" | "https"))
        .ok_or_else(bad)?;
    let authority = uri.authority().ok_or_else(bad)?;
    let path = uri.path().trim_end_matches('/');
    let origin = format!("{scheme}://{authority}");
    let found = if let Some(prefix) = VLOGS_SUFFIXES.iter().find_map(|s| path.strip_suffix(s)) {
        Some((Api::Vlogs, prefix.to_owned()))
    } else if let Some(prefix) = LOKI_API_SUFFIXES.iter().find_map(|s| path.strip_suffix(s)) {
        Some((Api::Loki, prefix.to_owned()))
    } else if path.ends_with("/loki") || path.ends_with("/vali") {
        Some((Api::Loki, path.to_owned()))
    } else {
        path.strip_suffix("/otlp/v1/logs")
            .map(|prefix| (Api::Loki, format!("{prefix}/loki")))
    };
    let (api, prefix) = match (found, api) {
        (Some((found, _)), Some(asked)) if found != asked => {
            return Err(QueryError::Usage(format!(
                "--api {} but `{url}` is a {} URL",
                asked.as_str(),
                found.as_str()
            )))
        }
        (Some(found), _) => found,
        (None, Some(Api::Loki)) => (Api::Loki, format!("{path}/loki")),
        (None, Some(Api::Vlogs)) => (Api::Vlogs, path.to_owned()),
        (None, None) => {
            return Err(QueryError::Usage(format!(
                "cannot tell the query API from `{url}`: add --api loki or --api vlogs"
            )))
        }
    };
    Ok(QueryBase {
        api,
        base: format!("{origin}{prefix}"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base(api: Api, base: &str) -> QueryBase {
        QueryBase {
            api,
            base: base.into(),
        }
    }

    #[test]
    fn push_urls_become_query_bases() {
        for (url, want) in [
            (
                "http://logging.garden.svc:3100/vali/api/v1/push",
                base(Api::Loki, "http://logging.garden.svc:3100/vali"),
            ),
            (
                "https://loki.example/loki/api/v1/push",
                base(Api::Loki, "https://loki.example/loki"),
            ),
            (
                "http://loki:3100/loki/api/v1/query_range",
                base(Api::Loki, "http://loki:3100/loki"),
            ),
            (
                "http://loki:3100/vali/",
                base(Api::Loki, "http://loki:3100/vali"),
            ),
            (
                "http://loki:3100/otlp/v1/logs",
                base(Api::Loki, "http://loki:3100/loki"),
            ),
            (
                "http://vl:9428/insert/loki/api/v1/push?extra_fields=store=seed",
                base(Api::Vlogs, "http://vl:9428"),
            ),
            (
                "http://vl:9428/insert/opentelemetry/v1/logs",
                base(Api::Vlogs, "http://vl:9428"),
            ),
            (
                "http://proxy/vlogs/select/logsql/query",
                base(Api::Vlogs, "http://proxy/vlogs"),
            ),
            (
                "http://[::1]:9428/select/logsql",
                base(Api::Vlogs, "http://[::1]:9428"),
            ),
        ] {
            assert_eq!(resolve(url, None).unwrap(), want, "{url}");
        }
    }

    #[test]
    fn bare_urls_need_the_api() {
        assert_eq!(
            resolve("http://127.0.0.1:9428", Some(Api::Vlogs)).unwrap(),
            base(Api::Vlogs, "http://127.0.0.1:9428")
        );
        assert_eq!(
            resolve("http://loki:3100/", Some(Api::Loki)).unwrap(),
            base(Api::Loki, "http://loki:3100/loki")
        );
        let err = resolve("http://127.0.0.1:9428", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("add --api loki or --api vlogs"), "{err}");
        let err = resolve("http://vl/insert/loki/api/v1/push", Some(Api::Loki))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--api loki but"), "{err}");
        for bad in ["vl:9428", "ftp://vl/", "/select/logsql", "not a url"] {
            assert!(resolve(bad, Some(Api::Vlogs)).is_err(), "{bad}");
        }
    }
}
