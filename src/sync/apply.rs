//! Sync's executor: what a node does with its read-write shares. It scans them and
//! announces what changed, applies what members announce (the rules deciding what an
//! announcement asks for are [`crate::sync::folder`]'s), runs the pull workers that fetch
//! new versions into a staged partial file, keeps both sides of a conflict, and removes
//! files for members' deletions keeping a version (pruned after `[sync]
//! keep_versions_days`). It reaches members only through what it is given — the
//! transfer engine and a [`Membership`] for the directory — and must not import the
//! daemon or the control API. Its pull workers are tasks on the tracker it is given and
//! hold the executor's `Arc`; the daemon owns the executor. (Past 800 lines only by its
//! unit tests, which need its private pieces.)

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::clock::now_secs;
use crate::base::config::SyncConfig;
use crate::data::transfer::{self, Engine, Membership, Progress};
use crate::group::identity::{key_id, Key};
use crate::sync::folder::{Action, Announce, SyncShare};
use crate::sync::versions::FileVersion;

/// What the executor is given by whoever owns it.
pub struct Executor {
    /// This node's key: the scans stamp its changes with it.
    me: Key,
    engine: Arc<Engine>,
    /// The members, for the directory (who holds a share, who is up) and for pulls.
    members: Arc<dyn Membership>,
    shares: Vec<Arc<SyncShare>>,
    config: SyncConfig,
    /// Where the announcements out and the pull workers run; the owner awaits it.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl Executor {
    pub fn new(
        me: Key,
        engine: Arc<Engine>,
        members: Arc<dyn Membership>,
        shares: Vec<Arc<SyncShare>>,
        config: SyncConfig,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Executor {
        Executor {
            me,
            engine,
            members,
            shares,
            config,
            tasks,
            cancel,
        }
    }

    /// The read-write shares it keeps.
    pub fn shares(&self) -> &[Arc<SyncShare>] {
        &self.shares
    }
}

impl Executor {
    /// Scans every read-write share and announces what changed (or, with `all`,
    /// everything held, so members that missed something catch up).
    pub async fn scan(&self, all: bool) {
        let me = key_id(&self.me);
        for s in &self.shares {
            // The walk and the hashing run on a blocking thread, not on the runtime's.
            let (share, engine, me) = (s.clone(), self.engine.clone(), me.clone());
            let changed = tokio::task::spawn_blocking(move || {
                share.scan(&me, |rel| {
                    engine
                        .shares
                        .manifest(&share.name, rel)
                        .ok()
                        .map(|m| m.id())
                })
            })
            .await;
            let scanned = match changed {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    log::warn!("share {}: {e}", s.name);
                    continue;
                }
                Err(e) => {
                    log::error!("share {}: the scan failed: {e}", s.name);
                    continue;
                }
            };
            // A file kept against a deletion is a version made here too, and goes out now:
            // a full round would bring it later, and meanwhile an edit on the deleter's
            // side would meet it as a conflict.
            let mut changed = s.take_made();
            changed.extend(scanned);
            if !changed.is_empty() {
                if let Err(e) = s.save() {
                    log::warn!("share {}: {e}", s.name);
                }
            }
            for v in &changed {
                log::debug!("sync: {}/{} changed here ({:?})", s.name, v.path, v.vv);
            }
            let versions = match (all, changed.is_empty()) {
                (true, _) => s.all_versions(),
                (false, false) => changed,
                (false, true) => continue,
            };
            let Ok(body) = serde_json::to_vec(&Announce {
                share: s.name.clone(),
                versions,
                ask_back: false,
            }) else {
                continue;
            };
            // All members at once, and beside the sync loop: a member that is gone (each
            // post to it waits out its timeout) must hold up neither the others nor the
            // announcements coming in. Posts to one member overlap at most for as long
            // as its timeout lasts past the next scan: a bounded few. A member not
            // greeted yet (not heard from since this node started, or one that missed
            // something) gets these too; `greet_missing` sends it everything besides.
            let dir = self.members.directory();
            for p in dir
                .peers
                .iter()
                .filter(|p| p.key != dir.me && p.up && p.shares.contains(&s.name))
            {
                let (vpn, name, key, engine) = (p.vpn, p.name.clone(), p.key, self.engine.clone());
                let (share, body) = (s.clone(), body.clone());
                self.tasks.spawn(async move {
                    if let Err(e) = engine
                        .post(&key, vpn, crate::sync::folder::SYNC_PATH, body)
                        .await
                    {
                        // It missed this: it gets everything once it answers again.
                        share.ungreet(&key);
                        log::debug!("sync announce to {name}: {e}");
                    }
                });
            }
        }
    }

