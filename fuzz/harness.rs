//! What each fuzz target does with its bytes: the daemon's own decoders of network and
//! file input, then the checks it runs before trusting the result. Shared, by `#[path]`,
//! between the cargo-fuzz targets in `fuzz/fuzz_targets/` and the stable replay test
//! `tests/fuzz_replay.rs`, so the kept inputs replay through exactly the code fuzzed.
//!
//! A target must not panic on any input. Where the decoded value has a property the
//! daemon relies on (a range inside the file, a link that encodes back to itself), the
//! target asserts it, so a broken property is a crash too.
//!
//! Many inputs start with a mode byte: it lets the fuzzer past a MAC, signature or
//! checksum that random bytes never satisfy, by having the target make it with a fixed
//! test key, so the decoding behind it is reached.

use std::path::Path;

use ed25519_dalek::SigningKey;
use watchalong::group::mesh::{self, MemberRecord, Mesh};

/// One fuzz target: what it is fed to.
pub type Target = fn(&[u8]);

/// Every target, by the name of its folder in `fuzz/corpus/` and `fuzz/crashes/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("link", link),
    ("join", join),
    ("gossip", gossip),
    ("mesh", mesh),
    ("manifest", manifest),
    ("room", room),
    ("node_request", node_request),
    ("control", control),
    ("config", config),
    ("sync_announce", sync_announce),
    ("index_record", index_record),
];

/// The fixed clock of every target: a link expires after it, nothing else cares.
const NOW: u64 = 1_000_000;

fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, &[]),
    }
}

/// Access links: the text form (prefix, base64, checksum) or, past the checksum, the raw
/// bytes, plain or sealed. No passphrase is given: Argon2id's 64 MiB per input would stop
/// the fuzzer, and a sealed body, once decrypted, goes through the same body parser as a
/// plain one. A link that decodes must encode back to a link that decodes the same.
pub fn link(data: &[u8]) {
    use watchalong::group::link;
    let (mode, rest) = split(data);
    let decoded = if mode & 1 == 0 {
        match std::str::from_utf8(rest) {
            Ok(text) => link::decode(text, None, NOW),
            Err(_) => return,
        }
    } else {
        link::decode_raw(rest, None, NOW)
    };
    if let Ok(invite) = decoded {
        let again = link::decode(&invite.encode(), None, NOW);
        assert!(
            again.as_ref() == Ok(&invite),
            "a decoded link does not encode back to itself"
        );
    }
}

/// Join messages inside the invite session: a whole IPv4/UDP packet, or (mode 1) a payload
/// wrapped in one for the join port, then the name check the host runs.
pub fn join(data: &[u8]) {
    use std::net::Ipv4Addr;
    use watchalong::net::wire;
    let (mode, rest) = split(data);
    let packet = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        match wire::encode_udp(ip, ip, wire::JOIN_PORT, rest) {
            Ok(p) => p,
            Err(_) => return,
        }
    };
    if let Ok(wire::JoinMessage::Request { name, .. }) = wire::decode(&packet) {
        let _ = wire::check_name_form(&name);
        let _ = wire::check_name(&name, ["host", "10.0.0.1"]);
    }
}

