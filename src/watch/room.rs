//! A watch-along room, sans IO: the playback state the members watching one file agree
//! on (playing or paused, position, rate, when), who watches and how far each has
//! buffered, the clock offset to each of them, and what a player should do to stay in
//! step. Inputs are messages, local player events and `now` (ms on this node's clock);
//! outputs are the states to send and the correction to apply. It owns these rules; it
//! must not touch sockets, players or files.
//!
//! Agreement: every change made on a player becomes a new [`Playback`] stamped with a
//! Lamport counter and the node that made it; the highest stamp wins everywhere, so
//! concurrent changes (two pauses, a pause and a seek) settle on one. A state's time is
//! on its sender's clock and is moved onto ours with the offset estimated NTP-style from
//! the timestamps every message carries. A message whose stamp runs absurdly far ahead,
//! or whose numbers are not sane, is refused whole ([`RoomError`]).
//!
//! Fan-out: a star, not a mesh. The room's leader is the watcher with the smallest node
//! id among those a node hears directly; every heartbeat the other watchers tell the
//! leader alone, and the leader tells every member, passing on what it heard from each
//! watcher. A report keeps the time its watcher made it (on that watcher's clock), so a
//! newer report of a watcher always replaces an older one whichever way each came, and
//! passing one on never makes it younger. That is `w - 1 + n - 1` messages a heartbeat
//! instead of `w * (n - 1)`. A person's change and a hold go the same way, and the leader
//! passes them on at once: two hops over connections the heartbeats keep warm, where a
//! direct message would open a cold one. A watcher whose leader does not show that it
//! hears it (no echo of a recent message), or does not say it leads (an older build),
//! sends to everyone, as does one leaving. Only the leader's relays are taken, at most
//! [`MAX_WATCHERS`] watchers are kept per room, and a member that left is not brought
//! back by a relay older than its leaving. The clock offset to whoever sent a state comes
//! from the echoes of these exchanges; a state first heard from a member with no exchange
//! (a change sent directly) takes its time from the leader's copy, which also carries
//! the leader's later corrections of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A watcher not heard from for this long has left.
pub const WATCHER_TIMEOUT_MS: i64 = 3_000;
/// Drift beyond this is fixed by a seek; below it, by nudging the speed.
pub const SEEK_ABOVE_S: f64 = 1.0;
/// Drift within this is left alone (the speed goes back to the room's rate).
pub const IN_STEP_S: f64 = 0.02;
/// How much faster or slower a player may run to catch up.
pub const MAX_NUDGE: f64 = 0.1;
/// Seconds that must be buffered ahead (or the file be whole) to start or resume.
pub const READY_BUFFER_S: f64 = 2.0;

/// How far a peer's stamp may run ahead of ours. A room's counter grows by one per
/// change (a pause, a seek, a hold), so no real room gets near this; a stamp beyond it
/// comes from a broken or hostile member and would pin the room's state for ever.
pub const MAX_STAMP_LEAD: u64 = 1 << 20;
/// The latest time a message may carry, in ms since the epoch (about the year 37,600):
/// keeps every difference of two times inside `i64`.
pub const MAX_TIME_MS: i64 = 1 << 50;
/// The longest node id a stamp may carry (ids are short key prefixes).
pub const MAX_NODE_ID: usize = 64;
/// The most watchers one message may pass on, and a room keeps: a group of a few hundred
/// members at most.
pub const MAX_RELAYED: usize = 512;
pub const MAX_WATCHERS: usize = MAX_RELAYED;
/// The longest display name a watcher may carry.
pub const MAX_WATCHER_NAME: usize = 256;
/// The largest position, drift or buffer, in seconds (about 30 years), either way.
pub const MAX_SECONDS: f64 = 1e9;
/// The fastest a room may play (mpv's own limit).
pub const MAX_RATE: f64 = 100.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoomError {
    #[error("a room message from {from} is refused: its stamp {theirs} is more than {MAX_STAMP_LEAD} ahead of ours ({ours})")]
    AcceptStamp {
        from: String,
        theirs: u64,
        ours: u64,
    },
    #[error("a room message from {from} is refused: its {field} is out of range")]
    AcceptField { from: String, field: &'static str },
}

/// What the room agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Playback {
    pub playing: bool,
    /// Seconds into the file at `at_ms`.
    pub position: f64,
    pub rate: f64,
    /// When `position` held, in ms since the epoch on the clock of whoever sent this.
    pub at_ms: i64,
    /// Paused by the room because a watcher ran dry, not by a person: it resumes by
    /// itself when everyone is ready.
    #[serde(default)]
    pub held: bool,
    pub stamp: Stamp,
}

/// Lamport counter, then the node that made the change: a total order every node agrees
/// on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Stamp {
    pub counter: u64,
    pub node: String,
}

impl Playback {
    /// Where the file is at `now_ms` (on the clock `at_ms` is on).
    pub fn position_at(&self, now_ms: i64) -> f64 {
        if self.playing && !self.held {
            (self.position + (now_ms - self.at_ms) as f64 / 1000.0 * self.rate).max(0.0)
        } else {
            self.position
        }
    }

    /// Whether a player should be running.
    pub fn running(&self) -> bool {
        self.playing && !self.held
    }
}

/// One watcher as its last message described it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watcher {
    pub node: String,
    /// Its player's position (s) when it sent, and the room's expected one then.
    pub position: f64,
    pub drift_s: f64,
    /// Seconds buffered ahead of its position; `f64::INFINITY` is sent as a large number.
    pub buffered_s: f64,
    /// Its player waits for data.
    pub starved: bool,
    /// When we last heard from it, on our clock. In a message: when its watcher made the
    /// report, on the watcher's clock.
    pub seen_ms: i64,
    /// When its watcher made this report, on the watcher's clock: of two reports of one
    /// watcher, the later one stands.
    #[serde(skip)]
    pub origin_ms: i64,
    /// Heard from the watcher itself, not passed on by the leader.
    #[serde(skip)]
    pub direct: bool,
}

