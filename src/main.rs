//! The `watchalong` command line: the daemon itself and the commands that talk to it
//! over the control socket. This is an edge: errors become one line and an exit code.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use watchalong::base::config::{Config, ConfigError};
use watchalong::control::{
    Client, Empty, GetReply, GetRequest, GossipReply, InviteView, JoinReply, JoinRequest,
    LinkReply, LinkRequest, LsReply, PeerAddRequest, PeerRemoveRequest, PeersReply, PlanReply,
    PlanRequest, RemoveRequest, StatusReply, TransferView,
};
use watchalong::watch::hub::{FileRequest, RoomView, WatchReply};
use watchalong::{base::logging, cli::player, daemon, group::link};

#[derive(Clone, Copy, clap::ValueEnum)]
enum PlayerKind {
    Mpv,
    None,
}

/// sysexits' EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop.
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "watchalong",
    version,
    about = "Share a folder with a small group over a private WireGuard network"
)]
struct Cli {
    /// The configuration file (default /etc/watchalong.toml; built-in defaults when absent).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        /// `mpv`, or `none` to print the URL for any player.
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
enum SyncCommand {
    /// Let the deletions SHARE holds (a member removed most of its files) go ahead;
    /// what they remove is kept in the share's versions.
    Release {
        /// The read-write share.
        share: String,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
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
    Remove {
        #[arg(long)]
        public_key: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                ConfigError::Invalid { .. } => ExitCode::from(EX_CONFIG),
                ConfigError::Read { .. } => ExitCode::from(EX_CONFIG),
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let client = Client::new(&config.control.socket);
    match command {
        Command::Check => {
            println!(
                "configuration ok: node {}, interface {}, UDP port {}, network {}",
                config.node.name,
                config.tunnel.interface,
                config.tunnel.listen_port,
                config.tunnel.network
            );
        }
        Command::Daemon => {
            logging::init(config.log.level);
            daemon::run(config, None).await?;
        }
        Command::Up => {
            logging::init(config.log.level);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let daemon = tokio::spawn(daemon::run(config, Some(tx)));
            if let Ok(node) = rx.await {
                // Without a link the node is still useful (it can join others), so a
                // failure here is reported and the node keeps running.
                match node.new_link(1, Duration::from_secs(24 * 3600)).await {
                    Ok(reply) => {
                        print_link(&reply.link)?;
                        eprintln!(
                            "single-use link, expires {} UTC; more with `watchalong link`",
                            link::format_utc(reply.expires_at)
                        );
                    }
                    Err(e) => eprintln!("error: cannot create the access link: {e}"),
                }
            }
            daemon.await.context("the daemon task failed")??;
        }
        Command::Link {
            uses,
            expires,
            passphrase,
            passphrase_file,
            generate_passphrase,
            revoke,
            json,
        } => {
            if let Some(id) = revoke {
                let _: Empty = client.delete(&format!("/v1/links/{id}")).await?;
                eprintln!("revoked {id}");
                return Ok(());
            }
            // Checked before the invite is made, so a refused passphrase leaves no open
            // invite behind.
            let pass = if generate_passphrase {
                Some(link::generate_passphrase(&mut rand::rngs::OsRng))
            } else if passphrase || passphrase_file.is_some() {
                let p = zeroize::Zeroizing::new(read_passphrase(
                    passphrase_file.as_ref(),
                    "Passphrase for the link: ",
                )?);
                link::check_passphrase(&p)?;
                Some(p)
            } else {
                None
            };
            let reply: LinkReply = client
                .post(
                    "/v1/links",
                    &LinkRequest {
                        uses,
                        expires_secs: expires.as_secs(),
                    },
                )
                .await?;
            let text = match &pass {
                Some(p) => {
                    let inv = link::decode(&reply.link, None, watchalong::base::clock::now_secs())?;
                    inv.encode_sealed(p)?
                }
                None => reply.link.clone(),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"link": text, "id": reply.id, "expires_at": reply.expires_at, "uses": reply.uses, "sealed": pass.is_some(),
                        "passphrase": pass.as_ref().filter(|_| generate_passphrase).map(|p| p.as_str())})
                );
            } else {
                print_link(&text)?;
                if let Some(p) = pass.as_ref().filter(|_| generate_passphrase) {
                    eprintln!(
                        "passphrase: {} (send it by another way than the link)",
                        p.as_str()
                    );
                }
                eprintln!(
                    "invite {}: {} use(s), expires {} UTC",
                    reply.id,
                    reply.uses,
                    link::format_utc(reply.expires_at)
                );
            }
        }
        Command::Links { json } => {
            let list: Vec<InviteView> = client.get("/v1/links").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no invites");
            } else {
                println!(
                    "{:<18} {:<8} {:>5} {:<20} REFUSED",
                    "ID", "STATE", "USES", "EXPIRES (UTC)"
                );
                for i in &list {
                    // Refused redemptions of a spent link: someone else holds it.
                    let refused = match (i.refused_redemptions, i.last_refused_at) {
                        (0, _) => "-".to_string(),
                        (n, Some(at)) => format!("{n}, last {} UTC", link::format_utc(at)),
                        (n, None) => n.to_string(),
                    };
                    println!(
                        "{:<18} {:<8} {:>2}/{:<2} {:<20} {refused}",
                        i.id.to_string(),
                        i.state,
                        i.uses,
                        i.uses_allowed,
                        link::format_utc(i.expires_at)
                    );
                }
                if list.iter().any(|i| i.refused_redemptions > 0) {
                    eprintln!("a spent link was tried again by another node: it may have leaked; `watchalong links --json` shows the last key that tried");
                }
            }
        }
        Command::Join {
            link: text,
            passphrase_file,
            json,
        } => {
            let from_stdin = text == "-";
            let text = if from_stdin {
                read_link_from_stdin()?
            } else {
                text.trim().to_string()
            };
            // Anything but a sealed link goes to the daemon as it is: it does the checking.
            let plain = if link::is_sealed(&text).unwrap_or(false) {
                let pass = if from_stdin && passphrase_file.is_none() {
                    // Stdin held the link; the passphrase can only come from the terminal.
                    rpassword::prompt_password("Passphrase for the link: ").context(
                        "the link read from stdin is sealed, and no terminal can be asked for its passphrase: give it with --passphrase-file",
                    )?
                } else {
                    read_passphrase(passphrase_file.as_ref(), "Passphrase for the link: ")?
                };
                link::decode(&text, Some(&pass), watchalong::base::clock::now_secs())?.encode()
            } else {
                text
            };
            let reply: JoinReply = client
                .post("/v1/join", &JoinRequest { link: plain })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"host_name": reply.host_name, "address": reply.address, "network": reply.network})
                    )?
                );
            } else {
                println!(
                    "joined {}'s group as {} ({})",
                    reply.host_name, reply.address, reply.network
                );
            }
        }
        Command::Status { json } => {
            let s: StatusReply = client.get("/v1/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
        Command::Peers { json } => {
            let p: PeersReply = client.get("/v1/peers").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print_peers(&p);
            }
        }
        Command::Remove { node, keep_invite } => {
            let req = RemoveRequest {
                node: node.clone(),
                keep_invite,
            };
            let _: Empty = client.post("/v1/remove", &req).await?;
            eprintln!("removed {node}; every member closes its tunnel as the news spreads");
        }
        Command::Gossip { json } => {
            let g: GossipReply = client.get("/v1/gossip").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!(
                    "members {} (revoked {}), messages in {} (accepted {}, rejected {}), out {}, forwarded packets {}",
                    g.members, g.revoked, g.stats.received, g.stats.accepted, g.stats.rejected, g.stats.sent, g.forwarded_packets
                );
            }
        }
        Command::Ls { target, json } => {
            let r: LsReply = client
                .post(
                    "/v1/ls",
                    &PlanRequest {
                        target: target.clone(),
                        to: None,
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if r.holder.is_none() {
                if r.entries.is_empty() {
                    println!("no member offers a share yet");
                }
                for e in &r.entries {
                    println!("{:<24} {}", e.name, e.holders.join(", "));
                }
            } else {
                for e in &r.entries {
                    if e.dir {
                        println!("{:>12}  {}/", "-", e.name);
                    } else {
                        println!("{:>12}  {}", e.size, e.name);
                    }
                }
            }
        }
        Command::Watch {
            target,
            player,
            player_args,
            ipc,
            json,
        } => {
            let w: WatchReply = client
                .post("/v1/watch", &FileRequest { file: target })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            }
            match player {
                PlayerKind::None => {
                    if !json {
                        println!("{}", w.url);
                    }
                }
                PlayerKind::Mpv => {
                    if !json {
                        eprintln!(
                            "watching {} ({} bytes, from {}) at {}",
                            w.file, w.size, w.source, w.url
                        );
                    }
                    let opts = player::MpvOptions {
                        program: "mpv".into(),
                        ipc,
                        extra_args: player_args,
                    };
                    player::run_mpv(&client, &w, &opts).await?;
                }
            }
        }
        Command::Room { json } => {
            let rooms: Vec<RoomView> = client.get("/v1/rooms").await?;
            let text = json_or_empty(
                &rooms,
                json,
                "no rooms: `watchalong watch SHARE/PATH` opens one",
            )?;
            for r in rooms.iter().filter(|_| text) {
                let s = &r.state;
                let what = match (s.playing, s.held) {
                    (true, false) => "playing",
                    (true, true) => "held (a player is buffering)",
                    _ => "paused",
                };
                println!(
                    "{}: {what} at {:.1} s, rate {}{}",
                    r.file,
                    r.position_now,
                    s.rate,
                    match (r.have_bytes, r.size) {
                        (Some(h), Some(n)) => format!(", {h} of {n} bytes here"),
                        _ => String::new(),
                    }
                );
                for w in &r.watchers {
                    println!(
                        "  {:<16} at {:>8.1} s  drift {:>5} ms  buffered {:>5.1} s{}{}",
                        w.node,
                        w.position,
                        w.drift_ms,
                        w.buffered_s,
                        w.rtt_ms
                            .map(|r| format!("  rtt {r} ms"))
                            .unwrap_or_default(),
                        if w.starved {
                            "  (waiting for data)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Plan { target, to, json } => {
            let r: PlanReply = client.post("/v1/plan", &PlanRequest { target, to }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} ({} bytes) from {} to {}",
                    r.summary, r.size, r.source, r.requester
                );
                println!("why: {}", r.route.why);
            }
        }
        Command::Get {
            target,
            dest,
            from,
            json,
        } => {
            let name = target.rsplit('/').next().unwrap_or("download").to_string();
            let dest = match dest {
                Some(d) if d.is_dir() => d.join(&name),
                Some(d) => d,
                None => PathBuf::from(&name),
            };
            let dest = if dest.is_absolute() {
                dest
            } else {
                std::env::current_dir()?.join(dest)
            };
            let started: GetReply = client
                .post(
                    "/v1/get",
                    &GetRequest {
                        target: target.clone(),
                        dest: dest.clone(),
                        from,
                    },
                )
                .await?;
            let view = follow_transfer(&client, &started.id, json).await?;
            if let Some(e) = &view.error {
                bail!("{target}: {e}");
            }
            if view.handoff.is_some() {
                receive_into_place(&client, &started.id, &dest, view.size)
                    .await
                    .with_context(|| format!("{target}: cannot write {}", dest.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!(
                    "{} -> {} ({} bytes from {}, {})",
                    target,
                    dest.display(),
                    view.size,
                    view.source,
                    view.route
                );
            }
        }
        Command::Sync(SyncCommand::Release { share }) => {
            let _: Empty = client
                .post(
                    "/v1/sync/release",
                    &watchalong::control::VersionsRequest {
                        target: share.clone(),
                        at: None,
                    },
                )
                .await?;
            println!("{share}: held deletions go ahead at the next announcement");
        }
        Command::Versions { target, json } => {
            let list: Vec<watchalong::sync::kept::Kept> = client
                .post(
                    "/v1/versions",
                    &watchalong::control::VersionsRequest { target, at: None },
                )
                .await?;
            let text = json_or_empty(&list, json, "no versions kept")?;
            for k in list.iter().filter(|_| text) {
                println!("{}  {}  {} bytes", stamp_of(k.at), k.path, k.size);
            }
        }
        Command::Restore { target, at } => {
            let at = match at.as_deref() {
                Some(t) => Some(parse_time(t).with_context(|| {
                    format!(
                        "--at {t}: expected a stamp as `versions` shows it, like 20261130T091300Z"
                    )
                })?),
                None => None,
            };
            let k: watchalong::sync::kept::Kept = client
                .post(
                    "/v1/restore",
                    &watchalong::control::VersionsRequest { target, at },
                )
                .await?;
            println!("restored {} as kept at {}", k.path, stamp_of(k.at));
        }
        Command::Transfers { json } => {
            let list: Vec<TransferView> = client.get("/v1/transfers").await?;
            let text = json_or_empty(&list, json, "no transfers")?;
            for t in list.iter().filter(|_| text) {
                println!(
                    "{} {:<7} {:>3}% of {} bytes  {} -> {}  via {}{}",
                    t.id,
                    t.state,
                    (t.done * 100).checked_div(t.size).unwrap_or(100),
                    t.size,
                    t.target,
                    t.dest.display(),
                    t.route,
                    t.error
                        .as_deref()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default()
                );
            }
        }
        Command::DebugGossip => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            let req: watchalong::control::InjectRequest =
                serde_json::from_str(&text).context("stdin is not an inject request")?;
            let g: GossipReply = client.post("/v1/debug/gossip", &req).await?;
            println!("{}", serde_json::to_string_pretty(&g)?);
        }
        Command::Peer(PeerCommand::Add {
            public_key,
            address,
            endpoint,
            name,
        }) => {
            let _: Empty = client
                .post(
                    "/v1/peers",
                    &PeerAddRequest {
                        name,
                        public_key,
                        address,
                        endpoint,
                    },
                )
                .await?;
        }
        Command::Peer(PeerCommand::Remove { public_key }) => {
            let _: Empty = client
                .post("/v1/peers/remove", &PeerRemoveRequest { public_key })
                .await?;
        }
    }
    Ok(())
}

/// The link alone on the first line of stdout, so `| head -1` gets it; a QR code after
/// it when a person is looking.
fn print_link(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    if std::io::stdout().is_terminal() {
        let code = qrcode::QrCode::new(text.as_bytes()).context("cannot draw the QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        writeln!(out, "{art}")?;
    }
    out.flush()?;
    Ok(())
}

/// The link `join -` reads: stdin must hold the link and nothing else (a trailing newline
/// aside), read up to a bound so a wrong pipe cannot fill memory.
fn read_link_from_stdin() -> anyhow::Result<String> {
    const MAX_LINK: u64 = 4096;
    let mut text = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_LINK + 1)
        .read_to_string(&mut text)
        .context("cannot read the link from stdin")?;
    if text.len() as u64 > MAX_LINK {
        bail!("stdin holds more than a link ({MAX_LINK} bytes at most): pipe in the link alone");
    }
    let link = text.trim();
    if link.is_empty() {
        bail!("stdin is empty: pipe in the link, like `watchalong join - < link.txt`");
    }
    if link.contains(char::is_whitespace) {
        bail!("stdin holds more than a link: pipe in the link alone, on one line");
    }
    Ok(link.to_string())
}

fn read_passphrase(file: Option<&PathBuf>, prompt: &str) -> anyhow::Result<String> {
    let pass = if let Some(f) = file {
        std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string()
    } else if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt).context("cannot read the passphrase")?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if pass.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(pass)
}

/// Prints `list` as JSON when that was asked for, or `empty` when there is nothing to
/// list; true when the caller is to print the list as text.
/// A kept version's time as `versions` prints it and `restore --at` takes it.
fn stamp_of(t: u64) -> String {
    watchalong::sync::kept::stamp(t)
}

/// `--at`: a stamp as `versions` prints it, or RFC 3339.
fn parse_time(t: &str) -> anyhow::Result<u64> {
    if let Some(secs) = watchalong::sync::kept::parse_stamp(t) {
        return Ok(secs);
    }
    Ok(humantime::parse_rfc3339(t)?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
}

fn json_or_empty<T: serde::Serialize>(list: &[T], json: bool, empty: &str) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
    } else if list.is_empty() {
        println!("{empty}");
    }
    Ok(!json && !list.is_empty())
}

