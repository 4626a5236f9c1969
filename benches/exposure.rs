//! Exposure benchmark (issue 10). Root needed (network namespaces).
//!
//!     sudo cargo bench --bench exposure
//!     sudo WATCHALONG_BEFORE=/path/to/older/watchalong cargo bench --bench exposure
//!
//! Every row runs this build and, when `WATCHALONG_BEFORE` names another build, that one
//! too, in the same run and the same lab:
//! A. A member's ping to the host over the VPN (100 pings 20 ms apart: avg, p99) and the
//!    host daemon's CPU, quiet and under 20,000 handshake-shaped datagrams a second from a
//!    stranger on the internet.
//! B. A case-4 `get` of 256 MiB through a neighbour's LAN relay (sealed in this build,
//!    plain before), beside iperf3 raw TCP between the same two LAN addresses.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

fn flood(label: &str, bin: &Path) {
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let stranger = lab.node("stranger");
    host.bin = bin.to_path_buf();
    a.bin = bin.to_path_buf();
    host.start();
    a.start();
    join(&host, &a);
    let host_vpn = vpn_address(&host.status());
    assert!(wait_until(DEADLINE, || a.ping(&host_vpn)));
    let pid = host.pid().unwrap();
    for pps in [0u64, 20_000] {
        let (cpu0, t0) = (cpu_ticks(pid), Instant::now());
        let f = (pps > 0).then(|| {
            flood_handshakes(
                &stranger.ns.name,
                std::net::SocketAddr::from((host.ip, 51871)),
                pps,
                10,
            )
        });
        let p = ping_stats(&a, &host_vpn, 500);
        let sent = f.map(|f| f.join().unwrap()).unwrap_or(0);
        let cpu = (cpu_ticks(pid) - cpu0) as f64 / t0.elapsed().as_secs_f64();
        println!(
            "| {label} | {pps} | {sent} | {:.3} | {:.3} | {:.1}% | {cpu:.0}% |",
            p.avg,
            p.p99,
            p.loss * 100.0
        );
    }
}

fn mbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

fn iperf(server: &Node, client: &Node, addr: &str) -> f64 {
    let mut srv = std::process::Command::new("ip")
        .args(["netns", "exec", &server.ns.name, "iperf3", "-s", "-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let mut result = 0.0;
    wait_until(DEADLINE, || {
        let o = client.ns.exec(&["iperf3", "-c", addr, "-t", "5", "-J"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        result = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6;
        result > 0.0
    });
    let _ = srv.kill();
    let _ = srv.wait();
    result
}

fn relay(label: &str, bin: &Path, size: u64) {
    let mut site = SiteLab::new();
    for n in [
        &mut site.host,
        &mut site.distant,
        &mut site.s1a,
        &mut site.s1b,
    ] {
        n.bin = bin.to_path_buf();
    }
    let films = site.s1b.share("films");
    let hash = write_random(&films.join("big.bin"), size, "relay");
    site.start(DEADLINE);
    let plan: watchalong::control::PlanReply =
        serde_json::from_str(&site.s1a.ok(&["plan", "films/big.bin", "--json"])).unwrap();
    assert_eq!(plan.route.case, 4, "{plan:#?}");
    let dest = site.s1a.dir.join("big.bin");
    let t0 = Instant::now();
    site.s1a
        .ok(&["get", "films/big.bin", dest.to_str().unwrap()]);
    let took = t0.elapsed();
    let got = blake3::hash(&std::fs::read(&dest).unwrap());
    assert_eq!(got, hash);
    let raw = iperf(&site.s1b, &site.s1a, &site.s1b.ip.to_string());
    let relay = mbit(size, took);
    println!(
        "| {label} | {} MiB | {relay:.0} | {raw:.0} | {:.3} |",
        size >> 20,
        relay / raw
    );
}

fn main() {
    // `cargo test --all-targets` runs this binary too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("exposure benchmark: run it with `sudo cargo bench --bench exposure`");
        return;
    }
    if !root_or_skip("bench exposure (sudo cargo bench --bench exposure)") {
        return;
    }
    let mut builds = vec![("this build".to_string(), PathBuf::from(BIN))];
    if let Ok(before) = std::env::var("WATCHALONG_BEFORE") {
        builds.insert(0, ("before".to_string(), PathBuf::from(before)));
    }
    println!("A. Member ping to the host over the VPN under a handshake flood (10 s)\n");
    println!("| build | flood pps | datagrams sent | ping avg ms | ping p99 ms | loss | host daemon CPU |");
    println!("|---|---|---|---|---|---|---|");
    for (label, bin) in &builds {
        flood(label, bin);
    }
    println!("\nB. Case 4 through the LAN relay, and raw LAN TCP between the same nodes\n");
    println!("| build | file | relay get Mbit/s | iperf3 LAN Mbit/s | ratio |");
    println!("|---|---|---|---|---|");
    for (label, bin) in &builds {
        relay(label, bin, 256 << 20);
    }
}