/// What one member sends the others about one room: its view of the state, itself as a
/// watcher, and timestamps for the clock estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomMessage {
    /// The file, as `share/path`.
    pub file: String,
    pub state: Playback,
    /// The sender as a watcher; `None` when it only relays state (it left).
    pub watcher: Option<Watcher>,
    /// The sender's clock when it sent this.
    pub sent_ms: i64,
    /// The last message the sender got from the receiver: its `sent_ms`, and when it
    /// arrived on the sender's clock. (0, 0) when there was none.
    pub echo: (i64, i64),
    /// From the leader: the other watchers it has heard from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relayed: Vec<Relayed>,
    /// The sender leads the room (older builds never say so, and are sent to as a mesh).
    #[serde(default)]
    pub leads: bool,
}

/// A watcher the sender heard from, passed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relayed {
    /// The watcher's node id (as in stamps).
    pub id: String,
    /// How long ago the sender heard from it, in ms.
    pub age_ms: i64,
    /// Its report; `seen_ms` is when the watcher made it, on its own clock.
    pub watcher: Watcher,
}

/// Who a room's message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fanout {
    /// Every member: we lead the room, or the message carries news (a change, a hold,
    /// leaving).
    Everyone,
    /// The room's leader only (its node id).
    Leader(String),
}

/// A correction for a player that is not where the room is.
#[derive(Debug, Clone, PartialEq)]
pub enum Correction {
    /// Close enough: run at the room's rate.
    Rate(f64),
    /// Behind or ahead by a little: run this much faster or slower for a while.
    Nudge(f64),
    /// Too far: jump.
    Seek(f64),
}

/// What to do about `actual` (s) when the room says `expected` (s) at rate `rate`.
pub fn correct(expected: f64, actual: f64, rate: f64) -> Correction {
    let behind = expected - actual;
    if behind.abs() > SEEK_ABOVE_S {
        Correction::Seek(expected)
    } else if behind.abs() <= IN_STEP_S {
        Correction::Rate(rate)
    } else {
        // Catch up over about two seconds, never faster than MAX_NUDGE allows.
        let k = (behind / 2.0).clamp(-MAX_NUDGE, MAX_NUDGE);
        Correction::Nudge(rate * (1.0 + k))
    }
}

/// Clock offset to one peer: the estimate from the exchange with the shortest round
/// trip among the last few (the least delayed one says the most about the clocks).
#[derive(Debug, Clone, Default)]
pub struct Offset {
    samples: Vec<(i64, i64)>,
}

impl Offset {
    const KEEP: usize = 8;

    /// One exchange: we sent at `t1`, they got it at `t2` and answered at `t3` (their
    /// clock), we got the answer at `t4` (ours).
    pub fn sample(&mut self, t1: i64, t2: i64, t3: i64, t4: i64) {
        let rtt = (t4 - t1) - (t3 - t2);
        if rtt < 0 {
            return;
        }
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        self.samples.push((rtt, offset));
        if self.samples.len() > Self::KEEP {
            self.samples.remove(0);
        }
    }

    /// Their clock minus ours, in ms; 0 until an exchange completed.
    pub fn ms(&self) -> i64 {
        self.samples
            .iter()
            .min_by_key(|(rtt, _)| *rtt)
            .map_or(0, |(_, o)| *o)
    }

    pub fn rtt_ms(&self) -> Option<i64> {
        self.samples.iter().map(|(rtt, _)| *rtt).min()
    }
}

/// One room as this node sees it.
#[derive(Debug, Clone)]
pub struct Room {
    pub file: String,
    pub me: String,
    pub state: Playback,
    /// Every watcher but us, by node.
    pub watchers: BTreeMap<String, Watcher>,
    /// Us, when a local player watches.
    pub local: Option<Watcher>,
    offsets: BTreeMap<String, Offset>,
    /// Per peer: its last `sent_ms` and when it arrived here, echoed back to it.
    last_from: BTreeMap<String, (i64, i64)>,
    /// When `state` came from a peer: who, the offset its time was moved by, and the
    /// round trip of the exchange that offset came from (`None`: no exchange yet, the
    /// least trusted; a copy of the same state from a member with a measured exchange
    /// replaces its time). An offset taken while a queue
    /// delayed one direction only is off by half that delay (a 1 Mbit/s uplink full of
    /// video: half a second); once an exchange with a shorter round trip corrects the
    /// estimate, the state's time is moved again, or the players would stay apart. Only a
    /// shorter round trip moves it: the peer that sent the state also sends the echoes
    /// the offset is made of, and must not get to shift the room's time at will.
    state_offset: Option<(String, i64, Option<i64>)>,
    /// The state's time as the peer it came from sent it: the leader moves it when it
    /// corrects its own offset, and the copy follows.
    state_theirs_ms: i64,
    /// Watchers that left, by id: when they said so (their clock) and when we heard (ours).
    /// A relay of a report older than the leaving does not bring them back.
    left: BTreeMap<String, (i64, i64)>,
    /// The last message from a peer that leads: who, and the latest of our messages it
    /// echoed (our `sent_ms`): whether the leader hears us.
    leader_heard: Option<(String, Option<i64>)>,
    /// Pause the room when a watcher runs dry.
    pub hold_when_starved: bool,
}

impl Room {
    pub fn new(file: &str, me: &str, now_ms: i64) -> Room {
        Room {
            file: file.to_string(),
            me: me.to_string(),
            state: Playback {
                playing: false,
                position: 0.0,
                rate: 1.0,
                at_ms: now_ms,
                held: false,
                stamp: Stamp::default(),
            },
            watchers: BTreeMap::new(),
            local: None,
            offsets: BTreeMap::new(),
            last_from: BTreeMap::new(),
            state_offset: None,
            state_theirs_ms: 0,
            left: BTreeMap::new(),
            leader_heard: None,
            hold_when_starved: true,
        }
    }

