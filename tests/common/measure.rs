//! Measures the benchmarks share: a timed `get` through the control socket with the page
//! cache dropped first, and iperf3 between two nodes, the peer figure a `get` is read
//! against.

use std::time::{Duration, Instant};

use super::*;
use watchalong::control::{Client, GetRequest, TransferState, TransferView};

/// Empties the kernel's page cache, so that a file written by the setup is read from
/// the disk by the `get` that follows, not from memory.
pub fn drop_caches() {
    must("sync", &[]);
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (root)");
}

/// (time to first byte, total time, the transfer's final view) of one `get`, through
/// the control socket, with the page cache dropped first.
pub fn timed_get(
    rt: &tokio::runtime::Runtime,
    n: &Node,
    target: &str,
) -> (Duration, Duration, TransferView) {
    drop_caches();
    let socket = n.dir.join("control.sock");
    let dest = n.dir.join(format!(
        "got-{}-{}",
        target.replace('/', "_"),
        rand_suffix()
    ));
    rt.block_on(async {
        let client = Client::new(&socket);
        let start = Instant::now();
        let r = client
            .start_get(&GetRequest {
                target: target.into(),
                dest: dest.clone(),
                from: None,
            })
            .await
            .unwrap();
        let mut first = None;
        loop {
            let v = client.transfer(&r.id).await.unwrap();
            if first.is_none() && v.done > 0 {
                first = Some(start.elapsed());
            }
            if v.state != TransferState::Running {
                assert_eq!(v.state, TransferState::Done, "{target}: {:?}", v.error);
                let _ = std::fs::remove_file(&dest);
                return (first.unwrap_or_default(), start.elapsed(), v);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn mbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

/// The middle of `d` (the upper middle of an even count).
pub fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

/// `d` in milliseconds, comma-separated, for a table's "runs" column.
pub fn ms(d: &[Duration]) -> String {
    let v: Vec<String> = d.iter().map(|d| d.as_millis().to_string()).collect();
    v.join(", ")
}

/// iperf3 from `server` to `client` (`-R`: the server sends, as the file's holder does)
/// at `addr` (one of the server's addresses), Mbit/s. The client starts once the server
/// listens; a run that measured nothing is tried again with a fresh server, and three
/// that measured nothing stop the benchmark.
pub fn iperf(server: &Node, client: &Node, addr: &str) -> f64 {
    for _ in 0..3 {
        let mut srv = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.ns.name,
                "iperf3",
                "-s",
                "-1",
                "-B",
                addr,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)");
        let listening = wait_until(Duration::from_secs(10), || {
            let o = server.ns.exec(&["ss", "-Hltn", "sport", "= :5201"]);
            !String::from_utf8_lossy(&o.stdout).trim().is_empty()
        });
        let o = client
            .ns
            .exec(&["iperf3", "-c", addr, "-t", "10", "-R", "-J"]);
        let _ = srv.kill();
        let _ = srv.wait();
        let mbit = serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64())
            .unwrap_or(0.0)
            / 1e6;
        if listening && mbit > 0.0 {
            return mbit;
        }
        eprintln!(
            "iperf3 {} -> {addr} measured nothing: {}",
            client.name,
            String::from_utf8_lossy(&o.stdout)
        );
    }
    panic!(
        "iperf3 {} -> {addr} measured nothing three times: no baseline for this row",
        client.name
    );
}
