//! Moving chunks between members: the node-to-node HTTP server on the VPN address and the
//! LAN relay (every request MAC-signed by the sending daemon, see [`crate::group::auth`]: the
//! source address alone proves nothing, since any user on a member can send from it; relay
//! bodies are sealed), the chunk cache with
//! single-flight fetches so a site's gateway pulls each chunk over the internet once, and
//! the requester's `get` loop, which verifies every chunk and routes around a bad or dead
//! gateway. Routes come from [`crate::data::planner`]; who is where comes from a [`Directory`]
//! the caller builds. It writes only to the cache dir and the requested destination.
//! Every server here is bounded: header and body deadlines, connection caps in all and per
//! source, body size limits both ways, throttled logging.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::base::lock::Recover;
use crate::base::logging::Throttle;
use crate::data::planner::{self, Route, Via};
use crate::data::share::{Manifest, RangeRead, ShareError, Shares, MAX_RANGE};
use crate::group::auth::{self, Direction, Proofs};
use crate::group::identity::Key;
use crate::net::server::{self, Budget, Guarded};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

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
/// The largest chunk a manifest may name; a chunk answer is never read past its own length.
pub const MAX_CHUNK: u64 = 64 * 1024 * 1024;
/// A listing or manifest answer (JSON) is read up to this size.
const MAX_JSON_ANSWER: usize = 16 * 1024 * 1024;
/// An announcement or room message POSTed to the node server.
const MAX_POST: usize = 4 * 1024 * 1024;
/// A sealed relay request (a chunk request as JSON) is small.
const MAX_RELAY_REQUEST: usize = 64 * 1024;
/// A request body must arrive within this long.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of chunk and file replies one member may have in flight from this node: one
/// that never reads what it asked for holds no more.
const REPLY_BUDGET: u64 = 64 * 1024 * 1024;

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
    #[error("{0} answered more than the {1} bytes expected")]
    TooLarge(SocketAddr, u64),
    #[error("the answer from {from} is not valid: {source}")]
    Decode {
        from: SocketAddr,
        source: serde_json::Error,
    },
    #[error("cannot sign a request to a member: {0}")]
    Sign(auth::AuthError),
    #[error("the sealed answer from {0} does not open: {1}")]
    Open(String, auth::AuthError),
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
            if crate::data::share::refused(source))
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
    /// This node's VPN address and the group's network: cheap, asked for every
    /// connection.
    fn vpn(&self) -> (Ipv4Addr, ipnet::Ipv4Net);
    /// The member (not this node) whose VPN address is `ip`: cheap, asked for every
    /// request.
    fn member_at(&self, ip: IpAddr) -> Option<Key>;
    /// Whether `key` is a member other than this node: cheap, asked for every relay
    /// request before anything costs.
    fn is_member(&self, key: &Key) -> bool;
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
    /// The chunk's length from its manifest: no answer is read past it.
    pub len: u64,
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
            .append_pair("len", &self.len.to_string())
            .finish()
    }

    fn source_key(&self) -> Option<Key> {
        crate::group::identity::key_from_base64(&self.source)
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
        if !self.state.locked().held.contains(hash) {
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
        let mut st = self.state.locked();
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
    /// Requests to the node server or the relay refused for want of a member's proof.
    #[serde(default)]
    pub refused_requests: u64,
    /// Connections closed at once: over a cap, or to an address the server does not serve.
    #[serde(default)]
    pub refused_connections: u64,
}

/// The transfer engine one node runs.
pub struct Engine {
    pub shares: Shares,
    proofs: Arc<Proofs>,
    relay_port: u16,
    cache: Cache,
    inflight: Mutex<HashMap<String, Arc<OnceCell<Bytes>>>>,
    refused: AtomicU64,
    refused_connections: AtomicU64,
    corrupt: AtomicU64,
    served: AtomicU64,
    fetched: AtomicU64,
    resumed: AtomicU64,
}

impl Engine {
    pub fn new(
        shares: Shares,
        proofs: Arc<Proofs>,
        relay_port: u16,
        cache_dir: PathBuf,
        cache_budget: u64,
    ) -> Engine {
        Engine {
            shares,
            proofs,
            relay_port,
            cache: Cache::new(cache_dir, cache_budget),
            inflight: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
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
            refused_requests: self.refused.load(Ordering::Relaxed),
            refused_connections: self.refused_connections.load(Ordering::Relaxed),
        }
    }

    pub fn proofs(&self) -> &Arc<Proofs> {
        &self.proofs
    }

    /// One request to member `to`'s node server, signed by this daemon; its answer is
    /// read up to `limit` bytes. A POST (a small announcement) gets a shorter deadline.
    async fn signed(
        &self,
        to: &Key,
        addr: SocketAddr,
        method: hyper::Method,
        pq: &str,
        body: Bytes,
        limit: u64,
    ) -> Result<Bytes, TransferError> {
        let deadline = if method == hyper::Method::POST {
            POST_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let h = self
            .proofs
            .sign_request(
                to,
                method.as_str(),
                pq,
                &body,
                crate::base::clock::now_secs(),
                fresh_nonce(),
            )
            .map_err(TransferError::Sign)?;
        let mut req = Request::builder().method(method).uri(pq);
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        exchange(addr, req.body(Full::new(body)), deadline, limit).await
    }

    /// Asks member `to`, at VPN address `vpn`, for a listing or a manifest.
    pub async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        to: &Key,
        vpn: Ipv4Addr,
        what: &str,
        share: &str,
        path: &str,
    ) -> Result<T, TransferError> {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("share", share)
            .append_pair("path", path)
            .finish();
        let addr = SocketAddr::from((vpn, NODE_PORT));
        let body = self
            .signed(
                to,
                addr,
                hyper::Method::GET,
                &format!("/v1/{what}?{q}"),
                Bytes::new(),
                MAX_JSON_ANSWER as u64,
            )
            .await?;
        serde_json::from_slice(&body).map_err(|source| TransferError::Decode { from: addr, source })
    }

    /// POSTs `body` to member `to`'s node server (folder sync announcements, room messages).
    pub async fn post(
        &self,
        to: &Key,
        vpn: Ipv4Addr,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(), TransferError> {
        let addr = SocketAddr::from((vpn, NODE_PORT));
        self.signed(to, addr, hyper::Method::POST, path, Bytes::from(body), 1024)
            .await
            .map(|_| ())
    }

    /// Checks that a request came from member `from`'s daemon: the member it names is
    /// `from`, and its MAC covers this method, path, query and body.
    fn verify(
        &self,
        from: &Key,
        parts: &hyper::http::request::Parts,
        body: &[u8],
    ) -> Result<(), auth::AuthError> {
        let h = |k: &str| header(parts, k);
        if crate::group::identity::key_from_base64(h(auth::HEADER_MEMBER)).as_ref() != Some(from) {
            return Err(auth::AuthError::Missing);
        }
        let sig = auth::Signature {
            time: h(auth::HEADER_TIME).parse().unwrap_or(0),
            nonce: h(auth::HEADER_NONCE),
            mac: h(auth::HEADER_MAC),
        };
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        self.proofs.check_request(
            from,
            parts.method.as_str(),
            pq,
            body,
            sig,
            crate::base::clock::now_secs(),
        )
    }

    /// The checks that cost nothing, before a body is read: the member named is the one
    /// expected, a nonce is there and the time is close to ours.
    fn precheck(
        &self,
        from: &Key,
        parts: &hyper::http::request::Parts,
    ) -> Result<(), auth::AuthError> {
        let h = |k: &str| header(parts, k);
        if crate::group::identity::key_from_base64(h(auth::HEADER_MEMBER)).as_ref() != Some(from) {
            return Err(auth::AuthError::Missing);
        }
        let time: u64 = h(auth::HEADER_TIME)
            .parse()
            .map_err(|_| auth::AuthError::Missing)?;
        if time.abs_diff(crate::base::clock::now_secs()) > auth::MAX_SKEW_SECS {
            return Err(auth::AuthError::Skew);
        }
        Ok(())
    }

    /// The answer to a request that failed [`Engine::verify`], counted.
    fn refuse(&self, e: &auth::AuthError, peer: SocketAddr) -> Response<Full<Bytes>> {
        static LOG: Throttle = Throttle::new(Duration::from_secs(10));
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(held) = LOG.allow() {
            log::info!("refused a request from {peer}: {e} ({held} more refused before)");
        }
        match e {
            auth::AuthError::Busy => reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::new()),
            _ => unauthorized(),
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
            .locked()
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
        let mut inflight = self.inflight.locked();
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
        let peer = dir.get(from).ok_or_else(|| {
            TransferError::UnknownPeer(crate::group::identity::key_to_base64(from))
        })?;
        let body = match via {
            Via::Tunnel => {
                let pq = format!("/v1/chunk?{}", req.query());
                let addr = SocketAddr::from((peer.vpn, NODE_PORT));
                let limit = req.len.min(MAX_CHUNK);
                self.signed(
                    &peer.key,
                    addr,
                    hyper::Method::GET,
                    &pq,
                    Bytes::new(),
                    limit,
                )
                .await?
            }
            Via::Lan => {
                let addr = peer
                    .relay
                    .ok_or_else(|| TransferError::UnknownPeer(peer.name.clone()))?;
                self.relay_get(&peer.key, &peer.name, addr, req).await?
            }
        };
        self.fetched.fetch_add(1, Ordering::Relaxed);
        if blake3::hash(&body).to_hex().as_str() != req.hash {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return Err(TransferError::Corrupt(peer.name.clone()));
        }
        Ok(body)
    }

    /// A chunk from member `to`'s LAN relay: the request (which names the share and the
    /// path) and the answer both travel sealed, so the LAN sees neither.
    async fn relay_get(
        &self,
        to: &Key,
        name: &str,
        addr: SocketAddr,
        req: &ChunkRequest,
    ) -> Result<Bytes, TransferError> {
        let plain = serde_json::to_vec(req)
            .map_err(|source| TransferError::Decode { from: addr, source })?;
        let nonce = fresh_nonce();
        let nonce_hex = auth::nonce_hex(nonce);
        let sealed = self
            .proofs
            .seal_relay(to, &nonce_hex, Direction::Request, &plain)
            .map_err(|e| TransferError::Open(name.to_string(), e))?;
        let h = self
            .proofs
            .sign_request(
                to,
                "POST",
                RELAY_PATH,
                &sealed,
                crate::base::clock::now_secs(),
                nonce,
            )
            .map_err(TransferError::Sign)?;
        let mut r = Request::post(RELAY_PATH);
        for (k, v) in h.pairs() {
            r = r.header(k, v);
        }
        let answer = exchange(
            addr,
            r.body(Full::new(Bytes::from(sealed))),
            REQUEST_TIMEOUT,
            req.len.min(MAX_CHUNK) + SEAL_OVERHEAD,
        )
        .await?;
        self.proofs
            .open_relay(to, &nonce_hex, Direction::Response, &answer)
            .map(Bytes::from)
            .map_err(|e| TransferError::Open(name.to_string(), e))
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

/// A request header as text, empty when absent or not text.
fn header<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The one path of the LAN relay: what is asked is in the sealed body, not the URL.
const RELAY_PATH: &str = "/v1/relay";
/// What sealing adds to a body: the AEAD's tag.
const SEAL_OVERHEAD: u64 = 16;

fn fresh_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
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
        source: crate::group::identity::key_to_base64(source),
        share: manifest.share.clone(),
        path: manifest.path.clone(),
        index,
        hash: manifest.chunks[index as usize].clone(),
        transfer: id.clone(),
        len: manifest.chunk_len(index),
    };
    let mut last = String::new();
    for _ in 0..MAX_TRIES {
        let dir = members.directory();
        let ex = exclude.locked().clone();
        let route = dir.plan(source, &dir.me, &id, &ex)?;
        *progress.route.locked() = describe(&route);
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
                    Some(g) => exclude.locked().push(g),
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

/// One request on a fresh connection: connect within [`CONNECT_TIMEOUT`], the whole
/// exchange within `deadline`; a status other than 2xx is an error, and so is an answer
/// longer than `limit` bytes, which is never read past it.
async fn exchange(
    addr: SocketAddr,
    req: Result<Request<Full<Bytes>>, hyper::http::Error>,
    deadline: Duration,
    limit: u64,
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
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            driver.abort();
            return Err(TransferError::TooLarge(addr, limit));
        }
        let cap = usize::try_from(limit).unwrap_or(usize::MAX);
        let body = http_body_util::Limited::new(resp.into_body(), cap)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    TransferError::TooLarge(addr, limit)
                } else {
                    fail(e.to_string())
                }
            })?
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

/// The chunk a `/v1/chunk` query string asks for, if it names one within bounds. Pure, so
/// the fuzzer and the replay test run the same parse as the node server.
pub fn parse_chunk_query(query: &str) -> Option<ChunkRequest> {
    chunk_request(&parse_query(query))
}

/// A request's query string as a map; a repeated key keeps its last value.
fn parse_query(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn chunk_request(q: &HashMap<String, String>) -> Option<ChunkRequest> {
    Some(ChunkRequest {
        source: q.get("source")?.clone(),
        share: q.get("share")?.clone(),
        path: q.get("path")?.clone(),
        index: q.get("index")?.parse().ok()?,
        hash: q.get("hash")?.clone(),
        transfer: q.get("transfer")?.clone(),
        len: q.get("len")?.parse().ok().filter(|l| *l <= MAX_CHUNK)?,
    })
}

/// Reads a request body up to `limit` bytes within [`BODY_TIMEOUT`].
async fn read_body(body: Incoming, limit: usize) -> Option<Bytes> {
    let collect = http_body_util::Limited::new(body, limit).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(b)) => Some(b.to_bytes()),
        _ => None,
    }
}

