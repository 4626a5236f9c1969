//! The transfer engine and its client side: the [`Engine`] one node runs (shares, proofs,
//! the chunk cache, the flights in flight, counters), requests to another member's node
//! server signed by this daemon ([`Engine::ask`], [`Engine::post`], chunk fetches over the
//! tunnel or through a LAN relay, sealed), and [`exchange`], the one HTTP exchange every
//! request makes, on a connection kept by the engine's [`Pool`], which never reads an
//! answer past its limit. [`TransferError`] is the
//! error of the whole transfer (this client, the `get` loop and the servers share it). It
//! must not decide routes (the planner does) or serve requests (see
//! [`crate::data::node_server`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::data::cache::Cache;
use crate::data::directory::Directory;
use crate::data::flight::Flights;
use crate::data::planner::{self, Via};
use crate::data::pool::Pool;
use crate::data::share::{ShareError, Shares};
use crate::group::auth::{self, Direction, Proofs};
use crate::group::identity::Key;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// The node-to-node HTTP port, on each member's VPN address.
pub const NODE_PORT: u16 = 51874;
/// Connections to one address in use at once (the `get` window's ceiling is below it,
/// so a stream or sync running beside a `get` still gets some), under the servers'
/// per-source cap (32), which would otherwise evict our own idle connections.
pub(super) const PER_PEER: usize = 24;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An announcement is small; a member that does not take it in this long is skipped
/// and catches up at the next full round.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest chunk a manifest may name; a chunk answer is never read past its own length.
pub const MAX_CHUNK: u64 = 64 * 1024 * 1024;
/// A listing or manifest answer (JSON) is read up to this size.
const MAX_JSON_ANSWER: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("no route: {0}")]
    Plan(#[from] planner::PlanError),
    #[error("cannot reach {0}: {1}")]
    Connect(SocketAddr, String),
    /// No connection could be made (the pool logs it once per address, not per chunk).
    #[error("cannot reach {0}: {1}")]
    Unreachable(SocketAddr, #[source] crate::data::pool::PoolError),
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
    /// Where the chunk starts, from its manifest: content-defined chunks have no fixed
    /// place. Absent from members older than content-defined chunking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl ChunkRequest {
    fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("source", &self.source)
            .append_pair("share", &self.share)
            .append_pair("path", &self.path)
            .append_pair("index", &self.index.to_string())
            .append_pair("hash", &self.hash)
            .append_pair("transfer", &self.transfer)
            .append_pair("len", &self.len.to_string());
        if let Some(offset) = self.offset {
            q.append_pair("offset", &offset.to_string());
        }
        q.finish()
    }

    pub(super) fn source_key(&self) -> Option<Key> {
        crate::group::identity::key_from_base64(&self.source)
    }
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Chunks that arrived damaged and were fetched again another way.
    pub corrupt_chunks: u64,
    /// Chunks served from the cache or the disk to another member.
    pub served_chunks: u64,
    /// Bytes of those chunks.
    #[serde(default)]
    pub served_bytes: u64,
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
    /// Connections the node server and the relay took in: with kept connections, far
    /// fewer than the chunks they served.
    #[serde(default)]
    pub accepted_connections: u64,
}

/// The transfer engine one node runs.
pub struct Engine {
    pub shares: Arc<Shares>,
    pub(super) proofs: Arc<Proofs>,
    relay_port: u16,
    pub(super) cache: Arc<Cache>,
    pub(super) flights: Flights<Bytes>,
    pub(super) refused: AtomicU64,
    pub(super) refused_connections: AtomicU64,
    pub(super) accepted_connections: AtomicU64,
    /// Kept connections to other members' servers, shared by every request this node makes.
    pub(super) pool: Pool,
    pub(super) corrupt: AtomicU64,
    pub(super) served: AtomicU64,
    pub(super) served_bytes: AtomicU64,
    pub(super) fetched: AtomicU64,
    pub(super) resumed: AtomicU64,
    /// `served` and `fetched` by the hop they took (see [`RouteCounters`]).
    pub(super) served_tunnel: AtomicU64,
    pub(super) served_lan: AtomicU64,
    pub(super) fetched_tunnel: AtomicU64,
    pub(super) fetched_lan: AtomicU64,
}

