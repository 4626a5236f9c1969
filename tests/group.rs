//! The group across NATs: member lists that spread by themselves, a full mesh with hole
//! punching, sites, the host's relay when no direct path forms, and revocation.
//!
//! The lab: a public host and a distant node on a public segment (203.0.113.0/24), and
//! two home sites, each a router doing MASQUERADE for its own LAN.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
// Raw JSON here is on purpose only: the daemon's state file and the signed gossip
// messages the tests forge and replay. Control API replies are read typed.
use serde_json::Value;
use watchalong::cli::render::LinkOutput;
use watchalong::control::{GossipReply, InviteView, PeerView, PeersReply};

const DEADLINE: Duration = Duration::from_secs(60);

fn peers(n: &Node) -> PeersReply {
    n.peers()
}

fn peer<'a>(p: &'a PeersReply, name: &str) -> Option<&'a PeerView> {
    member(p, name)
}

/// Waits until `n` lists exactly `expected` (name → site) as its peers.
fn wait_for_view(n: &Node, expected: &BTreeMap<String, String>) {
    let mut last = None;
    let ok = wait_until(DEADLINE, || {
        let p = peers(n);
        let seen = p.peers.len() == expected.len()
            && p.peers.iter().all(|x| {
                expected
                    .get(&x.name)
                    .is_some_and(|site| x.site.as_deref() == Some(site.as_str()))
            });
        last = Some(p);
        seen
    });
    assert!(
        ok,
        "{} never saw {expected:?}; last view: {last:#?}\n{}",
        n.name,
        n.log()
    );
}

fn address_of(n: &Node) -> String {
    vpn_address(&n.status())
}

fn ping_all_pairs(nodes: &[&Node]) {
    let addrs: Vec<String> = nodes.iter().map(|n| address_of(n)).collect();
    for a in nodes {
        for (b, addr) in nodes.iter().zip(&addrs) {
            if a.name == b.name {
                continue;
            }
            assert!(
                wait_until(DEADLINE, || a.ping(addr)),
                "{} cannot ping {} ({addr}): {:#?}",
                a.name,
                b.name,
                peers(a)
            );
        }
    }
}

