//! Local rights: another user on a node's machine who can open the control socket may
//! read, not change; a `get` goes only where its caller could write; and the CLI, which
//! may run as root, never touches a path the daemon names: it reads a handed-over file's
//! bytes through the socket and writes the destination itself.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);
/// A user in no group the node knows.
const OUTSIDER: &str = "12345";
/// A user whose group is the node's control group (`nogroup`, 65534).
const INSIDER: &str = "23456";
const CONTROL_GID: &str = "65534";

/// Runs the CLI of `node` as `uid` (primary group `gid`, no others).
fn cli_as(node: &Node, uid: &str, gid: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "--reuid",
        uid,
        "--regid",
        gid,
        "--clear-groups",
        node.bin.to_str().unwrap(),
        "--config",
        node.config.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    run("setpriv", &all)
}

/// Lets every user through `path` and its parents up to the lab's folder, so other users
/// can read the config and reach the socket.
fn open_up(path: &Path, top: &Path) {
    for p in path.ancestors() {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        if p == top {
            break;
        }
    }
}

#[test]
fn a_user_outside_the_control_group_may_read_but_not_change_and_a_get_goes_only_where_its_caller_may_write(
) {
    if !root_or_skip("a_user_outside_the_control_group_may_read_but_not_change_and_a_get_goes_only_where_its_caller_may_write") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let files = host.share("s");
    std::fs::write(files.join("f.txt"), b"shared").unwrap();
    let config = std::fs::read_to_string(&host.config).unwrap();
    std::fs::write(
        &host.config,
        config.replace("[control]\n", "[control]\ngroup = \"nogroup\"\n"),
    )
    .unwrap();
    host.start();
    let socket = host.dir.join("control.sock");
    // The group's members can open it, and the daemon said so with the socket's group.
    assert_eq!(
        std::fs::metadata(&socket).unwrap().gid().to_string(),
        CONTROL_GID
    );
    // Here anyone may open it: what each may do is then the daemon's decision alone.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    open_up(&host.config, lab.dir.path());

    let o = cli_as(&host, OUTSIDER, OUTSIDER, &["status", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let elsewhere = lab.dir.path().join("open");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o777)).unwrap();
    let got = elsewhere.join("f.txt");
    for args in [
        vec!["link"],
        vec!["remove", "someone"],
        vec!["get", "s/f.txt", "/etc/watchalong-test-x"],
        vec!["get", "s/f.txt", got.to_str().unwrap()],
    ] {
        let o = cli_as(&host, OUTSIDER, OUTSIDER, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} ran for an outsider");
        assert!(
            err.contains("changes this node") && err.trim().lines().count() == 1,
            "{args:?}: not one clear refusal: {err}"
        );
    }
    assert!(!Path::new("/etc/watchalong-test-x").exists());
    assert!(!got.exists());
    assert!(
        host.ok(&["links", "--json"]).trim() == "[]",
        "an outsider made a link"
    );

    // A member of the control group may get, but only where it may write itself.
    let private = lab.dir.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dest = private.join("f.txt");
    let o = cli_as(
        &host,
        INSIDER,
        CONTROL_GID,
        &["get", "s/f.txt", dest.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("may not write in"),
        "{err}"
    );
    assert!(!dest.exists(), "the daemon wrote where its caller may not");
    let o = cli_as(
        &host,
        INSIDER,
        CONTROL_GID,
        &["get", "s/f.txt", got.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(DEADLINE, || std::fs::read(&got)
        .is_ok_and(|b| b == b"shared")));
}

/// A control socket that answers like a daemon whose `get` is done and whose file waits
/// at `handoff` (what a daemon gone wrong could say), and hands over `hello` when asked
/// for the file's bytes. It speaks raw HTTP and JSON on purpose: it stands for the wire,
/// not for the typed client.
fn fake_daemon(socket: &Path, handoff: &Path) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    let handoff = handoff.to_path_buf();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Read, Write};
        // One get: the start, then polls until the CLI has its answer.
        for conn in listener.incoming().take(8) {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut first = String::new();
                if reader.read_line(&mut first).unwrap_or(0) == 0 {
                    break;
                }
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                if first.starts_with("GET /v1/transfers/abcdef0123456789/file") {
                    let piece: &[u8] = if first.contains("offset=0 ") {
                        b"hello"
                    } else {
                        b""
                    };
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
                        piece.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(piece);
                    let _ = conn.write_all(&head);
                    continue;
                }
                let reply = if first.starts_with("POST /v1/get") {
                    serde_json::json!({"id": "abcdef0123456789", "source": "x", "size": 5})
                } else if first.starts_with("DELETE ") {
                    serde_json::json!({})
                } else {
                    let view = watchalong::control::TransferView {
                        id: "abcdef0123456789".into(),
                        target: "s/f.txt".into(),
                        dest: "/nowhere".into(),
                        handoff: Some(handoff.clone()),
                        source: "x".into(),
                        size: 5,
                        done: 5,
                        corrupt_chunks: 0,
                        route: "local".into(),
                        state: watchalong::control::TransferState::Done,
                        error: None,
                        counters: Default::default(),
                    };
                    serde_json::to_value(view).unwrap()
                };
                let text = reply.to_string();
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    )
                    .as_bytes(),
                );
            }
        }
    })
}

#[test]
fn a_forged_handoff_path_is_never_opened_and_the_file_it_names_is_left_alone() {
    if !root_or_skip("a_forged_handoff_path_is_never_opened_and_the_file_it_names_is_left_alone") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("watchalong-test-")
        .tempdir()
        .unwrap();
    let state = dir.path().join("state");
    let downloads = state.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let victim = dir.path().join("victim.conf");
    std::fs::write(&victim, b"secret settings").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&victim, Some(4242), Some(4242)).unwrap();
    let config = dir.path().join("watchalong.toml");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // A link in the downloads folder to the victim, and the victim itself named directly.
    let planted = downloads.join("abcdef0123456789");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    for (i, handoff) in [planted.clone(), victim.clone()].into_iter().enumerate() {
        let socket = dir.path().join(format!("fake-{i}.sock"));
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"cli\"\nstate_dir = \"{}\"\n\n[control]\nsocket = \"{}\"\n",
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        let _fake = fake_daemon(&socket, &handoff);
        let dest = out.join(format!("got-{i}"));
        let o = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["get", "s/f.txt", dest.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (4242, 4242, 0o600),
            "the victim changed hands through {}",
            handoff.display()
        );
        // What arrived is the bytes handed over, in a file of this user's own.
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(&dest).unwrap().uid(), 0);
        assert!(planted.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret settings");
    }
}
