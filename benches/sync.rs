//! Folder sync benchmark, watchalong beside Syncthing on the same namespaces. Root needed.
//!
//!     sudo cargo bench --bench sync
//!
//! Lab: a host and a distant node on the lab internet, s1a and s1b behind one NAT router,
//! links unshaped. For each system in turn (the other one stopped): propagation time of
//! a new 1 KiB file and of a 100-byte append (p50, p90, max over 50 runs) from s1a to a
//! nearby member (s1b) and to a distant one, from the write returning to the content
//! matching at the receiver (polled every ms); then the time for one 256 MiB file to
//! reach both; then 1 KiB inserted in the middle of that file (saved as an editor saves:
//! written beside it and renamed over it), with the bytes s1a's interface sent until
//! both hold the new version; RSS of every daemon idle and its high-water mark at the end. Syncthing is
//! Debian's, with its file watcher at the minimum delay (1 s), discovery, relays and NAT
//! traversal off and every device given its address.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// A field of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The same summed over `pid` and its children: Syncthing runs as a monitor process and
/// the child that does the work (started from any of the monitor's threads).
fn tree_kib(pid: u32, field: &str) -> u64 {
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        children += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.push(' ');
    }
    proc_kib(pid, field)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(|c| tree_kib(c, field))
            .sum::<u64>()
}

fn mib(kib: &[u64]) -> String {
    let v: Vec<String> = kib
        .iter()
        .map(|k| format!("{:.1}", *k as f64 / 1024.0))
        .collect();
    v.join(" / ")
}

