//! The local player, kept in step with the room: mpv driven over its JSON IPC socket.
//! [`Follower`] is the sans-IO part — it tells a person's actions on the player (pause,
//! seek, speed) from the effects of our own commands, so nothing echoes between players,
//! and turns the room's state into commands (pause or play, seek when far off, nudge the
//! speed when a little off). [`run_mpv`] is the IO around it: the mpv process, its
//! socket, and the daemon's control API. The stream's URL holds its secret token, so it
//! goes to mpv over the IPC socket, never on mpv's command line (which every local user
//! can read), and that socket sits in a folder only we can open. It must not decide what
//! the room agrees on; that is [`crate::watch::room`]'s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::base::clock::now_ms;
use crate::control::{self, Change, FileRequest, Report, RoomView, WaitRequest, WatchReply};
use crate::control::{Client, ControlError};
use crate::watch::room::{correct, Correction, Playback, Stamp};

/// How often the player's position is read and reported.
const POLL: Duration = Duration::from_millis(100);
/// While a seek of ours is this recent and has not landed, no other correction is made.
const OUR_SEEK_WINDOW: Duration = Duration::from_millis(1500);
/// While a seek mpv began (a person's or ours) has not landed, for at most this long, no
/// correction is made: mpv already reads the seek's target as its position, and taking
/// that for drift would seek back and undo a person's seek before it is reported. A
/// seek into what has not arrived yet can take a few round trips to land.
const SEEK_UNDER_WAY: Duration = Duration::from_secs(10);
/// A seek that lands this close to where we sent the player is ours.
const OUR_SEEK_SLACK_S: f64 = 0.5;
/// mpv echoes a command of ours within this long, or never.
const OUR_ECHO_WINDOW: Duration = Duration::from_secs(3);
/// Speeds of ours awaiting their echo, at most (one per poll over the window).
const MAX_SENT_SPEEDS: usize = 32;
/// A paused player this far from the room's position is moved there.
const PAUSED_SLACK_S: f64 = 0.05;

#[derive(Debug, thiserror::Error)]
pub enum PlayerError {
    #[error("cannot start {program}: {source} (is it installed? `--player none` prints the URL instead)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not open its IPC socket {path} within 10 s")]
    Connect { program: String, path: PathBuf },
    #[error("cannot create a private folder for mpv's IPC socket in {path}: {source} (pass `--ipc PATH` in a folder only you can open)")]
    PrivateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lost the player's IPC socket: {0}")]
    Ipc(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A command for the player.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Pause(bool),
    Speed(f64),
    Seek(f64),
}

/// What we know of the player and what we last told it.
#[derive(Debug, Clone)]
pub struct Follower {
    pub paused: bool,
    pub speed: f64,
    /// Last position read, and when.
    pub position: f64,
    pub read_at: Option<Instant>,
    /// What we last commanded, to tell our effects from a person's actions.
    sent_pause: Option<bool>,
    /// The speeds we set lately, oldest first: mpv echoes each of them, possibly after
    /// we sent the next, so the last one alone would take an older echo for a person's.
    sent_speeds: std::collections::VecDeque<(Instant, f64)>,
    /// Our last seek: when, and to where.
    sent_seek: Option<(Instant, f64)>,
    /// mpv began a seek (ours or a person's), and when: where it lands tells which.
    seen_seek: Option<Instant>,
    /// mpv reports an observed property's value once when observing starts; that is
    /// not a person's doing.
    pause_known: bool,
    speed_known: bool,
    /// The room's rate (the speed we run at when in step).
    pub rate: f64,
}

impl Default for Follower {
    fn default() -> Self {
        Follower {
            paused: true,
            speed: 1.0,
            position: 0.0,
            read_at: None,
            sent_pause: None,
            sent_speeds: std::collections::VecDeque::new(),
            sent_seek: None,
            seen_seek: None,
            pause_known: false,
            speed_known: false,
            rate: 1.0,
        }
    }
}

impl Follower {
    /// Where the player is at `now`, from the last reading.
    pub fn position_now(&self, now: Instant) -> f64 {
        match self.read_at {
            Some(t) if !self.paused => {
                self.position + now.saturating_duration_since(t).as_secs_f64() * self.speed
            }
            _ => self.position,
        }
    }

