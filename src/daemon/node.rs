//! The running node: its persisted group and invites under one lock, its tunnel, and the
//! operations the control API and the daemon's tasks call — create and redeem invites,
//! join, admit and remove members, handle gossip, keep the tunnel's peers in step with
//! the membership. Decisions are delegated to the pure modules (`link`, `group`, `mesh`,
//! `gossip`); this module sequences them with persistence and the tunnel. It spawns
//! nothing: the daemon owns the tasks.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use hyper::StatusCode;

use crate::base::clock::{now_ms, now_secs};
use crate::base::config::{split_host_port, Config};
use crate::base::lock::Recover;
use crate::base::state::{self, StateError};
use crate::control::{
    ApiError, Caller, Empty, GetReply, GetRequest, GossipReply, Handler, InjectRequest, InviteView,
    JoinReply, JoinRequest, LinkReply, LinkRequest, LsEntry, LsReply, NodeStatus, PeerAddRequest,
    PeerRemoveRequest, PeerView, PeersReply, PlanReply, PlanRequest, RemoveRequest, StatusReply,
    TransferView, VersionsRequest,
};
use crate::data::transfer::{self, Directory, Engine, Membership, Progress};
use crate::group::gossip::{Event, Gossip, GossipMessage, Outgoing};
use crate::group::identity::{self, key_id, key_to_base64, Key};
use crate::group::link::{
    self, Invite, InviteBook, InviteId, InviteRecord, LinkError, RedeemError,
};
use crate::group::mesh::{self, Announcement, MemberRecord, Mesh};
use crate::group::place::{Group, StaticPeer};
use crate::net::join::{self, JoinError};
use crate::net::tunnel::{PeerConfig, Tunnel};
use crate::net::wire::{self, JoinMessage, NameRefusal, Refusal};
use crate::sync::folder::{Action, Announce, SyncShare};
use crate::sync::versions::FileVersion;
use crate::watch::hub::{FileRequest, Report, RoomView, WaitRequest, WatchReply};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const GROUP_FILE: &str = "group.json";
pub const INVITES_FILE: &str = "invites.json";
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const TUNNEL_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the host signs a member's observed endpoint again when only its port moved.
const OBSERVED_PORT_EVERY: Duration = Duration::from_secs(60);
/// Longest an invite may live, so a forgotten link does not stay a way in for ever.
pub const MAX_INVITE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// What is persisted, changed under one lock.
pub struct Book {
    pub group: Group,
    pub invites: InviteBook,
    pub gossip: Gossip,
}

pub struct Node {
    pub config: Config,
    pub public_key: Key,
    /// The private half of `public_key`: joins prove and check keys with it.
    wg_secret: x25519_dalek::StaticSecret,
    signing: SigningKey,
    book: Mutex<Book>,
    pub tunnel: Arc<Tunnel>,
    pub engine: Arc<Engine>,
    /// One join at a time: a join rewrites the whole group.
    joining: tokio::sync::Mutex<()>,
    /// `get`s in progress and done, by id.
    transfers: Mutex<BTreeMap<String, TransferEntry>>,
    /// The tasks running `get`s; the daemon waits for them on the way out.
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
    /// This node's own `Arc`, for the tasks it starts (set once by the daemon).
    this: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// Read-write shares kept in sync, and the announcements waiting for the sync task.
    pub syncs: Vec<Arc<SyncShare>>,
    sync_tx: tokio::sync::mpsc::Sender<(Key, bytes::Bytes)>,
    /// Watch-along: streams for local players and the rooms.
    pub watch: crate::watch::hub::Watch,
    /// Gossip datagrams refused because no member's daemon sealed them.
    refused_gossip: std::sync::atomic::AtomicU64,
    /// When the host last signed where it sees each member.
    observed_signed: Mutex<std::collections::HashMap<Key, std::time::Instant>>,
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

/// A node's own group of one, of which it is the host.
pub fn hosted_group(config: &Config, wg: Key, signing: &SigningKey) -> Group {
    let network = config.tunnel.network;
    let my_address = network.hosts().next().unwrap_or(network.addr());
    let mut mesh = Mesh::new(wg, signing.verifying_key().to_bytes());
    let me = MemberRecord {
        wg_key: wg,
        sign_key: signing.verifying_key().to_bytes(),
        name: config.node.name.clone(),
        address: my_address,
        admitted_at: now_secs(),
        version: 1,
        revoked: false,
        observed: None,
    };
    let _ = mesh.accept_member(&mesh::sign_member(signing, &me));
    Group {
        network,
        host_name: config.node.name.clone(),
        my_address,
        mesh,
        endpoints: BTreeMap::new(),
        admitted_by: BTreeMap::new(),
        static_peers: Vec::new(),
    }
}

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

    fn path(&self, file: &str) -> PathBuf {
        self.config.node.state_dir.join(file)
    }

    fn save_group(&self, group: &Group) -> Result<(), StateError> {
        state::write_json(&self.path(GROUP_FILE), group)
    }

    pub fn invite_keys(book: &Book) -> HashSet<Key> {
        book.invites.invites.iter().map(|r| r.public_key).collect()
    }

    fn host_key(&self, book: &Book) -> Option<Key> {
        let h = book.group.mesh.host_wg;
        (h != self.public_key).then_some(h)
    }

    /// Points the tunnel at this node's address and host, and its peers at the members.
    pub async fn sync_tunnel(&self) {
        let (desired, me, host) = {
            let book = self.book();
            (
                self.desired_peers(&book),
                book.group.my_address,
                self.host_key(&book),
            )
        };
        self.tunnel.set_local(me, host);
        let keep: HashSet<Key> = desired.iter().map(|p| p.public_key).collect();
        // A removed member's pair keys and nonce memory go with it.
        self.engine.proofs().retain(|k| keep.contains(k));
        for k in self.tunnel.peer_keys() {
            if !keep.contains(&k) && self.tunnel.remove_peer(&k) {
                log::info!("tunnel to {} closed", key_to_base64(&k));
            }
        }
        for p in desired {
            self.tunnel.upsert_peer(p).await;
        }
    }

    fn my_site(&self, book: &Book) -> Option<IpAddr> {
        book.group.mesh.site_of(&self.public_key)
    }

