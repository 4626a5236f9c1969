//! The node as the data layer sees it ([`Membership`]): who is a member, who holds which
//! address, and the directory of members (VPN address, relay, site, whether the tunnel to
//! it is up, its shares) that transfers plan their routes with. The answers are pure
//! functions of the group and the tunnel's status; the node only reads those under its
//! lock. It also hands messages for other layers (sync announcements, room messages) to
//! their owners without doing their work. It changes nothing and spawns nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::daemon::node::Node;
use crate::daemon::peers::routable;
use crate::data::transfer::{self, Directory, Membership};
use crate::group::identity::Key;
use crate::group::place::Group;
use crate::net::tunnel::{PathKind, PeerStatus};

impl Membership for Node {
    fn vpn(&self) -> (Ipv4Addr, ipnet::Ipv4Net) {
        let book = self.book();
        (book.group.my_address, book.group.network)
    }

    fn member_at(&self, ip: IpAddr) -> Option<Key> {
        member_at(&self.book().group, &self.public_key, ip)
    }

    fn is_member(&self, key: &Key) -> bool {
        is_member(&self.book().group, &self.public_key, key)
    }

    fn directory(&self) -> Directory {
        // The tunnel's status is read before the book lock is taken: the lock every
        // chunk request waits on is held only while the directory is built.
        let seen = self.tunnel.status();
        let book = self.book();
        directory_of(&book.group, self.public_key, &seen)
    }
}

/// The active member other than `me` whose VPN address is `ip`.
pub fn member_at(group: &Group, me: &Key, ip: IpAddr) -> Option<Key> {
    let IpAddr::V4(ip) = ip else {
        return None;
    };
    group
        .mesh
        .active()
        .find(|m| m.address == ip && m.wg_key != *me)
        .map(|m| m.wg_key)
}

/// Whether `key` is a member of `group` other than `me`, and not removed.
pub fn is_member(group: &Group, me: &Key, key: &Key) -> bool {
    *key != *me && group.mesh.member(key).is_some_and(|m| !m.revoked)
}

