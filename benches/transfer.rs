//! Transfer benchmark (issue 4). Root needed (network namespaces, tc).
//!
//!     sudo cargo bench --bench transfer            # 1 GiB per case
//!     sudo cargo bench --bench transfer -- 256     # another size, in MiB
//!     sudo cargo bench --bench transfer -- chunks  # only the chunk sizes (A)
//!
//! A. Chunk size: time to first byte and throughput of a 64 MiB `get` (case 1) for
//!    several chunk sizes, WAN shaped to 100 Mbit/s, and throughput unshaped. The chunk
//!    size in effect is checked: the requester must count 64 MiB / chunk size fetches.
//! B. `get` of one file per case 1–4 with every internet link shaped to 100 Mbit/s
//!    (htb) and the LANs unshaped, beside iperf3 in the same run over the route's
//!    narrowest hop (the tunnel hop, or the LAN hop of case 4), data flowing the way
//!    the file did (`-R`). The route shown is the one the transfer reports.
//!
//! The page cache is dropped before every `get`, so the holder reads its disk.
//! C. Bytes that cross a site's WAN when 1, 2 or 3 of its members fetch one file at once.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::measure::*;
use common::*;
use watchalong::control::PlanReply;

const MIB: u64 = 1024 * 1024;

fn vpn(n: &Node) -> String {
    vpn_address(&n.status())
}

fn chunk_sizes(rt: &tokio::runtime::Runtime) {
    let mut lab = Lab::internet();
    let mut host = lab.node("host");
    let mut distant = lab.node("distant");
    let films = distant.share("films");
    // One file per chunk size and per shaping: the requester's cache keeps what it
    // fetched, so a second get of the same chunks would measure the disk.
    for kib in [64u64, 256, 1024, 4096] {
        for how in ["shaped", "unshaped"] {
            write_random(
                &films.join(format!("{how}-{kib}.bin")),
                64 * MIB,
                &format!("{how}-{kib}"),
            );
        }
    }
    host.start();
    distant.start();
    join(&host, &distant);
    println!("\n### A. Chunk size (64 MiB, case 1)\n");
    println!(
        "| chunk | time to first byte, WAN 100 Mbit/s | total | Mbit/s | Mbit/s, WAN unshaped |"
    );
    println!("|---|---|---|---|---|");
    for kib in [64u64, 256, 1024, 4096] {
        distant.term();
        distant.start_with_env(&[(
            watchalong::data::share::CHUNK_SIZE_ENV,
            &(kib * 1024).to_string(),
        )]);
        assert!(wait_until(Duration::from_secs(30), || host.ping(&vpn(&distant))));
        let chunks = 64 * MIB / (kib * 1024);
        // The counters run since the daemon started: this get's are the difference.
        let fetched = || host.status().node.chunks.fetched_chunks;
        let before = fetched();
        let (_, unshaped, _) = timed_get(rt, &host, &format!("films/unshaped-{kib}.bin"));
        assert_eq!(
            fetched() - before,
            chunks,
            "{kib} KiB chunks were asked for, but not fetched"
        );
        lab.shape_wan(100);
        let (ttfb, total, _) = timed_get(rt, &host, &format!("films/shaped-{kib}.bin"));
        lab.unshape_wan();
        println!(
            "| {kib} KiB | {} ms | {:.1} s | {:.0} | {:.0} |",
            ttfb.as_millis(),
            total.as_secs_f64(),
            mbit(64 * MIB, total),
            mbit(64 * MIB, unshaped)
        );
    }
}

