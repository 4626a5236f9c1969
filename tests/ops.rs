//! Operating a node with the tools people already have: `wg show` on the daemon's
//! interface, and the Prometheus metrics endpoint.
//!
//!     cargo test --test ops

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// An interface name of its own for each node: `/var/run/wireguard` is shared by every
/// namespace on the machine, so two daemons called `wa0` would meet there.
fn own_interface(n: &Node, i: usize) -> String {
    let iface = format!("wo{}x{i}", std::process::id() % 100_000);
    let text = std::fs::read_to_string(&n.config).expect("config");
    let text = text.replacen(
        "[tunnel]\n",
        &format!("[tunnel]\ninterface = \"{iface}\"\n"),
        1,
    );
    std::fs::write(&n.config, text).expect("config");
    iface
}

/// The `wg` sockets of a test's daemons, removed when the test ends however it ends: a
/// daemon killed with SIGKILL (as a lab node is on drop) cannot remove its own.
struct WgSockets(Vec<std::path::PathBuf>);

impl Drop for WgSockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn wg_socket(iface: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/run/wireguard").join(format!("{iface}.sock"))
}

/// One peer line of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq)]
struct DumpPeer {
    preshared: String,
    endpoint: String,
    allowed_ips: String,
    handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// `wg show IFACE dump` in `n`'s namespace: the interface line and the peers by key.
fn dump(n: &Node, iface: &str) -> (String, BTreeMap<String, DumpPeer>) {
    let o = n.ns.exec(&["wg", "show", iface, "dump"]);
    assert!(
        o.status.success(),
        "wg show {iface} dump failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        n.log()
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = text.lines();
    let head = lines.next().expect("interface line").to_string();
    let mut peers = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.len(), 8, "a peer line of 8 fields: {l:?}");
        peers.insert(
            f[0].to_string(),
            DumpPeer {
                preshared: f[1].into(),
                endpoint: f[2].into(),
                allowed_ips: f[3].into(),
                handshake: f[4].parse().expect("handshake"),
                rx: f[5].parse().expect("rx"),
                tx: f[6].parse().expect("tx"),
                keepalive: f[7].into(),
            },
        );
    }
    (head, peers)
}

