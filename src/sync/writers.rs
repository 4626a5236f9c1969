//! Which files of the shares are still open for writing, from the file watcher's events:
//! a file written and then closed is whole and can ship at once, while one whose writer
//! is still at it gets the settle time (so a half-written file does not ship). Removals
//! and renames get the settle time too: `rm -rf share/*` is many events, and they must
//! reach the others as one batch, for the hold on mass deletions to see them whole. It takes
//! events and `now`, and answers whether anything is still being written; it must not
//! watch, scan or know inotify's types (the daemon translates them).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the watcher saw happen to a path, as far as writing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Created or its content changed: a writer may still have it open.
    Written,
    /// Its writer closed it (inotify's close-after-write).
    Closed,
    /// Removed or renamed away: nobody writes it at this path any more.
    Gone,
    /// Anything else (a folder made, a rename into place, an event with no kind): it
    /// says nothing of writers.
    Other,
}

/// Paths written and not yet closed, with when they were last written.
#[derive(Debug)]
pub struct Writers {
    open: HashMap<PathBuf, Instant>,
    /// A path written this long ago and never closed (written through mmap, truncated,
    /// its close event lost) no longer holds changes back.
    stale: Duration,
    /// At most this many tracked paths: past it the oldest go, and their changes ship on
    /// the settle timer as before.
    cap: usize,
    /// A removal or rename seen since the last scan.
    gone: bool,
}

impl Writers {
    pub fn new(stale: Duration, cap: usize) -> Writers {
        Writers {
            open: HashMap::new(),
            stale,
            cap,
            gone: false,
        }
    }

    /// Takes in one event; returns whether a scan now would find every change whole:
    /// every file written lately closed, and no removal waiting to be batched.
    pub fn seen(&mut self, what: Seen, paths: &[PathBuf], now: Instant) -> bool {
        match what {
            Seen::Written => {
                for p in paths {
                    self.open.insert(p.clone(), now);
                }
            }
            Seen::Closed | Seen::Gone => {
                self.gone |= what == Seen::Gone;
                for p in paths {
                    self.open.remove(p);
                }
            }
            Seen::Other => {}
        }
        let stale = self.stale;
        self.open.retain(|_, at| now.duration_since(*at) < stale);
        while self.open.len() > self.cap {
            let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            self.open.remove(&oldest);
        }
        self.open.is_empty() && !self.gone
    }

    /// Whether a scan now would find every change whole, as of `now`.
    pub fn all_closed(&mut self, now: Instant) -> bool {
        self.seen(Seen::Other, &[], now)
    }

    /// A scan looked at the share: removals seen so far are in it.
    pub fn scanned(&mut self) {
        self.gone = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<PathBuf> {
        vec![PathBuf::from(s)]
    }

    #[test]
    fn a_file_written_then_closed_is_whole_while_another_still_open_holds_the_scan_back() {
        let mut w = Writers::new(Duration::from_millis(500), 100);
        let t = Instant::now();
        assert!(!w.seen(Seen::Written, &p("/s/a"), t));
        assert!(
            w.seen(Seen::Closed, &p("/s/a"), t),
            "a closed file is whole"
        );
        assert!(!w.seen(Seen::Written, &p("/s/a"), t));
        assert!(!w.seen(Seen::Written, &p("/s/b"), t));
        assert!(
            !w.seen(Seen::Closed, &p("/s/a"), t),
            "b is still being written"
        );
        assert!(w.seen(Seen::Closed, &p("/s/b"), t));
    }

    #[test]
    fn removals_wait_for_the_settle_time_until_a_scan_has_seen_them() {
        let mut w = Writers::new(Duration::from_millis(500), 100);
        let t = Instant::now();
        assert!(!w.seen(Seen::Gone, &p("/s/a"), t), "one removal of many");
        assert!(!w.seen(Seen::Written, &p("/s/b"), t));
        assert!(
            !w.seen(Seen::Closed, &p("/s/b"), t),
            "a removal still waits"
        );
        w.scanned();
        assert!(w.all_closed(t));
    }

    #[test]
    fn a_file_never_closed_stops_holding_changes_back_once_stale() {
        let mut w = Writers::new(Duration::from_millis(500), 100);
        let t = Instant::now();
        assert!(!w.seen(Seen::Written, &p("/s/mmapped"), t));
        assert!(!w.all_closed(t + Duration::from_millis(499)));
        assert!(w.all_closed(t + Duration::from_millis(500)));
    }

    #[test]
    fn the_paths_tracked_are_bounded_and_the_oldest_go_first() {
        let mut w = Writers::new(Duration::from_secs(60), 2);
        let t = Instant::now();
        for (i, name) in ["/s/1", "/s/2", "/s/3"].iter().enumerate() {
            w.seen(Seen::Written, &p(name), t + Duration::from_millis(i as u64));
        }
        assert_eq!(w.open.len(), 2);
        assert!(!w.open.contains_key(&PathBuf::from("/s/1")));
        // Closing the two still tracked leaves nothing held back.
        w.seen(Seen::Closed, &p("/s/2"), t);
        assert!(w.seen(Seen::Closed, &p("/s/3"), t));
    }
}
