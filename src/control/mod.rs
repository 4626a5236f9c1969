//! The local control API: JSON over HTTP/1.1 on a Unix socket. [`api`] holds the wire
//! types (standing alone from the daemon's), [`server`] the route table, the server and
//! who may call what, [`caller`] who is calling (the kernel's word), [`client`] the
//! typed client the CLI, the player and the tests use.
//! What each call does is the daemon's [`Handler`]; this folder must not reach into it.

pub mod api;
pub mod caller;
pub mod client;
pub mod server;

pub use api::*;
pub use client::{Client, ControlError};
pub use server::{serve, ApiError, Caller, Handler, Route};

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
