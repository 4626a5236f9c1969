//! The tunnel's kernel offloads and their fallbacks: traffic flows with `[tunnel] offload =
//! "off"`, and when the kernel refuses TUN offloads or a GSO send, and `status` says which
//! offloads are off in each case; a single packet the kernel refuses leaves them on.

mod common;

use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A host and a joiner in `lab`, the joiner joined; `host_env` is the host daemon's
/// environment and `host_tunnel` extra lines for its `[tunnel]` table.
fn pair(lab: &mut Lab, host_env: &[(&str, &str)], host_tunnel: &str) -> (Node, Node) {
    pair_with(lab, host_env, host_tunnel, &[])
}

/// [`pair`], with `joiner_env` as the joiner daemon's environment.
fn pair_with(
    lab: &mut Lab,
    host_env: &[(&str, &str)],
    host_tunnel: &str,
    joiner_env: &[(&str, &str)],
) -> (Node, Node) {
    let mut host = lab.node("host");
    let mut joiner = lab.node("joiner");
    let text = std::fs::read_to_string(&host.config).expect("host config");
    let text = text.replacen("[tunnel]\n", &format!("[tunnel]\n{host_tunnel}"), 1);
    std::fs::write(&host.config, text).expect("host config");
    host.start_with_env(host_env);
    joiner.start_with_env(joiner_env);
    let link = host.link(&[]);
    let out = joiner.ok(&["join", &link]);
    assert!(out.contains("joined host's group"), "{out}");
    (host, joiner)
}

/// Pings both ways, then moves 8 MiB each way and checks it arrived intact.
fn traffic_flows_both_ways(host: &Node, joiner: &Node) {
    let host_addr = vpn_address(&host.status());
    let joiner_addr = vpn_address(&joiner.status());
    assert!(
        wait_until(DEADLINE, || joiner.ping(&host_addr)),
        "joiner cannot ping the host:\n{}",
        host.log()
    );
    assert!(
        wait_until(DEADLINE, || host.ping(&joiner_addr)),
        "host cannot ping the joiner"
    );
    let (sent, received) = tcp_transfer(host, joiner, &joiner_addr, 8 << 20);
    assert_eq!(sent, received, "host to joiner arrived damaged");
    let (sent, received) = tcp_transfer(joiner, host, &host_addr, 8 << 20);
    assert_eq!(sent, received, "joiner to host arrived damaged");
}

#[test]
fn with_offload_off_traffic_flows_and_status_says_every_offload_is_off() {
    if !root_or_skip("with_offload_off_traffic_flows_and_status_says_every_offload_is_off") {
        return;
    }
    let mut lab = Lab::new();
    let (host, joiner) = pair(&mut lab, &[], "offload = \"off\"\n");
    traffic_flows_both_ways(&host, &joiner);

    let off = host.status().node.offloads;
    assert!(
        !off.tun_tso && !off.tun_gro && !off.udp_gso && !off.udp_gro,
        "offload = \"off\" left some on: {off:?}"
    );
    let text = host.ok(&["status"]);
    assert!(
        text.contains("TUN TSO off, TUN GRO off, UDP GSO off, UDP GRO off"),
        "{text}"
    );
    // The joiner kept the default, and this kernel takes TUN offloads.
    let on = joiner.status().node.offloads;
    assert!(
        on.tun_tso && on.tun_gro,
        "auto left TUN offloads off: {on:?}"
    );
}

