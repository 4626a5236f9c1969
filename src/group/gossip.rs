//! How membership travels: push on change to a few random members, and a periodic
//! push-pull anti-entropy round with one random member, digests compared by key range.
//! Pure: the caller passes the randomness, delivers the returned messages over the tunnel
//! and applies the returned events; nothing here touches a socket or the clock.
//!
//! Convergence: the node that makes a change tells every member it is connected to at
//! once while the group has at most `DIRECT_PUSH_MAX` members (one hop: news in a round
//! trip), else `FANOUT` of them; each member that learns it from another passes it on to
//! `FANOUT` more (an epidemic: about log_FANOUT(N) hops), which repairs what the first
//! push missed. Whatever that misses is found by
//! anti-entropy: every node sends a short hash of its view to one random member per
//! round; a member whose view differs answers with its digest and the two push-pull what
//! the other lacks. So a node missing a record gets it within a few rounds with high
//! probability (each round it is picked by, or picks, a node that has it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::group::identity::Key;
use crate::group::mesh::{Announcement, DigestEntry, MemberRecord, Mesh, MeshError, Signed};

/// Members a change is pushed to by each node that learns it.
pub const FANOUT: usize = 2;
/// Up to this many members, the node that makes a change pushes it to every member it is
/// connected to: a hundred datagrams of a few hundred bytes per change, against news that
/// needs one hop instead of several (issue 19, item 2). Larger groups push to `FANOUT`.
pub const DIRECT_PUSH_MAX: usize = 128;
/// Digest lines per datagram, so a message stays well inside one tunnel packet.
const DIGEST_CHUNK: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GossipMessage {
    Member {
        record: Signed,
    },
    Announce {
        announcement: Signed,
    },
    /// What the sender holds for the keys in `[first, last]`.
    Digest {
        entries: Vec<DigestEntry>,
        #[serde(with = "crate::group::identity::key_b64")]
        first: Key,
        #[serde(with = "crate::group::identity::key_b64")]
        last: Key,
        /// A reply does not ask for a digest back, which ends the exchange.
        reply: bool,
    },
    /// The sender's [`Mesh::view_hash`]; a receiver that disagrees answers with its digest.
    Summary {
        view: String,
    },
    /// From the host: where it sees the receiver's packets come from.
    Observed {
        endpoint: SocketAddr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub to: Key,
    pub msg: GossipMessage,
}

/// What the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Member(MemberRecord),
    Announcement(Announcement),
    Observed(SocketAddr),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub received: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub sent: u64,
    /// Gossip payload bytes handed to the tunnel (without IP, UDP and WireGuard headers).
    pub sent_bytes: u64,
    /// For each member record (by member name), the members this node pushed it to.
    pub member_pushes: BTreeMap<String, BTreeSet<String>>,
}

/// The gossip rules for one node; the [`Mesh`] they act on is passed in, since the
/// caller persists it with the rest of the group.
pub struct Gossip {
    me: Key,
    pub stats: Stats,
    /// Members with a live tunnel, as the caller last said: pushes go to them first.
    reachable: Vec<Key>,
}

impl Gossip {
    pub fn new(me: Key) -> Gossip {
        Gossip {
            me,
            stats: Stats::default(),
            reachable: Vec::new(),
        }
    }

    /// The members this node is connected to now.
    pub fn set_reachable(&mut self, keys: Vec<Key>) {
        self.reachable = keys;
    }

    fn peers_except(&self, mesh: &Mesh, not: &[Key]) -> Vec<Key> {
        mesh.active()
            .map(|m| m.wg_key)
            .filter(|k| *k != self.me && !not.contains(k))
            .collect()
    }

    /// Pushes `msg` to `FANOUT` members (connected ones first), or, with `direct` in a
    /// group of at most `DIRECT_PUSH_MAX`, to every member this node is connected to (and
    /// at least `FANOUT`).
    fn push_to_some(
        &mut self,
        mesh: &Mesh,
        msg: &GossipMessage,
        not: &[Key],
        direct: bool,
        rng: &mut impl Rng,
        out: &mut Vec<Outgoing>,
    ) {
        let mut peers = self.peers_except(mesh, not);
        peers.shuffle(rng);
        // Members it is connected to first (in random order): a push to one that is away
        // waits for anti-entropy.
        peers.sort_by_key(|k| !self.reachable.contains(k));
        let connected = peers
            .iter()
            .take_while(|k| self.reachable.contains(k))
            .count();
        let count = if direct && peers.len() < DIRECT_PUSH_MAX {
            connected.max(FANOUT)
        } else {
            FANOUT
        };
        for to in peers.into_iter().take(count) {
            out.push(Outgoing {
                to,
                msg: msg.clone(),
            });
        }
    }

