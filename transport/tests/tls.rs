//! Handshake-level tests: who may connect to whom, each refusal checked by its typed error and TLS
//! alert. Everything runs on `127.0.0.1:0`.
//!
//! TLS 1.3 ordering: a client finishes its handshake before the server has checked the client's
//! certificate, so when the *server* refuses the client, the client may only learn it when the
//! server's close arrives ([`refusal`] accounts for both).

// Helpers outside `#[test]` functions are not covered by clippy's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use horde_protocol::{ControlMessage, DownMessage, FrameError, JobId, SecretKey, UpMessage};
use horde_transport::test_utils::{
    connected_pair, endpoint_pair, localhost_config, localhost_endpoint, seeded_key,
};
use horde_transport::{
    ALPN_BLOB, ALPN_CONTROL, ALPN_JOB, AcceptError, ChannelError, ClientPolicy, ConnectError,
    EndpointConfig, FramedRecv, FramedSend, HANDSHAKE_TIMEOUT, HordeEndpoint, HotkeyClientVerifier,
    HotkeyServerVerifier, TransportTuning, client_tls_config, codes, default_validity,
    remote_hotkey, self_signed_certificate, server_name_for, server_tls_config, split,
    transport_config,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::AlertDescription;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn alert(description: AlertDescription) -> u8 {
    u8::from(description)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pkcs8(key: &SecretKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_pkcs8_der().to_vec()))
}

fn node_certificate(key: &SecretKey) -> CertificateDer<'static> {
    self_signed_certificate(key, default_validity(SystemTime::now())).unwrap()
}

fn expired_certificate(key: &SecretKey) -> CertificateDer<'static> {
    let day = Duration::from_secs(24 * 60 * 60);
    let now = SystemTime::now();
    self_signed_certificate(key, (now - 2 * day, now - day)).unwrap()
}

fn ecdsa_identity() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["horde".to_owned()]).unwrap();
    let certificate = params.self_signed(&key).unwrap().der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (certificate, key)
}

/// A bare quinn server endpoint with a hand-made rustls configuration.
fn raw_server(tls: rustls::ServerConfig) -> quinn::Endpoint {
    let quic = QuicServerConfig::try_from(tls).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(
        transport_config(&TransportTuning::default()).unwrap(),
    ));
    quinn::Endpoint::server(server, localhost()).unwrap()
}

/// The server side of a raw endpoint: completes handshakes and keeps connections alive.
fn serve_raw(endpoint: &quinn::Endpoint) -> tokio::task::JoinHandle<()> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                if let Ok(connecting) = incoming.accept()
                    && let Ok(connection) = connecting.await
                {
                    connection.closed().await;
                }
            });
        }
    })
}

/// Dials `server` with a hand-made rustls client configuration, as if it had key `expected`.
async fn raw_connect(
    tls: rustls::ClientConfig,
    server: SocketAddr,
    expected: horde_protocol::Hotkey,
) -> Result<quinn::Connection, ConnectError> {
    let endpoint = quinn::Endpoint::client(localhost()).unwrap();
    let quic = QuicClientConfig::try_from(tls).unwrap();
    let ServerName::DnsName(name) = server_name_for(&expected) else {
        unreachable!()
    };
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            server,
            name.as_ref(),
        )
        .unwrap();
    connecting
        .await
        .map_err(ConnectError::from_connection_error)
}

/// [`HordeEndpoint::connect`] taking the hotkey by value, for use inside `tokio::join!`.
async fn dial(
    client: &HordeEndpoint,
    addr: SocketAddr,
    expected: horde_protocol::Hotkey,
    alpn: &[u8],
) -> Result<quinn::Connection, ConnectError> {
    client.connect(addr, &expected, alpn).await
}

/// The refusal of a connection attempt, whether it came during the handshake or right after it
/// (when the server refuses the client's certificate, see the module docs).
async fn refusal(result: Result<quinn::Connection, ConnectError>) -> ConnectError {
    match result {
        Err(error) => error,
        Ok(connection) => {
            let error = tokio::time::timeout(Duration::from_secs(5), connection.closed())
                .await
                .expect("the server should close a refused connection");
            ConnectError::from_connection_error(error)
        }
    }
}

/// The next accept result of `server`, within a few seconds.
async fn next_accept(
    server: &HordeEndpoint,
) -> Result<horde_transport::IncomingConnection, AcceptError> {
    tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("accept result in time")
        .expect("endpoint open")
}

