//! The delivery policy toward one store (Loki push API or OTLP: [`Policy::with_protocol`]
//! picks the body's encoding, the rest is the same), sans-IO: entries in, push bodies out,
//! each push's outcome in, acknowledgements and retry times out. It takes `now` and never
//! touches a socket or a clock, so every branch is tested with a fake clock; the HTTP client
//! ([`crate::push`]) and the caller's loop do the IO.
//!
//! - **Batches.** Entries (labels, original timestamp, line, and the file checkpoint each one
//!   allows to acknowledge) fill an open batch. It is sealed when the next entry would take it
//!   past `delivery.batch_bytes` (its uncompressed protobuf size, estimated) or when it is
//!   `delivery.batch_wait` old. At most one sealed batch exists (being sent or waiting for its
//!   retry) beside the open one: when both are full, [`Policy::push`] refuses the entry and the
//!   caller stops reading, the files being the buffer. Memory per store is thus bounded by two
//!   batches.
//! - **Order.** Sealing sorts each stream's entries by their original timestamp (stable: equal
//!   timestamps keep file order); timestamps are never rewritten. Batches go out one at a time,
//!   in order, so a stream's entries reach the store in timestamp order within a batch and in
//!   read order across batches. Loki since 2.4 accepts an entry older than the newest of its
//!   stream when it is within `max_chunk_age / 2` (1 h) of it, and refuses it with 400
//!   `too_far_behind` beyond; Vali (Loki 2.2.1) refuses any older entry with 400
//!   `entry out of order`. Both are counted as rejections here (`too_far_behind`,
//!   `out_of_order`), never "fixed" by changing the timestamp: the store keeps what the
//!   runtime wrote, and the rare older entry (a stream's older line first read from a rotated
//!   file after a newer one) is visible as a counted, logged rejection.
//! - **Outcomes.** 2xx: the batch's checkpoints may be acknowledged. 400: not retried (Loki has
//!   stored the valid part already, a resend would duplicate it); the reason is parsed from
//!   the body to a bounded label, the entries counted as rejected and the checkpoints
//!   acknowledged: the lines are refused by the store, not lost silently. An OTLP 2xx with a
//!   `partial_success` likewise, counting the records it names as refused. 429, 5xx, any other
//!   status and transport errors: retried with jittered exponential backoff between
//!   `delivery.min_backoff` and `delivery.max_backoff`. That includes 401, 403 and 404,
//!   unlike Promtail (which drops them): they say nothing was stored, and in a seed they are
//!   transient or a config error an operator fixes (a shoot's Vali not created yet, an auth
//!   proxy's token being rotated, a wrong tenant); dropping would lose every line until then.
//!   The outage bound applies to them as to any failure.
//! - **Outage.** An outage starts with the first failed attempt since the last answered one
//!   (2xx or 400). Once it is `delivery.max_outage` long, [`Policy::outage`] says so (a gauge
//!   and a warning for the caller), and the policy applies: `wait` keeps retrying the batch at
//!   the acknowledged position (nothing is dropped by the shipper; lines the kubelet rotates
//!   away meanwhile are the tailer's counted loss); `skip` gives each batch one attempt and
//!   drops it on failure, counted as skipped, its checkpoints acknowledged, so the reader
//!   moves on to the newest lines and a store that comes back gets recent logs first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{Delivery, OutagePolicy, Protocol};
use crate::tail::FileRef;
use crate::{loki, otlp, FastMap};

/// Protobuf bytes counted per entry besides its line (keys, lengths, the timestamp).
const ENTRY_OVERHEAD: usize = 24;
/// Protobuf bytes counted per stream besides its labels.
const STREAM_OVERHEAD: usize = 8;
/// The longest `Retry-After` waited for: a store asking for more is tried again after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// How much of a response body is looked at for a reason, and logged.
pub const MAX_REASON_TEXT: usize = 1024;

/// One log entry for a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The stream's labels as [`loki::format_labels`] writes them.
    pub labels: Arc<str>,
    /// Unix nanoseconds, as the runtime wrote them.
    pub timestamp: i64,
    /// The line.
    pub line: String,
    /// The checkpoint this entry allows to acknowledge once the store accepted it.
    pub ack: Option<Ack>,
}

/// A file offset to acknowledge ([`crate::tail::Tailer::ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The file.
    pub file: FileRef,
    /// The offset.
    pub offset: u64,
}

/// What a push ended in, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response<'a> {
    /// The store answered with this status and (the start of) this body.
    Status(u16, &'a str),
    /// An OTLP store answered 2xx with a `partial_success`: it refused `rejected` records
    /// (0: it took all, with a warning) for the reason in `message`.
    Partial {
        /// Records refused.
        rejected: u64,
        /// Why (`error_message`).
        message: &'a str,
    },
    /// No answer: connect, TLS, write or read failed, or the request timed out.
    Transport(TransportKind),
}

/// Why a push got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// The connection could not be made (refused, unreachable, DNS, TLS handshake).
    Connect,
    /// The request's deadline passed.
    Timeout,
    /// The connection failed while the request was sent or the answer read.
    Io,
}

impl TransportKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Connect => "connect",
            TransportKind::Timeout => "timeout",
            TransportKind::Io => "io",
        }
    }
}

/// Why a push is retried: the metric label of a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryKind {
    /// 429 (`rate_limited`, `per_stream_rate_limit`, `stream_limit`).
    RateLimited,
    /// A 5xx.
    ServerError,
    /// 401 or 403: credentials or tenant.
    Unauthorized,
    /// 404: wrong path, or the store not there yet.
    NotFound,
    /// Any other status that is neither 2xx nor 400 (413 included: see docs/log-shipper.md).
    OtherStatus,
    /// No answer.
    Transport(TransportKind),
}

impl RetryKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryKind::RateLimited => "rate_limited",
            RetryKind::ServerError => "server_error",
            RetryKind::Unauthorized => "unauthorized",
            RetryKind::NotFound => "not_found",
            RetryKind::OtherStatus => "other_status",
            RetryKind::Transport(kind) => kind.as_str(),
        }
    }
}

/// Why a store refused entries with 400, parsed from its body: a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Older than the newest entry of its stream (in-order stores: Vali, Loki < 2.4).
    OutOfOrder,
    /// More than the out-of-order window behind the newest entry of its stream.
    TooFarBehind,
    /// Older than `reject_old_samples_max_age` (`greater_than_max_sample_age`).
    TooOld,
    /// Newer than now plus `creation_grace_period`.
    TooNew,
    /// Over `max_line_size`.
    LineTooLong,
    /// Labels the store does not take (unparsable, missing, too many, too long, duplicate).
    InvalidLabels,
    /// 429's text in a 400 (some proxies): kept apart so that it is visible.
    RateLimited,
    /// Anything else (an unparsable body, a reason this list does not know).
    Other,
}

