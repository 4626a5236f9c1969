//! Mount benchmark: reading through `watchalong mount` against `get` and `watch`, in one
//! run. Root needed, with mpv and ffmpeg installed.
//!
//!     sudo cargo bench --bench mount
//!
//! Lab: the host (holding `movies`) and a distant node on the lab internet, s1a and s1b
//! behind one NAT router; the internet links shaped, the LAN not.
//! 1. Sequential read: at s1a, a file of the host's read whole through the mount (1 MiB
//!    reads, as `cp` does) against `get` of another file of the same size, over the
//!    internet at `MOUNT_BENCH_MBIT` (default 100); then case 4, a file of s1a's read at
//!    s1b across the unshaped LAN, the same two ways. Each way runs twice, in turns, each
//!    time on a file nobody fetched yet (cold).
//! 2. Time to first frame, with the internet at 20 Mbit/s and videos whose index (`moov`)
//!    sits at their end, as ffmpeg writes by default: from the command's start to mpv
//!    (headless) reporting a position past 0, mpv opening the mounted file against
//!    `watchalong watch`, in turns, each on a video nobody fetched yet, at s1a.
//!
//! `WATCHALONG_LAB_RTT_MS` sets the internet's round trip (default 0).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::measure::{mbit, median, ms};
use common::mount::Mount;
use common::player::*;
use common::*;

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Reads `path` whole in 1 MiB reads; returns the time taken and the bytes read.
fn read_whole(path: &Path) -> (Duration, u64) {
    let started = Instant::now();
    let mut f = std::fs::File::open(path).expect("open the mounted file");
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read the mounted file");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (started.elapsed(), total)
}

fn get_whole(n: &Node, target: &str) -> Duration {
    let dest = n.dir.join(format!("got-{}", target.replace('/', "_")));
    let started = Instant::now();
    n.ok(&["get", target, dest.to_str().expect("path"), "--json"]);
    let took = started.elapsed();
    let _ = std::fs::remove_file(dest);
    took
}

/// Reads through `mount` (files `mounted`) and `get`s at `reader` (files `got`), in
/// turns; prints one table row per way.
fn sequential(label: &str, reader: &Node, mount: &Mount, share: &str, size: u64, files: &[&str]) {
    let (mut through, mut got) = (Vec::new(), Vec::new());
    for (i, pair) in files.chunks(2).enumerate() {
        // Turns: who goes first alternates, so neither always meets a warmer machine.
        let (m, g) = if i % 2 == 0 {
            (pair[0], pair[1])
        } else {
            (pair[1], pair[0])
        };
        let run_mount = || {
            let (d, n) = read_whole(&mount.dir.join(m));
            assert_eq!(n, size, "the mount read {n} of {size} bytes");
            d
        };
        let run_get = || get_whole(reader, &format!("{share}/{g}"));
        if i % 2 == 0 {
            through.push(run_mount());
            got.push(run_get());
        } else {
            got.push(run_get());
            through.push(run_mount());
        }
    }
    let (tm, tg) = (median(through.clone()), median(got.clone()));
    println!(
        "| {label} | mount: {:.0} Mbit/s ({} ms) | get: {:.0} Mbit/s ({} ms) | {:.2} |",
        mbit(size, tm),
        ms(&through),
        mbit(size, tg),
        ms(&got),
        tg.as_secs_f64() / tm.as_secs_f64()
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("mount benchmark: run it with `cargo bench --bench mount`");
        return;
    }
    if !root_or_skip("bench mount") || !has("mpv") || !has("ffmpeg") {
        return;
    }
    let wan_mbit: u32 = std::env::var("MOUNT_BENCH_MBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut site = SiteLab::new();
    println!(
        "internet: round trip {} ms, {wan_mbit} Mbit/s for the reads, 20 Mbit/s for the first frames",
        site.lab.rtt().as_millis()
    );
    let movies = site.host.share("movies");
    let home = site.s1a.share("home");
    const WAN_SIZE: u64 = 64 * MIB;
    const LAN_SIZE: u64 = 256 * MIB;
    let wan_files = ["w0.bin", "w1.bin", "w2.bin", "w3.bin"];
    let lan_files = ["l0.bin", "l1.bin", "l2.bin", "l3.bin"];
    for f in wan_files {
        write_random(&movies.join(f), WAN_SIZE, f);
    }
    for f in lan_files {
        write_random(&home.join(f), LAN_SIZE, f);
    }
    let videos = 6;
    for i in 0..videos {
        make_video_with(
            &movies.join(format!("v{i}.mp4")),
            60,
            2000,
            "320x240",
            25,
            false,
        );
    }
    site.lab.shape_wan(wan_mbit);
    site.start(DEADLINE);
    let SiteLab { s1a, s1b, .. } = &site;
    for (n, share) in [(s1a, "movies"), (s1b, "home")] {
        assert!(
            wait_until(DEADLINE, || n.cli(&["ls", share]).status.success()),
            "{} never saw {share}",
            n.name
        );
    }

    println!("\n| sequential read | through the mount | `get` | get time / mount time |");
    println!("|---|---|---|---|");
    let at_a = Mount::start(s1a, "movies");
    sequential(
        &format!(
            "{WAN_SIZE_MIB} MiB over the {wan_mbit} Mbit/s internet, at s1a",
            WAN_SIZE_MIB = WAN_SIZE / MIB
        ),
        s1a,
        &at_a,
        "movies",
        WAN_SIZE,
        &wan_files,
    );
    let at_b = Mount::start(s1b, "home");
    sequential(
        &format!("{} MiB across the LAN (case 4), s1a to s1b", LAN_SIZE / MIB),
        s1b,
        &at_b,
        "home",
        LAN_SIZE,
        &lan_files,
    );
    drop(at_b);

    site.lab.shape_wan(20);
    let (mut mounted, mut watched) = (Vec::new(), Vec::new());
    for i in 0..videos / 2 {
        for turn in 0..2 {
            let v = 2 * i + turn;
            let through_mount = (i + turn) % 2 == 0;
            let started = Instant::now();
            if through_mount {
                let ipc = s1a.dir.join(format!("mount-mpv-{v}.sock"));
                let log = s1a.dir.join("mount-mpv.log");
                let mut mpv = s1a.ns.spawn(
                    &[
                        "mpv",
                        "--vo=null",
                        "--ao=null",
                        "--really-quiet",
                        &format!("--input-ipc-server={}", ipc.display()),
                        at_a.dir.join(format!("v{v}.mp4")).to_str().expect("path"),
                    ],
                    &log,
                );
                let p = Player::attach(s1a, ipc, &log);
                mounted.push(first_frame(&p, started));
                let _ = mpv.kill();
                let _ = mpv.wait();
            } else {
                let p = Player::start(s1a, &format!("movies/v{v}.mp4"));
                watched.push(first_frame(&p, started));
            }
        }
    }
    println!("\n| time to first frame, 20 Mbit/s, index at the end, cold | median | runs (ms) |");
    println!("|---|---|---|");
    println!(
        "| mpv on the mounted file | {} ms | {} |",
        median(mounted.clone()).as_millis(),
        ms(&mounted)
    );
    println!(
        "| `watchalong watch` | {} ms | {} |",
        median(watched.clone()).as_millis(),
        ms(&watched)
    );
}
