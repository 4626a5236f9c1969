//! The node's types converted into the control API's, field by field: so a renamed
//! internal field fails to compile here instead of silently changing the CLI's JSON.
//! Pure; it decides nothing and must not grow logic beyond copying.

use crate::control;
use crate::daemon::transfers::{Snapshot, TransferState};
use crate::data::transfer;
use crate::watch::hub;

/// A finished or running `get` as the API shows it.
pub fn transfer_view(t: Snapshot, counters: transfer::Counters) -> control::TransferView {
    let (state, error) = match t.state {
        TransferState::Running => (control::TransferState::Running, None),
        TransferState::Done => (control::TransferState::Done, None),
        TransferState::Failed(e) => (control::TransferState::Failed, Some(e)),
    };
    control::TransferView {
        id: t.id,
        target: t.request.target,
        dest: t.request.dest,
        handoff: t.request.handoff,
        source: t.request.source,
        size: t.size,
        done: t.done,
        corrupt_chunks: t.corrupt_chunks,
        route: t.route,
        state,
        error,
        counters: self::counters(counters),
    }
}

pub fn counters(c: transfer::Counters) -> control::Counters {
    control::Counters {
        corrupt_chunks: c.corrupt_chunks,
        served_chunks: c.served_chunks,
        served_bytes: c.served_bytes,
        fetched_chunks: c.fetched_chunks,
        resumed_chunks: c.resumed_chunks,
        refused_requests: c.refused_requests,
        refused_connections: c.refused_connections,
        accepted_connections: c.accepted_connections,
    }
}

