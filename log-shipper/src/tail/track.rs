//! The tailer's decisions, without IO: which files exist and in what phase (written, rotated,
//! drained), which to open next under the descriptor cap, when a rotated file is done, and
//! where a file starts reading. The tailer feeds it what it observed (a directory scan, an end
//! of file) and does what it answers; the tests here drive it through rotations, restarts and
//! inode reuse without a file or a clock.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::path::{Location, LogName};
use crate::checkpoint::{Checkpoint, FileKey, Fingerprint};

/// A file missing from this many scans in a row, while not open, is forgotten. One is not
/// enough: readdir(3) may miss a file renamed while the directory is read, which is exactly
/// what the kubelet does.
pub const MISSING_SCANS: u32 = 2;

/// Where a file is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At its live name, `<n>.log`: the runtime writes to it.
    Live,
    /// Renamed by the rotation. `successor`: a scan saw a new file at the live name, so the
    /// runtime has reopened and writes no more here; the next end of file is the last.
    Rotated {
        /// A new file is at the live name.
        successor: bool,
    },
    /// Read to its end after its rotation; kept (closed) until it vanishes, so that it is not
    /// taken for a new file.
    Done,
}

/// One file the tracker knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// Its path at the last scan.
    pub path: PathBuf,
    /// Its container and name.
    pub location: Location,
    /// Its phase.
    pub phase: Phase,
    /// Unique to this file in this process, and renewed when it starts over (truncated):
    /// acknowledgements of another epoch are stale.
    pub epoch: u64,
    /// Held open by the tailer.
    pub open: bool,
    /// Place in the queue for a descriptor (smaller first).
    queue: u64,
    /// Scans in a row that did not see it.
    missing: u32,
}

/// A file a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its identity.
    pub key: FileKey,
    /// Its path.
    pub path: PathBuf,
    /// Its container and name.
    pub location: Location,
}

/// What a scan changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Files seen for the first time.
    pub new: Vec<FileKey>,
    /// Files renamed by a rotation since the last scan.
    pub rotated: Vec<FileKey>,
    /// Files forgotten: gone from the directory while closed. `true`: it had been read to its
    /// end (a drained rotated file, the normal case); `false`: it vanished before, and what
    /// was not read of it is lost.
    pub removed: Vec<(FileKey, bool)>,
}

/// Every file the tailer knows, by identity.
#[derive(Debug, Default)]
pub struct Tracker {
    files: BTreeMap<FileKey, Tracked>,
    next_queue: u64,
    next_epoch: u64,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Takes in a complete scan of the log root.
    pub fn observe(&mut self, seen: Vec<Seen>) -> Observed {
        let mut out = Observed::default();
        let mut present: BTreeMap<FileKey, Seen> = BTreeMap::new();
        for s in seen {
            present.insert(s.key, s);
        }
        // Forget files missing too long (closed ones only: an open one is drained first, and
        // the tailer tells from the descriptor whether it was deleted).
        let mut gone = Vec::new();
        for (key, t) in &mut self.files {
            match present.get(key) {
                Some(s) if t.location.same_log(&s.location) => t.missing = 0,
                // The inode went to an unrelated file: ours was deleted while closed.
                Some(_) if !t.open => gone.push(*key),
                Some(_) => {}
                None => {
                    t.missing += 1;
                    if !t.open && t.missing >= MISSING_SCANS {
                        gone.push(*key);
                    }
                }
            }
        }
        for key in gone {
            if let Some(t) = self.files.remove(&key) {
                out.removed.push((key, t.phase == Phase::Done));
            }
        }
        for (key, s) in &present {
            match self.files.get_mut(key) {
                Some(t) => {
                    if !t.location.same_log(&s.location) {
                        continue;
                    }
                    match (t.phase, s.location.name) {
                        (Phase::Live, LogName::Rotated(_)) => {
                            t.phase = Phase::Rotated { successor: false };
                            out.rotated.push(*key);
                        }
                        // The kubelet undoes a rename when the runtime could not reopen.
                        (Phase::Rotated { .. }, LogName::Live(_)) => t.phase = Phase::Live,
                        _ => {}
                    }
                    t.path.clone_from(&s.path);
                    t.location = s.location.clone();
                }
                None => {
                    let phase = match s.location.name {
                        LogName::Live(_) => Phase::Live,
                        LogName::Rotated(_) => Phase::Rotated { successor: false },
                    };
                    self.next_queue += 1;
                    self.next_epoch += 1;
                    self.files.insert(
                        *key,
                        Tracked {
                            path: s.path.clone(),
                            location: s.location.clone(),
                            phase,
                            epoch: self.next_epoch,
                            open: false,
                            queue: self.next_queue,
                            missing: 0,
                        },
                    );
                    out.new.push(*key);
                }
            }
        }
        // A rotated file whose live name now holds another file has its successor.
        let live: Vec<(FileKey, Location)> = present
            .values()
            .filter(|s| matches!(s.location.name, LogName::Live(_)))
            .map(|s| (s.key, s.location.clone()))
            .collect();
        for (key, t) in &mut self.files {
            if let Phase::Rotated { successor: false } = t.phase {
                if live
                    .iter()
                    .any(|(k, l)| k != key && l.same_log(&t.location))
                {
                    t.phase = Phase::Rotated { successor: true };
                }
            }
        }
        out
    }

