//! Which peer owns which VPN address: a longest-prefix-match table over the members'
//! allowed networks. Pure. The tunnel asks it twice per packet: where to send an outgoing
//! packet, and whether the peer an incoming packet came from really owns its source
//! address (boringtun only checks the sender's own list, so without this one member could
//! spoof another).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone)]
pub struct Routes<K> {
    /// Kept sorted by prefix length, longest first, so the first match is the best.
    entries: Vec<(Ipv4Net, K)>,
}

impl<K> Default for Routes<K> {
    fn default() -> Self {
        Routes {
            entries: Vec::new(),
        }
    }
}

impl<K: Clone + PartialEq> Routes<K> {
    pub fn insert(&mut self, net: Ipv4Net, owner: K) {
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

    pub fn owner(&self, addr: Ipv4Addr) -> Option<&K> {
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
        r.insert("100.77.0.0/16".parse().unwrap(), "host");
        r.insert("100.77.0.2/32".parse().unwrap(), "b");
        r.insert("100.77.0.0/24".parse().unwrap(), "site");
        assert_eq!(r.owner("100.77.0.2".parse().unwrap()), Some(&"b"));
        assert_eq!(r.owner("100.77.0.3".parse().unwrap()), Some(&"site"));
        assert_eq!(r.owner("100.77.1.3".parse().unwrap()), Some(&"host"));
        assert_eq!(r.owner("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn removed_owner_owns_nothing() {
        let mut r = Routes::default();
        r.insert("100.77.0.2/32".parse().unwrap(), 1);
        r.remove_owner(&1);
        assert_eq!(r.owner("100.77.0.2".parse().unwrap()), None);
    }
}
