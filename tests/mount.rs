//! `watchalong mount`: a share as a read-only folder whose reads fetch the bytes under
//! the reader first, and whose reads fail (EIO, in bounded time) rather than hang when
//! their holder is gone.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::*;
use common::player::*;
use common::*;
use watchalong::control::{LsReply, PlanReply};

const DEADLINE: Duration = Duration::from_secs(60);

/// The mount's bound on a stalled read, as the CLI has it.
const READ_STALL: Duration = watchalong::cli::mount::READ_STALL;

/// Names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list the mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Names `watchalong ls target` shows on `n`, sorted.
fn names_listed(n: &Node, target: &str) -> Vec<String> {
    let l: LsReply = serde_json::from_str(&n.ok(&["ls", target, "--json"])).expect("ls json");
    let mut v: Vec<String> = l.entries.into_iter().map(|e| e.name).collect();
    v.sort();
    v
}

/// Bytes of the stream caches on `n`'s disk (they are sparse: what arrived so far).
fn cached_bytes(n: &Node) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(n.dir.join("state/streams"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_mounted_file_only_another_member_holds_reads_whole_and_tail_first() {
    if !root_or_skip("a_mounted_file_only_another_member_holds_reads_whole_and_tail_first") {
        return;
    }
    if !has("ffmpeg") || !has("ffprobe") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    host.start();
    let mut holder = lab.node("holder");
    let movies = holder.share("movies");
    make_video(&movies.join("film.mp4"), 60, 2000);
    std::fs::create_dir(movies.join("extras")).expect("subfolder");
    std::fs::write(movies.join("extras/notes.txt"), b"notes\n").expect("notes");
    holder.start();
    join(&host, &holder);
    assert!(
        wait_until(DEADLINE, || host.cli(&["ls", "movies"]).status.success()),
        "the host never saw the share"
    );
    // 15 MB at 4 Mbit/s: about 30 s to arrive whole.
    holder.shape(4);
    let m = Mount::start(&host, "movies");

    assert_eq!(names_in(&m.dir), names_listed(&host, "movies"));
    assert_eq!(names_in(&m.dir.join("extras")), vec!["notes.txt"]);

    let original = std::fs::read(movies.join("film.mp4")).expect("original");
    let size = original.len() as u64;
    let mounted = m.dir.join("film.mp4");
    assert_eq!(std::fs::metadata(&mounted).expect("stat").len(), size);
    let f = std::fs::File::open(&mounted).expect("open the mounted file");
    let tail_at = size - 64 * 1024;
    let mut tail = vec![0u8; 64 * 1024];
    f.read_exact_at(&mut tail, tail_at).expect("read the tail");
    assert!(
        tail == original[tail_at as usize..],
        "the tail read differs"
    );
    let here = cached_bytes(&host);
    assert!(
        here < size,
        "the whole file ({size} bytes) was here before the tail read returned ({here})"
    );
    drop(f);

    let probe = run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
            &mounted.display().to_string(),
        ],
    );
    let duration: f64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "ffprobe read no duration: {}\n{}",
                String::from_utf8_lossy(&probe.stderr),
                m.log()
            )
        });
    assert!((duration - 60.0).abs() < 1.0, "duration {duration}");
    let cmp = run(
        "cmp",
        &[
            &movies.join("film.mp4").display().to_string(),
            &mounted.display().to_string(),
        ],
    );
    assert!(
        cmp.status.success(),
        "the mounted file differs: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn a_read_whose_holder_dies_fails_with_eio_in_bounded_time_and_the_mount_lives_on() {
    if !root_or_skip(
        "a_read_whose_holder_dies_fails_with_eio_in_bounded_time_and_the_mount_lives_on",
    ) {
        return;
    }
    const SIZE: u64 = 16 << 20;
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    host.start();
    // Both offer `movies`: the same `other.bin`, but each its own `film.bin`, so no
    // other member can stand in for the one serving the film.
    let mut holders = Vec::new();
    let mut other = Vec::new();
    for name in ["ha", "hb"] {
        let mut n = lab.node(name);
        let movies = n.share("movies");
        write_random(&movies.join("film.bin"), SIZE, name);
        write_random(&movies.join("other.bin"), 2 << 20, "other");
        other = std::fs::read(movies.join("other.bin")).expect("other");
        n.start();
        join(&host, &n);
        holders.push(n);
    }
    assert!(
        wait_until(DEADLINE, || names_listed_ok(&host)),
        "the host never saw the share"
    );
    // 16 MiB at 2 Mbit/s: over a minute to arrive whole.
    for n in &holders {
        n.shape(2);
    }
    let mut m = Mount::start(&host, "movies");
    let plan: PlanReply =
        serde_json::from_str(&host.ok(&["plan", "movies/film.bin", "--json"])).expect("plan");
    let i = holders
        .iter()
        .position(|n| n.name == plan.source)
        .expect("the film's source is a holder");
    let film = std::fs::read(holders[i].dir.join("share-movies/film.bin")).expect("film");

    let f = std::fs::File::open(m.dir.join("film.bin")).expect("open the film");
    let mut head = vec![0u8; 64 * 1024];
    f.read_exact_at(&mut head, 0).expect("read the head");
    assert!(head == film[..head.len()], "the head read differs");

    holders[i].kill9();
    let started = Instant::now();
    let mut end = vec![0u8; 64 * 1024];
    let at = SIZE - end.len() as u64;
    let got = f.read_exact_at(&mut end, at);
    let took = started.elapsed();
    let err = got.expect_err("a read from a dead holder succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took < READ_STALL + Duration::from_secs(10),
        "the read took {took:?} to fail"
    );
    drop(f);

    // The other file comes from the member still up, through the same mount.
    let mut read_back = Vec::new();
    let ok = wait_until(DEADLINE, || match std::fs::read(m.dir.join("other.bin")) {
        Ok(b) => {
            read_back = b;
            true
        }
        Err(_) => false,
    });
    assert!(ok, "the other file never read through the mount");
    assert!(read_back == other, "the other file differs");

    m.term();
    assert!(!m.mounted(), "a mount is left after SIGTERM");
}