    /// The player's `pause` changed; a change a person made is returned.
    pub fn on_pause(&mut self, paused: bool, now: Instant) -> Option<Change> {
        self.paused = paused;
        if !std::mem::replace(&mut self.pause_known, true) {
            return None;
        }
        if self.sent_pause.take() == Some(paused) {
            return None;
        }
        Some(Change {
            playing: !paused,
            position: self.position_now(now),
            rate: self.rate,
        })
    }

    /// The player's `speed` changed; a change a person made is returned.
    pub fn on_speed(&mut self, speed: f64, now: Instant) -> Option<Change> {
        self.speed = speed;
        if !std::mem::replace(&mut self.speed_known, true) {
            return None;
        }
        self.sent_speeds
            .retain(|(t, _)| now.saturating_duration_since(*t) < OUR_ECHO_WINDOW);
        // mpv echoes our commands in the order sent: this one, and those before it, are
        // behind us.
        if let Some(i) = self
            .sent_speeds
            .iter()
            .position(|(_, s)| (s - speed).abs() < 1e-6)
        {
            self.sent_speeds.drain(..=i);
            return None;
        }
        self.rate = speed;
        Some(Change {
            playing: !self.paused,
            position: self.position_now(now),
            rate: speed,
        })
    }

    /// The last speed we set, while its echo may still come.
    fn last_sent_speed(&self) -> Option<f64> {
        self.sent_speeds.back().map(|(_, s)| *s)
    }

    /// mpv began a seek.
    pub fn on_seek(&mut self, now: Instant) {
        self.seen_seek = Some(now);
    }

    /// mpv landed: true after a seek, when the position must be read to tell whose it
    /// was ([`Follower::landed_at`]).
    pub fn on_landed(&mut self) -> bool {
        self.seen_seek.take().is_some()
    }

    /// A seek landed at `position`: ours if that is where we sent the player, else a
    /// person's, returned as a change.
    pub fn landed_at(&mut self, position: f64, now: Instant) -> Option<Change> {
        self.on_position(position, now);
        if let Some((_, target)) = self.sent_seek {
            if (position - target).abs() <= OUR_SEEK_SLACK_S {
                self.sent_seek = None;
                return None;
            }
        }
        self.sent_seek = None;
        Some(Change {
            playing: !self.paused,
            position,
            rate: self.rate,
        })
    }

    pub fn on_position(&mut self, position: f64, at: Instant) {
        self.position = position;
        self.read_at = Some(at);
    }

