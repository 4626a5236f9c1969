//! Who is at work on which path of a share: announced versions queued for the share's
//! few pull workers, versions handed to a worker and not yet applied, holds that keep
//! the scan off a path a worker is changing, and the files still to pull shown in
//! `status`. Bookkeeping only, under short locks: no file is touched here.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crate::base::lock::Recover;
use crate::data::transfer::Progress;
use crate::sync::versions::FileVersion;

/// Pulls of one share that run at once: a small change does not wait behind a big file,
/// and four pulls of four workers each keep a link busy without flooding it.
pub const MAX_PULLS: usize = 4;

/// A file still to pull: its size, and the pull's progress once it runs.
pub type Left = (u64, Option<Arc<Progress>>);

/// The bookkeeping of one share's pulls.
#[derive(Default)]
pub struct Pulls {
    /// Files announced to us and still to pull: their size, and the pull's progress once
    /// it runs.
    left: Mutex<BTreeMap<String, Left>>,
    /// Announced versions waiting for one of at most [`MAX_PULLS`] workers, and the
    /// paths the workers hold: one queue per share, not one task per version.
    work: Mutex<Work>,
    /// By path: announced versions handed to a task and not yet applied, and holds of
    /// the tasks at work there. The scan leaves a held path alone: what lies there (or
    /// not) is the task's until it has recorded the outcome.
    flights: Mutex<HashMap<String, Flights>>,
}

/// Announced versions waiting for a worker, the paths workers hold, how many run.
#[derive(Default)]
struct Work {
    /// Who announced which path, in the order they came.
    queue: VecDeque<([u8; 32], String)>,
    /// The version waiting for each of them: one per member and path.
    waiting: HashMap<([u8; 32], String), FileVersion>,
    busy: HashSet<String>,
    workers: usize,
}

/// What [`Pulls::enqueue`] did with a version.
#[derive(Debug)]
pub struct Enqueued {
    /// The caller must start a worker.
    pub start: bool,
    /// The same member's older version of the path, no longer queued.
    pub superseded: Option<FileVersion>,
}

/// Files queued by one announcement; whatever is still queued goes when it drops.
pub struct Queued<'a> {
    pulls: &'a Pulls,
    paths: Vec<String>,
}

/// What identifies an announced version among a path's flights.
fn flight_key(v: &FileVersion) -> String {
    format!("{:?}", (&v.content, v.deleted, &v.vv))
}

/// The tasks concerned with one path.
#[derive(Default)]
struct Flights {
    /// Announced versions handed to a task and not yet applied.
    versions: HashSet<String>,
    /// Tasks changing what lies at the path right now.
    holds: usize,
}

/// A path the scan leaves alone while this lives.
pub struct Held<'a> {
    pulls: &'a Pulls,
    path: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.pulls
            .release(&self.path, |f| f.holds = f.holds.saturating_sub(1));
    }
}

impl Queued<'_> {
    /// `path` stays queued past this guard: a task pulls it and unqueues it when done.
    pub fn keep(&mut self, path: &str) {
        self.paths.retain(|p| p != path);
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        for p in &self.paths {
            self.pulls.unqueue(p);
        }
    }
}

impl Pulls {
    /// Queues announced version `v` from member `from` for a worker. `start` is true when
    /// the caller must start a new worker (it then owns one of the [`MAX_PULLS`] places
    /// and must end with [`Pulls::worker_done`]); false when a running one will take it.
    /// A version of the same path from the same member still waiting is replaced, not
    /// queued behind: a member's newer announcement supersedes its older one, and the
    /// queue stays within members × paths however often a member announces. The one
    /// replaced is returned, for the caller to land its flight.
    pub fn enqueue(&self, from: [u8; 32], v: FileVersion) -> Enqueued {
        let mut w = self.work.locked();
        let key = (from, v.path.clone());
        if let Some(waiting) = w.waiting.get_mut(&key) {
            return Enqueued {
                start: false,
                superseded: Some(std::mem::replace(waiting, v)),
            };
        }
        w.waiting.insert(key.clone(), v);
        w.queue.push_back(key);
        let start = w.workers < MAX_PULLS;
        if start {
            w.workers += 1;
        }
        Enqueued {
            start,
            superseded: None,
        }
    }

