//! Our tunnel speaks real WireGuard: a handshake and traffic both ways with wireguard-go
//! configured by `wg` from wireguard-tools.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

fn tool(cmd: &str, args: &[&str], input: Option<&str>) -> String {
    use std::io::Write;
    let mut c = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} is needed (apt-get install wireguard-tools): {e}"));
    let mut stdin = c.stdin.take().unwrap();
    if let Some(i) = input {
        stdin.write_all(i.as_bytes()).unwrap();
    }
    drop(stdin);
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// wireguard-go's latest handshake with its only peer, in Unix seconds (0: none yet).
fn latest_handshake(ns: &Netns, iface: &str) -> u64 {
    let out = ns.exec(&["wg", "show", iface, "latest-handshakes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn handshake_and_traffic_both_ways_with_wireguard_go() {
    if !root_or_skip("handshake_and_traffic_both_ways_with_wireguard_go") {
        return;
    }
    let mut lab = Lab::new();
    let mut ours = lab.node("ours");
    let theirs = lab.node("wggo");
    ours.start();
    let our_key = ours.public_key();

    let private = tool("wg", &["genkey"], None);
    let public = tool("wg", &["pubkey"], Some(&private));
    let key_file = theirs.dir.join("wg.key");
    std::fs::write(&key_file, format!("{private}\n")).unwrap();

    // wireguard-go's control socket, /var/run/wireguard/IFACE.sock, is shared by every
    // namespace: a name of our own keeps parallel runs apart.
    let iface = format!("wgt{}", std::process::id() % 100_000);
    let mut wggo = Command::new("ip")
        .args([
            "netns",
            "exec",
            &theirs.ns.name,
            "wireguard-go",
            "-f",
            &iface,
        ])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go is needed (apt-get install wireguard-go)");
    assert!(
        wait_until(DEADLINE, || theirs.ns.has_link(&iface)),
        "wireguard-go made no wg0"
    );
    let endpoint = format!("{}:51871", ours.ip);
    let out = theirs.ns.exec(&[
        "wg",
        "set",
        &iface,
        "listen-port",
        "51820",
        "private-key",
        key_file.to_str().unwrap(),
        "peer",
        &our_key,
        "endpoint",
        &endpoint,
        "allowed-ips",
        "100.77.0.1/32",
    ]);
    assert!(
        out.status.success(),
        "wg set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let add_address = |cidr: &str| {
        must(
            "ip",
            &["-n", &theirs.ns.name, "addr", "add", cidr, "dev", &iface],
        )
    };
    add_address("100.77.0.50/16");
    must("ip", &["-n", &theirs.ns.name, "link", "set", &iface, "up"]);

    // No endpoint on our side: we cannot start a handshake, so the first one is
    // wireguard-go's, and what is tested is our answer to it.
    ours.ok(&[
        "peer",
        "add",
        "--public-key",
        &public,
        "--address",
        "100.77.0.50",
        "--name",
        "wggo",
    ]);
    assert!(
        wait_until(DEADLINE, || theirs.ping("100.77.0.1")),
        "we did not answer wireguard-go's handshake"
    );
    let first = latest_handshake(&theirs.ns, &iface);
    assert!(first > 0, "wireguard-go saw no handshake");
    let s = ours.status();
    let p = Node::peer(&s, "wggo").expect("peer listed");
    assert!(p.last_handshake.is_some(), "{p:?}");
    assert_eq!(
        p.endpoint.map(|e| e.to_string()),
        Some(format!("{}:51820", theirs.ip)),
        "we did not learn wireguard-go's endpoint from its handshake"
    );

    // Now ours: wireguard-go forgets us and keeps no endpoint (so it cannot start one),
    // we start afresh with its endpoint. Handshake times are in whole seconds: a fresh
    // one can be told from the first only once the clock has moved past it.
    for args in [
        vec!["wg", "set", &iface, "peer", &our_key, "remove"],
        vec![
            "wg",
            "set",
            &iface,
            "peer",
            &our_key,
            "allowed-ips",
            "100.77.0.1/32",
        ],
    ] {
        let out = theirs.ns.exec(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ours.ok(&["peer", "remove", "--public-key", &public]);
    assert!(wait_until(DEADLINE, || unix_now() > first));
    ours.ok(&[
        "peer",
        "add",
        "--public-key",
        &public,
        "--address",
        "100.77.0.50",
        "--endpoint",
        &format!("{}:51820", theirs.ip),
        "--name",
        "wggo",
    ]);
    assert!(
        wait_until(DEADLINE, || ours.ping("100.77.0.50")),
        "wireguard-go did not answer our handshake"
    );
    let second = latest_handshake(&theirs.ns, &iface);
    assert!(
        second > first,
        "no fresh handshake from our side: {first} then {second}"
    );
    let s = ours.status();
    let p = Node::peer(&s, "wggo").expect("peer listed");
    assert!(
        p.last_handshake.is_some_and(|t| t > first),
        "our side saw no fresh handshake: {p:?}"
    );
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "{p:?}");

    // A packet whose source the peer does not own is dropped, and counted: an address
    // nobody owns, and one that belongs to another peer (added here, never connected).
    let other = watchalong::group::identity::key_to_base64(
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32])).as_bytes(),
    );
    ours.ok(&[
        "peer",
        "add",
        "--public-key",
        &other,
        "--address",
        "100.77.0.99",
        "--endpoint",
        "192.0.2.1:51820",
        "--name",
        "other",
    ]);
    let mut dropped_before = ours.status().node.spoofed_packets;
    for claimed in ["100.77.0.98", "100.77.0.99"] {
        add_address(&format!("{claimed}/32"));
        let spoof = theirs
            .ns
            .exec(&["ping", "-c", "2", "-W", "1", "-I", claimed, "100.77.0.1"]);
        assert!(!spoof.status.success(), "{claimed} got an answer");
        let dropped = ours.status().node.spoofed_packets;
        assert!(
            dropped >= dropped_before + 2,
            "packets claiming {claimed} not counted: {dropped_before} -> {dropped}"
        );
        dropped_before = dropped;
    }
    assert!(
        theirs.ping("100.77.0.1"),
        "the genuine address stopped working"
    );

    // Removing the peer at run time cuts it off without a restart, both ways, in the
    // tunnel: our route to its address stays as it was, and a fresh handshake of
    // wireguard-go's gets no answer.
    let route = |ns: &Netns| {
        let o = ns.exec(&["ip", "route", "get", "100.77.0.50"]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let route_before = route(&ours.ns);
    ours.ok(&["peer", "remove", "--public-key", &public]);
    assert!(
        Node::peer(&ours.status(), "wggo").is_none(),
        "still listed after removal"
    );
    assert_eq!(
        route(&ours.ns),
        route_before,
        "the route changed, not the tunnel"
    );
    assert!(!ours.ping("100.77.0.50"), "a removed peer still answers");
    // wireguard-go starts over with our endpoint: each ping may send an initiation (one
    // per 5 s at most); two that reached our port unanswered prove the refusal.
    must(
        "ip",
        &[
            "netns",
            "exec",
            &ours.ns.name,
            "iptables",
            "-I",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            "51871",
            "-m",
            "length",
            "--length",
            "176",
            "-j",
            "ACCEPT",
        ],
    );
    for args in [
        vec!["wg", "set", &iface, "peer", &our_key, "remove"],
        vec![
            "wg",
            "set",
            &iface,
            "peer",
            &our_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            "100.77.0.1/32",
        ],
    ] {
        let out = theirs.ns.exec(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let initiations = || {
        let o = ours.ns.exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("dpt:51871"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut answered = false;
    let refused = wait_until(DEADLINE, || {
        answered |= theirs.ping("100.77.0.1");
        answered || initiations() >= 2
    });
    assert!(!answered, "a removed peer still gets answers");
    assert!(refused, "wireguard-go's handshakes never reached our port");
    assert_eq!(
        latest_handshake(&theirs.ns, &iface),
        0,
        "a removed peer completed a handshake"
    );
    assert!(
        ours.ping("100.77.0.1"),
        "this node itself stopped answering"
    );

    let _ = wggo.kill();
    let _ = wggo.wait();
}
