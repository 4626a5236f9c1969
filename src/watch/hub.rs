//! The node's side of watching along: opening a [`crate::watch::stream::Stream`] for a local
//! player, keeping the [`crate::watch::room::Room`] of every watched file, and exchanging room
//! messages with the other members over the node server (`/v1/room`). The local player
//! itself is driven by the CLI (`watchalong watch`), which reports to and reads from
//! here through the control API. It owns the rooms' runtime (timing, broadcast, wake-ups
//! of waiting players) and when a stream closes: when its local player leaves, or, while
//! no player reports on it, after [`crate::watch::stream::IDLE`] unread; the rules are
//! [`crate::watch::room`]'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::base::clock::now_ms;
use crate::base::lock::Recover;
use crate::data::transfer::{self, Directory};
use crate::watch::room::{Fanout, Playback, Room, RoomMessage};
use crate::watch::stream::Streams;

/// Where room messages are POSTed on another member's node server: the daemon routes
/// what arrives there to [`Watch::receive`].
pub const ROOM_PATH: &str = "/v1/room";

/// How often a watcher tells the others where it is (and how often rooms are checked).
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a message to the room's leader may take before everyone gets it instead.
const LEADER_POST_TIMEOUT: Duration = Duration::from_secs(1);

/// Rooms other members' messages may open here. Each lives as long as the daemon, so a
/// member must not be able to make unboundedly many; a real group watches a few files.
pub const MAX_ROOMS: usize = 256;
/// The longest room name taken from another member: a share name, a slash and a path.
const MAX_FILE_NAME: usize = 64 + 4096;

/// Forgets the rooms nobody watches any more: no local player, and no member heard from
/// lately. A room lives only while someone is in it, so rooms do not pile up.
fn forget_empty(rooms: &mut HashMap<String, Room>) {
    rooms.retain(|_, r| r.local.is_some() || !r.watchers.is_empty());
}

/// What `watchalong watch` gets back when it opens a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchReply {
    pub file: String,
    /// Where a player opens it (loopback only).
    pub url: String,
    pub size: u64,
    /// The member the data comes from (this node when it holds the file).
    pub source: String,
    pub state: Playback,
}

/// The local player's report: where it is, how much it holds ahead, and a change a
/// person made on it, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub file: String,
    pub position: f64,
    pub buffered_s: f64,
    pub starved: bool,
    #[serde(default)]
    pub change: Option<Change>,
}

/// A person's change on a player (defined with the follower that tells it).
pub use crate::watch::follow::Change;

/// A wait for the room's state to move past `counter`/`node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitRequest {
    pub file: String,
    pub counter: u64,
    pub node: String,
    /// At most this long, in ms.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRequest {
    pub file: String,
}

/// One watcher as `watchalong room` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatcherView {
    pub node: String,
    pub position: f64,
    pub drift_ms: i64,
    pub buffered_s: f64,
    pub starved: bool,
    pub rtt_ms: Option<i64>,
    pub clock_offset_ms: i64,
}

/// A room as the control API shows it; `state.at_ms` is on this node's clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomView {
    pub file: String,
    pub state: Playback,
    /// Where the file is now, by the room.
    pub position_now: f64,
    pub watchers: Vec<WatcherView>,
    /// Bytes of the file here, and its size (when this node streams it).
    pub have_bytes: Option<u64>,
    pub size: Option<u64>,
}

/// A room message from a member's bytes, if it names a file a room may be opened for.
/// Pure, so the fuzzer and the replay test run the same decoding as [`Watch::receive`].
pub fn decode_room_message(body: &[u8]) -> Option<RoomMessage> {
    let m = serde_json::from_slice::<RoomMessage>(body).ok()?;
    // A room lives as long as the daemon: its name is bounded like a share path.
    if m.file.len() > MAX_FILE_NAME || crate::data::share::clean_path(&m.file).is_err() {
        return None;
    }
    Some(m)
}

