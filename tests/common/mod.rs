//! The lab: network namespaces on one LAN bridge, one watchalong daemon per namespace,
//! each with its own state dir and control socket. Every name carries this process's PID
//! so parallel runs never meet, and everything is torn down on drop, also when a test
//! panics (the daemon's log is printed then, to show why).
//!
//! IPv6 is opt-in ([`Lab::internet6`], [`Lab::router_with`]), so every older test keeps
//! its IPv4-only lab: each internet host and each site then get a global /64 from 2001:db8::/32,
//! routers route IPv6 without NAT behind a stateful `ip6tables` firewall (replies in, new
//! inbound dropped), and a node or a site may have IPv6 only, or an IPv4 NAT that lets
//! nothing unsolicited in and maps each destination apart (carrier-grade NAT).

#![allow(dead_code)]

pub mod delay;
pub mod measure;
pub mod mount;
pub mod player;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use watchalong::control::{PeerStatus, PeerView, PeersReply, StatusReply};

pub const BIN: &str = env!("CARGO_BIN_EXE_watchalong");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// True when the test may run. Without root it is skipped loudly, except under CI,
/// where a skip would hide a broken suite.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root and namespaces");
    }
    root
}

/// Whether CI runs us: `CI` set to anything but empty, `0` or `false` (CI systems set
/// `true`, `1` or their name). One rule for every helper that may skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    })
}

static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// Skips `test` for `why`; under CI, fails it instead. The harness captures what a test
/// prints and shows a skipped test as `ok`, so the line goes to stderr past the capture,
/// and the count of skips is printed under the summary when the test binary exits.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    if under_ci() {
        panic!("{test} {why}, and CI must run it");
    }
    if SKIPPED.fetch_add(1, Ordering::SeqCst) == 0 {
        // SAFETY: registers a plain extern "C" function that takes no arguments.
        unsafe { libc::atexit(report_skips) };
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n========== SKIPPED ({why}): {test} ==========\n"
    );
}

extern "C" fn report_skips() {
    use std::io::Write;
    let n = SKIPPED.load(Ordering::SeqCst);
    let _ = writeln!(
        std::io::stderr(),
        "========== {n} test(s) SKIPPED, counted as ok above ==========\n"
    );
}

