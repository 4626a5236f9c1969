//! Safe to expose: strangers on the internet, on the LAN and on a member's own machine try
//! what an attacker would, against daemons in namespaces, and get nothing: no file read or
//! changed, no stalled tunnel, no exhausted server.

mod common;

use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// One attack at a time: the flood test reads latencies, which a neighbour test's load on
/// the same two cores would distort.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}
const NOBODY: &str = "65534";

/// Runs `args` in `node`'s namespace as the unprivileged user `nobody`: another person
/// logged into that member, who can send from its VPN address but cannot read its keys.
fn as_nobody(node: &Node, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "setpriv",
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
    ];
    all.extend_from_slice(args);
    node.ns.exec(&all)
}

/// `curl` as nobody: the HTTP status, or 0 when no answer came.
fn curl_as_nobody(node: &Node, method: &str, url: &str, body: &str) -> u16 {
    let o = as_nobody(
        node,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            "-X",
            method,
            "--data-binary",
            body,
            url,
        ],
    );
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn a_local_user_on_a_member_cannot_read_change_or_gossip_as_the_member() {
    if !root_or_skip("a_local_user_on_a_member_cannot_read_change_or_gossip_as_the_member") {
        return;
    }
    let _alone = alone();
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let ro = host.share("s");
    std::fs::write(ro.join("private.txt"), b"only for the group").unwrap();
    let rw = host.share_rw("rw");
    let rw_a = a.share_rw("rw");
    std::fs::write(rw.join("keep.txt"), b"do not delete me").unwrap();
    host.start();
    a.start();
    join(&host, &a);
    let host_vpn = vpn_address(&host.status());
    assert!(
        wait_until(DEADLINE, || rw_a.join("keep.txt").exists()),
        "sync never ran"
    );
    let ids = |n: &Node| {
        let key = n.public_key();
        let k = watchalong::group::identity::key_from_base64(&key).unwrap();
        watchalong::group::identity::key_id(&k)
    };
    let (host_id, a_id) = (ids(&host), ids(&a));

    let base = format!("http://{host_vpn}:51874");
    let hash = blake3::hash(b"only for the group").to_hex().to_string();
    let host_key = host.public_key();
    let source: String = form_urlencoded(&host_key);
    // A deletion that would win against the host's version if it were believed.
    let deletion = serde_json::json!({
        "share": "rw",
        "versions": [{
            "path": "keep.txt",
            "vv": { host_id.clone(): 1000, a_id.clone(): 1000 },
            "deleted": true,
            "mtime": watchalong::base::clock::now_secs() + 10,
            "node": a_id,
            "content": "",
            "size": 0,
        }],
        "ask_back": false,
    })
    .to_string();
    let attempts = [
        ("GET", format!("{base}/v1/file?share=s&path=private.txt"), String::new()),
        ("GET", format!("{base}/v1/ls?share=s&path="), String::new()),
        ("GET", format!("{base}/v1/shares"), String::new()),
        ("GET", format!("{base}/v1/manifest?share=s&path=private.txt"), String::new()),
        (
            "GET",
            format!(
                "{base}/v1/chunk?source={source}&share=s&path=private.txt&index=0&hash={hash}&transfer=x&len=18"
            ),
            String::new(),
        ),
        ("POST", format!("{base}/v1/sync"), deletion),
        (
            "POST",
            format!("{base}/v1/room"),
            r#"{"file":"s/private.txt","state":{"playing":true}}"#.to_string(),
        ),
    ];
    let refused_before = host.status().node.chunks.refused_requests;
    for (method, url, body) in &attempts {
        let status = curl_as_nobody(&a, method, url, body);
        assert_eq!(status, 401, "nobody on a: {method} {url} answered {status}");
    }
    let refused = host.status().node.chunks.refused_requests;
    assert!(
        refused >= refused_before + attempts.len() as u64,
        "the host counted {} refusals for {} attempts",
        refused - refused_before,
        attempts.len()
    );

    // A gossip datagram from a's address: a digest that asks the host for everything.
    let gossip_before = a.status().node.refused_gossip;
    let datagram = r#"{"type":"digest","members":{},"announcements":{}}"#;
    let o = as_nobody(
        &a,
        &[
            "bash",
            "-c",
            &format!("printf '%s' '{datagram}' > /dev/udp/{host_vpn}/51873"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        wait_until(DEADLINE, || a.status().node.refused_gossip > gossip_before),
        "a's daemon did not refuse the local user's gossip datagram"
    );

    // The group still works, and the host's file outlives a round of sync.
    std::fs::write(rw_a.join("later.txt"), b"from a").unwrap();
    assert!(
        wait_until(DEADLINE, || rw.join("later.txt").exists()),
        "sync stopped working"
    );
    assert_eq!(
        std::fs::read(rw.join("keep.txt")).unwrap(),
        b"do not delete me"
    );
    assert!(rw_a.join("keep.txt").exists());
    // And a's own daemon, which holds the key, is still served.
    let listing = a.ok(&["ls", "s"]);
    assert!(listing.contains("private.txt"), "{listing}");
}

fn form_urlencoded(s: &str) -> String {
    s.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

#[test]
fn a_handshake_flood_from_the_internet_leaves_a_members_ping_fast() {
    if !root_or_skip("a_handshake_flood_from_the_internet_leaves_a_members_ping_fast") {
        return;
    }
    let _alone = alone();
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let stranger = lab.node("stranger");
    host.start();
    a.start();
    join(&host, &a);
    let host_vpn = vpn_address(&host.status());
    assert!(wait_until(DEADLINE, || a.ping(&host_vpn)));

    let target = std::net::SocketAddr::from((host.ip, 51871));
    let pid = host.pid().unwrap();
    let (cpu_before, t0) = (cpu_ticks(pid), Instant::now());
    let flood = flood_handshakes(&stranger.ns.name, target, 20_000, 10);
    // 500 pings, 20 ms apart: the ten seconds of the flood.
    let ping = ping_stats(&a, &host_vpn, 500);
    let sent = flood.join().unwrap();
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / 100.0 / t0.elapsed().as_secs_f64();
    let (loss, p99) = (ping.loss, ping.p99);
    let refused = host.status().node.handshakes_refused;
    let (avg, worst) = (ping.avg, ping.worst);
    eprintln!(
        "flood: {sent} datagrams sent, {refused} refused by the host (daemon CPU {:.0}% of a core); ping loss {:.2}%, avg {avg:.2} ms, p99 {p99:.2} ms, worst {worst:.2} ms",
        cpu * 100.0,
        loss * 100.0
    );
    assert!(sent >= 150_000, "the flood sent only {sent} datagrams");
    assert!(
        refused >= sent / 2,
        "the host refused {refused} of {sent}: the flood did not reach it"
    );
    assert!(
        loss < 0.01,
        "ping lost {:.2}% under the flood",
        loss * 100.0
    );
    assert!(p99 < 50.0, "ping p99 {p99:.2} ms under the flood");
}

/// Opens `n` TCP connections from `ns` to `to` and keeps them open, idle, until the
/// returned sender is dropped; returns how many connected.
fn hold_idle_connections(
    ns: &str,
    to: std::net::SocketAddr,
    n: usize,
) -> (
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<usize>,
) {
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (count_tx, count_rx) = std::sync::mpsc::channel();
    spawn_in_netns(ns, move || {
        let mut held = Vec::new();
        for _ in 0..n {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                held.push(s);
            }
        }
        let _ = count_tx.send(held.len());
        let _ = stop_rx.recv();
        drop(held);
    });
    (stop_tx, count_rx)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit with a live struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn thousands_of_idle_connections_from_a_stranger_and_a_member_starve_nothing() {
    if !root_or_skip("thousands_of_idle_connections_from_a_stranger_and_a_member_starve_nothing") {
        return;
    }
    let _alone = alone();
    raise_fd_limit();
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let stranger = lab.node("stranger");
    let films = host.share("films");
    let hash = write_random(&films.join("f.bin"), 4 << 20, "idle");
    host.start();
    a.start();
    join(&host, &a);
    let host_vpn = vpn_address(&host.status());
    assert!(wait_until(DEADLINE, || a.ping(&host_vpn)));
    // a knows the host offers films (its announcement came by gossip) before the crowd.
    assert!(wait_until(DEADLINE, || a
        .cli(&["ls", "films"])
        .status
        .success()));
    let lines_before = host.log().lines().count();

    let relay = std::net::SocketAddr::from((host.ip, 51875));
    let node_port: std::net::SocketAddr = format!("{host_vpn}:51874").parse().unwrap();
    let (stop_stranger, stranger_count) = hold_idle_connections(&stranger.ns.name, relay, 2000);
    let (stop_member, member_count) = hold_idle_connections(&a.ns.name, node_port, 2000);
    let opened = (
        stranger_count.recv_timeout(DEADLINE).unwrap(),
        member_count.recv_timeout(DEADLINE).unwrap(),
    );
    eprintln!("idle connections opened: {opened:?}");

    // With every connection still held open by the attackers:
    let status = host.status();
    assert!(status.node.chunks.refused_connections > 0);
    let listing = a.ok(&["ls", "films"]);
    assert!(listing.contains("f.bin"), "{listing}");
    let dest = a.dir.join("f.bin");
    a.ok(&["get", "films/f.bin", dest.to_str().unwrap()]);
    assert_eq!(blake3::hash(&std::fs::read(&dest).unwrap()), hash);

    drop((stop_stranger, stop_member));
    let grown = host.log().lines().count() - lines_before;
    assert!(
        grown < 200,
        "the host's log grew by {grown} lines:\n{}",
        host.log()
    );
}

#[test]
fn a_case_4_transfer_shows_nothing_of_the_file_on_the_lan() {
    if !root_or_skip("a_case_4_transfer_shows_nothing_of_the_file_on_the_lan") {
        return;
    }
    let _alone = alone();
    let mut site = SiteLab::new();
    let films = site.s1b.share("films");
    let marker = "WATCHALONG-MARKER-7f3a9c";
    let content: String = (0..40_000).map(|i| format!("{marker}-{i}\n")).collect();
    std::fs::write(films.join("m.txt"), &content).unwrap();
    site.start(DEADLINE);
    let pcap = site.lab.dir.path().join("lan.pcap");
    let mut dump = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.s1a.ns.name,
            "tcpdump",
            "-i",
            "eth0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump");
    assert!(
        wait_until(DEADLINE, || std::fs::metadata(&pcap)
            .is_ok_and(|m| m.len() > 0)),
        "tcpdump never started"
    );
    let plan: watchalong::control::PlanReply =
        serde_json::from_str(&site.s1a.ok(&["plan", "films/m.txt", "--json"])).unwrap();
    assert_eq!(plan.route.case, 4, "{plan:#?}");
    let dest = site.s1a.dir.join("m.txt");
    site.s1a.ok(&["get", "films/m.txt", dest.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), content);
    // Let tcpdump write what it holds, then stop it.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    let _ = dump.wait();
    let captured = std::fs::read(&pcap).unwrap();
    let lan_bytes = captured.len();
    // The capture misses a little under load; most of the file's bytes must be there.
    assert!(
        lan_bytes > content.len() / 2,
        "the capture holds {lan_bytes} bytes: the transfer did not cross s1a's LAN link"
    );
    for needle in [marker.as_bytes(), b"m.txt", b"films"] {
        assert!(
            !captured.windows(needle.len()).any(|w| w == needle),
            "{} is readable on the LAN",
            String::from_utf8_lossy(needle)
        );
    }
}

/// What the fake member's node server answers for one file.
#[derive(Clone, Copy)]
enum Lie {
    /// A manifest whose chunks are 2^36 bytes each.
    HugeChunks,
    /// A manifest whose chunk list does not fit its size.
    WrongCount,
    /// A sound manifest, and a chunk answer of 1 GiB.
    EndlessChunk,
}

fn lie_for(path: &str) -> Option<Lie> {
    if path.contains("huge-chunks") {
        Some(Lie::HugeChunks)
    } else if path.contains("wrong-count") {
        Some(Lie::WrongCount)
    } else if path.contains("endless") {
        Some(Lie::EndlessChunk)
    } else {
        None
    }
}

/// Stops the lying server when dropped: the flag, then a connection to wake its accept.
struct Liar {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ns: String,
    port: u16,
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let port = self.port;
        let _ = in_netns(&self.ns, move || {
            std::net::TcpStream::connect(("127.0.0.1", port))
        });
    }
}

/// A node server that lies, on `port` in namespace `ns`, until the returned guard drops.
/// It answers without checking anything: only what it sends matters here.
fn serve_lies(ns: &str, port: u16, share: &'static str) -> Liar {
    let listener = in_netns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::{BufRead, BufReader, Write};
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let target = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let Some(lie) = lie_for(&target) else {
                    let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                    return;
                };
                let path = target
                    .split(['?', '&'])
                    .find_map(|kv| kv.strip_prefix("path="))
                    .unwrap_or("x")
                    .to_string();
                if target.starts_with("/v1/manifest") {
                    let zero = blake3::hash(&[0u8; 262_144]).to_hex().to_string();
                    let (size, chunk_size, count) = match lie {
                        Lie::HugeChunks => (1u64 << 37, 1u64 << 36, 2),
                        Lie::WrongCount => (1 << 20, 262_144, 40_000),
                        Lie::EndlessChunk => (1 << 20, 262_144, 4),
                    };
                    let body = serde_json::json!({
                        "share": share, "path": path, "size": size, "mtime": 1,
                        "mode": 0o4777, "chunk_size": chunk_size,
                        "chunks": vec![zero; count],
                    })
                    .to_string();
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                } else if target.starts_with("/v1/chunk") {
                    // 1 GiB announced, and zeros until the reader gives up.
                    let _ =
                        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n");
                    let zeros = vec![0u8; 1 << 16];
                    for _ in 0..(1 << 14) {
                        if conn.write_all(&zeros).is_err() {
                            break;
                        }
                    }
                } else {
                    let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    Liar {
        stop,
        ns: ns.to_string(),
        port,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_fake_member_lying_about_manifests_and_chunks_cannot_crash_or_bloat_the_daemon() {
    if !root_or_skip(
        "a_fake_member_lying_about_manifests_and_chunks_cannot_crash_or_bloat_the_daemon",
    ) {
        return;
    }
    let _alone = alone();
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut liar = lab.node("liar");
    let evil = liar.share("evil");
    for f in ["huge-chunks.bin", "wrong-count.bin", "endless.bin"] {
        std::fs::write(evil.join(f), b"the real bytes are never asked for").unwrap();
    }
    host.start();
    liar.start();
    join(&host, &liar);
    let liar_vpn = vpn_address(&liar.status());
    assert!(wait_until(DEADLINE, || host.ping(&liar_vpn)));
    // The liar's kernel hands the node port to the lying server instead of its daemon.
    let o = liar.ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        "wa0",
        "-p",
        "tcp",
        "--dport",
        "51874",
        "-j",
        "REDIRECT",
        "--to-ports",
        "61874",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _lies = serve_lies(&liar.ns.name, 61874, "evil");
    assert!(wait_until(DEADLINE, || host.ok(&["ls"]).contains("evil")));

    let pid = host.pid().unwrap();
    for file in ["huge-chunks.bin", "wrong-count.bin", "endless.bin"] {
        let dest = host.dir.join(file);
        let o = host.cli(&["get", &format!("evil/{file}"), dest.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        eprintln!("get {file}: {}", err.trim());
        assert!(!o.status.success(), "the get of {file} succeeded");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "not one clear error line: {err}");
        assert!(!dest.exists(), "{file} was written");
        // Still up, and small.
        host.status();
        let rss = rss_kib(pid);
        eprintln!("host RSS after {file}: {rss} KiB");
        assert!(
            rss < 64 * 1024,
            "the host's RSS reached {rss} KiB after {file}"
        );
    }
}
