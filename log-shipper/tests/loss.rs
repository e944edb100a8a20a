//! Nothing lost, end to end: the real binary (`log-shipper --config`) against a real
//! VictoriaLogs, killed and restarted while a writer rotates its files, then a store outage.
//!
//! `kill -9 while rotating`: a writer thread appends CRI lines (each with its own sequence
//! number; every fifth entry as two `P` lines and an `F` line, both streams) for two
//! containers, one in a shoot namespace and one in `garden`, at a steady rate, and rotates
//! each like the kubelet every [`ROTATE_BYTES`]: `0.log` renamed to `0.log.<timestamp>`, a few
//! more lines into the renamed file (the runtime writes on until it reopens), then a new
//! `0.log`. Older rotated files are "compressed" (copied to `….gz`, which the agent must
//! ignore: the copy holds the same CRI lines, so reading it would show as extra copies) and
//! the oldest deleted, [`MAX_ROTATED`] rotated files at most. Meanwhile the agent is
//! SIGKILLed [`KILLS`] times at seeded points and restarted on the same checkpoint
//! directory; then the store is stopped (SIGTERM) for longer than several `batch_wait`s and
//! started again on its port and storage; then the writer stops and the agent drains.
//!
//! What is compared, exactly: every sequence number of both containers is in VictoriaLogs,
//! in the right store (the store URL's `extra_fields=store=…` tells the seed's and the
//! shoot's apart), with Gardener's labels, its original timestamp to the nanosecond and its
//! content byte for byte; no record that was not written. Duplicates: after each kill the
//! test reads the checkpoint file the next run resumes from, and a line may appear once more
//! per kill at which it lay past its file's persisted checkpoint (the unacknowledged tail),
//! never more; their number is printed.
//!
//! What this guarantees, and what not: lines are never lost as long as the agent runs, or
//! was restarted, before a rotated file it has not finished is deleted (a file it holds open
//! is read to its end through the descriptor, in an outage too). The writer keeps the newest
//! [`PLAIN_ROTATED`] rotated files uncompressed (the kubelet keeps one, compressing the others
//! at the next rotation): at [`RATE`] a rotated file lives about four seconds, far more than a
//! restart. A file deleted unread while the agent is down is lost (the kubelet's choice,
//! documented in docs/log-shipper.md); one deleted unread while it runs is counted
//! (`log_shipper_files_vanished_unread_total`, asserted 0 here).

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{now_nanos, rfc3339, Server};
use log_shipper::checkpoint::{Checkpoints, FileKey};
use log_shipper::cri::parse_timestamp;

/// The kubelet rotates a container's log when it is this long (`containerLogMaxSize`).
const ROTATE_BYTES: u64 = 2 * 1024 * 1024;
/// Bytes per second the writer appends, per container.
const RATE: u64 = 1024 * 1024;
/// Rotated files kept uncompressed, the newest.
const PLAIN_ROTATED: usize = 2;
/// Rotated files kept at most, compressed or not (the kubelet's `containerLogMaxFiles` of 5
/// counts the live file too).
const MAX_ROTATED: usize = 4;
/// Lines the runtime writes into a renamed file before it reopens the live name.
const AFTER_RENAME: u64 = 20;
/// SIGKILLs of the agent.
const KILLS: usize = 5;

/// The tests of this file start processes and write at a rate: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The real binary, killed (SIGKILL) if the test ends while it runs.
struct Shipper {
    child: Child,
    admin: u16,
    log: PathBuf,
}