/// The root queueing discipline of `dev` in namespace `ns`, as `tc` shows it.
fn root_qdisc(ns: &str, dev: &str) -> String {
    let o = run(
        "ip",
        &[
            "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev, "root",
        ],
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The neighbour entries the lab keeps room for besides its own largest segment's:
/// other labs (tests run in parallel) and the machine itself.
const NEIGHBOUR_SPARE: usize = 4096;

/// Makes sure the kernel's neighbour tables (ARP, and NDP for IPv6) have room for a
/// segment of `hosts` namespaces that all talk to each other. Each table is one per
/// machine, shared by every namespace, and by default holds at most 1024 entries
/// (`gc_thresh3`); a segment of n hosts in a full mesh needs n·(n−1) of them, so at
/// 40-odd nodes a new entry cannot be made ("neighbor table overflow!" in dmesg) and a
/// namespace cannot send to an address it has not reached before: the 64-node mesh
/// bench (issue 19) failed its 46th join that way, the joiner's datagrams never leaving
/// its namespace. The limits are raised, never lowered, and left raised: other labs may
/// be running, and a larger table costs only memory once used.
///
/// Where `/proc/sys` is read-only (some CI containers), a lab that fits in the current
/// limits runs as before; only one that cannot fit stops, saying what to set.
fn make_room_for_neighbours(hosts: usize) {
    let own = hosts * hosts.saturating_sub(1);
    let need = own + NEIGHBOUR_SPARE;
    for family in ["ipv4", "ipv6"] {
        // thresh1: no garbage collection below it; thresh2: soft limit; thresh3: hard.
        // `fits`: the least this segment can work with, if the limit cannot be raised.
        for (name, wanted, fits) in [
            ("gc_thresh1", need / 4, 0),
            ("gc_thresh2", need / 2, 0),
            ("gc_thresh3", need, own),
        ] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{name}");
            let now: usize = std::fs::read_to_string(&path)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if now >= wanted {
                continue;
            }
            match std::fs::write(&path, wanted.to_string()) {
                Ok(()) => {}
                Err(_) if now >= fits => {}
                Err(e) => panic!(
                    "a lab segment of {hosts} hosts needs room for {wanted} neighbour entries, \
                     but {path} is {now} and cannot be raised ({e}): run \
                     `sysctl -w net.{family}.neigh.default.{name}={wanted}` as root"
                ),
            }
        }
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

pub fn must(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn unique(tag: &str) -> String {
    format!(
        "{tag}{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted (with whatever still runs in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("wat-{}", unique(tag));
        must("ip", &["netns", "add", &name]);
        must("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn spawn(&self, args: &[&str], log: &Path) -> Child {
        let log = std::fs::File::create(log).expect("log file");
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn in namespace")
    }

    pub fn has_link(&self, name: &str) -> bool {
        run("ip", &["-n", &self.name, "link", "show", name])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = run("ip", &["netns", "pids", &self.name]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Runs `f` on a thread that lives inside namespace `ns`, so sockets it opens are there.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns failed: {}", std::io::Error::last_os_error());
        f()
    })
}

pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f)
        .join()
        .expect("thread in namespace panicked")
}

/// The round trip `WATCHALONG_LAB_RTT_MS` asks for on the lab's main segment (see
/// [`Lab::rtt`]); none when it is unset or empty.
pub fn rtt_from_env() -> Duration {
    match std::env::var("WATCHALONG_LAB_RTT_MS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(ms) => Duration::from_millis(ms),
            Err(_) => panic!(
                "WATCHALONG_LAB_RTT_MS is {v:?}: set it to a whole number of milliseconds \
                 (e.g. 50), or unset it for no delay"
            ),
        },
        _ => Duration::ZERO,
    }
}

/// A layer-2 segment: a bridge in some namespace, and the /24 its hosts live in, with
/// the IPv6 /64 `2001:db8:N::/64` when `net6` is `Some(N)`; on the internet (`N` = 0)
/// each host has a /64 of its own instead, `2001:db8:0:H::/64`, as no two homes or
/// servers on the internet share one (the /64 makes a site).
pub struct Segment {
    ns: String,
    bridge: String,
    prefix: [u8; 3],
    next: u8,
    gateway: Option<Ipv4Addr>,
    net6: Option<u16>,
    gateway6: Option<Ipv6Addr>,
    /// Routes every namespace plugged in here gets: (a site's /64, its router's WAN
    /// address). Only the internet has them: there is no routing daemon in the lab.
    routes6: Vec<(String, Ipv6Addr)>,
    mtu: u16,
    /// (namespace, its veth's outer end in the segment's namespace)
    attached: Vec<(String, String)>,
    /// The delay each link of this segment adds each way; zero puts no delay element in.
    one_way: Duration,
    /// The delay elements of the links attached so far.
    delays: Vec<delay::Delay>,
}

/// The `host`th address of the lab's IPv6 /64 number `net`: `2001:db8:net::host`.
pub fn lab_ipv6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host)
}

/// The address of the `host`th node on the lab's IPv6 internet, in a /64 of its own.
pub fn internet_ipv6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, host, 0, 0, 0, 1)
}

/// Where the lab internet's hosts' /64s are, all reached on the link.
const INTERNET6: &str = "2001:db8::/48";

/// What a namespace got when plugged into a segment.
struct Attached {
    /// `None` when it was plugged in for IPv6 only.
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
}

impl Segment {
    /// Plugs namespace `ns` into this segment as `eth0` and gives it the next address.
    fn attach(&mut self, ns: &Netns) -> Ipv4Addr {
        self.attach_families(ns, true)
            .ip
            .expect("an IPv4 address was asked for")
    }

