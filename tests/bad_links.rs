//! Links that must not let anyone in, and a daemon that keeps serving through them.

mod common;

use std::time::Duration;

use common::*;
use watchalong::cli::render::LinkOutput;
use watchalong::control::InviteView;
use watchalong::group::link;

fn one_line_error(o: &std::process::Output, what: &str) -> String {
    assert!(!o.status.success(), "{what}: the join succeeded");
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: error is not one line: {err:?}"
    );
    assert!(err.starts_with("error: "), "{what}: {err}");
    err
}

fn now() -> u64 {
    watchalong::base::clock::now_secs()
}

#[test]
fn bad_links_fail_with_one_line_and_the_daemon_keeps_serving() {
    if !root_or_skip("bad_links_fail_with_one_line_and_the_daemon_keeps_serving") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut member = lab.node("member");
    let mut other_host = lab.node("otherhost");
    let mut c = lab.node("c");
    for n in [&mut host, &mut member, &mut other_host, &mut c] {
        n.start();
    }
    let good = host.link(&["--uses", "1"]);
    member.ok(&["join", &good]);

    // Truncated, at several lengths.
    for n in [0, 10, 18, 40, good.len() / 2, good.len() - 1] {
        let e = one_line_error(&c.cli(&["join", &good[..n]]), "truncated");
        assert!(e.contains("invalid"), "truncated to {n}: {e}");
    }
    // One byte flipped at every position.
    let fresh = host.link(&[]);
    let mut flip_error = String::new();
    for i in 0..fresh.len() {
        let mut b = fresh.clone().into_bytes();
        b[i] ^= 0x01;
        let bad = String::from_utf8(b).expect("ascii stays ascii");
        let e = one_line_error(&c.cli(&["join", &bad]), &format!("flip at {i}"));
        assert!(e.contains("invalid"), "flip at {i}: {e}");
        flip_error = e;
    }
    c.status();
    // Random text.
    for junk in [
        "hello",
        "watchalong://join/",
        "watchalong://join/AAAA",
        "https://example.com/x",
    ] {
        let e = one_line_error(&c.cli(&["join", junk]), junk);
        assert!(e.contains("invalid"), "{junk}: {e}");
    }
    // A short passphrase is refused, before any invite is made.
    let invites_before = host.ok(&["links", "--json"]);
    let e = one_line_error(
        &host.cli_stdin(&["link", "--passphrase"], "right horse\n"),
        "short passphrase",
    );
    assert!(e.contains("--generate-passphrase"), "{e}");
    assert_eq!(host.ok(&["links", "--json"]), invites_before);
    // Wrong passphrase: the same error as any damage.
    let sealed = host.cli_stdin(&["link", "--passphrase"], "right horse battery\n");
    assert!(sealed.status.success());
    let sealed = String::from_utf8_lossy(&sealed.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let e = one_line_error(
        &c.cli_stdin(&["join", &sealed], "wrong horse battery\n"),
        "wrong passphrase",
    );
    assert_eq!(e, flip_error, "a wrong passphrase must look like damage");
    // A generated passphrase seals a link that it, and only it, opens.
    let g: LinkOutput =
        serde_json::from_str(&host.ok(&["link", "--generate-passphrase", "--json"])).unwrap();
    let (text, pass) = (g.link.as_str(), g.passphrase.as_deref().unwrap());
    assert!(pass.chars().count() >= link::MIN_PASSPHRASE_CHARS, "{pass}");
    assert!(link::decode(text, Some(pass), now()).is_ok());
    assert!(link::decode(text, Some("correct horse battery"), now()).is_err());
    // Expired.
    let short = host.link(&["--expires", "1s"]);
    let expires_at = link::decode(&short, None, now())
        .map(|i| i.expires_at)
        .unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || now() > expires_at));
    let e = one_line_error(&c.cli(&["join", &short]), "expired");
    assert!(e.contains("expired"), "{e}");
    // Revoked.
    let j: LinkOutput = serde_json::from_str(&host.ok(&["link", "--json"])).unwrap();
    host.ok(&["link", "--revoke", &j.id]);
    let e = one_line_error(&c.cli(&["join", &j.link]), "revoked");
    assert!(e.contains("revoked"), "{e}");
    // Already used, given on the command line and on stdin.
    let e = one_line_error(&c.cli(&["join", &good]), "used");
    assert!(e.contains("already used"), "{e}");
    let e = one_line_error(&c.cli_stdin(&["join", "-"], &format!("{good}\n")), "stdin");
    assert!(e.contains("already used"), "{e}");
    let e = one_line_error(
        &c.cli_stdin(&["join", "-"], &format!("{good}\nmore\n")),
        "two lines",
    );
    assert!(e.contains("the link alone"), "{e}");
    // A link from another group, opened on a member of this one.
    let foreign = other_host.link(&[]);
    let e = one_line_error(&member.cli(&["join", &foreign]), "other group");
    assert!(e.contains("another group"), "{e}");

    // Every daemon still serves, and the host admitted only the one member.
    for n in [&host, &member, &other_host, &c] {
        n.status();
    }
    let peers = host.status().peers.len();
    assert_eq!(peers, 1, "the host admitted someone it should not have");
    let links: Vec<InviteView> = serde_json::from_str(&host.ok(&["links", "--json"])).unwrap();
    let states: Vec<&str> = links.iter().map(|l| l.state.as_str()).collect();
    assert!(
        states.contains(&"used") && states.contains(&"revoked") && states.contains(&"expired"),
        "{states:?}"
    );

    // The sealed link still works with the right passphrase.
    let ok = c.cli_stdin(&["join", &sealed], "right horse battery\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(wait_until(Duration::from_secs(30), || c.ping("100.77.0.1")));
}

