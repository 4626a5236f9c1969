//! Access links and the invites behind them. Pure: every function takes `now` as an
//! argument and nothing here reads the clock, touches a file or a socket.
//!
//! A link is one line, `watchalong://join/<base64url>`. It carries the host's WireGuard
//! public key and endpoints, the VPN network, an invite id, an expiry and a one-time
//! invite secret (an x25519 key the joiner uses for one WireGuard session with the host).
//! Every link ends with a BLAKE3-derived checksum, so any damaged byte is caught before
//! the network is touched or a passphrase asked for (a damaged kind byte must not make a
//! plain link look sealed); a sealed link is encrypted with a key derived from a
//! passphrase (Argon2id, then XChaCha20-Poly1305), and a wrong passphrase is
//! indistinguishable from a damaged link. A sealed link carries its Argon2id parameters,
//! so they can be raised later without a new format; decoding refuses parameters below a
//! floor (a weak link) or above a ceiling (a hostile link asking for gigabytes). The host
//! keeps only the invite's public key, in the [`InviteBook`]. (Past 800 lines only by its
//! unit tests.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ipnet::Ipv4Net;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub const PREFIX: &str = "watchalong://join/";
const VERSION: u8 = 1;
const KIND_PLAIN: u8 = 0;
/// Sealed under Argon2's defaults (19 MiB, t = 2), parameters implied: retired, because
/// guessing its passphrase was cheap. Such links are refused with a message saying so.
const KIND_SEALED_RETIRED: u8 = 1;
/// Sealed under the Argon2id parameters the link carries.
const KIND_SEALED: u8 = 2;
/// The only key derivation a sealed link names so far: Argon2id, version 0x13.
const KDF_ARGON2ID: u8 = 1;
/// Kind, KDF, memory (u32), passes, lanes: what follows the version byte of a sealed link.
const KDF_HEADER_LEN: usize = 1 + 1 + 4 + 1 + 1;
/// A generated passphrase: 20 characters of base32, about 100 bits.
const GENERATED_PASSPHRASE_CHARS: usize = 20;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Shorter passphrases are refused when sealing: a link travels, and its passphrase is all
/// that stands between whoever copies it and the group.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
const CHECKSUM_LEN: usize = 8;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const MAX_ENDPOINTS: usize = 8;
/// The longest host name a link carries, in bytes: what `[node] name` allows.
const MAX_HOST_NAME: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// One message for every kind of damage and for a wrong passphrase, so that a guesser
    /// learns nothing from which check failed.
    #[error("this access link is invalid (damaged, truncated, or the passphrase is wrong)")]
    Invalid,
    #[error("this access link is sealed: a passphrase is needed")]
    NeedsPassphrase,
    #[error("this access link expired at {0} (UTC); ask the host for a new one")]
    Expired(String),
    #[error("cannot seal the link: {0}")]
    Seal(String),
    #[error("this sealed link was made by an older watchalong whose sealing was too weak, and is no longer opened; ask the host for a new link")]
    SealedFormatRetired,
    #[error("this sealed link asks for a key derivation outside what watchalong accepts ({0}); it was damaged, made by a newer version, or made to waste this machine's memory: ask the host for a new link")]
    SealParameters(KdfParams),
    #[error("the passphrase is too short to seal a link ({0} characters, at least {MIN_PASSPHRASE_CHARS} are needed); `watchalong link --generate-passphrase` makes a strong one")]
    WeakPassphrase(usize),
}

/// Argon2id's cost parameters, carried in a sealed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl std::fmt::Display for KdfParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Argon2id with {} MiB, {} pass(es), {} lane(s)",
            self.m_kib / 1024,
            self.t,
            self.p
        )
    }
}

impl KdfParams {
    /// What links are sealed with: 64 MiB and 3 passes, one lane (RFC 9106's second
    /// recommended option), about a third of a second on one core of a small machine.
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// Below this a link is too cheap to guess at; nothing watchalong makes is below it.
    pub const FLOOR: KdfParams = KdfParams::DEFAULT;
    /// Above this a link would make the joiner allocate or compute absurdly much.
    pub const CEILING: KdfParams = KdfParams {
        m_kib: 1024 * 1024,
        t: 16,
        p: 8,
    };

