//! The control API's server side: the route table (the one place each call's method and
//! path are written, which the client builds its requests from too), the Unix-socket
//! HTTP/1.1 server, who may make which call, and the mapping of errors to HTTP status
//! codes. What each call does is the [`Handler`]'s business; this module must not reach
//! into the daemon. The listener is bound by the caller, so tests can bind their own.
//!
//! Who calls is the kernel's word ([`Caller`], in `caller.rs`), never the request's:
//! any user who can open the socket may read (status, peers, ls, plan, rooms); only root
//! and members of `[control] group` may change anything (links, removals, joins, peers,
//! gets, watching), and a `get` writes only where its caller could write.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::api::*;
pub use super::caller::Caller;
use crate::group::link::InviteId;

const MAX_BODY: usize = 64 * 1024;

/// Every call of the control API. [`Route::spec`] is the one place its method and path
/// are written: the server finds calls with it and the client builds requests from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Status,
    CreateLink,
    ListLinks,
    RevokeLink,
    Join,
    AddPeer,
    RemovePeer,
    Peers,
    RemoveMember,
    Gossip,
    InjectGossip,
    Ls,
    Plan,
    StartGet,
    Transfers,
    Transfer,
    TransferFile,
    DropTransferFile,
    Watch,
    RoomReport,
    RoomWait,
    RoomLeave,
    Rooms,
    Versions,
    Release,
    Restore,
}

/// The place in a path pattern that an id fills.
const ID: &str = "{id}";

impl Route {
    pub const ALL: [Route; 26] = [
        Route::Status,
        Route::CreateLink,
        Route::ListLinks,
        Route::RevokeLink,
        Route::Join,
        Route::AddPeer,
        Route::RemovePeer,
        Route::Peers,
        Route::RemoveMember,
        Route::Gossip,
        Route::InjectGossip,
        Route::Ls,
        Route::Plan,
        Route::StartGet,
        Route::Transfers,
        Route::Transfer,
        Route::TransferFile,
        Route::DropTransferFile,
        Route::Watch,
        Route::RoomReport,
        Route::RoomWait,
        Route::RoomLeave,
        Route::Rooms,
        Route::Versions,
        Route::Release,
        Route::Restore,
    ];

    /// The call's method and path pattern (`{id}` stands for one path segment).
    pub fn spec(self) -> (Method, &'static str) {
        use Route::*;
        match self {
            Status => (Method::GET, "/v1/status"),
            CreateLink => (Method::POST, "/v1/links"),
            ListLinks => (Method::GET, "/v1/links"),
            RevokeLink => (Method::DELETE, "/v1/links/{id}"),
            Join => (Method::POST, "/v1/join"),
            AddPeer => (Method::POST, "/v1/peers"),
            RemovePeer => (Method::POST, "/v1/peers/remove"),
            Peers => (Method::GET, "/v1/peers"),
            RemoveMember => (Method::POST, "/v1/remove"),
            Gossip => (Method::GET, "/v1/gossip"),
            InjectGossip => (Method::POST, "/v1/debug/gossip"),
            Ls => (Method::POST, "/v1/ls"),
            Plan => (Method::POST, "/v1/plan"),
            StartGet => (Method::POST, "/v1/get"),
            Transfers => (Method::GET, "/v1/transfers"),
            Transfer => (Method::GET, "/v1/transfers/{id}"),
            TransferFile => (Method::GET, "/v1/transfers/{id}/file"),
            DropTransferFile => (Method::DELETE, "/v1/transfers/{id}/file"),
            Watch => (Method::POST, "/v1/watch"),
            RoomReport => (Method::POST, "/v1/room/report"),
            RoomWait => (Method::POST, "/v1/room/wait"),
            RoomLeave => (Method::POST, "/v1/room/leave"),
            Rooms => (Method::GET, "/v1/rooms"),
            Versions => (Method::POST, "/v1/versions"),
            Release => (Method::POST, "/v1/sync/release"),
            Restore => (Method::POST, "/v1/restore"),
        }
    }

    /// Whether anyone who can open the socket may make this call: it changes nothing.
    pub fn reads(self) -> bool {
        self.spec().0 == Method::GET
            || matches!(
                self,
                Route::Ls | Route::Plan | Route::Versions | Route::RoomWait
            )
    }

    /// The path of this call, with `id` in the place of `{id}` (ignored by routes
    /// without one).
    pub fn path(self, id: &str) -> String {
        self.spec().1.replace(ID, id)
    }

