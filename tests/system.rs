//! The Debian package under a real systemd: `scripts/package.sh` builds it, it is
//! installed into a debootstrapped Debian folder, and that folder boots with systemd as
//! PID 1 (`systemd-nspawn -b`) inside a lab namespace, with the TUN device and
//! CAP_NET_ADMIN passed in. The host here runs no systemd and has no system bus, hence
//! `--keep-unit --register=no`; commands reach the container with `nsenter` into its
//! PID 1's namespaces. Two such containers on the lab's LAN join and move a file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::player::has;
use common::*;

/// Booting and the watchdog's 30 s are slow; apt and debootstrap slower still.
const DEADLINE: Duration = Duration::from_secs(120);
/// The Debian release the containers run, and what they need beyond minbase: systemd
/// as init, dbus for systemctl, passwd for users, util-linux for runuser.
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,passwd,util-linux";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The debootstrapped base, made once per checkout under `target/` and copied per
/// container (a half-made one is never used: the marker comes last).
fn base() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nspawn");
    let base = dir.join(format!("{SUITE}-base"));
    let marker = dir.join(format!("{SUITE}-base.complete"));
    if marker.exists() {
        return base;
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&dir).expect("nspawn folder");
    let mirror = std::env::var("WATCHALONG_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let o = run(
        "debootstrap",
        &[
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            SUITE,
            base.to_str().expect("path"),
            &mirror,
        ],
    );
    assert!(o.status.success(), "debootstrap failed: {}", text(&o));
    std::fs::write(&marker, b"").expect("marker");
    base
}

/// The package, built once per run from this checkout's dev binary (the one the tests
/// run).
fn package() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_package).clone()
}

fn build_package() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("scripts/package.sh"))
        .env("PROFILE", "dev")
        .output()
        .expect("run scripts/package.sh");
    assert!(o.status.success(), "package.sh failed: {}", text(&o));
    let last = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .expect("package path")
        .to_string();
    root.join(last)
}

fn which_wg() -> std::io::Result<PathBuf> {
    let o = run("sh", &["-c", "command -v wg"]);
    let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if p.is_empty() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    Ok(PathBuf::from(p))
}

