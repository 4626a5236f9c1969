//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics` answered in Prometheus'
//! text format through the `prometheus-client` crate. It owns no state: each scrape reads
//! the node's own snapshots (the tunnel's status, the engine's atomic counters, each
//! read-write share's status, the rooms' views, `/proc/self`) and encodes them, so there
//! is no second copy of anything to keep in step. It must not change the node, hold a
//! lock across encoding, or take in more than a few small requests at once.
//!
//! The numbers show the group's shape (who, how busy, from where): the endpoint is off
//! unless configured, and a non-loopback address is warned about at start.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::daemon::node::Node;
use crate::net::server::{self, Limits};

/// A scraper or two, and a person with curl: a handful of connections, short-lived.
const LIMITS: Limits = Limits {
    connections: 4,
    per_source: 4,
    header_timeout: Duration::from_secs(5),
    lifetime: Some(Duration::from_secs(30)),
    busy_from_start: true,
};

/// What one scrape reads: everything is gathered when the registry encodes.
struct Scrape {
    node: Arc<Node>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

/// One family: its descriptor, then a sample per label set.
fn family<M: EncodeMetric, L: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut fam = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in samples {
        m.encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One family of one sample without labels.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: M,
) -> fmt::Result {
    let kind = m.metric_type();
    m.encode(enc.encode_descriptor(name, help, None, kind)?)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let node = &self.node;
        let peers = node.tunnel.status();
        let by_peer = |f: fn(&crate::net::tunnel::PeerStatus) -> u64| {
            peers
                .iter()
                .map(move |p| ([("peer", p.name.clone())], ConstCounter::new(f(p))))
        };
        family(
            &mut enc,
            "watchalong_peer_rx_bytes",
            "Bytes received from the peer inside the tunnel (as status shows).",
            MetricType::Counter,
            by_peer(|p| p.rx_bytes),
        )?;
        family(
            &mut enc,
            "watchalong_peer_tx_bytes",
            "Bytes sent to the peer inside the tunnel (as status shows).",
            MetricType::Counter,
            by_peer(|p| p.tx_bytes),
        )?;
        family(
            &mut enc,
            "watchalong_peer_handshake_age_seconds",
            "Seconds since the last completed handshake with the peer (absent: never).",
            MetricType::Gauge,
            peers.iter().filter_map(|p| {
                p.last_handshake_secs_ago
                    .map(|a| ([("peer", p.name.clone())], ConstGauge::new(a as i64)))
            }),
        )?;
        family(
            &mut enc,
            "watchalong_peer_path_info",
            "How packets reach the peer now: direct, via-host or down (value 1).",
            MetricType::Gauge,
            peers.iter().map(|p| {
                (
                    [
                        ("peer", p.name.clone()),
                        ("path", p.path.as_str().to_string()),
                    ],
                    ConstGauge::new(1i64),
                )
            }),
        )?;

        let c = node.engine.route_counters();
        family(
            &mut enc,
            "watchalong_chunks_served",
            "Chunks served to other members, by route: tunnel (node server) or lan (relay).",
            MetricType::Counter,
            [("tunnel", c.served_tunnel), ("lan", c.served_lan)]
                .map(|(r, v)| ([("route", r)], ConstCounter::new(v))),
        )?;
        family(
            &mut enc,
            "watchalong_chunks_fetched",
            "Chunks this node fetched, by route: tunnel, lan (a relay), or local (already on disk, kept).",
            MetricType::Counter,
            [
                ("tunnel", c.fetched_tunnel),
                ("lan", c.fetched_lan),
                ("local", c.fetched_local),
            ]
            .map(|(r, v)| ([("route", r)], ConstCounter::new(v))),
        )?;

        let shares: Vec<_> = node.syncs.iter().map(|s| s.status()).collect();
        let by_share = |f: fn(&crate::sync::folder::ShareStatus) -> u64| {
            shares
                .iter()
                .map(move |s| ([("share", s.name.clone())], ConstGauge::new(f(s) as i64)))
        };
        family(
            &mut enc,
            "watchalong_sync_backlog_files",
            "Files of a read-write share still to pull from other members.",
            MetricType::Gauge,
            by_share(|s| s.pulling as u64),
        )?;
        family(
            &mut enc,
            "watchalong_sync_backlog_bytes",
            "Bytes of a read-write share still to pull from other members.",
            MetricType::Gauge,
            by_share(|s| s.bytes_left),
        )?;
        family(
            &mut enc,
            "watchalong_sync_conflicts",
            "Conflict copies (.sync-conflict-) in a read-write share.",
            MetricType::Gauge,
            by_share(|s| s.conflicts as u64),
        )?;

        let rooms = node.watch.views();
        let watchers = rooms.iter().flat_map(|r| r.watchers.iter());
        let drift = watchers
            .clone()
            .map(|w| w.drift_ms.unsigned_abs())
            .max()
            .unwrap_or(0);
        let buffering = watchers.clone().filter(|w| w.starved).count();
        single(
            &mut enc,
            "watchalong_rooms",
            "Watch-along rooms this node knows of.",
            ConstGauge::new(rooms.len() as i64),
        )?;
        single(
            &mut enc,
            "watchalong_room_drift_max_seconds",
            "The largest distance of any watcher from its room's position (0 with no rooms).",
            ConstGauge::new(drift as f64 / 1000.0),
        )?;
        let (sent, received) = node.watch.messages();
        family(
            &mut enc,
            "watchalong_room_messages",
            "Room messages sent to and received from other members, by direction.",
            MetricType::Counter,
            [("sent", sent), ("received", received)]
                .map(|(d, v)| ([("direction", d)], ConstCounter::new(v))),
        )?;
        single(
            &mut enc,
            "watchalong_room_watchers_buffering",
            "Watchers whose player waits for data, over all rooms.",
            ConstGauge::new(buffering as i64),
        )?;

        let proc = process();
        single(
            &mut enc,
            "watchalong_process_resident_memory_bytes",
            "The daemon's resident memory (VmRSS).",
            ConstGauge::new(proc.rss_bytes as i64),
        )?;
        single(
            &mut enc,
            "watchalong_process_open_fds",
            "File descriptors the daemon holds open.",
            ConstGauge::new(proc.open_fds as i64),
        )?;
        Ok(())
    }
}