    /// The same, with an IPv4 address only if `v4`, and an IPv6 one whenever the
    /// segment has a /64 (with its routes and default route).
    fn attach_families(&mut self, ns: &Netns, v4: bool) -> Attached {
        let ip = Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], self.next);
        let ip6 = self.net6.map(|n| match n {
            0 => internet_ipv6(u16::from(self.next)),
            n => lab_ipv6(n, u16::from(self.next)),
        });
        self.next += 1;
        let outer = unique("v");
        if self.one_way.is_zero() {
            must(
                "ip",
                &[
                    "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns",
                    &ns.name,
                ],
            );
            must("ip", &["link", "set", &outer, "netns", &self.ns]);
        } else {
            // The same two ends, `eth0` in the host and `outer` here, with the delay between.
            self.delays.push(delay::Delay::splice(
                &ns.name,
                "eth0",
                &self.ns,
                &outer,
                self.mtu,
                self.one_way,
            ));
        }
        if self.net6.is_some() {
            no_dad(&ns.name, "eth0");
        }
        let mtu = self.mtu.to_string();
        must("ip", &["-n", &self.ns, "link", "set", &outer, "mtu", &mtu]);
        must("ip", &["-n", &ns.name, "link", "set", "eth0", "mtu", &mtu]);
        must(
            "ip",
            &[
                "-n",
                &self.ns,
                "link",
                "set",
                &outer,
                "master",
                &self.bridge,
                "up",
            ],
        );
        if v4 {
            must(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    "eth0",
                ],
            );
        }
        if let Some(a) = ip6 {
            // `nodad`: usable at once, not after a second of duplicate detection.
            must(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
        }
        must("ip", &["-n", &ns.name, "link", "set", "eth0", "up"]);
        if let (Some(gw), true) = (self.gateway, v4) {
            must(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                ],
            );
        }
        if let (Some(gw), Some(_)) = (self.gateway6, ip6) {
            must(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                ],
            );
        }
        if self.net6 == Some(0) && ip6.is_some() {
            // The other hosts' /64s are on this same link.
            must(
                "ip",
                &[
                    "-n", &ns.name, "-6", "route", "add", INTERNET6, "dev", "eth0",
                ],
            );
        }
        if ip6.is_some() {
            for (net, via) in &self.routes6 {
                add_route6(&ns.name, net, *via);
            }
        }
        self.attached.push((ns.name.clone(), outer));
        make_room_for_neighbours(self.attached.len());
        Attached {
            ip: v4.then_some(ip),
            ip6,
        }
    }

    /// Routes `net` via `via` from every namespace plugged in here but `except` (the
    /// router that owns it), and from every one plugged in later.
    fn route6(&mut self, net: String, via: Ipv6Addr, except: &str) {
        for (ns, _) in self.attached.iter().filter(|(ns, _)| ns != except) {
            add_route6(ns, &net, via);
        }
        self.routes6.push((net, via));
    }
}

/// Turns duplicate address detection off for `dev` in `ns` (and for interfaces made
/// there later), before it comes up. Until DAD ends (a second or two) the link-local
/// address is tentative, and a router cannot send the neighbour solicitation that
/// forwarding needs: the first packets through a new router would be lost.
fn no_dad(ns: &str, dev: &str) {
    for key in ["default", dev] {
        must(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ],
        );
    }
}

fn add_route6(ns: &str, net: &str, via: Ipv6Addr) {
    must(
        "ip",
        &["-n", ns, "-6", "route", "add", net, "via", &via.to_string()],
    );
}

/// How [`Lab::router_with`] builds a home router. The default is [`Lab::router`]'s:
/// IPv4 NAT only.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouterOptions {
    /// The LAN gets the global /64 `2001:db8:N::/64` (N: the LAN prefix's third byte),
    /// routed without NAT behind a stateful firewall: replies come in, nothing new does.
    /// Needs a lab made with [`Lab::internet6`].
    pub ipv6: bool,
    /// The router has no IPv4 on its WAN: the site reaches the internet over IPv6 only.
    pub ipv6_only: bool,
    /// Carrier-grade NAT: each destination gets its own random port (endpoint-dependent
    /// mapping) and nothing unsolicited comes in, so no hole can be punched over IPv4.
    pub cgn: bool,
}

/// A home router: WAN on the lab's main segment, NAT (MASQUERADE) for a LAN bridge.
pub struct Router {
    pub ns: Netns,
    /// Unspecified when the router has IPv6 only.
    pub wan_ip: Ipv4Addr,
    /// Its WAN's IPv6 address, when it has one.
    pub wan_ip6: Option<Ipv6Addr>,
    pub lan: Segment,
}

impl Router {
    /// Bytes (received, sent) on the router's WAN side.
    pub fn wan_bytes(&self) -> (u64, u64) {
        let read = |f: &str| -> u64 {
            let o = self
                .ns
                .exec(&["cat", &format!("/sys/class/net/eth0/statistics/{f}")]);
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        };
        (read("rx_bytes"), read("tx_bytes"))
    }

