//! The control API's JSON types: what the CLI sends the daemon and what it gets back,
//! byte for byte the wire format. They stand alone: nothing here names an internal type,
//! so renaming a field inside the daemon cannot change the CLI's JSON; the daemon's
//! handler converts its own types into these explicitly. No I/O and no logic here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The most of a handed-over file one call returns: the CLI asks piece by piece, so
/// neither side holds a whole file in memory.
pub const FILE_PIECE: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub network: String,
    /// This node's inner IPv6 address (in the group's ULA /64); absent from older daemons.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
    /// The group's inner IPv6 network, a ULA /64; absent from older daemons.
    #[serde(default)]
    pub network6: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    /// `host` when this node decides who joins, `member` otherwise.
    pub role: String,
    pub host_name: String,
    /// Packets dropped because their source address belongs to another peer or none.
    pub spoofed_packets: u64,
    /// Gossip datagrams refused: from a member's address but not sealed by its daemon, or
    /// sent through this node's TUN device by another program on this machine.
    #[serde(default)]
    pub refused_gossip: u64,
    /// Handshake-shaped datagrams dropped before their Diffie-Hellman: a bad mac1, no
    /// valid cookie while under load (a flood), or a known peer's initiation beyond one
    /// a second.
    #[serde(default)]
    pub handshakes_refused: u64,
    /// Chunk counters since the daemon started.
    #[serde(default)]
    pub chunks: Counters,
    /// Which of the tunnel's kernel offloads are on (absent from older daemons: all off).
    #[serde(default)]
    pub offloads: Offloads,
}

