//! Tests of the control handler's pure parts without root: targets, holders, the share
//! list, and how domain errors map to HTTP statuses.

use super::*;
use crate::sync::kept::KeptError;

#[test]
fn a_target_splits_into_share_and_path_and_a_missing_share_is_a_bad_request() {
    let ok = |t: &str| split_target(t).unwrap();
    assert_eq!(ok("movies/film.mkv"), ("movies".into(), "film.mkv".into()));
    assert_eq!(ok("/movies/a/b.mkv"), ("movies".into(), "a/b.mkv".into()));
    assert_eq!(ok("movies"), ("movies".into(), String::new()));
    // Leading slashes are not a share: they are dropped, whatever their number.
    assert_eq!(ok("//movies"), ("movies".into(), String::new()));
    for bad in ["", "/", "///"] {
        let e = split_target(bad).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(e.to_string().contains("SHARE/PATH"), "{e}");
    }
}

#[test]
fn a_missing_version_is_not_found_a_bad_path_a_bad_request_and_disk_trouble_internal() {
    let io = || std::io::Error::other("disk");
    let cases = [
        (
            KeptError::FindVersion("a.txt".into(), String::new()),
            StatusCode::NOT_FOUND,
        ),
        (KeptError::CheckPath("../x".into()), StatusCode::BAD_REQUEST),
        (
            KeptError::List {
                path: "/s".into(),
                source: io(),
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            KeptError::Restore {
                path: "/s/a".into(),
                source: io(),
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ];
    for (e, status) in cases {
        let text = e.to_string();
        let api = kept_error(e);
        assert_eq!(api.status, status, "{text}");
        assert_eq!(api.to_string(), text, "the user reads the error itself");
    }
}

#[test]
fn a_refused_handoff_maps_to_the_status_that_says_why() {
    let id = || "ab".to_string();
    let cases = [
        (TransferError::Find(id()), StatusCode::NOT_FOUND),
        (TransferError::CheckOwner(id()), StatusCode::FORBIDDEN),
        (TransferError::FindHandoff(id()), StatusCode::BAD_REQUEST),
        (TransferError::CheckFinished(id()), StatusCode::CONFLICT),
    ];
    for (e, status) in cases {
        assert_eq!(transfer_error(e).status, status);
    }
}

fn peer(n: u8, name: &str, site: Option<&str>, up: bool, shares: &[&str]) -> transfer::Peer {
    transfer::Peer {
        key: [n; 32],
        name: name.into(),
        vpn: std::net::Ipv4Addr::new(100, 77, 0, n),
        relay: None,
        site: site.map(str::to_string),
        up,
        shares: shares.iter().map(|s| s.to_string()).collect(),
    }
}

/// This node (1) at home; a down neighbour, an up stranger, an up neighbour.
fn directory() -> Directory {
    Directory {
        me: [1; 32],
        peers: vec![
            peer(4, "far", Some("198.51.100.9"), true, &["movies"]),
            peer(3, "attic", Some("203.0.113.5"), false, &["movies", "docs"]),
            peer(1, "me", Some("203.0.113.5"), true, &["movies"]),
            peer(2, "den", Some("203.0.113.5"), true, &["movies"]),
        ],
    }
}

#[test]
fn holders_are_this_node_first_then_nearby_ones_up_before_down_then_the_rest() {
    let names = |v: Vec<transfer::Peer>| v.into_iter().map(|p| p.name).collect::<Vec<_>>();
    let dir = directory();
    assert_eq!(
        names(holders(&dir, "movies", None).unwrap()),
        ["me", "den", "attic", "far"]
    );
    assert_eq!(
        names(holders(&dir, "movies", Some("far")).unwrap()),
        ["far"]
    );
    assert_eq!(names(holders(&dir, "docs", None).unwrap()), ["attic"]);
}

#[test]
fn a_share_nobody_offers_or_a_member_without_it_is_not_found_with_what_to_do() {
    let dir = directory();
    let e = holders(&dir, "music", None).unwrap_err();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    assert!(e.to_string().contains("`watchalong ls` lists them"), "{e}");
    let e = holders(&dir, "docs", Some("den")).unwrap_err();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    assert!(e.to_string().contains("den does not offer"), "{e}");
}

#[test]
fn the_share_list_names_each_share_once_with_every_member_offering_it() {
    let list = share_list(&directory());
    assert_eq!(list.holder, None);
    let shares: Vec<(&str, Vec<&str>)> = list
        .entries
        .iter()
        .map(|e| {
            assert!(e.dir);
            (
                e.name.as_str(),
                e.holders.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        shares,
        [
            ("docs", vec!["attic"]),
            ("movies", vec!["far", "attic", "me", "den"])
        ]
    );
}