    /// Whether a link may ask for these: between the floor and the ceiling.
    pub fn acceptable(&self) -> bool {
        let (lo, hi) = (Self::FLOOR, Self::CEILING);
        (lo.m_kib..=hi.m_kib).contains(&self.m_kib)
            && (lo.t..=hi.t).contains(&self.t)
            && (lo.p..=hi.p).contains(&self.p)
    }
}

/// What a link says. The invite secret is zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Invite {
    pub host_key: [u8; 32],
    pub host_name: String,
    pub host_address: Ipv4Addr,
    pub network: Ipv4Net,
    pub endpoints: Vec<SocketAddr>,
    pub invite_id: InviteId,
    pub expires_at: u64,
    pub secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite")
            .field("host_name", &self.host_name)
            .field("invite_id", &self.invite_id)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InviteId(pub [u8; 8]);

impl InviteId {
    pub fn random() -> InviteId {
        let mut b = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut b);
        InviteId(b)
    }
}

impl std::fmt::Display for InviteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for InviteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InviteId({self})")
    }
}

impl std::str::FromStr for InviteId {
    type Err = LinkError;
    fn from_str(s: &str) -> Result<Self, LinkError> {
        if s.len() != 16 {
            return Err(LinkError::Invalid);
        }
        let mut b = [0u8; 8];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| LinkError::Invalid)?;
            b[i] = u8::from_str_radix(hex, 16).map_err(|_| LinkError::Invalid)?;
        }
        Ok(InviteId(b))
    }
}

impl TryFrom<String> for InviteId {
    type Error = LinkError;
    fn try_from(s: String) -> Result<Self, LinkError> {
        s.parse()
    }
}

impl From<InviteId> for String {
    fn from(id: InviteId) -> String {
        id.to_string()
    }
}

impl Invite {
    /// The public half of the invite secret: what the host keeps and recognises in the
    /// WireGuard handshake.
    pub fn secret_public(&self) -> [u8; 32] {
        let s = x25519_dalek::StaticSecret::from(*self.secret);
        x25519_dalek::PublicKey::from(&s).to_bytes()
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160);
        b.extend_from_slice(&self.host_key);
        b.extend_from_slice(&*self.secret);
        b.extend_from_slice(&self.invite_id.0);
        b.extend_from_slice(&self.expires_at.to_be_bytes());
        b.extend_from_slice(&self.network.addr().octets());
        b.push(self.network.prefix_len());
        b.extend_from_slice(&self.host_address.octets());
        let eps: Vec<_> = self.endpoints.iter().take(MAX_ENDPOINTS).collect();
        b.push(eps.len() as u8);
        for ep in eps {
            match ep.ip() {
                IpAddr::V4(a) => {
                    b.push(4);
                    b.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    b.push(6);
                    b.extend_from_slice(&a.octets());
                }
            }
            b.extend_from_slice(&ep.port().to_be_bytes());
        }
        // Cut at a character boundary: a cut inside one would make a link its own
        // decoder refuses. Config names are ASCII and shorter, so nothing is cut today.
        let mut end = self.host_name.len().min(MAX_HOST_NAME);
        while !self.host_name.is_char_boundary(end) {
            end -= 1;
        }
        let name = &self.host_name.as_bytes()[..end];
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b
    }

    fn from_body(b: &[u8]) -> Result<Invite, LinkError> {
        let mut r = Reader(b);
        let host_key = r.array::<32>()?;
        let secret = Zeroizing::new(r.array::<32>()?);
        let invite_id = InviteId(r.array::<8>()?);
        let expires_at = u64::from_be_bytes(r.array::<8>()?);
        let net_addr = Ipv4Addr::from(r.array::<4>()?);
        let prefix = r.byte()?;
        let network = Ipv4Net::new(net_addr, prefix).map_err(|_| LinkError::Invalid)?;
        let host_address = Ipv4Addr::from(r.array::<4>()?);
        let n = r.byte()? as usize;
        if n > MAX_ENDPOINTS {
            return Err(LinkError::Invalid);
        }
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            let ip = match r.byte()? {
                4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
                _ => return Err(LinkError::Invalid),
            };
            let port = u16::from_be_bytes(r.array::<2>()?);
            endpoints.push(SocketAddr::new(ip, port));
        }
        let name_len = r.byte()? as usize;
        // Longer than any encoder writes: such a link was not made by a host.
        if name_len > MAX_HOST_NAME {
            return Err(LinkError::Invalid);
        }
        let host_name = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| LinkError::Invalid)?
            .to_string();
        if !r.0.is_empty() || !network.contains(&host_address) {
            return Err(LinkError::Invalid);
        }
        Ok(Invite {
            host_key,
            host_name,
            host_address,
            network,
            endpoints,
            invite_id,
            expires_at,
            secret,
        })
    }

    /// The link text, checksummed.
    pub fn encode(&self) -> String {
        let mut raw = vec![VERSION, KIND_PLAIN];
        raw.extend_from_slice(&self.body());
        let sum = checksum(&raw);
        raw.extend_from_slice(&sum);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw))
    }

    /// The link text, encrypted under `passphrase` with the default parameters.
    pub fn encode_sealed(&self, passphrase: &str) -> Result<String, LinkError> {
        self.encode_sealed_with(passphrase, KdfParams::DEFAULT)
    }

    /// The link text, encrypted under `passphrase` with a key derived by `params`.
    pub fn encode_sealed_with(
        &self,
        passphrase: &str,
        params: KdfParams,
    ) -> Result<String, LinkError> {
        check_passphrase(passphrase)?;
        if !params.acceptable() {
            return Err(LinkError::SealParameters(params));
        }
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let key = derive_key(passphrase, &salt, params)?;
        let mut header = vec![VERSION, KIND_SEALED, KDF_ARGON2ID];
        header.extend_from_slice(&params.m_kib.to_be_bytes());
        // Both fit a byte: the ceiling is far below 256.
        header.push(u8::try_from(params.t).map_err(|_| LinkError::SealParameters(params))?);
        header.push(u8::try_from(params.p).map_err(|_| LinkError::SealParameters(params))?);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&nonce);
        let body = Zeroizing::new(self.body());
        let cipher = XChaCha20Poly1305::new((&*key).into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &body,
                    aad: &header,
                },
            )
            .map_err(|_| LinkError::Seal("encryption failed".into()))?;
        let mut raw = header;
        raw.extend_from_slice(&sealed);
        let sum = checksum(&raw);
        raw.extend_from_slice(&sum);
        Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw)))
    }
}

