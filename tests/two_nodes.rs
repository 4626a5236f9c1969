//! Two nodes, one access link: the join, traffic over the tunnel, status, restarts.

mod common;

use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A host and a joiner that joined with the returned link.
fn joined_pair(lab: &mut Lab) -> (Node, Node, String) {
    let mut host = lab.node("host");
    let mut joiner = lab.node("joiner");
    host.start();
    joiner.start();
    let link = host.link(&[]);
    assert!(link.starts_with("watchalong://join/"), "{link}");
    let out = joiner.ok(&["join", &link]);
    assert!(out.contains("joined host's group"), "{out}");
    // `join` exits only once the tunnel is up: the handshake is already there.
    let s = joiner.status();
    let host_peer = Node::peer(&s, "host").unwrap_or_else(|| panic!("no host after join: {s:?}"));
    assert!(
        host_peer.last_handshake_secs_ago.is_some(),
        "join returned before the tunnel was up: {s:?}"
    );
    (host, joiner, link)
}

#[test]
fn two_nodes_join_with_one_link_and_pass_traffic() {
    if !root_or_skip("two_nodes_join_with_one_link_and_pass_traffic") {
        return;
    }
    let mut lab = Lab::new();
    let (host, joiner, used_link) = joined_pair(&mut lab);
    let host_addr = vpn_address(&host.status());
    let joiner_addr = vpn_address(&joiner.status());
    assert_eq!(host_addr, "100.77.0.1");
    assert_eq!(joiner_addr, "100.77.0.2");
    assert!(
        wait_until(DEADLINE, || joiner.ping(&host_addr)),
        "joiner cannot ping the host"
    );
    assert!(
        wait_until(DEADLINE, || host.ping(&joiner_addr)),
        "host cannot ping the joiner"
    );

    let (sent, received) = tcp_transfer(&joiner, &host, &host_addr, 10 * 1024 * 1024);
    assert_eq!(sent, received, "10 MiB over the tunnel arrived damaged");

    for (node, other) in [(&host, "joiner"), (&joiner, "host")] {
        let s = node.status();
        let p = Node::peer(&s, other)
            .unwrap_or_else(|| panic!("{} does not list {other}: {s:?}", node.name));
        let ago = p.last_handshake_secs_ago.expect("a handshake happened");
        assert!(ago < 120, "handshake {ago}s ago is not recent");
        assert!(p.rx_bytes > 0, "no bytes in: {p:?}");
        assert!(p.tx_bytes > 0, "no bytes out: {p:?}");
    }
    // The joiner's private key stayed home: the host only knows its public key.
    let joiner_key = joiner.public_key();
    let host_view = host.status();
    assert_eq!(
        Node::peer(&host_view, "joiner").unwrap().public_key,
        joiner_key
    );

    // No secret reaches a log (at debug level): not the link used for the join nor one
    // still open, not their invite secrets, not a private key.
    let open_link = host.link(&[]);
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (what, link) in [("the link used", &used_link), ("an open link", &open_link)] {
        let invite = watchalong::group::link::decode(link, None, 0).unwrap();
        let secret = watchalong::group::identity::key_to_base64(&invite.secret);
        secrets.push((
            what.to_string(),
            link["watchalong://join/".len()..].to_string(),
        ));
        secrets.push((format!("the invite secret of {what}"), secret));
    }
    for node in [&host, &joiner] {
        let log = node.log();
        assert!(
            log.contains("joined"),
            "{} logged no join: {log}",
            node.name
        );
        let mut node_secrets = secrets.clone();
        for (what, file) in [
            ("the private key", "state/wireguard.key"),
            ("the signing key", "state/signing.key"),
        ] {
            let key = std::fs::read_to_string(node.dir.join(file)).unwrap();
            node_secrets.push((what.to_string(), key.trim().to_string()));
        }
        for (what, secret) in node_secrets {
            assert!(
                secret.len() >= 32,
                "{what} is too short to search for: {secret}"
            );
            assert!(!log.contains(&secret), "{}'s log holds {what}", node.name);
        }
    }
}