    /// Sends everything held to each member that may have missed something (out of
    /// reach for a while, or an announcement to it failed) as soon as its path is up
    /// again, asking for everything back: after a cut, both sides catch up on the first
    /// round trip that works, not at the next full round. One greeting in flight per
    /// member and share; no scan. Members out of reach now are marked for it.
    pub fn greet_missing(&self) {
        let dir = self.members.directory();
        let now = std::time::Instant::now();
        for s in &self.shares {
            let mut needy = Vec::new();
            for p in dir
                .peers
                .iter()
                .filter(|p| p.key != dir.me && p.shares.contains(&s.name))
            {
                if !p.up {
                    s.ungreet(&p.key);
                    s.forget_backoff(&p.key);
                } else if !s.greeted(&p.key) && s.start_greeting(p.key, now) {
                    needy.push(p);
                }
            }
            if needy.is_empty() {
                continue;
            }
            // Made once for every member greeted now.
            let Ok(body) = serde_json::to_vec(&Announce {
                share: s.name.clone(),
                versions: s.all_versions(),
                ask_back: true,
            }) else {
                for p in needy {
                    s.end_greeting(&p.key, false, now);
                }
                continue;
            };
            for p in needy {
                let body = body.clone();
                let (vpn, name, key, engine) = (p.vpn, p.name.clone(), p.key, self.engine.clone());
                let share = s.clone();
                self.tasks.spawn(async move {
                    let r = engine
                        .post(&key, vpn, crate::sync::folder::SYNC_PATH, body)
                        .await;
                    if let Err(e) = &r {
                        log::debug!("sync greeting to {name}: {e}");
                    } else {
                        share.greet(key);
                    }
                    share.end_greeting(&key, r.is_ok(), std::time::Instant::now());
                });
            }
        }
    }

    /// Sends member `to` every version held in `s`: the answer to its greeting.
    async fn answer(&self, s: &SyncShare, to: &transfer::Peer) {
        let Ok(body) = serde_json::to_vec(&Announce {
            share: s.name.clone(),
            versions: s.all_versions(),
            ask_back: false,
        }) else {
            return;
        };
        if let Err(e) = self
            .engine
            .post(&to.key, to.vpn, crate::sync::folder::SYNC_PATH, body)
            .await
        {
            log::debug!("sync answer to {}: {e}", to.name);
        }
    }

    /// Applies what member `from` announced.
    pub async fn apply(self: &Arc<Self>, from: Key, body: bytes::Bytes) {
        let Ok(a) = serde_json::from_slice::<Announce>(&body) else {
            return;
        };
        let Some(s) = self.shares.iter().find(|s| s.name == a.share).cloned() else {
            return;
        };
        if !s.root_ok() {
            let msg = s.unwritable().unwrap_or_else(|| {
                format!(
                    "{root} lacks its marker {m} (unmounted or emptied?): nothing is synced into \
                 it and no deletion spreads from it until the marker is back; if the folder \
                 is meant to be empty, `touch {root}/{m}` and its deletions will spread",
                    root = s.root.display(),
                    m = crate::sync::disk::MARKER
                )
            });
            if s.set_error(Some(msg.clone())) {
                log::error!("share {}: {msg}", s.name);
            }
            return;
        }
        let dir = self.members.directory();
        let Some(peer) = dir.get(&from).cloned() else {
            return;
        };
        // Heard from: a greeting to it that failed before goes out at once next time.
        s.forget_backoff(&from);
        if a.ask_back {
            self.answer(&s, &peer).await;
            s.greet(from);
        }
        // Nothing is queued or decided by a version whose numbers are absurd.
        let mut versions = a.versions;
        versions.retain(|v| match v.check() {
            Ok(()) if s.leaps(v) => {
                let e = format!(
                    "{}: the announced version of {:?} leaps past the one held here",
                    peer.name,
                    v.path.chars().take(256).collect::<String>()
                );
                if s.set_error(Some(e.clone())) {
                    log::warn!("sync: {e}");
                }
                false
            }
            Ok(()) => true,
            Err(e) => {
                if s.set_error(Some(format!("{}: {e}", peer.name))) {
                    log::warn!("sync: {}: {e}", peer.name);
                }
                false
            }
        });
        // A burst of deletions (a member's `rm -rf`) is held until someone says yes.
        if let Some(reason) = s.screen_deletions(
            &peer.name,
            &mut versions,
            self.config.max_delete_percent,
            std::time::Instant::now(),
        ) {
            log::warn!("share {}: {reason}", s.name);
        }
        // Folders before what they hold, and what they hold removed before them.
        versions.sort_by(|x, y| match (x.deleted, y.deleted) {
            (false, false) => x.path.cmp(&y.path),
            (true, true) => y.path.cmp(&x.path),
            (false, true) => std::cmp::Ordering::Less,
            (true, false) => std::cmp::Ordering::Greater,
        });
        // What this announcement may ask us to pull, for `status` (bytes left); each is
        // dropped once decided otherwise or pulled. A path already in a task's hands
        // keeps the entry that task updates.
        let mut queued = s.pulls.queue(
            versions
                .iter()
                .filter(|v| s.content_differs(v) && !s.pulls.in_flight(&v.path))
                .map(|v| (v.path.clone(), v.size)),
        );
        for v in versions {
            if crate::data::share::clean_path(&v.path).is_err() {
                log::warn!(
                    "{} announced a path outside the share: {:?}",
                    peer.name,
                    v.path
                );
                continue;
            }
            // A path a task holds: this version is decided after that task, against
            // what it leaves there.
            if s.pulls.in_flight(&v.path) {
                if s.pulls.take_off(&v) {
                    self.spawn_act(s.clone(), peer.clone(), v);
                }
                continue;
            }
            let action = s.decide(&v);
            log::debug!(
                "sync: {} announced {}/{} ({:?}): {action:?}",
                peer.name,
                s.name,
                v.path,
                v.vv
            );
            // Pulls run beside this loop, so a big file does not hold up the rest.
            let pull = match &action {
                Action::Fetch { version, .. } => version.content != crate::sync::versions::DIR,
                Action::Conflict { .. } => true,
                _ => false,
            };
            if pull {
                queued.keep(&v.path);
                if s.pulls.take_off(&v) {
                    self.spawn_act(s.clone(), peer.clone(), v);
                }
                continue;
            }
            s.pulls.unqueue(&v.path);
            self.act(&s, &peer, &v, action).await;
        }
        if let Err(e) = s.save() {
            log::warn!("share {}: {e}", s.name);
        }
    }

