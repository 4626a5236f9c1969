//! watchalong: a small group shares a folder over a private WireGuard network that the
//! daemon builds itself.
//!
//! The house, by layer: each folder may import the folders above it in this list and none
//! below it (see `docs/architecture.md` for the arrows and the data path; `cargo test --test
//! layers` checks them).
//!
//! | folder | owns | I/O? |
//! |---|---|---|
//! | [`base`]    | config file, durable state files, logging, clock, poison-tolerant lock | files |
//! | [`group`]   | keys, access links, this node's place, signed members, gossip, request proofs | none (pure) but the key file |
//! | [`net`]     | join messages, VPN routes, the userspace WireGuard tunnel, the joiner, the bounded HTTP server | sockets, TUN |
//! | [`data`]    | shares and chunk manifests, the transfer planner, node-to-node HTTP over kept connections, relay, cache, `get` | sockets, files |
//! | [`sync`]    | version vectors, the sync index, kept versions, a read-write share's sync state, sync's executor | files |
//! | [`watch`]   | room rules, a player kept in step, streams played while they arrive, the browser page, the node's rooms and streams | files, loopback |
//! | [`control`] | the local HTTP API over a Unix socket: types, server, client | socket |
//! | [`daemon`]  | the running node (membership, sync executor, API handler) and the composition root | all, by delegation |
//! | [`cli`]     | what the command line runs beside the daemon (mpv kept in step) | process, socket |
//!
//! The pure cores, which take `now` and randomness and return decisions: `group::gossip`,
//! `group::mesh`, `group::link`, `group::auth`, `data::planner`, `sync::versions`,
//! `watch::room`, `watch::follow`.

pub mod base;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod data;
pub mod group;
pub mod net;
pub mod sync;
pub mod watch;
