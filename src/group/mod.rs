//! Who is in the group and how they prove it: the node's keys, access links, this node's
//! place (network, address), signed member records, how records spread, and the proofs
//! daemons put on requests. Pure apart from `identity`'s key file: no socket.
//! May import `base` only.

pub mod auth;
pub mod gossip;
pub mod identity;
pub mod link;
pub mod mesh;
pub mod place;