#[tokio::test]
async fn correct_pair_connects_and_sees_each_others_hotkey() {
    let (client, server) = endpoint_pair().await;
    let addr = server.local_addr().unwrap();
    let (connection, accepted) = tokio::join!(
        dial(&client, addr, seeded_key(2).hotkey(), ALPN_CONTROL),
        next_accept(&server)
    );
    let connection = connection.unwrap();
    let accepted = accepted.unwrap();
    let (server_side, client_key, alpn) = (accepted.connection, accepted.peer, accepted.alpn);
    assert_eq!(remote_hotkey(&connection).unwrap(), seeded_key(2).hotkey());
    assert_eq!(remote_hotkey(&server_side).unwrap(), seeded_key(1).hotkey());
    assert_eq!(client_key, seeded_key(1).hotkey());
    assert_eq!(alpn, ALPN_CONTROL);
    assert_eq!(server.incoming_connections(), 1);

    // Every configured ALPN is negotiated as asked.
    for wanted in [ALPN_BLOB, ALPN_JOB] {
        let (connection, accepted) = tokio::join!(
            dial(&client, addr, server.hotkey(), wanted),
            next_accept(&server)
        );
        connection.unwrap();
        assert_eq!(accepted.unwrap().alpn, wanted);
    }
}

#[tokio::test]
async fn dialing_the_wrong_hotkey_is_refused() {
    let (client, server) = endpoint_pair().await;
    let addr = server.local_addr().unwrap();
    let (result, accepted) = tokio::join!(
        dial(&client, addr, seeded_key(9).hotkey(), ALPN_CONTROL),
        next_accept(&server)
    );
    let error = result.unwrap_err();
    // The reason names the key that answered and the one dialed (the user fixes the latter);
    // rustls sends a handshake_failure alert for a verifier's own error.
    let (actual, dialed) = (
        server.hotkey().to_string(),
        seeded_key(9).hotkey().to_string(),
    );
    assert!(
        matches!(&error, ConnectError::TlsRejected { alert: a, reason }
            if *a == alert(AlertDescription::HandshakeFailure)
                && reason.contains(&actual) && reason.contains(&dialed)),
        "{error:?}"
    );
    let server_error = accepted.unwrap_err();
    assert!(
        matches!(
            &server_error,
            AcceptError::Handshake {
                source: ConnectError::TlsRejectedByPeer { .. },
                ..
            }
        ),
        "{server_error:?}"
    );
    assert_eq!(
        server_error.tls_alert(),
        Some(alert(AlertDescription::HandshakeFailure))
    );
}

#[tokio::test]
async fn server_with_ecdsa_certificate_is_refused() {
    let (certificate, key) = ecdsa_identity();
    let tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(HotkeyClientVerifier::default()))
        .with_single_cert(vec![certificate], key)
        .unwrap();
    let mut tls = tls;
    tls.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
    let server = raw_server(tls);
    let _serving = serve_raw(&server);
    let client = localhost_endpoint(&seeded_key(1));
    let error = client
        .connect(
            server.local_addr().unwrap(),
            &seeded_key(2).hotkey(),
            ALPN_CONTROL,
        )
        .await
        .unwrap_err();
    // We only offer the Ed25519 signature scheme, so an ECDSA server cannot even sign its half of
    // the handshake: it aborts with handshake_failure before presenting the certificate.
    // (The verifier's own refusal of an ECDSA certificate is unit-tested in tls.rs.)
    assert!(
        matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == alert(AlertDescription::HandshakeFailure)),
        "{error:?}"
    );
}

#[tokio::test]
async fn client_with_ecdsa_certificate_is_refused() {
    let server = localhost_endpoint(&seeded_key(2));
    let (certificate, key) = ecdsa_identity();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HotkeyServerVerifier::new()))
        .with_client_auth_cert(vec![certificate], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
    let (result, accepted) = tokio::join!(
        raw_connect(tls, server.local_addr().unwrap(), server.hotkey()),
        next_accept(&server)
    );
    // An ECDSA key cannot sign with the only scheme the server asks for (Ed25519), so rustls
    // sends no certificate at all, and the server demands one.
    let certificate_required = alert(AlertDescription::CertificateRequired);
    let server_error = accepted.unwrap_err();
    assert!(
        matches!(
            &server_error,
            AcceptError::Handshake {
                source: ConnectError::TlsRejected { .. },
                ..
            }
        ),
        "{server_error:?}"
    );
    assert_eq!(server_error.tls_alert(), Some(certificate_required));
    let error = refusal(result).await;
    assert!(
        matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == certificate_required),
        "{error:?}"
    );
}

