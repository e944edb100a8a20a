//! The kernel fast path's userspace half: mirrors the caches of the zones served on the fast
//! path's addresses into the eBPF map of [`ebpf::dns`], keeps it in step with the cache's
//! events (insert, expiry, eviction; a full resynchronisation when the event queue
//! overflowed), and reads the kernel's counters back for the metrics.
//!
//! What the kernel answers is always an answer this agent would give: entries come only from
//! our own validated upstream responses, the kernel stops answering an entry when it expires
//! (serve-stale and refreshes stay in userspace), and with prefetch it stops early enough for
//! userspace to see the hits that trigger the refresh. A lag between a cache change and the
//! mirror (at most one [`SYNC_INTERVAL`]) only means a still-valid older answer is served a
//! little longer.
//!
//! Two more duties live here. In XDP mode an interface is attached only where an `XDP_TX`
//! reply can reach the pod ([`ebpf::dns::xdp_tx_delivery`]); elsewhere it is attached at tc
//! instead, with a warning, and rechecked every second. And [`Counters`] turns the kernel's
//! per-CPU counters into the CoreDNS metrics when `/metrics` is scraped: each mirrored entry
//! counts its hits in a kernel counter slot for its (zone, query type, response code), so a
//! kernel answer is counted as the request and response it is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ebpf::dns::{
    xdp_tx_delivery, DnsCounters, DnsEntry, DnsFastPath, DnsKey, Mode, Stats, XdpAttachMode, XdpTx,
    ZONES_MAX,
};
use tracing::{info, warn};

use crate::{
    cache::{Cache, Event, Key},
    metrics::{Metrics, ZoneMetrics},
    server::Zone,
    wire::WireImage,
};
use agentkit::sync::lock;

/// How often the cache's events are applied to the kernel map.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// The zones to mirror, each with the metrics its kernel answers are counted in.
pub type ZonesToMirror = Vec<(Arc<Zone>, Option<ZoneMetrics>)>;

/// What the fast path was asked for (`-fast-path-interfaces`, `-fast-path-mode`,
/// `-fast-path-capacity`, or the Corefile's `fastpath`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Interfaces to attach to (the host side of pod veths, or a NIC).
    pub interfaces: Vec<String>,
    /// XDP or tc.
    pub mode: Mode,
    /// Entries of the kernel map.
    pub capacity: u32,
}

/// The kernel key of a cache key; None if the name is too long to mirror.
pub fn kernel_key(key: &Key) -> Option<DnsKey> {
    DnsKey::from_cache_key(key.as_bytes())
}

/// The kernel entry for a cached `image` that expires at `expires`, whose hits the kernel
/// counts in slot `zone` (below [`ZONES_MAX`]). With
/// prefetch (`prefetch_percentage` of the TTL), the kernel stops answering when that last
/// share of the lifetime begins (at least a second before expiry, CoreDNS's floor), so the
/// hits that trigger a refresh reach userspace.
pub fn kernel_entry(
    image: &WireImage,
    expires: Instant,
    prefetch_percentage: Option<u8>,
    now: Instant,
    zone: u8,
) -> ebpf::Result<DnsEntry> {
    let lifetime = expires.saturating_duration_since(now);
    let early = prefetch_percentage.map_or(Duration::ZERO, |pct| {
        lifetime
            .mul_f64(f64::from(pct.min(100)) / 100.0)
            .max(Duration::from_secs(1))
    });
    let remaining = lifetime.saturating_sub(early);
    let ancount = image
        .bytes()
        .get(6..8)
        .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
    let denial = image.rcode() != 0 || ancount == 0;
    DnsEntry::from_image(
        image.bytes(),
        image.question_len(),
        image.ttl_offsets(),
        ebpf::dns::expires_after(remaining),
        zone,
        denial,
    )
}

/// A mirrored zone.
#[derive(Debug)]
struct Mirrored {
    zone: Arc<Zone>,
    /// Where its kernel answers are counted (None: the zone has no metrics).
    metrics: Option<ZoneMetrics>,
}

/// What the entries counting in one kernel counter slot have in common: the labels their
/// answers are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Labels {
    /// Index into the mirrored zones.
    zone: usize,
    qtype: u16,
    rcode: u8,
}

/// One of the kernel's [`ZONES_MAX`] counter slots (a success and a denial counter).
#[derive(Debug)]
struct Slot {
    labels: Labels,
    /// Entries in the kernel map that count here; at zero the slot may be reused.
    live: usize,
    /// The kernel's counts already added to the metrics.
    reported: (u64, u64),
}

