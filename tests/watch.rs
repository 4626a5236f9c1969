//! Watching along: a shared video played with mpv (headless) while it arrives, and every
//! member's player kept in step with the others.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// A test video: `secs` seconds of a moving test pattern with a tone, a keyframe every
/// second, at about `kbit` kbit/s.
fn make_video(path: &Path, secs: u32, kbit: u32) {
    let o = run(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440",
            "-t",
            &secs.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-b:v",
            &format!("{kbit}k"),
            "-minrate",
            &format!("{kbit}k"),
            "-maxrate",
            &format!("{kbit}k"),
            "-bufsize",
            &format!("{kbit}k"),
            "-c:a",
            "aac",
            "-movflags",
            "+faststart",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `watchalong watch` with headless mpv, run in the node's namespace (mpv must reach
/// the daemon's loopback endpoint), and its IPC socket for the test to play the person.
struct Player {
    child: Option<Child>,
    ipc: PathBuf,
    name: String,
}

impl Player {
    fn start(n: &Node, file: &str) -> Player {
        let ipc = n.dir.join(format!("mpv-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&ipc);
        let child = n.ns.spawn(
            &[
                BIN,
                "--config",
                n.config.to_str().unwrap(),
                "watch",
                file,
                "--player-arg=--vo=null",
                "--player-arg=--ao=null",
                "--player-arg=--really-quiet",
                "--ipc",
                ipc.to_str().unwrap(),
            ],
            &n.dir.join("watch.log"),
        );
        let p = Player {
            child: Some(child),
            ipc,
            name: n.name.clone(),
        };
        assert!(
            wait_until(DEADLINE, || p.get("time-pos").is_some()),
            "{}'s player never started: {}",
            p.name,
            std::fs::read_to_string(n.dir.join("watch.log")).unwrap_or_default()
        );
        p
    }

    fn call(&self, command: serde_json::Value) -> Option<serde_json::Value> {
        let mut s = UnixStream::connect(&self.ipc).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let line = serde_json::json!({ "command": command, "request_id": 7 }).to_string() + "\n";
        s.write_all(line.as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).ok()? == 0 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            if v.get("request_id").and_then(|i| i.as_u64()) == Some(7) {
                return (v["error"] == "success").then(|| v["data"].clone());
            }
        }
    }

    fn get(&self, prop: &str) -> Option<serde_json::Value> {
        self.call(serde_json::json!(["get_property", prop]))
            .filter(|v| !v.is_null())
    }

    fn position(&self) -> f64 {
        self.get("time-pos")
            .and_then(|v| v.as_f64())
            .unwrap_or(-1.0)
    }

    fn paused(&self) -> bool {
        self.get("pause").and_then(|v| v.as_bool()).unwrap_or(false)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // mpv is the CLI's child and goes with it (kill_on_drop does not run on SIGKILL).
        let _ = run("pkill", &["-KILL", "-f", self.ipc.to_str().unwrap()]);
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The positions of `players` read as close together as we can, each moved to the
/// moment of the first reading.
fn positions(players: &[&Player]) -> Vec<f64> {
    let t0 = Instant::now();
    players
        .iter()
        .map(|p| {
            let pos = p.position();
            let late = t0.elapsed().as_secs_f64();
            if p.paused() {
                pos
            } else {
                pos - late
            }
        })
        .collect()
}

fn spread(v: &[f64]) -> f64 {
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    max - min
}

/// A host offering `movies/film.mp4` and `others` members holding none of it.
fn movie_lab(others: &[&str], secs: u32, kbit: u32) -> (Lab, Vec<Node>) {
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    make_video(&movies.join("film.mp4"), secs, kbit);
    host.start();
    let mut nodes = vec![host];
    for name in others {
        let mut n = lab.node(name);
        n.start();
        join(&nodes[0], &n);
        nodes.push(n);
    }
    // Every member has heard that the host offers the share.
    for n in &nodes[1..] {
        assert!(
            wait_until(DEADLINE, || n.cli(&["ls", "movies"]).status.success()),
            "{} never saw the share",
            n.name
        );
    }
    (lab, nodes)
}

fn room(n: &Node) -> serde_json::Value {
    let out = n.ok(&["room", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out).expect("room --json")[0].clone()
}

#[test]
fn a_member_holding_nothing_starts_playing_before_the_file_is_there() {
    if !root_or_skip("a_member_holding_nothing_starts_playing_before_the_file_is_there") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    let (_lab, nodes) = movie_lab(&["a"], 60, 2000);
    // The holder's uplink at 4 Mbit/s: the 15 MB file takes about 30 s to arrive whole.
    nodes[0].shape(4);
    let started = Instant::now();
    let p = Player::start(&nodes[1], "movies/film.mp4");
    assert!(
        wait_until(DEADLINE, || p.position() > 0.0),
        "no frame was ever decoded"
    );
    let first_frame = started.elapsed();
    let r = room(&nodes[1]);
    let (have, size) = (
        r["have_bytes"].as_u64().unwrap(),
        r["size"].as_u64().unwrap(),
    );
    println!("time to first frame: {first_frame:?}; {have} of {size} bytes here then");
    assert!(
        have < size,
        "the whole file was there before playback began"
    );
}

#[test]
fn three_players_pause_seek_and_play_in_step() {
    if !root_or_skip("three_players_pause_seek_and_play_in_step") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    let (_lab, nodes) = movie_lab(&["a", "b"], 120, 500);
    let players: Vec<Player> = nodes
        .iter()
        .map(|n| Player::start(n, "movies/film.mp4"))
        .collect();
    let all: Vec<&Player> = players.iter().collect();
    assert!(
        wait_until(DEADLINE, || all
            .iter()
            .all(|p| !p.paused() && p.position() > 1.0)),
        "the three never all played: {}",
        describe(&nodes, &all)
    );

    // Pause on b: everyone pauses.
    let t = Instant::now();
    players[2]
        .call(serde_json::json!(["set_property", "pause", true]))
        .unwrap();
    assert!(
        wait_until(DEADLINE, || all.iter().all(|p| p.paused())),
        "not everyone paused"
    );
    let pause_latency = t.elapsed();
    println!("pause reached every player after {pause_latency:?}");
    assert!(
        pause_latency <= Duration::from_millis(200),
        "pause took {pause_latency:?} to reach every player"
    );
    assert!(
        wait_until(DEADLINE, || spread(&positions(&all)) <= 0.1),
        "paused players are not at one position: {:?}",
        positions(&all)
    );

    // Play on the host, then seek on a: everyone is at the new position.
    players[0]
        .call(serde_json::json!(["set_property", "pause", false]))
        .unwrap();
    assert!(wait_until(DEADLINE, || all.iter().all(|p| !p.paused())));
    let seek_at = Instant::now();
    players[1]
        .call(serde_json::json!(["seek", 60.0, "absolute+exact"]))
        .unwrap();
    let landed = wait_until(DEADLINE, || {
        let v = positions(&all);
        let expect = 60.0 + seek_at.elapsed().as_secs_f64();
        v.iter().all(|p| (p - expect).abs() <= 1.0) && spread(&v) <= 0.1
    });
    assert!(
        landed,
        "not all at the new position: {:?}{}",
        positions(&all),
        describe(&nodes, &all)
    );

    // Thirty seconds of playing: the largest gap between any two stays within 100 ms.
    let from = players[0].position();
    let mut worst: f64 = 0.0;
    let played = wait_until(Duration::from_secs(90), || {
        worst = worst.max(spread(&positions(&all)));
        players[0].position() >= from + 30.0
    });
    assert!(played, "playback stalled");
    let end = spread(&positions(&all));
    println!(
        "largest gap over 30 s: {:.0} ms; at the end: {:.0} ms",
        worst * 1000.0,
        end * 1000.0
    );
    assert!(
        end <= 0.1,
        "players {:.0} ms apart after 30 s",
        end * 1000.0
    );
}

#[test]
fn a_late_joiner_starts_at_the_room_and_a_player_or_member_that_goes_stops_nobody() {
    if !root_or_skip(
        "a_late_joiner_starts_at_the_room_and_a_player_or_member_that_goes_stops_nobody",
    ) {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    let (_lab, mut nodes) = movie_lab(&["a", "b"], 120, 500);
    let host = Player::start(&nodes[0], "movies/film.mp4");
    let mut a = Player::start(&nodes[1], "movies/film.mp4");
    assert!(wait_until(DEADLINE, || host.position() > 5.0));

    // b arrives while the room plays: it starts where the room is, not at 0.
    let b = Player::start(&nodes[2], "movies/film.mp4");
    assert!(
        wait_until(DEADLINE, || {
            let v = positions(&[&host, &b]);
            !b.paused() && spread(&v) <= 0.1
        }),
        "b never caught up with the room: {:?}",
        positions(&[&host, &b])
    );

    // a's player dies: the others play on, and a leaves the room.
    a.kill();
    let at = host.position();
    assert!(
        wait_until(DEADLINE, || host.position() > at + 3.0
            && b.position() > at + 3.0),
        "the others stopped when a's player died"
    );
    assert!(
        wait_until(DEADLINE, || room(&nodes[0])["watchers"]
            .as_array()
            .map_or(0, |w| w.len())
            == 2),
        "a is still listed: {}",
        room(&nodes[0])
    );

    // b's whole node goes: the host plays on.
    nodes[2].kill9();
    let at = host.position();
    assert!(
        wait_until(DEADLINE, || host.position() > at + 3.0 && !host.paused()),
        "the host stopped when b's node went"
    );
}

/// Whether `program` is installed; without it a test is a failure under CI.
fn has(program: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(std::env::var("CI").is_err(), "{program} is not installed");
        eprintln!("SKIPPED ({program} not installed: apt-get install -y {program})");
    }
    found
}

/// Each player's state and each node's room, for a failure message.
fn describe(nodes: &[Node], players: &[&Player]) -> String {
    let mut out = String::new();
    for (n, p) in nodes.iter().zip(players) {
        out += &format!(
            "\n{}: paused {} at {:.2}\n  room {}\n  watch log: {}",
            n.name,
            p.paused(),
            p.position(),
            room(n),
            std::fs::read_to_string(n.dir.join("watch.log")).unwrap_or_default()
        );
    }
    out
}