impl Drop for Shipper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Shipper {
    /// Writes the config (a fresh admin port, `input` with the tree's paths, then `rest`: more
    /// `input` fields indented, `stores`, `delivery`) and starts the binary; its log goes to
    /// `agent.log` in the tree.
    fn start(d: &common::Dirs, rest: &str) -> Shipper {
        let admin = common::free_port();
        let config = format!(
            "admin: {{address: \"127.0.0.1:{admin}\"}}\ninput:\n  path: {}\n  checkpoint_dir: {}\n  rescan_interval: 100ms\n{rest}",
            d.logs.display(),
            d.checkpoints.display(),
        );
        let path = d.root.join("config.yaml");
        fs::write(&path, config).expect("write the config");
        let log_path = d.root.join("agent.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("the agent's log");
        let child = Command::new(env!("CARGO_BIN_EXE_log-shipper"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("log-shipper starts");
        Shipper {
            child,
            admin,
            log: log_path,
        }
    }

    /// "running", or how it exited and the end of its log: for failure messages.
    fn state(&mut self) -> String {
        match self.child.try_wait() {
            Ok(None) => "running".into(),
            other => {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                format!("exited ({other:?}): {}", tail.join("\n"))
            }
        }
    }

    /// `kill -9`.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, and its exit (within `limit`).
    fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(term.success());
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "log-shipper did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/metrics` (waiting up to 10 s for the admin server to listen).
    fn metrics(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.admin)).is_err() {
            assert!(Instant::now() < deadline, "the admin server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (status, body) = common::http(self.admin, "GET", "/metrics", "", b"");
        assert_eq!(status, 200);
        String::from_utf8(body).expect("utf-8 metrics")
    }
}

/// The value of one series (0 if absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The stores, both on `port`, told apart by VictoriaLogs' `extra_fields`.
fn stores(seed_port: u16, shoot_port: u16, shoot_path: &str) -> String {
    format!(
        "stores:\n  seed: {{url: \"http://127.0.0.1:{seed_port}/insert/loki/api/v1/push?extra_fields=store=seed\", protocol: loki}}\n  shoot: {{url: \"http://127.0.0.1:{shoot_port}{shoot_path}/insert/loki/api/v1/push?extra_fields=store={{namespace}}\", protocol: loki}}\n"
    )
}

/// A small xorshift: the kill points, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One container of the tree: namespace, pod, container.
#[derive(Clone, Copy)]
struct Pod {
    ns: &'static str,
    pod: &'static str,
    container: &'static str,
}

const PODS: [Pod; 2] = [
    Pod {
        ns: "shoot--a--one",
        pod: "kube-apiserver-7d9f",
        container: "kube-apiserver",
    },
    Pod {
        ns: "garden",
        pod: "vali-0",
        container: "vali",
    },
];

impl Pod {
    fn store(&self) -> &'static str {
        if self.ns.starts_with("shoot--") {
            self.ns
        } else {
            "seed"
        }
    }

    fn dir(&self, logs: &Path) -> PathBuf {
        logs.join(format!("{}_{}_uid-{}", self.ns, self.pod, self.pod))
            .join(self.container)
    }
}

/// The content of entry `seq`: its namespace and number first (ASCII, where the `P` pieces
/// are cut), then quotes, a backslash, a tab, non-ASCII and a filler of varying length.
fn content(pod: &Pod, seq: u64) -> String {
    let mut s = format!("{} seq={seq:08} \"q\" \\ ünïcödé\t", pod.ns);
    let filler = (seq * 7919 % 97) as usize + 1;
    s.extend((0..filler).map(|i| char::from(b'a' + ((seq as usize + i) % 26) as u8)));
    s
}

/// The timestamp of entry `seq` (its first line's).
fn timestamp(base: i64, seq: u64) -> i64 {
    base + seq as i64 * 1_000
}

/// Appends entry `seq` as CRI text: one `F` line, or every fifth entry `P`, `P`, `F`.
fn cri(base: i64, pod: &Pod, seq: u64, out: &mut String) {
    let stream = if seq % 3 == 0 { "stderr" } else { "stdout" };
    let c = content(pod, seq);
    let ts = timestamp(base, seq);
    if seq % 5 == 2 {
        let _ = writeln!(out, "{} {stream} P {}", rfc3339(ts), &c[..6]);
        let _ = writeln!(out, "{} {stream} P {}", rfc3339(ts + 1), &c[6..14]);
        let _ = writeln!(out, "{} {stream} F {}", rfc3339(ts + 2), &c[14..]);
    } else {
        let _ = writeln!(out, "{} {stream} F {c}", rfc3339(ts));
    }
}

/// Where each entry was written: per container, by sequence number, its file and the offset
/// of its first line.
type Written = Arc<Mutex<Vec<Vec<(FileKey, u64)>>>>;

/// One container's log as the runtime and the kubelet handle it.
struct LogWriter {
    pod: Pod,
    dir: PathBuf,
    file: File,
    key: FileKey,
    pos: u64,
    plain: VecDeque<PathBuf>,
    compressed: VecDeque<PathBuf>,
    rotations: u64,
    seq: u64,
    bytes: u64,
}

impl LogWriter {
    fn new(logs: &Path, pod: Pod) -> LogWriter {
        let dir = pod.dir(logs);
        fs::create_dir_all(&dir).expect("container dir");
        let (file, key) = create(&dir.join("0.log"));
        LogWriter {
            pod,
            dir,
            file,
            key,
            pos: 0,
            plain: VecDeque::new(),
            compressed: VecDeque::new(),
            rotations: 0,
            seq: 0,
            bytes: 0,
        }
    }

    /// Writes entries until `target` bytes were written in all; records where each went.
    fn write_until(&mut self, target: u64, base: i64, index: usize, written: &Written) {
        let mut text = String::new();
        let mut at = Vec::new();
        while self.bytes + (text.len() as u64) < target {
            at.push((self.key, self.pos + text.len() as u64));
            cri(base, &self.pod, self.seq + at.len() as u64 - 1, &mut text);
        }
        self.append(&text, &at, index, written);
        if self.pos >= ROTATE_BYTES {
            self.rotate(base, index, written);
        }
    }

    fn append(&mut self, text: &str, at: &[(FileKey, u64)], index: usize, written: &Written) {
        if text.is_empty() {
            return;
        }
        self.file.write_all(text.as_bytes()).expect("write");
        self.pos += text.len() as u64;
        self.bytes += text.len() as u64;
        self.seq += at.len() as u64;
        written.lock().expect("lock")[index].extend_from_slice(at);
    }

    /// The kubelet's rotation, with the runtime's writes between the rename and the reopen.
    fn rotate(&mut self, base: i64, index: usize, written: &Written) {
        self.rotations += 1;
        let rotated = self
            .dir
            .join(format!("0.log.20260101-{:06}", 100_000 + self.rotations));
        fs::rename(self.dir.join("0.log"), &rotated).expect("rename");
        let mut text = String::new();
        let mut at = Vec::new();
        for i in 0..AFTER_RENAME {
            at.push((self.key, self.pos + text.len() as u64));
            cri(base, &self.pod, self.seq + i, &mut text);
        }
        self.append(&text, &at, index, written);
        let (file, key) = create(&self.dir.join("0.log"));
        (self.file, self.key, self.pos) = (file, key, 0);
        self.plain.push_back(rotated);
        while self.plain.len() > PLAIN_ROTATED {
            let old = self.plain.pop_front().expect("a rotated file");
            let mut gz = old.clone().into_os_string();
            gz.push(".gz");
            fs::copy(&old, &gz).expect("compress");
            fs::remove_file(&old).expect("remove the uncompressed file");
            self.compressed.push_back(gz.into());
        }
        while self.plain.len() + self.compressed.len() > MAX_ROTATED {
            let oldest = self.compressed.pop_front().expect("a compressed file");
            fs::remove_file(oldest).expect("remove the oldest");
        }
    }
}

fn create(path: &Path) -> (File, FileKey) {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .expect("a new log file");
    let key = FileKey::of(&file.metadata().expect("metadata"));
    (file, key)
}

/// A stored record, as compared: (store, namespace_name, pod_name, container_name, origin,
/// time, message).
type Stored = (String, String, String, String, String, i64, String);

fn expected(pod: &Pod, base: i64, seq: u64) -> Stored {
    (
        pod.store().to_owned(),
        pod.ns.to_owned(),
        pod.pod.to_owned(),
        pod.container.to_owned(),
        "seed".to_owned(),
        timestamp(base, seq),
        content(pod, seq),
    )
}

fn stored(v: &serde_json::Value) -> Stored {
    let f = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
    (
        f("store"),
        f("namespace_name"),
        f("pod_name"),
        f("container_name"),
        f("origin"),
        parse_timestamp(f("_time").as_bytes()).unwrap_or(i64::MIN),
        f("_msg"),
    )
}

/// The container and sequence number a message names, if it is one of ours.
fn identify(msg: &str) -> Option<(usize, u64)> {
    let (ns, rest) = msg.split_once(" seq=")?;
    let index = PODS.iter().position(|p| p.ns == ns)?;
    let seq = rest.get(..8)?.parse().ok()?;
    Some((index, seq))
}

/// Sequence numbers as ranges, for messages.
fn ranges(seqs: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < seqs.len() && out.len() < 400 {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        let _ = write!(out, "{}..={} ", seqs[i], seqs[j]);
        i = j + 1;
    }
    out
}

#[test]
fn kill_9_while_rotating_then_an_outage_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(binary) = common::victoria_logs("kill_9_while_rotating") else {
        return;
    };
    let began = Instant::now();
    let mut vlogs = Server::start(&binary, common::free_port(), "loss-kill");
    let d = common::dirs("loss", "kill");
    let config = format!(
        "{}delivery:\n  batch_bytes: 262144\n  batch_wait: 200ms\n  min_backoff: 50ms\n  max_backoff: 400ms\n  request_timeout: 10s\n",
        stores(vlogs.port, vlogs.port, "")
    );
    // Ten minutes ago, with nanoseconds a rounding would lose.
    let base = now_nanos() - 600_000_000_000 - now_nanos() % 1_000_000_000 + 123_456_789;

    let written: Written = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (logs, written, stop) = (d.logs.clone(), written.clone(), stop.clone());
        move || {
            let mut writers: Vec<LogWriter> =
                PODS.iter().map(|p| LogWriter::new(&logs, *p)).collect();
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let due = RATE * start.elapsed().as_millis() as u64 / 1000;
                for (i, w) in writers.iter_mut().enumerate() {
                    w.write_until(due, base, i, &written);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            writers.iter().map(|w| w.rotations).collect::<Vec<_>>()
        }
    });

