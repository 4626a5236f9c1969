//! A read-write share's sync state ([`SyncShare`]): each node scans its share,
//! turns what changed into versions (a version vector per path, see [`crate::sync::versions`]),
//! announces them to the members holding the same share, and applies what others
//! announce — pulling content through [`crate::data::transfer::get_file`] (verified chunks,
//! temp file, fsync, rename) along the planner's route. It owns the sync index and the
//! share's marker file, the partial files of its pulls and the rules that decide what an
//! announcement asks for; the index's storage is [`crate::sync::index`]'s. It never deletes
//! anything while the marker is missing. The files it keeps beside the user's are
//! [`crate::sync::disk`]'s, who works on which path [`crate::sync::flights`]', and what
//! is done with a decision [`crate::sync::apply`]'s. (Past 800 lines only by its unit
//! tests, which stay beside the rules they prove.)

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::base::config::{ShareConfig, ShareMode};
use crate::base::lock::Recover;
use crate::base::state;
use crate::sync::disk::{
    free_bytes, is_ours, meta, not_writable, probe_write, stat, sweep_stages, Meta, MARKER,
};
use crate::sync::flights::Pulls;
pub use crate::sync::flights::MAX_PULLS;
pub use crate::sync::index::Entry;
use crate::sync::index::{Index, IndexError, Store};
use crate::sync::versions::{self, FileVersion, Resolution, VersionVector};

/// Where a share's announced versions ([`Announce`]) are POSTed on another member's node
/// server: the daemon routes what arrives there to the sync queue.
pub const SYNC_PATH: &str = "/v1/sync";
/// The fallback scan when no file event came (events can be missed, e.g. on overflow).
pub const SCAN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot scan {path}: {source}")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cannot import the old sync index: {0}")]
    ImportOldIndex(#[from] state::StateError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStatus {
    pub name: String,
    pub files: usize,
    pub bytes: u64,
    pub conflicts: usize,
    /// Files announced and not pulled yet: 0 means in sync as far as this node knows.
    pub pulling: usize,
    /// Bytes of those files not here yet.
    pub bytes_left: u64,
    /// False when the root or its marker is missing: deletions are not spread then.
    pub root_ok: bool,
    pub last_error: Option<String>,
    /// Why remote deletions are held here, until `watchalong sync release SHARE`.
    #[serde(default)]
    pub held: Option<String>,
    /// Symbolic links in the share, which sync never follows nor carries.
    #[serde(default)]
    pub links_skipped: usize,
}

/// Versions one node announces for one share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub share: String,
    pub versions: Vec<FileVersion>,
    /// The sender has not heard from us since it started: answer with every version.
    #[serde(default)]
    pub ask_back: bool,
}

/// One read-write share's sync state.
pub struct SyncShare {
    pub name: String,
    pub root: PathBuf,
    store: Store,
    index: Mutex<Index>,
    /// Saves take turns, so an older snapshot never lands after a newer one.
    saving: Mutex<()>,
    last_error: Mutex<Option<String>>,
    /// Free bytes on the share's file system when a pull last failed on a full disk:
    /// pulls wait until there is more than that.
    full_at: Mutex<Option<u64>>,
    /// Paths whose version this node made outside a scan (a file kept against a
    /// deletion): announced with the next scan's changes.
    made: Mutex<std::collections::BTreeSet<String>>,
    /// Members that have had every version from us since this node started.
    greeted: Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Greetings (everything we hold) on their way to members, or waiting to be tried
    /// again after one failed.
    greeting: Mutex<std::collections::HashMap<[u8; 32], Greeting>>,
    /// Who works on which path, and what is left to pull.
    pub pulls: Pulls,
    /// The hold on mass deletions.
    deletions: Mutex<DeleteGuard>,
    /// Symbolic links the last scan passed over (never synced).
    links: std::sync::atomic::AtomicUsize,
}

/// A greeting in flight to a member, or the wait before the next one.
#[derive(Debug, Default)]
pub struct Greeting {
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The longest wait between two greetings to a member whose posts keep failing.
pub const GREETING_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long deletions applied count toward the hold's threshold.
const DELETE_WINDOW: Duration = Duration::from_secs(60);
/// How long `sync release` lets deletions through.
const RELEASE_FOR: Duration = Duration::from_secs(600);

/// A share's hold on mass deletions: held (and why), released until when, and the
/// deletions applied within the last [`DELETE_WINDOW`].
#[derive(Default)]
struct DeleteGuard {
    held: Option<String>,
    released_until: Option<Instant>,
    recent: VecDeque<Instant>,
}

/// Whether deleting `deleting` files now, after `recent` in the last minute, passes
/// `max_percent` of the `live` files a share holds. One file alone never does, and 100
/// turns the hold off.
pub fn deletes_too_much(live: usize, deleting: usize, recent: usize, max_percent: u64) -> bool {
    let total = (deleting + recent) as u64;
    max_percent < 100 && deleting > 0 && total >= 2 && total * 100 > max_percent * live as u64
}

/// What to do with one announced version, decided against the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Fetch this version's content into `path`.
    Fetch {
        path: String,
        version: FileVersion,
    },
    /// Remove `path` (a deletion that supersedes ours).
    Remove {
        path: String,
        version: FileVersion,
    },
    /// Keep ours, giving it their history too (`vv`, both merged): the same change made
    /// on both sides.
    Adopt {
        path: String,
        vv: VersionVector,
    },
    /// Keep ours (an edit) against their concurrent deletion, as a new version of this
    /// node's that descends from both (`vv`, both merged): see [`SyncShare::keep`].
    Keep {
        path: String,
        vv: VersionVector,
    },
    /// Give what lies at `path` (the content this version names already) the version's
    /// mode and mtime.
    Touch {
        path: String,
        version: FileVersion,
        /// The file's size and mtime (ns) as the decision found them (`None`: a
        /// folder): applied only to what it decided about.
        expected: Option<(u64, u128)>,
    },
    /// Keep ours at the path and fetch theirs beside it (or move ours aside first).
    Conflict {
        move_local_to: Option<String>,
        fetch_into: String,
        version: FileVersion,
    },
}

