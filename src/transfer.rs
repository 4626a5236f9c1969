//! Moving chunks between members: the node-to-node HTTP server on the VPN address (a
//! request is identified by its WireGuard-authenticated source address), the LAN relay
//! (every request MAC-signed by a member, see [`crate::auth`]), the chunk cache with
//! single-flight fetches so a site's gateway pulls each chunk over the internet once, and
//! the requester's `get` loop, which verifies every chunk and routes around a bad or dead
//! gateway. Routes come from [`crate::planner`]; who is where comes from a [`Directory`]
//! the caller builds. It writes only to the cache dir and the requested destination.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use x25519_dalek::StaticSecret;

use crate::auth::{self, Replays};
use crate::planner::{self, Key, Route, Via};
use crate::share::{Manifest, RangeRead, ShareError, Shares, MAX_RANGE};

/// The node-to-node HTTP port, on each member's VPN address.
pub const NODE_PORT: u16 = 51874;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An announcement is small; a member that does not take it in this long is skipped
/// and catches up at the next full round.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunks a `get` keeps in flight.
const PARALLEL: usize = 4;
const MAX_TRIES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("no route: {0}")]
    Plan(#[from] planner::PlanError),
    #[error("cannot reach {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("{0} answered {1}")]
    Status(SocketAddr, u16),
    #[error("the chunk from {0} does not match its hash")]
    Corrupt(String),
    #[error("{0} is not a member this node can reach")]
    UnknownPeer(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gave up on chunk {0} after {1} tries: {2}")]
    GiveUp(u64, usize, String),
}

impl TransferError {
    /// The write failed because the file system (or the user's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, TransferError::Write { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }

    /// The write was refused: a read-only mount (as a sandbox shows one) or permissions.
    pub fn is_write_refused(&self) -> bool {
        matches!(self, TransferError::Write { source, .. }
            if crate::sync::refused(source))
    }
}

/// A member as the transfer code needs it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub key: Key,
    pub name: String,
    pub vpn: Ipv4Addr,
    /// Its LAN relay, when it announced one.
    pub relay: Option<SocketAddr>,
    pub site: Option<String>,
    pub up: bool,
    pub shares: Vec<String>,
}

/// Everyone this node knows, itself included.
#[derive(Debug, Clone)]
pub struct Directory {
    pub me: Key,
    pub peers: Vec<Peer>,
}

impl Directory {
    pub fn get(&self, key: &Key) -> Option<&Peer> {
        self.peers.iter().find(|p| &p.key == key)
    }

    pub fn by_name(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    fn planner_members(&self) -> Vec<planner::Member> {
        self.peers
            .iter()
            .map(|p| planner::Member {
                key: p.key,
                name: p.name.clone(),
                site: p.site.clone(),
                up: p.up,
            })
            .collect()
    }

    pub fn plan(
        &self,
        source: &Key,
        requester: &Key,
        transfer: &str,
        exclude: &[Key],
    ) -> Result<Route, planner::PlanError> {
        planner::plan(
            &self.planner_members(),
            source,
            requester,
            transfer,
            exclude,
        )
    }

    /// The same, with this node as its site's gateway: it serves nearby members itself.
    fn plan_as_gateway(&self, source: &Key, transfer: &str) -> Result<Route, planner::PlanError> {
        let mine = self.get(&self.me).and_then(|p| p.site.clone());
        let members: Vec<planner::Member> = self
            .planner_members()
            .into_iter()
            .map(|mut m| {
                if m.key != self.me && &m.key != source && mine.is_some() && m.site == mine {
                    m.up = false;
                }
                m
            })
            .collect();
        planner::plan(&members, source, &self.me, transfer, &[])
    }
}

/// What the node gives the servers: the current directory.
pub trait Membership: Send + Sync + 'static {
    fn directory(&self) -> Directory;
    /// Versions of a read-write share that member `from` announced (folder sync).
    fn announced(&self, _from: Key, _body: Bytes) {}
    /// A watch-along room message from member `from`.
    fn room(&self, _from: Key, _body: Bytes) {}
}

