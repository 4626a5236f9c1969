//! The transfer, as the rest of the house sees it: one front door to the pieces that move
//! chunks between members, so callers outside `data` need not know how the pieces are cut.
//! Who is where: [`crate::data::directory`]; the engine and its signed requests:
//! [`crate::data::client`]; the disk cache: [`crate::data::cache`]; one fetch per chunk:
//! [`crate::data::flight`]; the `get` loop: [`crate::data::fetch`]; the node server and
//! the LAN relay: [`crate::data::node_server`]; node-to-node messages:
//! [`crate::data::messages`]. It holds no logic and must not grow any: add it to the
//! piece it belongs to.

pub use crate::data::client::{
    ChunkRequest, Counters, Engine, TransferError, MAX_CHUNK, NODE_PORT,
};
pub use crate::data::directory::{Directory, Membership, Peer};
pub use crate::data::fetch::{
    describe, feeder_round_trip, fetch_chunk, get_file, Progress, Window,
};
pub use crate::data::messages::{Inbox, Messages, MessagesError};
pub use crate::data::node_server::{parse_chunk_query, serve_node, serve_relay};