#[test]
fn invites_keep_their_state_across_a_host_restart() {
    if !root_or_skip("invites_keep_their_state_across_a_host_restart") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut b = lab.node("b");
    let mut c = lab.node("c");
    for n in [&mut host, &mut b, &mut c] {
        n.start();
    }
    let used = host.link(&[]);
    let unused = host.link(&[]);
    b.ok(&["join", &used]);
    host.kill9();
    host.start();
    let e = c.cli(&["join", &used]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    c.ok(&["join", &unused]);
    assert_eq!(vpn_address(&c.status()), "100.77.0.3");
    assert!(wait_until(DEADLINE, || c.ping("100.77.0.1")));
}

#[test]
fn up_prints_the_link_alone_on_the_first_line_once_ready() {
    if !root_or_skip("up_prints_the_link_alone_on_the_first_line_once_ready") {
        return;
    }
    use std::io::BufRead;
    let mut lab = Lab::new();
    let node = lab.node("up");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns.name, BIN, "--config"])
        .arg(&node.config)
        .arg("up")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(first);
    });
    let first = rx.recv_timeout(DEADLINE).expect("up printed nothing");
    let first = first.trim_end();
    assert!(
        first.starts_with("watchalong://join/") && !first.contains(' '),
        "{first:?}"
    );
    let invite =
        watchalong::group::link::decode(first, None, watchalong::base::clock::now_secs()).unwrap();
    assert!(
        invite
            .endpoints
            .contains(&std::net::SocketAddr::from((node.ip, 51871))),
        "{invite:?}"
    );
    assert!(
        node.ns.has_link("wa0"),
        "the link came before the node was up"
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_joiner_that_moves_to_another_address_is_followed_by_the_host() {
    if !root_or_skip("a_joiner_that_moves_to_another_address_is_followed_by_the_host") {
        return;
    }
    let mut lab = Lab::new();
    let (host, joiner, _) = joined_pair(&mut lab);
    assert!(wait_until(DEADLINE, || joiner.ping("100.77.0.1")));
    let endpoint_at_host = || -> String {
        let s = host.status();
        Node::peer(&s, "joiner")
            .unwrap()
            .endpoint
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(endpoint_at_host().starts_with(&format!("{}:", joiner.ip)));

    // The joiner's address changes under the running daemon (a new DHCP lease).
    let o = joiner.ip.octets();
    let moved = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] + 100);
    // Removed first: removing a primary address takes its secondaries along.
    for (verb, ip) in [("del", joiner.ip), ("add", moved)] {
        let out = joiner
            .ns
            .exec(&["ip", "addr", verb, &format!("{ip}/24"), "dev", "eth0"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Its next authenticated packets move the host's idea of where it is, and the host's
    // own traffic follows.
    assert!(
        wait_until(DEADLINE, || joiner.ping("100.77.0.1")),
        "the joiner lost the host after moving"
    );
    assert!(
        wait_until(DEADLINE, || endpoint_at_host()
            .starts_with(&format!("{moved}:"))),
        "the host still sends to {}",
        endpoint_at_host()
    );
    assert!(
        host.ping("100.77.0.2"),
        "the host cannot reach the moved joiner"
    );
}

#[test]
fn tunnel_comes_back_after_either_side_is_killed_and_sigterm_removes_the_device() {
    if !root_or_skip("tunnel_comes_back_after_either_side_is_killed_and_sigterm_removes_the_device")
    {
        return;
    }
    let mut lab = Lab::new();
    let (mut host, mut joiner, _) = joined_pair(&mut lab);
    assert!(wait_until(DEADLINE, || joiner.ping("100.77.0.1")));

    joiner.kill9();
    joiner.start();
    assert!(
        wait_until(DEADLINE, || joiner.ping("100.77.0.1")),
        "joiner did not reconnect after kill -9"
    );
    assert_eq!(vpn_address(&joiner.status()), "100.77.0.2");

    host.kill9();
    host.start();
    assert!(
        wait_until(DEADLINE, || host.ping("100.77.0.2")),
        "host did not reconnect after kill -9"
    );
    assert!(wait_until(DEADLINE, || joiner.ping("100.77.0.1")));

    assert!(joiner.ns.has_link("wa0"));
    let status = joiner.term();
    assert!(status.success(), "SIGTERM exit status {status:?}");
    assert!(
        !joiner.ns.has_link("wa0"),
        "the TUN device outlived the daemon"
    );
    assert!(
        !joiner.dir.join("control.sock").exists(),
        "the control socket was left behind"
    );
    let status = host.term();
    assert!(status.success());
    assert!(!host.ns.has_link("wa0"));
}