/// Names one chunk of one file version on one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub source: String,
    pub share: String,
    pub path: String,
    pub index: u64,
    pub hash: String,
    pub transfer: String,
}

impl ChunkRequest {
    fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("source", &self.source)
            .append_pair("share", &self.share)
            .append_pair("path", &self.path)
            .append_pair("index", &self.index.to_string())
            .append_pair("hash", &self.hash)
            .append_pair("transfer", &self.transfer)
            .finish()
    }

    fn source_key(&self) -> Option<Key> {
        crate::identity::key_from_base64(&self.source)
    }
}

/// Chunks this node cached for others, on disk within a budget, oldest dropped first.
struct Cache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    order: VecDeque<(String, u64)>,
    held: HashSet<String>,
    total: u64,
}

impl Cache {
    fn new(dir: PathBuf, budget: u64) -> Cache {
        // What a previous run cached is not trusted or counted: start empty.
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        Cache {
            dir,
            budget,
            state: Mutex::new(CacheState::default()),
        }
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    fn get(&self, hash: &str) -> Option<Bytes> {
        if !self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .contains(hash)
        {
            return None;
        }
        std::fs::read(self.path(hash)).ok().map(Bytes::from)
    }

    fn put(&self, hash: &str, data: &[u8]) {
        let len = data.len() as u64;
        if len > self.budget {
            return;
        }
        let tmp = self.dir.join(format!("{hash}.tmp"));
        if std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, self.path(hash)))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.held.insert(hash.to_string()) {
            return;
        }
        st.order.push_back((hash.to_string(), len));
        st.total += len;
        while st.total > self.budget {
            let Some((old, n)) = st.order.pop_front() else {
                break;
            };
            st.held.remove(&old);
            st.total -= n;
            let _ = std::fs::remove_file(self.path(&old));
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Chunks that arrived damaged and were fetched again another way.
    pub corrupt_chunks: u64,
    /// Chunks served from the cache or the disk to another member.
    pub served_chunks: u64,
    /// Chunks this node fetched from another member.
    pub fetched_chunks: u64,
    /// Chunks an interrupted pull already held, checked and kept instead of fetched.
    pub resumed_chunks: u64,
}

/// The transfer engine one node runs.
pub struct Engine {
    pub shares: Shares,
    secret: StaticSecret,
    relay_port: u16,
    cache: Cache,
    inflight: Mutex<HashMap<String, Arc<OnceCell<Bytes>>>>,
    replays: Mutex<Replays>,
    corrupt: AtomicU64,
    served: AtomicU64,
    fetched: AtomicU64,
    resumed: AtomicU64,
}

impl Engine {
    pub fn new(
        shares: Shares,
        secret: StaticSecret,
        relay_port: u16,
        cache_dir: PathBuf,
        cache_budget: u64,
    ) -> Engine {
        Engine {
            shares,
            secret,
            relay_port,
            cache: Cache::new(cache_dir, cache_budget),
            inflight: Mutex::new(HashMap::new()),
            replays: Mutex::new(Replays::default()),
            corrupt: AtomicU64::new(0),
            served: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }

    pub fn relay_port(&self) -> u16 {
        self.relay_port
    }

    pub fn counters(&self) -> Counters {
        Counters {
            corrupt_chunks: self.corrupt.load(Ordering::Relaxed),
            served_chunks: self.served.load(Ordering::Relaxed),
            fetched_chunks: self.fetched.load(Ordering::Relaxed),
            resumed_chunks: self.resumed.load(Ordering::Relaxed),
        }
    }

    /// One fetch per chunk at a time: concurrent askers wait for the same result.
    async fn single_flight<F, Fut>(&self, hash: &str, f: F) -> Result<Bytes, TransferError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, TransferError>>,
    {
        if let Some(b) = tokio::task::block_in_place(|| self.cache.get(hash)) {
            return Ok(b);
        }
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hash.to_string())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let r = cell
            .get_or_try_init(|| async {
                let b = f().await?;
                tokio::task::block_in_place(|| self.cache.put(hash, &b));
                Ok::<Bytes, TransferError>(b)
            })
            .await
            .cloned();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(hash).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(hash);
        }
        r
    }

