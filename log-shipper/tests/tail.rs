//! The tailer on real files in a temporary directory laid out as the kubelet does: rotation
//! under a fast writer (every line exactly once, in order per file), restarts from the
//! persisted checkpoints (duplicates exactly from the last acknowledged offset), files deleted
//! while open, truncation, malformed directories, the descriptor cap.
//!
//! The tailer takes `now` from the test: each poll advances it by the rescan interval, so every
//! poll scans and no test waits for a timer. Writer threads run at full speed; every loop is
//! bounded by a deadline.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log_shipper::checkpoint::FileKey;
use log_shipper::config::Input;
use log_shipper::tail::{FileRef, Record, Tailer};

const RESCAN: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(60);
/// The writers' pause every 64 lines: about 5,000 lines (400 KB) per 10 ms at most.
const PACE: Duration = Duration::from_micros(100);

/// A fresh directory with `logs/` and `checkpoints/`.
struct Dir {
    base: PathBuf,
}

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tail-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("logs")).expect("temp dir");
        Dir { base }
    }

    fn root(&self) -> PathBuf {
        self.base.join("logs")
    }

    fn input(&self, max_open_files: usize) -> Input {
        Input {
            path: self.root(),
            checkpoint_dir: self.base.join("checkpoints"),
            max_entry_bytes: 16 * 1024,
            partial_timeout: Duration::from_secs(3600),
            rescan_interval: RESCAN,
            max_open_files,
            node_name: None,
        }
    }

    /// `<root>/ns_<pod>_<uid>/<container>/`, created.
    fn container(&self, pod: &str, container: &str) -> PathBuf {
        let dir = self
            .root()
            .join(format!("shoot--p--n_{pod}_0b1c2d3e-aaaa-4bbb-8ccc-{pod}"))
            .join(container);
        fs::create_dir_all(&dir).expect("container dir");
        dir
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// The CRI line of sequence number `seq` of stream `tag`.
fn line(tag: &str, seq: usize) -> String {
    format!(
        "2026-12-06T07:50:{:02}.{:09}Z stdout F {tag} {seq:08} {}\n",
        seq / 1_000_000 % 60,
        seq % 1_000_000_000,
        "lorem ipsum dolor sit amet"
    )
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

fn lines(tag: &str, range: std::ops::Range<usize>) -> String {
    range.map(|i| line(tag, i)).collect()
}

/// `(tag, seq)` of a record's line.
fn parse(record: &Record) -> (String, usize) {
    let entry = record.event.as_ref().expect("a CRI entry");
    let text = std::str::from_utf8(&entry.content).expect("utf-8");
    let mut words = text.split(' ');
    let tag = words.next().expect("tag").to_owned();
    let seq = words.next().expect("seq").parse().expect("number");
    (tag, seq)
}

/// Drives a tailer with a fake clock.
struct Driver {
    tailer: Tailer,
    now: Instant,
    records: Vec<Record>,
}

impl Driver {
    fn new(input: &Input) -> Driver {
        Driver {
            tailer: Tailer::new(input).expect("tailer"),
            now: Instant::now(),
            records: Vec::new(),
        }
    }

    /// One poll, the clock one rescan interval later.
    fn poll(&mut self) -> usize {
        self.now += RESCAN;
        let before = self.records.len();
        self.tailer.poll(self.now, &mut self.records).expect("poll");
        self.records.len() - before
    }

    /// Polls until `done` holds for the records so far (bounded).
    fn until(&mut self, mut done: impl FnMut(&[Record]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(&self.records) {
            assert!(
                Instant::now() < deadline,
                "deadline: {} records, {:?}",
                self.records.len(),
                self.tailer.stats()
            );
            if self.poll() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Polls `n` more times and says how many records they brought.
    fn settle(&mut self, n: usize) -> usize {
        (0..n).map(|_| self.poll()).sum()
    }

    fn ack_all(&mut self) {
        for r in &self.records {
            self.tailer.ack(r.file, r.checkpoint());
        }
    }
}

/// Sequence numbers per file, in the order read.
fn per_file(records: &[Record]) -> BTreeMap<FileKey, Vec<(String, usize)>> {
    let mut out: BTreeMap<FileKey, Vec<(String, usize)>> = BTreeMap::new();
    for r in records {
        out.entry(r.file.key).or_default().push(parse(r));
    }
    out
}

/// Writes `n` lines to `<dir>/0.log` as fast as it can, rotating as the kubelet does (rename
/// to `0.log.<YYYYMMDD-hhmmss>`, then a new `0.log`) whenever it reaches `rotate_at` bytes.
/// Every 64 lines it sleeps `pace`. Returns the number of rotations; after each, one late line numbered `n + rotation` goes to
/// the renamed file.
fn write_rotating(dir: &Path, tag: &str, n: usize, rotate_at: u64, pace: Duration) -> usize {
    let live = dir.join("0.log");
    let mut file = File::create(&live).expect("create 0.log");
    let mut size = 0u64;
    let mut rotations = 0;
    let mut batch = String::new();
    for seq in 0..n {
        batch.push_str(&line(tag, seq));
        // A few lines per write, as a runtime's buffered copier does.
        if seq % 8 == 7 || seq + 1 == n {
            file.write_all(batch.as_bytes()).expect("write");
            size += batch.len() as u64;
            batch.clear();
        }
        // A short pause now and then, so that reads interleave with the writes (and renames)
        // instead of finding every file finished.
        if seq % 64 == 63 && !pace.is_zero() {
            std::thread::sleep(pace);
        }
        if size >= rotate_at {
            rotations += 1;
            let rotated = dir.join(format!("0.log.20261206-{rotations:06}"));
            fs::rename(&live, &rotated).expect("rotate");
            // The runtime writes on into the renamed file until it reopens: one late line,
            // numbered past `n`.
            file.write_all(line(tag, n + rotations).as_bytes())
                .expect("late write");
            file = File::create(&live).expect("reopen 0.log");
            size = 0;
        }
    }
    rotations
}

#[test]
fn rotation_under_load_reads_every_line_exactly_once() {
    let dir = Dir::new("rotation");
    const N: usize = 40_000;
    let dirs = [
        dir.container("api", "kube-apiserver"),
        dir.container("etcd", "etcd"),
    ];
    let mut driver = Driver::new(&dir.input(64));
    driver.poll();
    let rotations: Vec<usize> = std::thread::scope(|s| {
        let writers: Vec<_> = dirs
            .iter()
            .zip(["a", "b"])
            .map(|(d, tag)| s.spawn(move || write_rotating(d, tag, N, 256 * 1024, PACE)))
            .collect();
        let count = |records: &[Record]| records.iter().filter(|r| parse(r).1 < N).count();
        driver.until(|records| count(records) >= 2 * N && writers.iter().all(|w| w.is_finished()));
        writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .collect()
    });
    assert!(rotations.iter().all(|&r| r >= 10), "{rotations:?}");
    driver.settle(5);
    driver.ack_all();

    // Every line exactly once per container, and in order within each file.
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for (key, lines) in per_file(&driver.records) {
        let seqs: Vec<usize> = lines.iter().filter(|l| l.1 < N).map(|l| l.1).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "file {key:?} not in order"
        );
        for (tag, seq) in lines {
            seen.entry(tag).or_default().push(seq);
        }
    }
    for tag in ["a", "b"] {
        let mut seqs: Vec<usize> = seen[tag].iter().copied().filter(|&s| s < N).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "container {tag}");
        // The line written into the renamed file before the reopen is read too, once each.
        let late = seen[tag].iter().filter(|&&s| s >= N).count();
        assert_eq!(late, rotations[if tag == "a" { 0 } else { 1 }], "{tag}");
    }
    let stats = driver.tailer.stats();
    assert_eq!(stats.vanished_unread, 0, "{stats:?}");
    assert_eq!(stats.truncations, 0, "{stats:?}");
    // Each rotated file was drained and closed; only the two live files stay open.
    assert_eq!(
        stats.rotated_drained as usize,
        rotations.iter().sum::<usize>(),
        "{stats:?}"
    );
    assert_eq!(driver.tailer.open_files(), 2);
    // The acknowledged offsets, persisted, are each file's size.
    driver.tailer.persist().expect("persist");
    for key in per_file(&driver.records).keys() {
        let c = driver.tailer.checkpoint(key).expect("checkpoint");
        assert_eq!(
            c.offset,
            fs::metadata(&c.path).expect("file").len(),
            "{c:?}"
        );
    }
}

#[test]
fn rotation_step_by_step() {
    // The kubelet's order, one step per poll: the renamed file is read on (the runtime still
    // writes to it) and finished only once its successor exists; the successor from 0.
    let dir = Dir::new("rotation-steps");
    let app = dir.container("app", "app");
    let live = app.join("0.log");
    let rotated = app.join("0.log.20261206-075000");
    let mut d = Driver::new(&dir.input(16));
    append(&live, &lines("a", 0..10));
    d.until(|r| r.len() == 10);
    let old = d.records[0].file;
    // The rename, and the runtime's last writes into the renamed file.
    fs::rename(&live, &rotated).expect("rename");
    append(&rotated, &lines("a", 10..15));
    d.until(|r| r.len() == 15);
    assert_eq!(d.tailer.stats().rotations, 1);
    assert_eq!(d.tailer.stats().rotated_drained, 0, "no successor yet");
    assert_eq!(d.tailer.open_files(), 1);
    append(&rotated, &lines("a", 15..20));
    // The runtime reopens: a new 0.log; the old file gets its last lines read, then closes.
    append(&live, &lines("b", 0..5));
    d.until(|r| r.len() == 25);
    assert_eq!(d.settle(2), 0);
    assert_eq!(d.tailer.stats().rotated_drained, 1);
    assert_eq!(d.tailer.open_files(), 1);
    let files = per_file(&d.records);
    let a: Vec<usize> = files[&old.key].iter().map(|l| l.1).collect();
    assert_eq!(a, (0..20).collect::<Vec<_>>());
    assert_eq!(files.len(), 2);
    // The next rotation compresses and deletes it: forgotten, not lost.
    fs::remove_file(&rotated).expect("delete");
    assert_eq!(d.settle(3), 0);
    let stats = d.tailer.stats();
    assert_eq!(
        (stats.vanished_unread, d.tailer.files()),
        (0, 1),
        "{stats:?}"
    );
    assert!(d.tailer.checkpoint(&old.key).is_none());
}

#[test]
fn restart_resumes_at_the_last_acknowledged_offset_even_after_a_rotation() {
    let dir = Dir::new("restart");
    let app = dir.container("app", "app");
    let live = app.join("0.log");
    append(&live, &lines("a", 0..1000));
    let input = dir.input(16);

    // First run: everything read; the first 400 acknowledged and persisted, 700 acknowledged
    // but not persisted when the agent dies (no persist, no drop handler).
    let mut first = Driver::new(&input);
    first.until(|r| r.len() == 1000);
    let file = first.records[0].file;
    let persisted = first.records[399].checkpoint();
    first.tailer.ack(file, persisted);
    first.tailer.persist().expect("persist");
    first.tailer.ack(file, first.records[699].checkpoint());
    let first_run: Vec<(u64, usize)> = first
        .records
        .iter()
        .map(|r| (r.checkpoint(), parse(r).1))
        .collect();
    drop(first);

    // While it is down: more lines, then the kubelet's rotation and a new file.
    append(&live, &lines("a", 1000..1100));
    fs::rename(&live, app.join("0.log.20261206-075000")).expect("rotate");
    append(&live, &lines("b", 0..300));

    let mut second = Driver::new(&input);
    second.until(|r| r.len() >= 1000);
    assert_eq!(second.settle(3), 0, "nothing more");
    let files = per_file(&second.records);
    let old = files.get(&file.key).expect("the rotated file, by identity");
    // Exactly the lines after the persisted offset: duplicates are those the first run read
    // past it, nothing before it, nothing lost.
    let want_dup: Vec<usize> = first_run
        .iter()
        .filter(|(c, _)| *c > persisted)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(want_dup, (400..1000).collect::<Vec<_>>());
    let got: Vec<usize> = old.iter().map(|l| l.1).collect();
    assert_eq!(got, (400..1100).collect::<Vec<_>>());
    let new: Vec<(String, usize)> = files
        .iter()
        .find(|(k, _)| **k != file.key)
        .map(|(_, l)| l.clone())
        .expect("the new file");
    assert_eq!(
        new,
        (0..300).map(|i| ("b".to_owned(), i)).collect::<Vec<_>>()
    );
    let stats = second.tailer.stats();
    assert_eq!((stats.resumed, stats.rotated_drained), (1, 1), "{stats:?}");

    // The rotated file is done and acknowledged: a third start reads nothing of it, and the
    // live one from its acknowledged offset.
    second.ack_all();
    second.tailer.persist().expect("persist");
    drop(second);
    append(&live, &lines("b", 300..310));
    let mut third = Driver::new(&input);
    third.until(|r| r.len() >= 10);
    assert_eq!(third.settle(3), 0);
    let got: Vec<(String, usize)> = third.records.iter().map(parse).collect();
    assert_eq!(
        got,
        (300..310).map(|i| ("b".to_owned(), i)).collect::<Vec<_>>()
    );
}

#[test]
fn kill_and_restart_repeatedly_while_writing_and_rotating() {
    // Five agent lives against one writer that rotates every 64 KiB: each life acknowledges a
    // prefix of what it read and persists it, then "dies"; the next life must start each file
    // exactly at its persisted offset. Together they read every line.
    let dir = Dir::new("crash-loop");
    const N: usize = 30_000;
    let app = dir.container("app", "app");
    let input = dir.input(16);
    let mut all: HashMap<usize, usize> = HashMap::new();
    let mut persisted: HashMap<FileKey, u64> = HashMap::new();
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_rotating(&app, "a", N, 64 * 1024, PACE));
        for life in 0..6 {
            let mut d = Driver::new(&input);
            let deadline = Instant::now() + DEADLINE;
            let last_life = life == 5;
            loop {
                d.poll();
                let enough = if last_life {
                    writer.is_finished() && d.settle(3) == 0
                } else {
                    d.records.len() >= 2_000 || writer.is_finished()
                };
                if enough {
                    break;
                }
                assert!(Instant::now() < deadline, "life {life}: deadline");
                std::thread::sleep(Duration::from_millis(1));
            }
            // Each file starts exactly at the offset the previous life persisted.
            let mut first_of: HashMap<FileRef, &Record> = HashMap::new();
            for r in &d.records {
                first_of.entry(r.file).or_insert(r);
            }
            for (f, r) in &first_of {
                if let Some(&offset) = persisted.get(&f.key) {
                    let len = r.event.as_ref().expect("entry").content.len() as u64;
                    let line_len =
                        len + "2026-12-06T07:50:00.000000000Z stdout F ".len() as u64 + 1;
                    assert_eq!(
                        r.checkpoint(),
                        offset + line_len,
                        "life {life}: {f:?} resumed elsewhere"
                    );
                }
            }
            for r in &d.records {
                *all.entry(parse(r).1).or_default() += 1;
            }
            // Acknowledge two thirds of each file's records, persist, die.
            let mut by_file: HashMap<FileRef, Vec<u64>> = HashMap::new();
            for r in &d.records {
                by_file.entry(r.file).or_default().push(r.checkpoint());
            }
            for (f, checkpoints) in by_file {
                let upto = checkpoints[checkpoints.len() * 2 / 3];
                d.tailer.ack(f, upto);
            }
            d.tailer.persist().expect("persist");
            persisted = d
                .records
                .iter()
                .filter_map(|r| {
                    d.tailer
                        .checkpoint(&r.file.key)
                        .map(|c| (r.file.key, c.offset))
                })
                .collect();
            if last_life {
                break;
            }
        }
        writer.join().expect("writer");
    });
    for seq in 0..N {
        assert!(all.contains_key(&seq), "line {seq} lost");
    }
}

