//! The checkpoint store: per log file, where a restart resumes. A file is known by its
//! [`FileKey`] (device and inode, which survive kubelet's rename) and a [`Fingerprint`] of its
//! first bytes (which tells a reused inode from the file that had it); the store keeps the path
//! it was last seen at and the acknowledged offset, the position up to which every entry was
//! accepted by a store. It is separate from the tailer so that its one promise is easy to
//! check: what it loads is what was persisted last, or less, never more.
//!
//! The file `checkpoints` in `input.checkpoint_dir` is text, one header line and then one line
//! per file, each ending in its own checksum:
//!
//! ```text
//! log-shipper checkpoints v1
//! <dev>\t<ino>\t<fingerprint length>\t<fingerprint hash, hex>\t<offset>\t<path, escaped>\t<checksum, hex>
//! ```
//!
//! It is replaced whole, crash-safely: written to `checkpoints.tmp`, fsynced, renamed over the
//! old one, and the directory fsynced, so a crash leaves either the old or the new file. A line
//! that does not parse or whose checksum is wrong (a damaged disk, a hand edit) is ignored and
//! counted: its file is then read again from its start, which repeats lines but loses none.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The store's file name in the checkpoint directory.
pub const FILE_NAME: &str = "checkpoints";
/// The temporary file a new version is written to before the rename.
pub const TMP_FILE_NAME: &str = "checkpoints.tmp";
/// The first line of the file.
const HEADER: &str = "log-shipper checkpoints v1";
/// What every header of this format starts with; another version is refused, not ignored.
const HEADER_PREFIX: &str = "log-shipper checkpoints v";
/// At most this many first bytes of a file form its fingerprint.
pub const FINGERPRINT_BYTES: usize = 1024;

/// A file's identity on this node while it exists: device and inode. Kubelet's rotation renames
/// a file, which keeps both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileKey {
    /// The key of the file `metadata` describes.
    pub fn of(metadata: &std::fs::Metadata) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        FileKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// A hash of a file's first `len` bytes (`len` at most [`FINGERPRINT_BYTES`]; shorter while
/// the file is). A file whose first `len` bytes hash differently is not the one a checkpoint
/// was taken of, whatever its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    /// How many first bytes were hashed.
    pub len: u32,
    /// Their FNV-1a hash.
    pub hash: u64,
}

impl Fingerprint {
    /// The fingerprint of `prefix` (the file's first bytes, at most [`FINGERPRINT_BYTES`] are
    /// used).
    pub fn of(prefix: &[u8]) -> Fingerprint {
        let prefix = &prefix[..prefix.len().min(FINGERPRINT_BYTES)];
        Fingerprint {
            len: prefix.len() as u32,
            hash: fnv1a(prefix),
        }
    }

    /// Reads the first `len` bytes of `file` (fewer if it is shorter) and fingerprints them.
    pub fn read(file: &File, len: usize) -> io::Result<Fingerprint> {
        let mut buf = vec![0; len.min(FINGERPRINT_BYTES)];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Fingerprint::of(&buf[..got]))
    }
}

/// 64-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What is kept per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The file's first bytes, to tell a reused inode.
    pub fingerprint: Fingerprint,
    /// Where it was last seen (informational; the file is found again by its key).
    pub path: PathBuf,
    /// Every entry before this offset was acknowledged: a restart resumes here.
    pub offset: u64,
}

/// Why the store could not be loaded or written.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The directory or a file in it could not be created, read, written, synced or renamed.
    #[error("checkpoint store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is of another format version (a newer agent wrote it); it is left alone
    /// rather than forgotten, which would ship every file again.
    #[error("checkpoint file {path}: unsupported format `{header}` (this agent reads `{HEADER}`)")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its first line.
        header: String,
    },
}