/// The tunnel's batches through the kernel; each is off when `[tunnel] offload = "off"`
/// or when the kernel refused it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offloads {
    /// TUN reads bring TCP super-packets (TSO).
    pub tun_tso: bool,
    /// Decrypted TCP segments are coalesced into larger TUN writes (GRO).
    pub tun_gro: bool,
    /// A peer's datagrams leave in one segmentation send (UDP GSO).
    pub udp_gso: bool,
    /// Runs of datagrams arrive in one read (UDP GRO).
    pub udp_gro: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub node: NodeStatus,
    pub peers: Vec<PeerStatus>,
    /// Read-write shares kept in sync.
    #[serde(default)]
    pub shares: Vec<ShareStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRequest {
    pub uses: u32,
    pub expires_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkReply {
    /// 16 hex digits.
    pub id: String,
    /// The plain link; the CLI seals it when asked, so the passphrase never reaches here.
    pub link: String,
    pub expires_at: u64,
    pub uses: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InviteView {
    /// 16 hex digits.
    pub id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_allowed: u32,
    pub uses: u32,
    /// `open`, `used`, `expired` or `revoked`.
    pub state: String,
    /// Attempts to redeem the invite once spent, by keys it did not admit: a leaked link.
    #[serde(default)]
    pub refused_redemptions: u32,
    #[serde(default)]
    pub last_refused_at: Option<u64>,
    /// The WireGuard key (base64) the last refused attempt registered.
    #[serde(default)]
    pub last_refused_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// A plain (unsealed) link.
    pub link: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub host_name: String,
    pub address: Ipv4Addr,
    pub network: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerAddRequest {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRemoveRequest {
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Empty {}

/// One member as `watchalong peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub name: String,
    pub address: Ipv4Addr,
    /// Its inner IPv6 address (in the group's ULA /64); absent from older daemons.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
    pub public_key: String,
    /// The public IP the member is seen behind; members behind one IP share a site.
    pub site: Option<String>,
    /// Same site as this node, and its LAN address answers.
    pub nearby: bool,
    /// `lan`, `direct`, `via-host` or `down`.
    pub path: String,
    pub endpoint: Option<SocketAddr>,
    pub rtt_ms: Option<u32>,
    pub last_handshake_secs_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeersReply {
    pub name: String,
    pub address: Ipv4Addr,
    /// Its inner IPv6 address (in the group's ULA /64); absent from older daemons.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
    pub site: Option<String>,
    pub peers: Vec<PeerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// A member's name, VPN address or public key.
    pub node: String,
    /// Leave open the invite that admitted the member. By default it is closed, so a
    /// removed member cannot come back through the link that let it in (or hand it on).
    #[serde(default)]
    pub keep_invite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipReply {
    /// A hash of what this node holds (member versions, announcement sequence numbers):
    /// equal on two nodes when their views agree.
    pub view: String,
    pub members: usize,
    pub revoked: usize,
    pub forwarded_packets: u64,
    pub stats: GossipStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsEntry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    /// When the file last changed at its holder, in ns since the epoch (0 for a folder
    /// or when the holder does not say).
    #[serde(default)]
    pub mtime_ns: u64,
    /// For the list of shares: the members offering each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsReply {
    /// The member that answered (none for the list of shares).
    pub holder: Option<String>,
    pub entries: Vec<LsEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRequest {
    /// `SHARE/PATH`.
    pub target: String,
    /// Where to write the file (absolute).
    pub dest: PathBuf,
    /// Fetch from this member only.
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetReply {
    pub id: String,
    pub source: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferView {
    pub id: String,
    pub target: String,
    pub dest: PathBuf,
    /// Set when the daemon could not write beside `dest`: the file is here once done,
    /// for the CLI to move to `dest` with its user's rights.
    #[serde(default)]
    pub handoff: Option<PathBuf>,
    pub source: String,
    pub size: u64,
    pub done: u64,
    pub corrupt_chunks: u64,
    pub route: String,
    pub state: TransferState,
    pub error: Option<String>,
    pub counters: Counters,
}

/// Where a `get` stands: `running`, `done` or `failed` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    Running,
    Done,
    Failed,
}

impl TransferState {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Running => "running",
            TransferState::Done => "done",
            TransferState::Failed => "failed",
        }
    }
}

/// As on the wire; padded like a string, so tables line up.
impl std::fmt::Display for TransferState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// `versions` and `restore`: a share or a file in it, and for a restore which version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionsRequest {
    /// `SHARE` or `SHARE/PATH`.
    pub target: String,
    /// The version kept at this time (seconds since the epoch); the newest when absent.
    #[serde(default)]
    pub at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRequest {
    pub target: String,
    /// Plan for this member instead of this node.
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanReply {
    pub source: String,
    pub requester: String,
    pub size: u64,
    pub summary: String,
    pub route: PlanRoute,
}

/// A gossip message handed in as if member `from` had sent it (for diagnosis and tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectRequest {
    pub from: String,
    /// A gossip message as members send it (`{"type": "member", ...}`); the daemon
    /// decodes and checks it as any other gossip.
    pub message: serde_json::Value,
}

/// The body of every refusal: what is wrong, for the user to read.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One tunnel peer as `watchalong status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    /// Its inner IPv6 address (in the group's ULA /64); absent from older daemons.
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
    pub endpoint: Option<SocketAddr>,
    /// `direct`, `via-host` or `down`.
    pub path: String,
    /// Round trip of the last handshake, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Unix time of the last completed handshake.
    pub last_handshake: Option<u64>,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Chunk counters since the daemon started.
#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Chunks that arrived damaged and were fetched again another way.
    pub corrupt_chunks: u64,
    /// Chunks served from the cache or the disk to another member.
    pub served_chunks: u64,
    /// Bytes of those chunks.
    #[serde(default)]
    pub served_bytes: u64,
    /// Chunks this node fetched from another member.
    pub fetched_chunks: u64,
    /// Chunks an interrupted pull already held, checked and kept instead of fetched.
    pub resumed_chunks: u64,
    /// Requests to the node server or the relay refused for want of a member's proof.
    #[serde(default)]
    pub refused_requests: u64,
    /// Connections closed at once: over a cap, or to an address the server does not serve.
    #[serde(default)]
    pub refused_connections: u64,
    /// Connections the node server and the relay took in (kept alive: far fewer than
    /// the chunks they served).
    #[serde(default)]
    pub accepted_connections: u64,
}

/// A read-write share's sync state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStatus {
    pub name: String,
    pub files: usize,
    pub bytes: u64,
    pub conflicts: usize,
    /// Files announced and not pulled yet: 0 means in sync as far as this node knows.
    pub pulling: usize,
    /// Bytes of those files not here yet.
    pub bytes_left: u64,
    /// False when the root or its marker is missing: deletions are not spread then.
    pub root_ok: bool,
    pub last_error: Option<String>,
    /// Why remote deletions are held here, until `watchalong sync release SHARE`.
    #[serde(default)]
    pub held: Option<String>,
    /// Symbolic links in the share: sync never follows nor carries them.
    #[serde(default)]
    pub links_skipped: usize,
}

/// Gossip counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipStats {
    pub received: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub sent: u64,
    /// Gossip payload bytes handed to the tunnel (without IP, UDP and WireGuard headers).
    pub sent_bytes: u64,
    /// For each member record (by member name), the members this node pushed it to.
    pub member_pushes: BTreeMap<String, BTreeSet<String>>,
}

/// The route a file takes, as `watchalong plan` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRoute {
    /// 1 to 4 as in the brief; 0 when source and requester are the same node; 5 for
    /// nearby to nearby across two sites.
    pub case: u8,
    pub hops: Vec<PlanHop>,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanHop {
    pub from: String,
    pub to: String,
    /// `tunnel` or `lan`.
    pub via: String,
}

/// One kept version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The path in the share it was at.
    pub path: String,
    /// When it was replaced or deleted here, seconds since the epoch.
    pub at: u64,
    /// Among versions kept in the same second, the later ones count up from 0.
    #[serde(default)]
    pub seq: u32,
    pub size: u64,
}

/// What `watchalong watch` gets back when it opens a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchReply {
    pub file: String,
    /// Where a player opens it (loopback only).
    pub url: String,
    pub size: u64,
    /// The content id of the version the stream serves (its manifest's): a reader that
    /// reopens a closed stream tells by it whether the file changed meanwhile.
    #[serde(default)]
    pub id: String,
    /// The member the data comes from (this node when it holds the file).
    pub source: String,
    pub state: Playback,
}

/// What a room agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Playback {
    pub playing: bool,
    /// Seconds into the file at `at_ms`.
    pub position: f64,
    pub rate: f64,
    /// When `position` held, in ms since the epoch on the daemon's clock.
    pub at_ms: i64,
    /// Paused by the room because a watcher ran dry, not by a person.
    #[serde(default)]
    pub held: bool,
    pub stamp: Stamp,
}

