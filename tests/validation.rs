//! What a peer says is checked before it is used: a fake host's join answer that would
//! move the joiner's routes is refused; a fake joiner's bad names are refused without
//! spending the invite; a member serving absurd manifests has every pull refused; a
//! member claiming another site's public IP stays in its own site. The fakes speak the
//! real protocols (a boringtun session keyed like `src/join.rs`, HTTP on the node port
//! reached through the tunnel), from namespaces on the lab LAN.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use ed25519_dalek::SigningKey;
use x25519_dalek::{PublicKey, StaticSecret};

use common::*;
use watchalong::group::link::{Invite, InviteId};
use watchalong::group::mesh::{sign_member, MemberRecord};
use watchalong::net::wire::{self, JoinMessage};

/// How long one side waits for the other's packets.
const PATIENCE: Duration = Duration::from_secs(10);

fn now() -> u64 {
    watchalong::base::clock::now_secs()
}

fn one_line_error(o: &std::process::Output, what: &str) -> String {
    assert!(!o.status.success(), "{what}: the command succeeded");
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{what}: not one line: {err:?}");
    err
}

/// The kernel's routes and addresses in a namespace: what a join must not change when
/// it is refused.
fn routes(ns: &Netns) -> String {
    let r = ns.exec(&["ip", "route", "show", "table", "all"]);
    let a = ns.exec(&["ip", "-4", "addr", "show"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&a.stdout)
    )
}

