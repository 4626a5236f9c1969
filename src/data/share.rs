//! Shared folders on this node's disk: turning a request path into a file inside the
//! share and nowhere else, listing, cutting files into BLAKE3-hashed chunks (the
//! manifest), and reading one chunk. It must never open a path outside a share root:
//! `..`, `.`, absolute paths, NUL bytes, backslashes and symlinks that lead out are all
//! refused before or after resolution, and what a file open reached is checked again.
//! A manifest another member sent is checked ([`Manifest::checked`]) before anything is
//! sized by it. (Past 800 lines only by its unit tests.)

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::base::config::{ShareConfig, ShareMode};
use crate::base::lock::Recover;

/// Chosen by measurement (docs/benchmarks.md): small enough that the first chunk of a
/// video arrives quickly, large enough that per-request overhead stays a few percent.
pub const CHUNK_SIZE: u64 = 256 * 1024;
/// Overrides [`CHUNK_SIZE`] for benchmarks that compare chunk sizes; manifests carry
/// their chunk size, so nodes with different settings still understand each other.
pub const CHUNK_SIZE_ENV: &str = "WATCHALONG_CHUNK_SIZE";
/// The smallest and largest chunk a manifest may use: below, per-chunk overhead
/// dominates; above, one chunk held in memory (a verify, a relay reply) costs too much.
pub const MIN_CHUNK_SIZE: u64 = 4096;
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Content-defined chunks (FastCDC, 2020 version) for read-write shares: a cut falls where
/// the content says, so an insertion or a deletion in the middle of a file moves the cuts
/// only near it and a receiver refetches the chunks around the edit, not the rest. The
/// average is the fixed chunk's size (what the measurements chose); the bounds keep every
/// chunk between a quarter and four times that. Read-only shares keep fixed chunks: a
/// film is not edited, and a stream maps a byte to its chunk by one division.
pub const CDC_MIN: u32 = 64 * 1024;
pub const CDC_AVG: u32 = 256 * 1024;
pub const CDC_MAX: u32 = 1024 * 1024;
/// The largest file a manifest may describe (4 TiB): far beyond any video, and it keeps
/// every offset computed from a peer's manifest (`index * chunk_size`) inside `u64`.
pub const MAX_FILE_SIZE: u64 = 1 << 42;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("no share is called {0:?}")]
    UnknownShare(String),
    #[error("the path {0:?} is not allowed (it must stay inside the share)")]
    RefusePath(String),
    #[error("{0} does not exist in the share")]
    NotFound(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chunk {index} is beyond the end of {path}")]
    SeekChunk { path: String, index: u64 },
    #[error("chunk {index} of {path} has changed since its manifest was made")]
    ChunkChanged { path: String, index: u64 },
    /// A manifest from another member that cannot be trusted to size anything.
    #[error("the manifest {member} sent for {path} is refused ({reason}); that member may run a different version or be misbehaving")]
    RefuseManifest {
        member: String,
        path: String,
        reason: String,
    },
    #[error("the range {range:?} is outside {path} ({size} bytes)")]
    ReadRange {
        path: String,
        range: String,
        size: u64,
    },
}

/// The most one ranged read returns, so a reply is bounded in memory; a longer range is
/// answered in part and the reply's `Content-Range` says which.
pub const MAX_RANGE: u64 = 8 * 1024 * 1024;

/// Bytes read from a file by range: `data` starts at `start` of a file of `size` bytes.
#[derive(Debug)]
pub struct RangeRead {
    pub size: u64,
    pub start: u64,
    pub data: Vec<u8>,
}

/// An HTTP `Range` header (`bytes=START-`, `bytes=START-END` or `bytes=-LAST`) against a
/// file of `size` bytes: (start, end inclusive), or `None` when it cannot be satisfied.
pub fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    if a.is_empty() {
        // The last N bytes.
        let n: u64 = b.parse().ok()?;
        return (n > 0 && size > 0).then(|| (size.saturating_sub(n), size - 1));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        size.checked_sub(1)?
    } else {
        b.parse::<u64>().ok()?.min(size.checked_sub(1)?)
    };
    (start <= end && start < size).then_some((start, end))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub share: String,
    pub path: String,
    pub size: u64,
    pub mtime: u64,
    pub mode: u32,
    /// Fixed chunks: each chunk's length (the last one may be shorter). Content-defined
    /// chunks: their average length, which only sizes transfer windows.
    pub chunk_size: u64,
    /// BLAKE3 of each chunk, hex.
    pub chunks: Vec<String>,
    /// Content-defined chunks: each chunk's length (1 byte to [`CDC_MAX`]), in order,
    /// summing to `size`. Empty for fixed chunks (and from members older than
    /// content-defined chunking).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lengths: Vec<u32>,
    /// Where each content-defined chunk starts, from `lengths`: filled by
    /// [`Manifest::checked`] and by the node that builds the manifest, so a lookup is a
    /// binary search. Never sent.
    #[serde(skip)]
    pub starts: Vec<u64>,
}

