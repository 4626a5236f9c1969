//! Watching along: the rules of a room, a file played while it arrives, and the node's
//! side that runs streams and rooms for local players.
//! May import `base`, `group`, `net` and `data`; must not import `sync`, `control` or
//! `daemon`.

pub mod follow;
pub mod hub;
pub mod page;
pub mod room;
pub mod stream;