/// Chunks by the hop they took, for the metrics endpoint: served by the node server
/// (inside the tunnel) or the LAN relay, fetched over the tunnel or from a LAN relay, and
/// "local": what a pull found already on this node's disk and kept instead of fetching.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouteCounters {
    pub served_tunnel: u64,
    pub served_lan: u64,
    pub fetched_tunnel: u64,
    pub fetched_lan: u64,
    pub fetched_local: u64,
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
            shares: Arc::new(shares),
            proofs,
            relay_port,
            cache: Arc::new(Cache::new(cache_dir, cache_budget)),
            flights: Flights::new(),
            refused: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            accepted_connections: AtomicU64::new(0),
            pool: Pool::new(PER_PEER),
            corrupt: AtomicU64::new(0),
            served: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            served_tunnel: AtomicU64::new(0),
            served_lan: AtomicU64::new(0),
            fetched_tunnel: AtomicU64::new(0),
            fetched_lan: AtomicU64::new(0),
        }
    }

    /// Chunks by route; atomics only, so a scrape never waits on a transfer.
    pub fn route_counters(&self) -> RouteCounters {
        RouteCounters {
            served_tunnel: self.served_tunnel.load(Ordering::Relaxed),
            served_lan: self.served_lan.load(Ordering::Relaxed),
            fetched_tunnel: self.fetched_tunnel.load(Ordering::Relaxed),
            fetched_lan: self.fetched_lan.load(Ordering::Relaxed),
            fetched_local: self.resumed.load(Ordering::Relaxed),
        }
    }

    pub fn relay_port(&self) -> u16 {
        self.relay_port
    }

    pub fn counters(&self) -> Counters {
        Counters {
            corrupt_chunks: self.corrupt.load(Ordering::Relaxed),
            served_chunks: self.served.load(Ordering::Relaxed),
            served_bytes: self.served_bytes.load(Ordering::Relaxed),
            fetched_chunks: self.fetched.load(Ordering::Relaxed),
            resumed_chunks: self.resumed.load(Ordering::Relaxed),
            refused_requests: self.refused.load(Ordering::Relaxed),
            refused_connections: self.refused_connections.load(Ordering::Relaxed),
            accepted_connections: self.accepted_connections.load(Ordering::Relaxed),
        }
    }

    pub fn proofs(&self) -> &Arc<Proofs> {
        &self.proofs
    }

    /// One request to member `to`'s node server, signed by this daemon; its answer is
    /// read up to `limit` bytes. A POST (a small announcement) gets a shorter deadline.
    pub(super) async fn signed(
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
        exchange(&self.pool, addr, req.body(Full::new(body)), deadline, limit).await
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

    /// The shortest wait lately for an answer from member `from` over the hop `via`
    /// (see [`Pool::round_trip`]).
    pub(super) fn round_trip(&self, dir: &Directory, from: &Key, via: Via) -> Option<Duration> {
        let peer = dir.get(from)?;
        let addr = match via {
            Via::Tunnel => SocketAddr::from((peer.vpn, NODE_PORT)),
            Via::Lan => peer.relay?,
        };
        self.pool.round_trip(addr)
    }

    /// Asks `from` for a chunk over the hop `via`, and checks it.
    pub(super) async fn fetch_from(
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
        match via {
            Via::Tunnel => &self.fetched_tunnel,
            Via::Lan => &self.fetched_lan,
        }
        .fetch_add(1, Ordering::Relaxed);
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
            &self.pool,
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
}

/// The one path of the LAN relay: what is asked is in the sealed body, not the URL.
pub(super) const RELAY_PATH: &str = "/v1/relay";
/// What sealing adds to a body: the AEAD's tag.
pub(super) const SEAL_OVERHEAD: u64 = 16;

pub(super) fn fresh_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// One request on a kept connection to `addr` (see [`Pool`]), or a new one made within
/// the pool's connect deadline; the whole exchange, waiting for a free connection
/// included, within `deadline`. A status other than 2xx is an error, and so is an answer
/// longer than `limit` bytes, which is never read past it. A reused connection that fails
/// before the answer's head came (the server closed it while idle) is replaced by a fresh
/// one and the request sent once more; a failure after that is the caller's. Only a
/// connection whose answer was read whole goes back to the pool.
pub(super) async fn exchange(
    pool: &Pool,
    addr: SocketAddr,
    req: Result<Request<Full<Bytes>>, hyper::http::Error>,
    deadline: Duration,
    limit: u64,
) -> Result<Bytes, TransferError> {
    let fail = |e: String| TransferError::Connect(addr, e);
    let (mut parts, body) = req.map_err(|e| fail(e.to_string()))?.into_parts();
    parts.headers.insert(
        hyper::header::HOST,
        hyper::header::HeaderValue::from_static("watchalong"),
    );
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    // The request again, for the one retry: a body of `Bytes` is cheap to send twice.
    let again = || {
        let mut r = Request::new(Full::new(body.clone()));
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.version_mut() = parts.version;
        *r.headers_mut() = parts.headers.clone();
        r
    };
    let work = async {
        let unreachable = |e| TransferError::Unreachable(addr, e);
        let mut conn = pool.get(addr).await.map_err(unreachable)?;
        let asked = std::time::Instant::now();
        let resp = match conn.sender().send_request(again()).await {
            Ok(r) => r,
            Err(e) if conn.reused => {
                log::debug!("kept connection to {addr} failed ({e}); on a fresh one");
                conn = pool.replace(conn).await.map_err(unreachable)?;
                conn.sender()
                    .send_request(again())
                    .await
                    .map_err(|e| fail(e.to_string()))?
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        pool.saw_wait(addr, asked.elapsed());
        let status = resp.status();
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            // Dropped with its unread answer: never reused.
            drop(conn);
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
        // Read whole: the connection is ready for the next request, whatever the status.
        pool.put(conn);
        if !status.is_success() {
            return Err(TransferError::Status(addr, status.as_u16()));
        }
        Ok(body)
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| fail("no answer in time".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on a free loopback port that reads one request's head, writes `answer`
    /// and keeps the connection open until the client goes.
    async fn answer_once(answer: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&b[..n]);
            }
            s.write_all(answer).await.unwrap();
            // Held open: a client that waited for more would wait until its deadline.
            let _ = s.read(&mut b).await;
        });
        addr
    }

    fn get() -> Result<Request<Full<Bytes>>, hyper::http::Error> {
        Request::get("/v1/x").body(Full::new(Bytes::new()))
    }

    const LONG: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn an_answer_declaring_more_than_the_limit_is_refused_without_reading_its_body() {
        // The body never comes: reading it would end in a timeout, not in TooLarge.
        let addr = answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n").await;
        let r = exchange(&Pool::new(4), addr, get(), LONG, 999).await;
        assert!(
            matches!(r, Err(TransferError::TooLarge(a, 999)) if a == addr),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_of_no_declared_length_is_cut_off_at_the_limit() {
        let addr = answer_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n",
        )
        .await;
        let r = exchange(&Pool::new(4), addr, get(), LONG, 10).await;
        assert!(matches!(r, Err(TransferError::TooLarge(_, 10))), "{r:?}");
    }

    #[tokio::test]
    async fn an_answer_exactly_at_the_limit_is_returned_whole() {
        let addr = answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let r = exchange(&Pool::new(4), addr, get(), LONG, 5).await;
        assert_eq!(r.unwrap(), Bytes::from_static(b"hello"));
    }

    #[tokio::test]
    async fn a_status_other_than_success_is_an_error_naming_the_status() {
        let addr = answer_once(b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope").await;
        let r = exchange(&Pool::new(4), addr, get(), LONG, 1024).await;
        assert!(
            matches!(r, Err(TransferError::Status(a, 404)) if a == addr),
            "{r:?}"
        );
    }
}

/// The pool under [`exchange`], on loopback: kept connections reused, bounded per
/// address, replaced when the server closed them.
#[cfg(test)]
mod pooled {
    use super::*;
    use hyper::Response;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;

    const LONG: Duration = Duration::from_secs(20);

    fn get() -> Result<Request<Full<Bytes>>, hyper::http::Error> {
        Request::get("/v1/x").body(Full::new(Bytes::new()))
    }

    /// The house's bounded server on a free loopback port, answering "ok" once `gate`
    /// lets each request through; it counts connections taken in and requests begun.
    struct Served {
        addr: SocketAddr,
        connections: Arc<AtomicU64>,
        requests: Arc<AtomicU64>,
        cancel: CancellationToken,
    }

    async fn served(gate: Arc<Semaphore>) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let cancel = CancellationToken::new();
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(crate::net::server::serve(
            listener,
            cancel.clone(),
            crate::net::server::PEERS,
            |_, _| true,
            move |_req, _, _| {
                let (gate, r) = (gate.clone(), r.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _pass = gate.acquire().await;
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                }
            },
            || {},
            move || {
                c.fetch_add(1, Ordering::SeqCst);
            },
        ));
        Served {
            addr,
            connections,
            requests,
            cancel,
        }
    }

    fn open_gate() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
    }

    #[tokio::test]
    async fn requests_one_after_another_to_one_address_share_one_connection() {
        let s = served(open_gate()).await;
        let pool = Pool::new(4);
        for _ in 0..5 {
            let b = exchange(&pool, s.addr, get(), LONG, 1024).await.unwrap();
            assert_eq!(b, Bytes::from_static(b"ok"));
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.opened(), 1);
        assert!(pool.round_trip(s.addr).is_some());
        s.cancel.cancel();
    }

    #[tokio::test]
    async fn no_more_than_the_bound_of_connections_to_one_address_are_opened_and_the_rest_wait() {
        let gate = Arc::new(Semaphore::new(0));
        let s = served(gate.clone()).await;
        let pool = Arc::new(Pool::new(2));
        let mut asks = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let (pool, addr) = (pool.clone(), s.addr);
            asks.spawn(async move { exchange(&pool, addr, get(), LONG, 1024).await });
        }
        // Two requests reach the server and are held there; the other four wait for them.
        let until = Instant::now() + LONG;
        while s.requests.load(Ordering::SeqCst) < 2 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(s.requests.load(Ordering::SeqCst), 2);
        gate.add_permits(Semaphore::MAX_PERMITS / 2);
        while let Some(r) = asks.join_next().await {
            assert_eq!(r.unwrap().unwrap(), Bytes::from_static(b"ok"));
        }
        assert_eq!(s.requests.load(Ordering::SeqCst), 6);
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        s.cancel.cancel();
    }

    /// A server that answers the first request of each connection and closes the
    /// connection unanswered when the next request arrives (as a server closing a kept
    /// connection gone idle does, just as the client sends on it); it counts connections.
    async fn answers_once_per_connection() -> (SocketAddr, Arc<AtomicU64>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let counted = n.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for answered in [true, false] {
                        let mut head = Vec::new();
                        let mut b = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&b[..n]),
                            }
                        }
                        if answered {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                    // Dropped here, the second request unanswered.
                });
            }
        });
        (addr, n)
    }

    #[tokio::test]
    async fn a_kept_connection_closed_as_a_request_is_sent_is_replaced_and_every_request_is_answered(
    ) {
        let (addr, connections) = answers_once_per_connection().await;
        let pool = Pool::new(4);
        for i in 1..=4u64 {
            let r = exchange(&pool, addr, get(), LONG, 1024).await;
            assert_eq!(r.unwrap(), Bytes::from_static(b"ok"), "request {i}");
            // The first request opens a connection; each later one finds the kept
            // connection dead on arrival and is answered on a fresh one.
            assert_eq!(connections.load(Ordering::SeqCst), i);
        }
    }

    #[tokio::test]
    async fn an_answer_past_its_limit_leaves_its_connection_out_of_the_pool() {
        let s = served(open_gate()).await;
        let pool = Pool::new(4);
        let r = exchange(&pool, s.addr, get(), LONG, 1).await;
        assert!(matches!(r, Err(TransferError::TooLarge(_, 1))), "{r:?}");
        exchange(&pool, s.addr, get(), LONG, 1024).await.unwrap();
        assert_eq!(pool.opened(), 2);
        s.cancel.cancel();
    }
}
