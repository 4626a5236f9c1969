//! The tunnel's state machine, without I/O: the peers' boringtun `Tunn`s and their slots
//! (receiver indices), invite sessions, the routes, the source-ownership (spoof) check,
//! the choice of path (direct, or through the host, which forwards between members), and
//! knocking at a peer's candidate endpoints until a direct session forms. The shell feeds
//! it batches of datagrams ([`Core::handle_screened_batch`]), of packets read from the
//! TUN device ([`Core::handle_packets`]) and timeouts ([`Core::handle_timeout`] when
//! [`Core::poll_timeout`] says), always with `now` and the caller's own crypto
//! [`Buffers`], and performs what it appends to an [`Output`]: datagrams with their
//! destination, packets for the TUN device, join and gossip messages. It must not touch
//! a socket, the TUN device or the clock, and it never decides membership: the daemon
//! adds and removes peers.
//!
//! Both families inside the tunnel: each peer owns its IPv4 VPN address and its inner
//! IPv6 address (the group's ULA, derived by `group::place::address6`), one /128 route
//! each; packets of either family are routed, checked for their source's owner and
//! forwarded by the host the same way. Gossip and join messages stay IPv4.
//!
//! Locks, so that the UDP and TUN loops decrypt and encrypt on two cores at once. The
//! table (peers by key, by receiver index and by address, invite sessions, routes) is an
//! immutable snapshot behind the table's lock: a batch holds that lock only to clone the
//! snapshot's `Arc`, and looks peers up in the clone; a change (a peer added or removed,
//! an invite session opened or expired, the tick) takes it to make a new snapshot, with
//! no crypto under it (a `Tunn`, whose creation does a Diffie-Hellman, is made on first
//! use under its own session's lock). Each peer's `Tunn`, endpoint, candidates and byte
//! counts sit behind that peer's own lock, taken once per batch for all of that peer's
//! datagrams or packets; whether a peer is live is an atomic, read without its lock.
//! Counters are atomics. The order: never two locks at once. The table's lock is
//! released before any peer's is taken, and a peer's before the table's or another
//! peer's; the host, which decrypts from one member and encrypts to another, does it in
//! two steps (decrypted packets wait in the caller's `Buffers` until the sender's lock
//! is released).
//!
//! Randomness (receiver indices) comes from the `RngCore` the caller gives, so tests are
//! deterministic. boringtun's own timers and cookies still read the clock inside `Tunn`;
//! the core's decisions (liveness, knocking, invite lifetimes, ticks, the initiation
//! limit) use `now` only.
//!
//! Anyone on the internet can send to the port, so a datagram first passes the [`Gate`]:
//! one boringtun `RateLimiter` shared by every session checks mac1 (and, under load, a
//! cookie bound to the source address) before any key is looked at, and the gate does the
//! Diffie-Hellman that names an initiator. The gate needs no `&mut` and no lock. A known
//! peer then gets at most one initiation answered per [`INITIATION_INTERVAL`]; the
//! extras are dropped before boringtun's own key work.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::base::lock::Recover;
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
pub const KEEPALIVE_SECS: u16 = 25;
/// A peer heard from within this long has a working direct path (keepalives every 25 s).
const LIVE: Duration = Duration::from_secs(40);
/// A peer sent data this long ago and not heard from since has no working path, however
/// recently it was heard before. Every peer of ours sends a persistent keepalive once it
/// has sent nothing for `KEEPALIVE_SECS` (25 s), so a live one is heard within that and
/// a timer tick of any moment; WireGuard's passive keepalive (an answer to data within
/// 10 s) is not enough to go by, since boringtun skips it when the data and its own last
/// send fall in one timer tick. Past this, packets go through the host and knocking
/// starts, so the first knock through once a cut ends brings the direct path back, where
/// before only 40 s without any packet ended it (issue 19, item 3).
const SILENT: Duration = Duration::from_secs(30);
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
/// Room for any handshake message (an initiation is 148 bytes), which boringtun may write
/// where a packet was to be sealed.
const HANDSHAKE_ROOM: usize = 256;
/// A known peer gets at most one handshake initiation answered per this long; the extras
/// are dropped before boringtun's Diffie-Hellman (four X25519 for an answered one). An
/// honest peer sends fresh initiations no closer together than our knocking
/// (`KNOCK_EVERY`, 2 s) or WireGuard's retry (REKEY_TIMEOUT, 5 s); copies of one knock
/// sent to several of our addresses arrive together, and only the first can succeed
/// anyway (the others repeat its timestamp). A fifth of REKEY_TIMEOUT stays under both,
/// so no honest retry is dropped, and holds a member gone bad to one answered handshake a
/// second. Only an answered initiation starts the interval: a replayed one, which
/// boringtun rejects, cannot shut the peer's own out.
pub const INITIATION_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Its inner IPv6 address, in the group's ULA /64.
    pub address6: Ipv6Addr,
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
    /// Its inner IPv6 address; absent in the JSON of a daemon older than inner IPv6.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
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

    /// A session with `key`, sharing the gate's limiter. `Tunn::new` does a
    /// Diffie-Hellman: callers hold the session's own lock, never the table's.
    fn new_tunn(&self, key: Key, index: u32, keepalive: Option<u16>) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            keepalive,
            index,
            Some(self.limiter.clone()),
        )
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

/// Where one loop decrypts and encrypts. Each caller that does crypto brings its own, so
/// no lock guards them and two loops never wait for each other's buffers.
pub struct Buffers {
    plain: Vec<u8>,
    sealed: Vec<u8>,
    /// Packets a batch decrypted for other members, sealed again once the sender's lock
    /// is released (the host forwards in two steps, never holding two peers).
    forward: Packets<IpAddr>,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            plain: vec![0u8; BUF],
            sealed: vec![0u8; SEALED_BUF],
            forward: Packets::default(),
        }
    }
}

/// Room to seal one packet of `len` bytes, or a handshake message: what the daemon's own
/// calls (a knock, a gossip message, a join answer) need, without a loop's 64 KiB.
fn sealed_for(len: usize) -> Vec<u8> {
    vec![0u8; (len + SEAL_OVERHEAD).max(HANDSHAKE_ROOM)]
}

/// Counters read by `status` without any lock.
#[derive(Default)]
struct Counters {
    spoofed: AtomicU64,
    forwarded: AtomicU64,
    local_gossip_dropped: AtomicU64,
    initiations_limited: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One peer: what the table shares about it, and its session behind its own lock.
struct PeerCell {
    index: u32,
    /// When a packet that proved a round trip last came: nanoseconds since `epoch` plus
    /// one, 0 for never. An atomic, so that path choice reads it without this peer's
    /// lock (and never holds two peers' locks to pick a carrier).
    last_rx: AtomicU64,
    /// When data first went to this peer since it was last heard from, on the same
    /// clock; 0 while nothing waits for an answer.
    unanswered: AtomicU64,
    epoch: Instant,
    state: Mutex<PeerState>,
}

impl PeerCell {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.locked()
    }

    fn last_rx(&self) -> Option<Instant> {
        match self.last_rx.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n - 1)),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
    }

    fn set_last_rx(&self, at: Instant) {
        self.last_rx.store(self.stamp(at), Ordering::Relaxed);
        self.unanswered.store(0, Ordering::Relaxed);
    }

    /// Data went to this peer at `at`: the first such since it was last heard from
    /// starts the wait for its answer. A load before the store keeps a busy path from
    /// writing the shared word with every packet.
    fn sent_data(&self, at: Instant) {
        if self.unanswered.load(Ordering::Relaxed) == 0 {
            self.unanswered.store(self.stamp(at), Ordering::Relaxed);
        }
    }

    /// A packet that proved a round trip came within [`LIVE`], and data sent since has
    /// not waited for an answer longer than [`SILENT`]. Only such a packet sets `last_rx`,
    /// and it sets the endpoint too, so a live peer has one.
    fn live(&self, now: Instant) -> bool {
        let waiting = match self.unanswered.load(Ordering::Relaxed) {
            0 => false,
            n => now.saturating_duration_since(self.epoch + Duration::from_nanos(n - 1)) > SILENT,
        };
        !waiting
            && self
                .last_rx()
                .is_some_and(|t| now.saturating_duration_since(t) < LIVE)
    }
}

