//! The running node: its persisted group and invites under one lock (the [`Book`]), its
//! keys and tunnel, and what the control API asks of it. What it does is cut by seam:
//! membership, invites and joins in [`crate::daemon::members`], gossip and tunnel peers
//! in [`crate::daemon::peers`], the directory the data layer reads in
//! [`crate::daemon::directory`], and sync's executor in [`crate::sync::apply`], which
//! the daemon owns beside the node. This file holds the node's state, the control
//! `Handler` and the `get` registry. It must not hold protocol rules (the pure modules
//! decide). The book lock is taken by every chunk request: the only slow work under it
//! is a write that must land before its change counts (a join, a removal, an invite).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use hyper::StatusCode;

use crate::base::clock::now_secs;
use crate::base::config::Config;
use crate::base::lock::Recover;
use crate::base::state;
use crate::control::{
    ApiError, Caller, Empty, GetReply, GetRequest, GossipReply, Handler, InjectRequest, InviteView,
    JoinReply, JoinRequest, LinkReply, LinkRequest, LsEntry, LsReply, NodeStatus, PeerAddRequest,
    PeerRemoveRequest, PeerView, PeersReply, PlanReply, PlanRequest, RemoveRequest, StatusReply,
    TransferView, VersionsRequest,
};
pub use crate::daemon::book::Book;
use crate::daemon::book::{invite_state, GroupSaver, INVITES_FILE};
use crate::data::transfer::{self, Directory, Engine, Membership, Progress};
use crate::group::identity::{self, key_id, key_to_base64, Key};
use crate::group::link::InviteId;
use crate::group::place::StaticPeer;
use crate::net::tunnel::{PathKind, Tunnel};
use crate::sync::folder::SyncShare;
use crate::watch::hub::{FileRequest, Report, RoomView, WaitRequest, WatchReply};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// The fields the node's other files (members, peers, directory) work with are theirs to
// read: `pub(super)`, the daemon folder's, and no further.
pub struct Node {
    pub config: Config,
    pub public_key: Key,
    /// The private half of `public_key`: joins prove and check keys with it.
    pub(super) wg_secret: x25519_dalek::StaticSecret,
    pub(super) signing: SigningKey,
    book: Mutex<Book>,
    /// The group file's writes, made outside the book lock in order.
    pub(super) saver: GroupSaver,
    pub tunnel: Arc<Tunnel>,
    pub engine: Arc<Engine>,
    /// One join at a time: a join rewrites the whole group.
    pub(super) joining: tokio::sync::Mutex<()>,
    /// `get`s in progress and done, by id.
    transfers: Mutex<BTreeMap<String, TransferEntry>>,
    /// The tasks running `get`s and sync's pulls; the daemon waits for them on the way
    /// out.
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
    /// This node's own `Arc`, for the `get` and `watch` tasks the handler starts (set
    /// once by the daemon).
    this: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// Read-write shares kept in sync, and the announcements waiting for the sync task.
    pub syncs: Vec<Arc<SyncShare>>,
    pub(super) sync_tx: tokio::sync::mpsc::Sender<(Key, bytes::Bytes)>,
    /// Watch-along: streams for local players and the rooms.
    pub watch: crate::watch::hub::Watch,
    /// Gossip datagrams refused because no member's daemon sealed them.
    pub(super) refused_gossip: std::sync::atomic::AtomicU64,
    /// When the host last signed where it sees each member.
    pub(super) observed_signed: Mutex<std::collections::HashMap<Key, std::time::Instant>>,
}