    /// The next version for a worker that finished `done` (if any): the first queued
    /// one whose path no other worker holds, so two pulls never share a partial file and
    /// versions of one path run in the order they came. `None` ends the worker: what
    /// is left belongs to paths held by workers that take it after their own.
    pub fn next_work(&self, done: Option<&str>) -> Option<([u8; 32], FileVersion)> {
        let mut w = self.work.locked();
        if let Some(done) = done {
            w.busy.remove(done);
        }
        let at = w.queue.iter().position(|(_, path)| !w.busy.contains(path));
        let job = at
            .and_then(|i| w.queue.remove(i))
            .and_then(|key| w.waiting.remove(&key).map(|v| (key.0, v)));
        match job {
            Some(job) => {
                w.busy.insert(job.1.path.clone());
                Some(job)
            }
            None => {
                w.workers = w.workers.saturating_sub(1);
                None
            }
        }
    }

    /// Ends a worker that stops early (cancelled, or unwinding) while holding `held`.
    pub fn worker_done(&self, held: Option<&str>) {
        let mut w = self.work.locked();
        if let Some(path) = held {
            w.busy.remove(path);
        }
        w.workers = w.workers.saturating_sub(1);
    }

    /// Versions queued and workers running, for tests and `status`.
    pub fn work_load(&self) -> (usize, usize) {
        let w = self.work.locked();
        (w.queue.len(), w.workers)
    }

    /// Hands announced version `v` to a task; false when an identical one is already in
    /// flight (a full round repeating itself during a long pull).
    pub fn take_off(&self, v: &FileVersion) -> bool {
        self.flights
            .locked()
            .entry(v.path.clone())
            .or_default()
            .versions
            .insert(flight_key(v))
    }

    /// The task for `v` is done: its outcome is recorded (or given up).
    pub fn land(&self, v: &FileVersion) {
        self.release(&v.path, |f| {
            f.versions.remove(&flight_key(v));
        });
    }

    /// Keeps the scan off `path` until the guard goes: a task is changing what lies
    /// there and has not recorded it yet.
    pub fn hold(&self, path: &str) -> Held<'_> {
        self.flights
            .locked()
            .entry(path.to_string())
            .or_default()
            .holds += 1;
        Held {
            pulls: self,
            path: path.to_string(),
        }
    }

    /// A task is changing `path` right now.
    pub fn held(&self, path: &str) -> bool {
        self.flights.locked().get(path).is_some_and(|f| f.holds > 0)
    }

    /// Changes the flights of `path`, forgetting the path once no task is concerned.
    fn release(&self, path: &str, change: impl FnOnce(&mut Flights)) {
        let mut flights = self.flights.locked();
        if let Some(f) = flights.get_mut(path) {
            change(f);
            if f.versions.is_empty() && f.holds == 0 {
                flights.remove(path);
            }
        }
    }

    /// Some task holds `path`.
    pub fn in_flight(&self, path: &str) -> bool {
        self.flights.locked().contains_key(path)
    }

    /// Some task holds a path inside folder `path`.
    pub fn in_flight_under(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.flights.locked().keys().any(|k| k.starts_with(&prefix))
    }

    /// Notes files to pull (path, size) until the returned guard goes.
    pub fn queue(&self, files: impl IntoIterator<Item = (String, u64)>) -> Queued<'_> {
        let mut left = self.left.locked();
        let paths = files
            .into_iter()
            .map(|(path, size)| {
                left.insert(path.clone(), (size, None));
                path
            })
            .collect();
        Queued { pulls: self, paths }
    }

    /// The pull of `path` runs, with this progress.
    pub fn pulling(&self, path: &str, progress: Arc<Progress>) {
        if let Some(e) = self.left.locked().get_mut(path) {
            e.1 = Some(progress);
        }
    }

    /// `path` is no longer to pull (done, or given up until it is announced again).
    pub fn unqueue(&self, path: &str) {
        self.left.locked().remove(path);
    }
}

impl Pulls {
    /// Files still to pull, for `status`.
    pub fn left(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Left>> {
        self.left.locked()
    }

    /// The paths workers hold, for tests.
    #[cfg(test)]
    pub fn busy(&self) -> HashSet<String> {
        self.work.locked().busy.clone()
    }
}
