//! Membership as every node holds it: member records signed by the host, endpoint
//! announcements signed by each member, and the rules that decide which of them to keep.
//! Pure: no clock, no socket; the caller feeds signed blobs in and gets decisions out.
//!
//! Rules: a member record counts only with the host's signature, and replaces the one
//! held only when its version is higher; a revocation is final. An announcement counts
//! only with the signature of the member it describes, while that member is not revoked,
//! and replaces the one held only when its sequence number is higher, and lists at most
//! [`MAX_LAN`] LAN addresses, each private, and at most [`MAX_PUBLIC`] public ones, each
//! globally routable. A member's site is the public IPv4 address the host sees it behind,
//! or the IPv6 /64 it sees it in ([`Mesh::site_of`]). Signatures cover the
//! exact bytes received, with a context string per kind, so a record can never pass for
//! an announcement or be re-encoded into something else.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::group::identity::Key;

const MEMBER_CONTEXT: &[u8] = b"watchalong member record v1\0";
const ANNOUNCE_CONTEXT: &[u8] = b"watchalong endpoint announcement v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    #[serde(with = "crate::group::identity::key_b64")]
    pub wg_key: Key,
    #[serde(with = "crate::group::identity::key_b64")]
    pub sign_key: Key,
    pub name: String,
    pub address: Ipv4Addr,
    pub admitted_at: u64,
    /// Raised by the host on every change; the highest wins.
    pub version: u64,
    pub revoked: bool,
    /// Where the host sees this member's packets come from: the public IP in it names
    /// the member's site. It is the host's word, so a member cannot move itself into
    /// another site by what it announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    #[serde(with = "crate::group::identity::key_b64")]
    pub wg_key: Key,
    /// Milliseconds since the epoch when made, so it grows across restarts too.
    pub seq: u64,
    /// Where the host saw this node's packets come from (its side of the NAT).
    pub public_endpoint: Option<SocketAddr>,
    /// This node's own private addresses with its listen port.
    pub lan: Vec<SocketAddr>,
    /// This node's own globally routable addresses with its listen port (a home's global
    /// IPv6 addresses, which no NAT hides): where distant members knock besides where the
    /// host sees it. Left out when empty, so older nodes read the same bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<SocketAddr>,
    /// The LAN relay's port.
    pub relay_port: Option<u16>,
    /// The shares this node offers.
    #[serde(default)]
    pub shares: Vec<String>,
}

/// Signed bytes, kept verbatim: verification never depends on re-encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: String,
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshError {
    #[error("the signature does not verify")]
    VerifySignature,
    #[error("the signed body is not a valid record: {0}")]
    ParseBody(String),
    #[error("older than the one held")]
    Stale,
    #[error("the member is unknown")]
    UnknownMember,
    #[error("the member was revoked")]
    Revoked,
    #[error("the announcement lists {0} LAN addresses; at most {MAX_LAN} are taken")]
    CountLan(usize),
    #[error("the announced LAN address {0} is not a private address with a port")]
    CheckLan(SocketAddr),
    #[error("the announcement lists {0} public addresses; at most {MAX_PUBLIC} are taken")]
    CountPublic(usize),
    #[error("the announced public address {0} is not a globally routable address with a port")]
    CheckPublic(SocketAddr),
    #[error("the announced share name {0:?} is not one a configuration allows")]
    CheckShare(String),
}

/// The most LAN addresses one announcement may list: a node with more interfaces
/// announces its first ones. Others knock at each, so the list is bounded.
pub const MAX_LAN: usize = 8;

/// The most public addresses one announcement may list: others knock at each of them,
/// so a member gone bad can point only this many small handshakes a round elsewhere.
pub const MAX_PUBLIC: usize = 4;

