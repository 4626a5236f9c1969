//! The control API's server side: the route table (the one place each call's method and
//! path are written, which the client builds its requests from too), the Unix-socket
//! HTTP/1.1 server, who may make which call, and the mapping of errors to HTTP status
//! codes. What each call does is the [`Handler`]'s business; this module must not reach
//! into the daemon. The listener is bound by the caller, so tests can bind their own.
//!
//! Who calls is the kernel's word ([`Caller`], from `SO_PEERCRED`), never the request's:
//! any user who can open the socket may read (status, peers, ls, plan, rooms); only root
//! and members of `[control] group` may change anything (links, removals, joins, peers,
//! gets, watching), and a `get` writes only where its caller could write.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::api::*;
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

/// Who is on the other end of a control connection, as the kernel saw it connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database, or `/proc/PID/status`).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The peer of `stream`; a peer the kernel cannot name is nobody in particular.
    fn of(stream: &UnixStream) -> Caller {
        match stream.peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                gid: c.gid(),
                groups: supplementary_groups(c.uid(), c.gid(), c.pid()),
            },
            Err(_) => Caller {
                uid: u32::MAX,
                gid: u32::MAX,
                groups: Vec::new(),
            },
        }
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether this caller may change the node: root, or a member of `admin`.
    pub fn may_change(&self, admin: Option<u32>) -> bool {
        self.uid == 0 || admin.is_some_and(|g| self.in_group(g))
    }

    /// Whether this caller could create and replace files in `dir` itself: every folder
    /// on the way searchable, `dir` writable, by the mode bits that apply to it (ACLs
    /// are not read: a user they alone let in is refused, never the other way).
    pub fn may_write_in(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.uid == 0 {
            return true;
        }
        let bits = |m: &std::fs::Metadata| {
            let mode = m.mode();
            if m.uid() == self.uid {
                (mode >> 6) & 0o7
            } else if self.in_group(m.gid()) {
                (mode >> 3) & 0o7
            } else {
                mode & 0o7
            }
        };
        for a in dir.ancestors().skip(1) {
            match std::fs::metadata(a) {
                Ok(m) if bits(&m) & 0o1 != 0 => {}
                _ => return false,
            }
        }
        match std::fs::metadata(dir) {
            Ok(m) => m.is_dir() && bits(&m) & 0o3 == 0o3,
            Err(_) => false,
        }
    }
}

/// The groups user `uid` belongs to, from the user and group databases (what `id` shows),
/// else from the process's `/proc/PID/status` (which the unit's `ProtectProc=invisible`
/// may hide).
fn supplementary_groups(uid: u32, gid: u32, pid: Option<i32>) -> Vec<u32> {
    groups_of_user(uid, gid)
        .or_else(|| pid.map(groups_of_process))
        .unwrap_or_default()
}

