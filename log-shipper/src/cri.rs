//! Sans-IO reader of CRI container log files (`/var/log/pods/<ns>_<pod>_<uid>/<container>/
//! <n>.log`, written by containerd and CRI-O): one line per write,
//!
//! ```text
//! 2016-10-06T00:17:09.669794202Z stdout P log content 1
//! 2016-10-06T00:17:09.669794203Z stderr F log content 2
//! ```
//!
//! `<RFC 3339 timestamp> <stdout|stderr> <tag> <content>\n`, where the tag's first `:`-separated
//! part is `P` (a partial line: the runtime cut a longer line, the rest follows in later `P`
//! lines and a final `F`) or `F` (full). stdout and stderr go into the same file, so the two
//! streams' partial sequences interleave; they are joined per stream.
//!
//! [`parse_line`] parses one line. [`Reader`] takes the file's bytes as they are read, in chunks
//! cut anywhere, and yields one [`Entry`] per log entry (partial lines joined, entries longer
//! than the configured maximum split, counted; a cut that would fall inside a UTF-8 character
//! moves back to its start, so each piece stays valid text) or one [`Malformed`] per line that is not CRI
//! (counted; the lines after it are read normally). Each result carries a
//! [checkpoint](Entry::checkpoint): the offset a tailer may persist once it and every earlier
//! result are acknowledged, never past a byte whose entry has not been emitted yet. Nothing here
//! touches a file, a clock or the runtime: the caller reads, and decides when a trailing partial
//! line has waited long enough ([`Reader::flush_partials`]) or a file has ended
//! ([`Reader::finish`]).

use std::collections::VecDeque;

use thiserror::Error;

/// Longest timestamp accepted: `2006-01-02T15:04:05.999999999+07:00`.
pub const MAX_TIMESTAMP_LEN: usize = 35;
/// Longest tag accepted (`P`, `F`, each optionally followed by `:`-separated tags of a newer
/// runtime, which are ignored).
pub const MAX_TAG_LEN: usize = 32;
/// A line's header (timestamp, stream, tag and the three spaces) lies within its first this
/// many bytes; whether a line is CRI is decided from them alone.
pub const MAX_HEADER_LEN: usize = MAX_TIMESTAMP_LEN + 1 + STREAM_LEN + 1 + MAX_TAG_LEN + 1;
/// The error detail of a timestamp of the wrong shape.
const TIMESTAMP_SHAPE: &str = "not YYYY-MM-DDThh:mm:ss[.fraction](Z|+hh:mm)";
/// `stdout` and `stderr` are both this long.
const STREAM_LEN: usize = 6;

/// The output stream a line was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// `stdout`
    Stdout,
    /// `stderr`
    Stderr,
}

impl Stream {
    /// Both streams.
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The name as written in the file (and used as a label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// One parsed CRI line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// The runtime's write time, nanoseconds since the Unix epoch (UTC), exactly as written.
    pub timestamp: i64,
    /// The stream.
    pub stream: Stream,
    /// `P`: the content continues in the stream's next line.
    pub partial: bool,
    /// The content, without the line's `\n`.
    pub content: &'a [u8],
}

/// Why a line is not a CRI log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LineError {
    /// The line does not start with an RFC 3339 timestamp (at most nine fractional digits,
    /// `Z` or a `±hh:mm` offset, years 1678 to 2261: the range of `i64` nanoseconds) and a space.
    #[error("bad timestamp: {0}")]
    Timestamp(&'static str),
    /// The second field is not `stdout` or `stderr`.
    #[error("stream is not stdout or stderr")]
    Stream,
    /// The third field is missing, longer than [`MAX_TAG_LEN`], or its first part is not `P`
    /// or `F`.
    #[error("tag is not P or F")]
    Tag,
}

impl LineError {
    /// Bounded metric label: `timestamp` | `stream` | `tag`.
    pub fn kind(&self) -> &'static str {
        match self {
            LineError::Timestamp(_) => "timestamp",
            LineError::Stream => "stream",
            LineError::Tag => "tag",
        }
    }
}

/// A line's header: everything before the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    timestamp: i64,
    stream: Stream,
    partial: bool,
    /// Where the content starts in the line.
    len: usize,
}

/// Parses one line, given without its `\n`.
///
/// As the kubelet does, the tag is split on `:` and only the first part counts. Unlike the
/// kubelet, a line that ends right after its tag (no space) is accepted with empty content.
pub fn parse_line(line: &[u8]) -> Result<Line<'_>, LineError> {
    let header = parse_header(line, &mut None)?;
    Ok(Line {
        timestamp: header.timestamp,
        stream: header.stream,
        partial: header.partial,
        content: &line[header.len.min(line.len())..],
    })
}

/// Parses the header of `line` (a whole line without `\n`, or a prefix longer than
/// [`MAX_HEADER_LEN`] of one). Only the first [`MAX_HEADER_LEN`] bytes are read, so a prefix
/// gives the same answer as the whole line.
fn parse_header(line: &[u8], second: &mut Option<Second>) -> Result<Header, LineError> {
    let ts_end = find_space(line, MAX_TIMESTAMP_LEN + 1)
        .ok_or(LineError::Timestamp("no RFC 3339 timestamp and space"))?;
    let timestamp = parse_timestamp_with(&line[..ts_end], second)?;
    let rest = &line[ts_end + 1..];
    let stream = match rest.get(..STREAM_LEN) {
        Some(b"stdout") => Stream::Stdout,
        Some(b"stderr") => Stream::Stderr,
        _ => return Err(LineError::Stream),
    };
    match rest.get(STREAM_LEN) {
        Some(b' ') => {}
        Some(_) => return Err(LineError::Stream),
        None => return Err(LineError::Tag),
    }
    let tag_start = ts_end + 1 + STREAM_LEN + 1;
    let rest = &line[tag_start..];
    let (tag, len) = match find_space(rest, MAX_TAG_LEN + 1) {
        Some(i) => (&rest[..i], tag_start + i + 1),
        None if rest.len() <= MAX_TAG_LEN => (rest, line.len()),
        None => return Err(LineError::Tag),
    };
    let partial = match tag.split(|&b| b == b':').next() {
        Some(b"P") => true,
        Some(b"F") => false,
        _ => return Err(LineError::Tag),
    };
    Ok(Header {
        timestamp,
        stream,
        partial,
        len,
    })
}

