//! Headless mpv players for the watch-along tests and benchmark: test videos made with
//! ffmpeg, `watchalong watch` run in a node's namespace, and the player's IPC socket to
//! act as the person in front of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// A test video: `secs` seconds of a moving test pattern with a tone, a keyframe every
/// second, at about `kbit` kbit/s.
pub fn make_video(path: &Path, secs: u32, kbit: u32) {
    make_video_sized(path, secs, kbit, "320x240", 25);
}

/// The same at `size` (`WxH`) and `fps` frames a second: a long video for a soak is
/// cheaper to encode small and slow.
pub fn make_video_sized(path: &Path, secs: u32, kbit: u32, size: &str, fps: u32) {
    make_video_with(path, secs, kbit, size, fps, true);
}

/// The same with its index (`moov`) first when `index_first`, else at the end, where
/// ffmpeg writes it by default and many files have it: a player then reads the file's
/// end before its first frame.
pub fn make_video_with(path: &Path, secs: u32, kbit: u32, size: &str, fps: u32, index_first: bool) {
    let movflags = if index_first {
        "+faststart"
    } else {
        "-faststart"
    };
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
            &format!("testsrc=size={size}:rate={fps}"),
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
            &fps.to_string(),
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
            movflags,
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
pub struct Player {
    child: Option<Child>,
    pub ipc: PathBuf,
    pub name: String,
}

impl Player {
    pub fn start(n: &Node, file: &str) -> Player {
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
        Player::ready(n, ipc, Some(child), &n.dir.join("watch.log"))
    }

    /// A player started some other way (writing to `log`), known by its IPC socket.
    pub fn attach(n: &Node, ipc: PathBuf, log: &Path) -> Player {
        Player::ready(n, ipc, None, log)
    }

    /// Waits until the player at `ipc` answers; `log` is shown if it never does.
    fn ready(n: &Node, ipc: PathBuf, child: Option<Child>, log: &Path) -> Player {
        let p = Player {
            child,
            ipc,
            name: n.name.clone(),
        };
        assert!(
            wait_until(DEADLINE, || p.get("time-pos").is_some()),
            "{}'s player never started: {}",
            p.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        p
    }

    pub fn call(&self, command: serde_json::Value) -> Option<serde_json::Value> {
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

    pub fn get(&self, prop: &str) -> Option<serde_json::Value> {
        self.call(serde_json::json!(["get_property", prop]))
            .filter(|v| !v.is_null())
    }

    pub fn position(&self) -> f64 {
        self.get("time-pos")
            .and_then(|v| v.as_f64())
            .unwrap_or(-1.0)
    }

    pub fn paused(&self) -> bool {
        self.get("pause").and_then(|v| v.as_bool()).unwrap_or(false)
    }

    pub fn kill(&mut self) {
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
pub fn positions(players: &[&Player]) -> Vec<f64> {
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

pub fn spread(v: &[f64]) -> f64 {
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    max - min
}

/// Whether `program` is installed; without it a test is skipped, or fails under CI.
pub fn has(program: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        // The harness names each test's thread after the test.
        let test = std::thread::current()
            .name()
            .unwrap_or("this test")
            .to_string();
        skip(
            &test,
            &format!("needs {program}: apt-get install -y {program}"),
        );
    }
    found
}

/// How long after `started` the player first reports a position past 0 (a frame shown).
pub fn first_frame(p: &Player, started: Instant) -> Duration {
    assert!(
        wait_until(Duration::from_secs(60), || p.position() > 0.0),
        "{} never showed a frame",
        p.name
    );
    started.elapsed()
}
