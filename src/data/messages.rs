//! Node-to-node messages, routed: a member POSTs a message to a path on another's node
//! server (`/v1/sync` for folder sync announcements, `/v1/room` for watch-along rooms);
//! once the node server has proven the request and read its body within bounds, it hands
//! the body to the [`Inbox`] registered for that path in [`Messages`]. The daemon builds
//! the table, so a new kind of message is a new entry there, not an edit of the data
//! layer's server. It owns only the table; it must not verify requests (the node server
//! does, before anything reaches it) or know what a message means.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::group::identity::Key;

/// Takes one kind of message. Called on the node server's task while the sender waits
/// for the reply: it must return at once (queue slow work, drop what does not fit).
pub trait Inbox: Send + Sync + 'static {
    /// A message from member `from`, proven to come from its daemon.
    fn deliver(&self, from: Key, body: Bytes);
}

impl<F: Fn(Key, Bytes) + Send + Sync + 'static> Inbox for F {
    fn deliver(&self, from: Key, body: Bytes) {
        self(from, body)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    #[error("no kind of message is taken at {0}")]
    Deliver(String),
}

/// The kinds of message this node takes, by the path they are POSTed to.
#[derive(Default, Clone)]
pub struct Messages {
    routes: HashMap<&'static str, Arc<dyn Inbox>>,
}

impl Messages {
    /// A table that takes no message: every POST is answered 404.
    pub fn new() -> Messages {
        Messages::default()
    }

    /// The same table, with messages POSTed to `path` handed to `inbox` (replacing an
    /// inbox registered there before).
    pub fn route(mut self, path: &'static str, inbox: Arc<dyn Inbox>) -> Messages {
        self.routes.insert(path, inbox);
        self
    }

    /// Hands a proven message POSTed to `path` to its inbox.
    pub fn deliver(&self, path: &str, from: Key, body: Bytes) -> Result<(), MessagesError> {
        let inbox = self
            .routes
            .get(path)
            .ok_or_else(|| MessagesError::Deliver(path.to_string()))?;
        inbox.deliver(from, body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::lock::Recover;
    use std::sync::Mutex;

    type Got = Arc<Mutex<Vec<(Key, Bytes)>>>;

    fn recorder() -> (Got, Arc<dyn Inbox>) {
        let got: Got = Arc::default();
        let into = got.clone();
        (
            got,
            Arc::new(move |from, body| into.locked().push((from, body))),
        )
    }

    #[test]
    fn a_message_goes_to_the_inbox_registered_for_its_path_and_to_no_other() {
        let (rooms, room_inbox) = recorder();
        let (syncs, sync_inbox) = recorder();
        let m = Messages::new()
            .route("/v1/room", room_inbox)
            .route("/v1/sync", sync_inbox);
        m.deliver("/v1/room", [1; 32], Bytes::from_static(b"play"))
            .unwrap();
        assert_eq!(
            *rooms.locked(),
            vec![([1; 32], Bytes::from_static(b"play"))]
        );
        assert!(syncs.locked().is_empty());
    }

    #[test]
    fn a_message_to_a_path_nobody_registered_is_refused_and_reaches_no_inbox() {
        let (rooms, room_inbox) = recorder();
        let m = Messages::new().route("/v1/room", room_inbox);
        for path in ["/v1/rooms", "/v1/room/", "/v1/sync", "", "/v1/chunk"] {
            assert!(
                matches!(m.deliver(path, [2; 32], Bytes::new()), Err(MessagesError::Deliver(p)) if p == path),
                "{path:?} was taken"
            );
        }
        assert!(rooms.locked().is_empty());
    }
}