    /// A peer for every active member but this node, knocking at its LAN addresses when
    /// it is behind the same public IP, else at its public endpoint.
    fn desired_peers(&self, book: &Book) -> Vec<PeerConfig> {
        let g = &book.group;
        let my_site = self.my_site(book);
        let mut v: Vec<PeerConfig> = g
            .mesh
            .active()
            .filter(|m| m.wg_key != self.public_key)
            // Even a host-signed record never routes an address outside the group's
            // network, nor this node's own, to a peer.
            .filter(|m| routable(g, m.address))
            .map(|m| {
                let ann = g.mesh.announcement(&m.wg_key);
                let nearby = my_site.is_some() && g.mesh.site_of(&m.wg_key) == my_site;
                // Where the host saw it before where it says it is.
                let candidates = match ann {
                    Some(a) if nearby => a.lan.clone(),
                    _ => m
                        .observed
                        .or_else(|| ann.and_then(|a| a.public_endpoint))
                        .into_iter()
                        .collect(),
                };
                PeerConfig {
                    public_key: m.wg_key,
                    name: m.name.clone(),
                    address: m.address,
                    endpoint: g.endpoints.get(&key_to_base64(&m.wg_key)).copied(),
                    candidates,
                }
            })
            .collect();
        v.extend(g.static_peers.iter().map(|p| PeerConfig {
            public_key: p.public_key,
            name: p.name.clone(),
            address: p.address,
            endpoint: p.endpoint,
            candidates: p.endpoint.into_iter().collect(),
        }));
        v
    }

    /// This node's own addresses (not the VPN's) on its listen port.
    fn lan_endpoints(&self, book: &Book) -> Vec<SocketAddr> {
        let port = self.config.tunnel.listen_port;
        let network = book.group.network;
        let mut v: Vec<SocketAddr> = if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| !i.is_loopback())
            .filter_map(|i| match i.ip() {
                IpAddr::V4(a) if !network.contains(&a) && !a.is_link_local() => {
                    Some(SocketAddr::new(IpAddr::V4(a), port))
                }
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Signs and spreads a new announcement of this node's endpoints when they changed.
    /// `observed` is where the host sees this node (on the host: its own endpoint).
    pub fn refresh_announcement(
        &self,
        book: &mut Book,
        observed: Option<SocketAddr>,
        rng: &mut impl rand::Rng,
    ) -> Vec<Outgoing> {
        let own = self.lan_endpoints(book);
        let held = book.group.mesh.announcement(&self.public_key).cloned();
        let public_endpoint = observed
            .or_else(|| held.as_ref().and_then(|a| a.public_endpoint))
            .or_else(|| {
                (book.group.is_host(&self.public_key))
                    .then(|| self.configured_endpoint().or_else(|| own.first().copied()))
                    .flatten()
            });
        // Members take only private LAN addresses, a few of them (mesh::lan_allowed).
        let lan: Vec<SocketAddr> = own
            .into_iter()
            .filter(mesh::lan_allowed)
            .take(mesh::MAX_LAN)
            .collect();
        let shares = self.engine.shares.names();
        let relay_port = Some(self.engine.relay_port());
        if let Some(h) = &held {
            if h.lan == lan
                && h.public_endpoint == public_endpoint
                && h.shares == shares
                && h.relay_port == relay_port
            {
                return Vec::new();
            }
        }
        let ann = Announcement {
            wg_key: self.public_key,
            seq: u64::try_from(now_ms())
                .unwrap_or(0)
                .max(held.map(|h| h.seq + 1).unwrap_or(0)),
            public_endpoint,
            lan,
            relay_port,
            shares,
        };
        let signed = mesh::sign_announcement(&self.signing, &ann);
        let Book { group, gossip, .. } = book;
        let (out, _) = gossip.publish(
            &mut group.mesh,
            GossipMessage::Announce {
                announcement: signed,
            },
            rng,
        );
        if let Err(e) = self.save_group(&book.group) {
            log::warn!("{e}");
        }
        out
    }

    fn configured_endpoint(&self) -> Option<SocketAddr> {
        self.config
            .tunnel
            .endpoint
            .as_ref()
            .and_then(|e| e.parse().ok())
    }

    /// The payload of a gossip datagram from member `from`, when its daemon sealed it;
    /// anything else (a datagram another user on that member sent from its address) is
    /// counted and dropped.
    pub fn open_gossip<'a>(&self, from: &Key, datagram: &'a [u8]) -> Option<&'a [u8]> {
        static LOG: crate::base::logging::Throttle =
            crate::base::logging::Throttle::new(Duration::from_secs(10));
        match self.engine.proofs().open_gossip(from, datagram) {
            Ok(p) => Some(p),
            Err(e) => {
                self.refused_gossip
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(held) = LOG.allow() {
                    log::info!(
                        "refused a gossip datagram from {}'s address: {e} ({held} more refused before)",
                        key_to_base64(from)
                    );
                }
                None
            }
        }
    }

    /// Applies a gossip message from member `from`; returns what to send.
    pub fn on_gossip(
        &self,
        from: Key,
        msg: GossipMessage,
        rng: &mut impl rand::Rng,
    ) -> (Vec<Outgoing>, bool) {
        let mut book = self.book();
        let Book { group, gossip, .. } = &mut *book;
        let (mut out, events) = gossip.receive(&mut group.mesh, from, msg, rng);
        let mut membership_changed = false;
        for ev in &events {
            match ev {
                Event::Member(rec) => {
                    membership_changed = true;
                    if rec.wg_key == self.public_key && rec.revoked {
                        log::warn!("this node was removed from the group by its host");
                    } else if rec.revoked {
                        log::info!("{} was removed from the group", rec.name);
                    } else {
                        log::info!("{} ({}) is a member", rec.name, rec.address);
                    }
                }
                Event::Announcement(_) => membership_changed = true,
                Event::Observed(ep) => {
                    let ep = *ep;
                    out.extend(self.refresh_announcement(&mut book, Some(ep), rng));
                }
            }
        }
        if membership_changed {
            if let Err(e) = self.save_group(&book.group) {
                log::warn!("{e}");
            }
        }
        (out, membership_changed)
    }