    // Killed at seeded points, restarted at once on the same checkpoints. After each kill,
    // the lines past their file's persisted checkpoint may be sent again, once.
    let mut rng = Rng(0x5eed_1055);
    let mut allowed: Vec<BTreeMap<u64, u32>> = vec![BTreeMap::new(), BTreeMap::new()];
    let mut at_risk_total = 0;
    for _ in 0..KILLS {
        let shipper = Shipper::start(&d, &config);
        std::thread::sleep(Duration::from_millis(300 + rng.next() % 1200));
        shipper.kill9();
        let (checkpoints, _) = Checkpoints::open(&d.checkpoints).expect("the checkpoints");
        let written = written.lock().expect("lock");
        for (index, lines) in written.iter().enumerate() {
            for (seq, (key, start)) in lines.iter().enumerate() {
                if checkpoints.get(key).is_none_or(|c| *start >= c.offset) {
                    *allowed[index].entry(seq as u64).or_default() += 1;
                    at_risk_total += 1;
                }
            }
        }
    }

    // The store goes away for longer than many batch_waits, and comes back on its port and
    // storage.
    let mut shipper = Shipper::start(&d, &config);
    std::thread::sleep(Duration::from_millis(500));
    vlogs.stop();
    std::thread::sleep(Duration::from_secs(3));
    vlogs.start_again();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let rotations = writer.join().expect("the writer");
    let written = written.lock().expect("lock").clone();
    let total: usize = written.iter().map(Vec::len).sum();
    assert!(
        rotations.iter().all(|&r| r >= 2),
        "rotations per container: {rotations:?}"
    );

