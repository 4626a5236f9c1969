//! Who is in the group, as this node knows it: the VPN network, the host whose word
//! decides membership, this node's own address, and one record per other member. Pure:
//! decisions about admission and address allocation are made here and persisted by the
//! caller. It never touches a socket or the tunnel.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::link::InviteId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    #[serde(with = "crate::identity::key_b64")]
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    /// Last endpoint seen or configured; the tunnel roams it on authenticated packets.
    pub endpoint: Option<SocketAddr>,
    pub admitted_at: u64,
    /// The invite it came in by (`None` for the host and for peers added by hand).
    pub invite: Option<InviteId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub network: Ipv4Net,
    #[serde(with = "crate::identity::key_b64")]
    pub host_key: [u8; 32],
    pub host_name: String,
    pub my_address: Ipv4Addr,
    /// Every member but this node.
    pub members: Vec<Member>,
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
    /// A node's own one-member group, of which it is the host.
    pub fn hosted(network: Ipv4Net, my_key: [u8; 32], my_name: &str) -> Group {
        let my_address = network.hosts().next().unwrap_or(network.addr());
        Group {
            network,
            host_key: my_key,
            host_name: my_name.to_string(),
            my_address,
            members: Vec::new(),
        }
    }

    pub fn is_host(&self, my_key: &[u8; 32]) -> bool {
        &self.host_key == my_key
    }

    pub fn member(&self, key: &[u8; 32]) -> Option<&Member> {
        self.members.iter().find(|m| &m.public_key == key)
    }

    pub fn member_mut(&mut self, key: &[u8; 32]) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| &m.public_key == key)
    }

    fn owner_of(&self, addr: Ipv4Addr) -> Option<&str> {
        if addr == self.my_address {
            return Some("this node");
        }
        self.members
            .iter()
            .find(|m| m.address == addr)
            .map(|m| m.name.as_str())
    }

    /// The lowest free host address of the network.
    pub fn allocate_address(&self) -> Result<Ipv4Addr, GroupError> {
        self.network
            .hosts()
            .find(|a| self.owner_of(*a).is_none())
            .ok_or(GroupError::AllocateAddress(self.network))
    }

    /// A name no other member uses, so `status` lines can be told apart.
    fn unique_name(&self, wanted: &str) -> String {
        let taken = |n: &str| n == self.host_name || self.members.iter().any(|m| m.name == n);
        if !taken(wanted) {
            return wanted.to_string();
        }
        (2..)
            .map(|i| format!("{wanted}-{i}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| wanted.to_string())
    }

    /// Admits a member with a fresh address. Admitting a key that is already a member
    /// returns its record unchanged.
    pub fn admit(
        &mut self,
        name: &str,
        key: [u8; 32],
        endpoint: Option<SocketAddr>,
        invite: Option<InviteId>,
        now: u64,
    ) -> Result<Member, GroupError> {
        if let Some(m) = self.member(&key) {
            return Ok(m.clone());
        }
        let address = self.allocate_address()?;
        let m = Member {
            name: self.unique_name(name),
            public_key: key,
            address,
            endpoint,
            admitted_at: now,
            invite,
        };
        self.members.push(m.clone());
        Ok(m)
    }

    /// Adds a peer whose address is chosen by hand (a standard WireGuard peer).
    pub fn add_static(&mut self, member: Member) -> Result<(), GroupError> {
        if !self.network.contains(&member.address) {
            return Err(GroupError::AddressOutsideNetwork(
                member.address,
                self.network,
            ));
        }
        if let Some(owner) = self.owner_of(member.address) {
            if self.member(&member.public_key).map(|m| m.address) != Some(member.address) {
                return Err(GroupError::AddressTaken(member.address, owner.to_string()));
            }
        }
        self.members.retain(|m| m.public_key != member.public_key);
        self.members.push(member);
        Ok(())
    }

    pub fn remove(&mut self, key: &[u8; 32]) -> Option<Member> {
        let pos = self.members.iter().position(|m| &m.public_key == key)?;
        Some(self.members.remove(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Net {
        "100.77.0.0/16".parse().unwrap()
    }

    #[test]
    fn host_takes_the_first_address_and_members_the_next_free() {
        let mut g = Group::hosted(net(), [1; 32], "h");
        assert_eq!(g.my_address, "100.77.0.1".parse::<Ipv4Addr>().unwrap());
        let a = g.admit("a", [2; 32], None, None, 0).unwrap();
        let b = g.admit("b", [3; 32], None, None, 0).unwrap();
        assert_eq!(a.address.to_string(), "100.77.0.2");
        assert_eq!(b.address.to_string(), "100.77.0.3");
        g.remove(&[2; 32]);
        let c = g.admit("c", [4; 32], None, None, 0).unwrap();
        assert_eq!(c.address.to_string(), "100.77.0.2");
    }

    #[test]
    fn admitting_a_member_twice_keeps_its_address() {
        let mut g = Group::hosted(net(), [1; 32], "h");
        let a = g.admit("a", [2; 32], None, None, 0).unwrap();
        let again = g.admit("a", [2; 32], None, None, 5).unwrap();
        assert_eq!(a, again);
        assert_eq!(g.members.len(), 1);
    }

    #[test]
    fn same_name_gets_a_suffix() {
        let mut g = Group::hosted(net(), [1; 32], "h");
        let a = g.admit("h", [2; 32], None, None, 0).unwrap();
        assert_eq!(a.name, "h-2");
    }

    #[test]
    fn full_network_refuses_admission() {
        let mut g = Group::hosted("10.0.0.0/30".parse().unwrap(), [1; 32], "h");
        g.admit("a", [2; 32], None, None, 0).unwrap();
        assert!(matches!(
            g.admit("b", [3; 32], None, None, 0),
            Err(GroupError::AllocateAddress(_))
        ));
    }
}
