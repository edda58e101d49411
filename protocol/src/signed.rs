//! Signed envelopes: the exact encoded bytes of a value, its signer, and a signature over
//! `domain tag ‖ bytes`.
//!
//! The bytes are kept as received and verified as received, never re-encoded (postcard accepts
//! overlong varints, so a re-encoding could differ from what was signed). Decoding the inner value
//! rejects trailing bytes. Each signable type names its own domain tag, so a signature made for one
//! purpose never verifies as another.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, from_bytes_exact, to_bytes};
use crate::keys::{Hotkey, HotkeyVerifier, SecretKey, SignatureError};

/// A 64-byte ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);

impl Signature {
    /// Wraps raw signature bytes (no validation: verification does that).
    pub fn from_bytes(bytes: [u8; 64]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..6]))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignatureVisitor;
        impl serde::de::Visitor<'_> for SignatureVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = bytes
                    .try_into()
                    .map_err(|_| E::invalid_length(bytes.len(), &self))?;
                Ok(Signature(bytes))
            }
        }
        deserializer.deserialize_bytes(SignatureVisitor)
    }
}

/// A type that can be signed. Its domain tag names the purpose of the signature.
pub trait Signable: Serialize + DeserializeOwned {
    /// The domain tag, e.g. `horde/job-spec/v1`. Unique per type, and listed in
    /// [`crate::wire::DOMAIN_TAGS`].
    const DOMAIN: &'static str;

    /// [`Self::DOMAIN`], checked at compile time to be listed in [`crate::wire::DOMAIN_TAGS`]:
    /// [`Signed`] signs and verifies with this, so a type whose tag is not listed cannot be
    /// signed or verified. Not meant to be overridden (the crate's own tests do, for tags that
    /// never reach the wire).
    #[doc(hidden)]
    const LISTED_DOMAIN: &'static str = crate::wire::listed_domain(Self::DOMAIN);
}

/// Why a signed envelope was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signature does not verify over this domain and these bytes.
    #[error("bad signature by {signer}: {source}")]
    BadSignature {
        /// Who claims to have signed.
        signer: Hotkey,
        /// Why it failed.
        source: SignatureError,
    },
    /// The signature verifies but the signer is not the one required.
    #[error("signed by {actual}, expected {expected}")]
    WrongSigner {
        /// The key that was required.
        expected: Hotkey,
        /// The key that signed.
        actual: Hotkey,
    },
    /// The signed bytes do not decode as the expected type.
    #[error("signed payload: {0}")]
    Decode(#[from] DecodeError),
}

/// A value of type `T`, as the exact bytes that were signed, with the signer and signature.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    bytes: Vec<u8>,
    signer: Hotkey,
    signature: Signature,
    #[serde(skip)]
    marker: PhantomData<fn() -> T>,
}

impl<T: Signable> Signed<T> {
    /// Encodes `value` and signs `T::DOMAIN ‖ bytes` with `key`.
    pub fn sign(key: &SecretKey, value: &T) -> Self {
        let bytes = to_bytes(value);
        let signature = key.sign(T::LISTED_DOMAIN, &bytes);
        Self {
            bytes,
            signer: key.hotkey(),
            signature,
            marker: PhantomData,
        }
    }

    /// Assembles an envelope from parts received elsewhere (verification happens on use).
    pub fn from_parts(bytes: Vec<u8>, signer: Hotkey, signature: Signature) -> Self {
        Self {
            bytes,
            signer,
            signature,
            marker: PhantomData,
        }
    }

    /// Verifies the signature over the exact bytes held, then decodes them (no trailing bytes).
    pub fn verify(&self) -> Result<T, VerifyError> {
        self.decode_checked(
            self.signer
                .verify(T::LISTED_DOMAIN, &self.bytes, &self.signature),
        )
    }

    /// Like [`Signed::verify`], and requires the signer to be `expected`.
    pub fn verify_by(&self, expected: &Hotkey) -> Result<T, VerifyError> {
        self.check_signer(expected)?;
        self.verify()
    }

    /// Like [`Signed::verify_by`] with a key prepared once for many signatures.
    pub fn verify_with(&self, expected: &HotkeyVerifier) -> Result<T, VerifyError> {
        self.check_signer(expected.hotkey())?;
        self.decode_checked(expected.verify(T::LISTED_DOMAIN, &self.bytes, &self.signature))
    }

    /// Decodes the bytes once their signature `check` passed.
    fn decode_checked(&self, check: Result<(), SignatureError>) -> Result<T, VerifyError> {
        check.map_err(|source| VerifyError::BadSignature {
            signer: self.signer,
            source,
        })?;
        Ok(from_bytes_exact(&self.bytes)?)
    }

    fn check_signer(&self, expected: &Hotkey) -> Result<(), VerifyError> {
        if &self.signer != expected {
            return Err(VerifyError::WrongSigner {
                expected: *expected,
                actual: self.signer,
            });
        }
        Ok(())
    }

