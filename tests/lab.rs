//! The lab itself: what its delay element adds to the internet links, and that it is not
//! what limits a rate; what its carrier-grade NAT and IPv6 firewalls let through. Nothing
//! here runs a daemon; the other tests trust these figures when they run with
//! `WATCHALONG_LAB_RTT_MS`, and these rules when they punch holes.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// Pings from `from` to `to`: their average round trip is within 10% of `want`, and none
/// is lost.
fn assert_round_trip(from: &Node, to: &Node, want: Duration) {
    // The lab internet is one layer-2 segment, so the first packet also waits for an ARP
    // answer across the delay (a real first hop is near); one ping first settles it.
    from.ns
        .exec(&["ping", "-c", "1", "-W", "2", &to.ip.to_string()]);
    let got = ping_stats(from, &to.ip.to_string(), 20);
    let want_ms = want.as_secs_f64() * 1000.0;
    println!(
        "{} → {}: set {want_ms:.1} ms, average {:.2} ms, worst {:.2} ms",
        from.name, to.name, got.avg, got.worst
    );
    assert!(
        got.loss == 0.0,
        "{} lost {:.0}% of its pings to {}",
        from.name,
        got.loss * 100.0,
        to.name
    );
    assert!(
        (got.avg - want_ms).abs() <= want_ms * 0.10,
        "{} → {}: average round trip {:.1} ms (worst {:.1} ms), set to {want_ms:.1} ms",
        from.name,
        to.name,
        got.avg,
        got.worst
    );
}

#[test]
fn a_ping_across_the_lab_internet_takes_the_round_trip_it_was_set_to() {
    if !root_or_skip("a_ping_across_the_lab_internet_takes_the_round_trip_it_was_set_to") {
        return;
    }
    for ms in [50, 100] {
        let mut lab = Lab::internet_with_rtt(ms);
        assert_eq!(lab.rtt(), Duration::from_millis(u64::from(ms)));
        let a = lab.node("a");
        let b = lab.node("b");
        let mut r = lab.router("r", [192, 168, 7]);
        let near = lab.node_behind(&mut r, "near");
        let also_near = lab.node_behind(&mut r, "alsonear");
        assert_round_trip(&a, &b, lab.rtt());
        assert_round_trip(&b, &a, lab.rtt());
        // Behind a router: its WAN link is an internet link like a node's, its LAN is not.
        assert_round_trip(&near, &b, lab.rtt());
        let lan = ping_stats(&near, &also_near.ip.to_string(), 20);
        assert!(
            lan.loss == 0.0 && lan.avg < ms as f64 * 0.10,
            "two nodes behind one router should not be delayed: {:.1} ms, {:.0}% lost",
            lan.avg,
            lan.loss * 100.0
        );
    }
}

/// Mbit/s that one TCP connection from `from` to `to` carries, counted over `span` after
/// `warm` (slow start) has passed.
fn tcp_mbit(from: &Node, to: &Node, warm: Duration, span: Duration) -> f64 {
    let listener = in_netns(&to.ns.name, || {
        TcpListener::bind("0.0.0.0:0").expect("listen")
    });
    let port = listener.local_addr().expect("port").port();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let start = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut counted = 0u64;
        let mut since = None;
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            if start.elapsed() >= warm {
                since.get_or_insert_with(Instant::now);
                counted += n as u64;
            }
        }
        let secs = since.map_or(f64::INFINITY, |t: Instant| t.elapsed().as_secs_f64());
        counted as f64 * 8.0 / secs / 1e6
    });
    let ip = to.ip;
    in_netns(&from.ns.name, move || {
        let mut s = TcpStream::connect((ip, port)).expect("connect");
        let buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        while start.elapsed() < warm + span {
            s.write_all(&buf).expect("write");
        }
    });
    receiver.join().expect("receiver")
}

#[test]
fn the_delay_element_carries_200_mbit_and_htb_shaping_still_holds_beside_it() {
    if !root_or_skip("the_delay_element_carries_200_mbit_and_htb_shaping_still_holds_beside_it") {
        return;
    }
    let mut lab = Lab::internet_with_rtt(50);
    let a = lab.node("a");
    let b = lab.node("b");
    let free = tcp_mbit(&a, &b, Duration::from_secs(2), Duration::from_secs(4));
    assert!(
        free >= 200.0,
        "one TCP connection across a 50 ms lab internet carried {free:.0} Mbit/s; the delay \
         element must pass at least 200"
    );
    println!("unshaped, 50 ms: {free:.0} Mbit/s");
    lab.shape_wan(20);
    let shaped = tcp_mbit(&a, &b, Duration::from_secs(2), Duration::from_secs(4));
    println!("shaped to 20 Mbit/s, 50 ms: {shaped:.1} Mbit/s");
    assert!(
        (15.0..=21.0).contains(&shaped),
        "shaped to 20 Mbit/s beside the delay, one TCP connection carried {shaped:.1} Mbit/s"
    );
}

