//! Messages the daemons exchange inside WireGuard sessions, as UDP datagrams in IPv4
//! packets (WireGuard only carries IP packets): the join conversation in an invite
//! session, and gossip between members on their VPN addresses. The tunnel intercepts
//! these instead of handing them to the TUN device. Pure: builds and parses bytes.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::link::RedeemError;

/// The UDP port the join messages use inside the invite session.
pub const JOIN_PORT: u16 = 51872;
/// The UDP port gossip uses between members' VPN addresses.
pub const GOSSIP_PORT: u16 = 51873;
/// The joiner has no VPN address yet; this link-local one marks its packets.
pub const JOINER_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);
/// Keeps a message and its headers inside the tunnel's MTU.
pub const MAX_MESSAGE: usize = 1350;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinMessage {
    Request {
        name: String,
        /// The joiner's long-term WireGuard key; its private half never leaves the joiner.
        #[serde(with = "crate::identity::key_b64")]
        public_key: [u8; 32],
        /// The key the joiner signs its endpoint announcements with.
        #[serde(with = "crate::identity::key_b64")]
        sign_key: [u8; 32],
    },
    Accepted {
        address: Ipv4Addr,
        network: Ipv4Net,
        host_name: String,
        host_address: Ipv4Addr,
        /// The name the host gave the joiner (made unique within the group).
        name: String,
        /// The key that signs every member record of the group.
        #[serde(with = "crate::identity::key_b64")]
        host_sign_key: [u8; 32],
        /// The joiner's own record and the host's, both signed by the host.
        your_record: crate::mesh::Signed,
        host_record: crate::mesh::Signed,
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
    #[error("{0}")]
    Name(NameRefusal),
}

/// Why a joiner's name is refused. Names show in every member's `status` and `peers`
/// and select members in commands (`watchalong remove NAME`), so one must never pass
/// for another member, an address, or carry characters a terminal would act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum NameRefusal {
    #[error("the node's name is empty; set [node] name in its configuration")]
    Empty,
    #[error("the node's name is longer than {MAX_NAME} bytes; set a shorter [node] name")]
    TooLong,
    #[error("the node's name holds control, invisible or surrounding blank characters; set a plain [node] name")]
    Unprintable,
    #[error("the node's name is an IP address, which would pass for a member's address; set a [node] name that is not")]
    Address,
    #[error("another member already has this name (or has it as its address or key); set another [node] name and open the link again")]
    Taken,
}

/// The longest name a member may have, in bytes.
pub const MAX_NAME: usize = 64;

/// Whether `name` may name a member at all, whoever else is in the group: 1 to
/// [`MAX_NAME`] bytes, printable, no blanks around it, not an IP address.
pub fn check_name_form(name: &str) -> Result<(), NameRefusal> {
    if name.is_empty() {
        return Err(NameRefusal::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameRefusal::TooLong);
    }
    // Control characters, and the format characters that hide or reorder text
    // (zero-width, bidirectional overrides, the BOM), so a name reads as what it is.
    let invisible = |c: char| {
        c.is_control()
            || matches!(c, '\u{00ad}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}' | '\u{feff}')
    };
    if name.chars().any(invisible) || name.trim() != name {
        return Err(NameRefusal::Unprintable);
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(NameRefusal::Address);
    }
    Ok(())
}

/// Whether a joiner may be called `name` in a group whose members have `taken` names,
/// addresses and keys (compared without regard to case).
pub fn check_name<S: AsRef<str>>(
    name: &str,
    taken: impl IntoIterator<Item = S>,
) -> Result<(), NameRefusal> {
    check_name_form(name)?;
    let name = name.to_lowercase();
    if taken.into_iter().any(|t| t.as_ref().to_lowercase() == name) {
        return Err(NameRefusal::Taken);
    }
    Ok(())
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

/// Wraps `msg` in IPv4 + UDP from `src` to `dst` on the join port.
pub fn encode(src: Ipv4Addr, dst: Ipv4Addr, msg: &JoinMessage) -> Result<Vec<u8>, WireError> {
    let payload = serde_json::to_vec(msg).map_err(|_| WireError::EncodeMessage)?;
    encode_udp(src, dst, JOIN_PORT, &payload)
}

/// Extracts the join message from a decrypted packet.
pub fn decode(packet: &[u8]) -> Result<JoinMessage, WireError> {
    match decode_udp(packet) {
        Some(d) if d.port == JOIN_PORT => {
            serde_json::from_slice(d.payload).map_err(|e| WireError::DecodeMessage(e.to_string()))
        }
        _ => Err(WireError::NotJoinPacket),
    }
}

/// An IPv4 + UDP packet from `src` to `dst`, both ports `port`.
pub fn encode_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
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
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // A zero UDP checksum is allowed over IPv4, and WireGuard already authenticates.
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    Ok(p)
}

