//! Messages the daemons exchange inside WireGuard sessions, as UDP datagrams in IPv4
//! packets (WireGuard only carries IP packets): the join conversation in an invite
//! session, and gossip between members on their VPN addresses. The tunnel intercepts
//! these instead of handing them to the TUN device. Also the proof a join request carries
//! that the joiner holds the keys it registers. Pure: builds, parses and checks bytes.

use std::net::Ipv4Addr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::group::link::RedeemError;

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
        #[serde(with = "crate::group::identity::key_b64")]
        public_key: [u8; 32],
        /// The key the joiner signs its endpoint announcements with.
        #[serde(with = "crate::group::identity::key_b64")]
        sign_key: [u8; 32],
        /// That the joiner holds both keys' private halves. Optional on the wire only so
        /// that a joiner too old to send it hears why it is refused instead of nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<KeyProof>,
    },
    Accepted {
        address: Ipv4Addr,
        network: Ipv4Net,
        host_name: String,
        host_address: Ipv4Addr,
        /// The name the host gave the joiner (made unique within the group).
        name: String,
        /// The key that signs every member record of the group.
        #[serde(with = "crate::group::identity::key_b64")]
        host_sign_key: [u8; 32],
        /// The joiner's own record and the host's, both signed by the host.
        your_record: crate::group::mesh::Signed,
        host_record: crate::group::mesh::Signed,
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
    #[error("the join request does not prove that the joiner holds the keys it registers (a joiner older than the host sends no proof: update watchalong on it)")]
    KeyProof,
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
    #[error(
        "cannot prove the joiner's keys: the host key in the link is not a usable WireGuard key"
    )]
    ProveKeys,
    #[error("the join request carries no proof of the joiner's keys")]
    MissingProof,
    #[error("the joiner's signing key or its signature over the join transcript is invalid")]
    VerifySignature,
    #[error(
        "the joiner's WireGuard key is not usable, or the join transcript's MAC does not match it"
    )]
    VerifyMac,
}

/// Separates this transcript from every other thing the same keys sign or MAC.
const TRANSCRIPT_LABEL: &[u8] = b"watchalong join request v1\0";
const PROOF_MAC_CONTEXT: &str = "watchalong join request proof-of-keys MAC v1";

/// What one join request claims, bound to the invite session it is sent in: the host it
/// is for, the invite (its secret's public half, which only holders of the link know the
/// private half of) and everything the joiner registers. A proof made for one invite
/// session is worthless in another.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub host_key: &'a [u8; 32],
    pub invite_key: &'a [u8; 32],
    pub name: &'a str,
    pub wg_key: &'a [u8; 32],
    pub sign_key: &'a [u8; 32],
}

impl Transcript<'_> {
    fn bytes(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut b = Vec::with_capacity(TRANSCRIPT_LABEL.len() + 4 * 32 + 2 + name.len());
        b.extend_from_slice(TRANSCRIPT_LABEL);
        b.extend_from_slice(self.host_key);
        b.extend_from_slice(self.invite_key);
        // Length-prefixed, so the name's end cannot be moved into the keys that follow.
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&name[..usize::from(len)]);
        b.extend_from_slice(self.wg_key);
        b.extend_from_slice(self.sign_key);
        b
    }
}

/// Proof that the joiner holds the private halves of the keys it registers: an Ed25519
/// signature by its signing key, and a MAC keyed by the Diffie-Hellman of its WireGuard
/// key with the host's (which only the joiner and the host can compute), both over the
/// [`Transcript`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProof {
    #[serde(with = "sig_b64")]
    pub signature: [u8; 64],
    #[serde(with = "crate::group::identity::key_b64")]
    pub mac: [u8; 32],
}

/// The MAC key of the joiner's WireGuard key and the host's, or `None` when one of them
/// is a low-order point: the shared secret is then a constant anyone can compute, and
/// would prove nothing.
fn proof_mac_key(mine: &StaticSecret, theirs: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    shared
        .was_contributory()
        .then(|| blake3::derive_key(PROOF_MAC_CONTEXT, shared.as_bytes()))
}