type Reply = Response<Guarded<Full<Bytes>>>;

/// A reply that holds nothing: a refusal or a small answer.
fn plain(r: Response<Full<Bytes>>) -> Reply {
    r.map(Guarded::new)
}

/// Serves members over the tunnel: listing, manifests, chunks, ranged reads of files,
/// and the sync and room messages. Only connections to this node's VPN address from an
/// address inside the group's network are taken, only requests from a member's VPN
/// address are read, and only those that member's daemon signed are answered: any user
/// on that member can send from its address, but none can sign.
pub async fn serve_node<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
) {
    serve_peers(listener, engine, members, cancel, PeerServer::Node).await
}

/// The LAN relay: chunks for members, every request signed and sealed; anyone else gets
/// 401. It answers on this node's LAN addresses, never on its VPN address or loopback.
pub async fn serve_relay<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
) {
    serve_peers(listener, engine, members, cancel, PeerServer::Relay).await
}

#[derive(Clone, Copy)]
enum PeerServer {
    Node,
    Relay,
}

async fn serve_peers<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
    kind: PeerServer,
) {
    let admit = {
        let members = members.clone();
        move |local: SocketAddr, peer: SocketAddr| {
            let (me, network) = members.vpn();
            match kind {
                // Linux takes packets for the VPN address on any interface: a LAN
                // stranger who routes the VPN's range at this node must not reach this.
                PeerServer::Node => {
                    local.ip() == IpAddr::V4(me)
                        && matches!(peer.ip(), IpAddr::V4(p) if network.contains(&p))
                }
                PeerServer::Relay => !local.ip().is_loopback() && local.ip() != IpAddr::V4(me),
            }
        }
    };
    let budget = Budget::new(REPLY_BUDGET);
    let counted = engine.clone();
    server::serve(
        listener,
        cancel,
        server::PEERS,
        admit,
        move |req, _local, peer| {
            let (engine, members, budget) = (engine.clone(), members.clone(), budget.clone());
            async move {
                match kind {
                    PeerServer::Node => node_request(&engine, &*members, &budget, req, peer).await,
                    PeerServer::Relay => {
                        relay_request(&engine, &*members, &budget, req, peer).await
                    }
                }
            }
        },
        move || {
            counted.refused_connections.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await
}

async fn node_request<M: Membership>(
    engine: &Engine,
    members: &M,
    budget: &Arc<Budget>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Reply {
    let Some(from) = members.member_at(peer.ip()) else {
        return plain(engine.refuse(&auth::AuthError::Missing, peer));
    };
    let (parts, body) = req.into_parts();
    if let Err(e) = engine.precheck(&from, &parts) {
        return plain(engine.refuse(&e, peer));
    }
    // Only a POST has a body worth reading; a GET's is refused unread.
    let limit = if parts.method == hyper::Method::POST {
        MAX_POST
    } else {
        0
    };
    let Some(body) = read_body(body, limit).await else {
        return plain(engine.refuse(&auth::AuthError::Missing, peer));
    };
    if let Err(e) = engine.verify(&from, &parts, &body) {
        return plain(engine.refuse(&e, peer));
    }
    // Proven: from here the connection is busy until the reply's last byte.
    let busy = server::mark_busy(&parts.extensions);
    let path = parts.uri.path();
    if parts.method == hyper::Method::POST {
        let r = match path {
            "/v1/room" => {
                members.room(from, body);
                reply(StatusCode::OK, Bytes::new())
            }
            "/v1/sync" => {
                members.announced(from, body);
                reply(StatusCode::OK, Bytes::new())
            }
            _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
        };
        return plain(r);
    }
    let q = parse_query(parts.uri.query().unwrap_or(""));
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let r = match path {
        "/v1/shares" => json(&engine.shares.list()),
        "/v1/ls" => {
            match tokio::task::block_in_place(|| engine.shares.ls(&get("share"), &get("path"))) {
                Ok(v) => json(&v),
                Err(e) => error_reply(&e.into()),
            }
        }
        "/v1/manifest" => {
            match tokio::task::block_in_place(|| {
                engine.shares.manifest(&get("share"), &get("path"))
            }) {
                Ok(m) => json(&m),
                Err(e) => error_reply(&e.into()),
            }
        }
        "/v1/chunk" => match chunk_request(&q) {
            Some(cr) => {
                let dir = members.directory();
                chunk_reply(engine, &dir, &cr, false).await
            }
            None => reply(StatusCode::BAD_REQUEST, Bytes::new()),
        },
        "/v1/file" => {
            let range = parts
                .headers
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
    };
    hold_reply(r, budget, peer, busy)
}

/// A reply that keeps its connection busy and its bytes counted against the asker's
/// budget until it is sent; past the budget, 503 (the asker reads what it has first).
fn hold_reply(
    r: Response<Full<Bytes>>,
    budget: &Arc<Budget>,
    peer: SocketAddr,
    busy: Option<server::Busy>,
) -> Reply {
    let len = hyper::body::Body::size_hint(r.body()).exact().unwrap_or(0);
    let Some(reserved) = budget.reserve(peer.ip(), len) else {
        return plain(reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::new()));
    };
    let r = r.map(|b| Guarded::new(b).hold(reserved));
    match busy {
        Some(b) => r.map(|g| g.hold(b)),
        None => r,
    }
}

async fn relay_request<M: Membership>(
    engine: &Engine,
    members: &M,
    budget: &Arc<Budget>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Reply {
    // Membership and the time are checked before anything costs: no body is read and no
    // key derived for a stranger, and every refusal looks the same from outside.
    let member = req
        .headers()
        .get(auth::HEADER_MEMBER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::group::identity::key_from_base64)
        .filter(|m| members.is_member(m));
    let Some(member) = member else {
        return plain(engine.refuse(&auth::AuthError::Missing, peer));
    };
    let (parts, body) = req.into_parts();
    if let Err(e) = engine.precheck(&member, &parts) {
        return plain(engine.refuse(&e, peer));
    }
    if parts.method != hyper::Method::POST || parts.uri.path() != RELAY_PATH {
        return plain(engine.refuse(&auth::AuthError::Missing, peer));
    }
    let Some(body) = read_body(body, MAX_RELAY_REQUEST).await else {
        return plain(engine.refuse(&auth::AuthError::Missing, peer));
    };
    if let Err(e) = engine.verify(&member, &parts, &body) {
        return plain(engine.refuse(&e, peer));
    }
    let busy = server::mark_busy(&parts.extensions);
    let nonce = parts
        .headers
        .get(auth::HEADER_NONCE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let cr = engine
        .proofs
        .open_relay(&member, &nonce, Direction::Request, &body)
        .ok()
        .and_then(|plain| serde_json::from_slice::<ChunkRequest>(&plain).ok())
        .filter(|cr| cr.len <= MAX_CHUNK);
    let Some(cr) = cr else {
        return plain(reply(StatusCode::BAD_REQUEST, Bytes::new()));
    };
    let dir = members.directory();
    // Statuses only: an error's text could name the share or the path.
    let r = match engine.serve_chunk(&dir, &cr, true).await {
        Ok(b) => match engine
            .proofs
            .seal_relay(&member, &nonce, Direction::Response, &b)
        {
            Ok(sealed) => {
                engine.served.fetch_add(1, Ordering::Relaxed);
                reply(StatusCode::OK, Bytes::from(sealed))
            }
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
        },
        Err(e) => reply(error_reply(&e).status(), Bytes::new()),
    };
    hold_reply(r, budget, peer, busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_request_with_a_length_past_the_largest_chunk_is_not_parsed() {
        let q = |len: u64| -> HashMap<String, String> {
            [
                ("source", "s"),
                ("share", "x"),
                ("path", "p"),
                ("index", "0"),
                ("hash", "h"),
                ("transfer", "t"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("len".to_string(), len.to_string())])
            .collect()
        };
        assert_eq!(chunk_request(&q(MAX_CHUNK)).map(|c| c.len), Some(MAX_CHUNK));
        assert!(chunk_request(&q(MAX_CHUNK + 1)).is_none());
        assert!(chunk_request(&q(1 << 36)).is_none());
    }
}