fn groups_of_process(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn groups_of_user(uid: u32, gid: u32) -> Option<Vec<u32>> {
    // SAFETY: `passwd` is plain C data for which all zeroes is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwuid_r writes into `pw` and `buf`, both live and sized as passed.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return None;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `pw.pw_name` points into `buf`, still live; `groups` holds `n` entries.
    let r = unsafe { libc::getgrouplist(pw.pw_name, gid, groups.as_mut_ptr(), &mut n) };
    if r < 0 {
        return None;
    }
    groups.truncate(usize::try_from(n).unwrap_or(0));
    Some(groups)
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
mod tests {
    use super::*;
    use crate::control::Client;

    /// Answers every call with 418 and the name of the route it was reached through, so
    /// a test sees which handler method a request landed on.
    struct Fake;

    fn landed<T>(r: Route) -> Result<T, ApiError> {
        Err(ApiError::new(StatusCode::IM_A_TEAPOT, format!("{r:?}")))
    }

    impl Handler for Fake {
        async fn status(&self) -> Result<StatusReply, ApiError> {
            landed(Route::Status)
        }
        async fn create_link(&self, _: LinkRequest) -> Result<LinkReply, ApiError> {
            landed(Route::CreateLink)
        }
        async fn list_links(&self) -> Result<Vec<InviteView>, ApiError> {
            landed(Route::ListLinks)
        }
        async fn revoke_link(&self, _: InviteId) -> Result<Empty, ApiError> {
            landed(Route::RevokeLink)
        }
        async fn join(&self, _: JoinRequest) -> Result<JoinReply, ApiError> {
            landed(Route::Join)
        }
        async fn add_peer(&self, _: PeerAddRequest) -> Result<Empty, ApiError> {
            landed(Route::AddPeer)
        }
        async fn remove_peer(&self, _: PeerRemoveRequest) -> Result<Empty, ApiError> {
            landed(Route::RemovePeer)
        }
        async fn peers(&self) -> Result<PeersReply, ApiError> {
            landed(Route::Peers)
        }
        async fn remove_member(&self, _: RemoveRequest) -> Result<Empty, ApiError> {
            landed(Route::RemoveMember)
        }
        async fn gossip(&self) -> Result<GossipReply, ApiError> {
            landed(Route::Gossip)
        }
        async fn inject_gossip(&self, _: InjectRequest) -> Result<GossipReply, ApiError> {
            landed(Route::InjectGossip)
        }
        async fn ls(&self, _: String) -> Result<LsReply, ApiError> {
            landed(Route::Ls)
        }
        async fn plan(&self, _: PlanRequest) -> Result<PlanReply, ApiError> {
            landed(Route::Plan)
        }
        async fn start_get(&self, _: GetRequest, _: &Caller) -> Result<GetReply, ApiError> {
            landed(Route::StartGet)
        }
        async fn transfer(&self, _: String) -> Result<TransferView, ApiError> {
            landed(Route::Transfer)
        }
        async fn transfers(&self) -> Result<Vec<TransferView>, ApiError> {
            landed(Route::Transfers)
        }
        async fn transfer_file(&self, _: String, _: u64, _: &Caller) -> Result<Bytes, ApiError> {
            landed(Route::TransferFile)
        }
        async fn drop_transfer_file(&self, _: String, _: &Caller) -> Result<Empty, ApiError> {
            landed(Route::DropTransferFile)
        }
        async fn watch(&self, _: FileRequest) -> Result<WatchReply, ApiError> {
            landed(Route::Watch)
        }
        async fn room_report(&self, _: Report) -> Result<RoomView, ApiError> {
            landed(Route::RoomReport)
        }
        async fn room_wait(&self, _: WaitRequest) -> Result<RoomView, ApiError> {
            landed(Route::RoomWait)
        }
        async fn room_leave(&self, _: FileRequest) -> Result<Empty, ApiError> {
            landed(Route::RoomLeave)
        }
        async fn rooms(&self) -> Result<Vec<RoomView>, ApiError> {
            landed(Route::Rooms)
        }
        async fn versions(&self, _: VersionsRequest) -> Result<Vec<Kept>, ApiError> {
            landed(Route::Versions)
        }
        async fn release(&self, _: VersionsRequest) -> Result<Empty, ApiError> {
            landed(Route::Release)
        }
        async fn restore(&self, _: VersionsRequest) -> Result<Kept, ApiError> {
            landed(Route::Restore)
        }
    }

    /// A body each route's request type parses (fields beyond a type's are ignored).
    fn body_for(r: Route) -> Vec<u8> {
        let v = match r {
            Route::CreateLink => serde_json::json!({"uses": 1, "expires_secs": 60}),
            Route::Join => serde_json::json!({"link": "x"}),
            Route::AddPeer => serde_json::json!({
                "name": "p", "public_key": "k", "address": "100.77.0.9", "endpoint": null}),
            Route::RemovePeer => serde_json::json!({"public_key": "k"}),
            Route::RemoveMember => serde_json::json!({"node": "den"}),
            Route::InjectGossip => serde_json::json!({"from": "k", "message": {}}),
            Route::Ls | Route::Plan => serde_json::json!({"target": "s", "to": null}),
            Route::StartGet => serde_json::json!({"target": "s/f", "dest": "/f", "from": null}),
            Route::Watch | Route::RoomLeave => serde_json::json!({"file": "s/f"}),
            Route::RoomReport => serde_json::json!({
                "file": "s/f", "position": 0.0, "buffered_s": 0.0, "starved": false}),
            Route::RoomWait => serde_json::json!({
                "file": "s/f", "counter": 0, "node": "", "timeout_ms": 0}),
            Route::Versions | Route::Release | Route::Restore => {
                serde_json::json!({"target": "s"})
            }
            _ => return Vec::new(),
        };
        serde_json::to_vec(&v).unwrap()
    }

    /// `r` sent by `caller` straight to the router, as the server would hand it over.
    async fn send(r: Route, caller: &Caller, admin: Option<u32>) -> (StatusCode, String) {
        let (method, _) = r.spec();
        let path = r.path("0123456789abcdef");
        request(method, &path, body_for(r), caller, admin).await
    }

    async fn request(
        method: Method,
        path: &str,
        body: Vec<u8>,
        caller: &Caller,
        admin: Option<u32>,
    ) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = route(&Fake, req, caller, admin).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let error = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_default();
        (status, error)
    }

    fn user(uid: u32, groups: Vec<u32>) -> Caller {
        Caller {
            uid,
            gid: uid,
            groups,
        }
    }

    #[test]
    fn every_route_is_found_by_its_own_method_and_path_and_no_two_share_them() {
        let mut seen = std::collections::HashSet::new();
        for r in Route::ALL {
            let (method, pattern) = r.spec();
            assert!(pattern.starts_with("/v1/"), "{r:?}");
            assert!(
                seen.insert((method.clone(), pattern)),
                "{r:?} is written twice"
            );
            let id = if pattern.contains(ID) { "ab12" } else { "" };
            assert_eq!(
                Route::find(&method, &r.path("ab12")),
                Some((r, id.to_string()))
            );
        }
        assert_eq!(Route::find(&Method::GET, "/v1/nothing"), None);
        assert_eq!(Route::find(&Method::PUT, "/v1/status"), None);
    }

    #[tokio::test]
    async fn every_route_reaches_the_handler_method_of_the_same_name() {
        for r in Route::ALL {
            let (status, landed) = send(r, &user(0, vec![]), None).await;
            assert_eq!(status, StatusCode::IM_A_TEAPOT, "{r:?}: {landed}");
            assert_eq!(landed, format!("{r:?}"));
        }
    }

    #[tokio::test]
    async fn a_user_outside_the_control_group_may_read_but_every_change_is_refused() {
        let reads = [
            Route::Status,
            Route::ListLinks,
            Route::Peers,
            Route::Gossip,
            Route::Ls,
            Route::Plan,
            Route::Transfers,
            Route::Transfer,
            Route::TransferFile,
            Route::RoomWait,
            Route::Rooms,
            Route::Versions,
        ];
        for r in Route::ALL {
            let (status, error) = send(r, &user(1000, vec![7]), Some(50)).await;
            if reads.contains(&r) {
                assert_eq!(status, StatusCode::IM_A_TEAPOT, "{r:?} reads: {error}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{r:?} changes the node");
                assert!(error.contains("user 1000 may read"), "{error}");
            }
        }
        // A path the server does not know is refused like a change, unless it is a GET.
        let stranger = user(1000, vec![]);
        let (status, _) = request(Method::POST, "/v1/nothing", vec![], &stranger, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = request(Method::GET, "/v1/nothing", vec![], &stranger, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_member_of_the_control_group_may_change_the_node() {
        for r in [Route::CreateLink, Route::RemoveMember, Route::StartGet] {
            let (status, _) = send(r, &user(1000, vec![7, 50]), Some(50)).await;
            assert_eq!(status, StatusCode::IM_A_TEAPOT, "{r:?}");
        }
    }

    #[tokio::test]
    async fn malformed_calls_are_refused_before_the_handler_with_what_was_wrong() {
        let root = user(0, vec![]);
        let (status, error) = request(Method::DELETE, "/v1/links/xyz", vec![], &root, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error.contains("16 hex digits"), "{error}");
        let (status, _) = request(Method::POST, "/v1/join", b"{".to_vec(), &root, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, error) = request(
            Method::GET,
            "/v1/transfers/ab/file?from=3",
            vec![],
            &root,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error.contains("offset"), "{error}");
        let (status, _) = request(
            Method::POST,
            "/v1/join",
            vec![b' '; MAX_BODY + 1],
            &root,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// Calls every typed method of the client against [`Fake`] served on a temp socket.
    #[tokio::test]
    async fn each_client_method_reaches_the_handler_through_its_own_route() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(Fake), None, cancel.clone()));
        let c = Client::new(&path);
        let file = FileRequest { file: "s/f".into() };
        let versions = VersionsRequest {
            target: "s".into(),
            at: None,
        };
        let plan = PlanRequest {
            target: "s/f".into(),
            to: None,
        };
        let id = "0123456789abcdef";
        let calls: Vec<(Route, Result<(), crate::control::ControlError>)> = vec![
            (Route::Status, c.status().await.map(drop)),
            (
                Route::CreateLink,
                c.create_link(&LinkRequest {
                    uses: 1,
                    expires_secs: 60,
                })
                .await
                .map(drop),
            ),
            (Route::ListLinks, c.list_links().await.map(drop)),
            (Route::RevokeLink, c.revoke_link(id).await.map(drop)),
            (
                Route::Join,
                c.join(&JoinRequest { link: "x".into() }).await.map(drop),
            ),
            (
                Route::AddPeer,
                c.add_peer(&PeerAddRequest {
                    name: "p".into(),
                    public_key: "k".into(),
                    address: "100.77.0.9".parse().unwrap(),
                    endpoint: None,
                })
                .await
                .map(drop),
            ),
            (
                Route::RemovePeer,
                c.remove_peer(&PeerRemoveRequest {
                    public_key: "k".into(),
                })
                .await
                .map(drop),
            ),
            (Route::Peers, c.peers().await.map(drop)),
            (
                Route::RemoveMember,
                c.remove_member(&RemoveRequest {
                    node: "den".into(),
                    keep_invite: false,
                })
                .await
                .map(drop),
            ),
            (Route::Gossip, c.gossip().await.map(drop)),
            (
                Route::InjectGossip,
                c.inject_gossip(&InjectRequest {
                    from: "k".into(),
                    message: serde_json::json!({}),
                })
                .await
                .map(drop),
            ),
            (Route::Ls, c.ls("s").await.map(drop)),
            (Route::Plan, c.plan(&plan).await.map(drop)),
            (
                Route::StartGet,
                c.start_get(&GetRequest {
                    target: "s/f".into(),
                    dest: "/f".into(),
                    from: None,
                })
                .await
                .map(drop),
            ),
            (Route::Transfers, c.transfers().await.map(drop)),
            (Route::Transfer, c.transfer(id).await.map(drop)),
            (Route::TransferFile, c.transfer_file(id, 7).await.map(drop)),
            (
                Route::DropTransferFile,
                c.drop_transfer_file(id).await.map(drop),
            ),
            (Route::Watch, c.watch(&file).await.map(drop)),
            (
                Route::RoomReport,
                c.room_report(&Report {
                    file: "s/f".into(),
                    position: 0.0,
                    buffered_s: 0.0,
                    starved: false,
                    change: None,
                })
                .await
                .map(drop),
            ),
            (
                Route::RoomWait,
                c.room_wait(&WaitRequest {
                    file: "s/f".into(),
                    counter: 0,
                    node: String::new(),
                    timeout_ms: 0,
                })
                .await
                .map(drop),
            ),
            (Route::RoomLeave, c.room_leave(&file).await.map(drop)),
            (Route::Rooms, c.rooms().await.map(drop)),
            (Route::Versions, c.versions(&versions).await.map(drop)),
            (Route::Release, c.release(&versions).await.map(drop)),
            (Route::Restore, c.restore(&versions).await.map(drop)),
        ];
        let covered: std::collections::HashSet<Route> = calls.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            covered.len(),
            Route::ALL.len(),
            "one client method per route"
        );
        for (r, got) in calls {
            match got {
                Err(crate::control::ControlError::Api { status, message }) => {
                    assert_eq!(status, 418, "{r:?}");
                    assert_eq!(message, format!("{r:?}"));
                }
                other => panic!("{r:?}: {other:?}"),
            }
        }
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_without_a_daemon_says_to_start_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = Client::new(&dir.path().join("none.sock"));
        let e = c.status().await.unwrap_err();
        assert!(
            e.to_string().contains("is `watchalong daemon` running"),
            "{e}"
        );
    }
}