/// The daemon's own resources, from `/proc/self`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub rss_bytes: u64,
    pub open_fds: u64,
}

fn process() -> Process {
    let rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| vm_rss(&s))
        .unwrap_or(0);
    // The directory's own handle, open while it is read, is one of them: not counted.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0);
    Process {
        rss_bytes,
        open_fds,
    }
}

/// `VmRSS:    1234 kB` in `/proc/self/status`, in bytes.
pub fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// The text of one scrape.
pub fn render(node: &Arc<Node>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { node: node.clone() }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Serves `/metrics` on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, node: Arc<Node>, cancel: CancellationToken) {
    let handle = move |req: Request<hyper::body::Incoming>, _, _| {
        let node = node.clone();
        async move { answer(&req, &node) }
    };
    server::serve(listener, cancel, LIMITS, |_, _| true, handle, || {}, || {}).await;
}

fn answer(req: &Request<hyper::body::Incoming>, node: &Arc<Node>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        r
    };
    // A web page in a browser on this machine (or the management network) could name
    // its own domain and point it at us (DNS rebinding): only a request that names the
    // endpoint by an IP address or `localhost` is answered.
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !literal_host(host) {
        return reply(
            StatusCode::FORBIDDEN,
            "scrape by IP address (or localhost), not by a name\n".into(),
            "text/plain",
        );
    }
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "try /metrics\n".into(), "text/plain");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, String::new(), "text/plain");
    }
    match render(node) {
        Ok(text) => reply(
            StatusCode::OK,
            text,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            String::new(),
            "text/plain",
        ),
    }
}

/// Whether a `Host` header names an IP address or `localhost`, with or without a port.
fn literal_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) if rest.is_empty() || rest.starts_with(':') => {
                return addr.parse::<std::net::Ipv6Addr>().is_ok()
                    && rest
                        .strip_prefix(':')
                        .is_none_or(|p| p.parse::<u16>().is_ok());
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.parse::<std::net::Ipv4Addr>().is_ok() || name.eq_ignore_ascii_case("localhost")
}

/// Says where the endpoint listens, and warns when that is beyond this machine.
pub fn announce(listener: &TcpListener) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    log::info!("metrics at http://{addr}/metrics");
    if !addr.ip().is_loopback() {
        log::warn!("[metrics] listen = \"{addr}\" is not a loopback address: whoever reaches it learns who is in the group and how busy each member is (firewall it, or listen on 127.0.0.1)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_host_named_by_an_ip_address_or_localhost_is_answered() {
        for ok in [
            "127.0.0.1:9471",
            "10.0.0.1:9471",
            "[::1]:9471",
            "[fd00::1]",
            "localhost:9471",
            "127.0.0.1",
        ] {
            assert!(literal_host(ok), "{ok} refused");
        }
        for bad in [
            "evil.example:9471",
            "127.0.0.1.evil.example:9471",
            "[::1]x:9471",
            "",
            "localhost.:9471",
            "1.2.3.4:port",
            "[evil]:9471",
        ] {
            assert!(!literal_host(bad), "{bad} accepted");
        }
    }

    #[test]
    fn vm_rss_is_read_in_bytes_and_anything_else_is_none() {
        let s = "Name:\twatchalong\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads:\t4\n";
        assert_eq!(vm_rss(s), Some(1234 * 1024));
        assert_eq!(vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_resident_memory_and_open_files() {
        let p = process();
        assert!(p.rss_bytes > 0, "{p:?}");
        // stdin, stdout and stderr at least.
        assert!(p.open_fds >= 3, "{p:?}");
    }
}
