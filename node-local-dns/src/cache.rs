//! The cache policy, sans-IO: every call takes `now`, nothing here touches a socket or a clock.
//!
//! Like CoreDNS's `cache` plugin it keeps two bounded caches, `success` (answers) and `denial`
//! (NXDOMAIN, NODATA and briefly SERVFAIL), with TTL caps and floors per cache; negative TTLs
//! come from the SOA (RFC 2308 §5); expired entries may be served stale (RFC 8767) while a
//! refresh runs; hot entries are prefetched before they expire. Unlike CoreDNS, eviction is
//! not random: each cache is a SIEVE queue (a FIFO with a "visited" bit and a moving hand), which
//! keeps entries that are hit and lets one-hit wonders go first.
//!
//! Entries are keyed like CoreDNS's (lower-cased qname, qtype, qclass, DO, CD) and hold the
//! response as a [`WireImage`], so a hit is a copy and a few patches. Every insert and removal
//! is also queued as an [`Event`], for the in-kernel fast path to mirror hot entries into a BPF
//! map; the queue is bounded and says so when the mirror must resynchronise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::{self, Query, ResponseInfo, WireImage};

/// CoreDNS's default capacity per cache (256 shards × 39).
pub const DEFAULT_CAPACITY: usize = 9984;
/// CoreDNS's default maximum TTL of answers.
pub const DEFAULT_SUCCESS_MAX_TTL: Duration = Duration::from_secs(3600);
/// CoreDNS's default maximum TTL of negative answers.
pub const DEFAULT_DENIAL_MAX_TTL: Duration = Duration::from_secs(1800);
/// CoreDNS's default minimum TTL of both.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(5);
/// CoreDNS's default time SERVFAIL answers are cached.
pub const DEFAULT_SERVFAIL_TTL: Duration = Duration::from_secs(5);
/// RFC 8767 §4: stale answers carry a TTL above zero, 30 s recommended.
pub const DEFAULT_STALE_TTL: u32 = 30;
/// RFC 8767 §4: after a failed refresh, wait before trying the upstream again (30 s).
pub const DEFAULT_FAILURE_RECHECK: Duration = Duration::from_secs(30);
/// Events kept for the kernel mirror before it must resynchronise.
pub const EVENT_QUEUE_CAPACITY: usize = 4096;

/// The longest key: a 255-byte qname (RFC 1035 §3.1), qtype, qclass and the flags byte.
pub const MAX_KEY_LEN: usize = 255 + 5;

/// The cache key, owned (what the cache stores): lower-cased qname (wire form), qtype,
/// qclass, and the DO and CD bits. Lookups take the bytes of a [`KeyBuf`], so the hit path
/// builds its key on the stack and allocates nothing; only a stored entry, a flight and an
/// event own one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(Box<[u8]>);

impl Key {
    /// The key of a query.
    pub fn of(query: &Query<'_>) -> Key {
        KeyBuf::of(query).to_key()
    }

    /// The key's bytes (what a kernel mirror hashes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The owned key of bytes that came from a [`KeyBuf`] or a [`Key`].
    pub(crate) fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.into())
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A key built on the stack, the same bytes as [`Key::of`].
#[derive(Clone)]
pub struct KeyBuf {
    len: usize,
    bytes: [u8; MAX_KEY_LEN],
}

impl std::fmt::Debug for KeyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KeyBuf").field(&self.as_bytes()).finish()
    }
}

impl KeyBuf {
    /// The key of a query. A parsed query's qname is at most 255 bytes; a longer one (which
    /// the parser refuses) would be cut, never overrun.
    pub fn of(query: &Query<'_>) -> KeyBuf {
        let qname = query.qname();
        let name_len = qname.len().min(MAX_KEY_LEN - 5);
        let mut bytes = [0u8; MAX_KEY_LEN];
        for (to, from) in bytes.iter_mut().zip(&qname[..name_len]) {
            *to = from.to_ascii_lowercase();
        }
        let dnssec_ok = query.edns.is_some_and(|e| e.dnssec_ok);
        let tail = &mut bytes[name_len..name_len + 5];
        tail[..2].copy_from_slice(&query.qtype.to_be_bytes());
        tail[2..4].copy_from_slice(&query.qclass.to_be_bytes());
        tail[4] = u8::from(dnssec_ok) | (u8::from(query.checking_disabled) << 1);
        KeyBuf {
            len: name_len + 5,
            bytes,
        }
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The owned key, for storing.
    pub fn to_key(&self) -> Key {
        Key(self.as_bytes().into())
    }
}

impl AsRef<[u8]> for KeyBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Which of the two caches an entry lives in (the `type` label of CoreDNS's cache metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Positive answers.
    Success,
    /// NXDOMAIN, NODATA and SERVFAIL.
    Denial,
}

impl Kind {
    /// The metric label: `success` or `denial`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Success => "success",
            Kind::Denial => "denial",
        }
    }
}

