//! The control API's handler: each call of [`crate::control::Handler`] done by the node,
//! the node's types converted explicitly into the API's own (so renaming an internal
//! field cannot change the CLI's JSON), and domain errors mapped to HTTP statuses here,
//! on the control side, only. It owns the `Arc` of the node for the tasks it starts
//! (`get`s, streams). Membership rules, the directory and sync stay in their modules:
//! this must not decide anything they decide.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use crate::base::clock::now_secs;
use crate::base::state;
use crate::control::{
    self, ApiError, Caller, Empty, GetReply, GetRequest, GossipReply, Handler, InjectRequest,
    InviteView, JoinReply, JoinRequest, LinkReply, LinkRequest, LsEntry, LsReply, NodeStatus,
    PeerAddRequest, PeerRemoveRequest, PeerView, PeersReply, PlanReply, PlanRequest, RemoveRequest,
    StatusReply, TransferView, VersionsRequest,
};
use crate::daemon::book::{invite_state, INVITES_FILE};
use crate::daemon::node::{Node, DOWNLOADS_DIR};
use crate::daemon::transfers::{self, TransferError};
use crate::daemon::views::{
    counters, kept, peer_status, plan_route, playback, report, room_view, share_status,
    transfer_view,
};
use crate::data::transfer::{self, Directory, Membership, Progress};
use crate::group::gossip::GossipMessage;
use crate::group::identity::{self, key_to_base64};
use crate::group::link::InviteId;
use crate::group::place::StaticPeer;
use crate::sync::folder::SyncShare;
use crate::watch::hub;

/// The node as the control server sees it.
pub struct Api {
    node: Arc<Node>,
}

impl Api {
    pub fn new(node: Arc<Node>) -> Api {
        Api { node }
    }
}

/// The handler reads the node's fields as the node's own methods would.
impl std::ops::Deref for Api {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

/// Runs disk work (hashing, walking, reading caches) on the blocking pool, so no worker
/// of the runtime waits on the disk. It fails only if the work panicked.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ApiError::internal)
}

fn transfer_error(e: TransferError) -> ApiError {
    match e {
        TransferError::Find(_) => ApiError::not_found(e),
        TransferError::CheckOwner(_) => ApiError::new(StatusCode::FORBIDDEN, e),
        TransferError::FindHandoff(_) => ApiError::bad_request(e),
        TransferError::CheckFinished(_) => ApiError::conflict(e),
    }
}

fn kept_error(e: crate::sync::kept::KeptError) -> ApiError {
    match e {
        crate::sync::kept::KeptError::FindVersion(..) => ApiError::not_found(e),
        crate::sync::kept::KeptError::CheckPath(_) => ApiError::bad_request(e),
        _ => ApiError::internal(e),
    }
}

