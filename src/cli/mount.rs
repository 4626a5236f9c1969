//! `watchalong mount SHARE DIR`: a share as a read-only folder (FUSE, through `fuser`),
//! run in the CLI's process beside the daemon. Listings come from the control call
//! `ls` uses (kept for [`LIST_FRESH`]); opening a file opens a stream through the daemon
//! (`watch`'s call), so reads are fetched under the reader first through the planner,
//! gateways, chunk verification and the one chunk cache; a read is a `Range` request to
//! the stream's loopback URL. It owns the mount point and its inode numbers; it must not
//! fetch, verify or cache chunks itself, nor write anything: every write answers EROFS.
//! No FUSE request waits on the network in a FUSE thread: each is answered from a task.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use crate::base::lock::Recover;
use crate::control::{Client, ControlError, FileRequest, LsEntry};

/// How long a read waits for the next bytes of its range before it fails with EIO. A
/// chunk on a slow but live route arrives well within it (a 1 MiB chunk at 1 Mbit/s
/// takes 8 s); a holder that is gone never sends it, and a player must get an error it
/// can show rather than a read that hangs for ever.
pub const READ_STALL: Duration = Duration::from_secs(20);

/// How long a read waits instead when a read of the same open file stalled less than
/// [`READ_STALL`] ago: the kernel retries a failed read-ahead with a read of its own,
/// and a second full wait would double the time a player waits for its error.
pub const RETRY_STALL: Duration = Duration::from_secs(2);

/// How long a folder listing is reused: a player or a file manager looks up the same
/// folder many times a second, and each `ls` is a round trip to a holder.
pub const LIST_FRESH: Duration = Duration::from_secs(2);

/// How long the kernel may keep what a lookup or getattr answered.
const TTL: Duration = Duration::from_secs(1);

/// The mount source (`/proc/mounts`' first field) starts with this, which is how
/// `watchalong mounts` and the stale-mount check tell our mounts from others.
pub const SOURCE_PREFIX: &str = "watchalong:";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot use {dir} as the mount point: {source} (create it first: `mkdir -p {dir}`)")]
    CheckDir { dir: String, source: std::io::Error },
    #[error("{dir} is not a folder: mount onto an empty folder")]
    NotAFolder { dir: String },
    #[error("{dir} is not empty: mount onto an empty folder, so that nothing in it is hidden")]
    NotEmpty { dir: String },
    #[error("{dir} is already mounted by a running `watchalong mount`: stop that one (Ctrl-C) or `umount {dir}` first")]
    AlreadyMounted { dir: String },
    #[error("{dir} holds a stale mount left by a crash, and it cannot be removed: {source} (as root: `umount -l {dir}`)")]
    CleanStale { dir: String, source: std::io::Error },
    #[error("cannot open /dev/fuse: {source} (load FUSE with `modprobe fuse`; in a container, pass the device with `--device /dev/fuse`)")]
    NoFuse { source: std::io::Error },
    #[error("cannot list {target}: {source} (`watchalong ls` shows the shares members offer)")]
    ListShare {
        target: String,
        source: ControlError,
    },
    #[error("cannot mount {dir}: {source} (a FUSE mount needs root here, or fusermount3: `apt-get install fuse3`)")]
    Mount { dir: String, source: std::io::Error },
    #[error("cannot unmount {dir}: {source} (as root: `umount -l {dir}`)")]
    Unmount { dir: String, source: std::io::Error },
    #[error("cannot read the mount table /proc/self/mounts: {0}")]
    ReadMounts(std::io::Error),
    #[error("cannot wait for Ctrl-C or SIGTERM: {0}")]
    Signal(std::io::Error),
    #[error("{file}: the stream address {url} is not a loopback URL this CLI understands")]
    StreamUrl { file: String, url: String },
    #[error("{file}: cannot reach the daemon's stream endpoint: {source}")]
    ConnectStream {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: the stream request failed: {source}")]
    StreamRequest { file: String, source: hyper::Error },
    #[error("{file}: the stream closed (the file changed at its holder, or sat unread too long)")]
    StreamGone { file: String },
    #[error("{file}: the stream answered {status}")]
    StreamStatus { file: String, status: u16 },
    #[error("{file}: no bytes at offset {offset} for {secs} s: its holder is unreachable")]
    Stalled {
        file: String,
        offset: u64,
        secs: u64,
    },
    #[error("{file}: the stream sent {got} bytes of the {want} asked for at offset {offset}")]
    ShortRead {
        file: String,
        offset: u64,
        got: u64,
        want: u64,
    },
    #[error("{file}: its holder changed it since it was opened here: close and open it again")]
    VersionChanged { file: String },
}