impl SyncShare {
    pub fn open(cfg: &ShareConfig, state_dir: &Path) -> Result<SyncShare, SyncError> {
        let (store, mut index) = Store::open(&state_dir.join(format!("sync-{}.redb", cfg.name)))?;
        // Versions before the database kept their index in JSON: taken over once.
        let old = state_dir.join(format!("sync-{}.json", cfg.name));
        let imported = match state::read_json::<BTreeMap<String, Entry>>(&old)? {
            Some(entries) if index.values().next().is_none() => {
                for (path, entry) in entries {
                    index.insert(path, entry);
                }
                true
            }
            _ => false,
        };
        // A root gets its marker once, before anything was synced there. One that lacks it
        // later was emptied or unmounted (even across a restart: the index remembers
        // files), and then nothing is written into it or deleted anywhere.
        let fresh = index.values().next().is_none();
        if fresh && cfg.path.is_dir() && !cfg.path.join(MARKER).exists() {
            let _ = std::fs::write(cfg.path.join(MARKER), b"watchalong share root\n");
        }
        sweep_stages(&cfg.path);
        let share = SyncShare {
            name: cfg.name.clone(),
            root: cfg.path.clone(),
            store,
            index: Mutex::new(index),
            saving: Mutex::new(()),
            pulls: Pulls::default(),
            last_error: Mutex::new(None),
            full_at: Mutex::new(None),
            greeted: Mutex::new(std::collections::HashSet::new()),
            greeting: Mutex::new(std::collections::HashMap::new()),
            made: Mutex::new(std::collections::BTreeSet::new()),
            deletions: Mutex::new(DeleteGuard::default()),
            links: std::sync::atomic::AtomicUsize::new(0),
        };
        if let Some(msg) = share.unwritable() {
            log::error!("share {}: {msg}", share.name);
            *share.last_error.locked() = Some(msg);
        }
        if imported {
            share.save()?;
            let _ = std::fs::remove_file(&old);
        }
        Ok(share)
    }

    pub fn shares(configs: &[ShareConfig], state_dir: &Path) -> Vec<Arc<SyncShare>> {
        configs
            .iter()
            .filter(|c| c.mode == ShareMode::ReadWrite)
            .filter_map(|c| match SyncShare::open(c, state_dir) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    log::warn!("share {}: {e}", c.name);
                    None
                }
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.locked()
    }

    /// What the index says lies at `path` (size, mtime in ns), when it is a file: a pull
    /// replaces only that, so a change the scan has not seen yet is never overwritten.
    pub fn known_stat(&self, path: &str) -> Option<(u64, u128)> {
        self.lock()
            .get(path)
            .filter(|e| !e.version.deleted && e.version.content != versions::DIR)
            .map(|e| (e.size, e.mtime_ns))
    }

    /// `remote` names content this node does not hold at its path (by the index alone,
    /// no disk access: a cheap first guess at what there is to pull).
    pub fn content_differs(&self, remote: &FileVersion) -> bool {
        !remote.deleted
            && remote.content != versions::DIR
            && self
                .lock()
                .get(&remote.path)
                .is_none_or(|e| e.version.deleted || e.version.content != remote.content)
    }

    pub fn greeted(&self, member: &[u8; 32]) -> bool {
        self.greeted.locked().contains(member)
    }

    pub fn greet(&self, member: [u8; 32]) {
        self.greeted.locked().insert(member);
    }

    /// `member` may have missed an announcement (one to it failed, or it was out of
    /// reach): the next one it gets is everything, asking for everything back.
    pub fn ungreet(&self, member: &[u8; 32]) {
        self.greeted.locked().remove(member);
    }

    /// Claims the one greeting in flight to `member` at `now`; false while one is, or
    /// while the last one's failure is being waited out.
    pub fn start_greeting(&self, member: [u8; 32], now: Instant) -> bool {
        let mut g = self.greeting.locked();
        let e = g.entry(member).or_default();
        if e.in_flight || e.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        e.in_flight = true;
        true
    }

    /// `member` was out of reach, or was just heard from: the next greeting goes at once,
    /// whatever failed before (one in flight stays claimed).
    pub fn forget_backoff(&self, member: &[u8; 32]) {
        let mut g = self.greeting.locked();
        if g.get(member).is_some_and(|e| !e.in_flight) {
            g.remove(member);
        }
    }

    /// The greeting to `member` ended: `ok`, or tried again after a wait that doubles
    /// with each failure in a row, up to [`GREETING_BACKOFF_MAX`]: a member whose path is
    /// up but which refuses or cannot take our posts costs one a while, not one a tick.
    pub fn end_greeting(&self, member: &[u8; 32], ok: bool, now: Instant) {
        let mut g = self.greeting.locked();
        if ok {
            g.remove(member);
            return;
        }
        let e = g.entry(*member).or_default();
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        let wait = Duration::from_millis(500)
            .saturating_mul(1 << e.failures.min(8))
            .min(GREETING_BACKOFF_MAX);
        e.retry_at = Some(now + wait);
    }

    /// Notes that a pull found the disk full; true the first time, so it is logged once.
    pub fn disk_full(&self) -> bool {
        let free = free_bytes(&self.root).unwrap_or(0);
        self.full_at.locked().replace(free).is_none()
    }