fn names_listed_ok(n: &Node) -> bool {
    n.cli(&["ls", "movies"]).status.success()
}

#[test]
fn a_mount_left_by_a_crash_is_cleaned_at_the_next_mount_and_user_errors_say_the_fix() {
    if !root_or_skip(
        "a_mount_left_by_a_crash_is_cleaned_at_the_next_mount_and_user_errors_say_the_fix",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    std::fs::write(movies.join("a.txt"), b"hello\n").expect("file");
    host.start();
    let mut m = Mount::start(&host, "movies");
    assert_eq!(
        std::fs::read(m.dir.join("a.txt")).expect("read"),
        b"hello\n"
    );

    // A second mount onto the live one is refused, saying what to do.
    let o = host.cli(&["mount", "movies", &m.dir.display().to_string()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already mounted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    m.kill9();
    // Once the kernel's cached attributes expire, the dead mount answers ENOTCONN.
    assert!(
        wait_until(DEADLINE, || std::fs::metadata(&m.dir)
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))),
        "the killed mount never answered ENOTCONN"
    );
    m.spawn(&host, "movies");
    assert!(
        m.log().contains("stale mount"),
        "the stale mount was not reported:\n{}",
        m.log()
    );
    assert_eq!(
        std::fs::read(m.dir.join("a.txt")).expect("read"),
        b"hello\n"
    );
    let table = std::fs::read_to_string("/proc/self/mounts").expect("mount table");
    let ours = watchalong::cli::mount::parse_mounts(&table)
        .into_iter()
        .filter(|x| x.dir == m.dir)
        .count();
    assert_eq!(
        ours, 1,
        "the stale mount is still stacked under the new one"
    );
    let listed = host.ok(&["mounts"]);
    assert!(
        listed.contains(&format!("movies on {}", m.dir.display())),
        "`mounts` shows: {listed}"
    );

    let empty = tempfile::tempdir().expect("temp dir");
    let errors = [
        ("nosuch", empty.path().to_path_buf(), "watchalong ls"),
        ("movies", empty.path().join("missing"), "mkdir -p"),
        ("movies", m.dir.join("a.txt"), "not a folder"),
    ];
    for (target, dir, fix) in errors {
        let o = host.cli(&["mount", target, &dir.display().to_string()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(fix),
            "{target} {dir:?}: {err}"
        );
    }
    std::fs::write(empty.path().join("x"), b"").expect("file");
    let o = host.cli(&["mount", "movies", &empty.path().display().to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn a_file_held_open_keeps_reading_the_version_it_opened_after_its_holder_changes_it() {
    if !root_or_skip(
        "a_file_held_open_keeps_reading_the_version_it_opened_after_its_holder_changes_it",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    host.start();
    let mut holder = lab.node("holder");
    let movies = holder.share("movies");
    write_random(&movies.join("v.bin"), 4 << 20, "first");
    holder.start();
    join(&host, &holder);
    assert!(
        wait_until(DEADLINE, || names_listed_ok(&host)),
        "the host never saw the share"
    );
    let m = Mount::start(&host, "movies");
    let first = std::fs::read(movies.join("v.bin")).expect("first version");
    let old = std::fs::File::open(m.dir.join("v.bin")).expect("open the first version");
    let mut head = vec![0u8; 64 * 1024];
    old.read_exact_at(&mut head, 0)
        .expect("read the first version");
    assert!(
        head == first[..head.len()],
        "the first version read differs"
    );
    // Its stream goes on to fetch the rest; the rest of the reads come after the change,
    // from that stream, not from pages the kernel kept.
    assert!(
        wait_until(DEADLINE, || cached_bytes(&host) >= first.len() as u64),
        "the first version never arrived whole"
    );

    // The holder replaces it; a new open, once the listing shows it, reads the new one.
    write_random(&movies.join("v.bin"), 5 << 20, "second");
    let second = std::fs::read(movies.join("v.bin")).expect("second version");
    let size = second.len() as u64;
    assert!(
        wait_until(DEADLINE, || {
            std::fs::metadata(m.dir.join("v.bin")).is_ok_and(|md| md.len() == size)
        }),
        "the mount never showed the new version's size"
    );
    let new = std::fs::File::open(m.dir.join("v.bin")).expect("open the second version");
    let mut got = vec![0u8; second.len()];
    new.read_exact_at(&mut got, 0)
        .expect("read the second version");
    assert!(got == second, "the second version read differs");

    // The file opened first still reads the first version, whole, from its start.
    let mut got = vec![0u8; first.len()];
    old.read_exact_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("the first version no longer reads: {e}\n{}", m.log()));
    assert!(got == first, "the file opened first now reads other bytes");
}

/// `nobody`, whose primary group `nogroup` is the node's control group here, so it may
/// open streams; fusermount3 wants a user with a name.
const MOUNTER: u32 = 65534;
/// A user in no group the node knows.
const STRANGER: u32 = 12345;
const CONTROL_GID: u32 = 65534;

/// `setpriv` arguments that run a program as `uid` with primary group `gid` and no others.
fn as_user(uid: u32, gid: u32) -> Vec<String> {
    [
        "--reuid".to_string(),
        uid.to_string(),
        "--regid".to_string(),
        gid.to_string(),
        "--clear-groups".to_string(),
    ]
    .to_vec()
}

#[test]
fn a_user_other_than_root_mounts_through_fusermount3_and_only_that_user_reads_the_files() {
    if !root_or_skip(
        "a_user_other_than_root_mounts_through_fusermount3_and_only_that_user_reads_the_files",
    ) {
        return;
    }
    if !has("fusermount3") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let movies = host.share("movies");
    std::fs::write(movies.join("a.txt"), b"for the group\n").expect("file");
    let config = std::fs::read_to_string(&host.config).expect("config");
    std::fs::write(
        &host.config,
        config.replace("[control]\n", "[control]\ngroup = \"nogroup\"\n"),
    )
    .expect("config");
    host.start();
    // The user reaches the config and the socket (whose group the daemon set).
    for p in host.config.ancestors() {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if p == lab.dir.path() {
            break;
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("wat-umount-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).expect("mount point");
    std::os::unix::fs::chown(&dir, Some(MOUNTER), Some(CONTROL_GID)).expect("chown");
    let log_path = host.dir.join("mount-user.log");
    let out = std::fs::File::create(&log_path).expect("log");
    let mut m = Mount {
        child: None,
        dir: dir.clone(),
        log: log_path,
        _tmp: tmp,
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", host.ns.name))
        .arg("setpriv")
        .args(as_user(MOUNTER, CONTROL_GID))
        .arg(&host.bin)
        .arg("--config")
        .arg(&host.config)
        .args(["mount", "movies"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    m.child = Some(cmd.spawn().expect("spawn the user's mount"));
    let up = wait_until(DEADLINE, || {
        m.mounted()
            || m.child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    });
    assert!(
        up && m.mounted(),
        "the user's mount never appeared:\n{}",
        m.log()
    );
    let file = dir.join("a.txt").display().to_string();
    let read_as = |uid: u32, gid: u32| {
        let mut args = as_user(uid, gid);
        args.extend(["cat".to_string(), file.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("setpriv", &args)
    };
    let mut mine = read_as(MOUNTER, CONTROL_GID);
    // The first lookup may race the mount's first listing: give it the deadline.
    wait_until(DEADLINE, || {
        mine = read_as(MOUNTER, CONTROL_GID);
        mine.status.success()
    });
    assert_eq!(
        mine.stdout,
        b"for the group\n",
        "{}\n{}",
        String::from_utf8_lossy(&mine.stderr),
        m.log()
    );
    // FUSE lets only the user who mounted read a mount made without allow_other.
    let other = read_as(STRANGER, STRANGER);
    assert!(
        !other.status.success(),
        "another user read the user's mount"
    );
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    // SIGTERM unmounts, through fusermount3 since the user may not call umount2.
    m.term();
    assert!(
        !m.mounted(),
        "the user's mount is left after SIGTERM:\n{}",
        m.log()
    );
    assert!(m.log().contains("unmounted"), "{}", m.log());
}