#[derive(Debug, Default)]
struct CountersState {
    kernel: Option<Arc<DnsCounters>>,
    /// Per mirrored zone, where its answers are counted.
    zones: Vec<Option<ZoneMetrics>>,
    slots: Vec<Option<Slot>>,
    /// Whether the local addresses are IPv6 (the `family` label of kernel answers).
    v6: bool,
    /// The packet counters already added to the metrics.
    stats_reported: Stats,
}

impl CountersState {
    /// Adds what the kernel counted in `slot` since the last report to its labels' metrics.
    fn flush(&mut self, slot: usize) {
        let (Some(kernel), Some(Some(s))) = (&self.kernel, self.slots.get_mut(slot)) else {
            return;
        };
        let Ok(now) = kernel.zone_hits(slot as u8) else {
            return;
        };
        let success = now.0.saturating_sub(s.reported.0);
        let denial = now.1.saturating_sub(s.reported.1);
        s.reported = now;
        if let Some(Some(m)) = self.zones.get(s.labels.zone) {
            m.kernel_answers(self.v6, s.labels.qtype, s.labels.rcode, success, denial);
        }
    }

    /// The slot for `labels` (one more live entry): the one already counting them, else a
    /// free one, whose counts so far are taken as reported. None when all are in use.
    fn acquire(&mut self, labels: Labels) -> Option<u8> {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.labels == labels))
        {
            if let Some(Some(s)) = self.slots.get_mut(i) {
                s.live += 1;
            }
            return Some(i as u8);
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_none_or(|s| s.live == 0))?;
        self.flush(i);
        let reported = self
            .kernel
            .as_ref()
            .and_then(|k| k.zone_hits(i as u8).ok())
            .unwrap_or((0, 0));
        self.slots[i] = Some(Slot {
            labels,
            live: 1,
            reported,
        });
        Some(i as u8)
    }

    /// One entry counting in `slot` left the kernel map.
    fn release(&mut self, slot: u8) {
        if let Some(Some(s)) = self.slots.get_mut(usize::from(slot)) {
            s.live = s.live.saturating_sub(1);
        }
    }

    /// Reports every slot and forgets them (the map is about to be rebuilt).
    fn reset(&mut self) {
        for i in 0..self.slots.len() {
            self.flush(i);
        }
        self.slots = (0..ZONES_MAX).map(|_| None).collect();
    }
}

/// The kernel's counters as metrics, shared between the mirror (which decides what each
/// counter slot means) and the `/metrics` scrape (which reads the kernel through
/// [`Counters::report`]). Cloning shares; a Mutex keeps two scrapes, or a scrape and a slot
/// being reused, from counting the same hits twice. Empty until a [`Mirror`] starts.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    state: Arc<Mutex<CountersState>>,
}

impl Counters {
    /// Reads the kernel's counters (a bpf syscall per counter, no waiting on the mirror) and
    /// adds what is new to `metrics`: the packet verdicts, and every answer to its zone's
    /// request, response and cache counters.
    pub fn report(&self, metrics: &Metrics) {
        let mut state = lock(&self.state);
        let Some(kernel) = state.kernel.clone() else {
            return;
        };
        if let Ok(now) = kernel.stats() {
            let before = state.stats_reported.by_result();
            for ((result, n), (_, was)) in now.by_result().into_iter().zip(before) {
                metrics
                    .fast_path_packets
                    .with_label_values(&[result])
                    .inc_by(n.saturating_sub(was));
            }
            state.stats_reported = now;
        }
        for i in 0..state.slots.len() {
            state.flush(i);
        }
    }
}

/// What one [`Mirror::sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries written to the kernel map.
    pub inserted: usize,
    /// Entries removed.
    pub removed: usize,
    /// Entries the kernel cannot hold (name, records or size beyond its limits).
    pub skipped: usize,
    /// Whether the map was rebuilt from the caches.
    pub resynced: bool,
}

/// The loaded fast path and the zones it mirrors.
#[derive(Debug)]
pub struct Mirror {
    path: DnsFastPath,
    options: Options,
    zones: Vec<Mirrored>,
    events: Vec<Event>,
    /// Interfaces not attached yet (an XDP link of an older instance still holds them).
    pending: Vec<String>,
    /// Interfaces asked for in XDP mode that are attached (or pending) at tc instead.
    fallbacks: Vec<String>,
    locals: Vec<SocketAddr>,
    counters: Counters,
    /// The counter slot of every key in the kernel map.
    slots: HashMap<Key, u8>,
}

