//! The socket `wg show` reads: `/var/run/wireguard/IFACE.sock`, where `wg` looks for a
//! userspace WireGuard. It owns the socket file (made at start in a 0755 directory,
//! mode 0600, a stale one from a crash removed, ours removed at exit) and a thin accept
//! loop: a few connections at once, each with a deadline, each answering one request
//! through [`crate::net::uapi`]. What a request means is decided there; this file only
//! moves bytes and reads the tunnel's status.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::base::logging::Throttle;
use crate::net::tunnel::{core::KEEPALIVE_SECS, Tunnel};
use crate::net::uapi::{self, Op, Progress, RequestReader};

/// Where `wg` (and wireguard-go) keep userspace interfaces' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Connections answered at once; more wait in the kernel's backlog. `wg` opens one per
/// command, so a handful is plenty.
const MAX_CONNECTIONS: usize = 4;
/// A connection's whole life: a client that dribbles or never reads is dropped.
const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WgSocketError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; remove it so `wg show` can find this daemon")]
    CheckStale { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot answer a `wg` request: {0}")]
    Answer(#[source] std::io::Error),
    #[error("a `wg` client took longer than {DEADLINE:?}")]
    Deadline,
}

/// The bound socket, handed to [`serve`].
pub struct WgSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode, so only ours is removed at exit.
    ino: u64,
}

/// The socket systemd made and passed in (a socket unit with `FileDescriptorName=wg`), if
/// any: under the shipped unit the daemon may not create `/run/wireguard`, a folder
/// other WireGuards share and that must stay root's. systemd owns that file: it is
/// never removed here.
fn passed() -> Option<WgSocket> {
    use std::os::fd::FromRawFd;
    // Only this process's: the variables name the PID they are for.
    let fds = sd_notify::listen_fds_with_names(false).ok()?;
    let (fd, _) = fds.into_iter().find(|(_, name)| name == "wg")?;
    // SAFETY: systemd passed this descriptor to this process for us to own; nothing else
    // in the daemon takes descriptors from LISTEN_FDS.
    let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let path = std
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    let listener = std
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(std))
        .map_err(|e| log::warn!("the `wg` socket systemd passed in cannot be used: {e}"))
        .ok()?;
    log::info!("`wg show` answers on {} (from systemd)", path.display());
    Some(WgSocket {
        listener,
        path,
        // No inode is 0: the file is never taken for ours.
        ino: 0,
    })
}

/// The socket path for interface `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Binds `/var/run/wireguard/IFACE.sock`. `None` when another live process already
/// answers there (another daemon or a wireguard-go with the same interface name in
/// another network namespace: the file system is shared), which is logged.
pub async fn bind(iface: &str) -> Result<Option<WgSocket>, WgSocketError> {
    if let Some(s) = passed() {
        return Ok(Some(s));
    }
    let dir = Path::new(SOCKET_DIR);
    std::fs::create_dir_all(dir).map_err(|source| WgSocketError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    // wg needs to enter it; the socket itself is what is kept to root.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let path = socket_path(iface);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(WgSocketError::CheckStale { path });
        }
        match UnixStream::connect(&path).await {
            // Refused: nobody listens, it is left over from a crash.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                let _ = std::fs::remove_file(&path);
            }
            // Answered, or not ours to judge (another user's socket: EACCES): leave it.
            _ => {
                log::warn!(
                    "another program holds {}: `wg show {iface}` will not show this daemon (give it an interface name of its own with [tunnel] interface)",
                    path.display()
                );
                return Ok(None);
            }
        }
    }
    let listener = UnixListener::bind(&path).map_err(|source| WgSocketError::Bind {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        WgSocketError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    let ino = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
    Ok(Some(WgSocket {
        listener,
        path,
        ino,
    }))
}

/// Answers `wg` on `socket` until `cancel`, then removes the socket file if it is still
/// ours.
pub async fn serve(
    socket: WgSocket,
    tunnel: Arc<Tunnel>,
    iface: String,
    cancel: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = socket.listener.accept() => r,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            () = cancel.cancelled() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                log::debug!("accept on {} failed: {e}", socket.path.display());
                // A failing accept (out of descriptors) must not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            // Closed unanswered: `wg` reports a protocol error and can be run again.
            drop(stream);
            continue;
        }
        let (t, name) = (tunnel.clone(), iface.clone());
        conns.spawn(async move {
            let r = tokio::time::timeout(DEADLINE, answer(stream, &t, &name))
                .await
                .unwrap_or(Err(WgSocketError::Deadline));
            if let Err(e) = r {
                log::debug!("`wg` on {name}: {e}");
            }
        });
    }
    conns.shutdown().await;
    let ours = std::fs::metadata(&socket.path).is_ok_and(|m| m.ino() == socket.ino);
    if ours {
        let _ = std::fs::remove_file(&socket.path);
    }
}

/// Reads one request and writes its answer.
async fn answer(stream: UnixStream, tunnel: &Tunnel, iface: &str) -> Result<(), WgSocketError> {
    static SET_LOG: Throttle = Throttle::new(Duration::from_secs(10));
    let (mut rd, mut wr) = stream.into_split();
    let mut reader = RequestReader::default();
    let mut buf = [0u8; 1024];
    let reply = loop {
        let n = rd.read(&mut buf).await.map_err(WgSocketError::Answer)?;
        if n == 0 {
            return Ok(());
        }
        match reader.feed(buf.get(..n).unwrap_or_default()) {
            Ok(Progress::More) => continue,
            Ok(Progress::Done(Op::Get)) => break uapi::format_get(&device(tunnel)),
            Ok(Progress::Done(Op::Set)) => {
                if let Some(held) = SET_LOG.allow() {
                    log::warn!("refused a `wg set` on {iface}: the interface is managed by watchalong, whose members come from the group (use `watchalong` to change it) ({held} more since the last line)");
                }
                break uapi::format_errno(uapi::EPERM);
            }
            Err(e) => {
                log::debug!("a `wg` request on {iface} was refused: {e}");
                break uapi::format_errno(uapi::EINVAL);
            }
        }
    };
    wr.write_all(reply.as_bytes())
        .await
        .map_err(WgSocketError::Answer)?;
    wr.shutdown().await.map_err(WgSocketError::Answer)
}

/// The tunnel's status, as `get` shows it.
fn device(tunnel: &Tunnel) -> uapi::Device {
    let peers = tunnel
        .status()
        .into_iter()
        .map(|p| {
            let mut allowed_ips = Vec::with_capacity(2);
            allowed_ips.push(ipnet::IpNet::from(ipnet::Ipv4Net::from(p.address)));
            if let Some(a6) = p.address6 {
                allowed_ips.push(ipnet::IpNet::from(ipnet::Ipv6Net::from(a6)));
            }
            uapi::Peer {
                public_key: p.public_key,
                endpoint: p.endpoint,
                last_handshake: p.last_handshake.map(Duration::from_secs),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive: KEEPALIVE_SECS,
                allowed_ips,
            }
        })
        .collect();
    uapi::Device {
        listen_port: tunnel.local_port().unwrap_or(0),
        peers,
    }
}
