//! Playing a shared file while it arrives. A [`Stream`] is one file being watched: its
//! manifest, a sparse cache file in the state directory, which chunks are there, and the
//! playhead (the chunk the player reads at). Workers fetch chunks in playhead order — the
//! chunk under the playhead first, then on ahead, then the rest from the start — through
//! [`crate::data::transfer::fetch_chunk`], so the planner's routes, nearby gateways and chunk
//! verification apply as for `get`. The loopback HTTP endpoint serves each stream with
//! Range support, waiting for a chunk when the player gets ahead of the network. Loopback
//! is open to every user and every web page of the machine: each stream has its own
//! unguessable token in its URL, which dies when the stream closes, and a request must
//! name the endpoint by a loopback `Host` (a DNS-rebinding page names its own). It owns
//! the cache files and the endpoint; it must not decide routes nor touch shares (a file
//! held locally is read in place). (Past 800 lines only by its unit tests.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::lock::Recover;
use crate::data::blocking::blocking;
use crate::data::share::Manifest;
use crate::data::transfer::{feeder_round_trip, Engine, Membership, Progress, Window};
use crate::group::identity::Key;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot open the stream cache {path}: {source}")]
    OpenCache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The chunk to fetch next: the first one neither here nor being fetched, looking from
/// the playhead to the end, then from the start.
pub fn next_wanted(have: &[bool], busy: &[bool], playhead: usize) -> Option<usize> {
    let n = have.len();
    (0..n)
        .map(|i| (playhead.min(n) + i) % n.max(1))
        .find(|&i| !have[i] && !busy[i])
}

/// A stream cache nobody has read from for this long (seconds) may be evicted.
pub const IDLE: u64 = 600;

/// One stream cache file, as eviction sees it.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    /// The content id it caches (its file name).
    pub id: String,
    /// Bytes it takes on disk.
    pub bytes: u64,
    /// When it was last read or written (unix seconds).
    pub last_used: u64,
    /// Being played, or just opened: never evicted.
    pub busy: bool,
}

/// Which caches to evict so that `need` more bytes fit in `budget` beside the rest:
/// idle ones, least recently used first, and no more than that.
pub fn evictions(entries: &[CacheEntry], budget: u64, need: u64) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum::<u64>() + need;
    let mut idle: Vec<&CacheEntry> = entries.iter().filter(|e| !e.busy).collect();
    idle.sort_by_key(|e| e.last_used);
    let mut out = Vec::new();
    for e in idle {
        if total <= budget {
            break;
        }
        total = total.saturating_sub(e.bytes);
        out.push(e.id.clone());
    }
    out
}

/// One watched file.
pub struct Stream {
    /// `share/path`.
    pub file: String,
    pub manifest: Manifest,
    /// The member the chunks come from.
    pub source: Key,
    path: PathBuf,
    /// Shared with the blocking threads that read and write it.
    data: Arc<std::fs::File>,
    /// Which chunks are present, and which are being fetched.
    chunks: Mutex<(Vec<bool>, Vec<bool>)>,
    arrived: tokio::sync::Notify,
    playhead: AtomicU64,
    pub progress: Arc<Progress>,
    /// When a player last read from it (unix seconds), or it was opened.
    last_used: AtomicU64,
    /// Stops the workers filling it and the replies reading it (when it closes).
    stop: CancellationToken,
    /// The secret first segment of its URL. Random, not derived from anything; kept as
    /// a `blake3::Hash` because that compares in constant time.
    token: blake3::Hash,
    /// A local player reports on it: it then closes when its player leaves, not when idle.
    played: AtomicBool,
    /// The order it was added in among the daemon's streams: of a file's versions open
    /// at once, the latest added is the one a player asks about.
    added: u64,
}

impl Stream {
    /// A stream of a file this node holds in a share: everything is there.
    pub fn local(
        file: &str,
        manifest: Manifest,
        me: Key,
        path: PathBuf,
    ) -> Result<Stream, StreamError> {
        let data = std::fs::File::open(&path).map_err(|source| StreamError::OpenCache {
            path: path.clone(),
            source,
        })?;
        let n = manifest.chunks.len();
        Ok(Stream::new(file, manifest, me, path, data, vec![true; n]))
    }

