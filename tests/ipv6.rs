//! IPv6 under the tunnel: a host reached over IPv6 alone is joined and carries traffic;
//! members of two homes whose routers let nothing unsolicited in (a stateful IPv6
//! firewall, a carrier-grade IPv4 NAT) meet directly over IPv6 by knocking from both
//! sides; members behind one router are nearby by their shared IPv6 /64, and such a site
//! downloads a distant member's file once.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(90);
const MIB: u64 = 1024 * 1024;
/// The daemon's default `[tunnel] listen_port`, which every lab node keeps.
const PORT: u16 = 51871;

fn ip6(n: &Node) -> IpAddr {
    IpAddr::V6(
        n.ip6
            .unwrap_or_else(|| panic!("{} has no IPv6 address", n.name)),
    )
}

/// Waits until `from` sees `to` on a path `path` at `to`'s IPv6 address, and returns
/// what it saw last; fails the test with both `peers` views otherwise.
fn wait_for_path(from: &Node, to: &Node, path: &str) -> PeerView {
    let want = SocketAddr::new(ip6(to), PORT);
    let mut last = None;
    let ok = wait_until(DEADLINE, || {
        last = member(&from.peers(), &to.name).cloned();
        last.as_ref()
            .is_some_and(|p| p.path == path && p.endpoint == Some(want))
    });
    assert!(
        ok,
        "{} never saw {} {path} at {want}: {last:#?}\n--- {}'s log ---\n{}",
        from.name,
        to.name,
        to.name,
        to.log()
    );
    last.expect("seen")
}

#[test]
fn a_host_reachable_only_over_ipv6_is_joined_by_its_link_and_carries_ping_and_tcp_over_both_inner_families(
) {
    if !root_or_skip(
        "a_host_reachable_only_over_ipv6_is_joined_by_its_link_and_carries_ping_and_tcp_over_both_inner_families",
    ) {
        return;
    }
    let mut lab = Lab::internet6();
    let mut host = lab.node_ipv6_only("host");
    let mut guest = lab.node("guest");
    host.start();
    guest.start();
    // No IPv4 joins the two: the host has none.
    assert!(
        !guest
            .ns
            .exec(&["ping", "-c", "1", "-W", "1", "203.0.113.1"])
            .status
            .success(),
        "the lab gave the IPv6-only host an IPv4 route"
    );

    let link = host.link(&[]);
    let invite = watchalong::group::link::decode(&link, None, watchalong::daemon::now_secs())
        .expect("the host's link decodes");
    assert_eq!(
        invite.endpoints,
        vec![SocketAddr::new(ip6(&host), PORT)],
        "the link does not carry the host's one address, its IPv6 one"
    );
    guest.ok(&["join", &link]);

    wait_for_path(&guest, &host, "direct");
    // `status --json` shows the endpoint as a plain IPv6 socket address, not v4-mapped.
    let raw = guest.ok(&["status", "--json"]);
    let text = format!("\"[{}]:{PORT}\"", ip6(&host));
    assert!(raw.contains(&text), "status lacks {text}: {raw}");
    // And the host saw the guest at its IPv6 address, not a v4-mapped one.
    wait_for_path(&host, &guest, "direct");

    // Both families inside the tunnel: the IPv4 VPN addresses and the ULA ones.
    let (host_status, guest_status) = (host.status(), guest.status());
    let inner = |s: &watchalong::control::StatusReply| {
        let six = s.node.address6.expect("status shows no inner IPv6 address");
        [vpn_address(s), six.to_string()]
    };
    let (host_vpn, guest_vpn) = (inner(&host_status), inner(&guest_status));
    // Each side names the other's inner IPv6 address as the other names its own.
    let seen = |s: &watchalong::control::StatusReply, name: &str| {
        Node::peer(s, name)
            .and_then(|p| p.address6)
            .map(|a| a.to_string())
    };
    assert_eq!(seen(&guest_status, "host").as_ref(), Some(&host_vpn[1]));
    assert_eq!(seen(&host_status, "guest").as_ref(), Some(&guest_vpn[1]));
    for (h, g) in host_vpn.iter().zip(&guest_vpn) {
        assert!(
            wait_until(DEADLINE, || guest.ping(h) && host.ping(g)),
            "no ping across the VPN between {g} and {h}"
        );
        for (from, to, at) in [(&guest, &host, h), (&host, &guest, g)] {
            let (sent, received) = tcp_transfer(from, to, at, 10 << 20);
            assert_eq!(
                sent, received,
                "10 MiB of TCP from {} to {} at {at} arrived damaged",
                from.name, to.name
            );
        }
    }
}

