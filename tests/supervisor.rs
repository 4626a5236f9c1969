//! The daemon's supervisor: a task that dies while the daemon runs must not leave a
//! half-alive node that exits 0 (systemd's `Restart=on-failure` would never restart it).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A daemon started by the test itself (`Node::start` waits for a control socket that
/// this one may close at once), killed if the test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_task_that_panics_while_the_daemon_runs_ends_the_daemon_non_zero_with_the_task_named() {
    if !root_or_skip(
        "a_task_that_panics_while_the_daemon_runs_ends_the_daemon_non_zero_with_the_task_named",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut n = lab.node("sup");
    let log_path = n.dir.join("supervised.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut daemon = Daemon(
        Command::new("ip")
            .args(["netns", "exec", &n.ns.name])
            .arg(&n.bin)
            .arg("--config")
            .arg(&n.config)
            .arg("daemon")
            .env("WATCHALONG_TEST_PANIC_TASK", "gossip")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon"),
    );
    let mut status = None;
    let ended = wait_until(DEADLINE, || {
        status = daemon.0.try_wait().expect("wait");
        status.is_some()
    });
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(ended, "the daemon kept running with a dead task:\n{text}");
    let status = status.expect("exit status");
    assert!(
        !status.success(),
        "a dead task ended the daemon with {status}:\n{text}"
    );
    assert!(
        text.contains("is up"),
        "the daemon never came up, so this proves nothing about a task dying while it runs:\n{text}"
    );
    assert!(
        text.contains("the gossip task panicked"),
        "the log does not name the task and how it ended:\n{text}"
    );
    assert!(
        text.contains("stopped"),
        "the other tasks were not stopped in order:\n{text}"
    );

    // Without the hook the same node runs, and a plain SIGTERM still ends it with 0.
    n.start();
    let clean = n.term();
    assert!(clean.success(), "SIGTERM ended the daemon with {clean}");
}
