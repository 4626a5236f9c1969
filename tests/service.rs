//! Running under systemd: readiness is announced only once the tunnel answers, and the
//! unit file passes `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use common::*;
use x25519_dalek::{PublicKey, StaticSecret};

#[test]
fn ready_is_sent_only_when_the_tunnel_socket_answers() {
    if !root_or_skip("ready_is_sent_only_when_the_tunnel_socket_answers") {
        return;
    }
    let mut lab = Lab::new();
    let mut node = lab.node("svc");
    node.start();
    let text = node.link(&["--uses", "5"]);
    assert!(node.term().success());
    let invite =
        watchalong::group::link::decode(&text, None, watchalong::base::clock::now_secs()).unwrap();

    let sock_path = node.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the shell's PID.
    let spawn = |log: &str| {
        let log = std::fs::File::create(node.dir.join(log)).unwrap();
        Command::new("sh")
            .arg("-c")
            .arg(r#"export WATCHDOG_PID=$$; exec ip netns exec "$0" "$1" --config "$2" daemon"#)
            .arg(&node.ns.name)
            .arg(BIN)
            .arg(&node.config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "300000")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut buf = [0u8; 4096];

    // While another socket holds the tunnel's port, nothing can answer there: no READY=1,
    // and the daemon stops saying which setting to change.
    let holder = in_netns(&node.ns.name, || {
        std::net::UdpSocket::bind("0.0.0.0:51871").unwrap()
    });
    let mut blocked = spawn("notify-blocked.log");
    let mut got = String::new();
    let end = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        if let Some(status) = blocked.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= end {
            let _ = blocked.kill();
            break None;
        }
    };
    while let Ok(n) = sock.recv(&mut buf) {
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let log = std::fs::read_to_string(node.dir.join("notify-blocked.log")).unwrap();
    assert!(
        !got.contains("READY=1"),
        "READY=1 while the tunnel's port was taken: {got:?}\n{log}"
    );
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the daemon did not stop on a taken port: {exited:?}\n{log}"
    );
    assert!(
        log.contains("cannot bind UDP port 51871") && log.contains("listen_port"),
        "the log does not say what to change: {log}"
    );
    drop(holder);

    let mut daemon = spawn("notify-run.log");
    let end = Instant::now() + Duration::from_secs(30);
    let mut got = String::new();
    while Instant::now() < end && !got.contains("READY=1") {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(
        got.contains("READY=1"),
        "no READY=1 within 30 s, got {got:?}"
    );
    // At the moment of READY the TUN device exists and one handshake gets an answer.
    assert!(
        node.ns.has_link("wa0"),
        "READY=1 before the TUN device was up"
    );
    let secret = *invite.secret;
    let host_key = invite.host_key;
    let answered = in_netns(&node.ns.name, move || {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut t = Tunn::new(
            StaticSecret::from(secret),
            PublicKey::from(host_key),
            None,
            None,
            7,
            None,
        );
        let mut out = vec![0u8; 2048];
        let init = match t.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        udp.send_to(&init, "127.0.0.1:51871").unwrap();
        let mut rx = vec![0u8; 2048];
        let Ok((n, _)) = udp.recv_from(&mut rx) else {
            return false;
        };
        matches!(
            t.decapsulate(None, &rx[..n], &mut out),
            TunnResult::WriteToNetwork(_)
        )
    });
    assert!(
        answered,
        "the UDP socket did not complete a handshake right after READY=1"
    );
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !got.contains("WATCHDOG=1") {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(
        got.contains("WATCHDOG=1"),
        "no watchdog ping with WATCHDOG_USEC set: {got:?}"
    );

    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !got.contains("STOPPING=1") {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(got.contains("STOPPING=1"), "{got:?}");
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    // verify insists that ExecStart's binary exists; point it at the one cargo built,
    // and check everything else in the unit as it is.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/watchalong.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/watchalong "));
    for line in [
        "Type=notify",
        "RestartPreventExitStatus=78",
        "StateDirectory=watchalong",
        "RuntimeDirectory=watchalong",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "SystemCallFilter=@system-service",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watchalong.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/watchalong", BIN)).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is needed (apt-get install systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("watchalong.service"),
        "verify complained: {err}"
    );
}