    /// Queues announced version `v` from `peer` for the share's pull workers, starting
    /// one when fewer than [`crate::sync::folder::MAX_PULLS`] run: a burst of announcements costs
    /// queue entries, not tasks. A worker waits for nothing but its pull; a path's
    /// versions run one after another, in the order they came.
    fn spawn_act(self: &Arc<Self>, s: Arc<SyncShare>, peer: transfer::Peer, v: FileVersion) {
        let queued = s.pulls.enqueue(peer.key, v);
        if let Some(old) = queued.superseded {
            s.pulls.land(&old);
        }
        if !queued.start {
            return;
        }
        // The worker holds the executor, not the other way round: nothing points back.
        let node = self.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            // However the worker ends (queue empty, cancelled, or a panic unwinding), it
            // gives back its place and the path it holds.
            let mut worker = Worker {
                share: s.clone(),
                held: None,
                ended: false,
            };
            let work = async {
                while let Some((from, v)) = worker.next() {
                    let _landing = Landing { share: &s, v: &v };
                    // A member gone since it announced: a later round from another
                    // holder brings the version again.
                    let Some(peer) = node.members.directory().get(&from).cloned() else {
                        continue;
                    };
                    let _held = s.pulls.hold(&v.path);
                    let action = s.decide(&v);
                    log::debug!("sync: {}/{} in turn: {action:?}", s.name, v.path);
                    node.act(&s, &peer, &v, action).await;
                    if let Err(e) = s.save() {
                        log::warn!("share {}: {e}", s.name);
                    }
                }
            };
            tokio::select! {
                () = work => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Applies what was decided for announced version `v`.
    async fn act(&self, s: &SyncShare, peer: &transfer::Peer, v: &FileVersion, action: Action) {
        match action {
            Action::Nothing => {}
            Action::Adopt { path, vv } => s.merge_history(&path, &vv),
            Action::Keep { path, vv } => s.keep(&path, &vv, &key_id(&self.me)),
            Action::Remove { path, version } => {
                let Some(p) = existing_inside(s, &path) else {
                    // Nothing there (its folder went first): the removal is done.
                    s.record(&path, version);
                    return;
                };
                let gone = if p.is_dir() {
                    // Only an empty folder goes; one that still holds something waits for
                    // the removals of its contents, which come in the same round. Our own
                    // leftovers in it (partials of pulls nobody wants now) do not count,
                    // unless a task still works in it: then it waits for the next round.
                    if s.pulls.in_flight_under(&path) {
                        return;
                    }
                    crate::sync::disk::remove_leftovers(&p);
                    std::fs::remove_dir(&p).is_ok()
                } else {
                    let _ = std::fs::remove_file(crate::sync::disk::partial_path(&p));
                    self.remove_keeping(s, &path, &p)
                };
                if gone {
                    s.record(&path, version);
                } else {
                    s.refresh_folder_of(&path);
                }
            }
            Action::Fetch { path, version } if version.content == crate::sync::versions::DIR => {
                if let Ok(p) = inside(s, &path) {
                    if std::fs::create_dir_all(&p).is_ok() {
                        if let Err(e) =
                            crate::sync::disk::set_meta(&p, None, version.mode, version.mtime)
                        {
                            log::debug!("sync: {}/{path}: mode and mtime not set: {e}", s.name);
                        }
                        // What the disk took is recorded, so a mode it refused is no
                        // change of ours to announce back.
                        s.record(&path, version);
                    }
                }
            }
            Action::Touch {
                path,
                version,
                expected,
            } => {
                let Some(p) = existing_inside(s, &path) else {
                    return;
                };
                // Only if it is still what the decision saw (a file's size and mtime),
                // checked through the descriptor that then changes it: a write that
                // landed since keeps its own mtime and is the next scan's.
                match crate::sync::disk::set_meta(&p, expected, version.mode, version.mtime) {
                    Ok(Some(now)) => s.record_installed(&path, version, Some(now)),
                    Ok(None) => {}
                    Err(e) => {
                        // A file system that refuses (a chmod on FAT, a file of another
                        // user): recorded as it stands, so it is not tried every round.
                        log::debug!("sync: {}/{path}: mode and mtime not set: {e}", s.name);
                        s.record(&path, version);
                    }
                }
            }
            Action::Fetch { path, version } => {
                let expected = s.known_stat(&path);
                if let Some(installed) = self
                    .fetch(s, peer, &v.path, &path, &version, expected, None)
                    .await
                {
                    s.record_installed(&path, version, Some(installed));
                } else {
                    // A pull that failed or gave way still made and removed files here.
                    s.refresh_folder_of(&path);
                }
                s.pulls.unqueue(&v.path);
            }
            Action::Conflict {
                move_local_to,
                fetch_into,
                version,
            } => {
                // Both names are this task's until the outcome is recorded.
                let _held = (
                    s.pulls.hold(&fetch_into),
                    move_local_to.as_deref().map(|to| s.pulls.hold(to)),
                );
                // Ours is moved aside only once the remote version is here to take its
                // place, so a failed pull leaves it where it was; otherwise the remote
                // version goes to a name of its own, where nothing should stand.
                let (expected, aside) = match &move_local_to {
                    Some(to) => match inside(s, to) {
                        Ok(to) => (s.known_stat(&v.path), Some(to)),
                        // Nowhere to keep ours: nothing happens, ours stays.
                        Err(()) => return,
                    },
                    None => (s.known_stat(&fetch_into), None),
                };
                if let Some(installed) = self
                    .fetch(s, peer, &v.path, &fetch_into, &version, expected, aside)
                    .await
                {
                    s.record_installed(&fetch_into, version.clone(), Some(installed));
                    if move_local_to.is_none() {
                        // Ours stays at the path and now carries both histories.
                        s.merge_history(&v.path, &version.vv);
                    }
                    log::info!("conflict on {}/{}: both versions kept", s.name, v.path);
                } else {
                    s.refresh_folder_of(&fetch_into);
                }
                s.pulls.unqueue(&v.path);
            }
        }
    }

    /// Removes file `p` (at `path` in share `s`) for another member's deletion: moved to
    /// the share's versions folder unless versions are off. True when it is gone from the
    /// path; a file that cannot be kept is not removed.
    fn remove_keeping(&self, s: &SyncShare, path: &str, p: &std::path::Path) -> bool {
        if !p.exists() {
            return true;
        }
        if self.config.keep_versions_days == 0 {
            return std::fs::remove_file(p).is_ok();
        }
        match crate::sync::kept::keep_moving(&s.root, path, p) {
            Ok(_) => true,
            Err(e) => {
                if s.set_error(Some(format!("{path}: not deleted, since {e}"))) {
                    log::warn!("share {}: {path}: not deleted, since {e}", s.name);
                }
                false
            }
        }
    }

    /// Drops the versions kept longer than `[sync] keep_versions_days` in every
    /// read-write share.
    pub async fn prune_versions(&self) {
        let days = self.config.keep_versions_days;
        for s in &self.shares {
            // A walk of the versions folder: on a blocking thread.
            let root = s.root.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                crate::sync::kept::prune(&root, now_secs(), days)
            })
            .await;
            match pruned {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => log::info!("share {}: {n} old version(s) pruned", s.name),
                Ok(Err(e)) => log::warn!("share {}: {e}", s.name),
                Err(e) => log::error!("share {}: pruning failed: {e}", s.name),
            }
        }
    }