#[tokio::test]
async fn server_presenting_a_chain_is_refused() {
    let key = seeded_key(2);
    let certificate = node_certificate(&key);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(HotkeyClientVerifier::default()))
        .with_single_cert(vec![certificate.clone(), certificate], pkcs8(&key))
        .unwrap();
    tls.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
    let server = raw_server(tls);
    let _serving = serve_raw(&server);
    let client = localhost_endpoint(&seeded_key(1));
    let error = client
        .connect(server.local_addr().unwrap(), &key.hotkey(), ALPN_CONTROL)
        .await
        .unwrap_err();
    match &error {
        ConnectError::TlsRejected { alert: a, reason } => {
            assert_eq!(*a, alert(AlertDescription::CertificateUnknown));
            // rustls shows our typed error in its reason: `Other(OtherError(Chain(2)))`.
            assert!(reason.contains("Chain(2)"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let server = localhost_endpoint(&seeded_key(2));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HotkeyServerVerifier::new()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
    let (result, accepted) = tokio::join!(
        raw_connect(tls, server.local_addr().unwrap(), server.hotkey()),
        next_accept(&server)
    );
    let certificate_required = alert(AlertDescription::CertificateRequired);
    assert_eq!(
        accepted.unwrap_err().tls_alert(),
        Some(certificate_required)
    );
    let error = refusal(result).await;
    assert!(
        matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == certificate_required),
        "{error:?}"
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let key = seeded_key(2);
    let tls = server_tls_config(
        &key,
        expired_certificate(&key),
        &[ALPN_CONTROL.to_vec()],
        ClientPolicy::Any,
    )
    .unwrap();
    let server = raw_server(tls);
    let _serving = serve_raw(&server);
    let client = localhost_endpoint(&seeded_key(1));
    let error = client
        .connect(server.local_addr().unwrap(), &key.hotkey(), ALPN_CONTROL)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ConnectError::TlsRejected { alert: a, .. } if *a == alert(AlertDescription::CertificateExpired)),
        "{error:?}"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let server = localhost_endpoint(&seeded_key(2));
    let key = seeded_key(1);
    let tls = client_tls_config(&key, expired_certificate(&key), ALPN_CONTROL).unwrap();
    let (result, accepted) = tokio::join!(
        raw_connect(tls, server.local_addr().unwrap(), server.hotkey()),
        next_accept(&server)
    );
    let expired = alert(AlertDescription::CertificateExpired);
    let server_error = accepted.unwrap_err();
    assert!(
        matches!(&server_error, AcceptError::Handshake { source: ConnectError::TlsRejected { alert: a, .. }, .. } if *a == expired),
        "{server_error:?}"
    );
    let error = refusal(result).await;
    assert!(
        matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == expired),
        "{error:?}"
    );
}

#[tokio::test]
async fn unknown_alpn_is_refused() {
    let client = localhost_endpoint(&seeded_key(1));
    let config = EndpointConfig::new(localhost(), &[ALPN_CONTROL]);
    let server = HordeEndpoint::bind(&seeded_key(2), config).unwrap();
    let addr = server.local_addr().unwrap();
    let no_protocol = alert(AlertDescription::NoApplicationProtocol);
    for offered in [b"horde/bogus/1".as_slice(), ALPN_JOB] {
        let (result, accepted) = tokio::join!(
            dial(&client, addr, server.hotkey(), offered),
            next_accept(&server)
        );
        let error = result.unwrap_err();
        assert!(
            matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == no_protocol),
            "{error:?}"
        );
        assert_eq!(accepted.unwrap_err().tls_alert(), Some(no_protocol));
    }
}