/// One name the mount has handed to the kernel.
#[derive(Clone)]
struct Node {
    /// Relative to the mounted folder, `/`-separated; empty for the root.
    path: String,
    dir: bool,
    size: u64,
    /// When the listing said it last changed (ns since the epoch; 0 if unsaid).
    mtime_ns: u64,
}

/// Inode numbers, stable for the life of the mount: the kernel remembers them. A file
/// that changed at its holder (another size or mtime) gets a new number, so a reader
/// holding the old version open keeps its own page cache and size: the kernel caches
/// pages per inode, and one inode for both versions would mix their bytes. An old
/// version's number goes once the kernel forgets it (its last open file closed and its
/// dentry dropped), so a holder whose files keep changing does not grow the table.
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    /// How many lookups the kernel holds of each number (FUSE's lookup count).
    lookups: HashMap<u64, u64>,
    next: u64,
}

impl Inodes {
    /// The kernel answered a lookup of `ino` with an entry: it holds one more.
    fn looked_up(&mut self, ino: u64) {
        *self.lookups.entry(ino).or_insert(0) += 1;
    }

    /// The kernel dropped `n` lookups of `ino`. A number no path leads to any more (an
    /// earlier version) and that the kernel no longer holds is gone; a path's current
    /// number stays, so numbers are stable while a path is there.
    fn forget(&mut self, ino: u64, n: u64) {
        let left = match self.lookups.get_mut(&ino) {
            Some(c) => {
                *c = c.saturating_sub(n);
                *c
            }
            None => 0,
        };
        if left > 0 {
            return;
        }
        self.lookups.remove(&ino);
        let current = self
            .by_ino
            .get(&ino)
            .is_some_and(|node| self.by_path.get(&node.path) == Some(&ino));
        if !current && ino != 1 {
            self.by_ino.remove(&ino);
        }
    }
}

/// A file the kernel opened: the stream serving the version it opened.
struct OpenFile {
    /// `share/path`, as the daemon names it.
    file: String,
    url: Mutex<String>,
    size: u64,
    /// The content id of the version opened.
    id: String,
    /// When a read of it last stalled (its holder unreachable), if one did.
    stalled: Mutex<Option<Instant>>,
}

/// A folder's entries, and when its holder listed them.
type Listing = (Instant, Arc<Vec<LsEntry>>);

struct Shared {
    client: Client,
    /// `SHARE` or `SHARE/FOLDER`: what is mounted.
    root: String,
    inodes: Mutex<Inodes>,
    lists: Mutex<HashMap<String, Listing>>,
    open: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    since: SystemTime,
}

