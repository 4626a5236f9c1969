//! The lab itself: what its delay element adds to the internet links, and that it is not
//! what limits a rate. Nothing here runs a daemon; the other tests trust these figures
//! when they run with `WATCHALONG_LAB_RTT_MS`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
