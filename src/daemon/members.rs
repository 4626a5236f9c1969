//! Who is in the group, decided by the host: invites and their links, the host's answer
//! to a join request, this node joining another's group, and the host removing a
//! member. The decisions are pure functions here ([`decide_join`], [`decide_revoke`]) or
//! in [`crate::group::link`] and [`crate::group::mesh`]; the methods sequence them with
//! the invites file, the group file and the tunnel. Errors are [`MembershipError`]s: this
//! module knows nothing of HTTP (their statuses are `daemon::api_errors`'), and it spawns
//! nothing. (Past 800 lines only by its unit tests, which stay beside the decisions they
//! prove.)

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ed25519_dalek::SigningKey;

use crate::base::clock::now_secs;
use crate::base::config::split_host_port;
use crate::base::state::{self, StateError};
use crate::daemon::book::{Book, INVITES_FILE};
use crate::daemon::node::Node;
use crate::group::gossip::{GossipMessage, Outgoing};
use crate::group::identity::{key_to_base64, Key};
use crate::group::link::{
    self, Invite, InviteBook, InviteId, InviteRecord, LinkError, RedeemError,
};
use crate::group::mesh::{self, MemberRecord, Mesh, MeshError, Signed};
use crate::group::place::Group;
use crate::net::join::{self, JoinError};
use crate::net::wire::{self, JoinMessage, NameRefusal, Refusal};