/// Whether `text` is a sealed link (so the caller knows to ask for a passphrase). A link
/// that could not be opened anyway (retired format, unacceptable parameters) is an error
/// here already, so nobody is asked for a passphrase in vain.
pub fn is_sealed(text: &str) -> Result<bool, LinkError> {
    let raw = checked_bytes(text)?;
    match raw[1] {
        KIND_SEALED => sealed_header(&raw).map(|_| true),
        KIND_SEALED_RETIRED => Err(LinkError::SealedFormatRetired),
        _ => Ok(false),
    }
}

/// The parameters of a sealed link and the length of its header (what the AEAD
/// authenticates), refused before any memory is spent on them when out of bounds.
fn sealed_header(raw: &[u8]) -> Result<(KdfParams, usize), LinkError> {
    let mut r = Reader(raw.get(1..).ok_or(LinkError::Invalid)?);
    let _kind = r.byte()?;
    if r.byte()? != KDF_ARGON2ID {
        return Err(LinkError::Invalid);
    }
    let params = KdfParams {
        m_kib: u32::from_be_bytes(r.array::<4>()?),
        t: u32::from(r.byte()?),
        p: u32::from(r.byte()?),
    };
    if !params.acceptable() {
        return Err(LinkError::SealParameters(params));
    }
    let header_len = 1 + KDF_HEADER_LEN + SALT_LEN + NONCE_LEN;
    // The ciphertext holds at least the AEAD's 16-byte tag.
    if raw.len() < header_len + 16 {
        return Err(LinkError::Invalid);
    }
    Ok((params, header_len))
}

/// Whether `passphrase` is long enough to seal a link with.
pub fn check_passphrase(passphrase: &str) -> Result<(), LinkError> {
    let chars = passphrase.chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(LinkError::WeakPassphrase(chars));
    }
    Ok(())
}

/// A strong passphrase for sealing a link: 20 base32 characters from the OS's generator
/// (about 100 bits), in groups of five for reading aloud.
pub fn generate_passphrase(rng: &mut impl RngCore) -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; GENERATED_PASSPHRASE_CHARS]);
    rng.fill_bytes(&mut *bytes);
    let mut out = Zeroizing::new(String::with_capacity(GENERATED_PASSPHRASE_CHARS + 4));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 5 == 0 {
            out.push('-');
        }
        // 256 is a multiple of 32, so every character is equally likely.
        out.push(char::from(BASE32[usize::from(b & 31)]));
    }
    out
}

