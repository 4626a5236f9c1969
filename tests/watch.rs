//! Watching along: a shared video played with mpv (headless) while it arrives, and every
//! member's player kept in step with the others.

mod common;

use std::time::{Duration, Instant};

use common::player::*;
use common::*;
use watchalong::control::{RoomView, WatchReply};

const DEADLINE: Duration = Duration::from_secs(60);

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

/// The first room `n` lists, if any.
fn room(n: &Node) -> Option<RoomView> {
    let out = n.ok(&["room", "--json"]);
    serde_json::from_str::<Vec<RoomView>>(&out)
        .expect("room --json")
        .into_iter()
        .next()
}

/// `watch --player none --json` of `file` on `n`.
fn watch_url(n: &Node, file: &str) -> String {
    let w: WatchReply =
        serde_json::from_str(&n.ok(&["watch", file, "--player", "none", "--json"])).unwrap();
    w.url
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
    let r = room(&nodes[1]).expect("a room");
    let (have, size) = (r.have_bytes.unwrap(), r.size.unwrap());
    println!("time to first frame: {first_frame:?}; {have} of {size} bytes here then");
    assert!(
        have < size,
        "the whole file was there before playback began"
    );

    // The endpoint answers ranges, and only under the URL `watch` hands out.
    let url = watch_url(&nodes[1], "movies/film.mp4");
    let film = std::fs::read(nodes[0].dir.join("share-movies/film.mp4")).unwrap();
    let (status, body) = http_get(&nodes[1], &url, Some("bytes=1000-1999"));
    assert_eq!(status, 206);
    assert_eq!(body, film[1000..2000]);
    let (_, tail) = http_get(&nodes[1], &url, Some("bytes=-10"));
    assert_eq!(tail, film[film.len() - 10..]);
    let guessed = url.replacen(url.split('/').nth(3).unwrap(), "0000", 1);
    assert_eq!(http_get(&nodes[1], &guessed, None).0, 404);
}

/// A plain HTTP/1.1 GET from inside `n`'s namespace: (status, body).
fn http_get(n: &Node, url: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    http_get_as(n, url, None, range)
}

/// [`http_get`] with the `Host` header given (the URL's address when `None`).
fn http_get_as(n: &Node, url: &str, host: Option<&str>, range: Option<&str>) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let host = host.unwrap_or(addr).to_string();
    let (addr, path, range) = (
        addr.to_string(),
        path.to_string(),
        range.map(str::to_string),
    );
    in_netns(&n.ns.name, move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        if let Some(r) = range {
            req += &format!("Range: {r}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&all[..split]).to_string();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, all[split + 4..].to_vec())
    })
}

/// Every process's command line, read from /proc (the PID namespace is shared).
fn command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

#[test]
fn a_stream_url_opens_its_own_stream_only_by_a_loopback_host_while_it_plays_and_is_on_no_command_line(
) {
    if !root_or_skip("a_stream_url_opens_its_own_stream_only_by_a_loopback_host_while_it_plays_and_is_on_no_command_line") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    make_video(&movies.join("film.mp4"), 20, 300);
    let other = write_random(&movies.join("other.bin"), 100_000, "other");
    host.start();
    let p = Player::start(&host, "movies/film.mp4");
    assert!(
        wait_until(DEADLINE, || p.position() > 0.0),
        "no frame was ever decoded (the player's Host refused?)"
    );
    // The URL mpv plays, as mpv itself tells it over its socket.
    let film_url = p
        .get("path")
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("mpv's path");
    let film_token = film_url.split('/').nth(3).unwrap().to_string();
    let port = film_url
        .split('/')
        .nth(2)
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(film_url.starts_with("http://127.0.0.1:"), "{film_url}");

    // mpv runs, and neither its command line nor any other holds the token.
    let lines = command_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(p.ipc.to_str().unwrap()) && l.contains("--idle")),
        "mpv is not among the processes: {lines:?}"
    );
    let holders: Vec<&String> = lines.iter().filter(|l| l.contains(&film_token)).collect();
    assert!(
        holders.is_empty(),
        "command lines holding the token: {holders:?}"
    );

    // A page whose name was rebound to 127.0.0.1 is refused; the loopback names are not.
    let film = std::fs::read(movies.join("film.mp4")).unwrap();
    let evil = format!("evil.example:{port}");
    assert_eq!(
        http_get_as(&host, &film_url, Some(&evil), Some("bytes=0-9")).0,
        403
    );
    assert_eq!(
        http_get_as(&host, &film_url, Some("evil.example"), Some("bytes=0-9")).0,
        403
    );
    for name in ["127.0.0.1", "localhost", "[::1]"] {
        let (status, body) = http_get_as(
            &host,
            &film_url,
            Some(&format!("{name}:{port}")),
            Some("bytes=0-9"),
        );
        assert_eq!((status, body.as_slice()), (206, &film[..10]), "Host {name}");
    }

    // A second stream has its own token, and neither token opens the other's file.
    let other_url = watch_url(&host, "movies/other.bin");
    let other_token = other_url.split('/').nth(3).unwrap().to_string();
    assert_ne!(other_token, film_token);
    let (status, body) = http_get(&host, &other_url, None);
    assert_eq!((status, blake3::hash(&body)), (200, other));
    let crossed = other_url.replacen(&other_token, &film_token, 1);
    assert_eq!(http_get(&host, &crossed, Some("bytes=0-9")).0, 404);
    let crossed = film_url.replacen(&film_token, &other_token, 1);
    assert_eq!(http_get(&host, &crossed, Some("bytes=0-9")).0, 404);

    // The player quits: its stream closes and its token opens nothing; the other lives.
    p.call(serde_json::json!(["quit"]));
    assert!(
        wait_until(DEADLINE, || http_get(&host, &film_url, Some("bytes=0-9")).0
            == 404),
        "the token outlived its stream"
    );
    assert_eq!(http_get(&host, &other_url, Some("bytes=0-9")).0, 206);
}

