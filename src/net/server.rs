//! The bounded HTTP/1 server loop behind every listener others can reach (the node
//! server, the LAN relay, the loopback stream endpoint): a header deadline (which also
//! closes a kept connection gone idle), a lifetime, connection caps in all and per source
//! address with eviction of idle connections, bytes of replies in flight per source,
//! accept errors backed off, refusals counted and logged at a bounded rate. It owns
//! connection bookkeeping only: what a request means and who may send it is the caller's.
//!
//! A connection counts as busy — safe from eviction — only while a request the caller
//! accepted is being answered, up to the last byte of its reply. The caller says when a
//! request is accepted ([`mark_busy`], after its proof passed), so a stranger dribbling an
//! unproven body, or holding a reply unread, never protects its connection.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::base::lock::Recover;
use crate::base::logging::Throttle;

/// What one server allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once, and from one source address.
    pub connections: usize,
    pub per_source: usize,
    /// A request head must arrive within this long, also between requests on a kept
    /// connection.
    pub header_timeout: Duration,
    /// A connection is closed this long after it opened, whatever it does.
    pub lifetime: Option<Duration>,
    /// Whether a request counts as accepted (busy) from its first byte, for servers with
    /// no proof to wait for.
    pub busy_from_start: bool,
}

/// The node server and the LAN relay: every request proven by the caller. A member keeps
/// its connection for many requests (see `data::pool`, which drops an idle one before the
/// header deadline and retires one before the lifetime), but none lives past five minutes.
pub const PEERS: Limits = Limits {
    connections: 512,
    per_source: 32,
    header_timeout: Duration::from_secs(10),
    lifetime: Some(Duration::from_secs(300)),
    busy_from_start: false,
};

/// The loopback stream endpoint: a player's request streams a film for as long as it
/// plays.
pub const LOOPBACK: Limits = Limits {
    connections: 256,
    per_source: 64,
    header_timeout: Duration::from_secs(10),
    lifetime: None,
    busy_from_start: true,
};

/// Marks a connection busy for as long as it lives.
pub struct Busy(Arc<AtomicU64>);

