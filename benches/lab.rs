//! The lab's delay element (issue 14): what it adds and what it carries. Root needed
//! (network namespaces), and iperf3.
//!
//!     sudo cargo bench --bench lab
//!
//! For a lab internet of round trip 0, 20, 50 and 150 ms (`Lab::internet_with_rtt`), two
//! nodes on it, no daemon: the average ping, one TCP connection's rate (iperf3, 6 s, the
//! first 2 left out for slow start), and a UDP stream of 1400-byte datagrams at 300 Mbit/s
//! (one frame per datagram, as the tunnel's traffic is: no offload batches them), received
//! rate and loss. At 0 ms no delay element is in the path: that row is the bare veths.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;

/// iperf3 from `client` to `server` with `extra` arguments; the JSON report.
fn iperf(server: &Node, client: &Node, extra: &[&str]) -> serde_json::Value {
    let addr = server.ip.to_string();
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.ns.name,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 (apt-get install iperf3)");
    // The server's namespace is the bench's own, so its default port is free there.
    let listening = wait_until(Duration::from_secs(10), || {
        let o = server.ns.exec(&["ss", "-Hltn", "sport", "= :5201"]);
        !String::from_utf8_lossy(&o.stdout).trim().is_empty()
    });
    assert!(listening, "iperf3 never listened in {}", server.name);
    let mut args = vec!["iperf3", "-c", addr.as_str(), "-J"];
    args.extend_from_slice(extra);
    let o = client.ns.exec(&args);
    let _ = srv.kill();
    let _ = srv.wait();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 {extra:?} gave no report ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn main() {
    // `cargo test --all-targets` runs this too, with no `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("lab benchmark: run it with `sudo cargo bench --bench lab` (needs iperf3)");
        return;
    }
    if !root_or_skip("bench lab") {
        return;
    }
    println!(
        "| RTT set | ping avg | TCP, 1 connection | UDP 1400 B at 300 Mbit/s: received, lost |"
    );
    println!("|---|---|---|---|");
    for ms in [0, 20, 50, 150] {
        let mut lab = Lab::internet_with_rtt(ms);
        let a = lab.node("a");
        let b = lab.node("b");
        // The first ping also waits for ARP across the delay; settle it first.
        a.ns.exec(&["ping", "-c", "1", "-W", "2", &b.ip.to_string()]);
        let ping = ping_stats(&a, &b.ip.to_string(), 50);
        let tcp = iperf(&b, &a, &["-t", "6", "-O", "2"]);
        let tcp = tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6;
        let udp = iperf(&b, &a, &["-u", "-b", "300M", "-l", "1400", "-t", "4"]);
        let sum = &udp["end"]["sum"];
        let udp_mbit = sum["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6;
        let lost = sum["lost_percent"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {ms} ms | {:.2} ms | {tcp:.0} Mbit/s | {:.0} Mbit/s, {lost:.2}% |",
            ping.avg,
            udp_mbit * (1.0 - lost / 100.0)
        );
    }
}
