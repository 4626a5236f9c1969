//! watchalong: a small group shares a folder over a private WireGuard network that the
//! daemon builds itself.
//!
//! Map of the modules (see `docs/architecture.md` for the data path):
//!
//! | module     | owns                                                                  | I/O?        |
//! |------------|-----------------------------------------------------------------------|-------------|
//! | [`config`]   | `/etc/watchalong.toml`: defaults, parsing, line-precise validation    | one file    |
//! | [`identity`] | the node's long-term keys, stored 0600 in the state dir               | files       |
//! | [`link`]     | access links (encode, decode, sealing, expiry) and the invite book     | none (pure) |
//! | [`group`]    | this node's place in the group: network, own address, static peers    | none (pure) |
//! | [`mesh`]     | signed member records and endpoint announcements, and which to keep   | none (pure) |
//! | [`gossip`]   | how records spread: fanout push and anti-entropy digests              | none (pure) |
//! | [`state`]    | atomic, durable JSON files in the state dir                           | files       |
//! | [`wire`]     | the join messages inside the invite WireGuard session, the joiner's proof of keys | none (pure) |
//! | [`routes`]   | which member owns which VPN address (longest-prefix match)            | none (pure) |
//! | [`tunnel`]   | userspace WireGuard: one `Tunn` per peer, the TUN device, one UDP socket | sockets, TUN |
//! | [`share`]    | shared folders: safe paths, listings, BLAKE3 chunk manifests          | files       |
//! | [`planner`]  | the route of one transfer: tunnel, LAN relay or both (cases 1–4)     | none (pure) |
//! | [`auth`]     | proof of the sending daemon: request and gossip MACs, replays, sealed relay bodies | none (pure) |
//! | [`server`]   | the bounded HTTP server loop: deadlines, connection caps, reply budgets | sockets     |
//! | [`transfer`] | node-to-node HTTP, the LAN relay, chunk cache, single flight, `get`   | sockets, files |
//! | [`versions`] | folder sync's rules: version vectors, conflicts, deletion safety        | none (pure) |
//! | [`index`]    | a read-write share's sync index, stored in redb                       | one file    |
//! | [`kept`]     | versions of what sync replaced or deleted, inside the share: keep, list, prune, restore | files |
//! | [`sync`]     | read-write shares: scan, decide what an announced version asks        | files       |
//! | [`stream`]   | a watched file played while it arrives: playhead-first fetch, loopback Range endpoint | files, loopback |
//! | [`room`]     | a watch-along room: agreed playback, watchers, clock offsets, drift rules | none (pure) |
//! | [`watch`]    | the node's side of watching along: streams for local players, rooms, room messages | via transfer |
//! | [`player`]   | mpv kept in step with the room over its IPC socket (run by `watchalong watch`) | process, socket |
//! | [`join`]     | the joiner's side of redeeming a link against the host                | one UDP socket |
//! | [`control`]  | the local HTTP API over a Unix socket, server and client              | socket      |
//! | [`node`]     | the running node: membership operations, persistence, tunnel peers    | via tunnel  |
//! | [`daemon`]   | composition root: start, supervise, `sd_notify`, ordered shutdown      | —           |
//! | [`logging`]  | journald when under systemd, stderr otherwise                         | —           |

pub mod auth;
pub mod config;
pub mod control;
pub mod daemon;
pub mod gossip;
pub mod group;
pub mod identity;
pub mod index;
pub mod join;
pub mod kept;
pub mod link;
pub mod logging;
pub mod mesh;
pub mod node;
pub mod planner;
pub mod player;
pub mod room;
pub mod routes;
pub mod server;
pub mod share;
pub mod state;
pub mod stream;
pub mod sync;
pub mod transfer;
pub mod tunnel;
pub mod versions;
pub mod watch;
pub mod wire;