#[test]
fn wg_show_dump_lists_every_peer_as_status_does_and_wg_set_is_refused() {
    if !root_or_skip("wg_show_dump_lists_every_peer_as_status_does_and_wg_set_is_refused") {
        return;
    }
    // Declared first, so dropped after the daemons.
    let mut sockets = WgSockets(Vec::new());
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    let mut b = lab.node("b");
    let a_if = own_interface(&a, 1);
    for iface in [own_interface(&host, 0), a_if.clone(), own_interface(&b, 2)] {
        sockets.0.push(wg_socket(&iface));
    }
    host.start();
    a.start();
    b.start();
    join(&host, &a);
    join(&host, &b);
    wait_for_direct_mesh(&[&host, &a, &b], DEADLINE);
    // Traffic both ways with each peer, so every counter and handshake has a value.
    for addr in [vpn_address(&host.status()), vpn_address(&b.status())] {
        assert!(
            wait_until(DEADLINE, || a.ping(&addr)),
            "a cannot ping {addr}"
        );
    }

    let sock = wg_socket(&a_if);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("a's wg socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is root's only");

    // Counters move between reads: the dump is read between two statuses, so each of its
    // counters lies between theirs.
    let before = a.status();
    let (head, peers) = dump(&a, &a_if);
    let after = a.status();
    let port = after.node.listen_port;
    // No private key leaves the daemon: wg shows the interface's keys as "(none)".
    assert_eq!(head, format!("(none)\t(none)\t{port}\toff"));
    assert_eq!(peers.len(), after.peers.len(), "{peers:?}\n{after:?}");
    assert_eq!(after.peers.len(), 2, "a sees the host and b: {after:?}");
    for p in &after.peers {
        let d = peers.get(&p.public_key).unwrap_or_else(|| {
            panic!(
                "{} ({}) is not in the dump: {peers:?}",
                p.name, p.public_key
            )
        });
        let earlier = before
            .peers
            .iter()
            .find(|q| q.public_key == p.public_key)
            .expect("the peer was there before");
        let endpoint = p.endpoint.map_or("(none)".to_string(), |e| e.to_string());
        assert_eq!(d.endpoint, endpoint, "{}", p.name);
        let six = p.address6.expect("an inner IPv6 address");
        assert_eq!(
            d.allowed_ips,
            format!("{}/32,{six}/128", p.address),
            "{}",
            p.name
        );
        assert_eq!(d.preshared, "(none)");
        assert_eq!(d.keepalive, "25");
        let hs = p.last_handshake.expect("a handshake with each peer");
        assert!(
            d.handshake.abs_diff(hs) <= 2,
            "{}: dump says {} and status {hs}",
            p.name,
            d.handshake
        );
        assert!(
            (earlier.rx_bytes..=p.rx_bytes).contains(&d.rx) && d.rx > 0,
            "{}: rx {} not within status's {}..={}",
            p.name,
            d.rx,
            earlier.rx_bytes,
            p.rx_bytes
        );
        assert!(
            (earlier.tx_bytes..=p.tx_bytes).contains(&d.tx) && d.tx > 0,
            "{}: tx {} not within status's {}..={}",
            p.name,
            d.tx,
            earlier.tx_bytes,
            p.tx_bytes
        );
    }
    // The readable form works too and names each peer.
    let o = a.ns.exec(&["wg", "show", &a_if]);
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for p in &after.peers {
        assert!(
            shown.contains(&format!("peer: {}", p.public_key)),
            "{shown}"
        );
    }

    // `wg set` is refused with a reason, and changes nothing.
    let target = &after.peers[0].public_key;
    let o = a.ns.exec(&[
        "wg",
        "set",
        &a_if,
        "peer",
        target,
        "allowed-ips",
        "10.99.0.0/16",
    ]);
    assert!(!o.status.success(), "wg set succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(
        wait_until(DEADLINE, || a.log().contains("managed by watchalong")),
        "no log line says why:\n{}",
        a.log()
    );
    let (_, again) = dump(&a, &a_if);
    let ips = |m: &BTreeMap<String, DumpPeer>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.allowed_ips.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ips(&again), ips(&peers), "wg set changed the peers");

    // Broken or hostile clients: a request outside the protocol and an endless line are
    // answered with an error; one that sends nothing holds no one up and is dropped at
    // the deadline.
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let mut idle = UnixStream::connect(&sock).expect("connect");
    let mut c = UnixStream::connect(&sock).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(b"get=1\nprivate_key=00\n\n").expect("write");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("an answer");
    assert_eq!(answer, "errno=-22\n\n");
    // The daemon stops reading at the bound and closes with the rest unread, which a Unix
    // socket may report to us as a reset instead of the answer: either way it is cut.
    let mut c = UnixStream::connect(&sock).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(&[b'a'; 4096]).expect("write");
    let mut answer = String::new();
    match c.read_to_string(&mut answer) {
        Ok(_) => assert_eq!(answer, "errno=-22\n\n"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let (_, still) = dump(&a, &a_if);
    assert_eq!(
        still.len(),
        peers.len(),
        "wg is answered while a client idles"
    );
    idle.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut byte = [0u8; 1];
    assert_eq!(idle.read(&mut byte).expect("closed, not timed out"), 0);

    // The socket goes with the daemon.
    assert!(a.term().success());
    assert!(!sock.exists(), "{} outlived the daemon", sock.display());
}

/// One sample: its labels and value.
#[derive(Debug, Clone)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A family: its type and samples.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

/// Prometheus' text format (0.0.4), read strictly: every line is a HELP, a TYPE or a
/// sample; each family has one HELP then one TYPE before its samples; a sample's name
/// is its family's; label values are quoted with `\\`, `\"` and `\n` escapes; values are
/// numbers. Anything else fails the test, naming the line.
fn parse_prometheus(text: &str) -> BTreeMap<String, Family> {
    fn name_ok(n: &str) -> bool {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped: Option<String> = None;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            assert!(name_ok(name), "bad HELP: {line:?}");
            assert!(!out.contains_key(name), "family {name} described twice");
            helped = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad TYPE: {line:?}"));
            assert_eq!(
                helped.as_deref(),
                Some(name),
                "TYPE without its HELP: {line:?}"
            );
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type: {line:?}"
            );
            out.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_string());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line {line:?}"
        );
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("a sample without a value: {line:?}"),
        };
        assert_eq!(
            current.as_deref(),
            Some(name),
            "a sample outside its family: {line:?}"
        );
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                // key
                let start = chars.peek().map(|(i, _)| *i).expect("label key");
                let mut key_end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                    chars.next();
                }
                let key = &body[start..key_end];
                assert!(name_ok(key), "bad label name in {line:?}");
                assert_eq!(chars.next().map(|x| x.1), Some('='), "{line:?}");
                assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|x| x.1) {
                        Some('\\') => match chars.next().map(|x| x.1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                assert!(labels.insert(key.to_string(), value).is_none(), "{line:?}");
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = i;
                        break;
                    }
                    other => panic!("bad label list ({other:?}) in {line:?}"),
                }
            }
            rest = &body[end + 1..];
        }
        let mut fields = rest
            .strip_prefix(' ')
            .expect("a space before the value")
            .split(' ');
        let value: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing fields in {line:?}");
        out.get_mut(name)
            .expect("family")
            .samples
            .push(Sample { labels, value });
    }
    out
}

