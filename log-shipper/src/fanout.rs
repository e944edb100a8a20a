//! Checkpoints when a line goes to two stores, or to none; without IO.
//!
//! A file's checkpoint may only pass a line once every store the line went to accepted it,
//! and every earlier line of the file too. With one store per line that is the store's own
//! order: a store acknowledges a file's lines in order, having one task at a time (the agent
//! starts a store's new task only once its retired one ended). A shoot in creation or
//! deletion sends its lines to its store and to the seed's, a hibernated one to none, and a
//! state change moves a file from one set to another mid-stream: so the tailer thread sends every line's
//! acknowledgement through [`Fanout`], which keeps, per file, the runs of lines still waiting
//! and their stores, and lets an offset through once nothing before it waits.
//!
//! Consecutive lines waiting for the same stores share one run, so the state is one entry per
//! change of routing still in flight, not one per line.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lifecycle::Stores;
use crate::tail::FileRef;
use crate::FastMap;

/// Lines of a file up to `offset` (after the previous run) waiting for `waiting`, the first
/// of them sent at `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    offset: u64,
    waiting: Stores,
    since: Instant,
}

/// How far the stores are behind: the age of the oldest line each waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// The seed's store.
    pub seed: Duration,
    /// The shoot store most behind.
    pub shoot: Duration,
    /// Files with lines in flight.
    pub files: usize,
}

/// The acknowledgements in flight, per file.
#[derive(Debug, Default)]
pub struct Fanout {
    files: FastMap<FileRef, VecDeque<Run>>,
}

impl Fanout {
    /// Nothing in flight.
    pub fn new() -> Fanout {
        Fanout::default()
    }

    /// A line of `file` ending at `offset` went to `to`. Returns the offset the file's
    /// checkpoint may advance to now, if any (a line sent nowhere with nothing before it
    /// waiting).
    pub fn sent(&mut self, file: FileRef, offset: u64, to: Stores, now: Instant) -> Option<u64> {
        let runs = self.files.entry(file).or_default();
        match runs.back_mut() {
            Some(back) if back.waiting == to => back.offset = back.offset.max(offset),
            _ => runs.push_back(Run {
                offset,
                waiting: to,
                since: now,
            }),
        }
        // Only a line sent nowhere can be released now (the front run waits otherwise):
        // the common case is done without a second lookup.
        if runs.front().is_some_and(|front| front.waiting.is_empty()) {
            self.release(file)
        } else {
            None
        }
    }

    /// `from` accepted the lines of `file` up to `offset`. Returns the offset the file's
    /// checkpoint may advance to now, if any.
    pub fn acked(&mut self, file: FileRef, offset: u64, from: Stores) -> Option<u64> {
        let runs = self.files.get_mut(&file)?;
        for run in runs.iter_mut() {
            if run.offset > offset {
                break;
            }
            run.waiting = run.waiting.without(from);
        }
        self.release(file)
    }

    /// Files with lines in flight.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// The lag of the stores at `now` (a run's age counts from its first line: an upper
    /// bound for its later lines).
    pub fn lag(&self, now: Instant) -> Lag {
        let mut lag = Lag {
            files: self.files.len(),
            ..Lag::default()
        };
        for runs in self.files.values() {
            for (store, worst) in [
                (Stores::SEED, &mut lag.seed),
                (Stores::SHOOT, &mut lag.shoot),
            ] {
                if let Some(run) = runs.iter().find(|r| r.waiting.contains(store)) {
                    *worst = (*worst).max(now.saturating_duration_since(run.since));
                }
            }
        }
        lag
    }