impl Api {
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

/// The shares members offer, each with the members offering it, by name.
fn share_list(dir: &Directory) -> LsReply {
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
            mtime_ns: 0,
            holders,
        })
        .collect();
    LsReply {
        holder: None,
        entries,
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

/// Members holding `share`, this node first, then nearby ones, then the rest.
fn holders(
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

impl Api {
    /// The file's manifest from the first holder that has it.
    async fn find_manifest(
        &self,
        dir: &Directory,
        share: &str,
        path: &str,
        from: Option<&str>,
    ) -> Result<(transfer::Peer, crate::data::share::Manifest), ApiError> {
        let mut last = String::new();
        for p in holders(dir, share, from)? {
            let got = if p.key == dir.me {
                let (engine, s, f) = (self.engine.clone(), share.to_string(), path.to_string());
                blocking(move || engine.shares.manifest(&s, &f))
                    .await?
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

impl Handler for Api {
    async fn status(&self) -> Result<StatusReply, ApiError> {
        let book = self.book();
        let g = &book.group;
        Ok(StatusReply {
            node: NodeStatus {
                name: self.config.node.name.clone(),
                public_key: key_to_base64(&self.public_key),
                address: g.my_address,
                network: g.network.to_string(),
                address6: Some(g.address6(g.my_address)),
                network6: Some(g.network6().to_string()),
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
                chunks: counters(self.engine.counters()),
                offloads: crate::daemon::views::offloads(self.tunnel.offloads()),
            },
            peers: self.tunnel.status().into_iter().map(peer_status).collect(),
            shares: self
                .syncs
                .iter()
                .map(|s| share_status(s.status()))
                .collect(),
        })
    }

    async fn create_link(&self, req: LinkRequest) -> Result<LinkReply, ApiError> {
        let invite = self
            .new_link(req.uses, Duration::from_secs(req.expires_secs))
            .await?;
        Ok(crate::daemon::views::link_reply(&invite, req.uses))
    }

    async fn list_links(&self) -> Result<Vec<InviteView>, ApiError> {
        let now = now_secs();
        Ok(self
            .book()
            .invites
            .invites
            .iter()
            .map(|r| InviteView {
                id: r.id.to_string(),
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
        let reply = crate::daemon::views::join_reply(&self.do_join(&req.link).await?);
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
            // `[::ffff:a.b.c.d]:p` is the IPv4 peer it names, as the tunnel shows it.
            endpoint: req.endpoint.map(crate::net::tunnel::kernel::unmapped),
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
                let t = seen.iter().find(|p| p.public_key == m.wg_key);
                let on_lan = t
                    .and_then(|t| t.endpoint)
                    .is_some_and(|ep| crate::group::mesh::on_site_lan(ann, site, ep));
                let direct = t.is_some_and(|t| t.path == crate::net::tunnel::PathKind::Direct);
                let nearby = site.is_some() && site == my_site && direct && on_lan;
                PeerView {
                    name: m.name.clone(),
                    address: m.address,
                    address6: Some(g.address6(m.address)),
                    public_key: key.clone(),
                    site: site.map(crate::group::mesh::site_name),
                    nearby,
                    path: match t.map(|t| t.path.as_str()) {
                        Some("direct") if nearby => "lan".into(),
                        Some(p) => p.into(),
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
            address6: Some(g.address6(g.my_address)),
            site: my_site.map(crate::group::mesh::site_name),
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
        Ok(crate::daemon::views::gossip_reply(
            &self.book(),
            self.tunnel.forwarded_count(),
        ))
    }

    async fn ls(&self, target: String) -> Result<LsReply, ApiError> {
        let dir = self.directory();
        if target.trim_matches('/').is_empty() {
            return Ok(share_list(&dir));
        }
        let (share, path) = split_target(&target)?;
        let mut last = String::new();
        for p in holders(&dir, &share, None)? {
            let got: Result<Vec<crate::data::share::Entry>, String> = if p.key == dir.me {
                let (engine, s, f) = (self.engine.clone(), share.clone(), path.clone());
                blocking(move || engine.shares.ls(&s, &f))
                    .await?
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
                                mtime_ns: e.mtime_ns,
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
            route: plan_route(route),
        })
    }

    async fn watch(&self, req: control::FileRequest) -> Result<control::WatchReply, ApiError> {
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
            let (name, from) = (file.clone(), source.key);
            blocking(move || crate::watch::stream::Stream::remote(&name, manifest, from, &cache))
                .await?
        }
        .map_err(ApiError::internal)?;
        let members: Arc<dyn Membership> = self.node.clone();
        let stream = self.watch.streams.add(stream, self.engine.clone(), members);
        let url = self
            .watch
            .streams
            .url(&stream)
            .ok_or_else(|| ApiError::internal("the stream endpoint is not listening"))?;
        // Not the URL: it holds the stream's token, and the log has other readers.
        log::info!("watch {file}: from {}", source.name);
        Ok(control::WatchReply {
            file: file.clone(),
            url,
            size: stream.manifest.size,
            id: stream.manifest.id(),
            source: source.name,
            state: playback(self.watch.state(&file)),
        })
    }

    async fn room_report(&self, req: control::Report) -> Result<control::RoomView, ApiError> {
        let file = req.file.clone();
        let (view, urgent) = self.watch.report(report(req));
        if urgent {
            let dir = self.directory();
            self.watch.send_now(&file, &dir).await;
        }
        Ok(room_view(view))
    }

    async fn room_wait(&self, req: control::WaitRequest) -> Result<control::RoomView, ApiError> {
        let req = hub::WaitRequest {
            file: req.file,
            counter: req.counter,
            node: req.node,
            timeout_ms: req.timeout_ms,
        };
        Ok(room_view(self.watch.wait(&req).await))
    }

    async fn room_leave(&self, req: control::FileRequest) -> Result<Empty, ApiError> {
        self.watch.leave(&req.file);
        let dir = self.directory();
        self.watch.send_now(&req.file, &dir).await;
        Ok(Empty {})
    }

    async fn rooms(&self) -> Result<Vec<control::RoomView>, ApiError> {
        Ok(self.watch.views().into_iter().map(room_view).collect())
    }

    async fn release(&self, req: VersionsRequest) -> Result<Empty, ApiError> {
        let (s, _) = self.sync_share_of(&req.target)?;
        if s.release_deletions(std::time::Instant::now()) {
            log::info!("share {}: held deletions released", s.name);
        }
        Ok(Empty {})
    }

    async fn versions(&self, req: VersionsRequest) -> Result<Vec<control::Kept>, ApiError> {
        let (s, path) = self.sync_share_of(&req.target)?;
        let root = s.root.clone();
        let list = blocking(move || crate::sync::kept::list(&root, &path))
            .await?
            .map_err(kept_error)?;
        Ok(list.into_iter().map(kept).collect())
    }

    async fn restore(&self, req: VersionsRequest) -> Result<control::Kept, ApiError> {
        let (s, path) = self.sync_share_of(&req.target)?;
        let root = s.root.clone();
        let k = blocking(move || crate::sync::kept::restore(&root, &path, req.at))
            .await?
            .map_err(kept_error)?;
        log::info!("share {}: {} restored as kept at {}", s.name, k.path, k.at);
        Ok(kept(k))
    }

    async fn start_get(&self, req: GetRequest, caller: &Caller) -> Result<GetReply, ApiError> {
        let (share, path) = split_target(&req.target)?;
        if !req.dest.is_absolute() {
            return Err(ApiError::bad_request(
                "the destination must be an absolute path",
            ));
        }
        // The daemon may write where its caller may not (it often runs as root): the
        // file goes only where the user who asked could have put it. A folder the
        // daemon cannot see at all (the unit's ProtectHome= hides every home) it cannot
        // write either: the CLI then writes the file there with its user's own rights,
        // and the kernel decides.
        let folder = req.dest.parent().unwrap_or(std::path::Path::new("/"));
        let (who, dir) = (caller.clone(), folder.to_path_buf());
        let refused = blocking(move || std::fs::metadata(&dir).is_ok() && !who.may_write_in(&dir));
        if refused.await? {
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
        // A user other than root always gets the file from their own CLI, written with
        // their own rights: the daemon (often root) never writes at a path a user named,
        // since a folder on that path could be swapped for a link to anywhere between any
        // check of it and the write.
        let beside = req.dest.parent().unwrap_or(std::path::Path::new("/"));
        let probed = beside.to_path_buf();
        let own_rights = caller.uid != 0;
        let probe = blocking(move || {
            if own_rights {
                Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            } else {
                crate::sync::disk::probe_write(&probed)
            }
        });
        let handoff = match probe.await? {
            Ok(()) => None,
            Err(e) => {
                let downloads = self.config.node.state_dir.join(DOWNLOADS_DIR);
                tokio::fs::create_dir_all(&downloads)
                    .await
                    .map_err(ApiError::internal)?;
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
        let forgotten = self.transfers.start(
            id.clone(),
            transfers::Request {
                target: req.target.clone(),
                dest: req.dest.clone(),
                handoff: handoff.clone(),
                owner: caller.uid,
                source: source.name.clone(),
            },
            progress.clone(),
            std::time::Instant::now(),
        );
        // Files of transfers long finished that nobody came for.
        for f in forgotten {
            if let Err(e) = tokio::fs::remove_file(&f).await {
                log::debug!("cannot remove the forgotten download {}: {e}", f.display());
            }
        }
        let node = self.node.clone();
        let members: Arc<dyn Membership> = self.node.clone();
        let source_name = source.name.clone();
        let (engine, cancel) = (self.engine.clone(), self.cancel.clone());
        let size = manifest.size;
        let target = req.target.clone();
        let dest = handoff.unwrap_or_else(|| req.dest.clone());
        let id_in_task = id.clone();
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
            node.transfers
                .finish(&id_in_task, r, std::time::Instant::now());
        });
        Ok(GetReply {
            id,
            source: source_name,
            size,
        })
    }

    async fn transfer(&self, id: String) -> Result<TransferView, ApiError> {
        let t = self
            .transfers
            .get(&id)
            .ok_or_else(|| transfer_error(TransferError::Find(id)))?;
        Ok(transfer_view(t, self.engine.counters()))
    }

    async fn transfers(&self) -> Result<Vec<TransferView>, ApiError> {
        let counters = self.engine.counters();
        Ok(self
            .transfers
            .list()
            .into_iter()
            .map(|t| transfer_view(t, counters.clone()))
            .collect())
    }

    async fn transfer_file(
        &self,
        id: String,
        offset: u64,
        caller: &Caller,
    ) -> Result<bytes::Bytes, ApiError> {
        let path = self
            .transfers
            .handed_over(&id, caller.uid)
            .map_err(transfer_error)?;
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
        let path = self
            .transfers
            .handed_over(&id, caller.uid)
            .map_err(transfer_error)?;
        tokio::fs::remove_file(path)
            .await
            .map_err(ApiError::internal)?;
        self.transfers.collected(&id);
        Ok(Empty {})
    }

    async fn inject_gossip(&self, req: InjectRequest) -> Result<GossipReply, ApiError> {
        let message: GossipMessage =
            serde_json::from_value(req.message).map_err(ApiError::bad_request)?;
        let from = identity::key_from_base64(&req.from).ok_or_else(|| {
            ApiError::bad_request("`from` must be a member's public key in base64")
        })?;
        let (out, changed) = self.on_gossip(from, message, &mut rand::thread_rng());
        self.send(out).await;
        if changed {
            self.sync_tunnel().await;
        }
        Ok(crate::daemon::views::gossip_reply(
            &self.book(),
            self.tunnel.forwarded_count(),
        ))
    }
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