/// Every active member of `group` that requests may go to (`me` included), with what the
/// tunnel says of it in `seen`: a member is up when its path is not down; its relay is
/// its announced relay port at the LAN address the tunnel reaches it at, else its first.
pub fn directory_of(group: &Group, me: Key, seen: &[PeerStatus]) -> Directory {
    let mesh = &group.mesh;
    let peers = mesh
        .active()
        // Requests go to members' VPN addresses: never to one outside the network.
        .filter(|m| m.wg_key == me || routable(group, m.address))
        .map(|m| {
            let ann = mesh.announcement(&m.wg_key);
            let is_me = m.wg_key == me;
            let t = seen.iter().find(|p| p.public_key == m.wg_key);
            let relay = ann.and_then(|a| {
                let port = a.relay_port?;
                let at = t
                    .and_then(|t| t.endpoint)
                    .filter(|ep| a.lan.contains(ep))
                    .or_else(|| a.lan.first().copied())?;
                Some(SocketAddr::new(at.ip(), port))
            });
            transfer::Peer {
                key: m.wg_key,
                name: m.name.clone(),
                vpn: m.address,
                relay,
                site: mesh.site_of(&m.wg_key).map(crate::group::mesh::site_name),
                up: is_me || t.is_some_and(|t| t.path != PathKind::Down),
                shares: ann.map(|a| a.shares.clone()).unwrap_or_default(),
            }
        })
        .collect();
    Directory { me, peers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::Config;
    use crate::daemon::book::hosted_group;
    use crate::group::mesh::{self, Announcement, MemberRecord};
    use ed25519_dalek::SigningKey;

    const HOST: Key = [1; 32];
    const KITCHEN: Key = [2; 32];
    const ATTIC: Key = [3; 32];
    const GONE: Key = [4; 32];

    fn signing() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    /// A host with members "kitchen" (announcing a relay and a share) and "attic", and
    /// "gone", who was removed.
    fn group() -> Group {
        let mut config = Config::default();
        config.node.name = "living-room".into();
        let mut group = hosted_group(&config, HOST, &signing());
        for (key, name) in [(KITCHEN, "kitchen"), (ATTIC, "attic"), (GONE, "gone")] {
            let rec = MemberRecord {
                wg_key: key,
                sign_key: SigningKey::from_bytes(&key).verifying_key().to_bytes(),
                name: name.into(),
                address: group.allocate_address().unwrap(),
                admitted_at: 1,
                version: 1,
                revoked: false,
                observed: None,
            };
            group
                .mesh
                .accept_member(&mesh::sign_member(&signing(), &rec))
                .unwrap();
        }
        let gone = group.mesh.member(&GONE).cloned().unwrap();
        let revoked = MemberRecord {
            version: 2,
            revoked: true,
            ..gone
        };
        group
            .mesh
            .accept_member(&mesh::sign_member(&signing(), &revoked))
            .unwrap();
        let ann = Announcement {
            wg_key: KITCHEN,
            seq: 1,
            public_endpoint: None,
            lan: vec![
                "192.168.1.7:51820".parse().unwrap(),
                "192.168.2.7:51820".parse().unwrap(),
            ],
            public: vec![],
            relay_port: Some(7000),
            shares: vec!["movies".into()],
        };
        group
            .mesh
            .accept_announcement(&mesh::sign_announcement(
                &SigningKey::from_bytes(&KITCHEN),
                &ann,
            ))
            .unwrap();
        group
    }

    fn seen(key: Key, path: PathKind, endpoint: Option<&str>) -> PeerStatus {
        PeerStatus {
            name: String::new(),
            public_key: key,
            address: Ipv4Addr::UNSPECIFIED,
            address6: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            path,
            rtt_ms: None,
            last_handshake: None,
            last_handshake_secs_ago: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn address_of(group: &Group, key: &Key) -> Ipv4Addr {
        group.mesh.member(key).unwrap().address
    }

    #[test]
    fn member_at_finds_an_active_member_by_address_but_never_this_node_nor_a_removed_one() {
        let g = group();
        let at = |key: &Key| IpAddr::V4(address_of(&g, key));
        assert_eq!(member_at(&g, &HOST, at(&KITCHEN)), Some(KITCHEN));
        assert_eq!(member_at(&g, &HOST, at(&HOST)), None, "this node");
        assert_eq!(member_at(&g, &HOST, at(&GONE)), None, "removed");
        assert_eq!(member_at(&g, &HOST, "100.77.0.200".parse().unwrap()), None);
        assert_eq!(member_at(&g, &HOST, "::1".parse().unwrap()), None);
    }

    #[test]
    fn is_member_is_true_for_others_in_the_group_only() {
        let g = group();
        assert!(is_member(&g, &HOST, &KITCHEN));
        assert!(
            !is_member(&g, &HOST, &HOST),
            "this node is not its own peer"
        );
        assert!(!is_member(&g, &HOST, &GONE), "removed");
        assert!(!is_member(&g, &HOST, &[9; 32]), "a stranger");
        // Seen from a member, the host is a member like any other.
        assert!(is_member(&g, &KITCHEN, &HOST));
    }

    #[test]
    fn the_directory_lists_active_members_up_only_when_their_path_is_not_down() {
        let g = group();
        let seen = [
            seen(KITCHEN, PathKind::ViaHost, None),
            seen(ATTIC, PathKind::Down, None),
        ];
        let dir = directory_of(&g, HOST, &seen);
        assert_eq!(dir.me, HOST);
        let names: Vec<&str> = dir.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            dir.by_name("gone").is_none(),
            "a removed member is left out"
        );
        assert!(dir.get(&HOST).unwrap().up, "this node is always up");
        assert!(dir.get(&KITCHEN).unwrap().up, "via the host is up");
        assert!(!dir.get(&ATTIC).unwrap().up, "down");
        assert_eq!(
            dir.get(&KITCHEN).unwrap().shares,
            vec!["movies".to_string()]
        );
        assert!(dir.get(&ATTIC).unwrap().shares.is_empty());
    }

    #[test]
    fn a_member_the_tunnel_does_not_know_is_down_in_the_directory() {
        let dir = directory_of(&group(), HOST, &[]);
        assert!(!dir.get(&KITCHEN).unwrap().up);
        assert!(dir.get(&HOST).unwrap().up);
    }

    #[test]
    fn a_relay_is_reached_at_the_lan_address_the_tunnel_uses_else_the_first_announced() {
        let g = group();
        let via_second = [seen(KITCHEN, PathKind::Direct, Some("192.168.2.7:51820"))];
        let dir = directory_of(&g, HOST, &via_second);
        assert_eq!(
            dir.get(&KITCHEN).unwrap().relay,
            Some("192.168.2.7:7000".parse().unwrap())
        );
        let via_public = [seen(KITCHEN, PathKind::Direct, Some("203.0.113.9:4000"))];
        let dir = directory_of(&g, HOST, &via_public);
        assert_eq!(
            dir.get(&KITCHEN).unwrap().relay,
            Some("192.168.1.7:7000".parse().unwrap()),
            "an endpoint that is no announced LAN address is not the relay's"
        );
        assert_eq!(dir.get(&ATTIC).unwrap().relay, None, "no relay announced");
    }

    #[test]
    fn path_kinds_keep_the_json_names_the_api_always_had() {
        for (kind, name) in [
            (PathKind::Direct, "direct"),
            (PathKind::ViaHost, "via-host"),
            (PathKind::Down, "down"),
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
            assert_eq!(kind.as_str(), name);
            let back: PathKind = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, kind);
        }
    }
}