#[test]
fn seven_nodes_across_two_nats_find_each_other_and_every_pair_pings() {
    if !root_or_skip("seven_nodes_across_two_nats_find_each_other_and_every_pair_pings") {
        return;
    }
    let mut lab = Lab::internet();
    let mut host = lab.node("host");
    let mut distant = lab.node("distant");
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut r2 = lab.router("r2", [192, 168, 2]);
    let mut s1a = lab.node_behind(&mut r1, "s1a");
    let mut s1b = lab.node_behind(&mut r1, "s1b");
    let mut s2a = lab.node_behind(&mut r2, "s2a");
    let mut s2b = lab.node_behind(&mut r2, "s2b");
    let mut late = lab.node_behind(&mut r2, "late");
    for n in [
        &mut host,
        &mut distant,
        &mut s1a,
        &mut s1b,
        &mut s2a,
        &mut s2b,
        &mut late,
    ] {
        n.start();
    }
    for n in [&distant, &s1a, &s1b, &s2a, &s2b] {
        join(&host, n);
    }
    let site = |n: &Node| -> String {
        match n.name.as_str() {
            "s1a" | "s1b" => r1.wan_ip.to_string(),
            "s2a" | "s2b" | "late" => r2.wan_ip.to_string(),
            _ => n.ip.to_string(),
        }
    };
    let first: Vec<&Node> = vec![&host, &distant, &s1a, &s1b, &s2a, &s2b];
    let view_of = |me: &Node, group: &[&Node]| -> BTreeMap<String, String> {
        group
            .iter()
            .filter(|o| o.name != me.name)
            .map(|o| (o.name.clone(), site(o)))
            .collect()
    };
    for n in &first {
        wait_for_view(n, &view_of(n, &first));
    }

    // The last member joins; the list reaches everyone without a restart.
    join(&host, &late);
    let all: Vec<&Node> = vec![&host, &distant, &s1a, &s1b, &s2a, &s2b, &late];
    for n in &all {
        wait_for_view(n, &view_of(n, &all));
    }
    // The host, which made the record, told every member it is connected to at once
    // (a group this small is told in one hop: issue 19, item 2).
    let g = gossip(&host);
    let pushed: Vec<String> = g
        .stats
        .member_pushes
        .get("late")
        .map(|a| a.iter().cloned().collect())
        .unwrap_or_default();
    let missed: Vec<&str> = ["distant", "s1a", "s1b", "s2a", "s2b"]
        .into_iter()
        .filter(|n| !pushed.iter().any(|p| p == n))
        .collect();
    assert!(
        missed.is_empty(),
        "the host did not push the new record to {missed:?} (pushed to {pushed:?})"
    );
    // ...and members passed it on (the repair for a push lost): someone other than the
    // host and the newcomer pushed it.
    let relayed_by: Vec<String> = [&distant, &s1a, &s1b, &s2a, &s2b]
        .into_iter()
        .filter(|n| {
            gossip(n)
                .stats
                .member_pushes
                .get("late")
                .is_some_and(|a| !a.is_empty())
        })
        .map(|n| n.name.clone())
        .collect();
    assert!(
        !relayed_by.is_empty(),
        "no member passed the new record on; the host pushed it to {pushed:?}"
    );

    ping_all_pairs(&all);
    // Nearby members talk over their LAN; the two sites reach each other directly.
    for (a, b) in [(&s1a, "s1b"), (&s1b, "s1a"), (&s2a, "late"), (&late, "s2b")] {
        let on_lan = wait_until(DEADLINE, || {
            let p = peers(a);
            peer(&p, b).is_some_and(|x| x.path == "lan" && x.nearby)
        });
        assert!(
            on_lan,
            "{} does not reach {b} over the LAN: {:#?}",
            a.name,
            peers(a)
        );
    }
    let p = peers(&s1a);
    assert!(!peer(&p, "s2a").unwrap().nearby);
    assert!(!peer(&p, "distant").unwrap().nearby);
    // Seen from both sides of each NAT, and from the distant node.
    let across = [
        (&s1a, ["s2a", "s2b", "late", "distant"]),
        (&s1b, ["s2a", "s2b", "late", "distant"]),
        (&s2a, ["s1a", "s1b", "distant", "host"]),
        (&distant, ["s1a", "s1b", "s2a", "s2b"]),
    ];
    for (n, others) in across {
        let direct = wait_until(DEADLINE, || {
            let p = peers(n);
            others
                .iter()
                .all(|o| peer(&p, o).is_some_and(|x| x.path == "direct"))
        });
        assert!(
            direct,
            "{} has no direct path to each of {others:?}: {:#?}",
            n.name,
            peers(n)
        );
    }
    // Every peer shows a recent handshake; the RTT is known where this node initiated.
    let p = peers(&s1a);
    for x in &p.peers {
        let ago = x.last_handshake_secs_ago;
        assert!(ago.is_some_and(|a| a < 180), "no recent handshake: {x:?}");
        if let Some(rtt) = x.rtt_ms {
            assert!(rtt < 1000, "implausible RTT: {x:?}");
        }
    }
    assert!(
        peer(&p, "host").unwrap().rtt_ms.is_some(),
        "no RTT to the host it joined through: {p:#?}"
    );

    // The host stops: members keep talking over their direct paths, also once the host
    // has been silent longer than a path stays alive without traffic.
    drop(all);
    host.term();
    let members: Vec<&Node> = vec![&distant, &s1a, &s1b, &s2a, &s2b, &late];
    for n in &members {
        assert!(
            wait_until(Duration::from_secs(120), || {
                peer(&peers(n), "host").is_some_and(|x| x.path == "down")
            }),
            "{} never noticed the host was gone: {:#?}",
            n.name,
            peers(n)
        );
    }
    ping_all_pairs(&members);
    drop(members);
    // The host comes back and everyone reconnects to it.
    host.start();
    let host_addr = address_of(&host);
    for n in [&distant, &s1a, &s1b, &s2a, &s2b, &late] {
        assert!(
            wait_until(DEADLINE, || n.ping(&host_addr)),
            "{} did not reconnect to the host",
            n.name
        );
    }
}