    /// A stream of a file held elsewhere, cached in `cache_dir` under its content id (a
    /// cache left by an earlier watch of the same content is reused, chunk by chunk,
    /// after checking each against the manifest).
    pub fn remote(
        file: &str,
        manifest: Manifest,
        source: Key,
        cache_dir: &std::path::Path,
    ) -> Result<Stream, StreamError> {
        let path = cache_dir.join(manifest.id());
        let open = |source| StreamError::OpenCache {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(cache_dir).map_err(open)?;
        use std::os::unix::fs::OpenOptionsExt;
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(open)?;
        let fresh = data.metadata().map_err(open)?.len() == 0;
        data.set_len(manifest.size).map_err(open)?;
        let have = (0..manifest.chunks.len() as u64)
            .map(|i| !fresh && manifest.held_chunk(&data, i).is_some())
            .collect();
        Ok(Stream::new(file, manifest, source, path, data, have))
    }

    fn new(
        file: &str,
        manifest: Manifest,
        source: Key,
        path: PathBuf,
        data: std::fs::File,
        have: Vec<bool>,
    ) -> Stream {
        let progress = Arc::new(Progress::default());
        progress.size.store(manifest.size, Ordering::Relaxed);
        let done: u64 = have
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(i, _)| manifest.chunk_len(i as u64))
            .sum();
        progress.done.store(done, Ordering::Relaxed);
        let busy = vec![false; have.len()];
        Stream {
            file: file.to_string(),
            manifest,
            source,
            path,
            data: Arc::new(data),
            chunks: Mutex::new((have, busy)),
            arrived: tokio::sync::Notify::new(),
            playhead: AtomicU64::new(0),
            progress,
            last_used: AtomicU64::new(crate::base::clock::now_secs()),
            stop: CancellationToken::new(),
            token: {
                let mut t = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut t);
                blake3::Hash::from_bytes(t)
            },
            played: AtomicBool::new(false),
            added: 0,
        }
    }

    /// Whether a local player reports on this stream: while one does, the stream lives
    /// until it leaves; without one, until nobody has read it for [`IDLE`].
    pub fn set_played(&self, played: bool) {
        self.played.store(played, Ordering::Relaxed);
    }

    pub fn complete(&self) -> bool {
        self.lock().0.iter().all(|h| *h)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<bool>, Vec<bool>)> {
        self.chunks.locked()
    }

    /// Bytes present from the playhead on, without a gap.
    pub fn ahead_bytes(&self) -> u64 {
        let at = self.playhead.load(Ordering::Relaxed) as usize;
        let (have, _) = &*self.lock();
        have.iter()
            .enumerate()
            .skip(at)
            .take_while(|(_, h)| **h)
            .map(|(i, _)| self.manifest.chunk_len(i as u64))
            .sum()
    }

    /// Up to `len` bytes at `offset` (less at a chunk's end), waiting for their chunk.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, StreamError> {
        let index = self.manifest.chunk_at(offset);
        self.playhead.store(index, Ordering::Relaxed);
        self.last_used
            .store(crate::base::clock::now_secs(), Ordering::Relaxed);
        loop {
            let arrived = self.arrived.notified();
            if self.lock().0.get(index as usize).copied().unwrap_or(true) {
                break;
            }
            arrived.await;
        }
        let end = (self.manifest.chunk_offset(index) + self.manifest.chunk_len(index))
            .min(self.manifest.size)
            .min(offset + len);
        let (data, n) = (self.data.clone(), end.saturating_sub(offset) as usize);
        let buf = blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; n];
            data.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|source| StreamError::Read {
            path: self.path.clone(),
            source,
        })?;
        Ok(Bytes::from(buf))
    }

    /// Fetches what is missing, in playhead order, until all is there or `cancel`: as
    /// many chunks in flight as the path's window says (see [`Window`]), each picked
    /// when it starts, so the chunk under the playhead always goes first.
    pub async fn fill(
        self: Arc<Self>,
        engine: Arc<Engine>,
        members: Arc<dyn Membership>,
        cancel: CancellationToken,
    ) {
        let exclude = Arc::new(Mutex::new(Vec::new()));
        let id = self.manifest.id();
        let mut window = Window::new(self.manifest.chunk_size);
        let mut round_trip = None;
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            while inflight.len() < window.target(round_trip) {
                let picked = {
                    let (have, busy) = &mut *self.lock();
                    let at = self.playhead.load(Ordering::Relaxed) as usize;
                    let i = next_wanted(have, busy, at);
                    if let Some(i) = i {
                        busy[i] = true;
                    }
                    i
                };
                let Some(i) = picked else { break };
                inflight.spawn(self.clone().fill_one(
                    i,
                    engine.clone(),
                    members.clone(),
                    exclude.clone(),
                    cancel.clone(),
                ));
            }
            // Nothing in flight and nothing wanted: all is here.
            let Some(r) = inflight.join_next().await else {
                break;
            };
            if cancel.is_cancelled() {
                break;
            }
            if let Ok(Some(n)) = r {
                window.arrived(std::time::Instant::now(), n);
                round_trip = feeder_round_trip(&engine, &*members, &self.source, &id, &exclude);
            }
        }
        inflight.abort_all();
        while inflight.join_next().await.is_some() {}
        if self.complete() {
            log::info!("watch {}: all {} bytes here", self.file, self.manifest.size);
        }
    }

    /// Chunk `i` (marked busy by the caller) fetched and written into the cache: its
    /// length, or `None` when it failed (after a pause: a stream being watched never
    /// gives up, its chunk is picked again) or `cancel` came.
    async fn fill_one(
        self: Arc<Self>,
        i: usize,
        engine: Arc<Engine>,
        members: Arc<dyn Membership>,
        exclude: Arc<Mutex<Vec<Key>>>,
        cancel: CancellationToken,
    ) -> Option<u64> {
        let got = tokio::select! {
            r = crate::data::transfer::fetch_chunk(
                &engine, &*members, &self.source, &self.manifest, i as u64, &exclude,
                &self.progress,
            ) => r,
            () = cancel.cancelled() => {
                self.lock().1[i] = false;
                return None;
            }
        };
        let written = match got {
            Ok(b) => {
                let (data, at) = (self.data.clone(), self.manifest.chunk_offset(i as u64));
                blocking(move || {
                    use std::os::unix::fs::FileExt;
                    data.write_all_at(&b, at).map(|()| b.len())
                })
                .await
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        {
            let (have, busy) = &mut *self.lock();
            busy[i] = false;
            have[i] = written.is_ok();
        }
        match written {
            Ok(n) => {
                self.progress.done.fetch_add(n as u64, Ordering::Relaxed);
                self.arrived.notify_waiters();
                Some(n as u64)
            }
            Err(e) => {
                log::warn!("watch {}: chunk {i}: {e}", self.file);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = cancel.cancelled() => {}
                }
                None
            }
        }
    }
}

