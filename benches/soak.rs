//! Soak benchmark (issue 11, "Nothing lost, nothing crashes"). Root needed, with mpv and
//! ffmpeg installed.
//!
//!     sudo scripts/soak.sh [MINUTES]        (or: cargo bench --bench soak -- MINUTES [--json])
//!
//! Lab: the host and d1 on the lab internet, s1a and s1b behind one NAT router (r1), d2
//! alone behind another (r2); one read-write share `docs` on all five. At the start s1a
//! moves a 1 GiB file into the share and d1 watches a video from the host's read-only
//! share `movies` with headless mpv, for the whole run. Then, for MINUTES, a seeded random
//! schedule (`SOAK_SEED`; printed) edits small files on random members (create, append,
//! overwrite, rename, delete, mkdir, rmdir) and churns the members: SIGTERM and start,
//! kill -9 and start (host included), stop for a while, or removal by the host and, after
//! a while, a fresh identity joining again with a new link. d1 is never restarted: its
//! player is the room that plays the whole run. Every 2 s each daemon's RSS and open
//! descriptors are sampled, and whether it still runs.
//!
//! At the end the schedule stops, every member comes back, and the run passes when:
//! every tree is the same (path → BLAKE3, folders included, the daemon's own
//! `.watchalong-*` names excluded) within `SOAK_CONVERGE_SECS` (default 900); the 1 GiB
//! file is in it whole; the ledger balances (below); no daemon exited unless the schedule
//! stopped it; each daemon's RSS stayed under 256 MiB and its open descriptors under 512.
//!
//! The ledger. Every content the schedule ever wrote (each create, each append's and each
//! overwrite's result, the 1 GiB file) is recorded by its BLAKE3; writes go through one
//! open descriptor that first reads what it replaces, so both the replaced and the new
//! content are exactly known. At the end each recorded content must be either in the
//! final tree (at any path: renames and conflict copies move contents) or in some
//! member's `.watchalong-versions`, or be *excused*: the schedule itself replaced or
//! deleted it (a user's own edit, which nothing keeps) at a moment when no other member's
//! tree and no versions folder held it, so it had not synced anywhere yet and no daemon
//! was at fault. Sync never gets an excuse: what a daemon replaces must be kept. The
//! reverse holds too: a content in a final tree or a versions folder that the schedule
//! never wrote is a mixed or corrupted file, and fails the run, with one exception: a
//! versions folder may hold the empty file a create or an overwrite passes through
//! between truncating and writing (a scan that caught it synced it, and what sync
//! replaces it keeps). Contents are random, so two writes never share a BLAKE3.
//!
//! The seed replays the same choices; what they meet (which files a member holds at that
//! moment) depends on timing, so two runs with one seed are alike, not identical. Every
//! action is written to `target/soak/SEED-actions.log`, and on failure every daemon's log
//! beside it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use common::player::*;
use common::*;

/// The bounds a daemon must stay within, whatever the schedule does to it.
const MAX_RSS_KIB: u64 = 256 * 1024;
const MAX_FDS: usize = 512;
/// How often daemons (and the player) are looked at.
const SAMPLE: Duration = Duration::from_secs(2);
/// The big file, never touched by the schedule.
const BIG: &str = "big.bin";
const BIG_SIZE: u64 = 1 << 30;
/// Files the schedule may edit are small; anything bigger is the big file.
const SMALL: u64 = 1 << 20;

/// BLAKE3 of files, remembered while a file's inode, size and times stay the same, so a
/// tree can be compared every few hundred ms without hashing the GiB again.
#[derive(Default)]
struct Hashes(HashMap<PathBuf, (u64, u64, i64, i64, i64, blake3::Hash)>);

impl Hashes {
    fn of(&mut self, p: &Path, m: &std::fs::Metadata) -> Option<blake3::Hash> {
        let key = (m.ino(), m.size(), m.mtime_nsec(), m.mtime(), m.ctime_nsec());
        if let Some(&(i, s, mn, mt, cn, h)) = self.0.get(p) {
            if (i, s, mn, mt, cn) == key {
                return Some(h);
            }
        }
        let mut f = std::fs::File::open(p).ok()?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut f, &mut hasher).ok()?;
        let h = hasher.finalize();
        self.0
            .insert(p.to_path_buf(), (key.0, key.1, key.2, key.3, key.4, h));
        Some(h)
    }
}

/// Whether a name is the daemon's own (versions folder, share marker, partial pulls).
fn daemons_own(name: &str) -> bool {
    name.contains(".watchalong-")
}

/// Every entry under `root` but the daemon's own: path → BLAKE3 hex, or "dir".
fn tree(h: &mut Hashes, root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (rel, p, m) in walk(root, true) {
        if m.is_dir() {
            out.insert(rel, "dir".to_string());
        } else if let Some(x) = h.of(&p, &m) {
            out.insert(rel, x.to_hex().to_string());
        }
    }
    out
}

/// Every entry under `dir` (relative path, path, metadata), without following links; with
/// `skip_own`, the daemon's own names and what is under them are left out.
fn walk(dir: &Path, skip_own: bool) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if skip_own && daemons_own(&name) {
                continue;
            }
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p
                .strip_prefix(dir)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((rel, p, m));
        }
    }
    out
}

