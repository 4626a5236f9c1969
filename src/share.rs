//! Shared folders on this node's disk: turning a request path into a file inside the
//! share and nowhere else, listing, cutting files into BLAKE3-hashed chunks (the
//! manifest), and reading one chunk. It must never open a path outside a share root:
//! `..`, `.`, absolute paths, NUL bytes, backslashes and symlinks that lead out are all
//! refused before or after resolution, and what a file open reached is checked again.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::config::{ShareConfig, ShareMode};

/// Chosen by measurement (docs/benchmarks.md): small enough that the first chunk of a
/// video arrives quickly, large enough that per-request overhead stays a few percent.
pub const CHUNK_SIZE: u64 = 256 * 1024;
/// Overrides [`CHUNK_SIZE`] for benchmarks that compare chunk sizes; manifests carry
/// their chunk size, so nodes with different settings still understand each other.
pub const CHUNK_SIZE_ENV: &str = "WATCHALONG_CHUNK_SIZE";

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
    #[error("chunk {index} of {path} has changed since its manifest was made")]
    ChunkChanged { path: String, index: u64 },
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
    pub chunk_size: u64,
    /// BLAKE3 of each chunk, hex.
    pub chunks: Vec<String>,
}

impl Manifest {
    /// Names this version of the file: the same bytes give the same id on every node.
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        for c in &self.chunks {
            h.update(c.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }

    /// Chunk `index` as `file` holds it at its offset, if it is there and matches.
    pub fn held_chunk(&self, file: &std::fs::File, index: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.chunk_len(index) as usize];
        file.read_exact_at(&mut buf, index * self.chunk_size).ok()?;
        let want = self.chunks.get(index as usize)?;
        (blake3::hash(&buf).to_hex().as_str() == want).then_some(buf)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    pub name: String,
    pub mode: String,
}

/// (share, path) → (size, mtime in ns, manifest).
type ManifestCache = HashMap<(String, String), (u64, u128, Manifest)>;

pub struct Shares {
    shares: Vec<ShareConfig>,
    chunk_size: u64,
    /// Manifests by (share, path), valid while size and mtime (in ns: two writes in one
    /// second must not look alike) match.
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
            cache: Mutex::new(HashMap::new()),
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
            v.push(Entry {
                name,
                dir: meta.is_dir(),
                size: if meta.is_dir() { 0 } else { meta.len() },
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
        let key = (share.to_string(), raw.to_string());
        if let Some((size, ns, m)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if *size == meta.len() && *ns == mtime_ns {
                return Ok(m.clone());
            }
        }
        use std::os::unix::fs::PermissionsExt;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        let (mut f, _) = self.open_file(share, raw)?;
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut size = 0u64;
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
        let m = Manifest {
            share: share.to_string(),
            path: raw.trim_start_matches("./").to_string(),
            size,
            mtime,
            mode: meta.permissions().mode() & 0o777,
            chunk_size: self.chunk_size,
            chunks,
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (meta.len(), mtime_ns, m.clone()));
        Ok(m)
    }

    /// Chunk `index` of the file, checked against `hash` so a file that changed since
    /// its manifest never passes for the old content.
    pub fn chunk(
        &self,
        share: &str,
        raw: &str,
        index: u64,
        hash: &str,
    ) -> Result<Vec<u8>, ShareError> {
        let (mut f, path) = self.open_file(share, raw)?;
        let read = |source| ShareError::Read {
            path: path.clone(),
            source,
        };
        f.seek(SeekFrom::Start(index * self.chunk_size))
            .map_err(read)?;
        let mut buf = vec![0u8; self.chunk_size as usize];
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
    fn manifest_chunks_hash_the_content() {
        let (d, s) = setup();
        let big = vec![7u8; (CHUNK_SIZE + 10) as usize];
        std::fs::write(d.path().join("root/big"), &big).unwrap();
        let m = s.manifest("s", "big").unwrap();
        assert_eq!(m.size, big.len() as u64);
        assert_eq!(m.chunks.len(), 2);
        assert_eq!(m.chunk_len(1), 10);
        let c1 = s.chunk("s", "big", 1, &m.chunks[1]).unwrap();
        assert_eq!(c1.len(), 10);
        assert!(
            s.chunk("s", "big", 0, &m.chunks[1]).is_err(),
            "wrong hash must not pass"
        );
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
        assert!(matches!(
            s.manifest("s", "pipe"),
            Err(ShareError::NotFound(_))
        ));
        assert!(matches!(
            s.read_range("s", "pipe", None),
            Err(ShareError::NotFound(_))
        ));
        assert!(matches!(
            s.chunk("s", "pipe", 0, "x"),
            Err(ShareError::NotFound(_))
        ));
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let (d, s) = setup();
        std::fs::write(d.path().join("root/empty"), b"").unwrap();
        let m = s.manifest("s", "empty").unwrap();
        assert_eq!((m.size, m.chunks.len()), (0, 0));
    }
}