/// The first space within `bytes[..limit]`.
fn find_space(bytes: &[u8], limit: usize) -> Option<usize> {
    memchr::memchr(b' ', &bytes[..limit.min(bytes.len())])
}

/// Parses `YYYY-MM-DDThh:mm:ss[.f{1,9}](Z|±hh:mm)` (Go's `RFC3339Nano` as the kubelet reads
/// it: the fraction may be absent or shorter than nine digits) into Unix nanoseconds, exactly.
pub fn parse_timestamp(t: &[u8]) -> Result<i64, LineError> {
    parse_timestamp_with(t, &mut None)
}

/// A whole second [`parse_timestamp_with`] read: its text, `YYYY-MM-DDThh:mm:ss`, and its
/// seconds since the epoch before the zone offset.
#[derive(Debug, Clone, Copy)]
pub struct Second {
    text: [u8; 19],
    seconds: i64,
}

/// [`parse_timestamp`], remembering the last whole second in `second`: a file's lines mostly
/// share it, so its date arithmetic runs once a second instead of once a line.
pub fn parse_timestamp_with(t: &[u8], second: &mut Option<Second>) -> Result<i64, LineError> {
    let bad = LineError::Timestamp(TIMESTAMP_SHAPE);
    let text = t.get(..19).ok_or(bad)?;
    let local = match second {
        Some(s) if s.text == text => s.seconds,
        _ => {
            let seconds = civil_seconds(text)?;
            let mut copy = [0; 19];
            copy.copy_from_slice(text);
            *second = Some(Second {
                text: copy,
                seconds,
            });
            seconds
        }
    };
    let digits = |range| decimal(t, range);
    let mut i = 19;
    let mut fraction = 0i64;
    if t.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while t.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        match i - start {
            0 => return Err(LineError::Timestamp("empty fraction")),
            n @ 1..=9 => fraction = digits(start..i)? * 10i64.pow(9 - n as u32),
            _ => return Err(LineError::Timestamp("more than nine fractional digits")),
        }
    }
    let offset = match t.get(i..) {
        Some(b"Z") => 0,
        Some([sign @ (b'+' | b'-'), _, _, b':', _, _]) => {
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err(LineError::Timestamp("offset out of range"));
            }
            let seconds = h * 3600 + m * 60;
            if *sign == b'-' {
                -seconds
            } else {
                seconds
            }
        }
        _ => return Err(bad),
    };
    i64::try_from(i128::from(local - offset) * 1_000_000_000 + i128::from(fraction))
        .map_err(|_| LineError::Timestamp("outside the years 1678 to 2261"))
}

/// The decimal number `t[range]`, all ASCII digits, or the shape error.
fn decimal(t: &[u8], range: std::ops::Range<usize>) -> Result<i64, LineError> {
    let bad = LineError::Timestamp(TIMESTAMP_SHAPE);
    let part = t.get(range).ok_or(bad)?;
    part.iter().try_fold(0i64, |n, &b| {
        if b.is_ascii_digit() {
            Ok(n * 10 + i64::from(b - b'0'))
        } else {
            Err(bad)
        }
    })
}

