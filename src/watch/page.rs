//! Watching in a browser: the page the loopback endpoint serves under a stream's token
//! (`GET /<token>/`), and the endpoint its script reports to (`POST /<token>/player`).
//! The page is a thin `<video>`: it posts what the player shows, and applies the commands
//! it gets back. The rules stay here, on the daemon's side, in one [`Follower`] per
//! stream — the same follower `watchalong watch` runs for mpv — so echoes are told from a
//! person's actions the same way for both players. It owns the page, its headers
//! (a strict Content-Security-Policy, no caching, no referrer) and the parsing of the
//! page's reports (bounded and strict: loopback is open to every local user and every web
//! page); the token and `Host` checks are the stream endpoint's, made before it is asked
//! (through [`Pages`], as this module sits above it), and what the room agrees on is
//! [`crate::watch::room`]'s.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::base::clock::now_ms;
use crate::base::lock::Recover;
use crate::watch::follow::{Command, Follower};
use crate::watch::hub::{Change, Report, RoomView};
use crate::watch::room::Playback;
use crate::watch::stream::{Pages, Stream};

/// The page, with `{{NONCE}}` and `{{SRC}}` to fill in.
const PAGE: &str = include_str!("page.html");

/// The largest report a page may post; a real one is under 300 bytes.
pub const MAX_REPORT: usize = 1024;
/// A report's body must arrive within this long.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// A page that has not reported for this long has gone (closed, or its tab discarded): a
/// new page may take its stream.
const PAGE_GONE: Duration = Duration::from_secs(3);
/// Playback rates a page may report: what browsers accept, and no absurd values.
const RATES: std::ops::RangeInclusive<f64> = 0.0625..=16.0;
/// A page's nudges are whole percents of the room's rate (see [`Follower::nudge_step`]).
const NUDGE_STEP: f64 = 0.01;
/// The longest position a page may report, in seconds (a week).
const MAX_POSITION_S: f64 = 7.0 * 86_400.0;

/// The room, as the page endpoint reaches it: the daemon implements it over
/// [`crate::watch::hub::Watch`], sending a person's change to the other members without
/// making the page wait for them.
pub trait Rooms: Send + Sync {
    /// The room's state for `file`.
    fn state(&self, file: &str) -> Playback;
    /// The local player's report; the room as it now stands.
    fn report(&self, r: Report) -> RoomView;
}

/// What a page posts, every 100 ms and at once after a person's action: what its
/// `<video>` shows.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageReport {
    /// A random id the page chose when it loaded: one page plays a stream at a time.
    pub page: String,
    pub paused: bool,
    /// `currentTime`, in seconds.
    pub time: f64,
    /// `playbackRate`.
    pub rate: f64,
    /// Whether a seek is under way (`seeking`).
    pub seeking: bool,
    /// How many seeks have landed (`seeked` events) since the page loaded: a seek may
    /// begin and land between two reports.
    pub seeked: u64,
    /// Seconds buffered ahead of `currentTime`.
    pub buffered: f64,
    /// Playing but waiting for data (`readyState` under `HAVE_FUTURE_DATA`).
    pub starved: bool,
}

impl PageReport {
    /// The report in `body`, if it is one a page could send.
    pub fn parse(body: &[u8]) -> Option<PageReport> {
        if body.len() > MAX_REPORT {
            return None;
        }
        let r: PageReport = serde_json::from_slice(body).ok()?;
        let id_ok =
            (8..=32).contains(&r.page.len()) && r.page.bytes().all(|b| b.is_ascii_hexdigit());
        let numbers_ok = r.time.is_finite()
            && (0.0..=MAX_POSITION_S).contains(&r.time)
            && RATES.contains(&r.rate)
            && r.buffered.is_finite()
            && (0.0..=MAX_POSITION_S).contains(&r.buffered);
        (id_ok && numbers_ok).then_some(r)
    }
}

/// One page's player, as the daemon follows it.
#[derive(Debug)]
pub struct Page {
    id: String,
    follower: Follower,
    last: Option<PageReport>,
    heard: Instant,
}