/// Decodes and checks a link at time `now` (seconds since the Unix epoch).
pub fn decode(text: &str, passphrase: Option<&str>, now: u64) -> Result<Invite, LinkError> {
    decode_raw(&checked_bytes(text)?, passphrase, now)
}

/// Decodes a link's bytes once its checksum held (version byte first, checksum cut off).
/// Public so a fuzzer can reach past the checksum, which random bytes never pass.
pub fn decode_raw(raw: &[u8], passphrase: Option<&str>, now: u64) -> Result<Invite, LinkError> {
    if raw.len() < 2 {
        return Err(LinkError::Invalid);
    }
    let invite = match raw[1] {
        KIND_PLAIN => Invite::from_body(&raw[2..])?,
        KIND_SEALED_RETIRED => return Err(LinkError::SealedFormatRetired),
        KIND_SEALED => {
            let (params, header_len) = sealed_header(raw)?;
            let passphrase = passphrase.ok_or(LinkError::NeedsPassphrase)?;
            let (header, sealed) = raw.split_at(header_len);
            let salt_at = 1 + KDF_HEADER_LEN;
            let salt = &header[salt_at..salt_at + SALT_LEN];
            let nonce = &header[salt_at + SALT_LEN..];
            let key = derive_key(passphrase, salt, params).map_err(|_| LinkError::Invalid)?;
            let cipher = XChaCha20Poly1305::new((&*key).into());
            let body = Zeroizing::new(
                cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: header,
                        },
                    )
                    .map_err(|_| LinkError::Invalid)?,
            );
            Invite::from_body(&body)?
        }
        _ => return Err(LinkError::Invalid),
    };
    if invite.expires_at <= now {
        return Err(LinkError::Expired(format_utc(invite.expires_at)));
    }
    Ok(invite)
}

/// The link's bytes without their checksum, once the checksum and version hold.
fn checked_bytes(text: &str) -> Result<Vec<u8>, LinkError> {
    let mut raw = raw_bytes(text)?;
    if raw.len() < 2 + CHECKSUM_LEN {
        return Err(LinkError::Invalid);
    }
    let (signed, sum) = raw.split_at(raw.len() - CHECKSUM_LEN);
    if checksum(signed) != sum || signed[0] != VERSION {
        return Err(LinkError::Invalid);
    }
    raw.truncate(raw.len() - CHECKSUM_LEN);
    Ok(raw)
}

fn raw_bytes(text: &str) -> Result<Vec<u8>, LinkError> {
    let b64 = text.trim().strip_prefix(PREFIX).ok_or(LinkError::Invalid)?;
    URL_SAFE_NO_PAD.decode(b64).map_err(|_| LinkError::Invalid)
}

fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = blake3::derive_key("watchalong link checksum v1", data);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&h[..CHECKSUM_LEN]);
    out
}

/// The sealing key, with `params` (bounded by the caller: they size the allocation).
pub fn derive_key(
    passphrase: &str,
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, LinkError> {
    let mut key = Zeroizing::new([0u8; 32]);
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|_| LinkError::SealParameters(params))?;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p)
        .hash_password_into(passphrase.as_bytes(), salt, &mut *key)
        .map_err(|e| LinkError::Seal(e.to_string()))?;
    Ok(key)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        if self.0.len() < n {
            return Err(LinkError::Invalid);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], LinkError> {
        self.take(N)?.try_into().map_err(|_| LinkError::Invalid)
    }
    fn byte(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time, without a calendar dependency.
pub fn format_utc(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

/// The host's record of one invite: only the public half of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteRecord {
    pub id: InviteId,
    #[serde(with = "crate::group::identity::key_b64")]
    pub public_key: [u8; 32],
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_allowed: u32,
    pub uses: u32,
    pub revoked: bool,
    /// Redemptions refused once the invite was spent.
    #[serde(default)]
    pub refused: RefusedRedemptions,
}

/// Attempts to redeem a spent invite with a key it did not admit: a sign that the link
/// leaked, which the host's owner should hear about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRedemptions {
    /// Attempts: a joiner's retries (one request every 500 ms) make one attempt.
    pub count: u32,
    pub last_at: Option<u64>,
    /// The WireGuard key (base64) the last attempt registered.
    pub last_key: Option<String>,
    /// When the last warning was logged, so that the log gets one line a minute at most.
    pub warned_at: Option<u64>,
}

