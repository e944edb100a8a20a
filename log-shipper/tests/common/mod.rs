//! What the VictoriaLogs tests share: the binary `scripts/vlogs-bin` built, a server on a
//! port that is killed (and its storage removed) when the test ends, and that can be stopped
//! and started again on the same port and storage (an outage); one HTTP/1.0 exchange; LogsQL
//! reads of what is stored; CRI timestamps; and a scripted HTTP server for the answers
//! VictoriaLogs cannot be made to give.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The directory `scripts/vlogs-bin --built` prints, if the binary is built; `None` after
/// a loud SKIP, or a panic under `REQUIRE_PRIVILEGED=1` (CI, where `scripts/test` builds it).
pub fn victoria_logs(test: &str) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vlogs-bin");
    let out = Command::new(script)
        .arg("--built")
        .output()
        .expect("scripts/vlogs-bin runs");
    if out.status.success() {
        return Some(
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("victoria-logs"),
        );
    }
    if std::env::var("REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("victoria-logs is not built: run scripts/vlogs-bin");
    }
    eprintln!("SKIP {test}: victoria-logs is not built (scripts/vlogs-bin)");
    None
}

/// A port free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The server, killed and its storage removed when the test ends however it ends.
pub struct Server {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    storage: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

impl Server {
    /// Starts `binary` on `port` with its own storage named after `name`, and waits (20 s at
    /// most) until it listens.
    pub fn start(binary: &Path, port: u16, name: &str) -> Server {
        Server::start_with(binary, port, name, &[])
    }

    /// [`start`](Server::start) with more command-line flags.
    pub fn start_with(binary: &Path, port: u16, name: &str, args: &[&str]) -> Server {
        let storage = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("vlogs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&storage);
        let mut server = Server {
            child: None,
            binary: binary.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            storage,
            port,
        };
        server.start_again();
        server
    }

    /// Stops the server as an operator would (SIGTERM: it flushes what it stored and exits);
    /// its port is closed until [`start_again`](Server::start_again).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(term.success(), "SIGTERM to victoria-logs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "victoria-logs did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the (stopped) server on its port and storage, and waits (20 s at most) until it
    /// listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "victoria-logs runs already");
        self.child = Some(
            Command::new(&self.binary)
                .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
                .arg(format!("-storageDataPath={}", self.storage.display()))
                .arg("-loggerLevel=ERROR")
                .args(&self.args)
                .stdout(Stdio::null())
                .spawn()
                .expect("victoria-logs starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "victoria-logs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The records a LogsQL query finds now (after a flush), one JSON object each.
    /// `query` is URL-encoded here (spaces and `|`).
    pub fn query(&self, query: &str) -> Vec<serde_json::Value> {
        let prefix = self
            .args
            .iter()
            .find_map(|a| a.strip_prefix("-http.pathPrefix="))
            .unwrap_or("");
        http(
            self.port,
            "GET",
            &format!("{prefix}/internal/force_flush"),
            "",
            b"",
        );
        let encoded: String = query
            .chars()
            .map(|c| match c {
                ' ' => "%20".to_owned(),
                '|' => "%7C".to_owned(),
                '"' => "%22".to_owned(),
                c => c.to_string(),
            })
            .collect();
        let (status, answer) = http(
            self.port,
            "GET",
            &format!("{prefix}/select/logsql/query?query={encoded}"),
            "",
            b"",
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        answer
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a JSON line"))
            .collect()
    }

    /// A LogsQL stats function over every record now, such as `count()` or
    /// `count_uniq(_msg)`.
    pub fn stat(&self, function: &str) -> u64 {
        let found = self.query(&format!("* | stats {function} as n"));
        found
            .first()
            .and_then(|v| v["n"].as_str()?.parse().ok())
            .unwrap_or(0)
    }

    /// Every stored record, one JSON object each, once at least `want` are there (20 s at
    /// most); made searchable at once by a flush.
    pub fn read_all(&self, want: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.query("*");
            if found.len() >= want || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One HTTP/1.0 exchange (so the answer is neither chunked nor kept alive): status and body.
pub fn http(port: u16, method: &str, target: &str, headers: &str, body: &[u8]) -> (u16, Vec<u8>) {
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

/// A scripted HTTP/1.1 server: answers each request with the next status of `script`, then
/// closes the connection without saying so in the answer (as an idle timeout would), and
/// sends each request's head and body.
pub fn scripted(script: Vec<(u16, &'static str)>) -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (status, body) in script {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .unwrap_or(0);
            let mut request_body = vec![0; len];
            reader.read_exact(&mut request_body).expect("body");
            if status == 0 {
                // Never answer: the client's deadline must end it.
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tx.send((head, request_body));
        }
    });
    (port, rx)
}

/// Unix nanoseconds now.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64
}

/// A timestamp a minute ago, on a whole second plus `nanos`: old enough for the store, new
/// enough for its retention, and telling each test's lines apart by their nanoseconds.
pub fn a_minute_ago(nanos: i64) -> i64 {
    let now = now_nanos();
    now - 60_000_000_000 - now % 1_000_000_000 + nanos
}

/// RFC 3339 with nanoseconds, UTC, of Unix nanoseconds: a CRI line's timestamp.
pub fn rfc3339(nanos: i64) -> String {
    log_shipper::query::time::format_rfc3339(nanos)
}

/// The temporary tree: pod logs, checkpoints, the agent's config and its logs. Removed when
/// the test passes; kept (and named) when it fails, to look at.
pub struct Dirs {
    /// The tree.
    pub root: PathBuf,
    /// The pod log root (`input.path`).
    pub logs: PathBuf,
    /// The checkpoint directory.
    pub checkpoints: PathBuf,
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// A fresh tree for test `name` of test binary `binary`.
pub fn dirs(binary: &str, name: &str) -> Dirs {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{binary}-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let d = Dirs {
        logs: root.join("pods"),
        checkpoints: root.join("checkpoints"),
        root,
    };
    fs::create_dir_all(&d.logs).expect("log root");
    d
}
