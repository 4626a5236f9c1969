//! Who may use a LAN relay: every request carries a MAC over its method, path, time and a
//! nonce, keyed by a secret only the two members share — derived from the Diffie-Hellman
//! of their WireGuard keys, so it comes with membership and goes with it. Replays (a nonce
//! seen before, or a time too far off) are refused. Pure: the caller passes `now`.

use std::collections::{BTreeSet, HashSet};

use x25519_dalek::{PublicKey, StaticSecret};

/// How far a request's time may be from ours.
pub const MAX_SKEW_SECS: u64 = 60;
/// Nonces remembered at once: a bound on memory. Past it, new requests wait (an answer
/// of "busy") rather than a nonce still inside the window being forgotten.
const MAX_NONCES: usize = 200_000;

pub const HEADER_MEMBER: &str = "x-watchalong-member";
pub const HEADER_TIME: &str = "x-watchalong-time";
pub const HEADER_NONCE: &str = "x-watchalong-nonce";
pub const HEADER_MAC: &str = "x-watchalong-mac";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request is not signed")]
    Missing,
    #[error("the request's time is too far from ours")]
    Skew,
    #[error("the request was seen before")]
    Replay,
    #[error("the signature does not match")]
    BadMac,
    #[error("too many requests at once; try again in a moment")]
    Busy,
}

/// The MAC key two members share.
pub fn pair_key(mine: &StaticSecret, theirs: &[u8; 32]) -> [u8; 32] {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    blake3::derive_key("watchalong relay request v1", shared.as_bytes())
}

pub fn mac(key: &[u8; 32], method: &str, path_and_query: &str, time: u64, nonce: &str) -> String {
    let msg = format!("{method}\n{path_and_query}\n{time}\n{nonce}");
    blake3::keyed_hash(key, msg.as_bytes()).to_hex().to_string()
}

/// What a request carries to prove who sent it and when.
#[derive(Debug, Clone, Copy)]
pub struct Signature<'a> {
    pub time: u64,
    pub nonce: &'a str,
    pub mac: &'a str,
}

/// Remembers the nonces of requests whose time is still acceptable, to refuse replays.
/// A nonce is forgotten only once its request's own time is too old to pass the skew
/// check, so a replay never finds it gone.
#[derive(Default)]
pub struct Replays {
    seen: HashSet<String>,
    by_time: BTreeSet<(u64, String)>,
}

