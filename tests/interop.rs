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

#[test]
fn handshake_and_traffic_both_ways_with_wireguard_go() {
    if !root_or_skip("handshake_and_traffic_both_ways_with_wireguard_go") {
        return;
    }
    let mut lab = Lab::new();
    let mut ours = lab.node("ours");
    let theirs = lab.node("wggo");
    ours.start();
    let our_key = ours.status()["node"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();

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

    // Both directions: each side starts a handshake and gets an answer.
    assert!(
        wait_until(DEADLINE, || ours.ping("100.77.0.50")),
        "we cannot reach wireguard-go"
    );
    assert!(
        wait_until(DEADLINE, || theirs.ping("100.77.0.1")),
        "wireguard-go cannot reach us"
    );
    let hs = theirs.ns.exec(&["wg", "show", &iface, "latest-handshakes"]);
    let hs = String::from_utf8_lossy(&hs.stdout);
    let when: u64 = hs
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(when > 0, "wireguard-go saw no handshake: {hs}");
    let s = ours.status();
    let p = Node::peer(&s, "wggo").expect("peer listed");
    assert!(p["last_handshake"].as_u64().is_some(), "{p}");
    assert!(
        p["rx_bytes"].as_u64().unwrap() > 0 && p["tx_bytes"].as_u64().unwrap() > 0,
        "{p}"
    );

    // A packet whose source the peer does not own is dropped, and counted: an address
    // nobody owns, and one that belongs to another peer (added here, never connected).
    let other = watchalong::identity::key_to_base64(
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
    let mut dropped_before = ours.status()["node"]["spoofed_packets"].as_u64().unwrap();
    for claimed in ["100.77.0.98", "100.77.0.99"] {
        add_address(&format!("{claimed}/32"));
        let spoof = theirs
            .ns
            .exec(&["ping", "-c", "2", "-W", "1", "-I", claimed, "100.77.0.1"]);
        assert!(!spoof.status.success(), "{claimed} got an answer");
        let dropped = ours.status()["node"]["spoofed_packets"].as_u64().unwrap();
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

    // Removing the peer at run time cuts it off without a restart, both ways.
    ours.ok(&["peer", "remove", "--public-key", &public]);
    assert!(
        Node::peer(&ours.status(), "wggo").is_none(),
        "still listed after removal"
    );
    assert!(!ours.ping("100.77.0.50"), "a removed peer still answers");
    assert!(
        !theirs.ping("100.77.0.1"),
        "a removed peer still gets answers"
    );
    assert!(
        ours.ping("100.77.0.1"),
        "this node itself stopped answering"
    );

    let _ = wggo.kill();
    let _ = wggo.wait();
}