    /// Asks `from` for a chunk over the hop `via`, and checks it.
    async fn fetch_from(
        &self,
        dir: &Directory,
        from: &Key,
        via: Via,
        req: &ChunkRequest,
    ) -> Result<Bytes, TransferError> {
        let peer = dir
            .get(from)
            .ok_or_else(|| TransferError::UnknownPeer(crate::identity::key_to_base64(from)))?;
        let pq = format!("/v1/chunk?{}", req.query());
        let body = match via {
            Via::Tunnel => http_get(SocketAddr::from((peer.vpn, NODE_PORT)), &pq, &[]).await?,
            Via::Lan => {
                let addr = peer
                    .relay
                    .ok_or_else(|| TransferError::UnknownPeer(peer.name.clone()))?;
                let headers = self.sign("GET", &pq, &peer.key);
                http_get(addr, &pq, &headers).await?
            }
        };
        self.fetched.fetch_add(1, Ordering::Relaxed);
        if blake3::hash(&body).to_hex().as_str() != req.hash {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return Err(TransferError::Corrupt(peer.name.clone()));
        }
        Ok(body)
    }

    fn sign(&self, method: &str, pq: &str, to: &Key) -> Vec<(&'static str, String)> {
        let key = auth::pair_key(&self.secret, to);
        let time = crate::node::now_secs();
        let mut n = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut n);
        let nonce: String = n.iter().map(|b| format!("{b:02x}")).collect();
        let me = x25519_dalek::PublicKey::from(&self.secret);
        vec![
            (
                auth::HEADER_MEMBER,
                crate::identity::key_to_base64(me.as_bytes()),
            ),
            (auth::HEADER_TIME, time.to_string()),
            (auth::HEADER_MAC, auth::mac(&key, method, pq, time, &nonce)),
            (auth::HEADER_NONCE, nonce),
        ]
    }

    /// A chunk for a member that asked this node: from disk when this node holds the
    /// file, else from the cache, else fetched along the route (once, however many ask).
    async fn serve_chunk(
        &self,
        dir: &Directory,
        req: &ChunkRequest,
        as_gateway: bool,
    ) -> Result<Bytes, TransferError> {
        let source = req
            .source_key()
            .ok_or_else(|| TransferError::UnknownPeer(req.source.clone()))?;
        if source == dir.me {
            let b = tokio::task::block_in_place(|| {
                self.shares
                    .chunk(&req.share, &req.path, req.index, &req.hash)
            })?;
            return Ok(Bytes::from(b));
        }
        self.single_flight(&req.hash, || async {
            let route = if as_gateway {
                dir.plan_as_gateway(&source, &req.transfer)?
            } else {
                dir.plan(&source, &dir.me, &req.transfer, &[])?
            };
            let hop = route
                .feeder()
                .ok_or_else(|| TransferError::UnknownPeer(req.source.clone()))?;
            match self.fetch_from(dir, &hop.from_key, hop.via, req).await {
                Ok(b) => Ok(b),
                // The source side's gateway failed: ask the source itself.
                Err(e) if hop.from_key != source => {
                    log::debug!("gateway {} failed ({e}); asking the source", hop.from);
                    let via = if route.case == 4 {
                        Via::Lan
                    } else {
                        Via::Tunnel
                    };
                    self.fetch_from(dir, &source, via, req).await
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The requester's fetch of one chunk, along its route, avoiding `exclude`.
    async fn get_chunk(
        &self,
        dir: &Directory,
        req: &ChunkRequest,
        route: &Route,
    ) -> Result<Bytes, TransferError> {
        let Some(hop) = route.feeder() else {
            let b = tokio::task::block_in_place(|| {
                self.shares
                    .chunk(&req.share, &req.path, req.index, &req.hash)
            })?;
            return Ok(Bytes::from(b));
        };
        if hop.via == Via::Tunnel {
            // This node pulls over the internet itself, so it is its site's gateway for
            // this transfer: one fetch shared with the neighbours asking its relay, and
            // kept in the cache for them.
            return self.serve_chunk(dir, req, true).await;
        }
        self.fetch_from(dir, &hop.from_key, hop.via, req).await
    }
}

/// Progress of one `get`, read by `watchalong get` while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub size: AtomicU64,
    pub done: AtomicU64,
    pub corrupt: AtomicU64,
    pub route: Mutex<String>,
    pub state: Mutex<String>,
}

/// Fetches chunk `index` of `manifest` from `source` along the planner's route, verified,
/// trying another route (around a failed gateway) up to `MAX_TRIES` times. Gateways that
/// failed are added to `exclude`, shared by every worker of one transfer.
pub async fn fetch_chunk(
    engine: &Engine,
    members: &dyn Membership,
    source: &Key,
    manifest: &Manifest,
    index: u64,
    exclude: &Mutex<Vec<Key>>,
    progress: &Progress,
) -> Result<Bytes, TransferError> {
    let id = manifest.id();
    let req = ChunkRequest {
        source: crate::identity::key_to_base64(source),
        share: manifest.share.clone(),
        path: manifest.path.clone(),
        index,
        hash: manifest.chunks[index as usize].clone(),
        transfer: id.clone(),
    };
    let mut last = String::new();
    for _ in 0..MAX_TRIES {
        let dir = members.directory();
        let ex = exclude.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let route = dir.plan(source, &dir.me, &id, &ex)?;
        *progress.route.lock().unwrap_or_else(|p| p.into_inner()) = describe(&route);
        // The hop that delivers to us, when it is a gateway (not the source).
        let gateway = route
            .feeder()
            .map(|h| h.from_key)
            .filter(|k| k != source && *k != dir.me);
        match engine.get_chunk(&dir, &req, &route).await {
            Ok(b) => return Ok(b),
            Err(e) => {
                if matches!(e, TransferError::Corrupt(_)) {
                    progress.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                log::info!("chunk {index}: {e}; trying another route");
                last = e.to_string();
                // Route around the gateway that failed; the source has no stand-in.
                match gateway {
                    Some(g) => exclude.lock().unwrap_or_else(|p| p.into_inner()).push(g),
                    None => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
    }
    Err(TransferError::GiveUp(index, MAX_TRIES, last))
}

/// Fetches every chunk of `manifest` from `source` into `dest`: verified chunks written
/// at their offsets in a temp file beside `dest`, fsynced, then renamed over it.
pub async fn get_file(
    engine: Arc<Engine>,
    members: Arc<dyn Membership>,
    source: Key,
    manifest: Manifest,
    dest: PathBuf,
    progress: Arc<Progress>,
    resume: Option<PathBuf>,
) -> Result<(), TransferError> {
    progress.size.store(manifest.size, Ordering::Relaxed);
    let resuming = resume.is_some();
    let tmp = resume.unwrap_or_else(|| temp_beside(&dest));
    let write_err = |source| TransferError::Write {
        path: tmp.clone(),
        source,
    };
    use std::os::unix::fs::OpenOptionsExt;
    // Without `resume`: a fresh name, opened only if it does not exist, so two gets to
    // one destination never share a temp file. With it: the caller's name for this
    // version, kept across a crash, whose chunks already there are checked and kept. A
    // planted symlink is never followed.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(resuming)
        .create_new(!resuming)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(write_err)?;
    file.set_len(manifest.size).map_err(write_err)?;
    let file = Arc::new(file);
    let exclude: Arc<Mutex<Vec<Key>>> = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL.min(manifest.chunks.len().max(1)) {
        let (engine, members, manifest, file, exclude, next, progress) = (
            engine.clone(),
            members.clone(),
            manifest.clone(),
            file.clone(),
            exclude.clone(),
            next.clone(),
            progress.clone(),
        );
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index as usize >= manifest.chunks.len() {
                    return Ok::<(), TransferError>(());
                }
                if resuming
                    && tokio::task::block_in_place(|| manifest.held_chunk(&file, index)).is_some()
                {
                    engine.resumed.fetch_add(1, Ordering::Relaxed);
                    progress
                        .done
                        .fetch_add(manifest.chunk_len(index), Ordering::Relaxed);
                    continue;
                }
                let b = fetch_chunk(
                    &engine, &*members, &source, &manifest, index, &exclude, &progress,
                )
                .await?;
                use std::os::unix::fs::FileExt;
                tokio::task::block_in_place(|| file.write_all_at(&b, index * manifest.chunk_size))
                    .map_err(|source| TransferError::Write {
                        path: PathBuf::from(&manifest.path),
                        source,
                    })?;
                progress.done.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        });
    }
    let mut result = Ok(());
    while let Some(r) = workers.join_next().await {
        // A worker that panicked left holes in the file: that is a failure too.
        let failed = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(TransferError::GiveUp(0, 0, format!("a worker died: {e}"))),
        };
        if let (Some(e), true) = (failed, result.is_ok()) {
            result = Err(e);
            workers.abort_all();
        }
    }
    if let Err(e) = result {
        // A resumable partial is kept: what it holds is not fetched again next time.
        if !resuming {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(e);
    }
    tokio::task::block_in_place(|| file.sync_all()).map_err(write_err)?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(manifest.mode & 0o777));
    std::fs::rename(&tmp, &dest).map_err(|source| TransferError::Write {
        path: dest.clone(),
        source,
    })?;
    if let Some(parent) = dest.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

pub fn describe(r: &Route) -> String {
    if r.hops.is_empty() {
        return "local".into();
    }
    let mut s = r.hops[0].from.clone();
    for h in &r.hops {
        let via = match h.via {
            Via::Tunnel => "tunnel",
            Via::Lan => "lan",
        };
        s.push_str(&format!(" -{via}-> {}", h.to));
    }
    format!("case {}: {s}", r.case)
}

fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    let mut n = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut n);
    let tag: String = n.iter().map(|b| format!("{b:02x}")).collect();
    dest.with_file_name(format!(".{name}.watchalong-{tag}"))
}

/// Asks the node server of the member at `vpn` for a listing or a manifest.
pub async fn ask<T: serde::de::DeserializeOwned>(
    vpn: Ipv4Addr,
    what: &str,
    share: &str,
    path: &str,
) -> Result<T, String> {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("share", share)
        .append_pair("path", path)
        .finish();
    let body = http_get(
        SocketAddr::from((vpn, NODE_PORT)),
        &format!("/v1/{what}?{q}"),
        &[],
    )
    .await
    .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// POSTs `body` to a member's node server (folder sync announcements).
pub async fn http_post(vpn: Ipv4Addr, path: &str, body: Vec<u8>) -> Result<(), TransferError> {
    let addr = SocketAddr::from((vpn, NODE_PORT));
    let req = Request::post(path).body(Full::new(Bytes::from(body)));
    exchange(addr, req, POST_TIMEOUT).await.map(|_| ())
}

/// GET over a fresh HTTP/1.1 connection, with deadlines.
pub async fn http_get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, String)],
) -> Result<Bytes, TransferError> {
    let mut req = Request::get(path_and_query);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    exchange(addr, req.body(Full::new(Bytes::new())), REQUEST_TIMEOUT).await
}

/// One request on a fresh connection: connect within [`CONNECT_TIMEOUT`], the whole
/// exchange within `deadline`; a status other than 2xx is an error.
async fn exchange(
    addr: SocketAddr,
    req: Result<Request<Full<Bytes>>, hyper::http::Error>,
    deadline: Duration,
) -> Result<Bytes, TransferError> {
    let fail = |e: String| TransferError::Connect(addr, e);
    let mut req = req.map_err(|e| fail(e.to_string()))?;
    req.headers_mut().insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_static("watchalong"),
    );
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let work = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        drop(sender);
        driver.abort();
        if !status.is_success() {
            return Err(TransferError::Status(addr, status.as_u16()));
        }
        Ok(body)
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| fail("no answer in time".into()))?
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r
}