impl CheckpointError {
    /// Bounded metric label: `io` | `version`.
    pub fn kind(&self) -> &'static str {
        match self {
            CheckpointError::Io { .. } => "io",
            CheckpointError::Version { .. } => "version",
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The checkpoints of every file, in memory, persisted with [`Checkpoints::persist`].
#[derive(Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    entries: HashMap<FileKey, Checkpoint>,
    /// Changed since the last persist.
    dirty: bool,
}

/// What [`Checkpoints::open`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Checkpoints loaded.
    pub loaded: usize,
    /// Lines ignored: unparsable, a wrong checksum, or a header that is not ours (a torn or
    /// damaged file). Their files are read again from the start.
    pub ignored: usize,
}

impl Checkpoints {
    /// Creates `dir` if needed and loads its checkpoint file (none: empty). A leftover
    /// temporary file of a crash during [`persist`](Checkpoints::persist) is ignored.
    pub fn open(dir: &Path) -> Result<(Checkpoints, LoadStats), CheckpointError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let path = dir.join(FILE_NAME);
        let (entries, stats) = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|header| CheckpointError::Version {
                path: path.clone(),
                header,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(io_error(&path)(e)),
        };
        Ok((
            Checkpoints {
                dir: dir.to_path_buf(),
                entries,
                dirty: false,
            },
            stats,
        ))
    }

    /// The checkpoint of a file.
    pub fn get(&self, key: &FileKey) -> Option<&Checkpoint> {
        self.entries.get(key)
    }

    /// Sets a file's checkpoint (a file seen for the first time, a new path, a truncation).
    pub fn set(&mut self, key: FileKey, checkpoint: Checkpoint) {
        if self.entries.get(&key) != Some(&checkpoint) {
            self.entries.insert(key, checkpoint);
            self.dirty = true;
        }
    }

    /// Advances a file's acknowledged offset; never moves it back, and does nothing for a file
    /// without a checkpoint (it is gone).
    pub fn advance(&mut self, key: &FileKey, offset: u64) {
        if let Some(c) = self.entries.get_mut(key) {
            if offset > c.offset {
                c.offset = offset;
                self.dirty = true;
            }
        }
    }

    /// Keeps only the files `keep` says still exist.
    pub fn retain(&mut self, mut keep: impl FnMut(&FileKey) -> bool) {
        let before = self.entries.len();
        self.entries.retain(|k, _| keep(k));
        self.dirty |= self.entries.len() != before;
    }

    /// Number of files with a checkpoint.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No checkpoint at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether there are changes not persisted yet.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the checkpoints if they changed: temporary file, fsync, rename, fsync of the
    /// directory. On error the old file stays and the changes stay pending.
    pub fn persist(&mut self) -> Result<(), CheckpointError> {
        if !self.dirty {
            return Ok(());
        }
        let tmp = self.dir.join(TMP_FILE_NAME);
        let path = self.dir.join(FILE_NAME);
        let bytes = encode(&self.entries);
        let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(&bytes).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        self.dirty = false;
        Ok(())
    }
}

/// The file's bytes for `entries`, in key order (so equal stores write equal files).
fn encode(entries: &HashMap<FileKey, Checkpoint>) -> Vec<u8> {
    let mut keys: Vec<&FileKey> = entries.keys().collect();
    keys.sort_unstable();
    let mut out = Vec::with_capacity(64 + entries.len() * 128);
    out.extend_from_slice(HEADER.as_bytes());
    out.push(b'\n');
    for key in keys {
        let c = &entries[key];
        let start = out.len();
        out.extend_from_slice(
            format!(
                "{}\t{}\t{}\t{:016x}\t{}\t",
                key.dev, key.ino, c.fingerprint.len, c.fingerprint.hash, c.offset
            )
            .as_bytes(),
        );
        escape(c.path.as_os_str(), &mut out);
        let sum = fnv1a(&out[start..]);
        out.extend_from_slice(format!("\t{sum:016x}\n").as_bytes());
    }
    out
}

