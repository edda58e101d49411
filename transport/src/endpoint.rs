//! [`HordeEndpoint`]: a quinn endpoint bound to our key, dialing peers by hotkey and accepting a
//! bounded number of authenticated connections.
//!
//! Incoming connections are handled by a background task: each one takes a permit from a
//! semaphore of `max_connections` (refused with `CONNECTION_REFUSED` when none is left), runs its
//! handshake in its own task under [`HANDSHAKE_TIMEOUT`] (so one slow handshake never delays
//! another), and is handed to [`HordeEndpoint::accept`] through a bounded queue. The permit is
//! released when the connection closes. Once half the permits are taken, a source whose address
//! is not validated yet gets a stateless Retry first, so floods of Initials from spoofed or
//! silent sources cannot hold the permits for a handshake timeout each.
//!
//! Once the handshake has told us the client's hotkey, the connection also takes a
//! [`PeerQuota`] permit: one key holds at most `max_connections_per_peer` connections at once, so
//! it cannot take every slot; an extra one is closed with [`codes::TOO_MANY_CONNECTIONS`] and
//! never reaches [`HordeEndpoint::accept`].
//!
//! With [`AdmissionLimits`] ([`EndpointConfig::with_admission`]), keys the endpoint does not know
//! ([`HordeEndpoint::set_known_keys`]) are bounded per source address and in total, and an
//! unknown key's connection that opens no stream soon after its handshake is closed (see
//! `admission.rs`).
//!
//! Stateless-reset tokens and connection ids of an endpoint on a fixed port are keyed by the
//! node's identity and that port, so a node restarted with its key on its port resets its peers'
//! stale connections at once (RFC 9000 §10.3); an ephemeral port gets random keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use horde_protocol::{Hotkey, NodeAddr, SecretKey};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportErrorCode, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::admission::{AddressSlot, Admission, AdmissionLimits, KnownKeys};
use crate::codes;
use crate::peer_quota::{PeerPermit, PeerQuota};
use crate::tls::{
    ClientPolicy, PeerCertificateError, TlsError, client_tls_config, default_validity,
    remote_hotkey, self_signed_certificate, server_name_string, server_tls_config,
};

/// How long a handshake may take, dialing or accepting. Loopback and LAN handshakes take
/// milliseconds and intercontinental ones a few hundred; ten seconds leaves room for loss and
/// retransmission while bounding how long a silent peer holds a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Worst-case memory the default connection cap may commit to receive buffers: 4 GiB, a sixth
/// of the 24 GiB machines this runs on, leaving the rest to the node, its jobs and the OS.
pub const RECEIVE_BUFFER_BUDGET: u64 = 4 << 30;

/// Default cap on concurrent incoming connections (handshaking or established), derived from
/// memory: every connection may hold up to [`RECEIVE_WINDOW`] of unread data, so the cap is
/// [`RECEIVE_BUFFER_BUDGET`] / [`RECEIVE_WINDOW`] = 4 GiB / 32 MiB = 128. In practice a node
/// talks to a few dozen peers, and a client runs all its jobs on one connection.
pub const DEFAULT_MAX_CONNECTIONS: usize = (RECEIVE_BUFFER_BUDGET / RECEIVE_WINDOW) as usize;

/// Default cap on concurrent incoming connections from one hotkey: 16, an eighth of
/// [`DEFAULT_MAX_CONNECTIONS`], so at least eight keys are needed to fill an endpoint. Roles keep
/// one connection per peer and protocol (a few per key), and a job client shares one connection
/// for all its jobs; each client process (every `horde job` or `horde blob` command) holds its
/// own until it exits, so a facilitator whose users run more such commands at once under one
/// key raises it (`max_connections_per_peer` in the node config). A job endpoint, which admits
/// exactly one client key, sets it to its whole cap.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 16;

/// Per-stream receive window: 8 MiB. One blob or tunnel stream on its own can fill a 1 Gbit/s
/// link at 64 ms RTT (8 MiB / 64 ms ≈ 1 Gbit/s), or ≥ 60 Gbit/s on a 1 ms loopback.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Connection-level receive window: 32 MiB. quinn's default is unbounded; this caps what one peer
/// can make us buffer (256 streams × 8 MiB would be 2 GiB) while letting four streams run at full
/// per-stream speed at once.
pub const RECEIVE_WINDOW: u64 = 32 * 1024 * 1024;