    /// Drops inbound UDP from anyone but `allowed`: no hole can be punched through it.
    pub fn drop_unsolicited_udp_except(&self, allowed: Ipv4Addr) {
        let ok = self.ns.exec(&[
            "iptables",
            "-I",
            "FORWARD",
            "-i",
            "eth0",
            "-p",
            "udp",
            "!",
            "-s",
            &allowed.to_string(),
            "-j",
            "DROP",
        ]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
}

/// Makes `ns` (a router whose LAN bridge is `lan` and WAN is `eth0`) route IPv6 for
/// its LAN, at `gw6`, without NAT, behind the stateful firewall of a home router:
/// replies to what the LAN sent come in, nothing new does, to the LAN or the router
/// (neighbour discovery excepted, which the router itself needs).
fn ipv6_router(ns: &Netns, gw6: Ipv6Addr) {
    must(
        "ip",
        &[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            "lan",
            "nodad",
        ],
    );
    let o = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for rule in [
        "-A FORWARD -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i eth0 -j DROP",
        "-A INPUT -i eth0 -p ipv6-icmp -j ACCEPT",
        "-A INPUT -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -i eth0 -j DROP",
    ] {
        let mut args = vec!["netns", "exec", &ns.name, "ip6tables"];
        args.extend(rule.split(' '));
        must("ip", &args);
    }
}

/// The lab: one main segment (a LAN, or the internet of a NAT lab), nodes on it, and
/// routers with their own LANs behind them.
pub struct Lab {
    pub dir: tempfile::TempDir,
    switch: Netns,
    main: Segment,
    /// The MTU of every link, and each node's tunnel MTU is 80 less.
    mtu: u16,
}

impl Lab {
    /// Nodes on one LAN, 10.88.0.0/24. There is no NAT, so each node is seen behind its
    /// own address and is a site of its own: to the daemons this segment is the internet
    /// between distant nodes, and `WATCHALONG_LAB_RTT_MS` delays it like the internet.
    pub fn new() -> Lab {
        Lab::with_prefix([10, 88, 0], rtt_from_env())
    }

    /// A public internet, 203.0.113.0/24, for public nodes and routers' WANs.
    pub fn internet() -> Lab {
        Lab::with_prefix([203, 0, 113], rtt_from_env())
    }

    /// The same with a round trip of `ms` between any two of its nodes or routers,
    /// whatever `WATCHALONG_LAB_RTT_MS` says (see [`Lab::rtt`]).
    pub fn internet_with_rtt(ms: u32) -> Lab {
        Lab::with_prefix([203, 0, 113], Duration::from_millis(u64::from(ms)))
    }

    /// The round trip the main segment adds between any two of its nodes or routers.
    /// Each attached link holds frames a quarter of it each way, so a path across it,
    /// which crosses two links there and back, adds the whole of it; a node behind a
    /// router is as far as its router (its LAN adds nothing), and two nodes behind the
    /// same router are not delayed at all.
    pub fn rtt(&self) -> Duration {
        self.main.one_way * 4
    }

    /// The same with 9000-byte frames everywhere, so that counted WAN bytes are mostly
    /// payload (at 1500 bytes WireGuard, UDP, IP and Ethernet headers add about 9%).
    pub fn internet_jumbo() -> Lab {
        let mut lab = Lab::with_prefix([203, 0, 113], rtt_from_env());
        lab.mtu = 9000;
        lab.main.mtu = 9000;
        lab
    }

    /// [`Lab::internet`] with IPv6 as well: every node on the internet gets a /64 of its
    /// own in `2001:db8::/48` (see [`internet_ipv6`]), and routers made with
    /// [`Lab::router_with`] route their sites' /64s.
    pub fn internet6() -> Lab {
        let mut lab = Lab::with_prefix([203, 0, 113], rtt_from_env());
        lab.main.net6 = Some(0);
        lab
    }

    /// [`Lab::internet6`] with [`Lab::internet_jumbo`]'s 9000-byte frames.
    pub fn internet6_jumbo() -> Lab {
        let mut lab = Lab::internet_jumbo();
        lab.main.net6 = Some(0);
        lab
    }

    /// [`Lab::new`]'s one LAN with IPv6 as well (addresses as [`Lab::internet6`]'s).
    pub fn new6() -> Lab {
        let mut lab = Lab::new();
        lab.main.net6 = Some(0);
        lab
    }

    fn with_prefix(prefix: [u8; 3], rtt: Duration) -> Lab {
        let switch = Netns::new("sw");
        must(
            "ip",
            &["-n", &switch.name, "link", "add", "br0", "type", "bridge"],
        );
        must("ip", &["-n", &switch.name, "link", "set", "br0", "up"]);
        let main = Segment {
            ns: switch.name.clone(),
            bridge: "br0".into(),
            prefix,
            next: 1,
            gateway: None,
            net6: None,
            gateway6: None,
            routes6: Vec::new(),
            mtu: 1500,
            attached: Vec::new(),
            one_way: rtt / 4,
            delays: Vec::new(),
        };
        Lab {
            dir: tempfile::Builder::new()
                .prefix("watchalong-test-")
                .tempdir()
                .expect("temp dir"),
            switch,
            main,
            mtu: 1500,
        }
    }

    /// Shapes every link of the main segment (the internet) to `mbit` Mbit/s each way,
    /// with htb, and a queue of 100 ms at that rate.
    pub fn shape_wan(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let queue = format!("{}", u64::from(mbit) * 1_000_000 / 8 / 10);
        for (ns, outer) in &self.main.attached {
            for (where_, dev) in [
                (ns.as_str(), "eth0"),
                (self.main.ns.as_str(), outer.as_str()),
            ] {
                // Shaped again at another rate: a bfifo's limit cannot be changed in
                // place, so the old tree goes first (nothing to delete the first time).
                let _ = run(
                    "ip",
                    &[
                        "netns", "exec", where_, "tc", "qdisc", "del", "dev", dev, "root",
                    ],
                );
                for tc in [
                    vec![
                        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default",
                        "10",
                    ],
                    vec![
                        "class", "replace", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                        "rate", &rate, "ceil", &rate,
                    ],
                    vec![
                        "qdisc", "replace", "dev", dev, "parent", "1:10", "handle", "10:", "bfifo",
                        "limit", &queue,
                    ],
                ] {
                    let mut args = vec!["netns", "exec", where_, "tc"];
                    args.extend(tc);
                    let o = run("ip", &args);
                    assert!(
                        o.status.success(),
                        "tc: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                let set = root_qdisc(where_, dev);
                assert!(
                    set.contains("htb"),
                    "{dev} in {where_} is not shaped: {set}"
                );
            }
        }
    }

    /// Removes what [`Lab::shape_wan`] set, and checks that no link is left shaped (a
    /// failed `tc` would leave an "unshaped" measurement shaped).
    pub fn unshape_wan(&self) {
        for (ns, outer) in &self.main.attached {
            for (where_, dev) in [
                (ns.as_str(), "eth0"),
                (self.main.ns.as_str(), outer.as_str()),
            ] {
                // Fails harmlessly where nothing was set; what counts is the read-back.
                run(
                    "ip",
                    &[
                        "netns", "exec", where_, "tc", "qdisc", "del", "dev", dev, "root",
                    ],
                );
                let left = root_qdisc(where_, dev);
                assert!(
                    !left.contains("htb"),
                    "{dev} in {where_} is still shaped: {left}"
                );
            }
        }
    }

    /// A node on the main segment.
    pub fn node(&mut self, name: &str) -> Node {
        let ns = Netns::new(name);
        let a = self.main.attach_families(&ns, true);
        let mut n = self.make_node(name, ns, a.ip.unwrap_or(Ipv4Addr::UNSPECIFIED));
        n.ip6 = a.ip6;
        n
    }

    /// A node on the main segment of an [`Lab::internet6`] lab with an IPv6 address
    /// only: no IPv4 route joins it to any other namespace. Its `ip` is unspecified.
    pub fn node_ipv6_only(&mut self, name: &str) -> Node {
        assert!(
            self.main.net6.is_some(),
            "an IPv6-only node needs Lab::internet6"
        );
        let ns = Netns::new(name);
        let a = self.main.attach_families(&ns, false);
        let mut n = self.make_node(name, ns, Ipv4Addr::UNSPECIFIED);
        n.ip6 = a.ip6;
        n
    }

    /// A router on the main segment doing NAT for the LAN `lan_prefix`.0/24.
    pub fn router(&mut self, name: &str, lan_prefix: [u8; 3]) -> Router {
        self.router_with(name, lan_prefix, RouterOptions::default())
    }

    /// A router as `options` say (see [`RouterOptions`]).
    pub fn router_with(
        &mut self,
        name: &str,
        lan_prefix: [u8; 3],
        options: RouterOptions,
    ) -> Router {
        let ipv6 = options.ipv6 || options.ipv6_only;
        assert!(
            !ipv6 || self.main.net6.is_some(),
            "a router with IPv6 needs Lab::internet6"
        );
        let ns = Netns::new(name);
        let wan = self.main.attach_families(&ns, !options.ipv6_only);
        let wan_ip = wan.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        must(
            "ip",
            &["-n", &ns.name, "link", "add", "lan", "type", "bridge"],
        );
        must(
            "ip",
            &[
                "-n",
                &ns.name,
                "link",
                "set",
                "lan",
                "mtu",
                &self.mtu.to_string(),
            ],
        );
        let gw = Ipv4Addr::new(lan_prefix[0], lan_prefix[1], lan_prefix[2], 1);
        must(
            "ip",
            &[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                "lan",
            ],
        );
        must("ip", &["-n", &ns.name, "link", "set", "lan", "up"]);
        let o = ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(o.status.success());
        let mut masquerade = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "eth0",
            "-j",
            "MASQUERADE",
        ];
        if options.cgn {
            // A random port per destination: where the host saw a member is no port
            // another member can reach it at.
            masquerade.push("--random");
        }
        let o = ns.exec(&masquerade);
        assert!(
            o.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if options.cgn {
            // Nothing new comes in to the LAN either (MASQUERADE alone forwards nothing
            // unsolicited; this says it in the rules).
            must(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns.name,
                    "iptables",
                    "-A",
                    "FORWARD",
                    "-i",
                    "eth0",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW,INVALID",
                    "-j",
                    "DROP",
                ],
            );
        }
        // A home router's usual firewall: nothing new comes in to the router itself. Without
        // it, a peer's early knock leaves a conntrack entry on the router that makes
        // MASQUERADE pick another port for the answer, and hole punching never meets.
        let o = ns.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-i",
            "eth0",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
        assert!(
            o.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let net6 = ipv6.then_some(u16::from(lan_prefix[2]));
        let gw6 = net6.map(|n| lab_ipv6(n, 1));
        if let (Some(n), Some(gw6), Some(wan6)) = (net6, gw6, wan.ip6) {
            ipv6_router(&ns, gw6);
            self.main
                .route6(format!("{}/64", lab_ipv6(n, 0)), wan6, &ns.name);
        }
        let lan = Segment {
            ns: ns.name.clone(),
            bridge: "lan".into(),
            prefix: lan_prefix,
            next: 10,
            gateway: Some(gw),
            net6,
            gateway6: gw6,
            routes6: Vec::new(),
            mtu: self.mtu,
            attached: Vec::new(),
            // A home LAN is near.
            one_way: Duration::ZERO,
            delays: Vec::new(),
        };
        Router {
            ns,
            wan_ip,
            wan_ip6: wan.ip6,
            lan,
        }
    }

    /// A node on a router's LAN.
    pub fn node_behind(&mut self, router: &mut Router, name: &str) -> Node {
        let ns = Netns::new(name);
        let a = router.lan.attach_families(&ns, true);
        let mut n = self.make_node(name, ns, a.ip.unwrap_or(Ipv4Addr::UNSPECIFIED));
        n.ip6 = a.ip6;
        n
    }

    fn make_node(&mut self, name: &str, ns: Netns, ip: Ipv4Addr) -> Node {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let config = dir.join("watchalong.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"{name}\"\nstate_dir = \"{}\"\n\n[tunnel]\nmtu = {}\n\n[control]\nsocket = \"{}\"\n\n[log]\nlevel = \"debug\"\n\n[watch]\nport = 0\n",
                dir.join("state").display(),
                self.mtu - 80,
                dir.join("control.sock").display()
            ),
        )
        .expect("config");
        Node {
            name: name.to_string(),
            ns,
            ip,
            ip6: None,
            dir,
            config,
            daemon: None,
            runs: 0,
            bin: PathBuf::from(BIN),
        }
    }
}

/// The lab of DESIGN.md's transfer cases: a host and a distant node on the lab internet,
/// s1a and s1b behind the NAT router r1. Nothing runs yet: shares go in first.
pub struct SiteLab {
    // Declared in drop order: daemons first, then the router, then the namespaces' lab.
    pub host: Node,
    pub distant: Node,
    pub s1a: Node,
    pub s1b: Node,
    pub r1: Router,
    pub lab: Lab,
}

impl SiteLab {
    pub fn new() -> SiteLab {
        let mut lab = Lab::internet();
        let host = lab.node("host");
        let distant = lab.node("distant");
        let mut r1 = lab.router("r1", [192, 168, 1]);
        let s1a = lab.node_behind(&mut r1, "s1a");
        let s1b = lab.node_behind(&mut r1, "s1b");
        SiteLab {
            host,
            distant,
            s1a,
            s1b,
            r1,
            lab,
        }
    }

    /// Starts every daemon, joins the others through links from the host, and waits
    /// until every pair has a direct path.
    pub fn start(&mut self, deadline: Duration) {
        for n in [
            &mut self.host,
            &mut self.distant,
            &mut self.s1a,
            &mut self.s1b,
        ] {
            n.start();
        }
        for n in [&self.distant, &self.s1a, &self.s1b] {
            join(&self.host, n);
        }
        wait_for_direct_mesh(&[&self.host, &self.distant, &self.s1a, &self.s1b], deadline);
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    /// Unspecified for a node with IPv6 only.
    pub ip: Ipv4Addr,
    /// Its global IPv6 address, in a lab with IPv6.
    pub ip6: Option<Ipv6Addr>,
    pub dir: PathBuf,
    pub config: PathBuf,
    daemon: Option<Child>,
    runs: usize,
    /// The program run as daemon and CLI: this build's, unless a benchmark compares
    /// another (an older build) in the same run.
    pub bin: PathBuf,
}

impl Node {
    /// Offers a new read-only share called `name` (before `start`); returns its folder.
    pub fn share(&self, name: &str) -> PathBuf {
        self.add_share(name, "read-only")
    }

    /// Offers a new read-write share called `name`, kept in sync (before `start`).
    pub fn share_rw(&self, name: &str) -> PathBuf {
        self.add_share(name, "read-write")
    }

    fn add_share(&self, name: &str, mode: &str) -> PathBuf {
        let dir = self.dir.join(format!("share-{name}"));
        std::fs::create_dir_all(&dir).expect("share dir");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .expect("config");
        writeln!(
            f,
            "\n[[share]]\nname = \"{name}\"\npath = \"{}\"\nmode = \"{mode}\"",
            dir.display()
        )
        .expect("config");
        dir
    }

    /// Limits what this node sends to `mbit` Mbit/s (tbf on its uplink).
    pub fn shape(&self, mbit: u32) {
        self.shape_kbit(mbit * 1000);
    }

    /// Limits what this node sends to `kbit` kbit/s (tbf on its uplink).
    pub fn shape_kbit(&self, kbit: u32) {
        let rate = format!("{kbit}kbit");
        let o = self.ns.exec(&[
            "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "256kb",
            "latency", "500ms",
        ]);
        assert!(
            o.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("daemon-{}.log", self.runs))
    }

    /// Starts the daemon and waits until its control socket answers.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "{} already runs", self.name);
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name])
            .arg(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.daemon = Some(cmd.spawn().expect("spawn daemon"));
        let up = wait_until(Duration::from_secs(30), || {
            self.cli(&["status", "--json"]).status.success()
        });
        assert!(
            up,
            "{}'s daemon did not answer on its control socket:\n{}",
            self.name,
            self.log()
        );
    }

    /// Serves metrics on a free loopback port (before `start`); the log names it.
    pub fn enable_metrics(&self) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .expect("config");
        writeln!(f, "\n[metrics]\nlisten = \"127.0.0.1:0\"").expect("config");
    }

    /// Where the daemon serves its metrics, once its log says so.
    pub fn metrics_url(&self) -> Option<String> {
        self.log().lines().find_map(|l| {
            let at = l.find("metrics at ")?;
            Some(l[at + "metrics at ".len()..].trim().to_string())
        })
    }

    pub fn log(&self) -> String {
        let mut all = String::new();
        for i in 1..=self.runs {
            let p = self.dir.join(format!("daemon-{i}.log"));
            all.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        all
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cli")
    }

    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cli");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("cli output")
    }

    /// Runs the CLI and returns its stdout, failing the test with its stderr otherwise.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{} {args:?} failed: {}\n--- daemon log ---\n{}",
            self.name,
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `status --json`, read as the control API's reply type.
    pub fn status(&self) -> StatusReply {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status json")
    }

    /// `peers --json`, read as the control API's reply type.
    pub fn peers(&self) -> PeersReply {
        serde_json::from_str(&self.ok(&["peers", "--json"])).expect("peers json")
    }

    /// This node's WireGuard key (base64), as `status` shows it.
    pub fn public_key(&self) -> String {
        self.status().node.public_key
    }

    /// A fresh single-use link from this node.
    pub fn link(&self, extra: &[&str]) -> String {
        let mut args = vec!["link"];
        args.extend_from_slice(extra);
        self.ok(&args)
            .lines()
            .next()
            .expect("link line")
            .to_string()
    }

    pub fn peer<'a>(status: &'a StatusReply, name: &str) -> Option<&'a PeerStatus> {
        status.peers.iter().find(|p| p.name == name)
    }

    pub fn ping(&self, addr: &str) -> bool {
        self.ns
            .exec(&["ping", "-c", "1", "-W", "1", addr])
            .status
            .success()
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the daemon to exit.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.daemon.take().expect("daemon running");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > end {
                let _ = c.kill();
                panic!(
                    "{} did not stop within 30 s of SIGTERM:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- {} daemon log ---\n{}", self.name, self.log());
        }
    }
}