/// The joiner's proof for `transcript`, made with the private halves of its keys.
pub fn prove_keys(
    transcript: &Transcript<'_>,
    wg_secret: &StaticSecret,
    signing: &SigningKey,
) -> Result<KeyProof, WireError> {
    let msg = transcript.bytes();
    let key = proof_mac_key(wg_secret, transcript.host_key).ok_or(WireError::ProveKeys)?;
    Ok(KeyProof {
        signature: signing.sign(&msg).to_bytes(),
        mac: *blake3::keyed_hash(&key, &msg).as_bytes(),
    })
}

/// The host's check of a joiner's proof, with the host's own WireGuard secret.
pub fn verify_keys(
    transcript: &Transcript<'_>,
    proof: Option<&KeyProof>,
    host_secret: &StaticSecret,
) -> Result<(), WireError> {
    let proof = proof.ok_or(WireError::MissingProof)?;
    let msg = transcript.bytes();
    // Strict: no small-order signing key, no malleable signature.
    VerifyingKey::from_bytes(transcript.sign_key)
        .and_then(|k| k.verify_strict(&msg, &Signature::from_bytes(&proof.signature)))
        .map_err(|_| WireError::VerifySignature)?;
    let key = proof_mac_key(host_secret, transcript.wg_key).ok_or(WireError::VerifyMac)?;
    // `blake3::Hash` compares in constant time.
    if blake3::keyed_hash(&key, &msg) != blake3::Hash::from(proof.mac) {
        return Err(WireError::VerifyMac);
    }
    Ok(())
}