/// How long after now each of `paths` takes to hold `want` (polled every ms).
fn arrivals(paths: &[&Path], want: &[u8], deadline: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut got: Vec<Option<Duration>> = vec![None; paths.len()];
    while got.iter().any(|g| g.is_none()) {
        assert!(start.elapsed() < deadline, "a member never got the change");
        for (i, p) in paths.iter().enumerate() {
            if got[i].is_none() && std::fs::read(p).map(|b| b == want).unwrap_or(false) {
                got[i] = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    got.into_iter().flatten().collect()
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_millis();
    format!(
        "{} ms | {} ms | {} ms",
        p(0.5),
        p(0.9),
        v.last().unwrap().as_millis()
    )
}

/// One system's figures.
struct Figures {
    create_near: Vec<Duration>,
    create_far: Vec<Duration>,
    append_near: Vec<Duration>,
    append_far: Vec<Duration>,
    big: Duration,
    /// The insertion: time to both, and bytes the writer's node sent meanwhile.
    insert: Duration,
    insert_sent: u64,
    idle_kib: Vec<u64>,
    peak_kib: Vec<u64>,
}

/// The runs, from `src` to `nearby` and `far`, with `pids` the daemons to weigh.
fn measure(src: &Path, nearby: &Path, far: &Path, pids: &[u32], sent: &dyn Fn() -> u64) -> Figures {
    let idle_kib = pids.iter().map(|p| tree_kib(*p, "VmRSS:")).collect();
    let mut f = Figures {
        create_near: Vec::new(),
        create_far: Vec::new(),
        append_near: Vec::new(),
        append_far: Vec::new(),
        big: Duration::ZERO,
        insert: Duration::ZERO,
        insert_sent: 0,
        idle_kib,
        peak_kib: Vec::new(),
    };
    for i in 0..50 {
        let name = format!("f{i}.txt");
        let data: Vec<u8> = (0..1024u32).map(|j| (i as u32 * 7 + j) as u8).collect();
        std::fs::write(src.join(&name), &data).unwrap();
        let t = arrivals(
            &[&nearby.join(&name), &far.join(&name)],
            &data,
            Duration::from_secs(60),
        );
        f.create_near.push(t[0]);
        f.create_far.push(t[1]);
        let mut more = data.clone();
        more.extend_from_slice(&[b'x'; 100]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join(&name))
            .unwrap();
        std::io::Write::write_all(&mut file, &[b'x'; 100]).unwrap();
        drop(file);
        let t = arrivals(
            &[&nearby.join(&name), &far.join(&name)],
            &more,
            Duration::from_secs(60),
        );
        f.append_near.push(t[0]);
        f.append_far.push(t[1]);
    }
    // Written beside the folder and moved in, so neither system sees it half-written.
    let size: u64 = 256 << 20;
    let outside = src.parent().unwrap().join("big.tmp");
    let want = write_random(&outside, size, "throughput");
    let start = Instant::now();
    std::fs::rename(&outside, src.join("big.bin")).unwrap();
    for dest in [nearby, far] {
        let p = dest.join("big.bin");
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "256 MiB never arrived"
            );
            let full = std::fs::metadata(&p)
                .map(|m| m.len() == size)
                .unwrap_or(false);
            if full && blake3::hash(&std::fs::read(&p).unwrap_or_default()) == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    f.big = start.elapsed();
    let mut bytes = std::fs::read(src.join("big.bin")).unwrap();
    let middle = bytes.len() / 2;
    bytes.splice(middle..middle, [b'+'; 1024]);
    let beside = src.parent().unwrap().join("big.new");
    std::fs::write(&beside, &bytes).unwrap();
    let before = sent();
    let start = Instant::now();
    std::fs::rename(&beside, src.join("big.bin")).unwrap();
    arrivals(
        &[&nearby.join("big.bin"), &far.join("big.bin")],
        &bytes,
        Duration::from_secs(600),
    );
    f.insert = start.elapsed();
    f.insert_sent = sent() - before;
    f.peak_kib = pids.iter().map(|p| tree_kib(*p, "VmHWM:")).collect();
    f
}

fn report(system: &str, f: Figures) {
    println!("\n### {system}\n");
    println!("| what | to | p50 | p90 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| new 1 KiB file | nearby | {} |",
        percentiles(f.create_near)
    );
    println!(
        "| new 1 KiB file | distant | {} |",
        percentiles(f.create_far)
    );
    println!(
        "| 100-byte append | nearby | {} |",
        percentiles(f.append_near)
    );
    println!(
        "| 100-byte append | distant | {} |",
        percentiles(f.append_far)
    );
    println!(
        "\n256 MiB to both: {:.1} s ({:.0} Mbit/s per receiver)",
        f.big.as_secs_f64(),
        256.0 * 8.388_608 / f.big.as_secs_f64()
    );
    println!(
        "1 KiB inserted in its middle, to both: {:.1} s, {:.2} MiB sent by the writer's node",
        f.insert.as_secs_f64(),
        f.insert_sent as f64 / 1_048_576.0
    );
    println!(
        "RSS (host, distant, s1a, s1b; for Syncthing its two processes summed) idle: {} MiB; \
         high-water mark at the end: {} MiB",
        mib(&f.idle_kib),
        mib(&f.peak_kib)
    );
}

/// A Syncthing device in `n`'s namespace, sharing `folder` as `docs`.
struct Syncthing {
    home: PathBuf,
    folder: PathBuf,
    id: String,
    child: Option<Child>,
}

impl Syncthing {
    fn generate(n: &Node) -> Syncthing {
        let home = n.dir.join("syncthing");
        let out = run(
            "syncthing",
            &[
                "generate",
                &format!("--home={}", home.display()),
                "--no-default-folder",
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let id = text
            .lines()
            .find_map(|l| l.split("Device ID: ").nth(1))
            .expect("syncthing printed its device ID")
            .trim()
            .to_string();
        let folder = n.dir.join("st-docs");
        std::fs::create_dir_all(folder.join(".stfolder")).unwrap();
        Syncthing {
            home,
            folder,
            id,
            child: None,
        }
    }

    /// Writes the config: every device known with the address it can be dialled at.
    fn configure(&self, devices: &[(&Syncthing, Option<std::net::Ipv4Addr>)]) {
        let mut xml = String::from("<configuration version=\"36\">\n");
        xml += &format!(
            "<folder id=\"docs\" label=\"docs\" path=\"{}\" type=\"sendreceive\" \
             rescanIntervalS=\"3600\" fsWatcherEnabled=\"true\" fsWatcherDelayS=\"1\">\n",
            self.folder.display()
        );
        for (d, _) in devices {
            xml += &format!("  <device id=\"{}\"></device>\n", d.id);
        }
        xml += "</folder>\n";
        for (d, addr) in devices {
            let addr = addr.map_or("dynamic".to_string(), |a| format!("tcp://{a}:22000"));
            xml += &format!(
                "<device id=\"{}\" compression=\"never\"><address>{addr}</address></device>\n",
                d.id
            );
        }
        xml += "<gui enabled=\"true\" tls=\"false\"><address>127.0.0.1:8384</address>\
                <apikey>bench</apikey></gui>\n<options>\
                <listenAddress>tcp://0.0.0.0:22000</listenAddress>\
                <globalAnnounceEnabled>false</globalAnnounceEnabled>\
                <localAnnounceEnabled>false</localAnnounceEnabled>\
                <relaysEnabled>false</relaysEnabled><natEnabled>false</natEnabled>\
                <urAccepted>-1</urAccepted><startBrowser>false</startBrowser>\
                <crashReportingEnabled>false</crashReportingEnabled>\
                <autoUpgradeIntervalH>0</autoUpgradeIntervalH>\
                <setLowPriority>false</setLowPriority>\
                <reconnectionIntervalS>1</reconnectionIntervalS>\
                </options>\n</configuration>\n";
        std::fs::write(self.home.join("config.xml"), xml).unwrap();
    }

    fn start(&mut self, n: &Node) {
        self.child = Some(n.ns.spawn(
            &[
                "syncthing",
                "serve",
                &format!("--home={}", self.home.display()),
                "--no-browser",
                "--no-restart",
                "--no-upgrade",
            ],
            &n.dir.join("syncthing.log"),
        ));
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for Syncthing {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until a probe file written at `src` is at every one of `dests`.
fn wait_connected(src: &Path, dests: &[&Path], what: &str) {
    std::fs::write(src.join("probe.txt"), what).unwrap();
    let paths: Vec<PathBuf> = dests.iter().map(|d| d.join("probe.txt")).collect();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    arrivals(&refs, what.as_bytes(), Duration::from_secs(180));
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sync benchmark: run it with `cargo bench --bench sync`");
        return;
    }
    if !root_or_skip("bench sync") {
        return;
    }
    if std::process::Command::new("syncthing")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("syncthing is not installed: apt-get install -y syncthing");
        return;
    }
    let mut site = SiteLab::new();
    let roots: Vec<_> = [&site.host, &site.distant, &site.s1a, &site.s1b]
        .iter()
        .map(|n| n.share_rw("docs"))
        .collect();
    // Both programs at their default log level: the lab's nodes log at debug, which
    // costs watchalong what Syncthing (at its default) does not pay.
    for n in [&site.host, &site.distant, &site.s1a, &site.s1b] {
        let text = std::fs::read_to_string(&n.config).unwrap();
        let text = text.replace("level = \"debug\"", "level = \"info\"");
        assert!(text.contains("level = \"info\""), "no log level in {text}");
        std::fs::write(&n.config, text).unwrap();
    }
    site.start(Duration::from_secs(60));
    // Bound first so they go last: the daemons stop before their namespaces do.
    let SiteLab {
        lab: _lab,
        r1: _r1,
        mut host,
        mut distant,
        mut s1a,
        mut s1b,
    } = site;
    wait_connected(&roots[2], &[&roots[1], &roots[3]], "watchalong");
    let pids: Vec<u32> = [&host, &distant, &s1a, &s1b]
        .iter()
        .map(|n| n.pid().unwrap_or(0))
        .collect();
    // By name: the namespace itself stays the node's, which goes before it.
    let s1a_ns = s1a.ns.name.clone();
    let sent = || {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &s1a_ns, "cat"])
            .arg("/sys/class/net/eth0/statistics/tx_bytes")
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u64>()
            .expect("tx_bytes of s1a's eth0")
    };
    let ours = measure(&roots[2], &roots[3], &roots[1], &pids, &sent);
    for n in [&mut host, &mut distant, &mut s1a, &mut s1b] {
        n.kill9();
    }

    let nodes = [&host, &distant, &s1a, &s1b];
    let mut st: Vec<Syncthing> = nodes.iter().map(|n| Syncthing::generate(n)).collect();
    // Public nodes are dialled at their address; s1a and s1b at their LAN addresses by
    // each other, and they dial out to the public ones through the NAT.
    for (i, me) in st.iter().enumerate() {
        let devices: Vec<(&Syncthing, Option<std::net::Ipv4Addr>)> = st
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let addr = match (i, j) {
                    (_, 0) | (_, 1) => Some(nodes[j].ip),
                    (2, 3) | (3, 2) => Some(nodes[j].ip),
                    _ => None,
                };
                (d, addr)
            })
            .collect();
        me.configure(&devices);
    }
    for (s, n) in st.iter_mut().zip(nodes) {
        s.start(n);
    }
    wait_connected(&st[2].folder, &[&st[1].folder, &st[3].folder], "syncthing");
    let pids: Vec<u32> = st.iter().map(Syncthing::pid).collect();
    let theirs = measure(&st[2].folder, &st[3].folder, &st[1].folder, &pids, &sent);

    report("watchalong", ours);
    report("Syncthing (fsWatcherDelayS=1)", theirs);
}