    /// What to tell the player so it follows `state` (whose `at_ms` is on our clock).
    pub fn follow(&mut self, state: &Playback, now_ms: i64, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        self.rate = state.rate;
        // Nothing until the player's position is known: a late joiner must not play a
        // moment from the start before it is moved to the room's position.
        if self.read_at.is_none() {
            return out;
        }
        let want_paused = !state.running();
        let seeking = self
            .sent_seek
            .is_some_and(|(t, _)| now.saturating_duration_since(t) < OUR_SEEK_WINDOW)
            || self
                .seen_seek
                .is_some_and(|t| now.saturating_duration_since(t) < SEEK_UNDER_WAY);
        let expected = state.position_at(now_ms);
        let actual = self.position_now(now);
        let mut speed = state.rate;
        if !seeking {
            if want_paused {
                if (expected - actual).abs() > PAUSED_SLACK_S {
                    self.sent_seek = Some((now, expected));
                    self.on_position(expected, now);
                    out.push(Command::Seek(expected));
                }
            } else {
                match correct(expected, actual, state.rate) {
                    Correction::Seek(to) => {
                        self.sent_seek = Some((now, to));
                        self.on_position(to, now);
                        out.push(Command::Seek(to));
                    }
                    Correction::Nudge(s) => speed = s,
                    Correction::Rate(r) => speed = r,
                }
            }
        }
        if (self.speed - speed).abs() > 1e-3 && self.last_sent_speed() != Some(speed) {
            if self.sent_speeds.len() == MAX_SENT_SPEEDS {
                self.sent_speeds.pop_front();
            }
            self.sent_speeds.push_back((now, speed));
            out.push(Command::Speed(speed));
        }
        // Play (or pause) last, once the seek to the room's position is on its way.
        if self.paused != want_paused && self.sent_pause != Some(want_paused) {
            self.sent_pause = Some(want_paused);
            out.push(Command::Pause(want_paused));
        }
        out
    }
}

/// The IPC connection to one mpv.
struct Mpv {
    writer: tokio::net::unix::OwnedWriteHalf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    next_id: u64,
}

impl Mpv {
    async fn connect(
        program: &str,
        path: &Path,
        child: &mut tokio::process::Child,
    ) -> Result<Mpv, PlayerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = UnixStream::connect(path).await {
                let (r, w) = s.into_split();
                return Ok(Mpv {
                    writer: w,
                    lines: BufReader::new(r).lines(),
                    next_id: 100,
                });
            }
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                return Err(PlayerError::Connect {
                    program: program.to_string(),
                    path: path.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&mut self, command: Value) -> Result<u64, PlayerError> {
        self.next_id += 1;
        let line = json!({ "command": command, "request_id": self.next_id }).to_string() + "\n";
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(PlayerError::Ipc)?;
        Ok(self.next_id)
    }

    async fn apply(&mut self, c: &Command) -> Result<(), PlayerError> {
        let cmd = match c {
            Command::Pause(p) => json!(["set_property", "pause", p]),
            Command::Speed(s) => json!(["set_property", "speed", s]),
            Command::Seek(t) => json!(["seek", t, "absolute+exact"]),
        };
        self.send(cmd).await.map(|_| ())
    }
}

/// How `watch` runs mpv.
pub struct MpvOptions {
    pub program: String,
    /// mpv's IPC socket; `None` puts it in a [`PrivateDir`].
    pub ipc: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

/// A folder only this user can open (0700, a random name, made by us: an existing one,
/// or a link planted there, is refused), removed with what it holds when dropped. Whoever
/// can connect to mpv's IPC socket can make it open any file or URL, and read the
/// stream's URL from it.
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// A new one under `$XDG_RUNTIME_DIR` (already private to the user) if set, else
    /// under the temp folder.
    pub fn new() -> Result<PrivateDir, PlayerError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(std::env::temp_dir);
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut r);
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let path = base.join(format!("watchalong-mpv-{name}"));
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| PlayerError::PrivateDir {
                path: base.clone(),
                source,
            })?;
        Ok(PrivateDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Plays `w` in mpv, in step with the room, until the player exits.
pub async fn run_mpv(
    client: &Client,
    w: &WatchReply,
    opts: &MpvOptions,
) -> Result<(), PlayerError> {
    // The folder lives until this returns, after mpv (declared later, dropped first).
    let (ipc, _private) = match &opts.ipc {
        Some(p) => (p.clone(), None),
        None => {
            let d = PrivateDir::new()?;
            (d.path().join("mpv.sock"), Some(d))
        }
    };
    let _ = std::fs::remove_file(&ipc);
    // Idle, with no file: the URL follows over the IPC socket.
    let mut child = tokio::process::Command::new(&opts.program)
        .arg(format!("--input-ipc-server={}", ipc.display()))
        .arg("--idle=yes")
        .arg("--pause")
        .arg("--keep-open=yes")
        .arg(format!("--force-media-title={}", w.file))
        .args(&opts.extra_args)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PlayerError::Spawn {
            program: opts.program.clone(),
            source,
        })?;
    let mut mpv = Mpv::connect(&opts.program, &ipc, &mut child).await?;
    for (i, prop) in ["pause", "speed", "paused-for-cache"].iter().enumerate() {
        mpv.send(json!(["observe_property", i + 1, prop])).await?;
    }
    mpv.send(json!(["loadfile", w.url])).await?;
    let mut f = Follower::default();
    let mut room = RoomState::new(room_state(&w.state));
    let mut pending_change: Option<Change> = None;
    // The first watcher of a file starts it; later ones join where the room is.
    if room.state.stamp.counter == 0 {
        pending_change = Some(Change {
            playing: true,
            position: 0.0,
            rate: 1.0,
        });
    }
    let (views_tx, mut views) = tokio::sync::mpsc::channel::<RoomView>(8);
    let waiter = {
        let client = client.clone();
        let file = w.file.clone();
        let start = w.state.stamp.clone();
        let views_tx = views_tx.clone();
        tokio::spawn(async move {
            let mut stamp = start;
            loop {
                let req = WaitRequest {
                    file: file.clone(),
                    counter: stamp.counter,
                    node: stamp.node.clone(),
                    timeout_ms: 2_000,
                };
                match client.room_wait(&req).await {
                    Ok(v) => {
                        stamp = v.state.stamp.clone();
                        if views_tx.send(v).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
    };
    // Reports go from their own task: the daemon answers one after sending a change to
    // every member (a round trip away), and a loop waiting for that would read the
    // player's events late and take its own lateness for drift.
    let (reports_tx, mut reports_rx) = tokio::sync::mpsc::channel::<Report>(4);
    let reporter = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(r) = reports_rx.recv().await {
                match client.room_report(&r).await {
                    // Never waits for the player loop (which may be waiting for room in
                    // the report queue): a view that does not fit is dropped, and the
                    // long-poll brings the room's next one.
                    Ok(v) => {
                        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                            views_tx.try_send(v)
                        {
                            return;
                        }
                    }
                    Err(e) => log::warn!("room report: {e}"),
                }
            }
        })
    };
    let mut poll = tokio::time::interval(POLL);
    let (mut pos_id, mut cache_id, mut landed_id) = (0, 0, 0);
    let mut buffered = 0.0;
    let mut starved = false;
    let mut reports = 0u64;
    let result = loop {
        tokio::select! {
            line = mpv.lines.next_line() => {
                let Ok(Some(line)) = line else { break Ok(()) };
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                let now = Instant::now();
                match v.get("event").and_then(Value::as_str) {
                    Some("property-change") => {
                        let data = &v["data"];
                        let change = match v["name"].as_str() {
                            Some("pause") => data.as_bool().and_then(|p| f.on_pause(p, now)),
                            Some("speed") => data.as_f64().and_then(|s| f.on_speed(s, now)),
                            Some("paused-for-cache") => {
                                starved = data.as_bool().unwrap_or(false);
                                None
                            }
                            _ => None,
                        };
                        if change.is_some() {
                            pending_change = change;
                        }
                    }
                    Some("seek") => f.on_seek(Instant::now()),
                    Some("playback-restart") if f.on_landed() => {
                        landed_id = mpv.send(json!(["get_property", "time-pos"])).await?;
                    }
                    Some("end-file") | Some("shutdown") => break Ok(()),
                    _ => {}
                }
                if let Some(id) = v.get("request_id").and_then(Value::as_u64) {
                    let data = v.get("data").and_then(Value::as_f64);
                    if id == pos_id {
                        // Dated when read: mpv samples it when it answers, which may be
                        // late while it is busy, and this loop, which waits on nothing
                        // slow, reads it at once.
                        if let Some(p) = data { f.on_position(p, now) }
                    } else if id == cache_id {
                        buffered = data.unwrap_or(0.0);
                    } else if id == landed_id {
                        if let Some(change) = data.and_then(|p| f.landed_at(p, now)) {
                            pending_change = Some(change);
                        }
                    }
                }
                // A person's change goes out at once, not at the next poll.
                if let Some(change) = pending_change.take() {
                    pending_change = send_change(&reports_tx, &mut room, &w.file, &f, buffered, starved, change);
                }
            }
            Some(v) = views.recv() => {
                if room.offer(room_state(&v.state), Instant::now()) {
                    let cmds = f.follow(&room.state, now_ms(), Instant::now());
                    for c in &cmds { mpv.apply(c).await?; }
                }
            }
            _ = poll.tick() => {
                pos_id = mpv.send(json!(["get_property", "time-pos"])).await?;
                cache_id = mpv.send(json!(["get_property", "demuxer-cache-duration"])).await?;
                reports += 1;
                // Changes go at once; the plain report every other poll, unless the
                // reporter is still busy with earlier ones.
                if let Some(change) = pending_change.take() {
                    pending_change = send_change(&reports_tx, &mut room, &w.file, &f, buffered, starved, change);
                } else if reports.is_multiple_of(2) {
                    let _ = reports_tx.try_send(report(&w.file, &f, buffered, starved, None));
                }
                let cmds = f.follow(&room.state, now_ms(), Instant::now());
                for c in &cmds { mpv.apply(c).await?; }
            }
        }
    };
    waiter.abort();
    let _ = waiter.await;
    drop(reports_tx);
    reporter.abort();
    let _ = reporter.await;
    let _ = client
        .room_leave(&FileRequest {
            file: w.file.clone(),
        })
        .await;
    let _ = child.kill().await;
    result
}

/// The room's state as this player follows it. A person's change here is assumed at
/// once (the room will agree, unless a newer change elsewhere wins); until the room's
/// answer to it arrives, views older than it are stale — sent before the room heard of
/// it — and taking one would undo the person's change for a moment.
struct RoomState {
    state: Playback,
    /// The room's stamp when our last change went out, and when: views not past it are
    /// stale until [`RoomState::AWAIT`] has passed (a report that was lost).
    awaiting: Option<(Stamp, Instant)>,
}

impl RoomState {
    const AWAIT: Duration = Duration::from_secs(2);

    fn new(state: Playback) -> RoomState {
        RoomState {
            state,
            awaiting: None,
        }
    }

    /// A person changed the player at `now` (`now_ms` on the wall clock).
    fn changed(&mut self, c: &Change, now_ms: i64, now: Instant) {
        self.awaiting = Some((self.state.stamp.clone(), now));
        self.state.playing = c.playing;
        self.state.position = c.position;
        self.state.rate = c.rate;
        self.state.at_ms = now_ms;
    }

    /// A view of the room arrived: taken (true) unless it is older than what we follow.
    fn offer(&mut self, p: Playback, now: Instant) -> bool {
        if let Some((stamp, at)) = &self.awaiting {
            if p.stamp <= *stamp && now.saturating_duration_since(*at) < Self::AWAIT {
                return false;
            }
            self.awaiting = None;
        }
        if p.stamp < self.state.stamp {
            return false;
        }
        self.state = p;
        true
    }
}

/// Assumes a person's change and hands it to the reporter; returns it when the report
/// queue is full, to try again at the next poll: the player loop never waits for it.
fn send_change(
    reports: &tokio::sync::mpsc::Sender<Report>,
    room: &mut RoomState,
    file: &str,
    f: &Follower,
    buffered_s: f64,
    starved: bool,
    change: Change,
) -> Option<Change> {
    // Assumed at once even when it waits for the queue: following the room's older state
    // meanwhile would undo what the person just did.
    room.changed(&change, now_ms(), Instant::now());
    match reports.try_send(report(file, f, buffered_s, starved, Some(change.clone()))) {
        Ok(()) => None,
        Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Some(change),
        // The reporter ended with the loop: nothing to tell.
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => None,
    }
}

/// What the player tells the daemon: where it is, and a person's change.
fn report(
    file: &str,
    f: &Follower,
    buffered_s: f64,
    starved: bool,
    change: Option<Change>,
) -> Report {
    Report {
        file: file.to_string(),
        position: f.position_now(Instant::now()),
        buffered_s,
        starved,
        change,
    }
}

/// The room's state as the rules in [`crate::watch::room`] read it.
fn room_state(p: &control::Playback) -> Playback {
    Playback {
        playing: p.playing,
        position: p.position,
        rate: p.rate,
        at_ms: p.at_ms,
        held: p.held,
        stamp: Stamp {
            counter: p.stamp.counter,
            node: p.stamp.node.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(playing: bool, position: f64, at_ms: i64) -> Playback {
        Playback {
            playing,
            position,
            rate: 1.0,
            at_ms,
            held: false,
            stamp: Stamp::default(),
        }
    }

    #[test]
    fn the_ipc_folder_is_new_private_to_its_user_and_removed_when_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (PrivateDir::new().unwrap(), PrivateDir::new().unwrap());
        assert_ne!(a.path(), b.path(), "a predictable name");
        let meta = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        std::fs::write(a.path().join("mpv.sock"), b"").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "left behind");
    }

    #[test]
    fn our_own_pause_does_not_come_back_as_a_change() {
        let mut f = Follower::default();
        let now = Instant::now();
        assert_eq!(
            f.on_pause(false, now),
            None,
            "the value observing starts with"
        );
        f.on_position(5.0, now);
        let cmds = f.follow(&state(false, 5.0, 0), 0, now);
        assert_eq!(cmds, vec![Command::Pause(true)]);
        assert_eq!(f.on_pause(true, now), None, "our pause echoed");
        let c = f.on_pause(false, now).expect("a person's unpause");
        assert!(c.playing);
    }

    #[test]
    fn a_persons_seek_under_way_is_not_undone_before_it_lands() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        let room = state(true, 2.0, 0);
        f.on_position(2.0, now);
        assert!(f.follow(&room, 0, now).is_empty());
        // A person seeks far; mpv reads the target as its position before it lands
        // (at a distance the data there takes a few round trips to come).
        f.on_seek(now);
        f.on_position(60.0, now);
        let cmds = f.follow(&room, 0, now);
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Seek(_))),
            "{cmds:?}"
        );
        assert!(f.on_landed());
        assert_eq!(f.landed_at(60.0, now).map(|c| c.position), Some(60.0));
    }

    #[test]
    fn a_seek_that_never_lands_holds_corrections_off_only_for_a_while() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        f.on_position(60.0, now);
        f.on_seek(now);
        let later = now + SEEK_UNDER_WAY;
        f.on_position(60.0, later);
        let cmds = f.follow(&state(true, 2.0, 0), 0, later);
        assert!(
            cmds.iter().any(|c| matches!(c, Command::Seek(_))),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_seek_we_did_not_ask_for_is_reported_where_it_landed() {
        let mut f = Follower::default();
        let now = Instant::now();
        f.on_position(1.0, now);
        f.on_seek(now);
        assert!(f.on_landed());
        assert_eq!(f.landed_at(42.0, now).map(|c| c.position), Some(42.0));
        // Ours is not, even when a person's follows it closely.
        let cmds = f.follow(&state(false, 30.0, 0), 0, now);
        assert_eq!(cmds, vec![Command::Seek(30.0)]);
        f.on_seek(now);
        assert!(f.on_landed());
        assert_eq!(f.landed_at(30.0, now), None);
        f.on_seek(now);
        assert!(f.on_landed());
        assert_eq!(f.landed_at(60.0, now).map(|c| c.position), Some(60.0));
    }

    #[test]
    fn a_player_behind_the_room_runs_faster_and_one_far_off_seeks() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        f.on_position(9.9, now);
        let cmds = f.follow(&state(true, 10.0, 1_000), 1_000, now);
        assert!(
            matches!(cmds.as_slice(), [Command::Speed(s)] if *s > 1.0),
            "{cmds:?}"
        );
        f.on_position(3.0, now);
        let cmds = f.follow(&state(true, 10.0, 1_000), 1_000, now);
        assert!(cmds.contains(&Command::Seek(10.0)), "{cmds:?}");
    }

    #[test]
    fn a_late_joiner_is_moved_to_the_room_before_it_plays() {
        let mut f = Follower::default();
        let now = Instant::now();
        let room = state(true, 40.0, 0);
        assert!(
            f.follow(&room, 0, now).is_empty(),
            "played before its position was known"
        );
        f.on_position(0.0, now);
        assert_eq!(
            f.follow(&room, 0, now),
            vec![Command::Seek(40.0), Command::Pause(false)]
        );
    }

    #[test]
    fn a_speed_a_person_set_becomes_the_rooms_rate() {
        let mut f = Follower::default();
        let now = Instant::now();
        assert_eq!(
            f.on_speed(1.0, now),
            None,
            "the value observing starts with"
        );
        let c = f.on_speed(1.5, now).expect("a person's speed");
        assert_eq!(c.rate, 1.5);
        // A nudge we send is not.
        f.paused = false;
        f.on_position(9.9, now);
        let mut s = state(true, 10.0, 0);
        s.rate = 1.5;
        let cmds = f.follow(&s, 0, now);
        let Some(Command::Speed(nudge)) = cmds.first().cloned() else {
            panic!("{cmds:?}")
        };
        assert_eq!(f.on_speed(nudge, now), None);
    }

    #[test]
    fn the_echo_of_an_older_nudge_arriving_after_a_newer_one_was_sent_is_not_a_persons_speed() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        assert_eq!(
            f.on_speed(1.0, now),
            None,
            "the value observing starts with"
        );
        // Behind: a nudge up; then, before its echo, further behind: a bigger one.
        f.on_position(9.9, now);
        let first = f.follow(&state(true, 10.0, 0), 0, now);
        f.on_position(9.8, now);
        let second = f.follow(&state(true, 10.0, 0), 0, now);
        let (Some(Command::Speed(a)), Some(Command::Speed(b))) =
            (first.first().cloned(), second.first().cloned())
        else {
            panic!("{first:?} {second:?}")
        };
        assert!(b > a, "{a} {b}");
        // mpv echoes both, in order: neither is a person's, and the rate stays the room's.
        assert_eq!(f.on_speed(a, now), None, "the older echo");
        assert_eq!(f.on_speed(b, now), None, "the newer echo");
        assert_eq!(f.rate, 1.0);
        // A person's speed after them still is one.
        assert_eq!(f.on_speed(1.25, now).map(|c| c.rate), Some(1.25));
    }

    fn stamped(playing: bool, counter: u64) -> Playback {
        let mut p = state(playing, 10.0, 0);
        p.stamp = Stamp {
            counter,
            node: "n".into(),
        };
        p
    }

    #[test]
    fn a_view_sent_before_the_room_heard_of_a_persons_pause_does_not_undo_it() {
        let now = Instant::now();
        let mut room = RoomState::new(stamped(true, 3));
        room.changed(
            &Change {
                playing: false,
                position: 12.0,
                rate: 1.0,
            },
            0,
            now,
        );
        assert!(!room.state.playing, "the pause is assumed at once");
        assert!(!room.offer(stamped(true, 3), now), "a stale view was taken");
        assert!(!room.state.playing);
        // The room's answer, past the stamp: taken.
        assert!(room.offer(stamped(false, 4), now));
        // Older views than what is followed are never taken.
        assert!(!room.offer(stamped(true, 3), now));
        assert!(room.offer(stamped(true, 5), now));
        assert!(room.state.playing);
    }

    #[test]
    fn when_the_rooms_answer_never_comes_its_views_are_taken_again_after_a_while() {
        let now = Instant::now();
        let mut room = RoomState::new(stamped(true, 3));
        room.changed(
            &Change {
                playing: false,
                position: 12.0,
                rate: 1.0,
            },
            0,
            now,
        );
        assert!(room.offer(stamped(true, 3), now + RoomState::AWAIT));
        assert!(room.state.playing);
    }
}