/// Limits of one of the two caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries kept at most.
    pub capacity: usize,
    /// TTLs above this are lowered to it.
    pub max_ttl: Duration,
    /// TTLs below this are raised to it.
    pub min_ttl: Duration,
}

/// Prefetch: an entry hit `amount` times with no gap of `window` or more is refreshed once
/// its remaining TTL is at most `percentage` % of the TTL it was stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetch {
    /// Hits needed.
    pub amount: u32,
    /// A gap this long resets the hit count.
    pub window: Duration,
    /// Remaining share of the TTL that triggers the refresh, 1..=100.
    pub percentage: u8,
}

/// How stale answers are used (RFC 8767).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleMode {
    /// Answer stale at once and refresh in the background.
    Immediate,
    /// Ask the upstream first; answer stale only if that fails.
    Verify,
}

/// Serve-stale settings (RFC 8767).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeStale {
    /// How long past expiry an entry may still be served.
    pub max_stale: Duration,
    /// The TTL of stale answers, in seconds.
    pub ttl: u32,
    /// Immediate or verify.
    pub mode: StaleMode,
    /// After a failed refresh, how long before the upstream is asked again.
    pub failure_recheck: Duration,
}

/// The policy of one cache block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The positive cache.
    pub success: Limits,
    /// The negative cache.
    pub denial: Limits,
    /// How long SERVFAIL is cached; zero: not at all.
    pub servfail_ttl: Duration,
    /// Prefetch, if on.
    pub prefetch: Option<Prefetch>,
    /// Serve-stale, if on.
    pub serve_stale: Option<ServeStale>,
}

impl Default for Policy {
    /// CoreDNS's `cache` defaults.
    fn default() -> Self {
        Policy {
            success: Limits {
                capacity: DEFAULT_CAPACITY,
                max_ttl: DEFAULT_SUCCESS_MAX_TTL,
                min_ttl: DEFAULT_MIN_TTL,
            },
            denial: Limits {
                capacity: DEFAULT_CAPACITY,
                max_ttl: DEFAULT_DENIAL_MAX_TTL,
                min_ttl: DEFAULT_MIN_TTL,
            },
            servfail_ttl: DEFAULT_SERVFAIL_TTL,
            prefetch: None,
            serve_stale: None,
        }
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A live entry: answer with `ttl`. With `prefetch`, the caller should refresh it in the
    /// background now (said once per entry).
    Hit {
        /// The stored response.
        image: Arc<WireImage>,
        /// Remaining lifetime in seconds.
        ttl: u32,
        /// Refresh it in the background.
        prefetch: bool,
        /// Which cache.
        kind: Kind,
    },
    /// An expired entry within the serve-stale window (immediate mode): answer with `ttl`.
    /// With `refresh`, the caller should refresh it in the background (said once per attempt,
    /// and not again before the failure-recheck time after a failed one).
    Stale {
        /// The stored response.
        image: Arc<WireImage>,
        /// The stale TTL.
        ttl: u32,
        /// Refresh it in the background.
        refresh: bool,
    },
    /// Nothing usable: ask the upstream. In verify mode an expired entry may still be
    /// answered if that fails ([`Cache::stale_on_failure`]).
    Miss,
}

/// What [`Cache::insert`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Which cache.
    pub kind: Kind,
    /// The stored response.
    pub image: Arc<WireImage>,
    /// Its TTL after the caps and floors, in seconds.
    pub ttl: u32,
}

/// A change for the kernel mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `key` now answers with `image` until `expires` (plus the stale window, if any).
    Inserted {
        /// The key.
        key: Key,
        /// The stored response.
        image: Arc<WireImage>,
        /// When it expires.
        expires: Instant,
    },
    /// `key` is gone (evicted, expired past the stale window, or replaced by a negative).
    Removed {
        /// The key.
        key: Key,
    },
}

#[derive(Debug)]
struct Entry {
    image: Arc<WireImage>,
    stored: Instant,
    ttl: Duration,
    hits: u32,
    last_hit: Instant,
    /// A background refresh is running (prefetch or stale refresh).
    refreshing: bool,
    /// No refresh before this (RFC 8767 failure recheck).
    recheck_after: Instant,
}

impl Entry {
    fn expires(&self) -> Instant {
        self.stored + self.ttl
    }
}

/// One bounded cache: a map into a slab of nodes linked in SIEVE order (head = newest).
#[derive(Debug)]
struct Sieve {
    index: HashMap<Key, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    hand: u32,
    limits: Limits,
}

