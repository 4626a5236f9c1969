//! Watching in a browser: headless Chromium plays the daemon's watch page in the same
//! room as a headless mpv, and the page's endpoints refuse what a stranger sends them.
//! Chromium is driven by `tests/browser/drive.js` (playwright-core, installed by
//! `scripts/test.sh`) inside the member's namespace; the test keeps the clock.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::player::*;
use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// Whether Chromium, node and the driver's modules are here (`scripts/test.sh` installs
/// them); skipped loudly otherwise.
fn browser_or_skip(test: &str) -> bool {
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules/playwright-core");
    let ok = has("mpv")
        && has("ffmpeg")
        && has("node")
        && Path::new("/usr/bin/chromium").exists()
        && modules.exists();
    if !ok {
        skip(test, "needs mpv, ffmpeg, node, /usr/bin/chromium and tests/browser/node_modules (scripts/test.sh installs them)");
    }
    ok
}

/// `watchalong watch FILE --player browser --json` running in `n`'s namespace: the page's
/// URL, and the command, which keeps the stream open until it is stopped (on drop).
struct Watching {
    child: Child,
    url: String,
}

impl Watching {
    fn start(n: &Node, file: &str) -> Watching {
        let log = std::fs::File::create(n.dir.join("watch-browser.log")).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &n.ns.name])
            .arg(&n.bin)
            .arg("--config")
            .arg(&n.config)
            .args(["watch", file, "--player", "browser", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn watch");
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let mut w = Watching {
            child,
            url: String::new(),
        };
        assert!(
            read.is_ok_and(|n| n > 0),
            "watch --player browser printed nothing: {}",
            std::fs::read_to_string(n.dir.join("watch-browser.log")).unwrap_or_default()
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("watch --json line");
        w.url = v["url"].as_str().expect("url").to_string();
        w
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        // SIGTERM first: the command leaves the room and closes its stream.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless Chromium showing the page at a URL, driven over the driver's stdin and stdout.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its profile: unique, removed on drop; every Chromium process names it.
    data: tempfile::TempDir,
    log: PathBuf,
}

impl Browser {
    fn open(n: &Node, url: &str) -> Browser {
        let data = tempfile::Builder::new()
            .prefix(&format!("watchalong-chromium-{}-", n.name))
            .tempdir()
            .unwrap();
        let log = n.dir.join("chromium.log");
        let drive = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/drive.js");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &n.ns.name, "node"])
            .arg(drive)
            .arg(url)
            .arg(data.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn node");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut b = Browser {
            child,
            stdin,
            stdout,
            data,
            log,
        };
        let ready = b.line();
        assert!(
            ready.get("ready").is_some(),
            "the page never opened: {ready} {}",
            b.log()
        );
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        match self.stdout.read_line(&mut l) {
            Ok(n) if n > 0 => serde_json::from_str(&l).unwrap_or(serde_json::Value::Null),
            _ => panic!("the browser driver ended: {}", self.log()),
        }
    }

    fn send(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.stdin, "{cmd}").expect("driver stdin");
        self.line()
    }

    /// (paused, currentTime, playbackRate).
    fn state(&mut self) -> (bool, f64, f64) {
        let (paused, time, rate, _) = self.state_at();
        (paused, time, rate)
    }

    /// [`Browser::state`] and when the page read it (seconds since the epoch).
    fn state_at(&mut self) -> (bool, f64, f64, f64) {
        let v = self.send("state");
        (
            v["paused"].as_bool().unwrap_or(true),
            v["time"].as_f64().unwrap_or(-1.0),
            v["rate"].as_f64().unwrap_or(0.0),
            v["at"].as_f64().unwrap_or(0.0) / 1000.0,
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's own processes, if the driver could not close them: each names the
        // profile folder, which is ours alone.
        let profile = self.data.path().to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmd).contains(&profile) {
                // SAFETY: plain kill(2) on a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn epoch_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The page's and mpv's positions, the page's moved to the moment mpv was read (the
/// middle of mpv's answer) by the page's own time of reading: the driver's round trip,
/// tens of ms on a busy machine, is not taken for drift.
fn page_and_mpv(b: &mut Browser, p: &Player) -> (f64, f64) {
    let before = epoch_s();
    let mpv = p.position();
    let mpv_at = (before + epoch_s()) / 2.0;
    let (paused, page, rate, at) = b.state_at();
    let page = if paused {
        page
    } else {
        page - (at - mpv_at) * rate
    };
    (page, mpv)
}

/// A host holding `movies/film.mp4` (two minutes) and a member `a` holding nothing.
fn two_members() -> (Lab, Node, Node) {
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    make_video(&movies.join("film.mp4"), 120, 500);
    host.start();
    let mut a = lab.node("a");
    a.start();
    join(&host, &a);
    assert!(
        wait_until(DEADLINE, || a.cli(&["ls", "movies"]).status.success()),
        "a never saw the share"
    );
    (lab, host, a)
}

#[test]
fn a_page_and_mpv_in_one_room_pause_seek_and_play_thirty_seconds_in_step() {
    let test = "a_page_and_mpv_in_one_room_pause_seek_and_play_thirty_seconds_in_step";
    if !root_or_skip(test) || !browser_or_skip(test) {
        return;
    }
    let (lab, host, a) = two_members();
    let mpv = Player::start(&host, "movies/film.mp4");
    let watching = Watching::start(&a, "movies/film.mp4");
    let mut page = Browser::open(&a, &watching.url);
    let in_step = wait_until(DEADLINE, || {
        let (page_pos, mpv_pos) = page_and_mpv(&mut page, &mpv);
        !mpv.paused() && !page.state().0 && mpv_pos > 1.0 && (page_pos - mpv_pos).abs() <= 0.1
    });
    assert!(
        in_step,
        "the page never played in step with mpv: page {:?}, mpv at {:.2}\n{}",
        page.state(),
        mpv.position(),
        page.log()
    );

    // A pause in the page reaches mpv: timed from the moment the page is told to pause
    // to mpv reporting it, polled as fast as mpv answers.
    let bound = Duration::from_millis(200) + lab.rtt();
    let t = Instant::now();
    let told = page.send("pause");
    assert_eq!(told["paused"], true, "{told}");
    let mut reached = None;
    while t.elapsed() < DEADLINE {
        if mpv.paused() {
            reached = Some(t.elapsed());
            break;
        }
    }
    let latency = reached.expect("mpv never paused");
    println!("a pause in the page reached mpv after {latency:?}");
    assert!(
        latency <= bound,
        "the pause took {latency:?} (bound {bound:?})"
    );

    // Play again from the page; then a seek in mpv moves the page there.
    page.send("play");
    assert!(
        wait_until(DEADLINE, || !mpv.paused() && !page.state().0),
        "not both playing again"
    );
    let seek_at = Instant::now();
    mpv.call(serde_json::json!(["seek", 60.0, "absolute+exact"]))
        .expect("mpv seek");
    let followed = wait_until(DEADLINE, || {
        let (page_pos, mpv_pos) = page_and_mpv(&mut page, &mpv);
        mpv_pos >= 60.0 && (page_pos - mpv_pos).abs() <= 0.1
    });
    assert!(
        followed,
        "the page did not follow mpv's seek: page {:?}, mpv at {:.2}",
        page.state(),
        mpv.position()
    );
    println!(
        "the page was within 0.1 s of mpv's seek after {:?}",
        seek_at.elapsed()
    );

    // Thirty seconds of play, sampled all along; then the two are within 100 ms (the
    // middle of five readings: one reading may be late on a shared machine). Along the
    // way 95% of the readings are within 150 ms, not the 100 ms two mpvs keep
    // (tests/watch.rs): the page runs some 50 ms behind mpv on average while each daemon
    // sees its own player within 20 ms of the room (see docs/architecture.md).
    let from = mpv.position();
    let mut gaps = Vec::new();
    let played = wait_until(Duration::from_secs(90), || {
        let (page_pos, mpv_pos) = page_and_mpv(&mut page, &mpv);
        gaps.push(page_pos - mpv_pos);
        mpv_pos >= from + 30.0
    });
    assert!(played, "playback stalled");
    assert!(gaps.len() >= 100, "only {} readings in 30 s", gaps.len());
    let last: Vec<f64> = (0..5)
        .map(|_| {
            let (p, m) = page_and_mpv(&mut page, &mpv);
            (p - m).abs()
        })
        .collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let mut sorted: Vec<f64> = gaps.iter().map(|g| g.abs()).collect();
    sorted.sort_by(f64::total_cmp);
    let p95 = sorted[sorted.len() * 95 / 100];
    println!(
        "page to mpv over 30 s ({} readings): page ahead by {:.0} ms on average, p95 {:.0} ms apart, worst {:.0} ms; after: {last:.3?}",
        sorted.len(),
        mean * 1000.0,
        p95 * 1000.0,
        sorted[sorted.len() - 1] * 1000.0
    );
    assert!(
        p95 <= 0.15,
        "over 5% of readings more than 150 ms apart: p95 {:.0} ms",
        p95 * 1000.0
    );
    let mut last_sorted = last.clone();
    last_sorted.sort_by(f64::total_cmp);
    assert!(
        last_sorted[2] <= 0.1,
        "after 30 s the two are apart: {last:?}"
    );

    // The page, as a person sees it, kept as the run's artefact.
    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("browser-room.png");
    let _ = std::fs::remove_file(&shot);
    let saved = page.send(&format!("screenshot {}", shot.display()));
    assert!(saved.get("saved").is_some(), "{saved}");
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a screenshot of a page"
    );
}

/// One HTTP/1.1 request from inside `n`'s namespace: (status, head, body).
fn http(
    n: &Node,
    method: &str,
    url: &str,
    host: Option<&str>,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::Read;
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let host = host.unwrap_or(addr).to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (addr, body) = (addr.to_string(), body.to_vec());
    in_netns(&n.ns.name, move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        // The server may answer (and close) before a refused body is all sent.
        let _ = s.write_all(&body);
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an answer");
        let head = String::from_utf8_lossy(&all[..split]).to_string();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), all[split + 4..].to_vec())
    })
}