/// Send window: 32 MiB of unacknowledged data per connection, matching the peer's receive window
/// so a bulk sender is never the bottleneck, and bounding our own buffering per connection.
pub const SEND_WINDOW: u64 = 32 * 1024 * 1024;

/// Concurrent bidirectional streams a peer may open: 256. One job session is one stream per hop,
/// so this is how many jobs can share one connection (plus blob/tunnel streams); each stream costs
/// a few hundred bytes of state until data arrives.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 256;

/// Concurrent unidirectional streams a peer may open: none — horde only uses bidirectional
/// streams, so a peer opening unidirectional ones is refused at the flow-control level.
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 0;

/// Idle timeout: 10 s. Keep-alives (below) keep healthy idle connections open; a peer that
/// vanishes is detected within this time plus one [`KEEP_ALIVE_INTERVAL`] (the first keep-alive
/// sent after the last packet received restarts the timer, RFC 9000 §10.1), which bounds how
/// long a dead hop stalls a job.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alive interval: 3 s, well under the idle timeout so two lost keep-alives in a row still do
/// not close a healthy connection.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);

/// Incoming connection attempts quinn queues before we look at them: our accept task answers each
/// at once (accept or refuse), so this only absorbs bursts. Beyond it quinn refuses by itself.
const MAX_INCOMING: usize = 256;

/// Once no more than 1/this of the connection slots are free (half), an incoming connection
/// from an address not yet validated is sent a Retry first (RFC 9000 §8.1.2).
const RETRY_BELOW_FREE_DIVISOR: usize = 2;

/// IncomingConnection connections waiting for [`HordeEndpoint::accept`]. Small: the application should
/// accept promptly; a full queue holds back handshaken connections (each holding its permit).
const ACCEPT_QUEUE: usize = 16;

/// Flow-control and liveness settings for every connection of an endpoint. The defaults are the
/// documented constants of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportTuning {
    /// Per-stream receive window in bytes.
    pub stream_receive_window: u32,
    /// Connection-level receive window in bytes.
    pub receive_window: u64,
    /// Unacknowledged bytes we buffer per connection.
    pub send_window: u64,
    /// Bidirectional streams a peer may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// Unidirectional streams a peer may have open at once.
    pub max_concurrent_uni_streams: u32,
    /// A connection silent this long is closed.
    pub max_idle_timeout: Duration,
    /// How often an otherwise idle connection sends a keep-alive (must be below the idle timeout).
    pub keep_alive_interval: Duration,
    /// The largest UDP payload MTU discovery tries (and we accept), bytes; at least 1,200.
    pub max_udp_payload: u16,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            stream_receive_window: STREAM_RECEIVE_WINDOW,
            receive_window: RECEIVE_WINDOW,
            send_window: SEND_WINDOW,
            max_concurrent_bidi_streams: MAX_CONCURRENT_BIDI_STREAMS,
            max_concurrent_uni_streams: MAX_CONCURRENT_UNI_STREAMS,
            max_idle_timeout: MAX_IDLE_TIMEOUT,
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            max_udp_payload: crate::udp::MAX_UDP_PAYLOAD,
        }
    }
}

