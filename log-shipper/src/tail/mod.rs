//! The tailer: finds the CRI log files under the log root, reads them through one
//! [`cri::Reader`] each, follows the kubelet's rotation, and keeps the per-file checkpoints.
//!
//! It is blocking code, driven by its caller: [`Tailer::poll`] scans the directories when the
//! rescan interval has passed, opens files (at most `input.max_open_files`), reads a bounded
//! quantum of each, and hands out [`Record`]s, each naming its file ([`FileRef`]) and carrying
//! the CRI reader's checkpoint. The caller [`ack`](Tailer::ack)s a file's offset once a store
//! accepted every record up to it; the acknowledged offsets are persisted every
//! [`CHECKPOINT_INTERVAL`] (and by [`Tailer::persist`]), never per line. The decisions (what
//! to open, where to start, when a rotated file is done) are in [`track`], without IO; the
//! layout of names in [`path`].
//!
//! What it guarantees, per file (see docs/log-shipper.md):
//! - a rotated file (`0.log` renamed to `0.log.<ts>`, same inode) is read to its end, after a
//!   scan saw its successor at `0.log`, before it is closed; the successor is read from 0;
//! - a file deleted while open is read to its end through its descriptor;
//! - a file that shrank below the read position (truncated) is read again from 0, counted;
//! - after a restart, a file resumes at its persisted offset, found by device, inode and
//!   fingerprint, whatever its name now;
//! - a file deleted before it was ever opened (the descriptor cap, or faster than a scan)
//!   cannot be read: counted, never silent.

pub mod path;
pub mod track;

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

use crate::checkpoint::{
    Checkpoint, CheckpointError, Checkpoints, FileKey, Fingerprint, FINGERPRINT_BYTES,
};
use crate::config::Input;
use crate::cri;
use crate::FastMap;
use path::{Container, Location, LogName};
use track::{Phase, Seen, Start, Tracker};

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one file per poll at most, so that a busy file does not starve the others.
pub const READ_QUANTUM: usize = 256 * 1024;
/// How often acknowledged offsets are persisted.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Names a file for an acknowledgement: its identity and its epoch (renewed when the file was
/// truncated, so late acknowledgements of what it held before do not count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileRef {
    /// Device and inode.
    pub key: FileKey,
    /// The epoch the record was read in.
    pub epoch: u64,
}

/// One result of a file: a log entry or a malformed line, with its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The file, to [`ack`](Tailer::ack) the record's checkpoint.
    pub file: FileRef,
    /// The pod and container, from the path.
    pub container: Arc<Container>,
    /// What the CRI reader made of the bytes.
    pub event: cri::Event,
}

impl Record {
    /// The offset to acknowledge once this record and every earlier one of its file are
    /// accepted.
    pub fn checkpoint(&self) -> u64 {
        match &self.event {
            Ok(entry) => entry.checkpoint,
            Err(malformed) => malformed.checkpoint,
        }
    }
}

/// Counters since the tailer started (and two gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes read.
    pub bytes: u64,
    /// Files opened (reopens after an eviction included).
    pub opened: u64,
    /// Files started from a persisted checkpoint.
    pub resumed: u64,
    /// Files whose checkpoint did not fit (inode reused, truncated): started from 0.
    pub checkpoint_mismatch: u64,
    /// Rotations seen (a file renamed to `<n>.log.<ts>`).
    pub rotations: u64,
    /// Rotated files read to their end and closed.
    pub rotated_drained: u64,
    /// Files deleted while open, read to their end and closed.
    pub deleted_drained: u64,
    /// Files that shrank below the read position, read again from 0.
    pub truncations: u64,
    /// Files gone before they were read to their end while not open: what they held past the
    /// read position is lost.
    pub vanished_unread: u64,
    /// Idle files closed to give their descriptor to a waiting one.
    pub evictions: u64,
    /// Entries cut at `input.max_entry_bytes` (the rest follows as the next entry).
    pub split: u64,
    /// Failed reads (the file is closed and opened again later).
    pub read_errors: u64,
    /// Acknowledgements of an unknown file or a past epoch, ignored.
    pub stale_acks: u64,
    /// Lines of the checkpoint file ignored at start (damaged).
    pub checkpoints_ignored: u64,
    /// Gauge: directories under the root (or container directories) at the last scan that are
    /// not of the kubelet's layout, skipped.
    pub malformed_dirs: u64,
}

