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