pub fn peer_status(p: crate::net::tunnel::PeerStatus) -> control::PeerStatus {
    control::PeerStatus {
        name: p.name,
        public_key: crate::group::identity::key_to_base64(&p.public_key),
        address: p.address,
        address6: p.address6,
        endpoint: p.endpoint,
        path: p.path.as_str().to_string(),
        rtt_ms: p.rtt_ms,
        last_handshake: p.last_handshake,
        last_handshake_secs_ago: p.last_handshake_secs_ago,
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}

pub fn share_status(s: crate::sync::folder::ShareStatus) -> control::ShareStatus {
    control::ShareStatus {
        name: s.name,
        files: s.files,
        bytes: s.bytes,
        conflicts: s.conflicts,
        pulling: s.pulling,
        bytes_left: s.bytes_left,
        root_ok: s.root_ok,
        last_error: s.last_error,
        held: s.held,
        links_skipped: s.links_skipped,
    }
}

/// Gossip counters as the API shows them (the node's gossip reply is built with it).
pub fn gossip_stats(s: &crate::group::gossip::Stats) -> control::GossipStats {
    control::GossipStats {
        received: s.received,
        accepted: s.accepted,
        rejected: s.rejected,
        sent: s.sent,
        sent_bytes: s.sent_bytes,
        member_pushes: s.member_pushes.clone(),
    }
}

pub fn plan_route(r: crate::data::planner::Route) -> control::PlanRoute {
    use crate::data::planner::Via;
    control::PlanRoute {
        case: r.case,
        hops: r
            .hops
            .into_iter()
            .map(|h| control::PlanHop {
                from: h.from,
                to: h.to,
                via: match h.via {
                    Via::Tunnel => "tunnel",
                    Via::Lan => "lan",
                }
                .to_string(),
            })
            .collect(),
        why: r.why,
    }
}

pub fn kept(k: crate::sync::kept::Kept) -> control::Kept {
    control::Kept {
        path: k.path,
        at: k.at,
        seq: k.seq,
        size: k.size,
    }
}

pub fn playback(p: crate::watch::room::Playback) -> control::Playback {
    control::Playback {
        playing: p.playing,
        position: p.position,
        rate: p.rate,
        at_ms: p.at_ms,
        held: p.held,
        stamp: control::Stamp {
            counter: p.stamp.counter,
            node: p.stamp.node,
        },
    }
}

pub fn room_view(v: hub::RoomView) -> control::RoomView {
    control::RoomView {
        file: v.file,
        state: playback(v.state),
        position_now: v.position_now,
        watchers: v
            .watchers
            .into_iter()
            .map(|w| control::WatcherView {
                node: w.node,
                position: w.position,
                drift_ms: w.drift_ms,
                buffered_s: w.buffered_s,
                starved: w.starved,
                rtt_ms: w.rtt_ms,
                clock_offset_ms: w.clock_offset_ms,
            })
            .collect(),
        have_bytes: v.have_bytes,
        size: v.size,
    }
}

pub fn report(r: control::Report) -> hub::Report {
    hub::Report {
        file: r.file,
        position: r.position,
        buffered_s: r.buffered_s,
        starved: r.starved,
        change: r.change.map(|c| hub::Change {
            playing: c.playing,
            position: c.position,
            rate: c.rate,
        }),
    }
}

/// A new invite as `link` returns it: the plain link (the CLI seals it when asked).
pub fn link_reply(invite: &crate::group::link::Invite, uses: u32) -> control::LinkReply {
    control::LinkReply {
        id: invite.invite_id.to_string(),
        link: invite.encode(),
        expires_at: invite.expires_at,
        uses,
    }
}

/// What `join` tells the CLI of the group it joined.
pub fn join_reply(a: &crate::net::join::Admission) -> control::JoinReply {
    control::JoinReply {
        host_name: a.host_name.clone(),
        address: a.address,
        network: a.network.to_string(),
    }
}

/// The gossip view and counters `debug-gossip` shows.
/// The tunnel's offloads as the API shows them.
pub fn offloads(o: crate::net::tunnel::kernel::OffloadStatus) -> control::Offloads {
    control::Offloads {
        tun_tso: o.tun_tso,
        tun_gro: o.tun_gro,
        udp_gso: o.udp_gso,
        udp_gro: o.udp_gro,
    }
}

pub fn gossip_reply(book: &crate::daemon::book::Book, forwarded: u64) -> control::GossipReply {
    control::GossipReply {
        view: book.group.mesh.view_hash(),
        members: book.group.mesh.active().count(),
        revoked: book.group.mesh.members().filter(|m| m.revoked).count(),
        forwarded_packets: forwarded,
        stats: gossip_stats(&book.gossip.stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The JSON of `internal` and of its conversion, which must be the same bytes: the
    /// CLI's JSON did not change when the API's types were split from the node's.
    fn same_json<A: serde::Serialize, B: serde::Serialize>(internal: &A, api: &B) {
        assert_eq!(
            serde_json::to_string(internal).unwrap(),
            serde_json::to_string(api).unwrap()
        );
    }

    #[test]
    fn status_parts_convert_to_the_same_json_as_the_node_s_own_types() {
        let peer = crate::net::tunnel::PeerStatus {
            name: "kitchen".into(),
            public_key: [7; 32],
            address: "100.77.0.2".parse().unwrap(),
            address6: Some("fd12:3456:789a::100.77.0.2".parse().unwrap()),
            endpoint: Some("192.0.2.7:51820".parse().unwrap()),
            path: crate::net::tunnel::PathKind::ViaHost,
            rtt_ms: Some(12),
            last_handshake: Some(1_000),
            last_handshake_secs_ago: None,
            rx_bytes: 5,
            tx_bytes: 6,
        };
        same_json(&peer, &peer_status(peer.clone()));
        let c = transfer::Counters {
            corrupt_chunks: 1,
            served_chunks: 2,
            served_bytes: 8,
            fetched_chunks: 3,
            resumed_chunks: 4,
            refused_requests: 5,
            refused_connections: 6,
            accepted_connections: 7,
        };
        same_json(&c, &counters(c.clone()));
        let share = crate::sync::folder::ShareStatus {
            name: "docs".into(),
            files: 3,
            bytes: 30,
            conflicts: 1,
            pulling: 2,
            bytes_left: 20,
            root_ok: true,
            last_error: Some("disk full".into()),
            held: None,
            links_skipped: 2,
        };
        same_json(&share, &share_status(share.clone()));
        let mut stats = crate::group::gossip::Stats {
            received: 9,
            sent_bytes: 100,
            ..Default::default()
        };
        stats.member_pushes =
            BTreeMap::from([("kitchen".to_string(), BTreeSet::from(["den".to_string()]))]);
        same_json(&stats, &gossip_stats(&stats));
    }

    #[test]
    fn a_route_a_kept_version_and_a_room_convert_to_the_same_json() {
        use crate::data::planner::{Hop, Route, Via};
        let route = Route {
            case: 2,
            hops: vec![
                Hop {
                    from: "host".into(),
                    to: "gateway".into(),
                    via: Via::Tunnel,
                    from_key: [1; 32],
                    to_key: [2; 32],
                },
                Hop {
                    from: "gateway".into(),
                    to: "den".into(),
                    via: Via::Lan,
                    from_key: [2; 32],
                    to_key: [3; 32],
                },
            ],
            why: "den is nearby the gateway".into(),
        };
        same_json(&route, &plan_route(route.clone()));
        let k = crate::sync::kept::Kept {
            path: "a/b.txt".into(),
            at: 1_700_000_000,
            seq: 1,
            size: 4,
        };
        same_json(&k, &kept(k.clone()));
        let state = crate::watch::room::Playback {
            playing: true,
            position: 12.5,
            rate: 1.0,
            at_ms: 1_700_000_000_000,
            held: true,
            stamp: crate::watch::room::Stamp {
                counter: 7,
                node: "ab12".into(),
            },
        };
        let room = hub::RoomView {
            file: "movies/film.mkv".into(),
            state,
            position_now: 13.0,
            watchers: vec![hub::WatcherView {
                node: "den".into(),
                position: 12.9,
                drift_ms: -40,
                buffered_s: 3.5,
                starved: false,
                rtt_ms: Some(20),
                clock_offset_ms: 3,
            }],
            have_bytes: Some(10),
            size: Some(20),
        };
        same_json(&room, &room_view(room.clone()));
    }

    #[test]
    fn a_failed_transfer_shows_failed_with_its_error_and_a_running_one_no_error() {
        use crate::daemon::transfers::Request;
        let snap = |state| Snapshot {
            id: "ab".into(),
            request: Request {
                target: "s/f".into(),
                dest: "/tmp/f".into(),
                handoff: None,
                owner: 0,
                source: "host".into(),
            },
            size: 10,
            done: 4,
            corrupt_chunks: 0,
            route: "direct".into(),
            state,
        };
        let failed = transfer_view(
            snap(TransferState::Failed("cut".into())),
            Default::default(),
        );
        assert_eq!(failed.state, control::TransferState::Failed);
        assert_eq!(failed.error.as_deref(), Some("cut"));
        let running = transfer_view(snap(TransferState::Running), Default::default());
        assert_eq!(running.state, control::TransferState::Running);
        assert_eq!(running.error, None);
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["state"], "failed", "the wire keeps today's string");
    }
}
