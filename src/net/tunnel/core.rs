//! The tunnel's state machine, without I/O: the peers' boringtun `Tunn`s and their slots
//! (receiver indices), invite sessions, the routes, the source-ownership (spoof) check,
//! the choice of path (direct, or through the host, which forwards between members), and
//! knocking at a peer's candidate endpoints until a direct session forms. The shell feeds
//! it datagrams ([`Core::handle_input`]), packets read from the TUN device
//! ([`Core::handle_packet`]) and timeouts ([`Core::handle_timeout`] when
//! [`Core::poll_timeout`] says), always with `now`, and performs what it appends to an
//! [`Output`]: datagrams with their destination, packets for the TUN device, join and
//! gossip messages. It must not touch a socket, the TUN device or the clock, and it never
//! decides membership: the daemon adds and removes peers.
//!
//! Randomness (receiver indices) comes from the `RngCore` the caller gives, so tests are
//! deterministic. boringtun's own timers and cookies still read the clock inside `Tunn`;
//! the core's decisions (liveness, knocking, invite lifetimes, ticks) use `now` only.
//!
//! Anyone on the internet can send to the port, so a datagram first passes the [`Gate`]:
//! one boringtun `RateLimiter` shared by every session checks mac1 (and, under load, a
//! cookie bound to the source address) before any key is looked at, and the gate does the
//! Diffie-Hellman that names an initiator. The gate needs no `&mut`, so the shell runs it
//! outside the lock around the core.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::group::identity::Key;
use crate::net::routes::Routes;
use crate::net::wire;

/// The largest datagram or IP packet the core handles.
pub const BUF: usize = 65536;
/// Room for the largest packet plus WireGuard's 32 bytes: boringtun panics on less.
const SEALED_BUF: usize = BUF + 64;
/// How often boringtun's timers run and knocking is considered.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Keeps NAT mappings open between members.
const KEEPALIVE_SECS: u16 = 25;
/// A peer heard from within this long has a working direct path (keepalives every 25 s).
const LIVE: Duration = Duration::from_secs(40);
/// How often a peer without a direct path is sent a fresh handshake at its candidates.
pub const KNOCK_EVERY: Duration = Duration::from_secs(2);
const MAX_INVITE_SESSIONS: usize = 256;
/// WireGuard's message type 3: a cookie reply.
const COOKIE_REPLY: u8 = 3;
const INVITE_SESSION_LIFETIME: Duration = Duration::from_secs(120);
/// Handshakes per second answered without a cookie; past it, an initiator must prove its
/// source address first. Each handshake is counted twice (the gate's check, then the
/// session's own), so this lets about half as many through.
const HANDSHAKES_PER_SEC: u64 = 200;
/// A cookie reply is 64 bytes.
const COOKIE_REPLY_LEN: usize = 64;
/// WireGuard's overhead on a data packet; boringtun needs this much room past the packet.
const SEAL_OVERHEAD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(
        "no invite session {0}: it expired or was replaced by a newer one; the joiner has to \
         open the link again"
    )]
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

/// Packets laid end to end in one buffer, each with a tag (a destination, or nothing).
/// Cleared and refilled by its owner, it keeps its capacity: appending a packet copies
/// it but allocates nothing once the buffer has grown to a batch's size.
#[derive(Debug)]
pub struct Packets<T> {
    bytes: Vec<u8>,
    /// Start, length and tag of each packet in `bytes`.
    items: Vec<(usize, usize, T)>,
}

impl<T> Default for Packets<T> {
    fn default() -> Self {
        Packets {
            bytes: Vec::new(),
            items: Vec::new(),
        }
    }
}

impl<T: Copy> Packets<T> {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn push(&mut self, packet: &[u8], tag: T) {
        self.items.push((self.bytes.len(), packet.len(), tag));
        self.bytes.extend_from_slice(packet);
    }

    /// Each packet with its tag, in the order they were appended.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], T)> + '_ {
        self.items.iter().map(|&(start, len, tag)| {
            // Ranges were recorded as the bytes were appended, so they are in bounds.
            (self.bytes.get(start..start + len).unwrap_or_default(), tag)
        })
    }
}

/// A run of packets that lie back to back in a [`Packets`] buffer and leave as one UDP
/// segmentation (GSO) send: the same tag, every packet `segment` bytes but the last,
/// which may be shorter.
#[derive(Debug, PartialEq, Eq)]
pub struct Run<'a, T> {
    pub bytes: &'a [u8],
    pub segment: usize,
    pub count: usize,
    pub tag: T,
}

impl<T: Copy + PartialEq> Packets<T> {
    /// The packets in order, grouped into the longest runs the kernel can segment: at
    /// most `max_count` packets and `max_bytes` bytes each. Order is kept: a run ends at
    /// the first packet that cannot join it.
    pub fn runs(&self, max_count: usize, max_bytes: usize) -> Vec<Run<'_, T>> {
        let mut runs: Vec<Run<'_, T>> = Vec::new();
        // Where the last run starts in `bytes`, and whether a shorter packet ended it.
        let mut run_start = 0;
        let mut closed = true;
        for &(start, len, tag) in &self.items {
            if let Some(last) = runs.last_mut() {
                // Items are appended back to back, so a run's bytes stay contiguous.
                let joins = !closed
                    && len > 0
                    && last.tag == tag
                    && run_start + last.bytes.len() == start
                    && len <= last.segment
                    && last.count < max_count
                    && last.bytes.len() + len <= max_bytes;
                if joins {
                    last.bytes = self.bytes.get(run_start..start + len).unwrap_or_default();
                    last.count += 1;
                    closed = len < last.segment;
                    continue;
                }
            }
            run_start = start;
            closed = len == 0;
            runs.push(Run {
                bytes: self.bytes.get(start..start + len).unwrap_or_default(),
                segment: len,
                count: 1,
                tag,
            });
        }
        runs
    }
}

/// What handling inputs asks the shell to do, appended call after call until the shell
/// performs it and calls [`Output::clear`].
#[derive(Debug, Default)]
pub struct Output {
    /// Datagrams for the UDP socket, each with where to send it.
    pub transmits: Packets<SocketAddr>,
    /// Decrypted IP packets for the TUN device.
    pub tun: Packets<()>,
    /// Join messages from invite sessions, for the daemon's join handler.
    pub invites: Vec<InviteMessage>,
    /// Gossip addressed to this node, for the daemon's gossip handler.
    pub gossip: Vec<GossipIn>,
    /// A peer's endpoint moved (the daemon re-announces where members are).
    pub roamed: bool,
}

