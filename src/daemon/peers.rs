//! The node among its members: the tunnel's peers kept in step with the membership, this
//! node's signed announcement of its endpoints, gossip in and out, and the writes of the
//! group file. The gossip rules are [`crate::group::gossip`]'s and the records'
//! [`crate::group::mesh`]'s; this module sequences them with the tunnel and the disk. It
//! spawns nothing, and does no slow work (interface scans, file writes) under the book
//! lock that every chunk request takes: it snapshots under the lock and writes outside.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::base::clock::now_ms;
use crate::base::lock::Recover;
use crate::base::state::StateError;
use crate::daemon::book::{Book, GroupSnapshot, GROUP_FILE};
use crate::daemon::node::Node;
use crate::group::gossip::{Event, GossipMessage, Outgoing};
use crate::group::identity::{self, key_to_base64, Key};
use crate::group::mesh::{self, Announcement, MemberRecord};
use crate::group::place::Group;
use crate::net::tunnel::{PathKind, PeerConfig};

/// How often the host signs a member's observed endpoint again when only its port moved.
const OBSERVED_PORT_EVERY: Duration = Duration::from_secs(60);

/// Whether the host signs `now_seen` as where it sees a member whose record says `signed`,
/// `since` after it last signed one for it. The host's view, not the member's own
/// announcement, places a member in a site: a new site (another public IPv4, another IPv6
/// /64) is signed at once; any other move (a NAT's port, another address inside the
/// member's own /64, which IPv6 makes free to pick) at most once a minute, so a member
/// hopping ports or addresses cannot make every node re-sign and rewrite its group file
/// every second.
fn sign_observed_now(
    signed: Option<std::net::SocketAddr>,
    now_seen: std::net::SocketAddr,
    since: Option<Duration>,
) -> bool {
    let site = |a: std::net::SocketAddr| crate::group::mesh::site_key(a.ip());
    if signed.map(site) != Some(site(now_seen)) {
        return true;
    }
    signed != Some(now_seen) && since.is_none_or(|t| t >= OBSERVED_PORT_EVERY)
}

impl Node {
    /// Writes `group` now. For the changes that must be on disk before they count (a
    /// join, a removal): the caller holds the book lock, so the write stays in order with
    /// the snapshots taken under it.
    pub(super) fn save_group(&self, group: &Group) -> Result<(), StateError> {
        let snap = self.saver.take(group);
        self.saver.write(&self.path(GROUP_FILE), &snap).map(|_| ())
    }

    /// Writes a snapshot taken under the book lock; call it after the lock is let go.
    /// A failure is logged: the next change writes the group again.
    pub(super) fn write_group(&self, snap: Option<GroupSnapshot>) {
        if let Some(snap) = snap {
            if let Err(e) = self.saver.write(&self.path(GROUP_FILE), &snap) {
                log::warn!("{e}");
            }
        }
    }

    pub fn invite_keys(book: &Book) -> HashSet<Key> {
        book.invites.invites.iter().map(|r| r.public_key).collect()
    }

    fn host_key(&self, book: &Book) -> Option<Key> {
        let h = book.group.mesh.host_wg;
        (h != self.public_key).then_some(h)
    }

    /// Points the tunnel at this node's address and host, and its peers at the members.
    pub async fn sync_tunnel(&self) {
        let _one_at_a_time = self.syncing_tunnel.lock().await;
        let (desired, me, me6, host) = {
            let book = self.book();
            (
                self.desired_peers(&book),
                book.group.my_address,
                book.group.address6(book.group.my_address),
                self.host_key(&book),
            )
        };
        self.tunnel.set_local(me, me6, host);
        let keep: HashSet<Key> = desired.iter().map(|p| p.public_key).collect();
        // A removed member's pair keys and nonce memory go with it.
        self.engine.proofs().retain(|k| keep.contains(k));
        for k in self.tunnel.peer_keys() {
            if !keep.contains(&k) && self.tunnel.remove_peer(&k) {
                log::info!("tunnel to {} closed", key_to_base64(&k));
            }
        }
        for p in desired {
            self.tunnel.upsert_peer(p).await;
        }
    }