#[tokio::test]
async fn job_endpoint_accepts_only_its_client() {
    let job_client = seeded_key(5);
    let config = localhost_config().with_client_policy(ClientPolicy::Only(job_client.hotkey()));
    let server = HordeEndpoint::bind(&seeded_key(4), config).unwrap();
    let addr = server.local_addr().unwrap();

    let allowed = localhost_endpoint(&job_client);
    let (result, accepted) = tokio::join!(
        dial(&allowed, addr, server.hotkey(), ALPN_JOB),
        next_accept(&server)
    );
    let connection = result.unwrap();
    let client_key = accepted.unwrap().peer;
    assert_eq!(client_key, job_client.hotkey());
    assert_eq!(remote_hotkey(&connection).unwrap(), server.hotkey());

    let stranger = localhost_endpoint(&seeded_key(6));
    let (result, accepted) = tokio::join!(
        dial(&stranger, addr, server.hotkey(), ALPN_JOB),
        next_accept(&server)
    );
    let access_denied = alert(AlertDescription::AccessDenied);
    let server_error = accepted.unwrap_err();
    assert!(
        matches!(&server_error, AcceptError::Handshake { source: ConnectError::TlsRejected { alert: a, .. }, .. } if *a == access_denied),
        "{server_error:?}"
    );
    let error = refusal(result).await;
    assert!(
        matches!(&error, ConnectError::TlsRejectedByPeer { alert: a, .. } if *a == access_denied),
        "{error:?}"
    );
}

#[tokio::test]
async fn connection_cap_refuses_then_recovers() {
    let server =
        HordeEndpoint::bind(&seeded_key(2), localhost_config().with_max_connections(2)).unwrap();
    let addr = server.local_addr().unwrap();
    let server_key = server.hotkey();
    let client = localhost_endpoint(&seeded_key(1));

    let first = client
        .connect(addr, &server_key, ALPN_CONTROL)
        .await
        .unwrap();
    let second = client
        .connect(addr, &server_key, ALPN_CONTROL)
        .await
        .unwrap();
    let mut held = vec![
        next_accept(&server).await.unwrap(),
        next_accept(&server).await.unwrap(),
    ];
    assert_eq!(server.incoming_connections(), 2);

    let error = client
        .connect(addr, &server_key, ALPN_CONTROL)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::Refused), "{error:?}");

    first.close(codes::SHUTDOWN, b"done");
    let released = tokio::time::timeout(Duration::from_secs(5), async {
        while server.incoming_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "the closed connection's slot was not released"
    );

    let third = client
        .connect(addr, &server_key, ALPN_CONTROL)
        .await
        .unwrap();
    held.push(next_accept(&server).await.unwrap());
    assert_eq!(server.incoming_connections(), 2);
    drop((second, third, held));
}