struct TransferEntry {
    target: String,
    dest: PathBuf,
    /// Where the daemon writes the file when it may not write `dest` itself.
    handoff: Option<PathBuf>,
    /// The user who asked: the only one (with root) the handed-over file is given to.
    owner: u32,
    source: String,
    progress: Arc<Progress>,
    error: Arc<Mutex<Option<String>>>,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    /// The file a finished transfer left in the daemon's downloads folder for the CLI,
    /// which may write where the daemon may not.
    fn handed_over(&self, id: &str, caller: &Caller) -> Result<PathBuf, ApiError> {
        let t = self.transfers.locked();
        let e = t
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
        if caller.uid != 0 && caller.uid != e.owner {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("transfer {id} is another user's: its file is theirs to take"),
            ));
        }
        let path = e.handoff.clone().ok_or_else(|| {
            ApiError::bad_request(format!(
                "transfer {id} wrote its destination itself: there is nothing to hand over"
            ))
        })?;
        let done =
            e.finished.load(std::sync::atomic::Ordering::SeqCst) && e.error.locked().is_none();
        if !done {
            return Err(ApiError::conflict(format!(
                "transfer {id} has not finished well: wait for `watchalong transfers` to say done"
            )));
        }
        Ok(path)
    }

    fn transfer_view(&self, id: &str, e: &TransferEntry) -> TransferView {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        let finished = e.finished.load(SeqCst);
        let error = e.error.locked().clone();
        let route = e.progress.route.locked().clone();
        TransferView {
            id: id.to_string(),
            target: e.target.clone(),
            dest: e.dest.clone(),
            handoff: e.handoff.clone(),
            source: e.source.clone(),
            size: e.progress.size.load(Relaxed),
            done: e.progress.done.load(Relaxed),
            corrupt_chunks: e.progress.corrupt.load(Relaxed),
            route,
            state: match (finished, &error) {
                (false, _) => "running",
                (true, None) => "done",
                (true, Some(_)) => "failed",
            }
            .into(),
            error,
            counters: self.engine.counters(),
        }
    }
}

/// Files `get` could not write at their destination, waiting for the CLI to move them.
pub const DOWNLOADS_DIR: &str = "downloads";
/// What the daemon builds a node from.
pub struct Parts {
    pub config: Config,
    pub public_key: Key,
    pub wg_secret: x25519_dalek::StaticSecret,
    pub signing: SigningKey,
    pub book: Book,
    pub tunnel: Arc<Tunnel>,
    pub engine: Arc<Engine>,
    pub cancel: CancellationToken,
    pub syncs: Vec<Arc<SyncShare>>,
    pub sync_tx: tokio::sync::mpsc::Sender<(Key, bytes::Bytes)>,
    pub streams: Arc<crate::watch::stream::Streams>,
}