/// Parses a checkpoint file. Bad lines are skipped and counted; a later line for the same key
/// wins. `Err(header)`: the file is another version of the format.
fn decode(bytes: &[u8]) -> Result<(HashMap<FileKey, Checkpoint>, LoadStats), String> {
    let mut stats = LoadStats::default();
    let mut entries = HashMap::new();
    let mut lines = bytes.split(|&b| b == b'\n');
    let header = lines.next().unwrap_or_default();
    if header != HEADER.as_bytes() {
        let text = String::from_utf8_lossy(header);
        // Only a whole first line names a version: a torn one is just damage.
        if text.starts_with(HEADER_PREFIX) && bytes.len() > header.len() {
            return Err(text.into_owned());
        }
        if !header.is_empty() {
            stats.ignored += 1;
        }
    }
    for line in lines {
        if line.is_empty() {
            continue;
        }
        match decode_line(line) {
            Some((key, c)) => {
                entries.insert(key, c);
            }
            None => stats.ignored += 1,
        }
    }
    stats.loaded = entries.len();
    Ok((entries, stats))
}

fn decode_line(line: &[u8]) -> Option<(FileKey, Checkpoint)> {
    let split = line.iter().rposition(|&b| b == b'\t')?;
    let (body, sum) = (&line[..split], &line[split + 1..]);
    if sum.len() != 16
        || u64::from_str_radix(std::str::from_utf8(sum).ok()?, 16).ok()? != fnv1a(body)
    {
        return None;
    }
    let mut fields = body.splitn(6, |&b| b == b'\t');
    let mut number = |radix: u32| -> Option<u64> {
        let f = std::str::from_utf8(fields.next()?).ok()?;
        u64::from_str_radix(f, radix).ok()
    };
    let dev = number(10)?;
    let ino = number(10)?;
    let len = u32::try_from(number(10)?).ok()?;
    let hash = number(16)?;
    let offset = number(10)?;
    if len as usize > FINGERPRINT_BYTES {
        return None;
    }
    let path = PathBuf::from(std::ffi::OsString::from_vec(unescape(fields.next()?)?));
    Some((
        FileKey { dev, ino },
        Checkpoint {
            fingerprint: Fingerprint { len, hash },
            path,
            offset,
        },
    ))
}

