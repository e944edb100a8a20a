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

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ebpf::dns::{DnsEntry, DnsFastPath, DnsKey, Mode, Stats, ZONES_MAX};
use tracing::{info, warn};

use crate::{
    cache::{Cache, Event, Key},
    server::Zone,
    wire::WireImage,
};

/// How often the cache's events are applied to the kernel map.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

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

/// The kernel entry for a cached `image` that expires at `expires`, counted for `zone`. With
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

/// A mirrored zone: its index in the kernel's counters and the hits already reported.
#[derive(Debug)]
struct Mirrored {
    zone: Arc<Zone>,
    index: u8,
    reported: (u64, u64),
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
    locals: Vec<SocketAddr>,
}

impl Mirror {
    /// Loads the programs, answers for `locals`, and attaches to every interface it can;
    /// the others are retried by [`Mirror::retry_attach`].
    pub fn start(options: Options, locals: &[SocketAddr]) -> ebpf::Result<Mirror> {
        let mut path = DnsFastPath::load(options.capacity)?;
        for local in locals {
            path.add_local(local.ip(), local.port())?;
        }
        let mut mirror = Mirror {
            path,
            pending: options.interfaces.clone(),
            options,
            zones: Vec::new(),
            events: Vec::new(),
            locals: locals.to_vec(),
        };
        mirror.retry_attach();
        Ok(mirror)
    }

    /// Attaches to the interfaces not attached yet; returns how many are still missing.
    pub fn retry_attach(&mut self) -> usize {
        let mode = self.options.mode;
        let mut still = Vec::new();
        for interface in std::mem::take(&mut self.pending) {
            match self.path.attach(&interface, mode) {
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

    /// The interfaces attached to.
    pub fn attached(&self) -> Vec<String> {
        self.path.attached().into_iter().map(|(i, _)| i).collect()
    }

    /// Mirrors `zones` from now on. If they differ from the zones mirrored so far, the map
    /// is rebuilt from their caches.
    pub fn set_zones(&mut self, zones: Vec<Arc<Zone>>) -> SyncReport {
        let same = zones.len() == self.zones.len()
            && zones
                .iter()
                .zip(&self.zones)
                .all(|(a, b)| Arc::ptr_eq(a, &b.zone));
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
            .enumerate()
            .map(|(index, zone)| Mirrored {
                zone,
                index: index as u8,
                reported: (0, 0),
            })
            .collect();
        // Counters of a new index start where the kernel's are now.
        for z in &mut self.zones {
            z.reported = self.path.zone_hits(z.index).unwrap_or((0, 0));
        }
        self.resync(Instant::now())
    }

    /// Applies the caches' events since the last call (or rebuilds the map if a queue
    /// overflowed).
    pub fn sync(&mut self, now: Instant) -> SyncReport {
        let mut report = SyncReport::default();
        let mut resync = false;
        for i in 0..self.zones.len() {
            let (index, prefetch) = (
                self.zones[i].index,
                prefetch_percentage(self.zones[i].zone.cache()),
            );
            self.events.clear();
            resync |= lock(self.zones[i].zone.cache()).drain_events(&mut self.events);
            let events = std::mem::take(&mut self.events);
            for event in &events {
                self.apply(event, index, prefetch, now, &mut report);
            }
            self.events = events;
        }
        if resync {
            return self.resync(now);
        }
        report
    }

    fn apply(
        &mut self,
        event: &Event,
        index: u8,
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
                let Some(k) = kernel_key(key) else {
                    report.skipped += 1;
                    return;
                };
                match kernel_entry(image, *expires, prefetch, now, index) {
                    Ok(entry) => match self.path.insert(&k, &entry) {
                        Ok(()) => report.inserted += 1,
                        Err(e) => warn!(error = %e, "fast path insert failed"),
                    },
                    Err(_) => {
                        // Too big for the kernel: make sure an older answer does not linger.
                        report.skipped += 1;
                        let _ = self.path.remove(&k);
                    }
                }
            }
            Event::Removed { key } => {
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
        for i in 0..self.zones.len() {
            let (index, prefetch) = (
                self.zones[i].index,
                prefetch_percentage(self.zones[i].zone.cache()),
            );
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
            for event in &events {
                self.apply(event, index, prefetch, now, &mut report);
            }
        }
        report
    }

    /// The kernel's packet counters.
    pub fn stats(&self) -> ebpf::Result<Stats> {
        self.path.stats()
    }

    /// Kernel hits per mirrored zone since the last call: (zone, success, denial).
    pub fn new_hits(&mut self) -> Vec<(Arc<Zone>, u64, u64)> {
        let mut out = Vec::new();
        for z in &mut self.zones {
            let Ok(now) = self.path.zone_hits(z.index) else {
                continue;
            };
            let delta = (
                now.0.saturating_sub(z.reported.0),
                now.1.saturating_sub(z.reported.1),
            );
            z.reported = now;
            if delta != (0, 0) {
                out.push((Arc::clone(&z.zone), delta.0, delta.1));
            }
        }
        out
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
