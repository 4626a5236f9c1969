//! The composition root. It loads the keys and the persisted group, builds the TUN
//! device, binds the UDP and control sockets (and the one `wg show` reads, see
//! [`crate::net::wg_socket`], and the metrics endpoint's), starts the tunnel, the join
//! handler, the gossip loop and the control server under one cancellation token, tells
//! systemd it is ready, and on SIGTERM stops them in order and awaits each. A task that
//! ends on its own (returns, fails or panics) while the daemon runs is logged by name
//! and stops the daemon the same way, with an error, so that systemd restarts it. What
//! the node does lives in [`crate::daemon::node`] and the files beside it (`book`,
//! `members`, `peers`, `directory`); sync's executor, which this root owns beside the
//! node, is [`crate::sync::apply`]; protocol rules live in the pure modules.

pub mod api;
pub mod api_errors;
pub mod book;
pub mod directory;
pub mod members;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod transfers;
pub mod views;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::base::config::Config;
use crate::base::lock::Recover;
use crate::base::state::{self, StateError};
use crate::control;
use crate::daemon::book::{hosted_group, Book, GROUP_FILE, INVITES_FILE};
use crate::daemon::node::{Node, Parts};
use crate::data::share::Shares;
use crate::data::transfer::{self, Engine};
use crate::group::gossip::{Gossip, GossipMessage};
use crate::group::identity::{self, Identity};
use crate::group::link::InviteBook;
use crate::group::place::Group;
use crate::net::tunnel::{GossipIn, InviteMessage, Tunnel, TunnelError};
use crate::net::wire::{self, JoinMessage};
use crate::sync::apply::Executor;
use crate::sync::folder::SyncShare;
use crate::sync::writers::{Seen, Writers};

pub use crate::base::clock::now_secs;

