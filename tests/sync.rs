//! Folder sync: a file created, changed, renamed or deleted on any member of a read-write
//! share shows up the same on every other, and faults (kills, a full disk, an unmounted
//! root, members cut apart) lose nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use watchalong::control::ShareStatus;

const DEADLINE: Duration = Duration::from_secs(60);

/// Every file under `root` (but the daemon's own) with the BLAKE3 of its content.
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree_of(root, false)
}

/// The same, each file's permission bits ahead of its hash.
fn tree_with_modes(root: &Path) -> BTreeMap<String, String> {
    tree_of(root, true)
}

fn tree_of(root: &Path, modes: bool) -> BTreeMap<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".watchalong-share" || name.contains(".watchalong-") {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, "dir".to_string());
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let hash = blake3::hash(&std::fs::read(&p).unwrap_or_default()).to_hex();
                let mode = std::fs::metadata(&p)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0);
                out.insert(
                    rel,
                    if modes {
                        format!("{mode:o} {hash}")
                    } else {
                        hash.to_string()
                    },
                );
            }
        }
    }
    out
}

fn same_everywhere(roots: &[PathBuf]) -> bool {
    let first = tree(&roots[0]);
    roots[1..].iter().all(|r| tree(r) == first)
}

fn wait_same(roots: &[PathBuf], what: &str, expect: impl Fn(&BTreeMap<String, String>) -> bool) {
    wait_same_within(DEADLINE, roots, what, expect)
}

fn wait_same_within(
    deadline: Duration,
    roots: &[PathBuf],
    what: &str,
    expect: impl Fn(&BTreeMap<String, String>) -> bool,
) {
    let ok = wait_until(deadline, || {
        same_everywhere(roots) && expect(&tree(&roots[0]))
    });
    let trees: Vec<_> = roots.iter().map(|r| tree(r)).collect();
    assert!(ok, "{what}: the trees differ: {trees:#?}");
}

/// A LAN with a host and `others` members, all offering the read-write share `docs`.
fn docs_lab(others: &[&str]) -> (Lab, Vec<Node>, Vec<PathBuf>) {
    docs_lab_prepared(others, |_| {})
}

/// The same, with `prepare` run on the share roots before any daemon starts.
fn docs_lab_prepared(
    others: &[&str],
    prepare: impl FnOnce(&[PathBuf]),
) -> (Lab, Vec<Node>, Vec<PathBuf>) {
    let mut lab = Lab::new();
    let mut nodes = vec![lab.node("host")];
    for name in others {
        nodes.push(lab.node(name));
    }
    let roots: Vec<PathBuf> = nodes.iter().map(|n| n.share_rw("docs")).collect();
    prepare(&roots);
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in &nodes[1..] {
        let link = nodes[0].link(&[]);
        n.ok(&["join", &link]);
    }
    (lab, nodes, roots)
}