/// What an operator can do when XDP_TX cannot reach a pod.
pub const XDP_FIX: &str = "use -fast-path-mode tc (Corefile: fastpath tc), or attach a native XDP program (one that passes everything will do) to the pod's end of the veth; GRO on that end is not enough";

impl Mirror {
    /// Loads the programs, answers for `locals`, and attaches to every interface it can;
    /// the others are retried by [`Mirror::retry_attach`]. The kernel's counters are
    /// reported through `counters` from now on.
    pub fn start(
        options: Options,
        locals: &[SocketAddr],
        counters: Counters,
    ) -> ebpf::Result<Mirror> {
        let mut path = DnsFastPath::load(options.capacity)?;
        for local in locals {
            path.add_local(local.ip(), local.port())?;
        }
        {
            let mut state = lock(&counters.state);
            let kernel = path.counters();
            *state = CountersState {
                stats_reported: kernel.stats().unwrap_or_default(),
                kernel: Some(kernel),
                zones: Vec::new(),
                slots: (0..ZONES_MAX).map(|_| None).collect(),
                v6: !locals.is_empty() && locals.iter().all(SocketAddr::is_ipv6),
            };
        }
        let mut mirror = Mirror {
            path,
            pending: options.interfaces.clone(),
            fallbacks: Vec::new(),
            options,
            zones: Vec::new(),
            events: Vec::new(),
            locals: locals.to_vec(),
            counters,
            slots: HashMap::new(),
        };
        mirror.retry_attach();
        Ok(mirror)
    }

    /// The mode `interface` is (to be) attached in: the asked-for one, or tc where XDP fell
    /// back.
    fn mode_of(&self, interface: &str) -> Mode {
        if self.fallbacks.iter().any(|i| i == interface) {
            Mode::Tc
        } else {
            self.options.mode
        }
    }

    /// Falls back to tc on `interface` for `reason` (logged with the fix).
    fn fall_back(&mut self, interface: &str, reason: &str) {
        warn!(
            %interface,
            %reason,
            fix = XDP_FIX,
            "fast path: XDP_TX replies would not reach the pod on this interface; attaching at tc instead"
        );
        if !self.fallbacks.iter().any(|i| i == interface) {
            self.fallbacks.push(interface.to_owned());
        }
    }

    /// Attaches to the interfaces not attached yet; returns how many are still missing.
    ///
    /// In XDP mode an interface is first checked with [`xdp_tx_delivery`]; where a reply
    /// could not reach the pod it is attached at tc instead. After an XDP attachment
    /// `Mirror::verify_xdp` reads it back.
    pub fn retry_attach(&mut self) -> usize {
        let mut still = Vec::new();
        for interface in std::mem::take(&mut self.pending) {
            if self.mode_of(&interface) == Mode::Xdp {
                if let XdpTx::Cannot(reason) = xdp_tx_delivery(&interface) {
                    self.fall_back(&interface, &reason);
                }
            }
            let mode = self.mode_of(&interface);
            match self.path.attach(&interface, mode) {
                Ok(()) if mode == Mode::Xdp && !self.verify_xdp(&interface) => {
                    // Detached again and moved to tc: attached on the next round.
                    still.push(interface);
                }
                Ok(()) => {
                    info!(%interface, mode = mode.as_str(), locals = ?self.locals, "fast path attached")
                }
                Err(e) => {
                    warn!(%interface, mode = mode.as_str(), error = %e, "fast path not attached (retrying)");
                    still.push(interface);
                }
            }
        }
        self.pending = still;
        self.pending.len()
    }

    /// The self-test of a fresh XDP attachment, as far as it can be proven from the node:
    /// the kernel reports our program on the interface, and in native mode the peer can take
    /// XDP_TX frames (checked again: it may have changed since the first check). Generic
    /// mode transmits through the device's normal path and needs no peer. On a failure the
    /// program is detached and the interface falls back to tc; false then.
    fn verify_xdp(&mut self, interface: &str) -> bool {
        let problem = match self.path.xdp_attach_mode(interface) {
            Ok(Some(XdpAttachMode::Generic)) => None,
            Ok(Some(XdpAttachMode::Native)) => match xdp_tx_delivery(interface) {
                XdpTx::Delivers(why) => {
                    info!(%interface, %why, "fast path: XDP_TX replies can reach the pod");
                    None
                }
                XdpTx::Cannot(reason) => Some(reason),
            },
            Ok(None) => Some(format!(
                "the kernel does not report dns_xdp attached to {interface}"
            )),
            Err(e) => Some(format!("the XDP attachment cannot be read back: {e}")),
        };
        let Some(reason) = problem else {
            return true;
        };
        if let Err(e) = self.path.detach(interface, Mode::Xdp) {
            warn!(%interface, error = %e, "fast path: detaching XDP failed");
        }
        self.fall_back(interface, &reason);
        false
    }