/// The VPN address of the node `status` describes.
pub fn vpn_address(status: &StatusReply) -> String {
    status.node.address.to_string()
}

/// The member called `name` in a `peers` reply.
pub fn member<'a>(peers: &'a PeersReply, name: &str) -> Option<&'a PeerView> {
    peers.peers.iter().find(|p| p.name == name)
}

/// Waits until every node lists every other, with a site and a direct (or LAN) path.
pub fn wait_for_direct_mesh(nodes: &[&Node], deadline: Duration) {
    for n in nodes {
        let mut last = None;
        let ok = wait_until(deadline, || {
            let p = n.peers();
            let whole = p.peers.len() == nodes.len() - 1
                && p.site.is_some()
                && p.peers
                    .iter()
                    .all(|x| x.site.is_some() && (x.path == "direct" || x.path == "lan"));
            last = Some(p);
            whole
        });
        assert!(
            ok,
            "{} never saw the whole group directly: {last:#?}",
            n.name
        );
    }
}

/// Joins `n` to `host`'s group with a fresh link.
pub fn join(host: &Node, n: &Node) {
    let link = host.link(&[]);
    n.ok(&["join", &link]);
}

/// Writes `size` pseudo-random bytes derived from `seed` (streamed, so a GiB is fine) and
/// returns their BLAKE3.
pub fn write_random(path: &Path, size: u64, seed: &str) -> blake3::Hash {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create");
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut hash = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    hash.finalize()
}