/// An endpoint configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is outside what QUIC can encode.
    #[error("{0} is out of range for QUIC")]
    OutOfRange(&'static str),
    /// The keep-alive interval is not below the idle timeout: idle connections would close.
    #[error("keep-alive interval {keep_alive:?} must be below the idle timeout {idle:?}")]
    KeepAliveTooLong {
        /// The keep-alive interval.
        keep_alive: Duration,
        /// The idle timeout.
        idle: Duration,
    },
    /// No ALPN configured, or `max_connections` or `max_connections_per_peer` is zero.
    #[error("invalid endpoint configuration: {0}")]
    Invalid(&'static str),
    /// The certificate or TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread or runtime of an endpoint served on a thread of its own could not be started.
    #[error("starting the endpoint's thread: {0}")]
    Thread(std::io::Error),
}

/// The one place connection tuning becomes a quinn [`quinn::TransportConfig`].
pub fn transport_config(tuning: &TransportTuning) -> Result<quinn::TransportConfig, ConfigError> {
    if tuning.keep_alive_interval >= tuning.max_idle_timeout {
        return Err(ConfigError::KeepAliveTooLong {
            keep_alive: tuning.keep_alive_interval,
            idle: tuning.max_idle_timeout,
        });
    }
    let receive_window = VarInt::from_u64(tuning.receive_window)
        .map_err(|_| ConfigError::OutOfRange("receive_window"))?;
    let idle = IdleTimeout::try_from(tuning.max_idle_timeout)
        .map_err(|_| ConfigError::OutOfRange("max_idle_timeout"))?;
    let mut config = quinn::TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(tuning.stream_receive_window))
        .receive_window(receive_window)
        .send_window(tuning.send_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(tuning.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(tuning.max_concurrent_uni_streams))
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(tuning.keep_alive_interval))
        // No datagrams: everything horde sends needs reliability and ordering.
        .datagram_receive_buffer_size(None);
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(tuning.max_udp_payload);
    config.mtu_discovery_config(Some(mtu_discovery));
    Ok(config)
}

/// What a [`HordeEndpoint`] binds to and accepts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// UDP address to bind.
    pub bind: SocketAddr,
    /// ALPNs accepted from clients; a client offering none of them is refused in the handshake.
    pub alpns: Vec<Vec<u8>>,
    /// Which client keys are accepted.
    pub client_policy: ClientPolicy,
    /// Cap on concurrent incoming connections (handshaking or established).
    pub max_connections: usize,
    /// Cap on concurrent established incoming connections from one hotkey.
    pub max_connections_per_peer: usize,
    /// Flow control and liveness.
    pub transport: TransportTuning,
    /// What keys the endpoint does not know may hold (`None`: every key is treated alike).
    pub admission: Option<AdmissionLimits>,
}

impl EndpointConfig {
    /// A configuration accepting any client on `alpns`, with the default limits.
    pub fn new(bind: SocketAddr, alpns: &[&[u8]]) -> Self {
        Self {
            bind,
            alpns: alpns.iter().map(|alpn| alpn.to_vec()).collect(),
            client_policy: ClientPolicy::Any,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            transport: TransportTuning::default(),
            admission: None,
        }
    }

    /// Bounds what unknown keys may hold (see `admission.rs`); the known keys are given later
    /// with [`HordeEndpoint::set_known_keys`] (until then, no key is known).
    pub fn with_admission(mut self, limits: AdmissionLimits) -> Self {
        self.admission = Some(limits);
        self
    }

    /// Sets the client policy.
    pub fn with_client_policy(mut self, policy: ClientPolicy) -> Self {
        self.client_policy = policy;
        self
    }

    /// Sets the cap on concurrent incoming connections.
    pub fn with_max_connections(mut self, max_connections: usize) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// Sets the cap on concurrent incoming connections from one hotkey.
    pub fn with_max_connections_per_peer(mut self, max_connections_per_peer: usize) -> Self {
        self.max_connections_per_peer = max_connections_per_peer;
        self
    }

    /// Sets the transport tuning.
    pub fn with_transport(mut self, transport: TransportTuning) -> Self {
        self.transport = transport;
        self
    }
}

