//! The rules folder sync decides by, as a pure core: version vectors, which of two
//! versions of a path wins, what the loser of a conflict is called (the same on every
//! node, whichever node decides), when deletions may spread, and what a version another
//! member announces must look like before anything is decided by it. Nothing here
//! touches a file, the clock or the network: [`crate::sync::folder`] and
//! [`crate::sync::apply`] act on what it decides.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The content id of a directory: folders are entries too, so mkdir and rmdir spread.
pub const DIR: &str = "dir";

/// How many changes each node made to one path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<String, u64>);

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Equal,
    /// Self happened before the other: the other supersedes it.
    Before,
    After,
    /// Neither saw the other: both changed the path independently.
    Concurrent,
}

impl VersionVector {
    /// The vector after `node` made one more change.
    pub fn bumped(&self, node: &str) -> VersionVector {
        let mut v = self.clone();
        // Saturates rather than wraps: a wrapped counter would make the newest version
        // look like the oldest.
        let n = v.0.entry(node.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        v
    }

    /// Whether some counter here is more than [`MAX_LEAP`] ahead of the same node's in
    /// `held`. Honest counters grow by one an edit; a member that announces a leap to
    /// near the ceiling would leave no room for the next honest edit, and freeze the path.
    pub fn leaps_past(&self, held: &VersionVector) -> bool {
        self.0
            .iter()
            .any(|(k, n)| *n > held.0.get(k).copied().unwrap_or(0).saturating_add(MAX_LEAP))
    }

    /// Every counter at its highest of the two: what a node knows after seeing both.
    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        let mut v = self.clone();
        for (k, n) in &other.0 {
            let e = v.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*n);
        }
        v
    }

    pub fn compare(&self, other: &VersionVector) -> Order {
        let keys = self.0.keys().chain(other.0.keys());
        let (mut less, mut more) = (false, false);
        for k in keys {
            let a = self.0.get(k).copied().unwrap_or(0);
            let b = other.0.get(k).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Less => less = true,
                Ordering::Greater => more = true,
                Ordering::Equal => {}
            }
        }
        match (less, more) {
            (false, false) => Order::Equal,
            (true, false) => Order::Before,
            (false, true) => Order::After,
            (true, true) => Order::Concurrent,
        }
    }
}

/// The latest mtime a version may carry: 9999-12-31 23:59:59 UTC, the last second a
/// date can be written for (a conflict copy's name carries it).
pub const MAX_MTIME: u64 = 253_402_300_799;
/// The most nodes one version vector may name: far more than a group has members, few
/// enough that comparing two vectors stays cheap.
pub const MAX_VV_NODES: usize = 1024;
/// The longest node id in a version (ids are short key prefixes).
pub const MAX_NODE_ID: usize = 64;
/// The highest counter a peer may announce: leaves room to count changes for ever.
pub const MAX_COUNTER: u64 = 1 << 62;
/// How far past what this node holds an announced counter may leap: a million edits of one
/// path unseen here.
pub const MAX_LEAP: u64 = 1 << 20;
/// The mode bits that travel: read, write and execute for owner, group and others. The
/// set-id and sticky bits never do: a member must not make a program here run as this
/// node's user.
pub const MODE_BITS: u32 = 0o777;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the announced version of {path:?} is refused: {reason}")]
    CheckVersion { path: String, reason: &'static str },
}

impl FileVersion {
    /// Whether a version another member announced is sane enough to decide by: an mtime
    /// a date can be written for, a content id that is a manifest id (or the folder or
    /// deletion marker), short node ids, a bounded version vector with counters that
    /// cannot wrap, a size a manifest may have.
    pub fn check(&self) -> Result<(), VersionError> {
        let refuse = |reason| {
            Err(VersionError::CheckVersion {
                path: self.path.chars().take(256).collect(),
                reason,
            })
        };
        let hex =
            |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if self.mtime > MAX_MTIME {
            return refuse("its mtime is past the year 9999");
        }
        if self.mode.is_some_and(|m| m & !MODE_BITS != 0) {
            return refuse("its mode holds more than permission bits");
        }
        if !(self.content.is_empty() || self.content == DIR || hex(&self.content)) {
            return refuse("its content id is not a manifest id");
        }
        if self.node.len() > MAX_NODE_ID {
            return refuse("its node id is too long");
        }
        if self.vv.0.len() > MAX_VV_NODES {
            return refuse("its version vector names too many nodes");
        }
        if self
            .vv
            .0
            .iter()
            .any(|(k, n)| k.len() > MAX_NODE_ID || *n > MAX_COUNTER)
        {
            return refuse("its version vector holds a too long id or too high a counter");
        }
        if self.size > crate::data::share::MAX_FILE_SIZE {
            return refuse("its size is above the largest file a manifest may describe");
        }
        Ok(())
    }
}