impl Output {
    pub fn clear(&mut self) {
        self.transmits.clear();
        self.tun.clear();
        self.invites.clear();
        self.gossip.clear();
        self.roamed = false;
    }
}

/// The checks every datagram passes before the core's state is looked at: mac1 and,
/// under load, a cookie, then for an initiation the Diffie-Hellman that names its sender.
/// Shared by reference, so the shell runs it outside the lock around the core.
pub struct Gate {
    secret: StaticSecret,
    public: PublicKey,
    /// Shared by every session: mac1 and cookies, and the count of handshakes per second.
    limiter: Arc<RateLimiter>,
    /// Handshake-shaped datagrams dropped before any key work.
    refused: AtomicU64,
}

/// A datagram that passed the [`Gate`]; only the gate makes one, so the core cannot be
/// handed a datagram that skipped it.
pub struct Screened {
    /// The static key of a handshake initiation's sender.
    initiator: Option<Key>,
}

impl Gate {
    pub fn new(secret: StaticSecret) -> Gate {
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SEC));
        Gate {
            secret,
            public,
            limiter,
            refused: AtomicU64::new(0),
        }
    }

    /// `None` when the datagram goes no further (a cookie reply may be appended to `out`
    /// for a handshake refused under load).
    pub fn screen(&self, from: SocketAddr, datagram: &[u8], out: &mut Output) -> Option<Screened> {
        // mac1 first, and under load a cookie: a flood of handshake-shaped datagrams
        // costs a keyed hash each and never reaches the X25519 below or the core.
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(reply)) => {
                out.transmits.push(reply, from);
                self.count_refused();
                return None;
            }
            Err(_) => {
                if datagram.first().is_some_and(|t| matches!(t, 1 | 2)) {
                    self.count_refused();
                }
                return None;
            }
        };
        let initiator = match &packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.secret, &self.public, init) {
                    Ok(half) => Some(half.peer_static_public),
                    Err(_) => return None,
                }
            }
            _ => None,
        };
        Some(Screened { initiator })
    }

    /// Handshake-shaped datagrams dropped before any key work: a bad mac1, or no valid
    /// cookie while under load.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn count_refused(&self) {
        static LOG: crate::base::logging::Throttle =
            crate::base::logging::Throttle::new(Duration::from_secs(10));
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(held) = LOG.allow() {
            log::debug!("refused a handshake before key work ({held} more since the last line)");
        }
    }
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
        self.config.endpoint.is_some()
            && self
                .last_rx
                .is_some_and(|t| now.saturating_duration_since(t) < LIVE)
    }

    /// Every address worth a handshake: candidates first, then the last one seen.
    fn knock_targets(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let last = self
            .config
            .endpoint
            .filter(|ep| !self.config.candidates.contains(ep));
        self.config.candidates.iter().copied().chain(last)
    }

    /// Appends `datagram` once per knock target.
    fn knock(&self, datagram: &[u8], out: &mut Output) {
        for ep in self.knock_targets() {
            out.transmits.push(datagram, ep);
        }
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

/// Who is who: the state every input consults, apart from the scratch buffers so that a
/// packet decrypted into one can be encrypted from it into the other.
#[derive(Default)]
struct Table {
    peers: HashMap<Key, Peer>,
    slots: HashMap<u32, Slot>,
    invites: HashMap<u32, InviteSession>,
    invite_keys: HashSet<Key>,
    routes: Routes<Key>,
    /// This node's VPN address.
    me: Option<Ipv4Addr>,
    /// The host's key, on members; `None` on the host itself, which forwards.
    host: Option<Key>,
}

impl Table {
    /// A 24-bit index not in use: boringtun puts it in the top bits of its session ids.
    fn new_index(&self, rng: &mut dyn RngCore) -> u32 {
        loop {
            let i = rng.next_u32() >> 8;
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

    fn path(&self, key: &Key, now: Instant) -> PathKind {
        let Some(p) = self.peers.get(key) else {
            return PathKind::Down;
        };
        let carrier = self.carrier(key, now);
        if p.live(now) {
            PathKind::Direct
        } else if carrier != *key && self.peers.get(&carrier).is_some_and(|c| c.live(now)) {
            PathKind::ViaHost
        } else {
            PathKind::Down
        }
    }

    /// Encrypts an IP packet for the peer that owns `dst` and appends it with its
    /// destination: the endpoint of a session that has heard back, else every knock target
    /// (then the datagram is a handshake and the packet waits in boringtun's queue).
    fn encapsulate(
        &mut self,
        now: Instant,
        packet: &[u8],
        dst: Ipv4Addr,
        sealed: &mut [u8],
        out: &mut Output,
    ) {
        if packet.len() + SEAL_OVERHEAD > sealed.len() {
            return;
        }
        let Some(owner) = self.routes.owner(dst).copied() else {
            return;
        };
        let carrier = self.carrier(&owner, now);
        let Some(peer) = self.peers.get_mut(&carrier) else {
            return;
        };
        if let TunnResult::WriteToNetwork(p) = peer.tunn.encapsulate(packet, sealed) {
            peer.tx_bytes += packet.len() as u64;
            match peer.config.endpoint {
                Some(ep) if peer.last_rx.is_some() => out.transmits.push(p, ep),
                // No session yet: `p` is a handshake; try every address we know.
                _ => peer.knock(p, out),
            }
        }
    }
}

/// The tunnel's whole state; see the module header.
pub struct Core {
    gate: Arc<Gate>,
    secret: StaticSecret,
    rng: Box<dyn RngCore + Send>,
    table: Table,
    spoofed: u64,
    forwarded: u64,
    local_gossip_dropped: u64,
    next_tick: Instant,
    /// Where datagrams are decrypted.
    plain: Vec<u8>,
    /// Where packets are encrypted.
    sealed: Vec<u8>,
}

impl Core {
    /// A core whose first tick is due at `now`.
    pub fn new(secret: StaticSecret, rng: Box<dyn RngCore + Send>, now: Instant) -> Core {
        Core {
            gate: Arc::new(Gate::new(secret.clone())),
            secret,
            rng,
            table: Table::default(),
            spoofed: 0,
            forwarded: 0,
            local_gossip_dropped: 0,
            next_tick: now,
            plain: vec![0u8; BUF],
            sealed: vec![0u8; SEALED_BUF],
        }
    }

    /// The gate datagrams pass first; the shell keeps a handle to run it without the core.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// This node's VPN address, and the host's key when this node is a member.
    pub fn set_local(&mut self, me: Ipv4Addr, host: Option<Key>) {
        self.table.me = Some(me);
        self.table.host = host;
    }

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&mut self, keys: HashSet<Key>) {
        self.table.invite_keys = keys;
    }

    /// Adds a peer and knocks at it, or updates the name, address and candidates of one
    /// already there without touching its session.
    pub fn upsert_peer(&mut self, now: Instant, config: PeerConfig, out: &mut Output) {
        let t = &mut self.table;
        if let Some(p) = t.peers.get_mut(&config.public_key) {
            let moved = p.config.address != config.address;
            p.config.name = config.name;
            p.config.candidates = config.candidates;
            if p.config.endpoint.is_none() {
                p.config.endpoint = config.endpoint;
            }
            if moved {
                p.config.address = config.address;
                let key = config.public_key;
                t.routes.remove_owner(&key);
                if let Ok(net) = Ipv4Net::new(config.address, 32) {
                    t.routes.insert(net, key);
                }
            }
            return;
        }
        let index = t.new_index(&mut *self.rng);
        let key = config.public_key;
        let mut peer = Peer {
            tunn: Tunn::new(
                self.secret.clone(),
                PublicKey::from(key),
                None,
                Some(KEEPALIVE_SECS),
                index,
                Some(self.gate.limiter.clone()),
            ),
            config,
            index,
            rx_bytes: 0,
            tx_bytes: 0,
            last_rx: None,
            next_knock: now + KNOCK_EVERY,
        };
        if let TunnResult::WriteToNetwork(p) = peer
            .tunn
            .format_handshake_initiation(&mut self.sealed, false)
        {
            peer.knock(p, out);
        }
        t.slots.insert(index, Slot::Peer(key));
        let taken = t
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
            t.routes.insert(net, key);
        }
        t.peers.insert(key, peer);
    }

    pub fn remove_peer(&mut self, key: &Key) -> bool {
        let t = &mut self.table;
        match t.peers.remove(key) {
            Some(p) => {
                t.slots.remove(&p.index);
                t.routes.remove_owner(key);
                true
            }
            None => false,
        }
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.table.peers.keys().copied().collect()
    }

    /// Peers a message can be sent to now, directly or through the host.
    pub fn reachable(&self, now: Instant) -> Vec<Key> {
        let t = &self.table;
        t.peers
            .keys()
            .filter(|k| t.peers.get(&t.carrier(k, now)).is_some_and(|p| p.live(now)))
            .copied()
            .collect()
    }

    /// Every peer as `status` shows it, by address; `unix_now` dates the handshakes.
    pub fn status(&self, now: Instant, unix_now: u64) -> Vec<PeerStatus> {
        let t = &self.table;
        let mut v: Vec<PeerStatus> = t
            .peers
            .iter()
            .map(|(k, p)| {
                let (since, _, _, _, rtt) = p.tunn.stats();
                let ago = since.map(|d| d.as_secs());
                PeerStatus {
                    name: p.config.name.clone(),
                    public_key: *k,
                    address: p.config.address,
                    endpoint: p.config.endpoint,
                    path: t.path(k, now),
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

    /// Packets from other members that claimed an address they do not own.
    pub fn spoofed(&self) -> u64 {
        self.spoofed
    }

    /// Packets this node passed on between two other members.
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Gossip datagrams another program on this machine tried to send as this daemon.
    pub fn local_gossip_dropped(&self) -> u64 {
        self.local_gossip_dropped
    }

    /// Encrypts a join answer for an invite session.
    pub fn send_invite_reply(
        &mut self,
        session: u32,
        packet: &[u8],
        out: &mut Output,
    ) -> Result<(), CoreError> {
        let s = self
            .table
            .invites
            .get_mut(&session)
            .ok_or(CoreError::FindInviteSession(session))?;
        if packet.len() + SEAL_OVERHEAD > self.sealed.len() {
            return Ok(());
        }
        if let TunnResult::WriteToNetwork(p) = s.tunn.encapsulate(packet, &mut self.sealed) {
            out.transmits.push(p, s.endpoint);
        }
        Ok(())
    }

    /// Encrypts a gossip datagram for member `to`, directly or through the host.
    pub fn send_gossip(&mut self, now: Instant, to: &Key, payload: &[u8], out: &mut Output) {
        let t = &mut self.table;
        let (Some(me), Some(dst)) = (t.me, t.peers.get(to).map(|p| p.config.address)) else {
            return;
        };
        let Ok(packet) = wire::encode_udp(me, dst, wire::GOSSIP_PORT, payload) else {
            log::warn!("gossip message too large ({} bytes)", payload.len());
            return;
        };
        t.encapsulate(now, &packet, dst, &mut self.sealed, out);
    }

    /// A datagram from the UDP socket: the gate's checks, then [`Core::handle_screened`].
    pub fn handle_input(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Output,
    ) {
        if let Some(screened) = self.gate.screen(from, datagram, out) {
            self.handle_screened(now, from, datagram, screened, out);
        }
    }

    /// A datagram that passed the gate (which the shell runs outside its lock).
    pub fn handle_screened(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        screened: Screened,
        out: &mut Output,
    ) {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return;
        };
        let receiver = match &packet {
            Packet::HandshakeInit(_) => None,
            Packet::HandshakeResponse(p) => Some(p.receiver_idx),
            Packet::PacketCookieReply(p) => Some(p.receiver_idx),
            Packet::PacketData(p) => Some(p.receiver_idx),
        };
        let slot = match receiver {
            Some(idx) => match self.table.slots.get(&(idx >> 8)) {
                Some(s) => *s,
                None => return,
            },
            None => {
                let Some(key) = screened.initiator else {
                    return;
                };
                if self.table.peers.contains_key(&key) {
                    Slot::Peer(key)
                } else if self.table.invite_keys.contains(&key) {
                    Slot::Invite(self.invite_session_for(now, key, from))
                } else {
                    log::debug!("handshake from an unknown key at {from}");
                    return;
                }
            }
        };
        match slot {
            Slot::Peer(key) => self.handle_peer_datagram(now, key, from, datagram, out),
            Slot::Invite(idx) => self.handle_invite_datagram(idx, from, datagram, out),
        }
    }

    /// Datagrams that passed the gate, one after the other: the shell locks the core once
    /// for a whole batch read from the socket.
    pub fn handle_screened_batch<'a>(
        &mut self,
        now: Instant,
        batch: impl IntoIterator<Item = (SocketAddr, &'a [u8], Screened)>,
        out: &mut Output,
    ) {
        for (from, datagram, screened) in batch {
            self.handle_screened(now, from, datagram, screened, out);
        }
    }

    /// Packets read from the TUN device (segments of a super-packet, or several reads),
    /// one after the other under one lock.
    pub fn handle_packets<'a>(
        &mut self,
        now: Instant,
        packets: impl IntoIterator<Item = &'a [u8]>,
        out: &mut Output,
    ) {
        for p in packets {
            self.handle_packet(now, p, out);
        }
    }

    /// A packet read from the TUN device: only this node's own, and never gossip.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8], out: &mut Output) {
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(packet) else {
            return;
        };
        let Some(src) = packet
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(Ipv4Addr::from)
        else {
            return;
        };
        // Only this node speaks from the TUN device: a packet the kernel forwarded in with
        // a member's source (from a container, say) would pass for it.
        if self.table.me != Some(src) {
            return;
        }
        // Gossip is the daemon's own (sent by `send_gossip`, never through the kernel): a
        // datagram to the gossip port from the TUN device comes from some other program on
        // this machine.
        if wire::decode_udp(packet).is_some_and(|u| u.port == wire::GOSSIP_PORT) {
            self.local_gossip_dropped += 1;
            return;
        }
        self.table
            .encapsulate(now, packet, dst, &mut self.sealed, out);
    }

    /// When [`Core::handle_timeout`] has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick)
    }

    /// boringtun's timers for every session, knocking at peers without a direct path, and
    /// expiry of invite sessions; nothing before the tick is due.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Output) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        // The shared limiter counts handshakes per second; no session resets it.
        self.gate.limiter.reset_count();
        let t = &mut self.table;
        for p in t.peers.values_mut() {
            if let (TunnResult::WriteToNetwork(pkt), Some(ep)) =
                (p.tunn.update_timers(&mut self.sealed), p.config.endpoint)
            {
                out.transmits.push(pkt, ep);
            }
            // No direct path: knock again at every address the peer may be at.
            if !p.live(now) && now >= p.next_knock {
                p.next_knock = now + KNOCK_EVERY;
                if let TunnResult::WriteToNetwork(pkt) =
                    p.tunn.format_handshake_initiation(&mut self.sealed, true)
                {
                    p.knock(pkt, out);
                }
            }
        }
        let slots = &mut t.slots;
        t.invites.retain(|i, s| {
            let keep = now.saturating_duration_since(s.started) <= INVITE_SESSION_LIFETIME;
            if !keep {
                slots.remove(i);
            }
            keep
        });
        for s in t.invites.values_mut() {
            if let TunnResult::WriteToNetwork(pkt) = s.tunn.update_timers(&mut self.sealed) {
                out.transmits.push(pkt, s.endpoint);
            }
        }
    }

    fn handle_invite_datagram(
        &mut self,
        idx: u32,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Output,
    ) {
        let Some(s) = self.table.invites.get_mut(&idx) else {
            return;
        };
        match s
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.plain)
        {
            TunnResult::WriteToNetwork(p) => {
                out.transmits.push(p, from);
                drain(&mut s.tunn, &mut self.sealed, from, out);
                s.endpoint = from;
            }
            // Never the TUN device: a joiner is not a member yet, its packets are only
            // ever join messages for the daemon to read.
            TunnResult::WriteToTunnelV4(p, _) => {
                s.endpoint = from;
                out.invites.push(InviteMessage {
                    session: idx,
                    invite_key: s.invite_key,
                    from,
                    packet: p.to_vec(),
                });
            }
            _ => {}
        }
    }

    fn handle_peer_datagram(
        &mut self,
        now: Instant,
        key: Key,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Output,
    ) {
        let (me, host) = (self.table.me, self.table.host);
        let Some(peer) = self.table.peers.get_mut(&key) else {
            return;
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
        let res = peer
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.plain);
        // Only an authenticated packet may move a peer's endpoint (roaming) or keep its
        // path alive. A cookie reply, and the cookie boringtun answers an unverified
        // handshake with when under load, prove nothing about the sender.
        let authenticated = match &res {
            TunnResult::Err(e) => {
                log::trace!("packet from {from} rejected: {e:?}");
                return;
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
                out.roamed = true;
            }
        }
        let (packet, src) = match res {
            TunnResult::WriteToNetwork(p) => {
                out.transmits.push(p, from);
                drain(&mut peer.tunn, &mut self.sealed, from, out);
                return;
            }
            TunnResult::WriteToTunnelV4(p, src) => (p, src),
            _ => return,
        };
        peer.rx_bytes += packet.len() as u64;
        // The source must belong to the sender, except that the host relays for members.
        let owner = self.table.routes.owner(src).copied();
        let relayed = host == Some(key) && owner.is_some();
        if owner != Some(key) && !relayed {
            self.spoofed += 1;
            log::debug!("dropped a packet from {} claiming {src}", peer.config.name);
            return;
        }
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(packet) else {
            return;
        };
        if Some(dst) == me {
            match wire::decode_udp(packet) {
                Some(udp) if udp.port == wire::GOSSIP_PORT => {
                    if let Some(from) = owner {
                        out.gossip.push(GossipIn {
                            from,
                            payload: udp.payload.to_vec(),
                        });
                    }
                }
                _ => out.tun.push(packet, ()),
            }
            return;
        }
        // The host passes packets on between members that have no direct path.
        if host.is_none() && self.table.routes.owner(dst).is_some_and(|o| *o != key) {
            self.forwarded += 1;
            self.table
                .encapsulate(now, packet, dst, &mut self.sealed, out);
            return;
        }
        // Anything else is not for this node: handing it to the kernel would let a member
        // reach whatever this machine routes to.
        log::debug!("dropped a packet from {} for {dst}", peer.config.name);
    }

    /// One session per invite holder and endpoint, so concurrent joiners using the same
    /// link get separate sessions and separate answers.
    fn invite_session_for(&mut self, now: Instant, key: Key, from: SocketAddr) -> u32 {
        let t = &mut self.table;
        if let Some((idx, _)) = t
            .invites
            .iter()
            .find(|(_, s)| s.invite_key == key && s.endpoint == from)
        {
            return *idx;
        }
        if t.invites.len() >= MAX_INVITE_SESSIONS {
            if let Some(oldest) = t
                .invites
                .iter()
                .min_by_key(|(_, s)| s.started)
                .map(|(i, _)| *i)
            {
                t.invites.remove(&oldest);
                t.slots.remove(&oldest);
            }
        }
        let idx = t.new_index(&mut *self.rng);
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            None,
            idx,
            Some(self.gate.limiter.clone()),
        );
        t.invites.insert(
            idx,
            InviteSession {
                tunn,
                invite_key: key,
                endpoint: from,
                started: now,
            },
        );
        t.slots.insert(idx, Slot::Invite(idx));
        idx
    }
}