#[derive(Debug)]
struct Node {
    key: Option<Key>,
    entry: Option<Entry>,
    visited: bool,
    prev: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;

impl Sieve {
    fn new(limits: Limits) -> Self {
        Sieve {
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            hand: NIL,
            limits,
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn get_mut(&mut self, key: &[u8]) -> Option<&mut Entry> {
        let i = *self.index.get(key)? as usize;
        let node = &mut self.nodes[i];
        node.visited = true;
        node.entry.as_mut()
    }

    fn peek(&self, key: &[u8]) -> Option<&Entry> {
        let i = *self.index.get(key)? as usize;
        self.nodes[i].entry.as_ref()
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let i = self.index.remove(key)?;
        self.unlink(i)
    }

    /// Takes node `i` out of the list and returns its entry; the slot goes to the free list.
    fn unlink(&mut self, i: u32) -> Option<Entry> {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if self.hand == i {
            self.hand = prev;
        }
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        let node = &mut self.nodes[i as usize];
        node.key = None;
        self.free.push(i);
        node.entry.take()
    }

    /// Inserts or replaces; returns the key evicted to make room, if any.
    fn insert(&mut self, key: Key, entry: Entry) -> Option<Key> {
        if let Some(&i) = self.index.get(&key) {
            let node = &mut self.nodes[i as usize];
            node.entry = Some(entry);
            return None;
        }
        let evicted = if self.index.len() >= self.limits.capacity.max(1) {
            self.evict()
        } else {
            None
        };
        let node = Node {
            key: Some(key.clone()),
            entry: Some(entry),
            visited: false,
            prev: NIL,
            next: self.head,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if self.head != NIL {
            self.nodes[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
        self.index.insert(key, i);
        evicted
    }

    /// SIEVE: move the hand from the tail towards the head, clearing visited bits, and evict
    /// the first entry not visited since the hand last passed it.
    fn evict(&mut self) -> Option<Key> {
        let mut i = if self.hand == NIL {
            self.tail
        } else {
            self.hand
        };
        // Two passes at most: the first clears every visited bit.
        for _ in 0..2 * self.nodes.len() + 1 {
            if i == NIL {
                i = self.tail;
                continue;
            }
            let node = &mut self.nodes[i as usize];
            if node.visited {
                node.visited = false;
                i = node.prev;
                continue;
            }
            let key = node.key.clone()?;
            self.index.remove(&key);
            self.hand = node.prev;
            self.unlink(i);
            return Some(key);
        }
        None
    }

    fn keys(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.index
            .iter()
            .filter_map(|(k, &i)| Some((k, self.nodes[i as usize].entry.as_ref()?)))
    }
}

/// The cache of one server block.
#[derive(Debug)]
pub struct Cache {
    policy: Policy,
    success: Sieve,
    denial: Sieve,
    events: Vec<Event>,
    resync: bool,
}

impl Cache {
    /// An empty cache.
    pub fn new(policy: Policy) -> Self {
        Cache {
            success: Sieve::new(policy.success),
            denial: Sieve::new(policy.denial),
            policy,
            events: Vec::new(),
            resync: false,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Entries in one cache (`coredns_cache_entries{type}`).
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Success => self.success.len(),
            Kind::Denial => self.denial.len(),
        }
    }

    /// Whether both caches are empty.
    pub fn is_empty(&self) -> bool {
        self.success.len() == 0 && self.denial.len() == 0
    }

    fn sieve(&mut self, kind: Kind) -> &mut Sieve {
        match kind {
            Kind::Success => &mut self.success,
            Kind::Denial => &mut self.denial,
        }
    }

    fn find(&self, key: &[u8]) -> Option<Kind> {
        if self.success.peek(key).is_some() {
            Some(Kind::Success)
        } else if self.denial.peek(key).is_some() {
            Some(Kind::Denial)
        } else {
            None
        }
    }

    fn emit(&mut self, event: Event) {
        if self.events.len() < EVENT_QUEUE_CAPACITY {
            self.events.push(event);
        } else {
            self.resync = true;
        }
    }

    /// Looks `key` (a [`Key`] or a [`KeyBuf`]) up at `now`. A hit allocates nothing.
    pub fn lookup<K: AsRef<[u8]> + ?Sized>(&mut self, key: &K, now: Instant) -> Lookup {
        let key = key.as_ref();
        let Some(kind) = self.find(key) else {
            return Lookup::Miss;
        };
        let prefetch = self.policy.prefetch;
        let stale = self.policy.serve_stale;
        let Some(entry) = self.sieve(kind).get_mut(key) else {
            return Lookup::Miss;
        };
        let expires = entry.expires();
        if now < expires {
            let remaining = expires - now;
            let mut refresh = false;
            if let Some(p) = prefetch {
                if now.saturating_duration_since(entry.last_hit) >= p.window {
                    entry.hits = 0;
                }
                entry.hits = entry.hits.saturating_add(1);
                entry.last_hit = now;
                let threshold = entry.ttl.mul_f64(f64::from(p.percentage.min(100)) / 100.0);
                let due = remaining <= threshold.max(Duration::from_secs(1));
                if entry.hits >= p.amount && due && !entry.refreshing {
                    entry.refreshing = true;
                    refresh = true;
                }
            }
            return Lookup::Hit {
                image: Arc::clone(&entry.image),
                ttl: remaining.as_secs() as u32,
                prefetch: refresh,
                kind,
            };
        }
        match stale {
            Some(s) if now < expires + s.max_stale => match s.mode {
                StaleMode::Immediate => {
                    let refresh = !entry.refreshing && now >= entry.recheck_after;
                    if refresh {
                        entry.refreshing = true;
                    }
                    Lookup::Stale {
                        image: Arc::clone(&entry.image),
                        ttl: s.ttl,
                        refresh,
                    }
                }
                StaleMode::Verify => Lookup::Miss,
            },
            _ => {
                self.sieve(kind).remove(key);
                self.emit(Event::Removed {
                    key: Key(key.into()),
                });
                Lookup::Miss
            }
        }
    }

    /// The upstream failed for `key` (timeout, SERVFAIL from every upstream): a stale answer
    /// if serve-stale allows one, with its TTL. Also records the failure, so background
    /// refreshes wait for the failure-recheck time.
    pub fn stale_on_failure<K: AsRef<[u8]> + ?Sized>(
        &mut self,
        key: &K,
        now: Instant,
    ) -> Option<(Arc<WireImage>, u32)> {
        let key = key.as_ref();
        let stale = self.policy.serve_stale;
        let kind = self.find(key)?;
        let entry = self.sieve(kind).get_mut(key)?;
        // Also without serve-stale: a failed prefetch must not block the next one.
        entry.refreshing = false;
        let s = stale?;
        entry.recheck_after = now + s.failure_recheck;
        let expires = entry.expires();
        if now < expires {
            return None; // still live: the caller would not have asked
        }
        (now < expires + s.max_stale).then(|| (Arc::clone(&entry.image), s.ttl))
    }

    /// Stores an upstream response for `key` at `now`, if the policy allows. Returns what was
    /// stored, or `None` if it is not cacheable (truncated, no image, a negative answer
    /// without SOA, an rcode other than NOERROR/NXDOMAIN/SERVFAIL, SERVFAIL caching off).
    pub fn insert(
        &mut self,
        key: Key,
        info: &ResponseInfo,
        image: Option<WireImage>,
        now: Instant,
    ) -> Option<Stored> {
        let ((kind, ttl), image) = match (self.classify(info), image) {
            (Some(placement), Some(image)) if !info.truncated => (placement, image),
            _ => {
                // An uncacheable answer for a key that was cached: a failed refresh. Leave the
                // entry (it may serve stale) but let the next refresh try again later.
                if let Some(kind) = self.find(key.as_bytes()) {
                    if let Some(e) = self.sieve(kind).get_mut(key.as_bytes()) {
                        e.refreshing = false;
                    }
                }
                return None;
            }
        };
        // A key lives in one cache only.
        let other = match kind {
            Kind::Success => Kind::Denial,
            Kind::Denial => Kind::Success,
        };
        if self.sieve(other).remove(key.as_bytes()).is_some() {
            self.emit(Event::Removed { key: key.clone() });
        }
        let image = Arc::new(image);
        let entry = Entry {
            image: Arc::clone(&image),
            stored: now,
            ttl,
            hits: 0,
            last_hit: now,
            refreshing: false,
            recheck_after: now,
        };
        let expires = entry.expires();
        if let Some(evicted) = self.sieve(kind).insert(key.clone(), entry) {
            self.emit(Event::Removed { key: evicted });
        }
        self.emit(Event::Inserted {
            key,
            image: Arc::clone(&image),
            expires,
        });
        Some(Stored {
            kind,
            image,
            ttl: ttl.as_secs() as u32,
        })
    }

    /// Where a response goes and for how long (RFC 2308 §5 for negative answers).
    fn classify(&self, info: &ResponseInfo) -> Option<(Kind, Duration)> {
        let clamp = |ttl: u32, limits: &Limits| {
            Duration::from_secs(u64::from(ttl))
                .clamp(limits.min_ttl, limits.max_ttl.max(limits.min_ttl))
        };
        match info.rcode {
            wire::rcode::NOERROR if info.answers_question => {
                Some((Kind::Success, clamp(info.min_ttl?, &self.policy.success)))
            }
            // NODATA (or a referral-like answer that does not answer the question): negative,
            // cacheable only with an SOA.
            wire::rcode::NOERROR | wire::rcode::NXDOMAIN => {
                Some((Kind::Denial, clamp(info.negative_ttl?, &self.policy.denial)))
            }
            wire::rcode::SERVFAIL if !self.policy.servfail_ttl.is_zero() => {
                Some((Kind::Denial, self.policy.servfail_ttl))
            }
            _ => None,
        }
    }

    /// Removes entries past their expiry and stale window; returns how many. Call it now and
    /// then so expired entries do not wait for eviction (and the kernel mirror drops them).
    pub fn sweep(&mut self, now: Instant) -> usize {
        let grace = self
            .policy
            .serve_stale
            .map_or(Duration::ZERO, |s| s.max_stale);
        let mut removed = 0;
        for kind in [Kind::Success, Kind::Denial] {
            let dead: Vec<Key> = self
                .sieve(kind)
                .keys()
                .filter(|(_, e)| now >= e.expires() + grace)
                .map(|(k, _)| k.clone())
                .collect();
            for key in dead {
                self.sieve(kind).remove(key.as_bytes());
                self.emit(Event::Removed { key });
                removed += 1;
            }
        }
        removed
    }

    /// Hands the queued events to the kernel mirror. Returns true if events were dropped
    /// since the last call (the queue was full): the mirror must then resynchronise from
    /// [`Cache::entries`].
    pub fn drain_events(&mut self, out: &mut Vec<Event>) -> bool {
        out.append(&mut self.events);
        std::mem::take(&mut self.resync)
    }

    /// Every live entry with its expiry, for a full resynchronisation of the mirror.
    pub fn entries(&self) -> impl Iterator<Item = (&Key, &Arc<WireImage>, Instant)> {
        self.success
            .keys()
            .chain(self.denial.keys())
            .map(|(k, e)| (k, &e.image, e.expires()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::testing::ResponseBuilder;
    use crate::wire::{
        build_query, parse_query, parse_response, rcode, render, rtype, Edns, Rendered,
    };

    fn query(name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
        let mut q = Vec::new();
        build_query(0x1234, name, qtype, edns, &mut q);
        q
    }

    /// Stores `response` (built for `q`) at `now`.
    fn store(cache: &mut Cache, q: &[u8], response: &[u8], now: Instant) -> Option<Kind> {
        let query = parse_query(q).unwrap();
        let (info, image) = parse_response(&query, response).unwrap();
        cache
            .insert(Key::of(&query), &info, image, now)
            .map(|s| s.kind)
    }

    fn key(q: &[u8]) -> Key {
        Key::of(&parse_query(q).unwrap())
    }

    fn a_record(q: &[u8], ttl: u32) -> Vec<u8> {
        ResponseBuilder::new(q)
            .answer("api.s1.test", rtype::A, ttl, &[10, 0, 0, 1])
            .compress(true)
            .build()
    }

    fn soa(ttl: u32, minimum: u32) -> (u32, Vec<u8>) {
        (
            ttl,
            ResponseBuilder::soa_rdata("ns.test", "hostmaster.test", minimum),
        )
    }

    fn ttl_of(lookup: &Lookup) -> Option<u32> {
        match lookup {
            Lookup::Hit { ttl, .. } | Lookup::Stale { ttl, .. } => Some(*ttl),
            Lookup::Miss => None,
        }
    }

    #[test]
    fn a_stack_key_is_the_owned_key_and_finds_its_entry() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let stored = query("api.s1.test", rtype::A, None);
        store(&mut cache, &stored, &a_record(&stored, 60), t0);
        // Another spelling of the same question: one key, the same entry.
        let asked = query("API.S1.Test", rtype::A, None);
        let parsed = parse_query(&asked).unwrap();
        let on_stack = KeyBuf::of(&parsed);
        assert_eq!(on_stack.as_bytes(), key(&stored).as_bytes());
        assert_eq!(on_stack.to_key(), Key::of(&parsed));
        assert_eq!(ttl_of(&cache.lookup(&on_stack, t0)), Some(60));
        // DO, CD, qtype and qclass are part of the key.
        for other in [
            query("api.s1.test", rtype::AAAA, None),
            query(
                "api.s1.test",
                rtype::A,
                Some(Edns {
                    udp_size: 1232,
                    version: 0,
                    dnssec_ok: true,
                }),
            ),
        ] {
            let k = KeyBuf::of(&parse_query(&other).unwrap());
            assert_ne!(k.as_bytes(), on_stack.as_bytes());
            assert_eq!(cache.lookup(&k, t0), Lookup::Miss);
        }
    }

    #[test]
    fn positive_answers_age_and_expire() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::A, None);
        assert_eq!(
            store(&mut cache, &q, &a_record(&q, 60), t0),
            Some(Kind::Success)
        );
        assert_eq!(
            ttl_of(&cache.lookup(&key(&q), t0 + Duration::from_secs(20))),
            Some(40)
        );
        assert_eq!(
            cache.lookup(&key(&q), t0 + Duration::from_secs(60)),
            Lookup::Miss
        );
        assert_eq!(
            cache.len(Kind::Success),
            0,
            "expired without serve-stale: removed"
        );
    }

    #[test]
    fn ttl_caps_and_floors_per_cache() {
        let mut policy = Policy::default();
        policy.success.max_ttl = Duration::from_secs(30);
        let mut cache = Cache::new(policy);
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::A, None);
        store(&mut cache, &q, &a_record(&q, 86_400), t0);
        assert_eq!(
            ttl_of(&cache.lookup(&key(&q), t0)),
            Some(30),
            "capped like `success N 30`"
        );
        let q0 = query("api.s1.test", rtype::AAAA, None);
        let r0 = ResponseBuilder::new(&q0)
            .answer("api.s1.test", rtype::AAAA, 0, &[0; 16])
            .build();
        store(&mut cache, &q0, &r0, t0);
        assert_eq!(
            ttl_of(&cache.lookup(&key(&q0), t0)),
            Some(5),
            "raised to the 5 s floor"
        );
    }

    #[test]
    fn rfc2308_nxdomain_uses_the_soa_minimum_and_ttl() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let q = query("nope.s1.test", rtype::A, None);
        let (ttl, rdata) = soa(600, 45);
        let r = ResponseBuilder::new(&q)
            .rcode(rcode::NXDOMAIN)
            .authority("s1.test", rtype::SOA, ttl, &rdata)
            .build();
        assert_eq!(store(&mut cache, &q, &r, t0), Some(Kind::Denial));
        assert_eq!(
            ttl_of(&cache.lookup(&key(&q), t0)),
            Some(45),
            "min(SOA TTL, SOA MINIMUM)"
        );
        let (ttl, rdata) = soa(20, 900);
        let r = ResponseBuilder::new(&q)
            .rcode(rcode::NXDOMAIN)
            .authority("s1.test", rtype::SOA, ttl, &rdata)
            .build();
        store(&mut cache, &q, &r, t0);
        assert_eq!(ttl_of(&cache.lookup(&key(&q), t0)), Some(20));
    }

    #[test]
    fn rfc2308_nodata_is_negative_and_needs_an_soa() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::AAAA, None);
        let no_soa = ResponseBuilder::new(&q).build();
        assert_eq!(
            store(&mut cache, &q, &no_soa, t0),
            None,
            "NODATA without SOA is not cached"
        );
        let nx_no_soa = ResponseBuilder::new(&q).rcode(rcode::NXDOMAIN).build();
        assert_eq!(
            store(&mut cache, &q, &nx_no_soa, t0),
            None,
            "NXDOMAIN without SOA is not cached"
        );
        let (ttl, rdata) = soa(30, 30);
        let nodata = ResponseBuilder::new(&q)
            .authority("s1.test", rtype::SOA, ttl, &rdata)
            .build();
        assert_eq!(store(&mut cache, &q, &nodata, t0), Some(Kind::Denial));
        // A CNAME that does not lead to the qtype, without SOA: not an answer, not cached.
        let qc = query("alias.s1.test", rtype::A, None);
        let dangling = ResponseBuilder::new(&qc)
            .answer(
                "alias.s1.test",
                rtype::CNAME,
                60,
                &ResponseBuilder::name_rdata("target.s1.test"),
            )
            .build();
        assert_eq!(store(&mut cache, &qc, &dangling, t0), None);
        // With the chain complete it is a positive answer.
        let chain = ResponseBuilder::new(&qc)
            .answer(
                "alias.s1.test",
                rtype::CNAME,
                60,
                &ResponseBuilder::name_rdata("target.s1.test"),
            )
            .answer("target.s1.test", rtype::A, 60, &[10, 0, 0, 2])
            .build();
        assert_eq!(store(&mut cache, &qc, &chain, t0), Some(Kind::Success));
    }

    #[test]
    fn servfail_is_cached_briefly_and_truncated_never() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let q = query("broken.test", rtype::A, None);
        let r = ResponseBuilder::new(&q).rcode(rcode::SERVFAIL).build();
        assert_eq!(store(&mut cache, &q, &r, t0), Some(Kind::Denial));
        assert_eq!(
            ttl_of(&cache.lookup(&key(&q), t0 + Duration::from_secs(4))),
            Some(1)
        );
        assert_eq!(
            cache.lookup(&key(&q), t0 + Duration::from_secs(5)),
            Lookup::Miss
        );
        let q2 = query("big.test", rtype::TXT, None);
        let tc = ResponseBuilder::new(&q2).truncated(true).build();
        assert_eq!(store(&mut cache, &q2, &tc, t0), None);
        let refused = ResponseBuilder::new(&q2).rcode(rcode::REFUSED).build();
        assert_eq!(store(&mut cache, &q2, &refused, t0), None);
    }

