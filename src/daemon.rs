//! The composition root. It loads the keys and the persisted group, builds the TUN
//! device, binds the UDP and control sockets, starts the tunnel, the join handler and the
//! control server under one cancellation token, tells systemd it is ready, and on SIGTERM
//! stops them in order and awaits each. The [`Node`] it builds answers the control API.
//! Protocol rules live in the modules it composes, not here.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tun_rs::DeviceBuilder;

use crate::config::{split_host_port, Config};
use crate::control::{
    self, ApiError, Empty, Handler, InviteView, JoinReply, JoinRequest, LinkReply, LinkRequest,
    NodeStatus, PeerAddRequest, PeerRemoveRequest, StatusReply,
};
use crate::group::{Group, Member};
use crate::identity::{self, Identity};
use crate::join::{self, JoinError};
use crate::link::{self, Invite, InviteBook, InviteId, InviteRecord, LinkError, RedeemError};
use crate::state::{self, StateError};
use crate::tunnel::{InviteMessage, PeerConfig, Tunnel, TunnelError, TUN_MTU};
use crate::wire::{self, JoinMessage, Refusal};

const GROUP_FILE: &str = "group.json";
const INVITES_FILE: &str = "invites.json";
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const TUNNEL_UP_TIMEOUT: Duration = Duration::from_secs(10);
const ENDPOINT_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest an invite may live, so a forgotten link does not stay a way in for ever.
pub const MAX_INVITE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    LoadIdentity(#[from] identity::IdentityError),
    #[error(transparent)]
    LoadState(#[from] StateError),
    #[error("cannot create the TUN device {name}: {source} (the daemon needs CAP_NET_ADMIN and /dev/net/tun; is another watchalong using {name}?)")]
    CreateTun {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot bind UDP port {port}: {source} (set [tunnel] listen_port to a free port)")]
    BindUdp { port: u16, source: std::io::Error },
    #[error("cannot listen on the control socket {path}: {source}")]
    BindControl {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another daemon already answers on {0}")]
    ControlInUse(PathBuf),
    #[error("cannot install the signal handler: {0}")]
    InstallSignals(#[source] std::io::Error),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The persisted view of the group and the invites, changed under one lock.
struct Book {
    group: Group,
    invites: InviteBook,
}

pub struct Node {
    config: Config,
    public_key: [u8; 32],
    book: Mutex<Book>,
    tunnel: Arc<Tunnel>,
    /// One join at a time: a join rewrites the whole group.
    joining: tokio::sync::Mutex<()>,
}

impl Node {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.config.node.state_dir.join(file)
    }

    fn invite_keys(book: &Book) -> HashSet<[u8; 32]> {
        book.invites.invites.iter().map(|r| r.public_key).collect()
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
        let port = self.config.tunnel.listen_port;
        if let Some(ep) = &self.config.tunnel.endpoint {
            if let Some((host, p)) = split_host_port(ep) {
                match tokio::net::lookup_host((host, p)).await {
                    Ok(addrs) => return addrs.collect(),
                    Err(e) => log::warn!("cannot resolve the configured endpoint {ep}: {e}"),
                }
            }
        }
        let network = self.book().group.network;
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

    /// The host's answer to one join request, decided and persisted under the book lock.
    fn answer_join(
        &self,
        invite_key: &[u8; 32],
        name: &str,
        key: [u8; 32],
        from: SocketAddr,
    ) -> (JoinMessage, Option<Member>) {
        let now = now_secs();
        let mut book = self.book();
        let refused = |reason| (JoinMessage::Refused { reason }, None);
        let invite_id = match book.invites.find_by_key(invite_key) {
            Some(r) => r.id,
            None => return refused(Refusal::Invite(RedeemError::Unknown)),
        };
        let accepted = |m: &Member, group: &Group| JoinMessage::Accepted {
            address: m.address,
            network: group.network,
            host_name: self.config.node.name.clone(),
            host_address: group.my_address,
            name: m.name.clone(),
        };
        // A retry by a joiner this invite already admitted gets the same answer again.
        if let Some(m) = book.group.member(&key) {
            if m.invite == Some(invite_id) {
                return (accepted(m, &book.group), None);
            }
        }
        if key == self.public_key || book.group.member(&key).is_some() {
            return refused(Refusal::Invite(RedeemError::AlreadyUsed));
        }
        let mut invites = book.invites.clone();
        if let Err(e) = invites.redeem(invite_key, now) {
            return refused(Refusal::Invite(e));
        }
        let mut group = book.group.clone();
        let member = match group.admit(name, key, Some(from), Some(invite_id), now) {
            Ok(m) => m,
            Err(_) => return refused(Refusal::GroupFull),
        };
        // Invites first: a crash between the two writes leaves the invite spent and no
        // member, never a member admitted by an invite that could be spent again.
        if let Err(e) = state::write_json(&self.path(INVITES_FILE), &invites) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        book.invites = invites;
        if let Err(e) = state::write_json(&self.path(GROUP_FILE), &group) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        book.group = group;
        log::info!(
            "{} joined as {} through invite {invite_id}",
            member.name,
            member.address
        );
        (accepted(&member, &book.group), Some(member))
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
            if g.host_key == invite.host_key {
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
            if !g.members.is_empty() {
                return Err(ApiError::conflict(format!(
                    "this node hosts a group of {} member(s) and cannot join another",
                    g.members.len()
                )));
            }
        }
        let admission = join::redeem(
            &invite,
            self.public_key,
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
            _ => ApiError::internal(e),
        })?;
        let host = Member {
            name: admission.host_name.clone(),
            public_key: invite.host_key,
            address: admission.host_address,
            endpoint: Some(admission.host_endpoint),
            admitted_at: now_secs(),
            invite: None,
        };
        let group = Group {
            network: admission.network,
            host_key: invite.host_key,
            host_name: admission.host_name.clone(),
            my_address: admission.address,
            members: vec![host.clone()],
        };
        state::write_json(&self.path(GROUP_FILE), &group).map_err(ApiError::internal)?;
        self.book().group = group;
        self.tunnel
            .device()
            .set_network_address(admission.address, admission.network.prefix_len(), None)
            .map_err(ApiError::internal)?;
        self.tunnel.add_peer(peer_config(&host)).await;
        log::info!(
            "joined {}'s group as {} ({})",
            admission.host_name,
            admission.name,
            admission.address
        );
        let deadline = tokio::time::Instant::now() + TUNNEL_UP_TIMEOUT;
        let host_key = identity::key_to_base64(&invite.host_key);
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
}

/// Keeps the persisted endpoints in step with the tunnel's roaming, so that after a
/// restart this node greets each peer where it was last seen.
async fn persist_endpoints(node: Arc<Node>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(ENDPOINT_SAVE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = node.tunnel.roamed() => {}
            () = cancel.cancelled() => return,
        }
        let seen = node.tunnel.status();
        let mut book = node.book();
        let mut group = book.group.clone();
        let mut changed = false;
        for p in seen {
            let Some(key) = identity::key_from_base64(&p.public_key) else {
                continue;
            };
            if let Some(m) = group.member_mut(&key) {
                if p.endpoint.is_some() && m.endpoint != p.endpoint {
                    m.endpoint = p.endpoint;
                    changed = true;
                }
            }
        }
        if changed {
            match state::write_json(&node.path(GROUP_FILE), &group) {
                Ok(()) => book.group = group,
                Err(e) => log::warn!("{e}"),
            }
        }
    }
}

fn peer_config(m: &Member) -> PeerConfig {
    PeerConfig {
        public_key: m.public_key,
        name: m.name.clone(),
        address: m.address,
        endpoint: m.endpoint,
    }
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
                public_key: identity::key_to_base64(&self.public_key),
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
            },
            peers: self.tunnel.status(),
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
        self.do_join(&req.link).await
    }

    async fn add_peer(&self, req: PeerAddRequest) -> Result<Empty, ApiError> {
        let key = identity::key_from_base64(&req.public_key).ok_or_else(|| {
            ApiError::bad_request(
                "the public key must be 32 bytes in base64, as `wg pubkey` prints",
            )
        })?;
        let member = Member {
            name: req.name,
            public_key: key,
            address: req.address,
            endpoint: req.endpoint,
            admitted_at: now_secs(),
            invite: None,
        };
        {
            let mut book = self.book();
            let mut group = book.group.clone();
            group
                .add_static(member.clone())
                .map_err(ApiError::conflict)?;
            state::write_json(&self.path(GROUP_FILE), &group).map_err(ApiError::internal)?;
            book.group = group;
        }
        self.tunnel.add_peer(peer_config(&member)).await;
        Ok(Empty {})
    }

    async fn remove_peer(&self, req: PeerRemoveRequest) -> Result<Empty, ApiError> {
        let key = identity::key_from_base64(&req.public_key)
            .ok_or_else(|| ApiError::bad_request("the public key must be 32 bytes in base64"))?;
        {
            let mut book = self.book();
            let mut group = book.group.clone();
            group
                .remove(&key)
                .ok_or_else(|| ApiError::not_found("no peer has that public key"))?;
            state::write_json(&self.path(GROUP_FILE), &group).map_err(ApiError::internal)?;
            book.group = group;
        }
        self.tunnel.remove_peer(&key);
        Ok(Empty {})
    }
}

/// Answers join requests arriving in invite sessions until cancelled.
async fn serve_joins(
    node: Arc<Node>,
    mut rx: mpsc::Receiver<InviteMessage>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            () = cancel.cancelled() => return,
        };
        let Ok(JoinMessage::Request { name, public_key }) = wire::decode(&msg.packet) else {
            continue;
        };
        let (answer, admitted) = node.answer_join(&msg.invite_key, &name, public_key, msg.from);
        if let Some(m) = admitted {
            node.tunnel.add_peer(peer_config(&m)).await;
        }
        let host_address = node.book().group.my_address;
        match wire::encode(host_address, wire::JOINER_ADDRESS, &answer) {
            Ok(p) => {
                if let Err(e) = node.tunnel.send_invite_reply(msg.session, &p).await {
                    log::debug!("join answer not sent: {e}");
                }
            }
            Err(e) => log::warn!("cannot encode a join answer: {e}"),
        }
    }
}