/// A UDP socket on `port` (0: any) in `ns`'s namespace, of `ip`'s family.
fn udp_in(ns: &Netns, ip: IpAddr, port: u16) -> UdpSocket {
    let any: IpAddr = if ip.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    let s = in_netns(&ns.name, move || {
        UdpSocket::bind((any, port)).expect("bind")
    });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// The sender of the next datagram on `s`, or `None` when none comes within 2 s.
fn sender(s: &UdpSocket) -> Option<SocketAddr> {
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf).ok().map(|(_, from)| from)
}

#[test]
fn a_carrier_grade_nat_and_an_ipv6_home_firewall_let_in_replies_and_nothing_unsolicited() {
    if !root_or_skip(
        "a_carrier_grade_nat_and_an_ipv6_home_firewall_let_in_replies_and_nothing_unsolicited",
    ) {
        return;
    }
    let mut lab = Lab::internet6();
    let p = lab.node("p");
    let q = lab.node("q");
    let mut r = lab.router_with(
        "r",
        [192, 168, 7],
        RouterOptions {
            ipv6: true,
            cgn: true,
            ..RouterOptions::default()
        },
    );
    let home = lab.node_behind(&mut r, "home");
    for (family, p_ip, q_ip, home_ip) in [
        ("IPv4", IpAddr::V4(p.ip), IpAddr::V4(q.ip), None),
        (
            "IPv6",
            IpAddr::V6(p.ip6.unwrap()),
            IpAddr::V6(q.ip6.unwrap()),
            Some(IpAddr::V6(home.ip6.unwrap())),
        ),
    ] {
        let at_p = udp_in(&p.ns, p_ip, 40000);
        let at_q = udp_in(&q.ns, q_ip, 40000);
        let mine = udp_in(&home.ns, p_ip, 0);
        mine.send_to(b"to p", (p_ip, 40000)).unwrap();
        mine.send_to(b"to q", (q_ip, 40000)).unwrap();
        let seen_p = sender(&at_p).expect("p hears the home");
        let seen_q = sender(&at_q).expect("q hears the home");
        match home_ip {
            // The NAT shows one address and a port of its own choosing per destination:
            // where p sees the home is no place q can reach it at.
            None => {
                assert_eq!(seen_p.ip(), IpAddr::V4(r.wan_ip), "{family}");
                assert_ne!(seen_p.port(), seen_q.port(), "{family}: one port for both");
            }
            // No NAT: both see the home's own address and port.
            Some(ip) => {
                assert_eq!(seen_p.ip(), ip, "{family}");
                assert_eq!(seen_p, seen_q, "{family}");
            }
        }
        // A reply comes in; a stranger's datagram to the same place does not.
        at_p.send_to(b"reply", seen_p).unwrap();
        assert!(sender(&mine).is_some(), "{family}: p's reply was dropped");
        let stranger = udp_in(&q.ns, q_ip, 0);
        stranger.send_to(b"unsolicited", seen_p).unwrap();
        assert_eq!(
            sender(&mine),
            None,
            "{family}: a stranger reached the home through where p sees it"
        );
    }
}

#[test]
fn an_ipv6_only_site_and_an_ipv6_only_node_have_no_ipv4_route_to_the_internet() {
    if !root_or_skip("an_ipv6_only_site_and_an_ipv6_only_node_have_no_ipv4_route_to_the_internet") {
        return;
    }
    let mut lab = Lab::internet6();
    let server = lab.node("server");
    let alone = lab.node_ipv6_only("alone");
    let mut r = lab.router_with(
        "r",
        [192, 168, 8],
        RouterOptions {
            ipv6_only: true,
            ..RouterOptions::default()
        },
    );
    let home = lab.node_behind(&mut r, "home");
    let ping = |from: &Node, to: String| {
        from.ns
            .exec(&["ping", "-c", "1", "-W", "1", &to])
            .status
            .success()
    };
    let v6 = |n: &Node| n.ip6.expect("an IPv6 address").to_string();
    for n in [&alone, &home] {
        assert!(
            ping(n, v6(&server)),
            "{} has no IPv6 to the internet",
            n.name
        );
        assert!(
            !ping(n, server.ip.to_string()),
            "{} reaches the internet over IPv4",
            n.name
        );
    }
    assert!(ping(&server, v6(&alone)), "nothing stands before alone");
    // The home's LAN still has IPv4 among its members and its router.
    assert!(
        ping(&home, "192.168.8.1".into()),
        "the home's LAN has no IPv4"
    );
}