#[test]
fn behind_a_router_that_drops_unsolicited_udp_traffic_goes_through_the_host() {
    if !root_or_skip("behind_a_router_that_drops_unsolicited_udp_traffic_goes_through_the_host") {
        return;
    }
    let mut lab = Lab::internet();
    let mut host = lab.node("host");
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut r2 = lab.router("r2", [192, 168, 2]);
    r2.drop_unsolicited_udp_except(host.ip);
    let mut a = lab.node_behind(&mut r1, "a");
    let mut b = lab.node_behind(&mut r2, "b");
    for n in [&mut host, &mut a, &mut b] {
        n.start();
    }
    join(&host, &a);
    join(&host, &b);
    let b_addr = address_of(&b);
    let a_addr = address_of(&a);
    assert!(
        wait_until(DEADLINE, || a.ping(&b_addr)),
        "a cannot reach b: {:#?}",
        peers(&a)
    );
    assert!(
        wait_until(DEADLINE, || b.ping(&a_addr)),
        "b cannot reach a: {:#?}",
        peers(&b)
    );
    // Both sides agree there is no direct path (a knock that gets in one way only must
    // not pass for one), and the pings above went through the host.
    for (n, other) in [(&a, "b"), (&b, "a")] {
        let p = peers(n);
        assert_eq!(
            peer(&p, other).unwrap().path,
            "via-host",
            "{}: {p:#?}",
            n.name
        );
    }
    let forwarded = || -> u64 { gossip(&host).forwarded_packets };
    let before = forwarded();
    for _ in 0..5 {
        assert!(a.ping(&b_addr), "a lost b: {:#?}", peers(&a));
    }
    let after = forwarded();
    assert!(
        after >= before + 10,
        "five pings and their replies did not all go through the host: {before} -> {after}"
    );
}

#[test]
fn a_removed_member_is_cut_off_everywhere_and_cannot_gossip_its_way_back() {
    if !root_or_skip("a_removed_member_is_cut_off_everywhere_and_cannot_gossip_its_way_back") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let mut b = lab.node("b");
    let mut gone = lab.node("gone");
    for n in [&mut host, &mut a, &mut b, &mut gone] {
        n.start();
    }
    for n in [&a, &b] {
        join(&host, n);
    }
    // `gone` comes in through a link with a use left, which its removal must close.
    let gone_link: LinkOutput =
        serde_json::from_str(&host.ok(&["link", "--uses", "2", "--json"])).unwrap();
    gone.ok(&["join", &gone_link.link]);
    let gone_addr = address_of(&gone);
    for n in [&host, &a, &b] {
        assert!(wait_until(DEADLINE, || n.ping(&gone_addr)));
    }
    // What `gone` holds before its removal: its own host-signed record and its keys.
    let gone_state: Value =
        serde_json::from_str(&std::fs::read_to_string(gone.dir.join("state/group.json")).unwrap())
            .unwrap();
    let gone_key = gone.public_key();

    host.ok(&["remove", "gone"]);
    let links: Vec<InviteView> = serde_json::from_str(&host.ok(&["links", "--json"])).unwrap();
    let admitting = links
        .iter()
        .find(|l| l.id == gone_link.id)
        .expect("the admitting invite is listed");
    assert_eq!(admitting.state, "revoked", "{links:?}");
    let others_used = links.iter().filter(|l| l.state == "used").count();
    assert_eq!(
        others_used, 2,
        "only the admitting invite is closed: {links:?}"
    );
    for n in [&host, &a, &b] {
        let closed = wait_until(DEADLINE, || {
            peer(&peers(n), "gone").is_none() && Node::peer(&n.status(), "gone").is_none()
        });
        assert!(
            closed,
            "{} still has a tunnel to the removed member",
            n.name
        );
    }
    assert!(!a.ping(&gone_addr), "the removed member still answers");
    assert!(
        !gone.ping(&address_of(&a)),
        "the removed member still reaches a member"
    );

    // Its old record, replayed by a member in good standing, is refused.
    let b_key = b.public_key();
    let old = gone_state["mesh"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["body"].as_str().unwrap().contains(&gone_key))
        .cloned()
        .expect("gone's own record");
    // A record it signed itself, claiming to be back.
    let forged = watchalong_forge(&gone, &gone_key);
    let a_key = a.public_key();
    for n in [&host, &a, &b] {
        // Relayed by a member in good standing (b, or a when b is the target).
        let relay = if n.name == "b" { &a_key } else { &b_key };
        let before = gossip(n).stats.rejected;
        assert!(inject(
            n,
            relay,
            &serde_json::json!({"type": "member", "record": old})
        ));
        assert!(inject(
            n,
            relay,
            &serde_json::json!({"type": "member", "record": forged})
        ));
        // And gossip in its own name.
        assert!(inject(
            n,
            &gone_key,
            &serde_json::json!({"type": "member", "record": old})
        ));
        let after = gossip(n).stats.rejected;
        assert!(
            after >= before + 3,
            "{}: rejected {before} → {after}",
            n.name
        );
    }
    // News each node would take from anyone in good standing (a's record, re-signed by
    // the host one version up) is refused from the removed member for the sender alone:
    // nothing changes in the view.
    let newer_a = host_resigned(&host, &a_key);
    for n in [&host, &a, &b] {
        let before = gossip(n);
        assert!(inject(
            n,
            &gone_key,
            &serde_json::json!({"type": "member", "record": newer_a})
        ));
        let after = gossip(n);
        assert_eq!(
            after.stats.rejected,
            before.stats.rejected + 1,
            "{}: the removed member's news was not refused",
            n.name
        );
        assert_eq!(
            after.view, before.view,
            "{} took news from the removed member",
            n.name
        );
    }
    // The same news from b is taken: the refusal above was the sender's.
    let before = gossip(&host);
    assert!(inject(
        &host,
        &b_key,
        &serde_json::json!({"type": "member", "record": newer_a})
    ));
    let after = gossip(&host);
    assert_eq!(
        after.stats.accepted,
        before.stats.accepted + 1,
        "the news itself was refused: {after:?}"
    );
    assert_ne!(after.view, before.view);

    // Let a few gossip rounds pass (each node hears from others), then look again.
    let heard: Vec<u64> = [&host, &a, &b]
        .iter()
        .map(|n| gossip(n).stats.received)
        .collect();
    for (n, h) in [&host, &a, &b].iter().zip(heard) {
        assert!(wait_until(DEADLINE, || gossip(n).stats.received >= h + 3));
    }
    for n in [&host, &a, &b] {
        assert!(
            peer(&peers(n), "gone").is_none(),
            "{} took the removed member back",
            n.name
        );
    }
}

