//! The join conversation carried inside the invite's WireGuard session: the joiner's
//! request and the host's answer, each a JSON message in a UDP datagram in an IPv4 packet
//! (WireGuard only carries IP packets). Pure: builds and parses bytes, nothing else.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::link::RedeemError;

/// The UDP port the join messages use inside the invite session.
pub const JOIN_PORT: u16 = 51872;
/// The joiner has no VPN address yet; this link-local one marks its packets.
pub const JOINER_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);
const MAX_MESSAGE: usize = 1200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinMessage {
    Request {
        name: String,
        /// The joiner's long-term WireGuard key; its private half never leaves the joiner.
        #[serde(with = "crate::identity::key_b64")]
        public_key: [u8; 32],
    },
    Accepted {
        address: Ipv4Addr,
        network: Ipv4Net,
        host_name: String,
        host_address: Ipv4Addr,
        /// The name the host gave the joiner (made unique within the group).
        name: String,
    },
    Refused {
        reason: Refusal,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("{0}")]
    Invite(RedeemError),
    #[error("the group has no free address left")]
    GroupFull,
    #[error("the host could not record the new member; try again later")]
    HostFailure,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an IPv4/UDP packet for the join port")]
    NotJoinPacket,
    #[error("the join message is not valid JSON: {0}")]
    DecodeMessage(String),
    #[error("the join message is too large")]
    EncodeMessage,
}

/// Wraps `msg` in IPv4 + UDP from `src` to `dst`.
pub fn encode(src: Ipv4Addr, dst: Ipv4Addr, msg: &JoinMessage) -> Result<Vec<u8>, WireError> {
    let payload = serde_json::to_vec(msg).map_err(|_| WireError::EncodeMessage)?;
    if payload.len() > MAX_MESSAGE {
        return Err(WireError::EncodeMessage);
    }
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let csum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&JOIN_PORT.to_be_bytes());
    p.extend_from_slice(&JOIN_PORT.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // A zero UDP checksum is allowed over IPv4, and WireGuard already authenticates.
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    Ok(p)
}

/// Extracts the join message from a decrypted packet.
pub fn decode(packet: &[u8]) -> Result<JoinMessage, WireError> {
    if packet.len() < 28 || packet[0] != 0x45 || packet[9] != 17 {
        return Err(WireError::NotJoinPacket);
    }
    let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let dport = u16::from_be_bytes([packet[22], packet[23]]);
    if total > packet.len() || total < 28 || dport != JOIN_PORT {
        return Err(WireError::NotJoinPacket);
    }
    serde_json::from_slice(&packet[28..total]).map_err(|e| WireError::DecodeMessage(e.to_string()))
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_message_round_trips_through_a_packet() {
        let msg = JoinMessage::Request {
            name: "kitchen".into(),
            public_key: [3; 32],
        };
        let p = encode(JOINER_ADDRESS, "100.77.0.1".parse().unwrap(), &msg).unwrap();
        assert_eq!(ipv4_checksum(&p[..20]), 0);
        assert_eq!(decode(&p).unwrap(), msg);
    }

    #[test]
    fn other_packets_are_not_join_messages() {
        assert_eq!(decode(&[0x45; 10]), Err(WireError::NotJoinPacket));
        let mut p = encode(
            JOINER_ADDRESS,
            "100.77.0.1".parse().unwrap(),
            &JoinMessage::Refused {
                reason: Refusal::GroupFull,
            },
        )
        .unwrap();
        p[23] ^= 1;
        assert_eq!(decode(&p), Err(WireError::NotJoinPacket));
    }
}
