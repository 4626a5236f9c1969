//! TUN offloads, pure: the 10-byte `virtio_net_hdr` a TUN device opened with
//! `IFF_VNET_HDR` puts before every packet, [`split`] (one TCP super-packet the kernel
//! handed us under TSO becomes MTU-sized segments with their own IP and TCP headers and
//! checksums, before encryption) and [`Coalescer`] (a batch of decrypted packets becomes
//! fewer, larger TCP packets for the kernel, GRO on write). It owns these byte rules; it
//! must not do I/O, use `unsafe`, allocate per packet, or depend on the rest of the crate.
//!
//! Every byte it reads is hostile: the super-packet comes from the kernel, but the packets
//! to coalesce come from peers. [`split`] answers a malformed header or packet with an
//! [`OffloadError`]; [`Coalescer::coalesce`] never fails, it passes through untouched
//! whatever it does not fully understand, and it never merges a segment whose checksums
//! are wrong (the merged packet is marked for checksum offload, which would launder them).
//! What merges, and why each rule exists, is listed on [`Coalescer`].

use std::ops::Range;

/// The size of `struct virtio_net_hdr` (without the `num_buffers` of the mergeable form,
/// which TUN does not use).
pub const VIRTIO_NET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; the rest must be computed over the bytes from `csum_start` on.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the kernel already checked the checksum.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`: one ordinary packet.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`: a TCP over IPv4 super-packet.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`: UDP fragmentation offload; not supported.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`: a TCP over IPv6 super-packet.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: UDP segmentation offload; not supported.
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: the super-packet's first segment carries CWR.
pub const GSO_ECN: u8 = 0x80;

/// The largest IP packet a super-packet may become: IPv4's total length and IPv6's payload
/// length are 16-bit fields (we never build jumbograms).
pub const MAX_SUPER_PACKET: usize = 65_535;
/// How many flows one batch tracks by default. A batch is at most a few hundred packets;
/// beyond this many flows, new flows pass through unmerged, so a peer spraying flows costs
/// a bounded scan per packet.
pub const DEFAULT_MAX_FLOWS: usize = 64;

/// Where the TCP checksum sits in the TCP header (`csum_offset` for TCP).
const TCP_CSUM_OFFSET: usize = 16;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// IPv4 flags and fragment offset: DF, and the reserved bit with MF and the offset, which
/// must all be zero for a packet we touch.
const IPV4_DF: u16 = 0x4000;
const IPV4_NOT_WHOLE: u16 = 0xbfff;

/// What went wrong with a super-packet or a virtio header. The kernel wrote these bytes,
/// so each one means the TUN device and the daemon disagree about the offloads in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error(
        "a virtio header needs {VIRTIO_NET_HDR_LEN} bytes, the read returned {len}: \
         the TUN device was not opened with IFF_VNET_HDR; turn offloads off ([tunnel] offload = \"off\")"
    )]
    DecodeHeader { len: usize },
    #[error(
        "the virtio header's flags {flags:#04x} carry bits this daemon does not know; \
         turn offloads off ([tunnel] offload = \"off\")"
    )]
    DecodeFlags { flags: u8 },
    #[error("a virtio header needs {VIRTIO_NET_HDR_LEN} bytes, the buffer has {len}")]
    EncodeHeader { len: usize },
    #[error(
        "gso_type {gso_type:#04x} is not segmented here (only TCP over IPv4 and IPv6): \
         the TUN device was given an offload the daemon did not ask for"
    )]
    SplitUnsupported { gso_type: u8 },
    #[error("the packet is {len} bytes, too short for its {part}")]
    SplitTruncated { part: &'static str, len: usize },
    #[error("the packet does not match its virtio header: {problem}")]
    SplitMismatch { problem: &'static str },
    #[error("splitting needs {needed} output buffers and sizes, {given} were given")]
    SplitBuffers { needed: usize, given: usize },
    #[error("output buffer {index} holds {len} bytes, its segment needs {needed}")]
    SplitBufferSize {
        index: usize,
        len: usize,
        needed: usize,
    },
    #[error(
        "the checksum to complete lies outside the packet (csum_start {start}, csum_offset \
         {offset}, {len} bytes)"
    )]
    CompleteChecksum { start: u16, offset: u16, len: usize },
}