    /// Pulls `version` of `remote_path` from `peer` into `local_path`, replacing only
    /// what `expected` says stands there (size and mtime, or nothing), after moving that
    /// to `aside` when given. Returns the installed file's size and mtime.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        s: &SyncShare,
        peer: &transfer::Peer,
        remote_path: &str,
        local_path: &str,
        version: &FileVersion,
        expected: Option<(u64, u128)>,
        aside: Option<PathBuf>,
    ) -> Option<crate::sync::disk::Meta> {
        // A full disk: nothing is tried until space comes back (checked at every round).
        if !s.space_to_pull() {
            return None;
        }
        let Ok(dest) = inside(s, local_path) else {
            return None;
        };
        let manifest: crate::data::share::Manifest = match self
            .engine
            .ask(&peer.key, peer.vpn, "manifest", &s.name, remote_path)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                log::debug!(
                    "sync: no manifest for {remote_path} from {}: {e}",
                    peer.name
                );
                return None;
            }
        };
        // Nothing is sized by a peer's manifest before it is checked.
        let manifest = match manifest.checked(&peer.name, &s.name, remote_path) {
            Ok(m) => m,
            Err(e) => {
                if s.set_error(Some(e.to_string())) {
                    log::warn!("sync: {e}");
                }
                return None;
            }
        };
        // The announcer moved on since; its next announcement brings the newer version.
        if manifest.id() != version.content {
            return None;
        }
        // Pulled beside the target under a name the scanner skips, then moved over it
        // only if the target is still what was expected: a local edit, made during the
        // pull or before it and not scanned yet, wins, and the next scan announces it.
        let before = expected;
        let mut tag = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut tag);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let staged = crate::data::share::beside(&dest, &format!(".watchalong-stage-{tag}"));
        let progress = Arc::new(Progress::default());
        s.pulls.pulling(remote_path, progress.clone());
        // One partial file per path, whatever the version: a pull cut short by a crash
        // keeps every chunk that still matches the version now wanted (checked against
        // its manifest), and no partial of an abandoned version is left behind. The
        // caller holds the path's turn, so two pulls never write into one partial.
        let part = crate::sync::disk::partial_path(&dest);
        // What we hold already (an append, an edit in place) is copied, not fetched.
        let seeded = {
            let (dest, part, manifest) = (dest.clone(), part.clone(), manifest.clone());
            tokio::task::spawn_blocking(move || {
                crate::sync::disk::seed_partial(&dest, &part, &manifest)
            })
            .await
        };
        if let Err(e) = seeded {
            // Only a panic gets here; the pull then fetches every chunk.
            log::warn!(
                "sync: {}/{local_path}: seeding the partial file failed: {e}",
                s.name
            );
        }
        let size = manifest.size;
        let got = transfer::get_file(
            self.engine.clone(),
            self.members.clone(),
            peer.key,
            manifest,
            staged.clone(),
            progress,
            Some(part),
        )
        .await;
        if let Err(e) = got {
            if e.is_disk_full() {
                let free = crate::sync::disk::free_bytes(&s.root).unwrap_or(0);
                let msg = format!(
                    "disk full: {local_path} ({} bytes) does not fit in {} ({free} bytes free); \
                     syncing of this share waits until space is freed",
                    size,
                    s.root.display()
                );
                if s.disk_full() {
                    log::error!("share {}: {msg}", s.name);
                }
                s.set_error(Some(msg));
            } else if let Some(msg) = e.is_write_refused().then(|| s.unwritable()).flatten() {
                if s.set_error(Some(msg.clone())) {
                    log::error!("share {}: {msg}", s.name);
                }
            } else {
                // A pull that keeps failing the same way is retried every round: said
                // once at warning level while it lasts, then only in the debug log.
                let msg = format!("{local_path}: {e}");
                if s.set_error(Some(msg.clone())) {
                    log::warn!("sync: {}/{msg}", s.name);
                } else {
                    log::debug!("sync: {}/{msg}", s.name);
                }
            }
            return None;
        }
        if crate::sync::disk::stat(&dest) != before {
            log::info!(
                "sync: {}/{local_path} changed here during the pull; keeping the local edit",
                s.name
            );
            let _ = std::fs::remove_file(&staged);
            return None;
        }
        // The version's mtime is set on the staged file, and what is recorded is the
        // staged file's own size and mtime: a write landing on the path right after the
        // rename is then seen by the next scan as the local edit it is.
        if let Err(e) = crate::sync::disk::set_meta(&staged, None, version.mode, version.mtime) {
            log::debug!("sync: {}/{local_path}: mode and mtime not set: {e}", s.name);
        }
        let Some(installed) = crate::sync::disk::meta(&staged) else {
            let _ = std::fs::remove_file(&staged);
            return None;
        };
        if let Some(to) = &aside {
            if let Err(e) = std::fs::rename(&dest, to) {
                let _ = std::fs::remove_file(&staged);
                s.set_error(Some(format!("{local_path}: cannot move ours aside: {e}")));
                return None;
            }
        }
        // What the pull replaces is kept first (a link: the rename below stays atomic);
        // a conflict's own copy was moved aside above and is kept as it is.
        let mut kept = None;
        if aside.is_none() && dest.is_file() && self.config.keep_versions_days > 0 {
            match crate::sync::kept::keep_linking(&s.root, local_path, &dest) {
                Ok(link) => kept = Some(link),
                Err(e) => {
                    let _ = std::fs::remove_file(&staged);
                    s.set_error(Some(format!("{local_path}: not replaced, since {e}")));
                    return None;
                }
            }
        }
        if let Err(e) = std::fs::rename(&staged, &dest) {
            // Nothing was replaced: a link kept to the file still in use would change
            // with every later edit of it, so it goes.
            if let Some(link) = kept {
                let _ = std::fs::remove_file(link);
            }
            let _ = std::fs::remove_file(&staged);
            s.set_error(Some(format!("{local_path}: {e}")));
            return None;
        }
        log::debug!("sync: {}/{local_path} in place", s.name);
        if let Some(dir) = dest.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        s.set_error(None);
        log::debug!("sync: {}/{local_path} done", s.name);
        Some(installed)
    }
}

