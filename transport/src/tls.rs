//! TLS identity: the certificate key *is* the node's ed25519 hotkey.
//!
//! Every endpoint presents one self-signed X.509 certificate made from its [`SecretKey`]. The
//! dialer names the hotkey it wants to reach in the TLS server name ([`server_name_for`]);
//! [`HotkeyServerVerifier`] accepts the server only if its certificate key is that hotkey.
//! [`HotkeyClientVerifier`] requires every client to present such a certificate too, optionally
//! restricted to one key ([`ClientPolicy::Only`], used by job endpoints). No certificate
//! authorities, no chains, TLS 1.3 only, no resumption, no 0-RTT.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use horde_protocol::{Hotkey, KeyError, SecretKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::oid_registry::{
    OID_SIG_ED25519, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE,
    OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
};

pub use horde_protocol::wire::{ALPN_BLOB, ALPN_CONTROL, ALPN_JOB};

/// How far before "now" a fresh certificate becomes valid: a peer whose clock lags ours by up to
/// an hour still accepts it. Identity rests on the key, not on the dates, so backdating is free.
pub const CERTIFICATE_VALIDITY_BACKDATE: Duration = Duration::from_secs(60 * 60);

/// How long a fresh certificate stays valid. The certificate is regenerated from the key at every
/// start, so it only has to outlive one process; a year makes expiry a non-event in practice
/// while still bounding how long a leaked certificate file could be replayed (it cannot be used
/// without the key anyway).
pub const CERTIFICATE_VALIDITY_PERIOD: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Subject common name and DNS name of every horde certificate. Peers never look at it: the key
/// is the identity.
const CERTIFICATE_NAME: &str = "horde";

/// The last instant X.509 (and rcgen) can express: 9999-12-31T23:59:59Z.
const LATEST_CERTIFICATE_SECS: u64 = 253_402_300_799;

/// Top-level label of the server names dialers use (see [`server_name_for`]).
const SERVER_NAME_SUFFIX: &str = "horde";

/// Failure building a certificate or a TLS configuration from our own key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The validity window is inverted or outside what X.509 can express (1970..=9999).
    #[error("certificate validity window is unusable: {0}")]
    Validity(&'static str),
    /// rcgen could not build or sign the certificate.
    #[error("generating the certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC needs for its initial packets.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Why a peer's certificate (or our view of it) is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerCertificateError {
    /// The peer presented no certificate, or the connection has no peer identity.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The peer presented a chain; exactly one self-signed certificate is accepted.
    #[error("the peer presented {0} certificates; exactly one is accepted")]
    Chain(usize),
    /// The DER does not parse as an X.509 certificate.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// Bytes follow the certificate's DER.
    #[error("trailing bytes after the certificate")]
    TrailingBytes,
    /// The certificate key or signature algorithm is not Ed25519.
    #[error("certificate is not an Ed25519 certificate")]
    NotEd25519,
    /// The Ed25519 key is invalid or weak.
    #[error("certificate key: {0}")]
    InvalidKey(KeyError),
    /// The certificate's `notBefore` is in the future.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The certificate's `notAfter` is in the past.
    #[error("certificate has expired")]
    Expired,
    /// The certificate is not signed by its own key.
    #[error("certificate self-signature does not verify")]
    BadSelfSignature,
    /// A critical extension we do not understand.
    #[error("unknown critical extension {0}")]
    UnknownCriticalExtension(String),
    /// The server name we dialed does not encode a hotkey.
    #[error("server name does not name a hotkey")]
    BadServerName,
    /// The server is not the hotkey we dialed.
    #[error("the peer is hotkey {actual}, not {expected} as dialed (check the HOTKEY@ADDR used)")]
    WrongHotkey {
        /// Who we meant to reach.
        expected: Hotkey,
        /// Who answered.
        actual: Hotkey,
    },
    /// The client's key is not allowed by this endpoint's [`ClientPolicy`].
    #[error("client {0:?} is not allowed on this endpoint")]
    NotAllowed(Hotkey),
}

