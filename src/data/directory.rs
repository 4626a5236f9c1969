//! Who is where, as the data layer needs it: the members this node knows ([`Peer`]), the
//! [`Directory`] of them (itself included) that routes are planned over, and the
//! [`Membership`] trait the daemon implements so the servers can ask, per connection and
//! per request, who an address or a key belongs to. It holds a snapshot and plans with
//! [`crate::data::planner`]; it must not do I/O or decide membership.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::data::planner::{self, Route};
use crate::group::identity::Key;

/// A member as the transfer code needs it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub key: Key,
    pub name: String,
    pub vpn: Ipv4Addr,
    /// Its LAN relay, when it announced one.
    pub relay: Option<SocketAddr>,
    pub site: Option<String>,
    pub up: bool,
    pub shares: Vec<String>,
}

/// Everyone this node knows, itself included.
#[derive(Debug, Clone)]
pub struct Directory {
    pub me: Key,
    pub peers: Vec<Peer>,
}

impl Directory {
    pub fn get(&self, key: &Key) -> Option<&Peer> {
        self.peers.iter().find(|p| &p.key == key)
    }

    pub fn by_name(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    fn planner_members(&self) -> Vec<planner::Member> {
        self.peers
            .iter()
            .map(|p| planner::Member {
                key: p.key,
                name: p.name.clone(),
                site: p.site.clone(),
                up: p.up,
            })
            .collect()
    }

    pub fn plan(
        &self,
        source: &Key,
        requester: &Key,
        transfer: &str,
        exclude: &[Key],
    ) -> Result<Route, planner::PlanError> {
        planner::plan(
            &self.planner_members(),
            source,
            requester,
            transfer,
            exclude,
        )
    }

    /// Whether a member up at this node's site could ask this node's relay for what it
    /// fetches: only then is a fetched chunk worth keeping in the cache.
    pub(super) fn has_neighbours(&self) -> bool {
        let Some(mine) = self.get(&self.me).and_then(|p| p.site.as_ref()) else {
            return false;
        };
        self.peers
            .iter()
            .any(|p| p.key != self.me && p.up && p.site.as_ref() == Some(mine))
    }

    /// The same, with this node as its site's gateway: it serves nearby members itself.
    pub(super) fn plan_as_gateway(
        &self,
        source: &Key,
        transfer: &str,
    ) -> Result<Route, planner::PlanError> {
        let mine = self.get(&self.me).and_then(|p| p.site.clone());
        let members: Vec<planner::Member> = self
            .planner_members()
            .into_iter()
            .map(|mut m| {
                if m.key != self.me && &m.key != source && mine.is_some() && m.site == mine {
                    m.up = false;
                }
                m
            })
            .collect();
        planner::plan(&members, source, &self.me, transfer, &[])
    }
}

/// What the node gives the servers: the current directory.
pub trait Membership: Send + Sync + 'static {
    fn directory(&self) -> Directory;
    /// This node's VPN address and the group's network: cheap, asked for every
    /// connection.
    fn vpn(&self) -> (Ipv4Addr, ipnet::Ipv4Net);
    /// The member (not this node) whose VPN address is `ip`: cheap, asked for every
    /// request.
    fn member_at(&self, ip: IpAddr) -> Option<Key>;
    /// Whether `key` is a member other than this node: cheap, asked for every relay
    /// request before anything costs.
    fn is_member(&self, key: &Key) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(k: u8, site: Option<&str>, up: bool) -> Peer {
        Peer {
            key: [k; 32],
            name: format!("n{k}"),
            vpn: Ipv4Addr::new(100, 64, 0, k),
            relay: None,
            site: site.map(str::to_string),
            up,
            shares: Vec::new(),
        }
    }

    #[test]
    fn a_node_has_neighbours_only_when_a_member_up_shares_its_site() {
        let dir = |peers| Directory { me: [1; 32], peers };
        assert!(!dir(vec![peer(1, None, true), peer(2, None, true)]).has_neighbours());
        assert!(!dir(vec![peer(1, Some("a"), true), peer(2, Some("b"), true)]).has_neighbours());
        assert!(!dir(vec![peer(1, Some("a"), true), peer(2, Some("a"), false)]).has_neighbours());
        assert!(dir(vec![peer(1, Some("a"), true), peer(2, Some("a"), true)]).has_neighbours());
    }
}
