//! Userspace WireGuard: the I/O shell around the sans-IO [`core::Core`]. It owns one UDP
//! socket, one TUN device and three loops (UDP in and TUN in, each a task of its own so
//! they run on two cores, and the core's timeouts), feeds the core a batch at a time (a
//! `recvmmsg` of datagrams, or the segments of TUN super-packets) and performs the
//! core's [`Output`] once the core has returned, with no lock held: a peer's datagrams in
//! one GSO send, decrypted packets coalesced into TUN writes, join and gossip messages
//! handed to the daemon's channels, a roaming peer announced. The kernel side of each
//! (offloads and their fallbacks) is [`kernel`]. What the tunnel decides (sessions,
//! paths, knocking, the spoof check, forwarding on the host, invite sessions) lives in
//! the core; this file must not decide anything, only move bytes.
//!
//! Locks: the core takes its own (the table's for a snapshot, then one peer's at a time,
//! never two at once; see [`core`]); this file holds none while it calls the core, and
//! none across an `.await`. Each loop brings its own crypto [`Buffers`].
//!
//! Anyone on the internet can send to its port: every datagram first passes the core's
//! [`core::Gate`] (mac1, cookies under load, and the Diffie-Hellman of an initiation)
//! before the core looks anything up, so a flood of handshakes never holds up the data
//! path.

pub mod core;
pub mod kernel;

use std::collections::HashSet;
use std::io::IoSlice;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;
use x25519_dalek::StaticSecret;