impl Node {
    pub fn new(p: Parts) -> Node {
        Node {
            public_key: p.public_key,
            wg_secret: p.wg_secret,
            signing: p.signing,
            book: Mutex::new(p.book),
            saver: GroupSaver::default(),
            tunnel: p.tunnel,
            engine: p.engine.clone(),
            joining: tokio::sync::Mutex::new(()),
            transfers: Mutex::new(BTreeMap::new()),
            tasks: TaskTracker::new(),
            cancel: p.cancel,
            this: std::sync::OnceLock::new(),
            syncs: p.syncs,
            sync_tx: p.sync_tx,
            watch: crate::watch::hub::Watch::new(
                p.streams,
                p.engine.clone(),
                key_id(&p.public_key),
                p.config.node.name.clone(),
                p.config.watch.pause_when_buffering,
            ),
            config: p.config,
            refused_gossip: std::sync::atomic::AtomicU64::new(0),
            observed_signed: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Lets the node hand itself to the tasks it starts.
    pub fn set_self(self: &Arc<Self>) {
        let _ = self.this.set(Arc::downgrade(self));
    }

    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.locked()
    }

    pub(super) fn path(&self, file: &str) -> PathBuf {
        self.config.node.state_dir.join(file)
    }
}

fn kept_error(e: crate::sync::kept::KeptError) -> ApiError {
    match e {
        crate::sync::kept::KeptError::FindVersion(..) => ApiError::not_found(e),
        crate::sync::kept::KeptError::CheckPath(_) => ApiError::bad_request(e),
        _ => ApiError::internal(e),
    }
}

impl Node {
    /// The read-write share `SHARE[/PATH]` names, and the path in it.
    fn sync_share_of(&self, target: &str) -> Result<(Arc<SyncShare>, String), ApiError> {
        let (share, path) = target.split_once('/').unwrap_or((target, ""));
        let s = self.syncs.iter().find(|s| s.name == share).ok_or_else(|| {
            ApiError::not_found(format!(
                "{share} is not a read-write share of this node: only those keep versions"
            ))
        })?;
        Ok((s.clone(), path.to_string()))
    }
}

/// `share/path` split in two; the path may be empty (the share's root).
fn split_target(target: &str) -> Result<(String, String), ApiError> {
    let t = target.trim_start_matches('/');
    let (share, path) = t.split_once('/').unwrap_or((t, ""));
    if share.is_empty() {
        return Err(ApiError::bad_request(
            "expected SHARE/PATH, like movies/film.mkv",
        ));
    }
    Ok((share.to_string(), path.to_string()))
}

impl Node {
    /// Members holding `share`, this node first, then nearby ones, then the rest.
    fn holders(
        &self,
        dir: &Directory,
        share: &str,
        from: Option<&str>,
    ) -> Result<Vec<transfer::Peer>, ApiError> {
        let my_site = dir.get(&dir.me).and_then(|p| p.site.clone());
        let mut v: Vec<transfer::Peer> = dir
            .peers
            .iter()
            .filter(|p| p.shares.iter().any(|s| s == share))
            .filter(|p| from.is_none_or(|f| p.name == f))
            .cloned()
            .collect();
        v.sort_by_key(|p| {
            (
                p.key != dir.me,
                !(p.site.is_some() && p.site == my_site),
                !p.up,
            )
        });
        if v.is_empty() {
            return Err(ApiError::not_found(match from {
                Some(f) => format!("{f} does not offer a share called {share:?}"),
                None => {
                    format!("no member offers a share called {share:?}; `watchalong ls` lists them")
                }
            }));
        }
        Ok(v)
    }

    /// The file's manifest from the first holder that has it.
    async fn find_manifest(
        &self,
        dir: &Directory,
        share: &str,
        path: &str,
        from: Option<&str>,
    ) -> Result<(transfer::Peer, crate::data::share::Manifest), ApiError> {
        let mut last = String::new();
        for p in self.holders(dir, share, from)? {
            let got = if p.key == dir.me {
                tokio::task::block_in_place(|| self.engine.shares.manifest(share, path))
                    .map_err(|e| format!("{}: {e}", p.name))
            } else {
                // Nothing is sized by a peer's manifest before it is checked; a refusal
                // names the member itself.
                match self
                    .engine
                    .ask::<crate::data::share::Manifest>(&p.key, p.vpn, "manifest", share, path)
                    .await
                {
                    Ok(m) => m.checked(&p.name, share, path).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("{}: {e}", p.name)),
                }
            };
            match got {
                Ok(m) => return Ok((p, m)),
                Err(e) => last = e,
            }
        }
        Err(ApiError::not_found(format!(
            "{share}/{path} is not available ({last})"
        )))
    }
}

impl Handler for Node {
    async fn status(&self) -> Result<StatusReply, ApiError> {
        let book = self.book();
        let g = &book.group;
        Ok(StatusReply {
            node: NodeStatus {
                name: self.config.node.name.clone(),
                public_key: key_to_base64(&self.public_key),
                address: g.my_address,
                network: g.network.to_string(),
                interface: self.config.tunnel.interface.clone(),
                listen_port: self
                    .tunnel
                    .local_port()
                    .unwrap_or(self.config.tunnel.listen_port),
                role: if g.is_host(&self.public_key) {
                    "host"
                } else {
                    "member"
                }
                .into(),
                host_name: g.host_name.clone(),
                spoofed_packets: self.tunnel.spoofed_count(),
                refused_gossip: self
                    .refused_gossip
                    .load(std::sync::atomic::Ordering::Relaxed)
                    + self.tunnel.local_gossip_dropped(),
                handshakes_refused: self.tunnel.handshakes_refused(),
                chunks: self.engine.counters(),
            },
            peers: self.tunnel.status(),
            shares: self.syncs.iter().map(|s| s.status()).collect(),
        })
    }