const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const TUNNEL_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an invite may live, so a forgotten link does not stay a way in for ever.
pub const MAX_INVITE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a membership operation failed. Each message is what the user reads: it says what
/// is wrong and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("--uses must be at least 1")]
    CheckUses,
    #[error("--expires must be between 1s and 30 days")]
    CheckLifetime,
    #[error(
        "this node knows no address others could reach it at; set [tunnel] endpoint in the config"
    )]
    FindEndpoint,
    #[error("only the group's host ({host_name}) can create links")]
    CreateLinkAsMember { host_name: String },
    #[error(transparent)]
    SaveInvites(StateError),
    #[error(transparent)]
    SaveGroup(StateError),
    #[error(transparent)]
    DecodeLink(LinkError),
    #[error("this link was made by this node: open it on another machine")]
    JoinOwnLink,
    #[error("this node is already a member of {host_name}'s group")]
    JoinSameGroup { host_name: String },
    #[error(
        "this node was removed from {host_name}'s group, and a removed key is never admitted \
         again: to join as a new member, stop the daemon, move wireguard.key, signing.key, \
         group.json and invites.json out of its state dir (it then starts with a new identity \
         of its own), start it, and open a new link"
    )]
    JoinAfterRemoval { host_name: String },
    #[error("this link is from another group: this node is a member of {host_name}'s group")]
    JoinAsMember { host_name: String },
    #[error("this node hosts a group of {others} member(s) and cannot join another")]
    JoinWhileHosting { others: usize },
    #[error(transparent)]
    Redeem(JoinError),
    /// The host's answer names a network or addresses this node will not install.
    #[error(transparent)]
    CheckAdmission(JoinError),
    #[error("the host's records do not verify: {0}")]
    VerifyRecords(#[source] MeshError),
    #[error("the host's records do not match its answer")]
    MatchRecords,
    #[error("{0}")]
    SetAddress(#[source] std::io::Error),
    #[error("joined, but the tunnel to the host did not come up; `watchalong status` shows its progress")]
    WaitTunnel,
    #[error("only the group's host ({host_name}) can remove members")]
    RemoveAsMember { host_name: String },
    #[error("no member is called {node}; `watchalong peers` lists them")]
    FindMember { node: String },
    #[error("the host cannot remove itself")]
    RemoveHost,
    #[error(transparent)]
    SignRevocation(MeshError),
}

/// What removing a member changes, decided before anything is written.
#[derive(Debug)]
pub struct Revocation {
    /// The member as it stood.
    pub target: MemberRecord,
    /// The host-signed record that says it is out.
    pub signed: Signed,
    /// The group with that record in.
    pub group: Group,
    /// The invites with the one that admitted it closed, and that invite's id; `None`
    /// when it is kept open, or was pruned (closed) long ago.
    pub invites: Option<(InviteBook, InviteId)>,
}

impl Node {
    /// Makes an invite and its link. Only the host admits members.
    pub async fn new_link(&self, uses: u32, lifetime: Duration) -> Result<Invite, MembershipError> {
        check_link_request(uses, lifetime)?;
        let endpoints = self.endpoints().await;
        if endpoints.is_empty() {
            return Err(MembershipError::FindEndpoint);
        }
        let now = now_secs();
        let secret = zeroize::Zeroizing::new(
            x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng).to_bytes(),
        );
        let mut book = self.book();
        if !book.group.is_host(&self.public_key) {
            return Err(MembershipError::CreateLinkAsMember {
                host_name: book.group.host_name.clone(),
            });
        }
        let invite = Invite {
            host_key: self.public_key,
            host_name: self.config.node.name.clone(),
            host_address: book.group.my_address,
            network: book.group.network,
            endpoints,
            invite_id: InviteId::random(),
            expires_at: now + lifetime.as_secs(),
            secret,
        };
        let mut invites = book.invites.clone();
        invites.prune(now);
        invites.add(InviteRecord {
            id: invite.invite_id,
            public_key: invite.secret_public(),
            created_at: now,
            expires_at: invite.expires_at,
            uses_allowed: uses,
            uses: 0,
            revoked: false,
            refused: Default::default(),
        });
        state::write_json(&self.path(INVITES_FILE), &invites)
            .map_err(MembershipError::SaveInvites)?;
        book.invites = invites;
        self.tunnel.set_invite_keys(Self::invite_keys(&book));
        log::info!(
            "created invite {} for {uses} use(s), expiring {}",
            invite.invite_id,
            link::format_utc(invite.expires_at)
        );
        Ok(invite)
    }

    /// What a link offers: the configured endpoint (every address its name resolves to,
    /// both families) and this node's global IPv6 addresses, which need no port
    /// forward; with no endpoint configured, every address of this node's own, IPv4 and
    /// global IPv6, on its listen port.
    async fn endpoints(&self) -> Vec<SocketAddr> {
        let own = self.own_endpoints();
        if let Some(ep) = &self.config.tunnel.endpoint {
            if let Some((host, p)) = split_host_port(ep) {
                match tokio::net::lookup_host((host, p)).await {
                    Ok(addrs) => {
                        let mut v: Vec<SocketAddr> =
                            addrs.map(crate::net::tunnel::kernel::unmapped).collect();
                        for a in own.into_iter().filter(|a| a.is_ipv6()) {
                            if !v.contains(&a) {
                                v.push(a);
                            }
                        }
                        return v;
                    }
                    Err(e) => log::warn!("cannot resolve the configured endpoint {ep}: {e}"),
                }
            }
        }
        own
    }

    /// The host's answer to one join request, decided and persisted under the book lock.
    // The request's fields one by one, as `serve_joins` takes them apart.
    #[allow(clippy::too_many_arguments)]
    pub fn answer_join(
        &self,
        invite_key: &Key,
        name: &str,
        key: Key,
        sign_key: Key,
        proof: Option<&wire::KeyProof>,
        from: SocketAddr,
        rng: &mut impl rand::Rng,
    ) -> (JoinMessage, Vec<Outgoing>) {
        // Before the book is even looked at: a request that does not prove its keys
        // spends nothing and learns nothing.
        let transcript = wire::Transcript {
            host_key: &self.public_key,
            invite_key,
            name,
            wg_key: &key,
            sign_key: &sign_key,
        };
        if let Err(e) = wire::verify_keys(&transcript, proof, &self.wg_secret) {
            log::debug!("join request from {from} refused: {e}");
            let reason = Refusal::KeyProof;
            return (JoinMessage::Refused { reason }, Vec::new());
        }
        let now = now_secs();
        // Who this node is connected to now, read before the book lock like every
        // tunnel read: the new record goes to each of them at once, the member that
        // joined a moment ago among them, not only to those the last gossip round saw.
        let reachable = self.tunnel.reachable();
        let mut book = self.book();
        book.gossip.set_reachable(reachable);
        let refused = |reason| (JoinMessage::Refused { reason }, Vec::new());
        let invite_id = match book.invites.find_by_key(invite_key) {
            Some(r) => r.id,
            None => return refused(Refusal::Invite(RedeemError::Unknown)),
        };
        let key_b64 = key_to_base64(&key);
        let accepted = |group: &Group, rec: &MemberRecord| {
            let (Some(your), Some(host)) = (
                group.mesh.member_signed(&rec.wg_key).cloned(),
                group.mesh.member_signed(&self.public_key).cloned(),
            ) else {
                return JoinMessage::Refused {
                    reason: Refusal::HostFailure,
                };
            };
            JoinMessage::Accepted {
                address: rec.address,
                network: group.network,
                host_name: self.config.node.name.clone(),
                host_address: group.my_address,
                name: rec.name.clone(),
                host_sign_key: self.signing.verifying_key().to_bytes(),
                your_record: your,
                host_record: host,
            }
        };
        // A retry by a joiner this invite already admitted gets the same answer again.
        if book.group.admitted_by.get(&key_b64) == Some(&invite_id) {
            if let Some(rec) = book.group.mesh.member(&key).filter(|r| !r.revoked).cloned() {
                return (accepted(&book.group, &rec), Vec::new());
            }
        }
        let (invites, address) =
            match decide_join(&book.group, &book.invites, invite_key, name, &key, now) {
                Ok(d) => d,
                Err(reason) => {
                    // Debug only: whoever holds the invite can repeat a request at will,
                    // and the joiner is told the reason anyway.
                    log::debug!("join through invite {invite_id} refused: {reason}");
                    if matches!(reason, Refusal::Invite(_))
                        && book.group.admitted_by.get(&key_b64) != Some(&invite_id)
                    {
                        self.note_refused_redemption(&mut book, invite_key, invite_id, &key, now);
                    }
                    return refused(reason);
                }
            };
        let rec = MemberRecord {
            wg_key: key,
            sign_key,
            name: name.to_string(),
            address,
            admitted_at: now,
            version: 1,
            revoked: false,
            observed: None,
        };
        let signed = mesh::sign_member(&self.signing, &rec);
        let mut group = book.group.clone();
        if group.mesh.accept_member(&signed).is_err() {
            return refused(Refusal::HostFailure);
        }
        group.admitted_by.insert(key_b64.clone(), invite_id);
        group.endpoints.insert(key_b64, from);
        // Invites first: a crash between the two writes leaves the invite spent and no
        // member, never a member admitted by an invite that could be spent again.
        if let Err(e) = state::write_json(&self.path(INVITES_FILE), &invites) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        book.invites = invites;
        if let Err(e) = self.save_group(&group) {
            log::error!("{e}");
            return refused(Refusal::HostFailure);
        }
        // The record is in `group` already; spreading it is a push to a few members.
        let mut spread_from = book.group.mesh.clone();
        let (out, _) = book.gossip.publish(
            &mut spread_from,
            GossipMessage::Member { record: signed },
            rng,
        );
        book.group = group;
        log::info!(
            "{} joined as {} through invite {invite_id}",
            rec.name,
            rec.address
        );
        (accepted(&book.group, &rec), out)
    }

    pub(super) async fn do_join(&self, text: &str) -> Result<join::Admission, MembershipError> {
        let _one_at_a_time = self.joining.lock().await;
        let invite = link::decode(text, None, now_secs()).map_err(MembershipError::DecodeLink)?;
        {
            let book = self.book();
            let g = &book.group;
            if invite.host_key == self.public_key {
                return Err(MembershipError::JoinOwnLink);
            }
            let removed = g.mesh.member(&self.public_key).is_some_and(|m| m.revoked);
            if removed && !g.is_host(&self.public_key) {
                return Err(MembershipError::JoinAfterRemoval {
                    host_name: g.host_name.clone(),
                });
            }
            if g.mesh.host_wg == invite.host_key {
                return Err(MembershipError::JoinSameGroup {
                    host_name: g.host_name.clone(),
                });
            }
            if !g.is_host(&self.public_key) {
                return Err(MembershipError::JoinAsMember {
                    host_name: g.host_name.clone(),
                });
            }
            let others = g
                .mesh
                .active()
                .filter(|m| m.wg_key != self.public_key)
                .count();
            if others > 0 {
                return Err(MembershipError::JoinWhileHosting { others });
            }
        }
        let admission = join::redeem(
            &invite,
            &self.wg_secret,
            &self.signing,
            &self.config.node.name,
            JOIN_TIMEOUT,
        )
        .await
        .map_err(MembershipError::Redeem)?;
        // The host decides membership, never this node's routes: nothing is saved and no
        // address is set unless the network is the link's, inside the VPN range.
        join::check_admission(&admission, &invite, self.config.tunnel.network).map_err(|e| {
            log::warn!("join refused: {e}");
            MembershipError::CheckAdmission(JoinError::CheckAnswer(e))
        })?;
        let mut mesh = Mesh::new(invite.host_key, admission.host_sign_key);
        for r in [&admission.host_record, &admission.your_record] {
            mesh.accept_member(r)
                .map_err(MembershipError::VerifyRecords)?;
        }
        let mine_ok = mesh
            .member(&self.public_key)
            .is_some_and(|m| m.address == admission.address);
        let host_ok = mesh
            .member(&invite.host_key)
            .is_some_and(|m| m.address == admission.host_address);
        if !mine_ok || !host_ok {
            return Err(MembershipError::MatchRecords);
        }
        let mut endpoints = BTreeMap::new();
        endpoints.insert(key_to_base64(&invite.host_key), admission.host_endpoint);
        // This node's inner IPv6 address before and after: the /64 is the host's.
        let (old6, new6);
        let group = Group {
            network: admission.network,
            host_name: admission.host_name.clone(),
            my_address: admission.address,
            mesh,
            endpoints,
            admitted_by: BTreeMap::new(),
            static_peers: Vec::new(),
        };
        {
            // Written and installed under one hold of the book lock: a snapshot of the
            // old group taken by another task meanwhile could otherwise be stamped after
            // ours and put the pre-join group back on disk. The join counts only once
            // its group is on disk, so this write is one the lock may wait for.
            let mut book = self.book();
            self.save_group(&group)
                .map_err(MembershipError::SaveGroup)?;
            old6 = book.group.address6(book.group.my_address);
            new6 = group.address6(group.my_address);
            book.group = group;
            book.invites = InviteBook::default();
        }
        self.tunnel
            .device()
            .set_network_address(admission.address, admission.network.prefix_len(), None)
            .map_err(MembershipError::SetAddress)?;
        crate::net::tunnel::kernel::move_inner_ipv6(
            self.tunnel.device(),
            &self.config.tunnel.interface,
            old6,
            new6,
        );
        self.sync_tunnel().await;
        log::info!(
            "joined {}'s group as {} ({})",
            admission.host_name,
            admission.name,
            admission.address
        );
        let deadline = tokio::time::Instant::now() + TUNNEL_UP_TIMEOUT;
        loop {
            let up = self
                .tunnel
                .status()
                .iter()
                .any(|p| p.public_key == invite.host_key && p.last_handshake.is_some());
            if up {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MembershipError::WaitTunnel);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(admission)
    }

    /// Notes a redemption of a spent invite by a key it did not admit (a sign that the
    /// link leaked). Counted in memory on every refusal, written only with the warning
    /// (a minute apart at most), so a flood of retries costs no disk writes.
    fn note_refused_redemption(
        &self,
        book: &mut Book,
        invite_key: &Key,
        invite_id: InviteId,
        key: &Key,
        now: u64,
    ) {
        if let Some(n) = book.invites.note_refused(invite_key, key, now) {
            log::warn!(
                "invite {invite_id} is spent, and another key ({}) tried to redeem it: the link may have leaked ({n} such attempt(s) so far; `watchalong links` shows them)",
                key_to_base64(key)
            );
            if let Err(e) = state::write_json(&self.path(INVITES_FILE), &book.invites) {
                log::error!("{e}");
            }
        }
    }

    /// The host revokes a member: a newer record that says so, sent to everyone. The
    /// invite that admitted it is closed too, unless `keep_invite`.
    pub(super) fn revoke(
        &self,
        node: &str,
        keep_invite: bool,
    ) -> Result<(Key, Vec<Outgoing>), MembershipError> {
        let mut book = self.book();
        let Revocation {
            target,
            signed,
            group,
            invites,
        } = decide_revoke(
            &book.group,
            &book.invites,
            &self.public_key,
            &self.signing,
            node,
            keep_invite,
        )?;
        // Invites first: a crash between the writes leaves the invite closed and the
        // member in, which a second `remove` finishes; never the reverse.
        if let Some((invites, id)) = invites {
            state::write_json(&self.path(INVITES_FILE), &invites)
                .map_err(MembershipError::SaveInvites)?;
            book.invites = invites;
            log::info!("closed invite {id}, which admitted {}", target.name);
        }
        self.save_group(&group)
            .map_err(MembershipError::SaveGroup)?;
        book.group = group;
        let Book { group, gossip, .. } = &mut *book;
        let out = gossip.broadcast(&group.mesh, GossipMessage::Member { record: signed });
        log::info!(
            "removed {} ({}) from the group",
            target.name,
            target.address
        );
        Ok((target.wg_key, out))
    }
}

/// Whether a link may be made for `uses` redemptions over `lifetime`.
fn check_link_request(uses: u32, lifetime: Duration) -> Result<(), MembershipError> {
    if uses == 0 {
        return Err(MembershipError::CheckUses);
    }
    if lifetime.is_zero() || lifetime > MAX_INVITE_LIFETIME {
        return Err(MembershipError::CheckLifetime);
    }
    Ok(())
}

/// The host's decision to remove the active member called `node` (by name, VPN address
/// or key) from `group`, signed with `signing`, before anything is written. Nothing is
/// changed in place: a refusal leaves the group and invites as they were.
pub fn decide_revoke(
    group: &Group,
    invites: &InviteBook,
    me: &Key,
    signing: &SigningKey,
    node: &str,
    keep_invite: bool,
) -> Result<Revocation, MembershipError> {
    if !group.is_host(me) {
        return Err(MembershipError::RemoveAsMember {
            host_name: group.host_name.clone(),
        });
    }
    let target = group
        .mesh
        .active()
        .find(|m| {
            m.name == node || m.address.to_string() == node || key_to_base64(&m.wg_key) == node
        })
        .cloned()
        .ok_or_else(|| MembershipError::FindMember {
            node: node.to_string(),
        })?;
    if target.wg_key == *me {
        return Err(MembershipError::RemoveHost);
    }
    let rec = MemberRecord {
        version: target.version + 1,
        revoked: true,
        ..target.clone()
    };
    let signed = mesh::sign_member(signing, &rec);
    let mut group = group.clone();
    group
        .mesh
        .accept_member(&signed)
        .map_err(MembershipError::SignRevocation)?;
    let admitting = group
        .admitted_by
        .get(&key_to_base64(&target.wg_key))
        .copied();
    let invites = admitting.filter(|_| !keep_invite).and_then(|id| {
        let mut invites = invites.clone();
        // Pruned long ago, the invite is closed already.
        invites.revoke(id).is_ok().then_some((invites, id))
    });
    Ok(Revocation {
        target,
        signed,
        group,
        invites,
    })
}

/// The host's decision on a join request through the invite whose secret has
/// `invite_key`, before anything is persisted: the invites with that one redeemed, and
/// the joiner's address. Everything that can refuse is checked before the redemption,
/// and nothing is changed in place, so a refused request leaves the invite as it was.
pub fn decide_join(
    group: &Group,
    invites: &InviteBook,
    invite_key: &Key,
    name: &str,
    key: &Key,
    now: u64,
) -> Result<(InviteBook, Ipv4Addr), Refusal> {
    if *key == group.mesh.host_wg || group.mesh.member(key).is_some() {
        return Err(Refusal::Invite(RedeemError::AlreadyUsed));
    }
    // A dead invite says so first: a better name would not help.
    invites
        .find_by_key(invite_key)
        .ok_or(RedeemError::Unknown)
        .and_then(|r| r.status(now))
        .map_err(Refusal::Invite)?;
    check_joiner_name(group, name).map_err(Refusal::Name)?;
    let address = group.allocate_address().map_err(|_| Refusal::GroupFull)?;
    let mut invites = invites.clone();
    invites.redeem(invite_key, now).map_err(Refusal::Invite)?;
    Ok((invites, address))
}

/// Whether a joiner may be called `name` in `group`: a well-formed name that no member
/// or hand-added peer has as its name, VPN address or key.
pub fn check_joiner_name(group: &Group, name: &str) -> Result<(), NameRefusal> {
    let members = group.mesh.active().flat_map(|m| {
        [
            m.name.clone(),
            m.address.to_string(),
            key_to_base64(&m.wg_key),
        ]
    });
    let statics = group.static_peers.iter().flat_map(|p| {
        [
            p.name.clone(),
            p.address.to_string(),
            key_to_base64(&p.public_key),
        ]
    });
    wire::check_name(
        name,
        members.chain(statics).chain([group.host_name.clone()]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::Config;
    use crate::daemon::book::{hosted_group, invite_state};

    const NOW: u64 = 1_000;
    const INVITE_KEY: Key = [50; 32];

    /// A host called "living-room" with a member "kitchen", and a one-use invite.
    fn host() -> (Group, InviteBook) {
        let mut config = Config::default();
        config.node.name = "living-room".into();
        let signing = SigningKey::from_bytes(&[1; 32]);
        let mut group = hosted_group(&config, [1; 32], &signing);
        let kitchen = MemberRecord {
            wg_key: [2; 32],
            sign_key: [2; 32],
            name: "kitchen".into(),
            address: group.allocate_address().unwrap(),
            admitted_at: NOW,
            version: 1,
            revoked: false,
            observed: None,
        };
        group
            .mesh
            .accept_member(&mesh::sign_member(&signing, &kitchen))
            .unwrap();
        let mut invites = InviteBook::default();
        invites.add(InviteRecord {
            id: InviteId([9; 8]),
            public_key: INVITE_KEY,
            created_at: NOW,
            expires_at: NOW + 60,
            uses_allowed: 1,
            uses: 0,
            revoked: false,
            refused: Default::default(),
        });
        (group, invites)
    }

    #[test]
    fn a_refused_name_leaves_the_one_use_invite_to_a_good_name() {
        let (group, invites) = host();
        let taken = [
            "kitchen".to_string(),
            "KITCHEN".into(),
            "living-room".into(),
            key_to_base64(&[2; 32]),
        ];
        for name in taken {
            assert_eq!(
                decide_join(&group, &invites, &INVITE_KEY, &name, &[3; 32], NOW),
                Err(Refusal::Name(NameRefusal::Taken)),
                "{name}"
            );
        }
        let malformed = [
            ("x".repeat(2000), NameRefusal::TooLong),
            ("den\u{1b}]0;owned\u{7}".into(), NameRefusal::Unprintable),
            ("100.77.0.2".into(), NameRefusal::Address),
            ("1.1.1.1".into(), NameRefusal::Address),
        ];
        for (name, why) in malformed {
            assert_eq!(
                decide_join(&group, &invites, &INVITE_KEY, &name, &[3; 32], NOW),
                Err(Refusal::Name(why))
            );
        }
        let (spent, address) =
            decide_join(&group, &invites, &INVITE_KEY, "den", &[3; 32], NOW).unwrap();
        assert_eq!(address.to_string(), "100.77.0.3");
        assert_eq!(spent.invites[0].uses, 1);
        assert_eq!(
            decide_join(&group, &spent, &INVITE_KEY, "attic", &[4; 32], NOW),
            Err(Refusal::Invite(RedeemError::AlreadyUsed)),
            "the good name did spend it"
        );
        assert_eq!(
            decide_join(&group, &spent, &INVITE_KEY, "kitchen", &[4; 32], NOW),
            Err(Refusal::Invite(RedeemError::AlreadyUsed)),
            "a spent invite says so before any name is judged"
        );
    }

    fn signing() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    /// `host()` with "kitchen" admitted through the invite.
    fn admitted() -> (Group, InviteBook) {
        let (mut group, invites) = host();
        group
            .admitted_by
            .insert(key_to_base64(&[2; 32]), InviteId([9; 8]));
        (group, invites)
    }

    #[test]
    fn removing_a_member_revokes_its_record_and_closes_the_invite_that_admitted_it() {
        let (group, invites) = admitted();
        let r = decide_revoke(&group, &invites, &[1; 32], &signing(), "kitchen", false).unwrap();
        assert_eq!(r.target.wg_key, [2; 32]);
        let rec = r.group.mesh.member(&[2; 32]).unwrap();
        assert!(rec.revoked);
        assert_eq!(rec.version, 2);
        assert!(
            !group.mesh.member(&[2; 32]).unwrap().revoked,
            "nothing in place"
        );
        let (closed, id) = r.invites.expect("the admitting invite is closed");
        assert_eq!(id, InviteId([9; 8]));
        assert_eq!(invite_state(&closed.invites[0], NOW), "revoked");
        assert_eq!(
            invite_state(&invites.invites[0], NOW),
            "open",
            "nothing in place"
        );
    }

    #[test]
    fn removing_a_member_with_keep_invite_leaves_its_invite_open() {
        let (group, invites) = admitted();
        let r = decide_revoke(&group, &invites, &[1; 32], &signing(), "kitchen", true).unwrap();
        assert!(r.group.mesh.member(&[2; 32]).unwrap().revoked);
        assert!(r.invites.is_none());
    }

    #[test]
    fn a_member_to_remove_is_found_by_name_address_or_key_and_a_stranger_is_not() {
        let (group, invites) = host();
        let address = group.mesh.member(&[2; 32]).unwrap().address.to_string();
        for node in ["kitchen".to_string(), address, key_to_base64(&[2; 32])] {
            let r = decide_revoke(&group, &invites, &[1; 32], &signing(), &node, false);
            assert_eq!(r.unwrap().target.name, "kitchen", "{node}");
        }
        let r = decide_revoke(&group, &invites, &[1; 32], &signing(), "attic", false);
        assert!(
            matches!(&r, Err(MembershipError::FindMember { node }) if node == "attic"),
            "{r:?}"
        );
    }

    #[test]
    fn only_the_host_removes_members_and_never_itself() {
        let (group, invites) = host();
        let r = decide_revoke(&group, &invites, &[2; 32], &signing(), "kitchen", false);
        assert!(
            matches!(&r, Err(MembershipError::RemoveAsMember { host_name }) if host_name == "living-room"),
            "{r:?}"
        );
        let r = decide_revoke(&group, &invites, &[1; 32], &signing(), "living-room", false);
        assert!(matches!(r, Err(MembershipError::RemoveHost)), "{r:?}");
    }

    #[test]
    fn a_removed_member_can_be_removed_no_more() {
        let (group, invites) = host();
        let r = decide_revoke(&group, &invites, &[1; 32], &signing(), "kitchen", false).unwrap();
        let again = decide_revoke(&r.group, &invites, &[1; 32], &signing(), "kitchen", false);
        assert!(
            matches!(again, Err(MembershipError::FindMember { .. })),
            "{again:?}"
        );
    }

    #[test]
    fn an_invite_is_open_then_used_expired_or_revoked() {
        let (_, mut invites) = host();
        assert_eq!(invite_state(&invites.invites[0], NOW), "open");
        assert_eq!(invite_state(&invites.invites[0], NOW + 61), "expired");
        let mut spent = invites.clone();
        spent.redeem(&INVITE_KEY, NOW).unwrap();
        assert_eq!(invite_state(&spent.invites[0], NOW), "used");
        invites.revoke(InviteId([9; 8])).unwrap();
        assert_eq!(invite_state(&invites.invites[0], NOW), "revoked");
    }

    #[test]
    fn a_link_needs_at_least_one_use_and_a_lifetime_of_one_second_to_thirty_days() {
        assert!(matches!(
            check_link_request(0, Duration::from_secs(60)),
            Err(MembershipError::CheckUses)
        ));
        for bad in [Duration::ZERO, MAX_INVITE_LIFETIME + Duration::from_secs(1)] {
            assert!(matches!(
                check_link_request(1, bad),
                Err(MembershipError::CheckLifetime)
            ));
        }
        assert!(check_link_request(1, Duration::from_secs(1)).is_ok());
        assert!(check_link_request(5, MAX_INVITE_LIFETIME).is_ok());
    }

    #[test]
    fn a_key_already_in_the_group_cannot_join_again() {
        let (group, invites) = host();
        for key in [[1; 32], [2; 32]] {
            assert_eq!(
                decide_join(&group, &invites, &INVITE_KEY, "den", &key, NOW),
                Err(Refusal::Invite(RedeemError::AlreadyUsed))
            );
        }
    }

    #[test]
    fn a_joiner_gets_the_next_free_address_and_a_full_network_refuses_it() {
        let mut config = Config::default();
        config.node.name = "living-room".into();
        // Room for two: the host and one member.
        config.tunnel.network = "100.77.0.0/30".parse().unwrap();
        let mut group = hosted_group(&config, [1; 32], &signing());
        let (_, invites) = host();
        let (_, address) =
            decide_join(&group, &invites, &INVITE_KEY, "den", &[3; 32], NOW).unwrap();
        assert_eq!(address.to_string(), "100.77.0.2");
        let kitchen = MemberRecord {
            wg_key: [2; 32],
            sign_key: [2; 32],
            name: "kitchen".into(),
            address,
            admitted_at: NOW,
            version: 1,
            revoked: false,
            observed: None,
        };
        group
            .mesh
            .accept_member(&mesh::sign_member(&signing(), &kitchen))
            .unwrap();
        assert_eq!(
            decide_join(&group, &invites, &INVITE_KEY, "den", &[3; 32], NOW),
            Err(Refusal::GroupFull)
        );
    }
}
