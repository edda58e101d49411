//! Hotkeys (ed25519 identities), their SS58 and hex forms, secret keys, and key files.
//!
//! A [`Hotkey`] is the public half: it names a node, a client account or a running job. It is shown
//! as an SS58 address with prefix 42 (the generic Substrate prefix Bittensor uses), and parsed from
//! either SS58 or hex. A [`SecretKey`] is the private half; its bytes are zeroized when it drops.
//!
//! Key files are JSON with the field names of Bittensor key files (`publicKey`, `secretSeed`,
//! `ss58Address`). They are written with mode `0600` and refused when group or others can read them.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::str::FromStr;

use blake2::Digest as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::signed::Signature;

/// SS58 address prefix: 42 is the generic Substrate prefix, the one Bittensor shows hotkeys with.
pub const SS58_PREFIX: u8 = 42;

/// The prefix SS58 hashes in front of the payload when computing its checksum.
const SS58_CHECKSUM_CONTEXT: &[u8] = b"SS58PRE";

/// Length of a decoded SS58 address with a one-byte prefix: prefix, 32-byte key, 2-byte checksum.
const SS58_DECODED_LEN: usize = 1 + 32 + 2;

/// Errors parsing or validating a hotkey.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is neither 64 hex digits nor a base58 SS58 address.
    #[error("not a hotkey: expected an SS58 address or 64 hex digits")]
    Unrecognized,
    /// The SS58 address has the wrong length once decoded.
    #[error("SS58 address decodes to {0} bytes, expected {SS58_DECODED_LEN}")]
    Ss58Length(usize),
    /// The SS58 address uses another network's prefix.
    #[error("SS58 address has prefix {0}, expected {SS58_PREFIX}")]
    Ss58Prefix(u8),
    /// The SS58 checksum does not match: a typo or a truncated address.
    #[error("SS58 address checksum mismatch")]
    Ss58Checksum,
    /// The 32 bytes are not a valid compressed Edwards point.
    #[error("32 bytes are not a valid ed25519 public key")]
    InvalidPoint,
    /// The key has small order; signatures under it prove nothing.
    #[error("weak (small-order) ed25519 public key")]
    WeakKey,
}

/// An ed25519 public key naming a node, an account or a job.
///
/// Displayed as SS58 (prefix 42); `{:?}` shows a short form. Parsing accepts SS58 or hex (with or
/// without `0x`). Keys with small order are refused at parse time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hotkey([u8; 32]);

/// Most keys [`checked_key`] remembers: every node of a 256-node subnet, its validators' clients
/// and the jobs in flight, with room to spare. When full it is emptied and refills with the keys
/// in use (a key missing from it only costs its check again).
const CHECKED_KEYS_MAX: usize = 1024;

/// Keys found to be valid, strong points, decompressed: a key is judged by its bytes alone, so the
/// answer never changes. Decoding a hotkey checks it (a point decompression, ~10 µs), and a node
/// decodes the same few hundred hotkeys again and again: every node record of a directory answer
/// (a joining node pulls the whole directory several times, ~255 records each at 256 nodes),
/// every gossiped copy, and the record inside each signed envelope once more. At 256 nodes
/// starting together these checks took 3.8 of the ~27 CPU-seconds all nodes spent until the
/// network converged, 1.5 with this (perf, 2026-12-06, issue 17; the rest of the 1.5 is the
/// signature checks' own point work). At most [`CHECKED_KEYS_MAX`] entries of ~230 bytes.
static CHECKED_KEYS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<[u8; 32], VerifyingKey>>,
> = std::sync::LazyLock::new(Default::default);

fn checked_keys()
-> std::sync::MutexGuard<'static, std::collections::HashMap<[u8; 32], VerifyingKey>> {
    CHECKED_KEYS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `bytes` as a valid, strong (not small-order) ed25519 key, decompressed; remembered in
/// [`CHECKED_KEYS`].
fn checked_key(bytes: &[u8; 32]) -> Result<VerifyingKey, KeyError> {
    if let Some(key) = checked_keys().get(bytes) {
        return Ok(*key);
    }
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
    if key.is_weak() {
        return Err(KeyError::WeakKey);
    }
    let mut keys = checked_keys();
    if keys.len() >= CHECKED_KEYS_MAX {
        keys.clear();
    }
    keys.insert(*bytes, key);
    Ok(key)
}