    /// A file.
    pub fn get(&self, key: &FileKey) -> Option<&Tracked> {
        self.files.get(key)
    }

    /// Every file.
    pub fn iter(&self) -> impl Iterator<Item = (&FileKey, &Tracked)> {
        self.files.iter()
    }

    /// Number of files known.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Knows no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Number of files held open.
    pub fn open_count(&self) -> usize {
        self.files.values().filter(|t| t.open).count()
    }

    /// Files to open, most urgent first: rotated ones (the next rotation deletes them), then
    /// in the order they waited.
    pub fn to_open(&self) -> Vec<FileKey> {
        let mut keys: Vec<(bool, u64, FileKey)> = self
            .files
            .iter()
            .filter(|(_, t)| !t.open && t.phase != Phase::Done)
            .map(|(k, t)| (t.phase == Phase::Live, t.queue, *k))
            .collect();
        keys.sort_unstable();
        keys.into_iter().map(|(_, _, k)| k).collect()
    }

    /// The tailer opened (`true`) or closed (`false`) the file.
    pub fn set_open(&mut self, key: &FileKey, open: bool) {
        if let Some(t) = self.files.get_mut(key) {
            t.open = open;
        }
    }

    /// The tailer closed an idle live file to give its descriptor to a waiting one; it queues
    /// again behind the others.
    pub fn evicted(&mut self, key: &FileKey) {
        self.next_queue += 1;
        if let Some(t) = self.files.get_mut(key) {
            t.open = false;
            t.queue = self.next_queue;
        }
    }

    /// The tailer read the file to its current end. `true`: that is its last end (rotated,
    /// and the runtime writes to its successor), the tailer finishes and closes it.
    pub fn at_end(&mut self, key: &FileKey) -> bool {
        match self.files.get_mut(key) {
            Some(t) if t.phase == (Phase::Rotated { successor: true }) => {
                t.phase = Phase::Done;
                t.open = false;
                true
            }
            _ => false,
        }
    }

    /// The file was deleted and drained: forgotten.
    pub fn remove(&mut self, key: &FileKey) -> Option<Tracked> {
        self.files.remove(key)
    }

    /// The file starts over (truncated); returns its new epoch.
    pub fn restart(&mut self, key: &FileKey) -> u64 {
        self.next_epoch += 1;
        if let Some(t) = self.files.get_mut(key) {
            t.epoch = self.next_epoch;
        }
        self.next_epoch
    }
}

/// Where a file starts reading when it is opened, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// No checkpoint: from the start.
    Fresh,
    /// From its checkpoint.
    Resumed(u64),
    /// The checkpoint is past the file's end (truncated meanwhile): from the start.
    Truncated,
    /// The inode holds another file than the checkpoint's (fingerprints differ): from the start.
    Reused,
}

