//! Userspace WireGuard: one boringtun `Tunn` per peer, one TUN device, one UDP socket,
//! and three loops (UDP in, TUN in, timers every 250 ms). It owns the peers' crypto state
//! and endpoints. It also accepts WireGuard sessions keyed by an invite's secret: their
//! packets never reach the TUN device, they are handed to the caller as join messages.
//! It must not decide membership: the daemon adds and removes peers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::routes::Routes;

/// 1500 minus the outer IPv4 (20) + UDP (8) + WireGuard (32) headers, rounded down as
/// `wg-quick` does so IPv6 underlays fit too.
pub const TUN_MTU: u16 = 1420;
const BUF: usize = 65536;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Keeps NAT mappings open between members.
const KEEPALIVE_SECS: u16 = 25;
const MAX_INVITE_SESSIONS: usize = 256;
const INVITE_SESSION_LIFETIME: Duration = Duration::from_secs(120);

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
    pub public_key: [u8; 32],
    pub name: String,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
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
    pub invite_key: [u8; 32],
    pub from: SocketAddr,
    pub packet: Vec<u8>,
}

struct Peer {
    tunn: Tunn,
    config: PeerConfig,
    index: u32,
    rx_bytes: u64,
    tx_bytes: u64,
}

struct InviteSession {
    tunn: Tunn,
    invite_key: [u8; 32],
    endpoint: SocketAddr,
    started: Instant,
}

#[derive(Clone, Copy)]
enum Slot {
    Peer([u8; 32]),
    Invite(u32),
}

#[derive(Default)]
struct State {
    peers: HashMap<[u8; 32], Peer>,
    slots: HashMap<u32, Slot>,
    invites: HashMap<u32, InviteSession>,
    invite_keys: HashSet<[u8; 32]>,
    routes: Routes<[u8; 32]>,
    spoofed: u64,
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
}

pub struct Tunnel {
    udp: UdpSocket,
    tun: AsyncDevice,
    secret: StaticSecret,
    public: PublicKey,
    state: Mutex<State>,
    invite_tx: mpsc::Sender<InviteMessage>,
    roamed: tokio::sync::Notify,
}

/// What handling one datagram asks the loop to do once the lock is released.
enum After {
    Nothing,
    ToTun(usize),
    Invite(InviteMessage),
}