impl Hotkey {
    /// Builds a hotkey from its 32 compressed bytes, refusing invalid points and weak keys (a key
    /// checked before is not decompressed again, see `CHECKED_KEYS`).
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        checked_key(&bytes)?;
        Ok(Self(bytes))
    }

    /// The 32 compressed bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as a dalek verifying key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        if let Some(key) = checked_keys().get(&self.0) {
            return Ok(*key);
        }
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::InvalidPoint)
    }

    /// The key decompressed and checked once, for verifying many signatures by it (a job's
    /// receipts): each [`HotkeyVerifier::verify`] then skips the point decompression.
    pub fn verifier(&self) -> Result<HotkeyVerifier, KeyError> {
        let key = checked_key(&self.0)?;
        Ok(HotkeyVerifier { hotkey: *self, key })
    }

    /// Lower-case hex without prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The SS58 address (prefix 42).
    pub fn to_ss58(&self) -> String {
        let mut payload = Vec::with_capacity(SS58_DECODED_LEN);
        payload.push(SS58_PREFIX);
        payload.extend_from_slice(&self.0);
        let checksum = ss58_checksum(&payload);
        payload.extend_from_slice(&checksum[..2]);
        bs58::encode(payload).into_string()
    }

    /// Parses an SS58 address with prefix 42.
    pub fn from_ss58(text: &str) -> Result<Self, KeyError> {
        let decoded = bs58::decode(text)
            .into_vec()
            .map_err(|_| KeyError::Unrecognized)?;
        if decoded.len() != SS58_DECODED_LEN {
            return Err(KeyError::Ss58Length(decoded.len()));
        }
        if decoded[0] != SS58_PREFIX {
            return Err(KeyError::Ss58Prefix(decoded[0]));
        }
        let checksum = ss58_checksum(&decoded[..33]);
        if checksum[..2] != decoded[33..] {
            return Err(KeyError::Ss58Checksum);
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&decoded[1..33]);
        Self::from_bytes(bytes)
    }

    /// Parses 64 hex digits, with or without a `0x` prefix.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let digits = text.strip_prefix("0x").unwrap_or(text);
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| KeyError::Unrecognized)?;
        Self::from_bytes(bytes)
    }

    /// The first 5 bytes in hex, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..5])
    }

    /// Checks `signature` over `domain ‖ message` with `verify_strict` (rejects small-order `R`,
    /// non-canonical `s`, and weak keys).
    pub fn verify(
        &self,
        domain: &str,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        self.verifier()
            .map_err(|_| SignatureError::InvalidKey)?
            .verify(domain, message, signature)
    }
}

/// A [`Hotkey`] prepared for verification (see [`Hotkey::verifier`]): decompressed, and known not
/// to be weak.
#[derive(Clone, Copy, Debug)]
pub struct HotkeyVerifier {
    hotkey: Hotkey,
    key: VerifyingKey,
}

impl HotkeyVerifier {
    /// The key this verifier checks signatures for.
    pub fn hotkey(&self) -> &Hotkey {
        &self.hotkey
    }

    /// Checks `signature` over `domain ‖ message`, exactly as [`Hotkey::verify`] does.
    pub fn verify(
        &self,
        domain: &str,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        let signature = ed25519_dalek::Signature::from_bytes(signature.as_bytes());
        self.key
            .verify_strict(&domain_separated(domain, message), &signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// A signature that did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[non_exhaustive]
pub enum SignatureError {
    /// The signer's key is not a valid, strong ed25519 key.
    #[error("signer key is invalid or weak")]
    InvalidKey,
    /// The signature does not verify for this key, domain and message.
    #[error("signature does not verify")]
    Invalid,
}

/// The bytes actually signed: a one-byte length of the domain tag, the tag, then the message.
///
/// The length prefix makes the split between tag and message unambiguous, so no (tag, message)
/// pair can be re-read as another.
pub(crate) fn domain_separated(domain: &str, message: &[u8]) -> Vec<u8> {
    debug_assert!(domain.len() < 256, "domain tags are short constants");
    let mut bytes = Vec::with_capacity(1 + domain.len() + message.len());
    bytes.push(domain.len() as u8);
    bytes.extend_from_slice(domain.as_bytes());
    bytes.extend_from_slice(message);
    bytes
}

fn ss58_checksum(payload: &[u8]) -> [u8; 64] {
    let mut hasher = blake2::Blake2b512::new();
    hasher.update(SS58_CHECKSUM_CONTEXT);
    hasher.update(payload);
    hasher.finalize().into()
}

impl fmt::Display for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_ss58())
    }
}

