//! The command line's words: every command, argument and option `watchalong` takes, as
//! clap parses them. Only their shape lives here: what a command does is
//! [`crate::cli::run`]'s, how its answer is printed [`crate::cli::render`]'s.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PlayerKind {
    Mpv,
    /// A page on the daemon's loopback endpoint, kept in step by the daemon.
    Browser,
    None,
}

/// What `watchalong generate` writes.
#[cfg(feature = "generate")]
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Generated {
    /// `watchalong.1` and one page per command (`watchalong-get.1`, ...).
    Man,
    /// Completions for bash, zsh and fish.
    Completions,
}

#[derive(Parser)]
#[command(
    name = "watchalong",
    version,
    about = "Share a folder with a small group over a private WireGuard network"
)]
pub struct Cli {
    /// The configuration file (default /etc/watchalong.toml; built-in defaults when absent).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node in the foreground (what systemd runs).
    Daemon,
    /// Check the configuration file and exit (78 when it is invalid).
    Check,
    /// Run the node in the foreground and print an access link once it is ready.
    Up,
    /// Create an access link (or revoke one with --revoke).
    Link {
        /// How many nodes may join with this link.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long the link stays valid, like 24h, 30m or 7days.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Seal the link with a passphrase of at least 12 characters (asked for, or read
        /// from stdin when it is not a terminal).
        #[arg(long)]
        passphrase: bool,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Seal the link with a strong passphrase made up here, printed on stderr (send it
        /// by another way than the link).
        #[arg(long, conflicts_with_all = ["passphrase", "passphrase_file"])]
        generate_passphrase: bool,
        /// Revoke the open invite with this id instead of creating one.
        #[arg(long, value_name = "ID", conflicts_with_all = ["uses", "passphrase", "generate_passphrase"])]
        revoke: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the invites and their state.
    Links {
        #[arg(long)]
        json: bool,
    },
    /// Join the group an access link leads to; exits once the tunnel to the host is up.
    Join {
        /// The link, or `-` to read it from stdin (so it stays out of `ps` and the shell's
        /// history).
        link: String,
        /// Read the passphrase of a sealed link from this file instead of asking.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show this node and its peers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List the group's members: VPN address, site, path, RTT and last handshake.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Remove a member from the group (host only); every node closes its tunnel.
    Remove {
        /// The member's name, VPN address or public key.
        node: String,
        /// Leave open the invite that admitted the member (it is closed by default).
        #[arg(long)]
        keep_invite: bool,
    },
    /// List the shares members offer, or a folder of one.
    Ls {
        /// SHARE or SHARE/PATH; nothing lists the shares.
        #[arg(default_value = "")]
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Fetch a shared file, verified chunk by chunk, along the planner's route.
    Get {
        /// SHARE/PATH.
        target: String,
        /// Where to write it (default: its name in the current folder).
        dest: Option<PathBuf>,
        /// Fetch from this member only.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Folder sync: `sync release SHARE` lets deletions a share holds go ahead.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// List the versions this node kept of files sync replaced or deleted here.
    Versions {
        /// SHARE or SHARE/PATH.
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Put a kept version back (the newest unless --at); it spreads as a change.
    Restore {
        /// SHARE/PATH.
        target: String,
        /// The version kept at this time: its stamp as `versions` shows it
        /// (20261130T091300Z), or RFC 3339 (2026-11-30T09:13:00Z).
        #[arg(long)]
        at: Option<String>,
    },
    /// List this node's downloads (`get`), running and ended, with their progress.
    Transfers {
        #[arg(long)]
        json: bool,
    },
    /// Show the route a file would take to this node (or to --to NODE), and why.
    Plan {
        /// SHARE/PATH.
        target: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Play a shared file while it arrives, in step with everyone watching it.
    Watch {
        /// SHARE/PATH.
        target: String,
        /// `mpv`; `browser` for a page kept in step (its URL is printed, and opened
        /// where a desktop is present); or `none` to print the URL for any player.
        #[arg(long, value_enum, default_value = "mpv")]
        player: PlayerKind,
        /// An argument for mpv, as it is (repeat for more), e.g. `--player-arg=--fs`.
        #[arg(long = "player-arg", allow_hyphen_values = true, value_name = "ARG")]
        player_args: Vec<String>,
        /// mpv's IPC socket (default: in a new 0700 folder under $XDG_RUNTIME_DIR or the
        /// temp folder). Whoever can open it controls mpv and can read the stream's URL.
        #[arg(long, value_name = "PATH")]
        ipc: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Mount a share (or a folder of one) read-only at DIR: reads fetch the bytes under
    /// the reader first, as `watch` does. Ctrl-C or SIGTERM unmounts.
    #[cfg(feature = "mount")]
    Mount {
        /// SHARE or SHARE/FOLDER.
        target: String,
        /// An empty folder to mount onto.
        dir: PathBuf,
    },
    /// List the shares mounted with `watchalong mount` on this machine.
    #[cfg(feature = "mount")]
    Mounts,
    /// Write the man pages or the shell completions into DIR (for packagers).
    #[cfg(feature = "generate")]
    #[command(hide = true)]
    Generate { what: Generated, dir: PathBuf },
    /// Show the rooms: who watches what, where each player is, its drift and buffer.
    Room {
        #[arg(long)]
        json: bool,
    },
    /// Show gossip counters (what this node sent to whom).
    Gossip {
        #[arg(long)]
        json: bool,
    },
    /// Hand the daemon a gossip message as if a member had sent it: `{"from": KEY,
    /// "message": {...}}` on stdin. For diagnosis and tests; the daemon checks it as any
    /// other gossip.
    #[command(hide = true)]
    DebugGossip,
    /// Add or remove a standard WireGuard peer by hand.
    #[command(subcommand)]
    Peer(PeerCommand),
}

#[derive(Subcommand)]
pub enum SyncCommand {
    /// Let the deletions SHARE holds (a member removed most of its files) go ahead;
    /// what they remove is kept in the share's versions.
    Release {
        /// The read-write share.
        share: String,
    },
}

#[derive(Subcommand)]
pub enum PeerCommand {
    /// Add a standard WireGuard peer by hand (its key, VPN address and endpoint).
    Add {
        #[arg(long)]
        public_key: String,
        /// Its VPN address, inside the group's network.
        #[arg(long)]
        address: std::net::Ipv4Addr,
        #[arg(long)]
        endpoint: Option<std::net::SocketAddr>,
        #[arg(long, default_value = "wireguard-peer")]
        name: String,
    },
    /// Remove a peer added by hand.
    Remove {
        #[arg(long)]
        public_key: String,
    },
}
