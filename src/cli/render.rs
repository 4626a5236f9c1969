//! How the command line shows the daemon's answers: the human tables and lines, and the
//! `--json` forms. Output is read by people and by scripts (and the tests), so it changes
//! only on purpose. Printing only: no calls to the daemon, no decisions.

use std::io::{IsTerminal, Write};

use anyhow::Context;

use crate::control::{
    GossipReply, InviteView, Kept, LinkReply, LsReply, PeersReply, PlanReply, RoomView,
    StatusReply, TransferView,
};
use crate::group::link;

/// The link alone on the first line of stdout, so `| head -1` gets it; a QR code after
/// it when a person is looking.
pub fn print_link(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    if std::io::stdout().is_terminal() {
        let code = qrcode::QrCode::new(text.as_bytes()).context("cannot draw the QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        writeln!(out, "{art}")?;
    }
    out.flush()?;
    Ok(())
}

/// What `link --json` prints: the (maybe sealed) link, the invite, and the passphrase
/// when one was made here. Fields in alphabetical order, as the output always had them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinkOutput {
    pub expires_at: u64,
    pub id: String,
    pub link: String,
    pub passphrase: Option<String>,
    pub sealed: bool,
    pub uses: u32,
}

pub fn print_link_json(
    text: &str,
    reply: &LinkReply,
    sealed: bool,
    generated: Option<&str>,
) -> anyhow::Result<()> {
    let out = LinkOutput {
        expires_at: reply.expires_at,
        id: reply.id.clone(),
        link: text.to_string(),
        passphrase: generated.map(str::to_string),
        sealed,
        uses: reply.uses,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// After the link: the passphrase made here (on stderr, to send another way) and the
/// invite's terms.
pub fn print_link_terms(reply: &LinkReply, generated: Option<&str>) {
    if let Some(p) = generated {
        eprintln!("passphrase: {p} (send it by another way than the link)");
    }
    eprintln!(
        "invite {}: {} use(s), expires {} UTC",
        reply.id,
        reply.uses,
        link::format_utc(reply.expires_at)
    );
}

pub fn print_links(list: &[InviteView], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no invites");
    } else {
        println!(
            "{:<18} {:<8} {:>5} {:<20} REFUSED",
            "ID", "STATE", "USES", "EXPIRES (UTC)"
        );
        for i in list {
            // Refused redemptions of a spent link: someone else holds it.
            let refused = match (i.refused_redemptions, i.last_refused_at) {
                (0, _) => "-".to_string(),
                (n, Some(at)) => format!("{n}, last {} UTC", link::format_utc(at)),
                (n, None) => n.to_string(),
            };
            println!(
                "{:<18} {:<8} {:>2}/{:<2} {:<20} {refused}",
                i.id.to_string(),
                i.state,
                i.uses,
                i.uses_allowed,
                link::format_utc(i.expires_at)
            );
        }
        if list.iter().any(|i| i.refused_redemptions > 0) {
            eprintln!("a spent link was tried again by another node: it may have leaked; `watchalong links --json` shows the last key that tried");
        }
    }
    Ok(())
}

pub fn print_gossip(g: &GossipReply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!(
            "members {} (revoked {}), messages in {} (accepted {}, rejected {}), out {}, forwarded packets {}",
            g.members, g.revoked, g.stats.received, g.stats.accepted, g.stats.rejected, g.stats.sent, g.forwarded_packets
        );
    }
    Ok(())
}

pub fn print_ls(r: &LsReply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if r.holder.is_none() {
        if r.entries.is_empty() {
            println!("no member offers a share yet");
        }
        for e in &r.entries {
            println!("{:<24} {}", e.name, e.holders.join(", "));
        }
    } else {
        for e in &r.entries {
            if e.dir {
                println!("{:>12}  {}/", "-", e.name);
            } else {
                println!("{:>12}  {}", e.size, e.name);
            }
        }
    }
    Ok(())
}

