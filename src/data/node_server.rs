//! The servers members talk to: the node server on this node's VPN address (listings,
//! manifests, chunks, ranged reads of files, and the messages routed by
//! [`crate::data::messages`]) and the LAN relay (chunks for nearby members, sealed). Every
//! request is MAC-signed by the sending daemon (see [`crate::group::auth`]): the source
//! address alone proves nothing, since any user on a member can send from it. Every
//! server here is bounded: header and body deadlines, connection caps in all and per
//! source, body size limits both ways, a reply budget per member, throttled logging. It
//! verifies and answers; it must not know what a message means (its handler does) or
//! read files on the async workers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::base::logging::Throttle;
use crate::data::blocking::blocking;
use crate::data::client::{ChunkRequest, Engine, TransferError, MAX_CHUNK, RELAY_PATH};
use crate::data::directory::{Directory, Membership};
use crate::data::messages::Messages;
use crate::data::share::{RangeRead, ShareError, MAX_RANGE};
use crate::group::auth::{self, Direction};
use crate::group::identity::Key;
use crate::net::server::{self, Budget, Guarded};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A message (see [`Messages`]) POSTed to the node server.
const MAX_POST: usize = 4 * 1024 * 1024;
/// A sealed relay request (a chunk request as JSON) is small.
const MAX_RELAY_REQUEST: usize = 64 * 1024;
/// A request body must arrive within this long.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of chunk and file replies one member may have in flight from this node: one
/// that never reads what it asked for holds no more.
const REPLY_BUDGET: u64 = 64 * 1024 * 1024;

impl Engine {
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
}

/// A request header as text, empty when absent or not text.
fn header<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
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
            engine
                .served_bytes
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            engine.served_tunnel.fetch_add(1, Ordering::Relaxed);
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
        // Absent from older members; present but not a number is no request.
        offset: match q.get("offset") {
            Some(o) => Some(o.parse().ok()?),
            None => None,
        },
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
/// and the messages `messages` routes to their inboxes. Only connections to this node's VPN address from an
/// address inside the group's network are taken, only requests from a member's VPN
/// address are read, and only those that member's daemon signed are answered: any user
/// on that member can send from its address, but none can sign.
pub async fn serve_node<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    messages: Messages,
    cancel: CancellationToken,
) {
    let messages = Arc::new(messages);
    serve_peers(
        listener,
        engine,
        members,
        messages,
        cancel,
        PeerServer::Node,
    )
    .await
}

