//! The node's long-term keys: the WireGuard x25519 key and an ed25519 signing key. They
//! are made on first start, stored 0600 in the state dir, and refused when group or others
//! can read them. This module never logs or returns key material as text except the
//! public halves.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// A member's public WireGuard (X25519) key: how every layer names a member. Declared
/// once, here, beside the keys it names.
pub type Key = [u8; 32];

const WG_KEY_FILE: &str = "wireguard.key";
const SIGN_KEY_FILE: &str = "signing.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create the state directory {path}: {source}")]
    CreateStateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the key file {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` and check who could have copied it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the key file {path} is damaged: expected one base64 line holding 32 bytes")]
    KeyFormat { path: PathBuf },
}

pub struct Identity {
    pub wg_secret: StaticSecret,
    pub wg_public: PublicKey,
    pub signing: SigningKey,
}

impl Identity {
    /// Loads the keys from `state_dir`, making any that are missing.
    pub fn load_or_create(state_dir: &Path) -> Result<Identity, IdentityError> {
        create_private_dir(state_dir)?;
        let wg = load_or_make(&state_dir.join(WG_KEY_FILE))?;
        let sign = load_or_make(&state_dir.join(SIGN_KEY_FILE))?;
        let wg_secret = StaticSecret::from(*wg);
        let wg_public = PublicKey::from(&wg_secret);
        Ok(Identity {
            wg_secret,
            wg_public,
            signing: SigningKey::from_bytes(&sign),
        })
    }
}

/// The state dir holds secrets, so it is made 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::CreateStateDir {
            path: dir.to_path_buf(),
            source,
        })
}

fn load_or_make(path: &Path) -> Result<Zeroizing<[u8; 32]>, IdentityError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::KeyPermissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                IdentityError::ReadKey {
                    path: path.to_path_buf(),
                    source,
                }
            })?);
            let bytes = Zeroizing::new(STANDARD.decode(text.trim()).map_err(|_| {
                IdentityError::KeyFormat {
                    path: path.to_path_buf(),
                }
            })?);
            let key: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::KeyFormat {
                        path: path.to_path_buf(),
                    })?;
            Ok(Zeroizing::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Zeroizing::new(StaticSecret::random_from_rng(OsRng).to_bytes());
            write_secret(path, &key)?;
            Ok(key)
        }
        Err(source) => Err(IdentityError::ReadKey {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_secret(path: &Path, key: &[u8; 32]) -> Result<(), IdentityError> {
    let err = |source| IdentityError::WriteKey {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let text = Zeroizing::new(format!("{}\n", STANDARD.encode(key)));
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// A WireGuard public key in the base64 form `wg` prints.
pub fn key_to_base64(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

pub fn key_from_base64(s: &str) -> Option<[u8; 32]> {
    STANDARD.decode(s.trim()).ok()?.try_into().ok()
}

/// A member's short name in version vectors and room stamps: the first 4 bytes of its
/// WireGuard key in hex.
pub fn key_id(key: &[u8; 32]) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_stored_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.wg_public.as_bytes(), b.wg_public.as_bytes());
        let mode = std::fs::metadata(dir.path().join(WG_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let p = dir.path().join(WG_KEY_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load_or_create(dir.path()).err().unwrap();
        assert!(matches!(e, IdentityError::KeyPermissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
    }
}

/// Serde for 32-byte keys as base64 text, so state files read like `wg` output.
pub mod key_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::key_to_base64(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        super::key_from_base64(&text)
            .ok_or_else(|| serde::de::Error::custom("expected a base64 key of 32 bytes"))
    }
}