impl Shared {
    fn target(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{rel}", self.root)
        }
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inodes.locked().by_ino.get(&u64::from(ino)).cloned()
    }

    /// The inode number of `node`'s path, given one the first time it is seen, and a
    /// new one when the listing shows a file changed (see [`Inodes`]).
    fn intern(&self, node: Node) -> u64 {
        let mut t = self.inodes.locked();
        if let Some(&ino) = t.by_path.get(&node.path) {
            if let Some(n) = t.by_ino.get_mut(&ino) {
                let same = n.dir == node.dir
                    && (node.dir || (n.size == node.size && n.mtime_ns == node.mtime_ns));
                if same {
                    return ino;
                }
            }
        }
        let ino = t.next;
        t.next += 1;
        t.by_path.insert(node.path.clone(), ino);
        t.by_ino.insert(ino, node);
        ino
    }

    /// The size of the version opened through `ino`, when its listing said otherwise.
    fn set_size(&self, ino: u64, size: u64) {
        if let Some(n) = self.inodes.locked().by_ino.get_mut(&ino) {
            n.size = size;
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: self.since,
            // A file manager sorts by it; a holder that did not say gets the mount's start.
            mtime: match node.mtime_ns {
                0 => self.since,
                ns => UNIX_EPOCH + Duration::from_nanos(ns),
            },
            ctime: self.since,
            crtime: self.since,
            kind: if node.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if node.dir { 0o555 } else { 0o444 },
            nlink: if node.dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 128 * 1024,
        }
    }

    /// The folder `rel` as its holder lists it, reused for [`LIST_FRESH`].
    async fn list(&self, rel: &str) -> Result<Arc<Vec<LsEntry>>, Errno> {
        if let Some((at, l)) = self.lists.locked().get(rel) {
            if at.elapsed() < LIST_FRESH {
                return Ok(l.clone());
            }
        }
        let target = self.target(rel);
        match self.client.ls(&target).await {
            Ok(reply) => {
                let l = Arc::new(reply.entries);
                self.lists
                    .locked()
                    .insert(rel.to_string(), (Instant::now(), l.clone()));
                Ok(l)
            }
            Err(ControlError::Api { status: 404, .. }) => Err(Errno::ENOENT),
            Err(e) => {
                log::warn!("mount: cannot list {target}: {e}");
                Err(Errno::EIO)
            }
        }
    }

    /// `len` bytes at `offset` of `f` (fewer at its end), reopening its stream once if
    /// the daemon closed it meanwhile (idle, or replaced) and it still serves the
    /// version opened.
    async fn read(&self, f: &OpenFile, offset: u64, len: u64) -> Result<Vec<u8>, MountError> {
        let len = len.min(f.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let url = f.url.locked().clone();
        let wait = match *f.stalled.locked() {
            Some(at) if at.elapsed() < READ_STALL => RETRY_STALL,
            _ => READ_STALL,
        };
        let got = self.read_from(f, &url, offset, len, wait).await;
        *f.stalled.locked() = match &got {
            Err(MountError::Stalled { .. }) => Some(Instant::now()),
            _ => None,
        };
        got
    }

    async fn read_from(
        &self,
        f: &OpenFile,
        url: &str,
        offset: u64,
        len: u64,
        wait: Duration,
    ) -> Result<Vec<u8>, MountError> {
        match ranged_get(&f.file, url, offset, len, wait).await {
            Err(MountError::StreamGone { .. }) => {
                let w = self
                    .client
                    .watch(&FileRequest {
                        file: f.file.clone(),
                    })
                    .await
                    .map_err(|_| MountError::StreamGone {
                        file: f.file.clone(),
                    })?;
                // Bytes of another version would corrupt what the reader has so far.
                if w.id != f.id {
                    return Err(MountError::VersionChanged {
                        file: f.file.clone(),
                    });
                }
                *f.url.locked() = w.url.clone();
                ranged_get(&f.file, &w.url, offset, len, wait).await
            }
            other => other,
        }
    }
}

/// GET `url` for bytes `offset..offset+len`, each piece of the body within `wait` of
/// the one before.
async fn ranged_get(
    file: &str,
    url: &str,
    offset: u64,
    len: u64,
    wait: Duration,
) -> Result<Vec<u8>, MountError> {
    let bad_url = || MountError::StreamUrl {
        file: file.to_string(),
        url: url.to_string(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad_url)?;
    let (authority, path) = rest.split_once('/').ok_or_else(bad_url)?;
    let addr: SocketAddr = authority.parse().map_err(|_| bad_url())?;
    if !addr.ip().is_loopback() {
        return Err(bad_url());
    }
    let stall = || MountError::Stalled {
        file: file.to_string(),
        offset,
        secs: wait.as_secs(),
    };
    let request_failed = |source| MountError::StreamRequest {
        file: file.to_string(),
        source,
    };
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| stall())?
        .map_err(|source| MountError::ConnectStream {
            file: file.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(request_failed)?;
    // The connection ends with this read: dropping `sender` lets it close.
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/{path}"))
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::RANGE,
            format!("bytes={offset}-{}", offset + len - 1),
        )
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|_| bad_url())?;
    let resp = tokio::time::timeout(wait, sender.send_request(req))
        .await
        .map_err(|_| stall())?
        .map_err(request_failed)?;
    match resp.status().as_u16() {
        206 => {}
        404 => {
            return Err(MountError::StreamGone {
                file: file.to_string(),
            })
        }
        status => {
            return Err(MountError::StreamStatus {
                file: file.to_string(),
                status,
            })
        }
    }
    let mut body = resp.into_body();
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let frame = tokio::time::timeout(wait, body.frame())
            .await
            .map_err(|_| stall())?;
        match frame {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(request_failed(e)),
            None => break,
        }
    }
    if out.len() as u64 != len {
        return Err(MountError::ShortRead {
            file: file.to_string(),
            offset,
            got: out.len() as u64,
            want: len,
        });
    }
    Ok(out)
}

