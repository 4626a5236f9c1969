//! The local control API: JSON over HTTP/1.1 on a Unix socket, the server the daemon
//! runs and the client the CLI uses. It owns the request and reply types and the mapping
//! of errors to HTTP status codes; what each call does is the [`Handler`]'s business.
//! The listener is bound by the caller, so tests can bind a socket of their own.
//!
//! Who calls is the kernel's word ([`Caller`], from `SO_PEERCRED`), never the request's:
//! any user who can open the socket may read (status, peers, ls, plan, rooms); only root
//! and members of `[control] group` may change anything (links, removals, joins, peers,
//! gets, watching), and a `get` writes only where its caller could write.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::group::link::InviteId;
use crate::net::tunnel::PeerStatus;
use crate::watch::hub::{FileRequest, Report, RoomView, WaitRequest, WatchReply};

const MAX_BODY: usize = 64 * 1024;
/// The most of a handed-over file one call returns: the CLI asks piece by piece, so
/// neither side holds a whole file in memory.
pub const FILE_PIECE: u64 = 4 * 1024 * 1024;

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

/// Whether a call changes the node (and so needs root or `[control] group`).
fn changes(method: &Method, segs: &[&str]) -> bool {
    let reads = matches!(
        (method, segs),
        (&Method::GET, _)
            | (&Method::POST, ["v1", "ls" | "plan" | "versions"])
            | (&Method::POST, ["v1", "room", "wait"])
    );
    !reads
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub network: String,
    pub interface: String,
    pub listen_port: u16,
    /// `host` when this node decides who joins, `member` otherwise.
    pub role: String,
    pub host_name: String,
    /// Packets dropped because their source address belongs to another peer or none.
    pub spoofed_packets: u64,
    /// Gossip datagrams refused: from a member's address but not sealed by its daemon, or
    /// sent through this node's TUN device by another program on this machine.
    #[serde(default)]
    pub refused_gossip: u64,
    /// Handshake-shaped datagrams dropped before any key work: a bad mac1, or no valid
    /// cookie while under load (a flood).
    #[serde(default)]
    pub handshakes_refused: u64,
    /// Chunk counters since the daemon started.
    #[serde(default)]
    pub chunks: crate::data::transfer::Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub node: NodeStatus,
    pub peers: Vec<PeerStatus>,
    /// Read-write shares kept in sync.
    #[serde(default)]
    pub shares: Vec<crate::sync::folder::ShareStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRequest {
    pub uses: u32,
    pub expires_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkReply {
    pub id: InviteId,
    /// The plain link; the CLI seals it when asked, so the passphrase never reaches here.
    pub link: String,
    pub expires_at: u64,
    pub uses: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InviteView {
    pub id: InviteId,
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_allowed: u32,
    pub uses: u32,
    /// `open`, `used`, `expired` or `revoked`.
    pub state: String,
    /// Attempts to redeem the invite once spent, by keys it did not admit: a leaked link.
    #[serde(default)]
    pub refused_redemptions: u32,
    #[serde(default)]
    pub last_refused_at: Option<u64>,
    /// The WireGuard key (base64) the last refused attempt registered.
    #[serde(default)]
    pub last_refused_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// A plain (unsealed) link.
    pub link: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub host_name: String,
    pub address: Ipv4Addr,
    pub network: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerAddRequest {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRemoveRequest {
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Empty {}

/// One member as `watchalong peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub name: String,
    pub address: Ipv4Addr,
    pub public_key: String,
    /// The public IP the member is seen behind; members behind one IP share a site.
    pub site: Option<String>,
    /// Same site as this node, and its LAN address answers.
    pub nearby: bool,
    /// `lan`, `direct`, `via-host` or `down`.
    pub path: String,
    pub endpoint: Option<SocketAddr>,
    pub rtt_ms: Option<u32>,
    pub last_handshake_secs_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeersReply {
    pub name: String,
    pub address: Ipv4Addr,
    pub site: Option<String>,
    pub peers: Vec<PeerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// A member's name, VPN address or public key.
    pub node: String,
    /// Leave open the invite that admitted the member. By default it is closed, so a
    /// removed member cannot come back through the link that let it in (or hand it on).
    #[serde(default)]
    pub keep_invite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipReply {
    /// A hash of what this node holds (member versions, announcement sequence numbers):
    /// equal on two nodes when their views agree.
    pub view: String,
    pub members: usize,
    pub revoked: usize,
    pub forwarded_packets: u64,
    pub stats: crate::group::gossip::Stats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsEntry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    /// For the list of shares: the members offering each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsReply {
    /// The member that answered (none for the list of shares).
    pub holder: Option<String>,
    pub entries: Vec<LsEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRequest {
    /// `SHARE/PATH`.
    pub target: String,
    /// Where to write the file (absolute).
    pub dest: PathBuf,
    /// Fetch from this member only.
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetReply {
    pub id: String,
    pub source: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferView {
    pub id: String,
    pub target: String,
    pub dest: PathBuf,
    /// Set when the daemon could not write beside `dest`: the file is here once done,
    /// for the CLI to move to `dest` with its user's rights.
    #[serde(default)]
    pub handoff: Option<PathBuf>,
    pub source: String,
    pub size: u64,
    pub done: u64,
    pub corrupt_chunks: u64,
    pub route: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    pub error: Option<String>,
    pub counters: crate::data::transfer::Counters,
}

/// `versions` and `restore`: a share or a file in it, and for a restore which version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionsRequest {
    /// `SHARE` or `SHARE/PATH`.
    pub target: String,
    /// The version kept at this time (seconds since the epoch); the newest when absent.
    #[serde(default)]
    pub at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRequest {
    pub target: String,
    /// Plan for this member instead of this node.
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanReply {
    pub source: String,
    pub requester: String,
    pub size: u64,
    pub summary: String,
    pub route: crate::data::planner::Route,
}

/// A gossip message handed in as if member `from` had sent it (for diagnosis and tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectRequest {
    pub from: String,
    pub message: crate::group::gossip::GossipMessage,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
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
    ) -> impl Future<Output = Result<Vec<crate::sync::kept::Kept>, ApiError>> + Send;
    /// Lets a share's held deletions through.
    fn release(&self, req: VersionsRequest)
        -> impl Future<Output = Result<Empty, ApiError>> + Send;
    fn restore(
        &self,
        req: VersionsRequest,
    ) -> impl Future<Output = Result<crate::sync::kept::Kept, ApiError>> + Send;
}

/// Serves `listener` until `cancel` fires; connections in flight are awaited.
/// Serves the control API on `listener` until `cancel`. `admin` is the group whose members
/// may change the node besides root.
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

async fn route<H: Handler>(
    h: &H,
    req: Request<Incoming>,
    caller: &Caller,
    admin: Option<u32>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if changes(&method, &segs) && !caller.may_change(admin) {
        let call = segs.get(1..).map(|s| s.join(" ")).unwrap_or_default();
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
    let res = match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "status"]) => reply(h.status().await),
        (&Method::POST, ["v1", "links"]) => match parse(&body) {
            Ok(r) => reply(h.create_link(r).await),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "links"]) => reply(h.list_links().await),
        (&Method::DELETE, ["v1", "links", id]) => match id.parse::<InviteId>() {
            Ok(id) => reply(h.revoke_link(id).await),
            Err(_) => Err(ApiError::bad_request(format!(
                "`{id}` is not an invite id (16 hex digits, as `watchalong links` shows)"
            ))),
        },
        (&Method::POST, ["v1", "join"]) => match parse(&body) {
            Ok(r) => reply(h.join(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "peers"]) => match parse(&body) {
            Ok(r) => reply(h.add_peer(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "peers", "remove"]) => match parse(&body) {
            Ok(r) => reply(h.remove_peer(r).await),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "peers"]) => reply(h.peers().await),
        (&Method::POST, ["v1", "remove"]) => match parse(&body) {
            Ok(r) => reply(h.remove_member(r).await),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "gossip"]) => reply(h.gossip().await),
        (&Method::POST, ["v1", "ls"]) => match parse::<PlanRequest>(&body) {
            Ok(r) => reply(h.ls(r.target).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "plan"]) => match parse(&body) {
            Ok(r) => reply(h.plan(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "get"]) => match parse(&body) {
            Ok(r) => reply(h.start_get(r, caller).await),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "transfers"]) => reply(h.transfers().await),
        (&Method::GET, ["v1", "transfers", id]) => reply(h.transfer(id.to_string()).await),
        (&Method::GET, ["v1", "transfers", id, "file"]) => match offset_of(req_query.as_deref()) {
            Ok(offset) => h
                .transfer_file(id.to_string(), offset, caller)
                .await
                .map(bytes_response),
            Err(e) => Err(e),
        },
        (&Method::DELETE, ["v1", "transfers", id, "file"]) => {
            reply(h.drop_transfer_file(id.to_string(), caller).await)
        }
        (&Method::POST, ["v1", "watch"]) => match parse(&body) {
            Ok(r) => reply(h.watch(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "room", "report"]) => match parse(&body) {
            Ok(r) => reply(h.room_report(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "room", "wait"]) => match parse(&body) {
            Ok(r) => reply(h.room_wait(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "room", "leave"]) => match parse(&body) {
            Ok(r) => reply(h.room_leave(r).await),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "rooms"]) => reply(h.rooms().await),
        (&Method::POST, ["v1", "versions"]) => match parse(&body) {
            Ok(r) => reply(h.versions(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "sync", "release"]) => match parse(&body) {
            Ok(r) => reply(h.release(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "restore"]) => match parse(&body) {
            Ok(r) => reply(h.restore(r).await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "debug", "gossip"]) => match parse(&body) {
            Ok(r) => reply(h.inject_gossip(r).await),
            Err(e) => Err(e),
        },
        _ => Err(ApiError::not_found(format!(
            "no such call: {method} {path}"
        ))),
    };
    match res {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
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

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: e.to_string(),
    })
    .unwrap_or_default();
    json_response(e.status, body)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}: {source} (is `watchalong daemon` running, and is this the socket in its config?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the control connection failed: {0}")]
    Request(#[from] hyper::Error),
    #[error("cannot build the request: {0}")]
    BuildRequest(#[from] hyper::http::Error),
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("the daemon sent a reply this CLI does not understand: {0}")]
    DecodeReply(#[from] serde_json::Error),
}

/// The CLI's side: one connection per call.
#[derive(Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_path_buf(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ControlError> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ControlError> {
        self.call(Method::POST, path, Bytes::from(serde_json::to_vec(body)?))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ControlError> {
        self.call(Method::DELETE, path, Bytes::new()).await
    }

    /// A call whose answer is raw bytes (a piece of a file), not JSON.
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ControlError> {
        self.call_raw(Method::GET, path, Bytes::new()).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<T, ControlError> {
        let bytes = self.call_raw(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ControlError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "watchalong")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        drop(sender);
        let _ = driver.await;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("the daemon answered {status}"));
            return Err(ControlError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remove_request_that_does_not_mention_the_invite_asks_to_close_it() {
        let req: RemoveRequest = serde_json::from_str(r#"{"node":"kitchen"}"#).unwrap();
        assert!(!req.keep_invite);
        let req: RemoveRequest =
            serde_json::from_str(r#"{"node":"kitchen","keep_invite":true}"#).unwrap();
        assert!(req.keep_invite);
    }
}
