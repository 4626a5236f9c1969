//! Files and how they travel: shared folders and their chunk manifests, the route of one
//! transfer (tunnel, LAN relay or both), and the node-to-node HTTP that moves chunks.
//! May import `base`, `group` and `net`; must not know about sync or rooms (their
//! node-to-node messages reach them through the [`messages`] table the daemon fills).

pub mod blocking;
mod cache;
pub mod client;
pub mod directory;
pub mod fetch;
mod flight;
pub mod messages;
pub mod node_server;
pub mod planner;
pub mod pool;
pub mod share;
pub mod transfer;