/// Random datagrams shaped as WireGuard handshake initiations (type 1, 148 bytes), sent
/// from `ns` to `to` at `pps` for `secs`; returns how many were sent.
pub fn flood_handshakes(
    ns: &str,
    to: std::net::SocketAddr,
    pps: u64,
    secs: u64,
) -> std::thread::JoinHandle<u64> {
    spawn_in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut packet = [0u8; 148];
        let mut xof = blake3::Hasher::new().update(b"flood").finalize_xof();
        let start = Instant::now();
        let mut sent = 0u64;
        // Paced by what is due so far, so a slow moment is made up for after it and the
        // whole run carries `pps` × `secs` datagrams.
        let total = pps * secs;
        while sent < total && start.elapsed() < Duration::from_secs(secs + 5) {
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
            if sent >= due.min(total) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let target = due.min(total);
            while sent < target {
                xof.fill(&mut packet);
                packet[..4].copy_from_slice(&[1, 0, 0, 0]);
                if sock.send_to(&packet, to).is_err() {
                    // The socket's buffer is full: the next round tries again.
                    break;
                }
                sent += 1;
            }
        }
        sent
    })
}

/// CPU time a process used so far, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th of them.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Round trips of `count` pings, 20 ms apart, from `from` to `addr`.
pub struct PingStats {
    pub avg: f64,
    pub p99: f64,
    pub worst: f64,
    /// The share of pings that got no answer.
    pub loss: f64,
}