impl From<PeerCertificateError> for rustls::Error {
    fn from(error: PeerCertificateError) -> Self {
        use PeerCertificateError as E;
        let certificate_error = match error {
            E::NoCertificate => return rustls::Error::NoCertificatesPresented,
            E::Malformed(_) | E::TrailingBytes => CertificateError::BadEncoding,
            E::NotYetValid => CertificateError::NotValidYet,
            E::Expired => CertificateError::Expired,
            E::BadSelfSignature => CertificateError::BadSignature,
            E::UnknownCriticalExtension(_) => CertificateError::UnhandledCriticalExtension,
            // Both keys in the message: the user fixes the hotkey they dialed with it.
            wrong @ E::WrongHotkey { .. } => {
                return rustls::Error::Other(rustls::OtherError(Arc::new(wrong)));
            }
            E::BadServerName => CertificateError::NotValidForName,
            E::NotAllowed(_) => CertificateError::ApplicationVerificationFailure,
            other @ (E::Chain(_) | E::NotEd25519 | E::InvalidKey(_)) => {
                CertificateError::Other(rustls::OtherError(Arc::new(other)))
            }
        };
        rustls::Error::InvalidCertificate(certificate_error)
    }
}

/// Which clients a listening endpoint accepts (all of them must still present a valid
/// certificate).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientPolicy {
    /// Any authenticated client (node endpoints).
    #[default]
    Any,
    /// Only this key (job endpoints accept only the job's client key).
    Only(Hotkey),
}

impl ClientPolicy {
    fn allows(&self, client: &Hotkey) -> bool {
        match self {
            Self::Any => true,
            Self::Only(allowed) => allowed == client,
        }
    }
}

/// The default validity window for a node certificate made at `now`.
pub fn default_validity(now: SystemTime) -> (SystemTime, SystemTime) {
    (
        now.checked_sub(CERTIFICATE_VALIDITY_BACKDATE)
            .unwrap_or(UNIX_EPOCH),
        now + CERTIFICATE_VALIDITY_PERIOD,
    )
}

/// A self-signed Ed25519 certificate whose key is `key`, valid over `validity` (`notBefore`,
/// `notAfter`).
pub fn self_signed_certificate(
    key: &SecretKey,
    validity: (SystemTime, SystemTime),
) -> Result<CertificateDer<'static>, TlsError> {
    let (not_before, not_after) = validity;
    if not_before > not_after {
        return Err(TlsError::Validity("notBefore is after notAfter"));
    }
    let pkcs8 = key.to_pkcs8_der();
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
        &rcgen::PKCS_ED25519,
    )?;
    let mut params = rcgen::CertificateParams::new(vec![CERTIFICATE_NAME.to_owned()])?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, CERTIFICATE_NAME);
    params.distinguished_name = name;
    // rcgen's date type comes from the `time` crate; adding a std `Duration` to the epoch avoids
    // depending on it directly. The range check above the addition keeps it from overflowing.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(certificate_secs(not_before)?);
    params.not_after = epoch + Duration::from_secs(certificate_secs(not_after)?);
    let certificate = params.self_signed(&key_pair)?;
    Ok(certificate.der().clone())
}

fn certificate_secs(time: SystemTime) -> Result<u64, TlsError> {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TlsError::Validity("before 1970"))?
        .as_secs();
    if secs > LATEST_CERTIFICATE_SECS {
        return Err(TlsError::Validity("after year 9999"));
    }
    Ok(secs)
}

/// The TLS server name a dialer uses to reach `hotkey`: `"{first 32 hex}.{last 32 hex}.horde"`.
///
/// A DNS label holds at most 63 characters, so the 64 hex digits are split into two labels.
pub fn server_name_for(hotkey: &Hotkey) -> ServerName<'static> {
    // Two labels of 32 lower-case hex digits and a fixed suffix always form a valid DNS name.
    let name = DnsName::try_from(server_name_string(hotkey))
        .expect("hex labels of 32 characters form a valid DNS name");
    ServerName::DnsName(name)
}

