//! What each command does: it talks to the daemon through the typed control client,
//! reads links and passphrases from the terminal or files, writes a handed-over download
//! into place with the user's own rights, and hands the answers to [`crate::cli::render`].
//! An edge: errors are `anyhow`, shown as one line by `main`. It decides nothing the
//! daemon decides.

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::base::clock::now_secs;
use crate::base::config::Config;
use crate::base::logging;
use crate::cli::args::{Command, PeerCommand, PlayerKind, SyncCommand};
#[cfg(feature = "mount")]
use crate::cli::mount;
use crate::cli::{player, render};
use crate::control::{
    Client, FileRequest, GetRequest, InjectRequest, JoinRequest, LinkRequest, PeerAddRequest,
    PeerRemoveRequest, PlanRequest, RemoveRequest, TransferState, TransferView, VersionsRequest,
};
use crate::daemon;
use crate::group::link;

pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
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
                    Ok(invite) => {
                        render::print_link(&invite.encode())?;
                        eprintln!(
                            "single-use link, expires {} UTC; more with `watchalong link`",
                            link::format_utc(invite.expires_at)
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
                client.revoke_link(&id).await?;
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
            let reply = client
                .create_link(&LinkRequest {
                    uses,
                    expires_secs: expires.as_secs(),
                })
                .await?;
            let text = match &pass {
                Some(p) => {
                    let inv = link::decode(&reply.link, None, now_secs())?;
                    inv.encode_sealed(p)?
                }
                None => reply.link.clone(),
            };
            let generated = pass
                .as_ref()
                .filter(|_| generate_passphrase)
                .map(|p| p.as_str());
            if json {
                render::print_link_json(&text, &reply, pass.is_some(), generated)?;
            } else {
                render::print_link(&text)?;
                render::print_link_terms(&reply, generated);
            }
        }
        Command::Links { json } => {
            render::print_links(&client.list_links().await?, json)?;
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
                link::decode(&text, Some(&pass), now_secs())?.encode()
            } else {
                text
            };
            let reply = client.join(&JoinRequest { link: plain }).await?;
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
            let s = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                render::print_status(&s);
            }
        }
        Command::Peers { json } => {
            let p = client.peers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                render::print_peers(&p);
            }
        }
        Command::Remove { node, keep_invite } => {
            let req = RemoveRequest {
                node: node.clone(),
                keep_invite,
            };
            client.remove_member(&req).await?;
            eprintln!("removed {node}; every member closes its tunnel as the news spreads");
        }
        Command::Gossip { json } => {
            render::print_gossip(&client.gossip().await?, json)?;
        }
        Command::Ls { target, json } => {
            render::print_ls(&client.ls(&target).await?, json)?;
        }
        Command::Watch {
            target,
            player,
            player_args,
            ipc,
            json,
        } => {
            let w = client.watch(&FileRequest { file: target }).await?;
            if json && !matches!(player, PlayerKind::Browser) {
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
                PlayerKind::Browser => player::run_browser(&client, &w, json).await?,
            }
        }
        #[cfg(feature = "mount")]
        Command::Mount { target, dir } => {
            logging::init(config.log.level);
            mount::run(client, &target, &dir).await?;
        }
        #[cfg(feature = "generate")]
        Command::Generate { what, dir } => {
            for f in crate::cli::generate::generate(what, &dir)? {
                println!("{}", f.display());
            }
        }
        #[cfg(feature = "mount")]
        Command::Mounts => {
            for m in mount::mounts()? {
                println!("{} on {}", m.target, m.dir.display());
            }
        }
        Command::Room { json } => {
            render::print_rooms(&client.rooms().await?, json)?;
        }
        Command::Plan { target, to, json } => {
            render::print_plan(&client.plan(&PlanRequest { target, to }).await?, json)?;
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
            let started = client
                .start_get(&GetRequest {
                    target: target.clone(),
                    dest: dest.clone(),
                    from,
                })
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
            client
                .release(&VersionsRequest {
                    target: share.clone(),
                    at: None,
                })
                .await?;
            println!("{share}: held deletions go ahead at the next announcement");
        }
        Command::Versions { target, json } => {
            let list = client
                .versions(&VersionsRequest { target, at: None })
                .await?;
            render::print_versions(&list, json)?;
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
            let k = client.restore(&VersionsRequest { target, at }).await?;
            println!("restored {} as kept at {}", k.path, render::stamp_of(k.at));
        }
        Command::Transfers { json } => {
            render::print_transfers(&client.transfers().await?, json)?;
        }
        Command::DebugGossip => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            let req: InjectRequest =
                serde_json::from_str(&text).context("stdin is not an inject request")?;
            let g = client.inject_gossip(&req).await?;
            println!("{}", serde_json::to_string_pretty(&g)?);
        }
        Command::Peer(PeerCommand::Add {
            public_key,
            address,
            endpoint,
            name,
        }) => {
            client
                .add_peer(&PeerAddRequest {
                    name,
                    public_key,
                    address,
                    endpoint,
                })
                .await?;
        }
        Command::Peer(PeerCommand::Remove { public_key }) => {
            client
                .remove_peer(&PeerRemoveRequest { public_key })
                .await?;
        }
    }
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

/// `--at`: a stamp as `versions` prints it, or RFC 3339.
fn parse_time(t: &str) -> anyhow::Result<u64> {
    if let Some(secs) = crate::sync::kept::parse_stamp(t) {
        return Ok(secs);
    }
    Ok(humantime::parse_rfc3339(t)?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
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
    let tmp = crate::data::share::beside(dest, &format!(".watchalong-{}", std::process::id()));
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
            let piece = client.transfer_file(id, offset).await?;
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
    client.drop_transfer_file(id).await?;
    Ok(())
}

/// Polls a transfer until it ends: a progress bar on a terminal, a line now and then
/// otherwise.
async fn follow_transfer(client: &Client, id: &str, quiet: bool) -> anyhow::Result<TransferView> {
    let tty = std::io::stderr().is_terminal() && !quiet;
    let start = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    loop {
        let v = client.transfer(id).await?;
        let secs = start.elapsed().as_secs_f64().max(0.001);
        let line = render::progress_line(&v, secs);
        let running = v.state == TransferState::Running;
        if tty {
            render::progress_bar((v.done * 100).checked_div(v.size).unwrap_or(100), &line);
        } else if !quiet && (last_line.elapsed() > Duration::from_secs(5) || !running) {
            eprintln!("{line}");
            last_line = std::time::Instant::now();
        }
        if !running {
            if tty {
                eprintln!();
            }
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
