//! This node's place in its group, as persisted in `group.json`: the VPN network, its own
//! address, the host's name, the last endpoint seen for each peer, the invite each member
//! came in by (on the host), and peers added by hand. Who is a member is the signed
//! [`Mesh`]'s business; this module only allocates addresses against it (a joiner's name
//! is checked, never changed: `wire::check_name`). It also derives every member's inner
//! IPv6 address ([`network6`], [`address6`]), which no record carries.
//! Pure: no socket, no file.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::group::identity::Key;
use crate::group::link::InviteId;
use crate::group::mesh::Mesh;

/// The group's IPv6 network inside the tunnel: a unique local /64 (RFC 4193), `fd` then
/// 40 bits of the BLAKE3 hash of the host's WireGuard key, then subnet 0. Every node holds
/// the host's key (the access link pins it), so every node computes the same network
/// with no new field on the wire; two groups on one machine get different ones unless
/// their 40 bits collide (one chance in a trillion per pair, RFC 4193's own odds).
pub fn network6(host: &Key) -> Ipv6Net {
    let hash = blake3::hash(host);
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&hash.as_bytes()[..5]);
    // Octets 6-7 (the subnet) and the interface id stay zero: this is the network.
    Ipv6Net::new(Ipv6Addr::from(octets), 64).unwrap_or_default()
}

/// A member's inner IPv6 address: the group's /64 ([`network6`]) with the member's IPv4
/// VPN address as the last 32 bits of the interface id (`fdxx:xxxx:xxxx::100.77.0.2`).
/// Collision-free by construction: the map from IPv4 to IPv6 is one to one, and the IPv4
/// addresses are unique in a group (the host allocates them, [`Group::add_static`]
/// refuses a taken one, and the tunnel routes neither family to a second peer claiming
/// one), so two members never share an IPv6 address either.
pub fn address6(host: &Key, v4: Ipv4Addr) -> Ipv6Addr {
    let mut octets = network6(host).addr().octets();
    octets[12..].copy_from_slice(&v4.octets());
    Ipv6Addr::from(octets)
}

/// A standard WireGuard peer added by hand (`watchalong peer add`); not gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticPeer {
    pub name: String,
    #[serde(with = "crate::group::identity::key_b64")]
    pub public_key: Key,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub network: Ipv4Net,
    pub host_name: String,
    pub my_address: Ipv4Addr,
    pub mesh: Mesh,
    /// Last endpoint seen per peer (base64 key), so a restarted node knows where to knock.
    #[serde(default)]
    pub endpoints: BTreeMap<String, SocketAddr>,
    /// On the host: which invite admitted which member (base64 key).
    #[serde(default)]
    pub admitted_by: BTreeMap<String, InviteId>,
    #[serde(default)]
    pub static_peers: Vec<StaticPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("the network {0} has no free address left")]
    AllocateAddress(Ipv4Net),
    #[error("the address {0} is outside the group's network {1}")]
    AddressOutsideNetwork(Ipv4Addr, Ipv4Net),
    #[error("the address {0} already belongs to {1}")]
    AddressTaken(Ipv4Addr, String),
}

impl Group {
    /// The group's inner IPv6 /64 (see [`network6`]).
    pub fn network6(&self) -> Ipv6Net {
        network6(&self.mesh.host_wg)
    }

    /// The inner IPv6 address of the member whose VPN address is `v4` (see [`address6`]).
    pub fn address6(&self, v4: Ipv4Addr) -> Ipv6Addr {
        address6(&self.mesh.host_wg, v4)
    }

    /// The member's VPN address behind inner IPv6 address `ip`, when `ip` is one of this
    /// group's: the inverse of [`Group::address6`].
    pub fn address4_of(&self, ip: Ipv6Addr) -> Option<Ipv4Addr> {
        if !self.network6().contains(&ip) {
            return None;
        }
        let o = ip.octets();
        let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
        (self.address6(v4) == ip).then_some(v4)
    }

    pub fn is_host(&self, my_key: &Key) -> bool {
        &self.mesh.host_wg == my_key
    }

    fn owner_of(&self, addr: Ipv4Addr) -> Option<String> {
        if addr == self.my_address {
            return Some("this node".into());
        }
        if let Some(m) = self.mesh.members().find(|m| m.address == addr) {
            return Some(m.name.clone());
        }
        self.static_peers
            .iter()
            .find(|p| p.address == addr)
            .map(|p| p.name.clone())
    }

    /// The lowest free host address of the network. Revoked members keep theirs, so an
    /// old record can never point at a new member.
    pub fn allocate_address(&self) -> Result<Ipv4Addr, GroupError> {
        let mut taken: Vec<Ipv4Addr> = self.static_peers.iter().map(|p| p.address).collect();
        taken.push(self.my_address);
        self.mesh
            .free_address(self.network, &taken)
            .ok_or(GroupError::AllocateAddress(self.network))
    }

