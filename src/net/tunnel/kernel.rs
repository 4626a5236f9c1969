//! The tunnel's side of the kernel: the TUN device opened with offloads (`IFF_VNET_HDR`,
//! TSO and checksum offload, so reads bring TCP super-packets and writes may carry
//! coalesced ones), the UDP socket moved in batches (`recvmmsg` with UDP GRO in, one
//! `UDP_SEGMENT` send per run of a peer's datagrams out, through quinn-udp), the sizes of
//! the queues in between, and which of these offloads are on. Each offload falls back on
//! its own when the kernel refuses it, says so once in the log and in [`OffloadStatus`].
//! The socket is dual-stack (one `[::]` socket, IPv4 arriving v4-mapped) where the host
//! has IPv6, else IPv4 only ([`bind_udp`]); addresses leave this file as plain IPv4 or
//! IPv6 ([`unmapped`]), so the rest of the daemon never sees a v4-mapped one.
//! It moves bytes and nothing else: what a byte means is the core's business, and how a
//! super-packet is cut or built is `net::offload`'s.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::base::config::Offload;

/// The UDP socket's receive buffer. When the daemon cannot keep up, this is where
/// datagrams wait, so it is also the delay we add under load: 4 MiB is ~34 ms at
/// 1 Gbit/s, enough to absorb the bursts a 64-segment GRO read brings without loss,
/// small enough that a CPU-bound router does not add a quarter second of RTT. The kernel
/// doubles it for its bookkeeping; `SO_RCVBUFFORCE` lets root pass `rmem_max`.
pub const UDP_RECV_BUFFER: libc::c_int = 4 * 1024 * 1024;
/// The send buffer: two full GSO batches of every peer in flight are far below it, and
/// a full buffer makes the sender wait for writability (back-pressure) instead of
/// queueing seconds of traffic in the kernel.
pub const UDP_SEND_BUFFER: libc::c_int = 2 * 1024 * 1024;
/// Packets the TUN device queues for the daemon to read (its `txqueuelen`, 500 by
/// default). With TSO each entry may be a 64 KiB super-packet, so the default could hold
/// 32 MiB, a quarter second at 1 Gbit/s, in front of every ping; 256 still covers a
/// read batch several times over while TCP's small-queue limits keep each flow's share
/// to a few entries.
pub const TUN_QUEUE_LEN: u32 = 256;
/// Datagrams one `recvmmsg` may return (quinn-udp's own batch size on Linux).
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// A UDP GSO send carries at most this many bytes: the sum must fit one IP datagram.
pub const GSO_MAX_BYTES: usize = 65_000;
/// And at most this many segments (the kernel's `UDP_MAX_SEGMENTS` on older kernels).
pub const GSO_MAX_SEGMENTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "cannot create the TUN device {name}: {source} (the daemon needs CAP_NET_ADMIN and \
         /dev/net/tun; is another watchalong using {name}?)"
    )]
    CreateTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot set up the tunnel's UDP socket for batches: {0} (a socket option every \
         Linux since 3.x has was refused; check that the daemon runs on Linux with its \
         usual capabilities)"
    )]
    SetUpUdp(#[source] io::Error),
}

/// Which offloads are on now; in JSON under `status`'s `node.offloads`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OffloadStatus {
    /// TUN reads bring TCP super-packets (TSO), split before encryption.
    pub tun_tso: bool,
    /// Decrypted TCP segments are coalesced into super-packets on TUN writes (GRO).
    pub tun_gro: bool,
    /// A peer's datagrams leave in one `UDP_SEGMENT` send.
    pub udp_gso: bool,
    /// The kernel hands over runs of datagrams from one sender in one read.
    pub udp_gro: bool,
}

/// One flag per offload, cleared once when the kernel refuses it.
#[derive(Debug, Default)]
pub struct Offloads {
    tun_tso: AtomicBool,
    tun_gro: AtomicBool,
    udp_gso: AtomicBool,
    udp_gro: AtomicBool,
}

impl Offloads {
    pub fn status(&self) -> OffloadStatus {
        OffloadStatus {
            tun_tso: self.tun_tso.load(Ordering::Relaxed),
            tun_gro: self.tun_gro.load(Ordering::Relaxed),
            udp_gso: self.udp_gso.load(Ordering::Relaxed),
            udp_gro: self.udp_gro.load(Ordering::Relaxed),
        }
    }

    /// The TUN device was opened with offloads (`on`) or without: reads and coalesced
    /// writes go together.
    pub fn set_tun(&self, on: bool) {
        self.tun_tso.store(on, Ordering::Relaxed);
        self.tun_gro.store(on, Ordering::Relaxed);
    }