#[test]
fn ten_concurrent_redemptions_of_a_single_use_link_admit_exactly_one() {
    if !root_or_skip("ten_concurrent_redemptions_of_a_single_use_link_admit_exactly_one") {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    host.start();
    let text = host.link(&["--uses", "1"]);
    let joiners = lab.node("joiners");
    let results = in_netns(&joiners.ns.name, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let invite = link::decode(&text, None, now()).unwrap();
            let mut set = tokio::task::JoinSet::new();
            for i in 0..10u8 {
                let invite = invite.clone();
                set.spawn(async move {
                    let wg = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
                    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
                    watchalong::net::join::redeem(
                        &invite,
                        &wg,
                        &signing,
                        &format!("j{i}"),
                        Duration::from_secs(20),
                    )
                    .await
                    .map_err(|e| e.to_string())
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.unwrap());
            }
            out
        })
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.contains("already used"), "{r}");
    }
    assert_eq!(host.status().peers.len(), 1);
    let links: Vec<InviteView> = serde_json::from_str(&host.ok(&["links", "--json"])).unwrap();
    assert_eq!(links[0].uses, 1);
    // The nine others tried a spent link with keys it did not admit: each is one attempt.
    assert_eq!(links[0].refused_redemptions, 9, "{links:?}");
    assert!(links[0].last_refused_key.is_some(), "{links:?}");
}

#[test]
fn a_node_answering_at_the_hosts_endpoint_with_another_key_cannot_complete_a_join() {
    if !root_or_skip(
        "a_node_answering_at_the_hosts_endpoint_with_another_key_cannot_complete_a_join",
    ) {
        return;
    }
    let mut lab = Lab::new();
    let mut host = lab.node("host");
    let mut impostor = lab.node("impostor");
    let mut joiner = lab.node("joiner");
    for n in [&mut host, &mut impostor, &mut joiner] {
        n.start();
    }
    // The impostor even holds a genuine invite of its own, so it accepts handshakes for it.
    impostor.link(&[]);
    let mut invite = link::decode(&host.link(&[]), None, now()).unwrap();
    invite.endpoints = vec![std::net::SocketAddr::from((impostor.ip, 51871))];
    let redirected = invite.encode();
    let e = one_line_error(&joiner.cli(&["join", &redirected]), "impostor");
    assert!(e.contains("no answer from the host"), "{e}");
    assert_eq!(impostor.status().peers.len(), 0);
    assert_eq!(
        joiner.status().node.role,
        "host",
        "the joiner joined something"
    );
    joiner.status();
}
