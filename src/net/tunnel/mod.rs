//! Userspace WireGuard: the I/O shell around the sans-IO [`core::Core`]. It owns one UDP
//! socket, one TUN device and three loops (UDP in, TUN in, the core's timeouts), feeds
//! each input to the core under one lock and performs the core's [`Output`] once the lock
//! is released: datagrams sent, packets written to the TUN device, join and gossip
//! messages handed to the daemon's channels, a roaming peer announced. What the tunnel
//! decides (sessions, paths, knocking, the spoof check, forwarding on the host, invite
//! sessions) lives in the core; this file must not decide anything, only move bytes.
//!
//! Anyone on the internet can send to its port: every datagram first passes the core's
//! [`core::Gate`] (mac1, cookies under load, and the Diffie-Hellman of an initiation)
//! outside the lock, so a flood of handshakes never holds up the data path.

pub mod core;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;
use x25519_dalek::StaticSecret;

use crate::base::lock::Recover;
use crate::group::identity::Key;

use self::core::{Core, Gate, BUF};
pub use self::core::{
    CoreError, GossipIn, InviteMessage, Output, PathKind, PeerConfig, PeerStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot receive from the UDP socket: {0}")]
    ReceiveUdp(#[source] std::io::Error),
    #[error("cannot read from the TUN device: {0}")]
    ReadTun(#[source] std::io::Error),
    #[error("cannot send a join answer: {0}")]
    SendInviteReply(#[source] CoreError),
}

pub struct Tunnel {
    udp: UdpSocket,
    tun: AsyncDevice,
    core: Mutex<Core>,
    /// The core's gate, run on each datagram before the lock is taken.
    gate: Arc<Gate>,
    invite_tx: mpsc::Sender<InviteMessage>,
    gossip_tx: mpsc::Sender<GossipIn>,
    roamed: tokio::sync::Notify,
    /// Set once the UDP loop reads its socket: until then a handshake gets no answer.
    receiving: tokio::sync::watch::Sender<bool>,
}

impl Tunnel {
    pub fn new(
        udp: UdpSocket,
        tun: AsyncDevice,
        secret: StaticSecret,
        invite_tx: mpsc::Sender<InviteMessage>,
        gossip_tx: mpsc::Sender<GossipIn>,
    ) -> Arc<Tunnel> {
        let core = Core::new(secret, Box::new(rand::rngs::OsRng), Instant::now());
        Arc::new(Tunnel {
            gate: core.gate(),
            core: Mutex::new(core),
            udp,
            tun,
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

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.core.locked()
    }

    pub fn device(&self) -> &AsyncDevice {
        &self.tun
    }

    pub fn local_port(&self) -> Option<u16> {
        self.udp.local_addr().ok().map(|a| a.port())
    }

    /// This node's VPN address, and the host's key when this node is a member.
    pub fn set_local(&self, me: Ipv4Addr, host: Option<Key>) {
        self.lock().set_local(me, host);
    }

    /// Adds a peer, or updates the name, address and candidates of one already there
    /// without touching its session.
    pub async fn upsert_peer(&self, config: PeerConfig) {
        let mut out = Output::default();
        self.lock().upsert_peer(Instant::now(), config, &mut out);
        self.perform(&mut out).await;
    }

    pub fn remove_peer(&self, key: &Key) -> bool {
        self.lock().remove_peer(key)
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.lock().peer_keys()
    }

    /// Peers a message can be sent to now, directly or through the host.
    pub fn reachable(&self) -> Vec<Key> {
        self.lock().reachable(Instant::now())
    }

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&self, keys: HashSet<Key>) {
        self.lock().set_invite_keys(keys);
    }

    /// Sends a join answer on an invite session.
    pub async fn send_invite_reply(&self, session: u32, packet: &[u8]) -> Result<(), TunnelError> {
        let mut out = Output::default();
        self.lock()
            .send_invite_reply(session, packet, &mut out)
            .map_err(TunnelError::SendInviteReply)?;
        self.perform(&mut out).await;
        Ok(())
    }

    /// Sends a gossip datagram to member `to`, directly or through the host.
    pub async fn send_gossip(&self, to: &Key, payload: &[u8]) {
        let mut out = Output::default();
        self.lock()
            .send_gossip(Instant::now(), to, payload, &mut out);
        self.perform(&mut out).await;
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let unix_now = crate::base::clock::now_secs();
        self.lock().status(Instant::now(), unix_now)
    }

    /// Resolves when a peer's endpoint has moved since the last call.
    pub async fn roamed(&self) {
        self.roamed.notified().await
    }

    /// Packets from other members that claimed an address they do not own.
    pub fn spoofed_count(&self) -> u64 {
        self.lock().spoofed()
    }

    /// Handshake-shaped datagrams dropped before any key work: a bad mac1, or no valid
    /// cookie while under load.
    pub fn handshakes_refused(&self) -> u64 {
        self.gate.refused()
    }

    /// Gossip datagrams another program on this machine tried to send as this daemon.
    pub fn local_gossip_dropped(&self) -> u64 {
        self.lock().local_gossip_dropped()
    }

    /// Packets this node passed on between two other members.
    pub fn forwarded_count(&self) -> u64 {
        self.lock().forwarded()
    }

    /// Does what the core asked, with no lock held, and leaves `out` empty.
    async fn perform(&self, out: &mut Output) {
        for (p, ep) in out.transmits.iter() {
            if let Err(e) = self.udp.send_to(p, ep).await {
                log::debug!("send to {ep} failed: {e}");
            }
        }
        for (p, ()) in out.tun.iter() {
            if let Err(e) = self.tun.send(p).await {
                log::debug!("write to TUN failed: {e}");
            }
        }
        for msg in out.invites.drain(..) {
            if self.invite_tx.try_send(msg).is_err() {
                log::debug!("join handler busy; dropped a join message");
            }
        }
        for msg in out.gossip.drain(..) {
            if self.gossip_tx.try_send(msg).is_err() {
                log::debug!("gossip handler busy; dropped a message");
            }
        }
        if out.roamed {
            self.roamed.notify_one();
        }
        out.clear();
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
        let mut out = Output::default();
        self.receiving.send_replace(true);
        loop {
            let (n, from) = match self.udp.recv_from(&mut rx).await {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(TunnelError::ReceiveUdp(e)),
            };
            let datagram = rx.get(..n).unwrap_or_default();
            if let Some(screened) = self.gate.screen(from, datagram, &mut out) {
                self.lock()
                    .handle_screened(Instant::now(), from, datagram, screened, &mut out);
            }
            self.perform(&mut out).await;
        }
    }

    async fn tun_loop(&self) -> Result<(), TunnelError> {
        let mut rx = vec![0u8; BUF];
        let mut out = Output::default();
        loop {
            let n = self.tun.recv(&mut rx).await.map_err(TunnelError::ReadTun)?;
            let packet = rx.get(..n).unwrap_or_default();
            self.lock().handle_packet(Instant::now(), packet, &mut out);
            self.perform(&mut out).await;
        }
    }

    async fn timer_loop(&self) {
        let mut out = Output::default();
        loop {
            let due = self.lock().poll_timeout();
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                // The core always has a next tick; were it ever to have none, waking at a
                // tick's pace costs nothing and keeps the loop from spinning.
                None => tokio::time::sleep(self::core::TIMER_TICK).await,
            }
            self.lock().handle_timeout(Instant::now(), &mut out);
            self.perform(&mut out).await;
        }
    }
}