impl Page {
    fn new(id: &str, now: Instant) -> Page {
        Page {
            id: id.to_string(),
            follower: {
                let mut f = Follower::default();
                f.nudge_step = NUDGE_STEP;
                f
            },
            last: None,
            heard: now,
        }
    }

    /// Takes a report in; a change a person made is returned. `first_watcher`: nobody
    /// has started the room yet, so this page's first report starts it from the start,
    /// as mpv's first watcher does.
    pub fn observe(&mut self, r: &PageReport, first_watcher: bool, now: Instant) -> Option<Change> {
        self.heard = now;
        let f = &mut self.follower;
        let prev = self.last.replace(r.clone());
        let mut person = false;
        if r.seeking && !prev.as_ref().is_some_and(|p| p.seeking) {
            f.on_seek(now);
        }
        let landed = prev.as_ref().is_some_and(|p| r.seeked > p.seeked);
        if landed {
            // A seek that began and landed between two reports was still a seek.
            f.on_seek(now);
            f.on_landed(now);
            person |= f.landed_at(r.time, now).is_some();
        } else {
            f.on_position(r.time, now);
        }
        // The first report tells where the page starts, as mpv's first property values do.
        if prev.as_ref().is_none_or(|p| p.paused != r.paused) {
            person |= f.on_pause(r.paused, now).is_some();
        }
        if prev.as_ref().is_none_or(|p| (p.rate - r.rate).abs() > 1e-9) {
            person |= f.on_speed(r.rate, now).is_some();
        }
        if prev.is_none() && first_watcher {
            return Some(Change {
                playing: true,
                position: 0.0,
                rate: 1.0,
            });
        }
        // Whatever the person did, the page's whole state is what the room takes.
        person.then(|| Change {
            playing: !r.paused,
            position: f.position_now(now),
            rate: f.rate,
        })
    }

    /// What the page must do to follow the room's `state`.
    pub fn follow(&mut self, state: &Playback, now_ms: i64, now: Instant) -> Vec<Command> {
        self.follower.follow(state, now_ms, now)
    }

    fn report(&self, file: &str, change: Option<Change>, now: Instant) -> Report {
        let (buffered_s, starved) = self
            .last
            .as_ref()
            .map_or((0.0, false), |r| (r.buffered, r.starved));
        Report {
            file: file.to_string(),
            position: self.follower.position_now(now),
            buffered_s,
            starved,
            change,
        }
    }
}

/// A command as the page's script applies it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum PageCommand {
    Pause(bool),
    Rate(f64),
    Seek(f64),
}

#[derive(Debug, Serialize)]
struct Watcher {
    node: String,
    drift_ms: i64,
    buffered_s: f64,
    starved: bool,
}

/// The answer to a report: what to do, and the room to show.
#[derive(Debug, Serialize)]
struct PageReply {
    commands: Vec<PageCommand>,
    file: String,
    playing: bool,
    held: bool,
    /// The room's rate: the page tells a nudge from it.
    rate: f64,
    watchers: Vec<Watcher>,
}

fn reply(view: &RoomView, commands: &[Command]) -> PageReply {
    PageReply {
        commands: commands
            .iter()
            .map(|c| match c {
                Command::Pause(p) => PageCommand::Pause(*p),
                Command::Speed(s) => PageCommand::Rate(*s),
                Command::Seek(t) => PageCommand::Seek(*t),
            })
            .collect(),
        file: view.file.clone(),
        playing: view.state.playing,
        held: view.state.held,
        rate: view.state.rate,
        watchers: view
            .watchers
            .iter()
            .map(|w| Watcher {
                node: w.node.clone(),
                drift_ms: w.drift_ms,
                buffered_s: w.buffered_s,
                starved: w.starved,
            })
            .collect(),
    }
}

fn text(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    no_store(&mut r);
    r
}