/// One version of one path, as the index will hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVersion {
    pub path: String,
    pub vv: VersionVector,
    pub deleted: bool,
    /// Seconds since the epoch, as the writer's clock had it.
    pub mtime: u64,
    /// The node that made this version.
    pub node: String,
    /// The content's manifest id (empty for a deletion).
    pub content: String,
    /// Bytes of content (0 for a deletion or a folder), for progress: what is left to pull.
    #[serde(default)]
    pub size: u64,
    /// Permission bits ([`MODE_BITS`] only) of the file or folder, when the version
    /// carries them: `None` from a member of a version before modes travelled, whose
    /// versions leave a path's mode as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl FileVersion {
    /// What a change of metadata alone compares: the mtime and the mode.
    fn meta(&self) -> (u64, Option<u32>) {
        (self.mtime, self.mode)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Ours is as new or newer: nothing to do.
    KeepLocal,
    /// Theirs supersedes ours: apply it.
    TakeRemote,
    /// The same content both sides changed at once, theirs with the metadata that wins:
    /// take their mode and mtime under the merged vector, and keep the content.
    TakeMeta { merged: VersionVector },
    /// Both changed it: `winner` stays at the path, the loser is kept beside it as
    /// `loser_path`, and the path's vector becomes `merged` on every node.
    Conflict {
        remote_wins: bool,
        loser_path: String,
        merged: VersionVector,
    },
}

