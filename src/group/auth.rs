//! Proof that a message comes from a member's daemon, never from an address: every
//! node-to-node HTTP request, LAN relay request and gossip datagram carries a MAC keyed by a
//! secret only the two daemons hold — derived from the Diffie-Hellman of their WireGuard
//! keys, so it comes with membership and goes with it, and another user on the same machine
//! (who can send from the member's VPN address but cannot read its key) cannot make one.
//! A request's MAC binds the sender, the method, path and query, a hash of the body, the
//! time and a nonce; replays (a nonce seen before, or a time too far off) are refused, with
//! a nonce memory per member so one member cannot make the others' requests wait. A gossip
//! datagram's MAC binds the sender and the payload. LAN relay bodies are also sealed with
//! an AEAD, so a stranger on the LAN learns nothing of a file.
//!
//! Pure: the caller passes `now` and the nonces. It holds the node's X25519 secret and a
//! cache of pair keys, but does no I/O and must not decide membership: callers check that
//! a key belongs to a member before asking for its pair key.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::base::lock::Recover;
use crate::group::identity::Key;

/// How far a request's time may be from ours.
pub const MAX_SKEW_SECS: u64 = 60;
/// Nonces remembered at once for one member: a bound on memory. Past it, that member's new
/// requests wait (an answer of "busy") rather than a nonce still inside the window being
/// forgotten; other members are not affected.
const MAX_NONCES_PER_MEMBER: usize = 50_000;
/// Bytes a sealed gossip datagram adds: its MAC.
pub const GOSSIP_OVERHEAD: usize = 32;

pub const HEADER_MEMBER: &str = "x-watchalong-member";
pub const HEADER_TIME: &str = "x-watchalong-time";
pub const HEADER_NONCE: &str = "x-watchalong-nonce";
pub const HEADER_MAC: &str = "x-watchalong-mac";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the message is not signed")]
    Missing,
    #[error("the message's time is too far from ours")]
    Skew,
    #[error("the message was seen before")]
    Replay,
    #[error("the signature does not match")]
    BadMac,
    #[error("too many requests at once; try again in a moment")]
    Busy,
    #[error("the sealed body does not open")]
    OpenBody,
    #[error("cannot seal the body")]
    SealBody,
    #[error("the member's key is a low-order point: any secret shared with it is public")]
    WeakKey,
}

/// The secret two members share, from which every per-purpose key is derived; `None`
/// for a low-order key, whose "shared" secret anyone can compute.
pub fn pair_key(mine: &StaticSecret, theirs: &Key) -> Option<[u8; 32]> {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    shared
        .was_contributory()
        .then(|| blake3::derive_key("watchalong pair key v1", shared.as_bytes()))
}

/// The keys one pair of members uses, one per purpose, so a MAC made for one kind of
/// message never passes as another kind.
#[derive(Clone, Copy)]
struct PairKeys {
    request: [u8; 32],
    gossip: [u8; 32],
    relay: [u8; 32],
}

impl PairKeys {
    fn derive(pair: &[u8; 32]) -> PairKeys {
        PairKeys {
            request: blake3::derive_key("watchalong request mac v1", pair),
            gossip: blake3::derive_key("watchalong gossip mac v1", pair),
            relay: blake3::derive_key("watchalong relay body v1", pair),
        }
    }
}

/// The MAC of one HTTP request from `from`.
pub fn request_mac(
    key: &[u8; 32],
    from: &Key,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    time: u64,
    nonce: &str,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(from);
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(blake3::hash(body).as_bytes());
    h.update(&time.to_be_bytes());
    h.update(nonce.as_bytes());
    h.finalize()
}

fn gossip_mac(key: &[u8; 32], from: &Key, payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(from);
    h.update(payload);
    h.finalize()
}

/// What a request carries to prove who sent it and when.
#[derive(Debug, Clone, Copy)]
pub struct Signature<'a> {
    pub time: u64,
    pub nonce: &'a str,
    pub mac: &'a str,
}

/// The headers of one signed request, for the client to send.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    pub member: String,
    pub time: u64,
    pub nonce: String,
    pub mac: String,
}

impl SignedHeaders {
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_MEMBER, self.member.clone()),
            (HEADER_TIME, self.time.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_MAC, self.mac.clone()),
        ]
    }
}

