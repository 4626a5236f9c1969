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
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some((m.len(), mtime))
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
/// the wanted version has at the same offset, so only the others cross the network
/// (the pull checks each against the manifest again). Nothing is done when a partial is
/// there already (it is resumed as it is) or `dest` is not a file.
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
    for i in 0..manifest.chunks.len() as u64 {
        let Some(chunk) = manifest.held_chunk(&old, i) else {
            continue;
        };
        if new.write_all_at(&chunk, i * manifest.chunk_size).is_err() {
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

/// Sets a fetched file's mtime to the version's, so every node shows the same.
pub fn set_mtime(path: &Path, mtime: u64) {
    // A time the system cannot represent is left alone rather than overflowing.
    let Some(t) = UNIX_EPOCH.checked_add(Duration::from_secs(mtime)) else {
        return;
    };
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
