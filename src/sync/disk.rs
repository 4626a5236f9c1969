//! The files sync keeps in a share's folder beside the user's, and the disk facts it
//! reads: the share's marker, partial and staged files of pulls, write probes, size and
//! mtime, free space, and a partial seeded from the file it replaces. Plain file-system
//! calls, no sync state: what to do with them is [`crate::sync::folder`]'s and
//! [`crate::sync::apply`]'s to decide.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// Present in a share's root while it is the real folder (not an empty mount point).
pub const MARKER: &str = ".watchalong-share";
/// Whether this process may create a file in `dir`: tried, not guessed, since a
/// sandbox's read-only view and hidden home folders do not show in permission bits.
pub fn probe_write(dir: &Path) -> std::io::Result<()> {
    let tag = rand::random::<u64>();
    let probe = dir.join(format!(".watchalong-probe-{tag:016x}"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// What to tell the user when a read-write share's root refuses writes. Under the shipped
/// unit (`ProtectSystem=strict`, `ProtectHome=yes`) every path outside the daemon's own
/// directories is read-only until `ReadWritePaths=` names it.
pub fn not_writable(root: &Path, e: &std::io::Error) -> String {
    format!(
        "{root} is not writable by the daemon ({e}): a read-write share needs it; under \
         systemd, run `systemctl edit watchalong` and add `[Service]` then \
         `ReadWritePaths={root}`, and give the service's user write access to it",
        root = root.display()
    )
}

/// The resumable partial file of the pull into `dest`: hidden beside it, skipped by scans.
pub fn partial_path(dest: &Path) -> PathBuf {
    crate::data::share::beside(dest, ".watchalong-part")
}

/// Size and mtime in ns, or `None` when nothing is there.
pub fn stat(path: &Path) -> Option<(u64, u128)> {
    meta(path).map(|m| (m.size, m.mtime_ns))
}

/// What a scan compares of a path besides its content: size, mtime in ns and permission
/// bits, from one `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    pub mtime_ns: u128,
    pub mode: u32,
}

/// [`Meta`] of `path`, or `None` when nothing is there.
pub fn meta(path: &Path) -> Option<Meta> {
    std::fs::metadata(path).ok().map(|m| meta_of(&m))
}

/// Gives the file or folder at `path` a version's permission bits (when it carries them)
/// and mtime, if it is still what `expected` says (size and mtime in ns; `None`: not
/// checked). Opened without following a link in its last step, checked and changed
/// through that one descriptor, so a link swapped in there is never what changes and a
/// write landing before the check is never stamped with the version's mtime. Only the
/// permission bits are ever set, never set-id or sticky bits, and a folder keeps its
/// owner's read, write and search bits here: sync must still write into it (a folder
/// made read-only elsewhere would otherwise shut out every file of it that follows).
/// Returns what the disk holds afterwards, or `None` when the path moved on.
pub fn set_meta(
    path: &Path,
    expected: Option<(u64, u128)>,
    mode: Option<u32>,
    mtime: u64,
) -> std::io::Result<Option<Meta>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let before = meta_of(&f.metadata()?);
    if expected.is_some_and(|e| e != (before.size, before.mtime_ns)) {
        return Ok(None);
    }
    let dir = f.metadata()?.is_dir();
    // Each tried even if the other is refused (a file system without modes still takes
    // an mtime); the first refusal is what is returned.
    let chmod = match mode {
        Some(mode) => {
            let mut mode = mode & crate::sync::versions::MODE_BITS;
            if dir {
                mode |= 0o700;
            }
            f.set_permissions(std::fs::Permissions::from_mode(mode))
        }
        None => Ok(()),
    };
    // A time the system cannot represent is left alone rather than overflowing.
    let touch = match UNIX_EPOCH.checked_add(Duration::from_secs(mtime)) {
        Some(t) => f.set_modified(t),
        None => Ok(()),
    };
    chmod.and(touch)?;
    Ok(Some(meta_of(&f.metadata()?)))
}

fn meta_of(m: &std::fs::Metadata) -> Meta {
    use std::os::unix::fs::PermissionsExt;
    let mtime_ns = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Meta {
        size: m.len(),
        mtime_ns,
        mode: m.permissions().mode() & crate::sync::versions::MODE_BITS,
    }
}

pub(super) fn is_ours(name: &str) -> bool {
    name == MARKER || (name.starts_with('.') && name.contains(".watchalong-"))
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` is written by
    // statvfs before it is read, only when the call succeeded.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Starts the partial of a pull into `dest` with every chunk of the current `dest` that
/// the wanted version has, so only the others cross the network (the pull checks each
/// against the manifest again): at the same offset for fixed chunks, wherever it now
/// lies for content-defined ones (an insertion moved everything after it). Nothing is
/// done when a partial is there already (it is resumed as it is) or `dest` is not a file.
pub fn seed_partial(dest: &Path, part: &Path, manifest: &crate::data::share::Manifest) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if part.exists() {
        return;
    }
    let Ok(old) = std::fs::File::open(dest) else {
        return;
    };
    if !old.metadata().is_ok_and(|m| m.is_file()) {
        return;
    }
    let Ok(new) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)
    else {
        return;
    };
    if new.set_len(manifest.size).is_err() {
        let _ = std::fs::remove_file(part);
        return;
    }
    // Content-defined: where each chunk of the current file lies, by hash.
    let here: std::collections::HashMap<String, (u64, u32)> = if manifest.lengths.is_empty() {
        std::collections::HashMap::new()
    } else {
        let Ok(chunks) = crate::data::share::cdc_chunks(std::io::BufReader::new(&old)) else {
            return;
        };
        let mut at = 0u64;
        chunks
            .into_iter()
            .map(|(len, hash)| {
                let start = at;
                at += u64::from(len);
                (hash, (start, len))
            })
            .collect()
    };
    for i in 0..manifest.chunks.len() as u64 {
        let chunk = if manifest.lengths.is_empty() {
            manifest.held_chunk(&old, i)
        } else {
            here.get(&manifest.chunks[i as usize])
                .and_then(|&(at, len)| {
                    let mut buf = vec![0u8; len as usize];
                    old.read_exact_at(&mut buf, at).ok()?;
                    (blake3::hash(&buf).to_hex().as_str() == manifest.chunks[i as usize])
                        .then_some(buf)
                })
        };
        let Some(chunk) = chunk else {
            continue;
        };
        if new.write_all_at(&chunk, manifest.chunk_offset(i)).is_err() {
            // A full disk, say: the pull fetches the rest and reports it.
            return;
        }
    }
}

/// Removes the partial and staged files this daemon left directly in `dir`.
pub fn remove_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MARKER && is_ours(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes staged files under `root`: a crash between the two renames of a pull leaves
/// one, and nothing else would ever claim it. Partials stay: the next pull resumes them.
pub(super) fn sweep_stages(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() && name.contains(".watchalong-stage-") => {
                    let _ = std::fs::remove_file(e.path());
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_for_a_file_with_an_insertion_starts_with_every_chunk_that_only_moved() {
        use rand::{Rng, SeedableRng};
        let d = tempfile::tempdir().unwrap();
        let mut old = vec![0u8; 8 << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill(&mut old[..]);
        let mut new = old.clone();
        new.splice(4 << 20..4 << 20, [1u8; 1024]);
        // The holder's manifest of the new version, from a read-write share.
        std::fs::create_dir_all(d.path().join("holder")).unwrap();
        std::fs::write(d.path().join("holder/f"), &new).unwrap();
        let holder = crate::data::share::Shares::new(
            vec![crate::base::config::ShareConfig {
                name: "s".into(),
                path: d.path().join("holder"),
                mode: crate::base::config::ShareMode::ReadWrite,
            }],
            crate::data::share::CHUNK_SIZE,
        );
        let m = holder.manifest("s", "f").unwrap();
        // The receiver holds the old version.
        let dest = d.path().join("f");
        std::fs::write(&dest, &old).unwrap();
        let part = partial_path(&dest);
        seed_partial(&dest, &part, &m);
        let seeded = std::fs::File::open(&part).unwrap();
        let missing: u64 = (0..m.chunks.len() as u64)
            .filter(|i| m.held_chunk(&seeded, *i).is_none())
            .map(|i| m.chunk_len(i))
            .sum();
        assert!(
            missing <= 2 * u64::from(crate::data::share::CDC_MAX),
            "{missing} bytes left to fetch after a 1 KiB insertion"
        );
        assert!(missing > 0, "the inserted bytes cannot have been held");
    }

    #[test]
    fn a_file_with_the_longest_legal_name_gets_a_partial_name_the_file_system_takes() {
        let dir = tempfile::tempdir().unwrap();
        let long = "n".repeat(crate::data::share::NAME_MAX - 4) + ".bin";
        let dest = dir.path().join(&long);
        std::fs::write(&dest, b"x").unwrap();
        let part = partial_path(&dest);
        assert!(part.file_name().unwrap().len() <= crate::data::share::NAME_MAX);
        assert!(is_ours(&part.file_name().unwrap().to_string_lossy()));
        std::fs::write(&part, b"partial").unwrap();
        // The same name gives the same partial (a pull resumes it); another does not.
        assert_eq!(partial_path(&dest), part);
        assert_ne!(
            partial_path(&dir.path().join("n".repeat(crate::data::share::NAME_MAX))),
            part
        );
        // A short name keeps the readable form.
        assert_eq!(
            partial_path(&dir.path().join("film.mkv")),
            dir.path().join(".film.mkv.watchalong-part")
        );
    }
}
