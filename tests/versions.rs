//! Nothing lost: what sync replaces or deletes on a node because of another member's
//! change is kept in the share's versions folder, listed, put back on request (and the
//! restore spreads), and pruned once older than `[sync] keep_versions_days`; and a member
//! that deletes most of a share is held everywhere until someone releases it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use watchalong::control::Kept;

const DEADLINE: Duration = Duration::from_secs(60);

/// Every file under `root/.watchalong-versions`.
fn kept_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(".watchalong-versions")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn versions(n: &Node, target: &str) -> Vec<Kept> {
    serde_json::from_str::<Vec<Kept>>(&n.ok(&["versions", target, "--json"]))
        .expect("versions json")
}

#[test]
fn a_remote_overwrite_and_deletion_keep_what_they_replaced_and_a_restore_comes_back_everywhere() {
    if !root_or_skip("a_remote_overwrite_and_deletion_keep_what_they_replaced_and_a_restore_comes_back_everywhere") {
        return;
    }
    let mut lab = Lab::new();
    let mut a = lab.node("a");
    let mut b = lab.node("b");
    let ra = a.share_rw("rw");
    let rb = b.share_rw("rw");
    a.start();
    b.start();
    join(&a, &b);
    std::fs::create_dir_all(ra.join("sub")).unwrap();
    std::fs::write(ra.join("sub/f.txt"), b"version one").unwrap();
    assert!(wait_until(DEADLINE, || std::fs::read(rb.join("sub/f.txt"))
        .is_ok_and(|c| c == b"version one")));

    // a overwrites: b keeps what it replaced, byte for byte.
    std::fs::write(ra.join("sub/f.txt"), b"version two, longer").unwrap();
    assert!(wait_until(DEADLINE, || std::fs::read(rb.join("sub/f.txt"))
        .is_ok_and(|c| c == b"version two, longer")));
    let kept = kept_files(&rb);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        blake3::hash(&std::fs::read(&kept[0]).unwrap()),
        blake3::hash(b"version one")
    );
    let listed = versions(&b, "rw/sub/f.txt");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].path, "sub/f.txt");
    assert_eq!(listed[0].size, 11);
    // The versions folder is never synced: a holds none of b's.
    assert!(versions(&a, "rw").is_empty());

    // a deletes: b moves the file into its versions instead of removing it.
    std::fs::remove_file(ra.join("sub/f.txt")).unwrap();
    assert!(wait_until(DEADLINE, || !rb.join("sub/f.txt").exists()));
    let kept = kept_files(&rb);
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept
        .iter()
        .any(|k| std::fs::read(k).unwrap() == b"version two, longer"));

    // b puts the newest back, and the restore spreads to a as a change.
    let out = b.ok(&["restore", "rw/sub/f.txt"]);
    assert!(out.contains("restored sub/f.txt"), "{out}");
    for root in [&rb, &ra] {
        assert!(
            wait_until(DEADLINE, || std::fs::read(root.join("sub/f.txt"))
                .is_ok_and(|c| c == b"version two, longer")),
            "the restore did not reach {}",
            root.display()
        );
    }
    // A version that is not there is a clear error.
    let o = b.cli(&["restore", "rw/sub/none.txt"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no kept version"));
}

#[test]
fn versions_older_than_the_kept_days_are_pruned_and_newer_ones_stay() {
    if !root_or_skip("versions_older_than_the_kept_days_are_pruned_and_newer_ones_stay") {
        return;
    }
    let mut lab = Lab::new();
    let mut a = lab.node("a");
    let ra = a.share_rw("rw");
    let dir = ra.join(".watchalong-versions/sub");
    std::fs::create_dir_all(&dir).unwrap();
    // Kept in 2000, and kept now (the time is in the name, as the daemon writes it).
    let old = dir.join("old.txt~20000101T000000Z");
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let new = dir.join(format!("new.txt~{now}"));
    std::fs::write(&old, b"old").unwrap();
    std::fs::write(&new, b"new").unwrap();
    a.start();
    assert!(
        wait_until(DEADLINE, || !old.exists()),
        "a version kept in 2000 outlived 30 days"
    );
    assert!(new.exists(), "a version kept today was pruned");
    let listed = versions(&a, "rw");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].path, "sub/new.txt");
}

fn held(n: &Node) -> Option<String> {
    n.status().shares.first().and_then(|s| s.held.clone())
}

#[test]
fn a_member_emptying_a_share_is_held_everywhere_until_released_and_what_goes_is_kept() {
    if !root_or_skip(
        "a_member_emptying_a_share_is_held_everywhere_until_released_and_what_goes_is_kept",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut a = lab.node("a");
    let mut b = lab.node("b");
    let mut c = lab.node("c");
    let ra = a.share_rw("rw");
    let (rb, rc) = (b.share_rw("rw"), c.share_rw("rw"));
    for i in 0..6 {
        std::fs::write(ra.join(format!("f{i}.txt")), format!("file {i}")).unwrap();
    }
    for n in [&mut a, &mut b, &mut c] {
        n.start();
    }
    join(&a, &b);
    join(&a, &c);
    for root in [&rb, &rc] {
        assert!(wait_until(DEADLINE, || (0..6)
            .all(|i| root.join(format!("f{i}.txt")).exists())));
    }

    // `rm -rf share/*` on a: the marker stays, every file goes.
    for i in 0..6 {
        std::fs::remove_file(ra.join(format!("f{i}.txt"))).unwrap();
    }
    for n in [&b, &c] {
        assert!(
            wait_until(DEADLINE, || held(n).is_some()),
            "{} did not hold the deletions",
            n.name
        );
        let why = held(n).unwrap();
        assert!(
            why.contains("sync release rw") && why.contains("6 of 6"),
            "{why}"
        );
    }
    // Nothing is deleted while held, over more than a full round of announcements.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        for root in [&rb, &rc] {
            assert!((0..6).all(|i| root.join(format!("f{i}.txt")).exists()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Someone says yes: the deletion proceeds, and everything removed is kept.
    for n in [&b, &c] {
        n.ok(&["sync", "release", "rw"]);
    }
    for (n, root) in [(&b, &rb), (&c, &rc)] {
        assert!(
            wait_until(DEADLINE, || (0..6)
                .all(|i| !root.join(format!("f{i}.txt")).exists())),
            "{} never deleted after the release",
            n.name
        );
        assert!(held(n).is_none());
        let kept: Vec<String> = versions(n, "rw").iter().map(|k| k.path.clone()).collect();
        for i in 0..6 {
            assert!(kept.contains(&format!("f{i}.txt")), "{}: {kept:?}", n.name);
        }
    }
    // And one is brought back from c's versions on every node.
    c.ok(&["restore", "rw/f3.txt"]);
    for root in [&ra, &rb, &rc] {
        assert!(
            wait_until(DEADLINE, || std::fs::read(root.join("f3.txt"))
                .is_ok_and(|x| x == b"file 3")),
            "f3.txt did not come back in {}",
            root.display()
        );
    }
}