pub fn print_rooms(rooms: &[RoomView], json: bool) -> anyhow::Result<()> {
    let text = json_or_empty(
        rooms,
        json,
        "no rooms: `watchalong watch SHARE/PATH` opens one",
    )?;
    for r in rooms.iter().filter(|_| text) {
        let s = &r.state;
        let what = match (s.playing, s.held) {
            (true, false) => "playing",
            (true, true) => "held (a player is buffering)",
            _ => "paused",
        };
        println!(
            "{}: {what} at {:.1} s, rate {}{}",
            r.file,
            r.position_now,
            s.rate,
            match (r.have_bytes, r.size) {
                (Some(h), Some(n)) => format!(", {h} of {n} bytes here"),
                _ => String::new(),
            }
        );
        for w in &r.watchers {
            println!(
                "  {:<16} at {:>8.1} s  drift {:>5} ms  buffered {:>5.1} s{}{}",
                w.node,
                w.position,
                w.drift_ms,
                w.buffered_s,
                w.rtt_ms
                    .map(|r| format!("  rtt {r} ms"))
                    .unwrap_or_default(),
                if w.starved {
                    "  (waiting for data)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

pub fn print_plan(r: &PlanReply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} ({} bytes) from {} to {}",
            r.summary, r.size, r.source, r.requester
        );
        println!("why: {}", r.route.why);
    }
    Ok(())
}

pub fn print_versions(list: &[Kept], json: bool) -> anyhow::Result<()> {
    let text = json_or_empty(list, json, "no versions kept")?;
    for k in list.iter().filter(|_| text) {
        println!("{}  {}  {} bytes", stamp_of(k.at), k.path, k.size);
    }
    Ok(())
}

pub fn print_transfers(list: &[TransferView], json: bool) -> anyhow::Result<()> {
    let text = json_or_empty(list, json, "no transfers")?;
    for t in list.iter().filter(|_| text) {
        println!(
            "{} {:<7} {:>3}% of {} bytes  {} -> {}  via {}{}",
            t.id,
            t.state,
            (t.done * 100).checked_div(t.size).unwrap_or(100),
            t.size,
            t.target,
            t.dest.display(),
            t.route,
            t.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// One line of a running `get`'s progress, `secs` after it started.
pub fn progress_line(v: &TransferView, secs: f64) -> String {
    let rate = v.done as f64 / secs;
    let eta = if rate > 0.0 {
        (v.size.saturating_sub(v.done)) as f64 / rate
    } else {
        0.0
    };
    let pct = (v.done * 100).checked_div(v.size).unwrap_or(100);
    format!(
        "{:>3}% {}/{} MiB {:.1} MiB/s ETA {:.0}s via {}",
        pct,
        v.done >> 20,
        v.size >> 20,
        rate / 1048576.0,
        eta,
        v.route
    )
}

/// The progress bar a terminal shows, redrawn in place, for `pct` percent done.
pub fn progress_bar(pct: u64, line: &str) {
    let width = 30usize;
    let filled = (pct as usize * width / 100).min(width);
    eprint!(
        "\r[{}{}] {line}\x1b[K",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
}

/// A kept version's time as `versions` prints it and `restore --at` takes it.
pub fn stamp_of(t: u64) -> String {
    crate::sync::kept::stamp(t)
}

/// Prints `list` as JSON when that was asked for, or `empty` when there is nothing to
/// list; true when the caller is to print the list as text.
pub fn json_or_empty<T: serde::Serialize>(
    list: &[T],
    json: bool,
    empty: &str,
) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
    } else if list.is_empty() {
        println!("{empty}");
    }
    Ok(!json && !list.is_empty())
}

/// An inner IPv6 address, or `-` from a daemon older than inner IPv6.
fn addr6(a: Option<std::net::Ipv6Addr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
}

fn ago(secs: Option<u64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) => format!("{}s ago", s),
    }
}

pub fn print_peers(p: &PeersReply) {
    println!(
        "{} {} {} site {}",
        p.name,
        p.address,
        addr6(p.address6),
        p.site.as_deref().unwrap_or("unknown")
    );
    if p.peers.is_empty() {
        println!("no other members yet");
        return;
    }
    println!(
        "\n{:<16} {:<15} {:<25} {:<16} {:<9} {:>8} {:<12}",
        "MEMBER", "ADDRESS", "ADDRESS6", "SITE", "PATH", "RTT", "HANDSHAKE"
    );
    for m in &p.peers {
        let site = match (&m.site, m.nearby) {
            (Some(s), true) => format!("{s} (here)"),
            (Some(s), false) => s.clone(),
            (None, _) => "-".into(),
        };
        println!(
            "{:<16} {:<15} {:<25} {:<16} {:<9} {:>8} {:<12}",
            m.name,
            m.address.to_string(),
            addr6(m.address6),
            site,
            m.path,
            m.rtt_ms
                .map(|r| format!("{r} ms"))
                .unwrap_or_else(|| "-".into()),
            ago(m.last_handshake_secs_ago)
        );
    }
}

pub fn print_status(s: &StatusReply) {
    let n = &s.node;
    println!("node      {} ({})", n.name, n.role);
    println!("address   {} in {}", n.address, n.network);
    if let (Some(a), Some(net)) = (n.address6, &n.network6) {
        println!("address6  {a} in {net}");
    }
    println!("key       {}", n.public_key);
    println!("listen    UDP {} on {}", n.listen_port, n.interface);
    let on = |b: bool| if b { "on" } else { "off" };
    let o = &n.offloads;
    println!(
        "offloads  TUN TSO {}, TUN GRO {}, UDP GSO {}, UDP GRO {}",
        on(o.tun_tso),
        on(o.tun_gro),
        on(o.udp_gso),
        on(o.udp_gro)
    );
    if n.role != "host" {
        println!("host      {}", n.host_name);
    }
    for sh in &s.shares {
        let state = match (sh.root_ok, sh.pulling, &sh.last_error) {
            (false, _, _) => "root or its marker missing (unmounted?): sync held back".to_string(),
            (true, 0, None) => "in sync".to_string(),
            (true, 0, Some(e)) => format!("error: {e}"),
            (true, n, _) => format!("syncing: {n} file(s), {} bytes left", sh.bytes_left),
        };
        println!(
            "share     {}: {} files, {} bytes, {} conflict(s), {state}",
            sh.name, sh.files, sh.bytes, sh.conflicts
        );
        if sh.links_skipped > 0 {
            println!(
                "          {}: {} symbolic link(s) not synced (links are never followed nor carried)",
                sh.name, sh.links_skipped
            );
        }
    }
    if s.peers.is_empty() {
        println!("\nno peers yet: `watchalong link` makes an access link");
        return;
    }
    println!(
        "\n{:<16} {:<15} {:<25} {:<22} {:<12} {:>12} {:>12}",
        "PEER", "ADDRESS", "ADDRESS6", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    for p in &s.peers {
        println!(
            "{:<16} {:<15} {:<25} {:<22} {:<12} {:>12} {:>12}",
            p.name,
            p.address.to_string(),
            addr6(p.address6),
            p.endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            ago(p.last_handshake_secs_ago),
            p.rx_bytes,
            p.tx_bytes
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `link --json` was written with `json!`, whose keys come out sorted; the typed
    /// output must give the same bytes, passphrase or not.
    #[test]
    fn link_json_is_the_same_bytes_as_before_it_was_typed() {
        for passphrase in [None, Some("correct horse battery staple")] {
            let out = LinkOutput {
                expires_at: 1_700_000_000,
                id: "0123456789abcdef".into(),
                link: "watchalong://join/x".into(),
                passphrase: passphrase.map(str::to_string),
                sealed: passphrase.is_some(),
                uses: 2,
            };
            let before = serde_json::json!({"link": out.link, "id": out.id,
                "expires_at": out.expires_at, "uses": out.uses, "sealed": out.sealed,
                "passphrase": passphrase});
            assert_eq!(serde_json::to_string(&out).unwrap(), before.to_string());
        }
    }

    #[test]
    fn a_transfer_line_shows_its_percentage_and_rate() {
        let v = TransferView {
            id: "ab".into(),
            target: "s/f".into(),
            dest: "/d/f".into(),
            handoff: None,
            source: "host".into(),
            size: 8 << 20,
            done: 2 << 20,
            corrupt_chunks: 0,
            route: "direct".into(),
            state: crate::control::TransferState::Running,
            error: None,
            counters: Default::default(),
        };
        assert_eq!(
            progress_line(&v, 2.0),
            " 25% 2/8 MiB 1.0 MiB/s ETA 6s via direct"
        );
    }
}