#[test]
fn a_page_is_refused_without_its_token_or_by_a_foreign_host_bad_reports_do_no_harm_and_it_ends_with_its_command(
) {
    let test =
        "a_page_is_refused_without_its_token_or_by_a_foreign_host_bad_reports_do_no_harm_and_it_ends_with_its_command";
    if !root_or_skip(test) || !has("ffmpeg") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    make_video(&movies.join("film.mp4"), 10, 300);
    host.start();
    let w = Watching::start(&host, "movies/film.mp4");
    let page = w.url.clone();
    let (base, token) = {
        let t = page
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        (
            page.trim_end_matches('/')
                .trim_end_matches(t.as_str())
                .to_string(),
            t,
        )
    };
    assert_eq!(token.len(), 64, "{page}");
    let port = base
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    // The page, under its token, with its protections.
    let (status, head, body) = http(&host, "GET", &page, None, b"");
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("<video") && body.contains("film.mp4"),
        "{body}"
    );
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "an external resource: {body}"
    );
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("referrer-policy: no-referrer"), "{head}");

    // Without the token, with another, or by a rebound name: refused as the stream is.
    let wrong = "0".repeat(64);
    assert_eq!(http(&host, "GET", &base, None, b"").0, 404);
    assert_eq!(
        http(&host, "GET", &format!("{base}{wrong}/"), None, b"").0,
        404
    );
    assert_eq!(
        http(
            &host,
            "GET",
            &page,
            Some(&format!("evil.example:{port}")),
            b""
        )
        .0,
        403
    );
    assert_eq!(http(&host, "GET", &page, Some("evil.example"), b"").0, 403);

    // The player endpoint: a good report is answered with commands ...
    let report = br#"{"page":"0123456789abcdef","paused":true,"time":0,"rate":1,"seeking":false,"seeked":0,"buffered":0,"starved":false}"#;
    let player = format!("{page}player");
    let (status, _, answer) = http(&host, "POST", &player, None, report);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let answer: serde_json::Value = serde_json::from_slice(&answer).expect("json");
    assert!(answer["commands"].is_array(), "{answer}");
    // ... but not without the token, by a foreign Host, nor too big, nor malformed.
    assert_eq!(
        http(&host, "POST", &format!("{base}player"), None, report).0,
        404
    );
    assert_eq!(
        http(
            &host,
            "POST",
            &format!("{base}{wrong}/player"),
            None,
            report
        )
        .0,
        404
    );
    assert_eq!(
        http(
            &host,
            "POST",
            &player,
            Some(&format!("evil.example:{port}")),
            report
        )
        .0,
        403
    );
    // (2 KiB: the server takes it all in with the head, so its refusal is not lost to a
    // reset for unread bytes.)
    assert_eq!(http(&host, "POST", &player, None, &vec![b' '; 2048]).0, 413);
    for bad in [
        &b"{"[..],
        b"[]",
        br#"{"page":"0123456789abcdef","paused":true}"#,
        br#"{"page":"0123456789abcdef","paused":true,"time":-5,"rate":1,"seeking":false,"seeked":0,"buffered":0,"starved":false}"#,
        br#"{"page":"<b>x</b>","paused":true,"time":0,"rate":1,"seeking":false,"seeked":0,"buffered":0,"starved":false}"#,
    ] {
        assert_eq!(http(&host, "POST", &player, None, bad).0, 400, "{}", String::from_utf8_lossy(bad));
    }
    // A second page while the first still reports is refused; the first goes on.
    let other = String::from_utf8_lossy(report).replace("0123456789abcdef", "fedcba9876543210");
    assert_eq!(http(&host, "POST", &player, None, other.as_bytes()).0, 409);
    // No harm done: the page, its report and the stream still answer, and the daemon runs.
    assert_eq!(http(&host, "POST", &player, None, report).0, 200);
    assert_eq!(http(&host, "GET", &page, None, b"").0, 200);
    host.ok(&["status"]);

    // The page lives as long as its command: stopped (SIGTERM), its token opens nothing.
    drop(w);
    assert!(
        wait_until(DEADLINE, || http(&host, "GET", &page, None, b"").0 == 404),
        "the page outlived its command"
    );
    assert_eq!(http(&host, "POST", &player, None, report).0, 404);
}