/// Why a poll failed. The tailer stays usable: the next poll tries again.
#[derive(Debug, Error)]
pub enum TailError {
    /// The log root could not be listed; no file was forgotten because of it.
    #[error("log root {path}: {source}")]
    Root {
        /// The root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The checkpoints could not be loaded or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl TailError {
    /// Bounded metric label: `root` | `checkpoint`.
    pub fn kind(&self) -> &'static str {
        match self {
            TailError::Root { .. } => "root",
            TailError::Checkpoint(_) => "checkpoint",
        }
    }
}

/// A file being read (open, or closed by an eviction with its reader kept).
#[derive(Debug)]
struct Reading {
    file: Option<File>,
    reader: cri::Reader,
    /// The next byte to read.
    pos: u64,
    epoch: u64,
    /// The last read reached the end.
    at_eof: bool,
    /// When bytes last arrived, and whether pending partial lines were flushed since.
    last_data: Instant,
    flushed: bool,
}

/// The tailer of one log root.
#[derive(Debug)]
pub struct Tailer {
    root: PathBuf,
    max_entry_bytes: usize,
    partial_timeout: Duration,
    rescan_interval: Duration,
    max_open_files: usize,
    tracker: Tracker,
    reading: FastMap<FileKey, Reading>,
    store: Checkpoints,
    next_scan: Option<Instant>,
    next_persist: Option<Instant>,
    /// When a poll last persisted the checkpoints.
    persisted: Option<Instant>,
    stats: Stats,
    buf: Vec<u8>,
}

impl Tailer {
    /// A tailer of `input.path`, with the checkpoints of `input.checkpoint_dir` (created if
    /// missing). Nothing is read before the first [`poll`](Tailer::poll).
    pub fn new(input: &Input) -> Result<Tailer, TailError> {
        let (store, loaded) = Checkpoints::open(&input.checkpoint_dir)?;
        if loaded.ignored > 0 {
            warn!(
                ignored = loaded.ignored,
                loaded = loaded.loaded,
                "damaged checkpoint lines ignored; their files are read again from the start"
            );
        }
        Ok(Tailer {
            root: input.path.clone(),
            max_entry_bytes: input.max_entry_bytes,
            partial_timeout: input.partial_timeout,
            rescan_interval: input.rescan_interval,
            max_open_files: input.max_open_files,
            tracker: Tracker::new(),
            reading: FastMap::default(),
            store,
            next_scan: None,
            next_persist: None,
            persisted: None,
            stats: Stats {
                checkpoints_ignored: loaded.ignored as u64,
                ..Stats::default()
            },
            buf: Vec::new(),
        })
    }

