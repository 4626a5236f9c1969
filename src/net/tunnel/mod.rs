//! Userspace WireGuard: one boringtun `Tunn` per peer, one TUN device, one UDP socket,
//! and three loops (UDP in, TUN in, timers every 250 ms). It owns the peers' crypto state,
//! their endpoints and the choice of path: direct when a session is alive, else through
//! the host, which forwards between members inside the daemon. It keeps knocking at a
//! peer's candidate endpoints from the one UDP socket until a direct session forms, which
//! opens a path through endpoint-independent NATs.
//!
//! It also accepts WireGuard sessions keyed by an invite's secret (their packets never
//! reach the TUN device; they are handed over as join messages) and intercepts gossip
//! addressed to this node. It must not decide membership: the daemon adds and removes
//! peers.
//!
//! Anyone on the internet can send to its port, so a handshake costs nothing before it is
//! proven cheap to answer: one boringtun `RateLimiter` shared by every session checks mac1
//! (and, under load, a cookie bound to the source address) before any key is looked at,
//! and the expensive parse of an initiation runs outside the peer table's lock.
//!
//! It is one file of about 900 lines on purpose for now: the data-plane work (a sans-IO
//! tunnel core with a batching I/O shell) replaces its inside whole, and cutting it
//! before would only move lines that are about to go.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::net::routes::Routes;
use crate::net::wire;

const BUF: usize = 65536;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Keeps NAT mappings open between members.
const KEEPALIVE_SECS: u16 = 25;
/// A peer heard from within this long has a working direct path (keepalives every 25 s).
const LIVE: Duration = Duration::from_secs(40);
/// How often a peer without a direct path is sent a fresh handshake at its candidates.
const KNOCK_EVERY: Duration = Duration::from_secs(2);
const MAX_INVITE_SESSIONS: usize = 256;
/// WireGuard's message type 3: a cookie reply.
const COOKIE_REPLY: u8 = 3;
const INVITE_SESSION_LIFETIME: Duration = Duration::from_secs(120);
/// Handshakes per second answered without a cookie; past it, an initiator must prove its
/// source address first. Each handshake is counted twice (our check, then the session's
/// own), so this lets about half as many through.
const HANDSHAKES_PER_SEC: u64 = 200;
/// A cookie reply is 64 bytes.
const COOKIE_REPLY_LEN: usize = 64;

use crate::base::lock::Recover;
use crate::group::identity::Key;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot receive from the UDP socket: {0}")]
    ReceiveUdp(#[source] std::io::Error),
    #[error("cannot read from the TUN device: {0}")]
    ReadTun(#[source] std::io::Error),
    #[error("no invite session {0}")]
    FindInviteSession(u32),
}

/// What the daemon tells the tunnel about one peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub public_key: Key,
    pub name: String,
    pub address: Ipv4Addr,
    /// Where to send now (the last endpoint seen); roams on authenticated packets.
    pub endpoint: Option<SocketAddr>,
    /// Where the peer might be reached; knocked at until a direct session forms.
    pub candidates: Vec<SocketAddr>,
}

/// How packets reach a peer now; in JSON `direct`, `via-host` or `down`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// A session of our own with it, live.
    Direct,
    /// No live session of our own, but the host that carries its traffic is live.
    ViaHost,
    Down,
}

impl PathKind {
    /// The name JSON gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::ViaHost => "via-host",
            PathKind::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    #[serde(with = "crate::group::identity::key_b64")]
    pub public_key: Key,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
    pub path: PathKind,
    /// Round trip of the last handshake, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Unix time of the last completed handshake.
    pub last_handshake: Option<u64>,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A join message that arrived in an invite session.
#[derive(Debug)]
pub struct InviteMessage {
    pub session: u32,
    pub invite_key: Key,
    pub from: SocketAddr,
    pub packet: Vec<u8>,
}

/// A gossip datagram from the member that owns its source address.
#[derive(Debug)]
pub struct GossipIn {
    pub from: Key,
    pub payload: Vec<u8>,
}

struct Peer {
    tunn: Tunn,
    config: PeerConfig,
    index: u32,
    rx_bytes: u64,
    tx_bytes: u64,
    last_rx: Option<Instant>,
    next_knock: Instant,
}

impl Peer {
    fn live(&self, now: Instant) -> bool {
        self.config.endpoint.is_some() && self.last_rx.is_some_and(|t| now.duration_since(t) < LIVE)
    }