#[test]
fn new_containers_are_picked_up_within_the_rescan_interval() {
    let dir = Dir::new("discovery");
    let input = dir.input(16);
    let mut tailer = Tailer::new(&input).expect("tailer");
    let t0 = Instant::now();
    let mut out = Vec::new();
    tailer.poll(t0, &mut out).expect("poll");
    append(&dir.container("late", "c").join("0.log"), &lines("a", 0..3));
    tailer
        .poll(t0 + RESCAN - Duration::from_millis(1), &mut out)
        .expect("poll");
    assert!(out.is_empty(), "no scan before the interval");
    tailer.poll(t0 + RESCAN, &mut out).expect("poll");
    assert_eq!(out.len(), 3);
    let c = &out[0].container;
    assert_eq!(
        (c.namespace.as_str(), c.pod.as_str(), c.container.as_str()),
        ("shoot--p--n", "late", "c")
    );
    assert_eq!(c.uid, "0b1c2d3e-aaaa-4bbb-8ccc-late");
}

#[test]
fn a_file_deleted_while_open_is_drained() {
    let dir = Dir::new("deleted");
    let app = dir.container("gone", "app");
    // Larger than one poll's quantum, so it is open and half read when deleted.
    let n = 20_000;
    append(&app.join("0.log"), &lines("a", 0..n));
    let mut d = Driver::new(&dir.input(16));
    d.poll();
    assert!(d.records.len() < n, "read in several polls");
    d.ack_all();
    d.tailer.persist().expect("persist");
    let key = d.records[0].file.key;
    assert!(d.tailer.checkpoint(&key).is_some());
    fs::remove_dir_all(
        dir.root()
            .join("shoot--p--n_gone_0b1c2d3e-aaaa-4bbb-8ccc-gone"),
    )
    .expect("delete the pod's logs");
    d.until(|r| r.len() >= n);
    assert_eq!(d.settle(3), 0);
    let seqs: Vec<usize> = d.records.iter().map(|r| parse(r).1).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
    let stats = d.tailer.stats();
    assert_eq!(
        (stats.deleted_drained, stats.vanished_unread),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!((d.tailer.files(), d.tailer.open_files()), (0, 0));
    assert!(
        d.tailer.checkpoint(&key).is_none(),
        "its checkpoint is dropped"
    );
}

#[test]
fn truncation_restarts_the_file_and_stale_acks_are_ignored() {
    let dir = Dir::new("truncate");
    let log = dir.container("t", "app").join("0.log");
    append(&log, &lines("a", 0..100));
    let mut d = Driver::new(&dir.input(16));
    d.until(|r| r.len() == 100);
    let before = d.records[99].file;
    OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    append(&log, &lines("b", 0..10));
    d.until(|r| r.len() == 110);
    let after: Vec<(String, usize)> = d.records[100..].iter().map(parse).collect();
    assert_eq!(
        after,
        (0..10).map(|i| ("b".to_owned(), i)).collect::<Vec<_>>()
    );
    assert_eq!(d.tailer.stats().truncations, 1);
    let now = d.records[109].file;
    assert_eq!(now.key, before.key);
    assert_ne!(now.epoch, before.epoch);
    // A late acknowledgement of the old content does not move the new checkpoint.
    d.tailer.ack(before, 100_000);
    assert_eq!(d.tailer.stats().stale_acks, 1);
    assert_eq!(d.tailer.checkpoint(&now.key).expect("checkpoint").offset, 0);
    d.tailer.ack(now, d.records[109].checkpoint());
    assert_eq!(
        d.tailer.checkpoint(&now.key).expect("checkpoint").offset,
        fs::metadata(&log).expect("log").len()
    );
}

#[test]
fn malformed_directories_and_other_files_are_skipped_and_counted() {
    let dir = Dir::new("malformed");
    let root = dir.root();
    append(&dir.container("ok", "app").join("0.log"), &lines("a", 0..5));
    for bad in ["not-a-pod-dir", "a_b", "ns_pod_uid_extra", "UPPER_pod_uid"] {
        fs::create_dir_all(root.join(bad).join("app")).expect("dir");
        append(&root.join(bad).join("app").join("0.log"), &lines("x", 0..5));
    }
    append(&root.join("stray-file"), "x\n");
    let pod = root.join("shoot--p--n_ok_0b1c2d3e-aaaa-4bbb-8ccc-ok");
    fs::create_dir_all(pod.join("Bad_Container")).expect("dir");
    append(&pod.join("Bad_Container").join("0.log"), &lines("x", 0..5));
    // Compressed and temporary rotations are not read.
    let app = pod.join("app");
    append(&app.join("0.log.20261206-070000.gz"), &lines("x", 0..5));
    append(&app.join("0.log.20261206-070000.gz.tmp"), &lines("x", 0..5));
    append(&app.join("notes.txt"), &lines("x", 0..5));

    let mut d = Driver::new(&dir.input(16));
    d.until(|r| r.len() >= 5);
    assert_eq!(d.settle(3), 0);
    assert!(d.records.iter().all(|r| parse(r).0 == "a"));
    assert_eq!(d.tailer.stats().malformed_dirs, 6);
    assert_eq!(d.tailer.files(), 1);
}

/// Descriptors this process holds on files under `root`.
fn fds_under(root: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|p| p.starts_with(root)))
        .count()
}