#[test]
fn two_players_pause_seek_change_speed_and_play_in_step() {
    if !root_or_skip("two_players_pause_seek_change_speed_and_play_in_step") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    in_step(&["a"]);
}

#[test]
fn three_players_pause_seek_change_speed_and_play_in_step() {
    if !root_or_skip("three_players_pause_seek_change_speed_and_play_in_step") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    in_step(&["a", "b"]);
}

/// The host and `others` watch one file; the last member pauses, the host plays, the
/// first other member seeks and changes the speed; then they play for 30 s.
fn in_step(others: &[&str]) {
    let (lab, nodes) = movie_lab(others, 120, 500);
    // A pause travels at least half a round trip of the lab's internet, and its answer
    // the other half: the bound is 200 ms beyond the path's own round trip.
    let pause_bound = Duration::from_millis(200) + lab.rtt();
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

    // Pause on the last member: everyone pauses.
    let last = players.len() - 1;
    let t = Instant::now();
    players[last]
        .call(serde_json::json!(["set_property", "pause", true]))
        .unwrap();
    assert!(
        wait_until(DEADLINE, || all.iter().all(|p| p.paused())),
        "not everyone paused"
    );
    let pause_latency = t.elapsed();
    println!("pause reached every player after {pause_latency:?}");
    assert!(
        pause_latency <= pause_bound,
        "pause took {pause_latency:?} to reach every player (bound {pause_bound:?})"
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

    // Half again as fast on a: everyone follows, still in step.
    players[1]
        .call(serde_json::json!(["set_property", "speed", 1.5]))
        .unwrap();
    let faster = wait_until(DEADLINE, || {
        all.iter().all(|p| {
            p.get("speed")
                .and_then(|v| v.as_f64())
                .is_some_and(|s| (s - 1.5).abs() <= 0.15)
        }) && spread(&positions(&all)) <= 0.1
    });
    assert!(
        faster,
        "not all at 1.5x in step: {}",
        describe(&nodes, &all)
    );
    players[1]
        .call(serde_json::json!(["set_property", "speed", 1.0]))
        .unwrap();

    // Back at 1x and in step before the measure starts: the change of speed is not
    // part of it.
    assert!(
        wait_until(DEADLINE, || {
            all.iter().all(|p| {
                p.get("speed")
                    .and_then(|v| v.as_f64())
                    .is_some_and(|s| (s - 1.0).abs() <= 0.15)
            }) && spread(&positions(&all)) <= 0.1
        }),
        "not all back at 1x in step: {}",
        describe(&nodes, &all)
    );

    // Thirty seconds of playing, sampled all along: 95% of the readings show the players
    // within 100 ms of each other, and none more than 250 ms apart. (A reading is six IPC
    // round trips on a shared machine and a frame lasts 40 ms: one reading may be late.)
    let from = players[0].position();
    let mut gaps: Vec<f64> = Vec::new();
    let played = wait_until(Duration::from_secs(90), || {
        gaps.push(spread(&positions(&all)));
        players[0].position() >= from + 30.0
    });
    assert!(played, "playback stalled");
    assert!(
        gaps.len() >= 100,
        "only {} readings in 30 s: too few to judge",
        gaps.len()
    );
    gaps.sort_by(f64::total_cmp);
    let p95 = gaps[gaps.len() * 95 / 100];
    let worst = gaps[gaps.len() - 1];
    println!(
        "gaps over 30 s ({} readings): p95 {:.0} ms, worst {:.0} ms",
        gaps.len(),
        p95 * 1000.0,
        worst * 1000.0
    );
    assert!(
        p95 <= 0.1,
        "players more than 100 ms apart in over 5% of readings: p95 {:.0} ms",
        p95 * 1000.0
    );
    assert!(
        worst <= 0.25,
        "players {:.0} ms apart at worst",
        worst * 1000.0
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
    let mut played_from_the_start = false;
    assert!(
        wait_until(DEADLINE, || {
            let v = positions(&[&host, &b]);
            // Readings taken while its first seek is under way may still say 0; a
            // player that really plays from the start gets past half a second.
            played_from_the_start |= !b.paused() && v[1] > 0.5 && v[1] < v[0] - 1.0;
            !b.paused() && spread(&v) <= 0.1
        }),
        "b never caught up with the room: {:?}",
        positions(&[&host, &b])
    );
    assert!(
        !played_from_the_start,
        "b played from the start before joining the room"
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
        wait_until(DEADLINE, || room(&nodes[0]).map_or(0, |r| r.watchers.len())
            == 2),
        "a is still listed: {:?}",
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

/// Each player's state and each node's room, for a failure message.
fn describe(nodes: &[Node], players: &[&Player]) -> String {
    let mut out = String::new();
    for (n, p) in nodes.iter().zip(players) {
        out += &format!(
            "\n{}: paused {} at {:.2}\n  room {:?}\n  watch log: {}",
            n.name,
            p.paused(),
            p.position(),
            room(n),
            std::fs::read_to_string(n.dir.join("watch.log")).unwrap_or_default()
        );
    }
    out
}

#[test]
fn a_player_that_runs_dry_holds_the_room_until_it_has_enough_again() {
    if !root_or_skip("a_player_that_runs_dry_holds_the_room_until_it_has_enough_again") {
        return;
    }
    if !has("mpv") || !has("ffmpeg") {
        return;
    }
    // The video over an uplink half its rate: a's player must run out. The rate is the
    // file's own, not the one asked of ffmpeg: a test pattern encodes far below it
    // (0.8 Mbit/s for 3 asked), and an uplink just above the real rate ran dry only at
    // the deadline (CI of 6583328). Much less starves the room's own messages on the
    // same uplink. Two minutes long: holding and resuming may take most of a minute at
    // a distance, and a video that ends first pauses every player for good.
    let secs = 120;
    let (_lab, nodes) = movie_lab(&["a"], secs, 3000);
    let size = std::fs::metadata(nodes[0].dir.join("share-movies/film.mp4"))
        .expect("the film")
        .len();
    let kbit = (size * 8 / 1000 / u64::from(secs)) as u32;
    let host = Player::start(&nodes[0], "movies/film.mp4");
    assert!(wait_until(DEADLINE, || host.position() > 0.5));
    nodes[0].shape_kbit((kbit / 2).max(64));
    let a = Player::start(&nodes[1], "movies/film.mp4");
    let held = wait_until(DEADLINE, || {
        room(&nodes[0]).is_some_and(|r| r.state.held) && host.paused()
    });
    assert!(
        held,
        "the room was not held: {}",
        describe(&nodes, &[&host, &a])
    );

    // The link is back: once a has enough ahead, both play on from one position.
    let o = nodes[0]
        .ns
        .exec(&["tc", "qdisc", "del", "dev", "eth0", "root"]);
    assert!(o.status.success());
    let resumed = wait_until(DEADLINE, || {
        !host.paused() && !a.paused() && spread(&positions(&[&host, &a])) <= 0.1
    });
    assert!(
        resumed,
        "the room never resumed: {}",
        describe(&nodes, &[&host, &a])
    );
}