    pub fn tun_tso(&self) -> bool {
        self.tun_tso.load(Ordering::Relaxed)
    }

    pub fn tun_gro(&self) -> bool {
        self.tun_gro.load(Ordering::Relaxed)
    }

    pub fn udp_gso(&self) -> bool {
        self.udp_gso.load(Ordering::Relaxed)
    }

    /// Turns TUN coalescing off for good; logs only the first time.
    pub fn refuse_tun_gro(&self, e: &io::Error) {
        if self.tun_gro.swap(false, Ordering::Relaxed) {
            log::warn!(
                "the kernel refused a coalesced TUN write ({e}); writing decrypted packets \
                 one by one from now on"
            );
        }
    }

    /// Turns UDP GSO off for good; logs only the first time.
    pub fn refuse_udp_gso(&self, e: &io::Error) {
        if self.udp_gso.swap(false, Ordering::Relaxed) {
            log::warn!(
                "the kernel refused a UDP segmentation (GSO) send ({e}); sending datagrams \
                 one by one from now on"
            );
        }
    }
}

/// A test-only switch (debug builds only): `WATCHALONG_TEST_REFUSE_OFFLOAD` lists the
/// offloads (`tun`: TUNSETOFFLOAD, `tun-gro`: coalesced TUN writes, `gso`: UDP GSO
/// sends) the kernel is to be taken as refusing, so the fallbacks can be tested on a
/// kernel that accepts everything; `tun-icmp` refuses single ICMP packets written to a
/// device with offloads, as a kernel refuses a packet it finds malformed, which must not
/// be taken for a refusal of coalescing. Release builds never read it.
pub(crate) fn refused_for_test(feature: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        LIST.get_or_init(|| std::env::var("WATCHALONG_TEST_REFUSE_OFFLOAD").unwrap_or_default())
            .split(',')
            .any(|f| f.trim() == feature)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = feature;
        false
    }
}

/// Creates the TUN device with TSO and checksum offload when `mode` allows and the kernel
/// accepts them, else a plain one; returns whether offloads are on. The device carries
/// `address`/`prefix` and, where the machine has IPv6, `address6` in its /64
/// ([`add_inner_ipv6`]).
pub fn open_tun(
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    address6: Ipv6Addr,
    mtu: u16,
    mode: Offload,
) -> Result<(AsyncDevice, bool), KernelError> {
    let (dev, offload) = open_tun_v4(name, address, prefix, mtu, mode)?;
    add_inner_ipv6(&dev, name, address6);
    Ok((dev, offload))
}

/// The group's /64 on the device, so the kernel routes the other members' inner IPv6
/// addresses into the tunnel. Added after the device is made, not by the builder: a
/// machine (or namespace) with IPv6 turned off refuses it, and the VPN then carries IPv4
/// alone rather than not at all.
fn add_inner_ipv6(dev: &AsyncDevice, name: &str, address6: Ipv6Addr) {
    if let Err(e) = dev.add_address_v6(address6, INNER_IPV6_PREFIX) {
        log::warn!(
            "cannot give {name} its inner IPv6 address {address6}/{INNER_IPV6_PREFIX} ({e}); \
             the VPN carries IPv4 only on this node (is IPv6 turned off, \
             net.ipv6.conf.all.disable_ipv6?)"
        );
    }
}

/// Moves the device's inner IPv6 address from `old` to `new` (a joiner's group changes
/// from its own to the host's). A failure leaves the node with IPv4 inside the tunnel
/// only, and says so, as at start.
pub fn move_inner_ipv6(dev: &AsyncDevice, name: &str, old: Ipv6Addr, new: Ipv6Addr) {
    if old == new {
        return;
    }
    // Absent when IPv6 was refused at start: nothing to take away then.
    if let Err(e) = dev.remove_address_v6(old, INNER_IPV6_PREFIX) {
        log::debug!("{name} had no inner IPv6 address {old} to remove: {e}");
    }
    add_inner_ipv6(dev, name, new);
}

fn open_tun_v4(
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
    mode: Offload,
) -> Result<(AsyncDevice, bool), KernelError> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .ipv4(address, prefix, None)
            .mtu(mtu)
            .tx_queue_len(TUN_QUEUE_LEN)
            .offload(offload)
            .build_async()
    };
    if mode == Offload::Auto {
        let tried = if refused_for_test("tun") {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            build(true).and_then(|dev| tcp_offloads_only(&dev).map(|()| dev))
        };
        match tried {
            Ok(dev) => return Ok((dev, true)),
            // The device (if any) was dropped with the error, so the name is free again.
            Err(e) => log::warn!(
                "the kernel refused TUN offloads on {name} ({e}); reading and writing one \
                 packet at a time"
            ),
        }
    }
    let dev = build(false).map_err(|source| KernelError::CreateTun {
        name: name.to_string(),
        source,
    })?;
    Ok((dev, false))
}