impl fmt::Debug for Hotkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hotkey({})", self.fmt_short())
    }
}

impl FromStr for Hotkey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let digits = text.strip_prefix("0x").unwrap_or(text);
        if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            Self::from_hex(digits)
        } else {
            Self::from_ss58(text)
        }
    }
}

impl Serialize for Hotkey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_ss58())
        } else {
            serde::Serialize::serialize(&self.0, serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Hotkey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <[u8; 32]>::deserialize(deserializer)?;
            Self::from_bytes(bytes).map_err(serde::de::Error::custom)
        }
    }
}

/// An ed25519 secret key. Its bytes are zeroized when it drops; `{:?}` never shows them.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        // The OS random source failing is unrecoverable for a node that needs an identity.
        getrandom::fill(seed.as_mut()).expect("operating system random source unavailable");
        Self::from_seed(&seed)
    }

    /// The key for a 32-byte seed (deterministic; tests use fixed seeds).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed. Handle with care.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn hotkey(&self) -> Hotkey {
        Hotkey(self.0.verifying_key().to_bytes())
    }

    /// Signs `domain ‖ message` (see [`Hotkey::verify`]).
    pub fn sign(&self, domain: &str, message: &[u8]) -> Signature {
        Signature::from_bytes(self.0.sign(&domain_separated(domain, message)).to_bytes())
    }

    /// The key as PKCS#8 v1 DER (RFC 8410), for TLS libraries. The result is zeroized on drop.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&PREFIX);
        der.extend_from_slice(self.seed().as_ref());
        der
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        // dalek's clone copies the expanded key; re-deriving it from the seed would cost a
        // scalar multiplication per clone.
        Self(self.0.clone())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(hotkey {})", self.hotkey().fmt_short())
    }
}

/// Errors reading or writing a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Group or others may read the file: the secret may have leaked, so it is not used.
    #[error(
        "key file {path} has mode {mode:04o}: group/others can access it; run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The JSON is malformed or its fields disagree.
    #[error("key file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file exists already (key generation never overwrites a key).
    #[error("key file {path} already exists; refusing to overwrite a key")]
    Exists {
        /// The file.
        path: String,
    },
}

/// The JSON document of a key file, with Bittensor's field names.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeyFileJson {
    public_key: String,
    secret_seed: String,
    ss58_address: String,
}

impl SecretKey {
    /// Parses key file JSON, checking that public key, seed and address agree.
    pub fn from_key_file_json(json: &str) -> Result<Self, String> {
        let doc: KeyFileJson = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let seed_hex = doc
            .secret_seed
            .strip_prefix("0x")
            .unwrap_or(&doc.secret_seed);
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(seed_hex, seed.as_mut())
            .map_err(|_| "secretSeed is not 32 bytes of hex".to_owned())?;
        let key = Self::from_seed(&seed);
        let public = Hotkey::from_hex(&doc.public_key).map_err(|e| format!("publicKey: {e}"))?;
        if public != key.hotkey() {
            return Err("publicKey does not match secretSeed".to_owned());
        }
        let address =
            Hotkey::from_ss58(&doc.ss58_address).map_err(|e| format!("ss58Address: {e}"))?;
        if address != key.hotkey() {
            return Err("ss58Address does not match secretSeed".to_owned());
        }
        Ok(key)
    }

    /// The key file JSON for this key. Contains the secret: zeroized on drop.
    pub fn to_key_file_json(&self) -> Zeroizing<String> {
        let hotkey = self.hotkey();
        let doc = KeyFileJson {
            public_key: format!("0x{}", hotkey.to_hex()),
            secret_seed: format!("0x{}", hex::encode(self.seed().as_ref())),
            ss58_address: hotkey.to_ss58(),
        };
        // Serializing a struct of three strings cannot fail.
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        let mut doc = doc;
        zeroize::Zeroize::zeroize(&mut doc.secret_seed);
        Zeroizing::new(text)
    }