/// A peer's session and what changes with every packet: under the peer's own lock.
struct PeerState {
    /// Made on first use, under this lock: `Tunn::new` does a Diffie-Hellman, which must
    /// not run under the table's lock.
    tunn: Option<Tunn>,
    index: u32,
    config: PeerConfig,
    rx_bytes: u64,
    tx_bytes: u64,
    next_knock: Instant,
    /// When boringtun last answered one of this peer's initiations.
    last_initiation: Option<Instant>,
}

impl PeerState {
    fn tunn(&mut self, gate: &Gate) -> &mut Tunn {
        let (key, index) = (self.config.public_key, self.index);
        self.tunn
            .get_or_insert_with(|| gate.new_tunn(key, index, Some(KEEPALIVE_SECS)))
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

    /// Encrypts an IP packet and appends it with its destination: the endpoint of a
    /// session that has heard back, else every knock target (then the datagram is a
    /// handshake and the packet waits in boringtun's queue).
    fn seal(
        &mut self,
        heard: bool,
        gate: &Gate,
        packet: &[u8],
        sealed: &mut [u8],
        out: &mut Output,
    ) {
        if packet.len() + SEAL_OVERHEAD > sealed.len() {
            return;
        }
        if let TunnResult::WriteToNetwork(p) = self.tunn(gate).encapsulate(packet, sealed) {
            // A handshake instead means the packet waits in boringtun's queue: it is
            // counted when [`drain`] sends it.
            if p.first() == Some(&DATA_MESSAGE) {
                self.tx_bytes += packet.len() as u64;
            }
            match self.config.endpoint {
                Some(ep) if heard => out.transmits.push(p, ep),
                // No session yet: `p` is a handshake; try every address we know.
                _ => self.knock(p, out),
            }
        }
    }
}

/// One invite session: a joiner holding an invite key, from one source address.
struct InviteCell {
    index: u32,
    invite_key: Key,
    /// Where its first initiation came from: with the key, what names the session.
    origin: SocketAddr,
    started: Instant,
    state: Mutex<InviteState>,
}

struct InviteState {
    /// Made on first use, under this lock (see [`PeerState::tunn`]).
    tunn: Option<Tunn>,
    endpoint: SocketAddr,
}

impl InviteCell {
    fn lock(&self) -> MutexGuard<'_, InviteState> {
        self.state.locked()
    }
}

impl InviteState {
    fn tunn(&mut self, gate: &Gate, key: Key, index: u32) -> &mut Tunn {
        self.tunn
            .get_or_insert_with(|| gate.new_tunn(key, index, None))
    }
}

/// Where a receiver index leads.
#[derive(Clone)]
enum Slot {
    Peer(Arc<PeerCell>),
    Invite(Arc<InviteCell>),
}

/// A peer as the table knows it: its cell, and the address routes point at.
#[derive(Clone)]
struct Entry {
    cell: Arc<PeerCell>,
    address: Ipv4Addr,
    address6: Ipv6Addr,
}

/// Who is who, as one immutable snapshot: a batch takes the current one under the
/// table's lock (an `Arc` clone) and looks peers up in it with no lock held; a change
/// (a peer added or removed, an invite session opened) makes a new snapshot, copying the
/// maps only while an older one is still in use.
#[derive(Clone, Default)]
struct View {
    peers: HashMap<Key, Entry>,
    slots: HashMap<u32, Slot>,
    invites: HashMap<u32, Arc<InviteCell>>,
    invite_keys: HashSet<Key>,
    routes: Routes<Key>,
    /// This node's VPN address.
    me: Option<Ipv4Addr>,
    /// This node's inner IPv6 address.
    me6: Option<Ipv6Addr>,
    /// The host's key, on members; `None` on the host itself, which forwards.
    host: Option<Key>,
}

impl View {
    fn live(&self, key: &Key, now: Instant) -> bool {
        self.peers.get(key).is_some_and(|e| e.cell.live(now))
    }

    /// The peer whose session carries packets for `dst`: the peer itself when its direct
    /// path is alive, else the host (on a member), else the peer anyway (to knock).
    fn carrier(&self, dst: &Key, now: Instant) -> Key {
        let direct = self.live(dst, now);
        match self.host {
            Some(h) if !direct && h != *dst && self.live(&h, now) => h,
            _ => *dst,
        }
    }

    fn path(&self, key: &Key, now: Instant) -> PathKind {
        if !self.peers.contains_key(key) {
            return PathKind::Down;
        }
        let carrier = self.carrier(key, now);
        if self.live(key, now) {
            PathKind::Direct
        } else if carrier != *key && self.live(&carrier, now) {
            PathKind::ViaHost
        } else {
            PathKind::Down
        }
    }

    /// The cell of the peer that carries packets for `dst`.
    fn carrier_cell(&self, dst: IpAddr, now: Instant) -> Option<&Arc<PeerCell>> {
        let owner = self.routes.owner(dst)?;
        let carrier = self.carrier(owner, now);
        self.peers.get(&carrier).map(|e| &e.cell)
    }

    /// Whether `ip` is one of this node's own addresses inside the tunnel.
    fn is_me(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.me == Some(a),
            IpAddr::V6(a) => self.me6 == Some(a),
        }
    }

    /// Points both of `key`'s routes at it: its IPv4 address and its inner IPv6 one.
    fn route(&mut self, key: Key, address: Ipv4Addr, address6: Ipv6Addr) {
        if let Ok(net) = Ipv4Net::new(address, 32) {
            self.routes.insert(net, key);
        }
        if let Ok(net) = Ipv6Net::new(address6, 128) {
            self.routes.insert(net, key);
        }
    }

    /// A 24-bit index not in use: boringtun puts it in the top bits of its session ids.
    fn new_index(&self, rng: &mut dyn RngCore) -> u32 {
        loop {
            let i = rng.next_u32() >> 8;
            if !self.slots.contains_key(&i) {
                return i;
            }
        }
    }
}

/// What the table's lock guards: the current snapshot, and what changes it.
struct Table {
    view: Arc<View>,
    rng: Box<dyn RngCore + Send>,
    next_tick: Instant,
}

/// Seals `packets` (each with its destination address) for the peers that carry them,
/// taking each carrier's lock once for all of its packets and never two at once.
fn seal_grouped<'p>(
    view: &View,
    gate: &Gate,
    now: Instant,
    packets: impl Iterator<Item = (&'p [u8], IpAddr)>,
    sealed: &mut [u8],
    out: &mut Output,
) {
    let mut carriers: Vec<&Arc<PeerCell>> = Vec::new();
    let mut items: Vec<(usize, &[u8])> = Vec::new();
    for (packet, dst) in packets {
        let Some(cell) = view.carrier_cell(dst, now) else {
            continue;
        };
        let at = match carriers.iter().position(|c| Arc::ptr_eq(c, cell)) {
            Some(at) => at,
            None => {
                carriers.push(cell);
                carriers.len() - 1
            }
        };
        items.push((at, packet));
    }
    for (at, cell) in carriers.iter().enumerate() {
        let heard = cell.last_rx().is_some();
        let mut st = cell.lock();
        for (_, packet) in items.iter().filter(|(c, _)| *c == at) {
            st.seal(heard, gate, packet, sealed, out);
        }
        if heard {
            cell.sent_data(now);
        }
    }
}

/// The tunnel's whole state; see the module header. Shared by the shell's loops by
/// reference: every method takes its locks itself, in the order the header gives.
pub struct Core {
    gate: Arc<Gate>,
    counters: Counters,
    /// The zero of the peers' `last_rx` clocks.
    epoch: Instant,
    table: Mutex<Table>,
}

