//! Room benchmark (issue 19, item 4): a group of 16 members (or the size given), every one
//! of them watching one film with a headless mpv. Root needed, with mpv and ffmpeg.
//!
//!     sudo cargo bench --bench room            # 16 watchers
//!     sudo cargo bench --bench room -- 8 24    # other sizes
//!
//! The nodes share one LAN segment; the host holds the film (160x120, 25 frames a second,
//! 200 kbit/s, so fifteen streams of it load nothing) and the others stream it. Once every
//! player plays in step, three figures:
//! - **room messages per heartbeat** (250 ms): every node's `watchalong_room_messages`
//!   counter (sent), summed over the group, over 30 s of playing, divided by the heartbeats
//!   in that time;
//! - **drift**: every 200 ms over those 30 s, the gap between the furthest two players
//!   (read one after another over their IPC sockets, each moved to the moment of the first
//!   reading);
//! - **pause propagation**: a person pauses one player (a different one each time, never
//!   the host's), and the time until every player is paused is taken; then the same player
//!   plays on and the group gets back in step before the next. Ten pauses.
//!
//! A daemon without the counter (an older build, run for a comparison) prints "n/a" for
//! the messages.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::player::*;
use common::*;

const DEADLINE: Duration = Duration::from_secs(180);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("room benchmark: run it with `cargo bench --bench room`");
        return;
    }
    if !root_or_skip("bench room") || !has("mpv") || !has("ffmpeg") {
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .filter_map(|a| a.parse().ok())
        .filter(|&n| n >= 2)
        .collect();
    let sizes = if sizes.is_empty() { vec![16] } else { sizes };
    println!("| watchers | room messages per heartbeat | drift p50 / p99 / max | pause reaches every player, p50 / p99 / max |");
    println!("|---|---|---|---|");
    for n in sizes {
        run(n);
    }
}

/// Room messages `n` has sent, if its daemon counts them.
fn sent(n: &Node, url: &Option<String>) -> Option<u64> {
    let url = url.as_ref()?;
    let o =
        n.ns.exec(&["curl", "-sS", "--fail", "--max-time", "10", url]);
    String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
        l.strip_prefix("watchalong_room_messages_total{direction=\"sent\"} ")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn quantiles(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    format!("{:.0} / {:.0} / {:.0} ms", q(0.5), q(0.99), v[v.len() - 1])
}

fn run(size: usize) {
    let mut lab = Lab::new();
    let host = lab.node("host");
    let movies = host.share("movies");
    make_video_sized(&movies.join("film.mp4"), 600, 200, "160x120", 25);
    let mut nodes = vec![host];
    for i in 1..size {
        nodes.push(lab.node(&format!("m{i:02}")));
    }
    for n in &nodes {
        n.enable_metrics();
    }
    nodes[0].start();
    for i in 1..size {
        nodes[i].start();
        join(&nodes[0], &nodes[i]);
    }
    for n in &nodes[1..] {
        assert!(
            wait_until(DEADLINE, || n.cli(&["ls", "movies"]).status.success()),
            "{} never saw the share",
            n.name
        );
    }
    let urls: Vec<Option<String>> = nodes.iter().map(Node::metrics_url).collect();

    let players: Vec<Player> = nodes
        .iter()
        .map(|n| Player::start(n, "movies/film.mp4"))
        .collect();
    let all: Vec<&Player> = players.iter().collect();
    let in_step = |all: &[&Player]| {
        wait_until(DEADLINE, || {
            all.iter().all(|p| !p.paused() && p.position() > 1.0) && spread(&positions(all)) <= 0.1
        })
    };
    assert!(in_step(&all), "the players never got in step");

    let before: Option<u64> = nodes.iter().zip(&urls).map(|(n, u)| sent(n, u)).sum();
    let started = Instant::now();
    let mut gaps = Vec::new();
    let end = started + Duration::from_secs(30);
    while Instant::now() < end {
        gaps.push(spread(&positions(&all)) * 1000.0);
        std::thread::sleep(Duration::from_millis(200));
    }
    let after: Option<u64> = nodes.iter().zip(&urls).map(|(n, u)| sent(n, u)).sum();
    let heartbeats = started.elapsed().as_secs_f64() / 0.25;
    let per_beat = match (before, after) {
        (Some(b), Some(a)) => format!("{:.1}", (a - b) as f64 / heartbeats),
        _ => "n/a".to_string(),
    };

    let mut pauses = Vec::new();
    for i in 0..10 {
        let p = &players[1 + i % (size - 1)];
        // One watcher per player, polling its `pause` every 2 ms: one loop over all of
        // them would take a reading of every player per turn, too coarse to time.
        let t = Instant::now();
        let seen: Vec<Option<Duration>> = std::thread::scope(|scope| {
            let watchers: Vec<_> = players
                .iter()
                .map(|q| {
                    scope.spawn(move || {
                        while t.elapsed() < DEADLINE {
                            if q.paused() {
                                return Some(t.elapsed());
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        None
                    })
                })
                .collect();
            p.call(serde_json::json!(["set_property", "pause", true]))
                .expect("pause");
            watchers
                .into_iter()
                .map(|w| w.join().expect("watcher"))
                .collect()
        });
        let last = seen
            .iter()
            .map(|s| s.expect("a pause never reached every player"))
            .max()
            .expect("players");
        pauses.push(last.as_secs_f64() * 1000.0);
        p.call(serde_json::json!(["set_property", "pause", false]))
            .expect("play");
        assert!(in_step(&all), "the players never got back in step");
    }
    println!(
        "| {size} | {per_beat} | {} | {} |",
        quantiles(gaps),
        quantiles(pauses)
    );
}
