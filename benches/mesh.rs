//! Membership benchmark (issue 3): how long until a new member is known by every other
//! node, at 7 and at 16 nodes (or the sizes given), and how many gossip bytes an idle
//! group sends per member per minute. Root needed (network namespaces).
//!
//!     sudo cargo bench --bench mesh            # 7 and 16 nodes
//!     sudo cargo bench --bench mesh -- 7 32    # other sizes
//!
//! The nodes share one LAN segment. The last 20 joins (fewer in a small group) are timed
//! one by one, each from the joiner's `join` starting to the last earlier node listing
//! it, polled through each node's control socket every 20 ms (a poll is a CLI run per
//! node: polling without a pause would load the daemons measured); p50 and p99 are over
//! those joins (nearest rank, so with 20 joins p99 is the slowest).
//! Idle traffic is counted twice: the gossip payload the daemons report, and the bytes
//! every node's interface sent (IP, UDP and WireGuard headers and keepalives included).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn sent_bytes(n: &Node) -> u64 {
    let g: watchalong::control::GossipReply =
        serde_json::from_str(&n.ok(&["gossip", "--json"])).unwrap();
    g.stats.sent_bytes
}

/// Bytes `n`'s interface on the LAN sent so far.
fn wire_bytes(n: &Node) -> u64 {
    let o =
        n.ns.exec(&["cat", "/sys/class/net/eth0/statistics/tx_bytes"]);
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("tx_bytes of eth0")
}

fn knows(n: &Node, name: &str) -> bool {
    member(&n.peers(), name).is_some()
}

/// When `n`'s daemon logged that `name` is in the group (the host: that it joined), by
/// the log's own clock, which every namespace shares: the news itself, without the
/// polling's lag (a poll of 64 nodes is 64 CLI runs).
fn learned_at(n: &Node, name: &str) -> Option<std::time::SystemTime> {
    let member = format!("peers] {name} (");
    let joined = format!("members] {name} joined as");
    n.log()
        .lines()
        .find(|l| (l.contains(&member) && l.ends_with("is a member")) || l.contains(&joined))
        .and_then(|l| humantime::parse_rfc3339(l.get(1..25)?).ok())
}

/// User and system CPU time of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis, from the state on (some are not
    // numbers: the state, a tpgid of -1); utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// How many of the last joins are timed one by one (the earlier ones only build the group).
const TIMED_JOINS: usize = 20;

/// The nearest-rank `p`th percentile of `sorted` (ascending, not empty).
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

struct Figures {
    /// Each timed join: until `join` returned, and until every earlier node listed it.
    joined: Vec<Duration>,
    known: Vec<Duration>,
    /// From the host's log line admitting the member to the last earlier node's line
    /// learning of it.
    news: Vec<Duration>,
    idle_payload: f64,
    idle_wire: f64,
    /// Per daemon while idle: CPU in % of one core (mean, max) and RSS in MiB (mean, max).
    idle_cpu: (f64, f64),
    rss_mib: (f64, f64),
}