/// The seconds since the epoch of `YYYY-MM-DDThh:mm:ss` (19 bytes), as if it were UTC.
fn civil_seconds(t: &[u8]) -> Result<i64, LineError> {
    let bad = LineError::Timestamp(TIMESTAMP_SHAPE);
    let digits = |range| decimal(t, range);
    let punctuation = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if punctuation.iter().any(|&(i, c)| t.get(i) != Some(&c)) {
        return Err(bad);
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(LineError::Timestamp("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(LineError::Timestamp("no such time of day"));
    }
    let days = days_from_civil(year, month) + day - 1;
    Ok(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the first of `month` of `year` (proleptic Gregorian; Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// How an entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An `F` line ended it: a whole log entry.
    Full,
    /// It reached the reader's maximum size and was cut; the rest of the log entry follows in
    /// the stream's next entry. Its content is exactly the maximum size.
    Split,
    /// Partial lines without their `F`, emitted by [`Reader::flush_partials`] or
    /// [`Reader::finish`] (a container that exited mid-line, or a partial line that waited too
    /// long).
    Flushed,
}

/// One log entry: a line, or partial lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Unix nanoseconds of the entry's first line (for a piece after a [`End::Split`], of the
    /// line its first byte came from), exactly as the runtime wrote it.
    pub timestamp: i64,
    /// The stream.
    pub stream: Stream,
    /// The content, partial lines concatenated, without the final `\n`.
    pub content: Vec<u8>,
    /// How the entry ended.
    pub end: End,
    /// The file offset a tailer may resume from once this result and every earlier one are
    /// acknowledged: just after the last line this entry used, but never past the start of a
    /// line whose content is not fully emitted yet (the other stream's pending partial line,
    /// or the rest of a line this entry was split from). Never decreases from one result to
    /// the next.
    pub checkpoint: u64,
}

/// A line that is not CRI. The reader skips it and goes on with the next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("malformed CRI line at bytes {start}..{end}: {error}")]
pub struct Malformed {
    /// What is wrong.
    pub error: LineError,
    /// File offset of the line's first byte.
    pub start: u64,
    /// File offset just after the line's `\n` (or its last byte, at [`Reader::finish`]).
    pub end: u64,
    /// As [`Entry::checkpoint`].
    pub checkpoint: u64,
}

/// What the reader yields, in file order of the lines that complete them.
pub type Event = Result<Entry, Malformed>;

/// Counters since the reader was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// CRI lines parsed.
    pub lines: u64,
    /// Lines that are not CRI.
    pub malformed: u64,
    /// Entries emitted (every [`End`]).
    pub entries: u64,
    /// Entries cut at the maximum size ([`End::Split`]).
    pub split: u64,
    /// Entries emitted without their `F` line ([`End::Flushed`]).
    pub flushed: u64,
}

/// A stream's partial lines not yet emitted.
#[derive(Debug)]
struct Pending {
    timestamp: i64,
    content: Vec<u8>,
    /// Offset of the first line whose bytes are in `content` (or which continues into it).
    start: u64,
}

/// A line longer than the buffer bound, read in pieces as it arrives.
#[derive(Debug, Clone, Copy)]
enum LongLine {
    /// A CRI line: its content goes to the stream's pending entry as it arrives.
    Content {
        stream: Stream,
        timestamp: i64,
        partial: bool,
        start: u64,
    },
    /// Not CRI: skipped up to its `\n`, then reported.
    Skip { error: LineError, start: u64 },
}

/// Reads one CRI log file: bytes in ([`push`](Reader::push)), [`Event`]s out (the
/// [`Iterator`]; it returns `None` when the bytes pushed so far hold no more, and more after
/// the next push: an incomplete last line stays buffered until its `\n` arrives, or
/// [`finish`](Reader::finish)).
///
/// Memory is bounded by the caller's chunks plus, per stream, one entry of at most
/// `max_entry_bytes` and, for the line being read, `max_entry_bytes + MAX_HEADER_LEN`: a longer
/// line is read in pieces. The results do not depend on how the file's bytes are cut into
/// chunks.
#[derive(Debug)]
pub struct Reader {
    max_entry_bytes: usize,
    /// Bytes not consumed yet start at `buf[head]`, file offset `offset`.
    buf: Vec<u8>,
    head: usize,
    offset: u64,
    /// File offset just after the last line consumed whole.
    consumed: u64,
    long: Option<LongLine>,
    pending: [Option<Pending>; 2],
    out: VecDeque<Event>,
    stats: Stats,
    /// The last whole second of a timestamp read.
    second: Option<Second>,
}

impl Reader {
    /// A reader of a file from `offset` (a checkpoint, or 0), joining partial lines into
    /// entries of at most `max_entry_bytes` (at least 1).
    pub fn new(offset: u64, max_entry_bytes: usize) -> Reader {
        Reader {
            max_entry_bytes: max_entry_bytes.max(1),
            buf: Vec::new(),
            head: 0,
            offset,
            consumed: offset,
            long: None,
            pending: [None, None],
            out: VecDeque::new(),
            stats: Stats::default(),
            second: None,
        }
    }

    /// Appends the next bytes of the file.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Emits every stream's pending partial lines as [`End::Flushed`] entries (the caller's
    /// timeout for a trailing `P` line whose `F` never comes). Read them with
    /// the iterator.
    pub fn flush_partials(&mut self) {
        let mut order: Vec<usize> = (0..2).filter(|&i| self.pending[i].is_some()).collect();
        order.sort_by_key(|&i| self.pending[i].as_ref().map(|p| p.start));
        for i in order {
            if let Some(p) = self.pending[i].take() {
                self.emit(Stream::ALL[i], p.timestamp, p.content, End::Flushed);
            }
        }
    }

    /// The file has ended (deleted, or rotated and drained): an unterminated last line is read
    /// as a line, then pending partial lines are flushed. Read the results with
    /// the iterator.
    pub fn finish(&mut self) {
        while self.step(true) {}
        self.flush_partials();
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// File offset of the first byte not consumed yet.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes pushed but not consumed (an incomplete last line).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Consumes one line, or the available part of a long one; false if nothing to do.
    /// `at_end`: the bytes buffered are all there will be.
    fn step(&mut self, at_end: bool) -> bool {
        let buf = std::mem::take(&mut self.buf);
        let avail = &buf[self.head..];
        let progress = if avail.is_empty() && !(at_end && self.long.is_some()) {
            false
        } else {
            let newline = memchr::memchr(b'\n', avail);
            let (used, line_done) = match newline {
                Some(i) => (i + 1, true),
                None => (avail.len(), at_end),
            };
            let bytes = &avail[..newline.unwrap_or(avail.len())];
            let end = self.offset + used as u64;
            match self.long.take() {
                Some(LongLine::Content {
                    stream,
                    timestamp,
                    partial,
                    start,
                }) => {
                    self.append(stream, timestamp, start, bytes);
                    if line_done {
                        self.end_line(stream, partial, end);
                    } else {
                        self.long = Some(LongLine::Content {
                            stream,
                            timestamp,
                            partial,
                            start,
                        });
                    }
                    self.consume(used);
                    true
                }
                Some(LongLine::Skip { error, start }) => {
                    if line_done {
                        self.malformed(error, start, end);
                    } else {
                        self.long = Some(LongLine::Skip { error, start });
                    }
                    self.consume(used);
                    true
                }
                None if line_done => {
                    let start = self.offset;
                    match parse_header(bytes, &mut self.second) {
                        Ok(h) => {
                            let content = &bytes[h.len.min(bytes.len())..];
                            self.append(h.stream, h.timestamp, start, content);
                            self.end_line(h.stream, h.partial, end);
                        }
                        Err(error) => self.malformed(error, start, end),
                    }
                    self.consume(used);
                    true
                }
                None if avail.len() > self.max_entry_bytes.saturating_add(MAX_HEADER_LEN) => {
                    // Too long to hold whole: decide from the header, then stream the content.
                    let start = self.offset;
                    self.long = Some(match parse_header(bytes, &mut self.second) {
                        Ok(h) => {
                            let content = &bytes[h.len.min(bytes.len())..];
                            self.append(h.stream, h.timestamp, start, content);
                            LongLine::Content {
                                stream: h.stream,
                                timestamp: h.timestamp,
                                partial: h.partial,
                                start,
                            }
                        }
                        Err(error) => LongLine::Skip { error, start },
                    });
                    self.consume(used);
                    true
                }
                None => false,
            }
        };
        self.buf = buf;
        progress
    }

    fn consume(&mut self, n: usize) {
        self.head += n;
        self.offset += n as u64;
    }

    /// Adds content of the line starting at `line_start` to the stream's pending entry,
    /// emitting [`End::Split`] pieces whenever it would exceed the maximum.
    fn append(&mut self, stream: Stream, timestamp: i64, line_start: u64, mut content: &[u8]) {
        let max = self.max_entry_bytes;
        loop {
            let pending = self.pending[stream.index()].get_or_insert_with(|| Pending {
                timestamp,
                content: Vec::new(),
                start: line_start,
            });
            if pending.content.len() + content.len() <= max {
                pending.content.extend_from_slice(content);
                return;
            }
            let cut = char_boundary(
                content,
                max - pending.content.len(),
                !pending.content.is_empty(),
            );
            let (head, tail) = content.split_at(cut);
            pending.content.extend_from_slice(head);
            content = tail;
            let piece = std::mem::take(&mut pending.content);
            let first = pending.timestamp;
            // The rest starts inside this line: a resume must reread it.
            pending.timestamp = timestamp;
            pending.start = line_start;
            self.emit(stream, first, piece, End::Split);
        }
    }

    /// The line ending at `end` is consumed; an `F` line completes the stream's entry.
    fn end_line(&mut self, stream: Stream, partial: bool, end: u64) {
        self.stats.lines += 1;
        self.consumed = end;
        if partial {
            return;
        }
        if let Some(p) = self.pending[stream.index()].take() {
            self.emit(stream, p.timestamp, p.content, End::Full);
        }
    }

    fn malformed(&mut self, error: LineError, start: u64, end: u64) {
        self.stats.malformed += 1;
        self.consumed = end;
        let checkpoint = self.checkpoint();
        self.out.push_back(Err(Malformed {
            error,
            start,
            end,
            checkpoint,
        }));
    }

    fn emit(&mut self, stream: Stream, timestamp: i64, content: Vec<u8>, end: End) {
        self.stats.entries += 1;
        match end {
            End::Full => {}
            End::Split => self.stats.split += 1,
            End::Flushed => self.stats.flushed += 1,
        }
        let checkpoint = self.checkpoint();
        self.out.push_back(Ok(Entry {
            timestamp,
            stream,
            content,
            end,
            checkpoint,
        }));
    }

    /// Where a resume after the results so far loses nothing: the end of the last line
    /// consumed, held back to the first line of any entry still pending.
    fn checkpoint(&self) -> u64 {
        self.pending
            .iter()
            .flatten()
            .map(|p| p.start)
            .fold(self.consumed, u64::min)
    }
}

impl Iterator for Reader {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if !self.step(false) {
                return None;
            }
        }
    }
}

/// Where to cut `content` so that the piece before it ends at most `at` bytes in: `at`, or up
/// to three bytes earlier when `at` falls inside a UTF-8 character that starts in `content`, so
/// that both pieces stay valid text (a store would otherwise get U+FFFD twice for one
/// character). The piece never becomes empty unless `pending` already holds bytes.
fn char_boundary(content: &[u8], at: usize, pending: bool) -> usize {
    let is_continuation = |b: u8| b & 0b1100_0000 == 0b1000_0000;
    if !content.get(at).is_some_and(|&b| is_continuation(b)) {
        return at;
    }
    for back in 1..=3.min(at) {
        let lead = content[at - back];
        if is_continuation(lead) {
            continue;
        }
        // A lead byte: its character is `len` bytes long; `back` of them are before the cut.
        let len = match lead {
            0b1100_0000..=0b1101_1111 => 2,
            0b1110_0000..=0b1110_1111 => 3,
            0b1111_0000..=0b1111_0111 => 4,
            _ => return at,
        };
        if len > back && (at - back > 0 || pending) {
            return at - back;
        }
        return at;
    }
    at
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` cut at `cuts` (ascending offsets), collecting results after every push,
    /// then finishes the file.
    fn run_cut(input: &[u8], cuts: &[usize], max: usize) -> (Vec<Event>, Stats) {
        run_from(0, input, cuts, max)
    }

    fn run_from(base: u64, input: &[u8], cuts: &[usize], max: usize) -> (Vec<Event>, Stats) {
        let mut reader = Reader::new(base, max);
        let mut events = Vec::new();
        let mut prev = 0;
        for &cut in cuts.iter().chain([&input.len()]) {
            let cut = cut.clamp(prev, input.len());
            reader.push(&input[prev..cut]);
            events.extend(reader.by_ref());
            prev = cut;
        }
        reader.finish();
        events.extend(reader.by_ref());
        (events, reader.stats())
    }

    fn run(input: &[u8], max: usize) -> Vec<Event> {
        run_cut(input, &[], max).0
    }

    /// Formats Unix nanoseconds as the runtime would, in the zone `offset` minutes east of UTC,
    /// with the fraction trimmed (Go's RFC3339Nano) or all nine digits.
    fn format_timestamp(nanos: i64, offset: i32, trim: bool) -> String {
        let local = i128::from(nanos) + i128::from(offset) * 60_000_000_000;
        let seconds = local.div_euclid(1_000_000_000);
        let fraction = local.rem_euclid(1_000_000_000);
        let days = i64::try_from(seconds.div_euclid(86_400)).unwrap();
        let of_day = seconds.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut text = format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        );
        let digits = format!("{fraction:09}");
        let digits = if trim {
            digits.trim_end_matches('0')
        } else {
            &digits
        };
        if !digits.is_empty() {
            text.push('.');
            text.push_str(digits);
        }
        if offset == 0 {
            text.push('Z');
        } else {
            let sign = if offset < 0 { '-' } else { '+' };
            let o = offset.abs();
            text.push_str(&format!("{sign}{:02}:{:02}", o / 60, o % 60));
        }
        text
    }

    fn entry(timestamp: i64, stream: Stream, content: &str, end: End, checkpoint: u64) -> Event {
        Ok(Entry {
            timestamp,
            stream,
            content: content.as_bytes().to_vec(),
            end,
            checkpoint,
        })
    }

    const T0: i64 = 1_475_713_029_669_794_202;

    #[test]
    fn kubelet_example_lines() {
        let line = parse_line(b"2016-10-06T00:17:09.669794202Z stdout P log content 1").unwrap();
        assert_eq!(
            line,
            Line {
                timestamp: T0,
                stream: Stream::Stdout,
                partial: true,
                content: b"log content 1",
            }
        );
        let line = parse_line(b"2016-10-06T00:17:09.669794203Z stderr F log content 2").unwrap();
        assert_eq!(
            (line.timestamp, line.stream, line.partial, line.content),
            (T0 + 1, Stream::Stderr, false, &b"log content 2"[..])
        );
        // Content keeps its spaces; later tags are ignored; no space after the tag is empty.
        let line = parse_line(b"2016-10-06T00:17:09Z stdout F:x:y  two  spaces ").unwrap();
        assert_eq!(line.content, b" two  spaces ");
        assert!(!line.partial);
        let line = parse_line(b"2016-10-06T00:17:09Z stderr P").unwrap();
        assert_eq!((line.partial, line.content), (true, &b""[..]));
        assert_eq!(
            parse_line(b"2016-10-06T00:17:09Z stderr F ")
                .unwrap()
                .content,
            b""
        );
    }

    #[test]
    fn timestamps_are_exact() {
        for (text, nanos) in [
            ("2016-10-06T00:17:09.669794202Z", T0),
            ("2016-10-06T02:17:09.669794202+02:00", T0),
            ("2016-10-05T19:47:09.669794202-04:30", T0),
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.000000001Z", 1),
            ("1969-12-31T23:59:59.999999999Z", -1),
            ("2024-02-29T23:59:59.5+01:00", 1_709_247_599_500_000_000),
            ("2000-03-01T00:00:00Z", 951_868_800_000_000_000),
            ("1677-09-21T00:12:43.145224192Z", i64::MIN),
            ("2262-04-11T23:47:16.854775807Z", i64::MAX),
        ] {
            assert_eq!(parse_timestamp(text.as_bytes()), Ok(nanos), "{text}");
        }
    }

    #[test]
    fn bad_timestamps() {
        for text in [
            "",
            "2016-10-06",
            "2016-10-06T00:17:09",
            "2016-10-06 00:17:09Z",
            "2016-10-06T00:17:09z",
            "2016-10-06T00:17:09.Z",
            "2016-10-06T00:17:09.1234567891Z",
            "2016-10-06T00:17:09ZZ",
            "2016-10-06T00:17:09+0200",
            "2016-10-06T00:17:09+24:00",
            "2016-10-06T00:17:09+02:60",
            "2016-13-06T00:17:09Z",
            "2016-00-06T00:17:09Z",
            "2016-10-00T00:17:09Z",
            "2016-04-31T00:17:09Z",
            "2023-02-29T00:17:09Z",
            "1900-02-29T00:17:09Z",
            "2016-10-06T24:00:00Z",
            "2016-10-06T00:60:00Z",
            "2016-10-06T00:00:60Z",
            "+016-10-06T00:17:09Z",
            "2016-1a-06T00:17:09Z",
            "1677-09-21T00:12:43.145224191Z",
            "2262-04-11T23:47:16.854775808Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(
                matches!(
                    parse_timestamp(text.as_bytes()),
                    Err(LineError::Timestamp(_))
                ),
                "{text}: {:?}",
                parse_timestamp(text.as_bytes())
            );
        }
    }

    #[test]
    fn bad_lines() {
        let ts = "2016-10-06T00:17:09Z";
        for (line, want) in [
            (String::new(), "timestamp"),
            ("garbage".into(), "timestamp"),
            (format!("{ts}stdout F x"), "timestamp"),
            (format!("{ts} stdin F x"), "stream"),
            (format!("{ts} stdoutt F x"), "stream"),
            (format!("{ts} Stdout F x"), "stream"),
            (format!("{ts} stdout"), "tag"),
            (format!("{ts} stdout  x"), "tag"),
            (format!("{ts} stdout X x"), "tag"),
            (format!("{ts} stdout p x"), "tag"),
            (format!("{ts} stdout FF x"), "tag"),
            (format!("{ts} stdout :F x"), "tag"),
            (format!("{ts} stdout F{}", ":".repeat(MAX_TAG_LEN)), "tag"),
            (format!("{}Z stdout F x", " ".repeat(40)), "timestamp"),
        ] {
            let error = parse_line(line.as_bytes()).unwrap_err();
            assert_eq!(error.kind(), want, "{line:?}: {error}");
        }
        // The longest tag still fits.
        let tag = format!("F{}", ":".repeat(MAX_TAG_LEN - 1));
        assert!(parse_line(format!("{ts} stdout {tag} x").as_bytes()).is_ok());
        assert!(parse_line(format!("{ts} stdout {tag}").as_bytes()).is_ok());
    }

    /// Two streams' partial lines interleaved, a malformed line between them, a split.
    const SAMPLE: &str = "\
2016-10-06T00:17:09.669794202Z stdout P one \n\
2016-10-06T00:17:09.669794203Z stderr F err\n\
not a CRI line\n\
2016-10-06T00:17:09.669794204Z stdout P two \n\
2016-10-06T00:17:09.669794205Z stdout F three\n\
2016-10-06T00:17:09.669794206Z stderr F 0123456789abcdefXYZ\n\
2016-10-06T00:17:09.669794207Z stdout F\n\
2016-10-06T00:17:09.669794208Z stdout P tail";

    #[test]
    fn joins_partials_per_stream() {
        let lens: Vec<u64> = SAMPLE
            .split_inclusive('\n')
            .map(|l| l.len() as u64)
            .collect();
        let ends: Vec<u64> = lens
            .iter()
            .scan(0, |end, len| {
                *end += len;
                Some(*end)
            })
            .collect();
        let (events, stats) = run_cut(SAMPLE.as_bytes(), &[], 16);
        assert_eq!(
            events,
            vec![
                // stdout's first line is pending: the checkpoint stays before it.
                entry(T0 + 1, Stream::Stderr, "err", End::Full, 0),
                Err(Malformed {
                    error: LineError::Timestamp(TIMESTAMP_SHAPE),
                    start: ends[1],
                    end: ends[2],
                    checkpoint: 0,
                }),
                entry(T0, Stream::Stdout, "one two three", End::Full, ends[4]),
                entry(
                    T0 + 4,
                    Stream::Stderr,
                    "0123456789abcdef",
                    End::Split,
                    ends[4]
                ),
                entry(T0 + 4, Stream::Stderr, "XYZ", End::Full, ends[5]),
                entry(T0 + 5, Stream::Stdout, "", End::Full, ends[6]),
                // The unterminated last line is read at finish, then flushed.
                entry(T0 + 6, Stream::Stdout, "tail", End::Flushed, ends[7]),
            ]
        );
        assert_eq!(
            stats,
            Stats {
                lines: 7,
                malformed: 1,
                entries: 6,
                split: 1,
                flushed: 1,
            }
        );
    }

    #[test]
    fn every_split_point_gives_the_same_results() {
        // With a line longer than the buffer bound, of content and of garbage.
        let long = format!(
            "{SAMPLE}\n2016-10-06T00:17:09Z stderr F {}\n{}\n2016-10-06T00:17:09Z stdout F end\n",
            "x".repeat(100),
            "#".repeat(100)
        );
        for (input, max) in [
            (SAMPLE, 1),
            (SAMPLE, 3),
            (SAMPLE, 16),
            (SAMPLE, 1024),
            (&long, 4),
            (&long, 16),
        ] {
            let input = input.as_bytes();
            let whole = run_cut(input, &[], max);
            for cut in 0..=input.len() {
                assert_eq!(
                    run_cut(input, &[cut], max),
                    whole,
                    "max {max}, cut at {cut}"
                );
            }
            let bytewise: Vec<usize> = (0..input.len()).collect();
            assert_eq!(run_cut(input, &bytewise, max), whole, "max {max}, bytewise");
        }
    }

    #[test]
    fn incomplete_line_waits_and_is_not_committed() {
        let mut reader = Reader::new(100, 1024);
        reader.push(b"2016-10-06T00:17:09.669794202Z stdout F hel");
        assert_eq!(reader.next(), None);
        assert_eq!((reader.offset(), reader.buffered()), (100, 43));
        reader.push(b"lo\n2016");
        assert_eq!(
            reader.next(),
            Some(entry(T0, Stream::Stdout, "hello", End::Full, 146))
        );
        assert_eq!(reader.next(), None);
        assert_eq!((reader.offset(), reader.buffered()), (146, 4));
    }

    #[test]
    fn a_split_never_cuts_a_character() {
        // "é" is 2 bytes, "€" 3, "😀" 4: every cut position falls inside one of them somewhere.
        let text = "aé€😀bé€😀cé€😀dé€😀eé€😀";
        for max in 4..text.len() {
            for partial_first in [false, true] {
                let mut input = String::new();
                let (first, rest) = text.split_at(if partial_first { 1 } else { 0 });
                if partial_first {
                    input.push_str(&format!("2026-12-06T10:00:00Z stdout P {first}\n"));
                }
                input.push_str(&format!("2026-12-06T10:00:00Z stdout F {rest}\n"));
                let (events, _) = run_cut(input.as_bytes(), &[], max);
                let pieces: Vec<&Entry> = events.iter().flatten().collect();
                let mut joined = Vec::new();
                for p in &pieces {
                    assert!(p.content.len() <= max, "max {max}");
                    assert!(
                        std::str::from_utf8(&p.content).is_ok(),
                        "max {max}: a piece is not UTF-8: {:?}",
                        p.content
                    );
                    joined.extend_from_slice(&p.content);
                }
                assert_eq!(joined, text.as_bytes(), "max {max}");
            }
        }
        // Bytes that are not UTF-8 are cut where the maximum says.
        assert_eq!(char_boundary(&[0x80, 0x80, 0x80, 0x80], 2, false), 2);
        assert_eq!(
            char_boundary("é".as_bytes(), 1, false),
            1,
            "the piece would be empty"
        );
        assert_eq!(char_boundary("é".as_bytes(), 1, true), 0);
    }

    #[test]
    fn long_lines_are_split_and_streamed_in_bounded_memory() {
        let max = 1000;
        let content: String = (0..100_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let line = format!("2016-10-06T00:17:09.669794202Z stdout F {content}\n");
        let mut reader = Reader::new(0, max);
        let mut pieces = Vec::new();
        for chunk in line.as_bytes().chunks(4096) {
            reader.push(chunk);
            pieces.extend(reader.by_ref().map(Result::unwrap));
            assert!(
                reader.buffered() <= max + MAX_HEADER_LEN,
                "{}",
                reader.buffered()
            );
        }
        assert_eq!(pieces.len(), 100);
        for piece in &pieces[..99] {
            assert_eq!((piece.end, piece.content.len()), (End::Split, max));
            // The line is not over: a resume rereads it from its start.
            assert_eq!(piece.checkpoint, 0);
        }
        assert_eq!(pieces[99].end, End::Full);
        assert_eq!(pieces[99].checkpoint, line.len() as u64);
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.content.clone()).collect();
        assert_eq!(joined, content.as_bytes());
        assert!(pieces.iter().all(|p| p.timestamp == T0));
        assert_eq!(reader.stats().split, 99);
    }

    #[test]
    fn long_garbage_is_skipped_and_the_next_line_read() {
        let mut input = vec![b'#'; 10_000];
        input.push(b'\n');
        input.extend_from_slice(b"2016-10-06T00:17:09.669794202Z stderr F ok\n");
        let whole = run_cut(&input, &[], 64);
        let chunks: Vec<usize> = (0..input.len()).step_by(100).collect();
        assert_eq!(run_cut(&input, &chunks, 64), whole);
        assert_eq!(
            whole.0,
            vec![
                Err(Malformed {
                    error: LineError::Timestamp("no RFC 3339 timestamp and space"),
                    start: 0,
                    end: 10_001,
                    checkpoint: 10_001,
                }),
                entry(T0, Stream::Stderr, "ok", End::Full, input.len() as u64),
            ]
        );
    }

    #[test]
    fn flush_emits_a_partial_line_that_waited() {
        let first = "2016-10-06T00:17:09.669794202Z stdout P no end in sight\n";
        let mut reader = Reader::new(0, 1024);
        reader.push(first.as_bytes());
        assert_eq!(reader.next(), None);
        reader.flush_partials();
        assert_eq!(
            reader.next(),
            Some(entry(
                T0,
                Stream::Stdout,
                "no end in sight",
                End::Flushed,
                first.len() as u64
            ))
        );
        reader.push(b"2016-10-06T00:17:09.669794203Z stdout F after\n");
        assert_eq!(reader.next().unwrap().unwrap().content, b"after".to_vec());
        assert_eq!(reader.stats().flushed, 1);
    }

    #[test]
    fn resuming_at_a_checkpoint_loses_nothing() {
        let input = SAMPLE.as_bytes();
        let (events, _) = run_cut(input, &[], 1024);
        for (k, event) in events.iter().enumerate() {
            let checkpoint = match event {
                Ok(e) => e.checkpoint,
                Err(m) => m.checkpoint,
            };
            let (resumed, _) = run_from(checkpoint, &input[checkpoint as usize..], &[], 1024);
            assert_subsequence(&events[k + 1..], &resumed);
        }
    }

    /// Every entry of `want` appears in `got`, in order (checkpoints aside).
    fn assert_subsequence(want: &[Event], got: &[Event]) {
        let key = |e: &Event| {
            e.as_ref()
                .ok()
                .map(|e| (e.timestamp, e.stream, e.content.clone(), e.end))
        };
        let mut got = got.iter().filter_map(key);
        for w in want.iter().filter_map(key) {
            assert!(got.any(|g| g == w), "{w:?} lost");
        }
    }

    /// One line of a generated file.
    #[derive(Debug, Clone)]
    enum Op {
        Line {
            timestamp: i64,
            offset: i32,
            trim: bool,
            stream: Stream,
            partial: bool,
            extra_tag: bool,
            content: Vec<u8>,
        },
        Garbage(Vec<u8>),
    }

    fn no_newline(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_map(|b| if b == b'\n' { b' ' } else { b }),
            0..max_len,
        )
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (
                any::<i64>(),
                prop_oneof![Just(0), -1439..1440i32],
                any::<bool>(),
                prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)],
                any::<bool>(),
                any::<bool>(),
                no_newline(40),
            )
                .prop_map(|(timestamp, offset, trim, stream, partial, extra_tag, content)| {
                    Op::Line { timestamp, offset, trim, stream, partial, extra_tag, content }
                }),
            1 => no_newline(30).prop_map(|mut g| {
                g.insert(0, b'#');
                Op::Garbage(g)
            }),
        ]
    }

    fn render(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Line {
                    timestamp,
                    offset,
                    trim,
                    stream,
                    partial,
                    extra_tag,
                    content,
                } => {
                    let tag = if *partial { "P" } else { "F" };
                    let extra = if *extra_tag { ":x" } else { "" };
                    let head = format_timestamp(*timestamp, *offset, *trim);
                    out.extend_from_slice(
                        format!("{head} {} {tag}{extra} ", stream.as_str()).as_bytes(),
                    );
                    out.extend_from_slice(content);
                }
                Op::Garbage(g) => out.extend_from_slice(g),
            }
            out.push(b'\n');
        }
        out
    }

    /// The oracle's entry in the making: timestamp, content, offset of its first line.
    type Open = (i64, Vec<u8>, u64);

    /// The oracle: whole lines, no size limit, the obvious bookkeeping.
    fn model(ops: &[Op]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut pending: [Option<Open>; 2] = [None, None];
        let mut offset = 0u64;
        let lens: Vec<usize> = render(ops)
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::len)
            .collect();
        let hold = |pending: &[Option<Open>; 2], at: u64| {
            pending.iter().flatten().map(|p| p.2).fold(at, u64::min)
        };
        for (op, len) in ops.iter().zip(lens) {
            let start = offset;
            offset += len as u64;
            match op {
                Op::Line {
                    timestamp,
                    stream,
                    partial,
                    content,
                    ..
                } => {
                    let i = stream.index();
                    let p = pending[i].get_or_insert((*timestamp, Vec::new(), start));
                    p.1.extend_from_slice(content);
                    if !partial {
                        let (timestamp, content, _) = pending[i].take().unwrap();
                        out.push(Ok(Entry {
                            timestamp,
                            stream: *stream,
                            content,
                            end: End::Full,
                            checkpoint: hold(&pending, offset),
                        }));
                    }
                }
                Op::Garbage(_) => out.push(Err(Malformed {
                    error: LineError::Timestamp("any"),
                    start,
                    end: offset,
                    checkpoint: hold(&pending, offset),
                })),
            }
        }
        let mut rest: Vec<(usize, Open)> = pending
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| p.take().map(|p| (i, p)))
            .collect();
        rest.sort_by_key(|(_, p)| p.2);
        while !rest.is_empty() {
            let (i, (timestamp, content, _)) = rest.remove(0);
            out.push(Ok(Entry {
                timestamp,
                stream: Stream::ALL[i],
                content,
                end: End::Flushed,
                checkpoint: rest.iter().map(|(_, p)| p.2).fold(offset, u64::min),
            }));
        }
        out
    }

    /// A result with the error of a malformed line reduced to its kind.
    type Comparable = Result<Entry, (&'static str, u64, u64, u64)>;

    /// Malformed results compared by kind only.
    fn comparable(events: Vec<Event>) -> Vec<Comparable> {
        events
            .into_iter()
            .map(|e| e.map_err(|m| (m.error.kind(), m.start, m.end, m.checkpoint)))
            .collect()
    }

    fn cut_points(len: usize, picks: &[prop::sample::Index]) -> Vec<usize> {
        let mut cuts: Vec<usize> = picks.iter().map(|i| i.index(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    proptest! {
        #[test]
        fn timestamps_round_trip(
            nanos in any::<i64>(),
            offset in prop_oneof![Just(0), -1439..1440i32],
            trim in any::<bool>(),
        ) {
            let text = format_timestamp(nanos, offset, trim);
            prop_assert_eq!(parse_timestamp(text.as_bytes()), Ok(nanos), "{}", text);
        }

        /// The remembered second changes no answer: timestamps of a few seconds (and
        /// garbage) in any order give what each gives alone.
        #[test]
        fn a_remembered_second_changes_nothing(
            picks in proptest::collection::vec((0..4usize, 0..1_000_000_000i64, -2..3i32), 1..40),
        ) {
            let bases = [1_700_000_000i64, 1_700_000_001, 1_700_086_400, -1];
            let mut second = None;
            for (base, fraction, offset) in picks {
                let text = if bases[base] < 0 {
                    format!("2016-10-06T00:17:0{}Z", fraction % 3)
                        .replace('Z', if fraction % 2 == 0 { "Z" } else { "+25:00" })
                } else {
                    format_timestamp(bases[base] * 1_000_000_000 + fraction, offset * 60, false)
                };
                prop_assert_eq!(
                    parse_timestamp_with(text.as_bytes(), &mut second),
                    parse_timestamp(text.as_bytes()),
                    "{}", text
                );
            }
        }

        #[test]
        fn matches_the_oracle_in_any_chunking(
            ops in proptest::collection::vec(op(), 0..24),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let input = render(&ops);
            let cuts = cut_points(input.len(), &picks);
            let (events, stats) = run_cut(&input, &cuts, usize::MAX);
            prop_assert_eq!(comparable(events), comparable(model(&ops)));
            let garbage = ops.iter().filter(|o| matches!(o, Op::Garbage(_))).count();
            prop_assert_eq!(stats.malformed, garbage as u64);
            prop_assert_eq!(stats.lines, (ops.len() - garbage) as u64);
        }

        #[test]
        fn splitting_keeps_every_byte(
            ops in proptest::collection::vec(op(), 0..24),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
            max in 1usize..48,
        ) {
            let input = render(&ops);
            let (whole, _) = run_cut(&input, &[], usize::MAX);
            let (pieces, _) = run_cut(&input, &cut_points(input.len(), &picks), max);
            prop_assert_eq!(&pieces, &run_cut(&input, &[], max).0);
            // Per stream, pieces up to a non-split one join into the next unsplit entry.
            for stream in Stream::ALL {
                let want: Vec<&Entry> = whole.iter().flatten().filter(|e| e.stream == stream).collect();
                let mut got = pieces.iter().flatten().filter(|e| e.stream == stream);
                for w in want {
                    let first = got.next().unwrap();
                    prop_assert_eq!(first.timestamp, w.timestamp);
                    let mut content = first.content.clone();
                    let mut last = first;
                    while last.end == End::Split {
                        // At most three bytes short: a cut moved to a character boundary.
                        prop_assert!(last.content.len() <= max && last.content.len() + 3 >= max);
                        last = got.next().unwrap();
                        content.extend_from_slice(&last.content);
                    }
                    prop_assert!(last.content.len() <= max);
                    prop_assert_eq!(&content, &w.content);
                    prop_assert_eq!(last.end, w.end);
                }
                prop_assert!(got.next().is_none());
            }
            let checkpoints: Vec<u64> = pieces
                .iter()
                .map(|e| match e { Ok(e) => e.checkpoint, Err(m) => m.checkpoint })
                .collect();
            prop_assert!(checkpoints.windows(2).all(|w| w[0] <= w[1]));
        }

        #[test]
        fn resuming_at_any_checkpoint_loses_nothing(ops in proptest::collection::vec(op(), 0..16)) {
            let input = render(&ops);
            let (events, _) = run_cut(&input, &[], usize::MAX);
            for (k, event) in events.iter().enumerate() {
                let checkpoint = match event { Ok(e) => e.checkpoint, Err(m) => m.checkpoint };
                let (resumed, _) =
                    run_from(checkpoint, &input[checkpoint as usize..], &[], usize::MAX);
                assert_subsequence(&events[k + 1..], &resumed);
            }
        }

        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            max in 1usize..32,
        ) {
            let _ = parse_line(&bytes);
            let _ = run(&bytes, max);
        }
    }
}