/// [`server_name_for`] as text (what quinn's `connect` takes).
pub(crate) fn server_name_string(hotkey: &Hotkey) -> String {
    let hex = hotkey.to_hex();
    format!("{}.{}.{SERVER_NAME_SUFFIX}", &hex[..32], &hex[32..])
}

/// The hotkey a server name made by [`server_name_for`] names, or `None` for any other name.
pub fn hotkey_from_server_name(name: &str) -> Option<Hotkey> {
    let mut labels = name.split('.');
    let (first, second) = (labels.next()?, labels.next()?);
    if labels.next()? != SERVER_NAME_SUFFIX || labels.next().is_some() {
        return None;
    }
    if first.len() != 32 || second.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (label, half) in [first, second].into_iter().zip(bytes.chunks_mut(16)) {
        hex_decode_label(label, half)?;
    }
    Hotkey::from_bytes(bytes).ok()
}

fn hex_decode_label(label: &str, out: &mut [u8]) -> Option<()> {
    let digits = label.as_bytes();
    for (pair, byte) in digits.chunks(2).zip(out.iter_mut()) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(*pair.get(1)?).to_digit(16)?;
        *byte = u8::try_from(high * 16 + low).ok()?;
    }
    Some(())
}

/// Critical extensions a horde certificate may carry; any other critical extension is refused
/// (RFC 5280 §4.2: a verifier must reject what it cannot process).
fn is_known_critical_extension(oid: &x509_parser::der_parser::Oid<'_>) -> bool {
    [
        OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_SUBJECT_ALT_NAME,
    ]
    .iter()
    .any(|known| known == oid)
}

/// Checks everything about a certificate except its dates and returns its key: one DER
/// certificate, nothing after it, Ed25519 key and signature, a strong key, a valid
/// self-signature, no unknown critical extension.
pub fn parse_certificate_hotkey(
    certificate: &CertificateDer<'_>,
) -> Result<Hotkey, PeerCertificateError> {
    check_certificate(certificate, None)
}

/// [`parse_certificate_hotkey`], plus the validity window checked against `now` when given.
fn check_certificate(
    certificate: &CertificateDer<'_>,
    now: Option<UnixTime>,
) -> Result<Hotkey, PeerCertificateError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| PeerCertificateError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PeerCertificateError::TrailingBytes);
    }

    let spki = parsed.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519
        || spki.algorithm.parameters.is_some()
        || spki.subject_public_key.unused_bits != 0
    {
        return Err(PeerCertificateError::NotEd25519);
    }
    let key_bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PeerCertificateError::NotEd25519)?;
    let hotkey = Hotkey::from_bytes(key_bytes).map_err(PeerCertificateError::InvalidKey)?;

    if parsed.signature_algorithm.algorithm != OID_SIG_ED25519
        || parsed.tbs_certificate.signature.algorithm != OID_SIG_ED25519
    {
        return Err(PeerCertificateError::NotEd25519);
    }
    let signature = ed25519_dalek::Signature::from_slice(&parsed.signature_value.data)
        .map_err(|_| PeerCertificateError::BadSelfSignature)?;
    hotkey
        .verifying_key()
        .map_err(PeerCertificateError::InvalidKey)?
        .verify_strict(parsed.tbs_certificate.as_ref(), &signature)
        .map_err(|_| PeerCertificateError::BadSelfSignature)?;

    if let Some(unknown) = parsed
        .extensions()
        .iter()
        .find(|extension| extension.critical && !is_known_critical_extension(&extension.oid))
    {
        return Err(PeerCertificateError::UnknownCriticalExtension(
            unknown.oid.to_id_string(),
        ));
    }

    if let Some(now) = now {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = parsed.validity();
        if now < validity.not_before.timestamp() {
            return Err(PeerCertificateError::NotYetValid);
        }
        if now > validity.not_after.timestamp() {
            return Err(PeerCertificateError::Expired);
        }
    }
    Ok(hotkey)
}