    pub(super) fn my_site(&self, book: &Book) -> Option<IpAddr> {
        book.group.mesh.site_of(&self.public_key)
    }

    /// A peer for every active member but this node, knocking at its LAN addresses when
    /// it is behind the same public IP, else at its public endpoint.
    fn desired_peers(&self, book: &Book) -> Vec<PeerConfig> {
        let g = &book.group;
        let my_site = self.my_site(book);
        let mut v: Vec<PeerConfig> = g
            .mesh
            .active()
            .filter(|m| m.wg_key != self.public_key)
            // Even a host-signed record never routes an address outside the group's
            // network, nor this node's own, to a peer.
            .filter(|m| routable(g, m.address))
            .map(|m| {
                let ann = g.mesh.announcement(&m.wg_key);
                let nearby = my_site.is_some() && g.mesh.site_of(&m.wg_key) == my_site;
                // Where the host saw it before where it says it is, then the global
                // addresses it has (IPv6 ones, which no NAT hides: knocking at them from
                // both sides opens stateful firewalls as it opens NATs), in both families.
                let candidates = match ann {
                    Some(a) if nearby => a.lan.clone(),
                    _ => {
                        let mut c: Vec<SocketAddr> = m
                            .observed
                            .or_else(|| {
                                ann.and_then(|a| a.public_endpoint)
                                    .filter(mesh::public_allowed)
                            })
                            .into_iter()
                            .collect();
                        for p in ann.map(|a| a.public.as_slice()).unwrap_or_default() {
                            if !c.contains(p) {
                                c.push(*p);
                            }
                        }
                        // IPv6 first: a knock goes to each in this order, and the copy
                        // that arrives first makes the session. Where both families
                        // work, every member of a dual-stack home is then seen in its
                        // /64 rather than some there and some behind the IPv4 NAT,
                        // which would split the home into two sites.
                        c.sort_by_key(|a| a.is_ipv4());
                        c
                    }
                };
                PeerConfig {
                    public_key: m.wg_key,
                    name: m.name.clone(),
                    address: m.address,
                    address6: g.address6(m.address),
                    endpoint: g.endpoints.get(&key_to_base64(&m.wg_key)).copied(),
                    candidates,
                }
            })
            .collect();
        v.extend(g.static_peers.iter().map(|p| PeerConfig {
            public_key: p.public_key,
            name: p.name.clone(),
            address: p.address,
            address6: g.address6(p.address),
            endpoint: p.endpoint,
            candidates: p.endpoint.into_iter().collect(),
        }));
        v
    }

