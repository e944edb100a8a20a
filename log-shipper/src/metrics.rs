//! Every metric of log-shipper, declared once, registered in the registry the caller passes
//! in. The tailer's and the delivery policies' own counters (`tail::Stats`, `deliver::Stats`)
//! are added here as differences since the last update, by the loop that owns them; labels
//! are bounded (`store` is `seed` or `shoot`, `reason` and `kind` closed enums).

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::deliver;
use crate::fanout;
use crate::lifecycle::State;
use crate::tail;

/// A counter of the tailer: its name, help and field.
type TailCounter = (&'static str, &'static str, fn(&tail::Stats) -> u64);

/// The tailer's counters, exported one to one.
const TAIL_COUNTERS: [TailCounter; 14] = [
    (
        "log_shipper_read_bytes_total",
        "Bytes read from log files.",
        |s| s.bytes,
    ),
    (
        "log_shipper_files_opened_total",
        "Log files opened (reopens after an eviction included).",
        |s| s.opened,
    ),
    (
        "log_shipper_files_resumed_total",
        "Log files started from a persisted checkpoint.",
        |s| s.resumed,
    ),
    (
        "log_shipper_checkpoint_mismatches_total",
        "Log files whose checkpoint did not fit (inode reused, truncated): read from 0.",
        |s| s.checkpoint_mismatch,
    ),
    ("log_shipper_rotations_total", "Rotations seen.", |s| {
        s.rotations
    }),
    (
        "log_shipper_rotated_drained_total",
        "Rotated files read to their end and closed.",
        |s| s.rotated_drained,
    ),
    (
        "log_shipper_deleted_drained_total",
        "Files deleted while open, read to their end and closed.",
        |s| s.deleted_drained,
    ),
    (
        "log_shipper_truncations_total",
        "Files that shrank below the read position, read again from 0.",
        |s| s.truncations,
    ),
    (
        "log_shipper_files_vanished_unread_total",
        "Files gone before they were read to their end: their unread lines are lost.",
        |s| s.vanished_unread,
    ),
    (
        "log_shipper_evictions_total",
        "Idle files closed to give their descriptor to a waiting one.",
        |s| s.evictions,
    ),
    (
        "log_shipper_entries_split_total",
        "Entries cut at input.max_entry_bytes; the rest follows as the next entry.",
        |s| s.split,
    ),
    ("log_shipper_read_errors_total", "Failed reads.", |s| {
        s.read_errors
    }),
    (
        "log_shipper_stale_acks_total",
        "Acknowledgements of an unknown file or a past epoch, ignored.",
        |s| s.stale_acks,
    ),
    (
        "log_shipper_checkpoints_ignored_total",
        "Damaged lines of the checkpoint file ignored at start.",
        |s| s.checkpoints_ignored,
    ),
];

/// The metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    tail: Vec<IntCounter>,
    /// Directories of another layout than the kubelet's at the last scan.
    pub malformed_dirs: IntGauge,
    /// Files held open.
    pub open_files: IntGauge,
    /// Files known.
    pub files: IntGauge,
    /// Entries handed to a store's queue, per store.
    pub entries_routed: IntCounterVec,
    /// Malformed CRI lines (skipped), per store.
    pub malformed_lines: IntCounterVec,
    /// Stores whose queue is full: their files are not read.
    pub paused_stores: IntGaugeVec,
    /// Stores (seed and one per shoot namespace seen).
    pub stores: IntGaugeVec,
    /// Shoot stores ended after going idle.
    pub retired_stores: IntCounter,
    /// Entries of shoots whose state sends them nowhere (hibernating, hibernated by default),
    /// acknowledged unsent.
    pub muted_entries: IntCounter,
    /// Failed watches of the `Cluster` resources (each retried).
    pub cluster_watch_errors: IntCounter,
    /// `Cluster` resources not understood.
    pub cluster_errors: IntCounter,
    clusters: IntGaugeVec,
    lag: GaugeVec,
    files_in_flight: IntGauge,
    checkpoint_age: Gauge,
    requests: IntCounterVec,
    accepted_entries: IntCounterVec,
    accepted_bytes: IntCounterVec,
    retries: IntCounterVec,
    rejected: IntCounterVec,
    skipped: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    if let Err(error) = registry.register(Box::new(c.clone())) {
        tracing::warn!(%error, "metric not registered");
    }
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    #[allow(clippy::expect_used)]
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg(registry, c)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    #[allow(clippy::expect_used)]
    let c = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg(registry, c)
}

fn counter(name: &str, help: &str) -> IntCounter {
    #[allow(clippy::expect_used)]
    IntCounter::new(name, help).expect("valid metric")
}

fn float_gauge(name: &str, help: &str) -> Gauge {
    #[allow(clippy::expect_used)]
    Gauge::new(name, help).expect("valid metric")
}

fn float_gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    #[allow(clippy::expect_used)]
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    #[allow(clippy::expect_used)]
    let c = IntGauge::new(name, help).expect("valid metric");
    reg(registry, c)
}