    /// Checks every interface attached natively at XDP again (once a second): if the pod's
    /// end can no longer take XDP_TX (its XDP program removed, the link down), the interface
    /// moves to tc. Returns how many moved.
    pub fn recheck_xdp(&mut self) -> usize {
        let xdp: Vec<String> = self
            .path
            .attached()
            .into_iter()
            .filter(|(_, mode)| *mode == Mode::Xdp)
            .map(|(i, _)| i)
            .collect();
        let mut moved = 0;
        for interface in xdp {
            let native = matches!(
                self.path.xdp_attach_mode(&interface),
                Ok(Some(XdpAttachMode::Native))
            );
            if !native {
                continue;
            }
            if let XdpTx::Cannot(reason) = xdp_tx_delivery(&interface) {
                if let Err(e) = self.path.detach(&interface, Mode::Xdp) {
                    warn!(%interface, error = %e, "fast path: detaching XDP failed");
                    continue;
                }
                self.fall_back(&interface, &reason);
                self.pending.push(interface);
                moved += 1;
            }
        }
        if moved > 0 {
            self.retry_attach();
        }
        moved
    }

    /// The interfaces attached to.
    pub fn attached(&self) -> Vec<String> {
        self.path.attached().into_iter().map(|(i, _)| i).collect()
    }

    /// The interfaces asked for in XDP mode but attached (or to be attached) at tc, because
    /// XDP_TX replies could not reach the pod there.
    pub fn xdp_fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    /// Mirrors `zones` from now on, counting the kernel's answers of each in its metrics
    /// (the first listener's, as the kernel cannot tell listeners of one zone apart). If they
    /// differ from the zones mirrored so far, the map is rebuilt from their caches.
    pub fn set_zones(&mut self, zones: ZonesToMirror) -> SyncReport {
        let same = zones.len() == self.zones.len()
            && zones
                .iter()
                .zip(&self.zones)
                .all(|((a, _), b)| Arc::ptr_eq(a, &b.zone));
        if same {
            return SyncReport::default();
        }
        if zones.len() > ZONES_MAX {
            warn!(
                zones = zones.len(),
                max = ZONES_MAX,
                "fast path mirrors only the first zones"
            );
        }
        self.zones = zones
            .into_iter()
            .take(ZONES_MAX)
            .map(|(zone, metrics)| Mirrored { zone, metrics })
            .collect();
        {
            // Hits counted so far go to the old zones' metrics; the slots start afresh.
            let mut state = lock(&self.counters.state);
            state.reset();
            state.zones = self.zones.iter().map(|z| z.metrics.clone()).collect();
        }
        self.resync(Instant::now())
    }

    /// Applies the caches' events since the last call (or rebuilds the map if a queue
    /// overflowed).
    pub fn sync(&mut self, now: Instant) -> SyncReport {
        let mut report = SyncReport::default();
        let mut resync = false;
        let counters = Arc::clone(&self.counters.state);
        for i in 0..self.zones.len() {
            let prefetch = prefetch_percentage(self.zones[i].zone.cache());
            self.events.clear();
            resync |= lock(self.zones[i].zone.cache()).drain_events(&mut self.events);
            let events = std::mem::take(&mut self.events);
            let mut state = lock(&counters);
            for event in &events {
                self.apply(&mut state, event, i, prefetch, now, &mut report);
            }
            drop(state);
            self.events = events;
        }
        if resync {
            return self.resync(now);
        }
        report
    }