#[test]
fn the_descriptor_cap_is_respected_and_every_file_is_read() {
    let dir = Dir::new("cap");
    let cap = 2;
    let dirs: Vec<PathBuf> = (0..6)
        .map(|i| dir.container(&format!("pod{i}"), "app"))
        .collect();
    for (i, d) in dirs.iter().enumerate() {
        append(&d.join("0.log"), &lines(&format!("c{i}"), 0..50));
    }
    let mut d = Driver::new(&dir.input(cap));
    let root = dir.root();
    let deadline = Instant::now() + DEADLINE;
    let round = |d: &mut Driver, want: usize| {
        while d.records.len() < want {
            d.poll();
            assert!(d.tailer.open_files() <= cap);
            assert!(fds_under(&root) <= cap, "{} descriptors", fds_under(&root));
            assert!(Instant::now() < deadline, "deadline");
        }
    };
    round(&mut d, 300);
    // More lines in every file: the closed ones are opened again in turn.
    for (i, dd) in dirs.iter().enumerate() {
        append(&dd.join("0.log"), &lines(&format!("c{i}"), 50..60));
    }
    round(&mut d, 360);
    assert_eq!(d.settle(6), 0);
    let mut by_tag: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for r in &d.records {
        let (tag, seq) = parse(r);
        by_tag.entry(tag).or_default().push(seq);
    }
    assert_eq!(by_tag.len(), 6);
    for seqs in by_tag.values() {
        assert_eq!(seqs, &(0..60).collect::<Vec<_>>());
    }
    assert!(d.tailer.stats().evictions > 0);
}

