//! Our tunnel speaks real WireGuard, with its kernel offloads on and with `[tunnel] offload
//! = "off"`: a handshake each way, pings, bulk TCP both ways checked byte for byte, the
//! spoof check and run-time removal, against wireguard-go and against gotatun-cli
//! (Mullvad's boringtun fork), each configured by `wg` from wireguard-tools through its
//! UAPI socket, over an IPv4 or an IPv6 underlay. One body,
//! [`handshake_and_traffic_both_ways`], runs every combination.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use watchalong::control::Offloads;

const DEADLINE: Duration = Duration::from_secs(30);

/// Bytes moved each way by the bulk transfer: enough for TCP to send super-packets and for
/// GSO and GRO to batch, which ping never makes them do.
const BULK: usize = 8 << 20;

/// The WireGuard implementation on the other end of the tunnel.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Debian's `wireguard-go`.
    WireguardGo,
    /// crates.io `gotatun-cli`, binary `gotatun`.
    Gotatun,
}

impl Kind {
    /// Its name in messages, and ours for it as a peer.
    fn name(self) -> &'static str {
        match self {
            Kind::WireguardGo => "wireguard-go",
            Kind::Gotatun => "gotatun",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Kind::WireguardGo => "wireguard-go",
            Kind::Gotatun => "gotatun",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Kind::WireguardGo => "apt-get install wireguard-go, or run scripts/test.sh",
            Kind::Gotatun => {
                "cargo install --locked --version 0.10.2 gotatun-cli (and ~/.cargo/bin on PATH), \
                 or run scripts/test.sh"
            }
        }
    }

    /// The start of its interface name; with the PID and a count it stays within the
    /// kernel's 15 characters.
    fn tag(self) -> &'static str {
        match self {
            Kind::WireguardGo => "wgg",
            Kind::Gotatun => "gtn",
        }
    }

    /// Its arguments to run in the foreground on `iface`, so the test owns the process.
    fn args(self, iface: &str) -> Vec<String> {
        match self {
            Kind::WireguardGo => vec!["-f".into(), iface.into()],
            // As root without a login (no terminal), its default drop of sudo privileges
            // fails on getlogin() and it does not start, whatever its --help says.
            Kind::Gotatun => vec![
                "-f".into(),
                "--disable-drop-privileges".into(),
                iface.into(),
            ],
        }
    }
}

/// Our side's `[tunnel] offload`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Auto,
    Off,
}

/// The family of the outer packets: which of the lab's addresses the endpoints name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// `node`'s endpoint on `port` in this family, as `wg` and our CLI take it.
    fn endpoint(self, node: &Node, port: u16) -> String {
        match self {
            Family::V4 => format!("{}:{port}", node.ip),
            Family::V6 => format!("[{}]:{port}", node.ip6.expect("the lab has IPv6")),
        }
    }

    /// The firewall tool that counts packets in this family.
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The IP length of a handshake initiation: 148 bytes, a UDP header, the IP header.
    fn initiation_length(self) -> &'static str {
        match self {
            Family::V4 => "176",
            Family::V6 => "196",
        }
    }
}

static IFACES: AtomicUsize = AtomicUsize::new(0);

/// The other implementation's process in its namespace, with its TUN interface and its
/// UAPI socket. Its socket lives in `/var/run/wireguard/IFACE.sock`, which every namespace
/// shares and which neither implementation removes when killed: the name is unique to
/// this test, and the socket is removed on drop, also when the test fails (its log is
/// printed then).
struct PeerDaemon {
    kind: Kind,
    iface: String,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl PeerDaemon {
    fn start(kind: Kind, node: &Node) -> PeerDaemon {
        // `ip netns exec` starts even when the program is missing; ask for it first so a
        // missing tool says so, not "made no interface".
        if let Err(e) = Command::new(kind.program())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            panic!(
                "{} is needed for this test and cannot be run ({e}): {}",
                kind.program(),
                kind.install_hint()
            );
        }
        let iface = format!(
            "{}{}x{}",
            kind.tag(),
            std::process::id() % 100_000,
            IFACES.fetch_add(1, Ordering::SeqCst)
        );
        let socket = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let log = node.dir.join(format!("{}.log", kind.tag()));
        let out = std::fs::File::create(&log).expect("peer log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name, kind.program()])
            .args(kind.args(&iface))
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("peer log file"))
            .stderr(out)
            .spawn()
            .expect("ip netns exec");
        let daemon = PeerDaemon {
            kind,
            iface,
            child,
            socket,
            log,
        };
        assert!(
            wait_until(DEADLINE, || node.ns.has_link(&daemon.iface)
                && daemon.socket.exists()),
            "{} made no {} with its UAPI socket",
            kind.name(),
            daemon.iface
        );
        daemon
    }
}