/// Dialing a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// quinn refused to start the connection (bad address, endpoint closed, …).
    #[error("cannot dial {addr}: {source}")]
    Dial {
        /// The address dialed.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// We refused the peer in the TLS handshake: wrong hotkey, bad or expired certificate, ….
    #[error("refused the peer's TLS identity (alert {alert}): {reason}")]
    TlsRejected {
        /// The TLS alert we sent.
        alert: u8,
        /// rustls's description of the failure.
        reason: String,
    },
    /// The peer refused us in the TLS handshake: our certificate, our key is not allowed, no
    /// common ALPN (alert 120), ….
    #[error("the peer refused the TLS handshake (alert {alert}): {reason}")]
    TlsRejectedByPeer {
        /// The TLS alert the peer sent.
        alert: u8,
        /// The peer's reason text, if any.
        reason: String,
    },
    /// The peer refused the connection before the handshake (at capacity or shutting down).
    #[error("the peer refused the connection")]
    Refused,
    /// The handshake did not finish in time.
    #[error("handshake did not complete within {0:?}")]
    TimedOut(Duration),
    /// The handshake finished but the peer's identity could not be confirmed.
    #[error("peer identity: {0}")]
    Identity(PeerCertificateError),
    /// Our own TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Any other connection failure (network unreachable, idle timeout, protocol error).
    #[error("connection failed: {0}")]
    Connection(ConnectionError),
    /// The node's address lists no socket address to dial.
    #[error("the node lists no address")]
    NoAddress,
}

impl ConnectError {
    /// Classifies a quinn connection error: TLS refusals by either side, refused connections,
    /// and everything else.
    pub fn from_connection_error(error: ConnectionError) -> Self {
        match error {
            ConnectionError::TransportError(ref transport) => match crypto_alert(transport.code) {
                Some(alert) => Self::TlsRejected {
                    alert,
                    reason: transport.reason.clone(),
                },
                None => Self::Connection(error),
            },
            ConnectionError::ConnectionClosed(ref close) => {
                if let Some(alert) = crypto_alert(close.error_code) {
                    Self::TlsRejectedByPeer {
                        alert,
                        reason: String::from_utf8_lossy(&close.reason).into_owned(),
                    }
                } else if close.error_code == TransportErrorCode::CONNECTION_REFUSED {
                    Self::Refused
                } else {
                    Self::Connection(error)
                }
            }
            other => Self::Connection(other),
        }
    }

    /// The TLS alert of a TLS refusal by either side.
    pub fn tls_alert(&self) -> Option<u8> {
        match self {
            Self::TlsRejected { alert, .. } | Self::TlsRejectedByPeer { alert, .. } => Some(*alert),
            _ => None,
        }
    }
}

/// QUIC carries TLS alerts as transport error codes `0x100 + alert` (RFC 9001 §4.8).
fn crypto_alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    code.checked_sub(0x100)
        .and_then(|alert| u8::try_from(alert).ok())
}

/// An incoming connection that did not become usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The handshake failed (our verifier refused the client, the client refused us, no common
    /// ALPN, network failure).
    #[error("handshake with {remote} failed: {source}")]
    Handshake {
        /// The client's address.
        remote: SocketAddr,
        /// What happened, classified like a dial failure.
        source: ConnectError,
    },
    /// The handshake did not finish in time.
    #[error("handshake with {remote} timed out")]
    TimedOut {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The handshake finished without a readable identity or ALPN.
    #[error("connection from {remote}: {source}")]
    Identity {
        /// The client's address.
        remote: SocketAddr,
        /// Why.
        source: PeerCertificateError,
    },
    /// The handshake finished without negotiating an ALPN.
    #[error("connection from {remote} negotiated no ALPN")]
    NoAlpn {
        /// The client's address.
        remote: SocketAddr,
    },
}

impl AcceptError {
    /// The TLS alert, if the handshake failed with one.
    pub fn tls_alert(&self) -> Option<u8> {
        match self {
            Self::Handshake { source, .. } => source.tls_alert(),
            _ => None,
        }
    }
}

/// An authenticated incoming connection, as [`HordeEndpoint::accept`] and the
/// accept loop hand it over.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IncomingConnection {
    /// The connection.
    pub connection: quinn::Connection,
    /// The peer's hotkey (its certificate key, verified in the handshake).
    pub peer: Hotkey,
    /// The ALPN the peer chose.
    pub alpn: Vec<u8>,
}