    fn accept(mesh: &mut Mesh, msg: &GossipMessage) -> Result<Option<Event>, MeshError> {
        match msg {
            GossipMessage::Member { record } => Ok(mesh.accept_member(record)?.map(Event::Member)),
            GossipMessage::Announce { announcement } => Ok(mesh
                .accept_announcement(announcement)?
                .map(Event::Announcement)),
            _ => Ok(None),
        }
    }

    /// A message from member `from` (already authenticated by the tunnel).
    pub fn receive(
        &mut self,
        mesh: &mut Mesh,
        from: Key,
        msg: GossipMessage,
        rng: &mut impl Rng,
    ) -> (Vec<Outgoing>, Vec<Event>) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        self.stats.received += 1;
        // Only members in good standing are heard; a revoked node cannot gossip itself back.
        if mesh.member(&from).is_none_or(|m| m.revoked) {
            self.stats.rejected += 1;
            return (out, events);
        }
        match &msg {
            GossipMessage::Member { .. } | GossipMessage::Announce { .. } => {
                match Self::accept(mesh, &msg) {
                    Ok(Some(ev)) => {
                        self.stats.accepted += 1;
                        events.push(ev);
                        self.push_to_some(mesh, &msg, &[from], false, rng, &mut out);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.stats.rejected += 1;
                        log::debug!("gossip dropped: {e}");
                    }
                }
            }
            GossipMessage::Digest {
                entries,
                first,
                last,
                reply,
            } => {
                let (members, anns, news) = mesh.answer_digest(entries);
                let in_range = |s: &Signed, key_of: fn(&str) -> Option<Key>| {
                    key_of(&s.body).is_some_and(|k| k >= *first && k <= *last)
                };
                for record in members.into_iter().filter(|s| in_range(s, member_key)) {
                    out.push(Outgoing {
                        to: from,
                        msg: GossipMessage::Member { record },
                    });
                }
                for announcement in anns.into_iter().filter(|s| in_range(s, announcement_key)) {
                    out.push(Outgoing {
                        to: from,
                        msg: GossipMessage::Announce { announcement },
                    });
                }
                if news && !reply {
                    out.extend(digest_for(mesh, from, *first, *last, true));
                }
            }
            GossipMessage::Summary { view } => {
                if *view != mesh.view_hash() {
                    out.extend(digest_for(mesh, from, [0; 32], [0xff; 32], false));
                }
            }
            GossipMessage::Observed { endpoint } => {
                if from == mesh.host_wg {
                    events.push(Event::Observed(*endpoint));
                }
            }
        }
        self.count(mesh, &out);
        (out, events)
    }

    /// A change made here (the host's record, or this node's announcement).
    pub fn publish(
        &mut self,
        mesh: &mut Mesh,
        msg: GossipMessage,
        rng: &mut impl Rng,
    ) -> (Vec<Outgoing>, Vec<Event>) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        match Self::accept(mesh, &msg) {
            Ok(Some(ev)) => {
                events.push(ev);
                self.push_to_some(mesh, &msg, &[], true, rng, &mut out);
            }
            Ok(None) => {}
            Err(e) => log::warn!("own gossip refused: {e}"),
        }
        self.count(mesh, &out);
        (out, events)
    }

    /// Sends `msg` to every member (the host's word on a revocation: everyone must hear).
    pub fn broadcast(&mut self, mesh: &Mesh, msg: GossipMessage) -> Vec<Outgoing> {
        let out: Vec<Outgoing> = self
            .peers_except(mesh, &[])
            .into_iter()
            .map(|to| Outgoing {
                to,
                msg: msg.clone(),
            })
            .collect();
        self.count(mesh, &out);
        out
    }

    /// One anti-entropy round with a random member among `reachable`.
    pub fn tick(&mut self, mesh: &Mesh, reachable: &[Key], rng: &mut impl Rng) -> Vec<Outgoing> {
        let candidates: Vec<Key> = self
            .peers_except(mesh, &[])
            .into_iter()
            .filter(|k| reachable.contains(k))
            .collect();
        let Some(to) = candidates.choose(rng).copied() else {
            return Vec::new();
        };
        let out = vec![Outgoing {
            to,
            msg: GossipMessage::Summary {
                view: mesh.view_hash(),
            },
        }];
        self.count(mesh, &out);
        out
    }

    fn count(&mut self, mesh: &Mesh, out: &[Outgoing]) {
        for o in out {
            self.stats.sent += 1;
            if let GossipMessage::Member { record } = &o.msg {
                if let (Some(subject), Some(to)) = (
                    member_key(&record.body)
                        .and_then(|k| mesh.member(&k))
                        .map(|m| m.name.clone()),
                    mesh.member(&o.to).map(|m| m.name.clone()),
                ) {
                    self.stats
                        .member_pushes
                        .entry(subject)
                        .or_default()
                        .insert(to);
                }
            }
        }
    }
}