    /// Every address worth a handshake: candidates first, then the last one seen.
    fn knock_targets(&self) -> Vec<SocketAddr> {
        let mut v = self.config.candidates.clone();
        if let Some(ep) = self.config.endpoint {
            if !v.contains(&ep) {
                v.push(ep);
            }
        }
        v
    }
}

struct InviteSession {
    tunn: Tunn,
    invite_key: Key,
    endpoint: SocketAddr,
    started: Instant,
}

#[derive(Clone, Copy)]
enum Slot {
    Peer(Key),
    Invite(u32),
}

#[derive(Default)]
struct State {
    peers: HashMap<Key, Peer>,
    slots: HashMap<u32, Slot>,
    invites: HashMap<u32, InviteSession>,
    invite_keys: HashSet<Key>,
    routes: Routes<Key>,
    /// This node's VPN address.
    me: Option<Ipv4Addr>,
    /// The host's key, on members; `None` on the host itself, which forwards.
    host: Option<Key>,
    spoofed: u64,
    forwarded: u64,
}

/// Where a packet goes once encrypted.
enum Send {
    Nothing,
    /// In the loop's buffer, `len` bytes, to one endpoint.
    One(usize, SocketAddr),
    Many(Vec<(Vec<u8>, SocketAddr)>),
}

impl State {
    /// A 24-bit index not in use: boringtun puts it in the top bits of its session ids.
    fn new_index(&self) -> u32 {
        loop {
            let i = rand::rngs::OsRng.next_u32() >> 8;
            if !self.slots.contains_key(&i) {
                return i;
            }
        }
    }

    /// The peer whose session carries packets for `dst`: the peer itself when its direct
    /// path is alive, else the host (on a member), else the peer anyway (to knock).
    fn carrier(&self, dst: &Key, now: Instant) -> Key {
        let direct = self.peers.get(dst).is_some_and(|p| p.live(now));
        match self.host {
            Some(h) if !direct && h != *dst && self.peers.get(&h).is_some_and(|p| p.live(now)) => h,
            _ => *dst,
        }
    }

    /// Encrypts an IP packet for the peer that owns `dst` and says where to send it.
    fn encapsulate(&mut self, packet: &[u8], dst: Ipv4Addr, tx: &mut [u8], now: Instant) -> Send {
        let Some(owner) = self.routes.owner(dst).copied() else {
            return Send::Nothing;
        };
        let carrier = self.carrier(&owner, now);
        let Some(peer) = self.peers.get_mut(&carrier) else {
            return Send::Nothing;
        };
        match peer.tunn.encapsulate(packet, tx) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                peer.tx_bytes += packet.len() as u64;
                match peer.config.endpoint {
                    Some(ep) if peer.last_rx.is_some() => Send::One(len, ep),
                    // No session yet: `p` is a handshake; try every address we know.
                    _ => Send::Many(
                        peer.knock_targets()
                            .into_iter()
                            .map(|ep| (p.to_vec(), ep))
                            .collect(),
                    ),
                }
            }
            _ => Send::Nothing,
        }
    }
}

pub struct Tunnel {
    udp: UdpSocket,
    tun: AsyncDevice,
    secret: StaticSecret,
    public: PublicKey,
    state: Mutex<State>,
    invite_tx: mpsc::Sender<InviteMessage>,
    gossip_tx: mpsc::Sender<GossipIn>,
    roamed: tokio::sync::Notify,
    /// Set once the UDP loop reads its socket: until then a handshake gets no answer.
    receiving: tokio::sync::watch::Sender<bool>,
    /// Shared by every session: mac1 and cookies, and the count of handshakes per second.
    limiter: Arc<RateLimiter>,
    /// Handshake-shaped datagrams dropped before any key work.
    handshakes_refused: std::sync::atomic::AtomicU64,
    /// Gossip datagrams some other program on this machine sent through the TUN device.
    local_gossip_dropped: std::sync::atomic::AtomicU64,
}