/// The checks both verifiers share: exactly one certificate, valid now.
fn verify_single_certificate(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Hotkey, PeerCertificateError> {
    if !intermediates.is_empty() {
        return Err(PeerCertificateError::Chain(1 + intermediates.len()));
    }
    check_certificate(end_entity, Some(now))
}

/// Verifies a TLS 1.3 handshake signature with the certificate's Ed25519 key (`verify_strict`).
fn verify_handshake_signature(
    message: &[u8],
    certificate: &CertificateDer<'_>,
    signed: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if signed.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let hotkey = parse_certificate_hotkey(certificate)?;
    let signature = ed25519_dalek::Signature::from_slice(signed.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    hotkey
        .verifying_key()
        .map_err(PeerCertificateError::InvalidKey)?
        .verify_strict(message, &signature)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn refuse_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is never accepted".to_owned())
}

/// The dialer's verifier: the server's one Ed25519 certificate must carry the hotkey named in the
/// server name we dialed ([`server_name_for`]).
#[derive(Debug, Clone, Default)]
pub struct HotkeyServerVerifier(());

impl HotkeyServerVerifier {
    /// The verifier (it has no configuration: the expected key travels in the server name).
    pub fn new() -> Self {
        Self(())
    }
}

impl ServerCertVerifier for HotkeyServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => hotkey_from_server_name(name.as_ref()),
            _ => None,
        }
        .ok_or(PeerCertificateError::BadServerName)?;
        let actual = verify_single_certificate(end_entity, intermediates, now)?;
        if actual != expected {
            return Err(PeerCertificateError::WrongHotkey { expected, actual }.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, certificate, signed)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The listener's verifier: every client must present one Ed25519 certificate, allowed by the
/// endpoint's [`ClientPolicy`].
#[derive(Debug, Clone, Default)]
pub struct HotkeyClientVerifier {
    policy: ClientPolicy,
}

impl HotkeyClientVerifier {
    /// A verifier enforcing `policy`.
    pub fn new(policy: ClientPolicy) -> Self {
        Self { policy }
    }
}

impl ClientCertVerifier for HotkeyClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let client = verify_single_certificate(end_entity, intermediates, now)?;
        if !self.policy.allows(&client) {
            return Err(PeerCertificateError::NotAllowed(client).into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, certificate, signed)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The ring provider, named explicitly so no process-wide default is ever consulted, with
/// TLS 1.3's AES-128-GCM suite preferred (ring's default order puts AES-256-GCM first; both ends
/// are horde, so the first is what every connection uses). AES-128 runs 10 rounds per block
/// against AES-256's 14, and QUIC pays them per packet: on every byte (AEAD) and once more per
/// packet for header protection. At 1,452-byte packets (a 1,500-byte MTU path) bare quinn with
/// horde's config used 3.30 CPU s/GB for both ends against 3.95 with AES-256 (-16 %), 4.55
/// against 3.75 Gbit/s (`BLOB_BENCH_MAX_UDP_PAYLOAD=1452 blob-throughput --only quinn`,
/// benches/RESULTS.md). AES-128-GCM is one of TLS 1.3's mandatory suites and what QUIC's
/// Initial packets use anyway; the other suites stay offered after it.
fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: AES-128-GCM first, the others in ring's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn private_key(key: &SecretKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_pkcs8_der().to_vec()))
}

/// The rustls server configuration of a listener: TLS 1.3 only, presents `certificate` (made from
/// `key`), requires a client certificate allowed by `policy`, negotiates one of `alpns` (a client
/// offering none of them is refused), no session tickets, no 0-RTT.
pub fn server_tls_config(
    key: &SecretKey,
    certificate: CertificateDer<'static>,
    alpns: &[Vec<u8>],
    policy: ClientPolicy,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(HotkeyClientVerifier::new(policy)))
        .with_single_cert(vec![certificate], private_key(key))?;
    config.alpn_protocols = alpns.to_vec();
    // Resumption would skip certificate verification on later connections; 0-RTT data is
    // replayable. Neither is worth it for long-lived peer connections.
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// The rustls client configuration of a dialer: TLS 1.3 only, offers `alpn`, presents
/// `certificate` (made from `key`), verifies the server with [`HotkeyServerVerifier`], no
/// resumption, no 0-RTT.
pub fn client_tls_config(
    key: &SecretKey,
    certificate: CertificateDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HotkeyServerVerifier::new()))
        .with_client_auth_cert(vec![certificate], private_key(key))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

/// The hotkey of the peer of an established connection (its one certificate's key).
pub fn remote_hotkey(connection: &quinn::Connection) -> Result<Hotkey, PeerCertificateError> {
    let identity = connection
        .peer_identity()
        .ok_or(PeerCertificateError::NoCertificate)?;
    let certificates = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerCertificateError::NoCertificate)?;
    match certificates.as_slice() {
        [one] => certificate_key(one),
        [] => Err(PeerCertificateError::NoCertificate),
        chain => Err(PeerCertificateError::Chain(chain.len())),
    }
}