/// Our digest for the keys in `[first, last]`, in chunks that each fit one datagram.
fn digest_for(mesh: &Mesh, to: Key, first: Key, last: Key, reply: bool) -> Vec<Outgoing> {
    let entries: Vec<DigestEntry> = mesh
        .digest()
        .into_iter()
        .filter(|e| e.key >= first && e.key <= last)
        .collect();
    if entries.is_empty() {
        return vec![Outgoing {
            to,
            msg: GossipMessage::Digest {
                entries,
                first,
                last,
                reply,
            },
        }];
    }
    let chunks: Vec<&[DigestEntry]> = entries.chunks(DIGEST_CHUNK).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            // Each chunk speaks for a contiguous key range, so the ranges tile [first, last].
            let lo = if i == 0 { first } else { c[0].key };
            let hi = if i + 1 == n {
                last
            } else {
                prev_key(entries_start(&entries, i + 1))
            };
            Outgoing {
                to,
                msg: GossipMessage::Digest {
                    entries: c.to_vec(),
                    first: lo,
                    last: hi,
                    reply,
                },
            }
        })
        .collect()
}

fn entries_start(entries: &[DigestEntry], chunk: usize) -> Key {
    entries[chunk * DIGEST_CHUNK].key
}

/// The key just below `k`, so adjacent chunk ranges do not overlap.
fn prev_key(mut k: Key) -> Key {
    for b in k.iter_mut().rev() {
        if *b > 0 {
            *b -= 1;
            return k;
        }
        *b = 0xff;
    }
    k
}

fn member_key(body: &str) -> Option<Key> {
    serde_json::from_str::<MemberRecord>(body)
        .ok()
        .map(|r| r.wg_key)
}