/// A member record for `node`, signed with its own key instead of the host's.
fn watchalong_forge(node: &Node, key: &str) -> Value {
    use base64::Engine;
    let text = std::fs::read_to_string(node.dir.join("state/signing.key")).unwrap();
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap()
        .try_into()
        .unwrap();
    let sk = ed25519_dalek::SigningKey::from_bytes(&bytes);
    let rec = watchalong::group::mesh::MemberRecord {
        wg_key: watchalong::group::identity::key_from_base64(key).unwrap(),
        sign_key: sk.verifying_key().to_bytes(),
        name: node.name.clone(),
        address: "100.77.0.4".parse().unwrap(),
        admitted_at: 0,
        version: 99,
        revoked: false,
        observed: None,
    };
    serde_json::to_value(watchalong::group::mesh::sign_member(&sk, &rec)).unwrap()
}

/// `key`'s member record as the host holds it, signed again with the host's key one
/// version up: news to every member.
fn host_resigned(host: &Node, key: &str) -> Value {
    use base64::Engine;
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(host.dir.join("state/group.json")).unwrap())
            .unwrap();
    let held = state["mesh"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["body"].as_str().unwrap().contains(key))
        .cloned()
        .expect("the member's record at the host");
    let mut rec: watchalong::group::mesh::MemberRecord =
        serde_json::from_str(held["body"].as_str().unwrap()).unwrap();
    rec.version += 1;
    let text = std::fs::read_to_string(host.dir.join("state/signing.key")).unwrap();
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap()
        .try_into()
        .unwrap();
    let sk = ed25519_dalek::SigningKey::from_bytes(&bytes);
    serde_json::to_value(watchalong::group::mesh::sign_member(&sk, &rec)).unwrap()
}

fn gossip(n: &Node) -> GossipReply {
    serde_json::from_str(&n.ok(&["gossip", "--json"])).unwrap()
}

fn inject(n: &Node, from: &str, message: &Value) -> bool {
    let body = serde_json::json!({"from": from, "message": message});
    n.cli_stdin(&["debug-gossip"], &body.to_string())
        .status
        .success()
}

fn key_of(n: &Node) -> String {
    n.public_key()
}