/// 401 with no body: a stranger learns nothing, not even what exists.
fn unauthorized() -> Response<Full<Bytes>> {
    reply(StatusCode::UNAUTHORIZED, Bytes::new())
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(v) {
        Ok(b) => reply(StatusCode::OK, Bytes::from(b)),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
    }
}

fn error_reply(e: &TransferError) -> Response<Full<Bytes>> {
    let status = match e {
        TransferError::Share(ShareError::UnknownShare(_) | ShareError::NotFound(_)) => {
            StatusCode::NOT_FOUND
        }
        TransferError::Share(ShareError::RefusePath(_)) => StatusCode::FORBIDDEN,
        TransferError::Share(ShareError::ChunkChanged { .. }) => StatusCode::CONFLICT,
        TransferError::Share(ShareError::ReadRange { .. }) => StatusCode::RANGE_NOT_SATISFIABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    reply(status, Bytes::from(e.to_string()))
}

/// A ranged read as an HTTP reply: 206 with its `Content-Range` when a range was asked
/// for, else the whole file, which must fit in one reply.
fn file_reply(r: RangeRead, ranged: bool) -> Response<Full<Bytes>> {
    let len = r.data.len() as u64;
    if !ranged && len < r.size {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            Bytes::from(format!(
                "the file has {} bytes, more than one reply carries ({MAX_RANGE}): ask with a Range header",
                r.size
            )),
        );
    }
    let status = if ranged {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut resp = reply(status, Bytes::from(r.data));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::ACCEPT_RANGES,
        hyper::header::HeaderValue::from_static("bytes"),
    );
    if ranged && len > 0 {
        let range = format!("bytes {}-{}/{}", r.start, r.start + len - 1, r.size);
        if let Ok(v) = hyper::header::HeaderValue::from_str(&range) {
            headers.insert(hyper::header::CONTENT_RANGE, v);
        }
    }
    resp
}