impl Busy {
    fn new(n: &Arc<AtomicU64>) -> Busy {
        n.fetch_add(1, Ordering::Relaxed);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's busy count, in every request's extensions.
#[derive(Clone)]
struct ConnBusy(Arc<AtomicU64>);

/// Marks the connection a request came on busy: call it once the request is proven,
/// and keep the guard in the reply's body ([`Guarded`]).
pub fn mark_busy(ext: &hyper::http::Extensions) -> Option<Busy> {
    ext.get::<ConnBusy>().map(|c| Busy::new(&c.0))
}

/// A reply body that holds guards until its last byte is sent (or the connection dies).
pub struct Guarded<B> {
    body: B,
    guards: Vec<Box<dyn Send + Sync>>,
}

impl<B> Guarded<B> {
    pub fn new(body: B) -> Guarded<B> {
        Guarded {
            body,
            guards: Vec::new(),
        }
    }

    pub fn hold(mut self, guard: impl Send + Sync + 'static) -> Guarded<B> {
        self.guards.push(Box::new(guard));
        self
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Bytes of replies in flight per source address: a member that never reads what it
/// asked for cannot make this node hold more than `max` bytes for it.
pub struct Budget {
    max: u64,
    used: Mutex<HashMap<IpAddr, u64>>,
}

/// Bytes reserved from a [`Budget`], given back on drop.
pub struct Reserved {
    budget: Arc<Budget>,
    source: IpAddr,
    n: u64,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: Mutex::new(HashMap::new()),
        })
    }

    /// Reserves `n` bytes for `source`, unless that would pass the budget (a reply
    /// larger than the whole budget still passes alone).
    pub fn reserve(self: &Arc<Self>, source: IpAddr, n: u64) -> Option<Reserved> {
        let mut used = self.used.locked();
        let u = used.entry(source).or_insert(0);
        if *u > 0 && u.saturating_add(n) > self.max {
            return None;
        }
        *u = u.saturating_add(n);
        Some(Reserved {
            budget: self.clone(),
            source,
            n,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut used = self.budget.used.locked();
        if let Some(u) = used.get_mut(&self.source) {
            *u = u.saturating_sub(self.n);
            if *u == 0 {
                used.remove(&self.source);
            }
        }
    }
}

/// The connections a server holds, by source address, oldest first.
struct Slots {
    limits: Limits,
    inner: Mutex<SlotsInner>,
}

#[derive(Default)]
struct SlotsInner {
    next: u64,
    total: usize,
    by_source: HashMap<IpAddr, VecDeque<Held>>,
}

struct Held {
    id: u64,
    busy: Arc<AtomicU64>,
    close: CancellationToken,
}

struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
    id: u64,
    busy: Arc<AtomicU64>,
    close: CancellationToken,
}

impl SlotsInner {
    /// Closes the oldest idle connection from `source`; false when all are busy.
    fn evict(&mut self, source: &IpAddr) -> bool {
        let Some(list) = self.by_source.get_mut(source) else {
            return false;
        };
        let Some(i) = list
            .iter()
            .position(|c| c.busy.load(Ordering::Relaxed) == 0)
        else {
            return false;
        };
        if let Some(old) = list.remove(i) {
            old.close.cancel();
            self.total -= 1;
        }
        if list.is_empty() {
            self.by_source.remove(source);
        }
        true
    }
}

impl Slots {
    /// A slot for a new connection from `source`, and whether an idle one was closed to
    /// make room: at the source's cap its own oldest idle one; at the server's cap the
    /// oldest idle one of the source holding the most, so a crowd from a few addresses
    /// makes room for everyone else.
    fn take(self: &Arc<Self>, source: IpAddr) -> Option<(Slot, bool)> {
        let mut inner = self.inner.locked();
        let mut evicted = false;
        let held = inner.by_source.get(&source).map_or(0, VecDeque::len);
        if held >= self.limits.per_source {
            if !inner.evict(&source) {
                return None;
            }
            evicted = true;
        } else if inner.total >= self.limits.connections {
            let crowd = inner
                .by_source
                .iter()
                .max_by_key(|(_, l)| l.len())
                .map(|(ip, _)| *ip)?;
            if !inner.evict(&crowd) {
                return None;
            }
            evicted = true;
        }
        let id = inner.next;
        inner.next += 1;
        inner.total += 1;
        let (busy, close) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
        inner.by_source.entry(source).or_default().push_back(Held {
            id,
            busy: busy.clone(),
            close: close.clone(),
        });
        let slot = Slot {
            slots: self.clone(),
            source,
            id,
            busy,
            close,
        };
        Some((slot, evicted))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.locked();
        if let Some(list) = inner.by_source.get_mut(&self.source) {
            let before = list.len();
            list.retain(|c| c.id != self.id);
            let gone = before - list.len();
            if list.is_empty() {
                inner.by_source.remove(&self.source);
            }
            inner.total -= gone;
        }
    }
}

/// Runs an HTTP/1 server on `listener` until `cancel`: `admit` sees each connection's
/// addresses before anything is read (a refusal closes it unanswered), `refused` counts
/// connections closed for a cap or by `admit`, `took_in` those taken in, and every
/// connection is held to `limits`. A connection is kept open between requests (HTTP/1.1
/// keep-alive) until it idles past the header deadline, is evicted or lives its time.
/// Every reply body is wrapped in [`Guarded`].
pub async fn serve<A, F, Fut, B, R, C>(
    listener: TcpListener,
    cancel: CancellationToken,
    limits: Limits,
    admit: A,
    handle: F,
    refused: R,
    took_in: C,
) where
    A: Fn(SocketAddr, SocketAddr) -> bool,
    F: Fn(Request<Incoming>, SocketAddr, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send,
    B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: Fn(),
    C: Fn(),
{
    static ACCEPT_LOG: Throttle = Throttle::new(Duration::from_secs(10));
    static REFUSE_LOG: Throttle = Throttle::new(Duration::from_secs(10));
    let slots = Arc::new(Slots {
        limits,
        inner: Mutex::new(SlotsInner::default()),
    });
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = cancel.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::ZERO;
                x
            }
            Err(e) => {
                if let Some(held) = ACCEPT_LOG.allow() {
                    log::warn!("accept failed: {e} ({held} more failures since the last line)");
                }
                // Out of descriptors or memory: retrying at once only spins.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => continue,
                    () = cancel.cancelled() => break,
                }
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let slot = if admit(local, peer) {
            slots.take(peer.ip())
        } else {
            None
        };
        let slot = match slot {
            Some((slot, evicted)) => {
                if evicted {
                    refused();
                }
                slot
            }
            None => {
                refused();
                if let Some(held) = REFUSE_LOG.allow() {
                    log::info!(
                        "closed a connection from {peer} to {local}: over a connection cap or not served here ({held} more since the last line)"
                    );
                }
                continue;
            }
        };
        took_in();
        let handle = handle.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let (busy, close) = (slot.busy.clone(), slot.close.clone());
            let _slot = slot;
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let handle = handle.clone();
                let early = limits.busy_from_start.then(|| Busy::new(&busy));
                req.extensions_mut().insert(ConnBusy(busy.clone()));
                async move {
                    let resp = handle(req, local, peer).await;
                    Ok::<_, Infallible>(resp.map(|b| match early {
                        Some(guard) => Guarded::new(b).hold(guard),
                        None => Guarded::new(b),
                    }))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let lifetime = async {
                match limits.lifetime {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { log::debug!("connection from {peer}: {e}") },
                // Evicted to make room, or lived its time: dropped unanswered.
                () = close.cancelled() => {}
                () = lifetime => {}
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn slots(connections: usize, per_source: usize) -> Arc<Slots> {
        Arc::new(Slots {
            limits: Limits {
                connections,
                per_source,
                ..PEERS
            },
            inner: Mutex::new(SlotsInner::default()),
        })
    }

    fn ip(n: u8) -> IpAddr {
        Ipv4Addr::new(10, 0, 0, n).into()
    }

    #[test]
    fn at_a_sources_cap_its_oldest_idle_connection_makes_room_and_a_busy_one_never_does() {
        let slots = slots(1000, 4);
        let held: Vec<Slot> = (0..4)
            .map(|_| {
                let (s, evicted) = slots.take(ip(1)).expect("under the cap");
                assert!(!evicted);
                s
            })
            .collect();
        // The first is answering a proven request; the second is idle and goes.
        let _working = Busy::new(&held[0].busy);
        let (newer, evicted) = slots.take(ip(1)).expect("room made");
        assert!(evicted);
        assert!(!held[0].close.is_cancelled());
        assert!(held[1].close.is_cancelled());
        assert!(held[2..].iter().all(|s| !s.close.is_cancelled()));
        // Another source is not affected by the crowd.
        let (other, evicted) = slots.take(ip(2)).expect("its own cap");
        assert!(!evicted && !other.close.is_cancelled());
        // Every connection busy: nothing is evicted, the newcomer is refused.
        let _all: Vec<Busy> = held
            .iter()
            .chain([&newer])
            .map(|s| Busy::new(&s.busy))
            .collect();
        assert!(slots.take(ip(1)).is_none());
        drop((held, newer, other));
        let inner = slots.inner.lock().unwrap();
        assert!(inner.by_source.is_empty());
        assert_eq!(inner.total, 0);
    }

    #[test]
    fn at_the_servers_cap_the_biggest_crowd_gives_way_to_a_new_source() {
        let slots = slots(6, 5);
        let crowd: Vec<Slot> = (0..5).map(|_| slots.take(ip(1)).unwrap().0).collect();
        let (lone, _) = slots.take(ip(2)).unwrap();
        // Full: a third source gets in at the crowd's expense, not the lone one's.
        let (third, evicted) = slots.take(ip(3)).expect("room made");
        assert!(evicted);
        assert!(crowd[0].close.is_cancelled());
        assert!(!lone.close.is_cancelled() && !third.close.is_cancelled());
        drop((crowd, lone, third));
        assert_eq!(slots.inner.lock().unwrap().total, 0);
    }

    #[test]
    fn a_budget_holds_a_sources_reply_bytes_until_they_are_sent() {
        let b = Budget::new(100);
        let first = b.reserve(ip(1), 60).unwrap();
        assert!(b.reserve(ip(1), 60).is_none());
        // Another source has its own budget; a reply bigger than the budget passes alone.
        let big = b.reserve(ip(2), 500).unwrap();
        assert!(b.reserve(ip(2), 1).is_none());
        drop(first);
        assert!(b.reserve(ip(1), 60).is_some());
        drop(big);
        assert!(b.used.lock().unwrap().is_empty());
    }
}