/// The streams open on this node, by `share/path`, and the tasks filling them.
pub struct Streams {
    pub cache_dir: PathBuf,
    /// Bytes the caches of streams nobody plays may keep on disk.
    budget: u64,
    /// By file and content id: a reader of one version (a mounted file held open) keeps
    /// its stream when the file changes and another reader opens the new version.
    open: Mutex<HashMap<(String, String), Arc<Stream>>>,
    /// Streams added so far, for [`Stream::added`].
    added: AtomicU64,
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
    /// Where the loopback endpoint listens, once bound.
    pub endpoint: Mutex<Option<SocketAddr>>,
}

impl Streams {
    pub fn new(cache_dir: PathBuf, budget: u64, cancel: CancellationToken) -> Streams {
        Streams {
            cache_dir,
            budget,
            open: Mutex::new(HashMap::new()),
            added: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            cancel,
            endpoint: Mutex::new(None),
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Stream>>> {
        self.open.locked()
    }

    /// The stream of `file` opened last (its latest version, unless an older one was
    /// asked for later).
    pub fn get(&self, file: &str) -> Option<Arc<Stream>> {
        self.lock_open()
            .values()
            .filter(|s| s.file == file)
            .max_by_key(|s| s.added)
            .cloned()
    }

    /// The open stream whose URL token is `token` (hex), compared in constant time with
    /// every open stream's, so that timing tells nothing of the tokens.
    fn by_token(&self, token: &str) -> Option<Arc<Stream>> {
        let token = blake3::Hash::from_hex(token).ok()?;
        let mut found = None;
        for s in self.lock_open().values() {
            if s.token == token {
                found = Some(s.clone());
            }
        }
        found
    }

    /// Closes the streams of `file` (each version open): their URLs stop working, the
    /// replies reading them and the workers filling them stop. Their caches stay on disk
    /// for the next watch of the same content (and for eviction). True if one was open.
    pub fn close(&self, file: &str) -> bool {
        let closed: Vec<Arc<Stream>> = {
            let mut open = self.lock_open();
            let keys: Vec<(String, String)> =
                open.keys().filter(|k| k.0 == file).cloned().collect();
            keys.iter().filter_map(|k| open.remove(k)).collect()
        };
        for s in &closed {
            s.stop.cancel();
        }
        if !closed.is_empty() {
            log::info!("watch {file}: stream closed");
        }
        !closed.is_empty()
    }

    /// Closes one version's stream only.
    fn close_one(&self, key: &(String, String)) {
        if let Some(s) = self.lock_open().remove(key) {
            s.stop.cancel();
            log::info!("watch {}: stream of an earlier version closed", key.0);
        }
    }

    /// Closes the streams no player reports on (opened with `--player none`, or whose
    /// player went quiet without leaving) that nobody has read for [`IDLE`]: their URL was
    /// handed out, but nothing will say when it is no longer needed.
    pub fn close_idle(&self, now: u64) {
        let idle: Vec<(String, String)> = self
            .lock_open()
            .iter()
            .filter(|(_, s)| {
                !s.played.load(Ordering::Relaxed)
                    && now.saturating_sub(s.last_used.load(Ordering::Relaxed)) >= IDLE
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            self.close_one(&k);
        }
    }

    /// Adds `stream` (keeping one already open for the same file and content) and starts
    /// filling it; returns the one in use. A stream of another version of the same file
    /// stays open: whoever reads it keeps reading the version it opened.
    pub fn add(
        &self,
        stream: Stream,
        engine: Arc<Engine>,
        members: Arc<dyn Membership>,
    ) -> Arc<Stream> {
        let (s, new) = self.insert(stream);
        if !new {
            return s;
        }
        self.make_room(&s);
        if !s.complete() {
            self.tasks
                .spawn(s.clone().fill(engine, members, s.stop.clone()));
        }
        s
    }

    /// Puts `stream` among the open ones, unless one of the same file and content is
    /// open already; returns the one in use and whether it is `stream`.
    fn insert(&self, stream: Stream) -> (Arc<Stream>, bool) {
        let key = (stream.file.clone(), stream.manifest.id());
        let mut open = self.lock_open();
        if let Some(s) = open.get(&key) {
            return (s.clone(), false);
        }
        let mut stream = stream;
        // Its workers stop with the daemon, or when it closes or its cache is evicted.
        stream.stop = self.cancel.child_token();
        stream.added = self.added.fetch_add(1, Ordering::Relaxed);
        let s = Arc::new(stream);
        open.insert(key, s.clone());
        (s, true)
    }

    /// Evicts the caches of streams nobody has played for [`IDLE`], least recently used
    /// first, until what `new` may still need fits in the budget beside the rest. A
    /// stream being played (or just opened) is never evicted, even past the budget.
    /// The folder is read and files removed outside the lock on the open streams, which
    /// every request of every player takes.
    fn make_room(&self, new: &Stream) {
        let now = crate::base::clock::now_secs();
        let new_id = new.manifest.id();
        // Content open under two names counts as used by the more recent reader.
        let mut used: HashMap<String, u64> = HashMap::new();
        for s in self.lock_open().values() {
            let at = used.entry(s.manifest.id()).or_insert(0);
            *at = (*at).max(s.last_used.load(Ordering::Relaxed));
        }
        let Ok(dir) = std::fs::read_dir(&self.cache_dir) else {
            return;
        };
        let entries: Vec<CacheEntry> = dir
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_string_lossy().into_owned();
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                use std::os::unix::fs::MetadataExt;
                let last_used = used.get(&id).copied().unwrap_or(meta.mtime().max(0) as u64);
                Some(CacheEntry {
                    // Sparse files: what is on disk, not their length.
                    bytes: meta.blocks() * 512,
                    busy: id == new_id || now.saturating_sub(last_used) < IDLE,
                    last_used,
                    id,
                })
            })
            .collect();
        let need = new
            .manifest
            .size
            .saturating_sub(new.progress.done.load(Ordering::Relaxed));
        let mut evicted = evictions(&entries, self.budget, need);
        {
            let mut open = self.lock_open();
            // A stream of an evicted cache read since the snapshot keeps its cache.
            let kept: Vec<String> = open
                .values()
                .filter(|s| now.saturating_sub(s.last_used.load(Ordering::Relaxed)) < IDLE)
                .map(|s| s.manifest.id())
                .collect();
            evicted.retain(|id| !kept.contains(id) && *id != new_id);
            open.retain(|_, s| {
                let keep = !evicted.contains(&s.manifest.id());
                if !keep {
                    s.stop.cancel();
                }
                keep
            });
        }
        for id in evicted {
            match std::fs::remove_file(self.cache_dir.join(&id)) {
                Ok(()) => log::info!("watch: evicted the cache of {id} (over the budget)"),
                Err(e) => log::warn!("watch: cannot evict the cache of {id}: {e}"),
            }
        }
    }

    /// The URL a player opens for `stream`, valid while the stream is open.
    pub fn url(&self, stream: &Stream) -> Option<String> {
        let token = stream.token.to_hex();
        let at = (*self.endpoint.locked())?;
        Some(format!("http://{at}/{token}/{}", url_path(&stream.file)))
    }
}

/// `share/path` as the endpoint's URLs carry it: each segment percent-encoded, so only
/// `[A-Za-z0-9*-._+%]` and slashes remain (safe in an HTML attribute too).
fn url_path(file: &str) -> String {
    file.split('/')
        .map(|seg| form_urlencoded::byte_serialize(seg.as_bytes()).collect::<String>())
        .collect::<Vec<_>>()
        .join("/")
}

/// A response body fed by a task as chunks arrive.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

type Body = Either<Full<Bytes>, ChannelBody>;

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(text.to_string()))));
    *r.status_mut() = status;
    r
}

