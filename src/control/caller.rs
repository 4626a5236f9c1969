//! Who is on the other end of a control connection, as the kernel saw it connect
//! (`SO_PEERCRED`, never the request's word), and what that user may do: change the node
//! (root or `[control] group`), write in a folder (by the mode bits). It reads the user
//! and group databases and file metadata; it must not decide which call needs what
//! (that is the server's route table).

use std::path::Path;

use tokio::net::UnixStream;

/// Who is on the other end of a control connection, as the kernel saw it connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database, or `/proc/PID/status`).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The peer of `stream`; a peer the kernel cannot name is nobody in particular.
    pub(super) fn of(stream: &UnixStream) -> Caller {
        match stream.peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                gid: c.gid(),
                groups: supplementary_groups(c.uid(), c.gid(), c.pid()),
            },
            Err(_) => Caller {
                uid: u32::MAX,
                gid: u32::MAX,
                groups: Vec::new(),
            },
        }
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether this caller may change the node: root, or a member of `admin`.
    pub fn may_change(&self, admin: Option<u32>) -> bool {
        self.uid == 0 || admin.is_some_and(|g| self.in_group(g))
    }

    /// Whether this caller could create and replace files in `dir` itself: every folder
    /// on the way searchable, `dir` writable, by the mode bits that apply to it (ACLs
    /// are not read: a user they alone let in is refused, never the other way).
    pub fn may_write_in(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.uid == 0 {
            return true;
        }
        let bits = |m: &std::fs::Metadata| {
            let mode = m.mode();
            if m.uid() == self.uid {
                (mode >> 6) & 0o7
            } else if self.in_group(m.gid()) {
                (mode >> 3) & 0o7
            } else {
                mode & 0o7
            }
        };
        for a in dir.ancestors().skip(1) {
            match std::fs::metadata(a) {
                Ok(m) if bits(&m) & 0o1 != 0 => {}
                _ => return false,
            }
        }
        match std::fs::metadata(dir) {
            Ok(m) => m.is_dir() && bits(&m) & 0o3 == 0o3,
            Err(_) => false,
        }
    }
}

/// The groups user `uid` belongs to, from the user and group databases (what `id` shows),
/// else from the process's `/proc/PID/status` (which the unit's `ProtectProc=invisible`
/// may hide).
fn supplementary_groups(uid: u32, gid: u32, pid: Option<i32>) -> Vec<u32> {
    groups_of_user(uid, gid)
        .or_else(|| pid.map(groups_of_process))
        .unwrap_or_default()
}

fn groups_of_process(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn groups_of_user(uid: u32, gid: u32) -> Option<Vec<u32>> {
    // SAFETY: `passwd` is plain C data for which all zeroes is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwuid_r writes into `pw` and `buf`, both live and sized as passed.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return None;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `pw.pw_name` points into `buf`, still live; `groups` holds `n` entries.
    let r = unsafe { libc::getgrouplist(pw.pw_name, gid, groups.as_mut_ptr(), &mut n) };
    if r < 0 {
        return None;
    }
    groups.truncate(usize::try_from(n).unwrap_or(0));
    Some(groups)
}