    fn apply(
        &mut self,
        counters: &mut CountersState,
        event: &Event,
        zone: usize,
        prefetch: Option<u8>,
        now: Instant,
        report: &mut SyncReport,
    ) {
        match event {
            Event::Inserted {
                key,
                image,
                expires,
            } => {
                if let Some(old) = self.slots.remove(key) {
                    counters.release(old);
                }
                let Some(k) = kernel_key(key) else {
                    report.skipped += 1;
                    return;
                };
                let labels = Labels {
                    zone,
                    qtype: u16::from_be_bytes(k.qtype),
                    rcode: image.rcode(),
                };
                let slot = counters.acquire(labels);
                let entry = slot.map(|slot| kernel_entry(image, *expires, prefetch, now, slot));
                match (slot, entry) {
                    (Some(slot), Some(Ok(entry))) => match self.path.insert(&k, &entry) {
                        Ok(()) => {
                            self.slots.insert(key.clone(), slot);
                            report.inserted += 1;
                        }
                        Err(e) => {
                            counters.release(slot);
                            let _ = self.path.remove(&k);
                            warn!(error = %e, "fast path insert failed");
                        }
                    },
                    (slot, _) => {
                        // Too big for the kernel, or every counter slot in use: make sure an
                        // older answer does not linger; userspace answers it.
                        if let Some(slot) = slot {
                            counters.release(slot);
                        }
                        report.skipped += 1;
                        let _ = self.path.remove(&k);
                    }
                }
            }
            Event::Removed { key } => {
                if let Some(slot) = self.slots.remove(key) {
                    counters.release(slot);
                }
                if let Some(k) = kernel_key(key) {
                    if let Ok(true) = self.path.remove(&k) {
                        report.removed += 1;
                    }
                }
            }
        }
    }

    /// Empties the map and fills it from every mirrored cache's live entries.
    fn resync(&mut self, now: Instant) -> SyncReport {
        let mut report = SyncReport {
            resynced: true,
            ..SyncReport::default()
        };
        if let Err(e) = self.path.clear() {
            warn!(error = %e, "fast path map not cleared");
        }
        self.slots.clear();
        let counters = Arc::clone(&self.counters.state);
        lock(&counters).reset();
        for i in 0..self.zones.len() {
            let prefetch = prefetch_percentage(self.zones[i].zone.cache());
            let events: Vec<Event> = {
                let mut cache = lock(self.zones[i].zone.cache());
                let mut drained = Vec::new();
                cache.drain_events(&mut drained);
                cache
                    .entries()
                    .filter(|(_, _, expires)| *expires > now)
                    .map(|(key, image, expires)| Event::Inserted {
                        key: key.clone(),
                        image: Arc::clone(image),
                        expires,
                    })
                    .collect()
            };
            let mut state = lock(&counters);
            for event in &events {
                self.apply(&mut state, event, i, prefetch, now, &mut report);
            }
        }
        report
    }

    /// The kernel's packet counters.
    pub fn stats(&self) -> ebpf::Result<Stats> {
        self.path.stats()
    }

    /// The kernel map itself (tests and diagnostics).
    pub fn kernel(&self) -> &DnsFastPath {
        &self.path
    }
}

/// The prefetch percentage of a cache's policy, if it prefetches.
fn prefetch_percentage(cache: &Mutex<Cache>) -> Option<u8> {
    lock(cache).policy().prefetch.map(|p| p.percentage)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(zone: usize, qtype: u16, rcode: u8) -> Labels {
        Labels { zone, qtype, rcode }
    }

    fn state() -> CountersState {
        CountersState {
            slots: (0..ZONES_MAX).map(|_| None).collect(),
            ..CountersState::default()
        }
    }

    #[test]
    fn entries_with_the_same_labels_share_a_slot() {
        let mut s = state();
        let a = s.acquire(labels(0, 1, 0)).unwrap();
        assert_eq!(s.acquire(labels(0, 1, 0)), Some(a));
        let b = s.acquire(labels(0, 28, 0)).unwrap();
        let c = s.acquire(labels(0, 1, 3)).unwrap();
        let d = s.acquire(labels(1, 1, 0)).unwrap();
        let mut all = vec![a, b, c, d];
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4, "type, rcode and zone each get their own slot");
        assert_eq!(s.slots[usize::from(a)].as_ref().unwrap().live, 2);
    }

    #[test]
    fn a_slot_is_reused_only_when_its_last_entry_left() {
        let mut s = state();
        let first = s.acquire(labels(0, 1, 0)).unwrap();
        for qtype in 1..ZONES_MAX as u16 {
            assert!(s.acquire(labels(1, qtype, 0)).is_some());
        }
        assert_eq!(
            s.acquire(labels(2, 1, 0)),
            None,
            "all 64 in use: left to userspace"
        );
        s.release(first);
        assert_eq!(
            s.acquire(labels(2, 1, 0)),
            Some(first),
            "the freed slot counts the new labels"
        );
        s.reset();
        assert!(s.slots.iter().all(Option::is_none));
    }
}