    fn next_stamp(&self) -> Stamp {
        Stamp {
            // Saturates rather than wraps: a wrapped counter would lose to every state.
            counter: self.state.stamp.counter.saturating_add(1),
            node: self.me.clone(),
        }
    }

    /// A person changed the local player: it becomes the room's state.
    pub fn local_change(&mut self, now_ms: i64, playing: bool, position: f64, rate: f64) {
        self.state_offset = None;
        self.state = Playback {
            playing,
            position,
            rate,
            at_ms: now_ms,
            held: false,
            stamp: self.next_stamp(),
        };
    }

    /// What the local player reports, every few hundred ms.
    pub fn local_report(&mut self, now_ms: i64, position: f64, buffered_s: f64, starved: bool) {
        let expected = self.state.position_at(now_ms);
        self.local = Some(Watcher {
            node: self.me.clone(),
            position,
            drift_s: position - expected,
            buffered_s,
            starved,
            seen_ms: now_ms,
            origin_ms: now_ms,
            direct: true,
        });
    }

    /// The local player is gone.
    pub fn local_left(&mut self) {
        self.local = None;
    }

    /// Whether `m` from `from` may be taken in at all: a stamp not absurdly ahead of
    /// ours, times within [`MAX_TIME_MS`], finite positions within [`MAX_SECONDS`], a rate
    /// in (0, [`MAX_RATE`]].
    fn check(&self, from: &str, m: &RoomMessage) -> Result<(), RoomError> {
        let ours = self.state.stamp.counter;
        if m.state.stamp.counter > ours.saturating_add(MAX_STAMP_LEAD) {
            return Err(RoomError::AcceptStamp {
                from: from.to_string(),
                theirs: m.state.stamp.counter,
                ours,
            });
        }
        let time = |t: i64| (0..=MAX_TIME_MS).contains(&t);
        // A player may report a little before 0; what matters is a number a seek takes.
        let finite = |x: f64| x.is_finite() && x.abs() <= MAX_SECONDS;
        let sane = |w: &Watcher| {
            finite(w.position)
                && finite(w.drift_s)
                && finite(w.buffered_s)
                && w.node.len() <= MAX_WATCHER_NAME
                && time(w.seen_ms)
        };
        let w = m.watcher.as_ref();
        let bad = if m.state.stamp.node.len() > MAX_NODE_ID {
            Some("stamp")
        } else if !time(m.state.at_ms) {
            Some("state time")
        } else if !time(m.sent_ms) || !time(m.echo.0) || !time(m.echo.1) {
            Some("timestamps")
        } else if !finite(m.state.position) {
            Some("position")
        } else if !(m.state.rate > 0.0 && m.state.rate <= MAX_RATE) {
            Some("rate")
        } else if w.is_some_and(|w| !sane(w)) {
            Some("watcher report")
        } else if m.relayed.len() > MAX_RELAYED
            || m.relayed.iter().any(|r| {
                r.id.is_empty()
                    || r.id.len() > MAX_NODE_ID
                    || !(0..=MAX_TIME_MS).contains(&r.age_ms)
                    || !sane(&r.watcher)
            })
        {
            Some("watchers passed on")
        } else {
            None
        };
        match bad {
            Some(field) => Err(RoomError::AcceptField {
                from: from.to_string(),
                field,
            }),
            None => Ok(()),
        }
    }

    /// A message from `from` arrived at `now_ms`; true when the room's state changed.
    /// A message that fails [`Room::check`] changes nothing.
    pub fn receive(&mut self, from: &str, m: RoomMessage, now_ms: i64) -> Result<bool, RoomError> {
        self.check(from, &m)?;
        if m.echo != (0, 0) {
            let (t1, t2) = m.echo;
            self.offsets
                .entry(from.to_string())
                .or_default()
                .sample(t1, t2, m.sent_ms, now_ms);
        }
        self.last_from.insert(from.to_string(), (m.sent_ms, now_ms));
        let offset = self.offset_ms(from);
        match m.watcher {
            Some(w) => {
                let origin_ms = w.seen_ms;
                self.left.remove(from);
                self.watchers.insert(
                    from.to_string(),
                    Watcher {
                        seen_ms: now_ms,
                        origin_ms,
                        direct: true,
                        ..w
                    },
                );
            }
            None => {
                self.watchers.remove(from);
                self.left.insert(from.to_string(), (m.sent_ms, now_ms));
            }
        }
        if m.leads {
            let echoed = (m.echo != (0, 0)).then_some(m.echo.0);
            match &mut self.leader_heard {
                Some((l, t)) if l == from => *t = (*t).max(echoed),
                _ => self.leader_heard = Some((from.to_string(), echoed)),
            }
        } else if self.leader_heard.as_ref().is_some_and(|(l, _)| l == from) {
            // It stopped leading (it heard of a smaller id): nobody is passed our news
            // by it now.
            self.leader_heard = None;
        }
        // Only the leader's word on the others is taken: anyone else's would let one
        // member make up watchers, or a leader.
        if self.leader() == Some(from) {
            for r in m.relayed {
                self.take_relayed(from, r, now_ms);
            }
        }
        if m.state.stamp > self.state.stamp {
            // Their time onto ours.
            self.state = Playback {
                at_ms: m.state.at_ms.saturating_sub(offset),
                ..m.state
            };
            self.state_offset = Some((from.to_string(), offset, self.rtt_ms(from)));
            self.state_theirs_ms = m.state.at_ms;
            return Ok(true);
        }
        let leader = self.leader() == Some(from);
        Ok(self.reoffset_state(from, &m.state, offset, leader))
    }

