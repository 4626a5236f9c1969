//! Folder sync, first slice: a file created, changed, renamed or deleted on any member
//! of a read-write share shows up the same on every other.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// Every file under `root` (but the daemon's own) with the BLAKE3 of its content.
fn tree(root: &Path) -> BTreeMap<String, String> {
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
                out.insert(
                    rel,
                    blake3::hash(&std::fs::read(&p).unwrap_or_default())
                        .to_hex()
                        .to_string(),
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
    let ok = wait_until(DEADLINE, || {
        same_everywhere(roots) && expect(&tree(&roots[0]))
    });
    let trees: Vec<_> = roots.iter().map(|r| tree(r)).collect();
    assert!(ok, "{what}: the trees differ: {trees:#?}");
}

/// A LAN with a host and `others` members, all offering the read-write share `docs`.
fn docs_lab(others: &[&str]) -> (Lab, Vec<Node>, Vec<PathBuf>) {
    let mut lab = Lab::new();
    let mut nodes = vec![lab.node("host")];
    for name in others {
        nodes.push(lab.node(name));
    }
    let roots: Vec<PathBuf> = nodes.iter().map(|n| n.share_rw("docs")).collect();
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
            let st = n.status();
            let sh = &st["shares"][0];
            sh["name"] == "docs"
                && sh["files"] == 1
                && sh["pulling"] == 0
                && sh["root_ok"] == true
                && sh["last_error"].is_null()
        });
        assert!(
            ok,
            "{} does not report the share in sync: {}",
            n.name,
            n.status()["shares"]
        );
    }
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

    // a is cut off; a and b both edit the file.
    must("ip", &["-n", &a.ns.name, "link", "set", "eth0", "down"]);
    std::fs::write(roots[1].join("plan.txt"), b"v2 from a\n").unwrap();
    std::fs::write(roots[2].join("plan.txt"), b"v2 from b, longer\n").unwrap();
    let b_version = blake3::hash(b"v2 from b, longer\n").to_hex().to_string();
    assert!(wait_until(DEADLINE, || tree(&roots[0]).get("plan.txt")
        == Some(&b_version)));
    must("ip", &["-n", &a.ns.name, "link", "set", "eth0", "up"]);

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

#[test]
fn a_pull_killed_midway_resumes_without_fetching_again_what_it_held() {
    if !root_or_skip("a_pull_killed_midway_resumes_without_fetching_again_what_it_held") {
        return;
    }
    let (_lab, mut nodes, roots) = docs_lab(&["a"]);
    // Slow the holder down so the pull is still running when the puller dies.
    nodes[0].shape(20);
    let size = 24 * 1024 * 1024;
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(b"resume")
        .finalize_xof()
        .fill(&mut data);
    // Written beside the share and moved in, so the holder announces one version only.
    let outside = roots[0].parent().unwrap().join("big.bin.tmp");
    std::fs::write(&outside, &data).unwrap();
    std::fs::rename(&outside, roots[0].join("big.bin")).unwrap();
    let want = blake3::hash(&data).to_hex().to_string();
    let chunks = (size / (256 * 1024)) as u64;
    let fetched = |n: &Node| {
        n.status()["node"]["chunks"]["fetched_chunks"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        wait_until(DEADLINE, || fetched(&nodes[1]) >= chunks / 4),
        "the pull never got going"
    );
    nodes[1].kill9();
    nodes[1].start();
    wait_same(&roots, "after the restart", |t| {
        t.get("big.bin") == Some(&want)
    });
    let st = nodes[1].status();
    let resumed = st["node"]["chunks"]["resumed_chunks"].as_u64().unwrap();
    let again = st["node"]["chunks"]["fetched_chunks"].as_u64().unwrap();
    assert!(
        resumed >= chunks / 4,
        "only {resumed} chunks were kept: {st}"
    );
    assert!(
        again + resumed <= chunks + 4,
        "fetched {again} again on top of {resumed} kept"
    );
}