impl Manifest {
    /// A manifest `member` sent when asked for `path` in `share`, checked before anything
    /// is sized by it: the chunk size within [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`], the
    /// file within [`MAX_FILE_SIZE`], exactly one chunk per `chunk_size` bytes (the last
    /// one partial), each hash 64 lowercase hex digits, the share and path the ones asked
    /// for. The mode keeps only its permission bits, so a peer cannot make a setuid file.
    pub fn checked(
        mut self,
        member: &str,
        share: &str,
        path: &str,
    ) -> Result<Manifest, ShareError> {
        let refuse = |reason: String| ShareError::RefuseManifest {
            member: member.to_string(),
            path: format!("{share}/{path}"),
            reason,
        };
        let canonical = |p: &str| clean_path(p).map(|parts| parts.join("/")).ok();
        if self.share != share
            || canonical(&self.path).is_none()
            || canonical(&self.path) != canonical(path)
        {
            return Err(refuse(format!(
                "it describes {}/{} instead",
                self.share.escape_debug(),
                self.path.escape_debug()
            )));
        }
        if clean_path(&self.path).is_err() {
            return Err(refuse("its path leaves the share".into()));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(refuse(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes",
                self.chunk_size
            )));
        }
        if self.size > MAX_FILE_SIZE {
            return Err(refuse(format!(
                "size {} is above the {MAX_FILE_SIZE}-byte limit",
                self.size
            )));
        }
        if self.lengths.is_empty() {
            let expected = self.size.div_ceil(self.chunk_size);
            if self.chunks.len() as u64 != expected {
                return Err(refuse(format!(
                    "{} chunk hashes for {} bytes in chunks of {} (expected {expected})",
                    self.chunks.len(),
                    self.size,
                    self.chunk_size
                )));
            }
        } else {
            // Every chunk within what the chunker makes (no holder serves a longer one),
            // and together exactly the file: a peer's lengths size each buffer and place
            // each write.
            if self.lengths.len() != self.chunks.len() {
                return Err(refuse(format!(
                    "{} chunk lengths for {} chunk hashes",
                    self.lengths.len(),
                    self.chunks.len()
                )));
            }
            if let Some(i) = self.lengths.iter().position(|l| *l == 0 || *l > CDC_MAX) {
                return Err(refuse(format!(
                    "chunk {i}'s length {} is outside 1..={CDC_MAX} bytes",
                    self.lengths[i]
                )));
            }
            let total: u64 = self.lengths.iter().map(|l| u64::from(*l)).sum();
            if total != self.size {
                return Err(refuse(format!(
                    "its chunk lengths add up to {total} bytes for a {}-byte file",
                    self.size
                )));
            }
        }
        let hex =
            |h: &String| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if let Some(i) = self.chunks.iter().position(|h| !hex(h)) {
            return Err(refuse(format!("chunk {i}'s hash is not 64 hex digits")));
        }
        self.mode &= 0o777;
        Ok(self.indexed())
    }

    /// Fills [`Manifest::starts`] from the chunk lengths.
    pub fn indexed(mut self) -> Manifest {
        let mut at = 0u64;
        self.starts = self
            .lengths
            .iter()
            .map(|l| {
                let start = at;
                at = at.saturating_add(u64::from(*l));
                start
            })
            .collect();
        self
    }

    /// Names this version of the file: the same bytes give the same id on every node
    /// that chunks them alike (content-defined chunks name their lengths too).
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        for c in &self.chunks {
            h.update(c.as_bytes());
        }
        if !self.lengths.is_empty() {
            h.update(b"cdc");
            for l in &self.lengths {
                h.update(&l.to_le_bytes());
            }
        }
        h.finalize().to_hex().to_string()
    }

    /// Where chunk `index` starts in the file.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        if self.lengths.is_empty() {
            return index.saturating_mul(self.chunk_size);
        }
        match self.starts.get(index as usize) {
            Some(s) => *s,
            // Not indexed (a manifest built by hand): added up.
            None => self
                .lengths
                .iter()
                .take(index as usize)
                .map(|l| u64::from(*l))
                .sum(),
        }
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        if !self.lengths.is_empty() {
            return self
                .lengths
                .get(index as usize)
                .map_or(0, |l| u64::from(*l));
        }
        let start = index.saturating_mul(self.chunk_size);
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// The chunk that holds byte `offset` of the file (the last chunk's index past it).
    pub fn chunk_at(&self, offset: u64) -> u64 {
        let last = (self.chunks.len() as u64).saturating_sub(1);
        if self.lengths.is_empty() {
            return (offset / self.chunk_size.max(1)).min(last);
        }
        let i = if self.starts.len() == self.lengths.len() {
            self.starts.partition_point(|s| *s <= offset)
        } else {
            let mut at = 0u64;
            self.lengths
                .iter()
                .take_while(|l| {
                    at = at.saturating_add(u64::from(**l));
                    at <= offset
                })
                .count()
                + 1
        };
        (i as u64).saturating_sub(1).min(last)
    }

    /// Chunk `index` as `file` holds it at its offset, if it is there and matches. The
    /// buffer is sized by the manifest: only a [`Manifest::checked`] one may come here.
    pub fn held_chunk(&self, file: &std::fs::File, index: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let want = self.chunks.get(index as usize)?;
        let mut buf = vec![0u8; self.chunk_len(index).min(MAX_CHUNK_SIZE) as usize];
        file.read_exact_at(&mut buf, self.chunk_offset(index))
            .ok()?;
        (blake3::hash(&buf).to_hex().as_str() == want).then_some(buf)
    }
}