/// The group's inner IPv6 network is a /64 (`group::place::network6`).
const INNER_IPV6_PREFIX: u8 = 64;

/// tun-rs also asks for UDP segmentation offload (USO) when the kernel has it; we split
/// only TCP super-packets, so the device is told to send us TCP ones only.
fn tcp_offloads_only(dev: &AsyncDevice) -> io::Result<()> {
    if !dev.udp_gso() {
        return Ok(());
    }
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD on a TUN descriptor we own takes the flags as its argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds the tunnel's UDP socket on `port` for both families: one `[::]` socket with
/// `IPV6_V6ONLY` off, so IPv4 peers arrive as `::ffff:a.b.c.d`. Where the host has no
/// IPv6 (the kernel refuses an IPv6 socket), it binds `0.0.0.0` and says so once: the
/// node then reaches and is reached over IPv4 only. Non-blocking, for tokio.
pub fn bind_udp(port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    });
    let sock = match dual {
        Ok(s) => s,
        // Only "no IPv6 here" falls back; a port in use is an error in either family.
        Err(e) if no_ipv6(&e) => {
            log::warn!(
                "this host has no IPv6 ({e}): UDP port {port} listens on IPv4 only, so \
                 IPv6 endpoints in links and announcements cannot be used"
            );
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        }
        Err(e) => return Err(e),
    };
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Whether an error making an IPv6 socket means the host has no IPv6 at all.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EPROTONOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

/// `a` with a v4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`, how a dual-stack socket
/// shows an IPv4 peer) turned back into the IPv4 address it stands for; any other address
/// as it is. Everything that compares, stores, logs or shows an endpoint uses this form.
pub fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// The form of `a` that a socket bound to `local` sends to: IPv4 as v4-mapped on a
/// dual-stack (IPv6) socket, anything else as it is (an IPv6 address on an IPv4-only
/// socket then fails to send, which is the truth: that host has no IPv6).
pub fn for_socket(a: SocketAddr, local: SocketAddr) -> SocketAddr {
    match (a, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => a,
    }
}

/// Sets the socket's buffers to the sizes above, past `rmem_max`/`wmem_max` when root.
pub fn size_buffers(s: &std::net::UdpSocket) {
    for (force, plain, size) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, UDP_RECV_BUFFER),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, UDP_SEND_BUFFER),
    ] {
        if set_int(s, libc::SOL_SOCKET, force, size).is_err() {
            // Without CAP_NET_ADMIN the kernel caps it at its maximum; that is fine.
            let _ = set_int(s, libc::SOL_SOCKET, plain, size);
        }
    }
}