/// How often a node compares digests with a random member.
const GOSSIP_ROUND: Duration = Duration::from_secs(1);
/// How often the node re-reads its own addresses and re-announces them if they moved.
const ANNOUNCE_CHECK: Duration = Duration::from_secs(10);
const ENDPOINT_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// How often a node announces every version it holds, so members that missed a change
/// (offline, or an announcement lost) catch up.
const SYNC_FULL_ROUND: Duration = Duration::from_secs(10);
/// How often sync looks for members back within reach that may have missed something:
/// a directory read and a set lookup per member when nobody did.
const GREET_EVERY: Duration = Duration::from_millis(500);
/// How often versions past `[sync] keep_versions_days` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Quiet time after a file event before the share is scanned, while a file written is
/// still open (one written and closed ships at once: [`crate::sync::writers`]).
const SETTLE: Duration = Duration::from_millis(30);
/// Files tracked as open for writing, at most (past it the oldest ship on the timer).
const MAX_WRITERS: usize = 4096;
/// A file written without pause ships at least this often.
const MAX_SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    LoadIdentity(#[from] identity::IdentityError),
    #[error(transparent)]
    LoadState(#[from] StateError),
    /// The TUN device, or batched UDP on the tunnel's socket.
    #[error(transparent)]
    OpenTunnel(#[from] crate::net::tunnel::kernel::KernelError),
    #[error("cannot bind UDP port {port}: {source} (set [tunnel] listen_port to a free port)")]
    BindUdp { port: u16, source: std::io::Error },
    #[error("cannot listen on TCP port {port}: {source} (set [relay] port to a free port)")]
    BindTcp { port: u16, source: std::io::Error },
    #[error("cannot listen on the control socket {path}: {source}")]
    BindControl {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for metrics: {source} (set [metrics] listen to a free port, or remove it)")]
    BindMetrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("another daemon already answers on {0}")]
    ControlInUse(PathBuf),
    #[error("[control] group names {0:?}, which is no group on this machine (add it with `groupadd {0}`, or remove the key)")]
    FindGroup(String),

    #[error("cannot install the signal handler: {0}")]
    InstallSignals(#[source] std::io::Error),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("the {task} task ended while the daemon ran, so the daemon stopped (a bug: report it with the log; systemd's Restart=on-failure starts the daemon again)")]
    TaskEnded {
        task: &'static str,
        #[source]
        how: TaskEnd,
    },
}

/// How a daemon task ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnd {
    #[error("returned")]
    Returned,
    #[error("failed: {0}")]
    Failed(Box<DaemonError>),
    #[error("panicked: {0}")]
    Panicked(String),
    #[error("was aborted")]
    Aborted,
}

/// A test hook: the daemon task named in this variable (as the log names it, e.g.
/// `gossip`) panics once the daemon is up, so that tests can see the supervisor at
/// work. Read once at start; unset (as in any real deployment) it does nothing.
pub const PANIC_TASK_ENV: &str = "WATCHALONG_TEST_PANIC_TASK";

/// The daemon's long-running tasks, by name. Each runs until the daemon's cancellation
/// token fires; [`Supervisor::next`] says which one ended and how.
struct Supervisor {
    set: tokio::task::JoinSet<Result<(), DaemonError>>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    /// The task [`PANIC_TASK_ENV`] names, if any.
    panic_in: Option<String>,
    /// Fired once the daemon has told systemd it is ready.
    up: CancellationToken,
}

impl Supervisor {
    fn new() -> Supervisor {
        let panic_in = std::env::var(PANIC_TASK_ENV).ok().filter(|v| !v.is_empty());
        if let Some(t) = &panic_in {
            log::warn!("{PANIC_TASK_ENV}={t}: the {t} task will panic once the daemon is up (a test hook; unset it)");
        }
        Supervisor {
            set: tokio::task::JoinSet::new(),
            names: std::collections::HashMap::new(),
            panic_in,
            up: CancellationToken::new(),
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = Result<(), DaemonError>> + Send + 'static,
    ) {
        let handle = if self.panic_in.as_deref() == Some(name) {
            let up = self.up.clone();
            self.set.spawn(async move {
                tokio::select! {
                    r = task => r,
                    () = up.cancelled() => panic!("{PANIC_TASK_ENV} asked the {name} task to panic"),
                }
            })
        } else {
            self.set.spawn(task)
        };
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, and how; `None` when none is left.
    async fn next(&mut self) -> Option<(&'static str, TaskEnd)> {
        let (id, how) = match self.set.join_next_with_id().await? {
            Ok((id, Ok(()))) => (id, TaskEnd::Returned),
            Ok((id, Err(e))) => (id, TaskEnd::Failed(Box::new(e))),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    let payload = e.into_panic();
                    TaskEnd::Panicked(
                        payload
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "(no message)".into()),
                    )
                } else {
                    TaskEnd::Aborted
                };
                (id, how)
            }
        };
        Some((self.names.remove(&id).unwrap_or("unnamed"), how))
    }
}

/// Answers join requests arriving in invite sessions until cancelled.
async fn serve_joins(
    node: Arc<Node>,
    mut rx: mpsc::Receiver<InviteMessage>,
    cancel: CancellationToken,
) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            () = cancel.cancelled() => return,
        };
        let Ok(JoinMessage::Request {
            name,
            public_key,
            sign_key,
            proof,
        }) = wire::decode(&msg.packet)
        else {
            continue;
        };
        let (answer, spread) = node.answer_join(
            &msg.invite_key,
            &name,
            public_key,
            sign_key,
            proof.as_ref(),
            msg.from,
            &mut rng,
        );
        if matches!(answer, JoinMessage::Accepted { .. }) {
            node.sync_tunnel().await;
        }
        let host_address = node.book().group.my_address;
        match wire::encode(host_address, wire::JOINER_ADDRESS, &answer) {
            Ok(p) => {
                if let Err(e) = node.tunnel.send_invite_reply(msg.session, &p).await {
                    log::debug!("join answer not sent: {e}");
                }
            }
            Err(e) => log::warn!("cannot encode a join answer: {e}"),
        }
        node.send(spread).await;
    }
}