/// The content-defined chunks of what `source` reads: (length, BLAKE3 hex) in order.
pub fn cdc_chunks(source: impl Read) -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    let chunker = fastcdc::v2020::StreamCDC::new(
        source,
        CDC_MIN as usize,
        CDC_AVG as usize,
        CDC_MAX as usize,
    );
    for c in chunker {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        // At most CDC_MAX: fits.
        out.push((c.length as u32, blake3::hash(&c.data).to_hex().to_string()));
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    /// When the file last changed, in ns since the epoch (0 for a folder, and from
    /// members older than this field): with the size, it tells one version from the next.
    #[serde(default)]
    pub mtime_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    pub name: String,
    pub mode: String,
}

/// Manifests by (share, canonical path), valid while size and mtime (in ns: two writes
/// in one second must not look alike) match; bounded in entries and in chunk hashes held,
/// the oldest entry going first, since every path a member asks about lands here.
#[derive(Default)]
struct ManifestCache {
    map: HashMap<(String, String), (u64, u128, Manifest)>,
    order: std::collections::VecDeque<(String, String)>,
    hashes: usize,
}

/// Manifests cached at most, and chunk hashes in them (64 bytes of hex each).
const CACHE_ENTRIES: usize = 4096;
const CACHE_HASHES: usize = 256 * 1024;

impl ManifestCache {
    fn get(&self, key: &(String, String), size: u64, ns: u128) -> Option<Manifest> {
        self.map
            .get(key)
            .filter(|(s, n, _)| *s == size && *n == ns)
            .map(|(_, _, m)| m.clone())
    }

    fn insert(&mut self, key: (String, String), size: u64, ns: u128, m: Manifest) {
        if m.chunks.len() > CACHE_HASHES {
            return;
        }
        if let Some((_, _, old)) = self.map.remove(&key) {
            self.hashes -= old.chunks.len();
            self.order.retain(|k| k != &key);
        }
        while self.map.len() >= CACHE_ENTRIES || self.hashes + m.chunks.len() > CACHE_HASHES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some((_, _, old)) = self.map.remove(&oldest) {
                self.hashes -= old.chunks.len();
            }
        }
        self.hashes += m.chunks.len();
        self.order.push_back(key.clone());
        self.map.insert(key, (size, ns, m));
    }
}

pub struct Shares {
    shares: Vec<ShareConfig>,
    chunk_size: u64,
    cache: Mutex<ManifestCache>,
}

/// Splits a request path into plain components, refusing anything that could climb out.
pub fn clean_path(raw: &str) -> Result<Vec<String>, ShareError> {
    let refuse = || ShareError::RefusePath(raw.to_string());
    if raw.contains('\0') || raw.contains('\\') || raw.starts_with('/') {
        return Err(refuse());
    }
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(s) => {
                let s = s.to_str().ok_or_else(refuse)?;
                parts.push(s.to_string());
            }
            Component::CurDir => {}
            _ => return Err(refuse()),
        }
    }
    // `Path::components` drops a lone "." and normalises "a/./b"; refuse literal ".."
    // written any way the components would not show.
    if raw.split('/').any(|p| p == "..") {
        return Err(refuse());
    }
    Ok(parts)
}

impl Shares {
    pub fn new(shares: Vec<ShareConfig>, chunk_size: u64) -> Shares {
        Shares {
            shares,
            chunk_size: chunk_size.clamp(4096, 64 * 1024 * 1024),
            cache: Mutex::new(ManifestCache::default()),
        }
    }

    pub fn list(&self) -> Vec<ShareInfo> {
        self.shares
            .iter()
            .map(|s| ShareInfo {
                name: s.name.clone(),
                mode: match s.mode {
                    ShareMode::ReadOnly => "read-only".into(),
                    ShareMode::ReadWrite => "read-write".into(),
                },
            })
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.shares.iter().map(|s| s.name.clone()).collect()
    }

