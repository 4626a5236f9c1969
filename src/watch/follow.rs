//! Keeping a player in step with its room, without IO: [`Follower`] tells a person's
//! actions on a player (pause, seek, speed) from the effects of our own commands, so
//! nothing echoes between players, and turns the room's state into commands (pause or
//! play, seek when far off, nudge the speed when a little off). The player around it may
//! be mpv (driven by the CLI's `watch`) or a browser page (driven by the
//! daemon, [`crate::watch::page`]): one set of rules for both. It takes `now` and must not
//! read the clock, touch a player, or decide what the room agrees on
//! ([`crate::watch::room`]'s).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::watch::room::{correct, Correction, Playback};

/// A person's change on a player, as the room takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub playing: bool,
    pub position: f64,
    pub rate: f64,
}

/// While a seek of ours is this recent and has not landed, no other correction is made.
pub const OUR_SEEK_WINDOW: Duration = Duration::from_millis(1500);
/// While a seek the player began (a person's or ours) has not landed, for at most this
/// long, no correction is made: the player already reads the seek's target as its position, and taking
/// that for drift would seek back and undo a person's seek before it is reported. A
/// seek into what has not arrived yet can take a few round trips to land.
pub const SEEK_UNDER_WAY: Duration = Duration::from_secs(10);
/// A seek that lands this close to where we sent the player is ours.
pub const OUR_SEEK_SLACK_S: f64 = 0.5;
/// A player echoes a command of ours within this long, or never.
pub const OUR_ECHO_WINDOW: Duration = Duration::from_secs(3);
/// Speeds of ours awaiting their echo, at most (one per poll over the window).
pub const MAX_SENT_SPEEDS: usize = 32;
/// A paused player this far from the room's position is moved there.
pub const PAUSED_SLACK_S: f64 = 0.05;

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
    /// The speeds we set lately, oldest first: the player echoes each of them, possibly after
    /// we sent the next, so the last one alone would take an older echo for a person's.
    sent_speeds: std::collections::VecDeque<(Instant, f64)>,
    /// Our last seek: when, and to where.
    sent_seek: Option<(Instant, f64)>,
    /// The player began a seek (ours or a person's), and when: where it lands tells which.
    seen_seek: Option<Instant>,
    /// A seek landed and where is being read (when its seek began, when it landed):
    /// until the reading comes, the position the player gave meanwhile may be a person's
    /// target, and correcting it would undo that person's seek before it is reported.
    landing: Option<(Instant, Instant)>,
    /// A player reports each value once when it starts being watched (mpv's observed
    /// properties, a page's first report); that is not a person's doing.
    pause_known: bool,
    speed_known: bool,
    /// The room's rate (the speed we run at when in step).
    pub rate: f64,
    /// Nudges are whole multiples of this (a fraction of the room's rate); 0 for any.
    /// A browser's media clock stalls a little at each change of `playbackRate`, so a
    /// page is nudged in steps, not anew at every poll.
    pub nudge_step: f64,
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
            landing: None,
            pause_known: false,
            speed_known: false,
            rate: 1.0,
            nudge_step: 0.0,
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
        // A player echoes our commands in the order sent: this one, and those before it, are
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

    /// The player began a seek.
    pub fn on_seek(&mut self, now: Instant) {
        self.seen_seek = Some(now);
    }

    /// The player landed: true after a seek, when the position must be read to tell whose it
    /// was ([`Follower::landed_at`]); no correction is made until it is.
    pub fn on_landed(&mut self, now: Instant) -> bool {
        match self.seen_seek.take() {
            Some(began) => {
                self.landing = Some((began, now));
                true
            }
            None => false,
        }
    }

    /// The landing's position could not be read: corrections resume.
    pub fn landing_unread(&mut self) {
        self.landing = None;
    }

    /// A seek landed at `position`: ours if that is where we sent the player, else a
    /// person's, returned as a change.
    pub fn landed_at(&mut self, position: f64, now: Instant) -> Option<Change> {
        let began = self.landing.take().map(|(began, _)| began);
        self.on_position(position, now);
        if let Some((sent, target)) = self.sent_seek {
            if (position - target).abs() <= OUR_SEEK_SLACK_S {
                self.sent_seek = None;
                return None;
            }
            // A seek of ours sent after this one began has still to land: it stays ours.
            if began.is_none_or(|b| sent <= b) {
                self.sent_seek = None;
            }
        }
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
                .or(self.landing.map(|(_, landed)| landed))
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
        if self.nudge_step > 0.0 && state.rate > 0.0 {
            let k = ((speed / state.rate - 1.0) / self.nudge_step).round() * self.nudge_step;
            speed = state.rate * (1.0 + k);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::watch::room::Stamp;

    /// A room state at rate 1, for the follower's tests and the player's.
    pub(crate) fn state(playing: bool, position: f64, at_ms: i64) -> Playback {
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
    fn a_persons_seek_is_not_undone_while_where_it_landed_is_read() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        let room = state(true, 1.0, 0);
        f.on_position(1.0, now);
        f.on_seek(now);
        // mpv reads the target meanwhile.
        f.on_position(60.0, now);
        // playback-restart: where it landed is asked for; a poll comes before the answer.
        assert!(f.on_landed(now));
        let cmds = f.follow(&room, 0, now);
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Seek(_))),
            "{cmds:?}"
        );
        assert_eq!(f.landed_at(60.0, now).map(|c| c.position), Some(60.0));
    }

    #[test]
    fn a_seek_of_ours_sent_after_a_persons_began_is_still_ours_when_it_lands() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let t0 = Instant::now();
        f.on_position(1.0, t0);
        f.on_seek(t0);
        assert!(f.on_landed(t0));
        // The person's landing is unread for longer than a seek may take: corrections
        // resume, and ours goes out.
        let later = t0 + SEEK_UNDER_WAY + Duration::from_millis(1);
        f.on_position(60.0, later);
        let cmds = f.follow(&state(true, 1.0, 0), 0, later);
        let Some(Command::Seek(to)) = cmds.into_iter().find(|c| matches!(c, Command::Seek(_)))
        else {
            panic!("no correction after the landing was given up on");
        };
        // The person's landing is read: theirs, and ours is still awaited.
        assert!(f.landed_at(60.0, later).is_some());
        f.on_seek(later);
        assert!(f.on_landed(later));
        assert_eq!(
            f.landed_at(to, later),
            None,
            "our own seek taken for a person's"
        );
    }

    #[test]
    fn a_landing_that_cannot_be_read_does_not_hold_corrections() {
        let mut f = Follower {
            paused: false,
            ..Default::default()
        };
        let now = Instant::now();
        f.on_position(30.0, now);
        f.on_seek(now);
        assert!(f.on_landed(now));
        f.landing_unread();
        let cmds = f.follow(&state(true, 1.0, 0), 0, now);
        assert!(
            cmds.iter().any(|c| matches!(c, Command::Seek(_))),
            "{cmds:?}"
        );
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
        assert!(f.on_landed(now));
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
        assert!(f.on_landed(now));
        assert_eq!(f.landed_at(42.0, now).map(|c| c.position), Some(42.0));
        // Ours is not, even when a person's follows it closely.
        let cmds = f.follow(&state(false, 30.0, 0), 0, now);
        assert_eq!(cmds, vec![Command::Seek(30.0)]);
        f.on_seek(now);
        assert!(f.on_landed(now));
        assert_eq!(f.landed_at(30.0, now), None);
        f.on_seek(now);
        assert!(f.on_landed(now));
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
}