/// What handling one datagram asks the loop to do once the lock is released.
enum After {
    Nothing,
    ToTun(usize),
    Invite(InviteMessage),
    Gossip(GossipIn),
    Forward(Send),
}

impl Tunnel {
    pub fn new(
        udp: UdpSocket,
        tun: AsyncDevice,
        secret: StaticSecret,
        invite_tx: mpsc::Sender<InviteMessage>,
        gossip_tx: mpsc::Sender<GossipIn>,
    ) -> Arc<Tunnel> {
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SEC));
        Arc::new(Tunnel {
            limiter,
            handshakes_refused: std::sync::atomic::AtomicU64::new(0),
            local_gossip_dropped: std::sync::atomic::AtomicU64::new(0),
            udp,
            tun,
            secret,
            public,
            state: Mutex::new(State::default()),
            invite_tx,
            gossip_tx,
            roamed: tokio::sync::Notify::new(),
            receiving: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Returns once the UDP loop runs, so the socket answers handshakes.
    pub async fn wait_receiving(&self) {
        let mut rx = self.receiving.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.locked()
    }

    pub fn device(&self) -> &AsyncDevice {
        &self.tun
    }

    pub fn local_port(&self) -> Option<u16> {
        self.udp.local_addr().ok().map(|a| a.port())
    }

    /// This node's VPN address, and the host's key when this node is a member.
    pub fn set_local(&self, me: Ipv4Addr, host: Option<Key>) {
        let mut st = self.lock();
        st.me = Some(me);
        st.host = host;
    }

    /// Adds a peer, or updates the name, address and candidates of one already there
    /// without touching its session.
    pub async fn upsert_peer(&self, config: PeerConfig) {
        let out = {
            let mut st = self.lock();
            let now = Instant::now();
            if let Some(p) = st.peers.get_mut(&config.public_key) {
                let moved = p.config.address != config.address;
                p.config.name = config.name;
                p.config.candidates = config.candidates;
                if p.config.endpoint.is_none() {
                    p.config.endpoint = config.endpoint;
                }
                if moved {
                    p.config.address = config.address;
                    let key = config.public_key;
                    st.routes.remove_owner(&key);
                    if let Ok(net) = Ipv4Net::new(config.address, 32) {
                        st.routes.insert(net, key);
                    }
                }
                return;
            }
            let index = st.new_index();
            let mut tunn = Tunn::new(
                self.secret.clone(),
                PublicKey::from(config.public_key),
                None,
                Some(KEEPALIVE_SECS),
                index,
                Some(self.limiter.clone()),
            );
            let key = config.public_key;
            let peer = Peer {
                tunn,
                config,
                index,
                rx_bytes: 0,
                tx_bytes: 0,
                last_rx: None,
                next_knock: now + KNOCK_EVERY,
            };
            let targets = peer.knock_targets();
            tunn = peer.tunn;
            let mut buf = vec![0u8; 256];
            let out = match tunn.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(p) => {
                    targets.into_iter().map(|ep| (p.to_vec(), ep)).collect()
                }
                _ => Vec::new(),
            };
            st.slots.insert(index, Slot::Peer(key));
            let taken = st
                .peers
                .values()
                .any(|p| p.config.address == peer.config.address);
            if taken {
                // First come keeps it: members are added before hand-made peers.
                log::warn!(
                    "{} claims {}, which another peer already has; it gets no traffic",
                    peer.config.name,
                    peer.config.address
                );
            } else if let Ok(net) = Ipv4Net::new(peer.config.address, 32) {
                st.routes.insert(net, key);
            }
            st.peers.insert(key, Peer { tunn, ..peer });
            out
        };
        self.send_all(out).await;
    }

    pub fn remove_peer(&self, key: &Key) -> bool {
        let mut st = self.lock();
        match st.peers.remove(key) {
            Some(p) => {
                st.slots.remove(&p.index);
                st.routes.remove_owner(key);
                true
            }
            None => false,
        }
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.lock().peers.keys().copied().collect()
    }

    /// Peers a message can be sent to now, directly or through the host.
    pub fn reachable(&self) -> Vec<Key> {
        let st = self.lock();
        let now = Instant::now();
        st.peers
            .keys()
            .filter(|k| {
                st.peers
                    .get(&st.carrier(k, now))
                    .is_some_and(|p| p.live(now))
            })
            .copied()
            .collect()
    }

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&self, keys: HashSet<Key>) {
        self.lock().invite_keys = keys;
    }

    /// Sends a join answer on an invite session.
    pub async fn send_invite_reply(&self, session: u32, packet: &[u8]) -> Result<(), TunnelError> {
        let mut buf = vec![0u8; packet.len() + 64];
        let sent = {
            let mut st = self.lock();
            let s = st
                .invites
                .get_mut(&session)
                .ok_or(TunnelError::FindInviteSession(session))?;
            match s.tunn.encapsulate(packet, &mut buf) {
                TunnResult::WriteToNetwork(p) => Some((p.to_vec(), s.endpoint)),
                _ => None,
            }
        };
        self.send_all(sent.into_iter().collect()).await;
        Ok(())
    }

    /// Sends a gossip datagram to member `to`, directly or through the host.
    pub async fn send_gossip(&self, to: &Key, payload: &[u8]) {
        let mut tx = vec![0u8; payload.len() + 128];
        let send = {
            let mut st = self.lock();
            let (Some(me), Some(dst)) = (st.me, st.peers.get(to).map(|p| p.config.address)) else {
                return;
            };
            let Ok(packet) = wire::encode_udp(me, dst, wire::GOSSIP_PORT, payload) else {
                log::warn!("gossip message too large ({} bytes)", payload.len());
                return;
            };
            st.encapsulate(&packet, dst, &mut tx, Instant::now())
        };
        self.dispatch(send, &tx).await;
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let now = Instant::now();
        let st = self.lock();
        let mut v: Vec<PeerStatus> = st
            .peers
            .iter()
            .map(|(k, p)| {
                let (since, _, _, _, rtt) = p.tunn.stats();
                let ago = since.map(|d| d.as_secs());
                let carrier = st.carrier(k, now);
                let path = if p.live(now) {
                    PathKind::Direct
                } else if carrier != *k && st.peers.get(&carrier).is_some_and(|c| c.live(now)) {
                    PathKind::ViaHost
                } else {
                    PathKind::Down
                };
                PeerStatus {
                    name: p.config.name.clone(),
                    public_key: *k,
                    address: p.config.address,
                    endpoint: p.config.endpoint,
                    path,
                    rtt_ms: rtt,
                    last_handshake: ago.map(|a| unix_now.saturating_sub(a)),
                    last_handshake_secs_ago: ago,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect();
        v.sort_by_key(|p| p.address);
        v
    }

    /// Resolves when a peer's endpoint has moved since the last call.
    pub async fn roamed(&self) {
        self.roamed.notified().await
    }

    /// Packets from other members that claimed an address they do not own.
    pub fn spoofed_count(&self) -> u64 {
        self.lock().spoofed
    }

    /// Handshake-shaped datagrams dropped before any key work: a bad mac1, or no valid
    /// cookie while under load.
    pub fn handshakes_refused(&self) -> u64 {
        self.handshakes_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gossip datagrams another program on this machine tried to send as this daemon.
    pub fn local_gossip_dropped(&self) -> u64 {
        self.local_gossip_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Packets this node passed on between two other members.
    pub fn forwarded_count(&self) -> u64 {
        self.lock().forwarded
    }

    async fn send_all(&self, out: Vec<(Vec<u8>, SocketAddr)>) {
        for (p, ep) in out {
            if let Err(e) = self.udp.send_to(&p, ep).await {
                log::debug!("send to {ep} failed: {e}");
            }
        }
    }

    async fn dispatch(&self, send: Send, tx: &[u8]) {
        match send {
            Send::Nothing => {}
            Send::One(len, ep) => {
                if let Err(e) = self.udp.send_to(&tx[..len], ep).await {
                    log::debug!("send to {ep} failed: {e}");
                }
            }
            Send::Many(v) => self.send_all(v).await,
        }
    }

    /// Runs the three loops until `cancel` fires or a socket fails for good.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), TunnelError> {
        let r = tokio::select! {
            r = self.udp_loop() => r,
            r = self.tun_loop() => r,
            () = self.timer_loop() => Ok(()),
            () = cancel.cancelled() => Ok(()),
        };
        cancel.cancel();
        r
    }

    async fn udp_loop(&self) -> Result<(), TunnelError> {
        let mut rx = vec![0u8; BUF];
        let mut tx = vec![0u8; BUF];
        self.receiving.send_replace(true);
        loop {
            let (n, from) = match self.udp.recv_from(&mut rx).await {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(TunnelError::ReceiveUdp(e)),
            };
            let mut out = Vec::new();
            let after = self.handle_datagram(&rx[..n], from, &mut tx, &mut out);
            self.send_all(out).await;
            match after {
                After::Nothing => {}
                After::ToTun(len) => {
                    if let Err(e) = self.tun.send(&tx[..len]).await {
                        log::debug!("write to TUN failed: {e}");
                    }
                }
                After::Invite(msg) => {
                    if self.invite_tx.try_send(msg).is_err() {
                        log::debug!("join handler busy; dropped a join message");
                    }
                }
                After::Gossip(msg) => {
                    if self.gossip_tx.try_send(msg).is_err() {
                        log::debug!("gossip handler busy; dropped a message");
                    }
                }
                After::Forward(send) => self.dispatch(send, &tx).await,
            }
        }
    }

    fn handle_datagram(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        tx: &mut [u8],
        out: &mut Vec<(Vec<u8>, SocketAddr)>,
    ) -> After {
        // mac1 first, and under load a cookie: a flood of handshake-shaped datagrams
        // costs a keyed hash each and never reaches the X25519 below or the lock.
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(reply)) => {
                out.push((reply.to_vec(), from));
                self.count_refused_handshake();
                return After::Nothing;
            }
            Err(_) => {
                if datagram.first().is_some_and(|t| matches!(t, 1 | 2)) {
                    self.count_refused_handshake();
                }
                return After::Nothing;
            }
        };
        // Whose initiation this is takes a Diffie-Hellman: done before the lock is taken.
        let initiator = match &packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.secret, &self.public, init) {
                    Ok(half) => Some(half.peer_static_public),
                    Err(_) => return After::Nothing,
                }
            }
            _ => None,
        };
        let mut st = self.lock();
        let slot = match &packet {
            Packet::HandshakeInit(_) => {
                let Some(key) = initiator else {
                    return After::Nothing;
                };
                if st.peers.contains_key(&key) {
                    Slot::Peer(key)
                } else if st.invite_keys.contains(&key) {
                    Slot::Invite(self.invite_session_for(&mut st, key, from))
                } else {
                    log::debug!("handshake from an unknown key at {from}");
                    return After::Nothing;
                }
            }
            Packet::HandshakeResponse(p) => match st.slots.get(&(p.receiver_idx >> 8)) {
                Some(s) => *s,
                None => return After::Nothing,
            },
            Packet::PacketCookieReply(p) => match st.slots.get(&(p.receiver_idx >> 8)) {
                Some(s) => *s,
                None => return After::Nothing,
            },
            Packet::PacketData(p) => match st.slots.get(&(p.receiver_idx >> 8)) {
                Some(s) => *s,
                None => return After::Nothing,
            },
        };
        match slot {
            Slot::Peer(key) => self.handle_peer_packet(&mut st, key, datagram, from, tx, out),
            Slot::Invite(idx) => {
                let Some(s) = st.invites.get_mut(&idx) else {
                    return After::Nothing;
                };
                match s.tunn.decapsulate(Some(from.ip()), datagram, tx) {
                    TunnResult::WriteToNetwork(p) => {
                        out.push((p.to_vec(), from));
                        drain(&mut s.tunn, tx, from, out);
                        s.endpoint = from;
                        After::Nothing
                    }
                    TunnResult::WriteToTunnelV4(p, _) => {
                        s.endpoint = from;
                        After::Invite(InviteMessage {
                            session: idx,
                            invite_key: s.invite_key,
                            from,
                            packet: p.to_vec(),
                        })
                    }
                    _ => After::Nothing,
                }
            }
        }
    }

    fn handle_peer_packet(
        &self,
        st: &mut State,
        key: Key,
        datagram: &[u8],
        from: SocketAddr,
        tx: &mut [u8],
        out: &mut Vec<(Vec<u8>, SocketAddr)>,
    ) -> After {
        let now = Instant::now();
        let (me, host) = (st.me, st.host);
        let Some(peer) = st.peers.get_mut(&key) else {
            return After::Nothing;
        };
        let parsed = Tunn::parse_incoming_packet(datagram);
        let was_data = matches!(parsed, Ok(Packet::PacketData(_)));
        // A handshake initiation proves only that the peer's packets reach us; a path
        // counts as alive once packets went both ways: a response to our initiation, or
        // data (the initiator sends a keepalive as soon as it has our response).
        let round_trip = matches!(
            parsed,
            Ok(Packet::PacketData(_) | Packet::HandshakeResponse(_))
        );
        let res = peer.tunn.decapsulate(Some(from.ip()), datagram, tx);
        // Only an authenticated packet may move a peer's endpoint (roaming) or keep its
        // path alive. A cookie reply, and the cookie boringtun answers an unverified
        // handshake with when under load, prove nothing about the sender.
        let authenticated = match &res {
            TunnResult::Err(e) => {
                log::trace!("packet from {from} rejected: {e:?}");
                return After::Nothing;
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => true,
            TunnResult::Done => was_data,
            TunnResult::WriteToNetwork(p) => p.first() != Some(&COOKIE_REPLY),
        };
        if authenticated {
            if round_trip {
                peer.last_rx = Some(now);
            }
            if peer.config.endpoint != Some(from) {
                log::info!("{} is now at {from}", peer.config.name);
                peer.config.endpoint = Some(from);
                self.roamed.notify_one();
            }
        }
        let (len, src) = match res {
            TunnResult::WriteToNetwork(p) => {
                out.push((p.to_vec(), from));
                drain(&mut peer.tunn, tx, from, out);
                return After::Nothing;
            }
            TunnResult::WriteToTunnelV4(p, src) => (p.len(), src),
            _ => return After::Nothing,
        };
        peer.rx_bytes += len as u64;
        let name = peer.config.name.clone();
        // The source must belong to the sender, except that the host relays for members.
        let owner = st.routes.owner(src).copied();
        let relayed = host == Some(key) && owner.is_some();
        if owner != Some(key) && !relayed {
            st.spoofed += 1;
            log::debug!("dropped a packet from {name} claiming {src}");
            return After::Nothing;
        }
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(&tx[..len]) else {
            return After::Nothing;
        };
        if Some(dst) == me {
            if let Some(udp) = wire::decode_udp(&tx[..len]) {
                if udp.port == wire::GOSSIP_PORT {
                    return match owner {
                        Some(from) => After::Gossip(GossipIn {
                            from,
                            payload: udp.payload.to_vec(),
                        }),
                        None => After::Nothing,
                    };
                }
            }
            return After::ToTun(len);
        }
        // The host passes packets on between members that have no direct path.
        if host.is_none() && st.routes.owner(dst).is_some_and(|o| *o != key) {
            let packet = tx[..len].to_vec();
            st.forwarded += 1;
            return After::Forward(st.encapsulate(&packet, dst, tx, now));
        }
        // Anything else is not for this node: handing it to the kernel would let a member
        // reach whatever this machine routes to.
        log::debug!("dropped a packet from {name} for {dst}");
        After::Nothing
    }

    /// One session per invite holder and endpoint, so concurrent joiners using the same
    /// link get separate sessions and separate answers.
    fn invite_session_for(&self, st: &mut State, key: Key, from: SocketAddr) -> u32 {
        if let Some((idx, _)) = st
            .invites
            .iter()
            .find(|(_, s)| s.invite_key == key && s.endpoint == from)
        {
            return *idx;
        }
        if st.invites.len() >= MAX_INVITE_SESSIONS {
            if let Some(oldest) = st
                .invites
                .iter()
                .min_by_key(|(_, s)| s.started)
                .map(|(i, _)| *i)
            {
                st.invites.remove(&oldest);
                st.slots.remove(&oldest);
            }
        }
        let idx = st.new_index();
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            None,
            idx,
            Some(self.limiter.clone()),
        );
        st.invites.insert(
            idx,
            InviteSession {
                tunn,
                invite_key: key,
                endpoint: from,
                started: Instant::now(),
            },
        );
        st.slots.insert(idx, Slot::Invite(idx));
        idx
    }

    async fn tun_loop(&self) -> Result<(), TunnelError> {
        let mut rx = vec![0u8; BUF];
        let mut tx = vec![0u8; BUF + 64];
        loop {
            let n = self.tun.recv(&mut rx).await.map_err(TunnelError::ReadTun)?;
            let Some(IpAddr::V4(dst)) = Tunn::dst_address(&rx[..n]) else {
                continue;
            };
            let src = Ipv4Addr::new(rx[12], rx[13], rx[14], rx[15]);
            let send = {
                let mut st = self.lock();
                // Only this node speaks from the TUN device: a packet the kernel forwarded
                // in with a member's source (from a container, say) would pass for it.
                if st.me != Some(src) {
                    continue;
                }
                // Gossip is the daemon's own (sent by `send_gossip`, never through the
                // kernel): a datagram to the gossip port from the TUN device comes from some
                // other program on this machine.
                if wire::decode_udp(&rx[..n]).is_some_and(|u| u.port == wire::GOSSIP_PORT) {
                    self.local_gossip_dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                st.encapsulate(&rx[..n], dst, &mut tx, Instant::now())
            };
            self.dispatch(send, &tx).await;
        }
    }

    async fn timer_loop(&self) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 256];
        loop {
            tick.tick().await;
            // The shared limiter counts handshakes per second; no session resets it.
            self.limiter.reset_count();
            let mut out = Vec::new();
            {
                let mut st = self.lock();
                let now = Instant::now();
                for p in st.peers.values_mut() {
                    if let (TunnResult::WriteToNetwork(pkt), Some(ep)) =
                        (p.tunn.update_timers(&mut buf), p.config.endpoint)
                    {
                        out.push((pkt.to_vec(), ep));
                    }
                    // No direct path: knock again at every address the peer may be at.
                    if !p.live(now) && now >= p.next_knock {
                        p.next_knock = now + KNOCK_EVERY;
                        if let TunnResult::WriteToNetwork(pkt) =
                            p.tunn.format_handshake_initiation(&mut buf, true)
                        {
                            let pkt = pkt.to_vec();
                            out.extend(p.knock_targets().into_iter().map(|ep| (pkt.clone(), ep)));
                        }
                    }
                }
                let expired: Vec<u32> = st
                    .invites
                    .iter()
                    .filter(|(_, s)| s.started.elapsed() > INVITE_SESSION_LIFETIME)
                    .map(|(i, _)| *i)
                    .collect();
                for i in expired {
                    st.invites.remove(&i);
                    st.slots.remove(&i);
                }
                for s in st.invites.values_mut() {
                    if let TunnResult::WriteToNetwork(pkt) = s.tunn.update_timers(&mut buf) {
                        out.push((pkt.to_vec(), s.endpoint));
                    }
                }
            }
            self.send_all(out).await;
        }
    }
}

impl Tunnel {
    fn count_refused_handshake(&self) {
        static LOG: crate::base::logging::Throttle =
            crate::base::logging::Throttle::new(Duration::from_secs(10));
        self.handshakes_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(held) = LOG.allow() {
            log::debug!("refused a handshake before key work ({held} more since the last line)");
        }
    }
}

/// After a `WriteToNetwork`, boringtun may hold queued packets: flush them.
fn drain(tunn: &mut Tunn, tx: &mut [u8], to: SocketAddr, out: &mut Vec<(Vec<u8>, SocketAddr)>) {
    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], tx) {
        out.push((p.to_vec(), to));
    }
}