fn run(size: usize, idle: Duration) -> Figures {
    let mut lab = Lab::new();
    let mut nodes: Vec<Node> = (0..size).map(|i| lab.node(&format!("n{i}"))).collect();
    for n in nodes.iter_mut() {
        n.start();
    }
    let (host, rest) = nodes.split_first().unwrap();
    let timed_count = TIMED_JOINS.min(rest.len().saturating_sub(1)).max(1);
    let (early, timed) = rest.split_at(rest.len() - timed_count);
    for n in early {
        let link = host.link(&[]);
        n.ok(&["join", &link]);
    }
    for n in std::iter::once(host).chain(early) {
        assert!(wait_until(Duration::from_secs(120), || early
            .iter()
            .all(|o| o.name == n.name || knows(n, &o.name))));
    }
    let mut joined = Vec::new();
    let mut known = Vec::new();
    let mut news = Vec::new();
    for (i, newcomer) in timed.iter().enumerate() {
        let link = host.link(&[]);
        let start = Instant::now();
        newcomer.ok(&["join", &link]);
        joined.push(start.elapsed());
        let mut pending: Vec<&Node> = std::iter::once(host)
            .chain(early)
            .chain(&timed[..i])
            .collect();
        while !pending.is_empty() {
            pending.retain(|n| !knows(n, &newcomer.name));
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} never reached everyone",
                newcomer.name
            );
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        known.push(start.elapsed());
        let earlier: Vec<&Node> = std::iter::once(host)
            .chain(early)
            .chain(&timed[..i])
            .collect();
        let admitted = learned_at(host, &newcomer.name);
        let last = earlier
            .iter()
            .map(|n| learned_at(n, &newcomer.name))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        if let (Some(a), Some(l)) = (admitted, last) {
            news.push(l.duration_since(a).unwrap_or_default());
        }
    }
    // Idle: everyone knows everyone; count what gossip still sends.
    std::thread::sleep(Duration::from_secs(5));
    let pids: Vec<u32> = nodes.iter().filter_map(|n| n.pid()).collect();
    let ticks_before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let before: u64 = nodes.iter().map(sent_bytes).sum();
    let wire_before: u64 = nodes.iter().map(wire_bytes).sum();
    let idle_start = Instant::now();
    std::thread::sleep(idle);
    let after: u64 = nodes.iter().map(sent_bytes).sum();
    let wire_after: u64 = nodes.iter().map(wire_bytes).sum();
    let idle_secs = idle_start.elapsed().as_secs_f64();
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&ticks_before)
        .map(|(p, b)| (cpu_ticks(*p).saturating_sub(*b)) as f64 / 100.0 / idle_secs * 100.0)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();
    let mean_max = |v: &[f64]| {
        (
            v.iter().sum::<f64>() / v.len().max(1) as f64,
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let per_member_minute = |b: u64| b as f64 / size as f64 * 60.0 / idle.as_secs_f64();
    joined.sort();
    known.sort();
    news.sort();
    Figures {
        joined,
        known,
        news,
        idle_payload: per_member_minute(after - before),
        idle_wire: per_member_minute(wire_after - wire_before),
        idle_cpu: mean_max(&cpu),
        rss_mib: mean_max(&rss),
    }
}

fn main() {
    // `cargo test --all-targets` runs this binary too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("mesh benchmark: run it with `cargo bench --bench mesh`");
        return;
    }
    if !root_or_skip("bench mesh") {
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() { vec![7, 16] } else { sizes };
    println!("| nodes | join returns, p50 / p99 | new member known by all (polled), p50 / p99 (joins timed) | news: host admits → last node knows (daemon logs), p50 / p99 | idle gossip payload, bytes per member per minute | idle bytes on the interfaces, per member per minute | idle CPU per daemon, mean / max | RSS per daemon, mean / max |");
    println!("|---|---|---|---|---|---|---|---|");
    for size in sizes {
        let f = run(size, Duration::from_secs(30));
        let news = if f.news.is_empty() {
            "–".to_string()
        } else {
            format!(
                "{} / {} ms ({})",
                percentile(&f.news, 50).as_millis(),
                percentile(&f.news, 99).as_millis(),
                f.news.len()
            )
        };
        println!(
            "| {size} | {} / {} ms | {} / {} ms ({}) | {news} | {:.0} | {:.0} | {:.2} / {:.2} % | {:.1} / {:.1} MiB |",
            percentile(&f.joined, 50).as_millis(),
            percentile(&f.joined, 99).as_millis(),
            percentile(&f.known, 50).as_millis(),
            percentile(&f.known, 99).as_millis(),
            f.known.len(),
            f.idle_payload,
            f.idle_wire,
            f.idle_cpu.0,
            f.idle_cpu.1,
            f.rss_mib.0,
            f.rss_mib.1
        );
    }
}