impl Replays {
    /// Checks one request from the member whose pair key is `key`.
    pub fn check(
        &mut self,
        key: &[u8; 32],
        method: &str,
        path_and_query: &str,
        sig: Signature<'_>,
        now: u64,
    ) -> Result<(), AuthError> {
        let Signature {
            time,
            nonce,
            mac: given_mac,
        } = sig;
        if nonce.is_empty() || nonce.len() > 64 {
            return Err(AuthError::Missing);
        }
        if time.abs_diff(now) > MAX_SKEW_SECS {
            return Err(AuthError::Skew);
        }
        let want = mac(key, method, path_and_query, time, nonce);
        // Compare as BLAKE3 hashes: their equality is constant-time.
        let ok = blake3::Hash::from_hex(given_mac)
            .ok()
            .zip(blake3::Hash::from_hex(&want).ok())
            .is_some_and(|(a, b)| a == b);
        if !ok {
            return Err(AuthError::BadMac);
        }
        while let Some((t, _)) = self.by_time.first() {
            if t + MAX_SKEW_SECS >= now {
                break;
            }
            if let Some((_, id)) = self.by_time.pop_first() {
                self.seen.remove(&id);
            }
        }
        // The canonical MAC, not the text sent: hex case must not make a replay look new.
        let id = format!("{want}:{nonce}");
        if self.seen.contains(&id) {
            return Err(AuthError::Replay);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(AuthError::Busy);
        }
        self.seen.insert(id.clone());
        self.by_time.insert((time, id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ([u8; 32], [u8; 32]) {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let ka = pair_key(&a, PublicKey::from(&b).as_bytes());
        let kb = pair_key(&b, PublicKey::from(&a).as_bytes());
        (ka, kb)
    }

    #[test]
    fn both_members_derive_the_same_key_and_a_third_does_not() {
        let (ka, kb) = keys();
        assert_eq!(ka, kb);
        let c = StaticSecret::from([3u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        assert_ne!(pair_key(&c, PublicKey::from(&b).as_bytes()), ka);
    }

    #[test]
    fn signed_request_passes_once_and_its_replay_is_refused() {
        let (ka, kb) = keys();
        let m = mac(&ka, "GET", "/v1/chunk?x=1", 1000, "n1");
        let mut r = Replays::default();
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/v1/chunk?x=1",
                Signature {
                    time: 1000,
                    nonce: "n1",
                    mac: &m
                },
                1001
            ),
            Ok(())
        );
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/v1/chunk?x=1",
                Signature {
                    time: 1000,
                    nonce: "n1",
                    mac: &m
                },
                1002
            ),
            Err(AuthError::Replay)
        );
    }

    #[test]
    fn a_changed_path_time_or_key_fails() {
        let (ka, kb) = keys();
        let m = mac(&ka, "GET", "/v1/chunk?x=1", 1000, "n1");
        let mut r = Replays::default();
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/v1/chunk?x=2",
                Signature {
                    time: 1000,
                    nonce: "n1",
                    mac: &m
                },
                1000
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/v1/chunk?x=1",
                Signature {
                    time: 1001,
                    nonce: "n1",
                    mac: &m
                },
                1000
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            r.check(
                &[9; 32],
                "GET",
                "/v1/chunk?x=1",
                Signature {
                    time: 1000,
                    nonce: "n1",
                    mac: &m
                },
                1000
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/v1/chunk?x=1",
                Signature {
                    time: 1000,
                    nonce: "n1",
                    mac: "zz"
                },
                1000
            ),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn a_replay_with_the_mac_in_upper_case_is_still_a_replay() {
        let (ka, kb) = keys();
        let m = mac(&ka, "GET", "/", 1000, "n3");
        let mut r = Replays::default();
        let sig = |mac| Signature {
            time: 1000,
            nonce: "n3",
            mac,
        };
        assert_eq!(r.check(&kb, "GET", "/", sig(&m), 1000), Ok(()));
        let upper = m.to_uppercase();
        assert_eq!(
            r.check(&kb, "GET", "/", sig(&upper), 1000),
            Err(AuthError::Replay)
        );
    }

    #[test]
    fn a_full_memory_of_nonces_refuses_new_requests_and_forgets_none_still_valid() {
        let (k, _) = keys();
        let mut r = Replays::default();
        let sign = |i: usize, t: u64| {
            let nonce = format!("n{i}");
            let m = mac(&k, "GET", "/x", t, &nonce);
            (nonce, m)
        };
        let t0 = 1_000_000;
        for i in 0..MAX_NONCES {
            let (nonce, m) = sign(i, t0);
            let sig = Signature {
                time: t0,
                nonce: &nonce,
                mac: &m,
            };
            assert_eq!(r.check(&k, "GET", "/x", sig, t0), Ok(()));
        }
        let (nonce, m) = sign(MAX_NONCES, t0);
        let sig = Signature {
            time: t0,
            nonce: &nonce,
            mac: &m,
        };
        assert_eq!(r.check(&k, "GET", "/x", sig, t0), Err(AuthError::Busy));
        // The first request is still remembered: its replay is refused, not served.
        let (nonce, m) = sign(0, t0);
        let sig = Signature {
            time: t0,
            nonce: &nonce,
            mac: &m,
        };
        assert_eq!(
            r.check(&k, "GET", "/x", sig, t0 + 10),
            Err(AuthError::Replay)
        );
        // Once those requests' time is too old to pass, room is made for new ones.
        let later = t0 + MAX_SKEW_SECS + 1;
        let (nonce, m) = sign(MAX_NONCES + 1, later);
        let sig = Signature {
            time: later,
            nonce: &nonce,
            mac: &m,
        };
        assert_eq!(r.check(&k, "GET", "/x", sig, later), Ok(()));
        assert_eq!(r.seen.len(), 1);
    }

    #[test]
    fn an_old_request_is_refused_even_with_a_new_nonce() {
        let (ka, kb) = keys();
        let m = mac(&ka, "GET", "/", 1000, "n2");
        let mut r = Replays::default();
        assert_eq!(
            r.check(
                &kb,
                "GET",
                "/",
                Signature {
                    time: 1000,
                    nonce: "n2",
                    mac: &m
                },
                1000 + MAX_SKEW_SECS + 1
            ),
            Err(AuthError::Skew)
        );
    }
}
