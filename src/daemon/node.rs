//! The running node: its persisted group and invites under one lock (the [`Book`]), its
//! keys and tunnel, and what the control API asks of it. What it does is cut by seam:
//! membership, invites and joins in [`crate::daemon::members`], gossip and tunnel peers
//! in [`crate::daemon::peers`], the directory the data layer reads in
//! [`crate::daemon::directory`], and sync's executor in [`crate::sync::apply`], which
//! the daemon owns beside the node; the control API's handler is [`crate::daemon::api`]
//! and the `get` registry [`crate::daemon::transfers`]. This file holds the node's state.
//! It must not hold protocol rules (the pure modules
//! decide). The book lock is taken by every chunk request: the only slow work under it
//! is a write that must land before its change counts (a join, a removal, an invite).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::SigningKey;

use crate::base::config::Config;
use crate::base::lock::Recover;
pub use crate::daemon::book::Book;
use crate::daemon::book::GroupSaver;
use crate::data::transfer::Engine;
use crate::group::identity::{key_id, Key};
use crate::net::tunnel::Tunnel;
use crate::sync::folder::SyncShare;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// The fields the node's other files (members, peers, directory) work with are theirs to
// read: `pub(super)`, the daemon folder's, and no further.
pub struct Node {
    pub config: Config,
    pub public_key: Key,
    /// The private half of `public_key`: joins prove and check keys with it.
    pub(super) wg_secret: x25519_dalek::StaticSecret,
    pub(super) signing: SigningKey,
    book: Mutex<Book>,
    /// The group file's writes, made outside the book lock in order.
    pub(super) saver: GroupSaver,
    pub tunnel: Arc<Tunnel>,
    pub engine: Arc<Engine>,
    /// One join at a time: a join rewrites the whole group.
    /// One `sync_tunnel` at a time: two interleaved could let the older's list of
    /// members re-add a peer the newer just removed.
    pub(super) syncing_tunnel: tokio::sync::Mutex<()>,
    pub(super) joining: tokio::sync::Mutex<()>,
    /// `get`s in progress and done, by id.
    pub(crate) transfers: crate::daemon::transfers::Transfers,
    /// The tasks running `get`s and the handler's streams; the daemon waits for them on
    /// the way out.
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
    /// Read-write shares kept in sync, and the announcements waiting for the sync task.
    pub syncs: Vec<Arc<SyncShare>>,
    pub(super) sync_tx: tokio::sync::mpsc::Sender<(Key, bytes::Bytes)>,
    /// Watch-along: streams for local players and the rooms.
    pub watch: crate::watch::hub::Watch,
    /// Gossip datagrams refused because no member's daemon sealed them.
    pub(super) refused_gossip: std::sync::atomic::AtomicU64,
    /// When the host last signed where it sees each member.
    pub(super) observed_signed: Mutex<std::collections::HashMap<Key, std::time::Instant>>,
}

/// Files `get` could not write at their destination, waiting for the CLI to move them.
pub const DOWNLOADS_DIR: &str = "downloads";
/// What the daemon builds a node from.
pub struct Parts {
    pub config: Config,
    pub public_key: Key,
    pub wg_secret: x25519_dalek::StaticSecret,
    pub signing: SigningKey,
    pub book: Book,
    pub tunnel: Arc<Tunnel>,
    pub engine: Arc<Engine>,
    pub cancel: CancellationToken,
    pub syncs: Vec<Arc<SyncShare>>,
    pub sync_tx: tokio::sync::mpsc::Sender<(Key, bytes::Bytes)>,
    pub streams: Arc<crate::watch::stream::Streams>,
}

impl Node {
    pub fn new(p: Parts) -> Node {
        Node {
            public_key: p.public_key,
            wg_secret: p.wg_secret,
            signing: p.signing,
            book: Mutex::new(p.book),
            saver: GroupSaver::default(),
            tunnel: p.tunnel,
            engine: p.engine.clone(),
            joining: tokio::sync::Mutex::new(()),
            syncing_tunnel: tokio::sync::Mutex::new(()),
            transfers: Default::default(),
            tasks: TaskTracker::new(),
            cancel: p.cancel,
            syncs: p.syncs,
            sync_tx: p.sync_tx,
            watch: crate::watch::hub::Watch::new(
                p.streams,
                p.engine.clone(),
                key_id(&p.public_key),
                p.config.node.name.clone(),
                p.config.watch.pause_when_buffering,
            ),
            config: p.config,
            refused_gossip: std::sync::atomic::AtomicU64::new(0),
            observed_signed: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.locked()
    }

    pub(super) fn path(&self, file: &str) -> PathBuf {
        self.config.node.state_dir.join(file)
    }
}

impl Node {
    /// The node-to-node messages this node takes, each routed to its owner: room
    /// messages to the watch hub, announced versions to the sync queue.
    pub fn messages(self: &Arc<Self>) -> crate::data::transfer::Messages {
        let (rooms, syncs) = (self.clone(), self.clone());
        crate::data::transfer::Messages::new()
            .route(
                crate::watch::hub::ROOM_PATH,
                Arc::new(move |from, body| rooms.room(from, body)),
            )
            .route(
                crate::sync::folder::SYNC_PATH,
                Arc::new(move |from, body| syncs.announced(from, body)),
            )
    }

    fn room(self: &Arc<Self>, from: Key, body: bytes::Bytes) {
        if let Some(file) = self.watch.receive(&key_id(&from), &body) {
            let node = self.clone();
            self.tasks.spawn(async move {
                let dir = crate::data::transfer::Membership::directory(&*node);
                node.watch.forward(&file, &dir).await;
            });
        }
    }

    fn announced(&self, from: Key, body: bytes::Bytes) {
        if self.sync_tx.try_send((from, body)).is_err() {
            log::debug!("sync busy; an announcement waits for the next full round");
        }
    }
}