    async fn create_link(&self, req: LinkRequest) -> Result<LinkReply, ApiError> {
        Ok(self
            .new_link(req.uses, Duration::from_secs(req.expires_secs))
            .await?)
    }

    async fn list_links(&self) -> Result<Vec<InviteView>, ApiError> {
        let now = now_secs();
        Ok(self
            .book()
            .invites
            .invites
            .iter()
            .map(|r| InviteView {
                id: r.id,
                created_at: r.created_at,
                expires_at: r.expires_at,
                uses_allowed: r.uses_allowed,
                uses: r.uses,
                state: invite_state(r, now).into(),
                refused_redemptions: r.refused.count,
                last_refused_at: r.refused.last_at,
                last_refused_key: r.refused.last_key.clone(),
            })
            .collect())
    }

    async fn revoke_link(&self, id: InviteId) -> Result<Empty, ApiError> {
        let mut book = self.book();
        let mut invites = book.invites.clone();
        invites.revoke(id).map_err(ApiError::not_found)?;
        state::write_json(&self.path(INVITES_FILE), &invites).map_err(ApiError::internal)?;
        book.invites = invites;
        log::info!("revoked invite {id}");
        Ok(Empty {})
    }

    async fn join(&self, req: JoinRequest) -> Result<JoinReply, ApiError> {
        let reply = self.do_join(&req.link).await?;
        let out = self.refresh_announcement(None, &mut rand::thread_rng());
        self.send(out).await;
        Ok(reply)
    }

    async fn add_peer(&self, req: PeerAddRequest) -> Result<Empty, ApiError> {
        let key = identity::key_from_base64(&req.public_key).ok_or_else(|| {
            ApiError::bad_request(
                "the public key must be 32 bytes in base64, as `wg pubkey` prints",
            )
        })?;
        let peer = StaticPeer {
            name: req.name,
            public_key: key,
            address: req.address,
            endpoint: req.endpoint,
        };
        {
            let mut book = self.book();
            let mut group = book.group.clone();
            group.add_static(peer).map_err(ApiError::conflict)?;
            self.save_group(&group).map_err(ApiError::internal)?;
            book.group = group;
        }
        self.sync_tunnel().await;
        Ok(Empty {})
    }

    async fn remove_peer(&self, req: PeerRemoveRequest) -> Result<Empty, ApiError> {
        let key = identity::key_from_base64(&req.public_key)
            .ok_or_else(|| ApiError::bad_request("the public key must be 32 bytes in base64"))?;
        {
            let mut book = self.book();
            let mut group = book.group.clone();
            if !group.remove_static(&key) {
                return Err(ApiError::not_found(
                    "no peer added by hand has that public key (members leave with `watchalong remove`)",
                ));
            }
            self.save_group(&group).map_err(ApiError::internal)?;
            book.group = group;
        }
        self.sync_tunnel().await;
        Ok(Empty {})
    }