impl RejectReason {
    /// Every reason, for metrics that start at zero.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::OutOfOrder,
        RejectReason::TooFarBehind,
        RejectReason::TooOld,
        RejectReason::TooNew,
        RejectReason::LineTooLong,
        RejectReason::InvalidLabels,
        RejectReason::RateLimited,
        RejectReason::Other,
    ];

    /// The metric label (Loki's own `reason` names where it has one).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::OutOfOrder => "out_of_order",
            RejectReason::TooFarBehind => "too_far_behind",
            RejectReason::TooOld => "greater_than_max_sample_age",
            RejectReason::TooNew => "too_far_in_future",
            RejectReason::LineTooLong => "line_too_long",
            RejectReason::InvalidLabels => "invalid_labels",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::Other => "other",
        }
    }

    /// The reason of a 400 body: the first of Loki's messages (pkg/validation, chunkenc) it
    /// holds. A body listing several errors counts as its first.
    pub fn parse(body: &str) -> RejectReason {
        let text = body
            .get(..MAX_REASON_TEXT)
            .unwrap_or(body)
            .to_ascii_lowercase();
        const KNOWN: [(&str, RejectReason); 13] = [
            ("out of order", RejectReason::OutOfOrder),
            ("too far behind", RejectReason::TooFarBehind),
            ("timestamp too old", RejectReason::TooOld),
            ("timestamp too new", RejectReason::TooNew),
            ("max entry size", RejectReason::LineTooLong),
            ("line too long", RejectReason::LineTooLong),
            ("error parsing labels", RejectReason::InvalidLabels),
            ("label pair is required", RejectReason::InvalidLabels),
            ("label names; limit", RejectReason::InvalidLabels),
            ("label name too long", RejectReason::InvalidLabels),
            ("label value too long", RejectReason::InvalidLabels),
            ("duplicate label name", RejectReason::InvalidLabels),
            ("rate limit", RejectReason::RateLimited),
        ];
        KNOWN
            .iter()
            .filter_map(|(needle, reason)| text.find(needle).map(|at| (at, *reason)))
            .min_by_key(|(at, _)| *at)
            .map_or(RejectReason::Other, |(_, reason)| reason)
    }
}

/// The uncompressed size an entry adds to a batch (its line and protobuf overhead; the labels
/// are counted once per stream).
pub fn entry_size(item: &Item) -> usize {
    item.line.len() + ENTRY_OVERHEAD
}

/// A stream's labels and its entries (timestamp, line).
type StreamEntries = (Arc<str>, Vec<(i64, String)>);

/// A batch being filled: entries per stream in arrival order.
#[derive(Debug)]
struct Open {
    started: Instant,
    streams: Vec<StreamEntries>,
    index: FastMap<Arc<str>, usize>,
    /// The stream added to last: entries come in runs of one file, whose labels are one
    /// `Arc`, so most lookups end here without hashing the labels.
    last: Option<(Arc<str>, usize)>,
    acks: Acks,
    entries: usize,
    bytes: usize,
}

impl Open {
    fn new(now: Instant) -> Open {
        Open {
            started: now,
            streams: Vec::new(),
            index: FastMap::default(),
            last: None,
            acks: Acks::default(),
            entries: 0,
            bytes: 0,
        }
    }

    /// The index of the stream of `labels`, if the batch has one.
    fn stream_of(&self, labels: &Arc<str>) -> Option<usize> {
        match &self.last {
            Some((last, i)) if Arc::ptr_eq(last, labels) => Some(*i),
            _ => self.index.get(labels).copied(),
        }
    }

    /// What `item` would add.
    fn added(&self, item: &Item) -> usize {
        let stream = if self.stream_of(&item.labels).is_some() {
            0
        } else {
            item.labels.len() + STREAM_OVERHEAD
        };
        entry_size(item) + stream
    }

    fn add(&mut self, item: Item) {
        let i = match self.stream_of(&item.labels) {
            Some(i) => {
                self.bytes += entry_size(&item);
                i
            }
            None => {
                self.bytes += entry_size(&item) + item.labels.len() + STREAM_OVERHEAD;
                self.index.insert(item.labels.clone(), self.streams.len());
                self.streams.push((item.labels.clone(), Vec::new()));
                self.streams.len() - 1
            }
        };
        self.entries += 1;
        if let Some(ack) = item.ack {
            self.acks.add(ack);
        }
        if !self
            .last
            .as_ref()
            .is_some_and(|(last, _)| Arc::ptr_eq(last, &item.labels))
        {
            self.last = Some((item.labels, i));
        }
        self.streams[i].1.push((item.timestamp, item.line));
    }

    /// Sorts each stream by timestamp (stable) and encodes the push body for `protocol`;
    /// `observed` (Unix nanoseconds) is OTLP's observed time.
    fn seal(mut self, protocol: Protocol, observed: i64) -> Result<Sealed, loki::EncodeError> {
        for (_, entries) in &mut self.streams {
            entries.sort_by_key(|(ts, _)| *ts);
        }
        let body = if self.entries == 0 {
            Vec::new()
        } else {
            let entries: Vec<Vec<loki::Entry<'_>>> = self
                .streams
                .iter()
                .map(|(_, es)| {
                    es.iter()
                        .map(|(timestamp, line)| loki::Entry {
                            timestamp: *timestamp,
                            line,
                        })
                        .collect()
                })
                .collect();
            match protocol {
                Protocol::Loki => {
                    let streams: Vec<loki::Stream<'_>> = self
                        .streams
                        .iter()
                        .zip(&entries)
                        .map(|((labels, _), entries)| loki::Stream { labels, entries })
                        .collect();
                    loki::push_body(&streams)?
                }
                Protocol::Otlp => {
                    let attributes: Vec<Vec<(String, String)>> = self
                        .streams
                        .iter()
                        .map(|(labels, _)| otlp::resource_attributes(labels))
                        .collect();
                    let resources: Vec<otlp::Resource<'_>> = attributes
                        .iter()
                        .zip(&entries)
                        .map(|(attributes, entries)| otlp::Resource {
                            attributes,
                            entries,
                        })
                        .collect();
                    let mut body = Vec::new();
                    otlp::encode(&resources, observed, &mut body);
                    body
                }
            }
        };
        Ok(Sealed {
            body: Bytes::from(body),
            acks: self.acks.into_vec(),
            entries: self.entries,
            bytes: self.bytes,
            attempts: 0,
            retry_at: None,
            in_flight: false,
        })
    }
}

/// The last offset per file (offsets of one file only grow).
#[derive(Debug, Default)]
struct Acks(Vec<Ack>);

impl Acks {
    fn add(&mut self, ack: Ack) {
        match self.0.iter_mut().find(|a| a.file == ack.file) {
            Some(a) => a.offset = a.offset.max(ack.offset),
            None => self.0.push(ack),
        }
    }

    fn into_vec(self) -> Vec<Ack> {
        self.0
    }
}