    /// This node's own addresses (not the VPN's, nor any on the tunnel's interface) on
    /// its listen port: IPv4 ones, and global IPv6 ones. The interface scan runs outside
    /// the book lock, which is taken only to read the group's network.
    pub(super) fn own_endpoints(&self) -> Vec<SocketAddr> {
        let network = self.book().group.network;
        let tun = &self.config.tunnel.interface;
        let ips = if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| !i.is_loopback() && &i.name != tun)
            .map(|i| i.ip());
        lan_endpoints(ips, network, self.config.tunnel.listen_port)
    }

    /// Signs and spreads a new announcement of this node's endpoints when they changed.
    /// `observed` is where the host sees this node (on the host: its own endpoint).
    pub fn refresh_announcement(
        &self,
        observed: Option<SocketAddr>,
        rng: &mut impl rand::Rng,
    ) -> Vec<Outgoing> {
        let own = self.own_endpoints();
        let (out, snap) = {
            let mut book = self.book();
            match self.announce(&mut book, own, observed, rng) {
                Some(out) => (out, Some(self.saver.take(&book.group))),
                None => (Vec::new(), None),
            }
        };
        self.write_group(snap);
        out
    }

    /// The announcement part of [`Node::refresh_announcement`], under the book lock, with
    /// this node's addresses `own` read before it: what to send, or `None` when nothing
    /// changed (and the group needs no write).
    fn announce(
        &self,
        book: &mut Book,
        own: Vec<SocketAddr>,
        observed: Option<SocketAddr>,
        rng: &mut impl rand::Rng,
    ) -> Option<Vec<Outgoing>> {
        let held = book.group.mesh.announcement(&self.public_key).cloned();
        let public_endpoint = observed
            .or_else(|| held.as_ref().and_then(|a| a.public_endpoint))
            .or_else(|| {
                (book.group.is_host(&self.public_key))
                    .then(|| self.configured_endpoint().or_else(|| own.first().copied()))
                    .flatten()
            });
        // Members take only private LAN addresses, a few of them (mesh::lan_allowed), and
        // a few global ones (mesh::public_allowed): IPv6 first, which no NAT hides.
        let lan: Vec<SocketAddr> = own
            .iter()
            .copied()
            .filter(mesh::lan_allowed)
            .take(mesh::MAX_LAN)
            .collect();
        let mut public: Vec<SocketAddr> = own.into_iter().filter(mesh::public_allowed).collect();
        public.sort_by_key(|a| a.is_ipv4());
        public.truncate(mesh::MAX_PUBLIC);
        let shares = self.engine.shares.names();
        let relay_port = Some(self.engine.relay_port());
        if let Some(h) = &held {
            if h.lan == lan
                && h.public == public
                && h.public_endpoint == public_endpoint
                && h.shares == shares
                && h.relay_port == relay_port
            {
                return None;
            }
        }
        let ann = Announcement {
            wg_key: self.public_key,
            seq: u64::try_from(now_ms())
                .unwrap_or(0)
                .max(held.map(|h| h.seq + 1).unwrap_or(0)),
            public_endpoint,
            lan,
            public,
            relay_port,
            shares,
        };
        let signed = mesh::sign_announcement(&self.signing, &ann);
        let Book { group, gossip, .. } = book;
        let (out, _) = gossip.publish(
            &mut group.mesh,
            GossipMessage::Announce {
                announcement: signed,
            },
            rng,
        );
        Some(out)
    }

    fn configured_endpoint(&self) -> Option<SocketAddr> {
        self.config
            .tunnel
            .endpoint
            .as_ref()
            .and_then(|e| e.parse().ok())
    }

    /// The payload of a gossip datagram from member `from`, when its daemon sealed it;
    /// anything else (a datagram another user on that member sent from its address) is
    /// counted and dropped.
    pub fn open_gossip<'a>(&self, from: &Key, datagram: &'a [u8]) -> Option<&'a [u8]> {
        static LOG: crate::base::logging::Throttle =
            crate::base::logging::Throttle::new(Duration::from_secs(10));
        match self.engine.proofs().open_gossip(from, datagram) {
            Ok(p) => Some(p),
            Err(e) => {
                self.refused_gossip
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(held) = LOG.allow() {
                    log::info!(
                        "refused a gossip datagram from {}'s address: {e} ({held} more refused before)",
                        key_to_base64(from)
                    );
                }
                None
            }
        }
    }

    /// Applies a gossip message from member `from`; returns what to send.
    pub fn on_gossip(
        &self,
        from: Key,
        msg: GossipMessage,
        rng: &mut impl rand::Rng,
    ) -> (Vec<Outgoing>, bool) {
        // Only the host's word on where it sees us leads to a new announcement (the
        // gossip core drops anyone else's): only then are the interfaces scanned, and
        // before the lock is taken.
        let own = (matches!(msg, GossipMessage::Observed { .. })
            && self.book().group.mesh.host_wg == from)
            .then(|| self.own_endpoints());
        // Whom a record learned here is passed on to: members connected now, read before
        // the book lock, not as the last gossip round saw them.
        let reachable = matches!(
            msg,
            GossipMessage::Member { .. } | GossipMessage::Announce { .. }
        )
        .then(|| self.tunnel.reachable());
        let (out, membership_changed, snap) = {
            let mut book = self.book();
            let Book { group, gossip, .. } = &mut *book;
            if let Some(reachable) = reachable {
                gossip.set_reachable(reachable);
            }
            let (mut out, events) = gossip.receive(&mut group.mesh, from, msg, rng);
            let mut membership_changed = false;
            let mut announced = false;
            for ev in &events {
                match ev {
                    Event::Member(rec) => {
                        membership_changed = true;
                        if rec.wg_key == self.public_key && rec.revoked {
                            log::warn!("this node was removed from the group by its host");
                        } else if rec.revoked {
                            log::info!("{} was removed from the group", rec.name);
                        } else {
                            log::info!("{} ({}) is a member", rec.name, rec.address);
                        }
                    }
                    Event::Announcement(_) => membership_changed = true,
                    Event::Observed(ep) => {
                        let own = own.clone().unwrap_or_default();
                        if let Some(pushes) = self.announce(&mut book, own, Some(*ep), rng) {
                            announced = true;
                            out.extend(pushes);
                        }
                    }
                }
            }
            let snap = (membership_changed || announced).then(|| self.saver.take(&book.group));
            (out, membership_changed, snap)
        };
        self.write_group(snap);
        (out, membership_changed)
    }

    /// One anti-entropy round, and on the host, telling members where it sees them.
    pub fn gossip_round(&self, rng: &mut impl rand::Rng) -> Vec<Outgoing> {
        let reachable = self.tunnel.reachable();
        let seen = self.tunnel.status();
        let mut book = self.book();
        let Book { group, gossip, .. } = &mut *book;
        gossip.set_reachable(reachable.clone());
        let mut out = gossip.tick(&group.mesh, &reachable, rng);
        let mut snap = None;
        if group.is_host(&self.public_key) {
            let mut observed_changed = false;
            for p in seen.iter().filter(|p| p.path == PathKind::Direct) {
                let (key, Some(ep)) = (p.public_key, p.endpoint) else {
                    continue;
                };
                let Some(rec) = group.mesh.member(&key).filter(|r| !r.revoked).cloned() else {
                    continue;
                };
                let now = std::time::Instant::now();
                let mut last = self.observed_signed.locked();
                let due = sign_observed_now(
                    rec.observed,
                    ep,
                    last.get(&key).map(|t| now.duration_since(*t)),
                );
                if due && key != self.public_key {
                    last.insert(key, now);
                    drop(last);
                    let rec = MemberRecord {
                        version: rec.version.saturating_add(1),
                        observed: Some(ep),
                        ..rec
                    };
                    let record = mesh::sign_member(&self.signing, &rec);
                    let (pushes, _) =
                        gossip.publish(&mut group.mesh, GossipMessage::Member { record }, rng);
                    out.extend(pushes);
                    observed_changed = true;
                } else {
                    drop(last);
                }
                let announced = group
                    .mesh
                    .announcement(&key)
                    .and_then(|a| a.public_endpoint);
                if announced != Some(ep) {
                    out.push(Outgoing {
                        to: key,
                        msg: GossipMessage::Observed { endpoint: ep },
                    });
                }
            }
            if observed_changed {
                snap = Some(self.saver.take(group));
            }
        }
        drop(book);
        self.write_group(snap);
        out
    }

    /// Keeps the persisted endpoints in step with the tunnel's roaming.
    pub fn save_endpoints(&self) {
        let seen = self.tunnel.status();
        let snap = {
            let mut book = self.book();
            let mut changed = false;
            for p in seen {
                if let Some(ep) = p.endpoint {
                    // The group file keys endpoints by the key's base64 form.
                    let key = identity::key_to_base64(&p.public_key);
                    if book.group.endpoints.get(&key) != Some(&ep) {
                        book.group.endpoints.insert(key, ep);
                        changed = true;
                    }
                }
            }
            changed.then(|| self.saver.take(&book.group))
        };
        self.write_group(snap);
    }

    pub async fn send(&self, out: Vec<Outgoing>) {
        let mut total = 0u64;
        for o in out {
            match serde_json::to_vec(&o.msg) {
                Ok(bytes) => {
                    total += bytes.len() as u64;
                    match self.engine.proofs().seal_gossip(&o.to, &bytes) {
                        Ok(sealed) => self.tunnel.send_gossip(&o.to, &sealed).await,
                        Err(e) => log::debug!("gossip to {}: {e}", key_to_base64(&o.to)),
                    }
                }
                Err(e) => log::warn!("cannot encode gossip: {e}"),
            }
        }
        if total > 0 {
            self.book().gossip.stats.sent_bytes += total;
        }
    }
}

