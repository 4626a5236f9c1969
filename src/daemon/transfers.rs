//! The registry of this node's `get`s: each one's request, owner, progress and state
//! ([`TransferState`], typed), and who may take the file a finished one handed over.
//! It is bounded: finished entries are forgotten after [`KEEP_FINISHED`], and beyond
//! [`MAX_FINISHED`] the oldest finished go first; running ones are never dropped, and a
//! file handed over and not yet taken by the CLI is kept [`KEEP_UNCOLLECTED`] (the CLI
//! may still be copying a big one), whatever the count. It
//! decides under its lock and does no I/O: the files of forgotten entries are returned
//! for the caller to delete outside it. It must not fetch anything (that is
//! `data::transfer`'s) nor know HTTP statuses (the control handler maps its errors).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::base::lock::Recover;
use crate::data::transfer::Progress;

/// How long a finished transfer stays listed (and its handed-over file kept for the CLI).
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);
/// The most finished transfers kept listed; the oldest go first beyond it.
pub const MAX_FINISHED: usize = 64;
/// How long a handed-over file nobody has taken yet is kept for the CLI.
pub const KEEP_UNCOLLECTED: Duration = Duration::from_secs(24 * 3600);

/// Where a transfer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferState {
    Running,
    Done,
    /// Ended with this error.
    Failed(String),
}

/// What one `get` was asked to do, fixed when it starts.
#[derive(Debug, Clone)]
pub struct Request {
    /// `SHARE/PATH`.
    pub target: String,
    pub dest: PathBuf,
    /// Where the daemon writes the file when it may not write `dest` itself.
    pub handoff: Option<PathBuf>,
    /// The user who asked: the only one (with root) the handed-over file is given to.
    pub owner: u32,
    /// The member the file comes from.
    pub source: String,
}

struct Entry {
    request: Request,
    progress: Arc<Progress>,
    state: TransferState,
    /// When it ended, for pruning.
    finished_at: Option<Instant>,
    /// The CLI took the handed-over file (and the daemon deleted its copy).
    collected: bool,
}

impl Entry {
    /// A finished transfer whose file waits in the downloads folder for the CLI.
    fn awaits_collection(&self) -> bool {
        self.state == TransferState::Done && self.request.handoff.is_some() && !self.collected
    }
}

/// One transfer as it stands, read out of the registry.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub request: Request,
    pub size: u64,
    pub done: u64,
    pub corrupt_chunks: u64,
    pub route: String,
    pub state: TransferState,
}

/// Why a handed-over file is not given out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("no transfer {0}")]
    Find(String),
    #[error("transfer {0} is another user's: its file is theirs to take")]
    CheckOwner(String),
    #[error("transfer {0} wrote its destination itself: there is nothing to hand over")]
    FindHandoff(String),
    #[error("transfer {0} has not finished well: wait for `watchalong transfers` to say done")]
    CheckFinished(String),
}

/// The `get`s of this node, by id.
#[derive(Default)]
pub struct Transfers {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Transfers {
    /// Registers transfer `id` as running. Returns the handed-over files of the finished
    /// transfers pruned to make room, for the caller to delete outside the lock.
    pub fn start(
        &self,
        id: String,
        request: Request,
        progress: Arc<Progress>,
        now: Instant,
    ) -> Vec<PathBuf> {
        let mut entries = self.entries.locked();
        let dropped = prune(&mut entries, now);
        entries.insert(
            id,
            Entry {
                request,
                progress,
                state: TransferState::Running,
                finished_at: None,
                collected: false,
            },
        );
        dropped
    }

    /// Records how transfer `id` ended.
    pub fn finish(&self, id: &str, result: Result<(), String>, now: Instant) {
        if let Some(e) = self.entries.locked().get_mut(id) {
            e.state = match result {
                Ok(()) => TransferState::Done,
                Err(error) => TransferState::Failed(error),
            };
            e.finished_at = Some(now);
        }
    }

    /// The CLI took transfer `id`'s handed-over file: the entry may go like any other.
    pub fn collected(&self, id: &str) {
        if let Some(e) = self.entries.locked().get_mut(id) {
            e.collected = true;
        }
    }

    pub fn get(&self, id: &str) -> Option<Snapshot> {
        self.entries.locked().get(id).map(|e| snapshot(id, e))
    }