#[test]
fn members_of_two_homes_behind_ipv6_firewalls_and_carrier_grade_nat_meet_directly_over_ipv6() {
    if !root_or_skip(
        "members_of_two_homes_behind_ipv6_firewalls_and_carrier_grade_nat_meet_directly_over_ipv6",
    ) {
        return;
    }
    let mut lab = Lab::internet6();
    let mut host = lab.node("host");
    let home = RouterOptions {
        ipv6: true,
        cgn: true,
        ..RouterOptions::default()
    };
    let mut r1 = lab.router_with("r1", [192, 168, 1], home);
    let mut r2 = lab.router_with("r2", [192, 168, 2], home);
    let mut a = lab.node_behind(&mut r1, "a");
    let mut b = lab.node_behind(&mut r2, "b");
    // The firewalls are on: nothing from the internet reaches a home's members first.
    for (n, r) in [(&a, &r1), (&b, &r2)] {
        let to = ip6(n).to_string();
        assert!(
            !host
                .ns
                .exec(&["ping", "-c", "1", "-W", "1", &to])
                .status
                .success(),
            "{} lets a stranger's ping through to {}",
            r.ns.name,
            n.name
        );
    }
    for n in [&mut host, &mut a, &mut b] {
        n.start();
    }
    // A host with both families offers both in its links.
    let link = host.link(&[]);
    let invite = watchalong::group::link::decode(&link, None, watchalong::daemon::now_secs())
        .expect("the host's link decodes");
    let both = [
        SocketAddr::new(IpAddr::V4(host.ip), PORT),
        SocketAddr::new(ip6(&host), PORT),
    ];
    assert_eq!(
        invite.endpoints, both,
        "the link lacks one of the host's addresses"
    );
    a.ok(&["join", &link]);
    join(&host, &b);
    // Each knocks at the other's global IPv6 address: each side's knock opens its own
    // firewall for the other's. Over IPv4, the NATs' per-destination ports never meet.
    let ab = wait_for_path(&a, &b, "direct");
    let ba = wait_for_path(&b, &a, "direct");
    assert_ne!(ab.site, ba.site, "two homes in one site: {ab:?} {ba:?}");
    // The direct path carries traffic, both ways.
    let (a_vpn, b_vpn) = (vpn_address(&a.status()), vpn_address(&b.status()));
    assert!(
        a.ping(&b_vpn) && b.ping(&a_vpn),
        "the direct path carries no ping"
    );
    let s = a.status();
    let p = Node::peer(&s, "b").expect("b listed");
    assert_eq!(p.path.as_str(), "direct", "{p:?}");
}

/// The file a distant member offers, and how many chunks it is cut into.
const FILM: u64 = 8 * MIB;