impl Tunnel {
    pub fn new(
        udp: UdpSocket,
        tun: AsyncDevice,
        secret: StaticSecret,
        invite_tx: mpsc::Sender<InviteMessage>,
    ) -> Arc<Tunnel> {
        let public = PublicKey::from(&secret);
        Arc::new(Tunnel {
            udp,
            tun,
            secret,
            public,
            state: Mutex::new(State::default()),
            invite_tx,
            roamed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn device(&self) -> &AsyncDevice {
        &self.tun
    }

    pub fn local_port(&self) -> Option<u16> {
        self.udp.local_addr().ok().map(|a| a.port())
    }

    /// Adds or replaces a peer, and starts a handshake when its endpoint is known.
    pub async fn add_peer(&self, config: PeerConfig) {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            if let Some(old) = st.peers.remove(&config.public_key) {
                st.slots.remove(&old.index);
                st.routes.remove_owner(&config.public_key);
            }
            let index = st.new_index();
            let mut tunn = Tunn::new(
                self.secret.clone(),
                PublicKey::from(config.public_key),
                None,
                Some(KEEPALIVE_SECS),
                index,
                None,
            );
            if let Some(ep) = config.endpoint {
                let mut buf = vec![0u8; 256];
                if let TunnResult::WriteToNetwork(p) =
                    tunn.format_handshake_initiation(&mut buf, false)
                {
                    out.push((p.to_vec(), ep));
                }
            }
            st.slots.insert(index, Slot::Peer(config.public_key));
            if let Ok(net) = Ipv4Net::new(config.address, 32) {
                st.routes.insert(net, config.public_key);
            }
            st.peers.insert(
                config.public_key,
                Peer {
                    tunn,
                    config,
                    index,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            );
        }
        self.send_all(out).await;
    }

    pub fn remove_peer(&self, key: &[u8; 32]) -> bool {
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

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&self, keys: HashSet<[u8; 32]>) {
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

    pub fn status(&self) -> Vec<PeerStatus> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let st = self.lock();
        let mut v: Vec<PeerStatus> = st
            .peers
            .values()
            .map(|p| {
                let (since, _, _, _, _) = p.tunn.stats();
                let ago = since.map(|d| d.as_secs());
                PeerStatus {
                    name: p.config.name.clone(),
                    public_key: crate::identity::key_to_base64(&p.config.public_key),
                    address: p.config.address,
                    endpoint: p.config.endpoint,
                    last_handshake: ago.map(|a| now.saturating_sub(a)),
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

    async fn send_all(&self, out: Vec<(Vec<u8>, SocketAddr)>) {
        for (p, ep) in out {
            if let Err(e) = self.udp.send_to(&p, ep).await {
                log::debug!("send to {ep} failed: {e}");
            }
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
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return After::Nothing;
        };
        let mut st = self.lock();
        let slot = match &packet {
            Packet::HandshakeInit(init) => {
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, init) else {
                    return After::Nothing;
                };
                let key = half.peer_static_public;
                if let Some(p) = st.peers.get(&key) {
                    Slot::Peer(p.config.public_key)
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
            Slot::Peer(key) => {
                let State {
                    peers,
                    routes,
                    spoofed,
                    ..
                } = &mut *st;
                let Some(peer) = peers.get_mut(&key) else {
                    return After::Nothing;
                };
                let res = peer.tunn.decapsulate(Some(from.ip()), datagram, tx);
                let after = match res {
                    TunnResult::Err(e) => {
                        log::trace!("packet from {from} rejected: {e:?}");
                        return After::Nothing;
                    }
                    TunnResult::Done => After::Nothing,
                    TunnResult::WriteToNetwork(p) => {
                        out.push((p.to_vec(), from));
                        drain(&mut peer.tunn, tx, from, out);
                        After::Nothing
                    }
                    TunnResult::WriteToTunnelV4(p, src) => {
                        if routes.owner(src) == Some(&key) {
                            peer.rx_bytes += p.len() as u64;
                            After::ToTun(p.len())
                        } else {
                            *spoofed += 1;
                            log::debug!(
                                "dropped a packet from {} claiming {src}",
                                peer.config.name
                            );
                            After::Nothing
                        }
                    }
                    TunnResult::WriteToTunnelV6(_, _) => After::Nothing,
                };
                // Only an authenticated packet may move a peer's endpoint (roaming).
                if peer.config.endpoint != Some(from) {
                    log::info!("{} is now at {from}", peer.config.name);
                    peer.config.endpoint = Some(from);
                    self.roamed.notify_one();
                }
                after
            }
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

    /// One session per invite holder and endpoint, so concurrent joiners using the same
    /// link get separate sessions and separate answers.
    fn invite_session_for(&self, st: &mut State, key: [u8; 32], from: SocketAddr) -> u32 {
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
            None,
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
            let send = {
                let mut st = self.lock();
                let State { peers, routes, .. } = &mut *st;
                let Some(key) = routes.owner(dst) else {
                    continue;
                };
                let Some(peer) = peers.get_mut(key) else {
                    continue;
                };
                match peer.tunn.encapsulate(&rx[..n], &mut tx) {
                    TunnResult::WriteToNetwork(p) => {
                        peer.tx_bytes += n as u64;
                        peer.config.endpoint.map(|ep| (p.len(), ep))
                    }
                    _ => None,
                }
            };
            if let Some((len, ep)) = send {
                if let Err(e) = self.udp.send_to(&tx[..len], ep).await {
                    log::debug!("send to {ep} failed: {e}");
                }
            }
        }
    }

    async fn timer_loop(&self) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 256];
        loop {
            tick.tick().await;
            let mut out = Vec::new();
            {
                let mut st = self.lock();
                for p in st.peers.values_mut() {
                    if let (TunnResult::WriteToNetwork(pkt), Some(ep)) =
                        (p.tunn.update_timers(&mut buf), p.config.endpoint)
                    {
                        out.push((pkt.to_vec(), ep));
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

/// After a `WriteToNetwork`, boringtun may hold queued packets: flush them.
fn drain(tunn: &mut Tunn, tx: &mut [u8], to: SocketAddr, out: &mut Vec<(Vec<u8>, SocketAddr)>) {
    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], tx) {
        out.push((p.to_vec(), to));
    }
}