/// `struct virtio_net_hdr` from `linux/virtio_net.h`, as TUN reads and writes it: its
/// 16-bit fields are little-endian (TUN's default on the little-endian machines we run on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Bytes of IP and transport headers. Not trusted on input: some kernels put the
    /// whole packet's length here, so [`split`] reads the TCP header's own length.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where the checksummed bytes start (the transport header).
    pub csum_start: u16,
    /// Where the checksum sits, from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads a header from the first [`VIRTIO_NET_HDR_LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, OffloadError> {
        let Some(b) = bytes.get(..VIRTIO_NET_HDR_LEN) else {
            return Err(OffloadError::DecodeHeader { len: bytes.len() });
        };
        let flags = b[0];
        // A flag we do not know could change what the bytes mean (RSC_INFO reuses the
        // checksum fields), so the packet is refused rather than misread.
        if flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
            return Err(OffloadError::DecodeFlags { flags });
        }
        let le = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Ok(Self {
            flags,
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first [`VIRTIO_NET_HDR_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), OffloadError> {
        let len = out.len();
        let Some(b) = out.get_mut(..VIRTIO_NET_HDR_LEN) else {
            return Err(OffloadError::EncodeHeader { len });
        };
        b.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------
// Checksums (RFC 1071). Sums are kept unfolded in a u64 over big-endian 32-bit words; a
// one's-complement sum over 32-bit words folds to the same 16-bit sum as over 16-bit ones.
// Pieces summed separately must start at even offsets of the whole, which holds for every
// piece here (pseudo-header, headers, then the payload last).

fn sum_be(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let Some(&last) = pairs.remainder().first() {
        acc += u64::from(last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    // Two folds bring any u64 sum within 32 bits, three more within 16.
    acc as u16
}

/// The unfolded pseudo-header sum for a TCP segment of `l4_len` bytes in `packet`, whose
/// addresses were checked to be present by the caller.
fn pseudo_sum(packet: &[u8], v6: bool, l4_len: usize) -> u64 {
    let addrs = if v6 { &packet[8..40] } else { &packet[12..20] };
    // The length is 16 bits in IPv4's pseudo-header and 32 in IPv6's; both are the same
    // words in the sum.
    sum_be(addrs, u64::from(PROTO_TCP) + l4_len as u64)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

// ---------------------------------------------------------------------------------------
// Split (TSO read from TUN → segments).

/// Where the headers of a TCP packet end, checked against its length.
struct TcpLayout {
    ip_len: usize,
    tcp_len: usize,
}

fn split_layout(packet: &[u8], v6: bool) -> Result<TcpLayout, OffloadError> {
    use OffloadError::{SplitMismatch, SplitTruncated};
    let len = packet.len();
    let ip_len = if v6 {
        if len < IPV6_HEADER {
            return Err(SplitTruncated {
                part: "IPv6 header",
                len,
            });
        }
        if packet[0] >> 4 != 6 {
            return Err(SplitMismatch {
                problem: "gso_type says TCPv6 but the packet is not IPv6",
            });
        }
        if packet[6] != PROTO_TCP {
            return Err(SplitMismatch {
                problem: "the IPv6 packet does not carry TCP right after its header",
            });
        }
        IPV6_HEADER
    } else {
        if len < IPV4_MIN_HEADER {
            return Err(SplitTruncated {
                part: "IPv4 header",
                len,
            });
        }
        if packet[0] >> 4 != 4 {
            return Err(SplitMismatch {
                problem: "gso_type says TCPv4 but the packet is not IPv4",
            });
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if ihl < IPV4_MIN_HEADER {
            return Err(SplitMismatch {
                problem: "the IPv4 header length is below 20 bytes",
            });
        }
        if len < ihl {
            return Err(SplitTruncated {
                part: "IPv4 options",
                len,
            });
        }
        if packet[9] != PROTO_TCP {
            return Err(SplitMismatch {
                problem: "the IPv4 packet does not carry TCP",
            });
        }
        if u16::from_be_bytes([packet[6], packet[7]]) & IPV4_NOT_WHOLE != 0 {
            return Err(SplitMismatch {
                problem: "an IPv4 fragment cannot be segmented",
            });
        }
        ihl
    };
    if len < ip_len + TCP_MIN_HEADER {
        return Err(SplitTruncated {
            part: "TCP header",
            len,
        });
    }
    let tcp_len = usize::from(packet[ip_len + 12] >> 4) * 4;
    if tcp_len < TCP_MIN_HEADER {
        return Err(SplitMismatch {
            problem: "the TCP header length is below 20 bytes",
        });
    }
    if len < ip_len + tcp_len {
        return Err(SplitTruncated {
            part: "TCP options",
            len,
        });
    }
    Ok(TcpLayout { ip_len, tcp_len })
}

/// Splits one packet read from TUN, with its virtio header, into segments ready to
/// encrypt: `outs[i][..sizes[i]]` for `i` below the returned count. Fails with
/// [`OffloadError::SplitBuffers`] when the packet has more segments than `outs` can take;
/// [`split_from`] cuts such a packet a slice of segments at a time.
pub fn split<B: AsMut<[u8]>>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    outs: &mut [B],
    sizes: &mut [usize],
) -> Result<usize, OffloadError> {
    let given = outs.len().min(sizes.len());
    let cut = split_from(hdr, packet, 0, outs, sizes)?;
    if cut.written < cut.total {
        return Err(OffloadError::SplitBuffers {
            needed: cut.total,
            given,
        });
    }
    Ok(cut.written)
}

/// What one [`split_from`] call wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Segments written to `outs[..written]`.
    pub written: usize,
    /// Segments the whole packet makes; the next call starts at `first + written`.
    pub total: usize,
}

/// Segments `first..` of one packet read from TUN, with its virtio header, as many as
/// `outs` and `sizes` can take: `outs[i][..sizes[i]]` for `i` below the returned
/// `written`. A super-packet can have more segments than a caller keeps buffers for (a
/// peer that announces a small MSS makes 64 KiB of data into hundreds), so the caller
/// takes it a slice at a time instead of losing it.
///
/// A TCP super-packet (`GSO_TCPV4`/`GSO_TCPV6`) becomes `ceil(payload / gso_size)`
/// segments, the last possibly shorter: each with the super-packet's IP header (IPv4:
/// total length, an ID one higher per segment, a fresh header checksum; IPv6: payload
/// length), its TCP header with the sequence number advanced by the payload before it,
/// FIN and PSH only on the last segment and CWR only on the first, and a full TCP
/// checksum. A `GSO_NONE` packet is copied whole into `outs[0]`, its checksum completed
/// when it carries `F_NEEDS_CSUM`. The sizes are checked before anything is written.
pub fn split_from<B: AsMut<[u8]>>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    first: usize,
    outs: &mut [B],
    sizes: &mut [usize],
) -> Result<Cut, OffloadError> {
    let v6 = match hdr.gso_type {
        GSO_NONE if first == 0 => {
            let written = split_none(hdr, packet, outs, sizes)?;
            return Ok(Cut { written, total: 1 });
        }
        GSO_NONE => {
            return Ok(Cut {
                written: 0,
                total: 1,
            })
        }
        t if t & !GSO_ECN == GSO_TCPV4 => false,
        t if t & !GSO_ECN == GSO_TCPV6 => true,
        gso_type => return Err(OffloadError::SplitUnsupported { gso_type }),
    };
    let TcpLayout { ip_len, tcp_len } = split_layout(packet, v6)?;
    if hdr.flags & F_NEEDS_CSUM != 0
        && (usize::from(hdr.csum_start) != ip_len
            || usize::from(hdr.csum_offset) != TCP_CSUM_OFFSET)
    {
        return Err(OffloadError::SplitMismatch {
            problem: "csum_start and csum_offset do not point at the TCP checksum",
        });
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::SplitMismatch {
            problem: "gso_size is zero",
        });
    }
    let head = ip_len + tcp_len;
    let payload = &packet[head..];
    if head + mss.min(payload.len()) > MAX_SUPER_PACKET {
        return Err(OffloadError::SplitMismatch {
            problem: "gso_size makes a segment larger than an IP packet can be",
        });
    }
    // A super-packet with no payload still leaves as one segment (its header).
    let segments = payload.len().div_ceil(mss).max(1);
    let given = outs.len().min(sizes.len());
    if given == 0 && first < segments {
        return Err(OffloadError::SplitBuffers {
            needed: segments - first,
            given,
        });
    }
    let count = segments.saturating_sub(first).min(given);
    let seg_len = |i: usize| payload.len().saturating_sub(i * mss).min(mss);
    for (index, out) in outs.iter_mut().take(count).enumerate() {
        let needed = head + seg_len(first + index);
        let len = out.as_mut().len();
        if len < needed {
            return Err(OffloadError::SplitBufferSize { index, len, needed });
        }
    }

    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let first_seq = u32::from_be_bytes([
        packet[ip_len + 4],
        packet[ip_len + 5],
        packet[ip_len + 6],
        packet[ip_len + 7],
    ]);
    for (slot, (out, size)) in outs
        .iter_mut()
        .zip(sizes.iter_mut())
        .take(count)
        .enumerate()
    {
        let i = first + slot;
        let start = i * mss;
        let data = &payload[start..start + seg_len(i)];
        let total = head + data.len();
        let seg = &mut out.as_mut()[..total];
        seg[..head].copy_from_slice(&packet[..head]);
        seg[head..].copy_from_slice(data);

        // `total` was checked against MAX_SUPER_PACKET above, so these fit in 16 bits.
        if v6 {
            seg[4..6].copy_from_slice(&((total - IPV6_HEADER) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            // The ID wraps like the kernel's own counter does.
            seg[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].fill(0);
            let ip_csum = !fold(sum_be(&seg[..ip_len], 0));
            seg[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        }

        let tcp = ip_len;
        // Sequence numbers are modulo 2^32 by definition.
        seg[tcp + 4..tcp + 8].copy_from_slice(&first_seq.wrapping_add(start as u32).to_be_bytes());
        let mut flags = seg[tcp + 13];
        if i + 1 < segments {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            // CWR answers one ECE once, on the first segment (as the kernel's TSO does).
            flags &= !TCP_CWR;
        }
        seg[tcp + 13] = flags;
        seg[tcp + 16..tcp + 18].fill(0);
        let csum = !fold(sum_be(&seg[tcp..], pseudo_sum(seg, v6, total - ip_len)));
        seg[tcp + 16..tcp + 18].copy_from_slice(&csum.to_be_bytes());
        *size = total;
    }
    Ok(Cut {
        written: count,
        total: segments,
    })
}

fn split_none<B: AsMut<[u8]>>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    outs: &mut [B],
    sizes: &mut [usize],
) -> Result<usize, OffloadError> {
    let (Some(out), Some(size)) = (outs.first_mut(), sizes.first_mut()) else {
        return Err(OffloadError::SplitBuffers {
            needed: 1,
            given: 0,
        });
    };
    let out = out.as_mut();
    let Some(dst) = out.get_mut(..packet.len()) else {
        return Err(OffloadError::SplitBufferSize {
            index: 0,
            len: out.len(),
            needed: packet.len(),
        });
    };
    dst.copy_from_slice(packet);
    complete_checksum(hdr, dst)?;
    *size = packet.len();
    Ok(1)
}

/// Completes the checksum of a packet whose header says `F_NEEDS_CSUM` (a no-op without
/// it), in place: the field at `csum_start + csum_offset` holds the pseudo-header sum, and
/// becomes the checksum of everything from `csum_start` on.
pub fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::CompleteChecksum {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    let mut csum = !fold(sum_be(&packet[start..], 0));
    // In UDP a zero checksum means "none"; a computed zero is sent as all ones.
    if csum == 0 && transport_protocol(packet) == Some(PROTO_UDP) {
        csum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

fn transport_protocol(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => packet.get(9).copied(),
        6 => packet.get(6).copied(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Coalesce (decrypted batch → fewer packets written to TUN).

/// A TCP flow: both addresses (IPv4 ones in the first 4 bytes) and both ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
}

/// Reads the flow of any IPv4 or IPv6 packet that carries TCP right after its IP header
/// and is long enough to show its ports, mergeable or not: a packet of a flow that cannot
/// be merged must still end that flow's open group, so the flow's order is kept.
fn flow_key(pkt: &[u8]) -> Option<(FlowKey, usize)> {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (v6, ip_len) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < IPV4_MIN_HEADER || *pkt.get(9)? != PROTO_TCP {
                return None;
            }
            src[..4].copy_from_slice(pkt.get(12..16)?);
            dst[..4].copy_from_slice(pkt.get(16..20)?);
            (false, ihl)
        }
        6 => {
            if *pkt.get(6)? != PROTO_TCP {
                return None;
            }
            src.copy_from_slice(pkt.get(8..24)?);
            dst.copy_from_slice(pkt.get(24..40)?);
            (true, IPV6_HEADER)
        }
        _ => return None,
    };
    let mut ports = [0u8; 4];
    ports.copy_from_slice(pkt.get(ip_len..ip_len + 4)?);
    Some((
        FlowKey {
            v6,
            src,
            dst,
            ports,
        },
        ip_len,
    ))
}

/// What a mergeable segment looks like; `None` from [`segment`] means "pass through".
#[derive(Debug, Clone, Copy)]
struct Segment {
    ip_len: usize,
    tcp_len: usize,
    seq: u32,
    payload: usize,
    /// IPv4 identification; 0 for IPv6.
    id: u16,
    /// PSH or FIN: this segment may end a group but not be followed in it.
    ends: bool,
}

/// Checks that `pkt` (whose flow is known, TCP at `ip_len`) is a segment that may be
/// merged at all: a whole, option-free IPv4 packet or an IPv6 one with no extension
/// header, lengths matching the buffer, ACK set, no SYN/RST/URG/CWR, some payload, and
/// both checksums right.
fn segment(pkt: &[u8], v6: bool, ip_len: usize) -> Option<Segment> {
    let len = pkt.len();
    if len > MAX_SUPER_PACKET {
        return None;
    }
    let id = if v6 {
        if usize::from(be16(pkt, 4)?) != len.checked_sub(IPV6_HEADER)? {
            return None;
        }
        0
    } else {
        // IPv4 options would have to be replicated into every segment the kernel makes
        // again; the kernel's GRO refuses them too.
        if ip_len != IPV4_MIN_HEADER
            || usize::from(be16(pkt, 2)?) != len
            || be16(pkt, 6)? & IPV4_NOT_WHOLE != 0
            || fold(sum_be(pkt.get(..ip_len)?, 0)) != 0xffff
        {
            return None;
        }
        be16(pkt, 4)?
    };
    let tcp_len = usize::from(*pkt.get(ip_len + 12)? >> 4) * 4;
    if tcp_len < TCP_MIN_HEADER || len < ip_len + tcp_len || len == ip_len + tcp_len {
        return None;
    }
    let flags = pkt[ip_len + 13];
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST | TCP_URG | TCP_CWR) != 0 {
        return None;
    }
    if fold(sum_be(&pkt[ip_len..], pseudo_sum(pkt, v6, len - ip_len))) != 0xffff {
        return None;
    }
    Some(Segment {
        ip_len,
        tcp_len,
        seq: be32(pkt, ip_len + 4)?,
        payload: len - ip_len - tcp_len,
        id,
        ends: flags & (TCP_PSH | TCP_FIN) != 0,
    })
}

/// How the IPv4 IDs of a group go: unknown until its second segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdMode {
    Unknown,
    /// One higher per segment, as every segment sent separately has.
    Incrementing,
    /// The same in every segment: allowed only with DF (RFC 6864 atomic datagrams, whose
    /// ID means nothing; some stacks send 0).
    Fixed,
}

/// Packets of the batch that leave as one: a lone packet, or a run of merged segments.
#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    last: usize,
    count: usize,
    /// Set for groups of mergeable segments; `None` for a packet passed through.
    seg: Option<Segment>,
    v6: bool,
    next_seq: u32,
    /// IP bytes so far.
    total: usize,
    id_mode: IdMode,
    /// Nothing more may join: PSH/FIN seen, a short segment seen, or another packet of
    /// the flow went by.
    closed: bool,
}

/// A flow's group that may still grow.
#[derive(Debug, Clone, Copy)]
struct Flow {
    key: FlowKey,
    group: usize,
}

const NO_NEXT: usize = usize::MAX;

/// GRO on write: merges TCP segments of one batch into super-packets for the TUN device.
///
/// Segments join the open group of their flow (same addresses and ports) when they follow
/// it exactly: the next sequence number; IPv4 with the same TOS, TTL and DF, no options,
/// and an ID one higher (or, with DF, the same ID throughout); IPv6 with the same traffic
/// class, flow label and hop limit; the same TCP header apart from sequence number,
/// checksum and PSH/FIN (so acknowledgement, window and options are equal, as the kernel
/// will copy the first header into every segment if it segments again); a payload no
/// larger than the group's first. A segment carrying PSH or FIN, or shorter than the
/// first, ends its group. SYN, RST, URG and CWR segments, pure ACKs, IPv4 fragments and
/// options, IPv6 extension headers, bad checksums and anything not TCP pass through as
/// they came, with an empty virtio header. A group never exceeds [`MAX_SUPER_PACKET`]
/// bytes, and at most `max_flows` flows are tracked per batch.
///
/// Output order: groups leave in the order of their first packet, and a packet of a flow
/// that cannot join its flow's group ends that group, so within a flow nothing is
/// reordered (for every TCP packet whose ports can be read after its IP header).
#[derive(Debug)]
pub struct Coalescer {
    max_flows: usize,
    flows: Vec<Flow>,
    groups: Vec<Group>,
    next: Vec<usize>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FLOWS)
    }
}

impl Coalescer {
    /// A coalescer that merges at most `max_flows` flows per batch.
    pub fn new(max_flows: usize) -> Self {
        Self {
            max_flows,
            flows: Vec::new(),
            groups: Vec::new(),
            next: Vec::new(),
        }
    }

    /// Coalesces one batch of IP packets. `out` and `frames` are replaced (their
    /// capacity kept for the next batch): `out[frames[i].clone()]` is the i-th write for
    /// the TUN device, a virtio header followed by its packet.
    pub fn coalesce<P: AsRef<[u8]>>(
        &mut self,
        packets: &[P],
        out: &mut Vec<u8>,
        frames: &mut Vec<Range<usize>>,
    ) {
        self.flows.clear();
        self.groups.clear();
        self.next.clear();
        self.next.resize(packets.len(), NO_NEXT);
        out.clear();
        frames.clear();

        for (index, pkt) in packets.iter().enumerate() {
            self.place(packets, index, pkt.as_ref());
        }
        for group in &self.groups {
            let start = out.len();
            emit(group, packets, &self.next, out);
            frames.push(start..out.len());
        }
    }

    fn place<P: AsRef<[u8]>>(&mut self, packets: &[P], index: usize, pkt: &[u8]) {
        let lone = Group {
            first: index,
            last: index,
            count: 1,
            seg: None,
            v6: false,
            next_seq: 0,
            total: pkt.len(),
            id_mode: IdMode::Unknown,
            closed: true,
        };
        let Some((key, ip_len)) = flow_key(pkt) else {
            self.groups.push(lone);
            return;
        };
        let seg = segment(pkt, key.v6, ip_len);
        let flow = self.flows.iter().position(|f| f.key == key);
        if let (Some(f), Some(s)) = (flow, seg) {
            let g = self.flows[f].group;
            if let Some(mode) = joins(&self.groups[g], packets, pkt, &s) {
                let group = &mut self.groups[g];
                self.next[group.last] = index;
                group.last = index;
                group.count += 1;
                group.next_seq = s.seq.wrapping_add(s.payload as u32);
                group.total += s.payload;
                group.id_mode = mode;
                let first_payload = group.seg.map_or(0, |first| first.payload);
                group.closed = s.ends || s.payload < first_payload;
                return;
            }
        }
        if let Some(f) = flow {
            // This packet leaves after the flow's group, so nothing may join that group
            // any more: a later segment would overtake this packet.
            let g = self.flows[f].group;
            self.groups[g].closed = true;
        }
        let Some(s) = seg else {
            self.groups.push(lone);
            return;
        };
        let group = Group {
            seg: Some(s),
            v6: key.v6,
            next_seq: s.seq.wrapping_add(s.payload as u32),
            closed: s.ends,
            ..lone
        };
        match flow {
            Some(f) => self.flows[f].group = self.groups.len(),
            None if self.flows.len() < self.max_flows => {
                self.flows.push(Flow {
                    key,
                    group: self.groups.len(),
                });
            }
            None => {
                // The table is full: this flow's packets pass through one by one.
                self.groups.push(lone);
                return;
            }
        }
        self.groups.push(group);
    }
}

/// Whether segment `s` (packet `pkt`) may join `group`, and the group's ID mode if it does.
fn joins<P: AsRef<[u8]>>(group: &Group, packets: &[P], pkt: &[u8], s: &Segment) -> Option<IdMode> {
    let first_seg = group.seg?;
    if group.closed
        || s.seq != group.next_seq
        || s.payload > first_seg.payload
        || s.tcp_len != first_seg.tcp_len
        || group.total + s.payload > MAX_SUPER_PACKET
    {
        return None;
    }
    let first = packets.get(group.first)?.as_ref();
    let mode = if group.v6 {
        // Version, traffic class and flow label, then the hop limit.
        if first.get(..4)? != pkt.get(..4)? || first.get(7)? != pkt.get(7)? {
            return None;
        }
        IdMode::Unknown
    } else {
        // TOS, DF (the other flag bits are zero in both), TTL.
        if first.get(1)? != pkt.get(1)?
            || first.get(6)? != pkt.get(6)?
            || first.get(8)? != pkt.get(8)?
        {
            return None;
        }
        let df = be16(pkt, 6)? & IPV4_DF != 0;
        let step = s.id.wrapping_sub(first_seg.id);
        let next = group.count as u16; // the ID counter wraps at 16 bits
        match group.id_mode {
            IdMode::Unknown | IdMode::Incrementing if step == next => IdMode::Incrementing,
            IdMode::Unknown | IdMode::Fixed if step == 0 && df => IdMode::Fixed,
            _ => return None,
        }
    };
    let (a, b) = (
        first.get(s.ip_len..s.ip_len + s.tcp_len)?,
        pkt.get(s.ip_len..s.ip_len + s.tcp_len)?,
    );
    let same_header = a.get(8..13)? == b.get(8..13)? // acknowledgement, data offset
        && (a[13] & !(TCP_PSH | TCP_FIN)) == (b[13] & !(TCP_PSH | TCP_FIN))
        && a.get(14..16)? == b.get(14..16)? // window
        && a.get(18..)? == b.get(18..)?; // urgent pointer, options
    same_header.then_some(mode)
}

/// Appends one frame for `group`: an empty virtio header and the packet as it came, or a
/// GSO header and the merged super-packet with its checksum left to the kernel.
fn emit<P: AsRef<[u8]>>(group: &Group, packets: &[P], next: &[usize], out: &mut Vec<u8>) {
    let first = packets.get(group.first).map_or(&[][..], |p| p.as_ref());
    let (Some(seg), true) = (group.seg, group.count > 1) else {
        // A lone packet keeps its own checksum: an empty header asks nothing of the kernel.
        out.extend_from_slice(&VirtioNetHdr::default().to_bytes());
        out.extend_from_slice(first);
        return;
    };
    let (ip_len, head) = (seg.ip_len, seg.ip_len + seg.tcp_len);
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if group.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        // All below MAX_SUPER_PACKET, checked when the segments were parsed.
        hdr_len: head as u16,
        gso_size: seg.payload as u16,
        csum_start: ip_len as u16,
        csum_offset: TCP_CSUM_OFFSET as u16,
    };
    out.extend_from_slice(&hdr.to_bytes());
    let pkt_at = out.len();
    out.extend_from_slice(first.get(..head).unwrap_or_default());
    let mut last_flags = 0;
    let mut i = group.first;
    while i != NO_NEXT {
        let p = packets.get(i).map_or(&[][..], |p| p.as_ref());
        out.extend_from_slice(p.get(head..).unwrap_or_default());
        last_flags = p.get(ip_len + 13).copied().unwrap_or(0);
        i = next.get(i).copied().unwrap_or(NO_NEXT);
    }
    let pkt = &mut out[pkt_at..];
    let total = pkt.len();
    if group.v6 {
        pkt[4..6].copy_from_slice(&((total - IPV6_HEADER) as u16).to_be_bytes());
    } else {
        pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        pkt[10..12].fill(0);
        let ip_csum = !fold(sum_be(&pkt[..ip_len], 0));
        pkt[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    }
    // The super-packet ends as its last segment did.
    pkt[ip_len + 13] |= last_flags & (TCP_PSH | TCP_FIN);
    // With F_NEEDS_CSUM the kernel expects the folded pseudo-header sum, not inverted, in
    // the checksum field, and adds the rest itself.
    let partial = fold(pseudo_sum(pkt, group.v6, total - ip_len));
    let csum_at = ip_len + TCP_CSUM_OFFSET;
    pkt[csum_at..csum_at + 2].copy_from_slice(&partial.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A TCP packet to build, IPv4 or IPv6.
    #[derive(Debug, Clone)]
    struct Tcp {
        v6: bool,
        src: u8,
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        tos: u8,
        ttl: u8,
        id: u16,
        df: bool,
        flow_label: u32,
        ip_options: Vec<u8>,
        tcp_options: Vec<u8>,
        payload: Vec<u8>,
    }

    impl Tcp {
        fn new(v6: bool, payload: Vec<u8>) -> Self {
            Self {
                v6,
                src: 1,
                sport: 40_000,
                dport: 443,
                seq: 0xffff_f000, // wraps within a few segments
                ack: 77,
                flags: TCP_ACK,
                window: 501,
                tos: 0,
                ttl: 64,
                id: 0xfffe, // wraps within a few segments
                df: true,
                flow_label: 0x1_2345,
                ip_options: Vec::new(),
                // Timestamps, as Linux sends them: NOP NOP TS.
                tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                payload,
            }
        }

        fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }

        fn ip_len(&self) -> usize {
            if self.v6 {
                IPV6_HEADER
            } else {
                IPV4_MIN_HEADER + self.ip_options.len()
            }
        }

        /// The packet with a valid IPv4 header checksum and a zero TCP checksum.
        fn raw(&self) -> Vec<u8> {
            let tcp_len = TCP_MIN_HEADER + self.tcp_options.len();
            let total = self.ip_len() + tcp_len + self.payload.len();
            let mut p = Vec::with_capacity(total);
            if self.v6 {
                let tc = self.tos;
                let fl = self.flow_label;
                p.extend_from_slice(&[
                    0x60 | (tc >> 4),
                    (tc << 4) | (fl >> 16) as u8,
                    (fl >> 8) as u8,
                    fl as u8,
                ]);
                p.extend_from_slice(&((total - IPV6_HEADER) as u16).to_be_bytes());
                p.extend_from_slice(&[PROTO_TCP, self.ttl]);
                p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, self.src]);
                p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            } else {
                p.push(0x40 | (self.ip_len() / 4) as u8);
                p.push(self.tos);
                p.extend_from_slice(&(total as u16).to_be_bytes());
                p.extend_from_slice(&self.id.to_be_bytes());
                p.extend_from_slice(&[
                    if self.df { 0x40 } else { 0 },
                    0,
                    self.ttl,
                    PROTO_TCP,
                    0,
                    0,
                ]);
                p.extend_from_slice(&[10, 0, 0, self.src, 10, 0, 0, 2]);
                p.extend_from_slice(&self.ip_options);
                let csum = !fold(sum_be(&p, 0));
                p[10..12].copy_from_slice(&csum.to_be_bytes());
            }
            p.extend_from_slice(&self.sport.to_be_bytes());
            p.extend_from_slice(&self.dport.to_be_bytes());
            p.extend_from_slice(&self.seq.to_be_bytes());
            p.extend_from_slice(&self.ack.to_be_bytes());
            p.push(((tcp_len / 4) as u8) << 4);
            p.push(self.flags);
            p.extend_from_slice(&self.window.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]);
            p.extend_from_slice(&self.tcp_options);
            p.extend_from_slice(&self.payload);
            p
        }

        /// A segment as a peer sends it: every checksum complete.
        fn segment(&self) -> Vec<u8> {
            let mut p = self.raw();
            let t = self.ip_len();
            let csum = !fold(sum_be(&p[t..], pseudo_sum(&p, self.v6, p.len() - t)));
            p[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());
            p
        }

        /// A super-packet as the kernel hands it under TSO: the TCP checksum field holds
        /// the pseudo-header sum only.
        fn super_packet(&self) -> Vec<u8> {
            let mut p = self.raw();
            let t = self.ip_len();
            let partial = fold(pseudo_sum(&p, self.v6, p.len() - t));
            p[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
            p
        }

        fn kernel_hdr(&self, mss: u16) -> VirtioNetHdr {
            VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if self.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: (self.ip_len() + TCP_MIN_HEADER + self.tcp_options.len()) as u16,
                gso_size: mss,
                csum_start: self.ip_len() as u16,
                csum_offset: TCP_CSUM_OFFSET as u16,
            }
        }

        /// The `n`-th of consecutive `mss`-byte segments of this flow.
        fn nth(&self, n: u32, mss: usize) -> Self {
            self.clone().with(|t| {
                t.seq = t.seq.wrapping_add(n * mss as u32);
                t.id = t.id.wrapping_add(n as u16);
                t.payload = pattern(mss, n as u8);
            })
        }
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    fn is_v6(p: &[u8]) -> bool {
        p[0] >> 4 == 6
    }

    fn ip_len(p: &[u8]) -> usize {
        if is_v6(p) {
            IPV6_HEADER
        } else {
            usize::from(p[0] & 0x0f) * 4
        }
    }

    fn tcp_len(p: &[u8]) -> usize {
        usize::from(p[ip_len(p) + 12] >> 4) * 4
    }

    fn ip_header_valid(p: &[u8]) -> bool {
        if is_v6(p) {
            usize::from(be16(p, 4).unwrap()) == p.len() - IPV6_HEADER
        } else {
            usize::from(be16(p, 2).unwrap()) == p.len()
                && fold(sum_be(&p[..ip_len(p)], 0)) == 0xffff
        }
    }

    fn tcp_checksum_valid(p: &[u8]) -> bool {
        let t = ip_len(p);
        fold(sum_be(&p[t..], pseudo_sum(p, is_v6(p), p.len() - t))) == 0xffff
    }

    fn payload(p: &[u8]) -> &[u8] {
        &p[ip_len(p) + tcp_len(p)..]
    }

    fn seq(p: &[u8]) -> u32 {
        be32(p, ip_len(p) + 4).unwrap()
    }

    fn tcp_flags(p: &[u8]) -> u8 {
        p[ip_len(p) + 13]
    }

    fn split_all(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut outs = vec![vec![0u8; 65_536]; 64];
        let mut sizes = vec![0usize; 64];
        let n = split(hdr, packet, &mut outs, &mut sizes)?;
        Ok(outs
            .into_iter()
            .zip(sizes)
            .take(n)
            .map(|(mut o, s)| {
                o.truncate(s);
                o
            })
            .collect())
    }

    /// Coalesces, and returns each frame's header and packet.
    fn coalesce_all(c: &mut Coalescer, packets: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        c.coalesce(packets, &mut out, &mut frames);
        frames
            .iter()
            .map(|r| {
                let f = &out[r.clone()];
                (
                    VirtioNetHdr::decode(f).unwrap(),
                    f[VIRTIO_NET_HDR_LEN..].to_vec(),
                )
            })
            .collect()
    }

    /// A merged frame's packet with its checksum completed, as the kernel will.
    fn completed(hdr: &VirtioNetHdr, p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        complete_checksum(hdr, &mut p).unwrap();
        p
    }

    #[test]
    fn a_virtio_header_is_ten_little_endian_bytes_and_decodes_back() {
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let mut b = [0xaa; 12];
        hdr.encode(&mut b).unwrap();
        assert_eq!(b, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0xaa, 0xaa]);
        assert_eq!(VirtioNetHdr::decode(&b).unwrap(), hdr);
    }

    #[test]
    fn a_short_or_unknown_virtio_header_is_an_error() {
        assert_eq!(
            VirtioNetHdr::decode(&[0; 9]),
            Err(OffloadError::DecodeHeader { len: 9 })
        );
        assert_eq!(
            VirtioNetHdr::decode(&[]),
            Err(OffloadError::DecodeHeader { len: 0 })
        );
        let rsc = [4u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            VirtioNetHdr::decode(&rsc),
            Err(OffloadError::DecodeFlags { flags: 4 })
        );
        assert_eq!(
            VirtioNetHdr::default().encode(&mut [0; 9]),
            Err(OffloadError::EncodeHeader { len: 9 })
        );
    }

    fn round_trip(v6: bool) {
        let t = Tcp::new(v6, pattern(5_000, 3)).with(|t| t.flags = TCP_ACK | TCP_PSH);
        let sup = t.super_packet();
        let hdr = t.kernel_hdr(1_400);
        let segs = split_all(&hdr, &sup).unwrap();

        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(ip_header_valid(s), "segment {i} has a bad IP header");
            assert!(tcp_checksum_valid(s), "segment {i} has a bad TCP checksum");
            assert_eq!(seq(s), t.seq.wrapping_add(1_400 * i as u32));
            if !v6 {
                assert_eq!(be16(s, 4).unwrap(), t.id.wrapping_add(i as u16));
            }
            joined.extend_from_slice(payload(s));
        }
        assert_eq!(joined, t.payload);

        let frames = coalesce_all(&mut Coalescer::default(), &segs);
        assert_eq!(frames.len(), 1);
        let (got_hdr, got) = &frames[0];
        assert_eq!(got_hdr, &hdr);
        assert_eq!(
            got, &sup,
            "the merged packet is the super-packet byte for byte"
        );
        let full = completed(got_hdr, got);
        assert!(ip_header_valid(&full) && tcp_checksum_valid(&full));
    }

    #[test]
    fn split_then_coalesce_gives_back_the_ipv4_super_packet_with_valid_checksums() {
        round_trip(false);
    }

    #[test]
    fn split_then_coalesce_gives_back_the_ipv6_super_packet_with_valid_checksums() {
        round_trip(true);
    }

    #[test]
    fn split_puts_psh_and_fin_on_the_last_segment_only_and_cwr_on_the_first_only() {
        for v6 in [false, true] {
            let t = Tcp::new(v6, pattern(3_000, 0))
                .with(|t| t.flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR);
            let mut hdr = t.kernel_hdr(1_000);
            hdr.gso_type |= GSO_ECN;
            let segs = split_all(&hdr, &t.super_packet()).unwrap();
            let flags: Vec<u8> = segs.iter().map(|s| tcp_flags(s)).collect();
            assert_eq!(
                flags,
                [TCP_ACK | TCP_CWR, TCP_ACK, TCP_ACK | TCP_PSH | TCP_FIN],
                "v6 = {v6}"
            );
            assert!(segs.iter().all(|s| tcp_checksum_valid(s)));
        }
    }

    #[test]
    fn split_ends_with_a_short_segment_when_the_payload_is_not_a_multiple_of_gso_size() {
        let t = Tcp::new(false, pattern(2_500, 9));
        let segs = split_all(&t.kernel_hdr(1_000), &t.super_packet()).unwrap();
        let lens: Vec<usize> = segs.iter().map(|s| payload(s).len()).collect();
        assert_eq!(lens, [1_000, 1_000, 500]);
        let last = &segs[2];
        assert!(ip_header_valid(last) && tcp_checksum_valid(last));
        assert_eq!(payload(last), &t.payload[2_000..]);

        // A payload that fits one segment leaves as one, checksummed.
        let one = Tcp::new(true, pattern(700, 1));
        let segs = split_all(&one.kernel_hdr(1_000), &one.super_packet()).unwrap();
        assert_eq!(segs, [one.segment()]);
    }

    #[test]
    fn split_without_gso_completes_the_checksum_and_changes_nothing_else() {
        let t = Tcp::new(false, pattern(300, 5));
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            csum_start: 20,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        assert_eq!(split_all(&hdr, &t.super_packet()).unwrap(), [t.segment()]);
        // Without F_NEEDS_CSUM the bytes are copied as they are, wrong checksum and all.
        let plain = VirtioNetHdr::default();
        assert_eq!(
            split_all(&plain, &t.super_packet()).unwrap(),
            [t.super_packet()]
        );
    }

    #[test]
    fn completing_a_udp_checksum_that_sums_to_zero_writes_all_ones() {
        // An IPv4/UDP packet whose bytes from csum_start sum to 0xffff: the complement is
        // zero, which UDP reserves for "no checksum".
        let mut p = vec![
            0x45, 0, 0, 30, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend_from_slice(&[0xff, 0xf5, 0, 0, 0, 10, 0, 0, 0, 0]);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..Default::default()
        };
        complete_checksum(&hdr, &mut p).unwrap();
        assert_eq!(&p[26..28], &[0xff, 0xff]);
    }

    #[test]
    fn a_super_packet_with_more_segments_than_buffers_is_cut_a_slice_at_a_time_into_the_same_segments(
    ) {
        for v6 in [false, true] {
            // 200 segments of 100 bytes: more than the 64 buffers `split_all` keeps.
            let mut t = Tcp::new(v6, pattern(20_000, 3));
            t.flags |= TCP_PSH;
            let sup = t.super_packet();
            let hdr = t.kernel_hdr(100);
            let mut wide = vec![vec![0u8; 2_000]; 256];
            let mut wide_sizes = vec![0usize; 256];
            let whole = split(&hdr, &sup, &mut wide, &mut wide_sizes).unwrap();
            assert_eq!(whole, 200);
            assert_eq!(
                split(&hdr, &sup, &mut wide[..64], &mut wide_sizes[..64]),
                Err(OffloadError::SplitBuffers {
                    needed: 200,
                    given: 64
                })
            );
            let mut outs = vec![vec![0u8; 2_000]; 64];
            let mut sizes = vec![0usize; 64];
            let mut sliced: Vec<Vec<u8>> = Vec::new();
            let mut first = 0;
            loop {
                let cut = split_from(&hdr, &sup, first, &mut outs, &mut sizes).unwrap();
                assert_eq!(cut.total, 200);
                for (o, &n) in outs.iter().zip(&sizes).take(cut.written) {
                    sliced.push(o[..n].to_vec());
                }
                first += cut.written;
                if first >= cut.total {
                    break;
                }
            }
            let expected: Vec<Vec<u8>> = wide
                .iter()
                .zip(&wide_sizes)
                .take(whole)
                .map(|(o, &n)| o[..n].to_vec())
                .collect();
            assert_eq!(sliced, expected, "v6 = {v6}");
        }
    }

    #[test]
    fn split_answers_truncated_packets_and_malformed_headers_with_errors() {
        for v6 in [false, true] {
            let t = Tcp::new(v6, pattern(2_000, 0));
            let sup = t.super_packet();
            let hdr = t.kernel_hdr(1_000);
            let head = usize::from(hdr.hdr_len);
            for len in 0..head {
                assert!(
                    matches!(
                        split_all(&hdr, &sup[..len]),
                        Err(OffloadError::SplitTruncated { .. })
                    ),
                    "v6 = {v6}, {len} bytes"
                );
            }
            let udp = VirtioNetHdr {
                gso_type: GSO_UDP_L4,
                ..hdr
            };
            assert_eq!(
                split_all(&udp, &sup),
                Err(OffloadError::SplitUnsupported {
                    gso_type: GSO_UDP_L4
                })
            );
            let udp = VirtioNetHdr {
                gso_type: GSO_UDP,
                ..hdr
            };
            assert_eq!(
                split_all(&udp, &sup),
                Err(OffloadError::SplitUnsupported { gso_type: GSO_UDP })
            );
            let zero = VirtioNetHdr { gso_size: 0, ..hdr };
            assert!(matches!(
                split_all(&zero, &sup),
                Err(OffloadError::SplitMismatch { .. })
            ));
            let off = VirtioNetHdr {
                csum_start: hdr.csum_start + 2,
                ..hdr
            };
            assert!(matches!(
                split_all(&off, &sup),
                Err(OffloadError::SplitMismatch { .. })
            ));
            let other = VirtioNetHdr {
                gso_type: if v6 { GSO_TCPV4 } else { GSO_TCPV6 },
                ..hdr
            };
            assert!(split_all(&other, &sup).is_err());

            let mut few = vec![vec![0u8; 2_000]; 1];
            assert_eq!(
                split(&hdr, &sup, &mut few, &mut [0; 1]),
                Err(OffloadError::SplitBuffers {
                    needed: 2,
                    given: 1
                })
            );
            let mut small = vec![vec![0u8; 2_000], vec![0u8; 100]];
            assert!(matches!(
                split(&hdr, &sup, &mut small, &mut [0; 2]),
                Err(OffloadError::SplitBufferSize { index: 1, .. })
            ));
        }
        let t = Tcp::new(false, Vec::new());
        let mut p = t.segment();
        let len = p.len();
        let outside = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: len as u16,
            ..Default::default()
        };
        assert!(matches!(
            complete_checksum(&outside, &mut p),
            Err(OffloadError::CompleteChecksum { .. })
        ));
        let mut empty: [Vec<u8>; 0] = [];
        assert!(matches!(
            split(&VirtioNetHdr::default(), &p, &mut empty, &mut []),
            Err(OffloadError::SplitBuffers { .. })
        ));
    }

    #[test]
    fn split_and_coalesce_never_panic_on_random_bytes() {
        let mut rng = StdRng::seed_from_u64(15);
        let valid = [
            Tcp::new(false, pattern(3_000, 1)),
            Tcp::new(true, pattern(3_000, 2)),
        ];
        let mut coalescer = Coalescer::new(4);
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        let mut outs = vec![vec![0u8; 2_048]; 8];
        let mut sizes = [0usize; 8];
        for round in 0..3_000 {
            // Half the time a valid packet with a few bytes flipped, else random bytes.
            let mut batch = Vec::new();
            for _ in 0..rng.gen_range(1..8) {
                let mut p = if rng.gen_bool(0.5) {
                    let t = valid[rng.gen_range(0..2)].clone();
                    let mut p = t.super_packet();
                    p.truncate(rng.gen_range(0..=p.len()));
                    p
                } else {
                    (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect()
                };
                for _ in 0..rng.gen_range(0..4) {
                    if !p.is_empty() {
                        let i = rng.gen_range(0..p.len());
                        p[i] = rng.gen();
                    }
                }
                batch.push(p);
            }
            let mut raw_hdr = [0u8; VIRTIO_NET_HDR_LEN];
            rng.fill(&mut raw_hdr[..]);
            raw_hdr[0] &= F_NEEDS_CSUM | F_DATA_VALID;
            if round % 2 == 0 {
                raw_hdr[1] = [GSO_NONE, GSO_TCPV4, GSO_TCPV6][round % 3];
            }
            let hdr = VirtioNetHdr::decode(&raw_hdr).unwrap();
            let _ = split(&hdr, &batch[0], &mut outs, &mut sizes);

            coalescer.coalesce(&batch, &mut out, &mut frames);
            // Frames tile the output and nothing grows: merging only removes headers.
            let mut end = 0;
            for f in &frames {
                assert_eq!(f.start, end);
                end = f.end;
            }
            assert_eq!(end, out.len());
            let inputs: usize = batch.iter().map(|p| p.len() + VIRTIO_NET_HDR_LEN).sum();
            assert!(out.len() <= inputs);
            assert!(frames.len() <= batch.len());
        }
    }

    fn segments(t: &Tcp, mss: usize, n: u32) -> Vec<Tcp> {
        (0..n).map(|i| t.nth(i, mss)).collect()
    }

    fn wire(ts: &[Tcp]) -> Vec<Vec<u8>> {
        ts.iter().map(Tcp::segment).collect()
    }

    /// For each frame, how many segments of `mss` it holds (1 for a packet passed through).
    fn shape(frames: &[(VirtioNetHdr, Vec<u8>)]) -> Vec<usize> {
        frames
            .iter()
            .map(|(h, p)| {
                if h.gso_type == GSO_NONE {
                    assert_eq!(h, &VirtioNetHdr::default());
                    1
                } else {
                    payload(p).len().div_ceil(usize::from(h.gso_size))
                }
            })
            .collect()
    }

    #[test]
    fn a_sequence_gap_starts_a_new_super_packet() {
        let t = Tcp::new(false, Vec::new());
        let mut segs = segments(&t, 1_000, 5);
        segs.remove(2);
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        assert_eq!(shape(&frames), [2, 2]);
        assert_eq!(seq(&frames[1].1), segs[2].seq);
        assert_eq!(
            payload(&frames[1].1),
            [segs[2].payload.clone(), segs[3].payload.clone()].concat()
        );
        for (h, p) in &frames {
            let full = completed(h, p);
            assert!(ip_header_valid(&full) && tcp_checksum_valid(&full));
        }
    }

    #[test]
    fn segments_with_a_different_tos_ttl_traffic_class_flow_label_or_hop_limit_are_not_merged() {
        let change: [fn(&mut Tcp); 2] = [|t| t.tos = 0x10, |t| t.ttl = 63];
        for v6 in [false, true] {
            for f in change {
                let t = Tcp::new(v6, Vec::new());
                let mut segs = segments(&t, 1_000, 3);
                f(&mut segs[1]);
                let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
                assert_eq!(shape(&frames), [1, 1, 1], "v6 = {v6}: {:?}", segs[1]);
            }
        }
        // IPv6 segments of another flow label are not merged either.
        let mut segs = segments(&Tcp::new(true, Vec::new()), 1_000, 2);
        segs[1].flow_label += 1;
        assert_eq!(
            shape(&coalesce_all(&mut Coalescer::default(), &wire(&segs))),
            [1, 1]
        );
        // The same three segments unchanged merge, so it is the change that stopped them.
        let segs = segments(&Tcp::new(true, Vec::new()), 1_000, 3);
        assert_eq!(
            shape(&coalesce_all(&mut Coalescer::default(), &wire(&segs))),
            [3]
        );
    }

    #[test]
    fn ipv4_ids_must_go_up_by_one_or_stay_fixed_under_df() {
        let ids = |ids: [u16; 3], df: bool| {
            let t = Tcp::new(false, Vec::new()).with(|t| t.df = df);
            let mut segs = segments(&t, 1_000, 3);
            for (s, id) in segs.iter_mut().zip(ids) {
                s.id = id;
            }
            shape(&coalesce_all(&mut Coalescer::default(), &wire(&segs)))
        };
        assert_eq!(ids([0xffff, 0, 1], false), [3]);
        assert_eq!(ids([7, 8, 9], true), [3]);
        assert_eq!(ids([0, 0, 0], true), [3]);
        assert_eq!(ids([0, 0, 0], false), [1, 1, 1]);
        assert_eq!(ids([7, 9, 10], true), [1, 2]);
        assert_eq!(ids([7, 8, 8], true), [2, 1]);
        assert_eq!(ids([7, 7, 8], true), [2, 1]);
    }

    #[test]
    fn a_merged_fixed_id_packet_keeps_the_first_id_and_a_valid_header() {
        let t = Tcp::new(false, Vec::new());
        let mut segs = segments(&t, 1_000, 2);
        segs[1].id = segs[0].id;
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        assert_eq!(be16(&frames[0].1, 4).unwrap(), segs[0].id);
        assert!(ip_header_valid(&frames[0].1));
    }

    #[test]
    fn ipv4_packets_with_options_are_never_merged() {
        // Record Route with room for one address, then end of list.
        let t = Tcp::new(false, Vec::new()).with(|t| t.ip_options = vec![7, 7, 4, 0, 0, 0, 0, 0]);
        let segs = wire(&segments(&t, 1_000, 3));
        let frames = coalesce_all(&mut Coalescer::default(), &segs);
        assert_eq!(shape(&frames), [1, 1, 1]);
        let got: Vec<Vec<u8>> = frames.into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, segs, "they pass through byte for byte");
    }

    #[test]
    fn psh_ends_a_super_packet_and_the_next_segment_starts_another() {
        let t = Tcp::new(true, Vec::new());
        let mut segs = segments(&t, 1_000, 4);
        segs[1].flags |= TCP_PSH;
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        assert_eq!(shape(&frames), [2, 2]);
        assert_eq!(tcp_flags(&frames[0].1), TCP_ACK | TCP_PSH);
        assert_eq!(tcp_flags(&frames[1].1), TCP_ACK);
    }

    #[test]
    fn a_fin_on_the_last_segment_is_merged_and_kept() {
        let t = Tcp::new(false, Vec::new());
        let mut segs = segments(&t, 1_000, 3);
        segs[2].flags |= TCP_FIN | TCP_PSH;
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        assert_eq!(shape(&frames), [3]);
        assert_eq!(tcp_flags(&frames[0].1), TCP_ACK | TCP_FIN | TCP_PSH);
        // Split again, FIN and PSH come back on the last segment only.
        let again = split_all(&frames[0].0, &frames[0].1).unwrap();
        assert_eq!(again, wire(&segs));
    }

    #[test]
    fn syn_rst_urg_and_cwr_segments_are_never_merged() {
        for flag in [TCP_SYN, TCP_RST, TCP_URG, TCP_CWR] {
            let t = Tcp::new(false, Vec::new());
            let mut segs = segments(&t, 1_000, 3);
            segs[1].flags |= flag;
            let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
            assert_eq!(shape(&frames), [1, 1, 1], "flag {flag:#04x}");
        }
    }

    #[test]
    fn a_short_segment_ends_the_super_packet_and_a_longer_one_cannot_follow() {
        let t = Tcp::new(false, Vec::new());
        let mut segs = segments(&t, 1_000, 3);
        segs[1].payload.truncate(500);
        segs[2].seq = segs[1].seq.wrapping_add(500);
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0.gso_size, 1_000);
        assert_eq!(payload(&frames[0].1).len(), 1_500);
        assert_eq!(frames[1].1, wire(&segs)[2]);

        let mut segs = segments(&t, 500, 2);
        segs[1].payload = pattern(1_000, 1);
        assert_eq!(
            shape(&coalesce_all(&mut Coalescer::default(), &wire(&segs))),
            [1, 1]
        );
    }

    #[test]
    fn segments_that_differ_in_ack_window_or_tcp_options_are_not_merged() {
        let change: [fn(&mut Tcp); 3] = [
            |t| t.ack += 1,
            |t| t.window += 1,
            |t| t.tcp_options[11] += 1,
        ];
        for f in change {
            let t = Tcp::new(false, Vec::new());
            let mut segs = segments(&t, 1_000, 2);
            f(&mut segs[1]);
            assert_eq!(
                shape(&coalesce_all(&mut Coalescer::default(), &wire(&segs))),
                [1, 1]
            );
        }
    }

    #[test]
    fn a_segment_with_a_wrong_checksum_passes_through_untouched() {
        let t = Tcp::new(false, Vec::new());
        let mut segs = wire(&segments(&t, 1_000, 3));
        let last = segs[1].len() - 1;
        segs[1][last] ^= 0x01;
        let frames = coalesce_all(&mut Coalescer::default(), &segs);
        assert_eq!(shape(&frames), [1, 1, 1]);
        assert_eq!(frames[1].1, segs[1]);
        // A wrong IPv4 header checksum too.
        let mut segs = wire(&segments(&t, 1_000, 2));
        segs[1][8] ^= 0x01;
        segs[1][10] ^= 0x02;
        assert_eq!(
            shape(&coalesce_all(&mut Coalescer::default(), &segs)),
            [1, 1]
        );
    }

    #[test]
    fn super_packets_never_exceed_64_kib() {
        let t = Tcp::new(false, Vec::new());
        let segs = segments(&t, 1_400, 60);
        let frames = coalesce_all(&mut Coalescer::default(), &wire(&segs));
        // 46 segments of 1,400 bytes and 52 bytes of headers fit in 65,535; 47 do not.
        assert_eq!(shape(&frames), [46, 14]);
        let mut joined = Vec::new();
        for (h, p) in &frames {
            assert!(p.len() <= MAX_SUPER_PACKET);
            assert!(tcp_checksum_valid(&completed(h, p)));
            joined.extend_from_slice(payload(p));
        }
        let sent: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(joined, sent);
    }

    #[test]
    fn flows_beyond_the_limit_pass_through_unmerged() {
        let flows: Vec<Tcp> = (0..3)
            .map(|i| Tcp::new(false, Vec::new()).with(|t| t.sport += i))
            .collect();
        let mut batch = Vec::new();
        for n in 0..2 {
            for f in &flows {
                batch.push(f.nth(n, 1_000).segment());
            }
        }
        let frames = coalesce_all(&mut Coalescer::new(2), &batch);
        assert_eq!(shape(&frames), [2, 2, 1, 1]);
        assert_eq!(frames[2].1, batch[2]);
        assert_eq!(frames[3].1, batch[5]);
    }

    #[test]
    fn interleaved_flows_merge_separately_and_each_keeps_its_order() {
        let a = Tcp::new(false, Vec::new());
        let b = Tcp::new(true, Vec::new()).with(|t| t.src = 9);
        let mut batch = Vec::new();
        for n in 0..3 {
            batch.push(a.nth(n, 1_000).segment());
            batch.push(b.nth(n, 1_000).segment());
        }
        let frames = coalesce_all(&mut Coalescer::default(), &batch);
        assert_eq!(shape(&frames), [3, 3]);
        assert!(!is_v6(&frames[0].1) && is_v6(&frames[1].1));
        let of = |t: &Tcp| {
            (0..3)
                .flat_map(|n| t.nth(n, 1_000).payload)
                .collect::<Vec<u8>>()
        };
        assert_eq!(payload(&frames[0].1), of(&a));
        assert_eq!(payload(&frames[1].1), of(&b));
    }

    #[test]
    fn a_pure_ack_of_the_flow_between_segments_keeps_its_place() {
        let t = Tcp::new(false, Vec::new());
        let segs = segments(&t, 1_000, 3);
        let ack = t.clone().with(|t| t.seq = segs[2].seq);
        let batch = vec![
            segs[0].segment(),
            segs[1].segment(),
            ack.segment(),
            segs[2].segment(),
        ];
        let frames = coalesce_all(&mut Coalescer::default(), &batch);
        assert_eq!(shape(&frames), [2, 1, 1]);
        assert_eq!(frames[1].1, batch[2]);
        assert_eq!(frames[2].1, batch[3]);
    }

    #[test]
    fn split_then_coalesce_preserves_the_payload_for_random_sizes_and_mss() {
        let mut rng = StdRng::seed_from_u64(0x00ff_10ad);
        let mut coalescer = Coalescer::default();
        let mut outs = vec![vec![0u8; 1_600]; 400];
        let mut sizes = vec![0usize; 400];
        for round in 0..300 {
            let v6 = rng.gen_bool(0.5);
            let mss: u16 = rng.gen_range(200..=1_440);
            let len = rng.gen_range(0..=60_000usize);
            let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let t = Tcp::new(v6, body).with(|t| {
                t.seq = rng.gen();
                t.id = rng.gen();
                t.flags = TCP_ACK | [0, TCP_PSH, TCP_FIN, TCP_PSH | TCP_FIN][rng.gen_range(0..4)];
                if rng.gen_bool(0.3) {
                    t.tcp_options.clear();
                }
            });
            let sup = t.super_packet();
            let hdr = t.kernel_hdr(mss);
            let n = split(&hdr, &sup, &mut outs, &mut sizes).unwrap();
            let segs: Vec<Vec<u8>> = (0..n).map(|i| outs[i][..sizes[i]].to_vec()).collect();
            assert!(
                segs.iter()
                    .all(|s| ip_header_valid(s) && tcp_checksum_valid(s)),
                "round {round}"
            );

            let frames = coalesce_all(&mut coalescer, &segs);
            let mut joined = Vec::new();
            for (h, p) in &frames {
                let full = completed(h, p);
                assert!(
                    ip_header_valid(&full) && tcp_checksum_valid(&full),
                    "round {round}"
                );
                joined.extend_from_slice(payload(p));
            }
            assert_eq!(
                joined, t.payload,
                "round {round}: v6 {v6}, mss {mss}, {len} bytes"
            );
            if n > 1 {
                assert_eq!(frames, [(hdr, sup)], "round {round}");
            } else {
                assert_eq!(
                    frames,
                    [(VirtioNetHdr::default(), t.segment())],
                    "round {round}"
                );
            }
        }
    }
}