#[test]
fn when_the_kernel_refuses_tun_offloads_and_gso_sends_traffic_still_flows_and_status_names_them_off(
) {
    if !root_or_skip(
        "when_the_kernel_refuses_tun_offloads_and_gso_sends_traffic_still_flows_and_status_names_them_off",
    ) {
        return;
    }
    let mut lab = Lab::new();
    // The test-only switch of debug builds: the host takes TUNSETOFFLOAD and every GSO
    // send as refused by the kernel.
    let (host, joiner) = pair(
        &mut lab,
        &[("WATCHALONG_TEST_REFUSE_OFFLOAD", "tun,gso")],
        "",
    );
    let before = host.status().node.offloads;
    assert!(
        !before.tun_tso && !before.tun_gro,
        "TUN offloads on though refused: {before:?}"
    );
    traffic_flows_both_ways(&host, &joiner);

    let after = host.status().node.offloads;
    assert!(
        !after.udp_gso,
        "GSO still on after bulk sends that must have tried it: {after:?}"
    );
    assert!(after.udp_gro, "a refused GSO turned GRO off too: {after:?}");
    let text = host.ok(&["status"]);
    assert!(
        text.contains("TUN TSO off") && text.contains("UDP GSO off"),
        "{text}"
    );
    let log = host.log();
    assert_eq!(
        log.matches("refused TUN offloads").count(),
        1,
        "the TUN fallback is not logged exactly once:\n{log}"
    );
    assert_eq!(
        log.matches("refused a UDP segmentation (GSO) send").count(),
        1,
        "the GSO fallback is not logged exactly once:\n{log}"
    );
}

#[test]
fn when_the_kernel_refuses_a_coalesced_tun_write_the_packets_still_arrive_whole_and_status_says_gro_off(
) {
    if !root_or_skip(
        "when_the_kernel_refuses_a_coalesced_tun_write_the_packets_still_arrive_whole_and_status_says_gro_off",
    ) {
        return;
    }
    let mut lab = Lab::new();
    // The joiner's kernel is taken as refusing merged TUN writes: the first refused frame
    // and every later one are cut back into the packets they were made of.
    let (host, joiner) = pair_with(
        &mut lab,
        &[],
        "",
        &[("WATCHALONG_TEST_REFUSE_OFFLOAD", "tun-gro")],
    );
    assert!(
        joiner.status().node.offloads.tun_gro,
        "GRO off before any write"
    );
    traffic_flows_both_ways(&host, &joiner);
    let after = joiner.status().node.offloads;
    assert!(
        after.tun_tso && !after.tun_gro,
        "a refused merged write left {after:?}"
    );
    let log = joiner.log();
    assert_eq!(
        log.matches("refused a coalesced TUN write").count(),
        1,
        "the GRO fallback is not logged exactly once:\n{log}"
    );
}

#[test]
fn when_the_kernel_refuses_a_single_packet_tun_write_coalescing_stays_on_and_merged_writes_go_on() {
    if !root_or_skip(
        "when_the_kernel_refuses_a_single_packet_tun_write_coalescing_stays_on_and_merged_writes_go_on",
    ) {
        return;
    }
    let mut lab = Lab::new();
    // The joiner's kernel is taken as refusing every unmerged ICMP packet written to TUN
    // (EINVAL, as for a packet it finds malformed); merged frames it takes.
    let (host, joiner) = pair_with(
        &mut lab,
        &[],
        "",
        &[("WATCHALONG_TEST_REFUSE_OFFLOAD", "tun-icmp")],
    );
    let joiner_addr = vpn_address(&joiner.status());
    let (sent, received) = tcp_transfer(&host, &joiner, &joiner_addr, 8 << 20);
    assert_eq!(sent, received, "host to joiner arrived damaged");
    // Each echo request reaches the joiner's daemon, whose TUN write is refused.
    let answered = (0..3).filter(|_| host.ping(&joiner_addr)).count();
    let after = joiner.status().node.offloads;
    assert!(
        after.tun_tso && after.tun_gro,
        "a refused single packet turned coalescing off: {after:?}"
    );
    assert_eq!(
        answered, 0,
        "pings got through: the test switch refused nothing"
    );
    let (sent, received) = tcp_transfer(&host, &joiner, &joiner_addr, 8 << 20);
    assert_eq!(
        sent, received,
        "host to joiner arrived damaged after the refusals"
    );
    let log = joiner.log();
    assert!(
        !log.contains("refused a coalesced TUN write"),
        "the GRO fallback was logged:\n{log}"
    );
    assert!(joiner.status().node.offloads.tun_gro);
}