/// Whether `a` may be announced as a public address: a port, and an address the internet
/// routes, neither private nor loopback, link-local, multicast, unspecified or v4-mapped.
/// The documentation ranges are taken: the test lab's internet lives in them.
pub fn public_allowed(a: &SocketAddr) -> bool {
    a.port() != 0
        && match a.ip() {
            IpAddr::V4(ip) => {
                !(ip.is_private()
                    || ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.is_multicast()
                    // "This network", and the reserved 240/4.
                    || ip.octets()[0] == 0
                    || ip.octets()[0] >= 240
                    // Benchmarking, 198.18/15.
                    || (ip.octets()[0] == 198 && (ip.octets()[1] & 0xfe) == 18)
                    // The shared address space (carrier-grade NAT, and the VPN's range).
                    || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64))
            }
            IpAddr::V6(ip) => {
                let first = ip.segments()[0];
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.to_ipv4_mapped().is_some()
                    // IPv4-compatible (::/96) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48):
                    // IPv4 in disguise, which the IPv4 rules above would not see.
                    || ip.segments()[..6] == [0; 6]
                    || ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                    || ip.segments()[..3] == [0x64, 0xff9b, 1]
                    // 6to4 (2002::/16) and Teredo (2001::/32): tunnels to whatever
                    // IPv4 they embed.
                    || first == 0x2002
                    || (first == 0x2001 && ip.segments()[1] == 0)
                    // Unique local, site-local (deprecated) and link-local.
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfec0
                    || (first & 0xffc0) == 0xfe80)
            }
        }
}

/// The site `ip` names: an IPv4 address itself (a home behind one NAT), an IPv6 one's
/// /64 (a home's prefix, in which each device has its own address).
pub fn site_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
    }
}

/// Whether a direct session with a member at `endpoint` runs over its site's LAN: the
/// endpoint is one of the LAN addresses `ann` lists, or, in an IPv6 site, an address in
/// the site's own /64 (two devices on one home prefix reach each other without the
/// router's WAN, whichever of their addresses the session found first).
pub fn on_site_lan(ann: Option<&Announcement>, site: Option<IpAddr>, endpoint: SocketAddr) -> bool {
    ann.is_some_and(|a| a.lan.contains(&endpoint))
        || (endpoint.is_ipv6() && site.is_some_and(|s| s.is_ipv6() && site_key(endpoint.ip()) == s))
}

/// How a site shows in `peers` and is compared by the planner: `203.0.113.5`, or
/// `2001:db8:1::/64`.
pub fn site_name(site: IpAddr) -> String {
    match site {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("{ip}/64"),
    }
}