    #[test]
    fn dns_0x20_and_the_key() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let lower = query("api.s1.test", rtype::A, None);
        store(&mut cache, &lower, &a_record(&lower, 60), t0);
        let mixed = query("ApI.S1.tEsT", rtype::A, None);
        let Lookup::Hit { image, ttl, .. } = cache.lookup(&key(&mixed), t0) else {
            panic!("mixed case must hit the lower-case entry");
        };
        let mixed_query = parse_query(&mixed).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            render(&mixed_query, &image, ttl, 512, &mut out),
            Rendered::Full
        );
        assert_eq!(
            &out[12..12 + mixed_query.question.len()],
            mixed_query.question,
            "question echoed as sent"
        );
        // DO and CD are part of the key; qtype and qclass too.
        let with_do = query(
            "api.s1.test",
            rtype::A,
            Some(Edns {
                udp_size: 1232,
                version: 0,
                dnssec_ok: true,
            }),
        );
        assert_eq!(cache.lookup(&key(&with_do), t0), Lookup::Miss);
        let aaaa = query("api.s1.test", rtype::AAAA, None);
        assert_eq!(cache.lookup(&key(&aaaa), t0), Lookup::Miss);
        let plain_edns = query(
            "api.s1.test",
            rtype::A,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: false,
            }),
        );
        assert!(
            matches!(cache.lookup(&key(&plain_edns), t0), Lookup::Hit { .. }),
            "EDNS without DO shares the entry"
        );
    }

    fn stale_policy(mode: StaleMode) -> Policy {
        Policy {
            serve_stale: Some(ServeStale {
                max_stale: Duration::from_secs(3600),
                ttl: DEFAULT_STALE_TTL,
                mode,
                failure_recheck: DEFAULT_FAILURE_RECHECK,
            }),
            ..Policy::default()
        }
    }

    #[test]
    fn rfc8767_serve_stale_immediate_refreshes_once_and_rechecks_after_failure() {
        let mut cache = Cache::new(stale_policy(StaleMode::Immediate));
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::A, None);
        store(&mut cache, &q, &a_record(&q, 10), t0);
        let k = key(&q);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let Lookup::Stale { ttl, refresh, .. } = cache.lookup(&k, at(20)) else {
            panic!("stale expected")
        };
        assert_eq!((ttl, refresh), (30, true), "RFC 8767: TTL 30, one refresh");
        let Lookup::Stale { refresh, .. } = cache.lookup(&k, at(21)) else {
            panic!()
        };
        assert!(!refresh, "a refresh is already running");
        // The refresh failed: no new attempt before the failure-recheck time.
        assert!(cache.stale_on_failure(&k, at(22)).is_some());
        let Lookup::Stale { refresh, .. } = cache.lookup(&k, at(40)) else {
            panic!()
        };
        assert!(!refresh);
        let Lookup::Stale { refresh, .. } = cache.lookup(&k, at(53)) else {
            panic!()
        };
        assert!(refresh, "recheck after 30 s");
        // A fresh answer replaces the stale one.
        store(&mut cache, &q, &a_record(&q, 10), at(54));
        assert!(matches!(cache.lookup(&k, at(55)), Lookup::Hit { .. }));
        // Past the stale window the entry is gone.
        assert_eq!(cache.lookup(&k, at(54 + 10 + 3600)), Lookup::Miss);
        assert!(cache.is_empty());
    }

    #[test]
    fn rfc8767_serve_stale_verify_asks_first() {
        let mut cache = Cache::new(stale_policy(StaleMode::Verify));
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::A, None);
        store(&mut cache, &q, &a_record(&q, 10), t0);
        let k = key(&q);
        assert_eq!(
            cache.lookup(&k, t0 + Duration::from_secs(11)),
            Lookup::Miss,
            "verify: upstream first"
        );
        let (_, ttl) = cache
            .stale_on_failure(&k, t0 + Duration::from_secs(12))
            .unwrap();
        assert_eq!(ttl, 30);
        assert!(
            Cache::new(Policy::default())
                .stale_on_failure(&k, t0)
                .is_none(),
            "off by default"
        );
    }

    #[test]
    fn prefetch_fires_once_for_hot_entries_near_expiry() {
        let policy = Policy {
            prefetch: Some(Prefetch {
                amount: 2,
                window: Duration::from_secs(60),
                percentage: 10,
            }),
            ..Policy::default()
        };
        let mut cache = Cache::new(policy);
        let t0 = Instant::now();
        let q = query("api.s1.test", rtype::A, None);
        store(&mut cache, &q, &a_record(&q, 100), t0);
        let k = key(&q);
        let prefetch = |cache: &mut Cache, s: u64| {
            matches!(
                cache.lookup(&k, t0 + Duration::from_secs(s)),
                Lookup::Hit { prefetch: true, .. }
            )
        };
        assert!(!prefetch(&mut cache, 50), "not yet near expiry");
        assert!(
            prefetch(&mut cache, 91),
            "2 hits within the window, 9 s of 100 left"
        );
        assert!(!prefetch(&mut cache, 92), "once");
        // The prefetch failed (no serve-stale here): the next hit may try again.
        assert_eq!(
            cache.stale_on_failure(&k, t0 + Duration::from_secs(93)),
            None
        );
        assert!(prefetch(&mut cache, 94), "again after a failed prefetch");
        // A cold entry (one hit after a long gap) is not prefetched.
        let q2 = query("cold.s1.test", rtype::A, None);
        store(
            &mut cache,
            &q2,
            &ResponseBuilder::new(&q2)
                .answer("cold.s1.test", rtype::A, 100, &[1, 2, 3, 4])
                .build(),
            t0,
        );
        let k2 = key(&q2);
        assert!(!matches!(
            cache.lookup(&k2, t0 + Duration::from_secs(95)),
            Lookup::Hit { prefetch: true, .. }
        ));
    }

    #[test]
    fn sieve_keeps_hit_entries_and_evicts_one_hit_wonders() {
        let mut policy = Policy::default();
        policy.success.capacity = 3;
        let mut cache = Cache::new(policy);
        let t0 = Instant::now();
        let names = ["a.test", "b.test", "c.test", "d.test", "e.test"];
        let qs: Vec<Vec<u8>> = names.iter().map(|n| query(n, rtype::A, None)).collect();
        let resp = |q: &[u8], n: &str| {
            ResponseBuilder::new(q)
                .answer(n, rtype::A, 300, &[1, 1, 1, 1])
                .build()
        };
        for i in 0..3 {
            store(&mut cache, &qs[i], &resp(&qs[i], names[i]), t0);
        }
        assert!(matches!(cache.lookup(&key(&qs[0]), t0), Lookup::Hit { .. })); // a is hot
        store(&mut cache, &qs[3], &resp(&qs[3], names[3]), t0); // evicts b, the oldest cold one
        assert_eq!(cache.len(Kind::Success), 3);
        assert!(
            matches!(cache.lookup(&key(&qs[0]), t0), Lookup::Hit { .. }),
            "hot entry kept"
        );
        assert_eq!(
            cache.lookup(&key(&qs[1]), t0),
            Lookup::Miss,
            "cold entry evicted"
        );
        store(&mut cache, &qs[4], &resp(&qs[4], names[4]), t0); // evicts c
        assert_eq!(cache.lookup(&key(&qs[2]), t0), Lookup::Miss);
        assert!(matches!(cache.lookup(&key(&qs[0]), t0), Lookup::Hit { .. }));
        let mut events = Vec::new();
        assert!(!cache.drain_events(&mut events));
        let removed: Vec<&Key> = events
            .iter()
            .filter_map(|e| match e {
                Event::Removed { key } => Some(key),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec![&key(&qs[1]), &key(&qs[2])]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Inserted { .. }))
                .count(),
            5
        );
    }

    #[test]
    fn negative_replaces_positive_and_the_mirror_hears_of_it() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        let q = query("gone.s1.test", rtype::A, None);
        store(
            &mut cache,
            &q,
            &ResponseBuilder::new(&q)
                .answer("gone.s1.test", rtype::A, 60, &[1, 1, 1, 1])
                .build(),
            t0,
        );
        let (ttl, rdata) = soa(5, 5);
        let nx = ResponseBuilder::new(&q)
            .rcode(rcode::NXDOMAIN)
            .authority("s1.test", rtype::SOA, ttl, &rdata)
            .build();
        assert_eq!(store(&mut cache, &q, &nx, t0), Some(Kind::Denial));
        assert_eq!((cache.len(Kind::Success), cache.len(Kind::Denial)), (0, 1));
        let mut events = Vec::new();
        cache.drain_events(&mut events);
        assert!(matches!(events[1], Event::Removed { .. }), "{events:?}");
        assert!(matches!(events[2], Event::Inserted { .. }));
    }

    #[test]
    fn sweep_and_event_overflow() {
        let mut cache = Cache::new(Policy::default());
        let t0 = Instant::now();
        for i in 0..(EVENT_QUEUE_CAPACITY + 10) {
            let name = format!("n{i}.test");
            let q = query(&name, rtype::A, None);
            store(
                &mut cache,
                &q,
                &ResponseBuilder::new(&q)
                    .answer(&name, rtype::A, 30, &[1, 1, 1, 1])
                    .build(),
                t0,
            );
        }
        let mut events = Vec::new();
        assert!(
            cache.drain_events(&mut events),
            "overflow asks for a resync"
        );
        assert_eq!(events.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(cache.entries().count(), EVENT_QUEUE_CAPACITY + 10);
        assert_eq!(cache.sweep(t0 + Duration::from_secs(29)), 0);
        assert_eq!(
            cache.sweep(t0 + Duration::from_secs(30)),
            EVENT_QUEUE_CAPACITY + 10
        );
        assert!(cache.is_empty());
    }
}