fn versions_dir(root: &Path) -> PathBuf {
    root.join(".watchalong-versions")
}

/// Whether a content of `size` bytes hashing to `want` is in any member's tree but
/// `except`'s, or in any member's versions folder.
fn held_elsewhere(
    h: &mut Hashes,
    roots: &[PathBuf],
    except: usize,
    want: &blake3::Hash,
    size: u64,
) -> bool {
    for (i, root) in roots.iter().enumerate() {
        let mut places = vec![(versions_dir(root), false)];
        if i != except {
            places.push((root.clone(), true));
        }
        for (dir, skip_own) in places {
            for (_, p, m) in walk(&dir, skip_own) {
                if m.is_file() && m.size() == size && h.of(&p, &m).as_ref() == Some(want) {
                    return true;
                }
            }
        }
    }
    false
}

/// What the schedule wrote: one content.
struct Written {
    node: String,
    path: String,
    hash: blake3::Hash,
    action: usize,
}

#[derive(Default)]
struct Ledger {
    written: Vec<Written>,
    /// Contents the schedule itself replaced or deleted before any other member or any
    /// versions folder held them, with the action that did it.
    excused: HashMap<blake3::Hash, usize>,
    /// Contents a file held for a moment while the schedule wrote it: the empty file
    /// between a create's or an overwrite's truncation and its write. A scan may catch one
    /// and sync it, and a member that then replaces it keeps it, as it must; so a kept
    /// version may hold one. A final tree may not: the write that followed must win.
    passing: HashSet<blake3::Hash>,
}

/// The proc state letter of `pid` (`Z` for a daemon that exited and is not reaped yet),
/// or None when there is no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.chars().next()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

enum Phase {
    Up,
    /// Stopped by the schedule, to start again at `until`.
    Down {
        until: Instant,
    },
    /// Removed by the host, running alone under a fresh identity, to join at `until`.
    Out {
        until: Instant,
    },
}

struct Member {
    node: Node,
    root: PathBuf,
    place: &'static str,
    phase: Phase,
    /// The schedule may SIGTERM or kill it.
    restarts: bool,
    /// The schedule may stop it for a while or have it removed.
    leaves: bool,
    max_rss_kib: u64,
    max_fds: usize,
    /// Exits the schedule did not cause, each with what was seen.
    crashes: Vec<String>,
}

impl Member {
    fn up(&self) -> bool {
        matches!(self.phase, Phase::Up)
    }
}

/// The run: members, ledger, counters and the log of every action.
struct Soak {
    members: Vec<Member>,
    roots: Vec<PathBuf>,
    hashes: Hashes,
    ledger: Ledger,
    rng: StdRng,
    seed: u64,
    start: Instant,
    actions: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
    bytes_written: u64,
    player: Option<Player>,
    /// Player samples: (seconds since start, position).
    plays: Vec<(f64, f64)>,
    player_restarts: u32,
    out_dir: PathBuf,
}

impl Soak {
    fn note(&mut self, what: String) {
        let line = format!("{:8.1}s {what}", self.start.elapsed().as_secs_f64());
        self.actions.push(line);
    }