/// The LAN relay: chunks for members, every request signed and sealed; anyone else gets
/// 401. It answers on this node's LAN addresses, never on its VPN address or loopback.
pub async fn serve_relay<M: Membership>(
    listener: TcpListener,
    engine: Arc<Engine>,
    members: Arc<M>,
    cancel: CancellationToken,
) {
    // The relay takes chunk requests only: no message reaches it.
    let messages = Arc::new(Messages::new());
    serve_peers(
        listener,
        engine,
        members,
        messages,
        cancel,
        PeerServer::Relay,
    )
    .await
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
    messages: Arc<Messages>,
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
    let (counted, took) = (engine.clone(), engine.clone());
    server::serve(
        listener,
        cancel,
        server::PEERS,
        admit,
        move |req, _local, peer| {
            let (engine, members, budget) = (engine.clone(), members.clone(), budget.clone());
            let messages = messages.clone();
            async move {
                match kind {
                    PeerServer::Node => {
                        node_request(&engine, &*members, &messages, &budget, req, peer).await
                    }
                    PeerServer::Relay => {
                        relay_request(&engine, &*members, &budget, req, peer).await
                    }
                }
            }
        },
        move || {
            counted.refused_connections.fetch_add(1, Ordering::Relaxed);
        },
        move || {
            took.accepted_connections.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await
}

async fn node_request<M: Membership>(
    engine: &Arc<Engine>,
    members: &M,
    messages: &Messages,
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
        let r = match messages.deliver(path, from, body) {
            Ok(()) => reply(StatusCode::OK, Bytes::new()),
            Err(_) => reply(StatusCode::NOT_FOUND, Bytes::new()),
        };
        return plain(r);
    }
    let q = parse_query(parts.uri.query().unwrap_or(""));
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let (share, file) = (get("share"), get("path"));
    let shares = engine.shares.clone();
    let r = match path {
        "/v1/shares" => json(&engine.shares.list()),
        "/v1/ls" => match blocking(move || shares.ls(&share, &file)).await {
            Ok(v) => json(&v),
            Err(e) => error_reply(&e.into()),
        },
        "/v1/manifest" => match blocking(move || shares.manifest(&share, &file)).await {
            Ok(m) => json(&m),
            Err(e) => error_reply(&e.into()),
        },
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
            let ranged = range.is_some();
            match blocking(move || shares.read_range(&share, &file, range.as_deref())).await {
                Ok(r) => file_reply(r, ranged),
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
                engine
                    .served_bytes
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                engine.served_lan.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod served {
    use super::*;
    use crate::base::lock::Recover;
    use crate::data::client::exchange;
    use crate::group::auth::Proofs;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use x25519_dalek::StaticSecret;

    /// One member, `them`, at loopback; this node is `me`, on loopback too.
    struct OneMember {
        me: Key,
        them: Key,
    }

    impl Membership for OneMember {
        fn directory(&self) -> Directory {
            Directory {
                me: self.me,
                peers: Vec::new(),
            }
        }
        fn vpn(&self) -> (Ipv4Addr, ipnet::Ipv4Net) {
            (Ipv4Addr::LOCALHOST, "127.0.0.0/8".parse().unwrap())
        }
        fn member_at(&self, ip: IpAddr) -> Option<Key> {
            ip.is_loopback().then_some(self.them)
        }
        fn is_member(&self, key: &Key) -> bool {
            *key == self.them
        }
    }

    fn engine(secret: [u8; 32], cache: &std::path::Path) -> Arc<Engine> {
        Arc::new(Engine::new(
            crate::data::share::Shares::new(Vec::new(), crate::data::share::CHUNK_SIZE),
            Arc::new(Proofs::new(StaticSecret::from(secret))),
            0,
            cache.to_path_buf(),
            1 << 20,
        ))
    }

    /// A node server for `me` with a room inbox that records what reaches it, and the
    /// engine of the one member that may talk to it.
    async fn node_with_rooms() -> (
        SocketAddr,
        Arc<Engine>,
        Key,
        Arc<Mutex<Vec<(Key, Bytes)>>>,
        CancellationToken,
        tempfile::TempDir,
    ) {
        let d = tempfile::tempdir().unwrap();
        let (server, client) = (
            engine([1; 32], &d.path().join("a")),
            engine([2; 32], &d.path().join("b")),
        );
        let members = Arc::new(OneMember {
            me: server.proofs().public(),
            them: client.proofs().public(),
        });
        let got: Arc<Mutex<Vec<(Key, Bytes)>>> = Arc::default();
        let into = got.clone();
        let messages = Messages::new().route(
            "/v1/room",
            Arc::new(move |from, body| into.locked().push((from, body))),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve_node(
            listener,
            server.clone(),
            members,
            messages,
            cancel.clone(),
        ));
        (addr, client, server.proofs().public(), got, cancel, d)
    }

    #[tokio::test]
    async fn a_signed_message_reaches_the_inbox_of_its_path_with_the_member_who_sent_it() {
        let (addr, client, to, got, cancel, _d) = node_with_rooms().await;
        let body = Bytes::from_static(b"{\"play\":true}");
        client
            .signed(
                &to,
                addr,
                hyper::Method::POST,
                "/v1/room",
                body.clone(),
                1024,
            )
            .await
            .unwrap();
        assert_eq!(*got.locked(), vec![(client.proofs().public(), body)]);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_signed_message_to_a_path_without_an_inbox_is_answered_404() {
        let (addr, client, to, got, cancel, _d) = node_with_rooms().await;
        let r = client
            .signed(
                &to,
                addr,
                hyper::Method::POST,
                "/v1/sync",
                Bytes::new(),
                1024,
            )
            .await;
        assert!(matches!(r, Err(TransferError::Status(_, 404))), "{r:?}");
        assert!(got.locked().is_empty());
        cancel.cancel();
    }

    #[tokio::test]
    async fn an_unsigned_message_is_answered_401_and_reaches_no_inbox() {
        let (addr, client, _to, got, cancel, _d) = node_with_rooms().await;
        let req = Request::post("/v1/room").body(Full::new(Bytes::from_static(b"x")));
        let r = exchange(&client.pool, addr, req, Duration::from_secs(20), 1024).await;
        assert!(matches!(r, Err(TransferError::Status(_, 401))), "{r:?}");
        assert!(got.locked().is_empty());
        cancel.cancel();
    }
}