#[test]
fn checkpoints_that_do_not_fit_are_read_from_zero() {
    use log_shipper::checkpoint::{Checkpoint, Checkpoints, Fingerprint};
    use std::os::unix::fs::MetadataExt;

    let dir = Dir::new("mismatch");
    let input = dir.input(16);
    let reused = dir.container("reused", "app").join("0.log");
    let shrunk = dir.container("shrunk", "app").join("0.log");
    append(&reused, &lines("r", 0..20));
    append(&shrunk, &lines("s", 0..20));
    let key = |path: &Path| {
        let m = fs::metadata(path).expect("log");
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    };
    {
        // As a previous life would have left them: one for another file that had this inode
        // (other first bytes), one past the end of a file truncated while the agent was down.
        let (mut store, _) = Checkpoints::open(&input.checkpoint_dir).expect("store");
        store.set(
            key(&reused),
            Checkpoint {
                fingerprint: Fingerprint::of(line("other", 0).as_bytes()),
                path: reused.clone(),
                offset: line("r", 0).len() as u64 * 10,
            },
        );
        let content = fs::read(&shrunk).expect("log");
        store.set(
            key(&shrunk),
            Checkpoint {
                fingerprint: Fingerprint::of(&content),
                path: shrunk.clone(),
                offset: content.len() as u64 + 1,
            },
        );
        store.persist().expect("persist");
    }
    let mut d = Driver::new(&input);
    d.until(|r| r.len() >= 40);
    assert_eq!(d.settle(2), 0);
    let stats = d.tailer.stats();
    assert_eq!(
        (stats.checkpoint_mismatch, stats.resumed),
        (2, 0),
        "{stats:?}"
    );
    for (_, lines) in per_file(&d.records) {
        let seqs: Vec<usize> = lines.iter().map(|l| l.1).collect();
        assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    }
}