    fn say(&mut self, what: String) {
        eprintln!("soak {:7.1}s {what}", self.start.elapsed().as_secs_f64());
        self.note(what);
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    /// Looks at every daemon that should run: RSS, descriptors, and whether it exited.
    fn sample(&mut self) {
        for i in 0..self.members.len() {
            if !self.members[i].up() {
                continue;
            }
            let Some(pid) = self.members[i].node.pid() else {
                continue;
            };
            match proc_state(pid) {
                Some('Z') | None => {
                    self.crashed(i, "exited on its own");
                    continue;
                }
                _ => {}
            }
            let m = &mut self.members[i];
            if let Some(k) = rss_kib(pid) {
                m.max_rss_kib = m.max_rss_kib.max(k);
            }
            if let Some(n) = fd_count(pid) {
                m.max_fds = m.max_fds.max(n);
            }
        }
        let Some(p) = &self.player else {
            return;
        };
        let pos = p.position();
        self.plays.push((self.start.elapsed().as_secs_f64(), pos));
        // Three samples without an answer from mpv: the player is gone. It is started
        // again, so the room plays on, and counted: d1 is never stopped, so a player that
        // dies is a finding.
        let dead = self.plays.len() >= 3
            && self.plays[self.plays.len() - 3..]
                .iter()
                .all(|(_, p)| *p < 0.0);
        if dead {
            self.player = None;
            self.player_restarts += 1;
            let log = std::fs::read_to_string(self.members[1].node.dir.join("watch.log"))
                .unwrap_or_default();
            self.say(format!(
                "d1's player stopped answering; started again. watch log:\n{log}"
            ));
            self.player = Some(Player::start(&self.members[1].node, "movies/film.mp4"));
            self.plays.push((self.start.elapsed().as_secs_f64(), 0.0));
        }
    }

    /// Member `i`'s daemon is gone without the schedule stopping it: recorded with its log's
    /// tail, and started again so the run goes on and finds what else there is.
    fn crashed(&mut self, i: usize, how: &str) {
        let tail = log_tail(&self.members[i].node, 40);
        let what = format!("{} {how}; its log ends:\n{tail}", self.members[i].node.name);
        self.say(format!("FAILURE: {what}"));
        self.members[i].crashes.push(what);
        self.members[i].node.kill9();
        self.members[i].node.start();
        self.members[i].phase = Phase::Up;
    }

    /// Whether member `i`'s daemon still runs; if it does not, that is a crash.
    fn alive(&mut self, i: usize) -> bool {
        let state = self.members[i].node.pid().and_then(proc_state);
        if matches!(state, Some('Z') | None) {
            self.crashed(i, "had exited on its own before the schedule stopped it");
            return false;
        }
        true
    }

    /// One user action on a random member's folder.
    fn edit(&mut self, n: usize) {
        let who = self.rng.gen_range(0..self.members.len());
        let root = self.roots[who].clone();
        let now = tree(&mut self.hashes, &root);
        let files: Vec<String> = now
            .iter()
            .filter(|(p, h)| {
                *h != "dir" && std::fs::metadata(root.join(p)).is_ok_and(|m| m.len() < SMALL)
            })
            .map(|(p, _)| p.clone())
            .collect();
        let dirs: Vec<String> = now
            .iter()
            .filter(|(_, h)| *h == "dir")
            .map(|(p, _)| p.clone())
            .collect();
        let empty: Vec<String> = dirs
            .iter()
            .filter(|d| !now.keys().any(|k| k.starts_with(&format!("{d}/"))))
            .cloned()
            .collect();
        let folder = match dirs.choose(&mut self.rng) {
            Some(d) if self.rng.gen_bool(0.5) => format!("{d}/"),
            _ => String::new(),
        };
        let file = files.choose(&mut self.rng).cloned();
        let mut content = vec![0u8; self.rng.gen_range(1..48 * 1024)];
        self.rng.fill(&mut content[..]);
        // create 3, append 2, overwrite 2, rename 1, delete 1, mkdir 1, rmdir 1, and one
        // file overwritten on two members at once 1 (of 12).
        let pick = self.rng.gen_range(0..12);
        let name = self.members[who].node.name.clone();
        let r = match (pick, file) {
            (3 | 4, Some(f)) => {
                let extra = &content[..content.len().min(100)];
                self.replace(who, n, &f, "append", |old| {
                    let mut new = old.to_vec();
                    new.extend_from_slice(extra);
                    new
                })
            }
            (5 | 6, Some(f)) => self.replace(who, n, &f, "overwrite", |_| content.clone()),
            (7, Some(f)) => {
                let to = format!("{folder}n{n}.moved");
                std::fs::rename(root.join(&f), root.join(&to))
                    .map(|_| ("rename", format!("rename {f} {to}")))
            }
            (8, Some(f)) => self.delete(who, n, &f),
            (9, _) => {
                let d = format!("{folder}n{n}.d");
                std::fs::create_dir(root.join(&d)).map(|_| ("mkdir", format!("mkdir {d}")))
            }
            (11, Some(f)) => {
                let other = (who + self.rng.gen_range(1..self.members.len())) % self.members.len();
                let theirs = self.roots[other].join(&f);
                if std::fs::metadata(&theirs).is_ok_and(|m| m.is_file() && m.len() < SMALL) {
                    let mut second = vec![0u8; self.rng.gen_range(1..48 * 1024)];
                    self.rng.fill(&mut second[..]);
                    let other_name = self.members[other].node.name.clone();
                    self.replace(who, n, &f, "overwrite", |_| content.clone())
                        .and_then(|_| self.replace(other, n, &f, "overwrite", |_| second))
                        .map(|_| {
                            (
                                "clash",
                                format!("overwrite {f} here and on {other_name} at once"),
                            )
                        })
                } else {
                    Err(std::io::Error::other(format!(
                        "{f} is not on {} too",
                        self.members[other].node.name
                    )))
                }
            }
            (10, _) if !empty.is_empty() => {
                let d = empty.choose(&mut self.rng).cloned().unwrap_or_default();
                std::fs::remove_dir(root.join(&d)).map(|_| ("rmdir", format!("rmdir {d}")))
            }
            _ => {
                let p = format!("{folder}n{n}.bin");
                let hash = blake3::hash(&content);
                self.ledger.passing.insert(blake3::hash(b""));
                std::fs::write(root.join(&p), &content).map(|_| {
                    self.bytes_written += content.len() as u64;
                    self.ledger.written.push(Written {
                        node: name.clone(),
                        path: p.clone(),
                        hash,
                        action: n,
                    });
                    ("create", format!("create {p} ({} B)", content.len()))
                })
            }
        };
        match r {
            Ok((kind, what)) => {
                self.count(kind);
                self.note(format!("#{n} {name}: {what}"));
            }
            Err(e) => {
                // The sync may have moved the target a moment ago: the user's action
                // fails, as it would for them, and the run goes on.
                self.count("edit refused by the file system");
                self.note(format!("#{n} {name}: action {pick} failed: {e}"));
            }
        }
    }

    /// Replaces the content of `f` on member `who` through one descriptor: reads what it
    /// holds (what this replaces), decides the excuse, writes `make(old)`.
    fn replace(
        &mut self,
        who: usize,
        n: usize,
        f: &str,
        kind: &'static str,
        make: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> std::io::Result<(&'static str, String)> {
        let path = self.roots[who].join(f);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let mut old = Vec::new();
        file.read_to_end(&mut old)?;
        let new = make(&old);
        self.superseding(who, n, &old);
        if kind == "append" {
            file.write_all(&new[old.len()..])?;
        } else {
            self.ledger.passing.insert(blake3::hash(b""));
            file.set_len(0)?;
            file.seek(std::io::SeekFrom::Start(0))?;
            file.write_all(&new)?;
        }
        drop(file);
        self.bytes_written += (new.len() - if kind == "append" { old.len() } else { 0 }) as u64;
        self.ledger.written.push(Written {
            node: self.members[who].node.name.clone(),
            path: f.to_string(),
            hash: blake3::hash(&new),
            action: n,
        });
        Ok((
            kind,
            format!("{kind} {f} ({} → {} B)", old.len(), new.len()),
        ))
    }

    fn delete(&mut self, who: usize, n: usize, f: &str) -> std::io::Result<(&'static str, String)> {
        let path = self.roots[who].join(f);
        let mut file = std::fs::File::open(&path)?;
        let mut old = Vec::new();
        file.read_to_end(&mut old)?;
        let ino = file.metadata()?.ino();
        self.superseding(who, n, &old);
        // What is unlinked must be what was read: sync may have renamed a new version
        // over the path meanwhile, and deleting that would replace a content unread.
        if std::fs::symlink_metadata(&path)?.ino() != ino {
            return Err(std::io::Error::other(
                "replaced by sync while being deleted",
            ));
        }
        std::fs::remove_file(&path)?;
        Ok(("delete", format!("delete {f} ({} B)", old.len())))
    }

    /// The schedule is about to replace `old` on member `who`: if no other member and no
    /// versions folder holds it, it never synced, and its loss is the user's doing.
    fn superseding(&mut self, who: usize, n: usize, old: &[u8]) {
        let h = blake3::hash(old);
        if !held_elsewhere(&mut self.hashes, &self.roots, who, &h, old.len() as u64) {
            self.ledger.excused.entry(h).or_insert(n);
        }
    }

    /// One change of membership, on a member that can take it.
    fn churn(&mut self) {
        let out = self.members.iter().filter(|m| !m.up()).count();
        let host_up = self.members[0].up();
        let mut options: Vec<(usize, &'static str)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.up() {
                continue;
            }
            if m.restarts {
                options.push((i, "sigterm"));
                options.push((i, "kill"));
            }
            // At most two away at once, so the group never shrinks to the host alone.
            if m.leaves && out < 2 {
                options.push((i, "stop"));
                if host_up {
                    options.push((i, "remove"));
                }
            }
        }
        let Some(&(i, kind)) = options.choose(&mut self.rng) else {
            return;
        };
        if !self.alive(i) {
            return;
        }
        let name = self.members[i].node.name.clone();
        let away = Duration::from_secs(self.rng.gen_range(10..=40));
        match kind {
            "sigterm" => {
                let status = self.members[i].node.term();
                self.say(format!("{name}: SIGTERM ({status}), start"));
                if !status.success() {
                    self.members[i]
                        .crashes
                        .push(format!("{name} exited with {status} on SIGTERM"));
                }
                self.members[i].node.start();
                self.count("restart after SIGTERM");
            }
            "kill" => {
                self.members[i].node.kill9();
                self.say(format!("{name}: kill -9, start"));
                self.members[i].node.start();
                self.count("restart after kill -9");
            }
            "stop" => {
                let status = self.members[i].node.term();
                self.say(format!("{name}: SIGTERM ({status}), away {away:?}"));
                if !status.success() {
                    self.members[i]
                        .crashes
                        .push(format!("{name} exited with {status} on SIGTERM"));
                }
                self.members[i].phase = Phase::Down {
                    until: Instant::now() + away,
                };
                self.count("stop for a while");
            }
            _ => {
                let o = self.members[0].node.cli(&["remove", &name]);
                if !o.status.success() {
                    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    self.say(format!("host: remove {name} failed: {e}"));
                    self.count("remove refused");
                    return;
                }
                // A removed node's keys stay revoked: to come back it needs new ones, as
                // a person would reinstall. Its share and sync index stay.
                let status = self.members[i].node.term();
                let state = self.members[i].node.dir.join("state");
                for f in ["wireguard.key", "signing.key", "group.json", "invites.json"] {
                    let _ = std::fs::remove_file(state.join(f));
                }
                self.members[i].node.start();
                self.say(format!(
                    "host: remove {name}; {name} SIGTERM ({status}), new identity, alone for {away:?}"
                ));
                self.members[i].phase = Phase::Out {
                    until: Instant::now() + away,
                };
                self.count("removed, then joined again");
            }
        }
    }

    /// Brings back the members whose time away is over (all of them with `now_all`).
    fn comebacks(&mut self, now_all: bool) {
        for i in 0..self.members.len() {
            let due = |until: Instant| now_all || Instant::now() >= until;
            let (start, join) = match self.members[i].phase {
                Phase::Down { until } => (due(until), false),
                Phase::Out { until } => (false, due(until)),
                Phase::Up => (false, false),
            };
            let name = self.members[i].node.name.clone();
            if start {
                self.members[i].node.start();
                self.members[i].phase = Phase::Up;
                self.say(format!("{name}: start"));
            }
            if join && self.members[0].up() && self.alive(i) {
                let link = self.members[0].node.cli(&["link"]);
                let link = String::from_utf8_lossy(&link.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let o = self.members[i].node.cli(&["join", &link]);
                if o.status.success() {
                    self.members[i].phase = Phase::Up;
                    self.say(format!("{name}: joined again"));
                } else {
                    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    self.say(format!("{name}: join failed, again in 5 s: {e}"));
                    self.count("join failed (retried)");
                    self.members[i].phase = Phase::Out {
                        until: Instant::now() + Duration::from_secs(5),
                    };
                }
            }
        }
    }

    fn trees(&mut self) -> Vec<BTreeMap<String, String>> {
        let roots = self.roots.clone();
        roots.iter().map(|r| tree(&mut self.hashes, r)).collect()
    }

    fn write_file(&self, name: &str, text: &str) {
        let p = self.out_dir.join(format!("{}-{name}", self.seed));
        if let Err(e) = std::fs::write(&p, text) {
            eprintln!("cannot write {}: {e}", p.display());
        }
    }
}

fn log_tail(n: &Node, lines: usize) -> String {
    let log = n.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A test video long enough for the run: a moving pattern and a tone, small and cheap
/// to encode (160x120 at 10 frames a second).
fn make_long_video(path: &Path, secs: u64) {
    make_video_sized(
        path,
        u32::try_from(secs).unwrap_or(u32::MAX),
        64,
        "160x120",
        10,
    );
}

/// Appends `text` to node `n`'s config.
fn configure(n: &Node, text: &str) {
    let config = std::fs::read_to_string(&n.config).expect("config");
    // The product's default log level: debug on five daemons for half an hour costs
    // CPU the daemons measured here would not otherwise spend, and fills the disk.
    let config = config.replace("level = \"debug\"", "level = \"info\"");
    assert!(
        config.contains("level = \"info\""),
        "no log level in {config}"
    );
    std::fs::write(&n.config, config + text).expect("config");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("soak benchmark: run it with `scripts/soak.sh [MINUTES]`");
        return;
    }
    if !root_or_skip("bench soak") || !has("mpv") || !has("ffmpeg") {
        return;
    }
    let minutes: f64 = args[1..].iter().find_map(|a| a.parse().ok()).unwrap_or(2.0);
    let json = args.iter().any(|a| a == "--json");
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let converge_deadline = Duration::from_secs(
        std::env::var("SOAK_CONVERGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    );
    eprintln!("soak: {minutes} minute(s), seed {seed} (SOAK_SEED={seed} replays its choices)");
    let out_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak"));
    std::fs::create_dir_all(&out_dir).expect("target/soak");

    // Declared before the members, so they are dropped after them.
    let mut lab = Lab::internet();
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut r2 = lab.router("r2", [192, 168, 2]);
    let nodes = vec![
        (lab.node("host"), "internet", true, false),
        (lab.node("d1"), "internet", false, false),
        (
            lab.node_behind(&mut r2, "d2"),
            "alone behind r2",
            true,
            true,
        ),
        (lab.node_behind(&mut r1, "s1a"), "behind r1", true, true),
        (lab.node_behind(&mut r1, "s1b"), "behind r1", true, true),
    ];
    let movies = nodes[0].0.share("movies");
    let video_secs = (minutes * 60.0) as u64 + 120;
    make_long_video(&movies.join("film.mp4"), video_secs);
    let mut members: Vec<Member> = nodes
        .into_iter()
        .map(|(node, place, restarts, leaves)| {
            let root = node.share_rw("docs");
            // Random deletions remove a good part of a small share within a minute, which
            // the mass-deletion hold would stop until someone releases it: the soak is
            // about losing nothing and converging, so the hold is off (everything deleted
            // is still kept as a version).
            configure(&node, "\n[sync]\nmax_delete_percent = 100\n");
            Member {
                node,
                root,
                place,
                phase: Phase::Up,
                restarts,
                leaves,
                max_rss_kib: 0,
                max_fds: 0,
                crashes: Vec::new(),
            }
        })
        .collect();
    for m in members.iter_mut() {
        m.node.start();
    }
    for i in 1..members.len() {
        join(&members[0].node, &members[i].node);
    }
    {
        let all: Vec<&Node> = members.iter().map(|m| &m.node).collect();
        wait_for_direct_mesh(&all, Duration::from_secs(120));
        assert!(
            wait_until(Duration::from_secs(60), || all[1]
                .cli(&["ls", "movies"])
                .status
                .success()),
            "d1 never saw the host's movies"
        );
    }
    let roots: Vec<PathBuf> = members.iter().map(|m| m.root.clone()).collect();
    let mut soak = Soak {
        members,
        roots,
        hashes: Hashes::default(),
        ledger: Ledger::default(),
        rng: StdRng::seed_from_u64(seed),
        seed,
        start: Instant::now(),
        actions: Vec::new(),
        counts: BTreeMap::new(),
        bytes_written: 0,
        player: None,
        plays: Vec::new(),
        player_restarts: 0,
        out_dir,
    };

    // The big file, written beside s1a's folder and moved in, so it is announced whole.
    let s1a = &soak.members[3].node;
    let outside = s1a.dir.join("big.tmp");
    let big = write_random(&outside, BIG_SIZE, &format!("soak {seed}"));
    std::fs::rename(&outside, soak.roots[3].join(BIG)).expect("move the big file in");
    soak.ledger.written.push(Written {
        node: "s1a".into(),
        path: BIG.into(),
        hash: big,
        action: 0,
    });
    soak.bytes_written += BIG_SIZE;
    soak.player = Some(Player::start(&soak.members[1].node, "movies/film.mp4"));
    soak.start = Instant::now();
    soak.say(format!(
        "s1a moved in a 1 GiB file; d1 plays movies/film.mp4 ({video_secs} s); schedule starts"
    ));

    let end = soak.start + Duration::from_secs_f64(minutes * 60.0);
    let mut next_edit = Instant::now();
    let mut next_churn = Instant::now() + Duration::from_secs(soak.rng.gen_range(5..15));
    let mut next_sample = Instant::now();
    let mut n = 1;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            soak.sample();
            next_sample = now + SAMPLE;
        }
        soak.comebacks(false);
        if now >= next_churn {
            soak.churn();
            next_churn = Instant::now() + Duration::from_secs(soak.rng.gen_range(8..=25));
        }
        if now >= next_edit {
            soak.edit(n);
            n += 1;
            // Now and then the next action follows at once (a run of them, geometrically
            // long), so members act together on files they all hold.
            let gap = if soak.rng.gen_ratio(1, 6) {
                0
            } else {
                soak.rng.gen_range(100..1200)
            };
            next_edit = Instant::now() + Duration::from_millis(gap);
        }
        let next = next_edit.min(next_churn).min(next_sample).min(end);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }

    // Everyone back, then one tree.
    soak.say("schedule over: every member comes back".into());
    let back = Instant::now();
    while soak.members.iter().any(|m| !m.up()) {
        assert!(
            back.elapsed() < Duration::from_secs(300),
            "members could not come back within 5 minutes"
        );
        soak.comebacks(true);
        if soak.members.iter().any(|m| !m.up()) {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let last_action = Instant::now();
    let mut last_sample = Instant::now();
    let converged = wait_until(converge_deadline, || {
        if last_sample.elapsed() >= SAMPLE {
            soak.sample();
            last_sample = Instant::now();
        }
        let t = soak.trees();
        t[1..].iter().all(|x| *x == t[0])
    });
    let converge = last_action.elapsed();
    // One tree for a moment is not yet one tree: it must stay so for longer than a full
    // round of announcements (every 10 s), in which any member holding something else
    // would have said so.
    let diverged = converged
        && wait_until(Duration::from_secs(12), || {
            let t = soak.trees();
            t[1..].iter().any(|x| *x != t[0])
        });
    soak.sample();
    soak.say(format!(
        "{} after the last member came back",
        if converged {
            "one tree"
        } else {
            "NO single tree"
        }
    ));
    let pass = report(&mut soak, converged, diverged, converge, json, minutes, big);
    // Daemons and player first, then the routers and the lab's namespaces and folders.
    drop(soak);
    drop((r1, r2));
    drop(lab);
    if !pass {
        std::process::exit(1);
    }
}

/// The check's own test (`SOAK_INJECT_LOSS=1`): removes every kept copy of one content
/// that only versions folders still hold, as a daemon that failed to keep it would have;
/// the run must then fail, naming that content as lost.
fn inject_loss(soak: &mut Soak) {
    let roots = soak.roots.clone();
    let mut live = HashSet::new();
    let mut kept: HashMap<blake3::Hash, Vec<PathBuf>> = HashMap::new();
    for root in &roots {
        for (_, p, m) in walk(root, true) {
            if let Some(h) = m.is_file().then(|| soak.hashes.of(&p, &m)).flatten() {
                live.insert(h);
            }
        }
        for (_, p, m) in walk(&versions_dir(root), false) {
            if let Some(h) = m.is_file().then(|| soak.hashes.of(&p, &m)).flatten() {
                kept.entry(h).or_default().push(p);
            }
        }
    }
    let victim = soak
        .ledger
        .written
        .iter()
        .find(|w| !live.contains(&w.hash) && kept.contains_key(&w.hash));
    match victim {
        Some(w) => {
            for p in &kept[&w.hash] {
                let _ = std::fs::remove_file(p);
            }
            eprintln!(
                "SOAK_INJECT_LOSS: removed every kept copy of {}:{} ({}); the ledger must call it lost",
                w.node,
                w.path,
                w.hash.to_hex()
            );
        }
        None => eprintln!("SOAK_INJECT_LOSS: no content is held only by versions folders"),
    }
}

/// Checks what the run must prove and prints the summary; true when it passed.
fn report(
    soak: &mut Soak,
    converged: bool,
    diverged: bool,
    converge: Duration,
    json: bool,
    minutes: f64,
    big: blake3::Hash,
) -> bool {
    let mut failures: Vec<String> = Vec::new();
    let trees = soak.trees();
    if diverged {
        failures.push(format!(
            "the trees were one {converge:?} after the last member came back, and then \
             differed again"
        ));
    }
    if !converged || diverged {
        let mut diff = String::new();
        let all: HashSet<&String> = trees.iter().flat_map(|t| t.keys()).collect();
        let mut all: Vec<&String> = all.into_iter().collect();
        all.sort();
        for p in all {
            let v: Vec<&str> = trees
                .iter()
                .map(|t| t.get(p).map(|h| &h[..h.len().min(8)]).unwrap_or("-"))
                .collect();
            if v.iter().any(|x| *x != v[0]) {
                diff += &format!("  {p}: {}\n", v.join(" "));
            }
        }
        failures.push(format!(
            "the trees differ after {converge:?} (host d1 d2 s1a s1b):\n{diff}"
        ));
    }
    if trees[0].get(BIG) != Some(&big.to_hex().to_string()) {
        failures.push(format!("{BIG} is not whole in the host's final tree"));
    }

    if std::env::var_os("SOAK_INJECT_LOSS").is_some() {
        inject_loss(soak);
    }
    // The ledger: the final tree (all alike, or else failed above) and every versions
    // folder, by content.
    let mut live: HashMap<blake3::Hash, Vec<String>> = HashMap::new();
    // Every kept content, with where it is kept (node index and path), so a failure names it.
    let mut kept: HashMap<blake3::Hash, Vec<String>> = HashMap::new();
    let roots = soak.roots.clone();
    for (i, root) in roots.iter().enumerate() {
        for (rel, p, m) in walk(root, true) {
            if m.is_file() {
                if let Some(h) = soak.hashes.of(&p, &m) {
                    live.entry(h).or_default().push(format!("{}:{rel}", i));
                }
            }
        }
        for (rel, p, m) in walk(&versions_dir(root), false) {
            if m.is_file() {
                if let Some(h) = soak.hashes.of(&p, &m) {
                    kept.entry(h).or_default().push(format!("{i}:{rel}"));
                }
            }
        }
    }
    let (mut at_path, mut moved, mut in_versions, mut excused, mut lost) = (0, 0, 0, 0, Vec::new());
    let ever: HashSet<blake3::Hash> = soak.ledger.written.iter().map(|w| w.hash).collect();
    for w in &soak.ledger.written {
        if let Some(places) = live.get(&w.hash) {
            if places.iter().any(|p| p.ends_with(&format!(":{}", w.path))) {
                at_path += 1;
            } else {
                moved += 1;
            }
        } else if kept.contains_key(&w.hash) {
            in_versions += 1;
        } else if soak.ledger.excused.contains_key(&w.hash) {
            excused += 1;
        } else {
            lost.push(format!(
                "{}:{} written by action #{} ({})",
                w.node,
                w.path,
                w.action,
                w.hash.to_hex()
            ));
        }
    }
    if !lost.is_empty() {
        failures.push(format!(
            "{} content(s) lost (in no tree, no versions folder, and synced before the \
             schedule replaced them):\n  {}",
            lost.len(),
            lost.join("\n  ")
        ));
    }
    let unknown: Vec<String> = live
        .iter()
        .filter(|(h, _)| !ever.contains(h))
        .map(|(_, places)| places.join(", "))
        .collect();
    if !unknown.is_empty() {
        failures.push(format!(
            "{} file(s) hold a content the schedule never wrote (mixed or corrupted): {}",
            unknown.len(),
            unknown.join("; ")
        ));
    }
    let unknown_kept: Vec<String> = kept
        .iter()
        .filter(|(h, _)| !ever.contains(h) && !soak.ledger.passing.contains(h))
        .map(|(h, at)| format!("{} at {}", &h.to_hex()[..16], at.join(", ")))
        .collect();
    if !unknown_kept.is_empty() {
        failures.push(format!(
            "{} kept version(s) hold a content the schedule never wrote: {}",
            unknown_kept.len(),
            unknown_kept.join("; ")
        ));
    }

    let mut nodes_json = Vec::new();
    let mut table = String::from(
        "| node | where | daemon runs | max RSS MiB | max open fds | exits not caused by the schedule |\n|---|---|---|---|---|---|\n",
    );
    for m in &soak.members {
        if m.max_rss_kib >= MAX_RSS_KIB {
            failures.push(format!(
                "{}'s RSS reached {:.1} MiB (bound {} MiB)",
                m.node.name,
                m.max_rss_kib as f64 / 1024.0,
                MAX_RSS_KIB / 1024
            ));
        }
        if m.max_fds >= MAX_FDS {
            failures.push(format!(
                "{} had {} open descriptors (bound {MAX_FDS})",
                m.node.name, m.max_fds
            ));
        }
        for c in &m.crashes {
            failures.push(c.clone());
        }
        let runs = std::fs::read_dir(&m.node.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
            .count();
        table += &format!(
            "| {} | {} | {} | {:.1} | {} | {} |\n",
            m.node.name,
            m.place,
            runs,
            m.max_rss_kib as f64 / 1024.0,
            m.max_fds,
            m.crashes.len()
        );
        nodes_json.push(serde_json::json!({
            "name": m.node.name,
            "where": m.place,
            "daemon_runs": runs,
            "max_rss_mib": m.max_rss_kib as f64 / 1024.0,
            "max_fds": m.max_fds,
            "unexpected_exits": m.crashes.len(),
        }));
    }

    // The video: how far it played against the wall clock, and its longest stall.
    // Only while the schedule ran: the video is two minutes longer than the schedule,
    // and once it ends the position stands still through the wait for one tree.
    let schedule = minutes * 60.0;
    let plays: Vec<(f64, f64)> = soak
        .plays
        .iter()
        .copied()
        .filter(|(t, _)| *t <= schedule)
        .collect();
    let (mut stall, mut played) = (0.0f64, 0.0f64);
    let mut still_since: Option<(f64, f64)> = None;
    for w in plays.windows(2) {
        let ((t0, p0), (t1, p1)) = (w[0], w[1]);
        if p1 > p0 + 0.2 {
            played += p1 - p0;
            still_since = None;
        } else {
            let since = still_since.get_or_insert((t0, p0)).0;
            stall = stall.max(t1 - since);
        }
    }
    let wall = plays.last().map(|l| l.0).unwrap_or(0.0) - plays.first().map(|f| f.0).unwrap_or(0.0);
    let video = format!(
        "while the schedule ran, d1's player advanced {played:.0} s over {wall:.0} s; \
         longest stall {stall:.0} s; player restarted {} time(s)",
        soak.player_restarts
    );

    let contents = soak.ledger.written.len();
    let ledger = format!(
        "{contents} contents written: {at_path} in the final tree at their path, {moved} \
         elsewhere in it (renamed or conflict copies), {in_versions} only in versions \
         folders, {excused} replaced by the schedule before they synced, {} lost; \
         {} places in versions folders hold an empty file a write passed through",
        lost.len(),
        kept.iter()
            .filter(|(h, _)| soak.ledger.passing.contains(h) && !ever.contains(h))
            .map(|(_, at)| at.len())
            .sum::<usize>()
    );
    let kinds: Vec<String> = soak
        .counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let conflicts = trees[0]
        .keys()
        .filter(|k| k.contains(".sync-conflict-"))
        .count();
    let summary = format!(
        "## Soak: {minutes} minute(s), seed {}\n\n\
         Actions: {}\nBytes written by the schedule: {} (1 GiB of it the big file)\n\
         Final tree: {} entries ({conflicts} conflict copies); converged {:.1} s after the \
         last member came back\nLedger: {ledger}\nVideo: {video}\n\n{table}\nResult: {}\n",
        soak.seed,
        kinds.join(", "),
        soak.bytes_written,
        trees[0].len(),
        converge.as_secs_f64(),
        if failures.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL\n- {}", failures.join("\n- "))
        }
    );
    let summary_json = serde_json::json!({
        "minutes": minutes,
        "seed": soak.seed,
        "actions": soak.counts,
        "bytes_written": soak.bytes_written,
        "final_entries": trees[0].len(),
        "conflict_copies": conflicts,
        "converged": converged && !diverged,
        "converge_secs": converge.as_secs_f64(),
        "ledger": {
            "written": contents, "at_path": at_path, "moved": moved,
            "only_in_versions": in_versions, "excused": excused, "lost": lost,
        },
        "video": { "played_secs": played, "wall_secs": wall, "longest_stall_secs": stall },
        "bounds": { "rss_mib": MAX_RSS_KIB / 1024, "fds": MAX_FDS },
        "nodes": nodes_json,
        "failures": failures,
        "pass": failures.is_empty(),
    });
    soak.write_file("actions.log", &soak.actions.join("\n"));
    soak.write_file("summary.md", &summary);
    if json {
        println!("{summary_json}");
    } else {
        println!("{summary}");
    }
    if !failures.is_empty() {
        for m in &soak.members {
            soak.write_file(&format!("{}.log", m.node.name), &m.node.log());
            eprintln!(
                "--- {}'s daemon log, last 60 lines (whole: target/soak/{}-{}.log) ---\n{}",
                m.node.name,
                soak.seed,
                m.node.name,
                log_tail(&m.node, 60)
            );
        }
        eprintln!(
            "soak FAILED; every action in target/soak/{}-actions.log",
            soak.seed
        );
    }
    failures.is_empty()
}