    pub fn add_static(&mut self, peer: StaticPeer) -> Result<(), GroupError> {
        if !self.network.contains(&peer.address) {
            return Err(GroupError::AddressOutsideNetwork(
                peer.address,
                self.network,
            ));
        }
        let mine = self
            .static_peers
            .iter()
            .any(|p| p.public_key == peer.public_key && p.address == peer.address);
        if let Some(owner) = self.owner_of(peer.address) {
            if !mine {
                return Err(GroupError::AddressTaken(peer.address, owner));
            }
        }
        self.static_peers
            .retain(|p| p.public_key != peer.public_key);
        self.static_peers.push(peer);
        Ok(())
    }

    pub fn remove_static(&mut self, key: &Key) -> bool {
        let before = self.static_peers.len();
        self.static_peers.retain(|p| &p.public_key != key);
        before != self.static_peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::mesh::{sign_member, MemberRecord};
    use ed25519_dalek::SigningKey;

    fn group() -> (SigningKey, Group) {
        let host = SigningKey::from_bytes(&[1; 32]);
        let mut mesh = Mesh::new([1; 32], host.verifying_key().to_bytes());
        let rec = MemberRecord {
            wg_key: [1; 32],
            sign_key: host.verifying_key().to_bytes(),
            name: "h".into(),
            address: "100.77.0.1".parse().unwrap(),
            admitted_at: 0,
            version: 1,
            revoked: false,
            observed: None,
        };
        mesh.accept_member(&sign_member(&host, &rec)).unwrap();
        (
            host,
            Group {
                network: "100.77.0.0/16".parse().unwrap(),
                host_name: "h".into(),
                my_address: "100.77.0.1".parse().unwrap(),
                mesh,
                endpoints: BTreeMap::new(),
                admitted_by: BTreeMap::new(),
                static_peers: vec![],
            },
        )
    }

    fn admit(host: &SigningKey, g: &mut Group, n: u8, revoked: bool) -> Ipv4Addr {
        let address = g.allocate_address().unwrap();
        let rec = MemberRecord {
            wg_key: [n; 32],
            sign_key: [n; 32],
            name: format!("m{n}"),
            address,
            admitted_at: 0,
            version: if revoked { 2 } else { 1 },
            revoked,
            observed: None,
        };
        g.mesh.accept_member(&sign_member(host, &rec)).unwrap();
        address
    }

    #[test]
    fn members_get_the_next_free_address_and_revoked_ones_keep_theirs() {
        let (host, mut g) = group();
        assert_eq!(admit(&host, &mut g, 2, false).to_string(), "100.77.0.2");
        assert_eq!(admit(&host, &mut g, 3, true).to_string(), "100.77.0.3");
        assert_eq!(g.allocate_address().unwrap().to_string(), "100.77.0.4");
    }

    #[test]
    fn static_peer_cannot_take_a_members_address() {
        let (_, mut g) = group();
        let p = StaticPeer {
            name: "wg".into(),
            public_key: [9; 32],
            address: "100.77.0.1".parse().unwrap(),
            endpoint: None,
        };
        assert!(matches!(
            g.add_static(p.clone()),
            Err(GroupError::AddressTaken(..))
        ));
        let p = StaticPeer {
            address: "100.77.0.50".parse().unwrap(),
            ..p
        };
        g.add_static(p.clone()).unwrap();
        g.add_static(p).unwrap();
        assert_eq!(g.static_peers.len(), 1);
        assert_eq!(g.allocate_address().unwrap().to_string(), "100.77.0.2");
    }

    #[test]
    fn every_node_derives_the_same_ula_address_for_a_member_and_distinct_members_get_distinct_ones()
    {
        let (_, g) = group();
        let net = g.network6();
        assert_eq!(net.prefix_len(), 64);
        assert_eq!(net.addr().octets()[0], 0xfd);
        assert_eq!(&net.addr().octets()[6..], &[0u8; 10]);
        let a: Ipv4Addr = "100.77.0.2".parse().unwrap();
        let b: Ipv4Addr = "100.77.1.2".parse().unwrap();
        // The same host key gives the same address wherever it is computed.
        assert_eq!(g.address6(a), address6(&[1; 32], a));
        assert_ne!(g.address6(a), g.address6(b));
        assert!(net.contains(&g.address6(a)));
        assert_eq!(g.address4_of(g.address6(b)), Some(b));
        // Another group's network, and an address of this one with a non-zero
        // interface-id head, name no member.
        assert_ne!(network6(&[2; 32]), net);
        assert_eq!(g.address4_of(address6(&[2; 32], a)), None);
        let mut o = g.address6(a).octets();
        o[8] = 1;
        assert_eq!(g.address4_of(Ipv6Addr::from(o)), None);
    }
}