impl Metrics {
    /// Declares and registers every metric in `registry`.
    pub fn new(registry: &Registry) -> Metrics {
        let tail = TAIL_COUNTERS
            .iter()
            .map(|(name, help, _)| {
                #[allow(clippy::expect_used)]
                let c = IntCounter::new(*name, *help).expect("valid metric");
                reg(registry, c)
            })
            .collect();
        let store = &["store"];
        Metrics {
            tail,
            malformed_dirs: gauge(
                registry,
                "log_shipper_malformed_dirs",
                "Directories under the log root not of the kubelet's layout, at the last scan.",
            ),
            open_files: gauge(registry, "log_shipper_open_files", "Log files held open."),
            files: gauge(
                registry,
                "log_shipper_files",
                "Log files known (open, waiting for a descriptor, or drained and not yet deleted).",
            ),
            entries_routed: counter_vec(
                registry,
                "log_shipper_entries_routed_total",
                "Entries read and handed to a store's queue.",
                store,
            ),
            malformed_lines: counter_vec(
                registry,
                "log_shipper_malformed_lines_total",
                "Lines that are not CRI, skipped.",
                store,
            ),
            paused_stores: gauge_vec(
                registry,
                "log_shipper_paused_stores",
                "Stores whose queue is full: their files are not read until it has room.",
                store,
            ),
            stores: gauge_vec(
                registry,
                "log_shipper_stores",
                "Stores being sent to (the seed's, one per shoot namespace seen).",
                store,
            ),
            retired_stores: reg(
                registry,
                counter(
                    "log_shipper_stores_retired_total",
                    "Stores ended: shoot stores without a line for a while (deleted or hibernated shoots), and stores of a config replaced by a reload.",
                ),
            ),
            muted_entries: reg(
                registry,
                counter(
                    "log_shipper_entries_muted_total",
                    "Entries of shoots whose lifecycle state sends them to no store, acknowledged unsent.",
                ),
            ),
            cluster_watch_errors: reg(
                registry,
                counter(
                    "log_shipper_cluster_watch_errors_total",
                    "Failed watches of the Cluster resources, each retried with backoff.",
                ),
            ),
            cluster_errors: reg(
                registry,
                counter(
                    "log_shipper_cluster_errors_total",
                    "Cluster resources not understood (their shoot counts as unknown).",
                ),
            ),
            clusters: gauge_vec(
                registry,
                "log_shipper_clusters",
                "Shoots by lifecycle state, from the Cluster resources.",
                &["state"],
            ),
            lag: reg(registry, float_gauge_vec(
                "log_shipper_lag_seconds",
                "Age of the oldest line read and not yet accepted, per store (for shoot: the shoot store most behind).",
                store,
            )),
            files_in_flight: gauge(
                registry,
                "log_shipper_files_in_flight",
                "Files with lines read and not yet accepted by every store they went to.",
            ),
            checkpoint_age: reg(registry, float_gauge(
                "log_shipper_checkpoint_age_seconds",
                "Time since the checkpoints were last persisted.",
            )),
            requests: counter_vec(
                registry,
                "log_shipper_requests_total",
                "Push requests made.",
                store,
            ),
            accepted_entries: counter_vec(
                registry,
                "log_shipper_entries_accepted_total",
                "Entries a store accepted (2xx).",
                store,
            ),
            accepted_bytes: counter_vec(
                registry,
                "log_shipper_accepted_bytes_total",
                "Uncompressed bytes of the entries a store accepted.",
                store,
            ),
            retries: counter_vec(
                registry,
                "log_shipper_retries_total",
                "Pushes retried, by kind.",
                &["store", "kind"],
            ),
            rejected: counter_vec(
                registry,
                "log_shipper_entries_rejected_total",
                "Entries a store refused with a 400, by the parsed reason; not retried.",
                &["store", "reason"],
            ),
            skipped: counter_vec(
                registry,
                "log_shipper_entries_skipped_total",
                "Entries dropped under outage_policy skip.",
                store,
            ),
        }
    }

    /// Adds the tailer's counters that grew since `last`.
    pub fn tail(&self, last: &tail::Stats, now: &tail::Stats) {
        for (c, (_, _, field)) in self.tail.iter().zip(TAIL_COUNTERS.iter()) {
            c.inc_by(field(now).saturating_sub(field(last)));
        }
        self.malformed_dirs.set(now.malformed_dirs as i64);
    }

    /// Sets the lag gauges, and the checkpoint age if they were ever persisted.
    pub fn lag(&self, lag: &fanout::Lag, checkpoint_age: Option<std::time::Duration>) {
        self.lag
            .with_label_values(&["seed"])
            .set(lag.seed.as_secs_f64());
        self.lag
            .with_label_values(&["shoot"])
            .set(lag.shoot.as_secs_f64());
        self.files_in_flight.set(lag.files as i64);
        if let Some(age) = checkpoint_age {
            self.checkpoint_age.set(age.as_secs_f64());
        }
    }

    /// Sets the shoots per lifecycle state.
    pub fn clusters(&self, states: &std::collections::HashMap<String, State>) {
        for state in State::ALL {
            let n = states.values().filter(|s| **s == state).count();
            self.clusters
                .with_label_values(&[state.as_str()])
                .set(n as i64);
        }
    }

    /// Adds a policy's counters that grew since `last`.
    pub fn deliver(&self, store: &str, last: &deliver::Stats, now: &deliver::Stats) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        self.requests
            .with_label_values(&[store])
            .inc_by(d(last.requests, now.requests));
        self.accepted_entries
            .with_label_values(&[store])
            .inc_by(d(last.accepted_entries, now.accepted_entries));
        self.accepted_bytes
            .with_label_values(&[store])
            .inc_by(d(last.accepted_bytes, now.accepted_bytes));
        self.skipped
            .with_label_values(&[store])
            .inc_by(d(last.skipped_entries, now.skipped_entries));
        for (kind, n) in &now.retries {
            let was = last.retries.get(kind).copied().unwrap_or(0);
            if *n > was {
                self.retries
                    .with_label_values(&[store, kind.as_str()])
                    .inc_by(n - was);
            }
        }
        for (reason, n) in &now.rejected_entries {
            let was = last.rejected_entries.get(reason).copied().unwrap_or(0);
            if *n > was {
                self.rejected
                    .with_label_values(&[store, reason.as_str()])
                    .inc_by(n - was);
            }
        }
    }
}