#[test]
fn a_garbage_checkpoint_file_costs_a_reread_not_a_line() {
    let dir = Dir::new("garbage-checkpoints");
    let input = dir.input(16);
    let log = dir.container("app", "app").join("0.log");
    append(&log, &lines("a", 0..30));
    let mut d = Driver::new(&input);
    d.until(|r| r.len() == 30);
    d.ack_all();
    d.tailer.persist().expect("persist");
    drop(d);
    // The file damaged after its header: the line of our file fails its checksum.
    let path = input
        .checkpoint_dir
        .join(log_shipper::checkpoint::FILE_NAME);
    let mut bytes = fs::read(&path).expect("checkpoints");
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).expect("damage");
    let mut d = Driver::new(&input);
    assert_eq!(d.tailer.stats().checkpoints_ignored, 1);
    d.until(|r| r.len() >= 30);
    assert_eq!(d.settle(2), 0);
    let seqs: Vec<usize> = d.records.iter().map(|r| parse(r).1).collect();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());
}

#[test]
fn a_partial_line_without_its_end_is_flushed_after_the_timeout() {
    let dir = Dir::new("partial");
    let mut input = dir.input(16);
    input.partial_timeout = Duration::from_secs(5);
    let log = dir.container("app", "app").join("0.log");
    append(
        &log,
        "2026-12-06T07:50:00.000000001Z stdout P the container exited mid-li\n",
    );
    let mut d = Driver::new(&input);
    // Each poll is one second later: nothing before five seconds without new bytes.
    for _ in 0..4 {
        assert_eq!(d.poll(), 0);
    }
    d.until(|r| !r.is_empty());
    assert_eq!(d.records.len(), 1);
    let entry = d.records[0].event.as_ref().expect("entry");
    assert_eq!(entry.content, b"the container exited mid-li");
    assert_eq!(entry.end, log_shipper::cri::End::Flushed);
    assert_eq!(
        d.records[0].checkpoint(),
        fs::metadata(&log).expect("log").len()
    );
}