impl Start {
    /// The offset to read from.
    pub fn offset(self) -> u64 {
        match self {
            Start::Resumed(offset) => offset,
            Start::Fresh | Start::Truncated | Start::Reused => 0,
        }
    }
}

/// Decides where a file starts: its checkpoint, if the file's first bytes (`fingerprint`, of
/// as many bytes as the checkpoint's fingerprint covers) are those the checkpoint was taken of
/// and the file is not shorter than the checkpoint's offset.
pub fn start(
    checkpoint: Option<&Checkpoint>,
    fingerprint: Option<Fingerprint>,
    size: u64,
) -> Start {
    match checkpoint {
        None => Start::Fresh,
        Some(c) if fingerprint != Some(c.fingerprint) => Start::Reused,
        Some(c) if size < c.offset => Start::Truncated,
        Some(c) => Start::Resumed(c.offset),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::super::path::Container;
    use super::*;

    fn container(name: &str) -> Arc<Container> {
        Arc::new(Container {
            namespace: "ns".into(),
            pod: "pod".into(),
            uid: "uid".into(),
            container: name.into(),
        })
    }

    fn seen(ino: u64, c: &Arc<Container>, name: &str) -> Seen {
        Seen {
            key: FileKey { dev: 1, ino },
            path: PathBuf::from(format!("/r/ns_pod_uid/{}/{name}", c.container)),
            location: Location {
                container: c.clone(),
                name: LogName::parse(name).unwrap(),
            },
        }
    }

    fn key(ino: u64) -> FileKey {
        FileKey { dev: 1, ino }
    }

    #[test]
    fn rotation_is_followed_to_the_end_then_forgotten() {
        let c = container("app");
        let mut t = Tracker::new();
        let o = t.observe(vec![seen(10, &c, "0.log")]);
        assert_eq!(o.new, vec![key(10)]);
        assert_eq!(t.to_open(), vec![key(10)]);
        t.set_open(&key(10), true);
        assert!(!t.at_end(&key(10)), "a live file never ends");

        // Renamed; the runtime has not reopened yet: the end is not the last.
        let o = t.observe(vec![seen(10, &c, "0.log.20261206-075000")]);
        assert_eq!(o.rotated, vec![key(10)]);
        assert_eq!(
            t.get(&key(10)).unwrap().phase,
            Phase::Rotated { successor: false }
        );
        assert!(!t.at_end(&key(10)));

        // The new 0.log appears: the next end of the old file is its last.
        let o = t.observe(vec![
            seen(10, &c, "0.log.20261206-075000"),
            seen(11, &c, "0.log"),
        ]);
        assert_eq!(o.new, vec![key(11)]);
        assert!(t.at_end(&key(10)));
        assert_eq!(t.get(&key(10)).unwrap().phase, Phase::Done);
        assert!(!t.get(&key(10)).unwrap().open);
        assert_eq!(t.to_open(), vec![key(11)], "a done file is not reopened");

        // Compressed and deleted by the next rotation: forgotten after two scans, not lost.
        let o = t.observe(vec![seen(11, &c, "0.log")]);
        assert!(o.removed.is_empty(), "one missed scan is not enough");
        let o = t.observe(vec![seen(11, &c, "0.log")]);
        assert_eq!(o.removed, vec![(key(10), true)]);
    }

    #[test]
    fn a_file_missed_by_one_scan_is_kept() {
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &c, "0.log")]);
        t.observe(vec![]);
        let o = t.observe(vec![seen(10, &c, "0.log.20261206-075000")]);
        assert!(o.new.is_empty() && o.removed.is_empty());
        assert_eq!(o.rotated, vec![key(10)]);
    }

    #[test]
    fn open_files_are_never_forgotten_by_a_scan() {
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &c, "0.log")]);
        t.set_open(&key(10), true);
        for _ in 0..5 {
            assert!(t.observe(vec![]).removed.is_empty());
        }
        // The tailer saw it unlinked and drained it.
        assert!(t.remove(&key(10)).is_some());
        assert!(t.is_empty());
    }

    #[test]
    fn closed_file_deleted_unread_is_reported_lost() {
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &c, "0.log")]);
        t.observe(vec![]);
        assert_eq!(t.observe(vec![]).removed, vec![(key(10), false)]);
    }

    #[test]
    fn inode_reused_by_another_container_is_a_new_file() {
        let (a, b) = (container("a"), container("b"));
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &a, "0.log")]);
        let o = t.observe(vec![seen(10, &b, "0.log")]);
        assert_eq!(o.removed, vec![(key(10), false)]);
        assert_eq!(o.new, vec![key(10)]);
        assert_eq!(t.get(&key(10)).unwrap().location.container, b);
        assert_eq!(
            t.get(&key(10)).unwrap().epoch,
            2,
            "stale acknowledgements do not match"
        );
    }

    #[test]
    fn rotated_files_open_first_and_evicted_ones_queue_last() {
        let (a, b, c) = (container("a"), container("b"), container("c"));
        let mut t = Tracker::new();
        t.observe(vec![seen(1, &a, "0.log"), seen(2, &b, "0.log")]);
        t.observe(vec![
            seen(1, &a, "0.log"),
            seen(2, &b, "0.log"),
            seen(3, &c, "0.log.20261206-075000"),
            seen(4, &c, "0.log"),
        ]);
        assert_eq!(t.to_open(), vec![key(3), key(1), key(2), key(4)]);
        t.set_open(&key(3), true);
        t.set_open(&key(1), true);
        assert_eq!(t.open_count(), 2);
        t.evicted(&key(1));
        assert_eq!(t.to_open(), vec![key(2), key(4), key(1)]);
    }

    #[test]
    fn undone_rename_goes_back_to_live() {
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &c, "0.log")]);
        t.observe(vec![seen(10, &c, "0.log.20261206-075000")]);
        t.observe(vec![seen(10, &c, "0.log")]);
        assert_eq!(t.get(&key(10)).unwrap().phase, Phase::Live);
    }

    #[test]
    fn restart_after_rotation_resumes_the_renamed_file() {
        // The agent was down while 0.log (ino 10) was rotated: a fresh tracker finds it at its
        // rotated name beside its successor, and the checkpoint (by key) places it.
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![
            seen(10, &c, "0.log.20261206-075000"),
            seen(11, &c, "0.log"),
        ]);
        assert_eq!(
            t.get(&key(10)).unwrap().phase,
            Phase::Rotated { successor: true }
        );
        assert_eq!(t.to_open(), vec![key(10), key(11)]);
        let fp = Fingerprint::of(b"2026-12-06T07:50:00Z stdout F first\n");
        let checkpoint = Checkpoint {
            fingerprint: fp,
            path: PathBuf::from("/r/ns_pod_uid/app/0.log"),
            offset: 500,
        };
        assert_eq!(start(Some(&checkpoint), Some(fp), 800), Start::Resumed(500));
        assert_eq!(start(Some(&checkpoint), Some(fp), 500), Start::Resumed(500));
        assert_eq!(start(Some(&checkpoint), Some(fp), 499), Start::Truncated);
        let other = Fingerprint::of(b"2026-12-06T08:00:00Z stdout F other\n");
        assert_eq!(start(Some(&checkpoint), Some(other), 800), Start::Reused);
        assert_eq!(start(Some(&checkpoint), None, 800), Start::Reused);
        assert_eq!(start(None, Some(fp), 800), Start::Fresh);
        assert_eq!(Start::Truncated.offset(), 0);
    }

    #[test]
    fn truncation_bumps_the_epoch() {
        let c = container("app");
        let mut t = Tracker::new();
        t.observe(vec![seen(10, &c, "0.log"), seen(11, &c, "1.log")]);
        let (e10, e11) = (
            t.get(&key(10)).unwrap().epoch,
            t.get(&key(11)).unwrap().epoch,
        );
        assert_ne!(e10, e11);
        let renewed = t.restart(&key(10));
        assert!(renewed != e10 && renewed != e11);
        assert_eq!(t.get(&key(10)).unwrap().epoch, renewed);
    }
}
