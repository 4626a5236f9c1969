//! Kept-alive HTTP/1.1 connections to other members' servers (node servers over the tunnel,
//! LAN relays), by address: a connection that answered is kept idle for a while and reused,
//! so a transfer pays one TCP handshake and one slow start per peer, not per chunk. At
//! most `per_peer` connections to one address are in use at once (more askers wait for
//! one), an idle one is dropped before the server's own idle and lifetime deadlines would
//! close it, and a connection that cannot be made is logged once per address until one
//! is made again. It also keeps, per address, the shortest wait for an answer's head seen
//! lately (the path's round trip, for the `get` window). It owns connections only: what
//! is asked and how much of an answer is read is the caller's ([`super::client`]), and it
//! must not do I/O under its lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::base::lock::Recover;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An idle connection is dropped after this long: under the servers' header deadline
/// (10 s, which closes a kept connection gone idle), so a reused connection is rarely one
/// the server is closing.
const IDLE_FOR: Duration = Duration::from_secs(5);
/// A connection is not reused past this age: under the node server's lifetime (300 s),
/// which cuts a connection whatever it is doing, even mid-answer.
const MAX_AGE: Duration = Duration::from_secs(120);
/// The shortest wait for an answer is kept this long. The first answers of a transfer
/// come over a quiet path; later ones wait behind the transfer's own chunks in the path's
/// queues, and a window sized from those would grow with its own queue. Long enough to
/// keep the quiet sample through a transfer, short enough to follow a route that changed.
const RTT_FOR: Duration = Duration::from_secs(60);
/// Addresses remembered at most (members' VPN and LAN addresses); past it the table
/// is cleared of addresses with nothing idle or in use.
const MAX_ADDRESSES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// One live HTTP/1.1 connection; its driver task ends with it.
struct Link {
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    born: Instant,
    idle_since: Instant,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the sender closes an idle connection; aborting also stops one whose
        // answer was left unread (over its limit, or past its deadline).
        self.driver.abort();
    }
}

/// One address's connections: the idle ones, newest last, and the gate that bounds those
/// in use.
struct Peer {
    idle: Vec<Link>,
    gate: Arc<Semaphore>,
    failing: bool,
    rtt: Option<(Duration, Instant)>,
}

/// The connections of one engine to every address it talks to.
pub struct Pool {
    per_peer: usize,
    peers: std::sync::Mutex<HashMap<SocketAddr, Peer>>,
    opened: std::sync::atomic::AtomicU64,
}

/// A connection in use: given back with [`Pool::put`] once its answer was read whole,
/// else dropped (and closed) with it.
pub struct Conn {
    pub addr: SocketAddr,
    link: Link,
    /// It served a request before: a failure before its answer began may only mean the
    /// server closed it while idle, and is worth one try on a fresh connection.
    pub reused: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    pub fn sender(&mut self) -> &mut SendRequest<Full<Bytes>> {
        &mut self.link.sender
    }
}

