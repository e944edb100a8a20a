//! `log-shipper query`, the real binary, against a real VictoriaLogs (built by
//! `scripts/vlogs-bin`; SKIP without it, or a failure under `REQUIRE_PRIVILEGED=1`): lines of
//! two shoots pushed with the Loki push encoding, as the agent sends them, then read back by
//! shoot, with line filters, `--limit`, `--since`, `--from/--to`, JSON output, the store from
//! the agent's config, `--follow` receiving a line pushed after it started; and the errors: an
//! unreachable store, a bad query, a range the store refuses, flags that do not go together.
//!
//! Loki's `query_range` is not tested against a real Loki (Loki is AGPL and not built here;
//! Vali is not buildable from the module proxy): its answers are unit-tested from the
//! documented shapes (`src/query/response.rs`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http, Server};
use log_shipper::loki::{self, Entry, Stream};
use log_shipper::query::time::format_rfc3339;

const MINUTE: i64 = 60_000_000_000;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64
}

fn query(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_log-shipper"))
        .arg("query")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout_lines(out: &Output) -> Vec<String> {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The one line of stderr of a failed run.
fn error_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("log-shipper query: "), "{stderr}");
    stderr
}

/// A line as the agent labels it.
#[derive(Clone)]
struct Line {
    namespace: &'static str,
    pod: &'static str,
    container: &'static str,
    time: i64,
    text: String,
}

fn line(namespace: &'static str, pod: &'static str, time: i64, text: &str) -> Line {
    Line {
        namespace,
        pod,
        container: if pod.starts_with("etcd") {
            "etcd"
        } else {
            "kube-apiserver"
        },
        time,
        text: text.into(),
    }
}

/// Pushes `lines` (one stream per pod) as the agent does and waits until the store has them.
fn push(server: &Server, lines: &[Line], total: usize) {
    let labels: Vec<String> = lines
        .iter()
        .map(|l| {
            loki::format_labels(&[
                ("origin", "seed"),
                ("namespace_name", l.namespace),
                ("pod_name", l.pod),
                ("container_name", l.container),
            ])
            .expect("labels")
        })
        .collect();
    let entries: Vec<[Entry<'_>; 1]> = lines
        .iter()
        .map(|l| {
            [Entry {
                timestamp: l.time,
                line: &l.text,
            }]
        })
        .collect();
    let streams: Vec<Stream<'_>> = labels
        .iter()
        .zip(&entries)
        .map(|(labels, entries)| Stream { labels, entries })
        .collect();
    let body = loki::push_body(&streams).expect("a push body");
    let (status, answer) = http(
        server.port,
        "POST",
        "/insert/loki/api/v1/push",
        &format!("Content-Type: {}\r\n", loki::CONTENT_TYPE),
        &body,
    );
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(server.read_all(total).len(), total);
}

fn text(l: &Line) -> String {
    format!(
        "{} {}/{}/{} {}",
        format_rfc3339(l.time),
        l.namespace,
        l.pod,
        l.container,
        l.text
    )
}

fn start(test: &str, flags: &[&str]) -> Option<Server> {
    let binary = common::victoria_logs(test)?;
    Some(Server::start_with(
        &binary,
        common::free_port(),
        test,
        flags,
    ))
}

fn write_config(test: &str, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("example.yaml"))
        .expect("the example")
        .replace(
            "http://logging.garden.svc:3100/vali/api/v1/push",
            &format!("http://127.0.0.1:{port}/insert/loki/api/v1/push"),
        )
        .replace(
            "http://logging.{namespace}.svc:3100/vali/api/v1/push",
            // The agent's shoot store URL holds `{namespace}`; the query drops the query string.
            &format!(
                "http://127.0.0.1:{port}/insert/loki/api/v1/push?extra_fields=store={{namespace}}"
            ),
        );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.yaml"));
    std::fs::write(&path, text).expect("write the config");
    path
}