    /// One anti-entropy round, and on the host, telling members where it sees them.
    pub fn gossip_round(&self, rng: &mut impl rand::Rng) -> Vec<Outgoing> {
        let reachable = self.tunnel.reachable();
        let seen = self.tunnel.status();
        let mut book = self.book();
        let Book { group, gossip, .. } = &mut *book;
        gossip.set_reachable(reachable.clone());
        let mut out = gossip.tick(&group.mesh, &reachable, rng);
        if group.is_host(&self.public_key) {
            let mut observed_changed = false;
            for p in seen.iter().filter(|p| p.path == "direct") {
                let (Some(key), Some(ep)) = (identity::key_from_base64(&p.public_key), p.endpoint)
                else {
                    continue;
                };
                let Some(rec) = group.mesh.member(&key).filter(|r| !r.revoked).cloned() else {
                    continue;
                };
                // The host signs where it sees each member: that, not the member's own
                // announcement, places it in a site. A new public IP (a new site) is
                // signed at once; a port that moves (a NAT's mapping) at most once a
                // minute, so a member hopping ports cannot make every node re-sign and
                // rewrite its group file every second.
                let ip_moved = rec.observed.map(|o| o.ip()) != Some(ep.ip());
                let port_moved = rec.observed != Some(ep);
                let now = std::time::Instant::now();
                let mut last = self.observed_signed.locked();
                let due = last
                    .get(&key)
                    .is_none_or(|t| now.duration_since(*t) >= OBSERVED_PORT_EVERY);
                if (ip_moved || (port_moved && due)) && key != self.public_key {
                    last.insert(key, now);
                    drop(last);
                    let rec = MemberRecord {
                        version: rec.version.saturating_add(1),
                        observed: Some(ep),
                        ..rec
                    };
                    let record = mesh::sign_member(&self.signing, &rec);
                    let (pushes, _) =
                        gossip.publish(&mut group.mesh, GossipMessage::Member { record }, rng);
                    out.extend(pushes);
                    observed_changed = true;
                } else {
                    drop(last);
                }
                let announced = group
                    .mesh
                    .announcement(&key)
                    .and_then(|a| a.public_endpoint);
                if announced != Some(ep) {
                    out.push(Outgoing {
                        to: key,
                        msg: GossipMessage::Observed { endpoint: ep },
                    });
                }
            }
            if observed_changed {
                if let Err(e) = self.save_group(group) {
                    log::warn!("{e}");
                }
            }
        }
        out
    }