#[test]
fn a_file_opened_empty_gets_its_full_fingerprint() {
    let dir = Dir::new("fingerprint");
    let log = dir.container("app", "app").join("0.log");
    append(&log, "");
    let mut d = Driver::new(&dir.input(16));
    d.poll();
    assert_eq!(d.tailer.open_files(), 1);
    append(&log, &lines("a", 0..30));
    d.until(|r| r.len() == 30);
    let key = d.records[0].file.key;
    let c = d.tailer.checkpoint(&key).expect("checkpoint");
    let content = fs::read(&log).expect("log");
    assert_eq!(
        c.fingerprint,
        log_shipper::checkpoint::Fingerprint::of(&content)
    );
    assert_eq!(
        c.fingerprint.len as usize,
        log_shipper::checkpoint::FINGERPRINT_BYTES
    );
}

/// `poll_except`: the files of a paused container are not read (their position stays), the
/// others are; once unpaused, the paused file's lines come, none lost or repeated.
#[test]
fn a_paused_containers_files_wait_while_the_others_are_read() {
    let dir = Dir::new("paused");
    let a = dir.container("pod-a", "app");
    let b = dir.container("pod-b", "app");
    append(&a.join("0.log"), &lines("a", 0..50));
    append(&b.join("0.log"), &lines("b", 0..50));
    let mut d = Driver::new(&dir.input(16));
    let paused = |c: &log_shipper::tail::path::Container| c.pod == "pod-a";
    let step = |d: &mut Driver, paused: &dyn Fn(&log_shipper::tail::path::Container) -> bool| {
        d.now += RESCAN;
        d.tailer
            .poll_except(d.now, &mut d.records, paused)
            .expect("poll");
    };
    step(&mut d, &paused);
    step(&mut d, &paused);
    append(&b.join("0.log"), &lines("b", 50..60));
    step(&mut d, &paused);
    let tags: Vec<(String, usize)> = d.records.iter().map(parse).collect();
    assert_eq!(
        tags,
        (0..60).map(|i| ("b".to_owned(), i)).collect::<Vec<_>>()
    );
    d.records.clear();
    step(&mut d, &|_| false);
    let tags: Vec<(String, usize)> = d.records.iter().map(parse).collect();
    assert_eq!(
        tags,
        (0..50).map(|i| ("a".to_owned(), i)).collect::<Vec<_>>()
    );
}
