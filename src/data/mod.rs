//! Files and how they travel: shared folders and their chunk manifests, the route of one
//! transfer (tunnel, LAN relay or both), and the node-to-node HTTP that moves chunks.
//! May import `base`, `group` and `net`; must not know about sync or rooms.

pub mod planner;
pub mod share;
pub mod transfer;