/// Writes what transfer `id` handed over to `dest`, from pieces read through the control
/// socket: the daemon's folder is not this user's to read, and a file this process
/// creates is this user's. A temp file beside `dest`, fsync, rename, so `dest` is never
/// half written; then the daemon drops its copy.
async fn receive_into_place(
    client: &Client,
    id: &str,
    dest: &Path,
    size: u64,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    let tmp = dest.with_file_name(format!(".{name}.watchalong-{}", std::process::id()));
    // Readable as a download usually is, as far as this user's umask allows.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = async {
        let mut offset = 0u64;
        loop {
            let piece = client
                .get_bytes(&format!("/v1/transfers/{id}/file?offset={offset}"))
                .await?;
            if piece.is_empty() {
                break;
            }
            out.write_all(&piece)?;
            offset += piece.len() as u64;
        }
        if offset != size {
            bail!("the daemon handed over {offset} bytes of {size}: run the get again");
        }
        out.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let _: Empty = client.delete(&format!("/v1/transfers/{id}/file")).await?;
    Ok(())
}

/// Polls a transfer until it ends: a progress bar on a terminal, a line now and then
/// otherwise.
async fn follow_transfer(client: &Client, id: &str, quiet: bool) -> anyhow::Result<TransferView> {
    let tty = std::io::stderr().is_terminal() && !quiet;
    let start = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    loop {
        let v: TransferView = client.get(&format!("/v1/transfers/{id}")).await?;
        let secs = start.elapsed().as_secs_f64().max(0.001);
        let rate = v.done as f64 / secs;
        let eta = if rate > 0.0 {
            (v.size.saturating_sub(v.done)) as f64 / rate
        } else {
            0.0
        };
        let pct = (v.done * 100).checked_div(v.size).unwrap_or(100);
        let line = format!(
            "{:>3}% {}/{} MiB {:.1} MiB/s ETA {:.0}s via {}",
            pct,
            v.done >> 20,
            v.size >> 20,
            rate / 1048576.0,
            eta,
            v.route
        );
        if tty {
            let width = 30usize;
            let filled = (pct as usize * width / 100).min(width);
            eprint!(
                "\r[{}{}] {line}\x1b[K",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
        } else if !quiet && (last_line.elapsed() > Duration::from_secs(5) || v.state != "running") {
            eprintln!("{line}");
            last_line = std::time::Instant::now();
        }
        if v.state != "running" {
            if tty {
                eprintln!();
            }
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ago(secs: Option<u64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) => format!("{}s ago", s),
    }
}

fn print_peers(p: &PeersReply) {
    println!(
        "{} {} site {}",
        p.name,
        p.address,
        p.site.as_deref().unwrap_or("unknown")
    );
    if p.peers.is_empty() {
        println!("no other members yet");
        return;
    }
    println!(
        "\n{:<16} {:<15} {:<16} {:<9} {:>8} {:<12}",
        "MEMBER", "ADDRESS", "SITE", "PATH", "RTT", "HANDSHAKE"
    );
    for m in &p.peers {
        let site = match (&m.site, m.nearby) {
            (Some(s), true) => format!("{s} (here)"),
            (Some(s), false) => s.clone(),
            (None, _) => "-".into(),
        };
        println!(
            "{:<16} {:<15} {:<16} {:<9} {:>8} {:<12}",
            m.name,
            m.address.to_string(),
            site,
            m.path,
            m.rtt_ms
                .map(|r| format!("{r} ms"))
                .unwrap_or_else(|| "-".into()),
            ago(m.last_handshake_secs_ago)
        );
    }
}

fn print_status(s: &StatusReply) {
    let n = &s.node;
    println!("node      {} ({})", n.name, n.role);
    println!("address   {} in {}", n.address, n.network);
    println!("key       {}", n.public_key);
    println!("listen    UDP {} on {}", n.listen_port, n.interface);
    if n.role != "host" {
        println!("host      {}", n.host_name);
    }
    for sh in &s.shares {
        let state = match (sh.root_ok, sh.pulling, &sh.last_error) {
            (false, _, _) => "root or its marker missing (unmounted?): sync held back".to_string(),
            (true, 0, None) => "in sync".to_string(),
            (true, 0, Some(e)) => format!("error: {e}"),
            (true, n, _) => format!("syncing: {n} file(s), {} bytes left", sh.bytes_left),
        };
        println!(
            "share     {}: {} files, {} bytes, {} conflict(s), {state}",
            sh.name, sh.files, sh.bytes, sh.conflicts
        );
    }
    if s.peers.is_empty() {
        println!("\nno peers yet: `watchalong link` makes an access link");
        return;
    }
    println!(
        "\n{:<16} {:<15} {:<22} {:<12} {:>12} {:>12}",
        "PEER", "ADDRESS", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    for p in &s.peers {
        println!(
            "{:<16} {:<15} {:<22} {:<12} {:>12} {:>12}",
            p.name,
            p.address.to_string(),
            p.endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            ago(p.last_handshake_secs_ago),
            p.rx_bytes,
            p.tx_bytes
        );
    }
}