fn content_type(file: &str) -> &'static str {
    match file
        .rsplit('.')
        .next()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("mp4" | "m4v") => "video/mp4",
        Some("mkv") => "video/x-matroska",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// True when `host` (a `Host` header or a URI's authority) names the endpoint listening
/// on `port` by a loopback name: `127.0.0.1`, `[::1]` or `localhost`, with the port (which
/// may be left out only for port 80). A page that a browser loaded from `evil.example`,
/// whose name was then pointed at 127.0.0.1 (DNS rebinding), sends `Host: evil.example`.
pub fn loopback_host(host: &str, port: u16) -> bool {
    let (name, rest) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) => (&host[..addr.len() + 2], rest),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, _)) => (name, &host[name.len()..]),
            None => (host, ""),
        },
    };
    let named = name == "127.0.0.1" || name == "[::1]" || name.eq_ignore_ascii_case("localhost");
    let port_ok = match rest.strip_prefix(':') {
        Some(p) => p.parse::<u16>().ok() == Some(port) && !p.starts_with('+'),
        None => rest.is_empty() && port == 80,
    };
    named && port_ok
}

/// Every stream's URL answers the same for a wrong token, a closed stream and a path
/// that is not the token's: a local user learns nothing by guessing.
fn no_stream() -> Response<Body> {
    plain(
        StatusCode::NOT_FOUND,
        "no open stream at this address: `watchalong watch SHARE/PATH` gives one\n",
    )
}

