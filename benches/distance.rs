//! Distance (issue 14): what a `get` makes of a long path, beside iperf3 on the same
//! tunnel, and how long a join takes across it. Root needed (network namespaces, tc),
//! and iperf3.
//!
//!     sudo cargo bench --bench distance              # the whole matrix
//!     sudo cargo bench --bench distance -- 50:100    # one row: RTT ms : Mbit/s
//!     sudo cargo bench --bench distance -- joins     # only the joins
//!     sudo cargo bench --bench distance -- 0:0       # unshaped (1 GiB), any RTT
//!
//! For each round trip (0, 20, 50, 150 ms; `Lab::internet_with_rtt`) and each rate (20
//! and 100 Mbit/s, every internet link shaped with htb): a host and two distant members
//! on the lab internet, one holding a file; the other `get`s it (case 1, through the
//! tunnel), with the page cache dropped first, then iperf3 runs through the same tunnel
//! the way the file went (`-R`, 10 s). The file is sized to take about ten seconds at the
//! rate. The ratio `get` / iperf3 is the figure: how much of what one TCP connection
//! through our tunnel carries a transfer gets.
//!
//! Joins: at each round trip, a fresh node runs `watchalong join LINK`; the time until
//! the command returns, and until a ping to the host's VPN address first comes back, in
//! round trips.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::measure::*;
use common::player::has;
use common::*;

const MIB: u64 = 1024 * 1024;

struct Row {
    rtt_ms: u32,
    mbit_link: u32,
    size_mib: u64,
    get_mbit: f64,
    iperf_mbit: f64,
    route: String,
}

/// One row of the matrix on a fresh lab.
fn row(rt: &tokio::runtime::Runtime, rtt_ms: u32, mbit_link: u32) -> Row {
    let mut lab = Lab::internet_with_rtt(rtt_ms);
    let mut host = lab.node("host");
    let mut holder = lab.node("holder");
    let mut getter = lab.node("getter");
    // About ten seconds at the link's rate, in whole chunks; 1 GiB unshaped.
    let size_mib = match mbit_link {
        0 => 1024,
        m => (u64::from(m) * 10 / 8).max(8),
    };
    write_random(
        &holder.share("films").join("f.bin"),
        size_mib * MIB,
        "distance",
    );
    for n in [&mut host, &mut holder, &mut getter] {
        n.start();
    }
    join(&host, &holder);
    join(&host, &getter);
    wait_for_direct_mesh(&[&host, &holder, &getter], Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || getter
            .cli(&["ls", "films"])
            .status
            .success()),
        "the getter never saw the holder's share"
    );
    if mbit_link > 0 {
        lab.shape_wan(mbit_link);
    }
    let (_, total, view) = timed_get(rt, &getter, "films/f.bin");
    let get_mbit = mbit(size_mib * MIB, total);
    let iperf_mbit = iperf(&holder, &getter, &vpn_address(&holder.status()));
    Row {
        rtt_ms,
        mbit_link,
        size_mib,
        get_mbit,
        iperf_mbit,
        route: view.route,
    }
}

/// (the join command's time, time until the host answers a ping through the tunnel).
fn timed_join(rtt_ms: u32) -> (Duration, Duration) {
    let mut lab = Lab::internet_with_rtt(rtt_ms);
    let mut host = lab.node("host");
    let mut newcomer = lab.node("newcomer");
    host.start();
    newcomer.start();
    let link = host.link(&[]);
    let host_vpn = vpn_address(&host.status());
    // The lab's links are brand new: until a frame has crossed each, the first datagrams
    // are lost (the delay element's sockets and the veths settle) and every ARP look-up
    // crosses the delay, which no internet path does. One ping between the two ends
    // first, so the clock times the join and not the lab waking up.
    let host_ip = host.ip.to_string();
    assert!(
        wait_until(Duration::from_secs(30), || newcomer
            .ns
            .exec(&["ping", "-c", "1", "-W", "1", &host_ip])
            .status
            .success()),
        "the lab never carried a ping to the host"
    );
    let started = Instant::now();
    newcomer.ok(&["join", &link]);
    let joined = started.elapsed();
    assert!(
        wait_until(Duration::from_secs(30), || newcomer
            .ns
            .exec(&["ping", "-c", "1", "-W", "1", &host_vpn])
            .status
            .success()),
        "the tunnel to the host never came up"
    );
    (joined, started.elapsed())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("distance benchmark: run it with `cargo bench --bench distance`");
        return;
    }
    if !root_or_skip("bench distance") || !has("iperf3") {
        return;
    }
    let only: Option<(u32, u32)> = std::env::args().skip(1).find_map(|a| {
        let (r, m) = a.split_once(':')?;
        Some((r.parse().ok()?, m.parse().ok()?))
    });
    // `joins`: only the join table.
    let joins_only = std::env::args().any(|a| a == "joins");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    // `RTT:0` (unshaped) runs only when asked for.
    let matrix = [0, 20, 50, 150]
        .into_iter()
        .flat_map(|r| [(r, 20), (r, 100)]);
    let asked = only.filter(|(_, m)| *m == 0);
    for (rtt, link) in matrix.chain(asked) {
        if joins_only || only.is_some_and(|o| o != (rtt, link)) {
            continue;
        }
        eprintln!("row: {rtt} ms, {link} Mbit/s");
        rows.push(row(&rt, rtt, link));
    }
    println!(
        "| RTT | link | file | `get` Mbit/s | iperf3 Mbit/s, same tunnel | get / iperf3 | route |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} ms | {} | {} MiB | {:.1} | {:.1} | **{:.2}** | {} |",
            r.rtt_ms,
            match r.mbit_link {
                0 => "unshaped".to_string(),
                m => format!("{m} Mbit/s"),
            },
            r.size_mib,
            r.get_mbit,
            r.iperf_mbit,
            r.get_mbit / r.iperf_mbit,
            r.route
        );
    }
    if only.is_some() {
        return;
    }
    println!(
        "\n| RTT | `join` returns | host answers a ping through the tunnel | in round trips |"
    );
    println!("|---|---|---|---|");
    for rtt in [20, 50, 150] {
        let (joined, up) = timed_join(rtt);
        println!(
            "| {rtt} ms | {} ms | {} ms | {:.1} |",
            joined.as_millis(),
            up.as_millis(),
            up.as_secs_f64() * 1000.0 / f64::from(rtt)
        );
    }
}