/// One pull worker of a share: takes queued versions until none is free, and gives back
/// its place (and the path it holds) however it ends.
struct Worker {
    share: Arc<SyncShare>,
    held: Option<String>,
    ended: bool,
}

impl Worker {
    fn next(&mut self) -> Option<(Key, FileVersion)> {
        let job = self.share.pulls.next_work(self.held.take().as_deref());
        match &job {
            Some((_, v)) => self.held = Some(v.path.clone()),
            None => self.ended = true,
        }
        job
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.ended {
            self.share.pulls.worker_done(self.held.as_deref());
        }
    }
}

/// Takes an announced version out of its share's flights and queue when dropped.
struct Landing<'a> {
    share: &'a SyncShare,
    v: &'a FileVersion,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.share.pulls.unqueue(&self.v.path);
        self.share.pulls.land(self.v);
    }
}

/// `path` inside the share's root when its folder exists there (nothing is created).
fn existing_inside(s: &SyncShare, path: &str) -> Option<PathBuf> {
    let parts = crate::data::share::clean_path(path).ok()?;
    let dest = parts.iter().fold(s.root.clone(), |p, c| p.join(c));
    let parent = dest.parent()?.canonicalize().ok()?;
    parent
        .starts_with(s.root.canonicalize().ok()?)
        .then_some(dest)
}