fn no_store<B>(r: &mut Response<B>) {
    let h = r.headers_mut();
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    // The page's URL holds the stream's token: no request may carry it elsewhere.
    h.insert(
        hyper::header::REFERRER_POLICY,
        hyper::header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
}

/// The page for `stream`, whose video is at `src` (its URL path, percent-encoded).
/// Its script and style are inline, allowed by a nonce made for this response alone;
/// nothing else may run, load or connect beyond this origin.
pub fn page(src: &str) -> Response<Full<Bytes>> {
    let mut n = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut n);
    let nonce: String = n.iter().map(|b| format!("{b:02x}")).collect();
    let html = PAGE.replace("{{NONCE}}", &nonce).replace("{{SRC}}", src);
    let mut r = Response::new(Full::new(Bytes::from(html)));
    no_store(&mut r);
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         media-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    );
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = csp.parse() {
        h.insert(hyper::header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        hyper::header::X_FRAME_OPTIONS,
        hyper::header::HeaderValue::from_static("DENY"),
    );
    r
}

/// The page's routes for the stream endpoint: the page itself, and its reports, each
/// taken into the follower of its stream's page and into the room.
pub struct Endpoint {
    rooms: Arc<dyn Rooms>,
    /// The page playing each open stream, by `share/path`, with the stream it plays: a
    /// stream reopened (a new token) starts afresh, and one closed is forgotten at the
    /// next report, so there is at most one page per open stream.
    pages: Mutex<HashMap<String, (Weak<Stream>, Page)>>,
}

impl Endpoint {
    pub fn new(rooms: Arc<dyn Rooms>) -> Endpoint {
        Endpoint {
            rooms,
            pages: Mutex::new(HashMap::new()),
        }
    }