    // The agent drains: every line is there at least once (duplicates do not count, or the
    // agent could be stopped before it read the last lines). If some never come, the
    // comparison below names them.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let arrived = vlogs.stat("count_uniq(_msg)") as usize;
        if arrived >= total {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("only {arrived} of {total} lines arrived");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = shipper.metrics();
    assert!(
        metric(
            &text,
            "log_shipper_retries_total{kind=\"connect\",store=\"seed\"}"
        ) > 0
            || metric(
                &text,
                "log_shipper_retries_total{kind=\"connect\",store=\"shoot\"}"
            ) > 0,
        "the outage was seen: {text}"
    );
    assert_eq!(
        metric(&text, "log_shipper_files_vanished_unread_total"),
        0,
        "{text}"
    );
    assert!(
        metric(&text, "log_shipper_files_resumed_total") > 0,
        "{text}"
    );
    let status = shipper.terminate(Duration::from_secs(25));
    assert!(status.success(), "{status:?}");

    // Compared exactly.
    let found = vlogs
        .query("* | fields _msg, _time, store, namespace_name, pod_name, container_name, origin");
    let mut copies: Vec<Vec<u32>> = written.iter().map(|w| vec![0; w.len()]).collect();
    let mut wrong = Vec::new();
    for v in &found {
        let got = stored(v);
        match identify(&got.6) {
            Some((index, seq))
                if (seq as usize) < copies[index].len()
                    && got == expected(&PODS[index], base, seq) =>
            {
                copies[index][seq as usize] += 1;
            }
            _ => wrong.push(got),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} records not as written, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    let mut duplicates = 0;
    for (index, copies) in copies.iter().enumerate() {
        let missing: Vec<u64> = (0..copies.len() as u64)
            .filter(|&s| copies[s as usize] == 0)
            .collect();
        assert!(
            missing.is_empty(),
            "{}: {} of {} lines lost: {}",
            PODS[index].ns,
            missing.len(),
            copies.len(),
            ranges(&missing)
        );
        let too_many: Vec<u64> = (0..copies.len() as u64)
            .filter(|&s| copies[s as usize] > 1 + allowed[index].get(&s).copied().unwrap_or(0))
            .collect();
        assert!(
            too_many.is_empty(),
            "{}: {} lines repeated though acknowledged and persisted before a kill: {}",
            PODS[index].ns,
            too_many.len(),
            ranges(&too_many)
        );
        duplicates += copies.iter().map(|&c| u64::from(c) - 1).sum::<u64>();
    }
    eprintln!(
        "{total} lines in {:?}, {rotations:?} rotations, {KILLS} kills: {duplicates} duplicates \
         ({at_risk_total} line copies were past a persisted checkpoint at a kill)",
        began.elapsed()
    );
    drop(vlogs);
}

/// HAProxy, where it is installed (CI installs it): the HTTP gateway in front of stores, as
/// a Loki gateway is in a seed, killed when the test ends.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    /// Starts HAProxy with `frontend_and_backends` (the `frontend` binds `{port}`) under
    /// `d`, and waits until it listens; `None` after a loud SKIP where it is not installed
    /// (outside CI).
    fn start(test: &str, d: &common::Dirs, frontend_and_backends: &str) -> Option<Haproxy> {
        let Some(binary) = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
            .iter()
            .map(|dir| Path::new(dir).join("haproxy"))
            .find(|p| p.exists())
        else {
            assert!(
                std::env::var("CI").is_err(),
                "haproxy must be installed in CI"
            );
            eprintln!("*** SKIP {test}: haproxy not installed ***");
            return None;
        };
        let port = common::free_port();
        let config = d.root.join("haproxy.cfg");
        fs::write(
            &config,
            format!(
                "global\n  maxconn 100\ndefaults\n  mode http\n  retries 0\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n{}",
                frontend_and_backends.replace("{port}", &port.to_string())
            ),
        )
        .expect("write haproxy.cfg");
        let child = Command::new(binary)
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let haproxy = Haproxy { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(haproxy)
    }
}

/// Appends entries `seqs` of `pod` to its `0.log`; returns their stored form.
fn append(logs: &Path, pod: &Pod, base: i64, seqs: std::ops::Range<u64>) -> Vec<Stored> {
    let dir = pod.dir(logs);
    fs::create_dir_all(&dir).expect("container dir");
    let mut text = String::new();
    for seq in seqs.clone() {
        cri(base, pod, seq, &mut text);
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("0.log"))
        .expect("log file")
        .write_all(text.as_bytes())
        .expect("write");
    seqs.map(|seq| expected(pod, base, seq)).collect()
}

/// Asserts that `server` holds exactly `want` (waiting up to 20 s for as many records), each
/// once; on a difference says how many are missing or extra, and shows a few.
fn assert_holds_exactly(server: &Server, want: &BTreeSet<Stored>, shipper: &mut Shipper) {
    let found = server.read_all(want.len());
    let got: BTreeSet<Stored> = found.iter().map(stored).collect();
    let missing: Vec<&Stored> = want.difference(&got).collect();
    let extra: Vec<&Stored> = got.difference(want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} of {} records missing, e.g. {:?}; {} not written, e.g. {:?}; agent {}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(2)],
        extra.len(),
        &extra[..extra.len().min(2)],
        shipper.state()
    );
    assert_eq!(got.len(), found.len(), "each line once");
}

