//! `watchalong mount` for tests and benchmarks: the mount process of a node, run in the
//! node's network namespace and this process's mount namespace, removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{run, wait_until, Node};

const DEADLINE: Duration = Duration::from_secs(60);

/// A `watchalong mount` running for node `n`, in `n`'s network namespace (where the
/// daemon's loopback stream endpoint is) but in this process's mount namespace (so the
/// test sees the mount). Dropped, it kills the process, lazily unmounts what is left,
/// and removes the folder, even when the test failed.
pub struct Mount {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub _tmp: tempfile::TempDir,
}

impl Mount {
    pub fn start(n: &Node, target: &str) -> Mount {
        let tmp = tempfile::Builder::new()
            .prefix("wat-mount-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).expect("mount point");
        let log = n
            .dir
            .join(format!("mount-{}.log", target.replace('/', "_")));
        let mut m = Mount {
            child: None,
            dir,
            log,
            _tmp: tmp,
        };
        m.spawn(n, target);
        m
    }

    /// Runs `watchalong mount target` on this folder and waits until it is mounted.
    pub fn spawn(&mut self, n: &Node, target: &str) {
        let out = std::fs::File::create(&self.log).expect("mount log");
        self.child = Some(mount_command(n, target, &self.dir, out));
        assert!(
            wait_until(DEADLINE, || self.mounted()
                && std::fs::read_dir(&self.dir).is_ok()),
            "the share was never mounted:\n{}",
            self.log()
        );
    }

    /// Kills the mount process as a crash would, leaving its mount behind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the kernel's mount table holds our folder.
    pub fn mounted(&self) -> bool {
        let table = std::fs::read_to_string("/proc/self/mounts").expect("mount table");
        watchalong::cli::mount::parse_mounts(&table)
            .iter()
            .any(|m| m.dir == self.dir)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as a service manager stops it; waits for the process to exit.
    pub fn term(&mut self) {
        let mut c = self.child.take().expect("mount running");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let exited = wait_until(Duration::from_secs(30), || {
            c.try_wait().expect("wait").is_some()
        });
        assert!(exited, "mount did not exit on SIGTERM:\n{}", self.log());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run("umount", &["-l", &self.dir.display().to_string()]);
        if std::thread::panicking() {
            eprintln!("--- mount log ---\n{}", self.log());
        }
    }
}

/// `watchalong mount target dir` for `n`, its output to `out`.
pub fn mount_command(n: &Node, target: &str, dir: &Path, out: std::fs::File) -> Child {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", n.ns.name))
        .arg(&n.bin)
        .arg("--config")
        .arg(&n.config)
        .args(["mount", target])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("mount log"))
        .stderr(out)
        .spawn()
        .expect("spawn watchalong mount")
}