/// Runs a node until SIGTERM or SIGINT. `ready` receives the node once the TUN device
/// and every socket are up, just as systemd hears `READY=1`.
pub async fn run(
    config: Config,
    ready: Option<oneshot::Sender<Arc<Node>>>,
) -> Result<(), DaemonError> {
    let id = Identity::load_or_create(&config.node.state_dir)?;
    let public_key = id.wg_public.to_bytes();
    let group = match state::read_json::<Group>(&config.node.state_dir.join(GROUP_FILE))? {
        Some(g) => g,
        None => Group::hosted(config.tunnel.network, public_key, &config.node.name),
    };
    let mut invites = state::read_json::<InviteBook>(&config.node.state_dir.join(INVITES_FILE))?
        .unwrap_or_default();
    invites.prune(now_secs());

    let tun = DeviceBuilder::new()
        .name(&config.tunnel.interface)
        .ipv4(group.my_address, group.network.prefix_len(), None)
        .mtu(TUN_MTU)
        .build_async()
        .map_err(|source| DaemonError::CreateTun {
            name: config.tunnel.interface.clone(),
            source,
        })?;
    let port = config.tunnel.listen_port;
    let udp = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::UdpSocket::from_std)
        .map_err(|source| DaemonError::BindUdp { port, source })?;
    let listener = bind_control(&config.control.socket).await?;

    let (invite_tx, invite_rx) = mpsc::channel(64);
    let tunnel = Tunnel::new(udp, tun, id.wg_secret.clone(), invite_tx);
    let book = Book { group, invites };
    tunnel.set_invite_keys(Node::invite_keys(&book));
    for m in &book.group.members {
        tunnel.add_peer(peer_config(m)).await;
    }
    let node = Arc::new(Node {
        config: config.clone(),
        public_key,
        book: Mutex::new(book),
        tunnel: tunnel.clone(),
        joining: tokio::sync::Mutex::new(()),
    });

    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (t, c) = (tunnel.clone(), cancel.clone());
        tasks.spawn(async move { t.run(c).await.map_err(DaemonError::from) });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn(async move {
            control::serve(listener, n, c).await;
            Ok(())
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn(async move {
            serve_joins(n, invite_rx, c).await;
            Ok(())
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn(async move {
            persist_endpoints(n, c).await;
            Ok(())
        });
    }
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) && watchdog_usec > 0 {
        let c = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(watchdog_usec / 2));
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]); }
                    () = c.cancelled() => return Ok(()),
                }
            }
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::InstallSignals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::InstallSignals)?;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    log::info!(
        "{} is up: {} on {}, UDP port {}",
        config.node.name,
        node.book().group.my_address,
        config.tunnel.interface,
        port
    );
    if let Some(tx) = ready {
        let _ = tx.send(node.clone());
    }

    let mut result = Ok(());
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
        _ = int.recv() => log::info!("SIGINT: shutting down"),
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r {
                log::error!("{e}");
                result = Err(e);
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            log::warn!("{e}");
        }
    }
    let _ = std::fs::remove_file(&config.control.socket);
    // The last references to the tunnel go here; closing the TUN fd removes the device.
    drop(node);
    drop(tunnel);
    log::info!("stopped");
    result
}

async fn bind_control(path: &std::path::Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::BindControl {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash; a live one is another daemon.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::ControlInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::BindControl {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(l)
}