/// Decides between this node's version and one that arrived. Every node reaches the same
/// outcome for the same two versions, whichever of them it holds.
pub fn resolve(local: &FileVersion, remote: &FileVersion) -> Resolution {
    match local.vv.compare(&remote.vv) {
        Order::Equal | Order::After => Resolution::KeepLocal,
        Order::Before => Resolution::TakeRemote,
        Order::Concurrent => {
            if local.content == remote.content && local.deleted == remote.deleted {
                // The same content on both sides is no conflict, whatever else differs.
                // Where the two changed only metadata (a chmod, a touch) both sides keep
                // the same one under the merged vector, one vector naming one version
                // everywhere: the later (by mtime, then node, then mode). One total order,
                // whatever the histories: a rule that depended on them would settle
                // differently with the order versions arrive in, and leave two members
                // apart under one vector for good.
                let remote_wins = !local.deleted
                    && remote.meta() != local.meta()
                    && (remote.mtime, &remote.node, remote.mode)
                        > (local.mtime, &local.node, local.mode);
                return if remote_wins {
                    Resolution::TakeMeta {
                        merged: local.vv.merged(&remote.vv),
                    }
                } else {
                    Resolution::KeepLocal
                };
            }
            // A deletion never beats an edit: nothing is lost by keeping the file.
            let remote_wins = match (local.deleted, remote.deleted) {
                (true, false) => true,
                (false, true) => false,
                // The content breaks a tie: two versions one node made in one second.
                _ => {
                    (remote.mtime, &remote.node, &remote.content)
                        > (local.mtime, &local.node, &local.content)
                }
            };
            let loser = if remote_wins { local } else { remote };
            Resolution::Conflict {
                remote_wins,
                loser_path: conflict_name(&loser.path, loser.mtime, &loser.node, &loser.content),
                merged: local.vv.merged(&remote.vv),
            }
        }
    }
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-NODE-CONTENT.EXT`, from the losing version's own
/// data: every node names it alike. The first 8 digits of its content id keep two
/// conflicts lost by one node in one second apart; without them the second copy landed
/// on the first one's name and path histories got mixed.
pub fn conflict_name(path: &str, mtime: u64, node: &str, content: &str) -> String {
    let (dir, file) = match path.rsplit_once('/') {
        Some((d, f)) => (format!("{d}/"), f),
        None => (String::new(), path),
    };
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (file, String::new()),
    };
    // A time that cannot be shown as a date (past the year 9999) is shown in seconds
    // rather than failing: the name must exist whatever a clock said.
    let stamp = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(mtime))
        .filter(|_| mtime <= MAX_MTIME)
        .map(|t| {
            humantime::format_rfc3339_seconds(t)
                .to_string()
                .replace(['-', ':'], "")
                .replace('T', "-")
                .trim_end_matches('Z')
                .to_string()
        })
        .unwrap_or_else(|| mtime.to_string());
    let tag: String = content.chars().take(8).collect();
    // A conflict copy that conflicts again is named after the original, not after the
    // copy: otherwise each round adds a suffix until the name is too long to exist.
    let stem = stem.split(".sync-conflict-").next().unwrap_or(stem);
    let tail = format!(".sync-conflict-{stamp}-{node}-{tag}{ext}");
    // The name must fit the file system (255 bytes): a long stem is cut, on a character
    // boundary, to leave room for the tail.
    let room = 255usize.saturating_sub(tail.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{dir}{}{tail}", &stem[..cut])
}

/// Whether deletions seen in a share may be sent to others: only while its root is there
/// and still holds the marker the daemon put in it. An unmounted disk or an emptied root
/// looks like "everything was deleted" and must not empty every other node.
pub fn may_propagate_deletions(root_exists: bool, marker_present: bool) -> bool {
    root_exists && marker_present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_copy_that_conflicts_again_is_named_after_the_original_and_fits() {
        let once = conflict_name("d/n1.bin", 1_796_039_993, "306a0c34", "efdfd0ab99");
        let twice = conflict_name(&once, 1_796_040_000, "cc426373", "12345678ff");
        assert_eq!(
            twice,
            "d/n1.sync-conflict-20261130-120000-cc426373-12345678.bin"
        );
        let long = format!("{}.bin", "é".repeat(125));
        let name = conflict_name(&long, 1_796_039_993, "306a0c34", "efdfd0ab99");
        assert!(name.len() <= 255, "{}", name.len());
        assert!(name.ends_with(".sync-conflict-20261130-115953-306a0c34-efdfd0ab.bin"));
    }

    #[test]
    fn a_counter_leaping_far_past_what_is_held_is_caught_and_an_honest_step_is_not() {
        let held = VersionVector::default().bumped("a").bumped("a");
        assert!(!held.bumped("a").leaps_past(&held));
        assert!(!held.bumped("b").leaps_past(&held));
        let mut leap = held.clone();
        leap.0.insert("b".into(), MAX_COUNTER);
        assert!(leap.leaps_past(&held));
        leap.0.insert("b".into(), MAX_LEAP + 1);
        assert!(leap.leaps_past(&VersionVector::default()));
    }

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect())
    }

    fn version(node: &str, v: VersionVector, mtime: u64, content: &str) -> FileVersion {
        FileVersion {
            path: "films/movie.mkv".into(),
            vv: v,
            deleted: false,
            mtime,
            node: node.into(),
            content: content.into(),
            size: 1,
            mode: None,
        }
    }

    #[test]
    fn two_versions_one_node_made_in_one_second_still_settle_the_same_everywhere() {
        // One node's edit met by another's merge of an older edit: concurrent, and alike
        // in mtime and node; only the content tells them apart.
        let x = version("n1", vv(&[("n1", 2)]), 100, "xxx");
        let y = version("n1", vv(&[("n1", 1), ("n2", 1)]), 100, "yyy");
        let (
            Resolution::Conflict {
                remote_wins: a,
                loser_path: la,
                merged: ma,
            },
            Resolution::Conflict {
                remote_wins: b,
                loser_path: lb,
                merged: mb,
            },
        ) = (resolve(&x, &y), resolve(&y, &x))
        else {
            panic!("not a conflict")
        };
        assert_ne!(a, b, "each side kept its own");
        // The higher content id wins; both sides name x's copy alike and agree on the vector.
        assert!(a, "y (the higher content) does not win where x is held");
        assert_eq!(la, lb, "the two sides name the loser differently");
        assert_eq!(la, conflict_name("films/movie.mkv", 100, "n1", "xxx"));
        assert_eq!(ma, vv(&[("n1", 2), ("n2", 1)]));
        assert_eq!(ma, mb);
    }

    #[test]
    fn vectors_order_by_what_each_has_seen() {
        let a = vv(&[("a", 1)]);
        let b = a.bumped("b");
        assert_eq!(a.compare(&b), Order::Before);
        assert_eq!(b.compare(&a), Order::After);
        assert_eq!(a.compare(&a.clone()), Order::Equal);
        let c = a.bumped("c");
        assert_eq!(b.compare(&c), Order::Concurrent);
        assert_eq!(b.merged(&c), vv(&[("a", 1), ("b", 1), ("c", 1)]));
    }

    #[test]
    fn a_newer_version_replaces_an_older_one() {
        let old = version("a", vv(&[("a", 1)]), 10, "x");
        let new = version("b", vv(&[("a", 1), ("b", 1)]), 5, "y");
        assert_eq!(resolve(&old, &new), Resolution::TakeRemote);
        assert_eq!(resolve(&new, &old), Resolution::KeepLocal);
    }

    #[test]
    fn concurrent_edits_conflict_and_every_node_names_the_loser_alike() {
        let base = vv(&[("a", 1)]);
        let on_a = version("a", base.bumped("a"), 1_764_000_000, "x");
        let on_b = version("b", base.bumped("b"), 1_764_000_100, "y");
        let at_a = resolve(&on_a, &on_b);
        let at_b = resolve(&on_b, &on_a);
        let (
            Resolution::Conflict {
                remote_wins: wa,
                loser_path: la,
                merged: ma,
            },
            Resolution::Conflict {
                remote_wins: wb,
                loser_path: lb,
                merged: mb,
            },
        ) = (at_a, at_b)
        else {
            panic!("not a conflict");
        };
        assert!(wa && !wb, "the later edit (b's) wins on both nodes");
        assert_eq!(la, lb);
        assert_eq!(la, "films/movie.sync-conflict-20251124-160000-a-x.mkv");
        assert_eq!(ma, mb);
    }

    #[test]
    fn an_edit_beats_a_concurrent_deletion() {
        let base = vv(&[("a", 1)]);
        let edited = version("a", base.bumped("a"), 1, "x");
        let mut deleted = version("b", base.bumped("b"), 99, "");
        deleted.deleted = true;
        match resolve(&deleted, &edited) {
            Resolution::Conflict { remote_wins, .. } => assert!(remote_wins),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn the_same_change_made_twice_is_no_conflict_and_both_sides_keep_the_later_mtime() {
        let base = vv(&[("a", 1)]);
        let x = version("a", base.bumped("a"), 1, "same");
        let y = version("b", base.bumped("b"), 2, "same");
        let merged = x.vv.merged(&y.vv);
        assert_eq!(resolve(&x, &y), Resolution::TakeMeta { merged });
        assert_eq!(resolve(&y, &x), Resolution::KeepLocal);
    }

    #[test]
    fn two_conflicts_one_node_lost_in_one_second_get_names_of_their_own() {
        assert_ne!(
            conflict_name("n9.bin", 7, "n", "aaaaaaaa11"),
            conflict_name("n9.bin", 7, "n", "bbbbbbbb22")
        );
    }

    #[test]
    fn conflict_names_keep_folders_and_handle_missing_extensions() {
        assert_eq!(
            conflict_name("notes", 0, "n", "0123456789"),
            "notes.sync-conflict-19700101-000000-n-01234567"
        );
        assert_eq!(
            conflict_name("a/b/.hidden", 0, "n", "ab"),
            "a/b/.hidden.sync-conflict-19700101-000000-n-ab"
        );
        assert_eq!(
            conflict_name("a/x.tar.gz", 0, "n", "cd"),
            "a/x.tar.sync-conflict-19700101-000000-n-cd.gz"
        );
    }

    #[test]
    fn a_vanished_or_unmarked_root_never_spreads_deletions() {
        assert!(may_propagate_deletions(true, true));
        assert!(!may_propagate_deletions(false, false));
        assert!(!may_propagate_deletions(true, false));
    }

    #[test]
    fn a_counter_at_its_maximum_saturates_instead_of_wrapping() {
        let v = vv(&[("a", u64::MAX)]).bumped("a");
        assert_eq!(v.0["a"], u64::MAX);
    }

    #[test]
    fn a_conflict_name_exists_for_any_mtime() {
        let far = conflict_name("f.txt", u64::MAX, "n1", "abcdef0123");
        assert_eq!(far, format!("f.sync-conflict-{}-n1-abcdef01.txt", u64::MAX));
        let last = conflict_name("f.txt", MAX_MTIME, "n1", "abcdef0123");
        assert_eq!(last, "f.sync-conflict-99991231-235959-n1-abcdef01.txt");
    }

    #[test]
    fn concurrent_changes_of_metadata_alone_settle_on_one_version_on_both_sides() {
        let id = "a".repeat(64);
        let base = version("n1", vv(&[("n1", 1)]), 100, &id);
        let chmod = FileVersion {
            vv: vv(&[("n1", 2)]),
            mode: Some(0o600),
            ..base.clone()
        };
        let touch = FileVersion {
            vv: vv(&[("n1", 1), ("n2", 1)]),
            node: "n2".into(),
            mtime: 200,
            mode: Some(0o644),
            ..base.clone()
        };
        let merged = chmod.vv.merged(&touch.vv);
        // The later wins on both sides, under the merged vector, and nothing is copied.
        assert_eq!(
            resolve(&chmod, &touch),
            Resolution::TakeMeta {
                merged: merged.clone()
            }
        );
        assert_eq!(resolve(&touch, &chmod), Resolution::KeepLocal);
        // The same metadata made twice is no change at all.
        let twice = FileVersion {
            vv: vv(&[("n1", 1), ("n2", 1)]),
            node: "n2".into(),
            ..chmod.clone()
        };
        assert_eq!(resolve(&chmod, &twice), Resolution::KeepLocal);
        assert_eq!(resolve(&twice, &chmod), Resolution::KeepLocal);
    }

    #[test]
    fn absurd_announced_versions_are_refused_and_sane_ones_pass() {
        let id = "a".repeat(64);
        let good = version("n1", vv(&[("n1", 3)]), 1_700_000_000, &id);
        assert_eq!(good.check(), Ok(()));
        let deletion = FileVersion {
            deleted: true,
            content: String::new(),
            ..good.clone()
        };
        assert_eq!(deletion.check(), Ok(()));
        let folder = FileVersion {
            content: DIR.into(),
            ..good.clone()
        };
        assert_eq!(folder.check(), Ok(()));
        let many: BTreeMap<String, u64> =
            (0..=MAX_VV_NODES).map(|i| (format!("n{i}"), 1)).collect();
        let bad = [
            FileVersion {
                mtime: MAX_MTIME + 1,
                ..good.clone()
            },
            FileVersion {
                mtime: u64::MAX,
                ..good.clone()
            },
            FileVersion {
                content: "../../etc".into(),
                ..good.clone()
            },
            FileVersion {
                node: "n".repeat(MAX_NODE_ID + 1),
                ..good.clone()
            },
            FileVersion {
                vv: vv(&[("n1", u64::MAX)]),
                ..good.clone()
            },
            FileVersion {
                vv: VersionVector(many),
                ..good.clone()
            },
            FileVersion {
                size: u64::MAX,
                ..good.clone()
            },
            FileVersion {
                mode: Some(0o4755),
                ..good.clone()
            },
        ];
        for v in bad {
            assert!(
                matches!(v.check(), Err(VersionError::CheckVersion { .. })),
                "{v:?}"
            );
        }
    }
}