/// Path bytes with `\`, tab, newline and every byte outside printable ASCII as `\xHH`.
fn escape(path: &OsStr, out: &mut Vec<u8>) {
    for &b in path.as_bytes() {
        if b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
}

fn unescape(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\' {
            let hex = std::str::from_utf8(text.get(i + 1..i + 4)?).ok()?;
            out.push(u8::from_str_radix(hex.strip_prefix('x')?, 16).ok()?);
            i += 4;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "log-shipper-checkpoint-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn sample(n: u64) -> (FileKey, Checkpoint) {
        (
            FileKey { dev: 2049, ino: n },
            Checkpoint {
                fingerprint: Fingerprint::of(format!("first line {n}\n").as_bytes()),
                path: PathBuf::from(format!(
                    "/var/log/pods/ns_pod-{n}_uid/c/0.log.20261206-0750{n:02}"
                )),
                offset: n * 1000,
            },
        )
    }

    #[test]
    fn persist_and_load_round_trip() {
        let dir = tmpdir("round-trip");
        let (mut store, stats) = Checkpoints::open(&dir).unwrap();
        assert_eq!((store.len(), stats), (0, LoadStats::default()));
        for n in 0..5 {
            let (k, c) = sample(n);
            store.set(k, c);
        }
        // An odd path survives: tab, newline, backslash, non-UTF-8.
        let odd = PathBuf::from(std::ffi::OsString::from_vec(b"/a\tb\nc\\d\xff".to_vec()));
        let (k, mut c) = sample(9);
        c.path = odd.clone();
        store.set(k, c);
        store.advance(&sample(1).0, 5);
        store.advance(&sample(1).0, 2);
        store.advance(&FileKey { dev: 1, ino: 1 }, 7);
        assert!(store.is_dirty());
        store.persist().unwrap();
        assert!(!store.is_dirty());
        assert!(!dir.join(TMP_FILE_NAME).exists());

        let (loaded, stats) = Checkpoints::open(&dir).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                loaded: 6,
                ignored: 0
            }
        );
        assert_eq!(loaded.entries, store.entries);
        assert_eq!(loaded.get(&sample(1).0).unwrap().offset, 1000);
        assert_eq!(loaded.get(&sample(9).0).unwrap().path, odd);
        assert_eq!(loaded.get(&FileKey { dev: 1, ino: 1 }), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retain_drops_vanished_files() {
        let dir = tmpdir("retain");
        let (mut store, _) = Checkpoints::open(&dir).unwrap();
        for n in 0..4 {
            let (k, c) = sample(n);
            store.set(k, c);
        }
        store.persist().unwrap();
        store.retain(|k| k.ino % 2 == 0);
        assert!(store.is_dirty());
        store.persist().unwrap();
        let (loaded, _) = Checkpoints::open(&dir).unwrap();
        let mut inos: Vec<u64> = loaded.entries.keys().map(|k| k.ino).collect();
        inos.sort_unstable();
        assert_eq!(inos, vec![0, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_and_garbage_files_lose_only_their_bad_lines() {
        let entries: HashMap<FileKey, Checkpoint> = (0..4).map(sample).collect();
        let good = encode(&entries);
        // Torn at every byte: never a panic, never a checkpoint that was not written, and every
        // whole line before the tear kept.
        for cut in 0..=good.len() {
            let (got, stats) = decode(&good[..cut]).unwrap();
            for (k, c) in &got {
                assert_eq!(entries.get(k), Some(c), "cut {cut}");
            }
            let whole_lines = good[..cut].iter().filter(|&&b| b == b'\n').count();
            assert!(got.len() >= whole_lines.saturating_sub(1), "cut {cut}");
            assert!(stats.ignored <= 1, "cut {cut}: {stats:?}");
        }
        // One flipped digit in an offset: that line is refused by its checksum.
        let text = String::from_utf8(good.clone()).unwrap();
        let damaged = text.replacen("\t3000\t", "\t9000\t", 1);
        assert_ne!(damaged, text);
        let (got, stats) = decode(damaged.as_bytes()).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                loaded: 3,
                ignored: 1
            }
        );
        assert!(!got.contains_key(&sample(3).0));
        // Garbage without our header: every line ignored, counted.
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let (got, stats) = decode(&garbage).unwrap();
        assert!(got.is_empty());
        assert!(stats.ignored > 0);
        assert_eq!(decode(b"").unwrap().1, LoadStats::default());
        // Another version of the format is an error, not a silent reset.
        assert_eq!(
            decode(b"log-shipper checkpoints v2\nwhatever\n").unwrap_err(),
            "log-shipper checkpoints v2"
        );
    }

    #[test]
    fn open_reports_garbage_and_versions_through_the_file() {
        let dir = tmpdir("open-garbage");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), b"\x00\x01garbage\nmore\tgarbage\n").unwrap();
        std::fs::write(dir.join(TMP_FILE_NAME), b"half written").unwrap();
        let (store, stats) = Checkpoints::open(&dir).unwrap();
        assert!(store.is_empty());
        assert_eq!(
            stats,
            LoadStats {
                loaded: 0,
                ignored: 2
            }
        );
        std::fs::write(dir.join(FILE_NAME), b"log-shipper checkpoints v7\n").unwrap();
        let e = Checkpoints::open(&dir).unwrap_err();
        assert_eq!(e.kind(), "version");
        assert!(e.to_string().contains("v7"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprints() {
        let dir = tmpdir("fingerprint");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let content = vec![b'a'; 3000];
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            Fingerprint::read(&file, 10).unwrap(),
            Fingerprint::of(&content[..10])
        );
        let full = Fingerprint::read(&file, usize::MAX).unwrap();
        assert_eq!(full.len as usize, FINGERPRINT_BYTES);
        assert_eq!(full, Fingerprint::of(&content));
        assert_ne!(Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