/// A request from the last refused key after this long a pause is a new attempt; a
/// joiner's own retries are 500 ms apart for 10 s.
const NEW_ATTEMPT_AFTER: u64 = 30;
/// At most one warning about one invite's refused redemptions per this many seconds.
const WARN_EVERY: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RedeemError {
    #[error("this invite is unknown to the host")]
    Unknown,
    #[error("this invite expired; ask the host for a new link")]
    Expired,
    #[error("this invite was revoked by the host")]
    Revoked,
    #[error("this invite was already used; ask the host for a new link")]
    AlreadyUsed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    #[error("no invite has the id {0}; `watchalong links` lists them")]
    UnknownInvite(InviteId),
}

impl InviteRecord {
    pub fn status(&self, now: u64) -> Result<(), RedeemError> {
        if self.revoked {
            Err(RedeemError::Revoked)
        } else if self.uses >= self.uses_allowed {
            Err(RedeemError::AlreadyUsed)
        } else if self.expires_at <= now {
            Err(RedeemError::Expired)
        } else {
            Ok(())
        }
    }
}

/// The host's invites. Redemption is a check-and-count in one call, so a caller holding
/// the book under one lock redeems atomically; persisting the result is the caller's job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteBook {
    pub invites: Vec<InviteRecord>,
}

/// How long a used-up or dead invite is kept, so its holder hears why it failed.
const KEEP_DEAD_FOR: u64 = 7 * 24 * 3600;

impl InviteBook {
    pub fn add(&mut self, record: InviteRecord) {
        self.invites.push(record);
    }

    pub fn find_by_key(&self, public_key: &[u8; 32]) -> Option<&InviteRecord> {
        self.invites.iter().find(|r| &r.public_key == public_key)
    }

    /// Uses one redemption of the invite whose secret has `public_key`.
    pub fn redeem(&mut self, public_key: &[u8; 32], now: u64) -> Result<InviteId, RedeemError> {
        let rec = self
            .invites
            .iter_mut()
            .find(|r| &r.public_key == public_key)
            .ok_or(RedeemError::Unknown)?;
        rec.status(now)?;
        rec.uses += 1;
        Ok(rec.id)
    }

    /// Notes a redemption of the invite whose secret has `public_key`, refused because
    /// the invite is spent, by a joiner registering `joiner`. Returns the attempt count
    /// when a warning is due: on a new attempt, once a minute at most. Nothing is noted
    /// for an invite that was never used (a late or revoked link says nothing about a leak).
    pub fn note_refused(
        &mut self,
        public_key: &[u8; 32],
        joiner: &[u8; 32],
        now: u64,
    ) -> Option<u32> {
        let rec = self
            .invites
            .iter_mut()
            .find(|r| &r.public_key == public_key)?;
        let spent = rec.uses > 0
            && matches!(
                rec.status(now),
                Err(RedeemError::AlreadyUsed | RedeemError::Revoked)
            );
        if !spent {
            return None;
        }
        let key = crate::group::identity::key_to_base64(joiner);
        let r = &mut rec.refused;
        let retry = r.last_key.as_deref() == Some(key.as_str())
            && r.last_at
                .is_some_and(|t| now.saturating_sub(t) < NEW_ATTEMPT_AFTER);
        r.last_at = Some(now);
        if retry {
            return None;
        }
        r.count = r.count.saturating_add(1);
        r.last_key = Some(key);
        if r.warned_at
            .is_some_and(|t| now.saturating_sub(t) < WARN_EVERY)
        {
            return None;
        }
        r.warned_at = Some(now);
        Some(r.count)
    }

    pub fn revoke(&mut self, id: InviteId) -> Result<(), RevokeError> {
        let rec = self
            .invites
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or(RevokeError::UnknownInvite(id))?;
        rec.revoked = true;
        Ok(())
    }

    /// Invites that can still be redeemed.
    pub fn open(&self, now: u64) -> impl Iterator<Item = &InviteRecord> {
        self.invites.iter().filter(move |r| r.status(now).is_ok())
    }