/// A batch encoded, being sent or waiting for a retry.
#[derive(Debug)]
struct Sealed {
    body: Bytes,
    acks: Vec<Ack>,
    entries: usize,
    bytes: usize,
    attempts: u32,
    retry_at: Option<Instant>,
    in_flight: bool,
}

/// A push to make: the body to POST (raw Snappy protobuf for Loki, protobuf for OTLP).
#[derive(Debug, Clone)]
pub struct Request {
    /// The body, shared with the policy (kept for a retry).
    pub body: Bytes,
    /// Entries in it.
    pub entries: usize,
    /// Which attempt this is, from 1.
    pub attempt: u32,
}

/// A batch that is done with: its checkpoints may be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The offsets to acknowledge, one per file.
    pub acks: Vec<Ack>,
    /// Entries in the batch.
    pub entries: usize,
    /// Their uncompressed size.
    pub bytes: usize,
}

/// What [`Policy::on_response`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: stored.
    Accepted(Done),
    /// 400, or an OTLP partial success: refused (maybe only in part), not retried; counted
    /// under `reason`.
    Rejected {
        /// The parsed reason.
        reason: RejectReason,
        /// Entries counted as refused: the whole batch on a 400 (the store does not say which
        /// ones), the count an OTLP `partial_success` names (at most the batch's).
        rejected: usize,
        /// The batch.
        done: Done,
    },
    /// Sent again at `at`.
    Retry {
        /// Why.
        kind: RetryKind,
        /// When.
        at: Instant,
    },
    /// The outage is past `max_outage` under `outage_policy: skip`: dropped, counted.
    Skipped(Done),
}

/// Counters since the policy was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Push requests made.
    pub requests: u64,
    /// Entries accepted (2xx).
    pub accepted_entries: u64,
    /// Their uncompressed bytes.
    pub accepted_bytes: u64,
    /// Retries per kind.
    pub retries: HashMap<RetryKind, u64>,
    /// Entries refused per reason (400, OTLP partial success).
    pub rejected_entries: HashMap<RejectReason, u64>,
    /// Entries dropped under `outage_policy: skip`.
    pub skipped_entries: u64,
    /// Entries refused by [`Policy::push`] (the caller must hold them back).
    pub refused_pushes: u64,
}

/// Why [`Policy::push`] gave an item back.
#[derive(Debug, PartialEq, Eq)]
pub struct Full(pub Item);

/// The delivery policy of one store.
#[derive(Debug)]
pub struct Policy {
    config: Delivery,
    protocol: Protocol,
    /// An instant and the wall clock then (Unix nanoseconds): the observed time of a batch
    /// sealed at `now` is the second plus the time since the first (none: 0, unset).
    clock: Option<(Instant, i64)>,
    open: Option<Open>,
    sealed: Option<Sealed>,
    outage_since: Option<Instant>,
    rng: u64,
    stats: Stats,
}

impl Policy {
    /// A policy with the `delivery:` section's bounds, encoding Loki push requests; `seed`
    /// feeds the backoff jitter (the caller passes something random, tests a constant).
    pub fn new(config: &Delivery, seed: u64) -> Policy {
        Policy {
            config: config.clone(),
            protocol: Protocol::Loki,
            clock: None,
            open: None,
            sealed: None,
            outage_since: None,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            stats: Stats::default(),
        }
    }

    /// The same policy encoding batches for `protocol`. OTLP records carry an observed time:
    /// `unix_nanos` is the wall clock at `now` (the caller reads both clocks once, tests pass
    /// constants), and a batch sealed later is observed that much later.
    pub fn with_protocol(mut self, protocol: Protocol, now: Instant, unix_nanos: i64) -> Policy {
        self.protocol = protocol;
        self.clock = Some((now, unix_nanos));
        self
    }

    /// Adds an entry, or gives it back when both the open batch and the sealed one are full:
    /// the caller keeps it and stops reading until [`Policy::on_response`] makes room.
    pub fn push(&mut self, item: Item, now: Instant) -> Result<(), Full> {
        self.seal_if_due(now);
        let open = self.open.get_or_insert_with(|| Open::new(now));
        if open.entries > 0 && open.bytes + open.added(&item) > self.config.batch_bytes {
            if self.sealed.is_some() {
                self.stats.refused_pushes += 1;
                return Err(Full(item));
            }
            self.seal(now);
            self.open.get_or_insert_with(|| Open::new(now)).add(item);
        } else {
            open.add(item);
        }
        Ok(())
    }

    /// Adds a checkpoint without an entry (a malformed line's): acknowledged with the batch
    /// it joins. Never refused: it costs no batch space.
    pub fn push_ack(&mut self, ack: Ack, now: Instant) {
        self.seal_if_due(now);
        self.open
            .get_or_insert_with(|| Open::new(now))
            .acks
            .add(ack);
    }

    /// Whether [`Policy::push`] would take an entry of `size` bytes now.
    pub fn has_room(&self, size: usize) -> bool {
        self.sealed.is_none()
            || self
                .open
                .as_ref()
                .is_none_or(|o| o.entries == 0 || o.bytes + size <= self.config.batch_bytes)
    }