    /// The call `method` and `path` name, and the id in its path (empty when none).
    pub fn find(method: &Method, path: &str) -> Option<(Route, String)> {
        let segs = segments(path);
        Route::ALL.into_iter().find_map(|r| {
            let (m, pattern) = r.spec();
            if m != method {
                return None;
            }
            let want = segments(pattern);
            if want.len() != segs.len() {
                return None;
            }
            let mut id = String::new();
            for (w, s) in want.iter().zip(&segs) {
                if *w == ID {
                    id = s.to_string();
                } else if w != s {
                    return None;
                }
            }
            Some((r, id))
        })
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_matches('/').split('/').collect()
}

/// An error a handler returns: the HTTP status it maps to, and its cause.
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Shown whole to the user; not chained as a `source`, which would print it twice.
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ApiError {
            status,
            cause: source.into(),
        }
    }
    pub fn bad_request(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e)
    }
    pub fn conflict(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StatusCode::CONFLICT, e)
    }
    pub fn not_found(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, e)
    }
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    }
}

/// What the daemon does for each call.
pub trait Handler: Send + Sync + 'static {
    fn status(&self) -> impl Future<Output = Result<StatusReply, ApiError>> + Send;
    fn create_link(
        &self,
        req: LinkRequest,
    ) -> impl Future<Output = Result<LinkReply, ApiError>> + Send;
    fn list_links(&self) -> impl Future<Output = Result<Vec<InviteView>, ApiError>> + Send;
    fn revoke_link(&self, id: InviteId) -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn join(&self, req: JoinRequest) -> impl Future<Output = Result<JoinReply, ApiError>> + Send;
    fn add_peer(&self, req: PeerAddRequest)
        -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn remove_peer(
        &self,
        req: PeerRemoveRequest,
    ) -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn peers(&self) -> impl Future<Output = Result<PeersReply, ApiError>> + Send;
    fn remove_member(
        &self,
        req: RemoveRequest,
    ) -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn gossip(&self) -> impl Future<Output = Result<GossipReply, ApiError>> + Send;
    fn inject_gossip(
        &self,
        req: InjectRequest,
    ) -> impl Future<Output = Result<GossipReply, ApiError>> + Send;
    fn ls(&self, target: String) -> impl Future<Output = Result<LsReply, ApiError>> + Send;
    fn plan(&self, req: PlanRequest) -> impl Future<Output = Result<PlanReply, ApiError>> + Send;
    /// `caller` is who asked: the file goes only where that user could write it.
    fn start_get(
        &self,
        req: GetRequest,
        caller: &Caller,
    ) -> impl Future<Output = Result<GetReply, ApiError>> + Send;
    fn transfer(&self, id: String) -> impl Future<Output = Result<TransferView, ApiError>> + Send;
    fn transfers(&self) -> impl Future<Output = Result<Vec<TransferView>, ApiError>> + Send;
    /// Up to [`FILE_PIECE`] bytes of a finished transfer's handed-over file, from `offset`:
    /// the CLI writes the destination itself, with its user's rights, from these.
    /// Only the user who started the transfer (or root) may read or drop its file.
    fn transfer_file(
        &self,
        id: String,
        offset: u64,
        caller: &Caller,
    ) -> impl Future<Output = Result<Bytes, ApiError>> + Send;
    /// Deletes a handed-over file once the CLI holds it.
    fn drop_transfer_file(
        &self,
        id: String,
        caller: &Caller,
    ) -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn watch(&self, req: FileRequest) -> impl Future<Output = Result<WatchReply, ApiError>> + Send;
    fn room_report(&self, req: Report) -> impl Future<Output = Result<RoomView, ApiError>> + Send;
    fn room_wait(
        &self,
        req: WaitRequest,
    ) -> impl Future<Output = Result<RoomView, ApiError>> + Send;
    fn room_leave(&self, req: FileRequest) -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn rooms(&self) -> impl Future<Output = Result<Vec<RoomView>, ApiError>> + Send;
    fn versions(
        &self,
        req: VersionsRequest,
    ) -> impl Future<Output = Result<Vec<Kept>, ApiError>> + Send;
    /// Lets a share's held deletions through.
    fn release(&self, req: VersionsRequest)
        -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn restore(&self, req: VersionsRequest) -> impl Future<Output = Result<Kept, ApiError>> + Send;
}