async fn handle(
    streams: Arc<Streams>,
    pages: Arc<dyn Pages>,
    req: Request<Incoming>,
    port: u16,
) -> Response<Body> {
    let host_ok = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| loopback_host(h, port))
        && req
            .uri()
            .authority()
            .is_none_or(|a| loopback_host(a.as_str(), port));
    if !host_ok {
        return plain(
            StatusCode::FORBIDDEN,
            "refused: this endpoint serves players on this machine, addressed as 127.0.0.1, [::1] or localhost with its port\n",
        );
    }
    let post = req.method() == hyper::Method::POST;
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD && !post {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let full = req.uri().path().trim_start_matches('/');
    let Some((token, rest)) = full.split_once('/') else {
        return no_stream();
    };
    let Some(s) = streams.by_token(token) else {
        return no_stream();
    };
    // The browser page and the endpoint its script reports to, under the same token: no
    // file's URL is either, as a file's names a share and a path.
    match (rest, post) {
        ("", false) => return pages.page(&url_path(&s.file)).map(Either::Left),
        ("player", true) => return pages.player(&s, req).await.map(Either::Left),
        (_, true) => {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET only, but for a page's report\n",
            )
        }
        _ => {}
    }
    let file: String = rest
        .split('/')
        .map(|seg| {
            form_urlencoded::parse(format!("x={seg}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("/");
    // The token opens its own stream only.
    if file != s.file {
        return no_stream();
    }
    let size = s.manifest.size;
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (start, end, status) = match range {
        None => (0, size.saturating_sub(1), StatusCode::OK),
        Some(h) => match crate::data::share::parse_range(h, size) {
            Some((a, b)) => (a, b, StatusCode::PARTIAL_CONTENT),
            None => {
                let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "");
                if let Ok(v) = format!("bytes */{size}").parse() {
                    r.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
                }
                return r;
            }
        },
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    if req.method() == hyper::Method::GET && len > 0 {
        // Stops with the daemon or when the stream closes.
        let cancel = s.stop.clone();
        streams.tasks.spawn(async move {
            let mut at = start;
            while at <= end {
                let got = tokio::select! {
                    r = s.read(at, end + 1 - at) => r,
                    () = cancel.cancelled() => return,
                };
                match got {
                    // The player went away: stop reading for it.
                    Ok(b) if !b.is_empty() => {
                        at += b.len() as u64;
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => return,
                    Err(e) => {
                        log::warn!("watch: {e}");
                        return;
                    }
                }
            }
        });
    }
    let mut r = Response::new(Either::Right(ChannelBody(rx)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    let mut set = |k: hyper::header::HeaderName, v: String| {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    };
    set(hyper::header::CONTENT_LENGTH, len.to_string());
    set(hyper::header::ACCEPT_RANGES, "bytes".into());
    set(hyper::header::CONTENT_TYPE, content_type(&file).into());
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            hyper::header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{size}"),
        );
    }
    r
}

/// The browser page's two routes under a stream's token, behind the endpoint's token
/// and `Host` checks: `crate::watch::page` answers them (it sits above this module).
pub trait Pages: Send + Sync {
    /// `GET /<token>/`: the page playing the stream whose URL path is `src`.
    fn page(&self, src: &str) -> Response<Full<Bytes>>;
    /// `POST /<token>/player`: the page's report on `stream`.
    fn player<'a>(
        &'a self,
        stream: &'a Arc<Stream>,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send + 'a>>;
}

/// Serves the streams, and their browser pages through `pages`, on `listener` (bound by
/// the caller to loopback) until `cancel`.
pub async fn serve_local(
    listener: TcpListener,
    streams: Arc<Streams>,
    pages: Arc<dyn Pages>,
    cancel: CancellationToken,
) {
    crate::net::server::serve(
        listener,
        cancel,
        crate::net::server::LOOPBACK,
        |_local, _peer| true,
        move |req, local: SocketAddr, _peer| {
            let (streams, pages) = (streams.clone(), pages.clone());
            async move { handle(streams, pages, req, local.port()).await }
        },
        || {},
        || {},
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, mib: u64, last_used: u64, busy: bool) -> CacheEntry {
        CacheEntry {
            id: id.into(),
            bytes: mib << 20,
            last_used,
            busy,
        }
    }

    #[test]
    fn the_least_recently_played_idle_caches_go_first_and_only_as_many_as_needed() {
        let entries = [
            entry("old", 3, 100, false),
            entry("older", 3, 50, false),
            entry("playing", 3, 10, true),
            entry("recent", 3, 900, false),
        ];
        // 12 MiB held, 2 more wanted, 10 allowed: two idle ones go, oldest first.
        assert_eq!(evictions(&entries, 10 << 20, 2 << 20), vec!["older", "old"]);
        assert!(evictions(&entries, 14 << 20, 2 << 20).is_empty(), "it fits");
        // Past the budget even without them, the one being played still stays.
        assert_eq!(evictions(&entries, 0, 0), vec!["older", "old", "recent"]);
    }

    #[test]
    fn a_new_stream_makes_room_by_evicting_idle_caches_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::new(dir.path().to_path_buf(), 3 << 20, CancellationToken::new());
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(IDLE * 3);
        for (i, name) in ["a", "b"].iter().enumerate() {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            std::io::Write::write_all(&mut &f, &vec![1u8; 1 << 20]).unwrap();
            f.set_modified(long_ago + Duration::from_secs(i as u64))
                .unwrap();
        }
        let manifest = Manifest {
            share: "s".into(),
            path: "new.bin".into(),
            size: 2 << 20,
            mtime: 0,
            mode: 0o644,
            chunk_size: 1 << 20,
            chunks: vec!["x".into(), "y".into()],
            lengths: Vec::new(),
            starts: Vec::new(),
        };
        let new = Stream::remote("s/new.bin", manifest, [0; 32], dir.path()).unwrap();
        streams.make_room(&new);
        // 2 MiB held and 2 MiB wanted against 3 MiB: the older one goes.
        assert!(!dir.path().join("a").exists());
        assert!(dir.path().join("b").exists());
        assert!(dir.path().join(new.manifest.id()).exists());
    }

    #[test]
    fn only_a_loopback_host_with_the_endpoints_port_is_accepted() {
        for ok in [
            "127.0.0.1:8000",
            "[::1]:8000",
            "localhost:8000",
            "LocalHost:8000",
        ] {
            assert!(loopback_host(ok, 8000), "{ok} refused");
        }
        for bad in [
            "evil.example:8000",
            "evil.example",
            "127.0.0.1:8001",
            "127.0.0.1",
            "127.0.0.1:+8000",
            "localhost.:8000",
            "localhost.evil.example:8000",
            "127.0.0.1.evil.example:8000",
            "[::1",
            "[::2]:8000",
            "[::1]x:8000",
            "127.0.0.1:8000:8000",
            "",
        ] {
            assert!(!loopback_host(bad, 8000), "{bad} accepted");
        }
        // Port 80 is the one a client may leave out.
        assert!(loopback_host("localhost", 80));
        assert!(loopback_host("[::1]", 80));
    }

    fn manifest(path: &str, chunk: &str) -> Manifest {
        Manifest {
            share: "s".into(),
            path: path.into(),
            size: 4,
            mtime: 0,
            mode: 0o644,
            chunk_size: 1 << 20,
            chunks: vec![chunk.into()],
            lengths: Vec::new(),
            starts: Vec::new(),
        }
    }

    /// Opens version `chunk` of `s/NAME` (held locally) in `streams`; returns its URL
    /// token.
    fn open_version(streams: &Streams, dir: &std::path::Path, name: &str, chunk: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, b"film").unwrap();
        let s = Stream::local(&format!("s/{name}"), manifest(name, chunk), [0; 32], path);
        let (s, _) = streams.insert(s.unwrap());
        let url = streams.url(&s).unwrap();
        url.split('/').nth(3).unwrap().to_string()
    }

    fn open(streams: &Streams, dir: &std::path::Path, name: &str) -> String {
        open_version(streams, dir, name, "x")
    }

    #[test]
    fn a_new_version_of_a_file_opened_leaves_the_stream_of_the_old_one_open() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::new(dir.path().join("c"), 0, CancellationToken::new());
        *streams.endpoint.lock().unwrap() = Some(([127, 0, 0, 1], 8000).into());
        let old = open_version(&streams, dir.path(), "a", "x");
        let old_stream = streams.by_token(&old).unwrap();
        let new = open_version(&streams, dir.path(), "a", "y");
        assert_ne!(old, new);
        assert!(
            !old_stream.stop.is_cancelled(),
            "the old version's readers were stopped"
        );
        assert_eq!(streams.by_token(&old).unwrap().manifest.chunks, ["x"]);
        assert_eq!(streams.by_token(&new).unwrap().manifest.chunks, ["y"]);
        // A player asks about the version opened last.
        assert_eq!(streams.get("s/a").unwrap().manifest.chunks, ["y"]);
        // The same version opened again is the same stream.
        assert_eq!(open_version(&streams, dir.path(), "a", "x"), old);
        // Each version idles out on its own: the old one unread, the new one played.
        streams.by_token(&new).unwrap().set_played(true);
        streams.close_idle(crate::base::clock::now_secs() + IDLE + 1);
        assert!(streams.by_token(&old).is_none());
        assert!(streams.by_token(&new).is_some());
        // Its player leaving closes every version of the file.
        let again = open_version(&streams, dir.path(), "a", "x");
        assert!(streams.close("s/a"));
        assert!(streams.by_token(&again).is_none() && streams.by_token(&new).is_none());
    }

    #[test]
    fn each_stream_has_its_own_token_which_dies_when_the_stream_closes() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::new(dir.path().join("c"), 0, CancellationToken::new());
        *streams.endpoint.lock().unwrap() = Some(([127, 0, 0, 1], 8000).into());
        let (a, b) = (
            open(&streams, dir.path(), "a"),
            open(&streams, dir.path(), "b"),
        );
        assert_ne!(a, b);
        assert_eq!(a.len(), 64, "{a}");
        assert_eq!(streams.by_token(&a).unwrap().file, "s/a");
        assert_eq!(streams.by_token(&b).unwrap().file, "s/b");
        assert!(streams.by_token("00").is_none());
        assert!(streams.by_token(&"0".repeat(64)).is_none());
        let closed = streams.get("s/a").unwrap();
        assert!(streams.close("s/a"));
        assert!(
            streams.by_token(&a).is_none(),
            "a closed stream's token still opens it"
        );
        assert!(closed.stop.is_cancelled(), "its readers would go on");
        assert!(streams.by_token(&b).is_some());
        // Opened again, the same file gets a new token.
        assert_ne!(open(&streams, dir.path(), "a"), a);
    }

    #[test]
    fn an_idle_stream_closes_unless_a_player_reported_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let streams = Streams::new(dir.path().join("c"), 0, CancellationToken::new());
        *streams.endpoint.lock().unwrap() = Some(([127, 0, 0, 1], 8000).into());
        open(&streams, dir.path(), "unplayed");
        open(&streams, dir.path(), "played");
        streams.get("s/played").unwrap().set_played(true);
        let now = crate::base::clock::now_secs();
        streams.close_idle(now + IDLE - 1);
        assert!(
            streams.get("s/unplayed").is_some(),
            "closed before it was idle"
        );
        streams.close_idle(now + IDLE + 1);
        assert!(streams.get("s/unplayed").is_none());
        assert!(streams.get("s/played").is_some(), "its player has not left");
        // A player gone quiet without leaving: idle rules apply again.
        streams.get("s/played").unwrap().set_played(false);
        streams.close_idle(now + IDLE + 1);
        assert!(streams.get("s/played").is_none());
    }

    #[test]
    fn chunks_come_from_the_playhead_on_then_from_the_start() {
        let have = [true, false, false, true, false, false];
        let mut busy = [false; 6];
        assert_eq!(next_wanted(&have, &busy, 3), Some(4));
        busy[4] = true;
        assert_eq!(next_wanted(&have, &busy, 3), Some(5));
        busy[5] = true;
        assert_eq!(next_wanted(&have, &busy, 3), Some(1));
        assert_eq!(next_wanted(&[true; 3], &[false; 3], 1), None);
        assert_eq!(next_wanted(&[], &[], 0), None);
        assert_eq!(next_wanted(&[false, false], &[false; 2], 9), Some(0));
    }
}