/// A booted container: its folder, the nspawn process and its PID 1.
struct Container {
    name: String,
    root: PathBuf,
    nspawn: Option<Child>,
    init: u32,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Container {
    /// Copies the base, installs `deb` into it and boots it in `ns`.
    fn boot(tag: &str, base: &Path, deb: &Path, ns: &Netns) -> Container {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("wat-nspawn-{tag}-"))
            .tempdir_in(base.parent().expect("base has a parent"))
            .expect("temp dir");
        let root = tmp.path().join("root");
        must(
            "cp",
            &[
                "-a",
                base.to_str().expect("path"),
                root.to_str().expect("path"),
            ],
        );
        std::fs::copy(deb, root.join("tmp/watchalong.deb")).expect("copy the package");
        // The host's `wg` (wireguard-tools, linked to libc only), to read the daemon's
        // socket from inside.
        if let Ok(wg) = which_wg() {
            let _ = std::fs::copy(wg, root.join("usr/local/bin/wg"));
        }
        let o = run(
            "chroot",
            &[
                root.to_str().expect("path"),
                "dpkg",
                "-i",
                "/tmp/watchalong.deb",
            ],
        );
        assert!(o.status.success(), "dpkg -i failed: {}", text(&o));
        let name = format!("wa-{tag}-{}", std::process::id());
        let log = tmp.path().join("boot.log");
        let out = std::fs::File::create(&log).expect("boot log");
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--keep-unit", "--register=no", "--boot"])
            .arg(format!("--directory={}", root.display()))
            .arg(format!("--machine={name}"))
            .arg(format!(
                "--network-namespace-path=/var/run/netns/{}",
                ns.name
            ))
            .args([
                "--bind=/dev/net/tun",
                "--capability=CAP_NET_ADMIN",
                "--console=passive",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut c = Container {
            name,
            root,
            init: 0,
            nspawn: Some(nspawn),
            log,
            _tmp: tmp,
        };
        let pid = c.nspawn.as_ref().expect("nspawn").id();
        let found = wait_until(DEADLINE, || {
            let o = run("pgrep", &["-P", &pid.to_string()]);
            match String::from_utf8_lossy(&o.stdout).lines().next() {
                Some(p) => {
                    c.init = p.trim().parse().unwrap_or(0);
                    c.init != 0
                }
                None => false,
            }
        });
        assert!(found, "the container never started:\n{}", c.boot_log());
        let booted = wait_until(DEADLINE, || {
            let o = c.sh("systemctl is-system-running");
            let state = String::from_utf8_lossy(&o.stdout);
            matches!(state.trim(), "running" | "degraded")
        });
        assert!(
            booted,
            "{} never finished booting: {}\n{}",
            c.name,
            text(&c.sh("systemctl --failed --no-pager")),
            c.boot_log()
        );
        c
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `script` with /bin/sh inside the container, in all its namespaces.
    fn sh(&self, script: &str) -> Output {
        run(
            "nsenter",
            &["-t", &self.init.to_string(), "-a", "/bin/sh", "-c", script],
        )
    }

    /// The same, which must succeed; returns its stdout.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(
            o.status.success(),
            "{}: `{script}` failed: {}\n{}",
            self.name,
            text(&o),
            text(&self.sh("journalctl -u watchalong --no-pager | tail -40"))
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// One property of the unit, as `systemctl show` has it.
    fn prop(&self, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value watchalong"))
            .trim()
            .to_string()
    }

    fn write(&self, path: &str, content: &str) {
        let p = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("folder");
        std::fs::write(p, content).expect("write into the container");
    }

    /// Waits until the unit is active with a main PID other than `old`; returns it.
    fn restarted(&self, old: &str, why: &str) -> String {
        let mut pid = String::new();
        let ok = wait_until(DEADLINE, || {
            pid = self.prop("MainPID");
            self.prop("ActiveState") == "active" && pid != old && pid != "0"
        });
        assert!(
            ok,
            "{}: not restarted after {why}: {}",
            self.name,
            text(&self.sh("systemctl status watchalong --no-pager; journalctl -u watchalong --no-pager | tail -30"))
        );
        pid
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} boot log ---\n{}", self.name, self.boot_log());
        }
        if self.init != 0 {
            let _ = self.sh("systemctl poweroff --no-block");
        }
        if let Some(mut c) = self.nspawn.take() {
            let exited = wait_until(Duration::from_secs(30), || {
                c.try_wait().ok().flatten().is_some()
            });
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The config of a container: its name, and `extra` (shares, control group).
fn config(name: &str, extra: &str) -> String {
    format!("[node]\nname = \"{name}\"\n\n{extra}")
}

#[test]
fn the_package_boots_under_systemd_restarts_when_hung_or_killed_and_two_containers_join_and_share()
{
    let test = "the_package_boots_under_systemd_restarts_when_hung_or_killed_and_two_containers_join_and_share";
    if !root_or_skip(test) || !has("debootstrap") || !has("systemd-nspawn") {
        return;
    }
    let deb = package();
    let base = base();
    let mut lab = Lab::new();
    let (na, nb) = (lab.node("sysa"), lab.node("sysb"));
    let a = Container::boot("a", &base, &deb, &na.ns);

    // Installed, enabled nothing: the owner edits the config first.
    assert_eq!(
        a.sh("systemctl is-enabled watchalong").stdout,
        b"disabled\n"
    );
    assert_eq!(a.prop("ActiveState"), "inactive");
    let analysis = a.sh("systemd-analyze security watchalong --no-pager");
    let report = text(&analysis);
    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&artefacts).expect("artefacts");
    std::fs::write(artefacts.join("systemd-analyze-security.txt"), &report).expect("artefact");
    println!("{report}");
    assert!(report.contains("Overall exposure level"), "{report}");

    // The shipped unit as it is: Type=notify makes `start` wait for READY=1.
    a.write(
        "/etc/watchalong.toml",
        &config(
            "sysa",
            "[[share]]\nname = \"films\"\npath = \"/srv/films\"\nmode = \"read-only\"\n",
        ),
    );
    a.ok("mkdir -p /srv/films && head -c 3000000 /dev/urandom > /srv/films/f.bin");
    a.ok("systemctl start watchalong");
    assert_eq!(a.prop("Type"), "notify");
    assert_eq!(a.prop("ActiveState"), "active");
    assert!(
        na.ns.has_link("wa0"),
        "the daemon is active but its TUN device is missing"
    );

    // The journal holds its lines with their priorities.
    let journal = a.ok("journalctl -u watchalong -o json --no-pager");
    let lines: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let up = lines.iter().find(|l| {
        l["MESSAGE"].as_str().is_some_and(|m| m.contains("is up"))
            && l["_SYSTEMD_UNIT"] == "watchalong.service"
    });
    let up = up.unwrap_or_else(|| panic!("no `is up` line in the journal:\n{journal}"));
    // systemd-journal-logger writes log's info as the journal's notice (5), debug as
    // info (6): what `journalctl -p notice` shows is what the daemon logs by default.
    assert_eq!(up["PRIORITY"], "5", "an info line is priority 5: {up}");
    assert!(
        lines
            .iter()
            .filter(|l| l["_SYSTEMD_UNIT"] == "watchalong.service" && l["_PID"] == up["_PID"])
            .all(|l| l["PRIORITY"].as_str().is_some_and(|p| !p.is_empty())),
        "a daemon line without a priority"
    );

    // Hung (SIGSTOP): the watchdog kills it and Restart= brings it back.
    let first = a.prop("MainPID");
    a.ok(&format!("kill -STOP {first}"));
    let second = a.restarted(&first, "SIGSTOP (the watchdog)");
    let log = a.ok("journalctl -u watchalong --no-pager");
    assert!(log.contains("Watchdog timeout"), "{log}");
    // Killed outright: Restart= again.
    a.ok(&format!("kill -9 {second}"));
    let third = a.restarted(&second, "kill -9");
    assert!(a.prop("NRestarts").parse::<u32>().unwrap_or(0) >= 2);

    // Stopped: the TUN device goes with it, and its `wg` socket, but not the folder
    // another WireGuard's socket shares, which stays root's.
    assert!(a.sh("test -S /run/wireguard/wa0.sock").status.success());
    a.ok("touch /run/wireguard/other.sock");
    a.ok("systemctl stop watchalong");
    assert!(a.sh("test -e /run/wireguard/other.sock").status.success());
    assert_eq!(
        a.ok("stat -c %U:%G /run/wireguard /run/wireguard/other.sock"),
        "root:root\nroot:root\n"
    );
    assert!(
        wait_until(DEADLINE, || !a
            .sh("test -e /run/wireguard/wa0.sock")
            .status
            .success()),
        "the wg socket is left after stop"
    );
    assert!(
        wait_until(DEADLINE, || !na.ns.has_link("wa0")),
        "wa0 is left after `systemctl stop` (main PID was {third})"
    );

    // A read-write share, opened as the README says (ReadWritePaths=, User=), and a
    // control group so a user may `get` into their home.
    let b = Container::boot("b", &base, &deb, &nb.ns);
    let drop_in =
        "[Service]\nReadWritePaths=/srv/notes\nDynamicUser=no\nUser=films\nGroup=watchers\n";
    let notes = "[control]\ngroup = \"watchers\"\n\n\
        [[share]]\nname = \"notes\"\npath = \"/srv/notes\"\nmode = \"read-write\"\n";
    let films = format!(
        "{notes}\n[[share]]\nname = \"films\"\npath = \"/srv/films\"\nmode = \"read-only\"\n"
    );
    for (c, name, shares) in [(&a, "sysa", films.as_str()), (&b, "sysb", notes)] {
        c.ok(
            "groupadd --system watchers && useradd --system --gid watchers films \
              && useradd --create-home --groups watchers alice \
              && mkdir -p /srv/films /srv/notes && chown films:watchers /srv/notes",
        );
        c.write(
            "/etc/systemd/system/watchalong.service.d/override.conf",
            drop_in,
        );
        c.write("/etc/watchalong.toml", &config(name, shares));
        c.ok("systemctl daemon-reload && systemctl start watchalong");
    }
    let link = a.ok("watchalong link");
    let link = link.lines().next().expect("a link").trim().to_string();
    b.ok(&format!("watchalong join '{link}'"));
    // `wg show` reads the socket systemd passed in: sysa is b's one peer.
    let status: serde_json::Value =
        serde_json::from_str(&a.ok("watchalong status --json")).expect("status json");
    let key = status["node"]["public_key"]
        .as_str()
        .expect("a's public key")
        .to_string();
    let listed = wait_until(DEADLINE, || {
        b.sh("wg show wa0 dump")
            .stdout
            .windows(key.len())
            .any(|w| w == key.as_bytes())
    });
    assert!(
        listed,
        "wg show wa0 dump does not list sysa: {}",
        text(&b.sh("wg show wa0 dump; ls -l /run/wireguard"))
    );

    // A file written at one end syncs to the other.
    a.ok("echo 'from a' > /srv/notes/hello.txt && chown films:watchers /srv/notes/hello.txt");
    let synced = wait_until(DEADLINE, || {
        b.sh("cat /srv/notes/hello.txt").stdout == b"from a\n"
    });
    assert!(
        synced,
        "the read-write share never synced: {}",
        text(&b.sh("watchalong status; journalctl -u watchalong --no-pager | tail -30"))
    );

    // A user of the control group gets a file into their home, which the sandbox hides
    // from the daemon (ProtectHome=yes): the CLI writes it with the user's rights.
    let ready = wait_until(DEADLINE, || b.sh("watchalong ls films").status.success());
    assert!(ready, "{}", text(&b.sh("watchalong ls films")));
    b.ok("runuser -u alice -- watchalong get films/f.bin /home/alice/f.bin");
    let sums = |c: &Container, p: &str| c.ok(&format!("sha256sum < {p}"));
    assert_eq!(sums(&b, "/home/alice/f.bin"), sums(&a, "/srv/films/f.bin"));
    assert_eq!(b.ok("stat -c %U /home/alice/f.bin").trim(), "alice");
    drop(b);

    // Purged: what the package and its daemon made goes, the shares stay.
    a.ok("systemctl stop watchalong && dpkg --purge watchalong");
    for gone in [
        "/usr/bin/watchalong",
        "/etc/watchalong.toml",
        "/usr/lib/systemd/system/watchalong.service",
        "/var/lib/watchalong",
        "/var/lib/private/watchalong",
    ] {
        assert!(
            a.sh(&format!("test -e {gone} || test -L {gone}"))
                .status
                .code()
                == Some(1),
            "{gone} is left after purge"
        );
    }
    a.ok("test -s /srv/films/f.bin && test -s /srv/notes/hello.txt");
    drop(a);
}

#[test]
fn the_package_holds_the_binary_unit_conffile_man_pages_and_completions_and_lintian_finds_no_error()
{
    let test = "the_package_holds_the_binary_unit_conffile_man_pages_and_completions_and_lintian_finds_no_error";
    if !root_or_skip(test) || !has("lintian") {
        return;
    }
    let deb = package();
    let deb = deb.to_str().expect("path");
    let listing = text(&run("dpkg-deb", &["-c", deb]));
    for want in [
        "./usr/bin/watchalong",
        "./usr/lib/systemd/system/watchalong.service",
        "./usr/lib/systemd/system/watchalong.socket",
        "./etc/watchalong.toml",
        "./usr/share/man/man1/watchalong.1.gz",
        "./usr/share/man/man1/watchalong-get.1.gz",
        "./usr/share/bash-completion/completions/watchalong",
        "./usr/share/zsh/vendor-completions/_watchalong",
        "./usr/share/fish/vendor_completions.d/watchalong.fish",
    ] {
        assert!(
            listing.contains(want),
            "{want} is not in the package:\n{listing}"
        );
    }
    let control = text(&run("dpkg-deb", &["-I", deb]));
    assert!(control.contains("conffiles"), "{control}");
    let conffiles = text(&run("dpkg-deb", &["--info", deb, "conffiles"]));
    assert_eq!(conffiles.trim(), "/etc/watchalong.toml");
    // The unit the package ships runs the packaged binary.
    let o = run("dpkg-deb", &["--fsys-tarfile", deb]);
    assert!(o.status.success());
    let unit = run(
        "sh",
        &[
            "-c",
            &format!("dpkg-deb --fsys-tarfile {deb} | tar -xO ./usr/lib/systemd/system/watchalong.service"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&unit.stdout).contains("ExecStart=/usr/bin/watchalong "),
        "{}",
        text(&unit)
    );
    let lint = run("lintian", &["--allow-root", "--no-tag-display-limit", deb]);
    let report = text(&lint);
    println!("{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("E: ")),
        "lintian reports errors:\n{report}"
    );
}

#[test]
fn the_openwrt_init_script_parses_and_the_package_installs_what_it_names() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/openwrt");
    let init = dir.join("files/watchalong.init");
    let o = run("sh", &["-n", init.to_str().expect("path")]);
    assert!(o.status.success(), "sh -n: {}", text(&o));
    let script = std::fs::read_to_string(&init).expect("init script");
    assert!(
        script.starts_with("#!/bin/sh /etc/rc.common\n"),
        "not an rc.common script"
    );
    for want in [
        "USE_PROCD=1",
        "start_service()",
        "procd_set_param command \"$PROG\" --config \"$CONF\" daemon",
    ] {
        assert!(script.contains(want), "the init script lacks {want}");
    }
    let makefile = std::fs::read_to_string(dir.join("Makefile")).expect("Makefile");
    for want in [
        "./files/watchalong.init $(1)/etc/init.d/watchalong",
        "/etc/watchalong.toml",
        "--no-default-features",
        "+kmod-tun",
    ] {
        assert!(makefile.contains(want), "the OpenWrt Makefile lacks {want}");
    }
    // Recipe lines of a Makefile start with a tab, or make stops there.
    assert!(makefile
        .lines()
        .filter(|l| l.trim_start().starts_with("$(INSTALL_"))
        .all(|l| l.starts_with('\t')));
}
