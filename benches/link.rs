//! Sealed-link guessing cost (issue 10): how many passphrase guesses per second one core
//! makes against a sealed link, with the parameters links are sealed with now against
//! Argon2's defaults (19 MiB, t = 2), which links were sealed with before. No root needed.
//!
//!     cargo bench --bench link            # 5 rounds of about 2 s per side
//!     cargo bench --bench link -- 10      # other round count
//!
//! One thread, so the figure is per core. The two sides alternate round by round, so a
//! neighbour's load on a shared machine weighs on both alike. A guess on the new side is a
//! whole `link::decode` with a wrong passphrase (Argon2id, then the AEAD failing); on the
//! old side it is the same work as the old `decode`: `Argon2::default()`, then the AEAD.

use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use watchalong::group::link::{self, Invite, InviteId, KdfParams};
use zeroize::Zeroizing;

const ROUND: Duration = Duration::from_secs(2);

fn sample(now: u64) -> Invite {
    Invite {
        host_key: [7; 32],
        host_name: "living-room".into(),
        host_address: "100.77.0.1".parse().expect("address"),
        network: "100.77.0.0/16".parse().expect("network"),
        endpoints: vec!["203.0.113.10:51871".parse().expect("endpoint")],
        invite_id: InviteId([1, 2, 3, 4, 5, 6, 7, 8]),
        expires_at: now + 3600,
        secret: Zeroizing::new([9; 32]),
    }
}

/// Guesses made in one round by `guess`, and the time they took.
fn round(mut guess: impl FnMut(u64)) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < ROUND {
        guess(n);
        n += 1;
    }
    (n, start.elapsed())
}

fn main() {
    // `cargo test --all-targets` runs this binary too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("link benchmark: run it with `cargo bench --bench link`");
        return;
    }
    let rounds: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let now = 1_000;
    let sealed = sample(now)
        .encode_sealed("correct horse battery staple")
        .expect("seal");

    // The old format, rebuilt here: a key from Argon2's defaults, then the AEAD.
    let salt = [3u8; 16];
    let nonce = [4u8; 24];
    let old_key = {
        let mut k = [0u8; 32];
        argon2::Argon2::default()
            .hash_password_into(b"correct horse battery staple", &salt, &mut k)
            .expect("argon2");
        k
    };
    let body = vec![0u8; 120];
    let old_sealed = XChaCha20Poly1305::new((&old_key).into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &body,
                aad: &salt,
            },
        )
        .expect("encrypt");

    let new = KdfParams::DEFAULT;
    println!("new: {new}; old: Argon2id with 19 MiB, 2 passes, 1 lane (Argon2::default())");
    let (mut new_n, mut new_t, mut old_n, mut old_t) = (0u64, Duration::ZERO, 0u64, Duration::ZERO);
    for r in 1..=rounds {
        let (n, t) = round(|i| {
            let guess = format!("wrong guess number {i}");
            assert!(link::decode(&sealed, Some(&guess), now).is_err());
        });
        new_n += n;
        new_t += t;
        let (m, u) = round(|i| {
            let guess = format!("wrong guess number {i}");
            let mut k = [0u8; 32];
            argon2::Argon2::default()
                .hash_password_into(guess.as_bytes(), &salt, &mut k)
                .expect("argon2");
            let opened = XChaCha20Poly1305::new((&k).into()).decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &old_sealed,
                    aad: &salt,
                },
            );
            assert!(opened.is_err());
        });
        old_n += m;
        old_t += u;
        println!(
            "round {r}: new {:.2} guesses/s, old {:.2} guesses/s",
            n as f64 / t.as_secs_f64(),
            m as f64 / u.as_secs_f64()
        );
    }
    let new_rate = new_n as f64 / new_t.as_secs_f64();
    let old_rate = old_n as f64 / old_t.as_secs_f64();
    println!(
        "sealed-link guesses per second per core: new {new_rate:.2} ({new_n} in {:.1} s), old {old_rate:.2} ({old_n} in {:.1} s); the old defaults allowed {:.1}x as many",
        new_t.as_secs_f64(),
        old_t.as_secs_f64(),
        old_rate / new_rate
    );
}