#[test]
fn forged_reordered_and_duplicated_gossip_and_a_flapping_endpoint_leave_the_group_converged() {
    if !root_or_skip(
        "forged_reordered_and_duplicated_gossip_and_a_flapping_endpoint_leave_the_group_converged",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let mut b = lab.node("b");
    let mut c = lab.node("c");
    for n in [&mut host, &mut a, &mut b, &mut c] {
        n.start();
    }
    for n in [&a, &b, &c] {
        join(&host, n);
    }
    let nodes = [&host, &a, &b, &c];
    let agree = |nodes: &[&Node]| {
        let views: Vec<String> = nodes.iter().map(|n| gossip(n).view).collect();
        views.windows(2).all(|w| w[0] == w[1]) && gossip(nodes[0]).members == 4
    };
    assert!(
        wait_until(DEADLINE, || agree(&nodes)),
        "the group never agreed"
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(host.dir.join("state/group.json")).unwrap())
            .unwrap();
    let records: Vec<Value> = state["mesh"]["members"].as_array().unwrap().clone();
    let old_announcements: Vec<Value> = state["mesh"]["announcements"].as_array().unwrap().clone();
    let b_key = key_of(&b);

    // c's address flaps three times, back and forth, and ends on a new one; each time
    // the others follow it.
    let c_vpn = address_of(&c);
    let a_vpn = address_of(&a);
    for (i, addr) in [
        "10.88.0.201",
        "10.88.0.202",
        &c.ip.to_string(),
        "10.88.0.203",
    ]
    .into_iter()
    .enumerate()
    {
        let old =
            c.ns.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        let old = String::from_utf8_lossy(&old.stdout);
        let old = old.split_whitespace().nth(3).unwrap().to_string();
        must(
            "ip",
            &["-n", &c.ns.name, "addr", "del", &old, "dev", "eth0"],
        );
        must(
            "ip",
            &[
                "-n",
                &c.ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        );
        assert!(
            wait_until(DEADLINE, || c.ping(&a_vpn)),
            "flap {i}: c cannot reach a"
        );
        assert!(
            wait_until(DEADLINE, || a.ping(&c_vpn)),
            "flap {i}: a cannot reach c"
        );
    }

    // Duplicates, records in reverse order, old announcements after new ones, and
    // forgeries, all as if from b, at two members.
    let mut tampered = records[1].clone();
    let body = tampered["body"]
        .as_str()
        .unwrap()
        .replace("\"revoked\":false", "\"revoked\":true");
    tampered["body"] = Value::String(body);
    let garbage = serde_json::json!({"body": "{\"wg_key\": 1}", "sig": "AAAA"});
    let bogus_digest = serde_json::json!({"type": "digest", "entries": [{"key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "version": 999, "seq": 999}],
        "first": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "last": "//////////////////////////////////////////8=", "reply": false});
    for target in [&a, &c] {
        let before = gossip(target).stats.rejected;
        for round in 0..3 {
            let mut order: Vec<&Value> = records.iter().collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for r in order {
                assert!(inject(
                    target,
                    &b_key,
                    &serde_json::json!({"type": "member", "record": r})
                ));
            }
        }
        for ann in old_announcements.iter().rev() {
            assert!(inject(
                target,
                &b_key,
                &serde_json::json!({"type": "announce", "announcement": ann})
            ));
        }
        let rejected = |message: &Value| {
            let before = gossip(target).stats.rejected;
            assert!(inject(target, &b_key, message));
            gossip(target).stats.rejected > before
        };
        assert!(
            rejected(&serde_json::json!({"type": "member", "record": tampered})),
            "{} took a tampered record",
            target.name
        );
        assert!(
            rejected(&serde_json::json!({"type": "announce", "announcement": garbage})),
            "{} took a garbage announcement",
            target.name
        );
        assert!(inject(target, &b_key, &bogus_digest));
        let after = gossip(target).stats.rejected;
        assert!(
            after >= before + 2,
            "{}: forgeries were not rejected: {before} → {after}",
            target.name
        );
    }

    // Nothing crashed, nobody was dropped, and the views agree again.
    for n in nodes {
        assert_eq!(peers(n).peers.len(), 3, "{}", n.name);
    }
    assert!(
        wait_until(DEADLINE, || agree(&nodes)),
        "the group did not converge again"
    );
    for n in [&host, &a, &b] {
        assert!(wait_until(DEADLINE, || n.ping(&c_vpn)), "{} lost c", n.name);
    }
}