    /// A page's report on `stream`: taken into its follower and the room; the answer
    /// holds the commands that keep the page in step, and the room's watchers.
    async fn report(&self, stream: &Arc<Stream>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REPORT as u64) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "a report is at most 1 KiB\n");
        }
        let body = Limited::new(req.into_body(), MAX_REPORT);
        let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "a report is at most 1 KiB\n")
            }
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "the report came too slowly\n"),
        };
        let Some(r) = PageReport::parse(&body) else {
            return text(
                StatusCode::BAD_REQUEST,
                "not a player report: reload the page\n",
            );
        };
        let now = Instant::now();
        // Nothing slow runs under this lock: the room's report is an update in memory,
        // and the daemon sends a change to the others from a task of its own.
        let mut pages = self.pages.locked();
        pages.retain(|_, (s, _)| s.strong_count() > 0);
        let current = pages
            .get(&stream.file)
            .filter(|(s, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(stream)));
        match current {
            Some((_, p))
                if p.id != r.page && now.saturating_duration_since(p.heard) < PAGE_GONE =>
            {
                return text(
                    StatusCode::CONFLICT,
                    "another page plays this stream: close it, or run `watchalong watch` again\n",
                );
            }
            Some((_, p)) if p.id == r.page => {}
            _ => {
                pages.insert(
                    stream.file.clone(),
                    (Arc::downgrade(stream), Page::new(&r.page, now)),
                );
            }
        }
        let Some((_, page)) = pages.get_mut(&stream.file) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "no page\n");
        };
        let first_watcher =
            page.last.is_none() && self.rooms.state(&stream.file).stamp.counter == 0;
        let change = page.observe(&r, first_watcher, now);
        let view = self.rooms.report(page.report(&stream.file, change, now));
        let commands = page.follow(&view.state, now_ms(), Instant::now());
        drop(pages);
        let body = serde_json::to_vec(&reply(&view, &commands)).unwrap_or_default();
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        no_store(&mut resp);
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl Pages for Endpoint {
    fn page(&self, src: &str) -> Response<Full<Bytes>> {
        page(src)
    }

    fn player<'a>(
        &'a self,
        stream: &'a Arc<Stream>,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send + 'a>> {
        Box::pin(self.report(stream, req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::room::Stamp;

    fn report(paused: bool, time: f64) -> PageReport {
        PageReport {
            page: "0123456789abcdef".into(),
            paused,
            time,
            rate: 1.0,
            seeking: false,
            seeked: 0,
            buffered: 5.0,
            starved: false,
        }
    }

    fn playing(position: f64, counter: u64) -> Playback {
        Playback {
            playing: true,
            position,
            rate: 1.0,
            at_ms: 0,
            held: false,
            stamp: Stamp {
                counter,
                node: "n".into(),
            },
        }
    }

    #[test]
    fn a_report_is_taken_only_when_it_is_small_strict_and_sane() {
        let good = r#"{"page":"0123456789abcdef","paused":false,"time":1.5,"rate":1,"seeking":false,"seeked":0,"buffered":3,"starved":false}"#;
        assert_eq!(
            PageReport::parse(good.as_bytes()).map(|r| r.time),
            Some(1.5)
        );
        for bad in [
            good.replace(r#""starved":false"#, r#""starved":false,"extra":1"#),
            good.replace(r#","starved":false"#, ""),
            good.replace("0123456789abcdef", "<script>"),
            good.replace(r#""time":1.5"#, r#""time":-1"#),
            good.replace(r#""time":1.5"#, r#""time":1e300"#),
            good.replace(r#""rate":1"#, r#""rate":0"#),
            good.replace(r#""rate":1"#, r#""rate":100"#),
            good.replace(r#""buffered":3"#, r#""buffered":-3"#),
            "[]".to_string(),
            "{".to_string(),
            format!("{good}{}", " ".repeat(MAX_REPORT)),
        ] {
            assert!(PageReport::parse(bad.as_bytes()).is_none(), "{bad} taken");
        }
    }

    #[test]
    fn a_pages_first_report_starts_an_unstarted_room_and_joins_a_started_one_quietly() {
        let now = Instant::now();
        let mut first = Page::new("a", now);
        let c = first.observe(&report(true, 0.0), true, now);
        assert_eq!(c.map(|c| c.playing), Some(true));
        let mut late = Page::new("b", now);
        assert_eq!(late.observe(&report(true, 0.0), false, now), None);
        // It is then moved to the room and played.
        assert_eq!(
            late.follow(&playing(40.0, 3), 0, now),
            vec![Command::Seek(40.0), Command::Pause(false)]
        );
    }

    #[test]
    fn our_play_and_seek_echoed_by_the_page_are_not_a_persons_but_a_pause_after_them_is() {
        let now = Instant::now();
        let mut p = Page::new("a", now);
        assert_eq!(p.observe(&report(true, 0.0), false, now), None);
        let room = playing(40.0, 3);
        assert_eq!(p.follow(&room, 0, now).len(), 2);
        // The page seeks (the seek begins, then lands at the target) and plays.
        let mut r = report(true, 40.0);
        r.seeking = true;
        assert_eq!(p.observe(&r, false, now), None);
        r.seeking = false;
        r.seeked = 1;
        r.paused = false;
        assert_eq!(p.observe(&r, false, now), None, "the echo was a change");
        assert!(p.follow(&room, 0, now).is_empty());
        // A person pauses.
        r.paused = true;
        let c = p.observe(&r, false, now).expect("a person's pause");
        assert!(!c.playing);
        assert_eq!(c.position, 40.0);
    }

    #[test]
    fn a_seek_that_begins_and_lands_between_two_reports_is_a_persons_seek() {
        let now = Instant::now();
        let mut p = Page::new("a", now);
        let mut r = report(false, 10.0);
        p.observe(&r, false, now);
        r.seeked = 1;
        r.time = 70.0;
        let c = p.observe(&r, false, now).expect("the seek was missed");
        assert_eq!((c.position, c.playing), (70.0, true));
    }

    #[test]
    fn a_rate_the_page_reports_back_after_our_nudge_is_not_a_persons() {
        let now = Instant::now();
        let mut p = Page::new("a", now);
        p.observe(&report(false, 9.9), false, now);
        let cmds = p.follow(&playing(10.0, 3), 0, now);
        let Some(Command::Speed(s)) = cmds.first().cloned() else {
            panic!("{cmds:?}")
        };
        let mut r = report(false, 9.9);
        r.rate = s;
        assert_eq!(p.observe(&r, false, now), None);
        r.rate = 1.5;
        assert_eq!(p.observe(&r, false, now).map(|c| c.rate), Some(1.5));
    }
}