/// Gossip in, gossip rounds out, endpoints saved as they roam.
async fn run_gossip(node: Arc<Node>, mut rx: mpsc::Receiver<GossipIn>, cancel: CancellationToken) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut round = tokio::time::interval(GOSSIP_ROUND);
    let mut announce = tokio::time::interval(ANNOUNCE_CHECK);
    let mut save = tokio::time::interval(ENDPOINT_SAVE_INTERVAL);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return };
                let Some(payload) = node.open_gossip(&m.from, &m.payload) else {
                    continue;
                };
                let msg = match serde_json::from_slice::<GossipMessage>(payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        log::debug!("undecodable gossip: {e}");
                        continue;
                    }
                };
                let (out, changed) = node.on_gossip(m.from, msg, &mut rng);
                node.send(out).await;
                if changed {
                    node.sync_tunnel().await;
                }
            }
            _ = round.tick() => {
                let out = node.gossip_round(&mut rng);
                node.send(out).await;
            }
            _ = announce.tick() => {
                let out = node.refresh_announcement(None, &mut rng);
                if !out.is_empty() {
                    node.sync_tunnel().await;
                }
                node.send(out).await;
            }
            () = node.tunnel.roamed() => node.save_endpoints(),
            _ = save.tick() => node.save_endpoints(),
            () = cancel.cancelled() => return,
        }
    }
}

/// Folder sync: scans read-write shares when inotify says something changed (after a
/// short quiet time, so a file being written ships once it is finished) and every
/// [`crate::sync::folder::SCAN_EVERY`] in case an event was missed; announces changes; applies
/// what others announce.
async fn run_sync(
    sync: Arc<Executor>,
    mut rx: mpsc::Receiver<(crate::group::identity::Key, bytes::Bytes)>,
    cancel: CancellationToken,
) {
    if sync.shares().is_empty() {
        cancel.cancelled().await;
        return;
    }
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let writers = Arc::new(std::sync::Mutex::new(Writers::new(MAX_SETTLE, MAX_WRITERS)));
    // Kept alive for as long as the loop runs; dropping it stops the watch.
    let _watcher = watch_shares(sync.shares(), changed_tx, writers.clone());
    let all_closed = || writers.locked().all_closed(std::time::Instant::now());
    // When the last event-driven scan ended, and how long it took.
    let (mut last_scan, mut last_took) = (tokio::time::Instant::now(), Duration::ZERO);
    let mut scan = tokio::time::interval(crate::sync::folder::SCAN_EVERY);
    let mut full = tokio::time::interval(SYNC_FULL_ROUND);
    // Members back within reach after missing something are greeted this soon.
    let mut greet = tokio::time::interval(GREET_EVERY);
    greet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At start, then hourly: a version kept 30 days needs no finer clock.
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    // When file events next call for a scan, and the latest it may wait for since the
    // first of them. Waiting is a deadline in this loop, not a wait inside it, so what
    // other members announce keeps being applied meanwhile.
    let (mut due, mut cap): (Option<tokio::time::Instant>, Option<tokio::time::Instant>) =
        (None, None);
    loop {
        let settled = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(()) = changed.recv() => {
                // A file written and closed is whole: look at once, unless the last look
                // ended less than its own length ago (a program rewriting a file in a
                // loop would otherwise keep the share in back-to-back scans: this keeps
                // scanning to half the time at most, whatever the share's size). While a
                // file is still open, or files were removed, wait until the events pause
                // for SETTLE, but not for ever.
                let now = tokio::time::Instant::now();
                let until = *cap.get_or_insert(now + MAX_SETTLE);
                let at = if all_closed() {
                    (last_scan + last_took).max(now)
                } else {
                    now + SETTLE
                };
                due = Some(at.min(until));
            }
            () = settled => {
                (due, cap) = (None, None);
                writers.locked().scanned();
                let started = tokio::time::Instant::now();
                sync.scan(false).await;
                last_scan = tokio::time::Instant::now();
                last_took = last_scan - started;
            }
            _ = scan.tick() => sync.scan(false).await,
            _ = full.tick() => sync.scan(true).await,
            _ = greet.tick() => sync.greet_missing(),
            _ = prune.tick() => sync.prune_versions().await,
            m = rx.recv() => match m {
                Some((from, body)) => sync.apply(from, body).await,
                None => return,
            },
            () = cancel.cancelled() => return,
        }
    }
}