    /// Who claims to have signed (not verified by itself).
    pub fn signer(&self) -> &Hotkey {
        &self.signer
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The signed bytes, exactly as received.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// BLAKE3 of the signed bytes: a stable identifier for deduplication.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.bytes).as_bytes()
    }
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            signer: self.signer,
            signature: self.signature,
            marker: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
            && self.signer == other.signer
            && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.bytes.len())
            .field("signer", &self.signer)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Greeting {
        text: String,
        count: u32,
    }
    impl Signable for Greeting {
        const DOMAIN: &'static str = "horde/test-greeting/v1";
        // A test-only purpose, never on the wire: not in `wire::DOMAIN_TAGS`.
        const LISTED_DOMAIN: &'static str = Self::DOMAIN;
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OtherPurpose {
        text: String,
        count: u32,
    }
    impl Signable for OtherPurpose {
        const DOMAIN: &'static str = "horde/test-other/v1";
        const LISTED_DOMAIN: &'static str = Self::DOMAIN;
    }

    fn greeting() -> Greeting {
        Greeting {
            text: "hello".into(),
            count: 3,
        }
    }

    #[test]
    fn sign_then_verify() {
        let key = SecretKey::from_seed(&[1; 32]);
        let signed = Signed::sign(&key, &greeting());
        assert_eq!(signed.verify().unwrap(), greeting());
        assert_eq!(signed.verify_by(&key.hotkey()).unwrap(), greeting());
        let verifier = key.hotkey().verifier().unwrap();
        assert_eq!(signed.verify_with(&verifier).unwrap(), greeting());
        let stranger = SecretKey::from_seed(&[2; 32]).hotkey();
        assert!(matches!(
            signed.verify_with(&stranger.verifier().unwrap()),
            Err(VerifyError::WrongSigner { .. })
        ));
        // Survives a trip over the wire.
        let wire = to_bytes(&signed);
        let back: Signed<Greeting> = from_bytes_exact(&wire).unwrap();
        assert_eq!(back.verify().unwrap(), greeting());
    }

    #[test]
    fn wrong_domain_is_rejected() {
        let key = SecretKey::from_seed(&[1; 32]);
        let signed = Signed::sign(&key, &greeting());
        // Same bytes, same signature, read as another purpose with an identical layout.
        let moved: Signed<OtherPurpose> = Signed::from_parts(
            signed.bytes().to_vec(),
            *signed.signer(),
            *signed.signature(),
        );
        assert!(matches!(
            moved.verify(),
            Err(VerifyError::BadSignature {
                source: SignatureError::Invalid,
                ..
            })
        ));
    }

    #[test]
    fn every_tampered_byte_is_rejected() {
        let key = SecretKey::from_seed(&[1; 32]);
        let signed = Signed::sign(&key, &greeting());
        for i in 0..signed.bytes().len() {
            let mut bytes = signed.bytes().to_vec();
            bytes[i] ^= 0x01;
            let tampered: Signed<Greeting> =
                Signed::from_parts(bytes, *signed.signer(), *signed.signature());
            assert!(
                matches!(tampered.verify(), Err(VerifyError::BadSignature { .. })),
                "byte {i}"
            );
        }
        let mut signature = *signed.signature().as_bytes();
        signature[10] ^= 0x80;
        let tampered: Signed<Greeting> = Signed::from_parts(
            signed.bytes().to_vec(),
            *signed.signer(),
            Signature::from_bytes(signature),
        );
        assert!(matches!(
            tampered.verify(),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn other_signer_is_rejected() {
        let key = SecretKey::from_seed(&[1; 32]);
        let other = SecretKey::from_seed(&[2; 32]);
        let signed = Signed::sign(&key, &greeting());
        // Claiming another signer makes the signature fail.
        let claimed: Signed<Greeting> =
            Signed::from_parts(signed.bytes().to_vec(), other.hotkey(), *signed.signature());
        assert!(matches!(
            claimed.verify(),
            Err(VerifyError::BadSignature { .. })
        ));
        // A valid signature by someone else is not the signature we required.
        assert_eq!(
            signed.verify_by(&other.hotkey()),
            Err(VerifyError::WrongSigner {
                expected: other.hotkey(),
                actual: key.hotkey()
            })
        );
    }

    #[test]
    fn weak_key_signature_is_rejected() {
        // With the identity point as key and R = identity, s = 0, plain `verify` accepts any
        // message (weak-key forgery); `verify_strict` must not. The key cannot even be parsed as a
        // Hotkey, so the forgery cannot be expressed at all.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut forged = [0u8; 64];
        forged[0] = 1;
        let parsed: Result<Hotkey, _> = crate::codec::from_bytes_exact(&identity);
        assert!(matches!(parsed, Err(DecodeError::Postcard(_))));
        // A strong key with a small-order R component is refused by verify_strict.
        let key = SecretKey::from_seed(&[1; 32]);
        let signed = Signed::sign(&key, &greeting());
        let small_order_r: Signed<Greeting> = Signed::from_parts(
            signed.bytes().to_vec(),
            key.hotkey(),
            Signature::from_bytes(forged),
        );
        assert!(matches!(
            small_order_r.verify(),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn trailing_bytes_in_payload_are_rejected() {
        let key = SecretKey::from_seed(&[1; 32]);
        let mut bytes = to_bytes(&greeting());
        bytes.push(0);
        let signature = key.sign(Greeting::DOMAIN, &bytes);
        let signed: Signed<Greeting> = Signed::from_parts(bytes, key.hotkey(), signature);
        assert!(matches!(
            signed.verify(),
            Err(VerifyError::Decode(DecodeError::TrailingBytes(1)))
        ));
    }
}