/// `path` inside the share's root, its folders made; refused if they lead out.
fn inside(s: &SyncShare, path: &str) -> Result<PathBuf, ()> {
    let parts = crate::data::share::clean_path(path).map_err(|_| ())?;
    let dest = parts.iter().fold(s.root.clone(), |p, c| p.join(c));
    let parent = dest.parent().ok_or(())?;
    std::fs::create_dir_all(parent).map_err(|_| ())?;
    let root = s.root.canonicalize().map_err(|_| ())?;
    if !parent.canonicalize().map_err(|_| ())?.starts_with(&root) {
        return Err(());
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::{ShareConfig, ShareMode};
    use crate::data::transfer::Directory;
    use crate::sync::versions::VersionVector;
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;

    /// The members this node sees: none (every member an announcement names is gone),
    /// or the ones given.
    struct Members(Vec<transfer::Peer>);

    impl Membership for Members {
        fn directory(&self) -> Directory {
            Directory {
                me: [1; 32],
                peers: self.0.clone(),
            }
        }
        fn vpn(&self) -> (Ipv4Addr, ipnet::Ipv4Net) {
            (
                Ipv4Addr::new(100, 77, 0, 1),
                "100.77.0.0/24".parse().unwrap(),
            )
        }
        fn member_at(&self, _ip: IpAddr) -> Option<Key> {
            None
        }
        fn is_member(&self, _key: &Key) -> bool {
            false
        }
    }

    fn share(dir: &Path) -> Arc<SyncShare> {
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let cfg = ShareConfig {
            name: "s".into(),
            path: dir.join("root"),
            mode: ShareMode::ReadWrite,
        };
        Arc::new(SyncShare::open(&cfg, dir).unwrap())
    }

    fn executor(dir: &Path, keep_versions_days: u64) -> (Arc<Executor>, Arc<SyncShare>) {
        let config = SyncConfig {
            keep_versions_days,
            ..SyncConfig::default()
        };
        executor_with(dir, config, Members(Vec::new()))
    }

    fn executor_with(
        dir: &Path,
        config: SyncConfig,
        members: Members,
    ) -> (Arc<Executor>, Arc<SyncShare>) {
        let s = share(dir);
        let engine = Arc::new(Engine::new(
            crate::data::share::Shares::new(Vec::new(), 4096),
            Arc::new(crate::group::auth::Proofs::new(
                x25519_dalek::StaticSecret::from([7; 32]),
            )),
            0,
            dir.join("cache"),
            1 << 20,
        ));
        let x = Executor::new(
            [1; 32],
            engine,
            Arc::new(members),
            vec![s.clone()],
            config,
            TaskTracker::new(),
            CancellationToken::new(),
        );
        (Arc::new(x), s)
    }

    fn peer() -> transfer::Peer {
        transfer::Peer {
            key: [2; 32],
            name: "kitchen".into(),
            vpn: Ipv4Addr::new(100, 77, 0, 2),
            relay: None,
            site: None,
            up: true,
            shares: vec!["s".into()],
        }
    }

    fn deletion(path: &str) -> FileVersion {
        FileVersion {
            path: path.into(),
            vv: VersionVector::default(),
            deleted: true,
            mtime: 0,
            node: "kitchen".into(),
            content: String::new(),
            size: 0,
            mode: None,
        }
    }

    fn remove(path: &str) -> Action {
        Action::Remove {
            path: path.into(),
            version: deletion(path),
        }
    }

    fn recorded_deleted(s: &SyncShare, path: &str) -> bool {
        s.all_versions().iter().any(|v| v.path == path && v.deleted)
    }

    #[test]
    fn inside_refuses_a_path_that_climbs_out_of_the_share() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        for bad in ["../x", "a/../../x", "/etc/passwd", ".."] {
            assert!(inside(&s, bad).is_err(), "{bad}");
        }
        assert!(!d.path().join("x").exists());
        let ok = inside(&s, "a/b.txt").unwrap();
        assert_eq!(ok, s.root.join("a/b.txt"));
        assert!(s.root.join("a").is_dir(), "its folder is made");
    }

    #[test]
    fn inside_refuses_a_folder_that_is_a_link_out_of_the_share() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, s.root.join("out")).unwrap();
        assert!(inside(&s, "out/x.txt").is_err());
        assert!(existing_inside(&s, "out/x.txt").is_none());
    }

    #[test]
    fn existing_inside_names_nothing_whose_folder_is_missing_and_makes_none() {
        let d = tempfile::tempdir().unwrap();
        let s = share(d.path());
        assert!(existing_inside(&s, "no/such/file").is_none());
        assert!(!s.root.join("no").exists());
        std::fs::create_dir(s.root.join("yes")).unwrap();
        assert_eq!(
            existing_inside(&s, "yes/file"),
            Some(s.root.join("yes/file"))
        );
        assert!(existing_inside(&s, "../file").is_none());
    }

    #[tokio::test]
    async fn a_members_deletion_moves_the_file_into_the_versions_folder_and_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = executor(d.path(), 30);
        std::fs::write(s.root.join("a.txt"), b"ours").unwrap();
        x.act(&s, &peer(), &deletion("a.txt"), remove("a.txt"))
            .await;
        assert!(!s.root.join("a.txt").exists());
        let kept = crate::sync::kept::list(&s.root, "a.txt").unwrap();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(recorded_deleted(&s, "a.txt"));
    }

    #[tokio::test]
    async fn with_versions_off_a_members_deletion_removes_the_file_outright() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = executor(d.path(), 0);
        std::fs::write(s.root.join("a.txt"), b"ours").unwrap();
        x.act(&s, &peer(), &deletion("a.txt"), remove("a.txt"))
            .await;
        assert!(!s.root.join("a.txt").exists());
        assert!(!s.root.join(crate::sync::kept::DIR).exists());
        assert!(recorded_deleted(&s, "a.txt"));
    }

    #[tokio::test]
    async fn a_folder_that_still_holds_a_file_is_not_removed_for_a_deletion() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = executor(d.path(), 30);
        std::fs::create_dir(s.root.join("dir")).unwrap();
        std::fs::write(s.root.join("dir/keep.txt"), b"x").unwrap();
        x.act(&s, &peer(), &deletion("dir"), remove("dir")).await;
        assert!(s.root.join("dir/keep.txt").exists());
        assert!(!recorded_deleted(&s, "dir"), "not done, so not recorded");
        // Once empty, it goes.
        std::fs::remove_file(s.root.join("dir/keep.txt")).unwrap();
        x.act(&s, &peer(), &deletion("dir"), remove("dir")).await;
        assert!(!s.root.join("dir").exists());
        assert!(recorded_deleted(&s, "dir"));
    }

    #[tokio::test]
    async fn a_deletion_of_what_is_not_there_is_recorded_as_done() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = executor(d.path(), 30);
        x.act(&s, &peer(), &deletion("gone/a.txt"), remove("gone/a.txt"))
            .await;
        assert!(recorded_deleted(&s, "gone/a.txt"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulls_queued_from_a_member_gone_end_their_workers_and_land_every_version() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = executor(d.path(), 30);
        // More than the workers a share may run, two on one path.
        let mut versions: Vec<FileVersion> = (0..crate::sync::folder::MAX_PULLS + 3)
            .map(|i| deletion(&format!("f{i}")))
            .collect();
        let mut again = deletion("f0");
        again.vv.0.insert("kitchen".into(), 1);
        versions.push(again);
        for v in versions.clone() {
            assert!(s.pulls.take_off(&v));
            x.spawn_act(s.clone(), peer(), v);
        }
        x.tasks.close();
        x.tasks.wait().await;
        assert_eq!(s.pulls.work_load(), (0, 0), "queue empty, no worker left");
        for v in &versions {
            assert!(!s.pulls.in_flight(&v.path), "{} still in flight", v.path);
        }
    }

    /// An executor whose share holds `files`, scanned, with "kitchen" a member holding
    /// the share, deletions held past `max_delete_percent`.
    fn scanned(
        dir: &Path,
        files: &[&str],
        max_delete_percent: u64,
    ) -> (Arc<Executor>, Arc<SyncShare>) {
        let config = SyncConfig {
            keep_versions_days: 30,
            max_delete_percent,
        };
        let (x, s) = executor_with(dir, config, Members(vec![peer()]));
        for f in files {
            std::fs::write(s.root.join(f), f.as_bytes()).unwrap();
        }
        let id = |rel: &str| {
            std::fs::read(s.root.join(rel))
                .ok()
                .map(|b| blake3::hash(&b).to_hex().to_string())
        };
        assert_eq!(s.scan(&key_id(&[1; 32]), id).unwrap().len(), files.len());
        (x, s)
    }

    /// Kitchen's deletion of `path`, after the version held here.
    fn their_deletion(s: &SyncShare, path: &str) -> FileVersion {
        let ours = s
            .all_versions()
            .into_iter()
            .find(|v| v.path == path)
            .unwrap();
        let mut vv = ours.vv.clone();
        vv.0.insert(key_id(&[2; 32]), 1);
        FileVersion {
            vv,
            node: key_id(&[2; 32]),
            ..deletion(path)
        }
    }

    fn announce(share: &str, versions: Vec<FileVersion>) -> bytes::Bytes {
        serde_json::to_vec(&Announce {
            share: share.into(),
            versions,
            ask_back: false,
        })
        .unwrap()
        .into()
    }

    #[tokio::test]
    async fn an_announced_deletion_after_ours_is_applied_keeping_a_version() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = scanned(d.path(), &["a.txt", "b.txt"], 100);
        let body = announce("s", vec![their_deletion(&s, "a.txt")]);
        x.apply([2; 32], body).await;
        assert!(!s.root.join("a.txt").exists());
        assert!(s.root.join("b.txt").exists());
        assert_eq!(crate::sync::kept::list(&s.root, "a.txt").unwrap().len(), 1);
        assert!(recorded_deleted(&s, "a.txt"));
    }

    #[tokio::test]
    async fn a_file_kept_against_two_deletions_ends_newer_than_both_and_a_deleter_fetches_it() {
        // What seed 15728714837379047110 of tests/sync.rs left behind: "kitchen" deleted
        // the version held here; "attic", which never saw that version, deleted an older
        // one. Each of the two takes the other's deletion and holds the path deleted
        // under both their histories; here ours, an edit, beats each deletion.
        let d = tempfile::tempdir().unwrap();
        let attic = transfer::Peer {
            key: [3; 32],
            name: "attic".into(),
            vpn: Ipv4Addr::new(100, 77, 0, 3),
            ..peer()
        };
        let config = SyncConfig {
            keep_versions_days: 30,
            max_delete_percent: 100,
        };
        let (x, s) = executor_with(d.path(), config, Members(vec![peer(), attic]));
        std::fs::write(s.root.join("n1.bin"), b"ours").unwrap();
        let id = |rel: &str| {
            std::fs::read(s.root.join(rel))
                .ok()
                .map(|b| blake3::hash(&b).to_hex().to_string())
        };
        assert_eq!(s.scan(&key_id(&[1; 32]), id).unwrap().len(), 1);
        let kitchens = their_deletion(&s, "n1.bin");
        let attics = FileVersion {
            vv: VersionVector::default().bumped(&key_id(&[3; 32])),
            node: key_id(&[3; 32]),
            ..deletion("n1.bin")
        };
        let deleters = kitchens.vv.merged(&attics.vv);
        // Attic's first: ours is concurrent with it and stays; then kitchen's, which
        // supersedes the version ours was before.
        x.apply([3; 32], announce("s", vec![attics])).await;
        x.apply([2; 32], announce("s", vec![kitchens])).await;
        assert!(s.root.join("n1.bin").exists(), "ours was removed");
        let held = s
            .all_versions()
            .into_iter()
            .find(|v| v.path == "n1.bin")
            .unwrap();
        assert!(!held.deleted);
        assert_eq!(s.take_made(), vec![held.clone()], "not announced");
        // Under the deleters' own vector, each side would find the other's version
        // equal for ever and no full round would repair it.
        assert_eq!(
            held.vv.compare(&deleters),
            crate::sync::versions::Order::After,
            "ours {:?}, the deleters' {:?}",
            held.vv,
            deleters
        );
        // A deleter that hears of ours takes it back.
        let e = tempfile::tempdir().unwrap();
        let at_kitchen = share(e.path());
        at_kitchen.record(
            "n1.bin",
            FileVersion {
                vv: deleters,
                ..deletion("n1.bin")
            },
        );
        assert!(
            matches!(at_kitchen.decide(&held), Action::Fetch { .. }),
            "{:?}",
            at_kitchen.decide(&held)
        );
    }

    #[tokio::test]
    async fn an_announcement_from_no_member_or_for_no_share_of_ours_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = scanned(d.path(), &["a.txt", "b.txt"], 100);
        let deletion = their_deletion(&s, "a.txt");
        x.apply([9; 32], announce("s", vec![deletion.clone()]))
            .await;
        x.apply([2; 32], announce("other", vec![deletion])).await;
        x.apply([2; 32], bytes::Bytes::from_static(b"{not json"))
            .await;
        assert!(s.root.join("a.txt").exists());
        assert!(!recorded_deleted(&s, "a.txt"));
    }

    #[tokio::test]
    async fn a_member_deleting_most_of_a_share_is_held_and_nothing_goes() {
        let d = tempfile::tempdir().unwrap();
        let (x, s) = scanned(d.path(), &["a.txt", "b.txt", "c.txt"], 50);
        let all = ["a.txt", "b.txt", "c.txt"].map(|f| their_deletion(&s, f));
        x.apply([2; 32], announce("s", all.to_vec())).await;
        for f in ["a.txt", "b.txt", "c.txt"] {
            assert!(s.root.join(f).exists(), "{f}");
        }
        assert!(s.deletions_held().is_some());
    }
}
