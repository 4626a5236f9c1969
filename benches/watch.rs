//! Watch-along benchmark. Root needed, with mpv and ffmpeg installed.
//!
//!     sudo cargo bench --bench watch
//!
//! Lab: the host (holding `movies`) and a distant node on the lab internet, s1a and s1b
//! behind one NAT router; internet links shaped to 100 Mbit/s, the LAN not. Time to first
//! frame: from starting `watchalong watch` to mpv (headless) reporting a position past 0,
//! cold at s1a (nothing of the file in its site) and then warm at s1b (s1a's site has
//! just fetched it), five videos each; beside it, in the same run, the same mpv opening
//! the file from the host's own disk. Drift: three players (host, s1a, distant) watch
//! for two minutes; every 200 ms the gap between the furthest two is sampled.
//!
//! Settings, from the environment: `WATCHALONG_LAB_RTT_MS` (the internet's round trip,
//! default 0), `WATCH_BENCH_MBIT` (the internet links' rate, default 100) and
//! `WATCH_BENCH_MOOV=end` (the videos' index at their end instead of first).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::measure::{median, ms};
use common::player::*;
use common::*;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("watch benchmark: run it with `cargo bench --bench watch`");
        return;
    }
    if !root_or_skip("bench watch") || !has("mpv") || !has("ffmpeg") {
        return;
    }
    let mbit: u32 = std::env::var("WATCH_BENCH_MBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let index_first = std::env::var("WATCH_BENCH_MOOV").as_deref() != Ok("end");
    let mut site = SiteLab::new();
    println!(
        "internet: round trip {} ms, {mbit} Mbit/s; videos' index {}",
        site.lab.rtt().as_millis(),
        if index_first { "first" } else { "at the end" }
    );
    let movies = site.host.share("movies");
    let runs = 5;
    for i in 0..runs {
        make_video_with(
            &movies.join(format!("v{i}.mp4")),
            60,
            2000,
            "320x240",
            25,
            index_first,
        );
    }
    site.lab.shape_wan(mbit);
    site.start(Duration::from_secs(60));
    let SiteLab {
        host,
        distant,
        s1a,
        s1b,
        ..
    } = &site;
    for n in [distant, s1a, s1b] {
        assert!(wait_until(Duration::from_secs(60), || n
            .cli(&["ls", "movies"])
            .status
            .success()));
    }

    let (mut local, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let file = format!("movies/v{i}.mp4");
        // The floor: mpv on the holder's own disk, no watchalong in the way.
        let ipc = host.dir.join(format!("local-{i}.sock"));
        let started = Instant::now();
        let mut direct = host.ns.spawn(
            &[
                "mpv",
                "--vo=null",
                "--ao=null",
                "--really-quiet",
                &format!("--input-ipc-server={}", ipc.display()),
                movies.join(format!("v{i}.mp4")).to_str().unwrap(),
            ],
            &host.dir.join("local-mpv.log"),
        );
        let probe = Player::attach(host, ipc, &host.dir.join("local-mpv.log"));
        local.push(first_frame(&probe, started));
        let _ = direct.kill();
        let _ = direct.wait();

        let started = Instant::now();
        let a = Player::start(s1a, &file);
        cold.push(first_frame(&a, started));
        let started = Instant::now();
        let b = Player::start(s1b, &file);
        warm.push(first_frame(&b, started));
        drop((a, b));
    }

    let players: Vec<Player> = [host, s1a, distant]
        .iter()
        .map(|n| Player::start(n, "movies/v0.mp4"))
        .collect();
    let all: Vec<&Player> = players.iter().collect();
    assert!(wait_until(Duration::from_secs(60), || all
        .iter()
        .all(|p| !p.paused() && p.position() > 1.0)));
    let mut gaps = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        gaps.push(spread(&positions(&all)));
        std::thread::sleep(Duration::from_millis(200));
    }
    gaps.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| gaps[((gaps.len() - 1) as f64 * f) as usize] * 1000.0;

    println!("| time to first frame | median | runs (ms) |");
    println!("|---|---|---|");
    println!(
        "| mpv on the holder's own disk | {} ms | {} |",
        median(local.clone()).as_millis(),
        ms(&local)
    );
    println!(
        "| `watch` at s1a, cold | {} ms | {} |",
        median(cold.clone()).as_millis(),
        ms(&cold)
    );
    println!(
        "| `watch` at s1b, warm at its site | {} ms | {} |",
        median(warm.clone()).as_millis(),
        ms(&warm)
    );
    println!(
        "\nDrift, three players, {} samples over 120 s: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        gaps.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
}
