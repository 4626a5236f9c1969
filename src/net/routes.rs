//! Which peer owns which VPN address: a longest-prefix-match table over the members'
//! allowed networks. Pure. The tunnel asks it twice per packet: where to send an outgoing
//! packet, and whether the peer an incoming packet came from really owns its source
//! address (boringtun only checks the sender's own list, so without this one member could
//! spoof another). Both families live in one table: a member owns its IPv4 VPN address
//! and its inner IPv6 address (a /128 each); a prefix of one family never matches an
//! address of the other.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Routes<K> {
    /// Kept sorted by prefix length, longest first, so the first match is the best.
    entries: Vec<(IpNet, K)>,
}

impl<K> Default for Routes<K> {
    fn default() -> Self {
        Routes {
            entries: Vec::new(),
        }
    }
}

impl<K: Clone + PartialEq> Routes<K> {
    pub fn insert(&mut self, net: impl Into<IpNet>, owner: K) {
        let net = net.into();
        self.entries.retain(|(n, _)| *n != net);
        let pos = self
            .entries
            .iter()
            .position(|(n, _)| n.prefix_len() < net.prefix_len())
            .unwrap_or(self.entries.len());
        self.entries.insert(pos, (net, owner));
    }

    pub fn remove_owner(&mut self, owner: &K) {
        self.entries.retain(|(_, k)| k != owner);
    }

    pub fn owner(&self, addr: impl Into<IpAddr>) -> Option<&K> {
        let addr = addr.into();
        self.entries
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|(_, k)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_whatever_the_insert_order() {
        let mut r = Routes::default();
        r.insert("100.77.0.0/16".parse::<IpNet>().unwrap(), "host");
        r.insert("100.77.0.2/32".parse::<IpNet>().unwrap(), "b");
        r.insert("100.77.0.0/24".parse::<IpNet>().unwrap(), "site");
        assert_eq!(r.owner("100.77.0.2".parse::<IpAddr>().unwrap()), Some(&"b"));
        assert_eq!(
            r.owner("100.77.0.3".parse::<IpAddr>().unwrap()),
            Some(&"site")
        );
        assert_eq!(
            r.owner("100.77.1.3".parse::<IpAddr>().unwrap()),
            Some(&"host")
        );
        assert_eq!(r.owner("10.0.0.1".parse::<IpAddr>().unwrap()), None);
    }

    #[test]
    fn an_ipv6_address_has_its_own_owner_and_no_ipv4_prefix_matches_it() {
        let mut r = Routes::default();
        r.insert("0.0.0.0/0".parse::<IpNet>().unwrap(), "v4 default");
        r.insert("fd00:1:2::100.77.0.2/128".parse::<IpNet>().unwrap(), "b");
        assert_eq!(
            r.owner("fd00:1:2::100.77.0.2".parse::<IpAddr>().unwrap()),
            Some(&"b")
        );
        assert_eq!(
            r.owner("fd00:1:2::100.77.0.3".parse::<IpAddr>().unwrap()),
            None
        );
        assert_eq!(
            r.owner("100.77.0.2".parse::<IpAddr>().unwrap()),
            Some(&"v4 default")
        );
    }

    #[test]
    fn removed_owner_owns_nothing() {
        let mut r = Routes::default();
        r.insert("100.77.0.2/32".parse::<IpNet>().unwrap(), 1);
        r.remove_owner(&1);
        assert_eq!(r.owner("100.77.0.2".parse::<IpAddr>().unwrap()), None);
    }
}
