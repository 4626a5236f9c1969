//! Tests of the control server without root: the route table, who may call what, and
//! every typed client method reaching its handler method through a real socket.

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