    /// The next push to make, if one is due: the sealed batch when nothing is in flight and
    /// its retry time (if any) has come, after sealing the open batch if it is old or full
    /// enough. A batch of checkpoints only (no entries) is not sent: it is returned as
    /// accepted by [`Policy::poll_done`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Request> {
        self.seal_if_due(now);
        let sealed = self.sealed.as_mut()?;
        if sealed.in_flight || sealed.entries == 0 || sealed.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        sealed.in_flight = true;
        sealed.attempts += 1;
        self.stats.requests += 1;
        Some(Request {
            body: sealed.body.clone(),
            entries: sealed.entries,
            attempt: sealed.attempts,
        })
    }

    /// A sealed batch of checkpoints only, done without a request.
    pub fn poll_done(&mut self, now: Instant) -> Option<Done> {
        self.seal_if_due(now);
        if self.sealed.as_ref().is_some_and(|s| s.entries == 0) {
            return self.sealed.take().map(done);
        }
        None
    }

    /// The outcome of the push [`Policy::poll_transmit`] gave out.
    pub fn on_response(&mut self, response: Response<'_>, now: Instant) -> Outcome {
        self.on_response_after(response, None, now)
    }

    /// [`Policy::on_response`] with the answer's `Retry-After`, if it had one: a retry then
    /// waits at least that long (at most [`MAX_RETRY_AFTER`]), or the backoff if that is
    /// longer. OTLP/HTTP asks clients to honour it on 429 and 503; it is honoured on any
    /// retried answer.
    pub fn on_response_after(
        &mut self,
        response: Response<'_>,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> Outcome {
        let Some(sealed) = self.sealed.as_mut().filter(|s| s.in_flight) else {
            // A response without a request is a bug of the caller; nothing to settle.
            debug_assert!(false, "a response without a request in flight");
            return Outcome::Retry {
                kind: RetryKind::OtherStatus,
                at: now,
            };
        };
        sealed.in_flight = false;
        let kind = match response {
            Response::Status(code, _) if (200..300).contains(&code) => {
                self.outage_since = None;
                let batch = done(self.sealed.take().expect("checked above"));
                self.stats.accepted_entries += batch.entries as u64;
                self.stats.accepted_bytes += batch.bytes as u64;
                return Outcome::Accepted(batch);
            }
            Response::Status(400, body) => {
                self.outage_since = None;
                let reason = RejectReason::parse(body);
                let batch = done(self.sealed.take().expect("checked above"));
                *self.stats.rejected_entries.entry(reason).or_default() += batch.entries as u64;
                return Outcome::Rejected {
                    reason,
                    rejected: batch.entries,
                    done: batch,
                };
            }
            Response::Partial { rejected, message } => {
                self.outage_since = None;
                let batch = done(self.sealed.take().expect("checked above"));
                let rejected =
                    usize::try_from(rejected).map_or(batch.entries, |r| r.min(batch.entries));
                let accepted = batch.entries - rejected;
                self.stats.accepted_entries += accepted as u64;
                // Which records were refused is not said: their bytes are estimated by count.
                self.stats.accepted_bytes += (batch.bytes as u64).saturating_mul(accepted as u64)
                    / batch.entries.max(1) as u64;
                if rejected == 0 {
                    return Outcome::Accepted(batch);
                }
                let reason = RejectReason::parse(message);
                *self.stats.rejected_entries.entry(reason).or_default() += rejected as u64;
                return Outcome::Rejected {
                    reason,
                    rejected,
                    done: batch,
                };
            }
            Response::Status(429, _) => RetryKind::RateLimited,
            Response::Status(401 | 403, _) => RetryKind::Unauthorized,
            Response::Status(404, _) => RetryKind::NotFound,
            Response::Status(500..=599, _) => RetryKind::ServerError,
            Response::Status(_, _) => RetryKind::OtherStatus,
            Response::Transport(kind) => RetryKind::Transport(kind),
        };
        let since = *self.outage_since.get_or_insert(now);
        let attempts = sealed.attempts;
        if self.config.outage_policy == OutagePolicy::Skip
            && now.saturating_duration_since(since) >= self.config.max_outage
        {
            let batch = done(self.sealed.take().expect("checked above"));
            self.stats.skipped_entries += batch.entries as u64;
            return Outcome::Skipped(batch);
        }
        let mut at = now + self.backoff(attempts);
        if let Some(after) = retry_after {
            at = at.max(now + after.min(MAX_RETRY_AFTER));
        }
        if let Some(sealed) = self.sealed.as_mut() {
            sealed.retry_at = Some(at);
        }
        *self.stats.retries.entry(kind).or_default() += 1;
        Outcome::Retry { kind, at }
    }

    /// When [`Policy::poll_transmit`] (or [`Policy::poll_done`]) may have something new to
    /// say if nothing else happens: a sealed batch is due now or at its retry time, an open one
    /// when its wait ends. `None`: nothing waits on time (empty, or a push is in flight).
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        match &self.sealed {
            Some(s) if s.in_flight => None,
            Some(s) => Some(s.retry_at.unwrap_or(now)),
            None => self
                .open
                .as_ref()
                .filter(|o| o.entries > 0 || !o.acks.0.is_empty())
                .map(|o| o.started + self.config.batch_wait),
        }
    }

    /// How long the store has been failing, once that is `max_outage` or more.
    pub fn outage(&self, now: Instant) -> Option<Duration> {
        let length = now.saturating_duration_since(self.outage_since?);
        (length >= self.config.max_outage).then_some(length)
    }

    /// Whether nothing waits: no entry, no checkpoint, no batch.
    pub fn is_idle(&self) -> bool {
        self.sealed.is_none()
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.entries == 0 && o.acks.0.is_empty())
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Seals the open batch if the sealed slot is free and the batch is due (old enough).
    fn seal_if_due(&mut self, now: Instant) {
        let due = self.open.as_ref().is_some_and(|o| {
            (o.entries > 0 || !o.acks.0.is_empty())
                && now.saturating_duration_since(o.started) >= self.config.batch_wait
        });
        if due && self.sealed.is_none() {
            self.seal(now);
        }
    }

    fn seal(&mut self, now: Instant) {
        let Some(open) = self.open.take() else {
            return;
        };
        let entries = open.entries;
        let observed = self.clock.map_or(0, |(at, wall)| {
            let since = now.saturating_duration_since(at).as_nanos();
            wall.saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
        });
        match open.seal(self.protocol, observed) {
            Ok(sealed) => self.sealed = Some(sealed),
            Err(error) => {
                // Only past Snappy's 4 GiB block limit, far above MAX_BATCH_BYTES: unreachable
                // with a valid config; counted as rejected rather than lost silently.
                tracing::error!(%error, entries, "push body not encodable, batch dropped");
                *self
                    .stats
                    .rejected_entries
                    .entry(RejectReason::Other)
                    .or_default() += entries as u64;
            }
        }
    }

    /// The retry delay after the `attempts`-th failed attempt: `min_backoff * 2^(attempts-1)`
    /// capped at `max_backoff`, then jittered down by at most half, never below `min_backoff`.
    fn backoff(&mut self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let ceiling = self
            .config
            .min_backoff
            .saturating_mul(1u32 << exp.min(31))
            .min(self.config.max_backoff);
        let floor = (ceiling / 2).max(self.config.min_backoff).min(ceiling);
        let span = (ceiling - floor).as_nanos() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.next_random() % (span + 1)
        };
        floor + Duration::from_nanos(jitter)
    }

    /// xorshift64: jitter needs spread, not secrecy.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