/// Which way a sealed relay body travels: the two directions of one request never share
/// an AEAD nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Remembers one member's nonces whose time is still acceptable, to refuse replays. A
/// nonce is forgotten only once its message's own time is too old to pass the skew check,
/// so a replay never finds it gone.
#[derive(Default)]
pub struct Replays {
    seen: HashSet<u128>,
    by_time: BTreeSet<(u64, u128)>,
}

impl Replays {
    /// Records `nonce` at `time`, or says why the message must be refused.
    pub fn admit(&mut self, nonce: u128, time: u64, now: u64) -> Result<(), AuthError> {
        if time.abs_diff(now) > MAX_SKEW_SECS {
            return Err(AuthError::Skew);
        }
        while let Some(&(t, n)) = self.by_time.first() {
            if t.saturating_add(MAX_SKEW_SECS) >= now {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&n);
        }
        if self.seen.contains(&nonce) {
            return Err(AuthError::Replay);
        }
        if self.seen.len() >= MAX_NONCES_PER_MEMBER {
            return Err(AuthError::Busy);
        }
        self.seen.insert(nonce);
        self.by_time.insert((time, nonce));
        Ok(())
    }

    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// A nonce as it travels in a header: 32 lower-case hex digits.
pub fn nonce_hex(n: [u8; 16]) -> String {
    n.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_nonce(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// This node's side of every proof: its secret, the pair keys it derived, and each
/// member's nonce memory.
pub struct Proofs {
    secret: StaticSecret,
    public: Key,
    keys: Mutex<HashMap<Key, PairKeys>>,
    replays: Mutex<HashMap<Key, Replays>>,
}

impl Proofs {
    pub fn new(secret: StaticSecret) -> Proofs {
        let public = PublicKey::from(&secret).to_bytes();
        Proofs {
            secret,
            public,
            keys: Mutex::new(HashMap::new()),
            replays: Mutex::new(HashMap::new()),
        }
    }

    pub fn public(&self) -> Key {
        self.public
    }

    /// The pair keys for `peer`, derived once: the X25519 runs outside the lock.
    fn keys(&self, peer: &Key) -> Result<PairKeys, AuthError> {
        if let Some(k) = self.lock_keys().get(peer) {
            return Ok(*k);
        }
        let k = PairKeys::derive(&pair_key(&self.secret, peer).ok_or(AuthError::WeakKey)?);
        self.lock_keys().insert(*peer, k);
        Ok(k)
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<Key, PairKeys>> {
        self.keys.locked()
    }

    fn admit(&self, from: &Key, nonce: u128, time: u64, now: u64) -> Result<(), AuthError> {
        self.replays
            .locked()
            .entry(*from)
            .or_default()
            .admit(nonce, time, now)
    }

    /// Drops the keys and nonce memory of everyone `keep` does not name (a removed member).
    pub fn retain(&self, keep: impl Fn(&Key) -> bool) {
        self.lock_keys().retain(|k, _| keep(k));
        self.replays.locked().retain(|k, _| keep(k));
    }

    /// Nonces remembered for `from` (for tests and status).
    pub fn remembered(&self, from: &Key) -> usize {
        self.replays.locked().get(from).map_or(0, Replays::len)
    }

    /// Signs a request to member `to`.
    pub fn sign_request(
        &self,
        to: &Key,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        now: u64,
        nonce: [u8; 16],
    ) -> Result<SignedHeaders, AuthError> {
        let nonce = nonce_hex(nonce);
        let key = self.keys(to)?.request;
        let mac = request_mac(
            &key,
            &self.public,
            method,
            path_and_query,
            body,
            now,
            &nonce,
        );
        Ok(SignedHeaders {
            member: crate::group::identity::key_to_base64(&self.public),
            time: now,
            nonce,
            mac: mac.to_hex().to_string(),
        })
    }

    /// Checks a request that member `from` signed; admits its nonce once.
    pub fn check_request(
        &self,
        from: &Key,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        sig: Signature<'_>,
        now: u64,
    ) -> Result<(), AuthError> {
        let nonce = parse_nonce(sig.nonce).ok_or(AuthError::Missing)?;
        // The cheap refusals first: a stale time costs no hash.
        if sig.time.abs_diff(now) > MAX_SKEW_SECS {
            return Err(AuthError::Skew);
        }
        let given = blake3::Hash::from_hex(sig.mac).map_err(|_| AuthError::BadMac)?;
        let key = self.keys(from)?.request;
        let want = request_mac(
            &key,
            from,
            method,
            path_and_query,
            body,
            sig.time,
            sig.nonce,
        );
        // blake3::Hash compares in constant time.
        if given != want {
            return Err(AuthError::BadMac);
        }
        self.admit(from, nonce, sig.time, now)
    }

    /// A gossip datagram for member `to`: the MAC, then the payload.
    ///
    /// Gossip carries no time and no nonce, unlike requests: a datagram travels only
    /// inside WireGuard, so no one but root on the sender or the receiver ever sees one to
    /// replay it, and a replayed gossip message changes nothing (records are signed by
    /// their authors and older ones are dropped). Without a clock in the proof, a member
    /// whose clock is wrong (a router before NTP) still hears who is in the group.
    pub fn seal_gossip(&self, to: &Key, payload: &[u8]) -> Result<Vec<u8>, AuthError> {
        let key = self.keys(to)?.gossip;
        let mac = gossip_mac(&key, &self.public, payload);
        let mut v = Vec::with_capacity(GOSSIP_OVERHEAD + payload.len());
        v.extend_from_slice(mac.as_bytes());
        v.extend_from_slice(payload);
        Ok(v)
    }

    /// The payload of a gossip datagram from member `from`, if `from`'s daemon sealed it.
    pub fn open_gossip<'a>(&self, from: &Key, datagram: &'a [u8]) -> Result<&'a [u8], AuthError> {
        if datagram.len() < GOSSIP_OVERHEAD {
            return Err(AuthError::Missing);
        }
        let (head, payload) = datagram.split_at(GOSSIP_OVERHEAD);
        let mut mac = [0u8; 32];
        mac.copy_from_slice(head);
        let key = self.keys(from)?.gossip;
        if blake3::Hash::from(mac) != gossip_mac(&key, from, payload) {
            return Err(AuthError::BadMac);
        }
        Ok(payload)
    }

    fn relay_cipher(
        &self,
        peer: &Key,
        nonce: &str,
        dir: Direction,
    ) -> Result<(XChaCha20Poly1305, [u8; 24]), AuthError> {
        let key = self.keys(peer)?.relay;
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(nonce.as_bytes());
        h.update(&[match dir {
            Direction::Request => 1,
            Direction::Response => 2,
        }]);
        let mut n = [0u8; 24];
        n.copy_from_slice(&h.finalize().as_bytes()[..24]);
        Ok((XChaCha20Poly1305::new((&key).into()), n))
    }

    /// Seals a relay body exchanged with member `peer` under the request nonce `nonce`.
    pub fn seal_relay(
        &self,
        peer: &Key,
        nonce: &str,
        dir: Direction,
        plain: &[u8],
    ) -> Result<Vec<u8>, AuthError> {
        let (cipher, n) = self.relay_cipher(peer, nonce, dir)?;
        cipher
            .encrypt(
                XNonce::from_slice(&n),
                Payload {
                    msg: plain,
                    aad: nonce.as_bytes(),
                },
            )
            .map_err(|_| AuthError::SealBody)
    }

    /// Opens a relay body sealed by member `peer` (or by this node, for `peer`).
    pub fn open_relay(
        &self,
        peer: &Key,
        nonce: &str,
        dir: Direction,
        sealed: &[u8],
    ) -> Result<Vec<u8>, AuthError> {
        let (cipher, n) = self.relay_cipher(peer, nonce, dir)?;
        cipher
            .decrypt(
                XNonce::from_slice(&n),
                Payload {
                    msg: sealed,
                    aad: nonce.as_bytes(),
                },
            )
            .map_err(|_| AuthError::OpenBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Proofs, Proofs) {
        (
            Proofs::new(StaticSecret::from([1u8; 32])),
            Proofs::new(StaticSecret::from([2u8; 32])),
        )
    }

    fn sig(h: &SignedHeaders) -> Signature<'_> {
        Signature {
            time: h.time,
            nonce: &h.nonce,
            mac: &h.mac,
        }
    }

    #[test]
    fn both_members_derive_the_same_key_and_a_third_does_not() {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let c = StaticSecret::from([3u8; 32]);
        let ka = pair_key(&a, PublicKey::from(&b).as_bytes());
        assert_eq!(ka, pair_key(&b, PublicKey::from(&a).as_bytes()));
        assert_ne!(pair_key(&c, PublicKey::from(&b).as_bytes()), ka);
    }

    #[test]
    fn a_low_order_key_gets_no_pair_key_so_nothing_signed_for_it_can_be_forged() {
        let (a, _) = pair();
        // The identity point: its "shared secret" is all zeros, known to everyone.
        let weak = [0u8; 32];
        assert_eq!(pair_key(&StaticSecret::from([1u8; 32]), &weak), None);
        assert_eq!(
            a.sign_request(&weak, "GET", "/", b"", 1000, [1; 16]).err(),
            Some(AuthError::WeakKey)
        );
        assert_eq!(a.seal_gossip(&weak, b"x").err(), Some(AuthError::WeakKey));
        let sig = Signature {
            time: 1000,
            nonce: &"0".repeat(32),
            mac: &"0".repeat(64),
        };
        assert_eq!(
            a.check_request(&weak, "GET", "/", b"", sig, 1000),
            Err(AuthError::WeakKey)
        );
    }

    #[test]
    fn a_signed_request_passes_once_and_its_replay_is_refused() {
        let (a, b) = pair();
        let h = a
            .sign_request(&b.public(), "POST", "/v1/sync", b"body", 1000, [7; 16])
            .unwrap();
        let check = || b.check_request(&a.public(), "POST", "/v1/sync", b"body", sig(&h), 1001);
        assert_eq!(check(), Ok(()));
        assert_eq!(check(), Err(AuthError::Replay));
    }

    #[test]
    fn a_changed_body_path_method_time_or_sender_fails() {
        let (a, b) = pair();
        let h = a
            .sign_request(&b.public(), "POST", "/v1/sync?x=1", b"keep", 1000, [1; 16])
            .unwrap();
        let from = a.public();
        assert_eq!(
            b.check_request(&from, "POST", "/v1/sync?x=1", b"delete", sig(&h), 1000),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            b.check_request(&from, "POST", "/v1/sync?x=2", b"keep", sig(&h), 1000),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            b.check_request(&from, "GET", "/v1/sync?x=1", b"keep", sig(&h), 1000),
            Err(AuthError::BadMac)
        );
        let later = Signature {
            time: 1001,
            ..sig(&h)
        };
        assert_eq!(
            b.check_request(&from, "POST", "/v1/sync?x=1", b"keep", later, 1000),
            Err(AuthError::BadMac)
        );
        // The same request claimed by a third member: the key differs.
        let c = Proofs::new(StaticSecret::from([3u8; 32]));
        assert_eq!(
            b.check_request(&c.public(), "POST", "/v1/sync?x=1", b"keep", sig(&h), 1000),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn a_request_reflected_back_to_its_sender_is_refused() {
        let (a, b) = pair();
        // a signs for b; someone hands it to a as if b had sent it.
        let h = a
            .sign_request(&b.public(), "GET", "/v1/ls", b"", 1000, [2; 16])
            .unwrap();
        assert_eq!(
            a.check_request(&b.public(), "GET", "/v1/ls", b"", sig(&h), 1000),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn an_unsigned_or_malformed_request_is_refused_without_panicking() {
        let (a, b) = pair();
        let (zeros32, zeros64) = ("0".repeat(32), "0".repeat(64));
        for (nonce, mac, want) in [
            ("", "", AuthError::Missing),
            ("zz", "00", AuthError::Missing),
            (zeros32.as_str(), "zz", AuthError::BadMac),
            (zeros32.as_str(), zeros64.as_str(), AuthError::BadMac),
        ] {
            let sig = Signature {
                time: 1000,
                nonce,
                mac,
            };
            assert_eq!(
                b.check_request(&a.public(), "GET", "/", b"", sig, 1000),
                Err(want)
            );
        }
    }

    #[test]
    fn an_old_request_is_refused_even_with_a_new_nonce() {
        let (a, b) = pair();
        let h = a
            .sign_request(&b.public(), "GET", "/", b"", 1000, [3; 16])
            .unwrap();
        assert_eq!(
            b.check_request(
                &a.public(),
                "GET",
                "/",
                b"",
                sig(&h),
                1000 + MAX_SKEW_SECS + 1
            ),
            Err(AuthError::Skew)
        );
    }

    #[test]
    fn a_full_nonce_memory_makes_only_that_member_wait_and_forgets_no_valid_nonce() {
        let mut r = Replays::default();
        let t0 = 1_000_000;
        for i in 0..MAX_NONCES_PER_MEMBER as u128 {
            assert_eq!(r.admit(i, t0, t0), Ok(()));
        }
        assert_eq!(r.admit(u128::MAX, t0, t0), Err(AuthError::Busy));
        // The first nonce is still remembered: its replay is refused, not served.
        assert_eq!(r.admit(0, t0, t0 + 10), Err(AuthError::Replay));
        // Once those messages are too old to pass, room is made for new ones.
        let later = t0 + MAX_SKEW_SECS + 1;
        assert_eq!(r.admit(u128::MAX, later, later), Ok(()));
        assert_eq!(r.len(), 1);

        // Another member's memory is its own.
        let (a, b) = pair();
        let c = Proofs::new(StaticSecret::from([3u8; 32]));
        {
            let mut all = b.replays.lock().unwrap();
            let full = all.entry(a.public()).or_default();
            for i in 0..MAX_NONCES_PER_MEMBER as u128 {
                full.admit(i, t0, t0).unwrap();
            }
        }
        let from_a = a
            .sign_request(&b.public(), "GET", "/", b"", t0, [9; 16])
            .unwrap();
        assert_eq!(
            b.check_request(&a.public(), "GET", "/", b"", sig(&from_a), t0),
            Err(AuthError::Busy)
        );
        let from_c = c
            .sign_request(&b.public(), "GET", "/", b"", t0, [9; 16])
            .unwrap();
        assert_eq!(
            b.check_request(&c.public(), "GET", "/", b"", sig(&from_c), t0),
            Ok(())
        );
    }

    #[test]
    fn a_sealed_gossip_datagram_opens_only_from_its_sender_and_unchanged() {
        let (a, b) = pair();
        let c = Proofs::new(StaticSecret::from([3u8; 32]));
        let d = a.seal_gossip(&b.public(), b"{\"hello\":1}").unwrap();
        assert_eq!(b.open_gossip(&c.public(), &d), Err(AuthError::BadMac));
        assert_eq!(b.open_gossip(&a.public(), &d), Ok(&b"{\"hello\":1}"[..]));
        // Reflected back to its sender as if b had sent it.
        assert_eq!(a.open_gossip(&b.public(), &d), Err(AuthError::BadMac));
        // Plain JSON, as a local user would send it from the member's address.
        assert_eq!(
            b.open_gossip(
                &a.public(),
                br#"{"type":"digest","members":[],"announcements":[]}"#
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            b.open_gossip(&a.public(), b"short"),
            Err(AuthError::Missing)
        );
        let mut flipped = a.seal_gossip(&b.public(), b"payload").unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(b.open_gossip(&a.public(), &flipped), Err(AuthError::BadMac));
    }

    #[test]
    fn a_relay_body_opens_only_for_the_pair_and_the_direction_it_was_sealed_for() {
        let (a, b) = pair();
        let c = Proofs::new(StaticSecret::from([3u8; 32]));
        let n = nonce_hex([6; 16]);
        let sealed = a
            .seal_relay(&b.public(), &n, Direction::Response, b"secret film")
            .unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            b.open_relay(&a.public(), &n, Direction::Response, &sealed)
                .unwrap(),
            b"secret film"
        );
        assert_eq!(
            b.open_relay(&a.public(), &n, Direction::Request, &sealed),
            Err(AuthError::OpenBody)
        );
        assert_eq!(
            b.open_relay(
                &a.public(),
                &nonce_hex([7; 16]),
                Direction::Response,
                &sealed
            ),
            Err(AuthError::OpenBody)
        );
        assert_eq!(
            c.open_relay(&a.public(), &n, Direction::Response, &sealed),
            Err(AuthError::OpenBody)
        );
    }
}