/// Whether traffic for `address` may be sent to the member the host gave it: only inside
/// the group's network, and never this node's own address.
pub(super) fn routable(group: &Group, address: Ipv4Addr) -> bool {
    group.network.contains(&address) && address != group.my_address
}

/// The addresses among `ips` that others could reach this node at, on `port`, sorted
/// (IPv4 first) and without repeats: IPv4 ones outside the VPN network and not
/// link-local, and global IPv6 ones. Link-local IPv6 needs an interface to be reached
/// at and unique-local IPv6 may be a VPN's own (the tunnel's inner addresses), so
/// neither is offered.
fn lan_endpoints(
    ips: impl Iterator<Item = IpAddr>,
    network: ipnet::Ipv4Net,
    port: u16,
) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = ips
        .filter_map(|ip| match ip {
            IpAddr::V4(a) if !network.contains(&a) && !a.is_link_local() => {
                Some(SocketAddr::new(IpAddr::V4(a), port))
            }
            IpAddr::V6(_) => Some(SocketAddr::new(ip, port)).filter(mesh::public_allowed),
            _ => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::book::group_named;

    #[test]
    fn a_member_hopping_inside_its_64_or_across_ports_is_signed_at_most_once_a_minute() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let soon = Some(Duration::from_secs(1));
        let later = Some(OBSERVED_PORT_EVERY);
        // Another address of the same /64, another port: not before a minute.
        let (a, b) = (
            at("[2001:db8:1:2::10]:51871"),
            at("[2001:db8:1:2::99]:40000"),
        );
        assert!(!sign_observed_now(Some(a), b, soon));
        assert!(sign_observed_now(Some(a), b, later));
        assert!(!sign_observed_now(
            Some(at("203.0.113.7:1000")),
            at("203.0.113.7:2000"),
            soon
        ));
        // Nothing moved: nothing to sign, however long ago.
        assert!(!sign_observed_now(Some(a), a, later));
        // Another site (another /64, another public IPv4, another family): at once.
        assert!(sign_observed_now(
            Some(a),
            at("[2001:db8:1:3::10]:51871"),
            soon
        ));
        assert!(sign_observed_now(
            Some(at("203.0.113.7:1000")),
            at("198.51.100.1:1000"),
            soon
        ));
        assert!(sign_observed_now(Some(a), at("203.0.113.7:1000"), soon));
        assert!(sign_observed_now(None, a, None));
    }

    #[test]
    fn no_address_outside_the_group_network_nor_our_own_is_routed_to_a_member() {
        let group = group_named("living-room");
        assert!(routable(&group, "100.77.0.2".parse().unwrap()));
        assert!(!routable(&group, "1.1.1.1".parse().unwrap()));
        assert!(!routable(&group, "100.78.0.2".parse().unwrap()));
        assert!(!routable(&group, group.my_address));
    }

    #[test]
    fn own_endpoints_leave_out_the_vpn_network_link_local_and_local_ipv6_and_repeat_none() {
        let ips: Vec<IpAddr> = [
            "2001:db8:1::20",
            "192.168.1.20",
            "100.77.0.1",
            "169.254.3.3",
            "fd00::1",
            "fe80::1",
            "10.0.0.5",
            "192.168.1.20",
            "2001:db8:1::20",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let network = "100.77.0.0/24".parse().unwrap();
        let got = lan_endpoints(ips.into_iter(), network, 51820);
        let want: Vec<SocketAddr> = [
            "10.0.0.5:51820",
            "192.168.1.20:51820",
            "[2001:db8:1::20]:51820",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(got, want);
    }
}