fn cases(rt: &tokio::runtime::Runtime, size: u64) {
    let mut lab = Lab::internet();
    let mut host = lab.node("host");
    let mut distant = lab.node("distant");
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut r2 = lab.router("r2", [192, 168, 2]);
    let mut s1a = lab.node_behind(&mut r1, "s1a");
    let mut s1b = lab.node_behind(&mut r1, "s1b");
    let mut s2: Vec<Node> = (0..3)
        .map(|i| lab.node_behind(&mut r2, &format!("s2{i}")))
        .collect();
    let films = distant.share("films");
    let home = s1a.share("home");
    write_random(&films.join("big.bin"), size, "big");
    write_random(&home.join("big.bin"), size, "home");
    for k in 1..=3 {
        write_random(
            &films.join(format!("site{k}.bin")),
            256 * MIB,
            &format!("site{k}"),
        );
    }
    for n in [&mut host, &mut distant, &mut s1a, &mut s1b] {
        n.start();
    }
    for n in s2.iter_mut() {
        n.start();
    }
    for n in [&distant, &s1a, &s1b].into_iter().chain(s2.iter()) {
        join(&host, n);
    }
    // Let every pair find its direct path before measuring.
    let all: Vec<&Node> = [&host, &distant, &s1a, &s1b]
        .into_iter()
        .chain(s2.iter())
        .collect();
    wait_for_direct_mesh(&all, Duration::from_secs(60));
    lab.shape_wan(100);
    println!(
        "\n### B. One {} MiB file per case, WAN 100 Mbit/s, LAN unshaped\n",
        size / MIB
    );
    println!(
        "| case | from → to | route | get Mbit/s | iperf3 Mbit/s over the route's narrowest hop |"
    );
    println!("|---|---|---|---|---|");
    let nodes: Vec<&Node> = [&host, &distant, &s1a, &s1b].into_iter().collect();
    let by_name = |name: &str| -> &Node {
        nodes
            .iter()
            .copied()
            .find(|n| n.name == name)
            .expect("a node of the route")
    };
    let runs: [(&str, &Node, &Node, &str); 4] = [
        ("1 DN→DN", &distant, &host, "films/big.bin"),
        ("2 DN→NN", &distant, &s1b, "films/big.bin"),
        ("3 NN→DN", &s1a, &distant, "home/big.bin"),
        ("4 NN→NN", &s1a, &s1b, "home/big.bin"),
    ];
    for (case, from, to, target) in runs {
        let plan: PlanReply = serde_json::from_str(&to.ok(&["plan", target, "--json"])).unwrap();
        let (_, total, done) = timed_get(rt, to, target);
        // The same path the data took: the tunnel hop (over VPN addresses) where there
        // is one, else the LAN hop (over LAN addresses, as the relay runs).
        let hops = &plan.route.hops;
        let hop = hops
            .iter()
            .find(|h| h.via == "tunnel")
            .or_else(|| hops.first())
            .expect("a route with a hop");
        let (a, b) = (by_name(&hop.from), by_name(&hop.to));
        let (ip, over) = if hop.via == "tunnel" {
            (iperf(a, b, &vpn(a)), "tunnel")
        } else {
            (iperf(a, b, &a.ip.to_string()), "LAN")
        };
        let planned = plan.summary.as_str();
        let route = if done.route == planned {
            done.route.clone()
        } else {
            format!("{} (planned: {planned})", done.route)
        };
        println!(
            "| {case} | {} → {} | {} | {:.0} | {:.0} ({} → {}, {over}) |",
            from.name,
            to.name,
            route,
            mbit(size, total),
            ip,
            a.name,
            b.name
        );
    }
    println!("\n### C. WAN bytes into a site for one 256 MiB file, 1 to 3 receivers at once\n");
    println!("| receivers | bytes into the site | × file size | slowest get |");
    println!("|---|---|---|---|");
    for k in 1..=3usize {
        let target = format!("films/site{k}.bin");
        let before = r2.wan_bytes().0;
        let start = Instant::now();
        let handles: Vec<std::process::Child> = s2[..k]
            .iter()
            .map(|n| {
                let dest = n.dir.join(format!("site{k}.bin"));
                std::process::Command::new(BIN)
                    .arg("--config")
                    .arg(&n.config)
                    .args(["get", &target, dest.to_str().unwrap(), "--json"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut h in handles {
            assert!(h.wait().unwrap().success());
        }
        let crossed = r2.wan_bytes().0 - before;
        println!(
            "| {k} | {crossed} | {:.3} | {:.1} s |",
            crossed as f64 / (256 * MIB) as f64,
            start.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    // `cargo test --all-targets` runs this binary too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("transfer benchmark: run it with `cargo bench --bench transfer`");
        return;
    }
    if !root_or_skip("bench transfer") {
        return;
    }
    let size = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok())
        .next()
        .unwrap_or(1024)
        * MIB;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `-- chunks` runs only section A.
    chunk_sizes(&rt);
    if !std::env::args().any(|a| a == "chunks") {
        cases(&rt, size);
    }
}