    /// Pops the runs at the front that wait for nothing; the last one's offset.
    fn release(&mut self, file: FileRef) -> Option<u64> {
        let runs = self.files.get_mut(&file)?;
        let mut done = None;
        while let Some(front) = runs.front() {
            if !front.waiting.is_empty() {
                break;
            }
            done = Some(front.offset);
            runs.pop_front();
        }
        if runs.is_empty() {
            self.files.remove(&file);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::checkpoint::FileKey;
    use proptest::prelude::*;

    fn file(n: u64) -> FileRef {
        FileRef {
            key: FileKey { dev: 1, ino: n },
            epoch: 0,
        }
    }

    const SHOOT: Stores = Stores::SHOOT;
    const SEED: Stores = Stores::SEED;
    const BOTH: Stores = Stores::BOTH;
    const NONE: Stores = Stores::NONE;

    fn at(ms: u64) -> Instant {
        thread_local!(static BASE: Instant = Instant::now());
        BASE.with(|b| *b + Duration::from_millis(ms))
    }

    #[test]
    fn one_store_passes_through() {
        let mut f = Fanout::new();
        assert_eq!(f.sent(file(1), 10, SHOOT, at(0)), None);
        assert_eq!(f.sent(file(1), 20, SHOOT, at(0)), None);
        assert_eq!(
            f.acked(file(1), 10, SHOOT),
            None,
            "one run: waits for its end"
        );
        assert_eq!(f.acked(file(1), 20, SHOOT), Some(20));
        assert_eq!(f.files(), 0);
        assert_eq!(f.acked(file(1), 30, SHOOT), None, "nothing in flight");
    }

    #[test]
    fn both_stores_must_accept() {
        let mut f = Fanout::new();
        f.sent(file(1), 10, BOTH, at(0));
        assert_eq!(f.acked(file(1), 10, SEED), None);
        assert_eq!(f.acked(file(1), 10, SHOOT), Some(10));
    }

    #[test]
    fn a_muted_line_waits_for_the_lines_before_it() {
        let mut f = Fanout::new();
        assert_eq!(f.sent(file(1), 10, SHOOT, at(0)), None);
        assert_eq!(
            f.sent(file(1), 20, NONE, at(0)),
            None,
            "the shoot has not accepted 10"
        );
        assert_eq!(f.acked(file(1), 10, SHOOT), Some(20));
        assert_eq!(
            f.sent(file(1), 30, NONE, at(0)),
            Some(30),
            "nothing before it waits"
        );
    }

    #[test]
    fn a_change_of_routing_mid_file() {
        let mut f = Fanout::new();
        f.sent(file(1), 10, SHOOT, at(0));
        f.sent(file(1), 20, BOTH, at(0));
        f.sent(file(1), 30, SHOOT, at(0));
        // The seed is fast, the shoot slow.
        assert_eq!(f.acked(file(1), 20, SEED), None);
        assert_eq!(f.acked(file(1), 10, SHOOT), Some(10));
        assert_eq!(f.acked(file(1), 30, SHOOT), Some(30));
        // The shoot is fast, the seed slow.
        f.sent(file(1), 40, BOTH, at(0));
        f.sent(file(1), 50, SHOOT, at(0));
        assert_eq!(f.acked(file(1), 50, SHOOT), None);
        assert_eq!(f.acked(file(1), 40, SEED), Some(50));
    }

    #[test]
    fn lag_is_the_oldest_waiting_line_per_store() {
        let mut f = Fanout::new();
        f.sent(file(1), 10, SHOOT, at(0));
        f.sent(file(1), 20, BOTH, at(100));
        f.sent(file(2), 10, SEED, at(300));
        f.sent(file(2), 20, SEED, at(350));
        assert_eq!(
            f.lag(at(1000)),
            Lag {
                seed: Duration::from_millis(900),
                shoot: Duration::from_millis(1000),
                files: 2
            }
        );
        f.acked(file(1), 10, SHOOT);
        f.acked(file(1), 20, SEED);
        f.acked(file(2), 20, SEED);
        assert_eq!(
            f.lag(at(1000)),
            Lag {
                seed: Duration::ZERO,
                shoot: Duration::from_millis(900),
                files: 1
            }
        );
    }

    #[test]
    fn files_are_independent() {
        let mut f = Fanout::new();
        f.sent(file(1), 10, BOTH, at(0));
        f.sent(file(2), 10, SEED, at(0));
        assert_eq!(f.acked(file(2), 10, SEED), Some(10));
        assert_eq!(f.files(), 1);
    }

    proptest! {
        /// Against an oracle that keeps every line: the released offset never passes the
        /// longest prefix of lines every store of theirs accepted (runs may release later
        /// than the line), and once every store accepted everything, all of it is released.
        #[test]
        fn releases_exactly_the_accepted_prefix(
            routes in proptest::collection::vec(0u8..4, 1..40),
            order in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let stores = |r: u8| match r { 0 => NONE, 1 => SHOOT, 2 => SEED, _ => BOTH };
            let mut f = Fanout::new();
            // Each store acknowledges its lines in order, at its own pace.
            let mut acked = [0usize; 2];
            let mut waiting: Vec<Stores> = Vec::new();
            let mut released = 0u64;
            let apply = |r: Option<u64>, released: &mut u64| {
                if let Some(o) = r {
                    prop_assert!(o > *released);
                    *released = o;
                }
                Ok(())
            };
            for (i, r) in routes.iter().enumerate() {
                let offset = (i as u64 + 1) * 10;
                waiting.push(stores(*r));
                apply(f.sent(file(1), offset, stores(*r), at(0)), &mut released)?;
            }
            let mut step = |store: usize, f: &mut Fanout, waiting: &mut Vec<Stores>, released: &mut u64| -> Result<(), TestCaseError> {
                let bit = if store == 0 { SHOOT } else { SEED };
                // The next line this store has not acknowledged yet.
                let next = (acked[store]..waiting.len()).find(|&i| stores(routes[i]).contains(bit));
                if let Some(i) = next {
                    acked[store] = i + 1;
                    waiting[i] = waiting[i].without(bit);
                    apply(f.acked(file(1), (i as u64 + 1) * 10, bit), released)?;
                }
                Ok(())
            };
            for shoot_first in &order {
                step(usize::from(!shoot_first), &mut f, &mut waiting, &mut released)?;
                let prefix = waiting.iter().take_while(|w| w.is_empty()).count() as u64 * 10;
                prop_assert!(released <= prefix, "{released} > {prefix}");
            }
            for _ in 0..routes.len() {
                step(0, &mut f, &mut waiting, &mut released)?;
                step(1, &mut f, &mut waiting, &mut released)?;
            }
            prop_assert_eq!(released, routes.len() as u64 * 10);
            prop_assert_eq!(f.files(), 0);
        }
    }
}