#[test]
fn the_strict_prometheus_reader_refuses_what_is_not_the_format() {
    let good = "# HELP a_total x.\n# TYPE a_total counter\na_total{route=\"l\\\"an\"} 3\n";
    let f = parse_prometheus(good);
    assert_eq!(f["a_total"].samples[0].labels["route"], "l\"an");
    assert_eq!(f["a_total"].samples[0].value, 3.0);
    for bad in [
        "a_total 3\n",                               // no TYPE
        "# HELP a x.\n# TYPE a gauge\nb 1\n",        // outside its family
        "# HELP a x.\n# TYPE a gauge\na{k=\"v} 1\n", // unterminated
        "# HELP a x.\n# TYPE a gauge\na one\n",      // not a number
        "# HELP a x.\n# TYPE a gauge\na{k=v} 1\n",   // unquoted
        "# HELP a x.\n# TYPE a kind\n",              // unknown type
    ] {
        let r = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

/// The families the endpoint serves, as the scrape names them.
const FAMILIES: &[&str] = &[
    "watchalong_peer_rx_bytes_total",
    "watchalong_peer_tx_bytes_total",
    "watchalong_peer_handshake_age_seconds",
    "watchalong_peer_path_info",
    "watchalong_chunks_served_total",
    "watchalong_chunks_fetched_total",
    "watchalong_sync_backlog_files",
    "watchalong_sync_backlog_bytes",
    "watchalong_sync_conflicts",
    "watchalong_rooms",
    "watchalong_room_drift_max_seconds",
    "watchalong_room_messages_total",
    "watchalong_room_watchers_buffering",
    "watchalong_process_resident_memory_bytes",
    "watchalong_process_open_fds",
];

fn scrape(n: &Node, url: &str) -> BTreeMap<String, Family> {
    let o =
        n.ns.exec(&["curl", "-sS", "--fail", "--max-time", "10", url]);
    assert!(
        o.status.success(),
        "scrape of {url} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        n.log()
    );
    parse_prometheus(&String::from_utf8_lossy(&o.stdout))
}

/// The one sample of `family` whose label `key` is `value`.
fn sample(f: &BTreeMap<String, Family>, family: &str, key: &str, value: &str) -> f64 {
    f[family]
        .samples
        .iter()
        .find(|s| s.labels.get(key).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no {family}{{{key}=\"{value}\"}}: {:?}", f[family]))
        .value
}

fn only(f: &BTreeMap<String, Family>, family: &str) -> f64 {
    let s = &f[family].samples;
    assert_eq!(s.len(), 1, "{family}: {s:?}");
    s[0].value
}

#[test]
fn a_scrape_parses_as_prometheus_text_and_bytes_and_chunks_grow_with_a_transfer() {
    if !root_or_skip("a_scrape_parses_as_prometheus_text_and_bytes_and_chunks_grow_with_a_transfer")
    {
        return;
    }
    let mut sockets = WgSockets(Vec::new());
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut a = lab.node("a");
    for iface in [own_interface(&host, 3), own_interface(&a, 4)] {
        sockets.0.push(wg_socket(&iface));
    }
    let films = host.share("films");
    let size = 4 * 1024 * 1024;
    let hash = write_random(&films.join("f.bin"), size, "metrics");
    // A read-write share, so the sync families have a sample.
    a.share_rw("notes");
    a.enable_metrics();
    host.start();
    a.start();
    join(&host, &a);
    let mut url = None;
    assert!(
        wait_until(DEADLINE, || {
            url = a.metrics_url();
            url.is_some()
        }),
        "the log does not say where the metrics are:\n{}",
        a.log()
    );
    let url = url.expect("url");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"),
        "{url}"
    );

    let before = scrape(&a, &url);
    for f in FAMILIES {
        assert!(
            before.contains_key(*f),
            "no family {f}: {:?}",
            before.keys()
        );
    }
    assert!(
        wait_until(DEADLINE, || a.cli(&["ls", "films"]).status.success()),
        "a never saw the host's share:\n{}",
        a.log()
    );
    let dest = a.dir.join("got-f.bin");
    a.ok(&["get", "films/f.bin", dest.to_str().expect("path")]);
    assert_eq!(blake3::hash(&std::fs::read(&dest).expect("got")), hash);
    let after = scrape(&a, &url);
    for f in FAMILIES {
        assert!(
            after.contains_key(*f),
            "no family {f} after: {:?}",
            after.keys()
        );
    }

    let rx = |f| sample(f, "watchalong_peer_rx_bytes_total", "peer", "host");
    assert!(
        rx(&after) - rx(&before) >= size as f64,
        "4 MiB came from the host but rx grew by {}",
        rx(&after) - rx(&before)
    );
    let tx = |f| sample(f, "watchalong_peer_tx_bytes_total", "peer", "host");
    assert!(
        tx(&after) > tx(&before),
        "requests went out, tx did not grow"
    );
    let fetched = |f| sample(f, "watchalong_chunks_fetched_total", "route", "tunnel");
    assert!(
        fetched(&after) > fetched(&before),
        "no chunk counted as fetched"
    );
    assert_eq!(
        sample(&after, "watchalong_chunks_fetched_total", "route", "lan"),
        0.0
    );
    let age = sample(
        &after,
        "watchalong_peer_handshake_age_seconds",
        "peer",
        "host",
    );
    assert!((0.0..180.0).contains(&age), "handshake {age}s ago");
    let path = after["watchalong_peer_path_info"]
        .samples
        .iter()
        .find(|s| s.labels["peer"] == "host")
        .expect("host's path");
    assert_eq!((path.labels["path"].as_str(), path.value), ("direct", 1.0));
    assert_eq!(
        sample(&after, "watchalong_sync_backlog_files", "share", "notes"),
        0.0
    );
    assert_eq!(
        sample(&after, "watchalong_sync_conflicts", "share", "notes"),
        0.0
    );
    assert_eq!(only(&after, "watchalong_rooms"), 0.0);
    assert!(only(&after, "watchalong_process_resident_memory_bytes") > 1_000_000.0);
    assert!(only(&after, "watchalong_process_open_fds") > 3.0);
    assert_eq!(after["watchalong_chunks_served_total"].kind, "counter");

    // The host served those chunks inside the tunnel; it has no endpoint, so its
    // counters are read where the status API shows them.
    assert!(host.status().node.chunks.served_chunks > 0);

    // Only /metrics is answered.
    let base = url.trim_end_matches("/metrics");
    let o = a.ns.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "404");
}

#[test]
fn the_sample_dashboard_graphs_only_families_the_endpoint_serves_and_all_of_them() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana-watchalong.json"
    ))
    .expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in json["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("watchalong_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    for name in &used {
        assert!(
            FAMILIES.contains(&name.as_str()),
            "the dashboard uses {name}, which is not served"
        );
    }
    for f in FAMILIES {
        assert!(used.contains(*f), "the dashboard does not show {f}");
    }
}