/// A chunk for another member, as an HTTP reply, counted when served.
async fn chunk_reply(
    engine: &Engine,
    dir: &Directory,
    cr: &ChunkRequest,
    as_gateway: bool,
) -> Response<Full<Bytes>> {
    match engine.serve_chunk(dir, cr, as_gateway).await {
        Ok(b) => {
            engine.served.fetch_add(1, Ordering::Relaxed);
            reply(StatusCode::OK, b)
        }
        Err(e) => error_reply(&e),
    }
}

fn chunk_request(q: &HashMap<String, String>) -> Option<ChunkRequest> {
    Some(ChunkRequest {
        source: q.get("source")?.clone(),
        share: q.get("share")?.clone(),
        path: q.get("path")?.clone(),
        index: q.get("index")?.parse().ok()?,
        hash: q.get("hash")?.clone(),
        transfer: q.get("transfer")?.clone(),
    })
}

/// Serves members over the tunnel: listing, manifests, chunks and ranged reads of files. Only connections to
/// this node's VPN address from a member's VPN address are answered.
pub async fn serve_node<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
) {
    serve(listener, cancel, move |req, local, peer| {
        let (engine, members) = (engine.clone(), members.clone());
        async move {
            let dir = members.directory();
            let me = dir.get(&dir.me).map(|p| p.vpn);
            let from_member = dir
                .peers
                .iter()
                .any(|p| p.key != dir.me && IpAddr::V4(p.vpn) == peer.ip());
            if me.map(IpAddr::V4) != Some(local.ip()) || !from_member {
                return unauthorized();
            }
            let path = req.uri().path().to_string();
            if (path == "/v1/sync" || path == "/v1/room") && req.method() == hyper::Method::POST {
                let Some(from) = dir
                    .peers
                    .iter()
                    .find(|p| IpAddr::V4(p.vpn) == peer.ip())
                    .map(|p| p.key)
                else {
                    return unauthorized();
                };
                let body = http_body_util::Limited::new(req.into_body(), 4 * 1024 * 1024)
                    .collect()
                    .await;
                return match body {
                    Ok(b) if path == "/v1/room" => {
                        members.room(from, b.to_bytes());
                        reply(StatusCode::OK, Bytes::new())
                    }
                    Ok(b) => {
                        members.announced(from, b.to_bytes());
                        reply(StatusCode::OK, Bytes::new())
                    }
                    Err(_) => reply(StatusCode::PAYLOAD_TOO_LARGE, Bytes::new()),
                };
            }
            let q = query(&req);
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            match req.uri().path() {
                "/v1/shares" => json(&engine.shares.list()),
                "/v1/ls" => match tokio::task::block_in_place(|| {
                    engine.shares.ls(&get("share"), &get("path"))
                }) {
                    Ok(v) => json(&v),
                    Err(e) => error_reply(&e.into()),
                },
                "/v1/manifest" => match tokio::task::block_in_place(|| {
                    engine.shares.manifest(&get("share"), &get("path"))
                }) {
                    Ok(m) => json(&m),
                    Err(e) => error_reply(&e.into()),
                },
                "/v1/chunk" => match chunk_request(&q) {
                    Some(cr) => chunk_reply(&engine, &dir, &cr, false).await,
                    None => reply(StatusCode::BAD_REQUEST, Bytes::new()),
                },
                "/v1/file" => {
                    let range = req
                        .headers()
                        .get(hyper::header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    match tokio::task::block_in_place(|| {
                        engine
                            .shares
                            .read_range(&get("share"), &get("path"), range.as_deref())
                    }) {
                        Ok(r) => file_reply(r, range.is_some()),
                        Err(e) => error_reply(&e.into()),
                    }
                }
                _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
            }
        }
    })
    .await
}

/// The LAN relay: chunks for members, every request signed; anyone else gets 401.
pub async fn serve_relay<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
) {
    serve(listener, cancel, move |req, _local, _peer| {
        let (engine, members) = (engine.clone(), members.clone());
        async move {
            let dir = members.directory();
            let h = |k: &str| {
                req.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let Some(member) = crate::identity::key_from_base64(&h(auth::HEADER_MEMBER)) else {
                return unauthorized();
            };
            if member == dir.me || dir.get(&member).is_none() {
                return unauthorized();
            }
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            let key = auth::pair_key(&engine.secret, &member);
            let time: u64 = h(auth::HEADER_TIME).parse().unwrap_or(0);
            let (nonce, mac) = (h(auth::HEADER_NONCE), h(auth::HEADER_MAC));
            let sig = auth::Signature {
                time,
                nonce: &nonce,
                mac: &mac,
            };
            let checked = engine
                .replays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check(
                    &key,
                    req.method().as_str(),
                    &pq,
                    sig,
                    crate::node::now_secs(),
                );
            match checked {
                Ok(()) => {}
                Err(auth::AuthError::Busy) => {
                    return reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
                }
                Err(e) => {
                    log::debug!("relay request refused: {e}");
                    return unauthorized();
                }
            }
            match (req.uri().path(), chunk_request(&query(&req))) {
                ("/v1/chunk", Some(cr)) => chunk_reply(&engine, &dir, &cr, true).await,
                _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
            }
        }
    })
    .await
}

pub(crate) async fn serve<F, Fut, B>(listener: TcpListener, cancel: CancellationToken, handle: F)
where
    F: Fn(Request<Incoming>, SocketAddr, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let handle = handle.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req, local, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { log::debug!("connection from {peer}: {e}") },
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