/// A fake host: answers every join request in an invite session with `network`, the
/// joiner at `address`, both records properly signed. Runs until `stop`; returns how many
/// requests it answered.
struct FakeHost {
    endpoint: SocketAddr,
    key: [u8; 32],
    secret: [u8; 32],
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHost {
    fn start(
        ns: &Netns,
        ip: Ipv4Addr,
        network: &str,
        address: &str,
        host_address: &str,
    ) -> FakeHost {
        let host_secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let key = PublicKey::from(&host_secret).to_bytes();
        let invite_secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let invite_public = PublicKey::from(&invite_secret);
        let sock = in_netns(&ns.name, move || UdpSocket::bind((ip, 0)).expect("bind"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let endpoint = sock.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (network, address, host_address): (ipnet::Ipv4Net, Ipv4Addr, Ipv4Addr) = (
            network.parse().expect("network"),
            address.parse().expect("address"),
            host_address.parse().expect("host address"),
        );
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let signing = SigningKey::from_bytes(&[42; 32]);
                let mut sessions: HashMap<SocketAddr, Tunn> = HashMap::new();
                let mut rx = vec![0u8; 2048];
                let mut tx = vec![0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = sock.recv_from(&mut rx) else {
                        continue;
                    };
                    let tunn = sessions.entry(from).or_insert_with(|| {
                        Tunn::new(
                            host_secret.clone(),
                            invite_public,
                            None,
                            None,
                            sessions_index(),
                            None,
                        )
                    });
                    let request = match tunn.decapsulate(Some(from.ip()), &rx[..n], &mut tx) {
                        TunnResult::WriteToNetwork(p) => {
                            let _ = sock.send_to(p, from);
                            while let TunnResult::WriteToNetwork(p) =
                                tunn.decapsulate(None, &[], &mut tx)
                            {
                                let _ = sock.send_to(p, from);
                            }
                            continue;
                        }
                        TunnResult::WriteToTunnelV4(p, _) => wire::decode(p),
                        _ => continue,
                    };
                    let Ok(JoinMessage::Request {
                        name,
                        public_key,
                        sign_key,
                        ..
                    }) = request
                    else {
                        continue;
                    };
                    let record = |wg_key, name: &str, address| MemberRecord {
                        wg_key,
                        sign_key,
                        name: name.to_string(),
                        address,
                        admitted_at: now(),
                        version: 1,
                        revoked: false,
                        observed: None,
                    };
                    let answer = JoinMessage::Accepted {
                        address,
                        network,
                        host_name: "fakehost".into(),
                        host_address,
                        name: name.clone(),
                        host_sign_key: signing.verifying_key().to_bytes(),
                        your_record: sign_member(&signing, &record(public_key, &name, address)),
                        host_record: sign_member(&signing, &record(key, "fakehost", host_address)),
                    };
                    let packet =
                        wire::encode(host_address, wire::JOINER_ADDRESS, &answer).expect("encode");
                    if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&packet, &mut tx) {
                        let _ = sock.send_to(p, from);
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        FakeHost {
            endpoint,
            key,
            secret: invite_secret.to_bytes(),
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// A link to this fake host that names `network` and `host_address`.
    fn link(&self, network: &str, host_address: &str) -> String {
        Invite {
            host_key: self.key,
            host_name: "fakehost".into(),
            host_address: host_address.parse().expect("host address"),
            network: network.parse().expect("network"),
            endpoints: vec![self.endpoint],
            invite_id: InviteId::random(),
            expires_at: now() + 3600,
            secret: zeroize::Zeroizing::new(self.secret),
        }
        .encode()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sessions_index() -> u32 {
    use rand::RngCore;
    rand::rngs::OsRng.next_u32() >> 8
}

#[test]
fn a_host_answering_with_a_network_outside_the_link_is_refused_and_no_route_moves() {
    if !root_or_skip(
        "a_host_answering_with_a_network_outside_the_link_is_refused_and_no_route_moves",
    ) {
        return;
    }
    let mut lab = Lab::new();
    // A namespace on the LAN for the fake host; no daemon runs there.
    let machine = lab.node("fakehost");
    let mut joiner = lab.node("joiner");
    joiner.start();
    let fake = FakeHost::start(
        &machine.ns,
        machine.ip,
        "1.0.0.0/8",
        "1.1.1.1",
        "100.77.0.1",
    );
    let before = routes(&joiner.ns);

    // The link names the usual network; the answer puts the joiner in 1.0.0.0/8.
    let link = fake.link("100.77.0.0/16", "100.77.0.1");
    let e = one_line_error(&joiner.cli(&["join", &link]), "answer outside the link");
    assert!(
        e.contains("1.0.0.0/8") && e.contains("100.77.0.0/16") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(
        fake.answered.load(Ordering::SeqCst),
        1,
        "the fake host was never asked"
    );
    assert_eq!(
        routes(&joiner.ns),
        before,
        "a refused join changed the routes"
    );
    assert_eq!(
        joiner.status().node.role,
        "host",
        "the joiner joined something"
    );
    drop(fake);

    // A link that itself names a network outside the VPN range is no better.
    let fake = FakeHost::start(&machine.ns, machine.ip, "1.0.0.0/8", "1.1.1.1", "1.0.0.1");
    let link = fake.link("1.0.0.0/8", "1.0.0.1");
    let e = one_line_error(
        &joiner.cli(&["join", &link]),
        "network outside the VPN range",
    );
    assert!(e.contains("outside 100.64.0.0/10"), "{e}");
    assert_eq!(routes(&joiner.ns), before);
    assert_eq!(joiner.status().node.role, "host");
}

/// A joiner that sends `name` through `link`'s invite session and returns the host's
/// answer. Runs in namespace `ns`.
fn fake_join(ns: &Netns, link: &str, name: String) -> JoinMessage {
    let invite = watchalong::group::link::decode(link, None, now()).expect("link");
    in_netns(&ns.name, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let host = invite.endpoints[0];
        let mut tunn = Tunn::new(
            StaticSecret::from(*invite.secret),
            PublicKey::from(invite.host_key),
            None,
            None,
            sessions_index(),
            None,
        );
        // An honest joiner's keys and proof: the host judges the name, not the keys.
        let wg = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let signing = SigningKey::from_bytes(&[7; 32]);
        let (public_key, sign_key) = (
            PublicKey::from(&wg).to_bytes(),
            signing.verifying_key().to_bytes(),
        );
        let transcript = wire::Transcript {
            host_key: &invite.host_key,
            invite_key: &invite.secret_public(),
            name: &name,
            wg_key: &public_key,
            sign_key: &sign_key,
        };
        let proof = wire::prove_keys(&transcript, &wg, &signing).expect("proof");
        let request = JoinMessage::Request {
            name,
            public_key,
            sign_key,
            proof: Some(proof),
        };
        let packet =
            wire::encode(wire::JOINER_ADDRESS, invite.host_address, &request).expect("encode");
        let (mut rx, mut tx) = (vec![0u8; 4096], vec![0u8; 4096]);
        let end = Instant::now() + PATIENCE;
        let mut next_try = Instant::now();
        while Instant::now() < end {
            if Instant::now() >= next_try {
                // Queues the request and starts (or repeats) the handshake.
                next_try = Instant::now() + Duration::from_millis(500);
                if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&packet, &mut tx) {
                    let _ = sock.send_to(p, host);
                }
            }
            let Ok((n, from)) = sock.recv_from(&mut rx) else {
                continue;
            };
            match tunn.decapsulate(Some(from.ip()), &rx[..n], &mut tx) {
                TunnResult::WriteToNetwork(p) => {
                    let _ = sock.send_to(p, from);
                    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut tx) {
                        let _ = sock.send_to(p, from);
                    }
                }
                TunnResult::WriteToTunnelV4(p, _) => {
                    if let Ok(answer) = wire::decode(p) {
                        return answer;
                    }
                }
                _ => {}
            }
        }
        panic!("no answer from the host at {host}");
    })
}

#[test]
fn bad_joiner_names_are_refused_and_the_single_use_invite_still_admits_a_good_one() {
    if !root_or_skip(
        "bad_joiner_names_are_refused_and_the_single_use_invite_still_admits_a_good_one",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut member = lab.node("member");
    let mut joiner = lab.node("joiner");
    for n in [&mut host, &mut member, &mut joiner] {
        n.start();
    }
    member.ok(&["join", &host.link(&[])]);
    let member_address = vpn_address(&member.status());
    let link = host.link(&["--uses", "1"]);
    // The longest name that fits in one join datagram, beyond the 64-byte limit.
    let long = "x".repeat(1000);
    let bad = [
        ("long", long),
        ("control characters", "evil\u{1b}[2J\u{7}".to_string()),
        ("another member's name", member.name.to_uppercase()),
        ("another member's address", member_address.clone()),
        ("the host's name", host.name.clone()),
    ];
    for (what, name) in bad {
        match fake_join(&joiner.ns, &link, name) {
            JoinMessage::Refused {
                reason: wire::Refusal::Name(why),
            } => assert!(why.to_string().contains("[node] name"), "{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // The member's link is used; the other one must still be open and unused.
    let links: Vec<watchalong::control::InviteView> =
        serde_json::from_str(&host.ok(&["links", "--json"])).expect("links json");
    let open: Vec<_> = links.iter().filter(|l| l.state == "open").collect();
    assert!(
        open.len() == 1 && open[0].uses == 0,
        "a refused name spent the invite: {links:?}"
    );
    // The same single-use link still admits a node with a good name.
    joiner.ok(&["join", &link]);
    let view = host.ok(&["peers", "--json"]);
    assert!(view.contains(&format!("\"{}\"", joiner.name)), "{view}");
}

/// The signing key a node keeps in its state dir.
fn signing_key(n: &Node) -> SigningKey {
    use base64::Engine;
    let text = std::fs::read_to_string(n.dir.join("state/signing.key")).expect("signing key");
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    SigningKey::from_bytes(&bytes)
}

/// Whether `n` holds the announcement `body` (its group file lists it). The state file is
/// read raw on purpose: it is the daemon's own record, not a reply of the control API.
fn holds_announcement(n: &Node, body: &str) -> bool {
    std::fs::read_to_string(n.dir.join("state/group.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|g| g["mesh"]["announcements"].as_array().cloned())
        .is_some_and(|list| list.iter().any(|a| a["body"] == body))
}

#[test]
fn a_member_claiming_another_sites_public_ip_stays_in_its_own_site_everywhere() {
    if !root_or_skip("a_member_claiming_another_sites_public_ip_stays_in_its_own_site_everywhere") {
        return;
    }
    let mut l = SiteLab::new();
    l.start(Duration::from_secs(60));
    let distant_key = l.distant.public_key();
    // The distant member signs, with its own key, an announcement that puts it behind
    // r1's public IP with an address on r1's LAN, newer than anything it announced.
    let claim = watchalong::group::mesh::Announcement {
        wg_key: watchalong::group::identity::key_from_base64(&distant_key).expect("key"),
        seq: u64::try_from(watchalong::base::clock::now_ms()).expect("time") * 2,
        public_endpoint: Some(SocketAddr::from((l.r1.wan_ip, 51871))),
        lan: vec![SocketAddr::from(([192, 168, 1, 77], 51871))],
        public: vec![],
        relay_port: None,
        shares: vec![],
    };
    let signed = watchalong::group::mesh::sign_announcement(&signing_key(&l.distant), &claim);
    // Stopped, the distant member cannot correct the claim with a newer announcement.
    l.distant.term();
    let message = serde_json::json!({"type": "announce", "announcement": signed});
    for n in [&l.host, &l.s1a, &l.s1b] {
        let body = serde_json::json!({"from": distant_key, "message": message});
        let o = n.cli_stdin(&["debug-gossip"], &body.to_string());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for n in [&l.host, &l.s1a, &l.s1b] {
        assert!(
            wait_until(PATIENCE, || holds_announcement(n, &signed.body)),
            "{} did not even take the claim, so it proves nothing",
            n.name
        );
    }
    for n in [&l.host, &l.s1a, &l.s1b] {
        let p = n.peers();
        let d = member(&p, "distant").unwrap_or_else(|| panic!("{}: {p:#?}", n.name));
        let ip = l.distant.ip.to_string();
        assert_eq!(d.site.as_deref(), Some(ip.as_str()), "{}: {p:#?}", n.name);
        assert!(!d.nearby, "{}: {p:#?}", n.name);
    }
}