/// Whether `name` may name a share: what `[[share]] name` allows in a configuration, 1 to
/// 63 letters, digits, '-', '_' or '.', not starting with '.'.
pub fn share_name_allowed(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `a` may be announced as a LAN address: a private IPv4 address (RFC 1918), or
/// an IPv6 unique local (fc00::/7) or link-local (fe80::/10) one, with a port. Nodes
/// knock at and fetch from these, so a member must not point others at the internet.
pub fn lan_allowed(a: &SocketAddr) -> bool {
    a.port() != 0
        && match a.ip() {
            IpAddr::V4(ip) => ip.is_private(),
            IpAddr::V6(ip) => {
                let first = ip.segments()[0];
                (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        }
}

pub fn sign_member(key: &SigningKey, rec: &MemberRecord) -> Signed {
    sign(key, MEMBER_CONTEXT, rec)
}

pub fn sign_announcement(key: &SigningKey, ann: &Announcement) -> Signed {
    sign(key, ANNOUNCE_CONTEXT, ann)
}

fn sign<T: Serialize>(key: &SigningKey, context: &[u8], value: &T) -> Signed {
    // Serialising our own plain structs cannot fail.
    let body = serde_json::to_string(value).unwrap_or_default();
    let mut msg = context.to_vec();
    msg.extend_from_slice(body.as_bytes());
    Signed {
        sig: STANDARD.encode(key.sign(&msg).to_bytes()),
        body,
    }
}

fn verify(key: &Key, context: &[u8], s: &Signed) -> Result<(), MeshError> {
    let vk = VerifyingKey::from_bytes(key).map_err(|_| MeshError::VerifySignature)?;
    let sig: [u8; 64] = STANDARD
        .decode(&s.sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(MeshError::VerifySignature)?;
    let mut msg = context.to_vec();
    msg.extend_from_slice(s.body.as_bytes());
    vk.verify(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| MeshError::VerifySignature)
}

/// One line of a digest: what a node holds about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    #[serde(with = "crate::group::identity::key_b64")]
    pub key: Key,
    pub version: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    #[serde(with = "crate::group::identity::key_b64")]
    pub host_wg: Key,
    #[serde(with = "crate::group::identity::key_b64")]
    pub host_sign: Key,
    members: Vec<Signed>,
    announcements: Vec<Signed>,
    #[serde(skip)]
    index: Index,
}

/// The parsed view of the signed lists, rebuilt on load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Index {
    members: BTreeMap<Key, (MemberRecord, usize)>,
    announcements: BTreeMap<Key, (Announcement, usize)>,
}

impl Mesh {
    pub fn new(host_wg: Key, host_sign: Key) -> Mesh {
        Mesh {
            host_wg,
            host_sign,
            members: Vec::new(),
            announcements: Vec::new(),
            index: Index::default(),
        }
    }

    /// Re-checks every stored blob (the file may have been edited) and rebuilds the index.
    pub fn reindex(&mut self) {
        let members = std::mem::take(&mut self.members);
        let announcements = std::mem::take(&mut self.announcements);
        self.index = Index::default();
        for m in &members {
            let _ = self.accept_member(m);
        }
        for a in &announcements {
            let _ = self.accept_announcement(a);
        }
    }

    /// Takes a member record; `Ok(Some)` when it changed what this node knows.
    pub fn accept_member(&mut self, s: &Signed) -> Result<Option<MemberRecord>, MeshError> {
        verify(&self.host_sign, MEMBER_CONTEXT, s)?;
        let rec: MemberRecord =
            serde_json::from_str(&s.body).map_err(|e| MeshError::ParseBody(e.to_string()))?;
        if let Some((held, slot)) = self.index.members.get(&rec.wg_key) {
            if rec.version == held.version && self.members[*slot] == *s {
                return Ok(None);
            }
            if rec.version <= held.version || (held.revoked && !rec.revoked) {
                return Err(MeshError::Stale);
            }
            let slot = *slot;
            self.members[slot] = s.clone();
            self.index.members.insert(rec.wg_key, (rec.clone(), slot));
        } else {
            self.members.push(s.clone());
            self.index
                .members
                .insert(rec.wg_key, (rec.clone(), self.members.len() - 1));
        }
        if rec.revoked {
            self.drop_announcement(&rec.wg_key);
        }
        Ok(Some(rec))
    }

    fn drop_announcement(&mut self, key: &Key) {
        if let Some((_, slot)) = self.index.announcements.remove(key) {
            self.announcements.remove(slot);
            for (_, s) in self.index.announcements.values_mut() {
                if *s > slot {
                    *s -= 1;
                }
            }
        }
    }

    /// Takes an endpoint announcement; `Ok(Some)` when it is news.
    pub fn accept_announcement(&mut self, s: &Signed) -> Result<Option<Announcement>, MeshError> {
        let ann: Announcement =
            serde_json::from_str(&s.body).map_err(|e| MeshError::ParseBody(e.to_string()))?;
        let (member, _) = self
            .index
            .members
            .get(&ann.wg_key)
            .ok_or(MeshError::UnknownMember)?;
        if member.revoked {
            return Err(MeshError::Revoked);
        }
        verify(&member.sign_key, ANNOUNCE_CONTEXT, s)?;
        if ann.lan.len() > MAX_LAN {
            return Err(MeshError::CountLan(ann.lan.len()));
        }
        if let Some(bad) = ann.lan.iter().find(|a| !lan_allowed(a)) {
            return Err(MeshError::CheckLan(*bad));
        }
        if ann.public.len() > MAX_PUBLIC {
            return Err(MeshError::CountPublic(ann.public.len()));
        }
        if let Some(bad) = ann.public.iter().find(|a| !public_allowed(a)) {
            return Err(MeshError::CheckPublic(*bad));
        }
        // Share names show in every member's `ls` and end up in request paths.
        if let Some(bad) = ann.shares.iter().find(|n| !share_name_allowed(n)) {
            return Err(MeshError::CheckShare(bad.chars().take(64).collect()));
        }
        match self.index.announcements.get(&ann.wg_key) {
            Some((held, _)) if ann.seq == held.seq => Ok(None),
            Some((held, _)) if ann.seq < held.seq => Err(MeshError::Stale),
            Some((_, slot)) => {
                let slot = *slot;
                self.announcements[slot] = s.clone();
                self.index
                    .announcements
                    .insert(ann.wg_key, (ann.clone(), slot));
                Ok(Some(ann))
            }
            None => {
                self.announcements.push(s.clone());
                self.index
                    .announcements
                    .insert(ann.wg_key, (ann.clone(), self.announcements.len() - 1));
                Ok(Some(ann))
            }
        }
    }

    pub fn member(&self, key: &Key) -> Option<&MemberRecord> {
        self.index.members.get(key).map(|(r, _)| r)
    }

    pub fn member_signed(&self, key: &Key) -> Option<&Signed> {
        self.index.members.get(key).map(|(_, i)| &self.members[*i])
    }

    pub fn announcement(&self, key: &Key) -> Option<&Announcement> {
        self.index.announcements.get(key).map(|(a, _)| a)
    }

    pub fn announcement_signed(&self, key: &Key) -> Option<&Signed> {
        self.index
            .announcements
            .get(key)
            .map(|(_, i)| &self.announcements[*i])
    }

    /// Every record, revoked ones included.
    pub fn members(&self) -> impl Iterator<Item = &MemberRecord> {
        self.index.members.values().map(|(r, _)| r)
    }

    /// Members that are in the group now.
    pub fn active(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members().filter(|r| !r.revoked)
    }

    pub fn digest(&self) -> Vec<DigestEntry> {
        self.index
            .members
            .iter()
            .map(|(k, (r, _))| DigestEntry {
                key: *k,
                version: r.version,
                seq: self.announcement(k).map(|a| a.seq).unwrap_or(0),
            })
            .collect()
    }

    /// A short hash of [`Mesh::digest`]: equal on two nodes whose views agree, so an idle
    /// group compares views for a few bytes instead of whole digests.
    pub fn view_hash(&self) -> String {
        let digest = serde_json::to_vec(&self.digest()).unwrap_or_default();
        blake3::hash(&digest).to_hex()[..16].to_string()
    }

    /// Compares a peer's digest with ours: what to push to it (member records first, so
    /// that announcements find their member), and whether it holds something we lack.
    pub fn answer_digest(&self, theirs: &[DigestEntry]) -> (Vec<Signed>, Vec<Signed>, bool) {
        let their: BTreeMap<Key, &DigestEntry> = theirs.iter().map(|e| (e.key, e)).collect();
        let mut members = Vec::new();
        let mut announcements = Vec::new();
        for (k, (r, i)) in &self.index.members {
            let t = their.get(k);
            if t.is_none_or(|t| t.version < r.version) {
                members.push(self.members[*i].clone());
            }
            if let Some((a, j)) = self.index.announcements.get(k) {
                if !r.revoked && t.is_none_or(|t| t.seq < a.seq) {
                    announcements.push(self.announcements[*j].clone());
                }
            }
        }
        let they_have_news = theirs.iter().any(|e| match self.index.members.get(&e.key) {
            None => true,
            Some((r, _)) => {
                e.version > r.version
                    || (!r.revoked && e.seq > self.announcement(&e.key).map(|a| a.seq).unwrap_or(0))
            }
        });
        (members, announcements, they_have_news)
    }

    /// The address the next admitted member gets: the lowest free one in `network`.
    pub fn free_address(
        &self,
        network: ipnet::Ipv4Net,
        also_taken: &[Ipv4Addr],
    ) -> Option<Ipv4Addr> {
        network
            .hosts()
            .find(|a| !also_taken.contains(a) && !self.members().any(|m| m.address == *a))
    }
}

impl Mesh {
    /// The site a member is in: the public IPv4 address it is seen behind, or the IPv6
    /// /64 it is seen in (members behind one router each have their own global IPv6
    /// address, but share the router's prefix), see [`site_key`]. It is what the host
    /// observed and signed in the member's record, never the member's own claim. The
    /// host, which cannot observe itself, is where it announces it is.
    pub fn site_of(&self, key: &Key) -> Option<IpAddr> {
        let seen = if *key == self.host_wg {
            self.announcement(key).and_then(|a| a.public_endpoint)
        } else {
            self.member(key).and_then(|m| m.observed)
        };
        seen.map(|e| site_key(e.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        host: SigningKey,
        mesh: Mesh,
    }

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn world() -> World {
        let host = key(1);
        World {
            mesh: Mesh::new([100; 32], host.verifying_key().to_bytes()),
            host,
        }
    }

    fn record(n: u8, version: u64, revoked: bool) -> MemberRecord {
        MemberRecord {
            wg_key: [n; 32],
            sign_key: key(n).verifying_key().to_bytes(),
            name: format!("m{n}"),
            address: Ipv4Addr::new(100, 77, 0, n),
            admitted_at: 1,
            version,
            revoked,
            observed: None,
        }
    }

    fn ann(n: u8, seq: u64) -> Announcement {
        Announcement {
            wg_key: [n; 32],
            seq,
            public_endpoint: Some(SocketAddr::from(([203, 0, 113, n], 51871))),
            lan: vec![],
            public: vec![],
            relay_port: None,
            shares: vec![],
        }
    }

    #[test]
    fn host_signed_record_is_accepted_once() {
        let mut w = world();
        let s = sign_member(&w.host, &record(2, 1, false));
        assert!(w.mesh.accept_member(&s).unwrap().is_some());
        assert_eq!(w.mesh.accept_member(&s), Ok(None), "a duplicate is no news");
        assert_eq!(w.mesh.active().count(), 1);
    }

    #[test]
    fn record_signed_by_anyone_but_the_host_is_dropped() {
        let mut w = world();
        let forged = sign_member(&key(2), &record(2, 1, false));
        assert_eq!(
            w.mesh.accept_member(&forged),
            Err(MeshError::VerifySignature)
        );
        let mut tampered = sign_member(&w.host, &record(2, 1, false));
        tampered.body = tampered.body.replace("m2", "m9");
        assert_eq!(
            w.mesh.accept_member(&tampered),
            Err(MeshError::VerifySignature)
        );
        assert_eq!(w.mesh.members().count(), 0);
    }

    #[test]
    fn older_record_is_dropped_and_revocation_is_final() {
        let mut w = world();
        let v1 = sign_member(&w.host, &record(2, 1, false));
        let v2 = sign_member(&w.host, &record(2, 2, true));
        let v3 = sign_member(&w.host, &record(2, 3, false));
        w.mesh.accept_member(&v1).unwrap();
        w.mesh.accept_member(&v2).unwrap();
        assert_eq!(
            w.mesh.accept_member(&v1),
            Err(MeshError::Stale),
            "replayed old record"
        );
        assert_eq!(
            w.mesh.accept_member(&v3),
            Err(MeshError::Stale),
            "un-revoking"
        );
        assert_eq!(w.mesh.active().count(), 0);
    }

    #[test]
    fn reordered_records_converge_to_the_newest() {
        let mut a = world();
        let mut b = world();
        let v1 = sign_member(&a.host, &record(2, 1, false));
        let v2 = sign_member(&a.host, &record(2, 2, true));
        a.mesh.accept_member(&v1).unwrap();
        a.mesh.accept_member(&v2).unwrap();
        b.mesh.accept_member(&v2).unwrap();
        assert!(b.mesh.accept_member(&v1).is_err());
        assert_eq!(a.mesh.digest(), b.mesh.digest());
    }

    #[test]
    fn announcement_needs_its_members_signature_and_a_higher_seq() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        assert_eq!(
            w.mesh
                .accept_announcement(&sign_announcement(&key(3), &ann(2, 5))),
            Err(MeshError::VerifySignature)
        );
        assert!(w
            .mesh
            .accept_announcement(&sign_announcement(&key(2), &ann(2, 5)))
            .unwrap()
            .is_some());
        assert_eq!(
            w.mesh
                .accept_announcement(&sign_announcement(&key(2), &ann(2, 4))),
            Err(MeshError::Stale)
        );
        assert_eq!(
            w.mesh
                .accept_announcement(&sign_announcement(&key(4), &ann(4, 5))),
            Err(MeshError::UnknownMember)
        );
    }

    #[test]
    fn a_signature_made_for_a_member_record_cannot_pass_for_an_announcement_nor_the_reverse() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        // Valid bodies of the other kind, signed by the right key under the wrong context:
        // only the context stands between them and acceptance.
        let wrong = sign(&key(2), MEMBER_CONTEXT, &ann(2, 5));
        assert_eq!(
            w.mesh.accept_announcement(&wrong),
            Err(MeshError::VerifySignature)
        );
        let wrong = sign(&w.host, ANNOUNCE_CONTEXT, &record(3, 1, false));
        assert_eq!(
            w.mesh.accept_member(&wrong),
            Err(MeshError::VerifySignature)
        );
        // The same bodies under their own context pass.
        assert!(w
            .mesh
            .accept_announcement(&sign(&key(2), ANNOUNCE_CONTEXT, &ann(2, 5)))
            .unwrap()
            .is_some());
        assert!(w
            .mesh
            .accept_member(&sign(&w.host, MEMBER_CONTEXT, &record(3, 1, false)))
            .unwrap()
            .is_some());
    }

    #[test]
    fn revoked_member_loses_its_announcement_and_cannot_announce() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        w.mesh
            .accept_announcement(&sign_announcement(&key(2), &ann(2, 5)))
            .unwrap();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 2, true)))
            .unwrap();
        assert!(w.mesh.announcement(&[2; 32]).is_none());
        assert_eq!(
            w.mesh
                .accept_announcement(&sign_announcement(&key(2), &ann(2, 9))),
            Err(MeshError::Revoked)
        );
    }

    #[test]
    fn digest_exchange_brings_two_views_together() {
        let mut a = world();
        let mut b = world();
        for n in 2..6 {
            let s = sign_member(&a.host, &record(n, 1, false));
            a.mesh.accept_member(&s).unwrap();
            a.mesh
                .accept_announcement(&sign_announcement(&key(n), &ann(n, 10)))
                .unwrap();
        }
        b.mesh
            .accept_member(&sign_member(&b.host, &record(9, 1, false)))
            .unwrap();
        let (members, anns, b_has_news) = a.mesh.answer_digest(&b.mesh.digest());
        assert!(b_has_news);
        assert_eq!((members.len(), anns.len()), (4, 4));
        for m in members {
            b.mesh.accept_member(&m).unwrap();
        }
        for x in anns {
            b.mesh.accept_announcement(&x).unwrap();
        }
        let (m2, a2, _) = b.mesh.answer_digest(&a.mesh.digest());
        for m in m2 {
            a.mesh.accept_member(&m).unwrap();
        }
        assert!(a2.is_empty());
        assert_eq!(a.mesh.digest(), b.mesh.digest());
    }

    #[test]
    fn reindex_after_load_keeps_only_what_verifies() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        w.mesh
            .accept_announcement(&sign_announcement(&key(2), &ann(2, 5)))
            .unwrap();
        let text = serde_json::to_string(&w.mesh).unwrap();
        let mut loaded: Mesh = serde_json::from_str(&text).unwrap();
        loaded.reindex();
        assert_eq!(loaded.digest(), w.mesh.digest());
        let forged = text.replace("m2", "m7");
        let mut loaded: Mesh = serde_json::from_str(&forged).unwrap();
        loaded.reindex();
        assert_eq!(loaded.members().count(), 0);
    }

    #[test]
    fn lan_addresses_are_private_and_at_most_eight() {
        let ok = [
            "10.1.2.3:51871",
            "172.16.0.9:51871",
            "192.168.1.20:51871",
            "[fd12:3456::1]:51871",
            "[fe80::1]:51871",
        ];
        for a in ok {
            assert!(lan_allowed(&a.parse().unwrap()), "{a}");
        }
        let bad = [
            "1.1.1.1:51871",
            "203.0.113.5:51871",
            "100.77.0.3:51871",
            "127.0.0.1:51871",
            "172.32.0.1:51871",
            "192.168.1.20:0",
            "[2001:db8::1]:51871",
            "[::1]:51871",
        ];
        for a in bad {
            assert!(!lan_allowed(&a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn an_announcement_with_a_public_or_a_ninth_lan_address_or_a_bad_share_name_is_refused() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        let mut a = ann(2, 5);
        a.lan = vec![
            "192.168.1.20:51871".parse().unwrap(),
            "1.1.1.1:51871".parse().unwrap(),
        ];
        assert_eq!(
            w.mesh.accept_announcement(&sign_announcement(&key(2), &a)),
            Err(MeshError::CheckLan("1.1.1.1:51871".parse().unwrap()))
        );
        a.lan = (1..=9)
            .map(|i| SocketAddr::from(([192, 168, 1, i], 51871)))
            .collect();
        assert_eq!(
            w.mesh.accept_announcement(&sign_announcement(&key(2), &a)),
            Err(MeshError::CountLan(9))
        );
        assert!(w.mesh.announcement(&[2; 32]).is_none());
        a.lan.pop();
        for bad in ["", "..", ".hidden", "a/b", "x\u{1b}[2J", &"s".repeat(64)] {
            a.shares = vec!["films".into(), bad.to_string()];
            assert!(
                matches!(
                    w.mesh.accept_announcement(&sign_announcement(&key(2), &a)),
                    Err(MeshError::CheckShare(_))
                ),
                "{bad:?}"
            );
        }
        a.shares = vec!["films".into(), "family-photos_2024.v2".into()];
        assert!(w
            .mesh
            .accept_announcement(&sign_announcement(&key(2), &a))
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_member_claiming_another_sites_public_ip_stays_where_the_host_saw_it() {
        let mut w = world();
        let seen_at: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let other_site: SocketAddr = "203.0.113.9:51871".parse().unwrap();
        let observed = MemberRecord {
            observed: Some(seen_at),
            ..record(2, 2, false)
        };
        w.mesh
            .accept_member(&sign_member(&w.host, &observed))
            .unwrap();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(3, 1, false)))
            .unwrap();
        for n in [2, 3] {
            let claim = Announcement {
                public_endpoint: Some(other_site),
                ..ann(n, 5)
            };
            w.mesh
                .accept_announcement(&sign_announcement(&key(n), &claim))
                .unwrap();
        }
        assert_eq!(w.mesh.site_of(&[2; 32]), Some(seen_at.ip()));
        assert_eq!(
            w.mesh.site_of(&[3; 32]),
            None,
            "not observed yet: in no site, whatever it claims"
        );
        // Nor can it sign its own observation.
        let forged = MemberRecord {
            observed: Some(other_site),
            ..record(2, 3, false)
        };
        assert_eq!(
            w.mesh.accept_member(&sign_member(&key(2), &forged)),
            Err(MeshError::VerifySignature)
        );
        assert_eq!(w.mesh.site_of(&[2; 32]), Some(seen_at.ip()));
    }

    #[test]
    fn the_host_is_in_the_site_it_announces() {
        // world()'s host has the WireGuard key [100; 32].
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(100, 1, false)))
            .unwrap();
        w.mesh
            .accept_announcement(&sign_announcement(&key(100), &ann(100, 1)))
            .unwrap();
        assert_eq!(
            w.mesh.site_of(&[100; 32]),
            Some("203.0.113.100".parse().unwrap())
        );
    }

    #[test]
    fn a_record_without_an_observation_is_encoded_as_older_nodes_encode_it() {
        let body = serde_json::to_string(&record(2, 1, false)).unwrap();
        assert!(!body.contains("observed"), "{body}");
        let old: MemberRecord = serde_json::from_str(&body).unwrap();
        assert_eq!(old.observed, None);
    }

    #[test]
    fn members_seen_in_one_ipv6_64_share_a_site_and_one_in_the_next_64_does_not() {
        let mut w = world();
        for (n, seen) in [
            (2, "[2001:db8:1:0:a::2]:51871"),
            (3, "[2001:db8:1:0:b::3]:40000"),
            (4, "[2001:db8:1:1::4]:51871"),
            (5, "198.51.100.7:51871"),
            (6, "198.51.100.7:40001"),
        ] {
            let rec = MemberRecord {
                observed: Some(seen.parse().unwrap()),
                ..record(n, 2, false)
            };
            w.mesh.accept_member(&sign_member(&w.host, &rec)).unwrap();
        }
        let site = |n: u8| w.mesh.site_of(&[n; 32]);
        assert_eq!(site(2), site(3));
        assert_eq!(site(2).map(site_name).as_deref(), Some("2001:db8:1::/64"));
        assert_ne!(site(4), site(2));
        assert_eq!(site(5), site(6));
        assert_eq!(site(5).map(site_name).as_deref(), Some("198.51.100.7"));
    }

    #[test]
    fn an_announcement_with_a_private_or_a_fifth_public_address_is_refused() {
        let mut w = world();
        w.mesh
            .accept_member(&sign_member(&w.host, &record(2, 1, false)))
            .unwrap();
        let mut a = ann(2, 5);
        for bad in [
            "192.168.1.20:51871",
            "100.77.0.2:51871",
            "[fd00::1]:51871",
            "[fe80::1]:51871",
            "[::ffff:203.0.113.2]:51871",
            "[2001:db8::2]:0",
            "0.1.2.3:51871",
            "240.0.0.1:51871",
            "198.19.0.1:51871",
            "[::203.0.113.2]:51871",
            "[64:ff9b::cb00:7102]:51871",
            "[64:ff9b:1::1]:51871",
            "[2002:cb00:7102::1]:51871",
            "[2001:0:4136:e378::1]:51871",
            "[fec0::1]:51871",
        ] {
            a.public = vec![
                "[2001:db8:1::2]:51871".parse().unwrap(),
                bad.parse().unwrap(),
            ];
            assert_eq!(
                w.mesh.accept_announcement(&sign_announcement(&key(2), &a)),
                Err(MeshError::CheckPublic(bad.parse().unwrap())),
                "{bad}"
            );
        }
        a.public = (1..=5)
            .map(|i| SocketAddr::from(([0x2001, 0xdb8, 1, 0, 0, 0, 0, i], 51871)))
            .collect();
        assert_eq!(
            w.mesh.accept_announcement(&sign_announcement(&key(2), &a)),
            Err(MeshError::CountPublic(5))
        );
        // Four, of both families, pass.
        a.public.truncate(3);
        a.public.push("203.0.113.2:51871".parse().unwrap());
        assert!(w
            .mesh
            .accept_announcement(&sign_announcement(&key(2), &a))
            .unwrap()
            .is_some());
        assert_eq!(w.mesh.announcement(&[2; 32]).unwrap().public, a.public);
    }

    #[test]
    fn an_announcement_without_public_addresses_is_encoded_as_older_nodes_encode_it() {
        let body = serde_json::to_string(&ann(2, 1)).unwrap();
        assert!(!body.contains("\"public\""), "{body}");
        let old: Announcement = serde_json::from_str(&body).unwrap();
        assert!(old.public.is_empty());
    }

    #[test]
    fn a_session_on_a_lan_address_or_inside_the_sites_own_64_runs_over_the_lan() {
        let mut a = ann(2, 1);
        a.lan = vec!["192.168.1.20:51871".parse().unwrap()];
        let v6_site = Some(site_key("2001:db8:1::a".parse().unwrap()));
        let v4_site = Some("198.51.100.7".parse().unwrap());
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(on_site_lan(Some(&a), v4_site, at("192.168.1.20:51871")));
        assert!(on_site_lan(Some(&a), v6_site, at("[2001:db8:1::b]:51871")));
        assert!(on_site_lan(None, v6_site, at("[2001:db8:1::b]:40000")));
        assert!(!on_site_lan(Some(&a), v6_site, at("[2001:db8:2::b]:51871")));
        assert!(!on_site_lan(Some(&a), v4_site, at("198.51.100.7:51871")));
        assert!(!on_site_lan(Some(&a), None, at("[2001:db8:1::b]:51871")));
    }
}