#[test]
fn create_change_rename_delete_mkdir_and_rmdir_on_any_member_reach_every_other() {
    if !root_or_skip("create_change_rename_delete_mkdir_and_rmdir_on_any_member_reach_every_other")
    {
        return;
    }
    let (_lab, nodes, roots) = docs_lab(&["a", "b"]);
    let (host, a, b) = (&nodes[0], &nodes[1], &nodes[2]);

    std::fs::write(roots[1].join("notes.txt"), b"written on a\n").unwrap();
    wait_same(&roots, "create on a", |t| t.contains_key("notes.txt"));

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(roots[2].join("notes.txt"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended on b\n").unwrap();
    drop(f);
    let appended = blake3::hash(b"written on a\nappended on b\n")
        .to_hex()
        .to_string();
    wait_same(&roots, "append on b", |t| {
        t.get("notes.txt") == Some(&appended)
    });

    std::fs::create_dir_all(roots[0].join("sub")).unwrap();
    std::fs::write(roots[0].join("sub/deep.bin"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    wait_same(&roots, "file in a folder on the host", |t| {
        t.contains_key("sub/deep.bin")
    });

    std::fs::rename(roots[0].join("notes.txt"), roots[0].join("renamed.txt")).unwrap();
    wait_same(&roots, "rename on the host", |t| {
        t.contains_key("renamed.txt") && !t.contains_key("notes.txt")
    });

    std::fs::remove_file(roots[1].join("sub/deep.bin")).unwrap();
    wait_same(&roots, "delete on a", |t| !t.contains_key("sub/deep.bin"));

    std::fs::create_dir(roots[2].join("empty")).unwrap();
    wait_same(&roots, "mkdir on b", |t| {
        t.get("empty").map(String::as_str) == Some("dir")
    });
    std::fs::remove_dir(roots[0].join("sub")).unwrap();
    std::fs::remove_dir(roots[0].join("empty")).unwrap();
    wait_same(&roots, "rmdir on the host", |t| {
        !t.contains_key("sub") && !t.contains_key("empty")
    });
    assert_eq!(tree(&roots[2]).len(), 1, "{:?}", tree(&roots[2]));
    for n in [host, a, b] {
        let ok = wait_until(DEADLINE, || {
            n.status().shares.first().is_some_and(|sh| {
                sh.name == "docs"
                    && sh.files == 1
                    && sh.pulling == 0
                    && sh.root_ok
                    && sh.last_error.is_none()
            })
        });
        assert!(
            ok,
            "{} does not report the share in sync: {:?}",
            n.name,
            n.status().shares
        );
    }
}

#[test]
fn a_chmod_of_a_file_and_a_touch_of_a_folder_reach_every_member_without_refetching() {
    if !root_or_skip(
        "a_chmod_of_a_file_and_a_touch_of_a_folder_reach_every_member_without_refetching",
    ) {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (_lab, nodes, roots) = docs_lab(&["a", "b"]);
    let mode = |p: PathBuf| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .ok()
    };
    let mtime = |p: PathBuf| std::fs::metadata(p).map(|m| m.mtime()).ok();
    std::fs::create_dir(roots[0].join("album")).unwrap();
    std::fs::write(roots[0].join("album/song.txt"), b"la la la\n").unwrap();
    std::fs::set_permissions(
        roots[0].join("album/song.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    wait_same(&roots, "the file and its folder", |t| {
        t.contains_key("album/song.txt")
    });
    let fetched = |nodes: &[Node]| -> u64 {
        nodes
            .iter()
            .map(|n| n.status().node.chunks.fetched_chunks)
            .sum()
    };
    let fetched_before = fetched(&nodes);

    // `chmod 640` on a member that is not the host.
    let ok = std::process::Command::new("chmod")
        .arg("640")
        .arg(roots[1].join("album/song.txt"))
        .status()
        .unwrap();
    assert!(ok.success());
    let everywhere = wait_until(DEADLINE, || {
        roots
            .iter()
            .all(|r| mode(r.join("album/song.txt")) == Some(0o640))
    });
    let modes: Vec<_> = roots
        .iter()
        .map(|r| mode(r.join("album/song.txt")))
        .collect();
    assert!(
        everywhere,
        "the chmod did not reach every member: {modes:?}"
    );

    // `touch -d` on the host's folder.
    let ok = std::process::Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06 UTC"])
        .arg(roots[0].join("album"))
        .status()
        .unwrap();
    assert!(ok.success());
    let want = 981_173_106;
    assert_eq!(mtime(roots[0].join("album")), Some(want));
    let everywhere = wait_until(DEADLINE, || {
        roots.iter().all(|r| mtime(r.join("album")) == Some(want))
    });
    let mtimes: Vec<_> = roots.iter().map(|r| mtime(r.join("album"))).collect();
    assert!(
        everywhere,
        "the folder's mtime did not reach every member: {mtimes:?}"
    );

    // Metadata moved, content did not: no chunk fetched, no conflict copy, one tree.
    assert_eq!(
        fetched(&nodes),
        fetched_before,
        "a metadata change fetched content"
    );
    wait_same(&roots, "after the metadata changes", |t| t.len() == 2);
    let first = tree_with_modes(&roots[0]);
    assert!(roots.iter().all(|r| tree_with_modes(r) == first));
}

#[test]
fn the_same_file_edited_on_two_cut_off_members_keeps_both_versions_everywhere() {
    if !root_or_skip("the_same_file_edited_on_two_cut_off_members_keeps_both_versions_everywhere") {
        return;
    }
    let (_lab, nodes, roots) = docs_lab(&["a", "b"]);
    let a = &nodes[1];
    std::fs::write(roots[0].join("plan.txt"), b"v1\n").unwrap();
    wait_same(&roots, "first version", |t| t.contains_key("plan.txt"));

    // a is cut off by its firewall; a and b both edit the file.
    let cut = |op: &str| firewall(a, op);
    cut("-I");
    std::fs::write(roots[1].join("plan.txt"), b"v2 from a\n").unwrap();
    std::fs::write(roots[2].join("plan.txt"), b"v2 from b, longer\n").unwrap();
    let b_version = blake3::hash(b"v2 from b, longer\n").to_hex().to_string();
    assert!(wait_until(DEADLINE, || tree(&roots[0]).get("plan.txt")
        == Some(&b_version)));
    cut("-D");

    let a_version = blake3::hash(b"v2 from a\n").to_hex().to_string();
    wait_same(&roots, "after healing", |t| {
        let conflicts: Vec<&String> = t.keys().filter(|k| k.contains(".sync-conflict-")).collect();
        t.len() == 2
            && conflicts.len() == 1
            && t.values().any(|v| *v == a_version)
            && t.values().any(|v| *v == b_version)
    });
}

#[test]
fn members_cut_apart_catch_up_within_five_seconds_of_the_heal_and_go_direct_again() {
    if !root_or_skip(
        "members_cut_apart_catch_up_within_five_seconds_of_the_heal_and_go_direct_again",
    ) {
        return;
    }
    let (_lab, nodes, roots) = docs_lab(&["a", "b"]);
    let (a, b) = (&nodes[1], &nodes[2]);
    let path = |from: &Node, to: &str| {
        from.peers()
            .peers
            .into_iter()
            .find(|p| p.name == to)
            .map(|p| p.path)
            .unwrap_or_default()
    };
    std::fs::write(roots[0].join("before.txt"), b"before the cut\n").unwrap();
    wait_same(&roots, "before the cut", |t| t.contains_key("before.txt"));
    let direct = wait_until(DEADLINE, || {
        path(a, "b") == "direct" && path(b, "a") == "direct"
    });
    assert!(
        direct,
        "a and b never went direct: {} / {}",
        path(a, "b"),
        path(b, "a")
    );

    // a is cut off by its firewall; a and b each write a file meanwhile.
    let cut = |op: &str| firewall(a, op);
    cut("-I");
    std::fs::write(
        roots[1].join("from-a.txt"),
        b"written on a during the cut\n",
    )
    .unwrap();
    std::fs::write(
        roots[2].join("from-b.txt"),
        b"written on b during the cut\n",
    )
    .unwrap();
    assert!(
        wait_until(DEADLINE, || tree(&roots[0]).contains_key("from-b.txt")),
        "b's file never reached the host"
    );
    // Long enough for both sides to see the direct path gone, so the heal needs a new
    // handshake, not just the old session.
    let noticed = wait_until(DEADLINE, || {
        path(a, "b") != "direct" && path(b, "a") != "direct"
    });
    assert!(
        noticed,
        "the cut went unnoticed: {} / {}",
        path(a, "b"),
        path(b, "a")
    );
    assert!(!tree(&roots[1]).contains_key("from-b.txt"));

    cut("-D");
    let healed = std::time::Instant::now();
    let caught_up = wait_until(DEADLINE, || {
        roots.iter().all(|r| {
            let t = tree(r);
            t.contains_key("from-a.txt") && t.contains_key("from-b.txt")
        })
    });
    let synced = healed.elapsed();
    assert!(caught_up, "the two sides never caught up after the heal");
    let direct = wait_until(DEADLINE, || {
        path(a, "b") == "direct" && path(b, "a") == "direct"
    });
    let direct_in = healed.elapsed();
    assert!(
        direct,
        "no direct path after the heal: {} / {}",
        path(a, "b"),
        path(b, "a")
    );
    println!(
        "after the heal: both edits everywhere in {} ms, direct both ways in {} ms",
        synced.as_millis(),
        direct_in.as_millis()
    );
    // Driven by the first knock through (every 2 s) and the greeting that follows it
    // (every 0.5 s), not by the 10 s full round.
    let five = Duration::from_secs(5);
    assert!(
        synced <= five,
        "both edits everywhere only {synced:?} after the heal"
    );
    assert!(
        direct_in <= five,
        "direct again only {direct_in:?} after the heal"
    );
}

#[test]
fn a_file_rewritten_right_after_it_arrived_elsewhere_arrives_again() {
    if !root_or_skip("a_file_rewritten_right_after_it_arrived_elsewhere_arrives_again") {
        return;
    }
    let (_lab, _nodes, roots) = docs_lab(&["a"]);
    for i in 0..5 {
        let name = format!("f{i}.txt");
        std::fs::write(roots[1].join(&name), format!("first {i}")).unwrap();
        wait_same(&roots, "create", |t| t.contains_key(&name));
        std::fs::write(roots[1].join(&name), format!("second, longer {i}")).unwrap();
        let want = blake3::hash(format!("second, longer {i}").as_bytes())
            .to_hex()
            .to_string();
        wait_same(&roots, "rewrite", |t| t.get(&name) == Some(&want));
    }
}

/// A small tmpfs mounted on a folder, unmounted (lazily, so a busy one goes too) on drop.
/// The daemons see it because it is mounted before they start: `ip netns exec` gives them
/// a copy of the mount table, and this host's mounts do not propagate.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        must(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Space freed: the same file system, made bigger, as every namespace sees it.
    fn resize(&self, size: &str) {
        must(
            "mount",
            &[
                "-o",
                &format!("remount,size={size}"),
                self.0.to_str().unwrap(),
            ],
        );
    }

    /// Remounted with `opts` where `daemon` runs, and here.
    fn remount_under(&self, daemon: &Node, opts: &str) {
        let pid = daemon.pid().expect("daemon runs").to_string();
        let dir = self.0.to_str().unwrap();
        let remount = format!("remount,{opts}");
        must(
            "nsenter",
            &["--mount", "--target", &pid, "mount", "-o", &remount, dir],
        );
        must("mount", &["-o", &remount, dir]);
    }

    /// Unmounted where `daemon` runs, and here.
    fn unmount_under(&self, daemon: &Node) {
        let pid = daemon.pid().expect("daemon runs").to_string();
        must(
            "nsenter",
            &[
                "--mount",
                "--target",
                &pid,
                "umount",
                self.0.to_str().unwrap(),
            ],
        );
        let _ = run("umount", &[self.0.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// Writes `data` beside the share and moves it in, so it is announced once, whole.
/// The host and member a, with no chunk cache at a: what a reuses of a file must come
/// from the file it holds.
fn docs_lab_without_cache() -> (Lab, Vec<Node>, Vec<PathBuf>) {
    docs_lab_prepared(&["a"], |roots| {
        let config = roots[1].parent().unwrap().join("watchalong.toml");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(config)
            .unwrap();
        std::io::Write::write_all(&mut f, b"\n[relay]\ncache_mib = 0\n").unwrap();
    })
}

/// Inserts (`-I`) or deletes (`-D`) the rules that drop everything `n` sends or receives on
/// its internet link: a cut, then its end.
fn firewall(n: &Node, op: &str) {
    for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
        let o =
            n.ns.exec(&["iptables", op, chain, dir, "eth0", "-j", "DROP"]);
        assert!(
            o.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn place(root: &Path, name: &str, size: u64, seed: &str) -> String {
    let outside = root.parent().unwrap().join(format!("{name}.tmp"));
    let hash = write_random(&outside, size, seed);
    std::fs::rename(&outside, root.join(name)).unwrap();
    hash.to_hex().to_string()
}

/// The node's first share's sync state, if it has a share.
fn share_status(n: &Node) -> Option<ShareStatus> {
    n.status().shares.into_iter().next()
}

fn last_error(n: &Node) -> Option<String> {
    share_status(n).and_then(|s| s.last_error)
}

/// Waits until `n`'s share shows an error containing `needle`, and returns it.
fn wait_share_error(n: &Node, needle: &str) -> String {
    let shown = wait_until(DEADLINE, || {
        last_error(n).is_some_and(|e| e.contains(needle))
    });
    assert!(shown, "no {needle:?} in status: {:?}", share_status(n));
    last_error(n).unwrap()
}

#[test]
fn a_full_disk_stops_the_sync_with_a_clear_error_and_it_resumes_when_space_is_freed() {
    if !root_or_skip(
        "a_full_disk_stops_the_sync_with_a_clear_error_and_it_resumes_when_space_is_freed",
    ) {
        return;
    }
    let mut disk = None;
    let (_lab, nodes, roots) = docs_lab_prepared(&["a"], |roots| {
        disk = Some(Tmpfs::mount(&roots[1], "4m"));
    });
    let disk = disk.unwrap();
    let want = place(&roots[0], "big.bin", 12 << 20, "full disk");

    let a = &nodes[1];
    let err = wait_share_error(a, "disk full");
    assert!(
        err.contains("big.bin") && err.contains("space is freed"),
        "{err}"
    );
    assert!(
        a.log().contains("disk full"),
        "not in the log:\n{}",
        a.log()
    );
    assert!(
        !roots[1].join("big.bin").exists(),
        "a file stands at the final path of a pull that did not fit"
    );

    disk.resize("64m");
    wait_same(&roots, "after space was freed", |t| {
        t.get("big.bin") == Some(&want)
    });
    assert!(
        wait_until(DEADLINE, || last_error(a).is_none()),
        "the error outlived the condition: {:?}",
        share_status(a)
    );
}

#[test]
fn a_small_change_arrives_while_a_big_file_is_still_being_pulled() {
    if !root_or_skip("a_small_change_arrives_while_a_big_file_is_still_being_pulled") {
        return;
    }
    let (_lab, nodes, roots) = docs_lab(&["a"]);
    let a = &nodes[1];
    // 64 MiB through 40 Mbit/s: about thirteen seconds of pulling.
    nodes[0].shape(40);
    let big = place(&roots[0], "big.bin", 64 << 20, "big");
    assert!(
        wait_until(DEADLINE, || share_status(a)
            .is_some_and(|s| s.bytes_left > 0)),
        "the big pull never started: {:?}",
        share_status(a)
    );
    std::fs::write(roots[0].join("note.txt"), b"meet at eight").unwrap();
    assert!(
        wait_until(DEADLINE, || std::fs::read(roots[1].join("note.txt"))
            .is_ok_and(|b| b == b"meet at eight")),
        "the note never arrived"
    );
    assert!(
        !roots[1].join("big.bin").exists(),
        "the note waited for the big file to finish"
    );
    wait_same(&roots, "the big file too", |t| {
        t.get("big.bin") == Some(&big)
    });
}

#[test]
fn a_root_the_daemon_cannot_write_says_how_to_open_it_and_syncs_once_it_can() {
    if !root_or_skip("a_root_the_daemon_cannot_write_says_how_to_open_it_and_syncs_once_it_can") {
        return;
    }
    // What the shipped unit's sandbox does to a share not named in ReadWritePaths=.
    let mut disk = None;
    let (_lab, nodes, roots) = docs_lab_prepared(&["a"], |roots| {
        let d = Tmpfs::mount(&roots[1], "16m");
        std::fs::write(roots[1].join(".watchalong-share"), b"root\n").unwrap();
        must("mount", &["-o", "remount,ro", roots[1].to_str().unwrap()]);
        disk = Some(d);
    });
    let disk = disk.unwrap();
    let a = &nodes[1];
    let want = place(&roots[0], "film.bin", 1 << 20, "read-only");
    let err = wait_share_error(a, "not writable by the daemon");
    assert!(
        err.contains(&format!("ReadWritePaths={}", roots[1].display())),
        "{err}"
    );
    assert!(
        a.log().contains("not writable by the daemon"),
        "{}",
        a.log()
    );
    assert!(a.status().node.name == "a", "the daemon is still serving");

    disk.remount_under(a, "rw");
    wait_same(&roots, "once the root is writable", |t| {
        t.get("film.bin") == Some(&want)
    });
    assert!(
        wait_until(DEADLINE, || last_error(a).is_none()),
        "the error outlived the condition: {:?}",
        share_status(a)
    );
}

#[test]
fn a_root_unmounted_or_gone_on_one_member_deletes_nothing_elsewhere() {
    if !root_or_skip("a_root_unmounted_or_gone_on_one_member_deletes_nothing_elsewhere") {
        return;
    }
    let mut disk = None;
    let (_lab, nodes, roots) = docs_lab_prepared(&["a", "b"], |roots| {
        disk = Some(Tmpfs::mount(&roots[2], "16m"));
    });
    let disk = disk.unwrap();
    std::fs::create_dir(roots[0].join("d")).unwrap();
    std::fs::write(roots[0].join("d/kept.txt"), b"kept").unwrap();
    std::fs::write(roots[0].join("top.txt"), b"top").unwrap();
    wait_same(&roots, "before", |t| t.len() == 3);

    // b's disk goes away under the running daemon; a's folder is moved off.
    disk.unmount_under(&nodes[2]);
    let moved = roots[1].with_file_name("share-docs-moved");
    std::fs::rename(&roots[1], &moved).unwrap();
    for n in &nodes[1..] {
        assert!(
            wait_until(DEADLINE, || share_status(n).is_some_and(|s| !s.root_ok)),
            "{} did not notice its root went: {:?}",
            n.name,
            share_status(n)
        );
    }
    // Life goes on at the host, and b writes nothing into its empty mount point.
    std::fs::write(roots[0].join("later.txt"), b"later").unwrap();
    for n in &nodes[1..] {
        assert!(
            wait_until(DEADLINE, || last_error(n)
                .is_some_and(|e| e.contains("marker"))),
            "{} does not say why it stopped: {:?}",
            n.name,
            share_status(n)
        );
    }
    // Nothing is deleted when the error shows, nor for a while after: the host's tree is
    // watched for longer than a full round of the members (a full scan every 10 s, and
    // a scan every 2 s), so each of them scanned its missing root and announced what
    // it saw more than once.
    let expect = ["d", "d/kept.txt", "later.txt", "top.txt"];
    let mut lost = None;
    let deleted = wait_until(Duration::from_secs(13), || {
        let host = tree(&roots[0]);
        let keys: Vec<&str> = host.keys().map(String::as_str).collect();
        if keys != expect {
            lost = Some(keys.join(", "));
        }
        lost.is_some()
    });
    assert!(!deleted, "a deletion reached the host: it holds {lost:?}");
    assert!(
        std::fs::read_dir(&roots[2]).unwrap().next().is_none(),
        "b wrote into its empty mount point"
    );
}

/// What a user does to a folder, picked from what that user sees there.
fn random_op(rng: &mut rand::rngs::StdRng, root: &Path, n: usize) -> String {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let now = tree(root);
    let files: Vec<&String> = now
        .iter()
        .filter(|(_, h)| *h != "dir")
        .map(|(p, _)| p)
        .collect();
    let dirs: Vec<&String> = now
        .iter()
        .filter(|(_, h)| *h == "dir")
        .map(|(p, _)| p)
        .collect();
    let empty_dirs: Vec<&String> = dirs
        .iter()
        .copied()
        .filter(|d| !now.keys().any(|k| k.starts_with(&format!("{d}/"))))
        .collect();
    let folder = match dirs.choose(rng) {
        Some(d) if rng.gen_bool(0.5) => root.join(d),
        _ => root.to_path_buf(),
    };
    let file = files.choose(rng).map(|f| root.join(f));
    let mut content = vec![0u8; rng.gen_range(0..48 * 1024)];
    rng.fill(&mut content[..]);
    let op = rng.gen_range(0..8);
    let r: std::io::Result<String> = match (op, file) {
        (1, Some(p)) => std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &content[..content.len().min(100)]))
            .map(|_| format!("append {}", p.display())),
        (2, Some(p)) => std::fs::write(&p, &content).map(|_| format!("overwrite {}", p.display())),
        (3, Some(p)) => {
            let to = folder.join(format!("n{n}.moved"));
            std::fs::rename(&p, &to).map(|_| format!("rename {} {}", p.display(), to.display()))
        }
        (4, Some(p)) => std::fs::remove_file(&p).map(|_| format!("delete {}", p.display())),
        (7, Some(p)) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = *[0o600, 0o640, 0o644, 0o664, 0o755].choose(rng).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map(|_| format!("chmod {mode:o} {}", p.display()))
        }
        (5, _) if !empty_dirs.is_empty() => {
            let p = root.join(empty_dirs.choose(rng).unwrap());
            std::fs::remove_dir(&p).map(|_| format!("rmdir {}", p.display()))
        }
        (6, _) => {
            let p = folder.join(format!("n{n}.d"));
            std::fs::create_dir(&p).map(|_| format!("mkdir {}", p.display()))
        }
        _ => {
            let p = folder.join(format!("n{n}.bin"));
            std::fs::write(&p, &content).map(|_| format!("create {}", p.display()))
        }
    };
    // The sync may have moved the target away a moment ago: the user's op then fails,
    // as it would for them; the run goes on.
    r.unwrap_or_else(|e| format!("op {op} failed: {e}"))
}

#[test]
fn two_hundred_random_operations_on_three_members_in_three_sites_leave_one_tree() {
    if !root_or_skip("two_hundred_random_operations_on_three_members_in_three_sites_leave_one_tree")
    {
        return;
    }
    use rand::SeedableRng;
    let mut lab = Lab::internet();
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut r2 = lab.router("r2", [192, 168, 2]);
    let mut nodes = vec![
        lab.node("host"),
        lab.node_behind(&mut r1, "a"),
        lab.node_behind(&mut r2, "b"),
    ];
    let roots: Vec<PathBuf> = nodes.iter().map(|n| n.share_rw("docs")).collect();
    for n in nodes.iter_mut() {
        // Random churn deletes a third of a small share within a minute, which the
        // mass-deletion hold would stop: this test is about converging, so it is off.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&n.config)
            .unwrap();
        writeln!(f, "\n[sync]\nmax_delete_percent = 100").unwrap();
        n.start();
    }
    for n in &nodes[1..] {
        join(&nodes[0], n);
    }
    wait_for_direct_mesh(&nodes.iter().collect::<Vec<_>>(), DEADLINE);

    let seed: u64 = std::env::var("WATCHALONG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (WATCHALONG_TEST_SEED={seed} replays this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut done = Vec::new();
    let same = |roots: &[PathBuf]| {
        let first = tree_with_modes(&roots[0]);
        roots[1..].iter().all(|r| tree_with_modes(r) == first)
    };
    // In bursts of ten with no pause inside a burst, so members act at once on files
    // they all hold (two edits, an edit and a delete, an rmdir and a create inside);
    // between bursts the group settles, so the next burst works on shared files again.
    for n in 0..200 {
        let who = rand::Rng::gen_range(&mut rng, 0..roots.len());
        let op = random_op(&mut rng, &roots[who], n);
        done.push(format!("{}: {op}", nodes[who].name));
        if n % 10 == 9 && n < 199 && !wait_until(Duration::from_secs(90), || same(&roots)) {
            let trees: Vec<_> = roots.iter().map(|r| tree_with_modes(r)).collect();
            panic!(
                "seed {seed}: no single tree after\n{}\n{trees:#?}",
                done.join("\n")
            );
        }
    }
    let failed = done.iter().filter(|d| d.contains("failed")).count();
    assert!(failed < 50, "most operations failed:\n{}", done.join("\n"));
    let started = std::time::Instant::now();
    let ok = wait_until(Duration::from_secs(90), || same(&roots));
    if !ok {
        let trees: Vec<_> = roots.iter().map(|r| tree_with_modes(r)).collect();
        panic!(
            "seed {seed}: the trees differ after\n{}\n{trees:#?}",
            done.join("\n")
        );
    }
    let end = tree_with_modes(&roots[0]);
    println!(
        "{} operations ({failed} refused by the file system), {} entries at the end ({} kept \
         as conflict copies), one tree {:?} after the last operation",
        done.len(),
        end.len(),
        end.keys().filter(|k| k.contains(".sync-conflict-")).count(),
        started.elapsed()
    );
    assert!(
        end.len() >= 10,
        "too little left to prove anything: {end:#?}"
    );
    for n in &nodes {
        assert!(
            wait_until(DEADLINE, || share_status(n).is_some_and(|s| s.pulling == 0)),
            "{} still pulling: {:?}",
            n.name,
            share_status(n)
        );
    }
}

#[test]
fn a_receiver_killed_twenty_times_during_a_256_mib_pull_never_shows_a_mixed_file_and_fetches_each_chunk_about_once(
) {
    if !root_or_skip("a_receiver_killed_twenty_times_during_a_256_mib_pull_never_shows_a_mixed_file_and_fetches_each_chunk_about_once") {
        return;
    }
    use rand::{Rng, SeedableRng};
    let (lab, mut nodes, roots) = docs_lab(&["a"]);
    // The old version, everywhere first.
    let old = place(&roots[0], "big.bin", 1 << 20, "old");
    wait_same(&roots, "the old version", |t| {
        t.get("big.bin") == Some(&old)
    });
    let served_before = nodes[0].status().node.chunks.served_chunks;

    // Slow enough that twenty kills land while the pull runs, fast enough for CI: at
    // 100 Mbit/s about 45 chunks a second, so a run overshoots its random stop (at most
    // 24 chunks) by a few polls' worth, and twenty runs fetch well under the 1024 chunks.
    nodes[0].shape(100);
    let size: u64 = 256 << 20;
    let chunks = size / (256 * 1024);
    // The first run's counter already holds the old version's chunks; a restart zeroes it.
    let mut counted_before = nodes[1].status().node.chunks.fetched_chunks;
    let new = place(&roots[0], "big.bin", size, "new");

    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chunk_counts = |n: &Node| {
        let c = n.status().node.chunks;
        (c.fetched_chunks, c.resumed_chunks)
    };
    let mut kills = 0;
    let mut max_resumed = 0;
    // Chunks whose bodies had arrived at the receiver before each kill: each was written
    // to the partial file a moment later, so the run after the last kill must find them.
    let mut arrived_before_kills = 0;
    while kills < 20 {
        // A random moment: after this run fetched a random number of new chunks.
        let after = rng.gen_range(1..=24);
        let reached = wait_until(DEADLINE, || {
            chunk_counts(&nodes[1]).0 >= counted_before + after
                || tree(&roots[1]).get("big.bin") == Some(&new)
        });
        assert!(reached, "run {kills}: the pull made no progress");
        if tree(&roots[1]).get("big.bin") == Some(&new) {
            break;
        }
        max_resumed = max_resumed.max(chunk_counts(&nodes[1]).1);
        if kills == 0 {
            let st = share_status(&nodes[1]).expect("the share");
            let left = st.bytes_left;
            assert!(
                st.pulling == 1 && left > 0 && left < size,
                "status does not show the pull: {st:?}"
            );
        }
        arrived_before_kills += chunk_counts(&nodes[1]).0 - counted_before;
        nodes[1].kill9();
        kills += 1;
        let held = tree(&roots[1]).get("big.bin").cloned();
        assert!(
            held == Some(old.clone()) || held == Some(new.clone()),
            "kill {kills}: big.bin is neither the old nor the new version"
        );
        nodes[1].start();
        counted_before = 0;
    }
    assert_eq!(kills, 20, "the pull ended after only {kills} kills");
    // Most of the file is still to come. Across a lab internet with a round trip (see
    // `Lab::rtt`), each chunk costs a new connection's handshake and slow start: at 50 ms
    // a worker took about 13 round trips a chunk (6 chunks a second for four workers,
    // 150 s for the rest), so four round trips a chunk on top.
    let rest = DEADLINE + lab.rtt() * 4 * chunks as u32;
    wait_same_within(rest, &roots, "after the last restart", |t| {
        t.get("big.bin") == Some(&new)
    });
    assert!(
        max_resumed > 0,
        "no run ever kept what an earlier one fetched"
    );
    // What resuming must keep: the last run checked and kept every chunk an earlier run
    // received, but for one per kill whose write the kill may have cut short.
    let kept = chunk_counts(&nodes[1]).1;
    println!(
        "the last run kept {kept} chunks; {arrived_before_kills} had arrived before the kills"
    );
    assert!(
        kept + kills >= arrived_before_kills,
        "the last run kept {kept} chunks of the {arrived_before_kills} received before {kills} kills"
    );
    // What a kill may cost on the wire: the requests in flight, at most the fetch window's
    // ceiling (it grows with the measured path, and the shaped queue lengthens the round
    // trip it measures), and one chunk received but not yet written.
    let served = nodes[0].status().node.chunks.served_chunks - served_before;
    let allowed = chunks + kills * (watchalong::data::fetch::Window::CEILING as u64 + 1);
    println!("{kills} kills; the holder served {served} chunks for {chunks} (allowed {allowed})");
    assert!(
        served <= allowed,
        "{served} chunks served for a {chunks}-chunk file over {kills} kills"
    );
}

#[test]
fn a_kibibyte_inserted_in_the_middle_of_a_64_mib_file_fetches_under_2_mib() {
    if !root_or_skip("a_kibibyte_inserted_in_the_middle_of_a_64_mib_file_fetches_under_2_mib") {
        return;
    }
    let (_lab, nodes, roots) = docs_lab_without_cache();
    let first = place(&roots[0], "film.mkv", 64 << 20, "insert");
    wait_same(&roots, "the first version", |t| {
        t.get("film.mkv") == Some(&first)
    });
    let served = |n: &Node| {
        let c = n.status().node.chunks;
        (c.served_chunks, c.served_bytes)
    };
    let before = served(&nodes[0]);
    // As an editor saves: the whole file written anew beside it, then renamed over it.
    let mut bytes = std::fs::read(roots[0].join("film.mkv")).unwrap();
    let middle = bytes.len() / 2;
    bytes.splice(middle..middle, [b'+'; 1024]);
    let want = blake3::hash(&bytes).to_hex().to_string();
    let beside = roots[0].parent().unwrap().join("film.mkv.new");
    std::fs::write(&beside, &bytes).unwrap();
    drop(bytes);
    std::fs::rename(&beside, roots[0].join("film.mkv")).unwrap();
    wait_same(&roots, "after the insertion", |t| {
        t.get("film.mkv") == Some(&want)
    });
    let after = served(&nodes[0]);
    let (chunks, bytes) = (after.0 - before.0, after.1 - before.1);
    println!("the holder served {chunks} chunks, {bytes} bytes for a 1 KiB insertion");
    assert!(
        bytes < 2 << 20,
        "{bytes} bytes ({chunks} chunks) served for a 1 KiB insertion in 64 MiB"
    );
}

#[test]
fn an_append_to_a_big_file_fetches_only_the_chunk_that_changed() {
    if !root_or_skip("an_append_to_a_big_file_fetches_only_the_chunk_that_changed") {
        return;
    }
    let (_lab, nodes, roots) = docs_lab_without_cache();
    let first = place(&roots[0], "log.bin", 8 << 20, "append");
    wait_same(&roots, "the first version", |t| {
        t.get("log.bin") == Some(&first)
    });
    let fetched = |n: &Node| n.status().node.chunks.fetched_chunks;
    let before = fetched(&nodes[1]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(roots[0].join("log.bin"))
        .unwrap();
    std::io::Write::write_all(&mut f, &[b'+'; 100]).unwrap();
    drop(f);
    let mut want = std::fs::read(roots[0].join("log.bin")).unwrap();
    let want_hash = blake3::hash(&want).to_hex().to_string();
    want.clear();
    wait_same(&roots, "after the append", |t| {
        t.get("log.bin") == Some(&want_hash)
    });
    let again = fetched(&nodes[1]) - before;
    assert!(
        again <= 1,
        "{again} chunks fetched for a 100-byte append to 32 chunks"
    );
}