    /// Every listed transfer, by id.
    pub fn list(&self) -> Vec<Snapshot> {
        self.entries
            .locked()
            .iter()
            .map(|(id, e)| snapshot(id, e))
            .collect()
    }

    /// The file finished transfer `id` left in the daemon's downloads folder, if user
    /// `uid` may take it: the user who asked, or root.
    pub fn handed_over(&self, id: &str, uid: u32) -> Result<PathBuf, TransferError> {
        let entries = self.entries.locked();
        let e = entries
            .get(id)
            .ok_or_else(|| TransferError::Find(id.to_string()))?;
        if uid != 0 && uid != e.request.owner {
            return Err(TransferError::CheckOwner(id.to_string()));
        }
        let path = e
            .request
            .handoff
            .clone()
            .ok_or_else(|| TransferError::FindHandoff(id.to_string()))?;
        if e.state != TransferState::Done {
            return Err(TransferError::CheckFinished(id.to_string()));
        }
        Ok(path)
    }
}

fn snapshot(id: &str, e: &Entry) -> Snapshot {
    Snapshot {
        id: id.to_string(),
        request: e.request.clone(),
        size: e.progress.size.load(Relaxed),
        done: e.progress.done.load(Relaxed),
        corrupt_chunks: e.progress.corrupt.load(Relaxed),
        route: e.progress.route.locked().clone(),
        state: e.state.clone(),
    }
}

/// Forgets finished transfers older than [`KEEP_FINISHED`], then the oldest finished
/// beyond [`MAX_FINISHED`]; returns their handed-over files. A file still awaiting the
/// CLI stays until [`KEEP_UNCOLLECTED`] has passed.
fn prune(entries: &mut BTreeMap<String, Entry>, now: Instant) -> Vec<PathBuf> {
    let (mut finished, mut dropped) = (Vec::new(), Vec::new());
    entries.retain(|_, e| match e.finished_at {
        Some(at) if e.awaits_collection() => {
            let keep = now.saturating_duration_since(at) < KEEP_UNCOLLECTED;
            if !keep {
                dropped.extend(e.request.handoff.clone());
            }
            keep
        }
        _ => true,
    });
    for (id, e) in entries.iter() {
        if let Some(at) = e.finished_at.filter(|_| !e.awaits_collection()) {
            finished.push((at, id.clone()));
        }
    }
    finished.sort();
    // Room for the one about to start is made among the finished alone.
    let over = finished
        .len()
        .saturating_sub(MAX_FINISHED.saturating_sub(1));
    for (i, (at, id)) in finished.into_iter().enumerate() {
        let stale = now.saturating_duration_since(at) >= KEEP_FINISHED;
        if i < over || stale {
            if let Some(e) = entries.remove(&id) {
                dropped.extend(e.request.handoff);
            }
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(owner: u32, handoff: Option<&str>) -> Request {
        Request {
            target: "movies/film.mkv".into(),
            dest: "/home/ann/film.mkv".into(),
            handoff: handoff.map(PathBuf::from),
            owner,
            source: "living-room".into(),
        }
    }

    fn start(t: &Transfers, id: &str, r: Request, now: Instant) -> Vec<PathBuf> {
        t.start(id.into(), r, Arc::new(Progress::default()), now)
    }

    #[test]
    fn a_transfer_runs_until_finished_and_then_says_how_it_ended() {
        let t = Transfers::default();
        let now = Instant::now();
        start(&t, "a", request(1000, None), now);
        start(&t, "b", request(1000, None), now);
        assert_eq!(t.get("a").unwrap().state, TransferState::Running);
        t.finish("a", Ok(()), now);
        t.finish("b", Err("the source left".into()), now);
        assert_eq!(t.get("a").unwrap().state, TransferState::Done);
        assert_eq!(
            t.get("b").unwrap().state,
            TransferState::Failed("the source left".into())
        );
        assert!(t.get("c").is_none());
    }

    #[test]
    fn progress_is_read_live_from_the_transfer_s_counters() {
        let t = Transfers::default();
        let progress = Arc::new(Progress::default());
        t.start(
            "a".into(),
            request(0, None),
            progress.clone(),
            Instant::now(),
        );
        progress.size.store(100, Relaxed);
        progress.done.store(40, Relaxed);
        *progress.route.locked() = "direct".into();
        let s = t.get("a").unwrap();
        assert_eq!((s.size, s.done, s.route.as_str()), (100, 40, "direct"));
    }

    #[test]
    fn a_handed_over_file_goes_only_to_its_owner_or_root_and_only_once_done() {
        let t = Transfers::default();
        let now = Instant::now();
        start(&t, "a", request(1000, Some("/state/downloads/a")), now);
        assert_eq!(
            t.handed_over("a", 1000),
            Err(TransferError::CheckFinished("a".into()))
        );
        t.finish("a", Ok(()), now);
        assert_eq!(
            t.handed_over("a", 1001),
            Err(TransferError::CheckOwner("a".into()))
        );
        assert_eq!(
            t.handed_over("a", 1000).unwrap(),
            PathBuf::from("/state/downloads/a")
        );
        assert_eq!(
            t.handed_over("a", 0).unwrap(),
            PathBuf::from("/state/downloads/a")
        );
        assert_eq!(t.handed_over("x", 0), Err(TransferError::Find("x".into())));
    }

    #[test]
    fn a_failed_transfer_or_one_that_wrote_its_destination_hands_nothing_over() {
        let t = Transfers::default();
        let now = Instant::now();
        start(&t, "failed", request(1000, Some("/state/downloads/f")), now);
        t.finish("failed", Err("cut".into()), now);
        start(&t, "direct", request(1000, None), now);
        t.finish("direct", Ok(()), now);
        assert_eq!(
            t.handed_over("failed", 1000),
            Err(TransferError::CheckFinished("failed".into()))
        );
        assert_eq!(
            t.handed_over("direct", 1000),
            Err(TransferError::FindHandoff("direct".into()))
        );
    }

    #[test]
    fn finished_transfers_are_forgotten_after_a_while_and_their_files_returned() {
        let t = Transfers::default();
        let t0 = Instant::now();
        start(&t, "old", request(0, Some("/d/old")), t0);
        t.finish("old", Err("cut".into()), t0);
        start(&t, "running", request(0, Some("/d/running")), t0);
        let later = t0 + KEEP_FINISHED;
        let dropped = start(&t, "new", request(0, None), later);
        assert_eq!(dropped, vec![PathBuf::from("/d/old")]);
        assert!(t.get("old").is_none());
        assert!(
            t.get("running").is_some(),
            "a running transfer is never dropped, however old"
        );
    }

    #[test]
    fn beyond_the_cap_the_oldest_finished_transfers_go_first() {
        let t = Transfers::default();
        let t0 = Instant::now();
        for i in 0..MAX_FINISHED {
            let id = format!("{i:03}");
            start(&t, &id, request(0, None), t0);
            t.finish(&id, Ok(()), t0 + Duration::from_millis(i as u64));
        }
        start(&t, "run", request(0, None), t0);
        let list = t.list();
        assert_eq!(list.len(), MAX_FINISHED, "the cap counts the new one");
        assert!(t.get("000").is_none(), "the oldest finished went");
        assert!(t.get("001").is_some());
        assert!(t.get("run").is_some());
    }

    #[test]
    fn a_handed_over_file_the_cli_has_not_taken_outlives_the_hour_and_the_cap() {
        let t = Transfers::default();
        let t0 = Instant::now();
        start(&t, "big", request(1000, Some("/d/big")), t0);
        t.finish("big", Ok(()), t0);
        for i in 0..MAX_FINISHED + 5 {
            let id = format!("{i:03}");
            start(&t, &id, request(0, None), t0 + KEEP_FINISHED);
            t.finish(&id, Ok(()), t0 + KEEP_FINISHED);
        }
        // An hour and more than the cap later, the CLI may still be copying it.
        assert_eq!(t.handed_over("big", 1000).unwrap(), PathBuf::from("/d/big"));
        // Once taken, it goes like any other finished transfer.
        t.collected("big");
        let dropped = start(&t, "next", request(0, None), t0 + KEEP_FINISHED);
        assert_eq!(dropped, vec![PathBuf::from("/d/big")]);
        // One never taken goes after a day.
        start(&t, "lost", request(1000, Some("/d/lost")), t0);
        t.finish("lost", Ok(()), t0);
        let dropped = start(&t, "later", request(0, None), t0 + KEEP_UNCOLLECTED);
        assert!(dropped.contains(&PathBuf::from("/d/lost")));
        assert!(t.get("lost").is_none());
    }
}
