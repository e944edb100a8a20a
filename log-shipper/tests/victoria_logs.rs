//! The Loki push encoding against a real store: VictoriaLogs (built by `scripts/vlogs-bin`)
//! takes a push request of two streams, and a LogsQL query gives back every line with its
//! labels and its timestamp to the nanosecond. Without the binary the test says SKIP, or
//! fails under `REQUIRE_PRIVILEGED=1` (CI, where `scripts/test` builds it first).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log_shipper::cri::parse_timestamp;
use log_shipper::loki::{self, Entry, Stream};

/// The directory `scripts/vlogs-bin --built` prints, if the binary is built.
fn victoria_logs() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vlogs-bin");
    let out = Command::new(script)
        .arg("--built")
        .output()
        .expect("scripts/vlogs-bin runs");
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("victoria-logs"))
}

/// The server, killed and its storage removed when the test ends however it ends.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// One HTTP/1.0 exchange (so the answer is neither chunked nor kept alive): status and body.
fn http(port: u16, method: &str, target: &str, headers: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let status = std::str::from_utf8(&answer[9..12])
        .expect("status")
        .parse()
        .expect("status code");
    (status, answer[split + 4..].to_vec())
}

#[test]
fn victoria_logs_stores_what_we_push() {
    let Some(binary) = victoria_logs() else {
        if std::env::var("REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("victoria-logs is not built: run scripts/vlogs-bin");
        }
        eprintln!("SKIP victoria_logs_stores_what_we_push: victoria-logs is not built (scripts/vlogs-bin)");
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let storage =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vlogs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&storage);
    let _server = Server(
        Command::new(&binary)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", storage.display()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .spawn()
            .expect("victoria-logs starts"),
        storage.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "victoria-logs did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Timestamps of a minute ago, with nanoseconds that a rounding would lose.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64;
    let base = now - 60_000_000_000 - now % 1_000_000_000 + 123_456_789;
    let lines_a = ["first line of a", "zweite Zeile, ünïcödé", "third of a"];
    let lines_b = ["only line of b"];
    let entries_a: Vec<Entry<'_>> = lines_a
        .iter()
        .enumerate()
        .map(|(i, line)| Entry {
            timestamp: base + i as i64,
            line,
        })
        .collect();
    let entries_b = [Entry {
        timestamp: base + 7,
        line: lines_b[0],
    }];
    let labels_a = loki::format_labels(&[
        ("namespace", "shoot--p--a"),
        ("container", "kube-apiserver"),
    ])
    .expect("labels");
    let labels_b = loki::format_labels(&[("namespace", "shoot--p--b"), ("container", "etcd")])
        .expect("labels");
    let body = loki::push_body(&[
        Stream {
            labels: &labels_a,
            entries: &entries_a,
        },
        Stream {
            labels: &labels_b,
            entries: &entries_b,
        },
    ])
    .expect("a push body");
    let (status, answer) = http(
        port,
        "POST",
        "/insert/loki/api/v1/push",
        &format!("Content-Type: {}\r\n", loki::CONTENT_TYPE),
        &body,
    );
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&answer));

    // Read everything back (made searchable at once by a flush), one JSON object per line.
    let mut found = Vec::new();
    while found.len() < 4 {
        assert!(Instant::now() < deadline, "only {found:?} came back");
        http(port, "GET", "/internal/force_flush", "", b"");
        let (status, answer) = http(port, "GET", "/select/logsql/query?query=*", "", b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        found = answer
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<serde_json::Value>(l).expect("a JSON line"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut got: Vec<(i64, String, String, String)> = found
        .iter()
        .map(|v| {
            let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
            let time = parse_timestamp(field("_time").as_bytes()).expect("an RFC 3339 _time");
            (time, field("namespace"), field("container"), field("_msg"))
        })
        .collect();
    got.sort();
    let mut want: Vec<(i64, String, String, String)> = entries_a
        .iter()
        .map(|e| {
            (
                e.timestamp,
                "shoot--p--a".into(),
                "kube-apiserver".into(),
                e.line.into(),
            )
        })
        .chain([(
            base + 7,
            "shoot--p--b".into(),
            "etcd".into(),
            lines_b[0].into(),
        )])
        .collect();
    want.sort();
    assert_eq!(got, want);
}
