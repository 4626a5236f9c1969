//! Group formation at scale (issue 19): 64 nodes (or `WATCHALONG_SCALE_NODES`) join one
//! host one after another, each in its own namespace on one LAN, every join succeeds, and
//! in the end every node lists every other. Root needed (network namespaces).
//!
//! At 64 nodes this takes about a minute here: the daemons start one by one, each join
//! is one handshake and one request, and the member lists spread by gossip. A smaller or
//! bigger group: `WATCHALONG_SCALE_NODES=100 cargo test --test scale`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

/// The group's size unless `WATCHALONG_SCALE_NODES` names another.
const DEFAULT_NODES: usize = 64;
/// How long the last node may take to list every other once all have joined: generous,
/// as gossip repairs what a push missed in rounds of seconds, and CI machines are slow.
const CONVERGE: Duration = Duration::from_secs(180);

fn size_from_env() -> usize {
    match std::env::var("WATCHALONG_SCALE_NODES") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) if (2..=250).contains(&n) => n,
            _ => panic!(
                "WATCHALONG_SCALE_NODES is {v:?}: set it to a whole number of nodes from 2 to \
                 250 (the lab's /24 holds no more), or unset it for {DEFAULT_NODES}"
            ),
        },
        _ => DEFAULT_NODES,
    }
}

#[test]
fn every_node_of_a_large_group_joins_and_lists_every_other() {
    if !root_or_skip("every_node_of_a_large_group_joins_and_lists_every_other") {
        return;
    }
    let size = size_from_env();
    let started = Instant::now();
    let mut lab = Lab::new();
    let mut nodes: Vec<Node> = (0..size).map(|i| lab.node(&format!("n{i}"))).collect();
    for n in nodes.iter_mut() {
        n.start();
    }
    let (host, joiners) = nodes.split_first().expect("at least two nodes");
    // One after another, each with a fresh link, as users would: every one must succeed.
    for (i, n) in joiners.iter().enumerate() {
        let link = host.link(&[]);
        let o = n.cli(&["join", &link]);
        assert!(
            o.status.success(),
            "join number {} of {} ({}) failed: {}\n--- host log ---\n{}\n--- {} log ---\n{}",
            i + 1,
            joiners.len(),
            n.name,
            String::from_utf8_lossy(&o.stderr),
            host.log(),
            n.name,
            n.log()
        );
    }
    let joined = started.elapsed();
    for n in &nodes {
        let others: BTreeSet<String> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.clone())
            .collect();
        let mut seen = BTreeSet::new();
        let ok = wait_until(CONVERGE, || {
            seen = n.peers().peers.into_iter().map(|p| p.name).collect();
            seen == others
        });
        let missing: Vec<&String> = others.difference(&seen).collect();
        let extra: Vec<&String> = seen.difference(&others).collect();
        assert!(
            ok,
            "{} never listed every other node of {size}: missing {missing:?}, unexpected \
             {extra:?}\n{}",
            n.name,
            n.log()
        );
    }
    eprintln!(
        "{size} nodes: every join succeeded in {:.1} s from the start, every node listed \
         every other after {:.1} s",
        joined.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