    /// Moves the state's time again (true when it moved) when the same state came from:
    /// - `from`, the peer it was taken from, and a shorter exchange with `from` has
    ///   changed the offset since;
    /// - the leader (`leader`), whose copy moved since (it corrected its own offset to
    ///   the state's maker), or which we exchange with while the state's time so far came
    ///   from a member we never exchanged with.
    fn reoffset_state(
        &mut self,
        from: &str,
        m_state: &Playback,
        offset: i64,
        leader: bool,
    ) -> bool {
        let rtt = self.rtt_ms(from);
        if m_state.stamp != self.state.stamp {
            return false;
        }
        let Some((peer, applied, applied_rtt)) = self.state_offset.as_mut() else {
            return false;
        };
        let same = peer == from;
        if leader && same && m_state.at_ms != self.state_theirs_ms {
            // The leader moved its own time of the state: ours moves by as much, on the
            // offset we applied (a new one only with a shorter round trip, below).
            let by = m_state.at_ms.saturating_sub(self.state_theirs_ms);
            self.state.at_ms = self.state.at_ms.saturating_add(by);
            self.state_theirs_ms = m_state.at_ms;
            return true;
        }
        let retake = leader && rtt.is_some() && !same && applied_rtt.is_none();
        if retake {
            let at = m_state.at_ms.saturating_sub(offset);
            let moved = at != self.state.at_ms;
            self.state.at_ms = at;
            self.state_offset = Some((from.to_string(), offset, rtt));
            self.state_theirs_ms = m_state.at_ms;
            return moved;
        }
        if !same {
            return false;
        }
        let shorter = match (rtt, *applied_rtt) {
            (Some(now), Some(then)) => now < then,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !shorter {
            return false;
        }
        *applied_rtt = rtt;
        if *applied == offset {
            return false;
        }
        self.state.at_ms = self
            .state
            .at_ms
            .saturating_add(*applied)
            .saturating_sub(offset);
        *applied = offset;
        true
    }

    /// Their clock minus ours for `peer`, in ms.
    pub fn offset_ms(&self, peer: &str) -> i64 {
        self.offsets.get(peer).map_or(0, Offset::ms)
    }

    pub fn rtt_ms(&self, peer: &str) -> Option<i64> {
        self.offsets.get(peer).and_then(Offset::rtt_ms)
    }

    /// The message for `to`, sent at `now_ms`. The leader passes on every watcher it
    /// knows of but `to`.
    pub fn message_for(&self, to: &str, now_ms: i64) -> RoomMessage {
        let leads = self.leads();
        let relayed = if leads {
            self.watchers
                .iter()
                .filter(|(id, _)| id.as_str() != to)
                .take(MAX_RELAYED)
                .map(|(id, w)| Relayed {
                    id: id.clone(),
                    age_ms: now_ms.saturating_sub(w.seen_ms).max(0),
                    watcher: Watcher {
                        seen_ms: w.origin_ms,
                        ..w.clone()
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        RoomMessage {
            file: self.file.clone(),
            state: self.state.clone(),
            watcher: self.local.clone(),
            sent_ms: now_ms,
            echo: self.last_from.get(to).copied().unwrap_or((0, 0)),
            relayed,
            leads,
        }
    }

    /// A watcher the leader passed on: taken when it is not us or the leader, its report
    /// is newer than what we hold of it (and than its leaving), it is not older than a
    /// watcher may be quiet, and the room has space.
    fn take_relayed(&mut self, from: &str, r: Relayed, now_ms: i64) {
        if r.id == self.me || r.id == from {
            return;
        }
        let seen_ms = now_ms.saturating_sub(r.age_ms);
        if now_ms - seen_ms > WATCHER_TIMEOUT_MS {
            return;
        }
        let origin_ms = r.watcher.seen_ms;
        if self.left.get(&r.id).is_some_and(|(at, _)| *at >= origin_ms) {
            return;
        }
        match self.watchers.get(&r.id) {
            Some(w) if w.origin_ms >= origin_ms => return,
            None if self.watchers.len() >= MAX_WATCHERS => return,
            _ => {}
        }
        self.watchers.insert(
            r.id,
            Watcher {
                seen_ms,
                origin_ms,
                direct: false,
                ..r.watcher
            },
        );
    }

    /// The room's leader: the watcher with the smallest node id among us (when we watch)
    /// and those we hear directly; `None` when there is none. A relayed watcher does not
    /// count: the leader it would make might not be heard by anyone.
    pub fn leader(&self) -> Option<&str> {
        let me = self.local.as_ref().map(|_| self.me.as_str());
        me.into_iter()
            .chain(
                self.watchers
                    .iter()
                    .filter(|(_, w)| w.direct)
                    .map(|(id, _)| id.as_str()),
            )
            .min()
    }

    /// Whether we lead: we watch, and no watcher we know of has a smaller id.
    pub fn leads(&self) -> bool {
        self.local.is_some() && self.leader() == Some(self.me.as_str())
    }

    /// Who the heartbeat's message goes to at `now_ms`: the leader, when it says it leads
    /// and has echoed a message of ours sent in the last [`WATCHER_TIMEOUT_MS`]; else
    /// everyone (we lead, or the leader is new, old, or does not hear us).
    pub fn fanout(&self, now_ms: i64) -> Fanout {
        match (self.leader(), &self.leader_heard) {
            (Some(l), Some((heard, Some(echoed))))
                if l != self.me && l == heard && now_ms - *echoed <= WATCHER_TIMEOUT_MS =>
            {
                Fanout::Leader(l.to_string())
            }
            _ => Fanout::Everyone,
        }
    }

    /// Forgets watchers not heard from in a while — our own player too, when it died
    /// without a word; true if one went.
    pub fn expire(&mut self, now_ms: i64) -> bool {
        let before = self.watchers.len();
        self.watchers
            .retain(|_, w| now_ms - w.seen_ms <= WATCHER_TIMEOUT_MS);
        // A relay is never older than a watcher may be quiet: past that, a leaving has
        // nothing left to guard against.
        self.left
            .retain(|_, (_, heard)| now_ms - *heard <= 2 * WATCHER_TIMEOUT_MS);
        let local_gone = self
            .local
            .as_ref()
            .is_some_and(|w| now_ms - w.seen_ms > WATCHER_TIMEOUT_MS);
        if local_gone {
            self.local = None;
        }
        self.watchers.len() != before || local_gone
    }

    /// Every watcher, us first when we watch.
    pub fn all_watchers(&self) -> impl Iterator<Item = &Watcher> {
        self.local.iter().chain(self.watchers.values())
    }

    /// Holds or releases the room for buffering: a running room is held when a watcher
    /// starves; a held one resumes when every watcher has enough ahead. True when the
    /// state changed (and must be sent).
    pub fn settle_readiness(&mut self, now_ms: i64) -> bool {
        if !self.hold_when_starved {
            return false;
        }
        let starving = self.all_watchers().any(|w| w.starved);
        let ready = self
            .all_watchers()
            .all(|w| !w.starved && w.buffered_s >= READY_BUFFER_S);
        if self.state.running() && starving {
            self.state_offset = None;
            self.state = Playback {
                position: self.state.position_at(now_ms),
                at_ms: now_ms,
                held: true,
                stamp: self.next_stamp(),
                ..self.state.clone()
            };
            return true;
        }
        if self.state.playing && self.state.held && ready {
            self.state_offset = None;
            self.state = Playback {
                at_ms: now_ms,
                held: false,
                stamp: self.next_stamp(),
                ..self.state.clone()
            };
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &Room, to: &str, now: i64) -> RoomMessage {
        room.message_for(to, now)
    }

    #[test]
    fn a_pause_on_one_member_becomes_the_state_of_the_other() {
        let mut a = Room::new("s/f.mkv", "a", 0);
        let mut b = Room::new("s/f.mkv", "b", 0);
        a.local_change(1_000, true, 0.0, 1.0);
        assert!(b.receive("a", msg(&a, "b", 1_000), 1_001).unwrap());
        assert!(b.state.running());
        b.local_change(5_000, false, 4.0, 1.0);
        assert!(a.receive("b", msg(&b, "a", 5_000), 5_002).unwrap());
        assert!(!a.state.playing);
        assert_eq!(a.state.position_at(9_000), 4.0);
    }

    #[test]
    fn concurrent_changes_settle_on_the_same_state_everywhere() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        a.local_change(100, false, 10.0, 1.0);
        b.local_change(100, true, 20.0, 1.0);
        let (ma, mb) = (msg(&a, "b", 101), msg(&b, "a", 101));
        a.receive("b", mb, 102).unwrap();
        b.receive("a", ma, 102).unwrap();
        assert_eq!(a.state.stamp, b.state.stamp);
        assert_eq!(a.state.position, b.state.position);
        assert_eq!(a.state.playing, b.state.playing);
    }

    #[test]
    fn an_older_state_does_not_replace_a_newer_one() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        a.local_change(100, true, 0.0, 1.0);
        let old = msg(&a, "b", 100);
        a.local_change(200, false, 0.1, 1.0);
        b.receive("a", msg(&a, "b", 200), 201).unwrap();
        assert!(!b.receive("a", old, 202).unwrap());
        assert!(!b.state.playing);
    }

    #[test]
    fn the_clock_offset_comes_from_the_least_delayed_exchange() {
        let mut o = Offset::default();
        // Their clock runs 500 ms ahead; one-way delays 5 ms, then one slow exchange.
        o.sample(1_000, 1_505, 1_506, 1_011);
        o.sample(2_000, 2_580, 2_581, 2_161);
        assert_eq!(o.ms(), 500);
        assert_eq!(o.rtt_ms(), Some(10));
    }

    #[test]
    fn a_state_from_a_skewed_clock_is_moved_onto_ours() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        // b's clock is 10 s ahead of a's. One round trip teaches a the offset.
        b.receive("a", msg(&a, "b", 1_000), 11_002).unwrap();
        a.receive("b", msg(&b, "a", 11_003), 1_005).unwrap();
        assert!(
            (a.offset_ms("b") - 10_000).abs() <= 2,
            "{}",
            a.offset_ms("b")
        );
        b.local_change(12_000, true, 30.0, 1.0);
        a.receive("b", msg(&b, "a", 12_000), 2_002).unwrap();
        // At a's 3_000 (b's 13_000) the file is 31 s in.
        assert!((a.state.position_at(3_000) - 31.0).abs() < 0.01);
    }

    #[test]
    fn a_state_taken_in_while_one_direction_was_queued_is_moved_once_the_offset_is_cleaner() {
        // One clock; b's messages to a wait 1 s in a full uplink queue, a's to b do not:
        // every exchange then says b's clock is 500 ms ahead.
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        b.receive("a", msg(&a, "b", 1_000), 1_010).unwrap();
        a.receive("b", msg(&b, "a", 1_020), 2_020).unwrap();
        assert_eq!(a.offset_ms("b"), -495);
        b.local_change(3_000, true, 10.0, 1.0);
        b.receive("a", msg(&a, "b", 3_000), 3_010).unwrap();
        a.receive("b", msg(&b, "a", 3_020), 4_020).unwrap();
        let skewed = a.state.position_at(5_000);
        assert!((skewed - 12.0).abs() > 0.4, "{skewed}");
        // The queue drains: one clean exchange, and the state is where b has it.
        b.receive("a", msg(&a, "b", 6_000), 6_010).unwrap();
        assert!(a.receive("b", msg(&b, "a", 6_020), 6_030).unwrap());
        assert_eq!(a.offset_ms("b"), 0);
        assert!((a.state.position_at(5_000) - b.state.position_at(5_000)).abs() < 0.001);
    }

    #[test]
    fn a_later_exchange_with_no_shorter_round_trip_does_not_move_the_state_time() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        // A clean exchange (20 ms) first, then b's state.
        b.receive("a", msg(&a, "b", 1_000), 1_010).unwrap();
        a.receive("b", msg(&b, "a", 1_020), 1_030).unwrap();
        b.local_change(2_000, true, 10.0, 1.0);
        b.receive("a", msg(&a, "b", 2_000), 2_010).unwrap();
        a.receive("b", msg(&b, "a", 2_020), 2_030).unwrap();
        let at = a.state.at_ms;
        // From now on b answers late (200 ms on its side): longer exchanges, another
        // offset, until the clean ones have left the samples.
        for i in 0..(Offset::KEEP as i64 + 1) {
            let t = 3_000 + i * 1_000;
            b.receive("a", msg(&a, "b", t), t + 10).unwrap();
            assert!(!a.receive("b", msg(&b, "a", t + 210), t + 300).unwrap());
        }
        assert_eq!(a.offset_ms("b"), -40);
        assert_eq!(a.state.at_ms, at);
    }

    #[test]
    fn a_state_made_here_is_never_moved_by_a_peer_offset() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        a.local_change(1_000, true, 10.0, 1.0);
        b.receive("a", msg(&a, "b", 1_000), 1_010).unwrap();
        a.receive("b", msg(&b, "a", 1_020), 2_020).unwrap();
        b.receive("a", msg(&a, "b", 3_000), 3_010).unwrap();
        assert!(!a.receive("b", msg(&b, "a", 3_020), 3_030).unwrap());
        assert_eq!(a.state.at_ms, 1_000);
    }

    #[test]
    fn small_drift_nudges_the_speed_and_large_drift_seeks() {
        assert_eq!(correct(10.0, 10.01, 1.0), Correction::Rate(1.0));
        match correct(10.0, 9.9, 1.0) {
            Correction::Nudge(r) => assert!(r > 1.0 && r <= 1.0 + MAX_NUDGE),
            c => panic!("{c:?}"),
        }
        match correct(10.0, 10.1, 1.0) {
            Correction::Nudge(r) => assert!((1.0 - MAX_NUDGE..1.0).contains(&r)),
            c => panic!("{c:?}"),
        }
        assert_eq!(correct(10.0, 3.0, 1.0), Correction::Seek(10.0));
    }

    #[test]
    fn a_starved_watcher_holds_the_room_and_it_resumes_when_all_are_ready() {
        let mut a = Room::new("f", "a", 0);
        a.local_change(0, true, 0.0, 1.0);
        a.local_report(1_000, 1.0, 0.0, true);
        assert!(a.settle_readiness(1_000));
        assert!(a.state.playing && a.state.held && !a.state.running());
        assert_eq!(a.state.position_at(5_000), 1.0);
        a.local_report(2_000, 1.0, READY_BUFFER_S + 1.0, false);
        assert!(a.settle_readiness(2_000));
        assert!(a.state.running());
        assert!((a.state.position_at(3_000) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_watcher_that_goes_quiet_leaves_the_room() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        b.local_report(0, 0.0, 5.0, false);
        a.receive("b", msg(&b, "a", 0), 0).unwrap();
        assert_eq!(a.watchers.len(), 1);
        assert!(!a.expire(WATCHER_TIMEOUT_MS));
        assert!(a.expire(WATCHER_TIMEOUT_MS + 1));
        assert!(a.watchers.is_empty());
        // Our own player, killed without a word, goes the same way.
        a.local_report(10_000, 0.0, 5.0, false);
        assert!(!a.expire(10_000 + WATCHER_TIMEOUT_MS));
        assert!(a.expire(10_001 + WATCHER_TIMEOUT_MS));
        assert!(a.local.is_none());
    }

    #[test]
    fn a_stamp_far_ahead_of_ours_is_refused_and_changes_nothing() {
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        a.local_change(100, true, 0.0, 1.0);
        b.receive("a", msg(&a, "b", 100), 101).unwrap();
        let before = b.state.clone();
        let mut m = msg(&a, "b", 200);
        m.state.playing = false;
        for counter in [u64::MAX, b.state.stamp.counter + MAX_STAMP_LEAD + 1] {
            m.state.stamp.counter = counter;
            assert!(matches!(
                b.receive("a", m.clone(), 201),
                Err(RoomError::AcceptStamp { theirs, .. }) if theirs == counter
            ));
            assert_eq!(b.state, before);
        }
        // Just inside the bound is an ordinary newer state.
        m.state.stamp.counter = b.state.stamp.counter + MAX_STAMP_LEAD;
        assert!(b.receive("a", m, 202).unwrap());
        assert!(!b.state.playing);
    }

    #[test]
    fn a_counter_at_its_maximum_saturates_instead_of_wrapping() {
        let mut a = Room::new("f", "a", 0);
        a.state.stamp.counter = u64::MAX;
        a.local_change(100, true, 0.0, 1.0);
        assert_eq!(a.state.stamp.counter, u64::MAX);
        a.local_report(200, 0.0, 0.0, true);
        assert!(a.settle_readiness(200));
        assert_eq!(a.state.stamp.counter, u64::MAX);
    }

    #[test]
    fn absurd_times_positions_and_rates_are_refused() {
        let a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        let good = msg(&a, "b", 10);
        type Spoil = fn(&mut RoomMessage);
        let spoilers: [(&str, Spoil); 14] = [
            ("watcher report", |m| {
                m.watcher = Some(watcher("x".repeat(MAX_WATCHER_NAME + 1)))
            }),
            ("watchers passed on", |m| {
                m.relayed = vec![relayed("c", 0); MAX_RELAYED + 1]
            }),
            ("watchers passed on", |m| m.relayed = vec![relayed("", 0)]),
            ("watchers passed on", |m| m.relayed = vec![relayed("c", -1)]),
            ("watchers passed on", |m| {
                let mut r = relayed("c", 0);
                r.watcher.buffered_s = f64::NAN;
                m.relayed = vec![r];
            }),
            ("state time", |m| m.state.at_ms = i64::MIN),
            ("state time", |m| m.state.at_ms = MAX_TIME_MS + 1),
            ("timestamps", |m| m.sent_ms = -1),
            ("timestamps", |m| m.echo = (i64::MAX, 0)),
            ("position", |m| m.state.position = f64::NAN),
            ("position", |m| m.state.position = -2e9),
            ("rate", |m| m.state.rate = 0.0),
            ("rate", |m| m.state.rate = f64::INFINITY),
            ("stamp", |m| {
                m.state.stamp.node = "n".repeat(MAX_NODE_ID + 1)
            }),
        ];
        for (field, spoil) in spoilers {
            let mut m = good.clone();
            m.state.stamp.counter = 1;
            spoil(&mut m);
            match b.receive("a", m, 11) {
                Err(RoomError::AcceptField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert_eq!(b.state.stamp, Stamp::default(), "nothing was taken in");
        assert!(b.receive("a", good, 11).is_ok());
    }

    fn watcher(node: String) -> Watcher {
        Watcher {
            node,
            position: 1.0,
            drift_s: 0.0,
            buffered_s: 5.0,
            starved: false,
            seen_ms: 0,
            origin_ms: 0,
            direct: false,
        }
    }

    fn relayed(id: &str, age_ms: i64) -> Relayed {
        Relayed {
            id: id.to_string(),
            age_ms,
            watcher: watcher(id.to_string()),
        }
    }

    /// Rooms of `ids`, each with a local player, at `now`.
    fn watching(ids: &[&str], now: i64) -> Vec<Room> {
        ids.iter()
            .map(|id| {
                let mut r = Room::new("f", id, 0);
                r.local_report(now, 1.0, 5.0, false);
                r
            })
            .collect()
    }

    /// One heartbeat among `rooms` at `now`, as the hub sends it: every room with a local
    /// player reports, then sends to its fan-out (a leader missing from `rooms` is one
    /// whose node is gone). Returns the messages sent.
    fn heartbeat(rooms: &mut [Room], now: i64) -> usize {
        let mut out = Vec::new();
        for r in rooms.iter_mut() {
            if r.local.is_some() {
                r.local_report(now, 1.0, 5.0, false);
            }
            r.expire(now);
        }
        for (i, r) in rooms.iter().enumerate() {
            if r.local.is_none() {
                continue;
            }
            let fanout = r.fanout(now);
            for (j, to) in rooms.iter().enumerate() {
                let due = match &fanout {
                    Fanout::Everyone => j != i,
                    Fanout::Leader(l) => *l == to.me,
                };
                if due {
                    out.push((j, r.me.clone(), r.message_for(&to.me, now)));
                }
            }
        }
        let sent = out.len();
        for (j, from, m) in out {
            rooms[j].receive(&from, m, now + 1).unwrap();
        }
        sent
    }

    #[test]
    fn sixteen_watchers_send_at_most_two_messages_each_a_heartbeat_and_all_see_everyone() {
        let ids: Vec<String> = (0..16).map(|i| format!("n{i:02}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut rooms = watching(&ids, 0);
        // The first heartbeats go to everyone: nobody has heard the leader echo it yet.
        let mut now = 0;
        for _ in 0..2 {
            now += 250;
            assert_eq!(heartbeat(&mut rooms, now), 16 * 15);
        }
        // Then, for 10 s: 15 to the leader, the leader's 15 to the rest.
        for _ in 0..40 {
            now += 250;
            assert_eq!(heartbeat(&mut rooms, now), 30, "not a star at {now} ms");
            for r in &rooms {
                assert_eq!(r.leader(), Some("n00"), "{} follows another leader", r.me);
                assert_eq!(
                    r.all_watchers().count(),
                    16,
                    "{} does not see everyone",
                    r.me
                );
            }
        }
        // A pause at the last member reaches everyone directly.
        rooms[15].local_change(now, false, 3.0, 1.0);
        let news = rooms[15].clone();
        for r in rooms.iter_mut().take(15) {
            let m = news.message_for(&r.me, now);
            assert!(r.receive("n15", m, now + 1).unwrap());
            assert!(!r.state.playing);
        }
    }

    #[test]
    fn the_leader_passes_on_what_it_heard_and_the_latest_report_of_a_watcher_stands() {
        let mut rooms = watching(&["a", "b", "c"], 0);
        // b and c tell a (the leader); a tells b of c, heard 400 ms before.
        for i in [1, 2] {
            let m = rooms[i].message_for("a", 0);
            let from = rooms[i].me.clone();
            rooms[0].receive(&from, m, 100).unwrap();
        }
        assert!(rooms[0].leads());
        let m = rooms[0].message_for("b", 500);
        assert!(m.leads);
        assert!(m.relayed.iter().any(|r| r.id == "c" && r.age_ms == 400));
        assert!(
            !m.relayed.iter().any(|r| r.id == "b"),
            "b was told of itself"
        );
        rooms[1].receive("a", m, 500).unwrap();
        assert_eq!(rooms[1].watchers["c"].seen_ms, 100);
        assert!(!rooms[1].watchers["c"].direct);
        assert_eq!(rooms[1].fanout(500), Fanout::Leader("a".into()));
        // Anyone but the leader passing watchers on is not heard.
        let mut forged = rooms[2].message_for("b", 600);
        forged.relayed = vec![relayed("0", 0)];
        rooms[1].receive("c", forged, 600).unwrap();
        assert!(
            !rooms[1].watchers.contains_key("0"),
            "a made-up watcher was taken"
        );
        assert_eq!(rooms[1].leader(), Some("a"));
        // c's own newer report stands against the leader's older one, and its leaving
        // against the leader's report from before it.
        rooms[2].local_report(1_000, 2.0, 5.0, true);
        let m = rooms[2].message_for("b", 1_000);
        rooms[1].receive("c", m, 1_000).unwrap();
        let m = rooms[0].message_for("b", 1_100);
        rooms[1].receive("a", m, 1_100).unwrap();
        assert!(
            rooms[1].watchers["c"].starved,
            "an older report replaced a newer one"
        );
        rooms[2].local_left();
        let m = rooms[2].message_for("b", 1_200);
        rooms[1].receive("c", m, 1_200).unwrap();
        let m = rooms[0].message_for("b", 1_300);
        rooms[1].receive("a", m, 1_300).unwrap();
        assert!(
            !rooms[1].watchers.contains_key("c"),
            "a relay brought back one who left"
        );
    }

    #[test]
    fn a_watcher_the_leader_no_longer_passes_on_fades_and_is_not_kept_alive_by_relays() {
        let mut rooms = watching(&["a", "b", "c"], 0);
        for t in [250, 500, 750] {
            heartbeat(&mut rooms, t);
        }
        assert!(rooms[1].watchers.contains_key("c"));
        // c's node dies; a and b relay and expire for a while.
        let mut t = 750;
        while t < 750 + 2 * WATCHER_TIMEOUT_MS {
            t += 250;
            heartbeat(&mut rooms[..2], t);
        }
        assert!(!rooms[0].watchers.contains_key("c"));
        assert!(
            !rooms[1].watchers.contains_key("c"),
            "a report grew younger on the way"
        );
    }

    #[test]
    fn when_the_leader_goes_quiet_the_next_smallest_id_leads() {
        let mut rooms = watching(&["a", "b", "c"], 0);
        for t in [250, 500, 750] {
            heartbeat(&mut rooms, t);
        }
        assert_eq!(rooms[2].fanout(750), Fanout::Leader("a".into()));
        // a's node dies: nothing more from it, and nothing reaches it.
        let mut t = 750;
        while t < 750 + WATCHER_TIMEOUT_MS + 1_000 {
            t += 250;
            heartbeat(&mut rooms[1..], t);
        }
        assert!(rooms[1].leads());
        assert_eq!(rooms[2].fanout(t), Fanout::Leader("b".into()));
        assert_eq!(rooms[2].all_watchers().count(), 2, "c still lists a");
    }

    #[test]
    fn a_leader_that_stops_leading_is_no_longer_the_one_told() {
        let mut rooms = watching(&["b", "c"], 0);
        for t in [250, 500, 750] {
            heartbeat(&mut rooms, t);
        }
        assert_eq!(rooms[1].fanout(750), Fanout::Leader("b".into()));
        // b hears of "a", a smaller id, and says it no longer leads.
        let mut a = Room::new("f", "a", 0);
        a.local_report(800, 1.0, 5.0, false);
        let m = a.message_for("b", 800);
        rooms[0].receive("a", m, 800).unwrap();
        let m = rooms[0].message_for("c", 900);
        assert!(!m.leads);
        rooms[1].receive("b", m, 900).unwrap();
        assert_eq!(rooms[1].fanout(900), Fanout::Everyone);
    }

    #[test]
    fn a_watcher_whose_leader_does_not_hear_it_tells_everyone() {
        let mut rooms = watching(&["a", "b"], 0);
        for t in [250, 500, 750] {
            heartbeat(&mut rooms, t);
        }
        assert_eq!(rooms[1].fanout(750), Fanout::Leader("a".into()));
        // From now on a hears nothing from b, and b still hears a.
        let mut t = 750;
        while t <= 750 + WATCHER_TIMEOUT_MS + 250 {
            t += 250;
            rooms[1].local_report(t, 1.0, 5.0, false);
            let m = rooms[0].message_for("b", t);
            rooms[1].receive("a", m, t).unwrap();
        }
        assert_eq!(rooms[1].fanout(t), Fanout::Everyone);
    }

    #[test]
    fn a_state_heard_first_over_no_exchange_takes_its_time_from_the_leaders_copy() {
        // c's clock is 10 s ahead of a's and b's. b and c have exchanged with a, the
        // leader, never with each other.
        let mut a = Room::new("f", "a", 0);
        let mut b = Room::new("f", "b", 0);
        let mut c = Room::new("f", "c", 0);
        a.local_report(1_000, 0.0, 5.0, false);
        for (t, x) in [(1_000, &mut b), (1_000, &mut c)] {
            let skew = if x.me == "c" { 10_000 } else { 0 };
            let me = x.me.clone();
            x.receive("a", a.message_for(&me, t), t + skew + 2).unwrap();
            let answer = x.message_for("a", t + skew + 3);
            a.receive(&me, answer, t + 5).unwrap();
            x.receive("a", a.message_for(&me, t + 6), t + skew + 8)
                .unwrap();
        }
        assert!(b.rtt_ms("a").is_some() && b.rtt_ms("c").is_none());
        // c plays from 30 s at its 12_000 (a's and b's 2_000), and tells everyone.
        c.local_change(12_000, true, 30.0, 1.0);
        b.receive("c", c.message_for("b", 12_000), 2_002).unwrap();
        // Without an exchange b takes c's time as is: 10 s off.
        assert!((b.state.position_at(3_000) - 21.0).abs() < 0.01);
        a.receive("c", c.message_for("a", 12_000), 2_002).unwrap();
        assert!((a.state.position_at(3_000) - 31.0).abs() < 0.02);
        // The leader's copy, over a measured exchange, puts it right.
        assert!(b.receive("a", a.message_for("b", 2_250), 2_252).unwrap());
        let at = b.state.position_at(3_000);
        assert!((at - 31.0).abs() < 0.02, "{at}");
        // A copy from c, still unmeasured, does not move it back.
        assert!(!b.receive("c", c.message_for("b", 12_500), 2_502).unwrap());
        assert!((b.state.position_at(3_000) - 31.0).abs() < 0.02);
        // The leader corrects its own time of the state (by 40 ms): b's copy follows, by
        // just as much, whatever b's latest sample of its offset to a says.
        a.state.at_ms += 40;
        let before = b.state.at_ms;
        assert!(b.receive("a", a.message_for("b", 2_750), 2_752).unwrap());
        assert_eq!(b.state.at_ms, before + 40);
        let at = b.state.position_at(3_000);
        assert!((at - 30.96).abs() < 0.02, "{at}");
    }
}