use crate::base::config::Offload;
use crate::group::identity::Key;
use crate::net::offload::{self, Coalescer, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

pub use self::core::{
    Buffers, CoreError, GossipIn, InviteMessage, Output, PathKind, PeerConfig, PeerStatus,
};
use self::core::{Core, Gate, Packets, BUF};
use self::kernel::{OffloadStatus, Offloads, Udp};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot receive from the UDP socket: {0}")]
    ReceiveUdp(#[source] std::io::Error),
    #[error("cannot read from the TUN device: {0}")]
    ReadTun(#[source] std::io::Error),
    #[error("cannot send a join answer: {0}")]
    SendInviteReply(#[source] CoreError),
    #[error("a tunnel loop stopped on a bug ({0}); restart the daemon and report the log")]
    RunLoop(#[source] tokio::task::JoinError),
}

/// Packets one TUN batch gathers before the core is called: a super-packet's segments
/// (up to 64 KiB / MSS, 45 at MTU 1420) and more reads while they come without waiting.
/// Also the segments cut from a super-packet at a time: one with more (a small MSS) is
/// cut in several passes, all into the same batch.
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
    /// Takes its own locks; shared by the loops and the daemon's calls.
    core: Core,
    /// The core's gate, run on each datagram before the core looks anything up.
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
            core,
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

    pub fn device(&self) -> &AsyncDevice {
        &self.tun
    }

    pub fn local_port(&self) -> Option<u16> {
        self.udp.local_addr().ok().map(|a| a.port())
    }

    /// This node's VPN address and inner IPv6 address, and the host's key when this node
    /// is a member.
    pub fn set_local(&self, me: Ipv4Addr, me6: Ipv6Addr, host: Option<Key>) {
        self.core.set_local(me, me6, host);
    }

    /// Adds a peer, or updates the name, address and candidates of one already there
    /// without touching its session.
    pub async fn upsert_peer(&self, config: PeerConfig) {
        let mut out = Output::default();
        self.core.upsert_peer(Instant::now(), config, &mut out);
        self.perform(&mut out, &mut Scratch::default()).await;
    }

    pub fn remove_peer(&self, key: &Key) -> bool {
        self.core.remove_peer(key)
    }

    pub fn peer_keys(&self) -> Vec<Key> {
        self.core.peer_keys()
    }

    /// Peers a message can be sent to now, directly or through the host.
    pub fn reachable(&self) -> Vec<Key> {
        self.core.reachable(Instant::now())
    }

    /// The public keys of invites whose holders may open a join session.
    pub fn set_invite_keys(&self, keys: HashSet<Key>) {
        self.core.set_invite_keys(keys);
    }

    /// Sends a join answer on an invite session.
    pub async fn send_invite_reply(&self, session: u32, packet: &[u8]) -> Result<(), TunnelError> {
        let mut out = Output::default();
        self.core
            .send_invite_reply(session, packet, &mut out)
            .map_err(TunnelError::SendInviteReply)?;
        self.perform(&mut out, &mut Scratch::default()).await;
        Ok(())
    }

    /// Sends a gossip datagram to member `to`, directly or through the host.
    pub async fn send_gossip(&self, to: &Key, payload: &[u8]) {
        let mut out = Output::default();
        self.core.send_gossip(Instant::now(), to, payload, &mut out);
        self.perform(&mut out, &mut Scratch::default()).await;
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let unix_now = crate::base::clock::now_secs();
        self.core.status(Instant::now(), unix_now)
    }

    /// Resolves when a peer's endpoint has moved since the last call.
    pub async fn roamed(&self) {
        self.roamed.notified().await
    }

    /// Packets from other members that claimed an address they do not own.
    pub fn spoofed_count(&self) -> u64 {
        self.core.spoofed()
    }

    /// Handshakes dropped before the key work that answers them: a bad mac1, or no valid
    /// cookie while under load (at the gate), or a known peer's initiation within
    /// [`core::INITIATION_INTERVAL`] of the last one answered.
    pub fn handshakes_refused(&self) -> u64 {
        self.gate.refused() + self.core.initiations_limited()
    }

    /// Gossip datagrams another program on this machine tried to send as this daemon.
    pub fn local_gossip_dropped(&self) -> u64 {
        self.core.local_gossip_dropped()
    }

    /// Packets this node passed on between two other members.
    pub fn forwarded_count(&self) -> u64 {
        self.core.forwarded()
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
                    let merged = is_merged(frame);
                    match self.send_frame(frame, merged).await {
                        Ok(_) => continue,
                        // The kernel will not take a merged frame: stop merging, and
                        // write this frame and the rest of the batch cut back into
                        // plain packets, so none is lost or written twice.
                        Err(e) if merged && e.raw_os_error() == Some(libc::EINVAL) => {
                            self.offloads.refuse_tun_gro(&e);
                            refused = true;
                        }
                        // A single packet the kernel refuses says nothing about merging
                        // (the packet itself is what it did not like): it is lost, as
                        // it would be without offloads, and coalescing stays on.
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

    /// One coalesced write, or the refusal the test switches ask for.
    async fn send_frame(&self, frame: &[u8], merged: bool) -> std::io::Result<usize> {
        let refuse = if merged {
            kernel::refused_for_test("tun-gro")
        } else {
            kernel::refused_for_test("tun-icmp") && carries_icmp(frame)
        };
        if refuse {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.tun.send(frame).await
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

    /// Writes a coalesced frame as the packets it was made of, a slice of segments at a
    /// time (a frame of many small segments may have more than one slice holds).
    async fn write_split(&self, frame: &[u8], segments: &mut Vec<Vec<u8>>) {
        if segments.is_empty() {
            // Only ever needed after a refusal, so only then allocated.
            *segments = vec![vec![0u8; SEGMENT_BUF]; TUN_BATCH];
        }
        let mut sizes = [0usize; TUN_BATCH];
        let hdr = match VirtioNetHdr::decode(frame) {
            Ok(hdr) => hdr,
            Err(e) => {
                log::debug!("cannot cut a refused TUN frame back into packets: {e}");
                return;
            }
        };
        let packet = frame.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default();
        let mut first = 0;
        loop {
            match offload::split_from(&hdr, packet, first, segments, &mut sizes) {
                Ok(cut) => {
                    for (seg, &len) in segments.iter().zip(sizes.iter()).take(cut.written) {
                        self.write_plain(seg.get(..len).unwrap_or_default()).await;
                    }
                    first += cut.written;
                    if cut.written == 0 || first >= cut.total {
                        return;
                    }
                }
                Err(e) => {
                    log::debug!("cannot cut a refused TUN frame back into packets: {e}");
                    return;
                }
            }
        }
    }

    /// Runs the three loops until `cancel` fires or a socket fails for good. The UDP and
    /// TUN loops are tasks of their own: with crypto under per-peer locks, one decrypts
    /// while the other encrypts, on two cores.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), TunnelError> {
        let mut udp = tokio::spawn({
            let t = self.clone();
            async move { t.udp_loop().await }
        });
        let mut tun = tokio::spawn({
            let t = self.clone();
            async move { t.tun_loop().await }
        });
        let r = tokio::select! {
            r = &mut udp => r.map_err(TunnelError::RunLoop).and_then(|r| r),
            r = &mut tun => r.map_err(TunnelError::RunLoop).and_then(|r| r),
            () = self.timer_loop() => Ok(()),
            () = cancel.cancelled() => Ok(()),
        };
        cancel.cancel();
        // Both loops are stopped and awaited, so none outlives the tunnel's run.
        udp.abort();
        tun.abort();
        let _ = udp.await;
        let _ = tun.await;
        r
    }

    async fn udp_loop(&self) -> Result<(), TunnelError> {
        let batch = kernel::RECV_BATCH;
        // Each buffer takes one datagram or one GRO run of them (at most 64 KiB).
        let mut bufs = vec![vec![0u8; BUF]; batch];
        let mut meta = vec![quinn_udp::RecvMeta::default(); batch];
        let mut out = Output::default();
        let mut scratch = Scratch::default();
        let mut crypto = Buffers::default();
        self.receiving.send_replace(true);
        loop {
            let n = match self.udp.recv(&mut bufs, &mut meta).await {
                Ok(n) => n,
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(TunnelError::ReceiveUdp(e)),
            };
            // The gate's checks (and an initiation's Diffie-Hellman) come first.
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
                self.core
                    .handle_screened_batch(Instant::now(), screened, &mut crypto, &mut out);
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
        let mut crypto = Buffers::default();
        loop {
            batch.clear();
            let n = self.tun.recv(&mut rx).await.map_err(TunnelError::ReadTun)?;
            take_read(&rx, n, vnet, &mut segments, &mut sizes, &mut batch);
            // More reads while they are ready, so one call covers them all.
            for _ in 1..TUN_READS {
                if batch.len() >= TUN_BATCH {
                    break;
                }
                match self.tun.try_recv(&mut rx) {
                    Ok(n) => take_read(&rx, n, vnet, &mut segments, &mut sizes, &mut batch),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(TunnelError::ReadTun(e)),
                }
            }
            self.core.handle_packets(
                Instant::now(),
                batch.iter().map(|(p, ())| p),
                &mut crypto,
                &mut out,
            );
            self.perform(&mut out, &mut scratch).await;
        }
    }

    async fn timer_loop(&self) {
        let mut out = Output::default();
        let mut scratch = Scratch::default();
        let mut crypto = Buffers::default();
        loop {
            let due = self.core.poll_timeout();
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                // The core always has a next tick; were it ever to have none, waking at a
                // tick's pace costs nothing and keeps the loop from spinning.
                None => tokio::time::sleep(self::core::TIMER_TICK).await,
            }
            self.core
                .handle_timeout(Instant::now(), &mut crypto, &mut out);
            self.perform(&mut out, &mut scratch).await;
        }
    }
}

/// Whether a frame for the TUN device (virtio header, then an IP packet) carries ICMP:
/// what the `tun-icmp` test switch refuses.
fn carries_icmp(frame: &[u8]) -> bool {
    let ip = frame.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default();
    ip.first().is_some_and(|b| b >> 4 == 4) && ip.get(9) == Some(&1)
}

/// Appends the packets of one TUN read to `batch`: a super-packet split into segments
/// when the device has offloads (as many passes through `segments` as it needs, so a
/// super-packet with more segments than it holds is not lost), else the packet itself.
fn take_read(
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
    let packet = read.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default();
    let mut first = 0;
    let failed = loop {
        let cut = VirtioNetHdr::decode(read)
            .and_then(|hdr| offload::split_from(&hdr, packet, first, segments, sizes));
        match cut {
            Ok(cut) => {
                for (seg, &len) in segments.iter().zip(sizes.iter()).take(cut.written) {
                    batch.push(seg.get(..len).unwrap_or_default(), ());
                }
                first += cut.written;
                if cut.written == 0 || first >= cut.total {
                    return;
                }
            }
            Err(e) => break e,
        }
    };
    static LOG: crate::base::logging::Throttle =
        crate::base::logging::Throttle::new(std::time::Duration::from_secs(10));
    if let Some(held) = LOG.allow() {
        log::warn!("dropped a packet read from TUN: {failed} ({held} more since the last line)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 super-packet as the kernel hands it over, virtio header first:
    /// `payload` cut into `mss`-byte segments, sequence numbers from `seq`.
    fn super_packet(payload: &[u8], mss: u16, seq: u32) -> Vec<u8> {
        let hdr = VirtioNetHdr {
            flags: 0,
            gso_type: offload::GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut ip = vec![0u8; 40];
        ip[0] = 0x45;
        let total = u16::try_from(40 + payload.len()).unwrap();
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = 6; // TCP
        ip[12..16].copy_from_slice(&[100, 64, 0, 1]);
        ip[16..20].copy_from_slice(&[100, 64, 0, 2]);
        ip[20..22].copy_from_slice(&5000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&6000u16.to_be_bytes());
        ip[24..28].copy_from_slice(&seq.to_be_bytes());
        ip[32] = 5 << 4;
        ip[33] = 0x10; // ACK
        ip[34..36].copy_from_slice(&1000u16.to_be_bytes());
        let mut frame = hdr.to_bytes().to_vec();
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(payload);
        frame
    }

    /// The batch one TUN read of `frame` (with its virtio header) makes.
    fn read_one(frame: &[u8]) -> Packets<()> {
        let mut segments = vec![vec![0u8; SEGMENT_BUF]; TUN_BATCH];
        let mut sizes = vec![0usize; TUN_BATCH];
        let mut batch: Packets<()> = Packets::default();
        take_read(
            frame,
            frame.len(),
            true,
            &mut segments,
            &mut sizes,
            &mut batch,
        );
        batch
    }

    #[test]
    fn a_super_packet_with_more_segments_than_a_tun_batch_reaches_the_batch_whole() {
        // A peer that announced a 100-byte MSS: 60 000 bytes make 600 segments, more than
        // four times the segment buffers a TUN batch keeps.
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        let frame = super_packet(&payload, 100, 7);
        let batch = read_one(&frame);
        assert_eq!(batch.len(), 600);
        let mut joined = Vec::new();
        for (i, (p, ())) in batch.iter().enumerate() {
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            assert_eq!(seq, 7 + 100 * i as u32, "segment {i} is out of place");
            joined.extend_from_slice(&p[40..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn a_read_that_is_not_a_valid_super_packet_adds_nothing_to_the_batch() {
        let mut frame = super_packet(&[1u8; 1000], 100, 0);
        // Not TCP: the header says TCPv4 but the packet disagrees.
        frame[VIRTIO_NET_HDR_LEN + 9] = 17;
        let batch = read_one(&frame);
        assert!(batch.is_empty());
    }
}