/// The rooms as browser pages reach them through the stream endpoint: a report goes into
/// the room at once, and a person's change goes to the other members from a task of its
/// own, so the page's answer never waits on the network.
struct PageRooms {
    node: Arc<Node>,
    /// Rooms whose change is yet to be sent, and whether a task is sending: one sender
    /// at a time, so a page scrubbing through the video (a report per `seeking`) sends
    /// the latest state of each room once the previous send is done, rather than piling
    /// up a task per report behind slow members.
    outbox: Arc<std::sync::Mutex<(std::collections::BTreeSet<String>, bool)>>,
}

impl PageRooms {
    fn new(node: Arc<Node>) -> PageRooms {
        PageRooms {
            node,
            outbox: Arc::default(),
        }
    }
}

impl crate::watch::page::Rooms for PageRooms {
    fn state(&self, file: &str) -> crate::watch::room::Playback {
        self.node.watch.state(file)
    }

    fn report(&self, r: crate::watch::hub::Report) -> crate::watch::hub::RoomView {
        let file = r.file.clone();
        let (view, urgent) = self.node.watch.report(r);
        if urgent {
            let start = {
                let mut out = self.outbox.locked();
                out.0.insert(file);
                !std::mem::replace(&mut out.1, true)
            };
            if start {
                let (node, outbox) = (self.node.clone(), self.outbox.clone());
                self.node.tasks.spawn(async move {
                    loop {
                        let next = {
                            let mut out = outbox.locked();
                            let next = out.0.pop_first();
                            out.1 = next.is_some();
                            next
                        };
                        let Some(file) = next else { break };
                        let dir = crate::data::transfer::Membership::directory(&*node);
                        node.watch.send_now(&file, &dir).await;
                    }
                });
            }
        }
        view
    }
}

/// Watch-along rooms: every heartbeat, quiet watchers are forgotten, rooms held for
/// buffering are released when all are ready, and the rooms local players watch are
/// sent to the other members.
async fn run_rooms(node: Arc<Node>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(crate::watch::hub::HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let dir = crate::data::transfer::Membership::directory(&*node);
                node.watch.round(&dir).await;
            }
            () = cancel.cancelled() => return,
        }
    }
}

/// An inotify watch on every read-write share; `None` (polling only) if it cannot be set.
/// Writers learn of every event that says whether a file is still being written.
fn watch_shares(
    shares: &[Arc<SyncShare>],
    tx: mpsc::Sender<()>,
    writers: Arc<std::sync::Mutex<Writers>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
    use notify::{EventKind, Watcher};
    let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An error (an overflow, say) may hide changes: look anyway.
            let _ = tx.try_send(());
            return;
        };
        let seen = match event.kind {
            EventKind::Create(CreateKind::Folder) => Seen::Other,
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                Seen::Written
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Seen::Closed,
            // A rename moves a finished file into place (what editors and sync tools do).
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => Seen::Gone,
            _ => Seen::Other,
        };
        let closed = seen == Seen::Closed;
        writers
            .locked()
            .seen(seen, &event.paths, std::time::Instant::now());
        // Reads (our own scans and chunk reads among them) and our own temp files are
        // not changes; reacting to them would keep the share busy being rescanned. A
        // close after writing is one: the file is whole now. So is a change of metadata
        // (a chmod, a touch): modes and mtimes travel.
        let relevant = (closed
            || matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
            ))
            && event
                .paths
                .iter()
                .any(|p| !p.to_string_lossy().contains(".watchalong-"));
        if relevant {
            // A full channel already means "scan soon": nothing is lost by dropping this one.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| log::warn!("no file watcher ({e}); changes are found by polling"))
    .ok()?;
    for s in shares {
        if let Err(e) = w.watch(&s.root, notify::RecursiveMode::Recursive) {
            log::warn!("cannot watch {}: {e}; polling it", s.root.display());
        }
    }
    Some(w)
}