fn set_int(
    s: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The UDP socket with quinn-udp's batched receive and segmented send.
pub struct Udp {
    sock: UdpSocket,
    state: UdpSocketState,
    /// Where the socket is bound: `[::]` for a dual-stack one, else `0.0.0.0`.
    local: SocketAddr,
}

impl Udp {
    /// Sets the socket up for batches; `offloads` learns whether GSO and GRO are on.
    pub fn new(sock: UdpSocket, mode: Offload, offloads: &Offloads) -> Result<Udp, KernelError> {
        let state = UdpSocketState::new((&sock).into()).map_err(KernelError::SetUpUdp)?;
        // quinn-udp forbids fragmentation (QUIC probes the path MTU itself); WireGuard does
        // not probe, so a datagram larger than the path is fragmented rather than lost.
        // `OMIT`, not the kernel's default `WANT`: the path MTU an ICMP message claims is
        // ignored, so a forged "fragmentation needed" cannot shrink what a GSO send may
        // carry and make every full-size batch to a peer fail.
        // On a dual-stack socket the IPv4 option still governs the v4-mapped traffic.
        let _ = set_int(
            &sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_OMIT,
        );
        let local = sock.local_addr().map_err(KernelError::SetUpUdp)?;
        if local.is_ipv6() {
            // The same for IPv6, where quinn-udp also sets `IPV6_DONTFRAG`: a datagram
            // larger than the path leaves in fragments (IPv6 routers never fragment, but
            // the sender may), and a forged "packet too big" cannot shrink GSO batches.
            let _ = set_int(
                &sock,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_OMIT,
            );
            let _ = set_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
        }
        let gro = state.gro_segments() > 1;
        let gso = state.max_gso_segments() > 1;
        let auto = mode == Offload::Auto;
        if gro && !auto {
            // quinn-udp turned GRO on; `off` means one datagram per read.
            let _ = set_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 0);
        }
        offloads.udp_gro.store(gro && auto, Ordering::Relaxed);
        offloads.udp_gso.store(gso && auto, Ordering::Relaxed);
        Ok(Udp { sock, state, local })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Whether the socket takes IPv6 as well as IPv4.
    pub fn dual_stack(&self) -> bool {
        self.local.is_ipv6()
    }

    /// Waits for datagrams and reads up to `bufs.len()` of them (each possibly a GRO run
    /// of `meta[i].stride`-byte datagrams) in one system call. Senders come out
    /// [`unmapped`].
    pub async fn recv(&self, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        loop {
            self.sock.readable().await?;
            let mut slices: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match self.sock.try_io(Interest::READABLE, || {
                self.state.recv((&self.sock).into(), &mut slices, meta)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) => {
                    for m in meta.iter_mut().take(n) {
                        m.addr = unmapped(m.addr);
                    }
                    return Ok(n);
                }
                r => return r,
            }
        }
    }

    /// Sends one datagram.
    pub async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = for_socket(to, self.local);
        self.sock.send_to(datagram, to).await.map(|_| ())
    }

    /// Sends `contents` as datagrams of `segment` bytes (the last may be shorter) to `to`
    /// in one system call.
    pub async fn send_segments(
        &self,
        contents: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        if refused_for_test("gso") {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let t = Transmit {
            destination: for_socket(to, self.local),
            ecn: None,
            contents,
            segment_size: Some(segment),
            src_ip: None,
        };
        loop {
            self.sock.writable().await?;
            match self.sock.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// Whether a failed GSO send means the kernel or the driver cannot segment (rather than
/// a datagram lost for an ordinary reason, such as no route).
pub fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v4_mapped_sender_is_shown_as_plain_ipv4_and_mapped_again_only_for_an_ipv6_socket() {
        let mapped: SocketAddr = "[::ffff:203.0.113.7]:51871".parse().unwrap();
        let plain: SocketAddr = "203.0.113.7:51871".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:51871".parse().unwrap();
        assert_eq!(unmapped(mapped), plain);
        assert_eq!(unmapped(plain), plain);
        assert_eq!(unmapped(v6), v6);
        let dual: SocketAddr = "[::]:51871".parse().unwrap();
        let v4_only: SocketAddr = "0.0.0.0:51871".parse().unwrap();
        assert_eq!(for_socket(plain, dual), mapped);
        assert_eq!(for_socket(plain, v4_only), plain);
        assert_eq!(for_socket(v6, dual), v6);
    }

    #[test]
    fn the_tunnel_socket_takes_ipv4_and_ipv6_and_shows_both_senders_plainly() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = bind_udp(0).unwrap();
            let port = sock.local_addr().unwrap().port();
            let udp = Udp::new(
                UdpSocket::from_std(sock).unwrap(),
                Offload::Off,
                &Offloads::default(),
            )
            .unwrap();
            assert!(udp.dual_stack(), "this test host has IPv6 on loopback");
            let mut bufs = vec![vec![0u8; 2048]; RECV_BATCH];
            let mut meta = vec![RecvMeta::default(); RECV_BATCH];
            for (family, to) in [
                ("IPv4", SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
                ("IPv6", SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
            ] {
                let from = std::net::UdpSocket::bind(SocketAddr::new(
                    if to.is_ipv4() {
                        IpAddr::V4(Ipv4Addr::LOCALHOST)
                    } else {
                        IpAddr::V6(Ipv6Addr::LOCALHOST)
                    },
                    0,
                ))
                .unwrap();
                from.send_to(family.as_bytes(), to).unwrap();
                let n = udp.recv(&mut bufs, &mut meta).await.unwrap();
                assert_eq!(n, 1);
                assert_eq!(&bufs[0][..meta[0].len], family.as_bytes());
                assert_eq!(meta[0].addr, from.local_addr().unwrap(), "{family}");
                // And the answer reaches it, whichever family it came in by.
                udp.send_to(b"back", meta[0].addr).await.unwrap();
                let mut got = [0u8; 8];
                from.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let (k, _) = from.recv_from(&mut got).unwrap();
                assert_eq!(&got[..k], b"back", "{family}");
            }
        });
    }
}