/// A QUIC endpoint with our identity: it dials hotkeys and accepts authenticated connections.
///
/// Dropping it stops accepting; established connections live until closed (see
/// [`HordeEndpoint::close`]).
pub struct HordeEndpoint {
    endpoint: quinn::Endpoint,
    key: SecretKey,
    certificate: CertificateDer<'static>,
    transport: Arc<quinn::TransportConfig>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_peer: Arc<PeerQuota>,
    admission: Option<Arc<Admission>>,
    accepted: Mutex<mpsc::Receiver<Result<IncomingConnection, AcceptError>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for HordeEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HordeEndpoint")
            .field("hotkey", &self.key.hotkey())
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("incoming_connections", &self.incoming_connections())
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.per_peer.max_per_peer())
            .finish_non_exhaustive()
    }
}

/// The key of our stateless-reset tokens, derived from the node's identity key and its port so
/// that it is the same after a restart: a node restarted with its key on its port answers
/// packets of the connections it has forgotten with a stateless reset its peers accept (RFC 9000
/// §10.3), and they drop those connections at once rather than after the idle timeout. A keyed
/// BLAKE3 MAC under a key derived for this purpose only.
struct ResetKey([u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    fn derive(key: &SecretKey, port: u16) -> Self {
        Self(derive_endpoint_key(
            "horde 2026 QUIC stateless reset key",
            key,
            port,
        ))
    }
}

/// A key for `purpose`, derived from the node's secret key and the endpoint's UDP port.
fn derive_endpoint_key(purpose: &str, key: &SecretKey, port: u16) -> [u8; 32] {
    *blake3::Hasher::new_derive_key(purpose)
        .update(key.seed().as_slice())
        .update(&port.to_be_bytes())
        .finalize()
        .as_bytes()
}

/// The key our connection ids are made (and recognized) with, derived from the node's identity
/// and port like [`ResetKey`]: a restarted node must recognize its old connection ids as its own to
/// answer them with a stateless reset (quinn drops packets whose id it did not make).
fn connection_id_key(key: &SecretKey, port: u16) -> u64 {
    let derived = derive_endpoint_key("horde 2026 QUIC connection id key", key, port);
    let mut first = [0u8; 8];
    first.copy_from_slice(&derived[..8]);
    u64::from_le_bytes(first)
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = blake3::keyed_hash(&self.0, data);
        let len = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..len].copy_from_slice(&tag.as_bytes()[..len]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        // `Hash == [u8]` compares in constant time.
        if blake3::keyed_hash(&self.0, data) == *signature {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

impl HordeEndpoint {
    /// Binds a UDP socket and starts accepting. Must be called inside a tokio runtime.
    pub fn bind(key: &SecretKey, config: EndpointConfig) -> Result<Self, ConfigError> {
        if config.alpns.is_empty() {
            return Err(ConfigError::Invalid("no ALPN configured"));
        }
        if config.max_connections == 0 {
            return Err(ConfigError::Invalid("max_connections is zero"));
        }
        if config.max_connections_per_peer == 0 {
            return Err(ConfigError::Invalid("max_connections_per_peer is zero"));
        }
        let transport = Arc::new(transport_config(&config.transport)?);
        let certificate = self_signed_certificate(key, default_validity(SystemTime::now()))?;
        let tls = server_tls_config(
            key,
            certificate.clone(),
            &config.alpns,
            config.client_policy.clone(),
        )?;
        let quic = QuicServerConfig::try_from(tls).map_err(TlsError::from)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server
            .transport_config(Arc::clone(&transport))
            .migration(false)
            .max_incoming(MAX_INCOMING);
        let bind_error = |source| ConfigError::Bind {
            addr: config.bind,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.bind).map_err(bind_error)?;
        // A relay's answers arrive here (nothing unless this process spins: `spin::enable`).
        crate::spin::watch(&socket);
        // Keys that survive a restart: a node comes back on its port (a port 0 bind is kept and
        // reused from the node's second start on), so the keys come from the port actually
        // bound, the first start's included; otherwise a node killed in its first run could not
        // reset its peers' old connections and they would wait out the idle timeout. Two
        // endpoints of one identity on different ports (two clients of one account) must not be
        // able to reset each other's connections (RFC 9000 §10.3.1), so the port is part of the
        // derivation.
        let port = socket.local_addr().map_err(bind_error)?.port();
        let mut endpoint_config = quinn::EndpointConfig::default();
        (endpoint_config.max_udp_payload_size(config.transport.max_udp_payload))
            .map_err(|_| ConfigError::OutOfRange("max_udp_payload_size"))?;
        endpoint_config.reset_key(Arc::new(ResetKey::derive(key, port)));
        let cid_key = connection_id_key(key, port);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = crate::udp::BoundedGsoSocket::wrap(socket).map_err(bind_error)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;

        let connections = Arc::new(Semaphore::new(config.max_connections));
        let per_peer = Arc::new(PeerQuota::new(config.max_connections_per_peer));
        let admission = config
            .admission
            .clone()
            .map(|l| Arc::new(Admission::new(l)));
        let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE);
        let acceptor = tokio::spawn(accept_loop(
            endpoint.clone(),
            Limits {
                connections: Arc::clone(&connections),
                max_connections: config.max_connections,
                per_peer: Arc::clone(&per_peer),
                admission: admission.clone(),
            },
            sender,
        ));
        Ok(Self {
            endpoint,
            key: key.clone(),
            certificate,
            transport,
            connections,
            max_connections: config.max_connections,
            per_peer,
            admission,
            accepted: Mutex::new(receiver),
            acceptor,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Our identity.
    pub fn hotkey(&self) -> Hotkey {
        self.key.hotkey()
    }

    /// Incoming connections currently holding a slot (handshaking or established).
    pub fn incoming_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// Established incoming connections from `peer` (each counts against its
    /// `max_connections_per_peer`).
    pub fn incoming_connections_from(&self, peer: &Hotkey) -> usize {
        self.per_peer.held_by(peer)
    }

    /// Tells an endpoint with [`AdmissionLimits`] which keys it knows; `false` if it has no
    /// limits or was told already.
    pub fn set_known_keys(&self, known: Arc<dyn KnownKeys>) -> bool {
        self.admission
            .as_ref()
            .is_some_and(|admission| admission.set_known(known))
    }

    /// Connections unknown keys hold now: in total, and handshaking or held from `address`
    /// (zeros without [`AdmissionLimits`]).
    pub fn unknown_connections(&self, address: std::net::IpAddr) -> (usize, usize) {
        self.admission
            .as_ref()
            .map_or((0, 0), |admission| admission.held(address))
    }

    /// The underlying quinn endpoint.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Dials `node` on protocol `alpn`, trying its addresses in order; the last failure if none
    /// answers ([`ConnectError::NoAddress`] if it lists none).
    pub async fn connect_node(
        &self,
        node: &NodeAddr,
        alpn: &[u8],
    ) -> Result<quinn::Connection, ConnectError> {
        let mut last = ConnectError::NoAddress;
        for addr in &node.addrs {
            match self.connect(*addr, &node.hotkey, alpn).await {
                Ok(connection) => return Ok(connection),
                Err(error) => {
                    debug!(%addr, %error, "address failed");
                    last = error;
                }
            }
        }
        Err(last)
    }

    /// Dials `expected` at `addr` on protocol `alpn`, within [`HANDSHAKE_TIMEOUT`].
    ///
    /// Succeeds only if the server's certificate key is `expected`. In TLS 1.3 the client
    /// finishes its handshake before the server has checked the client's certificate, so a
    /// server refusing *us* may show up only on the first use of the connection (as a
    /// connection error carrying the TLS alert, see [`ConnectError::from_connection_error`]).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: &Hotkey,
        alpn: &[u8],
    ) -> Result<quinn::Connection, ConnectError> {
        let tls = client_tls_config(&self.key, self.certificate.clone(), alpn)?;
        let quic = QuicClientConfig::try_from(tls).map_err(TlsError::from)?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(Arc::clone(&self.transport));
        let connecting = self
            .endpoint
            .connect_with(client, addr, &server_name_string(expected))
            .map_err(|source| ConnectError::Dial { addr, source })?;
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| ConnectError::TimedOut(HANDSHAKE_TIMEOUT))?
            .map_err(ConnectError::from_connection_error)?;
        // The verifier already bound the certificate to `expected`; re-reading it guards against a
        // misconfigured verifier ever letting another key through.
        let actual = remote_hotkey(&connection).map_err(ConnectError::Identity)?;
        if actual != *expected {
            connection.close(codes::NOT_ALLOWED, b"wrong identity");
            return Err(ConnectError::Identity(PeerCertificateError::WrongHotkey {
                expected: *expected,
                actual,
            }));
        }
        Ok(connection)
    }

    /// The next authenticated incoming connection with the client's hotkey and the ALPN, or an
    /// error for one that failed its handshake. `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<IncomingConnection, AcceptError>> {
        self.accepted.lock().await.recv().await
    }

    /// Closes every connection with `code` and `reason` and stops accepting.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.endpoint.close(code, reason);
    }

    /// Waits until every connection is closed and its close has been sent.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for HordeEndpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// The accept loop's limits: the connection slots, each key's share, what unknown keys hold.
struct Limits {
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_peer: Arc<PeerQuota>,
    admission: Option<Arc<Admission>>,
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    limits: Limits,
    accepted: mpsc::Sender<Result<IncomingConnection, AcceptError>>,
) {
    let Limits {
        connections,
        max_connections,
        per_peer,
        admission,
    } = limits;
    // One task per connection (its handshake, then holding its slot until it closes), owned
    // here: they end with this loop, when the endpoint closes or is dropped.
    let mut tasks = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        // Under load, a source must first show it receives at its address: a Retry round
        // trip, which costs us no state. Initials from spoofed or silent sources then hold no
        // slot for a handshake timeout each; real peers pay one extra round trip.
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && connections.available_permits() * RETRY_BELOW_FREE_DIVISOR <= max_connections
        {
            debug!(remote = %incoming.remote_address(), "under load: validating the address first");
            if let Err(error) = incoming.retry() {
                error.into_incoming().refuse();
            }
            continue;
        }
        // One address holds a bounded share while handshaking (its key is not known yet).
        let address_slot = match &admission {
            Some(admission) => match admission.try_address(incoming.remote_address().ip()) {
                Some(slot) => Some(slot),
                None => {
                    debug!(remote = %incoming.remote_address(), "refusing connection: the address holds its share");
                    incoming.refuse();
                    continue;
                }
            },
            None => None,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "refusing connection: at capacity");
            incoming.refuse();
            continue;
        };
        let slots = Slots {
            permit,
            per_peer: Arc::clone(&per_peer),
            admission: admission.clone(),
            address_slot,
        };
        tasks.spawn(handle_incoming(incoming, slots, accepted.clone()));
    }
    // Closed: the tasks still holding a slot have nothing left to count it against.
    tasks.shutdown().await;
}