/// After a `WriteToNetwork`, boringtun may hold queued packets: flush them.
fn drain(tunn: &mut Tunn, sealed: &mut [u8], to: SocketAddr, out: &mut Output) {
    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], sealed) {
        out.transmits.push(p, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::VecDeque;

    fn vpn(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, last)
    }

    fn udp_addr(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], 51820))
    }

    fn secret(n: u8) -> StaticSecret {
        StaticSecret::from([n; 32])
    }

    fn key(n: u8) -> Key {
        PublicKey::from(&secret(n)).to_bytes()
    }

    /// An IPv4/UDP packet that is not gossip.
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        wire::encode_udp(src, dst, 5000, payload).unwrap()
    }

    fn peer(n: u8, endpoint: Option<SocketAddr>, candidates: Vec<SocketAddr>) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            name: format!("node{n}"),
            address: vpn(n),
            endpoint,
            candidates,
        }
    }

    /// Node `n`: key `[n; 32]`, VPN address 100.64.0.n, UDP at 192.0.2.n.
    struct Node {
        addr: SocketAddr,
        core: Core,
        tun: Vec<Vec<u8>>,
        gossip: Vec<GossipIn>,
        invites: Vec<InviteMessage>,
    }

    /// An in-memory network between nodes' UDP addresses. A datagram to an address no
    /// node has, or between a blocked pair (either way), is lost; every one sent is
    /// recorded with its WireGuard message type.
    struct Net {
        nodes: Vec<Node>,
        blocked: Vec<(SocketAddr, SocketAddr)>,
        queue: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
        sent: Vec<(SocketAddr, SocketAddr, u8)>,
    }

    impl Net {
        fn new(ns: &[u8], t0: Instant) -> Net {
            let nodes = ns
                .iter()
                .map(|&n| Node {
                    addr: udp_addr(n),
                    core: Core::new(secret(n), Box::new(StdRng::seed_from_u64(n.into())), t0),
                    tun: Vec::new(),
                    gossip: Vec::new(),
                    invites: Vec::new(),
                })
                .collect();
            Net {
                nodes,
                blocked: Vec::new(),
                queue: VecDeque::new(),
                sent: Vec::new(),
            }
        }

        fn collect(&mut self, i: usize, out: &mut Output) {
            let from = self.nodes[i].addr;
            for (p, to) in out.transmits.iter() {
                self.sent.push((from, to, p[0]));
                self.queue.push_back((from, to, p.to_vec()));
            }
            let node = &mut self.nodes[i];
            node.tun.extend(out.tun.iter().map(|(p, ())| p.to_vec()));
            node.gossip.append(&mut out.gossip);
            node.invites.append(&mut out.invites);
            out.clear();
        }

        /// Runs `f` on node `i`'s core and collects what it asked for.
        fn act(&mut self, i: usize, f: impl FnOnce(&mut Core, &mut Output)) {
            let mut out = Output::default();
            f(&mut self.nodes[i].core, &mut out);
            self.collect(i, &mut out);
        }

        /// Delivers datagrams, and the answers they cause, until none is left.
        fn run(&mut self, now: Instant) {
            let mut out = Output::default();
            for _ in 0..10_000 {
                let Some((from, to, bytes)) = self.queue.pop_front() else {
                    return;
                };
                if self
                    .blocked
                    .iter()
                    .any(|&(a, b)| (a, b) == (from, to) || (b, a) == (from, to))
                {
                    continue;
                }
                let Some(j) = self.nodes.iter().position(|n| n.addr == to) else {
                    continue;
                };
                self.nodes[j].core.handle_input(now, from, &bytes, &mut out);
                self.collect(j, &mut out);
            }
            panic!("the datagrams never settled");
        }

        /// Every node's timeout at `now`, then delivery.
        fn tick(&mut self, now: Instant) {
            for i in 0..self.nodes.len() {
                self.act(i, |c, o| c.handle_timeout(now, o));
            }
            self.run(now);
        }

        /// Node `i` sends `packet` as if read from its TUN device; returns where its
        /// datagrams went.
        fn send(&mut self, i: usize, now: Instant, packet: &[u8]) -> Vec<SocketAddr> {
            let mark = self.sent.len();
            self.act(i, |c, o| c.handle_packet(now, packet, o));
            let to = self.sent[mark..].iter().map(|&(_, to, _)| to).collect();
            self.run(now);
            to
        }

        fn path(&self, i: usize, to: u8, now: Instant) -> PathKind {
            self.nodes[i].core.table.path(&key(to), now)
        }

        /// Handshake initiations node `i` sent since `mark`, by destination.
        fn knocks_since(&self, mark: usize, i: usize) -> Vec<SocketAddr> {
            let from = self.nodes[i].addr;
            self.sent[mark..]
                .iter()
                .filter(|&&(f, _, t)| f == from && t == 1)
                .map(|&(_, to, _)| to)
                .collect()
        }
    }

    /// Host 1 and members 2 and 3, every pair told of the other; the members know each
    /// other only by candidates (they must knock).
    fn host_and_two_members(t0: Instant) -> Net {
        let mut net = Net::new(&[1, 2, 3], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
            c.upsert_peer(t0, peer(3, Some(udp_addr(3)), vec![]), o);
        });
        for (i, n, other) in [(1, 2, 3), (2, 3, 2)] {
            net.act(i, |c, o| {
                c.set_local(vpn(n), Some(key(1)));
                c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
                c.upsert_peer(t0, peer(other, None, vec![udp_addr(other)]), o);
            });
        }
        net
    }

    #[test]
    fn two_cores_complete_a_handshake_and_carry_an_ip_packet_both_ways() {
        let t0 = Instant::now();
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), Some(key(1)));
            c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
        });
        net.run(t0);
        assert_eq!(net.path(0, 2, t0), PathKind::Direct);
        assert_eq!(net.path(1, 1, t0), PathKind::Direct);

        let there = ip(vpn(1), vpn(2), b"from one");
        assert_eq!(net.send(0, t0, &there), vec![udp_addr(2)]);
        assert_eq!(net.nodes[1].tun, vec![there]);
        let back = ip(vpn(2), vpn(1), b"from two");
        assert_eq!(net.send(1, t0, &back), vec![udp_addr(1)]);
        assert_eq!(net.nodes[0].tun, vec![back]);
        let status = net.nodes[1].core.status(t0, 0);
        assert_eq!(status[0].rx_bytes, net.nodes[1].tun[0].len() as u64);
    }

    #[test]
    fn a_batch_of_tun_packets_and_of_datagrams_is_handled_in_order_with_each_packet_checked() {
        let t0 = Instant::now();
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), Some(key(1)));
            c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
        });
        net.run(t0);
        let a = ip(vpn(1), vpn(2), b"first");
        // Not this node's source: the TUN check drops it, and only it.
        let forged = ip(vpn(3), vpn(2), b"forged");
        let b = ip(vpn(1), vpn(2), &[7u8; 1200]);
        let c = ip(vpn(1), vpn(2), b"third");
        let mut out = Output::default();
        net.nodes[0]
            .core
            .handle_packets(t0, [&a[..], &forged[..], &b[..], &c[..]], &mut out);
        let sent: Vec<(Vec<u8>, SocketAddr)> = out
            .transmits
            .iter()
            .map(|(p, to)| (p.to_vec(), to))
            .collect();
        assert_eq!(sent.len(), 3);
        assert!(sent.iter().all(|(_, to)| *to == udp_addr(2)));

        let mut into = Output::default();
        let receiver = &mut net.nodes[1].core;
        let gate = receiver.gate();
        let screened: Vec<_> = sent
            .iter()
            .map(|(p, _)| {
                let s = gate.screen(udp_addr(1), p, &mut into).unwrap();
                (udp_addr(1), &p[..], s)
            })
            .collect();
        receiver.handle_screened_batch(t0, screened, &mut into);
        let got: Vec<Vec<u8>> = into.tun.iter().map(|(p, ())| p.to_vec()).collect();
        assert_eq!(got, vec![a, b, c]);
    }

    #[test]
    fn runs_group_back_to_back_packets_of_one_destination_with_only_the_last_shorter() {
        let mut p: Packets<u8> = Packets::default();
        for (len, to) in [
            (100, 1),
            (100, 1),
            (60, 1),
            (100, 1),
            (100, 2),
            (100, 2),
            (120, 2),
        ] {
            p.push(&vec![len as u8; len], to);
        }
        let runs: Vec<(usize, usize, usize, u8)> = p
            .runs(64, 65_000)
            .iter()
            .map(|r| (r.bytes.len(), r.segment, r.count, r.tag))
            .collect();
        // A shorter packet ends its run; another destination, or a longer packet, starts
        // a new one.
        assert_eq!(
            runs,
            vec![
                (260, 100, 3, 1),
                (100, 100, 1, 1),
                (200, 100, 2, 2),
                (120, 120, 1, 2)
            ]
        );
        let by_count: Vec<usize> = p.runs(2, 65_000).iter().map(|r| r.count).collect();
        assert_eq!(by_count, vec![2, 1, 1, 2, 1]);
        let by_bytes: Vec<usize> = p.runs(64, 250).iter().map(|r| r.count).collect();
        assert_eq!(by_bytes, vec![2, 1, 1, 2, 1]);
        // The runs' bytes are the packets' bytes, in order.
        let joined: Vec<u8> = p
            .runs(64, 65_000)
            .iter()
            .flat_map(|r| r.bytes.to_vec())
            .collect();
        let direct: Vec<u8> = p.iter().flat_map(|(b, _)| b.to_vec()).collect();
        assert_eq!(joined, direct);
    }

    #[test]
    fn a_packet_whose_source_the_sender_does_not_own_is_dropped_and_counted() {
        let t0 = Instant::now();
        // Node 2 is the host; node 1 a member gone bad; node 3 a member whose address it
        // claims (known to the host, not on this network).
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), Some(key(2)));
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), None);
            c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
            c.upsert_peer(t0, peer(3, None, vec![]), o);
        });
        net.run(t0);
        // The bad member's own check on TUN packets is bypassed: it encrypts by hand.
        for forged in [
            ip(vpn(3), vpn(2), b"as another member"),
            ip(Ipv4Addr::new(10, 9, 9, 9), vpn(2), b"as nobody"),
        ] {
            net.act(0, |c, o| {
                c.table.encapsulate(t0, &forged, vpn(2), &mut c.sealed, o);
            });
            net.run(t0);
        }
        assert_eq!(net.nodes[1].core.spoofed(), 2);
        assert!(net.nodes[1].tun.is_empty(), "a forged packet reached TUN");

        let honest = ip(vpn(1), vpn(2), b"as itself");
        net.send(0, t0, &honest);
        assert_eq!(net.nodes[1].tun, vec![honest]);
        assert_eq!(net.nodes[1].core.spoofed(), 2);
    }

    #[test]
    fn with_no_live_direct_session_a_member_sends_through_the_host_and_switches_to_direct_once_it_is_alive(
    ) {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.blocked.push((udp_addr(2), udp_addr(3)));
        net.run(t0);
        assert_eq!(net.path(1, 3, t0), PathKind::ViaHost);

        let first = ip(vpn(2), vpn(3), b"through the host");
        assert_eq!(net.send(1, t0, &first), vec![udp_addr(1)]);
        assert_eq!(net.nodes[2].tun, vec![first.clone()]);
        assert_eq!(net.nodes[0].core.forwarded(), 1);

        // The way opens; the next knock forms a direct session.
        net.blocked.clear();
        let t1 = t0 + KNOCK_EVERY;
        net.tick(t1);
        assert_eq!(net.path(1, 3, t1), PathKind::Direct);
        let second = ip(vpn(2), vpn(3), b"direct");
        assert_eq!(net.send(1, t1, &second), vec![udp_addr(3)]);
        assert_eq!(net.nodes[2].tun, vec![first, second]);
        assert_eq!(
            net.nodes[0].core.forwarded(),
            1,
            "the host still carried it"
        );
    }

    #[test]
    fn a_direct_session_not_heard_from_for_forty_seconds_falls_back_to_the_host() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        assert_eq!(net.path(1, 3, t0), PathKind::Direct);
        // The host was heard from later; the member was not.
        let later = t0 + LIVE;
        net.nodes[1]
            .core
            .table
            .peers
            .get_mut(&key(1))
            .unwrap()
            .last_rx = Some(later);
        assert_eq!(net.path(1, 3, later), PathKind::ViaHost);
        assert_eq!(
            net.send(1, later, &ip(vpn(2), vpn(3), b"x")),
            vec![udp_addr(1)]
        );
    }

    #[test]
    fn the_host_forwards_packets_between_two_members_both_ways_and_keeps_none() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.blocked.push((udp_addr(2), udp_addr(3)));
        net.run(t0);
        let there = ip(vpn(2), vpn(3), b"to three");
        net.send(1, t0, &there);
        let back = ip(vpn(3), vpn(2), b"to two");
        net.send(2, t0, &back);
        assert_eq!(net.nodes[2].tun, vec![there]);
        assert_eq!(net.nodes[1].tun, vec![back]);
        assert_eq!(net.nodes[0].core.forwarded(), 2);
        assert!(
            net.nodes[0].tun.is_empty(),
            "the host wrote a member's packet to TUN"
        );
    }

    #[test]
    fn a_member_drops_a_packet_from_another_member_that_is_not_addressed_to_it() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        // Member 2 aims at an address only member 3 could route on to: 3 must not.
        let elsewhere = ip(vpn(2), Ipv4Addr::new(192, 168, 1, 1), b"beyond");
        net.act(1, |c, o| {
            c.table
                .routes
                .insert("192.168.1.0/24".parse().unwrap(), key(3));
            c.handle_packet(t0, &elsewhere, o);
        });
        net.run(t0);
        assert!(net.nodes[2].tun.is_empty());
        assert_eq!(net.nodes[2].core.spoofed(), 0);
        let to_it = ip(vpn(2), vpn(3), b"to it");
        net.send(1, t0, &to_it);
        assert_eq!(net.nodes[2].tun, vec![to_it]);
    }

    #[test]
    fn knocking_goes_to_every_candidate_every_two_seconds_until_a_session_forms() {
        let t0 = Instant::now();
        let mut net = Net::new(&[1, 2], t0);
        let candidates = vec![udp_addr(20), udp_addr(21), udp_addr(2)];
        net.blocked.push((udp_addr(1), udp_addr(2)));
        net.act(1, |c, o| {
            c.set_local(vpn(2), None);
            c.upsert_peer(t0, peer(1, None, vec![]), o);
        });
        net.act(0, |c, o| {
            c.set_local(vpn(1), None);
            c.upsert_peer(t0, peer(2, None, candidates.clone()), o);
        });
        net.run(t0);
        assert_eq!(net.knocks_since(0, 0), candidates);
        assert_eq!(net.path(0, 2, t0), PathKind::Down);

        let mark = net.sent.len();
        net.tick(t0 + Duration::from_secs(1));
        assert_eq!(
            net.knocks_since(mark, 0),
            Vec::<SocketAddr>::new(),
            "knocked too soon"
        );
        let mark = net.sent.len();
        net.tick(t0 + KNOCK_EVERY);
        assert_eq!(net.knocks_since(mark, 0), candidates);

        net.blocked.clear();
        let mark = net.sent.len();
        let t1 = t0 + 2 * KNOCK_EVERY;
        net.tick(t1);
        assert_eq!(net.knocks_since(mark, 0), candidates);
        assert_eq!(net.path(0, 2, t1), PathKind::Direct);
        let status = net.nodes[0].core.status(t1, 0);
        assert_eq!(status[0].endpoint, Some(udp_addr(2)));

        let mark = net.sent.len();
        net.tick(t1 + KNOCK_EVERY);
        net.tick(t1 + 2 * KNOCK_EVERY);
        assert_eq!(
            net.knocks_since(mark, 0),
            Vec::<SocketAddr>::new(),
            "knocked a live peer"
        );
    }

    /// A joiner holding invite key 9 opens a session with host 1 the way `net::join`
    /// does, with a bare `Tunn`; returns the host's core and the joiner's `Tunn`.
    fn invite_session(t0: Instant) -> (Core, Tunn) {
        let mut host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_local(vpn(1), None);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut joiner = Tunn::new(secret(9), PublicKey::from(&secret(1)), None, None, 7, None);
        let mut buf = vec![0u8; 2048];
        let mut out = Output::default();
        let TunnResult::WriteToNetwork(init) = joiner.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        host.handle_input(t0, udp_addr(9), init, &mut out);
        let answers: Vec<_> = out
            .transmits
            .iter()
            .map(|(p, to)| (p.to_vec(), to))
            .collect();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].1, udp_addr(9));
        let TunnResult::WriteToNetwork(keepalive) =
            joiner.decapsulate(Some(udp_addr(1).ip()), &answers[0].0, &mut buf)
        else {
            panic!("the host's answer did not complete the handshake");
        };
        out.clear();
        host.handle_input(t0, udp_addr(9), keepalive, &mut out);
        assert!(out.transmits.is_empty() && out.invites.is_empty() && out.tun.is_empty());
        (host, joiner)
    }

    #[test]
    fn an_invite_keyed_sessions_packets_become_invite_messages_never_tun_packets() {
        let t0 = Instant::now();
        let (mut host, mut joiner) = invite_session(t0);
        let mut buf = vec![0u8; 2048];
        let mut out = Output::default();
        let join =
            wire::encode_udp(wire::JOINER_ADDRESS, vpn(1), wire::JOIN_PORT, b"join").unwrap();
        // Even a packet shaped like member traffic to the host's own address.
        let member_like = ip(vpn(2), vpn(1), b"let me in");
        for packet in [&join, &member_like] {
            let TunnResult::WriteToNetwork(d) = joiner.encapsulate(packet, &mut buf) else {
                panic!("no session");
            };
            host.handle_input(t0, udp_addr(9), d, &mut out);
        }
        assert!(out.tun.is_empty(), "a joiner's packet reached TUN");
        let got: Vec<_> = out
            .invites
            .iter()
            .map(|m| (&m.packet, m.invite_key, m.from))
            .collect();
        assert_eq!(
            got,
            vec![
                (&join, key(9), udp_addr(9)),
                (&member_like, key(9), udp_addr(9))
            ]
        );

        // And the answer goes back in the same session.
        let session = out.invites[0].session;
        out.clear();
        host.send_invite_reply(session, &member_like, &mut out)
            .unwrap();
        let (reply, to) = out.transmits.iter().next().unwrap();
        assert_eq!(to, udp_addr(9));
        let reply = reply.to_vec();
        match joiner.decapsulate(Some(udp_addr(1).ip()), &reply, &mut buf) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &member_like[..]),
            other => panic!("the joiner could not open the answer: {other:?}"),
        }
    }

    #[test]
    fn an_invite_session_is_gone_once_its_lifetime_has_passed() {
        let t0 = Instant::now();
        let (mut host, _joiner) = invite_session(t0);
        let session = *host.table.invites.keys().next().unwrap();
        let mut out = Output::default();
        host.handle_timeout(t0 + INVITE_SESSION_LIFETIME, &mut out);
        assert!(host.send_invite_reply(session, b"x", &mut out).is_ok());
        host.handle_timeout(t0 + INVITE_SESSION_LIFETIME + TIMER_TICK, &mut out);
        assert!(matches!(
            host.send_invite_reply(session, b"x", &mut out),
            Err(CoreError::FindInviteSession(s)) if s == session
        ));
        assert!(host.table.slots.is_empty());
    }

    #[test]
    fn a_timeout_before_the_tick_poll_timeout_names_changes_nothing() {
        let t0 = Instant::now();
        let (mut host, _joiner) = invite_session(t0);
        let mut out = Output::default();
        let last = t0 + INVITE_SESSION_LIFETIME;
        host.handle_timeout(last, &mut out);
        assert_eq!(host.poll_timeout(), Some(last + TIMER_TICK));
        // Past the session's lifetime, but the tick is not due yet.
        host.handle_timeout(last + TIMER_TICK / 2, &mut out);
        assert_eq!(host.table.invites.len(), 1);
        assert_eq!(host.poll_timeout(), Some(last + TIMER_TICK));
        host.handle_timeout(last + TIMER_TICK, &mut out);
        assert!(host.table.invites.is_empty());
        assert_eq!(host.poll_timeout(), Some(last + 2 * TIMER_TICK));
    }

    #[test]
    fn a_handshake_from_a_key_neither_a_peer_nor_an_invite_gets_no_answer_and_no_session() {
        let t0 = Instant::now();
        let mut host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut stranger = Tunn::new(secret(8), PublicKey::from(&secret(1)), None, None, 7, None);
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) =
            stranger.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        let mut out = Output::default();
        host.handle_input(t0, udp_addr(8), init, &mut out);
        assert!(out.transmits.is_empty());
        assert!(host.table.invites.is_empty() && host.table.slots.is_empty());
        assert_eq!(host.gate.refused(), 0, "a valid mac1 is not a refusal");
    }

    #[test]
    fn a_handshake_with_a_bad_mac1_is_refused_at_the_gate_and_counted() {
        let t0 = Instant::now();
        let mut host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut forged = vec![0u8; 148];
        forged[0] = 1;
        let mut out = Output::default();
        host.handle_input(t0, udp_addr(8), &forged, &mut out);
        assert_eq!(host.gate.refused(), 1);
        assert!(out.transmits.is_empty());
        assert!(host.table.invites.is_empty());
    }

    #[test]
    fn gossip_to_this_node_is_handed_over_with_its_senders_key_and_never_written_to_tun() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        net.act(1, |c, o| c.send_gossip(t0, &key(3), b"news", o));
        net.run(t0);
        let got: Vec<_> = net.nodes[2]
            .gossip
            .iter()
            .map(|g| (g.from, g.payload.clone()))
            .collect();
        assert_eq!(got, vec![(key(2), b"news".to_vec())]);
        assert!(net.nodes[2].tun.is_empty());
    }

    #[test]
    fn a_tun_packet_with_another_source_or_to_the_gossip_port_is_not_sent() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        assert_eq!(net.send(1, t0, &ip(vpn(3), vpn(1), b"not mine")), vec![]);
        let gossip = wire::encode_udp(vpn(2), vpn(1), wire::GOSSIP_PORT, b"forged").unwrap();
        assert_eq!(net.send(1, t0, &gossip), vec![]);
        assert_eq!(net.nodes[1].core.local_gossip_dropped(), 1);
        assert_eq!(
            net.send(1, t0, &ip(vpn(2), vpn(1), b"mine")),
            vec![udp_addr(1)]
        );
        assert_eq!(net.nodes[0].tun.len(), 1);
    }

    #[test]
    fn a_peer_roams_to_where_an_authenticated_packet_came_from_and_a_replayed_one_moves_nothing() {
        let t0 = Instant::now();
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), Some(key(1)));
            c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
        });
        net.run(t0);
        let mut buf = vec![0u8; 2048];
        let peer_1 = net.nodes[1].core.table.peers.get_mut(&key(1)).unwrap();
        let TunnResult::WriteToNetwork(d) = peer_1.tunn.encapsulate(b"", &mut buf) else {
            panic!("no session");
        };
        let d = d.to_vec();
        let mut out = Output::default();
        // Node 2's NAT picked another port: the keepalive proves who sent it.
        net.nodes[0]
            .core
            .handle_input(t0, udp_addr(7), &d, &mut out);
        assert!(out.roamed);
        out.clear();
        // Someone who copied it replays it from elsewhere: its counter was seen.
        net.nodes[0]
            .core
            .handle_input(t0, udp_addr(6), &d, &mut out);
        assert!(!out.roamed);
        assert_eq!(
            net.nodes[0].core.status(t0, 0)[0].endpoint,
            Some(udp_addr(7))
        );
    }
}
