//! Folder sync benchmark (issue 5, first slice). Root needed.
//!
//!     sudo cargo bench --bench sync
//!
//! Propagation time of a new 1 KiB file and of a 100-byte append (p50, p90, max over 50
//! runs) from s1a to a nearby member (s1b, same site) and to a distant one, measured from
//! the write returning to the file's content matching at the receiver (polled every ms);
//! daemon RSS idle and after the runs. Syncthing as a reference in the same run is still
//! to do.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn rss_kib(n: &Node) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", n.pid().unwrap_or(0)))
        .unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How long after now each of `paths` takes to hold `want` (polled every ms).
fn arrivals(paths: &[&Path], want: &[u8], deadline: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut got: Vec<Option<Duration>> = vec![None; paths.len()];
    while got.iter().any(|g| g.is_none()) {
        assert!(start.elapsed() < deadline, "a member never got the change");
        for (i, p) in paths.iter().enumerate() {
            if got[i].is_none() && std::fs::read(p).map(|b| b == want).unwrap_or(false) {
                got[i] = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    got.into_iter().flatten().collect()
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_millis();
    format!(
        "{} ms | {} ms | {} ms",
        p(0.5),
        p(0.9),
        v.last().unwrap().as_millis()
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sync benchmark: run it with `cargo bench --bench sync`");
        return;
    }
    if !root_or_skip("bench sync") {
        return;
    }
    let mut lab = Lab::internet();
    let mut host = lab.node("host");
    let mut distant = lab.node("distant");
    let mut r1 = lab.router("r1", [192, 168, 1]);
    let mut s1a = lab.node_behind(&mut r1, "s1a");
    let mut s1b = lab.node_behind(&mut r1, "s1b");
    let roots: Vec<_> = [&host, &distant, &s1a, &s1b]
        .iter()
        .map(|n| n.share_rw("docs"))
        .collect();
    for n in [&mut host, &mut distant, &mut s1a, &mut s1b] {
        n.start();
    }
    for n in [&distant, &s1a, &s1b] {
        let link = host.link(&[]);
        n.ok(&["join", &link]);
    }
    wait_for_direct_mesh(&[&host, &distant, &s1a, &s1b], Duration::from_secs(60));
    // Let every member learn the others' shares.
    std::thread::sleep(Duration::from_secs(3));
    let idle: Vec<u64> = [&host, &distant, &s1a, &s1b]
        .iter()
        .map(|n| rss_kib(n))
        .collect();
    let (src, nearby, far) = (&roots[2], &roots[3], &roots[1]);
    let mut create_near = Vec::new();
    let mut create_far = Vec::new();
    let mut append_near = Vec::new();
    let mut append_far = Vec::new();
    for i in 0..50 {
        let name = format!("f{i}.txt");
        let data: Vec<u8> = (0..1024u32).map(|j| (i as u32 * 7 + j) as u8).collect();
        std::fs::write(src.join(&name), &data).unwrap();
        let t = arrivals(
            &[&nearby.join(&name), &far.join(&name)],
            &data,
            Duration::from_secs(30),
        );
        create_near.push(t[0]);
        create_far.push(t[1]);
        let mut more = data.clone();
        more.extend_from_slice(&[b'x'; 100]);
        std::fs::write(src.join(&name), &more).unwrap();
        let t = arrivals(
            &[&nearby.join(&name), &far.join(&name)],
            &more,
            Duration::from_secs(30),
        );
        append_near.push(t[0]);
        append_far.push(t[1]);
    }
    let peak: Vec<u64> = [&host, &distant, &s1a, &s1b]
        .iter()
        .map(|n| rss_kib(n))
        .collect();
    println!("| what | to | p50 | p90 | max |");
    println!("|---|---|---|---|---|");
    println!("| new 1 KiB file | nearby | {} |", percentiles(create_near));
    println!("| new 1 KiB file | distant | {} |", percentiles(create_far));
    println!(
        "| 100-byte append | nearby | {} |",
        percentiles(append_near)
    );
    println!(
        "| 100-byte append | distant | {} |",
        percentiles(append_far)
    );
    println!("\nRSS idle (host, distant, s1a, s1b): {idle:?} KiB; after the runs: {peak:?} KiB");
}
