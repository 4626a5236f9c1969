//! The local player, kept in step with the room: mpv driven over its JSON IPC socket.
//! [`Follower`] (in [`crate::watch::follow`], shared with the browser page the daemon
//! keeps) is the sans-IO part — it tells a person's actions on the player from the
//! effects of our own commands and turns the room's state into commands. [`run_mpv`] is
//! the IO around it: the mpv process, its socket, and the daemon's control API. The stream's URL holds its secret token, so it
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
use crate::watch::follow::{Command, Follower};
use crate::watch::room::{Playback, Stamp};

/// How often the player's position is read and reported.
const POLL: Duration = Duration::from_millis(100);
/// A seek that has not landed after this long is waiting for bytes that are not there.
const STUCK_SEEK: Duration = Duration::from_secs(1);

/// Seconds a player holds ahead, from mpv's `demuxer-cache-state`: its `cache-duration`,
/// or as good as endless once the demuxer has read to the end of the file (near the end
/// there are never 2 s left to buffer, and a room held there must still resume).
fn buffered_ahead(state: &Value) -> f64 {
    if state.get("eof").and_then(Value::as_bool) == Some(true) {
        return WHOLE_FILE_S;
    }
    state
        .get("cache-duration")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

/// What a player reports as buffered once it holds the rest of the file: far more than
/// a room waits for, well inside what a room message may carry.
const WHOLE_FILE_S: f64 = 1e6;

/// Whether the player has run dry. mpv says so (`paused-for-cache`) when its cache runs
/// out while playing, but not when a seek lands where nothing has arrived: it then
/// waits in `seeking` and plays nothing. A joiner whose link is slower than the video
/// does exactly that at the room's position, and each correction chases the room
/// further into what has not arrived. Both hold the room, as a watch-along must: the
/// others wait for the slow one. Time spent seeking while paused (loading, a person's
/// seek in a paused room) is not counted: nobody is waiting on it.
#[derive(Debug, Default)]
struct Starvation {
    paused_for_cache: bool,
    seeking_since: Option<Instant>,
}

impl Starvation {
    fn on_seeking(&mut self, seeking: bool, now: Instant) {
        if !seeking {
            self.seeking_since = None;
        } else if self.seeking_since.is_none() {
            self.seeking_since = Some(now);
        }
    }

    /// The player was paused or set playing: a seek under way counts from now.
    fn on_pause(&mut self, now: Instant) {
        if self.seeking_since.is_some() {
            self.seeking_since = Some(now);
        }
    }

    /// `paused`: whether the player is paused (a seek then starves nobody).
    fn starved(&self, paused: bool, now: Instant) -> bool {
        self.paused_for_cache
            || (!paused
                && self
                    .seeking_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= STUCK_SEEK))
    }
}

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
    #[error("the daemon gave a stream URL the page cannot be found from: {0}")]
    PageUrl(String),
    #[error("xdg-open failed ({0})")]
    Open(std::process::ExitStatus),
    #[error("cannot wait for Ctrl-C: {0}")]
    Signal(#[source] std::io::Error),
    #[error("lost the player's IPC socket: {0}")]
    Ipc(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
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
    for (i, prop) in ["pause", "speed", "paused-for-cache", "seeking"]
        .iter()
        .enumerate()
    {
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
    let mut starvation = Starvation::default();
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
                            Some("pause") => {
                                starvation.on_pause(now);
                                data.as_bool().and_then(|p| f.on_pause(p, now)).map(change)
                            }
                            Some("speed") => data.as_f64().and_then(|s| f.on_speed(s, now)).map(change),
                            Some("paused-for-cache") => {
                                starvation.paused_for_cache = data.as_bool().unwrap_or(false);
                                None
                            }
                            Some("seeking") => {
                                starvation.on_seeking(data.as_bool().unwrap_or(false), now);
                                None
                            }
                            _ => None,
                        };
                        if change.is_some() {
                            pending_change = change;
                        }
                    }
                    Some("seek") => f.on_seek(Instant::now()),
                    Some("playback-restart") if f.on_landed(now) => {
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
                        buffered = v.get("data").map_or(0.0, buffered_ahead);
                    } else if id == landed_id {
                        match data {
                            Some(p) => {
                                if let Some(c) = f.landed_at(p, now) {
                                    pending_change = Some(change(c));
                                }
                            }
                            None => f.landing_unread(),
                        }
                    }
                }
                // A person's change goes out at once, not at the next poll.
                if let Some(change) = pending_change.take() {
                    pending_change = send_change(&reports_tx, &mut room, &w.file, &f, buffered, starvation.starved(f.paused, Instant::now()), change);
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
                cache_id = mpv.send(json!(["get_property", "demuxer-cache-state"])).await?;
                reports += 1;
                // Changes go at once; the plain report every other poll, unless the
                // reporter is still busy with earlier ones.
                if let Some(change) = pending_change.take() {
                    pending_change = send_change(&reports_tx, &mut room, &w.file, &f, buffered, starvation.starved(f.paused, Instant::now()), change);
                } else if reports.is_multiple_of(2) {
                    let _ = reports_tx.try_send(report(&w.file, &f, buffered, starvation.starved(f.paused, Instant::now()), None));
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

/// The browser page of the stream at `stream_url` (`http://ADDR/TOKEN/SHARE/PATH`): the
/// daemon serves it under the same token, at `http://ADDR/TOKEN/`.
pub fn page_url(stream_url: &str) -> Option<String> {
    let rest = stream_url.strip_prefix("http://")?;
    let mut parts = rest.splitn(3, '/');
    let (addr, token) = (parts.next()?, parts.next()?);
    (!addr.is_empty() && !token.is_empty()).then(|| format!("http://{addr}/{token}/"))
}

/// Shows `w` in a browser page until Ctrl-C or SIGTERM: the daemon serves the page and
/// keeps it in step; this only hands out its URL and keeps the stream open. The URL holds
/// the stream's token: it goes to the terminal (or, with `json`, to stdout for a script),
/// and to the desktop's browser through a file in a private folder, never on a command
/// line (which every local user can read).
pub async fn run_browser(client: &Client, w: &WatchReply, json: bool) -> Result<(), PlayerError> {
    let page = page_url(&w.url).ok_or_else(|| PlayerError::PageUrl(w.url.clone()))?;
    if json {
        println!(
            "{}",
            json!({ "url": page, "stream": w.url, "file": w.file, "size": w.size, "source": w.source })
        );
    } else {
        eprintln!(
            "watching {} ({} bytes, from {}) in a browser; Ctrl-C ends it. Open:",
            w.file, w.size, w.source
        );
        println!("{page}");
    }
    // Lives until this returns: the browser reads the file when it starts.
    let mut _opener = None;
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if desktop {
        match open_in_browser(&page).await {
            Ok(d) => _opener = Some(d),
            Err(e) => eprintln!("{e}; open the URL above yourself"),
        }
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(PlayerError::Signal)?;
    // A closed terminal too: the page must not outlive the command that opened it.
    let mut hangup = signal(SignalKind::hangup()).map_err(PlayerError::Signal)?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(PlayerError::Signal)?,
        _ = term.recv() => {}
        _ = hangup.recv() => {}
    }
    // The stream, its page and its token go with the command.
    client
        .room_leave(&FileRequest {
            file: w.file.clone(),
        })
        .await?;
    Ok(())
}

/// Opens `page` with `xdg-open`, by way of a file (in a folder only we can open) that
/// sends the browser on to it: the URL itself never is an argument.
async fn open_in_browser(page: &str) -> Result<PrivateDir, PlayerError> {
    let dir = PrivateDir::new()?;
    let file = dir.path().join("watch.html");
    // The URL is ours (an address, a hex token): nothing in it needs escaping.
    let html = format!(
        "<!doctype html><meta charset=utf-8><meta name=referrer content=no-referrer>\
         <meta http-equiv=refresh content=\"0;url={page}\"><title>watchalong</title>"
    );
    std::fs::write(&file, html).map_err(|source| PlayerError::PrivateDir {
        path: file.clone(),
        source,
    })?;
    let status = tokio::process::Command::new("xdg-open")
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .map_err(|source| PlayerError::Spawn {
            program: "xdg-open".into(),
            source,
        })?;
    if !status.success() {
        return Err(PlayerError::Open(status));
    }
    Ok(dir)
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

/// A person's change as the control API carries it.
fn change(c: crate::watch::hub::Change) -> Change {
    Change {
        playing: c.playing,
        position: c.position,
        rate: c.rate,
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
    use crate::watch::follow::tests::state;

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
    fn a_player_that_read_to_the_end_counts_as_buffered_whatever_its_cache_says() {
        let state =
            |eof: bool, secs: f64| json!({"cache-duration": secs, "eof": eof, "idle": true});
        assert_eq!(buffered_ahead(&state(false, 3.5)), 3.5);
        assert_eq!(buffered_ahead(&state(true, 0.0)), WHOLE_FILE_S);
        assert_eq!(buffered_ahead(&json!({})), 0.0);
    }

    #[test]
    fn a_seek_under_way_counts_only_from_when_the_player_was_set_playing() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Starvation::default();
        // Loading, paused, for 5 s; then set playing while the seek still runs.
        s.on_seeking(true, at(0));
        s.on_pause(at(5_000));
        assert!(!s.starved(false, at(5_500)), "time paused was counted");
        assert!(s.starved(false, at(6_000)));
    }

    #[test]
    fn a_seek_that_stalls_while_playing_is_starving_and_one_while_paused_is_not() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Starvation::default();
        // Loading, paused: however long it takes, nobody waits on it.
        s.on_seeking(true, at(0));
        assert!(
            !s.starved(true, at(5_000)),
            "a paused player's seek held the room"
        );
        s.on_seeking(false, at(5_000));
        // Playing; a seek lands where nothing has arrived.
        s.on_seeking(true, at(6_000));
        assert!(
            !s.starved(false, at(6_500)),
            "a seek that lands at once is no starvation"
        );
        assert!(
            s.starved(false, at(7_000)),
            "a stalled seek is not starvation"
        );
        // Still seeking: the start of the stall is kept, not renewed.
        s.on_seeking(true, at(7_100));
        assert!(s.starved(false, at(7_100)));
        s.on_seeking(false, at(8_000));
        assert!(!s.starved(false, at(8_000)), "landed, yet still starving");
        s.paused_for_cache = true;
        assert!(s.starved(false, at(8_000)), "mpv's own word was not taken");
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