/// What one incoming connection holds: its connection slot, its key's share, and (with
/// admission limits) its source address's slot while it is handshaking or held by an unknown key.
struct Slots {
    permit: OwnedSemaphorePermit,
    per_peer: Arc<PeerQuota>,
    admission: Option<Arc<Admission>>,
    address_slot: Option<AddressSlot>,
}

/// Runs one handshake, takes the client's share of the connections (and, for an unknown key, of
/// the unknown keys' share), hands the connection over, and holds its slots until it closes (all
/// are released when this task ends, on every path).
async fn handle_incoming(
    incoming: quinn::Incoming,
    slots: Slots,
    accepted: mpsc::Sender<Result<IncomingConnection, AcceptError>>,
) {
    let Slots {
        permit,
        per_peer,
        admission,
        mut address_slot,
    } = slots;
    let remote = incoming.remote_address();
    match handshake(incoming).await {
        Ok(IncomingConnection {
            connection,
            peer: client,
            alpn,
        }) => {
            let Some(_share) = peer_share(&per_peer, &connection, client, remote) else {
                return;
            };
            let mut _unknown = None;
            let mut first_stream_within = None;
            if let Some(admission) = &admission {
                if admission.is_known(&client) {
                    // A known key does not count against its address.
                    address_slot = None;
                } else {
                    let (slot, made_room) =
                        admission.admit_unknown(client, remote.ip(), Box::new(connection.clone()));
                    if made_room {
                        debug!(%remote, peer = %client.fmt_short(), "unknown keys held their share: the oldest connection closed for this one");
                    }
                    _unknown = Some(slot);
                    first_stream_within = Some(admission.limits().first_stream_timeout);
                }
            }
            let _address_slot = address_slot;
            debug!(%remote, client = %client.fmt_short(), "accepted connection");
            let handed_over = accepted
                .send(Ok(IncomingConnection {
                    connection: connection.clone(),
                    peer: client,
                    alpn,
                }))
                .await
                .is_ok();
            drop(accepted);
            if !handed_over {
                connection.close(codes::SHUTDOWN, b"endpoint closed");
            }
            if let Some(within) = first_stream_within {
                close_if_no_stream(&connection, within).await;
            }
            connection.closed().await;
        }
        Err(error) => {
            debug!(%remote, %error, "incoming connection failed");
            if accepted.try_send(Err(error)).is_err() {
                warn!(%remote, "accept queue full; dropped a handshake failure report");
            }
        }
    }
    drop(permit);
}