const DEAD: Pod = Pod {
    ns: "shoot--b--dead",
    pod: "etcd-main-0",
    container: "etcd",
};

#[test]
fn a_dead_shoot_store_does_not_stall_the_seed_or_another_shoot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "a_dead_shoot_store_does_not_stall_the_seed_or_another_shoot";
    let Some(binary) = common::victoria_logs(test) else {
        return;
    };
    let d = common::dirs("loss", "dead");
    // One VictoriaLogs holds the seed's and the live shoot's stores; the dead shoot's store
    // is a port where nothing listens yet. Shoot stores are reached through a gateway that
    // routes on the path's first segment, the namespace (the template cannot name another
    // port per namespace); for the dead one it answers 503.
    let vlogs = Server::start(&binary, common::free_port(), "loss-dead-live");
    let dead_port = common::free_port();
    let Some(gateway) = Haproxy::start(
        test,
        &d,
        &format!(
            "frontend shoots\n  bind 127.0.0.1:{{port}}\n  use_backend live if {{ path_beg /shoot--a--one/ }}\n  default_backend dead\n\
             backend live\n  http-request replace-path ^/[^/]*(/.*)$ \\1\n  server live 127.0.0.1:{}\n\
             backend dead\n  http-request replace-path ^/[^/]*(/.*)$ \\1\n  server dead 127.0.0.1:{dead_port}\n",
            vlogs.port
        ),
    ) else {
        return;
    };
    let base = common::a_minute_ago(7);
    let mut want = BTreeSet::new();
    let mut dead = Vec::new();
    for pod in [PODS[0], PODS[1]] {
        want.extend(append(&d.logs, &pod, base, 0..300));
    }
    dead.extend(append(&d.logs, &DEAD, base, 0..300));
    let mut shipper = Shipper::start(
        &d,
        &format!(
            "{}delivery: {{batch_wait: 100ms, min_backoff: 50ms, max_backoff: 400ms}}\n",
            stores(vlogs.port, gateway.port, "/{namespace}")
        ),
    );
    // Lines written while the dead store is retried arrive too.
    std::thread::sleep(Duration::from_millis(500));
    for pod in [PODS[0], PODS[1]] {
        want.extend(append(&d.logs, &pod, base, 300..400));
    }
    dead.extend(append(&d.logs, &DEAD, base, 300..400));
    assert_holds_exactly(&vlogs, &want, &mut shipper);
    let text = shipper.metrics();
    assert!(
        metric(
            &text,
            "log_shipper_retries_total{kind=\"server_error\",store=\"shoot\"}"
        ) > 0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "log_shipper_entries_accepted_total{store=\"seed\"}"),
        400
    );
    assert_eq!(
        metric(&text, "log_shipper_entries_accepted_total{store=\"shoot\"}"),
        400,
        "the live shoot's, none of the dead one's"
    );
    assert_eq!(metric(&text, "log_shipper_stores{store=\"shoot\"}"), 2);

    // The dead store comes up: its lines arrive, once, from where they waited.
    let revived = Server::start(&binary, dead_port, "loss-dead-revived");
    let dead: BTreeSet<Stored> = dead.into_iter().collect();
    assert_holds_exactly(&revived, &dead, &mut shipper);
    let status = shipper.terminate(Duration::from_secs(25));
    assert!(status.success(), "{status:?}");
    assert_holds_exactly(&vlogs, &want, &mut shipper);
}