/// A UDP datagram seen inside a decrypted packet.
pub struct Udp<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub payload: &'a [u8],
}

/// The UDP datagram in `packet`, when it is an unfragmented IPv4/UDP packet.
pub fn decode_udp(packet: &[u8]) -> Option<Udp<'_>> {
    if packet.len() < 28 || packet[0] != 0x45 || packet[9] != 17 {
        return None;
    }
    // A fragment's payload is not a whole datagram.
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
        return None;
    }
    let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    if total > packet.len() || total < 28 {
        return None;
    }
    Some(Udp {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        port: u16::from_be_bytes([packet[22], packet[23]]),
        payload: &packet[28..total],
    })
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
            sign_key: [4; 32],
        };
        let p = encode(JOINER_ADDRESS, "100.77.0.1".parse().unwrap(), &msg).unwrap();
        assert_eq!(ipv4_checksum(&p[..20]), 0);
        assert_eq!(decode(&p).unwrap(), msg);
    }

    #[test]
    fn names_that_are_long_unprintable_or_addresses_are_refused() {
        assert_eq!(check_name_form("kitchen-pi"), Ok(()));
        assert_eq!(check_name_form("Zoë's laptop"), Ok(()));
        assert_eq!(check_name_form(&"a".repeat(MAX_NAME)), Ok(()));
        assert_eq!(check_name_form(""), Err(NameRefusal::Empty));
        assert_eq!(
            check_name_form(&"a".repeat(MAX_NAME + 1)),
            Err(NameRefusal::TooLong)
        );
        assert_eq!(
            check_name_form(&"a".repeat(2000)),
            Err(NameRefusal::TooLong)
        );
        // Four bytes per character: 17 of them are 68 bytes, too long though 17 chars.
        assert_eq!(check_name_form(&"😀".repeat(17)), Err(NameRefusal::TooLong));
        for bad in [
            "a\nb",
            "a\u{1b}[31mred",
            "tab\t",
            "nul\0",
            "rtl\u{202e}gpj",
            "zero\u{200b}width",
            " pad",
            "pad ",
        ] {
            assert_eq!(
                check_name_form(bad),
                Err(NameRefusal::Unprintable),
                "{bad:?}"
            );
        }
        for addr in ["1.1.1.1", "100.77.0.2", "::1", "fe80::1"] {
            assert_eq!(check_name_form(addr), Err(NameRefusal::Address), "{addr}");
        }
    }

    #[test]
    fn a_name_another_member_has_as_name_address_or_key_is_taken_whatever_its_case() {
        let taken = [
            "Kitchen",
            "100.77.0.2",
            "q83vEjRWeJmrze8SNFZ4mqvN7xI0VniZq83vEjRWeJk=",
        ];
        assert_eq!(check_name("kitchen", taken), Err(NameRefusal::Taken));
        assert_eq!(check_name("KITCHEN", taken), Err(NameRefusal::Taken));
        assert_eq!(
            check_name("Q83VEJRWEJMRZE8SNFZ4MQVN7XI0VNIZQ83VEJRWEJK=", taken),
            Err(NameRefusal::Taken)
        );
        assert_eq!(check_name("1.1.1.1", taken), Err(NameRefusal::Address));
        assert_eq!(check_name("den", taken), Ok(()));
    }

    #[test]
    fn a_name_refusal_reaches_the_joiner_intact() {
        let msg = JoinMessage::Refused {
            reason: Refusal::Name(NameRefusal::Taken),
        };
        let p = encode("100.77.0.1".parse().unwrap(), JOINER_ADDRESS, &msg).unwrap();
        assert_eq!(decode(&p).unwrap(), msg);
        assert!(Refusal::Name(NameRefusal::Taken)
            .to_string()
            .contains("another [node] name"));
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