    async fn peers(&self) -> Result<PeersReply, ApiError> {
        let seen = self.tunnel.status();
        let book = self.book();
        let g = &book.group;
        let my_site = self.my_site(&book);
        let peers = g
            .mesh
            .active()
            .filter(|m| m.wg_key != self.public_key)
            .map(|m| {
                let key = key_to_base64(&m.wg_key);
                let ann = g.mesh.announcement(&m.wg_key);
                let site = g.mesh.site_of(&m.wg_key);
                let t = seen.iter().find(|p| p.public_key == key);
                let on_lan = t
                    .and_then(|t| t.endpoint)
                    .is_some_and(|ep| ann.is_some_and(|a| a.lan.contains(&ep)));
                let direct = t.is_some_and(|t| t.path == PathKind::Direct);
                let nearby = site.is_some() && site == my_site && direct && on_lan;
                PeerView {
                    name: m.name.clone(),
                    address: m.address,
                    public_key: key.clone(),
                    site: site.map(|s| s.to_string()),
                    nearby,
                    path: match t.map(|t| t.path) {
                        Some(PathKind::Direct) if nearby => "lan".into(),
                        Some(p) => p.as_str().into(),
                        None => "down".into(),
                    },
                    endpoint: t.and_then(|t| t.endpoint),
                    rtt_ms: t.and_then(|t| t.rtt_ms),
                    last_handshake_secs_ago: t.and_then(|t| t.last_handshake_secs_ago),
                }
            })
            .collect();
        Ok(PeersReply {
            name: self.config.node.name.clone(),
            address: g.my_address,
            site: my_site.map(|s| s.to_string()),
            peers,
        })
    }

    async fn remove_member(&self, req: RemoveRequest) -> Result<Empty, ApiError> {
        let (key, out) = self.revoke(&req.node, req.keep_invite)?;
        self.send(out).await;
        self.tunnel.remove_peer(&key);
        self.sync_tunnel().await;
        Ok(Empty {})
    }

    async fn gossip(&self) -> Result<GossipReply, ApiError> {
        Ok(self.gossip_reply())
    }

    async fn ls(&self, target: String) -> Result<LsReply, ApiError> {
        let dir = self.directory();
        if target.trim_matches('/').is_empty() {
            let mut shares: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in &dir.peers {
                for s in &p.shares {
                    shares.entry(s.clone()).or_default().push(p.name.clone());
                }
            }
            let entries = shares
                .into_iter()
                .map(|(name, holders)| LsEntry {
                    name,
                    dir: true,
                    size: 0,
                    holders,
                })
                .collect();
            return Ok(LsReply {
                holder: None,
                entries,
            });
        }
        let (share, path) = split_target(&target)?;
        let mut last = String::new();
        for p in self.holders(&dir, &share, None)? {
            let got: Result<Vec<crate::data::share::Entry>, String> = if p.key == dir.me {
                tokio::task::block_in_place(|| self.engine.shares.ls(&share, &path))
                    .map_err(|e| e.to_string())
            } else {
                self.engine
                    .ask(&p.key, p.vpn, "ls", &share, &path)
                    .await
                    .map_err(|e| e.to_string())
            };
            match got {
                Ok(v) => {
                    return Ok(LsReply {
                        holder: Some(p.name.clone()),
                        entries: v
                            .into_iter()
                            .map(|e| LsEntry {
                                name: e.name,
                                dir: e.dir,
                                size: e.size,
                                holders: vec![],
                            })
                            .collect(),
                    })
                }
                Err(e) => last = format!("{}: {e}", p.name),
            }
        }
        Err(ApiError::not_found(format!("cannot list {target}: {last}")))
    }

    async fn plan(&self, req: PlanRequest) -> Result<PlanReply, ApiError> {
        let (share, path) = split_target(&req.target)?;
        let dir = self.directory();
        let (source, manifest) = self.find_manifest(&dir, &share, &path, None).await?;
        let requester = match &req.to {
            Some(name) => {
                dir.by_name(name)
                    .ok_or_else(|| ApiError::not_found(format!("no member is called {name}")))?
                    .key
            }
            None => dir.me,
        };
        let route = dir
            .plan(&source.key, &requester, &manifest.id(), &[])
            .map_err(ApiError::internal)?;
        Ok(PlanReply {
            source: source.name,
            requester: dir
                .get(&requester)
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            size: manifest.size,
            summary: transfer::describe(&route),
            route,
        })
    }