    /// One round at `now`: a scan if the rescan interval has passed since the last (or none
    /// was done), files opened up to the cap, up to [`READ_QUANTUM`] read from each open file
    /// into `out`, and the checkpoints persisted if [`CHECKPOINT_INTERVAL`] has passed. What
    /// was read is in `out` even when it returns an error.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Record>) -> Result<(), TailError> {
        self.poll_except(now, out, &|_| false)
    }

    /// [`poll`](Tailer::poll), but the files of containers for which `paused` is true are not
    /// read this round (their readers keep their partial lines, their positions stay): the
    /// caller's queue for them is full, and the files are the buffer. Scans, opens and
    /// checkpoints go on as usual.
    pub fn poll_except(
        &mut self,
        now: Instant,
        out: &mut Vec<Record>,
        paused: &dyn Fn(&Container) -> bool,
    ) -> Result<(), TailError> {
        let mut result = Ok(());
        if self.next_scan.is_none_or(|t| now >= t) {
            self.next_scan = Some(now + self.rescan_interval);
            result = self.scan();
        }
        self.open_waiting(now);
        self.read_files(now, out, paused);
        if self.next_persist.is_none_or(|t| now >= t) {
            self.next_persist = Some(now + CHECKPOINT_INTERVAL);
            self.persist()?;
            self.persisted = Some(now);
        }
        result
    }

    /// Acknowledges that every record of `file` up to `offset` (a [`Record::checkpoint`]) was
    /// accepted: a restart resumes there, once persisted. The caller acknowledges a record only
    /// when every earlier record of the file is accepted too; the offset never moves back, and
    /// an acknowledgement of a file gone or truncated since (another epoch) is ignored, counted.
    pub fn ack(&mut self, file: FileRef, offset: u64) {
        match self.tracker.get(&file.key) {
            Some(t) if t.epoch == file.epoch => self.store.advance(&file.key, offset),
            _ => self.stats.stale_acks += 1,
        }
    }

    /// Writes the checkpoints now if they changed (also done by [`poll`](Tailer::poll) every
    /// [`CHECKPOINT_INTERVAL`]; call it at shutdown).
    pub fn persist(&mut self) -> Result<(), TailError> {
        for (key, t) in self.tracker.iter() {
            let Some(c) = self.store.get(key) else {
                continue;
            };
            if c.path != t.path {
                let mut c = c.clone();
                c.path.clone_from(&t.path);
                self.store.set(*key, c);
            }
        }
        Ok(self.store.persist()?)
    }

    /// When a poll last persisted the checkpoints (written or unchanged), if ever.
    pub fn persisted(&self) -> Option<Instant> {
        self.persisted
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Files held open now.
    pub fn open_files(&self) -> usize {
        self.tracker.open_count()
    }

    /// Files known (open, waiting for a descriptor, or drained and not yet deleted).
    pub fn files(&self) -> usize {
        self.tracker.len()
    }

    /// The persisted-or-pending checkpoint of a file.
    pub fn checkpoint(&self, key: &FileKey) -> Option<&Checkpoint> {
        self.store.get(key)
    }

    /// Lists the root and tells the tracker what is there.
    fn scan(&mut self) -> Result<(), TailError> {
        let mut seen = Vec::new();
        let mut malformed = 0;
        let root = std::fs::read_dir(&self.root).map_err(|source| TailError::Root {
            path: self.root.clone(),
            source,
        })?;
        for pod_dir in root.flatten() {
            let name = pod_dir.file_name();
            let parsed = name.to_str().and_then(path::parse_pod_dir);
            let is_dir = pod_dir.file_type().is_ok_and(|t| t.is_dir());
            let (Some((namespace, pod, uid)), true) = (parsed, is_dir) else {
                malformed += 1;
                continue;
            };
            let Ok(containers) = std::fs::read_dir(pod_dir.path()) else {
                continue;
            };
            for container_dir in containers.flatten() {
                let name = container_dir.file_name();
                let container = match name.to_str() {
                    Some(c) if path::valid_container_dir(c) => c,
                    _ => {
                        malformed += 1;
                        continue;
                    }
                };
                if !container_dir.file_type().is_ok_and(|t| t.is_dir()) {
                    malformed += 1;
                    continue;
                }
                let container = Arc::new(Container {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    uid: uid.to_owned(),
                    container: container.to_owned(),
                });
                scan_container(&container_dir.path(), &container, &mut seen);
            }
        }
        self.stats.malformed_dirs = malformed;
        let observed = self.tracker.observe(seen);
        self.stats.rotations += observed.rotated.len() as u64;
        for (key, finished) in observed.removed {
            self.reading.remove(&key);
            if !finished {
                self.stats.vanished_unread += 1;
                warn!(
                    dev = key.dev,
                    ino = key.ino,
                    "log file deleted before it was read to its end"
                );
            }
        }
        let tracker = &self.tracker;
        self.store.retain(|key| tracker.get(key).is_some());
        Ok(())
    }

    /// Opens waiting files up to the cap, closing idle live files if others wait.
    fn open_waiting(&mut self, now: Instant) {
        let waiting = self.tracker.to_open();
        if waiting.is_empty() {
            return;
        }
        let mut free = self
            .max_open_files
            .saturating_sub(self.tracker.open_count());
        if free < waiting.len() {
            let idle: Vec<FileKey> = self
                .reading
                .iter()
                .filter(|(key, r)| {
                    r.file.is_some()
                        && r.at_eof
                        && self
                            .tracker
                            .get(key)
                            .is_some_and(|t| t.phase == Phase::Live)
                })
                .map(|(key, _)| *key)
                .collect();
            for key in idle.into_iter().take(waiting.len() - free) {
                if let Some(r) = self.reading.get_mut(&key) {
                    r.file = None;
                }
                self.tracker.evicted(&key);
                self.stats.evictions += 1;
                free += 1;
            }
        }
        for key in waiting.into_iter().take(free) {
            let Some(t) = self.tracker.get(&key) else {
                continue;
            };
            let (path, epoch) = (t.path.clone(), t.epoch);
            let (file, metadata) = match File::open(&path).and_then(|f| {
                let m = f.metadata()?;
                Ok((f, m))
            }) {
                Ok(opened) => opened,
                Err(error) => {
                    debug!(%error, path = %path.display(), "log file not opened");
                    continue;
                }
            };
            if FileKey::of(&metadata) != key {
                // The name holds another file now; the next scan finds ours.
                continue;
            }
            if let Some(r) = self.reading.get_mut(&key) {
                r.file = Some(file);
                r.at_eof = false;
            } else {
                let checkpoint = self.store.get(&key);
                let prefix = checkpoint.map_or(FINGERPRINT_BYTES, |c| c.fingerprint.len as usize);
                let fingerprint = Fingerprint::read(&file, prefix).ok();
                let start = track::start(checkpoint, fingerprint, metadata.len());
                match start {
                    Start::Fresh => {}
                    Start::Resumed(_) => self.stats.resumed += 1,
                    Start::Truncated | Start::Reused => {
                        self.stats.checkpoint_mismatch += 1;
                        debug!(path = %path.display(), ?start, "checkpoint does not fit the file");
                    }
                }
                let offset = start.offset();
                let fingerprint = match fingerprint {
                    Some(f) if prefix == FINGERPRINT_BYTES => f,
                    _ => {
                        Fingerprint::read(&file, FINGERPRINT_BYTES).unwrap_or(Fingerprint::of(b""))
                    }
                };
                self.store.set(
                    key,
                    Checkpoint {
                        fingerprint,
                        path: path.clone(),
                        offset,
                    },
                );
                self.reading.insert(
                    key,
                    Reading {
                        file: Some(file),
                        reader: cri::Reader::new(offset, self.max_entry_bytes),
                        pos: offset,
                        epoch,
                        at_eof: false,
                        last_data: now,
                        flushed: true,
                    },
                );
            }
            self.tracker.set_open(&key, true);
            self.stats.opened += 1;
        }
    }

    /// Reads a quantum of every open file; finishes the files that ended.
    fn read_files(
        &mut self,
        now: Instant,
        out: &mut Vec<Record>,
        paused: &dyn Fn(&Container) -> bool,
    ) {
        let tracker = &self.tracker;
        let is_paused = |key: &FileKey| {
            tracker
                .get(key)
                .is_some_and(|t| paused(&t.location.container))
        };
        let keys: Vec<FileKey> = self
            .reading
            .iter()
            .filter(|(k, r)| r.file.is_some() && !is_paused(k))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.read_file(key, now, out);
        }
        for (key, r) in &mut self.reading {
            if !r.flushed && now.saturating_duration_since(r.last_data) >= self.partial_timeout {
                let Some(t) = self.tracker.get(key) else {
                    continue;
                };
                if paused(&t.location.container) {
                    continue;
                }
                r.flushed = true;
                r.reader.flush_partials();
                self.stats.split += drain(&mut r.reader, *key, r.epoch, &t.location.container, out);
            }
        }
    }

    fn read_file(&mut self, key: FileKey, now: Instant, out: &mut Vec<Record>) {
        let Some(container) = self.tracker.get(&key).map(|t| t.location.container.clone()) else {
            self.reading.remove(&key);
            return;
        };
        let Some(r) = self.reading.get_mut(&key) else {
            return;
        };
        let Some(file) = r.file.as_ref() else {
            return;
        };
        let mut budget = READ_QUANTUM;
        r.at_eof = false;
        while budget > 0 {
            let want = budget.min(READ_CHUNK);
            self.buf.resize(want, 0);
            match file.read_at(&mut self.buf[..want], r.pos) {
                Ok(n) => {
                    if n > 0 {
                        r.pos += n as u64;
                        budget -= n;
                        self.stats.bytes += n as u64;
                        r.last_data = now;
                        r.flushed = false;
                        r.reader.push(&self.buf[..n]);
                        self.stats.split += drain(&mut r.reader, key, r.epoch, &container, out);
                    }
                    if n < want {
                        r.at_eof = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    warn!(%error, dev = key.dev, ino = key.ino, "log file read failed; reopened later");
                    self.stats.read_errors += 1;
                    r.file = None;
                    self.tracker.set_open(&key, false);
                    return;
                }
            }
        }
        // A file opened shorter than a fingerprint gets the full one once it has the bytes.
        if let Some(c) = self.store.get(&key) {
            if u64::from(c.fingerprint.len) < r.pos.min(FINGERPRINT_BYTES as u64) {
                if let Ok(fingerprint) = Fingerprint::read(file, FINGERPRINT_BYTES) {
                    let c = Checkpoint {
                        fingerprint,
                        ..c.clone()
                    };
                    self.store.set(key, c);
                }
            }
        }
        if !r.at_eof {
            return;
        }
        let Ok(metadata) = file.metadata() else {
            return;
        };
        if metadata.len() < r.pos {
            // Truncated in place: everything from 0 is new, earlier acknowledgements stale.
            self.stats.truncations += 1;
            r.epoch = self.tracker.restart(&key);
            r.reader = cri::Reader::new(0, self.max_entry_bytes);
            r.pos = 0;
            r.at_eof = false;
            let fingerprint =
                Fingerprint::read(file, FINGERPRINT_BYTES).unwrap_or(Fingerprint::of(b""));
            if let Some(t) = self.tracker.get(&key) {
                self.store.set(
                    key,
                    Checkpoint {
                        fingerprint,
                        path: t.path.clone(),
                        offset: 0,
                    },
                );
            }
            debug!(
                dev = key.dev,
                ino = key.ino,
                "log file truncated; read again from 0"
            );
            return;
        }
        let deleted = metadata.nlink() == 0;
        if deleted || self.tracker.at_end(&key) {
            r.reader.finish();
            self.stats.split += drain(&mut r.reader, key, r.epoch, &container, out);
            self.reading.remove(&key);
            if deleted {
                self.stats.deleted_drained += 1;
                self.tracker.remove(&key);
                self.store.retain(|k| *k != key);
            } else {
                self.stats.rotated_drained += 1;
            }
        }
    }
}

/// Hands out what the reader has; returns how many of its entries were split
/// ([`cri::End::Split`]).
fn drain(
    reader: &mut cri::Reader,
    key: FileKey,
    epoch: u64,
    container: &Arc<Container>,
    out: &mut Vec<Record>,
) -> u64 {
    let mut split = 0;
    for event in reader.by_ref() {
        if matches!(&event, Ok(e) if e.end == cri::End::Split) {
            split += 1;
        }
        out.push(Record {
            file: FileRef { key, epoch },
            container: container.clone(),
            event,
        });
    }
    split
}

/// Adds the log files of one container directory to `seen`.
fn scan_container(dir: &Path, container: &Arc<Container>, seen: &mut Vec<Seen>) {
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    for file in files.flatten() {
        let name = file.file_name();
        let Some(name) = name.to_str().and_then(LogName::parse) else {
            continue;
        };
        // Not followed: the kubelet writes regular files; a link could point anywhere.
        let Ok(metadata) = file.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        seen.push(Seen {
            key: FileKey::of(&metadata),
            path: file.path(),
            location: Location {
                container: container.clone(),
                name,
            },
        });
    }
}