    /// Keeps the persisted endpoints in step with the tunnel's roaming.
    pub fn save_endpoints(&self) {
        let seen = self.tunnel.status();
        let mut book = self.book();
        let mut changed = false;
        for p in seen {
            if let Some(ep) = p.endpoint {
                if book.group.endpoints.get(&p.public_key) != Some(&ep) {
                    book.group.endpoints.insert(p.public_key, ep);
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = self.save_group(&book.group) {
                log::warn!("{e}");
            }
        }
    }

    /// Makes an invite and its link. Only the host admits members.
    pub async fn new_link(&self, uses: u32, lifetime: Duration) -> Result<LinkReply, ApiError> {
        if uses == 0 {
            return Err(ApiError::bad_request("--uses must be at least 1"));
        }
        if lifetime.is_zero() || lifetime > MAX_INVITE_LIFETIME {
            return Err(ApiError::bad_request(
                "--expires must be between 1s and 30 days",
            ));
        }
        let endpoints = self.endpoints().await;
        if endpoints.is_empty() {
            return Err(ApiError::conflict(
                "this node knows no address others could reach it at; set [tunnel] endpoint in the config",
            ));
        }
        let now = now_secs();
        let secret = zeroize::Zeroizing::new(
            x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng).to_bytes(),
        );
        let mut book = self.book();
        if !book.group.is_host(&self.public_key) {
            return Err(ApiError::conflict(format!(
                "only the group's host ({}) can create links",
                book.group.host_name
            )));
        }
        let invite = Invite {
            host_key: self.public_key,
            host_name: self.config.node.name.clone(),
            host_address: book.group.my_address,
            network: book.group.network,
            endpoints,
            invite_id: InviteId::random(),
            expires_at: now + lifetime.as_secs(),
            secret,
        };
        let mut invites = book.invites.clone();
        invites.prune(now);
        invites.add(InviteRecord {
            id: invite.invite_id,
            public_key: invite.secret_public(),
            created_at: now,
            expires_at: invite.expires_at,
            uses_allowed: uses,
            uses: 0,
            revoked: false,
            refused: Default::default(),
        });
        state::write_json(&self.path(INVITES_FILE), &invites).map_err(ApiError::internal)?;
        book.invites = invites;
        self.tunnel.set_invite_keys(Self::invite_keys(&book));
        log::info!(
            "created invite {} for {uses} use(s), expiring {}",
            invite.invite_id,
            link::format_utc(invite.expires_at)
        );
        Ok(LinkReply {
            id: invite.invite_id,
            link: invite.encode(),
            expires_at: invite.expires_at,
            uses,
        })
    }

    /// The configured endpoint, or else this node's own IPv4 addresses on its listen port.
    async fn endpoints(&self) -> Vec<SocketAddr> {
        if let Some(ep) = &self.config.tunnel.endpoint {
            if let Some((host, p)) = split_host_port(ep) {
                match tokio::net::lookup_host((host, p)).await {
                    Ok(addrs) => return addrs.collect(),
                    Err(e) => log::warn!("cannot resolve the configured endpoint {ep}: {e}"),
                }
            }
        }
        let book = self.book();
        self.lan_endpoints(&book)
    }

    /// The host's answer to one join request, decided and persisted under the book lock.
    // The request's fields one by one, as `serve_joins` takes them apart.
    #[allow(clippy::too_many_arguments)]
    pub fn answer_join(
        &self,
        invite_key: &Key,
        name: &str,
        key: Key,
        sign_key: Key,
        proof: Option<&wire::KeyProof>,
        from: SocketAddr,
        rng: &mut impl rand::Rng,
    ) -> (JoinMessage, Vec<Outgoing>) {
        // Before the book is even looked at: a request that does not prove its keys
        // spends nothing and learns nothing.
        let transcript = wire::Transcript {
            host_key: &self.public_key,
            invite_key,
            name,
            wg_key: &key,
            sign_key: &sign_key,
        };
        if let Err(e) = wire::verify_keys(&transcript, proof, &self.wg_secret) {
            log::debug!("join request from {from} refused: {e}");
            let reason = Refusal::KeyProof;
            return (JoinMessage::Refused { reason }, Vec::new());
        }
        let now = now_secs();
        let mut book = self.book();
        let refused = |reason| (JoinMessage::Refused { reason }, Vec::new());
        let invite_id = match book.invites.find_by_key(invite_key) {
            Some(r) => r.id,
            None => return refused(Refusal::Invite(RedeemError::Unknown)),
        };
        let key_b64 = key_to_base64(&key);
        let accepted = |group: &Group, rec: &MemberRecord| {
            let (Some(your), Some(host)) = (
                group.mesh.member_signed(&rec.wg_key).cloned(),
                group.mesh.member_signed(&self.public_key).cloned(),
            ) else {
                return JoinMessage::Refused {
                    reason: Refusal::HostFailure,
                };
            };
            JoinMessage::Accepted {
                address: rec.address,
                network: group.network,
                host_name: self.config.node.name.clone(),
                host_address: group.my_address,
                name: rec.name.clone(),
                host_sign_key: self.signing.verifying_key().to_bytes(),
                your_record: your,
                host_record: host,
            }
        };
        // A retry by a joiner this invite already admitted gets the same answer again.
        if book.group.admitted_by.get(&key_b64) == Some(&invite_id) {
            if let Some(rec) = book.group.mesh.member(&key).filter(|r| !r.revoked).cloned() {
                return (accepted(&book.group, &rec), Vec::new());
            }
        }
        let (invites, address) =
            match decide_join(&book.group, &book.invites, invite_key, name, &key, now) {
                Ok(d) => d,
                Err(reason) => {
                    // Debug only: whoever holds the invite can repeat a request at will,
                    // and the joiner is told the reason anyway.
                    log::debug!("join through invite {invite_id} refused: {reason}");
                    if matches!(reason, Refusal::Invite(_))
                        && book.group.admitted_by.get(&key_b64) != Some(&invite_id)
                    {
                        self.note_refused_redemption(&mut book, invite_key, invite_id, &key, now);
                    }
                    return refused(reason);
                }
            };
        let rec = MemberRecord {
            wg_key: key,
            sign_key,
            name: name.to_string(),
            address,
            admitted_at: now,
            version: 1,
            revoked: false,
            observed: None,
        };
        let signed = mesh::sign_member(&self.signing, &rec);
        let mut group = book.group.clone();
        if group.mesh.accept_member(&signed).is_err() {
            return refused(Refusal::HostFailure);
        }
        group.admitted_by.insert(key_b64.clone(), invite_id);
        group.endpoints.insert(key_b64, from);
        // Invites first: a crash between the two writes leaves the invite spent and no
        // member, never a member admitted by an invite that could be spent again.
        if let Err(e) = state::write_json(&self.path(INVITES_FILE), &invites) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        book.invites = invites;
        if let Err(e) = self.save_group(&group) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        // The record is in `group` already; spreading it is a push to a few members.
        let mut spread_from = book.group.mesh.clone();
        let (out, _) = book.gossip.publish(
            &mut spread_from,
            GossipMessage::Member { record: signed },
            rng,
        );
        book.group = group;
        log::info!(
            "{} joined as {} through invite {invite_id}",
            rec.name,
            rec.address
        );
        (accepted(&book.group, &rec), out)
    }

    async fn do_join(&self, text: &str) -> Result<JoinReply, ApiError> {
        let _one_at_a_time = self.joining.lock().await;
        let invite = link::decode(text, None, now_secs()).map_err(|e| match e {
            LinkError::Expired(_) => ApiError::new(StatusCode::GONE, e),
            _ => ApiError::bad_request(e),
        })?;
        {
            let book = self.book();
            let g = &book.group;
            if invite.host_key == self.public_key {
                return Err(ApiError::conflict(
                    "this link was made by this node: open it on another machine",
                ));
            }
            if g.mesh.host_wg == invite.host_key {
                return Err(ApiError::conflict(format!(
                    "this node is already a member of {}'s group",
                    g.host_name
                )));
            }
            if !g.is_host(&self.public_key) {
                return Err(ApiError::conflict(format!(
                    "this link is from another group: this node is a member of {}'s group",
                    g.host_name
                )));
            }
            let others = g
                .mesh
                .active()
                .filter(|m| m.wg_key != self.public_key)
                .count();
            if others > 0 {
                return Err(ApiError::conflict(format!(
                    "this node hosts a group of {others} member(s) and cannot join another"
                )));
            }
        }
        let admission = join::redeem(
            &invite,
            &self.wg_secret,
            &self.signing,
            &self.config.node.name,
            JOIN_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            JoinError::HostUnreachable(_) => ApiError::new(StatusCode::BAD_GATEWAY, e),
            JoinError::Refused(Refusal::Invite(
                RedeemError::AlreadyUsed | RedeemError::Expired | RedeemError::Revoked,
            )) => ApiError::new(StatusCode::GONE, e),
            JoinError::Refused(_) => ApiError::new(StatusCode::FORBIDDEN, e),
            // The link names a host key no proof can be made for: the link is at fault.
            JoinError::BuildMessage(wire::WireError::ProveKeys) => ApiError::bad_request(e),
            JoinError::CheckName { .. } => ApiError::bad_request(e),
            _ => ApiError::internal(e),
        })?;
        // The host decides membership, never this node's routes: nothing is saved and no
        // address is set unless the network is the link's, inside the VPN range.
        join::check_admission(&admission, &invite, self.config.tunnel.network).map_err(|e| {
            log::warn!("join refused: {e}");
            ApiError::new(StatusCode::BAD_GATEWAY, JoinError::CheckAnswer(e))
        })?;
        let mut mesh = Mesh::new(invite.host_key, admission.host_sign_key);
        for r in [&admission.host_record, &admission.your_record] {
            mesh.accept_member(r).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the host's records do not verify: {e}"),
                )
            })?;
        }
        let mine_ok = mesh
            .member(&self.public_key)
            .is_some_and(|m| m.address == admission.address);
        let host_ok = mesh
            .member(&invite.host_key)
            .is_some_and(|m| m.address == admission.host_address);
        if !mine_ok || !host_ok {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "the host's records do not match its answer",
            ));
        }
        let mut endpoints = BTreeMap::new();
        endpoints.insert(key_to_base64(&invite.host_key), admission.host_endpoint);
        let group = Group {
            network: admission.network,
            host_name: admission.host_name.clone(),
            my_address: admission.address,
            mesh,
            endpoints,
            admitted_by: BTreeMap::new(),
            static_peers: Vec::new(),
        };
        self.save_group(&group).map_err(ApiError::internal)?;
        self.tunnel
            .device()
            .set_network_address(admission.address, admission.network.prefix_len(), None)
            .map_err(ApiError::internal)?;
        {
            let mut book = self.book();
            book.group = group;
            book.invites = InviteBook::default();
        }
        self.sync_tunnel().await;
        log::info!(
            "joined {}'s group as {} ({})",
            admission.host_name,
            admission.name,
            admission.address
        );
        let deadline = tokio::time::Instant::now() + TUNNEL_UP_TIMEOUT;
        let host_key = key_to_base64(&invite.host_key);
        loop {
            let up = self
                .tunnel
                .status()
                .iter()
                .any(|p| p.public_key == host_key && p.last_handshake.is_some());
            if up {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "joined, but the tunnel to the host did not come up; `watchalong status` shows its progress",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(JoinReply {
            host_name: admission.host_name,
            address: admission.address,
            network: admission.network.to_string(),
        })
    }

    /// Notes a redemption of a spent invite by a key it did not admit (a sign that the
    /// link leaked). Counted in memory on every refusal, written only with the warning
    /// (a minute apart at most), so a flood of retries costs no disk writes.
    fn note_refused_redemption(
        &self,
        book: &mut Book,
        invite_key: &Key,
        invite_id: InviteId,
        key: &Key,
        now: u64,
    ) {
        if let Some(n) = book.invites.note_refused(invite_key, key, now) {
            log::warn!(
                "invite {invite_id} is spent, and another key ({}) tried to redeem it: the link may have leaked ({n} such attempt(s) so far; `watchalong links` shows them)",
                key_to_base64(key)
            );
            if let Err(e) = state::write_json(&self.path(INVITES_FILE), &book.invites) {
                log::error!("{e}");
            }
        }
    }

    /// The host revokes a member: a newer record that says so, sent to everyone. The
    /// invite that admitted it is closed too, unless `keep_invite`.
    fn revoke(&self, node: &str, keep_invite: bool) -> Result<(Key, Vec<Outgoing>), ApiError> {
        let mut book = self.book();
        if !book.group.is_host(&self.public_key) {
            return Err(ApiError::conflict(format!(
                "only the group's host ({}) can remove members",
                book.group.host_name
            )));
        }
        let target = book
            .group
            .mesh
            .active()
            .find(|m| {
                m.name == node || m.address.to_string() == node || key_to_base64(&m.wg_key) == node
            })
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no member is called {node}; `watchalong peers` lists them"
                ))
            })?;
        if target.wg_key == self.public_key {
            return Err(ApiError::conflict("the host cannot remove itself"));
        }
        let rec = MemberRecord {
            version: target.version + 1,
            revoked: true,
            ..target.clone()
        };
        let signed = mesh::sign_member(&self.signing, &rec);
        let mut group = book.group.clone();
        group
            .mesh
            .accept_member(&signed)
            .map_err(ApiError::internal)?;
        let admitting = group
            .admitted_by
            .get(&key_to_base64(&target.wg_key))
            .copied();
        // Invites first: a crash between the writes leaves the invite closed and the
        // member in, which a second `remove` finishes; never the reverse.
        if let Some(id) = admitting.filter(|_| !keep_invite) {
            let mut invites = book.invites.clone();
            // Pruned long ago, the invite is closed already.
            if invites.revoke(id).is_ok() {
                state::write_json(&self.path(INVITES_FILE), &invites)
                    .map_err(ApiError::internal)?;
                book.invites = invites;
                log::info!("closed invite {id}, which admitted {}", target.name);
            }
        }
        self.save_group(&group).map_err(ApiError::internal)?;
        book.group = group;
        let Book { group, gossip, .. } = &mut *book;
        let out = gossip.broadcast(&group.mesh, GossipMessage::Member { record: signed });
        log::info!(
            "removed {} ({}) from the group",
            target.name,
            target.address
        );
        Ok((target.wg_key, out))
    }

    pub async fn send(&self, out: Vec<Outgoing>) {
        let mut total = 0u64;
        for o in out {
            match serde_json::to_vec(&o.msg) {
                Ok(bytes) => {
                    total += bytes.len() as u64;
                    match self.engine.proofs().seal_gossip(&o.to, &bytes) {
                        Ok(sealed) => self.tunnel.send_gossip(&o.to, &sealed).await,
                        Err(e) => log::debug!("gossip to {}: {e}", key_to_base64(&o.to)),
                    }
                }
                Err(e) => log::warn!("cannot encode gossip: {e}"),
            }
        }
        if total > 0 {
            self.book().gossip.stats.sent_bytes += total;
        }
    }

    fn gossip_reply(&self) -> GossipReply {
        let book = self.book();
        GossipReply {
            view: book.group.mesh.view_hash(),
            members: book.group.mesh.active().count(),
            revoked: book.group.mesh.members().filter(|m| m.revoked).count(),
            forwarded_packets: self.tunnel.forwarded_count(),
            stats: book.gossip.stats.clone(),
        }
    }
}