impl Drop for PeerDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ---\n{}",
                self.kind.name(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

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

/// The other implementation's latest handshake with its only peer (us), in Unix seconds
/// (0: none yet).
fn latest_handshake(ns: &Netns, iface: &str) -> u64 {
    let out = ns.exec(&["wg", "show", iface, "latest-handshakes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// `wg set ARGS` in `ns`, which must succeed.
fn wg_set(ns: &Netns, args: &[&str]) {
    let mut all = vec!["wg", "set"];
    all.extend_from_slice(args);
    let out = ns.exec(&all);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What `status` must say of our offloads in `mode`: every one on (this kernel takes them
/// all), or every one off.
fn assert_offloads(ours: &Node, mode: Mode, when: &str) {
    let got = ours.status().node.offloads;
    let on = mode == Mode::Auto;
    let want = Offloads {
        tun_tso: on,
        tun_gro: on,
        udp_gso: on,
        udp_gro: on,
    };
    assert_eq!(got, want, "offload = {mode:?}, {when}:\n{}", ours.log());
}

/// Moves [`BULK`] bytes over one TCP connection each way between `ours` at 100.77.0.1 and
/// `theirs` at 100.77.0.50 and checks that each arrived byte for byte.
fn bulk_both_ways(ours: &Node, theirs: &Node, kind: Kind) {
    let (sent, received) = tcp_transfer(ours, theirs, "100.77.0.50", BULK);
    assert_eq!(
        sent,
        received,
        "bulk TCP from us to {} arrived damaged",
        kind.name()
    );
    let (sent, received) = tcp_transfer(theirs, ours, "100.77.0.1", BULK);
    assert_eq!(
        sent,
        received,
        "bulk TCP from {} to us arrived damaged",
        kind.name()
    );
}

/// The whole interop check against `kind` with our `[tunnel] offload` in `mode`, over
/// endpoints of `family`: its handshake answered, ours answered, pings and bulk TCP both
/// ways with the offloads `status` promises, the same inside the tunnel over IPv6 (our
/// ULA address and theirs), spoofed sources of both inner families dropped and counted,
/// and run-time removal.
fn handshake_and_traffic_both_ways(kind: Kind, mode: Mode, family: Family) {
    let name = kind.name();
    let mut lab = match family {
        Family::V4 => Lab::new(),
        Family::V6 => Lab::new6(),
    };
    let mut ours = lab.node("ours");
    let theirs = lab.node(kind.tag());
    if mode == Mode::Off {
        let text = std::fs::read_to_string(&ours.config).expect("our config");
        let off = text.replacen("[tunnel]\n", "[tunnel]\noffload = \"off\"\n", 1);
        assert_ne!(
            off, text,
            "our config has no [tunnel] table to turn offloads off in"
        );
        std::fs::write(&ours.config, off).expect("our config");
    }
    ours.start();
    assert_offloads(&ours, mode, "at start");
    let our_key = ours.public_key();
    // Inside the tunnel over IPv6: our ULA address from `status`, and the one our side
    // derives for an IPv4 VPN address (ours is the host, so its key names the /64).
    let our_status = ours.status();
    let our6 = our_status
        .node
        .address6
        .expect("status shows no inner IPv6 address")
        .to_string();
    let host_key = watchalong::group::identity::key_from_base64(&our_status.node.public_key)
        .expect("status shows a base64 key");
    let six = |v4: &str| {
        watchalong::group::place::address6(&host_key, v4.parse().expect("an IPv4 address"))
            .to_string()
    };
    let our_allowed = format!("100.77.0.1/32,{our6}/128");

    let private = tool("wg", &["genkey"], None);
    let public = tool("wg", &["pubkey"], Some(&private));
    let key_file = theirs.dir.join("wg.key");
    std::fs::write(&key_file, format!("{private}\n")).unwrap();

    let peer = PeerDaemon::start(kind, &theirs);
    let iface = peer.iface.as_str();
    let endpoint = family.endpoint(&ours, 51871);
    let their_endpoint = family.endpoint(&theirs, 51820);
    wg_set(
        &theirs.ns,
        &[
            iface,
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            &our_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &our_allowed,
        ],
    );
    let add_address = |cidr: &str| {
        // `nodad`: an IPv6 address usable at once (`ping -I` refuses a tentative one).
        let mut args = vec!["-n", &theirs.ns.name, "addr", "add", cidr, "dev", iface];
        if cidr.contains(':') {
            args.push("nodad");
        }
        must("ip", &args)
    };
    add_address("100.77.0.50/16");
    add_address(&format!("{}/64", six("100.77.0.50")));
    // Ours is the link's 1500 less 80; gotatun leaves its TUN at 1500, whose datagrams
    // would not fit the link.
    must(
        "ip",
        &[
            "-n",
            &theirs.ns.name,
            "link",
            "set",
            iface,
            "mtu",
            "1420",
            "up",
        ],
    );

    // No endpoint on our side: we cannot start a handshake, so the first one is theirs,
    // and what is tested is our answer to it.
    ours.ok(&[
        "peer",
        "add",
        "--public-key",
        &public,
        "--address",
        "100.77.0.50",
        "--name",
        name,
    ]);
    assert!(
        wait_until(DEADLINE, || theirs.ping("100.77.0.1")),
        "we did not answer {name}'s handshake"
    );
    let first = latest_handshake(&theirs.ns, iface);
    assert!(first > 0, "{name} saw no handshake");
    let s = ours.status();
    let p = Node::peer(&s, name).expect("peer listed");
    assert!(p.last_handshake.is_some(), "{p:?}");
    assert_eq!(
        p.endpoint.map(|e| e.to_string()),
        Some(their_endpoint.clone()),
        "we did not learn {name}'s endpoint from its handshake"
    );

    // Now ours: the peer forgets us and keeps no endpoint (so it cannot start one), we
    // start afresh with its endpoint. Handshake times are in whole seconds: a fresh one
    // can be told from the first only once the clock has moved past it. The peer takes us
    // back only then: gotatun dates a handshake by a clock it ticks only for peers with an
    // endpoint, so its date for a responder's first session is when we were added to it.
    wg_set(&theirs.ns, &[iface, "peer", &our_key, "remove"]);
    ours.ok(&["peer", "remove", "--public-key", &public]);
    assert!(wait_until(DEADLINE, || unix_now() > first));
    wg_set(
        &theirs.ns,
        &[iface, "peer", &our_key, "allowed-ips", &our_allowed],
    );
    ours.ok(&[
        "peer",
        "add",
        "--public-key",
        &public,
        "--address",
        "100.77.0.50",
        "--endpoint",
        &their_endpoint,
        "--name",
        name,
    ]);
    assert!(
        wait_until(DEADLINE, || ours.ping("100.77.0.50")),
        "{name} did not answer our handshake"
    );
    let second = latest_handshake(&theirs.ns, iface);
    assert!(
        second > first,
        "no fresh handshake from our side: {first} then {second}"
    );
    let s = ours.status();
    let p = Node::peer(&s, name).expect("peer listed");
    assert!(
        p.last_handshake.is_some_and(|t| t > first),
        "our side saw no fresh handshake: {p:?}"
    );
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "{p:?}");

    // The same peer inside the tunnel over IPv6, at the address our side derived for it.
    let their6 = six("100.77.0.50");
    assert!(
        wait_until(DEADLINE, || ours.ping(&their6) && theirs.ping(&our6)),
        "no ping inside the tunnel over IPv6 between {our6} and {name} at {their6}"
    );

    // Offloads only matter for bulk TCP: super-packets split and merged, datagrams sent
    // and read in runs. They must carry it intact, and still be on after it (a kernel
    // refusal met on the way would have turned one off).
    bulk_both_ways(&ours, &theirs, kind);
    assert_offloads(&ours, mode, "after bulk TCP both ways");

    // A packet whose source the peer does not own is dropped, and counted: an address
    // nobody owns, and one that belongs to another peer (added here, never connected),
    // in each family inside the tunnel.
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
    spoofed_sources_are_dropped_and_counted(
        &ours,
        &theirs,
        &add_address,
        ["100.77.0.98/32", "100.77.0.99/32"],
        "100.77.0.50",
        "100.77.0.1",
    );
    spoofed_sources_are_dropped_and_counted(
        &ours,
        &theirs,
        &add_address,
        [
            &format!("{}/128", six("100.77.0.98")),
            &format!("{}/128", six("100.77.0.99")),
        ],
        &their6,
        &our6,
    );

    // Removing the peer at run time cuts it off without a restart, both ways, in the
    // tunnel: our route to its address stays as it was, and a fresh handshake of the
    // peer's gets no answer.
    let route = |ns: &Netns| {
        let o = ns.exec(&["ip", "route", "get", "100.77.0.50"]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let route_before = route(&ours.ns);
    ours.ok(&["peer", "remove", "--public-key", &public]);
    assert!(
        Node::peer(&ours.status(), name).is_none(),
        "still listed after removal"
    );
    assert_eq!(
        route(&ours.ns),
        route_before,
        "the route changed, not the tunnel"
    );
    assert!(!ours.ping("100.77.0.50"), "a removed peer still answers");
    // The peer starts over with our endpoint: each ping may send an initiation (one per
    // 5 s at most); two that reached our port unanswered prove the refusal.
    must(
        "ip",
        &[
            "netns",
            "exec",
            &ours.ns.name,
            family.iptables(),
            "-I",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            "51871",
            "-m",
            "length",
            "--length",
            family.initiation_length(),
            "-j",
            "ACCEPT",
        ],
    );
    wg_set(&theirs.ns, &[iface, "peer", &our_key, "remove"]);
    wg_set(
        &theirs.ns,
        &[
            iface,
            "peer",
            &our_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &our_allowed,
        ],
    );
    let initiations = || {
        let o = ours
            .ns
            .exec(&[family.iptables(), "-L", "INPUT", "-v", "-x", "-n"]);
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
    assert!(refused, "{name}'s handshakes never reached our port");
    assert_eq!(
        latest_handshake(&theirs.ns, iface),
        0,
        "a removed peer completed a handshake"
    );
    assert!(
        ours.ping("100.77.0.1"),
        "this node itself stopped answering"
    );
}

/// `theirs` claims each of `claimed` (an address nobody owns, then one of another peer's),
/// given to its interface by `add_address`: two pings from it to our address `to` get
/// no answer and are counted in our `spoofed_packets`; a ping from its own address `own`
/// still gets one.
fn spoofed_sources_are_dropped_and_counted(
    ours: &Node,
    theirs: &Node,
    add_address: &dyn Fn(&str),
    claimed: [&str; 2],
    own: &str,
    to: &str,
) {
    let ping_from = |from: &str| {
        theirs
            .ns
            .exec(&["ping", "-c", "2", "-W", "1", "-I", from, to])
            .status
            .success()
    };
    let mut dropped_before = ours.status().node.spoofed_packets;
    for cidr in claimed {
        add_address(cidr);
        let claimed = cidr.split('/').next().expect("an address");
        assert!(!ping_from(claimed), "{claimed} got an answer");
        let dropped = ours.status().node.spoofed_packets;
        assert!(
            dropped >= dropped_before + 2,
            "packets claiming {claimed} not counted: {dropped_before} -> {dropped}"
        );
        dropped_before = dropped;
    }
    // From its own address explicitly: the kernel may prefer a claimed one for `to`.
    assert!(ping_from(own), "the genuine {own} stopped reaching {to}");
}

#[test]
fn handshake_and_traffic_both_ways_with_wireguard_go() {
    if root_or_skip("handshake_and_traffic_both_ways_with_wireguard_go") {
        handshake_and_traffic_both_ways(Kind::WireguardGo, Mode::Auto, Family::V4);
    }
}

#[test]
fn handshake_and_traffic_both_ways_with_gotatun() {
    if root_or_skip("handshake_and_traffic_both_ways_with_gotatun") {
        handshake_and_traffic_both_ways(Kind::Gotatun, Mode::Auto, Family::V4);
    }
}

#[test]
fn with_offload_off_handshake_and_traffic_both_ways_with_wireguard_go() {
    if root_or_skip("with_offload_off_handshake_and_traffic_both_ways_with_wireguard_go") {
        handshake_and_traffic_both_ways(Kind::WireguardGo, Mode::Off, Family::V4);
    }
}

#[test]
fn with_offload_off_handshake_and_traffic_both_ways_with_gotatun() {
    if root_or_skip("with_offload_off_handshake_and_traffic_both_ways_with_gotatun") {
        handshake_and_traffic_both_ways(Kind::Gotatun, Mode::Off, Family::V4);
    }
}

#[test]
fn over_ipv6_endpoints_handshake_and_traffic_both_ways_with_wireguard_go() {
    if root_or_skip("over_ipv6_endpoints_handshake_and_traffic_both_ways_with_wireguard_go") {
        handshake_and_traffic_both_ways(Kind::WireguardGo, Mode::Auto, Family::V6);
    }
}