#[test]
fn query_reads_back_a_shoots_lines() {
    let Some(server) = start("query_reads_back", &[]) else {
        return;
    };
    let store = format!("http://127.0.0.1:{}/insert/loki/api/v1/push", server.port);
    let t = now() - 10 * MINUTE;
    let mut a: Vec<Line> = (0..5)
        .map(|i| {
            line(
                "shoot--p--a",
                "kube-apiserver-0",
                t + i,
                &format!("a line {i}"),
            )
        })
        .collect();
    a.push(line("shoot--p--a", "etcd-0", t + 5, "error: boom ünïcödé"));
    let old = line("shoot--p--a", "etcd-0", t - 180 * MINUTE, "an old line");
    let b = [
        line("shoot--p--b", "etcd-0", t + 2, "b line 0"),
        line("shoot--p--b", "kube-apiserver-0", t + 3, "b line 1"),
    ];
    let seed = line("garden", "nginx-0", t + 1, "a seed line");
    let lines: Vec<Line> = a.iter().chain(&b).chain([&old, &seed]).cloned().collect();
    push(&server, &lines, lines.len());

    // One shoot's lines of the last hour, oldest first, in the text form.
    let want: Vec<String> = a.iter().map(text).collect();
    let got = stdout_lines(&query(&["--store", &store, "--shoot", "p/a"]));
    assert_eq!(got, want);

    // --limit: the newest, oldest first.
    let got = stdout_lines(&query(&[
        "--store", &store, "--shoot", "p/a", "--limit", "2",
    ]));
    assert_eq!(got, want[4..]);

    // --since reaches the old line; --from/--to select it alone.
    let got = stdout_lines(&query(&[
        "--store", &store, "--shoot", "p/a", "--since", "4h",
    ]));
    assert_eq!(got[0], text(&old));
    assert_eq!(got.len(), 7);
    let from = format_rfc3339(old.time);
    let to = format_rfc3339(old.time + 1);
    let got = stdout_lines(&query(&[
        "--store", &store, "--shoot", "p/a", "--from", &from, "--to", &to,
    ]));
    assert_eq!(got, [text(&old)]);
    let from_seconds = ((old.time - MINUTE) / 1_000_000_000).to_string();
    let to_seconds = ((old.time + MINUTE) / 1_000_000_000).to_string();
    let got = stdout_lines(&query(&[
        "--store",
        &store,
        "--from",
        &from_seconds,
        "--to",
        &to_seconds,
    ]));
    assert_eq!(got, [text(&old)]);

    // The LogQL subset, translated: label matchers and line filters.
    let got = stdout_lines(&query(&[
        "--store",
        &store,
        "--shoot",
        "p/a",
        r#"{container_name="etcd"} |= "boom""#,
    ]));
    assert_eq!(got, [text(&a[5])]);
    let got = stdout_lines(&query(&[
        "--store",
        &store,
        r#"{namespace_name=~"shoot--p--.*", pod_name!="etcd-0"} |~ "line [01]$" != "a line 0""#,
    ]));
    assert_eq!(got, [text(&a[1]), text(&b[1])]);
    // Raw LogsQL.
    let got = stdout_lines(&query(&[
        "--store",
        &store,
        r#"namespace_name:=garden "seed""#,
    ]));
    assert_eq!(got, [text(&seed)]);

    // JSON lines.
    let got = stdout_lines(&query(&[
        "--store", &store, "--shoot", "p/b", "--output", "json",
    ]));
    let got: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let want: Vec<serde_json::Value> = b
        .iter()
        .map(|l| {
            serde_json::json!({
                "time": format_rfc3339(l.time),
                "labels": {
                    "origin": "seed",
                    "namespace_name": l.namespace,
                    "pod_name": l.pod,
                    "container_name": l.container,
                },
                "line": l.text,
            })
        })
        .collect();
    assert_eq!(got, want);

    // The store from the agent's config: the shoot store's URL, filled for the shoot.
    let config = write_config("query_reads_back", server.port);
    let config = config.to_str().expect("utf-8 path");
    let got = stdout_lines(&query(&["--config", config, "--shoot", "p/b"]));
    assert_eq!(got, b.iter().map(text).collect::<Vec<_>>());
}

#[test]
fn query_follows_new_lines() {
    let Some(server) = start("query_follows", &[]) else {
        return;
    };
    let first = line("shoot--p--c", "etcd-0", now() - MINUTE, "before the follow");
    push(&server, std::slice::from_ref(&first), 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_log-shipper"))
        .args([
            "query",
            "--store",
            &format!("http://127.0.0.1:{}", server.port),
            "--api",
            "vlogs",
            "--shoot",
            "p/c",
            "--follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("a line")).is_err() {
                break;
            }
        }
    });
    let wait = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no {what}: {e}"))
    };
    assert_eq!(wait("first line"), text(&first));
    // A line of another shoot, then one of this shoot: only the latter is printed, once.
    let other = line("shoot--p--d", "etcd-0", now(), "another shoot");
    push(&server, std::slice::from_ref(&other), 2);
    let new = line("shoot--p--c", "kube-apiserver-0", now(), "after the follow");
    push(&server, std::slice::from_ref(&new), 3);
    assert_eq!(wait("followed line"), text(&new));
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "a line printed twice or from another shoot"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn query_errors_are_one_line() {
    // A store that refuses ranges over a day, as an operator may configure it.
    let Some(server) = start("query_errors", &["-search.maxQueryTimeRange=24h"]) else {
        return;
    };
    let store = format!("http://127.0.0.1:{}", server.port);

    // An unreachable store, named.
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let err = error_line(&query(&["--store", &closed, "--api", "vlogs"]));
    assert!(
        err.contains(&format!("cannot reach the store at {closed}")) && err.contains("refused"),
        "{err}"
    );

    // A bad query: the store's 400 message.
    let err = error_line(&query(&["--store", &store, "--api", "vlogs", "foo |"]));
    assert!(
        err.contains("the store refused the query (400): cannot parse `query` arg [foo |]"),
        "{err}"
    );
    // A range the store refuses.
    let err = error_line(&query(&[
        "--store", &store, "--api", "vlogs", "--since", "2d",
    ]));
    assert!(err.contains("(400): too big time range selected"), "{err}");
    // A query the tail cannot follow: refused when the follow starts.
    let out = Command::new(env!("CARGO_BIN_EXE_log-shipper"))
        .args([
            "query",
            "--store",
            &store,
            "--api",
            "vlogs",
            "--follow",
            "* | stats count() rows",
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("no `_time`") || stderr.contains("cannot be used in live tailing"),
        "{stderr}"
    );

    // Flags that do not go together, and a store that does not say its API.
    let err = error_line(&query(&[
        "--store",
        &store,
        "--api",
        "vlogs",
        "--since",
        "1h",
        "--from",
        "1796540000",
    ]));
    assert!(
        err.ends_with("--since and --from/--to do not go together\n"),
        "{err}"
    );
    let err = error_line(&query(&["--store", &store]));
    assert!(err.contains("add --api loki or --api vlogs"), "{err}");
    let err = error_line(&query(&[
        "--store", &store, "--api", "vlogs", "--shoot", "p",
    ]));
    assert!(err.contains("--shoot `p` is not project/name"), "{err}");
}