pub fn ping_stats(from: &Node, addr: &str, count: usize) -> PingStats {
    let o = from.ns.exec(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.02",
        "-W",
        "1",
        addr,
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(|x, y| x.total_cmp(y));
    PingStats {
        avg: rtts.iter().sum::<f64>() / rtts.len().max(1) as f64,
        p99: rtts
            .get((rtts.len() * 99 / 100).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::INFINITY),
        worst: rtts.last().copied().unwrap_or(f64::INFINITY),
        loss: 1.0 - rtts.len() as f64 / count.max(1) as f64,
    }
}

/// Sends `bytes` of pseudo-random data over one TCP connection from `from`'s namespace
/// to a listener on `to_addr` in `to`'s; returns the BLAKE3 of what was sent and of what
/// arrived.
pub fn tcp_transfer(
    from: &Node,
    to: &Node,
    to_addr: &str,
    bytes: usize,
) -> (blake3::Hash, blake3::Hash) {
    use std::io::{Read, Write};
    const DEADLINE: Duration = Duration::from_secs(30);
    let addr = to_addr.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(&to.ns.name, move || {
        let l = std::net::TcpListener::bind((addr.as_str(), 0)).expect("bind on VPN address");
        tx.send(l.local_addr().expect("addr")).expect("send addr");
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.finalize()
    });
    let server_addr = rx.recv_timeout(DEADLINE).expect("server address");
    let sent = in_netns(&from.ns.name, move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&server_addr, DEADLINE).expect("connect over VPN");
        s.set_write_timeout(Some(DEADLINE)).expect("timeout");
        let mut h = blake3::Hasher::new();
        let mut block = vec![0u8; 65536];
        let mut left = bytes;
        let mut x = 1u32;
        while left > 0 {
            for b in block.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (x >> 24) as u8;
            }
            let n = left.min(block.len());
            s.write_all(&block[..n]).expect("write");
            h.update(&block[..n]);
            left -= n;
        }
        h.finalize()
    });
    let received = server.join().expect("server thread");
    (sent, received)
}