    /// Reads a key file, refusing one that group or others can access.
    pub fn read_key_file(path: &Path) -> Result<Self, KeyFileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let shown = path.display().to_string();
        let io = |source| KeyFileError::Io {
            path: shown.clone(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(io)?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: shown, mode });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::from_key_file_json(&text).map_err(|reason| KeyFileError::Malformed {
            path: shown,
            reason,
        })
    }

    /// Writes a new key file with mode `0600`; never overwrites an existing file.
    pub fn write_key_file(&self, path: &Path) -> Result<(), KeyFileError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let shown = path.display().to_string();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyFileError::Exists {
                        path: shown.clone(),
                    }
                } else {
                    KeyFileError::Io {
                        path: shown.clone(),
                        source,
                    }
                }
            })?;
        let json = self.to_key_file_json();
        let written = file
            .write_all(json.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all());
        if let Err(source) = written {
            // A full disk: the file this call created holds nothing usable. Left behind, every
            // later command would read it as a malformed key until someone deleted it by hand.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(KeyFileError::Io {
                path: shown,
                source,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alice's well-known sr25519 public key and its SS58 form: a fixed test vector for the
    /// address encoding (the encoding does not depend on the key scheme).
    const ALICE_HEX: &str = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";
    const ALICE_SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";

    #[test]
    fn ss58_matches_substrate_test_vector() {
        let key = Hotkey::from_hex(ALICE_HEX).unwrap();
        assert_eq!(key.to_ss58(), ALICE_SS58);
        assert_eq!(ALICE_SS58.parse::<Hotkey>().unwrap(), key);
        assert_eq!(format!("0x{ALICE_HEX}").parse::<Hotkey>().unwrap(), key);
    }

    #[test]
    fn ss58_errors_are_typed() {
        let mut bad = ALICE_SS58.to_owned();
        bad.replace_range(10..11, "b");
        assert!(matches!(
            Hotkey::from_ss58(&bad),
            Err(KeyError::Ss58Checksum | KeyError::Unrecognized)
        ));
        assert_eq!(Hotkey::from_ss58("5Grwva"), Err(KeyError::Ss58Length(4)));
        assert_eq!("not a key".parse::<Hotkey>(), Err(KeyError::Unrecognized));
        // Polkadot prefix 0 for the same key.
        let mut payload = vec![0u8];
        payload.extend_from_slice(&hex::decode(ALICE_HEX).unwrap());
        let sum = ss58_checksum(&payload);
        payload.extend_from_slice(&sum[..2]);
        let polkadot = bs58::encode(payload).into_string();
        assert_eq!(Hotkey::from_ss58(&polkadot), Err(KeyError::Ss58Prefix(0)));
    }

    #[test]
    fn weak_and_invalid_keys_are_refused() {
        // The identity point (small order).
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(Hotkey::from_bytes(identity), Err(KeyError::WeakKey));
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(Hotkey::from_bytes(off_curve), Err(KeyError::InvalidPoint));
    }

    #[test]
    fn remembered_keys_give_the_same_answers() {
        let key = SecretKey::generate();
        let bytes = *key.hotkey().as_bytes();
        // Checked, then answered from memory: the same hotkey, and it still verifies only its
        // own signatures.
        for _ in 0..2 {
            let hotkey = Hotkey::from_bytes(bytes).unwrap();
            assert!(checked_keys().contains_key(&bytes));
            let signature = key.sign("horde/test/v1", b"hello");
            assert_eq!(hotkey.verify("horde/test/v1", b"hello", &signature), Ok(()));
            assert_eq!(
                hotkey.verify("horde/test/v1", b"hullo", &signature),
                Err(SignatureError::Invalid)
            );
            assert_eq!(
                hotkey.verifying_key().unwrap(),
                VerifyingKey::from_bytes(&bytes).unwrap()
            );
        }
        // Refused keys are never remembered: refused again, each time.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        for _ in 0..2 {
            assert_eq!(Hotkey::from_bytes(identity), Err(KeyError::WeakKey));
            assert_eq!(Hotkey::from_bytes(off_curve), Err(KeyError::InvalidPoint));
            assert!(!checked_keys().contains_key(&identity));
            assert!(!checked_keys().contains_key(&off_curve));
        }
        // Full: emptied, and the keys in use come back.
        for seed in 0..=CHECKED_KEYS_MAX {
            let mut seed_bytes = [0u8; 32];
            seed_bytes[..8].copy_from_slice(&(seed as u64).to_le_bytes());
            let other = SecretKey::from_seed(&seed_bytes).hotkey();
            Hotkey::from_bytes(*other.as_bytes()).unwrap();
            assert!(checked_keys().len() <= CHECKED_KEYS_MAX);
        }
        assert_eq!(Hotkey::from_bytes(bytes), Ok(key.hotkey()));
    }

    #[test]
    fn key_file_round_trip_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hotkey.json");
        let key = SecretKey::from_seed(&[7; 32]);
        key.write_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = SecretKey::read_key_file(&path).unwrap();
        assert_eq!(read.hotkey(), key.hotkey());
        assert!(matches!(
            key.write_key_file(&path),
            Err(KeyFileError::Exists { .. })
        ));
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hotkey.json");
        SecretKey::from_seed(&[7; 32])
            .write_key_file(&path)
            .unwrap();
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = SecretKey::read_key_file(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Permissions { mode: m, .. } if m == mode),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let good = SecretKey::from_seed(&[7; 32]);
        let other = SecretKey::from_seed(&[8; 32]).hotkey();
        let cases = [
            "not json".to_owned(),
            "{}".to_owned(),
            format!(
                r#"{{"publicKey":"0x{}","secretSeed":"0x{}","ss58Address":"{}"}}"#,
                other.to_hex(),
                hex::encode([7u8; 32]),
                good.hotkey().to_ss58()
            ),
            format!(
                r#"{{"publicKey":"0x{}","secretSeed":"0x{}","ss58Address":"{}"}}"#,
                good.hotkey().to_hex(),
                hex::encode([7u8; 32]),
                other.to_ss58()
            ),
            format!(
                r#"{{"publicKey":"0x{}","secretSeed":"0x1234","ss58Address":"{}"}}"#,
                good.hotkey().to_hex(),
                good.hotkey().to_ss58()
            ),
        ];
        for (i, text) in cases.iter().enumerate() {
            let path = dir.path().join(format!("key{i}.json"));
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = SecretKey::read_key_file(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Malformed { .. }),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn signatures_are_domain_separated() {
        let key = SecretKey::from_seed(&[1; 32]);
        let signature = key.sign("horde/a/v1", b"message");
        let hotkey = key.hotkey();
        assert_eq!(hotkey.verify("horde/a/v1", b"message", &signature), Ok(()));
        assert_eq!(
            hotkey.verify("horde/b/v1", b"message", &signature),
            Err(SignatureError::Invalid)
        );
        // Moving bytes between tag and message does not produce the same signed bytes.
        assert_eq!(
            hotkey.verify("horde/a/v", b"1message", &signature),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn a_prepared_verifier_agrees_with_the_hotkey() {
        let key = SecretKey::from_seed(&[2; 32]);
        let hotkey = key.hotkey();
        let verifier = hotkey.verifier().unwrap();
        assert_eq!(verifier.hotkey(), &hotkey);
        let signature = key.sign("horde/a/v1", b"message");
        assert_eq!(
            verifier.verify("horde/a/v1", b"message", &signature),
            Ok(())
        );
        for (domain, message) in [("horde/b/v1", &b"message"[..]), ("horde/a/v1", b"massage")] {
            assert_eq!(
                verifier.verify(domain, message, &signature),
                Err(SignatureError::Invalid)
            );
            assert_eq!(
                hotkey.verify(domain, message, &signature),
                Err(SignatureError::Invalid)
            );
        }
        let other = SecretKey::from_seed(&[3; 32]).sign("horde/a/v1", b"message");
        assert_eq!(
            verifier.verify("horde/a/v1", b"message", &other),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = SecretKey::from_seed(&[9; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([9u8; 32])));
    }
}