fn announcement_key(body: &str) -> Option<Key> {
    serde_json::from_str::<Announcement>(body)
        .ok()
        .map(|a| a.wg_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::mesh::{sign_announcement, sign_member};
    use ed25519_dalek::SigningKey;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::net::Ipv4Addr;

    struct Node {
        g: Gossip,
        mesh: Mesh,
    }

    fn skey(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn record(n: u8) -> MemberRecord {
        MemberRecord {
            wg_key: [n; 32],
            sign_key: skey(n).verifying_key().to_bytes(),
            name: format!("m{n}"),
            address: Ipv4Addr::new(100, 77, 0, n),
            admitted_at: 0,
            version: 1,
            revoked: false,
            observed: None,
        }
    }

    /// N nodes; node 1 is the host. Each starts knowing the host and itself.
    fn cluster(n: u8) -> (SigningKey, Vec<Node>) {
        let host = skey(1);
        let nodes = (1..=n)
            .map(|i| {
                let mut mesh = Mesh::new([1; 32], host.verifying_key().to_bytes());
                mesh.accept_member(&sign_member(&host, &record(1))).unwrap();
                mesh.accept_member(&sign_member(&host, &record(i))).unwrap();
                Node {
                    g: Gossip::new([i; 32]),
                    mesh,
                }
            })
            .collect();
        (host, nodes)
    }

    /// Delivers messages until none are left, dropping every `drop_every`th.
    fn deliver(
        nodes: &mut [Node],
        mut queue: Vec<(Key, Outgoing)>,
        rng: &mut StdRng,
        drop_every: usize,
    ) {
        let mut i = 0;
        while let Some((from, o)) = queue.pop() {
            i += 1;
            if drop_every > 0 && i % drop_every == 0 {
                continue;
            }
            let to = &mut nodes[o.to[0] as usize - 1];
            let (out, _) = to.g.receive(&mut to.mesh, from, o.msg, rng);
            let me = to.g.me;
            queue.extend(out.into_iter().map(|o| (me, o)));
        }
    }

    fn round(nodes: &mut [Node], rng: &mut StdRng, drop_every: usize, reverse: bool) {
        let all: Vec<Key> = nodes.iter().map(|n| n.g.me).collect();
        let mut q = Vec::new();
        for n in nodes.iter_mut() {
            let me = n.g.me;
            q.extend(n.g.tick(&n.mesh, &all, rng).into_iter().map(|o| (me, o)));
        }
        if reverse {
            q.reverse();
        }
        deliver(nodes, q, rng, drop_every);
    }

    fn converged(nodes: &[Node]) -> bool {
        nodes
            .windows(2)
            .all(|w| w[0].mesh.digest() == w[1].mesh.digest())
    }

    #[test]
    fn a_change_made_here_goes_to_every_connected_member_at_once_and_passed_on_to_a_few() {
        let (host, mut nodes) = cluster(40);
        for n in nodes.iter_mut() {
            for i in 2..=40u8 {
                n.mesh
                    .accept_member(&sign_member(&host, &record(i)))
                    .unwrap();
            }
        }
        // The host is connected to members 2 to 31; 32 to 40 are away.
        let connected: Vec<Key> = (2..=31u8).map(|i| [i; 32]).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let news = sign_member(
            &host,
            &MemberRecord {
                version: 2,
                ..record(40)
            },
        );
        let n0 = &mut nodes[0];
        n0.g.set_reachable(connected.clone());
        let (out, _) = n0.g.publish(
            &mut n0.mesh,
            GossipMessage::Member {
                record: news.clone(),
            },
            &mut rng,
        );
        let mut to: Vec<Key> = out.iter().map(|o| o.to).collect();
        to.sort();
        assert_eq!(
            to, connected,
            "not every connected member, or one that is away"
        );
        // A member that hears it from another passes it on to a few.
        let n1 = &mut nodes[1];
        n1.g.set_reachable(connected);
        let (out, _) = n1.g.receive(
            &mut n1.mesh,
            [1; 32],
            GossipMessage::Member { record: news },
            &mut rng,
        );
        assert_eq!(out.len(), FANOUT);
    }

    #[test]
    fn a_new_member_reaches_everyone_without_the_host_telling_each() {
        let (host, mut nodes) = cluster(16);
        let mut rng = StdRng::seed_from_u64(7);
        for i in 2..=16u8 {
            nodes[0]
                .mesh
                .accept_member(&sign_member(&host, &record(i)))
                .unwrap();
        }
        let mut rounds = 0;
        while !converged(&nodes) && rounds < 40 {
            round(&mut nodes, &mut rng, 0, false);
            rounds += 1;
        }
        assert!(converged(&nodes) && rounds < 20, "took {rounds} rounds");
        let news = sign_member(
            &host,
            &MemberRecord {
                version: 2,
                ..record(16)
            },
        );
        let n0 = &mut nodes[0];
        let (out, _) = n0.g.publish(
            &mut n0.mesh,
            GossipMessage::Member { record: news },
            &mut rng,
        );
        assert_eq!(out.len(), FANOUT, "the host pushes to a few, not to all");
        deliver(
            &mut nodes,
            out.into_iter().map(|o| ([1; 32], o)).collect(),
            &mut rng,
            0,
        );
        let knowing = nodes
            .iter()
            .filter(|n| n.mesh.member(&[16; 32]).map(|m| m.version) == Some(2))
            .count();
        assert!(knowing > FANOUT + 1, "push alone reached {knowing}");
        for _ in 0..20 {
            round(&mut nodes, &mut rng, 0, false);
        }
        assert!(converged(&nodes));
        let host_pushes = nodes[0]
            .g
            .stats
            .member_pushes
            .get("m16")
            .map(|s| s.len())
            .unwrap_or(0);
        assert!(
            host_pushes < 15,
            "the host pushed to {host_pushes} members itself"
        );
    }

    #[test]
    fn a_push_goes_to_members_this_node_is_connected_to_first() {
        let (host, mut nodes) = cluster(6);
        let mut rng = StdRng::seed_from_u64(3);
        for i in 2..=6u8 {
            nodes[0]
                .mesh
                .accept_member(&sign_member(&host, &record(i)))
                .unwrap();
        }
        let n0 = &mut nodes[0];
        n0.g.set_reachable(vec![[4; 32], [6; 32]]);
        for version in 2..12 {
            let news = sign_member(
                &host,
                &MemberRecord {
                    version,
                    ..record(5)
                },
            );
            let (out, _) = n0.g.publish(
                &mut n0.mesh,
                GossipMessage::Member { record: news },
                &mut rng,
            );
            let mut to: Vec<Key> = out.iter().map(|o| o.to).collect();
            to.sort();
            assert_eq!(to, vec![[4; 32], [6; 32]]);
        }
    }

    #[test]
    fn lossy_duplicated_and_reordered_gossip_still_converges() {
        let (host, mut nodes) = cluster(8);
        let mut rng = StdRng::seed_from_u64(11);
        for i in 2..=8u8 {
            nodes[0]
                .mesh
                .accept_member(&sign_member(&host, &record(i)))
                .unwrap();
            let ann = Announcement {
                wg_key: [i; 32],
                seq: 100 + i as u64,
                public_endpoint: None,
                lan: vec![],
                public: vec![],
                relay_port: None,
                shares: vec![],
            };
            let s = sign_announcement(&skey(i), &ann);
            // Sent twice, and before most nodes know the member it describes.
            for _ in 0..2 {
                let n = &mut nodes[i as usize - 1];
                let (out, _) = n.g.publish(
                    &mut n.mesh,
                    GossipMessage::Announce {
                        announcement: s.clone(),
                    },
                    &mut rng,
                );
                deliver(
                    &mut nodes,
                    out.into_iter().map(|o| ([i; 32], o)).collect(),
                    &mut rng,
                    3,
                );
            }
        }
        for _ in 0..60 {
            round(&mut nodes, &mut rng, 4, true);
            if converged(&nodes) {
                break;
            }
        }
        assert!(converged(&nodes));
        assert!(nodes
            .iter()
            .all(|n| n.mesh.announcement(&[5; 32]).is_some()));
    }

    #[test]
    fn gossip_from_a_non_member_or_a_revoked_member_is_ignored() {
        let (host, mut nodes) = cluster(3);
        let mut rng = StdRng::seed_from_u64(1);
        let s = sign_member(&host, &record(3));
        let n = &mut nodes[1];
        let (out, ev) = n.g.receive(
            &mut n.mesh,
            [9; 32],
            GossipMessage::Member { record: s.clone() },
            &mut rng,
        );
        assert!(out.is_empty() && ev.is_empty());
        assert_eq!(n.g.stats.rejected, 1);
        n.mesh.accept_member(&s).unwrap();
        let revoked = sign_member(
            &host,
            &MemberRecord {
                version: 2,
                revoked: true,
                ..record(3)
            },
        );
        n.mesh.accept_member(&revoked).unwrap();
        // News the node lacks (member 4's record, host-signed): from the revoked sender it
        // is refused for the sender alone, and from a member in good standing it is taken.
        let news = GossipMessage::Member {
            record: sign_member(&host, &record(4)),
        };
        let rejected = n.g.stats.rejected;
        let (out, ev) = n.g.receive(&mut n.mesh, [3; 32], news.clone(), &mut rng);
        assert!(out.is_empty() && ev.is_empty());
        assert_eq!(n.g.stats.rejected, rejected + 1);
        assert!(
            n.mesh.member(&[4; 32]).is_none(),
            "a revoked sender was heard"
        );
        let (_, ev) = n.g.receive(&mut n.mesh, [1; 32], news, &mut rng);
        assert_eq!(ev.len(), 1, "the same news from the host was not taken");
        assert!(n.mesh.member(&[4; 32]).is_some());
    }

    #[test]
    fn digest_chunks_tile_the_key_space() {
        let (host, mut nodes) = cluster(1);
        for i in 2..40u8 {
            nodes[0]
                .mesh
                .accept_member(&sign_member(&host, &record(i)))
                .unwrap();
        }
        let out = digest_for(&nodes[0].mesh, [2; 32], [0; 32], [0xff; 32], false);
        assert!(out.len() >= 4);
        let mut expect_first = [0u8; 32];
        for (i, o) in out.iter().enumerate() {
            let GossipMessage::Digest {
                first,
                last,
                entries,
                ..
            } = &o.msg
            else {
                panic!()
            };
            assert_eq!(*first, expect_first, "chunk {i}");
            assert!(entries.iter().all(|e| e.key >= *first && e.key <= *last));
            expect_first = *last;
            if let Some(b) = expect_first.iter_mut().rev().find(|b| **b < 0xff) {
                *b += 1;
            }
        }
        let GossipMessage::Digest { last, .. } = &out.last().unwrap().msg else {
            panic!()
        };
        assert_eq!(*last, [0xff; 32]);
    }
}