/// Every room on this node and the streams its players read.
pub struct Watch {
    pub streams: Arc<Streams>,
    /// Signs the room messages sent to other members.
    engine: Arc<transfer::Engine>,
    rooms: Mutex<HashMap<String, Room>>,
    /// Bumped whenever a room's state changes, to wake waiting players.
    changed: tokio::sync::watch::Sender<u64>,
    /// This node in stamps and messages (a prefix of its key, in hex) and by name.
    me: String,
    name: String,
    hold_when_starved: bool,
    /// Room messages sent and received, for the metrics (a benchmark counts a
    /// heartbeat's messages from them).
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
    /// Rooms whose new state is being passed on.
    forwarding: Mutex<std::collections::BTreeSet<String>>,
}

impl Watch {
    pub fn new(
        streams: Arc<Streams>,
        engine: Arc<transfer::Engine>,
        me: String,
        name: String,
        hold_when_starved: bool,
    ) -> Watch {
        Watch {
            streams,
            engine,
            rooms: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            me,
            name,
            hold_when_starved,
            sent: std::sync::atomic::AtomicU64::new(0),
            received: std::sync::atomic::AtomicU64::new(0),
            forwarding: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Room messages sent to and received from other members since start.
    pub fn messages(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.sent.load(Relaxed), self.received.load(Relaxed))
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.locked()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Runs `f` on the room of `file`, made if there is none.
    fn with_room<T>(&self, file: &str, f: impl FnOnce(&mut Room) -> T) -> T {
        let mut rooms = self.rooms();
        let room = rooms.entry(file.to_string()).or_insert_with(|| {
            let mut r = Room::new(file, &self.me, now_ms());
            r.hold_when_starved = self.hold_when_starved;
            r
        });
        f(room)
    }

    pub fn state(&self, file: &str) -> Playback {
        self.with_room(file, |r| r.state.clone())
    }

    /// The local player's report; returns the room as it now stands and whether the
    /// others must hear at once (a change).
    pub fn report(&self, r: Report) -> (RoomView, bool) {
        let now = now_ms();
        if let Some(s) = self.streams.get(&r.file) {
            s.set_played(true);
        }
        let urgent = self.with_room(&r.file, |room| {
            let mut urgent = room.local.is_none();
            if let Some(c) = &r.change {
                room.local_change(now, c.playing, c.position, c.rate);
                urgent = true;
            }
            room.local_report(now, r.position, r.buffered_s, r.starved);
            if let Some(me) = room.local.as_mut() {
                me.node = self.name.clone();
            }
            urgent | room.settle_readiness(now)
        });
        if urgent {
            self.bump();
        }
        (self.view(&r.file), urgent)
    }

    /// The local player is gone, and with it the stream it read (and the stream's URL).
    /// A room holds one local player per file, so a second player of the same file on
    /// this node loses its stream too.
    pub fn leave(&self, file: &str) {
        self.with_room(file, Room::local_left);
        self.streams.close(file);
    }

    /// Waits until the room's state moves past the given stamp, or the timeout.
    pub async fn wait(&self, w: &WaitRequest) -> RoomView {
        let mut rx = self.changed.subscribe();
        let moved = |s: &Playback| s.stamp.counter != w.counter || s.stamp.node != w.node;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(w.timeout_ms.min(10_000));
        loop {
            if moved(&self.state(&w.file)) {
                break;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        self.view(&w.file)
    }

    pub fn view(&self, file: &str) -> RoomView {
        let now = now_ms();
        let stream = self.streams.get(file);
        self.with_room(file, |room| RoomView {
            file: file.to_string(),
            state: room.state.clone(),
            position_now: room.state.position_at(now),
            watchers: room
                .local
                .iter()
                .map(|w| (None, w))
                .chain(room.watchers.iter().map(|(k, w)| (Some(k), w)))
                .map(|(k, w)| WatcherView {
                    node: w.node.clone(),
                    position: w.position,
                    drift_ms: (w.drift_s * 1000.0).round() as i64,
                    buffered_s: w.buffered_s,
                    starved: w.starved,
                    rtt_ms: k.and_then(|k| room.rtt_ms(k)),
                    clock_offset_ms: k.map_or(0, |k| room.offset_ms(k)),
                })
                .collect(),
            have_bytes: stream
                .as_ref()
                .map(|s| s.progress.done.load(std::sync::atomic::Ordering::Relaxed)),
            size: stream.as_ref().map(|s| s.manifest.size),
        })
    }

    /// Every room this node knows of.
    pub fn views(&self) -> Vec<RoomView> {
        let mut files: Vec<String> = self.rooms().keys().cloned().collect();
        files.sort();
        files.iter().map(|f| self.view(f)).collect()
    }

    /// A message from member `from` (named by its key prefix). Returns the room's file
    /// when we lead it and the message brought a new state made elsewhere: the caller
    /// passes it on to everyone at once ([`Watch::forward`]); its maker told only us.
    pub fn receive(&self, from: &str, body: &[u8]) -> Option<String> {
        self.received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = decode_room_message(body)?;
        let file = m.file.clone();
        let (result, news) = {
            let mut rooms = self.rooms();
            let open = rooms.len();
            match rooms.get_mut(&file) {
                Some(room) => {
                    let before = room.state.stamp.clone();
                    let r = room.receive(from, m, now_ms());
                    let news = room.state.stamp > before
                        && room.state.stamp.node != self.me
                        && room.leads();
                    (r, news)
                }
                None if open >= MAX_ROOMS => {
                    log::debug!(
                        "room message from {from} dropped: {MAX_ROOMS} rooms are open already"
                    );
                    return None;
                }
                // A room is opened only by a message it accepts.
                None => {
                    let mut room = Room::new(&file, &self.me, now_ms());
                    room.hold_when_starved = self.hold_when_starved;
                    let r = room.receive(from, m, now_ms());
                    if r.is_ok() {
                        rooms.insert(file.clone(), room);
                    }
                    (r, false)
                }
            }
        };
        match result {
            Ok(true) => self.bump(),
            Ok(false) => {}
            Err(e) => log::debug!("{e}"),
        }
        // One forward per room at a time: a member that makes changes as fast as it can
        // gets them passed on as fast as they go out, not one each.
        (news && self.forwarding.locked().insert(file.clone())).then_some(file)
    }

    /// Passes the room of `file` on to everyone (after [`Watch::receive`] asked to).
    pub async fn forward(&self, file: &str, dir: &Directory) {
        self.forwarding.locked().remove(file);
        self.send_now(file, dir).await;
    }

    /// One round: forget quiet watchers, hold or release for buffering, and, from every
    /// room a local player watches (or just stopped watching), tell the others: the
    /// leader tells everyone, another watcher the leader, and leaving goes to everyone.
    pub async fn round(&self, dir: &Directory) {
        let now = now_ms();
        let mut changed = false;
        let mut outgoing = Vec::new();
        let mut gone = Vec::new();
        {
            let mut rooms = self.rooms();
            for room in rooms.values_mut() {
                let had_local = room.local.is_some();
                room.expire(now);
                if room.local.is_some() {
                    changed |= room.settle_readiness(now);
                    outgoing.push((room.clone(), room.fanout(now)));
                } else if had_local {
                    // Our player went quiet: the others hear we left.
                    outgoing.push((room.clone(), Fanout::Everyone));
                    gone.push(room.file.clone());
                }
            }
            forget_empty(&mut rooms);
        }
        // Its CLI may be stopped (Ctrl-Z) or killed, leaving mpv reading: the stream
        // closes once nobody reads it, not at once.
        for file in gone {
            if let Some(s) = self.streams.get(&file) {
                s.set_played(false);
            }
        }
        self.streams.close_idle(crate::base::clock::now_secs());
        if changed {
            self.bump();
        }
        for (room, fanout) in outgoing {
            self.send(&room, &fanout, dir).await;
        }
    }

    /// Sends the room of `file` now (after a change, or leaving): to the leader, which
    /// passes it on at once over connections its heartbeats keep warm, when we follow
    /// one that hears us; else to everyone. Straight to everyone would be a hop less,
    /// but over connections gone cold since the last change (a TCP handshake each: a
    /// round trip more at a distance, and on the lab's two cores slower than two warm
    /// hops).
    pub async fn send_now(&self, file: &str, dir: &Directory) {
        let now = now_ms();
        let (room, fanout) = self.with_room(file, |r| {
            let fanout = match r.local {
                Some(_) => r.fanout(now),
                None => Fanout::Everyone,
            };
            (r.clone(), fanout)
        });
        self.send(&room, &fanout, dir).await;
    }

    async fn send(&self, room: &Room, fanout: &Fanout, dir: &Directory) {
        let now = now_ms();
        let up = || dir.peers.iter().filter(|p| p.key != dir.me && p.up);
        // A leader we cannot reach now is no leader: everyone hears us meanwhile. One
        // that does not take the message soon (its node stopped, and the tunnel still
        // counts it up for a while) is passed over for this message too.
        if let Fanout::Leader(l) = fanout {
            if let Some(p) = up().find(|p| crate::group::identity::key_id(&p.key) == *l) {
                let Ok(body) = serde_json::to_vec(&room.message_for(l, now)) else {
                    return;
                };
                self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let post = self.engine.post(&p.key, p.vpn, ROOM_PATH, body);
                match tokio::time::timeout(LEADER_POST_TIMEOUT, post).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => log::debug!("room message to {} (leader): {e}", p.name),
                    Err(_) => log::debug!("room message to {} (leader): no answer in time", p.name),
                }
            }
        }
        let mut posts = tokio::task::JoinSet::new();
        for p in up() {
            let id = crate::group::identity::key_id(&p.key);
            let Ok(body) = serde_json::to_vec(&room.message_for(&id, now)) else {
                continue;
            };
            self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (key, vpn, name, engine) = (p.key, p.vpn, p.name.clone(), self.engine.clone());
            posts.spawn(async move {
                if let Err(e) = engine.post(&key, vpn, ROOM_PATH, body).await {
                    log::debug!("room message to {name}: {e}");
                }
            });
        }
        while posts.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::room::Room;

    #[test]
    fn a_room_is_forgotten_once_nobody_watches_it_and_kept_while_someone_does() {
        let now = now_ms();
        let mut peer = Room::new("s/film.mkv", "peer", now);
        peer.local_change(now, true, 1.0, 1.0);
        // The peer's player reports: the peer watches.
        peer.local_report(now, 1.0, 5.0, false);
        let mut rooms = HashMap::new();
        let mut room = Room::new("s/film.mkv", "me", now);
        room.receive("peer", peer.message_for("me", now), now)
            .unwrap();
        rooms.insert("s/film.mkv".to_string(), room);
        forget_empty(&mut rooms);
        assert_eq!(rooms.len(), 1, "a member still watches");
        // An hour on, the member is long quiet.
        for r in rooms.values_mut() {
            r.expire(now + 3_600_000);
        }
        forget_empty(&mut rooms);
        assert!(rooms.is_empty());
    }

    fn hub(dir: &std::path::Path, me: &str) -> Watch {
        let streams = Arc::new(Streams::new(
            dir.to_path_buf(),
            0,
            tokio_util::sync::CancellationToken::new(),
        ));
        let engine = Arc::new(transfer::Engine::new(
            crate::data::share::Shares::new(Vec::new(), crate::data::share::CHUNK_SIZE),
            Arc::new(crate::group::auth::Proofs::new(
                x25519_dalek::StaticSecret::from([1u8; 32]),
            )),
            0,
            dir.join("cache"),
            0,
        ));
        Watch::new(streams, engine, me.into(), me.into(), true)
    }

    #[test]
    fn the_leader_passes_on_a_change_made_elsewhere_once_at_a_time_and_a_follower_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = "s/film.mkv";
        let report = |w: &Watch| {
            w.report(Report {
                file: file.into(),
                position: 1.0,
                buffered_s: 5.0,
                starved: false,
                change: None,
            })
        };
        let change = |counter: u64| {
            let mut peer = Room::new(file, "m", now_ms());
            peer.local_report(now_ms(), 1.0, 5.0, false);
            peer.state.stamp.counter = counter;
            peer.local_change(now_ms(), counter.is_multiple_of(2), 1.0, 1.0);
            serde_json::to_vec(&peer.message_for("a", now_ms())).unwrap()
        };
        // "a" watches and has the smallest id: it leads, and passes a change on.
        let leader = hub(dir.path(), "a");
        report(&leader);
        assert_eq!(leader.receive("m", &change(1)), Some(file.to_string()));
        // A second change while the first is still being passed on: that one carries it.
        assert_eq!(leader.receive("m", &change(2)), None);
        // An old state, or the same one again, is no news.
        leader.forwarding.locked().clear();
        assert_eq!(leader.receive("m", &change(0)), None);
        // "z" does not lead (m watches, with a smaller id): it passes nothing on.
        let follower = hub(dir.path(), "z");
        report(&follower);
        assert_eq!(follower.receive("m", &change(2)), None);
        assert!(
            follower.with_room(file, |r| r.state.playing),
            "the follower did not take the change"
        );
    }

    #[test]
    fn members_cannot_open_more_than_max_rooms_but_known_rooms_still_hear_them() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Arc::new(Streams::new(
            dir.path().to_path_buf(),
            0,
            tokio_util::sync::CancellationToken::new(),
        ));
        let engine = Arc::new(transfer::Engine::new(
            crate::data::share::Shares::new(Vec::new(), crate::data::share::CHUNK_SIZE),
            Arc::new(crate::group::auth::Proofs::new(
                x25519_dalek::StaticSecret::from([1u8; 32]),
            )),
            0,
            dir.path().join("cache"),
            0,
        ));
        let w = Watch::new(streams, engine, "me".into(), "me".into(), true);
        let message = |file: &str, playing: bool| {
            let mut peer = Room::new(file, "peer", now_ms());
            peer.state.stamp.counter = u64::from(!playing);
            peer.local_change(now_ms(), playing, 1.0, 1.0);
            serde_json::to_vec(&peer.message_for("me", now_ms())).unwrap()
        };
        for i in 0..MAX_ROOMS + 10 {
            w.receive("peer", &message(&format!("s/f{i}"), true));
        }
        assert_eq!(w.rooms().len(), MAX_ROOMS);
        // A message refused by the room's checks, or with an over-long name, opens none.
        let fresh = Watch::new(
            w.streams.clone(),
            w.engine.clone(),
            "me".into(),
            "me".into(),
            true,
        );
        let mut absurd = Room::new("s/absurd", "peer", now_ms());
        absurd.state.stamp.counter = u64::MAX - 1;
        absurd.local_change(now_ms(), true, 1.0, 1.0);
        fresh.receive(
            "peer",
            &serde_json::to_vec(&absurd.message_for("me", now_ms())).unwrap(),
        );
        fresh.receive(
            "peer",
            &message(&format!("s/{}", "x".repeat(MAX_FILE_NAME)), true),
        );
        assert!(fresh.rooms().is_empty());
        assert!(!w.rooms().contains_key(&format!("s/f{MAX_ROOMS}")));
        // A pause (with a higher stamp) in a room already open still arrives.
        w.receive("peer", &message("s/f0", false));
        assert!(!w.rooms()["s/f0"].state.playing);
    }
}