/// One key holds at most `max_connections_per_peer` connections: its next one is closed with
/// `TOO_MANY_CONNECTIONS` right after the handshake and never accepted, while another key still
/// connects; once the first key closes one, it can connect again.
#[tokio::test]
async fn connections_per_key_are_capped_without_refusing_other_keys() {
    let config = localhost_config().with_max_connections_per_peer(2);
    let server = HordeEndpoint::bind(&seeded_key(2), config).unwrap();
    let addr = server.local_addr().unwrap();
    let server_key = server.hotkey();
    let greedy = localhost_endpoint(&seeded_key(1));
    let other = localhost_endpoint(&seeded_key(3));

    let first = dial(&greedy, addr, server_key, ALPN_CONTROL).await.unwrap();
    let second = dial(&greedy, addr, server_key, ALPN_CONTROL).await.unwrap();
    let mut held = vec![
        next_accept(&server).await.unwrap(),
        next_accept(&server).await.unwrap(),
    ];
    assert_eq!(server.incoming_connections_from(&greedy.hotkey()), 2);

    let error = refusal(dial(&greedy, addr, server_key, ALPN_CONTROL).await).await;
    assert!(
        matches!(
            &error,
            ConnectError::Connection(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == codes::TOO_MANY_CONNECTIONS
        ),
        "{error:?}"
    );
    assert_eq!(server.incoming_connections_from(&greedy.hotkey()), 2);

    // Another key connects at once, and is the next connection accepted (the refused one never
    // reaches `accept`).
    let from_other = dial(&other, addr, server_key, ALPN_CONTROL).await.unwrap();
    let accepted = next_accept(&server).await.unwrap();
    assert_eq!(accepted.peer, other.hotkey());
    held.push(accepted);

    first.close(codes::SHUTDOWN, b"done");
    let released = tokio::time::timeout(Duration::from_secs(5), async {
        while server.incoming_connections_from(&greedy.hotkey()) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "the closed connection's share was not released"
    );

    let again = dial(&greedy, addr, server_key, ALPN_CONTROL).await.unwrap();
    let accepted = next_accept(&server).await.unwrap();
    assert_eq!(accepted.peer, greedy.hotkey());
    assert!(again.close_reason().is_none(), "{:?}", again.close_reason());
    assert_eq!(server.incoming_connections_from(&greedy.hotkey()), 2);
    held.push(accepted);
    drop((second, from_other, again, held));
}

#[tokio::test]
async fn a_zero_per_peer_cap_is_refused() {
    let config = localhost_config().with_max_connections_per_peer(0);
    let error = HordeEndpoint::bind(&seeded_key(2), config).unwrap_err();
    assert!(
        error.to_string().contains("max_connections_per_peer"),
        "{error}"
    );
}

#[tokio::test]
async fn framed_round_trip_over_quic() {
    let pair = connected_pair().await;
    let messages = vec![
        ControlMessage::Down(DownMessage::Attach(JobId([1; 16]))),
        ControlMessage::Up(UpMessage::Accepted),
        ControlMessage::Up(UpMessage::VolumesFetched { volume_msg_id: 7 }),
    ];
    let (send, recv) = pair.client.open_bi().await.unwrap();
    let (mut send, _client_recv) = split(send, recv);
    for message in &messages {
        send.send(message).await.unwrap();
    }
    // Close to the 1 MiB cap: spans many QUIC packets and reads.
    let big = vec![7u8; 900 * 1024];
    send.send(&big).await.unwrap();
    send.finish().unwrap();

    let (server_send, server_recv) = pair.server.accept_bi().await.unwrap();
    let (_server_send, mut server_recv) = split(server_send, server_recv);
    for message in &messages {
        assert_eq!(
            server_recv.recv::<ControlMessage>().await.unwrap().as_ref(),
            Some(message)
        );
    }
    assert_eq!(server_recv.recv::<Vec<u8>>().await.unwrap(), Some(big));
    assert_eq!(server_recv.recv::<ControlMessage>().await.unwrap(), None);
}

#[tokio::test]
async fn oversize_frame_over_quic_stops_the_sender() {
    let pair = connected_pair().await;
    let (send, _recv) = pair.client.open_bi().await.unwrap();
    let mut send = FramedSend::new(send, horde_protocol::MAX_FRAME_LEN);
    send.send(&vec![1u8; 64 * 1024]).await.unwrap();

    let (_server_send, server_recv) = pair.server.accept_bi().await.unwrap();
    let mut server_recv = FramedRecv::new(server_recv, 16 * 1024);
    let error = server_recv.recv::<Vec<u8>>().await.unwrap_err();
    assert!(
        matches!(
            error,
            ChannelError::Frame(FrameError::TooLarge { max: 16384, .. })
        ),
        "{error:?}"
    );
    assert_eq!(
        send.stream_mut().stopped().await.unwrap(),
        Some(codes::FRAME_TOO_LARGE)
    );
}

/// `delivered` after `finish` resolves once the peer has acknowledged the whole stream, and the
/// peer then reads every frame and the end.
#[tokio::test]
async fn delivered_resolves_once_the_peer_has_the_whole_stream() {
    let pair = connected_pair().await;
    let (send, recv) = pair.client.open_bi().await.unwrap();
    let (mut send, _client_recv) = split(send, recv);
    let big = vec![3u8; 300 * 1024];
    send.send(&big).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(Duration::from_secs(5), send.delivered())
        .await
        .expect("acknowledged in time")
        .unwrap();

    let (server_send, server_recv) = pair.server.accept_bi().await.unwrap();
    let (_server_send, mut server_recv) = split(server_send, server_recv);
    assert_eq!(server_recv.recv::<Vec<u8>>().await.unwrap(), Some(big));
    assert_eq!(server_recv.recv::<Vec<u8>>().await.unwrap(), None);
}

/// A connection lost before the peer acknowledged a finished stream makes `delivered` fail with
/// the typed `Unacknowledged` error instead of claiming delivery. On this current-thread
/// runtime nothing runs between `finish` and `close`, so no acknowledgement can arrive first.
#[tokio::test]
async fn delivered_fails_typed_when_the_connection_dies_first() {
    let pair = connected_pair().await;
    let (send, recv) = pair.client.open_bi().await.unwrap();
    let (mut send, _client_recv) = split(send, recv);
    send.send(&ControlMessage::Up(UpMessage::Accepted))
        .await
        .unwrap();
    send.finish().unwrap();
    pair.client.close(codes::CANCELLED, b"gone");
    let error = tokio::time::timeout(Duration::from_secs(5), send.delivered())
        .await
        .expect("resolved in time")
        .unwrap_err();
    assert!(
        matches!(
            error,
            ChannelError::Unacknowledged(quinn::StoppedError::ConnectionLost(
                quinn::ConnectionError::LocallyClosed
            ))
        ),
        "{error:?}"
    );
}

/// Dialing an address where nothing answers (a UDP socket that never reads) fails with a typed
/// `TimedOut` after the handshake timeout, not sooner and not never. The clock is tokio's paused
/// one, so the test does not wait ten real seconds.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answers_times_out_the_handshake() {
    let silent = std::net::UdpSocket::bind(localhost()).unwrap();
    let client = localhost_endpoint(&seeded_key(1));
    let started = tokio::time::Instant::now();
    let result = client
        .connect(
            silent.local_addr().unwrap(),
            &seeded_key(2).hotkey(),
            ALPN_CONTROL,
        )
        .await;
    assert!(
        matches!(result, Err(ConnectError::TimedOut(limit)) if limit == HANDSHAKE_TIMEOUT),
        "{result:?}"
    );
    let elapsed = started.elapsed();
    assert!(
        (HANDSHAKE_TIMEOUT..HANDSHAKE_TIMEOUT + Duration::from_secs(1)).contains(&elapsed),
        "{elapsed:?}"
    );
}

/// A flood of QUIC Initials that are never followed up — 100 genuine client Initials, captured
/// and then sent from 100 UDP sockets that never answer, as a spoofing or hostile source would
/// — does not lock out a real client from another address: it connects within 2 s, although
/// each abandoned handshake could hold a connection slot for the whole handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_abandoned_handshakes_does_not_lock_out_a_real_client() {
    use tokio::net::UdpSocket;
    let server =
        HordeEndpoint::bind(&seeded_key(2), localhost_config().with_max_connections(32)).unwrap();
    let addr = server.local_addr().unwrap();
    let server_key = server.hotkey();
    // Capture each dialer's first datagram (its Initial) on a socket of our own.
    let capture = UdpSocket::bind(localhost()).await.unwrap();
    let dialers: Vec<_> = (0..100)
        .map(|_| Arc::new(localhost_endpoint(&SecretKey::generate())))
        .collect();
    let capture_addr = capture.local_addr().unwrap();
    let dialing: Vec<_> = dialers
        .iter()
        .map(|dialer| {
            let (dialer, server_key) = (Arc::clone(dialer), server_key);
            tokio::spawn(async move {
                // Only the first flight matters; the attempt is abandoned.
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    dialer.connect(capture_addr, &server_key, ALPN_CONTROL),
                )
                .await;
            })
        })
        .collect();
    let mut initials = std::collections::HashMap::new();
    let mut buffer = vec![0u8; 65_535];
    while initials.len() < dialers.len() {
        let (len, from) =
            tokio::time::timeout(Duration::from_secs(5), capture.recv_from(&mut buffer))
                .await
                .expect("every dialer sends its Initial")
                .unwrap();
        initials
            .entry(from)
            .or_insert_with(|| buffer[..len].to_vec());
    }
    for task in dialing {
        task.abort();
    }
    drop(dialers);
    // The flood: each Initial from a socket of its own that never reads what comes back.
    let mut silent = Vec::new();
    for initial in initials.values() {
        let socket = UdpSocket::bind(localhost()).await.unwrap();
        socket.send_to(initial, addr).await.unwrap();
        silent.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A real client on another loopback address.
    let config = EndpointConfig::new(
        SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 0)),
        &[ALPN_CONTROL],
    );
    let client = HordeEndpoint::bind(&seeded_key(1), config).unwrap();
    let (connected, accepted) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(2),
            client.connect(addr, &server_key, ALPN_CONTROL)
        ),
        tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match server.accept().await {
                    Some(Ok(accepted)) => break accepted,
                    Some(Err(_)) => continue,
                    None => panic!("server closed"),
                }
            }
        })
    );
    let connection = connected
        .expect("the real client connects within 2 s")
        .unwrap();
    assert_eq!(accepted.unwrap().peer, seeded_key(1).hotkey());
    drop((connection, silent));
}