/// The filesystem the kernel talks to: each request is answered from a task on the
/// CLI's runtime, so a read waiting on a distant holder holds up no other request.
struct Remote {
    rt: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

fn name_of(name: &OsStr) -> Option<&str> {
    name.to_str().filter(|n| !n.is_empty() && !n.contains('/'))
}

impl Filesystem for Remote {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (Some(dir), Some(name)) = (self.shared.node(parent), name_of(name)) else {
            return reply.error(Errno::ENOENT);
        };
        if !dir.dir {
            return reply.error(Errno::ENOTDIR);
        }
        let (s, name) = (self.shared.clone(), name.to_string());
        self.rt.spawn(async move {
            let list = match s.list(&dir.path).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let Some(e) = list.iter().find(|e| e.name == name) else {
                return reply.error(Errno::ENOENT);
            };
            let path = if dir.path.is_empty() {
                name
            } else {
                format!("{}/{name}", dir.path)
            };
            let node = Node {
                path,
                dir: e.dir,
                size: e.size,
                mtime_ns: e.mtime_ns,
            };
            let ino = s.intern(node.clone());
            s.inodes.locked().looked_up(ino);
            reply.entry(&TTL, &s.attr(ino, &node), Generation(0));
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.inodes.locked().forget(u64::from(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.node(ino) {
            Some(n) => reply.attr(&TTL, &self.shared.attr(ino.into(), &n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !dir.dir {
            return reply.error(Errno::ENOTDIR);
        }
        let s = self.shared.clone();
        self.rt.spawn(async move {
            let list = match s.list(&dir.path).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let mut all = vec![
                (u64::from(ino), FileType::Directory, ".".to_string()),
                (u64::from(ino), FileType::Directory, "..".to_string()),
            ];
            for e in list
                .iter()
                .filter(|e| name_of(OsStr::new(&e.name)).is_some())
            {
                let path = if dir.path.is_empty() {
                    e.name.clone()
                } else {
                    format!("{}/{}", dir.path, e.name)
                };
                let kind = if e.dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                let node = Node {
                    path,
                    dir: e.dir,
                    size: e.size,
                    mtime_ns: e.mtime_ns,
                };
                all.push((s.intern(node), kind, e.name.clone()));
            }
            for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(node) = self.shared.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if node.dir {
            return reply.error(Errno::EISDIR);
        }
        let s = self.shared.clone();
        self.rt.spawn(async move {
            let file = s.target(&node.path);
            // One stream per file the kernel opens: it pins the manifest it opened with.
            let w = match s.client.watch(&FileRequest { file: file.clone() }).await {
                Ok(w) => w,
                Err(ControlError::Api { status: 404, .. }) => return reply.error(Errno::ENOENT),
                Err(e) => {
                    log::warn!("mount: cannot open {file}: {e}");
                    return reply.error(Errno::EIO);
                }
            };
            let fh = s.next_fh.fetch_add(1, Ordering::Relaxed);
            let size = w.size;
            s.open.locked().insert(
                fh,
                Arc::new(OpenFile {
                    file,
                    url: Mutex::new(w.url),
                    size,
                    id: w.id,
                    stalled: Mutex::new(None),
                }),
            );
            // The kernel learns the opened version's size, whatever the listing said.
            s.set_size(u64::from(ino), size);
            reply.opened(FileHandle(fh), FopenFlags::empty());
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.shared.open.locked().get(&u64::from(fh)).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let s = self.shared.clone();
        self.rt.spawn(async move {
            match s.read(&f, offset, u64::from(size)).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    log::warn!("mount: {e}");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The daemon's stream stays open for other readers of the same file; it closes
        // it once nobody has read it for a while.
        self.shared.open.locked().remove(&u64::from(fh));
        reply.ok();
    }

    /// Nothing is buffered to flush: every close passes here.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Files carry no extended attributes; ENOSYS tells the kernel to stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // Every write-type request: the mount is read-only (the kernel refuses most of
    // them already, as it is mounted `ro`; these answer the same if one gets through).

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// One of our mounts, as the mount table shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mounted {
    /// `SHARE` or `SHARE/FOLDER`.
    pub target: String,
    pub dir: PathBuf,
}

/// `/proc/mounts` writes a space in a field as `\040` (and tab, newline, backslash the
/// same way): the path as it is.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Our FUSE mounts in a mount table's text (`/proc/self/mounts`' format).
pub fn parse_mounts(table: &str) -> Vec<Mounted> {
    table
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (source, dir, kind) = (f.next()?, f.next()?, f.next()?);
            let target = unescape(source).strip_prefix(SOURCE_PREFIX)?.to_string();
            kind.starts_with("fuse").then(|| Mounted {
                target,
                dir: PathBuf::from(unescape(dir)),
            })
        })
        .collect()
}

/// The mounts `watchalong mount` made on this machine (those still in the table).
pub fn mounts() -> Result<Vec<Mounted>, MountError> {
    let table = std::fs::read_to_string("/proc/self/mounts").map_err(MountError::ReadMounts)?;
    Ok(parse_mounts(&table))
}

/// Unmounts `dir` (lazily with `MNT_DETACH`). A user other than root may not unmount
/// (EPERM): the setuid `fusermount3 -u` that mounted it for them unmounts it too.
fn umount(dir: &Path, flags: libc::c_int) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if flags & libc::MNT_DETACH != 0 {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|_| e)?;
    if out.status.success() {
        return Ok(());
    }
    // fusermount3 says why (busy, not ours); the same failure as umount2's when it
    // does not.
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if why.contains("busy") {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(std::io::Error::other(if why.is_empty() {
        "fusermount3 -u failed".to_string()
    } else {
        why
    }))
}

/// Gets `dir` ready to mount onto: a stale mount of ours left by a crash (its FUSE
/// server gone: "Transport endpoint is not connected") is lazily unmounted; then it
/// must be an empty folder.
fn prepare(dir: &Path) -> Result<(), MountError> {
    let shown = dir.display().to_string();
    if mounts()?.iter().any(|m| m.dir == dir) {
        match std::fs::metadata(dir) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                umount(dir, libc::MNT_DETACH).map_err(|source| MountError::CleanStale {
                    dir: shown.clone(),
                    source,
                })?;
                eprintln!("removed a stale mount at {shown} (left by a mount that ended badly)");
            }
            _ => return Err(MountError::AlreadyMounted { dir: shown }),
        }
    }
    let meta = std::fs::metadata(dir).map_err(|source| MountError::CheckDir {
        dir: shown.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(MountError::NotAFolder { dir: shown });
    }
    let mut entries = std::fs::read_dir(dir).map_err(|source| MountError::CheckDir {
        dir: shown.clone(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty { dir: shown });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|source| MountError::NoFuse { source })?;
    Ok(())
}

/// Mounts `target` (`SHARE` or `SHARE/FOLDER`) at `dir` and serves it until Ctrl-C or
/// SIGTERM (or until someone unmounts it), then unmounts.
pub async fn run(client: Client, target: &str, dir: &Path) -> Result<(), MountError> {
    let root = target.trim_matches('/').to_string();
    let dir = std::path::absolute(dir).map_err(|source| MountError::CheckDir {
        dir: dir.display().to_string(),
        source,
    })?;
    let shown = dir.display().to_string();
    prepare(&dir)?;
    let top = client
        .ls(&root)
        .await
        .map_err(|source| MountError::ListShare {
            target: root.clone(),
            source,
        })?;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let shared = Arc::new(Shared {
        client,
        root: root.clone(),
        inodes: Mutex::new(Inodes {
            by_ino: HashMap::from([(
                1,
                Node {
                    path: String::new(),
                    dir: true,
                    size: 0,
                    mtime_ns: 0,
                },
            )]),
            by_path: HashMap::from([(String::new(), 1)]),
            lookups: HashMap::new(),
            next: 2,
        }),
        lists: Mutex::new(HashMap::from([(
            String::new(),
            (Instant::now(), Arc::new(top.entries)),
        )])),
        open: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        uid,
        gid,
        since: SystemTime::now(),
    });
    let fs = Remote {
        rt: tokio::runtime::Handle::current(),
        shared,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::FSName(format!("{SOURCE_PREFIX}{root}")),
        MountOption::Subtype("watchalong".into()),
    ];
    let at = dir.clone();
    // Mounting waits for the kernel's first request: blocking work, off the runtime.
    let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &at, &config))
        .await
        .map_err(|e| MountError::Mount {
            dir: shown.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| MountError::Mount {
            dir: shown.clone(),
            source,
        })?;
    eprintln!("mounted {root} at {shown} (read-only); Ctrl-C or SIGTERM unmounts");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(MountError::Signal)?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.map_err(MountError::Signal)?; break; }
            _ = term.recv() => break,
            _ = check.tick() => {
                // Unmounted by someone else (`umount DIR`): the session ended.
                if session.guard.is_finished() {
                    eprintln!("{shown} was unmounted");
                    return Ok(());
                }
            }
        }
    }
    // A plain unmount fails while a program holds a file open; then detach it lazily: it
    // is gone from the tree at once, and the kernel ends it when this process exits.
    match umount(&dir, 0) {
        Ok(()) => {
            let joined = tokio::task::spawn_blocking(move || session.join());
            let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            umount(&dir, libc::MNT_DETACH).map_err(|source| MountError::Unmount {
                dir: shown.clone(),
                source,
            })?;
            // Dropping the session would wait for its thread, which serves the files
            // still open until this process exits and closes /dev/fuse.
            std::mem::forget(session);
        }
        Err(source) => return Err(MountError::Unmount { dir: shown, source }),
    }
    eprintln!("unmounted {shown}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_version_s_inode_goes_once_forgotten_and_a_current_one_stays() {
        let node = |size| Node {
            path: "f".into(),
            dir: false,
            size,
            mtime_ns: 1,
        };
        let mut t = Inodes {
            by_ino: HashMap::from([(2, node(1))]),
            by_path: HashMap::from([("f".to_string(), 2)]),
            lookups: HashMap::new(),
            next: 3,
        };
        t.looked_up(2);
        t.looked_up(2);
        // The file changed: a listing gave it number 3.
        t.by_ino.insert(3, node(2));
        t.by_path.insert("f".into(), 3);
        t.looked_up(3);
        t.forget(2, 1);
        assert!(t.by_ino.contains_key(&2), "still held by the kernel");
        t.forget(2, 1);
        assert!(
            !t.by_ino.contains_key(&2),
            "an earlier version is kept for ever"
        );
        t.forget(3, 1);
        assert!(
            t.by_ino.contains_key(&3),
            "the current number of a path went"
        );
        // The root is never dropped, whatever the kernel says.
        t.by_ino.insert(
            1,
            Node {
                path: String::new(),
                dir: true,
                size: 0,
                mtime_ns: 0,
            },
        );
        t.forget(1, 5);
        assert!(t.by_ino.contains_key(&1));
    }

    #[test]
    fn the_mount_table_yields_only_our_mounts_with_escaped_spaces_restored() {
        let table = "proc /proc proc rw 0 0\n\
            watchalong:films /mnt/my\\040films fuse ro,nosuid 0 0\n\
            other:x /mnt/x fuse rw 0 0\n\
            watchalong:fake /mnt/y ext4 rw 0 0\n";
        assert_eq!(
            parse_mounts(table),
            vec![Mounted {
                target: "films".into(),
                dir: PathBuf::from("/mnt/my films"),
            }]
        );
    }

    /// A loopback listener answering every connection with `answer` (nothing: it reads
    /// the request and keeps the connection open, silent); returns its address.
    async fn server(answer: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    let _ = c.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        at
    }

    #[tokio::test]
    async fn a_read_that_gets_no_bytes_fails_as_stalled_once_its_wait_is_over() {
        let at = server(b"").await;
        let started = Instant::now();
        let r = ranged_get(
            "s/f",
            &format!("http://{at}/t/s/f"),
            0,
            10,
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(r, Err(MountError::Stalled { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        // Headers, then a body that stops short: stalled too, not a hang.
        let at = server(b"HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\n\r\nabc").await;
        let r = ranged_get(
            "s/f",
            &format!("http://{at}/t/s/f"),
            0,
            10,
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(r, Err(MountError::Stalled { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_closed_stream_is_told_from_other_failures_and_a_full_range_reads() {
        let at = server(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let r = ranged_get(
            "s/f",
            &format!("http://{at}/t/s/f"),
            0,
            10,
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(r, Err(MountError::StreamGone { .. })), "{r:?}");
        let at = server(b"HTTP/1.1 206 Partial Content\r\ncontent-length: 3\r\n\r\nabc").await;
        let r = ranged_get(
            "s/f",
            &format!("http://{at}/t/s/f"),
            7,
            3,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(r.unwrap(), b"abc");
    }

    #[tokio::test]
    async fn a_stream_url_off_loopback_is_never_fetched() {
        let r = ranged_get(
            "s/f",
            "http://10.9.9.9:80/t/s/f",
            0,
            10,
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(r, Err(MountError::StreamUrl { .. })), "{r:?}");
    }
}