/// The Ed25519 key of a certificate the handshake already verified (rustls exposes a peer's
/// certificate only after our verifier accepted it, self-signature and dates included), so it is
/// read without checking the signature again: this runs once per tunnel stream.
fn certificate_key(certificate: &CertificateDer<'_>) -> Result<Hotkey, PeerCertificateError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| PeerCertificateError::Malformed(e.to_string()))?;
    let spki = parsed.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(PeerCertificateError::NotEd25519);
    }
    let key_bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PeerCertificateError::NotEd25519)?;
    Hotkey::from_bytes(key_bytes).map_err(PeerCertificateError::InvalidKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::seeded_key;

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn node_certificate(key: &SecretKey) -> CertificateDer<'static> {
        self_signed_certificate(key, default_validity(SystemTime::now())).unwrap()
    }

    fn ecdsa_certificate() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["horde".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verify_as_server(
        certificate: &CertificateDer<'_>,
        expected: &Hotkey,
    ) -> Result<ServerCertVerified, rustls::Error> {
        HotkeyServerVerifier::new().verify_server_cert(
            certificate,
            &[],
            &server_name_for(expected),
            &[],
            now(),
        )
    }

    fn other_error(error: rustls::Error) -> PeerCertificateError {
        match error {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<PeerCertificateError>() {
                    Some(PeerCertificateError::Chain(n)) => PeerCertificateError::Chain(*n),
                    Some(PeerCertificateError::NotEd25519) => PeerCertificateError::NotEd25519,
                    Some(e) => panic!("unexpected inner error {e}"),
                    None => panic!("not ours: {other}"),
                }
            }
            e => panic!("unexpected error {e:?}"),
        }
    }

    #[test]
    fn connections_negotiate_aes_128_gcm() {
        let (server_key, client_key) = (seeded_key(5), seeded_key(6));
        let server_config = server_tls_config(
            &server_key,
            node_certificate(&server_key),
            &[ALPN_JOB.to_vec()],
            ClientPolicy::Any,
        )
        .unwrap();
        let client_config =
            client_tls_config(&client_key, node_certificate(&client_key), ALPN_JOB).unwrap();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_config),
            server_name_for(&server_key.hotkey()),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        for _ in 0..8 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut flight = Vec::new();
            client.write_tls(&mut flight).unwrap();
            server.read_tls(&mut flight.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut flight = Vec::new();
            server.write_tls(&mut flight).unwrap();
            client.read_tls(&mut flight.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.unwrap().suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            );
        }
    }

    #[test]
    fn certificate_carries_the_hotkey() {
        let key = seeded_key(1);
        let certificate = node_certificate(&key);
        assert_eq!(parse_certificate_hotkey(&certificate), Ok(key.hotkey()));
        assert!(verify_as_server(&certificate, &key.hotkey()).is_ok());
    }

    #[test]
    fn server_name_round_trip() {
        let hotkey = seeded_key(3).hotkey();
        let ServerName::DnsName(name) = server_name_for(&hotkey) else {
            panic!("not a DNS name");
        };
        let text = name.as_ref().to_owned();
        let labels: Vec<&str> = text.split('.').collect();
        assert_eq!(labels.len(), 3);
        assert!(labels[..2].iter().all(|label| label.len() == 32));
        assert_eq!(hotkey_from_server_name(&text), Some(hotkey));
        assert_eq!(hotkey_from_server_name(&text.to_uppercase()), None);
        assert_eq!(hotkey_from_server_name("example.com"), None);
        assert_eq!(hotkey_from_server_name(&format!("{text}.evil")), None);
        assert_eq!(
            hotkey_from_server_name(&text.replace(".horde", ".other")),
            None
        );
        let bad_digit = format!("g{}", &text[1..]);
        assert_eq!(hotkey_from_server_name(&bad_digit), None);
    }

    #[test]
    fn wrong_hotkey_is_refused() {
        let certificate = node_certificate(&seeded_key(1));
        let err = verify_as_server(&certificate, &seeded_key(2).hotkey()).unwrap_err();
        assert!(matches!(err, rustls::Error::Other(_)), "{err:?}");
        // The message names both keys, in full, so the user can fix the one they dialed.
        let message = err.to_string();
        assert!(
            message.contains(&seeded_key(1).hotkey().to_string())
                && message.contains(&seeded_key(2).hotkey().to_string()),
            "{message}"
        );
    }

    #[test]
    fn ecdsa_certificates_are_refused_both_ways() {
        let certificate = ecdsa_certificate();
        assert_eq!(
            parse_certificate_hotkey(&certificate),
            Err(PeerCertificateError::NotEd25519)
        );
        let err = verify_as_server(&certificate, &seeded_key(1).hotkey()).unwrap_err();
        assert_eq!(other_error(err), PeerCertificateError::NotEd25519);
        let err = HotkeyClientVerifier::default()
            .verify_client_cert(&certificate, &[], now())
            .unwrap_err();
        assert_eq!(other_error(err), PeerCertificateError::NotEd25519);
    }

    #[test]
    fn chains_are_refused() {
        let certificate = node_certificate(&seeded_key(1));
        let err = HotkeyServerVerifier::new()
            .verify_server_cert(
                &certificate,
                std::slice::from_ref(&certificate),
                &server_name_for(&seeded_key(1).hotkey()),
                &[],
                now(),
            )
            .unwrap_err();
        assert_eq!(other_error(err), PeerCertificateError::Chain(2));
        let err = HotkeyClientVerifier::default()
            .verify_client_cert(&certificate, std::slice::from_ref(&certificate), now())
            .unwrap_err();
        assert_eq!(other_error(err), PeerCertificateError::Chain(2));
    }

    #[test]
    fn validity_window_is_checked() {
        let key = seeded_key(1);
        let day = Duration::from_secs(24 * 60 * 60);
        let now_time = SystemTime::now();
        let expired = self_signed_certificate(&key, (now_time - 2 * day, now_time - day)).unwrap();
        let future = self_signed_certificate(&key, (now_time + day, now_time + 2 * day)).unwrap();
        let verifier = HotkeyClientVerifier::default();
        assert_eq!(
            verifier
                .verify_client_cert(&expired, &[], now())
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::Expired)
        );
        assert_eq!(
            verifier
                .verify_client_cert(&future, &[], now())
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
        );
        // Dates do not matter for reading the identity of an established connection.
        assert_eq!(parse_certificate_hotkey(&expired), Ok(key.hotkey()));
        assert!(matches!(
            self_signed_certificate(&key, (now_time, now_time - day)),
            Err(TlsError::Validity(_))
        ));
        assert!(matches!(
            self_signed_certificate(
                &key,
                (UNIX_EPOCH, UNIX_EPOCH + Duration::from_secs(u64::MAX / 4))
            ),
            Err(TlsError::Validity(_))
        ));
    }

    #[test]
    fn tampered_certificate_fails_self_signature() {
        let key = seeded_key(1);
        let mut der = node_certificate(&key).to_vec();
        // Flip a bit in the last byte: the end of the signature value.
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(
            parse_certificate_hotkey(&CertificateDer::from(der)),
            Err(PeerCertificateError::BadSelfSignature)
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut der = node_certificate(&seeded_key(1)).to_vec();
        der.push(0);
        assert_eq!(
            parse_certificate_hotkey(&CertificateDer::from(der)),
            Err(PeerCertificateError::TrailingBytes)
        );
        assert!(matches!(
            parse_certificate_hotkey(&CertificateDer::from(vec![0x30, 0x03, 0x01])),
            Err(PeerCertificateError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_critical_extension_is_refused() {
        let key = seeded_key(1);
        let pkcs8 = key.to_pkcs8_der();
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
            &rcgen::PKCS_ED25519,
        )
        .unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["horde".to_owned()]).unwrap();
        let mut extension =
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        extension.set_criticality(true);
        params.custom_extensions.push(extension);
        let certificate = params.self_signed(&key_pair).unwrap().der().clone();
        assert_eq!(
            parse_certificate_hotkey(&certificate),
            Err(PeerCertificateError::UnknownCriticalExtension(
                "1.3.6.1.4.1.99999.1".to_owned()
            ))
        );
    }

    #[test]
    fn handshake_signatures_are_checked() {
        let key = seeded_key(1);
        let certificate = node_certificate(&key);
        let other = node_certificate(&seeded_key(2));
        let message = b"transcript hash";
        let signing = ed25519_dalek::SigningKey::from_bytes(&key.seed());
        let signature = ed25519_dalek::Signer::sign(&signing, message).to_bytes();
        let encoded = {
            // DigitallySignedStruct has no public constructor: decode its wire form
            // (scheme u16, length u16, signature).
            let mut bytes = vec![0x08, 0x07, 0x00, 0x40];
            bytes.extend_from_slice(&signature);
            bytes
        };
        let signed = decode_dss(&encoded);
        let verifier = HotkeyServerVerifier::new();
        assert!(
            verifier
                .verify_tls13_signature(message, &certificate, &signed)
                .is_ok()
        );
        assert_eq!(
            verifier
                .verify_tls13_signature(message, &other, &signed)
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        assert_eq!(
            verifier
                .verify_tls13_signature(b"other transcript", &certificate, &signed)
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        assert!(
            verifier
                .verify_tls12_signature(message, &certificate, &signed)
                .is_err()
        );
        let mut ecdsa_scheme = encoded.clone();
        ecdsa_scheme[..2].copy_from_slice(&[0x04, 0x03]);
        assert!(
            HotkeyClientVerifier::default()
                .verify_tls13_signature(message, &certificate, &decode_dss(&ecdsa_scheme))
                .is_err()
        );
        assert_eq!(
            verifier.supported_verify_schemes(),
            vec![SignatureScheme::ED25519]
        );
    }

    fn decode_dss(bytes: &[u8]) -> DigitallySignedStruct {
        use rustls::internal::msgs::codec::{Codec as _, Reader};
        DigitallySignedStruct::read(&mut Reader::init(bytes)).unwrap()
    }

    #[test]
    fn client_policy_only_allows_one_key() {
        let allowed = seeded_key(1);
        let verifier = HotkeyClientVerifier::new(ClientPolicy::Only(allowed.hotkey()));
        assert!(
            verifier
                .verify_client_cert(&node_certificate(&allowed), &[], now())
                .is_ok()
        );
        let other = seeded_key(2);
        assert_eq!(
            verifier
                .verify_client_cert(&node_certificate(&other), &[], now())
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        );
        assert!(verifier.client_auth_mandatory());
        assert!(verifier.root_hint_subjects().is_empty());
    }
}