/// Closes `connection` with [`codes::TIMED_OUT`] if its peer has opened no stream (sent no
/// STREAM frame) `within` of now; returns then, or when the connection closes first.
async fn close_if_no_stream(connection: &quinn::Connection, within: Duration) {
    tokio::select! {
        _ = connection.closed() => {}
        () = tokio::time::sleep(within) => {
            if connection.stats().frame_rx.stream == 0 {
                debug!(remote = %connection.remote_address(), "closing connection: no stream opened");
                connection.close(codes::TIMED_OUT, b"no stream opened");
            }
        }
    }
}

/// A permit of `client`'s share of the connections, or `None` after closing `connection` with
/// [`codes::TOO_MANY_CONNECTIONS`] because the client holds its whole share already.
fn peer_share(
    per_peer: &Arc<PeerQuota>,
    connection: &quinn::Connection,
    client: Hotkey,
    remote: SocketAddr,
) -> Option<PeerPermit> {
    let share = per_peer.try_acquire(client);
    if share.is_none() {
        let max = per_peer.max_per_peer();
        debug!(%remote, peer = %client.fmt_short(), max, "refusing connection: the peer holds its share of connections");
        connection.close(
            codes::TOO_MANY_CONNECTIONS,
            b"too many connections from this key",
        );
    }
    share
}

