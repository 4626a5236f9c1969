//! The control API's client side: one typed method per call, each built from the server's
//! route table ([`Route`]), so no `"/v1/..."` path is written anywhere else. One
//! connection per call. It owns no logic: what a reply means is the caller's business.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::api::*;
use super::server::Route;

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

/// The CLI's side of the control socket.
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

    pub async fn status(&self) -> Result<StatusReply, ControlError> {
        self.call(Route::Status, "", None::<&Empty>).await
    }

    pub async fn create_link(&self, req: &LinkRequest) -> Result<LinkReply, ControlError> {
        self.call(Route::CreateLink, "", Some(req)).await
    }

    pub async fn list_links(&self) -> Result<Vec<InviteView>, ControlError> {
        self.call(Route::ListLinks, "", None::<&Empty>).await
    }

    /// `id` as the user typed it: the daemon says when it is no invite id.
    pub async fn revoke_link(&self, id: &str) -> Result<Empty, ControlError> {
        self.call(Route::RevokeLink, id, None::<&Empty>).await
    }

    pub async fn join(&self, req: &JoinRequest) -> Result<JoinReply, ControlError> {
        self.call(Route::Join, "", Some(req)).await
    }

    pub async fn add_peer(&self, req: &PeerAddRequest) -> Result<Empty, ControlError> {
        self.call(Route::AddPeer, "", Some(req)).await
    }

    pub async fn remove_peer(&self, req: &PeerRemoveRequest) -> Result<Empty, ControlError> {
        self.call(Route::RemovePeer, "", Some(req)).await
    }

    pub async fn peers(&self) -> Result<PeersReply, ControlError> {
        self.call(Route::Peers, "", None::<&Empty>).await
    }

    pub async fn remove_member(&self, req: &RemoveRequest) -> Result<Empty, ControlError> {
        self.call(Route::RemoveMember, "", Some(req)).await
    }

    pub async fn gossip(&self) -> Result<GossipReply, ControlError> {
        self.call(Route::Gossip, "", None::<&Empty>).await
    }

    pub async fn inject_gossip(&self, req: &InjectRequest) -> Result<GossipReply, ControlError> {
        self.call(Route::InjectGossip, "", Some(req)).await
    }

    /// `SHARE` or `SHARE/PATH`; empty lists the shares.
    pub async fn ls(&self, target: &str) -> Result<LsReply, ControlError> {
        let req = PlanRequest {
            target: target.to_string(),
            to: None,
        };
        self.call(Route::Ls, "", Some(&req)).await
    }

    pub async fn plan(&self, req: &PlanRequest) -> Result<PlanReply, ControlError> {
        self.call(Route::Plan, "", Some(req)).await
    }

    pub async fn start_get(&self, req: &GetRequest) -> Result<GetReply, ControlError> {
        self.call(Route::StartGet, "", Some(req)).await
    }

    pub async fn transfers(&self) -> Result<Vec<TransferView>, ControlError> {
        self.call(Route::Transfers, "", None::<&Empty>).await
    }

    pub async fn transfer(&self, id: &str) -> Result<TransferView, ControlError> {
        self.call(Route::Transfer, id, None::<&Empty>).await
    }

    /// Up to [`FILE_PIECE`] bytes of what transfer `id` handed over, from `offset`; empty
    /// past the end.
    pub async fn transfer_file(&self, id: &str, offset: u64) -> Result<Bytes, ControlError> {
        let (method, _) = Route::TransferFile.spec();
        let path = format!("{}?offset={offset}", Route::TransferFile.path(id));
        self.call_raw(method, &path, Bytes::new()).await
    }

    pub async fn drop_transfer_file(&self, id: &str) -> Result<Empty, ControlError> {
        self.call(Route::DropTransferFile, id, None::<&Empty>).await
    }

    pub async fn watch(&self, req: &FileRequest) -> Result<WatchReply, ControlError> {
        self.call(Route::Watch, "", Some(req)).await
    }

    pub async fn room_report(&self, req: &Report) -> Result<RoomView, ControlError> {
        self.call(Route::RoomReport, "", Some(req)).await
    }

    pub async fn room_wait(&self, req: &WaitRequest) -> Result<RoomView, ControlError> {
        self.call(Route::RoomWait, "", Some(req)).await
    }

    pub async fn room_leave(&self, req: &FileRequest) -> Result<Empty, ControlError> {
        self.call(Route::RoomLeave, "", Some(req)).await
    }

    pub async fn rooms(&self) -> Result<Vec<RoomView>, ControlError> {
        self.call(Route::Rooms, "", None::<&Empty>).await
    }

    pub async fn versions(&self, req: &VersionsRequest) -> Result<Vec<Kept>, ControlError> {
        self.call(Route::Versions, "", Some(req)).await
    }

    pub async fn release(&self, req: &VersionsRequest) -> Result<Empty, ControlError> {
        self.call(Route::Release, "", Some(req)).await
    }

    pub async fn restore(&self, req: &VersionsRequest) -> Result<Kept, ControlError> {
        self.call(Route::Restore, "", Some(req)).await
    }

    /// Call `route` (its `{id}` filled with `id`) with `body` as JSON, or no body.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        route: Route,
        id: &str,
        body: Option<&B>,
    ) -> Result<T, ControlError> {
        let (method, _) = route.spec();
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let bytes = self.call_raw(method, &route.path(id), body).await?;
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