#[test]
fn a_store_answering_429_gets_everything_after_backing_off() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "a_store_answering_429_gets_everything_after_backing_off";
    let Some(binary) = common::victoria_logs(test) else {
        return;
    };
    let d = common::dirs("loss", "429");
    let vlogs = Server::start(&binary, common::free_port(), "loss-429");
    // VictoriaLogs does not rate-limit pushes; a gateway in front of it does, as Loki's
    // gateway or an ingress would: more than three requests in a second are answered 429.
    let Some(gateway) = Haproxy::start(
        test,
        &d,
        &format!(
            "frontend limited\n  bind 127.0.0.1:{{port}}\n  stick-table type integer size 1 expire 10s store http_req_rate(1s)\n  http-request track-sc0 int(1)\n  http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 3 }}\n  default_backend store\n\
             backend store\n  server vlogs 127.0.0.1:{}\n",
            vlogs.port
        ),
    ) else {
        return;
    };
    let base = common::a_minute_ago(11);
    let want: BTreeSet<Stored> = append(&d.logs, &PODS[1], base, 0..600)
        .into_iter()
        .collect();
    let began = Instant::now();
    let mut shipper = Shipper::start(
        &d,
        &format!(
            "  max_entry_bytes: 4096\n{}delivery: {{batch_bytes: 8192, batch_wait: 50ms, min_backoff: 100ms, max_backoff: 1s}}\n",
            stores(gateway.port, gateway.port, "")
        ),
    );
    assert_holds_exactly(&vlogs, &want, &mut shipper);
    let took = began.elapsed();
    // Everything was acknowledged, so the retries are all counted by now.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = shipper.metrics();
        if metric(&text, "log_shipper_entries_accepted_total{store=\"seed\"}") == 600 {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let limited = metric(
        &text,
        "log_shipper_retries_total{kind=\"rate_limited\",store=\"seed\"}",
    );
    let requests = metric(&text, "log_shipper_requests_total{store=\"seed\"}");
    assert!(limited > 0, "{text}");
    // Backing off: each retry waits min_backoff (100 ms) at least, so retries are bounded by
    // the time taken; a retry without a pause would make thousands. Besides them one request
    // per batch (600 entries of ~150 bytes, 8 KiB batches: about a dozen).
    assert!(
        requests <= took.as_millis() as u64 / 100 + 30,
        "{requests} requests in {took:?}"
    );
    eprintln!("{requests} requests, {limited} answered 429, in {took:?}");
    let status = shipper.terminate(Duration::from_secs(25));
    assert!(status.success(), "{status:?}");
}