impl Membership for Node {
    fn vpn(&self) -> (std::net::Ipv4Addr, ipnet::Ipv4Net) {
        let book = self.book();
        (book.group.my_address, book.group.network)
    }

    fn member_at(&self, ip: IpAddr) -> Option<Key> {
        let IpAddr::V4(ip) = ip else {
            return None;
        };
        let book = self.book();
        let found = book
            .group
            .mesh
            .active()
            .find(|m| m.address == ip && m.wg_key != self.public_key)
            .map(|m| m.wg_key);
        found
    }

    fn is_member(&self, key: &Key) -> bool {
        *key != self.public_key
            && self
                .book()
                .group
                .mesh
                .member(key)
                .is_some_and(|m| !m.revoked)
    }

    fn directory(&self) -> Directory {
        let seen = self.tunnel.status();
        let book = self.book();
        let mesh = &book.group.mesh;
        let peers = mesh
            .active()
            // Requests go to members' VPN addresses: never to one outside the network.
            .filter(|m| m.wg_key == self.public_key || routable(&book.group, m.address))
            .map(|m| {
                let ann = mesh.announcement(&m.wg_key);
                let me = m.wg_key == self.public_key;
                let b64 = key_to_base64(&m.wg_key);
                let t = seen.iter().find(|p| p.public_key == b64);
                let relay = ann.and_then(|a| {
                    let port = a.relay_port?;
                    let at = t
                        .and_then(|t| t.endpoint)
                        .filter(|ep| a.lan.contains(ep))
                        .or_else(|| a.lan.first().copied())?;
                    Some(SocketAddr::new(at.ip(), port))
                });
                transfer::Peer {
                    key: m.wg_key,
                    name: m.name.clone(),
                    vpn: m.address,
                    relay,
                    site: mesh.site_of(&m.wg_key).map(|s| s.to_string()),
                    up: me || t.is_some_and(|t| t.path != "down"),
                    shares: ann.map(|a| a.shares.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Directory {
            me: self.public_key,
            peers,
        }
    }
}

impl Node {
    /// The node-to-node messages this node takes, each routed to its owner: room
    /// messages to the watch hub, announced versions to the sync queue.
    pub fn messages(self: &Arc<Self>) -> transfer::Messages {
        let (rooms, syncs) = (self.clone(), self.clone());
        transfer::Messages::new()
            .route(
                crate::watch::hub::ROOM_PATH,
                Arc::new(move |from, body| rooms.room(from, body)),
            )
            .route(
                crate::sync::folder::SYNC_PATH,
                Arc::new(move |from, body| syncs.announced(from, body)),
            )
    }

    fn room(&self, from: Key, body: bytes::Bytes) {
        self.watch.receive(&key_id(&from), &body);
    }

    fn announced(&self, from: Key, body: bytes::Bytes) {
        if self.sync_tx.try_send((from, body)).is_err() {
            log::debug!("sync busy; an announcement waits for the next full round");
        }
    }
}

impl Node {
    /// Scans every read-write share and announces what changed (or, with `all`,
    /// everything held, so members that missed something catch up).
    pub async fn sync_scan(&self, all: bool) {
        let me = key_id(&self.public_key);
        for s in &self.syncs {
            let changed = tokio::task::block_in_place(|| {
                s.scan(&me, |rel| {
                    self.engine
                        .shares
                        .manifest(&s.name, rel)
                        .ok()
                        .map(|m| m.id())
                })
            });
            let changed = match changed {
                Ok(v) => v,
                Err(e) => {
                    log::warn!("share {}: {e}", s.name);
                    continue;
                }
            };
            if !changed.is_empty() {
                if let Err(e) = s.save() {
                    log::warn!("share {}: {e}", s.name);
                }
            }
            for v in &changed {
                log::debug!("sync: {}/{} changed here ({:?})", s.name, v.path, v.vv);
            }
            let body = |versions: Vec<FileVersion>, ask_back: bool| {
                serde_json::to_vec(&Announce {
                    share: s.name.clone(),
                    versions,
                    ask_back,
                })
                .ok()
            };
            // A member not heard from since this node started gets everything, and is
            // asked for everything it holds: what changed while one of us was down is
            // caught up at once, not at the next full round.
            let everything = body(s.all_versions(), true);
            let routine = match (all, changed.is_empty()) {
                (true, _) => body(s.all_versions(), false),
                (false, false) => body(changed, false),
                (false, true) => None,
            };
            // All members at once, and beside the sync loop: a member that is gone (each
            // post to it waits out its timeout) must hold up neither the others nor the
            // announcements coming in. Posts to one member overlap at most for as long
            // as its timeout lasts past the next scan: a bounded few.
            let dir = self.directory();
            for p in dir
                .peers
                .iter()
                .filter(|p| p.key != dir.me && p.up && p.shares.contains(&s.name))
            {
                let greet = !s.greeted(&p.key);
                let Some(body) = (if greet { &everything } else { &routine }).clone() else {
                    continue;
                };
                let (vpn, name, key, engine) = (p.vpn, p.name.clone(), p.key, self.engine.clone());
                let share = s.clone();
                self.tasks.spawn(async move {
                    match engine.post(&key, vpn, "/v1/sync", body).await {
                        Ok(_) => share.greet(key),
                        Err(e) => log::debug!("sync announce to {name}: {e}"),
                    }
                });
            }
        }
    }

    /// Sends member `to` every version held in `s`: the answer to its greeting.
    async fn sync_answer(&self, s: &SyncShare, to: &transfer::Peer) {
        let Ok(body) = serde_json::to_vec(&Announce {
            share: s.name.clone(),
            versions: s.all_versions(),
            ask_back: false,
        }) else {
            return;
        };
        if let Err(e) = self.engine.post(&to.key, to.vpn, "/v1/sync", body).await {
            log::debug!("sync answer to {}: {e}", to.name);
        }
    }

    /// Applies what member `from` announced.
    pub async fn sync_apply(&self, from: Key, body: bytes::Bytes) {
        let Ok(a) = serde_json::from_slice::<Announce>(&body) else {
            return;
        };
        let Some(s) = self.syncs.iter().find(|s| s.name == a.share).cloned() else {
            return;
        };
        if !s.root_ok() {
            let msg = s.unwritable().unwrap_or_else(|| {
                format!(
                    "{root} lacks its marker {m} (unmounted or emptied?): nothing is synced into \
                 it and no deletion spreads from it until the marker is back; if the folder \
                 is meant to be empty, `touch {root}/{m}` and its deletions will spread",
                    root = s.root.display(),
                    m = crate::sync::folder::MARKER
                )
            });
            if s.set_error(Some(msg.clone())) {
                log::error!("share {}: {msg}", s.name);
            }
            return;
        }
        let dir = self.directory();
        let Some(peer) = dir.get(&from).cloned() else {
            return;
        };
        if a.ask_back {
            self.sync_answer(&s, &peer).await;
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
            self.config.sync.max_delete_percent,
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
        let mut queued = s.queue(
            versions
                .iter()
                .filter(|v| s.content_differs(v) && !s.in_flight(&v.path))
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
            if s.in_flight(&v.path) {
                if s.take_off(&v) {
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
                if s.take_off(&v) {
                    self.spawn_act(s.clone(), peer.clone(), v);
                }
                continue;
            }
            s.unqueue(&v.path);
            self.sync_act(&s, &peer, &v, action).await;
        }
        if let Err(e) = s.save() {
            log::warn!("share {}: {e}", s.name);
        }
    }

    /// Queues announced version `v` from `peer` for the share's pull workers, starting
    /// one when fewer than [`crate::sync::folder::MAX_PULLS`] run: a burst of announcements costs
    /// queue entries, not tasks. A worker waits for nothing but its pull; a path's
    /// versions run one after another, in the order they came.
    fn spawn_act(&self, s: Arc<SyncShare>, peer: transfer::Peer, v: FileVersion) {
        if !s.enqueue(peer.key, v) {
            return;
        }
        let Some(node) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            s.worker_done(None);
            return;
        };
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
                    let Some(peer) = node.directory().get(&from).cloned() else {
                        continue;
                    };
                    let _held = s.hold(&v.path);
                    let action = s.decide(&v);
                    log::debug!("sync: {}/{} in turn: {action:?}", s.name, v.path);
                    node.sync_act(&s, &peer, &v, action).await;
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
    async fn sync_act(
        &self,
        s: &SyncShare,
        peer: &transfer::Peer,
        v: &FileVersion,
        action: Action,
    ) {
        match action {
            Action::Nothing => {}
            Action::Adopt { path, vv } => s.merge_history(&path, &vv),
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
                    if s.in_flight_under(&path) {
                        return;
                    }
                    crate::sync::folder::remove_leftovers(&p);
                    std::fs::remove_dir(&p).is_ok()
                } else {
                    let _ = std::fs::remove_file(crate::sync::folder::partial_path(&p));
                    self.remove_keeping(s, &path, &p)
                };
                if gone {
                    s.record(&path, version);
                }
            }
            Action::Fetch { path, version } if version.content == crate::sync::versions::DIR => {
                if let Ok(p) = inside(s, &path) {
                    if std::fs::create_dir_all(&p).is_ok() {
                        s.record(&path, version);
                    }
                }
            }
            Action::Fetch { path, version } => {
                let expected = s.known_stat(&path);
                if let Some(installed) = self
                    .sync_fetch(s, peer, &v.path, &path, &version, expected, None)
                    .await
                {
                    s.record_installed(&path, version, installed);
                }
                s.unqueue(&v.path);
            }
            Action::Conflict {
                move_local_to,
                fetch_into,
                version,
            } => {
                // Both names are this task's until the outcome is recorded.
                let _held = (
                    s.hold(&fetch_into),
                    move_local_to.as_deref().map(|to| s.hold(to)),
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
                    .sync_fetch(s, peer, &v.path, &fetch_into, &version, expected, aside)
                    .await
                {
                    s.record_installed(&fetch_into, version.clone(), installed);
                    if move_local_to.is_none() {
                        // Ours stays at the path and now carries both histories.
                        s.merge_history(&v.path, &version.vv);
                    }
                    log::info!("conflict on {}/{}: both versions kept", s.name, v.path);
                }
                s.unqueue(&v.path);
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
        if self.config.sync.keep_versions_days == 0 {
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
    pub fn prune_versions(&self) {
        let days = self.config.sync.keep_versions_days;
        for s in &self.syncs {
            match crate::sync::kept::prune(&s.root, now_secs(), days) {
                Ok(0) => {}
                Ok(n) => log::info!("share {}: {n} old version(s) pruned", s.name),
                Err(e) => log::warn!("share {}: {e}", s.name),
            }
        }
    }

    /// Pulls `version` of `remote_path` from `peer` into `local_path`, replacing only
    /// what `expected` says stands there (size and mtime, or nothing), after moving that
    /// to `aside` when given. Returns the installed file's size and mtime.
    #[allow(clippy::too_many_arguments)]
    async fn sync_fetch(
        &self,
        s: &SyncShare,
        peer: &transfer::Peer,
        remote_path: &str,
        local_path: &str,
        version: &FileVersion,
        expected: Option<(u64, u128)>,
        aside: Option<PathBuf>,
    ) -> Option<(u64, u128)> {
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
        let members = self.this.get().and_then(std::sync::Weak::upgrade)?;
        // Pulled beside the target under a name the scanner skips, then moved over it
        // only if the target is still what was expected: a local edit, made during the
        // pull or before it and not scanned yet, wins, and the next scan announces it.
        let before = expected;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tag = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut tag);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let staged = dest.with_file_name(format!(".{name}.watchalong-stage-{tag}"));
        let progress = Arc::new(Progress::default());
        s.pulling(remote_path, progress.clone());
        // One partial file per path, whatever the version: a pull cut short by a crash
        // keeps every chunk that still matches the version now wanted (checked against
        // its manifest), and no partial of an abandoned version is left behind. The
        // caller holds the path's turn, so two pulls never write into one partial.
        let part = crate::sync::folder::partial_path(&dest);
        // What we hold already (an append, an edit in place) is copied, not fetched.
        tokio::task::block_in_place(|| crate::sync::folder::seed_partial(&dest, &part, &manifest));
        let size = manifest.size;
        let got = transfer::get_file(
            self.engine.clone(),
            members,
            peer.key,
            manifest,
            staged.clone(),
            progress,
            Some(part),
        )
        .await;
        if let Err(e) = got {
            if e.is_disk_full() {
                let free = crate::sync::folder::free_bytes(&s.root).unwrap_or(0);
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
                log::warn!("sync: {}/{local_path}: {e}", s.name);
                s.set_error(Some(format!("{local_path}: {e}")));
            }
            return None;
        }
        if crate::sync::folder::stat(&dest) != before {
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
        crate::sync::folder::set_mtime(&staged, version.mtime);
        let Some(installed) = crate::sync::folder::stat(&staged) else {
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
        if aside.is_none() && dest.is_file() && self.config.sync.keep_versions_days > 0 {
            if let Err(e) = crate::sync::kept::keep_linking(&s.root, local_path, &dest) {
                let _ = std::fs::remove_file(&staged);
                s.set_error(Some(format!("{local_path}: not replaced, since {e}")));
                return None;
            }
        }
        if let Err(e) = std::fs::rename(&staged, &dest) {
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
        let job = self.share.next_work(self.held.take().as_deref());
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
            self.share.worker_done(self.held.as_deref());
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
        self.share.unqueue(&self.v.path);
        self.share.land(self.v);
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

/// Whether traffic for `address` may be sent to the member the host gave it: only inside
/// the group's network, and never this node's own address.
fn routable(group: &Group, address: std::net::Ipv4Addr) -> bool {
    group.network.contains(&address) && address != group.my_address
}

/// The host's decision on a join request through the invite whose secret has
/// `invite_key`, before anything is persisted: the invites with that one redeemed, and
/// the joiner's address. Everything that can refuse is checked before the redemption,
/// and nothing is changed in place, so a refused request leaves the invite as it was.
fn decide_join(
    group: &Group,
    invites: &InviteBook,
    invite_key: &Key,
    name: &str,
    key: &Key,
    now: u64,
) -> Result<(InviteBook, std::net::Ipv4Addr), Refusal> {
    if *key == group.mesh.host_wg || group.mesh.member(key).is_some() {
        return Err(Refusal::Invite(RedeemError::AlreadyUsed));
    }
    // A dead invite says so first: a better name would not help.
    invites
        .find_by_key(invite_key)
        .ok_or(RedeemError::Unknown)
        .and_then(|r| r.status(now))
        .map_err(Refusal::Invite)?;
    check_joiner_name(group, name).map_err(Refusal::Name)?;
    let address = group.allocate_address().map_err(|_| Refusal::GroupFull)?;
    let mut invites = invites.clone();
    invites.redeem(invite_key, now).map_err(Refusal::Invite)?;
    Ok((invites, address))
}

/// Whether a joiner may be called `name` in `group`: a well-formed name that no member
/// or hand-added peer has as its name, VPN address or key.
fn check_joiner_name(group: &Group, name: &str) -> Result<(), NameRefusal> {
    let members = group.mesh.active().flat_map(|m| {
        [
            m.name.clone(),
            m.address.to_string(),
            key_to_base64(&m.wg_key),
        ]
    });
    let statics = group.static_peers.iter().flat_map(|p| {
        [
            p.name.clone(),
            p.address.to_string(),
            key_to_base64(&p.public_key),
        ]
    });
    wire::check_name(
        name,
        members.chain(statics).chain([group.host_name.clone()]),
    )
}

fn invite_state(r: &InviteRecord, now: u64) -> &'static str {
    match r.status(now) {
        Ok(()) => "open",
        Err(RedeemError::AlreadyUsed) => "used",
        Err(RedeemError::Expired) => "expired",
        Err(RedeemError::Revoked) => "revoked",
        Err(RedeemError::Unknown) => "unknown",
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
        self.new_link(req.uses, Duration::from_secs(req.expires_secs))
            .await
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
        let out = {
            let mut book = self.book();
            self.refresh_announcement(&mut book, None, &mut rand::thread_rng())
        };
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
                let direct = t.is_some_and(|t| t.path == "direct");
                let nearby = site.is_some() && site == my_site && direct && on_lan;
                PeerView {
                    name: m.name.clone(),
                    address: m.address,
                    public_key: key.clone(),
                    site: site.map(|s| s.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;
    const INVITE_KEY: Key = [50; 32];

    /// A host called "living-room" with a member "kitchen", and a one-use invite.
    fn host() -> (Group, InviteBook) {
        let mut config = Config::default();
        config.node.name = "living-room".into();
        let signing = SigningKey::from_bytes(&[1; 32]);
        let mut group = hosted_group(&config, [1; 32], &signing);
        let kitchen = MemberRecord {
            wg_key: [2; 32],
            sign_key: [2; 32],
            name: "kitchen".into(),
            address: group.allocate_address().unwrap(),
            admitted_at: NOW,
            version: 1,
            revoked: false,
            observed: None,
        };
        group
            .mesh
            .accept_member(&mesh::sign_member(&signing, &kitchen))
            .unwrap();
        let mut invites = InviteBook::default();
        invites.add(InviteRecord {
            id: InviteId([9; 8]),
            public_key: INVITE_KEY,
            created_at: NOW,
            expires_at: NOW + 60,
            uses_allowed: 1,
            uses: 0,
            revoked: false,
            refused: Default::default(),
        });
        (group, invites)
    }

    #[test]
    fn no_address_outside_the_group_network_nor_our_own_is_routed_to_a_member() {
        let (group, _) = host();
        assert!(routable(&group, "100.77.0.2".parse().unwrap()));
        assert!(!routable(&group, "1.1.1.1".parse().unwrap()));
        assert!(!routable(&group, "100.78.0.2".parse().unwrap()));
        assert!(!routable(&group, group.my_address));
    }

    #[test]
    fn a_refused_name_leaves_the_one_use_invite_to_a_good_name() {
        let (group, invites) = host();
        let taken = [
            "kitchen".to_string(),
            "KITCHEN".into(),
            "living-room".into(),
            key_to_base64(&[2; 32]),
        ];
        for name in taken {
            assert_eq!(
                decide_join(&group, &invites, &INVITE_KEY, &name, &[3; 32], NOW),
                Err(Refusal::Name(NameRefusal::Taken)),
                "{name}"
            );
        }
        let malformed = [
            ("x".repeat(2000), NameRefusal::TooLong),
            ("den\u{1b}]0;owned\u{7}".into(), NameRefusal::Unprintable),
            ("100.77.0.2".into(), NameRefusal::Address),
            ("1.1.1.1".into(), NameRefusal::Address),
        ];
        for (name, why) in malformed {
            assert_eq!(
                decide_join(&group, &invites, &INVITE_KEY, &name, &[3; 32], NOW),
                Err(Refusal::Name(why))
            );
        }
        let (spent, address) =
            decide_join(&group, &invites, &INVITE_KEY, "den", &[3; 32], NOW).unwrap();
        assert_eq!(address.to_string(), "100.77.0.3");
        assert_eq!(spent.invites[0].uses, 1);
        assert_eq!(
            decide_join(&group, &spent, &INVITE_KEY, "attic", &[4; 32], NOW),
            Err(Refusal::Invite(RedeemError::AlreadyUsed)),
            "the good name did spend it"
        );
        assert_eq!(
            decide_join(&group, &spent, &INVITE_KEY, "kitchen", &[4; 32], NOW),
            Err(Refusal::Invite(RedeemError::AlreadyUsed)),
            "a spent invite says so before any name is judged"
        );
    }
}