/// Runs a node until SIGTERM or SIGINT. `ready` receives the node once the TUN device
/// and every socket are up, just as systemd hears `READY=1`.
pub async fn run(
    config: Config,
    mut ready: Option<oneshot::Sender<Arc<Node>>>,
) -> Result<(), DaemonError> {
    raise_fd_limit();
    let id = Identity::load_or_create(&config.node.state_dir)?;
    let public_key = id.wg_public.to_bytes();
    let group = match state::read_json::<Group>(&config.node.state_dir.join(GROUP_FILE))? {
        Some(mut g) => {
            // Only what still verifies is believed.
            g.mesh.reindex();
            g
        }
        None => hosted_group(&config, public_key, &id.signing),
    };
    let mut invites = state::read_json::<InviteBook>(&config.node.state_dir.join(INVITES_FILE))?
        .unwrap_or_default();
    invites.prune(now_secs());
    // Downloads left for a CLI by an earlier run: their transfers died with it, and no
    // CLI can ask for them any more.
    let downloads = config
        .node
        .state_dir
        .join(crate::daemon::node::DOWNLOADS_DIR);
    if downloads.exists() {
        if let Err(e) = std::fs::remove_dir_all(&downloads) {
            log::warn!("cannot clear {}: {e}", downloads.display());
        }
    }

    let (tun, tun_offload) = crate::net::tunnel::kernel::open_tun(
        &config.tunnel.interface,
        group.my_address,
        group.network.prefix_len(),
        group.address6(group.my_address),
        config.tunnel.mtu,
        config.tunnel.offload,
    )?;
    let port = config.tunnel.listen_port;
    // Both families on one socket where the host has IPv6 (see `kernel::bind_udp`).
    let udp = crate::net::tunnel::kernel::bind_udp(port)
        .inspect(crate::net::tunnel::kernel::size_buffers)
        .and_then(tokio::net::UdpSocket::from_std)
        .map_err(|source| DaemonError::BindUdp { port, source })?;
    let listener = bind_control(&config.control.socket).await?;
    // `wg show` is a convenience: a node that cannot offer it (no right to create
    // /run/wireguard) runs without it, and says so.
    let wg_socket = match crate::net::wg_socket::bind(&config.tunnel.interface).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "`wg show {}` will not list this node: {e}",
                config.tunnel.interface
            );
            None
        }
    };
    let admin = match &config.control.group {
        Some(name) => Some(control_group(&config.control.socket, name)?),
        None => None,
    };
    // Both on every address: the node server answers only on the VPN address and to
    // members' VPN addresses, the relay only to signed member requests.
    let node_listener = bind_tcp(transfer::NODE_PORT).await?;
    let relay_listener = bind_tcp(config.relay.port).await?;
    // Players on this machine only: the stream endpoint is bound to loopback.
    let watch_listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, config.watch.port))
        .await
        .map_err(|source| DaemonError::BindTcp {
            port: config.watch.port,
            source,
        })?;

    let metrics_listener = match config.metrics.listen_addr() {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::BindMetrics { addr, source })?;
            crate::daemon::metrics::announce(&l);
            Some(l)
        }
        None => None,
    };

    let (invite_tx, invite_rx) = mpsc::channel(64);
    let (gossip_tx, gossip_rx) = mpsc::channel(1024);
    let tunnel = Tunnel::new(
        udp,
        tun,
        tun_offload,
        config.tunnel.offload,
        id.wg_secret.clone(),
        invite_tx,
        gossip_tx,
    )?;
    let book = Book {
        group,
        invites,
        gossip: Gossip::new(public_key),
    };
    tunnel.set_invite_keys(Node::invite_keys(&book));
    let engine = Arc::new(Engine::new(
        Shares::new(
            config.shares.clone(),
            std::env::var(crate::data::share::CHUNK_SIZE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(crate::data::share::CHUNK_SIZE),
        ),
        Arc::new(crate::group::auth::Proofs::new(id.wg_secret.clone())),
        config.relay.port,
        config.node.state_dir.join("cache"),
        config.relay.cache_mib * 1024 * 1024,
    ));
    let cancel = CancellationToken::new();
    let syncs = crate::sync::folder::SyncShare::shares(&config.shares, &config.node.state_dir);
    // Each waiting announcement may hold a 4 MiB body: a short queue bounds the memory a
    // chatty member can pin; one dropped when it is full comes again at the next round.
    let (sync_tx, sync_rx) = mpsc::channel(16);
    let streams = Arc::new(crate::watch::stream::Streams::new(
        config.node.state_dir.join("streams"),
        config.watch.cache_mib.saturating_mul(1024 * 1024),
        cancel.clone(),
    ));
    *streams.endpoint.locked() = watch_listener.local_addr().ok();
    let node = Arc::new(Node::new(Parts {
        config: config.clone(),
        public_key,
        wg_secret: id.wg_secret.clone(),
        signing: id.signing.clone(),
        book,
        tunnel: tunnel.clone(),
        engine: engine.clone(),
        cancel: cancel.clone(),
        syncs,
        sync_tx,
        streams: streams.clone(),
    }));
    node.sync_tunnel().await;
    let first = node.refresh_announcement(None, &mut rand::thread_rng());
    node.send(first).await;

    let mut tasks = Supervisor::new();
    {
        let (e, n, c) = (engine.clone(), node.clone(), cancel.clone());
        tasks.spawn("node server", async move {
            let messages = n.messages();
            transfer::serve_node(node_listener, e, n, messages, c).await;
            Ok(())
        });
    }
    {
        let (e, n, c) = (engine.clone(), node.clone(), cancel.clone());
        tasks.spawn("relay", async move {
            transfer::serve_relay(relay_listener, e, n, c).await;
            Ok(())
        });
    }
    {
        let (t, c) = (tunnel.clone(), cancel.clone());
        tasks.spawn("tunnel", async move {
            t.run(c).await.map_err(DaemonError::from)
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn("control", async move {
            control::serve(listener, Arc::new(api::Api::new(n)), admin, c).await;
            Ok(())
        });
    }
    if let Some(l) = metrics_listener {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn("metrics", async move {
            crate::daemon::metrics::serve(l, n, c).await;
            Ok(())
        });
    }
    if let Some(socket) = wg_socket {
        let (t, c) = (tunnel.clone(), cancel.clone());
        let iface = config.tunnel.interface.clone();
        tasks.spawn("wg socket", async move {
            crate::net::wg_socket::serve(socket, t, iface, c).await;
            Ok(())
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn("joins", async move {
            serve_joins(n, invite_rx, c).await;
            Ok(())
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn("gossip", async move {
            run_gossip(n, gossip_rx, c).await;
            Ok(())
        });
    }
    {
        // Sync's executor reaches the members through the node; the node does not hold
        // it, so nothing points back.
        let sync = Arc::new(Executor::new(
            public_key,
            engine.clone(),
            node.clone(),
            node.syncs.clone(),
            config.sync.clone(),
            node.tasks.clone(),
            cancel.clone(),
        ));
        let c = cancel.clone();
        tasks.spawn("sync", async move {
            run_sync(sync, sync_rx, c).await;
            Ok(())
        });
    }
    {
        let (s, c) = (streams.clone(), cancel.clone());
        let pages: Arc<dyn crate::watch::stream::Pages> = Arc::new(
            crate::watch::page::Endpoint::new(Arc::new(PageRooms::new(node.clone()))),
        );
        tasks.spawn("stream endpoint", async move {
            crate::watch::stream::serve_local(watch_listener, s, pages, c).await;
            Ok(())
        });
    }
    {
        let (n, c) = (node.clone(), cancel.clone());
        tasks.spawn("rooms", async move {
            run_rooms(n, c).await;
            Ok(())
        });
    }
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) && watchdog_usec > 0 {
        let c = cancel.clone();
        tasks.spawn("watchdog", async move {
            let mut tick = tokio::time::interval(Duration::from_micros(watchdog_usec / 2));
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]); }
                    () = c.cancelled() => return Ok(()),
                }
            }
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::InstallSignals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::InstallSignals)?;

    // READY=1 means the node answers: it waits for the tunnel's UDP loop to read, however
    // long that takes (systemd's start timeout bounds it), and never goes out before. A
    // signal or a task that ends meanwhile stops the daemon without it.
    let mut result = Ok(());
    let mut up = false;
    loop {
        tokio::select! {
            () = tunnel.wait_receiving(), if !up => {
                up = true;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                tasks.up.cancel();
                log::info!(
                    "{} is up: {} on {}, UDP port {}",
                    config.node.name,
                    node.book().group.my_address,
                    config.tunnel.interface,
                    port
                );
                if let Some(tx) = ready.take() {
                    let _ = tx.send(node.clone());
                }
                continue;
            }
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
            Some((task, how)) = tasks.next() => {
                // Every task runs until cancelled: one that stops on its own leaves the node
                // half alive. Exiting non-zero lets systemd (Restart=on-failure) restart it.
                log::error!("the {task} task {how} while the daemon ran: stopping the others and exiting with an error so that systemd restarts the daemon");
                result = Err(DaemonError::TaskEnded { task, how });
            }
        }
        break;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    cancel.cancel();
    while let Some((task, how)) = tasks.next().await {
        if !matches!(how, TaskEnd::Returned) {
            log::warn!("the {task} task {how} while stopping");
        }
    }
    node.tasks.close();
    node.tasks.wait().await;
    streams.tasks.close();
    streams.tasks.wait().await;
    node.save_endpoints();
    let _ = std::fs::remove_file(&config.control.socket);
    // The last references to the tunnel go here; closing the TUN fd removes the device.
    drop(node);
    drop(tunnel);
    log::info!("stopped");
    result
}

/// The id of `[control] group`, to whom the control socket is given (mode 0660), so its
/// members can open it and change the node.
fn control_group(socket: &std::path::Path, name: &str) -> Result<u32, DaemonError> {
    let c = std::ffi::CString::new(name).map_err(|_| DaemonError::FindGroup(name.into()))?;
    // SAFETY: getgrnam with a NUL-terminated name; the gid is read at once, before any
    // other call could reuse the static buffer it points into.
    let gid = unsafe {
        let g = libc::getgrnam(c.as_ptr());
        if g.is_null() {
            return Err(DaemonError::FindGroup(name.into()));
        }
        (*g).gr_gid
    };
    // Its members may change the node whether or not they can open the socket; giving
    // it to them takes membership of the group (the unit's syscall filter refuses chown
    // anyway: there, Group= creates the socket in the group): say how, and go on.
    use std::os::unix::fs::MetadataExt;
    let given = std::fs::metadata(socket).is_ok_and(|m| m.gid() == gid);
    if given {
        return Ok(gid);
    }
    if let Err(e) = std::os::unix::fs::chown(socket, None, Some(gid)) {
        log::warn!(
            "cannot give the control socket {} to group {name} ({e}): only root can reach it; run the daemon in that group (Group={name} in the unit)",
            socket.display()
        );
    }
    Ok(gid)
}

/// Connections are capped per server, but the caps together, the TUN, the sockets and the
/// share files need more descriptors than the usual soft limit of 1024: take the hard limit
/// (systemd's is 524288), so a flood meets our caps before the kernel's.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::debug!("cannot raise the open-file limit");
            }
        }
    }
}

async fn bind_tcp(port: u16) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .await
        .map_err(|source| DaemonError::BindTcp { port, source })
}

async fn bind_control(path: &std::path::Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::BindControl {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash; a live one is another daemon.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::ControlInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::BindControl {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_supervisor_names_the_task_that_panicked_and_how() {
        let mut tasks = Supervisor::new();
        let still = CancellationToken::new();
        let s = still.clone();
        tasks.spawn("quiet", async move {
            s.cancelled().await;
            Ok(())
        });
        tasks.spawn("broken", async { panic!("boom") });
        let (task, how) = tasks.next().await.expect("a task ended");
        assert_eq!(task, "broken");
        assert!(matches!(&how, TaskEnd::Panicked(m) if m == "boom"), "{how}");
        still.cancel();
        let (task, how) = tasks
            .next()
            .await
            .expect("the other one ends when cancelled");
        assert_eq!(task, "quiet");
        assert!(matches!(how, TaskEnd::Returned), "{how}");
        assert!(tasks.next().await.is_none());
    }
}