fn skey(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn record(n: u8) -> MemberRecord {
    MemberRecord {
        wg_key: [n; 32],
        sign_key: skey(n).verifying_key().to_bytes(),
        name: format!("m{n}"),
        address: std::net::Ipv4Addr::new(100, 77, 0, n),
        admitted_at: 0,
        version: 1,
        revoked: false,
        observed: None,
    }
}

/// A group whose host is node 1 (host signing key `skey(1)`) with member 2 admitted.
fn group() -> Mesh {
    let host = skey(1);
    let mut m = Mesh::new([1; 32], host.verifying_key().to_bytes());
    for n in [1, 2] {
        let _ = m.accept_member(&mesh::sign_member(&host, &record(n)));
    }
    m
}

/// Gossip datagrams from member 2: opened (the MAC checked), decoded and handed to the
/// gossip core. Mode 1 seals the payload with member 2's real key first, so the fuzzer
/// reaches the JSON and the core; mode 0 offers the raw datagram, MAC and all.
pub fn gossip(data: &[u8]) {
    use watchalong::group::auth::Proofs;
    use watchalong::group::gossip::{Gossip, GossipMessage};
    use x25519_dalek::StaticSecret;
    let (mode, rest) = split(data);
    let ours = Proofs::new(StaticSecret::from([1; 32]));
    let theirs = Proofs::new(StaticSecret::from([2; 32]));
    let datagram = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        match theirs.seal_gossip(&ours.public(), rest) {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    let Ok(payload) = ours.open_gossip(&theirs.public(), &datagram) else {
        return;
    };
    let Ok(msg) = serde_json::from_slice::<GossipMessage>(payload) else {
        return;
    };
    let mut mesh = group();
    let mut g = Gossip::new([1; 32]);
    let from = [2; 32];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let _ = g.receive(&mut mesh, from, msg, &mut rng);
}

/// Member records and endpoint announcements (mesh's accept paths), and the group file
/// they are stored in. Mode 0: a `Signed` blob as JSON, offered as both kinds. Mode 1: a
/// record body signed by the host. Mode 2: an announcement body signed by member 2.
/// Mode 3: a whole stored group (`Mesh` JSON), re-checked as on load.
pub fn mesh(data: &[u8]) {
    let (mode, rest) = split(data);
    let mut m = group();
    match mode % 4 {
        0 => {
            if let Ok(s) = serde_json::from_slice::<mesh::Signed>(rest) {
                let _ = m.accept_member(&s);
                let _ = m.accept_announcement(&s);
            }
        }
        1 | 2 => {
            let Ok(body) = std::str::from_utf8(rest) else {
                return;
            };
            let (key, context) = if mode % 4 == 1 {
                (skey(1), "member")
            } else {
                (skey(2), "announcement")
            };
            let s = sign_raw(&key, context, body);
            let _ = if context == "member" {
                m.accept_member(&s).map(|_| ())
            } else {
                m.accept_announcement(&s).map(|_| ())
            };
        }
        _ => {
            let Ok(mut stored) = serde_json::from_slice::<Mesh>(rest) else {
                return;
            };
            stored.reindex();
            m = stored;
        }
    }
    let digest = m.digest();
    let _ = m.answer_digest(&digest);
    let _ = m.view_hash();
    for r in m.members() {
        let _ = m.site_of(&r.wg_key);
    }
}

/// A `Signed` over `body` exactly as received, which [`mesh::sign_member`] cannot make
/// (it signs what it serialises): the context strings are the ones `mesh` verifies with.
fn sign_raw(key: &SigningKey, kind: &str, body: &str) -> mesh::Signed {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let context: &[u8] = if kind == "member" {
        b"watchalong member record v1\0"
    } else {
        b"watchalong endpoint announcement v1\0"
    };
    let mut msg = context.to_vec();
    msg.extend_from_slice(body.as_bytes());
    mesh::Signed {
        body: body.to_string(),
        sig: base64::engine::general_purpose::STANDARD.encode(key.sign(&msg).to_bytes()),
    }
}

/// Manifests a member sends, checked as asked for their own share and path; a checked
/// one is then sized by, so its chunk lengths must add up to its size.
pub fn manifest(data: &[u8]) {
    use watchalong::data::share::{Manifest, MAX_CHUNK_SIZE};
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let (share, path) = (m.share.clone(), m.path.clone());
    let Ok(m) = m.checked("m2", &share, &path) else {
        return;
    };
    let _ = m.id();
    let total: u64 = (0..m.chunks.len() as u64).map(|i| m.chunk_len(i)).sum();
    assert_eq!(
        total, m.size,
        "a checked manifest's chunks do not add up to its size"
    );
    assert!((0..m.chunks.len() as u64).all(|i| m.chunk_len(i) <= MAX_CHUNK_SIZE));
    // Every chunk is where its offset says: a byte maps back to the chunk that holds it.
    assert!((0..m.chunks.len() as u64).all(|i| m.chunk_at(m.chunk_offset(i)) == i));
}

/// Room messages: decoded as [`watchalong::watch::hub::Watch::receive`] does, then taken by
/// a room twice, at two times.
pub fn room(data: &[u8]) {
    use watchalong::watch::room::Room;
    let Some(m) = watchalong::watch::hub::decode_room_message(data) else {
        return;
    };
    let now = 1_700_000_000_000;
    let mut room = Room::new(&m.file, "me", now);
    let _ = room.receive("peer", m.clone(), now);
    let _ = room.receive("peer", m, now + 1000);
    let _ = room.state.position_at(now + 2000);
}

/// Node request queries: the chunk request parser of `/v1/chunk`, the `Range` header of
/// `/v1/file` (against a size from the first 8 bytes) and the share path check.
pub fn node_request(data: &[u8]) {
    use watchalong::data::share;
    let (size, rest) = match data.split_first_chunk::<8>() {
        Some((s, rest)) => (u64::from_le_bytes(*s), rest),
        None => (0, data),
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if let Some(cr) = watchalong::data::transfer::parse_chunk_query(text) {
        let _ = share::clean_path(&cr.path);
        let _ = watchalong::group::identity::key_from_base64(&cr.source);
    }
    let _ = share::clean_path(text);
    if let Some((start, end)) = share::parse_range(text, size) {
        assert!(
            start <= end && end < size,
            "range {start}-{end} outside {size} bytes"
        );
    }
}

/// Control API bodies, as every call's request type (the API's own, which the server
/// parses), and an invite id from a path.
pub fn control(data: &[u8]) {
    use watchalong::control::*;
    fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) {
        let _ = serde_json::from_slice::<T>(b);
    }
    parse::<LinkRequest>(data);
    parse::<JoinRequest>(data);
    parse::<PeerAddRequest>(data);
    parse::<PeerRemoveRequest>(data);
    parse::<RemoveRequest>(data);
    parse::<PlanRequest>(data);
    parse::<GetRequest>(data);
    parse::<InjectRequest>(data);
    parse::<FileRequest>(data);
    parse::<Report>(data);
    parse::<WaitRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<watchalong::group::link::InviteId>();
    }
}

/// The configuration file, parsed and validated (line-precise errors included).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = watchalong::base::config::Config::parse(Path::new("fuzz.toml"), text);
    }
}

/// Sync announcements from a member: decoded, each version checked as the node does
/// before deciding, and the decision rule run on those that pass.
pub fn sync_announce(data: &[u8]) {
    use watchalong::sync::versions::resolve;
    let Ok(a) = serde_json::from_slice::<watchalong::sync::folder::Announce>(data) else {
        return;
    };
    let good: Vec<_> = a
        .versions
        .iter()
        .filter(|v| v.check().is_ok() && watchalong::data::share::clean_path(&v.path).is_ok())
        .collect();
    for pair in good.windows(2) {
        let _ = resolve(pair[0], pair[1]);
        let _ = pair[0].vv.compare(&pair[1].vv);
    }
}

/// Records of a share's sync index file (redb values), decoded and checked as versions.
pub fn index_record(data: &[u8]) {
    if let Ok(e) = watchalong::sync::index::decode_entry(data) {
        let _ = e.version.check();
    }
}