/// Serde for a 64-byte signature as base64 text.
mod sig_b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(sig))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let text = String::deserialize(d)?;
        // A signature is 88 characters of base64; anything longer is not decoded at all.
        if text.len() > 88 {
            return Err(serde::de::Error::custom(
                "expected a base64 signature of 64 bytes",
            ));
        }
        STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected a base64 signature of 64 bytes"))
    }
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
            proof: Some(KeyProof {
                signature: [5; 64],
                mac: [6; 32],
            }),
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

    struct Joiner {
        wg: StaticSecret,
        signing: SigningKey,
    }

    impl Joiner {
        fn new() -> Joiner {
            Joiner {
                wg: StaticSecret::random_from_rng(rand::rngs::OsRng),
                signing: SigningKey::generate(&mut rand::rngs::OsRng),
            }
        }
        fn wg_key(&self) -> [u8; 32] {
            PublicKey::from(&self.wg).to_bytes()
        }
        fn sign_key(&self) -> [u8; 32] {
            self.signing.verifying_key().to_bytes()
        }
    }

    fn host() -> (StaticSecret, [u8; 32]) {
        let s = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let p = PublicKey::from(&s).to_bytes();
        (s, p)
    }

    #[test]
    fn an_honest_join_request_proves_its_keys() {
        let (host_secret, host_key) = host();
        let j = Joiner::new();
        let (wg_key, sign_key) = (j.wg_key(), j.sign_key());
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &wg_key,
            sign_key: &sign_key,
        };
        let proof = prove_keys(&t, &j.wg, &j.signing).unwrap();
        assert_eq!(verify_keys(&t, Some(&proof), &host_secret), Ok(()));
    }

    #[test]
    fn a_request_for_a_wireguard_key_the_sender_does_not_hold_is_refused() {
        let (host_secret, host_key) = host();
        let victim = Joiner::new();
        let thief = Joiner::new();
        let victim_wg = victim.wg_key();
        let sign_key = thief.sign_key();
        // The thief registers the victim's WireGuard key with its own signing key, and
        // has only its own WireGuard secret to key the MAC with.
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &victim_wg,
            sign_key: &sign_key,
        };
        let proof = prove_keys(&t, &thief.wg, &thief.signing).unwrap();
        assert_eq!(
            verify_keys(&t, Some(&proof), &host_secret),
            Err(WireError::VerifyMac)
        );
    }

    #[test]
    fn a_request_for_a_signing_key_the_sender_does_not_hold_is_refused() {
        let (host_secret, host_key) = host();
        let victim = Joiner::new();
        let thief = Joiner::new();
        let (wg_key, victim_sign) = (thief.wg_key(), victim.sign_key());
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &wg_key,
            sign_key: &victim_sign,
        };
        let proof = prove_keys(&t, &thief.wg, &thief.signing).unwrap();
        assert_eq!(
            verify_keys(&t, Some(&proof), &host_secret),
            Err(WireError::VerifySignature)
        );
    }

    #[test]
    fn a_proof_made_for_another_invite_or_name_is_refused() {
        let (host_secret, host_key) = host();
        let j = Joiner::new();
        let (wg_key, sign_key) = (j.wg_key(), j.sign_key());
        let made_for = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &wg_key,
            sign_key: &sign_key,
        };
        let proof = prove_keys(&made_for, &j.wg, &j.signing).unwrap();
        let other_invite = Transcript {
            invite_key: &[9; 32],
            ..made_for
        };
        let other_name = Transcript {
            name: "kitchen2",
            ..made_for
        };
        for t in [other_invite, other_name] {
            assert_eq!(
                verify_keys(&t, Some(&proof), &host_secret),
                Err(WireError::VerifySignature),
                "{t:?}"
            );
        }
    }

    #[test]
    fn a_proof_made_for_another_host_is_refused() {
        let (_, host_key) = host();
        let (other_secret, _) = host();
        let j = Joiner::new();
        let (wg_key, sign_key) = (j.wg_key(), j.sign_key());
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &wg_key,
            sign_key: &sign_key,
        };
        let proof = prove_keys(&t, &j.wg, &j.signing).unwrap();
        // The signature holds (it is over the same bytes); the MAC is keyed to one host.
        assert_eq!(
            verify_keys(&t, Some(&proof), &other_secret),
            Err(WireError::VerifyMac)
        );
    }

    #[test]
    fn a_low_order_wireguard_key_is_refused_even_with_the_mac_anyone_can_compute() {
        let (host_secret, host_key) = host();
        let j = Joiner::new();
        let sign_key = j.sign_key();
        // The identity point: every Diffie-Hellman with it is all zeros.
        let low_order = [0u8; 32];
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &low_order,
            sign_key: &sign_key,
        };
        let msg = t.bytes();
        let zero_key = blake3::derive_key(PROOF_MAC_CONTEXT, &[0u8; 32]);
        let proof = KeyProof {
            signature: j.signing.sign(&msg).to_bytes(),
            mac: *blake3::keyed_hash(&zero_key, &msg).as_bytes(),
        };
        assert_eq!(
            verify_keys(&t, Some(&proof), &host_secret),
            Err(WireError::VerifyMac)
        );
    }

    #[test]
    fn a_request_without_a_proof_is_refused_and_still_decodes() {
        let (host_secret, host_key) = host();
        let j = Joiner::new();
        let (wg_key, sign_key) = (j.wg_key(), j.sign_key());
        let t = Transcript {
            host_key: &host_key,
            invite_key: &[8; 32],
            name: "kitchen",
            wg_key: &wg_key,
            sign_key: &sign_key,
        };
        assert_eq!(
            verify_keys(&t, None, &host_secret),
            Err(WireError::MissingProof)
        );
        // What an older joiner sends: no proof field at all.
        let old = br#"{"type":"request","name":"k","public_key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=","sign_key":"BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ="}"#;
        let msg: JoinMessage = serde_json::from_slice(old).unwrap();
        assert!(matches!(msg, JoinMessage::Request { proof: None, .. }));
    }
}
