//! Copies of what folder sync replaced or deleted on this node because of another member's
//! change, kept inside the share's own file system (`ROOT/.watchalong-versions/PATH~STAMP`)
//! so a file is never gone for good: naming them, listing, pruning the old ones and putting
//! one back. The folder's name marks it as ours, so the scan never syncs it.
//!
//! It must not decide what sync does: the executor calls [`keep_moving`] before it removes
//! a file and [`keep_linking`] before it replaces one; a restore is a local write that the
//! next scan announces like any other.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::base::clock::now_secs;

/// The folder inside a share's root.
pub const DIR: &str = ".watchalong-versions";

#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    #[error("cannot keep a copy of {path}: {source}")]
    Keep {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the versions in {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no kept version of {0}{1}")]
    FindVersion(String, String),
    #[error("cannot put {path} back: {source}")]
    Restore {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a path inside the share")]
    CheckPath(String),
}

/// One kept version.
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

/// `20261130T091300Z` for a time: sortable, and with no character a file system or a
/// shell finds awkward.
pub fn stamp(t: u64) -> String {
    let rfc = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string();
    rfc.chars().filter(|c| *c != '-' && *c != ':').collect()
}

/// The time a [`stamp`] names.
pub fn parse_stamp(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// The file of a version of `name` (in `folder`) with `suffix` (`~STAMP[-N]`): beside its
/// folder's other versions as `NAME~STAMP`, or, when that would pass the file system's
/// longest name (a legal name of up to 255 bytes plus the stamp), inside a folder named
/// after the file, as `NAME/~STAMP`. [`list`] reads both.
fn version_file(folder: &Path, name: &str, suffix: &str) -> PathBuf {
    if name.len() + suffix.len() <= crate::data::share::NAME_MAX {
        folder.join(format!("{name}{suffix}"))
    } else {
        folder.join(name).join(suffix)
    }
}

/// Where a version of `rel` kept at `at` goes: a name not taken yet.
fn slot(root: &Path, rel: &str, at: u64) -> Result<PathBuf, KeptError> {
    let parts =
        crate::data::share::clean_path(rel).map_err(|_| KeptError::CheckPath(rel.into()))?;
    let Some((name, dirs)) = parts.split_last() else {
        return Err(KeptError::CheckPath(rel.into()));
    };
    let folder = dirs.iter().fold(root.join(DIR), |p, c| p.join(c));
    std::fs::create_dir_all(&folder).map_err(|source| KeptError::Keep {
        path: folder.clone(),
        source,
    })?;
    let base = format!("~{}", stamp(at));
    let mut candidate = version_file(&folder, name, &base);
    let mut n = 1;
    while candidate.symlink_metadata().is_ok() {
        candidate = version_file(&folder, name, &format!("{base}-{n}"));
        n += 1;
    }
    if let Some(parent) = candidate.parent().filter(|p| *p != folder) {
        std::fs::create_dir_all(parent).map_err(|source| KeptError::Keep {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    Ok(candidate)
}

/// Keeps `file` (at `rel` in the share) by moving it into the versions folder: what a
/// deletion does instead of removing it.
pub fn keep_moving(root: &Path, rel: &str, file: &Path) -> Result<PathBuf, KeptError> {
    let to = slot(root, rel, now_secs())?;
    std::fs::rename(file, &to).map_err(|source| KeptError::Keep {
        path: file.to_path_buf(),
        source,
    })?;
    Ok(to)
}

/// Keeps a copy of `file` (at `rel`) as it is, before it is replaced: a hard link when the
/// file system allows it (no bytes copied, and the replacement's rename stays atomic),
/// else a copy.
pub fn keep_linking(root: &Path, rel: &str, file: &Path) -> Result<PathBuf, KeptError> {
    let to = slot(root, rel, now_secs())?;
    let err = |source| KeptError::Keep {
        path: file.to_path_buf(),
        source,
    };
    if std::fs::hard_link(file, &to).is_err() {
        std::fs::copy(file, &to).map_err(err)?;
    }
    Ok(to)
}

/// Every version kept under `under` ("" for all), newest first for each path.
pub fn list(root: &Path, under: &str) -> Result<Vec<Kept>, KeptError> {
    let base = root.join(DIR);
    let mut out = Vec::new();
    let mut stack = vec![(base.clone(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(KeptError::List { path: dir, source }),
        };
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                stack.push((e.path(), rel));
                continue;
            }
            let Some((path, tail)) = rel.rsplit_once('~') else {
                continue;
            };
            // A long name's versions sit in a folder named after it: `NAME/~STAMP`.
            let path = path.strip_suffix('/').unwrap_or(path);
            // A second version kept in the same second carries "-N" after its stamp.
            let (stamp_part, seq) = match tail.split_once('-') {
                Some((st, n)) => match n.parse::<u32>() {
                    Ok(n) => (st, n),
                    Err(_) => continue,
                },
                None => (tail, 0),
            };
            let Some(at) = parse_stamp(stamp_part) else {
                continue;
            };
            let inside = under.is_empty()
                || path == under
                || path.starts_with(&format!("{}/", under.trim_end_matches('/')));
            if meta.is_file() && inside {
                out.push(Kept {
                    path: path.to_string(),
                    at,
                    seq,
                    size: meta.len(),
                });
            }
        }
    }
    out.sort_by(|a, b| {
        a.path
            .cmp(&b.path)
            .then(b.at.cmp(&a.at))
            .then(b.seq.cmp(&a.seq))
    });
    Ok(out)
}

/// The file holding `k`.
fn file_of(root: &Path, k: &Kept) -> Option<PathBuf> {
    let parts = crate::data::share::clean_path(&k.path).ok()?;
    let (name, dirs) = parts.split_last()?;
    let folder = dirs.iter().fold(root.join(DIR), |p, c| p.join(c));
    let base = format!("~{}", stamp(k.at));
    let file = match k.seq {
        0 => version_file(&folder, name, &base),
        n => version_file(&folder, name, &format!("{base}-{n}")),
    };
    file.is_file().then_some(file)
}

/// Removes the versions kept more than `days` days before `now`; returns how many went.
pub fn prune(root: &Path, now: u64, days: u64) -> Result<usize, KeptError> {
    let cutoff = now.saturating_sub(days.saturating_mul(86_400));
    let mut gone = 0;
    for k in list(root, "")?.into_iter().filter(|k| k.at < cutoff) {
        if let Some(f) = file_of(root, &k) {
            if std::fs::remove_file(&f).is_ok() {
                gone += 1;
            }
        }
    }
    Ok(gone)
}

/// Puts back the version of `rel` kept at `at` (the newest when `None`): copied to a temp
/// file beside the path, then renamed over it, so the path holds the old content or the
/// restored one, never a mix; the next scan spreads it as a change. The version stays
/// kept.
pub fn restore(root: &Path, rel: &str, at: Option<u64>) -> Result<Kept, KeptError> {
    let parts =
        crate::data::share::clean_path(rel).map_err(|_| KeptError::CheckPath(rel.into()))?;
    let canonical = parts.join("/");
    let k = list(root, &canonical)?
        .into_iter()
        .filter(|k| k.path == canonical)
        .find(|k| at.is_none_or(|t| k.at == t))
        .ok_or_else(|| {
            KeptError::FindVersion(
                canonical.clone(),
                at.map(|t| format!(" kept at {}", stamp(t)))
                    .unwrap_or_default(),
            )
        })?;
    let from = file_of(root, &k)
        .ok_or_else(|| KeptError::FindVersion(canonical.clone(), String::new()))?;
    let dest = parts.iter().fold(root.to_path_buf(), |p, c| p.join(c));
    let err = |source| KeptError::Restore {
        path: dest.clone(),
        source,
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = crate::data::share::beside(&dest, ".watchalong-restore");
    let copied = std::fs::copy(&from, &tmp)
        .and_then(|_| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &dest));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_as_the_time_it_names() {
        for t in [0, 1, 1_700_000_000, 1_796_000_123] {
            assert_eq!(parse_stamp(&stamp(t)), Some(t));
        }
        assert_eq!(stamp(1_796_030_000).len(), 16);
        assert_eq!(parse_stamp("not a stamp at all"), None);
    }

    #[test]
    fn kept_versions_are_listed_pruned_by_age_and_restored() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f.txt"), b"first").unwrap();
        keep_linking(root, "sub/f.txt", &root.join("sub/f.txt")).unwrap();
        std::fs::write(root.join("sub/f.txt"), b"second").unwrap();
        // Kept again in the same second: a name of its own.
        keep_moving(root, "sub/f.txt", &root.join("sub/f.txt")).unwrap();
        assert!(!root.join("sub/f.txt").exists());
        let old = slot(root, "old.txt", 1_000_000).unwrap();
        std::fs::write(&old, b"ancient").unwrap();

        let all = list(root, "").unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(list(root, "sub").unwrap().len(), 2);
        assert_eq!(list(root, "sub/f.txt").unwrap().len(), 2);

        // Thirty days: only the one kept in 1970 is past it.
        assert_eq!(prune(root, now_secs(), 30).unwrap(), 1);
        assert!(!old.exists());
        assert_eq!(list(root, "").unwrap().len(), 2);

        // The newest comes back, even among versions kept in one second.
        let back = restore(root, "./sub/f.txt", None).unwrap();
        assert_eq!(back.path, "sub/f.txt");
        assert_eq!(std::fs::read(root.join("sub/f.txt")).unwrap(), b"second");
        assert!(matches!(
            restore(root, "sub/none.txt", None),
            Err(KeptError::FindVersion(..))
        ));
        assert!(matches!(
            restore(root, "../x", None),
            Err(KeptError::CheckPath(_))
        ));
    }

    #[test]
    fn a_file_with_the_longest_legal_name_is_kept_listed_and_restored() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let name = "c".repeat(crate::data::share::NAME_MAX - 4) + ".txt";
        let rel = format!("sub/{name}");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join(&rel), b"one").unwrap();
        keep_linking(root, &rel, &root.join(&rel)).unwrap();
        std::fs::write(root.join(&rel), b"two").unwrap();
        keep_moving(root, &rel, &root.join(&rel)).unwrap();
        let kept = list(root, "sub").unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|k| k.path == rel));
        let back = restore(root, &rel, None).unwrap();
        assert_eq!((back.path.as_str(), back.seq), (rel.as_str(), 1));
        assert_eq!(std::fs::read(root.join(&rel)).unwrap(), b"two");
    }
}