    /// Forgets invites dead for long enough that nobody will ask about them.
    pub fn prune(&mut self, now: u64) {
        self.invites
            .retain(|r| r.status(now).is_ok() || r.expires_at.saturating_add(KEEP_DEAD_FOR) > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(now: u64) -> Invite {
        Invite {
            host_key: [7; 32],
            host_name: "living-room".into(),
            host_address: "100.77.0.1".parse().unwrap(),
            network: "100.77.0.0/16".parse().unwrap(),
            endpoints: vec![
                "203.0.113.10:51871".parse().unwrap(),
                "[2001:db8::1]:51871".parse().unwrap(),
            ],
            invite_id: InviteId([1, 2, 3, 4, 5, 6, 7, 8]),
            expires_at: now + 3600,
            secret: Zeroizing::new([9; 32]),
        }
    }

    #[test]
    fn plain_link_round_trips() {
        let inv = sample(1000);
        let text = inv.encode();
        assert!(text.starts_with(PREFIX));
        assert_eq!(decode(&text, None, 1000).unwrap(), inv);
    }

    #[test]
    fn every_flipped_byte_of_a_plain_link_is_rejected() {
        let text = sample(1000).encode();
        for i in 0..text.len() {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut b = text.clone().into_bytes();
                b[i] ^= flip;
                let Ok(s) = String::from_utf8(b) else {
                    continue;
                };
                assert!(
                    decode(&s, None, 1000).is_err(),
                    "flip {flip:#x} at {i} accepted"
                );
            }
        }
    }

    #[test]
    fn a_damaged_link_never_asks_for_a_passphrase() {
        for text in [
            sample(1000).encode(),
            sample(1000).encode_sealed("a long enough pw").unwrap(),
        ] {
            for i in PREFIX.len()..text.len() {
                let mut b = text.clone().into_bytes();
                b[i] ^= 0x01;
                let s = String::from_utf8(b).unwrap();
                assert_eq!(is_sealed(&s), Err(LinkError::Invalid), "flip at {i}");
                assert_eq!(
                    decode(&s, None, 1000),
                    Err(LinkError::Invalid),
                    "flip at {i}"
                );
            }
        }
    }

    #[test]
    fn truncated_link_is_rejected() {
        let text = sample(1000).encode();
        for n in 0..text.len() {
            assert!(
                decode(&text[..n], None, 1000).is_err(),
                "prefix of {n} accepted"
            );
        }
    }

    #[test]
    fn sealed_link_needs_the_right_passphrase_and_fails_like_damage() {
        let inv = sample(1000);
        let text = inv.encode_sealed("correct horse battery").unwrap();
        assert!(is_sealed(&text).unwrap());
        assert_eq!(decode(&text, None, 1000), Err(LinkError::NeedsPassphrase));
        assert_eq!(
            decode(&text, Some("correct horse battery!"), 1000),
            Err(LinkError::Invalid)
        );
        assert_eq!(
            decode(&text, Some("correct horse battery"), 1000).unwrap(),
            inv
        );
    }

    #[test]
    fn expired_link_is_rejected() {
        let text = sample(1000).encode();
        assert!(matches!(
            decode(&text, None, 1000 + 3600),
            Err(LinkError::Expired(_))
        ));
    }

    #[test]
    fn single_use_invite_redeems_once() {
        let mut book = InviteBook::default();
        book.add(InviteRecord {
            id: InviteId([1; 8]),
            public_key: [5; 32],
            created_at: 0,
            expires_at: 100,
            uses_allowed: 1,
            uses: 0,
            revoked: false,
            refused: RefusedRedemptions::default(),
        });
        assert!(book.redeem(&[5; 32], 10).is_ok());
        assert_eq!(book.redeem(&[5; 32], 11), Err(RedeemError::AlreadyUsed));
        assert_eq!(book.redeem(&[6; 32], 11), Err(RedeemError::Unknown));
    }

    #[test]
    fn revoked_and_expired_invites_are_refused() {
        let mut book = InviteBook::default();
        for (i, k) in [(1u8, 5u8), (2, 6)] {
            book.add(InviteRecord {
                id: InviteId([i; 8]),
                public_key: [k; 32],
                created_at: 0,
                expires_at: 100,
                uses_allowed: 3,
                uses: 0,
                revoked: false,
                refused: RefusedRedemptions::default(),
            });
        }
        book.revoke(InviteId([1; 8])).unwrap();
        assert_eq!(book.redeem(&[5; 32], 10), Err(RedeemError::Revoked));
        assert_eq!(book.redeem(&[6; 32], 100), Err(RedeemError::Expired));
        assert_eq!(book.open(10).count(), 1);
    }

    fn spent_single_use_book() -> InviteBook {
        let mut book = InviteBook::default();
        book.add(InviteRecord {
            id: InviteId([1; 8]),
            public_key: [5; 32],
            created_at: 0,
            expires_at: 1000,
            uses_allowed: 1,
            uses: 0,
            revoked: false,
            refused: RefusedRedemptions::default(),
        });
        book
    }

    #[test]
    fn a_second_redemption_by_another_key_is_counted_and_warned_once_per_attempt() {
        let mut book = spent_single_use_book();
        assert_eq!(
            book.note_refused(&[5; 32], &[40; 32], 9),
            None,
            "not spent yet"
        );
        assert_eq!(book.invites[0].refused.count, 0);
        book.redeem(&[5; 32], 10).unwrap();
        // The thief's joiner retries every 500 ms for 10 s: one attempt, one warning.
        assert_eq!(book.redeem(&[5; 32], 11), Err(RedeemError::AlreadyUsed));
        assert_eq!(book.note_refused(&[5; 32], &[41; 32], 11), Some(1));
        for t in 12..21 {
            assert_eq!(
                book.note_refused(&[5; 32], &[41; 32], t),
                None,
                "retry at {t}"
            );
        }
        let r = &book.invites[0].refused;
        assert_eq!((r.count, r.last_at), (1, Some(20)));
        assert_eq!(
            r.last_key,
            Some(crate::group::identity::key_to_base64(&[41; 32]))
        );
        // Another key soon after: counted, but the log has had its line this minute.
        assert_eq!(book.note_refused(&[5; 32], &[42; 32], 25), None);
        assert_eq!(book.invites[0].refused.count, 2);
        // The same key back after a pause is a new attempt, warned about once a minute.
        assert_eq!(book.note_refused(&[5; 32], &[42; 32], 90), Some(3));
        assert_eq!(
            book.note_refused(&[6; 32], &[42; 32], 200),
            None,
            "unknown invite"
        );
    }

    #[test]
    fn a_key_alternating_on_every_packet_is_counted_but_logged_once_a_minute() {
        let mut book = spent_single_use_book();
        book.redeem(&[5; 32], 10).unwrap();
        let warnings = (0..240u64)
            .filter(|i| {
                let key = [(i % 2) as u8 + 50; 32];
                book.note_refused(&[5; 32], &key, 11 + i / 2).is_some()
            })
            .count();
        assert_eq!(warnings, 2, "120 s of alternating keys");
        assert_eq!(book.invites[0].refused.count, 240);
    }

    #[test]
    fn a_late_redemption_of_an_unused_invite_is_not_counted() {
        let mut book = spent_single_use_book();
        assert_eq!(book.note_refused(&[5; 32], &[41; 32], 2000), None);
        book.revoke(InviteId([1; 8])).unwrap();
        assert_eq!(book.note_refused(&[5; 32], &[41; 32], 20), None);
        assert_eq!(book.invites[0].refused, RefusedRedemptions::default());
    }

    /// `text` with its bytes changed by `edit` and its checksum made right again: what a
    /// hostile link maker can do.
    fn tampered(text: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut raw = raw_bytes(text).unwrap();
        raw.truncate(raw.len() - CHECKSUM_LEN);
        edit(&mut raw);
        let sum = checksum(&raw);
        raw.extend_from_slice(&sum);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw))
    }

    #[test]
    fn a_sealed_link_carries_raised_parameters_and_opens_with_them() {
        let inv = sample(1000);
        let raised = KdfParams {
            t: 4,
            ..KdfParams::DEFAULT
        };
        let text = inv
            .encode_sealed_with("correct horse battery", raised)
            .unwrap();
        let raw = checked_bytes(&text).unwrap();
        assert_eq!(sealed_header(&raw).unwrap().0, raised);
        assert_eq!(
            decode(&text, Some("correct horse battery"), 1000).unwrap(),
            inv
        );
        let default = inv.encode_sealed("correct horse battery").unwrap();
        let raw = checked_bytes(&default).unwrap();
        assert_eq!(sealed_header(&raw).unwrap().0, KdfParams::DEFAULT);
        const { assert!(KdfParams::DEFAULT.m_kib >= 64 * 1024 && KdfParams::DEFAULT.t >= 3) };
    }

    #[test]
    fn a_sealed_link_asking_for_parameters_below_the_floor_or_above_the_ceiling_is_refused() {
        let text = sample(1000).encode_sealed("correct horse battery").unwrap();
        // Memory starts after the version, kind and KDF bytes; then passes, then lanes.
        type Edit = fn(&mut Vec<u8>);
        let cases: [(&str, Edit); 6] = [
            ("19 MiB, the old default", |r| {
                r[3..7].copy_from_slice(&(19 * 1024u32).to_be_bytes())
            }),
            ("4 GiB", |r| {
                r[3..7].copy_from_slice(&u32::MAX.to_be_bytes())
            }),
            ("2 passes", |r| r[7] = 2),
            ("255 passes", |r| r[7] = 255),
            ("no lane", |r| r[8] = 0),
            ("another KDF", |r| r[2] = 2),
        ];
        for (what, edit) in cases {
            let bad = tampered(&text, edit);
            let e = decode(&bad, Some("correct horse battery"), 1000).unwrap_err();
            assert!(
                matches!(e, LinkError::SealParameters(_) | LinkError::Invalid),
                "{what}: {e:?}"
            );
            // Refused before a passphrase is asked for.
            assert_eq!(is_sealed(&bad), Err(e), "{what}");
        }
        let low = tampered(&text, cases[0].1);
        assert_eq!(
            decode(&low, Some("correct horse battery"), 1000),
            Err(LinkError::SealParameters(KdfParams {
                m_kib: 19 * 1024,
                ..KdfParams::DEFAULT
            }))
        );
    }

    #[test]
    fn a_link_sealed_in_the_retired_format_is_refused_with_a_message_saying_so() {
        let text = sample(1000).encode_sealed("correct horse battery").unwrap();
        let old = tampered(&text, |r| r[1] = KIND_SEALED_RETIRED);
        assert_eq!(is_sealed(&old), Err(LinkError::SealedFormatRetired));
        assert_eq!(
            decode(&old, Some("correct horse battery"), 1000),
            Err(LinkError::SealedFormatRetired)
        );
        assert!(LinkError::SealedFormatRetired
            .to_string()
            .contains("ask the host for a new link"));
    }

    #[test]
    fn a_host_name_longer_than_any_link_carries_is_refused_and_a_long_one_is_cut_between_characters(
    ) {
        // Found by the `link` fuzz target: decode took up to 255 bytes of name, encode
        // wrote 63, cutting a character in two.
        let mut raw = vec![VERSION, KIND_PLAIN];
        let mut body = sample(1000).body();
        body.truncate(body.len() - 1 - "living-room".len());
        body.push(64);
        body.extend_from_slice(&[b'a'; 64]);
        raw.extend_from_slice(&body);
        assert_eq!(decode_raw(&raw, None, 1000).err(), Some(LinkError::Invalid));
        let mut inv = sample(1000);
        inv.host_name = "é".repeat(40);
        let back = decode(&inv.encode(), None, 1000).unwrap();
        assert_eq!(back.host_name, "é".repeat(31));
    }

    #[test]
    fn a_short_passphrase_is_refused_when_sealing() {
        let e = sample(1000).encode_sealed("hunter2").unwrap_err();
        assert_eq!(e, LinkError::WeakPassphrase(7));
        assert!(e.to_string().contains("--generate-passphrase"), "{e}");
        // Characters are counted, not bytes.
        assert!(sample(1000).encode_sealed("ééééééééééé").is_err());
    }

    #[test]
    fn generated_passphrases_are_base32_in_groups_differ_and_seal_a_link() {
        let mut rng = rand::rngs::OsRng;
        let a = generate_passphrase(&mut rng);
        let b = generate_passphrase(&mut rng);
        assert_ne!(*a, *b);
        let groups: Vec<&str> = a.split('-').collect();
        assert_eq!(groups.len(), 4, "{}", *a);
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|c| BASE32.contains(&c))));
        let inv = sample(1000);
        let text = inv.encode_sealed(&a).unwrap();
        assert_eq!(decode(&text, Some(&a), 1000).unwrap(), inv);
    }
}