/// Lamport counter, then the node that made the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stamp {
    pub counter: u64,
    pub node: String,
}

/// The local player's report: where it is, how much it holds ahead, and a change a
/// person made on it, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub file: String,
    pub position: f64,
    pub buffered_s: f64,
    pub starved: bool,
    #[serde(default)]
    pub change: Option<Change>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub playing: bool,
    pub position: f64,
    pub rate: f64,
}

/// A wait for the room's state to move past `counter`/`node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitRequest {
    pub file: String,
    pub counter: u64,
    pub node: String,
    /// At most this long, in ms.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRequest {
    pub file: String,
}

/// One watcher as `watchalong room` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatcherView {
    pub node: String,
    pub position: f64,
    pub drift_ms: i64,
    pub buffered_s: f64,
    pub starved: bool,
    pub rtt_ms: Option<i64>,
    pub clock_offset_ms: i64,
}

/// A room as the control API shows it; `state.at_ms` is on the daemon's clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomView {
    pub file: String,
    pub state: Playback,
    /// Where the file is now, by the room.
    pub position_now: f64,
    pub watchers: Vec<WatcherView>,
    /// Bytes of the file here, and its size (when this node streams it).
    pub have_bytes: Option<u64>,
    pub size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the raw JSON on purpose: scripts read these strings.
    #[test]
    fn a_transfer_state_is_today_s_string_on_the_wire_and_lines_up_in_a_table() {
        for (state, text) in [
            (TransferState::Running, "running"),
            (TransferState::Done, "done"),
            (TransferState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<TransferState>(text.into()).unwrap(),
                state
            );
            assert_eq!(format!("{state:<7}|").len(), 8, "{state}");
        }
    }

    /// Checks the raw JSON on purpose: `watchalong transfers --json` is read by scripts,
    /// so its keys, their order and the state's spelling are the contract.
    #[test]
    fn a_transfer_view_is_written_with_the_keys_scripts_read() {
        let v = TransferView {
            id: "ab".into(),
            target: "s/f".into(),
            dest: "/d/f".into(),
            handoff: None,
            source: "host".into(),
            size: 10,
            done: 10,
            corrupt_chunks: 0,
            route: "direct".into(),
            state: TransferState::Done,
            error: None,
            counters: Counters::default(),
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            concat!(
                r#"{"id":"ab","target":"s/f","dest":"/d/f","handoff":null,"source":"host","#,
                r#""size":10,"done":10,"corrupt_chunks":0,"route":"direct","state":"done","#,
                r#""error":null,"counters":{"corrupt_chunks":0,"served_chunks":0,"#,
                r#""served_bytes":0,"fetched_chunks":0,"resumed_chunks":0,"refused_requests":0,"#,
                r#""refused_connections":0,"accepted_connections":0}}"#
            )
        );
    }
}