/// Serves the control API on `listener` until `cancel`. `admin` is the group whose members
/// may change the node besides root. Connections in flight are awaited.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    admin: Option<u32>,
    cancel: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("control socket accept failed: {e}");
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let handler = handler.clone();
        let cancel = cancel.clone();
        let caller = Arc::new(Caller::of(&stream));
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let (handler, caller) = (handler.clone(), caller.clone());
                async move { Ok::<_, Infallible>(route(&*handler, req, &caller, admin).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { log::debug!("control connection: {e}") },
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}

/// One request, from whatever body (the server's, or a test's).
async fn route<H: Handler, B>(
    h: &H,
    req: Request<B>,
    caller: &Caller,
    admin: Option<u32>,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let found = Route::find(&method, &path);
    // A call this server does not know changes the node unless it is a GET: a stranger
    // learns no more from a bad path than from a good one.
    let reads = method == Method::GET || found.as_ref().is_some_and(|(r, _)| r.reads());
    if !reads && !caller.may_change(admin) {
        let call = segments(&path)
            .get(1..)
            .map(|s| s.join(" "))
            .unwrap_or_default();
        let who = if admin.is_some() {
            "root or a member of the node's control group"
        } else {
            "root (or a member of a group set as [control] group in the configuration)"
        };
        return error_response(&ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "`{call}` changes this node, which only {who} may do; user {} may read (status, peers, ls, plan, rooms)",
                caller.uid
            ),
        ));
    }
    let req_query = req.uri().query().map(str::to_string);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let res = match found {
        Some((r, id)) => dispatch(h, r, id, req_query.as_deref(), &body, caller).await,
        None => Err(ApiError::not_found(format!(
            "no such call: {method} {path}"
        ))),
    };
    match res {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

/// Hands call `r` to the handler: its body parsed into the call's request type, its
/// reply serialized.
async fn dispatch<H: Handler>(
    h: &H,
    r: Route,
    id: String,
    query: Option<&str>,
    body: &[u8],
    caller: &Caller,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match r {
        Route::Status => reply(h.status().await),
        Route::CreateLink => reply(h.create_link(parse(body)?).await),
        Route::ListLinks => reply(h.list_links().await),
        Route::RevokeLink => match id.parse::<InviteId>() {
            Ok(id) => reply(h.revoke_link(id).await),
            Err(_) => Err(ApiError::bad_request(format!(
                "`{id}` is not an invite id (16 hex digits, as `watchalong links` shows)"
            ))),
        },
        Route::Join => reply(h.join(parse(body)?).await),
        Route::AddPeer => reply(h.add_peer(parse(body)?).await),
        Route::RemovePeer => reply(h.remove_peer(parse(body)?).await),
        Route::Peers => reply(h.peers().await),
        Route::RemoveMember => reply(h.remove_member(parse(body)?).await),
        Route::Gossip => reply(h.gossip().await),
        Route::InjectGossip => reply(h.inject_gossip(parse(body)?).await),
        Route::Ls => reply(h.ls(parse::<PlanRequest>(body)?.target).await),
        Route::Plan => reply(h.plan(parse(body)?).await),
        Route::StartGet => reply(h.start_get(parse(body)?, caller).await),
        Route::Transfers => reply(h.transfers().await),
        Route::Transfer => reply(h.transfer(id).await),
        Route::TransferFile => {
            let offset = offset_of(query)?;
            h.transfer_file(id, offset, caller)
                .await
                .map(bytes_response)
        }
        Route::DropTransferFile => reply(h.drop_transfer_file(id, caller).await),
        Route::Watch => reply(h.watch(parse(body)?).await),
        Route::RoomReport => reply(h.room_report(parse(body)?).await),
        Route::RoomWait => reply(h.room_wait(parse(body)?).await),
        Route::RoomLeave => reply(h.room_leave(parse(body)?).await),
        Route::Rooms => reply(h.rooms().await),
        Route::Versions => reply(h.versions(parse(body)?).await),
        Route::Release => reply(h.release(parse(body)?).await),
        Route::Restore => reply(h.restore(parse(body)?).await),
    }
}

async fn read_body<B>(req: Request<B>) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let collected = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?;
    Ok(collected.to_bytes())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::bad_request)
}

fn reply<T: Serialize>(r: Result<T, ApiError>) -> Result<Response<Full<Bytes>>, ApiError> {
    let value = r?;
    let body = serde_json::to_vec(&value).map_err(ApiError::internal)?;
    Ok(json_response(StatusCode::OK, body))
}

/// `offset=N` from a query string; no query means 0.
fn offset_of(query: Option<&str>) -> Result<u64, ApiError> {
    let Some(q) = query else { return Ok(0) };
    q.strip_prefix("offset=")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ApiError::bad_request("expected ?offset=N, a byte offset"))
}

fn bytes_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: e.to_string(),
    })
    .unwrap_or_default();
    json_response(e.status, body)
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
