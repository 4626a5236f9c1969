//! Userspace WireGuard: the I/O shell around the sans-IO [`core::Core`]. It owns one UDP
//! socket, one TUN device and three loops (UDP in, TUN in, the core's timeouts), feeds
//! the core a batch at a time under one lock (a `recvmmsg` of datagrams, or the segments
//! of TUN super-packets) and performs the core's [`Output`] once the lock is released:
//! a peer's datagrams in one GSO send, decrypted packets coalesced into TUN writes, join
//! and gossip messages handed to the daemon's channels, a roaming peer announced. The
//! kernel side of each (offloads and their fallbacks) is [`kernel`]. What the tunnel
//! decides (sessions, paths, knocking, the spoof check, forwarding on the host, invite
//! sessions) lives in the core; this file must not decide anything, only move bytes.
//!
//! Anyone on the internet can send to its port: every datagram first passes the core's
//! [`core::Gate`] (mac1, cookies under load, and the Diffie-Hellman of an initiation)
//! outside the lock, so a flood of handshakes never holds up the data path.

pub mod core;
pub mod kernel;

use std::collections::HashSet;
use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;
use x25519_dalek::StaticSecret;

use crate::base::config::Offload;
use crate::base::lock::Recover;
use crate::group::identity::Key;
use crate::net::offload::{self, Coalescer, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

use self::core::{Core, Gate, Packets, BUF};
pub use self::core::{
    CoreError, GossipIn, InviteMessage, Output, PathKind, PeerConfig, PeerStatus,
};
use self::kernel::{OffloadStatus, Offloads, Udp};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot receive from the UDP socket: {0}")]
    ReceiveUdp(#[source] std::io::Error),
    #[error("cannot read from the TUN device: {0}")]
    ReadTun(#[source] std::io::Error),
    #[error("cannot send a join answer: {0}")]
    SendInviteReply(#[source] CoreError),
}

/// Packets one TUN batch gathers before the core is locked: a super-packet's segments
/// (up to 64 KiB / MSS, 45 at MTU 1420) and more reads while they come without waiting.
const TUN_BATCH: usize = 128;
/// Reads one TUN batch may take: each may bring a whole super-packet.
const TUN_READS: usize = 8;
/// Room for one segment: the largest MTU the config allows.
const SEGMENT_BUF: usize = 9_000;

pub struct Tunnel {
    /// The largest datagram a GSO batch carries: a full tunnel packet, sealed.
    gso_segment_max: usize,
    udp: Udp,
    tun: AsyncDevice,
    /// Which offloads are on; each is cleared once if the kernel refuses it.
    offloads: Offloads,
    core: Mutex<Core>,
    /// The core's gate, run on each datagram before the lock is taken.
    gate: Arc<Gate>,
    invite_tx: mpsc::Sender<InviteMessage>,
    gossip_tx: mpsc::Sender<GossipIn>,
    roamed: tokio::sync::Notify,
    /// Set once the UDP loop reads its socket: until then a handshake gets no answer.
    receiving: tokio::sync::watch::Sender<bool>,
}

/// Whether a frame for the TUN device is a super-packet the coalescer merged.
fn is_merged(frame: &[u8]) -> bool {
    VirtioNetHdr::decode(frame).is_ok_and(|h| h.gso_type != offload::GSO_NONE)
}

/// What one loop keeps between batches, so that coalescing reuses its buffers (only the
/// list of the batch's packets is made anew each time).
#[derive(Default)]
struct Scratch {
    coalescer: Coalescer,
    frames_bytes: Vec<u8>,
    frames: Vec<Range<usize>>,
    /// Where a frame the kernel refused is cut back into packets.
    segments: Vec<Vec<u8>>,
}

impl Tunnel {
    /// `tun_offload` says whether the device was opened with offloads
    /// ([`kernel::open_tun`]); `mode` is the config's `[tunnel] offload`.
    pub fn new(
        udp: tokio::net::UdpSocket,
        tun: AsyncDevice,
        tun_offload: bool,
        mode: Offload,
        secret: StaticSecret,
        invite_tx: mpsc::Sender<InviteMessage>,
        gossip_tx: mpsc::Sender<GossipIn>,
    ) -> Result<Arc<Tunnel>, kernel::KernelError> {
        let offloads = Offloads::default();
        offloads.set_tun(tun_offload);
        let udp = Udp::new(udp, mode, &offloads)?;
        let core = Core::new(secret, Box::new(rand::rngs::OsRng), Instant::now());
        // A full tunnel packet once sealed: WireGuard pads to 16 bytes and adds a 16-byte
        // header and a 16-byte tag.
        let mtu = usize::from(tun.mtu().unwrap_or(1420));
        let gso_segment_max = mtu.div_ceil(16) * 16 + 32;
        Ok(Arc::new(Tunnel {
            gso_segment_max,
            gate: core.gate(),
            core: Mutex::new(core),
            udp,
            tun,
            offloads,
            invite_tx,
            gossip_tx,
            roamed: tokio::sync::Notify::new(),
            receiving: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Which offloads are on now.
    pub fn offloads(&self) -> OffloadStatus {
        self.offloads.status()
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
        self.perform(&mut out, &mut Scratch::default()).await;
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
        self.perform(&mut out, &mut Scratch::default()).await;
        Ok(())
    }

    /// Sends a gossip datagram to member `to`, directly or through the host.
    pub async fn send_gossip(&self, to: &Key, payload: &[u8]) {
        let mut out = Output::default();
        self.lock()
            .send_gossip(Instant::now(), to, payload, &mut out);
        self.perform(&mut out, &mut Scratch::default()).await;
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
    async fn perform(&self, out: &mut Output, scratch: &mut Scratch) {
        self.send_datagrams(&out.transmits).await;
        self.write_tun(&out.tun, scratch).await;
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

    /// Each run of one peer's datagrams in one GSO send while the kernel takes them, else
    /// one by one. Only datagrams no larger than a full tunnel packet's are batched: a
    /// bigger one (a member's oversized packet the host forwards) would exceed the link
    /// and fail the whole batch. A batch the kernel fails is sent again one by one, never
    /// dropped; only an error that says the kernel cannot segment at all turns GSO off.
    async fn send_datagrams(&self, transmits: &Packets<SocketAddr>) {
        let (max_count, max_bytes) = if self.offloads.udp_gso() {
            (kernel::GSO_MAX_SEGMENTS, kernel::GSO_MAX_BYTES)
        } else {
            (1, usize::MAX)
        };
        for run in transmits.runs(max_count, max_bytes) {
            if run.count > 1 && run.segment <= self.gso_segment_max && self.offloads.udp_gso() {
                match self
                    .udp
                    .send_segments(run.bytes, run.segment, run.tag)
                    .await
                {
                    Ok(()) => continue,
                    Err(e) if kernel::gso_refused(&e) => self.offloads.refuse_udp_gso(&e),
                    Err(e) => log::debug!("batch to {} failed ({e}); one by one", run.tag),
                }
            }
            // One by one: no GSO, a single datagram, an oversized one, or the batch failed.
            for d in run.bytes.chunks(run.segment.max(1)) {
                if let Err(e) = self.udp.send_to(d, run.tag).await {
                    log::debug!("send to {} failed: {e}", run.tag);
                }
            }
        }
    }

    /// Decrypted packets for the kernel: coalesced into super-packets when the device has
    /// offloads, else one write each.
    async fn write_tun(&self, packets: &Packets<()>, scratch: &mut Scratch) {
        if packets.is_empty() {
            return;
        }
        if !self.offloads.tun_tso() {
            for (p, ()) in packets.iter() {
                if let Err(e) = self.tun.send(p).await {
                    log::debug!("write to TUN failed: {e}");
                }
            }
            return;
        }
        if self.offloads.tun_gro() {
            let list: Vec<&[u8]> = packets.iter().map(|(p, ())| p).collect();
            scratch
                .coalescer
                .coalesce(&list, &mut scratch.frames_bytes, &mut scratch.frames);
            let mut refused = false;
            for f in &scratch.frames {
                let frame = scratch.frames_bytes.get(f.clone()).unwrap_or_default();
                if !refused {
                    let sent = if kernel::refused_for_test("tun-gro") && is_merged(frame) {
                        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
                    } else {
                        self.tun.send(frame).await
                    };
                    match sent {
                        Ok(_) => continue,
                        // The kernel will not take a merged frame: stop merging, and
                        // write this frame and the rest of the batch cut back into
                        // plain packets, so none is lost or written twice.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            self.offloads.refuse_tun_gro(&e);
                            refused = true;
                        }
                        Err(e) => {
                            log::debug!("write to TUN failed: {e}");
                            continue;
                        }
                    }
                }
                self.write_split(frame, &mut scratch.segments).await;
            }
            return;
        }
        for (p, ()) in packets.iter() {
            self.write_plain(p).await;
        }
    }

    /// Writes a packet with an empty virtio header ("a plain packet") to a device opened
    /// with offloads.
    async fn write_plain(&self, packet: &[u8]) {
        let none = VirtioNetHdr::default().to_bytes();
        let frame = [IoSlice::new(&none), IoSlice::new(packet)];
        if let Err(e) = self.tun.send_vectored(&frame).await {
            log::debug!("write to TUN failed: {e}");
        }
    }

    /// Writes a coalesced frame as the packets it was made of.
    async fn write_split(&self, frame: &[u8], segments: &mut Vec<Vec<u8>>) {
        if segments.is_empty() {
            // Only ever needed after a refusal, so only then allocated.
            *segments = vec![vec![0u8; SEGMENT_BUF]; TUN_BATCH];
        }
        let mut sizes = [0usize; TUN_BATCH];
        let split = VirtioNetHdr::decode(frame).and_then(|hdr| {
            let packet = frame.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default();
            offload::split(&hdr, packet, segments, &mut sizes)
        });
        match split {
            Ok(count) => {
                for (seg, &len) in segments.iter().zip(sizes.iter()).take(count) {
                    self.write_plain(seg.get(..len).unwrap_or_default()).await;
                }
            }
            Err(e) => log::debug!("cannot cut a refused TUN frame back into packets: {e}"),
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
        let batch = kernel::RECV_BATCH;
        // Each buffer takes one datagram or one GRO run of them (at most 64 KiB).
        let mut bufs = vec![vec![0u8; BUF]; batch];
        let mut meta = vec![quinn_udp::RecvMeta::default(); batch];
        let mut out = Output::default();
        let mut scratch = Scratch::default();
        self.receiving.send_replace(true);
        loop {
            let n = match self.udp.recv(&mut bufs, &mut meta).await {
                Ok(n) => n,
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(TunnelError::ReceiveUdp(e)),
            };
            // The gate's checks (and an initiation's Diffie-Hellman) run without the lock.
            let mut screened = Vec::with_capacity(n);
            for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
                let run = buf.get(..m.len).unwrap_or_default();
                for datagram in run.chunks(m.stride.max(1)) {
                    if let Some(s) = self.gate.screen(m.addr, datagram, &mut out) {
                        screened.push((m.addr, datagram, s));
                    }
                }
            }
            if !screened.is_empty() {
                self.lock()
                    .handle_screened_batch(Instant::now(), screened, &mut out);
            }
            self.perform(&mut out, &mut scratch).await;
        }
    }

    async fn tun_loop(&self) -> Result<(), TunnelError> {
        let vnet = self.offloads.tun_tso();
        let head = if vnet { VIRTIO_NET_HDR_LEN } else { 0 };
        let mut rx = vec![0u8; head + BUF];
        let mut segments = vec![vec![0u8; SEGMENT_BUF]; if vnet { TUN_BATCH } else { 0 }];
        let mut sizes = vec![0usize; segments.len()];
        let mut batch: Packets<()> = Packets::default();
        let mut out = Output::default();
        let mut scratch = Scratch::default();
        loop {
            batch.clear();
            let n = self.tun.recv(&mut rx).await.map_err(TunnelError::ReadTun)?;
            self.take_read(&rx, n, vnet, &mut segments, &mut sizes, &mut batch);
            // More reads while they are ready, so one lock covers them all.
            for _ in 1..TUN_READS {
                if batch.len() >= TUN_BATCH {
                    break;
                }
                match self.tun.try_recv(&mut rx) {
                    Ok(n) => self.take_read(&rx, n, vnet, &mut segments, &mut sizes, &mut batch),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(TunnelError::ReadTun(e)),
                }
            }
            self.lock()
                .handle_packets(Instant::now(), batch.iter().map(|(p, ())| p), &mut out);
            self.perform(&mut out, &mut scratch).await;
        }
    }

    /// Appends the packets of one TUN read to `batch`: a super-packet split into segments
    /// when the device has offloads, else the packet itself.
    fn take_read(
        &self,
        rx: &[u8],
        n: usize,
        vnet: bool,
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
        batch: &mut Packets<()>,
    ) {
        let read = rx.get(..n).unwrap_or_default();
        if !vnet {
            batch.push(read, ());
            return;
        }
        let split = VirtioNetHdr::decode(read).and_then(|hdr| {
            let packet = read.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default();
            offload::split(&hdr, packet, segments, sizes)
        });
        match split {
            Ok(count) => {
                for (seg, &len) in segments.iter().zip(sizes.iter()).take(count) {
                    batch.push(seg.get(..len).unwrap_or_default(), ());
                }
            }
            Err(e) => {
                static LOG: crate::base::logging::Throttle =
                    crate::base::logging::Throttle::new(std::time::Duration::from_secs(10));
                if let Some(held) = LOG.allow() {
                    log::warn!(
                        "dropped a packet read from TUN: {e} ({held} more since the last line)"
                    );
                }
            }
        }
    }

    async fn timer_loop(&self) {
        let mut out = Output::default();
        let mut scratch = Scratch::default();
        loop {
            let due = self.lock().poll_timeout();
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                // The core always has a next tick; were it ever to have none, waking at a
                // tick's pace costs nothing and keeps the loop from spinning.
                None => tokio::time::sleep(self::core::TIMER_TICK).await,
            }
            self.lock().handle_timeout(Instant::now(), &mut out);
            self.perform(&mut out, &mut scratch).await;
        }
    }
}