impl Core {
    /// A core whose first tick is due at `now`.
    pub fn new(secret: StaticSecret, rng: Box<dyn RngCore + Send>, now: Instant) -> Core {
        Core {
            gate: Arc::new(Gate::new(secret)),
            counters: Counters::default(),
            epoch: now,
            table: Mutex::new(Table {
                view: Arc::new(View::default()),
                rng,
                next_tick: now,
            }),
        }
    }

    /// The gate datagrams pass first; the shell keeps a handle to run it without the core.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.table.locked()
    }

    /// The current snapshot: the table's lock is held for an `Arc` clone.
    fn view(&self) -> Arc<View> {
        self.table().view.clone()
    }

    /// Changes the snapshot under the table's lock (no crypto, no other lock).
    fn change<R>(&self, f: impl FnOnce(&mut View, &mut dyn RngCore) -> R) -> R {
        let mut t = self.table();
        let Table { view, rng, .. } = &mut *t;
        f(Arc::make_mut(view), &mut **rng)
    }

    /// This node's VPN address and inner IPv6 address, and the host's key when this node
    /// is a member.
    pub fn set_local(&self, me: Ipv4Addr, me6: Ipv6Addr, host: Option<Key>) {
        self.change(|v, _| {
            v.me = Some(me);
            v.me6 = Some(me6);
            v.host = host;
        });
    }

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&self, keys: HashSet<Key>) {
        self.change(|v, _| v.invite_keys = keys);
    }

    /// Adds a peer and knocks at it, or updates the name, address and candidates of one
    /// already there without touching its session. The table's lock covers the routes;
    /// the peer's own lock, taken after it is released, covers the rest and the knock.
    pub fn upsert_peer(&self, now: Instant, config: PeerConfig, out: &mut Output) {
        let key = config.public_key;
        let epoch = self.epoch;
        let (cell, fresh) = self.change(|v, rng| {
            if let Some(e) = v.peers.get_mut(&key) {
                let cell = e.cell.clone();
                if e.address != config.address || e.address6 != config.address6 {
                    e.address = config.address;
                    e.address6 = config.address6;
                    v.routes.remove_owner(&key);
                    // First come keeps it here too: a move onto another peer's address
                    // would hand that peer's traffic, and its source check, to this one.
                    let (address, address6) = (config.address, config.address6);
                    let taken = v.peers.iter().any(|(k, e)| {
                        *k != key && (e.address == address || e.address6 == address6)
                    });
                    if taken {
                        log::warn!(
                            "{} moves to {address} or {address6}, which another peer already                              has; it gets no traffic",
                            config.name
                        );
                    } else {
                        v.route(key, address, address6);
                    }
                }
                return (cell, false);
            }
            let index = v.new_index(rng);
            let (address, address6) = (config.address, config.address6);
            // Either family taken is refused for both: the IPv6 address is derived from
            // the IPv4 one, so a clash in either means two peers claim one member's place.
            let taken = v
                .peers
                .values()
                .any(|e| e.address == address || e.address6 == address6);
            if taken {
                // First come keeps it: members are added before hand-made peers.
                log::warn!(
                    "{} claims {address} or {address6}, which another peer already has; it \
                     gets no traffic",
                    config.name
                );
            } else {
                v.route(key, address, address6);
            }
            let cell = Arc::new(PeerCell {
                index,
                last_rx: AtomicU64::new(0),
                unanswered: AtomicU64::new(0),
                epoch,
                state: Mutex::new(PeerState {
                    tunn: None,
                    index,
                    config: config.clone(),
                    rx_bytes: 0,
                    tx_bytes: 0,
                    last_initiation: None,
                    next_knock: now + KNOCK_EVERY,
                }),
            });
            v.slots.insert(index, Slot::Peer(cell.clone()));
            v.peers.insert(
                key,
                Entry {
                    cell: cell.clone(),
                    address,
                    address6,
                },
            );
            (cell, true)
        });
        let mut st = cell.lock();
        if fresh {
            let mut sealed = sealed_for(0);
            if let TunnResult::WriteToNetwork(p) = st
                .tunn(&self.gate)
                .format_handshake_initiation(&mut sealed, false)
            {
                st.knock(p, out);
            }
            return;
        }
        st.config.name = config.name;
        st.config.address = config.address;
        st.config.address6 = config.address6;
        st.config.candidates = config.candidates;
        if st.config.endpoint.is_none() {
            st.config.endpoint = config.endpoint;
        }
    }

    pub fn remove_peer(&self, key: &Key) -> bool {
        self.change(|v, _| match v.peers.remove(key) {
            Some(e) => {
                v.slots.remove(&e.cell.index);
                v.routes.remove_owner(key);
                true
            }
            None => false,
        })
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.view().peers.keys().copied().collect()
    }

    /// Peers a message can be sent to now, directly or through the host.
    pub fn reachable(&self, now: Instant) -> Vec<Key> {
        let v = self.view();
        v.peers
            .keys()
            .filter(|k| v.live(&v.carrier(k, now), now))
            .copied()
            .collect()
    }

    /// How packets reach peer `key` now.
    pub fn path(&self, key: &Key, now: Instant) -> PathKind {
        self.view().path(key, now)
    }

    /// Every peer as `status` shows it, by address; `unix_now` dates the handshakes.
    /// Each peer's lock is taken in turn, with no other lock held.
    pub fn status(&self, now: Instant, unix_now: u64) -> Vec<PeerStatus> {
        let v = self.view();
        let mut all: Vec<PeerStatus> = v
            .peers
            .iter()
            .map(|(k, e)| {
                let st = e.cell.lock();
                let (since, rtt) = match &st.tunn {
                    Some(t) => {
                        let (since, _, _, _, rtt) = t.stats();
                        (since, rtt)
                    }
                    None => (None, None),
                };
                let ago = since.map(|d| d.as_secs());
                PeerStatus {
                    name: st.config.name.clone(),
                    public_key: *k,
                    address: e.address,
                    address6: Some(e.address6),
                    endpoint: st.config.endpoint,
                    path: v.path(k, now),
                    rtt_ms: rtt,
                    last_handshake: ago.map(|a| unix_now.saturating_sub(a)),
                    last_handshake_secs_ago: ago,
                    rx_bytes: st.rx_bytes,
                    tx_bytes: st.tx_bytes,
                }
            })
            .collect();
        all.sort_by_key(|p| p.address);
        all
    }

    /// Packets from other members that claimed an address they do not own.
    pub fn spoofed(&self) -> u64 {
        self.counters.spoofed.load(Ordering::Relaxed)
    }

    /// Packets this node passed on between two other members.
    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::Relaxed)
    }

    /// Gossip datagrams another program on this machine tried to send as this daemon.
    pub fn local_gossip_dropped(&self) -> u64 {
        self.counters.local_gossip_dropped.load(Ordering::Relaxed)
    }

    /// Handshake initiations from a known peer dropped before boringtun's key work,
    /// because the peer's last one was answered less than [`INITIATION_INTERVAL`] ago.
    pub fn initiations_limited(&self) -> u64 {
        self.counters.initiations_limited.load(Ordering::Relaxed)
    }

    /// Encrypts a join answer for an invite session.
    pub fn send_invite_reply(
        &self,
        session: u32,
        packet: &[u8],
        out: &mut Output,
    ) -> Result<(), CoreError> {
        let cell = self
            .view()
            .invites
            .get(&session)
            .cloned()
            .ok_or(CoreError::FindInviteSession(session))?;
        let mut sealed = sealed_for(packet.len());
        let mut st = cell.lock();
        if let TunnResult::WriteToNetwork(p) = st
            .tunn(&self.gate, cell.invite_key, cell.index)
            .encapsulate(packet, &mut sealed)
        {
            out.transmits.push(p, st.endpoint);
        }
        Ok(())
    }

    /// Encrypts a gossip datagram for member `to`, directly or through the host.
    pub fn send_gossip(&self, now: Instant, to: &Key, payload: &[u8], out: &mut Output) {
        let v = self.view();
        let (Some(me), Some(dst)) = (v.me, v.peers.get(to).map(|e| e.address)) else {
            return;
        };
        let Ok(packet) = wire::encode_udp(me, dst, wire::GOSSIP_PORT, payload) else {
            log::warn!("gossip message too large ({} bytes)", payload.len());
            return;
        };
        let mut sealed = sealed_for(packet.len());
        seal_grouped(
            &v,
            &self.gate,
            now,
            std::iter::once((&packet[..], IpAddr::V4(dst))),
            &mut sealed,
            out,
        );
    }

    /// A datagram from the UDP socket: the gate's checks, then the batch path with a
    /// batch of one.
    pub fn handle_input(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        bufs: &mut Buffers,
        out: &mut Output,
    ) {
        if let Some(screened) = self.gate.screen(from, datagram, out) {
            self.handle_screened_batch(now, [(from, datagram, screened)], bufs, out);
        }
    }

    /// Datagrams that passed the gate (which the shell runs with no lock held). The
    /// table's lock is taken once, for the snapshot that names each datagram's peer; then
    /// each peer's lock once for all of its datagrams, in their order, while boringtun
    /// decrypts; then, for what the host forwards, each carrier's lock once. Only an
    /// initiation that opens a new invite session takes the table's lock again.
    pub fn handle_screened_batch<'a>(
        &self,
        now: Instant,
        batch: impl IntoIterator<Item = (SocketAddr, &'a [u8], Screened)>,
        bufs: &mut Buffers,
        out: &mut Output,
    ) {
        let view = self.view();
        let mut targets: Vec<&Slot> = Vec::new();
        let mut items: Vec<(usize, SocketAddr, &'a [u8])> = Vec::new();
        let mut opens: Vec<(Key, SocketAddr, &'a [u8])> = Vec::new();
        for (from, datagram, screened) in batch {
            let Some(slot) = resolve(&view, from, datagram, &screened, &mut opens) else {
                continue;
            };
            let at = match targets.iter().position(|t| same_slot(t, slot)) {
                Some(at) => at,
                None => {
                    targets.push(slot);
                    targets.len() - 1
                }
            };
            items.push((at, from, datagram));
        }
        bufs.forward.clear();
        for (at, slot) in targets.iter().enumerate() {
            let datagrams = items
                .iter()
                .filter(|(t, _, _)| *t == at)
                .map(|&(_, from, d)| (from, d));
            match slot {
                Slot::Peer(cell) => self.peer_datagrams(&view, cell, now, datagrams, bufs, out),
                Slot::Invite(cell) => {
                    let mut st = cell.lock();
                    for (from, d) in datagrams {
                        invite_datagram(&self.gate, cell, &mut st, from, d, bufs, out);
                    }
                }
            }
        }
        // The host passes packets on between members, now that no peer is locked.
        if !bufs.forward.is_empty() {
            let Buffers {
                forward, sealed, ..
            } = bufs;
            seal_grouped(&view, &self.gate, now, forward.iter(), sealed, out);
            forward.clear();
        }
        for (key, from, datagram) in opens {
            let cell = self.open_invite(now, key, from);
            let mut st = cell.lock();
            invite_datagram(&self.gate, &cell, &mut st, from, datagram, bufs, out);
        }
    }

    /// Packets read from the TUN device (segments of a super-packet, or several reads):
    /// the table's lock once for the snapshot, then each carrier's lock once.
    pub fn handle_packets<'a>(
        &self,
        now: Instant,
        packets: impl IntoIterator<Item = &'a [u8]>,
        bufs: &mut Buffers,
        out: &mut Output,
    ) {
        let view = self.view();
        let mine = packets
            .into_iter()
            .filter_map(|p| self.own_packet(&view, p).map(|dst| (p, dst)));
        seal_grouped(&view, &self.gate, now, mine, &mut bufs.sealed, out);
    }

    /// One packet read from the TUN device.
    pub fn handle_packet(&self, now: Instant, packet: &[u8], bufs: &mut Buffers, out: &mut Output) {
        self.handle_packets(now, [packet], bufs, out);
    }

    /// The destination of a packet read from the TUN device, if it may leave: only this
    /// node's own (IPv4 or IPv6), and never gossip.
    fn own_packet(&self, view: &View, packet: &[u8]) -> Option<IpAddr> {
        let dst = Tunn::dst_address(packet)?;
        // `dst_address` has checked the version and the header's length for its family.
        let src = match dst {
            IpAddr::V4(_) => packet
                .get(12..16)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| IpAddr::from(Ipv4Addr::from(b)))?,
            IpAddr::V6(_) => packet
                .get(8..24)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(|b| IpAddr::from(Ipv6Addr::from(b)))?,
        };
        // Only this node speaks from the TUN device: a packet the kernel forwarded in with
        // a member's source (from a container, say) would pass for it. The kernel's own
        // IPv6 chatter (router solicitations from a link-local source) stops here too.
        if !view.is_me(src) {
            return None;
        }
        // Gossip is the daemon's own (sent by `send_gossip`, never through the kernel): a
        // datagram to the gossip port from the TUN device comes from some other program on
        // this machine.
        if wire::decode_udp(packet).is_some_and(|u| u.port == wire::GOSSIP_PORT) {
            bump(&self.counters.local_gossip_dropped);
            return None;
        }
        Some(dst)
    }

    /// When [`Core::handle_timeout`] has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.table().next_tick)
    }

    /// boringtun's timers for every session, knocking at peers without a direct path, and
    /// expiry of invite sessions; nothing before the tick is due. The table's lock covers
    /// the tick and the expiry; each session's timers run under its own lock only.
    pub fn handle_timeout(&self, now: Instant, bufs: &mut Buffers, out: &mut Output) {
        let view = {
            let mut t = self.table();
            if now < t.next_tick {
                return;
            }
            t.next_tick = now + TIMER_TICK;
            // The shared limiter counts handshakes per second; no session resets it.
            self.gate.limiter.reset_count();
            let expired =
                |s: &InviteCell| now.saturating_duration_since(s.started) > INVITE_SESSION_LIFETIME;
            if t.view.invites.values().any(|s| expired(s)) {
                let v = Arc::make_mut(&mut t.view);
                let View { invites, slots, .. } = v;
                invites.retain(|i, s| {
                    let keep = !expired(s);
                    if !keep {
                        slots.remove(i);
                    }
                    keep
                });
            }
            t.view.clone()
        };
        let sealed = &mut bufs.sealed;
        for e in view.peers.values() {
            let live = e.cell.live(now);
            let mut st = e.cell.lock();
            let ep = st.config.endpoint;
            if let (TunnResult::WriteToNetwork(pkt), Some(ep)) =
                (st.tunn(&self.gate).update_timers(sealed), ep)
            {
                out.transmits.push(pkt, ep);
            }
            // No direct path: knock again at every address the peer may be at.
            if !live && now >= st.next_knock {
                st.next_knock = now + KNOCK_EVERY;
                if let TunnResult::WriteToNetwork(pkt) = st
                    .tunn(&self.gate)
                    .format_handshake_initiation(sealed, true)
                {
                    st.knock(pkt, out);
                }
            }
        }
        for s in view.invites.values() {
            let mut st = s.lock();
            let ep = st.endpoint;
            if let TunnResult::WriteToNetwork(pkt) = st
                .tunn(&self.gate, s.invite_key, s.index)
                .update_timers(sealed)
            {
                out.transmits.push(pkt, ep);
            }
        }
    }

    /// One peer's datagrams of a batch, under that peer's lock only.
    fn peer_datagrams<'a>(
        &self,
        view: &View,
        cell: &PeerCell,
        now: Instant,
        datagrams: impl Iterator<Item = (SocketAddr, &'a [u8])>,
        bufs: &mut Buffers,
        out: &mut Output,
    ) {
        let mut st = cell.lock();
        for (from, datagram) in datagrams {
            self.peer_datagram(view, cell, &mut st, now, from, datagram, bufs, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn peer_datagram(
        &self,
        view: &View,
        cell: &PeerCell,
        st: &mut PeerState,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        bufs: &mut Buffers,
        out: &mut Output,
    ) {
        let key = st.config.public_key;
        let parsed = Tunn::parse_incoming_packet(datagram);
        let initiation = matches!(parsed, Ok(Packet::HandshakeInit(_)));
        // A peer gets one initiation answered per interval: the extras are dropped here,
        // before boringtun's Diffie-Hellman, so a member gone bad cannot keep this node
        // busy with handshakes (the gate's limit is shared by everyone).
        if initiation
            && st
                .last_initiation
                .is_some_and(|t| now.saturating_duration_since(t) < INITIATION_INTERVAL)
        {
            self.limited(&st.config.name);
            return;
        }
        let was_data = matches!(parsed, Ok(Packet::PacketData(_)));
        // A handshake initiation proves only that the peer's packets reach us; a path
        // counts as alive once packets went both ways: a response to our initiation, or
        // data (the initiator sends a keepalive as soon as it has our response).
        let round_trip = matches!(
            parsed,
            Ok(Packet::PacketData(_) | Packet::HandshakeResponse(_))
        );
        let res = st
            .tunn(&self.gate)
            .decapsulate(Some(from.ip()), datagram, &mut bufs.plain);
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
                cell.set_last_rx(now);
            }
            if st.config.endpoint != Some(from) {
                log::info!("{} is now at {from}", st.config.name);
                st.config.endpoint = Some(from);
                out.roamed = true;
            }
        }
        let (packet, src) = match res {
            TunnResult::WriteToNetwork(p) => {
                if initiation && authenticated {
                    st.last_initiation = Some(now);
                }
                out.transmits.push(p, from);
                if let Some(tunn) = st.tunn.as_mut() {
                    st.tx_bytes += drain(tunn, &mut bufs.sealed, from, out);
                }
                return;
            }
            TunnResult::WriteToTunnelV4(p, src) => (p, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(p, src) => (p, IpAddr::V6(src)),
            _ => return,
        };
        st.rx_bytes += packet.len() as u64;
        // The source must belong to the sender, except that the host relays for members.
        let owner = view.routes.owner(src).copied();
        let relayed = view.host == Some(key) && owner.is_some();
        if owner != Some(key) && !relayed {
            bump(&self.counters.spoofed);
            log::debug!("dropped a packet from {} claiming {src}", st.config.name);
            return;
        }
        let Some(dst) = Tunn::dst_address(packet) else {
            return;
        };
        if view.is_me(dst) {
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
        // The host passes packets on between members that have no direct path: sealed
        // for the other member once this one's lock is released.
        if view.host.is_none() && view.routes.owner(dst).is_some_and(|o| *o != key) {
            bump(&self.counters.forwarded);
            bufs.forward.push(packet, dst);
            return;
        }
        // Anything else is not for this node: handing it to the kernel would let a member
        // reach whatever this machine routes to.
        log::debug!("dropped a packet from {} for {dst}", st.config.name);
    }

    fn limited(&self, name: &str) {
        static LOG: crate::base::logging::Throttle =
            crate::base::logging::Throttle::new(Duration::from_secs(10));
        bump(&self.counters.initiations_limited);
        if let Some(held) = LOG.allow() {
            log::debug!(
                "dropped a handshake initiation from {name}: one was answered less than \
                 {INITIATION_INTERVAL:?} ago ({held} more since the last line)"
            );
        }
    }

    /// The session for invite holder `key` at `from`, opened if there is none: one per
    /// invite holder and address, so concurrent joiners using the same link get separate
    /// sessions and separate answers. Under the table's lock; the session's `Tunn` (and
    /// its Diffie-Hellman) is made later, under the session's own lock.
    fn open_invite(&self, now: Instant, key: Key, from: SocketAddr) -> Arc<InviteCell> {
        self.change(|v, rng| {
            if let Some(s) = v
                .invites
                .values()
                .find(|s| s.invite_key == key && s.origin == from)
            {
                return s.clone();
            }
            if v.invites.len() >= MAX_INVITE_SESSIONS {
                if let Some(oldest) = v
                    .invites
                    .values()
                    .min_by_key(|s| s.started)
                    .map(|s| s.index)
                {
                    v.invites.remove(&oldest);
                    v.slots.remove(&oldest);
                }
            }
            let index = v.new_index(rng);
            let cell = Arc::new(InviteCell {
                index,
                invite_key: key,
                origin: from,
                started: now,
                state: Mutex::new(InviteState {
                    tunn: None,
                    endpoint: from,
                }),
            });
            v.invites.insert(index, cell.clone());
            v.slots.insert(index, Slot::Invite(cell.clone()));
            cell
        })
    }
}

/// The slot a screened datagram is for, from the snapshot. An initiation from an invite
/// holder with no session yet is set aside in `opens` (opening one changes the table).
fn resolve<'v, 'a>(
    view: &'v View,
    from: SocketAddr,
    datagram: &'a [u8],
    screened: &Screened,
    opens: &mut Vec<(Key, SocketAddr, &'a [u8])>,
) -> Option<&'v Slot> {
    let receiver = match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(_) => None,
        Packet::HandshakeResponse(p) => Some(p.receiver_idx),
        Packet::PacketCookieReply(p) => Some(p.receiver_idx),
        Packet::PacketData(p) => Some(p.receiver_idx),
    };
    if let Some(idx) = receiver {
        return view.slots.get(&(idx >> 8));
    }
    let key = screened.initiator?;
    if let Some(e) = view.peers.get(&key) {
        return view.slots.get(&e.cell.index);
    }
    if view.invite_keys.contains(&key) {
        let open = view
            .invites
            .values()
            .find(|s| s.invite_key == key && s.origin == from);
        if let Some(s) = open {
            return view.slots.get(&s.index);
        }
        opens.push((key, from, datagram));
        return None;
    }
    log::debug!("handshake from an unknown key at {from}");
    None
}

fn same_slot(a: &Slot, b: &Slot) -> bool {
    match (a, b) {
        (Slot::Peer(x), Slot::Peer(y)) => Arc::ptr_eq(x, y),
        (Slot::Invite(x), Slot::Invite(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

fn invite_datagram(
    gate: &Gate,
    cell: &InviteCell,
    st: &mut InviteState,
    from: SocketAddr,
    datagram: &[u8],
    bufs: &mut Buffers,
    out: &mut Output,
) {
    match st.tunn(gate, cell.invite_key, cell.index).decapsulate(
        Some(from.ip()),
        datagram,
        &mut bufs.plain,
    ) {
        TunnResult::WriteToNetwork(p) => {
            out.transmits.push(p, from);
            if let Some(tunn) = st.tunn.as_mut() {
                drain(tunn, &mut bufs.sealed, from, out);
            }
            st.endpoint = from;
        }
        // Never the TUN device: a joiner is not a member yet, its packets are only ever
        // join messages for the daemon to read.
        TunnResult::WriteToTunnelV4(p, _) => {
            st.endpoint = from;
            out.invites.push(InviteMessage {
                session: cell.index,
                invite_key: cell.invite_key,
                from,
                packet: p.to_vec(),
            });
        }
        _ => {}
    }
}

/// After a `WriteToNetwork`, boringtun may hold queued packets: flush them.
/// WireGuard's transport data message type.
const DATA_MESSAGE: u8 = 4;
/// A data message's header (type, receiver, counter) and tag around the padded packet.
const DATA_OVERHEAD: usize = 32;

/// Sends what boringtun queued while a handshake was under way; returns the bytes of
/// packets it carried (padding included: the queue keeps no plain lengths).
fn drain(tunn: &mut Tunn, sealed: &mut [u8], to: SocketAddr, out: &mut Output) -> u64 {
    let mut bytes = 0;
    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], sealed) {
        if p.first() == Some(&DATA_MESSAGE) {
            bytes += p.len().saturating_sub(DATA_OVERHEAD) as u64;
        }
        out.transmits.push(p, to);
    }
    bytes
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

    /// Member `last`'s inner IPv6 address, as `group::place::address6` derives it.
    fn vpn6(last: u8) -> Ipv6Addr {
        crate::group::place::address6(&[7; 32], vpn(last))
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

    /// An IPv6/UDP packet (port 5000 both ways, no checksum: nothing here reads it).
    fn ip6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(8 + payload.len()).unwrap().to_be_bytes();
        let mut p = vec![0x60, 0, 0, 0, len[0], len[1], 17, 64];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0x13, 0x88, 0x13, 0x88, len[0], len[1], 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// A UDP packet of the family its addresses have.
    fn packet(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ip(s, d, payload),
            (IpAddr::V6(s), IpAddr::V6(d)) => ip6(s, d, payload),
            _ => panic!("{src} and {dst} are of two families"),
        }
    }

    /// Member `n`'s address in each family inside the tunnel.
    fn v4(n: u8) -> IpAddr {
        vpn(n).into()
    }

    fn v6(n: u8) -> IpAddr {
        vpn6(n).into()
    }

    fn peer(n: u8, endpoint: Option<SocketAddr>, candidates: Vec<SocketAddr>) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            name: format!("node{n}"),
            address: vpn(n),
            address6: vpn6(n),
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
        fn act(&mut self, i: usize, f: impl FnOnce(&Core, &mut Output)) {
            let mut out = Output::default();
            f(&self.nodes[i].core, &mut out);
            self.collect(i, &mut out);
        }

        /// Delivers datagrams, and the answers they cause, until none is left.
        fn run(&mut self, now: Instant) {
            let mut out = Output::default();
            let mut bufs = Buffers::default();
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
                self.nodes[j]
                    .core
                    .handle_input(now, from, &bytes, &mut bufs, &mut out);
                self.collect(j, &mut out);
            }
            panic!("the datagrams never settled");
        }

        /// Every node's timeout at `now`, then delivery.
        fn tick(&mut self, now: Instant) {
            let mut bufs = Buffers::default();
            for i in 0..self.nodes.len() {
                self.act(i, |c, o| c.handle_timeout(now, &mut bufs, o));
            }
            self.run(now);
        }

        /// Node `i` sends `packet` as if read from its TUN device; returns where its
        /// datagrams went.
        fn send(&mut self, i: usize, now: Instant, packet: &[u8]) -> Vec<SocketAddr> {
            let mark = self.sent.len();
            let mut bufs = Buffers::default();
            self.act(i, |c, o| c.handle_packet(now, packet, &mut bufs, o));
            let to = self.sent[mark..].iter().map(|&(_, to, _)| to).collect();
            self.run(now);
            to
        }

        fn path(&self, i: usize, to: u8, now: Instant) -> PathKind {
            self.nodes[i].core.path(&key(to), now)
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

    impl Core {
        fn handle_timeout_for_test(&self, now: Instant, out: &mut Output) {
            self.handle_timeout(now, &mut Buffers::default(), out);
        }
    }

    /// Host 1 and member 2; the host knows the member's address, the member `host_at`.
    fn host_and_member(t0: Instant, host_at: Option<SocketAddr>) -> Net {
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), vpn6(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), vpn6(2), Some(key(1)));
            c.upsert_peer(t0, peer(1, host_at, vec![]), o);
        });
        net
    }

    /// Host 1 and members 2 and 3, every pair told of the other; the members know each
    /// other only by candidates (they must knock).
    fn host_and_two_members(t0: Instant) -> Net {
        let mut net = Net::new(&[1, 2, 3], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), vpn6(1), None);
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
            c.upsert_peer(t0, peer(3, Some(udp_addr(3)), vec![]), o);
        });
        for (i, n, other) in [(1, 2, 3), (2, 3, 2)] {
            net.act(i, |c, o| {
                c.set_local(vpn(n), vpn6(n), Some(key(1)));
                c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
                c.upsert_peer(t0, peer(other, None, vec![udp_addr(other)]), o);
            });
        }
        net
    }

    #[test]
    fn two_cores_complete_a_handshake_and_carry_an_ip_packet_both_ways() {
        let t0 = Instant::now();
        let mut net = host_and_member(t0, Some(udp_addr(1)));
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
    fn a_peer_moved_onto_another_peers_address_gets_none_of_its_traffic() {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        // The host is told member 3 now has member 2's address: 2 keeps it.
        net.act(0, |c, o| {
            let mut moved = peer(3, Some(udp_addr(3)), vec![]);
            moved.address = vpn(2);
            moved.address6 = vpn6(2);
            c.upsert_peer(t0, moved, o);
        });
        let to_two = ip(vpn(1), vpn(2), b"for two");
        assert_eq!(net.send(0, t0, &to_two), vec![udp_addr(2)]);
        assert_eq!(net.nodes[1].tun, vec![to_two]);
        assert!(net.nodes[2].tun.is_empty());
    }

    #[test]
    fn a_packet_sent_before_the_handshake_is_counted_once_when_it_goes_out() {
        let t0 = Instant::now();
        // Node 2 knows no address for 1: only 1's handshake runs.
        let mut net = host_and_member(t0, None);
        // Before any answer: the packet waits in boringtun's queue.
        let there = ip(vpn(1), vpn(2), b"waited for the handshake");
        net.act(0, |c, o| {
            c.handle_packet(t0, &there, &mut Buffers::default(), o)
        });
        assert_eq!(net.nodes[0].core.status(t0, 0)[0].tx_bytes, 0);
        net.run(t0);
        assert_eq!(net.nodes[1].tun, vec![there.clone()]);
        // Counted once: not when it was queued, and not again when it went out.
        assert_eq!(
            net.nodes[0].core.status(t0, 0)[0].tx_bytes,
            there.len() as u64
        );
    }

    #[test]
    fn an_ipv6_packet_is_routed_to_the_member_that_owns_its_destination_and_one_to_nobody_goes_nowhere(
    ) {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        let to_three = ip6(vpn6(1), vpn6(3), b"for three");
        assert_eq!(net.send(0, t0, &to_three), vec![udp_addr(3)]);
        let to_two = ip6(vpn6(1), vpn6(2), b"for two");
        assert_eq!(net.send(0, t0, &to_two), vec![udp_addr(2)]);
        assert_eq!(net.nodes[2].tun, vec![to_three]);
        assert_eq!(net.nodes[1].tun, vec![to_two]);
        // In the group's /64 but no member's, and the IPv4-mapped form of a member's
        // IPv4 address: neither is routed.
        let mapped = vpn(3).to_ipv6_mapped();
        for dst in [vpn6(9), mapped] {
            assert_eq!(net.send(0, t0, &ip6(vpn6(1), dst, b"lost")), vec![]);
        }
        // A packet from the TUN device with a source not this node's (the kernel's own
        // link-local chatter) does not leave.
        let chatter = ip6("fe80::1".parse().unwrap(), vpn6(2), b"chatter");
        assert_eq!(net.send(0, t0, &chatter), vec![]);
    }

    /// Nodes 1 and 2 with a session; returns node 2's fresh initiations to node 1 on
    /// demand (each with a new timestamp, as a peer's retry has).
    fn pair_with_session(t0: Instant) -> Net {
        let mut net = host_and_member(t0, Some(udp_addr(1)));
        net.run(t0);
        net
    }

    fn fresh_initiation(net: &Net, from: usize, to: u8) -> Vec<u8> {
        let view = net.nodes[from].core.view();
        let mut st = view.peers[&key(to)].cell.lock();
        let mut buf = vec![0u8; 256];
        match st
            .tunn
            .as_mut()
            .unwrap()
            .format_handshake_initiation(&mut buf, true)
        {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// What node 1 sends back for `datagram` from node 2, by WireGuard message type.
    fn answer_types(net: &Net, now: Instant, datagram: &[u8]) -> Vec<u8> {
        let mut out = Output::default();
        net.nodes[0].core.handle_input(
            now,
            udp_addr(2),
            datagram,
            &mut Buffers::default(),
            &mut out,
        );
        out.transmits.iter().map(|(p, _)| p[0]).collect()
    }

    #[test]
    fn a_peer_gets_one_initiation_answered_per_interval_and_the_extras_are_dropped_and_counted() {
        let t0 = Instant::now();
        let net = pair_with_session(t0);
        let t1 = t0 + INITIATION_INTERVAL;
        assert_eq!(
            answer_types(&net, t1, &fresh_initiation(&net, 1, 1)),
            vec![2]
        );
        assert_eq!(net.nodes[0].core.initiations_limited(), 0);

        // Fresh ones (boringtun would answer each) within the interval: dropped first.
        for ms in [1, 300, 999] {
            let at = t1 + Duration::from_millis(ms);
            let init = fresh_initiation(&net, 1, 1);
            assert_eq!(
                answer_types(&net, at, &init),
                Vec::<u8>::new(),
                "at +{ms} ms"
            );
        }
        assert_eq!(net.nodes[0].core.initiations_limited(), 3);

        // A replay of an answered one, once the interval is over, is boringtun's to
        // refuse; it does not start a new interval, so the peer's next one is answered.
        let t2 = t1 + INITIATION_INTERVAL;
        let kept = fresh_initiation(&net, 1, 1);
        assert_eq!(answer_types(&net, t2, &kept), vec![2]);
        let t3 = t2 + INITIATION_INTERVAL;
        assert_eq!(answer_types(&net, t3, &kept), Vec::<u8>::new());
        let t4 = t3 + Duration::from_millis(1);
        assert_eq!(
            answer_types(&net, t4, &fresh_initiation(&net, 1, 1)),
            vec![2]
        );
        assert_eq!(net.nodes[0].core.initiations_limited(), 3);
    }

    #[test]
    fn while_one_peer_is_locked_another_peers_batch_runs_and_a_batch_waiting_for_it_holds_no_table_lock(
    ) {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        let spare = Core::new(secret(1), Box::new(StdRng::seed_from_u64(9)), t0);
        let host = Arc::new(std::mem::replace(&mut net.nodes[0].core, spare));
        let view = host.view();
        let two = view.peers[&key(2)].cell.clone();
        let seal_one = |core: Arc<Core>, packet: Vec<u8>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut out = Output::default();
                core.handle_packets(t0, [&packet[..]], &mut Buffers::default(), &mut out);
                let _ = tx.send(out.transmits.iter().map(|(_, to)| to).collect::<Vec<_>>());
            });
            rx
        };
        // As if a batch from member 2 were being decrypted.
        let held = two.lock();
        let to_three = seal_one(host.clone(), ip(vpn(1), vpn(3), b"to three"));
        assert_eq!(
            to_three.recv_timeout(Duration::from_secs(10)),
            Ok(vec![udp_addr(3)]),
            "member 3's packet waited for member 2's lock"
        );

        let to_two = seal_one(host.clone(), ip(vpn(1), vpn(2), b"to two"));
        // Once that batch holds its snapshot it waits for member 2, and the table is free.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut table_free = false;
        while Instant::now() < deadline {
            if Arc::strong_count(&view) >= 3 && host.table.try_lock().is_ok() {
                table_free = true;
                break;
            }
            std::thread::yield_now();
        }
        assert!(
            table_free,
            "a batch waiting for a peer held the table's lock"
        );
        assert!(to_two.try_recv().is_err(), "sealed without member 2's lock");
        drop(held);
        assert_eq!(
            to_two.recv_timeout(Duration::from_secs(10)),
            Ok(vec![udp_addr(2)])
        );
    }

    #[test]
    fn a_batch_of_tun_packets_and_of_datagrams_is_handled_in_order_with_each_packet_checked() {
        let t0 = Instant::now();
        let mut net = host_and_member(t0, Some(udp_addr(1)));
        net.run(t0);
        let a = ip(vpn(1), vpn(2), b"first");
        // Not this node's source: the TUN check drops it, and only it.
        let forged = ip(vpn(3), vpn(2), b"forged");
        let b = ip(vpn(1), vpn(2), &[7u8; 1200]);
        let c = ip(vpn(1), vpn(2), b"third");
        let mut out = Output::default();
        let mut bufs = Buffers::default();
        net.nodes[0].core.handle_packets(
            t0,
            [&a[..], &forged[..], &b[..], &c[..]],
            &mut bufs,
            &mut out,
        );
        let sent: Vec<(Vec<u8>, SocketAddr)> = out
            .transmits
            .iter()
            .map(|(p, to)| (p.to_vec(), to))
            .collect();
        assert_eq!(sent.len(), 3);
        assert!(sent.iter().all(|(_, to)| *to == udp_addr(2)));

        let mut into = Output::default();
        let receiver = &net.nodes[1].core;
        let gate = receiver.gate();
        let screened: Vec<_> = sent
            .iter()
            .map(|(p, _)| {
                let s = gate.screen(udp_addr(1), p, &mut into).unwrap();
                (udp_addr(1), &p[..], s)
            })
            .collect();
        receiver.handle_screened_batch(t0, screened, &mut bufs, &mut into);
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
        forged_sources_are_dropped_and_counted(v4, Ipv4Addr::new(10, 9, 9, 9).into());
    }

    #[test]
    fn an_ipv6_packet_from_another_members_ula_address_or_an_unowned_one_is_dropped_and_counted() {
        // Member 9 does not exist: its address is in the group's /64 but nobody's.
        forged_sources_are_dropped_and_counted(v6, v6(9));
    }

    /// Node 2 the host and node 1 a member gone bad, which seals by hand (bypassing its
    /// own check on TUN packets) a packet from member 3's address and one from `nobody`,
    /// in the family `addr` gives: both are dropped and counted, an honest one passes.
    fn forged_sources_are_dropped_and_counted(addr: fn(u8) -> IpAddr, nobody: IpAddr) {
        let t0 = Instant::now();
        // Node 2 is the host; node 1 a member gone bad; node 3 a member whose address it
        // claims (known to the host, not on this network).
        let mut net = Net::new(&[1, 2], t0);
        net.act(0, |c, o| {
            c.set_local(vpn(1), vpn6(1), Some(key(2)));
            c.upsert_peer(t0, peer(2, Some(udp_addr(2)), vec![]), o);
        });
        net.act(1, |c, o| {
            c.set_local(vpn(2), vpn6(2), None);
            c.upsert_peer(t0, peer(1, Some(udp_addr(1)), vec![]), o);
            c.upsert_peer(t0, peer(3, None, vec![]), o);
        });
        net.run(t0);
        // The bad member's own check on TUN packets is bypassed: it encrypts by hand.
        for forged in [
            packet(addr(3), addr(2), b"as another member"),
            packet(nobody, addr(2), b"as nobody"),
        ] {
            net.act(0, |c, o| {
                let mut sealed = sealed_for(forged.len());
                let packets = std::iter::once((&forged[..], addr(2)));
                seal_grouped(&c.view(), &c.gate, t0, packets, &mut sealed, o);
            });
            net.run(t0);
        }
        assert_eq!(net.nodes[1].core.spoofed(), 2);
        assert!(net.nodes[1].tun.is_empty(), "a forged packet reached TUN");

        let honest = packet(addr(1), addr(2), b"as itself");
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
        net.nodes[1].core.view().peers[&key(1)]
            .cell
            .set_last_rx(later);
        assert_eq!(net.path(1, 3, later), PathKind::ViaHost);
        assert_eq!(
            net.send(1, later, &ip(vpn(2), vpn(3), b"x")),
            vec![udp_addr(1)]
        );
    }

    #[test]
    fn a_direct_path_that_stops_answering_goes_through_the_host_and_the_first_knock_through_brings_it_back(
    ) {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.run(t0);
        assert_eq!(net.path(1, 3, t0), PathKind::Direct);
        // The cut: what member 2 sends member 3 goes nowhere, though 3 was heard at t0.
        net.blocked.push((udp_addr(2), udp_addr(3)));
        assert_eq!(
            net.send(1, t0, &ip(vpn(2), vpn(3), b"lost")),
            vec![udp_addr(3)]
        );
        let waiting = t0 + SILENT - Duration::from_millis(1);
        assert_eq!(net.path(1, 3, waiting), PathKind::Direct);
        let silent = t0 + SILENT + Duration::from_millis(1);
        assert_eq!(net.path(1, 3, silent), PathKind::ViaHost);
        assert_eq!(
            net.send(1, silent, &ip(vpn(2), vpn(3), b"around")),
            vec![udp_addr(1)]
        );
        // The cut ends: the next knock gets through and the path is direct again.
        net.blocked.clear();
        let mark = net.sent.len();
        let healed = silent + KNOCK_EVERY;
        net.tick(healed);
        assert!(
            net.knocks_since(mark, 1).contains(&udp_addr(3)),
            "no knock at the silent peer"
        );
        assert_eq!(net.path(1, 3, healed), PathKind::Direct);
        assert_eq!(
            net.send(1, healed, &ip(vpn(2), vpn(3), b"direct")),
            vec![udp_addr(3)]
        );
    }

    #[test]
    fn the_host_forwards_packets_between_two_members_both_ways_and_keeps_none() {
        host_forwards_between_members(v4);
    }

    #[test]
    fn the_host_forwards_ipv6_packets_between_two_members_both_ways_and_keeps_none() {
        host_forwards_between_members(v6);
    }

    /// Members 2 and 3 with no direct path exchange a packet each way, in the family
    /// `addr` gives, through host 1, which writes neither to its own TUN device.
    fn host_forwards_between_members(addr: fn(u8) -> IpAddr) {
        let t0 = Instant::now();
        let mut net = host_and_two_members(t0);
        net.blocked.push((udp_addr(2), udp_addr(3)));
        net.run(t0);
        let there = packet(addr(2), addr(3), b"to three");
        net.send(1, t0, &there);
        let back = packet(addr(3), addr(2), b"to two");
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
            c.change(|v, _| {
                v.routes
                    .insert("192.168.1.0/24".parse::<Ipv4Net>().unwrap(), key(3))
            });
            c.handle_packet(t0, &elsewhere, &mut Buffers::default(), o);
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
            c.set_local(vpn(2), vpn6(2), None);
            c.upsert_peer(t0, peer(1, None, vec![]), o);
        });
        net.act(0, |c, o| {
            c.set_local(vpn(1), vpn6(1), None);
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
        let host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_local(vpn(1), vpn6(1), None);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut joiner = Tunn::new(secret(9), PublicKey::from(&secret(1)), None, None, 7, None);
        let mut buf = vec![0u8; 2048];
        let mut out = Output::default();
        let TunnResult::WriteToNetwork(init) = joiner.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        let mut bufs = Buffers::default();
        host.handle_input(t0, udp_addr(9), init, &mut bufs, &mut out);
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
        host.handle_input(t0, udp_addr(9), keepalive, &mut bufs, &mut out);
        assert!(out.transmits.is_empty() && out.invites.is_empty() && out.tun.is_empty());
        (host, joiner)
    }

    #[test]
    fn an_invite_keyed_sessions_packets_become_invite_messages_never_tun_packets() {
        let t0 = Instant::now();
        let (host, mut joiner) = invite_session(t0);
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
            host.handle_input(t0, udp_addr(9), d, &mut Buffers::default(), &mut out);
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
        let (host, _joiner) = invite_session(t0);
        let session = *host.view().invites.keys().next().unwrap();
        let mut out = Output::default();
        host.handle_timeout_for_test(t0 + INVITE_SESSION_LIFETIME, &mut out);
        assert!(host.send_invite_reply(session, b"x", &mut out).is_ok());
        host.handle_timeout_for_test(t0 + INVITE_SESSION_LIFETIME + TIMER_TICK, &mut out);
        assert!(matches!(
            host.send_invite_reply(session, b"x", &mut out),
            Err(CoreError::FindInviteSession(s)) if s == session
        ));
        assert!(host.view().slots.is_empty());
    }

    #[test]
    fn a_timeout_before_the_tick_poll_timeout_names_changes_nothing() {
        let t0 = Instant::now();
        let (host, _joiner) = invite_session(t0);
        let mut out = Output::default();
        let last = t0 + INVITE_SESSION_LIFETIME;
        host.handle_timeout_for_test(last, &mut out);
        assert_eq!(host.poll_timeout(), Some(last + TIMER_TICK));
        // Past the session's lifetime, but the tick is not due yet.
        host.handle_timeout_for_test(last + TIMER_TICK / 2, &mut out);
        assert_eq!(host.view().invites.len(), 1);
        assert_eq!(host.poll_timeout(), Some(last + TIMER_TICK));
        host.handle_timeout_for_test(last + TIMER_TICK, &mut out);
        assert!(host.view().invites.is_empty());
        assert_eq!(host.poll_timeout(), Some(last + 2 * TIMER_TICK));
    }

    #[test]
    fn a_handshake_from_a_key_neither_a_peer_nor_an_invite_gets_no_answer_and_no_session() {
        let t0 = Instant::now();
        let host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut stranger = Tunn::new(secret(8), PublicKey::from(&secret(1)), None, None, 7, None);
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) =
            stranger.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        let mut out = Output::default();
        host.handle_input(t0, udp_addr(8), init, &mut Buffers::default(), &mut out);
        assert!(out.transmits.is_empty());
        assert!(host.view().invites.is_empty() && host.view().slots.is_empty());
        assert_eq!(host.gate.refused(), 0, "a valid mac1 is not a refusal");
    }

    #[test]
    fn a_handshake_with_a_bad_mac1_is_refused_at_the_gate_and_counted() {
        let t0 = Instant::now();
        let host = Core::new(secret(1), Box::new(StdRng::seed_from_u64(1)), t0);
        host.set_invite_keys(HashSet::from([key(9)]));
        let mut forged = vec![0u8; 148];
        forged[0] = 1;
        let mut out = Output::default();
        host.handle_input(t0, udp_addr(8), &forged, &mut Buffers::default(), &mut out);
        assert_eq!(host.gate.refused(), 1);
        assert!(out.transmits.is_empty());
        assert!(host.view().invites.is_empty());
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
        let mut net = host_and_member(t0, Some(udp_addr(1)));
        net.run(t0);
        let mut buf = vec![0u8; 2048];
        let view = net.nodes[1].core.view();
        let mut peer_1 = view.peers[&key(1)].cell.lock();
        let TunnResult::WriteToNetwork(d) =
            peer_1.tunn.as_mut().unwrap().encapsulate(b"", &mut buf)
        else {
            panic!("no session");
        };
        let d = d.to_vec();
        drop(peer_1);
        let mut out = Output::default();
        // Node 2's NAT picked another port: the keepalive proves who sent it.
        let mut bufs = Buffers::default();
        net.nodes[0]
            .core
            .handle_input(t0, udp_addr(7), &d, &mut bufs, &mut out);
        assert!(out.roamed);
        out.clear();
        // Someone who copied it replays it from elsewhere: its counter was seen.
        net.nodes[0]
            .core
            .handle_input(t0, udp_addr(6), &d, &mut bufs, &mut out);
        assert!(!out.roamed);
        assert_eq!(
            net.nodes[0].core.status(t0, 0)[0].endpoint,
            Some(udp_addr(7))
        );
    }
}