    async fn watch(&self, req: FileRequest) -> Result<WatchReply, ApiError> {
        let (share, path) = split_target(&req.file)?;
        if path.is_empty() {
            return Err(ApiError::bad_request(
                "expected SHARE/PATH of a file to watch",
            ));
        }
        let file = format!("{share}/{path}");
        let dir = self.directory();
        let (source, manifest) = self.find_manifest(&dir, &share, &path, None).await?;
        let stream = if source.key == dir.me {
            let local = self
                .engine
                .shares
                .resolve(&share, &path)
                .map_err(ApiError::not_found)?;
            crate::watch::stream::Stream::local(&file, manifest, dir.me, local)
        } else {
            let cache = self.watch.streams.cache_dir.clone();
            tokio::task::block_in_place(|| {
                crate::watch::stream::Stream::remote(&file, manifest, source.key, &cache)
            })
        }
        .map_err(ApiError::internal)?;
        let members: Arc<dyn Membership> = self
            .this
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| ApiError::internal("the node is shutting down"))?;
        let stream = self.watch.streams.add(stream, self.engine.clone(), members);
        let url = self
            .watch
            .streams
            .url(&stream)
            .ok_or_else(|| ApiError::internal("the stream endpoint is not listening"))?;
        // Not the URL: it holds the stream's token, and the log has other readers.
        log::info!("watch {file}: from {}", source.name);
        Ok(WatchReply {
            file: file.clone(),
            url,
            size: stream.manifest.size,
            source: source.name,
            state: self.watch.state(&file),
        })
    }

    async fn room_report(&self, req: Report) -> Result<RoomView, ApiError> {
        let file = req.file.clone();
        let (view, urgent) = self.watch.report(req);
        if urgent {
            let dir = self.directory();
            self.watch.send_now(&file, &dir).await;
        }
        Ok(view)
    }

    async fn room_wait(&self, req: WaitRequest) -> Result<RoomView, ApiError> {
        Ok(self.watch.wait(&req).await)
    }

    async fn room_leave(&self, req: FileRequest) -> Result<Empty, ApiError> {
        self.watch.leave(&req.file);
        let dir = self.directory();
        self.watch.send_now(&req.file, &dir).await;
        Ok(Empty {})
    }

    async fn rooms(&self) -> Result<Vec<RoomView>, ApiError> {
        Ok(self.watch.views())
    }

    async fn release(&self, req: VersionsRequest) -> Result<Empty, ApiError> {
        let (s, _) = self.sync_share_of(&req.target)?;
        if s.release_deletions(std::time::Instant::now()) {
            log::info!("share {}: held deletions released", s.name);
        }
        Ok(Empty {})
    }

    async fn versions(
        &self,
        req: VersionsRequest,
    ) -> Result<Vec<crate::sync::kept::Kept>, ApiError> {
        let (s, path) = self.sync_share_of(&req.target)?;
        tokio::task::block_in_place(|| crate::sync::kept::list(&s.root, &path)).map_err(kept_error)
    }

    async fn restore(&self, req: VersionsRequest) -> Result<crate::sync::kept::Kept, ApiError> {
        let (s, path) = self.sync_share_of(&req.target)?;
        let k = tokio::task::block_in_place(|| crate::sync::kept::restore(&s.root, &path, req.at))
            .map_err(kept_error)?;
        log::info!("share {}: {} restored as kept at {}", s.name, k.path, k.at);
        Ok(k)
    }

    async fn start_get(&self, req: GetRequest, caller: &Caller) -> Result<GetReply, ApiError> {
        let (share, path) = split_target(&req.target)?;
        if !req.dest.is_absolute() {
            return Err(ApiError::bad_request(
                "the destination must be an absolute path",
            ));
        }
        // The daemon may write where its caller may not (it often runs as root): the
        // file goes only where the user who asked could have put it.
        let folder = req.dest.parent().unwrap_or(std::path::Path::new("/"));
        if !tokio::task::block_in_place(|| caller.may_write_in(folder)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "user {} may not write in {}: choose a destination of your own",
                    caller.uid,
                    folder.display()
                ),
            ));
        }
        let dir = self.directory();
        let (source, manifest) = self
            .find_manifest(&dir, &share, &path, req.from.as_deref())
            .await?;
        let mut id_bytes = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id_bytes);
        let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Under the shipped unit the daemon sees most of the file system read-only (and
        // no home folders at all): it then writes into its own downloads folder, and
        // the CLI, which runs with the user's rights, moves the file to its destination.
        let beside = req.dest.parent().unwrap_or(std::path::Path::new("/"));
        let handoff = match crate::sync::folder::probe_write(beside) {
            Ok(()) => None,
            Err(e) => {
                let downloads = self.config.node.state_dir.join(DOWNLOADS_DIR);
                std::fs::create_dir_all(&downloads).map_err(ApiError::internal)?;
                log::debug!(
                    "get {}: the daemon cannot write beside {} ({e}); handing it over from {}",
                    req.target,
                    req.dest.display(),
                    downloads.display()
                );
                Some(downloads.join(&id))
            }
        };
        let progress = Arc::new(Progress::default());
        let error = Arc::new(Mutex::new(None));
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.transfers.locked().insert(
            id.clone(),
            TransferEntry {
                target: req.target.clone(),
                dest: req.dest.clone(),
                handoff: handoff.clone(),
                owner: caller.uid,
                source: source.name.clone(),
                progress: progress.clone(),
                error: error.clone(),
                finished: finished.clone(),
            },
        );
        let members: Arc<dyn Membership> = self
            .this
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| ApiError::internal("the node is shutting down"))?;
        let source_name = source.name.clone();
        let (engine, cancel) = (self.engine.clone(), self.cancel.clone());
        let size = manifest.size;
        let target = req.target.clone();
        let dest = handoff.unwrap_or_else(|| req.dest.clone());
        self.tasks.spawn(async move {
            let work =
                transfer::get_file(engine, members, source.key, manifest, dest, progress, None);
            let r = tokio::select! {
                r = work => r.map_err(|e| e.to_string()),
                () = cancel.cancelled() => Err("the daemon is stopping".to_string()),
            };
            match &r {
                Ok(()) => log::info!("got {target}"),
                Err(e) => log::warn!("get {target} failed: {e}"),
            }
            *error.locked() = r.err();
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(GetReply {
            id,
            source: source_name,
            size,
        })
    }

    async fn transfer(&self, id: String) -> Result<TransferView, ApiError> {
        let t = self.transfers.locked();
        let e = t
            .get(&id)
            .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
        Ok(self.transfer_view(&id, e))
    }

    async fn transfers(&self) -> Result<Vec<TransferView>, ApiError> {
        let t = self.transfers.locked();
        Ok(t.iter().map(|(id, e)| self.transfer_view(id, e)).collect())
    }

    async fn transfer_file(
        &self,
        id: String,
        offset: u64,
        caller: &Caller,
    ) -> Result<bytes::Bytes, ApiError> {
        let path = self.handed_over(&id, caller)?;
        let piece = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Seek};
            let mut f = std::fs::File::open(&path)?;
            f.seek(std::io::SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.take(crate::control::FILE_PIECE).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
        Ok(bytes::Bytes::from(piece))
    }

    async fn drop_transfer_file(&self, id: String, caller: &Caller) -> Result<Empty, ApiError> {
        let path = self.handed_over(&id, caller)?;
        std::fs::remove_file(path).map_err(ApiError::internal)?;
        Ok(Empty {})
    }

    async fn inject_gossip(&self, req: InjectRequest) -> Result<GossipReply, ApiError> {
        let from = identity::key_from_base64(&req.from).ok_or_else(|| {
            ApiError::bad_request("`from` must be a member's public key in base64")
        })?;
        let (out, changed) = self.on_gossip(from, req.message, &mut rand::thread_rng());
        self.send(out).await;
        if changed {
            self.sync_tunnel().await;
        }
        Ok(self.gossip_reply())
    }
}