/// Whether a TLS client that trusts `ca` but has no certificate gets an HTTP answer from
/// `127.0.0.1:port`.
fn answers_without_a_client_certificate(ca: &Path, port: u16) -> bool {
    use std::io::Read as _;
    let config = agentkit::tls::client_config(ca).expect("a client config");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a server name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("a TLS client");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if tls.write_all(request).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/")
}

#[test]
fn an_https_store_behind_mtls_gets_every_line_from_the_client_certificate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "an_https_store_behind_mtls_gets_every_line";
    let Some(binary) = common::victoria_logs(test) else {
        return;
    };
    let d = common::dirs("loss", "mtls");
    let vlogs = Server::start(&binary, common::free_port(), "loss-mtls");
    let pki = agentkit::testing::Pki::new().expect("a CA");
    let tls = d.root.join("tls");
    let ca = pki.write_ca(&tls).expect("ca.pem");
    let server = pki
        .leaf(&["localhost", "127.0.0.1"])
        .expect("a server leaf");
    let server_pem = tls.join("server.pem");
    fs::write(
        &server_pem,
        format!("{}{}", server.cert_pem, server.key_pem),
    )
    .expect("server.pem");
    let client = pki.leaf(&["log-shipper"]).expect("a client leaf");
    let (cert, key) = (tls.join("client.pem"), tls.join("client-key.pem"));
    fs::write(&cert, &client.cert_pem).expect("client.pem");
    fs::write(&key, &client.key_pem).expect("client-key.pem");
    // The store's ingress terminates TLS and lets through only clients with a certificate of
    // this CA, as a store behind mTLS does.
    let Some(gateway) = Haproxy::start(
        test,
        &d,
        &format!(
            "frontend mtls\n  bind 127.0.0.1:{{port}} ssl crt {} ca-file {} verify required\n  default_backend store\n\
             backend store\n  server vlogs 127.0.0.1:{}\n",
            server_pem.display(),
            ca.display(),
            vlogs.port
        ),
    ) else {
        return;
    };
    assert!(
        !answers_without_a_client_certificate(&ca, gateway.port),
        "the gateway must refuse a client without a certificate"
    );
    let base = common::a_minute_ago(17);
    let want: BTreeSet<Stored> = PODS
        .iter()
        .flat_map(|pod| append(&d.logs, pod, base, 0..300))
        .collect();
    let tls_fields = format!(
        "ca: {}, cert: {}, key: {}",
        ca.display(),
        cert.display(),
        key.display()
    );
    let url = format!("https://127.0.0.1:{}/insert/loki/api/v1/push", gateway.port);
    let mut shipper = Shipper::start(
        &d,
        &format!(
            "stores:\n  seed: {{url: \"{url}?extra_fields=store=seed\", protocol: loki, {tls_fields}}}\n  shoot: {{url: \"{url}?extra_fields=store={{namespace}}\", protocol: loki, {tls_fields}}}\n"
        ),
    );
    assert_holds_exactly(&vlogs, &want, &mut shipper);
    let status = shipper.terminate(Duration::from_secs(25));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_line_longer_than_max_entry_bytes_is_split_and_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(binary) = common::victoria_logs("a_line_longer_than_max_entry_bytes") else {
        return;
    };
    const MAX: usize = 1024;
    let vlogs = Server::start(&binary, common::free_port(), "loss-long");
    let d = common::dirs("loss", "long");
    let pod = PODS[1];
    let dir = pod.dir(&d.logs);
    fs::create_dir_all(&dir).expect("container dir");
    let base = common::a_minute_ago(13);
    let text = |n: usize, tag: &str| -> String {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < n {
            let _ = write!(s, "{tag}{i:05}|");
            i += 1;
        }
        s.truncate(n);
        s
    };
    let mut want = BTreeSet::new();
    let mut record = |ts: i64, msg: &str| {
        want.insert((
            "seed".to_owned(),
            pod.ns.to_owned(),
            pod.pod.to_owned(),
            pod.container.to_owned(),
            "seed".to_owned(),
            ts,
            msg.to_owned(),
        ))
    };
    let mut cri_text = String::new();
    // A short line, one line of 5000 bytes (one F line), three partial lines and their F
    // line (6300 bytes joined), a short line.
    let (ts0, ts1) = (base, base + 1_000);
    let _ = writeln!(cri_text, "{} stdout F short before", rfc3339(ts0));
    record(ts0, "short before");
    let one = text(5000, "one");
    let _ = writeln!(cri_text, "{} stdout F {one}", rfc3339(ts1));
    for piece in one.as_bytes().chunks(MAX) {
        record(ts1, std::str::from_utf8(piece).expect("ASCII"));
    }
    let parts = [
        (base + 2_000, "P", text(2000, "pa")),
        (base + 2_001, "P", text(2000, "pb")),
        (base + 2_002, "P", text(2000, "pc")),
        (base + 2_003, "F", text(300, "pd")),
    ];
    let mut joined = String::new();
    let mut line_of_byte = Vec::new();
    for (ts, tag, content) in &parts {
        let _ = writeln!(cri_text, "{} stderr {tag} {content}", rfc3339(*ts));
        joined.push_str(content);
        line_of_byte.extend(std::iter::repeat_n(*ts, content.len()));
    }
    // A piece has the timestamp of the line its first byte comes from.
    for (k, piece) in joined.as_bytes().chunks(MAX).enumerate() {
        record(
            line_of_byte[k * MAX],
            std::str::from_utf8(piece).expect("ASCII"),
        );
    }
    let _ = writeln!(cri_text, "{} stdout F short after", rfc3339(base + 3_000));
    record(base + 3_000, "short after");
    fs::write(dir.join("0.log"), cri_text).expect("write");

    let mut shipper = Shipper::start(
        &d,
        &format!(
            "  max_entry_bytes: {MAX}\n{}delivery: {{batch_wait: 100ms}}\n",
            stores(vlogs.port, vlogs.port, "")
        ),
    );
    assert_holds_exactly(&vlogs, &want, &mut shipper);
    let text = shipper.metrics();
    // 5000 bytes: four pieces split, the fifth ends the entry; 6300 bytes: six and one.
    assert_eq!(
        metric(&text, "log_shipper_entries_split_total"),
        4 + 6,
        "{text}"
    );
    assert_eq!(
        metric(&text, "log_shipper_entries_routed_total{store=\"seed\"}"),
        want.len() as u64
    );
    let status = shipper.terminate(Duration::from_secs(25));
    assert!(status.success(), "{status:?}");
}