#[test]
fn two_members_behind_one_router_are_nearby_by_their_ipv6_64_and_download_a_distant_file_once() {
    if !root_or_skip(
        "two_members_behind_one_router_are_nearby_by_their_ipv6_64_and_download_a_distant_file_once",
    ) {
        return;
    }
    // Jumbo frames, so the bytes counted on the router's WAN are mostly payload.
    let mut lab = Lab::internet6_jumbo();
    // The host has IPv6 only, so the site's members join, and are seen, over IPv6:
    // their IPv4 NAT's one public address never shows.
    let mut host = lab.node_ipv6_only("host");
    let mut distant = lab.node("distant");
    let mut r1 = lab.router_with(
        "r1",
        [192, 168, 1],
        RouterOptions {
            ipv6: true,
            ..RouterOptions::default()
        },
    );
    let mut s0 = lab.node_behind(&mut r1, "s0");
    let mut s1 = lab.node_behind(&mut r1, "s1");
    let films = distant.share("films");
    let a = write_random(&films.join("a.bin"), FILM, "a");
    for n in [&mut host, &mut distant, &mut s0, &mut s1] {
        n.start();
    }
    for n in [&distant, &s0, &s1] {
        join(&host, n);
    }
    wait_for_direct_mesh(&[&host, &distant, &s0, &s1], DEADLINE);

    // Two addresses, one /64: one site, and a LAN session between them.
    let site = format!("{}/64", lab_ipv6(1, 0));
    for (n, other) in [(&s0, &s1), (&s1, &s0)] {
        let p = n.peers();
        assert_eq!(p.site.as_deref(), Some(site.as_str()), "{}: {p:#?}", n.name);
        let o = member(&p, &other.name).expect("listed");
        assert!(
            o.nearby && o.path == "lan",
            "{} sees {}: {o:?}",
            n.name,
            other.name
        );
        let d = member(&p, "distant").expect("listed");
        assert!(!d.nearby && d.path == "direct", "{}: {d:?}", n.name);
    }
    let plan: watchalong::control::PlanReply =
        serde_json::from_str(&s1.ok(&["plan", "films/a.bin", "--json"])).expect("plan json");
    assert_eq!(plan.route.case, 2, "{plan:?}");

    // Case 2 with two receivers at once: the site's gateway pulls each chunk over the
    // internet once, the other member gets it over the LAN.
    let before = r1.wan_bytes().0;
    let served_before = distant.status().node.chunks.served_chunks;
    let gets: Vec<(String, PathBuf, std::process::Child)> = [&s0, &s1]
        .into_iter()
        .map(|n| {
            let dest = n.dir.join("a.bin");
            let child = std::process::Command::new(BIN)
                .arg("--config")
                .arg(&n.config)
                .args(["get", "films/a.bin", dest.to_str().unwrap(), "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run get");
            (n.name.clone(), dest, child)
        })
        .collect();
    for (name, dest, child) in gets {
        let out = child.wait_with_output().expect("get");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = blake3::hash(&std::fs::read(&dest).unwrap_or_default());
        assert_eq!(got, a, "{name} got a damaged copy");
    }
    let chunks = FILM.div_ceil(watchalong::data::share::CHUNK_SIZE);
    let served = distant.status().node.chunks.served_chunks - served_before;
    assert_eq!(
        served, chunks,
        "the distant member served {served} chunks of a {chunks}-chunk file to one site"
    );
    let crossed = r1.wan_bytes().0 - before;
    assert!(
        (FILM..FILM * 105 / 100).contains(&crossed),
        "two nearby members brought {crossed} bytes into the site for one {FILM}-byte file"
    );
}

#[test]
fn members_of_a_dual_stack_home_joining_a_dual_stack_host_are_all_seen_in_their_64() {
    if !root_or_skip(
        "members_of_a_dual_stack_home_joining_a_dual_stack_host_are_all_seen_in_their_64",
    ) {
        return;
    }
    // Both families work everywhere: were each member seen in whichever family answered
    // first, the home could split into its IPv4 NAT's site and its /64.
    let (_lab, host, _r1, s0, s1) = host_and_a_home_of_two(RouterOptions {
        ipv6: true,
        ..RouterOptions::default()
    });
    let site = format!("{}/64", lab_ipv6(1, 0));
    for (n, other) in [(&s0, &s1), (&s1, &s0)] {
        let mut last = None;
        let ok = wait_until(DEADLINE, || {
            let p = n.peers();
            let o = member(&p, &other.name).cloned();
            let done = p.site.as_deref() == Some(site.as_str())
                && o.as_ref().is_some_and(|o| o.nearby && o.path == "lan");
            last = Some(p);
            done
        });
        assert!(
            ok,
            "{} is not nearby {} in {site}: {last:#?}",
            n.name, other.name
        );
    }
    let h = host.peers();
    for n in [&s0, &s1] {
        let seen = member(&h, &n.name).and_then(|m| m.endpoint);
        assert_eq!(
            seen,
            Some(SocketAddr::new(ip6(n), PORT)),
            "the host sees {} elsewhere: {h:#?}",
            n.name
        );
    }
}

#[test]
fn two_members_of_an_ipv6_only_home_meet_on_their_own_64() {
    if !root_or_skip("two_members_of_an_ipv6_only_home_meet_on_their_own_64") {
        return;
    }
    // With IPv6 only, a home's members announce no LAN address a member may knock at
    // (global addresses are not LAN ones): they must find each other by the global
    // addresses they announce inside their shared /64.
    let (_lab, _host, _r1, s0, s1) = host_and_a_home_of_two(RouterOptions {
        ipv6: true,
        ipv6_only: true,
        ..RouterOptions::default()
    });
    for (n, other) in [(&s0, &s1), (&s1, &s0)] {
        let o = wait_for_path(n, other, "lan");
        assert!(o.nearby, "{} sees {}: {o:?}", n.name, other.name);
    }
}

/// A dual-stack host on the lab's internet and two members behind one router made with
/// `home`, joined and meshed. The router is returned to be kept: its namespace goes
/// with it.
fn host_and_a_home_of_two(home: RouterOptions) -> (Lab, Node, Router, Node, Node) {
    let mut lab = Lab::internet6();
    let mut host = lab.node("host");
    let mut r1 = lab.router_with("r1", [192, 168, 1], home);
    let mut s0 = lab.node_behind(&mut r1, "s0");
    let mut s1 = lab.node_behind(&mut r1, "s1");
    for n in [&mut host, &mut s0, &mut s1] {
        n.start();
    }
    join(&host, &s0);
    join(&host, &s1);
    wait_for_direct_mesh(&[&host, &s0, &s1], DEADLINE);
    (lab, host, r1, s0, s1)
}