    /// Whether pulls may run: not while the disk is as full as when one last failed.
    /// Returns false while waiting; true (and forgets the failure) once space came back.
    pub fn space_to_pull(&self) -> bool {
        let mut full = self.full_at.locked();
        match *full {
            None => true,
            Some(at) => {
                let free = free_bytes(&self.root).unwrap_or(0);
                if free > at {
                    log::info!(
                        "share {}: {free} bytes free again; syncing resumes",
                        self.name
                    );
                    *full = None;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Sets the error `status` shows; true when it differs from the one before, so a
    /// condition that lasts is logged once, not at every round.
    pub fn set_error(&self, e: Option<String>) -> bool {
        let mut last = self.last_error.locked();
        let changed = *last != e;
        *last = e;
        changed
    }

    /// Why nothing can be written into the root, when that is so: the daemon's view of it
    /// is read-only (a mount, or the sandbox of a systemd unit) or not its to write.
    pub fn unwritable(&self) -> Option<String> {
        match probe_write(&self.root) {
            Err(e) if crate::data::share::refused(&e) => Some(not_writable(&self.root, &e)),
            _ => None,
        }
    }

    /// The root is the real folder: it exists and holds the marker. When it does not (an
    /// unmounted disk, a folder emptied or moved away) nothing is written into it and no
    /// deletion spreads from it.
    pub fn root_ok(&self) -> bool {
        self.root.join(MARKER).is_file()
    }

    /// What `watchalong status` shows for this share.
    pub fn status(&self) -> ShareStatus {
        let left = self.pulls.left();
        let index = self.lock();
        let live = index.values().filter(|e| !e.version.deleted);
        ShareStatus {
            name: self.name.clone(),
            files: live.clone().count(),
            bytes: live.clone().map(|e| e.size).sum(),
            conflicts: index
                .values()
                .filter(|e| !e.version.deleted && e.version.path.contains(".sync-conflict-"))
                .count(),
            pulling: left.len(),
            bytes_left: left
                .values()
                .map(|(size, p)| {
                    let done = p
                        .as_ref()
                        .map_or(0, |p| p.done.load(std::sync::atomic::Ordering::Relaxed));
                    size.saturating_sub(done)
                })
                .sum(),
            root_ok: self.root_ok(),
            held: self.deletions_held(),
            last_error: self.last_error.locked().clone(),
            links_skipped: self.links.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn save(&self) -> Result<(), SyncError> {
        let _turn = self.saving.locked();
        self.store.save(&self.index)?;
        Ok(())
    }

    /// Every folder and regular file under the root: (share-relative path, is a folder),
    /// and how many symbolic links it passed. A link is never followed and never synced
    /// (it may lead out of the share, and a member must not plant one that does): `status`
    /// counts them, so a link that does not travel is not a silent surprise.
    fn walk(&self) -> Result<(Vec<(String, bool)>, usize), SyncError> {
        let mut out = Vec::new();
        let mut links = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|source| SyncError::Scan {
                path: dir.clone(),
                source,
            })?;
            for e in rd.flatten() {
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if is_ours(&name) {
                    continue;
                }
                let Ok(t) = e.file_type() else { continue };
                if t.is_symlink() {
                    links += 1;
                    continue;
                }
                if !t.is_dir() && !t.is_file() {
                    continue;
                }
                if let Ok(rel) = e.path().strip_prefix(&self.root) {
                    out.push((rel.to_string_lossy().into_owned(), t.is_dir()));
                }
                if t.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out.sort();
        Ok((out, links))
    }

    /// Finds local changes; `content_id` names a file's content (its manifest id).
    ///
    /// Hashing is slow, so the walk, the stats and the hashes run outside the index lock,
    /// each hash taken with the size and mtime the file had before it was hashed. Under
    /// the lock, each is compared again with what lies there now (a file written while it
    /// was hashed is left for the next scan, never recorded with a stale hash) and with
    /// what the index holds now (a task or another scan may have recorded it meanwhile).
    pub fn scan(
        &self,
        me: &str,
        content_id: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<FileVersion>, SyncError> {
        let may_delete =
            versions::may_propagate_deletions(self.root.is_dir(), self.root.join(MARKER).exists());
        if !self.root.is_dir() {
            return Ok(Vec::new());
        }
        let (entries, links) = self.walk()?;
        self.links
            .store(links, std::sync::atomic::Ordering::Relaxed);
        let seen: Vec<(&String, bool, Meta)> = entries
            .iter()
            .filter(|(rel, _)| !self.pulls.held(rel))
            .filter_map(|(rel, is_dir)| Some((rel, *is_dir, meta(&self.root.join(rel))?)))
            .collect();
        // What differs from the index, and whether that needs a hash: a file of the same
        // size and mtime whose mode alone moved, or a folder, holds what it held.
        let suspects: Vec<(&String, bool, Meta, bool)> = {
            let index = self.lock();
            seen.into_iter()
                .filter_map(|(rel, is_dir, m)| match look(index.get(rel), is_dir, m) {
                    Look::Same => None,
                    Look::Meta => Some((rel, is_dir, m, false)),
                    Look::Content => Some((rel, is_dir, m, true)),
                })
                .collect()
        };
        // The folders whose entries changed in this scan: their own mtime moved with
        // their contents, which is no change of theirs.
        let mut busy: HashSet<String> = suspects
            .iter()
            .filter(|(.., hash)| *hash)
            .filter_map(|(rel, ..)| parent_of(rel).map(str::to_string))
            .collect();
        // `None`: the content held already (only metadata moved).
        let hashed: Vec<(&String, bool, Meta, Option<String>)> = suspects
            .into_iter()
            .filter_map(|(rel, is_dir, m, hash)| {
                let content = if is_dir {
                    Some(versions::DIR.to_string())
                } else if hash {
                    Some(content_id(rel)?)
                } else {
                    None
                };
                Some((rel, is_dir, m, content))
            })
            .collect();
        let mut changed = Vec::new();
        let mut index = self.lock();
        // Folders whose mtime alone moved, decided once every change of this scan is known.
        let mut folders = Vec::new();
        for (rel, is_dir, m, content) in hashed {
            if self.pulls.held(rel) {
                continue;
            }
            // Still what was hashed: a folder still there (with the same metadata, when
            // only that moved), a file of the same size, mtime and mode. Otherwise the
            // next scan looks at what lies there now.
            let now = meta(&self.root.join(rel));
            let held = index.get(rel);
            let known_folder =
                held.is_some_and(|e| !e.version.deleted && e.version.content == versions::DIR);
            let as_hashed = if is_dir && !known_folder {
                now.is_some()
            } else {
                now == Some(m)
            };
            if !as_hashed || look(held, is_dir, m) == Look::Same {
                continue;
            }
            let secs = (m.mtime_ns / 1_000_000_000) as u64;
            let content = match (content, held) {
                (Some(c), _) => c,
                (None, Some(e)) => e.version.content.clone(),
                (None, None) => continue,
            };
            let same = held.is_some_and(|e| !e.version.deleted && e.version.content == content);
            let version = match held.filter(|_| same) {
                Some(e) if is_dir => {
                    folders.push((rel, m, e.version.clone(), e.mode.or(e.version.mode)));
                    continue;
                }
                // The same content: news when its mode moved from what was last seen
                // here, or its mtime from the version's.
                Some(e) => {
                    let moved = e.mode.or(e.version.mode).is_some_and(|held| held != m.mode)
                        || e.version.mtime != secs;
                    if moved {
                        let v = FileVersion {
                            vv: e.version.vv.bumped(me),
                            mtime: secs,
                            node: me.to_string(),
                            mode: Some(m.mode),
                            ..e.version.clone()
                        };
                        changed.push(v.clone());
                        v
                    } else {
                        FileVersion {
                            mode: Some(m.mode),
                            ..e.version.clone()
                        }
                    }
                }
                _ => {
                    let v = FileVersion {
                        path: rel.clone(),
                        vv: held
                            .map(|e| e.version.vv.clone())
                            .unwrap_or_default()
                            .bumped(me),
                        deleted: false,
                        mtime: secs,
                        node: me.to_string(),
                        size: if is_dir { 0 } else { m.size },
                        content,
                        mode: Some(m.mode),
                    };
                    changed.push(v.clone());
                    v
                }
            };
            index.insert(
                rel.clone(),
                Entry {
                    version,
                    size: m.size,
                    mtime_ns: m.mtime_ns,
                    mode: Some(m.mode),
                },
            );
        }
        if may_delete {
            let present: std::collections::HashSet<&String> =
                entries.iter().map(|(p, _)| p).collect();
            let gone: Vec<(String, Entry)> = index
                .iter()
                .filter(|(path, e)| {
                    !e.version.deleted
                        && !present.contains(path)
                        && !self.pulls.held(path)
                        // The walk ran before the lock: a file a task put there since
                        // (and recorded) is no deletion.
                        && stat(&self.root.join(path)).is_none()
                })
                .map(|(path, e)| {
                    let version = FileVersion {
                        path: path.clone(),
                        vv: e.version.vv.bumped(me),
                        deleted: true,
                        mtime: e.version.mtime,
                        node: me.to_string(),
                        content: String::new(),
                        size: 0,
                        mode: None,
                    };
                    (
                        path.clone(),
                        Entry {
                            version,
                            ..e.clone()
                        },
                    )
                })
                .collect();
            for (path, e) in gone {
                busy.extend(parent_of(&path).map(str::to_string));
                changed.push(e.version.clone());
                index.insert(path, e);
            }
        }
        // A folder's own change: its mode, or its mtime when nothing inside it changed in
        // this scan and no pull works in it (a pull's partial file moves it too). What
        // this node's sync put in a folder moves its mtime as well, and is no change of
        // the folder's either: see `refresh_folder`.
        for (rel, m, held, seen_mode) in folders {
            let secs = (m.mtime_ns / 1_000_000_000) as u64;
            let implied = busy.contains(rel.as_str()) || self.pulls.in_flight_under(rel);
            // An entry from before modes were recorded takes this one without a change:
            // an upgrade announces no folder.
            let moved = seen_mode.is_some_and(|h| h != m.mode)
                || (seen_mode.is_some() && held.mtime != secs && !implied);
            let version = if moved {
                let v = FileVersion {
                    vv: held.vv.bumped(me),
                    mtime: secs,
                    node: me.to_string(),
                    mode: Some(m.mode),
                    ..held
                };
                changed.push(v.clone());
                v
            } else {
                FileVersion {
                    mode: Some(m.mode),
                    ..held
                }
            };
            index.insert(
                rel.clone(),
                Entry {
                    version,
                    size: m.size,
                    mtime_ns: m.mtime_ns,
                    mode: Some(m.mode),
                },
            );
        }
        Ok(changed)
    }

    /// Whether `remote`'s version vector leaps far past the one held for its path (see
    /// [`crate::sync::versions::VersionVector::leaps_past`]).
    pub fn leaps(&self, remote: &FileVersion) -> bool {
        let index = self.lock();
        let held = index.get(&remote.path).map(|e| &e.version.vv);
        let none = crate::sync::versions::VersionVector::default();
        remote.vv.leaps_past(held.unwrap_or(&none))
    }

    /// Screens the deletions member `from` announced: when, with those applied in the
    /// last minute, they would remove more than `max_percent` of this share's files, every
    /// deletion is dropped and the share is held until [`SyncShare::release_deletions`]; other
    /// changes still apply. A deletion whose content reappears elsewhere in the same
    /// announcement is a move and does not count. Returns the reason when the share is
    /// held by this announcement (to be logged once).
    pub fn screen_deletions(
        &self,
        from: &str,
        versions: &mut Vec<FileVersion>,
        max_percent: u64,
        now: Instant,
    ) -> Option<String> {
        let moved_to: HashSet<&str> = versions
            .iter()
            .filter(|v| !v.deleted && v.content != versions::DIR)
            .map(|v| v.content.as_str())
            .collect();
        let (live, deleting) = {
            let index = self.lock();
            let live = index
                .values()
                .filter(|e| !e.version.deleted && e.version.content != versions::DIR)
                .count();
            let deleting = versions
                .iter()
                .filter(|v| v.deleted)
                .filter(|v| {
                    index.get(&v.path).is_some_and(|e| {
                        !e.version.deleted
                            && e.version.content != versions::DIR
                            && !moved_to.contains(e.version.content.as_str())
                    })
                })
                .count();
            (live, deleting)
        };
        if deleting == 0 {
            return None;
        }
        let mut g = self.deletions.locked();
        while g
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > DELETE_WINDOW)
        {
            g.recent.pop_front();
        }
        let released = g.released_until.is_some_and(|t| now < t);
        let hold = !released
            && (g.held.is_some() || deletes_too_much(live, deleting, g.recent.len(), max_percent));
        if !hold {
            g.recent.extend(std::iter::repeat_n(now, deleting));
            return None;
        }
        versions.retain(|v| !v.deleted);
        if g.held.is_some() {
            return None;
        }
        let reason = format!(
            "held: {from} deletes {deleting} of {live} files (more than {max_percent}% within a minute); nothing was deleted here. If that is meant, run `watchalong sync release {}`",
            self.name
        );
        g.held = Some(reason.clone());
        Some(reason)
    }

    /// Lets the held deletions through (for [`RELEASE_FOR`]): they apply at the next
    /// announcement.
    pub fn release_deletions(&self, now: Instant) -> bool {
        let mut g = self.deletions.locked();
        g.released_until = Some(now + RELEASE_FOR);
        g.held.take().is_some()
    }

    /// Why the share holds deletions, when it does.
    pub fn deletions_held(&self) -> Option<String> {
        self.deletions.locked().held.clone()
    }

    /// Every version held, for a member that wants the whole picture.
    pub fn all_versions(&self) -> Vec<FileVersion> {
        self.lock().values().map(|e| e.version.clone()).collect()
    }

    /// Decides what an announced version asks of this node.
    pub fn decide(&self, remote: &FileVersion) -> Action {
        let index = self.lock();
        let Some(local) = index.get(&remote.path) else {
            return if remote.deleted {
                Action::Nothing
            } else {
                Action::Fetch {
                    path: remote.path.clone(),
                    version: remote.clone(),
                }
            };
        };
        // A local edit not scanned yet is not overwritten: the next scan announces it.
        // That includes a chmod (a mode recorded before modes were is not compared).
        let on_disk = meta(&self.root.join(&remote.path));
        let mode_kept = |m: &Meta| {
            local
                .mode
                .or(local.version.mode)
                .is_none_or(|held| held == m.mode)
        };
        let untouched = match on_disk {
            Some(m) if local.version.content == versions::DIR => {
                !local.version.deleted && mode_kept(&m)
            }
            Some(m) => {
                !local.version.deleted
                    && local.size == m.size
                    && local.mtime_ns == m.mtime_ns
                    && mode_kept(&m)
            }
            None => local.version.deleted,
        };
        if !untouched {
            return Action::Nothing;
        }
        // What a metadata change applies to: this file as it stands now.
        let seen = on_disk
            .filter(|_| local.version.content != versions::DIR)
            .map(|m| (m.size, m.mtime_ns));
        // A folder and a file at one path do not merge; the next change settles it.
        let kinds_differ = !local.version.deleted
            && !remote.deleted
            && (local.version.content == versions::DIR) != (remote.content == versions::DIR);
        if kinds_differ {
            return Action::Nothing;
        }
        match versions::resolve(&local.version, remote) {
            // The same change made on both sides: ours stays, with both histories.
            Resolution::KeepLocal
                if local.version.vv.compare(&remote.vv) == versions::Order::Concurrent =>
            {
                Action::Adopt {
                    path: remote.path.clone(),
                    vv: local.version.vv.merged(&remote.vv),
                }
            }
            Resolution::KeepLocal => {
                // One vector must name one version everywhere; where it does not, no round
                // will ever settle the path, so that is worth a line in a debug log.
                if local.version.vv == remote.vv
                    && (local.version.deleted, &local.version.content)
                        != (remote.deleted, &remote.content)
                {
                    log::debug!(
                        "sync: {}/{}: equal vectors, different versions: {} here, {} there",
                        self.name,
                        remote.path,
                        describe(&local.version),
                        describe(remote)
                    );
                }
                Action::Nothing
            }
            Resolution::TakeRemote if remote.deleted => Action::Remove {
                path: remote.path.clone(),
                version: remote.clone(),
            },
            // The content held already: only its mode or mtime moved.
            Resolution::TakeRemote
                if !local.version.deleted && local.version.content == remote.content =>
            {
                Action::Touch {
                    path: remote.path.clone(),
                    version: remote.clone(),
                    expected: seen,
                }
            }
            Resolution::TakeMeta { merged } => Action::Touch {
                path: remote.path.clone(),
                version: FileVersion {
                    vv: merged,
                    ..remote.clone()
                },
                expected: seen,
            },
            Resolution::TakeRemote => Action::Fetch {
                path: remote.path.clone(),
                version: remote.clone(),
            },
            Resolution::Conflict {
                remote_wins,
                loser_path,
                merged,
            } => {
                let version = FileVersion {
                    vv: merged,
                    ..remote.clone()
                };
                if remote.deleted {
                    // Ours (an edit) won against their deletion: it stays, as a new version
                    // past both, so it and our next edit supersede their deletion
                    // everywhere instead of meeting it again as a conflict.
                    return Action::Keep {
                        path: remote.path.clone(),
                        vv: version.vv,
                    };
                }
                if local.version.deleted {
                    return Action::Fetch {
                        path: remote.path.clone(),
                        version,
                    };
                }
                if remote_wins {
                    Action::Conflict {
                        move_local_to: Some(loser_path),
                        fetch_into: remote.path.clone(),
                        version,
                    }
                } else {
                    Action::Conflict {
                        move_local_to: None,
                        fetch_into: loser_path,
                        version,
                    }
                }
            }
        }
    }

    /// Records that `version` is now what lies at `path` on disk.
    pub fn record(&self, path: &str, version: FileVersion) {
        let installed = meta(&self.root.join(path));
        self.record_installed(path, version, installed);
    }

    /// Records `version` at `path` as what was put there: its size, mtime (ns) and mode
    /// as the disk holds them (`None`: nothing there, as after a deletion).
    pub fn record_installed(&self, path: &str, version: FileVersion, installed: Option<Meta>) {
        let mut index = self.lock();
        index.insert(
            path.to_string(),
            Entry {
                version: FileVersion {
                    path: path.to_string(),
                    ..version
                },
                size: installed.map_or(0, |m| m.size),
                mtime_ns: installed.map_or(0, |m| m.mtime_ns),
                mode: installed.map(|m| m.mode),
            },
        );
        self.refresh_folder(&mut index, path);
    }

    /// What sync does in a folder moves the folder's mtime; that is no change of the
    /// folder's to announce, so the index takes the new mtime as the folder's own. Called
    /// for every path sync wrote, removed or gave up on.
    pub fn refresh_folder_of(&self, path: &str) {
        self.refresh_folder(&mut self.lock(), path);
    }

    fn refresh_folder(&self, index: &mut Index, path: &str) {
        let Some(parent) = parent_of(path) else {
            return;
        };
        let Some(e) = index
            .get(parent)
            .filter(|e| !e.version.deleted && e.version.content == versions::DIR)
        else {
            return;
        };
        // One stat under the lock: a scan comparing against this entry must see the
        // folder's new mtime and this record together.
        if let Some(m) = meta(&self.root.join(parent)) {
            if m.mtime_ns != e.mtime_ns {
                let e = Entry {
                    mtime_ns: m.mtime_ns,
                    ..e.clone()
                };
                index.insert(parent.to_string(), e);
            }
        }
    }

    /// Keeps ours at `path` (an edit) against a concurrent deletion: its version becomes
    /// a new one of this node's (`me`), past both histories (`vv`) and whatever the scan
    /// recorded since the decision, and goes out with the next scan.
    ///
    /// Merging the histories alone labels our file with the deleter's counters, a label
    /// that means "deleted" on the deleter's side. Two members deleting it at once (each
    /// then holds the other's deletion too) end with the very vector this node ends with
    /// after keeping ours against both: every full round then finds the two sides equal,
    /// and the file stays here and gone there for good.
    pub fn keep(&self, path: &str, vv: &VersionVector, me: &str) {
        let mut index = self.lock();
        let Some(mut e) = index.get(path).filter(|e| !e.version.deleted).cloned() else {
            return;
        };
        e.version.vv = e.version.vv.merged(vv).bumped(me);
        index.insert(path.to_string(), e);
        self.made.locked().insert(path.to_string());
    }

    /// The versions this node made outside a scan since the last call, to announce.
    pub fn take_made(&self) -> Vec<FileVersion> {
        let paths = std::mem::take(&mut *self.made.locked());
        let index = self.lock();
        paths
            .iter()
            .filter_map(|p| index.get(p))
            .map(|e| e.version.clone())
            .collect()
    }

    /// Gives the entry at `path` the history `vv` too: ours stayed there after a conflict
    /// and now descends from both sides.
    pub fn merge_history(&self, path: &str, vv: &VersionVector) {
        let mut index = self.lock();
        if let Some(mut e) = index.get(path).cloned() {
            e.version.vv = vv.clone();
            index.insert(path.to_string(), e);
        }
    }
}

/// What a scan finds at a path against the index's entry for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// As recorded.
    Same,
    /// The same content (a file of the same size and mtime, a folder): only its mode or,
    /// for a folder, its mtime moved; or a folder's entry is from before modes were
    /// recorded.
    Meta,
    /// New, of another kind, or a file whose size or mtime moved: its content is hashed.
    Content,
}

fn look(held: Option<&Entry>, is_dir: bool, m: Meta) -> Look {
    let Some(e) = held.filter(|e| !e.version.deleted) else {
        return Look::Content;
    };
    let folder = e.version.content == versions::DIR;
    let mode_moved = e.mode.or(e.version.mode) != Some(m.mode);
    if is_dir != folder {
        Look::Content
    } else if !is_dir && (e.size != m.size || e.mtime_ns != m.mtime_ns || e.mode.is_none()) {
        // A file recorded before modes were (an index from before content-defined
        // chunks) is hashed again: its content id was made with fixed chunks, which no
        // holder serves any more.
        Look::Content
    } else if mode_moved || (is_dir && e.mtime_ns != m.mtime_ns) {
        Look::Meta
    } else {
        Look::Same
    }
}

/// The folder holding share-relative `path`; `None` for the root's own entries.
fn parent_of(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

/// A version as the debug log shows it: deleted, or its content id's first digits.
fn describe(v: &FileVersion) -> String {
    if v.deleted {
        "deleted".to_string()
    } else {
        v.content.chars().take(8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty version of `path`, for tests to fill in.
    fn unreachable_version(path: &str) -> FileVersion {
        FileVersion {
            path: path.to_string(),
            vv: VersionVector::default(),
            deleted: false,
            mtime: 0,
            node: String::new(),
            content: String::new(),
            size: 0,
            mode: None,
        }
    }
    use crate::sync::disk::seed_partial;

    #[test]
    fn a_deletion_of_most_files_is_too_much_and_a_few_or_one_are_not() {
        // Half of ten is the limit; more, counting the last minute's, is held.
        assert!(!deletes_too_much(10, 5, 0, 50));
        assert!(deletes_too_much(10, 6, 0, 50));
        assert!(deletes_too_much(10, 2, 4, 50));
        // One file alone never, even the only one; nothing to delete never.
        assert!(!deletes_too_much(1, 1, 0, 50));
        assert!(!deletes_too_much(10, 0, 9, 50));
        // 100 turns the hold off; 0 holds any two.
        assert!(!deletes_too_much(10, 10, 0, 100));
        assert!(deletes_too_much(100, 2, 0, 0));
    }

    fn share(dir: &Path) -> SyncShare {
        std::fs::create_dir_all(dir.join("root")).unwrap();
        SyncShare::open(
            &ShareConfig {
                name: "s".into(),
                path: dir.join("root"),
                mode: ShareMode::ReadWrite,
            },
            dir,
        )
        .unwrap()
    }

    fn id(s: &SyncShare) -> impl Fn(&str) -> Option<String> + '_ {
        move |rel| {
            std::fs::read(s.root.join(rel))
                .ok()
                .map(|b| blake3::hash(&b).to_hex().to_string())
        }
    }

    #[test]
    fn the_index_survives_a_restart_and_the_first_scan_finds_what_changed_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("kept.txt"), b"one").unwrap();
        std::fs::write(s.root.join("edited.txt"), b"one").unwrap();
        assert_eq!(s.scan("a", id(&s)).unwrap().len(), 2);
        s.save().unwrap();
        drop(s);
        // While the daemon is down: one edit.
        std::fs::write(d.path().join("root/edited.txt"), b"two, longer").unwrap();
        let s = share(d.path());
        let changed = s.scan("a", id(&s)).unwrap();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].path, "edited.txt");
        assert_eq!(
            changed[0].vv,
            VersionVector::default().bumped("a").bumped("a")
        );
    }

    #[test]
    fn a_file_written_while_it_is_hashed_is_not_recorded_with_the_hash_of_what_it_held() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        // The hash is of "one"; by the time it is taken the file holds something else.
        let racing = |rel: &str| {
            let old = id(&s)(rel);
            std::fs::write(s.root.join(rel), b"two, longer").unwrap();
            old
        };
        assert!(s.scan("n1", racing).unwrap().is_empty());
        assert!(s.lock().get("a.txt").is_none(), "nothing recorded");
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(
            v[0].content,
            blake3::hash(b"two, longer").to_hex().to_string()
        );
        assert_eq!(v[0].vv, VersionVector::default().bumped("n1"));
    }

    #[test]
    fn two_scans_hash_at_once_and_record_every_file_once_between_them() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        let names: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
        for n in &names {
            std::fs::write(s.root.join(n), n.as_bytes()).unwrap();
        }
        // Each scan's first hash waits for the other scan to be hashing too: they meet
        // only if neither hashes under the index lock.
        let meet = (Mutex::new(0usize), std::sync::Condvar::new());
        let scan = || {
            let (first, met) = (std::cell::Cell::new(true), std::cell::Cell::new(false));
            let v = s
                .scan("n1", |rel| {
                    if first.replace(false) {
                        let (m, c) = &meet;
                        let mut n = m.lock().unwrap();
                        *n += 1;
                        c.notify_all();
                        let (_n, wait) = c
                            .wait_timeout_while(n, Duration::from_secs(20), |n| *n < 2)
                            .unwrap();
                        met.set(!wait.timed_out());
                    }
                    id(&s)(rel)
                })
                .unwrap();
            (v, met.get())
        };
        let ((a, met_a), (b, met_b)) = std::thread::scope(|t| {
            let a = t.spawn(scan);
            let b = t.spawn(scan);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(met_a && met_b, "the scans hashed one after the other");
        let mut announced: Vec<String> = a.into_iter().chain(b).map(|v| v.path).collect();
        announced.sort();
        assert_eq!(announced, names, "each file announced once, none lost");
        let index = s.lock();
        assert!(names
            .iter()
            .all(|n| index.get(n).is_some_and(|e| !e.version.deleted)));
    }

    #[test]
    fn an_index_kept_in_json_by_an_older_version_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("f.txt"), b"one").unwrap();
        s.scan("a", id(&s)).unwrap();
        let old: BTreeMap<String, Entry> = s
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(s);
        std::fs::remove_file(d.path().join("sync-s.redb")).unwrap();
        state::write_json(&d.path().join("sync-s.json"), &old).unwrap();
        let s = share(d.path());
        assert!(s.scan("a", id(&s)).unwrap().is_empty(), "nothing changed");
        assert!(!d.path().join("sync-s.json").exists());
    }

    #[test]
    fn a_partial_starts_with_the_chunks_already_held_at_their_offsets() {
        let d = tempfile::tempdir().unwrap();
        let (dest, part) = (d.path().join("f"), d.path().join(".f.watchalong-part"));
        std::fs::write(&dest, b"aaaabbbbcc").unwrap();
        let chunk = |b: &[u8]| blake3::hash(b).to_hex().to_string();
        let m = crate::data::share::Manifest {
            share: "s".into(),
            path: "f".into(),
            size: 12,
            mtime: 0,
            mode: 0o644,
            chunk_size: 4,
            chunks: vec![chunk(b"aaaa"), chunk(b"bbbb"), chunk(b"ccdd")],
            lengths: Vec::new(),
            starts: Vec::new(),
        };
        seed_partial(&dest, &part, &m);
        assert_eq!(std::fs::read(&part).unwrap(), b"aaaabbbb\0\0\0\0");
        // A partial already there is resumed as it is, not overwritten.
        std::fs::write(&part, b"xxxx").unwrap();
        seed_partial(&dest, &part, &m);
        assert_eq!(std::fs::read(&part).unwrap(), b"xxxx");
    }

    #[test]
    fn a_new_file_an_edit_and_a_deletion_each_become_one_version() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1);
        assert!(
            s.scan("n1", id(&s)).unwrap().is_empty(),
            "an unchanged file is no news"
        );
        std::fs::write(s.root.join("a.txt"), b"two!").unwrap();
        let v2 = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v2[0].vv.compare(&v[0].vv), versions::Order::After);
        std::fs::remove_file(s.root.join("a.txt")).unwrap();
        let v3 = s.scan("n1", id(&s)).unwrap();
        assert!(v3[0].deleted);
    }

    #[test]
    fn folders_are_entries_whose_contents_do_not_change_them() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::create_dir(s.root.join("sub")).unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!((v.len(), v[0].content.as_str()), (1, versions::DIR));
        std::fs::write(s.root.join("sub/x"), b"x").unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1, "only the new file: {v:?}");
        assert_eq!(v[0].path, "sub/x");
        std::fs::remove_file(s.root.join("sub/x")).unwrap();
        std::fs::remove_dir(s.root.join("sub")).unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert!(v.iter().all(|v| v.deleted) && v.len() == 2, "{v:?}");
    }

    fn mode_of(s: &SyncShare, rel: &str) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(s.root.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    fn set_mode(s: &SyncShare, rel: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(s.root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_chmod_alone_is_a_new_version_carrying_the_mode_and_hashes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        set_mode(&s, "a.txt", 0o644);
        let first = s.scan("n1", id(&s)).unwrap();
        assert_eq!(first[0].mode, Some(0o644));
        set_mode(&s, "a.txt", 0o640);
        let v = s
            .scan("n1", |rel| panic!("{rel} hashed for a chmod"))
            .unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].mode, Some(0o640));
        assert_eq!(v[0].content, first[0].content);
        assert_eq!(v[0].vv, first[0].vv.bumped("n1"));
        assert!(s.scan("n1", id(&s)).unwrap().is_empty());
    }

    #[test]
    fn a_folder_touched_on_purpose_is_a_new_version_with_its_mtime_and_one_filled_is_not() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::create_dir(s.root.join("sub")).unwrap();
        s.scan("n1", id(&s)).unwrap();
        // `touch -d 2001-09-09T01:46:40Z sub`: nothing inside changed.
        crate::sync::disk::set_meta(&s.root.join("sub"), None, None, 1_000_000_000).unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].path.as_str(), v[0].mtime), ("sub", 1_000_000_000));
        // A file made inside moves the folder's mtime too, but the file is the change.
        std::fs::write(s.root.join("sub/x"), b"x").unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "sub/x");
        set_mode(&s, "sub", 0o750);
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].path.as_str(), v[0].mode), ("sub", Some(0o750)));
    }

    #[test]
    fn what_sync_puts_in_a_folder_is_no_change_of_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::create_dir(s.root.join("sub")).unwrap();
        // An old mtime, so the one a pull leaves differs in whole seconds too.
        crate::sync::disk::set_meta(&s.root.join("sub"), None, None, 1_000_000_000).unwrap();
        s.scan("n1", id(&s)).unwrap();
        // As a pull lands a file: written under a hidden name, moved into place, recorded.
        std::fs::write(s.root.join("sub/.x.watchalong-stage-1"), b"pulled").unwrap();
        std::fs::rename(
            s.root.join("sub/.x.watchalong-stage-1"),
            s.root.join("sub/x"),
        )
        .unwrap();
        let pulled = FileVersion {
            vv: VersionVector::default().bumped("n2"),
            node: "n2".into(),
            content: id(&s)("sub/x").unwrap(),
            size: 6,
            mode: Some(mode_of(&s, "sub/x")),
            ..unreachable_version("sub/x")
        };
        s.record("sub/x", pulled);
        let v = s.scan("n1", id(&s)).unwrap();
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_index_from_before_modes_hashes_its_files_again_and_announces_only_new_ids() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("same.txt"), b"one").unwrap();
        std::fs::write(s.root.join("rechunked.bin"), b"two").unwrap();
        std::fs::create_dir(s.root.join("sub")).unwrap();
        s.scan("n1", id(&s)).unwrap();
        // As the version before modes recorded them: no mode at all, and a folder's mtime
        // as it was when first seen.
        for path in ["same.txt", "rechunked.bin", "sub"] {
            let mut e = s.lock().get(path).unwrap().clone();
            e.mode = None;
            e.version.mode = None;
            if path == "sub" {
                e.mtime_ns += 1;
            }
            s.lock().insert(path.into(), e);
        }
        set_mode(&s, "same.txt", 0o600);
        // Content ids are made anew: one file's id changed (its chunking did), the
        // other's did not.
        let v = s
            .scan("n1", |rel| {
                let plain = id(&s)(rel)?;
                Some(if rel == "rechunked.bin" {
                    format!("{:0>64}", "c")
                } else {
                    plain
                })
            })
            .unwrap();
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, ["rechunked.bin"], "{v:?}");
        assert_eq!(s.lock().get("same.txt").unwrap().mode, Some(0o600));
        assert!(s.lock().get("sub").unwrap().mode.is_some());
        assert!(s.scan("n1", id(&s)).unwrap().is_empty());
    }

    #[test]
    fn a_members_chmod_of_content_held_here_is_applied_in_place_not_fetched() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let mine = s.scan("n1", id(&s)).unwrap().remove(0);
        let theirs = FileVersion {
            vv: mine.vv.bumped("n2"),
            node: "n2".into(),
            mode: Some(0o600),
            ..mine.clone()
        };
        assert_eq!(
            s.decide(&theirs),
            Action::Touch {
                path: "a.txt".into(),
                version: theirs.clone(),
                expected: s.known_stat("a.txt"),
            }
        );
        // A chmod here not scanned yet is not overwritten.
        set_mode(&s, "a.txt", 0o604);
        assert_eq!(s.decide(&theirs), Action::Nothing);
    }

    #[test]
    fn symbolic_links_are_never_synced_and_status_counts_them() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.root.join("out")).unwrap();
        std::os::unix::fs::symlink("a.txt", s.root.join("in")).unwrap();
        let v = s.scan("n1", id(&s)).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "a.txt");
        assert_eq!(s.status().links_skipped, 2);
    }

    #[test]
    fn an_emptied_root_without_its_marker_deletes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        s.scan("n1", id(&s)).unwrap();
        // What an unmount looks like: the folder is there, empty, without the marker.
        std::fs::remove_file(s.root.join("a.txt")).unwrap();
        std::fs::remove_file(s.root.join(MARKER)).unwrap();
        assert!(s.scan("n1", id(&s)).unwrap().is_empty());
        std::fs::remove_dir(&s.root).unwrap();
        assert!(s.scan("n1", id(&s)).unwrap().is_empty());
    }

    #[test]
    fn a_restart_while_the_root_is_unmounted_does_not_plant_a_marker_there() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        s.scan("n1", id(&s)).unwrap();
        s.save().unwrap();
        drop(s);
        // The disk is gone while the daemon was down: an empty mount point.
        std::fs::remove_file(d.path().join("root/a.txt")).unwrap();
        std::fs::remove_file(d.path().join("root").join(MARKER)).unwrap();
        let s = share(d.path());
        assert!(!s.root_ok());
        assert!(s.scan("n1", id(&s)).unwrap().is_empty(), "no deletion");
    }

    #[test]
    fn an_announced_newer_version_is_fetched_and_an_older_one_ignored() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let mine = s.scan("n1", id(&s)).unwrap().remove(0);
        let newer = FileVersion {
            vv: mine.vv.bumped("n2"),
            content: "x".into(),
            node: "n2".into(),
            ..mine.clone()
        };
        assert!(matches!(s.decide(&newer), Action::Fetch { .. }));
        let older = FileVersion {
            vv: VersionVector::default(),
            ..newer.clone()
        };
        assert_eq!(s.decide(&older), Action::Nothing);
    }

    #[test]
    fn a_local_edit_not_yet_scanned_is_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let mine = s.scan("n1", id(&s)).unwrap().remove(0);
        std::fs::write(s.root.join("a.txt"), b"edited meanwhile").unwrap();
        let newer = FileVersion {
            vv: mine.vv.bumped("n2"),
            content: "x".into(),
            ..mine
        };
        assert_eq!(s.decide(&newer), Action::Nothing);
    }

    #[test]
    fn an_edit_that_beats_a_concurrent_deletion_becomes_a_new_version_past_both_announced_once() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let mine = s.scan("n1", id(&s)).unwrap().remove(0);
        let gone = FileVersion {
            vv: VersionVector::default().bumped("n2"),
            deleted: true,
            content: String::new(),
            node: "n2".into(),
            ..mine.clone()
        };
        let Action::Keep { path, vv } = s.decide(&gone) else {
            panic!("{:?}", s.decide(&gone))
        };
        assert_eq!(vv, mine.vv.merged(&gone.vv));
        s.keep(&path, &vv, "n1");
        // The deletion is now in our past: seen again, it asks nothing.
        assert_eq!(s.decide(&gone), Action::Nothing);
        // Ours is a new version of ours past both, and is announced once.
        let kept = s.take_made();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].vv, vv.bumped("n1"));
        assert!(!kept[0].deleted);
        assert!(s.take_made().is_empty());
    }

    #[test]
    fn concurrent_edits_keep_both_versions() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        std::fs::write(s.root.join("a.txt"), b"one").unwrap();
        let mine = s.scan("n1", id(&s)).unwrap().remove(0);
        let theirs = FileVersion {
            vv: VersionVector::default().bumped("n2"),
            content: "other".into(),
            node: "n2".into(),
            mtime: mine.mtime + 10,
            ..mine
        };
        match s.decide(&theirs) {
            Action::Conflict {
                move_local_to: Some(to),
                fetch_into,
                ..
            } => {
                assert!(
                    to.starts_with("a.sync-conflict-")
                        && to.contains("-n1-")
                        && to.ends_with(".txt"),
                    "{to}"
                );
                assert_eq!(fetch_into, "a.txt");
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn a_burst_of_announcements_runs_on_a_few_workers_one_path_at_a_time_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        let v = |path: &str, n: u64| FileVersion {
            content: format!("c{n}"),
            ..unreachable_version(path)
        };
        // Ten thousand versions over a hundred paths, each from a member of its own (one
        // member's newer version would replace its older one): only MAX_PULLS workers
        // start.
        let member = |n: u64| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&n.to_le_bytes());
            k
        };
        let mut started = 0;
        for n in 0..10_000u64 {
            if s.pulls
                .enqueue(member(n), v(&format!("p{}", n % 100), n))
                .start
            {
                started += 1;
            }
        }
        assert_eq!(started, MAX_PULLS);
        assert_eq!(s.pulls.work_load(), (10_000, MAX_PULLS));
        // Each worker takes a path no other holds; a path's versions come in order.
        let mut held: Vec<Option<String>> = vec![None; MAX_PULLS];
        let mut last_of: std::collections::HashMap<String, u64> = Default::default();
        let mut done = 0;
        let mut alive = MAX_PULLS;
        while alive > 0 {
            for h in held.iter_mut() {
                let current = h.take().unwrap_or_default();
                if current == "-" {
                    *h = Some(current);
                    continue;
                }
                let finished = (!current.is_empty()).then_some(current.as_str());
                match s.pulls.next_work(finished) {
                    Some((_, v)) => {
                        let holders = s.pulls.busy();
                        assert!(holders.contains(&v.path));
                        let n: u64 = v.content[1..].parse().unwrap();
                        if let Some(prev) = last_of.insert(v.path.clone(), n) {
                            assert!(prev < n, "{} ran {n} after {prev}", v.path);
                        }
                        done += 1;
                        *h = Some(v.path);
                    }
                    None => {
                        alive -= 1;
                        *h = Some("-".into());
                    }
                }
            }
        }
        assert_eq!(done, 10_000);
        assert_eq!(s.pulls.work_load(), (0, 0));
    }

    #[test]
    fn a_worker_that_stops_early_gives_back_its_place_and_its_path() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        assert!(s.pulls.enqueue([1; 32], unreachable_version("a")).start);
        assert!(s.pulls.enqueue([2; 32], unreachable_version("a")).start);
        let (_, first) = s.pulls.next_work(None).unwrap();
        // The second version of "a" waits while the first is held.
        assert!(s.pulls.next_work(None).is_none());
        s.pulls.worker_done(Some(&first.path));
        assert_eq!(s.pulls.work_load(), (1, 0));
        // A new worker (the next announcement starts one) takes it.
        assert!(s.pulls.enqueue([1; 32], unreachable_version("b")).start);
        assert_eq!(s.pulls.next_work(None).unwrap().1.path, "a");
    }

    #[test]
    fn a_members_newer_version_of_a_path_replaces_its_older_one_still_waiting() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        let v = |path: &str, n: u64| FileVersion {
            content: format!("c{n}"),
            ..unreachable_version(path)
        };
        // One member announces ten thousand versions of ten paths: the queue holds the
        // newest of each, and each replaced one is handed back to land its flight.
        let mut superseded = 0;
        for n in 0..10_000u64 {
            let q = s.pulls.enqueue([7; 32], v(&format!("p{}", n % 10), n));
            if let Some(old) = q.superseded {
                let (m, n): (u64, u64) = (old.content[1..].parse().unwrap(), n);
                assert_eq!(
                    m + 10,
                    n,
                    "the replaced version is the older one of its path"
                );
                superseded += 1;
            }
        }
        assert_eq!(superseded, 10_000 - 10);
        assert_eq!(s.pulls.work_load().0, 10);
        let mut newest: Vec<u64> = std::iter::from_fn(|| s.pulls.next_work(None))
            .map(|(_, v)| v.content[1..].parse().unwrap())
            .collect();
        newest.sort_unstable();
        assert_eq!(newest, (9_990..10_000).collect::<Vec<u64>>());
        // Another member's version of the same path queues beside it.
        assert!(s.pulls.enqueue([8; 32], v("p0", 1)).superseded.is_none());
    }
}
