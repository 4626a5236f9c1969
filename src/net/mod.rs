//! Moving packets and bytes between nodes: the join messages, VPN routes, TUN offloads
//! (segmenting and coalescing TCP, pure), the userspace WireGuard tunnel, the joiner's
//! side of a link, the bounded HTTP server loop, and the socket `wg show` reads (its
//! protocol in `uapi`, pure).
//! May import `base` and `group`; must not know about files, shares or playback.

pub mod join;
pub mod offload;
pub mod routes;
pub mod server;
pub mod tunnel;
pub mod uapi;
pub mod wg_socket;
pub mod wire;