impl Pool {
    pub fn new(per_peer: usize) -> Pool {
        Pool {
            per_peer: per_peer.max(1),
            peers: std::sync::Mutex::new(HashMap::new()),
            opened: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Connections this pool opened, ever.
    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn gate(&self, addr: SocketAddr) -> Arc<Semaphore> {
        let mut peers = self.peers.locked();
        if peers.len() >= MAX_ADDRESSES && !peers.contains_key(&addr) {
            peers.retain(|_, p| {
                !p.idle.is_empty() || p.gate.available_permits() < self.per_peer || p.failing
            });
        }
        peers
            .entry(addr)
            .or_insert_with(|| Peer {
                idle: Vec::new(),
                gate: Arc::new(Semaphore::new(self.per_peer)),
                failing: false,
                rtt: None,
            })
            .gate
            .clone()
    }

    /// A connection to `addr`: an idle one that is still open, else a new one. Waits
    /// while `per_peer` connections to `addr` are in use (the caller's deadline bounds it).
    pub async fn get(&self, addr: SocketAddr) -> Result<Conn, PoolError> {
        let gate = self.gate(addr);
        // The gate is never closed, so acquiring only waits.
        let permit = loop {
            if let Ok(p) = gate.clone().acquire_owned().await {
                break p;
            }
        };
        let now = Instant::now();
        let kept = {
            let mut peers = self.peers.locked();
            let mut found = None;
            if let Some(p) = peers.get_mut(&addr) {
                // Dead or stale links found here are dropped after the lock is let go.
                let mut stale = Vec::new();
                while let Some(l) = p.idle.pop() {
                    if usable(&l, now) {
                        found = Some(l);
                        break;
                    }
                    stale.push(l);
                }
                drop(peers);
                drop(stale);
            }
            found
        };
        match kept {
            Some(mut link) => {
                // A kept connection is idle, so ready at once unless it just closed.
                if link.sender.ready().await.is_ok() {
                    return Ok(Conn {
                        addr,
                        link,
                        reused: true,
                        _permit: permit,
                    });
                }
                link.driver.abort();
                self.fresh_with(addr, permit).await
            }
            None => self.fresh_with(addr, permit).await,
        }
    }

    /// A new connection in place of `old`, which failed (its slot is kept).
    pub async fn replace(&self, old: Conn) -> Result<Conn, PoolError> {
        let Conn {
            addr,
            link,
            _permit,
            ..
        } = old;
        drop(link);
        self.fresh_with(addr, _permit).await
    }

    async fn fresh_with(
        &self,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Conn, PoolError> {
        match connect(addr).await {
            Ok(link) => {
                self.opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let back = self
                    .peers
                    .locked()
                    .get_mut(&addr)
                    .is_some_and(|p| std::mem::replace(&mut p.failing, false));
                if back {
                    log::info!("{addr} is reachable again");
                }
                Ok(Conn {
                    addr,
                    link,
                    reused: false,
                    _permit: permit,
                })
            }
            Err(e) => {
                let first = self
                    .peers
                    .locked()
                    .get_mut(&addr)
                    .is_some_and(|p| !std::mem::replace(&mut p.failing, true));
                // Once per address until it answers again: a transfer retrying every
                // chunk must not write a line per chunk.
                if first {
                    log::warn!("cannot connect to {addr}: {e}; retrying quietly until it answers");
                }
                Err(e)
            }
        }
    }

    /// Gives back a connection whose answer was read whole, to be reused.
    pub fn put(&self, conn: Conn) {
        let Conn { addr, mut link, .. } = conn;
        let now = Instant::now();
        if link.sender.is_closed() || now.duration_since(link.born) >= MAX_AGE {
            return;
        }
        link.idle_since = now;
        let mut peers = self.peers.locked();
        if let Some(p) = peers.get_mut(&addr) {
            if p.idle.len() < self.per_peer {
                p.idle.push(link);
                return;
            }
        }
        drop(peers);
    }

    /// Records how long an answer's head took to come from `addr`.
    pub fn saw_wait(&self, addr: SocketAddr, waited: Duration) {
        let now = Instant::now();
        if let Some(p) = self.peers.locked().get_mut(&addr) {
            p.rtt = match p.rtt {
                Some((d, at)) if d <= waited && now.duration_since(at) < RTT_FOR => Some((d, at)),
                _ => Some((waited, now)),
            };
        }
    }

    /// The shortest wait for an answer from `addr` seen lately: the round trip of the
    /// path, plus whatever the server takes to have the answer ready.
    pub fn round_trip(&self, addr: SocketAddr) -> Option<Duration> {
        self.peers
            .locked()
            .get(&addr)
            .and_then(|p| p.rtt)
            .map(|(d, _)| d)
    }
}

fn usable(l: &Link, now: Instant) -> bool {
    !l.sender.is_closed()
        && now.duration_since(l.idle_since) < IDLE_FOR
        && now.duration_since(l.born) < MAX_AGE
}

async fn connect(addr: SocketAddr) -> Result<Link, PoolError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PoolError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(PoolError::Connect)?;
    // Chunk requests are small and answered at once: never hold one back.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(PoolError::Handshake)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("connection to {addr}: {e}");
        }
    });
    let now = Instant::now();
    Ok(Link {
        sender,
        driver,
        born: now,
        idle_since: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::client::{exchange, TransferError};
    use hyper::{Request, Response};
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