async fn handshake(incoming: quinn::Incoming) -> Result<IncomingConnection, AcceptError> {
    let remote = incoming.remote_address();
    let handshake_failed = |error| AcceptError::Handshake {
        remote,
        source: ConnectError::from_connection_error(error),
    };
    let connecting = incoming.accept().map_err(handshake_failed)?;
    let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| AcceptError::TimedOut { remote })?
        .map_err(handshake_failed)?;
    let client = match remote_hotkey(&connection) {
        Ok(client) => client,
        Err(source) => {
            connection.close(codes::NOT_ALLOWED, b"no identity");
            return Err(AcceptError::Identity { remote, source });
        }
    };
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    let Some(alpn) = alpn else {
        connection.close(codes::NOT_ALLOWED, b"no ALPN");
        return Err(AcceptError::NoAlpn { remote });
    };
    Ok(IncomingConnection {
        connection,
        peer: client,
        alpn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tuning_is_valid_and_bounded() {
        let tuning = TransportTuning::default();
        assert!(transport_config(&tuning).is_ok());
        assert!(tuning.keep_alive_interval < tuning.max_idle_timeout);
        assert!(u64::from(tuning.stream_receive_window) <= tuning.receive_window);
    }

    #[test]
    fn keep_alive_must_be_below_idle_timeout() {
        let mut tuning = TransportTuning::default();
        tuning.keep_alive_interval = tuning.max_idle_timeout;
        assert!(matches!(
            transport_config(&tuning),
            Err(ConfigError::KeepAliveTooLong { .. })
        ));
    }

    #[test]
    fn crypto_alerts_are_decoded() {
        assert_eq!(crypto_alert(TransportErrorCode::crypto(42)), Some(42));
        assert_eq!(crypto_alert(TransportErrorCode::CONNECTION_REFUSED), None);
    }
}