    /// The file or folder `raw` names inside `share`, after following symlinks, only if
    /// it is still inside the share's root.
    pub fn resolve(&self, share: &str, raw: &str) -> Result<PathBuf, ShareError> {
        self.resolve_in(share, raw).map(|(real, _)| real)
    }

    /// Opens the regular file `raw` names inside `share`, for reading. What was opened
    /// is checked again through `/proc/self/fd`, so a symlink swapped in between the
    /// resolution and the open cannot lead out; a FIFO or a device is refused without
    /// blocking.
    fn open_file(&self, share: &str, raw: &str) -> Result<(std::fs::File, PathBuf), ShareError> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let (path, root) = self.resolve_in(share, raw)?;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(read)?;
        if !f.metadata().map_err(read)?.is_file() {
            return Err(ShareError::NotFound(raw.to_string()));
        }
        let opened =
            std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(read)?;
        if !opened.starts_with(&root) {
            return Err(ShareError::RefusePath(raw.to_string()));
        }
        Ok((f, path))
    }

    /// The file or folder `raw` names inside `share` and the share's canonical root.
    fn resolve_in(&self, share: &str, raw: &str) -> Result<(PathBuf, PathBuf), ShareError> {
        let cfg = self
            .shares
            .iter()
            .find(|s| s.name == share)
            .ok_or_else(|| ShareError::UnknownShare(share.to_string()))?;
        let parts = clean_path(raw)?;
        let root = cfg.path.canonicalize().map_err(|source| ShareError::Read {
            path: cfg.path.clone(),
            source,
        })?;
        let mut p = root.clone();
        for part in &parts {
            p.push(part);
        }
        let real = p
            .canonicalize()
            .map_err(|_| ShareError::NotFound(raw.to_string()))?;
        if !real.starts_with(&root) {
            return Err(ShareError::RefusePath(raw.to_string()));
        }
        Ok((real, root))
    }

    pub fn ls(&self, share: &str, raw: &str) -> Result<Vec<Entry>, ShareError> {
        let dir = self.resolve(share, raw)?;
        let read = |source| ShareError::Read {
            path: dir.clone(),
            source,
        };
        let mut v = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(read)? {
            let e = e.map_err(read)?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Ok(kind) = e.file_type() else { continue };
            // A symlink is listed only if it leads somewhere inside the share: its target's
            // size and kind outside would be a leak.
            let meta = if kind.is_symlink() {
                let inside = match raw.trim_end_matches('/') {
                    "" => name.clone(),
                    dir => format!("{dir}/{name}"),
                };
                match self
                    .resolve(share, &inside)
                    .ok()
                    .and_then(|p| std::fs::metadata(p).ok())
                {
                    Some(m) => m,
                    None => continue,
                }
            } else {
                match e.metadata() {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            };
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .filter(|_| !meta.is_dir())
                .unwrap_or(0);
            v.push(Entry {
                name,
                dir: meta.is_dir(),
                size: if meta.is_dir() { 0 } else { meta.len() },
                mtime_ns,
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The file's manifest, from the cache when the file has not changed.
    pub fn manifest(&self, share: &str, raw: &str) -> Result<Manifest, ShareError> {
        let path = self.resolve(share, raw)?;
        let meta = std::fs::metadata(&path).map_err(|source| ShareError::Read {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(ShareError::NotFound(raw.to_string()));
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Every spelling of one path ("a/./b", "./a/b") is one entry.
        let canonical = clean_path(raw)?.join("/");
        let key = (share.to_string(), canonical.clone());
        if let Some(m) = self.cache.locked().get(&key, meta.len(), mtime_ns) {
            return Ok(m);
        }
        use std::os::unix::fs::PermissionsExt;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        let (mut f, _) = self.open_file(share, raw)?;
        let mut chunks = Vec::new();
        let mut lengths = Vec::new();
        let mut size = 0u64;
        let content_defined = self
            .shares
            .iter()
            .any(|s| s.name == share && s.mode == ShareMode::ReadWrite);
        if content_defined {
            for (len, hash) in cdc_chunks(std::io::BufReader::new(&mut f)).map_err(read)? {
                size += u64::from(len);
                lengths.push(len);
                chunks.push(hash);
            }
        } else {
            let mut buf = vec![0u8; self.chunk_size as usize];
            loop {
                let n = read_full(&mut f, &mut buf).map_err(read)?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                chunks.push(blake3::hash(&buf[..n]).to_hex().to_string());
                if n < buf.len() {
                    break;
                }
            }
        }
        let m = Manifest {
            share: share.to_string(),
            path: canonical,
            size,
            mtime,
            mode: meta.permissions().mode() & 0o777,
            chunk_size: if content_defined {
                u64::from(CDC_AVG)
            } else {
                self.chunk_size
            },
            chunks,
            lengths,
            starts: Vec::new(),
        }
        .indexed();
        self.cache
            .locked()
            .insert(key, meta.len(), mtime_ns, m.clone());
        Ok(m)
    }

    /// Chunk `index` of the file, checked against `hash` so a file that changed since
    /// its manifest never passes for the old content. `at` is where the chunk starts and
    /// how long it is, from the asker's manifest (content-defined chunks have no fixed
    /// place); without it (a member older than content-defined chunks) the chunk is the
    /// `index`th of this node's fixed size.
    pub fn chunk(
        &self,
        share: &str,
        raw: &str,
        index: u64,
        at: Option<(u64, u64)>,
        hash: &str,
    ) -> Result<Vec<u8>, ShareError> {
        let (mut f, path) = self.open_file(share, raw)?;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        // The index and the offset come from a request: past any file, not an overflow;
        // the length is the request's, bounded by the largest chunk this node's own
        // manifests have, so a request never sizes a bigger buffer.
        let (offset, len) = match at {
            Some((offset, len)) => (
                Some(offset),
                len.min(self.chunk_size.max(u64::from(CDC_MAX))),
            ),
            None => (index.checked_mul(self.chunk_size), self.chunk_size),
        };
        let offset = offset.ok_or_else(|| ShareError::SeekChunk {
            path: raw.to_string(),
            index,
        })?;
        f.seek(SeekFrom::Start(offset)).map_err(read)?;
        let mut buf = vec![0u8; len as usize];
        let n = read_full(&mut f, &mut buf).map_err(read)?;
        buf.truncate(n);
        if blake3::hash(&buf).to_hex().as_str() != hash {
            return Err(ShareError::ChunkChanged {
                path: raw.to_string(),
                index,
            });
        }
        Ok(buf)
    }
}

impl Shares {
    /// Bytes of a file, by an HTTP `Range` header or from the start when there is none,
    /// at most [`MAX_RANGE`] of them.
    pub fn read_range(
        &self,
        share: &str,
        raw: &str,
        range: Option<&str>,
    ) -> Result<RangeRead, ShareError> {
        let (mut f, path) = self.open_file(share, raw)?;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        let size = f.metadata().map_err(read)?.len();
        let (start, len) = match range {
            None => (0, size),
            Some(h) => match parse_range(h, size) {
                Some((start, end)) => (start, end - start + 1),
                None => {
                    return Err(ShareError::ReadRange {
                        path: raw.to_string(),
                        range: h.to_string(),
                        size,
                    })
                }
            },
        };
        f.seek(SeekFrom::Start(start)).map_err(read)?;
        let mut data = vec![0u8; len.min(MAX_RANGE) as usize];
        let n = read_full(&mut f, &mut data).map_err(read)?;
        data.truncate(n);
        Ok(RangeRead { size, start, data })
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The longest file name Linux file systems take (`NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;

/// A hidden file of ours beside `dest`: `.NAME` then `suffix` (which starts with
/// `.watchalong-`, so scans skip it). When that would pass [`NAME_MAX`] (a legal name of
/// up to 255 bytes plus our suffix), NAME is replaced by a hash of it, so a file with a
/// long name still syncs; the same name always gives the same hidden name.
pub fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let full = format!(".{name}{suffix}");
    if full.len() <= NAME_MAX {
        return dest.with_file_name(full);
    }
    let hash = blake3::hash(name.as_bytes()).to_hex();
    dest.with_file_name(format!(".{}{suffix}", &hash.as_str()[..32]))
}

/// A write refused by a read-only file system or by permissions.
pub fn refused(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
        || matches!(
            e.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(dir: &Path) -> Shares {
        Shares::new(
            vec![ShareConfig {
                name: "s".into(),
                path: dir.join("root"),
                mode: ShareMode::ReadOnly,
            }],
            CHUNK_SIZE,
        )
    }

    /// A read-write share "rw" at `dir/rw` holding `name` with `bytes`.
    fn rw_share(dir: &Path, name: &str, bytes: &[u8]) -> Shares {
        std::fs::create_dir_all(dir.join("rw")).unwrap();
        std::fs::write(dir.join("rw").join(name), bytes).unwrap();
        Shares::new(
            vec![ShareConfig {
                name: "rw".into(),
                path: dir.join("rw"),
                mode: ShareMode::ReadWrite,
            }],
            CHUNK_SIZE,
        )
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        use rand::{Rng, SeedableRng};
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
        v
    }

    #[test]
    fn a_read_write_share_cuts_by_content_and_an_insertion_moves_only_the_cuts_near_it() {
        let d = tempfile::tempdir().unwrap();
        let old = random(16 << 20, 1);
        let s = rw_share(d.path(), "big", &old);
        let before = s.manifest("rw", "big").unwrap();
        assert!(
            !before.lengths.is_empty(),
            "fixed chunks in a read-write share"
        );
        let (last, rest) = before.lengths.split_last().unwrap();
        assert!(rest.iter().all(|l| (CDC_MIN..=CDC_MAX).contains(l)));
        assert!(*last <= CDC_MAX);
        let mut new = old.clone();
        new.splice(8 << 20..8 << 20, random(1024, 2));
        std::fs::write(d.path().join("rw/big"), &new).unwrap();
        let after = s.manifest("rw", "big").unwrap();
        let known: std::collections::HashSet<&String> = before.chunks.iter().collect();
        let fresh: u64 = (0..after.chunks.len())
            .filter(|i| !known.contains(&after.chunks[*i]))
            .map(|i| after.chunk_len(i as u64))
            .sum();
        assert!(
            fresh <= 2 * u64::from(CDC_MAX),
            "{fresh} bytes of new chunks for a 1 KiB insertion"
        );
        // Each chunk is the bytes at its offset, served from there, and found from any
        // of its bytes.
        for i in 0..after.chunks.len() as u64 {
            let (at, len) = (after.chunk_offset(i), after.chunk_len(i));
            let want = &new[at as usize..(at + len) as usize];
            assert_eq!(
                blake3::hash(want).to_hex().as_str(),
                after.chunks[i as usize]
            );
            let got = s
                .chunk("rw", "big", i, Some((at, len)), &after.chunks[i as usize])
                .unwrap();
            assert_eq!(&got[..], want);
            assert_eq!(after.chunk_at(at), i);
            assert_eq!(after.chunk_at(at + len - 1), i);
        }
        // As a member receives it: sent without its starts, checked, looked up alike.
        let sent: Manifest = serde_json::from_slice(&serde_json::to_vec(&after).unwrap()).unwrap();
        assert!(sent.starts.is_empty());
        let checked = sent.checked("m", "rw", "big").unwrap();
        assert_eq!(checked, after);
        assert_eq!(checked.id(), after.id());
        assert_ne!(checked.id(), before.id());
    }

    #[test]
    fn content_defined_lengths_that_do_not_make_the_file_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = rw_share(d.path(), "f", &random(3 << 20, 3));
        let good = s.manifest("rw", "f").unwrap();
        let refused = |m: Manifest| {
            m.checked("m", "rw", "f")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut short = good.clone();
        short.lengths.pop();
        assert!(refused(short).contains("chunk lengths for"));
        let mut zero = good.clone();
        zero.lengths[0] = 0;
        zero.size -= u64::from(good.lengths[0]);
        assert!(refused(zero).contains("outside"));
        let mut huge = good.clone();
        huge.lengths[0] = u32::MAX;
        assert!(refused(huge).contains("outside"));
        let mut off = good.clone();
        off.lengths[0] += 1;
        assert!(refused(off).contains("add up to"));
    }

    fn setup() -> (tempfile::TempDir, Shares) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/sub")).unwrap();
        std::fs::write(dir.path().join("root/sub/a.txt"), b"hello").unwrap();
        std::fs::write(dir.path().join("secret.txt"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), dir.path().join("root/out"))
            .unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("root/sub/a.txt"),
            dir.path().join("root/in"),
        )
        .unwrap();
        let s = shares(dir.path());
        (dir, s)
    }

    #[test]
    fn paths_that_climb_out_of_the_share_are_refused() {
        let (_d, s) = setup();
        for bad in [
            "../secret.txt",
            "sub/../../secret.txt",
            "/etc/passwd",
            "sub/\0a.txt",
            "..",
            "sub\\..\\..\\x",
            "out",
        ] {
            assert!(s.resolve("s", bad).is_err(), "{bad:?} resolved");
            assert!(s.manifest("s", bad).is_err(), "{bad:?} opened");
        }
        assert!(s.resolve("s", "sub/a.txt").is_ok());
        assert!(
            s.resolve("s", "in").is_ok(),
            "a symlink that stays inside is fine"
        );
        let names: Vec<String> = s.ls("s", "").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            vec!["in", "sub"],
            "the symlink out is not even listed"
        );
    }

    #[test]
    fn every_spelling_of_a_path_is_one_cache_entry_and_the_cache_stays_bounded() {
        let (d, s) = setup();
        std::fs::create_dir_all(d.path().join("root/a")).unwrap();
        std::fs::write(d.path().join("root/a/b"), b"x").unwrap();
        for spelling in ["a/b", "./a/b", "a/./b", "a//b"] {
            assert_eq!(s.manifest("s", spelling).unwrap().path, "a/b");
        }
        assert_eq!(s.cache.lock().unwrap().map.len(), 1);

        let mut c = ManifestCache::default();
        let m = |n: usize| Manifest {
            share: "s".into(),
            path: format!("f{n}"),
            size: 0,
            mtime: 0,
            mode: 0o644,
            chunk_size: CHUNK_SIZE,
            chunks: vec!["0".repeat(64); n],
            lengths: Vec::new(),
            starts: Vec::new(),
        };
        for i in 0..CACHE_ENTRIES + 10 {
            c.insert(("s".into(), format!("f{i}")), 0, 0, m(1));
        }
        assert_eq!(c.map.len(), CACHE_ENTRIES);
        // The oldest went first.
        assert!(c.get(&("s".into(), "f0".into()), 0, 0).is_none());
        assert!(c
            .get(&("s".into(), format!("f{}", CACHE_ENTRIES + 9)), 0, 0)
            .is_some());
        // A big manifest pushes out as many hashes as it brings.
        c.insert(("s".into(), "big".into()), 0, 0, m(CACHE_HASHES - 100));
        assert!(c.hashes <= CACHE_HASHES);
        assert_eq!(
            c.hashes,
            c.map
                .values()
                .map(|(_, _, m)| m.chunks.len())
                .sum::<usize>()
        );
    }

    #[test]
    fn manifest_chunks_hash_the_content() {
        let (d, s) = setup();
        // Two chunks of different bytes, so a hash of the wrong chunk cannot match.
        let mut big = vec![7u8; (CHUNK_SIZE + 10) as usize];
        big[CHUNK_SIZE as usize..].fill(9);
        std::fs::write(d.path().join("root/big"), &big).unwrap();
        let m = s.manifest("s", "big").unwrap();
        assert_eq!(m.size, big.len() as u64);
        assert_eq!(m.chunks.len(), 2);
        assert_eq!(m.chunk_len(1), 10);
        let (first, second) = big.split_at(CHUNK_SIZE as usize);
        assert_eq!(m.chunks[0], blake3::hash(first).to_hex().as_str());
        assert_eq!(m.chunks[1], blake3::hash(second).to_hex().as_str());
        let c0 = s.chunk("s", "big", 0, None, &m.chunks[0]).unwrap();
        assert_eq!(&c0[..], first);
        let c1 = s.chunk("s", "big", 1, None, &m.chunks[1]).unwrap();
        assert_eq!(&c1[..], second);
        assert!(
            s.chunk("s", "big", 0, None, &m.chunks[1]).is_err(),
            "wrong hash must not pass"
        );
        assert!(matches!(
            s.chunk("s", "big", u64::MAX, None, &m.chunks[1]),
            Err(ShareError::SeekChunk { .. })
        ));
    }

    #[test]
    fn ranges_are_read_as_players_send_them() {
        assert_eq!(parse_range("bytes=0-", 100), Some((0, 99)));
        assert_eq!(parse_range("bytes=10-19", 100), Some((10, 19)));
        assert_eq!(parse_range("bytes=90-200", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
    }

    #[test]
    fn a_ranged_read_returns_those_bytes_and_no_more_than_the_cap() {
        let (d, s) = setup();
        let r = s.read_range("s", "sub/a.txt", Some("bytes=1-3")).unwrap();
        assert_eq!((r.size, r.start, r.data.as_slice()), (5, 1, &b"ell"[..]));
        let whole = s.read_range("s", "sub/a.txt", None).unwrap();
        assert_eq!(whole.data, b"hello");
        assert!(matches!(
            s.read_range("s", "sub/a.txt", Some("bytes=9-")),
            Err(ShareError::ReadRange { size: 5, .. })
        ));
        assert!(s.read_range("s", "out", Some("bytes=0-")).is_err());
        let big = vec![1u8; (MAX_RANGE + 5) as usize];
        std::fs::write(d.path().join("root/big"), &big).unwrap();
        let r = s.read_range("s", "big", Some("bytes=2-")).unwrap();
        assert_eq!((r.start, r.data.len() as u64), (2, MAX_RANGE));
    }

    #[test]
    fn a_fifo_in_the_share_is_refused_without_blocking() {
        let (d, s) = setup();
        let fifo = d.path().join("root/pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // On a thread, so that a regression that blocks on the FIFO fails here within
        // seconds instead of hanging the suite (the stuck thread dies with the process).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((
                s.manifest("s", "pipe").map(|_| ()),
                s.read_range("s", "pipe", None).map(|_| ()),
                s.chunk("s", "pipe", 0, None, "x").map(|_| ()),
            ));
        });
        let (manifest, range, chunk) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO in the share blocked");
        assert!(matches!(manifest, Err(ShareError::NotFound(_))));
        assert!(matches!(range, Err(ShareError::NotFound(_))));
        assert!(matches!(chunk, Err(ShareError::NotFound(_))));
        drop(d);
    }

    /// A manifest as a member would send it for `s/dir/f`: `size` bytes in 4 KiB chunks.
    fn sent(size: u64) -> Manifest {
        let n = size.div_ceil(MIN_CHUNK_SIZE) as usize;
        Manifest {
            share: "s".into(),
            path: "dir/f".into(),
            size,
            mtime: 1,
            mode: 0o644,
            chunk_size: MIN_CHUNK_SIZE,
            chunks: vec![blake3::hash(b"x").to_hex().to_string(); n],
            lengths: Vec::new(),
            starts: Vec::new(),
        }
    }

    fn refusal(m: Manifest) -> String {
        match m.checked("eve", "s", "dir/f") {
            Err(e @ ShareError::RefuseManifest { .. }) => e.to_string(),
            other => panic!("accepted or failed otherwise: {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_manifest_passes_and_its_mode_keeps_only_permission_bits() {
        for size in [0, 1, MIN_CHUNK_SIZE, MIN_CHUNK_SIZE + 1] {
            let m = sent(size).checked("eve", "s", "dir/f").unwrap();
            assert_eq!(m.chunks.len() as u64, size.div_ceil(MIN_CHUNK_SIZE));
        }
        let setuid = Manifest {
            mode: 0o104755,
            ..sent(10)
        };
        assert_eq!(setuid.checked("eve", "s", "./dir/f").unwrap().mode, 0o755);
        let biggest = Manifest {
            chunk_size: MAX_CHUNK_SIZE,
            ..sent(MIN_CHUNK_SIZE)
        };
        let biggest = Manifest {
            chunks: vec![biggest.chunks[0].clone()],
            ..biggest
        };
        assert!(biggest.checked("eve", "s", "dir/f").is_ok());
    }

    #[test]
    fn a_chunk_size_outside_4_kib_to_64_mib_is_refused_before_anything_is_allocated() {
        let mut huge = sent(10);
        huge.chunk_size = 1 << 36;
        let e = refusal(huge.clone());
        assert!(
            e.contains("chunk size 68719476736") && e.contains("eve"),
            "{e}"
        );
        huge.chunk_size = MAX_CHUNK_SIZE + 1;
        refusal(huge.clone());
        huge.chunk_size = MIN_CHUNK_SIZE - 1;
        refusal(huge.clone());
        huge.chunk_size = 0;
        refusal(huge);
    }

    #[test]
    fn a_chunk_count_that_contradicts_the_size_is_refused() {
        let mut m = sent(3 * MIN_CHUNK_SIZE);
        m.chunks.pop();
        let e = refusal(m.clone());
        assert!(
            e.contains("2 chunk hashes") && e.contains("expected 3"),
            "{e}"
        );
        m.chunks.push(m.chunks[0].clone());
        m.chunks.push(m.chunks[0].clone());
        refusal(m);
        let mut empty = sent(0);
        empty.chunks.push(blake3::hash(b"").to_hex().to_string());
        refusal(empty);
    }

    #[test]
    fn bad_hashes_sizes_and_other_files_are_refused() {
        let mut m = sent(10);
        m.chunks[0] = "zz".repeat(32);
        refusal(m.clone());
        m.chunks[0] = m.chunks[0].to_uppercase();
        refusal(m.clone());
        m.chunks[0] = "a".repeat(65);
        refusal(m);
        let mut big = sent(0);
        big.size = MAX_FILE_SIZE + 1;
        big.chunk_size = MAX_CHUNK_SIZE;
        big.chunks = vec!["a".repeat(64); big.size.div_ceil(MAX_CHUNK_SIZE) as usize];
        assert!(refusal(big).contains("limit"));
        refusal(Manifest {
            share: "t".into(),
            ..sent(10)
        });
        refusal(Manifest {
            path: "dir/g".into(),
            ..sent(10)
        });
        let climbing = Manifest {
            path: "../f".into(),
            ..sent(10)
        };
        assert!(climbing.checked("eve", "s", "../f").is_err());
    }

    #[test]
    fn a_manifest_made_here_passes_its_own_check() {
        let (d, s) = setup();
        std::fs::write(
            d.path().join("root/big"),
            vec![7u8; (CHUNK_SIZE + 10) as usize],
        )
        .unwrap();
        let m = s.manifest("s", "big").unwrap();
        assert_eq!(m.clone().checked("me", "s", "big").unwrap(), m);
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let (d, s) = setup();
        std::fs::write(d.path().join("root/empty"), b"").unwrap();
        let m = s.manifest("s", "empty").unwrap();
        assert_eq!((m.size, m.chunks.len()), (0, 0));
    }
}