fn done(sealed: Sealed) -> Done {
    Done {
        acks: sealed.acks,
        entries: sealed.entries,
        bytes: sealed.bytes,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::checkpoint::FileKey;

    const MS: Duration = Duration::from_millis(1);

    fn config(policy: OutagePolicy) -> Delivery {
        Delivery {
            batch_bytes: 1000,
            batch_wait: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_outage: Duration::from_secs(60),
            outage_policy: policy,
        }
    }

    fn file(ino: u64) -> FileRef {
        FileRef {
            key: FileKey { dev: 1, ino },
            epoch: 0,
        }
    }

    fn item(labels: &str, timestamp: i64, line: &str, ino: u64, offset: u64) -> Item {
        Item {
            labels: labels.into(),
            timestamp,
            line: line.into(),
            ack: Some(Ack {
                file: file(ino),
                offset,
            }),
        }
    }

    /// The body `push_body` makes of these streams, to compare with a request's.
    fn body(streams: &[(&str, &[(i64, &str)])]) -> Vec<u8> {
        let entries: Vec<Vec<loki::Entry<'_>>> = streams
            .iter()
            .map(|(_, es)| {
                es.iter()
                    .map(|&(timestamp, line)| loki::Entry { timestamp, line })
                    .collect()
            })
            .collect();
        let streams: Vec<loki::Stream<'_>> = streams
            .iter()
            .zip(&entries)
            .map(|((labels, _), entries)| loki::Stream { labels, entries })
            .collect();
        loki::push_body(&streams).unwrap()
    }

    /// An OTLP policy encodes its batches as an `ExportLogsServiceRequest`, streams as
    /// resources with Kubernetes attribute names, observed at the wall time of the seal.
    #[test]
    fn otlp_batches_are_export_requests() {
        let t0 = Instant::now();
        let wall = 1_700_000_000_000_000_000;
        let mut p =
            Policy::new(&config(OutagePolicy::Wait), 7).with_protocol(Protocol::Otlp, t0, wall);
        let labels =
            r#"{container_name="c", namespace_name="shoot--p--n", origin="seed", pod_name="p"}"#;
        p.push(item(labels, 9, "late", 1, 10), t0).unwrap();
        p.push(item(labels, 3, "early", 1, 20), t0).unwrap();
        let sealed_at = t0 + Duration::from_millis(1500);
        let request = p.poll_transmit(sealed_at).unwrap();
        let attributes = otlp::resource_attributes(labels);
        assert_eq!(
            attributes[1],
            ("k8s.namespace.name".into(), "shoot--p--n".into())
        );
        let entries = [
            loki::Entry {
                timestamp: 3,
                line: "early",
            },
            loki::Entry {
                timestamp: 9,
                line: "late",
            },
        ];
        let mut want = Vec::new();
        otlp::encode(
            &[otlp::Resource {
                attributes: &attributes,
                entries: &entries,
            }],
            wall + 1_500_000_000,
            &mut want,
        );
        assert_eq!(
            request.body, want,
            "sorted, not Snappy, observed at the seal"
        );
    }

    /// A partial success acknowledges the batch, counts the refused records by the message's
    /// reason and the rest as accepted; one without refusals (a warning) is an acceptance.
    #[test]
    fn otlp_partial_success_counts_what_was_refused() {
        let t0 = Instant::now();
        let mut p = Policy::new(&config(OutagePolicy::Wait), 7);
        for i in 0..4 {
            p.push(item("{a=\"1\"}", i, "x", 1, 10 + i as u64), t0)
                .unwrap();
        }
        let now = t0 + Duration::from_secs(2);
        p.poll_transmit(now).unwrap();
        let Outcome::Rejected {
            reason,
            rejected,
            done,
        } = p.on_response(
            Response::Partial {
                rejected: 3,
                message: "timestamp too old",
            },
            now,
        )
        else {
            panic!("a partial success with refusals is a rejection")
        };
        assert_eq!(
            (reason, rejected, done.entries),
            (RejectReason::TooOld, 3, 4)
        );
        assert_eq!(done.acks.len(), 1);
        assert_eq!(p.stats().accepted_entries, 1);
        assert_eq!(p.stats().rejected_entries[&RejectReason::TooOld], 3);
        // More refused than sent: the batch, no more.
        p.push(item("{a=\"1\"}", 9, "y", 1, 30), now).unwrap();
        let later = now + Duration::from_secs(2);
        p.poll_transmit(later).unwrap();
        let Outcome::Rejected { rejected, .. } = p.on_response(
            Response::Partial {
                rejected: 1000,
                message: "",
            },
            later,
        ) else {
            panic!()
        };
        assert_eq!(rejected, 1);
        assert_eq!(p.stats().rejected_entries[&RejectReason::Other], 1);
        p.push(item("{a=\"1\"}", 10, "z", 1, 40), later).unwrap();
        let last = later + Duration::from_secs(2);
        p.poll_transmit(last).unwrap();
        assert!(matches!(
            p.on_response(
                Response::Partial {
                    rejected: 0,
                    message: "a warning"
                },
                last
            ),
            Outcome::Accepted(Done { entries: 1, .. })
        ));
        assert_eq!(p.stats().accepted_entries, 2);
        assert!(p.is_idle());
    }

    #[test]
    fn retry_after_is_waited_for_within_its_bound() {
        let t0 = Instant::now();
        for (after, want) in [
            (Some(Duration::from_secs(3)), Some(Duration::from_secs(3))),
            (Some(Duration::from_secs(3600)), Some(MAX_RETRY_AFTER)),
            // Shorter than the backoff (500 ms at first): the backoff.
            (Some(Duration::ZERO), None),
            (None, None),
        ] {
            let mut p = sent(OutagePolicy::Wait, t0);
            let Outcome::Retry { at, .. } =
                p.on_response_after(Response::Status(429, ""), after, t0)
            else {
                panic!("retried")
            };
            match want {
                Some(want) => assert_eq!(at - t0, want),
                None => assert_eq!(at - t0, Duration::from_millis(500)),
            }
            assert_eq!(p.next_wakeup(t0), Some(at));
        }
    }

    /// A policy with one batch sent (one entry), at `t0`.
    fn sent(policy: OutagePolicy, t0: Instant) -> Policy {
        let mut p = Policy::new(&config(policy), 7);
        p.push(item("{a=\"1\"}", 5, "x", 1, 10), t0).unwrap();
        assert!(p.poll_transmit(t0).is_none(), "not before batch_wait");
        assert_eq!(p.next_wakeup(t0), Some(t0 + Duration::from_secs(1)));
        let r = p.poll_transmit(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((r.entries, r.attempt), (1, 1));
        assert_eq!(p.next_wakeup(t0), None, "in flight: the answer wakes");
        p
    }

    #[test]
    fn a_batch_waits_for_batch_wait_then_goes_and_its_acks_come_back() {
        let t0 = Instant::now();
        let mut p = sent(OutagePolicy::Wait, t0);
        assert!(
            p.poll_transmit(t0 + Duration::from_secs(5)).is_none(),
            "one in flight"
        );
        let out = p.on_response(Response::Status(204, ""), t0 + Duration::from_secs(1));
        assert_eq!(
            out,
            Outcome::Accepted(Done {
                acks: vec![Ack {
                    file: file(1),
                    offset: 10
                }],
                entries: 1,
                bytes: 1 + ENTRY_OVERHEAD + 7 + STREAM_OVERHEAD,
            })
        );
        assert!(p.is_idle());
        assert_eq!(p.next_wakeup(t0), None);
        assert_eq!(p.stats().accepted_entries, 1);
        assert_eq!(p.stats().requests, 1);
    }

    #[test]
    fn every_2xx_acknowledges() {
        for code in [200, 201, 204, 260, 299] {
            let t0 = Instant::now();
            let mut p = sent(OutagePolicy::Wait, t0);
            assert!(matches!(
                p.on_response(Response::Status(code, ""), t0),
                Outcome::Accepted(_)
            ));
        }
    }

    #[test]
    fn batch_bytes_seals_a_batch_and_two_full_batches_refuse_more() {
        let t0 = Instant::now();
        let mut p = Policy::new(&config(OutagePolicy::Wait), 7);
        let line = "x".repeat(200 - ENTRY_OVERHEAD);
        // 4 entries of 200 bytes + the stream's labels fit in 1000; the fifth does not.
        for i in 0..4 {
            p.push(item("{a=\"1\"}", i, &line, 1, i as u64 + 1), t0)
                .unwrap();
        }
        assert!(p.poll_transmit(t0).is_none(), "not full, not old");
        assert!(p.has_room(200));
        p.push(item("{a=\"1\"}", 4, &line, 1, 5), t0).unwrap();
        // Sealed at once: the first four go now.
        let r = p.poll_transmit(t0).unwrap();
        assert_eq!(r.entries, 4);
        for i in 5..8 {
            p.push(item("{a=\"1\"}", i, &line, 1, i as u64 + 1), t0)
                .unwrap();
        }
        assert!(!p.has_room(200));
        let refused = p.push(item("{a=\"1\"}", 8, &line, 1, 9), t0).unwrap_err();
        assert_eq!(refused.0.timestamp, 8);
        assert_eq!(p.stats().refused_pushes, 1);
        // Once the first batch is answered, the open one seals when pushed past its size.
        let Outcome::Accepted(done) = p.on_response(Response::Status(204, ""), t0) else {
            panic!()
        };
        assert_eq!(done.acks[0].offset, 4);
        assert!(p.has_room(200));
        p.push(refused.0, t0).unwrap();
        let r = p.poll_transmit(t0).unwrap();
        assert_eq!(r.entries, 4);
        let Outcome::Accepted(done) = p.on_response(Response::Status(204, ""), t0) else {
            panic!()
        };
        assert_eq!(done.acks[0].offset, 8);
        // The last entry, alone, waits for batch_wait.
        assert!(p.poll_transmit(t0).is_none());
        let r = p.poll_transmit(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(r.entries, 1);
    }

    #[test]
    fn entries_of_a_stream_are_sorted_by_their_original_timestamp() {
        let t0 = Instant::now();
        let mut p = Policy::new(&config(OutagePolicy::Wait), 7);
        for (labels, ts, line, ino, off) in [
            ("{s=\"a\"}", 30, "a3", 1, 1),
            ("{s=\"b\"}", 10, "b1", 2, 1),
            ("{s=\"a\"}", 10, "a1", 1, 2),
            ("{s=\"a\"}", 20, "a2-first", 1, 3),
            ("{s=\"a\"}", 20, "a2-second", 1, 4),
            ("{s=\"b\"}", -5, "b0", 2, 2),
        ] {
            p.push(item(labels, ts, line, ino, off), t0).unwrap();
        }
        let r = p.poll_transmit(t0 + Duration::from_secs(1)).unwrap();
        let want = body(&[
            (
                "{s=\"a\"}",
                &[(10, "a1"), (20, "a2-first"), (20, "a2-second"), (30, "a3")],
            ),
            ("{s=\"b\"}", &[(-5, "b0"), (10, "b1")]),
        ]);
        assert_eq!(
            *r.body, want,
            "sorted per stream, equal timestamps in file order"
        );
        let Outcome::Accepted(done) = p.on_response(Response::Status(204, ""), t0) else {
            panic!()
        };
        assert_eq!(
            done.acks,
            vec![
                Ack {
                    file: file(1),
                    offset: 4
                },
                Ack {
                    file: file(2),
                    offset: 2
                }
            ]
        );
    }

    #[test]
    fn a_400_is_not_retried_and_counted_by_reason() {
        for (text, reason) in [
            (
                "entry with timestamp 2026-12-06 08:00:00 +0000 UTC ignored, reason: 'entry out of order' for stream: {a=\"1\"},",
                RejectReason::OutOfOrder,
            ),
            (
                "entry with timestamp 2026-12-06 06:00:00 ignored, reason: 'entry too far behind, entry timestamp is: ..., oldest acceptable timestamp is: ...'",
                RejectReason::TooFarBehind,
            ),
            (
                "entry for stream '{a=\"1\"}' has timestamp too old: 2026-01-01, oldest acceptable timestamp is: 2026-11-29",
                RejectReason::TooOld,
            ),
            ("entry for stream '{a=\"1\"}' has timestamp too new: 2027-01-01", RejectReason::TooNew),
            (
                "Max entry size '262144' bytes exceeded for stream '{a=\"1\"}' while adding an entry with length '300000' bytes",
                RejectReason::LineTooLong,
            ),
            (
                "Error parsing labels '{ab\"' with error: 1:4: parse error: unterminated quoted string",
                RejectReason::InvalidLabels,
            ),
            ("error at least one label pair is required per stream", RejectReason::InvalidLabels),
            ("entry for stream '{a=\"1\"}' has 16 label names; limit 15", RejectReason::InvalidLabels),
            ("stream '{a=\"1\"}' has duplicate label name: 'a'", RejectReason::InvalidLabels),
            (
                "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)",
                RejectReason::RateLimited,
            ),
            ("cannot parse request body: snappy: corrupt input", RejectReason::Other),
            ("", RejectReason::Other),
            // Two errors: the first counts.
            (
                "2 errors like: Max entry size '1' bytes exceeded; entry out of order",
                RejectReason::LineTooLong,
            ),
        ] {
            let t0 = Instant::now();
            let mut p = sent(OutagePolicy::Wait, t0);
            let out = p.on_response(Response::Status(400, text), t0);
            let Outcome::Rejected { reason: got, done, .. } = out else {
                panic!("{text}: {out:?}")
            };
            assert_eq!(got, reason, "{text}");
            assert_eq!(done.acks[0].offset, 10, "the rejected lines' checkpoint is acknowledged");
            assert_eq!(p.stats().rejected_entries.get(&reason), Some(&1));
            assert!(p.is_idle(), "not retried");
            assert!(p.poll_transmit(t0 + Duration::from_secs(100)).is_none());
        }
    }

    #[test]
    fn retryable_answers_are_retried_with_growing_jittered_backoff() {
        for (response, kind) in [
            (
                Response::Status(429, "Ingestion rate limit exceeded"),
                RetryKind::RateLimited,
            ),
            (Response::Status(500, ""), RetryKind::ServerError),
            (
                Response::Status(503, "circuit breaker open"),
                RetryKind::ServerError,
            ),
            (Response::Status(401, "no org id"), RetryKind::Unauthorized),
            (Response::Status(403, ""), RetryKind::Unauthorized),
            (Response::Status(404, ""), RetryKind::NotFound),
            (Response::Status(413, ""), RetryKind::OtherStatus),
            (Response::Status(302, ""), RetryKind::OtherStatus),
            (
                Response::Transport(TransportKind::Connect),
                RetryKind::Transport(TransportKind::Connect),
            ),
            (
                Response::Transport(TransportKind::Timeout),
                RetryKind::Transport(TransportKind::Timeout),
            ),
            (
                Response::Transport(TransportKind::Io),
                RetryKind::Transport(TransportKind::Io),
            ),
        ] {
            let t0 = Instant::now();
            let mut p = sent(OutagePolicy::Wait, t0);
            let mut now = t0;
            // min 500 ms, doubling, capped at 8 s; jittered in [max(min, ceiling / 2), ceiling].
            for (attempt, ceiling) in [500u64, 1000, 2000, 4000, 8000, 8000, 8000]
                .iter()
                .enumerate()
            {
                let Outcome::Retry { kind: got, at } = p.on_response(response, now) else {
                    panic!("{response:?}")
                };
                assert_eq!(got, kind);
                let delay = at - now;
                let floor = (ceiling / 2).max(500);
                assert!(
                    delay >= Duration::from_millis(floor)
                        && delay <= Duration::from_millis(*ceiling),
                    "attempt {attempt}: {delay:?} not within {floor}..={ceiling} ms"
                );
                assert_eq!(p.next_wakeup(now), Some(at));
                assert!(p.poll_transmit(at - MS).is_none(), "not before its time");
                now = at;
                let r = p.poll_transmit(now).unwrap();
                assert_eq!(r.attempt, attempt as u32 + 2);
            }
            assert_eq!(p.stats().retries.get(&kind), Some(&7));
            assert!(
                p.outage(now).is_none(),
                "{:?} is shorter than max_outage",
                now - t0
            );
            // A success ends it all.
            assert!(matches!(
                p.on_response(Response::Status(204, ""), now),
                Outcome::Accepted(_)
            ));
            assert!(p.is_idle());
        }
    }

    #[test]
    fn jitter_spreads_retries() {
        let t0 = Instant::now();
        let delays: std::collections::HashSet<Duration> = (0..20)
            .map(|seed| {
                let mut p = Policy::new(&config(OutagePolicy::Wait), seed);
                p.push(item("{a=\"1\"}", 5, "x", 1, 10), t0).unwrap();
                let mut now = t0 + Duration::from_secs(1);
                for _ in 0..4 {
                    p.poll_transmit(now).unwrap();
                    let Outcome::Retry { at, .. } =
                        p.on_response(Response::Transport(TransportKind::Connect), now)
                    else {
                        panic!()
                    };
                    now = at;
                }
                now - t0
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn outage_wait_keeps_retrying_past_max_outage() {
        let t0 = Instant::now();
        let mut p = sent(OutagePolicy::Wait, t0);
        let mut now = t0;
        while now < t0 + Duration::from_secs(120) {
            let Outcome::Retry { at, .. } = p.on_response(Response::Status(503, ""), now) else {
                panic!()
            };
            now = at;
            p.poll_transmit(now).unwrap();
        }
        assert!(p.outage(now).unwrap() >= Duration::from_secs(60));
        // New entries still fill the open batch, then the reader is held back.
        let line = "y".repeat(400);
        let mut refused = 0;
        for i in 0..5 {
            if p.push(item("{a=\"1\"}", i, &line, 1, 20 + i as u64), now)
                .is_err()
            {
                refused += 1;
            }
        }
        assert_eq!(refused, 3);
        // The store comes back: the outage ends, the held batch goes next.
        assert!(matches!(
            p.on_response(Response::Status(204, ""), now),
            Outcome::Accepted(_)
        ));
        assert!(p.outage(now).is_none());
        assert_eq!(
            p.poll_transmit(now + Duration::from_secs(1))
                .unwrap()
                .entries,
            2
        );
    }

    #[test]
    fn outage_skip_drops_batches_once_past_max_outage_and_counts_them() {
        let t0 = Instant::now();
        let mut p = sent(OutagePolicy::Skip, t0);
        let mut now = t0;
        let skipped = loop {
            match p.on_response(Response::Transport(TransportKind::Connect), now) {
                Outcome::Retry { at, .. } => {
                    assert!(at - t0 <= Duration::from_secs(60 + 8));
                    now = at;
                    p.poll_transmit(now).unwrap();
                }
                Outcome::Skipped(done) => break done,
                other => panic!("{other:?}"),
            }
        };
        assert!(now - t0 >= Duration::from_secs(60));
        assert_eq!(
            skipped.acks[0].offset, 10,
            "acknowledged: the reader moves on"
        );
        assert_eq!(p.stats().skipped_entries, 1);
        // The next batch gets one attempt while the outage lasts, then is dropped too.
        p.push(item("{a=\"1\"}", 6, "z", 1, 11), now).unwrap();
        now += Duration::from_secs(1);
        assert_eq!(p.poll_transmit(now).unwrap().attempt, 1);
        assert!(matches!(
            p.on_response(Response::Status(502, ""), now),
            Outcome::Skipped(_)
        ));
        // A success ends the outage: the next failure is retried again.
        p.push(item("{a=\"1\"}", 7, "w", 1, 12), now).unwrap();
        now += Duration::from_secs(1);
        p.poll_transmit(now).unwrap();
        assert!(matches!(
            p.on_response(Response::Status(204, ""), now),
            Outcome::Accepted(_)
        ));
        p.push(item("{a=\"1\"}", 8, "v", 1, 13), now).unwrap();
        now += Duration::from_secs(1);
        p.poll_transmit(now).unwrap();
        assert!(matches!(
            p.on_response(Response::Status(502, ""), now),
            Outcome::Retry { .. }
        ));
        // A 400 ends an outage too (the store answered).
        let mut q = sent(OutagePolicy::Skip, t0);
        q.on_response(Response::Status(503, ""), t0);
        q.poll_transmit(t0 + Duration::from_secs(30)).unwrap();
        q.on_response(Response::Status(400, "bad"), t0 + Duration::from_secs(30));
        q.push(
            item("{a=\"1\"}", 8, "v", 1, 13),
            t0 + Duration::from_secs(30),
        )
        .unwrap();
        q.poll_transmit(t0 + Duration::from_secs(70)).unwrap();
        assert!(matches!(
            q.on_response(Response::Status(503, ""), t0 + Duration::from_secs(70)),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn checkpoints_without_entries_are_done_without_a_request() {
        let t0 = Instant::now();
        let mut p = Policy::new(&config(OutagePolicy::Wait), 7);
        p.push_ack(
            Ack {
                file: file(3),
                offset: 99,
            },
            t0,
        );
        assert!(!p.is_idle());
        assert_eq!(p.next_wakeup(t0), Some(t0 + Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(1);
        assert!(p.poll_transmit(later).is_none());
        let done = p.poll_done(later).unwrap();
        assert_eq!((done.acks[0].offset, done.entries), (99, 0));
        assert!(p.is_idle());
        // Joined to a batch with entries, it is acknowledged with it.
        p.push(item("{a=\"1\"}", 1, "x", 1, 5), later).unwrap();
        p.push_ack(
            Ack {
                file: file(3),
                offset: 120,
            },
            later,
        );
        assert!(p.poll_done(later + Duration::from_secs(1)).is_none());
        p.poll_transmit(later + Duration::from_secs(1)).unwrap();
        let Outcome::Accepted(done) = p.on_response(Response::Status(204, ""), later) else {
            panic!()
        };
        assert_eq!(done.acks.len(), 2);
        assert_eq!(done.acks[1].offset, 120);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// An entry of stream `0..3` (file = stream), timestamp, line length.
            Push(usize, i64, usize),
            /// A malformed line's checkpoint of file `0..3`.
            PushAck(usize),
            /// Time passes.
            Advance(u64),
            /// The push in flight is answered.
            Answer(u16),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..3usize, 0..40i64, 0..300usize).prop_map(|(s, t, l)| Op::Push(s, t, l)),
                1 => (0..3usize).prop_map(Op::PushAck),
                2 => (0..1500u64).prop_map(Op::Advance),
                3 => prop::sample::select(vec![204u16, 204, 400, 429, 503, 0]).prop_map(Op::Answer),
            ]
        }

        /// The push request of a body.
        fn decode(body: &Bytes) -> loki::tests::Decoded {
            loki::tests::decode(&snap::raw::Decoder::new().decompress_vec(body).unwrap())
        }

        /// Entries of stream `s` carry their sequence number in the line: `s:seq:padding`.
        fn seq(line: &str) -> (usize, u64) {
            let mut parts = line.split(':');
            let s = parts.next().unwrap().parse().unwrap();
            (s, parts.next().unwrap().parse().unwrap())
        }

        proptest! {
            /// Whatever the answers and the timing: acknowledgements of a file only move
            /// forward and never past what was pushed; each stream's entries are in timestamp
            /// order within a request; a retry resends the same body; every pushed entry is
            /// settled exactly once (accepted, rejected or skipped), in read order across
            /// batches; a refusal happens only with two full batches.
            #[test]
            fn policy_invariants(ops in prop::collection::vec(op(), 1..200), skip in any::<bool>()) {
                let mut cfg = config(if skip { OutagePolicy::Skip } else { OutagePolicy::Wait });
                cfg.max_outage = Duration::from_secs(5);
                let mut p = Policy::new(&cfg, 11);
                let mut now = Instant::now();
                let labels = ["{s=\"0\"}", "{s=\"1\"}", "{s=\"2\"}"];
                let mut offsets = [0u64; 3];
                let mut next_seq = [0u64; 3];
                let mut acked = [0u64; 3];
                let mut settled: [Vec<u64>; 3] = Default::default();
                let mut in_flight: Option<Request> = None;
                let mut last_body: Option<Bytes> = None;
                let mut settled_entries = 0usize;
                let mut pushed = 0usize;
                let settle = |done: &Done, last_body: &mut Option<Bytes>, acked: &mut [u64; 3]| {
                    for a in &done.acks {
                        let f = a.file.key.ino as usize;
                        assert!(a.offset > acked[f], "ack of file {f} moved back");
                        acked[f] = a.offset;
                    }
                    *last_body = None;
                    done.entries
                };
                let ops = ops.into_iter().chain(std::iter::repeat_n(Op::Answer(204), 400));
                for op in ops {
                    // What is due now goes first (also after a `continue`).
                    if let Some(done) = p.poll_done(now) {
                        assert_eq!(done.entries, 0);
                        settle(&done, &mut last_body, &mut acked);
                    }
                    if in_flight.is_none() {
                        if let Some(request) = p.poll_transmit(now) {
                            if let Some(previous) = &last_body {
                                assert_eq!(&request.body, previous, "a retry resends the same body");
                                assert!(request.attempt > 1);
                            }
                            // Per stream in timestamp order.
                            let decoded = decode(&request.body);
                            assert_eq!(decoded.iter().map(|(_, e)| e.len()).sum::<usize>(), request.entries);
                            for (_, entries) in &decoded {
                                let ts: Vec<(i64, i32)> = entries.iter().map(|(s, n, _)| (*s, *n)).collect();
                                assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
                            }
                            in_flight = Some(request);
                        }
                    }
                    match op {
                        Op::Push(s, ts, len) => {
                            offsets[s] += 1;
                            let line = format!("{s}:{}:{}", next_seq[s], "x".repeat(len));
                            let it = Item {
                                labels: labels[s].into(),
                                timestamp: ts,
                                line,
                                ack: Some(Ack { file: file(s as u64), offset: offsets[s] }),
                            };
                            let had_room = p.has_room(entry_size(&it) + labels[s].len() + STREAM_OVERHEAD);
                            match p.push(it, now) {
                                Ok(()) => {
                                    next_seq[s] += 1;
                                    pushed += 1;
                                }
                                Err(Full(_)) => {
                                    assert!(!had_room || p.sealed.is_some());
                                    assert!(p.sealed.is_some(), "refused with a free slot");
                                    offsets[s] -= 1;
                                }
                            }
                        }
                        Op::PushAck(f) => {
                            offsets[f] += 1;
                            p.push_ack(Ack { file: file(f as u64), offset: offsets[f] }, now);
                        }
                        Op::Advance(ms) => now += Duration::from_millis(ms),
                        Op::Answer(code) => {
                            let Some(request) = in_flight.take() else {
                                // Nothing in flight: let time reach the next wake-up.
                                if let Some(at) = p.next_wakeup(now) {
                                    now = now.max(at);
                                }
                                continue;
                            };
                            let response = if code == 0 {
                                Response::Transport(TransportKind::Connect)
                            } else {
                                Response::Status(code, "entry out of order")
                            };
                            let done = match p.on_response(response, now) {
                                Outcome::Retry { at, .. } => {
                                    assert!(at > now);
                                    last_body = Some(request.body.clone());
                                    None
                                }
                                Outcome::Accepted(d) | Outcome::Skipped(d) => Some(d),
                                Outcome::Rejected { done, .. } => Some(done),
                            };
                            if let Some(done) = done {
                                assert_eq!(done.entries, request.entries);
                                settled_entries += settle(&done, &mut last_body, &mut acked);
                                for (labels, entries) in decode(&request.body) {
                                    let s: usize = labels[4..5].parse().unwrap();
                                    for (_, _, line) in entries {
                                        let (s2, n) = seq(&line);
                                        assert_eq!(s, s2);
                                        settled[s].push(n);
                                    }
                                }
                            }
                        }
                    }
                }
                prop_assert!(p.is_idle(), "drained");
                prop_assert_eq!(settled_entries, pushed);
                prop_assert_eq!(acked, offsets);
                for (s, seqs) in settled.iter_mut().enumerate() {
                    // Each batch is a contiguous run of the stream's entries, in read order.
                    let mut sorted = seqs.clone();
                    sorted.sort_unstable();
                    prop_assert_eq!(sorted, (0..next_seq[s]).collect::<Vec<_>>());
                }
            }
        }
    }
}
